//! `/readyz` of the apiserver: ready only while the export is synced **and** its etcd is usable.
//!
//! Two parties know part of the answer: the export loop (initial export done, canaries written; or re-exporting
//! after an etcd reset) and the reset handler (etcd answers; or it lost its data and is being re-created). Each
//! owns one condition here; the process is ready when neither has a reason not to be. Peers and operators then see
//! not-ready for the whole of an etcd outage and its restore, not just for the part one of them saw.

use std::sync::{Arc, Mutex};

use causeway_runtime::Health;

#[derive(Debug, Default)]
struct Conditions {
    /// Why the export is not complete, if it is not.
    export: Option<String>,
    /// Why etcd cannot be used, if it cannot.
    etcd: Option<String>,
}

/// Shared handle; clones are one readiness.
#[derive(Clone)]
pub struct Readiness {
    health: Health,
    conditions: Arc<Mutex<Conditions>>,
}

impl Readiness {
    /// Starts not ready: the export has not run yet.
    pub fn new(health: Health) -> Self {
        let r = Readiness {
            health,
            conditions: Arc::new(Mutex::new(Conditions { export: Some("starting".into()), etcd: None })),
        };
        r.publish();
        r
    }

    pub fn set_export_ready(&self) {
        self.update(|c| c.export = None);
    }

    pub fn set_export_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.update(|c| c.export = Some(reason));
    }

    pub fn set_etcd_ok(&self) {
        self.update(|c| c.etcd = None);
    }

    pub fn set_etcd_not_ok(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.update(|c| c.etcd = Some(reason));
    }

    pub fn is_ready(&self) -> bool {
        self.health.is_ready()
    }

    fn update(&self, f: impl FnOnce(&mut Conditions)) {
        f(&mut self.conditions.lock().unwrap_or_else(|e| e.into_inner()));
        self.publish();
    }

    /// Pushes the combined state to `/readyz` (under the lock, so two updates cannot publish out of order).
    fn publish(&self) {
        let c = self.conditions.lock().unwrap_or_else(|e| e.into_inner());
        match (&c.etcd, &c.export) {
            (None, None) => self.health.set_ready(),
            (Some(etcd), None) => self.health.set_not_ready(etcd.clone()),
            (None, Some(export)) => self.health.set_not_ready(export.clone()),
            (Some(etcd), Some(export)) => self.health.set_not_ready(format!("{etcd}; {export}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_both_conditions_hold() {
        let health = Health::new();
        let r = Readiness::new(health.clone());
        assert!(!r.is_ready(), "not ready before the export ran");
        r.set_export_ready();
        assert!(health.is_ready());
        r.set_etcd_not_ok("etcd unreachable");
        assert!(!health.is_ready(), "an unusable etcd makes the process not ready although the export is synced");
        r.set_export_not_ready("re-exporting");
        r.set_etcd_ok();
        assert!(!health.is_ready(), "etcd back, but the re-export is not done");
        r.set_export_ready();
        assert!(health.is_ready());
    }
}

//! Gateway health with hysteresis, from probe rounds (agents probe each other every 100–200 ms and report).
//!
//! A healthy gateway goes down after `fall` consecutive failed rounds, or when no report arrived for
//! `stale_after` (the reporters died too). A gateway that has been down comes back only after `rise` consecutive
//! good rounds spanning at least `hold_down`, so that a flapping node does not move traffic back and forth. A node
//! never seen down needs only `rise` rounds, so a fresh controller does not wait `hold_down` for every gateway.
//! Time is passed in; nothing here sleeps or reads a clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub rise: u32,
    pub fall: u32,
    pub hold_down: Duration,
    pub stale_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        // With 100 ms probe rounds: down after 300 ms, so failover fits the 1 s target with room for propagation.
        HealthConfig { rise: 3, fall: 3, hold_down: Duration::from_secs(5), stale_after: Duration::from_millis(600) }
    }
}

#[derive(Debug, Clone)]
struct NodeHealth {
    healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
    /// When the current run of good rounds began.
    ok_since: Option<Instant>,
    /// Whether the node has ever been taken down (then `hold_down` applies to its return).
    was_down: bool,
    last_report: Instant,
}

/// A change of a node's health, for logs and Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub node: String,
    pub healthy: bool,
    pub why: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct HealthTracker {
    config: HealthConfig,
    nodes: BTreeMap<String, NodeHealth>,
}

impl HealthTracker {
    pub fn new(config: HealthConfig) -> Self {
        HealthTracker { config, nodes: BTreeMap::new() }
    }

    pub fn is_healthy(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.healthy)
    }

    /// Records one probe round's verdict for `node`.
    pub fn observe(&mut self, node: &str, ok: bool, now: Instant) -> Option<HealthChange> {
        let cfg = self.config;
        let h = self.nodes.entry(node.to_string()).or_insert(NodeHealth {
            healthy: false,
            ok_streak: 0,
            fail_streak: 0,
            ok_since: None,
            was_down: false,
            last_report: now,
        });
        h.last_report = now;
        if ok {
            h.fail_streak = 0;
            h.ok_streak = h.ok_streak.saturating_add(1);
            let since = *h.ok_since.get_or_insert(now);
            let held = !h.was_down || now.saturating_duration_since(since) >= cfg.hold_down;
            if !h.healthy && h.ok_streak >= cfg.rise && held {
                h.healthy = true;
                return Some(HealthChange { node: node.to_string(), healthy: true, why: "probes passed" });
            }
        } else {
            h.ok_streak = 0;
            h.ok_since = None;
            h.fail_streak = h.fail_streak.saturating_add(1);
            if h.healthy && h.fail_streak >= cfg.fall {
                h.healthy = false;
                h.was_down = true;
                return Some(HealthChange { node: node.to_string(), healthy: false, why: "probes failed" });
            }
        }
        None
    }

    /// Whether `node`'s health is known: it rose, or failed `fall` rounds in a row (a node with no report, or
    /// still rising, is not settled). A fresh controller waits for this before it publishes, so that it does not
    /// hand out "no healthy gateway" for gateways that are only not probed yet.
    pub fn settled(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.healthy || n.fail_streak >= self.config.fall)
    }

    /// Takes down nodes whose reports stopped. Call on every timer tick.
    pub fn tick(&mut self, now: Instant) -> Vec<HealthChange> {
        let stale_after = self.config.stale_after;
        let mut changes = Vec::new();
        for (name, h) in &mut self.nodes {
            if h.healthy && now.saturating_duration_since(h.last_report) >= stale_after {
                h.healthy = false;
                h.was_down = true;
                h.ok_streak = 0;
                h.ok_since = None;
                changes.push(HealthChange { node: name.clone(), healthy: false, why: "probe reports stopped" });
            }
        }
        changes
    }

    /// When the next [`tick`](Self::tick) could change something, for the adapter's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.nodes.values().filter(|h| h.healthy).map(|h| h.last_report + self.config.stale_after).min()
    }

    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig { rise: 3, fall: 2, hold_down: Duration::from_secs(2), stale_after: Duration::from_millis(500) }
    }

    const ROUND: Duration = Duration::from_millis(100);

    #[test]
    fn health_is_settled_once_a_node_rose_or_failed_fall_rounds() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(cfg());
        assert!(!h.settled("a"), "no report: not known");
        h.observe("a", true, t0);
        h.observe("a", true, t0 + ROUND);
        assert!(!h.settled("a"), "still rising");
        h.observe("a", true, t0 + 2 * ROUND);
        assert!(h.settled("a"), "rose");
        h.observe("b", false, t0);
        assert!(!h.settled("b"), "one failure is not a verdict");
        h.observe("b", false, t0 + ROUND);
        assert!(h.settled("b"), "failed `fall` rounds: known to be down");
    }

    #[test]
    fn fresh_node_is_healthy_after_rise_rounds_without_hold_down() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(cfg());
        assert!(!h.is_healthy("a"), "unknown nodes are not healthy");
        assert_eq!(h.observe("a", true, t0), None);
        assert_eq!(h.observe("a", true, t0 + ROUND), None);
        assert!(!h.is_healthy("a"));
        let c = h.observe("a", true, t0 + 2 * ROUND).expect("up on the third round");
        assert!(c.healthy);
        assert!(h.is_healthy("a"));
    }

    #[test]
    fn goes_down_after_fall_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(cfg());
        for i in 0..3 {
            h.observe("a", true, t0 + i * ROUND);
        }
        assert_eq!(h.observe("a", false, t0 + 3 * ROUND), None, "one failure is not enough");
        assert!(h.is_healthy("a"));
        h.observe("a", true, t0 + 4 * ROUND);
        assert_eq!(h.observe("a", false, t0 + 5 * ROUND), None, "the streak restarted");
        let c = h.observe("a", false, t0 + 6 * ROUND).expect("down");
        assert!(!c.healthy);
        assert!(!h.is_healthy("a"));
    }

    #[test]
    fn a_node_that_was_down_needs_the_hold_down_time_to_return() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(cfg());
        let mut t = t0;
        for _ in 0..3 {
            h.observe("a", true, t);
            t += ROUND;
        }
        h.observe("a", false, t);
        t += ROUND;
        h.observe("a", false, t);
        assert!(!h.is_healthy("a"));
        // Good rounds for just under the hold-down time: still down despite many more than `rise` rounds.
        let back = t + ROUND;
        t = back;
        while t < back + Duration::from_millis(1900) {
            h.observe("a", true, t);
            assert!(!h.is_healthy("a"), "returned early at {:?}", t - back);
            t += ROUND;
        }
        // A single failure in between restarts the hold-down.
        h.observe("a", false, t);
        t += ROUND;
        let restart = t;
        while t < restart + Duration::from_secs(2) {
            h.observe("a", true, t);
            assert!(!h.is_healthy("a"));
            t += ROUND;
        }
        assert!(h.observe("a", true, t).is_some_and(|c| c.healthy));
    }

    #[test]
    fn stale_reports_take_a_healthy_node_down() {
        let t0 = Instant::now();
        let mut h = HealthTracker::new(cfg());
        for i in 0..3 {
            h.observe("a", true, t0 + i * ROUND);
        }
        let last = t0 + 2 * ROUND;
        assert_eq!(h.next_deadline(), Some(last + Duration::from_millis(500)));
        assert!(h.tick(last + Duration::from_millis(499)).is_empty());
        let changes = h.tick(last + Duration::from_millis(500));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].why, "probe reports stopped");
        assert!(!h.is_healthy("a"));
        assert_eq!(h.next_deadline(), None);
    }
}

//! The election itself, without I/O: what to write to the Lease given what was read from it, and whether this
//! replica may act. Time comes in as arguments, so the tests drive it with a fake clock.
//!
//! Expiry follows the rule Kubernetes' own controllers use: a Lease is judged by *when this replica last saw it
//! change* (its local monotonic clock), never by the timestamps written in it, so clock skew between nodes cannot
//! make a live leader look expired. A leader that cannot renew stops acting after `renew_deadline`, which is shorter
//! than `lease_duration`: it has stepped down before any other replica can take the Lease over.

use std::time::{Duration, Instant};

/// Timing of the election. `renew_deadline < lease_duration` and `retry_period < renew_deadline` (checked by
/// [`Timing::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease holds after its last renewal, as written into the Lease.
    pub lease_duration: Duration,
    /// How long a leader keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between two attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Default for Timing {
    /// The values Kubernetes' controllers use: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timing {
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_duration.as_secs() < 1 {
            return Err(format!(
                "lease duration {:?} is under 1s (the Lease counts whole seconds)",
                self.lease_duration
            ));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "renew deadline {:?} must be shorter than the lease duration {:?}: a leader that cannot renew must \
                 stop acting before another replica may take over",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "retry period {:?} must be above 0 and shorter than the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// The parts of a Lease's spec the election reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// `None` or empty: nobody holds it (never held, or released).
    pub holder: Option<String>,
    pub lease_duration: Duration,
    /// How many times the holder changed.
    pub transitions: i32,
    /// Opaque to the election (the adapter keeps the wall-clock times); compared to notice renewals.
    pub renew_stamp: Option<String>,
}

impl Record {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

/// What this replica may do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not decided yet (the Lease was not read yet).
    Unknown,
    /// Act: this replica holds the Lease, renewed less than `renew_deadline` ago.
    Leader,
    /// Do not act; `holder` is who holds the Lease, if anyone.
    Follower { holder: Option<String> },
}

/// The write the adapter should make after a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// No Lease exists: create it, holding it.
    Create(Record),
    /// Replace the Lease read (conditional on its resourceVersion): renew it, or take it over.
    Update(Record),
    /// Someone else holds a live Lease.
    None,
}

/// One replica's side of the election.
#[derive(Debug)]
pub struct Election {
    identity: String,
    timing: Timing,
    /// The record last read and when it was first seen in that state (local clock).
    observed: Option<(Record, Instant)>,
    /// When this replica last wrote the Lease holding it.
    renewed_at: Option<Instant>,
    read_once: bool,
}

impl Election {
    pub fn new(identity: impl Into<String>, timing: Timing) -> Self {
        Self { identity: identity.into(), timing, observed: None, renewed_at: None, read_once: false }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Until when this replica may act without another successful renewal (`None`: it does not lead).
    pub fn leading_until(&self) -> Option<Instant> {
        self.renewed_at.map(|at| at + self.timing.renew_deadline)
    }

    /// What this replica may do at `now`.
    pub fn role(&self, now: Instant) -> Role {
        if self.leading_until().is_some_and(|until| now < until) {
            return Role::Leader;
        }
        if !self.read_once {
            return Role::Unknown;
        }
        let holder = self.observed.as_ref().and_then(|(r, _)| r.holder().map(str::to_string));
        // Our own name on a Lease we could not renew in time is not leadership.
        Role::Follower { holder: holder.filter(|h| h != &self.identity) }
    }

    /// Feeds a read of the Lease (`None`: it does not exist) and returns the write to attempt. `renew_stamp` is what
    /// the adapter will write as the renewal time (any value that differs between writes).
    pub fn observe(&mut self, lease: Option<Record>, now: Instant, renew_stamp: String) -> Write {
        self.read_once = true;
        let Some(current) = lease else {
            self.observed = None;
            return Write::Create(Record {
                holder: Some(self.identity.clone()),
                lease_duration: self.timing.lease_duration,
                transitions: 0,
                renew_stamp: Some(renew_stamp),
            });
        };
        let seen_at = match &self.observed {
            Some((prev, at)) if *prev == current => *at,
            _ => now,
        };
        self.observed = Some((current.clone(), seen_at));
        let mine = current.holder() == Some(self.identity.as_str());
        let free = current.holder().is_none();
        let expired = now.saturating_duration_since(seen_at) >= current.lease_duration;
        if !(mine || free || expired) {
            // A live holder that is not us: if we thought we led, we no longer do.
            self.renewed_at = None;
            return Write::None;
        }
        let transitions = if mine { current.transitions } else { current.transitions.saturating_add(1) };
        Write::Update(Record {
            holder: Some(self.identity.clone()),
            lease_duration: self.timing.lease_duration,
            transitions,
            renew_stamp: Some(renew_stamp),
        })
    }

    /// The write returned by [`observe`](Self::observe), made at `at` (when it was sent: the Lease holds from
    /// then), succeeded.
    pub fn written(&mut self, record: Record, at: Instant) {
        self.observed = Some((record, at));
        self.renewed_at = Some(at);
    }

    /// The write failed, or lost a race (conflict). The role decays on its own once `renew_deadline` passes.
    pub fn write_failed(&mut self) {}

    /// The record to write to give the Lease up (on shutdown), if this replica holds it: no holder, and a 1 s
    /// duration, so that a replica reading an older copy still takes over quickly.
    pub fn release(&mut self, now: Instant) -> Option<Record> {
        if self.role(now) != Role::Leader {
            return None;
        }
        self.renewed_at = None;
        let transitions = self.observed.as_ref().map_or(0, |(r, _)| r.transitions);
        Some(Record { holder: None, lease_duration: Duration::from_secs(1), transitions, renew_stamp: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    fn held_by(who: &str, stamp: &str) -> Record {
        Record {
            holder: Some(who.into()),
            lease_duration: T.lease_duration,
            transitions: 3,
            renew_stamp: Some(stamp.into()),
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn creates_a_missing_lease_and_leads_once_written() {
        let t0 = Instant::now();
        let mut e = Election::new("a", T);
        assert_eq!(e.role(t0), Role::Unknown);
        let w = e.observe(None, t0, "1".into());
        let Write::Create(rec) = w else { panic!("expected a create, got {w:?}") };
        assert_eq!(rec.holder.as_deref(), Some("a"));
        assert_eq!(rec.transitions, 0);
        assert_eq!(e.role(t0), Role::Follower { holder: None }, "not leader before the write succeeded");
        e.written(rec, t0);
        assert_eq!(e.role(t0 + s(9)), Role::Leader);
    }

    #[test]
    fn waits_for_a_live_holder_and_takes_over_only_after_it_stopped_renewing_for_a_lease_duration() {
        let t0 = Instant::now();
        let mut e = Election::new("b", T);
        assert_eq!(e.observe(Some(held_by("a", "1")), t0, "x".into()), Write::None);
        assert_eq!(e.role(t0), Role::Follower { holder: Some("a".into()) });
        // "a" keeps renewing: never expired, however long it runs.
        for i in 1..20u64 {
            let w = e.observe(Some(held_by("a", &format!("r{i}"))), t0 + s(2 * i), "x".into());
            assert_eq!(w, Write::None, "round {i}");
        }
        // "a" stops renewing at t0+38: the same record is seen until the lease duration has passed locally.
        let last = t0 + s(38);
        assert_eq!(e.observe(Some(held_by("a", "r19")), last + s(14), "x".into()), Write::None);
        let w = e.observe(Some(held_by("a", "r19")), last + s(15), "x".into());
        let Write::Update(rec) = w else { panic!("expected a takeover, got {w:?}") };
        assert_eq!(rec.holder.as_deref(), Some("b"));
        assert_eq!(rec.transitions, 4, "a takeover counts a transition");
    }

    #[test]
    fn expiry_is_judged_by_the_local_clock_not_the_written_time() {
        // A record first seen now is live for a whole lease duration from now, whatever it says inside.
        let t0 = Instant::now();
        let mut e = Election::new("b", T);
        let stale = held_by("a", "1970-01-01T00:00:00Z");
        assert_eq!(e.observe(Some(stale.clone()), t0, "x".into()), Write::None);
        assert_eq!(e.observe(Some(stale), t0 + s(14), "x".into()), Write::None);
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut e = Election::new("b", T);
        let released = Record { holder: Some(String::new()), lease_duration: s(1), transitions: 5, renew_stamp: None };
        let Write::Update(rec) = e.observe(Some(released), t0, "x".into()) else { panic!("expected a takeover") };
        assert_eq!(rec.holder.as_deref(), Some("b"));
        assert_eq!(rec.transitions, 6);
    }

    #[test]
    fn a_leader_renews_and_steps_down_after_the_renew_deadline_without_a_successful_write() {
        let t0 = Instant::now();
        let mut e = Election::new("a", T);
        let Write::Create(rec) = e.observe(None, t0, "1".into()) else { panic!() };
        e.written(rec, t0);
        let Write::Update(renew) = e.observe(Some(held_by("a", "1")), t0 + s(2), "2".into()) else { panic!() };
        assert_eq!(renew.transitions, 3, "a renewal is not a transition");
        e.written(renew, t0 + s(2));
        // The API server goes away: every write fails from here.
        e.write_failed();
        assert_eq!(e.role(t0 + s(11)), Role::Leader, "within the renew deadline of the last renewal");
        assert_eq!(e.role(t0 + s(12)), Role::Follower { holder: None }, "deadline passed: stop acting");
        // ...which is before any other replica may take over (lease duration after its last sight of the renewal).
        assert!(T.renew_deadline < T.lease_duration);
    }

    #[test]
    fn a_leader_that_sees_another_holder_steps_down_at_once() {
        let t0 = Instant::now();
        let mut e = Election::new("a", T);
        let Write::Create(rec) = e.observe(None, t0, "1".into()) else { panic!() };
        e.written(rec, t0);
        assert_eq!(e.observe(Some(held_by("b", "9")), t0 + s(1), "2".into()), Write::None);
        assert_eq!(e.role(t0 + s(1)), Role::Follower { holder: Some("b".into()) });
    }

    #[test]
    fn release_only_when_leading_and_it_frees_the_lease() {
        let t0 = Instant::now();
        let mut e = Election::new("a", T);
        assert_eq!(e.release(t0), None);
        let Write::Create(rec) = e.observe(None, t0, "1".into()) else { panic!() };
        e.written(rec, t0);
        let r = e.release(t0 + s(1)).expect("a leader releases");
        assert_eq!(r.holder, None);
        assert_eq!(e.role(t0 + s(1)), Role::Follower { holder: None });
    }

    #[test]
    fn timing_is_validated() {
        assert!(Timing::default().validate().is_ok());
        let bad = Timing { renew_deadline: s(15), ..Timing::default() };
        assert!(bad.validate().unwrap_err().contains("shorter than the lease duration"));
        let bad = Timing { retry_period: s(10), ..Timing::default() };
        assert!(bad.validate().is_err());
    }
}

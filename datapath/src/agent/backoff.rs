//! Reconnect backoff as a pure state machine: exponential with a cap and deterministic jitter (seeded per node, so
//! the agents of a cluster restarted together do not reconnect in lock-step, yet a test can predict every delay).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff { initial, max: max.max(initial), current: initial, rng: seed | 1 }
    }

    /// A seed from a name (the node name), FNV-1a.
    pub fn seed_from(name: &str) -> u64 {
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// The delay before the next attempt: the current step ±20%, then the step doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng % 401) as f64 / 1000.0 + 0.8; // 0.8 ..= 1.2
        let d = self.current.mul_f64(frac).min(self.max);
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// A connection worked: start from the initial delay again.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), Backoff::seed_from("node-1"));
        let ds: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(ds[0] >= Duration::from_millis(80) && ds[0] <= Duration::from_millis(120), "{ds:?}");
        assert!(ds[3] >= Duration::from_millis(640) && ds[3] <= Duration::from_millis(960), "{ds:?}");
        assert!(ds.iter().all(|d| *d <= Duration::from_secs(5)));
        assert!(ds[9] >= Duration::from_secs(4), "capped near the max: {ds:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
        // Deterministic per seed, different across seeds.
        let mut a1 = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        let mut a2 = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        let mut a3 = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 8);
        let s1: Vec<_> = (0..5).map(|_| a1.next_delay()).collect();
        let s2: Vec<_> = (0..5).map(|_| a2.next_delay()).collect();
        let s3: Vec<_> = (0..5).map(|_| a3.next_delay()).collect();
        assert_eq!(s1, s2);
        assert_ne!(s1, s3);
    }
}

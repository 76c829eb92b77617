//! The pure health state of one probed endpoint.

/// Health of one endpoint as seen by its probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// No probe has completed yet.
    Unknown,
    /// Ready: receives traffic.
    Healthy,
    /// Not ready.
    Unhealthy,
}

impl Health {
    /// Whether the endpoint is ready (only [`Health::Healthy`] is).
    pub fn is_ready(self) -> bool {
        self == Health::Healthy
    }
}

/// Consecutive-result thresholds over probe results (rise/fall).
///
/// - From [`Health::Unknown`], the first result decides at once (success:
///   healthy, failure: unhealthy), so a fresh endpoint is usable after one
///   probe and a dead one is known dead after one probe.
/// - From [`Health::Healthy`], `unhealthy_threshold` consecutive failures
///   make it unhealthy; any success resets the count.
/// - From [`Health::Unhealthy`], `healthy_threshold` consecutive successes
///   make it healthy; any failure resets the count.
///
/// A threshold of 0 is treated as 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    health: Health,
    successes: u32,
    failures: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl ProbeState {
    /// A state in [`Health::Unknown`].
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
        }
    }

    /// A state starting at `health` with no results counted (used when a
    /// probe is restarted with a new spec, so its endpoint keeps its health).
    pub fn starting_at(health: Health, healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            health,
            ..Self::new(healthy_threshold, unhealthy_threshold)
        }
    }

    /// The current health.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one probe result; returns the new health when it changed.
    pub fn record(&mut self, success: bool) -> Option<Health> {
        if success {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let next = match self.health {
            Health::Unknown if success => Health::Healthy,
            Health::Unknown => Health::Unhealthy,
            Health::Healthy if self.failures >= self.unhealthy_threshold => Health::Unhealthy,
            Health::Unhealthy if self.successes >= self.healthy_threshold => Health::Healthy,
            h => h,
        };
        if next == self.health {
            None
        } else {
            self.health = next;
            Some(next)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(s: &mut ProbeState, results: &str) -> Vec<Option<Health>> {
        results.chars().map(|c| s.record(c == '+')).collect()
    }

    #[test]
    fn first_result_decides() {
        let mut s = ProbeState::new(3, 3);
        assert_eq!(s.health(), Health::Unknown);
        assert_eq!(s.record(true), Some(Health::Healthy));
        let mut s = ProbeState::new(3, 3);
        assert_eq!(s.record(false), Some(Health::Unhealthy));
        assert!(!s.health().is_ready());
    }

    #[test]
    fn fall_after_threshold_failures() {
        let mut s = ProbeState::new(2, 3);
        s.record(true);
        // Two failures, a success (reset), then three failures.
        let out = run(&mut s, "--+---");
        assert_eq!(out, [None, None, None, None, None, Some(Health::Unhealthy)]);
    }

    #[test]
    fn rise_after_threshold_successes() {
        let mut s = ProbeState::new(2, 3);
        s.record(false);
        let out = run(&mut s, "+-++");
        assert_eq!(out, [None, None, None, Some(Health::Healthy)]);
        assert!(s.health().is_ready());
    }

    #[test]
    fn thresholds_of_one_flip_every_time() {
        let mut s = ProbeState::new(1, 1);
        let out = run(&mut s, "+-+-");
        assert_eq!(
            out,
            [
                Some(Health::Healthy),
                Some(Health::Unhealthy),
                Some(Health::Healthy),
                Some(Health::Unhealthy)
            ]
        );
        // Zero thresholds behave as one.
        let mut z = ProbeState::new(0, 0);
        assert_eq!(
            run(&mut z, "+-"),
            [Some(Health::Healthy), Some(Health::Unhealthy)]
        );
    }

    proptest! {
        /// After the first result the health only changes on a run of
        /// `threshold` equal results, and never returns to Unknown.
        #[test]
        fn transitions_need_full_runs(rise in 1u32..5, fall in 1u32..5, results in proptest::collection::vec(any::<bool>(), 1..200)) {
            let mut s = ProbeState::new(rise, fall);
            let mut run_len = 0u32;
            let mut last = None;
            for (i, &r) in results.iter().enumerate() {
                run_len = if last == Some(r) { run_len + 1 } else { 1 };
                last = Some(r);
                let before = s.health();
                let changed = s.record(r);
                prop_assert_ne!(s.health(), Health::Unknown);
                if let Some(h) = changed {
                    prop_assert_eq!(h, s.health());
                    prop_assert_eq!(h == Health::Healthy, r);
                    if i > 0 {
                        prop_assert!(before != Health::Unknown);
                        let need = if r { rise } else { fall };
                        prop_assert!(run_len >= need);
                    }
                } else {
                    prop_assert_eq!(before, s.health());
                }
            }
        }
    }
}

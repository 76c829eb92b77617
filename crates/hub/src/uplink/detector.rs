//! Adaptive liveness detector over heartbeat inter-arrival times
//! (phi accrual, Hayashibara et al., with the logistic approximation of the
//! normal tail that Akka and Cassandra use).
//!
//! Pure: it never reads a clock. The hub session feeds it
//! [`Detector::heartbeat`] and asks [`Detector::state`] or
//! [`Detector::poll_transition`] at any `now`.
//!
//! Phi grows monotonically with the silence since the last heartbeat, so a
//! phi threshold is a silence threshold `mean + y * std_dev` for the
//! threshold's `y`; the detector computes those deadlines directly (and
//! bounds them by a floor and a ceiling), which also gives
//! [`Detector::next_change`] for the session's timer.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use switchyard_proto::pb;

/// A POP's liveness as one hub node's detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Liveness {
    /// Heartbeats arrive as expected.
    Online,
    /// Heartbeats are late: worth a log line, not yet a failover.
    Suspect,
    /// Silent for long enough that the POP is taken out of every tier.
    Offline,
}

impl Liveness {
    /// The replicated-state value of this liveness.
    pub fn to_pb(self) -> pb::PopLiveness {
        match self {
            Liveness::Online => pb::PopLiveness::Online,
            Liveness::Suspect => pb::PopLiveness::Suspect,
            Liveness::Offline => pb::PopLiveness::Offline,
        }
    }
}

/// Tuning of the detector. The defaults assume 250 ms heartbeats: on a
/// clean link a silent POP is `Suspect` about 560 ms and `Offline` about
/// 770 ms after its last heartbeat, and ±100 ms of jitter never trips it.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorConfig {
    /// The heartbeat interval the agent was told to use. Seeds the history
    /// so that the first seconds of a session are judged sensibly.
    pub expected_interval: Duration,
    /// Floor of the standard deviation of inter-arrival times. Without it a
    /// perfectly regular link would make the detector fire on the first
    /// few milliseconds of lateness.
    pub min_std_dev: Duration,
    /// Phi at and above which the POP is `Suspect` (3: the heartbeat is
    /// late with about a 1-in-1000 chance of being a false alarm).
    pub suspect_phi: f64,
    /// Phi at and above which the POP is `Offline` (8: about 1 in 10^8).
    pub offline_phi: f64,
    /// Silence that never makes a POP suspect, whatever its history.
    pub min_suspect_after: Duration,
    /// Silence that always makes a POP suspect, however noisy its history.
    pub max_suspect_after: Duration,
    /// Silence that never makes a POP offline, whatever its history.
    pub min_offline_after: Duration,
    /// Silence that always makes a POP offline, however noisy its history:
    /// bounds failover time on bad links.
    pub max_offline_after: Duration,
    /// Inter-arrival samples kept (the most recent ones).
    pub window: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            expected_interval: Duration::from_millis(250),
            min_std_dev: Duration::from_millis(100),
            suspect_phi: 3.0,
            offline_phi: 8.0,
            min_suspect_after: Duration::from_millis(400),
            max_suspect_after: Duration::from_millis(2000),
            min_offline_after: Duration::from_millis(600),
            max_offline_after: Duration::from_millis(2500),
            window: 100,
        }
    }
}

/// Phi of a silence `y` standard deviations past the mean (logistic
/// approximation of the normal distribution's tail).
fn phi_of_y(y: f64) -> f64 {
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    if y > 0.0 {
        -(e / (1.0 + e)).log10()
    } else {
        -(1.0 - 1.0 / (1.0 + e)).log10()
    }
}

/// The `y` at which phi reaches `phi` (phi is increasing in `y`).
fn y_for_phi(phi: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0_f64, 60.0_f64);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if phi_of_y(mid) < phi {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// Phi-accrual detector of one POP on one connection.
#[derive(Debug, Clone)]
pub struct Detector {
    config: DetectorConfig,
    suspect_y: f64,
    offline_y: f64,
    /// Recent inter-arrival times (ms).
    intervals: VecDeque<f64>,
    last: Instant,
    reported: Liveness,
}

impl Detector {
    /// A detector that counts `now` as the first sign of life (the session's
    /// Hello) and starts `Online`.
    pub fn new(config: DetectorConfig, now: Instant) -> Self {
        let mean = config.expected_interval.as_secs_f64() * 1000.0;
        // Two seed samples: mean = the expected interval, spread = a quarter
        // of it (as Akka does); real samples push them out.
        let mut intervals = VecDeque::with_capacity(config.window.max(2) + 1);
        intervals.push_back(mean * 0.75);
        intervals.push_back(mean * 1.25);
        Self {
            suspect_y: y_for_phi(config.suspect_phi),
            offline_y: y_for_phi(config.offline_phi),
            config,
            intervals,
            last: now,
            reported: Liveness::Online,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Records a heartbeat arriving at `now`.
    pub fn heartbeat(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last);
        // A gap long enough to be an outage is not jitter: learning from it
        // would make the detector slow for minutes after every outage.
        if gap < self.offline_delay() {
            if self.intervals.len() >= self.config.window.max(2) {
                self.intervals.pop_front();
            }
            self.intervals.push_back(gap.as_secs_f64() * 1000.0);
        }
        if now > self.last {
            self.last = now;
        }
    }

    /// Mean and standard deviation (floored) of the inter-arrival times (ms).
    fn stats(&self) -> (f64, f64) {
        let n = self.intervals.len().max(1) as f64;
        let mean = self.intervals.iter().sum::<f64>() / n;
        let var = self
            .intervals
            .iter()
            .map(|x| (x - mean) * (x - mean))
            .sum::<f64>()
            / n;
        let floor = self.config.min_std_dev.as_secs_f64() * 1000.0;
        (mean, var.sqrt().max(floor))
    }

    fn delay(&self, y: f64, min: Duration, max: Duration) -> Duration {
        let (mean, std) = self.stats();
        let ms = (mean + y * std).max(0.0);
        // Clamp in milliseconds before converting: `ms` is finite here.
        let ms = ms.clamp(min.as_secs_f64() * 1000.0, max.as_secs_f64() * 1000.0);
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// Silence after which the POP is suspect, given the history now.
    pub fn suspect_delay(&self) -> Duration {
        self.delay(
            self.suspect_y,
            self.config.min_suspect_after,
            self.config.max_suspect_after,
        )
    }

    /// Silence after which the POP is offline (never before suspect).
    pub fn offline_delay(&self) -> Duration {
        self.delay(
            self.offline_y,
            self.config.min_offline_after,
            self.config.max_offline_after,
        )
        .max(self.suspect_delay())
    }

    /// Phi at `now`: how unlikely the current silence is (for metrics).
    pub fn phi(&self, now: Instant) -> f64 {
        let (mean, std) = self.stats();
        let t = now.saturating_duration_since(self.last).as_secs_f64() * 1000.0;
        phi_of_y((t - mean) / std)
    }

    /// When the last heartbeat arrived.
    pub fn last_heartbeat(&self) -> Instant {
        self.last
    }

    /// The liveness at `now`. Pure.
    pub fn state(&self, now: Instant) -> Liveness {
        let silence = now.saturating_duration_since(self.last);
        if silence >= self.offline_delay() {
            Liveness::Offline
        } else if silence >= self.suspect_delay() {
            Liveness::Suspect
        } else {
            Liveness::Online
        }
    }

    /// The last liveness returned by [`Detector::poll_transition`].
    pub fn reported(&self) -> Liveness {
        self.reported
    }

    /// The next transition to report at `now`, one step at a time
    /// (Online -> Suspect -> Offline; any -> Online on recovery), or `None`
    /// when the state has not changed since the last report.
    pub fn poll_transition(&mut self, now: Instant) -> Option<Liveness> {
        let current = self.state(now);
        let next = match (self.reported, current) {
            (a, b) if a == b => return None,
            (_, Liveness::Online) => Liveness::Online,
            (Liveness::Online, _) => Liveness::Suspect,
            (_, b) => b,
        };
        self.reported = next;
        Some(next)
    }

    /// When the reported state will next change if no heartbeat arrives:
    /// the time to call [`Detector::poll_transition`] again (it may be in
    /// the past if polling is late). `None` once offline.
    pub fn next_change(&self) -> Option<Instant> {
        match self.reported {
            Liveness::Online => Some(self.last + self.suspect_delay()),
            Liveness::Suspect => Some(self.last + self.offline_delay()),
            Liveness::Offline => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds heartbeats at the given offsets (ms from t0), polling every
    /// 10 ms in between; returns every transition with its time (ms).
    fn run(offsets: &[u64], until: u64) -> Vec<(u64, Liveness)> {
        let t0 = Instant::now();
        let mut d = Detector::new(DetectorConfig::default(), t0);
        let mut out = Vec::new();
        let mut next = offsets.iter().peekable();
        for t in (0..=until).step_by(5) {
            while let Some(&&hb) = next.peek() {
                if hb > t {
                    break;
                }
                d.heartbeat(t0 + ms(hb));
                next.next();
            }
            while let Some(tr) = d.poll_transition(t0 + ms(t)) {
                out.push((t, tr));
            }
        }
        out
    }

    #[test]
    fn phi_thresholds_match_the_documented_defaults() {
        let d = Detector::new(DetectorConfig::default(), Instant::now());
        let (s, o) = (d.suspect_delay(), d.offline_delay());
        assert!(s >= ms(500) && s <= ms(600), "suspect after {s:?}");
        assert!(o >= ms(700) && o <= ms(900), "offline after {o:?}");
        // Phi at the deadline is the configured threshold.
        let t0 = d.last_heartbeat();
        assert!((d.phi(t0 + s) - 3.0).abs() < 0.01, "{}", d.phi(t0 + s));
        assert!((d.phi(t0 + o) - 8.0).abs() < 0.01, "{}", d.phi(t0 + o));
    }

    #[test]
    fn steady_heartbeats_never_suspect() {
        let beats: Vec<u64> = (1..=240).map(|i| i * 250).collect();
        assert!(run(&beats, 60_000).is_empty());
    }

    #[test]
    fn silence_goes_suspect_then_offline_within_budget() {
        // 10 s of steady heartbeats, then the POP dies.
        let beats: Vec<u64> = (1..=40).map(|i| i * 250).collect();
        let last = 10_000;
        let tr = run(&beats, 13_000);
        assert_eq!(tr.len(), 2, "{tr:?}");
        let (ts, s) = tr[0];
        let (to, o) = tr[1];
        assert_eq!((s, o), (Liveness::Suspect, Liveness::Offline));
        assert!(
            ts - last >= 450 && ts - last <= 650,
            "suspect at +{}",
            ts - last
        );
        assert!(to - last <= 1000, "offline at +{}", to - last);
    }

    #[test]
    fn jitter_does_not_flap() {
        // ±100 ms on each send time, deterministic pseudo-random.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let beats: Vec<u64> = (1..=400u64)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                i * 250 + 100 - (x % 201)
            })
            .collect();
        let mut sorted = beats.clone();
        sorted.sort_unstable();
        assert!(run(&sorted, 100_000).is_empty());
        // Also from the first second (history still seeded).
        assert!(run(&sorted[..8], 2_000 - 1).is_empty());
    }

    #[test]
    fn extreme_jitter_still_suspects_within_the_ceiling() {
        // Alternating 50 ms and 450 ms gaps; then silence.
        let mut t = 0;
        let mut beats = Vec::new();
        for i in 0..200 {
            t += if i % 2 == 0 { 50 } else { 450 };
            beats.push(t);
        }
        let tr = run(&beats, t + 4_000);
        assert_eq!(tr.len(), 2, "{tr:?}");
        assert!(tr[0].0 - t <= 2_000);
        assert!(tr[1].0 - t <= 2_500);
    }

    #[test]
    fn recovers_to_online_and_an_outage_does_not_poison_the_history() {
        let t0 = Instant::now();
        let mut d = Detector::new(DetectorConfig::default(), t0);
        for i in 1..=20 {
            d.heartbeat(t0 + ms(i * 250));
        }
        let before = d.offline_delay();
        let dead = t0 + ms(5_000 + 5_000);
        assert_eq!(d.poll_transition(dead), Some(Liveness::Suspect));
        assert_eq!(d.poll_transition(dead), Some(Liveness::Offline));
        assert_eq!(d.poll_transition(dead), None);
        assert_eq!(d.next_change(), None);
        d.heartbeat(dead);
        assert_eq!(d.poll_transition(dead), Some(Liveness::Online));
        assert_eq!(d.offline_delay(), before);
        assert_eq!(d.next_change(), Some(dead + d.suspect_delay()));
    }

    #[test]
    fn reordered_heartbeat_times_do_not_move_the_clock_back() {
        let t0 = Instant::now();
        let mut d = Detector::new(DetectorConfig::default(), t0 + ms(1000));
        d.heartbeat(t0);
        assert_eq!(d.last_heartbeat(), t0 + ms(1000));
    }
}

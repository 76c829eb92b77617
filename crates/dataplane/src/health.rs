//! Peer health from tunnel probes (pure state machine; time passed in).
//!
//! A probe is one QUIC datagram `[PING, seq u64 BE]`, answered by the peer
//! with `[PONG, seq]`. Each probe has a timeout of `max(3 x srtt, floor)`;
//! `fall` consecutive timeouts mark the peer down, `rise` consecutive
//! answers bring it back up. A failed tunnel stream or a dead connection
//! marks it down at once ([`ProbeState::mark_down`]). The probe interval
//! adapts: at least twice the smoothed RTT, halved while probes are
//! missing (a suspect peer is confirmed dead sooner).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Datagram kind: a probe.
pub const PING: u8 = 1;
/// Datagram kind: the answer to a probe.
pub const PONG: u8 = 2;
/// Length of a probe datagram (bytes).
pub const PROBE_LEN: usize = 9;
/// Probes remembered for the loss figure.
const LOSS_WINDOW: usize = 50;
/// Most probes in flight tracked at once.
const MAX_OUTSTANDING: usize = 64;

/// Encodes a probe datagram.
pub fn encode(kind: u8, seq: u64) -> [u8; PROBE_LEN] {
    let mut b = [0u8; PROBE_LEN];
    b[0] = kind;
    b[1..].copy_from_slice(&seq.to_be_bytes());
    b
}

/// Decodes a probe datagram; anything else is `None` (and dropped).
pub fn decode(b: &[u8]) -> Option<(u8, u64)> {
    if b.len() != PROBE_LEN || !(b[0] == PING || b[0] == PONG) {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[1..]);
    Some((b[0], u64::from_be_bytes(seq)))
}

/// Thresholds of the prober.
#[derive(Debug, Clone, Copy)]
pub struct ProbeParams {
    /// Base interval.
    pub interval: Duration,
    /// Misses before down.
    pub fall: u32,
    /// Answers before up again.
    pub rise: u32,
    /// Lower bound of the per-probe timeout.
    pub timeout_floor: Duration,
}

/// Health of one peer.
#[derive(Debug, Clone)]
pub struct ProbeState {
    params: ProbeParams,
    up: bool,
    srtt: Option<Duration>,
    rttvar: Duration,
    next_seq: u64,
    outstanding: VecDeque<(u64, Instant)>,
    misses: u32,
    answers: u32,
    window: VecDeque<bool>,
    /// Connected, first answer pending.
    fresh: bool,
}

impl ProbeState {
    /// A peer not connected yet (down).
    pub fn new(params: ProbeParams) -> Self {
        Self {
            params,
            up: false,
            srtt: None,
            rttvar: Duration::ZERO,
            next_seq: 0,
            outstanding: VecDeque::new(),
            misses: 0,
            answers: 0,
            window: VecDeque::new(),
            fresh: false,
        }
    }

    /// Whether new connections may use the peer.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Smoothed RTT, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Probe loss over the recent window (per mille).
    pub fn loss_permille(&self) -> u32 {
        if self.window.is_empty() {
            return 0;
        }
        let lost = self.window.iter().filter(|ok| !**ok).count();
        (lost * 1000 / self.window.len()) as u32
    }

    /// A tunnel handshake completed. The peer is up at its first answer:
    /// with TLS 1.3 the dialler finishes its handshake before the peer has
    /// checked the dialler's certificate, so only an answer proves the
    /// peer accepted us.
    pub fn on_connected(&mut self) {
        self.up = false;
        self.fresh = true;
        self.misses = 0;
        self.answers = 0;
        self.outstanding.clear();
    }

    /// The tunnel failed (stream error, connection lost): down at once.
    pub fn mark_down(&mut self) {
        self.up = false;
        self.fresh = false;
        self.answers = 0;
    }

    /// Timeout of one probe.
    pub fn probe_timeout(&self) -> Duration {
        self.srtt
            .map_or(self.params.timeout_floor, |s| 3 * s)
            .max(self.params.timeout_floor)
    }

    /// Time between probes now.
    pub fn interval(&self) -> Duration {
        let base = self
            .srtt
            .map_or(self.params.interval, |s| (2 * s).max(self.params.interval));
        if self.misses > 0 {
            base / 2
        } else {
            base
        }
    }

    /// Registers a probe sent at `now`; returns its sequence number.
    pub fn send_probe(&mut self, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.outstanding.len() >= MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back((seq, now));
        seq
    }

    /// An answer to probe `seq` arrived at `now`. Unknown or late answers
    /// are ignored.
    pub fn on_pong(&mut self, seq: u64, now: Instant) {
        let Some(i) = self.outstanding.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        let (_, sent) = self.outstanding[i];
        // Older probes still outstanding were overtaken: they stay and time
        // out on their own.
        self.outstanding.remove(i);
        let sample = now.saturating_duration_since(sent);
        match self.srtt {
            None => {
                self.srtt = Some(sample);
                self.rttvar = sample / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(sample);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + sample) / 8);
            }
        }
        self.record(true);
        self.misses = 0;
        self.answers = self.answers.saturating_add(1);
        if !self.up && (self.fresh || self.answers >= self.params.rise) {
            self.fresh = false;
            self.up = true;
        }
    }

    /// Expires probes older than the timeout at `now`; returns whether the
    /// peer went down.
    pub fn expire(&mut self, now: Instant) -> bool {
        let timeout = self.probe_timeout();
        let mut went_down = false;
        while let Some(&(_, sent)) = self.outstanding.front() {
            if now.saturating_duration_since(sent) < timeout {
                break;
            }
            self.outstanding.pop_front();
            self.record(false);
            self.answers = 0;
            self.misses = self.misses.saturating_add(1);
            if self.up && self.misses >= self.params.fall {
                self.up = false;
                went_down = true;
            }
        }
        went_down
    }

    /// When the oldest outstanding probe times out, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.outstanding
            .front()
            .map(|(_, sent)| *sent + self.probe_timeout())
    }

    /// Consecutive missed probes.
    pub fn misses(&self) -> u32 {
        self.misses
    }

    fn record(&mut self, ok: bool) {
        if self.window.len() >= LOSS_WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ProbeParams {
        ProbeParams {
            interval: Duration::from_millis(100),
            fall: 3,
            rise: 2,
            timeout_floor: Duration::from_millis(50),
        }
    }

    #[test]
    fn codec_round_trip_and_garbage() {
        assert_eq!(decode(&encode(PING, 42)), Some((PING, 42)));
        assert_eq!(decode(&[PING]), None);
        assert_eq!(decode(&[9; PROBE_LEN]), None);
    }

    #[test]
    fn falls_after_misses_and_rises_after_answers() {
        let t0 = Instant::now();
        let mut s = ProbeState::new(params());
        assert!(!s.is_up());
        s.on_connected();
        assert!(!s.is_up(), "up only at the first answer");
        let seq = s.send_probe(t0);
        s.on_pong(seq, t0 + Duration::from_millis(1));
        assert!(s.is_up());
        assert_eq!(s.srtt(), Some(Duration::from_millis(1)));
        assert_eq!(s.probe_timeout(), Duration::from_millis(50), "floor");
        let mut t = t0;
        for i in 0..3 {
            t += Duration::from_millis(100);
            s.send_probe(t);
            let down = s.expire(t + Duration::from_millis(60));
            assert_eq!(down, i == 2, "miss {i}");
            if i == 0 {
                assert_eq!(
                    s.interval(),
                    Duration::from_millis(50),
                    "faster while missing"
                );
            }
        }
        assert!(!s.is_up());
        assert!(s.loss_permille() > 0);
        let a = s.send_probe(t);
        s.on_pong(a, t + Duration::from_millis(1));
        assert!(!s.is_up(), "one answer is not enough");
        let b = s.send_probe(t);
        s.on_pong(b, t + Duration::from_millis(1));
        assert!(s.is_up());
        s.mark_down();
        assert!(!s.is_up());
    }

    #[test]
    fn adapts_to_rtt() {
        let t0 = Instant::now();
        let mut s = ProbeState::new(params());
        s.on_connected();
        for i in 0..20 {
            let t = t0 + Duration::from_secs(i);
            let seq = s.send_probe(t);
            s.on_pong(seq, t + Duration::from_millis(200));
        }
        assert!(s.probe_timeout() >= Duration::from_millis(500));
        assert!(s.interval() >= Duration::from_millis(300));
        // A late answer inside the adaptive timeout is not a miss.
        let t = t0 + Duration::from_secs(100);
        s.send_probe(t);
        assert!(!s.expire(t + Duration::from_millis(300)));
        assert_eq!(s.misses(), 0);
    }
}

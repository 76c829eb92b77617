//! Optional per-source rate limit (pure: the time is passed in).
//!
//! A token bucket per client address (IPv4 /32, IPv6 /64, so one host
//! cannot dodge it by rotating addresses in its prefix). The table is
//! bounded: when full, buckets idle for a second are dropped, and if that
//! frees nothing the table starts over (a flood of distinct sources then
//! briefly gets fresh buckets, which bounds memory, not fairness).

use std::collections::HashMap;
use std::net::IpAddr;

use tokio::time::Instant;

/// Rate limit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained answers per second per source.
    pub per_second: u32,
    /// Burst size (answers) per source.
    pub burst: u32,
    /// Most sources tracked at once (per UDP socket).
    pub max_sources: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_second: 100,
            burst: 200,
            max_sources: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by source.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimitConfig,
    buckets: HashMap<u128, Bucket>,
}

fn source_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64 << 64) | 1,
    }
}

impl RateLimiter {
    /// A limiter with `cfg`.
    pub fn new(cfg: RateLimitConfig) -> Self {
        Self {
            cfg,
            buckets: HashMap::new(),
        }
    }

    /// Whether a query from `ip` at `now` may be answered.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.cfg.max_sources {
            self.buckets
                .retain(|_, b| now.saturating_duration_since(b.at).as_secs_f64() < 1.0);
            if self.buckets.len() >= self.cfg.max_sources {
                self.buckets.clear();
            }
        }
        let burst = f64::from(self.cfg.burst.max(1));
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * f64::from(self.cfg.per_second)).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills_per_source() {
        let cfg = RateLimitConfig {
            per_second: 10,
            burst: 3,
            max_sources: 2,
        };
        let mut l = RateLimiter::new(cfg);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t0)));
        assert!(!l.allow(a, t0));
        assert!(l.allow(b, t0));
        assert!(l.allow(a, t0 + Duration::from_millis(100)));
        assert!(!l.allow(a, t0 + Duration::from_millis(100)));
        // A third source with a full table: stale buckets go, memory stays
        // bounded.
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        assert!(l.allow(c, t0 + Duration::from_secs(5)));
        assert!(l.buckets.len() <= 2);
    }
}

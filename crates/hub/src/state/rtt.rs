//! RTT quantization: integer-only (no floats, no logarithms), so every node
//! computes the same bucket.

/// Unit of quantization (us): RTTs below it land in the first bucket.
const UNIT_US: u64 = 100;

/// The bucket of an RTT in microseconds: quarter octaves of 100 us units
/// (four buckets per doubling, each 12.5 to 25 % wide), monotone in the RTT.
pub fn rtt_bucket(rtt_us: u64) -> u32 {
    let x = (rtt_us / UNIT_US).max(1);
    let e = 63 - x.leading_zeros();
    // The two bits below the leading one, left-aligned when there are fewer.
    let m = if e >= 2 {
        (x >> (e - 2)) & 3
    } else {
        (x << (2 - e)) & 3
    };
    // Bounded: e <= 63, m <= 3.
    4 * e + u32::try_from(m).unwrap_or(0)
}

/// The lowest RTT (us) that falls in `bucket`.
pub fn rtt_bucket_floor_us(bucket: u32) -> u64 {
    let e = bucket / 4;
    let m = u64::from(bucket % 4);
    let units = if e >= 2 {
        (4 + m).checked_shl(e - 2).unwrap_or(u64::MAX)
    } else {
        ((4 + m) << e) >> 2
    };
    units.saturating_mul(UNIT_US)
}

/// How far a new measurement's bucket must be from the stored one to
/// replace it. Two: jitter across a single bucket boundary never commits,
/// at the cost of the stored value lagging by at most one bucket.
pub(crate) const RTT_HYSTERESIS_BUCKETS: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(rtt_bucket(0), 0);
        assert_eq!(rtt_bucket(150), 0);
        assert_eq!(rtt_bucket(200), 4);
        assert_eq!(rtt_bucket(300), 6);
        assert_eq!(rtt_bucket_floor_us(rtt_bucket(10_000)), 9_600);
        assert_eq!(rtt_bucket_floor_us(rtt_bucket(1_000)), 1_000);
    }

    proptest! {
        #[test]
        fn monotone_and_floor_below(a in 0u64..10_000_000_000, b in 0u64..10_000_000_000) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(rtt_bucket(lo) <= rtt_bucket(hi));
            let f = rtt_bucket_floor_us(rtt_bucket(a));
            prop_assert!(f <= a.max(UNIT_US));
            prop_assert_eq!(rtt_bucket(f), rtt_bucket(a));
        }
    }
}

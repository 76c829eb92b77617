//! VIP ranges (CIDRs) and deterministic allocation from them.
//!
//! Addresses are handled as `u128` so IPv4 and IPv6 share one code path;
//! `width` says which family a range belongs to.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// First address of the dev VIP pool: POPs created without a range get
/// consecutive blocks from here (loopback, so several POPs' gateways on one
/// machine never bind the same address).
pub const DEV_VIP_BASE: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 0);

/// Prefix length of one POP's default block (/22: 1022 usable VIPs).
pub const DEV_VIP_PREFIX: u8 = 22;

/// A parsed CIDR range, normalised (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address as an integer (IPv4 in the low 32 bits).
    base: u128,
    /// Address width in bits: 32 (IPv4) or 128 (IPv6).
    width: u8,
    /// Prefix length in bits (0..=width).
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN`; `None` if malformed. Host bits are cleared.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, len) = s.split_once('/')?;
        let prefix: u8 = len.parse().ok()?;
        let (value, width) = match addr.parse::<IpAddr>().ok()? {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32u8),
            IpAddr::V6(a) => (u128::from(a), 128u8),
        };
        if prefix > width {
            return None;
        }
        let host_bits = u32::from(width - prefix);
        let base = value & !low_mask(host_bits);
        Some(Cidr {
            base,
            width,
            prefix,
        })
    }

    /// The canonical text form, `ADDR/LEN`.
    pub fn to_text(&self) -> String {
        format!("{}/{}", self.addr_text(self.base), self.prefix)
    }

    /// Formats an address of this range's family.
    pub fn addr_text(&self, a: u128) -> String {
        if self.width == 32 {
            // Masked to 32 bits first, so the conversion cannot fail.
            Ipv4Addr::from(u32::try_from(a & 0xffff_ffff).unwrap_or(0)).to_string()
        } else {
            Ipv6Addr::from(a).to_string()
        }
    }

    /// Parses an address of this range's family.
    pub fn addr_value(&self, s: &str) -> Option<u128> {
        match (s.parse::<IpAddr>().ok()?, self.width) {
            (IpAddr::V4(a), 32) => Some(u128::from(u32::from(a))),
            (IpAddr::V6(a), 128) => Some(u128::from(a)),
            _ => None,
        }
    }

    /// First and last allocatable address. The network address is skipped
    /// (and the IPv4 broadcast address) when the range is big enough to
    /// have them, as routers and kernels treat them specially.
    fn usable(&self) -> (u128, u128) {
        let host_bits = u32::from(self.width - self.prefix);
        let last = self.base | low_mask(host_bits);
        if host_bits <= 1 {
            return (self.base, last);
        }
        let last = if self.width == 32 { last - 1 } else { last };
        (self.base + 1, last)
    }

    /// Whether the text address `s` lies in the usable part of the range.
    pub fn contains(&self, s: &str) -> bool {
        let (lo, hi) = self.usable();
        self.addr_value(s).is_some_and(|a| a >= lo && a <= hi)
    }

    /// The lowest usable address not in `used`; `None` when the range is
    /// full.
    pub fn first_free(&self, used: &BTreeSet<u128>) -> Option<u128> {
        let (lo, hi) = self.usable();
        let mut a = lo;
        // `used` is sorted: walk it alongside the candidate.
        for &u in used.range(lo..) {
            if u != a {
                break;
            }
            if a == hi {
                return None;
            }
            a += 1;
        }
        (a <= hi).then_some(a)
    }

    /// `k` if this range is exactly the `k`-th default dev block.
    pub fn dev_block_number(&self) -> Option<u32> {
        let size = 1u128 << (32 - u32::from(DEV_VIP_PREFIX));
        let base = u128::from(u32::from(DEV_VIP_BASE));
        if self.width != 32 || self.prefix != DEV_VIP_PREFIX || self.base < base {
            return None;
        }
        let off = self.base - base;
        if !off.is_multiple_of(size) {
            return None;
        }
        u32::try_from(off / size).ok()
    }

    /// The `k`-th default dev block (`DEV_VIP_BASE + k * 2^(32-DEV_VIP_PREFIX)`),
    /// or `None` once it would leave 127.0.0.0/8.
    pub fn dev_block(k: u32) -> Option<Cidr> {
        let size = 1u64 << (32 - u32::from(DEV_VIP_PREFIX));
        let base = u64::from(u32::from(DEV_VIP_BASE)) + u64::from(k) * size;
        (base + size <= 0x8000_0000).then_some(Cidr {
            base: u128::from(base),
            width: 32,
            prefix: DEV_VIP_PREFIX,
        })
    }
}

/// A mask of the low `bits` bits.
fn low_mask(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_allocate() {
        let c = Cidr::parse("10.1.2.3/30").unwrap();
        assert_eq!(c.to_text(), "10.1.2.0/30");
        let mut used = BTreeSet::new();
        let a = c.first_free(&used).unwrap();
        assert_eq!(c.addr_text(a), "10.1.2.1");
        used.insert(a);
        let b = c.first_free(&used).unwrap();
        assert_eq!(c.addr_text(b), "10.1.2.2");
        used.insert(b);
        assert_eq!(c.first_free(&used), None, "network and broadcast skipped");
        assert!(c.contains("10.1.2.2"));
        assert!(!c.contains("10.1.2.3"));
        assert!(!c.contains("fd00::1"));

        let v6 = Cidr::parse("fd00:77::/120").unwrap();
        assert_eq!(
            v6.addr_text(v6.first_free(&BTreeSet::new()).unwrap()),
            "fd00:77::1"
        );
        let one = Cidr::parse("192.0.2.9/32").unwrap();
        assert_eq!(
            one.addr_text(one.first_free(&BTreeSet::new()).unwrap()),
            "192.0.2.9"
        );

        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "10.0.0.0/x", "::/129"] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn gaps_are_reused() {
        let c = Cidr::parse("10.0.0.0/24").unwrap();
        let used: BTreeSet<u128> = ["10.0.0.1", "10.0.0.3"]
            .iter()
            .filter_map(|s| c.addr_value(s))
            .collect();
        assert_eq!(c.addr_text(c.first_free(&used).unwrap()), "10.0.0.2");
    }

    #[test]
    fn dev_blocks() {
        assert_eq!(Cidr::dev_block(0).unwrap().to_text(), "127.77.0.0/22");
        assert_eq!(Cidr::dev_block(1).unwrap().to_text(), "127.77.4.0/22");
        let last = (0x8000_0000u64 - u64::from(u32::from(DEV_VIP_BASE))) / 1024 - 1;
        let last = u32::try_from(last).unwrap();
        assert_eq!(Cidr::dev_block(last).unwrap().to_text(), "127.255.252.0/22");
        assert!(Cidr::dev_block(last + 1).is_none());
    }
}

//! Parsing and validation of one query packet (pure, no allocation).
//!
//! This is the hot path: it reads the header, the one question (lowercasing
//! the name into a fixed buffer that is the lookup key) and the additional
//! section (for the EDNS OPT record), and nothing else. The rules it
//! enforces are those of an authoritative server that answers plain
//! queries:
//! - fewer than 12 bytes, or a response (QR=1): dropped (no ID to answer);
//! - QDCOUNT other than 1, answer or authority records present, a name with
//!   a compression pointer in the question (the only place a pointer there
//!   could point is the header), a label over 63 bytes, a name over 255
//!   bytes, a record running past the end, bytes after the last record, a
//!   second OPT record, or an OPT record not owned by the root: FORMERR.
//!
//! Compression pointers elsewhere (owner names in the additional section)
//! are skipped, never followed, so no pointer loop can be entered.

/// Largest name in wire format (RFC 1035 2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Largest label (RFC 1035 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Largest DNS message read (UDP payload or TCP frame): queries are far
/// smaller; anything larger is refused before it is buffered.
pub const MAX_QUERY_LEN: usize = 4096;
/// Length of the DNS header.
pub const HEADER_LEN: usize = 12;

/// Record type numbers used by the server.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Name server.
    pub const NS: u16 = 2;
    /// Start of authority.
    pub const SOA: u16 = 6;
    /// Host information (the RFC 8482 answer to ANY).
    pub const HINFO: u16 = 13;
    /// Text.
    pub const TXT: u16 = 16;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// Service locator.
    pub const SRV: u16 = 33;
    /// EDNS pseudo-record.
    pub const OPT: u16 = 41;
    /// Incremental zone transfer.
    pub const IXFR: u16 = 251;
    /// Zone transfer.
    pub const AXFR: u16 = 252;
    /// Obsolete mailbox meta-queries.
    pub const MAILB: u16 = 253;
    /// Obsolete mail agent meta-query.
    pub const MAILA: u16 = 254;
    /// Any type.
    pub const ANY: u16 = 255;
}

/// The IN class.
pub const CLASS_IN: u16 = 1;
/// EDNS option code of Client Subnet (RFC 7871).
pub const EDNS_CLIENT_SUBNET: u16 = 8;

/// Why a packet gets no answer or a FORMERR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Too short for a header or a response: dropped.
    Drop,
    /// Answered with FORMERR (the header is readable).
    FormErr,
}

/// EDNS Client Subnet as sent (RFC 7871): family 1 (IPv4) or 2 (IPv6),
/// the source prefix length and up to 16 address bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSubnet {
    /// Address family (1 IPv4, 2 IPv6).
    pub family: u16,
    /// Source prefix length (bits).
    pub source_prefix: u8,
    /// Address bytes, zero-padded to 16.
    pub addr: [u8; 16],
}

impl ClientSubnet {
    /// The subnet's address, if the family is known.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self.family {
            1 => Some(std::net::IpAddr::from([
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            ])),
            2 => Some(std::net::IpAddr::from(self.addr)),
            _ => None,
        }
    }
}

/// The EDNS OPT record of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Requestor's UDP payload size (bytes).
    pub udp_size: u16,
    /// EDNS version.
    pub version: u8,
    /// DNSSEC OK bit.
    pub dnssec_ok: bool,
    /// Client Subnet option, if sent and well formed.
    pub client_subnet: Option<ClientSubnet>,
}

/// A parsed query. The question's bytes stay in the packet
/// (`packet[HEADER_LEN..question_end]`), so an answer can echo them with
/// the client's case intact.
#[derive(Debug, Clone)]
pub struct Query {
    /// Message ID.
    pub id: u16,
    /// The second header word (flags) as sent.
    pub flags: u16,
    /// Query name in wire format, lowercased (the lookup key).
    pub name: [u8; MAX_NAME_LEN],
    /// Length of `name`, the root label included.
    pub name_len: usize,
    /// Offsets of each label's length byte within `name`.
    pub label_starts: [u8; 128],
    /// Number of labels (root excluded).
    pub labels: usize,
    /// Query type.
    pub qtype: u16,
    /// Query class.
    pub qclass: u16,
    /// End offset of the question in the packet.
    pub question_end: usize,
    /// EDNS, if an OPT record was sent.
    pub edns: Option<Edns>,
}

impl Query {
    /// The lowercased name in wire format.
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    /// The opcode (0: QUERY).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0x0f) as u8
    }

    /// The suffix of the name from label `i` on (wire format).
    pub fn suffix(&self, i: usize) -> &[u8] {
        let start = if i >= self.labels {
            self.name_len - 1
        } else {
            self.label_starts[i] as usize
        };
        &self.name[start..self.name_len]
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses a query packet. `Err(Drop)` means no answer at all;
/// `Err(FormErr)` means answer FORMERR with the packet's ID.
pub fn parse(packet: &[u8]) -> Result<Query, Malformed> {
    if packet.len() < HEADER_LEN || packet.len() > MAX_QUERY_LEN {
        return Err(Malformed::Drop);
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    if flags & 0x8000 != 0 {
        // A response: answering it could loop two servers into each other.
        return Err(Malformed::Drop);
    }
    let qd = u16::from_be_bytes([packet[4], packet[5]]);
    let an = u16::from_be_bytes([packet[6], packet[7]]);
    let ns = u16::from_be_bytes([packet[8], packet[9]]);
    let ar = u16::from_be_bytes([packet[10], packet[11]]);
    if qd != 1 || an != 0 || ns != 0 {
        return Err(Malformed::FormErr);
    }
    let mut q = Query {
        id,
        flags,
        name: [0; MAX_NAME_LEN],
        name_len: 0,
        label_starts: [0; 128],
        labels: 0,
        qtype: 0,
        qclass: 0,
        question_end: 0,
        edns: None,
    };
    let mut at = HEADER_LEN;
    loop {
        let len = *packet.get(at).ok_or(Malformed::FormErr)? as usize;
        if len == 0 {
            if q.name_len + 1 > MAX_NAME_LEN {
                return Err(Malformed::FormErr);
            }
            q.name[q.name_len] = 0;
            q.name_len += 1;
            at += 1;
            break;
        }
        // 0xC0: pointer, 0x40/0x80: extended label types; none belongs in
        // a question.
        if len > MAX_LABEL_LEN {
            return Err(Malformed::FormErr);
        }
        // The root byte must still fit after this label.
        if q.name_len + 1 + len + 1 > MAX_NAME_LEN {
            return Err(Malformed::FormErr);
        }
        let label = packet.get(at + 1..at + 1 + len).ok_or(Malformed::FormErr)?;
        q.label_starts[q.labels] = q.name_len as u8;
        q.labels += 1;
        q.name[q.name_len] = len as u8;
        for (d, s) in q.name[q.name_len + 1..q.name_len + 1 + len]
            .iter_mut()
            .zip(label)
        {
            *d = s.to_ascii_lowercase();
        }
        q.name_len += 1 + len;
        at += 1 + len;
    }
    q.qtype = u16_at(packet, at).ok_or(Malformed::FormErr)?;
    q.qclass = u16_at(packet, at + 2).ok_or(Malformed::FormErr)?;
    at += 4;
    q.question_end = at;
    for _ in 0..ar {
        at = additional(packet, at, &mut q)?;
    }
    if at != packet.len() {
        return Err(Malformed::FormErr);
    }
    Ok(q)
}

/// Skips a name without following pointers; returns the offset after it.
fn skip_name(packet: &[u8], mut at: usize) -> Result<usize, Malformed> {
    let mut total = 0usize;
    loop {
        let len = *packet.get(at).ok_or(Malformed::FormErr)? as usize;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => {
                packet.get(at + 1).ok_or(Malformed::FormErr)?;
                return Ok(at + 2);
            }
            l if l > MAX_LABEL_LEN => return Err(Malformed::FormErr),
            l => {
                total += l + 1;
                if total + 1 > MAX_NAME_LEN {
                    return Err(Malformed::FormErr);
                }
                at += 1 + l;
            }
        }
    }
}

/// Reads one additional record; an OPT record fills `q.edns`.
fn additional(packet: &[u8], at: usize, q: &mut Query) -> Result<usize, Malformed> {
    let root_owner = packet.get(at) == Some(&0);
    let at = skip_name(packet, at)?;
    let rtype = u16_at(packet, at).ok_or(Malformed::FormErr)?;
    let class = u16_at(packet, at + 2).ok_or(Malformed::FormErr)?;
    let ttl_hi = u16_at(packet, at + 4).ok_or(Malformed::FormErr)?;
    let ttl_lo = u16_at(packet, at + 6).ok_or(Malformed::FormErr)?;
    let rdlen = u16_at(packet, at + 8).ok_or(Malformed::FormErr)? as usize;
    let rdata = packet
        .get(at + 10..at + 10 + rdlen)
        .ok_or(Malformed::FormErr)?;
    if rtype == rtype::OPT {
        if q.edns.is_some() || !root_owner {
            return Err(Malformed::FormErr);
        }
        q.edns = Some(Edns {
            udp_size: class,
            version: (ttl_hi & 0xff) as u8,
            dnssec_ok: ttl_lo & 0x8000 != 0,
            client_subnet: options(rdata)?,
        });
    }
    Ok(at + 10 + rdlen)
}

/// Walks the EDNS options; returns Client Subnet if present and valid.
fn options(mut rdata: &[u8]) -> Result<Option<ClientSubnet>, Malformed> {
    let mut ecs = None;
    while !rdata.is_empty() {
        let code = u16_at(rdata, 0).ok_or(Malformed::FormErr)?;
        let len = u16_at(rdata, 2).ok_or(Malformed::FormErr)? as usize;
        let data = rdata.get(4..4 + len).ok_or(Malformed::FormErr)?;
        if code == EDNS_CLIENT_SUBNET {
            ecs = Some(client_subnet(data)?);
        }
        rdata = &rdata[4 + len..];
    }
    Ok(ecs)
}

/// RFC 7871 6: a malformed Client Subnet option is a FORMERR.
fn client_subnet(data: &[u8]) -> Result<ClientSubnet, Malformed> {
    let family = u16_at(data, 0).ok_or(Malformed::FormErr)?;
    let source_prefix = *data.get(2).ok_or(Malformed::FormErr)?;
    let scope = *data.get(3).ok_or(Malformed::FormErr)?;
    let addr = &data[4..];
    let max_bits = match family {
        1 => 32,
        2 => 128,
        _ => return Err(Malformed::FormErr),
    };
    let need = (source_prefix as usize).div_ceil(8);
    if source_prefix > max_bits || scope != 0 || addr.len() != need {
        return Err(Malformed::FormErr);
    }
    let mut out = [0u8; 16];
    out[..addr.len()].copy_from_slice(addr);
    Ok(ClientSubnet {
        family,
        source_prefix,
        addr: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8], qd: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, qd as u8, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(name);
        p.extend_from_slice(&[0, 1, 0, 1]);
        p
    }

    #[test]
    fn lowercases_the_name_and_records_labels() {
        let q = parse(&query(b"\x03FoO\x05local\x00", 1)).unwrap();
        assert_eq!(q.name(), b"\x03foo\x05local\x00");
        assert_eq!(q.labels, 2);
        assert_eq!(q.suffix(1), b"\x05local\x00");
        assert_eq!(q.suffix(2), b"\x00");
        assert_eq!(q.qtype, rtype::A);
    }

    #[test]
    fn refuses_bad_counts_pointers_and_long_labels() {
        assert_eq!(
            parse(&query(b"\x03foo\x00", 2)).unwrap_err(),
            Malformed::FormErr
        );
        assert_eq!(
            parse(&query(b"\x03foo\x00", 0)).unwrap_err(),
            Malformed::FormErr
        );
        assert_eq!(
            parse(&query(b"\xc0\x0c", 1)).unwrap_err(),
            Malformed::FormErr
        );
        let mut long = vec![64u8];
        long.extend_from_slice(&[b'a'; 64]);
        long.push(0);
        assert_eq!(parse(&query(&long, 1)).unwrap_err(), Malformed::FormErr);
        let mut name = Vec::new();
        for _ in 0..5 {
            name.push(63);
            name.extend_from_slice(&[b'a'; 63]);
        }
        name.push(0);
        assert_eq!(parse(&query(&name, 1)).unwrap_err(), Malformed::FormErr);
        assert_eq!(parse(&[0u8; 5]).unwrap_err(), Malformed::Drop);
        let mut resp = query(b"\x03foo\x00", 1);
        resp[2] |= 0x80;
        assert_eq!(parse(&resp).unwrap_err(), Malformed::Drop);
    }

    #[test]
    fn reads_edns_and_client_subnet() {
        let mut p = query(b"\x03foo\x00", 1);
        p[11] = 1;
        // OPT: root, type 41, size 1232, ttl 0 with DO, ECS 10.1.2.0/24.
        p.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 11]);
        p.extend_from_slice(&[0, 8, 0, 7, 0, 1, 24, 0, 10, 1, 2]);
        let q = parse(&p).unwrap();
        let e = q.edns.unwrap();
        assert_eq!(e.udp_size, 1232);
        assert!(e.dnssec_ok);
        let ecs = e.client_subnet.unwrap();
        assert_eq!(ecs.source_prefix, 24);
        assert_eq!(ecs.ip(), Some("10.1.2.0".parse().unwrap()));
        // A trailing byte is a FORMERR.
        p.push(0);
        assert_eq!(parse(&p).unwrap_err(), Malformed::FormErr);
    }
}

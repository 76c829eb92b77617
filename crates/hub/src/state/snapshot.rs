//! The snapshot's bytes, encoded straight from the state.
//!
//! Building the snapshot message first would copy every record (a dozen
//! small allocations per POP) only to encode and drop them. That copy was
//! the biggest allocation burst in the hub: made on the apply worker while
//! writes wait, and freed after new records had been allocated above it,
//! so the heap kept its holes. Encoding from references costs one buffer of
//! the exact size.

use prost::encoding::{message, uint32, uint64};
use prost::Message;
use switchyard_proto::pb;

use super::State;

// Field numbers of `StateSnapshot` (state.proto); the test below checks
// the bytes against prost's own encoding of the message.
const VERSION: u32 = 1;
const FEDERATION: u32 = 2;
const POPS: u32 = 3;
const TOKENS: u32 = 4;
const POLICIES: u32 = 5;
const REVOCATIONS: u32 = 6;
const EXPORTS: u32 = 7;
const SERVICES: u32 = 8;
const POP_STATUS: u32 = 9;
const VIPS: u32 = 10;
const RTTS: u32 = 11;
const TOMBSTONE_INDEX: u32 = 12;
const HUB_UPLINKS: u32 = 13;
const EVENTS: u32 = 14;

fn repeated_len<'a, M: Message + 'a>(tag: u32, items: impl Iterator<Item = &'a M>) -> usize {
    items.map(|m| message::encoded_len(tag, m)).sum()
}

fn put_repeated<'a, M: Message + 'a>(
    tag: u32,
    items: impl Iterator<Item = &'a M>,
    buf: &mut Vec<u8>,
) {
    for m in items {
        message::encode(tag, m, buf);
    }
}

impl State {
    /// The state as an encoded `StateSnapshot`: the same bytes as encoding
    /// [`State::to_snapshot`], without copying the state first.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let version = switchyard_proto::STATE_SNAPSHOT_VERSION;
        // Few and small: built as messages.
        let uplinks: Vec<pb::HubUplink> = self
            .hub_uplinks
            .iter()
            .map(|(node, addr)| pb::HubUplink {
                node: *node,
                addr: addr.clone(),
            })
            .collect();
        let version_len = if version != 0 {
            uint32::encoded_len(VERSION, &version)
        } else {
            0
        };
        let tombstone_len = if self.tombstone_index != 0 {
            uint64::encoded_len(TOMBSTONE_INDEX, &self.tombstone_index)
        } else {
            0
        };
        let len = version_len
            + self
                .federation
                .as_ref()
                .map_or(0, |f| message::encoded_len(FEDERATION, f))
            + repeated_len(POPS, self.pops.values())
            + repeated_len(TOKENS, self.tokens.values())
            + repeated_len(POLICIES, self.policies.values())
            + repeated_len(REVOCATIONS, self.revocations.values())
            + repeated_len(EXPORTS, self.exports.values())
            + repeated_len(SERVICES, self.services.values())
            + repeated_len(POP_STATUS, self.pop_status.values())
            + repeated_len(VIPS, self.vips.values())
            + repeated_len(RTTS, self.rtts.values())
            + tombstone_len
            + repeated_len(HUB_UPLINKS, uplinks.iter())
            + repeated_len(EVENTS, self.events.iter());

        let mut buf = Vec::with_capacity(len);
        if version != 0 {
            uint32::encode(VERSION, &version, &mut buf);
        }
        if let Some(f) = &self.federation {
            message::encode(FEDERATION, f, &mut buf);
        }
        put_repeated(POPS, self.pops.values(), &mut buf);
        put_repeated(TOKENS, self.tokens.values(), &mut buf);
        put_repeated(POLICIES, self.policies.values(), &mut buf);
        put_repeated(REVOCATIONS, self.revocations.values(), &mut buf);
        put_repeated(EXPORTS, self.exports.values(), &mut buf);
        put_repeated(SERVICES, self.services.values(), &mut buf);
        put_repeated(POP_STATUS, self.pop_status.values(), &mut buf);
        put_repeated(VIPS, self.vips.values(), &mut buf);
        put_repeated(RTTS, self.rtts.values(), &mut buf);
        if self.tombstone_index != 0 {
            uint64::encode(TOMBSTONE_INDEX, &self.tombstone_index, &mut buf);
        }
        put_repeated(HUB_UPLINKS, uplinks.iter(), &mut buf);
        put_repeated(EVENTS, self.events.iter(), &mut buf);
        // The length pass and the encoding pass list the same fields.
        debug_assert_eq!(buf.len(), len);
        buf
    }
}

//! The local backend: a bounded set of shared-data slots.

use crate::host::{CasStore, SetError};

use super::*;

/// Ways per set: a lookup reads at most this many slots; a store replaces one of them.
pub const WAYS: u32 = 2;
/// Most slots (keys) the local backend ever uses.
pub const MAX_SLOTS: u32 = 1 << 16;
/// Shared-data key prefix of the slots.
pub const SLOT_KEY_PREFIX: &str = "tollgate.v1.cache.";
/// Attempts of a store's read-choose-write loop.
pub const STORE_ATTEMPTS: u32 = 4;

/// The shared-data key of a slot. Every key the local backend uses is one of these, with
/// `slot < layout.slots`: the set of keys is fixed by the configuration.
pub fn slot_key(slot: u32) -> String {
    format!("{SLOT_KEY_PREFIX}{slot}")
}

pub(super) fn set_slots(key: &Key, layout: &LocalLayout) -> impl Iterator<Item = u32> {
    let first = key.set(layout) * WAYS;
    (0..WAYS).map(move |w| first + w)
}

/// Looks a key up: `Ok(None)` on a miss (absent, expired, or another key in the slots).
pub fn local_get(
    store: &dyn CasStore,
    layout: &LocalLayout,
    key: &Key,
    now_ms: u64,
) -> Result<Option<Entry>, Error> {
    for slot in set_slots(key, layout) {
        let Some((bytes, _)) = store.get(&slot_key(slot)).map_err(|_| Error::Store)? else {
            continue;
        };
        // The header says whose entry it is; only a match is decoded (copied) in full.
        match decode_header(&bytes) {
            Some((k, _, expires)) if k == *key && now_ms < expires => {
                return Ok(Entry::decode(&bytes));
            }
            _ => continue,
        }
    }
    Ok(None)
}

/// What a slot holds, for choosing where a new entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Nothing, or bytes that are not an entry.
    Empty,
    /// An entry for the key being stored (replaced: the newer answer wins).
    Same,
    /// An entry that has expired.
    Expired,
    /// A live entry of another key, stored at this time.
    Live(u64),
}

/// The way a new entry replaces: its own older entry, else an empty slot, else an expired
/// one, else the oldest live entry (ties: the first).
pub fn choose_way(states: &[SlotState]) -> usize {
    let find = |want: fn(&SlotState) -> bool| states.iter().position(want);
    find(|s| *s == SlotState::Same)
        .or_else(|| find(|s| *s == SlotState::Empty))
        .or_else(|| find(|s| *s == SlotState::Expired))
        .or_else(|| {
            states
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| match s {
                    SlotState::Live(at) => *at,
                    _ => u64::MAX,
                })
                .map(|(i, _)| i)
        })
        .unwrap_or(0)
}

/// Stores an entry in its set, replacing the way [`choose_way`] picks. Each write is a
/// compare-and-swap against what was read (a race with another worker reads again); a slot
/// that did not exist yet is inserted, which two workers may race on harmlessly: each writes
/// a whole valid entry and one of them stays.
pub fn local_put(
    store: &dyn CasStore,
    layout: &LocalLayout,
    entry: &Entry,
    now_ms: u64,
) -> Result<(), Error> {
    let bytes = entry.encode();
    for _ in 0..STORE_ATTEMPTS {
        let mut states = [SlotState::Empty; WAYS as usize];
        let mut cas = [0u32; WAYS as usize];
        let slots: Vec<u32> = set_slots(&entry.key, layout).collect();
        for ((slot, state), token) in slots.iter().zip(states.iter_mut()).zip(cas.iter_mut()) {
            if let Some((value, c)) = store.get(&slot_key(*slot)).map_err(|_| Error::Store)? {
                *token = c;
                *state = match decode_header(&value) {
                    None => SlotState::Empty,
                    Some((k, _, _)) if k == entry.key => SlotState::Same,
                    Some((_, _, expires)) if expires <= now_ms => SlotState::Expired,
                    Some((_, stored, _)) => SlotState::Live(stored),
                };
            }
        }
        let way = choose_way(&states);
        let (Some(slot), Some(token)) = (slots.get(way), cas.get(way)) else {
            return Err(Error::Store);
        };
        match store.set(&slot_key(*slot), &bytes, *token) {
            Ok(()) => return Ok(()),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Store) => return Err(Error::Store),
        }
    }
    Err(Error::Contention)
}

//! Entries.

use crate::webdis::ReplyError;

use super::*;

pub(super) const ENTRY_VERSION: u8 = 1;
/// Bytes of an entry besides its body: the fixed header and a content type of at most
/// [`MAX_CONTENT_TYPE_LEN`] bytes, rounded up.
pub const ENTRY_OVERHEAD: usize = 320;
/// Longest content type stored (a longer one is not cached).
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
pub(super) const HEADER_LEN: usize = 1 + 32 + 8 + 8 + 2 + 1;

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key it was stored under (checked on every read: a slot is shared by many keys).
    pub key: Key,
    /// When it was stored (Unix ms).
    pub stored_at_ms: u64,
    /// When it expires (Unix ms).
    pub expires_at_ms: u64,
    /// HTTP status (always 200 today).
    pub status: u16,
    /// The response's `content-type`.
    pub content_type: Vec<u8>,
    /// The response body.
    pub body: Vec<u8>,
}

impl Entry {
    /// A new entry for a complete response, or why it cannot be stored.
    pub fn new(
        plan: &Plan,
        now_ms: u64,
        status: u16,
        content_type: &[u8],
        body: Vec<u8>,
    ) -> Result<Self, Skip> {
        if status != 200 {
            return Err(Skip::Status);
        }
        if content_type.len() > MAX_CONTENT_TYPE_LEN
            || !content_type
                .iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            return Err(Skip::Encoding);
        }
        if body.len() > plan.max_entry_bytes {
            return Err(Skip::TooLarge);
        }
        Ok(Self {
            key: plan.key,
            stored_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(u64::from(plan.ttl_s) * 1000),
            status,
            content_type: content_type.to_vec(),
            body,
        })
    }

    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let ct = self
            .content_type
            .get(..self.content_type.len().min(MAX_CONTENT_TYPE_LEN))
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len() + self.body.len());
        out.push(ENTRY_VERSION);
        out.extend_from_slice(&self.key.0);
        out.extend_from_slice(&self.stored_at_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        out.push(ct.len() as u8);
        out.extend_from_slice(ct);
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads stored bytes; `None` for anything else (another version, truncated, empty).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (key, stored_at_ms, expires_at_ms) = decode_header(bytes)?;
        let status = u16::from_le_bytes(bytes.get(49..51)?.try_into().ok()?);
        let ct_len = usize::from(*bytes.get(51)?);
        let content_type = bytes.get(HEADER_LEN..HEADER_LEN + ct_len)?.to_vec();
        let body = bytes.get(HEADER_LEN + ct_len..)?.to_vec();
        Some(Self {
            key,
            stored_at_ms,
            expires_at_ms,
            status,
            content_type,
            body,
        })
    }

    /// Whether this entry answers `key` at `now_ms`.
    pub fn answers(&self, key: &Key, now_ms: u64) -> bool {
        self.key == *key && now_ms < self.expires_at_ms
    }

    /// Seconds since it was stored (the `age` response header).
    pub fn age_s(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }
}

/// (key, stored at, expires at) of stored bytes, without copying the body.
pub(super) fn decode_header(bytes: &[u8]) -> Option<(Key, u64, u64)> {
    if *bytes.first()? != ENTRY_VERSION || bytes.len() < HEADER_LEN {
        return None;
    }
    let key = Key(bytes.get(1..33)?.try_into().ok()?);
    let stored = u64::from_le_bytes(bytes.get(33..41)?.try_into().ok()?);
    let expires = u64::from_le_bytes(bytes.get(41..49)?.try_into().ok()?);
    Some((key, stored, expires))
}

/// A cache backend failure; the request goes on as a miss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Shared data refused a read or write.
    Store,
    /// Every compare-and-swap attempt of a store lost a race.
    Contention,
    /// The Webdis call failed, or Redis answered an error.
    Redis(ReplyError),
    /// Redis held something that is not an entry.
    Corrupt,
    /// Too many stores waiting for Webdis in this worker.
    Overloaded,
}

impl Error {
    /// Metric label value (`tollgate_cache_errors_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Store => "store",
            Error::Contention => "contention",
            Error::Redis(e) => e.reason(),
            Error::Corrupt => "corrupt",
            Error::Overloaded => "overloaded",
        }
    }
}

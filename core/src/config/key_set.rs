//! `key_set`: many clients packed in one base64 string of binary records, for key sets too
//! large for JSON `clients` (see docs/scale.md: at 100,000 clients, Envoy's own handling of a
//! JSON configuration costs more than the targets allow).
//!
//! The block, before base64 (standard alphabet, padded), all integers big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 2 | `TK`, the format's mark |
//! | 2 | format version, 1 |
//! | 4 | record count |
//!
//! then `count` records, sorted by digest (strictly: no digest twice):
//!
//! | bytes | field |
//! |---|---|
//! | 32 | SHA-256 of the client's key |
//! | 4 | `requests_per_minute`; 0: the configuration's `default_requests_per_minute` |
//! | 4 | `tokens_per_minute`; 0: the configuration's `default_tokens_per_minute` (none if unset) |
//! | 1 | length of the name, 1 to 64 |
//! | n | the client's name (the same rules as `clients[].name`) |
//!
//! The filter reads it record by record straight into the compiled clients and the key index:
//! no per-client text is parsed and no decoded copy of the block is made.

use crate::base64::{self, DecodeError, Decoder};

use super::{ConfigError, MAX_CLIENT_NAME_LEN};

/// The first two bytes of a key set.
pub const KEY_SET_MARK: [u8; 2] = *b"TK";

/// The format version this filter reads and `tollgate keys pack` writes.
pub const KEY_SET_VERSION: u16 = 1;

/// Bytes of the header: mark, version, record count.
pub const KEY_SET_HEADER_LEN: usize = 8;

/// Bytes of a record before its name: digest, two limits, the name's length.
pub const KEY_SET_RECORD_FIXED_LEN: usize = 32 + 4 + 4 + 1;

/// One client of a key set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySetRecord {
    /// SHA-256 of the client's key.
    pub key_sha256: [u8; 32],
    /// Requests per minute; 0: the configuration's default.
    pub requests_per_minute: u32,
    /// Tokens per minute; 0: the configuration's default (none if it sets none).
    pub tokens_per_minute: u32,
    /// The client's name.
    pub name: String,
}

/// Packs records into a key set (sorting them by digest). Only what the format cannot hold is
/// refused here (a name of more than 255 bytes, more than 2^32 records); the configuration's
/// own rules apply when it is parsed.
pub fn pack_key_set(records: &mut [KeySetRecord]) -> Result<String, String> {
    records.sort_unstable_by_key(|r| r.key_sha256);
    let count = u32::try_from(records.len()).map_err(|_| "too many records".to_string())?;
    let mut bytes = Vec::with_capacity(
        KEY_SET_HEADER_LEN
            + records
                .iter()
                .map(|r| KEY_SET_RECORD_FIXED_LEN + r.name.len())
                .sum::<usize>(),
    );
    bytes.extend_from_slice(&KEY_SET_MARK);
    bytes.extend_from_slice(&KEY_SET_VERSION.to_be_bytes());
    bytes.extend_from_slice(&count.to_be_bytes());
    for r in records.iter() {
        let len = u8::try_from(r.name.len())
            .map_err(|_| format!("client name {:?} is longer than 255 bytes", r.name))?;
        bytes.extend_from_slice(&r.key_sha256);
        bytes.extend_from_slice(&r.requests_per_minute.to_be_bytes());
        bytes.extend_from_slice(&r.tokens_per_minute.to_be_bytes());
        bytes.push(len);
        bytes.extend_from_slice(r.name.as_bytes());
    }
    Ok(base64::encode(&bytes))
}

/// Text read a window at a time: a string in memory, or (in the filter) Envoy's copy of the
/// plugin configuration, so that a VM never holds a whole multi-megabyte configuration.
pub trait Windows {
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether there is no byte at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Replaces `out` with the bytes from `start`, `max` of them or up to the end (`start` is at
    /// most the length). The error says why the host could not give them.
    fn read(&mut self, start: usize, max: usize, out: &mut Vec<u8>) -> Result<(), String>;
}

/// [`Windows`] over a string in memory.
pub struct StrWindows<'a>(pub &'a [u8]);

impl Windows for StrWindows<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn read(&mut self, start: usize, max: usize, out: &mut Vec<u8>) -> Result<(), String> {
        let end = start.saturating_add(max).min(self.0.len());
        out.clear();
        out.extend_from_slice(self.0.get(start..end).unwrap_or_default());
        Ok(())
    }
}

/// A part of another [`Windows`]: `len` bytes from `start`.
pub(super) struct SubWindows<'a> {
    pub(super) inner: &'a mut dyn Windows,
    pub(super) start: usize,
    pub(super) len: usize,
}

impl Windows for SubWindows<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&mut self, start: usize, max: usize, out: &mut Vec<u8>) -> Result<(), String> {
        let max = max.min(self.len.saturating_sub(start));
        self.inner.read(self.start + start, max, out)
    }
}

/// A plugin configuration read through [`Windows`] by [`split_key_set`].
pub(super) enum Split {
    /// The whole document, which has no top-level `key_set` string.
    Whole(Vec<u8>),
    /// The document with the value of its `key_set` string left out (`"key_set":""`), and
    /// where that value is in the configuration: `len` bytes from `start`.
    KeySet {
        json: Vec<u8>,
        start: usize,
        len: usize,
    },
    /// Something this scan does not handle (an escape or a non-ASCII character in the key
    /// set, a second `key_set`, a document that is not an object, ...): read the whole
    /// document and let the parser judge it.
    Unsure,
}

/// Bytes of the configuration scanned at a time by [`split_key_set`].
const SCAN_WINDOW: usize = 64 * 1024;

/// Reads a configuration through `windows`, copying all of it but the value of a top-level
/// `"key_set"` string, which the key set's reader reads later through windows of its own. This
/// only finds that value: the parser checks the document, as it would the whole one.
pub(super) fn split_key_set(windows: &mut dyn Windows) -> Result<Split, String> {
    let len = windows.len();
    let mut json = Vec::with_capacity(len.min(SCAN_WINDOW));
    let mut window = Vec::new();
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escaped = false;
    // A top-level key is expected next (after `{` or `,`), is being read, was `key_set`.
    let mut expect_key = false;
    let mut key: Option<Vec<u8>> = None;
    let mut key_is_key_set = false;
    // After the `:` of a top-level key.
    let mut expect_value = false;
    // Inside the key set's value, from this offset.
    let mut skipping: Option<usize> = None;
    let mut found: Option<(usize, usize)> = None;
    let mut at = 0;
    while at < len {
        windows.read(at, SCAN_WINDOW, &mut window)?;
        if window.is_empty() {
            return Err(format!("the host gave no bytes at offset {at} of {len}"));
        }
        let mut i = 0;
        while let Some(rest) = window.get(i..).filter(|r| !r.is_empty()) {
            if let Some(start) = skipping {
                // Base64 up to the closing quote: anything else is for the parser to judge.
                let stop = |b: &u8| matches!(b, b'"' | b'\\') || !b.is_ascii_graphic();
                match rest.iter().position(stop) {
                    None => {
                        i = window.len();
                        continue;
                    }
                    Some(p) if rest.get(p) == Some(&b'"') => {
                        found = Some((start, at + i + p));
                        skipping = None;
                        in_string = false;
                        expect_value = false;
                        json.push(b'"');
                        i += p + 1;
                        continue;
                    }
                    Some(_) => return Ok(Split::Unsure),
                }
            }
            let Some(&b) = rest.first() else { break };
            i += 1;
            json.push(b);
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                    // An escaped key is never taken for `key_set` (the parser still reads it).
                    key = None;
                } else if b == b'"' {
                    in_string = false;
                    if let Some(k) = key.take() {
                        key_is_key_set = k == b"key_set";
                    }
                } else if let Some(k) = key.as_mut() {
                    k.push(b);
                    if k.len() > 8 {
                        key = None;
                    }
                }
                continue;
            }
            match b {
                b'"' => {
                    in_string = true;
                    if depth == 1 && expect_key {
                        key = Some(Vec::new());
                        expect_key = false;
                    } else if depth == 1 && expect_value && key_is_key_set {
                        if found.is_some() {
                            return Ok(Split::Unsure);
                        }
                        skipping = Some(at + i);
                    }
                    expect_value = false;
                }
                b'{' | b'[' => {
                    depth += 1;
                    if depth == 1 {
                        if b != b'{' {
                            return Ok(Split::Unsure);
                        }
                        expect_key = true;
                    }
                    expect_value = false;
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                b',' if depth == 1 => {
                    expect_key = true;
                    key_is_key_set = false;
                    expect_value = false;
                }
                b':' if depth == 1 => expect_value = true,
                b' ' | b'\t' | b'\n' | b'\r' => {}
                _ => expect_value = false,
            }
        }
        at += window.len();
    }
    Ok(match (found, skipping) {
        (_, Some(_)) => Split::Unsure,
        (None, None) => Split::Whole(json),
        (Some((start, end)), None) => Split::KeySet {
            json,
            start,
            len: end - start,
        },
    })
}

/// Bytes of base64 text decoded at a time (a multiple of 4): 48 KiB of text, 36 KiB of records.
const TEXT_WINDOW: usize = 48 * 1024;

/// The records of a key set, in order (for tools: `tollgate keys pack` merges into one).
/// Checks the block's form (header, records, order); not the names and limits, which the
/// configuration's parser checks.
pub fn unpack_key_set(text: &str) -> Result<Vec<KeySetRecord>, ConfigError> {
    let mut text = StrWindows(text.as_bytes());
    let mut reader = KeySetReader::new(&mut text)?;
    let mut out = Vec::with_capacity(reader.count());
    while let Some(record) = reader.next_record()? {
        out.push(record);
    }
    Ok(out)
}

/// Reads a key set's records in order. Each record's digest is checked against the previous
/// one's (sorted, no duplicates); names and limits are left to the caller, which knows the
/// configuration's rules and defaults.
///
/// The base64 text is decoded a window at a time ([`TEXT_WINDOW`]): neither a decoded copy of
/// the block nor (with the filter's [`Windows`]) the whole text is ever in memory.
pub(super) struct KeySetReader<'a> {
    text: &'a mut dyn Windows,
    /// Offset of the next window of text.
    next_text: usize,
    /// The current window of text.
    window: Vec<u8>,
    /// The current window, decoded, and how much of it was read.
    decoded: Vec<u8>,
    used: usize,
    /// Decoded bytes not read yet, in all.
    remaining: usize,
    count: u32,
    read: u32,
    previous: Option<[u8; 32]>,
}

/// Why bytes could not be read from a key set.
enum Fail {
    /// The block ends before them.
    End,
    /// Not base64, or the host failed.
    Error(ConfigError),
}

impl From<DecodeError> for Fail {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::End => Fail::End,
            e => Fail::Error(decode_error(e)),
        }
    }
}

/// The field of record `i`, for errors.
pub(super) fn record_field(i: usize, field: &str) -> String {
    format!("key_set[{i}].{field}")
}

fn decode_error(e: DecodeError) -> ConfigError {
    let message = match e {
        DecodeError::Length => {
            "not base64: the length is not a multiple of 4 (standard base64 with `=` padding, \
             as `tollgate keys pack` writes)"
                .to_string()
        }
        DecodeError::Character(at) => format!(
            "not base64: character {at} is not in the standard alphabet (A-Z a-z 0-9 + /, \
             `=` only as padding at the end)"
        ),
        DecodeError::End => "ends too early".to_string(),
    };
    ConfigError::new("key_set", message)
}

fn host_error(e: String) -> ConfigError {
    ConfigError::new("key_set", format!("cannot read it: {e}"))
}

impl<'a> KeySetReader<'a> {
    /// Checks the header; the records are read by [`KeySetReader::next_record`].
    pub(super) fn new(text: &'a mut dyn Windows) -> Result<Self, ConfigError> {
        let len = text.len();
        if len % 4 != 0 {
            return Err(decode_error(DecodeError::Length));
        }
        // The decoded size, from the padding at the end.
        let mut window = Vec::new();
        text.read(len.saturating_sub(2), 2, &mut window)
            .map_err(host_error)?;
        let pad = window.iter().rev().take_while(|&&c| c == b'=').count();
        let mut reader = Self {
            text,
            next_text: 0,
            window,
            decoded: Vec::new(),
            used: 0,
            remaining: (len / 4 * 3).saturating_sub(pad),
            count: 0,
            read: 0,
            previous: None,
        };
        let mut header = [0u8; KEY_SET_HEADER_LEN];
        if reader.remaining < KEY_SET_HEADER_LEN {
            return Err(ConfigError::new(
                "key_set",
                format!(
                    "{} bytes, shorter than the {KEY_SET_HEADER_LEN}-byte header: not a key set \
                     (`tollgate keys pack` writes one)",
                    reader.remaining
                ),
            ));
        }
        reader.read_bytes(&mut header).map_err(|e| match e {
            Fail::End => decode_error(DecodeError::End),
            Fail::Error(e) => e,
        })?;
        let [m0, m1, v0, v1, c0, c1, c2, c3] = header;
        if [m0, m1] != KEY_SET_MARK {
            return Err(ConfigError::new(
                "key_set",
                "not a key set: it does not start with the mark \"TK\" (`tollgate keys pack` \
                 writes one)",
            ));
        }
        let version = u16::from_be_bytes([v0, v1]);
        if version != KEY_SET_VERSION {
            return Err(ConfigError::new(
                "key_set",
                format!(
                    "format version {version} is not supported: this filter reads version \
                     {KEY_SET_VERSION} (pack it with the `tollgate` of this release)"
                ),
            ));
        }
        let count = u32::from_be_bytes([c0, c1, c2, c3]);
        // The count sizes allocations: it must fit the bytes that follow.
        let most = reader.remaining / KEY_SET_RECORD_FIXED_LEN;
        if usize::try_from(count).map_or(true, |c| c > most) {
            return Err(ConfigError::new(
                "key_set",
                format!(
                    "the header says {count} records, but the block holds at most {most} \
                     (truncated, or the count is wrong)"
                ),
            ));
        }
        reader.count = count;
        Ok(reader)
    }

    /// The number of records, from the header (checked against the block's size).
    pub(super) fn count(&self) -> usize {
        self.count as usize
    }

    /// Decodes the next window of text.
    fn next_window(&mut self) -> Result<(), Fail> {
        let start = self.next_text;
        let len = self.text.len();
        let max = TEXT_WINDOW.min(len.saturating_sub(start));
        self.text
            .read(start, max, &mut self.window)
            .map_err(|e| Fail::Error(host_error(e)))?;
        if max == 0 || self.window.len() != max {
            return Err(Fail::End);
        }
        // Base64 is ASCII: anything else is an error at its offset (`is_ascii` checks a word
        // at a time; the offset is looked for only when there is one).
        if !self.window.is_ascii() {
            let p = self.window.iter().position(|b| !b.is_ascii()).unwrap_or(0);
            return Err(DecodeError::Character(start + p).into());
        }
        let at = |e: DecodeError| match e {
            DecodeError::Character(p) => DecodeError::Character(start + p),
            e => e,
        };
        let mut decoder = Decoder::from_bytes(&self.window).map_err(at)?;
        self.decoded.resize(decoder.remaining(), 0);
        decoder.read(&mut self.decoded).map_err(at)?;
        // Padding belongs to the last window only (a window's decoder takes its end for the
        // end of the text).
        if start + max < len {
            let tail = max.saturating_sub(2);
            if let Some(p) = self
                .window
                .get(tail..)
                .and_then(|t| t.iter().position(|&c| c == b'='))
            {
                return Err(DecodeError::Character(start + tail + p).into());
            }
        }
        self.next_text = start + max;
        self.used = 0;
        Ok(())
    }

    /// Fills `out` with the next bytes of the block.
    fn read_bytes(&mut self, out: &mut [u8]) -> Result<(), Fail> {
        if out.len() > self.remaining {
            return Err(Fail::End);
        }
        let mut filled = 0;
        while filled < out.len() {
            if self.used == self.decoded.len() {
                self.next_window()?;
                if self.decoded.is_empty() {
                    return Err(Fail::End);
                }
            }
            let n = (out.len() - filled).min(self.decoded.len() - self.used);
            let (Some(dst), Some(src)) = (
                out.get_mut(filled..filled + n),
                self.decoded.get(self.used..self.used + n),
            ) else {
                return Err(Fail::End);
            };
            dst.copy_from_slice(src);
            filled += n;
            self.used += n;
        }
        self.remaining -= out.len();
        Ok(())
    }

    /// The next record (`i` is its index, for errors), `None` after the last. After the last,
    /// nothing may follow.
    pub(super) fn next_record(&mut self) -> Result<Option<KeySetRecord>, ConfigError> {
        let i = self.read as usize;
        if self.read == self.count {
            let left = self.remaining;
            if left > 0 {
                return Err(ConfigError::new(
                    "key_set",
                    format!(
                        "{left} bytes follow the last of the header's {} records (the count is \
                         wrong, or blocks were joined)",
                        self.count
                    ),
                ));
            }
            return Ok(None);
        }
        let count = self.count;
        let truncated = || {
            ConfigError::new(
                format!("key_set[{i}]"),
                format!(
                    "truncated: the block ends inside this record (the header says {count} records)"
                ),
            )
        };
        let mut fixed = [0u8; KEY_SET_RECORD_FIXED_LEN];
        self.read_bytes(&mut fixed).map_err(|e| match e {
            Fail::End => truncated(),
            Fail::Error(e) => e,
        })?;
        let mut key_sha256 = [0u8; 32];
        let (digest, rest) = fixed.split_at(32);
        key_sha256.copy_from_slice(digest);
        let [r0, r1, r2, r3, t0, t1, t2, t3, len] =
            <[u8; 9]>::try_from(rest).map_err(|_| truncated())?;
        let len = usize::from(len);
        if len == 0 || len > MAX_CLIENT_NAME_LEN {
            return Err(ConfigError::new(
                record_field(i, "name"),
                format!("length {len}: a client name has 1 to {MAX_CLIENT_NAME_LEN} bytes"),
            ));
        }
        let mut name = vec![0u8; len];
        self.read_bytes(&mut name).map_err(|e| match e {
            Fail::End => truncated(),
            Fail::Error(e) => e,
        })?;
        let name = String::from_utf8(name).map_err(|_| {
            ConfigError::new(
                record_field(i, "name"),
                "not UTF-8: a client name is letters, digits, '-' or '_'",
            )
        })?;
        if let Some(previous) = self.previous {
            if key_sha256 <= previous {
                let message = if key_sha256 == previous {
                    format!("duplicate key digest (same key as key_set[{}])", i - 1)
                } else {
                    "records are not sorted by digest (`tollgate keys pack` sorts them)".to_string()
                };
                return Err(ConfigError::new(record_field(i, "key_sha256"), message));
            }
        }
        self.previous = Some(key_sha256);
        self.read += 1;
        Ok(Some(KeySetRecord {
            key_sha256,
            requests_per_minute: u32::from_be_bytes([r0, r1, r2, r3]),
            tokens_per_minute: u32::from_be_bytes([t0, t1, t2, t3]),
            name,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(digest_byte: u8, name: &str) -> KeySetRecord {
        KeySetRecord {
            key_sha256: [digest_byte; 32],
            requests_per_minute: 10,
            tokens_per_minute: 0,
            name: name.into(),
        }
    }

    fn read_all(text: &str) -> Result<Vec<KeySetRecord>, ConfigError> {
        unpack_key_set(text)
    }

    /// The raw bytes of a key set with the records as given (not sorted).
    fn raw(version: u16, count: u32, records: &[KeySetRecord]) -> Vec<u8> {
        let mut b = b"TK".to_vec();
        b.extend_from_slice(&version.to_be_bytes());
        b.extend_from_slice(&count.to_be_bytes());
        for r in records {
            b.extend_from_slice(&r.key_sha256);
            b.extend_from_slice(&r.requests_per_minute.to_be_bytes());
            b.extend_from_slice(&r.tokens_per_minute.to_be_bytes());
            b.push(r.name.len() as u8);
            b.extend_from_slice(r.name.as_bytes());
        }
        b
    }

    fn err(text: &str) -> String {
        read_all(text).unwrap_err().to_string()
    }

    #[test]
    fn packs_sorted_and_reads_back() {
        let mut records = vec![rec(9, "b"), rec(1, "a"), rec(5, "c")];
        let text = pack_key_set(&mut records).unwrap();
        let back = read_all(&text).unwrap();
        let names: Vec<&str> = back.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "c", "b"]);
        assert_eq!(back, records);
        assert_eq!(
            base64::decode(&text).unwrap().len(),
            KEY_SET_HEADER_LEN + 3 * (KEY_SET_RECORD_FIXED_LEN + 1)
        );
        assert!(read_all(&pack_key_set(&mut []).unwrap())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn malformed_blocks_name_the_field() {
        let good = raw(1, 2, &[rec(1, "a"), rec(2, "b")]);
        assert_eq!(read_all(&base64::encode(&good)).unwrap().len(), 2);
        // Truncated inside the second record (a whole base64 string of fewer bytes).
        let cut = base64::encode(good.get(..good.len() - 3).unwrap());
        assert_eq!(
            err(&cut),
            "key_set: the header says 2 records, but the block holds at most 1 (truncated, or \
             the count is wrong)"
        );
        let cut = base64::encode(&raw(1, 2, &[rec(1, "a"), rec(2, "")]));
        assert!(
            err(&cut).starts_with("key_set[1].name: length 0"),
            "{}",
            err(&cut)
        );
        let mut long = raw(1, 2, &[rec(1, "a"), rec(2, "bcdefghijk")]);
        long.truncate(long.len() - 2);
        assert!(
            err(&base64::encode(&long)).starts_with("key_set[1]: truncated"),
            "{}",
            err(&base64::encode(&long))
        );
        assert!(
            err(&base64::encode(&raw(2, 2, &[rec(1, "a"), rec(2, "b")])))
                .starts_with("key_set: format version 2 is not supported")
        );
        assert!(
            err(&base64::encode(&raw(1, 1, &[rec(1, "a"), rec(2, "b")])))
                .starts_with("key_set: 42 bytes follow the last of the header's 1 records")
        );
        assert!(
            err(&base64::encode(&raw(1, 9, &[rec(1, "a"), rec(2, "b")])))
                .starts_with("key_set: the header says 9 records, but the block holds at most 2")
        );
        assert!(err(&base64::encode(&raw(1, u32::MAX, &[]))).contains("at most 0"));
        assert_eq!(
            err(&base64::encode(&raw(1, 2, &[rec(2, "a"), rec(1, "b")]))),
            "key_set[1].key_sha256: records are not sorted by digest (`tollgate keys pack` \
             sorts them)"
        );
        assert_eq!(
            err(&base64::encode(&raw(1, 2, &[rec(1, "a"), rec(1, "b")]))),
            "key_set[1].key_sha256: duplicate key digest (same key as key_set[0])"
        );
        let mut bad_utf8 = raw(1, 1, &[rec(1, "ab")]);
        *bad_utf8.last_mut().unwrap() = 0xff;
        assert!(err(&base64::encode(&bad_utf8)).starts_with("key_set[0].name: not UTF-8"));
        assert!(err(&base64::encode(&raw(1, 1, &[rec(1, &"n".repeat(65))])))
            .starts_with("key_set[0].name: length 65"));
        assert!(err("VEsA").starts_with("key_set: 3 bytes, shorter than"));
        assert!(err("").starts_with("key_set: 0 bytes"));
        assert!(err(&base64::encode(b"XX\0\x01\0\0\0\0")).starts_with("key_set: not a key set"));
        assert!(err("VEsAAQ").starts_with("key_set: not base64: the length"));
        assert!(err("VEsA AAAA").starts_with("key_set: not base64"));
        assert!(err("VEsAAQAAAAA-").starts_with("key_set: not base64: character 11"));
    }

    // The configuration around a key set: defaults, names and digests shared with `clients`.

    use crate::config::Config;
    use crate::endpoints::EndpointSet;
    use crate::keys::{Digest, DigestKind};

    fn env(name: &str) -> Option<String> {
        (name == "P").then(|| "sk-provider".to_string())
    }

    fn key_rec(key: &str, name: &str, rpm: u32, tpm: u32) -> KeySetRecord {
        let mut key_sha256 = [0u8; 32];
        key_sha256.copy_from_slice(Digest::of_key(DigestKind::Sha256, key.as_bytes()).as_bytes());
        KeySetRecord {
            key_sha256,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            name: name.into(),
        }
    }

    fn config(clients: &str, key_set: &str, extra: &str) -> Result<Config, String> {
        let json = format!(
            r#"{{"clients":{clients},"key_set":"{key_set}","upstream":{{"api_key_env":"P"}}{extra}}}"#
        );
        Config::parse(json.as_bytes(), &env).map_err(|e| e.to_string())
    }

    fn json_client(key: &str, name: &str) -> String {
        let sha = Digest::of_key(DigestKind::Sha256, key.as_bytes()).to_hex();
        format!(r#"[{{"name":"{name}","key_sha256":"{sha}","requests_per_minute":3}}]"#)
    }

    #[test]
    fn key_set_clients_join_the_json_ones_with_the_defaults() {
        let mut records = vec![key_rec("k-b", "bee", 0, 0), key_rec("k-a", "ant", 7, 500)];
        let set = pack_key_set(&mut records).unwrap();
        let c = config(
            &json_client("k-json", "json"),
            &set,
            r#","default_requests_per_minute":11,"default_tokens_per_minute":99,"endpoints":["embeddings"]"#,
        )
        .unwrap();
        assert_eq!(c.clients.len(), 3);
        assert_eq!(c.key_set_clients, 2);
        assert_eq!(c.keys.len(), 3);
        let by_key = |k: &str| c.client(c.keys.lookup(k.as_bytes()).unwrap()).unwrap();
        assert_eq!(by_key("k-json").name, "json");
        let ant = by_key("k-a");
        assert_eq!(
            (
                ant.name.as_str(),
                ant.requests_per_minute,
                ant.tokens_per_minute
            ),
            ("ant", 7, Some(500))
        );
        let bee = by_key("k-b");
        assert_eq!(
            (bee.requests_per_minute, bee.tokens_per_minute),
            (11, Some(99))
        );
        assert_eq!(
            bee.endpoints,
            EndpointSet::from_names(&["embeddings".to_string()]).unwrap()
        );
        assert!(bee.models().is_none() && bee.budgets().is_empty() && bee.redis_id().is_none());
        assert_eq!(c.keys.lookup(b"k-other"), None);

        // Without a default token limit, 0 is none; `clients` may be left out.
        let json = format!(r#"{{"key_set":"{set}","upstream":{{"api_key_env":"P"}}}}"#);
        let c = Config::parse(json.as_bytes(), &env).unwrap();
        assert_eq!(c.clients.len(), 2);
        let bee = c.client(c.keys.lookup(b"k-b").unwrap()).unwrap();
        assert_eq!((bee.requests_per_minute, bee.tokens_per_minute), (60, None));
    }

    #[test]
    fn key_set_records_follow_the_client_rules() {
        let one = |r: KeySetRecord| pack_key_set(&mut [r]).unwrap();
        let e = config("[]", &one(key_rec("k", "a.b", 1, 0)), "").unwrap_err();
        assert!(
            e.starts_with("key_set[0].name: \"a.b\" is not a valid client name"),
            "{e}"
        );
        let e = config("[]", &one(key_rec("k", "a", 1_000_000_001, 0)), "").unwrap_err();
        assert!(
            e.starts_with("key_set[0].requests_per_minute: must be between 1"),
            "{e}"
        );
        let e = config("[]", &one(key_rec("k", "a", 1, u32::MAX)), "").unwrap_err();
        assert!(
            e.starts_with("key_set[0].tokens_per_minute: must be between 1"),
            "{e}"
        );

        // Names are unique across both forms, and within the key set.
        let e = config(
            &json_client("k-json", "dup"),
            &one(key_rec("k", "dup", 1, 0)),
            "",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "key_set[0].name: duplicate client name \"dup\" (also clients[0])"
        );
        let mut two = vec![key_rec("k1", "same", 1, 0), key_rec("k2", "same", 1, 0)];
        let e = config("[]", &pack_key_set(&mut two).unwrap(), "").unwrap_err();
        assert_eq!(
            e,
            "key_set[1].name: duplicate client name \"same\" (also key_set[0])"
        );

        // A key in both forms is a duplicate digest, named on the JSON client.
        let e = config(
            &json_client("k", "json"),
            &one(key_rec("k", "packed", 1, 0)),
            "",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "clients[0].key_sha256: duplicate key digest (same key as key_set[0])"
        );

        // An empty key set with no clients has no client at all.
        let e = config("[]", &pack_key_set(&mut []).unwrap(), "").unwrap_err();
        assert!(
            e.starts_with("key_set: at least one client is required"),
            "{e}"
        );
        let e = config("[]", "!!!!AAAAAAAA", "").unwrap_err();
        assert!(e.starts_with("key_set: not base64: character 0"), "{e}");
        // A key set is a string.
        let json = r#"{"key_set":7,"upstream":{"api_key_env":"P"}}"#;
        let e = Config::parse(json.as_bytes(), &env)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("key_set: invalid type"), "{e}");
    }

    // Reading a configuration through windows (the filter's way).

    /// A configuration behind windows, recording the largest window asked for.
    struct Host {
        text: Vec<u8>,
        largest: usize,
        reads: usize,
    }

    impl Windows for Host {
        fn len(&self) -> usize {
            self.text.len()
        }
        fn read(&mut self, start: usize, max: usize, out: &mut Vec<u8>) -> Result<(), String> {
            assert!(
                start <= self.text.len(),
                "read at {start} of {}",
                self.text.len()
            );
            let end = start.saturating_add(max).min(self.text.len());
            self.largest = self.largest.max(end - start);
            self.reads += 1;
            *out = self.text[start..end].to_vec();
            Ok(())
        }
    }

    fn host(text: &str) -> Host {
        Host {
            text: text.as_bytes().to_vec(),
            largest: 0,
            reads: 0,
        }
    }

    fn many(n: usize) -> (Vec<KeySetRecord>, String) {
        let mut records: Vec<KeySetRecord> = (0..n)
            .map(|i| key_rec(&format!("sk-{i}"), &format!("client-{i:06}"), 5, 0))
            .collect();
        let set = pack_key_set(&mut records).unwrap();
        (records, set)
    }

    fn summary(c: &Config) -> Vec<(String, u32, Option<u32>)> {
        c.clients
            .iter()
            .map(|c| (c.name.clone(), c.requests_per_minute, c.tokens_per_minute))
            .collect()
    }

    #[test]
    fn the_upstream_role_reads_no_client() {
        let (_, set) = many(3000);
        let json = format!(
            r#"{{"clients":[{{"name":"json","key_sha256":"{}"}}],"key_set":"{set}",
                "providers":[{{"name":"relay","cluster":"relay","api_key_env":"P"}}],
                "models":[{{"match":"*","providers":["relay"]}}]}}"#,
            "ab".repeat(32)
        );
        let mut h = host(&json);
        let upstream = Config::parse_windows_upstream(&mut h, &env).unwrap();
        assert!(upstream.clients.is_empty() && upstream.keys.is_empty());
        assert!(matches!(upstream.mode, crate::config::Mode::Routed(_)));
        // The scan reads the document once; the key set's value is never decoded.
        assert!(
            h.reads * SCAN_WINDOW < json.len() + 2 * SCAN_WINDOW,
            "{}",
            h.reads
        );
        // The listener role, from the same document, compiles them all.
        let listener = Config::parse_windows(&mut host(&json), &env).unwrap();
        assert_eq!(listener.clients.len(), 3001);
        // What the upstream role needs is still checked.
        let bad = json.replace(r#""providers":["relay"]"#, r#""providers":["nope"]"#);
        assert!(Config::parse_windows_upstream(&mut host(&bad), &env)
            .unwrap_err()
            .to_string()
            .starts_with("models[0].providers"));
    }

    #[test]
    fn windows_read_a_key_set_without_a_whole_copy() {
        // 3,000 records: 160 KB of base64, several windows of the scan and of the decoder.
        let (records, set) = many(3000);
        assert!(set.len() > 3 * SCAN_WINDOW);
        let json = format!(
            "{{\n  \"clients\": [],\n  \"upstream\": {{\"api_key_env\": \"P\"}},\n  \"key_set\" :  \"{set}\",\n  \"default_requests_per_minute\": 9\n}}\n"
        );
        let whole = Config::parse(json.as_bytes(), &env).unwrap();
        let mut h = host(&json);
        let windowed = Config::parse_windows(&mut h, &env).unwrap();
        assert!(h.largest <= SCAN_WINDOW, "{}", h.largest);
        assert_eq!(summary(&windowed), summary(&whole));
        assert_eq!(windowed.key_set_clients, 3000);
        assert_eq!(records.len(), 3000);
        for i in (0..3000).step_by(97) {
            let id = windowed.keys.lookup(format!("sk-{i}").as_bytes()).unwrap();
            assert_eq!(windowed.client(id).unwrap().name, format!("client-{i:06}"));
        }
        assert_eq!(windowed.keys.lookup(b"sk-3000"), None);

        // The split itself: the document with an empty key set, and where the value is.
        let Split::KeySet {
            json: rest,
            start,
            len,
        } = split_key_set(&mut host(&json)).unwrap()
        else {
            panic!("not split")
        };
        assert_eq!(&json.as_bytes()[start..start + len], set.as_bytes());
        assert_eq!(String::from_utf8(rest).unwrap(), json.replace(&set, ""));
    }

    #[test]
    fn windows_fall_back_to_the_whole_document_when_unsure() {
        let (_, set) = many(3);
        let parse = |json: &str| {
            let mut h = host(json);
            let split = match split_key_set(&mut host(json)).unwrap() {
                Split::Whole(_) => "whole",
                Split::KeySet { .. } => "key_set",
                Split::Unsure => "unsure",
            };
            (
                split,
                Config::parse_windows(&mut h, &env).map_err(|e| e.to_string()),
                Config::parse(json.as_bytes(), &env).map_err(|e| e.to_string()),
            )
        };
        let up = r#""upstream":{"api_key_env":"P"}"#;
        // Escaped slashes are still base64 once unescaped: the parser reads them.
        let escaped = set.replace('/', "\\/");
        for (json, how) in [
            (format!(r#"{{"key_set":"{set}",{up}}}"#), "key_set"),
            (
                format!(r#"{{{up},"key_set":"{escaped}"}}"#),
                if escaped == set { "key_set" } else { "unsure" },
            ),
            (
                format!(r#"{{"key_set":"{set}","key_set":"{set}",{up}}}"#),
                "unsure",
            ),
            (format!(r#"{{"key_set":7,{up}}}"#), "whole"),
            (format!(r#"{{"key_set":["{set}"],{up}}}"#), "whole"),
            (
                format!(r#"{{"upstream":{{"api_key_env":"P","key_set":"{set}"}}}}"#),
                "whole",
            ),
            (
                format!(r#"{{"clients":[{{"name":"key_set"}}],"x":"key_set",{up}}}"#),
                "whole",
            ),
            (format!(r#"{{"key\u005fset":"{set}",{up}}}"#), "whole"),
            (format!(r#"{{"key_set":"{set} ",{up}}}"#), "unsure"),
            (format!(r#"{{"key_set":"{set}"#), "unsure"),
            (format!(r#"["key_set","{set}"]"#), "unsure"),
            (String::new(), "whole"),
            ("   ".to_string(), "whole"),
            (format!(r#"{{"key_set":"","clients":[],{up}}}"#), "key_set"),
        ] {
            let (split, windowed, whole) = parse(&json);
            assert_eq!(split, how, "{json}");
            // The same answer either way, errors included.
            match (&windowed, &whole) {
                (Ok(a), Ok(b)) => assert_eq!(summary(a), summary(b), "{json}"),
                (a, b) => assert_eq!(a.as_ref().err(), b.as_ref().err(), "{json}"),
            }
        }
    }

    #[test]
    fn windowed_key_set_errors_name_the_offset_in_the_whole_text() {
        let (_, set) = many(3000);
        let up = r#""upstream":{"api_key_env":"P"}"#;
        // A bad character in the third window of the decoder.
        let at = 2 * TEXT_WINDOW + 1001;
        let mut bad = set.clone().into_bytes();
        bad[at] = b'*';
        let bad = String::from_utf8(bad).unwrap();
        // Padding at the end of a window that is not the last.
        let mut padded = set.clone().into_bytes();
        padded[TEXT_WINDOW - 1] = b'=';
        let padded = String::from_utf8(padded).unwrap();
        // Truncated: a whole base64 string, shorter than the header says.
        let short = base64::encode(&base64::decode(&set).unwrap()[..100_000]);
        for text in [bad, padded, short] {
            let json = format!(r#"{{"key_set":"{text}",{up}}}"#);
            let whole = Config::parse(json.as_bytes(), &env).unwrap_err();
            let windowed = Config::parse_windows(&mut host(&json), &env).unwrap_err();
            assert_eq!(windowed, whole);
        }
        let json = format!(r#"{{"key_set":"{}",{up}}}"#, {
            let mut b = set.clone().into_bytes();
            b[at] = b'*';
            String::from_utf8(b).unwrap()
        });
        assert_eq!(
            Config::parse_windows(&mut host(&json), &env)
                .unwrap_err()
                .to_string(),
            format!(
                "key_set: not base64: character {at} is not in the standard alphabet (A-Z a-z \
                 0-9 + /, `=` only as padding at the end)"
            )
        );
    }

    #[test]
    fn host_failures_are_configuration_errors() {
        struct Failing;
        impl Windows for Failing {
            fn len(&self) -> usize {
                10
            }
            fn read(&mut self, _: usize, _: usize, _: &mut Vec<u8>) -> Result<(), String> {
                Err("status 2".into())
            }
        }
        assert_eq!(
            Config::parse_windows(&mut Failing, &env)
                .unwrap_err()
                .to_string(),
            "cannot read the plugin configuration: status 2"
        );
    }
}

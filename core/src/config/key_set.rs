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

/// The records of a key set, in order (for tools: `tollgate keys pack` merges into one).
/// Checks the block's form (header, records, order); not the names and limits, which the
/// configuration's parser checks.
pub fn unpack_key_set(text: &str) -> Result<Vec<KeySetRecord>, ConfigError> {
    let mut reader = KeySetReader::new(text)?;
    let mut out = Vec::with_capacity(reader.count());
    while let Some(record) = reader.next_record()? {
        out.push(record);
    }
    Ok(out)
}

/// Reads a key set's records in order. Each record's digest is checked against the previous
/// one's (sorted, no duplicates); names and limits are left to the caller, which knows the
/// configuration's rules and defaults.
pub(super) struct KeySetReader<'a> {
    decoder: Decoder<'a>,
    count: u32,
    read: u32,
    previous: Option<[u8; 32]>,
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

impl<'a> KeySetReader<'a> {
    /// Checks the header; the records are read by [`KeySetReader::next_record`].
    pub(super) fn new(text: &'a str) -> Result<Self, ConfigError> {
        let mut decoder = Decoder::new(text).map_err(decode_error)?;
        let mut header = [0u8; KEY_SET_HEADER_LEN];
        if decoder.remaining() < KEY_SET_HEADER_LEN {
            return Err(ConfigError::new(
                "key_set",
                format!(
                    "{} bytes, shorter than the {KEY_SET_HEADER_LEN}-byte header: not a key set \
                     (`tollgate keys pack` writes one)",
                    decoder.remaining()
                ),
            ));
        }
        decoder.read(&mut header).map_err(decode_error)?;
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
        let most = decoder.remaining() / KEY_SET_RECORD_FIXED_LEN;
        if usize::try_from(count).map_or(true, |c| c > most) {
            return Err(ConfigError::new(
                "key_set",
                format!(
                    "the header says {count} records, but the block holds at most {most} \
                     (truncated, or the count is wrong)"
                ),
            ));
        }
        Ok(Self {
            decoder,
            count,
            read: 0,
            previous: None,
        })
    }

    /// The number of records, from the header (checked against the block's size).
    pub(super) fn count(&self) -> usize {
        self.count as usize
    }

    /// The next record (`i` is its index, for errors), `None` after the last. After the last,
    /// nothing may follow.
    pub(super) fn next_record(&mut self) -> Result<Option<KeySetRecord>, ConfigError> {
        let i = self.read as usize;
        if self.read == self.count {
            let left = self.decoder.remaining();
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
        let truncated = || {
            ConfigError::new(
                format!("key_set[{i}]"),
                format!(
                    "truncated: the block ends inside this record (the header says {} records)",
                    self.count
                ),
            )
        };
        let read = |d: &mut Decoder<'_>, out: &mut [u8]| match d.read(out) {
            Err(DecodeError::End) => Err(truncated()),
            other => other.map_err(decode_error),
        };
        let mut fixed = [0u8; KEY_SET_RECORD_FIXED_LEN];
        read(&mut self.decoder, &mut fixed)?;
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
        read(&mut self.decoder, &mut name)?;
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
        assert!(bee.models.is_none() && bee.budgets.is_empty() && bee.redis_id.is_none());
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
}

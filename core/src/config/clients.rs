//! Clients: who may call, with which key, within which limits.

use std::borrow::Cow;

use serde::Deserialize;

use super::cache::RawCache;
use super::key_set::{record_field, KeySetReader, Windows};
use super::prices::{compile_budgets, RawBudget};
use super::routing::compile_patterns;
use super::{check_client_name, per_minute, ConfigError, Phase};
use crate::endpoints::EndpointSet;
use crate::identity::{check_spiffe_id, IdentityIndex, MAX_IDENTITIES_PER_CLIENT};
use crate::keys::{Digest, DigestKind, KeyHolder, KeyIndex};
use crate::routing::Pattern;
use crate::types::ClientId;

/// Requests per minute for a client that sets no `requests_per_minute` and a config that sets no
/// `default_requests_per_minute`.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 60;

/// Highest accepted per-minute limit; larger values are almost certainly typos.
pub const MAX_PER_MINUTE: u32 = 1_000_000_000;

/// Longest accepted client name. Names become metric labels and shared-data keys.
pub const MAX_CLIENT_NAME_LEN: usize = 64;

/// Most keys one client may have (a rotation needs two; a few more cover staged roll-outs).
pub const MAX_KEYS_PER_CLIENT: usize = 16;

/// Longest accepted key label.
pub const MAX_KEY_LABEL_LEN: usize = 64;

/// One of a client's keys (`clients[].keys[]`): a digest, an optional label and expiry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey<'a> {
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    pub(super) key_sha256: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    pub(super) key_md5: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    pub(super) label: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    pub(super) expires_at: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
// Names and digests borrow from the document (unless escaped): a configuration of 100,000
// clients then makes no copy of them before compiling (wasm memory never shrinks).
pub(super) struct RawClient<'a> {
    #[serde(borrow)]
    pub(super) name: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    pub(super) key_sha256: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    pub(super) key_md5: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) keys: Option<Vec<RawKey<'a>>>,
    #[serde(default)]
    pub(super) identities: Option<Vec<String>>,
    #[serde(default)]
    pub(super) requests_per_minute: Option<u32>,
    #[serde(default)]
    pub(super) tokens_per_minute: Option<u32>,
    #[serde(default)]
    pub(super) models: Option<Vec<String>>,
    #[serde(default)]
    pub(super) endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub(super) cache: Option<RawCache>,
    #[serde(default)]
    pub(super) budgets: Option<Vec<RawBudget>>,
}

/// An optional string borrowed from the document when it has no escapes (serde's own
/// `Option<Cow<str>>` always copies).
pub(super) fn borrowed_opt<'de, D>(d: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

/// A client (a team or an application) with its own key and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Operator-chosen name; used in metric labels, logs and shared-data keys (never the key).
    pub name: String,
    /// Requests admitted per minute window.
    pub requests_per_minute: u32,
    /// Tokens (prompt + completion) per minute window; `None`: no token limit.
    pub tokens_per_minute: Option<u32>,
    /// Endpoints this client may reach (its own `endpoints`, or the configuration's).
    pub endpoints: EndpointSet,
    /// A `keys` list or `identities`: all its credentials spend one Redis budget, named after
    /// the client (see [`Client::redis_id`]).
    by_name: bool,
    /// What most clients do not have (none of a `key_set` client's), boxed: a configuration of
    /// 100,000 clients holds them in every VM, 40 bytes each on wasm32 instead of 72.
    more: Option<Box<More>>,
}

/// The parts of a [`Client`] most clients do not have.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct More {
    models: Option<Vec<Pattern>>,
    budgets: Vec<crate::spend::Budget>,
}

impl Client {
    /// A client with these limits and endpoints and nothing more.
    pub fn new(
        name: String,
        requests_per_minute: u32,
        tokens_per_minute: Option<u32>,
        endpoints: EndpointSet,
    ) -> Self {
        Self {
            name,
            requests_per_minute,
            tokens_per_minute,
            endpoints,
            by_name: false,
            more: None,
        }
    }

    /// Models this client may use (exact names and globs); `None`: all.
    pub fn models(&self) -> Option<&[Pattern]> {
        self.more.as_ref().and_then(|m| m.models.as_deref())
    }

    /// The middle part of this client's Redis limiter keys, for a client with a `keys` list or
    /// `identities` (`name-<name>`, so that all of its credentials spend one budget); `None`:
    /// the MD5 hex of the presented key, as the older proxy counted (`key_sha256` or `key_md5`
    /// on the client).
    pub fn redis_id(&self) -> Option<String> {
        self.by_name.then(|| format!("name-{}", self.name))
    }

    /// Budgets over longer windows, shortest window first (at most one per window).
    pub fn budgets(&self) -> &[crate::spend::Budget] {
        self.more.as_ref().map_or(&[], |m| m.budgets.as_slice())
    }

    fn with_more(
        mut self,
        by_name: bool,
        models: Option<Vec<Pattern>>,
        budgets: Vec<crate::spend::Budget>,
    ) -> Self {
        self.by_name = by_name;
        if models.is_some() || !budgets.is_empty() {
            self.more = Some(Box::new(More { models, budgets }));
        }
        self
    }
}

/// What a client that does not say gets.
pub(super) struct Defaults {
    pub(super) endpoints: EndpointSet,
    pub(super) requests_per_minute: u32,
    pub(super) tokens_per_minute: Option<u32>,
}

/// Where a client was written: `clients[i]`, or `key_set[i]` for the clients after the
/// `json` JSON ones.
fn client_path(id: ClientId, json: usize) -> String {
    match id.checked_sub(json) {
        Some(k) => format!("key_set[{k}]"),
        None => format!("clients[{id}]"),
    }
}

/// Client ids by name hash, so that a configuration of many clients compiles in linear time;
/// the table holds ids only and compares names in the compiled clients (no copy of any name).
struct Names {
    hasher: hashbrown::DefaultHashBuilder,
    table: hashbrown::HashTable<ClientId>,
}

impl Names {
    fn with_capacity(n: usize) -> Self {
        Self {
            hasher: hashbrown::DefaultHashBuilder::default(),
            table: hashbrown::HashTable::with_capacity(n),
        }
    }

    /// Adds the name of the client about to be pushed to `clients`, or returns the id of the
    /// client that has it already.
    fn add(&mut self, name: &str, clients: &[Client]) -> Result<(), ClientId> {
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(name);
        let same = |&j: &ClientId| clients.get(j).is_some_and(|o| o.name == name);
        if let Some(&first) = self.table.find(hash, same) {
            return Err(first);
        }
        let hasher = &self.hasher;
        let rehash = |&j: &ClientId| {
            clients
                .get(j)
                .map_or(0, |o| hasher.hash_one(o.name.as_str()))
        };
        self.table.insert_unique(hash, clients.len(), rehash);
        Ok(())
    }
}

/// Compiles the clients, JSON `clients` first and then the records of `key_set` (each error
/// names `clients[i].field` or `key_set[i].field`), and indexes their key digests, in time
/// linear in their number.
pub(super) fn compile_clients(
    raw: Vec<RawClient<'_>>,
    key_set: Option<&mut dyn Windows>,
    defaults: &Defaults,
    done: &mut dyn FnMut(Phase),
) -> Result<(Vec<Client>, KeyIndex, IdentityIndex), ConfigError> {
    let json = raw.len();
    let mut packed = match key_set {
        Some(text) => Some(KeySetReader::new(text)?),
        None => None,
    };
    let total = json + packed.as_ref().map_or(0, KeySetReader::count);
    let mut clients = Vec::with_capacity(total);
    // The JSON clients' digests by client id; indexed once every client is valid. The key
    // set's go straight into the index (it holds no other kind of key and is sorted, so its
    // own duplicates are found as it is read).
    let mut digests = Vec::with_capacity(json);
    let mut keys = KeyIndex::with_capacities(json, total - json);
    let mut names = Names::with_capacity(total);
    let mut identities = IdentityIndex::default();
    for (i, c) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("clients[{i}].{f}");
        check_client_name(&c.name).map_err(|m| ConfigError::new(at("name"), m))?;
        if let Err(first) = names.add(&c.name, &clients) {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate client name {:?} (also clients[{first}])", c.name),
            ));
        }
        let endpoints = match &c.endpoints {
            None => defaults.endpoints,
            Some(list) => EndpointSet::from_names(list)
                .map_err(|(j, m)| ConfigError::new(at(&format!("endpoints[{j}]")), m))?,
        };
        let has_identities = match &c.identities {
            None => false,
            Some(list) => {
                check_count(list.len(), MAX_IDENTITIES_PER_CLIENT, "SPIFFE IDs")
                    .map_err(|m| ConfigError::new(at("identities"), m))?;
                for (k, id) in list.iter().enumerate() {
                    let field = || at(&format!("identities[{k}]"));
                    check_spiffe_id(id).map_err(|m| ConfigError::new(field(), m))?;
                    if let Err(other) = identities.insert(id, i) {
                        let what = if other == i {
                            "duplicate identity (listed twice for this client)".to_string()
                        } else {
                            format!("duplicate identity (also clients[{other}])")
                        };
                        return Err(ConfigError::new(field(), what));
                    }
                }
                true
            }
        };
        let has_key = c.key_sha256.is_some() || c.key_md5.is_some();
        // Credentials other than one key spend one budget, named after the client.
        let by_name = c.keys.is_some() || has_identities;
        match (c.keys, has_key) {
            // A client known by its certificate alone.
            (None, false) if has_identities => {}
            (None, _) => {
                let digest =
                    one_digest(c.key_sha256, c.key_md5, &at("key_sha256"), &at("key_md5"))?;
                digests.push((
                    digest,
                    KeyHolder {
                        client: i,
                        expires_at_ms: None,
                    },
                    None,
                ));
            }
            (Some(_), true) => {
                let field = if c.key_sha256.is_some() {
                    "key_sha256"
                } else {
                    "key_md5"
                };
                return Err(ConfigError::new(
                    at(field),
                    "set either `keys` (a list) or one key_sha256/key_md5 on the client, not both",
                ));
            }
            (Some(list), false) => {
                check_count(list.len(), MAX_KEYS_PER_CLIENT, "keys")
                    .map_err(|m| ConfigError::new(at("keys"), m))?;
                for (k, key) in list.into_iter().enumerate() {
                    let kat = |f: &str| at(&format!("keys[{k}].{f}"));
                    let digest = one_digest(
                        key.key_sha256,
                        key.key_md5,
                        &kat("key_sha256"),
                        &kat("key_md5"),
                    )?;
                    if let Some(label) = &key.label {
                        check_label(label).map_err(|m| ConfigError::new(kat("label"), m))?;
                    }
                    let expires_at_ms = match &key.expires_at {
                        None => None,
                        Some(t) => Some(
                            parse_rfc3339_ms(t)
                                .map_err(|m| ConfigError::new(kat("expires_at"), m))?,
                        ),
                    };
                    digests.push((
                        digest,
                        KeyHolder {
                            client: i,
                            expires_at_ms,
                        },
                        Some(k),
                    ));
                }
            }
        }
        let requests_per_minute = match c.requests_per_minute {
            Some(v) => per_minute(v).map_err(|m| ConfigError::new(at("requests_per_minute"), m))?,
            None => defaults.requests_per_minute,
        };
        let models = match c.models {
            None => None,
            Some(list) => Some(compile_patterns(&at("models"), &list)?),
        };
        let tokens_per_minute = match c.tokens_per_minute {
            Some(v) => {
                Some(per_minute(v).map_err(|m| ConfigError::new(at("tokens_per_minute"), m))?)
            }
            None => defaults.tokens_per_minute,
        };
        let budgets = match c.budgets {
            None => Vec::new(),
            Some(list) => compile_budgets(&at("budgets"), list)?,
        };
        clients.push(
            Client::new(
                c.name.into_owned(),
                requests_per_minute,
                tokens_per_minute,
                endpoints,
            )
            .with_more(by_name, models, budgets),
        );
    }
    if let Some(reader) = &mut packed {
        let mut k = 0;
        while let Some(record) = reader.next_record()? {
            let at = |f: &str| record_field(k, f);
            check_client_name(&record.name).map_err(|m| ConfigError::new(at("name"), m))?;
            if let Err(first) = names.add(&record.name, &clients) {
                return Err(ConfigError::new(
                    at("name"),
                    format!(
                        "duplicate client name {:?} (also {})",
                        record.name,
                        client_path(first, json)
                    ),
                ));
            }
            let limit = |v: u32, field: &str, default: Option<u32>| match v {
                0 => Ok(default),
                v => per_minute(v)
                    .map(Some)
                    .map_err(|m| ConfigError::new(at(field), m)),
            };
            let requests_per_minute = limit(
                record.requests_per_minute,
                "requests_per_minute",
                Some(defaults.requests_per_minute),
            )?
            .unwrap_or(defaults.requests_per_minute);
            let tokens_per_minute = limit(
                record.tokens_per_minute,
                "tokens_per_minute",
                defaults.tokens_per_minute,
            )?;
            let holder = KeyHolder {
                client: clients.len(),
                expires_at_ms: None,
            };
            let digest = Digest::from_sha256(record.key_sha256);
            if let Some(other) = keys.insert_key(digest, holder) {
                // Only another record could hold it, and records are strictly sorted.
                return Err(ConfigError::new(
                    at("key_sha256"),
                    format!(
                        "duplicate key digest (same key as {})",
                        client_path(other, json)
                    ),
                ));
            }
            clients.push(Client::new(
                record.name,
                requests_per_minute,
                tokens_per_minute,
                defaults.endpoints,
            ));
            k += 1;
        }
    }
    drop(names);
    done(Phase::Clients);

    for (digest, holder, in_list) in digests {
        if let Some(other) = keys.insert_key(digest, holder) {
            let field = match digest.kind() {
                DigestKind::Sha256 => "key_sha256",
                DigestKind::Md5 => "key_md5",
            };
            let what = if other == holder.client {
                "duplicate key digest (listed twice for this client)".to_string()
            } else {
                format!(
                    "duplicate key digest (same key as {})",
                    client_path(other, json)
                )
            };
            let i = holder.client;
            let field = match in_list {
                None => format!("clients[{i}].{field}"),
                Some(k) => format!("clients[{i}].keys[{k}].{field}"),
            };
            return Err(ConfigError::new(field, what));
        }
    }
    done(Phase::KeyIndex);
    Ok((clients, keys, identities))
}

/// A client's list of credentials holds 1 to `max` of `what`.
fn check_count(len: usize, max: usize, what: &str) -> Result<(), String> {
    if (1..=max).contains(&len) {
        Ok(())
    } else {
        Err(format!("expected 1 to {max} {what}, got {len}"))
    }
}

/// The digest of one key: exactly one of `key_sha256` and `key_md5`.
fn one_digest(
    sha256: Option<Cow<'_, str>>,
    md5: Option<Cow<'_, str>>,
    sha_field: &str,
    md5_field: &str,
) -> Result<Digest, ConfigError> {
    match (sha256, md5) {
        (Some(hex), None) => {
            Digest::from_hex(DigestKind::Sha256, &hex).map_err(|m| ConfigError::new(sha_field, m))
        }
        (None, Some(hex)) => {
            Digest::from_hex(DigestKind::Md5, &hex).map_err(|m| ConfigError::new(md5_field, m))
        }
        (Some(_), Some(_)) => Err(ConfigError::new(
            md5_field,
            "set either key_sha256 or key_md5, not both",
        )),
        (None, None) => Err(ConfigError::new(
            sha_field,
            "missing: every client needs key_sha256 (hex SHA-256 of its key), key_md5, a `keys` \
             list, or `identities`",
        )),
    }
}

/// Key labels name a key for people and tools (`tollgate keys revoke --label`); they are never
/// metric labels.
fn check_label(label: &str) -> Result<(), String> {
    let ok = !label.is_empty()
        && label.len() <= MAX_KEY_LABEL_LEN
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{label:?} is not a valid label: use 1-{MAX_KEY_LABEL_LEN} letters, digits, or \
             '-', '_', '.', ':', '@'"
        ))
    }
}

/// Parses an RFC 3339 time (`2025-07-01T00:00:00Z`, fractions of a second and a `+02:00`
/// offset allowed) into Unix milliseconds. Times before 1970 are refused.
pub fn parse_rfc3339_ms(t: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{t:?} is not an RFC 3339 time: write e.g. \"2025-07-01T00:00:00Z\" (UTC) or \
             \"2025-07-01T02:00:00+02:00\""
        )
    };
    let b = t.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let sep = |at: usize, want: &[u8]| b.get(at).is_some_and(|c| want.contains(c));
    let (Some(year), Some(month), Some(day), Some(hour), Some(min), Some(sec)) = (
        num(0, 4),
        num(5, 2),
        num(8, 2),
        num(11, 2),
        num(14, 2),
        num(17, 2),
    ) else {
        return Err(bad());
    };
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return Err(bad());
    }
    let mut at = 19;
    let mut millis = 0i64;
    if sep(at, b".") {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return Err(bad());
        }
        let frac = b.get(start..at.min(start + 3)).unwrap_or_default();
        for (i, d) in frac.iter().enumerate() {
            millis += i64::from(d - b'0') * [100, 10, 1].get(i).copied().unwrap_or(0);
        }
    }
    let offset_min = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(&s @ (b'+' | b'-')) if at + 6 == b.len() && sep(at + 3, b":") => {
            let (Some(h), Some(m)) = (num(at + 1, 2), num(at + 4, 2)) else {
                return Err(bad());
            };
            if h > 23 || m > 59 {
                return Err(bad());
            }
            let total = h * 60 + m;
            if s == b'+' {
                total
            } else {
                -total
            }
        }
        _ => return Err(bad()),
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let max_day = usize::try_from(month - 1)
        .ok()
        .and_then(|m| month_days.get(m).copied())
        .ok_or_else(bad)?;
    if day < 1 || day > max_day || hour > 23 || min > 59 || sec > 59 {
        return Err(bad());
    }
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + millis).map_err(|_| format!("{t:?} is before 1970-01-01T00:00:00Z"))
}

//! Clients: who may call, with which key, within which limits.

use std::borrow::Cow;

use serde::Deserialize;

use super::cache::RawCache;
use super::prices::{compile_budgets, RawBudget};
use super::routing::compile_patterns;
use super::{check_client_name, per_minute, ConfigError, Phase};
use crate::endpoints::EndpointSet;
use crate::keys::{Digest, DigestKind, KeyIndex};
use crate::routing::Pattern;
use crate::types::ClientId;

/// Requests per minute for a client that sets no `requests_per_minute` and a config that sets no
/// `default_requests_per_minute`.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 60;

/// Highest accepted per-minute limit; larger values are almost certainly typos.
pub const MAX_PER_MINUTE: u32 = 1_000_000_000;

/// Longest accepted client name. Names become metric labels and shared-data keys.
pub const MAX_CLIENT_NAME_LEN: usize = 64;

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
    /// Models this client may use (exact names and globs); `None`: all.
    pub models: Option<Vec<Pattern>>,
    /// Endpoints this client may reach (its own `endpoints`, or the configuration's).
    pub endpoints: EndpointSet,
    /// Budgets over longer windows, shortest window first (at most one per window).
    pub budgets: Vec<crate::spend::Budget>,
}

/// What a client that does not say gets.
pub(super) struct Defaults {
    pub(super) endpoints: EndpointSet,
    pub(super) requests_per_minute: u32,
    pub(super) tokens_per_minute: Option<u32>,
}

/// Compiles the clients (each error names `clients[i].field`) and indexes their key digests,
/// in time linear in their number.
pub(super) fn compile_clients(
    raw: Vec<RawClient<'_>>,
    defaults: &Defaults,
    done: &mut dyn FnMut(Phase),
) -> Result<(Vec<Client>, KeyIndex), ConfigError> {
    let mut clients = Vec::with_capacity(raw.len());
    // Digests by client id; indexed once every client is valid.
    let mut digests = Vec::with_capacity(raw.len());
    // Client ids by name hash, so that a configuration of many clients compiles in linear time;
    // the table holds ids only and compares names in `clients` (no copy of any name).
    use std::hash::BuildHasher as _;
    let hasher = hashbrown::DefaultHashBuilder::default();
    let mut names: hashbrown::HashTable<ClientId> = hashbrown::HashTable::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("clients[{i}].{f}");
        check_client_name(&c.name).map_err(|m| ConfigError::new(at("name"), m))?;
        let name_hash = hasher.hash_one(&*c.name);
        let same_name = |&j: &ClientId| clients.get(j).is_some_and(|o: &Client| o.name == c.name);
        if let Some(&first) = names.find(name_hash, same_name) {
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
        let digest =
            match (c.key_sha256, c.key_md5) {
                (Some(hex), None) => Digest::from_hex(DigestKind::Sha256, &hex)
                    .map_err(|m| ConfigError::new(at("key_sha256"), m))?,
                (None, Some(hex)) => Digest::from_hex(DigestKind::Md5, &hex)
                    .map_err(|m| ConfigError::new(at("key_md5"), m))?,
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        at("key_md5"),
                        "set either key_sha256 or key_md5, not both",
                    ))
                }
                (None, None) => return Err(ConfigError::new(
                    at("key_sha256"),
                    "missing: every client needs key_sha256 (hex SHA-256 of its key) or key_md5",
                )),
            };
        digests.push(digest);
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
        clients.push(Client {
            name: c.name.into_owned(),
            requests_per_minute,
            tokens_per_minute,
            models,
            endpoints,
            budgets,
        });
        let rehash = |&j: &ClientId| {
            clients
                .get(j)
                .map_or(0, |o: &Client| hasher.hash_one(o.name.as_str()))
        };
        names.insert_unique(name_hash, i, rehash);
    }
    drop(names);
    done(Phase::Clients);

    let mut keys = KeyIndex::with_capacity(digests.len());
    for (i, digest) in digests.into_iter().enumerate() {
        if let Some(other) = keys.insert(digest, i) {
            let field = match digest.kind() {
                DigestKind::Sha256 => "key_sha256",
                DigestKind::Md5 => "key_md5",
            };
            return Err(ConfigError::new(
                format!("clients[{i}].{field}"),
                format!("duplicate key digest (same key as clients[{other}])"),
            ));
        }
    }
    done(Phase::KeyIndex);
    Ok((clients, keys))
}

//! The response cache: exact-match caching of deterministic completions.
//!
//! Everything the filter needs to decide and encode, without a host:
//! - which requests may be cached ([`check`]) and what the client asked for ([`cache_control`]);
//! - the key: a SHA-256 of the scope (the client, or everyone), the path, the providers and
//!   model names the rule sends to, and the request body in a canonical form ([`canonical_json`]),
//!   so field order, whitespace and number spelling do not matter;
//! - the stored entry (status, content type, body, when it was stored and expires);
//! - the local backend: a fixed set of Envoy shared-data slots (keys are never deleted, so a
//!   new entry always replaces an old one in a bounded set of keys), 2-way set-associative;
//! - the Redis backend: `GET` and `SET ... EX` as two fixed Lua scripts through Webdis (whose
//!   ACL then allows only `EVAL`, as for the limiter), values base64url-encoded.
//!
//! A cache failure is never a failed request: every error becomes a miss (or a skipped store)
//! and is counted by reason.

use std::fmt::Write as _;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::headers::Header;
use crate::host::{CasStore, SetError};
use crate::routing::Routing;
use crate::types::{ClientId, Webdis};
use crate::webdis::{self, base64url, ReplyError, BASE64URL_ALPHABET as B64URL};

// ---------------------------------------------------------------------------------------------
// Settings (the compiled form of the configuration's `cache` objects).

/// Where entries are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Envoy shared data: per Envoy process, shared by its workers.
    Local,
    /// Redis through Webdis: shared by every Envoy replica.
    Redis,
}

impl Backend {
    /// Metric label value.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Redis => "redis",
        }
    }
}

/// Whose requests share entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Each client has its own entries (the default).
    Client,
    /// One entry serves every client that sends the same request.
    Shared,
}

/// Which `temperature` values make a request repeatable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temperature {
    /// Only an explicit `temperature` of 0 (the default).
    Zero,
    /// 0, or no `temperature` at all (the provider's default then applies).
    ZeroOrAbsent,
}

/// The cache settings of a model rule or a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Lifetime of an entry, in seconds.
    pub ttl_s: u32,
    /// Largest response body stored, in bytes.
    pub max_entry_bytes: usize,
    /// Where entries are kept.
    pub backend: Backend,
    /// Per client, or shared.
    pub scope: Scope,
    /// Which temperatures are cached.
    pub temperature: Temperature,
    /// Cache requests that declare tools (their answers may call tools with side effects).
    pub allow_tools: bool,
}

/// Default `ttl_s`: an hour.
pub const DEFAULT_TTL_S: u32 = 3600;
/// Largest accepted `ttl_s`: 30 days.
pub const MAX_TTL_S: u32 = 30 * 24 * 3600;
/// Default `max_entry_bytes`.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 64 << 10;
/// Smallest accepted `max_entry_bytes`.
pub const MIN_MAX_ENTRY_BYTES: usize = 1 << 10;
/// Largest accepted `max_entry_bytes`.
pub const MAX_MAX_ENTRY_BYTES: usize = 4 << 20;
/// Default `cache_backends.local.max_bytes`.
pub const DEFAULT_LOCAL_MAX_BYTES: u64 = 32 << 20;
/// Smallest accepted `cache_backends.local.max_bytes`.
pub const MIN_LOCAL_MAX_BYTES: u64 = 64 << 10;
/// Largest accepted `cache_backends.local.max_bytes`.
pub const MAX_LOCAL_MAX_BYTES: u64 = 1 << 30;

/// A client's own cache setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCache {
    /// No `cache` on the client: the model rule's setting applies.
    Inherit,
    /// `"enabled": false`: this client's requests are never cached.
    Off,
    /// The client's settings replace the rule's.
    On(Settings),
}

/// The layout of the local backend: `slots` shared-data keys, in sets of [`WAYS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLayout {
    /// Number of slot keys (a multiple of [`WAYS`], at least [`WAYS`]).
    pub slots: u32,
}

/// The compiled cache configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheConfig {
    /// By model rule index (empty without model routing).
    pub rules: Vec<Option<Settings>>,
    /// By client id.
    pub clients: Vec<ClientCache>,
    /// The local backend's layout, when some setting uses it.
    pub local: Option<LocalLayout>,
    /// The Redis backend's Webdis, when some setting uses it.
    pub redis: Option<Webdis>,
    /// The largest `max_entry_bytes` of any setting (bounds what is read back).
    pub max_entry_bytes: usize,
}

impl CacheConfig {
    /// Whether any request can be cached.
    pub fn enabled(&self) -> bool {
        self.rules.iter().any(Option::is_some)
            || self.clients.iter().any(|c| matches!(c, ClientCache::On(_)))
    }

    /// Whether any setting keeps its entries in `backend`.
    pub fn uses(&self, backend: Backend) -> bool {
        self.rules.iter().flatten().any(|s| s.backend == backend)
            || self
                .clients
                .iter()
                .any(|c| matches!(c, ClientCache::On(s) if s.backend == backend))
    }

    /// The settings for a client's request routed by `rule`: the client's own, else the rule's.
    pub fn settings(&self, client: ClientId, rule: usize) -> Option<&Settings> {
        match self.clients.get(client) {
            Some(ClientCache::On(s)) => Some(s),
            Some(ClientCache::Off) => None,
            Some(ClientCache::Inherit) | None => self.rules.get(rule)?.as_ref(),
        }
    }

    /// The largest Webdis reply a lookup reads: a base64url entry of the largest size, and the
    /// JSON around it.
    pub fn max_reply_bytes(&self) -> usize {
        (self.max_entry_bytes + ENTRY_OVERHEAD).div_ceil(3) * 4 + 64
    }
}

/// Slots of the local backend for a memory budget: every slot may hold an entry of
/// `max_entry_bytes` plus its header, so `slots * (max_entry_bytes + ENTRY_OVERHEAD) <=
/// max_bytes`. Rounded down to whole sets; `None` if not even one set fits.
pub fn local_slots(max_bytes: u64, max_entry_bytes: usize) -> Option<u32> {
    let per_slot = (max_entry_bytes + ENTRY_OVERHEAD) as u64;
    let fit = (max_bytes / per_slot).min(u64::from(MAX_SLOTS));
    let slots = u32::try_from(fit).ok()? / WAYS * WAYS;
    (slots >= WAYS).then_some(slots)
}

// ---------------------------------------------------------------------------------------------
// What the client asked for, and which requests are cacheable.

/// Why a lookup or a store did not happen (`tollgate_cache_skips_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The client sent `cache-control: no-cache` (or `max-age=0`, or `pragma: no-cache`): no
    /// lookup; the answer is still stored.
    NoCache,
    /// The client sent `cache-control: no-store`: not stored.
    NoStore,
    /// A streaming request.
    Stream,
    /// `n` other than 1.
    N,
    /// A `temperature` the setting does not cache.
    Temperature,
    /// `tools` or `functions` without `allow_tools`.
    Tools,
    /// A request that depends on state kept by the provider (`previous_response_id`,
    /// `conversation`).
    Stateful,
    /// The response was not a 200.
    Status,
    /// The response body was larger than `max_entry_bytes`.
    TooLarge,
    /// The response was compressed, streamed, or had an unusable content type.
    Encoding,
    /// The response ended before its end of stream (reset, client gone).
    Incomplete,
    /// The request has a query string (it reaches the provider; the key does not cover it).
    Query,
}

impl Skip {
    /// Metric label value.
    pub fn reason(self) -> &'static str {
        match self {
            Skip::NoCache => "no_cache",
            Skip::NoStore => "no_store",
            Skip::Stream => "stream",
            Skip::N => "n",
            Skip::Temperature => "temperature",
            Skip::Tools => "tools",
            Skip::Stateful => "stateful",
            Skip::Status => "status",
            Skip::TooLarge => "too_large",
            Skip::Encoding => "encoding",
            Skip::Incomplete => "incomplete",
            Skip::Query => "query",
        }
    }
}

/// The client's `cache-control` request directives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// Do not answer from the cache (`no-cache`, `max-age=0`, `pragma: no-cache`).
    pub no_cache: bool,
    /// Do not store the answer (`no-store`).
    pub no_store: bool,
}

/// Reads `cache-control` (every value, comma-separated directives, any case) and `pragma`.
pub fn cache_control(headers: &[Header]) -> CacheControl {
    let mut cc = CacheControl::default();
    for (name, value) in headers {
        let pragma = name.eq_ignore_ascii_case(b"pragma");
        if !pragma && !name.eq_ignore_ascii_case(b"cache-control") {
            continue;
        }
        for directive in value.split(|&b| b == b',') {
            let d = directive.trim_ascii().to_ascii_lowercase();
            match d.as_slice() {
                b"no-cache" => cc.no_cache = true,
                b"no-store" if !pragma => cc.no_store = true,
                b"max-age=0" if !pragma => cc.no_cache = true,
                _ => {}
            }
        }
    }
    cc
}

/// The cacheability rule: whether a request (its path and parsed body) may be answered from the
/// cache and stored, under `settings`.
///
/// Not cached: streams; `n` other than 1; `tools` or `functions` unless `allow_tools`;
/// `previous_response_id` or `conversation` (the answer depends on state at the provider);
/// and, except for `/v1/embeddings` (deterministic whatever the settings), a `temperature`
/// other than 0 (with `"temperature": "zero"`, also none at all).
pub fn check(settings: &Settings, path: &str, body: &Value) -> Result<(), Skip> {
    let field = |name: &str| body.get(name).filter(|v| !v.is_null());
    if field("stream").and_then(Value::as_bool) == Some(true) {
        return Err(Skip::Stream);
    }
    if let Some(n) = field("n") {
        if n.as_f64() != Some(1.0) {
            return Err(Skip::N);
        }
    }
    if !settings.allow_tools {
        for name in ["tools", "functions"] {
            match field(name) {
                None => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(_) => return Err(Skip::Tools),
            }
        }
    }
    if field("previous_response_id").is_some() || field("conversation").is_some() {
        return Err(Skip::Stateful);
    }
    if path != "/v1/embeddings" {
        match field("temperature") {
            None if settings.temperature == Temperature::ZeroOrAbsent => {}
            Some(t) if t.as_f64() == Some(0.0) => {}
            _ => return Err(Skip::Temperature),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The key.

/// A cache key: the SHA-256 of everything that determines the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Lowercase hex.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// The local set this key lives in.
    fn set(&self, layout: &LocalLayout) -> u32 {
        let [a, b, c, d, ..] = self.0;
        u32::from_le_bytes([a, b, c, d]) % (layout.slots / WAYS).max(1)
    }
}

/// The key of a request: `scope` (`client:<name>` or `shared`), the request path, the model
/// part (each provider of the rule with the model name it receives, in order) and the
/// canonical body without its top-level `model` (the model part says what the providers get,
/// so an alias and the model it names share entries when they route the same way), and the
/// forwarded headers that can change the answer (`varying`, sorted; see
/// [`crate::forwarding::varying`]).
pub fn key(
    scope: &str,
    path: &str,
    model: &str,
    canonical_body: &[u8],
    varying: &[(Vec<u8>, Vec<u8>)],
) -> Key {
    let mut h = Sha256::new();
    h.update(b"tollgate-cache-v2");
    for part in [
        scope.as_bytes(),
        path.as_bytes(),
        model.as_bytes(),
        canonical_body,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update((varying.len() as u64).to_le_bytes());
    for (name, value) in varying {
        for part in [name, value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    Key(h.finalize().into())
}

/// A JSON value in canonical form: object members sorted by key (byte order of their UTF-8),
/// no whitespace, strings escaped one way (serde_json's), numbers normalised so that `0`,
/// `0.0`, `-0.0` and `0e5` are all `0`, `1.50` is `1.5` and `1e2` is `100`.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out.into_bytes()
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serialising a str cannot fail; keep the output distinct if it ever did.
        Err(_) => out.push_str("\"\u{fffd}\""),
    }
}

/// Integers print as integers; a float with no fractional part (and exactly representable)
/// prints as the integer; other floats in their shortest round-trip form.
fn write_number(n: &serde_json::Number, out: &mut String) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        if f == 0.0 {
            out.push('0');
        } else if f.fract() == 0.0 && f.abs() < EXACT {
            let _ = write!(out, "{}", f as i64);
        } else {
            out.push_str(
                &serde_json::Number::from_f64(f).map_or_else(|| "0".into(), |n| n.to_string()),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Planning a request.

/// The cache's part in an admitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Look up (unless `no-cache`) and store (unless `no-store`) under this plan.
    Use(Plan),
    /// Caching is on for this request's rule or client, but this request is not cacheable.
    Bypass {
        /// The backend the setting uses (metric label).
        backend: Backend,
        /// Why.
        reason: Skip,
    },
}

/// How to look up and store one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The key.
    pub key: Key,
    /// Where.
    pub backend: Backend,
    /// Entry lifetime.
    pub ttl_s: u32,
    /// Largest body stored.
    pub max_entry_bytes: usize,
    /// Answer from the cache if the entry exists (false with `no-cache`).
    pub lookup: bool,
    /// Store a 200 answer (false with `no-store`).
    pub store: bool,
}

/// What the request flow keeps from the request headers for the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// The path without its query.
    pub path: String,
    /// The client's directives.
    pub control: CacheControl,
    /// The path has a query string: it reaches the provider and the key does not cover it, so
    /// the request is not cacheable.
    pub has_query: bool,
    /// Forwarded headers that can change the answer (see [`crate::forwarding::varying`]): part
    /// of the key.
    pub varying: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Decides the cache's part in a routed request, with the settings that apply to the client and
/// the rule (`client` names the client when the scope is per client).
pub fn decide(
    settings: &Settings,
    routing: &Routing,
    rule: usize,
    client: &str,
    info: &RequestInfo,
    requested_model: &str,
    body: &[u8],
) -> Option<Decision> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let checked = if info.has_query {
        Err(Skip::Query)
    } else {
        check(settings, &info.path, &value)
    };
    if let Err(reason) = checked {
        return Some(Decision::Bypass {
            backend: settings.backend,
            reason,
        });
    }
    if let Value::Object(members) = &mut value {
        members.remove("model");
    }
    let mut model = String::new();
    for (i, t) in routing.rules.get(rule)?.targets.iter().enumerate() {
        if i > 0 {
            model.push(',');
        }
        let provider = routing.providers.get(t.provider).map_or("", |p| &p.name);
        let _ = write!(
            model,
            "{provider}={}",
            t.model.as_deref().unwrap_or(requested_model)
        );
    }
    let scope = match settings.scope {
        Scope::Client => format!("client:{client}"),
        Scope::Shared => "shared".to_string(),
    };
    Some(Decision::Use(Plan {
        key: key(
            &scope,
            &info.path,
            &model,
            &canonical_json(&value),
            &info.varying,
        ),
        backend: settings.backend,
        ttl_s: settings.ttl_s,
        max_entry_bytes: settings.max_entry_bytes,
        lookup: !info.control.no_cache,
        store: !info.control.no_store,
    }))
}

// ---------------------------------------------------------------------------------------------
// Entries.

const ENTRY_VERSION: u8 = 1;
/// Bytes of an entry besides its body: the fixed header and a content type of at most
/// [`MAX_CONTENT_TYPE_LEN`] bytes, rounded up.
pub const ENTRY_OVERHEAD: usize = 320;
/// Longest content type stored (a longer one is not cached).
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
const HEADER_LEN: usize = 1 + 32 + 8 + 8 + 2 + 1;

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
fn decode_header(bytes: &[u8]) -> Option<(Key, u64, u64)> {
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

// ---------------------------------------------------------------------------------------------
// The local backend: a bounded set of shared-data slots.

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

fn set_slots(key: &Key, layout: &LocalLayout) -> impl Iterator<Item = u32> {
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

// ---------------------------------------------------------------------------------------------
// The Redis backend, through Webdis.

/// Reads an entry.
pub const GET_SCRIPT: &str = "return redis.call('GET', KEYS[1])";
/// Writes an entry with its lifetime in seconds.
pub const SET_SCRIPT: &str = "return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])";

/// Redis key of an entry: `tollgate:cache:v1:<hex of the key>` (a digest: neither the client
/// nor the request can be read from it).
pub fn redis_key(key: &Key) -> String {
    format!("tollgate:cache:v1:{}", key.hex())
}

fn eval(script: &str, key: &Key, args: &[&str]) -> Vec<u8> {
    let mut body = String::with_capacity(script.len() * 3 + 120);
    body.push_str("EVAL/");
    webdis::percent_encode_into(&mut body, script);
    body.push_str("/1/");
    webdis::percent_encode_into(&mut body, &redis_key(key));
    for arg in args {
        body.push('/');
        webdis::percent_encode_into(&mut body, arg);
    }
    body.into_bytes()
}

/// The Webdis request body of a lookup.
pub fn get_command(key: &Key) -> Vec<u8> {
    eval(GET_SCRIPT, key, &[])
}

/// The Webdis request body of a store: the entry base64url-encoded (plain text in Redis and
/// in Webdis's JSON replies, and nothing Webdis's URL syntax needs escaped).
pub fn set_command(entry: &Entry, ttl_s: u32) -> Vec<u8> {
    let value = base64url(&entry.encode());
    eval(SET_SCRIPT, &entry.key, &[&value, &ttl_s.to_string()])
}

/// A non-200 answer classified as the limiter classifies it (Envoy's own replies when Webdis
/// is unreachable or slow, Webdis's 403 for its ACL, ...).
fn reply_status(status: Option<u16>, body: &[u8]) -> Result<(), Error> {
    if status == Some(200) {
        return Ok(());
    }
    // `parse_reply` decides every non-200 answer from the status and Envoy's body text alone.
    Err(Error::Redis(
        webdis::parse_reply(status, body)
            .err()
            .unwrap_or(ReplyError::Malformed),
    ))
}

fn eval_reply(body: &[u8]) -> Result<Value, Error> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|_| Error::Redis(ReplyError::Malformed))?;
    let reply = value
        .get_mut("EVAL")
        .map(Value::take)
        .ok_or(Error::Redis(ReplyError::Malformed))?;
    if let Some([Value::Bool(false), msg]) = reply.as_array().map(Vec::as_slice) {
        let msg = msg.as_str().unwrap_or("unknown Redis error");
        return Err(Error::Redis(ReplyError::Redis(
            msg.chars().take(200).collect(),
        )));
    }
    Ok(reply)
}

/// Reads Webdis's answer to [`get_command`]: `Ok(None)` for a miss (no entry, or an entry of
/// another key or expired).
pub fn parse_get_reply(
    status: Option<u16>,
    body: &[u8],
    key: &Key,
    now_ms: u64,
) -> Result<Option<Entry>, Error> {
    reply_status(status, body)?;
    match eval_reply(body)? {
        Value::Null => Ok(None),
        Value::String(s) => {
            let entry = base64url_decode(&s)
                .and_then(|b| Entry::decode(&b))
                .ok_or(Error::Corrupt)?;
            Ok(entry.answers(key, now_ms).then_some(entry))
        }
        _ => Err(Error::Redis(ReplyError::Malformed)),
    }
}

/// Reads Webdis's answer to [`set_command`] (`{"EVAL":[true,"OK"]}`).
pub fn parse_set_reply(status: Option<u16>, body: &[u8]) -> Result<(), Error> {
    reply_status(status, body)?;
    match eval_reply(body)? {
        Value::Array(items) if items == [Value::Bool(true), Value::from("OK")] => Ok(()),
        Value::String(s) if s == "OK" => Ok(()),
        _ => Err(Error::Redis(ReplyError::Malformed)),
    }
}

/// Decodes [`base64url`]; `None` for any other input.
pub fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    let value = |c: u8| B64URL.iter().position(|&x| x == c).map(|v| v as u32);
    let bytes = input.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 2);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let [_, a, b, c] = n.to_be_bytes();
        out.push(a);
        if chunk.len() > 2 {
            out.push(b);
        }
        if chunk.len() > 3 {
            out.push(c);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};

    /// [`super::decide`] with the settings, routing and name looked up as the request path does.
    fn decide(
        c: &Config,
        client: usize,
        rule: usize,
        info: &RequestInfo,
        model: &str,
        body: &[u8],
    ) -> Option<Decision> {
        let Mode::Routed(routing) = &c.mode else {
            return None;
        };
        let name = &c.client(client)?.name;
        super::decide(
            c.cache.settings(client, rule)?,
            routing,
            rule,
            name,
            info,
            model,
            body,
        )
    }
    use crate::keys::{Digest, DigestKind};
    use crate::limiter::tests::FakeStore;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000_000;

    fn settings() -> Settings {
        Settings {
            ttl_s: 60,
            max_entry_bytes: 4096,
            backend: Backend::Local,
            scope: Scope::Client,
            temperature: Temperature::Zero,
            allow_tools: false,
        }
    }

    fn canon(s: &str) -> String {
        String::from_utf8(canonical_json(&serde_json::from_str(s).unwrap())).unwrap()
    }

    #[test]
    fn canonical_form_ignores_order_whitespace_and_number_spelling() {
        let a =
            canon(r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#);
        let b = canon(
            "{ \"messages\" : [ { \"content\" : \"hi\" , \"role\" : \"user\" } ],\n\t\"temperature\": 0.0, \"model\": \"m\" }",
        );
        assert_eq!(a, b);
        assert_eq!(
            a,
            r#"{"messages":[{"content":"hi","role":"user"}],"model":"m","temperature":0}"#
        );
        for (x, y) in [
            ("0", "-0.0"),
            ("0", "0e10"),
            ("100", "1e2"),
            ("1.5", "1.50"),
            ("0.25", "2.5e-1"),
            ("12345678901234567890", "12345678901234567890"),
        ] {
            assert_eq!(canon(x), canon(y), "{x} vs {y}");
        }
        assert_eq!(canon("1.5"), "1.5");
        assert_eq!(canon("1e300"), canon("10E+299"));
        assert_ne!(canon("1e300"), canon("1e299"));
        // Escapes are normalised; different strings stay different.
        assert_eq!(canon(r#""\u00e9\/""#), canon("\"\u{e9}/\""));
        assert_ne!(canon(r#""a""#), canon(r#""A""#));
        // Array order matters (it is the conversation).
        assert_ne!(canon("[1,2]"), canon("[2,1]"));
        // Keys sort by their bytes, nested objects too.
        assert_eq!(
            canon(r#"{"b":{"y":1,"x":2},"a":null,"B":true}"#),
            r#"{"B":true,"a":null,"b":{"x":2,"y":1}}"#
        );
    }

    #[test]
    fn cacheability_rule() {
        let s = settings();
        let ok = |v: Value| check(&s, "/v1/chat/completions", &v);
        assert_eq!(ok(json!({"model":"m","temperature":0})), Ok(()));
        assert_eq!(
            ok(json!({"model":"m","temperature":0.0,"n":1,"stream":false,"tools":[]})),
            Ok(())
        );
        assert_eq!(ok(json!({"model":"m"})), Err(Skip::Temperature));
        assert_eq!(
            ok(json!({"model":"m","temperature":null})),
            Err(Skip::Temperature)
        );
        assert_eq!(
            ok(json!({"model":"m","temperature":0.7})),
            Err(Skip::Temperature)
        );
        assert_eq!(
            ok(json!({"model":"m","temperature":"0"})),
            Err(Skip::Temperature)
        );
        assert_eq!(
            ok(json!({"temperature":0,"stream":true})),
            Err(Skip::Stream)
        );
        assert_eq!(ok(json!({"temperature":0,"n":2})), Err(Skip::N));
        assert_eq!(ok(json!({"temperature":0,"n":"1"})), Err(Skip::N));
        assert_eq!(
            ok(json!({"temperature":0,"tools":[{"type":"function"}]})),
            Err(Skip::Tools)
        );
        assert_eq!(
            ok(json!({"temperature":0,"functions":[{"name":"f"}]})),
            Err(Skip::Tools)
        );
        assert_eq!(
            ok(json!({"temperature":0,"previous_response_id":"r"})),
            Err(Skip::Stateful)
        );
        let tools = Settings {
            allow_tools: true,
            temperature: Temperature::ZeroOrAbsent,
            ..settings()
        };
        assert_eq!(
            check(
                &tools,
                "/v1/chat/completions",
                &json!({"tools":[{"type":"function"}]})
            ),
            Ok(())
        );
        assert_eq!(
            check(&tools, "/v1/chat/completions", &json!({"temperature":1})),
            Err(Skip::Temperature)
        );
        // Embeddings are deterministic: no temperature needed.
        assert_eq!(check(&s, "/v1/embeddings", &json!({"input":"x"})), Ok(()));
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<Header> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(cache_control(&h(&[])), CacheControl::default());
        let cc = cache_control(&h(&[("cache-control", "No-Cache")]));
        assert!(cc.no_cache && !cc.no_store);
        let cc = cache_control(&h(&[("Cache-Control", "private, no-store")]));
        assert!(!cc.no_cache && cc.no_store);
        let cc = cache_control(&h(&[
            ("cache-control", "max-age=0"),
            ("cache-control", "no-store"),
        ]));
        assert!(cc.no_cache && cc.no_store);
        let cc = cache_control(&h(&[("pragma", "no-cache")]));
        assert!(cc.no_cache && !cc.no_store);
        let cc = cache_control(&h(&[("cache-control", "max-age=60, no-transform")]));
        assert_eq!(cc, CacheControl::default());
    }

    fn routed(cache: &str, client_cache: &str) -> Config {
        let sha = |k: &[u8]| Digest::of_key(DigestKind::Sha256, k).to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{}"{client_cache}}},{{"name":"b","key_sha256":"{}"}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}},{{"name":"q","cluster":"d","api_key_env":"K"}}],
                "models":[{{"match":"gpt-4.1","providers":["p","q"]{cache}}},
                          {{"match":"fast","providers":["q"],"upstream_model":"deepseek-chat"{cache}}},
                          {{"match":"deepseek-chat","providers":["q"]{cache}}},
                          {{"match":"other","providers":["p"]}}]}}"#,
            sha(b"ka"),
            sha(b"kb")
        );
        Config::parse(json.as_bytes(), &|_| Some("sk".into())).unwrap()
    }

    fn info(path: &str) -> RequestInfo {
        RequestInfo {
            path: path.into(),
            control: CacheControl::default(),
            has_query: false,
            varying: Vec::new(),
        }
    }

    fn plan(c: &Config, client: usize, model: &str, body: &str) -> Option<Decision> {
        let Mode::Routed(r) = &c.mode else { panic!() };
        let rule = r.rule_for(model).unwrap();
        decide(
            c,
            client,
            rule,
            &info("/v1/chat/completions"),
            model,
            body.as_bytes(),
        )
    }

    fn key_of(d: Option<Decision>) -> Key {
        match d {
            Some(Decision::Use(p)) => p.key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_depend_on_what_determines_the_answer() {
        let c = routed(r#","cache":{}"#, "");
        let body =
            r#"{"model":"gpt-4.1","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
        let k = key_of(plan(&c, 0, "gpt-4.1", body));
        // Semantically equal JSON: the same key.
        let reordered = r#"{"messages":[{"content":"hi","role":"user"}], "temperature":0.0, "model":"gpt-4.1"}"#;
        assert_eq!(key_of(plan(&c, 0, "gpt-4.1", reordered)), k);
        // Another client (client scope), another prompt, another model: another key.
        assert_ne!(key_of(plan(&c, 1, "gpt-4.1", body)), k);
        assert_ne!(key_of(plan(&c, 0, "gpt-4.1", &body.replace("hi", "ho"))), k);
        let fast = body.replace("gpt-4.1", "fast");
        assert_ne!(key_of(plan(&c, 0, "fast", &fast)), k);
        // An alias and the model it names share entries when they route the same way.
        let direct = body.replace("gpt-4.1", "deepseek-chat");
        assert_eq!(
            key_of(plan(&c, 0, "fast", &fast)),
            key_of(plan(&c, 0, "deepseek-chat", &direct))
        );
        // Another endpoint: another key.
        let Mode::Routed(r) = &c.mode else { panic!() };
        let rule = r.rule_for("gpt-4.1").unwrap();
        let other_path = decide(
            &c,
            0,
            rule,
            &info("/v1/completions"),
            "gpt-4.1",
            body.as_bytes(),
        );
        assert_ne!(key_of(other_path), k);
        // No cache on the rule: nothing to do.
        assert_eq!(
            plan(&c, 0, "other", &body.replace("gpt-4.1", "other")),
            None
        );
        // Not cacheable: a bypass with its reason.
        assert_eq!(
            plan(&c, 0, "gpt-4.1", r#"{"model":"gpt-4.1"}"#),
            Some(Decision::Bypass {
                backend: Backend::Local,
                reason: Skip::Temperature
            })
        );
        // Shared scope: every client gets the same key, and it is not the client-scoped one.
        let shared = routed(r#","cache":{"scope":"shared"}"#, "");
        let s0 = key_of(plan(&shared, 0, "gpt-4.1", body));
        assert_eq!(key_of(plan(&shared, 1, "gpt-4.1", body)), s0);
        assert_ne!(s0, k);
        // Forwarded headers that can change the answer are part of the key; a query string,
        // which the key does not cover, makes the request uncacheable.
        let Mode::Routed(r) = &shared.mode else {
            panic!()
        };
        let rule = r.rule_for("gpt-4.1").unwrap();
        let with = |has_query: bool, varying: Vec<(Vec<u8>, Vec<u8>)>| {
            let info = RequestInfo {
                has_query,
                varying,
                ..info("/v1/chat/completions")
            };
            decide(&shared, 0, rule, &info, "gpt-4.1", body.as_bytes())
        };
        assert_eq!(key_of(with(false, Vec::new())), s0);
        let beta = vec![(b"openai-beta".to_vec(), b"x".to_vec())];
        assert_ne!(key_of(with(false, beta)), s0);
        assert_eq!(
            with(true, Vec::new()),
            Some(Decision::Bypass {
                backend: Backend::Local,
                reason: Skip::Query
            })
        );
    }

    #[test]
    fn client_settings_override_the_rules() {
        let c = routed(
            "",
            r#","cache":{"backend":"local","temperature":"zero_or_absent"}"#,
        );
        let body = r#"{"model":"other"}"#;
        assert!(matches!(plan(&c, 0, "other", body), Some(Decision::Use(_))));
        assert_eq!(plan(&c, 1, "other", body), None);
        let off = routed(r#","cache":{}"#, r#","cache":{"enabled":false}"#);
        let body = r#"{"model":"gpt-4.1","temperature":0}"#;
        assert_eq!(plan(&off, 0, "gpt-4.1", body), None);
        assert!(matches!(
            plan(&off, 1, "gpt-4.1", body),
            Some(Decision::Use(_))
        ));
    }

    #[test]
    fn configuration_errors_name_the_field() {
        let sha = Digest::of_key(DigestKind::Sha256, b"k").to_hex();
        let parse = |rule_cache: &str, extra: &str| {
            let json = format!(
                r#"{{"clients":[{{"name":"a","key_sha256":"{sha}"}}],
                    "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}}],
                    "models":[{{"match":"m","providers":["p"],"cache":{rule_cache}}}]{extra}}}"#
            );
            Config::parse(json.as_bytes(), &|n| {
                (n != "MISSING").then(|| "u:p".to_string())
            })
        };
        let c = parse("{}", "").unwrap();
        assert_eq!(
            c.cache.rules[0],
            Some(Settings {
                ttl_s: 3600,
                max_entry_bytes: 65536,
                ..settings()
            })
        );
        assert_eq!(c.cache.local, Some(LocalLayout { slots: 508 }));
        assert_eq!(c.cache.redis, None);
        assert!(c.cache.uses(Backend::Local) && !c.cache.uses(Backend::Redis));
        let c = parse(
            r#"{"backend":"redis"}"#,
            r#","cache_backends":{"redis":{"cluster":"w","timeout_ms":30,"basic_auth_env":"A"}}"#,
        )
        .unwrap();
        let r = c.cache.redis.clone().unwrap();
        assert_eq!(
            (r.cluster.as_str(), r.authority.as_str(), r.timeout_ms),
            ("w", "w", 30)
        );
        assert!(r.authorization.is_some());
        assert_eq!(c.cache.local, None);
        assert!(c.cache.uses(Backend::Redis) && !c.cache.uses(Backend::Local));
        // The Redis limiter's Webdis serves the cache too.
        let c = parse(
            r#"{"backend":"redis"}"#,
            r#","limiter":{"backend":"redis","cluster":"lim"}"#,
        )
        .unwrap();
        assert_eq!(c.cache.redis.unwrap().cluster, "lim");
        // Disabled: no setting, and nothing to size.
        let c = parse(r#"{"enabled":false}"#, "").unwrap();
        assert_eq!(c.cache.rules[0], None);
        assert!(!c.cache.enabled());
        for (rule_cache, extra, want) in [
            (r#"{"ttl_s":0}"#, "", "models[0].cache.ttl_s: must be between 1"),
            (r#"{"max_entry_bytes":10}"#, "", "models[0].cache.max_entry_bytes: must be between 1024"),
            (r#"{"backend":"memcached"}"#, "", "models[0].cache.backend: unknown variant"),
            (r#"{"scope":"team"}"#, "", "models[0].cache.scope: unknown variant"),
            (r#"{"temperature":"low"}"#, "", "models[0].cache.temperature: unknown variant"),
            (r#"{"tll_s":5}"#, "", "models[0].cache.tll_s: unknown field"),
            (r#"{"backend":"redis"}"#, "", "models[0].cache.backend: \"redis\" needs a Webdis"),
            (r#"{"max_entry_bytes":65536}"#, r#","cache_backends":{"local":{"max_bytes":65536}}"#,
             "cache_backends.local.max_bytes: 65536 bytes hold fewer than 2 entries of models[0].cache.max_entry_bytes"),
            ("{}", r#","cache_backends":{"local":{"max_bytes":5}}"#, "cache_backends.local.max_bytes: must be between"),
            ("{}", r#","cache_backends":{"redis":{"cluster":""}}"#, "cache_backends.redis.cluster: must name"),
            ("{}", r#","cache_backends":{"redis":{"cluster":"w","timeout_ms":0}}"#, "cache_backends.redis.timeout_ms: must be between"),
            ("{}", r#","cache_backends":{"redis":{"cluster":"w","basic_auth_env":"MISSING"}}"#, "cache_backends.redis.basic_auth_env: environment variable"),
            ("{}", r#","cache_backends":{"memcached":{}}"#, "cache_backends.memcached: unknown field"),
        ] {
            let e = parse(rule_cache, extra).unwrap_err().to_string();
            assert!(e.starts_with(want), "{rule_cache} {extra}: {e}");
        }
        // Caching needs the body, so model routing.
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{sha}","cache":{{}}}}],"upstream":{{"api_key_env":"K"}}}}"#
        );
        let e = Config::parse(json.as_bytes(), &|_| Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("clients[0].cache: response caching needs model routing"),
            "{e}"
        );
    }

    fn entry(key: Key, stored: u64, body: &[u8]) -> Entry {
        Entry {
            key,
            stored_at_ms: stored,
            expires_at_ms: stored + 60_000,
            status: 200,
            content_type: b"application/json".to_vec(),
            body: body.to_vec(),
        }
    }

    fn k(i: u32) -> Key {
        key("s", "/p", "m", &i.to_le_bytes(), &[])
    }

    #[test]
    fn entries_round_trip_and_garbage_is_no_entry() {
        let e = entry(k(1), NOW, b"{\"x\":1}");
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        let empty_body = entry(k(2), NOW, b"");
        assert_eq!(Entry::decode(&empty_body.encode()), Some(empty_body));
        let bytes = e.encode();
        for cut in 0..HEADER_LEN + 16 {
            assert_eq!(Entry::decode(bytes.get(..cut).unwrap()), None, "{cut}");
        }
        let mut other_version = bytes.clone();
        other_version[0] = 9;
        assert_eq!(Entry::decode(&other_version), None);
        assert!(e.answers(&k(1), NOW + 59_999));
        assert!(!e.answers(&k(1), NOW + 60_000));
        assert!(!e.answers(&k(2), NOW));
        assert_eq!(e.age_s(NOW + 2_500), 2);
    }

    #[test]
    fn new_entries_follow_the_store_rule() {
        let p = Plan {
            key: k(1),
            backend: Backend::Local,
            ttl_s: 10,
            max_entry_bytes: 8,
            lookup: true,
            store: true,
        };
        let e = Entry::new(&p, NOW, 200, b"application/json", b"12345678".to_vec()).unwrap();
        assert_eq!(e.expires_at_ms, NOW + 10_000);
        assert_eq!(Entry::new(&p, NOW, 500, b"a", vec![]), Err(Skip::Status));
        assert_eq!(
            Entry::new(&p, NOW, 200, b"a", vec![0; 9]),
            Err(Skip::TooLarge)
        );
        assert_eq!(
            Entry::new(&p, NOW, 200, b"a\nb", vec![]),
            Err(Skip::Encoding)
        );
        assert_eq!(
            Entry::new(&p, NOW, 200, &[b'a'; 256], vec![]),
            Err(Skip::Encoding)
        );
    }

    #[test]
    fn slot_math() {
        assert_eq!(local_slots(64 << 10, 1024), Some(48));
        assert_eq!(local_slots(32 << 20, 64 << 10), Some(508));
        assert_eq!(local_slots(4096, 4096), None);
        assert_eq!(local_slots(1 << 30, 1024), Some(MAX_SLOTS));
        for (max_bytes, entry) in [(65536u64, 1024usize), (1 << 20, 4 << 20), (5000, 1000)] {
            if let Some(slots) = local_slots(max_bytes, entry) {
                assert_eq!(slots % WAYS, 0);
                assert!(u64::from(slots) * (entry + ENTRY_OVERHEAD) as u64 <= max_bytes);
            }
        }
        assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Same]), 1);
        assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Empty]), 1);
        assert_eq!(choose_way(&[SlotState::Expired, SlotState::Empty]), 1);
        assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Expired]), 1);
        assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Live(3)]), 1);
        assert_eq!(choose_way(&[SlotState::Live(3), SlotState::Live(3)]), 0);
    }

    #[test]
    fn local_store_hits_misses_and_expires() {
        let s = FakeStore::default();
        let layout = LocalLayout { slots: 8 };
        assert_eq!(local_get(&s, &layout, &k(1), NOW), Ok(None));
        let e = entry(k(1), NOW, b"answer");
        local_put(&s, &layout, &e, NOW).unwrap();
        assert_eq!(local_get(&s, &layout, &k(1), NOW + 1), Ok(Some(e.clone())));
        assert_eq!(
            local_get(&s, &layout, &k(1), NOW + 60_000),
            Ok(None),
            "expired"
        );
        assert_eq!(local_get(&s, &layout, &k(2), NOW), Ok(None));
        // Storing the same key again replaces its entry in place.
        let newer = entry(k(1), NOW + 5, b"newer");
        local_put(&s, &layout, &newer, NOW + 5).unwrap();
        assert_eq!(local_get(&s, &layout, &k(1), NOW + 6), Ok(Some(newer)));
        // Store failures are errors, never panics; contention is bounded.
        s.fail_get.set(true);
        assert_eq!(local_get(&s, &layout, &k(1), NOW), Err(Error::Store));
        s.fail_get.set(false);
        s.conflicts.set(STORE_ATTEMPTS);
        assert_eq!(local_put(&s, &layout, &e, NOW), Err(Error::Contention));
        s.conflicts.set(1);
        assert_eq!(local_put(&s, &layout, &e, NOW), Ok(()));
        s.fail_set.set(true);
        assert_eq!(local_put(&s, &layout, &e, NOW), Err(Error::Store));
    }

    #[test]
    fn eviction_reuses_a_fixed_set_of_keys() {
        let s = FakeStore::default();
        let layout = LocalLayout { slots: 16 };
        let allowed: Vec<String> = (0..layout.slots).map(slot_key).collect();
        for i in 0..2000u32 {
            let at = NOW + u64::from(i);
            local_put(&s, &layout, &entry(k(i), at, &[0u8; 100]), at).unwrap();
            let map = s.map.borrow();
            assert!(map.len() <= layout.slots as usize);
            assert!(
                map.keys().all(|key| allowed.contains(key)),
                "{:?}",
                map.keys()
            );
        }
        // The newest entry is always there; the oldest of a full set went first.
        let last = NOW + 1999;
        assert_eq!(
            local_get(&s, &layout, &k(1999), last)
                .unwrap()
                .unwrap()
                .stored_at_ms,
            last
        );
        let held = (0..2000u32)
            .filter(|i| local_get(&s, &layout, &k(*i), last).unwrap().is_some())
            .count();
        assert!(
            held <= layout.slots as usize && held >= layout.slots as usize / 2,
            "{held}"
        );
    }

    #[test]
    fn lru_within_a_set() {
        // One set of two ways: the older of two live entries is replaced.
        let s = FakeStore::default();
        let layout = LocalLayout { slots: WAYS };
        local_put(&s, &layout, &entry(k(1), NOW, b"1"), NOW).unwrap();
        local_put(&s, &layout, &entry(k(2), NOW + 1, b"2"), NOW + 1).unwrap();
        local_put(&s, &layout, &entry(k(3), NOW + 2, b"3"), NOW + 2).unwrap();
        let at = NOW + 3;
        assert_eq!(local_get(&s, &layout, &k(1), at), Ok(None));
        assert!(local_get(&s, &layout, &k(2), at).unwrap().is_some());
        assert!(local_get(&s, &layout, &k(3), at).unwrap().is_some());
        // An expired entry goes before a live older one.
        local_put(&s, &layout, &entry(k(4), NOW + 70_000, b"4"), NOW + 70_000).unwrap();
        assert_eq!(s.map.borrow().len(), 2);
    }

    #[test]
    fn webdis_commands() {
        let key = k(7);
        let get = String::from_utf8(get_command(&key)).unwrap();
        assert!(
            get.starts_with("EVAL/return%20redis%2Ecall%28%27GET%27"),
            "{get}"
        );
        assert!(
            get.ends_with(&format!("/1/tollgate%3Acache%3Av1%3A{}", key.hex())),
            "{get}"
        );
        let e = entry(key, NOW, b"{\"a\":\"/.+\"}");
        let set = String::from_utf8(set_command(&e, 3600)).unwrap();
        assert_eq!(set.matches('/').count(), 5, "{set}");
        assert!(set.ends_with("/3600"), "{set}");
        assert!(!set.contains('.'));
        let value = set.rsplit('/').nth(1).unwrap();
        assert_eq!(Entry::decode(&base64url_decode(value).unwrap()), Some(e));
        let redis = Webdis {
            cluster: "webdis".into(),
            authority: "webdis.svc".into(),
            timeout_ms: 50,
            authorization: Some("Basic x".into()),
        };
        let call = crate::request::webdis_call(&redis, get_command(&key));
        assert_eq!(call.cluster, "webdis");
        assert_eq!(call.timeout_ms, 50);
        assert!(call.headers.contains(&(":authority", "webdis.svc".into())));
        assert!(call.headers.contains(&("authorization", "Basic x".into())));
        assert!(!format!("{redis:?}").contains("Basic x"));
    }

    #[test]
    fn webdis_replies() {
        let key = k(1);
        let e = entry(key, NOW, b"body");
        let stored = format!(r#"{{"EVAL":"{}"}}"#, base64url(&e.encode()));
        assert_eq!(
            parse_get_reply(Some(200), stored.as_bytes(), &key, NOW),
            Ok(Some(e))
        );
        assert_eq!(
            parse_get_reply(Some(200), stored.as_bytes(), &k(2), NOW),
            Ok(None),
            "another key"
        );
        assert_eq!(
            parse_get_reply(Some(200), stored.as_bytes(), &key, NOW + 60_000),
            Ok(None)
        );
        assert_eq!(
            parse_get_reply(Some(200), br#"{"EVAL":null}"#, &key, NOW),
            Ok(None)
        );
        assert_eq!(
            parse_get_reply(Some(200), br#"{"EVAL":"not base64!"}"#, &key, NOW),
            Err(Error::Corrupt)
        );
        assert_eq!(
            parse_get_reply(Some(200), br#"{"EVAL":"aGVsbG8"}"#, &key, NOW),
            Err(Error::Corrupt)
        );
        assert_eq!(
            parse_get_reply(Some(200), br#"{"EVAL":[false,"WRONGTYPE x"]}"#, &key, NOW),
            Err(Error::Redis(ReplyError::Redis("WRONGTYPE x".into())))
        );
        assert_eq!(
            parse_get_reply(None, b"", &key, NOW),
            Err(Error::Redis(ReplyError::Unavailable))
        );
        assert_eq!(
            parse_get_reply(Some(403), b"", &key, NOW)
                .unwrap_err()
                .reason(),
            "forbidden"
        );
        assert_eq!(
            parse_get_reply(Some(504), b"upstream request timeout", &key, NOW)
                .unwrap_err()
                .reason(),
            "timeout"
        );
        assert_eq!(
            parse_get_reply(Some(503), b"x", &key, NOW)
                .unwrap_err()
                .reason(),
            "status"
        );
        for bad in [
            &b""[..],
            b"[]",
            b"{}",
            br#"{"GET":null}"#,
            br#"{"EVAL":5}"#,
            br#"{"EVAL":[1,2]}"#,
        ] {
            assert_eq!(
                parse_get_reply(Some(200), bad, &key, NOW),
                Err(Error::Redis(ReplyError::Malformed)),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_set_reply(Some(200), br#"{"EVAL":[true,"OK"]}"#),
            Ok(())
        );
        assert_eq!(parse_set_reply(Some(200), br#"{"EVAL":"OK"}"#), Ok(()));
        assert_eq!(
            parse_set_reply(Some(200), br#"{"EVAL":[true,"NO"]}"#)
                .unwrap_err()
                .reason(),
            "malformed"
        );
        assert_eq!(
            parse_set_reply(Some(200), br#"{"EVAL":[false,"ERR x"]}"#)
                .unwrap_err()
                .reason(),
            "redis_error"
        );
        assert_eq!(
            parse_set_reply(None, b"").unwrap_err().reason(),
            "unavailable"
        );
    }

    #[test]
    fn base64url_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("\u{fb}\u{ff}", "w7vDvw"),
        ] {
            assert_eq!(base64url(plain.as_bytes()), enc);
            assert_eq!(base64url_decode(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        for bad in ["A", "Zm9v=", "Zm+v", "Z m9"] {
            assert_eq!(base64url_decode(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn base64url_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(base64url_decode(&base64url(&bytes)), Some(bytes));
        }

        #[test]
        fn parsers_never_panic(status in proptest::option::of(0u16..600), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_get_reply(status, &body, &k(1), NOW);
            let _ = parse_set_reply(status, &body);
            let _ = Entry::decode(&body);
            let _ = base64url_decode(&String::from_utf8_lossy(&body));
        }

        #[test]
        fn canonical_form_is_stable_under_reserialisation(
            pairs in proptest::collection::btree_map("[a-zA-Z_]{1,8}", -1000i64..1000, 0..8),
            text in "\\PC{0,20}",
        ) {
            let mut v = serde_json::Map::new();
            for (k, n) in &pairs {
                v.insert(k.clone(), json!(n));
            }
            v.insert("text".into(), json!(text));
            let value = Value::Object(v);
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let once = canonical_json(&value);
            let again = canonical_json(&serde_json::from_str(&pretty).unwrap());
            prop_assert_eq!(&once, &again);
            let reparsed: Value = serde_json::from_slice(&once).unwrap();
            prop_assert_eq!(canonical_json(&reparsed), once);
        }
    }
}

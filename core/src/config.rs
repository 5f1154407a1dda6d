//! Plugin configuration: the JSON an operator writes, and the compiled form the filter uses.
//!
//! Parsing is strict (unknown fields are errors) and every error names the field it is about,
//! e.g. `clients[3].key_sha256: expected 64 hex characters`, because the only place an operator
//! sees it is an Envoy log line or `envoy --mode validate`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use crate::cache::{self, CacheConfig, ClientCache, LocalLayout, Settings};
use crate::endpoints::{EndpointSet, Kind};
use crate::keys::{Digest, DigestKind, KeyIndex};
use crate::routing::{Pattern, Provider, Routing, Rule, Target};
pub use crate::types::{ClientId, Webdis};

/// Requests per minute for a client that sets no `requests_per_minute` and a config that sets no
/// `default_requests_per_minute`.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 60;

/// Highest accepted per-minute limit; larger values are almost certainly typos.
pub const MAX_PER_MINUTE: u32 = 1_000_000_000;

/// Longest accepted client name. Names become metric labels and shared-data keys.
pub const MAX_CLIENT_NAME_LEN: usize = 64;

/// A configuration error: the dotted path of the offending field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the field, e.g. `clients[3].key_sha256`; empty for the document itself.
    pub field: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// The document as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig<'a> {
    #[serde(borrow)]
    clients: Vec<RawClient<'a>>,
    #[serde(default)]
    default_requests_per_minute: Option<u32>,
    #[serde(default)]
    default_tokens_per_minute: Option<u32>,
    #[serde(default)]
    upstream: Option<RawUpstream>,
    #[serde(default)]
    limiter: Option<RawLimiter>,
    #[serde(default)]
    providers: Option<Vec<RawProvider>>,
    #[serde(default)]
    models: Option<Vec<RawRule>>,
    #[serde(default)]
    default_provider: Option<String>,
    #[serde(default)]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    cache_backends: Option<RawCacheBackends>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    forward_headers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    cluster: String,
    api_key_env: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: String,
    providers: Vec<String>,
    #[serde(default)]
    upstream_model: Option<String>,
    #[serde(default)]
    upstream_models: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    cache: Option<RawCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
// Names and digests borrow from the document (unless escaped): a configuration of 100,000
// clients then makes no copy of them before compiling (wasm memory never shrinks).
struct RawClient<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    key_sha256: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_opt")]
    key_md5: Option<Cow<'a, str>>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u32>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    cache: Option<RawCache>,
}

/// An optional string borrowed from the document when it has no escapes (serde's own
/// `Option<Cow<str>>` always copies).
fn borrowed_opt<'de, D>(d: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(d)?.map(|b| b.0))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    api_key_env: String,
}

// A plain struct rather than an internally tagged enum: serde buffers tagged enums and then
// loses the path of errors inside them (`limiter: unknown variant` instead of
// `limiter.on_error: unknown variant`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimiter {
    backend: RawBackend,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u32>,
    #[serde(default)]
    basic_auth_env: Option<String>,
    #[serde(default)]
    on_error: Option<OnError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawBackend {
    Local,
    Redis,
}

// ---------------------------------------------------------------------------------------------
// The compiled form.

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
}

/// Default `limiter.timeout_ms` of the Redis backend.
pub const DEFAULT_REDIS_TIMEOUT_MS: u32 = 100;

/// Largest accepted `limiter.timeout_ms`: a limiter slower than this is down, not slow.
pub const MAX_REDIS_TIMEOUT_MS: u32 = 10_000;

/// Where limit counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimiterBackend {
    /// Envoy shared data: one budget per Envoy process, shared by its workers.
    Local,
    /// Redis through Webdis: one budget shared by every Envoy replica.
    Redis(RedisLimiter),
}

impl LimiterBackend {
    /// Metric label value.
    pub fn name(&self) -> &'static str {
        match self {
            LimiterBackend::Local => "local",
            LimiterBackend::Redis(_) => "redis",
        }
    }
}

/// What to do with a request when the Redis limiter cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Admit it (fail open).
    Allow,
    /// Refuse it with a 503 (fail closed).
    Deny,
    /// Count it in the local (shared-data) limiter instead, until Redis answers again.
    Local,
}

/// The Redis (Webdis) limiter's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisLimiter {
    /// Where the counters are.
    pub webdis: Webdis,
    /// Failure mode.
    pub on_error: OnError,
}

/// How the provider is called.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Name of the environment variable the provider key came from (for messages; never the key).
    pub api_key_env: String,
    /// The complete `authorization` header value sent to the provider: `Bearer <provider key>`.
    pub authorization: String,
}

impl fmt::Debug for Upstream {
    // The provider key must never reach a log line, even a debug one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("api_key_env", &self.api_key_env)
            .field("authorization", &"<redacted>")
            .finish()
    }
}

/// A validated, immutable configuration, built once per `on_configure`.
#[derive(Debug)]
pub struct Config {
    /// Clients in configuration order; [`ClientId`] indexes this.
    pub clients: Vec<Client>,
    /// Digest lookup from a presented key to its client.
    pub keys: KeyIndex,
    /// How requests reach the provider(s).
    pub mode: Mode,
    /// Limit counter backend.
    pub limiter: LimiterBackend,
    /// The response cache (see [`crate::cache`]).
    pub cache: CacheConfig,
    /// Request headers forwarded besides [`crate::forwarding::FORWARDED`], lowercase.
    pub forward_headers: Vec<String>,
}

/// One provider for everything, or routing by model.
#[derive(Debug)]
pub enum Mode {
    /// `upstream`: every request goes to the one route of the Envoy config with this key.
    Single(Upstream),
    /// `providers` + `models`: the body's `model` picks the providers.
    Routed(Routing),
}

/// A step of compiling a configuration, reported by [`Config::parse_observed`] as it ends, so
/// that a caller with a clock (`tollgate config check --timings`) can time each one. Every step
/// is linear in the size of the configuration: no per-client work looks at the other clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The JSON document read into its fields (syntax, types, unknown fields).
    Json,
    /// Every client checked: name (and duplicate names), digest, limits, endpoints.
    Clients,
    /// The key index built from the digests (and duplicate digests found).
    KeyIndex,
    /// Everything else: upstream or providers and models, limiter, cache.
    Rest,
}

impl Phase {
    /// Short name, as `--timings` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Json => "json",
            Phase::Clients => "clients",
            Phase::KeyIndex => "key_index",
            Phase::Rest => "rest",
        }
    }
}

impl Config {
    /// Parses and validates a plugin configuration. `env` looks up environment variables (the
    /// filter passes `std::env::var`; tests pass a fake).
    pub fn parse(json: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::parse_observed(json, env, &mut |_| {})
    }

    /// [`Config::parse`], calling `done` as each [`Phase`] ends (not for a phase that failed).
    pub fn parse_observed(
        json: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
        done: &mut dyn FnMut(Phase),
    ) -> Result<Self, ConfigError> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::new(
                "",
                "the plugin configuration is empty; expected a JSON object with at least \
                 `clients` and `upstream`",
            ));
        }
        // serde reads a struct from an array too, fields in order.
        if json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(ConfigError::new(
                "",
                "the plugin configuration must be a JSON object, not an array",
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(json);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            let inner = e.inner();
            if (inner.is_syntax() || inner.is_eof()) && !is_json(json) {
                // Broken JSON has no field yet; its line and column are what helps.
                return ConfigError::new("", format!("not valid JSON: {inner}"));
            }
            let path = e.path().to_string();
            let field = if path == "." || path == "?" {
                String::new()
            } else {
                path
            };
            let message = strip_position(&inner.to_string());
            // serde_json's error for an enum field given a number, array or null, reported
            // as a syntax error at that value.
            let message = if message == "expected value" {
                "invalid type: expected a string".to_string()
            } else {
                message
            };
            ConfigError::new(field, message)
        })?;
        // Only whitespace may follow (a second object would otherwise be ignored).
        de.end()
            .map_err(|e| ConfigError::new("", format!("not valid JSON: {e}")))?;
        done(Phase::Json);
        compile(raw, env, done)
    }

    /// The client with this id.
    pub fn client(&self, id: ClientId) -> Option<&Client> {
        self.clients.get(id)
    }
}

/// Whether `json` is one JSON value, whatever its shape.
fn is_json(json: &[u8]) -> bool {
    std::str::from_utf8(json)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
}

/// serde_json appends "at line 1 column 42"; the path says more, and the column of a
/// one-line embedded JSON string helps nobody.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message.get(..at).unwrap_or(message).to_string(),
        None => message.to_string(),
    }
}

fn compile(
    mut raw: RawConfig<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    done: &mut dyn FnMut(Phase),
) -> Result<Config, ConfigError> {
    // The cache settings are compiled last, once the routing and the limiter are known.
    let client_caches: Vec<Option<RawCache>> =
        raw.clients.iter_mut().map(|c| c.cache.take()).collect();
    let rule_caches: Vec<Option<RawCache>> = raw
        .models
        .iter_mut()
        .flatten()
        .map(|r| r.cache.take())
        .collect();
    let cache_backends = raw.cache_backends.take();
    let default_rpm = match raw.default_requests_per_minute {
        Some(v) => check_per_minute("default_requests_per_minute", v)?,
        None => DEFAULT_REQUESTS_PER_MINUTE,
    };
    let default_tpm = match raw.default_tokens_per_minute {
        Some(v) => Some(check_per_minute("default_tokens_per_minute", v)?),
        None => None,
    };

    if raw.clients.is_empty() {
        return Err(ConfigError::new(
            "clients",
            "at least one client is required (without clients every request is refused)",
        ));
    }

    let default_endpoints = match &raw.endpoints {
        None => EndpointSet::defaults(),
        Some(names) => EndpointSet::from_names(names)
            .map_err(|(j, m)| ConfigError::new(format!("endpoints[{j}]"), m))?,
    };
    let forward_headers = compile_forward_headers(raw.forward_headers.take().unwrap_or_default())?;

    let mut clients = Vec::with_capacity(raw.clients.len());
    // Digests by client id; indexed once every client is valid.
    let mut digests = Vec::with_capacity(raw.clients.len());
    // Client ids by name hash, so that a configuration of many clients compiles in linear time;
    // the table holds ids only and compares names in `clients` (no copy of any name).
    use std::hash::BuildHasher as _;
    let hasher = hashbrown::DefaultHashBuilder::default();
    let mut names: hashbrown::HashTable<ClientId> =
        hashbrown::HashTable::with_capacity(raw.clients.len());
    for (i, c) in raw.clients.into_iter().enumerate() {
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
            None => default_endpoints,
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
            None => default_rpm,
        };
        let models = match c.models {
            None => None,
            Some(list) => Some(compile_patterns(&at("models"), &list)?),
        };
        let tokens_per_minute = match c.tokens_per_minute {
            Some(v) => {
                Some(per_minute(v).map_err(|m| ConfigError::new(at("tokens_per_minute"), m))?)
            }
            None => default_tpm,
        };
        clients.push(Client {
            name: c.name.into_owned(),
            requests_per_minute,
            tokens_per_minute,
            models,
            endpoints,
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

    let mode = match (raw.upstream, raw.providers) {
        (Some(upstream), None) => {
            for (field, set) in [
                ("models", raw.models.is_some()),
                ("default_provider", raw.default_provider.is_some()),
                ("max_body_bytes", raw.max_body_bytes.is_some()),
            ] {
                if set {
                    return Err(ConfigError::new(
                        field,
                        "only valid with `providers` (model routing); `upstream` sends every \
                         request to one provider",
                    ));
                }
            }
            Mode::Single(compile_upstream(upstream, env)?)
        }
        (None, Some(providers)) => Mode::Routed(compile_routing(
            providers,
            raw.models,
            raw.default_provider,
            raw.max_body_bytes,
            env,
        )?),
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "upstream",
                "set either `upstream` (one provider) or `providers` and `models` (routing), \
                 not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                "upstream",
                "missing: set `upstream` (one provider) or `providers` and `models` (routing)",
            ))
        }
    };
    if let Mode::Single(_) = mode {
        if let Some(i) = clients.iter().position(|c| c.models.is_some()) {
            return Err(ConfigError::new(
                format!("clients[{i}].models"),
                "model allow-lists need model routing (`providers` and `models`)",
            ));
        }
    }
    if let Mode::Routed(routing) = &mode {
        // Account endpoints go to the default provider: without one they could reach nothing.
        if routing.default_provider.is_none() {
            let field = if default_endpoints.has_kind(Kind::Account) {
                Some("endpoints".to_string())
            } else {
                clients
                    .iter()
                    .position(|c| c.endpoints.has_kind(Kind::Account))
                    .map(|i| format!("clients[{i}].endpoints"))
            };
            if let Some(field) = field {
                return Err(ConfigError::new(
                    field,
                    "account endpoints (files, batches, ...) are sent to `default_provider`; \
                     set one, or grant only inference endpoints",
                ));
            }
        }
    }
    let limiter = match raw.limiter {
        None => LimiterBackend::Local,
        Some(l) => compile_limiter(l, env)?,
    };
    let cache = compile_cache(
        rule_caches,
        client_caches,
        cache_backends,
        &mode,
        &limiter,
        env,
    )?;

    done(Phase::Rest);
    Ok(Config {
        clients,
        keys,
        mode,
        limiter,
        cache,
        forward_headers,
    })
}

/// `forward_headers`: more request headers a provider may receive. Never a credential,
/// `x-tollgate-*`, `x-envoy-*`, a pseudo-header or `host`.
fn compile_forward_headers(raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for (i, name) in raw.into_iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        let token = !lower.is_empty()
            && lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token
            || crate::headers::must_strip(lower.as_bytes())
            || lower.starts_with("x-envoy-")
            || matches!(
                lower.as_str(),
                "host" | "cookie" | "forwarded" | "openai-organization" | "openai-project"
            )
        {
            return Err(ConfigError::new(
                format!("forward_headers[{i}]"),
                "not a header a client may send to a provider (invalid name, a credential, \
                 x-tollgate-*, x-envoy-*, host, cookie, forwarded, or an account selector: \
                 set those per provider in `providers[].headers`)",
            ));
        }
        if !out.contains(&lower) {
            out.push(lower);
        }
    }
    Ok(out)
}

/// Default `max_body_bytes`: the size of Envoy's default connection buffer.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// Largest accepted `max_body_bytes`.
pub const MAX_MAX_BODY_BYTES: u64 = 64 << 20;

fn compile_patterns(field: &str, list: &[String]) -> Result<Vec<Pattern>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            if p.is_empty()
                || p.len() > crate::body::MAX_MODEL_LEN
                || p.chars().any(char::is_control)
            {
                Err(ConfigError::new(
                    format!("{field}[{i}]"),
                    "must be a model name or glob of 1-256 printable characters",
                ))
            } else {
                Ok(Pattern::new(p))
            }
        })
        .collect()
}

fn compile_routing(
    raw_providers: Vec<RawProvider>,
    raw_rules: Option<Vec<RawRule>>,
    default_provider: Option<String>,
    max_body_bytes: Option<u64>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Routing, ConfigError> {
    if raw_providers.is_empty() {
        return Err(ConfigError::new(
            "providers",
            "at least one provider is required",
        ));
    }
    let mut providers: Vec<Provider> = Vec::with_capacity(raw_providers.len());
    for (i, p) in raw_providers.into_iter().enumerate() {
        let at = |f: &str| format!("providers[{i}].{f}");
        check_client_name(&p.name)
            .map_err(|m| ConfigError::new(at("name"), m.replace("client name", "provider name")))?;
        if let Some(first) = providers.iter().position(|x| x.name == p.name) {
            return Err(ConfigError::new(
                at("name"),
                format!(
                    "duplicate provider name {:?} (also providers[{first}])",
                    p.name
                ),
            ));
        }
        if p.cluster.is_empty() {
            return Err(ConfigError::new(
                at("cluster"),
                "must name an Envoy cluster",
            ));
        }
        let authorization = provider_key(&at("api_key_env"), &p.api_key_env, env)?;
        if let Some(a) = &p.authority {
            if !is_header_value(a) || a.is_empty() || a.contains(' ') {
                return Err(ConfigError::new(at("authority"), "must be a host name"));
            }
        }
        let path_prefix = p.path_prefix.unwrap_or_default();
        if !path_prefix.is_empty()
            && (!path_prefix.starts_with('/')
                || path_prefix.ends_with('/')
                || !is_header_value(&path_prefix))
        {
            return Err(ConfigError::new(
                at("path_prefix"),
                "must start with '/' and not end with '/', e.g. \"/openai\"",
            ));
        }
        let mut headers = Vec::new();
        for (name, value) in p.headers.unwrap_or_default() {
            let lower = name.to_ascii_lowercase();
            let token = !lower.is_empty()
                && lower
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !token || crate::headers::must_strip(lower.as_bytes()) || lower == "host" {
                return Err(ConfigError::new(
                    format!("providers[{i}].headers.{name}"),
                    "not a header Tollgate may set (invalid name, a credential header, or x-tollgate-*)",
                ));
            }
            if !is_header_value(&value) {
                return Err(ConfigError::new(
                    format!("providers[{i}].headers.{name}"),
                    "the value has control characters",
                ));
            }
            headers.push((lower, value));
        }
        providers.push(Provider {
            name: p.name,
            cluster: p.cluster,
            authorization,
            api_key_env: p.api_key_env,
            authority: p.authority,
            path_prefix,
            headers,
        });
    }
    let find = |name: &str| providers.iter().position(|p| p.name == name);

    let raw_rules = raw_rules.unwrap_or_default();
    if raw_rules.is_empty() {
        return Err(ConfigError::new(
            "models",
            "at least one model rule is required with `providers`",
        ));
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(raw_rules.len());
    for (i, r) in raw_rules.into_iter().enumerate() {
        let at = |f: &str| format!("models[{i}].{f}");
        let pattern = compile_patterns(&at("match"), std::slice::from_ref(&r.pattern))
            .map_err(|e| ConfigError::new(at("match"), e.message))?
            .pop()
            .ok_or_else(|| ConfigError::new(at("match"), "missing"))?;
        if let Some(first) = rules.iter().position(|x| x.pattern == pattern) {
            return Err(ConfigError::new(
                at("match"),
                format!("duplicate rule {:?} (also models[{first}])", r.pattern),
            ));
        }
        if r.providers.is_empty() {
            return Err(ConfigError::new(
                at("providers"),
                "at least one provider is required",
            ));
        }
        let overrides = r.upstream_models.unwrap_or_default();
        for name in overrides.keys() {
            if !r.providers.contains(name) {
                return Err(ConfigError::new(
                    format!("models[{i}].upstream_models.{name}"),
                    "not one of this rule's providers",
                ));
            }
        }
        let mut targets = Vec::with_capacity(r.providers.len());
        for (j, name) in r.providers.iter().enumerate() {
            let provider = find(name).ok_or_else(|| {
                ConfigError::new(
                    format!("models[{i}].providers[{j}]"),
                    format!("unknown provider {name:?}"),
                )
            })?;
            if targets.iter().any(|t: &Target| t.provider == provider) {
                return Err(ConfigError::new(
                    format!("models[{i}].providers[{j}]"),
                    format!("provider {name:?} is listed twice"),
                ));
            }
            let model = overrides.get(name).or(r.upstream_model.as_ref()).cloned();
            if let Some(m) = &model {
                if m.is_empty() || m.chars().any(char::is_control) {
                    return Err(ConfigError::new(
                        at("upstream_model"),
                        "must be a model name",
                    ));
                }
            }
            targets.push(Target { provider, model });
        }
        // Every attempt of a request shares one header map: a provider without `authority`
        // after one with it would inherit the previous attempt's host.
        let with_authority = targets
            .iter()
            .filter(|t| {
                providers
                    .get(t.provider)
                    .is_some_and(|p| p.authority.is_some())
            })
            .count();
        if with_authority != 0 && with_authority != targets.len() {
            return Err(ConfigError::new(
                at("providers"),
                "the providers of one rule must all set `authority`, or none of them (a \
                 fallback would otherwise reach its provider with the previous one's host)",
            ));
        }
        if pattern.is_glob() && (r.upstream_model.is_some() || !overrides.is_empty()) {
            return Err(ConfigError::new(
                at("upstream_model"),
                "a glob rule cannot rename models (which of the matched models would it be?)",
            ));
        }
        rules.push(Rule { pattern, targets });
    }
    let default_provider = match default_provider {
        None => None,
        Some(name) => Some(find(&name).ok_or_else(|| {
            ConfigError::new("default_provider", format!("unknown provider {name:?}"))
        })?),
    };
    let max_body_bytes = match max_body_bytes {
        None => DEFAULT_MAX_BODY_BYTES,
        Some(v) if (1024..=MAX_MAX_BODY_BYTES).contains(&v) => {
            usize::try_from(v).unwrap_or(DEFAULT_MAX_BODY_BYTES)
        }
        Some(v) => {
            return Err(ConfigError::new(
                "max_body_bytes",
                format!("must be between 1024 and {MAX_MAX_BODY_BYTES}, got {v}"),
            ))
        }
    };
    Ok(Routing {
        providers,
        rules,
        default_provider,
        max_body_bytes,
    })
}

fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..=0x7e).contains(&b))
}

fn compile_upstream(
    raw: RawUpstream,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Upstream, ConfigError> {
    let authorization = provider_key("upstream.api_key_env", &raw.api_key_env, env)?;
    Ok(Upstream {
        authorization,
        api_key_env: raw.api_key_env,
    })
}

/// `Bearer <key>` from the named environment variable.
fn provider_key(
    field: &str,
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::new(field, "must name an environment variable"));
    }
    let key = env(name).unwrap_or_default();
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::new(
            field,
            format!(
                "environment variable {name:?} is not set or empty in the wasm VM; set it in \
                 Envoy's environment and list it in vm_config.environment_variables.host_env_keys"
            ),
        ));
    }
    // The value goes into a header; never echo it, only say what is wrong.
    if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ConfigError::new(
            field,
            format!(
                "environment variable {name:?} holds characters not allowed in an API key \
                 (spaces, control or non-ASCII characters)"
            ),
        ));
    }
    Ok(format!("Bearer {key}"))
}

fn compile_limiter(
    raw: RawLimiter,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<LimiterBackend, ConfigError> {
    if raw.backend == RawBackend::Local {
        let redis_only = [
            ("cluster", raw.cluster.is_some()),
            ("authority", raw.authority.is_some()),
            ("timeout_ms", raw.timeout_ms.is_some()),
            ("basic_auth_env", raw.basic_auth_env.is_some()),
            ("on_error", raw.on_error.is_some()),
        ];
        if let Some((field, _)) = redis_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError::new(
                format!("limiter.{field}"),
                "only valid with \"backend\": \"redis\"",
            ));
        }
        return Ok(LimiterBackend::Local);
    }
    let Some(cluster) = raw.cluster else {
        return Err(ConfigError::new(
            "limiter.cluster",
            "required with \"backend\": \"redis\": the Envoy cluster of the Webdis service",
        ));
    };
    Ok(LimiterBackend::Redis(RedisLimiter {
        webdis: compile_webdis(
            "limiter",
            cluster,
            raw.authority,
            raw.timeout_ms,
            raw.basic_auth_env,
            env,
        )?,
        // Local fallback keeps serving and still bounds spend (per replica) while Redis is down.
        on_error: raw.on_error.unwrap_or(OnError::Local),
    }))
}

/// A Webdis service's settings, validated; errors name `<at>.<field>`.
fn compile_webdis(
    at: &str,
    cluster: String,
    authority: Option<String>,
    timeout_ms: Option<u32>,
    basic_auth_env: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Webdis, ConfigError> {
    if cluster.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.cluster"),
            "must name the Envoy cluster of the Webdis service",
        ));
    }
    let authority = authority.unwrap_or_else(|| cluster.clone());
    if authority.is_empty() || !authority.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ConfigError::new(
            format!("{at}.authority"),
            "must be a host name (visible ASCII, no spaces)",
        ));
    }
    let timeout_ms = timeout_ms.unwrap_or(DEFAULT_REDIS_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_REDIS_TIMEOUT_MS {
        return Err(ConfigError::new(
            format!("{at}.timeout_ms"),
            format!("must be between 1 and {MAX_REDIS_TIMEOUT_MS}, got {timeout_ms}"),
        ));
    }
    let authorization = match basic_auth_env {
        None => None,
        Some(name) => {
            let value = env(&name).unwrap_or_default();
            if !value.contains(':') || !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
                return Err(ConfigError::new(
                    format!("{at}.basic_auth_env"),
                    format!(
                        "environment variable {name:?} must hold `user:password` for Webdis \
                         (set it and list it in vm_config.environment_variables.host_env_keys)"
                    ),
                ));
            }
            Some(crate::webdis::basic_authorization(&value))
        }
    };
    Ok(Webdis {
        cluster,
        authority,
        timeout_ms,
        authorization,
    })
}

// ---------------------------------------------------------------------------------------------
// The response cache: `cache` on model rules and clients, `cache_backends` for the stores.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    ttl_s: Option<u32>,
    #[serde(default)]
    max_entry_bytes: Option<u64>,
    #[serde(default)]
    backend: Option<RawBackend>,
    #[serde(default)]
    scope: Option<RawScope>,
    #[serde(default)]
    temperature: Option<RawTemperature>,
    #[serde(default)]
    allow_tools: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawScope {
    Client,
    Shared,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawTemperature {
    Zero,
    ZeroOrAbsent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheBackends {
    #[serde(default)]
    local: Option<RawLocalCache>,
    #[serde(default)]
    redis: Option<RawRedisCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalCache {
    #[serde(default)]
    max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedisCache {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u32>,
    #[serde(default)]
    basic_auth_env: Option<String>,
}

/// `None` for a setting that is present but disabled.
fn compile_cache_settings(field: &str, raw: RawCache) -> Result<Option<Settings>, ConfigError> {
    let at = |f: &str| format!("{field}.{f}");
    let ttl_s = raw.ttl_s.unwrap_or(cache::DEFAULT_TTL_S);
    if ttl_s == 0 || ttl_s > cache::MAX_TTL_S {
        return Err(ConfigError::new(
            at("ttl_s"),
            format!("must be between 1 and {}, got {ttl_s}", cache::MAX_TTL_S),
        ));
    }
    let max_entry_bytes = match raw.max_entry_bytes {
        None => cache::DEFAULT_MAX_ENTRY_BYTES,
        Some(v) => match usize::try_from(v) {
            Ok(v) if (cache::MIN_MAX_ENTRY_BYTES..=cache::MAX_MAX_ENTRY_BYTES).contains(&v) => v,
            _ => {
                return Err(ConfigError::new(
                    at("max_entry_bytes"),
                    format!(
                        "must be between {} and {}, got {v}",
                        cache::MIN_MAX_ENTRY_BYTES,
                        cache::MAX_MAX_ENTRY_BYTES
                    ),
                ))
            }
        },
    };
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    Ok(Some(Settings {
        ttl_s,
        max_entry_bytes,
        backend: match raw.backend {
            None | Some(RawBackend::Local) => cache::Backend::Local,
            Some(RawBackend::Redis) => cache::Backend::Redis,
        },
        scope: match raw.scope {
            None | Some(RawScope::Client) => cache::Scope::Client,
            Some(RawScope::Shared) => cache::Scope::Shared,
        },
        temperature: match raw.temperature {
            None | Some(RawTemperature::Zero) => cache::Temperature::Zero,
            Some(RawTemperature::ZeroOrAbsent) => cache::Temperature::ZeroOrAbsent,
        },
        allow_tools: raw.allow_tools.unwrap_or(false),
    }))
}

fn compile_cache(
    rule_caches: Vec<Option<RawCache>>,
    client_caches: Vec<Option<RawCache>>,
    backends: Option<RawCacheBackends>,
    mode: &Mode,
    limiter: &LimiterBackend,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CacheConfig, ConfigError> {
    let mut used: Vec<(String, Settings)> = Vec::new();
    let mut rules = Vec::with_capacity(rule_caches.len());
    for (i, raw) in rule_caches.into_iter().enumerate() {
        let field = format!("models[{i}].cache");
        let settings = match raw {
            None => None,
            Some(raw) => compile_cache_settings(&field, raw)?,
        };
        if let Some(s) = &settings {
            used.push((field, s.clone()));
        }
        rules.push(settings);
    }
    let mut clients = Vec::with_capacity(client_caches.len());
    for (i, raw) in client_caches.into_iter().enumerate() {
        let field = format!("clients[{i}].cache");
        let Some(raw) = raw else {
            clients.push(ClientCache::Inherit);
            continue;
        };
        if let Mode::Single(_) = mode {
            return Err(ConfigError::new(
                field,
                "response caching needs model routing (`providers` and `models`): only then \
                 is the request body read",
            ));
        }
        match compile_cache_settings(&field, raw)? {
            Some(s) => {
                used.push((field, s.clone()));
                clients.push(ClientCache::On(s));
            }
            None => clients.push(ClientCache::Off),
        }
    }
    let (raw_local, raw_redis) = match backends {
        Some(b) => (b.local, b.redis),
        None => (None, None),
    };

    let local_max_bytes = match raw_local.and_then(|l| l.max_bytes) {
        None => cache::DEFAULT_LOCAL_MAX_BYTES,
        Some(v) if (cache::MIN_LOCAL_MAX_BYTES..=cache::MAX_LOCAL_MAX_BYTES).contains(&v) => v,
        Some(v) => {
            return Err(ConfigError::new(
                "cache_backends.local.max_bytes",
                format!(
                    "must be between {} and {}, got {v}",
                    cache::MIN_LOCAL_MAX_BYTES,
                    cache::MAX_LOCAL_MAX_BYTES
                ),
            ))
        }
    };
    let local_entry = used
        .iter()
        .filter(|(_, s)| s.backend == cache::Backend::Local)
        .max_by_key(|(_, s)| s.max_entry_bytes);
    let local = match local_entry {
        None => None,
        Some((field, s)) => {
            let slots = cache::local_slots(local_max_bytes, s.max_entry_bytes).ok_or_else(|| {
                ConfigError::new(
                    "cache_backends.local.max_bytes",
                    format!(
                        "{local_max_bytes} bytes hold fewer than {} entries of {field}.max_entry_bytes \
                         ({} bytes, plus {} bytes of header each)",
                        cache::WAYS,
                        s.max_entry_bytes,
                        cache::ENTRY_OVERHEAD
                    ),
                )
            })?;
            Some(LocalLayout { slots })
        }
    };

    let redis = match raw_redis {
        Some(r) => Some(compile_webdis(
            "cache_backends.redis",
            r.cluster,
            r.authority,
            r.timeout_ms,
            r.basic_auth_env,
            env,
        )?),
        // The limiter's Webdis, unless the cache has its own.
        None => match limiter {
            LimiterBackend::Redis(l) => Some(l.webdis.clone()),
            LimiterBackend::Local => None,
        },
    };
    if let Some((field, _)) = used
        .iter()
        .find(|(_, s)| s.backend == cache::Backend::Redis)
    {
        if redis.is_none() {
            return Err(ConfigError::new(
                format!("{field}.backend"),
                "\"redis\" needs a Webdis: set `cache_backends.redis` (or use the Redis \
                 limiter, whose Webdis the cache then shares)",
            ));
        }
    }
    let max_entry_bytes = used
        .iter()
        .map(|(_, s)| s.max_entry_bytes)
        .max()
        .unwrap_or(0);
    Ok(CacheConfig {
        rules,
        clients,
        local,
        redis,
        max_entry_bytes,
    })
}

fn check_per_minute(field: &str, v: u32) -> Result<u32, ConfigError> {
    per_minute(v).map_err(|m| ConfigError::new(field, m))
}

/// A per-minute limit, or what is wrong with it (the caller names the field, only on error).
fn per_minute(v: u32) -> Result<u32, String> {
    if v == 0 || v > MAX_PER_MINUTE {
        return Err(format!("must be between 1 and {MAX_PER_MINUTE}, got {v}"));
    }
    Ok(v)
}

/// Client names become metric label values (`.` would split them) and shared-data keys.
fn check_client_name(name: &str) -> Result<(), String> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    let ok_rest = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > MAX_CLIENT_NAME_LEN || !ok_first || !ok_rest {
        return Err(format!(
            "{name:?} is not a valid client name: use 1-{MAX_CLIENT_NAME_LEN} letters, digits, \
             '-' or '_', starting with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO_SHA: &str = "5a2e6c8e5a0b0c8e6f3f2d3c6c6a0f4c9d7f1b2a3c4d5e6f708192a3b4c5d6e7";

    fn env(name: &str) -> Option<String> {
        (name == "PROVIDER_KEY").then(|| "sk-provider-secret".to_string())
    }

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::parse(json.as_bytes(), &env)
    }

    fn minimal(clients: &str) -> String {
        format!(r#"{{"clients":{clients},"upstream":{{"api_key_env":"PROVIDER_KEY"}}}}"#)
    }

    fn err(json: &str) -> String {
        parse(json).unwrap_err().to_string()
    }

    #[test]
    fn endpoints_and_forwarded_headers_are_validated() {
        let client = format!(r#"{{"name":"a","key_sha256":"{DEMO_SHA}"}}"#);
        let with = |extra: &str, client_extra: &str| {
            format!(
                r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"{client_extra}}}],
                    "upstream":{{"api_key_env":"PROVIDER_KEY"}}{extra}}}"#
            )
        };
        let c = parse(&minimal(&format!("[{client}]"))).unwrap();
        assert_eq!(c.clients[0].endpoints, EndpointSet::defaults());
        assert!(c.forward_headers.is_empty());
        let c = parse(&with(
            r#","endpoints":["embeddings"],"forward_headers":["X-Custom","x-custom"]"#,
            r#","endpoints":["inference","files"]"#,
        ))
        .unwrap();
        assert!(c.clients[0].endpoints.has_kind(Kind::Account));
        assert_eq!(c.forward_headers, vec!["x-custom".to_string()]);
        assert!(err(&with(r#","endpoints":["chat"]"#, "")).starts_with("endpoints[0]: unknown"));
        assert!(err(&with("", r#","endpoints":["files","nope"]"#))
            .starts_with("clients[0].endpoints[1]: unknown endpoint \"nope\""));
        for bad in [
            "authorization",
            "x-api-key",
            "x-tollgate-route",
            "x-envoy-original-path",
            "openai-organization",
            "host",
            "a b",
            "",
        ] {
            let e = err(&with(&format!(r#","forward_headers":["{bad}"]"#), ""));
            assert!(e.starts_with("forward_headers[0]: "), "{bad}: {e}");
        }
        // Account endpoints with model routing need a default provider to go to.
        let routed = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","endpoints":["files"]}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"PROVIDER_KEY"}}],
                "models":[{{"match":"m","providers":["p"]}}]}}"#
        );
        assert!(err(&routed).starts_with("clients[0].endpoints: account endpoints"));
        let with_default = routed.replace(r#""models""#, r#""default_provider":"p","models""#);
        assert!(parse(&with_default).is_ok());
    }

    #[test]
    fn minimal_config_uses_defaults() {
        let c = parse(&minimal(&format!(
            r#"[{{"name":"team-a","key_sha256":"{DEMO_SHA}"}}]"#
        )))
        .unwrap();
        assert_eq!(c.clients[0].name, "team-a");
        assert_eq!(
            c.clients[0].requests_per_minute,
            DEFAULT_REQUESTS_PER_MINUTE
        );
        assert_eq!(c.limiter, LimiterBackend::Local);
        let Mode::Single(upstream) = &c.mode else {
            panic!("{:?}", c.mode)
        };
        assert_eq!(upstream.authorization, "Bearer sk-provider-secret");
    }

    #[test]
    fn per_client_limit_overrides_default() {
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","requests_per_minute":5}},
                {{"name":"b","key_md5":"0123456789abcdef0123456789ABCDEF"}}],
               "default_requests_per_minute":7,
               "upstream":{{"api_key_env":"PROVIDER_KEY"}},
               "limiter":{{"backend":"local"}}}}"#
        );
        let c = parse(&json).unwrap();
        assert_eq!(c.clients[0].requests_per_minute, 5);
        assert_eq!(c.clients[1].requests_per_minute, 7);
    }

    #[test]
    fn unknown_fields_are_named() {
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","rpm":5}}],
               "upstream":{{"api_key_env":"PROVIDER_KEY"}}}}"#
        );
        let e = err(&json);
        assert!(e.starts_with("clients[0].rpm: unknown field `rpm`"), "{e}");
        let e = err(r#"{"clients":[],"upstream":{"api_key_env":"X"},"extra":1}"#);
        assert!(e.starts_with("extra: unknown field `extra`"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","requests_per_minute":"5"}}],
               "upstream":{{"api_key_env":"PROVIDER_KEY"}}}}"#
        );
        let e = err(&json);
        assert!(
            e.starts_with("clients[0].requests_per_minute: invalid type"),
            "{e}"
        );
        let e = err(
            r#"{"clients":[],"upstream":{"api_key_env":"PROVIDER_KEY"},"default_requests_per_minute":-1}"#,
        );
        assert!(
            e.starts_with("default_requests_per_minute: invalid value"),
            "{e}"
        );
    }

    #[test]
    fn bad_digests_are_named() {
        let e = err(&minimal(r#"[{"name":"a","key_sha256":"abc"}]"#));
        assert_eq!(
            e,
            "clients[0].key_sha256: expected 64 hex characters (the SHA-256 of the whole key), got 3 characters"
        );
        let e = err(&minimal(&format!(
            r#"[{{"name":"a","key_sha256":"{}"}}]"#,
            "g".repeat(64)
        )));
        assert!(
            e.starts_with("clients[0].key_sha256: not hexadecimal"),
            "{e}"
        );
        let e = err(&minimal(r#"[{"name":"a"}]"#));
        assert!(e.starts_with("clients[0].key_sha256: missing"), "{e}");
        let e = err(&minimal(&format!(
            r#"[{{"name":"a","key_sha256":"{DEMO_SHA}","key_md5":"{}"}}]"#,
            "0".repeat(32)
        )));
        assert!(e.starts_with("clients[0].key_md5: set either"), "{e}");
    }

    #[test]
    fn duplicates_are_errors() {
        let e = err(&minimal(&format!(
            r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}},{{"name":"a","key_md5":"{}"}}]"#,
            "0".repeat(32)
        )));
        assert_eq!(
            e,
            "clients[1].name: duplicate client name \"a\" (also clients[0])"
        );
        let upper = DEMO_SHA.to_uppercase();
        let e = err(&minimal(&format!(
            r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}},{{"name":"b","key_sha256":"{upper}"}}]"#
        )));
        assert_eq!(
            e,
            "clients[1].key_sha256: duplicate key digest (same key as clients[0])"
        );
    }

    /// Many clients (the compile is linear: hash tables, no scan of the other clients), and
    /// duplicates far apart are still named by both positions.
    #[test]
    fn many_clients_and_distant_duplicates() {
        let entry = |i: usize, name: &str| {
            let hex = crate::keys::Digest::of_key(DigestKind::Sha256, format!("k{i}").as_bytes())
                .to_hex();
            format!(r#"{{"name":"{name}","key_sha256":"{hex}","requests_per_minute":600}}"#)
        };
        let n = 20_000;
        let mut list: Vec<String> = (0..n).map(|i| entry(i, &format!("c{i}"))).collect();
        let ok = parse(&minimal(&format!("[{}]", list.join(",")))).unwrap();
        assert_eq!((ok.clients.len(), ok.keys.len()), (n, n));
        assert_eq!(ok.keys.lookup(b"k19999"), Some(19_999));
        assert_eq!(ok.clients[19_999].requests_per_minute, 600);

        list.push(entry(n, "c7"));
        assert_eq!(
            err(&minimal(&format!("[{}]", list.join(",")))),
            format!("clients[{n}].name: duplicate client name \"c7\" (also clients[7])")
        );
        list.pop();
        list.push(entry(7, "another"));
        assert_eq!(
            err(&minimal(&format!("[{}]", list.join(",")))),
            format!("clients[{n}].key_sha256: duplicate key digest (same key as clients[7])")
        );
    }

    #[test]
    fn escaped_names_and_digests_are_read_too() {
        // Borrowed from the document when possible, copied when escaped: the same result.
        let hex = format!("\\u0035{}", &DEMO_SHA[1..]);
        let c = parse(&minimal(&format!(
            r#"[{{"name":"\u0061b","key_sha256":"{hex}"}}]"#
        )))
        .unwrap();
        assert_eq!(c.clients[0].name, "ab");
        assert_eq!(
            c.keys.len(),
            1,
            "the escaped digest is the demo digest: {DEMO_SHA}"
        );
        let e = err(&minimal(r#"[{"name":"a","key_md5":7}]"#));
        assert!(e.starts_with("clients[0].key_md5: invalid type"), "{e}");
    }

    #[test]
    fn phases_are_reported_in_order() {
        let json = minimal(&format!(r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#));
        let mut seen = Vec::new();
        Config::parse_observed(json.as_bytes(), &env, &mut |p| seen.push(p)).unwrap();
        assert_eq!(
            seen,
            [Phase::Json, Phase::Clients, Phase::KeyIndex, Phase::Rest]
        );
        assert_eq!(
            seen.iter().map(|p| p.name()).collect::<Vec<_>>(),
            ["json", "clients", "key_index", "rest"]
        );
        // A failed phase is not reported, nor any after it.
        let mut seen = Vec::new();
        let bad = minimal(r#"[{"name":"a","key_sha256":"abc"}]"#);
        assert!(Config::parse_observed(bad.as_bytes(), &env, &mut |p| seen.push(p)).is_err());
        assert_eq!(seen, [Phase::Json]);
    }

    #[test]
    fn names_must_be_label_safe() {
        for bad in ["", "a.b", "-a", "a b", "ä", &"x".repeat(65)] {
            let e = err(&minimal(&format!(
                r#"[{{"name":{bad:?},"key_sha256":"{DEMO_SHA}"}}]"#
            )));
            assert!(e.starts_with("clients[0].name: "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn limits_must_be_positive() {
        let e = err(&minimal(&format!(
            r#"[{{"name":"a","key_sha256":"{DEMO_SHA}","requests_per_minute":0}}]"#
        )));
        assert_eq!(
            e,
            "clients[0].requests_per_minute: must be between 1 and 1000000000, got 0"
        );
    }

    #[test]
    fn provider_key_must_be_present_and_is_never_echoed() {
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"MISSING"}}}}"#
        );
        let e = err(&json);
        assert!(
            e.starts_with("upstream.api_key_env: environment variable \"MISSING\" is not set"),
            "{e}"
        );

        let bad_env = |_: &str| Some("sk-has space".to_string());
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"K"}}}}"#
        );
        let e = Config::parse(json.as_bytes(), &bad_env)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("upstream.api_key_env: "), "{e}");
        assert!(!e.contains("sk-has"), "{e}");
    }

    #[test]
    fn debug_output_redacts_the_provider_key() {
        let c = parse(&minimal(&format!(
            r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#
        )))
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-provider-secret"), "{dbg}");
    }

    fn with_limiter(limiter: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],
                "upstream":{{"api_key_env":"PROVIDER_KEY"}},"limiter":{limiter}}}"#
        ))
    }

    #[test]
    fn redis_limiter_defaults_and_errors() {
        let c = with_limiter(r#"{"backend":"redis","cluster":"webdis"}"#).unwrap();
        let LimiterBackend::Redis(r) = &c.limiter else {
            panic!("{:?}", c.limiter)
        };
        assert_eq!(r.webdis.authority, "webdis");
        assert_eq!(r.webdis.timeout_ms, DEFAULT_REDIS_TIMEOUT_MS);
        assert_eq!(r.on_error, OnError::Local);
        assert_eq!(r.webdis.authorization, None);
        assert_eq!(c.limiter.name(), "redis");

        let c = with_limiter(
            r#"{"backend":"redis","cluster":"webdis","authority":"webdis.svc","timeout_ms":25,
                "on_error":"deny","basic_auth_env":"PROVIDER_KEY"}"#,
        );
        // PROVIDER_KEY holds no colon: not a user:password pair.
        let e = c.unwrap_err().to_string();
        assert!(e.starts_with("limiter.basic_auth_env: "), "{e}");
        assert!(!e.contains("sk-provider-secret"), "{e}");

        let auth_env = |n: &str| match n {
            "PROVIDER_KEY" => Some("sk-p".to_string()),
            "WEBDIS_AUTH" => Some("tollgate:s3cret".to_string()),
            _ => None,
        };
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"PROVIDER_KEY"}},
                "limiter":{{"backend":"redis","cluster":"webdis","on_error":"allow","basic_auth_env":"WEBDIS_AUTH"}}}}"#
        );
        let c = Config::parse(json.as_bytes(), &auth_env).unwrap();
        let LimiterBackend::Redis(r) = &c.limiter else {
            panic!()
        };
        assert_eq!(
            r.webdis.authorization.as_deref(),
            Some("Basic dG9sbGdhdGU6czNjcmV0")
        );
        assert_eq!(r.on_error, OnError::Allow);
        assert!(!format!("{c:?}").contains("dG9sbGdhdGU6"));

        for (limiter, want) in [
            (r#"{"backend":"redis"}"#, "limiter.cluster: required with"),
            (
                r#"{"backend":"redis","cluster":""}"#,
                "limiter.cluster: must name",
            ),
            (
                r#"{"backend":"redis","cluster":"w","timeout_ms":0}"#,
                "limiter.timeout_ms: must be between",
            ),
            (
                r#"{"backend":"redis","cluster":"w","on_error":"retry"}"#,
                "limiter.on_error: unknown variant `retry`",
            ),
            (
                r#"{"backend":"redis","cluster":"w","authority":"a b"}"#,
                "limiter.authority: must be",
            ),
            (
                r#"{"backend":"local","cluster":"w"}"#,
                "limiter.cluster: only valid with",
            ),
            (
                r#"{"backend":"local","on_error":"deny"}"#,
                "limiter.on_error: only valid with",
            ),
            (
                r#"{"backend":"redis","cluster":"w","tmeout_ms":5}"#,
                "limiter.tmeout_ms: unknown field",
            ),
        ] {
            let e = with_limiter(limiter).unwrap_err().to_string();
            assert!(e.starts_with(want), "{limiter}: {e}");
        }
    }

    fn routed(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],
                "providers":[{{"name":"p1","cluster":"c1","api_key_env":"PROVIDER_KEY"}},
                             {{"name":"p2","cluster":"c2","api_key_env":"PROVIDER_KEY"}}],
                {extra}}}"#
        ))
    }

    #[test]
    fn routing_config() {
        let c = routed(
            r#""models":[{"match":"m","providers":["p1","p2"],"upstream_models":{"p2":"m2"}},
                         {"match":"g-*","providers":["p2"]}],"default_provider":"p1""#,
        )
        .unwrap();
        let Mode::Routed(r) = &c.mode else { panic!() };
        assert_eq!(r.rule_for("m"), Some(0));
        assert_eq!(r.rule_for("g-1"), Some(1));
        assert_eq!(r.rule_for("x"), None);
        assert_eq!(r.rules[0].targets[1].model.as_deref(), Some("m2"));
        assert_eq!(r.default_provider, Some(0));
        assert_eq!(r.max_body_bytes, DEFAULT_MAX_BODY_BYTES);

        for (extra, want) in [
            (
                r#""models":[{"match":"m","providers":["p3"]}]"#,
                "models[0].providers[0]: unknown provider \"p3\"",
            ),
            (
                r#""models":[{"match":"m","providers":["p1","p1"]}]"#,
                "models[0].providers[1]: provider \"p1\" is listed twice",
            ),
            (
                r#""models":[{"match":"m","providers":[]}]"#,
                "models[0].providers: at least one",
            ),
            (
                r#""models":[{"match":"g*","providers":["p1"],"upstream_model":"x"}]"#,
                "models[0].upstream_model: a glob rule cannot rename",
            ),
            (
                r#""models":[{"match":"m","providers":["p1"]},{"match":"m","providers":["p2"]}]"#,
                "models[1].match: duplicate rule",
            ),
            (
                r#""models":[{"match":"m","providers":["p1"],"upstream_models":{"p2":"x"}}]"#,
                "models[0].upstream_models.p2: not one of",
            ),
            (
                r#""models":[{"match":"m","providers":["p1"]}],"default_provider":"nope""#,
                "default_provider: unknown provider",
            ),
            (
                r#""models":[{"match":"m","providers":["p1"]}],"max_body_bytes":10"#,
                "max_body_bytes: must be between 1024",
            ),
            (r#""models":[]"#, "models: at least one model rule"),
            (
                r#""models":[{"match":"m","providers":["p1"]}],"upstream":{"api_key_env":"PROVIDER_KEY"}"#,
                "upstream: set either",
            ),
            (
                r#""models":[{"match":"m","prviders":["p1"]}]"#,
                "models[0].prviders: unknown field",
            ),
        ] {
            let e = routed(extra).unwrap_err().to_string();
            assert!(e.starts_with(want), "{extra}: {e}");
        }
        // A mix of providers with and without `authority` in one rule.
        let e = parse(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],
                "providers":[{{"name":"p1","cluster":"c1","api_key_env":"PROVIDER_KEY","authority":"a.example"}},
                             {{"name":"p2","cluster":"c2","api_key_env":"PROVIDER_KEY"}}],
                "models":[{{"match":"m","providers":["p1","p2"]}}]}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("models[0].providers: the providers of one rule must all set"),
            "{e}"
        );
        // Allow-lists and routing-only fields need routing.
        let e = err(&minimal(&format!(
            r#"[{{"name":"a","key_sha256":"{DEMO_SHA}","models":["m"]}}]"#
        )));
        assert!(
            e.starts_with("clients[0].models: model allow-lists need"),
            "{e}"
        );
        let e = err(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"PROVIDER_KEY"}},"models":[]}}"#
        ));
        assert!(e.starts_with("models: only valid with `providers`"), "{e}");
    }

    #[test]
    fn empty_and_malformed_documents() {
        assert!(err("").contains("empty"));
        assert!(err("  ").contains("empty"));
        let e = err("{not json");
        assert_eq!(e, "not valid JSON: key must be a string at line 1 column 2");
        let e = err(r#"{"clients": ["#);
        assert!(e.starts_with("not valid JSON: EOF while parsing"), "{e}");
        let e = err(r#"{"clients":[],"upstream":{"api_key_env":"PROVIDER_KEY"}}"#);
        assert!(e.starts_with("clients: at least one client"), "{e}");
        let e = err(
            r#"{"clients":[],"upstream":{"api_key_env":"PROVIDER_KEY"},"limiter":{"backend":"etcd"}}"#,
        );
        assert!(
            e.starts_with("limiter.backend: unknown variant `etcd`"),
            "{e}"
        );
        let e = err(r#"{"upstream":{"api_key_env":"PROVIDER_KEY"}}"#);
        assert!(e.starts_with("missing field `clients`"), "{e}");
    }

    /// Fuzz finding (fuzz/seeds/config/enum-given-a-number.json): valid JSON with a
    /// number for `limiter.backend` was "not valid JSON: expected value", naming no field.
    #[test]
    fn enum_fields_of_the_wrong_type_are_named() {
        let with_limiter = |limiter: &str| {
            let good = minimal(&format!(r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#));
            format!(
                r#"{},"limiter":{limiter}}}"#,
                good.strip_suffix('}').unwrap()
            )
        };
        for (limiter, field) in [
            (r#"{"backend":5}"#, "limiter.backend"),
            (r#"{"backend":null}"#, "limiter.backend"),
            (
                r#"{"backend":"redis","cluster":"w","on_error":[]}"#,
                "limiter.on_error",
            ),
        ] {
            let e = parse(&with_limiter(limiter)).unwrap_err();
            assert_eq!(e.field, field, "{limiter}");
            assert_eq!(e.message, "invalid type: expected a string");
        }
        assert!(parse(&with_limiter(r#"{"backend":"local"}"#)).is_ok());
        let e = Config::parse(b"{\"clients\":[{\"name\":\"\xff\"}]}", &env).unwrap_err();
        assert!(
            e.field.is_empty() && e.message.starts_with("not valid JSON"),
            "{e}"
        );
    }

    /// Fuzz target config, seed array.json: serde reads a struct
    /// from an array, so `[[clients], null, null, {upstream}]` was a configuration.
    #[test]
    fn an_array_is_not_a_configuration() {
        let e = err(&format!(
            r#" [[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],null,null,{{"api_key_env":"PROVIDER_KEY"}}]"#
        ));
        assert_eq!(
            e,
            "the plugin configuration must be a JSON object, not an array"
        );
    }

    /// Fuzz finding (fuzz/seeds/config/trailing-characters.json): what followed the
    /// object was ignored, e.g. a second configuration pasted after the first.
    #[test]
    fn trailing_characters_are_an_error() {
        let good = minimal(&format!(r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#));
        assert!(parse(&format!("{good} \n")).is_ok());
        let e = err(&format!("{good}true"));
        assert!(e.starts_with("not valid JSON: trailing characters"), "{e}");
        let e = err(&format!("{good}{good}"));
        assert!(e.starts_with("not valid JSON: trailing characters"), "{e}");
    }
}

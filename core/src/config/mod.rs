//! Plugin configuration: the JSON an operator writes, and the compiled form the filter uses.
//!
//! Parsing is strict (unknown fields are errors) and every error names the field it is about,
//! e.g. `clients[3].key_sha256: expected 64 hex characters`, because the only place an operator
//! sees it is an Envoy log line or `envoy --mode validate`.
//!
//! One file per area, each with the schema as written (`Raw*`) next to its compiled form:
//! [`clients`], [`routing`], [`limiter`], [`cache`]; this file holds the document, the order of
//! compilation and the checks that span areas.

mod cache;
mod clients;
mod key_set;
mod limiter;
mod path;
mod prices;
mod routing;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::Deserialize;

use crate::cache::CacheConfig;
use crate::endpoints::{Api, EndpointSet, Kind};
use crate::identity::IdentityIndex;
use crate::keys::KeyIndex;
use crate::routing::Routing;
use crate::spend::Prices;
pub use crate::types::{ClientId, Webdis};

use self::cache::{compile_cache, RawCache, RawCacheBackends};
use self::clients::{compile_clients, Defaults, RawClient};
pub use self::clients::{
    parse_rfc3339_ms, Client, DEFAULT_REQUESTS_PER_MINUTE, MAX_CLIENT_NAME_LEN,
    MAX_KEYS_PER_CLIENT, MAX_KEY_LABEL_LEN, MAX_PER_MINUTE,
};
pub use self::key_set::{
    pack_key_set, unpack_key_set, KeySetRecord, Windows, KEY_SET_HEADER_LEN,
    KEY_SET_RECORD_FIXED_LEN, KEY_SET_VERSION,
};
use self::key_set::{split_key_set, Split, StrWindows, SubWindows};
use self::limiter::{compile_limiter, RawLimiter};
pub use self::limiter::{
    LeasePolicy, LimiterBackend, OnError, OnRestart, RedisLimiter, DEFAULT_REDIS_TIMEOUT_MS,
    MAX_REDIS_TIMEOUT_MS,
};
use self::prices::{check_offset, compile_prices, RawPrice};
pub use self::prices::{MAX_MONEY_BUDGET, MAX_PRICE_PER_MILLION};
use self::routing::{compile_routing, compile_upstream, RawProvider, RawRule, RawUpstream};
pub use self::routing::{Upstream, DEFAULT_MAX_BODY_BYTES, MAX_MAX_BODY_BYTES};

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
    #[serde(default, borrow)]
    clients: Vec<RawClient<'a>>,
    /// Clients packed in binary records (see [`key_set`]); borrowed, as it may be megabytes.
    #[serde(default, borrow, deserialize_with = "clients::borrowed_opt")]
    key_set: Option<std::borrow::Cow<'a, str>>,
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
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    prices: Option<Vec<RawPrice>>,
    #[serde(default)]
    budget_utc_offset_minutes: Option<i32>,
    #[serde(default)]
    access_log: bool,
}

// ---------------------------------------------------------------------------------------------
// The compiled form.

/// A validated, immutable configuration, built once per `on_configure`.
#[derive(Debug)]
pub struct Config {
    /// Clients in configuration order, `clients` then `key_set`; [`ClientId`] indexes this.
    pub clients: Vec<Client>,
    /// How many of `clients` came from `key_set` (the last ones).
    pub key_set_clients: usize,
    /// Digest lookup from a presented key to its client.
    pub keys: KeyIndex,
    /// Clients known by their peer certificate's SPIFFE ID (see [`crate::identity`]).
    pub identities: IdentityIndex,
    /// How requests reach the provider(s).
    pub mode: Mode,
    /// Limit counter backend.
    pub limiter: LimiterBackend,
    /// The response cache (see [`crate::cache`]).
    pub cache: CacheConfig,
    /// Request headers forwarded besides [`crate::forwarding::FORWARDED`], lowercase.
    pub forward_headers: Vec<String>,
    /// Prices per model (see [`crate::spend`]).
    pub prices: Prices,
    /// Budgets' days, weeks and months start at midnight of UTC plus this many minutes.
    pub budget_utc_offset_minutes: i32,
    /// `limiter.budgets_on_restart`: set when the local limiter holds budgets of an hour or more.
    pub budgets_on_restart: Option<OnRestart>,
    /// `access_log`: set the access log's properties (`wasm.tollgate_<field>`, one host call
    /// per field a request has). Off by default: four host calls of an admitted request.
    pub access_log: bool,
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

    /// [`Config::parse`] of a configuration read through windows (the filter reads Envoy's copy
    /// this way): the `key_set` string's value, which holds nearly all of a large
    /// configuration, is decoded a window at a time and never copied whole; the rest of the
    /// document is parsed as [`Config::parse`] would. Errors are the same.
    pub fn parse_windows(
        config: &mut dyn Windows,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::parse_windows_scoped(config, env, Scope::All)
    }

    /// [`Config::parse_windows`] for the upstream role, which routes attempts and never looks a
    /// client up: everything but `clients` and `key_set`, which are neither compiled nor (the
    /// key set) read. The listener role, configured from the same document, checks them; a
    /// configuration of 100,000 clients then costs the upstream filter of each provider cluster
    /// nothing per client.
    pub fn parse_windows_upstream(
        config: &mut dyn Windows,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::parse_windows_scoped(config, env, Scope::Routing)
    }

    fn parse_windows_scoped(
        config: &mut dyn Windows,
        env: &dyn Fn(&str) -> Option<String>,
        scope: Scope,
    ) -> Result<Self, ConfigError> {
        let cannot =
            |e: String| ConfigError::new("", format!("cannot read the plugin configuration: {e}"));
        match split_key_set(config).map_err(cannot)? {
            Split::Whole(json) => Self::parse_with(&json, None, env, &mut |_| {}, scope),
            Split::KeySet { json, start, len } => {
                let mut key_set = SubWindows {
                    inner: config,
                    start,
                    len,
                };
                Self::parse_with(&json, Some(&mut key_set), env, &mut |_| {}, scope)
            }
            Split::Unsure => {
                let mut json = Vec::new();
                config.read(0, config.len(), &mut json).map_err(cannot)?;
                Self::parse_with(&json, None, env, &mut |_| {}, scope)
            }
        }
    }

    /// [`Config::parse`], calling `done` as each [`Phase`] ends (not for a phase that failed).
    pub fn parse_observed(
        json: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
        done: &mut dyn FnMut(Phase),
    ) -> Result<Self, ConfigError> {
        Self::parse_with(json, None, env, done, Scope::All)
    }

    /// The document `json`, whose `key_set` (if any) is read from `key_set` when given.
    fn parse_with(
        json: &[u8],
        key_set: Option<&mut dyn Windows>,
        env: &dyn Fn(&str) -> Option<String>,
        done: &mut dyn FnMut(Phase),
        scope: Scope,
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
        let raw = RawConfig::deserialize(&mut *de).map_err(|e| {
            if (e.is_syntax() || e.is_eof()) && !is_json(json) {
                // Broken JSON has no field yet; its line and column are what helps.
                return ConfigError::new("", format!("not valid JSON: {e}"));
            }
            let field = path::path_at(json, path::offset_of(json, e.line(), e.column()));
            let message = strip_position(&e.to_string());
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
        compile(raw, key_set, env, done, scope)
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

/// What a role compiles of the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Everything (the listener role, the CLI).
    All,
    /// Everything but the clients (the upstream role).
    Routing,
}

fn compile(
    mut raw: RawConfig<'_>,
    key_set: Option<&mut dyn Windows>,
    env: &dyn Fn(&str) -> Option<String>,
    done: &mut dyn FnMut(Phase),
    scope: Scope,
) -> Result<Config, ConfigError> {
    if scope == Scope::Routing {
        // Not compiled, and the key set's windows never read (see below).
        raw.clients = Vec::new();
        raw.key_set = None;
    }
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

    if scope == Scope::All && raw.clients.is_empty() && raw.key_set.is_none() {
        return Err(ConfigError::new(
            "clients",
            "at least one client is required, in `clients` or `key_set` (without clients \
             every request is refused)",
        ));
    }

    let default_endpoints = match &raw.endpoints {
        None => EndpointSet::defaults(),
        Some(names) => EndpointSet::from_names(names)
            .map_err(|(j, m)| ConfigError::new(format!("endpoints[{j}]"), m))?,
    };
    let forward_headers = compile_forward_headers(raw.forward_headers.take().unwrap_or_default())?;
    let prices = compile_prices(raw.currency.take(), raw.prices.take())?;
    let budget_utc_offset_minutes = check_offset(raw.budget_utc_offset_minutes)?;
    let access_log = raw.access_log;

    let defaults = Defaults {
        endpoints: default_endpoints,
        requests_per_minute: default_rpm,
        tokens_per_minute: default_tpm,
    };
    let json_clients = raw.clients.len();
    // The key set's text: read through the caller's windows, or the document's own string.
    let mut own;
    let key_set: Option<&mut dyn Windows> = match (key_set, raw.key_set.as_deref()) {
        (Some(windows), Some(_)) => Some(windows),
        (_, Some(text)) => {
            own = StrWindows(text.as_bytes());
            Some(&mut own)
        }
        (_, None) => None,
    };
    let (clients, keys, identities) = compile_clients(raw.clients, key_set, &defaults, done)?;
    if scope == Scope::All && clients.is_empty() {
        return Err(ConfigError::new(
            "key_set",
            "at least one client is required (this key set holds none, and `clients` is empty)",
        ));
    }

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
        if !prices.models.is_empty() {
            return Err(ConfigError::new(
                "prices",
                "prices need model routing (`providers` and `models`): with one `upstream` \
                 the request body is not read, so the model is unknown",
            ));
        }
        if let Some(i) = clients.iter().position(|c| c.models().is_some()) {
            return Err(ConfigError::new(
                format!("clients[{i}].models"),
                "model allow-lists need model routing (`providers` and `models`)",
            ));
        }
    }
    if let Mode::Routed(routing) = &mode {
        // Account endpoints go to the default provider: without one they could reach nothing,
        // and they are OpenAI's API, so that provider must speak it.
        let default_api = routing
            .default_provider
            .and_then(|p| routing.providers.get(p))
            .map(|p| p.api);
        // The field that grants account endpoints: `top` when the defaults do, else the first
        // client whose own list does.
        let account_grant = |top: &str| {
            if default_endpoints.has_kind(Kind::Account) {
                Some(top.to_string())
            } else {
                clients
                    .iter()
                    .position(|c| c.endpoints.has_kind(Kind::Account))
                    .map(|i| format!("clients[{i}].endpoints"))
            }
        };
        if default_api.is_some_and(|api| api != Api::OpenAi) {
            if let Some(field) = account_grant("default_provider") {
                return Err(ConfigError::new(
                    field,
                    "account endpoints (files, batches, ...) are OpenAI's API and go to \
                     `default_provider`, which speaks another API (`api`)",
                ));
            }
        }
        if routing.default_provider.is_none() {
            if let Some(field) = account_grant("endpoints") {
                return Err(ConfigError::new(
                    field,
                    "account endpoints (files, batches, ...) are sent to `default_provider`; \
                     set one, or grant only inference endpoints",
                ));
            }
        }
    }
    let on_restart = raw.limiter.as_ref().and_then(|l| l.budgets_on_restart);
    let limiter = match raw.limiter {
        None => LimiterBackend::Local,
        Some(l) => compile_limiter(l, env)?,
    };
    // The local limiter's counts live in the Envoy process: a budget longer than a process may
    // live is accepted only when the configuration says what a restart does to it.
    if limiter == LimiterBackend::Local && on_restart.is_none() {
        let long = clients.iter().enumerate().find_map(|(i, c)| {
            c.budgets()
                .iter()
                .position(|b| b.period > crate::spend::Period::Minute)
                .map(|j| (i, c.budgets().get(j).map_or("", |b| b.period.as_str())))
        });
        if let Some((i, period)) = long {
            return Err(ConfigError::new(
                format!("clients[{i}].budgets"),
                format!(
                    "a budget per {period} with the local limiter starts from zero when Envoy \
                     restarts: set limiter.budgets_on_restart to \"reset\" to accept that, or \
                     use the Redis limiter"
                ),
            ));
        }
    }
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
        key_set_clients: clients.len() - json_clients,
        clients,
        keys,
        identities,
        mode,
        limiter,
        cache,
        forward_headers,
        prices,
        budget_utc_offset_minutes,
        budgets_on_restart: on_restart,
        access_log,
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

// ---------------------------------------------------------------------------------------------
// The response cache: `cache` on model rules and clients, `cache_backends` for the stores.

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

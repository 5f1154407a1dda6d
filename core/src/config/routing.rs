//! Providers and model routing (`providers`, `models`, `default_provider`), or the one
//! provider of `upstream`.

use std::fmt;

use serde::Deserialize;

use super::cache::RawCache;
use super::{check_client_name, ConfigError};
use crate::endpoints::Api;
use crate::routing::{Pattern, Provider, Routing, Rule, Target};

/// `api` of a provider or of `upstream`: which API it speaks.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawApi {
    #[default]
    OpenAi,
    Anthropic,
}

impl From<RawApi> for Api {
    fn from(raw: RawApi) -> Self {
        match raw {
            RawApi::OpenAi => Api::OpenAi,
            RawApi::Anthropic => Api::Anthropic,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) name: String,
    pub(super) cluster: String,
    pub(super) api_key_env: String,
    #[serde(default)]
    pub(super) api: RawApi,
    #[serde(default)]
    pub(super) authority: Option<String>,
    #[serde(default)]
    pub(super) path_prefix: Option<String>,
    #[serde(default)]
    pub(super) headers: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(rename = "match")]
    pub(super) pattern: String,
    pub(super) providers: Vec<String>,
    #[serde(default)]
    pub(super) upstream_model: Option<String>,
    #[serde(default)]
    pub(super) upstream_models: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) cache: Option<RawCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) api_key_env: String,
    #[serde(default)]
    pub(super) api: RawApi,
}

/// How the provider is called.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Name of the environment variable the provider key came from (for messages; never the key).
    pub api_key_env: String,
    /// The API the provider speaks: only that API's endpoints are served.
    pub api: Api,
    /// The value of the provider's credential header (see [`Upstream::credential`]).
    pub authorization: String,
}

impl Upstream {
    /// The header that carries the provider key, and its value.
    pub fn credential(&self) -> (&'static str, String) {
        (
            crate::routing::credential_header(self.api),
            self.authorization.clone(),
        )
    }
}

impl fmt::Debug for Upstream {
    // The provider key must never reach a log line, even a debug one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("api_key_env", &self.api_key_env)
            .field("api", &self.api)
            .field("authorization", &"<redacted>")
            .finish()
    }
}

/// Default `max_body_bytes`: the size of Envoy's default connection buffer.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// Largest accepted `max_body_bytes`.
pub const MAX_MAX_BODY_BYTES: u64 = 64 << 20;

pub(super) fn compile_patterns(field: &str, list: &[String]) -> Result<Vec<Pattern>, ConfigError> {
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

pub(super) fn compile_routing(
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
        let api = Api::from(p.api);
        let authorization = provider_key(&at("api_key_env"), &p.api_key_env, api, env)?;
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
            api,
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
        // A fallback resends the same request: every provider of a rule must understand it.
        let apis = targets
            .iter()
            .filter_map(|t| providers.get(t.provider).map(|p| p.api));
        if let Some(first) = apis.clone().next() {
            if let Some(other) = apis.clone().find(|a| *a != first) {
                return Err(ConfigError::new(
                    at("providers"),
                    format!(
                        "the providers of one rule must speak the same API (`api`), here {} and \
                         {}: a fallback sends the same request to the next provider",
                        first.name(),
                        other.name()
                    ),
                ));
            }
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

pub(super) fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (0x20..=0x7e).contains(&b))
}

pub(super) fn compile_upstream(
    raw: RawUpstream,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Upstream, ConfigError> {
    let api = Api::from(raw.api);
    let authorization = provider_key("upstream.api_key_env", &raw.api_key_env, api, env)?;
    Ok(Upstream {
        authorization,
        api,
        api_key_env: raw.api_key_env,
    })
}

/// The provider's credential header value from the named environment variable: `Bearer <key>`
/// for OpenAI's API (`authorization`), the bare key for Anthropic's (`x-api-key`).
pub(super) fn provider_key(
    field: &str,
    name: &str,
    api: Api,
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
    Ok(match api {
        Api::OpenAi => format!("Bearer {key}"),
        Api::Anthropic => key.to_string(),
    })
}

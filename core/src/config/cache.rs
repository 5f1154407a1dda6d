//! The response cache's settings (`cache` per rule and per client, `cache_backends`).

use serde::Deserialize;

use super::limiter::{compile_webdis, RawBackend};
use super::{ConfigError, LimiterBackend, Mode};
use crate::cache::{self, CacheConfig, ClientCache, LocalLayout, Settings};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) ttl_s: Option<u32>,
    #[serde(default)]
    pub(super) max_entry_bytes: Option<u64>,
    #[serde(default)]
    pub(super) backend: Option<RawBackend>,
    #[serde(default)]
    pub(super) scope: Option<RawScope>,
    #[serde(default)]
    pub(super) temperature: Option<RawTemperature>,
    #[serde(default)]
    pub(super) allow_tools: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawScope {
    Client,
    Shared,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawTemperature {
    Zero,
    ZeroOrAbsent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCacheBackends {
    #[serde(default)]
    pub(super) local: Option<RawLocalCache>,
    #[serde(default)]
    pub(super) redis: Option<RawRedisCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocalCache {
    #[serde(default)]
    pub(super) max_bytes: Option<u64>,
}

// The Webdis fields of `limiter` again, compiled by the same `compile_webdis`: a shared struct
// would need `#[serde(flatten)]`, which serde does not combine with `deny_unknown_fields` (a
// misspelt field would pass) and which buffers the object (errors lose their field path).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedisCache {
    pub(super) cluster: String,
    #[serde(default)]
    pub(super) authority: Option<String>,
    #[serde(default)]
    pub(super) timeout_ms: Option<u32>,
    #[serde(default)]
    pub(super) basic_auth_env: Option<String>,
}

/// `None` for a setting that is present but disabled.
pub(super) fn compile_cache_settings(
    field: &str,
    raw: RawCache,
) -> Result<Option<Settings>, ConfigError> {
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

pub(super) fn compile_cache(
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

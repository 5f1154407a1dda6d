//! Where the limit counters live (`limiter`), and the Webdis services Tollgate calls.

use serde::Deserialize;

use super::ConfigError;
use crate::types::Webdis;

// A plain struct rather than an internally tagged enum: serde buffers tagged enums and then
// loses the path of errors inside them (`limiter: unknown variant` instead of
// `limiter.on_error: unknown variant`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimiter {
    pub(super) backend: RawBackend,
    #[serde(default)]
    pub(super) cluster: Option<String>,
    #[serde(default)]
    pub(super) authority: Option<String>,
    #[serde(default)]
    pub(super) timeout_ms: Option<u32>,
    #[serde(default)]
    pub(super) basic_auth_env: Option<String>,
    #[serde(default)]
    pub(super) on_error: Option<OnError>,
    #[serde(default)]
    pub(super) budgets_on_restart: Option<OnRestart>,
}

/// `limiter.budgets_on_restart`: what the configuration accepts the local limiter does with
/// budgets of an hour or longer when Envoy restarts (shared data lives in the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRestart {
    /// Every window starts again from zero.
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawBackend {
    Local,
    Redis,
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

pub(super) fn compile_limiter(
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
    if raw.budgets_on_restart.is_some() {
        return Err(ConfigError::new(
            "limiter.budgets_on_restart",
            "only valid with \"backend\": \"local\" (Redis keeps budgets across restarts)",
        ));
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
pub(super) fn compile_webdis(
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

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
    #[serde(default)]
    pub(super) leases: Option<RawLeases>,
}

/// `limiter.leases`: every field optional (`"leases": {}` turns leases on with the defaults).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLeases {
    #[serde(default)]
    horizon_ms: Option<u32>,
    #[serde(default)]
    max_block: Option<u32>,
    #[serde(default)]
    share_percent: Option<u32>,
    #[serde(default)]
    idle_ms: Option<u32>,
    #[serde(default)]
    recheck_ms: Option<u32>,
    #[serde(default)]
    breaker_failures: Option<u32>,
    #[serde(default)]
    breaker_open_ms: Option<u32>,
}

/// Quota leases of the Redis limiter (`limiter.leases`; see `crate::lease` and
/// docs/limiters.md#leases): how large the blocks a replica takes from Redis are, when unused
/// blocks go back, and the per-worker circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasePolicy {
    /// A block covers this much of the replica's recent traffic (and never more than the time
    /// left in the window).
    pub horizon_ms: u64,
    /// Largest block of requests per fetch.
    pub max_block: u64,
    /// A fetch takes at most this percentage of what the window has left in Redis (at least 1),
    /// so blocks shrink to 1 as the budget runs out.
    pub share_percent: u64,
    /// A lease not drawn from for this long goes back to Redis.
    pub idle_ms: u64,
    /// After Redis said the window is spent, ask again at most this often (returns by other
    /// replicas are picked up then); refusals in between are local.
    pub recheck_ms: u64,
    /// Consecutive failed fetches that open a worker's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker short-circuits fetches before one probe goes through.
    pub breaker_open_ms: u64,
    /// A prefetch not answered after this long is taken as lost (twice the Webdis timeout,
    /// plus the root tick that sends it).
    pub stale_ms: u64,
}

/// Defaults of `limiter.leases`.
pub const DEFAULT_LEASE_HORIZON_MS: u32 = 5_000;
/// Default `limiter.leases.max_block`.
pub const DEFAULT_LEASE_MAX_BLOCK: u32 = 1_000;
/// Default `limiter.leases.share_percent`.
pub const DEFAULT_LEASE_SHARE_PERCENT: u32 = 10;
/// Default `limiter.leases.idle_ms`.
pub const DEFAULT_LEASE_IDLE_MS: u32 = 2_000;
/// Default `limiter.leases.recheck_ms`.
pub const DEFAULT_LEASE_RECHECK_MS: u32 = 1_000;
/// Default `limiter.leases.breaker_failures`.
pub const DEFAULT_BREAKER_FAILURES: u32 = 3;
/// Default `limiter.leases.breaker_open_ms`.
pub const DEFAULT_BREAKER_OPEN_MS: u32 = 1_000;

fn compile_leases(raw: RawLeases, timeout_ms: u32) -> Result<LeasePolicy, ConfigError> {
    let field = |name: &str, v: Option<u32>, default: u32, min: u32, max: u32| {
        let v = v.unwrap_or(default);
        if v < min || v > max {
            return Err(ConfigError::new(
                format!("limiter.leases.{name}"),
                format!("must be between {min} and {max}, got {v}"),
            ));
        }
        Ok(v)
    };
    Ok(LeasePolicy {
        horizon_ms: field(
            "horizon_ms",
            raw.horizon_ms,
            DEFAULT_LEASE_HORIZON_MS,
            100,
            60_000,
        )?
        .into(),
        max_block: field(
            "max_block",
            raw.max_block,
            DEFAULT_LEASE_MAX_BLOCK,
            1,
            1_000_000,
        )?
        .into(),
        share_percent: field(
            "share_percent",
            raw.share_percent,
            DEFAULT_LEASE_SHARE_PERCENT,
            1,
            100,
        )?
        .into(),
        idle_ms: field("idle_ms", raw.idle_ms, DEFAULT_LEASE_IDLE_MS, 100, 60_000)?.into(),
        recheck_ms: field(
            "recheck_ms",
            raw.recheck_ms,
            DEFAULT_LEASE_RECHECK_MS,
            10,
            60_000,
        )?
        .into(),
        breaker_failures: field(
            "breaker_failures",
            raw.breaker_failures,
            DEFAULT_BREAKER_FAILURES,
            1,
            1_000,
        )?,
        breaker_open_ms: field(
            "breaker_open_ms",
            raw.breaker_open_ms,
            DEFAULT_BREAKER_OPEN_MS,
            10,
            600_000,
        )?
        .into(),
        stale_ms: u64::from(timeout_ms) * 2 + 200,
    })
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
    /// Quota leases (`None`: one Redis check per request).
    pub leases: Option<LeasePolicy>,
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
            ("leases", raw.leases.is_some()),
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
    let webdis = compile_webdis(
        "limiter",
        cluster,
        raw.authority,
        raw.timeout_ms,
        raw.basic_auth_env,
        env,
    )?;
    let leases = match raw.leases {
        Some(l) => Some(compile_leases(l, webdis.timeout_ms)?),
        None => None,
    };
    Ok(LimiterBackend::Redis(RedisLimiter {
        webdis,
        // Local fallback keeps serving and still bounds spend (per replica) while Redis is down.
        on_error: raw.on_error.unwrap_or(OnError::Local),
        leases,
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

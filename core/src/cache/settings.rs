//! Settings (the compiled form of the configuration's `cache` objects).

use crate::types::{ClientId, Webdis};

use super::*;

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

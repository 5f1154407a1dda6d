//! Planning a request.

use std::fmt::Write as _;

use serde_json::Value;

use crate::routing::Routing;

use super::*;

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

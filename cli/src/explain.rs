//! `config check --explain`: what a valid configuration means, in words.
//!
//! One function per section of the configuration, listed in [`SECTIONS`]; a new part of the
//! configuration gets its own function there. Sections read the compiled [`Config`]; the few
//! facts compilation does not keep (each client's digest kind, whether a limit was written or
//! defaulted, the name of Webdis's credentials variable) come from the document itself, which
//! has passed the same parser.

use serde_json::Value;
use tollgate_core::cache::{Backend, ClientCache, Scope, Settings, Temperature};
use tollgate_core::config::{
    LimiterBackend, Mode, OnError, RedisLimiter, DEFAULT_REDIS_TIMEOUT_MS,
    DEFAULT_REQUESTS_PER_MINUTE,
};
use tollgate_core::routing::{Pattern, Routing};
use tollgate_core::spend::{format_micros, Measure, Period};
use tollgate_core::Config;

use crate::check::{EnvSource, EnvUse};

/// What is explained: a configuration that passed the filter's parser.
pub struct Subject<'a> {
    /// The compiled configuration.
    pub config: &'a Config,
    /// The document it was compiled from.
    pub raw: &'a Value,
    /// How the environment variables it names were resolved by the check.
    pub env: &'a [EnvUse],
}

/// A section writes its lines into the explanation (nothing when its part is not configured).
type Section = fn(&Subject, &mut Vec<String>);

/// The sections, in the order they are printed.
const SECTIONS: &[Section] = &[
    clients,
    default_limit,
    upstream,
    providers,
    model_routes,
    limiter,
    prices,
    budgets,
    cache,
];

/// The explanation: every section, indented under the verdict line.
pub fn explain(s: &Subject) -> String {
    let mut lines = Vec::new();
    for section in SECTIONS {
        section(s, &mut lines);
    }
    let mut out = String::new();
    for line in lines {
        out.push_str("  ");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn patterns(list: &[Pattern]) -> String {
    list.iter()
        .map(Pattern::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn raw_client<'a>(s: &'a Subject, i: usize) -> Option<&'a Value> {
    s.raw.get("clients")?.as_array()?.get(i)
}

fn clients(s: &Subject, out: &mut Vec<String>) {
    let n = s.config.clients.len();
    out.push(format!(
        "clients ({n}), each authenticated by the digest of its key and limited per minute:"
    ));
    let width = s
        .config
        .clients
        .iter()
        .take(n - s.config.key_set_clients)
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let json = n - s.config.key_set_clients;
    for (i, c) in s.config.clients.iter().take(json).enumerate() {
        let raw = raw_client(s, i);
        let digest = if raw.and_then(|r| r.get("key_md5")).is_some() {
            "key_md5   (MD5, for keys migrated from the older proxy)"
        } else {
            "key_sha256"
        };
        let limit_source = if raw.and_then(|r| r.get("requests_per_minute")).is_some() {
            ""
        } else {
            " (the default)"
        };
        out.push(format!(
            "  {:<width$}  {:>10} requests/min{limit_source:<14}  {digest}",
            c.name, c.requests_per_minute
        ));
        if let Some(models) = c.models() {
            out.push(format!(
                "  {:<width$}  may use only: {}",
                "",
                patterns(models)
            ));
        }
    }
    let packed = s.config.clients.get(json..).unwrap_or_default();
    let rpm = packed.iter().map(|c| c.requests_per_minute);
    if let (Some(lo), Some(hi)) = (rpm.clone().min(), rpm.max()) {
        let range = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo} to {hi}")
        };
        out.push(format!(
            "  and {} clients in key_set (key_sha256), {range} requests/min",
            packed.len()
        ));
    }
}

fn default_limit(s: &Subject, out: &mut Vec<String>) {
    let written = s
        .raw
        .get("default_requests_per_minute")
        .and_then(Value::as_u64);
    let line = match written {
        Some(v) => format!("default limit: {v} requests/min (default_requests_per_minute)"),
        None => format!(
            "default limit: {DEFAULT_REQUESTS_PER_MINUTE} requests/min (Tollgate's default; \
             default_requests_per_minute is not set)"
        ),
    };
    out.push(line);
    out.push(
        "  for clients without requests_per_minute; a window is one wall-clock minute, and \
         refused requests do not count"
            .into(),
    );
}

fn env_status(s: &Subject, name: &str) -> &'static str {
    match s.env.iter().find(|u| u.name == name).map(|u| u.source) {
        Some(EnvSource::Here) => "set here",
        Some(EnvSource::KeyValues) => "set in vm_config.environment_variables.key_values",
        Some(EnvSource::Placeholder) => "not set here: checked with a placeholder",
        Some(EnvSource::NotListed) => "not in host_env_keys: the filter cannot see it",
        None => "not read",
    }
}

fn upstream(s: &Subject, out: &mut Vec<String>) {
    let Mode::Single(upstream) = &s.config.mode else {
        return;
    };
    let name = &upstream.api_key_env;
    out.push(format!(
        "upstream: one provider for every request, its key from environment variable {name} ({})",
        env_status(s, name)
    ));
    out.push(
        "  sent as `authorization: Bearer <provider key>` to the route of the Envoy config; the \
         client's key and x-tollgate-* headers are removed"
            .into(),
    );
}

fn routing<'a>(s: &Subject<'a>) -> Option<&'a Routing> {
    match &s.config.mode {
        Mode::Routed(r) => Some(r),
        Mode::Single(_) => None,
    }
}

fn providers(s: &Subject, out: &mut Vec<String>) {
    let Some(r) = routing(s) else {
        return;
    };
    out.push(format!(
        "providers ({}), each with its own key sent as `authorization: Bearer <key>`:",
        r.providers.len()
    ));
    for p in &r.providers {
        let mut line = format!(
            "  {}: cluster {}, key from {} ({})",
            p.name,
            p.cluster,
            p.api_key_env,
            env_status(s, &p.api_key_env)
        );
        if let Some(a) = &p.authority {
            line.push_str(&format!(", authority {a}"));
        }
        if !p.path_prefix.is_empty() {
            line.push_str(&format!(", paths prefixed with {}", p.path_prefix));
        }
        if !p.headers.is_empty() {
            // Names only: a header value may well be a credential.
            let names: Vec<&str> = p.headers.iter().map(|(n, _)| n.as_str()).collect();
            line.push_str(&format!(", also sends {}", names.join(", ")));
        }
        out.push(line);
    }
    let default = r
        .default_provider
        .and_then(|id| r.providers.get(id))
        .map(|p| p.name.as_str());
    out.push(match default {
        Some(name) => format!("  requests outside the model endpoints go to {name}"),
        None => {
            "  requests outside the model endpoints have no provider (no default_provider)".into()
        }
    });
}

fn model_routes(s: &Subject, out: &mut Vec<String>) {
    let Some(r) = routing(s) else {
        return;
    };
    out.push(format!(
        "model routes ({}), by the request body's `model`; an exact name wins over a glob, then \
         the first matching rule; later providers of a rule are fallbacks:",
        r.rules.len()
    ));
    for rule in &r.rules {
        let targets: Vec<String> = rule
            .targets
            .iter()
            .map(|t| {
                let name = r.providers.get(t.provider).map_or("?", |p| p.name.as_str());
                match &t.model {
                    Some(m) => format!("{name} (as {m})"),
                    None => name.to_string(),
                }
            })
            .collect();
        out.push(format!(
            "  {} -> {}",
            rule.pattern.as_str(),
            targets.join(" -> ")
        ));
    }
    out.push(format!(
        "  request bodies are read up to {} bytes to find the model",
        r.max_body_bytes
    ));
}

fn limiter(s: &Subject, out: &mut Vec<String>) {
    match &s.config.limiter {
        LimiterBackend::Local => {
            out.push("limiter: local (Envoy shared data)".into());
            out.push(
                "  one budget per Envoy process, shared by its worker threads: N Envoy replicas \
                 grant each client N x its limit"
                    .into(),
            );
        }
        LimiterBackend::Redis(r) => redis(s, r, out),
    }
}

fn redis(s: &Subject, r: &RedisLimiter, out: &mut Vec<String>) {
    out.push(
        "limiter: redis, through Webdis (one budget per client shared by every Envoy replica)"
            .into(),
    );
    out.push(format!(
        "  cluster     {} (the Envoy cluster of the Webdis service)",
        r.webdis.cluster
    ));
    out.push(format!("  authority   {}", r.webdis.authority));
    let default = if r.webdis.timeout_ms == DEFAULT_REDIS_TIMEOUT_MS
        && s.raw.pointer("/limiter/timeout_ms").is_none()
    {
        " (the default)"
    } else {
        ""
    };
    out.push(format!(
        "  timeout     {} ms{default}; a slower answer counts as Redis not answering",
        r.webdis.timeout_ms
    ));
    let auth = match s
        .raw
        .pointer("/limiter/basic_auth_env")
        .and_then(Value::as_str)
    {
        Some(name) => format!(
            "basic auth from environment variable {name} ({})",
            env_status(s, name)
        ),
        None => "none (Webdis must accept callouts without credentials)".into(),
    };
    out.push(format!("  webdis auth {auth}"));
    let on_error = match r.on_error {
        OnError::Allow => "allow: admitted without a limit (fail open)",
        OnError::Deny => {
            "deny: refused with 503 limiter_unavailable and retry-after: 1 (fail closed; Redis is \
             a hard dependency of every request)"
        }
        OnError::Local => {
            "local: counted in this Envoy's shared-data limiter with the same per-client limits \
             until Redis answers again (each replica grants the full budget meanwhile)"
        }
    };
    out.push(format!(
        "  on_error    when Redis cannot answer, a request is {on_error}"
    ));
}

/// The models requests can be billed as that have no price (counted in tokens only): each
/// rule's targets' upstream names, or the rule's own name when it is exact; a glob rule
/// without an upstream name bills whatever matches, priced only where the table names it.
pub fn unpriced(config: &Config) -> Vec<String> {
    let Mode::Routed(r) = &config.mode else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for rule in &r.rules {
        for t in &rule.targets {
            let billed = match (&t.model, rule.pattern.is_glob()) {
                (Some(m), _) => m.clone(),
                (None, false) => rule.pattern.as_str().to_string(),
                (None, true) => format!(
                    "{} (a glob: no price names a model it matches)",
                    rule.pattern.as_str()
                ),
            };
            let name = billed.split(' ').next().unwrap_or_default();
            // A glob is unpriced when no price in the table is one of the names it matches.
            let unpriced = if rule.pattern.is_glob() && t.model.is_none() {
                !config
                    .prices
                    .models
                    .iter()
                    .any(|p| rule.pattern.matches(&p.model))
            } else {
                config.prices.find(name).is_none()
            };
            if unpriced && !out.contains(&billed) {
                out.push(billed);
            }
        }
    }
    out
}

fn prices(s: &Subject, out: &mut Vec<String>) {
    let p = &s.config.prices;
    if p.models.is_empty() {
        if routing(s).is_some() {
            out.push("prices: none (spend is not counted; money budgets cannot be met)".into());
        }
        return;
    }
    out.push(format!(
        "prices ({}), in {} per million tokens (input / cached input / output); spend is counted \
         in micro-units of {} per client and model (tollgate_spend_micros_total):",
        p.models.len(),
        p.currency,
        p.currency
    ));
    let width = p.models.iter().map(|m| m.model.len()).max().unwrap_or(0);
    for m in &p.models {
        out.push(format!(
            "  {:<width$}  {} / {} / {}",
            m.model,
            format_micros(m.input),
            format_micros(m.cached_input),
            format_micros(m.output)
        ));
    }
    let missing = unpriced(s.config);
    if !missing.is_empty() {
        out.push(format!(
            "  without a price (counted in tokens only, free for money budgets): {}",
            missing.join(", ")
        ));
    }
}

fn budgets(s: &Subject, out: &mut Vec<String>) {
    let with: Vec<_> = s
        .config
        .clients
        .iter()
        .filter(|c| !c.budgets().is_empty())
        .collect();
    if with.is_empty() {
        return;
    }
    let offset = s.config.budget_utc_offset_minutes;
    let zone = if offset == 0 {
        "UTC".to_string()
    } else {
        format!(
            "UTC{}{:02}:{:02}",
            if offset < 0 { '-' } else { '+' },
            offset.abs() / 60,
            offset.abs() % 60
        )
    };
    out.push(format!(
        "budgets ({} clients), reserved at admission and settled to the reported usage; days, \
         ISO weeks (from Monday) and calendar months start at midnight {zone}:",
        with.len()
    ));
    let currency = &s.config.prices.currency;
    for c in with {
        let parts: Vec<String> = c
            .budgets()
            .iter()
            .map(|b| {
                let limits: Vec<String> = Measure::ALL
                    .iter()
                    .filter_map(|&m| {
                        b.limit(m).map(|v| match m {
                            Measure::Money => format!("{} {currency}", format_micros(v)),
                            other => format!("{v} {}", other.as_str()),
                        })
                    })
                    .collect();
                format!("{} per {}", limits.join(" + "), b.period.as_str())
            })
            .collect();
        out.push(format!("  {}: {}", c.name, parts.join("; ")));
    }
    let long = s
        .config
        .clients
        .iter()
        .any(|c| c.budgets().iter().any(|b| b.period > Period::Minute));
    match (&s.config.limiter, long) {
        (LimiterBackend::Local, true) => out.push(
            "  with the local limiter (limiter.budgets_on_restart: reset), budgets live in this \
             Envoy's shared data: a restart of Envoy starts every window from zero, and each \
             replica grants the whole budget (use the Redis limiter for durable, shared budgets)"
                .into(),
        ),
        (LimiterBackend::Redis(_), _) => out.push(
            "  counted in Redis, shared by every replica and kept across Envoy restarts (as \
             durable as Redis's persistence)"
                .into(),
        ),
        _ => {}
    }
}

fn cache_settings(c: &Settings) -> String {
    let scope = match c.scope {
        Scope::Client => "per client",
        Scope::Shared => "shared by all clients",
    };
    let temperature = match c.temperature {
        Temperature::Zero => "temperature 0",
        Temperature::ZeroOrAbsent => "temperature 0 or unset",
    };
    let tools = if c.allow_tools { ", tools allowed" } else { "" };
    format!(
        "{} backend, {} s, bodies up to {} bytes, {scope}, {temperature}{tools}",
        c.backend.name(),
        c.ttl_s,
        c.max_entry_bytes
    )
}

fn cache(s: &Subject, out: &mut Vec<String>) {
    let c = &s.config.cache;
    if !c.enabled() {
        return;
    }
    out.push(
        "response cache: identical repeatable requests (no stream, n 1, no tools) answered          from the cache after the limits are counted (see docs/cache.md):"
            .into(),
    );
    if let Some(r) = routing(s) {
        for (rule, settings) in r.rules.iter().zip(&c.rules) {
            if let Some(settings) = settings {
                out.push(format!(
                    "  model {}: {}",
                    rule.pattern.as_str(),
                    cache_settings(settings)
                ));
            }
        }
    }
    for (client, setting) in s.config.clients.iter().zip(&c.clients) {
        match setting {
            ClientCache::Inherit => {}
            ClientCache::Off => out.push(format!("  client {}: never cached", client.name)),
            ClientCache::On(settings) => out.push(format!(
                "  client {}: {} (instead of the model's)",
                client.name,
                cache_settings(settings)
            )),
        }
    }
    if let Some(local) = c.local {
        out.push(format!(
            "  local: at most {} entries in Envoy shared data, per Envoy process",
            local.slots
        ));
    }
    if let (Some(r), true) = (&c.redis, c.uses(Backend::Redis)) {
        out.push(format!(
            "  redis: through Webdis on cluster {} ({} ms timeout), shared by every replica",
            r.cluster, r.timeout_ms
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f";

    fn explained(json: &str) -> String {
        let env = |_: &str| Some("sk-x:y".to_string());
        let config = Config::parse(json.as_bytes(), &env).unwrap();
        let raw: Value = serde_json::from_str(json).unwrap();
        let used = [EnvUse {
            name: "P".into(),
            source: EnvSource::Placeholder,
        }];
        explain(&Subject {
            config: &config,
            raw: &raw,
            env: &used,
        })
    }

    #[test]
    fn local_config() {
        let text = explained(&format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{SHA}","requests_per_minute":120}},
                {{"name":"legacy","key_md5":"32bd3c47e408828a22d81d4fe5f3c06d"}}],
               "upstream":{{"api_key_env":"P"}}}}"#
        ));
        assert!(text.contains("clients (2)"), "{text}");
        assert!(text.contains("team-a         120 requests/min"), "{text}");
        assert!(
            text.contains("legacy          60 requests/min (the default)"),
            "{text}"
        );
        assert!(text.contains("key_md5"), "{text}");
        assert!(
            text.contains("default limit: 60 requests/min (Tollgate's default"),
            "{text}"
        );
        assert!(
            text.contains("environment variable P (not set here"),
            "{text}"
        );
        assert!(text.contains("limiter: local"), "{text}");
        assert!(!text.contains("sk-x"), "never a secret: {text}");
    }

    #[test]
    fn redis_config() {
        let text = explained(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{SHA}"}}],"default_requests_per_minute":7,
               "upstream":{{"api_key_env":"P"}},
               "limiter":{{"backend":"redis","cluster":"webdis","on_error":"deny","basic_auth_env":"W"}}}}"#
        ));
        assert!(
            text.contains("default limit: 7 requests/min (default_requests_per_minute)"),
            "{text}"
        );
        assert!(text.contains("limiter: redis"), "{text}");
        assert!(text.contains("cluster     webdis"), "{text}");
        assert!(text.contains("authority   webdis"), "{text}");
        assert!(text.contains("timeout     100 ms (the default)"), "{text}");
        assert!(
            text.contains("basic auth from environment variable W (not read)"),
            "{text}"
        );
        assert!(text.contains("deny: refused with 503"), "{text}");
    }

    #[test]
    fn routed_config() {
        let text = explained(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{SHA}","models":["gpt-4*"]}}],
               "providers":[
                 {{"name":"relay","cluster":"c1","api_key_env":"P","path_prefix":"/openai",
                   "headers":{{"x-org":"org-secret"}}}},
                 {{"name":"backup","cluster":"c2","api_key_env":"P"}}],
               "models":[
                 {{"match":"gpt-4.1","providers":["relay","backup"],
                   "upstream_models":{{"backup":"gpt-4.1-mini"}}}},
                 {{"match":"gpt-4*","providers":["relay"]}}],
               "default_provider":"relay"}}"#
        ));
        for want in [
            "may use only: gpt-4*",
            "providers (2)",
            "relay: cluster c1, key from P (not set here",
            "paths prefixed with /openai, also sends x-org",
            "requests outside the model endpoints go to relay",
            "model routes (2)",
            "gpt-4.1 -> relay -> backup (as gpt-4.1-mini)",
            "gpt-4* -> relay",
            "read up to 1048576 bytes",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(!text.contains("upstream:"), "{text}");
        assert!(
            !text.contains("org-secret"),
            "header values are not shown: {text}"
        );
    }

    #[test]
    fn cache_config() {
        let text = explained(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{SHA}"}},
                            {{"name":"b","key_md5":"32bd3c47e408828a22d81d4fe5f3c06d","cache":{{"enabled":false}}}}],
               "providers":[{{"name":"relay","cluster":"c1","api_key_env":"P"}}],
               "models":[{{"match":"gpt-4.1","providers":["relay"],"cache":{{"ttl_s":600}}}},
                         {{"match":"faq","providers":["relay"],
                           "cache":{{"backend":"redis","scope":"shared","temperature":"zero_or_absent"}}}},
                         {{"match":"other","providers":["relay"]}}],
               "cache_backends":{{"redis":{{"cluster":"webdis"}}}}}}"#
        ));
        for want in [
            "response cache:",
            "model gpt-4.1: local backend, 600 s, bodies up to 65536 bytes, per client, temperature 0",
            "model faq: redis backend, 3600 s, bodies up to 65536 bytes, shared by all clients, temperature 0 or unset",
            "client b: never cached",
            "local: at most 508 entries",
            "redis: through Webdis on cluster webdis (100 ms timeout)",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(!text.contains("model other"), "{text}");
        let plain = explained(&format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{SHA}"}}],"upstream":{{"api_key_env":"P"}}}}"#
        ));
        assert!(!plain.contains("response cache"), "{plain}");
    }
}

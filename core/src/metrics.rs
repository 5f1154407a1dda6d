//! Metric names. The proxy-wasm ABI has no labels, so labels are encoded in the name
//! (`tollgate_requests_total.client=team-a.outcome=admitted`) and Envoy's `stats_tags` regexes in
//! the provided bootstraps turn them back into Prometheus labels. Label values therefore never
//! contain `.`; every value is a configured name or a fixed word, never request input.

/// Client label for requests that did not authenticate (client names cannot start with `_`).
pub const ANONYMOUS: &str = "_anonymous";

/// Model label of requests on the default route (no model rule).
pub const DEFAULT_MODEL: &str = "_default";

/// `model` label of a refusal whose model matched no rule (or was never read).
pub const NO_MODEL: &str = "_none";

/// What happened to a request, for `tollgate_requests_total{client,outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Authenticated, within limits, forwarded upstream.
    Admitted,
    /// Missing, malformed or unknown key (401).
    Unauthorized,
    /// Over a limit (429).
    RateLimited,
    /// Refused before any upstream call: malformed body, unknown or forbidden model, too
    /// large, unknown URL (400, 403, 404, 413).
    Invalid,
    /// The filter or a dependency failed (500, 503).
    Error,
}

impl Outcome {
    /// Every outcome, for defining metrics up front.
    pub const ALL: [Outcome; 5] = [
        Outcome::Admitted,
        Outcome::Unauthorized,
        Outcome::RateLimited,
        Outcome::Invalid,
        Outcome::Error,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::Unauthorized => "unauthorized",
            Outcome::RateLimited => "rate_limited",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }

    /// Dense index, for metric-id tables.
    pub fn index(self) -> usize {
        match self {
            Outcome::Admitted => 0,
            Outcome::Unauthorized => 1,
            Outcome::RateLimited => 2,
            Outcome::Invalid => 3,
            Outcome::Error => 4,
        }
    }
}

/// Makes a string safe as a label value: `.` separates labels, so it becomes `_`
/// (`gpt-4.1` is exported as `gpt-4_1`); anything outside `[A-Za-z0-9_:-]` becomes `_` too.
pub fn label_value(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `tollgate_requests_total{client,outcome}`.
pub fn requests_total(client: &str, outcome: Outcome) -> String {
    format!(
        "tollgate_requests_total.client={}.outcome={}",
        label_value(client),
        outcome.as_str()
    )
}

/// `tollgate_refusals_total{client,model,reason}`: requests Tollgate answered itself, by why
/// (`ErrorKind::reason`: `requests_per_minute`, `model_not_allowed`, ...); `model` is the rule
/// the requested model matched (`_default` with one provider, `_none` when none did).
pub fn refusals_total(client: &str, model: &str, reason: &str) -> String {
    format!(
        "tollgate_refusals_total.client={}.model={}.reason={}",
        label_value(client),
        label_value(model),
        label_value(reason)
    )
}

/// `tollgate_limiter_errors_total{backend,reason}`.
pub fn limiter_errors_total(backend: &str, reason: &str) -> String {
    format!(
        "tollgate_limiter_errors_total.backend={}.reason={}",
        label_value(backend),
        label_value(reason)
    )
}

/// `tollgate_upstream_requests_total{provider,model}`: attempts sent to a provider.
pub fn upstream_requests_total(provider: &str, model: &str) -> String {
    format!(
        "tollgate_upstream_requests_total.provider={}.model={}",
        label_value(provider),
        label_value(model)
    )
}

/// `tollgate_fallbacks_total{model,from,to}`: attempts that fell back from one provider to the next.
pub fn fallbacks_total(model: &str, from: &str, to: &str) -> String {
    format!(
        "tollgate_fallbacks_total.model={}.from={}.to={}",
        label_value(model),
        label_value(from),
        label_value(to)
    )
}

/// `tollgate_tokens_total{client,model,kind}`: tokens providers reported, `kind` `prompt` or
/// `completion`.
pub fn tokens_total(client: &str, model: &str, kind: &str) -> String {
    format!(
        "tollgate_tokens_total.client={}.model={}.kind={}",
        label_value(client),
        label_value(model),
        label_value(kind)
    )
}

/// `tollgate_spend_micros_total{client,model}`: what responses cost, in micro-units of the
/// configured currency, `model` being the priced model (the price table's name).
pub fn spend_micros_total(client: &str, model: &str) -> String {
    format!(
        "tollgate_spend_micros_total.client={}.model={}",
        label_value(client),
        label_value(model)
    )
}

/// `tollgate_request_duration_ms{model}` (histogram): admitted requests, from their headers to
/// the end of the response.
pub fn request_duration_ms(model: &str) -> String {
    format!("tollgate_request_duration_ms.model={}", label_value(model))
}

/// `tollgate_stream_first_byte_ms{model}` (histogram): streamed responses, from the request's
/// headers to the response's headers (the provider's time to first token, plus the gateway).
pub fn stream_first_byte_ms(model: &str) -> String {
    format!("tollgate_stream_first_byte_ms.model={}", label_value(model))
}

/// `tollgate_upstream_errors_total{provider,status}`: error answers (4xx, 5xx) per provider.
pub fn upstream_errors_total(provider: &str, status: u16) -> String {
    format!(
        "tollgate_upstream_errors_total.provider={}.status={status}",
        label_value(provider)
    )
}

/// A response-cache counter (`tollgate_cache_*_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheMetric {
    /// Requests answered from the cache.
    Hits,
    /// Lookups that found nothing usable (absent, expired, or the backend failed).
    Misses,
    /// Responses stored.
    Stores,
    /// Body bytes stored.
    StoredBytes,
    /// Body bytes answered from the cache.
    ServedBytes,
    /// Backend failures, by reason (each a miss or a skipped store, never a failed request).
    Errors,
    /// Lookups or stores that did not happen, by reason.
    Skips,
}

impl CacheMetric {
    fn stem(self) -> &'static str {
        match self {
            CacheMetric::Hits => "hits",
            CacheMetric::Misses => "misses",
            CacheMetric::Stores => "stores",
            CacheMetric::StoredBytes => "stored_bytes",
            CacheMetric::ServedBytes => "served_bytes",
            CacheMetric::Errors => "errors",
            CacheMetric::Skips => "skips",
        }
    }

    /// Whether the series has a `reason` label.
    pub fn has_reason(self) -> bool {
        matches!(self, CacheMetric::Errors | CacheMetric::Skips)
    }
}

/// `tollgate_cache_<stem>_total{backend,model}`, plus `reason` for errors and skips.
pub fn cache_total(metric: CacheMetric, backend: &str, model: &str, reason: &str) -> String {
    let mut name = format!(
        "tollgate_cache_{}_total.backend={}.model={}",
        metric.stem(),
        label_value(backend),
        label_value(model)
    );
    if metric.has_reason() {
        name.push_str(".reason=");
        name.push_str(&label_value(reason));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_encode_labels() {
        assert_eq!(
            requests_total("team-a", Outcome::RateLimited),
            "tollgate_requests_total.client=team-a.outcome=rate_limited"
        );
        assert_eq!(
            limiter_errors_total("local", "contention"),
            "tollgate_limiter_errors_total.backend=local.reason=contention"
        );
    }

    #[test]
    fn cache_names() {
        assert_eq!(
            cache_total(CacheMetric::Hits, "local", "gpt-4.1", "ignored"),
            "tollgate_cache_hits_total.backend=local.model=gpt-4_1"
        );
        assert_eq!(
            cache_total(CacheMetric::Errors, "redis", "m", "timeout"),
            "tollgate_cache_errors_total.backend=redis.model=m.reason=timeout"
        );
    }

    #[test]
    fn label_values_never_contain_dots() {
        assert_eq!(label_value("gpt-4.1"), "gpt-4_1");
        assert_eq!(label_value("a b/c.d"), "a_b_c_d");
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
            assert!(!o.as_str().contains('.'));
        }
    }
}

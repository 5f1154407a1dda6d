//! Which headers cross the gateway: a client's request headers reach a provider only when they
//! are on an allow-list (deny by default), and a provider's response headers reach the client
//! unless they describe the provider account.
//!
//! The request side is applied the moment the headers arrive, before Tollgate decides or pauses
//! anything, so no later path (a body, trailers, a limiter reply) can carry a client's
//! credential, an `x-tollgate-*` routing header or an `x-envoy-*` control header upstream.

use crate::headers::Header;

/// Request headers a client may send to a provider, besides the pseudo-headers
/// (`:method`, `:path`, `:scheme`, `:authority`), which Envoy owns. `x-forwarded-proto` is
/// Envoy's too (its connection manager sets it, and its router finds no route without it).
///
/// Everything else is removed: credentials (`authorization`, `x-api-key`, ...: the provider
/// gets only the key Tollgate injects), `x-tollgate-*` and `x-envoy-*` (they steer Tollgate's
/// and Envoy's routing), account selectors (`openai-organization`, `openai-project`: set per
/// provider in the configuration when needed), `cache-control` (a directive to Tollgate's cache),
/// `accept-encoding` (usage is read from the response, which must come back uncompressed),
/// `x-forwarded-for`, `-host`, `-port` and `forwarded` (the client's address is not the provider's business), cookies
/// and anything a provider might read as an instruction.
pub const FORWARDED: &[&str] = &[
    "x-forwarded-proto",
    "content-type",
    "content-length",
    "transfer-encoding",
    "te",
    "accept",
    "user-agent",
    "x-request-id",
    "traceparent",
    "tracestate",
    "idempotency-key",
    "openai-beta",
    "anthropic-version",
    "anthropic-beta",
];

/// Prefixes of forwarded request headers: the OpenAI SDKs' platform telemetry.
pub const FORWARDED_PREFIXES: &[&str] = &["x-stainless-"];

/// The built-in forwarded headers that can change a provider's answer: with the configuration's
/// `forward_headers`, these are part of a response-cache key; the rest of [`FORWARDED`] and
/// [`FORWARDED_PREFIXES`] cannot change an answer.
const VARYING: &[&str] = &["openai-beta", "anthropic-version", "anthropic-beta"];

/// Provider response headers a client never sees: they name or describe the provider account
/// behind the gateway (its organisation and project, its cookies, its own rate-limit budget,
/// which Tollgate replaces with the client's).
pub const RESPONSE_STRIPPED: &[&str] = &[
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
    "set-cookie",
    // Envoy's count of the attempts (routing's `include_attempt_count_in_response`, which
    // Tollgate reads): how often the providers failed is not the client's business.
    "x-envoy-attempt-count",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
];

/// Whether a client's request header may reach a provider. `extra` holds the configuration's
/// `forward_headers` (lowercase).
pub fn forwarded(name: &[u8], extra: &[String]) -> bool {
    if name.first() == Some(&b':') {
        return true;
    }
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    FORWARDED.iter().any(|n| is(n))
        || extra.iter().any(|n| is(n))
        || FORWARDED_PREFIXES.iter().any(|p| {
            name.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes()))
        })
}

/// The request headers to remove before anything else happens: every name not forwarded,
/// lowercase, each once.
pub fn strip_list(headers: &[Header], extra: &[String]) -> Vec<Vec<u8>> {
    let mut remove: Vec<Vec<u8>> = Vec::new();
    for (name, _) in headers {
        if !forwarded(name, extra) && !remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            remove.push(name.to_ascii_lowercase());
        }
    }
    remove
}

/// The forwarded request headers that can change a provider's answer, lowercase and sorted
/// (with their values), for the response-cache key.
pub fn varying(headers: &[Header], extra: &[String]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let is = |name: &[u8], n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = headers
        .iter()
        .filter(|(n, _)| VARYING.iter().any(|v| is(n, v)) || extra.iter().any(|v| is(n, v)))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec()))
        .collect();
    out.sort();
    out
}

/// The provider response headers to remove, among those present (lowercase, each once), except
/// the names in `replaced` (set by Tollgate anyway, which replaces any value).
pub fn response_strip_list(headers: &[Header], replaced: &[&str]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for (name, _) in headers {
        if let Some(n) = RESPONSE_STRIPPED
            .iter()
            .find(|n| name.eq_ignore_ascii_case(n.as_bytes()))
        {
            if !replaced.contains(n) && !out.contains(n) {
                out.push(n);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fake::view as h;

    #[test]
    fn only_allowed_request_headers_are_forwarded() {
        let headers = h(&[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "gw"),
            ("authorization", "Bearer sk-client"),
            ("Authorization", "Bearer sk-again"),
            ("x-api-key", "sk-other"),
            ("api-key", "sk-azure"),
            ("proxy-authorization", "Basic x"),
            ("x-tollgate-route", "r0"),
            ("x-envoy-original-path", "/forged"),
            ("x-envoy-max-retries", "9"),
            ("openai-organization", "org-other"),
            ("openai-project", "proj-other"),
            ("cookie", "a=b"),
            ("cache-control", "no-cache"),
            ("accept-encoding", "gzip"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=1.2.3.4"),
            ("x-mock-status", "500"),
            ("content-type", "application/json"),
            ("content-length", "10"),
            ("user-agent", "OpenAI/Python"),
            ("x-stainless-lang", "python"),
            ("openai-beta", "assistants=v2"),
            ("x-request-id", "envoy-made"),
        ]);
        let strip = strip_list(&headers, &[]);
        let names: Vec<&[u8]> = strip.iter().map(Vec::as_slice).collect();
        assert_eq!(
            names,
            vec![
                b"authorization".as_slice(),
                b"x-api-key",
                b"api-key",
                b"proxy-authorization",
                b"x-tollgate-route",
                b"x-envoy-original-path",
                b"x-envoy-max-retries",
                b"openai-organization",
                b"openai-project",
                b"cookie",
                b"cache-control",
                b"accept-encoding",
                b"x-forwarded-for",
                b"forwarded",
                b"x-mock-status",
            ]
        );
        // An operator may forward more.
        let strip = strip_list(&headers, &["x-mock-status".to_string()]);
        assert!(!strip.iter().any(|n| n == b"x-mock-status"));
    }

    #[test]
    fn the_cache_key_covers_every_forwarded_header_that_can_change_the_answer() {
        let headers = h(&[
            (":path", "/v1/chat/completions"),
            ("user-agent", "a"),
            ("x-stainless-os", "Linux"),
            ("OpenAI-Beta", "x"),
            ("x-custom", "1"),
            ("anthropic-version", "2023-06-01"),
            ("authorization", "Bearer k"),
        ]);
        assert_eq!(
            varying(&headers, &["x-custom".to_string()]),
            vec![
                (b"anthropic-version".to_vec(), b"2023-06-01".to_vec()),
                (b"openai-beta".to_vec(), b"x".to_vec()),
                (b"x-custom".to_vec(), b"1".to_vec()),
            ]
        );
        assert_eq!(
            varying(&headers, &[]),
            vec![
                (b"anthropic-version".to_vec(), b"2023-06-01".to_vec()),
                (b"openai-beta".to_vec(), b"x".to_vec()),
            ]
        );
    }

    #[test]
    fn account_headers_of_the_provider_do_not_reach_clients() {
        let headers = h(&[
            (":status", "200"),
            ("openai-organization", "org-secret"),
            ("OpenAI-Project", "proj"),
            ("set-cookie", "__cf_bm=1"),
            ("set-cookie", "x=2"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-remaining-tokens", "1"),
            ("openai-processing-ms", "12"),
            ("anthropic-ratelimit-input-tokens-remaining", "7"),
        ]);
        assert_eq!(
            response_strip_list(&headers, &["x-ratelimit-remaining-requests"]),
            vec![
                "openai-organization",
                "openai-project",
                "set-cookie",
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-input-tokens-remaining"
            ]
        );
    }
}

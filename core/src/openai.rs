//! What clients see when Tollgate answers itself: OpenAI-shaped error bodies and OpenAI's
//! rate-limit headers, so OpenAI SDKs raise the same exceptions they raise against the provider.

use serde::Serialize;

use crate::spend::{format_micros, Measure};
use crate::types::push_decimal;

/// A response the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u16,
    /// Response headers besides `content-type`.
    pub headers: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: String,
    /// The error it reports (`None` for an answer, such as `GET /v1/models`).
    pub kind: Option<ErrorKind>,
}

/// Every error Tollgate produces; one row each in `docs/errors.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 401: no key, a malformed key or an unknown key (one answer for all, no oracle).
    InvalidApiKey,
    /// 429: the client's requests-per-minute budget is spent.
    RequestsRateLimited,
    /// 429: the client's tokens-per-minute budget cannot cover the request.
    TokensRateLimited,
    /// 500: the filter could not do its job (a host call failed).
    Internal,
    /// 503: the limiter cannot answer and `on_error` is `deny`.
    LimiterUnavailable,
    /// 400: the body is not JSON (OpenAI: code null).
    MalformedBody,
    /// 400: no `model` (OpenAI: code null, param "model").
    MissingModel,
    /// 403: the client may not use this model.
    ModelNotAllowed,
    /// 404: no rule serves this model.
    ModelNotFound,
    /// 404: not an endpoint this gateway serves (OpenAI: code null).
    UnknownUrl,
    /// 413: the body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// 411: a body of unknown length where Tollgate needs its length (one-provider mode).
    LengthRequired,
    /// 429: a money budget (per hour, day, week, month...) cannot cover the request.
    InsufficientQuota,
    /// 429: a request budget over a window other than the per-minute limit is spent.
    RequestsBudget,
    /// 429: a token budget over a window other than the per-minute limit cannot cover it.
    TokensBudget,
}

impl ErrorKind {
    /// HTTP status of this error.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidApiKey => 401,
            ErrorKind::RequestsRateLimited | ErrorKind::TokensRateLimited => 429,
            ErrorKind::Internal => 500,
            ErrorKind::LimiterUnavailable => 503,
            ErrorKind::MalformedBody | ErrorKind::MissingModel => 400,
            ErrorKind::ModelNotAllowed => 403,
            ErrorKind::ModelNotFound | ErrorKind::UnknownUrl => 404,
            ErrorKind::BodyTooLarge => 413,
            ErrorKind::LengthRequired => 411,
            ErrorKind::InsufficientQuota | ErrorKind::RequestsBudget | ErrorKind::TokensBudget => {
                429
            }
        }
    }

    /// OpenAI's `error.type`.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidApiKey
            | ErrorKind::MalformedBody
            | ErrorKind::MissingModel
            | ErrorKind::ModelNotAllowed
            | ErrorKind::ModelNotFound
            | ErrorKind::UnknownUrl
            | ErrorKind::BodyTooLarge
            | ErrorKind::LengthRequired => "invalid_request_error",
            ErrorKind::RequestsRateLimited | ErrorKind::RequestsBudget => "requests",
            ErrorKind::TokensRateLimited | ErrorKind::TokensBudget => "tokens",
            ErrorKind::InsufficientQuota => "insufficient_quota",
            ErrorKind::Internal | ErrorKind::LimiterUnavailable => "server_error",
        }
    }

    /// OpenAI's `error.code` (null for some errors, as OpenAI sends them).
    pub fn code(self) -> Option<&'static str> {
        match self {
            ErrorKind::InvalidApiKey => Some("invalid_api_key"),
            ErrorKind::RequestsRateLimited
            | ErrorKind::TokensRateLimited
            | ErrorKind::RequestsBudget
            | ErrorKind::TokensBudget => Some("rate_limit_exceeded"),
            ErrorKind::InsufficientQuota => Some("insufficient_quota"),
            ErrorKind::Internal => Some("internal_error"),
            ErrorKind::LimiterUnavailable => Some("limiter_unavailable"),
            ErrorKind::ModelNotAllowed => Some("model_not_allowed"),
            ErrorKind::ModelNotFound => Some("model_not_found"),
            ErrorKind::BodyTooLarge => Some("request_too_large"),
            ErrorKind::LengthRequired => Some("length_required"),
            ErrorKind::MalformedBody | ErrorKind::MissingModel | ErrorKind::UnknownUrl => None,
        }
    }

    /// Why, in the access log's words (its `reason` field): for a 429, the limit that refused.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::RequestsRateLimited => "requests_per_minute",
            ErrorKind::TokensRateLimited => "tokens_per_minute",
            ErrorKind::Internal => "internal_error",
            ErrorKind::LimiterUnavailable => "limiter_unavailable",
            ErrorKind::MalformedBody => "malformed_body",
            ErrorKind::MissingModel => "missing_model",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::UnknownUrl => "unknown_url",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::LengthRequired => "length_required",
            ErrorKind::InsufficientQuota => "budget_money",
            ErrorKind::RequestsBudget => "budget_requests",
            ErrorKind::TokensBudget => "budget_tokens",
        }
    }

    /// OpenAI's `error.param`.
    pub fn param(self) -> Option<&'static str> {
        match self {
            ErrorKind::MissingModel | ErrorKind::ModelNotAllowed | ErrorKind::ModelNotFound => {
                Some("model")
            }
            _ => None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// The JSON body `{"error":{"message","type","param","code"}}`.
pub fn error_body(kind: ErrorKind, message: &str) -> String {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            error_type: kind.error_type(),
            param: kind.param(),
            code: kind.code(),
        },
    };
    // Serialising plain strings cannot fail; the fallback keeps the shape if it ever did.
    serde_json::to_string(&body).unwrap_or_else(|_| {
        format!(
            r#"{{"error":{{"message":"error","type":"{}","param":null,"code":null}}}}"#,
            kind.error_type()
        )
    })
}

/// 401 for every key failure, with the same body whatever was wrong.
pub fn invalid_api_key() -> LocalReply {
    LocalReply {
        status: ErrorKind::InvalidApiKey.status(),
        headers: vec![("www-authenticate", "Bearer".to_string())],
        body: error_body(
            ErrorKind::InvalidApiKey,
            "Incorrect API key provided. Send your Tollgate client key as \
             'Authorization: Bearer <key>'.",
        ),
        kind: Some(ErrorKind::InvalidApiKey),
    }
}

/// 401 for a client key past its `expires_at`: the same status, code and header as
/// [`invalid_api_key`] (SDKs treat it alike), with a message that says what to do.
pub fn expired_api_key() -> LocalReply {
    LocalReply {
        status: ErrorKind::InvalidApiKey.status(),
        headers: vec![("www-authenticate", "Bearer".to_string())],
        body: error_body(
            ErrorKind::InvalidApiKey,
            "This API key has expired. Ask the gateway's operator for a new key.",
        ),
        kind: Some(ErrorKind::InvalidApiKey),
    }
}

/// 429 with OpenAI's request-limit headers and `retry-after`.
pub fn requests_rate_limited(client: &str, limit: u64, reset_ms: u64) -> LocalReply {
    let mut headers = rate_limit_request_headers(limit, 0, reset_ms);
    headers.push(("retry-after", retry_after_secs(reset_ms).to_string()));
    LocalReply {
        status: ErrorKind::RequestsRateLimited.status(),
        headers,
        body: error_body(
            ErrorKind::RequestsRateLimited,
            &format!(
                "Rate limit reached for client {client} on requests per minute (RPM): \
                 Limit {limit}, Used {limit}, Requested 1. Please try again in {}.",
                openai_duration(reset_ms)
            ),
        ),
        kind: Some(ErrorKind::RequestsRateLimited),
    }
}

/// 429 for tokens, with OpenAI's token-limit headers and `retry-after`.
pub fn tokens_rate_limited(
    client: &str,
    limit: u64,
    remaining: u64,
    requested: u64,
    reset_ms: u64,
) -> LocalReply {
    let mut headers = rate_limit_token_headers(limit, remaining, reset_ms);
    headers.push(("retry-after", retry_after_secs(reset_ms).to_string()));
    LocalReply {
        status: ErrorKind::TokensRateLimited.status(),
        headers,
        body: error_body(
            ErrorKind::TokensRateLimited,
            &format!(
                "Rate limit reached for client {client} on tokens per minute (TPM): Limit \
                 {limit}, Used {}, Requested {requested}. Please try again in {}.",
                limit.saturating_sub(remaining),
                openai_duration(reset_ms)
            ),
        ),
        kind: Some(ErrorKind::TokensRateLimited),
    }
}

/// `x-ratelimit-{limit,remaining,reset}-tokens` for the client's own token budget.
pub fn rate_limit_token_headers(
    limit: u64,
    remaining: u64,
    reset_ms: u64,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(4);
    push_rate_limit_headers(&mut out, &TOKEN_HEADERS, limit, remaining, reset_ms);
    out
}

/// OpenAI's names of a request budget's headers: limit, remaining, reset.
pub const REQUEST_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];

/// OpenAI's names of a token budget's headers: limit, remaining, reset.
pub const TOKEN_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// One budget's three `x-ratelimit-*` headers (`names`: [`REQUEST_HEADERS`] or
/// [`TOKEN_HEADERS`]), added to `out`.
pub fn push_rate_limit_headers(
    out: &mut Vec<(&'static str, String)>,
    names: &[&'static str; 3],
    limit: u64,
    remaining: u64,
    reset_ms: u64,
) {
    let [limit_name, remaining_name, reset_name] = *names;
    out.push((limit_name, limit.to_string()));
    out.push((remaining_name, remaining.to_string()));
    out.push((reset_name, openai_duration(reset_ms)));
}

/// 500 when the filter itself failed.
pub fn internal_error() -> LocalReply {
    LocalReply {
        status: ErrorKind::Internal.status(),
        headers: Vec::new(),
        body: error_body(
            ErrorKind::Internal,
            "The gateway could not process the request. Please retry; if the error persists, \
             contact the gateway's operators.",
        ),
        kind: Some(ErrorKind::Internal),
    }
}

fn error(kind: ErrorKind, message: &str) -> LocalReply {
    LocalReply {
        status: kind.status(),
        headers: Vec::new(),
        body: error_body(kind, message),
        kind: Some(kind),
    }
}

/// A 200 JSON answer made by the gateway (`GET /v1/models`).
pub fn json_ok(body: String) -> LocalReply {
    LocalReply {
        status: 200,
        headers: Vec::new(),
        body,
        kind: None,
    }
}

/// 400: the body is not a JSON object.
pub fn malformed_body(why: &str) -> LocalReply {
    error(
        ErrorKind::MalformedBody,
        &format!(
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.) \
             Parser: {why}"
        ),
    )
}

/// 400: no usable `model`.
pub fn missing_model() -> LocalReply {
    error(
        ErrorKind::MissingModel,
        "you must provide a model parameter (a non-empty string)",
    )
}

/// 403: the client's allow-list does not include the model.
pub fn model_not_allowed(client: &str, model: &str) -> LocalReply {
    error(
        ErrorKind::ModelNotAllowed,
        &format!("Client {client} is not allowed to use model `{model}`."),
    )
}

/// 404: no rule serves the model.
pub fn model_not_found(model: &str) -> LocalReply {
    error(
        ErrorKind::ModelNotFound,
        &format!("The model `{model}` does not exist or you do not have access to it."),
    )
}

/// 404: not an endpoint this gateway serves.
pub fn unknown_url(method: &str, path: &str) -> LocalReply {
    error(
        ErrorKind::UnknownUrl,
        &format!("Invalid URL ({method} {path})"),
    )
}

/// 411: the body's length must be declared (`content-length`).
pub fn length_required() -> LocalReply {
    error(
        ErrorKind::LengthRequired,
        "This gateway needs the request body's length: send a content-length header.",
    )
}

/// 413: the body is over `max_body_bytes`.
pub fn body_too_large(max: usize) -> LocalReply {
    error(
        ErrorKind::BodyTooLarge,
        &format!("The request body is larger than this gateway accepts ({max} bytes)."),
    )
}

/// 503 when the limiter is down and configured to fail closed.
pub fn limiter_unavailable() -> LocalReply {
    LocalReply {
        status: ErrorKind::LimiterUnavailable.status(),
        headers: vec![("retry-after", "1".to_string())],
        body: error_body(
            ErrorKind::LimiterUnavailable,
            "The gateway's rate limiter is unavailable, so the request was not sent. \
             Please retry shortly.",
        ),
        kind: Some(ErrorKind::LimiterUnavailable),
    }
}

/// `x-tollgate-budget`: which budget refused a request, `<measure>-per-<window>`.
pub const BUDGET_HEADER: &str = "x-tollgate-budget";

/// 429 for a budget over a window (money: `insufficient_quota`, as OpenAI answers a used-up
/// quota), with headers naming the budget, its limit, what remains and when it resets:
/// `x-tollgate-budget` (`money-per-day`), `x-tollgate-budget-limit`,
/// `x-tollgate-budget-remaining` (money in currency units), `x-tollgate-budget-reset` (seconds),
/// `retry-after`, and `x-should-retry: false` when the reset is more than a minute away (the
/// OpenAI SDKs then do not retry in vain).
#[allow(clippy::too_many_arguments)]
pub fn budget_exceeded(
    client: &str,
    window: &str,
    measure: Measure,
    limit: u64,
    remaining: u64,
    requested: u64,
    reset_ms: u64,
    currency: &str,
) -> LocalReply {
    let amount = |n: u64| match measure {
        Measure::Money => format_micros(n),
        _ => n.to_string(),
    };
    let shown = |n: u64| match measure {
        Measure::Money => format!("{} {currency}", format_micros(n)),
        _ => n.to_string(),
    };
    let secs = retry_after_secs(reset_ms);
    let mut headers = vec![
        (BUDGET_HEADER, format!("{}-per-{window}", measure.as_str())),
        ("x-tollgate-budget-limit", amount(limit)),
        ("x-tollgate-budget-remaining", amount(remaining)),
        ("x-tollgate-budget-reset", secs.to_string()),
        ("retry-after", secs.to_string()),
    ];
    if reset_ms > 60_000 {
        headers.push(("x-should-retry", "false".to_string()));
    }
    let kind = match measure {
        Measure::Money => ErrorKind::InsufficientQuota,
        Measure::Requests => ErrorKind::RequestsBudget,
        Measure::Tokens => ErrorKind::TokensBudget,
    };
    let message = match measure {
        Measure::Money => format!(
            "You exceeded your current quota: client {client} has a budget of {} per {window}, \
             {} left, and this request may cost up to {}. The budget resets in {}.",
            shown(limit),
            shown(remaining),
            shown(requested),
            openai_duration(reset_ms)
        ),
        _ => format!(
            "Budget reached for client {client} on {} per {window}: Limit {limit}, Used {}, \
             Requested {requested}. The budget resets in {}.",
            measure.as_str(),
            limit.saturating_sub(remaining),
            openai_duration(reset_ms)
        ),
    };
    LocalReply {
        status: kind.status(),
        headers,
        body: error_body(kind, &message),
        kind: Some(kind),
    }
}

/// `x-ratelimit-{limit,remaining,reset}-requests` for the client's own budget.
pub fn rate_limit_request_headers(
    limit: u64,
    remaining: u64,
    reset_ms: u64,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(4);
    push_rate_limit_headers(&mut out, &REQUEST_HEADERS, limit, remaining, reset_ms);
    out
}

/// `retry-after` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(reset_ms: u64) -> u64 {
    reset_ms.div_ceil(1000).max(1)
}

/// OpenAI's duration format for reset headers (`17s`, `1m0s`, `250ms`), rounded up to whole
/// seconds above one second so clients never retry early.
pub fn openai_duration(ms: u64) -> String {
    // Digits written straight into the one string, not `format!` or temporary `to_string`s:
    // two of these are written on every admitted response.
    let mut out = String::with_capacity(16);
    if ms < 1000 {
        push_decimal(&mut out, ms);
        out.push_str("ms");
        return out;
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        push_decimal(&mut out, h);
        out.push('h');
    }
    if h > 0 || m > 0 {
        push_decimal(&mut out, m);
        out.push('m');
    }
    push_decimal(&mut out, s);
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn error_bodies_have_openai_shape() {
        let r = invalid_api_key();
        assert_eq!(r.status, 401);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "invalid_api_key");
        assert!(e["param"].is_null());
        assert!(e["message"].as_str().unwrap().contains("API key"));
        assert_eq!(r.headers, vec![("www-authenticate", "Bearer".to_string())]);
    }

    #[test]
    fn rate_limited_reply_carries_headers() {
        let r = requests_rate_limited("team-a", 60, 16_200);
        assert_eq!(r.status, 429);
        let h: std::collections::HashMap<_, _> = r.headers.iter().cloned().collect();
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "17s");
        assert_eq!(h["retry-after"], "17");
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");
    }

    #[test]
    fn limiter_unavailable_is_a_retryable_503() {
        let r = limiter_unavailable();
        assert_eq!(r.status, 503);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "limiter_unavailable");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(r.headers, vec![("retry-after", "1".to_string())]);
    }

    #[test]
    fn routing_errors_match_openai() {
        let cases = [
            (malformed_body("EOF"), 400, None, None),
            (missing_model(), 400, None, Some("model")),
            (
                model_not_allowed("a", "gpt-4.1"),
                403,
                Some("model_not_allowed"),
                Some("model"),
            ),
            (
                model_not_found("gpt-9"),
                404,
                Some("model_not_found"),
                Some("model"),
            ),
            (unknown_url("POST", "/v1/nope"), 404, None, None),
            (body_too_large(1024), 413, Some("request_too_large"), None),
        ];
        for (r, status, code, param) in cases {
            assert_eq!(r.status, status);
            let v: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert_eq!(v["error"]["code"].as_str(), code);
            assert_eq!(v["error"]["param"].as_str(), param);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(openai_duration(0), "0ms");
        assert_eq!(openai_duration(7), "7ms");
        let mut s = String::new();
        for n in [0, 9, 10, 1234567890, u64::MAX] {
            s.clear();
            push_decimal(&mut s, n);
            assert_eq!(s, n.to_string());
        }
        assert_eq!(openai_duration(999), "999ms");
        assert_eq!(openai_duration(1000), "1s");
        assert_eq!(openai_duration(1001), "2s");
        assert_eq!(openai_duration(59_000), "59s");
        assert_eq!(openai_duration(60_000), "1m0s");
        assert_eq!(openai_duration(3_723_000), "1h2m3s");
        assert_eq!(openai_duration(3_600_000), "1h0m0s");
        assert_eq!(openai_duration(3_605_000), "1h0m5s");
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(0), 1);
        assert_eq!(retry_after_secs(1500), 2);
        assert_eq!(retry_after_secs(60_000), 60);
    }

    #[test]
    fn messages_are_escaped() {
        let b = error_body(ErrorKind::Internal, "quote \" and \\ newline \n");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["message"], "quote \" and \\ newline \n");
    }
}

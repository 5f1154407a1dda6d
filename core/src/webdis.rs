//! The Redis limiter's wire protocol: one Lua script call through Webdis (Redis over HTTP), and
//! a strict reading of Webdis's replies.
//!
//! Envoy's only ways out of a wasm filter are HTTP and gRPC callouts, so Redis is reached through
//! Webdis. One check is one round trip: `POST /` with the command in the body
//! (`EVAL/<script>/1/<key>/<limit>/<ttl ms>`), which keeps the script out of URLs and logs.
//!
//! Keys follow the older proxy's layout, `rate:<md5 hex of the client key>:<unix minute>`, so the
//! old proxy and Tollgate can share one budget during a migration.

use std::fmt::Write as _;

/// Counts a request in a minute window if the window has room, atomically:
/// returns `{admitted (1|0), count after the call, key ttl in ms}`.
///
/// Denied requests are not counted (as in the local limiter). The key expires a minute after
/// its window ends, so no key outlives two windows.
pub const SCRIPT: &str = "local n = tonumber(redis.call('GET', KEYS[1]) or '0') \
if n >= tonumber(ARGV[1]) then return {0, n, redis.call('PTTL', KEYS[1])} end \
n = redis.call('INCR', KEYS[1]) \
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
return {1, n, redis.call('PTTL', KEYS[1])}";

/// Redis key of a client's window: `rate:<md5 hex>:<unix minute>`.
pub fn window_key(key_md5_hex: &str, minute: u64) -> String {
    format!("rate:{key_md5_hex}:{minute}")
}

/// The Webdis request body for one check.
pub fn check_command(key: &str, limit: u64, ttl_ms: u64) -> Vec<u8> {
    let mut body = String::with_capacity(SCRIPT.len() * 3 / 2 + key.len() + 40);
    body.push_str("EVAL/");
    percent_encode_into(&mut body, SCRIPT);
    body.push_str("/1/");
    percent_encode_into(&mut body, key);
    let _ = write!(body, "/{limit}/{ttl_ms}");
    body.into_bytes()
}

/// Webdis splits commands on `/` and reads a `.` in the last segment as a format extension, so
/// everything but unreserved characters is escaped.
pub(crate) fn percent_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// A successful check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// The request was counted and may proceed.
    pub admitted: bool,
    /// Requests counted in the window after this call.
    pub count: u64,
    /// Milliseconds until the Redis key expires (-1/-2 from Redis become `None`).
    pub key_ttl_ms: Option<u64>,
}

/// Why a Webdis reply is not a usable answer. Each is a limiter error, handled by `on_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// No response: connection refused or reset, no healthy host (Envoy calls back with no
    /// headers, or answers itself with a 503 saying so).
    Unavailable,
    /// No response within `timeout_ms`.
    Timeout,
    /// Webdis answered a status other than 200 (403: the command is blocked by its ACL).
    Status(u16),
    /// Redis itself answered an error (`{"EVAL":[false,"ERR ..."]}`, HTTP 200).
    Redis(String),
    /// Not the JSON shape a check returns.
    Malformed,
}

impl ReplyError {
    /// Metric label value (`tollgate_limiter_errors_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            ReplyError::Unavailable => "unavailable",
            ReplyError::Timeout => "timeout",
            ReplyError::Status(403) => "forbidden",
            ReplyError::Status(_) => "status",
            ReplyError::Redis(_) => "redis_error",
            ReplyError::Malformed => "malformed",
        }
    }

    /// Every reason, so the filter can define the counters up front.
    pub const REASONS: [&'static str; 6] = [
        "unavailable",
        "timeout",
        "forbidden",
        "status",
        "redis_error",
        "malformed",
    ];
}

/// Reads a Webdis reply to [`check_command`]. `status` is `None` when Envoy called back without
/// headers (a failed callout).
pub fn parse_reply(status: Option<u16>, body: &[u8]) -> Result<Count, ReplyError> {
    match status {
        None => return Err(ReplyError::Unavailable),
        Some(200) => {}
        // Envoy answers a callout itself when it cannot reach Webdis; its local replies say so in
        // their body, which Webdis's own errors never do.
        Some(_) if body.starts_with(b"upstream request timeout") => {
            return Err(ReplyError::Timeout)
        }
        Some(_)
            if body.starts_with(b"upstream connect error")
                || body.starts_with(b"no healthy upstream") =>
        {
            return Err(ReplyError::Unavailable)
        }
        Some(s) => return Err(ReplyError::Status(s)),
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| ReplyError::Malformed)?;
    let reply = value.get("EVAL").ok_or(ReplyError::Malformed)?;
    let items = reply.as_array().ok_or(ReplyError::Malformed)?;
    // A Redis error: [false, "ERR ..."].
    if let [serde_json::Value::Bool(false), msg] = items.as_slice() {
        let msg = msg.as_str().unwrap_or("unknown Redis error");
        return Err(ReplyError::Redis(msg.chars().take(200).collect()));
    }
    let [admitted, count, ttl] = items.as_slice() else {
        return Err(ReplyError::Malformed);
    };
    let admitted = match admitted.as_i64() {
        Some(1) => true,
        Some(0) => false,
        _ => return Err(ReplyError::Malformed),
    };
    let count = count.as_u64().ok_or(ReplyError::Malformed)?;
    let ttl = ttl.as_i64().ok_or(ReplyError::Malformed)?;
    Ok(Count {
        admitted,
        count,
        key_ttl_ms: u64::try_from(ttl).ok(),
    })
}

/// `Basic <base64(user:password)>` for Webdis's `http_basic_auth`.
pub fn basic_authorization(user_password: &str) -> String {
    format!("Basic {}", base64(user_password.as_bytes()))
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |i: u32| char::from(*ALPHABET.get((i & 63) as usize).unwrap_or(&b'='));
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = b(0) << 16 | b(1) << 8 | b(2);
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        out.push(if chunk.len() > 1 { sym(n >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { sym(n) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_layout_matches_the_older_proxy() {
        assert_eq!(
            window_key("32bd3c47e408828a22d81d4fe5f3c06d", 28_333_333),
            "rate:32bd3c47e408828a22d81d4fe5f3c06d:28333333"
        );
    }

    #[test]
    fn command_is_escaped_for_webdis() {
        let cmd = String::from_utf8(check_command("rate:ab:1", 60, 120_000)).unwrap();
        assert!(
            cmd.starts_with("EVAL/local%20n%20%3D%20tonumber%28redis"),
            "{cmd}"
        );
        assert!(cmd.ends_with("/1/rate%3Aab%3A1/60/120000"), "{cmd}");
        // Only the four separators are raw slashes; no raw dots anywhere.
        assert_eq!(cmd.matches('/').count(), 5);
        assert!(!cmd.contains('.'));
    }

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply(Some(200), br#"{"EVAL":[1,7,119000]}"#),
            Ok(Count {
                admitted: true,
                count: 7,
                key_ttl_ms: Some(119_000)
            })
        );
        assert_eq!(
            parse_reply(Some(200), br#"{"EVAL":[0,60,-1]}"#),
            Ok(Count {
                admitted: false,
                count: 60,
                key_ttl_ms: None
            })
        );
        assert_eq!(
            parse_reply(Some(200), br#"{"EVAL":[false,"ERR Error running script"]}"#),
            Err(ReplyError::Redis("ERR Error running script".into()))
        );
        assert_eq!(parse_reply(Some(403), b""), Err(ReplyError::Status(403)));
        assert_eq!(ReplyError::Status(403).reason(), "forbidden");
        assert_eq!(parse_reply(Some(503), b"x"), Err(ReplyError::Status(503)));
        assert_eq!(parse_reply(None, b""), Err(ReplyError::Unavailable));
        // Envoy's own answers when Webdis cannot be reached.
        let refused = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure";
        assert_eq!(
            parse_reply(Some(503), refused),
            Err(ReplyError::Unavailable)
        );
        assert_eq!(
            parse_reply(Some(503), b"no healthy upstream"),
            Err(ReplyError::Unavailable)
        );
        assert_eq!(
            parse_reply(Some(504), b"upstream request timeout"),
            Err(ReplyError::Timeout)
        );
        for bad in [
            &b""[..],
            b"not json",
            br#"{"GET":null}"#,
            br#"{"EVAL":"OK"}"#,
            br#"{"EVAL":[1,2]}"#,
            br#"{"EVAL":[2,1,1]}"#,
            br#"{"EVAL":[1,-1,1]}"#,
            br#"{"EVAL":[1,"7",1]}"#,
        ] {
            assert_eq!(
                parse_reply(Some(200), bad),
                Err(ReplyError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_reason_is_listed() {
        for e in [
            ReplyError::Unavailable,
            ReplyError::Timeout,
            ReplyError::Status(403),
            ReplyError::Status(500),
            ReplyError::Redis(String::new()),
            ReplyError::Malformed,
        ] {
            assert!(ReplyError::REASONS.contains(&e.reason()));
        }
    }

    #[test]
    fn base64_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("tollgate:s3cret", "dG9sbGdhdGU6czNjcmV0"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
        assert_eq!(basic_authorization("u:p"), "Basic dTpw");
    }

    proptest! {
        #[test]
        fn parse_never_panics(status in proptest::option::of(0u16..600), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_reply(status, &body);
        }
    }
}

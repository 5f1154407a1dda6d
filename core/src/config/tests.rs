use super::*;
use crate::keys::DigestKind;

const DEMO_SHA: &str = "5a2e6c8e5a0b0c8e6f3f2d3c6c6a0f4c9d7f1b2a3c4d5e6f708192a3b4c5d6e7";

fn env(name: &str) -> Option<String> {
    (name == "PROVIDER_KEY").then(|| "sk-provider-secret".to_string())
}

fn parse(json: &str) -> Result<Config, ConfigError> {
    Config::parse(json.as_bytes(), &env)
}

fn minimal(clients: &str) -> String {
    format!(r#"{{"clients":{clients},"upstream":{{"api_key_env":"PROVIDER_KEY"}}}}"#)
}

fn err(json: &str) -> String {
    parse(json).unwrap_err().to_string()
}

#[test]
fn endpoints_and_forwarded_headers_are_validated() {
    let client = format!(r#"{{"name":"a","key_sha256":"{DEMO_SHA}"}}"#);
    let with = |extra: &str, client_extra: &str| {
        format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"{client_extra}}}],
                "upstream":{{"api_key_env":"PROVIDER_KEY"}}{extra}}}"#
        )
    };
    let c = parse(&minimal(&format!("[{client}]"))).unwrap();
    assert_eq!(c.clients[0].endpoints, EndpointSet::defaults());
    assert!(c.forward_headers.is_empty());
    let c = parse(&with(
        r#","endpoints":["embeddings"],"forward_headers":["X-Custom","x-custom"]"#,
        r#","endpoints":["inference","files"]"#,
    ))
    .unwrap();
    assert!(c.clients[0].endpoints.has_kind(Kind::Account));
    assert_eq!(c.forward_headers, vec!["x-custom".to_string()]);
    assert!(err(&with(r#","endpoints":["chat"]"#, "")).starts_with("endpoints[0]: unknown"));
    assert!(err(&with("", r#","endpoints":["files","nope"]"#))
        .starts_with("clients[0].endpoints[1]: unknown endpoint \"nope\""));
    for bad in [
        "authorization",
        "x-api-key",
        "x-tollgate-route",
        "x-envoy-original-path",
        "openai-organization",
        "host",
        "a b",
        "",
    ] {
        let e = err(&with(&format!(r#","forward_headers":["{bad}"]"#), ""));
        assert!(e.starts_with("forward_headers[0]: "), "{bad}: {e}");
    }
    // Account endpoints with model routing need a default provider to go to.
    let routed = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","endpoints":["files"]}}],
            "providers":[{{"name":"p","cluster":"c","api_key_env":"PROVIDER_KEY"}}],
            "models":[{{"match":"m","providers":["p"]}}]}}"#
    );
    assert!(err(&routed).starts_with("clients[0].endpoints: account endpoints"));
    let with_default = routed.replace(r#""models""#, r#""default_provider":"p","models""#);
    assert!(parse(&with_default).is_ok());
}

#[test]
fn minimal_config_uses_defaults() {
    let c = parse(&minimal(&format!(
        r#"[{{"name":"team-a","key_sha256":"{DEMO_SHA}"}}]"#
    )))
    .unwrap();
    assert_eq!(c.clients[0].name, "team-a");
    assert_eq!(
        c.clients[0].requests_per_minute,
        DEFAULT_REQUESTS_PER_MINUTE
    );
    assert_eq!(c.limiter, LimiterBackend::Local);
    let Mode::Single(upstream) = &c.mode else {
        panic!("{:?}", c.mode)
    };
    assert_eq!(upstream.authorization, "Bearer sk-provider-secret");
}

#[test]
fn per_client_limit_overrides_default() {
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","requests_per_minute":5}},
            {{"name":"b","key_md5":"0123456789abcdef0123456789ABCDEF"}}],
           "default_requests_per_minute":7,
           "upstream":{{"api_key_env":"PROVIDER_KEY"}},
           "limiter":{{"backend":"local"}}}}"#
    );
    let c = parse(&json).unwrap();
    assert_eq!(c.clients[0].requests_per_minute, 5);
    assert_eq!(c.clients[1].requests_per_minute, 7);
}

#[test]
fn unknown_fields_are_named() {
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","rpm":5}}],
           "upstream":{{"api_key_env":"PROVIDER_KEY"}}}}"#
    );
    let e = err(&json);
    assert!(e.starts_with("clients[0].rpm: unknown field `rpm`"), "{e}");
    let e = err(r#"{"clients":[],"upstream":{"api_key_env":"X"},"extra":1}"#);
    assert!(e.starts_with("extra: unknown field `extra`"), "{e}");
}

#[test]
fn wrong_types_are_named() {
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","requests_per_minute":"5"}}],
           "upstream":{{"api_key_env":"PROVIDER_KEY"}}}}"#
    );
    let e = err(&json);
    assert!(
        e.starts_with("clients[0].requests_per_minute: invalid type"),
        "{e}"
    );
    let e = err(
        r#"{"clients":[],"upstream":{"api_key_env":"PROVIDER_KEY"},"default_requests_per_minute":-1}"#,
    );
    assert!(
        e.starts_with("default_requests_per_minute: invalid value"),
        "{e}"
    );
}

#[test]
fn bad_digests_are_named() {
    let e = err(&minimal(r#"[{"name":"a","key_sha256":"abc"}]"#));
    assert_eq!(
        e,
        "clients[0].key_sha256: expected 64 hex characters (the SHA-256 of the whole key), got 3 characters"
    );
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{}"}}]"#,
        "g".repeat(64)
    )));
    assert!(
        e.starts_with("clients[0].key_sha256: not hexadecimal"),
        "{e}"
    );
    let e = err(&minimal(r#"[{"name":"a"}]"#));
    assert!(e.starts_with("clients[0].key_sha256: missing"), "{e}");
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA}","key_md5":"{}"}}]"#,
        "0".repeat(32)
    )));
    assert!(e.starts_with("clients[0].key_md5: set either"), "{e}");
}

#[test]
fn duplicates_are_errors() {
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}},{{"name":"a","key_md5":"{}"}}]"#,
        "0".repeat(32)
    )));
    assert_eq!(
        e,
        "clients[1].name: duplicate client name \"a\" (also clients[0])"
    );
    let upper = DEMO_SHA.to_uppercase();
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}},{{"name":"b","key_sha256":"{upper}"}}]"#
    )));
    assert_eq!(
        e,
        "clients[1].key_sha256: duplicate key digest (same key as clients[0])"
    );
}

/// Many clients (the compile is linear: hash tables, no scan of the other clients), and
/// duplicates far apart are still named by both positions.
#[test]
fn many_clients_and_distant_duplicates() {
    let entry = |i: usize, name: &str| {
        let hex =
            crate::keys::Digest::of_key(DigestKind::Sha256, format!("k{i}").as_bytes()).to_hex();
        format!(r#"{{"name":"{name}","key_sha256":"{hex}","requests_per_minute":600}}"#)
    };
    let n = 20_000;
    let mut list: Vec<String> = (0..n).map(|i| entry(i, &format!("c{i}"))).collect();
    let ok = parse(&minimal(&format!("[{}]", list.join(",")))).unwrap();
    assert_eq!((ok.clients.len(), ok.keys.len()), (n, n));
    assert_eq!(ok.keys.lookup(b"k19999"), Some(19_999));
    assert_eq!(ok.clients[19_999].requests_per_minute, 600);

    list.push(entry(n, "c7"));
    assert_eq!(
        err(&minimal(&format!("[{}]", list.join(",")))),
        format!("clients[{n}].name: duplicate client name \"c7\" (also clients[7])")
    );
    list.pop();
    list.push(entry(7, "another"));
    assert_eq!(
        err(&minimal(&format!("[{}]", list.join(",")))),
        format!("clients[{n}].key_sha256: duplicate key digest (same key as clients[7])")
    );
}

#[test]
fn escaped_names_and_digests_are_read_too() {
    // Borrowed from the document when possible, copied when escaped: the same result.
    let hex = format!("\\u0035{}", &DEMO_SHA[1..]);
    let c = parse(&minimal(&format!(
        r#"[{{"name":"\u0061b","key_sha256":"{hex}"}}]"#
    )))
    .unwrap();
    assert_eq!(c.clients[0].name, "ab");
    assert_eq!(
        c.keys.len(),
        1,
        "the escaped digest is the demo digest: {DEMO_SHA}"
    );
    let e = err(&minimal(r#"[{"name":"a","key_md5":7}]"#));
    assert!(e.starts_with("clients[0].key_md5: invalid type"), "{e}");
}

#[test]
fn phases_are_reported_in_order() {
    let json = minimal(&format!(r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#));
    let mut seen = Vec::new();
    Config::parse_observed(json.as_bytes(), &env, &mut |p| seen.push(p)).unwrap();
    assert_eq!(
        seen,
        [Phase::Json, Phase::Clients, Phase::KeyIndex, Phase::Rest]
    );
    assert_eq!(
        seen.iter().map(|p| p.name()).collect::<Vec<_>>(),
        ["json", "clients", "key_index", "rest"]
    );
    // A failed phase is not reported, nor any after it.
    let mut seen = Vec::new();
    let bad = minimal(r#"[{"name":"a","key_sha256":"abc"}]"#);
    assert!(Config::parse_observed(bad.as_bytes(), &env, &mut |p| seen.push(p)).is_err());
    assert_eq!(seen, [Phase::Json]);
}

#[test]
fn names_must_be_label_safe() {
    for bad in ["", "a.b", "-a", "a b", "ä", &"x".repeat(65)] {
        let e = err(&minimal(&format!(
            r#"[{{"name":{bad:?},"key_sha256":"{DEMO_SHA}"}}]"#
        )));
        assert!(e.starts_with("clients[0].name: "), "{bad:?}: {e}");
    }
}

#[test]
fn limits_must_be_positive() {
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA}","requests_per_minute":0}}]"#
    )));
    assert_eq!(
        e,
        "clients[0].requests_per_minute: must be between 1 and 1000000000, got 0"
    );
}

#[test]
fn provider_key_must_be_present_and_is_never_echoed() {
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"MISSING"}}}}"#
    );
    let e = err(&json);
    assert!(
        e.starts_with("upstream.api_key_env: environment variable \"MISSING\" is not set"),
        "{e}"
    );

    let bad_env = |_: &str| Some("sk-has space".to_string());
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"K"}}}}"#
    );
    let e = Config::parse(json.as_bytes(), &bad_env)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("upstream.api_key_env: "), "{e}");
    assert!(!e.contains("sk-has"), "{e}");
}

#[test]
fn debug_output_redacts_the_provider_key() {
    let c = parse(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#
    )))
    .unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("sk-provider-secret"), "{dbg}");
}

fn with_limiter(limiter: &str) -> Result<Config, ConfigError> {
    parse(&format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],
            "upstream":{{"api_key_env":"PROVIDER_KEY"}},"limiter":{limiter}}}"#
    ))
}

#[test]
fn redis_limiter_defaults_and_errors() {
    let c = with_limiter(r#"{"backend":"redis","cluster":"webdis"}"#).unwrap();
    let LimiterBackend::Redis(r) = &c.limiter else {
        panic!("{:?}", c.limiter)
    };
    assert_eq!(r.webdis.authority, "webdis");
    assert_eq!(r.webdis.timeout_ms, DEFAULT_REDIS_TIMEOUT_MS);
    assert_eq!(r.on_error, OnError::Local);
    assert_eq!(r.webdis.authorization, None);
    assert_eq!(c.limiter.name(), "redis");

    let c = with_limiter(
        r#"{"backend":"redis","cluster":"webdis","authority":"webdis.svc","timeout_ms":25,
            "on_error":"deny","basic_auth_env":"PROVIDER_KEY"}"#,
    );
    // PROVIDER_KEY holds no colon: not a user:password pair.
    let e = c.unwrap_err().to_string();
    assert!(e.starts_with("limiter.basic_auth_env: "), "{e}");
    assert!(!e.contains("sk-provider-secret"), "{e}");

    let auth_env = |n: &str| match n {
        "PROVIDER_KEY" => Some("sk-p".to_string()),
        "WEBDIS_AUTH" => Some("tollgate:s3cret".to_string()),
        _ => None,
    };
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"PROVIDER_KEY"}},
            "limiter":{{"backend":"redis","cluster":"webdis","on_error":"allow","basic_auth_env":"WEBDIS_AUTH"}}}}"#
    );
    let c = Config::parse(json.as_bytes(), &auth_env).unwrap();
    let LimiterBackend::Redis(r) = &c.limiter else {
        panic!()
    };
    assert_eq!(
        r.webdis.authorization.as_deref(),
        Some("Basic dG9sbGdhdGU6czNjcmV0")
    );
    assert_eq!(r.on_error, OnError::Allow);
    assert!(!format!("{c:?}").contains("dG9sbGdhdGU6"));

    for (limiter, want) in [
        (r#"{"backend":"redis"}"#, "limiter.cluster: required with"),
        (
            r#"{"backend":"redis","cluster":""}"#,
            "limiter.cluster: must name",
        ),
        (
            r#"{"backend":"redis","cluster":"w","timeout_ms":0}"#,
            "limiter.timeout_ms: must be between",
        ),
        (
            r#"{"backend":"redis","cluster":"w","on_error":"retry"}"#,
            "limiter.on_error: unknown variant `retry`",
        ),
        (
            r#"{"backend":"redis","cluster":"w","authority":"a b"}"#,
            "limiter.authority: must be",
        ),
        (
            r#"{"backend":"local","cluster":"w"}"#,
            "limiter.cluster: only valid with",
        ),
        (
            r#"{"backend":"local","on_error":"deny"}"#,
            "limiter.on_error: only valid with",
        ),
        (
            r#"{"backend":"redis","cluster":"w","tmeout_ms":5}"#,
            "limiter.tmeout_ms: unknown field",
        ),
    ] {
        let e = with_limiter(limiter).unwrap_err().to_string();
        assert!(e.starts_with(want), "{limiter}: {e}");
    }
}

fn routed(extra: &str) -> Result<Config, ConfigError> {
    parse(&format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],
            "providers":[{{"name":"p1","cluster":"c1","api_key_env":"PROVIDER_KEY"}},
                         {{"name":"p2","cluster":"c2","api_key_env":"PROVIDER_KEY"}}],
            {extra}}}"#
    ))
}

#[test]
fn routing_config() {
    let c = routed(
        r#""models":[{"match":"m","providers":["p1","p2"],"upstream_models":{"p2":"m2"}},
                     {"match":"g-*","providers":["p2"]}],"default_provider":"p1""#,
    )
    .unwrap();
    let Mode::Routed(r) = &c.mode else { panic!() };
    assert_eq!(r.rule_for("m"), Some(0));
    assert_eq!(r.rule_for("g-1"), Some(1));
    assert_eq!(r.rule_for("x"), None);
    assert_eq!(r.rules[0].targets[1].model.as_deref(), Some("m2"));
    assert_eq!(r.default_provider, Some(0));
    assert_eq!(r.max_body_bytes, DEFAULT_MAX_BODY_BYTES);

    for (extra, want) in [
        (
            r#""models":[{"match":"m","providers":["p3"]}]"#,
            "models[0].providers[0]: unknown provider \"p3\"",
        ),
        (
            r#""models":[{"match":"m","providers":["p1","p1"]}]"#,
            "models[0].providers[1]: provider \"p1\" is listed twice",
        ),
        (
            r#""models":[{"match":"m","providers":[]}]"#,
            "models[0].providers: at least one",
        ),
        (
            r#""models":[{"match":"g*","providers":["p1"],"upstream_model":"x"}]"#,
            "models[0].upstream_model: a glob rule cannot rename",
        ),
        (
            r#""models":[{"match":"m","providers":["p1"]},{"match":"m","providers":["p2"]}]"#,
            "models[1].match: duplicate rule",
        ),
        (
            r#""models":[{"match":"m","providers":["p1"],"upstream_models":{"p2":"x"}}]"#,
            "models[0].upstream_models.p2: not one of",
        ),
        (
            r#""models":[{"match":"m","providers":["p1"]}],"default_provider":"nope""#,
            "default_provider: unknown provider",
        ),
        (
            r#""models":[{"match":"m","providers":["p1"]}],"max_body_bytes":10"#,
            "max_body_bytes: must be between 1024",
        ),
        (r#""models":[]"#, "models: at least one model rule"),
        (
            r#""models":[{"match":"m","providers":["p1"]}],"upstream":{"api_key_env":"PROVIDER_KEY"}"#,
            "upstream: set either",
        ),
        (
            r#""models":[{"match":"m","prviders":["p1"]}]"#,
            "models[0].prviders: unknown field",
        ),
    ] {
        let e = routed(extra).unwrap_err().to_string();
        assert!(e.starts_with(want), "{extra}: {e}");
    }
    // A mix of providers with and without `authority` in one rule.
    let e = parse(&format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],
            "providers":[{{"name":"p1","cluster":"c1","api_key_env":"PROVIDER_KEY","authority":"a.example"}},
                         {{"name":"p2","cluster":"c2","api_key_env":"PROVIDER_KEY"}}],
            "models":[{{"match":"m","providers":["p1","p2"]}}]}}"#
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("models[0].providers: the providers of one rule must all set"),
        "{e}"
    );
    // Allow-lists and routing-only fields need routing.
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA}","models":["m"]}}]"#
    )));
    assert!(
        e.starts_with("clients[0].models: model allow-lists need"),
        "{e}"
    );
    let e = err(&format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"PROVIDER_KEY"}},"models":[]}}"#
    ));
    assert!(e.starts_with("models: only valid with `providers`"), "{e}");
}

#[test]
fn empty_and_malformed_documents() {
    assert!(err("").contains("empty"));
    assert!(err("  ").contains("empty"));
    let e = err("{not json");
    assert_eq!(e, "not valid JSON: key must be a string at line 1 column 2");
    let e = err(r#"{"clients": ["#);
    assert!(e.starts_with("not valid JSON: EOF while parsing"), "{e}");
    let e = err(r#"{"clients":[],"upstream":{"api_key_env":"PROVIDER_KEY"}}"#);
    assert!(e.starts_with("clients: at least one client"), "{e}");
    let e = err(
        r#"{"clients":[],"upstream":{"api_key_env":"PROVIDER_KEY"},"limiter":{"backend":"etcd"}}"#,
    );
    assert!(
        e.starts_with("limiter.backend: unknown variant `etcd`"),
        "{e}"
    );
    let e = err(r#"{"upstream":{"api_key_env":"PROVIDER_KEY"}}"#);
    assert!(e.starts_with("clients: at least one client"), "{e}");
}

/// Fuzz finding (fuzz/seeds/config/enum-given-a-number.json): valid JSON with a
/// number for `limiter.backend` was "not valid JSON: expected value", naming no field.
#[test]
fn enum_fields_of_the_wrong_type_are_named() {
    let with_limiter = |limiter: &str| {
        let good = minimal(&format!(r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#));
        format!(
            r#"{},"limiter":{limiter}}}"#,
            good.strip_suffix('}').unwrap()
        )
    };
    for (limiter, field) in [
        (r#"{"backend":5}"#, "limiter.backend"),
        (r#"{"backend":null}"#, "limiter.backend"),
        (
            r#"{"backend":"redis","cluster":"w","on_error":[]}"#,
            "limiter.on_error",
        ),
    ] {
        let e = parse(&with_limiter(limiter)).unwrap_err();
        assert_eq!(e.field, field, "{limiter}");
        assert_eq!(e.message, "invalid type: expected a string");
    }
    assert!(parse(&with_limiter(r#"{"backend":"local"}"#)).is_ok());
    let e = Config::parse(b"{\"clients\":[{\"name\":\"\xff\"}]}", &env).unwrap_err();
    assert!(
        e.field.is_empty() && e.message.starts_with("not valid JSON"),
        "{e}"
    );
}

/// Fuzz target config, seed array.json: serde reads a struct
/// from an array, so `[[clients], null, null, {upstream}]` was a configuration.
#[test]
fn an_array_is_not_a_configuration() {
    let e = err(&format!(
        r#" [[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],null,null,{{"api_key_env":"PROVIDER_KEY"}}]"#
    ));
    assert_eq!(
        e,
        "the plugin configuration must be a JSON object, not an array"
    );
}

/// Fuzz finding (fuzz/seeds/config/trailing-characters.json): what followed the
/// object was ignored, e.g. a second configuration pasted after the first.
#[test]
fn trailing_characters_are_an_error() {
    let good = minimal(&format!(r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#));
    assert!(parse(&format!("{good} \n")).is_ok());
    let e = err(&format!("{good}true"));
    assert!(e.starts_with("not valid JSON: trailing characters"), "{e}");
    let e = err(&format!("{good}{good}"));
    assert!(e.starts_with("not valid JSON: trailing characters"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Several keys per client (`keys`), labels and expiry.

fn sha(key: &str) -> String {
    crate::keys::Digest::of_key(DigestKind::Sha256, key.as_bytes()).to_hex()
}

#[test]
fn a_client_may_have_several_keys_with_labels_and_expiry() {
    let c = parse(&minimal(&format!(
        r#"[{{"name":"a","keys":[{{"key_sha256":"{}","label":"2025-q1"}},
                                 {{"key_sha256":"{}","label":"2025-q2","expires_at":"2025-07-01T00:00:00Z"}}]}},
            {{"name":"b","key_sha256":"{}"}}]"#,
        sha("k-a1"),
        sha("k-a2"),
        sha("k-b")
    )))
    .unwrap();
    assert_eq!(c.keys.len(), 3);
    assert_eq!(c.keys.admit(b"k-a1", u64::MAX), Ok(0));
    let expiry = 1_751_328_000_000; // 2025-07-01T00:00:00Z
    assert_eq!(c.keys.admit(b"k-a2", expiry - 1), Ok(0));
    assert_eq!(
        c.keys.admit(b"k-a2", expiry),
        Err(crate::keys::KeyError::Expired)
    );
    assert_eq!(c.keys.admit(b"k-b", 0), Ok(1));
    // A `keys` list names the Redis budget after the client; one key keeps the key's MD5.
    assert_eq!(c.clients[0].redis_id().as_deref(), Some("name-a"));
    assert_eq!(c.clients[1].redis_id(), None);
}

#[test]
fn key_list_errors_name_the_key() {
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{}","keys":[{{"key_sha256":"{}"}}]}}]"#,
        sha("x"),
        sha("y")
    )));
    assert!(
        e.starts_with("clients[0].key_sha256: set either `keys`"),
        "{e}"
    );
    let e = err(&minimal(r#"[{"name":"a","keys":[]}]"#));
    assert!(
        e.starts_with("clients[0].keys: expected 1 to 16 keys, got 0"),
        "{e}"
    );
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","keys":[{{"key_sha256":"{}"}},{{"key_sha256":"abc"}}]}}]"#,
        sha("x")
    )));
    assert!(
        e.starts_with("clients[0].keys[1].key_sha256: expected 64 hex"),
        "{e}"
    );
    let e = err(&minimal(r#"[{"name":"a","keys":[{"label":"x"}]}]"#));
    assert!(
        e.starts_with("clients[0].keys[0].key_sha256: missing"),
        "{e}"
    );
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","keys":[{{"key_sha256":"{}","expires_at":"2025-07-01"}}]}}]"#,
        sha("x")
    )));
    assert!(
        e.starts_with("clients[0].keys[0].expires_at: \"2025-07-01\" is not an RFC 3339"),
        "{e}"
    );
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","keys":[{{"key_sha256":"{}","label":"no spaces"}}]}}]"#,
        sha("x")
    )));
    assert!(e.starts_with("clients[0].keys[0].label: "), "{e}");
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","keys":[{{"key_sha256":"{}","expiry":"x"}}]}}]"#,
        sha("x")
    )));
    assert!(
        e.starts_with("clients[0].keys[0].expiry: unknown field `expiry`"),
        "{e}"
    );
    // The same key twice: in one client's list, and in two clients.
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","keys":[{{"key_sha256":"{0}"}},{{"key_sha256":"{0}"}}]}}]"#,
        sha("x")
    )));
    assert_eq!(
        e,
        "clients[0].keys[1].key_sha256: duplicate key digest (listed twice for this client)"
    );
    let e = err(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{0}"}},{{"name":"b","keys":[{{"key_md5":"{1}"}},{{"key_sha256":"{0}"}}]}}]"#,
        sha("x"),
        "ab".repeat(16)
    )));
    assert_eq!(
        e,
        "clients[1].keys[1].key_sha256: duplicate key digest (same key as clients[0])"
    );
}

#[test]
fn rfc3339_times() {
    let ok = |t: &str| parse_rfc3339_ms(t).unwrap();
    assert_eq!(ok("1970-01-01T00:00:00Z"), 0);
    assert_eq!(ok("2025-07-01T00:00:00Z"), 1_751_328_000_000);
    assert_eq!(ok("2025-07-01T02:00:00+02:00"), 1_751_328_000_000);
    assert_eq!(ok("2025-06-30T23:30:00-00:30"), 1_751_328_000_000);
    assert_eq!(ok("2025-07-01t00:00:00.25z"), 1_751_328_000_250);
    assert_eq!(ok("2025-07-01T00:00:00.123456789Z"), 1_751_328_000_123);
    assert_eq!(ok("2024-02-29T12:00:00Z"), 1_709_208_000_000);
    for bad in [
        "",
        "2025-07-01",
        "2025-07-01T00:00:00",
        "2025-07-01T00:00:00+0200",
        "2025-02-29T00:00:00Z",
        "2025-13-01T00:00:00Z",
        "2025-07-01T24:00:00Z",
        "2025-07-01T00:00:00.Z",
        "2025-07-01T00:00:00Zx",
        "1969-12-31T23:59:59Z",
        "+025-07-01T00:00:00Z",
        "2025-07-01T00:00:00+24:00",
    ] {
        assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
    }
}

#[test]
fn two_keys_of_one_client_spend_one_budget_and_expired_keys_get_their_own_401() {
    use crate::limiter::tests::FakeStore;
    use crate::request::{on_request_headers, Decision, Start};
    let json = minimal(&format!(
        r#"[{{"name":"a","requests_per_minute":3,"keys":[{{"key_sha256":"{}"}},
             {{"key_sha256":"{}","expires_at":"2023-11-14T22:13:30Z"}}]}}]"#,
        sha("old"),
        sha("new")
    ));
    let c = parse(&json).unwrap();
    let store = FakeStore::default();
    let now = 1_700_000_000_000; // 2023-11-14T22:13:20Z, ten seconds before the expiry
    let status = |key: &str, now: u64| {
        let bearer = format!("Bearer {key}");
        let headers = [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-length", "2"),
            ("authorization", bearer.as_str()),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect::<Vec<_>>();
        match on_request_headers(&c, &headers, None, false, now, &store) {
            Start::Done(step) => match step.decision {
                Decision::Reply(r) => (r.status, r.body),
                Decision::Forward(_) => (200, String::new()),
            },
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(status("old", now).0, 200);
    assert_eq!(status("new", now).0, 200);
    assert_eq!(status("old", now + 1).0, 200);
    // The fourth request of the window is over the client's one budget, whichever key.
    assert_eq!(status("new", now + 2).0, 429);
    assert_eq!(status("old", now + 3).0, 429);
    let (code, body) = status("new", now + 10_000);
    assert_eq!(code, 401);
    assert!(body.contains("expired"), "{body}");
    let (code, body) = status("other", now);
    assert_eq!(code, 401);
    assert!(!body.contains("expired"), "{body}");
}

#[test]
fn providers_say_which_api_they_speak() {
    let with = |providers: &str, rules: &str, extra: &str| {
        format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"{extra}}}],
                "providers":{providers},"models":{rules}}}"#
        )
    };
    let two = r#"[{"name":"claude","cluster":"c","api_key_env":"PROVIDER_KEY","api":"anthropic"},
                  {"name":"oai","cluster":"o","api_key_env":"PROVIDER_KEY"}]"#;
    let c = parse(&with(
        two,
        r#"[{"match":"claude-*","providers":["claude"]}]"#,
        "",
    ))
    .unwrap();
    let Mode::Routed(r) = &c.mode else { panic!() };
    assert_eq!(
        r.providers[0].credential(),
        ("x-api-key", "sk-provider-secret")
    );
    assert_eq!(
        r.providers[1].credential(),
        ("authorization", "Bearer sk-provider-secret")
    );
    assert_eq!(r.rule_api(0), Api::Anthropic);
    // One rule, two APIs: a fallback would send a request its provider cannot read.
    let e = err(&with(
        two,
        r#"[{"match":"m","providers":["claude","oai"]}]"#,
        "",
    ));
    assert!(
        e.starts_with("models[0].providers: the providers of one rule must speak the same API"),
        "{e}"
    );
    let e = err(&with(
        r#"[{"name":"p","cluster":"c","api_key_env":"PROVIDER_KEY","api":"gemini"}]"#,
        r#"[{"match":"m","providers":["p"]}]"#,
        "",
    ));
    assert!(e.starts_with("providers[0].api: unknown variant"), "{e}");
    // Account endpoints are OpenAI's: their default provider must speak it.
    let e = err(&format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}","endpoints":["files"]}}],
            "providers":{two},"models":[{{"match":"m","providers":["oai"]}}],
            "default_provider":"claude"}}"#
    ));
    assert!(
        e.starts_with("clients[0].endpoints: account endpoints"),
        "{e}"
    );
    // One provider of Anthropic's API.
    let c = parse(&format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],
            "upstream":{{"api_key_env":"PROVIDER_KEY","api":"anthropic"}}}}"#
    ))
    .unwrap();
    let Mode::Single(u) = &c.mode else { panic!() };
    assert_eq!(
        u.credential(),
        ("x-api-key", "sk-provider-secret".to_string())
    );
    assert!(!format!("{u:?}").contains("secret"));
}

#[test]
fn prices_and_budgets_are_validated() {
    let routed = |client_extra: &str, extra: &str| {
        format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"{client_extra}}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"PROVIDER_KEY"}}],
                "models":[{{"match":"*","providers":["p"]}}]{extra}}}"#
        )
    };
    let price = r#","prices":[{"model":"gpt-4.1","input_per_million_tokens":2,"cached_input_per_million_tokens":0.5,"cache_write_input_per_million_tokens":2.5,"output_per_million_tokens":8},{"model":"deepseek-chat","input_per_million_tokens":0.28,"output_per_million_tokens":0.42}]"#;
    let c = parse(&routed("", price)).unwrap();
    assert_eq!(c.prices.currency, "USD");
    assert_eq!(c.prices.models[0].input, 2_000_000);
    assert_eq!(c.prices.models[0].cached_input, 500_000);
    assert_eq!(
        c.prices.models[1].cached_input, 280_000,
        "cached defaults to input"
    );
    assert_eq!(c.prices.models[0].cache_write_input, 2_500_000);
    assert_eq!(
        c.prices.models[1].cache_write_input, 280_000,
        "cache writes default to input"
    );
    assert_eq!(c.prices.find("deepseek-chat"), Some(1));
    assert!(err(&routed("", r#","currency":"usd""#)).starts_with("currency: expected an ISO"));
    let bad_price = |p: &str| err(&routed("", &format!(r#","prices":[{p}]"#)));
    assert!(bad_price(
        r#"{"model":"m","input_per_million_tokens":-1,"output_per_million_tokens":1}"#
    )
    .starts_with("prices[0].input_per_million_tokens: must be a number >= 0"));
    assert!(bad_price(
        r#"{"model":"m","input_per_million_tokens":1.0000001,"output_per_million_tokens":1}"#
    )
    .starts_with("prices[0].input_per_million_tokens: at most six decimals"));
    assert!(bad_price(
        r#"{"model":"gpt-*","input_per_million_tokens":1,"output_per_million_tokens":1}"#
    )
    .starts_with("prices[0].model: "));
    assert!(bad_price(r#"{"model":"m","input_per_million_tokens":1}"#)
        .starts_with("prices[0]: missing field `output_per_million_tokens`"));
    let two = r#"{"model":"m","input_per_million_tokens":1,"output_per_million_tokens":1}"#;
    assert!(bad_price(&format!("{two},{two}")).starts_with("prices[1].model: duplicate price"));
    // One provider: the model is unknown.
    let single = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA}"}}],"upstream":{{"api_key_env":"PROVIDER_KEY"}}{price}}}"#
    );
    assert!(err(&single).starts_with("prices: prices need model routing"));

    // The local limiter takes budgets of an hour or more only when told what a restart does.
    let budgets = r#","budgets":[{"window":"month","money":100.25,"requests":5},{"window":"day","tokens":1000}]"#;
    assert!(err(&routed(budgets, "")).starts_with(
        "clients[0].budgets: a budget per day with the local limiter starts from zero when Envoy restarts"
    ));
    assert!(parse(&routed(r#","budgets":[{"window":"minute","money":1}]"#, "")).is_ok());
    assert!(err(&routed(
        "",
        r#","limiter":{"backend":"redis","cluster":"w","budgets_on_restart":"reset"}"#
    ))
    .starts_with("limiter.budgets_on_restart: only valid with"));
    let c = parse(&routed(
        budgets,
        r#","budget_utc_offset_minutes":60,"limiter":{"backend":"local","budgets_on_restart":"reset"}"#,
    ))
    .unwrap();
    assert_eq!(c.budgets_on_restart, Some(OnRestart::Reset));
    let b = c.clients[0].budgets();
    assert_eq!(b.len(), 2);
    assert_eq!(
        b[0].period,
        crate::spend::Period::Day,
        "shortest window first"
    );
    assert_eq!(b[1].limit(crate::spend::Measure::Money), Some(100_250_000));
    assert_eq!(c.budget_utc_offset_minutes, 60);
    let bad_budget = |b: &str| {
        err(&routed(
            &format!(r#","budgets":[{b}]"#),
            r#","limiter":{"backend":"local","budgets_on_restart":"reset"}"#,
        ))
    };
    assert!(bad_budget(r#"{"window":"year","money":1}"#)
        .starts_with("clients[0].budgets[0].window: expected one of"));
    assert!(
        bad_budget(r#"{"window":"day"}"#).starts_with("clients[0].budgets[0]: set at least one")
    );
    assert!(bad_budget(r#"{"window":"day","money":0}"#)
        .starts_with("clients[0].budgets[0].money: must be more than 0"));
    assert!(bad_budget(r#"{"window":"day","tokens":0}"#)
        .starts_with("clients[0].budgets[0].tokens: must be between"));
    assert!(
        bad_budget(r#"{"window":"day","money":1},{"window":"day","tokens":3}"#)
            .starts_with("clients[0].budgets[1].window: a second budget per day")
    );
    let e = bad_budget(r#"{"window":"day","cost":1}"#);
    assert!(e.contains("unknown field `cost`"), "{e}");
    assert!(err(&routed("", r#","budget_utc_offset_minutes":900"#))
        .starts_with("budget_utc_offset_minutes: must be between"));
}

// Mesh identity (`identities`).

#[test]
fn a_client_may_be_known_by_its_spiffe_ids() {
    let c = parse(&minimal(&format!(
        r#"[{{"name":"mesh","identities":["spiffe://cluster.local/ns/a/sa/app",
                                          "spiffe://cluster.local/ns/a/sa/batch"]}},
            {{"name":"both","key_sha256":"{}","identities":["spiffe://cluster.local/ns/b/sa/app"]}},
            {{"name":"key","key_sha256":"{}"}}]"#,
        sha("k-both"),
        sha("k-key")
    )))
    .unwrap();
    assert_eq!(c.identities.len(), 3);
    assert_eq!(c.keys.len(), 2);
    assert_eq!(
        c.identities.lookup(b"spiffe://cluster.local/ns/a/sa/batch"),
        Some(0)
    );
    assert_eq!(
        c.identities.lookup(b"spiffe://cluster.local/ns/b/sa/app"),
        Some(1)
    );
    assert_eq!(c.keys.admit(b"k-both", 0), Ok(1));
    // Every credential of a client with identities spends one Redis budget, named after it.
    assert_eq!(c.clients[0].redis_id().as_deref(), Some("name-mesh"));
    assert_eq!(c.clients[1].redis_id().as_deref(), Some("name-both"));
    assert_eq!(c.clients[2].redis_id(), None);
    // Without any identity nothing reads the peer certificate.
    assert!(parse(&minimal(&format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA}"}}]"#
    )))
    .unwrap()
    .identities
    .is_empty());
}

#[test]
fn identity_errors_name_the_field() {
    let e = err(&minimal(r#"[{"name":"a","identities":[]}]"#));
    assert!(
        e.starts_with("clients[0].identities: expected 1 to 16"),
        "{e}"
    );
    let e = err(&minimal(
        r#"[{"name":"a","identities":["spiffe://cluster.local/ns/a","https://x/y"]}]"#,
    ));
    assert!(
        e.starts_with("clients[0].identities[1]: \"https://x/y\" is not a SPIFFE ID"),
        "{e}"
    );
    let e = err(&minimal(
        r#"[{"name":"a","identities":["spiffe://d/x"]},{"name":"b","identities":["spiffe://d/x"]}]"#,
    ));
    assert!(
        e.starts_with("clients[1].identities[0]: duplicate identity (also clients[0])"),
        "{e}"
    );
    let e = err(&minimal(
        r#"[{"name":"a","identities":["spiffe://d/x","spiffe://d/x"]}]"#,
    ));
    assert!(e.contains("listed twice for this client"), "{e}");
    let e = err(&minimal(r#"[{"name":"a","identities":"spiffe://d/x"}]"#));
    assert!(e.starts_with("clients[0].identities"), "{e}");
    // A client needs some credential.
    let e = err(&minimal(r#"[{"name":"a"}]"#));
    assert!(e.contains("or `identities`"), "{e}");
}

#[test]
fn a_client_is_small() {
    // A configuration of 100,000 clients holds them in every VM (docs/scale.md): the name, the
    // two limits and the endpoints inline, what few clients have boxed. 56 bytes on 64-bit, 40
    // on wasm32 (it was 120 and 72 with the allow-list, Redis id and budgets inline).
    let word = std::mem::size_of::<usize>();
    assert!(
        std::mem::size_of::<Client>() <= 5 * word + 16,
        "{}",
        std::mem::size_of::<Client>()
    );
}

//! The plugin configuration: `Config::parse` (JSON -> validated, compiled config), as
//! `on_configure` and `tollgate config check` run it.
//!
//! Input: the plugin configuration bytes. Environment variables come from a fake: names
//! containing `UNSET` are unset, names containing `SPACE` hold a value with a space, every
//! other name holds `SECRET`.
//!
//! Invariants:
//! - never panics; every error has a message, and for a document that is a JSON object it names
//!   the field (a non-empty dotted path, or serde's ``missing/duplicate/unknown field `x` ``
//!   for top-level fields); the path starts at a
//!   key of the document or a configuration key it lacks, and the message follows it
//!   (`field: message`);
//! - no secret (environment value, or its base64 in Webdis basic auth) ever appears in an error
//!   or in the `Debug` form of a config;
//! - an accepted config holds what the document says (its clients, in order, then those of its
//!   `key_set`) and satisfies the
//!   validation rules (names, limits in range, provider indexes valid, body bound in range);
//! - parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate_core::config::{
    Config, LimiterBackend, Mode, MAX_CLIENT_NAME_LEN, MAX_MAX_BODY_BYTES, MAX_PER_MINUTE,
    MAX_REDIS_TIMEOUT_MS,
};

const SECRET: &str = "sk-fuzz:S3cr3t-7f1d";
const SPACED: &str = "sk fuzz spaced 9c2e";
/// base64("sk-fuzz:S3cr3t-7f1d"), as the Webdis basic-auth header would carry it.
const SECRET_B64: &str = "c2stZnV6ejpTM2NyM3QtN2YxZA==";

/// The keys of a configuration: an error may name one the document lacks.
const KEYS: [&str; 10] = [
    "clients",
    "key_set",
    "default_requests_per_minute",
    "default_tokens_per_minute",
    "upstream",
    "limiter",
    "providers",
    "models",
    "default_provider",
    "max_body_bytes",
];

fn env(name: &str) -> Option<String> {
    if name.contains("UNSET") {
        None
    } else if name.contains("SPACE") {
        Some(SPACED.into())
    } else {
        Some(SECRET.into())
    }
}

/// No secret in `text`, unless the document itself holds it (then it is not the secret that
/// leaked but the document's own text, quoted back).
fn no_secret(text: &str, document: &[u8]) {
    for s in [SECRET, SPACED, SECRET_B64, "S3cr3t"] {
        let quoted = document.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(quoted || !text.contains(s), "secret in {text:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let result = Config::parse(data, &env);
    let document: Option<Value> = serde_json::from_slice(data).ok();
    match &result {
        Err(e) => {
            let shown = e.to_string();
            assert!(!e.message.is_empty());
            no_secret(&shown, data);
            no_secret(&format!("{e:?}"), data);
            if let Some(Value::Object(top)) = &document {
                assert!(
                    // A top-level field missing, repeated or unknown: serde names it in the
                    // message (the empty key `""` is its own, empty, path).
                    !e.field.is_empty()
                        || ["missing", "duplicate", "unknown"]
                            .iter()
                            .any(|w| e.message.starts_with(&format!("{w} field `"))),
                    "an error about a JSON object names no field: {shown}"
                );
                if !e.field.is_empty() {
                    // (A key may itself hold `.` or `[`.)
                    let at_key = |k: &String| {
                        e.field.strip_prefix(k.as_str()).is_some_and(|rest| {
                            rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
                        })
                    };
                    assert!(
                        top.keys().any(at_key) || KEYS.iter().any(|k| at_key(&k.to_string())),
                        "the error names {:?}, not a key of the document: {shown}",
                        e.field
                    );
                    assert!(shown.starts_with(&format!("{}: ", e.field)));
                }
            }
        }
        Ok(config) => check_config(config, document.as_ref(), data),
    }
    // Deterministic.
    let again = Config::parse(data, &env);
    assert_eq!(
        format!("{:?}", result.as_ref().map_err(ToString::to_string)),
        format!("{:?}", again.as_ref().map_err(ToString::to_string))
    );
});

fn check_config(config: &Config, document: Option<&Value>, data: &[u8]) {
    no_secret(&format!("{config:?}"), data);
    let document = document.expect("a config from bytes serde_json rejects");
    let clients = document
        .get("clients")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    assert!(document.get("key_set").is_some() || config.key_set_clients == 0);
    assert_eq!(clients.len() + config.key_set_clients, config.clients.len());
    assert!(!config.clients.is_empty());
    // A record holds a name, one digest and limits: nothing else of a client.
    for c in &config.clients[clients.len()..] {
        assert!(c.models().is_none() && c.budgets().is_empty() && c.redis_id().is_none());
    }
    assert!(config.keys.len() >= config.key_set_clients);
    for (i, c) in config.clients.iter().enumerate() {
        if let Some(raw) = clients.get(i) {
            assert_eq!(
                raw.get("name").and_then(Value::as_str),
                Some(c.name.as_str())
            );
        }
        assert!(!c.name.is_empty() && c.name.len() <= MAX_CLIENT_NAME_LEN);
        assert!(c.name.as_bytes()[0].is_ascii_alphanumeric());
        assert!(c
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert!(
            config.clients[..i].iter().all(|o| o.name != c.name),
            "duplicate client name accepted"
        );
        assert!((1..=MAX_PER_MINUTE).contains(&c.requests_per_minute));
        if let Some(t) = c.tokens_per_minute {
            assert!((1..=MAX_PER_MINUTE).contains(&t));
        }
        assert!(config.client(i).is_some());
    }
    let bearer = format!("Bearer {SECRET}");
    match &config.mode {
        Mode::Single(upstream) => assert_eq!(upstream.authorization, bearer),
        Mode::Routed(routing) => {
            assert!(!routing.providers.is_empty() && !routing.rules.is_empty());
            for p in &routing.providers {
                assert_eq!(p.authorization, bearer);
                assert!(!p.cluster.is_empty());
            }
            for rule in &routing.rules {
                assert!(!rule.targets.is_empty());
                for t in &rule.targets {
                    assert!(t.provider < routing.providers.len());
                }
            }
            if let Some(d) = routing.default_provider {
                assert!(d < routing.providers.len());
            }
            let max = routing.max_body_bytes as u64;
            assert!((1024..=MAX_MAX_BODY_BYTES).contains(&max));
        }
    }
    if let LimiterBackend::Redis(r) = &config.limiter {
        let w = &r.webdis;
        assert!((1..=MAX_REDIS_TIMEOUT_MS).contains(&w.timeout_ms));
        assert!(!w.cluster.is_empty() && !w.authority.is_empty());
        if let Some(a) = &w.authorization {
            assert_eq!(a, &format!("Basic {SECRET_B64}"));
        }
    }
}

use super::*;
use crate::base64;
use crate::config::{Config, Mode};
use crate::types::Webdis;
use crate::webdis::ReplyError;
use serde_json::Value;

/// [`super::decide`] with the settings, routing and name looked up as the request path does.
fn decide(
    c: &Config,
    client: usize,
    rule: usize,
    info: &RequestInfo,
    model: &str,
    body: &[u8],
) -> Option<Decision> {
    let Mode::Routed(routing) = &c.mode else {
        return None;
    };
    let name = &c.client(client)?.name;
    super::decide(
        c.cache.settings(client, rule)?,
        routing,
        rule,
        name,
        info,
        model,
        body,
    )
}
use crate::keys::{Digest, DigestKind};
use crate::limiter::tests::FakeStore;
use proptest::prelude::*;
use serde_json::json;

const NOW: u64 = 1_700_000_000_000;

fn settings() -> Settings {
    Settings {
        ttl_s: 60,
        max_entry_bytes: 4096,
        backend: Backend::Local,
        scope: Scope::Client,
        temperature: Temperature::Zero,
        allow_tools: false,
    }
}

fn canon(s: &str) -> String {
    String::from_utf8(canonical_json(&serde_json::from_str(s).unwrap())).unwrap()
}

#[test]
fn canonical_form_ignores_order_whitespace_and_number_spelling() {
    let a = canon(r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#);
    let b = canon(
        "{ \"messages\" : [ { \"content\" : \"hi\" , \"role\" : \"user\" } ],\n\t\"temperature\": 0.0, \"model\": \"m\" }",
    );
    assert_eq!(a, b);
    assert_eq!(
        a,
        r#"{"messages":[{"content":"hi","role":"user"}],"model":"m","temperature":0}"#
    );
    for (x, y) in [
        ("0", "-0.0"),
        ("0", "0e10"),
        ("100", "1e2"),
        ("1.5", "1.50"),
        ("0.25", "2.5e-1"),
        ("12345678901234567890", "12345678901234567890"),
    ] {
        assert_eq!(canon(x), canon(y), "{x} vs {y}");
    }
    assert_eq!(canon("1.5"), "1.5");
    assert_eq!(canon("1e300"), canon("10E+299"));
    assert_ne!(canon("1e300"), canon("1e299"));
    // Escapes are normalised; different strings stay different.
    assert_eq!(canon(r#""\u00e9\/""#), canon("\"\u{e9}/\""));
    assert_ne!(canon(r#""a""#), canon(r#""A""#));
    // Array order matters (it is the conversation).
    assert_ne!(canon("[1,2]"), canon("[2,1]"));
    // Keys sort by their bytes, nested objects too.
    assert_eq!(
        canon(r#"{"b":{"y":1,"x":2},"a":null,"B":true}"#),
        r#"{"B":true,"a":null,"b":{"x":2,"y":1}}"#
    );
}

#[test]
fn cacheability_rule() {
    let s = settings();
    let ok = |v: Value| check(&s, "/v1/chat/completions", &v);
    assert_eq!(ok(json!({"model":"m","temperature":0})), Ok(()));
    assert_eq!(
        ok(json!({"model":"m","temperature":0.0,"n":1,"stream":false,"tools":[]})),
        Ok(())
    );
    assert_eq!(ok(json!({"model":"m"})), Err(Skip::Temperature));
    assert_eq!(
        ok(json!({"model":"m","temperature":null})),
        Err(Skip::Temperature)
    );
    assert_eq!(
        ok(json!({"model":"m","temperature":0.7})),
        Err(Skip::Temperature)
    );
    assert_eq!(
        ok(json!({"model":"m","temperature":"0"})),
        Err(Skip::Temperature)
    );
    assert_eq!(
        ok(json!({"temperature":0,"stream":true})),
        Err(Skip::Stream)
    );
    assert_eq!(ok(json!({"temperature":0,"n":2})), Err(Skip::N));
    assert_eq!(ok(json!({"temperature":0,"n":"1"})), Err(Skip::N));
    assert_eq!(
        ok(json!({"temperature":0,"tools":[{"type":"function"}]})),
        Err(Skip::Tools)
    );
    assert_eq!(
        ok(json!({"temperature":0,"functions":[{"name":"f"}]})),
        Err(Skip::Tools)
    );
    assert_eq!(
        ok(json!({"temperature":0,"previous_response_id":"r"})),
        Err(Skip::Stateful)
    );
    let tools = Settings {
        allow_tools: true,
        temperature: Temperature::ZeroOrAbsent,
        ..settings()
    };
    assert_eq!(
        check(
            &tools,
            "/v1/chat/completions",
            &json!({"tools":[{"type":"function"}]})
        ),
        Ok(())
    );
    assert_eq!(
        check(&tools, "/v1/chat/completions", &json!({"temperature":1})),
        Err(Skip::Temperature)
    );
    // Embeddings are deterministic: no temperature needed.
    assert_eq!(check(&s, "/v1/embeddings", &json!({"input":"x"})), Ok(()));
}

use crate::fake::view as h;

#[test]
fn cache_control_directives() {
    assert_eq!(cache_control(&h(&[])), CacheControl::default());
    let cc = cache_control(&h(&[("cache-control", "No-Cache")]));
    assert!(cc.no_cache && !cc.no_store);
    let cc = cache_control(&h(&[("Cache-Control", "private, no-store")]));
    assert!(!cc.no_cache && cc.no_store);
    let cc = cache_control(&h(&[
        ("cache-control", "max-age=0"),
        ("cache-control", "no-store"),
    ]));
    assert!(cc.no_cache && cc.no_store);
    let cc = cache_control(&h(&[("pragma", "no-cache")]));
    assert!(cc.no_cache && !cc.no_store);
    let cc = cache_control(&h(&[("cache-control", "max-age=60, no-transform")]));
    assert_eq!(cc, CacheControl::default());
}

fn routed(cache: &str, client_cache: &str) -> Config {
    let sha = |k: &[u8]| Digest::of_key(DigestKind::Sha256, k).to_hex();
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{}"{client_cache}}},{{"name":"b","key_sha256":"{}"}}],
            "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}},{{"name":"q","cluster":"d","api_key_env":"K"}}],
            "models":[{{"match":"gpt-4.1","providers":["p","q"]{cache}}},
                      {{"match":"fast","providers":["q"],"upstream_model":"deepseek-chat"{cache}}},
                      {{"match":"deepseek-chat","providers":["q"]{cache}}},
                      {{"match":"other","providers":["p"]}}]}}"#,
        sha(b"ka"),
        sha(b"kb")
    );
    Config::parse(json.as_bytes(), &|_| Some("sk".into())).unwrap()
}

fn info(path: &str) -> RequestInfo {
    RequestInfo {
        path: path.into(),
        control: CacheControl::default(),
        has_query: false,
        varying: Vec::new(),
    }
}

fn plan(c: &Config, client: usize, model: &str, body: &str) -> Option<Decision> {
    let Mode::Routed(r) = &c.mode else { panic!() };
    let rule = r.rule_for(model).unwrap();
    decide(
        c,
        client,
        rule,
        &info("/v1/chat/completions"),
        model,
        body.as_bytes(),
    )
}

fn key_of(d: Option<Decision>) -> Key {
    match d {
        Some(Decision::Use(p)) => p.key,
        other => panic!("{other:?}"),
    }
}

#[test]
fn keys_depend_on_what_determines_the_answer() {
    let c = routed(r#","cache":{}"#, "");
    let body = r#"{"model":"gpt-4.1","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
    let k = key_of(plan(&c, 0, "gpt-4.1", body));
    // Semantically equal JSON: the same key.
    let reordered =
        r#"{"messages":[{"content":"hi","role":"user"}], "temperature":0.0, "model":"gpt-4.1"}"#;
    assert_eq!(key_of(plan(&c, 0, "gpt-4.1", reordered)), k);
    // Another client (client scope), another prompt, another model: another key.
    assert_ne!(key_of(plan(&c, 1, "gpt-4.1", body)), k);
    assert_ne!(key_of(plan(&c, 0, "gpt-4.1", &body.replace("hi", "ho"))), k);
    let fast = body.replace("gpt-4.1", "fast");
    assert_ne!(key_of(plan(&c, 0, "fast", &fast)), k);
    // An alias and the model it names share entries when they route the same way.
    let direct = body.replace("gpt-4.1", "deepseek-chat");
    assert_eq!(
        key_of(plan(&c, 0, "fast", &fast)),
        key_of(plan(&c, 0, "deepseek-chat", &direct))
    );
    // Another endpoint: another key.
    let Mode::Routed(r) = &c.mode else { panic!() };
    let rule = r.rule_for("gpt-4.1").unwrap();
    let other_path = decide(
        &c,
        0,
        rule,
        &info("/v1/completions"),
        "gpt-4.1",
        body.as_bytes(),
    );
    assert_ne!(key_of(other_path), k);
    // No cache on the rule: nothing to do.
    assert_eq!(
        plan(&c, 0, "other", &body.replace("gpt-4.1", "other")),
        None
    );
    // Not cacheable: a bypass with its reason.
    assert_eq!(
        plan(&c, 0, "gpt-4.1", r#"{"model":"gpt-4.1"}"#),
        Some(Decision::Bypass {
            backend: Backend::Local,
            reason: Skip::Temperature
        })
    );
    // Shared scope: every client gets the same key, and it is not the client-scoped one.
    let shared = routed(r#","cache":{"scope":"shared"}"#, "");
    let s0 = key_of(plan(&shared, 0, "gpt-4.1", body));
    assert_eq!(key_of(plan(&shared, 1, "gpt-4.1", body)), s0);
    assert_ne!(s0, k);
    // Forwarded headers that can change the answer are part of the key; a query string,
    // which the key does not cover, makes the request uncacheable.
    let Mode::Routed(r) = &shared.mode else {
        panic!()
    };
    let rule = r.rule_for("gpt-4.1").unwrap();
    let with = |has_query: bool, varying: Vec<(Vec<u8>, Vec<u8>)>| {
        let info = RequestInfo {
            has_query,
            varying,
            ..info("/v1/chat/completions")
        };
        decide(&shared, 0, rule, &info, "gpt-4.1", body.as_bytes())
    };
    assert_eq!(key_of(with(false, Vec::new())), s0);
    let beta = vec![(b"openai-beta".to_vec(), b"x".to_vec())];
    assert_ne!(key_of(with(false, beta)), s0);
    assert_eq!(
        with(true, Vec::new()),
        Some(Decision::Bypass {
            backend: Backend::Local,
            reason: Skip::Query
        })
    );
}

#[test]
fn client_settings_override_the_rules() {
    let c = routed(
        "",
        r#","cache":{"backend":"local","temperature":"zero_or_absent"}"#,
    );
    let body = r#"{"model":"other"}"#;
    assert!(matches!(plan(&c, 0, "other", body), Some(Decision::Use(_))));
    assert_eq!(plan(&c, 1, "other", body), None);
    let off = routed(r#","cache":{}"#, r#","cache":{"enabled":false}"#);
    let body = r#"{"model":"gpt-4.1","temperature":0}"#;
    assert_eq!(plan(&off, 0, "gpt-4.1", body), None);
    assert!(matches!(
        plan(&off, 1, "gpt-4.1", body),
        Some(Decision::Use(_))
    ));
}

#[test]
fn configuration_errors_name_the_field() {
    let sha = Digest::of_key(DigestKind::Sha256, b"k").to_hex();
    let parse = |rule_cache: &str, extra: &str| {
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{sha}"}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}}],
                "models":[{{"match":"m","providers":["p"],"cache":{rule_cache}}}]{extra}}}"#
        );
        Config::parse(json.as_bytes(), &|n| {
            (n != "MISSING").then(|| "u:p".to_string())
        })
    };
    let c = parse("{}", "").unwrap();
    assert_eq!(
        c.cache.rules[0],
        Some(Settings {
            ttl_s: 3600,
            max_entry_bytes: 65536,
            ..settings()
        })
    );
    assert_eq!(c.cache.local, Some(LocalLayout { slots: 508 }));
    assert_eq!(c.cache.redis, None);
    assert!(c.cache.uses(Backend::Local) && !c.cache.uses(Backend::Redis));
    let c = parse(
        r#"{"backend":"redis"}"#,
        r#","cache_backends":{"redis":{"cluster":"w","timeout_ms":30,"basic_auth_env":"A"}}"#,
    )
    .unwrap();
    let r = c.cache.redis.clone().unwrap();
    assert_eq!(
        (r.cluster.as_str(), r.authority.as_str(), r.timeout_ms),
        ("w", "w", 30)
    );
    assert!(r.authorization.is_some());
    assert_eq!(c.cache.local, None);
    assert!(c.cache.uses(Backend::Redis) && !c.cache.uses(Backend::Local));
    // The Redis limiter's Webdis serves the cache too.
    let c = parse(
        r#"{"backend":"redis"}"#,
        r#","limiter":{"backend":"redis","cluster":"lim"}"#,
    )
    .unwrap();
    assert_eq!(c.cache.redis.unwrap().cluster, "lim");
    // Disabled: no setting, and nothing to size.
    let c = parse(r#"{"enabled":false}"#, "").unwrap();
    assert_eq!(c.cache.rules[0], None);
    assert!(!c.cache.enabled());
    for (rule_cache, extra, want) in [
        (r#"{"ttl_s":0}"#, "", "models[0].cache.ttl_s: must be between 1"),
        (r#"{"max_entry_bytes":10}"#, "", "models[0].cache.max_entry_bytes: must be between 1024"),
        (r#"{"backend":"memcached"}"#, "", "models[0].cache.backend: unknown variant"),
        (r#"{"scope":"team"}"#, "", "models[0].cache.scope: unknown variant"),
        (r#"{"temperature":"low"}"#, "", "models[0].cache.temperature: unknown variant"),
        (r#"{"tll_s":5}"#, "", "models[0].cache.tll_s: unknown field"),
        (r#"{"backend":"redis"}"#, "", "models[0].cache.backend: \"redis\" needs a Webdis"),
        (r#"{"max_entry_bytes":65536}"#, r#","cache_backends":{"local":{"max_bytes":65536}}"#,
         "cache_backends.local.max_bytes: 65536 bytes hold fewer than 2 entries of models[0].cache.max_entry_bytes"),
        ("{}", r#","cache_backends":{"local":{"max_bytes":5}}"#, "cache_backends.local.max_bytes: must be between"),
        ("{}", r#","cache_backends":{"redis":{"cluster":""}}"#, "cache_backends.redis.cluster: must name"),
        ("{}", r#","cache_backends":{"redis":{"cluster":"w","timeout_ms":0}}"#, "cache_backends.redis.timeout_ms: must be between"),
        ("{}", r#","cache_backends":{"redis":{"cluster":"w","basic_auth_env":"MISSING"}}"#, "cache_backends.redis.basic_auth_env: environment variable"),
        ("{}", r#","cache_backends":{"memcached":{}}"#, "cache_backends.memcached: unknown field"),
    ] {
        let e = parse(rule_cache, extra).unwrap_err().to_string();
        assert!(e.starts_with(want), "{rule_cache} {extra}: {e}");
    }
    // Caching needs the body, so model routing.
    let json = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{sha}","cache":{{}}}}],"upstream":{{"api_key_env":"K"}}}}"#
    );
    let e = Config::parse(json.as_bytes(), &|_| Some("x".into()))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("clients[0].cache: response caching needs model routing"),
        "{e}"
    );
}

fn entry(key: Key, stored: u64, body: &[u8]) -> Entry {
    Entry {
        key,
        stored_at_ms: stored,
        expires_at_ms: stored + 60_000,
        status: 200,
        content_type: b"application/json".to_vec(),
        body: body.to_vec(),
    }
}

fn k(i: u32) -> Key {
    key("s", "/p", "m", &i.to_le_bytes(), &[])
}

#[test]
fn entries_round_trip_and_garbage_is_no_entry() {
    let e = entry(k(1), NOW, b"{\"x\":1}");
    assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
    let empty_body = entry(k(2), NOW, b"");
    assert_eq!(Entry::decode(&empty_body.encode()), Some(empty_body));
    let bytes = e.encode();
    for cut in 0..HEADER_LEN + 16 {
        assert_eq!(Entry::decode(bytes.get(..cut).unwrap()), None, "{cut}");
    }
    let mut other_version = bytes.clone();
    other_version[0] = 9;
    assert_eq!(Entry::decode(&other_version), None);
    assert!(e.answers(&k(1), NOW + 59_999));
    assert!(!e.answers(&k(1), NOW + 60_000));
    assert!(!e.answers(&k(2), NOW));
    assert_eq!(e.age_s(NOW + 2_500), 2);
}

#[test]
fn new_entries_follow_the_store_rule() {
    let p = Plan {
        key: k(1),
        backend: Backend::Local,
        ttl_s: 10,
        max_entry_bytes: 8,
        lookup: true,
        store: true,
    };
    let e = Entry::new(&p, NOW, 200, b"application/json", b"12345678".to_vec()).unwrap();
    assert_eq!(e.expires_at_ms, NOW + 10_000);
    assert_eq!(Entry::new(&p, NOW, 500, b"a", vec![]), Err(Skip::Status));
    assert_eq!(
        Entry::new(&p, NOW, 200, b"a", vec![0; 9]),
        Err(Skip::TooLarge)
    );
    assert_eq!(
        Entry::new(&p, NOW, 200, b"a\nb", vec![]),
        Err(Skip::Encoding)
    );
    assert_eq!(
        Entry::new(&p, NOW, 200, &[b'a'; 256], vec![]),
        Err(Skip::Encoding)
    );
}

#[test]
fn slot_math() {
    assert_eq!(local_slots(64 << 10, 1024), Some(48));
    assert_eq!(local_slots(32 << 20, 64 << 10), Some(508));
    assert_eq!(local_slots(4096, 4096), None);
    assert_eq!(local_slots(1 << 30, 1024), Some(MAX_SLOTS));
    for (max_bytes, entry) in [(65536u64, 1024usize), (1 << 20, 4 << 20), (5000, 1000)] {
        if let Some(slots) = local_slots(max_bytes, entry) {
            assert_eq!(slots % WAYS, 0);
            assert!(u64::from(slots) * (entry + ENTRY_OVERHEAD) as u64 <= max_bytes);
        }
    }
    assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Same]), 1);
    assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Empty]), 1);
    assert_eq!(choose_way(&[SlotState::Expired, SlotState::Empty]), 1);
    assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Expired]), 1);
    assert_eq!(choose_way(&[SlotState::Live(5), SlotState::Live(3)]), 1);
    assert_eq!(choose_way(&[SlotState::Live(3), SlotState::Live(3)]), 0);
}

#[test]
fn local_store_hits_misses_and_expires() {
    let s = FakeStore::default();
    let layout = LocalLayout { slots: 8 };
    assert_eq!(local_get(&s, &layout, &k(1), NOW), Ok(None));
    let e = entry(k(1), NOW, b"answer");
    local_put(&s, &layout, &e, NOW).unwrap();
    assert_eq!(local_get(&s, &layout, &k(1), NOW + 1), Ok(Some(e.clone())));
    assert_eq!(
        local_get(&s, &layout, &k(1), NOW + 60_000),
        Ok(None),
        "expired"
    );
    assert_eq!(local_get(&s, &layout, &k(2), NOW), Ok(None));
    // Storing the same key again replaces its entry in place.
    let newer = entry(k(1), NOW + 5, b"newer");
    local_put(&s, &layout, &newer, NOW + 5).unwrap();
    assert_eq!(local_get(&s, &layout, &k(1), NOW + 6), Ok(Some(newer)));
    // Store failures are errors, never panics; contention is bounded.
    s.fail_get.set(true);
    assert_eq!(local_get(&s, &layout, &k(1), NOW), Err(Error::Store));
    s.fail_get.set(false);
    s.conflicts.set(STORE_ATTEMPTS);
    assert_eq!(local_put(&s, &layout, &e, NOW), Err(Error::Contention));
    s.conflicts.set(1);
    assert_eq!(local_put(&s, &layout, &e, NOW), Ok(()));
    s.fail_set.set(true);
    assert_eq!(local_put(&s, &layout, &e, NOW), Err(Error::Store));
}

#[test]
fn eviction_reuses_a_fixed_set_of_keys() {
    let s = FakeStore::default();
    let layout = LocalLayout { slots: 16 };
    let allowed: Vec<String> = (0..layout.slots).map(slot_key).collect();
    for i in 0..2000u32 {
        let at = NOW + u64::from(i);
        local_put(&s, &layout, &entry(k(i), at, &[0u8; 100]), at).unwrap();
        let map = s.map.borrow();
        assert!(map.len() <= layout.slots as usize);
        assert!(
            map.keys().all(|key| allowed.contains(key)),
            "{:?}",
            map.keys()
        );
    }
    // The newest entry is always there; the oldest of a full set went first.
    let last = NOW + 1999;
    assert_eq!(
        local_get(&s, &layout, &k(1999), last)
            .unwrap()
            .unwrap()
            .stored_at_ms,
        last
    );
    let held = (0..2000u32)
        .filter(|i| local_get(&s, &layout, &k(*i), last).unwrap().is_some())
        .count();
    assert!(
        held <= layout.slots as usize && held >= layout.slots as usize / 2,
        "{held}"
    );
}

#[test]
fn lru_within_a_set() {
    // One set of two ways: the older of two live entries is replaced.
    let s = FakeStore::default();
    let layout = LocalLayout { slots: WAYS };
    local_put(&s, &layout, &entry(k(1), NOW, b"1"), NOW).unwrap();
    local_put(&s, &layout, &entry(k(2), NOW + 1, b"2"), NOW + 1).unwrap();
    local_put(&s, &layout, &entry(k(3), NOW + 2, b"3"), NOW + 2).unwrap();
    let at = NOW + 3;
    assert_eq!(local_get(&s, &layout, &k(1), at), Ok(None));
    assert!(local_get(&s, &layout, &k(2), at).unwrap().is_some());
    assert!(local_get(&s, &layout, &k(3), at).unwrap().is_some());
    // An expired entry goes before a live older one.
    local_put(&s, &layout, &entry(k(4), NOW + 70_000, b"4"), NOW + 70_000).unwrap();
    assert_eq!(s.map.borrow().len(), 2);
}

#[test]
fn webdis_commands() {
    let key = k(7);
    let get = String::from_utf8(get_command(&key)).unwrap();
    assert!(
        get.starts_with("EVAL/return%20redis%2Ecall%28%27GET%27"),
        "{get}"
    );
    assert!(
        get.ends_with(&format!("/1/tollgate%3Acache%3Av1%3A{}", key.hex())),
        "{get}"
    );
    let e = entry(key, NOW, b"{\"a\":\"/.+\"}");
    let set = String::from_utf8(set_command(&e, 3600)).unwrap();
    assert_eq!(set.matches('/').count(), 5, "{set}");
    assert!(set.ends_with("/3600"), "{set}");
    assert!(!set.contains('.'));
    let value = set.rsplit('/').nth(1).unwrap();
    assert_eq!(Entry::decode(&base64::decode_url(value).unwrap()), Some(e));
    let redis = Webdis {
        cluster: "webdis".into(),
        authority: "webdis.svc".into(),
        timeout_ms: 50,
        authorization: Some("Basic x".into()),
    };
    let call = crate::request::webdis_call(&redis, get_command(&key));
    assert_eq!(call.cluster, "webdis");
    assert_eq!(call.timeout_ms, 50);
    assert!(call.headers.contains(&(":authority", "webdis.svc".into())));
    assert!(call.headers.contains(&("authorization", "Basic x".into())));
    assert!(!format!("{redis:?}").contains("Basic x"));
}

#[test]
fn webdis_replies() {
    let key = k(1);
    let e = entry(key, NOW, b"body");
    let stored = format!(r#"{{"EVAL":"{}"}}"#, base64::encode_url(&e.encode()));
    assert_eq!(
        parse_get_reply(Some(200), stored.as_bytes(), &key, NOW),
        Ok(Some(e))
    );
    assert_eq!(
        parse_get_reply(Some(200), stored.as_bytes(), &k(2), NOW),
        Ok(None),
        "another key"
    );
    assert_eq!(
        parse_get_reply(Some(200), stored.as_bytes(), &key, NOW + 60_000),
        Ok(None)
    );
    assert_eq!(
        parse_get_reply(Some(200), br#"{"EVAL":null}"#, &key, NOW),
        Ok(None)
    );
    assert_eq!(
        parse_get_reply(Some(200), br#"{"EVAL":"not base64!"}"#, &key, NOW),
        Err(Error::Corrupt)
    );
    assert_eq!(
        parse_get_reply(Some(200), br#"{"EVAL":"aGVsbG8"}"#, &key, NOW),
        Err(Error::Corrupt)
    );
    assert_eq!(
        parse_get_reply(Some(200), br#"{"EVAL":[false,"WRONGTYPE x"]}"#, &key, NOW),
        Err(Error::Redis(ReplyError::Redis("WRONGTYPE x".into())))
    );
    assert_eq!(
        parse_get_reply(None, b"", &key, NOW),
        Err(Error::Redis(ReplyError::Unavailable))
    );
    assert_eq!(
        parse_get_reply(Some(403), b"", &key, NOW)
            .unwrap_err()
            .reason(),
        "forbidden"
    );
    assert_eq!(
        parse_get_reply(Some(504), b"upstream request timeout", &key, NOW)
            .unwrap_err()
            .reason(),
        "timeout"
    );
    assert_eq!(
        parse_get_reply(Some(503), b"x", &key, NOW)
            .unwrap_err()
            .reason(),
        "status"
    );
    for bad in [
        &b""[..],
        b"[]",
        b"{}",
        br#"{"GET":null}"#,
        br#"{"EVAL":5}"#,
        br#"{"EVAL":[1,2]}"#,
    ] {
        assert_eq!(
            parse_get_reply(Some(200), bad, &key, NOW),
            Err(Error::Redis(ReplyError::Malformed)),
            "{bad:?}"
        );
    }
    assert_eq!(
        parse_set_reply(Some(200), br#"{"EVAL":[true,"OK"]}"#),
        Ok(())
    );
    assert_eq!(parse_set_reply(Some(200), br#"{"EVAL":"OK"}"#), Ok(()));
    assert_eq!(
        parse_set_reply(Some(200), br#"{"EVAL":[true,"NO"]}"#)
            .unwrap_err()
            .reason(),
        "malformed"
    );
    assert_eq!(
        parse_set_reply(Some(200), br#"{"EVAL":[false,"ERR x"]}"#)
            .unwrap_err()
            .reason(),
        "redis_error"
    );
    assert_eq!(
        parse_set_reply(None, b"").unwrap_err().reason(),
        "unavailable"
    );
}

proptest! {
    #[test]
    fn parsers_never_panic(status in proptest::option::of(0u16..600), body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_get_reply(status, &body, &k(1), NOW);
        let _ = parse_set_reply(status, &body);
        let _ = Entry::decode(&body);
        let _ = base64::decode_url(&String::from_utf8_lossy(&body));
    }

    #[test]
    fn canonical_form_is_stable_under_reserialisation(
        pairs in proptest::collection::btree_map("[a-zA-Z_]{1,8}", -1000i64..1000, 0..8),
        text in "\\PC{0,20}",
    ) {
        let mut v = serde_json::Map::new();
        for (k, n) in &pairs {
            v.insert(k.clone(), json!(n));
        }
        v.insert("text".into(), json!(text));
        let value = Value::Object(v);
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        let once = canonical_json(&value);
        let again = canonical_json(&serde_json::from_str(&pretty).unwrap());
        prop_assert_eq!(&once, &again);
        let reparsed: Value = serde_json::from_slice(&once).unwrap();
        prop_assert_eq!(canonical_json(&reparsed), once);
    }
}

//! One request through Tollgate, decided without touching the host: the filter hands in what it
//! read (headers, the time, a store) and applies the returned decision.
//!
//! ```text
//! request headers ──► authenticate ──► limit ──► rewrite headers ──► upstream
//!                        │ 401            │ 429
//!                        ▼                ▼
//!                    local reply      local reply
//! response headers ◄── x-ratelimit-*-requests (the client's own budget)
//! ```

use crate::config::{ClientId, Config, LimiterBackend};
use crate::headers::{must_strip, Header};
use crate::keys::{bearer_token, KeyError};
use crate::limiter::{self, CasStore, LimiterError, Verdict, Window};
use crate::metrics::Outcome;
use crate::openai::{self, LocalReply};

/// What to do with a request after its headers.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer the client now; the request goes no further.
    Reply(LocalReply),
    /// Rewrite the headers and send the request upstream.
    Forward(Forward),
}

/// Header changes for a forwarded request, and what to add to its response.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward {
    /// Client-sent headers to remove (`x-tollgate-*`, credentials other than `authorization`,
    /// which is replaced), lowercase, each once.
    pub remove: Vec<Vec<u8>>,
    /// Headers to set, replacing any value (the provider's `authorization`).
    pub set: Vec<(&'static str, String)>,
    /// The client's window, for the response's `x-ratelimit-*` headers; `None` when the limiter
    /// failed open.
    pub window: Option<Window>,
}

/// The decision with what the filter records about it.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// What to do.
    pub decision: Decision,
    /// The authenticated client, if any.
    pub client: Option<ClientId>,
    /// For `tollgate_requests_total`.
    pub outcome: Outcome,
    /// A limiter failure that was tolerated (fail open), for `tollgate_limiter_errors_total`.
    pub limiter_error: Option<LimiterError>,
    /// Why authentication failed (debug logs and tests; never sent to the client).
    pub key_error: Option<KeyError>,
}

/// Decides what to do with a request from its headers.
///
/// `headers` are all request headers as the host delivered them (names lowercase, values raw
/// bytes); `now_ms` is the wall clock in Unix milliseconds.
pub fn on_request_headers(
    config: &Config,
    headers: &[Header],
    now_ms: u64,
    store: &dyn CasStore,
) -> Step {
    let auth_values = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"authorization"))
        .map(|(_, v)| v.as_slice());
    let client = bearer_token(auth_values)
        .and_then(|token| config.keys.lookup(token).ok_or(KeyError::Unknown));
    let (client_id, client) = match client.map(|id| (id, config.client(id))) {
        Ok((id, Some(c))) => (id, c),
        Ok((_, None)) | Err(_) => {
            return Step {
                decision: Decision::Reply(openai::invalid_api_key()),
                client: None,
                outcome: Outcome::Unauthorized,
                limiter_error: None,
                key_error: Some(client.err().unwrap_or(KeyError::Unknown)),
            }
        }
    };

    let limit = u64::from(client.requests_per_minute);
    let verdict = match config.limiter {
        LimiterBackend::Local => {
            limiter::check(store, &limiter::requests_key(client), limit, now_ms)
        }
    };
    let (window, limiter_error) = match verdict {
        Ok(Verdict::Admitted(w)) => (Some(w), None),
        Ok(Verdict::Limited(w)) => {
            return Step {
                decision: Decision::Reply(openai::requests_rate_limited(
                    &client.name,
                    w.limit,
                    w.reset_ms,
                )),
                client: Some(client_id),
                outcome: Outcome::RateLimited,
                limiter_error: None,
                key_error: None,
            }
        }
        // Fail open: a contended or failing local store must not turn away paying clients.
        // The error is counted, and at most one extra request per failure gets through.
        Err(e) => (None, Some(e)),
    };

    let mut remove: Vec<Vec<u8>> = Vec::new();
    for (name, _) in headers {
        if must_strip(name)
            && !name.eq_ignore_ascii_case(b"authorization")
            && !remove.iter().any(|r| r.eq_ignore_ascii_case(name))
        {
            remove.push(name.to_ascii_lowercase());
        }
    }
    Step {
        decision: Decision::Forward(Forward {
            remove,
            set: vec![("authorization", config.upstream.authorization.clone())],
            window,
        }),
        client: Some(client_id),
        outcome: Outcome::Admitted,
        limiter_error,
        key_error: None,
    }
}

/// Response headers carrying the client's own request budget; they replace the provider's
/// `x-ratelimit-*` headers, which describe the shared provider key, not this client.
pub fn response_headers(window: &Window) -> Vec<(&'static str, String)> {
    openai::rate_limit_request_headers(window.limit, window.remaining, window.reset_ms)
}

/// Provider rate-limit headers removed from every forwarded response: they describe the
/// provider account behind the gateway, which clients must not see or act on.
pub const PROVIDER_RATE_LIMIT_HEADERS: &[&str] = &[
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Digest, DigestKind};
    use crate::limiter::tests::FakeStore;

    const NOW: u64 = 1_700_000_000_000;

    fn config(rpm: u32) -> Config {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let md5 = Digest::of_key(DigestKind::Md5, b"legacy-key").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}","requests_per_minute":{rpm}}},
                           {{"name":"legacy","key_md5":"{md5}"}}],
                "upstream":{{"api_key_env":"K"}}}}"#
        );
        Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap()
    }

    fn h(pairs: &[(&str, &[u8])]) -> Vec<Header> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    fn forward(step: &Step) -> &Forward {
        match &step.decision {
            Decision::Forward(f) => f,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    #[test]
    fn admitted_request_swaps_keys_and_strips_internal_headers() {
        let c = config(10);
        let s = FakeStore::default();
        let step = on_request_headers(
            &c,
            &h(&[
                (":path", b"/v1/chat/completions"),
                ("authorization", b"Bearer sk-team-a"),
                ("x-tollgate-client", b"spoofed"),
                ("X-Tollgate-Route", b"spoofed"),
                ("x-tollgate-client", b"again"),
                ("x-api-key", b"sk-team-a"),
                ("content-type", b"application/json"),
            ]),
            NOW,
            &s,
        );
        assert_eq!(step.outcome, Outcome::Admitted);
        assert_eq!(step.client, Some(0));
        let f = forward(&step);
        assert_eq!(
            f.remove,
            vec![
                b"x-tollgate-client".to_vec(),
                b"x-tollgate-route".to_vec(),
                b"x-api-key".to_vec()
            ]
        );
        assert_eq!(
            f.set,
            vec![("authorization", "Bearer sk-provider".to_string())]
        );
        assert_eq!(f.window.unwrap().remaining, 9);
    }

    #[test]
    fn md5_clients_authenticate() {
        let c = config(10);
        let step = on_request_headers(
            &c,
            &h(&[("authorization", b"Bearer legacy-key")]),
            NOW,
            &FakeStore::default(),
        );
        assert_eq!(step.client, Some(1));
        assert_eq!(forward(&step).window.unwrap().limit, 60);
    }

    #[test]
    fn every_key_failure_gets_the_same_401() {
        let c = config(10);
        let cases: Vec<(Vec<Header>, KeyError)> = vec![
            (h(&[]), KeyError::Missing),
            (h(&[("authorization", b"Bearer nope")]), KeyError::Unknown),
            (
                h(&[("authorization", b"Token sk-team-a")]),
                KeyError::Malformed,
            ),
            (
                h(&[("authorization", b"Bearer \xffsk")]),
                KeyError::Malformed,
            ),
            (
                h(&[
                    ("authorization", b"Bearer sk-team-a"),
                    ("authorization", b"Bearer sk-team-a"),
                ]),
                KeyError::Repeated,
            ),
        ];
        let mut bodies = Vec::new();
        for (headers, why) in cases {
            let step = on_request_headers(&c, &headers, NOW, &FakeStore::default());
            assert_eq!(step.outcome, Outcome::Unauthorized);
            assert_eq!(step.key_error, Some(why));
            assert_eq!(step.client, None);
            match step.decision {
                Decision::Reply(r) => {
                    assert_eq!(r.status, 401);
                    bodies.push((r.headers, r.body));
                }
                other => panic!("{other:?}"),
            }
        }
        bodies.dedup();
        assert_eq!(bodies.len(), 1, "the answer must not reveal what was wrong");
    }

    #[test]
    fn over_limit_is_429_and_other_clients_are_unaffected() {
        let c = config(2);
        let s = FakeStore::default();
        let team = h(&[("authorization", b"Bearer sk-team-a")]);
        for _ in 0..2 {
            assert_eq!(
                on_request_headers(&c, &team, NOW, &s).outcome,
                Outcome::Admitted
            );
        }
        let step = on_request_headers(&c, &team, NOW, &s);
        assert_eq!(step.outcome, Outcome::RateLimited);
        match step.decision {
            Decision::Reply(r) => {
                assert_eq!(r.status, 429);
                assert!(r
                    .headers
                    .contains(&("x-ratelimit-remaining-requests", "0".into())));
                assert!(r.headers.iter().any(|(n, _)| *n == "retry-after"));
            }
            other => panic!("{other:?}"),
        }
        let legacy = h(&[("authorization", b"Bearer legacy-key")]);
        assert_eq!(
            on_request_headers(&c, &legacy, NOW, &s).outcome,
            Outcome::Admitted
        );
    }

    #[test]
    fn limiter_failure_fails_open_and_is_reported() {
        let c = config(2);
        let s = FakeStore::default();
        s.fail_get.set(true);
        let step = on_request_headers(&c, &h(&[("authorization", b"Bearer sk-team-a")]), NOW, &s);
        assert_eq!(step.outcome, Outcome::Admitted);
        assert_eq!(step.limiter_error, Some(LimiterError::Store));
        assert_eq!(forward(&step).window, None);
    }

    #[test]
    fn response_headers_show_the_clients_budget() {
        let w = Window {
            limit: 60,
            remaining: 12,
            reset_ms: 30_500,
        };
        assert_eq!(
            response_headers(&w),
            vec![
                ("x-ratelimit-limit-requests", "60".to_string()),
                ("x-ratelimit-remaining-requests", "12".to_string()),
                ("x-ratelimit-reset-requests", "31s".to_string()),
            ]
        );
    }
}

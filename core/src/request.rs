//! One request through Tollgate, decided without touching the host: the filter hands in what it
//! read (headers, body, the time, a store, a limiter reply) and applies the returned decision.
//!
//! ```text
//! headers ─► authenticate ─┬─ single provider ─────────────────────┐
//!              │ 401        └─ routing: GET /v1/models (answered)   │
//!              ▼               POST model endpoint ─► body ─► model ─► allow-list ─► rule
//!          local reply           413 / 400 / 403 / 404 ◄──┘          │
//!                                                                   ▼
//!                         limit: local (shared data) or redis (Webdis callout ─► reply)
//!                           │ 429 / 503                             │
//!                           ▼                                       ▼
//!                       local reply                rewrite headers (route, keys) ─► upstream
//! response headers ◄── x-ratelimit-*-requests (the client's own budget)
//! ```

use crate::anthropic;
use crate::body::{self, BodyError};
use crate::cache;
use crate::config::{ClientId, Config, LimiterBackend, Mode, OnError, RedisLimiter, Webdis};
use crate::endpoints::{self, Api, Kind};
use crate::forwarding;
use crate::headers::Header;
use crate::host::CasStore;
use crate::keys::{bearer_token, Digest, DigestKind, KeyError};
use crate::lease;
use crate::limiter::{self, Budget, BudgetAsk, Exceeded, LimiterError, Window, WINDOW_MS};
use crate::metrics::Outcome;
use crate::openai::{self, LocalReply};
use crate::routing::{self, Routing, DEFAULT_ROUTE, ROUTE_HEADER};
use crate::spend::{Measure, Period, Price, PriceId};
use crate::usage::Usage;
use crate::webdis::{self, Checked};

/// What to do with a request.
// Made and moved once per request: boxing the larger variant would cost an allocation for
// every admitted request to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer the client now; the request goes no further.
    Reply(LocalReply),
    /// Rewrite the headers and send the request upstream.
    Forward(Forward),
}

/// Header changes for a forwarded request, and what to add to its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Headers to set, replacing any value (the provider key, or the route).
    pub set: Vec<(&'static str, String)>,
    /// The route changed: Envoy must pick the route again (`clear_route_cache`).
    pub reroute: bool,
    /// The client's window, for the response's `x-ratelimit-*` headers; `None` when the limiter
    /// failed open.
    pub window: Option<Window>,
    /// The model rule that routed the request (`None`: one provider, or the default route).
    pub rule: Option<usize>,
    /// Tokens reserved for this request, settled when its usage is known.
    pub tokens: Option<TokenReservation>,
    /// Replace the request body with this (a stream that now asks for usage).
    pub body: Option<Vec<u8>>,
    /// The gateway asked for the stream's usage chunk; remove it from what the client gets.
    pub strip_usage_chunk: bool,
    /// The response cache's part (looked up after admission, so limits count every request).
    pub cache: Option<cache::Decision>,
    /// The price of the model the provider bills (the rule's first target, after aliasing).
    pub price: Option<PriceId>,
    /// The request's token estimate (what a response without usage is charged from).
    pub estimate: Estimate,
    /// What the request holds of its client's budgets, settled with its usage.
    pub budgets: Option<BudgetReservation>,
}

/// A request's hold on its client's budgets (every period's current window), from admission
/// until its usage is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetReservation {
    /// The windows counted in: period and window number.
    pub windows: Vec<(Period, u64)>,
    /// Tokens reserved (the estimate).
    pub estimate: Estimate,
    /// Money reserved, micro-units (the estimate at the billed model's price; 0 unpriced).
    pub money: u64,
    /// Counted in Redis (settled there by the root tick), not in the local record.
    pub redis: bool,
}

impl Forward {
    /// Header changes, with everything else still to be decided (window, rule, tokens, body).
    fn new(set: Vec<(&'static str, String)>, reroute: bool) -> Self {
        Self {
            set,
            reroute,
            window: None,
            rule: None,
            tokens: None,
            body: None,
            strip_usage_chunk: false,
            cache: None,
            price: None,
            estimate: Estimate::default(),
            budgets: None,
        }
    }
}

/// Tokens held for a request from admission until its response reports what it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReservation {
    /// The minute window the estimate was counted in.
    pub window: u64,
    /// Tokens reserved.
    pub estimate: Estimate,
    /// The client's window after the reservation, for `x-ratelimit-*-tokens`.
    pub state: Window,
    /// Where the reservation was counted: the Redis token key, or `None` for the local record.
    pub redis_key: Option<String>,
}

/// A request's token estimate (see [`estimate_tokens`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The prompt: the request body at four bytes a token.
    pub prompt: u64,
    /// The completion it may produce: its `max_tokens`, or 0.
    pub completion: u64,
}

impl Estimate {
    /// Tokens reserved.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// A limiter failure that was handled by the failure policy, for
/// `tollgate_limiter_errors_total{backend,reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterFailure {
    /// `local` or `redis`.
    pub backend: &'static str,
    /// Why, e.g. `contention`, `timeout`, `redis_error`.
    pub reason: &'static str,
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
    /// Limiter failures met on the way (at most one per backend).
    pub limiter_errors: Vec<LimiterFailure>,
    /// Why authentication failed (debug logs and tests; never sent to the client).
    pub key_error: Option<KeyError>,
    /// The model the body asked for, once it was read (for the access log).
    pub model: Option<String>,
    /// A lease prefetch for the worker's root context to send (see [`lease`]).
    pub prefetch: Option<lease::Fetch>,
    /// Requests and tokens Redis granted to this request's lease fetch (for
    /// `tollgate_lease_granted_total`).
    pub lease_granted: (u64, u64),
}

/// What the filter does next with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// Decided.
    Done(Step),
    /// Pause the request, read the whole body (at most `max_bytes`), pass it to
    /// [`on_request_body`].
    ReadBody(AwaitBody),
    /// Make this callout, keep the request paused, and pass the reply to [`on_limiter_reply`].
    AskLimiter(Pending),
}

/// A request waiting for its body.
#[derive(Debug, PartialEq, Eq)]
pub struct AwaitBody {
    /// Bodies larger than this get a 413.
    pub max_bytes: usize,
    client: ClientId,
    /// MD5 hex of the client key, for the Redis limiter's key (the key itself is not kept).
    key_md5: Option<String>,
    /// What the response cache needs from the headers, when caching is configured.
    cache: Option<cache::RequestInfo>,
    /// The endpoint's API: the model's providers must speak it.
    api: Api,
    /// Tokens are reserved and charged (not for a token count).
    charged: bool,
}

impl AwaitBody {
    /// The authenticated client whose body this is.
    pub fn client(&self) -> ClientId {
        self.client
    }
}

pub use crate::host::Callout;

/// A request waiting for the limiter's reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Pending {
    /// The callout to make.
    pub call: Callout,
    client: ClientId,
    forward: Forward,
    estimate: Estimate,
    /// MD5 hex of the client key (the Redis keys' middle part).
    key_md5: String,
    /// With budgets, the counters of the one script call, and what each one is.
    counters: Option<Vec<(webdis::Counter, Counted)>>,
    /// A read for the budget endpoint ([`BUDGETS_PATH`]), not a check.
    report: bool,
    sent_ms: u64,
    /// The model the body asked for (carried to the step).
    model: Option<String>,
    /// A lease fetch this request waits for (see [`lease`]).
    lease: Option<lease::Fetch>,
}

impl Pending {
    /// The callout fetches a lease (a worker's breaker may short-circuit it).
    pub fn is_lease(&self) -> bool {
        self.lease.is_some()
    }

    /// The lease fetch this request waits for.
    pub fn lease_fetch(&self) -> Option<&lease::Fetch> {
        self.lease.as_ref()
    }
}

/// The client's request headers that must not reach a provider (see [`forwarding`]): the filter
/// removes them the moment the headers arrive, before it decides or pauses anything.
pub fn strip_list(config: &Config, headers: &[Header]) -> Vec<Vec<u8>> {
    forwarding::strip_list(headers, &config.forward_headers)
}

/// The key a request presents where its API puts it (Anthropic's clients send `x-api-key`).
fn presented_key<'a>(api: Api, headers: &[Header<'a>]) -> Result<&'a [u8], KeyError> {
    match api {
        Api::OpenAi => bearer_token(
            headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(b"authorization"))
                .map(|(_, v)| *v),
        ),
        Api::Anthropic => anthropic::client_key(headers),
    }
}

/// Whether [`on_request_headers`] needs the peer certificate's identity
/// ([`crate::identity::PEER_URI_SAN`]): some client is known by one and the request presents
/// no key. A request with a key is judged by its key alone, so the common path reads nothing.
pub fn wants_peer_identity(config: &Config, headers: &[Header]) -> bool {
    !config.identities.is_empty()
        && presented_key(api_of(headers), headers) == Err(KeyError::Missing)
}

/// Decides what to do with a request from its headers.
///
/// `headers` are all request headers as the host delivered them (names lowercase, values raw
/// bytes), read before [`strip_list`] was applied; `peer` is the peer certificate's URI SAN when
/// [`wants_peer_identity`] asked for it (a request with no key is then admitted by it, exactly);
/// `end_of_stream` says no body or trailers follow; `now_ms` is the wall clock in Unix
/// milliseconds.
pub fn on_request_headers(
    config: &Config,
    headers: &[Header],
    peer: Option<&[u8]>,
    end_of_stream: bool,
    now_ms: u64,
    store: &dyn CasStore,
) -> Start {
    let method = header(headers, b":method").unwrap_or_default();
    let full_path = header(headers, b":path").unwrap_or_default();
    let mut parts = full_path.splitn(2, |&b| b == b'?');
    let path = parts.next().unwrap_or_default();
    let has_query = parts.next().is_some();
    let api = endpoints::api_of_path(path);
    let authenticated = match presented_key(api, headers) {
        // No key: a client known by its certificate, or nobody.
        Err(KeyError::Missing) if !config.identities.is_empty() => match peer {
            None => Err(KeyError::Missing),
            Some(id) => config
                .identities
                .lookup(id)
                .map(|c| (c, None))
                .ok_or(KeyError::UnknownIdentity),
        },
        presented => presented.and_then(|token| {
            let id = config.keys.admit(token, now_ms)?;
            Ok((id, Some(token)))
        }),
    };
    let (client, token) = match authenticated {
        Ok(found) => found,
        Err(why) => {
            let answer = match why {
                KeyError::Expired => openai::expired_api_key(),
                _ => openai::invalid_api_key(),
            };
            return Start::Done(Step {
                key_error: Some(why),
                ..reply(None, Outcome::Unauthorized, answer)
            });
        }
    };
    // The Redis limiter's key is derived from the client key; keep only that digest.
    let key_md5 = match config.limiter {
        // All of a `keys` list or `identities` spend one budget: its Redis keys are named
        // after the client.
        LimiterBackend::Redis(_) => config.client(client).map(|c| match (c.redis_id(), token) {
            (Some(id), _) => id,
            (None, Some(t)) => Digest::of_key(DigestKind::Md5, t).to_hex(),
            (None, None) => format!("name-{}", c.name),
        }),
        LimiterBackend::Local => None,
    };
    if path == BUDGETS_PATH.as_bytes() && method == b"GET" {
        return budgets_report(config, client, key_md5, now_ms, store);
    }
    // Deny by default: only the endpoints granted to this client, matched exactly.
    let granted = config
        .client(client)
        .map(|c| c.endpoints)
        .unwrap_or_default();
    let Some(endpoint) = granted.find(method, path) else {
        return Start::Done(reply(
            Some(client),
            Outcome::Invalid,
            openai::unknown_url(
                &String::from_utf8_lossy(method),
                &String::from_utf8_lossy(path),
            ),
        ));
    };
    // A body of unknown size cannot be estimated from its length: with one provider (whose
    // bodies are not read) such a request would otherwise reserve no prompt tokens at all.
    let length = declared_length(headers);
    let routing = match &config.mode {
        Mode::Single(upstream) => {
            // The one provider serves its own API only.
            if endpoint.api != upstream.api {
                return Start::Done(reply(
                    Some(client),
                    Outcome::Invalid,
                    openai::unknown_url(
                        &String::from_utf8_lossy(method),
                        &String::from_utf8_lossy(path),
                    ),
                ));
            }
            if endpoint.kind == Kind::Model && length.is_none() && !end_of_stream {
                return Start::Done(reply(
                    Some(client),
                    Outcome::Invalid,
                    openai::length_required(),
                ));
            }
            let forward = Forward::new(vec![upstream.credential()], false);
            // The body is not read in this mode: the prompt is estimated from its declared size
            // (`max_tokens` is unknown; the completion is settled from the usage).
            let estimate = match endpoint.kind {
                Kind::Model => estimate_tokens(length.unwrap_or(0), None),
                Kind::Count | Kind::ModelList | Kind::Account => Estimate::default(),
            };
            return limit(config, client, key_md5, forward, estimate, now_ms, store);
        }
        Mode::Routed(routing) => routing,
    };
    match endpoint.kind {
        Kind::ModelList => {
            let allow = config.client(client).and_then(|c| c.models());
            let answer = match path.strip_prefix(b"/v1/models/".as_slice()) {
                None => openai::json_ok(routing::models_list(routing, allow)),
                Some(id) => {
                    let id = String::from_utf8_lossy(id);
                    match routing::model_object(routing, allow, &id) {
                        Some(body) => openai::json_ok(body),
                        None => openai::model_not_found(&id),
                    }
                }
            };
            Start::Done(reply(Some(client), Outcome::Admitted, answer))
        }
        Kind::Model | Kind::Count => {
            if length.is_some_and(|n| n > routing.max_body_bytes) {
                return Start::Done(reply(
                    Some(client),
                    Outcome::Invalid,
                    openai::body_too_large(routing.max_body_bytes),
                ));
            }
            let cache = config.cache.enabled().then(|| cache::RequestInfo {
                path: String::from_utf8_lossy(path).into_owned(),
                control: cache::cache_control(headers),
                has_query,
                varying: forwarding::varying(headers, &config.forward_headers),
            });
            Start::ReadBody(AwaitBody {
                max_bytes: routing.max_body_bytes,
                client,
                key_md5,
                cache,
                api: endpoint.api,
                charged: endpoint.kind == Kind::Model,
            })
        }
        // Account endpoints go to the default provider (the configuration guarantees one when
        // any is granted), counted as requests.
        Kind::Account => {
            let forward = Forward::new(vec![(ROUTE_HEADER, DEFAULT_ROUTE.to_string())], true);
            limit(
                config,
                client,
                key_md5,
                forward,
                Estimate::default(),
                now_ms,
                store,
            )
        }
    }
}

/// Decides a routed request from its complete body.
pub fn on_request_body(
    config: &Config,
    awaiting: AwaitBody,
    body: &[u8],
    now_ms: u64,
    store: &dyn CasStore,
) -> Start {
    let AwaitBody {
        max_bytes,
        client,
        key_md5,
        cache,
        api,
        charged,
    } = awaiting;
    let Mode::Routed(routing) = &config.mode else {
        return Start::Done(reply(
            Some(client),
            Outcome::Error,
            openai::internal_error(),
        ));
    };
    let invalid = |r: LocalReply| Start::Done(reply(Some(client), Outcome::Invalid, r));
    if body.len() > max_bytes {
        return invalid(openai::body_too_large(max_bytes));
    }
    let request = match body::parse(body) {
        Ok(r) => r,
        Err(BodyError::Malformed(why)) => return invalid(openai::malformed_body(&why)),
        Err(BodyError::NoModel) => return invalid(openai::missing_model()),
    };
    let model = request.model.clone();
    with_model(
        decide_model(
            config, routing, client, key_md5, cache, api, charged, body, request, now_ms, store,
        ),
        model,
    )
}

/// The model the request asked for, on whatever was decided for it.
fn with_model(start: Start, model: String) -> Start {
    match start {
        Start::Done(step) => Start::Done(Step {
            model: Some(model),
            ..step
        }),
        Start::AskLimiter(pending) => Start::AskLimiter(Pending {
            model: Some(model),
            ..pending
        }),
        other => other,
    }
}

/// Decides a routed request from its model: the allow-list, the rule, the limits.
#[allow(clippy::too_many_arguments)]
fn decide_model(
    config: &Config,
    routing: &Routing,
    client: ClientId,
    key_md5: Option<String>,
    cache: Option<cache::RequestInfo>,
    api: Api,
    charged: bool,
    body: &[u8],
    request: body::ModelRequest,
    now_ms: u64,
    store: &dyn CasStore,
) -> Start {
    let invalid = |r: LocalReply| Start::Done(reply(Some(client), Outcome::Invalid, r));
    let allow = config.client(client).and_then(|c| c.models());
    if !routing::allowed(allow, &request.model) {
        let name = config.client(client).map_or("", |c| c.name.as_str());
        return invalid(openai::model_not_allowed(name, &request.model));
    }
    // A model whose providers speak another API is not served on this endpoint.
    let Some(rule) = routing
        .rule_for(&request.model)
        .filter(|&rule| routing.rule_api(rule) == api)
    else {
        return invalid(openai::model_not_found(&request.model));
    };
    // Every stream reports its usage: ask for it when the client did not, and take the extra
    // chunk out again on the way back, so the client sees the stream it asked for. (Anthropic's
    // streams always report it.)
    let new_body = if request.stream && api == Api::OpenAi {
        body::with_stream_usage(body)
    } else {
        None
    };
    let cache = cache.and_then(|info| {
        let settings = config.cache.settings(client, rule)?;
        let name = &config.client(client)?.name;
        cache::decide(settings, routing, rule, name, &info, &request.model, body)
    });
    // Priced as the provider bills it: the name the rule's first provider gets.
    let billed = routing
        .rules
        .get(rule)
        .and_then(|r| r.targets.first())
        .and_then(|t| t.model.as_deref())
        .unwrap_or(&request.model);
    let estimate = if charged {
        estimate_tokens(body.len(), request.max_tokens)
    } else {
        Estimate::default()
    };
    let forward = Forward {
        rule: Some(rule),
        price: config.prices.find(billed),
        estimate,
        cache,
        strip_usage_chunk: new_body.is_some(),
        body: new_body,
        ..Forward::new(vec![(ROUTE_HEADER, Routing::route_id(rule))], true)
    };
    limit(config, client, key_md5, forward, estimate, now_ms, store)
}

/// Decides a request that waited for the Redis limiter. `status` is the callout's `:status`,
/// `None` when Envoy called back without headers (the callout failed or timed out).
pub fn on_limiter_reply(
    config: &Config,
    pending: Pending,
    status: Option<u16>,
    body: &[u8],
    now_ms: u64,
    store: &dyn CasStore,
) -> Step {
    let Pending {
        call,
        client,
        forward,
        estimate,
        key_md5,
        counters,
        report,
        sent_ms,
        model,
        lease,
    } = pending;
    if let Some(fetch) = lease {
        let answer = webdis::parse_lease_reply(status, body)
            .map_err(|e| webdis::timed_out(e, now_ms.saturating_sub(sent_ms), call.timeout_ms));
        let step = on_lease_answer(config, fetch, forward, estimate, answer, now_ms, store);
        return Step { model, ..step };
    }
    if report {
        let answer = webdis::parse_read_reply(
            status,
            body,
            report_keys(config, client, &key_md5, sent_ms).len(),
        )
        .map_err(|e| webdis::timed_out(e, now_ms.saturating_sub(sent_ms), call.timeout_ms));
        return match answer {
            Ok(values) => {
                let mut v = values.into_iter();
                let minute = (v.next().unwrap_or(0), v.next().unwrap_or(0));
                let windows = budget_windows(config, client, sent_ms);
                let slots = windows
                    .iter()
                    .map(|&(period, window)| limiter::Slot {
                        period,
                        window,
                        used: [
                            v.next().unwrap_or(0),
                            v.next().unwrap_or(0),
                            v.next().unwrap_or(0),
                        ],
                    })
                    .collect::<Vec<_>>();
                budgets_step(config, client, now_ms, minute, &slots)
            }
            Err(e) => Step {
                limiter_errors: vec![LimiterFailure {
                    backend: "redis",
                    reason: e.reason(),
                }],
                ..reply(Some(client), Outcome::Error, openai::limiter_unavailable())
            },
        };
    }
    let on_error = match &config.limiter {
        LimiterBackend::Redis(r) => r.on_error,
        LimiterBackend::Local => OnError::Local,
    };
    if let Some(counters) = counters {
        let step = on_counters_reply(
            config, client, forward, estimate, &key_md5, counters, &call, status, body, sent_ms,
            now_ms, store, on_error,
        );
        return Step { model, ..step };
    }
    let reply_or_error = webdis::parse_reply(status, body)
        .map_err(|e| webdis::timed_out(e, now_ms.saturating_sub(sent_ms), call.timeout_ms));
    let limit = requests_per_minute(config, client);
    // The script counted in the window of the moment the check was sent (its keys named the
    // minute), so the reset is that window's end, even when the reply comes after it.
    let (minute, reset_at_send) = limiter::window_of(sent_ms);
    let reset_ms = reset_at_send.saturating_sub(now_ms.saturating_sub(sent_ms));
    let step = match reply_or_error {
        Ok(count) => {
            let window = Window {
                limit,
                remaining: limit.saturating_sub(count.count),
                reset_ms,
            };
            let tpm = tokens_per_minute(config, client);
            let token_state = |used: u64| Window {
                limit: tpm.unwrap_or(0),
                remaining: tpm.unwrap_or(0).saturating_sub(used),
                reset_ms,
            };
            match count.checked {
                Checked::Admitted => {
                    let mut forward = forward;
                    if let (Some(used), Some(_)) = (count.tokens, tpm) {
                        forward.tokens = Some(TokenReservation {
                            window: minute,
                            estimate,
                            state: token_state(used),
                            redis_key: Some(webdis::tokens_key(&key_md5, minute)),
                        });
                    }
                    forward_step(client, forward, Some(window), Vec::new())
                }
                Checked::RequestsLimited => {
                    limited_step(config, client, Over::Requests(window), Vec::new())
                }
                Checked::TokensLimited => {
                    let state = token_state(count.tokens.unwrap_or(0));
                    let over = Over::Tokens(state, estimate.total());
                    limited_step(config, client, over, Vec::new())
                }
            }
        }
        Err(e) => redis_failed(
            config,
            on_error,
            e.reason(),
            client,
            forward,
            estimate,
            now_ms,
            store,
        ),
    };
    Step { model, ..step }
}

/// A Redis reply (a check or a lease) that failed: `limiter.on_error` decides the request.
#[allow(clippy::too_many_arguments)]
fn redis_failed(
    config: &Config,
    on_error: OnError,
    reason: &'static str,
    client: ClientId,
    forward: Forward,
    estimate: Estimate,
    now_ms: u64,
    store: &dyn CasStore,
) -> Step {
    let failures = vec![LimiterFailure {
        backend: "redis",
        reason,
    }];
    match on_error {
        OnError::Allow => forward_step(client, forward, None, failures),
        OnError::Deny => Step {
            limiter_errors: failures,
            ..reply(Some(client), Outcome::Error, openai::limiter_unavailable())
        },
        OnError::Local => local_step(config, client, forward, estimate, now_ms, store, failures),
    }
}

/// Checks the request against the client's limits: a Redis callout, or the local limiter now.
fn limit(
    config: &Config,
    client: ClientId,
    key_md5: Option<String>,
    forward: Forward,
    estimate: Estimate,
    now_ms: u64,
    store: &dyn CasStore,
) -> Start {
    match (&config.limiter, key_md5) {
        (LimiterBackend::Redis(redis), Some(key_md5))
            if redis.leases.is_some()
                && config
                    .client(client)
                    .is_some_and(|c| c.budgets().is_empty()) =>
        {
            lease_limit(config, client, key_md5, forward, estimate, now_ms, store)
        }
        (LimiterBackend::Redis(redis), Some(key_md5)) => {
            let counters = redis_counters(config, client, &key_md5, &forward, estimate, now_ms);
            let call = match &counters {
                Some(list) => webdis_call(
                    &redis.webdis,
                    webdis::counters_command(
                        &list.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(),
                    ),
                ),
                None => redis_callout(
                    redis,
                    &key_md5,
                    requests_per_minute(config, client),
                    tokens_per_minute(config, client).map(|tpm| (tpm, estimate.total())),
                    now_ms,
                ),
            };
            Start::AskLimiter(Pending {
                call,
                client,
                forward,
                estimate,
                key_md5,
                counters,
                report: false,
                sent_ms: now_ms,
                model: None,
                lease: None,
            })
        }
        _ => Start::Done(local_step(
            config,
            client,
            forward,
            estimate,
            now_ms,
            store,
            Vec::new(),
        )),
    }
}

/// `GET` on this path: the authenticated client's own limits and budgets, answered by Tollgate
/// (not counted against them, never forwarded).
pub const BUDGETS_PATH: &str = "/v1/tollgate/budgets";

/// The current window of each of the client's budgets.
fn budget_windows(config: &Config, client: ClientId, now_ms: u64) -> Vec<(Period, u64)> {
    config.client(client).map_or_else(Vec::new, |c| {
        c.budgets()
            .iter()
            .map(|b| {
                (
                    b.period,
                    b.period.window(now_ms, config.budget_utc_offset_minutes).id,
                )
            })
            .collect()
    })
}

/// The Redis keys the budget endpoint reads: the minute's requests and tokens, then each
/// budget's requests, tokens and money.
fn report_keys(config: &Config, client: ClientId, key_md5: &str, now_ms: u64) -> Vec<String> {
    let (minute, _) = limiter::window_of(now_ms);
    let mut keys = vec![
        webdis::window_key(key_md5, minute),
        webdis::tokens_key(key_md5, minute),
    ];
    if let Some(c) = config.client(client) {
        for (period, window) in budget_windows(config, client, now_ms) {
            for m in Measure::ALL {
                keys.push(webdis::budget_key(&c.name, period, window, m));
            }
        }
    }
    keys
}

/// The budget endpoint: read the counters (the local record now, or Redis by a callout).
fn budgets_report(
    config: &Config,
    client: ClientId,
    key_md5: Option<String>,
    now_ms: u64,
    store: &dyn CasStore,
) -> Start {
    if let (LimiterBackend::Redis(redis), Some(key_md5)) = (&config.limiter, key_md5) {
        let call = webdis_call(
            &redis.webdis,
            webdis::read_command(&report_keys(config, client, &key_md5, now_ms)),
        );
        return Start::AskLimiter(Pending {
            call,
            client,
            forward: Forward::new(Vec::new(), false),
            estimate: Estimate::default(),
            key_md5,
            counters: None,
            report: true,
            sent_ms: now_ms,
            model: None,
            lease: None,
        });
    }
    let Some(c) = config.client(client) else {
        return Start::Done(reply(
            Some(client),
            Outcome::Error,
            openai::internal_error(),
        ));
    };
    let windows = budget_windows(config, client, now_ms);
    let (minute, _) = limiter::window_of(now_ms);
    match limiter::read_usage(store, &limiter::budget_key(c), minute, &windows) {
        Ok((counts, slots)) => Start::Done(budgets_step(config, client, now_ms, counts, &slots)),
        Err(e) => Start::Done(Step {
            limiter_errors: vec![LimiterFailure {
                backend: "local",
                reason: e.reason(),
            }],
            ..reply(Some(client), Outcome::Error, openai::limiter_unavailable())
        }),
    }
}

/// The budget endpoint's answer from the counts: the minute's limits, then every budget.
fn budgets_step(
    config: &Config,
    client: ClientId,
    now_ms: u64,
    (requests, tokens): (u64, u64),
    slots: &[limiter::Slot],
) -> Step {
    use serde_json::{json, Value};
    let Some(c) = config.client(client) else {
        return reply(Some(client), Outcome::Error, openai::internal_error());
    };
    let measure = |limit: Option<u64>, used: u64| {
        json!({
            "limit": limit,
            "used": used,
            "remaining": limit.map(|l| l.saturating_sub(used)),
        })
    };
    let window = |w: crate::spend::Window| {
        json!({
            "window_start": w.start_ms / 1000,
            "resets_at": w.end_ms / 1000,
            "reset_ms": w.reset_ms(now_ms),
        })
    };
    let offset = config.budget_utc_offset_minutes;
    let mut per_minute = window(Period::Minute.window(now_ms, 0));
    if let Value::Object(m) = &mut per_minute {
        m.insert(
            "requests".into(),
            measure(Some(u64::from(c.requests_per_minute)), requests),
        );
        m.insert(
            "tokens".into(),
            measure(c.tokens_per_minute.map(u64::from), tokens),
        );
    }
    let budgets: Vec<Value> = c
        .budgets()
        .iter()
        .zip(slots)
        .map(|(b, slot)| {
            let mut v = window(b.period.window(now_ms, offset));
            if let Value::Object(m) = &mut v {
                m.insert("window".into(), json!(b.period.as_str()));
                for mm in Measure::ALL {
                    m.insert(mm.as_str().into(), measure(b.limit(mm), slot.used(mm)));
                }
            }
            v
        })
        .collect();
    let body = json!({
        "object": "tollgate.budgets",
        "client": c.name,
        "limiter": config.limiter.name(),
        "currency": config.prices.currency,
        "money_unit": "micros",
        "utc_offset_minutes": offset,
        "per_minute": per_minute,
        "budgets": budgets,
    });
    reply(
        Some(client),
        Outcome::Admitted,
        openai::json_ok(body.to_string()),
    )
}

/// The client's budgets as this request asks them (each period's current window, its limits,
/// and the costs: one request, the token estimate, the money estimate at the billed model's
/// price), and the reservation they make if admitted. `None` without budgets.
fn budget_asks(
    config: &Config,
    client: ClientId,
    forward: &Forward,
    estimate: Estimate,
    now_ms: u64,
) -> (Vec<BudgetAsk>, Option<BudgetReservation>) {
    let Some(c) = config.client(client).filter(|c| !c.budgets().is_empty()) else {
        return (Vec::new(), None);
    };
    let money = forward
        .price
        .and_then(|p| config.prices.get(p))
        .map_or(0, |p| p.estimate(estimate.prompt, estimate.completion));
    let tokens = estimate.total();
    let asks: Vec<BudgetAsk> = c
        .budgets()
        .iter()
        .map(|b| {
            let w = b.period.window(now_ms, config.budget_utc_offset_minutes);
            BudgetAsk {
                period: b.period,
                window: w.id,
                reset_ms: w.reset_ms(now_ms),
                limits: b.limits,
                costs: [1, tokens, money],
            }
        })
        .collect();
    let reservation = BudgetReservation {
        windows: asks.iter().map(|a| (a.period, a.window)).collect(),
        estimate,
        money,
        redis: false,
    };
    (asks, Some(reservation))
}

/// What one counter of a Redis budget check counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// The minute's requests (`rate:` key).
    Requests,
    /// The minute's tokens (`tokens:` key).
    Tokens,
    /// A budget's measure; its reset in ms from the check.
    Budget(Period, Measure, u64),
}

/// The counters of a Redis check for a client with budgets (the budgets' longest window
/// first, then the minute's tokens and requests), or `None` without budgets (the minute's
/// own script is used).
fn redis_counters(
    config: &Config,
    client: ClientId,
    key_md5: &str,
    forward: &Forward,
    estimate: Estimate,
    now_ms: u64,
) -> Option<Vec<(webdis::Counter, Counted)>> {
    let c = config.client(client)?;
    let (asks, _) = budget_asks(config, client, forward, estimate, now_ms);
    if asks.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(asks.len() * 3 + 2);
    for a in asks.iter().rev() {
        let w = a.period.window(now_ms, config.budget_utc_offset_minutes);
        // Kept one more window after their own (read by `tollgate spend` and the budget
        // endpoint of a late request), then gone.
        let ttl_ms = a.reset_ms + (w.end_ms - w.start_ms);
        for m in Measure::ALL {
            out.push((
                webdis::Counter {
                    key: webdis::budget_key(&c.name, a.period, a.window, m),
                    limit: a.limits.get(m.index()).copied().flatten(),
                    cost: a.costs.get(m.index()).copied().unwrap_or(0),
                    ttl_ms,
                },
                Counted::Budget(a.period, m, a.reset_ms),
            ));
        }
    }
    let (minute, reset_ms) = limiter::window_of(now_ms);
    if let Some(tpm) = c.tokens_per_minute {
        out.push((
            webdis::Counter {
                key: webdis::tokens_key(key_md5, minute),
                limit: Some(u64::from(tpm)),
                cost: estimate.total(),
                ttl_ms: reset_ms + WINDOW_MS,
            },
            Counted::Tokens,
        ));
    }
    out.push((
        webdis::Counter {
            key: webdis::window_key(key_md5, minute),
            limit: Some(u64::from(c.requests_per_minute)),
            cost: 1,
            ttl_ms: reset_ms + WINDOW_MS,
        },
        Counted::Requests,
    ));
    Some(out)
}

/// Decides a request whose budgets were checked in Redis ([`webdis::COUNTERS_SCRIPT`]).
#[allow(clippy::too_many_arguments)]
fn on_counters_reply(
    config: &Config,
    client: ClientId,
    mut forward: Forward,
    estimate: Estimate,
    key_md5: &str,
    counters: Vec<(webdis::Counter, Counted)>,
    call: &Callout,
    status: Option<u16>,
    body: &[u8],
    sent_ms: u64,
    now_ms: u64,
    store: &dyn CasStore,
    on_error: OnError,
) -> Step {
    let elapsed = now_ms.saturating_sub(sent_ms);
    let (minute, reset_at_send) = limiter::window_of(sent_ms);
    let reset_ms = reset_at_send.saturating_sub(elapsed);
    let answer = webdis::parse_counters_reply(status, body, counters.len())
        .map_err(|e| webdis::timed_out(e, elapsed, call.timeout_ms));
    match answer {
        Ok(webdis::Counted::Admitted(values)) => {
            let mut window = None;
            for ((counter, what), used) in counters.iter().zip(values) {
                let limit = counter.limit.unwrap_or(0);
                let state = Window {
                    limit,
                    remaining: limit.saturating_sub(used),
                    reset_ms,
                };
                match what {
                    Counted::Requests => window = Some(state),
                    Counted::Tokens => {
                        forward.tokens = Some(TokenReservation {
                            window: minute,
                            estimate,
                            state,
                            redis_key: Some(webdis::tokens_key(key_md5, minute)),
                        })
                    }
                    Counted::Budget(..) => {}
                }
            }
            let (_, reservation) = budget_asks(config, client, &forward, estimate, sent_ms);
            forward.budgets = reservation.map(|r| BudgetReservation { redis: true, ..r });
            forward_step(client, forward, window, Vec::new())
        }
        Ok(webdis::Counted::Refused(i, used)) => {
            let Some((counter, what)) = counters.get(i) else {
                return reply(Some(client), Outcome::Error, openai::internal_error());
            };
            let limit = counter.limit.unwrap_or(0);
            let state = |reset_ms| Window {
                limit,
                remaining: limit.saturating_sub(used),
                reset_ms,
            };
            let over = match *what {
                Counted::Requests => Over::Requests(state(reset_ms)),
                Counted::Tokens => Over::Tokens(state(reset_ms), estimate.total()),
                Counted::Budget(period, measure, reset) => Over::Budget(Exceeded {
                    period,
                    measure,
                    window: state(reset.saturating_sub(elapsed).max(1)),
                    asked: counter.cost,
                }),
            };
            limited_step(config, client, over, Vec::new())
        }
        Err(e) => redis_failed(
            config,
            on_error,
            e.reason(),
            client,
            forward,
            estimate,
            now_ms,
            store,
        ),
    }
}

/// The Redis limiter with leases ([`lease`]): admit from this process's lease (no Redis call),
/// refuse while Redis recently said the window is spent, or fetch a block while the request
/// waits. A failing lease record falls back to one Redis check for this request.
fn lease_limit(
    config: &Config,
    client: ClientId,
    key_md5: String,
    mut forward: Forward,
    estimate: Estimate,
    now_ms: u64,
    store: &dyn CasStore,
) -> Start {
    let (LimiterBackend::Redis(redis), Some(c)) = (&config.limiter, config.client(client)) else {
        return Start::Done(forward_step(client, forward, None, Vec::new()));
    };
    let Some(policy) = &redis.leases else {
        return Start::Done(forward_step(client, forward, None, Vec::new()));
    };
    let ask = lease::Ask {
        limit: u64::from(c.requests_per_minute),
        tokens: c
            .tokens_per_minute
            .map(|t| (u64::from(t), estimate.total())),
    };
    let minute = limiter::window_of(now_ms).0;
    let fetch = |want| lease::Fetch {
        client,
        key_md5: key_md5.clone(),
        ask,
        want,
    };
    let (call, lease) = match lease::admit(store, &lease::lease_key(c), ask, now_ms, policy) {
        Ok(lease::Admit::Admitted {
            requests,
            tokens,
            prefetch,
        }) => {
            forward.tokens = tokens.map(|state| TokenReservation {
                window: minute,
                estimate,
                state,
                redis_key: Some(webdis::tokens_key(&key_md5, minute)),
            });
            let step = forward_step(client, forward, Some(requests), Vec::new());
            return Start::Done(Step {
                prefetch: prefetch.map(fetch),
                ..step
            });
        }
        Ok(lease::Admit::Limited { tokens, window }) => {
            let over = if tokens {
                Over::Tokens(window, estimate.total())
            } else {
                Over::Requests(window)
            };
            return Start::Done(limited_step(config, client, over, Vec::new()));
        }
        Ok(lease::Admit::Fetch(want)) => (
            webdis_call(
                &redis.webdis,
                lease::command(&key_md5, &ask, &want, now_ms, policy),
            ),
            Some(fetch(want)),
        ),
        // Without its lease record the request gets one Redis check of its own.
        Err(e) => {
            log::warn!(
                "lease record failed ({}); one Redis check for this request",
                e.reason()
            );
            (
                redis_callout(redis, &key_md5, ask.limit, ask.tokens, now_ms),
                None,
            )
        }
    };
    Start::AskLimiter(Pending {
        call,
        client,
        forward,
        estimate,
        key_md5,
        counters: None,
        report: false,
        sent_ms: now_ms,
        model: None,
        lease,
    })
}

/// Decides a request that waited for a lease: admitted from the new block, refused when the
/// window is spent, or (no answer) handled by `on_error`.
fn on_lease_answer(
    config: &Config,
    fetch: lease::Fetch,
    mut forward: Forward,
    estimate: Estimate,
    answer: Result<webdis::Leased, webdis::ReplyError>,
    now_ms: u64,
    store: &dyn CasStore,
) -> Step {
    let client = fetch.client;
    let (LimiterBackend::Redis(redis), Some(c)) = (&config.limiter, config.client(client)) else {
        return reply(Some(client), Outcome::Error, openai::internal_error());
    };
    let Some(policy) = &redis.leases else {
        return reply(Some(client), Outcome::Error, openai::internal_error());
    };
    let leased = match answer {
        Ok(leased) => leased,
        Err(e) => {
            return redis_failed(
                config,
                redis.on_error,
                e.reason(),
                client,
                forward,
                estimate,
                now_ms,
                store,
            );
        }
    };
    let key = lease::lease_key(c);
    let granted = lease::on_grant(store, &key, fetch.ask, &fetch.want, &leased, now_ms, policy);
    let step = match granted {
        // The block is Redis's answer: a failing record only loses the rest of the block
        // (under-admission), and the waiting request was granted.
        Ok(lease::Granted::Admitted { requests, tokens }) => {
            let minute = fetch.want.window;
            forward.tokens = tokens.map(|state| TokenReservation {
                window: minute,
                estimate,
                state,
                redis_key: Some(webdis::tokens_key(&fetch.key_md5, minute)),
            });
            forward_step(client, forward, Some(requests), Vec::new())
        }
        Ok(lease::Granted::Limited { tokens, window }) => {
            let over = if tokens {
                Over::Tokens(window, estimate.total())
            } else {
                Over::Requests(window)
            };
            limited_step(config, client, over, Vec::new())
        }
        Err(e) => match leased.spent {
            None => forward_step(
                client,
                forward,
                None,
                vec![LimiterFailure {
                    backend: "local",
                    reason: e.reason(),
                }],
            ),
            Some(_) => {
                let window = Window {
                    limit: fetch.ask.limit,
                    remaining: 0,
                    reset_ms: limiter::window_of(now_ms).1,
                };
                limited_step(config, client, Over::Requests(window), Vec::new())
            }
        },
    };
    // Redis counted the block whether or not the record kept it.
    Step {
        lease_granted: leased.granted(),
        ..step
    }
}

/// Decides a request whose lease fetch was not sent: the worker's circuit breaker is open, so
/// `on_error` applies at once instead of after `timeout_ms`.
pub fn on_lease_short_circuit(
    config: &Config,
    pending: Pending,
    now_ms: u64,
    store: &dyn CasStore,
) -> Step {
    let Pending {
        client,
        forward,
        estimate,
        model,
        lease,
        ..
    } = pending;
    let Some(fetch) = lease else {
        return reply(Some(client), Outcome::Error, openai::internal_error());
    };
    let answer = Err(webdis::ReplyError::CircuitOpen);
    let step = on_lease_answer(config, fetch, forward, estimate, answer, now_ms, store);
    Step { model, ..step }
}

fn header<'a>(headers: &'a [Header], name: &[u8]) -> Option<&'a [u8]> {
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The request's `content-length`, if it has a valid one.
fn declared_length(headers: &[Header]) -> Option<usize> {
    header(headers, b"content-length")
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
}

fn reply(client: Option<ClientId>, outcome: Outcome, r: LocalReply) -> Step {
    Step {
        decision: Decision::Reply(r),
        client,
        outcome,
        limiter_errors: Vec::new(),
        key_error: None,
        model: None,
        prefetch: None,
        lease_granted: (0, 0),
    }
}

fn requests_per_minute(config: &Config, client: ClientId) -> u64 {
    config
        .client(client)
        .map_or(1, |c| u64::from(c.requests_per_minute))
}

fn tokens_per_minute(config: &Config, client: ClientId) -> Option<u64> {
    config
        .client(client)
        .and_then(|c| c.tokens_per_minute)
        .map(u64::from)
}

fn redis_callout(
    redis: &RedisLimiter,
    key_md5: &str,
    limit: u64,
    tokens: Option<(u64, u64)>,
    now_ms: u64,
) -> Callout {
    let (minute, reset_ms) = limiter::window_of(now_ms);
    let key = webdis::window_key(key_md5, minute);
    let tokens_key = webdis::tokens_key(key_md5, minute);
    let tokens = tokens.map(|(limit, cost)| webdis::TokenCheck {
        key: &tokens_key,
        limit,
        cost,
    });
    // The keys live through their window and one more, so they outlast clock skew between
    // replicas and then free themselves.
    webdis_call(
        &redis.webdis,
        webdis::check_command(&key, limit, reset_ms + WINDOW_MS, tokens),
    )
}

/// A call to Webdis: `POST /` with the command in the body, and Webdis's basic auth when
/// configured.
pub fn webdis_call(webdis: &Webdis, body: Vec<u8>) -> Callout {
    let mut headers = vec![
        (":method", "POST".to_string()),
        (":path", "/".to_string()),
        (":authority", webdis.authority.clone()),
        ("content-type", "text/plain".to_string()),
    ];
    if let Some(auth) = &webdis.authorization {
        headers.push(("authorization", auth.clone()));
    }
    Callout {
        cluster: webdis.cluster.clone(),
        headers,
        body,
        timeout_ms: webdis.timeout_ms,
    }
}

/// A request's token estimate: its body at about four bytes a token (JSON syntax and
/// non-English text make this an overestimate as often as not), plus the completion it may
/// produce (`max_completion_tokens` / `max_tokens`; 0 when unset, settled after the response).
pub fn estimate_tokens(body_len: usize, max_tokens: Option<u64>) -> Estimate {
    Estimate {
        prompt: (body_len as u64).div_ceil(4),
        completion: max_tokens.unwrap_or(0),
    }
}

/// Checks the local (shared-data) limiter: both budgets in one record, one compare-and-swap
/// (a refusal writes nothing). Its own failures admit the request (fail open).
fn local_step(
    config: &Config,
    client: ClientId,
    mut forward: Forward,
    estimate: Estimate,
    now_ms: u64,
    store: &dyn CasStore,
    mut failures: Vec<LimiterFailure>,
) -> Step {
    let Some(c) = config.client(client) else {
        return forward_step(client, forward, None, failures);
    };
    let (asks, reservation) = budget_asks(config, client, &forward, estimate, now_ms);
    let ask = limiter::Ask {
        requests: Some(u64::from(c.requests_per_minute)),
        tokens: c
            .tokens_per_minute
            .map(|tpm| (u64::from(tpm), estimate.total())),
        budgets: &asks,
    };
    match limiter::check_budget(store, &limiter::budget_key(c), ask, now_ms) {
        Ok(Budget::Admitted { requests, tokens }) => {
            forward.tokens = tokens.map(|state| TokenReservation {
                window: limiter::window_of(now_ms).0,
                estimate,
                state,
                redis_key: None,
            });
            forward.budgets = reservation;
            forward_step(client, forward, requests, failures)
        }
        Ok(Budget::OverBudget(e)) => limited_step(config, client, Over::Budget(e), failures),
        Ok(Budget::OverTokens(w)) => {
            limited_step(config, client, Over::Tokens(w, estimate.total()), failures)
        }
        Ok(Budget::OverRequests(w)) => limited_step(config, client, Over::Requests(w), failures),
        // Fail open: a contended or failing local store must not turn away paying clients.
        // The error is counted, and at most one extra request per failure gets through.
        Err(e) => {
            failures.push(LimiterFailure {
                backend: "local",
                reason: e.reason(),
            });
            forward_step(client, forward, None, failures)
        }
    }
}

/// What a finished response delivered, for charging its tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Prompt + completion tokens the provider reported.
    pub usage: Option<u64>,
    /// For a stream: the content chunks that reached the filter (data events other than the
    /// usage chunk and `[DONE]`).
    pub stream_chunks: Option<u64>,
    /// The response status was 2xx.
    pub succeeded: bool,
}

/// Tokens to charge for a finished request that reserved `estimate`:
/// - the usage the provider reported, when it did;
/// - nothing for a failed response (non-2xx) that reported none;
/// - for a stream that reported none (cut off, or a provider that ignores
///   `stream_options.include_usage`): what was delivered, the prompt estimate plus one token per
///   content chunk (OpenAI-compatible streams send about one token per chunk);
/// - otherwise the estimate (the tokens were likely spent, and unknown is not zero).
pub fn charge(estimate: Estimate, delivered: Delivered) -> u64 {
    match delivered {
        Delivered { usage: Some(n), .. } => n,
        Delivered {
            succeeded: false, ..
        } => 0,
        Delivered {
            stream_chunks: Some(chunks),
            ..
        } => estimate.prompt.saturating_add(chunks),
        _ => estimate.total(),
    }
}

/// Money to charge for a finished request, by the same rules as [`charge`]: the reported
/// usage at its price; nothing for a failed response without usage; for a stream without usage,
/// the prompt estimate plus one output token per content chunk; otherwise the estimate.
pub fn charge_money(
    price: &Price,
    estimate: Estimate,
    used: Option<&Usage>,
    delivered: Delivered,
) -> u64 {
    match (used, delivered) {
        (Some(u), _) => price.cost(u),
        (
            None,
            Delivered {
                succeeded: false, ..
            },
        ) => 0,
        (
            None,
            Delivered {
                stream_chunks: Some(chunks),
                ..
            },
        ) => price.estimate(estimate.prompt, chunks),
        (None, _) => price.estimate(estimate.prompt, estimate.completion),
    }
}

/// The Redis spend record of a priced response (`tollgate spend` reads them): its key for the
/// day of `started_ms` and the micro-units to add; `None` with the local limiter or at no cost.
pub fn spend_record(
    config: &Config,
    client: ClientId,
    price: PriceId,
    micros: u64,
    started_ms: u64,
) -> Option<(String, i64)> {
    if micros == 0 || !matches!(config.limiter, LimiterBackend::Redis(_)) {
        return None;
    }
    let day = Period::Day
        .window(started_ms, config.budget_utc_offset_minutes)
        .id;
    let name = &config.client(client)?.name;
    let model = &config.prices.get(price)?.model;
    Some((
        webdis::spend_key(day, name, model),
        i64::try_from(micros).unwrap_or(i64::MAX),
    ))
}

/// What a finished request's settlement changes in its client's local limit record: the
/// minute's token count (window, delta) and each budget window it held (token and money
/// deltas). Requests with the same client and windows add up, so a worker applies many in one
/// compare-and-swap ([`apply_local`], batched by `crate::batch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettlement {
    /// The client whose record changes.
    pub client: ClientId,
    /// The minute window the tokens were reserved in, and the tokens to add (negative: give
    /// back).
    pub minute: Option<(u64, i64)>,
    /// The budget windows the request held (those still current are adjusted).
    pub budgets: Vec<(Period, u64)>,
    /// Tokens to add to each budget window.
    pub tokens_delta: i64,
    /// Money (micro-units) to add to each budget window.
    pub money_delta: i64,
}

impl LocalSettlement {
    /// Adds another request's settlement of the same client and windows; `false` (nothing
    /// added) when they differ.
    pub fn merge(&mut self, other: &LocalSettlement) -> bool {
        let same_minute = self.minute.map(|(w, _)| w) == other.minute.map(|(w, _)| w);
        if self.client != other.client || !same_minute || self.budgets != other.budgets {
            return false;
        }
        if let (Some((_, d)), Some((_, e))) = (&mut self.minute, other.minute) {
            *d = d.saturating_add(e);
        }
        self.tokens_delta = self.tokens_delta.saturating_add(other.tokens_delta);
        self.money_delta = self.money_delta.saturating_add(other.money_delta);
        true
    }
}

/// What settling everything a finished request reserved changes, once: its minute tokens and
/// its budgets (tokens by [`charge`], money by `money` from [`charge_money`]). Redis
/// reservations come back as `(key, amount to add)` for the worker's next batch, local ones as
/// one [`LocalSettlement`] (`None` when nothing changes). Nothing is written here.
pub fn settlement(
    config: &Config,
    client: ClientId,
    tokens: Option<&TokenReservation>,
    budgets: Option<&BudgetReservation>,
    delivered: Delivered,
    money: u64,
) -> (Vec<(String, i64)>, Option<LocalSettlement>) {
    let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    let mut minute = None;
    if let Some(t) = tokens {
        let delta =
            to_i64(charge(t.estimate, delivered)).saturating_sub(to_i64(t.estimate.total()));
        match &t.redis_key {
            Some(key) if delta != 0 => out.push((key.clone(), delta)),
            Some(_) => {}
            None => minute = Some((t.window, delta)),
        }
    }
    let mut local_budgets: &[(Period, u64)] = &[];
    let (mut tokens_delta, mut money_delta) = (0, 0);
    if let Some(b) = budgets {
        tokens_delta =
            to_i64(charge(b.estimate, delivered)).saturating_sub(to_i64(b.estimate.total()));
        money_delta = to_i64(money).saturating_sub(to_i64(b.money));
        if b.redis {
            if let Some(c) = config.client(client) {
                for &(period, window) in &b.windows {
                    for (m, d) in [
                        (Measure::Tokens, tokens_delta),
                        (Measure::Money, money_delta),
                    ] {
                        if d != 0 {
                            out.push((webdis::budget_key(&c.name, period, window, m), d));
                        }
                    }
                }
            }
        } else {
            local_budgets = &b.windows;
        }
    }
    let minute = minute.filter(|(_, d)| *d != 0);
    let budgets_change = !local_budgets.is_empty() && (tokens_delta != 0 || money_delta != 0);
    let local = (minute.is_some() || budgets_change).then(|| LocalSettlement {
        client,
        minute,
        budgets: if budgets_change {
            local_budgets.to_vec()
        } else {
            Vec::new()
        },
        tokens_delta,
        money_delta,
    });
    (out, local)
}

/// Applies a local settlement (one request's or many merged) to its client's record, in one
/// compare-and-swap.
pub fn apply_local(
    config: &Config,
    settlement: &LocalSettlement,
    store: &dyn CasStore,
) -> Result<(), LimiterError> {
    let Some(c) = config.client(settlement.client) else {
        return Ok(());
    };
    limiter::adjust_all(
        store,
        &limiter::budget_key(c),
        settlement.minute,
        &settlement.budgets,
        settlement.tokens_delta,
        settlement.money_delta,
    )
}

fn forward_step(
    client: ClientId,
    mut forward: Forward,
    window: Option<Window>,
    limiter_errors: Vec<LimiterFailure>,
) -> Step {
    forward.window = window;
    Step {
        decision: Decision::Forward(forward),
        client: Some(client),
        outcome: Outcome::Admitted,
        limiter_errors,
        key_error: None,
        model: None,
        prefetch: None,
        lease_granted: (0, 0),
    }
}

/// Which budget refused a request.
enum Over {
    /// Requests per minute, with the client's window.
    Requests(Window),
    /// Tokens per minute, with the client's token window and the tokens the request asked for.
    Tokens(Window, u64),
    /// A budget over a longer window.
    Budget(Exceeded),
}

fn limited_step(
    config: &Config,
    client: ClientId,
    over: Over,
    limiter_errors: Vec<LimiterFailure>,
) -> Step {
    let name = config.client(client).map_or("", |c| c.name.as_str());
    let answer = match over {
        Over::Requests(w) => openai::requests_rate_limited(name, w.limit, w.reset_ms),
        Over::Tokens(w, asked) => {
            openai::tokens_rate_limited(name, w.limit, w.remaining, asked, w.reset_ms)
        }
        Over::Budget(e) => openai::budget_exceeded(
            name,
            e.period.as_str(),
            e.measure,
            e.window.limit,
            e.window.remaining,
            e.asked,
            e.window.reset_ms,
            &config.prices.currency,
        ),
    };
    Step {
        limiter_errors,
        ..reply(Some(client), Outcome::RateLimited, answer)
    }
}

/// What Tollgate reads from a response's headers (one read of the whole map).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseHead {
    /// `:status`, when it is a number.
    pub status: Option<u16>,
    /// `content-type`, raw.
    pub content_type: Vec<u8>,
    /// A `content-encoding` other than `identity` is set.
    pub encoded: bool,
    /// Envoy's attempt count (`x-envoy-attempt-count`, with the virtual host's
    /// `include_attempt_count_in_response`).
    pub attempts: Option<usize>,
}

impl ResponseHead {
    /// Reads the fields from a response header map.
    pub fn read(headers: &[Header]) -> Self {
        let status = header(headers, b":status")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
        let content_type = header(headers, b"content-type")
            .unwrap_or_default()
            .to_vec();
        let encoded = header(headers, b"content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case(b"identity"));
        let attempts = header(headers, crate::upstream::ATTEMPT_HEADER)
            .and_then(crate::upstream::attempt_count);
        Self {
            status,
            content_type,
            encoded,
            attempts,
        }
    }

    /// 2xx.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// A Server-Sent Events stream.
    pub fn is_sse(&self) -> bool {
        self.content_type.starts_with(b"text/event-stream")
    }

    /// A JSON body.
    pub fn is_json(&self) -> bool {
        self.content_type.windows(4).any(|w| w == b"json")
    }
}

/// The API a request's path belongs to (see [`endpoints::api_of_path`]): it decides the shape
/// of Tollgate's answers and budget headers, and how the response's usage is read.
pub fn api_of(headers: &[Header]) -> Api {
    let full_path = header(headers, b":path").unwrap_or_default();
    let path = full_path.split(|&b| b == b'?').next().unwrap_or_default();
    endpoints::api_of_path(path)
}

/// The client's budget headers in its API's names: `x-ratelimit-*` for OpenAI's,
/// `anthropic-ratelimit-*` for Anthropic's (whose resets are times: the window's reset counted
/// from `admitted_ms`, when the window was read). They replace the provider's own, which
/// describe the shared provider key, not this client: the request budget, then the token budget
/// after this request's reservation.
pub fn budget_headers(
    api: Api,
    window: Option<&Window>,
    tokens: Option<&TokenReservation>,
    admitted_ms: u64,
) -> Vec<(&'static str, String)> {
    match api {
        Api::OpenAi => {
            // Room for the cache header the exchange may add.
            let mut set = Vec::with_capacity(7);
            if let Some(w) = window {
                let names = &openai::REQUEST_HEADERS;
                openai::push_rate_limit_headers(&mut set, names, w.limit, w.remaining, w.reset_ms);
            }
            if let Some(t) = tokens {
                let s = &t.state;
                let names = &openai::TOKEN_HEADERS;
                openai::push_rate_limit_headers(&mut set, names, s.limit, s.remaining, s.reset_ms);
            }
            set
        }
        Api::Anthropic => {
            let budget = |w: &Window| anthropic::Budget {
                limit: w.limit,
                remaining: w.remaining,
                reset_ms: w.reset_ms,
            };
            anthropic::budget_headers(
                window.map(budget),
                tokens.map(|t| budget(&t.state)),
                admitted_ms,
            )
        }
    }
}

/// The header edits of a forwarded response: the provider's account headers go (see
/// [`forwarding::RESPONSE_STRIPPED`]), the client's own budget replaces the provider's.
pub fn response_edits(
    api: Api,
    headers: &[Header],
    window: Option<&Window>,
    tokens: Option<&TokenReservation>,
    admitted_ms: u64,
) -> (Vec<&'static str>, Vec<(&'static str, String)>) {
    let set = budget_headers(api, window, tokens, admitted_ms);
    let replaced: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
    (forwarding::response_strip_list(headers, &replaced), set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Digest, DigestKind};
    use crate::limiter::tests::FakeStore;

    const NOW: u64 = 1_700_000_000_000;

    /// Settles one token reservation as the exchange does ([`settlement`], then
    /// [`apply_local`]): the Redis adjustment it returns, the local one applied to `store`.
    fn settle_tokens(
        config: &Config,
        client: ClientId,
        reservation: &TokenReservation,
        delivered: Delivered,
        store: &dyn CasStore,
    ) -> Result<Option<(String, i64)>, LimiterError> {
        let (redis, local) = settlement(config, client, Some(reservation), None, delivered, 0);
        if let Some(local) = local {
            apply_local(config, &local, store)?;
        }
        Ok(redis.into_iter().next())
    }

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

    fn h<'a>(pairs: &[(&'a str, &'a [u8])]) -> Vec<Header<'a>> {
        pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect()
    }

    /// A chat completion's pseudo-headers and length, where the test did not set its own.
    fn chat(mut headers: Vec<Header<'_>>) -> Vec<Header<'_>> {
        for (name, value) in [
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-length", "2"),
        ] {
            if !headers.iter().any(|(n, _)| *n == name.as_bytes()) {
                headers.push((name.as_bytes(), value.as_bytes()));
            }
        }
        headers
    }

    fn done_on(c: &Config, h: &[Header], now: u64, s: &dyn CasStore) -> Step {
        done(on_request_headers(
            c,
            &chat(h.to_vec()),
            None,
            false,
            now,
            s,
        ))
    }

    fn done(start: Start) -> Step {
        match start {
            Start::Done(step) => step,
            other => panic!("expected a decision, got {other:?}"),
        }
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
        let step = done_on(
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
            strip_list(
                &c,
                &chat(h(&[
                    ("authorization", b"Bearer sk-team-a"),
                    ("x-tollgate-client", b"spoofed"),
                    ("X-Tollgate-Route", b"spoofed"),
                    ("x-api-key", b"sk-team-a"),
                ]))
            ),
            vec![
                b"authorization".to_vec(),
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
        let step = done_on(
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
            let step = done_on(&c, &headers, NOW, &FakeStore::default());
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
            assert_eq!(done_on(&c, &team, NOW, &s).outcome, Outcome::Admitted);
        }
        let step = done_on(&c, &team, NOW, &s);
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
        assert_eq!(done_on(&c, &legacy, NOW, &s).outcome, Outcome::Admitted);
    }

    #[test]
    fn limiter_failure_fails_open_and_is_reported() {
        let c = config(2);
        let s = FakeStore::default();
        s.fail_get.set(true);
        let step = done_on(&c, &h(&[("authorization", b"Bearer sk-team-a")]), NOW, &s);
        assert_eq!(step.outcome, Outcome::Admitted);
        assert_eq!(
            step.limiter_errors,
            vec![LimiterFailure {
                backend: "local",
                reason: "store"
            }]
        );
        assert_eq!(forward(&step).window, None);
    }

    fn redis_config(on_error: &str) -> Config {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}","requests_per_minute":5}}],
                "upstream":{{"api_key_env":"K"}},
                "limiter":{{"backend":"redis","cluster":"webdis","timeout_ms":40,"on_error":"{on_error}"}}}}"#
        );
        Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap()
    }

    fn ask(c: &Config) -> Pending {
        let headers = h(&[
            ("authorization", b"Bearer sk-team-a"),
            ("x-tollgate-x", b"1"),
        ]);
        match on_request_headers(c, &chat(headers), None, false, NOW, &FakeStore::default()) {
            Start::AskLimiter(p) => p,
            other => panic!("expected a limiter callout, got {other:?}"),
        }
    }

    #[test]
    fn redis_mode_asks_webdis_with_the_older_proxys_key() {
        let c = redis_config("local");
        let p = ask(&c);
        assert_eq!(p.call.cluster, "webdis");
        assert_eq!(p.call.timeout_ms, 40);
        assert_eq!(
            &p.call.headers[..3],
            &[
                (":method", "POST".to_string()),
                (":path", "/".to_string()),
                (":authority", "webdis".to_string()),
            ]
        );
        let body = String::from_utf8(p.call.body.clone()).unwrap();
        let md5 = Digest::of_key(DigestKind::Md5, b"sk-team-a").to_hex();
        let minute = NOW / 60_000;
        assert!(
            body.contains(&format!("/1/rate%3A{md5}%3A{minute}/5/")),
            "{body}"
        );
        assert!(!body.contains("sk-team-a"));
    }

    #[test]
    fn redis_answers_admit_or_limit() {
        let c = redis_config("deny");
        let step = on_limiter_reply(
            &c,
            ask(&c),
            Some(200),
            br#"{"EVAL":[1,2,100000]}"#,
            NOW,
            &FakeStore::default(),
        );
        assert_eq!(step.outcome, Outcome::Admitted);
        let f = forward(&step);
        assert_eq!(f.window.unwrap().remaining, 3);
        assert!(step.limiter_errors.is_empty());

        let step = on_limiter_reply(
            &c,
            ask(&c),
            Some(200),
            br#"{"EVAL":[0,5,100000]}"#,
            NOW,
            &FakeStore::default(),
        );
        assert_eq!(step.outcome, Outcome::RateLimited);
        assert!(matches!(step.decision, Decision::Reply(ref r) if r.status == 429));
    }

    #[test]
    fn a_redis_reply_after_its_window_ended_resets_with_that_window() {
        // NOW is 20 s into its minute: the window of the request ends 40 s later.
        let c = redis_config("deny");
        let reply = |at: u64, body: &[u8]| {
            on_limiter_reply(&c, ask(&c), Some(200), body, at, &FakeStore::default())
        };
        let step = reply(NOW + 1_000, br#"{"EVAL":[1,2,100000]}"#);
        assert_eq!(forward(&step).window.unwrap().reset_ms, 39_000);
        // Sent in one minute, answered in the next: the count and its reset are the old
        // window's (ended), not a fresh minute's; a refusal says retry at once.
        let step = reply(NOW + 45_000, br#"{"EVAL":[1,2,100000]}"#);
        assert_eq!(forward(&step).window.unwrap().reset_ms, 0);
        let step = reply(NOW + 45_000, br#"{"EVAL":[0,5,100000]}"#);
        let Decision::Reply(r) = &step.decision else {
            panic!("expected a 429")
        };
        assert!(
            r.headers.contains(&("retry-after", "1".to_string())),
            "{r:?}"
        );
    }

    #[test]
    fn redis_failures_follow_on_error() {
        let store = FakeStore::default();
        let err = br#"{"EVAL":[false,"ERR boom"]}"#;
        let redis_error = vec![LimiterFailure {
            backend: "redis",
            reason: "redis_error",
        }];

        let c = redis_config("allow");
        let step = on_limiter_reply(&c, ask(&c), Some(200), err, NOW, &store);
        assert_eq!(step.outcome, Outcome::Admitted);
        assert_eq!(forward(&step).window, None);
        assert_eq!(step.limiter_errors, redis_error);

        let c = redis_config("deny");
        let step = on_limiter_reply(&c, ask(&c), Some(200), err, NOW, &store);
        assert_eq!(step.outcome, Outcome::Error);
        assert!(matches!(step.decision, Decision::Reply(ref r) if r.status == 503));
        assert_eq!(step.limiter_errors, redis_error);

        // Local fallback: the shared-data budget applies while Redis is down.
        let c = redis_config("local");
        for i in 0..5 {
            let step = on_limiter_reply(&c, ask(&c), None, b"", NOW + 1, &store);
            assert_eq!(step.outcome, Outcome::Admitted, "request {i}");
            assert_eq!(forward(&step).window.unwrap().remaining, 4 - i);
            assert_eq!(step.limiter_errors[0].reason, "unavailable");
        }
        let step = on_limiter_reply(&c, ask(&c), Some(403), b"", NOW + 1, &store);
        assert_eq!(step.outcome, Outcome::RateLimited);
        assert_eq!(step.limiter_errors[0].reason, "forbidden");
    }

    #[test]
    fn a_failed_callout_after_the_timeout_is_a_timeout() {
        // timeout_ms is 40: a failure after half of it (Envoy's timer may fire early on the
        // wall clock) is a timeout, a quicker one a refusal or reset.
        let c = redis_config("allow");
        let reason = |at| {
            let step = on_limiter_reply(&c, ask(&c), None, b"", at, &FakeStore::default());
            step.limiter_errors[0].reason
        };
        assert_eq!(reason(NOW + 45), "timeout");
        assert_eq!(reason(NOW + 20), "timeout");
        assert_eq!(reason(NOW + 19), "unavailable");
        assert_eq!(reason(NOW + 1), "unavailable");
    }

    fn routed_config() -> Config {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}","requests_per_minute":5,"models":["gpt-*"]}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}}],
                "models":[{{"match":"gpt-4.1","providers":["p"]}},{{"match":"o1","providers":["p"]}}],
                "max_body_bytes":2048}}"#
        );
        Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap()
    }

    fn routed_start(c: &Config, method: &[u8], path: &[u8], len: Option<&[u8]>) -> Start {
        let mut headers = h(&[
            (":method", method),
            (":path", path),
            ("authorization", b"Bearer sk-team-a"),
        ]);
        if let Some(len) = len {
            headers.push((b"content-length", len));
        }
        on_request_headers(c, &headers, None, false, NOW, &FakeStore::default())
    }

    fn status(start: Start) -> u16 {
        match done(start).decision {
            Decision::Reply(r) => r.status,
            Decision::Forward(_) => 0,
        }
    }

    #[test]
    fn routed_requests_read_the_body_and_route_by_model() {
        let c = routed_config();
        let Start::ReadBody(wait) =
            routed_start(&c, b"POST", b"/v1/chat/completions?x=1", Some(b"100"))
        else {
            panic!("expected to read the body")
        };
        let step = done(on_request_body(
            &c,
            wait,
            br#"{"model":"gpt-4.1"}"#,
            NOW,
            &FakeStore::default(),
        ));
        let f = forward(&step);
        assert_eq!(f.set, vec![(ROUTE_HEADER, "r0".to_string())]);
        assert!(f.reroute);
        assert_eq!(f.window.unwrap().limit, 5);

        let body_status = |body: &[u8]| {
            let Start::ReadBody(wait) = routed_start(&c, b"POST", b"/v1/chat/completions", None)
            else {
                panic!()
            };
            status(on_request_body(&c, wait, body, NOW, &FakeStore::default()))
        };
        assert_eq!(
            body_status(br#"{"model":"o1"}"#),
            403,
            "not on the allow-list"
        );
        assert_eq!(body_status(br#"{"model":"gpt-5"}"#), 404, "no rule");
        assert_eq!(body_status(b"{"), 400);
        assert_eq!(body_status(br#"{"messages":[]}"#), 400);
        assert_eq!(body_status(&vec![b' '; 4096]), 413);

        assert_eq!(
            status(routed_start(
                &c,
                b"POST",
                b"/v1/chat/completions",
                Some(b"4096")
            )),
            413
        );
        assert_eq!(status(routed_start(&c, b"POST", b"/v1/files", None)), 404);
        let models = done(routed_start(&c, b"GET", b"/v1/models", None));
        match models.decision {
            Decision::Reply(r) => {
                assert_eq!(r.status, 200);
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(v["data"][0]["id"], "gpt-4.1");
                assert_eq!(v["data"].as_array().unwrap().len(), 1, "o1 is not allowed");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_granted_endpoints_pass_the_gate() {
        let c = routed_config();
        // The default table: the inference API; everything else is a 404, whatever the method.
        for (method, path) in [
            (b"GET".as_slice(), b"/v1/files".as_slice()),
            (b"DELETE", b"/v1/files/file-1"),
            (b"GET", b"/v1/chat/completions"),
            (b"PUT", b"/v1/chat/completions"),
            (b"POST", b"/v1/chat/completions/"),
            (b"POST", b"/v1/chat/completions;x"),
            (b"POST", b"/V1/chat/completions"),
            (b"POST", b"/v1/moderations"),
            (b"GET", b"/__mock/requests"),
        ] {
            assert_eq!(
                status(routed_start(&c, method, path, None)),
                404,
                "{path:?}"
            );
        }
        // A query string does not change which endpoint is matched.
        assert!(matches!(
            routed_start(&c, b"POST", b"/v1/embeddings?x=/v1/files", None),
            Start::ReadBody(_)
        ));
        // GET /v1/models/{id}: a model the client may use, else 404.
        let one = done(routed_start(&c, b"GET", b"/v1/models/gpt-4.1", None));
        match one.decision {
            Decision::Reply(r) => {
                assert_eq!(r.status, 200);
                assert!(r.body.contains("\"id\":\"gpt-4.1\""), "{}", r.body);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            status(routed_start(&c, b"GET", b"/v1/models/o1", None)),
            404
        );
    }

    #[test]
    fn account_endpoints_need_a_grant_and_go_to_the_default_provider() {
        let sha = |k: &[u8]| Digest::of_key(DigestKind::Sha256, k).to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"ops","key_sha256":"{}","endpoints":["files"]}},
                           {{"name":"dev","key_sha256":"{}"}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}}],
                "models":[{{"match":"m","providers":["p"]}}],
                "default_provider":"p"}}"#,
            sha(b"sk-ops"),
            sha(b"sk-dev")
        );
        let c = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
        let start = |key: &[u8], method: &[u8], path: &[u8]| {
            let mut bearer = b"Bearer ".to_vec();
            bearer.extend_from_slice(key);
            let headers = h(&[
                (":method", method),
                (":path", path),
                ("authorization", &bearer),
            ]);
            on_request_headers(&c, &headers, None, true, NOW, &FakeStore::default())
        };
        let step = done(start(b"sk-ops", b"DELETE", b"/v1/files/file-1"));
        let f = forward(&step);
        assert_eq!(f.set, vec![(ROUTE_HEADER, DEFAULT_ROUTE.to_string())]);
        assert!(f.tokens.is_none() && f.window.is_some());
        // Its own `endpoints` replace the default set: no chat completions for "ops".
        assert_eq!(
            status(start(b"sk-ops", b"POST", b"/v1/chat/completions")),
            404
        );
        assert_eq!(
            status(start(b"sk-dev", b"DELETE", b"/v1/files/file-1")),
            404
        );
        assert_eq!(status(start(b"sk-dev", b"GET", b"/v1/files")), 404);
    }

    fn messages_config() -> Config {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}","tokens_per_minute":1000,
                             "models":["claude-*","gpt-4.1"]}}],
                "providers":[{{"name":"claude","cluster":"c","api_key_env":"K","api":"anthropic"}},
                             {{"name":"oai","cluster":"o","api_key_env":"K"}}],
                "models":[{{"match":"claude-*","providers":["claude"]}},
                          {{"match":"gpt-4.1","providers":["oai"]}},
                          {{"match":"o1","providers":["oai"]}}]}}"#
        );
        Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap()
    }

    fn messages_step(c: &Config, path: &[u8], auth: (&str, &[u8]), body: &[u8]) -> Step {
        let store = FakeStore::default();
        let headers = h(&[(":method", b"POST"), (":path", path), auth]);
        match on_request_headers(c, &headers, None, false, NOW, &store) {
            Start::ReadBody(wait) => done(on_request_body(c, wait, body, NOW, &store)),
            other => done(other),
        }
    }

    #[test]
    fn messages_take_the_key_from_x_api_key_and_go_to_anthropic_providers() {
        let c = messages_config();
        let body = br#"{"model":"claude-sonnet-4","max_tokens":100,"stream":true,"messages":[]}"#;
        for auth in [
            ("x-api-key", b"sk-team-a".as_slice()),
            ("authorization", b"Bearer sk-team-a"),
        ] {
            let step = messages_step(&c, b"/v1/messages", auth, body);
            let f = forward(&step);
            assert_eq!(f.rule, Some(0));
            // Anthropic's streams report usage anyway: the body is not touched.
            assert_eq!((f.body.as_ref(), f.strip_usage_chunk), (None, false));
            assert_eq!(
                f.tokens.as_ref().unwrap().estimate,
                estimate_tokens(body.len(), Some(100))
            );
        }
        // x-api-key is no key on OpenAI's endpoints.
        let step = messages_step(
            &c,
            b"/v1/chat/completions",
            ("x-api-key", b"sk-team-a"),
            br#"{"model":"gpt-4.1"}"#,
        );
        assert_eq!(step.outcome, Outcome::Unauthorized);
        // A model served by an OpenAI provider is not found on /v1/messages, and the other way.
        let step = messages_step(
            &c,
            b"/v1/messages",
            ("x-api-key", b"sk-team-a"),
            br#"{"model":"gpt-4.1"}"#,
        );
        assert_eq!(status(Start::Done(step)), 404);
        let step = messages_step(
            &c,
            b"/v1/chat/completions",
            ("authorization", b"Bearer sk-team-a"),
            br#"{"model":"claude-x"}"#,
        );
        assert_eq!(status(Start::Done(step)), 404);
        // The allow-list holds on the new endpoint too.
        let step = messages_step(
            &c,
            b"/v1/messages",
            ("x-api-key", b"sk-team-a"),
            br#"{"model":"o1"}"#,
        );
        assert_eq!(status(Start::Done(step)), 403);
        // A token count is routed and counted as a request, but reserves no tokens.
        let step = messages_step(
            &c,
            b"/v1/messages/count_tokens",
            ("x-api-key", b"sk-team-a"),
            br#"{"model":"claude-haiku","max_tokens":500,"messages":[]}"#,
        );
        assert_eq!(forward(&step).tokens.as_ref().unwrap().estimate.total(), 0);
    }

    #[test]
    fn one_provider_serves_its_own_api_only() {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}"}}],
                "upstream":{{"api_key_env":"K","api":"anthropic"}}}}"#
        );
        let c = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
        let send = |path: &[u8]| {
            let headers = h(&[
                (":method", b"POST"),
                (":path", path),
                ("x-api-key", b"sk-team-a"),
                ("authorization", b"Bearer sk-team-a"),
                ("content-length", b"10"),
            ]);
            done(on_request_headers(
                &c,
                &headers,
                None,
                false,
                NOW,
                &FakeStore::default(),
            ))
        };
        let step = send(b"/v1/messages");
        assert_eq!(
            forward(&step).set,
            vec![("x-api-key", "sk-provider".to_string())]
        );
        assert_eq!(status(Start::Done(send(b"/v1/chat/completions"))), 404);
        // And an OpenAI upstream does not serve /v1/messages.
        assert_eq!(
            status(Start::Done(done(on_request_headers(
                &config(10),
                &h(&[
                    (":method", b"POST"),
                    (":path", b"/v1/messages"),
                    ("x-api-key", b"sk-team-a"),
                    ("content-length", b"10"),
                ]),
                None,
                false,
                NOW,
                &FakeStore::default()
            )))),
            404
        );
    }

    #[test]
    fn anthropic_budget_headers_count_the_reset_from_admission() {
        let w = Window {
            limit: 60,
            remaining: 12,
            reset_ms: 30_500,
        };
        assert_eq!(
            budget_headers(Api::Anthropic, Some(&w), None, 0),
            vec![
                ("anthropic-ratelimit-requests-limit", "60".to_string()),
                ("anthropic-ratelimit-requests-remaining", "12".to_string()),
                (
                    "anthropic-ratelimit-requests-reset",
                    "1970-01-01T00:00:31Z".to_string()
                ),
            ]
        );
        assert_eq!(
            api_of(&h(&[(":path", b"/v1/messages?beta=true")])),
            Api::Anthropic
        );
    }

    #[test]
    fn one_provider_mode_needs_the_length_of_a_body_it_estimates() {
        let c = config(10);
        let headers = h(&[
            (":method", b"POST"),
            (":path", b"/v1/chat/completions"),
            ("authorization", b"Bearer sk-team-a"),
        ]);
        let step = done(on_request_headers(
            &c,
            &headers,
            None,
            false,
            NOW,
            &FakeStore::default(),
        ));
        match step.decision {
            Decision::Reply(r) => assert_eq!(r.status, 411),
            other => panic!("{other:?}"),
        }
        // No body at all: nothing to estimate.
        let step = done(on_request_headers(
            &c,
            &headers,
            None,
            true,
            NOW,
            &FakeStore::default(),
        ));
        assert_eq!(step.outcome, Outcome::Admitted);
        // Endpoints outside the table are refused in this mode too.
        let mut files = headers.clone();
        files[1].1 = b"/v1/files";
        let step = done(on_request_headers(
            &c,
            &files,
            None,
            true,
            NOW,
            &FakeStore::default(),
        ));
        assert_eq!(step.outcome, Outcome::Invalid);
    }

    #[test]
    fn token_budget_reserves_estimates_and_settles_to_usage() {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}","tokens_per_minute":100}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}}],
                "models":[{{"match":"m","providers":["p"]}}]}}"#
        );
        let c = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
        let store = FakeStore::default();
        let send = |body: &[u8]| {
            let start = on_request_headers(
                &c,
                &h(&[
                    (":method", b"POST"),
                    (":path", b"/v1/chat/completions"),
                    ("authorization", b"Bearer sk-team-a"),
                ]),
                None,
                false,
                NOW,
                &store,
            );
            let Start::ReadBody(wait) = start else {
                panic!()
            };
            done(on_request_body(&c, wait, body, NOW, &store))
        };
        // 29 bytes -> 8 tokens, + max_tokens 50 = 58 reserved.
        let body = br#"{"model":"m","max_tokens":50}"#;
        assert_eq!(estimate_tokens(body.len(), Some(50)).total(), 58);
        let step = send(body);
        let t = forward(&step).tokens.clone().unwrap();
        assert_eq!(
            (t.estimate.total(), t.state.limit, t.state.remaining),
            (58, 100, 42)
        );
        assert_eq!(t.redis_key, None);
        // A second one does not fit: 429 for tokens, with the token headers.
        let step = send(body);
        match &step.decision {
            Decision::Reply(r) => {
                assert_eq!(r.status, 429);
                assert!(r
                    .headers
                    .contains(&("x-ratelimit-remaining-tokens", "42".into())));
                assert!(r.body.contains("\"type\":\"tokens\""));
            }
            other => panic!("{other:?}"),
        }
        // The first used 10 tokens: 48 come back, so the next one fits.
        let used = Delivered {
            usage: Some(10),
            stream_chunks: None,
            succeeded: true,
        };
        assert_eq!(settle_tokens(&c, 0, &t, used, &store), Ok(None));
        let step = send(body);
        assert_eq!(
            forward(&step).tokens.as_ref().unwrap().state.remaining,
            100 - 10 - 58
        );
        // A failed response with no usage gives its whole estimate back.
        let t2 = forward(&step).tokens.clone().unwrap();
        settle_tokens(&c, 0, &t2, Delivered::default(), &store).unwrap();
        assert_eq!(
            forward(&send(body))
                .tokens
                .as_ref()
                .unwrap()
                .state
                .remaining,
            100 - 10 - 58
        );
    }

    #[test]
    fn charges_what_was_delivered() {
        let e = Estimate {
            prompt: 30,
            completion: 200,
        };
        let d = |usage, stream_chunks, succeeded| Delivered {
            usage,
            stream_chunks,
            succeeded,
        };
        assert_eq!(
            charge(e, d(Some(57), None, true)),
            57,
            "reported usage wins"
        );
        assert_eq!(charge(e, d(Some(57), Some(3), false)), 57);
        assert_eq!(charge(e, d(None, None, false)), 0, "a failure is free");
        assert_eq!(charge(e, d(None, Some(9), false)), 0);
        // A stream cut off after 12 chunks: the prompt and the 12 chunks delivered.
        assert_eq!(charge(e, d(None, Some(12), true)), 42);
        assert_eq!(charge(e, d(None, None, true)), 230, "unknown is not zero");
    }

    #[test]
    fn one_provider_mode_estimates_the_prompt_from_content_length() {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}","tokens_per_minute":100}}],
                "upstream":{{"api_key_env":"K"}}}}"#
        );
        let c = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
        let store = FakeStore::default();
        let send = |len: &[u8]| {
            let headers = h(&[
                ("authorization", b"Bearer sk-team-a"),
                ("content-length", len),
            ]);
            done(on_request_headers(
                &c,
                &chat(headers),
                None,
                false,
                NOW,
                &store,
            ))
        };
        let t = forward(&send(b"120")).tokens.clone().unwrap();
        assert_eq!(t.estimate.total(), 30);
        assert_eq!(t.state.remaining, 70);
        assert_eq!(
            status(Start::Done(send(b"400"))),
            429,
            "100 tokens do not fit in 70"
        );
    }

    fn redis_tokens_config(on_error: &str) -> Config {
        let sha = Digest::of_key(DigestKind::Sha256, b"sk-team-a").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"team-a","key_sha256":"{sha}","requests_per_minute":5,
                             "tokens_per_minute":1000}}],
                "providers":[{{"name":"p","cluster":"c","api_key_env":"K"}}],
                "models":[{{"match":"m","providers":["p"]}}],
                "limiter":{{"backend":"redis","cluster":"webdis","on_error":"{on_error}"}}}}"#
        );
        Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap()
    }

    fn ask_with_body(c: &Config, body: &[u8], store: &FakeStore) -> Pending {
        let headers = h(&[
            (":method", b"POST"),
            (":path", b"/v1/chat/completions"),
            ("authorization", b"Bearer sk-team-a"),
        ]);
        let Start::ReadBody(wait) = on_request_headers(c, &headers, None, false, NOW, store) else {
            panic!("expected to read the body")
        };
        match on_request_body(c, wait, body, NOW, store) {
            Start::AskLimiter(p) => p,
            other => panic!("expected a limiter callout, got {other:?}"),
        }
    }

    #[test]
    fn redis_token_limits_reserve_in_the_same_script_call() {
        let c = redis_tokens_config("deny");
        let store = FakeStore::default();
        // 29 bytes -> 8 tokens, + max_tokens 50 = 58 reserved.
        let body = br#"{"model":"m","max_tokens":50}"#;
        let p = ask_with_body(&c, body, &store);
        let cmd = String::from_utf8(p.call.body.clone()).unwrap();
        let md5 = Digest::of_key(DigestKind::Md5, b"sk-team-a").to_hex();
        let minute = NOW / 60_000;
        assert!(
            cmd.ends_with(&format!(
                "/2/rate%3A{md5}%3A{minute}/tokens%3A{md5}%3A{minute}/5/{}/1000/58",
                limiter::window_of(NOW).1 + WINDOW_MS
            )),
            "{cmd}"
        );
        // Admitted: the reservation is Redis's, with the client's token budget after it.
        let step = on_limiter_reply(
            &c,
            p,
            Some(200),
            br#"{"EVAL":[1,1,100000,358]}"#,
            NOW,
            &store,
        );
        let t = forward(&step).tokens.clone().unwrap();
        assert_eq!(
            (t.state.limit, t.state.remaining, t.estimate.total()),
            (1000, 642, 58)
        );
        assert_eq!(t.redis_key, Some(format!("tokens:{md5}:{minute}")));
        // Settling returns the adjustment for Redis and leaves the local store alone.
        let used = Delivered {
            usage: Some(20),
            stream_chunks: None,
            succeeded: true,
        };
        assert_eq!(
            settle_tokens(&c, 0, &t, used, &store),
            Ok(Some((format!("tokens:{md5}:{minute}"), -38)))
        );
        assert!(store.map.borrow().is_empty(), "nothing counted locally");
        let exact = Delivered {
            usage: Some(58),
            ..used
        };
        assert_eq!(settle_tokens(&c, 0, &t, exact, &store), Ok(None));

        // Over the token limit: 429 for tokens, with the token headers.
        let p = ask_with_body(&c, body, &store);
        let step = on_limiter_reply(
            &c,
            p,
            Some(200),
            br#"{"EVAL":[2,1,100000,990]}"#,
            NOW,
            &store,
        );
        match &step.decision {
            Decision::Reply(r) => {
                assert_eq!(r.status, 429);
                assert!(r
                    .headers
                    .contains(&("x-ratelimit-remaining-tokens", "10".into())));
                assert!(r.body.contains("\"type\":\"tokens\""), "{}", r.body);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(step.outcome, Outcome::RateLimited);
    }

    #[test]
    fn redis_token_fallback_reserves_locally() {
        let c = redis_tokens_config("local");
        let store = FakeStore::default();
        let body = br#"{"model":"m","max_tokens":50}"#;
        let p = ask_with_body(&c, body, &store);
        let step = on_limiter_reply(&c, p, None, b"", NOW + 1, &store);
        let t = forward(&step).tokens.clone().unwrap();
        assert_eq!(
            t.redis_key, None,
            "the local record holds the fallback's reservation"
        );
        assert_eq!((t.state.remaining, t.estimate.total()), (942, 58));
    }

    #[test]
    fn response_headers_show_the_clients_budget() {
        let w = Window {
            limit: 60,
            remaining: 12,
            reset_ms: 30_500,
        };
        assert_eq!(
            budget_headers(Api::OpenAi, Some(&w), None, 0),
            vec![
                ("x-ratelimit-limit-requests", "60".to_string()),
                ("x-ratelimit-remaining-requests", "12".to_string()),
                ("x-ratelimit-reset-requests", "31s".to_string()),
            ]
        );
    }
}

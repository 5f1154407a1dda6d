//! One exchange (a request and its response) through the listener role, as one state machine
//! over the [`Host`]: the filter calls the method of each Envoy callback and returns the
//! [`Action`] it gets. Every decision is here; the filter only adapts Envoy's callbacks.
//!
//! ```text
//! request headers ─► decide (crate::request) ─┬─ reply ─────────────► done
//!                                             ├─ read body ─► decide ┐
//!                                             ├─ limiter callout ─► decide
//!                                             └─ forward ◄───────────┘
//!                                                 │ cache: hit ─► reply
//!                                                 ▼ one write: headers stripped, key or route set
//! response headers ─► account headers out, the client's budget in, usage reader, cache copy
//! response body ───► usage (JSON copy or SSE reader), cache copy, stream usage chunk out
//! log ─────────────► duration, tokens settled (once)
//! ```
//!
//! The rule of the request side: a request goes upstream only once [`Exchange::forwarded`] is
//! set, after Tollgate rewrote it; until then every request callback pauses (body, trailers,
//! a body arriving while a callout is out).

use std::rc::Rc;

use log::{debug, error, warn};

use crate::access_log::{self, Record};
use crate::anthropic;
use crate::cache::{self, Backend, Skip};
use crate::config::{Config, Mode};
use crate::endpoints::Api;
use crate::gateway::{callout_status, timed_out, Gateway, MAX_WEBDIS_REPLY_BYTES};
use crate::headers::{Header, HeaderMap};
use crate::host::{send_local_reply, Action, Buffer, Host, HostError, Map};
use crate::identity;
use crate::limiter::Window;
use crate::metrics::{CacheMetric, Outcome};
use crate::openai::{self, LocalReply};
use crate::request::{
    self, AwaitBody, Decision, Delivered, Forward, Pending, ResponseHead, Start, Step,
    TokenReservation,
};
use crate::routing::ROUTE_HEADER;
use crate::upstream;
use crate::usage::{self, SseUsage, Usage};
use crate::webdis::ReplyError;

/// JSON responses longer than this are not read for usage (no provider sends such a body for a
/// completion; it bounds the copy kept).
pub const MAX_USAGE_BODY_BYTES: usize = 8 << 20;

/// `x-tollgate-cache`: `hit`, `miss` (looked up, not found) or `bypass` (not looked up).
pub const CACHE_HEADER: &str = "x-tollgate-cache";

/// How a response is read for its token usage.
enum UsageReader {
    /// A JSON body, copied up to [`MAX_USAGE_BODY_BYTES`].
    Json(Vec<u8>),
    /// A Server-Sent Events stream, read event by event as it passes.
    Sse(SseUsage),
}

/// A response on its way to the cache.
struct CacheStore {
    plan: cache::Plan,
    rule: Option<usize>,
    /// Status and content type, once the response headers were found storable.
    head: Option<(u16, Vec<u8>)>,
    body: Vec<u8>,
}

/// An admitted request waiting for the Redis cache lookup.
struct CacheWait {
    forward: Forward,
    client: Option<usize>,
    outcome: Outcome,
    plan: cache::Plan,
    sent_ms: u64,
}

/// What a cache lookup did with an admitted request (a short-lived return value).
#[allow(clippy::large_enum_variant)]
enum Lookup {
    /// Send it upstream.
    Forward(Forward),
    /// Answered from the cache.
    Answered(Action),
    /// Waiting for Redis; the request is paused.
    Waiting,
}

/// What the exchange waits for.
enum Waiting {
    /// Nothing.
    Nothing,
    /// The whole request body (model routing).
    Body(AwaitBody),
    /// The Redis limiter's answer to this callout.
    Limiter(u32, Box<Pending>),
    /// The Redis cache's answer to this callout.
    Cache(u32, Box<CacheWait>),
}

/// One exchange through the listener role.
pub struct Exchange {
    gateway: Option<Rc<Gateway>>,
    waiting: Waiting,
    /// Tollgate decided to forward this request and rewrote it.
    forwarded: bool,
    /// The filter answered this request itself; the response is its own.
    replied: bool,
    /// The client's window after admission, for the response headers.
    window: Option<Window>,
    /// The admitted client and the rule that routed the request.
    client: Option<usize>,
    rule: Option<usize>,
    usage: Option<UsageReader>,
    /// The gateway asked for the stream's usage chunk: take it out of the response.
    strip_usage_chunk: bool,
    /// Tokens reserved at admission, settled when the exchange ends.
    tokens: Option<TokenReservation>,
    /// What the request holds of its client's budgets, settled when the exchange ends.
    budgets: Option<request::BudgetReservation>,
    /// The price the response is charged at, and the request's estimate.
    price: Option<(crate::spend::PriceId, request::Estimate)>,
    /// When the request's headers arrived (Unix ms).
    started_ms: Option<u64>,
    used: Option<Usage>,
    succeeded: bool,
    stream_chunks: Option<u64>,
    cache_header: Option<&'static str>,
    cache_store: Option<CacheStore>,
    /// What the access log gets (one property per field, set when the request is decided and
    /// when the provider's usage is known).
    log: Record,
    /// The upstream role's attempts were counted (once, at the response or at the log).
    attempts_counted: bool,
    /// The API of the request's path: the shape of Tollgate's answers and budget headers, and
    /// how usage is read.
    api: Api,
    /// Envoy's `x-request-id`, for the `request-id` of Anthropic-shaped errors.
    request_id: Option<String>,
    /// What the properties already hold (each field is set once).
    logged: Record,
    /// The request headers as they arrived, while the request waits for its body or a callout:
    /// what a provider must not see is removed when it is forwarded, in the same write.
    unstripped: Option<HeaderMap>,
    /// The length of the whole request body, once read (a body Tollgate rewrites replaces it).
    request_body_len: Option<usize>,
    /// The gateway was told this exchange ended (its log callback ran, or it had none).
    ended: bool,
}

impl Drop for Exchange {
    /// A context Envoy drops without its log callback still ends its exchange, so the worker's
    /// batch is not held back for it (the root tick writes it).
    fn drop(&mut self) {
        if let (false, Some(gw)) = (self.ended, &self.gateway) {
            gw.end_exchange(None);
        }
    }
}

impl Exchange {
    /// A new exchange; `gateway` is `None` when the configuration failed to load (every request
    /// is then refused).
    pub fn new(gateway: Option<Rc<Gateway>>) -> Self {
        if let Some(gw) = &gateway {
            gw.begin_exchange();
        }
        let ended = gateway.is_none();
        Self {
            ended,
            gateway,
            waiting: Waiting::Nothing,
            forwarded: false,
            replied: false,
            window: None,
            client: None,
            rule: None,
            usage: None,
            strip_usage_chunk: false,
            tokens: None,
            budgets: None,
            price: None,
            started_ms: None,
            used: None,
            succeeded: false,
            stream_chunks: None,
            cache_header: None,
            cache_store: None,
            log: Record::default(),
            attempts_counted: false,
            api: Api::OpenAi,
            request_id: None,
            logged: Record::default(),
            unstripped: None,
            request_body_len: None,
        }
    }

    /// Whether the request was decided and forwarded.
    pub fn forwarded(&self) -> bool {
        self.forwarded
    }

    // -----------------------------------------------------------------------------------------
    // The request.

    /// The request headers arrived.
    pub fn on_request_headers(&mut self, h: &dyn Host, end_of_stream: bool) -> Action {
        let Some(gw) = self.gateway.clone() else {
            // The configuration did not load, so Envoy should not have created us; refuse
            // rather than forward a request nobody authenticated.
            error!("request without a configuration");
            return self.reply(h, &openai::internal_error());
        };
        let (map, now) = match (h.headers(Map::Request), h.now_ms()) {
            (Ok(map), Ok(now)) => (map, now),
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot read the request: {e}");
                gw.count_request(h, None, Outcome::Error);
                return self.reply(h, &openai::internal_error());
            }
        };
        let headers = map.pairs();
        self.started_ms = Some(now);
        self.api = request::api_of(&headers);
        if self.api == Api::Anthropic {
            self.request_id = headers
                .iter()
                .find(|(n, _)| *n == b"x-request-id")
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
                .map(str::to_string);
        }
        let peer = match request::wants_peer_identity(&gw.config, &headers) {
            false => None,
            true => match h.property(&identity::PEER_URI_SAN) {
                Ok(peer) => peer,
                Err(e) => {
                    error!("cannot read the peer certificate: {e}");
                    gw.count_request(h, None, Outcome::Error);
                    return self.reply(h, &openai::internal_error());
                }
            },
        };
        let start = request::on_request_headers(
            &gw.config,
            &headers,
            peer.as_deref(),
            end_of_stream,
            now,
            h,
        );
        let mut start = match start {
            // No body will follow (a POST without one): decide on the empty body now.
            Start::ReadBody(awaiting) if end_of_stream => {
                request::on_request_body(&gw.config, awaiting, b"", now, h)
            }
            start => start,
        };
        // Headers a provider must not see go in the same write as what Tollgate sets on the
        // request it forwards: now, or once its body or a callout decided it (until then it
        // is paused: nothing of it goes upstream). An answered request needs no stripping.
        match &mut start {
            Start::Done(Step {
                decision: Decision::Reply(_),
                ..
            }) => {}
            // Forwarded now (a cache lookup may still pause it).
            Start::Done(Step {
                decision: Decision::Forward(f),
                client,
                ..
            }) if f.cache.is_none() => {
                if let Err(e) = write_request_headers(h, &gw.config, &headers, &f.set) {
                    error!("cannot edit the request headers: {e}");
                    gw.count_request(h, *client, Outcome::Error);
                    return self.reply(h, &openai::internal_error());
                }
                f.set.clear();
            }
            _ => self.unstripped = Some(map),
        }
        self.proceed(h, &gw, start)
    }

    /// A piece of the request body arrived (`end_of_stream`: the last one).
    pub fn on_request_body(
        &mut self,
        h: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if !matches!(self.waiting, Waiting::Body(_)) {
            // Forwarded: the rest of the body follows. Otherwise the request waits for a
            // callout, was answered, or was never decided: nothing may go upstream.
            return self.after_decision();
        }
        let Waiting::Body(awaiting) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else {
            return Action::Pause;
        };
        let Some(gw) = self.gateway.clone() else {
            return Action::Pause;
        };
        if body_size > awaiting.max_bytes {
            gw.count_request(h, None, Outcome::Invalid);
            gw.count_refusal(h, Some(awaiting.client()), None, "body_too_large");
            self.log.outcome = Some(Outcome::Invalid.as_str());
            return self.reply(h, &openai::body_too_large(awaiting.max_bytes));
        }
        if !end_of_stream {
            // Envoy buffers the body until its end (or its trailers).
            self.waiting = Waiting::Body(awaiting);
            return Action::Pause;
        }
        self.decide_on_body(h, &gw, awaiting, body_size)
    }

    /// The request ended with trailers. Envoy's default for this callback is to continue, which
    /// would forward a request nobody decided: a body being read is complete now.
    pub fn on_request_trailers(&mut self, h: &dyn Host) -> Action {
        match (
            self.gateway.clone(),
            std::mem::replace(&mut self.waiting, Waiting::Nothing),
        ) {
            (Some(gw), Waiting::Body(awaiting)) => {
                let max = awaiting.max_bytes.saturating_add(1);
                self.decide_on_body(h, &gw, awaiting, max)
            }
            (_, waiting) => {
                self.waiting = waiting;
                self.after_decision()
            }
        }
    }

    /// An HTTP callout of this exchange was answered (`num_headers` 0: it failed).
    pub fn on_callout(&mut self, h: &dyn Host, token: u32, num_headers: usize) {
        let Some(gw) = self.gateway.clone() else {
            return;
        };
        match std::mem::replace(&mut self.waiting, Waiting::Nothing) {
            Waiting::Cache(expected, wait) => {
                if token != expected {
                    warn!("unexpected callout token {token}");
                }
                self.on_cache_reply(h, &gw, *wait, num_headers);
            }
            Waiting::Limiter(expected, pending) => {
                if token != expected {
                    warn!("unexpected callout token {token}");
                }
                let status = callout_status(h, num_headers);
                let body = h
                    .body(Buffer::CallResponse, MAX_WEBDIS_REPLY_BYTES)
                    .unwrap_or_default();
                let now = h.now_ms().unwrap_or(0);
                let step = limiter_answer(h, &gw, *pending, status, &body, now);
                if self.finish(h, &gw, step) == Action::Continue {
                    self.resume(h);
                }
            }
            other => self.waiting = other,
        }
    }

    /// Continue only a request that was forwarded; anything else stays paused.
    fn after_decision(&self) -> Action {
        if self.forwarded {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn resume(&mut self, h: &dyn Host) {
        if let Err(e) = h.resume_request() {
            error!("cannot resume the request: {e}");
        }
    }

    /// The whole body is buffered (at most `max` bytes are read): decide on it.
    fn decide_on_body(
        &mut self,
        h: &dyn Host,
        gw: &Rc<Gateway>,
        awaiting: AwaitBody,
        max: usize,
    ) -> Action {
        let body = match h.body(Buffer::Request, max) {
            Ok(b) => b,
            Err(e) => {
                error!("cannot read the request body: {e}");
                gw.count_request(h, None, Outcome::Error);
                return self.reply(h, &openai::internal_error());
            }
        };
        self.request_body_len = Some(body.len());
        // The request is counted in the window of its arrival (its headers' time): one clock
        // read per request.
        let now = self.started_ms.unwrap_or_default();
        let start = request::on_request_body(&gw.config, awaiting, &body, now, h);
        self.proceed(h, gw, start)
    }

    /// Carries out the core's next step for this request.
    fn proceed(&mut self, h: &dyn Host, gw: &Rc<Gateway>, start: Start) -> Action {
        match start {
            Start::Done(step) => self.finish(h, gw, step),
            Start::ReadBody(awaiting) => {
                self.waiting = Waiting::Body(awaiting);
                Action::Pause
            }
            // Leases: a worker whose Webdis keeps failing does not make requests wait for it.
            Start::AskLimiter(pending)
                if pending.is_lease()
                    && !gw.lease_allows(h, self.started_ms.unwrap_or_default()) =>
            {
                let now = self.started_ms.unwrap_or_default();
                let step = request::on_lease_short_circuit(&gw.config, pending, now, h);
                self.finish(h, gw, step)
            }
            Start::AskLimiter(pending) => match h.dispatch(&pending.call) {
                Ok(token) => {
                    gw.limiter_call(h, pending.is_lease());
                    self.waiting = Waiting::Limiter(token, Box::new(pending));
                    Action::Pause
                }
                Err(e) => {
                    // An unknown cluster or a bad callout: the limiter is unavailable.
                    error!("cannot call the Redis limiter: {e}");
                    let now = h.now_ms().unwrap_or(0);
                    let step = limiter_answer(h, gw, pending, None, b"", now);
                    self.finish(h, gw, step)
                }
            },
        }
    }

    /// Applies a decision: records its metrics, then answers or rewrites the request.
    fn finish(&mut self, h: &dyn Host, gw: &Gateway, mut step: Step) -> Action {
        if let Some(fetch) = step.prefetch.take() {
            gw.queue_prefetch(h, fetch);
        }
        for f in &step.limiter_errors {
            warn!(
                "{} limiter failed ({}); handled by its failure policy",
                f.backend, f.reason
            );
            gw.limiter_error(h, f);
        }
        if let Some(why) = step.key_error {
            debug!("unauthorized: {why:?}");
        }
        self.log.client = step
            .client
            .and_then(|c| gw.config.client(c))
            .map(|c| c.name.clone());
        self.log.model = step.model.as_deref().map(access_log::model);
        self.log.outcome = Some(step.outcome.as_str());
        self.log.limiter_error = step
            .limiter_errors
            .first()
            .map(|f| format!("{}:{}", f.backend, f.reason));
        let (action, outcome) = match step.decision {
            Decision::Reply(reply) => {
                if let Some(kind) = reply.kind {
                    gw.count_refusal(h, step.client, step.model.as_deref(), kind.reason());
                }
                (self.reply(h, &reply), step.outcome)
            }
            // Admitted (limits counted): the cache may answer it before it goes upstream.
            Decision::Forward(forward) => {
                match self.look_up(h, gw, forward, step.client, step.outcome) {
                    Lookup::Forward(forward) => {
                        self.admit(h, gw, forward, step.client, step.outcome)
                    }
                    Lookup::Answered(action) => (action, step.outcome),
                    // Counted when Redis answers.
                    Lookup::Waiting => return Action::Pause,
                }
            }
        };
        gw.count_request(h, step.client, outcome);
        action
    }

    /// Rewrites an admitted request for its trip upstream.
    fn admit(
        &mut self,
        h: &dyn Host,
        gw: &Gateway,
        mut forward: Forward,
        client: Option<usize>,
        outcome: Outcome,
    ) -> (Action, Outcome) {
        match apply(
            h,
            &gw.config,
            &mut forward,
            self.unstripped.take(),
            self.request_body_len,
        ) {
            Ok(()) => {
                self.forwarded = true;
                self.window = forward.window;
                self.client = client;
                self.rule = forward.rule;
                self.tokens = forward.tokens;
                self.budgets = forward.budgets;
                self.price = forward.price.map(|p| (p, forward.estimate));
                self.strip_usage_chunk = forward.strip_usage_chunk;
                self.log.cache = self.cache_header;
                self.write_log(h);
                (Action::Continue, outcome)
            }
            Err(e) => {
                // Never forward a request whose client key may still be on it.
                error!("cannot rewrite request headers: {e}");
                self.cache_store = None;
                self.log.outcome = Some(Outcome::Error.as_str());
                (self.reply(h, &openai::internal_error()), Outcome::Error)
            }
        }
    }

    /// Sends a local reply; if even that fails, resets the stream so nothing goes upstream.
    /// Every answer is in the shape of the client's API (Anthropic's SDKs read Anthropic's);
    /// the access log gets the reply's reason (an outcome not set by then is an error).
    fn reply(&mut self, h: &dyn Host, reply: &LocalReply) -> Action {
        self.replied = true;
        self.log.reason = reply.kind.map(|k| k.reason());
        if self.log.outcome.is_none() {
            self.log.outcome = Some(Outcome::Error.as_str());
        }
        self.write_log(h);
        match self.api {
            Api::OpenAi => send_local_reply(h, reply),
            Api::Anthropic => {
                let at = self.started_ms.unwrap_or_default();
                let shaped = anthropic::error_reply(reply, at, self.request_id.as_deref());
                send_local_reply(h, &shaped);
            }
        }
        Action::Pause
    }

    /// Sets the access log's properties (`wasm.tollgate_<field>`) when the configuration asks
    /// for them (`access_log`): one host call per field that got a value since the last time.
    fn write_log(&mut self, h: &dyn Host) {
        if !self.gateway.as_ref().is_some_and(|gw| gw.config.access_log) {
            return;
        }
        for (property, value) in self.log.changes(&self.logged) {
            if let Err(e) = h.set_property(property, value.as_bytes()) {
                debug!("cannot set {property}: {e}");
            }
        }
        self.logged.clone_from(&self.log);
    }

    // -----------------------------------------------------------------------------------------
    // The response cache: look up after admission, answer a hit, copy a miss's response as it
    // passes and store it at its end. Every failure is a miss.

    fn look_up(
        &mut self,
        h: &dyn Host,
        gw: &Gateway,
        mut forward: Forward,
        client: Option<usize>,
        outcome: Outcome,
    ) -> Lookup {
        let Some(decision) = forward.cache.take() else {
            return Lookup::Forward(forward);
        };
        let rule = forward.rule;
        let plan = match decision {
            cache::Decision::Bypass { backend, reason } => {
                gw.cache_count(h, CacheMetric::Skips, rule, backend, reason.reason(), 1);
                self.cache_header = Some("bypass");
                return Lookup::Forward(forward);
            }
            cache::Decision::Use(plan) => plan,
        };
        let backend = plan.backend;
        if plan.store {
            self.cache_store = Some(CacheStore {
                plan: plan.clone(),
                rule,
                head: None,
                body: Vec::new(),
            });
        } else {
            gw.cache_count(
                h,
                CacheMetric::Skips,
                rule,
                backend,
                Skip::NoStore.reason(),
                1,
            );
        }
        if !plan.lookup {
            gw.cache_count(
                h,
                CacheMetric::Skips,
                rule,
                backend,
                Skip::NoCache.reason(),
                1,
            );
            self.cache_header = Some("bypass");
            return Lookup::Forward(forward);
        }
        self.cache_header = Some("miss");
        let now = h.now_ms().unwrap_or(0);
        match (backend, gw.config.cache.local, &gw.config.cache.redis) {
            (Backend::Local, Some(layout), _) => {
                match cache::local_get(h, &layout, &plan.key, now) {
                    Ok(Some(entry)) => {
                        return Lookup::Answered(
                            self.serve_hit(h, gw, forward, client, backend, entry, now),
                        )
                    }
                    Ok(None) => {}
                    Err(e) => gw.cache_error(h, rule, backend, &e),
                }
            }
            (Backend::Redis, _, Some(redis)) => {
                let call = request::webdis_call(redis, cache::get_command(&plan.key));
                match h.dispatch(&call) {
                    Ok(token) => {
                        let wait = CacheWait {
                            forward,
                            client,
                            outcome,
                            plan,
                            sent_ms: now,
                        };
                        self.waiting = Waiting::Cache(token, Box::new(wait));
                        return Lookup::Waiting;
                    }
                    Err(e) => {
                        error!("cannot call Webdis to look up a response: {e}");
                        let failed = cache::Error::Redis(ReplyError::Unavailable);
                        gw.cache_error(h, rule, backend, &failed);
                    }
                }
            }
            // The configuration always has the backend its settings use.
            _ => {}
        }
        gw.cache_count(h, CacheMetric::Misses, rule, backend, "", 1);
        Lookup::Forward(forward)
    }

    /// Webdis answered a lookup: a hit is answered here, anything else goes upstream.
    fn on_cache_reply(&mut self, h: &dyn Host, gw: &Gateway, wait: CacheWait, num_headers: usize) {
        let CacheWait {
            forward,
            client,
            outcome,
            plan,
            sent_ms,
        } = wait;
        let status = callout_status(h, num_headers);
        let max = gw.config.cache.max_reply_bytes();
        let body = h.body(Buffer::CallResponse, max).unwrap_or_default();
        let now = h.now_ms().unwrap_or(0);
        let timeout = gw.config.cache.redis.as_ref().map_or(0, |r| r.timeout_ms);
        let rule = forward.rule;
        let (action, outcome) = match cache::parse_get_reply(status, &body, &plan.key, now) {
            Ok(Some(entry)) => {
                let action = self.serve_hit(h, gw, forward, client, plan.backend, entry, now);
                (action, outcome)
            }
            other => {
                if let Err(e) = other {
                    gw.cache_error(h, rule, plan.backend, &timed_out(e, now, sent_ms, timeout));
                }
                gw.cache_count(h, CacheMetric::Misses, rule, plan.backend, "", 1);
                self.admit(h, gw, forward, client, outcome)
            }
        };
        gw.count_request(h, client, outcome);
        if action == Action::Continue {
            self.resume(h);
        }
    }

    /// Answers an admitted request with a stored response: 200, its content type, the
    /// client's budget headers. A hit costs no tokens: the reservation is given back.
    #[allow(clippy::too_many_arguments)]
    fn serve_hit(
        &mut self,
        h: &dyn Host,
        gw: &Gateway,
        forward: Forward,
        client: Option<usize>,
        backend: Backend,
        entry: cache::Entry,
        now_ms: u64,
    ) -> Action {
        let rule = forward.rule;
        self.cache_store = None;
        self.cache_header = None;
        let content_type = if entry.content_type.is_empty() {
            "application/json".to_string()
        } else {
            String::from_utf8_lossy(&entry.content_type).into_owned()
        };
        let mut headers = vec![
            ("content-type", content_type),
            (CACHE_HEADER, "hit".to_string()),
            ("age", entry.age_s(now_ms).to_string()),
        ];
        let refunded = forward.tokens.as_ref().map(|t| {
            let mut refunded = t.clone();
            refunded.state.remaining = t
                .state
                .remaining
                .saturating_add(t.estimate.total())
                .min(t.state.limit);
            refunded
        });
        headers.extend(request::budget_headers(
            self.api,
            forward.window.as_ref(),
            refunded.as_ref(),
            self.started_ms.unwrap_or_default(),
        ));
        self.replied = true;
        self.client = client;
        self.rule = rule;
        self.window = forward.window;
        self.tokens = forward.tokens;
        self.budgets = forward.budgets;
        // Settled in on_log: zero tokens used (and, unpriced here, no money).
        self.used = Some(Usage::default());
        self.succeeded = true;
        self.log.cache = Some("hit");
        self.write_log(h);
        gw.cache_count(h, CacheMetric::Hits, rule, backend, "", 1);
        gw.cache_count(
            h,
            CacheMetric::ServedBytes,
            rule,
            backend,
            "",
            entry.body.len() as u64,
        );
        debug!("answered from the response cache ({})", backend.name());
        if let Err(e) = h.send_reply(entry.status, &headers, &entry.body) {
            error!("cannot send a cached response: {e}; resetting the stream");
            let _ = h.reset_request();
        }
        Action::Pause
    }

    // -----------------------------------------------------------------------------------------
    // The response.

    /// The response headers arrived.
    pub fn on_response_headers(&mut self, h: &dyn Host) -> Action {
        if self.replied {
            return Action::Continue;
        }
        let Some(gw) = self.gateway.clone() else {
            return Action::Continue;
        };
        // One read of the whole map: status, content type, attempts, and the headers to remove.
        let map = match h.headers(Map::Response) {
            Ok(map) => map,
            Err(e) => {
                // The provider's account headers could reach the client: do not let them.
                error!("cannot read the response headers: {e}; resetting the stream");
                let _ = h.reset_request();
                return Action::Pause;
            }
        };
        let headers = map.pairs();
        let head = ResponseHead::read(&headers);
        // Envoy's router made its last attempt: count them.
        self.count_attempts(h, &gw, head.attempts, head.status);
        self.cache_response_headers(&gw, h, &head);
        let (remove, mut set) = request::response_edits(
            self.api,
            &headers,
            self.window.as_ref(),
            self.tokens.as_ref(),
            self.started_ms.unwrap_or_default(),
        );
        if let Some(value) = self.cache_header {
            set.push((CACHE_HEADER, value.to_string()));
        }
        // All edits in one host call: the map without what goes or is replaced, plus what is set.
        if !remove.is_empty() || !set.is_empty() {
            let mut edited: Vec<Header> = Vec::with_capacity(headers.len() + set.len());
            edited.extend(headers.into_iter().filter(|(n, _)| {
                !remove.iter().any(|r| n.eq_ignore_ascii_case(r.as_bytes()))
                    && !set
                        .iter()
                        .any(|(s, _)| n.eq_ignore_ascii_case(s.as_bytes()))
            }));
            edited.extend(set.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            if let Err(e) = h.set_headers(Map::Response, &edited) {
                // The provider's account headers could reach the client: do not let them.
                error!("cannot rewrite the response headers: {e}; resetting the stream");
                let _ = h.reset_request();
                return Action::Pause;
            }
        }
        if self.client.is_some() {
            self.succeeded = head.succeeded();
            let streaming = head.is_sse();
            if streaming {
                if let (Some(start), Ok(now)) = (self.started_ms, h.now_ms()) {
                    gw.record_timing(h, self.rule, true, now.saturating_sub(start));
                }
            }
            self.usage = if streaming {
                Some(UsageReader::Sse(match self.api {
                    Api::Anthropic => SseUsage::anthropic(),
                    Api::OpenAi if self.strip_usage_chunk => SseUsage::stripping_usage_chunk(),
                    Api::OpenAi => SseUsage::default(),
                }))
            } else if head.is_json() {
                Some(UsageReader::Json(Vec::new()))
            } else {
                None
            };
        }
        Action::Continue
    }

    /// A piece of the response body passed (never paused: a stream must reach the client as
    /// it arrives).
    pub fn on_response_body(
        &mut self,
        h: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Some(gw) = self.gateway.clone() else {
            return Action::Continue;
        };
        // One read of this callback's bytes serves the cache copy and the usage reader.
        let wants =
            self.usage.is_some() || self.cache_store.as_ref().is_some_and(|s| s.head.is_some());
        let chunk = if wants && body_size > 0 {
            match h.body(Buffer::Response, body_size) {
                Ok(chunk) => Some(chunk),
                Err(e) => {
                    debug!("cannot read the response body: {e}");
                    self.usage = None;
                    if let Some(store) = self.cache_store.take() {
                        let (rule, backend) = (store.rule, store.plan.backend);
                        gw.cache_count(
                            h,
                            CacheMetric::Skips,
                            rule,
                            backend,
                            Skip::Incomplete.reason(),
                            1,
                        );
                    }
                    None
                }
            }
        } else {
            None
        };
        self.cache_response_body(h, &gw, chunk.as_deref(), end_of_stream);
        if let Some(reader) = self.usage.as_mut() {
            let chunk = chunk.unwrap_or_default();
            match reader {
                UsageReader::Sse(sse) if self.strip_usage_chunk => {
                    let mut out = sse.push_filtered(&chunk);
                    if end_of_stream {
                        out.extend(sse.finish_filtered());
                    }
                    if out != chunk {
                        if let Err(e) = h.replace_body(Buffer::Response, chunk.len(), &out) {
                            warn!("cannot rewrite the stream: {e}");
                        }
                    }
                }
                UsageReader::Sse(sse) => sse.push(&chunk),
                UsageReader::Json(body) => {
                    if body.len() + chunk.len() > MAX_USAGE_BODY_BYTES {
                        self.usage = None;
                        return Action::Continue;
                    }
                    if body.is_empty() {
                        // The first chunk (most answers' only one) is kept, not copied.
                        *body = chunk;
                    } else {
                        body.extend_from_slice(&chunk);
                    }
                }
            }
        }
        if end_of_stream {
            let found = match self.usage.take() {
                Some(UsageReader::Sse(mut sse)) => {
                    sse.finish();
                    self.stream_chunks = Some(sse.chunks);
                    sse.usage
                }
                Some(UsageReader::Json(body)) => match self.api {
                    Api::OpenAi => usage::from_json(&body),
                    Api::Anthropic => usage::from_anthropic_json(&body),
                },
                None => None,
            };
            if let Some(u) = found {
                self.record_usage(h, &gw, u);
            }
        }
        Action::Continue
    }

    /// The response ended with trailers: a body copied for the cache is complete now.
    pub fn on_response_trailers(&mut self, h: &dyn Host) -> Action {
        if let Some(gw) = self.gateway.clone() {
            self.cache_response_body(h, &gw, None, true);
        }
        Action::Continue
    }

    /// The exchange is over (complete, failed or reset): duration, and the token reservation
    /// replaced by what was used, once.
    pub fn on_log(&mut self, h: &dyn Host) {
        let Some(gw) = self.gateway.clone() else {
            return;
        };
        self.settle(h, &gw);
        if !self.ended {
            self.ended = true;
            gw.end_exchange(Some(h));
        }
    }

    /// Counts and settles what the finished exchange used (the log callback's work).
    fn settle(&mut self, h: &dyn Host, gw: &Rc<Gateway>) {
        if let Waiting::Cache(_, wait) = std::mem::replace(&mut self.waiting, Waiting::Nothing) {
            // Gone while the Redis lookup was out: count it, and give its tokens back below.
            gw.count_request(h, wait.client, wait.outcome);
            self.client = wait.client;
            self.tokens = wait.forward.tokens;
            self.budgets = wait.forward.budgets;
        }
        // No response headers (client gone, stream reset): the attempts made still count.
        self.count_attempts(h, gw, None, None);
        if let Some(store) = self.cache_store.take() {
            // The response never reached its end of stream (reset, client gone).
            let skip = Skip::Incomplete.reason();
            gw.cache_count(
                h,
                CacheMetric::Skips,
                store.rule,
                store.plan.backend,
                skip,
                1,
            );
        }
        if let (Some(_), Some(start), Ok(now)) = (self.client, self.started_ms, h.now_ms()) {
            gw.record_timing(h, self.rule, false, now.saturating_sub(start));
        }
        // A stream cut off before its end still has its reader: count what it delivered.
        let stream_chunks = match &self.usage {
            Some(UsageReader::Sse(sse)) => Some(sse.chunks),
            _ => self.stream_chunks,
        };
        let delivered = Delivered {
            usage: self
                .used
                .map(|u| u.prompt_tokens.saturating_add(u.completion_tokens)),
            stream_chunks,
            succeeded: self.succeeded,
        };
        let mut cost = 0;
        if let (Some(client), Some((price, estimate))) = (self.client, self.price.take()) {
            if let Some(p) = gw.config.prices.get(price) {
                cost = request::charge_money(p, estimate, self.used.as_ref(), delivered);
                gw.count_spend(h, client, price, cost);
                // Envoy (1.32 and later) runs the filter's log callback before the configured
                // access logs, so the line carries it.
                self.log.cost_micros = Some(cost);
                self.write_log(h);
                let started = self.started_ms.unwrap_or_default();
                if let Some((key, n)) =
                    request::spend_record(&gw.config, client, price, cost, started)
                {
                    gw.queue_settlement(h, key, n);
                }
            }
        }
        let (tokens, budgets) = (self.tokens.take(), self.budgets.take());
        let Some(client) = self
            .client
            .filter(|_| tokens.is_some() || budgets.is_some())
        else {
            return;
        };
        let (adjustments, local) = request::settlement(
            &gw.config,
            client,
            tokens.as_ref(),
            budgets.as_ref(),
            delivered,
            cost,
        );
        for (key, delta) in adjustments {
            gw.queue_settlement(h, key, delta);
        }
        if let Some(local) = local {
            gw.settle_local(h, local);
        }
    }

    /// Counts the upstream role's attempts of a forwarded request, once, and logs the provider
    /// that answered (model routing).
    fn count_attempts(
        &mut self,
        h: &dyn Host,
        gw: &Gateway,
        attempts: Option<usize>,
        status: Option<u16>,
    ) {
        if self.forwarded && !self.attempts_counted {
            self.attempts_counted = true;
            if let Some(provider) = gw.count_attempts(h, self.rule, attempts, status) {
                self.log.provider = Some(provider.to_string());
                self.write_log(h);
            }
        }
    }

    /// Records a response's usage: token counters and the access log's tokens.
    fn record_usage(&mut self, h: &dyn Host, gw: &Gateway, usage: Usage) {
        self.used = Some(usage);
        let Some(client) = self.client else {
            return;
        };
        gw.count_tokens(h, client, self.rule, false, usage.prompt_tokens);
        gw.count_tokens(h, client, self.rule, true, usage.completion_tokens);
        self.log.prompt_tokens = Some(usage.prompt_tokens);
        self.log.completion_tokens = Some(usage.completion_tokens);
        self.write_log(h);
    }

    /// Response headers of a forwarded request: say what the cache did, and keep copying only
    /// a response that can be stored (a 200, not compressed, not a stream).
    fn cache_response_headers(&mut self, gw: &Gateway, h: &dyn Host, head: &ResponseHead) {
        let Some(store) = self.cache_store.as_mut() else {
            return;
        };
        let status = head.status.unwrap_or(0);
        let skip = if status != 200 {
            Some(Skip::Status)
        } else if head.encoded || head.is_sse() {
            Some(Skip::Encoding)
        } else {
            None
        };
        match skip {
            Some(skip) => {
                let (rule, backend) = (store.rule, store.plan.backend);
                gw.cache_count(h, CacheMetric::Skips, rule, backend, skip.reason(), 1);
                self.cache_store = None;
            }
            None => store.head = Some((status, head.content_type.clone())),
        }
    }

    /// Copies the response body as it passes (bounded by `max_entry_bytes`; the client gets
    /// every byte as it arrives) and stores it at the end of the stream.
    fn cache_response_body(
        &mut self,
        h: &dyn Host,
        gw: &Gateway,
        chunk: Option<&[u8]>,
        end_of_stream: bool,
    ) {
        let Some(store) = self.cache_store.as_mut() else {
            return;
        };
        if store.head.is_none() {
            return;
        }
        if let Some(chunk) = chunk {
            if store.body.len() + chunk.len() > store.plan.max_entry_bytes {
                let (rule, backend) = (store.rule, store.plan.backend);
                gw.cache_count(
                    h,
                    CacheMetric::Skips,
                    rule,
                    backend,
                    Skip::TooLarge.reason(),
                    1,
                );
                self.cache_store = None;
                return;
            }
            store.body.extend_from_slice(chunk);
        }
        if !end_of_stream {
            return;
        }
        let Some(CacheStore {
            plan,
            rule,
            head: Some((status, content_type)),
            body,
        }) = self.cache_store.take()
        else {
            return;
        };
        let now = h.now_ms().unwrap_or(0);
        let entry = match cache::Entry::new(&plan, now, status, &content_type, body) {
            Ok(entry) => entry,
            Err(skip) => {
                gw.cache_count(h, CacheMetric::Skips, rule, plan.backend, skip.reason(), 1);
                return;
            }
        };
        match (plan.backend, gw.config.cache.local) {
            (Backend::Local, Some(layout)) => match cache::local_put(h, &layout, &entry, now) {
                Ok(()) => {
                    let bytes = entry.body.len() as u64;
                    gw.cache_count(h, CacheMetric::Stores, rule, Backend::Local, "", 1);
                    gw.cache_count(h, CacheMetric::StoredBytes, rule, Backend::Local, "", bytes);
                }
                Err(e) => gw.cache_error(h, rule, Backend::Local, &e),
            },
            (Backend::Redis, _) => gw.queue_store(h, rule, &entry, plan.ttl_s),
            (Backend::Local, None) => {}
        }
    }
}

/// Decides on the limiter's answer; a lease fetch's answer also feeds the worker's breaker.
fn limiter_answer(
    h: &dyn Host,
    gw: &Gateway,
    pending: Pending,
    status: Option<u16>,
    body: &[u8],
    now: u64,
) -> Step {
    let fetch = pending.lease_fetch().cloned();
    let step = request::on_limiter_reply(&gw.config, pending, status, body, now, h);
    if let Some(fetch) = fetch {
        let error = step.limiter_errors.iter().find(|f| f.backend == "redis");
        let spent = step.outcome == Outcome::RateLimited;
        gw.lease_answered(
            h,
            &fetch,
            error.map(|f| f.reason),
            spent,
            step.lease_granted,
            now,
        );
    }
    step
}

/// Writes the request headers of a forwarded request: `headers` (as they arrived) without what
/// a provider must not see, with the forward's headers `set` and, on a route of Tollgate's, the
/// first attempt's credentials (see [`upstream::first_attempt_edits`]). More than one edit is
/// one write of the whole map; a single edit is its own call, which costs Envoy less than
/// rebuilding the map.
fn write_request_headers(
    h: &dyn Host,
    config: &Config,
    headers: &[Header],
    set: &[(&'static str, String)],
) -> Result<(), HostError> {
    let removed = request::strip_list(config, headers);
    if let Mode::Routed(routing) = &config.mode {
        if set.iter().any(|(n, _)| *n == ROUTE_HEADER) {
            // The route and the first attempt's credentials: the map as forwarded, in one write.
            // Room for the first attempt's key, host, path and an extra header too.
            let mut map = with_room(headers, set.len() + 4);
            edit(&mut map, &removed, set);
            let mut first = upstream::first_attempt_edits(routing, &map);
            first.retain_needed(&map);
            edit(&mut map, &first.remove, &first.set);
            return h.set_headers(Map::Request, &map);
        }
    }
    let replaced = |name: &[u8]| set.iter().any(|(n, _)| n.as_bytes() == name);
    let removals: Vec<&Vec<u8>> = removed.iter().filter(|n| !replaced(n)).collect();
    match (removals.as_slice(), set) {
        ([], []) => Ok(()),
        ([name], []) => h.remove_header(Map::Request, name),
        ([], [(name, value)]) => h.replace_header(Map::Request, name, value),
        _ => {
            let mut map = with_room(headers, set.len());
            edit(&mut map, &removed, set);
            h.set_headers(Map::Request, &map)
        }
    }
}

/// A copy of the list of `headers` with room for `more` (the slices are not copied).
fn with_room<'a>(headers: &[Header<'a>], more: usize) -> Vec<Header<'a>> {
    let mut map = Vec::with_capacity(headers.len() + more);
    map.extend_from_slice(headers);
    map
}

/// Edits a header map in place: the names in `removed` and in `set` go, then `set` is added.
fn edit<'a, N: AsRef<str>>(map: &mut Vec<Header<'a>>, removed: &[Vec<u8>], set: &'a [(N, String)]) {
    map.retain(|(n, _)| {
        !removed.iter().any(|r| r.as_slice() == *n)
            && !set.iter().any(|(s, _)| s.as_ref().as_bytes() == *n)
    });
    map.extend(
        set.iter()
            .map(|(n, v)| (n.as_ref().as_bytes(), v.as_bytes())),
    );
}

/// Applies a forward's rewrite: headers set (the provider key or the route; taken from
/// `forward`), the body replaced (a stream now asking for usage), the route picked again.
fn apply(
    h: &dyn Host,
    config: &Config,
    forward: &mut Forward,
    unstripped: Option<HeaderMap>,
    body_len: Option<usize>,
) -> Result<(), HostError> {
    // A new body's length goes in the same write as the other header edits.
    let mut set = std::mem::take(&mut forward.set);
    if let Some(body) = &forward.body {
        set.push(("content-length", body.len().to_string()));
    }
    match unstripped {
        Some(map) => write_request_headers(h, config, &map.pairs(), &set)?,
        None => {
            for (name, value) in &set {
                h.replace_header(Map::Request, name, value)?;
            }
        }
    }
    if let Some(body) = &forward.body {
        // Called with the whole body buffered and the headers held: its length is the one the
        // exchange read it at (read again only when it was not read here).
        let size = match body_len {
            Some(n) => n,
            None => h.body(Buffer::Request, usize::MAX).map(|b| b.len())?,
        };
        h.replace_body(Buffer::Request, size, body)?;
    }
    if forward.reroute {
        h.clear_route_cache()?;
    }
    Ok(())
}

//! Root and HTTP contexts: the request flow, top to bottom.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use tollgate_core::body;
use tollgate_core::cache::{self, Backend, Skip};
use tollgate_core::config::{LimiterBackend, Mode};
use tollgate_core::limiter::{self, LimiterError, Window};
use tollgate_core::metrics::{self, CacheMetric, Outcome, ANONYMOUS};
use tollgate_core::openai::{self, LocalReply};
use tollgate_core::request::{
    self, AwaitBody, Callout, Decision, Delivered, Forward, LimiterFailure, Pending, Start, Step,
    TokenReservation,
};
use tollgate_core::routing::{ProviderId, Routing};
use tollgate_core::upstream;
use tollgate_core::usage::{self, SseUsage, Usage};
use tollgate_core::webdis::{self, ReplyError, Settlements};
use tollgate_core::Config;

use crate::host::{self, HostError, Map, SharedData};

/// Webdis replies to a check are a few dozen bytes; anything longer is not a check reply.
const MAX_LIMITER_REPLY_BYTES: usize = 4096;

/// Root id of the plugin instances that run as upstream filters of provider clusters.
const UPSTREAM_ROOT_ID: &[u8] = b"tollgate_upstream";

/// JSON responses longer than this are not read for usage (no provider sends such a body for a
/// completion; it bounds the copy the filter keeps).
const MAX_USAGE_BODY_BYTES: usize = 8 << 20;

/// A compiled configuration with the metric ids it uses, shared by the VM's HTTP contexts.
struct Plugin {
    config: Config,
    metrics: MetricIds,
    /// `tollgate_tokens_total` ids by (client, rule, kind), defined on first use: the label set
    /// is bounded by the configuration, but defining every combination up front would not be.
    tokens: RefCell<HashMap<TokenSeries, u32>>,
    /// Histogram ids by (rule, first-byte?), defined on first use.
    timings: RefCell<HashMap<(Option<usize>, bool), u32>>,
    /// Token adjustments for the Redis limiter, sent by the root context on its tick: a callout
    /// made by a request in `on_log` would be cancelled with the request's context.
    settlements: RefCell<Settlements>,
    /// `tollgate_cache_*` ids, defined on first use.
    cache_metrics: RefCell<HashMap<CacheSeries, u32>>,
    /// Redis stores waiting for this worker's root context to send them (see `Root::on_tick`).
    cache_queue: RefCell<VecDeque<QueuedStore>>,
    /// Redis stores sent by the root context and not answered yet, by callout token.
    cache_in_flight: RefCell<HashMap<u32, StoreMeta>>,
}

/// (metric, rule, backend, reason) of a `tollgate_cache_*` series.
type CacheSeries = (CacheMetric, Option<usize>, Backend, &'static str);

/// `x-tollgate-cache`: `hit`, `miss` (looked up, not found) or `bypass` (not looked up).
const CACHE_HEADER: &str = "x-tollgate-cache";

/// How often each worker's root context sends what its requests queued for Redis since its last
/// tick: response cache stores and token settlements (a callout made by a request as it ends
/// would be cancelled with the request's context).
const ROOT_TICK_MS: u32 = 100;

/// Redis stores queued or in flight per worker; more are dropped (and counted), so a slow
/// Webdis cannot make the filter hold response copies without bound.
const MAX_PENDING_STORES: usize = 64;

/// Webdis's answer to a store is a few dozen bytes.
const MAX_STORE_REPLY_BYTES: usize = 4096;

/// A Redis store waiting for the root context.
struct QueuedStore {
    call: Callout,
    meta: StoreMeta,
}

/// What a store's answer is counted under.
#[derive(Clone, Copy)]
struct StoreMeta {
    rule: Option<usize>,
    bytes: u64,
    sent_ms: u64,
    timeout_ms: u32,
}

/// (client, rule, completion?) of a `tollgate_tokens_total` series.
type TokenSeries = (usize, Option<usize>, bool);

impl Plugin {
    fn model_label(&self, rule: Option<usize>) -> &str {
        match (&self.config.mode, rule) {
            (Mode::Routed(r), Some(i)) => r.rules.get(i).map_or("", |r| r.pattern.as_str()),
            _ => metrics::DEFAULT_MODEL,
        }
    }

    fn count_tokens(&self, client: usize, rule: Option<usize>, completion: bool, n: u64) {
        if n == 0 {
            return;
        }
        let id = lazy_metric(&self.tokens, (client, rule, completion), || {
            let name = self.config.client(client).map_or("", |c| c.name.as_str());
            let kind = if completion { "completion" } else { "prompt" };
            host::define_counter(&metrics::tokens_total(name, self.model_label(rule), kind))
        });
        if let Some(id) = id {
            host::increment_by(id, n);
        }
    }

    /// Records a duration (ms) in `tollgate_request_duration_ms` or, for `first_byte`,
    /// `tollgate_stream_first_byte_ms`.
    fn record_timing(&self, rule: Option<usize>, first_byte: bool, ms: u64) {
        let id = lazy_metric(&self.timings, (rule, first_byte), || {
            let model = self.model_label(rule);
            host::define_histogram(&if first_byte {
                metrics::stream_first_byte_ms(model)
            } else {
                metrics::request_duration_ms(model)
            })
        });
        if let Some(id) = id {
            host::record(id, ms);
        }
    }

    /// Adds `n` to a `tollgate_cache_*` counter (`reason` is ignored by the series without one).
    fn cache_count(
        &self,
        metric: CacheMetric,
        rule: Option<usize>,
        backend: Backend,
        reason: &'static str,
        n: u64,
    ) {
        let reason = if metric.has_reason() { reason } else { "" };
        let id = lazy_metric(&self.cache_metrics, (metric, rule, backend, reason), || {
            host::define_counter(&metrics::cache_total(
                metric,
                backend.name(),
                self.model_label(rule),
                reason,
            ))
        });
        if let Some(id) = id {
            host::increment_by(id, n);
        }
    }

    fn cache_error(&self, rule: Option<usize>, backend: Backend, e: &cache::Error) {
        warn!(
            "response cache ({}) failed: {}; the request goes on as a miss",
            backend.name(),
            e.reason()
        );
        self.cache_count(CacheMetric::Errors, rule, backend, e.reason(), 1);
    }

    /// Queues a Redis store for the root context's next tick: a store sent from the request's
    /// own context would be cancelled when the stream ends, which is right after its last byte.
    fn queue_store(&self, rule: Option<usize>, entry: &cache::Entry, ttl_s: u32) {
        let Some(redis) = &self.config.cache.redis else {
            return;
        };
        let mut queue = self.cache_queue.borrow_mut();
        if queue.len() + self.cache_in_flight.borrow().len() >= MAX_PENDING_STORES {
            drop(queue);
            self.cache_error(rule, Backend::Redis, &cache::Error::Overloaded);
            return;
        }
        queue.push_back(QueuedStore {
            call: request::webdis_call(redis, cache::set_command(entry, ttl_s)),
            meta: StoreMeta {
                rule,
                bytes: entry.body.len() as u64,
                sent_ms: 0,
                timeout_ms: redis.timeout_ms,
            },
        });
    }

    /// Sends the queued Redis stores (root context, on its tick).
    fn send_stores(&self) {
        let queued: Vec<QueuedStore> = self.cache_queue.borrow_mut().drain(..).collect();
        let now = host::now_ms().unwrap_or(0);
        for QueuedStore { call, mut meta } in queued {
            match host::dispatch(&call) {
                Ok(token) => {
                    meta.sent_ms = now;
                    self.cache_in_flight.borrow_mut().insert(token, meta);
                }
                Err(e) => {
                    error!("cannot call Webdis to store a response: {e}");
                    let failed = cache::Error::Redis(ReplyError::Unavailable);
                    self.cache_error(meta.rule, Backend::Redis, &failed);
                }
            }
        }
    }

    /// Sends the token adjustments queued for the Redis limiter (root context), one script call
    /// per batch of keys. Not retried: a timed-out call may have been applied, and a second one
    /// would charge twice; a lost adjustment leaves the estimate counted until the window ends.
    fn send_settlements(&self) {
        let LimiterBackend::Redis(redis) = &self.config.limiter else {
            return;
        };
        let commands = {
            let mut queue = self.settlements.borrow_mut();
            if queue.is_empty() {
                return;
            }
            queue.drain_commands()
        };
        for body in commands {
            let call = request::webdis_call(&redis.webdis, body);
            if let Err(e) = host::dispatch(&call) {
                warn!("cannot send token settlements to the Redis limiter: {e}");
                self.metrics.limiter_error(&LimiterFailure {
                    backend: "redis",
                    reason: ReplyError::Unavailable.reason(),
                });
            }
        }
    }

    /// Counts Webdis's answer to a store (root context); false when `token` is not a store's.
    fn on_store_reply(&self, token: u32, num_headers: usize) -> bool {
        let Some(meta) = self.cache_in_flight.borrow_mut().remove(&token) else {
            return false;
        };
        let status = callout_status(num_headers);
        let body = host::call_response_body(MAX_STORE_REPLY_BYTES).unwrap_or_default();
        let now = host::now_ms().unwrap_or(0);
        match cache::parse_set_reply(status, &body) {
            Ok(()) => {
                self.cache_count(CacheMetric::Stores, meta.rule, Backend::Redis, "", 1);
                self.cache_count(
                    CacheMetric::StoredBytes,
                    meta.rule,
                    Backend::Redis,
                    "",
                    meta.bytes,
                );
            }
            Err(e) => {
                let e = timed_out(e, now, meta.sent_ms, meta.timeout_ms);
                self.cache_error(meta.rule, Backend::Redis, &e);
            }
        }
        true
    }
}

/// The `:status` of a callout's answer; `None` when Envoy called back without headers.
fn callout_status(num_headers: usize) -> Option<u16> {
    if num_headers == 0 {
        return None;
    }
    match host::header(Map::CallResponse, ":status") {
        Ok(Some(v)) => std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()),
        _ => None,
    }
}

/// Envoy reports a timed-out callout like any failed one; the clock tells them apart.
fn timed_out(e: cache::Error, now_ms: u64, sent_ms: u64, timeout_ms: u32) -> cache::Error {
    match e {
        cache::Error::Redis(r) => cache::Error::Redis(webdis::timed_out(
            r,
            now_ms.saturating_sub(sent_ms),
            timeout_ms,
        )),
        other => other,
    }
}

/// The id of a metric defined on first use: from `cache`, else defined and cached. Label sets
/// are bounded by the configuration, so the caches are too.
fn lazy_metric<K: Eq + std::hash::Hash>(
    cache: &RefCell<HashMap<K, u32>>,
    key: K,
    define: impl FnOnce() -> Result<u32, HostError>,
) -> Option<u32> {
    if let Some(&id) = cache.borrow().get(&key) {
        return Some(id);
    }
    match define() {
        Ok(id) => {
            cache.borrow_mut().insert(key, id);
            Some(id)
        }
        Err(e) => {
            warn!("cannot define a metric: {e}");
            None
        }
    }
}

/// How a response is read for its token usage.
enum UsageReader {
    /// A JSON body, copied up to `MAX_USAGE_BODY_BYTES`.
    Json(Vec<u8>),
    /// A Server-Sent Events stream, read event by event as it passes.
    Sse(SseUsage),
}

/// The upstream role: prepares each attempt on the clusters the model routes use.
struct UpstreamPlugin {
    config: Config,
    /// `[rule][position]` attempts, and the default route's.
    attempts: Vec<Vec<u32>>,
    default_attempts: Option<u32>,
    /// `[rule][position]` fallbacks into that position (`None` at position 0).
    fallbacks: Vec<Vec<Option<u32>>>,
    /// `tollgate_upstream_errors_total` ids by (provider, status), defined on first use.
    errors: RefCell<HashMap<(ProviderId, u16), u32>>,
}

impl UpstreamPlugin {
    fn new(config: Config) -> Result<Self, String> {
        let Mode::Routed(routing) = &config.mode else {
            return Err(
                "runs as an upstream filter but the configuration has no `providers`".into(),
            );
        };
        let counter = |name: String| host::define_counter(&name).map_err(|e| e.to_string());
        let mut attempts = Vec::with_capacity(routing.rules.len());
        let mut fallbacks = Vec::with_capacity(routing.rules.len());
        for rule in &routing.rules {
            let model = rule.pattern.as_str();
            let mut per_position = Vec::new();
            let mut fb = Vec::new();
            for (k, t) in rule.targets.iter().enumerate() {
                let name = provider_name(routing, t.provider);
                per_position.push(counter(metrics::upstream_requests_total(name, model))?);
                fb.push(match k.checked_sub(1).and_then(|j| rule.targets.get(j)) {
                    Some(prev) => Some(counter(metrics::fallbacks_total(
                        model,
                        provider_name(routing, prev.provider),
                        name,
                    ))?),
                    None => None,
                });
            }
            attempts.push(per_position);
            fallbacks.push(fb);
        }
        let default_attempts = match routing.default_provider {
            Some(p) => Some(counter(metrics::upstream_requests_total(
                provider_name(routing, p),
                metrics::DEFAULT_MODEL,
            ))?),
            None => None,
        };
        Ok(Self {
            attempts,
            default_attempts,
            fallbacks,
            errors: RefCell::new(HashMap::new()),
            config,
        })
    }

    fn routing(&self) -> Option<&Routing> {
        match &self.config.mode {
            Mode::Routed(r) => Some(r),
            Mode::Single(_) => None,
        }
    }

    fn record(&self, attempt: &upstream::Attempt) {
        let Some(rule) = attempt.rule else {
            if attempt.provider.is_some() {
                if let Some(id) = self.default_attempts {
                    host::increment(id);
                }
            }
            return;
        };
        if let Some(&id) = self
            .attempts
            .get(rule)
            .and_then(|r| r.get(attempt.position))
        {
            host::increment(id);
        }
        if let Some(Some(id)) = self
            .fallbacks
            .get(rule)
            .and_then(|r| r.get(attempt.position))
        {
            host::increment(*id);
        }
    }
}

impl UpstreamPlugin {
    fn count_error(&self, provider: ProviderId, status: u16) {
        let Some(routing) = self.routing() else {
            return;
        };
        let id = lazy_metric(&self.errors, (provider, status), || {
            host::define_counter(&metrics::upstream_errors_total(
                provider_name(routing, provider),
                status,
            ))
        });
        let Some(id) = id else {
            return;
        };
        host::increment(id);
    }
}

fn provider_name(routing: &Routing, id: ProviderId) -> &str {
    routing.providers.get(id).map_or("", |p| p.name.as_str())
}

/// Which role this plugin instance has.
enum Role {
    /// On the listener: authenticate, limit, route.
    Gateway(Rc<Plugin>),
    /// On a provider cluster: prepare each attempt for that provider.
    Upstream(Rc<UpstreamPlugin>),
}

/// Counter ids, defined once per configuration so the request path never builds a name.
struct MetricIds {
    /// `[outcome]` ids of configured clients, defined on a client's first request: defining
    /// five counters for every client up front costs each VM (and Envoy's stats store) time and
    /// memory in proportion to every client configured, not to those seen (issue 23).
    requests: RefCell<HashMap<usize, [Option<u32>; 5]>>,
    /// Requests without a known client: `[outcome]`.
    anonymous: [u32; 5],
    /// `(backend, reason, id)` for every limiter failure this configuration can meet.
    limiter_errors: Vec<(&'static str, &'static str, u32)>,
}

impl MetricIds {
    fn define(config: &Config) -> Result<Self, HostError> {
        let per_outcome = |client: &str| -> Result<[u32; 5], HostError> {
            let mut ids = [0u32; 5];
            for (slot, outcome) in ids.iter_mut().zip(Outcome::ALL) {
                *slot = host::define_counter(&metrics::requests_total(client, outcome))?;
            }
            Ok(ids)
        };
        // The local limiter runs in every mode (as the Redis fallback too).
        let mut failures: Vec<(&'static str, &'static str)> =
            [LimiterError::Contention, LimiterError::Store]
                .iter()
                .map(|e| ("local", e.reason()))
                .collect();
        if let LimiterBackend::Redis(_) = config.limiter {
            failures.extend(ReplyError::REASONS.iter().map(|r| ("redis", *r)));
            // Token settlements refused by a full queue (Redis unreachable for long).
            failures.push(("redis", "queue_full"));
        }
        let limiter_errors = failures
            .into_iter()
            .map(|(backend, reason)| {
                host::define_counter(&metrics::limiter_errors_total(backend, reason))
                    .map(|id| (backend, reason, id))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            requests: RefCell::new(HashMap::new()),
            anonymous: per_outcome(ANONYMOUS)?,
            limiter_errors,
        })
    }

    fn request(&self, config: &Config, client: Option<usize>, outcome: Outcome) {
        let Some((c, name)) = client.and_then(|c| config.client(c).map(|k| (c, &k.name))) else {
            if let Some(&id) = self.anonymous.get(outcome.index()) {
                host::increment(id);
            }
            return;
        };
        let known = self
            .requests
            .borrow()
            .get(&c)
            .and_then(|row| row.get(outcome.index()).copied().flatten());
        let id = match known {
            Some(id) => id,
            None => match host::define_counter(&metrics::requests_total(name, outcome)) {
                Ok(id) => {
                    let mut map = self.requests.borrow_mut();
                    let row = map.entry(c).or_insert([None; 5]);
                    if let Some(slot) = row.get_mut(outcome.index()) {
                        *slot = Some(id);
                    }
                    id
                }
                Err(e) => {
                    warn!("cannot define a metric: {e}");
                    return;
                }
            },
        };
        host::increment(id);
    }

    fn limiter_error(&self, f: &LimiterFailure) {
        let found = self
            .limiter_errors
            .iter()
            .find(|(b, r, _)| *b == f.backend && *r == f.reason);
        if let Some((_, _, id)) = found {
            host::increment(*id);
        }
    }
}

/// The plugin's root context: one per plugin instance and VM (each worker, and the main thread).
#[derive(Default)]
pub struct Root {
    role: Option<Role>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(Role::Gateway(plugin)) = &self.role else {
            return;
        };
        // The root context's callouts: the response cache's stores, and token settlements.
        if plugin.on_store_reply(token, num_headers) {
            return;
        }
        let status = callout_status(num_headers);
        let body = host::call_response_body(MAX_LIMITER_REPLY_BYTES).unwrap_or_default();
        if let Err(e) = webdis::parse_settle_reply(status, &body) {
            warn!(
                "token settlements not applied in Redis ({}); the estimates stay counted",
                e.reason()
            );
            plugin.metrics.limiter_error(&LimiterFailure {
                backend: "redis",
                reason: e.reason(),
            });
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match host::plugin_configuration() {
            Ok(b) => b,
            Err(e) => {
                error!("cannot read the plugin configuration: {e}");
                return false;
            }
        };
        let config = match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(e) => {
                // Envoy then refuses the plugin; this line is what the operator reads.
                error!("invalid plugin configuration: {e}");
                return false;
            }
        };
        let root_id = host::property(&["plugin_root_id"])
            .ok()
            .flatten()
            .unwrap_or_default();
        if root_id == UPSTREAM_ROOT_ID {
            return match UpstreamPlugin::new(config) {
                Ok(p) => {
                    info!("configured: upstream filter (provider keys, hosts, model names)");
                    self.role = Some(Role::Upstream(Rc::new(p)));
                    true
                }
                Err(e) => {
                    error!("invalid plugin configuration: {e}");
                    false
                }
            };
        }
        let metrics = match MetricIds::define(&config) {
            Ok(m) => m,
            Err(e) => {
                error!("cannot define metrics: {e}");
                return false;
            }
        };
        // Create every client's limit record now, before workers take traffic with this
        // configuration (see `limiter::ensure_record`).
        let redis_tokens = matches!(config.limiter, LimiterBackend::Redis(_))
            && config.clients.iter().any(|c| c.tokens_per_minute.is_some());
        for client in &config.clients {
            let mut keys = vec![limiter::requests_key(client)];
            if client.tokens_per_minute.is_some() {
                keys.push(limiter::tokens_key(client));
            }
            for key in keys {
                if limiter::ensure_record(&SharedData, &key).is_err() {
                    warn!("cannot create the limit record {key}");
                }
            }
        }
        info!(
            "configured: {} clients, limiter {}, {}",
            config.clients.len(),
            config.limiter.name(),
            match &config.mode {
                Mode::Single(_) => "one provider".to_string(),
                Mode::Routed(r) => format!(
                    "{} providers, {} model rules",
                    r.providers.len(),
                    r.rules.len()
                ),
            }
        );
        // Each worker's root context sends its queued Redis stores on a timer.
        let redis_cache = config.cache.uses(Backend::Redis);
        self.role = Some(Role::Gateway(Rc::new(Plugin {
            config,
            metrics,
            tokens: RefCell::new(HashMap::new()),
            timings: RefCell::new(HashMap::new()),
            settlements: RefCell::new(Settlements::default()),
            cache_metrics: RefCell::new(HashMap::new()),
            cache_queue: RefCell::new(VecDeque::new()),
            cache_in_flight: RefCell::new(HashMap::new()),
        })));
        if redis_cache || redis_tokens {
            if let Err(e) = host::set_tick_period_ms(ROOT_TICK_MS) {
                error!("cannot start the timer that sends cache stores and token settlements: {e}");
                return false;
            }
        }
        true
    }

    fn on_tick(&mut self) {
        if let Some(Role::Gateway(p)) = &self.role {
            p.send_stores();
            p.send_settlements();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Some(Role::Upstream(p)) => Some(Box::new(AttemptContext {
                plugin: p.clone(),
                rename: None,
                provider: None,
            })),
            Some(Role::Gateway(p)) => Some(Box::new(Request::new(Some(p.clone())))),
            None => Some(Box::new(Request::new(None))),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP request.
struct Request {
    plugin: Option<Rc<Plugin>>,
    /// Waiting for the body (model routing).
    awaiting: Option<AwaitBody>,
    /// Waiting for the Redis limiter's reply.
    pending: Option<(u32, Pending)>,
    /// The client's window after admission, for the response headers.
    window: Option<Window>,
    /// The filter answered this request itself; leave the response alone.
    replied: bool,
    /// Tollgate decided to forward this request and rewrote it: later request callbacks
    /// continue. Until then every callback pauses.
    forwarded: bool,
    /// The admitted client and the rule that routed the request, for usage.
    client: Option<usize>,
    rule: Option<usize>,
    /// Reading the response for token usage.
    usage: Option<UsageReader>,
    /// The gateway asked for the stream's usage chunk: take it out of the response.
    strip_usage_chunk: bool,
    /// Tokens reserved at admission, settled when the stream ends.
    tokens: Option<TokenReservation>,
    /// When the request's headers arrived (Unix ms), for the duration histograms.
    started_ms: Option<u64>,
    /// Usage the response reported, and whether it was a success (2xx).
    used: Option<Usage>,
    succeeded: bool,
    /// Content chunks of a finished stream (see `SseUsage::chunks`).
    stream_chunks: Option<u64>,
    /// `x-tollgate-cache` for the forwarded response (`miss` or `bypass`).
    cache_header: Option<&'static str>,
    /// A response being copied, to be stored when it completes.
    cache_store: Option<CacheStore>,
    /// Waiting for a Redis lookup: the callout token and what to do with the answer.
    cache_wait: Option<(u32, CacheWait)>,
}

/// A response on its way to the cache.
struct CacheStore {
    plan: cache::Plan,
    rule: Option<usize>,
    /// Status and content type, once the response headers were found storable.
    head: Option<(u16, Vec<u8>)>,
    body: Vec<u8>,
}

/// An admitted request waiting for the Redis lookup.
struct CacheWait {
    forward: Forward,
    client: Option<usize>,
    outcome: Outcome,
    plan: cache::Plan,
    sent_ms: u64,
}

/// What a cache lookup did with an admitted request.
enum Lookup {
    /// Send it upstream.
    Forward(Forward),
    /// Answered from the cache.
    Answered(Action),
    /// Waiting for Redis; the request is paused.
    Waiting,
}

impl Context for Request {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some((expected, wait)) = self.cache_wait.take() {
            if token != expected {
                warn!("unexpected callout token {token}");
            }
            if let Some(plugin) = self.plugin.clone() {
                self.on_cache_reply(&plugin, wait, num_headers);
            }
            return;
        }
        let (Some(plugin), Some((expected, pending))) = (self.plugin.clone(), self.pending.take())
        else {
            return;
        };
        if token != expected {
            warn!("unexpected callout token {token}");
        }
        // No headers: Envoy could not get an answer (refused, reset, timed out).
        let status = callout_status(num_headers);
        let body = host::call_response_body(MAX_LIMITER_REPLY_BYTES).unwrap_or_default();
        let now = host::now_ms().unwrap_or(0);
        let step =
            request::on_limiter_reply(&plugin.config, pending, status, &body, now, &SharedData);
        if self.finish(&plugin, step) == Action::Continue {
            if let Err(e) = host::resume_request() {
                error!("cannot resume the request: {e}");
            }
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(plugin) = self.plugin.clone() else {
            // on_configure failed, so Envoy should not have created us; refuse rather than
            // forward a request nobody authenticated.
            error!("request without a configuration");
            return self.reply(&openai::internal_error());
        };
        let (headers, now) = match (host::headers(Map::Request), host::now_ms()) {
            (Ok(headers), Ok(now)) => (headers, now),
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot read the request: {e}");
                plugin.metrics.request(&plugin.config, None, Outcome::Error);
                return self.reply(&openai::internal_error());
            }
        };
        self.started_ms = Some(now);
        // Credentials, x-tollgate-*, x-envoy-* and every other header a provider must not see go
        // now, before anything is decided or paused.
        for name in request::strip_list(&plugin.config, &headers) {
            if let Err(e) = host::remove_header(Map::Request, &name) {
                error!("cannot remove a request header: {e}");
                plugin.metrics.request(&plugin.config, None, Outcome::Error);
                return self.reply(&openai::internal_error());
            }
        }
        let start =
            request::on_request_headers(&plugin.config, &headers, end_of_stream, now, &SharedData);
        match start {
            // No body will follow (a POST without one): decide on the empty body now, or the
            // request would wait for a body callback that never comes.
            Start::ReadBody(awaiting) if end_of_stream => {
                let start =
                    request::on_request_body(&plugin.config, awaiting, b"", now, &SharedData);
                self.proceed(&plugin, start)
            }
            start => self.proceed(&plugin, start),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(plugin), Some(awaiting)) = (self.plugin.clone(), self.awaiting.take()) else {
            // Forwarded: the rest of the body follows. Otherwise the request is waiting for
            // a callout, answered, or was never decided: nothing may go upstream.
            return self.after_decision();
        };
        if body_size > awaiting.max_bytes {
            plugin
                .metrics
                .request(&plugin.config, None, Outcome::Invalid);
            return self.reply(&openai::body_too_large(awaiting.max_bytes));
        }
        if !end_of_stream {
            // Envoy buffers the body until the end of the stream (or its trailers).
            self.awaiting = Some(awaiting);
            return Action::Pause;
        }
        self.decide_on_body(&plugin, awaiting, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the request: a body being read is complete now. Envoy's default for
        // this callback is to continue, which would forward a request nobody decided.
        match (self.plugin.clone(), self.awaiting.take()) {
            (Some(plugin), Some(awaiting)) => {
                let size = awaiting.max_bytes.saturating_add(1);
                self.decide_on_body(&plugin, awaiting, size)
            }
            _ => self.after_decision(),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.replied {
            return Action::Continue;
        }
        // One read of the whole map: status, content type, and the headers to remove.
        let headers = match host::headers(Map::Response) {
            Ok(h) => h,
            Err(e) => {
                // The provider's account headers could reach the client: do not let them.
                error!("cannot read the response headers: {e}; resetting the stream");
                let _ = host::reset_request();
                return Action::Pause;
            }
        };
        let head = request::ResponseHead::read(&headers);
        self.cache_response_headers(&head);
        let (remove, set) =
            request::response_edits(&headers, self.window.as_ref(), self.tokens.as_ref());
        for name in remove {
            if let Err(e) = host::remove_header(Map::Response, name.as_bytes()) {
                warn!("cannot remove response header {name}: {e}");
            }
        }
        for (name, value) in set {
            if let Err(e) = host::replace_header(Map::Response, name, &value) {
                warn!("cannot set response header {name}: {e}");
            }
        }
        if self.client.is_some() {
            self.succeeded = head.succeeded();
            let streaming = head.is_sse();
            if let (true, Some(plugin), Some(start), Ok(now)) =
                (streaming, &self.plugin, self.started_ms, host::now_ms())
            {
                plugin.record_timing(self.rule, true, now.saturating_sub(start));
            }
            self.usage = if streaming {
                Some(UsageReader::Sse(if self.strip_usage_chunk {
                    SseUsage::stripping_usage_chunk()
                } else {
                    SseUsage::default()
                }))
            } else if head.is_json() {
                Some(UsageReader::Json(Vec::new()))
            } else {
                None
            };
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Never Pause here: a stream must reach the client as it arrives.
        self.cache_response_body(body_size, end_of_stream);
        let Some(reader) = self.usage.as_mut() else {
            return Action::Continue;
        };
        if body_size > 0 || end_of_stream {
            match host::response_body_chunk(body_size) {
                Ok(chunk) => match reader {
                    UsageReader::Sse(sse) if self.strip_usage_chunk => {
                        let mut out = sse.push_filtered(&chunk);
                        if end_of_stream {
                            out.extend(sse.finish_filtered());
                        }
                        if out != chunk {
                            if let Err(e) = host::replace_response_body_chunk(chunk.len(), &out) {
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
                        body.extend_from_slice(&chunk);
                    }
                },
                Err(e) => {
                    debug!("cannot read the response body: {e}");
                    self.usage = None;
                    return Action::Continue;
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
                Some(UsageReader::Json(body)) => usage::from_json(&body),
                None => None,
            };
            if let Some(u) = found {
                self.record_usage(u);
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the response: a body copied for the cache is complete now.
        self.cache_response_body(0, true);
        Action::Continue
    }

    fn on_log(&mut self) {
        if let (Some(plugin), Some((_, wait))) = (&self.plugin, self.cache_wait.take()) {
            // Gone while the Redis lookup was out: count it, and give its tokens back below.
            plugin
                .metrics
                .request(&plugin.config, wait.client, wait.outcome);
            self.client = wait.client;
            self.tokens = wait.forward.tokens;
        }
        if let (Some(plugin), Some(store)) = (&self.plugin, self.cache_store.take()) {
            // The response never reached its end of stream (reset, client gone).
            let skip = Skip::Incomplete.reason();
            plugin.cache_count(CacheMetric::Skips, store.rule, store.plan.backend, skip, 1);
        }
        if let (Some(plugin), Some(_), Some(start), Ok(now)) =
            (&self.plugin, self.client, self.started_ms, host::now_ms())
        {
            plugin.record_timing(self.rule, false, now.saturating_sub(start));
        }
        // The stream is over (complete, failed or reset): replace the token estimate by what
        // was used, once (the reservation is taken).
        let (Some(plugin), Some(client), Some(t)) = (&self.plugin, self.client, self.tokens.take())
        else {
            return;
        };
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
        match request::settle_tokens(&plugin.config, client, &t, delivered, &SharedData) {
            Ok(None) => {}
            Ok(Some((key, delta))) => {
                if !plugin.settlements.borrow_mut().add(key, delta) {
                    warn!("token settlement queue full; the estimate stays counted");
                    plugin.metrics.limiter_error(&LimiterFailure {
                        backend: "redis",
                        reason: "queue_full",
                    });
                }
            }
            Err(e) => {
                warn!(
                    "cannot settle token usage ({}); the estimate stays counted",
                    e.reason()
                );
                plugin.metrics.limiter_error(&LimiterFailure {
                    backend: "local",
                    reason: e.reason(),
                });
            }
        }
    }
}

impl Request {
    fn new(plugin: Option<Rc<Plugin>>) -> Self {
        Self {
            plugin,
            awaiting: None,
            pending: None,
            window: None,
            replied: false,
            forwarded: false,
            client: None,
            rule: None,
            usage: None,
            strip_usage_chunk: false,
            tokens: None,
            started_ms: None,
            used: None,
            succeeded: false,
            stream_chunks: None,
            cache_header: None,
            cache_store: None,
            cache_wait: None,
        }
    }

    /// Records a response's usage: token counters and the access log's filter state.
    fn record_usage(&mut self, usage: Usage) {
        self.used = Some(usage);
        let (Some(plugin), Some(client)) = (&self.plugin, self.client) else {
            return;
        };
        plugin.count_tokens(client, self.rule, false, usage.prompt_tokens);
        plugin.count_tokens(client, self.rule, true, usage.completion_tokens);
        for (name, n) in [
            ("tollgate_prompt_tokens", usage.prompt_tokens),
            ("tollgate_completion_tokens", usage.completion_tokens),
        ] {
            if let Err(e) = host::set_property(name, n.to_string().as_bytes()) {
                debug!("cannot set {name}: {e}");
            }
        }
    }

    /// The answer of a request callback once the headers were handled: continue only a request
    /// that was forwarded; anything else (waiting, answered, undecided) stays paused.
    fn after_decision(&self) -> Action {
        if self.forwarded {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    /// The whole body is buffered (at most `max` bytes are read): decide on it.
    fn decide_on_body(&mut self, plugin: &Rc<Plugin>, awaiting: AwaitBody, max: usize) -> Action {
        let body = match host::request_body(max) {
            Ok(b) => b,
            Err(e) => {
                error!("cannot read the request body: {e}");
                plugin.metrics.request(&plugin.config, None, Outcome::Error);
                return self.reply(&openai::internal_error());
            }
        };
        let now = match host::now_ms() {
            Ok(now) => now,
            Err(e) => {
                error!("cannot read the clock: {e}");
                plugin.metrics.request(&plugin.config, None, Outcome::Error);
                return self.reply(&openai::internal_error());
            }
        };
        let start = request::on_request_body(&plugin.config, awaiting, &body, now, &SharedData);
        self.proceed(plugin, start)
    }

    /// Carries out the core's next step for this request.
    fn proceed(&mut self, plugin: &Rc<Plugin>, start: Start) -> Action {
        match start {
            Start::Done(step) => self.finish(plugin, step),
            Start::ReadBody(awaiting) => {
                self.awaiting = Some(awaiting);
                Action::Pause
            }
            Start::AskLimiter(pending) => {
                match host::dispatch(&pending.call) {
                    Ok(token) => {
                        self.pending = Some((token, pending));
                        Action::Pause
                    }
                    Err(e) => {
                        // An unknown cluster or a bad callout: the limiter is unavailable.
                        error!("cannot call the Redis limiter: {e}");
                        let now = host::now_ms().unwrap_or(0);
                        let step = request::on_limiter_reply(
                            &plugin.config,
                            pending,
                            None,
                            b"",
                            now,
                            &SharedData,
                        );
                        self.finish(plugin, step)
                    }
                }
            }
        }
    }

    /// Applies a decision: records its metrics, then answers or rewrites the request.
    /// Returns Continue when the request may go upstream.
    fn finish(&mut self, plugin: &Plugin, step: Step) -> Action {
        for f in &step.limiter_errors {
            warn!(
                "{} limiter failed ({}); handled by its failure policy",
                f.backend, f.reason
            );
            plugin.metrics.limiter_error(f);
        }
        if let Some(why) = step.key_error {
            debug!("unauthorized: {why:?}");
        }
        let (action, outcome) = match step.decision {
            Decision::Reply(reply) => (self.reply(&reply), step.outcome),
            // Admitted (limits counted): the cache may answer it before it goes upstream.
            Decision::Forward(forward) => {
                match self.look_up(plugin, forward, step.client, step.outcome) {
                    Lookup::Forward(forward) => {
                        self.admit(plugin, forward, step.client, step.outcome)
                    }
                    Lookup::Answered(action) => (action, step.outcome),
                    // Counted when Redis answers.
                    Lookup::Waiting => return Action::Pause,
                }
            }
        };
        plugin.metrics.request(&plugin.config, step.client, outcome);
        action
    }

    /// Rewrites an admitted request for its trip upstream.
    fn admit(
        &mut self,
        plugin: &Plugin,
        forward: Forward,
        client: Option<usize>,
        outcome: Outcome,
    ) -> (Action, Outcome) {
        match apply(&forward) {
            Ok(()) => {
                self.forwarded = true;
                self.window = forward.window;
                self.client = client;
                self.rule = forward.rule;
                self.tokens = forward.tokens;
                self.strip_usage_chunk = forward.strip_usage_chunk;
                record_client(plugin, client, forward.rule);
                (Action::Continue, outcome)
            }
            Err(e) => {
                // Never forward a request whose client key may still be on it.
                error!("cannot rewrite request headers: {e}");
                self.cache_store = None;
                (self.reply(&openai::internal_error()), Outcome::Error)
            }
        }
    }

    /// Sends a local reply; if even that fails, resets the stream so nothing goes upstream.
    fn reply(&mut self, reply: &LocalReply) -> Action {
        self.replied = true;
        if let Err(e) = host::send_json_reply(reply.status, &reply.headers, &reply.body) {
            error!("cannot send a local reply: {e}; resetting the stream");
            let _ = host::reset_request();
        }
        Action::Pause
    }
}

/// Names the client and the model rule for the access log
/// (`%FILTER_STATE(wasm.tollgate_client:PLAIN)%`).
fn record_client(plugin: &Plugin, client: Option<usize>, rule: Option<usize>) {
    let Some(client) = client.and_then(|c| plugin.config.client(c)) else {
        return;
    };
    let model = plugin.model_label(rule).to_string();
    for (name, value) in [
        ("tollgate_client", client.name.as_str()),
        ("tollgate_model", &model),
    ] {
        if let Err(e) = host::set_property(name, value.as_bytes()) {
            debug!("cannot set {name}: {e}");
        }
    }
}

/// The response cache's part of a request: look up after admission, answer a hit, copy a
/// miss's response as it passes and store it at its end. Every failure is a miss.
impl Request {
    fn look_up(
        &mut self,
        plugin: &Plugin,
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
                plugin.cache_count(CacheMetric::Skips, rule, backend, reason.reason(), 1);
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
            plugin.cache_count(CacheMetric::Skips, rule, backend, Skip::NoStore.reason(), 1);
        }
        if !plan.lookup {
            plugin.cache_count(CacheMetric::Skips, rule, backend, Skip::NoCache.reason(), 1);
            self.cache_header = Some("bypass");
            return Lookup::Forward(forward);
        }
        self.cache_header = Some("miss");
        let now = host::now_ms().unwrap_or(0);
        match (
            backend,
            plugin.config.cache.local,
            &plugin.config.cache.redis,
        ) {
            (Backend::Local, Some(layout), _) => {
                match cache::local_get(&SharedData, &layout, &plan.key, now) {
                    Ok(Some(entry)) => {
                        return Lookup::Answered(
                            self.serve_hit(plugin, forward, client, backend, entry, now),
                        )
                    }
                    Ok(None) => {}
                    Err(e) => plugin.cache_error(rule, backend, &e),
                }
            }
            (Backend::Redis, _, Some(redis)) => {
                let call = request::webdis_call(redis, cache::get_command(&plan.key));
                match host::dispatch(&call) {
                    Ok(token) => {
                        self.cache_wait = Some((
                            token,
                            CacheWait {
                                forward,
                                client,
                                outcome,
                                plan,
                                sent_ms: now,
                            },
                        ));
                        return Lookup::Waiting;
                    }
                    Err(e) => {
                        error!("cannot call Webdis to look up a response: {e}");
                        let failed = cache::Error::Redis(ReplyError::Unavailable);
                        plugin.cache_error(rule, backend, &failed);
                    }
                }
            }
            // The configuration always has the backend its settings use.
            _ => {}
        }
        plugin.cache_count(CacheMetric::Misses, rule, backend, "", 1);
        Lookup::Forward(forward)
    }

    /// Webdis answered a lookup: a hit is answered here, anything else goes upstream.
    fn on_cache_reply(&mut self, plugin: &Plugin, wait: CacheWait, num_headers: usize) {
        let CacheWait {
            forward,
            client,
            outcome,
            plan,
            sent_ms,
        } = wait;
        let status = callout_status(num_headers);
        let max = plugin.config.cache.max_reply_bytes();
        let body = host::call_response_body(max).unwrap_or_default();
        let now = host::now_ms().unwrap_or(0);
        let timeout = plugin
            .config
            .cache
            .redis
            .as_ref()
            .map_or(0, |r| r.timeout_ms);
        let rule = forward.rule;
        let (action, outcome) = match cache::parse_get_reply(status, &body, &plan.key, now) {
            Ok(Some(entry)) => {
                let action = self.serve_hit(plugin, forward, client, plan.backend, entry, now);
                (action, outcome)
            }
            other => {
                if let Err(e) = other {
                    plugin.cache_error(rule, plan.backend, &timed_out(e, now, sent_ms, timeout));
                }
                plugin.cache_count(CacheMetric::Misses, rule, plan.backend, "", 1);
                self.admit(plugin, forward, client, outcome)
            }
        };
        plugin.metrics.request(&plugin.config, client, outcome);
        if action == Action::Continue {
            if let Err(e) = host::resume_request() {
                error!("cannot resume the request: {e}");
            }
        }
    }

    /// Answers an admitted request with a stored response: 200, its content type, the
    /// client's budget headers. A hit costs no tokens: the reservation is given back.
    fn serve_hit(
        &mut self,
        plugin: &Plugin,
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
        if let Some(w) = &forward.window {
            headers.extend(request::response_headers(w));
        }
        if let Some(t) = &forward.tokens {
            let mut refunded = t.clone();
            refunded.state.remaining = t
                .state
                .remaining
                .saturating_add(t.estimate.total())
                .min(t.state.limit);
            headers.extend(request::token_headers(&refunded));
        }
        self.replied = true;
        self.client = client;
        self.rule = rule;
        self.window = forward.window;
        self.tokens = forward.tokens;
        // Settled in on_log: zero tokens used.
        self.used = Some(Usage::default());
        self.succeeded = true;
        record_client(plugin, client, rule);
        plugin.cache_count(CacheMetric::Hits, rule, backend, "", 1);
        plugin.cache_count(
            CacheMetric::ServedBytes,
            rule,
            backend,
            "",
            entry.body.len() as u64,
        );
        debug!("answered from the response cache ({})", backend.name());
        if let Err(e) = host::send_reply(entry.status, &headers, &entry.body) {
            error!("cannot send a cached response: {e}; resetting the stream");
            let _ = host::reset_request();
        }
        Action::Pause
    }

    /// Response headers of a forwarded request: say what the cache did, and keep copying only
    /// a response that can be stored (a 200, not compressed, not a stream).
    fn cache_response_headers(&mut self, head: &request::ResponseHead) {
        if let Some(value) = self.cache_header {
            if let Err(e) = host::replace_header(Map::Response, CACHE_HEADER, value) {
                warn!("cannot set response header {CACHE_HEADER}: {e}");
            }
        }
        let (Some(plugin), Some(store)) = (&self.plugin, self.cache_store.as_mut()) else {
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
                plugin.cache_count(CacheMetric::Skips, rule, backend, skip.reason(), 1);
                self.cache_store = None;
            }
            None => store.head = Some((status, head.content_type.clone())),
        }
    }

    /// Copies the response body as it passes (bounded by `max_entry_bytes`; the client gets
    /// every byte as it arrives) and stores it at the end of the stream.
    fn cache_response_body(&mut self, body_size: usize, end_of_stream: bool) {
        let (Some(plugin), Some(store)) = (self.plugin.clone(), self.cache_store.as_mut()) else {
            return;
        };
        if store.head.is_none() {
            return;
        }
        if body_size > 0 {
            let skip = match host::response_body_chunk(body_size) {
                Ok(chunk) if store.body.len() + chunk.len() <= store.plan.max_entry_bytes => {
                    store.body.extend_from_slice(&chunk);
                    None
                }
                Ok(_) => Some(Skip::TooLarge),
                Err(e) => {
                    debug!("cannot read the response body for the cache: {e}");
                    Some(Skip::Incomplete)
                }
            };
            if let Some(skip) = skip {
                let (rule, backend) = (store.rule, store.plan.backend);
                plugin.cache_count(CacheMetric::Skips, rule, backend, skip.reason(), 1);
                self.cache_store = None;
                return;
            }
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
        let now = host::now_ms().unwrap_or(0);
        let entry = match cache::Entry::new(&plan, now, status, &content_type, body) {
            Ok(entry) => entry,
            Err(skip) => {
                plugin.cache_count(CacheMetric::Skips, rule, plan.backend, skip.reason(), 1);
                return;
            }
        };
        match (plan.backend, plugin.config.cache.local) {
            (Backend::Local, Some(layout)) => {
                match cache::local_put(&SharedData, &layout, &entry, now) {
                    Ok(()) => {
                        let bytes = entry.body.len() as u64;
                        plugin.cache_count(CacheMetric::Stores, rule, Backend::Local, "", 1);
                        plugin.cache_count(
                            CacheMetric::StoredBytes,
                            rule,
                            Backend::Local,
                            "",
                            bytes,
                        );
                    }
                    Err(e) => plugin.cache_error(rule, Backend::Local, &e),
                }
            }
            (Backend::Redis, _) => plugin.queue_store(rule, &entry, plan.ttl_s),
            (Backend::Local, None) => {}
        }
    }
}

fn apply(forward: &Forward) -> Result<(), HostError> {
    for (name, value) in &forward.set {
        host::replace_header(Map::Request, name, value)?;
    }
    if let Some(body) = &forward.body {
        // Called from the body callback, with the whole body buffered and the headers held.
        let size = host::request_body(usize::MAX).map(|b| b.len())?;
        host::replace_request_body(size, body)?;
        host::replace_header(Map::Request, "content-length", &body.len().to_string())?;
    }
    if forward.reroute {
        host::clear_route_cache()?;
    }
    Ok(())
}

/// Refuses an attempt the upstream role cannot prepare: it must not reach a provider without
/// that provider's credentials.
fn refuse_attempt(why: &str) -> Action {
    error!("upstream: {why}; refusing the attempt");
    let reply = openai::internal_error();
    if let Err(e) = host::send_json_reply(reply.status, &reply.headers, &reply.body) {
        error!("upstream: cannot send a local reply: {e}; resetting the stream");
        let _ = host::reset_request();
    }
    Action::Pause
}

impl AttemptContext {
    /// Renames the body's `model` for this attempt's provider (the body is complete).
    fn rename_model(&mut self, max: usize) -> Action {
        let Some(model) = self.rename.take() else {
            return Action::Continue;
        };
        let body = match host::request_body(max) {
            Ok(b) => b,
            Err(e) => return refuse_attempt(&format!("cannot read the body to rename: {e}")),
        };
        match body::replace_model(&body, &model) {
            Some(renamed) => {
                if let Err(e) = host::replace_request_body(body.len(), &renamed) {
                    return refuse_attempt(&format!("cannot replace the body: {e}"));
                }
                if let Err(e) =
                    host::replace_header(Map::Request, "content-length", &renamed.len().to_string())
                {
                    return refuse_attempt(&format!("cannot update content-length: {e}"));
                }
            }
            // The listener role read this body and found `model`; it cannot be missing here.
            None => return refuse_attempt("no top-level model to rename"),
        }
        Action::Continue
    }
}

/// One attempt to one provider (the upstream role).
struct AttemptContext {
    plugin: Rc<UpstreamPlugin>,
    /// The body's `model` must become this name before the attempt is sent.
    rename: Option<String>,
    /// The provider this attempt went to.
    provider: Option<ProviderId>,
}

impl Context for AttemptContext {}

impl HttpContext for AttemptContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(routing) = self.plugin.routing() else {
            return refuse_attempt("the configuration has no providers");
        };
        let headers = match host::headers(Map::Request) {
            Ok(h) => h,
            Err(e) => return refuse_attempt(&format!("cannot read request headers: {e}")),
        };
        let attempt = upstream::on_attempt_headers(routing, &headers);
        debug!(
            "attempt {} to {}: rule {:?}, rename {:?}",
            attempt.position + 1,
            attempt
                .provider
                .map_or("none", |p| provider_name(routing, p)),
            attempt.rule,
            attempt.rename_model
        );
        if attempt.provider.is_none() {
            // Only a request the listener role decided carries a route to a provider.
            return refuse_attempt("the request has no route chosen by Tollgate");
        }
        self.plugin.record(&attempt);
        self.provider = attempt.provider;
        for name in &attempt.remove {
            if let Err(e) = host::remove_header(Map::Request, name) {
                return refuse_attempt(&format!(
                    "cannot remove {}: {e}",
                    String::from_utf8_lossy(name)
                ));
            }
        }
        for (name, value) in &attempt.set {
            if let Err(e) = host::replace_header(Map::Request, name, value) {
                // Without its key and host the attempt must not leave.
                return refuse_attempt(&format!("cannot set {name}: {e}"));
            }
        }
        match attempt.rename_model {
            Some(model) if !end_of_stream => {
                self.rename = Some(model);
                Action::Pause
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.rename.is_none() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.rename_model(body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end the body: the rename happens now, or the attempt would leave with the
        // client's model name.
        if self.rename.is_none() {
            return Action::Continue;
        }
        self.rename_model(usize::MAX)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let status = host::header(Map::Response, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u16>().ok());
        if let (Some(provider), Some(status)) = (self.provider, status) {
            if status >= 400 {
                self.plugin.count_error(provider, status);
            }
        }
        Action::Continue
    }
}

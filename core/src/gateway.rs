//! What one VM keeps for the listener role: the compiled configuration, its metric ids, and the
//! work its root context does on a timer (Redis cache stores and token settlements, which a
//! request's own context cannot send: a callout made as a stream ends is cancelled with it).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};

use log::{debug, error, info, warn};
use sha2::{Digest as _, Sha256};

use crate::batch::Batch;
use crate::cache::{self, Backend};
use crate::config::{LimiterBackend, Mode};
use crate::host::{Callout, Host, HostError, Map};
use crate::lease;
use crate::limiter::{self, LimiterError};
use crate::metrics::{self, CacheMetric, Outcome, ANONYMOUS};
use crate::request::{self, LimiterFailure};
use crate::upstream::AttemptCounters;
use crate::webdis::{self, ReplyError, Settlements};
use crate::{Client, Config};

/// How often each worker's root context sends what its requests queued for Redis since its last
/// tick: response cache stores and token settlements.
pub const ROOT_TICK_MS: u32 = 100;

/// The root tick with quota leases: prefetches are sent on it, so it is short.
pub const LEASE_TICK_MS: u32 = 20;

/// With leases, idle and oversized leases are looked at every this many ticks (200 ms).
const RECLAIM_EVERY_TICKS: u32 = 10;

/// Prefetches queued or in flight per worker; more are dropped (the next admission asks again
/// once the mark is stale).
const MAX_PREFETCHES: usize = 1024;

/// Redis stores queued or in flight per worker; more are dropped (and counted), so a slow
/// Webdis cannot make the filter hold response copies without bound.
pub const MAX_PENDING_STORES: usize = 64;

/// Webdis's answers to checks and stores are a few dozen bytes; anything longer is not one.
pub const MAX_WEBDIS_REPLY_BYTES: usize = 4096;

/// The hasher of the metric-id maps the request path reads (no per-VM random keys needed: the
/// keys are the configuration's indexes, not anything a client chooses).
type FastHash = hashbrown::DefaultHashBuilder;

/// (metric, rule, backend, reason) of a `tollgate_cache_*` series.
type CacheSeries = (CacheMetric, Option<usize>, Backend, &'static str);

/// (client, rule, reason) of a `tollgate_refusals_total` series (`None`: no valid key; `Some(None)`
/// rule: one provider; `None` rule: no rule matched).
type RefusalSeries = (Option<usize>, Option<Option<usize>>, &'static str);

/// (client, rule, completion?) of a `tollgate_tokens_total` series.
type TokenSeries = (usize, Option<usize>, bool);

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

/// The listener role's state in one VM, shared by its requests.
pub struct Gateway {
    /// The compiled configuration.
    pub config: Config,
    metrics: MetricIds,
    /// Attempts, fallbacks and provider errors of model routing, counted from what the upstream
    /// role recorded (see `crate::upstream`).
    attempts: Option<AttemptCounters>,
    /// `tollgate_tokens_total` ids, defined on first use: the label set is bounded by the
    /// configuration, but defining every combination up front would not be.
    tokens: RefCell<HashMap<TokenSeries, u32, FastHash>>,
    /// `tollgate_spend_micros_total` ids by (client, price), defined on first use.
    spend: RefCell<HashMap<(usize, usize), u32, FastHash>>,
    /// `tollgate_refusals_total` ids, defined on first use.
    refusals: RefCell<HashMap<RefusalSeries, u32, FastHash>>,
    /// Histogram ids by (rule, first-byte?), defined on first use.
    timings: RefCell<HashMap<(Option<usize>, bool), u32, FastHash>>,
    /// Token adjustments for the Redis limiter, sent on the root tick.
    settlements: RefCell<Settlements>,
    /// `tollgate_cache_*` ids, defined on first use.
    cache_metrics: RefCell<HashMap<CacheSeries, u32, FastHash>>,
    /// Redis stores waiting for the root tick.
    cache_queue: RefCell<VecDeque<QueuedStore>>,
    /// Redis stores sent and not answered yet, by callout token.
    cache_in_flight: RefCell<HashMap<u32, StoreMeta>>,
    /// Quota leases (with `limiter.leases`).
    leases: Option<Leases>,
    /// Counter increments and local settlements written per batch, not per request.
    batch: RefCell<Batch>,
}

/// A worker's part of the quota leases (see [`lease`]): its circuit breaker, the prefetches
/// its root context sends, and the clients whose leases it looks after.
struct Leases {
    policy: crate::config::LeasePolicy,
    breaker: RefCell<lease::Breaker>,
    queue: RefCell<Vec<lease::Fetch>>,
    in_flight: RefCell<HashMap<u32, (lease::Fetch, u64)>>,
    /// Clients this worker fetched a lease for, with their Redis keys' middle part: their
    /// leases are reclaimed on the tick when idle.
    clients: RefCell<HashMap<usize, String>>,
    ticks: Cell<u32>,
    /// `[kind][outcome]` of `tollgate_lease_fetches_total`.
    fetches: [[Option<u32>; 3]; 2],
    /// Requests, tokens of `tollgate_lease_granted_total`.
    granted: [Option<u32>; 2],
    /// Requests, tokens of `tollgate_lease_returned_total`.
    returned: [Option<u32>; 2],
    /// Per [`lease::Transition::ALL`].
    breaker_ids: [Option<u32>; 3],
    /// Per [`lease::CALL_KINDS`].
    calls: [Option<u32>; 3],
}

impl Leases {
    fn define(host: &dyn Host, policy: crate::config::LeasePolicy) -> Self {
        let id = |name: String| match host.define_counter(&name) {
            Ok(id) => Some(id),
            Err(e) => {
                warn!("cannot define {name}: {e}");
                None
            }
        };
        let fetches = lease::FETCH_KINDS
            .map(|k| lease::FETCH_OUTCOMES.map(|o| id(lease::fetches_total(k, o))));
        Self {
            policy,
            breaker: RefCell::new(lease::Breaker::default()),
            queue: RefCell::new(Vec::new()),
            in_flight: RefCell::new(HashMap::new()),
            clients: RefCell::new(HashMap::new()),
            ticks: Cell::new(0),
            fetches,
            granted: ["requests", "tokens"].map(|k| id(lease::granted_total(k))),
            returned: ["requests", "tokens"].map(|k| id(lease::returned_total(k))),
            breaker_ids: lease::Transition::ALL.map(|t| id(lease::breaker_total(t.as_str()))),
            calls: lease::CALL_KINDS.map(|k| id(lease::calls_total(k))),
        }
    }

    fn count(host: &dyn Host, id: Option<u32>, n: u64) {
        if let (Some(id), true) = (id, n > 0) {
            host.increment(id, n);
        }
    }

    /// Adds `(requests, tokens)` to a counter pair by `kind` (granted, returned).
    fn count_kinds(
        host: &dyn Host,
        [requests_id, tokens_id]: [Option<u32>; 2],
        (requests, tokens): (u64, u64),
    ) {
        Self::count(host, requests_id, requests);
        Self::count(host, tokens_id, tokens);
    }

    fn fetched(&self, host: &dyn Host, blocking: bool, outcome: &str) {
        let kind = usize::from(!blocking);
        let i = lease::FETCH_OUTCOMES.iter().position(|o| *o == outcome);
        let id = i.and_then(|i| self.fetches.get(kind).and_then(|row| row.get(i)).copied());
        Self::count(host, id.flatten(), 1);
    }

    fn transition(&self, host: &dyn Host, t: Option<lease::Transition>) {
        let Some(t) = t else { return };
        match t {
            lease::Transition::Opened => warn!("Webdis failing: lease breaker open"),
            lease::Transition::HalfOpen => info!("lease breaker half open: one probe"),
            lease::Transition::Closed => info!("Webdis answers again: lease breaker closed"),
        }
        let i = lease::Transition::ALL.iter().position(|x| *x == t);
        Self::count(
            host,
            i.and_then(|i| self.breaker_ids.get(i).copied()).flatten(),
            1,
        );
    }

    fn call(&self, host: &dyn Host, kind: &str) {
        let i = lease::CALL_KINDS.iter().position(|k| *k == kind);
        Self::count(
            host,
            i.and_then(|i| self.calls.get(i).copied()).flatten(),
            1,
        );
    }
}

/// Shared data: the fingerprint ([`records_fingerprint`]) of the last set of client records a
/// VM of this Envoy created in full.
pub const RECORDS_ENSURED_KEY: &str = "tollgate.v2.records_ensured";

/// What identifies a set of client records: every record key, in order, with the form of the
/// keys (their prefixes) and whether lease records are part of it.
fn records_fingerprint(clients: &[Client], leases: bool) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tollgate records 1\0");
    h.update(limiter::BUDGET_KEY_PREFIX.as_bytes());
    h.update(b"\0");
    h.update(lease::LEASE_KEY_PREFIX.as_bytes());
    h.update([u8::from(leases)]);
    for client in clients {
        let name = client.name.as_bytes();
        h.update(u32::try_from(name.len()).unwrap_or(u32::MAX).to_le_bytes());
        h.update(name);
    }
    h.finalize().into()
}

/// Creates every client's limit record (and lease record), unless a VM of this Envoy already
/// created exactly this set: Envoy configures the main thread's VM first, so the workers' VMs
/// (and the main thread's second one) find the fingerprint it left and make one host call
/// instead of one or two per client, the largest part of a worker's configure at 100,000
/// clients (docs/scale.md). Records are never removed, so a set once created stays created.
/// The fingerprint is written only when every record was created: after a failure the next VM
/// tries them all again.
fn ensure_records(host: &dyn Host, clients: &[Client], leases: bool) {
    let fingerprint = records_fingerprint(clients, leases);
    if matches!(host.get(RECORDS_ENSURED_KEY), Ok(Some((v, _))) if v == fingerprint) {
        debug!("client records already created by another VM");
        return;
    }
    let mut complete = true;
    for client in clients {
        let key = limiter::budget_key(client);
        if limiter::ensure_record(host, &key).is_err() {
            warn!("cannot create the limit record {key}");
            complete = false;
        }
        if leases {
            let key = lease::lease_key(client);
            if lease::ensure_record(host, &key).is_err() {
                warn!("cannot create the lease record {key}");
                complete = false;
            }
        }
    }
    if complete && host.set(RECORDS_ENSURED_KEY, &fingerprint, 0).is_err() {
        warn!("cannot record that the client records exist (each VM will check them again)");
    }
}

impl Gateway {
    /// Builds the listener role from a compiled configuration: defines its metrics and creates
    /// every client's limit record, before workers take traffic with this configuration (see
    /// `limiter::ensure_record`).
    pub fn configure(host: &dyn Host, config: Config) -> Result<Self, HostError> {
        let metrics = MetricIds::define(host, &config)?;
        let attempts = match &config.mode {
            Mode::Routed(r) => Some(AttemptCounters::define(host, r)?),
            Mode::Single(_) => None,
        };
        let leases = match &config.limiter {
            LimiterBackend::Redis(r) => r.leases.map(|p| Leases::define(host, p)),
            LimiterBackend::Local => None,
        };
        ensure_records(host, &config.clients, leases.is_some());
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
        Ok(Self {
            config,
            metrics,
            attempts,
            tokens: RefCell::new(HashMap::default()),
            spend: RefCell::new(HashMap::default()),
            refusals: RefCell::new(HashMap::default()),
            timings: RefCell::new(HashMap::default()),
            settlements: RefCell::new(Settlements::default()),
            cache_metrics: RefCell::new(HashMap::default()),
            cache_queue: RefCell::new(VecDeque::new()),
            cache_in_flight: RefCell::new(HashMap::new()),
            leases,
            batch: RefCell::new(Batch::default()),
        })
    }

    /// The root context's timer period: every configuration has one, as a busy worker writes
    /// its counters and settlements on it ([`crate::batch`]); quota leases need a shorter one.
    pub fn tick_period_ms(&self) -> u32 {
        if self.leases.is_some() {
            LEASE_TICK_MS
        } else {
            ROOT_TICK_MS
        }
    }

    /// The root context's timer: write the batch, send what the requests queued.
    pub fn on_tick(&self, host: &dyn Host) {
        self.flush(host);
        self.send_stores(host);
        self.send_prefetches(host);
        self.reclaim_leases(host);
        self.send_settlements(host);
    }

    /// An answer to one of the root context's callouts: a cache store, a lease prefetch or a
    /// settlement batch.
    pub fn on_root_callout(&self, host: &dyn Host, token: u32, num_headers: usize) {
        if self.on_store_reply(host, token, num_headers)
            || self.on_prefetch_reply(host, token, num_headers)
        {
            return;
        }
        let status = callout_status(host, num_headers);
        let body = host
            .body(crate::host::Buffer::CallResponse, MAX_WEBDIS_REPLY_BYTES)
            .unwrap_or_default();
        if let Err(e) = webdis::parse_settle_reply(status, &body) {
            warn!(
                "token settlements not applied in Redis ({}); the estimates stay counted",
                e.reason()
            );
            self.limiter_error(
                host,
                &LimiterFailure {
                    backend: "redis",
                    reason: e.reason(),
                },
            );
        }
    }

    /// The model label of a rule (`_default` without one).
    pub fn model_label(&self, rule: Option<usize>) -> &str {
        match (&self.config.mode, rule) {
            (Mode::Routed(r), Some(i)) => r.rules.get(i).map_or("", |r| r.pattern.as_str()),
            _ => metrics::DEFAULT_MODEL,
        }
    }

    /// Counts a request in `tollgate_requests_total{client,outcome}` (a client's series is
    /// defined on its first use).
    pub fn count_request(&self, host: &dyn Host, client: Option<usize>, outcome: Outcome) {
        let id = match client.and_then(|c| self.config.client(c).map(|k| (c, k))) {
            Some((c, known)) => lazy_metric(&self.metrics.requests, (c, outcome.index()), || {
                host.define_counter(&metrics::requests_total(&known.name, outcome))
            }),
            None => self.metrics.anonymous.get(outcome.index()).copied(),
        };
        if let Some(id) = id {
            self.batch.borrow_mut().count(id, 1);
        }
    }

    /// Counts a request Tollgate answered itself in `tollgate_refusals_total`, under the rule
    /// its model matched (`model`: what the body asked for, once read).
    pub fn count_refusal(
        &self,
        host: &dyn Host,
        client: Option<usize>,
        model: Option<&str>,
        reason: &'static str,
    ) {
        let rule = match &self.config.mode {
            Mode::Single(_) => Some(None),
            Mode::Routed(r) => model.and_then(|m| r.rule_for(m)).map(Some),
        };
        let id = lazy_metric(&self.refusals, (client, rule, reason), || {
            let name = client
                .and_then(|c| self.config.client(c))
                .map_or(ANONYMOUS, |c| c.name.as_str());
            let model = match rule {
                Some(rule) => self.model_label(rule),
                None => metrics::NO_MODEL,
            };
            host.define_counter(&metrics::refusals_total(name, model, reason))
        });
        if let Some(id) = id {
            host.increment(id, 1);
        }
    }

    /// Counts the attempts a forwarded request made on `rule`'s route (`None`: the default
    /// route; model routing only; the counts go to the worker's batch). `attempts` and
    /// `status` come from the response when it arrived: one attempt that succeeded is counted
    /// without a host call; anything else reads the upstream role's log (one host call).
    pub fn count_attempts(
        &self,
        host: &dyn Host,
        rule: Option<usize>,
        attempts: Option<usize>,
        status: Option<u16>,
    ) -> Option<&str> {
        let (Some(counters), Mode::Routed(routing)) = (&self.attempts, &self.config.mode) else {
            return None;
        };
        let first_succeeded = attempts == Some(1) && status.is_some_and(|s| s < 400);
        let log = if first_succeeded {
            None
        } else {
            host.property(&[crate::upstream::ATTEMPTS_PROPERTY])
                .unwrap_or_else(|e| {
                    warn!("cannot read the attempt log: {e}");
                    None
                })
        };
        let add = &mut |id, n| self.batch.borrow_mut().count(id, n);
        let log = log.unwrap_or_default();
        counters
            .count(host, routing, rule, attempts.unwrap_or(0), &log, add)
            .and_then(|p| routing.providers.get(p))
            .map(|p| p.name.as_str())
    }

    /// Counts a limiter failure that its failure policy handled.
    pub fn limiter_error(&self, host: &dyn Host, f: &LimiterFailure) {
        let found = self
            .metrics
            .limiter_errors
            .iter()
            .find(|(b, r, _)| *b == f.backend && *r == f.reason);
        if let Some((_, _, id)) = found {
            host.increment(*id, 1);
        }
    }

    /// Adds a response's tokens to `tollgate_tokens_total`.
    pub fn count_tokens(
        &self,
        host: &dyn Host,
        client: usize,
        rule: Option<usize>,
        completion: bool,
        n: u64,
    ) {
        if n == 0 {
            return;
        }
        let id = lazy_metric(&self.tokens, (client, rule, completion), || {
            let name = self.config.client(client).map_or("", |c| c.name.as_str());
            let kind = if completion { "completion" } else { "prompt" };
            host.define_counter(&metrics::tokens_total(name, self.model_label(rule), kind))
        });
        if let Some(id) = id {
            self.batch.borrow_mut().count(id, n);
        }
    }

    /// Adds a response's cost (micro-units) to `tollgate_spend_micros_total`.
    pub fn count_spend(&self, host: &dyn Host, client: usize, price: usize, micros: u64) {
        if micros == 0 {
            return;
        }
        let id = lazy_metric(&self.spend, (client, price), || {
            let name = self.config.client(client).map_or("", |c| c.name.as_str());
            let model = self
                .config
                .prices
                .get(price)
                .map_or("", |p| p.model.as_str());
            host.define_counter(&metrics::spend_micros_total(name, model))
        });
        if let Some(id) = id {
            self.batch.borrow_mut().count(id, micros);
        }
    }

    /// Records a duration (ms) in `tollgate_request_duration_ms` or, for `first_byte`,
    /// `tollgate_stream_first_byte_ms`.
    pub fn record_timing(&self, host: &dyn Host, rule: Option<usize>, first_byte: bool, ms: u64) {
        let id = lazy_metric(&self.timings, (rule, first_byte), || {
            let model = self.model_label(rule);
            host.define_histogram(&if first_byte {
                metrics::stream_first_byte_ms(model)
            } else {
                metrics::request_duration_ms(model)
            })
        });
        if let Some(id) = id {
            host.record(id, ms);
        }
    }

    /// Adds `n` to a `tollgate_cache_*` counter (`reason` is ignored by the series without one).
    pub fn cache_count(
        &self,
        host: &dyn Host,
        metric: CacheMetric,
        rule: Option<usize>,
        backend: Backend,
        reason: &'static str,
        n: u64,
    ) {
        let reason = if metric.has_reason() { reason } else { "" };
        let id = lazy_metric(&self.cache_metrics, (metric, rule, backend, reason), || {
            host.define_counter(&metrics::cache_total(
                metric,
                backend.name(),
                self.model_label(rule),
                reason,
            ))
        });
        if let Some(id) = id {
            host.increment(id, n);
        }
    }

    /// Counts a cache failure; the request goes on as a miss.
    pub fn cache_error(
        &self,
        host: &dyn Host,
        rule: Option<usize>,
        backend: Backend,
        e: &cache::Error,
    ) {
        warn!(
            "response cache ({}) failed: {}; the request goes on as a miss",
            backend.name(),
            e.reason()
        );
        self.cache_count(host, CacheMetric::Errors, rule, backend, e.reason(), 1);
    }

    /// Queues a Redis store for the root context's next tick.
    pub fn queue_store(
        &self,
        host: &dyn Host,
        rule: Option<usize>,
        entry: &cache::Entry,
        ttl_s: u32,
    ) {
        let Some(redis) = &self.config.cache.redis else {
            return;
        };
        let mut queue = self.cache_queue.borrow_mut();
        if queue.len() + self.cache_in_flight.borrow().len() >= MAX_PENDING_STORES {
            drop(queue);
            self.cache_error(host, rule, Backend::Redis, &cache::Error::Overloaded);
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

    /// A request of this worker started (see [`crate::batch`]).
    pub fn begin_exchange(&self) {
        self.batch.borrow_mut().begin();
    }

    /// A request of this worker ended: with none left in flight, the batch is written now.
    /// Without a host (a context dropped without its log callback) the root tick writes it.
    pub fn end_exchange(&self, host: Option<&dyn Host>) {
        let idle = self.batch.borrow_mut().end();
        if let (true, Some(host)) = (idle, host) {
            self.flush(host);
        }
    }

    /// Holds a finished request's local settlement for the batch (written now when the batch
    /// is full).
    pub fn settle_local(&self, host: &dyn Host, settlement: request::LocalSettlement) {
        let full = self.batch.borrow_mut().settle(settlement);
        if full {
            self.flush(host);
        }
    }

    /// Writes the batch: each counter series once, each client's record in one
    /// compare-and-swap. A settlement the store refuses stays counted as reserved (as a
    /// request's own settlement would), and is counted as a local limiter error.
    pub fn flush(&self, host: &dyn Host) {
        if self.batch.borrow().is_empty() {
            return;
        }
        let flush = self.batch.borrow_mut().take();
        for (id, n) in flush.counters {
            host.increment(id, n);
        }
        for settlement in &flush.settlements {
            if let Err(e) = request::apply_local(&self.config, settlement, host) {
                warn!(
                    "cannot settle token usage ({}); the estimate stays counted",
                    e.reason()
                );
                self.limiter_error(
                    host,
                    &LimiterFailure {
                        backend: "local",
                        reason: e.reason(),
                    },
                );
            }
        }
    }

    /// Queues a Redis token adjustment for the root tick; a full queue is counted.
    pub fn queue_settlement(&self, host: &dyn Host, key: String, delta: i64) {
        if !self.settlements.borrow_mut().add(key, delta) {
            warn!("token settlement queue full; the estimate stays counted");
            self.limiter_error(
                host,
                &LimiterFailure {
                    backend: "redis",
                    reason: "queue_full",
                },
            );
        }
    }

    /// Whether a request may wait for a lease fetch now (the worker's breaker is closed, or
    /// this is its probe); always true without leases.
    pub fn lease_allows(&self, host: &dyn Host, now_ms: u64) -> bool {
        let Some(l) = &self.leases else {
            return true;
        };
        let (allowed, t) = l.breaker.borrow_mut().allow(now_ms, &l.policy);
        l.transition(host, t);
        if !allowed {
            l.fetched(host, true, "error");
        }
        allowed
    }

    /// Counts a limiter callout a request made (`lease`: a block, else a check).
    pub fn limiter_call(&self, host: &dyn Host, lease: bool) {
        if let Some(l) = &self.leases {
            l.call(host, if lease { "lease" } else { "check" });
        }
    }

    /// A request's lease fetch was answered: `error` is the limiter failure it met (`None`:
    /// Webdis answered), `spent`: the window is spent, `granted`: the requests and tokens Redis
    /// granted. Feeds the breaker and the metrics, and remembers the client so that its lease
    /// is reclaimed when idle.
    pub fn lease_answered(
        &self,
        host: &dyn Host,
        fetch: &lease::Fetch,
        error: Option<&str>,
        spent: bool,
        granted: (u64, u64),
        now_ms: u64,
    ) {
        let Some(l) = &self.leases else {
            return;
        };
        Leases::count_kinds(host, l.granted, granted);
        let outcome = match (error, spent) {
            (Some(_), _) => "error",
            (None, true) => "spent",
            (None, false) => "granted",
        };
        l.fetched(host, true, outcome);
        let failed = error.is_some_and(lease::reason_trips_breaker);
        let t = l.breaker.borrow_mut().record(!failed, now_ms, &l.policy);
        l.transition(host, t);
        self.remember_lease(l, fetch);
    }

    fn remember_lease(&self, l: &Leases, fetch: &lease::Fetch) {
        l.clients
            .borrow_mut()
            .entry(fetch.client)
            .or_insert_with(|| fetch.key_md5.clone());
    }

    /// Queues a lease prefetch for the next tick.
    pub fn queue_prefetch(&self, host: &dyn Host, fetch: lease::Fetch) {
        let Some(l) = &self.leases else {
            return;
        };
        self.remember_lease(l, &fetch);
        let mut queue = l.queue.borrow_mut();
        if queue.len() + l.in_flight.borrow().len() >= MAX_PREFETCHES {
            drop(queue);
            l.fetched(host, false, "error");
            return;
        }
        queue.push(fetch);
    }

    fn send_prefetches(&self, host: &dyn Host) {
        let (Some(l), LimiterBackend::Redis(redis)) = (&self.leases, &self.config.limiter) else {
            return;
        };
        let queued: Vec<lease::Fetch> = l.queue.borrow_mut().drain(..).collect();
        if queued.is_empty() {
            return;
        }
        let now = host.now_ms().unwrap_or(0);
        for fetch in queued {
            let Some(c) = self.config.client(fetch.client) else {
                continue;
            };
            let key = lease::lease_key(c);
            let (allowed, t) = l.breaker.borrow_mut().allow(now, &l.policy);
            l.transition(host, t);
            if !allowed {
                l.fetched(host, false, "error");
                let _ = lease::on_fetch_failed(host, &key);
                continue;
            }
            let body = lease::command(&fetch.key_md5, &fetch.ask, &fetch.want, now, &l.policy);
            l.call(host, "lease");
            match host.dispatch(&request::webdis_call(&redis.webdis, body)) {
                Ok(token) => {
                    l.in_flight.borrow_mut().insert(token, (fetch, now));
                }
                Err(e) => {
                    warn!("cannot send a lease prefetch: {e}");
                    l.fetched(host, false, "error");
                    let _ = lease::on_fetch_failed(host, &key);
                }
            }
        }
    }

    /// A prefetch's answer: store the block (or that the window is spent); false when `token`
    /// is not a prefetch's.
    fn on_prefetch_reply(&self, host: &dyn Host, token: u32, num_headers: usize) -> bool {
        let Some(l) = &self.leases else {
            return false;
        };
        let Some((fetch, sent_ms)) = l.in_flight.borrow_mut().remove(&token) else {
            return false;
        };
        let (LimiterBackend::Redis(redis), Some(c)) =
            (&self.config.limiter, self.config.client(fetch.client))
        else {
            return true;
        };
        let status = callout_status(host, num_headers);
        let body = host
            .body(crate::host::Buffer::CallResponse, MAX_WEBDIS_REPLY_BYTES)
            .unwrap_or_default();
        let now = host.now_ms().unwrap_or(0);
        let key = lease::lease_key(c);
        let answer = webdis::parse_lease_reply(status, &body).map_err(|e| {
            webdis::timed_out(e, now.saturating_sub(sent_ms), redis.webdis.timeout_ms)
        });
        let failed = match answer {
            Ok(leased) => {
                let outcome = if leased.spent.is_some() {
                    "spent"
                } else {
                    "granted"
                };
                l.fetched(host, false, outcome);
                Leases::count_kinds(host, l.granted, leased.granted());
                if let Err(e) =
                    lease::on_grant(host, &key, fetch.ask, &fetch.want, &leased, now, &l.policy)
                {
                    warn!(
                        "cannot store a lease ({}); it ends with its window",
                        e.reason()
                    );
                }
                false
            }
            Err(e) => {
                warn!("lease prefetch failed ({})", e.reason());
                l.fetched(host, false, "error");
                self.limiter_error(
                    host,
                    &LimiterFailure {
                        backend: "redis",
                        reason: e.reason(),
                    },
                );
                let _ = lease::on_fetch_failed(host, &key);
                lease::trips_breaker(&e)
            }
        };
        let t = l.breaker.borrow_mut().record(!failed, now, &l.policy);
        l.transition(host, t);
        true
    }

    /// Every few ticks: gives back leases idle for `idle_ms`, and what exceeds the traffic of
    /// a shrinking one (as settlements, sent with the next batch).
    fn reclaim_leases(&self, host: &dyn Host) {
        let Some(l) = &self.leases else {
            return;
        };
        let ticks = l.ticks.get().wrapping_add(1);
        l.ticks.set(ticks);
        if ticks % RECLAIM_EVERY_TICKS != 0 || l.clients.borrow().is_empty() {
            return;
        }
        let now = host.now_ms().unwrap_or(0);
        let clients: Vec<(usize, String)> = l
            .clients
            .borrow()
            .iter()
            .map(|(c, k)| (*c, k.clone()))
            .collect();
        for (client, key_md5) in clients {
            let Some(c) = self.config.client(client) else {
                continue;
            };
            let ask = lease::Ask {
                limit: u64::from(c.requests_per_minute),
                tokens: c.tokens_per_minute.map(|t| (u64::from(t), 0)),
            };
            match lease::reclaim(host, &lease::lease_key(c), ask, now, &l.policy) {
                Ok(Some(back)) => {
                    Leases::count_kinds(host, l.returned, (back.requests, back.tokens));
                    for (key, delta) in lease::returns(&key_md5, &back) {
                        self.queue_settlement(host, key, delta);
                    }
                }
                Ok(None) => {}
                Err(e) => debug!("cannot reclaim a lease: {}", e.reason()),
            }
        }
    }

    fn send_stores(&self, host: &dyn Host) {
        let queued: Vec<QueuedStore> = self.cache_queue.borrow_mut().drain(..).collect();
        if queued.is_empty() {
            return;
        }
        let now = host.now_ms().unwrap_or(0);
        for QueuedStore { call, mut meta } in queued {
            match host.dispatch(&call) {
                Ok(token) => {
                    meta.sent_ms = now;
                    self.cache_in_flight.borrow_mut().insert(token, meta);
                }
                Err(e) => {
                    error!("cannot call Webdis to store a response: {e}");
                    let failed = cache::Error::Redis(ReplyError::Unavailable);
                    self.cache_error(host, meta.rule, Backend::Redis, &failed);
                }
            }
        }
    }

    /// Sends the token adjustments queued for the Redis limiter, one script call per batch of
    /// keys. Not retried: a timed-out call may have been applied, and a second one would charge
    /// twice; a lost adjustment leaves the estimate counted until the window ends.
    fn send_settlements(&self, host: &dyn Host) {
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
            if let Some(l) = &self.leases {
                l.call(host, "settle");
            }
            let call = request::webdis_call(&redis.webdis, body);
            if let Err(e) = host.dispatch(&call) {
                warn!("cannot send token settlements to the Redis limiter: {e}");
                self.limiter_error(
                    host,
                    &LimiterFailure {
                        backend: "redis",
                        reason: ReplyError::Unavailable.reason(),
                    },
                );
            }
        }
    }

    /// Counts Webdis's answer to a store; false when `token` is not a store's.
    fn on_store_reply(&self, host: &dyn Host, token: u32, num_headers: usize) -> bool {
        let Some(meta) = self.cache_in_flight.borrow_mut().remove(&token) else {
            return false;
        };
        let status = callout_status(host, num_headers);
        let body = host
            .body(crate::host::Buffer::CallResponse, MAX_WEBDIS_REPLY_BYTES)
            .unwrap_or_default();
        let now = host.now_ms().unwrap_or(0);
        match cache::parse_set_reply(status, &body) {
            Ok(()) => {
                self.cache_count(host, CacheMetric::Stores, meta.rule, Backend::Redis, "", 1);
                self.cache_count(
                    host,
                    CacheMetric::StoredBytes,
                    meta.rule,
                    Backend::Redis,
                    "",
                    meta.bytes,
                );
            }
            Err(e) => {
                let e = timed_out(e, now, meta.sent_ms, meta.timeout_ms);
                self.cache_error(host, meta.rule, Backend::Redis, &e);
            }
        }
        true
    }
}

/// The `:status` of a callout's answer; `None` when Envoy called back without headers (the
/// callout failed, was refused or timed out).
pub fn callout_status(host: &dyn Host, num_headers: usize) -> Option<u16> {
    if num_headers == 0 {
        return None;
    }
    match host.header(Map::CallResponse, ":status") {
        Ok(Some(v)) => std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()),
        _ => None,
    }
}

/// Envoy reports a timed-out callout like any failed one; the clock tells them apart.
pub fn timed_out(e: cache::Error, now_ms: u64, sent_ms: u64, timeout_ms: u32) -> cache::Error {
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
pub fn lazy_metric<K: Eq + std::hash::Hash, S: std::hash::BuildHasher>(
    cache: &RefCell<HashMap<K, u32, S>>,
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

/// Counter ids defined once per configuration, so the request path never builds a name.
struct MetricIds {
    /// `(client, outcome)` ids of configured clients, defined on a client's first request with
    /// that outcome: defining five counters for every configured client in every VM costs time
    /// and memory in proportion to all clients, not to those seen (issue #23: 100,000 clients).
    requests: RefCell<HashMap<(usize, usize), u32, FastHash>>,
    /// Requests without a known client: `[outcome]`.
    anonymous: [u32; 5],
    /// `(backend, reason, id)` for every limiter failure this configuration can meet.
    limiter_errors: Vec<(&'static str, &'static str, u32)>,
}

impl MetricIds {
    fn define(host: &dyn Host, config: &Config) -> Result<Self, HostError> {
        let per_outcome = |client: &str| -> Result<[u32; 5], HostError> {
            let mut ids = [0u32; 5];
            for (slot, outcome) in ids.iter_mut().zip(Outcome::ALL) {
                *slot = host.define_counter(&metrics::requests_total(client, outcome))?;
            }
            Ok(ids)
        };
        // The local limiter runs in every mode (as the Redis fallback too).
        let mut failures: Vec<(&'static str, &'static str)> =
            [LimiterError::Contention, LimiterError::Store]
                .iter()
                .map(|e| ("local", e.reason()))
                .collect();
        if let LimiterBackend::Redis(r) = &config.limiter {
            failures.extend(ReplyError::REASONS.iter().map(|r| ("redis", *r)));
            if r.leases.is_some() {
                failures.push(("redis", ReplyError::CircuitOpen.reason()));
            }
            // Token settlements refused by a full queue (Redis unreachable for long).
            failures.push(("redis", "queue_full"));
        }
        let limiter_errors = failures
            .into_iter()
            .map(|(backend, reason)| {
                host.define_counter(&metrics::limiter_errors_total(backend, reason))
                    .map(|id| (backend, reason, id))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            requests: RefCell::new(HashMap::default()),
            anonymous: per_outcome(ANONYMOUS)?,
            limiter_errors,
        })
    }
}

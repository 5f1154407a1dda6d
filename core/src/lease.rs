//! Quota leases: the Redis limiter off the request path.
//!
//! Each Envoy process takes a *block* of a client's window budget (requests, and tokens with a
//! token limit) from Redis in one atomic script call ([`crate::webdis::LEASE_SCRIPT`]), keeps it
//! in shared data, and admits from it locally with the local limiter's discipline: one fixed
//! record per client, a bounded compare-and-swap loop, created at configure time. Redis's
//! counter holds what was *granted* to replicas, and a replica admits only what it was granted,
//! so the replicas together never admit more than the limit in a window.
//!
//! ```text
//! request ─► admit from the lease ─┬─ lease left ───────────────► admitted (no Redis call)
//!                                  │    └ below half the last block: prefetch (root tick)
//!                                  ├─ spent in Redis recently ──► 429 (no Redis call)
//!                                  └─ empty ─► fetch, the request waits ─► admitted / 429 /
//!                                                                          on_error
//! root tick ─► prefetches; leases idle for `idle_ms` (or far larger than the traffic) go back
//! ```
//!
//! Block size: what the replica admitted recently, scaled to `horizon_ms` (never past the
//! window's end), at most `max_block`; Redis then caps it at `share_percent` of what is left
//! (at least 1), so blocks shrink to 1 as the budget runs out. Everything here is pure over a
//! [`CasStore`] and a clock value; the exchange and the gateway carry out the callouts.

use crate::config::{Client, LeasePolicy};
use crate::host::{CasStore, SetError, StoreError};
use crate::limiter::{self, window_of, LimiterError, Window, CAS_ATTEMPTS, WINDOW_MS};
use crate::webdis::{self, LeaseAsk, Leased, ReplyError};

/// Shared-data key prefix of the lease records, one per client.
pub const LEASE_KEY_PREFIX: &str = "tollgate.v2.lease.";

/// Version byte of the record (2: `since`, `since_used` and `spent_count` added; a record of
/// another version counts as empty, which can only under-admit).
const VERSION: u8 = 2;
/// Number of u64 fields after the version byte.
const FIELDS: usize = 18;

/// Shared-data key of a client's lease record.
pub fn lease_key(client: &Client) -> String {
    format!("{LEASE_KEY_PREFIX}{}", client.name)
}

/// What this Envoy process holds of a client's window, and what it did with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// The minute window the lease is for (an older one counts as empty).
    pub window: u64,
    /// Requests granted to this process in the window.
    pub granted: u64,
    /// Requests admitted from them.
    pub used: u64,
    /// Tokens granted.
    pub granted_tokens: u64,
    /// Tokens reserved from them (estimates; settlements go to Redis directly).
    pub used_tokens: u64,
    /// Requests admitted in the previous window (the rate a new window starts from).
    pub prev_used: u64,
    /// Tokens reserved in the previous window.
    pub prev_tokens: u64,
    /// Redis's count after the last grant (all replicas), for `x-ratelimit-remaining-*`.
    pub counted: u64,
    /// Likewise for tokens.
    pub tokens_counted: u64,
    /// When a prefetch was sent (0: none out).
    pub fetching_since: u64,
    /// Redis said the window is spent: refuse locally until then (0: not spent).
    pub spent_until: u64,
    /// What was spent: 1 tokens, 0 requests.
    pub spent_tokens: u64,
    /// Last admission or grant (Unix ms), for idle returns.
    pub last_active: u64,
    /// Size of the last block of requests granted.
    pub last_grant: u64,
    /// Size of the last block of tokens granted.
    pub last_grant_tokens: u64,
    /// When this process's traffic in the window began (its first grant, or the first after
    /// an idle return), Unix ms; 0: not yet. The rate is measured from here, not from the
    /// window's start, so a process that starts (or whose traffic starts) mid-window sizes its
    /// blocks by its real rate at once.
    pub since: u64,
    /// `used` at `since`.
    pub since_used: u64,
    /// Consecutive "spent" answers in this window: the recheck interval doubles with each.
    pub spent_count: u64,
}

impl Record {
    fn fields(&self) -> [u64; FIELDS] {
        [
            self.window,
            self.granted,
            self.used,
            self.granted_tokens,
            self.used_tokens,
            self.prev_used,
            self.prev_tokens,
            self.counted,
            self.tokens_counted,
            self.fetching_since,
            self.spent_until,
            self.spent_tokens,
            self.last_active,
            self.last_grant,
            self.last_grant_tokens,
            self.since,
            self.since_used,
            self.spent_count,
        ]
    }

    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + FIELDS * 8);
        out.push(VERSION);
        for f in self.fields() {
            out.extend_from_slice(&f.to_le_bytes());
        }
        out
    }

    /// A record we cannot read counts as empty (the next write replaces it).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != VERSION || rest.len() != FIELDS * 8 {
            return None;
        }
        let mut f = rest
            .chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_le_bytes).unwrap_or(0));
        let mut next = || f.next().unwrap_or(0);
        Some(Self {
            window: next(),
            granted: next(),
            used: next(),
            granted_tokens: next(),
            used_tokens: next(),
            prev_used: next(),
            prev_tokens: next(),
            counted: next(),
            tokens_counted: next(),
            fetching_since: next(),
            spent_until: next(),
            spent_tokens: next(),
            last_active: next(),
            last_grant: next(),
            last_grant_tokens: next(),
            since: next(),
            since_used: next(),
            spent_count: next(),
        })
    }

    /// The record in `window`: an older window's lease is gone (its Redis keys expire with it),
    /// and what it admitted becomes the rate the new window starts from.
    fn in_window(current: Option<Self>, window: u64) -> Self {
        match current {
            Some(r) if r.window == window => r,
            Some(r) if r.window.saturating_add(1) == window => Self {
                window,
                prev_used: r.used,
                prev_tokens: r.used_tokens,
                ..Self::default()
            },
            _ => Self {
                window,
                ..Self::default()
            },
        }
    }

    fn held(&self) -> u64 {
        self.granted.saturating_sub(self.used)
    }

    fn held_tokens(&self) -> u64 {
        self.granted_tokens.saturating_sub(self.used_tokens)
    }

    fn fetching(&self, now_ms: u64, p: &LeasePolicy) -> bool {
        self.fetching_since != 0 && now_ms.saturating_sub(self.fetching_since) < p.stale_ms
    }

    fn spent(&self, now_ms: u64) -> bool {
        self.spent_until > now_ms
    }

    fn windows(&self, ask: &Ask, reset_ms: u64) -> (Window, Option<Window>) {
        let requests = Window {
            limit: ask.limit,
            remaining: ask
                .limit
                .saturating_sub(self.counted)
                .saturating_add(self.held())
                .min(ask.limit),
            reset_ms,
        };
        let tokens = ask.tokens.map(|(limit, _)| Window {
            limit,
            remaining: limit
                .saturating_sub(self.tokens_counted)
                .saturating_add(self.held_tokens())
                .min(limit),
            reset_ms,
        });
        (requests, tokens)
    }
}

/// What a request asks: the client's request limit, and with a token limit, that limit and
/// this request's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// Requests per minute.
    pub limit: u64,
    /// Tokens per minute and this request's cost.
    pub tokens: Option<(u64, u64)>,
}

/// A block to ask Redis for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// The window it is for.
    pub window: u64,
    /// Requests wanted.
    pub requests: u64,
    /// Tokens wanted (0 without a token limit).
    pub tokens: u64,
    /// A request waits for this block: it needs one request and `need_tokens` now.
    pub blocking: bool,
    /// Tokens the waiting request reserves.
    pub need_tokens: u64,
}

/// The block size for the traffic this process saw: its rate in the current window (measured
/// since its traffic in the window began, over at least a second) or the previous one,
/// whichever is higher, times `horizon_ms` (never past the window's end), between 1 and
/// `max_block`. Tokens likewise, at the average estimate per request (the waiting request's own
/// when there is no history).
fn want(r: &Record, ask: &Ask, now_ms: u64, p: &LeasePolicy, blocking: bool) -> Want {
    let (window, left_ms) = window_of(now_ms);
    let (recent, elapsed) = if r.since == 0 {
        (0, 1_000)
    } else {
        (
            r.used.saturating_sub(r.since_used),
            now_ms.saturating_sub(r.since).max(1_000),
        )
    };
    let horizon = p.horizon_ms.min(left_ms).max(1);
    let scaled = |n: u64, over: u64| {
        u64::try_from((u128::from(n) * u128::from(horizon)).div_ceil(u128::from(over)))
            .unwrap_or(u64::MAX)
    };
    let requests = scaled(recent, elapsed)
        .max(scaled(r.prev_used, WINDOW_MS))
        .clamp(1, p.max_block);
    let cost = ask.tokens.map_or(0, |(_, c)| c);
    let tokens = match ask.tokens {
        None => 0,
        Some(_) => {
            let (n, t) = (r.used + r.prev_used, r.used_tokens + r.prev_tokens);
            let per_request = if n == 0 { cost } else { t.div_ceil(n) };
            requests.saturating_mul(per_request).max(cost).max(1)
        }
    };
    Want {
        window,
        requests,
        tokens,
        blocking,
        need_tokens: if blocking { cost } else { 0 },
    }
}

/// What the lease says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Admitted from the lease; `prefetch`: ask for the next block now (the record marks it
    /// out, so one worker of the process sends it).
    Admitted {
        /// The request window.
        requests: Window,
        /// The token window (with a token limit).
        tokens: Option<Window>,
        /// The next block to fetch in the background.
        prefetch: Option<Want>,
    },
    /// Redis said the window is spent, recently: refused without asking again.
    Limited {
        /// Tokens ran out (else requests).
        tokens: bool,
        /// The window for the 429.
        window: Window,
    },
    /// The lease cannot cover the request: fetch this block while the request waits.
    Fetch(Want),
}

/// Admits a request from the process's lease, in one read and (when admitted) one
/// compare-and-swap; a refusal or a fetch writes nothing, except the recheck of a spent window,
/// which claims it (one compare-and-swap).
pub fn admit(
    store: &dyn CasStore,
    key: &str,
    ask: Ask,
    now_ms: u64,
    p: &LeasePolicy,
) -> Result<Admit, LimiterError> {
    let (window, reset_ms) = window_of(now_ms);
    let cost = ask.tokens.map_or(0, |(_, c)| c);
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = read(store, key)?;
        let r = Record::in_window(current, window);
        let fits = r.held() >= 1 && (ask.tokens.is_none() || r.held_tokens() >= cost.max(1));
        if !fits {
            if r.spent(now_ms) {
                let tokens = r.spent_tokens != 0;
                let (requests, token_window) = r.windows(&ask, reset_ms);
                let window = match token_window {
                    Some(w) if tokens => w,
                    _ => Window {
                        remaining: 0,
                        ..requests
                    },
                };
                return Ok(Admit::Limited { tokens, window });
            }
            if r.spent_until != 0 {
                // Spent, and the recheck is due: one request of this process asks Redis, and
                // claims it by refusing the others as before until its answer comes (or until
                // it is taken as lost), so a crowd of requests is not a crowd of calls.
                let mut claim = r;
                claim.spent_until = now_ms.saturating_add(p.stale_ms);
                match store.set(key, &claim.encode(), cas) {
                    Ok(()) => return Ok(Admit::Fetch(want(&r, &ask, now_ms, p, true))),
                    Err(SetError::CasMismatch) => continue,
                    Err(SetError::Store) => return Err(LimiterError::Store),
                }
            }
            return Ok(Admit::Fetch(want(&r, &ask, now_ms, p, true)));
        }
        let mut next = r;
        next.used += 1;
        next.used_tokens = next.used_tokens.saturating_add(cost);
        next.last_active = now_ms;
        let low = next.held() <= next.last_grant / 2
            || (ask.tokens.is_some() && next.held_tokens() <= next.last_grant_tokens / 2);
        let prefetch = if low && !next.fetching(now_ms, p) && !next.spent(now_ms) {
            next.fetching_since = now_ms;
            Some(want(&next, &ask, now_ms, p, false))
        } else {
            None
        };
        match store.set(key, &next.encode(), cas) {
            Ok(()) => {
                let (requests, tokens) = next.windows(&ask, reset_ms);
                return Ok(Admit::Admitted {
                    requests,
                    tokens,
                    prefetch,
                });
            }
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Store) => return Err(LimiterError::Store),
        }
    }
    Err(LimiterError::Contention)
}

/// What a lease reply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// The waiting request is admitted (or, for a prefetch, the block is stored).
    Admitted {
        /// The request window.
        requests: Window,
        /// The token window (with a token limit).
        tokens: Option<Window>,
    },
    /// The window is spent in Redis: the waiting request gets a 429.
    Limited {
        /// Tokens ran out (else requests).
        tokens: bool,
        /// The window for the 429.
        window: Window,
    },
}

/// Stores a block Redis granted (or that the window is spent) in the record. For a blocking
/// fetch the waiting request is counted from it (the script granted at least what it needs).
/// A reply that comes after its window ended admits its waiting request (Redis counted it in
/// that window) and stores nothing: the rest of that block ends with its window.
pub fn on_grant(
    store: &dyn CasStore,
    key: &str,
    ask: Ask,
    want: &Want,
    leased: &Leased,
    now_ms: u64,
    p: &LeasePolicy,
) -> Result<Granted, LimiterError> {
    let (window, reset_now) = window_of(now_ms);
    let reset_ms = if window == want.window { reset_now } else { 1 };
    let cost = ask.tokens.map_or(0, |(_, c)| c);
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = read(store, key)?;
        let r = Record::in_window(current, window);
        let mut next = r;
        if !want.blocking {
            next.fetching_since = 0;
        }
        let answer = match leased.spent {
            Some(tokens) => {
                next.spent_until = now_ms
                    .saturating_add(recheck_after(next.spent_count, p))
                    .min((want.window + 1) * WINDOW_MS);
                next.spent_count = next.spent_count.saturating_add(1);
                next.spent_tokens = u64::from(tokens);
                next.counted = leased.counted;
                next.tokens_counted = leased.tokens_counted;
                let (requests, token_window) = next.windows(&ask, reset_ms);
                let window = match token_window {
                    Some(w) if tokens => w,
                    _ => Window {
                        remaining: 0,
                        ..requests
                    },
                };
                Granted::Limited { tokens, window }
            }
            None => {
                next.granted += leased.requests;
                next.granted_tokens = next.granted_tokens.saturating_add(leased.tokens);
                next.counted = leased.counted;
                next.tokens_counted = leased.tokens_counted;
                next.last_grant = leased.requests;
                next.last_grant_tokens = leased.tokens;
                next.spent_until = 0;
                next.spent_count = 0;
                next.last_active = now_ms;
                if next.since == 0 {
                    next.since = now_ms;
                    next.since_used = next.used;
                }
                if want.blocking {
                    next.used += 1;
                    next.used_tokens = next.used_tokens.saturating_add(cost);
                }
                let (requests, tokens) = next.windows(&ask, reset_ms);
                Granted::Admitted { requests, tokens }
            }
        };
        if r.window != want.window || (next == r && current.is_some()) {
            // Late (its window is over) or nothing to change.
            return Ok(answer);
        }
        match store.set(key, &next.encode(), cas) {
            Ok(()) => return Ok(answer),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Store) => return Err(LimiterError::Store),
        }
    }
    Err(LimiterError::Contention)
}

/// How long a process refuses locally after its `count + 1`-th consecutive "spent" answer in a
/// window: `recheck_ms`, then `recheck_ms << RECHECK_DOUBLINGS` (the caller never goes past the
/// window's end). A spent window gets budget back only from idle or shrinking leases, so
/// rechecking it every `recheck_ms` from every replica was most of the Redis calls of clients
/// over their limit; but replicas are told "spent" at about the same time and back off
/// together, so a longer interval leaves what comes back unfound (the simulation below
/// under-admits 1.5% of the limit with two doublings, 3.5% with three; with one it finds as
/// much as rechecking every `recheck_ms` did).
fn recheck_after(count: u64, p: &LeasePolicy) -> u64 {
    let doublings = u32::try_from(count.min(RECHECK_DOUBLINGS)).unwrap_or(0);
    p.recheck_ms.saturating_mul(1 << doublings)
}

/// At most this many doublings of `recheck_ms` between rechecks of a spent window.
pub const RECHECK_DOUBLINGS: u64 = 1;

/// A prefetch failed: clear its mark so the next admission may try again (the worker's
/// breaker decides whether it is sent).
pub fn on_fetch_failed(store: &dyn CasStore, key: &str) -> Result<(), LimiterError> {
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = read(store, key)?;
        let Some(mut r) = current else {
            return Ok(());
        };
        if r.fetching_since == 0 {
            return Ok(());
        }
        r.fetching_since = 0;
        match store.set(key, &r.encode(), cas) {
            Ok(()) => return Ok(()),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Store) => return Err(LimiterError::Store),
        }
    }
    Err(LimiterError::Contention)
}

/// What a process gives back to Redis: requests and tokens of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Returned {
    /// The window (its Redis keys).
    pub window: u64,
    /// Requests given back.
    pub requests: u64,
    /// Tokens given back.
    pub tokens: u64,
}

/// Takes back what the process holds and will not use soon: all of it when the lease was idle
/// for `idle_ms`, or what exceeds twice the current block size when traffic dropped (a
/// shrinking lease). The record gives it up first (compare-and-swap), then the caller sends it
/// to Redis: a lost return under-admits, it never over-admits. A past window's lease is not
/// returned (its keys end with it).
pub fn reclaim(
    store: &dyn CasStore,
    key: &str,
    ask: Ask,
    now_ms: u64,
    p: &LeasePolicy,
) -> Result<Option<Returned>, LimiterError> {
    let (window, _) = window_of(now_ms);
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = read(store, key)?;
        let Some(r) = current.filter(|r| r.window == window) else {
            return Ok(None);
        };
        if (r.held() == 0 && r.held_tokens() == 0) || r.fetching(now_ms, p) {
            return Ok(None);
        }
        let (requests, tokens) = if now_ms.saturating_sub(r.last_active) >= p.idle_ms {
            (r.held(), r.held_tokens())
        } else {
            let w = want(&r, &ask, now_ms, p, false);
            let excess = |held: u64, keep: u64| {
                if held > keep.saturating_mul(2).saturating_add(1) {
                    held - keep
                } else {
                    0
                }
            };
            (
                excess(r.held(), w.requests),
                if ask.tokens.is_some() {
                    excess(r.held_tokens(), w.tokens)
                } else {
                    0
                },
            )
        };
        if requests == 0 && tokens == 0 {
            return Ok(None);
        }
        let mut next = r;
        next.granted -= requests;
        next.granted_tokens -= tokens;
        next.last_grant = next.last_grant.min(next.held().max(1));
        if next.held() == 0 && next.held_tokens() == 0 {
            // Idle: when traffic comes back, its rate is measured afresh.
            next.since = 0;
        }
        match store.set(key, &next.encode(), cas) {
            Ok(()) => {
                return Ok(Some(Returned {
                    window,
                    requests,
                    tokens,
                }))
            }
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Store) => return Err(LimiterError::Store),
        }
    }
    Err(LimiterError::Contention)
}

/// The lease record as stored (tests and the budget endpoint).
pub fn read_record(store: &dyn CasStore, key: &str) -> Result<Option<Record>, LimiterError> {
    Ok(read(store, key)?.0)
}

/// Creates a client's lease record if it does not exist yet (at configure time, on the main
/// thread: see `limiter::ensure_record` for the first-insert race this closes).
pub fn ensure_record(store: &dyn CasStore, key: &str) -> Result<(), StoreError> {
    limiter::ensure_key(store, key, &Record::default().encode())
}

fn read(store: &dyn CasStore, key: &str) -> Result<(Option<Record>, u32), LimiterError> {
    Ok(match store.get(key).map_err(|_| LimiterError::Store)? {
        Some((bytes, cas)) => (Record::decode(&bytes), cas),
        None => (None, 0),
    })
}

/// The Webdis body of a lease call for `want` (`key_md5`: the Redis keys' middle part).
pub fn command(key_md5: &str, ask: &Ask, want: &Want, now_ms: u64, p: &LeasePolicy) -> Vec<u8> {
    let key = webdis::window_key(key_md5, want.window);
    let tokens_key = webdis::tokens_key(key_md5, want.window);
    // The keys live through their window and one more, as with per-request checks.
    let ttl_ms = ((want.window + 2) * WINDOW_MS)
        .saturating_sub(now_ms)
        .max(1);
    webdis::lease_command(&LeaseAsk {
        key: &key,
        limit: ask.limit,
        ttl_ms,
        want: want.requests,
        need: u64::from(want.blocking),
        share_percent: p.share_percent,
        tokens: ask
            .tokens
            .map(|(limit, _)| (tokens_key.as_str(), limit, want.tokens, want.need_tokens)),
    })
}

/// The settlements that give a [`Returned`] lease back: `(Redis key, amount to add)`, sent in
/// the worker's next batch ([`webdis::Settlements`], which only touches keys that still exist).
pub fn returns(key_md5: &str, r: &Returned) -> Vec<(String, i64)> {
    let neg = |n: u64| -i64::try_from(n).unwrap_or(i64::MAX);
    let mut out = Vec::with_capacity(2);
    if r.requests > 0 {
        out.push((webdis::window_key(key_md5, r.window), neg(r.requests)));
    }
    if r.tokens > 0 {
        out.push((webdis::tokens_key(key_md5, r.window), neg(r.tokens)));
    }
    out
}

/// A lease call to make: for a request that waits for it, or a prefetch for the worker's root
/// context (whose answer outlives any request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The client.
    pub client: crate::types::ClientId,
    /// The Redis keys' middle part (MD5 hex of the key, or `name-<client>`).
    pub key_md5: String,
    /// The request's ask (limits; the cost of a waiting request).
    pub ask: Ask,
    /// The block.
    pub want: Want,
}

/// `tollgate_lease_fetches_total{kind,outcome}`: `kind` `blocking` (a request waited) or
/// `prefetch`; `outcome` `granted`, `spent` (the window's budget is used up) or `error`.
pub fn fetches_total(kind: &str, outcome: &str) -> String {
    format!("tollgate_lease_fetches_total.kind={kind}.outcome={outcome}")
}

/// `tollgate_lease_granted_total{kind}`: requests or tokens Redis granted to this process's
/// leases (granted - returned = drawn from leases, once they are idle).
pub fn granted_total(kind: &str) -> String {
    format!("tollgate_lease_granted_total.kind={kind}")
}

/// `tollgate_lease_returned_total{kind}`: requests or tokens given back to Redis.
pub fn returned_total(kind: &str) -> String {
    format!("tollgate_lease_returned_total.kind={kind}")
}

/// `tollgate_lease_breaker_total{kind}`: circuit-breaker transitions ([`Transition`]).
pub fn breaker_total(kind: &str) -> String {
    format!("tollgate_lease_breaker_total.kind={kind}")
}

/// `tollgate_limiter_calls_total{backend,kind}`: Webdis calls of the limiter, `kind` `check`
/// (one request), `lease` (a block) or `settle` (a batch of settlements and returns).
pub fn calls_total(kind: &str) -> String {
    format!("tollgate_limiter_calls_total.backend=redis.kind={kind}")
}

/// Fetch kinds and outcomes of [`fetches_total`].
pub const FETCH_KINDS: [&str; 2] = ["blocking", "prefetch"];
/// Outcomes of [`fetches_total`].
pub const FETCH_OUTCOMES: [&str; 3] = ["granted", "spent", "error"];
/// Kinds of [`calls_total`].
pub const CALL_KINDS: [&str; 3] = ["check", "lease", "settle"];

/// A circuit-breaker transition, for `tollgate_lease_breaker_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Consecutive failures: fetches are short-circuited.
    Opened,
    /// The open time passed: one probe goes through.
    HalfOpen,
    /// A fetch succeeded again.
    Closed,
}

impl Transition {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Opened => "open",
            Transition::HalfOpen => "half_open",
            Transition::Closed => "closed",
        }
    }

    /// Every transition, for defining counters up front.
    pub const ALL: [Transition; 3] = [Transition::Opened, Transition::HalfOpen, Transition::Closed];
}

/// A worker's circuit breaker over lease fetches: after `breaker_failures` consecutive failed
/// fetches (Webdis unreachable, slow, or answering an error status) no request waits for
/// Webdis for `breaker_open_ms`; then one probe goes through, and its answer closes or reopens
/// the breaker. Requests the lease covers never wait for Webdis anyway.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    failures: u32,
    open_until: Option<u64>,
    probe_since: Option<u64>,
}

impl Breaker {
    /// Whether a fetch may be sent now (and a transition to count).
    pub fn allow(&mut self, now_ms: u64, p: &LeasePolicy) -> (bool, Option<Transition>) {
        match (self.open_until, self.probe_since) {
            (None, _) => (true, None),
            (Some(until), _) if now_ms < until => (false, None),
            // One probe at a time; a probe whose answer never came (its request went away)
            // is replaced after the stale time.
            (Some(_), Some(since)) if now_ms.saturating_sub(since) < p.stale_ms => (false, None),
            (Some(_), _) => {
                self.probe_since = Some(now_ms);
                (true, Some(Transition::HalfOpen))
            }
        }
    }

    /// Records a fetch's outcome (`ok`: Webdis answered, whatever Redis said).
    pub fn record(&mut self, ok: bool, now_ms: u64, p: &LeasePolicy) -> Option<Transition> {
        if ok {
            let was_open = self.open_until.is_some();
            *self = Self::default();
            return was_open.then_some(Transition::Closed);
        }
        self.failures = self.failures.saturating_add(1);
        let probing = self.probe_since.take().is_some();
        if probing || (self.open_until.is_none() && self.failures >= p.breaker_failures) {
            self.open_until = Some(now_ms.saturating_add(p.breaker_open_ms));
            return Some(Transition::Opened);
        }
        None
    }

    /// Open (fetches short-circuited, or one probe out).
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

/// [`trips_breaker`] by the failure's metric reason.
pub fn reason_trips_breaker(reason: &str) -> bool {
    matches!(reason, "unavailable" | "timeout" | "status" | "forbidden")
}

/// Whether a failed fetch says Webdis is unhealthy (counts toward the breaker): no answer,
/// too slow, or an error status. A Redis error or a malformed reply is an answer.
pub fn trips_breaker(e: &ReplyError) -> bool {
    matches!(
        e,
        ReplyError::Unavailable | ReplyError::Timeout | ReplyError::Status(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::tests::FakeStore;

    const K: &str = "tollgate.v2.lease.a";
    /// The start of a minute window.
    const W0: u64 = 28_333_334 * WINDOW_MS;

    fn policy() -> LeasePolicy {
        LeasePolicy {
            horizon_ms: 5_000,
            max_block: 1_000,
            share_percent: 10,
            idle_ms: 2_000,
            recheck_ms: 1_000,
            breaker_failures: 3,
            breaker_open_ms: 1_000,
            stale_ms: 400,
        }
    }

    /// The lease script's arithmetic (webdis::LEASE_SCRIPT) over one window's two counters,
    /// line for line; the end-to-end tests run the real script in Redis.
    #[derive(Default, Debug)]
    struct FakeRedis {
        n: u64,
        t: u64,
        calls: u64,
    }

    impl FakeRedis {
        fn lease(&mut self, ask: &Ask, want: &Want, p: &LeasePolicy) -> Leased {
            self.calls += 1;
            let (n, t) = (self.n, self.t);
            let left = ask.limit as i64 - n as i64;
            let need = (u64::from(want.blocking) as i64).max(1);
            let share = p.share_percent as i64;
            let mut gt = 0i64;
            if let Some((tlimit, _)) = ask.tokens {
                let tleft = tlimit as i64 - t as i64;
                let tneed = (want.need_tokens as i64).max(1);
                if tleft < tneed {
                    return Leased {
                        spent: Some(true),
                        requests: 0,
                        tokens: 0,
                        counted: n,
                        tokens_counted: t,
                    };
                }
                gt = (want.tokens as i64)
                    .max(tneed)
                    .min(tneed.max(tleft * share / 100))
                    .min(tleft);
            }
            if left < need {
                return Leased {
                    spent: Some(false),
                    requests: 0,
                    tokens: 0,
                    counted: n,
                    tokens_counted: t,
                };
            }
            let g = (want.requests as i64)
                .max(need)
                .min(need.max(left * share / 100))
                .min(left);
            self.n += g as u64;
            self.t += gt as u64;
            Leased {
                spent: None,
                requests: g as u64,
                tokens: gt as u64,
                counted: self.n,
                tokens_counted: self.t,
            }
        }

        fn give_back(&mut self, r: &Returned) {
            self.calls += 1;
            self.n = self.n.saturating_sub(r.requests);
            self.t = self.t.saturating_sub(r.tokens);
        }
    }

    const ASK: Ask = Ask {
        limit: 100,
        tokens: None,
    };

    /// One request through a replica, fetching synchronously when the lease says so; prefetches
    /// are answered at once too. Returns whether it was admitted.
    fn request(s: &FakeStore, redis: &mut FakeRedis, ask: Ask, now: u64) -> bool {
        let p = policy();
        match admit(s, K, ask, now, &p).unwrap() {
            Admit::Admitted { prefetch, .. } => {
                if let Some(w) = prefetch {
                    let leased = redis.lease(&ask, &w, &p);
                    on_grant(s, K, ask, &w, &leased, now, &p).unwrap();
                }
                true
            }
            Admit::Limited { .. } => false,
            Admit::Fetch(w) => {
                assert!(w.blocking);
                let leased = redis.lease(&ask, &w, &p);
                matches!(
                    on_grant(s, K, ask, &w, &leased, now, &p).unwrap(),
                    Granted::Admitted { .. }
                )
            }
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_count_as_empty() {
        let r = Record {
            window: 7,
            granted: 9,
            used: 3,
            last_grant_tokens: u64::MAX,
            ..Record::default()
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(&r.encode()[1..]), None);
        assert_eq!(Record::decode(b""), None);
        let mut other = r.encode();
        other[0] = 9;
        assert_eq!(Record::decode(&other), None);
    }

    #[test]
    fn first_request_fetches_then_the_lease_admits_without_redis() {
        let s = FakeStore::default();
        ensure_record(&s, K).unwrap();
        let mut redis = FakeRedis::default();
        let p = policy();
        let Admit::Fetch(w) = admit(&s, K, ASK, W0 + 10_000, &p).unwrap() else {
            panic!()
        };
        // No history: a block of one, for the waiting request.
        assert_eq!((w.requests, w.blocking), (1, true));
        assert!(request(&s, &mut redis, ASK, W0 + 10_000));
        assert_eq!(redis.calls, 1);
        // Steady traffic: blocks grow with the measured rate, Redis calls stay rare.
        let mut admitted = 1;
        for i in 0..40 {
            assert!(request(&s, &mut redis, ASK, W0 + 10_000 + i * 100));
            admitted += 1;
        }
        assert_eq!(redis.n, read_record(&s, K).unwrap().unwrap().granted);
        // A limit of 100: blocks are at most 10% of what is left.
        assert!(redis.calls * 3 <= admitted, "{} calls", redis.calls);
    }

    #[test]
    fn a_blocking_grant_admits_its_request_and_keeps_the_rest() {
        let s = FakeStore::default();
        let p = policy();
        let ask = Ask {
            limit: 100,
            tokens: Some((10_000, 300)),
        };
        let Admit::Fetch(mut w) = admit(&s, K, ask, W0, &p).unwrap() else {
            panic!()
        };
        assert_eq!((w.tokens, w.need_tokens), (300, 300));
        w.requests = 5;
        w.tokens = 1_000;
        let mut redis = FakeRedis::default();
        let leased = redis.lease(&ask, &w, &p);
        assert_eq!((leased.requests, leased.tokens), (5, 1_000));
        let Granted::Admitted { requests, tokens } =
            on_grant(&s, K, ask, &w, &leased, W0, &p).unwrap()
        else {
            panic!()
        };
        // 95 left in Redis plus the 4 held here.
        assert_eq!(requests.remaining, 99);
        assert_eq!(tokens.unwrap().remaining, 10_000 - 300);
        let r = read_record(&s, K).unwrap().unwrap();
        assert_eq!(
            (r.granted, r.used, r.granted_tokens, r.used_tokens),
            (5, 1, 1_000, 300)
        );
        // 700 tokens held: a request estimating 800 must fetch, one of 300 is admitted.
        let big = Ask {
            tokens: Some((10_000, 800)),
            ..ask
        };
        assert!(matches!(
            admit(&s, K, big, W0, &p).unwrap(),
            Admit::Fetch(_)
        ));
        assert!(matches!(
            admit(&s, K, ask, W0, &p).unwrap(),
            Admit::Admitted { .. }
        ));
    }

    #[test]
    fn spent_windows_refuse_locally_until_the_recheck() {
        let s = FakeStore::default();
        let p = policy();
        let mut redis = FakeRedis {
            n: 100,
            ..FakeRedis::default()
        };
        assert!(!request(&s, &mut redis, ASK, W0 + 1_000));
        assert_eq!(redis.calls, 1);
        // Refused without asking Redis again until recheck_ms passed.
        match admit(&s, K, ASK, W0 + 1_500, &p).unwrap() {
            Admit::Limited { tokens, window } => {
                assert!(!tokens);
                assert_eq!((window.limit, window.remaining), (100, 0));
                assert_eq!(window.reset_ms, 58_500);
            }
            other => panic!("{other:?}"),
        }
        // Another replica gave 3 back: picked up at the recheck.
        redis.n = 97;
        let Admit::Fetch(w) = admit(&s, K, ASK, W0 + 2_000, &p).unwrap() else {
            panic!("the recheck is due");
        };
        let leased = redis.lease(&ASK, &w, &p);
        assert!(matches!(
            on_grant(&s, K, ASK, &w, &leased, W0 + 2_000, &p).unwrap(),
            Granted::Admitted { .. }
        ));
        assert_eq!(redis.n, 98, "a grant near the end is 1");
    }

    #[test]
    fn one_request_rechecks_a_spent_window_while_the_others_are_refused() {
        let s = FakeStore::default();
        let p = policy();
        let mut redis = FakeRedis {
            n: 100,
            ..FakeRedis::default()
        };
        let t = W0 + 1_000;
        assert!(!request(&s, &mut redis, ASK, t));
        // The recheck is due: the first request asks, the crowd behind it does not.
        let Admit::Fetch(w) = admit(&s, K, ASK, t + 1_000, &p).unwrap() else {
            panic!("the first request rechecks");
        };
        for later in [t + 1_000, t + 1_100, t + 1_000 + p.stale_ms - 1] {
            assert!(matches!(
                admit(&s, K, ASK, later, &p).unwrap(),
                Admit::Limited { .. }
            ));
        }
        // Its answer (another replica gave 2 back) admits it, and the next request too.
        redis.n = 98;
        let leased = redis.lease(&ASK, &w, &p);
        assert!(matches!(
            on_grant(&s, K, ASK, &w, &leased, t + 1_200, &p).unwrap(),
            Granted::Admitted { .. }
        ));
        assert_eq!(redis.calls, 2, "one call for the recheck");
        assert!(request(&s, &mut redis, ASK, t + 1_300));
        // A recheck whose answer never comes is taken as lost after stale_ms: another request
        // asks.
        assert!(!request(&s, &mut redis, ASK, t + 1_400));
        let due = read_record(&s, K).unwrap().unwrap().spent_until;
        assert!(matches!(
            admit(&s, K, ASK, due, &p).unwrap(),
            Admit::Fetch(_)
        ));
        assert!(matches!(
            admit(&s, K, ASK, due + p.stale_ms, &p).unwrap(),
            Admit::Fetch(_)
        ));
    }

    #[test]
    fn spent_rechecks_back_off_and_a_grant_resets_them() {
        let s = FakeStore::default();
        let p = policy();
        let mut redis = FakeRedis {
            n: 100,
            ..FakeRedis::default()
        };
        let refused_until = |s: &FakeStore| read_record(s, K).unwrap().unwrap().spent_until;
        let t = W0 + 1_000;
        assert!(!request(&s, &mut redis, ASK, t));
        assert_eq!(refused_until(&s), t + 1_000, "first answer: recheck_ms");
        assert!(!request(&s, &mut redis, ASK, t + 1_000));
        assert_eq!(refused_until(&s), t + 3_000, "second: doubled");
        assert!(matches!(
            admit(&s, K, ASK, t + 2_999, &p).unwrap(),
            Admit::Limited { .. }
        ));
        assert!(!request(&s, &mut redis, ASK, t + 3_000));
        assert_eq!(
            refused_until(&s),
            t + 3_000 + (p.recheck_ms << RECHECK_DOUBLINGS),
            "capped"
        );
        assert_eq!(redis.calls, 3);
        // Budget given back is found at the next recheck, and resets the interval.
        redis.n = 98;
        let again = t + 3_000 + (p.recheck_ms << RECHECK_DOUBLINGS);
        assert!(request(&s, &mut redis, ASK, again));
        assert!(request(&s, &mut redis, ASK, again + 1));
        assert!(!request(&s, &mut redis, ASK, again + 2));
        assert_eq!(refused_until(&s), again + 2 + 1_000);
        // Never past the window's end.
        let late = W0 + WINDOW_MS - 500;
        assert!(!request(&s, &mut redis, ASK, late));
        assert!(!request(&s, &mut redis, ASK, late + 100));
        assert_eq!(refused_until(&s), W0 + WINDOW_MS);
    }

    #[test]
    fn a_process_whose_traffic_starts_mid_window_sizes_blocks_by_its_rate() {
        let s = FakeStore::default();
        let mut redis = FakeRedis::default();
        let ask = Ask {
            limit: 100_000,
            tokens: None,
        };
        // 50 requests/s from 40 s into the window (a new replica, or a client's traffic
        // starting): the rate is measured from the first grant, not from the window's start
        // (which would read 1/40 of it at first and grow blocks slowly).
        let start = W0 + 40_000;
        for i in 0..500 {
            assert!(request(&s, &mut redis, ask, start + i * 20));
        }
        assert!(redis.calls * 50 <= 500, "{} calls", redis.calls);
        let r = read_record(&s, K).unwrap().unwrap();
        assert_eq!((r.since, r.since_used), (start, 0));
        // 50/s over 5 s: the last blocks cover the horizon.
        assert!(r.last_grant >= 200, "{r:?}");
        // Idle: all of it goes back, and the rate is measured afresh when traffic returns.
        let idle = start + 10_000 + p_idle();
        assert!(reclaim(&s, K, ask, idle, &policy()).unwrap().is_some());
        assert_eq!(read_record(&s, K).unwrap().unwrap().since, 0);
        assert!(request(&s, &mut redis, ask, idle + 1));
        assert_eq!(read_record(&s, K).unwrap().unwrap().since, idle + 1);
    }

    fn p_idle() -> u64 {
        policy().idle_ms
    }

    #[test]
    fn blocks_shrink_to_one_as_the_budget_runs_out() {
        let s = FakeStore::default();
        let p = policy();
        let mut redis = FakeRedis::default();
        let ask = Ask {
            limit: 1_000,
            tokens: None,
        };
        // A busy previous window: wants are large from the start.
        s.set(
            K,
            &Record {
                window: W0 / WINDOW_MS - 1,
                used: 60_000,
                ..Record::default()
            }
            .encode(),
            0,
        )
        .unwrap();
        let mut grants = Vec::new();
        let mut now = W0;
        while redis.n < 1_000 {
            let Admit::Fetch(w) = admit(&s, K, ask, now, &p).unwrap() else {
                // Drain what is held.
                now += 1;
                continue;
            };
            let leased = redis.lease(&ask, &w, &p);
            grants.push(leased.requests);
            on_grant(&s, K, ask, &w, &leased, now, &p).unwrap();
            now += 1;
        }
        assert_eq!(grants[0], 100, "10% of what is left");
        assert!(grants.windows(2).all(|g| g[1] <= g[0]), "{grants:?}");
        assert_eq!(grants.last(), Some(&1));
        assert_eq!(grants.iter().sum::<u64>(), 1_000);
    }

    #[test]
    fn a_late_grant_admits_its_request_and_stores_nothing() {
        let s = FakeStore::default();
        let p = policy();
        let Admit::Fetch(w) = admit(&s, K, ASK, W0 - 1, &p).unwrap() else {
            panic!()
        };
        let mut redis = FakeRedis::default();
        let leased = redis.lease(&ASK, &Want { requests: 5, ..w }, &p);
        let granted = on_grant(&s, K, ASK, &w, &leased, W0 + 5, &p).unwrap();
        assert!(matches!(granted, Granted::Admitted { requests, .. } if requests.reset_ms == 1));
        assert_eq!(read_record(&s, K).unwrap(), None, "nothing stored");
    }

    #[test]
    fn prefetch_is_marked_once_and_cleared_by_its_answer_or_failure() {
        let s = FakeStore::default();
        let p = policy();
        let mut redis = FakeRedis::default();
        let w = Want {
            window: W0 / WINDOW_MS,
            requests: 4,
            tokens: 0,
            blocking: true,
            need_tokens: 0,
        };
        let leased = redis.lease(&ASK, &w, &p);
        on_grant(&s, K, ASK, &w, &leased, W0, &p).unwrap();
        // 3 held, last block 4: the next admission leaves 2 = half: prefetch.
        let Admit::Admitted {
            prefetch: Some(next),
            ..
        } = admit(&s, K, ASK, W0 + 1, &p).unwrap()
        else {
            panic!()
        };
        assert!(!next.blocking);
        // Marked: the next admission does not ask again.
        assert!(matches!(
            admit(&s, K, ASK, W0 + 2, &p).unwrap(),
            Admit::Admitted { prefetch: None, .. }
        ));
        on_fetch_failed(&s, K).unwrap();
        assert!(matches!(
            admit(&s, K, ASK, W0 + 3, &p).unwrap(),
            Admit::Admitted {
                prefetch: Some(_),
                ..
            }
        ));
        // A lost prefetch is forgotten after stale_ms.
        assert!(matches!(
            admit(&s, K, ASK, W0 + 3 + p.stale_ms, &p).unwrap(),
            Admit::Fetch(_)
        ));
        let leased = redis.lease(&ASK, &next, &p);
        on_grant(&s, K, ASK, &next, &leased, W0 + 4, &p).unwrap();
        assert_eq!(read_record(&s, K).unwrap().unwrap().fetching_since, 0);
    }

    #[test]
    fn idle_and_oversized_leases_go_back() {
        let s = FakeStore::default();
        let p = policy();
        let mut redis = FakeRedis::default();
        let ask = Ask {
            limit: 1_000,
            tokens: Some((100_000, 10)),
        };
        let w = Want {
            window: W0 / WINDOW_MS,
            requests: 50,
            tokens: 500,
            blocking: true,
            need_tokens: 10,
        };
        let leased = redis.lease(&ask, &w, &p);
        on_grant(&s, K, ask, &w, &leased, W0 + 30_000, &p).unwrap();
        // One request since this process's traffic began (a rate over at least a second:
        // 1/s): the block of 50 is far more than 5 s of it; 5 stay.
        let back = reclaim(&s, K, ask, W0 + 30_001, &p).unwrap().unwrap();
        assert_eq!((back.requests, back.tokens), (44, 440));
        redis.give_back(&back);
        assert_eq!(
            returns("abc", &back),
            vec![
                (format!("rate:abc:{}", W0 / WINDOW_MS), -44),
                (format!("tokens:abc:{}", W0 / WINDOW_MS), -440)
            ]
        );
        // Idle for idle_ms: the rest goes back too.
        assert_eq!(reclaim(&s, K, ask, W0 + 31_000, &p).unwrap(), None);
        let back = reclaim(&s, K, ask, W0 + 32_000, &p).unwrap().unwrap();
        assert_eq!((back.requests, back.tokens), (5, 50));
        redis.give_back(&back);
        assert_eq!(
            (redis.n, redis.t),
            (1, 10),
            "only what was used stays counted"
        );
        assert_eq!(reclaim(&s, K, ask, W0 + 40_000, &p).unwrap(), None);
        // A past window's lease is never returned.
        assert_eq!(reclaim(&s, K, ask, W0 + WINDOW_MS, &p).unwrap(), None);
    }

    #[test]
    fn store_failures_are_errors() {
        let s = FakeStore::default();
        let p = policy();
        s.fail_get.set(true);
        assert_eq!(admit(&s, K, ASK, W0, &p), Err(LimiterError::Store));
        s.fail_get.set(false);
        ensure_record(&s, K).unwrap();
        s.conflicts.set(CAS_ATTEMPTS);
        let w = Want {
            window: W0 / WINDOW_MS,
            requests: 2,
            tokens: 0,
            blocking: true,
            need_tokens: 0,
        };
        let leased = FakeRedis::default().lease(&ASK, &w, &p);
        assert_eq!(
            on_grant(&s, K, ASK, &w, &leased, W0, &p),
            Err(LimiterError::Contention)
        );
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let p = policy();
        let mut b = Breaker::default();
        assert_eq!(b.allow(0, &p), (true, None));
        assert_eq!(b.record(false, 0, &p), None);
        assert_eq!(b.record(false, 1, &p), None);
        assert_eq!(b.record(false, 2, &p), Some(Transition::Opened));
        assert!(b.is_open());
        assert_eq!(b.allow(500, &p), (false, None));
        // Open time over: one probe, the others still short-circuit.
        assert_eq!(b.allow(1_002, &p), (true, Some(Transition::HalfOpen)));
        assert_eq!(b.allow(1_003, &p), (false, None));
        assert_eq!(b.record(false, 1_010, &p), Some(Transition::Opened));
        assert_eq!(b.allow(1_500, &p), (false, None));
        assert_eq!(b.allow(2_010, &p), (true, Some(Transition::HalfOpen)));
        // A probe that never came back is replaced after stale_ms.
        assert_eq!(b.allow(2_100, &p), (false, None));
        assert_eq!(b.allow(2_410, &p), (true, Some(Transition::HalfOpen)));
        assert_eq!(b.record(true, 2_420, &p), Some(Transition::Closed));
        assert_eq!(b.allow(2_421, &p), (true, None));
        assert_eq!(b.record(true, 2_422, &p), None);
        assert!(trips_breaker(&ReplyError::Timeout));
        assert!(!trips_breaker(&ReplyError::Redis(String::new())));
    }

    /// A small deterministic generator (no seeds from the environment).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// N replicas (each its own store: one Envoy process) share one Redis for three windows,
    /// with skewed load (80% to one replica, which changes every 20 s); prefetches are answered
    /// one millisecond later (in flight meanwhile) and leases are reclaimed on a 100 ms tick.
    /// Every window: never more than the limit admitted; a client over its limit uses its
    /// budget up to 1%; one under it is refused less than 1% of its requests.
    #[test]
    fn replicas_never_over_admit_and_under_admit_little() {
        let p = policy();
        // (replicas, limit, demand per minute, Redis calls per admitted at most 1 in)
        for (n, limit, demand, per_call) in [
            (3, 600, 900, 4),
            (10, 600, 900, 2),
            (10, 6_000, 9_000, 10),
            (10, 60_000, 90_000, 50),
            (10, 6_000, 3_000, 8),
        ] {
            let ask = Ask {
                limit,
                tokens: None,
            };
            let stores: Vec<FakeStore> = (0..n).map(|_| FakeStore::default()).collect();
            let mut rng = Lcg(42);
            let mut acc = 0u64;
            for window in 0..3u64 {
                let start = W0 + window * WINDOW_MS;
                let mut redis = FakeRedis::default();
                let (mut admitted, mut refused) = (0u64, 0u64);
                let mut pending: Vec<(usize, Want)> = Vec::new();
                for ms in 0..WINDOW_MS {
                    let now = start + ms;
                    for (i, w) in pending.drain(..) {
                        let leased = redis.lease(&ask, &w, &p);
                        on_grant(&stores[i], K, ask, &w, &leased, now, &p).unwrap();
                    }
                    if ms % 100 == 0 {
                        for s in &stores {
                            if let Some(back) = reclaim(s, K, ask, now, &p).unwrap() {
                                redis.give_back(&back);
                            }
                        }
                    }
                    acc += demand;
                    while acc >= WINDOW_MS {
                        acc -= WINDOW_MS;
                        let hot = (ms / 20_000) as usize % n;
                        let i = if rng.next() % 10 < 8 {
                            hot
                        } else {
                            rng.next() as usize % n
                        };
                        let s = &stores[i];
                        let ok = match admit(s, K, ask, now, &p).unwrap() {
                            Admit::Admitted { prefetch, .. } => {
                                if let Some(w) = prefetch {
                                    pending.push((i, w));
                                }
                                true
                            }
                            Admit::Limited { .. } => false,
                            Admit::Fetch(w) => {
                                let leased = redis.lease(&ask, &w, &p);
                                matches!(
                                    on_grant(s, K, ask, &w, &leased, now, &p).unwrap(),
                                    Granted::Admitted { .. }
                                )
                            }
                        };
                        if ok {
                            admitted += 1;
                        } else {
                            refused += 1;
                        }
                    }
                }
                let held: u64 = stores
                    .iter()
                    .filter_map(|s| read_record(s, K).unwrap())
                    .filter(|r| r.window == start / WINDOW_MS)
                    .map(|r| r.held())
                    .sum();
                let case = format!(
                    "N={n} limit {limit} demand {demand} window {window}: {admitted} admitted, \
                     {refused} refused, {} Redis calls; at the end {held} held, {} counted",
                    redis.calls, redis.n
                );
                eprintln!("{case}");
                assert!(admitted <= limit, "{case}");
                if demand > limit {
                    assert!(admitted * 100 >= limit * 99, "{case}");
                } else {
                    assert!(refused * 100 <= demand, "{case}");
                }
                assert!(redis.calls * per_call <= admitted, "{case}");
            }
        }
    }
}

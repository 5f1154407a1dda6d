//! The Redis limiter's wire protocol: one Lua script call through Webdis (Redis over HTTP), and
//! a strict reading of Webdis's replies.
//!
//! Envoy's only ways out of a wasm filter are HTTP and gRPC callouts, so Redis is reached through
//! Webdis. One check is one round trip: `POST /` with the command in the body
//! (`EVAL/<script>/1/<key>/<limit>/<ttl ms>`), which keeps the script out of URLs and logs.
//!
//! Keys follow the older proxy's layout, `rate:<md5 hex of the client key>:<unix minute>`, so the
//! old proxy and Tollgate can share one budget during a migration. A client with a token limit
//! has a second key in the same script call, `tokens:<md5 hex>:<unix minute>`: the window's
//! reserved and settled tokens.
//!
//! Token reservations are settled after the response ([`Settlements`]): the difference between
//! the estimate and the real usage is added with one more script call (`INCRBY` on keys that
//! still exist), batched per worker.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::base64;
use crate::spend::{Measure, Period};

/// Checks a request against its minute window and, with a second key, its token window,
/// atomically. `ARGV`: request limit, key ttl in ms, token limit, token cost.
///
/// Returns `{verdict, requests counted, request key ttl ms}` plus, with a token key, the tokens
/// counted: verdict 1 admitted (both counted), 0 over the request limit, 2 over the token limit.
/// A refusal counts nothing (as in the local limiter). Keys expire a minute after their window
/// ends, so no key outlives two windows.
pub const SCRIPT: &str = "local n = tonumber(redis.call('GET', KEYS[1]) or '0') \
local t = nil \
if KEYS[2] then \
t = tonumber(redis.call('GET', KEYS[2]) or '0') \
if t + math.max(tonumber(ARGV[4]), 1) > tonumber(ARGV[3]) then \
return {2, n, redis.call('PTTL', KEYS[1]), t} end end \
if n >= tonumber(ARGV[1]) then return {0, n, redis.call('PTTL', KEYS[1]), t} end \
n = redis.call('INCR', KEYS[1]) \
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
if KEYS[2] then \
t = redis.call('INCRBY', KEYS[2], ARGV[4]) \
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end end \
return {1, n, redis.call('PTTL', KEYS[1]), t}";

/// Adds each `ARGV[i]` to `KEYS[i]` if the key still exists (a key that expired belongs to a
/// window that is over; re-creating it would leave a key without a ttl), never below 0.
pub const SETTLE_SCRIPT: &str = "for i, k in ipairs(KEYS) do \
if redis.call('EXISTS', k) == 1 then \
if redis.call('INCRBY', k, ARGV[i]) < 0 then redis.call('SET', k, 0, 'KEEPTTL') end end end \
return #KEYS";

/// Checks and counts any number of counters atomically: `ARGV` holds, per key, its limit (-1:
/// none, counted only), this request's cost and the key's ttl in ms. A counter with a limit
/// refuses when its value plus the cost (at least 1) would pass the limit. Returns
/// `{1, 0, value of each counter after counting}` or, refused, `{0, index of the first counter
/// that refused (1-based), its value}`; a refusal counts nothing.
pub const COUNTERS_SCRIPT: &str = "for i = 1, #KEYS do \
local n = tonumber(redis.call('GET', KEYS[i]) or '0') \
local limit = tonumber(ARGV[3*i-2]) \
if limit >= 0 and n + math.max(tonumber(ARGV[3*i-1]), 1) > limit then return {0, i, n} end end \
local out = {1, 0} \
for i = 1, #KEYS do \
out[i+2] = redis.call('INCRBY', KEYS[i], ARGV[3*i-1]) \
if redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], ARGV[3*i]) end end \
return out";

/// Takes a lease: a block of the window's requests (`KEYS[1]`) and, with a second key, of its
/// tokens, atomically. `ARGV`: request limit, key ttl in ms, requests wanted, requests needed
/// (1 when a request waits for this block, 0 for a prefetch), share percent, then with a token
/// key: token limit, tokens wanted, tokens needed.
///
/// The counter holds what was *granted* to replicas (a request is admitted only from a grant),
/// so the grants of every replica together never pass the limit. A grant is the smallest of
/// what was wanted, what is left, and `share percent` of what is left (at least what is
/// needed, at least 1): blocks shrink to 1 as the window's budget runs out.
///
/// Returns `{1, requests granted, tokens granted, requests counted, tokens counted}`, or
/// `{0, 0, 0, counted, tokens counted}` when fewer requests are left than needed (at least 1),
/// `{2, ...}` likewise for tokens; a refusal counts nothing.
pub const LEASE_SCRIPT: &str = "local n = tonumber(redis.call('GET', KEYS[1]) or '0') \
local left = tonumber(ARGV[1]) - n \
local need = math.max(tonumber(ARGV[4]), 1) \
local share = tonumber(ARGV[5]) \
local t = 0 \
local gt = 0 \
if KEYS[2] then \
t = tonumber(redis.call('GET', KEYS[2]) or '0') \
local tleft = tonumber(ARGV[6]) - t \
local tneed = math.max(tonumber(ARGV[8]), 1) \
if tleft < tneed then return {2, 0, 0, n, t} end \
gt = math.min(math.max(tonumber(ARGV[7]), tneed), math.max(tneed, math.floor(tleft * share / 100)), tleft) end \
if left < need then return {0, 0, 0, n, t} end \
local g = math.min(math.max(tonumber(ARGV[3]), need), math.max(need, math.floor(left * share / 100)), left) \
n = redis.call('INCRBY', KEYS[1], g) \
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
if KEYS[2] then \
t = redis.call('INCRBY', KEYS[2], gt) \
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end end \
return {1, g, gt, n, t}";

/// What a lease call asks for (see [`LEASE_SCRIPT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAsk<'a> {
    /// [`window_key`].
    pub key: &'a str,
    /// Requests per minute.
    pub limit: u64,
    /// Ttl of a key the call creates.
    pub ttl_ms: u64,
    /// Block size wanted.
    pub want: u64,
    /// Requests needed now (1: a request waits for this block; 0: prefetch).
    pub need: u64,
    /// At most this percentage of what is left.
    pub share_percent: u64,
    /// With a token limit: [`tokens_key`], limit, tokens wanted, tokens needed now.
    pub tokens: Option<(&'a str, u64, u64, u64)>,
}

/// The Webdis request body of one lease call.
pub fn lease_command(ask: &LeaseAsk) -> Vec<u8> {
    let mut body = String::with_capacity(LEASE_SCRIPT.len() * 3 / 2 + 160);
    body.push_str("EVAL/");
    percent_encode_into(&mut body, LEASE_SCRIPT);
    match ask.tokens {
        None => {
            body.push_str("/1/");
            percent_encode_into(&mut body, ask.key);
        }
        Some((key, ..)) => {
            body.push_str("/2/");
            percent_encode_into(&mut body, ask.key);
            body.push('/');
            percent_encode_into(&mut body, key);
        }
    }
    let _ = write!(
        body,
        "/{}/{}/{}/{}/{}",
        ask.limit, ask.ttl_ms, ask.want, ask.need, ask.share_percent
    );
    if let Some((_, limit, want, need)) = ask.tokens {
        let _ = write!(body, "/{limit}/{want}/{need}");
    }
    body.into_bytes()
}

/// The answer to a lease call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leased {
    /// `None`: granted; `Some(false)`: the window's requests are spent; `Some(true)`: its
    /// tokens are.
    pub spent: Option<bool>,
    /// Requests granted.
    pub requests: u64,
    /// Tokens granted.
    pub tokens: u64,
    /// Requests granted to all replicas in the window so far (this grant included).
    pub counted: u64,
    /// Tokens likewise.
    pub tokens_counted: u64,
}

impl Leased {
    /// Requests and tokens Redis granted (and counted) with this reply: none when the window
    /// was spent.
    pub fn granted(&self) -> (u64, u64) {
        match self.spent {
            None => (self.requests, self.tokens),
            Some(_) => (0, 0),
        }
    }
}

/// Reads a Webdis reply to [`lease_command`].
pub fn parse_lease_reply(status: Option<u16>, body: &[u8]) -> Result<Leased, ReplyError> {
    let reply = eval_reply(status, body)?;
    let items = reply.as_array().ok_or(ReplyError::Malformed)?;
    let number = |v: &serde_json::Value| v.as_u64().ok_or(ReplyError::Malformed);
    let [v, g, gt, n, t] = items.as_slice() else {
        return Err(ReplyError::Malformed);
    };
    let spent = match v.as_i64() {
        Some(1) => None,
        Some(0) => Some(false),
        Some(2) => Some(true),
        _ => return Err(ReplyError::Malformed),
    };
    let leased = Leased {
        spent,
        requests: number(g)?,
        tokens: number(gt)?,
        counted: number(n)?,
        tokens_counted: number(t)?,
    };
    if spent.is_none() && leased.requests == 0 {
        return Err(ReplyError::Malformed);
    }
    Ok(leased)
}

/// Reads counters: the value of each key, 0 where it does not exist.
pub const READ_SCRIPT: &str = "local out = {} \
for i, k in ipairs(KEYS) do out[i] = tonumber(redis.call('GET', k) or '0') end \
return out";

/// The Webdis request body that reads `keys` with [`READ_SCRIPT`].
pub fn read_command(keys: &[String]) -> Vec<u8> {
    let mut body = String::with_capacity(READ_SCRIPT.len() * 3 / 2 + keys.len() * 64);
    body.push_str("EVAL/");
    percent_encode_into(&mut body, READ_SCRIPT);
    let _ = write!(body, "/{}", keys.len());
    for k in keys {
        body.push('/');
        percent_encode_into(&mut body, k);
    }
    body.into_bytes()
}

/// Reads a Webdis reply to [`read_command`] of `n` keys.
pub fn parse_read_reply(
    status: Option<u16>,
    body: &[u8],
    n: usize,
) -> Result<Vec<u64>, ReplyError> {
    let reply = eval_reply(status, body)?;
    let items = reply.as_array().ok_or(ReplyError::Malformed)?;
    if items.len() != n {
        return Err(ReplyError::Malformed);
    }
    items
        .iter()
        .map(|v| v.as_u64().ok_or(ReplyError::Malformed))
        .collect()
}

/// Prefix of the spend records: `tollgate:spend:<day number>:<client>:<model>`, micro-units
/// spent that day (days of the budgets' time zone), for `tollgate spend`.
pub const SPEND_KEY_PREFIX: &str = "tollgate:spend:";

/// How long a day's spend record is kept: a little more than a year.
pub const SPEND_TTL_MS: u64 = 400 * 86_400_000;

/// Adds `ARGV[i]` to `KEYS[i]`, creating it with a ttl of the last `ARGV` if it is new.
pub const SPEND_SCRIPT: &str = "local n = #KEYS \
for i, k in ipairs(KEYS) do redis.call('INCRBY', k, ARGV[i]) \
if redis.call('PTTL', k) < 0 then redis.call('PEXPIRE', k, ARGV[n+1]) end end \
return n";

/// Redis key of a client's spend on a model in a day.
pub fn spend_key(day: u64, client: &str, model: &str) -> String {
    format!("{SPEND_KEY_PREFIX}{day}:{client}:{model}")
}

/// The Webdis request body that records spend with [`SPEND_SCRIPT`].
pub fn spend_command(records: &[(String, i64)]) -> Vec<u8> {
    let mut body = String::with_capacity(SPEND_SCRIPT.len() * 3 / 2 + records.len() * 64);
    body.push_str("EVAL/");
    percent_encode_into(&mut body, SPEND_SCRIPT);
    let _ = write!(body, "/{}", records.len());
    for (key, _) in records {
        body.push('/');
        percent_encode_into(&mut body, key);
    }
    for (_, n) in records {
        let _ = write!(body, "/{n}");
    }
    let _ = write!(body, "/{SPEND_TTL_MS}");
    body.into_bytes()
}

/// Redis key of one measure of a client's budget window:
/// `tollgate:budget:<client>:<period>:<window number>:<measure>`.
pub fn budget_key(client: &str, period: Period, window: u64, measure: Measure) -> String {
    format!(
        "tollgate:budget:{client}:{}:{window}:{}",
        period.as_str(),
        measure.as_str()
    )
}

/// One counter of a [`COUNTERS_SCRIPT`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// Redis key.
    pub key: String,
    /// Limit, if this counter can refuse.
    pub limit: Option<u64>,
    /// What this request adds.
    pub cost: u64,
    /// The key's lifetime when the script creates it.
    pub ttl_ms: u64,
}

/// The Webdis request body that checks and counts `counters` with [`COUNTERS_SCRIPT`].
pub fn counters_command(counters: &[Counter]) -> Vec<u8> {
    let mut body = String::with_capacity(COUNTERS_SCRIPT.len() * 3 / 2 + counters.len() * 96);
    body.push_str("EVAL/");
    percent_encode_into(&mut body, COUNTERS_SCRIPT);
    let _ = write!(body, "/{}", counters.len());
    for c in counters {
        body.push('/');
        percent_encode_into(&mut body, &c.key);
    }
    for c in counters {
        match c.limit {
            Some(l) => {
                let _ = write!(body, "/{l}");
            }
            None => body.push_str("/-1"),
        }
        let _ = write!(body, "/{}/{}", c.cost, c.ttl_ms);
    }
    body.into_bytes()
}

/// The answer of a [`COUNTERS_SCRIPT`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counted {
    /// Every counter counted; their values after counting, in order.
    Admitted(Vec<u64>),
    /// The counter at this index (0-based) refused, with its value; nothing counted.
    Refused(usize, u64),
}

/// Reads a Webdis reply to [`counters_command`] of `n` counters.
pub fn parse_counters_reply(
    status: Option<u16>,
    body: &[u8],
    n: usize,
) -> Result<Counted, ReplyError> {
    let reply = eval_reply(status, body)?;
    let items = reply.as_array().ok_or(ReplyError::Malformed)?;
    let number = |v: &serde_json::Value| v.as_u64().ok_or(ReplyError::Malformed);
    match items.as_slice() {
        [v, i, used] if v.as_i64() == Some(0) => {
            let i = usize::try_from(number(i)?).map_err(|_| ReplyError::Malformed)?;
            if i == 0 || i > n {
                return Err(ReplyError::Malformed);
            }
            Ok(Counted::Refused(i - 1, number(used)?))
        }
        [v, _, values @ ..] if v.as_i64() == Some(1) && values.len() == n => Ok(Counted::Admitted(
            values.iter().map(number).collect::<Result<_, _>>()?,
        )),
        _ => Err(ReplyError::Malformed),
    }
}

/// Redis key of a client's window: `rate:<md5 hex>:<unix minute>`.
pub fn window_key(key_md5_hex: &str, minute: u64) -> String {
    format!("rate:{key_md5_hex}:{minute}")
}

/// Redis key of a client's token window: `tokens:<md5 hex>:<unix minute>`.
pub fn tokens_key(key_md5_hex: &str, minute: u64) -> String {
    format!("tokens:{key_md5_hex}:{minute}")
}

/// The token part of a check: the client's token window key, its limit and this request's
/// estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCheck<'a> {
    /// [`tokens_key`].
    pub key: &'a str,
    /// Tokens per minute.
    pub limit: u64,
    /// Tokens to reserve.
    pub cost: u64,
}

/// The Webdis request body for one check.
pub fn check_command(key: &str, limit: u64, ttl_ms: u64, tokens: Option<TokenCheck>) -> Vec<u8> {
    let mut body = String::with_capacity(SCRIPT.len() * 3 / 2 + key.len() * 2 + 60);
    body.push_str("EVAL/");
    percent_encode_into(&mut body, SCRIPT);
    match tokens {
        None => {
            body.push_str("/1/");
            percent_encode_into(&mut body, key);
            let _ = write!(body, "/{limit}/{ttl_ms}");
        }
        Some(t) => {
            body.push_str("/2/");
            percent_encode_into(&mut body, key);
            body.push('/');
            percent_encode_into(&mut body, t.key);
            let _ = write!(body, "/{limit}/{ttl_ms}/{}/{}", t.limit, t.cost);
        }
    }
    body.into_bytes()
}

/// The Webdis request body that applies `adjustments` (key, tokens to add; negative gives
/// back) with [`SETTLE_SCRIPT`].
pub fn settle_command(adjustments: &[(String, i64)]) -> Vec<u8> {
    let mut body = String::with_capacity(SETTLE_SCRIPT.len() * 3 / 2 + adjustments.len() * 64);
    body.push_str("EVAL/");
    percent_encode_into(&mut body, SETTLE_SCRIPT);
    let _ = write!(body, "/{}", adjustments.len());
    for (key, _) in adjustments {
        body.push('/');
        percent_encode_into(&mut body, key);
    }
    for (_, delta) in adjustments {
        let _ = write!(body, "/{delta}");
    }
    body.into_bytes()
}

/// Token adjustments waiting to be sent to Redis, summed per key: one worker's settlements
/// between two flushes. Bounded: past [`Settlements::MAX_KEYS`] keys, new keys are refused (and
/// counted by the caller), so a Redis outage cannot grow the filter's memory.
#[derive(Debug, Default)]
pub struct Settlements {
    pending: HashMap<String, i64>,
    /// Spend records ([`SPEND_KEY_PREFIX`] keys), created when new.
    spend: HashMap<String, i64>,
}

impl Settlements {
    /// Most distinct keys held (two windows of many clients fit).
    pub const MAX_KEYS: usize = 4096;
    /// Most keys per Webdis call (keeps each call's body a few kilobytes).
    pub const BATCH: usize = 64;

    /// Adds `delta` to `key`'s pending adjustment. `false`: refused, the queue is full.
    /// A [`SPEND_KEY_PREFIX`] key is a spend record, created if new; any other key is an
    /// adjustment of a counter that only applies while the counter exists.
    pub fn add(&mut self, key: String, delta: i64) -> bool {
        if delta == 0 {
            return true;
        }
        let full = self.pending.len() + self.spend.len() >= Self::MAX_KEYS;
        let map = if key.starts_with(SPEND_KEY_PREFIX) {
            &mut self.spend
        } else {
            &mut self.pending
        };
        if let Some(d) = map.get_mut(&key) {
            *d = d.saturating_add(delta);
            return true;
        }
        if full {
            return false;
        }
        map.insert(key, delta);
        true
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.spend.is_empty()
    }

    /// Takes everything waiting, as Webdis request bodies of at most [`Settlements::BATCH`]
    /// keys each (adjustments that summed to 0 are dropped).
    pub fn drain_commands(&mut self) -> Vec<Vec<u8>> {
        let mut all: Vec<(String, i64)> = self.pending.drain().filter(|(_, d)| *d != 0).collect();
        all.sort();
        let mut spend: Vec<(String, i64)> = self.spend.drain().filter(|(_, d)| *d != 0).collect();
        spend.sort();
        all.chunks(Self::BATCH)
            .map(settle_command)
            .chain(spend.chunks(Self::BATCH).map(spend_command))
            .collect()
    }
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

/// What a check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Counted (and the tokens reserved): the request may proceed.
    Admitted,
    /// Over the request limit; nothing counted.
    RequestsLimited,
    /// Over the token limit; nothing counted.
    TokensLimited,
}

/// A successful check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// The verdict.
    pub checked: Checked,
    /// Requests counted in the window after this call.
    pub count: u64,
    /// Milliseconds until the Redis key expires (-1/-2 from Redis become `None`).
    pub key_ttl_ms: Option<u64>,
    /// Tokens counted in the token window after this call (checks with a token key).
    pub tokens: Option<u64>,
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
    /// Not sent: this worker's circuit breaker is open after consecutive failures (leases).
    CircuitOpen,
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
            ReplyError::CircuitOpen => "circuit_open",
        }
    }

    /// Every reason, so the filter can define the counters up front ([`ReplyError::CircuitOpen`]
    /// only exists with leases, whose counters define it).
    pub const REASONS: [&'static str; 6] = [
        "unavailable",
        "timeout",
        "forbidden",
        "status",
        "redis_error",
        "malformed",
    ];
}

/// Tells a timed-out callout from a refused one: Envoy reports both by calling back without
/// headers ([`ReplyError::Unavailable`]). Refusals and resets come back in a few milliseconds; a
/// timeout at `timeout_ms` on Envoy's event-loop clock, which under load trails the wall clock
/// the filter reads, so it may arrive a little before `timeout_ms` of wall time: half of it is
/// the line.
pub fn timed_out(e: ReplyError, elapsed_ms: u64, timeout_ms: u32) -> ReplyError {
    match e {
        ReplyError::Unavailable if elapsed_ms.saturating_mul(2) >= u64::from(timeout_ms) => {
            ReplyError::Timeout
        }
        other => other,
    }
}

/// The value of a Webdis reply to an `EVAL` (`{"EVAL": <value>}`), or why there is none.
/// `status` is `None` when Envoy called back without headers (a failed callout).
fn eval_reply(status: Option<u16>, body: &[u8]) -> Result<serde_json::Value, ReplyError> {
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
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| ReplyError::Malformed)?;
    let reply = value
        .get_mut("EVAL")
        .map(serde_json::Value::take)
        .ok_or(ReplyError::Malformed)?;
    // A Redis error: [false, "ERR ..."].
    if let Some([serde_json::Value::Bool(false), msg]) = reply.as_array().map(Vec::as_slice) {
        let msg = msg.as_str().unwrap_or("unknown Redis error");
        return Err(ReplyError::Redis(msg.chars().take(200).collect()));
    }
    Ok(reply)
}

/// Reads a Webdis reply to [`check_command`]. `status` is `None` when Envoy called back without
/// headers (a failed callout).
pub fn parse_reply(status: Option<u16>, body: &[u8]) -> Result<Count, ReplyError> {
    let reply = eval_reply(status, body)?;
    let items = reply.as_array().ok_or(ReplyError::Malformed)?;
    let (verdict, count, ttl, tokens) = match items.as_slice() {
        [v, c, t] => (v, c, t, None),
        [v, c, t, tokens] => (v, c, t, Some(tokens)),
        _ => return Err(ReplyError::Malformed),
    };
    let checked = match verdict.as_i64() {
        Some(1) => Checked::Admitted,
        Some(0) => Checked::RequestsLimited,
        Some(2) if tokens.is_some() => Checked::TokensLimited,
        _ => return Err(ReplyError::Malformed),
    };
    let count = count.as_u64().ok_or(ReplyError::Malformed)?;
    let ttl = ttl.as_i64().ok_or(ReplyError::Malformed)?;
    let tokens = match tokens {
        None => None,
        Some(t) => Some(t.as_u64().ok_or(ReplyError::Malformed)?),
    };
    Ok(Count {
        checked,
        count,
        key_ttl_ms: u64::try_from(ttl).ok(),
        tokens,
    })
}

/// Reads a Webdis reply to [`settle_command`]: the number of keys the script saw.
pub fn parse_settle_reply(status: Option<u16>, body: &[u8]) -> Result<u64, ReplyError> {
    eval_reply(status, body)?
        .as_u64()
        .ok_or(ReplyError::Malformed)
}

/// `Basic <base64(user:password)>` for Webdis's `http_basic_auth`.
pub fn basic_authorization(user_password: &str) -> String {
    format!("Basic {}", base64::encode(user_password.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counters_command_and_replies() {
        let body = counters_command(&[
            Counter {
                key: budget_key("team-a", Period::Day, 20_427, Measure::Money),
                limit: Some(5_000_000),
                cost: 120,
                ttl_ms: 1000,
            },
            Counter {
                key: "rate:x:1".into(),
                limit: None,
                cost: 1,
                ttl_ms: 2000,
            },
        ]);
        let body = String::from_utf8(body).unwrap();
        assert!(body.starts_with("EVAL/"));
        assert!(body.ends_with(
            "/2/tollgate%3Abudget%3Ateam-a%3Aday%3A20427%3Amoney/rate%3Ax%3A1/5000000/120/1000/-1/1/2000"
        ));
        assert_eq!(
            parse_counters_reply(Some(200), br#"{"EVAL":[1,0,120,7]}"#, 2),
            Ok(Counted::Admitted(vec![120, 7]))
        );
        assert_eq!(
            parse_counters_reply(Some(200), br#"{"EVAL":[0,1,4999990]}"#, 2),
            Ok(Counted::Refused(0, 4_999_990))
        );
        for bad in [
            &br#"{"EVAL":[1,0,120]}"#[..],
            br#"{"EVAL":[0,3,1]}"#,
            br#"{"EVAL":[0,0,1]}"#,
            br#"{"EVAL":[2,0,1,1]}"#,
            br#"{"EVAL":[1,0,-1,1]}"#,
        ] {
            assert_eq!(
                parse_counters_reply(Some(200), bad, 2),
                Err(ReplyError::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn key_layout_matches_the_older_proxy() {
        assert_eq!(
            window_key("32bd3c47e408828a22d81d4fe5f3c06d", 28_333_333),
            "rate:32bd3c47e408828a22d81d4fe5f3c06d:28333333"
        );
    }

    #[test]
    fn command_is_escaped_for_webdis() {
        let cmd = String::from_utf8(check_command("rate:ab:1", 60, 120_000, None)).unwrap();
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
                checked: Checked::Admitted,
                count: 7,
                key_ttl_ms: Some(119_000),
                tokens: None,
            })
        );
        assert_eq!(
            parse_reply(Some(200), br#"{"EVAL":[0,60,-1]}"#),
            Ok(Count {
                checked: Checked::RequestsLimited,
                count: 60,
                key_ttl_ms: None,
                tokens: None,
            })
        );
        assert_eq!(
            parse_reply(Some(200), br#"{"EVAL":[1,3,59000,1200]}"#),
            Ok(Count {
                checked: Checked::Admitted,
                count: 3,
                key_ttl_ms: Some(59_000),
                tokens: Some(1200),
            })
        );
        assert_eq!(
            parse_reply(Some(200), br#"{"EVAL":[2,3,59000,9990]}"#),
            Ok(Count {
                checked: Checked::TokensLimited,
                count: 3,
                key_ttl_ms: Some(59_000),
                tokens: Some(9990),
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
            br#"{"EVAL":[1,7,1,-5]}"#,
            br#"{"EVAL":[1,7,1,5,5]}"#,
        ] {
            assert_eq!(
                parse_reply(Some(200), bad),
                Err(ReplyError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn token_check_passes_both_keys_and_limits() {
        let tokens = TokenCheck {
            key: "tokens:ab:1",
            limit: 10_000,
            cost: 350,
        };
        let cmd = String::from_utf8(check_command("rate:ab:1", 60, 120_000, Some(tokens))).unwrap();
        assert!(
            cmd.ends_with("/2/rate%3Aab%3A1/tokens%3Aab%3A1/60/120000/10000/350"),
            "{cmd}"
        );
        assert_eq!(cmd.matches('/').count(), 8);
        assert!(!cmd.contains('.'));
    }

    #[test]
    fn settlements_sum_per_key_and_batch() {
        let mut s = Settlements::default();
        assert!(s.add("tokens:a:1".into(), -300));
        assert!(s.add("tokens:a:1".into(), 120));
        assert!(s.add("tokens:b:1".into(), 5));
        assert!(s.add("tokens:c:1".into(), 7));
        assert!(s.add("tokens:c:1".into(), -7));
        let cmds = s.drain_commands();
        assert!(s.is_empty());
        assert_eq!(cmds.len(), 1);
        let cmd = String::from_utf8(cmds[0].clone()).unwrap();
        assert!(cmd.starts_with("EVAL/for%20i%2C%20k"), "{cmd}");
        // Keys first, then their deltas, in the same order; the zero sum is dropped.
        assert!(
            cmd.ends_with("/2/tokens%3Aa%3A1/tokens%3Ab%3A1/-180/5"),
            "{cmd}"
        );
        assert!(s.drain_commands().is_empty());
    }

    #[test]
    fn settlements_are_bounded_and_batched() {
        let mut s = Settlements::default();
        for i in 0..Settlements::MAX_KEYS {
            assert!(s.add(format!("tokens:{i}:1"), 1));
        }
        assert!(
            !s.add("tokens:new:1".into(), 1),
            "a full queue refuses new keys"
        );
        assert!(s.add("tokens:0:1".into(), 1), "known keys still add up");
        let cmds = s.drain_commands();
        assert_eq!(
            cmds.len(),
            Settlements::MAX_KEYS.div_ceil(Settlements::BATCH)
        );
        assert!(s.add("tokens:new:1".into(), 1));
    }

    #[test]
    fn settle_replies() {
        assert_eq!(parse_settle_reply(Some(200), br#"{"EVAL":3}"#), Ok(3));
        assert_eq!(
            parse_settle_reply(Some(200), br#"{"EVAL":[false,"ERR x"]}"#),
            Err(ReplyError::Redis("ERR x".into()))
        );
        assert_eq!(
            parse_settle_reply(Some(200), br#"{"EVAL":[1,2,3]}"#),
            Err(ReplyError::Malformed)
        );
        assert_eq!(parse_settle_reply(None, b""), Err(ReplyError::Unavailable));
        assert_eq!(
            parse_settle_reply(Some(403), b"{}"),
            Err(ReplyError::Status(403))
        );
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
    fn basic_authorization_is_base64() {
        assert_eq!(basic_authorization("u:p"), "Basic dTpw");
    }

    proptest! {
        #[test]
        fn parse_never_panics(status in proptest::option::of(0u16..600), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_reply(status, &body);
            let _ = parse_settle_reply(status, &body);
        }
    }
}

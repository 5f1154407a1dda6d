//! Per-client, per-minute limits over a compare-and-swap store (Envoy shared data in the filter).
//!
//! Algorithm: a **fixed window** aligned to the wall-clock minute (`unix_seconds / 60`), the same
//! windows the older proxy used in Redis (`rate:<md5>:<unix minute>`), so both can share a budget.
//! A client may send its whole budget at the end of one minute and again at the start of the next:
//! up to 2 x limit within a few seconds around a boundary. That is the known cost of fixed windows,
//! accepted for exactness and one small record per client.
//!
//! Storage: one fixed record per client (`<prefix><client name>`), never a key per window,
//! because Envoy never deletes shared-data keys. The record holds the window it counts and the
//! count; a record from an older window counts as zero. Updates are a bounded compare-and-swap
//! loop: read (value, cas), compute, write with that cas; on conflict, read again.

use crate::config::Client;
use crate::host::{CasStore, SetError, StoreError};
use crate::spend::{Measure, Period};

/// Version byte of the stored record, so a future layout change cannot be misread.
const RECORD_VERSION: u8 = 2;
/// Version, window, requests counted, tokens counted.
const RECORD_LEN: usize = 25;

/// Version byte of a record that also holds budget slots (after the 24 bytes of the minute).
const RECORD_VERSION_BUDGETS: u8 = 3;
/// A budget slot: period tag, window number, requests, tokens, money (micro-units).
const SLOT_LEN: usize = 33;

/// Attempts of the read-compute-write loop before giving up (see [`LimiterError::Contention`]).
/// A conflict means another worker's write succeeded, so every retry follows progress elsewhere;
/// with Envoy's handful of workers, this many consecutive losses do not happen in practice.
pub const CAS_ATTEMPTS: u32 = 32;

/// Shared-data key prefix of the budget records: one per client, holding both its request and
/// its token count, so one check of both budgets is one read and one compare-and-swap.
pub const BUDGET_KEY_PREFIX: &str = "tollgate.v2.budget.";

/// Window length in milliseconds.
pub const WINDOW_MS: u64 = 60_000;

/// A limiter failure; the filter admits the request (fail open) and counts the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimiterError {
    /// Every attempt lost a compare-and-swap race.
    Contention,
    /// The store refused a read or write.
    Store,
}

impl LimiterError {
    /// Metric label value for this error.
    pub fn reason(self) -> &'static str {
        match self {
            LimiterError::Contention => "contention",
            LimiterError::Store => "store",
        }
    }
}

/// The state of a client's window after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The limit of the window.
    pub limit: u64,
    /// Requests still allowed in this window.
    pub remaining: u64,
    /// Milliseconds until the window resets (1..=60000).
    pub reset_ms: u64,
}

/// The limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted and admitted.
    Admitted(Window),
    /// Over the limit; not counted.
    Limited(Window),
}

/// The minute window a time falls in, and the milliseconds left in it.
pub fn window_of(now_ms: u64) -> (u64, u64) {
    (now_ms / WINDOW_MS, WINDOW_MS - now_ms % WINDOW_MS)
}

/// Shared-data key of a client's budget record.
pub fn budget_key(client: &Client) -> String {
    // Concatenated, not `format!`: it is built on every request (its check and settlement).
    [BUDGET_KEY_PREFIX, client.name.as_str()].concat()
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Record {
    window: u64,
    requests: u64,
    tokens: u64,
    /// The budgets' windows, one per period (a period no longer configured is dropped on the
    /// next write; one newly configured starts empty).
    slots: Vec<Slot>,
}

/// What a client used in one window of a budget's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The period.
    pub period: Period,
    /// The window's number ([`Period::window`]).
    pub window: u64,
    /// Used per [`Measure::index`]: requests, tokens, money (micro-units).
    pub used: [u64; 3],
}

impl Slot {
    /// What was used of one measure.
    pub fn used(&self, m: Measure) -> u64 {
        self.used.get(m.index()).copied().unwrap_or(0)
    }
}

fn le(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

impl Record {
    /// Without budget slots, the version-2 layout, byte for byte.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_LEN + self.slots.len() * SLOT_LEN);
        out.push(if self.slots.is_empty() {
            RECORD_VERSION
        } else {
            RECORD_VERSION_BUDGETS
        });
        out.extend_from_slice(&self.window.to_le_bytes());
        out.extend_from_slice(&self.requests.to_le_bytes());
        out.extend_from_slice(&self.tokens.to_le_bytes());
        for s in &self.slots {
            out.push(s.period.tag());
            out.extend_from_slice(&s.window.to_le_bytes());
            for u in s.used {
                out.extend_from_slice(&u.to_le_bytes());
            }
        }
        out
    }

    /// A record we cannot read (another layout, truncated) counts as an empty window: the limiter
    /// stays available and the next write replaces it with a good record.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        let slots_bytes = match version {
            RECORD_VERSION if rest.len() == RECORD_LEN - 1 => &[][..],
            RECORD_VERSION_BUDGETS
                if rest.len() >= RECORD_LEN - 1
                    && (rest.len() - (RECORD_LEN - 1)) % SLOT_LEN == 0 =>
            {
                rest.get(RECORD_LEN - 1..)?
            }
            _ => return None,
        };
        let mut slots = Vec::with_capacity(slots_bytes.len() / SLOT_LEN);
        for slot in slots_bytes.chunks_exact(SLOT_LEN) {
            let (&tag, fields) = slot.split_first()?;
            slots.push(Slot {
                period: Period::from_tag(tag)?,
                window: le(fields, 0)?,
                used: [le(fields, 8)?, le(fields, 16)?, le(fields, 24)?],
            });
        }
        Some(Self {
            window: le(rest, 0)?,
            requests: le(rest, 8)?,
            tokens: le(rest, 16)?,
            slots,
        })
    }

    /// This record's counts in `window` (an older window counts as empty).
    fn in_window(current: Option<Self>, window: u64) -> Self {
        match current {
            Some(r) if r.window == window => r,
            Some(r) => Self {
                window,
                slots: r.slots,
                ..Self::default()
            },
            None => Self {
                window,
                ..Self::default()
            },
        }
    }

    /// What was used in `window` of `period` (zero for another window).
    fn slot(&self, period: Period, window: u64) -> Slot {
        self.slots
            .iter()
            .find(|s| s.period == period && s.window == window)
            .copied()
            .unwrap_or(Slot {
                period,
                window,
                used: [0; 3],
            })
    }
}

/// A client's budgets as the local limiter counted them, for the budget endpoint: the slot of
/// each period in its current window (`windows`: period and window number), empty where the
/// record has an older window or none.
pub fn read_slots(
    store: &dyn CasStore,
    key: &str,
    windows: &[(Period, u64)],
) -> Result<Vec<Slot>, LimiterError> {
    Ok(read_usage(store, key, 0, windows)?.1)
}

/// The requests and tokens counted in minute `window` and the budgets' slots ([`read_slots`]),
/// in one read.
pub fn read_usage(
    store: &dyn CasStore,
    key: &str,
    window: u64,
    windows: &[(Period, u64)],
) -> Result<((u64, u64), Vec<Slot>), LimiterError> {
    let (current, _) = read(store, key)?;
    let r = current.unwrap_or_default();
    let minute = if r.window == window {
        (r.requests, r.tokens)
    } else {
        (0, 0)
    };
    Ok((minute, windows.iter().map(|&(p, w)| r.slot(p, w)).collect()))
}

/// One budget of a check: its window and, per measure, the limit and this request's cost
/// (every measure is counted; only those with a limit can refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetAsk {
    /// The period.
    pub period: Period,
    /// The current window's number.
    pub window: u64,
    /// Milliseconds until the window ends (for a refusal's reset).
    pub reset_ms: u64,
    /// Limits per [`Measure::index`].
    pub limits: [Option<u64>; 3],
    /// Costs per [`Measure::index`]: 1 request, the token estimate, the money reservation.
    pub costs: [u64; 3],
}

/// A budget that refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// The budget's period.
    pub period: Period,
    /// What ran out.
    pub measure: Measure,
    /// The limit, the remaining amount and the reset.
    pub window: Window,
    /// What the request asked for.
    pub asked: u64,
}

/// What one budget check asks: a request against `requests` (the limit, if any) and a token
/// reservation `(limit, cost)` (if the client has a token limit), and the client's budgets over
/// longer windows, all in the same record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask<'a> {
    /// The request limit of the window.
    pub requests: Option<u64>,
    /// The token limit and this request's estimate.
    pub tokens: Option<(u64, u64)>,
    /// The budgets (see [`BudgetAsk`]).
    pub budgets: &'a [BudgetAsk],
}

/// The answer to an [`Ask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Both counted: the windows after this request.
    Admitted {
        /// The request window (with a request limit).
        requests: Option<Window>,
        /// The token window (with a token limit).
        tokens: Option<Window>,
    },
    /// Over the token limit; nothing counted.
    OverTokens(Window),
    /// Over the request limit; nothing counted.
    OverRequests(Window),
    /// Over a budget of a longer window; nothing counted.
    OverBudget(Exceeded),
}

/// Checks a request against both of a client's budgets in one read and one compare-and-swap:
/// the tokens first (their refusal says how many were asked), then the request count; a refusal
/// writes nothing.
pub fn check_budget(
    store: &dyn CasStore,
    key: &str,
    ask: Ask,
    now_ms: u64,
) -> Result<Budget, LimiterError> {
    let (window, reset_ms) = window_of(now_ms);
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = read(store, key)?;
        let r = Record::in_window(current, window);
        let mut next = r.clone();
        // The longer budgets first: a refusal there is the one a client cannot wait out.
        let mut slots = Vec::with_capacity(ask.budgets.len());
        for b in ask.budgets.iter().rev() {
            let mut slot = r.slot(b.period, b.window);
            for m in Measure::ALL {
                let i = m.index();
                let (used, cost) = (slot.used(m), b.costs.get(i).copied().unwrap_or(0));
                if let Some(limit) = b.limits.get(i).copied().flatten() {
                    if used.saturating_add(cost.max(1)) > limit {
                        return Ok(Budget::OverBudget(Exceeded {
                            period: b.period,
                            measure: m,
                            window: Window {
                                limit,
                                remaining: limit.saturating_sub(used),
                                reset_ms: b.reset_ms,
                            },
                            asked: cost,
                        }));
                    }
                }
                if let Some(u) = slot.used.get_mut(i) {
                    *u = used.saturating_add(cost);
                }
            }
            slots.push(slot);
        }
        if !ask.budgets.is_empty() {
            slots.reverse();
            next.slots = slots;
        }
        let mut tokens = None;
        if let Some((limit, cost)) = ask.tokens {
            // A zero cost (nothing to reserve) still needs budget left.
            if r.tokens.saturating_add(cost.max(1)) > limit {
                return Ok(Budget::OverTokens(Window {
                    limit,
                    remaining: limit.saturating_sub(r.tokens),
                    reset_ms,
                }));
            }
            next.tokens = r.tokens + cost;
            tokens = Some(Window {
                limit,
                remaining: limit - next.tokens,
                reset_ms,
            });
        }
        let mut requests = None;
        if let Some(limit) = ask.requests {
            if r.requests.saturating_add(1) > limit {
                return Ok(Budget::OverRequests(Window {
                    limit,
                    remaining: limit.saturating_sub(r.requests),
                    reset_ms,
                }));
            }
            next.requests = r.requests + 1;
            requests = Some(Window {
                limit,
                remaining: limit - next.requests,
                reset_ms,
            });
        }
        match store.set(key, &next.encode(), cas) {
            Ok(()) => return Ok(Budget::Admitted { requests, tokens }),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Store) => return Err(LimiterError::Store),
        }
    }
    Err(LimiterError::Contention)
}

/// Creates a client's record if it does not exist yet.
///
/// The filter calls this from `on_configure`, which Envoy runs on the main thread before the
/// workers see the new configuration. Creating every record there closes the one race a CAS store
/// has: a write to a *missing* key ignores the CAS token, so two workers inserting the first record
/// at once could each count only their own request.
pub fn ensure_record(store: &dyn CasStore, key: &str) -> Result<(), StoreError> {
    ensure_key(store, key, &Record::default().encode())
}

/// Stores `initial` under `key` unless the key exists (any record kept in shared data whose
/// first insert must happen before the workers see it: see [`ensure_record`]).
pub fn ensure_key(store: &dyn CasStore, key: &str, initial: &[u8]) -> Result<(), StoreError> {
    match store.get(key)? {
        Some(_) => Ok(()),
        None => store.set(key, initial, 0).or_else(|e| match e {
            // Someone created it first: that is what we wanted.
            SetError::CasMismatch => Ok(()),
            SetError::Store => Err(StoreError),
        }),
    }
}

/// Counts one request against `limit` in the current minute window of the record at `key`.
pub fn check(
    store: &dyn CasStore,
    key: &str,
    limit: u64,
    now_ms: u64,
) -> Result<Verdict, LimiterError> {
    let ask = Ask {
        requests: Some(limit),
        tokens: None,
        budgets: &[],
    };
    Ok(match check_budget(store, key, ask, now_ms)? {
        Budget::Admitted {
            requests: Some(w), ..
        } => Verdict::Admitted(w),
        Budget::OverRequests(w) | Budget::OverTokens(w) => Verdict::Limited(w),
        Budget::OverBudget(e) => Verdict::Limited(e.window),
        Budget::Admitted { requests: None, .. } => Verdict::Limited(Window {
            limit,
            remaining: 0,
            reset_ms: window_of(now_ms).1,
        }),
    })
}

/// Reserves `cost` tokens against `limit` in the current window: admitted when the window's
/// tokens plus `cost` stay within `limit`; a refusal writes nothing.
pub fn check_cost(
    store: &dyn CasStore,
    key: &str,
    limit: u64,
    cost: u64,
    now_ms: u64,
) -> Result<Verdict, LimiterError> {
    let ask = Ask {
        requests: None,
        tokens: Some((limit, cost)),
        budgets: &[],
    };
    Ok(match check_budget(store, key, ask, now_ms)? {
        Budget::Admitted {
            tokens: Some(w), ..
        } => Verdict::Admitted(w),
        Budget::OverRequests(w) | Budget::OverTokens(w) => Verdict::Limited(w),
        Budget::OverBudget(e) => Verdict::Limited(e.window),
        Budget::Admitted { tokens: None, .. } => Verdict::Limited(Window {
            limit,
            remaining: 0,
            reset_ms: window_of(now_ms).1,
        }),
    })
}

fn add_signed(n: u64, delta: i64) -> u64 {
    if delta < 0 {
        n.saturating_sub(delta.unsigned_abs())
    } else {
        n.saturating_add(delta.unsigned_abs())
    }
}

/// Settles a request in one compare-and-swap: `minute` (window, token delta) for the minute's
/// token count, and for each budget window in `budgets` (those still current) the token and
/// money deltas. Windows that have passed are left alone.
pub fn adjust_all(
    store: &dyn CasStore,
    key: &str,
    minute: Option<(u64, i64)>,
    budgets: &[(Period, u64)],
    tokens_delta: i64,
    money_delta: i64,
) -> Result<(), LimiterError> {
    let minute = minute.filter(|(_, d)| *d != 0);
    let budgets_change = !budgets.is_empty() && (tokens_delta != 0 || money_delta != 0);
    if minute.is_none() && !budgets_change {
        return Ok(());
    }
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = read(store, key)?;
        let Some(mut r) = current else {
            return Ok(());
        };
        let mut changed = false;
        if let Some((window, delta)) = minute {
            if r.window == window {
                r.tokens = add_signed(r.tokens, delta);
                changed = true;
            }
        }
        if budgets_change {
            for slot in r.slots.iter_mut() {
                if budgets.contains(&(slot.period, slot.window)) {
                    let [_, tokens, money] = &mut slot.used;
                    *tokens = add_signed(*tokens, tokens_delta);
                    *money = add_signed(*money, money_delta);
                    changed = true;
                }
            }
        }
        if !changed {
            return Ok(());
        }
        match store.set(key, &r.encode(), cas) {
            Ok(()) => return Ok(()),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Store) => return Err(LimiterError::Store),
        }
    }
    Err(LimiterError::Contention)
}

fn read(store: &dyn CasStore, key: &str) -> Result<(Option<Record>, u32), LimiterError> {
    Ok(match store.get(key).map_err(|_| LimiterError::Store)? {
        Some((bytes, cas)) => (Record::decode(&bytes), cas),
        // Not created at configure time (should not happen): insert, accepting the race.
        None => (None, 0),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// An in-memory CAS store with Envoy's semantics (a set on a missing key always inserts),
    /// plus injectable conflicts and failures.
    #[derive(Default)]
    pub(crate) struct FakeStore {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        /// The next N conditional sets fail with CasMismatch (as if another worker wrote).
        pub conflicts: Cell<u32>,
        pub fail_get: Cell<bool>,
        pub fail_set: Cell<bool>,
        pub sets: Cell<u32>,
    }

    impl CasStore for FakeStore {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            if self.fail_get.get() {
                return Err(StoreError);
            }
            Ok(self.map.borrow().get(key).cloned())
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            self.sets.set(self.sets.get() + 1);
            if self.fail_set.get() {
                return Err(SetError::Store);
            }
            let mut map = self.map.borrow_mut();
            if let Some((_, current)) = map.get(key) {
                if self.conflicts.get() > 0 {
                    self.conflicts.set(self.conflicts.get() - 1);
                    return Err(SetError::CasMismatch);
                }
                if cas != 0 && cas != *current {
                    return Err(SetError::CasMismatch);
                }
            }
            self.next_cas.set(self.next_cas.get() + 1);
            map.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
            Ok(())
        }
    }

    const K: &str = "tollgate.v1.rpm.a";
    const T0: u64 = 1_700_000_080_000; // 20 s before a minute boundary

    fn admitted(v: Verdict) -> Window {
        match v {
            Verdict::Admitted(w) => w,
            other => panic!("expected admitted, got {other:?}"),
        }
    }

    #[test]
    fn exactly_limit_requests_per_window() {
        let s = FakeStore::default();
        ensure_record(&s, K).unwrap();
        for i in 1..=3 {
            let w = admitted(check(&s, K, 3, T0).unwrap());
            assert_eq!(w.remaining, 3 - i);
            assert_eq!(w.limit, 3);
        }
        let v = check(&s, K, 3, T0 + 1).unwrap();
        assert_eq!(
            v,
            Verdict::Limited(Window {
                limit: 3,
                remaining: 0,
                reset_ms: 19_999
            })
        );
    }

    #[test]
    fn new_window_starts_from_zero_and_boundary_burst_is_two_limits() {
        let s = FakeStore::default();
        let boundary = (T0 / WINDOW_MS + 1) * WINDOW_MS;
        for _ in 0..2 {
            admitted(check(&s, K, 2, boundary - 1).unwrap());
        }
        assert!(matches!(
            check(&s, K, 2, boundary - 1).unwrap(),
            Verdict::Limited(_)
        ));
        // One millisecond later a new window: the documented 2 x limit burst.
        for _ in 0..2 {
            let w = admitted(check(&s, K, 2, boundary).unwrap());
            assert_eq!(w.reset_ms, WINDOW_MS);
        }
        assert!(matches!(
            check(&s, K, 2, boundary).unwrap(),
            Verdict::Limited(_)
        ));
    }

    #[test]
    fn denied_requests_are_not_counted() {
        let s = FakeStore::default();
        admitted(check(&s, K, 1, T0).unwrap());
        let sets = s.sets.get();
        for _ in 0..5 {
            assert!(matches!(check(&s, K, 1, T0).unwrap(), Verdict::Limited(_)));
        }
        assert_eq!(s.sets.get(), sets, "a denied check must not write");
    }

    #[test]
    fn conflicts_are_retried_and_counted_once() {
        let s = FakeStore::default();
        ensure_record(&s, K).unwrap();
        s.conflicts.set(CAS_ATTEMPTS - 1);
        let w = admitted(check(&s, K, 10, T0).unwrap());
        assert_eq!(w.remaining, 9);
    }

    #[test]
    fn exhausted_retries_are_a_contention_error() {
        let s = FakeStore::default();
        ensure_record(&s, K).unwrap();
        s.conflicts.set(CAS_ATTEMPTS);
        assert_eq!(check(&s, K, 10, T0), Err(LimiterError::Contention));
        assert_eq!(LimiterError::Contention.reason(), "contention");
    }

    #[test]
    fn store_failures_are_errors() {
        let s = FakeStore::default();
        s.fail_get.set(true);
        assert_eq!(check(&s, K, 10, T0), Err(LimiterError::Store));
        assert_eq!(ensure_record(&s, K), Err(StoreError));
        s.fail_get.set(false);
        s.fail_set.set(true);
        assert_eq!(check(&s, K, 10, T0), Err(LimiterError::Store));
    }

    #[test]
    fn ensure_record_keeps_existing_counts() {
        let s = FakeStore::default();
        admitted(check(&s, K, 5, T0).unwrap());
        ensure_record(&s, K).unwrap();
        let w = admitted(check(&s, K, 5, T0).unwrap());
        assert_eq!(w.remaining, 3);
    }

    #[test]
    fn unreadable_records_count_as_empty() {
        let s = FakeStore::default();
        s.set(K, b"garbage", 0).unwrap();
        let w = admitted(check(&s, K, 5, T0).unwrap());
        assert_eq!(w.remaining, 4);
        assert_eq!(Record::decode(&[1, 2, 3]), None);
        let r = Record {
            window: 7,
            requests: 9,
            tokens: 11,
            slots: Vec::new(),
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        // A record of the earlier layout (version 1, one count) is not misread.
        let mut v1 = [0u8; 17];
        v1[0] = 1;
        assert_eq!(Record::decode(&v1), None);
    }

    #[test]
    fn both_budgets_in_one_compare_and_swap() {
        let s = FakeStore::default();
        let ask = |cost| Ask {
            requests: Some(2),
            tokens: Some((100, cost)),
            budgets: &[],
        };
        let Budget::Admitted {
            requests: Some(r),
            tokens: Some(t),
        } = check_budget(&s, K, ask(60), T0).unwrap()
        else {
            panic!()
        };
        assert_eq!((r.remaining, t.remaining), (1, 40));
        // Over the tokens: nothing counted, not even the request.
        assert!(matches!(
            check_budget(&s, K, ask(50), T0).unwrap(),
            Budget::OverTokens(w) if w.remaining == 40
        ));
        assert!(matches!(
            check_budget(&s, K, ask(10), T0).unwrap(),
            Budget::Admitted { .. }
        ));
        // Over the requests: the tokens of the refused request are not reserved.
        assert!(matches!(
            check_budget(&s, K, ask(10), T0).unwrap(),
            Budget::OverRequests(w) if w.remaining == 0
        ));
        let (rec, _) = read(&s, K).unwrap();
        assert_eq!(rec.map(|r| (r.requests, r.tokens)), Some((2, 70)));
    }

    /// Adds `delta` (negative: gives back) to the tokens of minute `window` alone.
    fn adjust(
        store: &dyn CasStore,
        key: &str,
        window: u64,
        delta: i64,
    ) -> Result<(), LimiterError> {
        adjust_all(store, key, Some((window, delta)), &[], 0, 0)
    }

    #[test]
    fn costs_reserve_and_adjust() {
        let s = FakeStore::default();
        let (window, _) = window_of(T0);
        let w = admitted(check_cost(&s, K, 100, 60, T0).unwrap());
        assert_eq!(w.remaining, 40);
        // 60 + 50 > 100: refused, nothing written.
        assert_eq!(
            check_cost(&s, K, 100, 50, T0).unwrap(),
            Verdict::Limited(Window {
                limit: 100,
                remaining: 40,
                reset_ms: 20_000
            })
        );
        // The response used 20 tokens, not 60: give 40 back.
        adjust(&s, K, window, -40).unwrap();
        assert_eq!(
            admitted(check_cost(&s, K, 100, 50, T0).unwrap()).remaining,
            30
        );
        adjust(&s, K, window, -1000).unwrap();
        assert_eq!(
            admitted(check_cost(&s, K, 100, 0, T0).unwrap()).remaining,
            100
        );
        // A passed window is not touched.
        adjust(&s, K, window - 1, 500).unwrap();
        assert_eq!(
            admitted(check_cost(&s, K, 100, 100, T0).unwrap()).remaining,
            0
        );
        // Zero cost with nothing left is refused.
        assert!(matches!(
            check_cost(&s, K, 100, 0, T0).unwrap(),
            Verdict::Limited(_)
        ));
    }

    fn day_budget(money: u64, cost: u64, window: u64) -> BudgetAsk {
        BudgetAsk {
            period: Period::Day,
            window,
            reset_ms: 1000,
            limits: [None, None, Some(money)],
            costs: [1, 10, cost],
        }
    }

    #[test]
    fn budgets_share_the_record_and_refuse_exactly_at_the_limit() {
        let s = FakeStore::default();
        ensure_record(&s, K).unwrap();
        let asks = [day_budget(100, 30, 7)];
        let ask = Ask {
            requests: Some(1000),
            tokens: None,
            budgets: &asks,
        };
        for _ in 0..3 {
            assert!(matches!(
                check_budget(&s, K, ask, T0).unwrap(),
                Budget::Admitted { .. }
            ));
        }
        let sets = s.sets.get();
        // 90 used: 30 more would pass 100.
        match check_budget(&s, K, ask, T0).unwrap() {
            Budget::OverBudget(e) => {
                assert_eq!((e.period, e.measure), (Period::Day, Measure::Money));
                assert_eq!((e.window.limit, e.window.remaining, e.asked), (100, 10, 30));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.sets.get(), sets, "a refusal writes nothing");
        // Settled lower: 3 x 30 reserved, 3 x 20 used; the next minute keeps the day.
        for _ in 0..3 {
            adjust_all(&s, K, None, &[(Period::Day, 7)], -5, -10).unwrap();
        }
        let next_minute = T0 + WINDOW_MS;
        let slots = read_slots(&s, K, &[(Period::Day, 7), (Period::Week, 1)]).unwrap();
        assert_eq!(slots[0].used, [3, 15, 60]);
        assert_eq!(slots[1].used, [0, 0, 0]);
        assert!(matches!(
            check_budget(&s, K, ask, next_minute).unwrap(),
            Budget::Admitted { .. }
        ));
        // 90 used: exactly 10 left, a cost of 10 fits, then nothing does, not even a free one.
        let asks = [day_budget(100, 10, 7)];
        let ten = Ask {
            budgets: &asks,
            ..ask
        };
        assert!(matches!(
            check_budget(&s, K, ten, next_minute).unwrap(),
            Budget::Admitted { .. }
        ));
        let asks = [day_budget(100, 0, 7)];
        let free = Ask {
            budgets: &asks,
            ..ask
        };
        assert!(matches!(
            check_budget(&s, K, free, next_minute).unwrap(),
            Budget::OverBudget(_)
        ));
        // A new day starts from zero; a settlement for the old day changes nothing.
        let asks = [day_budget(100, 30, 8)];
        let tomorrow = Ask {
            budgets: &asks,
            ..ask
        };
        assert!(matches!(
            check_budget(&s, K, tomorrow, next_minute).unwrap(),
            Budget::Admitted { .. }
        ));
        adjust_all(&s, K, None, &[(Period::Day, 7)], -5, -10).unwrap();
        assert_eq!(
            read_slots(&s, K, &[(Period::Day, 8)]).unwrap()[0].used,
            [1, 10, 30]
        );
    }

    #[test]
    fn records_without_budgets_keep_the_old_layout_and_with_budgets_round_trip() {
        let r = Record {
            window: 5,
            requests: 2,
            tokens: 9,
            slots: Vec::new(),
        };
        assert_eq!(r.encode().len(), RECORD_LEN);
        assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        let with = Record {
            slots: vec![
                Slot {
                    period: Period::Day,
                    window: 3,
                    used: [1, 2, 3],
                },
                Slot {
                    period: Period::Month,
                    window: 4,
                    used: [4, 5, u64::MAX],
                },
            ],
            ..r
        };
        let bytes = with.encode();
        assert_eq!(bytes.len(), RECORD_LEN + 2 * SLOT_LEN);
        assert_eq!(Record::decode(&bytes), Some(with));
        assert_eq!(Record::decode(&bytes[..bytes.len() - 1]), None);
        let mut bad_tag = bytes.clone();
        bad_tag[RECORD_LEN] = 9;
        assert_eq!(Record::decode(&bad_tag), None);
    }

    #[test]
    fn window_math() {
        assert_eq!(window_of(0), (0, 60_000));
        assert_eq!(window_of(59_999), (0, 1));
        assert_eq!(window_of(60_000), (1, 60_000));
    }

    /// Two "workers" interleaving read and write on one store never admit more than the limit:
    /// the model of what two Envoy workers do (the end-to-end test checks the real thing).
    #[test]
    fn interleaved_workers_admit_exactly_the_limit() {
        struct Racing<'a> {
            inner: &'a FakeStore,
            // Before each of our sets, the other worker completes a whole check.
            other_turns: Cell<u32>,
            limit: u64,
        }
        impl CasStore for Racing<'_> {
            fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
                self.inner.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
                if self.other_turns.get() > 0 {
                    self.other_turns.set(self.other_turns.get() - 1);
                    let _ = check(self.inner, key, self.limit, T0);
                }
                self.inner.set(key, value, cas)
            }
        }
        let inner = FakeStore::default();
        ensure_record(&inner, K).unwrap();
        let racing = Racing {
            inner: &inner,
            other_turns: Cell::new(20),
            limit: 10,
        };
        let mut mine = 0;
        for _ in 0..30 {
            if let Ok(Verdict::Admitted(_)) = check(&racing, K, 10, T0) {
                mine += 1;
            }
        }
        let rec = Record::decode(&inner.map.borrow()[K].0).unwrap();
        assert_eq!(rec.requests, 10, "total admitted across both workers");
        assert!(mine < 10, "the other worker took part of the budget");
    }
}

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

/// Version byte of the stored record, so a future layout change cannot be misread.
const RECORD_VERSION: u8 = 2;
/// Version, window, requests counted, tokens counted.
const RECORD_LEN: usize = 25;

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
    format!("{BUDGET_KEY_PREFIX}{}", client.name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Record {
    window: u64,
    requests: u64,
    tokens: u64,
}

impl Record {
    fn encode(self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[0] = RECORD_VERSION;
        out[1..9].copy_from_slice(&self.window.to_le_bytes());
        out[9..17].copy_from_slice(&self.requests.to_le_bytes());
        out[17..25].copy_from_slice(&self.tokens.to_le_bytes());
        out
    }

    /// A record we cannot read (another layout, truncated) counts as an empty window: the limiter
    /// stays available and the next write replaces it with a good record.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != RECORD_VERSION || rest.len() != RECORD_LEN - 1 {
            return None;
        }
        let field = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(rest.get(at..at + 8)?.try_into().ok()?))
        };
        Some(Self {
            window: field(0)?,
            requests: field(8)?,
            tokens: field(16)?,
        })
    }

    /// This record's counts in `window` (an older window counts as empty).
    fn in_window(current: Option<Self>, window: u64) -> Self {
        match current {
            Some(r) if r.window == window => r,
            _ => Self {
                window,
                ..Self::default()
            },
        }
    }
}

/// What one budget check asks: a request against `requests` (the limit, if any) and a token
/// reservation `(limit, cost)` (if the client has a token limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The request limit of the window.
    pub requests: Option<u64>,
    /// The token limit and this request's estimate.
    pub tokens: Option<(u64, u64)>,
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
        let mut next = r;
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
    match store.get(key)? {
        Some(_) => Ok(()),
        None => store
            .set(key, &Record::default().encode(), 0)
            .or_else(|e| match e {
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
    };
    Ok(match check_budget(store, key, ask, now_ms)? {
        Budget::Admitted {
            requests: Some(w), ..
        } => Verdict::Admitted(w),
        Budget::OverRequests(w) | Budget::OverTokens(w) => Verdict::Limited(w),
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
    };
    Ok(match check_budget(store, key, ask, now_ms)? {
        Budget::Admitted {
            tokens: Some(w), ..
        } => Verdict::Admitted(w),
        Budget::OverRequests(w) | Budget::OverTokens(w) => Verdict::Limited(w),
        Budget::Admitted { tokens: None, .. } => Verdict::Limited(Window {
            limit,
            remaining: 0,
            reset_ms: window_of(now_ms).1,
        }),
    })
}

/// Adds `delta` (negative: gives back) to the tokens of minute `window`, if that window is still
/// the record's; a window that has passed is left alone (its budget is gone anyway).
pub fn adjust(
    store: &dyn CasStore,
    key: &str,
    window: u64,
    delta: i64,
) -> Result<(), LimiterError> {
    if delta == 0 {
        return Ok(());
    }
    for _ in 0..CAS_ATTEMPTS {
        let (current, cas) = read(store, key)?;
        let Some(r) = current.filter(|r| r.window == window) else {
            return Ok(());
        };
        let tokens = if delta < 0 {
            r.tokens.saturating_sub(delta.unsigned_abs())
        } else {
            r.tokens.saturating_add(delta.unsigned_abs())
        };
        match store.set(key, &Record { tokens, ..r }.encode(), cas) {
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

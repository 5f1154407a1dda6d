//! What a worker writes to Envoy for many requests at once rather than for each: the request,
//! token and spend counters, and the local limiter's settlements (a finished request gives back
//! the part of its token estimate it did not use). A busy worker writes them on the root tick,
//! every [`crate::gateway::ROOT_TICK_MS`] at the latest: each counter series once, and each
//! client's record in one compare-and-swap for all its requests of the same windows. A worker
//! with no request left in flight writes them at once, so an idle gateway's counters and
//! budgets are exact as each request ends.
//!
//! The admission itself is never deferred: a request's reservation is taken in the store before
//! it is forwarded. Only what is given back waits, so a busy client's budget may look spent by
//! up to one tick's unused estimates, never more spent than it is.

use hashbrown::HashMap;

use crate::request::LocalSettlement;

/// Settlements held at most; one more writes the batch at once (a worker serving many clients
/// never holds more than this many of their records' changes).
pub const MAX_SETTLEMENTS: usize = 256;

/// A worker's deltas not yet written, and how many of its requests are in flight.
#[derive(Debug, Default)]
pub struct Batch {
    counters: HashMap<u32, u64>,
    settlements: Vec<LocalSettlement>,
    in_flight: usize,
}

/// What a flush writes: counter increments by metric id, and local settlements.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flush {
    /// (metric id, amount), in no particular order.
    pub counters: Vec<(u32, u64)>,
    /// One per client and windows, in no particular order.
    pub settlements: Vec<LocalSettlement>,
}

impl Batch {
    /// Adds `n` to a counter.
    pub fn count(&mut self, id: u32, n: u64) {
        if n > 0 {
            let total = self.counters.entry(id).or_insert(0);
            *total = total.saturating_add(n);
        }
    }

    /// Holds a local settlement, merged with one of the same client and windows. `true`: the
    /// batch is full and should be written now.
    pub fn settle(&mut self, settlement: LocalSettlement) -> bool {
        // Newest first: a busy client's last settlement is the likeliest match.
        if !self
            .settlements
            .iter_mut()
            .rev()
            .any(|s| s.merge(&settlement))
        {
            self.settlements.push(settlement);
        }
        self.settlements.len() >= MAX_SETTLEMENTS
    }

    /// A request of this worker started.
    pub fn begin(&mut self) {
        self.in_flight = self.in_flight.saturating_add(1);
    }

    /// A request of this worker ended; `true` when none is left in flight.
    pub fn end(&mut self) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight == 0
    }

    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.settlements.is_empty()
    }

    /// Takes everything waiting, to be written.
    pub fn take(&mut self) -> Flush {
        Flush {
            counters: self.counters.drain().collect(),
            settlements: std::mem::take(&mut self.settlements),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;
    use crate::spend::Period;

    fn tokens(client: usize, window: u64, delta: i64) -> LocalSettlement {
        LocalSettlement {
            client,
            minute: Some((window, delta)),
            budgets: Vec::new(),
            tokens_delta: 0,
            money_delta: 0,
        }
    }

    #[test]
    fn counters_add_up_per_series() {
        let mut b = Batch::default();
        b.count(7, 1);
        b.count(7, 1);
        b.count(9, 40);
        b.count(9, 0);
        let mut flush = b.take();
        flush.counters.sort_unstable();
        assert_eq!(flush.counters, [(7, 2), (9, 40)]);
        assert!(b.is_empty());
    }

    #[test]
    fn settlements_merge_per_client_and_window_only() {
        let mut b = Batch::default();
        assert!(!b.settle(tokens(0, 100, -30)));
        assert!(!b.settle(tokens(0, 100, -12)));
        // Another minute, another client: their own entries.
        assert!(!b.settle(tokens(0, 101, -5)));
        assert!(!b.settle(tokens(1, 100, -1)));
        let budgets = LocalSettlement {
            client: 0,
            minute: Some((100, -2)),
            budgets: vec![(Period::Day, 20_000)],
            tokens_delta: -2,
            money_delta: -300,
        };
        assert!(!b.settle(budgets.clone()));
        assert!(!b.settle(budgets));
        let mut flush = b.take();
        flush
            .settlements
            .sort_by_key(|s| (s.client, s.minute, s.budgets.len()));
        assert_eq!(
            flush.settlements,
            [
                tokens(0, 100, -42),
                LocalSettlement {
                    client: 0,
                    minute: Some((100, -4)),
                    budgets: vec![(Period::Day, 20_000)],
                    tokens_delta: -4,
                    money_delta: -600,
                },
                tokens(0, 101, -5),
                tokens(1, 100, -1),
            ]
        );
    }

    #[test]
    fn a_full_batch_asks_to_be_written() {
        let mut b = Batch::default();
        let full = (0..MAX_SETTLEMENTS).map(|c| b.settle(tokens(c, 1, -1)));
        assert_eq!(full.filter(|f| *f).count(), 1);
    }

    #[test]
    fn idle_when_the_last_request_ends() {
        let mut b = Batch::default();
        b.begin();
        b.begin();
        assert!(!b.end());
        assert!(b.end());
        // An end without a begin (a context that never started) does not wrap.
        assert!(b.end());
        b.begin();
        assert!(b.end());
    }
}

//! What reached the provider, so tests can assert on exactly what the gateway forwarded
//! (headers added or stripped, body rewritten) rather than on what the client sent.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

pub const CAPACITY: usize = 10_000;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    pub method: String,
    pub path: String,
    /// Serialised as `[[name, value], ...]`: a list, not a map, so order and duplicates survive.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Trailer fields of a chunked body, `[[name, value], ...]` like `headers`.
    pub trailers: Vec<(String, String)>,
}

pub struct RequestLog {
    entries: Mutex<VecDeque<Entry>>,
    capacity: usize,
}

impl RequestLog {
    pub fn new(capacity: usize) -> Self {
        RequestLog {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// A connection thread that panicked mid-push cannot leave the deque inconsistent, so a
    /// poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn record(&self, entry: Entry) {
        let mut entries = self.lock();
        while entries.len() >= self.capacity {
            entries.pop_front();
        }
        if self.capacity > 0 {
            entries.push_back(entry);
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let entries = self.lock();
        crate::openai::to_json(&*entries)
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            method: "POST".into(),
            path: format!("/v1/{i}"),
            headers: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            body: "{}".into(),
            trailers: Vec::new(),
        }
    }

    #[test]
    fn keeps_the_most_recent_entries() {
        let log = RequestLog::new(3);
        for i in 0..5 {
            log.record(entry(i));
        }
        assert_eq!(log.len(), 3);
        let json: serde_json::Value = serde_json::from_slice(&log.to_json()).unwrap();
        assert_eq!(json[0]["path"], "/v1/2");
        assert_eq!(json[2]["path"], "/v1/4");
        assert_eq!(
            json[0]["headers"],
            serde_json::json!([["a", "1"], ["a", "2"]])
        );
        log.clear();
        assert_eq!(&log.to_json(), b"[]");
    }
}

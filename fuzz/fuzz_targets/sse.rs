//! The SSE reader of streamed responses: `usage::SseUsage` (`push`, `push_filtered`,
//! `finish`, `finish_filtered`), on streams as providers send them (small events: fast).
//! `sse_bound` runs the same checks on streams with events over the reader's bound.
//!
//! Input: a response stream.
//!
//! Invariants:
//! - split invariance: the stream cut into chunks at arbitrary points gives the same usage,
//!   event counts, `[DONE]` and the same filtered bytes as the stream in one chunk;
//! - without stripping, `push_filtered` forwards every byte unchanged;
//! - with stripping, the output is the input minus the usage-only chunk events (`"choices":[]`
//!   with a non-null `usage`), and minus the `,"usage":null` closing other chunks;
//! - a reference reading of the whole stream (split into events, `data:` lines joined) gives the
//!   same counts and usage;
//! - memory: the reader never holds more than one event's worth of bytes
//!   (`MAX_EVENT_BYTES` + 3) between calls.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "sse_common.rs"]
mod sse_common;

fuzz_target!(|data: &[u8]| {
    sse_common::check(data, sse_common::fnv(data));
});

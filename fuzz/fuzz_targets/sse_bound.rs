//! The SSE reader's bound: the checks of the `sse` target on streams with events longer than
//! `usage::MAX_EVENT_BYTES` (256 KiB), in one chunk and cut into many.
//!
//! Input: a response stream in which two escape bytes expand, to reach the bound from inputs
//! of a few KiB: `0x01 n` into `n * 2048` bytes of `x`, `0x02 n` into as many spaces (JSON
//! whitespace, so a huge event can still be a valid usage chunk). Streams that stay under
//! 64 KiB after expansion are left to `sse`. Slow (each run reads hundreds of KiB several
//! times): a target of its own so that `sse` keeps its pace.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "sse_common.rs"]
mod sse_common;

fuzz_target!(|data: &[u8]| {
    let stream = sse_common::expand(data);
    if stream.len() > 65536 {
        sse_common::check(&stream, sse_common::fnv(data));
    }
});

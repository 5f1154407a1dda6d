//! The SSE reader of streamed responses: `usage::SseUsage` (`push`, `push_filtered`,
//! `finish`, `finish_filtered`).
//!
//! Input: a response stream as the provider sends it. To reach the size bound with inputs of a
//! few KiB, two escape bytes expand: `0x01 n` into `n * 2048` bytes of `x` and `0x02 n` into as
//! many spaces (JSON whitespace, so an event can be huge and still valid); recorded streams
//! never contain these bytes.
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
use serde_json::Value;
use tollgate_core::usage::{self, SseUsage, Usage, MAX_EVENT_BYTES};

const EXPAND_UNIT: usize = 2048;
const MAX_EXPANDED: usize = 3 * MAX_EVENT_BYTES;

fuzz_target!(|data: &[u8]| {
    let stream = expand(data);
    let whole = run(&stream, &[stream.len()], false);
    let whole_strip = run(&stream, &[stream.len()], true);

    // Without stripping, every byte passes unchanged.
    assert!(
        whole.out == stream,
        "push_filtered changed an unstripped stream"
    );

    // A reference reading of the whole stream.
    let want = reference(&stream);
    assert_eq!(whole.summary, want.summary, "reader and reference disagree");
    assert_eq!(whole_strip.summary, want.summary);
    assert!(
        whole_strip.out == want.stripped,
        "stripped stream differs from the reference:\n got {:?}\nwant {:?}",
        String::from_utf8_lossy(&whole_strip.out),
        String::from_utf8_lossy(&want.stripped)
    );

    // The same answers for other cuts of the same bytes.
    let mut rng = SplitMix(fnv(data));
    let mut cuts: Vec<Vec<usize>> = Vec::new();
    if stream.len() <= 4096 {
        cuts.push(vec![1; stream.len()]);
    }
    for max_chunk in [7, 300, 70_000] {
        if stream.len() / max_chunk > 20_000 {
            continue;
        }
        let mut sizes = Vec::new();
        let mut left = stream.len();
        while left > 0 {
            let n = (1 + rng.next() as usize % max_chunk).min(left);
            sizes.push(n);
            left -= n;
        }
        cuts.push(sizes);
    }
    for sizes in &cuts {
        for strip in [false, true] {
            let got = run(&stream, sizes, strip);
            let base = if strip { &whole_strip } else { &whole };
            assert_eq!(got.summary, base.summary, "split changed the reading");
            assert!(got.out == base.out, "split changed the forwarded bytes");
        }
    }
});

/// What a reader concluded from a stream.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    usage: Option<Usage>,
    events: u64,
    oversized: u64,
    done: bool,
}

struct Run {
    summary: Summary,
    out: Vec<u8>,
}

/// Feeds `stream` in chunks of `sizes` through `push_filtered`, and once more through `push`.
fn run(stream: &[u8], sizes: &[usize], strip: bool) -> Run {
    let new = || {
        if strip {
            SseUsage::stripping_usage_chunk()
        } else {
            SseUsage::default()
        }
    };
    let mut filtered = new();
    let mut plain = new();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in sizes {
        let chunk = &stream[at..at + n];
        at += n;
        out.extend(filtered.push_filtered(chunk));
        plain.push(chunk);
        if !strip {
            // Unstripped, what is not forwarded yet is what the reader holds.
            let held = at - out.len();
            assert!(held <= MAX_EVENT_BYTES + 3, "the reader holds {held} bytes");
        }
    }
    out.extend(filtered.finish_filtered());
    plain.finish();
    let summary = Summary {
        usage: filtered.usage,
        events: filtered.events,
        oversized: filtered.oversized,
        done: filtered.done,
    };
    let plain_summary = Summary {
        usage: plain.usage,
        events: plain.events,
        oversized: plain.oversized,
        done: plain.done,
    };
    assert_eq!(summary, plain_summary, "push and push_filtered disagree");
    Run { summary, out }
}

struct Reference {
    summary: Summary,
    stripped: Vec<u8>,
}

/// Reads the stream in one pass over the whole buffer, as the SSE framing is defined: events
/// end at `\n\n`, `\r\r` or `\r\n\r\n`; events longer than `MAX_EVENT_BYTES` are forwarded but
/// not read; an unterminated last event is read at the end.
fn reference(stream: &[u8]) -> Reference {
    let mut summary = Summary {
        usage: None,
        events: 0,
        oversized: 0,
        done: false,
    };
    let mut stripped = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < stream.len() {
        let rest = &stream[i..];
        let sep = if rest.starts_with(b"\r\n\r\n") {
            4
        } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
            2
        } else {
            i += 1;
            continue;
        };
        let event = &stream[start..i];
        let raw = &stream[start..i + sep];
        if event.len() > MAX_EVENT_BYTES {
            summary.oversized += 1;
            stripped.extend_from_slice(raw);
        } else {
            read_event(&mut summary, event);
            if !usage_only(event) {
                stripped.extend_from_slice(&without_null_usage(raw));
            }
        }
        i += sep;
        start = i;
    }
    let tail = &stream[start..];
    if tail.len() > MAX_EVENT_BYTES + 3 {
        summary.oversized += 1;
    } else if !tail.is_empty() {
        read_event(&mut summary, tail);
    }
    stripped.extend_from_slice(tail);
    Reference { summary, stripped }
}

fn read_event(summary: &mut Summary, event: &[u8]) {
    summary.events += 1;
    let data: Vec<&[u8]> = event
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(|v| v.strip_prefix(b" ").unwrap_or(v))
        .collect();
    if data.is_empty() {
        return;
    }
    let data = data.join(&b'\n');
    if data == b"[DONE]" {
        summary.done = true;
    } else if let Some(u) = usage::from_json(&data) {
        summary.usage = Some(u);
    }
}

/// The usage-only chunk: its first `data:` line is an object with `"choices": []` and a
/// non-null `usage`.
fn usage_only(event: &[u8]) -> bool {
    let Some(line) = event
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"data:"))
    else {
        return false;
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(o)) => {
            o.get("choices") == Some(&Value::Array(Vec::new()))
                && o.get("usage").is_some_and(|u| !u.is_null())
        }
        _ => false,
    }
}

/// The event with `,"usage":null}` at the very end of its payload (before the separator)
/// turned into `}`.
fn without_null_usage(raw: &[u8]) -> Vec<u8> {
    const NULL_USAGE: &[u8] = b",\"usage\":null}";
    let body_end = raw.len()
        - raw
            .iter()
            .rev()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
    let body = &raw[..body_end];
    match body.strip_suffix(NULL_USAGE) {
        Some(head) => [head, b"}", &raw[body_end..]].concat(),
        None => raw.to_vec(),
    }
}

fn expand(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        match (data[i], data.get(i + 1)) {
            (0x01, Some(&n)) | (0x02, Some(&n)) => {
                let fill = if data[i] == 0x01 { b'x' } else { b' ' };
                let n = (usize::from(n) * EXPAND_UNIT).min(MAX_EXPANDED.saturating_sub(out.len()));
                out.resize(out.len() + n, fill);
                i += 2;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

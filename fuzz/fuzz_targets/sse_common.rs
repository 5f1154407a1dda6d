//! The checks shared by the `sse` and `sse_bound` targets (see their documentation).
// Each target uses part of it.
#![allow(dead_code)]

use serde_json::Value;
use tollgate_core::usage::{self, SseUsage, Usage, MAX_EVENT_BYTES};

const EXPAND_UNIT: usize = 2048;
/// Enough for one event over the bound and a few more: big inputs are slow to run.
const MAX_EXPANDED: usize = MAX_EVENT_BYTES + 65536;

/// Every invariant for `stream`; `seed` picks the random cuts.
pub fn check(stream: &[u8], seed: u64) {
    let whole = run(stream, &[stream.len()], false);
    let whole_strip = run(stream, &[stream.len()], true);

    // Without stripping, every byte passes unchanged.
    assert!(
        whole.out == stream,
        "push_filtered changed an unstripped stream"
    );

    // A reference reading of the whole stream.
    let want = reference(stream);
    assert_eq!(whole.summary, want.summary, "reader and reference disagree");
    assert_eq!(whole_strip.summary, want.summary);
    assert!(
        want.stripped.as_ref().is_none_or(|s| whole_strip.out == *s),
        "stripped stream differs from the reference:\n got {:?}\nwant {:?}",
        String::from_utf8_lossy(&whole_strip.out),
        String::from_utf8_lossy(want.stripped.as_deref().unwrap_or_default())
    );

    // The same answers for other cuts of the same bytes.
    let mut rng = SplitMix(seed);
    let mut cuts: Vec<Vec<usize>> = Vec::new();
    // Byte by byte only for short streams: the coverage hooks make each call costly.
    if stream.len() <= 512 {
        cuts.push(vec![1; stream.len()]);
    }
    // Small streams: small chunks too; big ones (the bound): chunks of Envoy's usual sizes.
    let max_chunks: &[usize] = if stream.len() > 65536 {
        &[4096, 65536]
    } else {
        &[7, 300, 70_000]
    };
    for &max_chunk in max_chunks {
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
            let got = run(stream, sizes, strip);
            let base = if strip { &whole_strip } else { &whole };
            assert_eq!(got.summary, base.summary, "split changed the reading");
            assert!(got.out == base.out, "split changed the forwarded bytes");
        }
    }
}

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

/// Feeds `stream` in chunks of `sizes` through `push_filtered` (what the filter calls when it
/// strips the usage chunk) and, when not stripping, once more through `push` (what it calls
/// otherwise), which must read the same.
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
        if !strip {
            plain.push(chunk);
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
    if !strip {
        assert_eq!(summary, plain_summary, "push and push_filtered disagree");
    }
    Run { summary, out }
}

struct Reference {
    summary: Summary,
    /// `None` when some event's JSON is beyond the reference (see [`usage_only`]).
    stripped: Option<Vec<u8>>,
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
    let mut stripped = Some(Vec::new());
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
            if let Some(s) = stripped.as_mut() {
                s.extend_from_slice(raw);
            }
        } else {
            read_event(&mut summary, event);
            match (usage_only(event), stripped.as_mut()) {
                (Some(false), Some(s)) => s.extend_from_slice(&without_null_usage(raw)),
                (Some(true), _) | (_, None) => {}
                (None, Some(_)) => stripped = None,
            }
        }
        i += sep;
        start = i;
    }
    let tail = &stream[start..];
    if tail.len() > MAX_EVENT_BYTES {
        summary.oversized += 1;
    } else if !tail.is_empty() {
        read_event(&mut summary, tail);
    }
    if let Some(s) = stripped.as_mut() {
        s.extend_from_slice(tail);
    }
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
        return;
    }
    // Where the reference cannot tell (see `parse`), the reader's own JSON reading.
    let usage = reference_usage(&data).unwrap_or_else(|| usage::from_json(&data));
    if let Some(u) = usage {
        summary.usage = Some(u);
    }
}

/// What serde_json's `Value` makes of some JSON bytes.
enum Parsed {
    Json(Value),
    NotJson,
    /// JSON a `Value` cannot hold though the grammar allows it and serde skips it unchecked
    /// (invalid UTF-8 or lone surrogates in strings, numbers beyond f64), or nesting deeper
    /// than serde_json's limit: no reference.
    Undecidable,
}

fn parse(json: &[u8]) -> Parsed {
    match serde_json::from_slice::<Value>(json) {
        Ok(v) => Parsed::Json(v),
        Err(_) => {
            let lossy = String::from_utf8_lossy(json);
            match serde_json::from_str::<Value>(&lossy) {
                Ok(_) => Parsed::Undecidable,
                Err(e) => {
                    let m = e.to_string();
                    let skipped = [
                        "surrogate",
                        "hex escape",
                        "number out of range",
                        "recursion",
                    ];
                    if skipped.iter().any(|s| m.contains(s)) {
                        Parsed::Undecidable
                    } else {
                        Parsed::NotJson
                    }
                }
            }
        }
    }
}

/// The usage an event's data carries, read from a `Value` by OpenAI's format, independently
/// of the reader: an object whose `usage` is an object with `prompt_tokens` (or
/// `input_tokens`) and maybe `completion_tokens` (or `output_tokens`), or (the Responses API)
/// whose `response` object holds one. The data is read as one typed document: a member of the
/// wrong type (`usage` not an object or null, a token count not a u64 or null) voids it all.
/// `None`: no reference (see [`Parsed::Undecidable`]; also any object with a repeated key,
/// where which one counts is a choice).
fn reference_usage(data: &[u8]) -> Option<Option<Usage>> {
    match parse(data) {
        Parsed::Json(_) if repeats_a_key_anywhere(data) => None,
        Parsed::Json(Value::Object(o)) => Some(with_usage(&o).ok().flatten()),
        Parsed::Json(_) | Parsed::NotJson => Some(None),
        Parsed::Undecidable => None,
    }
}

type Object = serde_json::Map<String, Value>;

/// `Err` when a member has the wrong type.
fn with_usage(o: &Object) -> Result<Option<Usage>, ()> {
    let usage = match o.get("usage") {
        None | Some(Value::Null) => None,
        Some(Value::Object(u)) => raw_usage(u)?,
        Some(_) => return Err(()),
    };
    let response = match o.get("response") {
        None | Some(Value::Null) => None,
        Some(Value::Object(r)) => with_usage(r)?,
        Some(_) => return Err(()),
    };
    Ok(usage.or(response))
}

fn raw_usage(u: &Object) -> Result<Option<Usage>, ()> {
    let count = |key: &str| match u.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or(()),
        Some(_) => Err(()),
    };
    let prompt = count("prompt_tokens")?;
    let completion = count("completion_tokens")?;
    let input = count("input_tokens")?;
    let output = count("output_tokens")?;
    // Details are lenient: one that is not an object, or a count that is not a u64, is absent.
    let detail = |keys: [&str; 2], field: &str| {
        keys.iter()
            .find_map(|k| match u.get(*k) {
                Some(Value::Object(d)) => d.get(field).and_then(Value::as_u64),
                _ => None,
            })
            .unwrap_or(0)
    };
    Ok(prompt.or(input).map(|p| {
        let c = completion.or(output).unwrap_or(0);
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_tokens: detail(
                ["prompt_tokens_details", "input_tokens_details"],
                "cached_tokens",
            )
            .min(p),
            reasoning_tokens: detail(
                ["completion_tokens_details", "output_tokens_details"],
                "reasoning_tokens",
            )
            .min(c),
            cache_write_tokens: 0,
        }
    }))
}

/// The usage-only chunk: its first `data:` line is an object with `"choices": []` and a
/// non-null `usage`. `None` (no reference) for [`Parsed::Undecidable`] JSON and for objects
/// with a repeated key (which one counts is a choice).
fn usage_only(event: &[u8]) -> Option<bool> {
    let Some(line) = event
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"data:"))
    else {
        return Some(false);
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match parse(line) {
        Parsed::Json(Value::Object(o)) => {
            if repeats_a_key(line) {
                return None;
            }
            Some(
                o.get("choices") == Some(&Value::Array(Vec::new()))
                    && o.get("usage").is_some_and(|u| !u.is_null()),
            )
        }
        Parsed::Json(_) | Parsed::NotJson => Some(false),
        Parsed::Undecidable => None,
    }
}

/// Whether the top-level object `json` has a key twice.
fn repeats_a_key(json: &[u8]) -> bool {
    struct Keys(bool);
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            // A BTreeSet: a HashSet's random hashes would vary the coverage between runs.
            let mut seen = std::collections::BTreeSet::new();
            let mut repeated = self.0;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                repeated |= !seen.insert(k);
            }
            Ok(repeated)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    serde::Deserializer::deserialize_map(&mut de, Keys(false)).unwrap_or(false)
}

/// Whether any object in `json` (a valid JSON document) has a key twice.
fn repeats_a_key_anywhere(json: &[u8]) -> bool {
    struct Repeats(bool);
    impl<'de> serde::Deserialize<'de> for Repeats {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(RepeatsVisitor)
        }
    }
    struct RepeatsVisitor;
    impl<'de> serde::de::Visitor<'de> for RepeatsVisitor {
        type Value = Repeats;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Repeats, E> {
            Ok(Repeats(false))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Repeats, E> {
            Ok(Repeats(false))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Repeats, E> {
            Ok(Repeats(false))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Repeats, E> {
            Ok(Repeats(false))
        }
        fn visit_str<E>(self, _: &str) -> Result<Repeats, E> {
            Ok(Repeats(false))
        }
        fn visit_unit<E>(self) -> Result<Repeats, E> {
            Ok(Repeats(false))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Repeats, A::Error> {
            let mut repeated = false;
            while let Some(Repeats(r)) = seq.next_element()? {
                repeated |= r;
            }
            Ok(Repeats(repeated))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Repeats, A::Error> {
            let mut seen = std::collections::BTreeSet::new();
            let mut repeated = false;
            while let Some(k) = map.next_key::<String>()? {
                let Repeats(r) = map.next_value()?;
                repeated |= r | !seen.insert(k);
            }
            Ok(Repeats(repeated))
        }
    }
    serde_json::from_slice::<Repeats>(json).is_ok_and(|Repeats(r)| r)
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

/// `0x01 n` becomes `n * 2048` bytes of `x`, `0x02 n` as many spaces.
pub fn expand(data: &[u8]) -> Vec<u8> {
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

/// FNV-1a, to seed the cuts from the input.
pub fn fnv(data: &[u8]) -> u64 {
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

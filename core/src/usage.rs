//! Token usage from provider responses: a JSON body (`chat.completion`, `text_completion`,
//! embeddings, the Responses API) or a Server-Sent Events stream, where usage arrives in the
//! final chunk when `stream_options.include_usage` is set (or in `response.completed`).
//!
//! The SSE reader is incremental and bounded: it sees each body callback's bytes once, keeps at
//! most one unfinished event, and works on bytes, so events and multi-byte UTF-8 characters
//! split across callbacks are reassembled before anything is decoded.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::anthropic::{self, MessageUsage, StreamUsage};

pub use crate::types::Usage;

impl From<MessageUsage> for Usage {
    /// Anthropic's prompt tokens are its input tokens plus those written to and read from its
    /// prompt cache (reported apart from `input_tokens`): all of them count; those read from
    /// the cache are its cached tokens.
    fn from(u: MessageUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_total(),
            completion_tokens: u.output,
            // Cache reads are billed at the cached-input price, writes at the cache-write price.
            cached_tokens: u.cache_read,
            reasoning_tokens: 0,
            cache_write_tokens: u.cache_creation,
        }
    }
}

/// Usage of a message of Anthropic's Messages API; `None` if it has none.
pub fn from_anthropic_json(body: &[u8]) -> Option<Usage> {
    anthropic::usage_from_json(body).map(Usage::from)
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_details")]
    prompt_tokens_details: Option<RawDetails>,
    #[serde(default, deserialize_with = "lenient_details")]
    input_tokens_details: Option<RawDetails>,
    #[serde(default, deserialize_with = "lenient_details")]
    completion_tokens_details: Option<RawDetails>,
    #[serde(default, deserialize_with = "lenient_details")]
    output_tokens_details: Option<RawDetails>,
}

/// `*_tokens_details`: only the counts that change the price are read; a detail of another
/// type (a provider's own shape) counts as absent rather than losing the usage.
#[derive(Default)]
struct RawDetails {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

/// The members of a `*_tokens_details` object that are read.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DetailKey {
    CachedTokens,
    ReasoningTokens,
    #[serde(other)]
    Other,
}

/// The one JSON shape a lenient field accepts; any other value is read through and gives
/// `None` (see [`Lenient`]).
trait Shape<'de> {
    type Out;
    /// A non-negative integer (`None`: a negative one).
    fn count(&self, _n: Option<u64>) -> Option<Self::Out> {
        None
    }
    /// An object (read it, or leave it to be skipped).
    fn object<A: MapAccess<'de>>(&self, map: A) -> Result<Option<Self::Out>, A::Error> {
        skip_map(map)
    }
}

fn skip_map<'de, A: MapAccess<'de>, T>(mut map: A) -> Result<Option<T>, A::Error> {
    while map
        .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
        .is_some()
    {}
    Ok(None)
}

/// Reads any JSON value, keeping only the shape `S` accepts: what `serde_json::Value` and
/// `as_u64` / `from_value` did, without building the value (it allocated a map per response).
struct Lenient<S>(S);

impl<'de, S: Shape<'de>> Visitor<'de> for Lenient<S> {
    type Value = Option<S::Out>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.0.count(Some(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.0.count(u64::try_from(v).ok()))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.object(map)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// A count: a non-negative integer.
struct Count;

impl Shape<'_> for Count {
    type Out = u64;
    fn count(&self, n: Option<u64>) -> Option<u64> {
        n
    }
}

/// A `*_tokens_details` object. A repeated member counts as its last occurrence.
struct Details;

impl<'de> Shape<'de> for Details {
    type Out = RawDetails;
    fn object<A: MapAccess<'de>>(&self, mut map: A) -> Result<Option<RawDetails>, A::Error> {
        let mut details = RawDetails::default();
        while let Some(key) = map.next_key::<DetailKey>()? {
            match key {
                DetailKey::CachedTokens => {
                    details.cached_tokens = map.next_value::<LenientCount>()?.0
                }
                DetailKey::ReasoningTokens => {
                    details.reasoning_tokens = map.next_value::<LenientCount>()?.0;
                }
                DetailKey::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some(details))
    }
}

fn lenient_details<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RawDetails>, D::Error> {
    d.deserialize_any(Lenient(Details))
}

/// A count member of a details object (see [`Count`]).
struct LenientCount(Option<u64>);

impl<'de> Deserialize<'de> for LenientCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Lenient(Count)).map(LenientCount)
    }
}

impl RawUsage {
    fn usage(&self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens)?;
        let completion = self.completion_tokens.or(self.output_tokens).unwrap_or(0);
        let detail =
            |a: &Option<RawDetails>, b: &Option<RawDetails>, f: fn(&RawDetails) -> Option<u64>| {
                a.as_ref()
                    .and_then(f)
                    .or_else(|| b.as_ref().and_then(f))
                    .unwrap_or(0)
            };
        let cached = detail(
            &self.prompt_tokens_details,
            &self.input_tokens_details,
            |d| d.cached_tokens,
        );
        let reasoning = detail(
            &self.completion_tokens_details,
            &self.output_tokens_details,
            |d| d.reasoning_tokens,
        );
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            // A detail can never exceed its total (a provider's inconsistency must not make a
            // negative uncached count).
            cached_tokens: cached.min(prompt),
            reasoning_tokens: reasoning.min(completion),
            cache_write_tokens: 0,
        })
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Object<RawUsage>>,
    /// The Responses API nests it: `{"type":"response.completed","response":{"usage":...}}`.
    #[serde(default)]
    response: Option<Box<Object<WithUsage>>>,
}

impl WithUsage {
    fn usage(&self) -> Option<Usage> {
        self.usage
            .as_ref()
            .and_then(|u| u.0.usage())
            .or_else(|| self.response.as_ref().and_then(|r| r.0.usage()))
    }
}

/// A `T` read from a JSON object only. serde's derived structs also read a JSON array (field
/// by field, in order), so `[{"prompt_tokens":1}]` would be `{"usage":{"prompt_tokens":1}}`;
/// OpenAI's bodies, chunks and usage are objects.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(ObjectVisitor(PhantomData))
            .map(Object)
    }
}

/// Usage of a JSON response body; `None` if it has none (or is not a JSON object).
pub fn from_json(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Object<WithUsage>>(body)
        .ok()?
        .0
        .usage()
}

/// Whether `json` may hold a `usage` member worth reading: it names `"usage"` with a value other
/// than `null`, or it has a `\u` escape, which may spell the key (`"us\u0061ge"` is `usage`
/// too). The others need no parsing: a chat stream that asked for usage has `"usage":null` in
/// every content chunk.
fn may_carry_usage(json: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    if memchr::memmem::find(json, b"\\u").is_some() {
        return true;
    }
    let mut rest = json;
    while let Some(at) = memchr::memmem::find(rest, KEY) {
        let after = rest.get(at + KEY.len()..).unwrap_or_default();
        let after = after.trim_ascii_start();
        if let Some(value) = after.strip_prefix(b":") {
            if !value.trim_ascii_start().starts_with(b"null") {
                return true;
            }
        }
        rest = after;
    }
    false
}

/// Longest SSE event read; longer ones are not read (they are counted in `oversized` and
/// forwarded unchanged), however the stream is cut into chunks, so a provider that never ends
/// an event cannot grow the filter's memory beyond this (plus 3 bytes of a separator).
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Incremental reader of an SSE stream that records the usage it carries.
#[derive(Debug, Default)]
pub struct SseUsage {
    pending: Vec<u8>,
    skipping: bool,
    /// The last usage seen (the final usage chunk, or `response.completed`).
    pub usage: Option<Usage>,
    /// Events read.
    pub events: u64,
    /// Events longer than [`MAX_EVENT_BYTES`], not read.
    pub oversized: u64,
    /// `data: [DONE]` was seen.
    pub done: bool,
    /// Data events other than `[DONE]` and those carrying usage: the content chunks, about one
    /// token each in OpenAI-compatible streams (what a stream that reports no usage is charged).
    pub chunks: u64,
    /// Drop the usage-only chunk from what is forwarded (the gateway asked for it, the client
    /// did not): see [`SseUsage::push_filtered`].
    strip_usage_chunk: bool,
    /// A stream of Anthropic's Messages API (`message_start` ... `message_stop`).
    anthropic: Option<StreamUsage>,
}

impl SseUsage {
    /// A reader that also removes the usage-only chunk (`"choices":[]` with `usage`) from the
    /// stream, for clients that did not ask for it.
    pub fn stripping_usage_chunk() -> Self {
        Self {
            strip_usage_chunk: true,
            ..Self::default()
        }
    }

    /// A reader of a Messages API stream (Anthropic's): usage from `message_start` and
    /// `message_delta`, one chunk per `content_block_delta`.
    pub fn anthropic() -> Self {
        Self {
            anthropic: Some(StreamUsage::default()),
            ..Self::default()
        }
    }

    /// Like [`SseUsage::push`], and returns the bytes to forward: every complete event but the
    /// usage-only one, byte for byte; an unfinished event is held until it completes (events
    /// are small: the first token's event completes in the chunk that carries it).
    pub fn push_filtered(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len() + self.pending.len());
        let strip = self.strip_usage_chunk;
        self.scan(
            chunk,
            |event: Option<(&[u8], bool)>, raw: &[u8]| match event {
                // Unread (too long) or not stripping: as it came.
                None => out.extend_from_slice(raw),
                Some(_) if !strip => out.extend_from_slice(raw),
                // Only an event that may carry usage can be the usage-only chunk.
                Some((event, true)) if is_usage_only(event) => {}
                // With include_usage, providers add `"usage":null` to every chunk; without it
                // they do not, and neither does the gateway.
                Some(_) => push_without_null_usage(&mut out, raw),
            },
        );
        out
    }

    /// The bytes still held at the end of the stream (an unterminated last event).
    pub fn finish_filtered(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        self.last_event(&rest);
        rest
    }

    /// Feeds the next bytes of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.scan(chunk, |_, _| {});
    }

    /// Splits the stream into events; calls `each(Some((event, may carry usage)), raw bytes
    /// with separator)` for every complete event after reading it, and `each(None, raw bytes)`
    /// for the bytes of events too long to read.
    fn scan<F: FnMut(Option<(&[u8], bool)>, &[u8])>(&mut self, chunk: &[u8], mut each: F) {
        // A separator may have begun in the last bytes already pending.
        let mut scan = self.pending.len().saturating_sub(3);
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some((at, len)) = next_separator(&buf, scan) {
            let event = buf.get(start..at).unwrap_or_default();
            let raw = buf.get(start..at + len).unwrap_or_default();
            // The same bound whether the event came in one chunk or many.
            if self.skipping || event.len() > MAX_EVENT_BYTES {
                if !self.skipping {
                    self.oversized += 1;
                }
                each(None, raw);
            } else {
                let may_carry = self.event(event);
                each(Some((event, may_carry)), raw);
            }
            self.skipping = false;
            start = at + len;
            scan = start;
        }
        buf.drain(..start.min(buf.len()));
        // Up to 3 of these bytes may begin a separator; the rest is event, too long to read:
        // pass it on and keep only what may start a separator.
        if buf.len() > MAX_EVENT_BYTES + 3 {
            if !self.skipping {
                self.oversized += 1;
            }
            self.skipping = true;
            let keep_from = buf.len() - 3;
            each(None, buf.get(..keep_from).unwrap_or_default());
            buf.drain(..keep_from);
        }
        self.pending = buf;
    }

    /// Ends the stream: an unterminated last event is read too.
    pub fn finish(&mut self) {
        let rest = std::mem::take(&mut self.pending);
        self.last_event(&rest);
    }

    fn last_event(&mut self, rest: &[u8]) {
        if self.skipping || rest.is_empty() {
            return;
        }
        if rest.len() > MAX_EVENT_BYTES {
            self.oversized += 1;
        } else {
            self.event(rest);
        }
    }

    /// Reads one event; says whether its data may carry usage (see [`may_carry_usage`]).
    fn event(&mut self, event: &[u8]) -> bool {
        self.events += 1;
        // One data line (the usual event) is read where it is; more are joined.
        let mut first: Option<&[u8]> = None;
        let mut joined: Option<Vec<u8>> = None;
        for line in lines(event) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                // Lines join with LF even when empty (SSE: each line's value, then LF).
                match (&mut joined, first) {
                    (Some(data), _) => {
                        data.push(b'\n');
                        data.extend_from_slice(value);
                    }
                    (None, Some(f)) => {
                        let mut data = Vec::with_capacity(f.len() + 1 + value.len());
                        data.extend_from_slice(f);
                        data.push(b'\n');
                        data.extend_from_slice(value);
                        joined = Some(data);
                    }
                    (None, None) => first = Some(value),
                }
            }
            // `event:`, `id:`, `retry:` and `:` comments carry no usage.
        }
        let data = match (&joined, first) {
            (Some(data), _) => data.as_slice(),
            (None, Some(data)) => data,
            (None, None) => return false,
        };
        if data.is_empty() {
            return false;
        }
        if let Some(stream) = self.anthropic.as_mut() {
            match stream.event(data) {
                anthropic::Event::Content => self.chunks += 1,
                anthropic::Event::Usage => self.usage = stream.usage().map(Usage::from),
                anthropic::Event::Other => {}
            }
            // Anthropic's streams are passed on untouched: no usage-only event to take out.
            return false;
        }
        if data == b"[DONE]" {
            self.done = true;
            return false;
        }
        // Only an event that may carry usage is parsed at all.
        let may_carry = may_carry_usage(data);
        let usage = if may_carry { from_json(data) } else { None };
        match usage {
            Some(u) => self.usage = Some(u),
            None => self.chunks += 1,
        }
        may_carry
    }
}

/// Appends an event's bytes without the `,"usage":null` that ends its JSON payload, if it has
/// one (only when the payload ends right there: the `}` closes the chunk object).
fn push_without_null_usage(out: &mut Vec<u8>, raw: &[u8]) {
    const NULL_USAGE: &[u8] = b",\"usage\":null}";
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    let (payload, separator) = raw.split_at(end.min(raw.len()));
    match payload.strip_suffix(NULL_USAGE) {
        Some(kept) => {
            out.extend_from_slice(kept);
            out.push(b'}');
            out.extend_from_slice(separator);
        }
        None => out.extend_from_slice(raw),
    }
}

/// The final usage chunk of a chat stream: `"choices": []` and a `usage` object.
fn is_usage_only(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
    }
    let Some(data) = lines(event).find_map(|l| l.strip_prefix(b"data:")) else {
        return false;
    };
    let data = data.strip_suffix(b"\r").unwrap_or(data);
    // serde reads a struct from an array too (`[[], {}]`); a chunk is an object.
    if data.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return false;
    }
    matches!(
        serde_json::from_slice::<Chunk>(data),
        Ok(Chunk { choices: Some(c), usage: Some(_) }) if c.is_empty()
    )
}

/// The LF-separated lines of `b`, as `b.split(|&b| b == b'\n')` gives them (a trailing LF
/// gives a last, empty line), found with `memchr` rather than byte by byte: an event is a few
/// hundred bytes and every one of a stream's events is split.
fn lines(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(b);
    std::iter::from_fn(move || {
        let text = rest?;
        match memchr::memchr(b'\n', text) {
            Some(at) => {
                let (line, after) = text.split_at(at);
                rest = after.get(1..);
                Some(line)
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

fn separator_at(b: &[u8], i: usize) -> Option<usize> {
    let rest = b.get(i..)?;
    if rest.starts_with(b"\r\n\r\n") {
        Some(4)
    } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
        Some(2)
    } else {
        None
    }
}

/// The first event separator at or after `from`: its position and length.
fn next_separator(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    loop {
        let at = i + memchr::memchr2(b'\n', b'\r', buf.get(i..)?)?;
        if let Some(len) = separator_at(buf, at) {
            return Some((at, len));
        }
        i = at + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lines_are_what_split_on_lf_gives() {
        for text in [
            &b""[..],
            b"\n",
            b"\n\n",
            b"data: x",
            b"data: x\n",
            b"event: e\ndata: a\ndata: b",
            b"a\r\n\r\nb\n",
        ] {
            let want: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
            assert_eq!(lines(text).collect::<Vec<_>>(), want, "{text:?}");
        }
    }

    #[test]
    fn only_events_that_may_carry_usage_are_parsed() {
        for (data, expected) in [
            (&br#"{"choices":[],"usage":null}"#[..], false),
            (br#"{"usage" :  null, "x": 1}"#, false),
            (br#"{"object":"usage","n":1}"#, false),
            (br#"{"usage":{"prompt_tokens":1}}"#, true),
            (br#"{"usage" : {"prompt_tokens":1}}"#, true),
            (
                br#"{"usage":null,"response":{"usage":{"input_tokens":1}}}"#,
                true,
            ),
            (br#"{"us\u0061ge":{"prompt_tokens":1}}"#, true),
            (br#"{"usage":7}"#, true),
        ] {
            assert_eq!(
                may_carry_usage(data),
                expected,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn null_usage_is_cut_only_where_the_payload_ends() {
        let cut = |raw: &[u8]| {
            let mut out = Vec::new();
            push_without_null_usage(&mut out, raw);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            cut(b"data: {\"a\":1,\"usage\":null}\r\n\r\n"),
            "data: {\"a\":1}\r\n\r\n"
        );
        assert_eq!(cut(b"data: {\"a\":1,\"usage\":null}"), "data: {\"a\":1}");
        assert_eq!(
            cut(b"data: {\"a\":1,\"usage\":null} \n\n"),
            "data: {\"a\":1,\"usage\":null} \n\n"
        );
        assert_eq!(cut(b"\n\n"), "\n\n");
    }

    const STREAM: &str = concat!(
        ": keep-alive comment\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"h\u{e9}llo \u{1F600} \"}}],\"usage\":null}\n\n",
        "event: message\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n",
        "data: [DONE]\n\n",
    );

    fn read(chunks: &[&[u8]]) -> SseUsage {
        let mut r = SseUsage::default();
        for c in chunks {
            r.push(c);
        }
        r.finish();
        r
    }

    #[test]
    fn whole_stream() {
        let r = read(&[STREAM.as_bytes()]);
        assert_eq!(r.usage, Some(Usage::new(12, 5)));
        assert!(r.done);
        assert_eq!(r.events, 6);
    }

    #[test]
    fn one_byte_at_a_time() {
        let chunks: Vec<&[u8]> = STREAM.as_bytes().chunks(1).collect();
        let r = read(&chunks);
        assert_eq!(r.usage, Some(Usage::new(12, 5)));
        assert_eq!(r.events, 6);
    }

    #[test]
    fn crlf_separators_and_no_usage() {
        let s = "data: {\"choices\":[]}\r\n\r\ndata: [DONE]\r\n\r\n";
        let chunks: Vec<&[u8]> = s.as_bytes().chunks(3).collect();
        let r = read(&chunks);
        assert_eq!(r.usage, None);
        assert!(r.done);
        assert_eq!(r.events, 2);
    }

    #[test]
    fn responses_api_completed_event() {
        let s = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}}\n\n";
        assert_eq!(read(&[s.as_bytes()]).usage, Some(Usage::new(3, 4)));
    }

    #[test]
    fn oversized_events_are_skipped_and_the_stream_recovers() {
        let big = format!("data: {}\n\n", "x".repeat(MAX_EVENT_BYTES + 5000));
        let mut r = SseUsage::default();
        for c in big.as_bytes().chunks(1000) {
            r.push(c);
        }
        r.push(STREAM.as_bytes());
        r.finish();
        assert_eq!(r.oversized, 1);
        assert_eq!(r.usage, Some(Usage::new(12, 5)));
    }

    fn feed(r: &mut SseUsage, stream: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain([&stream.len()]) {
            out.extend(r.push_filtered(&stream[at..c]));
            at = c;
        }
        out.extend(r.finish_filtered());
        out
    }

    /// Fuzz target sse_bound, seed gen-oversized.sse: with the usage chunk stripped, an
    /// event longer than the bound was dropped from what the client receives.
    #[test]
    fn oversized_events_are_forwarded_not_dropped() {
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(MAX_EVENT_BYTES + 5000)
        );
        let stream = format!("{big}{STREAM}");
        let cuts: Vec<usize> = (1000..stream.len()).step_by(1000).collect();
        for cuts in [&cuts[..], &[]] {
            let mut r = SseUsage::stripping_usage_chunk();
            let out = feed(&mut r, stream.as_bytes(), cuts);
            assert!(
                out.starts_with(big.as_bytes()),
                "the big event was not forwarded"
            );
            assert_eq!(r.oversized, 1);
            assert_eq!(r.events, 6);
            assert_eq!(r.usage, Some(Usage::new(12, 5)));
        }
    }

    /// Fuzz target sse_bound, seed gen-oversized-usage.sse: whether an event near the
    /// bound was read depended on how the stream was cut into chunks.
    #[test]
    fn the_bound_does_not_depend_on_the_split() {
        for len in MAX_EVENT_BYTES - 1..=MAX_EVENT_BYTES + 4 {
            let head = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}";
            let event = format!("{head}{}}}", " ".repeat(len - head.len() - 1));
            assert_eq!(event.len(), len);
            let fits = len <= MAX_EVENT_BYTES;
            for tail in ["\r\n\r\n", "\n\n", ""] {
                let stream = format!("{event}{tail}");
                let n = stream.len();
                for cuts in [
                    vec![],
                    vec![n - 2],
                    vec![n - 5, n - 1],
                    (1..n).step_by(4096).collect(),
                ] {
                    let mut r = SseUsage::default();
                    let out = feed(&mut r, stream.as_bytes(), &cuts);
                    assert_eq!(out, stream.as_bytes());
                    assert_eq!(
                        r.usage.is_some(),
                        fits,
                        "len {len} tail {tail:?} cuts {cuts:?}"
                    );
                    assert_eq!(r.oversized, u64::from(!fits));
                }
            }
        }
    }

    #[test]
    fn json_bodies() {
        let chat = br#"{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;
        assert_eq!(from_json(chat), Some(Usage::new(9, 2)));
        let emb = br#"{"object":"list","data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        assert_eq!(from_json(emb), Some(Usage::new(4, 0)));
        let resp = br#"{"object":"response","usage":{"input_tokens":5,"output_tokens":6,"total_tokens":11}}"#;
        assert_eq!(from_json(resp), Some(Usage::new(5, 6)));
        assert_eq!(from_json(br#"{"error":{"message":"x"}}"#), None);
        assert_eq!(from_json(b"not json"), None);
        assert_eq!(from_json(br#"{"usage":null}"#), None);
    }

    #[test]
    fn the_usage_chunk_is_removed_and_nothing_else() {
        let mut r = SseUsage::stripping_usage_chunk();
        let mut out = Vec::new();
        for c in STREAM.as_bytes().chunks(7) {
            out.extend(r.push_filtered(c));
        }
        out.extend(r.finish_filtered());
        let expected = STREAM
            .replace(
                "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n",
                "",
            )
            .replace(",\"usage\":null}", "}");
        assert_ne!(expected, STREAM);
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(r.usage, Some(Usage::new(12, 5)));
        // Without stripping, every byte passes.
        let mut r = SseUsage::default();
        let out: Vec<u8> = STREAM
            .as_bytes()
            .chunks(5)
            .flat_map(|c| r.push_filtered(c))
            .collect();
        assert_eq!(out, STREAM.as_bytes());
    }

    #[test]
    fn a_cut_off_stream_counts_the_chunks_it_delivered() {
        let cut = STREAM.find("event: message").unwrap();
        let r = read(&[&STREAM.as_bytes()[..cut]]);
        assert_eq!((r.usage, r.chunks, r.done), (None, 2, false));
    }

    /// Fuzz target sse, seed array-chunk.sse: an array with an empty
    /// first element and a second one was taken for the usage chunk and removed.
    #[test]
    fn only_an_object_is_the_usage_chunk() {
        let mut r = SseUsage::stripping_usage_chunk();
        let s = b"data: [[],{\"prompt_tokens\":1}]\n\ndata: [DONE]\n\n";
        let mut out = r.push_filtered(s);
        out.extend(r.finish_filtered());
        assert_eq!(out, s);
    }

    /// Fuzz finding (fuzz/seeds/sse/empty-data-line.sse): an empty first `data:` line was
    /// dropped, so `data:` then `data: [DONE]` read as `[DONE]` (the SSE data is "\n[DONE]").
    #[test]
    fn empty_data_lines_count() {
        let r = read(&[b"data:\ndata: [DONE]\n\n"]);
        assert!(!r.done);
        let r = read(&[b"data:\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\ndata: [DONE]\n\n"]);
        assert!(r.done);
        assert_eq!(r.usage.map(|u| u.prompt_tokens), Some(2));
    }

    /// Issue 14, fuzz/seeds/sse/usage-from-an-array.sse: `data: [{"prompt_tokens":1}]` is
    /// no usage (a chunk is an object), but serde's derived struct read it from the array as
    /// `{"usage":{"prompt_tokens":1}}`; only the reader's `"usage"` prefilter hid it.
    #[test]
    fn usage_is_read_from_objects_only() {
        let seed = include_bytes!("../../fuzz/seeds/sse/usage-from-an-array.sse");
        for chunk in [seed.len(), 1] {
            let chunks: Vec<&[u8]> = seed.chunks(chunk).collect();
            let r = read(&chunks);
            assert_eq!((r.usage, r.events, r.done), (None, 4, false));
        }
        for body in [
            &br#"[{"prompt_tokens":1}]"#[..],
            br#"[{"prompt_tokens":1,"completion_tokens":2}]"#,
            br#"{"usage":[1,2]}"#,
            br#"{"response":[{"prompt_tokens":1}]}"#,
            br#"{"response":{"usage":[1]}}"#,
        ] {
            assert_eq!(from_json(body), None, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            from_json(br#"{"response":{"usage":{"input_tokens":1}}}"#),
            Some(Usage::new(1, 0))
        );
    }

    /// A key spelled with escapes is the same key: `"us\u0061ge"` is `usage`.
    #[test]
    fn an_escaped_usage_key_is_read() {
        let s = b"data: {\"choices\":[],\"us\\u0061ge\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n";
        let r = read(&[s]);
        assert_eq!(r.usage.map(|u| u.prompt_tokens), Some(3));
        assert_eq!(r.chunks, 0);
    }

    const MESSAGE_STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":2,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"h\u{e9}llo \u{1F600}\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" world\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":6}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn a_messages_stream_reports_every_prompt_token() {
        for size in [MESSAGE_STREAM.len(), 1, 7] {
            let mut r = SseUsage::anthropic();
            for c in MESSAGE_STREAM.as_bytes().chunks(size) {
                r.push(c);
            }
            r.finish();
            assert_eq!(
                r.usage,
                Some(Usage {
                    prompt_tokens: 17,
                    completion_tokens: 6,
                    cached_tokens: 3,
                    reasoning_tokens: 0,
                    cache_write_tokens: 2,
                })
            );
            assert_eq!((r.events, r.chunks), (8, 2));
        }
        // Cut after the first delta: no usage, one content chunk delivered.
        let cut = MESSAGE_STREAM.find("event: content_block_delta\n").unwrap() + 60;
        let cut = MESSAGE_STREAM[cut..].find("\n\n").unwrap() + cut + 2;
        let mut r = SseUsage::anthropic();
        r.push(&MESSAGE_STREAM.as_bytes()[..cut]);
        assert_eq!((r.usage, r.chunks), (None, 1));
        // The OpenAI reader finds no usage in it: the two APIs need their own readers.
        let r = read(&[MESSAGE_STREAM.as_bytes()]);
        assert_eq!(r.usage, None);
        assert_eq!(
            from_anthropic_json(br#"{"type":"message","usage":{"input_tokens":4,"output_tokens":2,"cache_read_input_tokens":10}}"#),
            Some(Usage { prompt_tokens: 14, completion_tokens: 2, cached_tokens: 10, reasoning_tokens: 0, cache_write_tokens: 0 })
        );
    }

    #[test]
    fn cached_and_reasoning_tokens_are_read() {
        let chat = br#"{"object":"chat.completion","usage":{"prompt_tokens":100,"completion_tokens":40,"total_tokens":140,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":32,"audio_tokens":0}}}"#;
        let u = from_json(chat).unwrap();
        assert_eq!(
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                u.reasoning_tokens
            ),
            (100, 40, 64, 32)
        );
        let resp = br#"{"object":"response","usage":{"input_tokens":50,"input_tokens_details":{"cached_tokens":10},"output_tokens":20,"output_tokens_details":{"reasoning_tokens":5},"total_tokens":70}}"#;
        let u = from_json(resp).unwrap();
        assert_eq!((u.cached_tokens, u.reasoning_tokens), (10, 5));
        // Details of another shape, or larger than their total, do not lose the usage.
        let odd = br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":[1],"completion_tokens_details":{"reasoning_tokens":"x"}}}"#;
        assert_eq!(from_json(odd), Some(Usage::new(5, 1)));
        let over = br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9},"completion_tokens_details":{"reasoning_tokens":7}}}"#;
        let u = from_json(over).unwrap();
        assert_eq!((u.cached_tokens, u.reasoning_tokens), (5, 1));
        let null = br#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":null}}"#;
        assert_eq!(from_json(null), Some(Usage::new(5, 0)));
        // The last chunk of a stream.
        let s = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":8},\"completion_tokens_details\":{\"reasoning_tokens\":3}}}\n\ndata: [DONE]\n\n";
        let u = read(&[s.as_bytes()]).usage.unwrap();
        assert_eq!((u.cached_tokens, u.reasoning_tokens), (8, 3));
    }

    #[test]
    fn token_details_are_read_as_json_values_would_be() {
        let cached = |details: &str| {
            let body =
                format!(r#"{{"usage":{{"prompt_tokens":50,"prompt_tokens_details":{details}}}}}"#);
            from_json(body.as_bytes()).map(|u| u.cached_tokens)
        };
        // What `serde_json::Value` and `as_u64` made of them: only a non-negative integer counts.
        for (details, want) in [
            (r#"{"cached_tokens":7}"#, Some(7)),
            (r#"{"cached_tokens":-7}"#, Some(0)),
            (r#"{"cached_tokens":7.0}"#, Some(0)),
            (r#"{"cached_tokens":{"n":7}}"#, Some(0)),
            (r#"{"cached_tokens":[7]}"#, Some(0)),
            (r#"{"cached_tokens":true}"#, Some(0)),
            (r#"{"cached_tokens":null}"#, Some(0)),
            (r#"{"cached_tokens":1,"cached_tokens":9}"#, Some(9)),
            (r#"{"cached_\u0074okens":7}"#, Some(7)),
            (
                r#"{"other":{"cached_tokens":7},"cached_tokens":3}"#,
                Some(3),
            ),
            ("12", Some(0)),
            (r#""cached""#, Some(0)),
            ("false", Some(0)),
        ] {
            assert_eq!(cached(details), want, "{details}");
        }
        // Broken JSON inside the details is still broken JSON: no usage at all.
        assert_eq!(cached(r#"{"cached_tokens":}"#), None);
    }

    proptest! {
        /// Any split of the stream into chunks gives the same events and usage.
        #[test]
        fn any_split_gives_the_same_answer(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..20)) {
            let bytes = STREAM.as_bytes();
            let mut cuts = cuts;
            cuts.sort_unstable();
            cuts.dedup();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&bytes[at..c]);
                at = c;
            }
            chunks.push(&bytes[at..]);
            let r = read(&chunks);
            prop_assert_eq!(r.usage, Some(Usage::new(12, 5)));
            prop_assert_eq!(r.events, 6);
            prop_assert_eq!(r.chunks, 3);
            prop_assert!(r.done);
        }

        #[test]
        fn never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut r = SseUsage::default();
            for c in &chunks {
                r.push(c);
            }
            r.finish();
        }
    }
}

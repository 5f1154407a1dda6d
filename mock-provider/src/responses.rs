//! OpenAI's Responses API (`POST /v1/responses`): request validation, the response object and
//! its SSE event sequence. Same deterministic replies and usage formula as chat. Built with
//! `json!` (key order is alphabetical then): clients read these by name, and the shapes are
//! checked against what the official Python SDK parses.

use serde_json::{json, Map, Value};

use crate::openai::{
    self, empty_array, field, invalid_type, item_tokens, max_tokens, optional_bool,
    required_string, ApiError, Reply,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesRequest {
    pub model: String,
    pub instructions: Option<String>,
    pub input_tokens: u64,
    /// Words of the last `user` input item (or the last item; or the input string).
    pub echo: Vec<String>,
    pub max_output_tokens: Option<u64>,
    pub stream: bool,
}

/// Texts of one input item: `content` as a string or the `text` of its parts; items without
/// `content` (tool outputs) contribute their `output` string if any.
fn item_texts(item: &Map<String, Value>) -> Vec<&str> {
    match item.get("content") {
        Some(c) => openai::content_texts(Some(c)),
        None => item
            .get("output")
            .and_then(Value::as_str)
            .into_iter()
            .collect(),
    }
}

fn chars(texts: &[&str]) -> usize {
    texts.iter().map(|t| t.chars().count()).sum()
}

pub fn parse(body: &[u8]) -> Result<ResponsesRequest, ApiError> {
    let obj = openai::parse_object(body)?;
    let model = required_string(&obj, "model")?;
    let instructions = match field(&obj, "instructions") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(invalid_type("instructions", "a string", other)),
    };
    let mut input_tokens = instructions
        .as_deref()
        .map_or(0, |i| item_tokens(i.chars().count()));
    let echo = match field(&obj, "input") {
        None => return Err(openai::missing("input")),
        Some(Value::String(s)) => {
            input_tokens += item_tokens(s.chars().count());
            openai::echo_words([s.as_str()])
        }
        Some(Value::Array(items)) if items.is_empty() => return Err(empty_array("input")),
        Some(Value::Array(items)) => {
            let mut objects = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Some(item) = item.as_object() else {
                    return Err(invalid_type(&format!("input[{i}]"), "an object", item));
                };
                input_tokens += item_tokens(chars(&item_texts(item)));
                objects.push(item);
            }
            let source = objects
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                .or_else(|| objects.last());
            openai::echo_words(source.map(|m| item_texts(m)).unwrap_or_default())
        }
        Some(other) => {
            return Err(invalid_type(
                "input",
                "a string or an array of input items",
                other,
            ))
        }
    };
    Ok(ResponsesRequest {
        model,
        instructions,
        input_tokens,
        echo,
        max_output_tokens: max_tokens(&obj, &["max_output_tokens"])?,
        stream: optional_bool(&obj, "stream")?,
    })
}

/// What one response's objects share.
pub struct Ids<'a> {
    /// `resp_...`
    pub response: &'a str,
    /// `msg_...`
    pub message: &'a str,
    pub created_at: u64,
}

fn usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn message(ids: &Ids, status: &str, content: Vec<Value>) -> Value {
    json!({"id": ids.message, "type": "message", "status": status, "role": "assistant",
           "content": content})
}

/// `completed`, or `incomplete` when `max_output_tokens` cut the reply (as OpenAI answers).
fn final_status(reply: &Reply) -> &'static str {
    if reply.finish_reason == "length" {
        "incomplete"
    } else {
        "completed"
    }
}

/// The response object. `done: false` gives the `in_progress` shell the stream starts with.
fn response(req: &ResponsesRequest, ids: &Ids, reply: &Reply, done: bool) -> Value {
    let status = if done {
        final_status(reply)
    } else {
        "in_progress"
    };
    let incomplete =
        (done && status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    let output = if done {
        vec![message(ids, "completed", vec![text_part(&reply.content())])]
    } else {
        Vec::new()
    };
    json!({
        "id": ids.response,
        "object": "response",
        "created_at": ids.created_at,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": req.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "store": true,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": done.then(|| usage(req.input_tokens, reply.completion_tokens())),
        "user": null,
        "metadata": {},
    })
}

pub fn body(req: &ResponsesRequest, ids: &Ids, reply: &Reply) -> Vec<u8> {
    openai::to_json(&response(req, ids, reply, true))
}

/// A stored response, for `GET /v1/responses/{id}`: the mock keeps none, so this is a
/// completed, empty one with the asked-for id.
pub fn stored(id: &str, created_at: u64) -> Vec<u8> {
    let req = ResponsesRequest {
        model: "gpt-4.1".into(),
        instructions: None,
        input_tokens: 0,
        echo: Vec::new(),
        max_output_tokens: None,
        stream: false,
    };
    let ids = Ids {
        response: id,
        message: "msg_stored",
        created_at,
    };
    let mut v = response(&req, &ids, &Reply::new("stored", &[], None), true);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("output".into(), json!([]));
        obj.insert("usage".into(), usage(0, 0));
    }
    openai::to_json(&v)
}

/// One SSE event as OpenAI sends Responses events: an `event:` line naming the type, then
/// the JSON. There is no `[DONE]`: the stream ends after `response.completed`.
fn event(kind: &str, seq: usize, mut data: Value) -> Vec<u8> {
    if let Some(obj) = data.as_object_mut() {
        obj.insert("type".into(), json!(kind));
        obj.insert("sequence_number".into(), json!(seq));
    }
    let mut out = format!("event: {kind}\ndata: ").into_bytes();
    out.extend_from_slice(&openai::to_json(&data));
    out.extend_from_slice(b"\n\n");
    out
}

/// The events of a streamed response, in OpenAI's order: created, in_progress, the message
/// item and its text part, one `output_text.delta` per word token, the `.done` events, then
/// `response.completed` (or `response.incomplete`) carrying the full response and its usage.
pub fn stream(req: &ResponsesRequest, ids: &Ids, reply: &Reply) -> Vec<Vec<u8>> {
    let shell = response(req, ids, reply, false);
    let text = reply.content();
    let loc = |extra: Value| {
        let mut v = json!({"item_id": ids.message, "output_index": 0, "content_index": 0});
        if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
        }
        v
    };
    let mut out: Vec<(&str, Value)> = vec![
        ("response.created", json!({"response": shell})),
        ("response.in_progress", json!({"response": shell})),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": message(ids, "in_progress", Vec::new())}),
        ),
        (
            "response.content_part.added",
            loc(json!({"part": text_part("")})),
        ),
    ];
    for token in &reply.tokens {
        out.push((
            "response.output_text.delta",
            loc(json!({"delta": token, "logprobs": []})),
        ));
    }
    out.push((
        "response.output_text.done",
        loc(json!({"text": text, "logprobs": []})),
    ));
    out.push((
        "response.content_part.done",
        loc(json!({"part": text_part(&text)})),
    ));
    out.push((
        "response.output_item.done",
        json!({"output_index": 0, "item": message(ids, "completed", vec![text_part(&text)])}),
    ));
    let last = if final_status(reply) == "completed" {
        "response.completed"
    } else {
        "response.incomplete"
    };
    out.push((last, json!({"response": response(req, ids, reply, true)})));
    out.into_iter()
        .enumerate()
        .map(|(seq, (kind, data))| event(kind, seq, data))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: Ids<'static> = Ids {
        response: "resp_x",
        message: "msg_x",
        created_at: 1234,
    };

    #[test]
    fn input_forms_and_usage() {
        // "Be brief." 9 chars -> 4+3; "Hello mock world" 16 -> 4+4.
        let req = parse(br#"{"model":"m","instructions":"Be brief.","input":"Hello mock world"}"#)
            .unwrap();
        assert_eq!(req.input_tokens, 7 + 8);
        assert_eq!(req.echo, ["Hello", "mock", "world"]);
        let req = parse(
            br#"{"model":"m","input":[{"role":"user","content":"one two"},
                {"role":"assistant","content":[{"type":"output_text","text":"x"}]},
                {"type":"function_call_output","call_id":"c","output":"abcd"}],
                "max_output_tokens":2,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(req.input_tokens, (4 + 2) + (4 + 1) + (4 + 1));
        assert_eq!(req.echo, ["one", "two"]);
        assert_eq!(req.max_output_tokens, Some(2));
        assert!(req.stream);
        for (bad, param) in [
            (&br#"{"input":"x"}"#[..], "model"),
            (br#"{"model":"m"}"#, "input"),
            (br#"{"model":"m","input":[]}"#, "input"),
            (br#"{"model":"m","input":5}"#, "input"),
            (br#"{"model":"m","input":["x"]}"#, "input[0]"),
            (
                br#"{"model":"m","input":"x","instructions":1}"#,
                "instructions",
            ),
            (
                br#"{"model":"m","input":"x","max_output_tokens":0}"#,
                "max_output_tokens",
            ),
        ] {
            assert_eq!(parse(bad).unwrap_err().param.as_deref(), Some(param));
        }
    }

    #[test]
    fn response_body_shape() {
        let req = parse(br#"{"model":"gpt-4.1","input":"Hello mock world"}"#).unwrap();
        let reply = Reply::new("alpha", &req.echo, None);
        let v: Value = serde_json::from_slice(&body(&req, &IDS, &reply)).unwrap();
        assert_eq!(v["object"], "response");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["model"], "gpt-4.1");
        assert_eq!(v["output"][0]["type"], "message");
        assert_eq!(
            v["output"][0]["content"][0]["text"],
            "Mock reply from alpha: Hello mock world"
        );
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 8, "input_tokens_details": {"cached_tokens": 0},
                   "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": 15})
        );
        let cut = Reply::new("alpha", &req.echo, Some(2));
        let v: Value = serde_json::from_slice(&body(&req, &IDS, &cut)).unwrap();
        assert_eq!(v["status"], "incomplete");
        assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    }

    #[test]
    fn stream_events() {
        let req = parse(br#"{"model":"m","input":"a b","stream":true}"#).unwrap();
        let reply = Reply::new("mock", &req.echo, None);
        let events = stream(&req, &IDS, &reply);
        let parsed: Vec<(String, Value)> = events
            .iter()
            .map(|e| {
                let text = std::str::from_utf8(e).unwrap();
                let (head, data) = text.split_once('\n').unwrap();
                let kind = head.strip_prefix("event: ").unwrap().to_string();
                let json = data
                    .strip_prefix("data: ")
                    .unwrap()
                    .strip_suffix("\n\n")
                    .unwrap();
                (kind, serde_json::from_str(json).unwrap())
            })
            .collect();
        for (i, (kind, data)) in parsed.iter().enumerate() {
            assert_eq!(&data["type"], kind);
            assert_eq!(data["sequence_number"], i);
        }
        let kinds: Vec<&str> = parsed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds.first(), Some(&"response.created"));
        assert_eq!(kinds.last(), Some(&"response.completed"));
        let deltas: String = parsed
            .iter()
            .filter(|(k, _)| k == "response.output_text.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, reply.content());
        assert_eq!(parsed[0].1["response"]["usage"], Value::Null);
        let done = &parsed.last().unwrap().1["response"];
        assert_eq!(done["usage"]["output_tokens"], reply.completion_tokens());
        assert_eq!(done["usage"]["input_tokens"], 4 + 1);
        let cut = Reply::new("mock", &req.echo, Some(1));
        let last = stream(&req, &IDS, &cut).pop().unwrap();
        assert!(last.starts_with(b"event: response.incomplete\n"));
        let stored: Value = serde_json::from_slice(&stored("resp_abc", 5)).unwrap();
        assert_eq!(stored["id"], "resp_abc");
        assert_eq!(stored["status"], "completed");
    }
}

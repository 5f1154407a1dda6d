//! OpenAI wire shapes: request validation, deterministic replies, usage, response bodies,
//! SSE chunk sequences and error bodies. Pure functions, so every shape is unit-tested without
//! sockets. Structs (not `json!`) keep fields in OpenAI's order, which makes captured traffic
//! easy to compare with the real thing by eye.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::ids::mix;

pub const SYSTEM_FINGERPRINT: &str = "fp_mock";
/// `created` of every model in `/v1/models`; a fixed value keeps that body byte-stable.
pub const MODEL_CREATED: u64 = 1_700_000_000;
/// Replies echo at most this many words of the prompt, so long prompts don't make long replies.
pub const MAX_ECHO_WORDS: usize = 16;
pub const DEFAULT_EMBEDDING_DIMENSIONS: usize = 8;
pub const MAX_EMBEDDING_DIMENSIONS: usize = 4096;
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Only our own plain structs and `Value`s are serialised here; serde_json cannot fail on
    // those (no non-string map keys, no fallible custom impls), and `{}` beats a panic.
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

pub fn sse_event(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_request_error", message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Vec<u8> {
        to_json(&ErrorEnvelope {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
    }

    /// `authorization` is the header as received. The key is masked the way OpenAI does it,
    /// so a wrong key never ends up whole in a response or a test log.
    pub fn invalid_api_key(authorization: Option<&str>) -> Self {
        let message = match authorization.and_then(|a| a.strip_prefix("Bearer ")) {
            Some(key) => format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                mask_key(key)
            ),
            None => "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".to_string(),
        };
        ApiError::new(401, "invalid_request_error", message).with_code("invalid_api_key")
    }

    pub fn invalid_url(method: &str, path: &str) -> Self {
        ApiError::new(
            404,
            "invalid_request_error",
            format!("Invalid URL ({method} {path})"),
        )
    }

    pub fn invalid_method(method: &str, path: &str) -> Self {
        ApiError::new(
            405,
            "invalid_request_error",
            format!("Invalid method for URL ({method} {path})"),
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError::new(
            404,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_code("model_not_found")
    }

    /// The body a provider would send with `status`, for error injection.
    pub fn injected(status: u16, model: Option<&str>) -> Self {
        let reason = crate::http::reason(status);
        match status {
            401 => ApiError::new(
                401,
                "invalid_request_error",
                "Incorrect API key provided (error injected by the mock provider).",
            )
            .with_code("invalid_api_key"),
            403 => ApiError::new(
                403,
                "invalid_request_error",
                "You are not allowed to sample from this model.",
            )
            .with_code("permission_denied"),
            404 => ApiError::model_not_found(model.unwrap_or("unknown")),
            429 => ApiError::new(
                429,
                "requests",
                "Rate limit reached for requests (error injected by the mock provider). Please try again in 1s.",
            )
            .with_code("rate_limit_exceeded"),
            500 => ApiError::new(
                500,
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
            ),
            502 | 503 => ApiError::new(
                status,
                "server_error",
                "The server is overloaded or not ready yet.",
            )
            .with_code("service_unavailable"),
            400..=499 => ApiError::invalid_request(format!(
                "Error {status} {reason} injected by the mock provider."
            ))
            .with_status(status),
            _ => ApiError::new(
                status,
                "server_error",
                format!("Error {status} {reason} injected by the mock provider."),
            ),
        }
    }

    fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

/// `sk-ab***xyz`: enough to tell keys apart, never the whole key (short keys show nothing).
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "***".to_string();
    }
    let head: String = chars.iter().take(5).collect();
    let tail: String = chars.iter().skip(chars.len() - 3).collect();
    format!("{head}***{tail}")
}

fn type_desc(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn invalid_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid_request(format!(
        "Invalid type for '{param}': expected {expected}, but got {} instead.",
        type_desc(got)
    ))
    .with_param(param)
    .with_code("invalid_type")
}

pub(crate) fn missing(param: &str) -> ApiError {
    ApiError::invalid_request(format!("Missing required parameter: '{param}'."))
        .with_param(param)
        .with_code("missing_required_parameter")
}

pub(crate) fn empty_array(param: &str) -> ApiError {
    ApiError::invalid_request(format!(
        "Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
    ))
    .with_param(param)
    .with_code("empty_array")
}

// ---------------------------------------------------------------------------------------------
// Request fields

pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::invalid_request(format!(
            "Invalid type for request body: expected an object, but got {} instead.",
            type_desc(&other)
        ))),
        Err(_) => Err(ApiError::invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
        )),
    }
}

/// Present and not null.
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

pub(crate) fn required_string(obj: &Map<String, Value>, name: &str) -> Result<String, ApiError> {
    match field(obj, name) {
        None => Err(missing(name)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(invalid_type(name, "a string", other)),
    }
}

pub(crate) fn optional_bool(obj: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match field(obj, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(invalid_type(name, "a boolean", other)),
    }
}

/// First of `names` that is present; chat takes `max_completion_tokens` over `max_tokens`.
pub(crate) fn max_tokens(
    obj: &Map<String, Value>,
    names: &[&str],
) -> Result<Option<u64>, ApiError> {
    let Some((name, value)) = names.iter().find_map(|n| field(obj, n).map(|v| (*n, v))) else {
        return Ok(None);
    };
    match value.as_i64() {
        Some(n) if n >= 1 => Ok(u64::try_from(n).ok()),
        Some(n) => Err(ApiError::invalid_request(format!(
            "Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {n} instead."
        ))
        .with_param(name)
        .with_code("integer_below_min_value")),
        None if value.is_u64() => Ok(value.as_u64()),
        None => Err(invalid_type(name, "an integer", value)),
    }
}

/// `stream_options.include_usage`; ignored unless streaming, as only then does it matter.
fn include_usage(obj: &Map<String, Value>) -> Result<bool, ApiError> {
    match field(obj, "stream_options") {
        None => Ok(false),
        Some(Value::Object(opts)) => match field(opts, "include_usage") {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(invalid_type(
                "stream_options.include_usage",
                "a boolean",
                other,
            )),
        },
        Some(other) => Err(invalid_type("stream_options", "an object", other)),
    }
}

/// Prompt tokens charged for one text item (chat message, prompt, embedding input).
pub fn item_tokens(chars: usize) -> u64 {
    4 + chars.div_ceil(4) as u64
}

/// The texts of a chat message `content`: a string, or the `text` of each content part.
pub(crate) fn content_texts(content: Option<&Value>) -> Vec<&str> {
    match content {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => Vec::new(),
    }
}

pub(crate) fn echo_words<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    texts
        .into_iter()
        .flat_map(str::split_whitespace)
        .take(MAX_ECHO_WORDS)
        .map(str::to_string)
        .collect()
}

/// A prompt item: text, or pre-tokenised integers (legacy completions and embeddings accept
/// both).
enum TextItem<'a> {
    Text(&'a str),
    Tokens(&'a [Value]),
}

impl TextItem<'_> {
    fn prompt_tokens(&self) -> u64 {
        match self {
            TextItem::Text(s) => item_tokens(s.chars().count()),
            TextItem::Tokens(t) => 4 + t.len() as u64,
        }
    }

    fn echo_words(&self) -> Vec<String> {
        match self {
            TextItem::Text(s) => echo_words([*s]),
            TextItem::Tokens(_) => Vec::new(),
        }
    }

    /// FNV-1a over the text (or the token values), so equal inputs get equal embeddings.
    fn seed(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        match self {
            TextItem::Text(s) => feed(s.as_bytes()),
            TextItem::Tokens(t) => {
                for v in t.iter() {
                    feed(&v.as_u64().unwrap_or(0).to_le_bytes());
                }
            }
        }
        h
    }
}

fn is_token_array(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_u64))
}

/// `prompt` / `input`: a string, an array of strings, an array of tokens, or an array of
/// token arrays.
fn text_items<'a>(obj: &'a Map<String, Value>, param: &str) -> Result<Vec<TextItem<'a>>, ApiError> {
    const EXPECTED: &str =
        "a string, an array of strings, an array of tokens, or an array of token arrays";
    let value = field(obj, param).ok_or_else(|| missing(param))?;
    match value {
        Value::String(s) => Ok(vec![TextItem::Text(s)]),
        Value::Array(items) if items.is_empty() => Err(empty_array(param)),
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(items
            .iter()
            .filter_map(Value::as_str)
            .map(TextItem::Text)
            .collect()),
        Value::Array(items) if is_token_array(value) => Ok(vec![TextItem::Tokens(items)]),
        Value::Array(items) if items.iter().all(is_token_array) => Ok(items
            .iter()
            .filter_map(Value::as_array)
            .map(|t| TextItem::Tokens(t))
            .collect()),
        other => Err(invalid_type(param, EXPECTED, other)),
    }
}

// ---------------------------------------------------------------------------------------------
// Replies and usage

/// The assistant's answer split into word tokens: each but the last carries its trailing
/// space, so the tokens concatenate to the content and each is one streamed delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub tokens: Vec<String>,
    pub finish_reason: &'static str,
}

impl Reply {
    /// `Mock reply from NAME:` followed by the echoed words, cut to `max_tokens` words.
    pub fn new(name: &str, echo: &[String], max_tokens: Option<u64>) -> Self {
        let mut text = format!("Mock reply from {name}:");
        for word in echo.iter().take(MAX_ECHO_WORDS) {
            text.push(' ');
            text.push_str(word);
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let limit = max_tokens.map_or(words.len(), |m| {
            usize::try_from(m).unwrap_or(usize::MAX).min(words.len())
        });
        let tokens = words
            .iter()
            .take(limit)
            .enumerate()
            .map(|(i, w)| {
                if i + 1 < limit {
                    format!("{w} ")
                } else {
                    (*w).to_string()
                }
            })
            .collect();
        Reply {
            tokens,
            finish_reason: if limit < words.len() {
                "length"
            } else {
                "stop"
            },
        }
    }

    pub fn content(&self) -> String {
        self.tokens.concat()
    }

    pub fn completion_tokens(&self) -> u64 {
        self.tokens.len() as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: 0 },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: 0,
            },
        }
    }
}

/// What every object of one response shares.
pub struct Meta<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

// ---------------------------------------------------------------------------------------------
// Chat completions

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    pub model: String,
    pub prompt_tokens: u64,
    /// Words of the last user message (or the last message if none is from the user).
    pub echo: Vec<String>,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let obj = parse_object(body)?;
    let model = required_string(&obj, "model")?;
    let messages = match field(&obj, "messages") {
        None => return Err(missing("messages")),
        Some(Value::Array(m)) if m.is_empty() => return Err(empty_array("messages")),
        Some(Value::Array(m)) => m,
        Some(other) => return Err(invalid_type("messages", "an array", other)),
    };
    let mut prompt_tokens = 0;
    for (i, message) in messages.iter().enumerate() {
        let Some(message) = message.as_object() else {
            return Err(invalid_type(
                &format!("messages[{i}]"),
                "an object",
                message,
            ));
        };
        match field(message, "role") {
            Some(Value::String(_)) => {}
            None => return Err(missing(&format!("messages[{i}].role"))),
            Some(other) => {
                return Err(invalid_type(
                    &format!("messages[{i}].role"),
                    "a string",
                    other,
                ))
            }
        }
        let chars: usize = content_texts(message.get("content"))
            .iter()
            .map(|t| t.chars().count())
            .sum();
        prompt_tokens += item_tokens(chars);
    }
    let source = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .or_else(|| messages.last());
    let echo = echo_words(content_texts(source.and_then(|m| m.get("content"))));
    Ok(ChatRequest {
        model,
        prompt_tokens,
        echo,
        max_tokens: max_tokens(&obj, &["max_completion_tokens", "max_tokens"])?,
        stream: optional_bool(&obj, "stream")?,
        include_usage: include_usage(&obj)?,
    })
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: [ChatChoice; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: String,
    refusal: Option<()>,
}

pub fn chat_completion(meta: &Meta, reply: &Reply, usage: Usage) -> Vec<u8> {
    to_json(&ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices: [ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: reply.content(),
                refusal: None,
            },
            logprobs: None,
            finish_reason: reply.finish_reason,
        }],
        usage,
    })
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice<'a>>,
    /// Absent without `include_usage`; `null` on content chunks and the usage object on the
    /// final one with it, as OpenAI does.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Delta<'a> {
    Role {
        role: &'static str,
        content: &'static str,
        refusal: Option<()>,
    },
    Content {
        content: &'a str,
    },
    Empty {},
}

/// The SSE events of a streamed chat completion, `data: [DONE]` included.
pub fn chat_stream(meta: &Meta, reply: &Reply, usage: Usage, include_usage: bool) -> Vec<Vec<u8>> {
    fn chat_chunk<'a>(
        meta: &Meta<'a>,
        include_usage: bool,
        delta: Delta<'a>,
        finish_reason: Option<&'static str>,
    ) -> ChatChunk<'a> {
        ChatChunk {
            id: meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: meta.model,
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: include_usage.then_some(None),
        }
    }
    let chunk = |delta, finish_reason| chat_chunk(meta, include_usage, delta, finish_reason);
    let mut events = Vec::with_capacity(reply.tokens.len() + 4);
    let role = Delta::Role {
        role: "assistant",
        content: "",
        refusal: None,
    };
    events.push(to_json(&chunk(role, None)));
    for token in &reply.tokens {
        events.push(to_json(&chunk(Delta::Content { content: token }, None)));
    }
    events.push(to_json(&chunk(Delta::Empty {}, Some(reply.finish_reason))));
    if include_usage {
        events.push(to_json(&ChatChunk {
            choices: Vec::new(),
            usage: Some(Some(usage)),
            ..chunk(Delta::Empty {}, None)
        }));
    }
    finish_events(events)
}

fn finish_events(json: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    json.iter()
        .map(|j| sse_event(j))
        .chain(std::iter::once(SSE_DONE.to_vec()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Legacy completions

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt_tokens: u64,
    /// One entry per prompt; each prompt gets its own choice.
    pub echoes: Vec<Vec<String>>,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let obj = parse_object(body)?;
    let model = required_string(&obj, "model")?;
    let items = text_items(&obj, "prompt")?;
    Ok(CompletionRequest {
        model,
        prompt_tokens: items.iter().map(TextItem::prompt_tokens).sum(),
        echoes: items.iter().map(TextItem::echo_words).collect(),
        max_tokens: max_tokens(&obj, &["max_tokens"])?,
        stream: optional_bool(&obj, "stream")?,
        include_usage: include_usage(&obj)?,
    })
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<TextChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: std::borrow::Cow<'a, str>,
    index: usize,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

pub fn completion(meta: &Meta, replies: &[Reply], usage: Usage) -> Vec<u8> {
    to_json(&TextCompletion {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices: replies
            .iter()
            .enumerate()
            .map(|(index, r)| TextChoice {
                text: r.content().into(),
                index,
                logprobs: None,
                finish_reason: Some(r.finish_reason),
            })
            .collect(),
        usage: Some(Some(usage)),
    })
}

/// Legacy streaming has no role chunk: word chunks per choice, then a chunk with empty text
/// and the finish reason, then (with `include_usage`) the usage chunk and `[DONE]`.
pub fn completion_stream(
    meta: &Meta,
    replies: &[Reply],
    usage: Usage,
    include_usage: bool,
) -> Vec<Vec<u8>> {
    fn text_chunk<'a>(
        meta: &Meta<'a>,
        include_usage: bool,
        choices: Vec<TextChoice<'a>>,
    ) -> TextCompletion<'a> {
        TextCompletion {
            id: meta.id,
            object: "text_completion",
            created: meta.created,
            model: meta.model,
            system_fingerprint: SYSTEM_FINGERPRINT,
            choices,
            usage: include_usage.then_some(None),
        }
    }
    let chunk = |choices| text_chunk(meta, include_usage, choices);
    let choice = |index, text: &str, finish_reason| TextChoice {
        text: text.to_string().into(),
        index,
        logprobs: None,
        finish_reason,
    };
    let mut events = Vec::new();
    for (index, reply) in replies.iter().enumerate() {
        for token in &reply.tokens {
            events.push(to_json(&chunk(vec![choice(index, token, None)])));
        }
        events.push(to_json(&chunk(vec![choice(
            index,
            "",
            Some(reply.finish_reason),
        )])));
    }
    if include_usage {
        events.push(to_json(&TextCompletion {
            usage: Some(Some(usage)),
            ..chunk(Vec::new())
        }));
    }
    finish_events(events)
}

// ---------------------------------------------------------------------------------------------
// Embeddings

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingRequest {
    pub model: String,
    pub prompt_tokens: u64,
    /// One seed per input; equal inputs give equal vectors.
    pub seeds: Vec<u64>,
    pub base64: bool,
    pub dimensions: usize,
}

pub fn parse_embeddings(body: &[u8]) -> Result<EmbeddingRequest, ApiError> {
    let obj = parse_object(body)?;
    let model = required_string(&obj, "model")?;
    let items = text_items(&obj, "input")?;
    // The official Python and Node SDKs ask for base64 unless told otherwise.
    let base64 = match field(&obj, "encoding_format") {
        None => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(other) => {
            return Err(ApiError::invalid_request(format!(
                "Invalid value for 'encoding_format': expected 'float' or 'base64', got {other}."
            ))
            .with_param("encoding_format"))
        }
    };
    let dimensions = match field(&obj, "dimensions") {
        None => DEFAULT_EMBEDDING_DIMENSIONS,
        Some(v) => match v.as_u64().and_then(|d| usize::try_from(d).ok()) {
            Some(d) if (1..=MAX_EMBEDDING_DIMENSIONS).contains(&d) => d,
            _ => {
                return Err(ApiError::invalid_request(format!(
                    "Invalid 'dimensions': expected an integer between 1 and {MAX_EMBEDDING_DIMENSIONS}."
                ))
                .with_param("dimensions"))
            }
        },
    };
    Ok(EmbeddingRequest {
        model,
        prompt_tokens: items.iter().map(TextItem::prompt_tokens).sum(),
        seeds: items.iter().map(TextItem::seed).collect(),
        base64,
        dimensions,
    })
}

/// Unit-length vector from `seed`, like real embeddings (cosine similarity = dot product).
pub fn embedding_vector(seed: u64, dimensions: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dimensions as u64)
        .map(|i| {
            let bits = mix(seed ^ mix(i + 1)) >> 40;
            (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// Standard alphabet with padding: what the SDKs decode for `encoding_format: base64`.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let byte = |i: usize| u32::from(group.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for k in 0..4 {
            if k <= group.len() {
                let idx = ((n >> (18 - 6 * k)) & 63) as usize;
                out.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'A')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: EmbeddingData,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// `model` is the one from the request, like every other echoed model.
pub fn embeddings(req: &EmbeddingRequest) -> Vec<u8> {
    let data = req
        .seeds
        .iter()
        .enumerate()
        .map(|(index, &seed)| {
            let v = embedding_vector(seed, req.dimensions);
            let embedding = if req.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingData::Base64(base64(&bytes))
            } else {
                EmbeddingData::Float(v)
            };
            EmbeddingItem {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    to_json(&EmbeddingList {
        object: "list",
        data,
        model: &req.model,
        usage: EmbeddingUsage {
            prompt_tokens: req.prompt_tokens,
            total_tokens: req.prompt_tokens,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Models

#[derive(Serialize)]
struct Model<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<Model<'a>>,
}

fn model_object<'a>(id: &'a str, owner: &'a str) -> Model<'a> {
    Model {
        id,
        object: "model",
        created: MODEL_CREATED,
        owned_by: owner,
    }
}

pub fn model_list(models: &[String], owner: &str) -> Vec<u8> {
    to_json(&ModelList {
        object: "list",
        data: models.iter().map(|m| model_object(m, owner)).collect(),
    })
}

pub fn model(id: &str, owner: &str) -> Vec<u8> {
    to_json(&model_object(id, owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_events(events: &[Vec<u8>]) -> Vec<Value> {
        let (last, rest) = events.split_last().unwrap();
        assert_eq!(last, SSE_DONE);
        rest.iter()
            .map(|e| {
                let text = std::str::from_utf8(e).unwrap();
                let json = text
                    .strip_prefix("data: ")
                    .unwrap()
                    .strip_suffix("\n\n")
                    .unwrap();
                assert!(!json.contains('\n'), "one line per event");
                serde_json::from_str(json).unwrap()
            })
            .collect()
    }

    const META: Meta<'static> = Meta {
        id: "chatcmpl-x",
        created: 1_234,
        model: "gpt-4o-mini",
    };

    fn chat_body() -> Vec<u8> {
        to_json(&json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hello   there,\nfriend"},
                {"role": "assistant", "content": null},
                {"role": "user", "content": [
                    {"type": "text", "text": "Say"},
                    {"type": "image_url", "image_url": {"url": "http://x"}},
                    {"type": "text", "text": "hi ünï"}
                ]}
            ]
        }))
    }

    #[test]
    fn chat_usage_follows_documented_formula() {
        let req = parse_chat(&chat_body()).unwrap();
        // 16 chars -> 4+4; 21 chars -> 4+6; null -> 4+0; "Say"+"hi ünï" = 3+6 chars -> 4+3.
        assert_eq!(req.prompt_tokens, 8 + 10 + 4 + 7);
        assert_eq!(req.echo, ["Say", "hi", "ünï"]);
        assert_eq!(req.model, "gpt-4o-mini");
        assert!(!req.stream);
        assert_eq!(req.max_tokens, None);
    }

    #[test]
    fn reply_is_deterministic_and_truncates() {
        let echo = vec!["Say".to_string(), "hi".to_string()];
        let reply = Reply::new("alpha", &echo, None);
        assert_eq!(reply.content(), "Mock reply from alpha: Say hi");
        assert_eq!(
            reply.tokens,
            ["Mock ", "reply ", "from ", "alpha: ", "Say ", "hi"]
        );
        assert_eq!(reply.completion_tokens(), 6);
        assert_eq!(reply.finish_reason, "stop");
        assert_eq!(Reply::new("alpha", &echo, Some(6)), reply);

        let cut = Reply::new("alpha", &echo, Some(3));
        assert_eq!(cut.content(), "Mock reply from");
        assert_eq!(cut.completion_tokens(), 3);
        assert_eq!(cut.finish_reason, "length");

        let long: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
        assert_eq!(Reply::new("m", &long, None).completion_tokens(), 4 + 16);
    }

    #[test]
    fn chat_max_tokens_fields() {
        let body = |extra: Value| {
            let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            to_json(&v)
        };
        let req = parse_chat(&body(json!({"max_tokens": 5, "max_completion_tokens": 2}))).unwrap();
        assert_eq!(req.max_tokens, Some(2));
        let req = parse_chat(&body(json!({"max_tokens": 5}))).unwrap();
        assert_eq!(req.max_tokens, Some(5));
        let err = parse_chat(&body(json!({"max_tokens": 0}))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        let err = parse_chat(&body(json!({"max_tokens": "5"}))).unwrap_err();
        assert_eq!(err.code, Some("invalid_type"));
        let req = parse_chat(&body(
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .unwrap();
        assert!(req.stream && req.include_usage);
    }

    #[test]
    fn chat_validation_errors_name_the_field() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"not json", None),
            (b"[1]", None),
            (br#"{"messages": []}"#, Some("model")),
            (br#"{"model": 3, "messages": []}"#, Some("model")),
            (br#"{"model": "m"}"#, Some("messages")),
            (br#"{"model": "m", "messages": {}}"#, Some("messages")),
            (br#"{"model": "m", "messages": []}"#, Some("messages")),
            (
                br#"{"model": "m", "messages": ["hi"]}"#,
                Some("messages[0]"),
            ),
            (
                br#"{"model": "m", "messages": [{"content": "x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                br#"{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}"#,
                Some("stream"),
            ),
        ];
        for (body, param) in cases {
            let err = parse_chat(body).unwrap_err();
            assert_eq!(err.status, 400);
            assert_eq!(err.kind, "invalid_request_error");
            assert_eq!(
                err.param.as_deref(),
                *param,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn non_streaming_chat_completion_shape() {
        let reply = Reply::new("mock", &["hi".to_string()], None);
        let body: Value =
            serde_json::from_slice(&chat_completion(&META, &reply, Usage::new(10, 5))).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "chatcmpl-x",
                "object": "chat.completion",
                "created": 1234,
                "model": "gpt-4o-mini",
                "system_fingerprint": "fp_mock",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Mock reply from mock: hi", "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": {
                    "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                    "prompt_tokens_details": {"cached_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0}
                }
            })
        );
    }

    #[test]
    fn chat_stream_without_usage() {
        let reply = Reply::new("mock", &["a".to_string(), "b".to_string()], None);
        let chunks = parse_events(&chat_stream(&META, &reply, Usage::new(9, 6), false));
        assert_eq!(chunks.len(), 1 + reply.tokens.len() + 1);
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], "chatcmpl-x");
            assert_eq!(c["created"], 1234);
            assert_eq!(c["model"], "gpt-4o-mini");
            assert_eq!(c["system_fingerprint"], "fp_mock");
            assert!(c.get("usage").is_none());
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": "", "refusal": null})
        );
        let content: String = chunks[1..chunks.len() - 1]
            .iter()
            .map(|c| {
                assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(content, reply.content());
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn chat_stream_with_usage() {
        let reply = Reply::new("mock", &["a".to_string()], Some(2));
        let usage = Usage::new(9, reply.completion_tokens());
        let chunks = parse_events(&chat_stream(&META, &reply, usage, true));
        assert_eq!(chunks.len(), 1 + 2 + 1 + 1);
        let (usage_chunk, rest) = chunks.split_last().unwrap();
        for c in rest {
            assert_eq!(c["usage"], Value::Null);
            assert!(c.get("usage").is_some());
            assert_eq!(c["choices"].as_array().unwrap().len(), 1);
        }
        assert_eq!(
            rest.last().unwrap()["choices"][0]["finish_reason"],
            "length"
        );
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"], serde_json::to_value(usage).unwrap());
        assert_eq!(usage_chunk["usage"]["total_tokens"], 11);
        assert_eq!(usage_chunk["id"], "chatcmpl-x");
    }

    #[test]
    fn legacy_completion_prompts_and_stream() {
        let req = parse_completion(br#"{"model":"m","prompt":["one two","three"],"max_tokens":5}"#)
            .unwrap();
        assert_eq!(req.prompt_tokens, (4 + 2) + (4 + 2));
        assert_eq!(req.echoes, [vec!["one", "two"], vec!["three"]]);
        let req = parse_completion(br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(req.prompt_tokens, 4 + 3);
        let req = parse_completion(br#"{"model":"m","prompt":[[1,2],[3]]}"#).unwrap();
        assert_eq!(req.prompt_tokens, 6 + 5);
        for bad in [
            &br#"{"model":"m"}"#[..],
            br#"{"model":"m","prompt":[]}"#,
            br#"{"model":"m","prompt":[1,"a"]}"#,
        ] {
            assert_eq!(
                parse_completion(bad).unwrap_err().param.as_deref(),
                Some("prompt")
            );
        }

        let replies = [
            Reply::new("mock", &["x".to_string()], None),
            Reply::new("mock", &[], Some(2)),
        ];
        let usage = Usage::new(3, 7);
        let body: Value = serde_json::from_slice(&completion(&META, &replies, usage)).unwrap();
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"][0]["text"], "Mock reply from mock: x");
        assert_eq!(body["choices"][1]["text"], "Mock reply");
        assert_eq!(body["choices"][1]["finish_reason"], "length");
        assert_eq!(body["usage"]["total_tokens"], 10);

        let chunks = parse_events(&completion_stream(&META, &replies, usage, true));
        let (usage_chunk, rest) = chunks.split_last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 7);
        for (index, reply) in replies.iter().enumerate() {
            let mine: Vec<&Value> = rest
                .iter()
                .filter(|c| c["choices"][0]["index"] == index)
                .collect();
            let text: String = mine
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            assert_eq!(text, reply.content());
            assert_eq!(
                mine.last().unwrap()["choices"][0]["finish_reason"],
                reply.finish_reason
            );
            assert!(mine.iter().all(|c| c["usage"].is_null()));
        }
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let req = parse_embeddings(
            br#"{"model":"text-embedding-3-small","input":["hello","hello","bye"]}"#,
        )
        .unwrap();
        assert_eq!(req.prompt_tokens, (4 + 2) + (4 + 2) + (4 + 1));
        let body: Value = serde_json::from_slice(&embeddings(&req)).unwrap();
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "text-embedding-3-small");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 17, "total_tokens": 17})
        );
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data[2]["index"], 2);
        assert_eq!(data[2]["object"], "embedding");
        assert_eq!(data[0]["embedding"], data[1]["embedding"]);
        assert_ne!(data[0]["embedding"], data[2]["embedding"]);
        let v: Vec<f64> = data[0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), 8);
        let norm: f64 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }

    fn decode_base64(s: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.bytes().filter(|&c| c != b'=') {
            bits = (bits << 6) | ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }

    #[test]
    fn base64_embeddings_decode_to_the_float_vector() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");

        let req = parse_embeddings(
            br#"{"model":"e","input":"hi","encoding_format":"base64","dimensions":3}"#,
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&embeddings(&req)).unwrap();
        let bytes = decode_base64(body["data"][0]["embedding"].as_str().unwrap());
        let floats: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, embedding_vector(req.seeds[0], 3));

        for bad in [
            &br#"{"model":"e"}"#[..],
            br#"{"model":"e","input":5}"#,
            br#"{"model":"e","input":"x","encoding_format":"hex"}"#,
            br#"{"model":"e","input":"x","dimensions":0}"#,
        ] {
            assert_eq!(parse_embeddings(bad).unwrap_err().status, 400);
        }
    }

    #[test]
    fn error_bodies_per_status() {
        let expect = [
            (400, "invalid_request_error", None),
            (401, "invalid_request_error", Some("invalid_api_key")),
            (403, "invalid_request_error", Some("permission_denied")),
            (404, "invalid_request_error", Some("model_not_found")),
            (409, "invalid_request_error", None),
            (429, "requests", Some("rate_limit_exceeded")),
            (500, "server_error", None),
            (502, "server_error", Some("service_unavailable")),
            (503, "server_error", Some("service_unavailable")),
            (504, "server_error", None),
        ];
        for (status, kind, code) in expect {
            let err = ApiError::injected(status, Some("gpt-x"));
            assert_eq!(err.status, status);
            let body: Value = serde_json::from_slice(&err.body()).unwrap();
            let obj = body["error"].as_object().unwrap();
            assert_eq!(obj.len(), 4);
            assert_eq!(obj["type"], kind, "{status}");
            assert_eq!(
                obj["code"],
                code.map_or(Value::Null, Value::from),
                "{status}"
            );
            assert_eq!(obj["param"], Value::Null);
            assert!(obj["message"].as_str().unwrap().len() > 10);
        }
        let body = ApiError::injected(404, Some("gpt-x")).body();
        assert!(String::from_utf8(body).unwrap().contains("`gpt-x`"));
    }

    #[test]
    fn api_key_is_masked() {
        assert_eq!(mask_key("sk-abcdefghijxyz"), "sk-ab***xyz");
        assert_eq!(mask_key("short-key"), "***");
        let err = ApiError::invalid_api_key(Some("Bearer sk-abcdefghijxyz"));
        let body = String::from_utf8(err.body()).unwrap();
        assert!(body.contains("sk-ab***xyz"));
        assert!(!body.contains("sk-abcdefghijxyz"));
        assert!(body.contains(r#""code":"invalid_api_key""#));
        assert_eq!(err.status, 401);
        assert!(ApiError::invalid_api_key(None)
            .message
            .contains("didn't provide"));
    }

    #[test]
    fn models_list_shape() {
        let body: Value =
            serde_json::from_slice(&model_list(&["a".into(), "b".into()], "prov")).unwrap();
        assert_eq!(
            body,
            json!({"object": "list", "data": [
                {"id": "a", "object": "model", "created": 1_700_000_000, "owned_by": "prov"},
                {"id": "b", "object": "model", "created": 1_700_000_000, "owned_by": "prov"}
            ]})
        );
    }
}

//! The endpoint table: which provider endpoints a client may reach, with which methods, and how
//! Tollgate handles each. Deny by default: a request whose method and path match no endpoint
//! granted to its client never reaches a provider (404 in OpenAI's shape).
//!
//! Paths are matched exactly, segment by segment, against fixed templates, after Envoy has
//! normalised them (`normalize_path`, `merge_slashes`, escaped slashes rejected: see
//! docs/edge.md). A template segment `*` stands for one id (`file-abc123`, `gpt-4.1`): letters,
//! digits and `._:-`, never `.` or `..` alone. Anything else (percent escapes, `;` parameters,
//! upper case, a trailing slash) matches nothing.

/// Which provider API an endpoint belongs to: it decides how the client's key is read, how the
/// provider's key is sent, the shape of Tollgate's own errors and budget headers, and how usage
/// is read from the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Api {
    /// OpenAI's API (and the many providers compatible with it).
    #[default]
    OpenAi,
    /// Anthropic's Messages API (Anthropic itself, and relays that offer it).
    Anthropic,
}

impl Api {
    /// The configuration's name for it (`providers[].api`).
    pub fn name(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
        }
    }
}

/// How Tollgate handles a request to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An inference call whose JSON body names the `model`: with model routing the body is read
    /// and routed; requests and tokens are counted (tokens settled from the reported usage).
    Model,
    /// The model list: answered by Tollgate itself with model routing (the client's allowed
    /// models), forwarded in one-provider mode. Counted as a request.
    ModelList,
    /// A token count (`/v1/messages/count_tokens`): routed by its body's `model` like an
    /// inference call and counted as a request, but no tokens are reserved or charged (the
    /// provider reports no usage for it and bills none).
    Count,
    /// An account endpoint (files, batches, ...): forwarded to the one provider or the
    /// `default_provider`, body not read, counted as a request (no tokens: no usage is reported).
    Account,
}

/// One method on one path template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// `GET`, `POST` or `DELETE`.
    pub method: &'static str,
    /// `/v1/files/*/content`: literal segments and `*` ids.
    pub path: &'static str,
}

/// A named endpoint of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The name the configuration grants it by.
    pub name: &'static str,
    /// What it serves.
    pub routes: &'static [Route],
    /// How it is handled.
    pub kind: Kind,
    /// Granted to every client unless the configuration says otherwise (the inference API).
    pub default: bool,
    /// The provider API it belongs to.
    pub api: Api,
}

const fn r(method: &'static str, path: &'static str) -> Route {
    Route { method, path }
}

const fn account(name: &'static str, routes: &'static [Route]) -> Endpoint {
    Endpoint {
        name,
        routes,
        kind: Kind::Account,
        default: false,
        api: Api::OpenAi,
    }
}

/// An inference endpoint of OpenAI's API, granted by default.
const fn openai(name: &'static str, routes: &'static [Route], kind: Kind) -> Endpoint {
    Endpoint {
        name,
        routes,
        kind,
        default: true,
        api: Api::OpenAi,
    }
}

/// Every endpoint Tollgate knows: OpenAI's inference API and Anthropic's Messages API (granted
/// by default), and OpenAI's account API (granted explicitly, per client or for everyone).
pub const CATALOGUE: &[Endpoint] = &[
    openai(
        "chat_completions",
        &[r("POST", "/v1/chat/completions")],
        Kind::Model,
    ),
    openai("completions", &[r("POST", "/v1/completions")], Kind::Model),
    openai("embeddings", &[r("POST", "/v1/embeddings")], Kind::Model),
    openai("responses", &[r("POST", "/v1/responses")], Kind::Model),
    openai(
        "models",
        &[r("GET", "/v1/models"), r("GET", "/v1/models/*")],
        Kind::ModelList,
    ),
    // Anthropic's Messages API, granted by default too: a request reaches a provider only when
    // its model's rule names providers that speak Anthropic's API (else 404), so granting it
    // opens nothing an operator did not configure.
    Endpoint {
        name: "messages",
        routes: &[r("POST", "/v1/messages")],
        kind: Kind::Model,
        default: true,
        api: Api::Anthropic,
    },
    Endpoint {
        name: "messages_count_tokens",
        routes: &[r("POST", "/v1/messages/count_tokens")],
        kind: Kind::Count,
        default: true,
        api: Api::Anthropic,
    },
    account(
        "files",
        &[
            r("GET", "/v1/files"),
            r("POST", "/v1/files"),
            r("GET", "/v1/files/*"),
            r("DELETE", "/v1/files/*"),
            r("GET", "/v1/files/*/content"),
        ],
    ),
    account(
        "uploads",
        &[
            r("POST", "/v1/uploads"),
            r("POST", "/v1/uploads/*/parts"),
            r("POST", "/v1/uploads/*/complete"),
            r("POST", "/v1/uploads/*/cancel"),
        ],
    ),
    account(
        "batches",
        &[
            r("GET", "/v1/batches"),
            r("POST", "/v1/batches"),
            r("GET", "/v1/batches/*"),
            r("POST", "/v1/batches/*/cancel"),
        ],
    ),
    account(
        "fine_tuning",
        &[
            r("GET", "/v1/fine_tuning/jobs"),
            r("POST", "/v1/fine_tuning/jobs"),
            r("GET", "/v1/fine_tuning/jobs/*"),
            r("POST", "/v1/fine_tuning/jobs/*/cancel"),
            r("GET", "/v1/fine_tuning/jobs/*/events"),
            r("GET", "/v1/fine_tuning/jobs/*/checkpoints"),
        ],
    ),
    account(
        "assistants",
        &[
            r("GET", "/v1/assistants"),
            r("POST", "/v1/assistants"),
            r("GET", "/v1/assistants/*"),
            r("POST", "/v1/assistants/*"),
            r("DELETE", "/v1/assistants/*"),
        ],
    ),
    account(
        "threads",
        &[
            r("POST", "/v1/threads"),
            r("POST", "/v1/threads/runs"),
            r("GET", "/v1/threads/*"),
            r("POST", "/v1/threads/*"),
            r("DELETE", "/v1/threads/*"),
            r("GET", "/v1/threads/*/messages"),
            r("POST", "/v1/threads/*/messages"),
            r("GET", "/v1/threads/*/messages/*"),
            r("POST", "/v1/threads/*/messages/*"),
            r("DELETE", "/v1/threads/*/messages/*"),
            r("GET", "/v1/threads/*/runs"),
            r("POST", "/v1/threads/*/runs"),
            r("GET", "/v1/threads/*/runs/*"),
            r("POST", "/v1/threads/*/runs/*"),
            r("POST", "/v1/threads/*/runs/*/cancel"),
            r("POST", "/v1/threads/*/runs/*/submit_tool_outputs"),
            r("GET", "/v1/threads/*/runs/*/steps"),
            r("GET", "/v1/threads/*/runs/*/steps/*"),
        ],
    ),
    account(
        "vector_stores",
        &[
            r("GET", "/v1/vector_stores"),
            r("POST", "/v1/vector_stores"),
            r("GET", "/v1/vector_stores/*"),
            r("POST", "/v1/vector_stores/*"),
            r("DELETE", "/v1/vector_stores/*"),
            r("POST", "/v1/vector_stores/*/search"),
            r("GET", "/v1/vector_stores/*/files"),
            r("POST", "/v1/vector_stores/*/files"),
            r("GET", "/v1/vector_stores/*/files/*"),
            r("DELETE", "/v1/vector_stores/*/files/*"),
            r("POST", "/v1/vector_stores/*/file_batches"),
            r("GET", "/v1/vector_stores/*/file_batches/*"),
            r("POST", "/v1/vector_stores/*/file_batches/*/cancel"),
            r("GET", "/v1/vector_stores/*/file_batches/*/files"),
        ],
    ),
    account(
        "images",
        &[
            r("POST", "/v1/images/generations"),
            r("POST", "/v1/images/edits"),
            r("POST", "/v1/images/variations"),
        ],
    ),
    account(
        "audio",
        &[
            r("POST", "/v1/audio/speech"),
            r("POST", "/v1/audio/transcriptions"),
            r("POST", "/v1/audio/translations"),
        ],
    ),
    account("moderations", &[r("POST", "/v1/moderations")]),
    account(
        "realtime",
        &[
            r("POST", "/v1/realtime/sessions"),
            r("POST", "/v1/realtime/transcription_sessions"),
            r("POST", "/v1/realtime/client_secrets"),
        ],
    ),
    account(
        "stored_completions",
        &[
            r("GET", "/v1/chat/completions"),
            r("GET", "/v1/chat/completions/*"),
            r("POST", "/v1/chat/completions/*"),
            r("DELETE", "/v1/chat/completions/*"),
            r("GET", "/v1/chat/completions/*/messages"),
        ],
    ),
    account(
        "stored_responses",
        &[
            r("GET", "/v1/responses/*"),
            r("DELETE", "/v1/responses/*"),
            r("GET", "/v1/responses/*/input_items"),
            r("POST", "/v1/responses/*/cancel"),
        ],
    ),
];

/// A name that grants every endpoint granted by default (the inference API).
pub const INFERENCE: &str = "inference";

/// Index of an endpoint in [`CATALOGUE`].
pub type EndpointId = usize;

/// A set of catalogue endpoints (a bit per endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointSet(u64);

impl EndpointSet {
    /// The endpoints granted by default.
    pub fn defaults() -> Self {
        let mut set = Self::default();
        for (id, e) in CATALOGUE.iter().enumerate() {
            if e.default {
                set.insert(id);
            }
        }
        set
    }

    /// Adds an endpoint.
    pub fn insert(&mut self, id: EndpointId) {
        if id < 64 {
            self.0 |= 1 << id;
        }
    }

    /// Whether the set holds an endpoint.
    pub fn contains(self, id: EndpointId) -> bool {
        id < 64 && self.0 & (1 << id) != 0
    }

    /// The endpoints in the set, in catalogue order.
    pub fn iter(self) -> impl Iterator<Item = (EndpointId, &'static Endpoint)> {
        CATALOGUE
            .iter()
            .enumerate()
            .filter(move |(id, _)| self.contains(*id))
    }

    /// Whether any endpoint in the set is of this kind.
    pub fn has_kind(self, kind: Kind) -> bool {
        self.iter().any(|(_, e)| e.kind == kind)
    }

    /// Parses a list of names (`inference` stands for the default set). `Err` carries the index
    /// of the unknown name and a message.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, (usize, String)> {
        let mut set = Self::default();
        for (i, name) in names.iter().enumerate() {
            let name = name.as_ref();
            if name == INFERENCE {
                set.0 |= Self::defaults().0;
                continue;
            }
            match CATALOGUE.iter().position(|e| e.name == name) {
                Some(id) => set.insert(id),
                None => {
                    let known: Vec<&str> = CATALOGUE.iter().map(|e| e.name).collect();
                    return Err((
                        i,
                        format!(
                            "unknown endpoint {name:?}; known: {INFERENCE} (the default set), {}",
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(set)
    }

    /// The endpoint of the set that serves `method` on `path` (no query string), if any.
    pub fn find(self, method: &[u8], path: &[u8]) -> Option<&'static Endpoint> {
        self.iter()
            .find(|(_, e)| {
                e.routes
                    .iter()
                    .any(|r| r.method.as_bytes() == method && matches(r.path, path))
            })
            .map(|(_, e)| e)
    }
}

/// The API whose key header and error shape a request gets: that of the catalogue endpoint
/// with this path (whatever the method, and whether or not it is granted); Anthropic's for
/// anything else under `/v1/messages` (its batches, say, which Tollgate does not serve: a
/// Claude client gets a 404 it understands); else OpenAI's.
pub fn api_of_path(path: &[u8]) -> Api {
    if let Some(e) = CATALOGUE
        .iter()
        .find(|e| e.routes.iter().any(|r| matches(r.path, path)))
    {
        return e.api;
    }
    match path.strip_prefix(b"/v1/messages".as_slice()) {
        Some(rest) if rest.is_empty() || rest.starts_with(b"/") => Api::Anthropic,
        _ => Api::OpenAi,
    }
}

/// Longest id segment accepted for a `*`.
pub const MAX_ID_LEN: usize = 256;

/// Whether `path` matches the template exactly (see the module documentation).
pub fn matches(template: &str, path: &[u8]) -> bool {
    let mut want = template.as_bytes().split(|&b| b == b'/');
    let mut got = path.split(|&b| b == b'/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(b"*"), Some(seg)) => {
                if !is_id(seg) {
                    return false;
                }
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

fn is_id(seg: &[u8]) -> bool {
    !seg.is_empty()
        && seg.len() <= MAX_ID_LEN
        && seg != b"."
        && seg != b".."
        && seg
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(set: EndpointSet, method: &str, path: &str) -> Option<&'static str> {
        set.find(method.as_bytes(), path.as_bytes()).map(|e| e.name)
    }

    #[test]
    fn the_default_set_is_the_inference_api() {
        let d = EndpointSet::defaults();
        assert_eq!(
            find(d, "POST", "/v1/chat/completions"),
            Some("chat_completions")
        );
        assert_eq!(find(d, "POST", "/v1/completions"), Some("completions"));
        assert_eq!(find(d, "POST", "/v1/embeddings"), Some("embeddings"));
        assert_eq!(find(d, "POST", "/v1/responses"), Some("responses"));
        assert_eq!(find(d, "GET", "/v1/models"), Some("models"));
        assert_eq!(find(d, "GET", "/v1/models/gpt-4.1"), Some("models"));
        // Account endpoints and other methods are not in it.
        for (m, p) in [
            ("GET", "/v1/files"),
            ("DELETE", "/v1/files/file-abc"),
            ("GET", "/v1/chat/completions"),
            ("GET", "/v1/chat/completions/chatcmpl-1"),
            ("GET", "/v1/responses/resp_1"),
            ("POST", "/v1/batches"),
            ("POST", "/v1/moderations"),
            ("POST", "/v1/images/generations"),
            ("PUT", "/v1/chat/completions"),
            ("DELETE", "/v1/chat/completions"),
            ("OPTIONS", "/v1/chat/completions"),
            ("HEAD", "/v1/models"),
        ] {
            assert_eq!(find(d, m, p), None, "{m} {p}");
        }
    }

    #[test]
    fn anthropics_messages_api_is_in_the_default_set() {
        let d = EndpointSet::defaults();
        assert_eq!(find(d, "POST", "/v1/messages"), Some("messages"));
        assert_eq!(
            find(d, "POST", "/v1/messages/count_tokens"),
            Some("messages_count_tokens")
        );
        for (m, p) in [
            ("GET", "/v1/messages"),
            ("POST", "/v1/messages/"),
            ("POST", "/v1/messages/batches"),
            ("POST", "/v1/Messages"),
            ("POST", "/v1/messages;x"),
            ("POST", "/v1//messages"),
            ("POST", "/v1/messages/count_tokens/"),
            ("POST", "/v1/complete"),
        ] {
            assert_eq!(find(d, m, p), None, "{m} {p}");
        }
        // Only `messages` can be taken away on its own.
        let only_chat = EndpointSet::from_names(&["chat_completions"]).unwrap();
        assert_eq!(find(only_chat, "POST", "/v1/messages"), None);
        assert_eq!(api_of_path(b"/v1/messages"), Api::Anthropic);
        assert_eq!(api_of_path(b"/v1/messages/count_tokens"), Api::Anthropic);
        assert_eq!(api_of_path(b"/v1/messages/"), Api::Anthropic);
        assert_eq!(api_of_path(b"/v1/messages/batches"), Api::Anthropic);
        assert_eq!(api_of_path(b"/v1/messagesx"), Api::OpenAi);
        assert_eq!(api_of_path(b"/v1/Messages"), Api::OpenAi);
        assert_eq!(api_of_path(b"/v1/chat/completions"), Api::OpenAi);
        assert_eq!(api_of_path(b"/nope"), Api::OpenAi);
    }

    #[test]
    fn spellings_other_than_the_exact_path_match_nothing() {
        let d = EndpointSet::defaults();
        for p in [
            "/v1/chat/completions/",
            "//v1/chat/completions",
            "/v1//chat/completions",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/v1/%63hat/completions",
            "/V1/chat/completions",
            "/v1/Chat/Completions",
            "/v1/chat/completions;x=1",
            "/v1/chat/completions%3F",
            "/v1/chat/completions%20",
            "/v1%2Fchat/completions",
            "/v1/chat/completions ",
            "v1/chat/completions",
            "",
            "/",
            "/v1",
            "/v1/models/..",
            "/v1/models/.",
            "/v1/models/a%2Fb",
            "/v1/models/",
        ] {
            assert_eq!(find(d, "POST", p), None, "POST {p:?}");
            assert_eq!(find(d, "GET", p), None, "GET {p:?}");
        }
    }

    #[test]
    fn names_parse_and_unknown_names_are_refused() {
        let s = EndpointSet::from_names(&["inference", "files"]).unwrap();
        assert_eq!(find(s, "DELETE", "/v1/files/file-abc"), Some("files"));
        assert_eq!(
            find(s, "POST", "/v1/chat/completions"),
            Some("chat_completions")
        );
        let only = EndpointSet::from_names(&["embeddings"]).unwrap();
        assert_eq!(find(only, "POST", "/v1/chat/completions"), None);
        assert_eq!(find(only, "POST", "/v1/embeddings"), Some("embeddings"));
        let (i, why) = EndpointSet::from_names(&["files", "filez"]).unwrap_err();
        assert_eq!(i, 1);
        assert!(why.contains("unknown endpoint \"filez\""), "{why}");
        assert!(EndpointSet::defaults().has_kind(Kind::Model));
        assert!(!EndpointSet::defaults().has_kind(Kind::Account));
        assert!(CATALOGUE.len() <= 64);
    }

    #[test]
    fn every_template_is_well_formed() {
        for e in CATALOGUE {
            for r in e.routes {
                assert!(matches!(r.method, "GET" | "POST" | "DELETE"), "{r:?}");
                assert!(
                    r.path.starts_with("/v1/") && !r.path.ends_with('/'),
                    "{r:?}"
                );
                // Two endpoints never serve the same method and template.
                let owners = CATALOGUE.iter().filter(|o| o.routes.contains(r)).count();
                assert_eq!(owners, 1, "{r:?}");
            }
        }
    }
}

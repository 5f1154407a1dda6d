//! The provider listener: from a parsed request to what to send (routing, auth, the rule that
//! applies, the request log). No I/O here; `server` carries out the returned plan (waits,
//! chunks, aborts). Nothing a request carries (header, path, body field) changes how the mock
//! behaves: behaviour comes from the command line and from rules set on the control listener.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::account;
use crate::anthropic;
use crate::config::Config;
use crate::http::{Head, Response};
use crate::ids::IdGen;
use crate::log::{Entry, RequestLog};
use crate::openai::{self, ApiError, Meta, Reply, Usage};
use crate::responses;
use crate::rules::{Behaviour, Rules};

pub struct State {
    pub cfg: Config,
    pub log: RequestLog,
    pub rules: Rules,
    pub ids: IdGen,
    /// Anthropic's prompt cache (see `anthropic`): what `cache_control` blocks were seen.
    pub prompt_cache: anthropic::PromptCache,
}

impl State {
    pub fn new(cfg: Config) -> Self {
        State {
            cfg,
            log: RequestLog::new(crate::log::CAPACITY),
            rules: Rules::new(),
            ids: IdGen::new(),
            prompt_cache: anthropic::PromptCache::default(),
        }
    }
}

pub struct Stream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Complete SSE events; each goes out as one HTTP chunk.
    pub events: Vec<Vec<u8>>,
    pub chunk_delay: Duration,
    /// Send this many events, then drop the connection without the terminating chunk.
    pub abort_after: Option<usize>,
}

pub enum Answer {
    Full(Response),
    Stream(Stream),
}

pub struct Plan {
    /// Wait before the response head goes out.
    pub delay: Duration,
    pub answer: Answer,
}

impl Plan {
    pub fn now(resp: Response) -> Self {
        Plan {
            delay: Duration::ZERO,
            answer: Answer::Full(resp),
        }
    }
}

fn is_v1(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// Records every request that reached the provider listener, whatever its path or method.
/// Also called for requests refused at the HTTP layer (413, bad framing; empty body), so
/// tests see everything a gateway let through.
pub fn record(state: &State, head: &Head, body: &[u8], trailers: Vec<(String, String)>) {
    state.log.record(Entry {
        method: head.method.clone(),
        path: head.target.clone(),
        headers: head.headers.clone(),
        body: String::from_utf8_lossy(body).into_owned(),
        trailers,
    });
}

pub fn json_headers(state: &State) -> Vec<(String, String)> {
    vec![
        ("content-type".into(), "application/json".into()),
        ("x-mock-name".into(), state.cfg.name.clone()),
    ]
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request on the provider listener. Only `/v1` and `/v1/*` exist there; the control API
/// (`/__mock/*`) lives on its own listener and is a 404 here like any unknown path.
pub fn handle(
    state: &State,
    head: &Head,
    body: &[u8],
    trailers: Vec<(String, String)>,
    received: Instant,
) -> Plan {
    record(state, head, body, trailers);
    let path = head.path();
    let method = head.method.as_str();
    if !is_v1(path) {
        let err = ApiError::invalid_url(method, path);
        return Plan::now(Response::new(err.status, json_headers(state), err.body()));
    }
    V1 {
        state,
        head,
        body,
        received,
        request_id: state.ids.request_id(),
        behaviour: state
            .rules
            .behaviour(&state.cfg, method, &head.target, body),
    }
    .handle()
}

/// One `/v1/*` request being answered.
struct V1<'a> {
    state: &'a State,
    head: &'a Head,
    body: &'a [u8],
    received: Instant,
    request_id: String,
    /// From the first matching rule, else the command line.
    behaviour: Behaviour,
}

impl V1<'_> {
    fn handle(&self) -> Plan {
        let delay = self.behaviour.delay;
        let mut answer = self.route();
        let headers = match &mut answer {
            Answer::Full(resp) => &mut resp.headers,
            Answer::Stream(stream) => &mut stream.headers,
        };
        // Time from request received to headers sent, counting the injected wait.
        let ms = (self.received.elapsed() + delay).as_millis();
        headers.push(("openai-processing-ms".into(), ms.to_string()));
        headers.extend(self.behaviour.headers.iter().cloned());
        Plan { delay, answer }
    }

    fn route(&self) -> Answer {
        let path = self.head.path();
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            return self.messages(path);
        }
        let inj = &self.behaviour;
        if let Some(key) = &self.state.cfg.expect_key {
            let auth = self.head.header("authorization");
            if auth.and_then(|a| a.strip_prefix("Bearer ")) != Some(key.as_str()) {
                return Answer::Full(self.error(&ApiError::invalid_api_key(auth)));
            }
        }
        if let Some(body) = &inj.error_body {
            return Answer::Full(Response::new(
                inj.status,
                self.headers(inj.status),
                body.clone().into_bytes(),
            ));
        }
        if inj.status != 200 {
            let model = openai::parse_object(self.body)
                .ok()
                .and_then(|o| o.get("model").and_then(|m| m.as_str()).map(str::to_string));
            return Answer::Full(self.error(&ApiError::injected(inj.status, model.as_deref())));
        }

        let path = self.head.path();
        let method = self.head.method.as_str();
        let (allowed, result) = match (path, method) {
            ("/v1/models", _) => ("GET", (method == "GET").then(|| Ok(self.models()))),
            ("/v1/chat/completions", "POST") => ("POST", Some(self.chat())),
            ("/v1/completions", _) => ("POST", (method == "POST").then(|| self.completions())),
            ("/v1/embeddings", _) => ("POST", (method == "POST").then(|| self.embeddings())),
            ("/v1/responses", "POST") => ("POST", Some(self.responses())),
            _ => match path.strip_prefix("/v1/models/") {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    ("GET", (method == "GET").then(|| self.model(id)))
                }
                _ => return self.account(method, path),
            },
        };
        match result {
            Some(Ok(reply)) => reply,
            Some(Err(err)) => Answer::Full(self.error(&err)),
            None => {
                let mut resp = self.error(&ApiError::invalid_method(method, path));
                resp.headers.push(("allow".into(), allowed.into()));
                Answer::Full(resp)
            }
        }
    }

    /// Headers of every `/v1/*` answer. Success and 429 also carry rate-limit headers the
    /// way OpenAI sends them; the gateway is expected to replace them with its own.
    fn headers(&self, status: u16) -> Vec<(String, String)> {
        let mut h = json_headers(self.state);
        h.push(("x-request-id".into(), self.request_id.clone()));
        h.push(("openai-version".into(), "2020-10-01".into()));
        // OpenAI names the account a key belongs to on every answer; a gateway should not
        // pass these to its clients.
        h.push(("openai-organization".into(), "org-mock".into()));
        h.push(("openai-project".into(), "proj_mock".into()));
        if status == 200 || status == 429 {
            let (remaining, reset) = if status == 429 {
                ("0", "1s")
            } else {
                ("9999", "6ms")
            };
            h.extend(
                [
                    ("x-ratelimit-limit-requests", "10000"),
                    ("x-ratelimit-remaining-requests", remaining),
                    ("x-ratelimit-reset-requests", reset),
                    ("x-ratelimit-limit-tokens", "30000000"),
                    ("x-ratelimit-remaining-tokens", "29999000"),
                    ("x-ratelimit-reset-tokens", "2ms"),
                ]
                .map(|(n, v)| (n.to_string(), v.to_string())),
            );
        }
        if status == 429 {
            h.push(("retry-after".into(), "1".into()));
        }
        h
    }

    fn error(&self, err: &ApiError) -> Response {
        Response::new(err.status, self.headers(err.status), err.body())
    }

    fn ok(&self, body: Vec<u8>) -> Answer {
        Answer::Full(Response::new(200, self.headers(200), body))
    }

    /// Everything under `/v1` that is not inference: see `account`.
    fn account(&self, method: &str, path: &str) -> Answer {
        let rest = path.strip_prefix("/v1/").unwrap_or("");
        match account::answer(method, rest, &self.state.ids, unix_now()) {
            None => Answer::Full(self.error(&ApiError::invalid_url(method, path))),
            Some(account::Outcome::Json(body)) => self.ok(body),
            Some(account::Outcome::Bytes(content_type, body)) => {
                let mut resp = Response::new(200, self.headers(200), body);
                if let Some((_, v)) = resp.headers.iter_mut().find(|(n, _)| n == "content-type") {
                    *v = content_type.into();
                }
                Answer::Full(resp)
            }
            Some(account::Outcome::MethodNotAllowed(allow)) => {
                let mut resp = self.error(&ApiError::invalid_method(method, path));
                resp.headers.push(("allow".into(), allow.into()));
                Answer::Full(resp)
            }
        }
    }

    fn stream(&self, events: Vec<Vec<u8>>) -> Answer {
        let inj = &self.behaviour;
        let mut headers = self.headers(200);
        if let Some((_, v)) = headers.iter_mut().find(|(n, _)| n == "content-type") {
            *v = "text/event-stream; charset=utf-8".into();
        }
        headers.push(("cache-control".into(), "no-cache".into()));
        Answer::Stream(Stream {
            status: 200,
            headers,
            events,
            chunk_delay: inj.chunk_delay,
            abort_after: inj.abort_after,
        })
    }

    /// Anthropic's Messages API: its key header, its errors, its headers.
    fn messages(&self, path: &str) -> Answer {
        let inj = &self.behaviour;
        let method = self.head.method.as_str();
        let fail = |e: anthropic::Error| {
            Answer::Full(Response::new(
                e.status,
                self.anthropic_headers(e.status),
                e.body(&self.request_id),
            ))
        };
        if let Some(key) = &self.state.cfg.expect_key {
            let got = self.head.header("x-api-key");
            if got != Some(key.as_str()) {
                return fail(anthropic::Error::invalid_api_key(got.is_some()));
            }
        }
        if let Some(body) = &inj.error_body {
            return Answer::Full(Response::new(
                inj.status,
                self.anthropic_headers(inj.status),
                body.clone().into_bytes(),
            ));
        }
        if inj.status != 200 {
            return fail(anthropic::Error::injected(inj.status));
        }
        let count_only = match (path, method) {
            ("/v1/messages", "POST") => false,
            ("/v1/messages/count_tokens", "POST") => true,
            _ => return fail(anthropic::Error::not_found(method, path)),
        };
        let req = match anthropic::parse(self.body, count_only, &self.state.prompt_cache) {
            Ok(req) => req,
            Err(e) => return fail(e),
        };
        let ok =
            |body: Vec<u8>| Answer::Full(Response::new(200, self.anthropic_headers(200), body));
        if count_only {
            return ok(anthropic::count(&req));
        }
        let reply = Reply::new(&self.state.cfg.name, &req.echo, Some(req.max_tokens));
        let id = self.state.ids.object_id("msg_");
        if req.stream {
            let mut headers = self.anthropic_headers(200);
            if let Some((_, v)) = headers.iter_mut().find(|(n, _)| n == "content-type") {
                *v = "text/event-stream; charset=utf-8".into();
            }
            headers.push(("cache-control".into(), "no-cache".into()));
            return Answer::Stream(Stream {
                status: 200,
                headers,
                events: anthropic::stream(&id, &req, &reply),
                chunk_delay: inj.chunk_delay,
                abort_after: inj.abort_after,
            });
        }
        ok(anthropic::message(&id, &req, &reply))
    }

    fn anthropic_headers(&self, status: u16) -> Vec<(String, String)> {
        let mut h = json_headers(self.state);
        h.extend(anthropic::headers(status, &self.request_id));
        h
    }

    fn models(&self) -> Answer {
        self.ok(openai::model_list(
            &self.state.cfg.models,
            &self.state.cfg.name,
        ))
    }

    fn model(&self, id: &str) -> Result<Answer, ApiError> {
        if !self.state.cfg.models.iter().any(|m| m == id) {
            return Err(ApiError::model_not_found(id));
        }
        Ok(self.ok(openai::model(id, &self.state.cfg.name)))
    }

    fn chat(&self) -> Result<Answer, ApiError> {
        let req = openai::parse_chat(self.body)?;
        let reply = Reply::new(&self.state.cfg.name, &req.echo, req.max_tokens);
        let mut usage = Usage::new(req.prompt_tokens, reply.completion_tokens());
        if let Some(n) = self.behaviour.cached_tokens {
            usage.prompt_tokens_details.cached_tokens = n.min(usage.prompt_tokens);
        }
        if let Some(n) = self.behaviour.reasoning_tokens {
            usage.completion_tokens_details.reasoning_tokens = n.min(usage.completion_tokens);
        }
        let id = self.state.ids.object_id("chatcmpl-");
        let meta = Meta {
            id: &id,
            created: unix_now(),
            model: &req.model,
        };
        Ok(if req.stream {
            self.stream(openai::chat_stream(&meta, &reply, usage, req.include_usage))
        } else {
            self.ok(openai::chat_completion(&meta, &reply, usage))
        })
    }

    fn completions(&self) -> Result<Answer, ApiError> {
        let req = openai::parse_completion(self.body)?;
        let replies: Vec<Reply> = req
            .echoes
            .iter()
            .map(|echo| Reply::new(&self.state.cfg.name, echo, req.max_tokens))
            .collect();
        let completion_tokens = replies.iter().map(Reply::completion_tokens).sum();
        let usage = Usage::new(req.prompt_tokens, completion_tokens);
        let id = self.state.ids.object_id("cmpl-");
        let meta = Meta {
            id: &id,
            created: unix_now(),
            model: &req.model,
        };
        Ok(if req.stream {
            self.stream(openai::completion_stream(
                &meta,
                &replies,
                usage,
                req.include_usage,
            ))
        } else {
            self.ok(openai::completion(&meta, &replies, usage))
        })
    }

    fn embeddings(&self) -> Result<Answer, ApiError> {
        let req = openai::parse_embeddings(self.body)?;
        Ok(self.ok(openai::embeddings(&req)))
    }

    fn responses(&self) -> Result<Answer, ApiError> {
        let req = responses::parse(self.body)?;
        let reply = Reply::new(&self.state.cfg.name, &req.echo, req.max_output_tokens);
        let response = self.state.ids.object_id("resp_");
        let message = self.state.ids.object_id("msg_");
        let ids = responses::Ids {
            response: &response,
            message: &message,
            created_at: unix_now(),
        };
        Ok(if req.stream {
            self.stream(responses::stream(&req, &ids, &reply))
        } else {
            self.ok(responses::body(&req, &ids, &reply))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_head, Version};
    use serde_json::Value;

    fn state(cfg: Config) -> State {
        State::new(cfg)
    }

    fn head(method: &str, target: &str, headers: &[(&str, &str)]) -> Head {
        Head {
            method: method.into(),
            target: target.into(),
            version: Version::Http11,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn full(plan: Plan) -> Response {
        match plan.answer {
            Answer::Full(r) => r,
            Answer::Stream(_) => panic!("expected a full response"),
        }
    }

    fn call(st: &State, h: &Head, body: &str) -> Response {
        full(handle(st, h, body.as_bytes(), Vec::new(), Instant::now()))
    }

    fn error_json(resp: &Response) -> Value {
        serde_json::from_slice::<Value>(&resp.body).unwrap()["error"].clone()
    }

    const CHAT: &str =
        r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hello world"}]}"#;

    #[test]
    fn chat_success_headers() {
        let st = state(Config::default());
        let resp = call(&st, &head("POST", "/v1/chat/completions", &[]), CHAT);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(resp.header("x-mock-name"), Some("mock"));
        assert!(resp.header("x-request-id").unwrap().starts_with("req_"));
        assert!(resp.header("openai-processing-ms").is_some());
        assert_eq!(
            resp.header("x-ratelimit-remaining-tokens"),
            Some("29999000")
        );
        let body: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["model"], "gpt-4.1");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "Mock reply from mock: hello world"
        );
        // One message of 11 chars: 4 + 3.
        assert_eq!(body["usage"]["prompt_tokens"], 7);
        assert_eq!(body["usage"]["completion_tokens"], 6);
    }

    fn rule(st: &State, json: &str) {
        st.rules
            .add(crate::rules::RuleSpec::parse(json.as_bytes()).unwrap())
            .unwrap();
    }

    #[test]
    fn streaming_plan_carries_sse_headers_and_rule() {
        let st = state(Config::default());
        rule(
            &st,
            r#"{"match":"marker-1","chunk_delay_ms":5,"abort_after":2,"delay_ms":7,
                "headers":[["x-extra","1"]]}"#,
        );
        let body =
            r#"{"model":"m","messages":[{"role":"user","content":"marker-1"}],"stream":true}"#;
        let h = head("POST", "/v1/chat/completions", &[]);
        let plan = handle(&st, &h, body.as_bytes(), Vec::new(), Instant::now());
        assert_eq!(plan.delay, Duration::from_millis(7));
        let Answer::Stream(s) = plan.answer else {
            panic!("expected a stream")
        };
        assert_eq!(s.status, 200);
        assert_eq!(s.chunk_delay, Duration::from_millis(5));
        assert_eq!(s.abort_after, Some(2));
        let ct = s.headers.iter().find(|(n, _)| n == "content-type").unwrap();
        assert_eq!(ct.1, "text/event-stream; charset=utf-8");
        assert!(s
            .headers
            .iter()
            .any(|(n, v)| n == "cache-control" && v == "no-cache"));
        assert!(s.headers.iter().any(|(n, v)| n == "x-extra" && v == "1"));
        assert_eq!(s.events.last().unwrap(), openai::SSE_DONE);
    }

    #[test]
    fn request_headers_and_fields_change_nothing() {
        let st = state(Config::default());
        let h = head(
            "POST",
            "/v1/chat/completions",
            &[
                ("x-mock-status", "500"),
                ("x-mock-delay-ms", "9000"),
                ("x-mock-error-body", "forged"),
                ("x-mock-stream-abort-after", "0"),
            ],
        );
        let body = r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}],
                       "x-mock-status":500,"mock":{"status":500}}"#;
        let plan = handle(&st, &h, body.as_bytes(), Vec::new(), Instant::now());
        assert_eq!(plan.delay, Duration::ZERO);
        let resp = full(plan);
        assert_eq!(resp.status, 200);
        assert_eq!(
            serde_json::from_slice::<Value>(&resp.body).unwrap()["object"],
            "chat.completion"
        );
        // The control API is not on this listener.
        for (method, path) in [
            ("GET", "/__mock/requests"),
            ("DELETE", "/__mock/requests"),
            ("GET", "/__mock/health"),
            ("POST", "/__mock/rules"),
        ] {
            assert_eq!(call(&st, &head(method, path, &[]), "{}").status, 404);
        }
        assert_eq!(st.log.len(), 5);
    }

    #[test]
    fn auth_is_checked_and_logged() {
        let st = state(Config {
            expect_key: Some("sk-good-key-123456".into()),
            ..Config::default()
        });
        let bad = head(
            "GET",
            "/v1/models",
            &[("authorization", "Bearer sk-wrong-key-999999")],
        );
        let resp = call(&st, &bad, "");
        assert_eq!(resp.status, 401);
        let err = error_json(&resp);
        assert_eq!(err["code"], "invalid_api_key");
        assert!(!err["message"]
            .as_str()
            .unwrap()
            .contains("sk-wrong-key-999999"));
        let resp = call(&st, &head("GET", "/v1/models", &[]), "");
        assert_eq!(resp.status, 401);
        let good = head(
            "GET",
            "/v1/models",
            &[("authorization", "Bearer sk-good-key-123456")],
        );
        assert_eq!(call(&st, &good, "").status, 200);
        let log: Value = serde_json::from_slice(&st.log.to_json()).unwrap();
        assert_eq!(log.as_array().unwrap().len(), 3);
    }

    #[test]
    fn injected_errors() {
        let st = state(Config::default());
        rule(&st, r#"{"match":"inject-429","status":429}"#);
        rule(&st, r#"{"match":"inject-404","status":404}"#);
        rule(
            &st,
            r#"{"match":"inject-502","status":502,"error_body":"upstream exploded"}"#,
        );
        let chat = |marker: &str| {
            format!(r#"{{"model":"gpt-4.1","messages":[{{"role":"user","content":"{marker}"}}]}}"#)
        };
        let h = head("POST", "/v1/chat/completions", &[]);
        let resp = call(&st, &h, &chat("inject-429"));
        assert_eq!(resp.status, 429);
        assert_eq!(resp.header("retry-after"), Some("1"));
        assert_eq!(error_json(&resp)["type"], "requests");

        let msg = error_json(&call(&st, &h, &chat("inject-404")))["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("`gpt-4.1`"));

        let resp = call(&st, &h, &chat("inject-502"));
        assert_eq!(resp.status, 502);
        assert_eq!(resp.body, b"upstream exploded");
        assert_eq!(call(&st, &h, &chat("no marker")).status, 200);

        let st = state(Config {
            status: 500,
            ..Config::default()
        });
        assert_eq!(call(&st, &head("GET", "/v1/models", &[]), "").status, 500);
        rule(&st, r#"{"match":"/v1/models","status":200,"times":1}"#);
        assert_eq!(call(&st, &head("GET", "/v1/models", &[]), "").status, 200);
        assert_eq!(call(&st, &head("GET", "/v1/models", &[]), "").status, 500);
    }

    #[test]
    fn unknown_paths_and_methods() {
        let st = state(Config::default());
        let resp = call(&st, &head("POST", "/v1/nope", &[]), "");
        assert_eq!(resp.status, 404);
        assert_eq!(error_json(&resp)["message"], "Invalid URL (POST /v1/nope)");
        let resp = call(&st, &head("GET", "/v1/embeddings", &[]), "");
        assert_eq!(resp.status, 405);
        assert_eq!(resp.header("allow"), Some("POST"));
        assert_eq!(
            call(&st, &head("GET", "/v1/models/gpt-4.1", &[]), "").status,
            200
        );
        let resp = call(&st, &head("GET", "/v1/models/nope", &[]), "");
        assert_eq!(error_json(&resp)["code"], "model_not_found");
        assert_eq!(call(&st, &head("GET", "/other", &[]), "").status, 404);
        let resp = call(&st, &head("DELETE", "/v1/files/file-1", &[]), "");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("openai-organization"), Some("org-mock"));
        let resp = call(&st, &head("PUT", "/v1/chat/completions", &[]), "");
        assert_eq!(resp.header("allow"), Some("GET, POST"));
        let resp = call(&st, &head("GET", "/v1/chat/completions?limit=5", &[]), "");
        assert_eq!(resp.status, 200);
        let resp = call(
            &st,
            &head("POST", "/v1/responses", &[]),
            r#"{"model":"gpt-4.1","input":"hi"}"#,
        );
        assert_eq!(resp.status, 200);
        let body: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["usage"]["total_tokens"], 5 + 5);
        // Every request above is in the log, whatever its path.
        let log: Value = serde_json::from_slice(&st.log.to_json()).unwrap();
        let paths: Vec<&str> = log
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert!(paths.contains(&"/other"));
        assert!(paths.contains(&"/v1/chat/completions?limit=5"));
    }

    #[test]
    fn request_log_entries() {
        let st = state(Config::default());
        let h = parse_head(b"POST /v1/embeddings?x=1 HTTP/1.1\r\nB: 2\r\nA: 1\r\n\r\n").unwrap();
        let resp = call(&st, &h, r#"{"model":"e","input":"hi"}"#);
        assert_eq!(resp.status, 200);
        let log: Value = serde_json::from_slice(&st.log.to_json()).unwrap();
        assert_eq!(
            log,
            serde_json::json!([{
                "method": "POST",
                "path": "/v1/embeddings?x=1",
                "headers": [["b", "2"], ["a", "1"]],
                "body": "{\"model\":\"e\",\"input\":\"hi\"}",
                "trailers": []
            }])
        );
    }
}

//! Runs the real binary and talks to it over TCP, the way Envoy and the e2e tests will.

// clippy.toml allows these inside #[test] functions only; the helpers below are test code too
// and should fail loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

struct Provider {
    child: Child,
    addr: String,
    /// The control listener's address.
    control: String,
}

fn read_addr(out: &mut impl BufRead, prefix: &str) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim_end()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"));
    addr
}

impl Provider {
    fn start(args: &[&str]) -> Provider {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mock-provider"))
            .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start mock-provider");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let addr = read_addr(&mut out, "listening on ");
        let control = read_addr(&mut out, "control on ");
        assert_ne!(addr, control);
        Provider {
            child,
            addr,
            control,
        }
    }

    fn connect(&self) -> BufReader<TcpStream> {
        connect(&self.addr)
    }

    /// One request to the control listener on a fresh connection.
    fn control(&self, method: &str, path: &str, body: &str) -> Resp {
        let mut conn = connect(&self.control);
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nhost: control\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.get_mut().write_all(raw.as_bytes()).unwrap();
        read_response(&mut conn)
    }

    fn log(&self) -> Vec<Value> {
        let resp = self.control("GET", "/__mock/requests", "");
        assert_eq!(resp.status, 200);
        resp.json().as_array().unwrap().clone()
    }
}

fn connect(addr: &str) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    BufReader::new(stream)
}

impl Provider {
    /// One request on a fresh connection.
    fn send(&self, raw: &str) -> Resp {
        let mut conn = self.connect();
        conn.get_mut().write_all(raw.as_bytes()).unwrap();
        read_response(&mut conn)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// For chunked responses, each chunk as received.
    chunks: Vec<Vec<u8>>,
    /// False if the connection ended before the response did.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

fn read_response(r: &mut BufReader<TcpStream>) -> Resp {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.to_string(), v.trim().to_string()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
        chunks: Vec::new(),
        complete: true,
    };
    if resp.header("transfer-encoding") == Some("chunked") {
        resp.complete = false;
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let size = usize::from_str_radix(line.trim_end(), 16).unwrap();
            let mut data = vec![0; size + 2];
            if r.read_exact(&mut data).is_err() {
                break;
            }
            assert!(data.ends_with(b"\r\n"));
            if size == 0 {
                resp.complete = true;
                break;
            }
            data.truncate(size);
            resp.body.extend_from_slice(&data);
            resp.chunks.push(data);
        }
    } else if let Some(len) = resp.header("content-length") {
        resp.body = vec![0; len.parse().unwrap()];
        r.read_exact(&mut resp.body).unwrap();
    }
    resp
}

fn post(path: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello mock world"}]}"#;
const CHAT_STREAM: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello mock world"}],"stream":true,"stream_options":{"include_usage":true}}"#;

#[test]
fn chat_stream_errors_and_request_log() {
    let p = Provider::start(&["--name", "alpha"]);

    let resp = p.send(&post("/v1/chat/completions", "", CHAT));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-mock-name"), Some("alpha"));
    assert_eq!(resp.header("x-ratelimit-limit-requests"), Some("10000"));
    assert!(resp.header("x-request-id").unwrap().starts_with("req_"));
    let body = resp.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, "Mock reply from alpha: Hello mock world");
    // "Be brief." 9 chars -> 4+3; "Hello mock world" 16 chars -> 4+4.
    let usage = json!({
        "prompt_tokens": 15, "completion_tokens": 7, "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0}
    });
    assert_eq!(body["usage"], usage);

    let resp = p.send(&post("/v1/chat/completions", "", CHAT_STREAM));
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    assert_eq!(
        resp.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    let events: Vec<&str> = resp
        .chunks
        .iter()
        .map(|c| {
            let text = std::str::from_utf8(c).unwrap();
            text.strip_prefix("data: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap()
        })
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], usage);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );

    let rule = p.control(
        "POST",
        "/__mock/rules",
        r#"{"match":"Hello mock","status":500,"times":1}"#,
    );
    assert_eq!(rule.status, 201);
    let resp = p.send(&post("/v1/chat/completions", "", CHAT));
    assert_eq!(resp.status, 500);
    assert_eq!(resp.json()["error"]["type"], "server_error");
    let rules = p.control("GET", "/__mock/rules", "").json();
    assert_eq!(
        (rules[0]["hits"].clone(), rules[0]["times"].clone()),
        (json!(1), json!(0))
    );

    let log = p.log();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0]["method"], "POST");
    assert_eq!(log[0]["path"], "/v1/chat/completions");
    assert_eq!(log[0]["body"], CHAT);
    assert_eq!(log[0]["headers"][0], json!(["host", "mock"]));

    assert_eq!(p.control("DELETE", "/__mock/requests", "").status, 204);
    assert_eq!(p.log(), Vec::<Value>::new());
}

#[test]
fn the_provider_listener_has_no_controls() {
    let p = Provider::start(&["--name", "iso", "--expect-key", "sk-test-0123456789"]);
    let auth = "authorization: Bearer sk-test-0123456789\r\n";
    // Every control path is a plain 404 on the provider listener, whatever the method.
    for (method, path) in [
        ("GET", "/__mock/requests"),
        ("DELETE", "/__mock/requests"),
        ("GET", "/__mock/health"),
        ("GET", "/__mock/rules"),
        ("POST", "/__mock/rules"),
        ("DELETE", "/__mock/rules"),
        ("GET", "/v1/__mock/requests"),
    ] {
        let resp = p.send(&format!(
            "{method} {path} HTTP/1.1\r\nhost: mock\r\n{auth}content-length: 2\r\nconnection: close\r\n\r\n{{}}"
        ));
        assert_eq!(resp.status, 404, "{method} {path}");
        assert!(!String::from_utf8_lossy(&resp.body).contains("sk-test"));
    }
    // The old injection headers are ignored.
    let headers = format!(
        "{auth}x-mock-status: 500\r\nx-mock-error-body: forged\r\nx-mock-delay-ms: 60000\r\nx-mock-stream-abort-after: 1\r\nx-mock-chunk-delay-ms: 60000\r\n"
    );
    let resp = p.send(&post("/v1/chat/completions", &headers, CHAT));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["usage"]["total_tokens"], 22);
    let resp = p.send(&post("/v1/chat/completions", &headers, CHAT_STREAM));
    assert!(resp.complete);
    assert!(resp.body.ends_with(b"data: [DONE]\n\n"));
    // ... and so is anything in the body that looks like a control.
    let body = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"x-mock-status":500,"status":500}"#;
    assert_eq!(
        p.send(&post("/v1/chat/completions", auth, body)).status,
        200
    );
    // All of it reached the log, visible only on the control listener.
    assert_eq!(p.log().len(), 7 + 3);
    assert_eq!(
        p.control("GET", "/__mock/health", "").json(),
        json!({"status": "ok"})
    );
}

#[test]
fn without_control_there_is_one_line_and_no_controls() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-provider"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let addr = read_addr(&mut out, "listening on ");
    let mut conn = connect(&addr);
    conn.get_mut()
        .write_all(b"GET /__mock/requests HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut conn).status, 404);
    let _ = child.kill();
    // stdout held exactly one line.
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");
    let _ = child.wait();
}

#[test]
fn responses_and_account_endpoints_reach_the_log() {
    let p = Provider::start(&[]);
    let resp = p.send(&post(
        "/v1/responses",
        "",
        r#"{"model":"gpt-4.1","instructions":"Be brief.","input":"Hello mock world","stream":true}"#,
    ));
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    let last = String::from_utf8(resp.chunks.last().unwrap().clone()).unwrap();
    assert!(last.starts_with("event: response.completed\ndata: "));
    let done: Value =
        serde_json::from_str(last.split_once("data: ").unwrap().1.trim_end()).unwrap();
    assert_eq!(
        done["response"]["usage"],
        json!({"input_tokens": 15, "input_tokens_details": {"cached_tokens": 0},
               "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": 22})
    );
    let calls = [
        ("GET", "/v1/files?purpose=batch"),
        ("DELETE", "/v1/files/file-1"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/assistants"),
        ("POST", "/v1/threads"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/audio/speech"),
        ("POST", "/v1/moderations"),
        ("POST", "/v1/realtime/sessions"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/responses/resp_1"),
    ];
    for (method, path) in calls {
        let resp = p.send(&format!(
            "{method} {path} HTTP/1.1\r\nhost: mock\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        ));
        assert_eq!(resp.status, 200, "{method} {path}");
    }
    let log = p.log();
    assert_eq!(log.len(), 1 + calls.len());
    for (entry, (method, path)) in log[1..].iter().zip(calls) {
        assert_eq!(
            (entry["method"].as_str(), entry["path"].as_str()),
            (Some(method), Some(path))
        );
        assert_eq!(entry["body"], "{}");
    }
}

#[test]
fn keep_alive_chunked_bodies_auth_and_abort() {
    let p = Provider::start(&["--expect-key", "sk-test-0123456789"]);
    let auth = "authorization: Bearer sk-test-0123456789\r\n";

    // Several requests on one connection, the second with a chunked body as Envoy sends it.
    let mut conn = p.connect();
    let get = format!("GET /v1/models HTTP/1.1\r\nhost: mock\r\n{auth}\r\n");
    conn.get_mut().write_all(get.as_bytes()).unwrap();
    let resp = read_response(&mut conn);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["data"][4]["id"], "text-embedding-3-small");

    let (a, b) = CHAT.split_at(20);
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\n{auth}transfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    conn.get_mut().write_all(chunked.as_bytes()).unwrap();
    let resp = read_response(&mut conn);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["usage"]["prompt_tokens"], 15);

    conn.get_mut().write_all(get.as_bytes()).unwrap();
    assert_eq!(read_response(&mut conn).status, 200);

    // A chunked body with trailers (what Envoy forwards of an HTTP/2 request's trailers):
    // the trailers are in the log.
    let with_trailers = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\n{auth}transfer-encoding: chunked\r\n\r\n{:x}\r\n{CHAT}\r\n0\r\nx-smuggled: 1\r\n\r\n",
        CHAT.len()
    );
    conn.get_mut().write_all(with_trailers.as_bytes()).unwrap();
    assert_eq!(read_response(&mut conn).status, 200);
    let log = p.log();
    assert_eq!(
        log.last().unwrap()["trailers"],
        json!([["x-smuggled", "1"]])
    );
    assert_eq!(log[1]["trailers"], json!([]));

    let resp = p.send("GET /v1/models HTTP/1.1\r\nauthorization: Bearer sk-wrong-0123456789\r\nconnection: close\r\n\r\n");
    assert_eq!(resp.status, 401);
    let err = &resp.json()["error"];
    assert_eq!(err["code"], "invalid_api_key");
    assert!(!err["message"]
        .as_str()
        .unwrap()
        .contains("sk-wrong-0123456789"));

    p.control(
        "POST",
        "/__mock/rules",
        r#"{"match":"\"stream\":true","abort_after":2,"chunk_delay_ms":5}"#,
    );
    let resp = p.send(&post("/v1/chat/completions", auth, CHAT_STREAM));
    assert_eq!(resp.status, 200);
    assert!(!resp.complete);
    assert_eq!(resp.chunks.len(), 2);

    let resp = p.send("POST /v1/chat/completions HTTP/1.1\r\ncontent-length: abc\r\n\r\n");
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("connection"), Some("close"));

    // Refused at the HTTP layer, and still in the log.
    let log = p.log();
    assert_eq!(log.last().unwrap()["body"], "");
    assert_eq!(log.last().unwrap()["path"], "/v1/chat/completions");
}

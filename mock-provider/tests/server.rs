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
}

impl Provider {
    fn start(args: &[&str]) -> Provider {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mock-provider"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start mock-provider");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim_end()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"));
        Provider { child, addr }
    }

    fn connect(&self) -> BufReader<TcpStream> {
        let stream = TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        BufReader::new(stream)
    }

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

    let resp = p.send(&post(
        "/v1/chat/completions",
        "x-mock-status: 500\r\n",
        CHAT,
    ));
    assert_eq!(resp.status, 500);
    assert_eq!(resp.json()["error"]["type"], "server_error");

    let resp = p.send("GET /__mock/requests HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n\r\n");
    let log = resp.json();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0]["method"], "POST");
    assert_eq!(log[0]["path"], "/v1/chat/completions");
    assert_eq!(log[0]["body"], CHAT);
    assert_eq!(log[0]["headers"][0], json!(["host", "mock"]));
    assert_eq!(log[2]["headers"][2], json!(["x-mock-status", "500"]));

    let resp =
        p.send("DELETE /__mock/requests HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n\r\n");
    assert_eq!(resp.status, 204);
    let resp = p.send("GET /__mock/requests HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n\r\n");
    assert_eq!(resp.json(), json!([]));
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

    let resp = p.send("GET /v1/models HTTP/1.1\r\nauthorization: Bearer sk-wrong-0123456789\r\nconnection: close\r\n\r\n");
    assert_eq!(resp.status, 401);
    let err = &resp.json()["error"];
    assert_eq!(err["code"], "invalid_api_key");
    assert!(!err["message"]
        .as_str()
        .unwrap()
        .contains("sk-wrong-0123456789"));

    let resp = p.send(&post(
        "/v1/chat/completions",
        &format!("{auth}x-mock-stream-abort-after: 2\r\nx-mock-chunk-delay-ms: 5\r\n"),
        CHAT_STREAM,
    ));
    assert_eq!(resp.status, 200);
    assert!(!resp.complete);
    assert_eq!(resp.chunks.len(), 2);

    let resp = p.send("POST /v1/chat/completions HTTP/1.1\r\ncontent-length: abc\r\n\r\n");
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("connection"), Some("close"));

    let resp = p.send("GET /__mock/health HTTP/1.1\r\nconnection: close\r\n\r\n");
    assert_eq!(resp.json(), json!({"status": "ok"}));
}

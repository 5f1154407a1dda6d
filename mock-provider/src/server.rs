//! One thread per connection: read a request, ask the router (provider listener) or the
//! control API (control listener), carry out the plan, repeat while keep-alive holds. Any I/O
//! error just ends the connection.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::http::{self, BodyKind, Conn, HttpError, Response, Version};
use crate::openai::ApiError;
use crate::router::{self, Answer, State, Stream};

/// Which listener a connection came in on. The two never share a path: the provider listener
/// is what a gateway forwards to, so nothing there reads or changes the mock's controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Provider,
    Control,
}

/// How long to keep draining a refused request's body before closing, so the client reads
/// our 4xx instead of a connection reset.
const LINGER: Duration = Duration::from_secs(2);

pub fn serve(stream: TcpStream, state: Arc<State>, role: Role) {
    // Small SSE chunks must leave immediately, not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let mut conn = Conn::new(stream);
    loop {
        let head = match conn.read_head() {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(err) => return refuse(conn.stream_mut(), &state, &err),
        };
        let received = Instant::now();
        let body = head.framing().and_then(|framing| {
            if head.expects_continue() && framing != http::Framing::Empty {
                conn.stream_mut().write_all(http::CONTINUE)?;
            }
            conn.read_body(framing)
        });
        let body = match body {
            Ok(body) => body,
            Err(err) => {
                // It reached the provider even though its body was refused: log it.
                if role == Role::Provider {
                    router::record(&state, &head, b"", conn.take_trailers());
                }
                return refuse(conn.stream_mut(), &state, &err);
            }
        };
        let close = head.wants_close();
        let plan = match role {
            Role::Provider => router::handle(&state, &head, &body, conn.take_trailers(), received),
            Role::Control => crate::control::handle(&state, &head, &body),
        };
        if !plan.delay.is_zero() {
            thread::sleep(plan.delay);
        }
        let keep_alive = match plan.answer {
            Answer::Full(resp) => write_full(conn.stream_mut(), &resp, close),
            Answer::Stream(s) => write_stream(conn.stream_mut(), s, close, head.version),
        };
        if !matches!(keep_alive, Ok(true)) {
            let _ = conn.stream_mut().shutdown(Shutdown::Both);
            return;
        }
    }
}

fn write_full(stream: &mut TcpStream, resp: &Response, close: bool) -> io::Result<bool> {
    stream.write_all(&http::encode_response(resp, close))?;
    Ok(!close)
}

fn write_stream(
    stream: &mut TcpStream,
    s: Stream,
    close: bool,
    version: Version,
) -> io::Result<bool> {
    // HTTP/1.0 has no chunked encoding: the body then ends when the connection does.
    let chunked = version == Version::Http11;
    let close = close || !chunked;
    let kind = if chunked {
        BodyKind::Chunked
    } else {
        BodyKind::UntilClose
    };
    stream.write_all(&http::encode_head(s.status, &s.headers, kind, close))?;
    for (i, event) in s.events.iter().enumerate() {
        if s.abort_after == Some(i) {
            return Ok(false);
        }
        if i > 0 && !s.chunk_delay.is_zero() {
            thread::sleep(s.chunk_delay);
        }
        if chunked {
            stream.write_all(&http::encode_chunk(event))?;
        } else {
            stream.write_all(event)?;
        }
    }
    // An abort count past the last event still withholds the terminating chunk: the
    // response stays truncated, which is the failure being simulated.
    if s.abort_after.is_some() {
        return Ok(false);
    }
    if chunked {
        stream.write_all(http::LAST_CHUNK)?;
    }
    Ok(!close)
}

/// Answers a request the HTTP layer rejected, then closes.
fn refuse(stream: &mut TcpStream, state: &State, err: &HttpError) {
    let Some(status) = err.status() else {
        return;
    };
    let body = ApiError::new(status, "invalid_request_error", err.message()).body();
    let resp = Response::new(
        status,
        vec![
            ("content-type".into(), "application/json".into()),
            ("x-mock-name".into(), state.cfg.name.clone()),
        ],
        body,
    );
    if stream
        .write_all(&http::encode_response(&resp, true))
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    drain(stream);
}

fn drain(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 16 * 1024];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

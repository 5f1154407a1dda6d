//! Just enough HTTP/1.1 for a test upstream: request heads, `content-length` and chunked
//! bodies, keep-alive and pipelining (leftover bytes stay buffered for the next request), and
//! response encoding. Anything outside that subset is rejected rather than guessed at, so a
//! gateway bug shows up as a clear 400 instead of a silently misread request.

use std::io::{self, Read};

/// Request line plus header fields. Envoy's default limit is 60 KiB, so 64 KiB never rejects
/// anything Envoy would forward.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Longest chunk-size line (size plus extensions) we accept.
const MAX_CHUNK_LINE: usize = 4096;
const READ_SIZE: usize = 16 * 1024;

#[derive(Debug)]
pub enum HttpError {
    /// Not HTTP/1.x as we accept it: answer 400 and close.
    Malformed(&'static str),
    HeadTooLarge,
    BodyTooLarge,
    /// Includes the peer closing mid-request; nothing useful can be answered.
    Io(io::Error),
}

impl HttpError {
    /// Status worth sending back before closing, if the connection is still usable.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Malformed(_) => Some(400),
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge => Some(413),
            HttpError::Io(_) => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            HttpError::Malformed(why) => format!("Malformed HTTP request: {why}."),
            HttpError::HeadTooLarge => {
                format!("Request header section exceeds {MAX_HEAD_BYTES} bytes.")
            }
            HttpError::BodyTooLarge => format!("Request body exceeds {MAX_BODY_BYTES} bytes."),
            HttpError::Io(e) => format!("I/O error: {e}."),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(usize),
    Chunked,
}

#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    /// Request target as received, query string included.
    pub target: String,
    pub version: Version,
    /// In received order, names lowercased, values with surrounding whitespace trimmed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// First value of a header; `name` must be lowercase.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(p, _)| p)
    }

    fn connection_has(&self, token: &str) -> bool {
        self.header_values("connection")
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the connection must close after this exchange (RFC 9112 §9.3).
    pub fn wants_close(&self) -> bool {
        match self.version {
            Version::Http11 => self.connection_has("close"),
            Version::Http10 => !self.connection_has("keep-alive"),
        }
    }

    pub fn expects_continue(&self) -> bool {
        self.version == Version::Http11
            && self
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }

    /// How the body is delimited. Requests carrying both `transfer-encoding` and
    /// `content-length`, or disagreeing lengths, are refused: those are the classic
    /// request-smuggling shapes and a test upstream should make them loud.
    pub fn framing(&self) -> Result<Framing, HttpError> {
        let has_te = self.header("transfer-encoding").is_some();
        let has_cl = self.header("content-length").is_some();
        if has_te && has_cl {
            return Err(HttpError::Malformed(
                "both transfer-encoding and content-length present",
            ));
        }
        if has_te {
            let mut codings = self
                .header_values("transfer-encoding")
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|c| !c.is_empty());
            return match (codings.next(), codings.next()) {
                (Some(c), None) if c.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
                _ => Err(HttpError::Malformed("unsupported transfer-encoding")),
            };
        }
        let mut length: Option<u64> = None;
        for item in self
            .header_values("content-length")
            .flat_map(|v| v.split(','))
        {
            let n =
                parse_decimal(item.trim()).ok_or(HttpError::Malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::Malformed("conflicting content-length values"));
            }
            length = Some(n);
        }
        match length {
            None | Some(0) => Ok(Framing::Empty),
            Some(n) => match usize::try_from(n) {
                Ok(n) if n <= MAX_BODY_BYTES => Ok(Framing::Length(n)),
                _ => Err(HttpError::BodyTooLarge),
            },
        }
    }
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_hex(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 15 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_token_byte(b))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Offset just past the empty line ending the head, if the buffer holds one. `from` lets
/// repeated calls on a growing buffer skip what was already scanned.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(rel) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + rel;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

pub fn parse_head(raw: &[u8]) -> Result<Head, HttpError> {
    let mut lines = raw.split(|&b| b == b'\n').map(strip_cr);
    let request_line = lines.next().ok_or(HttpError::Malformed("empty request"))?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("bad request line"));
    };
    if !is_token(method) {
        return Err(HttpError::Malformed("bad method"));
    }
    let target_ok =
        target.first() == Some(&b'/') && target.iter().all(|&b| (0x21..0x7f).contains(&b));
    if !target_ok {
        return Err(HttpError::Malformed("bad request target"));
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        _ => return Err(HttpError::Malformed("unsupported HTTP version")),
    };

    let headers = lines
        .take_while(|l| !l.is_empty())
        .map(parse_field)
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Head {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        version,
        headers,
    })
}

/// One header (or trailer) field line: name lowercased, value trimmed.
fn parse_field(line: &[u8]) -> Result<(String, String), HttpError> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(HttpError::Malformed("obsolete header line folding"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HttpError::Malformed("header line without colon"))?;
    let (name, rest) = line.split_at(colon);
    if !is_token(name) {
        return Err(HttpError::Malformed("bad header name"));
    }
    let value = rest.get(1..).unwrap_or_default().trim_ascii();
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(HttpError::Malformed("control character in header value"));
    }
    Ok((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// A buffered connection. Bytes past the current request stay in `buf`, which is what makes
/// pipelined requests work.
pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    pos: usize,
    /// Trailer fields of the last chunked body read.
    trailers: Vec<(String, String)>,
}

impl<S> Conn<S> {
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: Vec::with_capacity(READ_SIZE),
            pos: 0,
            trailers: Vec::new(),
        }
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    fn buffered(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Up to `n` buffered bytes.
    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.buffered().len());
        let out = self.buffered().get(..n).unwrap_or_default().to_vec();
        self.pos += out.len();
        out
    }
}

impl<S: Read> Conn<S> {
    /// Reads more bytes into the buffer; 0 means end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; READ_SIZE];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn fill_or_eof(&mut self) -> Result<(), HttpError> {
        if self.fill()? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }

    /// Next request head, or `None` when the peer closed cleanly between requests.
    pub fn read_head(&mut self) -> Result<Option<Head>, HttpError> {
        let mut scanned = 0;
        loop {
            // RFC 9112 §2.2: ignore empty lines before a request line.
            let blank = self
                .buffered()
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if blank > 0 {
                self.pos += blank;
                scanned = 0;
            }
            if let Some(end) = find_head_end(self.buffered(), scanned) {
                if end > MAX_HEAD_BYTES {
                    return Err(HttpError::HeadTooLarge);
                }
                let raw = self.take(end);
                return parse_head(&raw).map(Some);
            }
            let len = self.buffered().len();
            if len > MAX_HEAD_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            // A terminator may straddle the old end: rescan its last few bytes.
            scanned = len.saturating_sub(3);
            if self.fill()? == 0 {
                return if self.buffered().is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                };
            }
        }
    }

    /// The trailer fields of the body read last (empty unless it was chunked with trailers).
    pub fn take_trailers(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.trailers)
    }

    pub fn read_body(&mut self, framing: Framing) -> Result<Vec<u8>, HttpError> {
        self.trailers.clear();
        match framing {
            Framing::Empty => Ok(Vec::new()),
            Framing::Length(n) => {
                while self.buffered().len() < n {
                    self.fill_or_eof()?;
                }
                Ok(self.take(n))
            }
            Framing::Chunked => self.read_chunked(),
        }
    }

    /// One line without its terminator; `limit` bounds the line length.
    fn read_line(&mut self, limit: usize, too_long: HttpError) -> Result<Vec<u8>, HttpError> {
        loop {
            if let Some(nl) = self.buffered().iter().position(|&b| b == b'\n') {
                let line = self.take(nl + 1);
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                return Ok(strip_cr(line).to_vec());
            }
            if self.buffered().len() > limit + 1 {
                return Err(too_long);
            }
            self.fill_or_eof()?;
        }
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(
                MAX_CHUNK_LINE,
                HttpError::Malformed("chunk size line too long"),
            )?;
            let size_field = line
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            let size = std::str::from_utf8(size_field)
                .ok()
                .and_then(parse_hex)
                .ok_or(HttpError::Malformed("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let size = usize::try_from(size).map_err(|_| HttpError::BodyTooLarge)?;
            if body.len().saturating_add(size) > MAX_BODY_BYTES {
                return Err(HttpError::BodyTooLarge);
            }
            let mut remaining = size;
            while remaining > 0 {
                if self.buffered().is_empty() {
                    self.fill_or_eof()?;
                }
                let part = self.take(remaining);
                remaining -= part.len();
                body.extend_from_slice(&part);
            }
            if !self
                .read_line(0, HttpError::Malformed("chunk data longer than its size"))?
                .is_empty()
            {
                return Err(HttpError::Malformed("chunk data longer than its size"));
            }
        }
        // Trailer fields are kept for the request log; they count against the head limit.
        let mut trailer_bytes = 0usize;
        loop {
            let line = self.read_line(MAX_HEAD_BYTES, HttpError::HeadTooLarge)?;
            if line.is_empty() {
                return Ok(body);
            }
            trailer_bytes += line.len();
            if trailer_bytes > MAX_HEAD_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            let field = parse_field(&line)?;
            self.trailers.push(field);
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Self {
        Response {
            status,
            headers,
            body,
        }
    }

    #[cfg(test)]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub enum BodyKind {
    Length(usize),
    Chunked,
    /// HTTP/1.0 streaming: the body ends when the connection closes.
    UntilClose,
}

pub fn encode_head(
    status: u16,
    headers: &[(String, String)],
    body: BodyKind,
    close: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    match body {
        // RFC 9110 §8.6: no content-length on 1xx or 204.
        BodyKind::Length(_) if status < 200 || status == 204 => {}
        BodyKind::Length(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyKind::UntilClose => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The whole response in one buffer, so it leaves in as few segments as possible.
pub fn encode_response(resp: &Response, close: bool) -> Vec<u8> {
    let mut out = encode_head(
        resp.status,
        &resp.headers,
        BodyKind::Length(resp.body.len()),
        close,
    );
    if resp.status != 204 {
        out.extend_from_slice(&resp.body);
    }
    out
}

pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most `step` bytes per read, to exercise requests split across reads.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn conn(data: &[u8], step: usize) -> Conn<Trickle> {
        Conn::new(Trickle {
            data: data.to_vec(),
            pos: 0,
            step,
        })
    }

    fn read_one(c: &mut Conn<Trickle>) -> Result<(Head, Vec<u8>), HttpError> {
        let head = c.read_head()?.expect("a request");
        let framing = head.framing()?;
        let body = c.read_body(framing)?;
        Ok((head, body))
    }

    const POST: &[u8] = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nX-Dup: one\r\nx-dup:  two \r\nContent-Length: 11\r\n\r\n{\"a\":\"bc\"}\n";

    #[test]
    fn parses_content_length_request() {
        let mut c = conn(POST, usize::MAX);
        let (head, body) = read_one(&mut c).unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/v1/chat/completions?x=1");
        assert_eq!(head.path(), "/v1/chat/completions");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(
            head.headers,
            vec![
                ("host".to_string(), "a".to_string()),
                ("content-type".to_string(), "application/json".to_string()),
                ("x-dup".to_string(), "one".to_string()),
                ("x-dup".to_string(), "two".to_string()),
                ("content-length".to_string(), "11".to_string()),
            ]
        );
        assert_eq!(head.header("x-dup"), Some("one"));
        assert_eq!(body, b"{\"a\":\"bc\"}\n");
        assert!(!head.wants_close());
        assert!(c.read_head().unwrap().is_none());
    }

    #[test]
    fn same_result_when_split_into_one_byte_reads() {
        for step in [1, 2, 3, 7] {
            let mut c = conn(POST, step);
            let (head, body) = read_one(&mut c).unwrap();
            assert_eq!(head.header("content-length"), Some("11"));
            assert_eq!(body, b"{\"a\":\"bc\"}\n");
        }
    }

    #[test]
    fn decodes_chunked_body_with_extensions_and_trailers() {
        let raw = b"POST /v1/embeddings HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-trailer: t\r\n\r\n";
        for step in [usize::MAX, 1, 5] {
            let mut c = conn(raw, step);
            let (head, body) = read_one(&mut c).unwrap();
            assert_eq!(head.framing().unwrap(), Framing::Chunked);
            assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
            assert_eq!(
                c.take_trailers(),
                [("x-trailer".to_string(), "t".to_string())]
            );
            assert!(c.read_head().unwrap().is_none());
        }
    }

    #[test]
    fn pipelined_requests_keep_leftover_bytes() {
        let mut raw = POST.to_vec();
        raw.extend_from_slice(
            b"\r\nGET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /x HTTP/1.0\r\n\r\n",
        );
        let mut c = conn(&raw, 4);
        let (first, _) = read_one(&mut c).unwrap();
        assert_eq!(first.method, "POST");
        let (second, body) = read_one(&mut c).unwrap();
        assert_eq!(second.target, "/v1/models");
        assert!(body.is_empty());
        assert!(!second.wants_close());
        let (third, _) = read_one(&mut c).unwrap();
        assert!(third.wants_close());
        assert!(c.read_head().unwrap().is_none());
    }

    #[test]
    fn connection_close_is_honoured() {
        let mut c = conn(
            b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
            100,
        );
        let (head, _) = read_one(&mut c).unwrap();
        assert!(head.wants_close());
    }

    #[test]
    fn accepts_bare_lf_line_endings() {
        let mut c = conn(b"GET /v1/models HTTP/1.1\nHost: x\n\n", 100);
        let (head, _) = read_one(&mut c).unwrap();
        assert_eq!(head.header("host"), Some("x"));
    }

    fn parse_err(raw: &[u8]) -> HttpError {
        let mut c = conn(raw, 3);
        match read_one(&mut c) {
            Ok((head, _)) => panic!("accepted {head:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn rejects_malformed_requests() {
        let cases: &[&[u8]] = &[
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno-colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad name: v\r\n\r\n",
            b"GET / HTTP/1.1\r\na: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\na: b\x01c\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1x\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        ];
        for raw in cases {
            let err = parse_err(raw);
            assert_eq!(
                err.status(),
                Some(400),
                "{:?}: {err:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn truncated_requests_are_io_errors() {
        for raw in [
            &b"GET / HTTP/1.1\r\nhost: x\r\n"[..],
            b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(matches!(parse_err(raw), HttpError::Io(_)));
        }
    }

    #[test]
    fn enforces_size_limits() {
        let mut big_head = b"GET / HTTP/1.1\r\nx: ".to_vec();
        big_head.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        big_head.extend_from_slice(b"\r\n\r\n");
        let mut c = conn(&big_head, READ_SIZE);
        assert!(matches!(c.read_head(), Err(HttpError::HeadTooLarge)));

        let raw = format!(
            "POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert!(matches!(parse_err(raw.as_bytes()), HttpError::BodyTooLarge));

        let raw = format!(
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_BODY_BYTES + 1
        );
        assert!(matches!(parse_err(raw.as_bytes()), HttpError::BodyTooLarge));
    }

    #[test]
    fn expect_continue_only_on_http11() {
        let head = parse_head(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").unwrap();
        assert!(head.expects_continue());
        let head = parse_head(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert!(!head.expects_continue());
    }

    #[test]
    fn encodes_responses() {
        let resp = Response::new(
            200,
            vec![("content-type".into(), "application/json".into())],
            b"{}".to_vec(),
        );
        assert_eq!(
            encode_response(&resp, false),
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        );
        let empty = Response::new(204, vec![], vec![]);
        assert_eq!(
            encode_response(&empty, true),
            b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(encode_chunk(b"data: x\n\n"), b"9\r\ndata: x\n\n\r\n");
    }
}

//! The host interface: everything Tollgate asks of Envoy, as one trait. The filter implements it
//! over the proxy-wasm ABI (`filter/src/host.rs`); the core's tests implement it with a fake that
//! records what was asked and counts the host calls (`crate::fake`). Shared types that the
//! feature modules pass to the host (callouts, header maps, buffers) live here, so that no feature
//! module depends on another for them.

use crate::headers::{Header, HeaderMap};

/// A shared key-value store with compare-and-swap tokens (Envoy shared data).
pub trait CasStore {
    /// Reads a value and its CAS token; `Ok(None)` when the key does not exist.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes a value if the key's CAS token still equals `cas` (0: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}

/// The store failed in a way a retry will not fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreError;

/// Why a conditional write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone else wrote since our read; read again.
    CasMismatch,
    /// The store failed.
    Store,
}

/// A host call failed with this proxy-wasm status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError {
    /// The host call's name, for logs.
    pub call: &'static str,
    /// The raw proxy-wasm status (1 NotFound, 2 BadArgument, 8 CasMismatch, ...).
    pub status: u32,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed with proxy-wasm status {}",
            self.call, self.status
        )
    }
}

/// What a stream callback tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Go on with the stream.
    Continue,
    /// Hold the stream (its data is buffered) until the filter resumes it or answers it.
    Pause,
}

/// Which header map a call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    /// The request headers.
    Request,
    /// The response headers (valid in the response-headers callback).
    Response,
    /// The headers of an HTTP callout's response (valid while its answer is handled).
    CallResponse,
}

/// Which body buffer a call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// The request body buffered so far (all of it while the request is paused).
    Request,
    /// This callback's response body bytes (responses are never paused).
    Response,
    /// An HTTP callout's response body.
    CallResponse,
}

/// An HTTP callout for the host to dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// Envoy cluster.
    pub cluster: String,
    /// Headers, pseudo-headers first.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Timeout (never 0: Envoy reads 0 as no timeout).
    pub timeout_ms: u32,
}

/// Everything Tollgate asks of Envoy. Each method is one host call; none panics, every failure
/// is an `Err` (or, for counters and logs, ignored: a lost increment must not fail a request).
pub trait Host: CasStore {
    /// Wall-clock time in Unix milliseconds.
    fn now_ms(&self) -> Result<u64, HostError>;
    /// Every header of a map, values as raw bytes.
    fn headers(&self, map: Map) -> Result<HeaderMap, HostError>;
    /// One header's first value; `None` when absent.
    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError>;
    /// Replaces a whole header map with these pairs (one call for many edits).
    fn set_headers(&self, map: Map, headers: &[Header]) -> Result<(), HostError>;
    /// Sets a header, replacing every value.
    fn replace_header(&self, map: Map, name: &str, value: &str) -> Result<(), HostError>;
    /// Removes every value of a header.
    fn remove_header(&self, map: Map, name: &[u8]) -> Result<(), HostError>;
    /// Up to `max` bytes of a body buffer (empty when there is none).
    fn body(&self, buffer: Buffer, max: usize) -> Result<Vec<u8>, HostError>;
    /// Replaces the first `size` bytes of a body buffer with `body`.
    fn replace_body(&self, buffer: Buffer, size: usize, body: &[u8]) -> Result<(), HostError>;
    /// Makes Envoy pick the request's route again (after a routing header changed).
    fn clear_route_cache(&self) -> Result<(), HostError>;
    /// Sets a stream property (filter state `wasm.<name>`, read by access logs).
    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError>;
    /// A stream property by its path (`None` when unset): one segment for what a filter set
    /// (the listener role reads what the upstream role recorded), or an Envoy attribute such as
    /// `["connection", "uri_san_peer_certificate"]`.
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;
    /// Sends an HTTP callout; its answer comes back with the returned token.
    fn dispatch(&self, call: &Callout) -> Result<u32, HostError>;
    /// Resumes a paused request.
    fn resume_request(&self) -> Result<(), HostError>;
    /// Answers the request from the filter with these headers and body.
    fn send_reply(
        &self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<(), HostError>;
    /// Resets the request stream (when even a local reply cannot be sent).
    fn reset_request(&self) -> Result<(), HostError>;
    /// Defines (or finds) a counter.
    fn define_counter(&self, name: &str) -> Result<u32, HostError>;
    /// Defines (or finds) a histogram.
    fn define_histogram(&self, name: &str) -> Result<u32, HostError>;
    /// Adds `n` (> 0) to a counter.
    fn increment(&self, id: u32, n: u64);
    /// Records a histogram sample.
    fn record(&self, id: u32, value: u64);
}

/// Answers the request with one of Tollgate's own replies (`content-type: application/json`);
/// if even that fails, resets the stream, so that nothing of the request goes upstream.
pub fn send_local_reply(host: &dyn Host, reply: &crate::openai::LocalReply) {
    let mut headers = Vec::with_capacity(reply.headers.len() + 1);
    headers.push(("content-type", "application/json".to_string()));
    headers.extend(reply.headers.iter().cloned());
    if let Err(e) = host.send_reply(reply.status, &headers, reply.body.as_bytes()) {
        log::error!("cannot send a local reply: {e}; resetting the stream");
        let _ = host.reset_request();
    }
}

//! The only code that calls Envoy. Every host call returns `Result` and maps every status.
//!
//! We declare the proxy-wasm ABI imports ourselves instead of using the SDK's `hostcalls`
//! wrappers: those `panic!` on any status they do not expect, and their map decoder indexes and
//! unwraps; a panic kills the worker's VM and fails every later request on it. Statuses arrive
//! as plain `u32`, so an unknown value cannot be undefined behaviour either. The exception is
//! the HTTP callout (`dispatch`, see there).

use std::ptr::{null, null_mut};
use std::time::Duration;

use tollgate_core::headers::{self, Header, HeaderMap};
use tollgate_core::host::{Buffer, Callout, Host, HostError, Map};
use tollgate_core::host::{CasStore, SetError, StoreError};

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const BUFFER_HTTP_REQUEST_BODY: u32 = 0;
const BUFFER_HTTP_RESPONSE_BODY: u32 = 1;
const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const STREAM_HTTP_REQUEST: u32 = 0;
const METRIC_COUNTER: u32 = 0;
const METRIC_HISTOGRAM: u32 = 2;

fn map_id(map: Map) -> u32 {
    match map {
        Map::Request => MAP_REQUEST_HEADERS,
        Map::Response => MAP_RESPONSE_HEADERS,
        Map::CallResponse => MAP_HTTP_CALL_RESPONSE_HEADERS,
    }
}

fn buffer_id(buffer: Buffer) -> u32 {
    match buffer {
        Buffer::Request => BUFFER_HTTP_REQUEST_BODY,
        Buffer::Response => BUFFER_HTTP_RESPONSE_BODY,
        Buffer::CallResponse => BUFFER_HTTP_CALL_RESPONSE_BODY,
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_set_header_map_pairs(map_type: u32, map_data: *const u8, map_size: usize) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        results_data: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

fn check(call: &'static str, status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError { call, status })
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's `proxy_on_memory_allocate`
/// (a boxed slice: capacity equals length).
///
/// # Safety
/// `data` must be null or a host-returned allocation of exactly `size` bytes.
unsafe fn take_host_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// Log levels of the proxy-wasm ABI.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    /// Debug.
    Debug = 1,
    /// Info.
    Info = 2,
    /// Warn.
    Warn = 3,
    /// Error.
    Error = 4,
    /// Critical.
    Critical = 5,
}

/// Writes a line to Envoy's log (best effort: there is nowhere to report a failed log call).
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length of a live &str.
    unsafe {
        proxy_log(level as u32, message.as_ptr(), message.len());
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> Result<u64, HostError> {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64 through a valid pointer.
    check("proxy_get_current_time_nanoseconds", unsafe {
        proxy_get_current_time_nanoseconds(&mut nanos)
    })?;
    Ok(nanos / 1_000_000)
}

/// Calls the root context's `on_tick` every `period_ms` (0 stops it).
pub fn set_tick_period_ms(period_ms: u32) -> Result<(), HostError> {
    // SAFETY: no pointers.
    check("proxy_set_tick_period_milliseconds", unsafe {
        proxy_set_tick_period_milliseconds(period_ms)
    })
}

/// The plugin configuration, read through windows of Envoy's copy (`proxy_get_buffer_bytes`
/// with an offset): a large `key_set` is then decoded a window at a time, and no VM holds the
/// whole configuration.
pub struct PluginConfiguration {
    /// Its size, as `on_configure` was told.
    pub size: usize,
}

impl tollgate_core::config::Windows for PluginConfiguration {
    fn len(&self) -> usize {
        self.size
    }

    fn read(&mut self, start: usize, max: usize, out: &mut Vec<u8>) -> Result<(), String> {
        let max = max.min(self.size.saturating_sub(start));
        *out = if max == 0 {
            Vec::new()
        } else {
            buffer_window(BUFFER_PLUGIN_CONFIGURATION, start, max).map_err(|e| e.to_string())?
        };
        if out.len() != max {
            return Err(format!(
                "{} bytes at offset {start} where {max} were expected (of {})",
                out.len(),
                self.size
            ));
        }
        Ok(())
    }
}

/// Sets a stream property; Envoy keeps it as filter state `wasm.<name>`, which access logs read
/// with `%FILTER_STATE(wasm.<name>:PLAIN)%`.
pub fn set_property(name: &str, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointers and lengths of live slices.
    check("proxy_set_property", unsafe {
        proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

/// A property of the plugin or the stream, e.g. `["plugin_name"]`; `None` when absent.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    let mut serialized = Vec::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            serialized.push(0);
        }
        serialized.extend_from_slice(part.as_bytes());
    }
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: valid pointers; the returned buffer is taken exactly once.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    match status {
        OK => Ok(Some(unsafe { take_host_buffer(data, size) })),
        NOT_FOUND => Ok(None),
        status => Err(HostError {
            call: "proxy_get_property",
            status,
        }),
    }
}

/// Makes Envoy pick the route again after a routing header changed.
pub fn clear_route_cache() -> Result<(), HostError> {
    let name = "clear_route_cache";
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: valid pointers; any returned buffer is taken exactly once.
    let status = unsafe {
        proxy_call_foreign_function(name.as_ptr(), name.len(), null(), 0, &mut data, &mut size)
    };
    drop(unsafe { take_host_buffer(data, size) });
    check("proxy_call_foreign_function(clear_route_cache)", status)
}

/// Replaces the first `size` bytes of a body buffer with `body`.
pub fn replace_buffer(buffer: Buffer, size: usize, body: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointer and length of a live slice.
    check("proxy_set_buffer_bytes", unsafe {
        proxy_set_buffer_bytes(buffer_id(buffer), 0, size, body.as_ptr(), body.len())
    })
}

/// Up to `max` bytes of a body buffer (empty when there is none).
pub fn buffer(buffer_type: u32, max: usize) -> Result<Vec<u8>, HostError> {
    buffer_window(buffer_type, 0, max)
}

/// Up to `max` bytes of a buffer from offset `start` (which must not be past its end: the host
/// does not check it), empty when there is none.
fn buffer_window(buffer_type: u32, start: usize, max: usize) -> Result<Vec<u8>, HostError> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: out-pointers are valid; the returned buffer is taken exactly once.
    let status = unsafe { proxy_get_buffer_bytes(buffer_type, start, max, &mut data, &mut size) };
    match status {
        OK => Ok(unsafe { take_host_buffer(data, size) }),
        NOT_FOUND => Ok(Vec::new()),
        status => Err(HostError {
            call: "proxy_get_buffer_bytes",
            status,
        }),
    }
}

/// All headers of a map, values as raw bytes: the host's one buffer, checked, which the pairs
/// borrow from (no copy per header).
pub fn headers(map: Map) -> Result<HeaderMap, HostError> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: out-pointers are valid; the returned buffer is taken exactly once.
    check("proxy_get_header_map_pairs", unsafe {
        proxy_get_header_map_pairs(map_id(map), &mut data, &mut size)
    })?;
    let bytes = unsafe { take_host_buffer(data, size) };
    HeaderMap::new(bytes).map_err(|_| HostError {
        call: "proxy_get_header_map_pairs (malformed map)",
        status: 0,
    })
}

/// One header's value (the first, if repeated); `None` when absent.
pub fn header(map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: valid pointers; the returned buffer is taken exactly once.
    let status = unsafe {
        proxy_get_header_map_value(map_id(map), name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match status {
        OK => Ok(Some(unsafe { take_host_buffer(data, size) })),
        NOT_FOUND => Ok(None),
        status => Err(HostError {
            call: "proxy_get_header_map_value",
            status,
        }),
    }
}

/// Sends an HTTP request to an Envoy cluster; the answer arrives in `on_http_call_response`
/// with the returned token.
///
/// The one host call made through the SDK: its dispatcher routes `on_http_call_response` to
/// the calling context only for tokens its own `dispatch_http_call` registered. It maps the
/// statuses Envoy's `proxy_http_call` returns (Ok, BadArgument for an unknown cluster or missing
/// pseudo-headers, InternalFailure) to `Result`.
pub fn dispatch(call: &Callout) -> Result<u32, HostError> {
    let pairs: Vec<(&str, &str)> = call.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    proxy_wasm::hostcalls::dispatch_http_call(
        &call.cluster,
        pairs,
        Some(&call.body),
        Vec::new(),
        Duration::from_millis(u64::from(call.timeout_ms)),
    )
    .map_err(|status| HostError {
        call: "proxy_http_call",
        status: status as u32,
    })
}

/// Resumes a request paused in its headers callback.
pub fn resume_request() -> Result<(), HostError> {
    // SAFETY: no pointers.
    check("proxy_continue_stream", unsafe {
        proxy_continue_stream(STREAM_HTTP_REQUEST)
    })
}

/// Sets a header, replacing every existing value.
pub fn replace_header(map: Map, name: &str, value: &str) -> Result<(), HostError> {
    // SAFETY: pointers and lengths of live slices.
    check("proxy_replace_header_map_value", unsafe {
        proxy_replace_header_map_value(
            map_id(map),
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Replaces a whole header map.
pub fn set_headers(map: Map, pairs: &[Header]) -> Result<(), HostError> {
    let bytes = headers::encode(pairs);
    // SAFETY: pointer and length of a live buffer.
    check("proxy_set_header_map_pairs", unsafe {
        proxy_set_header_map_pairs(map_id(map), bytes.as_ptr(), bytes.len())
    })
}

/// Removes every value of a header.
pub fn remove_header(map: Map, name: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointer and length of a live slice.
    check("proxy_remove_header_map_value", unsafe {
        proxy_remove_header_map_value(map_id(map), name.as_ptr(), name.len())
    })
}

/// Answers the request from the filter with these headers (`content-type` included) and body.
pub fn send_reply(status: u16, headers: &[(&str, String)], body: &[u8]) -> Result<(), HostError> {
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let map = headers::encode(&pairs);
    // SAFETY: pointers and lengths of live buffers.
    check("proxy_send_local_response", unsafe {
        proxy_send_local_response(
            u32::from(status),
            null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

/// Resets the request stream: the last resort when even a local reply cannot be sent.
pub fn reset_request() -> Result<(), HostError> {
    // SAFETY: no pointers.
    check("proxy_close_stream", unsafe {
        proxy_close_stream(STREAM_HTTP_REQUEST)
    })
}

/// Defines (or finds, if another VM defined it) a counter and returns its id.
pub fn define_counter(name: &str) -> Result<u32, HostError> {
    define_metric(METRIC_COUNTER, name)
}

/// Defines (or finds) a histogram and returns its id.
pub fn define_histogram(name: &str) -> Result<u32, HostError> {
    define_metric(METRIC_HISTOGRAM, name)
}

fn define_metric(kind: u32, name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    // SAFETY: pointer and length of a live &str; one u32 out-pointer.
    check("proxy_define_metric", unsafe {
        proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

/// Records a histogram sample (best effort).
pub fn record(id: u32, value: u64) {
    // SAFETY: no pointers.
    unsafe {
        proxy_record_metric(id, value);
    }
}

/// Adds `n` (> 0) to a counter (best effort: a lost increment must not fail a request).
pub fn increment_by(id: u32, n: u64) {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if n > 0 {
        // SAFETY: no pointers.
        unsafe {
            proxy_increment_metric(id, n);
        }
    }
}

/// Envoy shared data: one map per Envoy process and VM id, shared by all workers.
pub struct SharedData;

impl CasStore for SharedData {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let mut data = null_mut();
        let mut size = 0usize;
        let mut cas = 0u32;
        // SAFETY: valid out-pointers; the returned buffer is taken exactly once.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match status {
            OK => Ok(Some((unsafe { take_host_buffer(data, size) }, cas))),
            NOT_FOUND => Ok(None),
            _ => Err(StoreError),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        // SAFETY: pointers and lengths of live slices.
        let status = unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        };
        match status {
            OK => Ok(()),
            CAS_MISMATCH => Err(SetError::CasMismatch),
            _ => Err(SetError::Store),
        }
    }
}

/// Envoy, as the core's [`Host`]: every method is one proxy-wasm host call.
pub struct WasmHost;

impl CasStore for WasmHost {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        SharedData.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        SharedData.set(key, value, cas)
    }
}

impl Host for WasmHost {
    fn now_ms(&self) -> Result<u64, HostError> {
        now_ms()
    }

    fn headers(&self, map: Map) -> Result<HeaderMap, HostError> {
        headers(map)
    }

    fn header(&self, map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        header(map, name)
    }

    fn set_headers(&self, map: Map, headers: &[Header]) -> Result<(), HostError> {
        set_headers(map, headers)
    }

    fn replace_header(&self, map: Map, name: &str, value: &str) -> Result<(), HostError> {
        replace_header(map, name, value)
    }

    fn remove_header(&self, map: Map, name: &[u8]) -> Result<(), HostError> {
        remove_header(map, name)
    }

    fn body(&self, buffer: Buffer, max: usize) -> Result<Vec<u8>, HostError> {
        self::buffer(buffer_id(buffer), max)
    }

    fn replace_body(&self, buffer: Buffer, size: usize, body: &[u8]) -> Result<(), HostError> {
        replace_buffer(buffer, size, body)
    }

    fn clear_route_cache(&self) -> Result<(), HostError> {
        clear_route_cache()
    }

    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        set_property(name, value)
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        property(path)
    }

    fn dispatch(&self, call: &Callout) -> Result<u32, HostError> {
        dispatch(call)
    }

    fn resume_request(&self) -> Result<(), HostError> {
        resume_request()
    }

    fn send_reply(
        &self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<(), HostError> {
        send_reply(status, headers, body)
    }

    fn reset_request(&self) -> Result<(), HostError> {
        reset_request()
    }

    fn define_counter(&self, name: &str) -> Result<u32, HostError> {
        define_counter(name)
    }

    fn define_histogram(&self, name: &str) -> Result<u32, HostError> {
        define_histogram(name)
    }

    fn increment(&self, id: u32, n: u64) {
        increment_by(id, n);
    }

    fn record(&self, id: u32, value: u64) {
        record(id, value);
    }
}

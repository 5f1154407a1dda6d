//! The host-call probe: the empty filter, plus host calls named in its configuration, made on
//! every request, e.g. `headers=20` (read all request headers 20 times) or
//! `shared=1 remove=6 resp_replace=3`. bench/hostcalls.py runs Envoy with a few such plans and
//! prices each call from Envoy's CPU time per request.
//!
//! A bench tool, not product code: it uses the SDK's convenience methods, which panic on a
//! status they do not expect (a panic only fails the measurement, which the bench notices).

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType};

/// One kind of host call, and where it is made.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// `proxy_get_header_map_pairs` on the request headers (what Tollgate reads them with).
    Headers,
    /// `proxy_get_header_map_value` of `authorization`.
    Header,
    /// `proxy_get_current_time_nanoseconds`.
    Now,
    /// `proxy_get_shared_data` then `proxy_set_shared_data` with its CAS (one limiter check).
    Shared,
    /// `proxy_remove_header_map_value` of an absent request header.
    Remove,
    /// `proxy_replace_header_map_value` of a request header.
    Replace,
    /// `proxy_increment_metric`.
    Increment,
    /// `proxy_get_property` of `plugin_root_id`.
    Property,
    /// `proxy_set_property` of a stream property (filter state, as for access logs).
    SetProperty,
    /// `proxy_call_foreign_function("clear_route_cache")`.
    ClearRouteCache,
    /// `proxy_remove_header_map_value` of a response header.
    RespRemove,
    /// `proxy_replace_header_map_value` of a response header.
    RespReplace,
    /// `proxy_get_header_map_value` of the response's `content-type`.
    RespHeader,
    /// `proxy_get_buffer_bytes` of each response body chunk.
    RespBody,
}

/// Where an op runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    RequestHeaders,
    ResponseHeaders,
    ResponseBody,
}

impl Op {
    fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "headers" => Op::Headers,
            "header" => Op::Header,
            "now" => Op::Now,
            "shared" => Op::Shared,
            "remove" => Op::Remove,
            "replace" => Op::Replace,
            "increment" => Op::Increment,
            "property" => Op::Property,
            "set_property" => Op::SetProperty,
            "clear_route_cache" => Op::ClearRouteCache,
            "resp_remove" => Op::RespRemove,
            "resp_replace" => Op::RespReplace,
            "resp_header" => Op::RespHeader,
            "resp_body" => Op::RespBody,
            _ => return None,
        })
    }

    fn phase(self) -> Phase {
        match self {
            Op::RespRemove | Op::RespReplace | Op::RespHeader => Phase::ResponseHeaders,
            Op::RespBody => Phase::ResponseBody,
            _ => Phase::RequestHeaders,
        }
    }
}

const SHARED_KEY: &str = "hostcall-probe";
const NAMES: [&str; 8] = [
    "x-probe-0",
    "x-probe-1",
    "x-probe-2",
    "x-probe-3",
    "x-probe-4",
    "x-probe-5",
    "x-probe-6",
    "x-probe-7",
];

struct Plan {
    ops: Vec<(Op, u32)>,
    metric: u32,
}

#[derive(Default)]
struct Root {
    plan: Option<Rc<Plan>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self
            .get_plugin_configuration()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let mut ops = Vec::new();
        for token in text.split_whitespace() {
            let (name, count) = token.split_once('=').unwrap_or((token, "1"));
            match (Op::parse(name), count.parse::<u32>()) {
                (Some(op), Ok(n)) => ops.push((op, n)),
                _ => {
                    let _ = hostcalls::log(
                        proxy_wasm::types::LogLevel::Error,
                        &format!("hostcall-probe: bad plan entry {token:?}"),
                    );
                    return false;
                }
            }
        }
        let Ok(metric) = hostcalls::define_metric(MetricType::Counter, "hostcall_probe_requests")
        else {
            return false;
        };
        if let Ok((None, _)) = hostcalls::get_shared_data(SHARED_KEY) {
            let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&[0u8; 17]), None);
        }
        self.plan = Some(Rc::new(Plan { ops, metric }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe {
            plan: self.plan.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    plan: Option<Rc<Plan>>,
}

impl Context for Probe {}

impl Probe {
    fn run(&self, phase: Phase, body_size: usize) {
        let Some(plan) = &self.plan else { return };
        for &(op, n) in &plan.ops {
            if op.phase() != phase {
                continue;
            }
            for i in 0..n as usize {
                let name = NAMES[i % NAMES.len()];
                match op {
                    Op::Headers => drop(self.get_http_request_headers_bytes()),
                    Op::Header => drop(self.get_http_request_header_bytes("authorization")),
                    Op::Now => drop(self.get_current_time()),
                    Op::Shared => {
                        if let Ok((Some(mut v), cas)) = hostcalls::get_shared_data(SHARED_KEY) {
                            if let Some(b) = v.get_mut(16) {
                                *b = b.wrapping_add(1);
                            }
                            let _ = hostcalls::set_shared_data(SHARED_KEY, Some(&v), cas);
                        }
                    }
                    Op::Remove => self.set_http_request_header(name, None),
                    Op::Replace => self.set_http_request_header(name, Some("1")),
                    Op::Increment => drop(hostcalls::increment_metric(plan.metric, 1)),
                    Op::Property => drop(self.get_property(vec!["plugin_root_id"])),
                    Op::SetProperty => self.set_property(vec![name], Some(b"demo")),
                    Op::ClearRouteCache => {
                        drop(hostcalls::call_foreign_function("clear_route_cache", None))
                    }
                    Op::RespRemove => self.set_http_response_header(name, None),
                    Op::RespReplace => self.set_http_response_header(name, Some("1")),
                    Op::RespHeader => drop(self.get_http_response_header_bytes("content-type")),
                    Op::RespBody => drop(self.get_http_response_body(0, body_size)),
                }
            }
        }
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.run(Phase::RequestHeaders, 0);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.run(Phase::ResponseHeaders, 0);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if body_size > 0 {
            self.run(Phase::ResponseBody, body_size);
        }
        Action::Continue
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

//! Envoy's callbacks, adapted to the core: the root context loads the configuration into a
//! `Gateway` (listener role) or an `Upstream` (upstream role), and each HTTP context hands every
//! callback to its exchange in the core with the host. Nothing here decides anything.

use std::rc::Rc;

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action as SdkAction, ContextType};

use tollgate_core::attempt::{AttemptExchange, Upstream};
use tollgate_core::exchange::Exchange;
use tollgate_core::gateway::Gateway;
use tollgate_core::host::Action;
use tollgate_core::Config;

use crate::host::{self, WasmHost};

/// Root id of the plugin instances that run as upstream filters of provider clusters.
const UPSTREAM_ROOT_ID: &[u8] = b"tollgate_upstream";

fn sdk(action: Action) -> SdkAction {
    match action {
        Action::Continue => SdkAction::Continue,
        Action::Pause => SdkAction::Pause,
    }
}

/// Envoy's (major, minor) from the attribute `xds.node.user_agent_build_version`, which Envoy
/// fills in with its own build version (8-byte little-endian integers).
fn envoy_version() -> Option<(u64, u64)> {
    let part = |name: &str| {
        host::property(&["xds", "node", "user_agent_build_version", "version", name])
            .ok()
            .flatten()
            .and_then(|b| tollgate_core::envoy::property_int(&b))
    };
    Some((part("major_number")?, part("minor_number")?))
}

/// Which role this plugin instance has.
enum Role {
    /// On the listener: authenticate, limit, route.
    Gateway(Rc<Gateway>),
    /// On a provider cluster: prepare each attempt for that provider.
    Upstream(Rc<Upstream>),
}

/// The plugin's root context: one per plugin instance and VM (each worker, and the main thread).
#[derive(Default)]
pub struct Root {
    role: Option<Role>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(Role::Gateway(gateway)) = &self.role {
            gateway.on_root_callout(&WasmHost, token, num_headers);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        // Read through windows: a `key_set` of megabytes is decoded a window at a time instead
        // of being copied whole into this VM, whose memory never shrinks.
        let mut bytes = host::PluginConfiguration {
            size: plugin_configuration_size,
        };
        let root_id = host::property(&["plugin_root_id"])
            .ok()
            .flatten()
            .unwrap_or_default();
        let upstream = root_id == UPSTREAM_ROOT_ID;
        let env = |name: &str| std::env::var(name).ok();
        // The upstream role never looks a client up: it reads everything but the clients.
        let parsed = if upstream {
            Config::parse_windows_upstream(&mut bytes, &env)
        } else {
            Config::parse_windows(&mut bytes, &env)
        };
        let config = match parsed {
            Ok(c) => c,
            Err(e) => {
                // Envoy then refuses the plugin; this line is what the operator reads.
                error!("invalid plugin configuration: {e}");
                return false;
            }
        };
        let version = envoy_version();
        match tollgate_core::envoy::support_line(version) {
            Some(line) => warn!("{line}"),
            None => {
                if let Some((major, minor)) = version {
                    debug!("running on Envoy {major}.{minor}");
                }
            }
        }
        if upstream {
            return match Upstream::configure(&WasmHost, config) {
                Ok(u) => {
                    info!("configured: upstream filter (provider keys, hosts, model names)");
                    self.role = Some(Role::Upstream(Rc::new(u)));
                    true
                }
                Err(e) => {
                    error!("invalid plugin configuration: {e}");
                    false
                }
            };
        }
        let gateway = match Gateway::configure(&WasmHost, config) {
            Ok(g) => g,
            Err(e) => {
                error!("cannot define metrics: {e}");
                return false;
            }
        };
        if let Err(e) = host::set_tick_period_ms(gateway.tick_period_ms()) {
            error!("cannot start the timer that writes counters and settlements: {e}");
            return false;
        }
        // What the old configuration's requests counted and settled is written now; its
        // requests still in flight write theirs as they end.
        if let Some(Role::Gateway(old)) = &self.role {
            old.flush(&WasmHost);
        }
        self.role = Some(Role::Gateway(Rc::new(gateway)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(Role::Gateway(gateway)) = &self.role {
            gateway.on_tick(&WasmHost);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Some(Role::Upstream(u)) => Some(Box::new(Attempt(AttemptExchange::new(u.clone())))),
            Some(Role::Gateway(g)) => Some(Box::new(Request(Exchange::new(Some(g.clone()))))),
            // Without a configuration every request is refused (never forwarded).
            None => Some(Box::new(Request(Exchange::new(None)))),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request through the listener role.
struct Request(Exchange);

impl Context for Request {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        self.0.on_callout(&WasmHost, token, num_headers);
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> SdkAction {
        sdk(self.0.on_request_headers(&WasmHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> SdkAction {
        sdk(self.0.on_request_body(&WasmHost, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> SdkAction {
        sdk(self.0.on_request_trailers(&WasmHost))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> SdkAction {
        sdk(self.0.on_response_headers(&WasmHost))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> SdkAction {
        sdk(self.0.on_response_body(&WasmHost, body_size, end_of_stream))
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> SdkAction {
        sdk(self.0.on_response_trailers(&WasmHost))
    }

    fn on_log(&mut self) {
        self.0.on_log(&WasmHost);
    }
}

/// One attempt to one provider (the upstream role).
struct Attempt(AttemptExchange);

impl Context for Attempt {}

impl HttpContext for Attempt {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> SdkAction {
        sdk(self.0.on_request_headers(&WasmHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> SdkAction {
        sdk(self.0.on_request_body(&WasmHost, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> SdkAction {
        sdk(self.0.on_request_trailers(&WasmHost))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> SdkAction {
        sdk(self.0.on_response_headers(&WasmHost))
    }
}

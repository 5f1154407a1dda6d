//! Root and HTTP contexts: the request flow, top to bottom.

use std::rc::Rc;

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use tollgate_core::limiter::{self, LimiterError, Window};
use tollgate_core::metrics::{self, Outcome, ANONYMOUS};
use tollgate_core::openai::{self, LocalReply};
use tollgate_core::request::{self, Decision, Forward, PROVIDER_RATE_LIMIT_HEADERS};
use tollgate_core::Config;

use crate::host::{self, HostError, Map, SharedData};

/// A compiled configuration with the metric ids it uses, shared by the VM's HTTP contexts.
struct Plugin {
    config: Config,
    metrics: MetricIds,
}

/// Counter ids, defined once per configuration so the request path never builds a name.
struct MetricIds {
    /// `[client][outcome]` for configured clients.
    requests: Vec<[u32; 4]>,
    /// Requests without a known client: `[outcome]`.
    anonymous: [u32; 4],
    /// `[contention, store]` for the local backend.
    limiter_errors: [u32; 2],
}

impl MetricIds {
    fn define(config: &Config) -> Result<Self, HostError> {
        let per_outcome = |client: &str| -> Result<[u32; 4], HostError> {
            let mut ids = [0u32; 4];
            for (slot, outcome) in ids.iter_mut().zip(Outcome::ALL) {
                *slot = host::define_counter(&metrics::requests_total(client, outcome))?;
            }
            Ok(ids)
        };
        let requests = config
            .clients
            .iter()
            .map(|c| per_outcome(&c.name))
            .collect::<Result<Vec<_>, _>>()?;
        let limiter_errors = [
            host::define_counter(&metrics::limiter_errors_total(
                "local",
                LimiterError::Contention.reason(),
            ))?,
            host::define_counter(&metrics::limiter_errors_total(
                "local",
                LimiterError::Store.reason(),
            ))?,
        ];
        Ok(Self {
            requests,
            anonymous: per_outcome(ANONYMOUS)?,
            limiter_errors,
        })
    }

    fn request(&self, client: Option<usize>, outcome: Outcome) {
        let row = client
            .and_then(|c| self.requests.get(c))
            .unwrap_or(&self.anonymous);
        if let Some(&id) = row.get(outcome.index()) {
            host::increment(id);
        }
    }

    fn limiter_error(&self, e: LimiterError) {
        let id = match e {
            LimiterError::Contention => self.limiter_errors[0],
            LimiterError::Store => self.limiter_errors[1],
        };
        host::increment(id);
    }
}

/// The plugin's root context: one per VM (each worker, and the main thread).
#[derive(Default)]
pub struct Root {
    plugin: Option<Rc<Plugin>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match host::plugin_configuration() {
            Ok(b) => b,
            Err(e) => {
                error!("cannot read the plugin configuration: {e}");
                return false;
            }
        };
        let config = match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(e) => {
                // Envoy then refuses the plugin; this line is what the operator reads.
                error!("invalid plugin configuration: {e}");
                return false;
            }
        };
        let metrics = match MetricIds::define(&config) {
            Ok(m) => m,
            Err(e) => {
                error!("cannot define metrics: {e}");
                return false;
            }
        };
        // Create every client's limit record now, before workers take traffic with this
        // configuration (see `limiter::ensure_record`).
        for client in &config.clients {
            if limiter::ensure_record(&SharedData, &limiter::requests_key(client)).is_err() {
                warn!("cannot create the limit record of client {}", client.name);
            }
        }
        info!(
            "configured: {} clients, limiter {:?}",
            config.clients.len(),
            config.limiter
        );
        self.plugin = Some(Rc::new(Plugin { config, metrics }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            plugin: self.plugin.clone(),
            window: None,
            replied: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP request.
struct Request {
    plugin: Option<Rc<Plugin>>,
    /// The client's window after admission, for the response headers.
    window: Option<Window>,
    /// The filter answered this request itself; leave the response alone.
    replied: bool,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(plugin) = self.plugin.clone() else {
            // on_configure failed, so Envoy should not have created us; refuse rather than
            // forward a request nobody authenticated.
            error!("request without a configuration");
            return self.reply(&openai::internal_error());
        };
        let step = match (host::headers(Map::Request), host::now_ms()) {
            (Ok(headers), Ok(now)) => {
                request::on_request_headers(&plugin.config, &headers, now, &SharedData)
            }
            (Err(e), _) | (_, Err(e)) => {
                error!("cannot read the request: {e}");
                plugin.metrics.request(None, Outcome::Error);
                return self.reply(&openai::internal_error());
            }
        };
        if let Some(e) = step.limiter_error {
            warn!("local limiter failed ({}); request admitted", e.reason());
            plugin.metrics.limiter_error(e);
        }
        if let Some(why) = step.key_error {
            debug!("unauthorized: {why:?}");
        }
        let (action, outcome) = match step.decision {
            Decision::Reply(reply) => (self.reply(&reply), step.outcome),
            Decision::Forward(forward) => match apply(&forward) {
                Ok(()) => {
                    self.window = forward.window;
                    (Action::Continue, step.outcome)
                }
                Err(e) => {
                    // Never forward a request whose client key may still be on it.
                    error!("cannot rewrite request headers: {e}");
                    (self.reply(&openai::internal_error()), Outcome::Error)
                }
            },
        };
        plugin.metrics.request(step.client, outcome);
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.replied {
            return Action::Continue;
        }
        for name in PROVIDER_RATE_LIMIT_HEADERS {
            if let Err(e) = host::remove_header(Map::Response, name.as_bytes()) {
                warn!("cannot remove response header {name}: {e}");
            }
        }
        if let Some(window) = &self.window {
            for (name, value) in request::response_headers(window) {
                if let Err(e) = host::replace_header(Map::Response, name, &value) {
                    warn!("cannot set response header {name}: {e}");
                }
            }
        }
        Action::Continue
    }
}

impl Request {
    /// Sends a local reply; if even that fails, resets the stream so nothing goes upstream.
    fn reply(&mut self, reply: &LocalReply) -> Action {
        self.replied = true;
        if let Err(e) = host::send_json_reply(reply.status, &reply.headers, &reply.body) {
            error!("cannot send a local reply: {e}; resetting the stream");
            let _ = host::reset_request();
        }
        Action::Pause
    }
}

fn apply(forward: &Forward) -> Result<(), HostError> {
    for name in &forward.remove {
        host::remove_header(Map::Request, name)?;
    }
    for (name, value) in &forward.set {
        host::replace_header(Map::Request, name, value)?;
    }
    Ok(())
}

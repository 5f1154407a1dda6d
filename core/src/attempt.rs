//! The upstream role over the [`Host`]: one attempt to one provider (see [`crate::upstream`] for
//! how the attempt's provider is found). An attempt it cannot prepare (no route chosen by
//! Tollgate, a header it cannot set, a body it cannot rename) is refused, never sent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use log::{debug, error};

use crate::body;
use crate::config::Mode;
use crate::gateway::lazy_metric;
use crate::host::{send_local_reply, Action, Buffer, Host, HostError, Map};
use crate::metrics;
use crate::openai;
use crate::routing::{ProviderId, Routing};
use crate::upstream;
use crate::Config;

/// The upstream role's state in one VM: the configuration and its counter ids.
pub struct Upstream {
    config: Config,
    /// `[rule][position]` attempts, and the default route's.
    attempts: Vec<Vec<u32>>,
    default_attempts: Option<u32>,
    /// `[rule][position]` fallbacks into that position (`None` at position 0).
    fallbacks: Vec<Vec<Option<u32>>>,
    /// `tollgate_upstream_errors_total` ids by (provider, status), defined on first use.
    errors: RefCell<HashMap<(ProviderId, u16), u32>>,
}

impl Upstream {
    /// Builds the role and defines its counters; an error names what is wrong.
    pub fn configure(host: &dyn Host, config: Config) -> Result<Self, String> {
        let Mode::Routed(routing) = &config.mode else {
            return Err(
                "runs as an upstream filter but the configuration has no `providers`".into(),
            );
        };
        let counter = |name: String| host.define_counter(&name).map_err(|e| e.to_string());
        let mut attempts = Vec::with_capacity(routing.rules.len());
        let mut fallbacks = Vec::with_capacity(routing.rules.len());
        for rule in &routing.rules {
            let model = rule.pattern.as_str();
            let mut per_position = Vec::new();
            let mut fb = Vec::new();
            for (k, t) in rule.targets.iter().enumerate() {
                let name = provider_name(routing, t.provider);
                per_position.push(counter(metrics::upstream_requests_total(name, model))?);
                fb.push(match k.checked_sub(1).and_then(|j| rule.targets.get(j)) {
                    Some(prev) => Some(counter(metrics::fallbacks_total(
                        model,
                        provider_name(routing, prev.provider),
                        name,
                    ))?),
                    None => None,
                });
            }
            attempts.push(per_position);
            fallbacks.push(fb);
        }
        let default_attempts = match routing.default_provider {
            Some(p) => Some(counter(metrics::upstream_requests_total(
                provider_name(routing, p),
                metrics::DEFAULT_MODEL,
            ))?),
            None => None,
        };
        Ok(Self {
            attempts,
            default_attempts,
            fallbacks,
            errors: RefCell::new(HashMap::new()),
            config,
        })
    }

    fn routing(&self) -> Option<&Routing> {
        match &self.config.mode {
            Mode::Routed(r) => Some(r),
            Mode::Single(_) => None,
        }
    }

    fn record(&self, host: &dyn Host, attempt: &upstream::Attempt) {
        let Some(rule) = attempt.rule else {
            if attempt.provider.is_some() {
                if let Some(id) = self.default_attempts {
                    host.increment(id, 1);
                }
            }
            return;
        };
        if let Some(&id) = self
            .attempts
            .get(rule)
            .and_then(|r| r.get(attempt.position))
        {
            host.increment(id, 1);
        }
        if let Some(Some(id)) = self
            .fallbacks
            .get(rule)
            .and_then(|r| r.get(attempt.position))
        {
            host.increment(*id, 1);
        }
    }

    fn count_error(&self, host: &dyn Host, provider: ProviderId, status: u16) {
        let Some(routing) = self.routing() else {
            return;
        };
        let id = lazy_metric(&self.errors, (provider, status), || {
            host.define_counter(&metrics::upstream_errors_total(
                provider_name(routing, provider),
                status,
            ))
        });
        if let Some(id) = id {
            host.increment(id, 1);
        }
    }
}

fn provider_name(routing: &Routing, id: ProviderId) -> &str {
    routing.providers.get(id).map_or("", |p| p.name.as_str())
}

/// One attempt to one provider.
pub struct AttemptExchange {
    upstream: Rc<Upstream>,
    /// The body's `model` must become this name before the attempt is sent.
    rename: Option<String>,
    /// The provider this attempt goes to.
    provider: Option<ProviderId>,
}

impl AttemptExchange {
    /// A new attempt.
    pub fn new(upstream: Rc<Upstream>) -> Self {
        Self {
            upstream,
            rename: None,
            provider: None,
        }
    }

    /// The attempt's request headers: the provider's key, host, path and headers.
    pub fn on_request_headers(&mut self, h: &dyn Host, end_of_stream: bool) -> Action {
        let Some(routing) = self.upstream.routing() else {
            return refuse(h, "the configuration has no providers");
        };
        let headers = match h.headers(Map::Request) {
            Ok(headers) => headers,
            Err(e) => return refuse(h, &format!("cannot read request headers: {e}")),
        };
        let attempt = upstream::on_attempt_headers(routing, &headers);
        debug!(
            "attempt {} to {}: rule {:?}, rename {:?}",
            attempt.position + 1,
            attempt
                .provider
                .map_or("none", |p| provider_name(routing, p)),
            attempt.rule,
            attempt.rename_model
        );
        if attempt.provider.is_none() {
            // Only a request the listener role decided carries a route to a provider.
            return refuse(h, "the request has no route chosen by Tollgate");
        }
        self.upstream.record(h, &attempt);
        self.provider = attempt.provider;
        let edits: Result<(), HostError> = (|| {
            for name in &attempt.remove {
                h.remove_header(Map::Request, name)?;
            }
            for (name, value) in &attempt.set {
                h.replace_header(Map::Request, name, value)?;
            }
            Ok(())
        })();
        if let Err(e) = edits {
            // Without its key and host the attempt must not leave.
            return refuse(h, &format!("cannot prepare the attempt's headers: {e}"));
        }
        match attempt.rename_model {
            Some(model) if !end_of_stream => {
                self.rename = Some(model);
                Action::Pause
            }
            _ => Action::Continue,
        }
    }

    /// A piece of the attempt's body.
    pub fn on_request_body(
        &mut self,
        h: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if self.rename.is_none() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.rename_model(h, body_size)
    }

    /// Trailers end the body: the rename happens now, or the attempt would leave with the
    /// client's model name.
    pub fn on_request_trailers(&mut self, h: &dyn Host) -> Action {
        if self.rename.is_none() {
            return Action::Continue;
        }
        self.rename_model(h, usize::MAX)
    }

    /// The attempt's response headers: provider errors are counted.
    pub fn on_response_headers(&mut self, h: &dyn Host) -> Action {
        let status = h
            .header(Map::Response, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u16>().ok());
        if let (Some(provider), Some(status)) = (self.provider, status) {
            if status >= 400 {
                self.upstream.count_error(h, provider, status);
            }
        }
        Action::Continue
    }

    /// Renames the body's `model` for this attempt's provider (the body is complete).
    fn rename_model(&mut self, h: &dyn Host, max: usize) -> Action {
        let Some(model) = self.rename.take() else {
            return Action::Continue;
        };
        let body = match h.body(Buffer::Request, max) {
            Ok(b) => b,
            Err(e) => return refuse(h, &format!("cannot read the body to rename: {e}")),
        };
        // The listener role read this body and found `model`; it cannot be missing here.
        let Some(renamed) = body::replace_model(&body, &model) else {
            return refuse(h, "no top-level model to rename");
        };
        let edits = h
            .replace_body(Buffer::Request, body.len(), &renamed)
            .and_then(|()| {
                h.replace_header(Map::Request, "content-length", &renamed.len().to_string())
            });
        match edits {
            Ok(()) => Action::Continue,
            Err(e) => refuse(h, &format!("cannot replace the body: {e}")),
        }
    }
}

/// Refuses an attempt the upstream role cannot prepare: it must not reach a provider without
/// that provider's credentials.
fn refuse(h: &dyn Host, why: &str) -> Action {
    error!("upstream: {why}; refusing the attempt");
    send_local_reply(h, &openai::internal_error());
    Action::Pause
}

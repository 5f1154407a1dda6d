//! The upstream role over the [`Host`]: one attempt to one provider (see [`crate::upstream`] for
//! how the attempt's provider is found). An attempt it cannot prepare (no route chosen by
//! Tollgate, a header it cannot set, a body it cannot rename) is refused, never sent.

use std::rc::Rc;

use log::{debug, error, warn};

use crate::body;
use crate::config::Mode;
use crate::host::{send_local_reply, Action, Buffer, Host, HostError, Map};
use crate::openai;
use crate::routing::Routing;
use crate::upstream::{self, provider_name};
use crate::Config;

/// The upstream role's state in one VM: the configuration. It defines no metric (see
/// [`crate::upstream`]): each attempt is recorded in the stream property
/// [`upstream::ATTEMPTS_PROPERTY`] and counted by the listener role.
pub struct Upstream {
    config: Config,
}

impl Upstream {
    /// Builds the role; an error names what is wrong.
    pub fn configure(_host: &dyn Host, config: Config) -> Result<Self, String> {
        if !matches!(config.mode, Mode::Routed(_)) {
            return Err(
                "runs as an upstream filter but the configuration has no `providers`".into(),
            );
        }
        Ok(Self { config })
    }

    fn routing(&self) -> Option<&Routing> {
        match &self.config.mode {
            Mode::Routed(r) => Some(r),
            Mode::Single(_) => None,
        }
    }
}

/// One attempt to one provider.
pub struct AttemptExchange {
    upstream: Rc<Upstream>,
    /// The body's `model` must become this name before the attempt is sent.
    rename: Option<String>,
    /// The stream's attempt log as this attempt wrote it (its error status is appended).
    log: Vec<u8>,
}

impl AttemptExchange {
    /// A new attempt.
    pub fn new(upstream: Rc<Upstream>) -> Self {
        Self {
            upstream,
            rename: None,
            log: Vec::new(),
        }
    }

    /// The attempt's request headers: the provider's key, host, path and headers.
    pub fn on_request_headers(&mut self, h: &dyn Host, end_of_stream: bool) -> Action {
        let Some(routing) = self.upstream.routing() else {
            return refuse(h, "the configuration has no providers");
        };
        let headers = match h.headers(Map::Request) {
            Ok(map) => map,
            Err(e) => return refuse(h, &format!("cannot read request headers: {e}")),
        };
        let headers = headers.pairs();
        let mut attempt = upstream::on_attempt_headers(routing, &headers);
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
        self.record(h, &attempt);
        // The listener role prepared the first attempt in its own write: nothing left to do.
        attempt.retain_needed(&headers);
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
        if let Some(log) = status.and_then(|s| upstream::record_status(&self.log, s)) {
            self.write_log(h, log);
        }
        Action::Continue
    }

    /// Records this attempt in the stream's attempt log. A first attempt only keeps its entry,
    /// written with its provider's error if there is one (the listener role counts a first
    /// attempt without the log); a fallback reads what the attempts before it wrote and
    /// appends itself (two host calls).
    fn record(&mut self, h: &dyn Host, attempt: &upstream::Attempt) {
        if attempt.position == 0 {
            self.log = upstream::record_attempt(&[], attempt).unwrap_or_default();
            return;
        }
        let before = match h.property(&[upstream::ATTEMPTS_PROPERTY]) {
            Ok(log) => log.unwrap_or_default(),
            Err(e) => {
                warn!("upstream: cannot read the attempt log: {e}");
                Vec::new()
            }
        };
        if let Some(log) = upstream::record_attempt(&before, attempt) {
            self.write_log(h, log);
        }
    }

    fn write_log(&mut self, h: &dyn Host, log: Vec<u8>) {
        if let Err(e) = h.set_property(upstream::ATTEMPTS_PROPERTY, &log) {
            warn!("upstream: cannot record the attempt: {e}");
        }
        self.log = log;
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

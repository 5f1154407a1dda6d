//! The filter's second role: an upstream HTTP filter on the clusters the model routes use, run by
//! Envoy once per attempt. It gives the attempt its provider's credentials, host, path prefix
//! and model name, so a fallback to the next provider (Envoy's retry into the next cluster of an
//! aggregate cluster) is a complete, correct request to that provider.
//!
//! Which provider an attempt goes to follows from the route and the attempt number: the route's
//! aggregate cluster lists the rule's providers as priorities, and its retry policy
//! (`previous_priorities`) sends attempt N to the N-th. Envoy runs the upstream filters of the
//! cluster the route names (the aggregate), not those of the cluster that serves the attempt,
//! so the filter cannot learn the provider from its own configuration.
//!
//! Envoy hands every attempt the same request header map, so what one attempt changes, the next
//! one sees. Each attempt therefore sets everything from scratch: the key, the host, the path
//! without any provider's prefix, the extra headers of every provider removed but its own, and
//! the model name. For the same reason the route header stays on the request (the next attempt
//! needs it): providers see `x-tollgate-route: r<N>`, a rule number and nothing else.
//!
//! The upstream role defines no metric. It records each attempt in a stream property
//! ([`ATTEMPTS_PROPERTY`]) and the listener role counts them ([`AttemptCounters`]): Envoy before
//! 1.39 creates the custom metrics of a VM that an upstream filter created under that cluster's
//! stats scope (`cluster.<name>.wasmcustom.*`), so counted in the upstream role they would be
//! renamed on 1.36-1.38 (docs/compatibility.md).

use std::cell::RefCell;
use std::collections::HashMap;

use crate::headers::Header;
use crate::host::{Host, HostError};
use crate::metrics;
use crate::routing::{ProviderId, Routing, Rule, Target, DEFAULT_ROUTE, ROUTE_HEADER};

/// What to do with one attempt's request headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Headers to remove (other providers' extra headers), lowercase.
    pub remove: Vec<Vec<u8>>,
    /// Headers to set, replacing any value.
    pub set: Vec<(String, String)>,
    /// Replace the body's `model` with this name (pause for the body first).
    pub rename_model: Option<String>,
    /// The rule this attempt serves (`None`: the default route, or an unknown route).
    pub rule: Option<usize>,
    /// The provider this attempt goes to.
    pub provider: Option<ProviderId>,
    /// Position of this provider in the rule's list: 0 first choice, 1 first fallback, ...
    pub position: usize,
}

/// Envoy's attempt counter on upstream requests (`include_request_attempt_count`), from 1.
pub const ATTEMPT_HEADER: &[u8] = b"x-envoy-attempt-count";

/// The attempt count of an [`ATTEMPT_HEADER`] value (request or response).
pub fn attempt_count(value: &[u8]) -> Option<usize> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Prepares one attempt from the request headers the downstream role and Envoy's router left.
pub fn on_attempt_headers(routing: &Routing, headers: &[Header]) -> Attempt {
    let attempt = headers
        .iter()
        .find(|(n, _)| *n == ATTEMPT_HEADER)
        .and_then(|(_, v)| attempt_count(v))
        .unwrap_or(1);
    prepare(routing, headers, attempt)
}

/// What the listener role sets on a request it routes, in the same write as its route: the
/// first attempt's credentials and extra headers, so that the upstream role finds the first
/// attempt ready and changes nothing. `:authority` and `:path` stay as the client sent them
/// until the upstream role's turn: Envoy picks the route again after the listener's write, and
/// the operator's virtual hosts and routes match on them.
pub fn first_attempt_edits(routing: &Routing, headers: &[Header]) -> Attempt {
    let mut attempt = prepare(routing, headers, 1);
    attempt
        .set
        .retain(|(name, _)| name != ":authority" && name != ":path");
    attempt
}

impl Attempt {
    /// Keeps only the edits `headers` does not already have: a header to remove that is there,
    /// a header to set that is missing or holds another value.
    pub fn retain_needed(&mut self, headers: &[Header]) {
        self.remove
            .retain(|name| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)));
        self.set.retain(|(name, value)| {
            let mut values = headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .peekable();
            values.peek().is_none() || values.any(|(_, v)| *v != value.as_bytes())
        });
    }
}

/// The provider of the `position`-th attempt of `rule` (`None`: the default route). More
/// attempts than providers stay on the last one.
pub fn provider_at(routing: &Routing, rule: Option<usize>, position: usize) -> Option<ProviderId> {
    match rule {
        Some(rule) => target_at(routing.rules.get(rule)?, position).map(|t| t.provider),
        None => routing.default_provider,
    }
}

/// The target of a rule's `position`-th attempt: past the last provider (more retries than
/// providers), the last one.
fn target_at(rule: &Rule, position: usize) -> Option<&Target> {
    rule.targets.get(position).or(rule.targets.last())
}

fn prepare(routing: &Routing, headers: &[Header], attempt: usize) -> Attempt {
    let mut remove: Vec<Vec<u8>> = Vec::new();
    let mut route: Option<&[u8]> = None;
    let mut path: Option<&[u8]> = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(ROUTE_HEADER.as_bytes()) {
            route = Some(value);
        } else if *name == b":path" {
            path = Some(value);
        }
    }
    let route = route
        .and_then(|r| std::str::from_utf8(r).ok())
        .unwrap_or("");
    let rule = routing.rule_of_route(route);
    let position = attempt.saturating_sub(1);
    let (provider, rename_model) = match rule.and_then(|r| routing.rules.get(r)) {
        Some(r) => match target_at(r, position) {
            Some(t) => {
                // A rule that renames for some provider names the model back for the others,
                // undoing an earlier attempt's rename (exact rules only; globs cannot rename).
                let renames = r.targets.iter().any(|t| t.model.is_some());
                let undo = renames && position > 0;
                let name = t
                    .model
                    .clone()
                    .or_else(|| undo.then(|| r.pattern.as_str().to_string()));
                (Some(t.provider), name)
            }
            None => (None, None),
        },
        None if route == DEFAULT_ROUTE => (routing.default_provider, None),
        None => (None, None),
    };

    let mut set = Vec::new();
    if let Some(p) = provider.and_then(|id| routing.providers.get(id)) {
        // The key in the header this provider's API expects, and no other credential header
        // (the listener role stripped the client's; this keeps a shared map clean).
        let (credential, key) = p.credential();
        for other in ["authorization", "x-api-key"] {
            let present = headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(other.as_bytes()));
            if other != credential && present {
                remove.push(other.as_bytes().to_vec());
            }
        }
        set.push((credential.to_string(), key.to_string()));
        if let Some(a) = &p.authority {
            set.push((":authority".to_string(), a.clone()));
        }
        if let Some(path) = path.map(String::from_utf8_lossy) {
            let bare = routing
                .providers
                .iter()
                .filter(|o| !o.path_prefix.is_empty())
                .find_map(|o| path.strip_prefix(o.path_prefix.as_str()))
                .filter(|rest| rest.starts_with('/'))
                .unwrap_or(&path);
            // The provider's prefix and the bare path: set only when that is not the path.
            if path.strip_prefix(p.path_prefix.as_str()) != Some(bare) {
                set.push((":path".to_string(), [p.path_prefix.as_str(), bare].concat()));
            }
        }
        for other in &routing.providers {
            for (name, _) in &other.headers {
                let own = p.headers.iter().any(|(n, _)| n == name);
                if !own && !remove.iter().any(|r| r == name.as_bytes()) {
                    remove.push(name.as_bytes().to_vec());
                }
            }
        }
        set.extend(p.headers.iter().cloned());
    }
    Attempt {
        remove,
        set,
        rename_model,
        rule,
        provider,
        position,
    }
}

/// The stream property (Envoy filter state `wasm.tollgate_attempts`) through which the upstream
/// role hands its attempts to the listener role: `<rule|d>.<position>.<provider>[=<status>]`,
/// comma separated, the status only for a provider's error (4xx, 5xx). A first attempt writes
/// nothing unless its provider answers with an error: the listener role knows the first
/// provider of its own route, and Envoy's `x-envoy-attempt-count` on the response
/// (`include_attempt_count_in_response`) says how many attempts there were. A fallback writes
/// its entry (it reads the log for that); an attempt missing from the log (one that failed
/// before any response, such as a connect failure) is still counted from the attempt count.
pub const ATTEMPTS_PROPERTY: &str = "tollgate_attempts";

/// Attempts recorded per request at most (Envoy's retries are bounded by the route; this bounds
/// the property whatever the configuration).
pub const MAX_RECORDED_ATTEMPTS: usize = 16;

/// One attempt as the upstream role records it for the listener role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptRecord {
    /// The rule it served (`None`: the default route).
    pub rule: Option<usize>,
    /// Position in the rule's provider list.
    pub position: usize,
    /// The provider it went to.
    pub provider: ProviderId,
    /// The provider's answer when it was an error (4xx, 5xx).
    pub status: Option<u16>,
}

/// `log` with `attempt` appended, or `None` when there is nothing to record (no provider) or
/// the log is full.
pub fn record_attempt(log: &[u8], attempt: &Attempt) -> Option<Vec<u8>> {
    let provider = attempt.provider?;
    if parse_attempts(log).len() >= MAX_RECORDED_ATTEMPTS {
        return None;
    }
    let rule = attempt
        .rule
        .map_or_else(|| "d".to_string(), |r| r.to_string());
    let mut out = log.to_vec();
    if !out.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(format!("{rule}.{}.{provider}", attempt.position).as_bytes());
    Some(out)
}

/// `log` with the error `status` given to its last attempt, or `None` when there is no attempt
/// to give it to, it has one, or the status is not an error.
pub fn record_status(log: &[u8], status: u16) -> Option<Vec<u8>> {
    if status < 400 || log.is_empty() || log.ends_with(b",") {
        return None;
    }
    let last = log.rsplit(|&b| b == b',').next()?;
    if last.contains(&b'=') {
        return None;
    }
    let mut out = log.to_vec();
    out.extend_from_slice(format!("={status}").as_bytes());
    Some(out)
}

/// The attempts in a log; malformed entries are skipped (a property is stream state that
/// another filter could have written).
pub fn parse_attempts(log: &[u8]) -> Vec<AttemptRecord> {
    let Ok(text) = std::str::from_utf8(log) else {
        return Vec::new();
    };
    text.split(',')
        .filter_map(|entry| {
            let (head, status) = match entry.split_once('=') {
                Some((h, s)) => (h, Some(s.parse::<u16>().ok()?)),
                None => (entry, None),
            };
            let mut parts = head.split('.');
            let rule = match parts.next()? {
                "d" => None,
                r => Some(r.parse::<usize>().ok()?),
            };
            let position = parts.next()?.parse::<usize>().ok()?;
            let provider = parts.next()?.parse::<ProviderId>().ok()?;
            if parts.next().is_some() {
                return None;
            }
            Some(AttemptRecord {
                rule,
                position,
                provider,
                status,
            })
        })
        .take(MAX_RECORDED_ATTEMPTS)
        .collect()
}

/// The listener role's counters of what the upstream role recorded:
/// `tollgate_upstream_requests_total`, `tollgate_fallbacks_total` (defined with the
/// configuration) and `tollgate_upstream_errors_total` (defined on first use).
pub struct AttemptCounters {
    /// `[rule][position]` attempts.
    attempts: Vec<Vec<u32>>,
    /// The default route's attempts.
    default_attempts: Option<u32>,
    /// `[rule][position]` fallbacks into that position (`None` at position 0).
    fallbacks: Vec<Vec<Option<u32>>>,
    /// Error ids by (provider, status).
    errors: RefCell<HashMap<(ProviderId, u16), u32>>,
}

impl AttemptCounters {
    /// Defines the counters of every rule's providers and of the default route.
    pub fn define(host: &dyn Host, routing: &Routing) -> Result<Self, HostError> {
        let mut attempts = Vec::with_capacity(routing.rules.len());
        let mut fallbacks = Vec::with_capacity(routing.rules.len());
        for rule in &routing.rules {
            let model = rule.pattern.as_str();
            let mut per_position = Vec::with_capacity(rule.targets.len());
            let mut into = Vec::with_capacity(rule.targets.len());
            let mut previous: Option<&str> = None;
            for t in &rule.targets {
                let name = provider_name(routing, t.provider);
                per_position
                    .push(host.define_counter(&metrics::upstream_requests_total(name, model))?);
                into.push(match previous {
                    Some(prev) => {
                        Some(host.define_counter(&metrics::fallbacks_total(model, prev, name))?)
                    }
                    None => None,
                });
                previous = Some(name);
            }
            attempts.push(per_position);
            fallbacks.push(into);
        }
        let default_attempts = match routing.default_provider {
            Some(p) => Some(host.define_counter(&metrics::upstream_requests_total(
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
        })
    }

    /// Counts the attempts of a forwarded request: `rule` is the listener's route (`None`: the
    /// default route), `attempts` Envoy's attempt count when the response carried it (0 when
    /// not), `log` what the upstream role recorded. Every attempt is counted, with the fallback
    /// into it and its provider's error, each through `add` (metric id, amount). Returns the
    /// provider of the last attempt (the one whose answer the client gets). `host` only defines
    /// an error series on its first use.
    pub fn count(
        &self,
        host: &dyn Host,
        routing: &Routing,
        rule: Option<usize>,
        attempts: usize,
        log: &[u8],
        add: &mut dyn FnMut(u32, u64),
    ) -> Option<ProviderId> {
        let recorded = parse_attempts(log);
        let seen = recorded
            .iter()
            .filter(|a| a.rule == rule)
            .map(|a| a.position + 1)
            .max()
            .unwrap_or(1);
        let n = attempts.max(seen).min(MAX_RECORDED_ATTEMPTS);
        let mut last = None;
        for position in 0..n {
            let Some(provider) = provider_at(routing, rule, position) else {
                break;
            };
            last = Some(provider);
            let (attempt, fallback) = match rule {
                None => (self.default_attempts, None),
                Some(rule) => (
                    self.attempts
                        .get(rule)
                        .and_then(|r| r.get(position))
                        .copied(),
                    self.fallbacks
                        .get(rule)
                        .and_then(|r| r.get(position))
                        .copied()
                        .flatten(),
                ),
            };
            for id in [attempt, fallback].into_iter().flatten() {
                add(id, 1);
            }
            let status = recorded
                .iter()
                .find(|a| a.rule == rule && a.position == position && a.provider == provider)
                .and_then(|a| a.status);
            if let Some(status) = status {
                if let Some(id) = self.error_id(host, routing, provider, status) {
                    add(id, 1);
                }
            }
        }
        last
    }

    fn error_id(
        &self,
        host: &dyn Host,
        routing: &Routing,
        provider: ProviderId,
        status: u16,
    ) -> Option<u32> {
        // An unknown provider (a log another filter wrote) gets no series.
        routing.providers.get(provider)?;
        if let Some(&id) = self.errors.borrow().get(&(provider, status)) {
            return Some(id);
        }
        let name = metrics::upstream_errors_total(provider_name(routing, provider), status);
        match host.define_counter(&name) {
            Ok(id) => {
                self.errors.borrow_mut().insert((provider, status), id);
                Some(id)
            }
            Err(e) => {
                log::warn!("cannot define a metric: {e}");
                None
            }
        }
    }
}

/// A provider's configured name (empty for an unknown id).
pub fn provider_name(routing: &Routing, id: ProviderId) -> &str {
    routing.providers.get(id).map_or("", |p| p.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};

    fn attempt(rule: Option<usize>, position: usize, provider: Option<usize>) -> Attempt {
        Attempt {
            remove: Vec::new(),
            set: Vec::new(),
            rename_model: None,
            rule,
            provider,
            position,
        }
    }

    #[test]
    fn attempts_round_trip_through_the_log() {
        let log = record_attempt(b"", &attempt(Some(0), 0, Some(0))).unwrap();
        let log = record_status(&log, 500).unwrap();
        assert_eq!(record_status(&log, 502), None, "one status per attempt");
        let log = record_attempt(&log, &attempt(Some(0), 1, Some(1))).unwrap();
        assert_eq!(record_status(&log, 200), None, "successes are not recorded");
        let log = record_attempt(&log, &attempt(None, 0, Some(1))).unwrap();
        assert_eq!(log, b"0.0.0=500,0.1.1,d.0.1");
        let rec = |rule, position, provider, status| AttemptRecord {
            rule,
            position,
            provider,
            status,
        };
        assert_eq!(
            parse_attempts(&log),
            vec![
                rec(Some(0), 0, 0, Some(500)),
                rec(Some(0), 1, 1, None),
                rec(None, 0, 1, None)
            ]
        );
    }

    #[test]
    fn attempts_without_provider_or_past_the_bound_are_not_recorded() {
        assert_eq!(record_attempt(b"", &attempt(Some(0), 0, None)), None);
        assert_eq!(record_status(b"", 500), None);
        let mut log = Vec::new();
        for k in 0..MAX_RECORDED_ATTEMPTS {
            log = record_attempt(&log, &attempt(Some(0), k, Some(0))).unwrap();
        }
        assert_eq!(record_attempt(&log, &attempt(Some(0), 99, Some(0))), None);
        assert_eq!(parse_attempts(&log).len(), MAX_RECORDED_ATTEMPTS);
    }

    #[test]
    fn malformed_entries_are_skipped() {
        assert_eq!(parse_attempts(b"x,0.0,1.2.3.4,0.0.0=abc,,\xff"), vec![]);
        assert_eq!(
            parse_attempts(b"x,0.0,2.1.0=429"),
            vec![AttemptRecord {
                rule: Some(2),
                position: 1,
                provider: 0,
                status: Some(429)
            }]
        );
    }

    /// Counts one exchange's attempts into `host` and returns the last provider.
    fn count(
        host: &crate::fake::FakeHost,
        r: &Routing,
        rule: Option<usize>,
        attempts: usize,
        log: &[u8],
    ) -> Option<ProviderId> {
        let counters = AttemptCounters::define(host, r).unwrap();
        counters.count(host, r, rule, attempts, log, &mut |id, n| {
            crate::host::Host::increment(host, id, n);
        })
    }

    const RELAY: &str = "tollgate_upstream_requests_total.provider=relay.model=gpt-4_1";
    const DEEPSEEK: &str = "tollgate_upstream_requests_total.provider=deepseek.model=gpt-4_1";
    const FALLBACK: &str = "tollgate_fallbacks_total.model=gpt-4_1.from=relay.to=deepseek";
    const RELAY_503: &str = "tollgate_upstream_errors_total.provider=relay.status=503";

    #[test]
    fn the_listener_counts_attempts_fallbacks_and_errors() {
        let r = routing();
        let host = crate::fake::FakeHost::default();
        // The first provider failed (recorded with its status), the fallback answered; an
        // entry of another rule (a log another filter wrote) is not this exchange's.
        let last = count(&host, &r, Some(0), 2, b"0.0.0=503,0.1.1,9.9.9=500");
        assert_eq!(last, Some(1));
        for (name, n) in [(RELAY, 1), (DEEPSEEK, 1), (FALLBACK, 1), (RELAY_503, 1)] {
            assert_eq!(host.counter(name), n, "{name}");
        }
        assert_eq!(
            host.counter("tollgate_upstream_errors_total.provider=_.status=500"),
            0
        );
        // The default route.
        let host = crate::fake::FakeHost::default();
        assert_eq!(count(&host, &r, None, 1, b""), Some(0));
        assert_eq!(
            host.counter("tollgate_upstream_requests_total.provider=relay.model=_default"),
            1
        );
    }

    #[test]
    fn a_first_attempt_is_counted_without_a_log() {
        let r = routing();
        let host = crate::fake::FakeHost::default();
        // One attempt that succeeded: nothing was written, the route says which provider.
        assert_eq!(count(&host, &r, Some(0), 1, b""), Some(0));
        assert_eq!((host.counter(RELAY), host.counter(DEEPSEEK)), (1, 0));
        // No attempt count on the response (a virtual host without
        // `include_attempt_count_in_response`) and no log: one attempt.
        let host = crate::fake::FakeHost::default();
        assert_eq!(count(&host, &r, Some(0), 0, b""), Some(0));
        assert_eq!(host.counter(RELAY), 1);
    }

    #[test]
    fn an_attempt_missing_from_the_log_is_still_counted() {
        let r = routing();
        // The first attempt failed before any response (a connect failure: no status, no
        // entry); the fallback wrote its own. With or without Envoy's count: two attempts.
        for attempts in [2, 0] {
            let host = crate::fake::FakeHost::default();
            assert_eq!(count(&host, &r, Some(0), attempts, b"0.1.1"), Some(1));
            for (name, n) in [(RELAY, 1), (DEEPSEEK, 1), (FALLBACK, 1), (RELAY_503, 0)] {
                assert_eq!(host.counter(name), n, "{attempts}: {name}");
            }
        }
        // The last attempt failed before any response: Envoy's count has it, the log does not.
        let host = crate::fake::FakeHost::default();
        assert_eq!(count(&host, &r, Some(0), 2, b"0.0.0=503"), Some(1));
        for (name, n) in [(RELAY, 1), (DEEPSEEK, 1), (FALLBACK, 1), (RELAY_503, 1)] {
            assert_eq!(host.counter(name), n, "{name}");
        }
        // A count past any bound is bounded.
        let host = crate::fake::FakeHost::default();
        count(&host, &r, Some(0), usize::MAX, b"");
        assert_eq!(host.counter(RELAY), 1);
        assert_eq!(
            host.counter(DEEPSEEK),
            1,
            "positions past the rule count no attempt"
        );
    }

    #[test]
    fn the_listener_prepares_the_first_attempt_but_not_its_route() {
        let r = routing();
        let headers = h(&[
            (":authority", "gateway.example"),
            (":path", "/v1/chat/completions"),
            ("x-tollgate-route", "r0"),
            // A client cannot pick the fallback: the listener prepares the first attempt.
            ("x-envoy-attempt-count", "2"),
        ]);
        let a = first_attempt_edits(&r, &headers);
        assert_eq!(
            a.set,
            vec![
                ("authorization".into(), "Bearer sk-RELAY_KEY".into()),
                ("x-org".into(), "team".into()),
            ]
        );
        assert_eq!((a.rule, a.provider, a.position), (Some(0), Some(0), 0));
        // The upstream role's first attempt then has its host and path left to set, and
        // nothing else.
        let mut prepared = headers.clone();
        prepared.retain(|(n, _)| n != b"x-envoy-attempt-count");
        prepared.extend(h(&[
            ("authorization", "Bearer sk-RELAY_KEY"),
            ("x-org", "team"),
            ("x-envoy-attempt-count", "1"),
        ]));
        let mut upstream = on_attempt_headers(&r, &prepared);
        upstream.retain_needed(&prepared);
        assert!(upstream.remove.is_empty());
        assert_eq!(
            upstream.set,
            vec![
                (":authority".into(), "api.relay.example".into()),
                (":path".into(), "/openai/v1/chat/completions".into()),
            ]
        );
    }

    #[test]
    fn only_the_edits_a_map_lacks_are_kept() {
        let mut a = attempt(Some(0), 0, Some(0));
        a.remove = vec![b"x-gone".to_vec(), b"x-old".to_vec()];
        a.set = vec![
            ("authorization".into(), "Bearer k".into()),
            ("x-same".into(), "1".into()),
            ("x-twice".into(), "1".into()),
        ];
        a.retain_needed(&h(&[
            ("X-Old", "v"),
            ("authorization", "Bearer other"),
            ("x-same", "1"),
            ("x-twice", "1"),
            ("x-twice", "2"),
        ]));
        assert_eq!(a.remove, vec![b"x-old".to_vec()]);
        assert_eq!(
            a.set,
            vec![
                ("authorization".into(), "Bearer k".into()),
                ("x-twice".into(), "1".into())
            ]
        );
    }

    fn routing() -> Routing {
        let sha = crate::keys::Digest::of_key(crate::keys::DigestKind::Sha256, b"k").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{sha}"}}],
               "providers":[
                 {{"name":"relay","cluster":"relay","api_key_env":"RELAY_KEY","authority":"api.relay.example","path_prefix":"/openai","headers":{{"X-Org":"team"}}}},
                 {{"name":"deepseek","cluster":"deepseek","api_key_env":"DS_KEY","authority":"api.deepseek.example"}}],
               "models":[
                 {{"match":"gpt-4.1","providers":["relay","deepseek"],"upstream_models":{{"deepseek":"deepseek-chat"}}}},
                 {{"match":"fast","providers":["deepseek"],"upstream_model":"deepseek-chat"}}],
               "default_provider":"relay"}}"#
        );
        let env = |n: &str| Some(format!("sk-{n}"));
        match Config::parse(json.as_bytes(), &env).unwrap().mode {
            Mode::Routed(r) => r,
            Mode::Single(_) => panic!(),
        }
    }

    use crate::fake::view as h;

    #[test]
    fn first_choice_gets_its_key_host_prefix_and_headers() {
        let r = routing();
        let a = on_attempt_headers(
            &r,
            &h(&[
                (":path", "/v1/chat/completions"),
                ("x-tollgate-route", "r0"),
            ]),
        );
        assert!(a.remove.is_empty());
        assert_eq!(
            a.set,
            vec![
                ("authorization".into(), "Bearer sk-RELAY_KEY".into()),
                (":authority".into(), "api.relay.example".into()),
                (":path".into(), "/openai/v1/chat/completions".into()),
                ("x-org".into(), "team".into()),
            ]
        );
        assert_eq!(
            (a.rule, a.provider, a.position, a.rename_model),
            (Some(0), Some(0), 0, None)
        );
    }

    #[test]
    fn fallback_gets_its_own_key_and_model_name() {
        let r = routing();
        let a = on_attempt_headers(
            &r,
            &h(&[
                (":path", "/v1/chat/completions"),
                ("x-tollgate-route", "r0"),
                ("x-envoy-attempt-count", "2"),
            ]),
        );
        assert_eq!(
            a.set,
            vec![
                ("authorization".into(), "Bearer sk-DS_KEY".into()),
                (":authority".into(), "api.deepseek.example".into())
            ]
        );
        // Undo what the first attempt changed in the shared header map.
        let a = on_attempt_headers(
            &r,
            &h(&[
                (":path", "/openai/v1/chat/completions"),
                ("x-org", "team"),
                ("x-tollgate-route", "r0"),
                ("x-envoy-attempt-count", "2"),
            ]),
        );
        assert_eq!(a.remove, vec![b"x-org".to_vec()]);
        assert_eq!(
            a.set,
            vec![
                ("authorization".into(), "Bearer sk-DS_KEY".into()),
                (":authority".into(), "api.deepseek.example".into()),
                (":path".into(), "/v1/chat/completions".into())
            ]
        );

        assert_eq!(a.position, 1);
        assert_eq!(a.rename_model.as_deref(), Some("deepseek-chat"));
        let a = on_attempt_headers(&r, &h(&[("x-tollgate-route", "r1")]));
        assert_eq!(
            (a.rule, a.position, a.rename_model.as_deref()),
            (Some(1), 0, Some("deepseek-chat"))
        );
    }

    #[test]
    fn an_anthropic_provider_gets_its_key_in_x_api_key() {
        let sha = crate::keys::Digest::of_key(crate::keys::DigestKind::Sha256, b"k").to_hex();
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{sha}"}}],
               "providers":[
                 {{"name":"claude","cluster":"c1","api_key_env":"A_KEY","api":"anthropic"}},
                 {{"name":"relay","cluster":"c2","api_key_env":"B_KEY","api":"anthropic"}},
                 {{"name":"oai","cluster":"c3","api_key_env":"O_KEY"}}],
               "models":[{{"match":"claude-*","providers":["claude","relay"]}},
                         {{"match":"gpt","providers":["oai"]}}]}}"#
        );
        let env = |n: &str| Some(format!("sk-{n}"));
        let Mode::Routed(r) = Config::parse(json.as_bytes(), &env).unwrap().mode else {
            panic!()
        };
        let a = on_attempt_headers(&r, &h(&[("x-tollgate-route", "r0")]));
        assert_eq!(a.set, vec![("x-api-key".into(), "sk-A_KEY".into())]);
        assert!(a.remove.is_empty());
        // A fallback replaces the key; a stray authorization header goes.
        let a = on_attempt_headers(
            &r,
            &h(&[
                ("x-tollgate-route", "r0"),
                ("x-envoy-attempt-count", "2"),
                ("x-api-key", "sk-A_KEY"),
                ("authorization", "Bearer x"),
            ]),
        );
        assert_eq!(a.set, vec![("x-api-key".into(), "sk-B_KEY".into())]);
        assert_eq!(a.remove, vec![b"authorization".to_vec()]);
        // An OpenAI provider never receives an x-api-key.
        let a = on_attempt_headers(&r, &h(&[("x-tollgate-route", "r1"), ("X-Api-Key", "k")]));
        assert_eq!(
            a.set,
            vec![("authorization".into(), "Bearer sk-O_KEY".into())]
        );
        assert_eq!(a.remove, vec![b"x-api-key".to_vec()]);
    }

    #[test]
    fn default_and_unknown_routes_keep_the_body() {
        let r = routing();
        let a = on_attempt_headers(&r, &h(&[("x-tollgate-route", "default")]));
        assert_eq!((a.rule, a.provider, a.rename_model), (None, Some(0), None));
        assert_eq!(a.set[0].1, "Bearer sk-RELAY_KEY");
        // Unknown routes get no credentials at all: the provider refuses them.
        for route in ["r9", "", "x"] {
            let a = on_attempt_headers(&r, &h(&[("x-tollgate-route", route)]));
            assert_eq!((a.rule, a.provider), (None, None), "{route}");
            assert!(a.set.is_empty());
        }
        // More attempts than providers stay on the last provider.
        let a = on_attempt_headers(
            &r,
            &h(&[("x-tollgate-route", "r0"), ("x-envoy-attempt-count", "7")]),
        );
        assert_eq!(a.provider, Some(1));
    }
}

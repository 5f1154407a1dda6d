//! Behaviour rules, set over the control listener only (never from anything a gateway client
//! can send): "the next N requests whose path or body contains MARKER get status S after D ms".
//! A test puts a marker of its own in its request body, so concurrent tests never take each
//! other's rules.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{self, Config};

/// Enough for any test; bounds memory if a client loops.
pub const MAX_RULES: usize = 1_000;

/// A rule as posted to `POST /__mock/rules`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Substring of the request target (query included) or of the body; empty matches all.
    #[serde(default, rename = "match")]
    pub matcher: String,
    /// Only requests with this method (case-insensitive).
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub error_body: Option<String>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub chunk_delay_ms: Option<u64>,
    #[serde(default)]
    pub abort_after: Option<usize>,
    /// Extra response headers, `[[name, value], ...]`, added to the answer.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// How many requests the rule applies to; absent means every matching request.
    #[serde(default)]
    pub times: Option<u64>,
    /// Chat completions report this many of their prompt tokens as cached
    /// (`prompt_tokens_details.cached_tokens`, at most the prompt).
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    /// Chat completions report this many of their completion tokens as reasoning
    /// (`completion_tokens_details.reasoning_tokens`, at most the completion).
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

/// A stored rule, as `GET /__mock/rules` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rule {
    pub id: u64,
    #[serde(rename = "match")]
    pub matcher: String,
    pub method: Option<String>,
    pub status: Option<u16>,
    pub error_body: Option<String>,
    pub delay_ms: Option<u64>,
    pub chunk_delay_ms: Option<u64>,
    pub abort_after: Option<usize>,
    pub headers: Vec<(String, String)>,
    /// Requests it still applies to (`null`: unbounded).
    pub times: Option<u64>,
    /// Requests it has applied to so far.
    pub hits: u64,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

/// Why a posted rule was refused (answered 400 on the control listener).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError(pub String);

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl RuleSpec {
    pub fn parse(body: &[u8]) -> Result<Self, RuleError> {
        // Through `Value` so that only an object is a rule (serde would take an array too).
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| RuleError(format!("invalid rule: {e}")))?;
        if !value.is_object() {
            return Err(RuleError("a rule is a JSON object".into()));
        }
        let spec: RuleSpec =
            serde_json::from_value(value).map_err(|e| RuleError(format!("invalid rule: {e}")))?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), RuleError> {
        let err = |m: &str| Err(RuleError(m.to_string()));
        if let Some(s) = self.status {
            if config::parse_status(&s.to_string()).is_none() {
                return err("status must be 200 or an error status 400-599");
            }
        }
        for (name, v) in [
            ("delay_ms", self.delay_ms),
            ("chunk_delay_ms", self.chunk_delay_ms),
        ] {
            if v.is_some_and(|ms| ms > config::MAX_DELAY_MS) {
                return Err(RuleError(format!(
                    "{name} must be at most {}",
                    config::MAX_DELAY_MS
                )));
            }
        }
        if self.method.as_deref().is_some_and(|m| !is_token(m)) {
            return err("method must be an HTTP method token");
        }
        for (n, v) in &self.headers {
            if !is_token(n) || !printable(v) {
                return err("headers must be [name, value] pairs of a token and printable ASCII");
            }
        }
        if self.times == Some(0) {
            return err("times must be at least 1 (omit it for no bound)");
        }
        Ok(())
    }
}

/// What a request gets: the rule that matched it, or the command-line defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behaviour {
    pub status: u16,
    pub error_body: Option<String>,
    pub delay: Duration,
    pub chunk_delay: Duration,
    pub abort_after: Option<usize>,
    pub headers: Vec<(String, String)>,
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
}

impl Behaviour {
    pub fn defaults(cfg: &Config) -> Self {
        Behaviour {
            status: cfg.status,
            error_body: None,
            delay: cfg.delay,
            chunk_delay: Duration::ZERO,
            abort_after: None,
            headers: Vec::new(),
            cached_tokens: None,
            reasoning_tokens: None,
        }
    }

    /// Fields the rule leaves out keep the defaults.
    fn with(cfg: &Config, rule: &Rule) -> Self {
        let d = Behaviour::defaults(cfg);
        Behaviour {
            status: rule.status.unwrap_or(d.status),
            error_body: rule.error_body.clone(),
            delay: rule.delay_ms.map_or(d.delay, Duration::from_millis),
            chunk_delay: rule
                .chunk_delay_ms
                .map_or(d.chunk_delay, Duration::from_millis),
            abort_after: rule.abort_after,
            headers: rule.headers.clone(),
            cached_tokens: rule.cached_tokens,
            reasoning_tokens: rule.reasoning_tokens,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

pub struct Rules {
    inner: Mutex<Inner>,
}

struct Inner {
    next_id: u64,
    rules: Vec<Rule>,
}

impl Rules {
    pub fn new() -> Self {
        Rules {
            inner: Mutex::new(Inner {
                next_id: 1,
                rules: Vec::new(),
            }),
        }
    }

    /// Rules are replaced whole under the lock, so a poisoned lock still holds a valid list.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add(&self, spec: RuleSpec) -> Result<Rule, RuleError> {
        let mut inner = self.lock();
        if inner.rules.len() >= MAX_RULES {
            return Err(RuleError(format!("at most {MAX_RULES} rules")));
        }
        let rule = Rule {
            id: inner.next_id,
            matcher: spec.matcher,
            method: spec.method.map(|m| m.to_ascii_uppercase()),
            status: spec.status,
            error_body: spec.error_body,
            delay_ms: spec.delay_ms,
            chunk_delay_ms: spec.chunk_delay_ms,
            abort_after: spec.abort_after,
            headers: spec.headers,
            times: spec.times,
            hits: 0,
            cached_tokens: spec.cached_tokens,
            reasoning_tokens: spec.reasoning_tokens,
        };
        inner.next_id += 1;
        inner.rules.push(rule.clone());
        Ok(rule)
    }

    pub fn list(&self) -> Vec<Rule> {
        self.lock().rules.clone()
    }

    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Whether a rule with `id` existed.
    pub fn remove(&self, id: u64) -> bool {
        let mut inner = self.lock();
        let before = inner.rules.len();
        inner.rules.retain(|r| r.id != id);
        inner.rules.len() != before
    }

    /// The first rule (oldest first) that matches and has uses left takes the request: one
    /// use is consumed under the lock, so N concurrent requests consume exactly N uses. An
    /// exhausted rule stays listed (with `times: 0`) so a test can check its hits.
    pub fn behaviour(&self, cfg: &Config, method: &str, target: &str, body: &[u8]) -> Behaviour {
        let mut inner = self.lock();
        let hit = inner.rules.iter_mut().find(|r| {
            r.times != Some(0)
                && r.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && (contains(target.as_bytes(), r.matcher.as_bytes())
                    || contains(body, r.matcher.as_bytes()))
        });
        match hit {
            Some(rule) => {
                rule.hits += 1;
                if let Some(t) = rule.times.as_mut() {
                    *t -= 1;
                }
                Behaviour::with(cfg, rule)
            }
            None => Behaviour::defaults(cfg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> RuleSpec {
        RuleSpec::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn parse_and_validate() {
        let s = spec(
            r#"{"match":"m1","status":500,"delay_ms":5,"chunk_delay_ms":6,"abort_after":2,
                "error_body":"x","headers":[["openai-organization","org-1"]],"times":3,"method":"post"}"#,
        );
        assert_eq!(s.matcher, "m1");
        assert_eq!(s.times, Some(3));
        for bad in [
            r#"{"status":302}"#,
            r#"{"delay_ms":3600001}"#,
            r#"{"times":0}"#,
            r#"{"headers":[["a b","1"]]}"#,
            r#"{"headers":[["a","x\r\ny"]]}"#,
            r#"{"method":"GE T"}"#,
            r#"{"bogus":1}"#,
            r#"{"status":"500"}"#,
            "[]",
            "not json",
        ] {
            assert!(RuleSpec::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(spec("{}").matcher, "");
    }

    #[test]
    fn first_match_wins_and_times_bound_it() {
        let cfg = Config::default();
        let rules = Rules::new();
        let a = rules
            .add(spec(r#"{"match":"alpha","status":500,"times":2}"#))
            .unwrap();
        rules
            .add(spec(r#"{"match":"alpha","status":503,"method":"POST"}"#))
            .unwrap();
        rules.add(spec(r#"{"match":"?x=1","delay_ms":7}"#)).unwrap();
        let b = |method: &str, target: &str, body: &str| {
            rules.behaviour(&cfg, method, target, body.as_bytes())
        };
        assert_eq!(b("POST", "/v1/chat/completions", "alpha").status, 500);
        assert_eq!(b("GET", "/v1/alpha", "").status, 500);
        // The first rule is used up; the second only takes POSTs.
        assert_eq!(b("GET", "/v1/alpha", ""), Behaviour::defaults(&cfg));
        assert_eq!(b("POST", "/v1/x", "..alpha..").status, 503);
        assert_eq!(
            b("GET", "/v1/files?x=1", "").delay,
            Duration::from_millis(7)
        );
        assert_eq!(b("POST", "/v1/x", "beta"), Behaviour::defaults(&cfg));
        let listed = rules.list();
        assert_eq!(listed[0].id, a.id);
        assert_eq!((listed[0].times, listed[0].hits), (Some(0), 2));
        assert_eq!((listed[1].times, listed[1].hits), (None, 1));
        assert!(rules.remove(a.id));
        assert!(!rules.remove(a.id));
        rules.clear();
        assert!(rules.list().is_empty());
    }

    #[test]
    fn rule_fields_override_only_what_they_name() {
        let cfg = Config {
            status: 503,
            delay: Duration::from_millis(9),
            ..Config::default()
        };
        let rules = Rules::new();
        rules
            .add(spec(
                r#"{"abort_after":1,"chunk_delay_ms":4,"headers":[["a","b"]]}"#,
            ))
            .unwrap();
        let got = rules.behaviour(&cfg, "POST", "/v1/x", b"");
        assert_eq!(
            got,
            Behaviour {
                status: 503,
                error_body: None,
                delay: Duration::from_millis(9),
                chunk_delay: Duration::from_millis(4),
                abort_after: Some(1),
                headers: vec![("a".into(), "b".into())],
                cached_tokens: None,
                reasoning_tokens: None,
            }
        );
    }
}

//! Model routing: which provider(s) serve a model, under which name, and which models a client
//! may use. Compiled from the `providers` and `models` sections of the configuration.

use serde::Serialize;

use crate::endpoints::Api;
use crate::types::push_decimal;

/// A model name pattern: an exact name, or a glob where `*` matches any run of characters and
/// `?` one character (`gpt-4*`, `claude-?-opus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    glob: bool,
}

impl Pattern {
    /// Compiles a pattern.
    pub fn new(text: &str) -> Self {
        Self {
            glob: text.contains(['*', '?']),
            text: text.to_string(),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True for a pattern with wildcards.
    pub fn is_glob(&self) -> bool {
        self.glob
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        if !self.glob {
            self.text == name
        } else if self.text.is_ascii() && name.is_ascii() {
            glob_match(self.text.as_bytes(), name.as_bytes(), b'*', b'?')
        } else {
            // `?` is one character, not one byte of a multi-byte one.
            let pattern: Vec<char> = self.text.chars().collect();
            let name: Vec<char> = name.chars().collect();
            glob_match(&pattern, &name, '*', '?')
        }
    }
}

/// Iterative glob matching with single-star backtracking: linear in practice, never recursive,
/// so a hostile model name cannot blow the stack.
fn glob_match<T: Copy + PartialEq>(pattern: &[T], name: &[T], any_run: T, any_one: T) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(&c) if c == any_run => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == any_one || Some(&c) == name.get(n) => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&c| c == any_run))
}

/// Index of a provider in [`Routing::providers`].
pub type ProviderId = usize;

/// An upstream LLM provider.
#[derive(Clone, PartialEq, Eq)]
pub struct Provider {
    /// Name (metric label, rule references).
    pub name: String,
    /// Envoy cluster.
    pub cluster: String,
    /// The API it speaks: it serves only that API's endpoints.
    pub api: Api,
    /// The value of its credential header (see [`Provider::credential`]), from its env var:
    /// `Bearer <key>` for OpenAI's API, the bare key for Anthropic's.
    pub authorization: String,
    /// Name of that env var (for messages).
    pub api_key_env: String,
    /// `:authority` to send, if set.
    pub authority: Option<String>,
    /// Prefix added to the request path (e.g. `/openai` for a relay mounted under a path).
    pub path_prefix: String,
    /// Extra headers sent to this provider.
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("cluster", &self.cluster)
            .field("api", &self.api)
            .field("api_key_env", &self.api_key_env)
            .field("authority", &self.authority)
            .field("path_prefix", &self.path_prefix)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// The header that carries the provider key, and its value.
    pub fn credential(&self) -> (&'static str, &str) {
        (credential_header(self.api), &self.authorization)
    }
}

/// The header a provider of this API expects its key in: `authorization` (`Bearer <key>`) for
/// OpenAI's API, `x-api-key` for Anthropic's.
pub fn credential_header(api: Api) -> &'static str {
    match api {
        Api::OpenAi => "authorization",
        Api::Anthropic => "x-api-key",
    }
}

/// A provider a rule sends to, and the model name that provider gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The provider.
    pub provider: ProviderId,
    /// Model name sent to it; `None` keeps the client's name.
    pub model: Option<String>,
}

/// A model rule: which models it matches and the providers, in fallback order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What it matches.
    pub pattern: Pattern,
    /// Providers in order: the first serves, the next ones are fallbacks.
    pub targets: Vec<Target>,
}

/// Compiled routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Providers in configuration order.
    pub providers: Vec<Provider>,
    /// Rules in configuration order; exact names win over globs, then first match wins.
    pub rules: Vec<Rule>,
    /// Provider for requests outside the model endpoints, if any.
    pub default_provider: Option<ProviderId>,
    /// Largest request body read for routing.
    pub max_body_bytes: usize,
}

/// Header carrying the chosen route (`r<rule index>` or `default`) to Envoy's route table and to
/// the upstream filter instances.
pub const ROUTE_HEADER: &str = "x-tollgate-route";

/// Value of `x-tollgate-route` for requests to the default provider.
pub const DEFAULT_ROUTE: &str = "default";

impl Routing {
    /// The rule serving `model`: an exact rule if any, else the first glob that matches.
    pub fn rule_for(&self, model: &str) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| !r.pattern.is_glob() && r.pattern.matches(model))
            .or_else(|| self.rules.iter().position(|r| r.pattern.matches(model)))
    }

    /// The API a rule's providers speak (the configuration makes them all speak the same).
    pub fn rule_api(&self, rule: usize) -> Api {
        self.rules
            .get(rule)
            .and_then(|r| r.targets.first())
            .and_then(|t| self.providers.get(t.provider))
            .map_or(Api::OpenAi, |p| p.api)
    }

    /// The provider with this name.
    pub fn provider_named(&self, name: &str) -> Option<ProviderId> {
        self.providers.iter().position(|p| p.name == name)
    }

    /// The route id of a rule, as sent in `x-tollgate-route` and matched by Envoy's routes.
    pub fn route_id(rule: usize) -> String {
        let mut id = String::with_capacity(4);
        id.push('r');
        push_decimal(&mut id, rule as u64);
        id
    }

    /// The rule of a route id.
    pub fn rule_of_route(&self, route: &str) -> Option<usize> {
        let i: usize = route.strip_prefix('r')?.parse().ok()?;
        (i < self.rules.len()).then_some(i)
    }
}

/// Whether a client's allow-list (`None`: everything) permits `model`.
pub fn allowed(allow: Option<&[Pattern]>, model: &str) -> bool {
    allow.is_none_or(|list| list.iter().any(|p| p.matches(model)))
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

/// `GET /v1/models/{id}` for a client: the model object, if `id` is an exact model name of a
/// rule the client may use (`None`: answer 404, as for an unknown model).
pub fn model_object(routing: &Routing, allow: Option<&[Pattern]>, id: &str) -> Option<String> {
    let rule = routing
        .rules
        .iter()
        .find(|r| !r.pattern.is_glob() && r.pattern.as_str() == id && allowed(allow, id))?;
    let owned_by = rule
        .targets
        .first()
        .and_then(|t| routing.providers.get(t.provider))
        .map_or("tollgate", |p| p.name.as_str());
    serde_json::to_string(&ModelEntry {
        id: rule.pattern.as_str(),
        object: "model",
        created: 0,
        owned_by,
    })
    .ok()
}

/// `GET /v1/models` for a client: every exact model name of the rules that the client may use,
/// in OpenAI's list format. Glob rules cannot be listed (they name families, not models).
pub fn models_list(routing: &Routing, allow: Option<&[Pattern]>) -> String {
    let mut data: Vec<ModelEntry<'_>> = Vec::new();
    for rule in &routing.rules {
        let id = rule.pattern.as_str();
        if rule.pattern.is_glob() || !allowed(allow, id) || data.iter().any(|m| m.id == id) {
            continue;
        }
        let owned_by = rule
            .targets
            .first()
            .and_then(|t| routing.providers.get(t.provider))
            .map_or("tollgate", |p| p.name.as_str());
        data.push(ModelEntry {
            id,
            object: "model",
            created: 0,
            owned_by,
        });
    }
    serde_json::to_string(&ModelList {
        object: "list",
        data,
    })
    .unwrap_or_else(|_| r#"{"object":"list","data":[]}"#.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn globs() {
        let m = |p: &str, n: &str| Pattern::new(p).matches(n);
        assert!(m("gpt-4.1", "gpt-4.1"));
        assert!(!m("gpt-4.1", "gpt-4.1-mini"));
        assert!(m("gpt-4*", "gpt-4.1-mini"));
        assert!(m("gpt-4*", "gpt-4"));
        assert!(m("*", ""));
        assert!(m("claude-?-opus", "claude-3-opus"));
        assert!(!m("claude-?-opus", "claude-35-opus"));
        assert!(m("*-mini", "gpt-4o-mini"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(m("**", "x"));
        assert!(!m("", "x"));
    }

    /// Fuzz target glob (fuzz/seeds/glob/question-mark-multibyte): `?` matched one byte.
    #[test]
    fn question_mark_is_one_character() {
        let m = |p: &str, n: &str| Pattern::new(p).matches(n);
        assert!(m("?", "\u{e9}"));
        assert!(m("mod\u{e8}le-?", "mod\u{e8}le-\u{1F600}"));
        assert!(!m("??", "\u{e9}"));
        assert!(m("*-?", "\u{e9}-\u{e9}"));
        assert!(!m("a?", "a\u{e9}\u{e9}"));
    }

    #[test]
    fn hostile_names_are_linear() {
        let name = "a".repeat(10_000);
        assert!(!Pattern::new("*a*a*a*a*a*a*b").matches(&name));
    }

    proptest! {
        #[test]
        fn star_matches_everything(name in "\\PC{0,40}") {
            prop_assert!(Pattern::new("*").matches(&name));
            let exact = Pattern::new(&name);
            prop_assert!(exact.matches(&name));
        }

        #[test]
        fn prefix_globs(prefix in "[a-z0-9.-]{0,10}", rest in "[a-z0-9.-]{0,10}") {
            let joined = format!("{prefix}{rest}");
            let glob = format!("{prefix}*");
            prop_assert!(Pattern::new(&glob).matches(&joined));
        }
    }
}

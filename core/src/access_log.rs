//! What Tollgate tells Envoy's access log about a request: one plain string property per field
//! (filter state `wasm.tollgate_client`, `wasm.tollgate_outcome`, ...), each read by the log
//! format as `%FILTER_STATE(wasm.tollgate_<field>:PLAIN)%` into a top-level field of the same
//! name (`client`, `outcome`, ...).
//!
//! Only the fields a request has are set, each once (a field is set again only if its value
//! changes), so an admitted request costs one host call per field it carries. Plain strings are
//! what Envoy's formatter copies out as they are: a `TYPED` property (a `google.protobuf.Struct`,
//! tried for issue #22) is converted to JSON and back on every line, and setting one cost Envoy
//! more besides (docs/benchmark.md).
//!
//! Every field is a configured name, a fixed word, a number, or the `model` the client asked
//! for (bounded to [`MAX_MODEL_CHARS`]); never a key. `docs/metrics.md#access-log` lists them.

use std::borrow::Cow;

/// A requested model longer than this is logged cut to this many characters.
pub const MAX_MODEL_CHARS: usize = 128;

/// The log's field names, each set as the property `tollgate_<field>` ([`PROPERTIES`]).
pub const FIELDS: [&str; 10] = [
    "client",
    "model",
    "outcome",
    "reason",
    "cache",
    "limiter_error",
    "prompt_tokens",
    "completion_tokens",
    "provider",
    "cost_micros",
];

/// The property of each of [`FIELDS`] (filter state `wasm.<property>`).
pub const PROPERTIES: [&str; 10] = [
    "tollgate_client",
    "tollgate_model",
    "tollgate_outcome",
    "tollgate_reason",
    "tollgate_cache",
    "tollgate_limiter_error",
    "tollgate_prompt_tokens",
    "tollgate_completion_tokens",
    "tollgate_provider",
    "tollgate_cost_micros",
];

/// What the access log records about one request. `None` fields are not set (logged `null`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The client's name (a valid key only).
    pub client: Option<String>,
    /// The model the client asked for (once the body was read).
    pub model: Option<String>,
    /// The `outcome` label of `tollgate_requests_total`.
    pub outcome: Option<&'static str>,
    /// Why Tollgate answered itself: which limit refused, or which error (`ErrorKind::reason`).
    pub reason: Option<&'static str>,
    /// `hit`, `miss` or `bypass`, when the response cache applies.
    pub cache: Option<&'static str>,
    /// A limiter failure that its failure policy handled (`redis:timeout`, `local:contention`).
    pub limiter_error: Option<String>,
    /// Tokens the provider reported.
    pub prompt_tokens: Option<u64>,
    /// Tokens the provider reported.
    pub completion_tokens: Option<u64>,
    /// The provider that gave the answer (its last attempt; routed mode).
    pub provider: Option<String>,
    /// What the request was charged, in micro-units of the configured currency (priced models).
    pub cost_micros: Option<u64>,
}

impl Record {
    /// Each field's value as logged, in [`FIELDS`] order.
    pub fn values(&self) -> [Option<Cow<'_, str>>; 10] {
        fn text(v: Option<&str>) -> Option<Cow<'_, str>> {
            v.map(Cow::Borrowed)
        }
        fn number(n: Option<u64>) -> Option<Cow<'static, str>> {
            n.map(|n| Cow::Owned(n.to_string()))
        }
        [
            text(self.client.as_deref()),
            text(self.model.as_deref()),
            text(self.outcome),
            text(self.reason),
            text(self.cache),
            text(self.limiter_error.as_deref()),
            number(self.prompt_tokens),
            number(self.completion_tokens),
            text(self.provider.as_deref()),
            number(self.cost_micros),
        ]
    }

    /// The properties to set so that the log shows `self` where it holds `logged`: (property,
    /// value) of every field that has a value `logged` does not have.
    pub fn changes(&self, logged: &Record) -> Vec<(&'static str, Cow<'_, str>)> {
        self.values()
            .into_iter()
            .zip(logged.values())
            .zip(PROPERTIES)
            .filter_map(|((now, before), property)| match now {
                Some(v) if before.as_deref() != Some(&*v) => Some((property, v)),
                _ => None,
            })
            .collect()
    }
}

/// The requested model as logged: at most [`MAX_MODEL_CHARS`] characters.
pub fn model(requested: &str) -> String {
    requested.chars().take(MAX_MODEL_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(changes: &[(&'static str, Cow<'_, str>)]) -> Vec<(&'static str, String)> {
        changes.iter().map(|(p, v)| (*p, v.to_string())).collect()
    }

    #[test]
    fn only_fields_with_a_value_are_set() {
        let r = Record {
            client: Some("team-a".into()),
            model: Some("gpt-4.1".into()),
            outcome: Some("admitted"),
            cache: Some("miss"),
            prompt_tokens: Some(300),
            completion_tokens: Some(0),
            ..Record::default()
        };
        assert_eq!(
            shown(&r.changes(&Record::default())),
            [
                ("tollgate_client", "team-a".into()),
                ("tollgate_model", "gpt-4.1".into()),
                ("tollgate_outcome", "admitted".into()),
                ("tollgate_cache", "miss".into()),
                ("tollgate_prompt_tokens", "300".into()),
                ("tollgate_completion_tokens", "0".into()),
            ]
        );
        assert!(Record::default().changes(&Record::default()).is_empty());
    }

    #[test]
    fn a_field_already_logged_is_not_set_again_unless_it_changed() {
        let decided = Record {
            client: Some("team-a".into()),
            outcome: Some("admitted"),
            ..Record::default()
        };
        let used = Record {
            prompt_tokens: Some(7),
            completion_tokens: Some(5),
            ..decided.clone()
        };
        assert_eq!(
            shown(&used.changes(&decided)),
            [
                ("tollgate_prompt_tokens", "7".into()),
                ("tollgate_completion_tokens", "5".into()),
            ]
        );
        let failed = Record {
            outcome: Some("error"),
            ..decided.clone()
        };
        assert_eq!(
            shown(&failed.changes(&decided)),
            [("tollgate_outcome", "error".into())]
        );
    }

    #[test]
    fn properties_are_the_fields_prefixed() {
        for (field, property) in FIELDS.iter().zip(PROPERTIES) {
            assert_eq!(property, format!("tollgate_{field}"));
        }
        assert_eq!(model(&"m".repeat(200)), "m".repeat(128));
        assert_eq!(model("gpt-ü"), "gpt-ü");
    }
}

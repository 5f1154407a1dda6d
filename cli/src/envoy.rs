//! Finding Tollgate's plugin configurations in an Envoy bootstrap (YAML or JSON).
//!
//! Envoy hands the wasm filter the string in `typed_config.config.configuration.value`
//! (a `google.protobuf.StringValue`), with an environment made of the variables listed in
//! `vm_config.environment_variables.host_env_keys` (taken from Envoy's own environment) and the
//! literal `key_values`. This module extracts exactly those, for every wasm HTTP filter of every
//! HTTP connection manager in `static_resources.listeners`, and every upstream wasm HTTP filter of
//! `static_resources.clusters` (model routing runs one in each provider's cluster).
//!
//! The YAML is read as Envoy reads it, not as strictly as YAML 1.2 would: a key given twice in a
//! mapping is not an error, the last one wins (a warning says where), and only the first document
//! of the stream counts.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const WASM_NAME: &str = "envoy.filters.http.wasm";
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const TYPED_STRUCT_TYPES: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];
const UPSTREAM_HTTP_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// One wasm HTTP filter of the bootstrap and what its plugin would be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmFilter {
    /// Where it is, as a path under `static_resources` (leaving out `typed_config` and the
    /// protocol options' key), with the listener's or cluster's name and the plugin's.
    pub location: String,
    /// The plugin configuration string, or why Envoy would not hand the filter a JSON string.
    pub configuration: Result<String, String>,
    /// `vm_config.environment_variables.host_env_keys`.
    pub host_env_keys: Vec<String>,
    /// `vm_config.environment_variables.key_values`.
    pub key_values: Vec<(String, String)>,
}

/// What `config check` needs from a bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bootstrap {
    /// Every wasm HTTP filter, in document order.
    pub wasm_filters: Vec<WasmFilter>,
    /// Names of `static_resources.clusters`.
    pub clusters: Vec<String>,
    /// True when clusters may also come from CDS (`dynamic_resources.cds_config`).
    pub dynamic_clusters: bool,
    /// What Envoy accepts but is probably a mistake (duplicate keys).
    pub warnings: Vec<String>,
    /// The `kind` of a Kubernetes manifest (`WasmPlugin`, `EnvoyFilter`, ...), which is not a
    /// bootstrap.
    pub kubernetes_kind: Option<String>,
}

/// Parses a bootstrap and finds its wasm filters.
pub fn parse(text: &str) -> Result<Bootstrap, String> {
    let (root, duplicates) = load(text)?;
    let root = Some(&root);
    let mut out = Bootstrap {
        dynamic_clusters: get(get(root, "dynamic_resources"), "cds_config").is_some(),
        warnings: duplicates,
        kubernetes_kind: get(root, "apiVersion")
            .and(text_of(get(root, "kind")))
            .map(String::from),
        ..Bootstrap::default()
    };
    let statics = get(root, "static_resources");
    let clusters = items(get(statics, "clusters"));
    for cluster in clusters {
        if let Some(name) = text_of(get(Some(cluster), "name")) {
            out.clusters.push(name.to_string());
        }
    }
    for (l, listener) in items(get(statics, "listeners")).iter().enumerate() {
        let listener = Some(listener);
        let listener_name = text_of(get(listener, "name")).unwrap_or("");
        let at = format!("listeners[{l}]");
        let mut chains: Vec<(String, &Node)> = items(get(listener, "filter_chains"))
            .iter()
            .enumerate()
            .map(|(c, chain)| (format!("{at}.filter_chains[{c}]"), chain))
            .collect();
        if let Some(default_chain) = get(listener, "default_filter_chain") {
            chains.push((format!("{at}.default_filter_chain"), default_chain));
        }
        for (chain_at, chain) in chains {
            for (f, filter) in items(get(Some(chain), "filters")).iter().enumerate() {
                if !is_filter(filter, HCM_NAME, HCM_TYPE) {
                    continue;
                }
                let hcm = get(Some(filter), "typed_config");
                for (h, http_filter) in items(get(hcm, "http_filters")).iter().enumerate() {
                    if !is_filter(http_filter, WASM_NAME, WASM_TYPE)
                        && wasm_in_typed_struct(http_filter).is_none()
                    {
                        continue;
                    }
                    let path = format!("{chain_at}.filters[{f}].http_filters[{h}]");
                    let owner = format!("listener {listener_name:?}");
                    out.wasm_filters
                        .push(wasm_filter(http_filter, path, &owner));
                }
            }
        }
    }
    for (c, cluster) in clusters.iter().enumerate() {
        let cluster_name = text_of(get(Some(cluster), "name")).unwrap_or("");
        let Some(Node::Map(options)) = get(Some(cluster), "typed_extension_protocol_options")
        else {
            continue;
        };
        for (_, opts) in options {
            if text_of(get(Some(opts), "@type")) != Some(UPSTREAM_HTTP_OPTIONS_TYPE) {
                continue;
            }
            for (h, http_filter) in items(get(Some(opts), "http_filters")).iter().enumerate() {
                if !is_filter(http_filter, WASM_NAME, WASM_TYPE)
                    && wasm_in_typed_struct(http_filter).is_none()
                {
                    continue;
                }
                let path = format!("clusters[{c}] upstream http_filters[{h}]");
                let owner = format!("cluster {cluster_name:?}");
                out.wasm_filters
                    .push(wasm_filter(http_filter, path, &owner));
            }
        }
    }
    Ok(out)
}

fn wasm_filter(http_filter: &Node, path: String, owner: &str) -> WasmFilter {
    let config = match wasm_in_typed_struct(http_filter) {
        Some(wasm) => get(Some(wasm), "config"),
        None => get(get(Some(http_filter), "typed_config"), "config"),
    };
    let plugin_name = text_of(get(config, "name")).unwrap_or("");
    let location = format!("{path} ({owner}, plugin {plugin_name:?})");
    let env = get(get(config, "vm_config"), "environment_variables");
    let host_env_keys = items(get(env, "host_env_keys"))
        .iter()
        .filter_map(|k| text_of(Some(k)).map(String::from))
        .collect();
    let key_values = match get(env, "key_values") {
        Some(Node::Map(entries)) => entries
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), text_of(Some(v))?.to_string())))
            .collect(),
        _ => Vec::new(),
    };
    WasmFilter {
        location,
        configuration: configuration(get(config, "configuration")),
        host_env_keys,
        key_values,
    }
}

/// The string Envoy gives the plugin from `configuration` (an `Any`).
fn configuration(any: Option<&Node>) -> Result<String, String> {
    if matches!(any, None | Some(Node::Null)) {
        // No configuration: the plugin gets an empty one.
        return Ok(String::new());
    }
    match text_of(get(any, "@type")) {
        Some(STRING_VALUE_TYPE) => {}
        Some(other) => {
            return Err(format!(
                "configuration is a {other:?}; Tollgate reads its JSON from a \
                 \"@type\": {STRING_VALUE_TYPE:?} whose `value` is the JSON text"
            ))
        }
        None => {
            return Err(format!(
                "configuration has no \"@type\"; Tollgate reads its JSON from a \
                 \"@type\": {STRING_VALUE_TYPE:?} whose `value` is the JSON text"
            ))
        }
    }
    match get(any, "value") {
        None | Some(Node::Null) => Ok(String::new()),
        Some(Node::Text(s)) => Ok(s.clone()),
        Some(_) => Err(
            "configuration.value must be a string holding the JSON (e.g. a YAML `|` block), \
             not a YAML structure"
                .into(),
        ),
    }
}

/// The `Wasm` message inside a `TypedStruct` (how Istio's EnvoyFilter writes it), if this filter
/// is one.
fn wasm_in_typed_struct(http_filter: &Node) -> Option<&Node> {
    let typed = get(Some(http_filter), "typed_config");
    let ty = text_of(get(typed, "@type"))?;
    let url = text_of(get(typed, "type_url"))?;
    if TYPED_STRUCT_TYPES.contains(&ty) && url == WASM_TYPE {
        get(typed, "value")
    } else {
        None
    }
}

/// A filter is identified by its typed config's type, or by its well-known name.
fn is_filter(filter: &Node, name: &str, type_url: &str) -> bool {
    let filter = Some(filter);
    match text_of(get(get(filter, "typed_config"), "@type")) {
        Some(t) => t == type_url,
        None => text_of(get(filter, "name")) == Some(name),
    }
}

// ---------------------------------------------------------------------------------------------
// YAML, as Envoy reads it.

/// A YAML node. Scalars stay text: every field read here is a string in Envoy's protos.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// `~`, `null` or nothing.
    Null,
    /// Any other scalar.
    Text(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping with text keys, each once (the last of duplicates).
    Map(Vec<(String, Node)>),
}

/// `node[key]`, if `node` is a mapping that has it.
fn get<'a>(node: Option<&'a Node>, key: &str) -> Option<&'a Node> {
    match node? {
        Node::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    }
}

/// The items of a sequence; none when absent or not a sequence.
fn items(node: Option<&Node>) -> &[Node] {
    match node {
        Some(Node::Seq(items)) => items,
        _ => &[],
    }
}

/// The text of a scalar.
fn text_of(node: Option<&Node>) -> Option<&str> {
    match node? {
        Node::Text(s) => Some(s),
        _ => None,
    }
}

/// Deeper nesting than this is not an Envoy bootstrap (and would exhaust the stack on drop).
const MAX_DEPTH: usize = 256;

/// Loads the first document of `text`; also returns a warning per duplicated key.
fn load(text: &str) -> Result<(Node, Vec<String>), String> {
    let mut builder = Builder::default();
    Parser::new_from_str(text)
        .load(&mut builder, true)
        .map_err(|e| format!("not valid YAML: {e}"))?;
    if let Some(e) = builder.error {
        return Err(e);
    }
    let root = builder.docs.into_iter().next().unwrap_or(Node::Null);
    Ok((root, builder.duplicates))
}

/// An open collection while its events arrive.
enum Frame {
    Seq(Vec<Node>, usize),
    /// Entries, the key waiting for its value (`None`: the next node is a key), anchor id.
    Map(Vec<(String, Node)>, Option<Key>, usize),
}

/// A mapping key waiting for its value: its text (`None` for a non-scalar key, which names no
/// field) and its line.
struct Key {
    text: Option<String>,
    line: usize,
}

/// Builds [`Node`]s from parser events.
#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<Node>,
    anchors: HashMap<usize, Node>,
    duplicates: Vec<String>,
    error: Option<String>,
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::Scalar(v, style, anchor, _) => {
                let null = style == TScalarStyle::Plain && matches!(v.as_str(), "" | "~" | "null");
                let node = if null { Node::Null } else { Node::Text(v) };
                self.complete(node, anchor, mark);
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or(Node::Null);
                self.complete(node, 0, mark);
            }
            Event::SequenceStart(anchor, _) => self.open(Frame::Seq(Vec::new(), anchor), mark),
            Event::MappingStart(anchor, _) => {
                self.open(Frame::Map(Vec::new(), None, anchor), mark);
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Seq(items, anchor)) => self.complete(Node::Seq(items), anchor, mark),
                Some(Frame::Map(entries, _, anchor)) => {
                    self.complete(Node::Map(entries), anchor, mark);
                }
                None => {}
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

impl Builder {
    fn open(&mut self, frame: Frame, mark: Marker) {
        if self.stack.len() >= MAX_DEPTH {
            self.error = Some(format!(
                "not an Envoy bootstrap: nested deeper than {MAX_DEPTH} levels at line {}",
                mark.line()
            ));
            return;
        }
        self.stack.push(frame);
    }

    fn complete(&mut self, node: Node, anchor: usize, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq(items, _)) => items.push(node),
            Some(Frame::Map(_, pending @ None, _)) => {
                // A key: only scalar keys name fields.
                let text = match node {
                    Node::Text(k) => Some(k),
                    Node::Null => Some(String::new()),
                    _ => None,
                };
                *pending = Some(Key {
                    text,
                    line: mark.line(),
                });
            }
            Some(Frame::Map(entries, pending @ Some(_), _)) => {
                let Some(Key {
                    text: Some(key),
                    line,
                }) = pending.take()
                else {
                    return;
                };
                match entries.iter_mut().find(|(k, _)| *k == key) {
                    Some(entry) => {
                        self.duplicates.push(format!(
                            "key {key:?} appears twice in one mapping (again on line {line}); \
                             Envoy uses the last one"
                        ));
                        entry.1 = node;
                    }
                    None => entries.push((key, node)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_LISTENERS: &str = r#"
static_resources:
  clusters:
  - name: provider
  - name: webdis
  listeners:
  - name: a
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          http_filters:
          - name: envoy.filters.http.router
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: tollgate
                vm_config:
                  environment_variables:
                    host_env_keys: [K1, K2]
                    key_values: { LITERAL: "x", N: 3 }
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
                    {"clients": []}
  - name: b
    default_filter_chain:
      filters:
      - name: hcm-with-a-custom-name
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          http_filters:
          - name: my-wasm
            typed_config:
              "@type": type.googleapis.com/udpa.type.v1.TypedStruct
              type_url: type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              value:
                config:
                  name: other
                  configuration:
                    "@type": type.googleapis.com/google.protobuf.BytesValue
                    value: e30=
"#;

    #[test]
    fn finds_every_wasm_filter_with_its_environment() {
        let b = parse(TWO_LISTENERS).unwrap();
        assert_eq!(b.clusters, ["provider", "webdis"]);
        assert!(!b.dynamic_clusters);
        assert_eq!(b.wasm_filters.len(), 2);
        let first = &b.wasm_filters[0];
        assert_eq!(
            first.location,
            "listeners[0].filter_chains[0].filters[0].http_filters[1] (listener \"a\", plugin \
             \"tollgate\")"
        );
        assert_eq!(first.configuration.as_deref(), Ok("{\"clients\": []}\n"));
        assert_eq!(first.host_env_keys, ["K1", "K2"]);
        assert_eq!(
            first.key_values,
            [("LITERAL".into(), "x".into()), ("N".into(), "3".into())]
        );
        let second = &b.wasm_filters[1];
        assert!(second
            .location
            .starts_with("listeners[1].default_filter_chain.filters[0]"));
        let e = second.configuration.as_ref().unwrap_err();
        assert!(e.contains("BytesValue"), "{e}");
    }

    #[test]
    fn configuration_shapes() {
        let doc = |configuration: &str| {
            format!(
                "static_resources:\n  listeners:\n  - filter_chains:\n    - filters:\n      - name: \
                 envoy.filters.network.http_connection_manager\n        typed_config:\n          \
                 http_filters:\n          - name: envoy.filters.http.wasm\n            typed_config:\n              \
                 config:\n                {configuration}\n"
            )
        };
        let one = |c: &str| {
            parse(&doc(c)).unwrap().wasm_filters[0]
                .configuration
                .clone()
        };
        assert_eq!(one("name: no-configuration"), Ok(String::new()));
        assert_eq!(
            one(
                r#"configuration: {"@type": type.googleapis.com/google.protobuf.StringValue, value: '{"a":1}'}"#
            ),
            Ok(r#"{"a":1}"#.to_string())
        );
        let e = one(r#"configuration: {"@type": type.googleapis.com/google.protobuf.StringValue, value: {clients: []}}"#)
            .unwrap_err();
        assert!(e.starts_with("configuration.value must be a string"), "{e}");
        let e = one("configuration: {value: x}").unwrap_err();
        assert!(e.starts_with("configuration has no \"@type\""), "{e}");
    }

    #[test]
    fn json_bootstraps_and_broken_yaml() {
        let b = parse(r#"{"static_resources": {"clusters": [{"name": "c"}]}, "dynamic_resources": {"cds_config": {}}}"#).unwrap();
        assert_eq!(b.clusters, ["c"]);
        assert!(b.dynamic_clusters);
        assert!(b.wasm_filters.is_empty());
        assert_eq!(parse("").unwrap(), Bootstrap::default());
        let k8s = parse("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n").unwrap();
        assert_eq!(k8s.kubernetes_kind.as_deref(), Some("WasmPlugin"));
        let e = parse("a: [b").unwrap_err();
        assert!(e.starts_with("not valid YAML: "), "{e}");
    }

    #[test]
    fn yaml_is_read_as_envoy_reads_it() {
        // Duplicate keys: the last wins, with a warning naming the line.
        let (root, dups) = load("a: 1\nb: {c: 2}\na: 3\n").unwrap();
        assert_eq!(text_of(get(Some(&root), "a")), Some("3"));
        assert_eq!(text_of(get(get(Some(&root), "b"), "c")), Some("2"));
        assert_eq!(dups.len(), 1, "{dups:?}");
        assert!(
            dups[0].contains("\"a\" appears twice") && dups[0].contains("line 3"),
            "{dups:?}"
        );
        // Anchors and aliases.
        let (root, _) = load("x: &k [A, B]\ny: *k\n").unwrap();
        assert_eq!(
            get(Some(&root), "y"),
            Some(&Node::Seq(vec![
                Node::Text("A".into()),
                Node::Text("B".into())
            ]))
        );
        // Nulls, quoted nulls, and only the first document.
        let (root, _) = load("n: ~\nq: 'null'\ne:\n---\nn: 1\n").unwrap();
        assert_eq!(get(Some(&root), "n"), Some(&Node::Null));
        assert_eq!(text_of(get(Some(&root), "q")), Some("null"));
        assert_eq!(get(Some(&root), "e"), Some(&Node::Null));
        // Absurd nesting is refused, not overflowed.
        let deep = "- ".repeat(MAX_DEPTH + 1) + "x";
        assert!(load(&deep).unwrap_err().contains("nested deeper"));
    }
}

//! What Tollgate tells Envoy's access log about a request: one record, set as one stream property
//! (filter state `wasm.tollgate`), read by the access log as
//! `%FILTER_STATE(wasm.tollgate:TYPED)%`.
//!
//! The property is declared once per VM (proxy-wasm's `declare_property` foreign function) as a
//! protobuf value of type `google.protobuf.Struct`, so Envoy's JSON access log writes it as a
//! nested object with typed fields (numbers stay numbers), and CEL (`%CEL(...)%`, the OTLP
//! example) reads single fields from it. Without the declaration (an Envoy without the foreign
//! function) the property is plain bytes: the log still shows it, base64-encoded.
//!
//! Every field is a configured name, a fixed word, a number, or the `model` the client asked
//! for (bounded to [`MAX_MODEL_CHARS`]); never a key. `docs/metrics.md#access-log` lists them.

/// The property's name (filter state `wasm.tollgate`).
pub const PROPERTY: &str = "tollgate";

/// The property's protobuf type (the schema given to `declare_property`).
pub const SCHEMA: &str = "type.googleapis.com/google.protobuf.Struct";

/// A requested model longer than this is logged cut to this many characters.
pub const MAX_MODEL_CHARS: usize = 128;

/// What the access log records about one request. `None` fields are left out.
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
}

impl Record {
    /// The record as a serialized `google.protobuf.Struct`.
    pub fn to_struct(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        let strings = [
            ("client", self.client.as_deref()),
            ("model", self.model.as_deref()),
            ("outcome", self.outcome),
            ("reason", self.reason),
            ("cache", self.cache),
            ("limiter_error", self.limiter_error.as_deref()),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                field(&mut out, key, &string_value(v));
            }
        }
        for (key, value) in [
            ("prompt_tokens", self.prompt_tokens),
            ("completion_tokens", self.completion_tokens),
        ] {
            if let Some(n) = value {
                field(&mut out, key, &number_value(n));
            }
        }
        out
    }
}

/// The requested model as logged: at most [`MAX_MODEL_CHARS`] characters.
pub fn model(requested: &str) -> String {
    requested.chars().take(MAX_MODEL_CHARS).collect()
}

/// The arguments of Envoy's `declare_property` foreign function
/// (`envoy.source.extensions.common.wasm.DeclarePropertyArguments`): [`PROPERTY`], writable,
/// type protobuf ([`SCHEMA`]), living as long as the downstream request.
pub fn declare_arguments() -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, PROPERTY.as_bytes()); // name
    varint_field(&mut out, 3, 3); // type: Protobuf
    bytes_field(&mut out, 4, SCHEMA.as_bytes()); // schema
    varint_field(&mut out, 5, 1); // span: DownstreamRequest
    out
}

// Protobuf wire format, the little of it a Struct needs: `Struct.fields` (1) is a map, i.e.
// repeated entries {key (1): string, value (2): Value}; `Value.number_value` is 2 (double),
// `Value.string_value` is 3.

fn field(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let mut entry = Vec::with_capacity(key.len() + value.len() + 4);
    bytes_field(&mut entry, 1, key.as_bytes());
    bytes_field(&mut entry, 2, value);
    bytes_field(out, 1, &entry);
}

fn string_value(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 2);
    bytes_field(&mut v, 3, s.as_bytes());
    v
}

fn number_value(n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(2 << 3 | 1); // field 2, 64-bit
                        // Token counts are far below 2^53: exact as a double.
    v.extend_from_slice(&(n as f64).to_le_bytes());
    v
}

fn bytes_field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    varint(out, number << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_field(out: &mut Vec<u8>, number: u64, value: u64) {
    varint(out, number << 3);
    varint(out, value);
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal Struct reader for the tests: (key, string or number) pairs.
    fn read(mut b: &[u8]) -> Vec<(String, String)> {
        fn varint(b: &mut &[u8]) -> u64 {
            let (mut n, mut shift) = (0u64, 0);
            loop {
                let byte = b[0];
                *b = &b[1..];
                n |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    return n;
                }
                shift += 7;
            }
        }
        fn len_delimited<'a>(b: &mut &'a [u8], tag: u64) -> &'a [u8] {
            assert_eq!(varint(b), tag);
            let n = varint(b) as usize;
            let (head, rest) = b.split_at(n);
            *b = rest;
            head
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let mut entry = len_delimited(&mut b, 1 << 3 | 2);
            let key = String::from_utf8(len_delimited(&mut entry, 1 << 3 | 2).to_vec()).unwrap();
            let mut value = len_delimited(&mut entry, 2 << 3 | 2);
            let shown = match value[0] {
                0x11 => f64::from_le_bytes(value[1..9].try_into().unwrap()).to_string(),
                _ => String::from_utf8(len_delimited(&mut value, 3 << 3 | 2).to_vec()).unwrap(),
            };
            out.push((key, shown));
        }
        out
    }

    #[test]
    fn a_record_is_a_struct_of_its_set_fields() {
        let r = Record {
            client: Some("team-a".into()),
            model: Some("gpt-4.1".into()),
            outcome: Some("admitted"),
            cache: Some("miss"),
            prompt_tokens: Some(300),
            completion_tokens: Some(0),
            ..Record::default()
        };
        let fields = read(&r.to_struct());
        let pairs: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("client", "team-a"),
                ("model", "gpt-4.1"),
                ("outcome", "admitted"),
                ("cache", "miss"),
                ("prompt_tokens", "300"),
                ("completion_tokens", "0"),
            ]
        );
        assert!(Record::default().to_struct().is_empty());
    }

    #[test]
    fn long_strings_get_multibyte_lengths() {
        let long = "m".repeat(200);
        let r = Record {
            model: Some(model(&long)),
            ..Record::default()
        };
        assert_eq!(read(&r.to_struct()), [("model".into(), "m".repeat(128))]);
        assert_eq!(model("gpt-ü"), "gpt-ü");
    }

    #[test]
    fn declare_arguments_encode_the_struct_property() {
        let a = declare_arguments();
        assert_eq!(&a[..10], b"\x0a\x08tollgate");
        assert_eq!(&a[10..12], [0x18, 3]);
        assert_eq!(a[12], 0x22);
        assert_eq!(usize::from(a[13]), SCHEMA.len());
        assert_eq!(&a[14..14 + SCHEMA.len()], SCHEMA.as_bytes());
        assert_eq!(&a[14 + SCHEMA.len()..], [0x28, 1]);
    }
}

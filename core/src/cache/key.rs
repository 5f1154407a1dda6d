//! The key.

use std::fmt::Write as _;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::*;

/// A cache key: the SHA-256 of everything that determines the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Lowercase hex.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// The local set this key lives in.
    pub(super) fn set(&self, layout: &LocalLayout) -> u32 {
        let [a, b, c, d, ..] = self.0;
        u32::from_le_bytes([a, b, c, d]) % (layout.slots / WAYS).max(1)
    }
}

/// The key of a request: `scope` (`client:<name>` or `shared`), the request path, the model
/// part (each provider of the rule with the model name it receives, in order) and the
/// canonical body without its top-level `model` (the model part says what the providers get,
/// so an alias and the model it names share entries when they route the same way), and the
/// forwarded headers that can change the answer (`varying`, sorted; see
/// [`crate::forwarding::varying`]).
pub fn key(
    scope: &str,
    path: &str,
    model: &str,
    canonical_body: &[u8],
    varying: &[(Vec<u8>, Vec<u8>)],
) -> Key {
    let mut h = Sha256::new();
    h.update(b"tollgate-cache-v2");
    for part in [
        scope.as_bytes(),
        path.as_bytes(),
        model.as_bytes(),
        canonical_body,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update((varying.len() as u64).to_le_bytes());
    for (name, value) in varying {
        for part in [name, value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    Key(h.finalize().into())
}

/// A JSON value in canonical form: object members sorted by key (byte order of their UTF-8),
/// no whitespace, strings escaped one way (serde_json's), numbers normalised so that `0`,
/// `0.0`, `-0.0` and `0e5` are all `0`, `1.50` is `1.5` and `1e2` is `100`.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out.into_bytes()
}

pub(super) fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
    }
}

pub(super) fn write_string(s: &str, out: &mut String) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serialising a str cannot fail; keep the output distinct if it ever did.
        Err(_) => out.push_str("\"\u{fffd}\""),
    }
}

/// Integers print as integers; a float with no fractional part (and exactly representable)
/// prints as the integer; other floats in their shortest round-trip form.
pub(super) fn write_number(n: &serde_json::Number, out: &mut String) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        if f == 0.0 {
            out.push('0');
        } else if f.fract() == 0.0 && f.abs() < EXACT {
            let _ = write!(out, "{}", f as i64);
        } else {
            out.push_str(
                &serde_json::Number::from_f64(f).map_or_else(|| "0".into(), |n| n.to_string()),
            );
        }
    }
}

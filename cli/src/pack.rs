//! `tollgate keys pack FILE`: JSON clients packed into a `key_set`, the compact form of a large
//! key set (see docs/keys.md, "Large key sets").
//!
//! Operators keep their clients as JSON (their source of truth); this makes the block the filter
//! reads in a fraction of the time and memory. Every client is checked with the core's parser as
//! JSON first (so an error names `clients[i]` of FILE), and the result is checked again as the
//! filter will read it.

use serde_json::{Map, Value};
use tollgate_core::config::{pack_key_set, unpack_key_set, KeySetRecord};
use tollgate_core::keys::{Digest, DigestKind};
use tollgate_core::Config;

use crate::args::Parsed;
use crate::{Ctx, Failure};

/// The fields a key set record holds; a client with any other field stays JSON.
const PACKABLE: [&str; 4] = [
    "name",
    "key_sha256",
    "requests_per_minute",
    "tokens_per_minute",
];

/// Why a client cannot be a record: the first field a record has no room for.
fn unpackable_field(client: &Map<String, Value>) -> Option<&str> {
    client
        .keys()
        .map(String::as_str)
        .find(|k| !PACKABLE.contains(k))
        .or_else(|| (!client.contains_key("key_sha256")).then_some("key_sha256"))
}

/// A checked client as a record. The parser has accepted it, so its fields have their types.
fn record(client: &Map<String, Value>) -> Option<KeySetRecord> {
    let digest = Digest::from_hex(DigestKind::Sha256, client.get("key_sha256")?.as_str()?).ok()?;
    let mut key_sha256 = [0u8; 32];
    key_sha256.copy_from_slice(digest.as_bytes());
    let limit = |f: &str| {
        client
            .get(f)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0)
    };
    Some(KeySetRecord {
        key_sha256,
        requests_per_minute: limit("requests_per_minute"),
        tokens_per_minute: limit("tokens_per_minute"),
        name: client.get("name")?.as_str()?.to_string(),
    })
}

/// The core's verdict on a plugin configuration; variables it names are the gateway's, so a
/// placeholder stands in for them.
fn parse(plugin: &Value) -> Result<Config, String> {
    let placeholder = |_: &str| Some("tollgate-cli-placeholder".to_string());
    Config::parse(plugin.to_string().as_bytes(), &placeholder).map_err(|e| e.to_string())
}

/// `tollgate keys pack`.
pub fn run(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    let path = match p.positionals.as_slice() {
        [one] => one.as_str(),
        [] => return Err(Failure::Usage("FILE is required".into())),
        [_, extra, ..] => return Err(Failure::Usage(format!("unexpected argument {extra:?}"))),
    };
    let shown = if path == "-" { "<stdin>" } else { path };
    let bytes = crate::check::read(path, ctx)?;
    let doc: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Failure::Refused(format!("{shown}: not JSON: {e}")))?;
    let refused = |m: String| Failure::Refused(format!("{shown}: {m}"));
    let (output, packed, kept) = match doc {
        Value::Array(clients) => {
            // A bare list becomes the key set itself: every client must fit a record.
            for (i, c) in clients.iter().enumerate() {
                let field = c.as_object().map_or(Some(""), unpackable_field);
                if let Some(field) = field {
                    return Err(refused(cannot_pack(i, field)));
                }
            }
            let n = clients.len();
            let plugin = serde_json::json!({"clients": clients, "upstream": {"api_key_env": "K"}});
            parse(&plugin).map_err(refused)?;
            let mut records: Vec<KeySetRecord> = plugin
                .get("clients")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_object().and_then(record))
                .collect();
            let set = pack_key_set(&mut records).map_err(refused)?;
            let check = serde_json::json!({"key_set": set, "upstream": {"api_key_env": "K"}});
            parse(&check).map_err(|e| refused(format!("the packed key set is refused: {e}")))?;
            (set, n, 0)
        }
        Value::Object(mut plugin) => pack_plugin(&mut plugin).map_err(refused)?,
        _ => {
            return Err(refused(
                "expected a clients array or a plugin configuration (an object with \"clients\")"
                    .into(),
            ))
        }
    };
    match p.value("out") {
        Some(out) => std::fs::write(out, format!("{output}\n"))
            .map_err(|e| Failure::Io(format!("cannot write {out}: {e}")))?,
        None => writeln!(ctx.out, "{output}")?,
    }
    let kept_note = if kept > 0 {
        format!(
            "; {kept} stay in \"clients\" (a key_set record holds only name, key_sha256, \
             requests_per_minute and tokens_per_minute)"
        )
    } else {
        String::new()
    };
    writeln!(ctx.err, "packed {packed} clients into key_set{kept_note}")?;
    Ok(())
}

fn cannot_pack(i: usize, field: &str) -> String {
    if field.is_empty() {
        return format!("clients[{i}]: not an object");
    }
    format!(
        "clients[{i}].{field}: cannot be packed (a key_set record holds only name, key_sha256, \
         requests_per_minute and tokens_per_minute); keep this client in \"clients\" of the \
         plugin configuration, or pack the configuration itself"
    )
}

/// Moves the clients of a plugin configuration that fit a record into its `key_set` (merged
/// with the records already there); the others stay in `clients`. Returns the configuration
/// (compact JSON), the number of clients packed and the number kept.
fn pack_plugin(plugin: &mut Map<String, Value>) -> Result<(String, usize, usize), String> {
    // The configuration as written must be valid: its errors name clients[i] of the file.
    let before = parse(&Value::Object(plugin.clone()))?;
    let clients = match plugin.remove("clients") {
        Some(Value::Array(c)) => c,
        None => Vec::new(),
        Some(_) => return Err("clients: expected an array".into()),
    };
    let mut records = match plugin.get("key_set").and_then(Value::as_str) {
        Some(text) => unpack_key_set(text).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let mut kept = Vec::new();
    let mut packed = 0;
    for c in clients {
        match c
            .as_object()
            .filter(|o| unpackable_field(o).is_none())
            .and_then(record)
        {
            Some(r) => {
                records.push(r);
                packed += 1;
            }
            None => kept.push(c),
        }
    }
    let set = pack_key_set(&mut records)?;
    // `clients` first, then `key_set`, then the rest as written.
    let mut out = Map::new();
    let n_kept = kept.len();
    if !kept.is_empty() {
        out.insert("clients".into(), Value::Array(kept));
    }
    out.insert("key_set".into(), Value::String(set));
    for (k, v) in std::mem::take(plugin) {
        if k != "key_set" {
            out.insert(k, v);
        }
    }
    let out = Value::Object(out);
    let after = parse(&out).map_err(|e| format!("the packed configuration is refused: {e}"))?;
    if after.clients.len() != before.clients.len() {
        return Err(format!(
            "the packed configuration has {} clients, not {}",
            after.clients.len(),
            before.clients.len()
        ));
    }
    Ok((out.to_string(), packed, n_kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f";
    const SHA_B: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn only_what_a_record_holds_is_packed() {
        let c = serde_json::json!({"name": "a", "key_sha256": SHA_A, "requests_per_minute": 5});
        assert_eq!(unpackable_field(&obj(c.clone())), None);
        let r = record(&obj(c)).unwrap();
        assert_eq!((r.requests_per_minute, r.tokens_per_minute), (5, 0));
        for (client, field) in [
            (serde_json::json!({"name": "a", "key_md5": "x"}), "key_md5"),
            (
                serde_json::json!({"name": "a", "key_sha256": SHA_A, "models": []}),
                "models",
            ),
            (serde_json::json!({"name": "a", "keys": []}), "keys"),
            (serde_json::json!({"name": "a"}), "key_sha256"),
        ] {
            assert_eq!(unpackable_field(&obj(client)), Some(field));
        }
    }

    #[test]
    fn a_plugin_configuration_keeps_what_cannot_be_packed() {
        let mut plugin = obj(serde_json::json!({
            "clients": [
                {"name": "a", "key_sha256": SHA_A, "tokens_per_minute": 9},
                {"name": "b", "keys": [{"key_sha256": SHA_B, "label": "l"}]}
            ],
            "upstream": {"api_key_env": "K"}
        }));
        let (text, packed, kept) = pack_plugin(&mut plugin).unwrap();
        assert_eq!((packed, kept), (1, 1));
        let out: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(out["clients"][0]["name"], "b");
        let c = parse(&out).unwrap();
        assert_eq!(c.key_set_clients, 1);
        // Packing again merges into the key set and changes nothing.
        let (again, packed, kept) = pack_plugin(&mut obj(out)).unwrap();
        assert_eq!((again, packed, kept), (text, 0, 1));
    }
}

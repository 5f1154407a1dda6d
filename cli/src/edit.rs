//! `tollgate keys add | revoke | rotate FILE`: edit the clients of a configuration file in place.
//!
//! FILE is any of the three files that hold clients: the filter's discovery file of a live-reload
//! deployment (`tollgate.json`, a `TypedExtensionConfig` whose plugin configuration is a JSON
//! string), a plugin configuration (an object with `clients`), or a clients array (`clients.json`
//! of the render scripts). The edited configuration is checked with the core's own parser before
//! anything is written, then written next to FILE and renamed over it: a reader (Envoy watching
//! the directory) sees the old file or the new one, never half of one. A new key is printed once.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tollgate_core::config::{parse_rfc3339_ms, MAX_KEYS_PER_CLIENT};
use tollgate_core::keys::{Digest, DigestKind};
use tollgate_core::Config;

use crate::args::Parsed;
use crate::keys::generate_key;
use crate::{Ctx, Failure};

/// Which of the three shapes FILE has.
enum Shape {
    /// A discovery file: the plugin configuration is a string inside it.
    Discovery,
    /// A plugin configuration object.
    Plugin,
    /// A bare clients array.
    Clients,
}

/// FILE, read and taken apart.
struct Doc {
    path: PathBuf,
    shape: Shape,
    /// The whole file.
    outer: Value,
    /// The plugin configuration (for a clients array: `{"clients": [...]}`).
    plugin: Value,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::Io(format!("{}: {e}", path.display()))
}

/// The plugin configuration string of a discovery file, if it is one.
fn discovery_value(outer: &Value) -> Option<&str> {
    outer
        .get("resources")?
        .get(0)?
        .get("typed_config")?
        .get("config")?
        .get("configuration")?
        .get("value")?
        .as_str()
}

fn read(path: &Path) -> Result<Doc, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    let outer: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::Refused(format!("{}: not JSON: {e}", path.display())))?;
    let (shape, plugin) = if let Some(s) = discovery_value(&outer) {
        let plugin = serde_json::from_str(s).map_err(|e| {
            Failure::Refused(format!(
                "{}: the plugin configuration is not JSON: {e}",
                path.display()
            ))
        })?;
        (Shape::Discovery, plugin)
    } else if outer.is_array() {
        (Shape::Clients, json!({ "clients": outer.clone() }))
    } else if outer.get("clients").is_some_and(Value::is_array) {
        (Shape::Plugin, outer.clone())
    } else {
        return Err(Failure::Refused(format!(
            "{}: neither a discovery file (resources[0]...configuration.value), a plugin \
             configuration (an object with \"clients\") nor a clients array",
            path.display()
        )));
    };
    Ok(Doc {
        path: path.to_path_buf(),
        shape,
        outer,
        plugin,
    })
}

/// Checks the edited plugin configuration with the core's parser. Environment variables it names
/// need not exist here (they are the gateway's): a placeholder stands in for them. A bare clients
/// array is checked in a configuration with model routing when it has model allow-lists.
fn check(doc: &Doc) -> Result<(), Failure> {
    // `user:password` shaped: it also stands in for Webdis's basic auth (`basic_auth_env`).
    let placeholder = |_: &str| Some("tollgate-cli:placeholder".to_string());
    let plugin = match doc.shape {
        Shape::Clients => {
            let clients = doc.plugin.get("clients").cloned().unwrap_or(Value::Null);
            let routed = clients
                .as_array()
                .is_some_and(|a| a.iter().any(|c| c.get("models").is_some()));
            if routed {
                json!({"clients": clients, "providers": [{"name": "p", "cluster": "p",
                        "api_key_env": "K"}], "models": [{"match": "*", "providers": ["p"]}]})
            } else {
                json!({"clients": clients, "upstream": {"api_key_env": "K"}})
            }
        }
        Shape::Discovery | Shape::Plugin => doc.plugin.clone(),
    };
    Config::parse(plugin.to_string().as_bytes(), &placeholder)
        .map(|_| ())
        .map_err(|e| {
            Failure::Refused(format!(
                "{}: the result would be refused, so nothing was written: {e}",
                doc.path.display()
            ))
        })
}

/// Writes the edited document next to FILE and renames it over FILE.
fn write(doc: &mut Doc) -> Result<(), Failure> {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).map_err(|e| io(&doc.path, e));
    let text = match doc.shape {
        Shape::Discovery => {
            let value = pretty(&doc.plugin)?;
            if let Some(slot) = doc
                .outer
                .pointer_mut("/resources/0/typed_config/config/configuration/value")
            {
                *slot = Value::String(value);
            }
            pretty(&doc.outer)?
        }
        Shape::Plugin => pretty(&doc.plugin)?,
        Shape::Clients => pretty(doc.plugin.get("clients").unwrap_or(&Value::Null))?,
    };
    let dir = doc
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = doc
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tollgate-{}.tmp", std::process::id()));
    let result = (|| {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(&doc.path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &doc.path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&doc.path, e));
    }
    Ok(())
}

fn clients_mut(doc: &mut Doc) -> Result<&mut Vec<Value>, Failure> {
    doc.plugin
        .get_mut("clients")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| Failure::Refused("the configuration has no clients array".into()))
}

fn find<'a>(clients: &'a mut [Value], name: &str) -> Option<&'a mut Map<String, Value>> {
    clients
        .iter_mut()
        .filter_map(Value::as_object_mut)
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
}

/// The client's keys as a `keys` list (a single `key_sha256`/`key_md5` becomes its first entry,
/// and the list goes where the key was); `None` when `keys` is there but not a list.
fn key_list(client: &mut Map<String, Value>) -> Option<&mut Vec<Value>> {
    if !client.contains_key("keys") {
        let mut first = Map::new();
        let old: Vec<(String, Value)> = std::mem::take(client).into_iter().collect();
        for (k, v) in old {
            if k == "key_sha256" || k == "key_md5" {
                // `keys` takes the place of the first key field (re-inserting keeps a place).
                client.insert("keys".into(), Value::Null);
                first.insert(k, v);
            } else {
                client.insert(k, v);
            }
        }
        let list = if first.is_empty() {
            vec![]
        } else {
            vec![Value::Object(first)]
        };
        client.insert("keys".into(), Value::Array(list));
    }
    client.get_mut("keys").and_then(Value::as_array_mut)
}

fn not_a_list(name: &str) -> Failure {
    Failure::Refused(format!("client {name:?}: `keys` is not a list"))
}

fn checked_time(flag: &str, t: &str) -> Result<String, Failure> {
    parse_rfc3339_ms(t).map_err(|m| Failure::Usage(format!("--{flag}: {m}")))?;
    Ok(t.to_string())
}

/// A new key entry: the key and its `keys[]` entry.
fn new_key(
    ctx: &mut Ctx,
    label: Option<&str>,
    expires_at: Option<&str>,
) -> Result<(String, Value), Failure> {
    let key =
        generate_key(ctx.random).map_err(|e| Failure::Io(format!("cannot make a key: {e}")))?;
    let mut entry = Map::new();
    entry.insert(
        "key_sha256".into(),
        Value::String(Digest::of_key(DigestKind::Sha256, key.as_bytes()).to_hex()),
    );
    if let Some(l) = label {
        entry.insert("label".into(), Value::String(l.into()));
    }
    if let Some(t) = expires_at {
        entry.insert("expires_at".into(), Value::String(t.into()));
    }
    Ok((key, Value::Object(entry)))
}

fn file_arg(p: &Parsed) -> Result<&str, Failure> {
    match p.positionals.as_slice() {
        [file] => Ok(file),
        [] => Err(Failure::Usage("FILE is required".into())),
        [_, extra, ..] => Err(Failure::Usage(format!("unexpected argument {extra:?}"))),
    }
}

fn name_arg(p: &Parsed) -> Result<&str, Failure> {
    p.value("name")
        .ok_or_else(|| Failure::Usage("--name is required".into()))
}

fn number(flag: &str, p: &Parsed) -> Result<Option<u64>, Failure> {
    p.value(flag)
        .map(|v| {
            v.parse().map_err(|_| {
                Failure::Usage(format!("--{flag}: expected a whole number, got {v:?}"))
            })
        })
        .transpose()
}

fn print_key(ctx: &mut Ctx, p: &Parsed, name: &str, key: &str, doc: &Doc) -> Result<(), Failure> {
    if p.flag("json") {
        let out = json!({"client": name, "key": key, "file": doc.path.display().to_string()});
        writeln!(ctx.out, "{out}")?;
    } else {
        writeln!(
            ctx.out,
            "New key for client {name:?}. It is shown only now and stored nowhere: give it to \
             the client through a secret store now.\n\n  {key}\n\n{} now holds its SHA-256.",
            doc.path.display()
        )?;
    }
    Ok(())
}

/// `tollgate keys add FILE --name NAME [--label L] [--expires-at T] [--rpm N] [--tpm N]`.
pub fn add(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    let path = PathBuf::from(file_arg(p)?);
    let name = name_arg(p)?.to_string();
    let expires_at = p
        .value("expires-at")
        .map(|t| checked_time("expires-at", t))
        .transpose()?;
    let (rpm, tpm) = (number("rpm", p)?, number("tpm", p)?);
    let mut doc = read(&path)?;
    let (key, entry) = new_key(ctx, p.value("label"), expires_at.as_deref())?;
    let clients = clients_mut(&mut doc)?;
    match find(clients, &name) {
        Some(client) => {
            if rpm.is_some() || tpm.is_some() {
                return Err(Failure::Usage(format!(
                    "client {name:?} exists: --rpm and --tpm are for a new client (edit its \
                     limits in the file)"
                )));
            }
            // A client with one key_sha256/key_md5 moves to a list (a client known by its
            // identities alone is already counted under its name).
            let converted = !client.contains_key("keys") && !client.contains_key("identities");
            key_list(client)
                .ok_or_else(|| not_a_list(&name))?
                .push(entry);
            if converted {
                writeln!(
                    ctx.err,
                    "note: client {name:?} now lists its keys in `keys`; with the Redis \
                     limiter its counters are named after the client from now on (one window \
                     starts afresh)"
                )?;
            }
        }
        None => {
            let mut client = Map::new();
            client.insert("name".into(), Value::String(name.clone()));
            client.insert("keys".into(), Value::Array(vec![entry]));
            if let Some(v) = rpm {
                client.insert("requests_per_minute".into(), v.into());
            }
            if let Some(v) = tpm {
                client.insert("tokens_per_minute".into(), v.into());
            }
            clients.push(Value::Object(client));
        }
    }
    check(&doc)?;
    write(&mut doc)?;
    print_key(ctx, p, &name, &key, &doc)
}

/// `tollgate keys revoke FILE --name NAME (--label L | --key-sha256 HEX | --all)`.
pub fn revoke(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    let path = PathBuf::from(file_arg(p)?);
    let name = name_arg(p)?.to_string();
    let (label, sha, all) = (p.value("label"), p.value("key-sha256"), p.flag("all"));
    if [label.is_some(), sha.is_some(), all]
        .iter()
        .filter(|b| **b)
        .count()
        != 1
    {
        return Err(Failure::Usage(
            "say which key: --label L, --key-sha256 HEX, or --all (the client's every key, \
             and so the client)"
                .into(),
        ));
    }
    let sha = sha.map(str::to_ascii_lowercase);
    let mut doc = read(&path)?;
    let clients = clients_mut(&mut doc)?;
    let Some(client) = find(clients, &name) else {
        return Err(Failure::Refused(format!("no client named {name:?}")));
    };
    let mut removed = 0;
    let mut left = 0;
    if !all {
        let list = key_list(client).ok_or_else(|| not_a_list(&name))?;
        let before = list.len();
        list.retain(|k| {
            let by_label = label.is_some() && k.get("label").and_then(Value::as_str) == label;
            let by_sha = sha.as_deref().is_some_and(|s| {
                k.get("key_sha256")
                    .and_then(Value::as_str)
                    .is_some_and(|h| h.eq_ignore_ascii_case(s))
            });
            !(by_label || by_sha)
        });
        removed = before - list.len();
        left = list.len();
        if removed == 0 {
            return Err(Failure::Refused(format!(
                "client {name:?} has no such key; nothing was written"
            )));
        }
    }
    if !all && left == 0 && client.contains_key("identities") {
        // Still known by its certificate: the client stays, without a key.
        client.remove("keys");
        writeln!(
            ctx.err,
            "client {name:?} has no key left; it keeps its `identities`"
        )?;
    } else if all || left == 0 {
        clients.retain(|c| c.get("name").and_then(Value::as_str) != Some(name.as_str()));
        writeln!(
            ctx.err,
            "client {name:?} had no key left and is removed from the file"
        )?;
    }
    check(&doc)?;
    write(&mut doc)?;
    if !all && left > 0 {
        writeln!(
            ctx.out,
            "revoked {removed} key(s) of client {name:?}; {left} left"
        )?;
    }
    Ok(())
}

/// `tollgate keys rotate FILE --name NAME [--label L] [--old-expires-at T]`.
pub fn rotate(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    let path = PathBuf::from(file_arg(p)?);
    let name = name_arg(p)?.to_string();
    let old_expiry = p
        .value("old-expires-at")
        .map(|t| checked_time("old-expires-at", t))
        .transpose()?;
    let mut doc = read(&path)?;
    let (key, entry) = new_key(ctx, p.value("label"), None)?;
    let clients = clients_mut(&mut doc)?;
    let Some(client) = find(clients, &name) else {
        return Err(Failure::Refused(format!(
            "no client named {name:?} (keys add makes one)"
        )));
    };
    let list = key_list(client).ok_or_else(|| not_a_list(&name))?;
    if let Some(t) = &old_expiry {
        for k in list.iter_mut().filter_map(Value::as_object_mut) {
            // A key that expires earlier keeps its own expiry.
            let earlier = k
                .get("expires_at")
                .and_then(Value::as_str)
                .and_then(|e| parse_rfc3339_ms(e).ok())
                .zip(parse_rfc3339_ms(t).ok())
                .is_some_and(|(own, new)| own <= new);
            if !earlier {
                k.insert("expires_at".into(), Value::String(t.clone()));
            }
        }
    }
    if list.len() >= MAX_KEYS_PER_CLIENT {
        return Err(Failure::Refused(format!(
            "client {name:?} has {MAX_KEYS_PER_CLIENT} keys already: revoke one first"
        )));
    }
    list.push(entry);
    check(&doc)?;
    write(&mut doc)?;
    print_key(ctx, p, &name, &key, &doc)?;
    if old_expiry.is_none() {
        writeln!(
            ctx.err,
            "note: the old keys still work; revoke them (keys revoke --label / --key-sha256) \
             once the client uses the new one, or rotate with --old-expires-at"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{flag, parse, value, Opt};

    const OPTS: &[Opt] = &[
        value("name", "NAME"),
        value("label", "L"),
        value("expires-at", "T"),
        value("old-expires-at", "T"),
        value("key-sha256", "HEX"),
        value("rpm", "N"),
        value("tpm", "N"),
        flag("all"),
        flag("json"),
    ];

    fn run(f: fn(&Parsed, &mut Ctx) -> Result<(), Failure>, line: &str) -> Result<String, Failure> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        let p = parse(&args, OPTS).unwrap();
        let env = |_: &str| None;
        let random = |buf: &mut [u8]| {
            buf.fill(7);
            Ok(())
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut input: &[u8] = b"";
        let mut ctx = Ctx {
            env: &env,
            random: &random,
            stdin: &mut input,
            stdin_is_terminal: false,
            out: &mut out,
            err: &mut err,
        };
        f(&p, &mut ctx)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn tmp(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tollgate-edit-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    const SHA: &str = "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f";

    #[test]
    fn add_rotate_revoke_on_a_clients_array() {
        let path = tmp(
            "clients.json",
            &format!(r#"[{{"name":"a","key_sha256":"{SHA}","requests_per_minute":5}}]"#),
        );
        let f = path.display();
        let out = run(add, &format!("{f} --name a --label second --json")).unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        let key = out["key"].as_str().unwrap().to_string();
        assert!(key.starts_with("sk-tg-"));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        // The single key became the first of a list, in its place; the limit is kept.
        let a = v[0].as_object().unwrap();
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            ["name", "keys", "requests_per_minute"]
        );
        assert_eq!(v[0]["keys"][0]["key_sha256"], SHA);
        let new_sha = Digest::of_key(DigestKind::Sha256, key.as_bytes()).to_hex();
        assert_eq!(v[0]["keys"][1]["key_sha256"], new_sha.as_str());
        assert_eq!(v[0]["keys"][1]["label"], "second");

        // The same key again would be a duplicate digest: refused, nothing written.
        let before = std::fs::read_to_string(&path).unwrap();
        assert!(matches!(
            run(add, &format!("{f} --name b")),
            Err(Failure::Refused(m)) if m.contains("duplicate key digest")
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);

        assert!(matches!(
            run(rotate, &format!("{f} --name a --old-expires-at 2025-13-01T00:00:00Z")),
            Err(Failure::Usage(m)) if m.starts_with("--old-expires-at: ")
        ));
        run(
            revoke,
            &format!("{f} --name a --key-sha256 {}", SHA.to_uppercase()),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v[0]["keys"].as_array().unwrap().len(), 1);
        // The last key of the last client: no client left, which the filter refuses.
        let before = std::fs::read_to_string(&path).unwrap();
        assert!(matches!(
            run(revoke, &format!("{f} --name a --label second")),
            Err(Failure::Refused(m)) if m.contains("at least one client")
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        assert!(matches!(
            run(revoke, &format!("{f} --name a --label nope")),
            Err(Failure::Refused(m)) if m.contains("no such key")
        ));
    }

    #[test]
    fn a_client_known_by_its_identities_keeps_them_without_keys() {
        let id = "spiffe://cluster.local/ns/a/sa/app";
        let path = tmp(
            "identities.json",
            &format!(r#"[{{"name":"mesh","identities":["{id}"]}}]"#),
        );
        let f = path.display();
        run(add, &format!("{f} --name mesh --label ci")).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v[0]["identities"][0], id);
        assert_eq!(v[0]["keys"].as_array().unwrap().len(), 1);
        // Its last key revoked, it is still a client: by its certificate.
        run(revoke, &format!("{f} --name mesh --label ci")).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v, json!([{"name": "mesh", "identities": [id]}]));
    }

    #[test]
    fn a_plugin_with_the_redis_limiter_and_webdis_basic_auth_is_edited() {
        // The shipped compose and Kubernetes configurations: the gateway's variables are not set
        // where the CLI runs.
        let plugin = json!({"clients": [{"name": "a", "key_sha256": SHA}],
                            "upstream": {"api_key_env": "TOLLGATE_PROVIDER_KEY"},
                            "limiter": {"backend": "redis", "cluster": "webdis",
                                        "basic_auth_env": "TOLLGATE_WEBDIS_AUTH"}});
        let path = tmp("redis.json", &plugin.to_string());
        run(add, &format!("{} --name b", path.display())).unwrap();
    }

    #[test]
    fn a_discovery_file_keeps_its_envelope_and_is_checked_whole() {
        let plugin = json!({"clients": [{"name": "a", "key_sha256": SHA}],
                            "upstream": {"api_key_env": "TOLLGATE_PROVIDER_KEY"}});
        let doc = json!({"resources": [{"@type": "t", "name": "tollgate", "typed_config": {
            "@type": "w", "config": {"name": "tollgate", "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": plugin.to_string()}}}}]});
        let path = tmp("tollgate.json", &doc.to_string());
        let f = path.display();
        run(
            rotate,
            &format!("{f} --name a --label new --old-expires-at 2030-01-01T00:00:00Z"),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["resources"][0]["name"], "tollgate");
        let inner: Value = serde_json::from_str(discovery_value(&v).unwrap()).unwrap();
        assert_eq!(
            inner["clients"][0]["keys"][0]["expires_at"],
            "2030-01-01T00:00:00Z"
        );
        assert_eq!(inner["clients"][0]["keys"][1]["label"], "new");
        assert!(inner["clients"][0]["keys"][1].get("expires_at").is_none());
        // Revoking every key of the only client leaves a configuration the filter refuses.
        let Err(Failure::Refused(m)) = run(revoke, &format!("{f} --name a --all")) else {
            panic!()
        };
        assert!(
            m.contains("nothing was written") && m.contains("clients: at least one"),
            "{m}"
        );
    }
}

//! The `tollgate` binary as an operator runs it: arguments, standard input, exit codes, and what
//! it prints on standard output and standard error.

// The helpers below are test code too: like clippy.toml's allow-*-in-tests, a failing test should
// fail loudly.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tollgate_core::Config;

const DEMO_KEY: &str = "sk-tollgate-demo";
const DEMO_SHA256: &str = "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f";
const DEMO_MD5: &str = "32bd3c47e408828a22d81d4fe5f3c06d";

struct Run {
    code: i32,
    out: String,
    err: String,
}

/// Runs `tollgate` with exactly `env` as its environment and `stdin` as its input.
fn tollgate(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Run {
        code: status.code().unwrap(),
        out: String::from_utf8(stdout).unwrap(),
        err: String::from_utf8(stderr).unwrap(),
    }
}

/// A coreutils digest (`sha256sum`, `md5sum`) of `input`: an implementation independent of ours.
fn coreutils(tool: &str, input: &str) -> String {
    let mut child = Command::new(tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn to_str(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn display(&self) -> std::path::Display<'_> {
        self.0.display()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_file(name: &str, contents: &str) -> TempFile {
    let path = std::env::temp_dir().join(format!("tollgate-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    TempFile(path)
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The filter's message for a plugin configuration, straight from the core.
fn core_error(json: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    Config::parse(json.as_bytes(), env).unwrap_err().to_string()
}

// ---------------------------------------------------------------------------------------------
// keys new

fn assert_key_shape(key: &str) {
    let random = key.strip_prefix("sk-tg-").unwrap();
    assert_eq!(random.len(), 43, "{key}");
    assert!(random.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
}

#[test]
fn keys_new_prints_the_key_once_and_an_entry_with_its_digest_only() {
    let r = tollgate(
        &["keys", "new", "--name", "team-a", "--rpm", "120"],
        "",
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.err, "");
    let keys: Vec<&str> = r
        .out
        .split_whitespace()
        .filter(|w| w.starts_with("sk-tg-"))
        .collect();
    assert_eq!(keys.len(), 1, "the key is printed once: {}", r.out);
    let key = keys[0];
    assert_key_shape(key);
    assert!(r.out.contains("shown only now"), "{}", r.out);
    let entry = json(&r.out[r.out.find('{').unwrap()..]);
    assert_eq!(
        entry,
        serde_json::json!({
            "name": "team-a",
            "key_sha256": coreutils("sha256sum", key),
            "requests_per_minute": 120,
        })
    );
}

#[test]
fn keys_new_json_for_scripts_and_every_key_differs() {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = tollgate(&["keys", "new", "--name", "bot", "--json"], "", &[]);
        assert_eq!((r.code, r.err.as_str()), (0, ""));
        assert_eq!(r.out.lines().count(), 1, "{}", r.out);
        let v = json(&r.out);
        let key = v["key"].as_str().unwrap().to_string();
        assert_key_shape(&key);
        assert_eq!(
            v["entry"],
            serde_json::json!({"name": "bot", "key_sha256": coreutils("sha256sum", &key)})
        );
        assert!(!seen.contains(&key), "a repeated key: {key}");
        seen.push(key);
    }
}

#[test]
fn keys_new_keeps_every_field_and_notes_what_needs_more_configuration() {
    let r = tollgate(
        &[
            "keys",
            "new",
            "--name",
            "a",
            "--tpm",
            "50000",
            "--models",
            "gpt-4.1, gpt-4.1-mini",
            "--json",
        ],
        "",
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    let entry = &json(&r.out)["entry"];
    assert_eq!(entry["tokens_per_minute"], 50000);
    assert_eq!(
        entry["models"],
        serde_json::json!(["gpt-4.1", "gpt-4.1-mini"])
    );
    // Token limits are accepted; the allow-list needs model routing, which the note says.
    assert!(!r.err.contains("`tokens_per_minute`"), "{}", r.err);
    assert!(r.err.contains("`models`"), "{}", r.err);
}

#[test]
fn keys_new_refuses_what_the_filter_would_refuse_before_making_a_key() {
    let r = tollgate(&["keys", "new", "--name", "team.a"], "", &[]);
    assert_eq!(r.code, 2);
    assert_eq!(r.out, "", "no key for a refused entry");
    assert!(
        r.err
            .starts_with("error: --name: \"team.a\" is not a valid client name: use 1-64 letters"),
        "{}",
        r.err
    );
    let r = tollgate(&["keys", "new", "--name", "a", "--rpm", "0"], "", &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.err
            .starts_with("error: --rpm: must be between 1 and 1000000000, got 0"),
        "{}",
        r.err
    );
    let r = tollgate(&["keys", "new"], "", &[]);
    assert_eq!(r.code, 2);
    assert!(r.err.starts_with("error: --name is required"), "{}", r.err);
}

#[test]
fn a_new_entry_passes_config_check() {
    let r = tollgate(&["keys", "new", "--name", "team-a", "--json"], "", &[]);
    let entry = json(&r.out)["entry"].clone();
    let config = serde_json::json!({"clients": [entry], "upstream": {"api_key_env": "K"}});
    let path = temp_file("new-entry.json", &config.to_string());
    let r = tollgate(
        &["config", "check", path.to_str(), "--strict-env"],
        "",
        &[("K", "sk-provider")],
    );
    assert_eq!((r.code, r.err.as_str()), (0, ""));
}

// ---------------------------------------------------------------------------------------------
// keys hash

#[test]
fn keys_hash_matches_coreutils() {
    let r = tollgate(&["keys", "hash"], DEMO_KEY, &[]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        r.out,
        format!("key_sha256 {DEMO_SHA256}\nkey_md5 {DEMO_MD5}\n")
    );
    assert_eq!(coreutils("sha256sum", DEMO_KEY), DEMO_SHA256);
    assert_eq!(coreutils("md5sum", DEMO_KEY), DEMO_MD5);

    let new = json(&tollgate(&["keys", "new", "--name", "x", "--json"], "", &[]).out);
    let key = new["key"].as_str().unwrap();
    let r = tollgate(&["keys", "hash", "--json"], &format!("{key}\n"), &[]);
    let v = json(&r.out);
    assert_eq!(v["key_sha256"], coreutils("sha256sum", key));
    assert_eq!(v["key_md5"], coreutils("md5sum", key));
    assert_eq!(v["key_sha256"], new["entry"]["key_sha256"]);
}

#[test]
fn keys_hash_with_a_name_prints_an_entry() {
    let r = tollgate(
        &["keys", "hash", "--name", "demo", "--rpm", "60", "--json"],
        DEMO_KEY,
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(
        json(&r.out)["entry"],
        serde_json::json!({"name": "demo", "key_sha256": DEMO_SHA256, "requests_per_minute": 60})
    );
}

#[test]
fn keys_hash_trims_one_newline_and_refuses_bad_keys() {
    for input in ["sk-tollgate-demo\n", "sk-tollgate-demo\r\n"] {
        let r = tollgate(&["keys", "hash"], input, &[]);
        assert!(r.out.contains(DEMO_SHA256), "{input:?}: {}", r.out);
    }
    for (input, why) in [
        ("", "empty"),
        ("\n", "empty"),
        ("sk-tollgate-demo\n\n", "can never authenticate"),
        ("sk tollgate", "can never authenticate"),
    ] {
        let r = tollgate(&["keys", "hash"], input, &[]);
        assert_eq!(r.code, 1, "{input:?}");
        assert_eq!(r.out, "");
        assert!(
            r.err.starts_with("error: ") && r.err.contains(why),
            "{input:?}: {}",
            r.err
        );
    }
}

#[test]
fn keys_hash_never_takes_the_key_as_an_argument() {
    let r = tollgate(&["keys", "hash", "sk-secret-on-the-command-line"], "", &[]);
    assert_eq!(r.code, 2);
    assert_eq!(r.out, "");
    assert!(r.err.contains("standard input"), "{}", r.err);
    assert!(!r.err.contains("sk-secret"), "{}", r.err);
}

// ---------------------------------------------------------------------------------------------
// config check

fn repo_envoy_yamls() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo().join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    out.sort();
    out
}

/// Variables a lenient check replaced with placeholders, from its warnings.
fn placeholder_vars(err: &str) -> Vec<String> {
    err.lines()
        .filter_map(|l| {
            let rest = l.split("environment variable \"").nth(1)?;
            rest.contains("is not set here")
                .then(|| rest.split('"').next().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn config_check_accepts_every_envoy_yaml_in_the_repo() {
    let yamls = repo_envoy_yamls();
    assert!(yamls.len() >= 2, "{yamls:?}");
    for path in yamls {
        let p = path.to_str().unwrap();
        // Without the secrets: accepted, with a warning per placeholder.
        let r = tollgate(&["config", "check", p], "", &[]);
        assert_eq!(r.code, 0, "{p}: {}", r.err);
        assert!(r.out.contains(": OK ("), "{p}: {}", r.out);
        let missing = placeholder_vars(&r.err);
        assert!(!missing.is_empty(), "{p}: {}", r.err);
        let mut warnings: Vec<&str> = r.err.lines().collect();
        let n = warnings.len();
        warnings.sort_unstable();
        warnings.dedup();
        assert_eq!(warnings.len(), n, "each warning once: {}", r.err);
        // With them, as Envoy would see them: accepted without a warning.
        let env: Vec<(&str, &str)> = missing.iter().map(|v| (v.as_str(), "sk-set")).collect();
        let r = tollgate(
            &["config", "check", p, "--strict-env", "--explain"],
            "",
            &env,
        );
        assert_eq!((r.code, r.err.as_str()), (0, ""), "{p}");
        assert!(r.out.contains("clients ("), "{p}: {}", r.out);
        assert!(r.out.contains("limiter: "), "{p}: {}", r.out);
        // And without them, strictly: refused as the filter would be.
        let r = tollgate(&["config", "check", p, "--strict-env"], "", &[]);
        assert_eq!(r.code, 1, "{p}");
        assert!(
            r.err.contains("invalid plugin configuration: ")
                && r.err.contains("is not set or empty in the wasm VM"),
            "{p}: {}",
            r.err
        );
    }
}

const GOOD_CLIENT: &str = r#"{"name":"a","key_sha256":"179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"}"#;

#[test]
fn config_check_refuses_broken_json_with_the_filters_message() {
    let env = |n: &str| (n == "K").then(|| "sk-provider".to_string());
    let cases = [
        (
            r#"{"clients":[{"name":"a","key_sha256":"abcd"}],"upstream":{"api_key_env":"K"}}"#.to_string(),
            "clients[0].key_sha256: expected 64 hex characters (the SHA-256 of the whole key), got 4 characters",
        ),
        (
            format!(r#"{{"clients":[{GOOD_CLIENT},{GOOD_CLIENT}],"upstream":{{"api_key_env":"K"}}}}"#),
            "clients[1].name: duplicate client name \"a\" (also clients[0])",
        ),
        (
            format!(r#"{{"clients":[{GOOD_CLIENT}],"upstream":{{"api_key_env":"K"}},"limiter":{{"backend":"memcached"}}}}"#),
            "limiter.backend: unknown variant `memcached`",
        ),
        (
            "{clients: nope".to_string(),
            "not valid JSON: key must be a string at line 1 column 2",
        ),
    ];
    for (config, starts) in cases {
        let path = temp_file("broken.json", &config);
        let r = tollgate(
            &["config", "check", path.to_str()],
            "",
            &[("K", "sk-provider")],
        );
        assert_eq!(r.code, 1, "{config}");
        assert_eq!(r.out, "");
        let expected = core_error(&config, &env);
        assert!(expected.starts_with(starts), "{expected}");
        assert_eq!(
            r.err,
            format!(
                "{}: invalid plugin configuration: {expected}\n",
                path.display()
            )
        );
    }
}

fn bootstrap(plugin_json: &str, host_env_keys: &str) -> String {
    let value: String = plugin_json
        .lines()
        .map(|l| format!("                    {l}\n"))
        .collect();
    format!(
        r#"static_resources:
  clusters:
  - name: provider
  listeners:
  - name: gateway
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: tollgate
                vm_config:
                  environment_variables:
                    host_env_keys: [{host_env_keys}]
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
{value}          - name: envoy.filters.http.router
"#
    )
}

const WASM_AT: &str = "listeners[0].filter_chains[0].filters[0].http_filters[0] (listener \"gateway\", plugin \"tollgate\")";

#[test]
fn config_check_names_the_broken_filter_of_an_envoy_yaml() {
    let plugin = r#"{"clients":[{"name":"a","key_sha256":"abcd"}],"upstream":{"api_key_env":"K"}}"#;
    let path = temp_file("broken.yaml", &bootstrap(plugin, "K"));
    let r = tollgate(
        &["config", "check", path.to_str()],
        "",
        &[("K", "sk-provider")],
    );
    assert_eq!(r.code, 1);
    assert_eq!(
        r.err,
        format!(
            "{}: {WASM_AT}: invalid plugin configuration: clients[0].key_sha256: expected 64 hex \
             characters (the SHA-256 of the whole key), got 4 characters\n",
            path.display()
        )
    );

    let ok = format!(r#"{{"clients":[{GOOD_CLIENT}],"upstream":{{"api_key_env":"K"}}}}"#);
    let path = temp_file("ok.yaml", &bootstrap(&ok, "K"));
    let r = tollgate(
        &["config", "check", path.to_str()],
        "",
        &[("K", "sk-provider")],
    );
    assert_eq!((r.code, r.err.as_str()), (0, ""));
    assert_eq!(
        r.out,
        format!(
            "{}: {WASM_AT}: OK (1 client, limiter local)\n",
            path.display()
        )
    );
}

#[test]
fn config_check_warns_when_a_variable_is_not_passed_into_the_vm() {
    let plugin = format!(r#"{{"clients":[{GOOD_CLIENT}],"upstream":{{"api_key_env":"K"}}}}"#);
    let path = temp_file("unlisted.yaml", &bootstrap(&plugin, "OTHER"));
    let p = path.to_str();
    let r = tollgate(&["config", "check", p], "", &[("K", "sk-provider")]);
    assert_eq!(r.code, 0);
    assert!(
        r.err.contains(
            "which is not in this filter's vm_config.environment_variables.host_env_keys"
        ),
        "{}",
        r.err
    );
    // Strictly, as Envoy does: set in the environment, but not listed, so not in the VM.
    let r = tollgate(
        &["config", "check", p, "--strict-env"],
        "",
        &[("K", "sk-provider")],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains(
            "invalid plugin configuration: upstream.api_key_env: environment variable \"K\" is not set or empty in the wasm VM"
        ),
        "{}",
        r.err
    );
}

#[test]
fn config_check_explains_a_redis_limiter() {
    let plugin = format!(
        r#"{{"clients":[{GOOD_CLIENT}],"upstream":{{"api_key_env":"K"}},
            "limiter":{{"backend":"redis","cluster":"webdis","on_error":"deny","basic_auth_env":"W"}}}}"#
    );
    let path = temp_file("redis.json", &plugin);
    let r = tollgate(
        &["config", "check", path.to_str(), "--explain"],
        "",
        &[("K", "sk-provider"), ("W", "user:s3cret")],
    );
    assert_eq!((r.code, r.err.as_str()), (0, ""));
    for want in [
        "limiter: redis",
        "cluster     webdis",
        "timeout     100 ms (the default)",
        "basic auth from environment variable W (set here)",
        "deny: refused with 503",
        "environment variable K (set here)",
    ] {
        assert!(r.out.contains(want), "{want}: {}", r.out);
    }
    assert!(
        !r.out.contains("s3cret") && !r.out.contains("sk-provider"),
        "{}",
        r.out
    );
}

#[test]
fn config_check_file_problems() {
    let path = temp_file("not-yaml.yaml", "static_resources: [unclosed\n");
    let r = tollgate(&["config", "check", path.to_str()], "", &[]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains(": not valid YAML: "), "{}", r.err);

    let path = temp_file("no-wasm.yaml", "static_resources:\n  listeners: []\n");
    let r = tollgate(&["config", "check", path.to_str()], "", &[]);
    assert_eq!(r.code, 1);
    assert!(
        r.err.contains("no Tollgate configuration found"),
        "{}",
        r.err
    );

    let r = tollgate(&["config", "check", "/nonexistent/tollgate.json"], "", &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.err
            .starts_with("error: cannot read /nonexistent/tollgate.json"),
        "{}",
        r.err
    );

    let r = tollgate(&["config", "check"], "", &[]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("Usage: tollgate config check"), "{}", r.err);
}

// ---------------------------------------------------------------------------------------------
// keys pack: large key sets

/// `n` JSON clients `c0`..: the key of client i is `sk-i`, its limit i + 1 per minute.
fn clients_json(n: usize) -> String {
    let list: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "name": format!("c{i}"),
                "key_sha256": coreutils("sha256sum", &format!("sk-{i}")),
                "requests_per_minute": i + 1,
            })
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}

#[test]
fn keys_pack_turns_a_clients_list_into_a_key_set_the_filter_reads() {
    let list = temp_file("pack-list.json", &clients_json(5));
    let run = tollgate(&["keys", "pack", list.to_str()], "", &[]);
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(run.err, "packed 5 clients into key_set\n");
    let set = run.out.trim();
    assert!(!set.contains('"') && !set.contains('\n'), "{set}");
    // The filter's parser: the packed key of c3 is c3's, with its limit; the JSON client too.
    let plugin = format!(
        r#"{{"clients":[{{"name":"demo","key_sha256":"{DEMO_SHA256}"}}],"key_set":"{set}",
            "upstream":{{"api_key_env":"K"}}}}"#
    );
    let env = |_: &str| Some("sk-provider".to_string());
    let config = Config::parse(plugin.as_bytes(), &env).unwrap();
    assert_eq!(config.key_set_clients, 5);
    let c3 = config.client(config.keys.lookup(b"sk-3").unwrap()).unwrap();
    assert_eq!((c3.name.as_str(), c3.requests_per_minute), ("c3", 4));
    assert_eq!(config.keys.lookup(DEMO_KEY.as_bytes()), Some(0));
    assert_eq!(config.keys.lookup(b"sk-5"), None);
    // config check reports both forms.
    let file = temp_file("pack-plugin.json", &plugin);
    let run = tollgate(&["config", "check", file.to_str()], "", &[("K", "sk-p")]);
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(
        run.out,
        format!(
            "{}: OK (6 clients: 1 in clients, 5 in key_set; limiter local)\n",
            file.display()
        )
    );
    let run = tollgate(
        &["config", "check", "--explain", file.to_str()],
        "",
        &[("K", "sk-p")],
    );
    assert!(
        run.out
            .contains("  and 5 clients in key_set (key_sha256), 1 to 5 requests/min"),
        "{}",
        run.out
    );
    // --out writes the same string to a file.
    let out = temp_file("pack-out.txt", "");
    let run = tollgate(
        &["keys", "pack", list.to_str(), "--out", out.to_str()],
        "",
        &[],
    );
    assert_eq!((run.code, run.out.as_str()), (0, ""));
    assert_eq!(std::fs::read_to_string(&out.0).unwrap().trim(), set);
}

#[test]
fn keys_pack_of_a_plugin_configuration_keeps_what_a_record_cannot_hold() {
    let plugin = format!(
        r#"{{"clients":[{{"name":"a","key_sha256":"{DEMO_SHA256}","tokens_per_minute":50}},
            {{"name":"b","key_md5":"{DEMO_MD5}0"}}],"upstream":{{"api_key_env":"K"}}}}"#
    )
    .replace(&format!("{DEMO_MD5}0"), &"ab".repeat(16));
    let run = tollgate(&["keys", "pack", "-"], &plugin, &[]);
    assert_eq!(run.code, 0, "{}", run.err);
    assert!(run
        .err
        .starts_with("packed 1 clients into key_set; 1 stay in \"clients\""));
    let out = json(&run.out);
    assert_eq!(out["clients"].as_array().unwrap().len(), 1);
    assert_eq!(out["clients"][0]["name"], "b");
    assert!(out["key_set"].is_string());
    assert_eq!(out["upstream"]["api_key_env"], "K");
}

#[test]
fn keys_pack_and_config_check_name_what_is_wrong() {
    // A list client a record cannot hold, and one the filter refuses: named in FILE's terms.
    let list = format!(r#"[{{"name":"a","key_sha256":"{DEMO_SHA256}","models":["x"]}}]"#);
    let run = tollgate(&["keys", "pack", "-"], &list, &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.err
            .starts_with("error: <stdin>: clients[0].models: cannot be packed"),
        "{}",
        run.err
    );
    let list = format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA256}"}},{{"name":"a.b","key_sha256":"{}"}}]"#,
        "0".repeat(64)
    );
    let run = tollgate(&["keys", "pack", "-"], &list, &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.err
            .starts_with("error: <stdin>: clients[1].name: \"a.b\" is not a valid"),
        "{}",
        run.err
    );
    // A key set whose second record repeats the first's name: config check names the record.
    let list = format!(
        r#"[{{"name":"a","key_sha256":"{DEMO_SHA256}"}},{{"name":"b","key_sha256":"{}"}}]"#,
        "0".repeat(64)
    );
    let set = tollgate(&["keys", "pack", "-"], &list, &[]).out;
    let plugin = format!(
        r#"{{"clients":[{{"name":"b","key_sha256":"{}"}}],"key_set":"{}","upstream":{{"api_key_env":"K"}}}}"#,
        "1".repeat(64),
        set.trim()
    );
    let run = tollgate(&["config", "check", "-"], &plugin, &[("K", "sk-p")]);
    assert_eq!(run.code, 1);
    // Records are sorted by digest: "b" (digest 00..) is record 0.
    assert_eq!(
        run.err,
        "<stdin>: invalid plugin configuration: key_set[0].name: duplicate client name \"b\" \
         (also clients[0])\n"
    );
}

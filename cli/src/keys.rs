//! `tollgate keys new` and `tollgate keys hash`: client keys and the config entries that hold
//! their digests.
//!
//! A key is shown once and never written anywhere by Tollgate; the configuration only ever holds
//! its SHA-256. Every entry printed here is first run through the core's own parser, so a name
//! or limit the filter would refuse is refused here, with the filter's words.

use std::io::{BufRead, Read};

use serde::Serialize;
use tollgate_core::config::ConfigError;
use tollgate_core::keys::{bearer_token, Digest, DigestKind, MAX_KEY_LEN};
use tollgate_core::Config;

use crate::args::Parsed;
use crate::{Ctx, Failure};

/// Every key made here starts with this, so a leaked one is recognisable (secret scanners,
/// log reviews) and cannot be mistaken for a provider key.
pub const KEY_PREFIX: &str = "sk-tg-";

/// Characters of the random part.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Length of the random part: 43 uniform base62 characters carry 43 x log2(62) = 256.03 bits,
/// as much as 32 random bytes.
pub const KEY_RANDOM_CHARS: usize = 43;

/// Random bytes at or above this are discarded so that `byte % 62` is uniform (248 = 4 x 62).
const REJECT_FROM: u8 = 248;

/// A random source that keeps failing to give usable bytes is broken; stop instead of looping.
const MAX_RANDOM_ROUNDS: usize = 16;

/// Longest key `keys hash` reads; the filter refuses keys longer than [`MAX_KEY_LEN`] anyway.
const MAX_STDIN_BYTES: u64 = 64 * 1024;

/// Makes a new client key: [`KEY_PREFIX`] and [`KEY_RANDOM_CHARS`] base62 characters from
/// `random` (the operating system's secure source, outside tests).
pub fn generate_key(random: &dyn Fn(&mut [u8]) -> Result<(), String>) -> Result<String, String> {
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    key.push_str(KEY_PREFIX);
    let mut buf = [0u8; 64];
    for _ in 0..MAX_RANDOM_ROUNDS {
        random(&mut buf)?;
        for &b in buf.iter().filter(|&&b| b < REJECT_FROM) {
            if let Some(&c) = ALPHABET.get(usize::from(b % 62)) {
                key.push(char::from(c));
            }
            if key.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS {
                return Ok(key);
            }
        }
    }
    Err("the random source keeps returning unusable bytes".into())
}

/// A client entry for the plugin configuration's `clients`, in the order an operator reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Client name.
    pub name: String,
    /// SHA-256 hex of the key.
    pub key_sha256: String,
    /// Per-minute request limit; the config's default applies when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Per-minute token limit (a later configuration version).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u32>,
    /// Models the client may use (an allow-list, for configurations with model routing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
}

/// The entry options both `keys new` and `keys hash` take.
pub struct EntryOptions {
    name: String,
    rpm: Option<u32>,
    tpm: Option<u32>,
    models: Option<Vec<String>>,
}

impl EntryOptions {
    /// Reads `--name`, `--rpm`, `--tpm`, `--models`; `None` when `--name` is absent.
    pub fn from_args(p: &Parsed) -> Result<Option<Self>, Failure> {
        let Some(name) = p.value("name") else {
            for other in ["rpm", "tpm", "models"] {
                if p.value(other).is_some() {
                    return Err(Failure::Usage(format!(
                        "--{other} belongs to a config entry, which needs --name"
                    )));
                }
            }
            return Ok(None);
        };
        let models = match p.value("models") {
            None => None,
            Some(list) => {
                let models: Vec<String> = list
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty())
                    .collect();
                if models.is_empty() {
                    return Err(Failure::Usage(
                        "--models needs at least one model name: --models gpt-4.1,gpt-4.1-mini"
                            .into(),
                    ));
                }
                Some(models)
            }
        };
        Ok(Some(Self {
            name: name.to_string(),
            rpm: p.value("rpm").map(|v| number("rpm", v)).transpose()?,
            tpm: p.value("tpm").map(|v| number("tpm", v)).transpose()?,
            models,
        }))
    }

    /// The entry for a key with this SHA-256.
    pub fn entry(&self, key_sha256: String) -> Entry {
        Entry {
            name: self.name.clone(),
            key_sha256,
            requests_per_minute: self.rpm,
            tokens_per_minute: self.tpm,
            models: self.models.clone(),
        }
    }
}

fn number(flag: &str, v: &str) -> Result<u32, Failure> {
    v.parse()
        .map_err(|_| Failure::Usage(format!("--{flag}: expected a whole number, got {v:?}")))
}

/// Environment variable named by the throwaway configurations that entries are checked in.
const CHECK_ENV: &str = "TOLLGATE_CLI_ENTRY_CHECK";

/// A well-formed digest, to check an entry's other fields before there is a key.
fn placeholder_digest() -> String {
    "0".repeat(64)
}

/// The two shapes of configuration an entry can be loaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One provider for every request (`upstream`).
    Single,
    /// Model routing (`providers` and `models`), where clients may have model allow-lists.
    Routed,
}

/// Parses a configuration of `shape` whose only client is `entry`, with the core's parser.
fn parse_alone(entry: &Entry, shape: Shape) -> Result<(), ConfigError> {
    let doc = match shape {
        Shape::Single => serde_json::json!({
            "clients": [entry],
            "upstream": { "api_key_env": CHECK_ENV },
        }),
        Shape::Routed => serde_json::json!({
            "clients": [entry],
            "providers": [{ "name": "p", "cluster": "p", "api_key_env": CHECK_ENV }],
            "models": [{ "match": "*", "providers": ["p"] }],
        }),
    };
    let placeholder = |_: &str| Some("tollgate-cli-placeholder".to_string());
    Config::parse(doc.to_string().as_bytes(), &placeholder).map(|_| ())
}

/// What the core says about an entry in one shape of configuration.
enum Verdict {
    /// Accepted.
    Accepted,
    /// This version's configuration has no such field.
    Unknown(ConfigError),
    /// The entry's field is refused, with this error.
    Refused(ConfigError),
    /// The error is about the rest of the throwaway configuration: no verdict on the entry.
    Inconclusive,
}

fn verdict(entry: &Entry, shape: Shape) -> Verdict {
    match parse_alone(entry, shape) {
        Ok(()) => Verdict::Accepted,
        Err(e) if !e.field.starts_with("clients[0]") => Verdict::Inconclusive,
        Err(e) if e.message.starts_with("unknown field") => Verdict::Unknown(e),
        Err(e) => Verdict::Refused(e),
    }
}

/// The command-line flag an entry field comes from.
fn flag_of(field: &str) -> &str {
    match field {
        "name" => "--name",
        "requests_per_minute" => "--rpm",
        "tokens_per_minute" => "--tpm",
        "models" => "--models",
        other => other,
    }
}

/// A refused entry field as a usage error, in the filter's words, naming the flag.
fn usage(e: ConfigError) -> Failure {
    let field = e.field.strip_prefix("clients[0].").unwrap_or(&e.field);
    let flag = flag_of(field.split(['.', '[']).next().unwrap_or(field));
    Failure::Usage(format!("{flag}: {}", e.message))
}

/// Checks `entry` with the core's parser. A name or value the filter refuses is a usage error in
/// the filter's words. A field this version's configuration does not know (none today),
/// or knows only with model routing (model allow-lists), is kept in the entry and explained in a
/// returned note.
pub fn check_entry(entry: &Entry) -> Result<Vec<String>, Failure> {
    let base = Entry {
        tokens_per_minute: None,
        models: None,
        ..entry.clone()
    };
    match verdict(&base, Shape::Single) {
        Verdict::Refused(e) | Verdict::Unknown(e) => return Err(usage(e)),
        Verdict::Accepted | Verdict::Inconclusive => {}
    }

    let mut notes = Vec::new();
    let later = [
        (
            "tokens_per_minute",
            entry.tokens_per_minute.is_some(),
            Entry {
                tokens_per_minute: entry.tokens_per_minute,
                ..base.clone()
            },
        ),
        (
            "models",
            entry.models.is_some(),
            Entry {
                models: entry.models.clone(),
                ..base.clone()
            },
        ),
    ];
    for (field, given, with_it) in later {
        if !given {
            continue;
        }
        let single = verdict(&with_it, Shape::Single);
        if let Verdict::Accepted = single {
            continue;
        }
        let routed = verdict(&with_it, Shape::Routed);
        match (single, routed) {
            (Verdict::Refused(e), Verdict::Accepted) => notes.push(format!(
                "`{field}` works only in a configuration with model routing (`providers` and \
                 `models`); with `upstream`, the filter refuses it: {e}"
            )),
            (_, Verdict::Accepted) => {}
            (_, Verdict::Refused(e)) | (Verdict::Refused(e), _) => return Err(usage(e)),
            (Verdict::Unknown(e), _) | (_, Verdict::Unknown(e)) => notes.push(format!(
                "this Tollgate version's configuration does not accept `{field}` yet ({e}); \
                 the entry keeps it for a version that does: remove it to load the entry now"
            )),
            _ => notes.push(format!(
                "`{field}` could not be checked with this version's parser"
            )),
        }
    }
    Ok(notes)
}

/// `tollgate keys new`.
pub fn new(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    if let Some(extra) = p.positionals.first() {
        return Err(Failure::Usage(format!("unexpected argument {extra:?}")));
    }
    let Some(opts) = EntryOptions::from_args(p)? else {
        return Err(Failure::Usage("--name is required".into()));
    };
    // Check the entry before making the key: nothing secret is made for a refused entry.
    let notes = check_entry(&opts.entry(placeholder_digest()))?;
    let key =
        generate_key(ctx.random).map_err(|e| Failure::Io(format!("cannot make a key: {e}")))?;
    let entry = opts.entry(Digest::of_key(DigestKind::Sha256, key.as_bytes()).to_hex());
    for note in &notes {
        writeln!(ctx.err, "note: {note}")?;
    }
    if p.flag("json") {
        #[derive(Serialize)]
        struct Out<'a> {
            key: &'a str,
            entry: &'a Entry,
        }
        let out = Out {
            key: &key,
            entry: &entry,
        };
        writeln!(ctx.out, "{}", to_json(&out)?)?;
        return Ok(());
    }
    let entry = to_json_pretty(&entry)?;
    writeln!(
        ctx.out,
        "New key for client {:?}. It is shown only now and stored nowhere: give it to the \
         client through a secret store now.\n\n  {key}\n\nIts entry for \"clients\" in the plugin \
         configuration (it holds only the key's SHA-256):\n\n{entry}",
        opts.name
    )?;
    Ok(())
}

fn to_json(v: &impl Serialize) -> Result<String, Failure> {
    serde_json::to_string(v).map_err(|e| Failure::Io(e.to_string()))
}

fn to_json_pretty(v: &impl Serialize) -> Result<String, Failure> {
    serde_json::to_string_pretty(v).map_err(|e| Failure::Io(e.to_string()))
}

/// Why a key read by `keys hash` cannot be a client key.
fn refuse_key(key: &[u8]) -> Option<String> {
    if key.is_empty() {
        return Some(
            "the key is empty: pipe the key in, e.g. printf %s \"$KEY\" | tollgate keys hash"
                .into(),
        );
    }
    // The filter's own extraction: a key it could never read from `Authorization` is no key.
    let header = [b"Bearer ".as_slice(), key].concat();
    match bearer_token([header.as_slice()]) {
        Ok(token) if token == key => None,
        _ => Some(format!(
            "this key can never authenticate: a client key is 1-{MAX_KEY_LEN} visible ASCII \
             characters (no spaces, tabs, control or non-ASCII characters; only one trailing \
             newline is removed)"
        )),
    }
}

/// The key from standard input: all of it, less one trailing line ending (`\n` or `\r\n`).
fn read_key(ctx: &mut Ctx) -> Result<Vec<u8>, Failure> {
    let mut key = Vec::new();
    if ctx.stdin_is_terminal {
        let hidden = NoEcho::new();
        let shown = if hidden.0 { "not shown" } else { "shown" };
        write!(ctx.err, "Key ({shown}; end with Enter): ")?;
        ctx.err.flush()?;
        ctx.stdin
            .take(MAX_STDIN_BYTES)
            .read_until(b'\n', &mut key)?;
        drop(hidden);
        writeln!(ctx.err)?;
    } else {
        ctx.stdin.take(MAX_STDIN_BYTES).read_to_end(&mut key)?;
    }
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    Ok(key)
}

/// Terminal echo off while a key is typed (through `stty`, on the terminal that is standard
/// input), and on again when dropped. `.0` is false when echo could not be turned off.
struct NoEcho(bool);

impl NoEcho {
    fn new() -> Self {
        NoEcho(stty("-echo"))
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if self.0 {
            stty("echo");
        }
    }
}

fn stty(setting: &str) -> bool {
    std::process::Command::new("stty")
        .arg(setting)
        .stdin(std::process::Stdio::inherit())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `tollgate keys hash`.
pub fn hash(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    if !p.positionals.is_empty() {
        return Err(Failure::Usage(
            "keys hash reads the key from standard input, never from arguments (they end up in \
             shell history and process lists): printf %s \"$KEY\" | tollgate keys hash"
                .into(),
        ));
    }
    let opts = EntryOptions::from_args(p)?;
    let notes = match &opts {
        Some(o) => check_entry(&o.entry(placeholder_digest()))?,
        None => Vec::new(),
    };
    let key = read_key(ctx)?;
    if let Some(why) = refuse_key(&key) {
        return Err(Failure::Refused(why));
    }
    let sha256 = Digest::of_key(DigestKind::Sha256, &key).to_hex();
    let md5 = Digest::of_key(DigestKind::Md5, &key).to_hex();
    for note in &notes {
        writeln!(ctx.err, "note: {note}")?;
    }
    let entry = opts.map(|o| o.entry(sha256.clone()));
    if p.flag("json") {
        #[derive(Serialize)]
        struct Out<'a> {
            key_sha256: &'a str,
            key_md5: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            entry: Option<&'a Entry>,
        }
        let out = Out {
            key_sha256: &sha256,
            key_md5: &md5,
            entry: entry.as_ref(),
        };
        writeln!(ctx.out, "{}", to_json(&out)?)?;
        return Ok(());
    }
    writeln!(ctx.out, "key_sha256 {sha256}\nkey_md5 {md5}")?;
    if let Some(entry) = entry {
        let entry = to_json_pretty(&entry)?;
        writeln!(ctx.out, "\n{entry}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn os_random(buf: &mut [u8]) -> Result<(), String> {
        getrandom::fill(buf).map_err(|e| e.to_string())
    }

    #[test]
    fn keys_have_the_prefix_and_256_bits_of_base62() {
        let key = generate_key(&os_random).unwrap();
        assert!(key.starts_with(KEY_PREFIX), "{key}");
        let random = &key[KEY_PREFIX.len()..];
        assert_eq!(random.len(), KEY_RANDOM_CHARS);
        assert!(random.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");
        assert!((KEY_RANDOM_CHARS as f64) * 62f64.log2() >= 256.0);
    }

    #[test]
    fn every_character_is_used_and_keys_differ() {
        // 200 keys are 8600 characters, about 139 of each; a character that never appears
        // would mean a broken mapping (chance of a false alarm: about 62 x e^-139).
        let keys: Vec<String> = (0..200)
            .map(|_| generate_key(&os_random).unwrap())
            .collect();
        let mut seen = [0usize; 62];
        for k in &keys {
            for b in k[KEY_PREFIX.len()..].bytes() {
                seen[ALPHABET.iter().position(|&a| a == b).unwrap()] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len());
    }

    #[test]
    fn biased_bytes_are_rejected_not_folded() {
        // 248..=255 would map to 0..=7 a second time; they must be skipped.
        let calls = Cell::new(0);
        let rng = |buf: &mut [u8]| {
            calls.set(calls.get() + 1);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = if i % 2 == 0 { 250 } else { 61 };
            }
            Ok(())
        };
        let key = generate_key(&rng).unwrap();
        assert_eq!(&key[KEY_PREFIX.len()..], "z".repeat(KEY_RANDOM_CHARS));
        assert_eq!(calls.get(), 2, "32 usable bytes per call");

        let broken = |buf: &mut [u8]| {
            buf.fill(255);
            Ok(())
        };
        assert!(generate_key(&broken).is_err());
        let failing = |_: &mut [u8]| Err("no entropy".to_string());
        assert_eq!(generate_key(&failing).unwrap_err(), "no entropy");
    }

    fn entry(name: &str) -> Entry {
        Entry {
            name: name.into(),
            key_sha256: placeholder_digest(),
            requests_per_minute: None,
            tokens_per_minute: None,
            models: None,
        }
    }

    #[test]
    fn entries_serialize_in_reading_order_without_absent_fields() {
        let mut e = entry("team-a");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            format!(r#"{{"name":"team-a","key_sha256":"{}"}}"#, "0".repeat(64))
        );
        e.requests_per_minute = Some(5);
        e.models = Some(vec!["a".into()]);
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            format!(
                r#"{{"name":"team-a","key_sha256":"{}","requests_per_minute":5,"models":["a"]}}"#,
                "0".repeat(64)
            )
        );
    }

    #[test]
    fn entries_are_checked_by_the_core() {
        assert_eq!(check_entry(&entry("team-a")).unwrap(), Vec::<String>::new());
        let Err(Failure::Usage(m)) = check_entry(&entry("a.b")) else {
            panic!()
        };
        assert!(
            m.starts_with("--name: \"a.b\" is not a valid client name"),
            "{m}"
        );
        let mut e = entry("a");
        e.requests_per_minute = Some(0);
        let Err(Failure::Usage(m)) = check_entry(&e) else {
            panic!()
        };
        assert_eq!(m, "--rpm: must be between 1 and 1000000000, got 0");
    }

    #[test]
    fn fields_that_need_more_configuration_are_kept_with_a_note() {
        let mut e = entry("a");
        e.tokens_per_minute = Some(1000);
        e.models = Some(vec!["gpt-4.1".into()]);
        let notes = check_entry(&e).unwrap();
        // Token limits are accepted; an allow-list needs model routing, so it gets a note.
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("`models`"), "{notes:?}");
        assert!(notes[0].contains("model routing"), "{notes:?}");
    }

    #[test]
    fn keys_the_filter_cannot_read_are_refused() {
        assert!(refuse_key(b"sk-tollgate-demo").is_none());
        assert!(refuse_key(b"").unwrap().contains("empty"));
        for bad in [&b"a b"[..], b"a\n", b" a", b"a\t", "é".as_bytes()] {
            assert!(refuse_key(bad).is_some(), "{bad:?}");
        }
        assert!(refuse_key(&[b'a'; MAX_KEY_LEN]).is_none());
        assert!(refuse_key(&[b'a'; MAX_KEY_LEN + 1]).is_some());
    }
}

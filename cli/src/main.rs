//! `tollgate`: the operator's command for the Tollgate gateway, built on the filter's own core.
//!
//! - `tollgate keys new`: a new client key and its config entry (the key's digest only);
//! - `tollgate keys hash`: the digests of an existing key, read from standard input;
//! - `tollgate keys add | revoke | rotate FILE`: a client's keys edited in a configuration file;
//! - `tollgate keys pack FILE`: JSON clients packed into a `key_set`, for large key sets;
//! - `tollgate config check`: the filter's parser on a plugin configuration or an Envoy bootstrap;
//! - `tollgate spend`: spend per client and model in a day, week or month, from Redis.
//!
//! Exit codes: 0 success, 1 an invalid configuration or a refused key, 2 a usage or I/O error.

mod args;
mod check;
mod edit;
mod envoy;
mod explain;
mod keys;
mod pack;
mod spend;

use std::io::{self, BufRead, IsTerminal, Write};
use std::process::ExitCode;

use args::{flag, value, Opt, Parsed};

/// Everything a command touches outside itself, so that tests can supply their own.
pub struct Ctx<'a> {
    /// Environment variable lookup (`std::env::var` outside tests).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Fills a buffer from a secure random source (`getrandom` outside tests).
    pub random: &'a dyn Fn(&mut [u8]) -> Result<(), String>,
    /// Standard input.
    pub stdin: &'a mut dyn BufRead,
    /// Whether standard input is a terminal (then a key is read up to the end of the line).
    pub stdin_is_terminal: bool,
    /// Standard output: results.
    pub out: &'a mut dyn Write,
    /// Standard error: errors, warnings, notes.
    pub err: &'a mut dyn Write,
}

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The command line is wrong (exit 2, with the usage line).
    Usage(String),
    /// A file or stream could not be read or written (exit 2).
    Io(String),
    /// The input was refused, for this reason (exit 1).
    Refused(String),
    /// The check failed and has said why already (exit 1).
    Failed,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e.to_string())
    }
}

/// Exit code of a usage or I/O error.
const EXIT_USAGE: u8 = 2;
/// Exit code of an invalid configuration or refused input.
const EXIT_INVALID: u8 = 1;

type Run = fn(&Parsed, &mut Ctx) -> Result<(), Failure>;

/// A command: its two words, usage line, help text, options and implementation.
struct Command {
    words: [&'static str; 2],
    usage: &'static str,
    help: &'static str,
    opts: &'static [Opt],
    run: Run,
}

const ENTRY_OPTS: [Opt; 4] = [
    value("name", "NAME"),
    value("rpm", "N"),
    value("tpm", "N"),
    value("models", "M1,M2"),
];

const COMMANDS: &[Command] = &[
    Command {
        words: ["keys", "new"],
        usage: "tollgate keys new --name NAME [--rpm N] [--tpm N] [--models M1,M2] [--json]",
        help: "\
Makes a new client key from the operating system's secure random source: `sk-tg-` and 43 base62
characters (256 bits). The key is printed once and stored nowhere; then the client's entry for
the plugin configuration's \"clients\", which holds only the key's SHA-256.

Options:
  --name NAME     the client's name (1-64 letters, digits, '-' or '_'; required)
  --rpm N         requests per minute (default: the configuration's default_requests_per_minute)
  --tpm N         tokens per minute, as tokens_per_minute in the entry
  --models M1,M2  models the client may use (names or globs), as models in the entry: an
                  allow-list, which needs a configuration with model routing (a note says so)
  --json          print one JSON object {\"key\": ..., \"entry\": {...}}, for scripts

Exit codes: 0 made, 2 usage error (e.g. a name the filter would refuse).",
        opts: &[
            ENTRY_OPTS[0],
            ENTRY_OPTS[1],
            ENTRY_OPTS[2],
            ENTRY_OPTS[3],
            flag("json"),
        ],
        run: keys::new,
    },
    Command {
        words: ["keys", "hash"],
        usage: "printf %s \"$KEY\" | tollgate keys hash [--name NAME [--rpm N] [--tpm N] [--models M1,M2]] [--json]",
        help: "\
Prints the SHA-256 and MD5 digests (hex) of a key read from standard input, and with --name a
config entry for it. The key is never taken from an argument, so it stays out of shell history
and process lists. One trailing newline is removed; nothing else is. A key the filter could never
read from `Authorization: Bearer` (empty, spaces, control or non-ASCII characters, more than 512
characters) is refused. From a terminal, the key is read up to Enter and not echoed.

Options:
  --name NAME     also print the client's config entry (key_sha256)
  --rpm, --tpm, --models   as for `tollgate keys new`
  --json          print one JSON object {\"key_sha256\", \"key_md5\"[, \"entry\"]}

Exit codes: 0 done, 1 key refused, 2 usage error.",
        opts: &[
            ENTRY_OPTS[0],
            ENTRY_OPTS[1],
            ENTRY_OPTS[2],
            ENTRY_OPTS[3],
            flag("json"),
        ],
        run: keys::hash,
    },
    Command {
        words: ["keys", "add"],
        usage: "tollgate keys add FILE --name NAME [--label L] [--expires-at T] [--rpm N] [--tpm N] [--json]",
        help: "\
Adds a new key to client NAME in FILE, or a new client NAME with that key. The key is made as by
`keys new`, printed once and stored nowhere; FILE gets its SHA-256 in the client's `keys` list.

FILE is the filter's discovery file of a live-reload deployment (tollgate.json: Envoy applies
the change within a second), a plugin configuration (JSON object with \"clients\") or a clients
array (clients.json). The edited configuration is checked with the filter's own parser first:
if the filter would refuse it, nothing is written. FILE is then replaced in one rename.

Options:
  --name NAME       the client (required)
  --label L         a label for the key (1-64 letters, digits, '-', '_', '.', ':', '@')
  --expires-at T    RFC 3339 time from which the key is refused, e.g. 2025-07-01T00:00:00Z
  --rpm N, --tpm N  limits of a new client (an existing client keeps its own)
  --json            print {\"client\", \"key\", \"file\"}

Exit codes: 0 written, 1 refused (nothing written), 2 usage or I/O error.",
        opts: &[
            value("name", "NAME"),
            value("label", "L"),
            value("expires-at", "T"),
            value("rpm", "N"),
            value("tpm", "N"),
            flag("json"),
        ],
        run: edit::add,
    },
    Command {
        words: ["keys", "revoke"],
        usage: "tollgate keys revoke FILE --name NAME (--label L | --key-sha256 HEX | --all)",
        help: "\
Removes keys of client NAME from FILE (see `keys add` for FILE): the key with label L, the key
with this SHA-256, or with --all every key and so the client. A client left without keys is
removed. Checked with the filter's parser before FILE is replaced in one rename.

Exit codes: 0 written, 1 refused (nothing written), 2 usage or I/O error.",
        opts: &[
            value("name", "NAME"),
            value("label", "L"),
            value("key-sha256", "HEX"),
            flag("all"),
        ],
        run: edit::revoke,
    },
    Command {
        words: ["keys", "rotate"],
        usage: "tollgate keys rotate FILE --name NAME [--label L] [--old-expires-at T] [--json]",
        help: "\
Adds a new key to client NAME in FILE (see `keys add`) and, with --old-expires-at, makes its
other keys expire at T (one that expires earlier keeps its time). Both keys spend the client's
one budget; move the client to the new key, then revoke the old one (or let it expire).

Options:
  --name NAME            the client (required; it must exist)
  --label L              the new key's label
  --old-expires-at T     RFC 3339 time from which the client's other keys are refused
  --json                 print {\"client\", \"key\", \"file\"}

Exit codes: 0 written, 1 refused (nothing written), 2 usage or I/O error.",
        opts: &[
            value("name", "NAME"),
            value("label", "L"),
            value("old-expires-at", "T"),
            flag("json"),
        ],
        run: edit::rotate,
    },
    Command {
        words: ["keys", "pack"],
        usage: "tollgate keys pack FILE [--out FILE]",
        help: "\
Packs JSON clients into a key_set: one base64 string of binary records (the SHA-256 of the key,
requests_per_minute, tokens_per_minute, the name), which Envoy and the filter load in a fraction
of the time and memory of JSON clients. For key sets of tens of thousands of clients.

FILE (`-` for standard input) is either
  - a clients array (clients.json): every client must have only name, key_sha256 and
    optionally requests_per_minute and tokens_per_minute; the output is the key_set string,
    the value of \"key_set\" in the plugin configuration;
  - a plugin configuration: the clients that fit a record move into its key_set (merged with
    one already there), the others (models, endpoints, keys lists, key_md5, budgets, cache)
    stay in \"clients\"; the output is the configuration, compact.
A limit left out is 0 in the record: the configuration's default_requests_per_minute or
default_tokens_per_minute. Everything is checked with the filter's parser first (errors name
clients[i] of FILE) and the result again as the filter will read it.

Options:
  --out FILE   write the result to FILE instead of standard output

Exit codes: 0 packed, 1 refused, 2 usage or I/O error.",
        opts: &[value("out", "FILE")],
        run: pack::run,
    },
    Command {
        words: ["config", "check"],
        usage: "tollgate config check FILE [--explain] [--strict-env] [--timings]",
        help: "\
Checks a Tollgate configuration with the filter's own parser: the verdict and the error message
are the ones the filter logs after `invalid plugin configuration: `. FILE (`-` for standard
input) is the plugin configuration (JSON) or an Envoy bootstrap (YAML, or JSON with
static_resources), in which every envoy.filters.http.wasm filter is checked and named by its
path: those of the listeners' HTTP connection managers and the upstream filters of clusters.

Environment variables the configuration names (api_key_env of upstream or providers,
limiter.basic_auth_env) rarely exist where the check runs: one that is not set here is replaced
by a placeholder, with a warning. In a bootstrap, a variable missing from the filter's
host_env_keys is a warning too.

Options:
  --explain     print what the configuration means: clients and limits, the provider side
                (upstream, or providers and model routes), the limiter
  --strict-env  use this environment exactly as the filter would (only host_env_keys and
                key_values of a bootstrap's filter), so a missing variable is an error
  --timings     print to standard error how long reading the file and each phase of the
                parser took (json, clients, key_index, rest), in milliseconds

Exit codes: 0 valid, 1 invalid, 2 usage or I/O error.",
        opts: &[flag("explain"), flag("strict-env"), flag("timings")],
        run: check::run,
    },
    // One word: `tollgate spend`.
    Command {
        words: ["spend", ""],
        usage: "tollgate spend [--redis HOST:PORT] [--password-env VAR] [--window day|week|month] [--date YYYY-MM-DD] [--utc-offset-minutes N] [--client NAME] [--currency CODE] [--json]",
        help: "\
Prints what each client spent on each model in one window, from the spend records the Redis
limiter keeps (`tollgate:spend:<day>:<client>:<model>`, micro-units, written by every Envoy as
its responses end; kept about 400 days). Only configurations with the Redis limiter and prices
write them.

Options:
  --redis HOST:PORT         Redis (not Webdis); default 127.0.0.1:6379
  --password-env VAR        send AUTH with the password in this environment variable
  --window day|week|month   the window (ISO weeks start on Monday); default month
  --date YYYY-MM-DD         a day in the window; default today
  --utc-offset-minutes N    the configuration's budget_utc_offset_minutes (days are counted in
                            that time zone); default 0
  --client NAME             only this client
  --currency CODE           the configuration's currency, for the heading; default USD
  --json                    one JSON object: window, from, to, currency, spend [{client, model,
                            micros}], total_micros

Exit codes: 0 done, 2 usage error or Redis unreachable.",
        opts: &[
            value("redis", "HOST:PORT"),
            value("password-env", "VAR"),
            value("window", "W"),
            value("date", "YYYY-MM-DD"),
            value("utc-offset-minutes", "N"),
            value("client", "NAME"),
            value("currency", "CODE"),
            flag("json"),
        ],
        run: spend::run,
    },
];

fn top_help() -> String {
    let mut s = format!(
        "tollgate {}: client keys and configuration checks for the Tollgate gateway\n\nUsage:\n",
        env!("CARGO_PKG_VERSION")
    );
    for c in COMMANDS {
        s.push_str("  ");
        s.push_str(c.usage);
        s.push('\n');
    }
    s.push_str(
        "  tollgate help [COMMAND] | tollgate --version\n\n\
         `tollgate COMMAND --help` explains a command. Exit codes: 0 success, 1 an invalid\n\
         configuration or a refused key, 2 a usage or I/O error.\n",
    );
    s
}

fn group_help(group: &str) -> String {
    let mut s = String::from("Usage:\n");
    for c in COMMANDS.iter().filter(|c| c.words[0] == group) {
        s.push_str("  ");
        s.push_str(c.usage);
        s.push('\n');
    }
    s
}

fn command_help(c: &Command) -> String {
    format!("Usage: {}\n\n{}\n", c.usage, c.help)
}

/// Runs the command line `args` (without the program name); returns the exit code.
pub fn run(args: &[String], ctx: &mut Ctx) -> u8 {
    match dispatch(args, ctx) {
        Ok(()) => 0,
        Err((failure, command)) => {
            // If standard error is gone there is no one left to tell.
            let _ = report(&failure, command, ctx);
            match failure {
                Failure::Usage(_) | Failure::Io(_) => EXIT_USAGE,
                Failure::Refused(_) | Failure::Failed => EXIT_INVALID,
            }
        }
    }
}

fn report(failure: &Failure, command: Option<&Command>, ctx: &mut Ctx) -> io::Result<()> {
    match failure {
        Failure::Usage(m) => {
            writeln!(ctx.err, "error: {m}\n")?;
            match command {
                Some(c) => writeln!(
                    ctx.err,
                    "Usage: {}\n`{} --help` tells more.",
                    c.usage,
                    format!("tollgate {} {}", c.words[0], c.words[1]).trim_end()
                ),
                None => write!(ctx.err, "{}", top_help()),
            }
        }
        Failure::Io(m) | Failure::Refused(m) => writeln!(ctx.err, "error: {m}"),
        Failure::Failed => Ok(()),
    }
}

type Dispatched = Result<(), (Failure, Option<&'static Command>)>;

fn dispatch(args: &[String], ctx: &mut Ctx) -> Dispatched {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let print = |ctx: &mut Ctx, text: &str| -> Dispatched {
        write!(ctx.out, "{text}").map_err(|e| (e.into(), None))
    };
    let find = |group: &str, name: &str| {
        COMMANDS
            .iter()
            .find(|c| c.words[0] == group && c.words[1] == name)
    };
    let is_group = |w: &str| COMMANDS.iter().any(|c| c.words[0] == w);
    match words.as_slice() {
        [] => Err((Failure::Usage("a command is required".into()), None)),
        ["-h" | "--help"] | ["help"] => print(ctx, &top_help()),
        ["-V" | "--version"] => print(ctx, &format!("tollgate {}\n", env!("CARGO_PKG_VERSION"))),
        ["help", group] if is_group(group) => print(ctx, &group_help(group)),
        ["help", group, name] => match find(group, name) {
            Some(c) => print(ctx, &command_help(c)),
            None => Err((
                Failure::Usage(format!("no command \"{group} {name}\"")),
                None,
            )),
        },
        ["help", "spend"] => match find("spend", "") {
            Some(c) => print(ctx, &command_help(c)),
            None => Err((Failure::Usage("no such command".into()), None)),
        },
        ["help", ..] => Err((Failure::Usage("no such command".into()), None)),
        ["spend", ..] => {
            let Some(c) = find("spend", "") else {
                return Err((Failure::Usage("no command \"spend\"".into()), None));
            };
            let rest = args.get(1..).unwrap_or_default();
            let parsed = args::parse(rest, c.opts).map_err(|m| (Failure::Usage(m), Some(c)))?;
            if parsed.help {
                return print(ctx, &command_help(c));
            }
            (c.run)(&parsed, ctx).map_err(|f| (f, Some(c)))
        }
        [group, "-h" | "--help"] if is_group(group) => print(ctx, &group_help(group)),
        [group] if is_group(group) => Err((
            Failure::Usage(format!("\"{group}\" needs a subcommand")),
            None,
        )),
        [group, name, ..] if is_group(group) => {
            let Some(c) = find(group, name) else {
                return Err((
                    Failure::Usage(format!("no command \"{group} {name}\"")),
                    None,
                ));
            };
            let rest = args.get(2..).unwrap_or_default();
            let parsed = args::parse(rest, c.opts).map_err(|m| (Failure::Usage(m), Some(c)))?;
            if parsed.help {
                return print(ctx, &command_help(c));
            }
            (c.run)(&parsed, ctx).map_err(|f| (f, Some(c)))
        }
        [other, ..] => Err((Failure::Usage(format!("no command {other:?}")), None)),
    }
}

fn main() -> ExitCode {
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(a) => args.push(a),
            Err(a) => {
                eprintln!("error: argument {a:?} is not valid UTF-8");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let stdin = io::stdin();
    let stdin_is_terminal = stdin.is_terminal();
    let mut stdin = stdin.lock();
    let mut out = io::stdout().lock();
    let mut err = io::stderr().lock();
    let env = |name: &str| std::env::var(name).ok();
    let random = |buf: &mut [u8]| getrandom::fill(buf).map_err(|e| e.to_string());
    let mut ctx = Ctx {
        env: &env,
        random: &random,
        stdin: &mut stdin,
        stdin_is_terminal,
        out: &mut out,
        err: &mut err,
    };
    let mut code = run(&args, &mut ctx);
    if out.flush().is_err() && code == 0 {
        code = EXIT_USAGE;
    }
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a command line against fakes; returns (exit code, stdout, stderr).
    fn run_with(line: &str, stdin: &str) -> (u8, String, String) {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        let env = |name: &str| (name == "TOLLGATE_PROVIDER_KEY").then(|| "sk-p".to_string());
        let random = |buf: &mut [u8]| {
            buf.fill(7);
            Ok(())
        };
        let mut input = stdin.as_bytes();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut ctx = Ctx {
            env: &env,
            random: &random,
            stdin: &mut input,
            stdin_is_terminal: false,
            out: &mut out,
            err: &mut err,
        };
        let code = run(&args, &mut ctx);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn help_and_version() {
        let (code, out, _) = run_with("--help", "");
        assert_eq!(code, 0);
        for c in COMMANDS {
            assert!(out.contains(c.usage), "{out}");
        }
        let (code, out, _) = run_with("keys new --help", "");
        assert_eq!(code, 0);
        assert!(out.starts_with("Usage: tollgate keys new"), "{out}");
        assert_eq!(
            run_with("help config check", "").1,
            command_help(
                COMMANDS
                    .iter()
                    .find(|c| c.words == ["config", "check"])
                    .unwrap()
            )
        );
        assert_eq!(run_with("keys --help", "").0, 0);
        let (code, out, _) = run_with("--version", "");
        assert_eq!((code, out.trim()), (0, "tollgate 0.1.0"));
    }

    #[test]
    fn usage_errors_exit_2_on_stderr() {
        for line in [
            "",
            "frobnicate",
            "keys",
            "keys rotate",
            "keys new",
            "keys new --name",
            "keys new --name a --rpm five",
            "keys new --name a extra",
            "keys hash sk-secret",
            "config check",
            "config check a b",
            "config check --strict",
            "keys hash --rpm 5",
            "keys new --name a --models ,",
            "help nothing here",
        ] {
            let (code, out, err) = run_with(line, "k");
            assert_eq!(code, 2, "{line}: {err}");
            assert!(out.is_empty(), "{line}: {out}");
            assert!(err.starts_with("error: "), "{line}: {err}");
        }
        let (_, _, err) = run_with("keys hash sk-secret", "");
        assert!(err.contains("standard input"), "{err}");
        assert!(!err.contains("sk-secret"), "the key is not echoed: {err}");
        let (_, _, err) = run_with("keys new --nme a", "");
        assert!(err.contains("Usage: tollgate keys new"), "{err}");
    }

    #[test]
    fn keys_new_uses_the_injected_random_source() {
        let (code, out, err) = run_with("keys new --name team-a --rpm 5 --json", "");
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["key"], format!("sk-tg-{}", "7".repeat(43)));
        assert_eq!(v["entry"]["name"], "team-a");
        assert_eq!(v["entry"]["requests_per_minute"], 5);
    }

    #[test]
    fn keys_hash_reads_stdin() {
        let (code, out, _) = run_with("keys hash", "sk-tollgate-demo\n");
        assert_eq!(code, 0);
        assert_eq!(
            out,
            "key_sha256 179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f\n\
             key_md5 32bd3c47e408828a22d81d4fe5f3c06d\n"
        );
        let (code, _, err) = run_with("keys hash", "\n");
        assert_eq!(code, 1);
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn config_check_of_standard_input() {
        let json = r#"{"clients":[{"name":"a","key_md5":"32bd3c47e408828a22d81d4fe5f3c06d"}],
                       "upstream":{"api_key_env":"TOLLGATE_PROVIDER_KEY"}}"#;
        let (code, out, err) = run_with("config check - --strict-env", json);
        assert_eq!((code, err.as_str()), (0, ""));
        assert_eq!(out, "<stdin>: OK (1 client, limiter local)\n");
        // Byte for byte the core's message, whatever it is in this version of the core.
        let broken = r#"{"clients":[{"name":"a","key_sha256":"abc"}],"upstream":{"api_key_env":"TOLLGATE_PROVIDER_KEY"}}"#;
        let expected = tollgate_core::Config::parse(broken.as_bytes(), &|_| Some("k".into()))
            .unwrap_err()
            .to_string();
        let (code, out, err) = run_with("config check -", broken);
        assert_eq!(code, 1);
        assert!(out.is_empty());
        assert_eq!(
            err,
            format!("<stdin>: invalid plugin configuration: {expected}\n")
        );
        assert!(expected.starts_with("clients[0].key_sha256: expected 64 hex characters"));
    }

    #[test]
    fn config_check_timings_name_every_phase() {
        let json = r#"{"clients":[{"name":"a","key_md5":"32bd3c47e408828a22d81d4fe5f3c06d"}],
                       "upstream":{"api_key_env":"TOLLGATE_PROVIDER_KEY"}}"#;
        let (code, out, err) = run_with("config check - --strict-env --timings", json);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "<stdin>: OK (1 client, limiter local)\n");
        let phases: Vec<&str> = err
            .lines()
            .map(|l| {
                assert!(l.starts_with("timing: ") && l.ends_with(" ms"), "{l}");
                l.split(' ').nth(1).unwrap_or_default()
            })
            .collect();
        assert_eq!(
            phases,
            ["read", "json", "clients", "key_index", "rest", "total"]
        );
    }
}

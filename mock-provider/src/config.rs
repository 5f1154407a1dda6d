//! Command line. Hand-rolled: seven flags don't justify a parser dependency.

use std::time::Duration;

pub const USAGE: &str = "\
mock-provider: a mock OpenAI-compatible provider for tests and demos (never for production).

Usage: mock-provider [--listen ADDR] [--control ADDR] [--name NAME] [--expect-key KEY]
                     [--models a,b,c] [--status N] [--delay-ms N]

  --listen ADDR      provider API address, port 0 picks a free one [default: 127.0.0.1:0];
                     prints `listening on ADDR` once bound
  --control ADDR     also serve the control API (request log, rules, health) on ADDR, never on
                     the provider address; prints `control on ADDR` as the second line
                     [default: no control API]
  --name NAME        owned_by of the models and x-mock-name response header [default: mock]
  --expect-key KEY   answer 401 to /v1/* requests without `authorization: Bearer KEY`
  --models LIST      comma-separated ids for /v1/models
                     [default: gpt-4.1,gpt-4.1-mini,gpt-4o-mini,deepseek-chat,text-embedding-3-small]
  --status N         status for every /v1/* request: 200, or an error 400-599 [default: 200]
  --delay-ms N       wait before every /v1/* response's headers [default: 0]
";

pub const DEFAULT_MODELS: &str =
    "gpt-4.1,gpt-4.1-mini,gpt-4o-mini,deepseek-chat,text-embedding-3-small";
/// Upper bound on any injected wait, so a typo cannot park a connection for days.
pub const MAX_DELAY_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: String,
    /// Control API address; `None` means the log and rules cannot be read or set at all.
    pub control: Option<String>,
    pub name: String,
    pub expect_key: Option<String>,
    pub models: Vec<String>,
    pub status: u16,
    pub delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:0".to_string(),
            control: None,
            name: "mock".to_string(),
            expect_key: None,
            models: split_models(DEFAULT_MODELS),
            status: 200,
            delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Config),
    Help,
}

fn split_models(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

/// Values end up in response headers and JSON, so they must be printable ASCII.
fn header_safe(flag: &str, value: String) -> Result<String, String> {
    if value.is_empty() || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("{flag} must be non-empty printable ASCII"));
    }
    Ok(value)
}

/// 200 means "answer normally"; anything else must be an error status.
pub fn parse_status(value: &str) -> Option<u16> {
    value
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|&s| s == 200 || (400..=599).contains(&s))
}

pub fn parse_delay_ms(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&ms| ms <= MAX_DELAY_MS)
        .map(Duration::from_millis)
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut cfg = Config::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => cfg.listen = value()?,
            "--control" => cfg.control = Some(value()?),
            "--name" => cfg.name = header_safe("--name", value()?)?,
            "--expect-key" => cfg.expect_key = Some(header_safe("--expect-key", value()?)?),
            "--models" => cfg.models = split_models(&value()?),
            "--status" => {
                cfg.status = parse_status(&value()?)
                    .ok_or("--status must be 200 or an error status 400-599")?;
            }
            "--delay-ms" => {
                cfg.delay = parse_delay_ms(&value()?).ok_or(format!(
                    "--delay-ms must be an integer from 0 to {MAX_DELAY_MS}"
                ))?;
            }
            other => return Err(format!("unknown argument: {other}")),
        }
    }
    Ok(Command::Run(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(cfg) => Ok(cfg),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn defaults() {
        let cfg = run(&[]).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.models.len(), 5);
        assert_eq!(cfg.models[4], "text-embedding-3-small");
    }

    #[test]
    fn all_flags() {
        let cfg = run(&[
            "--listen",
            "127.0.0.1:9",
            "--control=127.0.0.1:10",
            "--name=beta",
            "--expect-key",
            "sk-test",
            "--models",
            "a, b,,c",
            "--status",
            "503",
            "--delay-ms=25",
        ])
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9");
        assert_eq!(cfg.control.as_deref(), Some("127.0.0.1:10"));
        assert_eq!(cfg.name, "beta");
        assert_eq!(cfg.expect_key.as_deref(), Some("sk-test"));
        assert_eq!(cfg.models, ["a", "b", "c"]);
        assert_eq!(cfg.status, 503);
        assert_eq!(cfg.delay, Duration::from_millis(25));
    }

    #[test]
    fn bad_flags() {
        for args in [
            &["--status", "302"][..],
            &["--status", "x"],
            &["--delay-ms", "-1"],
            &["--name", ""],
            &["--name", "a\r\nb"],
            &["--listen"],
            &["--control"],
            &["--bogus", "1"],
        ] {
            assert!(run(args).is_err(), "{args:?}");
        }
        assert_eq!(parse(["--help".to_string()]), Ok(Command::Help));
    }
}

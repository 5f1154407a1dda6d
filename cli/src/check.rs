//! `tollgate config check FILE`: the filter's own parser on a plugin configuration, or on every
//! Tollgate configuration in an Envoy bootstrap.
//!
//! The verdict and the message are the filter's: `Config::parse` from `tollgate-core`, with an
//! environment built as Envoy builds the VM's. Only the environment differs by default, because
//! the machine running the check rarely holds the production secrets: a variable the
//! configuration names but that is not set here is replaced by a placeholder, with a warning.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use tollgate_core::config::{LimiterBackend, Mode, Phase};
use tollgate_core::Config;

use crate::args::Parsed;
use crate::envoy::{self, Bootstrap};
use crate::explain::{self, Subject};
use crate::{Ctx, Failure};

/// Stands in for a secret that is not set where the check runs. Valid both as an API key and as
/// Webdis's `user:password`; never sent anywhere.
const PLACEHOLDER: &str = "tollgate-check:placeholder";

/// Where the filter's environment comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvMode {
    /// This machine's environment, with placeholders for what is not set here.
    Lenient,
    /// Exactly what the filter would see if Envoy ran here (`--strict-env`).
    Strict,
}

/// How one environment variable named by the configuration was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvUse {
    /// Variable name.
    pub name: String,
    /// Where its value came from.
    pub source: EnvSource,
}

/// Where a variable's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvSource {
    /// A literal in the filter's `vm_config.environment_variables.key_values`.
    KeyValues,
    /// This machine's environment (listed in `host_env_keys`, for an Envoy bootstrap).
    Here,
    /// Not set here: a placeholder was used.
    Placeholder,
    /// Not listed in the filter's `host_env_keys`: the filter will not see it.
    NotListed,
}

/// The VM environment of one plugin: for an Envoy bootstrap, what its filter passes in.
#[derive(Debug, Clone, Default)]
pub struct VmEnv {
    /// `Some` for a filter of an Envoy bootstrap: only these host variables reach the VM.
    pub host_env_keys: Option<Vec<String>>,
    /// Literal variables set in the bootstrap.
    pub key_values: Vec<(String, String)>,
}

impl VmEnv {
    /// The value the filter would get for `name`, and where it came from.
    fn resolve(
        &self,
        name: &str,
        mode: EnvMode,
        host: &dyn Fn(&str) -> Option<String>,
    ) -> (Option<String>, EnvSource) {
        if let Some((_, v)) = self.key_values.iter().find(|(k, _)| k == name) {
            return (Some(v.clone()), EnvSource::KeyValues);
        }
        let listed = self
            .host_env_keys
            .as_ref()
            .is_none_or(|keys| keys.iter().any(|k| k == name));
        match (mode, listed) {
            (EnvMode::Strict, false) => (None, EnvSource::NotListed),
            (EnvMode::Strict, true) => (host(name), EnvSource::Here),
            (EnvMode::Lenient, false) => (Some(PLACEHOLDER.into()), EnvSource::NotListed),
            (EnvMode::Lenient, true) => match host(name) {
                Some(v) if !v.trim().is_empty() => (Some(v), EnvSource::Here),
                _ => (Some(PLACEHOLDER.into()), EnvSource::Placeholder),
            },
        }
    }
}

/// The result of checking one plugin configuration.
#[derive(Debug)]
pub struct Checked {
    /// The compiled configuration, or the filter's error message.
    pub result: Result<Config, String>,
    /// The environment variables the configuration read, in order.
    pub env: Vec<EnvUse>,
    /// How long each phase of the parser took (`--timings`), in order.
    pub phases: Vec<(Phase, Duration)>,
}

/// Runs the filter's parser on `json` with the environment `vm` gives it.
pub fn check_plugin(
    json: &[u8],
    vm: &VmEnv,
    mode: EnvMode,
    host: &dyn Fn(&str) -> Option<String>,
) -> Checked {
    let used = RefCell::new(Vec::<EnvUse>::new());
    let lookup = |name: &str| {
        let (value, source) = vm.resolve(name, mode, host);
        used.borrow_mut().push(EnvUse {
            name: name.to_string(),
            source,
        });
        value
    };
    let mut phases = Vec::new();
    let mut since = Instant::now();
    let mut done = |phase: Phase| {
        let now = Instant::now();
        phases.push((phase, now.duration_since(since)));
        since = now;
    };
    let result = Config::parse_observed(json, &lookup, &mut done).map_err(|e| e.to_string());
    Checked {
        result,
        env: used.into_inner(),
        phases,
    }
}

/// What the file holds.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// The plugin configuration itself (JSON).
    Plugin,
    /// An Envoy bootstrap (YAML, or JSON with `static_resources`).
    Envoy,
}

/// `.yaml`/`.yml` is a bootstrap; otherwise a JSON object with `static_resources` is a bootstrap
/// and any other document starting with `{` is a plugin configuration; the rest is YAML.
fn kind(path: &str, bytes: &[u8]) -> Kind {
    let ext = Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if matches!(ext.as_deref(), Some("yaml" | "yml")) {
        return Kind::Envoy;
    }
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if ext.as_deref() == Some("json") || first == Some(&b'{') || first.is_none() {
        // Skims the document without building it: a plugin configuration of 100,000 clients
        // would otherwise be parsed into a tree once more just to find its kind.
        #[derive(serde::Deserialize)]
        struct Probe {
            static_resources: Option<serde::de::IgnoredAny>,
        }
        let bootstrap = serde_json::from_slice::<Probe>(bytes)
            .ok()
            .is_some_and(|p| p.static_resources.is_some());
        return if bootstrap { Kind::Envoy } else { Kind::Plugin };
    }
    Kind::Envoy
}

/// The bytes of FILE, or of standard input for `-`.
pub fn read(path: &str, ctx: &mut Ctx) -> Result<Vec<u8>, Failure> {
    let mut bytes = Vec::new();
    if path == "-" {
        ctx.stdin
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::Io(format!("cannot read standard input: {e}")))?;
    } else {
        bytes = std::fs::read(path).map_err(|e| Failure::Io(format!("cannot read {path}: {e}")))?;
    }
    Ok(bytes)
}

/// `tollgate config check`.
pub fn run(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    let path = match p.positionals.as_slice() {
        [one] => one.as_str(),
        [] => return Err(Failure::Usage("FILE is required".into())),
        [_, extra, ..] => return Err(Failure::Usage(format!("unexpected argument {extra:?}"))),
    };
    let mode = if p.flag("strict-env") {
        EnvMode::Strict
    } else {
        EnvMode::Lenient
    };
    let shown = if path == "-" { "<stdin>" } else { path };
    let timings = p.flag("timings");
    let start = Instant::now();
    let bytes = read(path, ctx)?;
    let file_kind = kind(path, &bytes);
    if timings {
        writeln!(ctx.err, "timing: read {} ms", ms(start.elapsed()))?;
    }
    let ok = match file_kind {
        Kind::Plugin => {
            let checked = check_plugin(&bytes, &VmEnv::default(), mode, ctx.env);
            // `from_utf8` first: the lossy conversion validates byte by byte (a tenth of a
            // 100,000-client check), and a configuration is nearly always valid UTF-8.
            let json = match std::str::from_utf8(&bytes) {
                Ok(text) => std::borrow::Cow::Borrowed(text),
                Err(_) => String::from_utf8_lossy(&bytes),
            };
            let mut reporter = Reporter::new(shown, p.flag("explain"));
            reporter.timings = timings;
            reporter.report(None, &json, &checked, None, ctx)?
        }
        Kind::Envoy => {
            let text = match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(_) => {
                    writeln!(ctx.err, "{shown}: not valid UTF-8")?;
                    return Err(Failure::Failed);
                }
            };
            check_bootstrap(shown, &text, mode, p.flag("explain"), timings, ctx)?
        }
    };
    if timings {
        writeln!(ctx.err, "timing: total {} ms", ms(start.elapsed()))?;
    }
    if ok {
        Ok(())
    } else {
        Err(Failure::Failed)
    }
}

/// Milliseconds with a tenth, for `--timings`.
fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn check_bootstrap(
    file: &str,
    text: &str,
    mode: EnvMode,
    explain: bool,
    timings: bool,
    ctx: &mut Ctx,
) -> Result<bool, Failure> {
    let bootstrap = match envoy::parse(text) {
        Ok(b) => b,
        Err(e) => {
            writeln!(ctx.err, "{file}: {e}")?;
            return Ok(false);
        }
    };
    let mut reporter = Reporter::new(file, explain);
    reporter.timings = timings;
    for w in &bootstrap.warnings {
        reporter.warn(None, w, ctx)?;
    }
    if let (Some(kind), true) = (
        &bootstrap.kubernetes_kind,
        bootstrap.wasm_filters.is_empty(),
    ) {
        writeln!(
            ctx.err,
            "{file}: a Kubernetes {kind} manifest, not an Envoy bootstrap: config check reads the \
             plugin configuration (JSON) or an Envoy bootstrap; check the plugin configuration \
             this manifest carries as a JSON file"
        )?;
        return Ok(false);
    }
    if bootstrap.wasm_filters.is_empty() {
        writeln!(
            ctx.err,
            "{file}: no Tollgate configuration found: no envoy.filters.http.wasm filter in the \
             HTTP connection managers of static_resources.listeners or the upstream filters of \
             static_resources.clusters"
        )?;
        return Ok(false);
    }
    let mut all_ok = true;
    for filter in &bootstrap.wasm_filters {
        let json = match &filter.configuration {
            Ok(json) => json,
            Err(e) => {
                writeln!(ctx.err, "{file}: {}: {e}", filter.location)?;
                all_ok = false;
                continue;
            }
        };
        let vm = VmEnv {
            host_env_keys: Some(filter.host_env_keys.clone()),
            key_values: filter.key_values.clone(),
        };
        let checked = check_plugin(json.as_bytes(), &vm, mode, ctx.env);
        all_ok &= reporter.report(
            Some(&filter.location),
            json,
            &checked,
            Some(&bootstrap),
            ctx,
        )?;
    }
    Ok(all_ok)
}

/// Prints verdicts, warnings and explanations for the configurations of one file. A bootstrap
/// often carries one configuration several times (the listener's filter and each provider
/// cluster's): each gets its verdict, but a warning or an explanation is printed once.
struct Reporter<'f> {
    file: &'f str,
    explain: bool,
    /// Print how long each parser phase took (`--timings`), to standard error.
    timings: bool,
    warned: Vec<String>,
    /// Configurations explained so far (text and environment) and where.
    explained: Vec<(String, String)>,
}

impl<'f> Reporter<'f> {
    fn new(file: &'f str, explain: bool) -> Self {
        Self {
            file,
            explain,
            timings: false,
            warned: Vec::new(),
            explained: Vec::new(),
        }
    }

    /// A warning about the file, or about one filter of it (`at`), each said once.
    fn warn(&mut self, at: Option<&str>, text: &str, ctx: &mut Ctx) -> Result<(), Failure> {
        let line = match at {
            Some(at) => format!("warning: {}: {at}: {text}", self.file),
            None => format!("warning: {}: {text}", self.file),
        };
        if !self.warned.contains(&line) {
            writeln!(ctx.err, "{line}")?;
            self.warned.push(line);
        }
        Ok(())
    }

    /// The verdict on one configuration, found `at` in the file; true when it is valid.
    fn report(
        &mut self,
        at: Option<&str>,
        json: &str,
        checked: &Checked,
        bootstrap: Option<&Bootstrap>,
        ctx: &mut Ctx,
    ) -> Result<bool, Failure> {
        let prefix = match at {
            Some(at) => format!("{}: {at}", self.file),
            None => self.file.to_string(),
        };
        if self.timings {
            for (phase, took) in &checked.phases {
                writeln!(ctx.err, "timing: {} {} ms", phase.name(), ms(*took))?;
            }
        }
        for (about_filter, warning) in env_warnings(&checked.env) {
            self.warn(at.filter(|_| about_filter), &warning, ctx)?;
        }
        let config = match &checked.result {
            Ok(c) => c,
            Err(e) => {
                // The filter logs exactly this after its own prefix.
                writeln!(ctx.err, "{prefix}: invalid plugin configuration: {e}")?;
                return Ok(false);
            }
        };
        for w in bootstrap
            .map(|b| cluster_warnings(config, b))
            .unwrap_or_default()
        {
            self.warn(None, &w, ctx)?;
        }
        let missing = explain::unpriced(config);
        if !config.prices.models.is_empty() && !missing.is_empty() {
            let w = format!(
                "models without a price are counted in tokens only (and are free for money \
                 budgets): {}",
                missing.join(", ")
            );
            self.warn(None, &w, ctx)?;
        }
        let n = config.clients.len();
        let s = if n == 1 { "" } else { "s" };
        let limiter = config.limiter.name();
        match config.key_set_clients {
            0 => writeln!(ctx.out, "{prefix}: OK ({n} client{s}, limiter {limiter})")?,
            k => writeln!(
                ctx.out,
                "{prefix}: OK ({n} client{s}: {} in clients, {k} in key_set; limiter {limiter})",
                n - k
            )?,
        }
        if !self.explain {
            return Ok(true);
        }
        let key = format!("{json}\0{:?}", checked.env);
        let here = at.unwrap_or(self.file).to_string();
        match self.explained.iter().find(|(k, _)| *k == key) {
            Some((_, first)) => writeln!(ctx.out, "  the same configuration as {first}")?,
            None => {
                // The document passed the parser, so it is JSON.
                let raw: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
                let subject = Subject {
                    config,
                    raw: &raw,
                    env: &checked.env,
                };
                write!(ctx.out, "{}", explain::explain(&subject))?;
                self.explained.push((key, here));
            }
        }
        Ok(true)
    }
}

/// Warnings about the variables a configuration read; true marks one about the filter's own
/// `host_env_keys` rather than about the environment Envoy needs.
fn env_warnings(used: &[EnvUse]) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for u in used {
        let name = &u.name;
        match u.source {
            EnvSource::KeyValues | EnvSource::Here => {}
            EnvSource::Placeholder => out.push((
                false,
                format!(
                    "environment variable {name:?} is not set here, so it was checked with a \
                     placeholder value; the filter requires it in Envoy's environment, listed in \
                     vm_config.environment_variables.host_env_keys (--strict-env checks with \
                     this environment instead)"
                ),
            )),
            EnvSource::NotListed => out.push((
                true,
                format!(
                    "the configuration reads environment variable {name:?}, which is not in this \
                     filter's vm_config.environment_variables.host_env_keys: the filter cannot \
                     see it and Envoy will refuse the plugin (--strict-env checks as Envoy would)"
                ),
            )),
        }
    }
    out
}

/// Clusters the configuration names (the Redis limiter's Webdis, each provider's) that the
/// bootstrap does not define: every request or callout sent there fails.
fn cluster_warnings(config: &Config, bootstrap: &Bootstrap) -> Vec<String> {
    if bootstrap.dynamic_clusters {
        return Vec::new();
    }
    let mut named = Vec::new();
    if let LimiterBackend::Redis(redis) = &config.limiter {
        named.push((
            "limiter.cluster".to_string(),
            redis.webdis.cluster.clone(),
            "every limiter callout will fail and requests get the on_error behaviour",
        ));
    }
    if let Mode::Routed(routing) = &config.mode {
        for (i, p) in routing.providers.iter().enumerate() {
            named.push((
                format!("providers[{i}].cluster"),
                p.cluster.clone(),
                "requests routed to this provider will fail",
            ));
        }
    }
    named
        .into_iter()
        .filter(|(_, cluster, _)| !bootstrap.clusters.contains(cluster))
        .map(|(field, cluster, effect)| {
            format!("{field} {cluster:?} is not among static_resources.clusters: {effect}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f";

    fn plugin(upstream_env: &str) -> String {
        format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{SHA}"}}],"upstream":{{"api_key_env":"{upstream_env}"}}}}"#
        )
    }

    fn host(name: &str) -> Option<String> {
        match name {
            "SET" => Some("sk-real".into()),
            "SPACED" => Some("sk has spaces".into()),
            "BLANK" => Some("  ".into()),
            _ => None,
        }
    }

    fn sources(c: &Checked) -> Vec<(String, EnvSource)> {
        c.env.iter().map(|u| (u.name.clone(), u.source)).collect()
    }

    #[test]
    fn lenient_mode_uses_placeholders_for_what_is_missing_here() {
        let c = check_plugin(
            plugin("SET").as_bytes(),
            &VmEnv::default(),
            EnvMode::Lenient,
            &host,
        );
        assert!(c.result.is_ok());
        assert_eq!(sources(&c), [("SET".into(), EnvSource::Here)]);
        assert!(env_warnings(&c.env).is_empty());
        // A value set here is used as it is, bad or not (and never echoed).
        let c = check_plugin(
            plugin("SPACED").as_bytes(),
            &VmEnv::default(),
            EnvMode::Lenient,
            &host,
        );
        let e = c.result.unwrap_err();
        assert!(e.contains("not allowed in an API key"), "{e}");
        assert!(!e.contains("sk has"), "{e}");
        for missing in ["UNSET", "BLANK"] {
            let c = check_plugin(
                plugin(missing).as_bytes(),
                &VmEnv::default(),
                EnvMode::Lenient,
                &host,
            );
            assert!(c.result.is_ok());
            assert_eq!(sources(&c), [(missing.into(), EnvSource::Placeholder)]);
            assert_eq!(env_warnings(&c.env).len(), 1);
        }
    }

    #[test]
    fn strict_mode_is_what_the_filter_sees() {
        let c = check_plugin(
            plugin("UNSET").as_bytes(),
            &VmEnv::default(),
            EnvMode::Strict,
            &host,
        );
        let e = c.result.unwrap_err();
        assert!(
            e.starts_with("upstream.api_key_env: environment variable \"UNSET\" is not set"),
            "{e}"
        );
        // In Envoy, only host_env_keys reach the VM, plus literal key_values.
        let vm = VmEnv {
            host_env_keys: Some(vec!["OTHER".into()]),
            key_values: vec![("LIT".into(), "sk-literal".into())],
        };
        let c = check_plugin(plugin("SET").as_bytes(), &vm, EnvMode::Strict, &host);
        assert!(c.result.is_err());
        assert_eq!(sources(&c), [("SET".into(), EnvSource::NotListed)]);
        let c = check_plugin(plugin("LIT").as_bytes(), &vm, EnvMode::Strict, &host);
        assert!(c.result.is_ok());
        assert_eq!(sources(&c), [("LIT".into(), EnvSource::KeyValues)]);
        // Lenient: not listed is a warning, not an error.
        let c = check_plugin(plugin("SET").as_bytes(), &vm, EnvMode::Lenient, &host);
        assert!(c.result.is_ok());
        assert!(env_warnings(&c.env)[0].1.contains("not in this filter's"));
    }

    #[test]
    fn the_placeholder_passes_both_secret_checks() {
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{SHA}"}}],"upstream":{{"api_key_env":"P"}},
                "limiter":{{"backend":"redis","cluster":"webdis","basic_auth_env":"W"}}}}"#
        );
        let c = check_plugin(json.as_bytes(), &VmEnv::default(), EnvMode::Lenient, &host);
        assert!(c.result.is_ok(), "{:?}", c.result);
        assert_eq!(
            sources(&c),
            [
                ("P".into(), EnvSource::Placeholder),
                ("W".into(), EnvSource::Placeholder)
            ]
        );
    }

    #[test]
    fn file_kinds() {
        assert_eq!(kind("a.yaml", b"{}"), Kind::Envoy);
        assert_eq!(kind("a.YML", b""), Kind::Envoy);
        assert_eq!(kind("a.json", b"{\"clients\":[]}"), Kind::Plugin);
        assert_eq!(kind("a.json", b"{broken"), Kind::Plugin);
        assert_eq!(kind("a.json", b""), Kind::Plugin);
        assert_eq!(kind("-", b" {\"static_resources\":{}}"), Kind::Envoy);
        assert_eq!(kind("-", b" {\"clients\":[]}"), Kind::Plugin);
        assert_eq!(kind("envoy.conf", b"static_resources: {}"), Kind::Envoy);
    }

    #[test]
    fn clusters_the_bootstrap_lacks_are_named() {
        let json = format!(
            r#"{{"clients":[{{"name":"a","key_sha256":"{SHA}"}}],
                "providers":[{{"name":"r","cluster":"relay","api_key_env":"SET"}},
                             {{"name":"b","cluster":"backup","api_key_env":"SET"}}],
                "models":[{{"match":"*","providers":["r","b"]}}],
                "limiter":{{"backend":"redis","cluster":"webdis"}}}}"#
        );
        let config = Config::parse(json.as_bytes(), &host).unwrap();
        let mut bootstrap = Bootstrap {
            clusters: vec!["relay".into()],
            ..Bootstrap::default()
        };
        let w = cluster_warnings(&config, &bootstrap);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("limiter.cluster \"webdis\" is not among"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("providers[1].cluster \"backup\" is not among"),
            "{w:?}"
        );
        bootstrap.dynamic_clusters = true;
        assert!(cluster_warnings(&config, &bootstrap).is_empty());
    }
}

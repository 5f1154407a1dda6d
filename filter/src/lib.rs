//! Tollgate's proxy-wasm HTTP filter: the thin layer between Envoy and `tollgate-core`.
//!
//! `host` is the only module that calls Envoy; `plugin` reads a request through it, asks the
//! core what to do, and applies the answer. Nothing here decides anything the core could.

mod host;
mod plugin;

use proxy_wasm::traits::RootContext;

/// Routes the `log` crate to Envoy's log (the SDK's logger unwraps its host call).
struct EnvoyLogger;

impl log::Log for EnvoyLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => host::Level::Error,
            log::Level::Warn => host::Level::Warn,
            log::Level::Info => host::Level::Info,
            log::Level::Debug | log::Level::Trace => host::Level::Debug,
        };
        host::log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

static LOGGER: EnvoyLogger = EnvoyLogger;

proxy_wasm::main! {{
    // Envoy filters by its own log level too (`--component-log-level wasm:debug`).
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
    // Panics are denied by lint, but if one ever happens the line that says why must reach the
    // log before the VM dies.
    std::panic::set_hook(Box::new(|info| {
        host::log(host::Level::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(plugin::Root::default()) });
}}

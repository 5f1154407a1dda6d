//! Tollgate's core: everything that decides, with no proxy-wasm dependency.
//!
//! The filter crate (`filter/`) reads from Envoy, calls into this crate and applies what it
//! returns. Everything here builds and is tested on the host target against small fakes, and is
//! reused by the CLI and the benchmarks.

pub mod access_log;
pub mod anthropic;
pub mod attempt;
pub mod base64;
pub mod batch;
pub mod body;
pub mod cache;
pub mod config;
pub mod endpoints;
pub mod envoy;
pub mod exchange;
pub mod fake;
pub mod forwarding;
pub mod gateway;
pub mod headers;
pub mod host;
pub mod identity;
pub mod keys;
pub mod lease;
pub mod limiter;
pub mod metrics;
pub mod openai;
pub mod request;
pub mod routing;
pub mod spend;
pub mod types;
pub mod upstream;
pub mod usage;
pub mod webdis;

pub use config::{Client, ClientId, Config, ConfigError};

//! The response cache: exact-match caching of deterministic completions.
//!
//! Everything the filter needs to decide and encode, without a host:
//! - which requests may be cached ([`check`]) and what the client asked for ([`cache_control`]);
//! - the key: a SHA-256 of the scope (the client, or everyone), the path, the providers and
//!   model names the rule sends to, and the request body in a canonical form ([`canonical_json`]),
//!   so field order, whitespace and number spelling do not matter;
//! - the stored entry (status, content type, body, when it was stored and expires);
//! - the local backend: a fixed set of Envoy shared-data slots (keys are never deleted, so a
//!   new entry always replaces an old one in a bounded set of keys), 2-way set-associative;
//! - the Redis backend: `GET` and `SET ... EX` as two fixed Lua scripts through Webdis (whose
//!   ACL then allows only `EVAL`, as for the limiter), values base64url-encoded.
//!
//! A cache failure is never a failed request: every error becomes a miss (or a skipped store)
//! and is counted by reason.

mod cacheable;
mod entry;
mod key;
mod local;
mod plan;
mod redis;
mod settings;
#[cfg(test)]
mod tests;

pub use self::cacheable::*;
pub use self::entry::*;
pub use self::key::*;
pub use self::local::*;
pub use self::plan::*;
pub use self::redis::*;
pub use self::settings::*;

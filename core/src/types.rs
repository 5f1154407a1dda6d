//! Small types that several modules share, so that none of them has to depend on another for
//! a name: the compiled configuration uses them, and so do the cache, the keys and the limiter.

use std::fmt;

/// Index of a client in [`crate::Config::clients`]; stable for the life of one compiled config.
pub type ClientId = usize;

/// A Webdis service Tollgate calls (the Redis limiter's, or the response cache's).
#[derive(Clone, PartialEq, Eq)]
pub struct Webdis {
    /// Envoy cluster of the Webdis service.
    pub cluster: String,
    /// `:authority` of callouts to Webdis.
    pub authority: String,
    /// Callout timeout (never 0).
    pub timeout_ms: u32,
    /// `authorization` header for Webdis's HTTP basic auth, if configured.
    pub authorization: Option<String>,
}

impl fmt::Debug for Webdis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webdis")
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("timeout_ms", &self.timeout_ms)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

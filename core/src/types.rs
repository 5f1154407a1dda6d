//! Small types that several modules share, so that none of them has to depend on another for
//! a name: the compiled configuration uses them, and so do the cache, the keys and the limiter;
//! [`Usage`] is read from responses (`usage`) and priced (`spend`). [`push_decimal`] writes the
//! numbers of the request path's headers and keys.

use std::fmt;

/// Appends `n` in decimal to `out`: what `n.to_string()` gives, without a string of its own or
/// the formatting machinery (the request path writes several numbers per request).
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    while let Some(d) = start.checked_sub(1).and_then(|i| digits.get_mut(i)) {
        // `n % 10` is below 10: the cast cannot truncate.
        *d = b'0' + (n % 10) as u8;
        start -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in digits.get(start..).unwrap_or_default() {
        out.push(char::from(d));
    }
}

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

/// Tokens a response used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens; 0 for embeddings.
    pub completion_tokens: u64,
    /// Of the prompt tokens, those served from the provider's prompt cache (billed at the
    /// cached-input price): `prompt_tokens_details.cached_tokens`, or the Responses API's
    /// `input_tokens_details.cached_tokens`; 0 when not reported.
    pub cached_tokens: u64,
    /// Of the completion tokens, those spent reasoning (billed as output):
    /// `completion_tokens_details.reasoning_tokens`, or `output_tokens_details.reasoning_tokens`.
    pub reasoning_tokens: u64,
    /// Of the prompt tokens, those written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`, billed at the cache-write price); 0 for OpenAI's APIs.
    pub cache_write_tokens: u64,
}

impl Usage {
    /// Prompt and completion tokens, without details.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            ..Self::default()
        }
    }
}

//! Response and request ids. They only need to be unique (tests check that two answers differ
//! and that the gateway passes them through), not unpredictable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// SplitMix64's finaliser: a bijection on u64, so distinct inputs give distinct ids.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub struct IdGen {
    seed: u64,
    counter: AtomicU64,
}

impl IdGen {
    /// Seeded from the clock and pid so two mock processes in one test don't collide.
    pub fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        IdGen::with_seed(nanos ^ (u64::from(std::process::id()) << 32))
    }

    pub fn with_seed(seed: u64) -> Self {
        IdGen {
            seed,
            counter: AtomicU64::new(0),
        }
    }

    fn next_pair(&self) -> (u64, u64) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let base = self
            .seed
            .wrapping_add(n.wrapping_mul(2).wrapping_mul(GOLDEN));
        (mix(base), mix(base.wrapping_add(GOLDEN)))
    }

    /// `prefix` followed by 22 base62 characters, e.g. `chatcmpl-…`.
    pub fn object_id(&self, prefix: &str) -> String {
        let (a, b) = self.next_pair();
        let mut out = String::with_capacity(prefix.len() + 22);
        out.push_str(prefix);
        push_base62(&mut out, a);
        push_base62(&mut out, b);
        out
    }

    /// `req_` followed by 32 hex digits, the shape of OpenAI's `x-request-id`.
    pub fn request_id(&self) -> String {
        let (a, b) = self.next_pair();
        format!("req_{a:016x}{b:016x}")
    }
}

/// Fixed width (11 digits covers all of u64) so ids have a constant length.
fn push_base62(out: &mut String, mut v: u64) {
    let mut digits = [b'0'; 11];
    for d in digits.iter_mut().rev() {
        *d = BASE62.get((v % 62) as usize).copied().unwrap_or(b'0');
        v /= 62;
    }
    out.extend(digits.iter().map(|&b| char::from(b)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_and_well_formed() {
        let ids = IdGen::with_seed(42);
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let id = ids.object_id("chatcmpl-");
            assert_eq!(id.len(), "chatcmpl-".len() + 22);
            assert!(id["chatcmpl-".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric()));
            assert!(seen.insert(id));
            let req = ids.request_id();
            assert_eq!(req.len(), 4 + 32);
            assert!(seen.insert(req));
        }
    }
}

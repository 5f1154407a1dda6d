//! Mesh identity as a credential: a client named by the SPIFFE ID of its peer certificate.
//!
//! In a service mesh (an Istio sidecar or gateway, any Envoy terminating mTLS with a mesh CA) the
//! workload calling Tollgate has already proved who it is in the TLS handshake. A client with
//! `identities` is admitted by that proof instead of a key: Envoy exposes the first URI SAN of
//! the validated peer certificate as the `connection.uri_san_peer_certificate` attribute, and
//! that string is looked up here, exactly (no prefix, case or trailing-slash games).
//!
//! Only the connection counts. A header such as `x-forwarded-client-cert` is written by whoever
//! sent the request and is never read for this. The listener must validate client certificates
//! against the mesh CA (docs/keys.md#mesh-identity): an unvalidated certificate proves nothing.

use hashbrown::HashMap;

use crate::types::ClientId;

/// The attribute path of the peer certificate's first URI SAN (Envoy's attribute
/// `connection.uri_san_peer_certificate`).
pub const PEER_URI_SAN: [&str; 2] = ["connection", "uri_san_peer_certificate"];

/// Longest SPIFFE ID accepted (the SPIFFE ID specification's limit for a URI SAN).
pub const MAX_ID_LEN: usize = 2048;

/// Most identities one client may have.
pub const MAX_IDENTITIES_PER_CLIENT: usize = 16;

/// Checks that `id` is a SPIFFE ID as the SPIFFE specification defines it:
/// `spiffe://<trust domain>/<path>`, the trust domain of lowercase letters, digits, `.`, `-` and
/// `_`, the path of non-empty segments of letters, digits, `.`, `-` and `_` (not `.` or `..`),
/// with no query, fragment, port, user info, percent-encoding or trailing slash.
pub fn check_spiffe_id(id: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{id:?} is not a SPIFFE ID ({why})"));
    if id.len() > MAX_ID_LEN {
        return bad("longer than 2048 bytes");
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return bad("it must start with spiffe://");
    };
    let (domain, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if domain.is_empty() {
        return bad("the trust domain is empty");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return bad("the trust domain may hold only lowercase letters, digits, '.', '-' and '_'");
    }
    if path.is_empty() {
        return bad("a workload's ID has a path after the trust domain");
    }
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return bad("empty path segment or trailing slash");
        }
        if segment == "." || segment == ".." {
            return bad("'.' and '..' segments are not allowed");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return bad("path segments may hold only letters, digits, '.', '-' and '_'");
        }
    }
    Ok(())
}

/// The configured identities and their clients.
#[derive(Debug, Default)]
pub struct IdentityIndex {
    map: HashMap<Box<str>, ClientId>,
}

impl IdentityIndex {
    /// Whether no client has an identity (then nothing reads the peer certificate).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many identities are configured.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Adds an identity, or returns the client that has it already.
    pub fn insert(&mut self, id: &str, client: ClientId) -> Result<(), ClientId> {
        match self.map.get(id) {
            Some(&other) => Err(other),
            None => {
                self.map.insert(id.into(), client);
                Ok(())
            }
        }
    }

    /// The client whose identity the peer presented, as Envoy reported the attribute (raw bytes;
    /// anything that is not exactly a configured ID matches nothing).
    pub fn lookup(&self, peer: &[u8]) -> Option<ClientId> {
        let id = std::str::from_utf8(peer).ok()?;
        self.map.get(id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_checked_as_the_specification_says() {
        for ok in [
            "spiffe://cluster.local/ns/team-a/sa/app",
            "spiffe://example.org/a",
            "spiffe://trust_domain-1.test/path.with/dots_and-dashes",
        ] {
            assert_eq!(check_spiffe_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns//sa",
            "spiffe://cluster.local/ns/a/",
            "spiffe://Cluster.Local/ns/a",
            "spiffe://cluster.local:8443/ns/a",
            "spiffe://user@cluster.local/ns/a",
            "spiffe://cluster.local/ns/a?x=1",
            "spiffe://cluster.local/ns/a#f",
            "spiffe://cluster.local/ns/%61",
            "spiffe://cluster.local/ns/../sa",
            "spiffe://cluster.local/./sa",
            "SPIFFE://cluster.local/ns/a",
            "https://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a b",
        ] {
            assert!(check_spiffe_id(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("spiffe://d/{}", "a".repeat(MAX_ID_LEN));
        assert!(check_spiffe_id(&long).is_err());
    }

    #[test]
    fn lookup_is_exact() {
        let mut ids = IdentityIndex::default();
        assert!(ids.is_empty());
        assert_eq!(ids.insert("spiffe://cluster.local/ns/a/sa/app", 3), Ok(()));
        assert_eq!(ids.insert("spiffe://cluster.local/ns/a/sa/app", 4), Err(3));
        assert_eq!(ids.len(), 1);
        assert_eq!(ids.lookup(b"spiffe://cluster.local/ns/a/sa/app"), Some(3));
        for near in [
            &b"spiffe://cluster.local/ns/a/sa/app/"[..],
            b"spiffe://cluster.local/ns/a/sa/ap",
            b"spiffe://cluster.local/ns/a/sa/app2",
            b"SPIFFE://cluster.local/ns/a/sa/app",
            b"spiffe://cluster.local/ns/a/sa/app\0",
            b" spiffe://cluster.local/ns/a/sa/app",
            b"\xffspiffe://cluster.local/ns/a/sa/app",
            b"",
        ] {
            assert_eq!(
                ids.lookup(near),
                None,
                "{:?}",
                String::from_utf8_lossy(near)
            );
        }
    }
}

//! The Envoy versions Tollgate supports: the range scripts/compat.sh tests, and what the filter
//! says at start-up when it runs outside it (docs/compatibility.md).

/// The oldest supported Envoy (major, minor).
pub const OLDEST: (u64, u64) = (1, 36);
/// The newest tested Envoy (major, minor).
pub const NEWEST: (u64, u64) = (1, 40);

/// Where an Envoy version stands against the supported range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Within the tested range.
    Supported,
    /// Older than the oldest supported: metric names and routing are known to differ.
    TooOld,
    /// Newer than the newest tested: expected to work, not tested.
    Untested,
}

/// Where `(major, minor)` stands.
pub fn support(version: (u64, u64)) -> Support {
    if version < OLDEST {
        Support::TooOld
    } else if version > NEWEST {
        Support::Untested
    } else {
        Support::Supported
    }
}

/// An integer property as Envoy serialises it for `proxy_get_property` (8 bytes,
/// little-endian); `None` for anything else.
pub fn property_int(bytes: &[u8]) -> Option<u64> {
    let array: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_le_bytes(array))
}

/// The line the filter logs about the Envoy it runs on, or `None` when there is nothing to say.
pub fn support_line(version: Option<(u64, u64)>) -> Option<String> {
    let (lo, hi) = (OLDEST, NEWEST);
    match version.map(|v| (v, support(v))) {
        None => Some(format!(
            "cannot read Envoy's version (xds.node.user_agent_build_version); Tollgate supports \
             Envoy {}.{} to {}.{}",
            lo.0, lo.1, hi.0, hi.1
        )),
        Some((_, Support::Supported)) => None,
        Some(((major, minor), Support::TooOld)) => Some(format!(
            "unsupported Envoy {major}.{minor}: Tollgate supports Envoy {}.{} to {}.{}; metric \
             names and model routing may differ here (docs/compatibility.md)",
            lo.0, lo.1, hi.0, hi.1
        )),
        Some(((major, minor), Support::Untested)) => Some(format!(
            "Envoy {major}.{minor} is newer than the newest tested ({}.{}); see \
             docs/compatibility.md",
            hi.0, hi.1
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_is_inclusive() {
        assert_eq!(support((1, 36)), Support::Supported);
        assert_eq!(support((1, 40)), Support::Supported);
        assert_eq!(support((1, 35)), Support::TooOld);
        assert_eq!(support((1, 41)), Support::Untested);
        assert_eq!(support((2, 0)), Support::Untested);
        assert_eq!(support_line(Some((1, 38))), None);
        assert!(support_line(Some((1, 35)))
            .unwrap()
            .starts_with("unsupported Envoy 1.35"));
        assert!(support_line(None).unwrap().contains("1.36 to 1.40"));
    }

    #[test]
    fn integer_properties_are_eight_bytes_little_endian() {
        assert_eq!(property_int(&36u64.to_le_bytes()), Some(36));
        assert_eq!(property_int(b"36"), None);
        assert_eq!(property_int(&[]), None);
    }
}

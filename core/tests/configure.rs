//! Configuring the listener role in several VMs of one Envoy (the main thread's, then each
//! worker's), which share one shared-data store: the first VM creates every client's records,
//! the others find that it did in one host call (docs/scale.md).

// Tests fail loudly: unwrapping is what they are for.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use tollgate_core::fake::FakeHost;
use tollgate_core::gateway::{Gateway, RECORDS_ENSURED_KEY};
use tollgate_core::keys::{Digest, DigestKind};
use tollgate_core::limiter::BUDGET_KEY_PREFIX;
use tollgate_core::Config;

const LOCAL: &str = r#"{"backend":"local"}"#;
const LEASES: &str = r#"{"backend":"redis","cluster":"webdis","on_error":"deny","timeout_ms":50,"leases":{"breaker_failures":2,"breaker_open_ms":1000}}"#;

fn config(names: &[&str], limiter: &str) -> Config {
    let clients: Vec<String> = names
        .iter()
        .map(|n| {
            let sha = Digest::of_key(DigestKind::Sha256, format!("sk-{n}").as_bytes()).to_hex();
            format!(r#"{{"name":"{n}","key_sha256":"{sha}"}}"#)
        })
        .collect();
    let json = format!(
        r#"{{"clients":[{}],"upstream":{{"api_key_env":"K"}},"limiter":{limiter}}}"#,
        clients.join(",")
    );
    Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap()
}

/// Configures one more VM on `host`'s shared data; returns its shared-data calls.
fn configure_vm(host: &FakeHost, names: &[&str], limiter: &str) -> Vec<&'static str> {
    host.take_calls();
    Gateway::configure(host, config(names, limiter)).unwrap();
    host.take_calls()
        .into_iter()
        .filter(|c| c.ends_with("_shared_data"))
        .collect()
}

fn has(host: &FakeHost, key: &str) -> bool {
    host.shared.borrow().contains_key(key)
}

fn budget(name: &str) -> String {
    format!("{BUDGET_KEY_PREFIX}{name}")
}

#[test]
fn the_first_vm_creates_every_record_and_the_others_check_once() {
    let host = FakeHost::default();
    let first = configure_vm(&host, &["a", "b", "c"], LOCAL);
    // The fingerprint read, a get + set per client, the fingerprint written.
    assert_eq!(first.len(), 1 + 3 * 2 + 1, "{first:?}");
    assert!(["a", "b", "c"].iter().all(|n| has(&host, &budget(n))));
    assert!(has(&host, RECORDS_ENSURED_KEY));
    for _worker in 0..3 {
        assert_eq!(
            configure_vm(&host, &["a", "b", "c"], LOCAL),
            ["get_shared_data"]
        );
    }
}

#[test]
fn another_set_of_clients_is_created_in_full() {
    let host = FakeHost::default();
    configure_vm(&host, &["a", "b"], LOCAL);
    // A client added, one renamed, the order changed: each is another set.
    for names in [&["a", "b", "c"][..], &["a", "d"], &["b", "a"]] {
        let calls = configure_vm(&host, names, LOCAL);
        assert_eq!(
            calls.iter().filter(|c| **c == "get_shared_data").count(),
            1 + names.len(),
            "{names:?}: {calls:?}"
        );
        assert!(names.iter().all(|n| has(&host, &budget(n))), "{names:?}");
        assert_eq!(configure_vm(&host, names, LOCAL), ["get_shared_data"]);
    }
}

#[test]
fn lease_records_are_part_of_the_set() {
    let host = FakeHost::default();
    configure_vm(&host, &["a"], LOCAL);
    assert!(!has(&host, "tollgate.v2.lease.a"));
    let calls = configure_vm(&host, &["a"], LEASES);
    assert!(calls.len() > 1, "{calls:?}");
    assert!(has(&host, "tollgate.v2.lease.a"));
    assert_eq!(configure_vm(&host, &["a"], LEASES), ["get_shared_data"]);
}

#[test]
fn after_a_failed_write_the_next_vm_checks_every_record_again() {
    let host = FakeHost::default();
    host.fail.borrow_mut().push("set_shared_data");
    configure_vm(&host, &["a", "b"], LOCAL);
    assert!(!has(&host, RECORDS_ENSURED_KEY));
    host.fail.borrow_mut().clear();
    let calls = configure_vm(&host, &["a", "b"], LOCAL);
    assert_eq!(calls.len(), 1 + 2 * 2 + 1, "{calls:?}");
    assert!(has(&host, &budget("a")) && has(&host, &budget("b")));
    assert_eq!(configure_vm(&host, &["a", "b"], LOCAL), ["get_shared_data"]);
}

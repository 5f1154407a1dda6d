//! Mesh identity as a credential, through the whole exchange against the fake host: a client
//! known by its peer certificate's SPIFFE ID is admitted and limited like a keyed one, a key
//! always wins over the certificate, nothing a client writes in a header can stand in for the
//! certificate, and a request with a key pays no host call for any of it.

// Tests fail loudly: unwrapping is what they are for.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::rc::Rc;

use tollgate_core::exchange::Exchange;
use tollgate_core::fake::{pairs, FakeHost};
use tollgate_core::gateway::Gateway;
use tollgate_core::host::Action;
use tollgate_core::keys::{Digest, DigestKind};
use tollgate_core::Config;

const NOW: u64 = 1_800_000_000_000;
const KEY: &str = "sk-keyed-team";
const MESH: &str = "spiffe://tollgate.test/ns/team-a/sa/app";
/// How the fake host names the attribute Envoy serves as `connection.uri_san_peer_certificate`.
const PEER: &str = "connection.uri_san_peer_certificate";

fn gateway(host: &FakeHost) -> Rc<Gateway> {
    gateway_for(host, "openai")
}

fn gateway_for(host: &FakeHost, api: &str) -> Rc<Gateway> {
    let json = format!(
        r#"{{"clients":[
              {{"name":"mesh-a","identities":["{MESH}"],"requests_per_minute":2}},
              {{"name":"keyed","key_sha256":"{}"}}],
            "upstream":{{"api_key_env":"K","api":"{api}"}}}}"#,
        Digest::of_key(DigestKind::Sha256, KEY.as_bytes()).to_hex()
    );
    let config = Config::parse(json.as_bytes(), &|_| Some("sk-provider".into())).unwrap();
    let gw = Gateway::configure(host, config).unwrap();
    host.take_calls();
    Rc::new(gw)
}

const CHAT: &str = "/v1/chat/completions";

fn request(host: &FakeHost, path: &str, extra: &[(&str, &str)]) {
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", "gw"),
        ("content-type", "application/json"),
        ("content-length", "2"),
    ];
    headers.extend_from_slice(extra);
    *host.request.borrow_mut() = pairs(&headers);
}

fn peer(host: &FakeHost, id: Option<&str>) {
    let mut properties = host.properties.borrow_mut();
    properties.remove(PEER);
    if let Some(id) = id {
        properties.insert(PEER.to_string(), id.as_bytes().to_vec());
    }
}

/// Runs one request's headers; the status of the local reply, or 200 when it was forwarded.
fn status(host: &FakeHost, gw: &Rc<Gateway>) -> u16 {
    host.replies.borrow_mut().clear();
    let mut ex = Exchange::new(Some(gw.clone()));
    match ex.on_request_headers(host, false) {
        Action::Continue => {
            assert!(ex.forwarded());
            200
        }
        Action::Pause => host.replies.borrow()[0].status,
    }
}

#[test]
fn a_client_is_admitted_by_its_certificate_and_limited_like_any_other() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host);
    peer(&host, Some(MESH));
    request(&host, CHAT, &[]);
    assert_eq!(status(&host, &gw), 200);
    // One host call more than a keyed request: the attribute, read once.
    let calls = host.take_calls();
    assert_eq!(calls.iter().filter(|c| **c == "property").count(), 1);
    assert_eq!(
        host.request_header("authorization").as_deref(),
        Some("Bearer sk-provider")
    );
    // (The fake host's request now carries the provider's key: start each one afresh.)
    request(&host, CHAT, &[]);
    assert_eq!(status(&host, &gw), 200);
    request(&host, CHAT, &[]);
    assert_eq!(status(&host, &gw), 429, "requests_per_minute 2");
    assert_eq!(
        host.counter("tollgate_requests_total.client=mesh-a.outcome=admitted"),
        2
    );
    assert_eq!(
        host.counter("tollgate_requests_total.client=mesh-a.outcome=rate_limited"),
        1
    );
}

#[test]
fn anthropic_clients_use_the_same_credential() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway_for(&host, "anthropic");
    peer(&host, Some(MESH));
    request(
        &host,
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
    );
    assert_eq!(status(&host, &gw), 200);
    assert_eq!(
        host.request_header("x-api-key").as_deref(),
        Some("sk-provider")
    );
    assert_eq!(
        host.counter("tollgate_requests_total.client=mesh-a.outcome=admitted"),
        1
    );
}

#[test]
fn a_request_with_a_key_is_judged_by_its_key_and_reads_no_certificate() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host);
    peer(&host, Some(MESH));
    request(&host, CHAT, &[("authorization", &format!("Bearer {KEY}"))]);
    host.take_calls();
    assert_eq!(status(&host, &gw), 200);
    assert!(
        !host.take_calls().contains(&"property"),
        "a keyed request reads no attribute"
    );
    assert_eq!(
        host.counter("tollgate_requests_total.client=keyed.outcome=admitted"),
        1
    );
    // A wrong key over the mesh client's connection is refused, not admitted as the mesh client.
    request(&host, CHAT, &[("authorization", "Bearer sk-wrong")]);
    assert_eq!(status(&host, &gw), 401);
    request(&host, "/v1/messages", &[("x-api-key", "sk-wrong")]);
    assert_eq!(status(&host, &gw), 401);
    assert_eq!(
        host.counter("tollgate_requests_total.client=mesh-a.outcome=admitted"),
        0
    );
}

#[test]
fn nothing_but_the_connection_names_an_identity() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host);
    // No certificate (plain text or TLS without one), whatever the headers claim.
    peer(&host, None);
    for forged in [
        ("x-forwarded-client-cert", format!("URI={MESH}")),
        ("x-tollgate-identity", MESH.to_string()),
        ("x-spiffe-id", MESH.to_string()),
    ] {
        request(&host, CHAT, &[(forged.0, &forged.1)]);
        assert_eq!(status(&host, &gw), 401, "{}", forged.0);
    }
    // A certificate that is not exactly a configured identity.
    for near in [
        "spiffe://tollgate.test/ns/team-a/sa/app/",
        "spiffe://tollgate.test/ns/team-a/sa/ap",
        "spiffe://tollgate.test/ns/team-a/sa/app2",
        "SPIFFE://tollgate.test/ns/team-a/sa/app",
        "spiffe://other.test/ns/team-a/sa/app",
    ] {
        peer(&host, Some(near));
        request(&host, CHAT, &[]);
        assert_eq!(status(&host, &gw), 401, "{near}");
    }
    assert_eq!(
        host.counter("tollgate_requests_total.client=mesh-a.outcome=admitted"),
        0
    );
    assert_eq!(
        host.counter(
            "tollgate_refusals_total.client=_anonymous.model=_default.reason=invalid_api_key"
        ),
        8
    );
}

#[test]
fn a_failed_attribute_read_refuses_the_request() {
    let host = FakeHost::new(NOW, &[]);
    let gw = gateway(&host);
    peer(&host, Some(MESH));
    host.fail.borrow_mut().push("property");
    request(&host, CHAT, &[]);
    assert_eq!(status(&host, &gw), 500);
    assert_eq!(
        host.counter("tollgate_requests_total.client=mesh-a.outcome=admitted"),
        0
    );
}

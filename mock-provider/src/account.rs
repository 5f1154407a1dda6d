//! The provider's account and non-inference endpoints (files, batches, fine-tuning,
//! assistants, threads, stored completions and responses, images, audio, moderations,
//! realtime sessions...). The mock keeps no state behind them: they answer 200 with minimal
//! OpenAI-shaped bodies, so a test can tell a request that reached the provider (it is in the
//! request log, and it got a 200 from the provider) from one the gateway refused.

use serde_json::{json, Value};

use crate::ids::IdGen;
use crate::openai::to_json;
use crate::responses;

pub enum Outcome {
    Json(Vec<u8>),
    /// A non-JSON body (audio) with its content type.
    Bytes(&'static str, Vec<u8>),
    /// A known path with a method it does not take; the value is the `allow` header.
    MethodNotAllowed(&'static str),
}

/// Resources under `/v1/{root}`: a list at the root, objects under `/{id}` and below.
const COLLECTIONS: &[(&str, &str, &str)] = &[
    ("files", "file", "file-"),
    ("batches", "batch", "batch_"),
    ("fine_tuning/jobs", "fine_tuning.job", "ftjob-"),
    ("assistants", "assistant", "asst_"),
    ("threads", "thread", "thread_"),
    ("vector_stores", "vector_store", "vs_"),
    ("uploads", "upload", "upload_"),
    ("chat/completions", "chat.completion", "chatcmpl-"),
    ("responses", "response", "resp_"),
    ("conversations", "conversation", "conv_"),
    ("evals", "eval", "eval_"),
    ("containers", "container", "cntr_"),
];

/// POST-only endpoints.
const ACTIONS: &[&str] = &[
    "images/generations",
    "images/edits",
    "images/variations",
    "audio/speech",
    "audio/transcriptions",
    "audio/translations",
    "moderations",
    "realtime/sessions",
    "realtime/transcription_sessions",
    "realtime/client_secrets",
];

fn object(id: &str, kind: &str, created: u64) -> Outcome {
    Outcome::Json(to_json(
        &json!({"id": id, "object": kind, "created_at": created}),
    ))
}

fn action(name: &str, ids: &IdGen, now: u64) -> Outcome {
    let body: Value = match name {
        "audio/speech" => return Outcome::Bytes("audio/mpeg", b"ID3\x04mock-audio".to_vec()),
        "audio/transcriptions" | "audio/translations" => json!({"text": "Mock transcription."}),
        "moderations" => json!({
            "id": ids.object_id("modr-"), "model": "omni-moderation-latest",
            "results": [{"flagged": false, "categories": {}, "category_scores": {}}]
        }),
        "realtime/client_secrets" => json!({"value": "ek_mock", "expires_at": now + 60}),
        n if n.starts_with("realtime/") => json!({
            "id": ids.object_id("sess_"), "object": "realtime.session",
            "model": "gpt-4o-realtime-preview",
            "client_secret": {"value": "ek_mock", "expires_at": now + 60}
        }),
        _ => json!({"created": now, "data": []}),
    };
    Outcome::Json(to_json(&body))
}

/// The answer for `method` on `/v1/{rest}`, or `None` if no such endpoint exists (404).
pub fn answer(method: &str, rest: &str, ids: &IdGen, now: u64) -> Option<Outcome> {
    if ACTIONS.contains(&rest) {
        return Some(if method == "POST" {
            action(rest, ids, now)
        } else {
            Outcome::MethodNotAllowed("POST")
        });
    }
    let &(root, kind, prefix) = COLLECTIONS.iter().find(|(root, _, _)| {
        rest == *root
            || rest
                .strip_prefix(root)
                .is_some_and(|tail| tail.starts_with('/') && tail.len() > 1)
    })?;
    let tail = rest.get(root.len()..).unwrap_or("");
    let Some(item) = tail.strip_prefix('/') else {
        return Some(match method {
            "GET" => Outcome::Json(to_json(&json!({
                "object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false
            }))),
            "POST" => object(&ids.object_id(prefix), kind, now),
            _ => Outcome::MethodNotAllowed("GET, POST"),
        });
    };
    let (id, sub) = item.split_once('/').unwrap_or((item, ""));
    if id.is_empty() {
        return None;
    }
    Some(match method {
        "GET" if root == "responses" && sub.is_empty() => Outcome::Json(responses::stored(id, now)),
        "GET" | "POST" => object(id, kind, now),
        "DELETE" => Outcome::Json(to_json(
            &json!({"id": id, "object": format!("{kind}.deleted"), "deleted": true}),
        )),
        _ => Outcome::MethodNotAllowed("GET, POST, DELETE"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(o: Option<Outcome>) -> Value {
        match o {
            Some(Outcome::Json(b)) => serde_json::from_slice(&b).unwrap(),
            _ => panic!("expected JSON"),
        }
    }

    #[test]
    fn collections_actions_and_unknowns() {
        let ids = IdGen::with_seed(1);
        let a = |m: &str, p: &str| answer(m, p, &ids, 100);
        assert_eq!(json_of(a("GET", "files"))["object"], "list");
        assert!(json_of(a("POST", "files"))["id"]
            .as_str()
            .unwrap()
            .starts_with("file-"));
        let del = json_of(a("DELETE", "files/file-abc"));
        assert_eq!(
            del,
            json!({"id": "file-abc", "object": "file.deleted", "deleted": true})
        );
        assert_eq!(
            json_of(a("GET", "fine_tuning/jobs/ftjob-1"))["object"],
            "fine_tuning.job"
        );
        assert_eq!(json_of(a("POST", "batches/b1/cancel"))["id"], "b1");
        assert_eq!(json_of(a("GET", "chat/completions"))["data"], json!([]));
        assert_eq!(json_of(a("GET", "responses/resp_1"))["object"], "response");
        assert_eq!(
            json_of(a("POST", "moderations"))["results"][0]["flagged"],
            false
        );
        assert_eq!(
            json_of(a("POST", "realtime/sessions"))["object"],
            "realtime.session"
        );
        assert!(matches!(
            a("POST", "audio/speech"),
            Some(Outcome::Bytes("audio/mpeg", _))
        ));
        assert!(matches!(
            a("GET", "moderations"),
            Some(Outcome::MethodNotAllowed("POST"))
        ));
        assert!(matches!(
            a("PUT", "files"),
            Some(Outcome::MethodNotAllowed(_))
        ));
        for unknown in ["nope", "filesx", "files/", "files//x", "images"] {
            assert!(a("GET", unknown).is_none(), "{unknown}");
        }
    }
}

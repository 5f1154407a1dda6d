//! The control API, served only on the `--control` listener: the request log, behaviour rules
//! and a health check. A gateway is never configured with this address, so nothing a gateway
//! client sends can read the log (which holds the provider key and every client's prompts) or
//! change what the provider answers.

use crate::http::{Head, Response};
use crate::openai::{to_json, ApiError};
use crate::router::{json_headers, Plan, State};
use crate::rules::RuleSpec;

fn json(state: &State, status: u16, body: Vec<u8>) -> Plan {
    Plan::now(Response::new(status, json_headers(state), body))
}

fn no_content(state: &State) -> Plan {
    Plan::now(Response::new(
        204,
        vec![("x-mock-name".into(), state.cfg.name.clone())],
        Vec::new(),
    ))
}

fn error(state: &State, err: &ApiError) -> Plan {
    json(state, err.status, err.body())
}

pub fn handle(state: &State, head: &Head, body: &[u8]) -> Plan {
    let path = head.path();
    let method = head.method.as_str();
    match (path, method) {
        ("/__mock/health", "GET") => json(state, 200, br#"{"status":"ok"}"#.to_vec()),
        ("/__mock/requests", "GET") => json(state, 200, state.log.to_json()),
        ("/__mock/requests", "DELETE") => {
            state.log.clear();
            no_content(state)
        }
        ("/__mock/rules", "GET") => json(state, 200, to_json(&state.rules.list())),
        ("/__mock/rules", "POST") => {
            match RuleSpec::parse(body).and_then(|spec| state.rules.add(spec)) {
                Ok(rule) => json(state, 201, to_json(&rule)),
                Err(e) => error(state, &ApiError::invalid_request(e.0)),
            }
        }
        ("/__mock/rules", "DELETE") => {
            state.rules.clear();
            no_content(state)
        }
        ("/__mock/health" | "/__mock/requests" | "/__mock/rules", _) => {
            error(state, &ApiError::invalid_method(method, path))
        }
        _ => match path.strip_prefix("/__mock/rules/") {
            Some(id) => match (method, id.parse::<u64>()) {
                ("DELETE", Ok(id)) if state.rules.remove(id) => no_content(state),
                ("DELETE", _) => error(
                    state,
                    &ApiError::new(404, "invalid_request_error", format!("No rule {id}.")),
                ),
                _ => error(state, &ApiError::invalid_method(method, path)),
            },
            None => error(state, &ApiError::invalid_url(method, path)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::http::Version;
    use crate::router::Answer;
    use serde_json::Value;

    fn call(st: &State, method: &str, target: &str, body: &str) -> (u16, Value) {
        let head = Head {
            method: method.into(),
            target: target.into(),
            version: Version::Http11,
            headers: Vec::new(),
        };
        match handle(st, &head, body.as_bytes()).answer {
            Answer::Full(r) => (
                r.status,
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            ),
            Answer::Stream(_) => panic!("control answers are never streams"),
        }
    }

    #[test]
    fn rules_and_health() {
        let st = State::new(Config::default());
        assert_eq!(call(&st, "GET", "/__mock/health", "").0, 200);
        let (status, rule) = call(
            &st,
            "POST",
            "/__mock/rules",
            r#"{"match":"m","status":500}"#,
        );
        assert_eq!(status, 201);
        assert_eq!(rule["id"], 1);
        assert_eq!(rule["hits"], 0);
        let (status, err) = call(&st, "POST", "/__mock/rules", r#"{"status":302}"#);
        assert_eq!(status, 400);
        assert!(err["error"]["message"].as_str().unwrap().contains("status"));
        assert_eq!(
            call(&st, "GET", "/__mock/rules", "")
                .1
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(call(&st, "DELETE", "/__mock/rules/1", "").0, 204);
        assert_eq!(call(&st, "DELETE", "/__mock/rules/1", "").0, 404);
        assert_eq!(call(&st, "DELETE", "/__mock/rules/x", "").0, 404);
        call(&st, "POST", "/__mock/rules", "{}");
        assert_eq!(call(&st, "DELETE", "/__mock/rules", "").0, 204);
        assert_eq!(
            call(&st, "GET", "/__mock/rules", "").1,
            serde_json::json!([])
        );
        assert_eq!(call(&st, "PUT", "/__mock/rules", "").0, 405);
        assert_eq!(call(&st, "GET", "/v1/models", "").0, 404);
    }
}

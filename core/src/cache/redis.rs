//! The Redis backend, through Webdis.

use serde_json::Value;

use crate::base64;
use crate::webdis::{self, ReplyError};

use super::*;

/// Reads an entry.
pub const GET_SCRIPT: &str = "return redis.call('GET', KEYS[1])";
/// Writes an entry with its lifetime in seconds.
pub const SET_SCRIPT: &str = "return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])";

/// Redis key of an entry: `tollgate:cache:v1:<hex of the key>` (a digest: neither the client
/// nor the request can be read from it).
pub fn redis_key(key: &Key) -> String {
    format!("tollgate:cache:v1:{}", key.hex())
}

pub(super) fn eval(script: &str, key: &Key, args: &[&str]) -> Vec<u8> {
    let mut body = String::with_capacity(script.len() * 3 + 120);
    body.push_str("EVAL/");
    webdis::percent_encode_into(&mut body, script);
    body.push_str("/1/");
    webdis::percent_encode_into(&mut body, &redis_key(key));
    for arg in args {
        body.push('/');
        webdis::percent_encode_into(&mut body, arg);
    }
    body.into_bytes()
}

/// The Webdis request body of a lookup.
pub fn get_command(key: &Key) -> Vec<u8> {
    eval(GET_SCRIPT, key, &[])
}

/// The Webdis request body of a store: the entry base64url-encoded (plain text in Redis and
/// in Webdis's JSON replies, and nothing Webdis's URL syntax needs escaped).
pub fn set_command(entry: &Entry, ttl_s: u32) -> Vec<u8> {
    let value = base64::encode_url(&entry.encode());
    eval(SET_SCRIPT, &entry.key, &[&value, &ttl_s.to_string()])
}

/// A non-200 answer classified as the limiter classifies it (Envoy's own replies when Webdis
/// is unreachable or slow, Webdis's 403 for its ACL, ...).
pub(super) fn reply_status(status: Option<u16>, body: &[u8]) -> Result<(), Error> {
    if status == Some(200) {
        return Ok(());
    }
    // `parse_reply` decides every non-200 answer from the status and Envoy's body text alone.
    Err(Error::Redis(
        webdis::parse_reply(status, body)
            .err()
            .unwrap_or(ReplyError::Malformed),
    ))
}

pub(super) fn eval_reply(body: &[u8]) -> Result<Value, Error> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|_| Error::Redis(ReplyError::Malformed))?;
    let reply = value
        .get_mut("EVAL")
        .map(Value::take)
        .ok_or(Error::Redis(ReplyError::Malformed))?;
    if let Some([Value::Bool(false), msg]) = reply.as_array().map(Vec::as_slice) {
        let msg = msg.as_str().unwrap_or("unknown Redis error");
        return Err(Error::Redis(ReplyError::Redis(
            msg.chars().take(200).collect(),
        )));
    }
    Ok(reply)
}

/// Reads Webdis's answer to [`get_command`]: `Ok(None)` for a miss (no entry, or an entry of
/// another key or expired).
pub fn parse_get_reply(
    status: Option<u16>,
    body: &[u8],
    key: &Key,
    now_ms: u64,
) -> Result<Option<Entry>, Error> {
    reply_status(status, body)?;
    match eval_reply(body)? {
        Value::Null => Ok(None),
        Value::String(s) => {
            let entry = base64::decode_url(&s)
                .and_then(|b| Entry::decode(&b))
                .ok_or(Error::Corrupt)?;
            Ok(entry.answers(key, now_ms).then_some(entry))
        }
        _ => Err(Error::Redis(ReplyError::Malformed)),
    }
}

/// Reads Webdis's answer to [`set_command`] (`{"EVAL":[true,"OK"]}`).
pub fn parse_set_reply(status: Option<u16>, body: &[u8]) -> Result<(), Error> {
    reply_status(status, body)?;
    match eval_reply(body)? {
        Value::Array(items) if items == [Value::Bool(true), Value::from("OK")] => Ok(()),
        Value::String(s) if s == "OK" => Ok(()),
        _ => Err(Error::Redis(ReplyError::Malformed)),
    }
}

#!/usr/bin/env python3
"""Writes the generated seed inputs of the fuzz targets (fuzz/seeds/<target>/gen-*).

Run from anywhere: `python3 fuzz/seeds/generate.py` (needs PyYAML, as in the tests' venv).
Seeds are small realistic inputs: the plugin configurations of envoy/*.yaml and variants, OpenAI
request bodies, SSE streams, Webdis and Envoy replies, request header maps, model patterns.
Files not named gen-* (recorded streams, regression inputs of fixed findings) are kept as they
are; this script only rewrites its own.
"""
import json
import pathlib
import struct

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SEEDS = ROOT / "fuzz" / "seeds"


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"gen-{name}").write_bytes(data)


# --- config: every distinct plugin configuration of the Envoy files, and variants -----------


def plugin_configs():
    found = {}

    def walk(o):
        if isinstance(o, dict):
            if str(o.get("@type", "")).endswith("StringValue") and "value" in o:
                found.setdefault(o["value"], None)
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for f in sorted((ROOT / "envoy").glob("*.yaml")):
        walk(yaml.safe_load(f.read_text()))
    return list(found)


SHA = "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"
MD5 = "32bd3c47e408828a22d81d4fe5f3c06d"

for i, text in enumerate(plugin_configs()):
    write("config", f"envoy-{i}.json", text)

CONFIGS = {
    "single": {"clients": [{"name": "team-a", "key_sha256": SHA, "requests_per_minute": 120}],
               "upstream": {"api_key_env": "TOLLGATE_PROVIDER_KEY"}},
    "md5-tokens": {"clients": [{"name": "legacy-bot", "key_md5": MD5, "tokens_per_minute": 20000},
                               {"name": "b_2", "key_sha256": SHA.upper()}],
                   "default_requests_per_minute": 60, "default_tokens_per_minute": 1000,
                   "upstream": {"api_key_env": "KEY"}, "limiter": {"backend": "local"}},
    "redis": {"clients": [{"name": "t", "key_sha256": SHA}], "upstream": {"api_key_env": "K"},
              "limiter": {"backend": "redis", "cluster": "webdis", "authority": "webdis:7379",
                          "timeout_ms": 250, "basic_auth_env": "WEBDIS_AUTH", "on_error": "deny"}},
    "routed": {"clients": [{"name": "a", "key_sha256": SHA, "models": ["gpt-4*", "fast", "claude-?-opus"]}],
               "providers": [{"name": "relay", "cluster": "relay", "api_key_env": "RELAY_KEY",
                              "authority": "api.relay.example", "path_prefix": "/openai",
                              "headers": {"x-relay-org": "org-1", "OpenAI-Beta": "assistants=v2"}},
                             {"name": "deepseek", "cluster": "deepseek", "api_key_env": "DS_KEY",
                              "authority": "api.deepseek.com"}],
               "models": [{"match": "gpt-4.1", "providers": ["relay", "deepseek"],
                           "upstream_models": {"deepseek": "deepseek-chat"}},
                          {"match": "fast", "providers": ["deepseek"], "upstream_model": "deepseek-chat"},
                          {"match": "gpt-4*", "providers": ["relay"]}],
               "default_provider": "relay", "max_body_bytes": 2097152},
}
for name, c in CONFIGS.items():
    write("config", f"{name}.json", json.dumps(c, indent=1, ensure_ascii=False))
# Errors: each names a field.
BAD = {
    "empty": "",
    "not-json": "{clients: []}",
    "array": "[]",
    "unknown-field": '{"clients":[],"upstream":{"api_key_env":"K"},"extra":1}',
    "bad-digest": '{"clients":[{"name":"a","key_sha256":"xyz"}],"upstream":{"api_key_env":"K"}}',
    "both-keys": json.dumps({"clients": [{"name": "a", "key_sha256": SHA, "key_md5": MD5}],
                             "upstream": {"api_key_env": "K"}}),
    "unset-env": json.dumps({"clients": [{"name": "a", "key_sha256": SHA}], "upstream": {"api_key_env": "UNSET_KEY"}}),
    "spaced-env": json.dumps({"clients": [{"name": "a", "key_sha256": SHA}], "upstream": {"api_key_env": "SPACE_KEY"}}),
    "wrong-type": '{"clients":[{"name":"a","key_sha256":"' + SHA + '","requests_per_minute":"60"}],"upstream":{"api_key_env":"K"}}',
    "bad-backend": json.dumps({"clients": [{"name": "a", "key_sha256": SHA}], "upstream": {"api_key_env": "K"},
                               "limiter": {"backend": "memcached"}}),
    "escaped-key": '{"cli\\u0065nts":[{"name":"a","key_sha256":"' + SHA + '"}],"upstream":{"api_key_env":"K"}}',
}
for name, text in BAD.items():
    write("config", f"bad-{name}.json", text)


# key_set: clients packed as binary records (core/src/config/key_set.rs), a valid block and one
# of each malformation, each of which the parser names.
def key_set_bytes(records, version=1, count=None, sort=True):
    """records: (key, name, rpm, tpm); the block before base64."""
    import hashlib
    rows = [(hashlib.sha256(k.encode()).digest(), n, r, t) for k, n, r, t in records]
    if sort:
        rows.sort(key=lambda row: row[0])
    out = b"TK" + struct.pack(">HI", version, len(rows) if count is None else count)
    for digest, name, rpm, tpm in rows:
        out += digest + struct.pack(">IIB", rpm, tpm, len(name)) + name.encode()
    return out


def key_set(records, **kw):
    import base64
    return base64.b64encode(key_set_bytes(records, **kw)).decode()


KS_RECORDS = [("sk-a", "packed-a", 120, 0), ("sk-b", "packed_b", 0, 5000), ("sk-c", "c", 0, 0)]
KS_UP = {"api_key_env": "K"}
KEY_SETS = {
    "key-set": {"clients": [{"name": "json", "key_sha256": SHA}], "key_set": key_set(KS_RECORDS),
                "default_tokens_per_minute": 100, "upstream": KS_UP},
    "key-set-only": {"key_set": key_set(KS_RECORDS[:1]), "upstream": KS_UP},
    "bad-key-set-truncated": {"key_set": key_set(KS_RECORDS)[:-8], "upstream": KS_UP},
    "bad-key-set-version": {"key_set": key_set(KS_RECORDS, version=2), "upstream": KS_UP},
    "bad-key-set-count": {"key_set": key_set(KS_RECORDS, count=2), "upstream": KS_UP},
    "bad-key-set-unsorted": {"key_set": key_set(sorted(KS_RECORDS, key=lambda r: r[1], reverse=True),
                                                sort=False), "upstream": KS_UP},
    "bad-key-set-duplicate": {"key_set": key_set(KS_RECORDS + [("sk-a", "again", 1, 0)]),
                              "upstream": KS_UP},
    "bad-key-set-name": {"clients": [{"name": "c", "key_sha256": SHA}], "key_set": key_set(KS_RECORDS),
                         "upstream": KS_UP},
    "bad-key-set-empty": {"key_set": key_set([]), "upstream": KS_UP},
    "bad-key-set-base64": {"key_set": "VEsAAQAAAAA-", "upstream": KS_UP},
}
for name, c in KEY_SETS.items():
    write("config", f"{name}.json", json.dumps(c))

# --- body: OpenAI request bodies ----------------------------------------------------------------

BODIES = {
    "chat": {"model": "gpt-4.1", "messages": [{"role": "system", "content": "You are terse."},
                                              {"role": "user", "content": "Hello!"}]},
    "chat-stream": {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
    "chat-stream-usage": {"model": "gpt-4.1", "stream": True, "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": "Hi"}]},
    "chat-stream-options": {"stream_options": {"include_obfuscation": False}, "model": "gpt-4.1-mini",
                            "stream": True, "messages": [{"role": "user", "content": "x"}],
                            "max_completion_tokens": 300, "max_tokens": 100},
    "chat-tools": {"model": "gpt-4o-mini", "temperature": 0.2, "top_p": 1e-3, "n": 1,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "h\u00e9llo \U0001F600 \"q\" \\ /"},
                                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
                   "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {"model": {"type": "string"}}}}}],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
                   "metadata": {"model": "not-this-one"}, "max_tokens": 64},
    "embeddings": {"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": "float"},
    "responses": {"model": "gpt-4.1", "input": "Hi", "max_output_tokens": 50, "stream": False},
    "completion": {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7, "stream": True,
                   "stream_options": None},
}
for name, b in BODIES.items():
    write("body", f"{name}.json", json.dumps(b, ensure_ascii=False))
write("body", "chat-ascii-escapes.json", json.dumps(BODIES["chat-tools"], ensure_ascii=True))
write("body", "pretty.json", json.dumps(BODIES["chat-stream-options"], indent=2))
write("body", "whitespace.json", ' \r\n\t{ "messages" :[ ] ,\n "model"\t:\r"gpt-4.1" , "stream" : true }\n')
write("body", "escaped-model.json", '{"model":"gpt-4.1\\u002dmini\\/x","stream":true,"stream_options":null}')
write("body", "escaped-key.json", '{"mod\\u0065l":"gpt-4.1","stream":true,"stream_opti\\u006fns":{"include_usage":false}}')
write("body", "nested.json", '{"a":[[[[{"model":"inner","b":"}]\\"{["}]]]],"model":"m","z":{"stream":true}}')
write("body", "duplicate-model.json", '{"model":"allowed","model":"forbidden"}')
write("body", "array.json", '["gpt-4.1",true,100]')
write("body", "numbers.json", '{"model":"m","max_tokens":18446744073709551615,"temperature":-0.0,"seed":1e2,"stream":false}')
write("body", "no-model.json", '{"messages":[],"stream":true}')

# --- sse: streams (the recorded ones are recorded-*.sse) ----------------------------------------

CHUNK = ('{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4.1",'
         '"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]%s}')
USAGE = ('{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4.1",'
         '"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}')
events = [CHUNK % (json.dumps("h\u00e9llo \U0001F600", ensure_ascii=False), ',"usage":null'),
          CHUNK % ('"\\n\\u00e9"', ',"usage":null'), USAGE]
write("sse", "chat-lf.sse", "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n")
write("sse", "chat-crlf.sse", ": keep-alive\r\n\r\n" + "".join(f"data: {e}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n")
write("sse", "chat-cr.sse", "".join(f"data:{e}\r\r" for e in events) + "data:[DONE]\r\r")
write("sse", "event-lines.sse", "event: message\nid: 1\nretry: 100\ndata: " + events[0] + "\n\n: comment\n\n"
      + "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n")
PLAIN = CHUNK % ('"x"', "")
write("sse", "no-usage.sse", f"data: {PLAIN}\n\n" * 3 + "data: [DONE]\n\n")
write("sse", "unterminated.sse", f"data: {events[0]}\n\ndata: {USAGE}")
write("sse", "responses.sse",
      'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","status":"in_progress","usage":null}}\n\n'
      'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
      'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1","status":"completed",'
      '"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}\n\n')
write("sse", "error-event.sse", 'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n')
# sse_bound: events larger than the reader's bound (0x01 n expands to n*2048 `x`, 0x02 n to
# spaces), split or not, before and after small ones.
write("sse_bound", "oversized.sse", b"data: {\"choices\":[{\"delta\":{\"content\":\"" + b"\x01\x90" + b"\"}}],\"usage\":null}\n\n"
      + f"data: {USAGE}\n\ndata: [DONE]\n\n".encode())
write("sse_bound", "oversized-usage.sse", b"data: {\"choices\":[]," + b"\x02\x81" + b"\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n")

# Just under the bound (0x7f * 2048 bytes of content), with CRLF separators.
write("sse_bound", "big-delta-crlf.sse",
      (": ping\r\n\r\n" + f"data: {events[0]}\r\n\r\n").encode()
      + b"data: {\"choices\":[{\"delta\":{\"content\":\"" + b"\x01\x7f" + b"\"}}],\"usage\":null}\r\n\r\n"
      + f"data: {USAGE}\r\n\r\ndata: [DONE]\r\n\r\n".encode())
write("sse_bound", "unterminated-big.sse", f"data: {events[0]}\n\n".encode() + b"data: " + b"\x01\x81")

# --- webdis_reply: `<status>\n<body>` --------------------------------------------------------------

REPLIES = {
    "admitted": "200\n{\"EVAL\":[1,3,60000]}",
    "denied": "200\n{\"EVAL\":[0,60,-1]}",
    "no-key": "200\n{\"EVAL\":[1,1,-2]}",
    "redis-error": "200\n{\"EVAL\":[false,\"ERR Error running script (call to f_0d3c): @user_script:1: WRONGTYPE Operation against a key holding the wrong kind of value\"]}",
    "noscript": "200\n{\"EVAL\":[false,\"NOSCRIPT No matching script. Please use EVAL.\"]}",
    "forbidden": "403\n",
    "webdis-500": "500\n{\"error\":\"internal\"}",
    "envoy-refused": "503\nupstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: delayed connect error: Connection refused",
    "envoy-no-healthy": "503\nno healthy upstream",
    "envoy-timeout": "504\nupstream request timeout",
    "no-headers": "-\n",
    "other-command": "200\n{\"GET\":null}",
    "big-count": "200\n{\"EVAL\":[1,18446744073709551615,9223372036854775807]}",
    "float": "200\n{\"EVAL\":[1.0,3,60000.5]}",
}
for name, r in REPLIES.items():
    write("webdis_reply", name, r)

# --- headers: proxy-wasm header maps -----------------------------------------------------------


def header_map(pairs):
    pairs = [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v) for n, v in pairs]
    out = struct.pack("<I", len(pairs))
    for n, v in pairs:
        out += struct.pack("<II", len(n), len(v))
    for n, v in pairs:
        out += n + b"\0" + v + b"\0"
    return out


BASE = [(":authority", "127.0.0.1:10000"), (":path", "/v1/chat/completions"), (":method", "POST"),
        (":scheme", "http"), ("content-type", "application/json"), ("content-length", "87"),
        ("user-agent", "OpenAI/Python 1.54.0"), ("x-request-id", "7b2f2b6e-1c2d-4e5f-8a9b-0c1d2e3f4a5b")]
write("headers", "request.bin", header_map(BASE + [("authorization", "Bearer sk-tollgate-demo")]))
write("headers", "lowercase-scheme.bin", header_map(BASE + [("authorization", " bearer \t sk-tg-AbC_123.x~ ")]))
write("headers", "two-auth.bin", header_map(BASE + [("authorization", "Bearer a"), ("Authorization", "Bearer b")]))
write("headers", "basic.bin", header_map(BASE + [("authorization", "Basic dXNlcjpwYXNz")]))
write("headers", "internal.bin", header_map(BASE + [("x-tollgate-route", "r0"), ("X-Tollgate-Client", "x"),
                                                    ("x-api-key", "k"), ("api-key", "k"), ("proxy-authorization", "p"),
                                                    ("authorization", "Bearer sk-\xe9")]))
write("headers", "binary-value.bin", header_map(BASE + [("authorization", b"Bearer \xff\xfe\x00x"), ("x-bin", b"\x00\x01")]))
write("headers", "no-auth.bin", header_map(BASE))
write("headers", "empty.bin", header_map([]))

# --- glob: `<pattern>\n<model name>` -------------------------------------------------------------

GLOBS = [("gpt-4*", "gpt-4.1-mini"), ("gpt-4.1", "gpt-4.1"), ("claude-?-opus", "claude-3-opus"),
         ("*-mini", "gpt-4o-mini"), ("a*b*c", "axxbyyc"), ("**", ""), ("?", "\u00e9"),
         ("mod\u00e8le-*", "mod\u00e8le-\U0001F600"), ("*a*a*a*b", "a" * 200)]
for i, (p, n) in enumerate(GLOBS):
    write("glob", f"{i}", f"{p}\n{n}")

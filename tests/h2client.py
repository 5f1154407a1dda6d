"""A small HTTP/2 client over cleartext (prior knowledge, as `curl --http2-prior-knowledge`) for
the end-to-end tests: exact control over frames (several streams on one connection, a body sent
in pieces, a stream reset mid-body or mid-response), which high-level clients do not give."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class H2Response:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    #: The error code of a RST_STREAM the server sent, if it reset the stream.
    reset: int | None = None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.decode().lower() == name.lower():
                return v.decode(errors="replace")
        return None

    def json(self):
        return json.loads(self.body)


class H2Client:
    """One HTTP/2 connection to a listener. Header names and values are bytes or str."""

    def __init__(self, port: int, timeout_s: float = 10.0, sock: socket.socket | None = None):
        # `sock`: a connection made by the caller (TLS with ALPN h2, for a listener that
        # terminates TLS); otherwise cleartext to 127.0.0.1:port.
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None,
                                             validate_outbound_headers=False,
                                             normalize_outbound_headers=False))
        self.conn.initiate_connection()
        self.responses: dict[int, H2Response] = {}
        self.closed = False
        self.goaway: int | None = None
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, method: str, path: str, headers: list[tuple], end_stream: bool) -> int:
        sid = self.conn.get_next_available_stream_id()
        pseudo = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "gateway")]
        enc = lambda v: v if isinstance(v, bytes) else v.encode()  # noqa: E731
        self.conn.send_headers(sid, [(enc(n), enc(v)) for n, v in pseudo + list(headers)],
                               end_stream=end_stream)
        self.responses[sid] = H2Response()
        self._flush()
        return sid

    def send_body(self, sid: int, data: bytes, end_stream: bool = True, timeout_s: float = 10.0) -> None:
        """Sends `data` on the stream, waiting for flow-control window as needed."""
        deadline = time.monotonic() + timeout_s
        while data:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                if time.monotonic() > deadline:
                    raise TimeoutError("no flow-control window from the server")
                self._receive_once()
                if self.responses[sid].ended or self.responses[sid].reset is not None:
                    return  # answered (e.g. a 413) before the whole body was taken
                continue
            chunk, data = data[:window], data[window:]
            self.conn.send_data(sid, chunk, end_stream=end_stream and not data)
            self._flush()

    def send_trailers(self, sid: int, trailers: list[tuple]) -> None:
        """Ends the stream with a trailers HEADERS frame."""
        enc = lambda v: v if isinstance(v, bytes) else v.encode()  # noqa: E731
        self.conn.send_headers(sid, [(enc(n), enc(v)) for n, v in trailers], end_stream=True)
        self._flush()

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)
        self._flush()

    def reset(self, sid: int) -> None:
        """RST_STREAM(CANCEL): the client gives up on this stream."""
        self.conn.reset_stream(sid, error_code=8)
        self._flush()

    def _receive_once(self) -> None:
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from the server") from None
        if not data:
            self.closed = True
            raise ConnectionError("server closed the connection")
        for ev in self.conn.receive_data(data):
            r = self.responses.get(getattr(ev, "stream_id", 0))
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                r.headers = list(ev.headers)
                r.status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived) and r is not None:
                r.body += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and r is not None:
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset) and r is not None:
                r.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev.error_code
        self._flush()

    def wait(self, sid: int, until=None, timeout_s: float = 10.0) -> H2Response:
        """Reads until the stream ended or was reset (or `until(response)` is true)."""
        deadline = time.monotonic() + timeout_s
        r = self.responses[sid]
        while not (r.ended or r.reset is not None or (until and until(r))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {sid} did not finish")
            try:
                self._receive_once()
            except ConnectionError:
                break
        return r

    def request(self, method: str, path: str, headers: list[tuple] = (), body: bytes | dict | None = None,
                timeout_s: float = 10.0) -> H2Response:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        sid = self.start(method, path, headers, end_stream=body is None)
        if body is not None:
            self.send_body(sid, body)
        return self.wait(sid, timeout_s=timeout_s)

    def __enter__(self) -> "H2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.sock.close()

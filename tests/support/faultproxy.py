"""A misbehaving HTTP reverse proxy for S3 tests: sits in front of a moto server and injects faults.

Each request is forwarded to the upstream server; then, with probability
``rate``, the client gets one of the faults instead of the real answer:

* ``slowdown``: ``503 SlowDown`` with S3's XML error body (botocore retries it);
* ``reset``: the connection is dropped with a TCP reset before any answer;
* ``cut``: the real status and headers, then half the body, then a close.

    with FaultProxy(moto_endpoint, rate=0.1, seed=0) as proxy:
        storage_options = {"endpoint_url": proxy.endpoint, ...}

The proxy forwards first and faults after, so a faulted PUT may have reached
the store (as with a real network failure after the server acted).
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["FaultProxy"]

KINDS = ("slowdown", "reset", "cut")
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _forward(self) -> None:
        proxy = self.server.owner
        with proxy._lock:
            proxy.requests.append((self.command, urllib.parse.urlsplit(self.path).path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        fault = proxy.draw()
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slowdown":
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            self.wfile.write(_SLOWDOWN)
            return
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(key, value)
        head_length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", head_length or str(len(data)))  # HEAD: the object's size
        if fault == "cut":
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data[:len(data) // 2] if fault == "cut" else data)
        if fault == "cut":
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FaultProxy"

    def handle_error(self, request, client_address):  # resets and cuts are the point; stay quiet
        pass


class FaultProxy:
    """Forward to ``upstream`` (``http://host:port``), faulting a ``rate`` share of responses.

    Attributes:
        rate: Probability in [0, 1] that a response is replaced by a fault (change it at any time).
        kinds: Which faults to draw from.
        counts: How many of each fault, and ``"ok"``, were served.
        requests: ``(method, path)`` of every request forwarded, in order.
    """

    def __init__(self, upstream: str, rate: float = 0.0, kinds: Sequence[str] = KINDS, seed: int = 0) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.rate, self.kinds = rate, list(kinds)
        self.counts: Dict[str, int] = {}
        self.requests: List[Tuple[str, str]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: Optional[_Server] = None

    def draw(self) -> Optional[str]:
        """The fault for the next response, or None (also counts it)."""
        with self._lock:
            fault = self._rng.choice(self.kinds) if self._rng.random() < self.rate else None
            self.counts[fault or "ok"] = self.counts.get(fault or "ok", 0) + 1
        return fault

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        threading.Thread(target=self._server.serve_forever, daemon=True, name="faultproxy").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

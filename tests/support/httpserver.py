"""A real HTTP(S) file server on 127.0.0.1 for tests, that misbehaves on request.

Download code has to be tested against real sockets: short bodies, resets,
503s with Retry-After, servers that ignore ``Range``, lying ``Content-Length``.
:class:`FileServer` serves in-memory files from a thread on an ephemeral port
and applies a per-path :class:`Behaviour`; it counts every GET per path.

    with FileServer() as server:
        server.add("/models/a.pth", data, cut_after=100, cut_times=1)
        url = server.url("/models/a.pth")
        ...
        assert server.gets("/models/a.pth") == 2
"""
from __future__ import annotations

import hashlib
import re
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

__all__ = ["Behaviour", "FileServer"]

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Behaviour:
    """How the server answers GETs for one path (the defaults are a well-behaved server).

    Attributes:
        status: Answer every GET with this status and no body (404, 403, 500, ...).
        fail_times: Answer the first N GETs with ``fail_status`` before behaving.
        fail_status: Status for those failures (503 by default).
        retry_after: ``Retry-After`` header value sent with the failures.
        cut_after: Send only this many body bytes of a response, then drop the connection.
        cut_times: How many responses are cut (None: every one).
        reset: Drop cut connections with a TCP reset instead of a clean close.
        ranges: Honour ``Range`` requests (False: ignore them and send the whole file with 200).
        bad_content_range: Answer ``Range`` with 206 but a Content-Range for another start.
        length_delta: Add this to the advertised Content-Length (the body is unchanged).
        delay: Seconds to wait before answering.
        stall: Seconds to wait after ``cut_after`` bytes instead of dropping (for read timeouts).
        redirect_to: Answer with ``redirect_status`` and this ``Location`` (a path or a URL).
        redirect_status: 301, 302, 307 or 308.
    """

    status: Optional[int] = None
    fail_times: int = 0
    fail_status: int = 503
    retry_after: Optional[str] = None
    cut_after: Optional[int] = None
    cut_times: Optional[int] = None
    reset: bool = False
    ranges: bool = True
    bad_content_range: bool = False
    length_delta: int = 0
    delay: float = 0.0
    stall: float = 0.0
    redirect_to: Optional[str] = None
    redirect_status: int = 302


@dataclass
class _Entry:
    data: bytes
    behaviour: Behaviour
    gets: int = 0
    cuts: int = 0
    failures: int = 0
    headers: List[Dict[str, str]] = field(default_factory=list)

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        owner: FileServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with owner.lock:
            entry = owner.entries.get(path)
            if entry is not None:
                entry.gets += 1
                entry.headers.append(dict(self.headers.items()))
                plan = self._plan(entry)
        if entry is None:
            return self._empty(404)
        if entry.behaviour.delay:
            time.sleep(entry.behaviour.delay)
        if plan["status"] is not None:
            return self._empty(plan["status"], plan["extra"])
        self._send_body(entry, plan["cut"])

    def _plan(self, entry: _Entry) -> dict:
        """Decide, under the lock, how this GET misbehaves."""
        b = entry.behaviour
        if b.status is not None:
            return {"status": b.status, "extra": {}, "cut": False}
        if b.redirect_to is not None:
            return {"status": b.redirect_status, "extra": {"Location": b.redirect_to}, "cut": False}
        if entry.failures < b.fail_times:
            entry.failures += 1
            extra = {"Retry-After": b.retry_after} if b.retry_after is not None else {}
            return {"status": b.fail_status, "extra": extra, "cut": False}
        cut = b.cut_after is not None and (b.cut_times is None or entry.cuts < b.cut_times)
        if cut:
            entry.cuts += 1
        return {"status": None, "extra": {}, "cut": cut}

    def _empty(self, status: int, extra: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _send_body(self, entry: _Entry, cut: bool) -> None:
        b, data = entry.behaviour, entry.data
        start, status = 0, 200
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if_range = self.headers.get("If-Range")
        if match and b.ranges and (if_range is None or if_range == entry.etag):
            start = int(match.group(1))
            if start >= len(data):
                return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
            status = 206
        body = data[start:]
        self.send_response(status)
        if status == 206:
            shown = start + 1 if b.bad_content_range else start
            self.send_header("Content-Range", f"bytes {shown}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body) + b.length_delta))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", entry.etag)
        self.send_header("Accept-Ranges", "bytes" if b.ranges else "none")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if cut:
            body = body[: b.cut_after]
        try:
            self.wfile.write(body)
            self.wfile.flush()
            if cut and b.stall:
                time.sleep(b.stall)
            if cut and b.reset:  # SO_LINGER 0 + close sends RST: the client sees "connection reset"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            elif cut:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # cut connections are expected; stay quiet
        pass


class FileServer:
    """Serve in-memory files over HTTP (or HTTPS with ``ssl_context``) on 127.0.0.1:<free port>.

    Args:
        ssl_context: A server-side SSLContext to speak HTTPS instead of HTTP.
    """

    def __init__(self, ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.lock = threading.Lock()
        self.entries: Dict[str, _Entry] = {}
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if ssl_context is not None else "http"
        self.port = self._httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """Full URL of ``path`` on this server."""
        return self.base_url + "/" + path.lstrip("/")

    def add(self, path: str, data: bytes, **behaviour) -> str:
        """Serve ``data`` at ``path`` with the given :class:`Behaviour` fields; returns the URL."""
        path = "/" + path.lstrip("/")
        with self.lock:
            self.entries[path] = _Entry(bytes(data), Behaviour(**behaviour))
        return self.url(path)

    def behave(self, path: str, **changes) -> None:
        """Change how ``path`` behaves from now on (counters of cuts and failures restart)."""
        path = "/" + path.lstrip("/")
        with self.lock:
            entry = self.entries[path]
            entry.behaviour = replace(entry.behaviour, **changes)
            entry.cuts = entry.failures = 0

    def gets(self, path: str) -> int:
        """Number of GETs received for ``path`` (0 for unknown paths)."""
        with self.lock:
            entry = self.entries.get("/" + path.lstrip("/"))
            return entry.gets if entry else 0

    def request_headers(self, path: str) -> List[Dict[str, str]]:
        """Headers of every GET received for ``path``, in order."""
        with self.lock:
            return list(self.entries["/" + path.lstrip("/")].headers)

    def start(self) -> "FileServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="FileServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

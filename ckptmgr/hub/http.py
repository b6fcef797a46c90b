"""A small HTTP(S) downloader with explicit retry and Range-resume control.

Why not fsspec's http filesystem or ``requests``? fsspec's http backend hides
retries and partial reads behind aiohttp and cannot tell us whether a server
honoured a ``Range`` request, and ``requests`` would be a new dependency. The
download cache needs exactly that control: resume an interrupted transfer with
``Range`` when the server answers 206 with a matching ``Content-Range``,
start again from byte 0 when it ignores the header, retry only what is worth
retrying (resets, timeouts, 5xx, 429) with bounded back-off that honours
``Retry-After``, and turn everything else into a typed error at once. The
standard library's ``urllib.request`` does the protocol work (redirects,
proxies from the environment, TLS with certificate verification always on).
"""
from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import os
import random
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO, Any, Optional, Tuple

from ..errors import CheckpointNotFoundError, DownloadError
from ..version import __version__

logger = logging.getLogger(__name__)

__all__ = ["RetryPolicy", "download", "TransientError"]

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class RetryPolicy:
    """How hard a download tries before giving up.

    Attributes:
        retries: Failed attempts (without progress) tolerated before raising
            (``CKPTMGR_DOWNLOAD_RETRIES``, default 5).
        timeout: Seconds each connect or read may block (``CKPTMGR_DOWNLOAD_TIMEOUT``, default 60).
        backoff: First back-off in seconds, doubled per failure with jitter
            (``CKPTMGR_DOWNLOAD_BACKOFF``, default 0.5).
        max_wait: Upper bound for any single wait, including ``Retry-After`` (default 60).
    """

    retries: int = 5
    timeout: float = 60.0
    backoff: float = 0.5
    max_wait: float = 60.0

    @classmethod
    def from_env(cls, retries: Optional[int] = None, timeout: Optional[float] = None) -> "RetryPolicy":
        """Build a policy from the ``CKPTMGR_DOWNLOAD_*`` variables, with explicit values winning."""
        return cls(
            retries=int(retries if retries is not None else _env_number("CKPTMGR_DOWNLOAD_RETRIES", 5)),
            timeout=float(timeout if timeout is not None else _env_number("CKPTMGR_DOWNLOAD_TIMEOUT", 60)),
            backoff=_env_number("CKPTMGR_DOWNLOAD_BACKOFF", 0.5),
        )

    def wait(self, failures: int, retry_after: Optional[float]) -> float:
        """Seconds to sleep before the next attempt."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        base = self.backoff * (2 ** max(failures - 1, 0))
        return min(base * (1 + random.random() * 0.25), self.max_wait)


class TransientError(Exception):
    """An attempt failed in a way worth retrying; carries the server's Retry-After if any."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Parse ``Retry-After`` (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _user_error(url: str, exc: Exception) -> Exception:
    """Map a non-retryable failure to a typed error with a useful hint."""
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (404, 410):
            return CheckpointNotFoundError(f"{url} does not exist (HTTP {exc.code})",
                                           "check the URL or model name; a mirror from CKPTMGR_URL_MIRRORS "
                                           "may lack the file")
        if exc.code in (401, 403):
            return DownloadError(f"access to {url} was refused (HTTP {exc.code})",
                                 "the server wants credentials or the file is private; use a URL you may read")
        return DownloadError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}")
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError) or isinstance(exc, ssl.SSLCertVerificationError):
        return DownloadError(f"TLS certificate of {url} could not be verified ({reason})",
                             "install the server's CA certificate (SSL_CERT_FILE) or use a mirror with "
                             "CKPTMGR_URL_MIRRORS; verification cannot be turned off")
    if isinstance(reason, ssl.SSLError) and not isinstance(reason, ssl.SSLCertVerificationError):
        hint = ("the server at that port does not speak TLS: if it is a plain HTTP server, use an http:// URL"
                if url.startswith("https://") and "WRONG_VERSION_NUMBER" in str(reason).upper()
                else "check that the host and port serve HTTPS, and the TLS versions both sides allow")
        return DownloadError(f"TLS handshake with {url} failed ({reason})", hint)
    if isinstance(reason, socket.gaierror):
        return DownloadError(f"cannot resolve the host of {url} ({reason})",
                             "check the host name and your DNS/network, or set CKPTMGR_URL_MIRRORS")
    if isinstance(reason, ConnectionRefusedError):
        return DownloadError(f"connection to {url} was refused",
                             "check the host and port, or that the server is running")
    return DownloadError(f"downloading {url} failed: {reason}")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in _RETRY_STATUS
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
        if isinstance(exc, urllib.error.URLError):
            return False
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN  # "temporary failure in name resolution" is worth a retry
    if isinstance(exc, (ssl.SSLCertVerificationError, ConnectionRefusedError)):
        return False
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return False  # a TLS protocol failure (an http:// port, no common version) is the same on every try
    return isinstance(exc, (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException,
                            ssl.SSLError, OSError))


class _Progress:
    """A tqdm bar when asked for one, otherwise nothing."""

    def __init__(self, enabled: bool, name: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                            file=sys.stderr, leave=True)

    def reset(self, done: int, total: Optional[int]) -> None:
        if self.bar is not None:
            self.bar.reset(total=total)
            self.bar.update(done)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Transfer:
    """State of one download into one file: bytes so far, running hash, validators."""

    def __init__(self, url: str, fileobj: IO[bytes], policy: RetryPolicy, progress: _Progress) -> None:
        self.url, self.fh, self.policy, self.progress = url, fileobj, policy, progress
        self.done = 0
        self.total: Optional[int] = None
        self.sha = hashlib.sha256()
        self.validator: Optional[str] = None  # ETag or Last-Modified, sent back as If-Range

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.done, self.total, self.sha = 0, None, hashlib.sha256()

    def request(self) -> urllib.request.Request:
        headers = {"User-Agent": f"ckptmgr/{__version__}", "Accept-Encoding": "identity"}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
            if self.validator:
                headers["If-Range"] = self.validator
        return urllib.request.Request(self.url, headers=headers)

    def attempt(self) -> None:
        """One GET; returns when the file is complete, raises TransientError if it should be retried."""
        context = ssl.create_default_context()  # certificate and host name verification, always
        try:
            response = urllib.request.urlopen(self.request(), timeout=self.policy.timeout, context=context)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and self.done:
                logger.debug("%s: server refused Range bytes=%d-; starting over", self.url, self.done)
                self.restart()
                raise TransientError("range not satisfiable", retry_after=0) from exc
            if _is_transient(exc):
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                raise TransientError(f"HTTP {exc.code}", retry_after) from exc
            raise _user_error(self.url, exc) from exc
        except Exception as exc:
            if _is_transient(exc):
                raise TransientError(str(getattr(exc, "reason", exc))) from exc
            raise _user_error(self.url, exc) from exc
        with response:
            self._start(response)
            self._stream(response)

    def _start(self, response: Any) -> None:
        """Check the response against what we asked for; reposition the file accordingly."""
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        self.validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if self.done and response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            total = None if not match or match.group(3) == "*" else int(match.group(3))
            ok = (match is not None and int(match.group(1)) == self.done
                  and (self.total is None or total == self.total)
                  and (length is None or length == int(match.group(2)) - int(match.group(1)) + 1))
            if ok:
                self.total = total
                logger.debug("%s: resuming at byte %d of %s", self.url, self.done, total)
                self.progress.reset(self.done, total)
                return
            self.restart()  # a Content-Range we did not ask for: trust nothing we have
            raise TransientError(f"server answered Range with Content-Range "
                                 f"{response.headers.get('Content-Range')!r}", retry_after=0)
        if self.done:
            logger.debug("%s: server ignored Range (HTTP %d); starting over", self.url, response.status)
        self.restart()
        self.total = length
        self.progress.reset(0, length)

    def _stream(self, response: Any) -> None:
        while True:
            try:
                chunk = response.read(CHUNK)
            except Exception as exc:  # only network errors here: disk errors from write() are not retried
                if _is_transient(exc):
                    raise TransientError(f"connection broke after {self.done} bytes: {exc!r}") from exc
                raise _user_error(self.url, exc) from exc
            if not chunk:
                break
            self.fh.write(chunk)
            self.sha.update(chunk)
            self.done += len(chunk)
            self.progress.update(len(chunk))
        if self.total is not None and self.done != self.total:
            # urllib returns b"" instead of raising when the peer closes early: Content-Length tells.
            raise TransientError(f"body ended after {self.done} of {self.total} bytes")


def download(url: str, fileobj: IO[bytes], policy: Optional[RetryPolicy] = None,
             progress: bool = False, name: str = "") -> Tuple[int, str]:
    """Download ``url`` into ``fileobj`` (a seekable file open for writing), retrying and resuming.

    Args:
        url: An ``http://`` or ``https://`` URL.
        fileobj: Seekable, truncatable binary file; its previous content is replaced.
        policy: Retries, timeout and back-off (from the environment when None).
        progress: Show a tqdm bar on stderr.
        name: Label for the progress bar.

    Returns:
        ``(size, sha256 hex digest)`` of the bytes written.

    Raises:
        CheckpointNotFoundError: HTTP 404 or 410.
        DownloadError: access denied, DNS failure, TLS failure, or retries exhausted.
    """
    policy = policy or RetryPolicy.from_env()
    bar = _Progress(progress, name or url.rsplit("/", 1)[-1])
    transfer = _Transfer(url, fileobj, policy, bar)
    failures = attempts = high_water = 0
    try:
        while True:
            attempts += 1
            try:
                transfer.attempt()
                break
            except TransientError as exc:
                # Only an attempt that got further than any before counts as progress and
                # forgives earlier failures; a server that keeps breaking at the same byte does not.
                failures = 0 if transfer.done > high_water else failures + 1
                high_water = max(high_water, transfer.done)
                if failures > policy.retries or attempts > policy.retries + 100:
                    raise DownloadError(f"downloading {url} failed after {attempts} attempts: {exc}",
                                        "the server or network keeps failing; try again later or set "
                                        "CKPTMGR_URL_MIRRORS to use a mirror") from exc
                delay = policy.wait(max(failures, 1), exc.retry_after)
                logger.info("download of %s interrupted (%s); retrying in %.1fs", url, exc, delay)
                time.sleep(delay)
    finally:
        bar.close()
    fileobj.flush()
    return transfer.done, transfer.sha.hexdigest()

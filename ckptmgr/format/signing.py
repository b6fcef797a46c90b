"""Signed manifests: an HMAC-SHA256 that only holders of the job's key can compute.

A manifest's own checksum proves a step is intact, not where it came from:
whoever can write a checkpoint directory can write a matching manifest. With
a signing key (``CheckpointManager(signing_key=...)`` or
``CKPTMGR_SIGNING_KEY``), every manifest carries

    "signature": {"algorithm": "hmac-sha256", "key_id": "<16 hex>", "hmac": "<64 hex>"}

where ``hmac`` is HMAC-SHA256 under the key over the manifest's canonical
bytes: its JSON fields (unknown ones included) with sorted keys, no
whitespace, UTF-8, the self-checksum left out and the signature's own
``hmac`` left out, so the algorithm and key id are signed too. The files
are covered through their sha256 in the manifest, so a signed manifest's
file checksums must be sha256 (a non-cryptographic checksum can be forged to
match); a manifest naming another ``checksum`` is refused.

The key id is a hash of the key: it tells "signed with another key" from
"altered" in messages and reveals nothing usable about the key.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any, Mapping, Optional, Union

from ..errors import SignatureError, StorageError
from .checksum import DEFAULT_CHECKSUM, check_checksum
from .manifest import Manifest

__all__ = ["ENV_KEY", "ALGORITHM", "SigningKey", "load_key", "signature_state", "signed_checksum"]

ENV_KEY = "CKPTMGR_SIGNING_KEY"
ALGORITHM = "hmac-sha256"
MIN_KEY_BYTES = 16
KeySpec = Union[None, bool, bytes, str, "os.PathLike[str]", "SigningKey"]
_GENERATE = "generate one with: python -c \"import secrets; print(secrets.token_hex(32))\" > signing.key"


def _canonical(content: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in content.items() if k != "manifest_sha256"}
    signature = body.get("signature")
    if isinstance(signature, Mapping):
        body["signature"] = {k: v for k, v in signature.items() if k != "hmac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def signature_state(manifest: Manifest) -> str:
    """``'unsigned'`` or ``'signed (key id ...)'``, for listings; checks nothing."""
    signature = manifest.signature or {}
    return f"signed (key id {signature.get('key_id')})" if signature else "unsigned"


class SigningKey:
    """A secret key that signs manifests and checks their signatures.

    Args:
        secret: The key bytes (at least 16; 32 random bytes recommended).
        source: Where the key came from, for messages (never the key itself).

    Raises:
        ValueError: the key is shorter than 16 bytes.
    """

    def __init__(self, secret: bytes, source: str = "the signing key") -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"{source} is {len(secret)} bytes; a signing key needs at least {MIN_KEY_BYTES} "
                             f"({_GENERATE})")
        self._secret = bytes(secret)
        self.source = source
        self.key_id = hashlib.sha256(b"ckptmgr-signing-key-id:" + self._secret).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, source={self.source!r})"

    def _mac(self, content: Mapping[str, Any]) -> bytes:
        return hmac.new(self._secret, _canonical(content), hashlib.sha256).digest()

    def sign(self, manifest: Manifest) -> None:
        """Set ``manifest.signature`` over its fields as :meth:`Manifest.to_bytes` will write them."""
        manifest.raw = None  # what is signed is what will be written
        manifest.signature = {"algorithm": ALGORITHM, "key_id": self.key_id}
        manifest.signature["hmac"] = self._mac(manifest.content()).hex()

    def check(self, manifest: Manifest, source: str) -> None:
        """Verify a manifest's signature under this key.

        Raises:
            SignatureError: unsigned, signed with another key or algorithm, or altered since it was signed.
        """
        content = manifest.content()
        signature = content.get("signature")
        if not isinstance(signature, Mapping):
            raise SignatureError(f"{source} is not signed, and a signing key was given (key id {self.key_id})")
        if signature.get("algorithm") != ALGORITHM:
            raise SignatureError(f"{source} is signed with {signature.get('algorithm')!r}; ckptmgr checks only "
                                 f"{ALGORITHM}")
        if content.get("checksum", "sha256") != "sha256":
            raise SignatureError(f"{source} checksums its files with {content.get('checksum')!r}; a signature "
                                 "covers files only through sha256 checksums")
        if signature.get("key_id") != self.key_id:
            raise SignatureError(f"{source} is signed with another key (key id {signature.get('key_id')}, this "
                                 f"key's id is {self.key_id})")
        try:
            given = bytes.fromhex(str(signature.get("hmac", "")))
        except ValueError:
            given = b""
        if not hmac.compare_digest(self._mac(content), given):
            raise SignatureError(f"{source} does not match its signature (key id {self.key_id}): it was changed "
                                 "after it was signed")


def _read_key_file(path: str, what: str) -> SigningKey:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise StorageError(f"cannot read the signing key file {path} ({what}): {exc.strerror or exc}",
                           "check the path and its permissions") from None
    for ending in (b"\r\n", b"\n"):  # a key written by echo or an editor: its newline is not part of it
        if data.endswith(ending):
            data = data[: -len(ending)]
            break
    return SigningKey(data, f"key file {path}")


def load_key(spec: KeySpec = None) -> Optional[SigningKey]:
    """The signing key a caller asked for.

    Args:
        spec: ``None``: ``CKPTMGR_SIGNING_KEY`` if set (a path to a key file
            when it names a file, else the key itself), otherwise no key;
            ``False``: no key, whatever the environment says; ``bytes``: the
            key; ``str`` or path-like: a key file (a trailing newline is not
            part of the key); a :class:`SigningKey`: itself.

    Returns:
        The key, or None.

    Raises:
        ValueError: the key is too short, or the environment variable names a
            path that does not exist.
        StorageError: the key file cannot be read.
    """
    if spec is None:
        value = os.environ.get(ENV_KEY, "")
        if not value:
            return None
        if os.path.isfile(value):
            return _read_key_file(value, ENV_KEY)
        if os.sep in value or value.startswith(("~", ".")):
            raise ValueError(f"{ENV_KEY} names {value!r}, which is not a file; set it to a key file's path or to "
                             f"the key itself ({_GENERATE})")
        return SigningKey(value.encode("utf-8"), ENV_KEY)
    if spec is False:
        return None
    if isinstance(spec, SigningKey):
        return spec
    if isinstance(spec, (bytes, bytearray)):
        return SigningKey(bytes(spec), "signing_key")
    if isinstance(spec, (str, os.PathLike)):
        return _read_key_file(os.fspath(spec), "signing_key")
    raise TypeError(f"signing_key must be bytes, a key file path, False or None, not {type(spec).__name__}")


def signed_checksum(requested: Optional[str], signing: bool) -> str:
    """The per-file checksum a manager uses: sha256 when it signs, else the one requested (default xxh3).

    Args:
        requested: ``CheckpointManager(checksum=...)``; None for the default.
        signing: Whether the manager signs its manifests.

    Raises:
        ValueError: an unknown checksum, or a non-cryptographic one together with a signing key.
    """
    if requested is None:
        return "sha256" if signing else DEFAULT_CHECKSUM
    name = check_checksum(requested)
    if signing and name != "sha256":
        raise ValueError(f"checksum={name!r} cannot carry a signature: a signed manifest covers its files through "
                         "sha256 (pass checksum='sha256', or leave checksum out when signing_key is set)")
    return name

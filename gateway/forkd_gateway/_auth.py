"""API keys: where they come from, how a presented key is checked, and who may connect without one.

A key file holds one key per line, optionally named (``name:key``); blank lines and ``#`` comments are
skipped. ``FORKD_API_KEYS`` holds the same entries separated by commas or whitespace. A key's id (what
logs, the audit log and metrics show; never the key) is its name, or ``key-`` + the first 12 hex digits of
its SHA-256 when it has none.

Checking a key compares SHA-256 digests with ``hmac.compare_digest`` against every configured key, without
stopping at the first match, so the time taken says nothing about which key (or which prefix) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from forkd.protocol import SUBPROTOCOL

__all__ = [
    "ApiKeys",
    "AuthConfigError",
    "ENV_VAR",
    "LOCAL_KEY_ID",
    "key_from_request",
    "is_loopback_host",
    "is_loopback_client",
    "check_bind",
]

ENV_VAR = "FORKD_API_KEYS"
# Owner of every sandbox on a gateway that runs without keys (loopback only).
LOCAL_KEY_ID = "local"
KEY_SUBPROTOCOL_PREFIX = SUBPROTOCOL.rsplit(".", 1)[0] + ".key."  # "forkd.key.<key>"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AuthConfigError(ValueError):
    """A malformed key file or key entry."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The configured keys (id → key), checked in constant time."""

    def __init__(self, entries: Mapping[str, str] | None = None) -> None:
        self._by_id: dict[str, bytes] = {}
        for key_id, key in (entries or {}).items():
            self.add(key, key_id)

    def add(self, key: str, key_id: str | None = None) -> str:
        if not key or any(c.isspace() for c in key):
            raise AuthConfigError("an API key must be non-empty and contain no whitespace")
        digest = _digest(key)
        key_id = key_id or "key-" + digest.hex()[:12]
        if not _NAME.match(key_id):
            raise AuthConfigError(f"bad key name {key_id!r} (letters, digits, _.@- only)")
        old = self._by_id.get(key_id)
        if old is not None and old != digest:
            raise AuthConfigError(f"two different keys are named {key_id!r}")
        self._by_id[key_id] = digest
        return key_id

    def add_entries(self, entries: Iterable[str], source: str) -> None:
        for n, raw in enumerate(entries, 1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            name, sep, key = entry.partition(":")
            try:
                if sep:
                    self.add(key.strip(), name.strip())
                else:
                    self.add(entry)
            except AuthConfigError as exc:
                raise AuthConfigError(f"{source}, entry {n}: {exc}") from None

    def add_file(self, path: str | os.PathLike) -> None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise AuthConfigError(f"cannot read API keys file {path}: {exc.strerror}") from None
        self.add_entries(text.splitlines(), str(path))

    def add_env(self, value: str | None) -> None:
        if value:
            self.add_entries(re.split(r"[,\s]+", value), f"${ENV_VAR}")

    def lookup(self, presented: str | None) -> str | None:
        """The id of the key ``presented`` is, or None."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for key_id, stored in self._by_id.items():
            # No early exit: every key is compared, whatever matched.
            if hmac.compare_digest(digest, stored) and found is None:
                found = key_id
        return found

    def ids(self) -> list[str]:
        return sorted(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __bool__(self) -> bool:
        return bool(self._by_id)


def key_from_request(headers: Mapping[str, str], subprotocols: Iterable[str]) -> str | None:
    """The key a client presented: ``Authorization: Bearer``, ``X-API-Key``, or (browsers) the
    subprotocol ``forkd.key.<key>``."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    for proto in subprotocols:
        if proto.startswith(KEY_SUBPROTOCOL_PREFIX):
            return proto[len(KEY_SUBPROTOCOL_PREFIX) :]
    return None


def is_loopback_host(host: str) -> bool:
    """Whether a bind address is loopback-only (names other than localhost are not trusted)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_client(host: str | None) -> bool:
    # No address at all means a unix socket or an in-process client: local by construction.
    if host is None:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_bind(host: str, keys: ApiKeys) -> None:
    """Refuse to serve a network without keys."""
    if not keys and not is_loopback_host(host):
        raise AuthConfigError(
            f"refusing to listen on {host} without API keys: anyone who can reach it could run code. "
            f"Configure keys (--api-keys-file, ${ENV_VAR} or api_keys in the config) or bind to 127.0.0.1"
        )

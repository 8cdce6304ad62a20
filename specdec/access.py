"""Who may call a server: bearer keys in `authorization` metadata, checked before a request is
even decoded.

Two uses of the same mechanism:
  * the coordinator's API keys (clients; the key's fingerprint owns the sessions it creates);
  * the tier token, a shared secret that the coordinators send to the draft and target tiers, so
    the tiers serve only coordinators (`specdec up` generates one per run).
Keys are compared in constant time; only fingerprints (a SHA-256 prefix) are stored or logged.
The health and reflection services are open: probes and tools must reach them without a key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Iterable, Sequence

from specdec.errors import Unauthenticated

AUTHORIZATION = "authorization"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MAX_KEY_LEN = 512  # longer headers are refused before they are compared


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def new_token() -> str:
    """A fresh random tier token (256 bits)."""
    return secrets.token_urlsafe(32)


def read_keys(inline: Iterable[str], file: str) -> list[str]:
    """Keys from a flag/env list and from a file (one per line, # comments)."""
    keys = [k for k in inline if k]
    if file:
        for line in Path(file).expanduser().read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {key}"),)


class KeyRing:
    """Accepted bearer keys. Empty means every caller is anonymous and allowed."""

    def __init__(self, keys: Iterable[str], missing_hint: str):
        self._keys = [k.encode() for k in keys if k]
        self.missing_hint = missing_hint  # what a caller without a key is told to do

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """The caller's key fingerprint ("" when keys are off); Unauthenticated without a valid key.
        The message never repeats what the caller sent."""
        if not self._keys:
            return ""
        header = next((v for k, v in metadata or () if k == AUTHORIZATION), "")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated(self.missing_hint)
        if len(key) > MAX_KEY_LEN or not any(hmac.compare_digest(key.encode(), known) for known in self._keys):
            raise Unauthenticated("the key sent in 'authorization: Bearer <key>' is not valid here")
        return fingerprint(key)


def is_open_method(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)

"""API keys on the coordinator's public RPCs, and who owns a session.

Clients send `authorization: Bearer <key>` metadata. Keys are compared in constant time and
only their fingerprints (a SHA-256 prefix) are stored with sessions or logged.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Iterable

from specdec.errors import PermissionDenied, Unauthenticated
from specdec.session_store import SessionRecord


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def load_keys(inline: Iterable[str], file: str) -> list[str]:
    """Keys from the flag/env list and from a file (one per line, # comments)."""
    keys = [k for k in inline if k]
    if file:
        for line in Path(file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


class ApiKeys:
    """Identifies callers. With no keys configured every caller is anonymous and allowed."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, context) -> str:
        """The caller's key fingerprint ("" when keys are off); UNAUTHENTICATED without a valid key."""
        if not self._keys:
            return ""
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("this coordinator needs an API key: send metadata 'authorization: Bearer <key>'")
        if not any(hmac.compare_digest(key.encode(), known) for known in self._keys):
            raise Unauthenticated("the API key is not valid for this coordinator")
        return fingerprint(key)

    @staticmethod
    def check_owner(session: SessionRecord, caller: str) -> None:
        if session.owner != caller:
            raise PermissionDenied(
                f"session {session.session_id!r} was created with another API key; only that key can read or continue it"
            )

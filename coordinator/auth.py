"""API keys on the coordinator's public RPCs, and who owns a session.

Clients send `authorization: Bearer <key>` metadata; specdec.access.KeyRing checks it (in the
server interceptor, before the request is decoded, and again here to learn who is calling).
Only key fingerprints are stored with sessions.
"""

from __future__ import annotations

from typing import Iterable

from specdec.access import KeyRing
from specdec.errors import PermissionDenied
from specdec.session_store import SessionRecord


def api_keys(keys: Iterable[str]) -> KeyRing:
    return KeyRing(keys, "this coordinator needs an API key: send metadata 'authorization: Bearer <key>'")


def check_owner(session: SessionRecord, caller_id: str) -> None:
    if session.owner != caller_id:
        raise PermissionDenied("this session was created with another API key; only that key can read or continue it")

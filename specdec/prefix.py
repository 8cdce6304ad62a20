"""Committed tokens with their digest: how a replica proves, not trusts, that its cache holds a
session's committed prefix.

The digest is BLAKE2b-128 over the token ids as little-endian int32 (SessionContext's
prefix_digest). It is extendable: appending a round's tokens costs O(new tokens), so neither the
coordinator nor a replica rehashes a long session every round.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

DIGEST_BYTES = 16


class PrefixDigest:
    """The running digest of a token sequence."""

    def __init__(self, tokens: Sequence[int] = ()):
        self._hash = hashlib.blake2b(digest_size=DIGEST_BYTES)
        self.length = 0
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> "PrefixDigest":
        if len(tokens):
            self._hash.update(np.asarray(tokens, dtype="<i4").tobytes())
            self.length += len(tokens)
        return self

    def copy(self) -> "PrefixDigest":
        twin = PrefixDigest.__new__(PrefixDigest)
        twin._hash, twin.length = self._hash.copy(), self.length
        return twin

    def digest(self) -> bytes:
        return self._hash.digest()


def prefix_digest(tokens: Sequence[int]) -> bytes:
    return PrefixDigest(tokens).digest()


class CommittedTokens:
    """A session's committed token ids and their digest, extended together."""

    def __init__(self, tokens: Iterable[int] = ()):
        self.ids: list[int] = list(tokens)
        self._digest = PrefixDigest(self.ids)

    def extend(self, new: Sequence[int]) -> None:
        self.ids += new
        self._digest.extend(new)

    @property
    def digest(self) -> bytes:
        return self._digest.digest()

    def __len__(self) -> int:
        return len(self.ids)

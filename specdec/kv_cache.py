"""Per-session KV caches held by a service, and the one operation on them: crop and extend.

A service keeps, for each session, the token ids whose keys/values it holds. A request names
the committed tokens (as a delta) and maybe draft tokens after them; the cache is cropped to
the longest common prefix with that sequence and the rest is run through the model. Rollback
after a rejection is the same operation, so a retried request gives the same answer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from specdec.errors import CacheMiss, InvalidArgument
from specdec.prefix import PrefixDigest
from specdec.wire import ContextDelta


@dataclass
class SessionCache:
    """What a service holds for one session: token ids and (for a model) their KV cache."""

    tokens: list[int] = field(default_factory=list)
    kv: Any = None  # transformers DynamicCache covering tokens[:kv_len]
    snapshot_len: int = 0  # committed positions handed to the Redis snapshot (kv_snapshot)
    digest: PrefixDigest | None = None  # of the committed prefix last proven, tokens[:digest.length]

    @property
    def kv_len(self) -> int:
        return 0 if self.kv is None else int(self.kv.get_seq_length())

    @property
    def nbytes(self) -> int:
        if self.kv is None:
            return 8 * len(self.tokens)
        total = 0
        for layer in getattr(self.kv, "layers", []):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total + 8 * len(self.tokens)


class SessionCacheTable:
    """session id -> SessionCache, least recently used evicted beyond max_bytes or max_sessions.

    Eviction loses nothing: the next request for an evicted session is answered CacheMiss
    (delta) or rebuilt from the full token list it carries.
    """

    def __init__(self, max_bytes: int, max_sessions: int = 10_000):
        self.max_bytes = max_bytes
        self.max_sessions = max_sessions
        self.evictions = 0
        self.bytes_held = 0  # as of the last enforce_bounds, for metrics read from another thread
        self._entries: OrderedDict[str, SessionCache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def get_or_create(self, session_id: str) -> SessionCache:
        entry = self._entries.pop(session_id, None) or SessionCache()
        self._entries[session_id] = entry  # most recently used last
        return entry

    def install(self, session_id: str, entry: SessionCache) -> None:
        """Hold `entry` for the session (a restored snapshot), most recently used."""
        self._entries.pop(session_id, None)
        self._entries[session_id] = entry

    def release(self, session_id: str) -> bool:
        return self._entries.pop(session_id, None) is not None

    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def enforce_bounds(self, keep: str | None = None) -> None:
        """Evict least recently used sessions (never `keep`) until within bounds."""
        total = self.total_bytes()
        for session_id in list(self._entries):
            if total <= self.max_bytes and len(self._entries) <= self.max_sessions:
                break
            if session_id == keep:
                continue
            total -= self._entries.pop(session_id).nbytes
            self.evictions += 1
        self.bytes_held = total


def committed_tokens(entry: "SessionCache", context: ContextDelta) -> list[int]:
    """The full committed sequence a request describes, cached[:delta_start] + delta, proven
    against the request's prefix digest before it is used.

    Raises CacheMiss when this replica does not hold that prefix (evicted, restarted, another
    replica served the session, or its cached tokens are not the session's): the caller resends
    with delta_start = 0. The message says nothing of what the replica holds.
    """
    start, delta = context.delta_start, context.delta_tokens
    if start + len(delta) != context.committed_len:
        raise InvalidArgument(
            f"context says committed_len={context.committed_len} but delta_start={start} "
            f"+ {len(delta)} delta tokens = {start + len(delta)}"
        )
    miss = CacheMiss("this replica does not hold the session's committed prefix; resend the context with delta_start=0")
    if start > len(entry.tokens):
        raise miss
    if entry.digest is not None and entry.digest.length == start:
        proof = entry.digest.copy().extend(delta)
    else:
        proof = PrefixDigest(entry.tokens[:start]).extend(delta)
    if proof.digest() != context.prefix_digest:
        if start == 0:
            raise InvalidArgument("context.prefix_digest is not the digest of the committed tokens sent")
        raise miss
    entry.digest = proof
    return list(entry.tokens[:start]) + list(delta)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CausalLMRunner:
    """Runs a Hugging Face causal LM over a session's cache. Not thread-safe: one caller at a time."""

    def __init__(self, model, vocab_size: int):
        self.model = model
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def logits_from(self, entry: SessionCache, tokens: Sequence[int], first: int) -> tuple[torch.Tensor, int]:
        """Logits [len(tokens) - first, V] at input positions first..len(tokens)-1.

        Row j predicts tokens[first + j + 1]. The cache is cropped to the longest prefix it
        shares with `tokens` (at most `first`, since those positions must be recomputed to
        get their logits) and extended with the rest. Returns (logits, reused token count).
        """
        from transformers import DynamicCache

        if not 0 <= first < len(tokens):
            raise ValueError(f"first={first} outside 0..{len(tokens) - 1}")
        keep = min(common_prefix_len(entry.tokens[: entry.kv_len], tokens), first)
        if entry.kv is None or keep == 0:
            entry.kv = DynamicCache(config=self.model.config)
            keep = 0
        elif entry.kv_len > keep:
            entry.kv.crop(keep - entry.kv_len)  # negative: number of positions to drop
        new = torch.tensor([list(tokens[keep:])], dtype=torch.long, device=self.device)
        out = self.model(input_ids=new, cache=entry.kv, use_cache=True, logits_to_keep=len(tokens) - first)
        entry.tokens = list(tokens)
        return out.logits[0, :, : self.vocab_size].float(), keep

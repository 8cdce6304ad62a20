"""Conversions between protobuf messages and the plain objects the domain code uses.

Validation of what arrives over the wire lives here, so every servicer checks the same way.
Error messages never repeat an id or a string the client sent: they name the field and the rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from specdec.errors import InvalidArgument
from specdec.prefix import DIGEST_BYTES, CommittedTokens
from specdec.sampling import COUPLED, REJECTION, SamplingParams
from specdec.v1 import common_pb2


@dataclass(frozen=True)
class ContextDelta:
    """A request's description of the session's committed tokens (see SessionContext)."""

    session_id: str
    committed_len: int
    delta_start: int
    delta_tokens: tuple[int, ...]
    prefix_digest: bytes = b""


# Session ids are ours (36 hex characters, specdec.session_store); anything else in this shape is
# accepted from other coordinators, nothing longer or stranger.
MAX_SESSION_ID_LEN = 64
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_SESSION_ID_LEN)
_RULES_FROM_PB = {
    common_pb2.SAMPLING_RULE_UNSPECIFIED: REJECTION,
    common_pb2.SAMPLING_RULE_REJECTION: REJECTION,
    common_pb2.SAMPLING_RULE_COUPLED: COUPLED,
}
_RULES_TO_PB = {REJECTION: common_pb2.SAMPLING_RULE_REJECTION, COUPLED: common_pb2.SAMPLING_RULE_COUPLED}


def check_session_id(session_id: str, field: str = "session_id") -> str:
    if not session_id:
        raise InvalidArgument(f"{field} is empty")
    if not _SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(
            f"{field} is not a session id: at most {MAX_SESSION_ID_LEN} letters, digits, '-' or '_' "
            "(send back the id a Generate stream returned)"
        )
    return session_id


def rule_from_pb(value: int) -> str | None:
    """The rule a SamplingRule value names; None for UNSPECIFIED."""
    if value == common_pb2.SAMPLING_RULE_UNSPECIFIED:
        return None
    if value not in _RULES_FROM_PB:
        raise InvalidArgument(f"unknown sampling rule {value}")
    return _RULES_FROM_PB[value]


def sampling_from_pb(message: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=float(message.temperature),
        top_k=int(message.top_k),
        top_p=float(message.top_p) if message.top_p else 1.0,
        seed=int(message.seed),
        rule=rule_from_pb(message.rule) or REJECTION,
    ).validate()


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
        rule=_RULES_TO_PB[params.rule],
    )


def check_token_ids(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    for token in tokens:
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"{what} contains token id {token}, outside the vocabulary [0, {vocab_size})")


def context_from_pb(message: common_pb2.SessionContext, vocab_size: int, max_context: int) -> ContextDelta:
    check_session_id(message.session_id, "context.session_id")
    if message.committed_len < 1:
        raise InvalidArgument("context.committed_len must be >= 1: a session starts with its prompt")
    if message.committed_len > max_context:
        raise InvalidArgument(
            f"context.committed_len={message.committed_len} exceeds the model's context of {max_context} tokens"
        )
    if len(message.prefix_digest) != DIGEST_BYTES:
        raise InvalidArgument(
            f"context.prefix_digest must be the {DIGEST_BYTES}-byte BLAKE2b digest of the committed tokens"
        )
    check_token_ids(message.delta_tokens, vocab_size, "context.delta_tokens")
    return ContextDelta(
        session_id=message.session_id,
        committed_len=int(message.committed_len),
        delta_start=int(message.delta_start),
        delta_tokens=tuple(message.delta_tokens),
        prefix_digest=bytes(message.prefix_digest),
    )


def context_to_pb(session_id: str, committed: CommittedTokens, delta_start: int) -> common_pb2.SessionContext:
    return common_pb2.SessionContext(
        session_id=session_id,
        committed_len=len(committed),
        delta_start=delta_start,
        delta_tokens=committed.ids[delta_start:],
        prefix_digest=committed.digest,
    )

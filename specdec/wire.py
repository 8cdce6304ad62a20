"""Conversions between protobuf messages and the plain objects the domain code uses.

Validation of what arrives over the wire lives here, so every servicer checks the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from specdec.errors import InvalidArgument
from specdec.sampling import SamplingParams
from specdec.v1 import common_pb2


@dataclass(frozen=True)
class ContextDelta:
    """A request's description of the session's committed tokens (see SessionContext)."""

    session_id: str
    committed_len: int
    delta_start: int
    delta_tokens: tuple[int, ...]


MAX_SESSION_ID_LEN = 128


def sampling_from_pb(message: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=float(message.temperature),
        top_k=int(message.top_k),
        top_p=float(message.top_p) if message.top_p else 1.0,
        seed=int(message.seed),
    ).validate()


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed
    )


def check_token_ids(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    for token in tokens:
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"{what} contains token id {token}, outside the vocabulary [0, {vocab_size})")


def context_from_pb(message: common_pb2.SessionContext, vocab_size: int, max_context: int) -> ContextDelta:
    if not message.session_id:
        raise InvalidArgument("context.session_id is empty")
    if len(message.session_id) > MAX_SESSION_ID_LEN:
        raise InvalidArgument(f"context.session_id is longer than {MAX_SESSION_ID_LEN} characters")
    if message.committed_len < 1:
        raise InvalidArgument("context.committed_len must be >= 1: a session starts with its prompt")
    if message.committed_len > max_context:
        raise InvalidArgument(
            f"context.committed_len={message.committed_len} exceeds the model's context of {max_context} tokens"
        )
    check_token_ids(message.delta_tokens, vocab_size, "context.delta_tokens")
    return ContextDelta(
        session_id=message.session_id,
        committed_len=int(message.committed_len),
        delta_start=int(message.delta_start),
        delta_tokens=tuple(message.delta_tokens),
    )


def context_to_pb(session_id: str, tokens: Sequence[int], delta_start: int) -> common_pb2.SessionContext:
    return common_pb2.SessionContext(
        session_id=session_id,
        committed_len=len(tokens),
        delta_start=delta_start,
        delta_tokens=list(tokens[delta_start:]),
    )

"""gRPC clients for the draft and target tiers: replica choice, retries, deltas, cache-miss resends.

A session goes to the replica its id hashes to (so that replica keeps its cache). A call that
fails for want of a replica (unavailable, past its deadline, overloaded) is retried, with
exponential backoff and jitter, on the next replica in the session's order: Propose and Verify
are idempotent (a replica crops its cache to the request), so a retry gives the answer the
first try would have. A replica that failed is tried last until the health watch sees it
serving again. Only the committed tokens a replica has not been sent yet travel (a delta); a
replica that lost them answers FAILED_PRECONDITION and gets the whole sequence.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import random
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence, TypeVar

import grpc
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.planning import Plan
from specdec.access import bearer_metadata
from specdec.tracing import client_span, with_trace
from specdec.prefix import CommittedTokens
from specdec.sampling import SamplingParams, tree_depths
from specdec.serving import CHANNEL_OPTIONS
from specdec.tensor_codec import decode_tensor, encode_tensor
from specdec.tls import open_channel
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc
from specdec.wire import context_to_pb, sampling_to_pb

log = logging.getLogger(__name__)
T = TypeVar("T")

# Worth trying another replica for; anything else is the request's own fault. CANCELLED reaches
# us as a status only from the replica's side (a server stopping cancels the calls it holds; our
# own cancellation raises CancelledError here instead), and every tier call is safe to repeat.
_RETRY_ELSEWHERE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.CANCELLED}
# The replica itself is in trouble (not merely busy): try it last until it is healthy again.
_REPLICA_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# Reconnect quickly to a replica that restarts: the retries' backoff, not gRPC's 1 s+, sets the pace.
TIER_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True)
class RetryPolicy:
    """How one call is retried across a tier's replicas."""

    attempts: int = 4  # tries in all, the first one included
    initial_backoff_s: float = 0.05  # wait before the first retry; doubles each retry
    max_backoff_s: float = 1.0

    def backoff_s(self, retry: int) -> float:
        """Wait before retry number `retry` (1, 2, ...): exponential, with jitter so that the
        sessions of a failed replica do not all come back at once."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)


@dataclass
class DeltaTracker:
    """Per-call memory of how many committed tokens each replica has been sent."""

    sent: dict[str, int] = field(default_factory=dict)

    def start_for(self, address: str, committed_len: int) -> int:
        return min(self.sent.get(address, 0), committed_len)

    def forget(self, address: str) -> None:
        self.sent.pop(address, None)


Send = Callable[[object, common_pb2.SessionContext], Awaitable[T]]


async def _send_delta(stub, session_id: str, committed: CommittedTokens, start: int, send: Send[T]) -> T:
    """Send the tokens from `start`; if the replica lost the prefix (FAILED_PRECONDITION), all of them."""
    try:
        return await send(stub, context_to_pb(session_id, committed, start))
    except aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.FAILED_PRECONDITION or start == 0:
            raise
        return await send(stub, context_to_pb(session_id, committed, 0))


def expand_addresses(addresses: Sequence[str]) -> list[str]:
    """host:port entries whose host name resolves to several addresses become one entry per
    address, so a DNS name that lists every replica (a Kubernetes headless Service) works."""
    expanded: list[str] = []
    for entry in addresses:
        host, _, port = entry.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            expanded.append(entry)  # already an address
            continue
        except ValueError:
            pass
        try:
            found = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
        except (OSError, ValueError):
            found = []
        if len(found) <= 1:
            expanded.append(entry)  # let gRPC resolve (and report) it
        else:
            expanded += [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in found]
    return list(dict.fromkeys(expanded))


class ReplicaSet:
    """Channels to the replicas of one tier, tried in session-affinity order, healthy ones first."""

    def __init__(self, addresses: Sequence[str], stub_class, timeout_s: float,
                 credentials: grpc.ChannelCredentials | None = None, retry: RetryPolicy = RetryPolicy(),
                 tier_token: str = ""):
        if not addresses:
            raise ValueError("a tier needs at least one replica address")
        if retry.attempts < 1:
            raise ValueError("a call needs at least one attempt")
        self.configured = list(addresses)
        self.stub_class = stub_class
        self.timeout_s = timeout_s
        self.retry = retry
        self.credentials = credentials
        # Sent with every call but health checks: the tiers serve only holders of the tier token.
        self.metadata = bearer_metadata(tier_token) if tier_token else None
        self.addresses: list[str] = []
        self.stubs: list = []
        self.healthy: dict[str, bool] = {}
        self._channels: dict[str, aio.Channel] = {}
        self.refresh()

    async def resolve(self) -> None:
        """Re-resolve the configured names, on a thread (a slow DNS answer must not stall the
        event loop and every stream on it), and open channels to replicas that appeared. An answer
        for names that were reconfigured meanwhile is dropped (the new names were resolved then)."""
        names = list(self.configured)
        resolved = await asyncio.to_thread(expand_addresses, names)
        if list(self.configured) == names:
            self.refresh(resolved)

    def refresh(self, current: list[str] | None = None) -> None:
        """Use these resolved addresses (default: resolve the configured names now, blocking)."""
        current = expand_addresses(self.configured) if current is None else current
        for address in current:
            if address not in self._channels:
                self._channels[address] = open_channel(address, self.credentials, TIER_CHANNEL_OPTIONS)
                self.healthy.setdefault(address, True)
        self.addresses = current
        self.stubs = [self.stub_class(self._channels[a]) for a in current]

    async def check_health(self) -> None:
        """Ask every replica's grpc.health.v1 service; unhealthy ones are tried last."""
        async def probe(address: str) -> None:
            try:
                reply = await health_pb2_grpc.HealthStub(self._channels[address]).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                self.healthy[address] = reply.status == health_pb2.HealthCheckResponse.SERVING
            except aio.AioRpcError:
                self.healthy[address] = False

        await asyncio.gather(*(probe(a) for a in self.addresses))

    async def watch(self, interval_s: float) -> None:
        """Re-resolve and health-check forever (a background task of the coordinator)."""
        while True:
            await self.resolve()
            await self.check_health()
            await asyncio.sleep(interval_s)

    def any_healthy(self) -> bool:
        return any(self.healthy.get(a, True) for a in self.addresses)

    def order_for(self, session_id: str) -> list[int]:
        count = len(self.addresses)
        first = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "little") % count
        order = [(first + i) % count for i in range(count)]
        # Affinity first, but a replica known to be down only as a last resort.
        return sorted(order, key=lambda i: not self.healthy.get(self.addresses[i], True))

    async def call(self, session_id: str, committed: CommittedTokens, tracker: DeltaTracker, send: Send[T]) -> T:
        """Run `send(stub, context)` on the session's replica; retry on the next ones in its
        order (round and round) with backoff, up to the policy's attempts."""
        last_error: aio.AioRpcError | None = None
        # A snapshot: refresh() may change the replica list while this call awaits.
        candidates = [(self.addresses[i], self.stubs[i]) for i in self.order_for(session_id)]
        for attempt in range(self.retry.attempts):
            if attempt:
                await asyncio.sleep(self.retry.backoff_s(attempt))
            address, stub = candidates[attempt % len(candidates)]
            try:
                with client_span(self.stub_class.__name__.removesuffix("Stub"), replica=address):
                    reply = await _send_delta(stub, session_id, committed, tracker.start_for(address, len(committed)),
                                              send)
            except aio.AioRpcError as err:
                tracker.forget(address)
                if err.code() not in _RETRY_ELSEWHERE:
                    raise
                if err.code() in _REPLICA_DOWN:
                    self.healthy[address] = False  # the health watch restores it
                log.warning("%s failed (%s), attempt %d of %d", address, err.code().name, attempt + 1,
                            self.retry.attempts)
                last_error = err
                continue
            tracker.sent[address] = len(committed)
            return reply
        assert last_error is not None
        raise last_error

    async def release_everywhere(self, session_id: str, timeout_s: float = 2.0) -> int:
        """Ask every replica to free the session's cache; returns how many held one. A replica
        that does not answer keeps it until its LRU bound evicts it."""
        async def release(stub) -> bool:
            try:
                reply = await stub.Release(common_pb2.ReleaseRequest(session_id=session_id), timeout=timeout_s,
                                           metadata=self.metadata)
                return reply.released
            except aio.AioRpcError:
                return False

        return sum(await asyncio.gather(*(release(stub) for stub in self.stubs)))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@dataclass
class DraftResult:
    tokens: list[int]
    probs: torch.Tensor | None  # q, [len(tokens), V]: the rejection rule with a model drafter only
    point_mass: bool
    compute_s: float
    features_from: int | None = None  # a feature drafter lacking the target's features from here
    parents: list[int] | None = None  # a tree of drafts (ProposeResponse.parents); None: a chain
    confidences: list[float] | None = None  # per draft, the drafter's (ProposeResponse.confidences)
    follows: list[int] | None = None  # drafted in the target: the tokens the round before must commit (NextDrafts)

    @property
    def depth(self) -> int:
        """How far past the committed tokens the drafts reach."""
        return max(tree_depths(self.parents)) if self.parents else len(self.tokens)


@dataclass
class VerifyResult:
    """What the target returns for a round: its own choice at each of the k+1 positions
    (argmax when greedy, its coupled draw under the coupled rule), or, for the rejection rule,
    the distributions p the choice is made from."""

    tokens: list[int] | None
    probs: torch.Tensor | None
    compute_s: float
    reused_tokens: int
    computed_tokens: int
    features: torch.Tensor | None = None  # float16 [positions from the requested start, width]
    batch_sessions: int = 1  # sessions in the target's forward pass that served it
    batch_rows: int = 0  # positions that pass computed for all of them
    next_drafts: DraftResult | None = None  # the next round's, drafted in the target (VerifyRequest.next_round)


class DraftClient:
    in_target = False  # (coordinator.local_draft.TargetDrafts: drafts that come with the Verify)

    def __init__(self, replicas: ReplicaSet, kind: str, feature_layers: Sequence[int] = ()):
        self.replicas = replicas
        self.kind = kind
        self.feature_layers = tuple(feature_layers)  # a feature drafter's: the target layers it reads

    async def propose(
        self, session_id: str, committed: CommittedTokens, k: int, params: SamplingParams, tracker: DeltaTracker,
        features: torch.Tensor | None = None, features_start: int = 0, provisional: Sequence[int] = (),
        tree_nodes: int = 0, min_confidence: float = 0.0,
    ) -> DraftResult:
        sampling = sampling_to_pb(params)
        relayed = encode_tensor(features) if features is not None else None

        async def send(stub: draft_pb2_grpc.DraftServiceStub, ctx) -> draft_pb2.ProposeResponse:
            request = draft_pb2.ProposeRequest(context=ctx, k=k, sampling=sampling, features=relayed,
                                               features_start=features_start, provisional_tokens=list(provisional),
                                               tree_nodes=tree_nodes, min_confidence=min_confidence)
            return await stub.Propose(request, timeout=self.replicas.timeout_s,
                                      metadata=with_trace(self.replicas.metadata))

        reply = await self.replicas.call(session_id, committed, tracker, send)
        confidences = _confidences(reply)
        if reply.parents:
            parents = _checked_tree(reply.tokens, reply.parents, k, tree_nodes, with_probs=reply.HasField("probs"))
            return DraftResult(list(reply.tokens), None, reply.point_mass, reply.timings.compute_s,
                               reply.features_from if reply.HasField("features_from") else None, parents,
                               confidences)
        drafted = list(reply.tokens)[:k]
        probs = None
        if reply.HasField("probs"):
            probs = decode_tensor(reply.probs)
            if probs.dim() != 2 or probs.shape[0] != len(reply.tokens):
                raise ValueError(f"draft probs of shape {tuple(probs.shape)} for {len(reply.tokens)} tokens")
            probs = probs[: len(drafted)]
        needs_q = not params.greedy and not params.coupled
        if needs_q and probs is None and not reply.point_mass and drafted:
            raise ValueError("a sampled Propose came back without distributions or point_mass")
        return DraftResult(drafted, probs if needs_q else None, reply.point_mass, reply.timings.compute_s,
                           reply.features_from if reply.HasField("features_from") else None, None,
                           confidences[: len(drafted)] if confidences is not None else None)


class TargetClient:
    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas

    async def verify(
        self,
        session_id: str,
        committed: CommittedTokens,
        drafts: Sequence[int],
        params: SamplingParams,
        tracker: DeltaTracker,
        vocab_size: int,
        feature_layers: Sequence[int] = (),
        feature_start: int = 0,
        parents: Sequence[int] | None = None,
        next_round: Plan | None = None,
    ) -> VerifyResult:
        """The target's choices on the drafts (a chain, or a tree with `parents`); with next_round
        (a target that hosts a drafter) also the next round's drafts, drafted after the target's
        own verdict."""
        sampling = sampling_to_pb(params)

        async def send(stub: target_pb2_grpc.TargetServiceStub, ctx) -> target_pb2.VerifyResponse:
            request = target_pb2.VerifyRequest(context=ctx, draft_tokens=list(drafts), sampling=sampling,
                                               draft_parents=list(parents or ()))
            if feature_layers:
                request.feature_start = feature_start
                request.feature_layers.extend(feature_layers)
            if next_round is not None:
                request.next_round.CopyFrom(target_pb2.NextRound(k=next_round.k, tree_nodes=next_round.nodes,
                                                                 min_confidence=next_round.min_confidence))
            return await stub.Verify(request, timeout=self.replicas.timeout_s,
                                     metadata=with_trace(self.replicas.metadata))

        reply = await self.replicas.call(session_id, committed, tracker, send)
        rows = len(drafts) + 1
        tokens = probs = None
        if params.greedy or params.coupled:
            tokens = list(reply.argmax_tokens if params.greedy else reply.sampled_tokens)
            if len(tokens) != rows:
                raise ValueError(f"target returned {len(tokens)} token ids for {rows} positions")
        else:
            probs = decode_tensor(reply.probs, expected_shape=(rows, vocab_size))
        features = None
        if feature_layers:
            features = decode_tensor(reply.features)
            if features.dim() != 2 or features.shape[0] != len(committed) + len(drafts) - feature_start:
                raise ValueError(f"target returned features of shape {tuple(features.shape)}")
        next_drafts = _next_drafts(reply.next_drafts, next_round) if reply.HasField("next_drafts") else None
        return VerifyResult(tokens, probs, reply.timings.compute_s, reply.cache.reused_tokens,
                            reply.cache.computed_tokens, features, max(1, reply.timings.batch_sessions),
                            reply.timings.batch_rows, next_drafts)


def _next_drafts(reply: target_pb2.NextDrafts, asked: Plan | None) -> DraftResult:
    """The next round's drafts from a Verify reply (NextDrafts), checked against what was asked."""
    if asked is None:
        raise ValueError("the target sent next drafts nobody asked for")
    parents = _checked_tree(reply.tokens, reply.parents, asked.k, asked.nodes) if reply.parents else None
    if parents is None and len(reply.tokens) > asked.k:
        raise ValueError(f"{len(reply.tokens)} next drafts for k={asked.k}")
    return DraftResult(list(reply.tokens), None, False, reply.compute_s, None, parents, _confidences(reply),
                       list(reply.follows))


def _checked_tree(tokens: Sequence[int], parents: Sequence[int], k: int, nodes: int,
                  with_probs: bool = False) -> list[int]:
    """A tree of drafts as it came back (ProposeResponse or NextDrafts): one parent per draft, at most
    max(nodes, k) drafts, no q (trees are not verified by the rejection rule), at most k deep.
    Returns the parents; a ValueError otherwise."""
    if len(parents) != len(tokens) or len(parents) > max(nodes, k) or with_probs:
        raise ValueError(f"a tree of {len(tokens)} drafts came back with {len(parents)} parents")
    depth = max(tree_depths(parents))  # raises unless a tree
    if depth > k:
        raise ValueError(f"a tree of drafts {depth} deep for k={k}")
    return list(parents)


def _confidences(reply: draft_pb2.ProposeResponse | target_pb2.NextDrafts) -> list[float] | None:
    """A reply's per-draft confidences (float32 [len(tokens)]); None where it sent none."""
    return decode_tensor(reply.confidences, (len(reply.tokens),)).tolist() if reply.HasField("confidences") else None

"""Build and run the coordinator: connect Redis and the tiers, check vocabularies, serve."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2

from coordinator.auth import api_keys
from coordinator.clients import DraftClient, ReplicaSet, RetryPolicy, TargetClient
from coordinator.config import CoordinatorConfig
from coordinator.decoding import MAX_TREE_NODES, Decoder, ModelLimits
from coordinator.core import GenerationCore
from coordinator.http_api import OpenAIServer
from coordinator.local_draft import LocalNgramDraft, TargetDrafts
from coordinator.servicer import CoordinatorServicer
from specdec import models
from specdec.metrics import ServiceMetrics
from specdec.models import DRAFT_IN_TARGET
from specdec.ngram import LOCAL_NGRAM
from specdec.tls import channel_credentials, redact_url
from specdec.access import read_keys
from specdec.serving import Started, StartupError, run_until_signalled, start_server
from specdec.sampling import RULES
from specdec.session_store import SessionStore, redis_client
from specdec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, draft_pb2_grpc, target_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


async def _info(replicas: ReplicaSet, index: int, timeout_s: float) -> common_pb2.ModelInfo:
    """GetInfo from one replica, waiting for it to come up."""
    stub, address = replicas.stubs[index], replicas.addresses[index]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5.0, metadata=replicas.metadata)
        except aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise StartupError(f"{address} did not answer GetInfo: {err.details()}") from err
            await asyncio.sleep(0.2)


async def build_decoder(config: CoordinatorConfig, tokenizer=None) -> Decoder:
    """Everything the servicer needs, checked: Redis answers, vocabularies agree."""
    if config.default_sampling_rule not in RULES:
        raise StartupError(f"--default-sampling-rule must be one of {', '.join(RULES)}")
    redis = redis_client(config.redis_url, config.redis_timeout_s)
    try:
        await redis.ping()
    except Exception as exc:  # noqa: BLE001
        raise StartupError(f"cannot reach Redis at {redact_url(config.redis_url)}: {exc}") from exc
    tokenizer = tokenizer or models.load_tokenizer(config.tokenizer)
    tier_credentials = channel_credentials(config.tier_tls_ca, config.tier_tls_cert, config.tier_tls_key)
    tier_token = next(iter(read_keys([config.tier_token], config.tier_token_file)), "")
    target = TargetClient(
        ReplicaSet(config.target, target_pb2_grpc.TargetServiceStub, config.rpc_timeout_s, tier_credentials,
                   RetryPolicy(config.retry_attempts, config.retry_backoff_s, config.retry_max_backoff_s), tier_token)
    )
    infos = [await _info(target.replicas, i, config.startup_timeout_s) for i in range(len(target.replicas.addresses))]
    reference = infos[0]
    for address, info in zip(target.replicas.addresses, infos):
        if info.vocab_fingerprint != reference.vocab_fingerprint:
            raise StartupError(
                f"target replica {address} serves a different vocabulary than {target.replicas.addresses[0]}"
            )
    if models.vocab_fingerprint(tokenizer) != reference.vocab_fingerprint:
        raise StartupError(
            f"the coordinator's tokenizer ({config.tokenizer}) differs from the target's ({reference.name}); "
            "pass --tokenizer with the target model"
        )
    draft = None
    if config.draft == (LOCAL_NGRAM,):
        draft = LocalNgramDraft(config.ngram_max, config.ngram_min)
    elif config.draft == (DRAFT_IN_TARGET,):
        kinds = {info.drafter_kind for info in infos}
        if "" in kinds or len(kinds) > 1:
            hosts = [address for address, info in zip(target.replicas.addresses, infos) if not info.drafter_kind]
            raise StartupError(f"--draft {DRAFT_IN_TARGET}: every target replica must host the same drafter (start "
                               f"them with --drafter); {', '.join(hosts) or 'they'} differ")
        draft = TargetDrafts(kinds.pop())
    elif config.draft:
        replicas = ReplicaSet(config.draft, draft_pb2_grpc.DraftServiceStub, config.draft_timeout_s, tier_credentials,
                              RetryPolicy(config.draft_retry_attempts, 0.0, 0.0), tier_token)
        kinds, layers = set(), set()
        for index, address in enumerate(replicas.addresses):
            info = await _info(replicas, index, config.startup_timeout_s)
            layers.add(tuple(info.feature_layers))
            if info.feature_layers and info.feature_hidden_size != reference.feature_hidden_size:
                raise StartupError(
                    f"the feature drafter at {address} was trained for a target of hidden size "
                    f"{info.feature_hidden_size}, but {reference.name} has {reference.feature_hidden_size}"
                )
            if info.vocab_fingerprint and info.vocab_fingerprint != reference.vocab_fingerprint:
                raise StartupError(
                    f"draft model {info.name} at {address} does not share the target's tokenizer "
                    f"({reference.name}): their vocabularies differ, so its tokens would mean other "
                    "words. Use a draft model from the target's family, or the ngram drafter."
                )
            kinds.add(info.kind)
        if len(layers) > 1:
            raise StartupError("the draft replicas read different target layers: run one drafter in a tier")
        draft = DraftClient(replicas, "/".join(sorted(kinds)), layers.pop())
    limits = ModelLimits(
        vocab_size=reference.vocab_size,
        max_context=reference.max_context,
        eos_token_ids=frozenset(reference.eos_token_ids),
    )
    store = SessionStore(redis, config.session_ttl_s, config.session_lease_s)
    if config.draft_ahead not in ("auto", "on", "off"):
        raise StartupError("--draft-ahead must be auto, on or off")
    # Draft-ahead pays where drafting costs a call but no compute: the n-gram tier.
    ahead = config.draft_ahead == "on" or (config.draft_ahead == "auto" and isinstance(draft, DraftClient)
                                           and draft.kind == "ngram")
    if not 0 <= config.tree_nodes <= MAX_TREE_NODES:
        raise StartupError(f"--tree-nodes must be in 0..{MAX_TREE_NODES} (0: chains of drafts)")
    return Decoder(target, draft, store, tokenizer, limits, metrics=ServiceMetrics(), max_k=config.max_k,
                   draft_ahead=ahead, tree_nodes=config.tree_nodes, tree_max_sessions=config.tree_max_sessions,
                   confidence_floor=confidence_floor(config.min_draft_confidence))


def confidence_floor(setting: str) -> float | None:
    """--min-draft-confidence as the decoder's confidence_floor: None for 'auto', else the number."""
    if setting == "auto":
        return None
    try:
        floor = float(setting)
    except ValueError:
        floor = math.nan
    if not 0.0 <= floor <= 1.0:
        raise StartupError(f"--min-draft-confidence must be 'auto' or a number in [0, 1], not {setting!r}")
    return floor


async def start(config: CoordinatorConfig, decoder: Decoder | None = None) -> Started:
    decoder = decoder or await build_decoder(config)
    keys = api_keys(read_keys(config.api_keys, config.api_keys_file))
    if not keys.enabled:
        log.warning("no API keys configured: every caller may start and read sessions")
    servicer = CoordinatorServicer(GenerationCore(decoder, config, keys))
    servicer.watchers = [asyncio.create_task(replicas.watch(config.health_interval_s))
                         for replicas in decoder.replica_sets]
    started = await start_server(
        lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server),
        [SERVICE_NAME], config, decoder.metrics, keys,
    )
    if config.http_port >= 0:
        http = OpenAIServer(servicer.core, config.tokenizer)
        started.http_address = await http.start(config.host, config.http_port)
        started.on_stop.insert(0, http.stop)
    servicer.watchers.append(asyncio.create_task(_watch_dependencies(started, decoder, config)))
    started.on_stop.append(lambda: _close(servicer))
    return started


async def _watch_dependencies(started: Started, decoder: Decoder, config: CoordinatorConfig) -> None:
    """The coordinator's health says whether it can serve: NOT_SERVING while Redis does not
    answer or no target replica passes its health check, SERVING again once both do."""
    serving = True
    while True:
        await asyncio.sleep(config.health_interval_s)
        try:
            await asyncio.wait_for(decoder.store.redis.ping(), config.redis_timeout_s)
            redis_up = True
        except Exception:  # noqa: BLE001 - any failure to answer is "down"
            redis_up = False
        now = redis_up and decoder.target.replicas.any_healthy()
        if now != serving:
            serving = now
            log.warning("dependencies %s: Redis %s, target replicas %s", "back" if now else "down",
                        "up" if redis_up else "unreachable", "serving" if decoder.target.replicas.any_healthy()
                        else "all failing")
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await started.health.set(name, status)


async def _close(servicer: CoordinatorServicer) -> None:
    """After the server stopped: end the health watches, close the tier channels and Redis."""
    for watcher in servicer.watchers:
        watcher.cancel()
    for replicas in servicer.decoder.replica_sets:
        await replicas.close()
    await servicer.decoder.store.redis.aclose()


async def main(config: CoordinatorConfig) -> None:
    await run_until_signalled(await start(config), config.drain_grace_s)

"""What the draft and target servicers share: model facts, the session table and the worker."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from specdec.access import KeyRing, read_keys
from specdec.cpu_kernels import applies as c_kernels_apply
from specdec.kv_cache import SessionCache, SessionCacheTable, committed_tokens
from specdec.runner import ModelRunner, UnsupportedModel
from specdec.kv_snapshot import Snapshot, Snapshots, SnapshotSettings, SnapshotStore
from specdec.serving import ModelWorker, StartupError
from specdec.session_store import log_id, redis_client
from specdec.v1 import common_pb2
from specdec.wire import ContextDelta, check_session_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    name: str
    kind: str
    vocab_size: int
    vocab_fingerprint: str
    max_context: int
    eos_token_ids: tuple[int, ...]
    feature_layers: tuple[int, ...] = ()  # a feature drafter's target layers
    feature_hidden_size: int = 0
    drafter_kind: str = ""  # a target that drafts the next round after a Verify: its drafter's kind

    def to_pb(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            name=self.name,
            kind=self.kind,
            vocab_size=self.vocab_size,
            vocab_fingerprint=self.vocab_fingerprint,
            max_context=self.max_context,
            eos_token_ids=list(self.eos_token_ids),
            feature_layers=list(self.feature_layers),
            feature_hidden_size=self.feature_hidden_size,
            drafter_kind=self.drafter_kind,
        )


class SessionHost:
    """A model worker plus the per-session caches it serves from."""

    def __init__(self, facts: ModelFacts, cache_bytes: int, worker: ModelWorker, snapshots: Snapshots | None = None):
        self.facts = facts
        self.table = SessionCacheTable(max_bytes=cache_bytes)
        self.worker = worker  # the thread that loaded the model
        self.snapshots = snapshots

    async def close(self) -> None:
        """Write what is queued for Redis (the snapshots still to be copied out first), then stop
        the writer."""
        if self.snapshots is not None:
            await self.worker.run(lambda: None)  # the model thread's jobs run in turn: those before are done
            await self.snapshots.writer.close()
            await self.snapshots.store.redis.aclose()

    async def restore_if_missing(self, context: ContextDelta) -> None:
        """A session this replica does not hold gets its KV cache from the Redis snapshot, if
        there is one, so the prefix is not recomputed. Anything wrong with it: recompute."""
        if self.snapshots is None or context.session_id in self.table:
            return
        if context.committed_len < self.snapshots.settings.min_restore_tokens:
            return
        started = time.perf_counter()
        snapshot = await self.snapshots.fetch(context.session_id)
        if snapshot is not None:
            installed = (await self.worker.run(lambda: self._install(context.session_id, snapshot))).value
            if installed:
                self.snapshots.record_restore(snapshot, time.perf_counter() - started)

    def _install(self, session_id: str, snapshot: Snapshot) -> bool:
        if session_id in self.table:  # a request of its own got there first
            return False
        try:
            entry = self.snapshots.rebuild(snapshot)
        except (ValueError, RuntimeError) as exc:
            log.warning("KV snapshot of session %s is unusable (%s); recomputing instead", log_id(session_id), exc)
            return False
        self.table.install(session_id, entry)
        self.table.enforce_bounds(keep=session_id)
        return True

    def entry_and_tokens(self, context: ContextDelta):
        """Run on the worker thread: the session's cache entry and its full committed tokens."""
        entry = self.table.get_or_create(context.session_id)
        try:
            tokens = committed_tokens(entry, context)
        except Exception:
            if not entry.tokens:
                self.table.release(context.session_id)  # do not keep an empty entry for a miss
            raise
        return entry, tokens

    def run_batch(
        self,
        requests: Sequence[Any],
        make_job: Callable[[Any, SessionCache, list[int]], Any],
        run_jobs: Callable[[list[Any]], Sequence[Any]],
    ) -> list[Any]:
        """On the worker thread: resolve each request's context (a cache miss fails only that
        request), run the resolvable ones together, then enforce the cache bound. Returns one
        outcome, a result or an exception, per request."""
        outcomes: list[Any] = [None] * len(requests)
        jobs, positions, entries = [], [], []
        for i, request in enumerate(requests):
            try:
                entry, tokens = self.entry_and_tokens(request.context)
            except Exception as exc:  # noqa: BLE001 - handed back as that request's outcome
                outcomes[i] = exc
                continue
            jobs.append(make_job(request, entry, tokens))
            positions.append(i)
            entries.append(entry)
        if jobs:
            for i, result in zip(positions, run_jobs(jobs)):
                outcomes[i] = result
            if self.snapshots is not None:
                # Copied out after the replies go, before any other pass can change these caches
                # (the model thread takes its jobs in turn): the reply never waits for a snapshot.
                contexts = [requests[i].context for i in positions]
                self.worker.defer(lambda: self._snapshot(contexts, entries))
        self.table.enforce_bounds()
        return outcomes

    def _snapshot(self, contexts: Sequence[ContextDelta], entries: Sequence[SessionCache]) -> None:
        for context, entry in zip(contexts, entries):
            try:
                self.snapshots.after_forward(context.session_id, entry, context.committed_len)
            except Exception:  # noqa: BLE001 - a snapshot is an optimisation; never fail the request
                log.exception("KV snapshot of session %s failed", log_id(context.session_id))

    async def release(self, request: common_pb2.ReleaseRequest, context) -> common_pb2.ReleaseResponse:
        session_id = check_session_id(request.session_id)
        released = (await self.worker.run(lambda: self.table.release(session_id))).value
        return common_pb2.ReleaseResponse(released=bool(released))

    async def get_info(self, request, context) -> common_pb2.ModelInfo:
        return self.facts.to_pb()


@dataclass(frozen=True)
class LoadedModel:
    runner: ModelRunner
    facts: ModelFacts


def check_cpu_kernels(setting: str, runner: ModelRunner) -> None:
    """--cpu-kernels c refuses to start without the C kernels (where they apply: float32 on CPU);
    the attention and products the runner got are logged either way."""
    if setting == "c" and c_kernels_apply(runner.dtype, runner.device) and runner.c_kernels is None:
        raise StartupError("--cpu-kernels c: the C kernels did not build here (the log says why; a C compiler is "
                           "needed); --cpu-kernels auto falls back to torch's attention and oneDNN's products")
    kernels = runner.c_kernels
    threads = "long calls split among torch's OpenMP threads" if kernels and kernels.openmp else "one thread"
    products = {"onednn": "oneDNN", "torch": "F.linear"}.get(runner.products) or (
        f"C kernel ({kernels.linear.lanes}-float vectors, {kernels.linear.rows_a_pass} rows a pass), {threads}")
    log.info("attention: %s; products: %s; their weights: %s",
             "torch blocks" if runner.c_attention is None else f"C kernel, {threads}", products,
             ", ".join(f"{count} {kind}" for kind, count in sorted(runner.weight_formats.items())))


def should_compile(setting: str, device: str) -> bool:
    """--compile on|off|auto: auto compiles on CUDA only (on CPU it measured no faster)."""
    if setting not in ("on", "off", "auto"):
        raise StartupError(f"--compile must be 'on', 'off' or 'auto', not {setting!r}")
    return setting == "on" or (setting == "auto" and device.startswith("cuda"))


def load_causal_lm(spec: str, kind: str, device: str, dtype: str, compile: str = "off",
                   max_batch: int = 1, invariant: bool = True, cpu_kernels: str = "auto",
                   gguf_blocks: bool = True) -> LoadedModel:
    """Load model + tokenizer and describe them. Logits are cut to the tokenizer's vocabulary
    (embedding tables are often padded), so draft and target distributions line up. A compiled
    runner is warmed up for passes of up to max_batch sessions, so that no request pays a compile."""
    from specdec import models

    if cpu_kernels not in ("c", "torch", "auto"):
        raise StartupError(f"--cpu-kernels must be 'c', 'torch' or 'auto', not {cpu_kernels!r}")
    tokenizer = models.load_tokenizer(spec)
    model = models.load_model(spec, device=device, dtype=dtype)
    vocab_size = len(tokenizer)
    embedding_rows = model.get_output_embeddings().weight.shape[0]
    if embedding_rows < vocab_size:
        raise ValueError(f"{spec}: the model has {embedding_rows} output rows for a {vocab_size}-token vocabulary")
    facts = ModelFacts(
        name=spec or models.DEFAULT_MODEL,
        kind=kind,
        vocab_size=vocab_size,
        vocab_fingerprint=models.vocab_fingerprint(tokenizer),
        max_context=models.max_context(model),
        eos_token_ids=tuple(models.eos_token_ids(model, tokenizer)),
        feature_hidden_size=model.config.hidden_size,
    )
    try:
        runner = ModelRunner(model, vocab_size, compile=should_compile(compile, device), invariant=invariant,
                             c_attention=cpu_kernels != "torch", c_products=cpu_kernels != "torch",
                             c_blocks=gguf_blocks)
    except UnsupportedModel as exc:
        raise StartupError(f"{spec}: {exc}") from None
    check_cpu_kernels(cpu_kernels, runner)
    if runner.compiled:
        started = time.monotonic()
        shapes = runner.warm_up(max_batch)
        log.info("%s compiled and warmed up (%d pass shapes) in %.1f s", facts.name, shapes,
                 time.monotonic() - started)
    return LoadedModel(runner, facts)


class SnapshotOptions(Protocol):
    """The KV-snapshot part of the draft and target configs."""

    redis_url: str
    redis_timeout_s: float
    dtype: str
    snapshot_max_session_bytes: int
    snapshot_max_total_bytes: int
    snapshot_ttl_s: float
    snapshot_max_pending_bytes: int
    snapshot_min_chunk_tokens: int
    snapshot_min_restore_tokens: int


def open_snapshots(options: SnapshotOptions, tier: str, loaded: LoadedModel, metrics) -> Snapshots | None:
    """Snapshots to the configured Redis (None without a URL). Call inside the event loop: the
    writer task starts here. Redis is not contacted until the first write or restore, so a
    replica starts, and serves by recomputing, while Redis is down."""
    if not options.redis_url:
        return None
    client = redis_client(options.redis_url, options.redis_timeout_s)
    facts = loaded.facts
    store = SnapshotStore(client, tier, f"{facts.name}|{options.dtype}|{facts.vocab_fingerprint}",
                          options.snapshot_max_session_bytes, options.snapshot_ttl_s, options.snapshot_max_total_bytes)
    settings = SnapshotSettings(options.snapshot_max_pending_bytes, options.snapshot_min_chunk_tokens,
                                options.snapshot_min_restore_tokens)
    snapshots = Snapshots(store, settings, loaded.runner.kv_shape, metrics)
    snapshots.writer.start()
    return snapshots


class TierAccessOptions(Protocol):
    """Who may call a draft or target replica (the tier part of their configs)."""

    tier_token: str
    tier_token_file: str
    tls_client_ca: str
    allow_unauthenticated: bool


def tier_keys(options: TierAccessOptions, tier: str) -> KeyRing:
    """The keys a tier accepts. A tier that would serve anyone (no token, no client certificates)
    refuses to start unless told it is on a private network."""
    tokens = read_keys([options.tier_token], options.tier_token_file)
    if not tokens and not options.tls_client_ca:
        if not options.allow_unauthenticated:
            raise StartupError(
                f"the {tier} tier has no tier token and no client CA, so anyone who reaches its port could read "
                "and change sessions. Give it the coordinators' token (--tier-token-file, or the "
                "SPECDEC_*_TIER_TOKEN variable), demand client certificates (--tls-client-ca), or pass "
                "--allow-unauthenticated on a private test network"
            )
        log.warning("the %s tier serves any caller (--allow-unauthenticated)", tier)
    return KeyRing(tokens, f"this {tier} replica serves only coordinators: send the tier token as "
                           "'authorization: Bearer <token>'")

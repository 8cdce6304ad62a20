"""What the draft and target servicers share: model facts, the session table and the worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from specdec.kv_cache import CausalLMRunner, SessionCache, SessionCacheTable, committed_tokens
from specdec.serving import ModelWorker
from specdec.v1 import common_pb2
from specdec.wire import ContextDelta


@dataclass(frozen=True)
class ModelFacts:
    name: str
    kind: str
    vocab_size: int
    vocab_fingerprint: str
    max_context: int
    eos_token_ids: tuple[int, ...]

    def to_pb(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            name=self.name,
            kind=self.kind,
            vocab_size=self.vocab_size,
            vocab_fingerprint=self.vocab_fingerprint,
            max_context=self.max_context,
            eos_token_ids=list(self.eos_token_ids),
        )


class SessionHost:
    """A model worker plus the per-session caches it serves from."""

    def __init__(self, facts: ModelFacts, cache_bytes: int, worker_name: str):
        self.facts = facts
        self.table = SessionCacheTable(max_bytes=cache_bytes)
        self.worker = ModelWorker(worker_name)

    def entry_and_tokens(self, context: ContextDelta):
        """Run on the worker thread: the session's cache entry and its full committed tokens."""
        entry = self.table.get_or_create(context.session_id)
        try:
            tokens = committed_tokens(entry.tokens, context.delta_start, context.delta_tokens, context.committed_len)
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
        jobs, positions = [], []
        for i, request in enumerate(requests):
            try:
                entry, tokens = self.entry_and_tokens(request.context)
            except Exception as exc:  # noqa: BLE001 - handed back as that request's outcome
                outcomes[i] = exc
                continue
            jobs.append(make_job(request, entry, tokens))
            positions.append(i)
        if jobs:
            for i, result in zip(positions, run_jobs(jobs)):
                outcomes[i] = result
        self.table.enforce_bounds()
        return outcomes

    async def release(self, request: common_pb2.ReleaseRequest, context) -> common_pb2.ReleaseResponse:
        released = (await self.worker.run(lambda: self.table.release(request.session_id))).value
        return common_pb2.ReleaseResponse(released=bool(released))

    async def get_info(self, request, context) -> common_pb2.ModelInfo:
        return self.facts.to_pb()


@dataclass(frozen=True)
class LoadedModel:
    runner: CausalLMRunner
    facts: ModelFacts


def load_causal_lm(spec: str, kind: str, device: str, dtype: str) -> LoadedModel:
    """Load model + tokenizer and describe them. Logits are cut to the tokenizer's vocabulary
    (embedding tables are often padded), so draft and target distributions line up."""
    from specdec import models

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
    )
    return LoadedModel(CausalLMRunner(model, vocab_size), facts)

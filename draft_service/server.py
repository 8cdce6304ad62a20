"""Build and run the draft service."""

from __future__ import annotations

import sys

import torch

from draft_service.config import DraftConfig
from draft_service.drafters import ModelDrafter, NgramDrafter
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.eagle import MATMUL_DTYPES, is_drafter_folder
from specdec.serving import StartupError
from draft_service.servicer import DraftServicer
from specdec.service_base import ModelFacts, SessionHost, load_causal_lm, open_snapshots, tier_keys
from specdec.metrics import ServiceMetrics
from specdec.serving import ModelWorker, Started, run_until_signalled, start_server
from specdec.v1 import draft_pb2, draft_pb2_grpc

SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name
NGRAM = "ngram"


def build_servicer(config: DraftConfig, metrics: ServiceMetrics) -> DraftServicer:
    worker = ModelWorker("draft-model")
    if config.model == NGRAM:
        facts = ModelFacts(
            name=NGRAM,
            kind=NGRAM,
            vocab_size=config.ngram_vocab_size or 2**31 - 1,
            vocab_fingerprint="",  # no tokenizer: any target's vocabulary fits
            max_context=2**31 - 1,
            eos_token_ids=(),
        )
        drafter, snapshots = NgramDrafter(config.ngram_max, config.ngram_min), None  # no KV cache to snapshot
    elif is_drafter_folder(config.model):
        if config.tree_expand < 0 or config.tree_children < 1 or config.max_catch_up < 0:
            raise StartupError("--tree-expand must be >= 0 (0 = auto), --tree-children >= 1 and "
                               "--max-catch-up >= 0 (0 = all)")
        if config.matmul_dtype not in MATMUL_DTYPES:
            raise StartupError(f"--matmul-dtype must be one of {', '.join(MATMUL_DTYPES)}, not {config.matmul_dtype!r}")
        try:
            drafter = worker.call(lambda: FeatureDrafter.load(config.model, config.feature_target, config.device,
                                                              config.hybrid_ngram, config.tree_expand,
                                                              config.tree_children, config.matmul_dtype,
                                                              config.cpu_kernels, config.max_catch_up))
        except ValueError as error:  # a setting the drafter refuses (--cpu-kernels, its config's)
            raise StartupError(f"{config.model}: {error}") from None
        target = config.feature_target or drafter.config.target
        tokenizer = models.load_tokenizer(target)
        if models.vocab_fingerprint(tokenizer) != drafter.config.vocab_fingerprint:
            raise StartupError(f"{config.model} was trained for another vocabulary than {target}'s")
        facts = ModelFacts(
            name=config.model, kind=drafter.kind, vocab_size=drafter.config.target_vocab_size,
            vocab_fingerprint=drafter.config.vocab_fingerprint, max_context=drafter.config.max_position_embeddings,
            eos_token_ids=(), feature_layers=drafter.feature_layers, feature_hidden_size=drafter.config.hidden_size,
        )
        snapshots = None  # its cache is rebuilt from the target's features, cheaply
    else:
        loaded = worker.call(lambda: load_causal_lm(config.model, "model", config.device, config.dtype,
                                                    config.compile, max_batch=config.max_batch,
                                                    invariant=config.batch_invariant,
                                                    cpu_kernels=config.cpu_kernels, gguf_blocks=config.gguf_blocks))
        facts, drafter = loaded.facts, ModelDrafter(loaded.runner)
        snapshots = open_snapshots(config, "draft", loaded, metrics)
    host = SessionHost(facts, config.cache_bytes, worker, snapshots)
    metrics.watch_cache(host.table)
    return DraftServicer(host, drafter, config.max_k, config.batch_window_ms / 1000, config.max_batch,
                         config.max_queued, metrics)


async def start(config: DraftConfig) -> Started:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    sys.setswitchinterval(config.gil_switch_ms / 1000)
    keys = tier_keys(config, "draft")
    metrics = ServiceMetrics()
    servicer = build_servicer(config, metrics)
    started = await start_server(
        lambda server: draft_pb2_grpc.add_DraftServiceServicer_to_server(servicer, server),
        [SERVICE_NAME], config, metrics, keys,
    )
    started.on_stop.append(servicer.host.close)
    return started


async def main(config: DraftConfig) -> None:
    await run_until_signalled(await start(config), config.drain_grace_s)

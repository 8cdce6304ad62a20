"""Build and run the target service."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.eagle import is_drafter_folder
from specdec.service_base import LoadedModel, SessionHost, load_causal_lm, open_snapshots, tier_keys
from specdec.metrics import ServiceMetrics
from specdec.serving import ModelWorker, Started, StartupError, run_until_signalled, start_server
from specdec.v1 import target_pb2, target_pb2_grpc
from target_service.config import TargetConfig
from target_service.drafting import TargetDrafting
from target_service.servicer import TargetServicer

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


def build_servicer(config: TargetConfig, metrics: ServiceMetrics) -> TargetServicer:
    worker = ModelWorker("target-model")
    loaded = worker.call(lambda: load_causal_lm(config.model, "target", config.device, config.dtype, config.compile,
                                                max_batch=config.max_batch, invariant=config.batch_invariant,
                                                cpu_kernels=config.cpu_kernels, gguf_blocks=config.gguf_blocks))
    drafting = worker.call(lambda: load_drafting(config, loaded)) if config.drafter else None
    facts = replace(loaded.facts, drafter_kind=drafting.kind) if drafting is not None else loaded.facts
    snapshots = open_snapshots(config, "target", loaded, metrics)
    host = SessionHost(facts, config.cache_bytes, worker, snapshots)
    metrics.watch_cache(host.table)
    return TargetServicer(host, loaded.runner, config.max_k, config.batch_window_ms / 1000, config.max_batch,
                          config.max_queued, metrics, drafting)


def load_drafting(config: TargetConfig, loaded: LoadedModel) -> TargetDrafting:
    """The hosted feature drafter (--drafter), on the target's embeddings, checked against it."""
    folder = models.default_drafter(config.model) if config.drafter == models.AUTO_DRAFTER else config.drafter
    if not is_drafter_folder(folder):
        raise StartupError(f"--drafter {config.drafter}: not a feature drafter's folder (config.json and "
                           "model.safetensors from specdec train-draft)"
                           + (f"; none ships for {config.model}" if config.drafter == models.AUTO_DRAFTER else ""))
    try:
        drafter = FeatureDrafter.load(folder, device=config.device, cpu_kernels=config.cpu_kernels,
                                      embeddings=loaded.runner.embed)
    except ValueError as error:  # a setting the drafter refuses (--cpu-kernels)
        raise StartupError(f"--drafter {folder}: {error}") from None
    facts = loaded.facts
    if drafter.config.vocab_fingerprint != facts.vocab_fingerprint:
        raise StartupError(f"--drafter {folder} was trained for another vocabulary than {facts.name}'s")
    if drafter.config.hidden_size != facts.feature_hidden_size or max(drafter.feature_layers) > len(loaded.runner.layers):
        raise StartupError(f"--drafter {folder} reads layers {list(drafter.feature_layers)} of hidden size "
                           f"{drafter.config.hidden_size}; {facts.name} has {len(loaded.runner.layers)} layers of "
                           f"{facts.feature_hidden_size}")
    return TargetDrafting(drafter, config.drafter_cache_bytes, facts.max_context)


async def start(config: TargetConfig) -> Started:
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    sys.setswitchinterval(config.gil_switch_ms / 1000)
    keys = tier_keys(config, "target")
    metrics = ServiceMetrics()
    servicer = build_servicer(config, metrics)
    started = await start_server(
        lambda server: target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server),
        [SERVICE_NAME], config, metrics, keys,
    )
    started.on_stop.append(servicer.host.close)
    return started


async def main(config: TargetConfig) -> None:
    await run_until_signalled(await start(config), config.drain_grace_s)

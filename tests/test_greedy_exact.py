"""Greedy output through the real services equals the target's own generate(do_sample=False)."""

from __future__ import annotations

import pytest
import torch

from helpers import generate
from specdec import models

PROMPTS = ["tell me a story about a cat", "what is 2 + 2? answer in one word"]


@pytest.fixture(scope="module")
def target_reference(tiny_target):
    model = models.load_model(str(tiny_target))

    def reference(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids) :].tolist()

    return reference


@pytest.mark.parametrize("drafter", ["model", "ngram", "local-ngram"])
@pytest.mark.parametrize("k", [1, 4, 8])
async def test_greedy_equals_target_generate(channels, target_reference, drafter, k):
    for prompt in PROMPTS:
        result = await generate(channels[drafter], prompt=prompt, max_new_tokens=48, k=k, temperature=0.0)
        expected = target_reference(result.prompt_token_ids, 48)
        assert result.token_ids == expected, f"{drafter} k={k} diverged from the target's greedy output"
        assert result.stats.rounds <= len(expected)
        assert result.stats.generated_tokens == len(expected)

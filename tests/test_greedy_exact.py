"""Greedy output through the real services equals the target's own generate(do_sample=False)."""

from __future__ import annotations

import pytest

from helpers import generate

PROMPTS = ["tell me a story about a cat", "what is 2 + 2? answer in one word"]


@pytest.mark.parametrize("drafter", ["model", "ngram", "local-ngram"])
@pytest.mark.parametrize("k", [1, 4, 8])
async def test_greedy_equals_target_generate(channels, target_greedy, drafter, k):
    for prompt in PROMPTS:
        result = await generate(channels[drafter], prompt=prompt, max_new_tokens=48, k=k, temperature=0.0)
        expected = target_greedy(result.prompt_token_ids, 48)
        assert result.token_ids == expected, f"{drafter} k={k} diverged from the target's greedy output"
        assert result.stats.rounds <= len(expected)
        assert result.stats.generated_tokens == len(expected)

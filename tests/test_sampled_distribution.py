"""Sampled output through the real services has the target's exact distribution.

Tiny models over an 8-token vocabulary; the draft model has other weights than the target,
so drafts are often rejected and the residual and bonus paths all run. The joint law of the
first two generated tokens is compared with the target's exact law, p(x1) p(x2 | x1), by a
chi-square test; the same test, run with a wrong acceptance rule, must reject.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
import pytest_asyncio

from conftest import start_stack
from helpers import generate
from specdec import models
from specdec.sampling import SamplingParams, Verdict, greedy_accept, sample, speculative_accept
from specdec.v1 import common_pb2
from stats import chi_square_pvalue, two_token_law
from tiny_models import build_tiny_model

CHARS = "abcd"  # + 4 special tokens = 8-token vocabulary
PROMPT = [4, 5, 6, 4, 5]  # "abcab": gives the n-gram drafter something to propose
PARAMS = SamplingParams(temperature=1.0, top_k=6, top_p=0.95)
SAMPLES = 800


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    target = build_tiny_model(root / "target", seed=10, chars=CHARS, logit_scale=3.0)
    draft = build_tiny_model(root / "draft", seed=11, chars=CHARS, logit_scale=3.0)
    return target, draft


@pytest_asyncio.fixture(scope="module")
async def small_stacks(redis_server, small_models):
    target, draft = small_models
    running = {
        "model": await start_stack(redis_server.url, target, str(draft)),
        "ngram": await start_stack(redis_server.url, target, "ngram"),
        "local-ngram": await start_stack(redis_server.url, target, "local-ngram"),
        "compiled model": await start_stack(redis_server.url, target, str(draft), compile="on"),
    }
    yield running
    for stack in running.values():
        for server in stack.servers:
            await server.stop(0)


@pytest.fixture(scope="module")
def exact_law(small_models):
    """{(x1, x2): p(x1) * p(x2 | x1)} under the target with PARAMS' processing."""
    model = models.load_model(str(small_models[0]))
    return two_token_law(model, PROMPT, PARAMS)


async def _sample_pairs(stack, samples: int, rule: int) -> Counter:
    counts: Counter = Counter()
    async with grpc.aio.insecure_channel(stack.coordinator) as channel:
        semaphore = asyncio.Semaphore(16)

        async def one(seed: int) -> None:
            async with semaphore:
                result = await generate(
                    channel, prompt_token_ids=PROMPT, max_new_tokens=2, k=3, seed=seed, ignore_eos=True,
                    temperature=PARAMS.temperature, top_k=PARAMS.top_k, top_p=PARAMS.top_p, sampling_rule=rule,
                )
            counts[tuple(result.token_ids)] += 1

        await asyncio.gather(*(one(seed) for seed in range(samples)))
    return counts


def _accept_everything(draft_tokens, draft_probs, target_probs, accept_u, sample_u):
    """A wrong rejection rule: keep every draft token (the output then follows the drafter)."""
    return Verdict(len(draft_tokens), sample(target_probs[len(draft_tokens)], sample_u[-1]))


def _match_everything(draft_tokens, target_tokens):
    """A wrong coupled rule: keep every draft token whether or not it is the target's draw."""
    return Verdict(len(draft_tokens), target_tokens[len(draft_tokens)])


RULES = {"rejection": common_pb2.SAMPLING_RULE_REJECTION, "coupled": common_pb2.SAMPLING_RULE_COUPLED}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("drafter", ["model", "ngram", "local-ngram", "compiled model"])
async def test_first_two_tokens_follow_the_target_law(small_stacks, exact_law, drafter, rule):
    counts = await _sample_pairs(small_stacks[drafter], SAMPLES, RULES[rule])
    assert sum(counts.values()) == SAMPLES
    p_value = chi_square_pvalue(counts, exact_law)
    assert p_value > 1e-3, f"{drafter}, {rule}: sampled pairs do not follow the target (p={p_value:.2e}): {counts}"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("drafter", ["model", "ngram"])
async def test_the_same_check_rejects_a_wrong_rule(small_stacks, exact_law, drafter, rule):
    decoder = small_stacks[drafter].decoder
    decoder.accept_rule, decoder.match_rule = _accept_everything, _match_everything
    try:
        counts = await _sample_pairs(small_stacks[drafter], 300, RULES[rule])
    finally:
        decoder.accept_rule, decoder.match_rule = speculative_accept, greedy_accept
    assert chi_square_pvalue(counts, exact_law) < 1e-4

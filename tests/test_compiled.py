"""The compiled runner (--compile on: torch.compile of the dense stages) answers as the eager one,
the reference: logits within floating-point tolerance, the same greedy tokens, and through the
services the target's own greedy output. (Its sampling law is checked in
test_sampled_distribution, its invariance in test_invariance.)"""

from __future__ import annotations

import grpc
import pytest
import torch

from conftest import start_stack
from helpers import generate
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.serving import StartupError
from specdec.service_base import should_compile
from specdec.config import parse_config
from target_service.config import TargetConfig


@pytest.fixture(scope="module")
def runners(tiny_target):
    model = models.load_model(str(tiny_target))
    return ModelRunner(model, model.config.vocab_size), ModelRunner(model, model.config.vocab_size, compile=True)


def _greedy(runner: ModelRunner, prompt: list[int], steps: int, k: int) -> list[int]:
    """Greedy decoding through the runner's verify path: k + 1 positions a pass, the last k
    of them rolled back (as rejected drafts are)."""
    entry, tokens = SessionCache(), list(prompt)
    for step in range(steps):
        filler = [tokens[-1]] * k  # stand-in drafts, always rolled back below
        logits = runner.forward([ForwardJob(entry, tokens + filler, len(tokens) - 1)])[0].logits
        tokens.append(int(logits[0].argmax()))
    return tokens[len(prompt):]


def test_compiled_logits_equal_eager_within_tolerance(runners):
    eager, compiled = runners
    assert compiled.compiled and compiled.warm_up(2) > 0
    generator = torch.Generator().manual_seed(3)
    for length in (1, 5, 17, 90):
        tokens = torch.randint(0, eager.vocab_size, (length,), generator=generator).tolist()
        expected = eager.forward([ForwardJob(SessionCache(), tokens, 0)])[0].logits
        got = compiled.forward([ForwardJob(SessionCache(), tokens, 0)])[0].logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [0, 3, 7])
def test_compiled_greedy_tokens_equal_eager(runners, k):
    eager, compiled = runners
    prompt = [5, 9, 12, 7, 5, 9]
    assert _greedy(compiled, prompt, 40, k) == _greedy(eager, prompt, 40, k)


def test_compile_setting_is_checked():
    assert should_compile("auto", "cuda:0") and not should_compile("auto", "cpu")
    assert should_compile("on", "cpu") and not should_compile("off", "cuda")
    with pytest.raises(StartupError, match="--compile"):
        should_compile("yes", "cpu")
    parse = lambda *argv: parse_config(TargetConfig, list(argv), "", "SPECDEC_TARGET_").compile  # noqa: E731
    assert (parse(), parse("--no-compile"), parse("--compile", "on")) == ("auto", "off", "on")


async def test_compiled_services_give_the_target_greedy_output(redis_server, tiny_target, tiny_draft):
    model = models.load_model(str(tiny_target))
    stack = await start_stack(redis_server.url, tiny_target, str(tiny_draft), compile="on")
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            for k in (2, 6):
                result = await generate(channel, prompt="tell me a story", max_new_tokens=40, k=k, temperature=0.0)
                with torch.inference_mode():
                    out = model.generate(torch.tensor([result.prompt_token_ids]), max_new_tokens=40, do_sample=False)
                assert result.token_ids == out[0, len(result.prompt_token_ids):].tolist()
    finally:
        for server in stack.servers:
            await server.stop(0)


def test_without_batch_invariance_single_token_steps_stay_within_tolerance(runners, tiny_target):
    """--batch-invariant false: one-token steps run unpadded; their logits equal the invariant
    runner's within tolerance and greedy decoding gives the same tokens."""
    eager, _ = runners
    model = models.load_model(str(tiny_target))
    loose = ModelRunner(model, model.config.vocab_size, invariant=False)
    prompt = [5, 9, 12, 7, 5, 9]
    for runner in (eager, loose):
        entry = SessionCache()
        runner.forward([ForwardJob(entry, prompt, len(prompt) - 1)])
        step = runner.forward([ForwardJob(entry, prompt + [3], len(prompt))])[0].logits
        if runner is eager:
            expected = step
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-5)
    assert _greedy(loose, prompt, 40, 0) == _greedy(eager, prompt, 40, 0)
    assert parse_config(TargetConfig, ["--no-batch-invariant"], "", "SPECDEC_TARGET_").batch_invariant is False

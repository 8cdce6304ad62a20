"""Batched forward passes equal unbatched ones; the batcher groups concurrent requests."""

from __future__ import annotations

import asyncio

import pytest
import torch

from draft_service.drafters import ModelDrafter, ProposeJob
from specdec import models
from specdec.batcher import Batcher
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams
from specdec.serving import ModelWorker


@pytest.fixture(scope="module")
def runner(tiny_target):
    model = models.load_model(str(tiny_target))
    return ModelRunner(model, vocab_size=model.config.vocab_size)


def _sequences(vocab: int) -> list[list[int]]:
    torch.manual_seed(1)
    return [torch.randint(0, vocab, (n,)).tolist() for n in (3, 60, 17, 1)]


def test_batched_forward_equals_one_session_at_a_time(runner):
    """Very different lengths, different draft lengths, then a rollback: same logits, same argmax."""
    seqs = _sequences(runner.vocab_size)
    alone = [SessionCache() for _ in seqs]
    together = [SessionCache() for _ in seqs]
    steps = [
        lambda s, i: s,  # prefill
        lambda s, i: s + [5, 6, 7, 8][: i + 1],  # verify 1..4 draft tokens
        lambda s, i: s[: len(s) - i] + [9],  # roll back i positions, extend by one
    ]
    for step in steps:
        seqs = [step(s, i) for i, s in enumerate(seqs)]
        firsts = [max(0, len(s) - 1 - i) for i, s in enumerate(seqs)]
        expected = [runner.forward([ForwardJob(e, s, f)])[0] for e, s, f in zip(alone, seqs, firsts)]
        got = runner.forward([ForwardJob(e, s, f) for e, s, f in zip(together, seqs, firsts)])
        for want, have in zip(expected, got):
            assert have.reused == want.reused
            assert torch.equal(have.logits, want.logits)  # bitwise: batching changes no rounding
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens and a.kv_len == b.kv_len


def test_batched_drafting_equals_drafting_alone(tiny_draft):
    model = models.load_model(str(tiny_draft))
    drafter = ModelDrafter(ModelRunner(model, vocab_size=model.config.vocab_size))
    seqs = _sequences(model.config.vocab_size)
    ks = [1, 4, 2, 3]
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=3)):
        alone = [drafter.propose(SessionCache(), s, k, params) for s, k in zip(seqs, ks)]
        together = drafter.propose_batch([ProposeJob(SessionCache(), s, k, params) for s, k in zip(seqs, ks)])
        for a, b, k in zip(alone, together, ks):
            assert a.tokens == b.tokens and len(b.tokens) == k
            if params.greedy:
                assert b.probs is None
            else:
                assert torch.equal(a.probs, b.probs)


def test_a_model_drafter_ends_its_chain_before_a_draft_below_min_confidence(tiny_draft):
    """Greedy: a draft's confidence is the product of the model's probabilities of the chain's
    choices so far; a floor ends the chain before the first draft under it (each session of a
    batch at its own), and the drafts it keeps are the uncut chain's."""
    model = models.load_model(str(tiny_draft))
    drafter = ModelDrafter(ModelRunner(model, vocab_size=model.config.vocab_size))
    seqs = _sequences(model.config.vocab_size)[:2]
    full = [drafter.propose_batch([ProposeJob(SessionCache(), s, 5, SamplingParams(), min_confidence=1e-30)])[0]
            for s in seqs]
    for proposal, s in zip(full, seqs):
        assert proposal.tokens == drafter.propose(SessionCache(), s, 5, SamplingParams()).tokens
        running, sequence = 1.0, list(s)  # the confidences, from the model's own probabilities
        for token, confidence in zip(proposal.tokens, proposal.confidences):
            probs = torch.softmax(model(torch.tensor([sequence])).logits[0, -1].detach().float(), -1)
            running *= float(probs[token])
            assert confidence == pytest.approx(running, rel=1e-3)
            sequence.append(token)
    floors = [(full[0].confidences[1] + full[0].confidences[2]) / 2, (full[1].confidences[3] + full[1].confidences[4]) / 2]
    cut = drafter.propose_batch([ProposeJob(SessionCache(), s, 5, SamplingParams(), min_confidence=f)
                                 for s, f in zip(seqs, floors)])
    assert [c.tokens for c in cut] == [full[0].tokens[:2], full[1].tokens[:4]]
    assert drafter.propose_batch([ProposeJob(SessionCache(), seqs[0], 5, SamplingParams(), min_confidence=1.0)])[0].tokens == []
    sampled = SamplingParams(temperature=1.0, seed=3)  # the rejection rule: no confidence, no cut
    assert len(drafter.propose_batch([ProposeJob(SessionCache(), seqs[0], 5, sampled, min_confidence=1.0)])[0].tokens) == 5


async def test_batcher_groups_concurrent_jobs_and_isolates_failures():
    batches: list[list[str]] = []

    def run(jobs):
        batches.append(list(jobs))
        return [ValueError(f"bad {j}") if j.startswith("bad") else j.upper() for j in jobs]

    batcher = Batcher(ModelWorker("test"), run, key=lambda j: j.split(":")[0], window_s=0.01, max_batch=3)
    jobs = ["a:1", "b:1", "bad:1", "a:2", "c:1"]
    results = await asyncio.gather(*(batcher.submit(j) for j in jobs), return_exceptions=True)
    assert [r.value if not isinstance(r, Exception) else str(r) for r in results] == [
        "A:1", "B:1", "bad bad:1", "A:2", "C:1"]
    assert batches[0] == ["a:1", "b:1", "bad:1"]  # at most 3, and session "a" only once
    assert sorted(batches[1]) == ["a:2", "c:1"]
    assert all(r.queue_s >= 0 and r.compute_s >= 0 for r in results if not isinstance(r, Exception))


async def test_a_session_that_stopped_asking_makes_no_one_wait_for_company():
    """The window is waited only while another session is active: one that asked every 20 ms and
    then went silent for 8 of its gaps no longer counts (it would for active_s, a whole second,
    under the rule before: every session following another paid the window on most rounds)."""
    window_s = 0.4
    batcher = Batcher(ModelWorker("test"), lambda jobs: list(jobs), key=lambda j: j.split(":")[0],
                      window_s=window_s, max_batch=4, active_s=5.0)
    for i in range(4):  # session a, a round every 20 ms
        await batcher.submit(f"a:{i}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.14)  # a is silent: 8 of its gaps
    alone = await batcher.submit("b:0")
    assert alone.queue_s < window_s / 2

    for i in range(3):  # a asks again, every 100 ms: active for 400 ms after its last request
        await batcher.submit(f"a:{i + 4}")
        await asyncio.sleep(0.1)
    accompanied = await batcher.submit("b:1")  # 100 ms after a's last: it waits for company
    assert accompanied.queue_s >= window_s * 0.9

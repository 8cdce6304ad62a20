"""Bitwise-equal numbers however a cache was built (specdec.runner): a position's logits and
keys/values are the same computed in one prefill, one token at a time, in chunks batched with
other sessions of other lengths, after a rollback, or restored from a snapshot plus a recomputed
tail. Seeded sampling after a failover depends on it."""

from __future__ import annotations

import random

import pytest
import torch

from specdec import models
from specdec.kv_cache import SessionCache
from specdec.kv_snapshot import decode_chunks, encode_chunk
from specdec.kv_cache import SessionKV
from specdec.runner import (ForwardJob, ModelRunner, by_row_pieces, onednn_linear, onednn_runs, product_rows,
                            reorder_for_onednn)

LENGTH = 150


@pytest.fixture(scope="module", params=["c", "onednn", "torch-attention", "f-linear", "compiled"])
def runner(tiny_target, request):
    """Every path keeps the invariance: eager products in C (the default on CPU), through oneDNN
    (the fallback without a C compiler) or F.linear, and the compiled one (torch.compile), which
    pads to other row counts; attention in C (the default on CPU) or in torch's blocks."""
    model = models.load_model(str(tiny_target))
    runner = ModelRunner(model, model.config.vocab_size, max_chunk=32, compile=request.param == "compiled",
                         c_products=request.param == "c", onednn=request.param in ("onednn", "torch-attention"),
                         c_attention=request.param != "torch-attention")
    expected = {"c": "c", "onednn": "onednn", "torch-attention": "onednn"}.get(request.param, "torch")
    assert runner.products == expected  # this machine has cc, and this CPU build has oneDNN
    assert (runner.c_attention is not None) == (request.param != "torch-attention")
    return runner


def _sequence(vocab: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


def _one_prefill(runner: ModelRunner, tokens: list[int]) -> tuple[torch.Tensor, SessionCache]:
    entry = SessionCache()
    return runner.forward([ForwardJob(entry, tokens, 0)])[0].logits, entry


def _assert_same_cache(a: SessionCache, b: SessionCache) -> None:
    assert a.kv_len == b.kv_len
    assert torch.equal(a.kv.span(0, a.kv_len), b.kv.span(0, b.kv_len))


def test_one_token_at_a_time_equals_one_prefill(runner):
    tokens = _sequence(runner.vocab_size, LENGTH, 0)
    whole, reference = _one_prefill(runner, tokens)
    entry = SessionCache()
    rows = [runner.forward([ForwardJob(entry, tokens[:n], n - 1)])[0].logits for n in range(1, LENGTH + 1)]
    assert torch.equal(torch.cat(rows), whole)
    _assert_same_cache(entry, reference)


def test_random_chunks_batched_with_other_sessions_equal_one_prefill(runner):
    rng = random.Random(7)
    tokens = _sequence(runner.vocab_size, LENGTH, 1)
    whole, reference = _one_prefill(runner, tokens)
    others = [(SessionCache(), _sequence(runner.vocab_size, n, 10 + n)) for n in (3, 64, 97, 200)]
    entry, rows, done = SessionCache(), [], 0
    while done < LENGTH:
        end = min(LENGTH, done + rng.choice([1, 2, 3, 5, 7, 13, 40]))
        company = rng.sample(others, rng.randint(0, len(others)))
        jobs = [ForwardJob(entry, tokens[:end], done)]
        for other, sequence in company:
            upto = min(len(sequence), other.kv_len + rng.randint(1, 9))
            jobs.append(ForwardJob(other, sequence[:upto], max(0, upto - rng.randint(1, 4))))
        rng.shuffle(jobs)
        results = runner.forward(jobs)
        rows.append(next(r.logits for j, r in zip(jobs, results) if j.entry is entry))
        done = end
    assert torch.equal(torch.cat(rows), whole)
    _assert_same_cache(entry, reference)


def test_rolled_back_drafts_leave_no_trace(runner):
    tokens = _sequence(runner.vocab_size, LENGTH, 2)
    whole, _ = _one_prefill(runner, tokens)
    entry = SessionCache()
    runner.forward([ForwardJob(entry, tokens[:100], 99)])
    runner.forward([ForwardJob(entry, tokens[:100] + [5, 6, 7, 8, 9], 99)])  # drafts, all rejected
    again = runner.forward([ForwardJob(entry, tokens, 100)])[0]
    assert again.reused == 100
    assert torch.equal(again.logits, whole[100:])


def test_a_snapshot_plus_a_recomputed_tail_equals_the_original(runner):
    tokens = _sequence(runner.vocab_size, LENGTH, 3)
    whole, original = _one_prefill(runner, tokens)
    chunks = [encode_chunk(original.kv, tokens, 0, 70), encode_chunk(original.kv, tokens, 70, 90)]
    restored_tokens, span = decode_chunks(chunks, runner.kv_shape)
    restored = SessionCache(tokens=restored_tokens, kv=SessionKV.from_span(runner.kv_shape, span))
    tail = runner.forward([ForwardJob(restored, tokens, 90)])[0]
    assert tail.reused == 90
    assert torch.equal(tail.logits, whole[90:])
    _assert_same_cache(restored, original)


def test_the_runner_computes_what_hugging_face_computes(runner, tiny_target):
    model = models.load_model(str(tiny_target))
    tokens = _sequence(runner.vocab_size, 60, 4)
    with torch.inference_mode():
        expected = model(torch.tensor([tokens])).logits[0].float()
    ours, _ = _one_prefill(runner, tokens)
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.smollm2
def test_smollm2_logits_do_not_depend_on_chunking_or_company():
    model = models.load_model("smollm2")
    runner = ModelRunner(model, len(models.load_tokenizer("smollm2")))
    tokens = _sequence(runner.vocab_size, 300, 5)
    whole, reference = _one_prefill(runner, tokens)
    entry, other = SessionCache(), SessionCache()
    runner.forward([ForwardJob(entry, tokens[:257], 256), ForwardJob(other, tokens[::-1][:40], 39)])
    rows = [whole[:256]]
    for n in range(258, 301, 6):
        rows.append(runner.forward([ForwardJob(entry, tokens[:n], len(torch.cat(rows))),
                                    ForwardJob(other, tokens[::-1][: 40 + n % 7], 39)])[0].logits)
    assert torch.equal(torch.cat(rows), whole)
    _assert_same_cache(entry, reference)


@pytest.mark.parametrize("context, cached", [(70, True), (62, True), (60, False)],
                         ids=["cached", "across-a-block", "prefilled-in-chunks"])
def test_a_tree_of_drafts_scores_each_draft_as_the_chain_of_its_ancestors(runner, context, cached):
    """Tree attention (specdec.runner): every node's logits are bitwise those of the chain of its
    ancestors, whether the tree follows a cached context, crosses an attention block, or comes
    in the same pass as a prefill split into chunks; the cache afterwards holds what a chain of
    the tree's leading nodes computes, bitwise."""
    prefix = _sequence(runner.vocab_size, context, 3)
    nodes = [5, 6, 7, 8, 9, 10, 11, 12]
    parents = [-1, 0, 1, -1, 3, 0, 5, 2]  # leading chain: nodes 0, 1, 2
    entry = SessionCache()
    if cached:
        runner.forward([ForwardJob(entry, prefix[:-1], 0)])
    tree = runner.forward([ForwardJob(entry, prefix + nodes, len(prefix) - 1, tree=parents)])[0].logits
    assert tree.shape[0] == len(nodes) + 1
    for i in range(len(nodes)):
        path, node = [], i
        while node >= 0:
            path.insert(0, node)
            node = parents[node]
        chain, _ = _one_prefill(runner, prefix + [nodes[j] for j in path])
        assert torch.equal(tree[i + 1], chain[-1]), (i, path)
        assert torch.equal(tree[0], chain[len(prefix) - 1])
    _, reference = _one_prefill(runner, prefix + nodes[:3])
    assert entry.tokens == prefix + nodes[:3]
    _assert_same_cache(entry, reference)


@pytest.mark.parametrize("path", [[0, 5, 6], [3, 4], [0, 1]], ids=["leaves-the-chain", "off-at-the-root", "on-it"])
def test_after_a_tree_the_cache_keeps_the_path_the_round_kept(runner, path):
    """ModelRunner.keep_path: the cache then holds the tokens before the tree and the kept path,
    keys, values and features bitwise what a chain of them computes, so the next Verify reuses
    all of it; the features the pass returned are not moved."""
    prefix, layers = _sequence(runner.vocab_size, 70, 3), (1, 2)
    nodes, parents = [5, 6, 7, 8, 9, 10, 11, 12], [-1, 0, 1, -1, 3, 0, 5, 2]  # leading chain: 0, 1, 2
    entry = SessionCache()
    runner.forward([ForwardJob(entry, prefix[:-1], 0, layers, 0)])
    job = ForwardJob(entry, prefix + nodes, len(prefix) - 1, layers, len(prefix) - 1, tree=parents)
    returned = runner.forward([job])[0].features
    sent = returned.clone()
    runner.keep_path(job, path)
    assert torch.equal(returned, sent)
    kept = prefix + [nodes[i] for i in path]
    reference = SessionCache()
    runner.forward([ForwardJob(reference, kept, 0, layers, 0)])
    assert entry.tokens == kept
    _assert_same_cache(entry, reference)
    assert torch.equal(entry.features.read(len(prefix), len(kept)), reference.features.read(len(prefix), len(kept)))
    after = runner.forward([ForwardJob(entry, kept + [13], len(kept), layers, len(kept))])[0]
    assert after.reused == len(kept)
    assert torch.equal(after.logits, runner.forward([ForwardJob(reference, kept + [13], len(kept))])[0].logits)


def test_onednn_products_match_f_linear_and_keep_rows_alike():
    """onednn_linear (the weight reordered once) computes x @ w.T + b as F.linear does, to the
    last bits or nearly, and product_rows finds its span like any product's."""
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    x = torch.randn(40, 64, generator=generator)
    packed = reorder_for_onednn(weight)
    assert torch.allclose(onednn_linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias), atol=1e-5)
    span = product_rows([packed], limit=64, product=onednn_linear)
    assert span % 4 == 0 and 4 <= span <= 64
    assert torch.equal(onednn_linear(x[:span], packed)[:4], onednn_linear(x[:4], packed))
    # Float32 CPU weights only: another dtype keeps F.linear.
    assert onednn_runs([weight]) and not onednn_runs([weight, weight.double()])


def test_products_run_in_pieces_the_blas_treats_alike():
    """product_rows finds the span of row counts whose products give each row the same bits, and
    a stage run in pieces of it returns what each piece computes, joined in order."""
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    span = product_rows([weight], limit=64)
    assert span % 4 == 0 and 4 <= span <= 64
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    pieces = torch.cat([torch.nn.functional.linear(x[i : i + span], weight) for i in range(0, 40, span)])
    stage = by_row_pieces(lambda rows, w, scale: (torch.nn.functional.linear(rows, w) * scale, rows), span, (0, 2))
    out, rows = stage(x, weight, torch.full((40, 1), 2.0))
    assert torch.equal(out, pieces * 2.0) and torch.equal(rows, x)

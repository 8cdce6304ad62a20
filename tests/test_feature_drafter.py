"""The feature drafter (EAGLE-3): `specdec train-draft` end to end on a tiny target, the drafter
through the real services (greedy equals the target's own output, the sampling law holds with
both rules), features relayed from Verify to Propose, and a draft replica that loses a session's
features getting them back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch

from conftest import REPO, TIER_METADATA, TIER_TOKEN, start_stack
from helpers import generate
from specdec import models
from specdec.eagle import DrafterConfig, EagleDrafter, ttt_mask
from specdec.prefix import CommittedTokens
from specdec.sampling import SamplingParams
from specdec.train_draft import LANGUAGES, Conversation, TrainOptions, load_conversations, split_heldout, train
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc
from specdec.wire import context_to_pb
from stats import chi_square_pvalue, two_token_law
from tiny_models import build_tiny_model


def _train(target: Path, out: Path, **overrides) -> dict:
    settings = dict(target=str(target), out=out, minutes=0.15, conversations=24, batch_conversations=12,
                    answer_tokens=40, draft_vocab=24, batch_tokens=2048, checkpoint_s=2.0, progress=False,
                    grounded=0.0, follow_ups=0.0)
    return train(TrainOptions(**{**settings, **overrides}), log=lambda line: None)


@pytest.fixture(scope="session")
def feature_drafter(tiny_target, tmp_path_factory) -> Path:
    """A drafter bounded by steps, not time, so its weights are the same on a fast machine and a
    slow one (a time-bounded head differs with the machine's speed, and the float16 test below
    would then meet near-tied candidates on some machines and not on others)."""
    out = tmp_path_factory.mktemp("drafter") / "tiny-eagle3"
    training = _train(tiny_target, out, minutes=5.0, max_steps=120)
    assert training["steps"] == 120
    return out


def test_train_draft_end_to_end_writes_a_drafter_with_its_card(tiny_target, tmp_path):
    out = tmp_path / "drafter"
    done = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "train-draft", "--target", str(tiny_target), "--out", str(out),
         "--minutes", "0.1", "--conversations", "24", "--batch-conversations", "4", "--answer-tokens", "24",
         "--draft-vocab", "20", "--batch-tokens", "1024", "--grounded", "1", "--follow-ups", "1", "--translations", "1",
         "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    config = DrafterConfig.load(out)
    assert config.draft_vocab_size == 20 and config.feature_layers and config.specdec_drafter == "eagle3"
    heldout = config.training["heldout"]
    assert len(heldout["acceptance_by_position"]) == 5 and heldout["starts"] > 0
    assert config.training["steps"] > 0 and config.training["conversations"] == 24
    # Every kind of conversation was written (the grounded ones here translations, then back into
    # English), and the card gives the held-out figure of each.
    assert set(config.training["kinds"]) == {"instruction", "grounded", "follow-up", "translation"}
    tokenizer = models.load_tokenizer(str(tiny_target))
    conversations, _ = load_conversations(out / "data.pt")
    prompts = {kind: [tokenizer.decode(c.prompt) for c in conversations if c.kind == kind]
               for kind in ("grounded", "translation")}
    # (The tiny tokenizer has no capitals: they come back as <unk>.)
    assert all(any(f"text into <unk>{language[1:]}:" in text for language in LANGUAGES) for text in prompts["grounded"])
    assert all("text into <unk>nglish:" in text for text in prompts["translation"])
    card = (out / "README.md").read_text()
    assert "held-out acceptance by position" in card and "cpu" in card
    assert set(heldout["by_kind"]) <= set(config.training["kinds"]) and heldout["by_kind"]
    head = EagleDrafter.load(out)
    assert len(set(head.d2t.tolist())) == 20  # draft ids map to distinct target ids
    # Resumable: a longer budget goes on from the checkpoint and the saved data.
    resumed = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "train-draft", "--target", str(tiny_target), "--out", str(out),
         "--minutes", "0.2", "--draft-vocab", "20", "--batch-tokens", "1024", "--resume", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step" in resumed.stderr
    assert DrafterConfig.load(out).training["steps"] > config.training["steps"]


def test_train_draft_fine_tunes_a_drafter_it_is_given(tiny_target, feature_drafter, tmp_path):
    """--init: the given drafter's weights and draft vocabulary are the start, and training moves them."""
    training = _train(tiny_target, tmp_path / "tuned", init=str(feature_drafter), minutes=0.05)
    assert training["initialised_from"] == str(feature_drafter) and training["steps"] > 0
    before, after = EagleDrafter.load(feature_drafter), EagleDrafter.load(tmp_path / "tuned")
    assert torch.equal(before.d2t, after.d2t)
    assert not torch.equal(before.fc.weight, after.fc.weight)  # moved, and the folder given left as it was
    assert "initialised from" in (tmp_path / "tuned" / "README.md").read_text()
    with pytest.raises(ValueError, match="fuses layers"):
        _train(tiny_target, tmp_path / "other", init=str(feature_drafter), feature_layers=(1,), minutes=0.01)


def test_a_step_bounded_run_depends_on_the_seed_not_on_the_time_it_is_given(tiny_target, feature_drafter, tmp_path):
    data = str(feature_drafter / "data.pt")
    runs = [_train(tiny_target, tmp_path / name, data=data, max_steps=6, minutes=minutes)
            for name, minutes in (("roomy", 5.0), ("tight", 1.0))]
    assert [run["steps"] for run in runs] == [6, 6]
    roomy, tight = EagleDrafter.load(tmp_path / "roomy"), EagleDrafter.load(tmp_path / "tight")
    assert all(torch.equal(a, b) for a, b in zip(roomy.state_dict().values(), tight.state_dict().values()))
    other_seed = _train(tiny_target, tmp_path / "seed1", data=data, max_steps=6, minutes=5.0, seed=1)
    assert other_seed["steps"] == 6
    assert not torch.equal(EagleDrafter.load(tmp_path / "seed1").fc.weight, roomy.fc.weight)


def test_the_training_mask_sees_what_drafting_holds():
    mask = ttt_mask(5, 3, "cpu")
    # Step 3 at position 4 started drafting at position 2: target-feature keys 0..2, then its own
    # step-2 key at 3 and step-3 key at 4.
    assert mask[4].tolist() == [True, True, True, False, False] + [False] * 3 + [True, False] + [False] * 4 + [True]
    assert mask[0, :5].sum() == 0 and mask[0, 10] and mask[0].sum() == 1  # nothing before position 0


@pytest_asyncio.fixture(scope="module")
async def feature_stack(redis_server, tiny_target, feature_drafter):
    """Chains of drafts (--tree-nodes 0), two draft replicas."""
    stack = await start_stack(redis_server.url, tiny_target, str(feature_drafter), draft_replicas=2, tree_nodes=0)
    yield stack
    for server in stack.servers:
        await server.stop(0)


@pytest_asyncio.fixture(scope="module")
async def tree_stack(redis_server, tiny_target, feature_drafter):
    """The feature drafter asked for trees of 10 drafts (EAGLE-2) each round."""
    stack = await start_stack(redis_server.url, tiny_target, str(feature_drafter), tree_nodes=10)
    yield stack
    for server in stack.servers:
        await server.stop(0)


@pytest.mark.parametrize("k", [1, 4, 8])
async def test_greedy_with_the_feature_drafter_equals_the_targets_generate(feature_stack, target_greedy, k):
    async with grpc.aio.insecure_channel(feature_stack.coordinator) as channel:
        result = await generate(channel, prompt="hello there, how are you doing?", max_new_tokens=48, k=k,
                                fixed_k=True, ignore_eos=True)
    assert result.stats.drafter == "eagle3"
    assert result.token_ids == target_greedy(result.prompt_token_ids, 48)
    assert result.stats.draft_tokens > 0 and result.stats.accepted_tokens > 0


@pytest.mark.parametrize("k", [1, 4, 8])
async def test_greedy_with_trees_of_drafts_equals_the_targets_generate(tree_stack, target_greedy, k):
    # A prompt that repeats itself: the default hybrid grafts the trees on prompt lookup's copy.
    async with grpc.aio.insecure_channel(tree_stack.coordinator) as channel:
        result = await generate(channel, prompt="hello there, how are you? hello there, how are", max_new_tokens=48,
                                k=k, fixed_k=True, ignore_eos=True)
    assert result.token_ids == target_greedy(result.prompt_token_ids, 48)
    stats = result.stats
    # Trees: more drafts than positions drafted (a chain has one per position), and some kept.
    assert stats.draft_tokens > sum(stats.proposed_per_position) and stats.accepted_tokens > 0


def test_a_tree_takes_prompt_lookups_continuation_as_its_leading_branch(tiny_target, feature_drafter):
    """With --hybrid-ngram the head's tree is grafted on the copied continuation: the copy is the
    leading chain, the head's other guesses fill the rest of the budget; a chain is replaced by it."""
    from draft_service.drafters import ProposeJob
    from draft_service.feature_drafter import FeatureDrafter
    from specdec.kv_cache import SessionCache
    from specdec.ngram import ngram_lookup
    from specdec.sampling import tree_depths

    committed = [4, 5, 6, 7, 8, 9, 4, 5, 6]  # "4 5 6" came before: prompt lookup copies "7 8 9 4"
    config = DrafterConfig.load(feature_drafter)
    features = torch.randn(len(committed) - 1, len(config.feature_layers) * config.hidden_size)
    copied = ngram_lookup(committed, 4, max_ngram=8, min_ngram=2)
    assert copied == [7, 8, 9, 4]
    head_only = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), hybrid_ngram=0)
    hybrid = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), hybrid_ngram=2)
    job = lambda nodes: ProposeJob(SessionCache(), committed, 4, SamplingParams(), features, 0, (), nodes)  # noqa: E731
    tree = head_only.propose_batch([job(7)])[0]
    grafted = hybrid.propose_batch([job(7)])[0]
    assert grafted.tokens[:4] == copied and grafted.parents[:4] == [-1, 0, 1, 2]
    assert len(grafted.tokens) == 7 and max(tree_depths(grafted.parents)) <= 4
    # Every node is the copy's or one of the head's own (same token under the same path).
    def paths(tokens: list[int], parents: list[int]) -> set[tuple[int, ...]]:
        return {tuple(tokens[j] for j in _path(parents, i)) for i in range(len(tokens))}

    copy_paths = {tuple(copied[:depth]) for depth in range(1, 5)}
    assert paths(grafted.tokens, grafted.parents) <= paths(tree.tokens, tree.parents) | copy_paths
    assert not grafted.point_mass and grafted.probs is None
    chain = hybrid.propose_batch([job(0)])[0]
    assert chain.tokens == copied and chain.parents is None and chain.point_mass


def test_trees_of_several_sessions_are_drafted_together_as_each_alone(tiny_target, feature_drafter):
    """Batched across sessions: one Propose batch of trees runs the head once per depth for all the
    sessions still growing (greedy and coupled, different k and tree sizes), and each tree is the
    one its session gets alone."""
    from draft_service.drafters import ProposeJob
    from draft_service.feature_drafter import FeatureDrafter
    from specdec.kv_cache import SessionCache
    from specdec.sampling import COUPLED, tree_depths

    config = DrafterConfig.load(feature_drafter)
    drafter = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), hybrid_ngram=0,
                                  matmul_dtype="float32")
    sessions = [([4, 9, 12, 3, 7, 15], 4, 7, SamplingParams()), ([5, 6, 7, 8, 2, 11, 19, 1, 3], 3, 6, SamplingParams()),
                ([8, 1, 14, 2], 4, 10, SamplingParams(0.8, seed=5, rule=COUPLED))]

    def jobs():
        return [ProposeJob(SessionCache(), committed, k, params,
                           torch.randn(len(committed) - 1, len(config.feature_layers) * config.hidden_size,
                                       generator=torch.Generator().manual_seed(len(committed))), 0, (), nodes)
                for committed, k, nodes, params in sessions]

    alone = [drafter.propose_batch([job])[0] for job in jobs()]
    calls = []
    qkv = drafter.head.qkv
    drafter.head.qkv = lambda *args: calls.append(args[0].shape[0]) or qkv(*args)
    together = drafter.propose_batch(jobs())
    for one, batched in zip(alone, together):
        assert (batched.tokens, batched.parents) == (one.tokens, one.parents)
        assert len(batched.tokens) > max(tree_depths(batched.parents))  # a tree, not a chain
    # One pass over every session's committed positions, then one per depth over the trees still
    # growing (a node expanded each; the k = 3 tree stops a depth sooner).
    assert calls == [sum(len(committed) for committed, _, _, _ in sessions), 3, 3, 2]


@pytest.mark.parametrize("coupled", [False, True])
def test_the_drafter_leaves_out_drafts_below_min_confidence(tiny_target, feature_drafter, coupled):
    """A draft's confidence is its path's product of the head's probabilities (coupled: under the
    target's noise), so a node's is at most its parent's, and a chain's first is the tree's
    first. A floor leaves out exactly the drafts under it: of a tree, the nodes under it (the rest
    are the uncut tree's, on the same paths), of a chain, the drafts from the first under it; and
    what it leaves out is not drafted on from (a floor above every draft runs no drafting step)."""
    from draft_service.drafters import ProposeJob
    from draft_service.feature_drafter import FeatureDrafter
    from specdec.kv_cache import SessionCache
    from specdec.sampling import COUPLED

    config = DrafterConfig.load(feature_drafter)
    drafter = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), hybrid_ngram=0,
                                  matmul_dtype="float32")
    params = SamplingParams(0.8, seed=5, rule=COUPLED) if coupled else SamplingParams()
    committed = list(range(3, 40))
    features = torch.randn(len(committed) - 1, len(config.feature_layers) * config.hidden_size,
                           generator=torch.Generator().manual_seed(1))

    def propose(nodes: int, floor: float):
        return drafter.propose_batch([ProposeJob(SessionCache(), committed, 4, params, features, 0, (), nodes,
                                                 floor)])[0]

    def paths(proposal, nodes) -> set[tuple[int, ...]]:
        return {tuple(proposal.tokens[j] for j in _path(proposal.parents, i)) for i in nodes}

    tree = propose(7, 0.0)
    confidences = tree.confidences
    assert len(confidences) == len(tree.tokens) == 7 and all(0 < c < 1 for c in confidences)
    assert all(c <= confidences[p] for c, p in zip(confidences, tree.parents) if p >= 0)
    floor = sorted(confidences)[3]  # the 4 likeliest nodes stay
    cut = propose(7, floor)
    assert len(cut.tokens) == 4 and all(c >= floor for c in cut.confidences)
    assert paths(cut, range(4)) == paths(tree, [i for i, c in enumerate(confidences) if c >= floor])
    chain = propose(0, 1e-30)  # a floor under every draft: the whole chain, with its confidences
    assert chain.tokens == propose(0, 0.0).tokens and chain.parents is None
    assert chain.tokens[0] == tree.tokens[0] and chain.confidences[0] == pytest.approx(confidences[0], rel=1e-5)
    assert all(b < a for a, b in zip(chain.confidences, chain.confidences[1:]))
    assert propose(0, (chain.confidences[1] + chain.confidences[2]) / 2).tokens == chain.tokens[:2]
    calls = []
    qkv = drafter.head.qkv
    drafter.head.qkv = lambda *args: calls.append(args[0].shape[0]) or qkv(*args)
    for nodes in (7, 0):
        calls.clear()
        assert propose(nodes, 1.0).tokens == [] and calls == [len(committed)]  # the committed positions only


async def test_the_drafters_confidences_reach_the_coordinator_and_change_no_token(tree_stack, target_greedy):
    """The draft service answers each draft's confidence (ProposeResponse.confidences; a tree's
    come with its nodes, the head's below 1, prompt lookup's copies 1.0) and the coordinator counts
    how often the head's drafts of each confidence were kept, the floor's calibration; the answer
    is the target's own."""
    calibration = lambda: sum(tree_stack.decoder.costs.calibration("greedy").drafted)  # noqa: E731
    before = calibration()
    async with grpc.aio.insecure_channel(tree_stack.coordinator) as channel:
        result = await generate(channel, prompt="the cat sat on the mat and then", max_new_tokens=48, k=4,
                                fixed_k=True, ignore_eos=True)
    assert result.token_ids == target_greedy(result.prompt_token_ids, 48)
    assert result.stats.draft_tokens > 0 and calibration() > before


async def test_drafts_left_out_under_a_floor_change_no_token_and_count_as_the_plan_they_were(
        redis_server, tiny_target, feature_drafter, target_greedy):
    """--min-draft-confidence 1.0 (and no prompt lookup): the drafter leaves out every draft, so
    rounds planned 2 or more deep verify none (only the probes' one draft, asked without a floor,
    goes); the answer is still the target's greedy one."""
    stack = await start_stack(redis_server.url, tiny_target, str(feature_drafter), tree_nodes=0,
                              draft_overrides={"hybrid_ngram": 0}, min_draft_confidence="1.0")
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            result = await generate(channel, prompt="hello there, how are you doing?", max_new_tokens=96, k=4,
                                    ignore_eos=True)
    finally:
        for server in stack.servers:
            await server.stop(0)
    assert result.token_ids == target_greedy(result.prompt_token_ids, 96)
    ks = list(result.stats.k_per_round)
    assert max(ks[1:]) >= 2 and result.stats.draft_tokens <= ks.count(1)  # (uncut: 2 or more a round)


def test_float16_products_hold_the_shipped_weights_and_draft_as_float32_does(tiny_target, feature_drafter):
    from safetensors.torch import load_file

    from draft_service.feature_drafter import FeatureDrafter
    from specdec.eagle import CastLinear

    shipped = load_file(str(feature_drafter / "model.safetensors"))
    exact = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), matmul_dtype="float32",
                                cpu_kernels="torch")
    half = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), matmul_dtype="float16")  # in C here
    assert isinstance(half.head.lm_head, CastLinear) and isinstance(exact.head.lm_head, torch.nn.Linear)
    assert torch.equal(half.head.lm_head.weight, shipped["lm_head.weight"])  # the stored weights, bit for bit
    h = torch.randn(5, half.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        close, reference = half.head.logits(h), exact.head.logits(h)
    assert close.dtype == torch.float32 and torch.allclose(close, reference, atol=1e-2, rtol=1e-2)
    assert torch.equal(close.argmax(-1), reference.argmax(-1))
    assert _drafts(half, feature_drafter) == _drafts(exact, feature_drafter)
    with pytest.raises(ValueError, match="float64"):
        FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), matmul_dtype="float64")


@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
def test_block_weights_draft_on_their_rounded_numbers_in_c_and_are_refused_without_it(
        tiny_target, feature_drafter, kind):
    """--matmul-dtype q8_0 / q4_1: every linear layer's weights rounded into that block format, the
    C product reading the blocks, and the head computing what float32 products on the rounded
    numbers compute; without the C product (--cpu-kernels torch) the setting is refused."""
    from draft_service.feature_drafter import FeatureDrafter
    from specdec import cpu_kernels, ggml_blocks
    from specdec.eagle import STACKED, CastLinear

    kernels = cpu_kernels.load()
    if kernels is None or not kernels.linear.half:
        pytest.skip("the C product does not read blocks on this CPU (neither AVX-512 nor F16C)")
    rounded = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), matmul_dtype=kind)
    reference = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), matmul_dtype="float32",
                                    cpu_kernels="torch")
    layers = [name for name, child in rounded.head.named_children() if isinstance(child, CastLinear)]
    assert len(layers) == 6 and not any(isinstance(child, torch.nn.Linear) for child in rounded.head.children())
    for name in layers:
        layer, plain = getattr(rounded.head, name), [getattr(reference.head, part) for part in STACKED.get(name, (name,))]
        assert layer.packed.blocks == kind
        expected = [ggml_blocks.quantized(linear.weight, kind).dequantized() for linear in plain]
        assert torch.equal(layer.weight, torch.cat(expected))  # (a stack's blocks are its parts')
        with torch.no_grad():
            for linear, rounded_weight in zip(plain, expected):
                linear.weight.copy_(rounded_weight)  # the reference now computes on the rounded numbers
    h = torch.randn(5, rounded.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(rounded.head.logits(h), reference.head.logits(h), rtol=1e-4, atol=1e-4)
    assert len(_drafts(rounded, feature_drafter)) == 7
    with pytest.raises(ValueError, match="only the C product"):
        FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), matmul_dtype=kind, cpu_kernels="torch")


def test_the_default_products_are_q8_0_where_the_c_product_reads_blocks_else_float16(tiny_target, feature_drafter):
    from draft_service.feature_drafter import FeatureDrafter, drafting_products

    resolved_matmul_dtype = lambda dtype, device, setting: drafting_products(setting, device, dtype)[0]  # noqa: E731
    from specdec import cpu_kernels

    kernels = cpu_kernels.load()
    reads_blocks = kernels is not None and kernels.linear.half
    assert resolved_matmul_dtype("auto", "cpu", "auto") == ("q8_0" if reads_blocks else "float16")
    assert resolved_matmul_dtype("auto", "cpu", "torch") == resolved_matmul_dtype("auto", "cuda", "auto") == "float16"
    assert resolved_matmul_dtype("float32", "cpu", "auto") == "float32"
    default = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target))
    packed = default.head.lm_head.packed
    assert (packed.blocks if packed is not None else None) == ("q8_0" if reads_blocks else None)
    on_torch = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), cpu_kernels="torch")
    assert on_torch.head.lm_head.weight.dtype == torch.float16 and on_torch.head.lm_head.packed is None


def test_chain_hits_counts_the_chains_whose_drafts_all_match_the_target(tiny_target, feature_drafter):
    """The held-out measure's tally against the definition, chain by chain: a chain starting at an
    answer position s counts at depth j when the drafts of steps 0..j (step i read at s + i) all
    equal the target's greedy tokens inside the answer."""
    from specdec.train_draft import TargetView, batch_tensors, chain_hits

    drafter = EagleDrafter.load(feature_drafter)
    view = TargetView(models.load_model(str(tiny_target)), tuple(drafter.config.feature_layers),
                      drafter.config.target_vocab_size)
    conversations, _ = load_conversations(feature_drafter / "data.pt")
    ids, attention, mask = batch_tensors(conversations[:6], 2048, "cpu")
    features, logits = view(ids, attention)
    embeddings, wanted, depth = view.embed(ids), logits.argmax(-1), 4
    with torch.no_grad():
        guesses = [drafter.d2t[o.argmax(-1)] for o in drafter.unrolled(embeddings, features, depth)]
    expected = torch.zeros((len(ids), depth), dtype=torch.long)
    for row, start in mask.nonzero().tolist():
        for j in range(depth):
            p = start + j
            if p >= ids.shape[1] or not (mask[row, p] and guesses[j][row, p] == wanted[row, p]):
                break
            expected[row, j] += 1
    assert expected[:, 1].sum() > 0  # chains longer than one draft occur, so the shift is checked
    assert torch.equal(chain_hits(drafter, embeddings, features, wanted, mask, depth), expected)


def test_first_draft_acceptance_finds_the_scale_that_makes_q_the_targets_law():
    """A head whose logits are half the target's is the target's law at half its temperature: there
    the rejection rule keeps every draft, and nowhere else; a head on part of the vocabulary keeps
    at most the target's mass on that part."""
    from bench.rules import first_draft_acceptance

    generator = torch.Generator().manual_seed(0)
    target_logits = 3 * torch.randn(300, 40, generator=generator)
    everything = torch.arange(40)
    kept = first_draft_acceptance(target_logits, 0.5 * target_logits, everything, (0.4, 1.0), (0.25, 0.5, 1.0))
    assert kept.shape == (2, 3, 300)
    assert torch.allclose(kept[:, 1], torch.ones(2, 300, dtype=torch.float64), atol=1e-5)
    assert (kept[:, [0, 2]].mean(-1) < 0.95).all()  # cooler or warmer q keeps fewer (0.90 at best here)
    part = torch.arange(10)
    on_part = first_draft_acceptance(target_logits, 0.5 * target_logits[:, part], part, (1.0,), (0.5,))
    mass = torch.softmax(target_logits, dim=-1)[:, part].sum(-1).double()
    assert torch.allclose(on_part[0, 0], mass, atol=1e-5)


def test_the_ablations_least_squares_fusion_recovers_an_affine_map_across_feature_scales():
    """The target's features span many orders of magnitude in variance; a map from the smallest of
    them must come back as exactly as one from the largest (a ridge on the raw sums would shrink it)."""
    from bench.feature_ablation import least_squares_fusion

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 12, generator=generator, dtype=torch.float64) * torch.logspace(-2, 4, 12, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    with_ones = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    fused = least_squares_fusion(with_ones.T @ with_ones, with_ones.T @ (x @ weight.T + bias))
    assert torch.allclose(fused.weight.double(), weight, rtol=1e-4, atol=1e-5)
    assert torch.allclose(fused.bias.double(), bias, rtol=1e-4, atol=1e-5)


def test_the_feature_ablation_refits_the_drafters_own_fusion_and_compares_layers(tiny_target, feature_drafter,
                                                                                 tmp_path):
    """bench.feature_ablation end to end on the tiny target: refitting the drafter's fusion from its
    own layers gives back its drafts (the fit's check), a variant reading no feature explains none
    of g, one reading one layer less than both, and every variant is fine-tuned and measured on
    the same batches and Spec-Bench answers."""
    out = tmp_path / "ablation"
    out.mkdir()
    shutil.copy(feature_drafter / "data.pt", out / "data.pt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"category": c, "turns": [f"tell me about the {c}"]}) + "\n"
                               for c in ("sea", "sky", "hills")))
    done = subprocess.run(
        [sys.executable, "-m", "bench.feature_ablation", "--target", str(tiny_target), "--drafter",
         str(feature_drafter), "--out", str(out), "--variants", "none:;one:1", "--steps", "2", "--limit", "1",
         "--max-new-tokens", "8", "--batch-tokens", "1024", "--fit-conversations", "20", "--max-length", "320",
         "--prompts", str(prompts)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    fit = results["fit_r2"]
    assert fit["fused"] > 0.9999 and abs(fit["none"]) < 1e-6 and 0 < fit["one"] < fit["fused"]
    shipped = results["shipped"]["heldout"]["shipped"]
    refit = results["after_fit"]["heldout"]["fused"]
    assert refit["starts"] == shipped["starts"] > 0
    assert refit["acceptance_by_position"] == pytest.approx(shipped["acceptance_by_position"], abs=0.03)
    assert all(len(losses) == 2 for losses in results["losses"].values())
    tuned = results["after_fine_tuning"]["specbench"]
    assert set(tuned) == {"fused", "none", "one"} and set(tuned["fused"]["by_group"]) == {"sea", "sky", "hills"}


def test_the_rules_bench_measures_the_q_the_draft_service_sends(tiny_target, feature_drafter, tmp_path):
    """bench.rules compares the two sampling rules on a feature drafter's first drafts: its q must
    be the draft service's (the rejection rule's q over the draft vocabulary, zero elsewhere, at the
    request's temperature times the drafter's temperature_scale)."""
    from bench.rules import draft_distributions
    from draft_service.drafters import ProposeJob
    from draft_service.feature_drafter import FeatureDrafter
    from specdec.kv_cache import SessionCache
    from specdec.runner import ForwardJob, ModelRunner

    cooler = tmp_path / "cooler"
    shutil.copytree(feature_drafter, cooler, ignore=shutil.ignore_patterns("*.pt"))
    config = json.loads((cooler / "config.json").read_text())
    (cooler / "config.json").write_text(json.dumps({**config, "temperature_scale": 0.5}))
    target = models.load_model(str(tiny_target))
    vocab = target.config.vocab_size
    params = SamplingParams(temperature=0.7)
    sequence = list(range(3, 30))
    with torch.inference_mode():
        q_of = draft_distributions(target, str(cooler), vocab)
        q_all, q_plain = q_of(torch.tensor([sequence]), params), q_of(torch.tensor([sequence]), params, 1.0)
    assert not torch.allclose(q_all, q_plain, atol=1e-3)  # the scale shapes q
    drafter = FeatureDrafter.load(str(cooler), target=str(tiny_target), matmul_dtype="float32", hybrid_ngram=0)
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[drafter.d2t] = False
    assert torch.allclose(q_all.sum(-1), torch.ones(len(sequence))) and not q_all[:, outside].any()
    features = ModelRunner(target, vocab).forward(
        [ForwardJob(SessionCache(), sequence, len(sequence) - 1, drafter.feature_layers, 0)])[0].features
    for position in (5, 17, len(sequence) - 1):  # q of the token at `position`, drafted after the ones before
        job = ProposeJob(SessionCache(), sequence[:position], 1, params, features[: position - 1], 0, (), 0)
        sent = drafter.propose_batch([job])[0].probs[0]
        assert torch.allclose(q_all[position - 1], sent, atol=1e-4), position


def test_temperature_calibration_reads_every_answer_position_and_picks_the_best_mean(tiny_target, feature_drafter):
    from bench.rules import temperature_calibration
    from specdec.train_draft import TargetView, batch_tensors

    drafter = EagleDrafter.load(feature_drafter)
    view = TargetView(models.load_model(str(tiny_target)), tuple(drafter.config.feature_layers),
                      drafter.config.target_vocab_size)
    conversations = load_conversations(feature_drafter / "data.pt")[0][:10]
    result = temperature_calibration(drafter, view, conversations, TrainOptions(), (0.5, 1.0), (0.5, 0.75, 1.0))
    assert result["positions"] == int(batch_tensors(conversations, 2048, "cpu")[2].sum()) > 0
    means = {s: (result["acceptance"]["0.5"][s] + result["acceptance"]["1.0"][s]) / 2 for s in ("0.5", "0.75", "1.0")}
    assert result["chosen"] == float(max(means, key=means.get))
    assert all(0 < a <= 1 for by_scale in result["acceptance"].values() for a in by_scale.values())


def test_a_float16_product_of_many_rows_runs_in_float32_on_the_same_weights():
    """Few rows read the float16 weights; from WIDE_ROWS rows on (a prompt taken in) the product
    is float32's, on a float32 copy of those same weights."""
    from specdec.eagle import WIDE_ROWS, CastLinear

    generator = torch.Generator().manual_seed(3)
    layer = CastLinear(torch.nn.Linear(64, 96, bias=False), torch.float16)
    assert torch.equal(layer.wide_weight, layer.weight.float())
    for rows in (1, WIDE_ROWS - 1, WIDE_ROWS, 40):
        x = torch.randn(rows, 64, generator=generator)
        exact = torch.nn.functional.linear(x, layer.weight.float())
        if rows >= WIDE_ROWS:
            assert torch.equal(layer(x), exact)
        else:  # a float16 product, rounded to float16
            assert torch.equal(layer(x), layer(x).half().float()) and not torch.equal(layer(x), exact)


def test_the_drafters_narrow_products_run_in_c_on_its_float16_weights_and_wide_ones_in_float32():
    """Given the C product, a CastLinear's calls of fewer than C_WIDE_ROWS rows are the C kernel's
    on the same float16 weights (the input kept float32), wider ones float32's on their copy."""
    from specdec import cpu_kernels
    from specdec.eagle import C_WIDE_ROWS, CastLinear

    kernels = cpu_kernels.load()
    if kernels is None or not kernels.linear.half:
        pytest.skip("no C product on float16 weights here")
    generator = torch.Generator().manual_seed(4)
    layer = CastLinear(torch.nn.Linear(64, 96, bias=False), torch.float16, kernels.linear)
    torch_layer = CastLinear(torch.nn.Linear(64, 96, bias=False), torch.float16)
    torch_layer.load_state_dict(layer.state_dict())
    for rows in (1, 7, C_WIDE_ROWS - 1, C_WIDE_ROWS, 80):
        x = torch.randn(2, rows, 64, generator=generator)  # leading dimensions kept
        out = layer(x)
        assert out.shape == (2, rows, 96) and out.dtype == torch.float32
        if 2 * rows >= C_WIDE_ROWS:
            assert torch.equal(out, torch.nn.functional.linear(x, layer.weight.float()))
        else:
            packed = cpu_kernels.PackedWeight.of(layer.weight.float())
            assert torch.equal(out, kernels.linear(x.reshape(-1, 64), packed).view(2, rows, 96))
            assert not torch.equal(out, torch_layer(x))  # torch's product rounds its input to float16
    assert CastLinear(torch.nn.Linear(8, 8), torch.bfloat16, kernels.linear).packed is None  # not a C dtype
    exact = CastLinear(torch.nn.Linear(64, 96, bias=False), torch.float32, kernels.linear)  # float32 weights
    wide = torch.randn(C_WIDE_ROWS, 64, generator=generator)  # a prompt taken in: torch's product, in place
    assert exact.wide_weight is exact.weight and torch.equal(exact(wide), torch.nn.functional.linear(wide, exact.weight))


def test_the_drafters_kept_noise_is_the_targets_at_that_seed_and_position(tiny_target, feature_drafter):
    """The coupled rule's noise the drafter keeps per (seed, position) is coupling_noise's on the
    draft vocabulary, a second call the same, another seed or position another draw."""
    from draft_service.feature_drafter import NOISE_CACHE_POSITIONS, FeatureDrafter
    from specdec.sampling import coupling_noise

    drafter = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target))
    vocab, d2t = drafter.config.target_vocab_size, drafter.d2t_cpu
    for seed, position in ((1, 10), (2, 10), (1, 11), (1, 10)):
        assert torch.equal(drafter._draft_noise(seed, position), torch.from_numpy(coupling_noise(seed, position, vocab))[d2t])
    assert drafter._draft_noise.cache_info().hits == 1 and drafter._draft_noise.cache_info().currsize == 3
    assert drafter._draft_noise.cache_info().maxsize == NOISE_CACHE_POSITIONS


def test_the_heads_norms_and_rotary_in_c_compute_what_torchs_do(feature_drafter):
    """with_small_steps: a drafting call's norms and rotary embedding through the runner's C steps
    give torch's queries, keys and outputs (to float32 rounding); batched inputs (training's) keep
    torch's path."""
    from specdec import cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("no C compiler here")
    in_c = EagleDrafter.load(feature_drafter).with_small_steps(kernels.layer)
    in_torch = EagleDrafter.load(feature_drafter)
    hidden = in_c.config.hidden_size
    generator = torch.Generator().manual_seed(6)
    embeddings, previous = torch.randn(5, hidden, generator=generator), torch.randn(5, hidden, generator=generator)
    positions = torch.tensor([3, 4, 9, 40, 41])
    with torch.inference_mode():
        for ours, theirs in zip(in_c.qkv(embeddings, previous, positions), in_torch.qkv(embeddings, previous, positions)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(in_c.logits(previous), in_torch.logits(previous), rtol=1e-4, atol=1e-4)
        batched = in_c.qkv(embeddings[None], previous[None], positions[None])[0]
        assert torch.equal(batched, in_torch.qkv(embeddings[None], previous[None], positions[None])[0])


def test_drafting_stacks_qkv_and_gate_up_and_runs_the_layers_second_half_in_one_c_call(feature_drafter):
    """Drafting on a CPU: q|k|v and gate|up each one product on their stacked (rounded) weights,
    in place of the separate layers, which gives the separate products' numbers bit for bit, and the
    layer after its attention one C call (FusedLayer.mix) computing what torch's steps on the same
    products compute, for calls of few rows and of C_WIDE_ROWS (torch's products); a head without
    the C steps has no such call."""
    from specdec import cpu_kernels
    from specdec.eagle import C_WIDE_ROWS, STACKED, CastLinear

    kernels = cpu_kernels.load()
    if kernels is None or not kernels.linear.half:
        pytest.skip("the C product does not read blocks on this CPU (neither AVX-512 nor F16C)")
    trained = EagleDrafter.load(feature_drafter)
    head = EagleDrafter.load(feature_drafter).with_matmul_dtype("q8_0", kernels.linear).with_small_steps(kernels.layer)
    assert not any(hasattr(head, part) for parts in STACKED.values() for part in parts)
    assert head.layer_in_c is not None and head.qkv_proj.packed.blocks == "q8_0"
    c = head.config
    generator = torch.Generator().manual_seed(3)
    embeddings, previous = torch.randn(5, c.hidden_size, generator=generator), torch.randn(5, c.hidden_size,
                                                                                           generator=generator)
    attended = torch.randn(c.num_attention_heads, 5, c.head_dim, generator=generator)
    wide = torch.randn(C_WIDE_ROWS, c.hidden_size, generator=generator)
    wide_attended = torch.randn(c.num_attention_heads, C_WIDE_ROWS, c.head_dim, generator=generator)
    with torch.inference_mode():
        layer_input = torch.cat([embeddings, previous], dim=-1)  # (what q, k and v read: 2 x hidden wide)
        for name, inputs in (("qkv_proj", layer_input), ("gate_up_proj", previous)):
            alone = [CastLinear(getattr(trained, part), "q8_0", kernels.linear)(inputs) for part in STACKED[name]]
            assert torch.equal(getattr(head, name)(inputs), torch.cat(alone, dim=-1))
        mixed, wide_mixed = head.finish(previous, attended), head.finish(wide, wide_attended)
        with pytest.raises(ValueError, match="projection takes"):
            head.layer_in_c.project(previous, torch.ones(5, c.head_dim), torch.zeros(5, c.head_dim))
        head.layer_in_c = None  # the same products, torch's steps between them
        torch.testing.assert_close(mixed, head.finish(previous, attended), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wide_mixed, head.finish(wide, wide_attended), rtol=1e-5, atol=1e-5)
    assert EagleDrafter.load(feature_drafter).with_matmul_dtype("q8_0", kernels.linear).with_small_steps(None).layer_in_c is None


def test_the_feature_drafter_takes_its_products_as_cpu_kernels_says(tiny_target, feature_drafter, monkeypatch, tmp_path):
    """--cpu-kernels for the feature drafter: auto and c draft through the C product (the same drafts
    as torch's here), torch never does; c refuses to start where the kernel cannot run, auto falls back."""
    from draft_service.config import DraftConfig
    from draft_service.feature_drafter import FeatureDrafter
    from draft_service.server import build_servicer
    from specdec.eagle import CastLinear
    from specdec.metrics import ServiceMetrics
    from specdec.serving import StartupError

    load = lambda setting: FeatureDrafter.load(str(feature_drafter), target=str(tiny_target),  # noqa: E731
                                               cpu_kernels=setting, matmul_dtype="float16")
    in_c, in_torch = load("c"), load("torch")
    assert in_c.head.lm_head.packed is not None and in_torch.head.lm_head.packed is None
    assert isinstance(in_torch.head.lm_head, CastLinear)
    assert in_c.head.steps is not None and in_c.head.norm.kernel is not None
    assert in_torch.head.steps is None and in_torch.head.norm.kernel is None
    assert in_c.attention is not None and in_torch.attention is None
    assert _drafts(in_c, feature_drafter) == _drafts(in_torch, feature_drafter)
    with pytest.raises(ValueError, match="'c', 'torch' or 'auto'"):
        load("fast")
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert load("auto").head.lm_head.packed is None  # falls back to torch's products
    with pytest.raises(StartupError, match="--cpu-kernels c: the C product did not build"):
        build_servicer(DraftConfig(model=str(feature_drafter), feature_target=str(tiny_target), cpu_kernels="c"),
                       ServiceMetrics())


def test_the_drafters_attention_in_c_attends_as_torchs_does(tiny_target, feature_drafter):
    """With the C kernels the head's attention runs in C, each row over its own key slots: positions
    taken in (each over those up to it) and a tree's nodes (over the committed positions, their
    ancestors and themselves) get what torch's attention over a mask gives (to float32 rounding),
    and the same drafts; a node's ancestors count."""
    from draft_service.drafters import ProposeJob
    from draft_service.feature_drafter import FeatureDrafter, _Tree
    from specdec.kv_cache import SessionCache, SessionKV

    in_c = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), cpu_kernels="c")
    in_torch = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), cpu_kernels="c")
    in_torch.attention = None
    config, generator = in_c.config, torch.Generator().manual_seed(8)
    entries = {name: SessionCache() for name in ("c", "torch")}
    for entry in entries.values():
        entry.kv = SessionKV(in_c.kv_shape, 8)  # grown as the positions come in
    tokens = torch.randint(0, config.target_vocab_size, (20,), generator=generator)
    previous = torch.randn(20, config.hidden_size, generator=generator)
    with torch.inference_mode():
        taken_in = {name: drafter._layer([(entries[name], 0, 12)], tokens[:12], previous[:12])
                    for name, drafter in (("c", in_c), ("torch", in_torch))}
        torch.testing.assert_close(taken_in["c"], taken_in["torch"], rtol=1e-5, atol=1e-5)
        more = {name: drafter._layer([(entries[name], 12, 8)], tokens[12:], previous[12:])  # after a cached prefix
                for name, drafter in (("c", in_c), ("torch", in_torch))}
        torch.testing.assert_close(more["c"], more["torch"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entries["c"].kv.data, entries["torch"].kv.data)
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        run = torch.randn(kv_heads, 3, dim, generator=generator)  # three nodes already run, after 20 committed
        q, k, v = (torch.randn(h, 3, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
        lineages = [[0, 2], [1], []]
        out = {}
        for name, drafter in (("c", in_c), ("torch", in_torch)):
            entries[name].kv.keys(0)[:, 20:23], entries[name].kv.values(0)[:, 20:23] = run, -run
            tree = _Tree(ProposeJob(entries[name], tokens.tolist(), 4, SamplingParams()), previous[:1],
                         expanded=[5, 6, 7])
            out[name] = drafter._tree_attention(tree, q, k, v, lineages)
        torch.testing.assert_close(out["c"], out["torch"], rtol=1e-5, atol=1e-5)
        orphans = in_c._tree_attention(tree, q, k, v, [[], [], []])
        assert not torch.allclose(orphans[:, :2], out["c"][:, :2]) and torch.allclose(orphans[:, 2], out["c"][:, 2])
    assert _drafts(in_c, feature_drafter) == _drafts(in_torch, feature_drafter)


@pytest.mark.parametrize("in_c", [True, False])
def test_a_session_far_behind_takes_in_only_the_last_max_catch_up_positions(tiny_target, feature_drafter, in_c):
    """--max-catch-up M: a session more than M committed positions behind (here a new one, 30
    positions) asks for features from M positions back, takes in those M only, and drafts from
    them alone: two contexts that differ only before them get the same tree, bitwise (with every
    position taken in they do not); in C and in torch's attention alike."""
    from draft_service.drafters import ProposeJob
    from draft_service.feature_drafter import FeatureDrafter
    from specdec.kv_cache import SessionCache

    config, window = DrafterConfig.load(feature_drafter), 8
    width = len(config.feature_layers) * config.hidden_size
    late = torch.randn(29, width, generator=torch.Generator().manual_seed(3)).half()
    contexts = []
    for seed in (1, 2):  # tokens and features that differ before the last 9 positions, agree from there
        early = torch.randn(29, width, generator=torch.Generator().manual_seed(seed)).half()
        committed = [(seed + 3 * i) % 40 for i in range(21)] + list(range(40, 49))
        contexts.append((committed, torch.cat([early[:21], late[21:]])))

    def tree(drafter: FeatureDrafter, committed: list[int], features: torch.Tensor):
        entry = SessionCache()
        asked = drafter.propose_batch([ProposeJob(entry, committed, 4, SamplingParams(), None, 0, (), 7)])[0]
        start = asked.features_from
        proposal = drafter.propose_batch([ProposeJob(entry, committed, 4, SamplingParams(), features[start:], start,
                                                     (), 7)])[0]
        return start, proposal, entry

    limited = FeatureDrafter.load(str(feature_drafter), target=str(tiny_target), hybrid_ngram=0,
                                  cpu_kernels="c" if in_c else "torch", max_catch_up=window)
    assert (limited.attention is not None) == in_c
    (start, one, entry), (_, other, _) = (tree(limited, *context) for context in contexts)
    assert start == 30 - window - 1  # the feature of the position before the first one taken in
    assert (entry.kv.start, one.computed_tokens) == (30 - window, window)
    assert (one.tokens, one.parents, one.confidences) == (other.tokens, other.parents, other.confidences)
    assert len(one.tokens) == 7
    limited.max_catch_up = 0  # every position taken in: the early ones count
    (start, one, _), (_, other, _) = (tree(limited, *context) for context in contexts)
    assert start == 0 and one.computed_tokens == 30
    assert one.confidences != other.confidences


async def test_greedy_with_a_max_catch_up_equals_the_targets_generate(redis_server, tiny_target, feature_drafter,
                                                                       target_greedy):
    """Drafts from a cache restarted a few positions back still only steer: the output is the
    target's own, and drafts are kept; a second turn, far behind again, likewise."""
    fields = dict(max_new_tokens=32, k=4, fixed_k=True, ignore_eos=True)
    stack = await start_stack(redis_server.url, tiny_target, str(feature_drafter),
                              draft_overrides={"max_catch_up": 6})
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            first = await generate(channel, prompt="hello there, how are you doing on this fine day?", **fields)
            second = await generate(channel, prompt="and what about tomorrow, and the day after that one?",
                                    session_id=first.session_id, **fields)
    finally:
        for server in stack.servers:
            await server.stop(0)
    assert first.token_ids == target_greedy(first.prompt_token_ids, 32)
    history = first.prompt_token_ids + first.token_ids + second.prompt_token_ids
    assert second.token_ids == target_greedy(history, 32)
    assert first.stats.accepted_tokens > 0 and second.stats.accepted_tokens > 0


def _drafts(drafter, folder: Path) -> list[int]:
    """A tree of 7 at k = 4 that `drafter` proposes for a fresh session of 37 committed tokens with
    seeded random features (the same for every drafter of `folder`'s config)."""
    from draft_service.drafters import ProposeJob
    from specdec.kv_cache import SessionCache

    config = DrafterConfig.load(folder)
    committed = list(range(3, 40))
    features = torch.randn(len(committed) - 1, len(config.feature_layers) * config.hidden_size,
                           generator=torch.Generator().manual_seed(1)).half()
    return drafter.propose_batch([ProposeJob(SessionCache(), committed, 4, SamplingParams(), features, 0, (), 7)])[0].tokens


def _path(parents: list[int], node: int) -> list[int]:
    """Node indices from the root's child down to `node`."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


async def test_trees_keep_more_drafts_per_round_than_chains(feature_stack, tree_stack):
    """The point of a tree: at the same depth, more of the target's tokens are among the drafts."""
    kept = {}
    for name, stack in (("chain", feature_stack), ("tree", tree_stack)):
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            results = [await generate(channel, prompt=prompt, max_new_tokens=40, k=3, fixed_k=True, ignore_eos=True)
                       for prompt in ("the sea is calm today", "what is two plus two?", "write a short poem")]
        kept[name] = sum(r.stats.accepted_tokens for r in results) / sum(r.stats.rounds for r in results)
    assert kept["tree"] > kept["chain"], kept


async def test_a_malformed_tree_is_refused(tree_stack):
    tokens = CommittedTokens([4, 5, 6, 7])
    stub = target_pb2_grpc.TargetServiceStub(grpc.aio.insecure_channel(tree_stack.target))
    draft = draft_pb2_grpc.DraftServiceStub(grpc.aio.insecure_channel(tree_stack.draft))
    coupled = common_pb2.SamplingParams(temperature=1.0, rule=common_pb2.SAMPLING_RULE_COUPLED)
    bad = [
        stub.Verify(target_pb2.VerifyRequest(context=context_to_pb("tree-a", tokens, 0), draft_tokens=[5, 6],
                                             draft_parents=[1, -1]), metadata=TIER_METADATA),
        stub.Verify(target_pb2.VerifyRequest(context=context_to_pb("tree-b", tokens, 0), draft_tokens=[5, 6],
                                             draft_parents=[-1]), metadata=TIER_METADATA),
        stub.Verify(target_pb2.VerifyRequest(context=context_to_pb("tree-c", tokens, 0), draft_tokens=[5, 6],
                                             draft_parents=[-1, -1],
                                             sampling=common_pb2.SamplingParams(temperature=1.0)),
                    metadata=TIER_METADATA),
        draft.Propose(draft_pb2.ProposeRequest(context=context_to_pb("tree-d", tokens, 0), k=2, tree_nodes=99),
                      metadata=TIER_METADATA),
        draft.Propose(draft_pb2.ProposeRequest(context=context_to_pb("tree-f", tokens, 0), k=2, min_confidence=1.5),
                      metadata=TIER_METADATA),
        draft.Propose(draft_pb2.ProposeRequest(context=context_to_pb("tree-g", tokens, 0), k=2,
                                               min_confidence=float("nan")), metadata=TIER_METADATA),
    ]
    for call in bad:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A well-formed tree under the coupled rule: one choice after the root and after each draft.
    reply = await stub.Verify(target_pb2.VerifyRequest(context=context_to_pb("tree-e", tokens, 0),
                                                       draft_tokens=[5, 6, 7], draft_parents=[-1, -1, 1],
                                                       sampling=coupled), metadata=TIER_METADATA)
    assert len(reply.sampled_tokens) == 4


async def _two_turns_losing_home(stack, tier: str, target_greedy):
    """Two turns of one session (k = 4 fixed: adaptive k may stop drafting) on `stack`, stopped
    after them; the replica of `tier` ('draft' or 'target') that held the session stopped between
    them and marked down. Checks the second turn is the target's own; returns its stats."""
    fields = dict(max_new_tokens=40, k=4, fixed_k=True, ignore_eos=True)
    replicas = getattr(stack.decoder, tier).replicas
    first_server = len(stack.targets) if tier == "draft" else 0  # (stack.started: targets, then drafts)
    try:
        async with grpc.aio.insecure_channel(stack.coordinator) as channel:
            first = await generate(channel, prompt="tell me about the sea", **fields)
            home = replicas.order_for(first.session_id)[0]
            await stack.started[first_server + home].server.stop(0)
            replicas.healthy[replicas.addresses[home]] = False
            second = await generate(channel, prompt="and the mountains?", session_id=first.session_id, **fields)
    finally:
        for server in stack.servers:
            await server.stop(0)
    history = first.prompt_token_ids + first.token_ids + second.prompt_token_ids
    assert second.token_ids == target_greedy(history, 40)
    return second.stats


async def test_a_new_turn_and_a_lost_draft_replica_get_their_features_back(
    redis_server, tiny_target, feature_drafter, target_greedy
):
    """The draft replica holding a session dies between turns: the other one lacks its features,
    says so, gets them from the target through the coordinator, and drafts again at once."""
    stack = await start_stack(redis_server.url, tiny_target, str(feature_drafter), draft_replicas=2)
    stats = await _two_turns_losing_home(stack, "draft", target_greedy)
    # The turn's first round drafts nothing (its prompt has no features yet); drafting resumes after it.
    assert stats.rounds - stats.proposed_per_position[0] <= 3  # the prefill, the last round, one more
    assert stats.accepted_tokens > 0


async def test_a_target_only_turn_asks_for_no_features_and_the_next_turn_drafts_at_once(feature_stack, target_greedy):
    """k = 0 (target only): no Verify of the turn asks for the drafter's features; the session's
    next turn, which drafts, has the drafter catch up and keeps drafts, the output the target's."""
    asked: list[tuple[int, ...]] = []
    client = feature_stack.decoder.target
    verify = client.verify

    async def recording(*args, **kwargs):
        asked.append(tuple(kwargs.get("feature_layers", args[6] if len(args) > 6 else ())))
        return await verify(*args, **kwargs)

    client.verify = recording
    try:
        async with grpc.aio.insecure_channel(feature_stack.coordinator) as channel:
            first = await generate(channel, prompt="tell me about the river", max_new_tokens=16, k=0, ignore_eos=True)
            target_only = len(asked)
            second = await generate(channel, prompt="and the lake?", session_id=first.session_id, max_new_tokens=32,
                                    k=4, fixed_k=True, ignore_eos=True)
    finally:
        client.verify = verify
    assert target_only == 16 and not any(asked[:target_only])
    assert all(asked[target_only:])
    history = first.prompt_token_ids + first.token_ids + second.prompt_token_ids
    assert second.token_ids == target_greedy(history, 32) and second.stats.accepted_tokens > 0


async def test_verify_returns_the_features_the_drafter_reads(feature_stack, feature_drafter):
    """Features for positions the replica holds come from its buffer, bitwise the recomputed ones."""
    config = DrafterConfig.load(feature_drafter)
    layers = config.feature_layers
    tokens = CommittedTokens([4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    stub = target_pb2_grpc.TargetServiceStub(grpc.aio.insecure_channel(feature_stack.target))

    async def verify(session: str, start: int) -> torch.Tensor:
        request = target_pb2.VerifyRequest(context=context_to_pb(session, tokens, 0), draft_tokens=[5],
                                           feature_start=start, feature_layers=layers)
        from specdec.tensor_codec import decode_tensor

        return decode_tensor((await stub.Verify(request, metadata=TIER_METADATA)).features)

    fresh = await verify("features-a", 0)
    assert fresh.shape == (11, len(layers) * config.hidden_size) and fresh.dtype == torch.float16
    again = await verify("features-a", 2)  # from the buffer this time
    assert torch.equal(again, fresh[2:])
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        request = target_pb2.VerifyRequest(context=context_to_pb("features-b", tokens, 0), feature_start=0,
                                           feature_layers=[99])
        await stub.Verify(request, metadata=TIER_METADATA)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A draft replica without them says from where it needs them, and drafts nothing.
    draft = draft_pb2_grpc.DraftServiceStub(grpc.aio.insecure_channel(feature_stack.draft))
    reply = await draft.Propose(draft_pb2.ProposeRequest(context=context_to_pb("features-c", tokens, 0), k=3),
                                metadata=TIER_METADATA)
    assert reply.HasField("features_from") and reply.features_from == 0 and not reply.tokens


# --- drafting in the target (its --drafter; the coordinator's --draft target) --------------------

@pytest_asyncio.fixture(scope="module")
async def in_target_stacks(redis_server, tiny_target, feature_drafter):
    """The feature drafter hosted by the target, no draft tier: chains, and trees of 10."""
    stacks = {shape: await start_stack(redis_server.url, tiny_target, "target", hosted_drafter=str(feature_drafter),
                                       tree_nodes=nodes) for shape, nodes in (("chain", 0), ("tree", 10))}
    yield stacks
    for stack in stacks.values():
        for server in stack.servers:
            await server.stop(0)


@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("k", [1, 4, 8])
async def test_greedy_with_drafts_made_in_the_target_equals_the_targets_generate(in_target_stacks, target_greedy,
                                                                                  shape, k):
    stack = in_target_stacks[shape]
    async with grpc.aio.insecure_channel(stack.coordinator) as channel:
        result = await generate(channel, prompt="hello there, how are you? hello there, how are", max_new_tokens=48,
                                k=k, fixed_k=True, ignore_eos=True)
    stats = result.stats
    assert stats.drafter == "eagle3@target" and stack.draft is None  # (no draft tier)
    assert result.token_ids == target_greedy(result.prompt_token_ids, 48)
    assert stats.accepted_tokens > 0
    # Every round drafts but the first (its Verify drafts the second) and the last (no room left).
    assert stats.rounds - stats.proposed_per_position[0] <= 2
    assert (stats.draft_tokens > sum(stats.proposed_per_position)) == (shape == "tree")


async def test_a_round_drafts_what_the_verify_before_made_only_when_it_commits_what_they_follow(
    in_target_stacks, target_greedy
):
    """Under a rule that keeps one draft fewer than the target's own verdict (the same tokens, as
    the kept draft is the target's choice there), the drafts made after the target's verdict do not
    follow what the round commits: the next round sends none; after a round whose tokens they
    follow, it sends them. The output is the target's either way."""
    from specdec.sampling import Verdict, greedy_accept

    def keep_one_fewer(drafts, choices):
        verdict = greedy_accept(drafts, choices)
        return verdict if verdict.accepted == 0 else Verdict(verdict.accepted - 1, int(choices[verdict.accepted - 1]))

    decoder = in_target_stacks["chain"].decoder
    verify, calls = decoder.target.verify, []

    async def recording(session_id, committed, drafts, *args, **kwargs):
        held = list(committed.ids)
        reply = await verify(session_id, committed, drafts, *args, **kwargs)
        calls.append((held, list(drafts), reply.next_drafts))
        return reply

    decoder.target.verify, decoder.match_rule = recording, keep_one_fewer
    try:
        async with grpc.aio.insecure_channel(in_target_stacks["chain"].coordinator) as channel:
            result = await generate(channel, prompt="tell me a story about a cat", max_new_tokens=40, k=4,
                                    fixed_k=True, ignore_eos=True)
    finally:
        decoder.target.verify, decoder.match_rule = verify, greedy_accept
    assert result.token_ids == target_greedy(result.prompt_token_ids, 40)
    used = dropped = 0
    for (before, _, made), (after, sent, _) in zip(calls, calls[1:]):
        if made is not None and made.follows == after[len(before):]:
            assert sent and sent == made.tokens[: len(sent)]
            used += 1
        else:
            assert sent == []
            dropped += made is not None
    assert used > 0 and dropped > 0


async def test_drafting_in_the_target_refuses_what_it_cannot_draft(in_target_stacks, feature_stack, redis_server,
                                                                   tiny_target):
    """next_round from a target that hosts no drafter, under the rejection rule, with features asked
    for, or with k 0: INVALID_ARGUMENT; a coordinator told to draft in targets that host no drafter
    does not start."""
    from coordinator import server as coordinator_server
    from coordinator.config import CoordinatorConfig
    from specdec.serving import StartupError

    tokens = CommittedTokens([4, 5, 6, 7])
    rejection = common_pb2.SamplingParams(temperature=1.0, rule=common_pb2.SAMPLING_RULE_REJECTION)

    async def refused(address: str, **fields) -> str:
        stub = target_pb2_grpc.TargetServiceStub(grpc.aio.insecure_channel(address))
        request = target_pb2.VerifyRequest(context=context_to_pb("next-round", tokens, 0), **fields)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Verify(request, metadata=TIER_METADATA)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return error.value.details()

    hosting = in_target_stacks["chain"].target
    assert "hosts no drafter" in await refused(feature_stack.target, next_round=target_pb2.NextRound(k=3))
    assert "rejection rule" in await refused(hosting, next_round=target_pb2.NextRound(k=3), sampling=rejection)
    assert "ask for none" in await refused(hosting, next_round=target_pb2.NextRound(k=3), feature_start=0,
                                           feature_layers=[1])
    assert "next_round.k" in await refused(hosting, next_round=target_pb2.NextRound(k=0))
    config = CoordinatorConfig(target=(feature_stack.target,), draft=("target",), redis_url=redis_server.url,
                               tokenizer=str(tiny_target), startup_timeout_s=10, metrics_port=-1, tier_token=TIER_TOKEN)
    with pytest.raises(StartupError, match="--drafter"):
        await coordinator_server.build_decoder(config)


async def test_a_lost_target_replica_drafts_again_at_once_on_the_other(redis_server, tiny_target, feature_drafter,
                                                                        target_greedy):
    """The target replica holding a session (its KV cache and its drafter's state) dies between
    turns: the other one takes in the features from its own pass and drafts from the turn's second
    round, the output the target's."""
    stack = await start_stack(redis_server.url, tiny_target, "target", target_replicas=2,
                              hosted_drafter=str(feature_drafter))
    stats = await _two_turns_losing_home(stack, "target", target_greedy)
    assert stats.rounds - stats.proposed_per_position[0] <= 2 and stats.accepted_tokens > 0


# --- the sampling law with the feature drafter ------------------------------------------------

CHARS = "abcd"
PROMPT = [4, 5, 6, 4, 5]
PARAMS = SamplingParams(temperature=1.0, top_k=6, top_p=0.95)
RULES = {"rejection": common_pb2.SAMPLING_RULE_REJECTION, "coupled": common_pb2.SAMPLING_RULE_COUPLED}


@pytest_asyncio.fixture(scope="module")
async def small_feature_stack(redis_server, tmp_path_factory):
    """A chain stack and a tree stack (trees of 5 drafts, whatever the load; the tests fix k, so that
    adaptive k does not choose chains instead) on one small target and drafter. The draft service's default hybrid is on and PROMPT repeats its last two tokens, so
    coupled chains are prompt lookup's copy and trees are grafted on it (the law must hold all the
    same). The drafter shapes q at 0.25 times the request's temperature (its temperature_scale): a
    q that differs from the target's own shaping must keep the law too."""
    root = tmp_path_factory.mktemp("small-feature")
    target = build_tiny_model(root / "target", seed=10, chars=CHARS, logit_scale=3.0)
    drafter = root / "drafter"
    _train(target, drafter, draft_vocab=6)  # a draft vocabulary smaller than the target's: q is 0 elsewhere
    config = json.loads((drafter / "config.json").read_text())
    (drafter / "config.json").write_text(json.dumps({**config, "temperature_scale": 0.25}))
    stacks = {"chain": await start_stack(redis_server.url, target, str(drafter), tree_nodes=0),
              # Trees even under the test's concurrency (by default they give way to chains under load).
              "tree": await start_stack(redis_server.url, target, str(drafter), tree_nodes=5, tree_max_sessions=64),
              # The same drafter hosted by the target: trees drafted after its own coupled draws, in batches.
              "target-tree": await start_stack(redis_server.url, target, "target", hosted_drafter=str(drafter),
                                               tree_nodes=5, tree_max_sessions=64)}
    model = models.load_model(str(target))
    law = two_token_law(model, PROMPT, PARAMS)
    yield stacks, law
    for stack in stacks.values():
        for server in stack.servers:
            await server.stop(0)


@pytest.mark.parametrize("rule, shape", [("rejection", "chain"), ("coupled", "chain"), ("coupled", "tree"),
                                         ("coupled", "target-tree")])
async def test_the_feature_drafter_keeps_the_target_law(small_feature_stack, rule, shape):
    import asyncio

    stacks, law = small_feature_stack
    stack = stacks[shape]
    counts: Counter = Counter()
    async with grpc.aio.insecure_channel(stack.coordinator) as channel:
        semaphore = asyncio.Semaphore(16)

        async def one(seed: int) -> None:
            async with semaphore:
                result = await generate(channel, prompt_token_ids=PROMPT, max_new_tokens=3, k=3, seed=seed,
                                        fixed_k=True, ignore_eos=True, temperature=PARAMS.temperature,
                                        top_k=PARAMS.top_k, top_p=PARAMS.top_p, sampling_rule=RULES[rule])
            counts[tuple(result.token_ids[:2])] += 1
            assert result.stats.drafter == ("eagle3@target" if shape.startswith("target") else "eagle3")
            trees[0] += result.stats.draft_tokens > sum(result.stats.proposed_per_position)
            drafted[0] += result.stats.draft_tokens > 0

        trees, drafted = [0], [0]
        await asyncio.gather(*(one(seed) for seed in range(600)))
    assert chi_square_pvalue(counts, law) > 1e-3, counts
    assert (trees[0] > 0) == shape.endswith("tree")  # the tree stacks did draft trees
    assert drafted[0] > 300  # (in the target: a turn's second round and after, of its 3 tokens)


async def test_the_law_check_catches_a_wrong_tree_rule(small_feature_stack):
    """A tree rule that keeps the drafter's best branch whatever the target chose fails the same check."""
    import asyncio

    from specdec.sampling import Verdict, tree_accept

    def keep_best_branch(tokens, parents, choices):
        path, node = [], -1
        while (children := [i for i, parent in enumerate(parents) if parent == node]):
            node = children[0]
            path.append(node)
        return Verdict(len(path), choices[node + 1], tuple(path))

    stacks, law = small_feature_stack
    decoder = stacks["tree"].decoder
    decoder.tree_rule = keep_best_branch
    counts: Counter = Counter()
    try:
        async with grpc.aio.insecure_channel(stacks["tree"].coordinator) as channel:
            semaphore = asyncio.Semaphore(16)

            async def one(seed: int) -> None:
                async with semaphore:
                    result = await generate(channel, prompt_token_ids=PROMPT, max_new_tokens=3, k=3, seed=seed,
                                            fixed_k=True, ignore_eos=True, temperature=PARAMS.temperature,
                                            top_k=PARAMS.top_k, top_p=PARAMS.top_p, sampling_rule=RULES["coupled"])
                counts[tuple(result.token_ids[:2])] += 1

            await asyncio.gather(*(one(seed) for seed in range(300)))
    finally:
        decoder.tree_rule = tree_accept
    assert chi_square_pvalue(counts, law) < 1e-4, counts


def test_the_heldout_split_depends_on_the_data_and_the_seed_only():
    """A resumed run draws the same held-out conversations as the run that wrote the data, whatever
    other random numbers were drawn meanwhile (it used to share the data's generator)."""
    import random

    data = [Conversation([i], [i + 1], greedy=bool(i % 2)) for i in range(200)]
    first = split_heldout(data, 0.05, seed=0)
    random.random()
    again = split_heldout(list(data), 0.05, seed=0)
    assert first == again and len(first[0]) == 10
    assert not {c.prompt[0] for c in first[0]} & {c.prompt[0] for c in first[1]}
    assert split_heldout(data, 0.05, seed=1)[0] != first[0]

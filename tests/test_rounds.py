"""Rounds that overlap (draft-ahead, commits beside the next round's calls) and adaptive k: the
tokens are the same with every overlap on or off and whatever k each round chose."""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio

from conftest import start_stack
import torch

from coordinator.clients import DraftResult
from coordinator.planning import GREEDY, KPlanner, RoundCosts, sampling_regime
from coordinator.rounds import FeatureRelay, Round
from helpers import generate
from specdec.v1 import common_pb2

COUPLED = common_pb2.SAMPLING_RULE_COUPLED
CASES = {
    "greedy": dict(),
    "seeded": dict(temperature=0.9, top_p=0.95, seed=17, sampling_rule=COUPLED),
}
PROMPT = "abc abc abc abc, the cat sat on the mat, the cat sat on the mat and then"


@pytest_asyncio.fixture(scope="module")
async def ahead_stacks(redis_server, tiny_target, tiny_draft):
    """Draft-ahead on and off, for the n-gram drafter and for a model drafter."""
    running = {
        (drafter, ahead): await start_stack(redis_server.url, tiny_target, spec, draft_ahead=ahead)
        for drafter, spec in (("ngram", "ngram"), ("model", str(tiny_draft))) for ahead in ("on", "off")
    }
    yield running
    for stack in running.values():
        for server in stack.servers:
            await server.stop(0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("drafter", ["ngram", "model"])
async def test_draft_ahead_and_adaptive_k_change_no_token(stacks, ahead_stacks, drafter, case):
    fields = dict(prompt=PROMPT, max_new_tokens=80, ignore_eos=True, **CASES[case])
    async with grpc.aio.insecure_channel(stacks["none"].coordinator) as channel:
        reference = await generate(channel, k=0, **fields)
    async with grpc.aio.insecure_channel(ahead_stacks[drafter, "off"].coordinator) as plain, \
            grpc.aio.insecure_channel(ahead_stacks[drafter, "on"].coordinator) as ahead:
        fixed = await generate(plain, k=4, fixed_k=True, **fields)
        adaptive = await generate(plain, k=6, **fields)
        overlapped = await generate(ahead, k=4, fixed_k=True, **fields)
        both = await generate(ahead, k=6, **fields)
    for result in (fixed, adaptive, overlapped, both):
        assert result.token_ids == reference.token_ids
    ks = list(fixed.stats.k_per_round)
    assert set(ks[: len(ks) // 2]) == {4} and max(ks) == 4 and fixed.stats.draft_ahead_hits == 0
    assert max(adaptive.stats.k_per_round) <= 6 and len(adaptive.stats.k_per_round) == adaptive.stats.rounds
    assert overlapped.stats.draft_ahead_hits + overlapped.stats.draft_ahead_misses > 0


async def test_draft_ahead_is_used_when_rounds_keep_their_drafts(ahead_stacks):
    """Text that repeats itself: the n-gram drafter's drafts are all kept often, and the next
    round's draft, proposed during the Verify, is then used instead of a Propose."""
    async with grpc.aio.insecure_channel(ahead_stacks["ngram", "on"].coordinator) as channel:
        result = await generate(channel, prompt="one two three four " * 8, max_new_tokens=60, k=3, fixed_k=True,
                                ignore_eos=True)
    assert result.stats.draft_ahead_hits > 0


def test_the_planner_drafts_more_when_drafts_are_kept_and_none_when_they_are_not():
    costs = RoundCosts(max_k=8)
    for k in range(0, 9):
        costs.observe(k, 0.060 + 0.008 * k, accepted=0)  # a draft token costs an eighth of a step
    good = KPlanner(8, costs, prior=[0.5] * 9)
    for _ in range(30):
        good.observe(proposed=8, accepted=8)
    assert good.choose(8) == 8
    bad = KPlanner(8, costs, prior=[0.5] * 9)
    for _ in range(30):
        bad.observe(proposed=4, accepted=0)
    chosen = [bad.choose(8) for _ in range(16)]
    assert chosen.count(0) >= 14 and chosen.count(1) >= 1  # target only, with a probe now and then
    assert good.choose(3) == 3  # the request's k is a ceiling


def test_the_planner_drafts_less_when_each_draft_token_costs_a_lot():
    flat, steep = RoundCosts(max_k=8), RoundCosts(max_k=8)
    for k in range(0, 9):
        flat.observe(k, 0.060, accepted=0)
        steep.observe(k, 0.060 * (1 + k), accepted=0)  # a loaded target: every token costs a step
    planners = [KPlanner(8, costs, prior=[0.5] * 9) for costs in (flat, steep)]
    for planner in planners:
        for _ in range(30):
            planner.observe(proposed=8, accepted=2)  # the first two drafts usually kept
    assert planners[0].choose(8) > planners[1].choose(8)
    assert planners[1].choose(8) == 0


def test_a_rounds_prefill_does_not_make_its_k_look_costly():
    """A turn's first round also prefills the prompt (seconds for a long one); timed as a round at
    its k, it would teach the planner that drafting is dear. It counts for acceptance only."""
    costs = RoundCosts(max_k=8)
    for k in (0, 1, 2, 0, 1, 2):
        costs.observe(k, 0.060, accepted=0)
    before = costs.acceptance()[1]
    costs.observe(4, None, accepted=3)  # the prefill round
    assert costs.wall(4) == pytest.approx(0.060)
    assert costs.acceptance()[1] > before  # its drafts were kept: that still counts
    planner = KPlanner(8, costs, prior=costs.acceptance())
    planner.observe(proposed=4, accepted=1)
    assert planner.choose(4) > 0


def test_rounds_without_drafts_are_timed_on_their_own():
    """Without batch invariance a one-token step takes a faster kernel (43 ms against 64 ms for
    2-8 tokens on this CPU) and a k = 0 round skips Propose: a line through the drafting rounds
    would price k = 0 at 64 ms. Modest acceptance then does not pay; high acceptance does."""
    costs = RoundCosts(max_k=8)
    for _ in range(4):
        costs.observe(0, 0.043, accepted=0)
        for k in (1, 4):
            costs.observe(k, 0.064, accepted=0)
    assert costs.wall(0) == pytest.approx(0.043) and costs.wall(4) == pytest.approx(0.064)
    modest, high = KPlanner(8, costs, prior=[0.25] * 9), KPlanner(8, costs, prior=[0.9] * 9)
    assert modest.choose(4) == 0 and high.choose(4) == 4


def test_under_load_k_is_priced_as_if_every_session_drafted_it():
    """16 sessions share each target pass and every extra position in a pass costs 3 ms: one
    session's drafts barely move its own round time, but all sessions drafting 4 tokens make the
    pass 64 positions longer. Modest acceptance then does not pay; alone it does."""
    alone, loaded = RoundCosts(max_k=8), RoundCosts(max_k=8)
    for i in range(12):
        alone.observe(4, 0.065 + 0.001 * (i % 3), accepted=0, batch_sessions=1, batch_rows=5 + i % 3,
                      compute_s=0.060)
        rows = 16 * 5 + 4 * (i % 3)  # a few sessions at other ks
        loaded.observe(4, 0.150 + 0.003 * rows, accepted=0, batch_sessions=16, batch_rows=rows,
                       compute_s=0.100 + 0.003 * rows)
    assert loaded.load() == (16.0, pytest.approx(0.003))
    assert loaded.wall(0) < 0.5 * loaded.wall(4)
    assert alone.wall(0) > 0.9 * alone.wall(4)
    for costs, expected in ((alone, True), (loaded, False)):
        planner = KPlanner(8, costs, prior=[0.25] * 9)
        assert (planner.choose(4) > 0) is expected


def test_the_relay_keeps_the_features_of_a_trees_kept_path():
    """Verify returns a tree's rows in the tree's order after the committed ones; the drafter must
    get those of the kept drafts, in path order, and never the newest token's."""
    relay = FeatureRelay((1,))
    committed, start = 10, 8  # features of positions 8, 9 (committed), then drafts 0..4
    rows = torch.arange(7, dtype=torch.float16)[:, None]  # row value = its index
    relay.keep(rows, start, committed + 3, path=(0, 3), drafted_at=committed)  # kept: drafts 0, 3, then a bonus
    assert relay.start == 8 and relay.rows[:, 0].tolist() == [0, 1, 2, 5]
    chain = FeatureRelay((1,))
    chain.keep(rows, start, committed + 3)
    assert chain.rows[:, 0].tolist() == [0, 1, 2, 3]


def test_the_relay_gathers_rounds_without_drafts_and_joins_their_rows_once_when_sent(monkeypatch):
    """Rounds at k = 0 deliver nothing, so their features gather over the answer: each round's rows
    are kept as they come, joined once when a Propose reads them (not every round: that copied the
    whole answer's features each round); a round that does not follow on starts over, and a
    delivery empties the relay."""
    relay = FeatureRelay((1,))
    joins = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda pieces, *args, **kwargs: joins.append(len(pieces)) or cat(pieces, *args, **kwargs))
    for position in range(8, 208):  # a round at k = 0 computes position p - 1 and commits p
        relay.keep(torch.tensor([[float(position)]]), position, position + 2)
    assert joins == [] and relay.start == 8 and relay.held == 200
    assert relay.rows[:, 0].tolist() == [float(p) for p in range(8, 208)] and joins == [200]
    assert relay.rows.shape[0] == 200 and joins == [200]  # joined once
    relay.keep(torch.tensor([[1.0], [2.0]]), 300, 302)  # not after position 207: starts over
    assert relay.start == 300 and relay.rows[:, 0].tolist() == [1.0]
    relay.delivered(None)
    assert relay.rows is None and relay.held == 0


def test_trees_give_way_to_chains_when_the_target_is_loaded():
    from coordinator.decoding import Decoder, ModelLimits
    from specdec.sampling import REJECTION, SamplingParams

    decoder = Decoder(None, None, None, None, ModelLimits(100, 100, frozenset()), tree_nodes=7)
    greedy = SamplingParams()
    assert decoder._tree_nodes(4, greedy) == 7
    assert decoder._tree_nodes(7, greedy) == 0  # no wider than a chain of k
    assert decoder._tree_nodes(4, SamplingParams(temperature=0.7, rule=REJECTION)) == 0  # chains only
    for _ in range(5):  # the target's passes now carry 8 sessions each
        decoder.costs.observe(4, 0.2, 1, batch_sessions=8, batch_rows=40, compute_s=0.15)
    assert decoder._tree_nodes(4, greedy) == 0


def test_the_planner_times_a_round_without_drafts_when_none_is_timed_and_stops_drafting_if_it_is_cheaper():
    """Trees cost about the same at every k, so the drafting rounds' line prices k = 0 near a
    drafting round (60 ms here) though a target step takes 29 ms. Until rounds at k = 0 are timed
    the planner takes one every explore_every rounds; once they are, 1.9 tokens a 60 ms round do
    not pay against 29 ms a token, and 2.6 do."""
    def drafting_costs() -> RoundCosts:
        costs = RoundCosts(max_k=8)
        for i in range(12):
            costs.observe(3 + i % 3, 0.060 + 0.0005 * (i % 3), accepted=0)
        return costs

    for kept, drafts_after in ((0.45, False), (0.8, True)):
        costs = drafting_costs()
        planner = KPlanner(5, costs, prior=[kept] * 9, explore_every=4)
        assert costs.wants_plain_round() and costs.wall(0) > 0.055
        chosen = [planner.choose(5) for _ in range(4)]
        assert all(k > 0 for k in chosen[:3]) and chosen[3] == 0  # the fourth round explores k = 0
        for _ in range(2):
            costs.observe(0, 0.029, accepted=0)
        assert not costs.wants_plain_round() and costs.wall(0) == pytest.approx(0.029)
        assert (planner.choose(5) > 0) is drafts_after
    loaded = RoundCosts(max_k=8)
    for _ in range(12):
        loaded.observe(4, 0.150, accepted=0, batch_sessions=16, batch_rows=80, compute_s=0.12)
    assert not loaded.wants_plain_round()  # a shared target's k = 0 is priced off the line anyway


def _tree_and_chain_rounds(tree_wall: float) -> RoundCosts:
    """Rounds at k = 0 (30 ms), chains of 3 (40 ms a round, 1.9 tokens) and trees of 7 drafts as
    deep as 5 (tree_wall a round, 2.4 tokens), as a coordinator's sessions would have run them."""
    costs = RoundCosts(max_k=8)
    for i in range(8):
        costs.observe(0, 0.030, accepted=0)
        costs.observe(3, 0.040 + 0.0005 * (i % 2), accepted=1 if i % 10 else 0)
        costs.observe(5, tree_wall + 0.0005 * (i % 2), accepted=1 + i % 2, nodes=7)
    return costs


def test_a_tree_is_priced_by_its_own_rounds_and_worth_what_they_yielded():
    costs = _tree_and_chain_rounds(0.080)
    assert costs.tree_wall(7) == pytest.approx(0.080, rel=0.02)  # timed on its own
    assert costs.wall(3) == pytest.approx(0.040, rel=0.02) and costs.wall(5) < 0.045  # chains: their own line
    assert costs.tree_wall(12) < 0.060  # no tree of 12 timed: the chains' line at 12 drafts
    assert costs.tree_tokens() == pytest.approx(2.5, abs=0.2)
    planner = KPlanner(5, costs, prior=[0.5] * 9)
    assert planner.expected_tree_tokens(5) == pytest.approx(costs.tree_tokens())
    for _ in range(40):
        planner.observe(5, accepted=3, tree=True)
    assert planner.expected_tree_tokens(5) > 3.5  # this call's trees do better than all sessions'


@pytest.mark.parametrize("tree_wall, trees", [(0.045, True), (0.080, False)])
def test_the_planner_drafts_trees_where_their_rows_are_cheap_and_chains_where_they_are_not(tree_wall, trees):
    """2.4 tokens for a tree round against 1.9 for a chain of 3: worth it at 45 ms against 40 (a
    target that verifies 8 rows for about the cost of 4), not at 80 (an AVX2 CPU, where they cost
    twice as much). Where chains win, a drafting round still drafts a tree after explore_every of
    them, each explored tree doubling the wait for the next (up to max_probe_every); where trees
    win, every explore_every-th round is the best chain; a round without trees on offer (sampled
    with the rejection rule, a loaded target) is a chain."""
    costs = _tree_and_chain_rounds(tree_wall)
    planner = KPlanner(5, costs, prior=[0.6, 0.6, 0.35, 0.25, 0.2, 0.2, 0.2, 0.2, 0.2], explore_every=4,
                       max_probe_every=16)
    plans = [planner.plan(5, tree_nodes=7) for _ in range(48)]
    explored = [i for i, plan in enumerate(plans) if plan.nodes == (0 if trees else 7)]
    if trees:
        assert explored == list(range(3, 48, 4))  # a chain explored every 4th
        assert all(p.k == 5 for p in plans if p.nodes) and all(0 < p.k < 5 for p in plans if not p.nodes)
    else:
        assert explored == [3, 11, 27, 43]  # a tree after 4 chain rounds, then 8, 16, 16 (the cap)
        assert all(0 < p.k < 5 for p in plans if not p.nodes)
        for wall, winner in ((0.030, 7), (0.080, 0)):  # trees get cheap and win, then dear again
            for _ in range(32):
                costs.observe(5, wall, accepted=1, nodes=7)
                costs.observe(3, 0.040, accepted=1)
            assert planner.plan(5, tree_nodes=7)[1] == winner
        assert [planner.plan(5, tree_nodes=7)[1] for _ in range(3)] == [0, 0, 7]  # the shortest wait again
    assert planner.plan(5, tree_nodes=0)[1] == 0
    assert planner.plan(5, tree_nodes=5)[1] == 0  # no wider than a chain of k


def test_the_planners_confidence_floor_is_a_drafts_cost_times_the_tokens_a_second_a_round_yields():
    """A draft the target keeps with probability p adds p tokens for what one draft adds to a round
    (draft_cost: the slope of the rounds' walls over the drafts they verified, whatever k they
    planned), which pays when p is at least draft_cost x the round's tokens a second: the plan's
    min_confidence. A configured floor is used as it is; rounds at k = 0 and probes ask for every
    draft."""
    costs = RoundCosts(max_k=8)
    for i in range(40):  # rounds planned at k = 5 whose drafters left out some drafts
        costs.observe(5, 0.030 + 0.004 * (i % 6), accepted=1, drafts=i % 6)
    assert costs.draft_cost() == pytest.approx(0.004, rel=1e-6)
    planner = KPlanner(8, costs, prior=[0.7] * 9)
    plan = planner.plan(5)
    assert plan.k > 0 and plan.nodes == 0
    rate = planner.expected_tokens(plan.k) / costs.wall(plan.k)
    assert plan.min_confidence == pytest.approx(0.004 * rate, rel=1e-6) and 0.05 < plan.min_confidence < 0.5
    assert KPlanner(8, costs, prior=[0.7] * 9, confidence_floor=0.3).plan(5).min_confidence == 0.3
    dear = RoundCosts(max_k=8)  # drafting never pays: k = 0, and now and then a probe of one draft
    for k in range(0, 9):
        dear.observe(k, 0.060 + 0.008 * k, accepted=0)
    fixed = KPlanner(8, dear, prior=[0.05] * 9, confidence_floor=0.3)
    plans = [fixed.plan(8) for _ in range(40)]
    assert {p.k for p in plans} == {0, 1} and all(p.min_confidence == 0 for p in plans)


def test_a_round_whose_drafter_left_out_drafts_counts_as_the_plan_it_was():
    """Adaptive k compares plans: a round planned 4 deep whose drafter left out drafts under a
    confidence counts 4 deep (the drafts left out were not kept), so a drafter that leaves out
    everything teaches the planner that drafting yields nothing, and that plan's cost is its own;
    without a floor the drafts' depth counts (an n-gram drafter that found a shorter match)."""
    cut = Round(10, 4, 0, 0.3, draft=DraftResult([7], None, False, 0.001))
    assert cut.counted_depth == 4 and cut.depth == 1
    tree = Round(10, 4, 7, 0.3, draft=DraftResult([7, 8, 9], None, False, 0.001, parents=[-1, 0, -1]))
    assert tree.counted_depth == 4 and tree.depth == 2
    assert Round(10, 4, 0, 0.0, draft=DraftResult([7], None, True, 0.0)).counted_depth == 1
    assert Round(10, 4, 0, 0.3).counted_depth == 0  # no draft came back (the tier failed): target-only
    costs = RoundCosts(max_k=8)
    planner = KPlanner(8, costs, prior=[0.6] * 9)
    for _ in range(60):  # nothing drafted, counted as the plan: position 1 tried and not kept
        nothing = Round(10, 4, 0, 0.3, draft=DraftResult([], None, False, 0.001))
        planner.observe(nothing.counted_depth, accepted=0)
    assert planner.acceptance(1) < 0.1 and planner.expected_tokens(4) < 1.2  # (counted 0 deep: still 0.6 and 2.3)


def test_what_rounds_yield_is_kept_apart_by_sampling_regime():
    """Greedy rounds that keep their drafts and sampled ones that do not: a new greedy call's
    priors are greedy's, a new sampled call's the sampled regime's (not a blend of both), and a
    regime not seen yet starts from all regimes' rounds."""
    from specdec.sampling import COUPLED, SamplingParams

    greedy, sampled = sampling_regime(SamplingParams()), sampling_regime(SamplingParams(0.7, rule=COUPLED))
    assert greedy != sampled and sampled == sampling_regime(SamplingParams(0.71, seed=9, rule=COUPLED))
    assert sampled != sampling_regime(SamplingParams(1.0, rule=COUPLED)) != sampling_regime(SamplingParams(1.0))
    costs = RoundCosts(max_k=8)
    for _ in range(100):
        costs.observe(4, 0.05, accepted=4, regime=greedy)
        costs.observe(4, 0.05, accepted=0, regime=sampled)
        costs.observe(5, 0.06, accepted=4, nodes=7, regime=greedy)
        costs.observe(5, 0.06, accepted=0, nodes=7, regime=sampled)
    assert costs.acceptance(greedy)[1] > 0.8 and costs.acceptance(sampled)[1] < 0.2
    assert 0.3 < costs.acceptance("rejection t0.3 p1.0")[1] < 0.7  # unseen: every regime's
    assert costs.tree_tokens(greedy) > 4.5 and costs.tree_tokens(sampled) < 1.5
    planners = {regime: KPlanner(8, costs, costs.acceptance(regime), regime=regime) for regime in (greedy, sampled)}
    assert planners[greedy].expected_tokens(4) > 3.5 and planners[sampled].expected_tokens(4) < 1.5
    assert planners[greedy].expected_tree_tokens(5) > 4.5 and planners[sampled].expected_tree_tokens(5) < 1.5


def test_the_floor_follows_how_often_drafts_of_each_confidence_were_kept():
    """Before any round the drafter's word holds (a draft of confidence c is kept with probability
    c). Where its drafts are kept less often than it says (c squared here, as the coupled rule at
    temperature 0.7 measured about), the confidence a floor of p asks for rises to where they are
    kept that often; a greedy regime that keeps its word keeps its floor; the rates never fall
    with the confidence."""
    import random

    from specdec.sampling import COUPLED, SamplingParams

    costs = RoundCosts(max_k=8)
    sampled = sampling_regime(SamplingParams(0.7, rule=COUPLED))
    assert costs.confidence_for(0.2, sampled) == pytest.approx(0.2) and costs.confidence_for(0.0) == 0.0
    assert costs.confidence_for(1.0) == 1.0
    draw = random.Random(0)
    for _ in range(600):  # rounds of 5 drafts
        confidences = [draw.random() for _ in range(5)]
        for regime, law in ((GREEDY, lambda c: c), (sampled, lambda c: c * c)):
            costs.observe(5, 0.03, accepted=0, regime=regime, confidences=confidences,
                          kept=[draw.random() < law(c) for c in confidences])
    assert costs.confidence_for(0.2) == pytest.approx(0.2, abs=0.06)
    assert costs.confidence_for(0.2, sampled) == pytest.approx(0.2 ** 0.5, abs=0.08)
    rates = costs.calibration(sampled).rates()
    assert rates == sorted(rates) and rates[-1] > 0.8 and rates[2] < 0.05
    planner = KPlanner(8, costs, prior=[0.7] * 9, regime=sampled)
    plan = planner.plan(5)
    wanted = costs.draft_cost() * planner.expected_tokens(plan.k) / costs.wall(plan.k)
    assert plan.min_confidence == pytest.approx(costs.confidence_for(wanted, sampled))
    assert plan.min_confidence > wanted + 0.05  # (the drafter's word would have been `wanted`)


def test_a_floor_is_asked_only_of_drafters_that_cut_by_confidence():
    """Feature drafters leave out drafts greedy and coupled, model drafters greedy; an n-gram
    drafter, or the rejection rule, gets no floor (its rounds then count by the drafts they got)."""
    from coordinator.clients import DraftClient
    from coordinator.decoding import Decoder, ModelLimits
    from coordinator.local_draft import LocalNgramDraft
    from specdec.sampling import COUPLED, REJECTION, SamplingParams

    greedy, coupled, rejection = SamplingParams(), SamplingParams(0.7, rule=COUPLED), SamplingParams(0.7, rule=REJECTION)
    cuts = {}
    for name, draft in (("eagle3", DraftClient(None, "eagle3")), ("model", DraftClient(None, "model")),
                        ("ngram", LocalNgramDraft())):
        decoder = Decoder(None, draft, None, None, ModelLimits(100, 64, frozenset()))
        cuts[name] = [decoder._cuts_drafts(p) for p in (greedy, coupled, rejection)]
    assert cuts == {"eagle3": [True, True, False], "model": [True, False, False], "ngram": [False, False, False]}


def test_min_draft_confidence_is_auto_or_a_number_in_0_1():
    from coordinator.server import confidence_floor
    from specdec.serving import StartupError

    assert confidence_floor("auto") is None and confidence_floor("0.3") == 0.3 and confidence_floor("0") == 0.0
    for bad in ("1.5", "-0.1", "nan", "often"):
        with pytest.raises(StartupError, match="min-draft-confidence"):
            confidence_floor(bad)


def test_a_rounds_kept_drafts_are_its_path_or_its_chains_first_accepted():
    from specdec.sampling import Verdict

    chain = Round(10, 4, draft=DraftResult([7, 8, 9, 4], None, False, 0.0))
    chain.verdict = Verdict(accepted=2, next_token=5)
    assert chain.kept_drafts() == [True, True, False, False]
    tree = Round(10, 3, 5, draft=DraftResult([7, 8, 9, 4, 6], None, False, 0.0, parents=[-1, 0, -1, 2, 3]))
    tree.verdict = Verdict(accepted=3, next_token=5, path=(2, 3, 4))
    assert tree.kept_drafts() == [False, False, True, True, True]


def test_the_planners_probes_at_k0_grow_apart_while_drafting_does_not_pay_and_come_back_when_it_does():
    """Where no drafting pays, a probe (one draft) every 8th round is a steady cost: each probe
    that leaves k = 0 the best doubles the wait for the next, up to 64 rounds; once drafts are
    kept again the planner drafts, and its probes start again from 8."""
    costs = RoundCosts(max_k=8)
    for k in range(0, 9):
        costs.observe(k, 0.060 + 0.008 * k, accepted=0)
    planner = KPlanner(8, costs, prior=[0.5] * 9)
    for _ in range(30):
        planner.observe(proposed=4, accepted=0)
    chosen = [planner.plan(8)[0] for _ in range(300)]
    probes = [i for i, k in enumerate(chosen) if k]
    assert set(chosen) == {0, 1}
    assert [b - a for a, b in zip(probes, probes[1:])][:4] == [16, 32, 64, 64]  # a probe every 8th: 37
    for _ in range(40):
        planner.observe(proposed=8, accepted=8)
    assert planner.plan(8)[0] > 0
    for _ in range(200):
        planner.observe(proposed=4, accepted=0)
    again = [planner.plan(8)[0] for _ in range(9)]
    assert again.count(1) == 1 and again.index(1) == 7  # the shortest wait again

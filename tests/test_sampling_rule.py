"""The acceptance rule on hand-built distributions, and statistically against the truth."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from specdec.errors import InvalidArgument
from specdec.sampling import (
    SamplingParams,
    Verdict,
    greedy_accept,
    probs_from_logits,
    sample,
    speculative_accept,
    tree_accept,
    tree_depths,
    uniform,
)
from stats import chi_square_pvalue

P = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])


def test_all_accepted_when_target_agrees_and_bonus_comes_from_last_row():
    q = P[:2].clone()
    # p == q: every ratio is 1, so every draft token is kept whatever the uniforms.
    verdict = speculative_accept([0, 1], q, P, [0.999, 0.999], [0.0, 0.0, 0.9])
    assert verdict.accepted == 2
    # u=0.9 on the bonus row [0.2, 0.2, 0.6] (cdf 0.2, 0.4, 1.0) lands on token 2.
    assert verdict.next_token == 2


def test_rejected_when_target_gives_zero_probability():
    p = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    verdict = speculative_accept([0], q, p, [0.0], [0.1, 0.5])
    assert verdict.accepted == 0
    assert verdict.next_token in (1, 2)


def test_residual_is_max_of_p_minus_q_normalized():
    p = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.1, 0.8, 0.1]])
    # Token 1: p/q = 0.375; u=0.5 rejects. Residual max(0, p-q) = [0.4, 0, 0.1] -> [0.8, 0, 0.2].
    picks = Counter(speculative_accept([1], q, p, [0.5], [u / 1000, 0.0]).next_token for u in range(1000))
    assert picks[1] == 0, "a rejected token must not be resampled from the residual"
    assert picks[0] == 800 and picks[2] == 200


def test_acceptance_threshold_is_p_over_q():
    p = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    q = torch.tensor([[0.6, 0.4]])
    assert speculative_accept([0], q, p, [0.49], [0.0, 0.0]).accepted == 1  # 0.49 < 0.3/0.6
    assert speculative_accept([0], q, p, [0.51], [0.0, 0.0]).accepted == 0


def test_point_mass_accepts_with_p_and_resamples_without_the_token():
    p = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
    assert speculative_accept([1], None, p, [0.74], [0.0, 0.5]) == Verdict(1, 2)
    rejected = speculative_accept([1], None, p, [0.76], [0.99, 0.5])
    assert rejected == Verdict(0, 0), "p with token 1 removed leaves only token 0"


def test_stops_at_first_rejection():
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert speculative_accept([1, 1], q, p, [0.0, 0.0], [0.0, 0.0, 0.0]) == Verdict(1, 0)


def test_greedy_rule():
    assert greedy_accept([5, 6, 7], [5, 6, 9, 1]) == Verdict(2, 9)
    assert greedy_accept([5, 6], [5, 6, 8]) == Verdict(2, 8)
    assert greedy_accept([4], [5, 6]) == Verdict(0, 5)
    assert greedy_accept([], [3]) == Verdict(0, 3)


def test_tree_rule_follows_the_targets_choices_from_the_root():
    # Root's children: 5 (node 0), 7 (node 3); node 0's children: 6 (node 1), 8 (node 4); node 1's: 9 (node 2).
    tokens, parents = [5, 6, 9, 7, 8], [-1, 0, 1, -1, 0]
    # The target picks 5 after the root, 8 after node 0, then 2 after node 4 (which has no child).
    choices = [5, 8, 1, 1, 1, 2]
    assert tree_accept(tokens, parents, choices) == Verdict(2, 2, (0, 4))
    assert Verdict(2, 2, (0, 4)).kept(tokens) == [5, 8]
    # The deepest branch, all the way: the bonus is the target's choice after the leaf.
    assert tree_accept(tokens, parents, [5, 6, 9, 4, 0, 0]) == Verdict(3, 4, (0, 1, 2))
    # A second child of the root.
    assert tree_accept(tokens, parents, [7, 0, 0, 0, 3, 0]) == Verdict(1, 3, (3,))
    # No child matches: the target's own token, as the chain rule gives.
    assert tree_accept(tokens, parents, [4, 6, 9, 0, 0, 0]) == Verdict(0, 4, ())
    # A chain is a tree whose nodes each follow the one before: the same verdict as the chain rule.
    drafts, argmax = [5, 6, 7], [5, 6, 9, 1]
    assert tree_accept(drafts, [-1, 0, 1], argmax).kept(drafts) == greedy_accept(drafts, argmax).kept(drafts)


def test_tree_shape_is_checked():
    assert tree_depths([-1, 0, 0, 1, -1]) == [1, 2, 2, 3, 1]
    with pytest.raises(ValueError):
        tree_depths([-1, 2, 0])  # a parent after its child
    with pytest.raises(ValueError):
        tree_depths([-2])
    with pytest.raises(ValueError):
        tree_accept([5, 6], [-1, 0], [5, 6])  # N + 1 choices are needed


def test_uniform_is_a_pure_function_of_its_key():
    assert uniform(7, 10, "accept") == uniform(7, 10, "accept")
    draws = {uniform(7, pos, purpose) for pos in range(50) for purpose in ("accept", "sample", "draft")}
    assert len(draws) == 150
    assert all(0.0 <= u < 1.0 for u in draws)


def test_sample_never_picks_zero_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    assert {sample(probs, i / 100) for i in range(100)} == {1, 3}
    assert sample(probs, 0.9999999999) == 3


def test_processing_top_k_top_p_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    top_k = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert top_k[2] == 0 and top_k[3] == 0 and torch.isclose(top_k.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)  # [0.61, 0.22, 0.14, 0.03]
    top_p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (top_p > 0).tolist() == [True, True, False, False]
    assert torch.allclose(top_p[:2], full[:2] / full[:2].sum())
    cold = probs_from_logits(logits, SamplingParams(temperature=0.25))
    assert cold[0] > full[0]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=-1), SamplingParams(temperature=1, top_p=0.0), SamplingParams(temperature=1, top_p=1.5),
     SamplingParams(temperature=1, top_k=-2), SamplingParams(temperature=float("nan"))],
)
def test_bad_parameters_are_refused(params):
    with pytest.raises(InvalidArgument):
        params.validate()


def _wrong_rule_resamples_from_p(draft_tokens, draft_probs, target_probs, accept_u, sample_u):
    """A plausible bug: on rejection draw from p instead of norm(max(0, p - q))."""
    for i, x in enumerate(draft_tokens):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        if accept_u[i] * q_x < float(target_probs[i, x]):
            continue
        return Verdict(i, sample(target_probs[i], sample_u[i]))
    return Verdict(len(draft_tokens), sample(target_probs[-1], sample_u[-1]))


def _first_token_counts(rule, p, q, trials, point_mass=False):
    """Simulate one round with k=1 and count the first emitted token."""
    rng = random.Random(1234)
    counts = Counter()
    for _ in range(trials):
        if point_mass:
            x, q_arg = 0, None  # the n-gram drafter always proposes token 0
        else:
            x, q_arg = sample(q[0], rng.random()), q
        verdict = rule([x], q_arg, p, [rng.random()], [rng.random(), rng.random()])
        counts[x if verdict.accepted else verdict.next_token] += 1
    return counts


@pytest.mark.parametrize("point_mass", [False, True])
def test_output_has_target_distribution_and_a_wrong_rule_is_caught(point_mass):
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    truth = {i: float(p[0, i]) for i in range(4)}
    right = _first_token_counts(speculative_accept, p, q, 6000, point_mass)
    assert chi_square_pvalue(right, truth) > 1e-3
    wrong = _first_token_counts(_wrong_rule_resamples_from_p, p, q, 6000, point_mass)
    assert chi_square_pvalue(wrong, truth) < 1e-6


def test_coupling_noise_is_strictly_positive_and_finite_at_the_extremes():
    import numpy as np

    from specdec.sampling import coupling_noise, exponentials

    extremes = exponentials(np.array([0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 1], dtype=np.uint32))
    assert np.all(extremes > 0) and np.all(np.isfinite(extremes))
    noise = coupling_noise(seed=3, position=17, vocab=49152)
    assert noise.shape == (49152,) and np.all(noise > 0) and np.all(np.isfinite(noise))
    assert abs(float(noise.mean()) - 1.0) < 0.02  # Exp(1)
    assert np.array_equal(noise, coupling_noise(seed=3, position=17, vocab=49152))  # a pure function
    assert not np.array_equal(noise, coupling_noise(seed=3, position=18, vocab=49152))

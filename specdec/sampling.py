"""Sampling math: logits processing, keyed randomness, and the speculative acceptance rule.

Notation follows Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding") and Chen et al. 2023: the draft model M_q proposes x_1..x_k, x_i ~ q_i; the target
M_p gives p_1..p_{k+1} in one forward pass. Token x_i is kept with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the replacement is drawn from
norm(max(0, p_i - q_i)); if all k are kept, a bonus token is drawn from p_{k+1}. The output then
has exactly the distribution p (after the same logits processing applied to both).

A second, drafter-invariant rule couples draft and target through shared noise (Gumbel-max;
Daliri et al. 2024, "Coupling without communication and drafter-invariant speculative
decoding"): at position t both draw x_t = argmax_v p_t(v) / E_t(v), with E_t(v) ~ Exp(1) a pure
function of (seed, t), which is a draw from p_t (argmax of log p + Gumbel). A draft token is kept
when it equals the target's draw, so the output is the target's own draws, whatever was drafted.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from specdec.errors import InvalidArgument

# Purposes of a random draw; each (seed, position, purpose) names one independent uniform.
DRAFT = "draft"  # the drafter sampling x_i ~ q_i
ACCEPT = "accept"  # the acceptance test of x_i
SAMPLE = "sample"  # the replacement / bonus / target-only token

# Sampling rules (SamplingRule in common.proto).
REJECTION = "rejection"
COUPLED = "coupled"
RULES = (REJECTION, COUPLED)
# Below this, a temperature is treated as greedy (as vLLM does): logits divided by 1e-45 overflow
# float32, and no distribution is left to sample from.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How a next-token distribution is shaped, and which rule decides sampled rounds.
    temperature == 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    rule: str = REJECTION

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def coupled(self) -> bool:
        return self.rule == COUPLED and not self.greedy

    def temperature_times(self, scale: float) -> "SamplingParams":
        """These parameters at `scale` times their temperature (a drafter shaping its own q)."""
        return replace(self, temperature=self.temperature * scale)

    def validate(self) -> "SamplingParams":
        """These parameters checked, with a temperature below MIN_TEMPERATURE made greedy."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.rule not in RULES:
            raise InvalidArgument(f"the sampling rule must be one of {', '.join(RULES)}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidArgument(f"top_p must lie in (0, 1] (1 disables it), got {self.top_p}")
        if not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"seed must be an unsigned 64-bit integer, got {self.seed}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            return replace(self, temperature=0.0)
        return self


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p, then softmax. logits [..., V] -> float32 probs [..., V].

    The single place where distributions are shaped: drafters apply it to q, the target to p,
    so the acceptance test compares like with like.
    """
    if params.greedy:
        raise ValueError("greedy decoding uses argmax, not probabilities")
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Mass strictly before each token; keep tokens whose predecessors sum to < top_p,
        # so the most likely token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


def uniform(seed: int, position: int, purpose: str) -> float:
    """A uniform draw in [0, 1) that is a pure function of (seed, position, purpose).

    A session's seed is drawn once and stored with it, so a session replayed, resumed or
    served by another replica draws the same values at the same positions.
    """
    digest = hashlib.blake2b(f"{seed}:{position}:{purpose}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def sample(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from probs [V] (need not be normalized) with uniform u in [0, 1).

    The CDF is summed in float64 (numpy: a 49k-entry row takes ~0.1 ms, torch's .double()
    several times that), so rounding cannot shift mass between neighbouring tokens.
    """
    row = probs.detach().cpu().numpy()
    cdf = np.cumsum(row, dtype=np.float64)
    total = float(cdf[-1])
    if not total > 0:
        raise ValueError("cannot sample from an all-zero distribution")
    index = int(np.searchsorted(cdf, u * total, side="right"))
    if index >= row.shape[0]:  # u * total rounded up to total: take the last token with mass
        index = int(np.flatnonzero(row > 0)[-1])
    return index


def coupling_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """E_t(v) ~ Exp(1) for every token v, float32 [vocab]: a pure function of (seed, position t).

    Philox keyed by a hash of (seed, t). Computed on the CPU the same way whatever device the
    model runs on, so every replica draws the same noise.
    """
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{position}:coupling".encode(), digest_size=16).digest(), "little")
    return exponentials(np.random.Philox(key=key).random_raw((vocab + 1) // 2).view(np.uint32)[:vocab])


def exponentials(raw: np.ndarray) -> np.ndarray:
    """Exp(1) draws from uint32 words: u = (23 high bits + 1/2) / 2^23 lies strictly inside (0, 1)
    and is exact in float32 (24 bits would round the top value up to 1, and E to 0)."""
    u = ((raw >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-23)
    return -np.log(u)


def coupled_draws(probs: torch.Tensor, seed: int, first_position: int,
                  positions: Sequence[int] | None = None) -> list[int]:
    """The coupled rule's draw at each row: row i (a distribution over the vocabulary, [n, V]) is
    drawn with the noise of position first_position + i (or positions[i], for the rows of a tree
    of drafts): argmax_v p(v) / E(v), a sample of p."""
    rows = probs.detach().float().cpu().numpy()
    if positions is None:
        positions = range(first_position, first_position + len(rows))
    return [int(np.argmax(row / coupling_noise(seed, at, row.shape[-1]))) for at, row in zip(positions, rows)]


@dataclass(frozen=True)
class Verdict:
    """Outcome of one round: `accepted` draft tokens are kept, then `next_token`. For a chain they
    are the first `accepted` drafts; for a tree, the drafts at indices `path` (root to leaf)."""

    accepted: int
    next_token: int
    path: tuple[int, ...] | None = None

    def kept(self, drafts: Sequence[int]) -> list[int]:
        """The draft tokens this verdict keeps, in order."""
        if self.path is None:
            return list(drafts[: self.accepted])
        return [drafts[i] for i in self.path]


def speculative_accept(
    draft_tokens: Sequence[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    accept_uniforms: Sequence[float],
    sample_uniforms: Sequence[float],
) -> Verdict:
    """The rejection-sampling rule (Leviathan et al. 2023, Algorithm 1).

    Args:
        draft_tokens: x_1..x_k, shape [k].
        draft_probs: q_1..q_k, shape [k, V]; row i is the distribution x_{i+1} was drawn from.
            None means each x_i is a point mass (n-gram drafter): q_i(x_i) = 1, so x_i is kept
            with probability p_i(x_i) and a rejection draws from p_i with x_i removed.
        target_probs: p_1..p_{k+1}, shape [k+1, V].
        accept_uniforms: r_1..r_k in [0, 1), one per draft position.
        sample_uniforms: [k+1] uniforms; entry i draws the replacement at position i (or the
            bonus token when i == k).

    Returns:
        Verdict(n, t): keep x_1..x_n, then emit t ~ norm(max(0, p_{n+1} - q_{n+1})) when
        n < k, or t ~ p_{k+1} when every draft token was kept.
    """
    k = len(draft_tokens)
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows for k={k} (need k+1)")
    for i, x in enumerate(draft_tokens):
        p_row = target_probs[i]
        p_x = float(p_row[x])
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        # r < p/q, written without the division so q_x == 0 (impossible draw) rejects.
        if accept_uniforms[i] * q_x < p_x:
            continue
        if draft_probs is None:
            residual = p_row.clone()
            residual[x] = 0.0
        else:
            residual = (p_row - draft_probs[i]).clamp_min(0.0)
        if not float(residual.sum()) > 0:
            # p_i == q_i up to rounding, so rejection had probability ~0: p_i is the limit.
            residual = p_row
        return Verdict(accepted=i, next_token=sample(residual, sample_uniforms[i]))
    return Verdict(accepted=k, next_token=sample(target_probs[k], sample_uniforms[k]))


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node of a tree of drafts (1 for a child of the last committed token).
    parents[i] is node i's parent index, -1 for the root's children; parents come first."""
    depths: list[int] = []
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i}'s parent {parent} is not an earlier node (or -1)")
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def tree_accept(draft_tokens: Sequence[int], parents: Sequence[int], target_choices: Sequence[int]) -> Verdict:
    """The greedy / coupled rule over a tree of drafts (SpecInfer, EAGLE-2): from the root, follow
    the child whose token equals the target's own choice at the current node, while there is one.

    Args:
        draft_tokens: the N tree nodes' tokens, [N], parents before children.
        parents: [N]; node i's parent index, -1 for children of the last committed token.
        target_choices: [N + 1]; entry 0 is the target's choice (argmax, or its coupled draw with
            the noise of that position) after the last committed token, entry i + 1 its choice
            after node i given node i's ancestors.

    Returns:
        Verdict(len(path), t, path): the nodes kept, root to leaf, then t, the target's choice
        after the last of them. Each kept token is the target's own choice given what precedes
        it, so the output is the target's greedy output (or its coupled draws) whatever the tree.
    """
    if len(target_choices) != len(draft_tokens) + 1 or len(parents) != len(draft_tokens):
        raise ValueError(f"{len(target_choices)} target choices and {len(parents)} parents for "
                         f"{len(draft_tokens)} drafts (need N + 1 and N)")
    children: dict[int, dict[int, int]] = {}
    for i, (token, parent) in enumerate(zip(draft_tokens, parents)):
        children.setdefault(parent, {}).setdefault(int(token), i)
    path: list[int] = []
    node = -1
    while (child := children.get(node, {}).get(int(target_choices[node + 1]))) is not None:
        path.append(child)
        node = child
    return Verdict(accepted=len(path), next_token=int(target_choices[node + 1]), path=tuple(path))


def greedy_accept(draft_tokens: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """Greedy rule: keep x_i while it equals the target's argmax, then take the target's argmax.

    target_argmax has k+1 entries; the result is exactly the target's own greedy output.
    """
    if len(target_argmax) != len(draft_tokens) + 1:
        raise ValueError(f"{len(target_argmax)} target argmax ids for k={len(draft_tokens)} (need k+1)")
    for i, x in enumerate(draft_tokens):
        if x != target_argmax[i]:
            return Verdict(accepted=i, next_token=int(target_argmax[i]))
    return Verdict(accepted=len(draft_tokens), next_token=int(target_argmax[-1]))

"""Chi-square goodness of fit, small cells pooled, without scipy."""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Mapping

import torch


def chi_square_pvalue(observed: Counter, expected_probs: Mapping[Hashable, float], min_expected: float = 5.0) -> float:
    """p-value of H0 "observed counts come from expected_probs". Cells whose expected count is
    below min_expected are pooled into one, so the chi-square approximation holds."""
    n = sum(observed.values())
    unknown = set(observed) - set(expected_probs)
    if any(observed[c] for c in unknown):
        return 0.0  # an outcome the true distribution cannot produce
    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for cell, prob in expected_probs.items():
        expected = n * prob
        if expected < min_expected:
            pooled_obs += observed.get(cell, 0)
            pooled_exp += expected
        else:
            cells.append((observed.get(cell, 0), expected))
    if pooled_exp > 0:
        if pooled_exp < 1e-9 and pooled_obs > 0:
            return 0.0
        cells.append((pooled_obs, pooled_exp))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    if dof <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)))


def two_token_law(model, prompt: list[int], params) -> dict[tuple[int, int], float]:
    """{(x1, x2): p(x1) * p(x2 | x1)}: the exact law of a model's first two sampled tokens after
    `prompt` under `params`' processing (temperature, top-k, top-p)."""
    from specdec.sampling import probs_from_logits

    with torch.inference_mode():
        first = probs_from_logits(model(torch.tensor([prompt])).logits[0, -1], params)
        law = {}
        for x1 in range(first.shape[0]):
            if first[x1] > 0:
                second = probs_from_logits(model(torch.tensor([prompt + [x1]])).logits[0, -1], params)
                for x2 in range(second.shape[0]):
                    if second[x2] > 0:
                        law[(x1, x2)] = float(first[x1] * second[x2])
    return law

"""Pure arithmetic of the benchmark: aggregation, ideal speedup, efficiency, percentiles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

# Spec-Bench's columns and the data file's categories that fall in each.
SPEC_BENCH_COLUMNS: dict[str, tuple[str, ...]] = {
    "Multi-turn Conversation": ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"),
    "Translation": ("translation",),
    "Summarization": ("summarization",),
    "Question Answering": ("qa",),
    "Mathematical Reasoning": ("math_reasoning",),
    "Retrieval-aug. Generation": ("rag",),
}


def column_of(category: str) -> str:
    for column, categories in SPEC_BENCH_COLUMNS.items():
        if category in categories:
            return column
    return category  # a custom prompt file's own category


@dataclass
class PromptRun:
    """One prompt under one configuration."""

    question_id: object
    category: str
    tokens: list[int]
    wall_s: float
    rounds: int = 0  # target steps; 0 when unknown (HF peers)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    redis_s: float = 0.0
    network_coordinator_s: float = 0.0
    prefill_tokens: int = 0


@dataclass
class Totals:
    """Sums over a set of PromptRuns, with the derived figures."""

    prompts: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    redis_s: float = 0.0
    network_coordinator_s: float = 0.0
    accepted_per_position: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, runs: Iterable[PromptRun]) -> "Totals":
        totals = cls()
        for run in runs:
            totals.prompts += 1
            totals.tokens += len(run.tokens)
            for name in ("wall_s", "rounds", "draft_tokens", "accepted_tokens", "draft_s", "verify_s", "redis_s",
                         "network_coordinator_s"):
                setattr(totals, name, getattr(totals, name) + getattr(run, name))
            totals.accepted_per_position = _add(totals.accepted_per_position, run.accepted_per_position)
            totals.proposed_per_position = _add(totals.proposed_per_position, run.proposed_per_position)
        return totals

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def mean_accepted_tokens(self) -> float | None:
        """Tokens per target step (1.00 for plain decoding); None when steps were not counted."""
        return self.tokens / self.rounds if self.rounds else None

    @property
    def drafts_per_round(self) -> float | None:
        """Drafts the target verified per round (its rows less one): what a round's verify cost
        grew with; below k where adaptive k or the confidence floor drafted fewer."""
        return self.draft_tokens / self.rounds if self.rounds else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    @property
    def overhead_per_round_ms(self) -> float | None:
        return 1000 * self.network_coordinator_s / self.rounds if self.rounds else None

    def time_split(self) -> dict[str, float]:
        return {"draft_s": self.draft_s, "verify_s": self.verify_s, "redis_s": self.redis_s,
                "network_coordinator_s": self.network_coordinator_s}


def _add(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Leviathan et al. 2023, eq. (1): E[#tokens per step] = (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def ideal_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al. 2023, Theorem 3.8: improvement factor (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)),
    where c is the time of one draft step over one target step."""
    return expected_tokens_per_step(alpha, k) / (k * cost_ratio + 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

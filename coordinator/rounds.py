"""What one round of decoding is made of, apart from the loop that runs them (decoding.py) and
the plan it follows (planning.py): the round itself, whose steps are named so that the next
round's can start before it ends, and the target's features on their way to a feature drafter
(FeatureRelay).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Sequence

import torch

from coordinator.clients import DraftResult, VerifyResult
from specdec.sampling import Verdict


@dataclass
class Round:
    """One round: plan (k) -> propose (drafts) -> verify (the target's choices) -> decide (a
    verdict) -> commit (Redis) -> stream (the client). The decoder overlaps rounds: while round r
    is verified, round r+1 may be proposed on the hypothesis that r keeps all its drafts
    (draft-ahead), and round r's commit and stream run beside round r+1's calls (its Propose when
    it makes one, else its Verify)."""

    committed_len: int  # committed tokens before the round
    k: int  # planned: the drafts' depth
    nodes: int = 0  # planned: drafts as a tree of this many (0: a chain of k)
    min_confidence: float = 0.0  # planned: the drafter leaves out drafts below this confidence
    draft: DraftResult | None = None
    verification: VerifyResult | None = None
    verdict: Verdict | None = None
    new: list[int] = field(default_factory=list)  # tokens the round commits
    finish: str | None = None
    commit: asyncio.Task | None = None
    called_back_at: float | None = None  # perf_counter() when its latest call (Propose, Verify) came back
    chunk: object = None  # what the stream sends once the commit is done

    @property
    def drafts(self) -> list[int]:
        return self.draft.tokens if self.draft else []

    @property
    def parents(self) -> list[int] | None:
        """The drafts' tree (DraftResult.parents), None for a chain."""
        return self.draft.parents if self.draft else None

    @property
    def depth(self) -> int:
        """How many positions the drafts reach: a chain's length, a tree's depth."""
        return self.draft.depth if self.draft else 0

    @property
    def counted_depth(self) -> int:
        """The depth adaptive k counts the round at (KPlanner.observe, RoundCosts.observe): a round
        whose drafter was asked to leave out drafts below a confidence counts as the plan it was, k
        deep (a draft left out is one not kept), so that E(k) / wall(k) compares plans; else the
        drafts' depth."""
        return self.k if self.min_confidence > 0 and self.draft is not None else self.depth

    def kept_drafts(self) -> list[bool]:
        """Per draft, whether the round kept it: on the verdict's path (a tree), or before the
        first rejected one (a chain)."""
        if self.parents is not None:
            path = set(self.verdict.path)
            return [i in path for i in range(len(self.drafts))]
        return [i < self.verdict.accepted for i in range(len(self.drafts))]

    def all_kept(self) -> bool:
        """Every draft was kept (so a draft-ahead proposed after them still follows)."""
        return self.verdict is not None and self.parents is None and self.verdict.accepted == len(self.drafts)


@dataclass
class FeatureRelay:
    """The target's features of committed positions on their way from Verify to the feature
    drafter: those of positions [start, start + held) not yet delivered, and where the next
    Verify should start its features (a drafter that lacks some says from where). Rounds that do
    not draft (k = 0) deliver nothing, so the rows gather over a whole answer: they are kept as the
    rounds' pieces and joined once, when a Propose sends them (joining them every round cost 0.7
    ms a round at 500 positions, and grew with the answer).
    """

    layers: tuple[int, ...]
    start: int = 0
    wanted_from: int | None = None
    held: int = 0  # positions in the pieces
    _pieces: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> torch.Tensor | None:
        """The features not yet delivered, [held, width] from position `start`; None when none."""
        if not self._pieces:
            return None
        if len(self._pieces) > 1:
            self._pieces = [torch.cat(self._pieces)]
        return self._pieces[0]

    def verify_start(self, committed_len: int) -> int:
        """Features from here on: what the drafter lacks, else the first position Verify computes."""
        start = committed_len - 1 if self.wanted_from is None else min(self.wanted_from, committed_len - 1)
        self.wanted_from = None
        return start

    def keep(self, features: torch.Tensor, start: int, committed_len: int, path: Sequence[int] | None = None,
             drafted_at: int = 0) -> None:
        """After a round: keep the rows of positions now committed (all but the newest token's,
        which the target computes next round). After a tree of drafts (whose rows from
        drafted_at on are the drafts', in the tree's order) the kept drafts' rows are on `path`."""
        if path is not None:
            before = max(0, drafted_at - start)
            features = torch.cat([features[:before], features[before:][list(path)]])
        rows = features[: max(0, committed_len - 1 - start)]
        if self._pieces and start == self.start + self.held:
            self._pieces.append(rows)
            self.held += rows.shape[0]
        else:
            self._pieces, self.start, self.held = [rows], start, rows.shape[0]

    def delivered(self, features_from: int | None) -> None:
        if features_from is None:
            self._pieces, self.held = [], 0  # the drafter holds them now
        else:
            self.wanted_from = features_from

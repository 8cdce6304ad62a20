"""Each round's plan (adaptive k): what this coordinator's rounds cost and yield (RoundCosts, by
sampling regime: RoundYields, ConfidenceCalibration), and the planner that chooses a round's k,
whether its drafts are a tree, and the confidence below which the drafter leaves a draft out
(KPlanner, Plan). Plain values in, a Plan out: testable without a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from specdec.sampling import SamplingParams


@dataclass
class DecayedMean:
    """A mean of values whose weight decays by `decay` with each one added."""

    decay: float
    total: float = 0.0  # decayed sum of the values
    weight: float = 0.0  # decayed count

    def add(self, value: float) -> None:
        self.total = self.decay * self.total + value
        self.weight = self.decay * self.weight + 1

    def mean(self) -> float | None:
        return self.total / self.weight if self.weight else None


CONFIDENCE_BINS = 20  # equal bins of the drafter's confidence, [0, 1]
CONFIDENCE_PRIOR = 4.0  # drafts a bin's prior is worth: the drafter's own word (kept as often as it says)
CONFIDENCE_DECAY = 0.999  # per draft observed: about the last thousand drafts count


@dataclass
class ConfidenceCalibration:
    """How often the target kept drafts of each confidence (the drafter's own estimate, its path's
    probability): decayed counts in CONFIDENCE_BINS bins, each smoothed toward its centre. The
    drafter's word need not hold: on Spec-Bench answers (Zen 5 host) greedy drafts were kept about
    as often as their confidence said, but under the coupled rule at temperature 0.7 drafts of 0.4-0.5
    were kept 26% of the time and of 0.2-0.3 8% (bench/results/zen5-stop32/calibration*.json)."""

    kept: list[float] = field(default_factory=lambda: [0.0] * CONFIDENCE_BINS)
    drafted: list[float] = field(default_factory=lambda: [0.0] * CONFIDENCE_BINS)

    def observe(self, confidences: Sequence[float], kept: Sequence[bool]) -> None:
        if not confidences:
            return
        decay = CONFIDENCE_DECAY ** len(confidences)  # (a round's drafts decay the counts together)
        self.kept = [decay * x for x in self.kept]
        self.drafted = [decay * x for x in self.drafted]
        for confidence, was_kept in zip(confidences, kept):
            if confidence >= 1.0:  # a copy of the context (prompt lookup): not the drafter's word
                continue
            b = min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))
            self.kept[b] += was_kept
            self.drafted[b] += 1

    def rates(self) -> list[float]:
        """The share kept per bin, smoothed toward the bin's centre, made non-decreasing (a
        likelier draft is never worth less)."""
        rates, best = [], 0.0
        for b, (kept, drafted) in enumerate(zip(self.kept, self.drafted)):
            centre = (b + 0.5) / CONFIDENCE_BINS
            best = max(best, (kept + centre * CONFIDENCE_PRIOR) / (drafted + CONFIDENCE_PRIOR))
            rates.append(best)
        return rates

    def confidence_for(self, p: float) -> float:
        """The drafter's confidence from which drafts are kept with probability at least p
        (interpolated between bin centres): 0 where every bin's are, 1 where none is."""
        rates = self.rates()
        if p <= rates[0]:
            return 0.0
        for b in range(1, CONFIDENCE_BINS):
            if rates[b] >= p:
                low, high = (b - 0.5) / CONFIDENCE_BINS, (b + 0.5) / CONFIDENCE_BINS
                share = (p - rates[b - 1]) / (rates[b] - rates[b - 1]) if rates[b] > rates[b - 1] else 1.0
                return low + share * (high - low)
        return 1.0


@dataclass
class RoundYields:
    """What rounds yielded: the acceptance per draft position, decayed (index j: the share of
    rounds that kept draft j among those that tried it with drafts 1..j-1 kept), the tokens tree
    rounds yielded, and how often drafts of each confidence were kept."""

    acceptance: list[float]
    tree_yield: DecayedMean = field(default_factory=lambda: DecayedMean(0.98))
    calibration: ConfidenceCalibration = field(default_factory=ConfidenceCalibration)

    def observe(self, k: int, accepted: int, tree: bool) -> None:
        for j in range(1, min(k, accepted + 1) + 1):
            self.acceptance[j] = 0.98 * self.acceptance[j] + 0.02 * (j <= accepted)
        if tree:
            self.tree_yield.add(accepted + 1)


GREEDY = "greedy"
MAX_REGIMES = 32  # sampling regimes whose yields are kept apart (the rest: all regimes')


def sampling_regime(params: SamplingParams) -> str:
    """What a call's acceptance depends on besides its text: greedy, or the rule at a temperature
    and top-p (to a tenth; top-k, rarely set, is left out)."""
    if params.greedy:
        return GREEDY
    return f"{params.rule} t{params.temperature:.1f} p{params.top_p:.1f}"


PLAIN_ROUNDS_TIMED = 2  # rounds at k = 0 among the recent ones from which their own time prices k = 0
TREE_ROUNDS_TIMED = 2  # the same for tree rounds of one size


class RoundCosts:
    """What this coordinator's rounds cost and yield, shared by its sessions.

    The wall time of a chain round by k: wall(k) = a + b k, least squares over the recent chain
    rounds of every session; rounds at k = 0 and tree rounds of each size are timed on their own
    (tree_wall). A tree costs what its nodes cost, not its depth, and rows cost differently per
    host (a verify of 8 rows 1.8x one row on an AVX2 CPU, about one row's cost on a GPU), so a
    line through chains and trees together would price neither. Under load that line misses what matters:
    a session's own drafts add little to a pass of 16 sessions, but when every session drafts k
    more tokens the pass computes 16 k more positions. So the target's batches are watched too
    (sessions B and positions per pass, against its compute time: c seconds a position), and
    every session prices k as if all moved to it together (the symmetric choice that maximises
    the tier's throughput): wall(k) + (B - 1) c (k - the k the line was measured at).
    Also kept: what rounds yield (the acceptance per draft position and the tokens a tree round
    yields) in all sessions of each sampling regime (sampling_regime), a new session's priors.
    By regime because it is most of what acceptance depends on: greedy's first draft was kept
    about 0.6 of the time where temperature 0.7's was 0.5, and a server that serves both would
    otherwise give each the other's priors. A regime not yet seen starts from all regimes'."""

    def __init__(self, max_k: int, window: int = 64, prior_slope: float = 0.02, prior_acceptance: float = 0.5):
        self.window = window
        self.prior_slope = prior_slope  # per draft token, as a share of a round, until measured
        self._points: list[tuple[int, int, float]] = []  # (k, tree nodes or 0, wall)
        self._drafted: list[tuple[int, float]] = []  # (drafts, wall) of rounds that called Propose
        self._passes: list[tuple[int, int, float]] = []  # the target's (sessions, positions, compute)
        self._pooled = RoundYields([prior_acceptance] * (max_k + 1))  # every regime's rounds
        self._yields: dict[str, RoundYields] = {}  # by regime, the most recently seen last

    def observe(self, k: int, wall_s: float | None, accepted: int, batch_sessions: int = 1, batch_rows: int = 0,
                compute_s: float = 0.0, nodes: int = 0, drafts: int | None = None, regime: str = GREEDY,
                confidences: Sequence[float] = (), kept: Sequence[bool] = ()) -> None:
        """A round's drafts (depth k; a tree of `nodes` when not 0), wall time (None for a round
        that also prefilled a turn, whose time says nothing about k), how many drafts it kept, and
        the target pass that verified it; `drafts`, how many it verified, where it called Propose;
        `regime`, its call's sampling (sampling_regime); `confidences`, the drafter's per draft
        (DraftResult.confidences), and `kept`, which of them the target kept (Round.kept_drafts)."""
        if wall_s is not None:
            self._points = (self._points + [(k, nodes, wall_s)])[-self.window:]
            if drafts is not None:
                self._drafted = (self._drafted + [(drafts, wall_s)])[-self.window:]
            if batch_rows:
                self._passes = (self._passes + [(batch_sessions, batch_rows, compute_s)])[-self.window:]
        yields = self._yields.pop(regime, None) or RoundYields(list(self._pooled.acceptance))
        self._yields[regime] = yields
        if len(self._yields) > MAX_REGIMES:
            del self._yields[next(iter(self._yields))]  # the regime seen longest ago
        for seen in (yields, self._pooled):
            seen.observe(k, accepted, tree=bool(nodes))
        yields.calibration.observe(confidences, kept)

    def calibration(self, regime: str = GREEDY) -> ConfidenceCalibration:
        """How often the regime's drafts of each confidence were kept (a fresh one, the drafter's
        word, before any round of the regime)."""
        yields = self._yields.get(regime)
        return yields.calibration if yields is not None else ConfidenceCalibration()

    def confidence_for(self, p: float, regime: str = GREEDY) -> float:
        """The drafter's confidence from which the regime's drafts are kept with probability at
        least p (ConfidenceCalibration)."""
        return self.calibration(regime).confidence_for(p)

    def acceptance(self, regime: str = GREEDY) -> list[float]:
        """The acceptance per draft position (index j: draft j kept when drafts 1..j-1 were) in
        the regime's rounds of every session; all regimes' before it has any."""
        return list(self._yields.get(regime, self._pooled).acceptance)

    def tree_tokens(self, regime: str = GREEDY) -> float | None:
        """Tokens a tree round yields in the regime (a decayed mean over every session's; all
        regimes' before it has any), None before any."""
        yields = self._yields.get(regime)
        mean = yields.tree_yield.mean() if yields is not None else None
        return mean if mean is not None else self._pooled.tree_yield.mean()

    def load(self) -> tuple[float, float]:
        """(B, c): sessions in the target's recent passes (median) and the compute one more
        position adds to a pass (seconds, a least-squares slope; 0 until positions vary)."""
        if not self._passes:
            return 1.0, 0.0
        sessions = sorted(b for b, _, _ in self._passes)[len(self._passes) // 2]
        return float(sessions), _slope([(rows, compute) for _, rows, compute in self._passes])

    def wall(self, k: int) -> float:
        """A chain round's expected wall time at k (see walls)."""
        return self.walls(k)[k]

    def walls(self, ceiling: int) -> list[float]:
        """Expected wall times of a chain round at k = 0..ceiling, every session of a loaded
        target drafting k; the fits are made once for all k. Rounds at k = 0 are timed on their own
        when the target runs them alone: they skip the Propose call, and their one-token step may
        use another, cheaper kernel than a verify of k + 1 tokens (without batch invariance),
        which a line through k > 0 would not show."""
        sessions, per_row = self.load()
        line, mean_x = self._line()
        walls = [max(1e-6, line(k) + (sessions - 1) * per_row * (k - mean_x)) for k in range(ceiling + 1)]
        plain = self._timed_plain_rounds(sessions)
        if plain:
            walls[0] = max(1e-6, _median(plain))
        return walls

    def draft_cost(self) -> float:
        """What one more draft adds to a round's wall time (seconds): the least-squares slope of the
        recent drafting rounds' walls over how many drafts each verified (chains and trees alike: a
        draft is a row more to verify and a node more to draft), every session of a loaded target
        drafting it (see walls); until the rounds' drafts vary, the chain line's."""
        sessions, per_row = self.load()
        if len({drafts for drafts, _ in self._drafted}) > 1:
            slope = _slope(self._drafted)
        else:
            line, mean_x = self._line()
            slope = max(0.0, line(mean_x + 1) - line(mean_x))
        return slope + (sessions - 1) * per_row

    def tree_wall(self, nodes: int) -> float:
        """A tree round's expected wall time: the recent tree rounds of that size, when enough are
        timed; else the chain line at k = nodes (it verifies as many drafts)."""
        timed = [wall for _, size, wall in self._points if size == nodes]
        if len(timed) >= TREE_ROUNDS_TIMED:
            return max(1e-6, _median(timed))
        return max(1e-6, self._line()[0](nodes))

    def _line(self):
        """The chain rounds' least-squares line, wall(k) (a function), and the mean k it went
        through; before any chain round, through whatever rounds there are."""
        chains = [(k, wall) for k, nodes, wall in self._points if k > 0 and not nodes]
        points = chains or [(nodes or k, wall) for k, nodes, wall in self._points]
        if points:
            mean_x, mean_y = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
            slope = _slope(points) if any(x != mean_x for x, _ in points) else self.prior_slope * mean_y
        else:
            mean_x, mean_y, slope = 0.0, 1.0, self.prior_slope
        return (lambda k: max(1e-6, mean_y + slope * (k - mean_x))), mean_x

    def wants_plain_round(self) -> bool:
        """Whether a round at k = 0 would be timed for walls(k)[0] (the target not shared) and too
        few recent ones are, so that k = 0 is priced off the drafting rounds' line."""
        sessions = self.load()[0]
        return sessions <= 1 and not self._timed_plain_rounds(sessions)

    def _timed_plain_rounds(self, sessions: float) -> list[float]:
        """The recent rounds at k = 0 whose walls price k = 0: enough of them, the target alone."""
        plain = [wall for k, _, wall in self._points if k == 0]
        return plain if len(plain) >= PLAIN_ROUNDS_TIMED and sessions <= 1 else []


def _median(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x, at least 0 (0 when x does not vary)."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return 0.0
    return max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points) / spread)


TREE_PRIOR_GAIN = 1.1  # a tree's tokens a round, until one is measured: this times a chain's at its depth


class Plan(NamedTuple):
    """A round's plan: k drafts deep, a tree of `nodes` (0: a chain), and the confidence below which
    the drafter leaves a draft out (ProposeRequest.min_confidence; 0: every draft)."""

    k: int
    nodes: int = 0
    min_confidence: float = 0.0


class KPlanner:
    """Chooses each round's k, and whether its drafts are a tree, for one call (adaptive k).

    Expected tokens a round yields with a chain of k drafts: E(k) = 1 + sum_{i<=k} prod_{j<=i}
    a_j, where a_j is the measured probability that draft j is kept when drafts 1..j-1 were (this
    session's rounds, smoothed toward what the decoder saw in all sessions). k maximises E(k) /
    wall(k) (RoundCosts), k = 0 included when drafting does not pay; after `probe_every` rounds
    at k = 0 it drafts one token, to notice when drafting pays again, and each probe that leaves
    k = 0 the best doubles the wait for the next (up to `max_probe_every`): where no drafting pays
    (a fast target step, sampled text), a probe every 8th round cost 3-8% of the call. The other way round, while
    the costs hold too few rounds at k = 0 to time one (a round that skips Propose and verifies
    one token; the line through the drafting rounds prices it too high, all the more with
    trees), every `explore_every`-th round takes k = 0, so that a target step cheaper than a
    drafting round's share of tokens is noticed. The request's k is the ceiling.

    Where the round may draft a tree of N nodes (plan's tree_nodes) it is one more choice: as
    deep as the ceiling, worth the tokens tree rounds yielded (this call's, smoothed toward all
    sessions'), priced at what recent tree rounds of that size took (RoundCosts.tree_wall). So the
    planner drafts trees where the target verifies N + 1 rows for little more than one (a GPU, an
    AVX-512 CPU) and chains where rows cost (an AVX2 CPU: 8 rows 1.8x one); while chains win, a
    drafting round now and then is a tree, to notice when trees pay again: after `explore_every`
    drafting rounds, and each explored tree that leaves chains the best doubles the wait (up to
    `max_probe_every`; the Intel host, where trees of 7 never paid: adaptive k 1.07x target-only
    with them on offer, 1.13x with chains only). While the tree wins, every `explore_every`-th is
    the best chain (else chains, never timed, would be priced off the tree's own rounds).

    Within a plan the drafter's own confidence decides round by round (Plan.min_confidence): it
    leaves out the drafts it gives less chance of being kept than they cost (_floor), so a chain
    ends early and a tree holds fewer nodes where it is unsure, and runs to k where it is sure.
    The planner then chooses the plan's ceiling, counting each round as the plan it was
    (Round.counted_depth). Offline, on the target's own answers to Spec-Bench prompts (Zen 5 host),
    chains of 5 cut at 0.1 kept 1.88 tokens a round for 3.2 verified rows, against 2.01 for 6 rows
    uncut (bench/results/zen5-stop32/calibration.py).
    """

    def __init__(self, max_k: int, costs: RoundCosts, prior: Sequence[float], prior_weight: float = 4.0,
                 decay: float = 0.97, probe_every: int = 8, explore_every: int = 16, max_probe_every: int = 64,
                 confidence_floor: float | None = None, regime: str = GREEDY):
        self.max_k = max_k
        self.costs = costs
        self.prior = list(prior) + [prior[-1] if prior else 0.5] * (max_k + 1 - len(prior))
        self.prior_weight, self.decay, self.probe_every = prior_weight, decay, probe_every
        self.max_probe_every = max_probe_every
        self._probe_wait = probe_every  # rounds at k = 0 before the next probe
        self.explore_every = explore_every
        self._since_plain = 0  # rounds drafted since this call last took k = 0
        self._since_tree = 0  # drafting rounds since this call last drafted a tree
        self._tree_wait = explore_every  # chain rounds before the next explored tree
        self._since_chain = 0  # tree rounds since this call last drafted a chain
        self.kept = [0.0] * (max_k + 1)  # decayed counts: draft j kept, when tried with 1..j-1 kept
        self.tried = [0.0] * (max_k + 1)
        self.tree_yield = DecayedMean(decay)  # tokens this call's tree rounds yielded
        self._since_drafting = 0
        self.confidence_floor = confidence_floor  # None: each round's from the costs (_floor)
        self.regime = regime  # the call's sampling (sampling_regime): whose tree yields are its prior

    def acceptance(self, position: int) -> float:
        prior = self.prior[position]
        return (self.kept[position] + prior * self.prior_weight) / (self.tried[position] + self.prior_weight)

    def observe(self, proposed: int, accepted: int, tree: bool = False) -> None:
        """Position j was tried when drafts 1..j-1 all stood, and kept when j <= accepted; a tree
        round (`tree`) also counts for what trees yield."""
        for j in range(1, self.max_k + 1):
            self.kept[j] *= self.decay
            self.tried[j] *= self.decay
        for j in range(1, min(proposed, accepted + 1) + 1):
            self.tried[j] += 1
            self.kept[j] += j <= accepted
        if tree:
            self.tree_yield.add(accepted + 1)

    def expected_tokens(self, k: int) -> float:
        total, chain = 1.0, 1.0
        for j in range(1, k + 1):
            chain *= self.acceptance(j)
            total += chain
        return total

    def expected_tree_tokens(self, depth: int) -> float:
        """Tokens a tree round as deep as `depth` yields: this call's tree rounds, smoothed toward
        all sessions' (or, before any, TREE_PRIOR_GAIN times a chain of that depth)."""
        prior = self.costs.tree_tokens(self.regime)
        if prior is None:
            prior = TREE_PRIOR_GAIN * self.expected_tokens(depth)
        return (self.tree_yield.total + prior * self.prior_weight) / (self.tree_yield.weight + self.prior_weight)

    def choose(self, ceiling: int) -> int:
        """This round's k, chains only (plan without trees)."""
        return self.plan(ceiling).k

    def plan(self, ceiling: int, tree_nodes: int = 0) -> Plan:
        """This round's plan: nodes = tree_nodes to draft a tree of that many, as deep as k; 0 for a
        chain of k. tree_nodes 0: trees are not an option this round."""
        ceiling = min(ceiling, self.max_k)
        tree = tree_nodes > ceiling > 0
        walls = self.costs.walls(ceiling)
        best_k, best_rate = 0, -math.inf
        for k in range(0, ceiling + 1):
            rate = self.expected_tokens(k) / walls[k]
            if rate > best_rate * 1.0001:
                best_k, best_rate = k, rate
        tree_rate = self.expected_tree_tokens(ceiling) / self.costs.tree_wall(tree_nodes) if tree else -math.inf
        if tree_rate > best_rate * 1.0001:
            self._since_drafting = self._since_tree = 0
            self._probe_wait, self._tree_wait = self.probe_every, self.explore_every
            self._since_chain += best_k > 0
            if self._since_chain >= self.explore_every:  # the best chain, now and then, to keep it timed
                self._since_chain = 0
                return self._explored_plain(best_k, 0, best_rate)
            return self._explored_plain(ceiling, tree_nodes, tree_rate)
        if best_k == 0 and ceiling > 0:
            self._since_plain = 0
            self._since_drafting += 1
            if self._since_drafting >= self._probe_wait:
                self._since_drafting = 0
                self._probe_wait = min(2 * self._probe_wait, self.max_probe_every)  # unless it pays
                return Plan(1)  # (every draft: a probe measures the first position's acceptance)
            return Plan(0)
        self._since_drafting = self._since_chain = 0
        self._probe_wait = self.probe_every
        if tree and best_k > 0:
            self._since_tree += 1
            if self._since_tree >= self._tree_wait:
                self._since_tree = 0
                self._tree_wait = min(2 * self._tree_wait, self.max_probe_every)  # unless the tree then wins
                return Plan(ceiling, tree_nodes, self._floor(best_rate))
        return self._explored_plain(best_k, 0, best_rate)

    def _explored_plain(self, k: int, nodes: int, rate: float) -> Plan:
        """The plan of a drafting round (k, nodes) expected to yield `rate` tokens a second, or k =
        0 every explore_every-th one while rounds at k = 0 are not timed."""
        if k > 0 and self.costs.wants_plain_round():
            self._since_plain += 1
            if self._since_plain >= self.explore_every:
                self._since_plain = 0
                return Plan(0)
        return Plan(k, nodes, self._floor(rate) if k > 0 else 0.0)

    def _floor(self, rate: float) -> float:
        """The confidence below which a draft is not worth its verify (Plan.min_confidence): a draft
        the target keeps with probability p adds p tokens to a round for draft_cost() seconds, which
        pays when p / draft_cost() is at least the rate the round yields, so p >= draft_cost() x
        rate (tokens a second), as the drafter's confidence from which its drafts were kept that often
        here (RoundCosts.confidence_for). A fixed floor where one is configured (confidence_floor)."""
        if self.confidence_floor is not None:
            return self.confidence_floor
        return self.costs.confidence_for(min(1.0, max(0.0, self.costs.draft_cost() * rate)), self.regime)


def ceiling_for(k: int, remaining: int, room: int) -> int:
    """A round adds at most k + 1 tokens, and Verify needs committed + k within the context."""
    return max(0, min(k, remaining - 1, room - 1))

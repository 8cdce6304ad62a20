"""The feature drafter in the draft service: an EAGLE-3 head (specdec.eagle) drafting from the
target's features that the coordinator relays.

Per session the replica holds the committed tokens, the target's features of committed positions
(as the target sent them) and the head's own KV cache. To draft after c committed tokens it needs
the features of positions up to c - 2 (the target computes position c - 1 in the next Verify):
its cache is extended over the committed positions with the target's features, then each further
draft step feeds the head its own output. A replica that lacks features (a new replica, an
evicted session, a new turn's prompt) proposes nothing and says from which position it needs them
(Proposal.features_from); the coordinator asks the next Verify for them.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from draft_service.drafters import Proposal, ProposeJob
from specdec import cpu_kernels, ggml_blocks
from specdec.cpu_kernels import CpuAttention, CpuKernels, KeyLists, attention_applies
from specdec.ngram import HYBRID_MIN_NGRAM, ngram_lookup
from specdec.eagle import AUTO, BLOCK_TYPES, DRAFT_MATMUL_DTYPE, KIND, EagleDrafter, matmul_type
from specdec.kv_cache import FeatureBuffer, KVShape, SessionCache, SessionKV, common_prefix_len
from specdec.sampling import DRAFT, SamplingParams, coupling_noise, probs_from_logits, sample, uniform

log = logging.getLogger(__name__)

# A tree's shape (EAGLE-2's): nodes expanded per depth, and children drafted per expanded node (its top-k).
# Expanded per depth by default: 1 on CPU, where the head's 2- and 4-row steps cost 1.5x a 1-row one
# (bench/tree_shapes.py: 98% of the tokens of 4 at a chain's drafting time), 4 on CUDA.
TREE_EXPAND_CPU, TREE_EXPAND_CUDA = 1, 4
TREE_CHILDREN = 4
NOISE_CACHE_POSITIONS = 256  # (seed, position)s whose draft-vocabulary noise the drafter keeps
# The most committed positions the head takes in at once (FeatureDrafter.max_catch_up). On Spec-Bench
# answers the head kept as many tokens a round with 128, 256 or 512 as with all (2.427, 2.427, 2.423
# against 2.425: it reads little from far back), and a 1,187-token prompt is taken in in 30 ms
# instead of 131 (Zen 4 host).
MAX_CATCH_UP = 256


class FeatureDrafter:
    kind = KIND
    runs_inline = False

    def __init__(self, head: EagleDrafter, embeddings: torch.Tensor, hybrid_ngram: int = HYBRID_MIN_NGRAM,
                 tree_expand: int = 0, tree_children: int = TREE_CHILDREN, attention: CpuAttention | None = None,
                 max_catch_up: int = MAX_CATCH_UP):
        self.head = head
        # A session further behind than this many committed positions (a long prompt, a new
        # replica, drafting resumed after many rounds without) restarts the head's cache this many
        # positions back: it takes in only those, and attends to nothing before them. 0: all.
        self.max_catch_up = max_catch_up
        # Drafting on a CPU: the runner's C attention, each row over its own key slots (a node over
        # the committed positions, its ancestors and itself) instead of torch's over a mask of all
        # of them, whose building and dispatch cost more than the arithmetic. None: torch's.
        self.attention = attention
        default_expand = TREE_EXPAND_CUDA if embeddings.device.type == "cuda" else TREE_EXPAND_CPU
        # Trees' shape (_draft_trees); tree_expand 0: the device's default.
        self.tree_expand, self.tree_children = tree_expand or default_expand, tree_children
        # Hybrid: where the context repeats its last `hybrid_ngram` tokens, propose what followed
        # them (prompt lookup): instead of the head's chain, or as a tree's leading branch. 0 = never.
        self.hybrid_ngram = hybrid_ngram
        self.config = head.config
        self.embeddings = embeddings  # the target's input embedding table [vocab, hidden], frozen
        self.device = embeddings.device
        self.feature_layers = tuple(self.config.feature_layers)
        self.feature_width = len(self.feature_layers) * self.config.hidden_size
        self.kv_shape = KVShape(1, self.config.num_key_value_heads, self.config.head_dim, torch.float32, self.device)
        d2t = head.d2t
        self.d2t = d2t
        self.d2t_list = d2t.tolist()
        self.d2t_cpu = d2t.cpu()
        # A round drafts positions the round before drafted too (it keeps fewer than k): the noise
        # of recent (seed, position)s is kept, 32 KB each (0.3 ms to draw a 49k vocabulary's).
        self._draft_noise = functools.lru_cache(maxsize=NOISE_CACHE_POSITIONS)(self._draft_noise_uncached)
        self.temperature_scale = self.config.temperature_scale
        if not self.temperature_scale > 0:
            raise ValueError(f"the drafter's temperature_scale must be > 0, got {self.temperature_scale}")

    @classmethod
    def load(cls, folder: str, target: str = "", device: str = "cpu", hybrid_ngram: int = HYBRID_MIN_NGRAM,
             tree_expand: int = 0, tree_children: int = TREE_CHILDREN,
             matmul_dtype: str = DRAFT_MATMUL_DTYPE, cpu_kernels: str = "auto",
             max_catch_up: int = MAX_CATCH_UP, embeddings: torch.Tensor | None = None) -> "FeatureDrafter":
        """The head in `folder`, reading the embeddings of `target` (default: the model it was
        trained for; or `embeddings`, the table itself, where the caller holds the target), its
        matrix products in `matmul_dtype` (EagleDrafter.with_matmul_dtype), on a CPU the narrow
        ones, the norms and the rotary embedding in C per `cpu_kernels` (drafting_products)."""
        from specdec import models

        matmul_dtype, kernels = drafting_products(cpu_kernels, device, matmul_dtype)
        dtype = matmul_type(matmul_dtype)
        head = (EagleDrafter.load(Path(folder), device=device)
                .with_matmul_dtype(dtype, kernels.linear if kernels is not None else None)
                .with_small_steps(kernels.layer if kernels is not None else None))
        c = head.config
        attends = kernels is not None and attention_applies(
            torch.float32, torch.device(device), c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        if embeddings is None:
            embeddings = models.load_model(target or c.target, device=device).get_input_embeddings().weight
        return cls(head, embeddings.detach().float(), hybrid_ngram, tree_expand,
                   tree_children, kernels.attention if attends else None, max_catch_up)

    def _lookup(self, job: ProposeJob) -> list[int]:
        """The hybrid's n-gram proposal, if the context repeats a long enough suffix (never for the
        rejection rule, whose q the point masses would not fit). A chain proposes it instead of the
        head's guess; a tree takes it as its leading branch beside the head's (graft_chain)."""
        if not self.hybrid_ngram or (not job.params.greedy and not job.params.coupled):
            return []
        return ngram_lookup(job.sequence, job.k, max_ngram=max(self.hybrid_ngram, 8), min_ngram=self.hybrid_ngram)

    # --- one session's state --------------------------------------------------------------

    def catch_up_start(self, held: int, committed_len: int) -> int | None:
        """Where the head's cache restarts for a session whose cache holds `held` positions and
        `committed_len` are committed: max_catch_up positions back when it is further behind than
        that; None: it carries on from `held`."""
        behind = self.max_catch_up and committed_len - held > self.max_catch_up
        return committed_len - self.max_catch_up if behind else None

    def needs_features_from(self, held: int, committed_len: int) -> int:
        """The first position whose target features the head takes in next: where its cache
        (re)starts, its last position run again."""
        restart = self.catch_up_start(held, committed_len)
        return max(0, (held if restart is None else restart) - 1)

    def _prepare(self, job: ProposeJob) -> int | None:
        """Crop what the session holds to the committed tokens, take in the features sent. Returns
        None when it can draft, else the position from which it needs features."""
        entry, committed = job.entry, list(job.committed)
        common = common_prefix_len(entry.tokens, committed)
        if entry.kv is None:
            entry.kv = SessionKV(self.kv_shape, len(committed) + job.k + 1)
        if entry.features is None:
            entry.features = FeatureBuffer(self.feature_layers, self.feature_width, self.device, len(committed))
        # Drafting starts from the head's output at the last committed position: run it again
        # when the cache already holds it (the same Propose a second time).
        entry.kv.crop(min(entry.kv.length, common, max(0, len(committed) - 1)))
        entry.features.crop(common)
        entry.tokens = committed
        restart = self.catch_up_start(entry.kv.length, len(committed))
        if restart is not None:
            entry.kv.restart(restart)
        need = max(0, entry.kv.length - 1)
        if job.features is not None and job.features.shape[0]:
            rows, start = job.features, job.features_start
            end = min(start + rows.shape[0], len(committed))
            # What the buffer holds carried on, or after a gap a stretch from no later than needed.
            first = max(start, entry.features.hi)
            if first < end and (start <= entry.features.hi or start <= need < end):
                entry.features.write(first, rows[first - start : end - start].to(self.device))
        if entry.features.covers(need, len(committed) - 1) or len(committed) <= 1:
            return None
        held = entry.features
        return held.hi if held.lo <= need <= held.hi else need

    def _fused(self, entry: SessionCache, start: int, end: int) -> torch.Tensor:
        """g at positions [start, end) (zeros at position -1), [end - start, hidden]."""
        rows = entry.features.read(max(0, start), end).float()
        if start < 0:
            rows = torch.cat([torch.zeros(1, self.feature_width, device=self.device), rows])
        return self.head.fuse(rows)

    def _layer(self, segments: Sequence[tuple[SessionCache, int, int]], tokens: torch.Tensor,
               previous: torch.Tensor) -> torch.Tensor:
        """Run the head's layer over positions [start, start + n) of each segment's session (entry,
        start, n; its KV extended), the segments' rows concatenated: inputs e(tokens) and the
        previous hidden states, [rows, hidden] each, in one product each; attention session by
        session. Returns h [rows, hidden]."""
        positions = torch.cat([torch.arange(start, start + n, device=self.device) for _, start, n in segments])
        q, k, v = self.head.qkv(self.embeddings[tokens], previous, positions)
        attended, at = [], 0
        for entry, start, n in segments:
            rows = slice(at, at + n)
            keys, values = _written(entry.kv, start, k[:, rows], v[:, rows])
            if self.attention is not None:  # position p over positions [0, p]
                attended.append(self._attend_in_c(entry.kv, q[:, rows], list(range(start + 1, start + n + 1)),
                                                  [[] for _ in range(n)]))
            else:
                allowed = torch.arange(entry.kv.start, start + n, device=self.device)[None, :] <= positions[rows, None]
                attended.append(F.scaled_dot_product_attention(q[None, :, rows], keys[None], values[None],
                                                               attn_mask=allowed, enable_gqa=True)[0])
            at += n
        return self.head.finish(previous, torch.cat(attended, dim=1))

    def _attend_in_c(self, kv: SessionKV, q: torch.Tensor, prefix: list[int], extra: list[list[int]]) -> torch.Tensor:
        """The C attention of queries q [heads, n, dim] over the head's cache: row r over positions
        [kv.start, prefix[r]), then the positions extra[r]. Returns [heads, n, dim]."""
        first = kv.start
        lists = KeyLists([p - first for p in prefix], [[p - first for p in row] for row in extra])
        return self.attention.attend(q.transpose(0, 1), kv.keys(0)[:, first:], kv.values(0)[:, first:], lists,
                                     self.config.head_dim ** -0.5).transpose(0, 1)

    # --- drafting --------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, params: SamplingParams, position: int) -> tuple[int, torch.Tensor | None]:
        """A draft token (a target id) from draft-vocabulary logits, and q over the whole
        vocabulary when the rejection rule needs it."""
        if params.greedy:
            return self.d2t_list[int(torch.argmax(logits))], None
        q = self._q(logits, params)
        if params.coupled:  # the target's noise at this position, on the draft vocabulary's ids
            return self.d2t_list[int(torch.argmax(q.cpu() / self._draft_noise(params.seed, position)))], None
        full = torch.zeros(self.config.target_vocab_size, device=q.device)
        full[self.d2t] = q
        return sample(full, uniform(params.seed, position, DRAFT)), full

    def _draft_noise_uncached(self, seed: int, position: int) -> torch.Tensor:
        """The coupled rule's noise E(v) at `position` on the draft vocabulary's ids, [draft_vocab]
        (CPU): what the target's draw there will use."""
        return torch.from_numpy(coupling_noise(seed, position, self.config.target_vocab_size))[self.d2t_cpu]

    def _q(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """The head's q over the draft vocabulary, at the request's temperature times the head's
        temperature_scale (DrafterConfig)."""
        return probs_from_logits(logits, params.temperature_times(self.temperature_scale))

    # --- a tree of drafts (EAGLE-2) ------------------------------------------------------------

    def _confidence(self, logits: torch.Tensor, params: SamplingParams, position: int) -> torch.Tensor:
        """Log-confidence of each draft-vocabulary token as the target's choice at `position`,
        [rows, draft_vocab]: log q when greedy; under the coupled rule log q perturbed by the
        target's own noise at that position (whose argmax is the chain's draft), renormalised."""
        if params.greedy:
            return torch.log_softmax(logits.float(), dim=-1)
        q = self._q(logits, params)
        noise = self._draft_noise(params.seed, position)
        return torch.log_softmax(q.clamp_min(1e-30).log() - noise.log().to(q.device), dim=-1)

    def _chosen_confidence(self, logits: torch.Tensor, params: SamplingParams, position: int) -> float:
        """The confidence (see _confidence) of the draft _choose picks from logits [1, draft_vocab]:
        the likeliest token, greedy, or the likeliest under the target's noise, coupled."""
        return math.exp(float(self._confidence(logits, params, position).max()))

    def _tree_attention(self, tree: _Tree, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        ancestors: list[list[int]]) -> torch.Tensor:
        """Attention of one tree's new nodes (q [heads, n, dim]; k and v [kv_heads, n, dim]): each
        attends to the committed positions, to its ancestors among the nodes already run (their
        indices in tree.expanded, ascending) and to itself. The nodes' keys and values go into the
        session's cache after the committed positions, in the order they were run (so attention
        reads the cache where it is instead of a copy of it each depth; propose_batch crops them
        off). Returns [heads, n, dim]."""
        n, committed, run = q.shape[1], len(tree.job.committed), len(tree.expanded)
        keys, values = _written(tree.job.entry.kv, committed + run, k, v)
        if self.attention is not None:
            extra = [[committed + a for a in lineage] + [committed + run + row] for row, lineage in enumerate(ancestors)]
            return self._attend_in_c(tree.job.entry.kv, q, [committed] * n, extra)
        sees = torch.zeros(n, run, dtype=torch.bool)
        for row, lineage in enumerate(ancestors):
            sees[row, lineage] = True
        held = committed - tree.job.entry.kv.start
        allowed = torch.cat([torch.ones(n, held, dtype=torch.bool, device=self.device), sees.to(self.device),
                             torch.eye(n, dtype=torch.bool, device=self.device)], dim=1)
        return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=allowed,
                                              enable_gqa=True)[0]

    def _score(self, tree: _Tree, logits: torch.Tensor, depth: int) -> list[int]:
        """A depth of one tree: its frontier's likeliest children become candidates (their
        cumulative confidence, the sum of log-confidences along the path); returns the candidates
        to expand next (none at the last depth)."""
        job = tree.job
        confidence = self._confidence(logits, job.params, len(job.committed) - 1 + depth)
        best = confidence.topk(min(self.tree_children, job.tree_nodes, confidence.shape[-1]), dim=-1)
        first_new = len(tree.candidates)
        floor = math.log(job.min_confidence) if job.min_confidence > 0 else -math.inf
        for row, parent in enumerate(tree.frontier):
            base = tree.candidates[parent][0] if parent >= 0 else 0.0
            for score, index in zip(best.values[row].tolist(), best.indices[row].tolist()):
                if base + score >= floor:  # (below it, so are its children: a tree stops there)
                    tree.candidates.append((base + score, depth, self.d2t_list[index], parent))
        if depth == job.k:
            return []
        fresh = range(first_new, len(tree.candidates))
        return sorted(fresh, key=lambda c: -tree.candidates[c][0])[: min(self.tree_expand, job.tree_nodes)]

    def _run_nodes(self, growing: list[tuple[_Tree, list[int]]], depth: int) -> None:
        """The head's layer over the nodes each tree expands at this depth (position committed -
        1 + depth), all trees' rows in one product each, their attention tree by tree."""
        tokens, previous, positions, ancestors = [], [], [], []
        for tree, fresh in growing:
            candidates = tree.candidates
            lineages = []
            for c in fresh:
                lineage, ancestor = [], candidates[c][3]
                while ancestor >= 0:
                    lineage.append(tree.expanded.index(ancestor))
                    ancestor = candidates[ancestor][3]
                lineages.append(sorted(lineage))
            ancestors.append(lineages)
            tokens += [candidates[c][2] for c in fresh]
            previous += [tree.frontier_h[tree.frontier.index(candidates[c][3])] for c in fresh]
            positions += [len(tree.job.committed) - 1 + depth] * len(fresh)
        previous_h = torch.stack(previous)
        q, k, v = self.head.qkv(self.embeddings[torch.tensor(tokens, device=self.device)], previous_h,
                                torch.tensor(positions, device=self.device))
        attended, at = [], 0
        for (tree, fresh), lineages in zip(growing, ancestors):
            rows = slice(at, at + len(fresh))
            attended.append(self._tree_attention(tree, q[:, rows], k[:, rows], v[:, rows], lineages))
            at += len(fresh)
        h, at = self.head.finish(previous_h, torch.cat(attended, dim=1)), 0
        for tree, fresh in growing:
            tree.frontier_h, tree.frontier = h[at : at + len(fresh)], fresh
            tree.expanded += fresh
            at += len(fresh)

    def _draft_trees(self, trees: list[_Tree]) -> list[tuple[list[int], list[int], list[float]]]:
        """EAGLE-2's dynamic tree (Li et al. 2024), for several sessions at once: expand, depth by
        depth, the `tree_expand` nodes of highest cumulative confidence, each with its
        `tree_children` likeliest next tokens; then keep the job.tree_nodes nodes of highest
        cumulative confidence (a node never scores above its parent, so they form a tree), none
        below the job's min_confidence. Every depth runs the head once for all the trees still
        growing. Returns (tokens, parents, confidences) per tree, the drafter's best chain first
        (node i's parent is i - 1), then the rest by depth."""
        for depth in range(1, max(tree.job.k for tree in trees) + 1):
            growing = [tree for tree in trees if depth <= tree.job.k and tree.frontier]
            if not growing:
                break
            logits, at, expanding = self.head.logits(torch.cat([tree.frontier_h for tree in growing])), 0, []
            for tree in growing:
                fresh = self._score(tree, logits[at : at + len(tree.frontier)], depth)
                at += len(tree.frontier)
                if fresh:
                    expanding.append((tree, fresh))
                else:  # none of its new candidates is expanded: the tree stops growing
                    tree.frontier = []
            if expanding:
                self._run_nodes(expanding, depth)
        return [_tree_answer(tree.candidates, tree.job.tree_nodes) for tree in trees]

    @torch.inference_mode()
    def propose_batch(self, jobs: Sequence[ProposeJob]) -> list[Proposal]:
        """Every session's drafts, the head's passes shared: one over all sessions' newly committed
        positions, then one per drafting step (chains) or tree depth (trees) for all of them."""
        proposals = [Proposal([], None, point_mass=False) for _ in jobs]
        ready: list[int] = []
        for i, job in enumerate(jobs):
            missing = self._prepare(job)
            if missing is None:
                ready.append(i)
            else:
                proposals[i].features_from = missing
        # (entry, first new position, count) per ready session: its committed positions not yet in its cache
        segments = [(jobs[i].entry, jobs[i].entry.kv.length, len(jobs[i].committed) - jobs[i].entry.kv.length)
                    for i in ready]
        if ready:
            new_tokens = [t for i, (_, start, _) in zip(ready, segments) for t in jobs[i].committed[start:]]
            fused = torch.cat([self._fused(entry, start - 1, start + n - 1) for entry, start, n in segments])
            h_all = self._layer(segments, torch.tensor(new_tokens, device=self.device), fused)
        active: list[tuple[int, ProposeJob, torch.Tensor]] = []
        trees: list[tuple[int, list[int], _Tree]] = []  # (proposal, prompt lookup's copy, its tree)
        at = 0
        for i, (entry, start, n) in zip(ready, segments):
            job, c = jobs[i], len(jobs[i].committed)
            h = h_all[at + n - 1 : at + n]
            at += n
            for offset, token in enumerate(job.provisional):  # not committed: no features, its own outputs
                h = self._layer([(entry, c + offset, 1)], torch.tensor([token], device=self.device), h)
            copied = self._lookup(job)
            tree = job.tree_nodes > job.k and not job.provisional
            proposals[i].point_mass = bool(copied) and not tree
            proposals[i].reused_tokens, proposals[i].computed_tokens = start, n
            if tree:
                trees.append((i, copied, _Tree(job, h)))
            elif copied:
                proposals[i].tokens, proposals[i].confidences = copied, [1.0] * len(copied)
            else:
                active.append((i, job, h))
                if job.min_confidence > 0 and (job.params.greedy or job.params.coupled):
                    proposals[i].confidences = []  # (the chain's, to cut it: their cost is paid only then)
        if trees:
            for (i, copied, tree), drafted in zip(trees, self._draft_trees([t for _, _, t in trees])):
                proposals[i].tokens, proposals[i].parents, proposals[i].confidences = graft_chain(
                    copied, *drafted, tree.job.tree_nodes)
        rows: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in active}
        for step in range(max((job.k for _, job, _ in active), default=0)):
            logits = self.head.logits(torch.cat([h for _, _, h in active])) if active else None
            still = []
            for row, (i, job, h) in enumerate(active):
                position = len(job.sequence) + step
                token, q = self._choose(logits[row], job.params, position)
                confidences = proposals[i].confidences
                if confidences is not None:
                    confidence = (confidences[-1] if confidences else 1.0) * self._chosen_confidence(
                        logits[row : row + 1], job.params, position)
                    if confidence < job.min_confidence:
                        continue  # the chain ends before a draft not worth its verify
                    confidences.append(confidence)
                proposals[i].tokens.append(token)
                if q is not None:
                    rows[i].append(q)
                if step + 1 < job.k:
                    still.append((i, job, h))
            if still:  # every chain's next step in one pass of the head
                h = self._layer([(job.entry, len(job.sequence) + step, 1) for _, job, _ in still],
                                torch.tensor([proposals[i].tokens[-1] for i, _, _ in still], device=self.device),
                                torch.cat([h for _, _, h in still]))
                still = [(i, job, h[row : row + 1]) for row, (i, job, _) in enumerate(still)]
            active = still
        for job in jobs:  # positions run on the head's own outputs (provisional, drafted) go
            if job.entry.kv is not None:
                job.entry.kv.crop(min(job.entry.kv.length, len(job.committed)))
        for i, drafted in rows.items():
            if drafted:
                proposals[i].probs = torch.stack(drafted)
        return proposals


def drafting_products(setting: str, device: str, matmul_dtype: str) -> tuple[str, CpuKernels | None]:
    """The head's products for drafting on `device`: their dtype (--matmul-dtype; auto: q8_0 where
    the C product reads blocks, else float16) and the C kernels per --cpu-kernels (`setting`),
    loaded once for both: 'auto' where they build and compute that dtype (float32, or float16 and
    the block formats on CPUs that convert float16), 'c' the same or a ValueError, 'torch' never;
    None off a CPU. A block format needs them: only the C product reads blocks (elsewhere the
    rounded weights would be computed on in float32, for no saving), so it is refused without.
    q8_0 drafted the same tokens per step as float16 on Spec-Bench answers for 16% less drafting
    (Zen 3 host; bench/RESULTS.md, "the drafter's weights in GGML blocks")."""
    if setting not in ("c", "torch", "auto"):
        raise ValueError(f"--cpu-kernels must be 'c', 'torch' or 'auto', not {setting!r}")
    on_cpu = setting != "torch" and torch.device(device).type == "cpu"
    kernels = cpu_kernels.load() if on_cpu else None
    if matmul_dtype == AUTO:
        reads_blocks = kernels is not None and kernels.linear.computes(ggml_blocks.Q8_0)
        matmul_dtype = ggml_blocks.Q8_0 if reads_blocks else "float16"
    dtype = matmul_type(matmul_dtype)
    blocks = matmul_dtype in BLOCK_TYPES
    if not on_cpu:
        if blocks:
            raise ValueError(f"--matmul-dtype {matmul_dtype}: only the C product on a CPU reads weights in blocks "
                             "(--cpu-kernels auto or c, --device cpu); use float16 elsewhere")
        return matmul_dtype, None
    if kernels is None or not kernels.linear.computes(dtype):
        if setting == "c" or blocks:
            raise ValueError(f"--cpu-kernels {setting}: the C product did not build here or does not compute "
                             f"{matmul_dtype} on this CPU (float16 and the block formats need AVX-512 or F16C; the "
                             "log says why it did not build); --cpu-kernels auto with float16 or float32 falls "
                             "back to torch's products")
        log.info("the feature drafter's products and small steps: torch's")
        return matmul_dtype, None
    log.info("the feature drafter's products (on %s weights) and small steps: the C kernels", matmul_dtype)
    return matmul_dtype, kernels


def _written(kv: SessionKV, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kv_heads, n, dim] of positions [start, start + n) written into the head's
    one-layer cache (grown as needed), which then ends there; returns the cache's keys and values
    of positions [kv.start, start + n), in place."""
    end = start + keys.shape[1]
    kv.reserve(end)
    kv.keys(0)[:, start:end] = keys
    kv.values(0)[:, start:end] = values
    kv.length = end
    return kv.keys(0)[:, kv.start : end], kv.values(0)[:, kv.start : end]


@dataclass
class _Tree:
    """One session's tree while it is drafted (FeatureDrafter._draft_trees)."""

    job: ProposeJob
    frontier_h: torch.Tensor  # the head's outputs at the frontier's nodes [n, hidden] (at first the root's)
    # Every candidate: (cumulative confidence, depth, token, parent candidate or -1).
    candidates: list[tuple[float, int, int, int]] = field(default_factory=list)
    frontier: list[int] = field(default_factory=lambda: [-1])  # the candidates expanded last (-1: the root)
    # Candidates run through the layer, in the order their keys follow the committed ones in the cache.
    expanded: list[int] = field(default_factory=list)


def _tree_answer(candidates: list[tuple[float, int, int, int]],
                 budget: int) -> tuple[list[int], list[int], list[float]]:
    """The `budget` best candidates ((log-confidence, depth, token, parent) each) as (tokens,
    parents, confidences): the best chain first, then the others by depth. Sorting by confidence,
    then depth, puts every parent before its children, so any prefix of that order is a tree."""
    order = sorted(range(len(candidates)), key=lambda c: (-candidates[c][0], candidates[c][1]))
    kept = set(order[:budget])
    chain, node = [], -1
    while children := [c for c in kept if candidates[c][3] == node]:
        node = max(children, key=lambda c: candidates[c][0])
        chain.append(node)
    rest = sorted(kept - set(chain), key=lambda c: (candidates[c][1], -candidates[c][0]))
    ordered = chain + rest
    index = {c: i for i, c in enumerate(ordered)}
    return ([candidates[c][2] for c in ordered], [index.get(candidates[c][3], -1) for c in ordered],
            [math.exp(candidates[c][0]) for c in ordered])


def graft_chain(chain: list[int], tokens: list[int], parents: list[int], confidences: list[float],
                budget: int) -> tuple[list[int], list[int], list[float]]:
    """A tree of at most `budget` drafts whose leading chain is `chain` (the hybrid's copied
    continuation) and whose other nodes are the head's tree (tokens, parents, confidences; parents
    before children): a head node equal to a chain node under the same parent is that node, the
    rest follow in the head's order (its likeliest first) while the budget lasts, with their
    descendants. Returns (tokens, parents, confidences), a copied node's confidence 1.0 (never
    cut: a copy is proposed where the context repeats itself). An empty chain leaves the head's
    tree as it is."""
    if not chain:
        return tokens, parents, confidences
    merged, merged_parents = list(chain[:budget]), list(range(-1, min(len(chain), budget) - 1))
    merged_confidences = [1.0] * len(merged)
    where: dict[int, int | None] = {}  # head node -> its merged index, None where cut
    for node, (token, parent) in enumerate(zip(tokens, parents)):
        above = where[parent] if parent >= 0 else -1
        if above is None:
            where[node] = None
            continue
        same = next((m for m in range(len(merged)) if merged_parents[m] == above and merged[m] == token), None)
        if same is None and len(merged) < budget:
            merged.append(token)
            merged_parents.append(above)
            merged_confidences.append(confidences[node])
            same = len(merged) - 1
        where[node] = same
    return merged, merged_parents, merged_confidences

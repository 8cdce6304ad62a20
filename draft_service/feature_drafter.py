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

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from draft_service.drafters import Proposal, ProposeJob
from specdec.ngram import HYBRID_MIN_NGRAM, ngram_lookup
from specdec.eagle import DRAFT_MATMUL_DTYPE, KIND, MATMUL_DTYPES, EagleDrafter
from specdec.kv_cache import FeatureBuffer, KVShape, SessionCache, SessionKV, common_prefix_len
from specdec.sampling import DRAFT, SamplingParams, coupling_noise, probs_from_logits, sample, uniform

# A tree's shape (EAGLE-2's): nodes expanded per depth, and children drafted per expanded node (its top-k).
# Expanded per depth by default: 1 on CPU, where the head's 2- and 4-row steps cost 1.5x a 1-row one
# (bench/tree_shapes.py: 98% of the tokens of 4 at a chain's drafting time), 4 on CUDA.
TREE_EXPAND_CPU, TREE_EXPAND_CUDA = 1, 4
TREE_CHILDREN = 4


class FeatureDrafter:
    kind = KIND
    runs_inline = False

    def __init__(self, head: EagleDrafter, embeddings: torch.Tensor, hybrid_ngram: int = HYBRID_MIN_NGRAM,
                 tree_expand: int = 0, tree_children: int = TREE_CHILDREN):
        self.head = head
        default_expand = TREE_EXPAND_CUDA if embeddings.device.type == "cuda" else TREE_EXPAND_CPU
        # Trees' shape (_draft_tree); tree_expand 0: the device's default.
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

    @classmethod
    def load(cls, folder: str, target: str = "", device: str = "cpu", hybrid_ngram: int = HYBRID_MIN_NGRAM,
             tree_expand: int = 0, tree_children: int = TREE_CHILDREN,
             matmul_dtype: str = DRAFT_MATMUL_DTYPE) -> "FeatureDrafter":
        """The head in `folder`, reading the embeddings of `target` (default: the model it was
        trained for), its matrix products in `matmul_dtype` (EagleDrafter.with_matmul_dtype)."""
        from specdec import models

        if matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul dtype {matmul_dtype!r} is not one of {', '.join(MATMUL_DTYPES)}")
        head = EagleDrafter.load(Path(folder), device=device).with_matmul_dtype(getattr(torch, matmul_dtype))
        model = models.load_model(target or head.config.target, device=device)
        return cls(head, model.get_input_embeddings().weight.detach().float(), hybrid_ngram, tree_expand,
                   tree_children)

    def _lookup(self, job: ProposeJob) -> list[int]:
        """The hybrid's n-gram proposal, if the context repeats a long enough suffix (never for the
        rejection rule, whose q the point masses would not fit). A chain proposes it instead of the
        head's guess; a tree takes it as its leading branch beside the head's (graft_chain)."""
        if not self.hybrid_ngram or (not job.params.greedy and not job.params.coupled):
            return []
        return ngram_lookup(job.sequence, job.k, max_ngram=max(self.hybrid_ngram, 8), min_ngram=self.hybrid_ngram)

    # --- one session's state --------------------------------------------------------------

    def _prepare(self, job: ProposeJob) -> int | None:
        """Crop what the session holds to the committed tokens, take in the features sent. Returns
        None when it can draft, else the position from which it needs features."""
        entry, committed = job.entry, list(job.committed)
        common = common_prefix_len(entry.tokens, committed)
        if entry.kv is None:
            entry.kv = SessionKV(self.kv_shape, len(committed) + job.k + 1)
        if entry.features is None:
            entry.features = FeatureBuffer(self.feature_layers, self.feature_width, self.device, len(committed))
        entry.kv.crop(min(entry.kv.length, common))
        entry.features.crop(common)
        entry.tokens = committed
        if job.features is not None and job.features.shape[0]:
            rows, start = job.features, job.features_start
            usable = min(start + rows.shape[0], len(committed)) - max(start, entry.features.hi)
            if start <= entry.features.hi and usable > 0:
                skip = entry.features.hi - start
                entry.features.write(entry.features.hi, rows[skip : skip + usable].to(self.device))
        need = max(0, entry.kv.length - 1)
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

    def _layer(self, entry: SessionCache, tokens: torch.Tensor, previous: torch.Tensor, start: int) -> torch.Tensor:
        """Run the head's layer over positions [start, start + n) of one session (its KV extended):
        inputs e(tokens) and the previous hidden states, [n, hidden] each; returns h [n, hidden]."""
        n = tokens.shape[0]
        positions = torch.arange(start, start + n, device=self.device)
        q, k, v = self.head.qkv(self.embeddings[tokens], previous, positions)
        kv = entry.kv
        kv.reserve(start + n)
        kv.keys(0)[:, start : start + n] = k
        kv.values(0)[:, start : start + n] = v
        kv.length = start + n
        keys, values = kv.keys(0)[:, : start + n], kv.values(0)[:, : start + n]
        allowed = torch.arange(start + n, device=self.device)[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=allowed,
                                                  enable_gqa=True)[0]
        return self.head.finish(previous, attended)

    # --- drafting --------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, params: SamplingParams, position: int) -> tuple[int, torch.Tensor | None]:
        """A draft token (a target id) from draft-vocabulary logits, and q over the whole
        vocabulary when the rejection rule needs it."""
        if params.greedy:
            return self.d2t_list[int(torch.argmax(logits))], None
        q = probs_from_logits(logits, params)
        if params.coupled:  # the target's noise at this position, on the draft vocabulary's ids
            noise = torch.from_numpy(coupling_noise(params.seed, position, self.config.target_vocab_size))
            return self.d2t_list[int(torch.argmax(q.cpu() / noise[self.d2t.cpu()]))], None
        full = torch.zeros(self.config.target_vocab_size, device=q.device)
        full[self.d2t] = q
        return sample(full, uniform(params.seed, position, DRAFT)), full

    # --- a tree of drafts (EAGLE-2) ------------------------------------------------------------

    def _confidence(self, logits: torch.Tensor, params: SamplingParams, position: int) -> torch.Tensor:
        """Log-confidence of each draft-vocabulary token as the target's choice at `position`,
        [rows, draft_vocab]: log q when greedy; under the coupled rule log q perturbed by the
        target's own noise at that position (whose argmax is the chain's draft), renormalised."""
        if params.greedy:
            return torch.log_softmax(logits.float(), dim=-1)
        noise = torch.from_numpy(coupling_noise(params.seed, position, self.config.target_vocab_size))
        q = probs_from_logits(logits, params)
        return torch.log_softmax(q.clamp_min(1e-30).log() - noise[self.d2t.cpu()].log().to(q.device), dim=-1)

    def _tree_layer(self, entry: SessionCache, committed: int, tokens: list[int], previous: torch.Tensor,
                    depth: int, nodes_kv: tuple[torch.Tensor, torch.Tensor] | None,
                    sees: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's layer over tree nodes of one depth (their position committed - 1 + depth):
        each attends to the committed positions and, of the nodes already run (nodes_kv, [kv_heads,
        m, dim] each), to those `sees` marks ([n, m]: its ancestors), and itself. Returns h [n,
        hidden] and the nodes' keys and values."""
        n = len(tokens)
        positions = torch.full((n,), committed - 1 + depth, device=self.device)
        q, k, v = self.head.qkv(self.embeddings[torch.tensor(tokens, device=self.device)], previous, positions)
        keys, values = [entry.kv.keys(0)[:, :committed]], [entry.kv.values(0)[:, :committed]]
        allowed = [torch.ones(n, committed, dtype=torch.bool, device=self.device)]
        if nodes_kv is not None:
            keys.append(nodes_kv[0])
            values.append(nodes_kv[1])
            allowed.append(sees.to(self.device))
        keys.append(k)
        values.append(v)
        allowed.append(torch.eye(n, dtype=torch.bool, device=self.device))
        attended = F.scaled_dot_product_attention(q[None], torch.cat(keys, dim=1)[None], torch.cat(values, dim=1)[None],
                                                  attn_mask=torch.cat(allowed, dim=1), enable_gqa=True)[0]
        return self.head.finish(previous, attended), k, v

    def _draft_tree(self, job: ProposeJob, root_h: torch.Tensor) -> tuple[list[int], list[int]]:
        """EAGLE-2's dynamic tree (Li et al. 2024): expand, depth by depth, the `tree_expand` nodes
        of highest cumulative confidence (sum of log-confidences along the path), each with its
        `tree_children` likeliest next tokens; then keep the job.tree_nodes nodes of highest
        cumulative confidence (a node never scores above its parent, so they form a tree). The
        drafter's best chain comes first in the answer (node i's parent is i - 1), then the rest
        by depth. Returns (tokens, parents)."""
        params, committed = job.params, len(job.committed)
        expand, children = min(self.tree_expand, job.tree_nodes), min(self.tree_children, job.tree_nodes)
        # Every candidate: (cumulative confidence, depth, token, parent candidate or -1).
        candidates: list[tuple[float, int, int, int]] = []
        frontier = [-1]  # candidates expanded at this depth (-1: the root)
        frontier_h = root_h
        expanded: list[int] = []  # candidates run through the layer, in the order of nodes_kv
        nodes_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        for depth in range(1, job.k + 1):
            confidence = self._confidence(self.head.logits(frontier_h), params, committed - 1 + depth)
            best = confidence.topk(min(children, confidence.shape[-1]), dim=-1)
            first_new = len(candidates)
            for row, parent in enumerate(frontier):
                base = candidates[parent][0] if parent >= 0 else 0.0
                for score, index in zip(best.values[row].tolist(), best.indices[row].tolist()):
                    candidates.append((base + score, depth, self.d2t_list[index], parent))
            if depth == job.k:
                break
            fresh = sorted(range(first_new, len(candidates)), key=lambda c: -candidates[c][0])[:expand]
            sees = torch.zeros(len(fresh), len(expanded), dtype=torch.bool)
            for row, c in enumerate(fresh):
                ancestor = candidates[c][3]
                while ancestor >= 0:
                    sees[row, expanded.index(ancestor)] = True
                    ancestor = candidates[ancestor][3]
            previous = torch.cat([frontier_h[frontier.index(candidates[c][3])][None] for c in fresh])
            frontier_h, k, v = self._tree_layer(job.entry, committed, [candidates[c][2] for c in fresh], previous,
                                                depth, nodes_kv, sees)
            nodes_kv = (k, v) if nodes_kv is None else (torch.cat([nodes_kv[0], k], dim=1),
                                                        torch.cat([nodes_kv[1], v], dim=1))
            expanded += fresh
            frontier = fresh
        return _tree_answer(candidates, job.tree_nodes)

    @torch.inference_mode()
    def propose_batch(self, jobs: Sequence[ProposeJob]) -> list[Proposal]:
        proposals: list[Proposal] = []
        active: list[tuple[int, ProposeJob, torch.Tensor]] = []
        for i, job in enumerate(jobs):
            missing = self._prepare(job)
            if missing is not None:
                proposals.append(Proposal([], None, point_mass=False, features_from=missing))
                continue
            entry, c = job.entry, len(job.committed)
            start = entry.kv.length
            tokens = torch.tensor(job.committed[start:c], device=self.device)
            h = self._layer(entry, tokens, self._fused(entry, start - 1, c - 1), start)
            for offset, token in enumerate(job.provisional):  # not committed: no features, its own outputs
                h = self._layer(entry, torch.tensor([token], device=self.device), h[-1:], c + offset)
            copied = self._lookup(job)
            tree = job.tree_nodes > job.k and not job.provisional
            proposals.append(Proposal([], None, point_mass=bool(copied) and not tree, reused_tokens=start,
                                      computed_tokens=c - start))
            if tree:
                tokens, parents = self._draft_tree(job, h[-1:])
                proposals[i].tokens, proposals[i].parents = graft_chain(copied, tokens, parents, job.tree_nodes)
            elif copied:
                proposals[i].tokens = copied
            else:
                active.append((i, job, h[-1:]))
        rows: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in active}
        for step in range(max((job.k for _, job, _ in active), default=0)):
            logits = self.head.logits(torch.cat([h for _, _, h in active])) if active else None
            still = []
            for row, (i, job, h) in enumerate(active):
                token, q = self._choose(logits[row], job.params, len(job.sequence) + step)
                proposals[i].tokens.append(token)
                if q is not None:
                    rows[i].append(q)
                if step + 1 < job.k:
                    still.append((i, job, h))
            for index, (i, job, h) in enumerate(still):
                token = torch.tensor(proposals[i].tokens[-1:], device=self.device)
                still[index] = (i, job, self._layer(job.entry, token, h, len(job.sequence) + step))
            active = still
        for job in jobs:  # positions run on the head's own outputs (provisional, drafted) go
            if job.entry.kv is not None:
                job.entry.kv.crop(min(job.entry.kv.length, len(job.committed)))
        for i, drafted in rows.items():
            if drafted:
                proposals[i].probs = torch.stack(drafted)
        return proposals



def _tree_answer(candidates: list[tuple[float, int, int, int]], budget: int) -> tuple[list[int], list[int]]:
    """The `budget` best candidates ((confidence, depth, token, parent) each) as (tokens, parents):
    the best chain first, then the others by depth. Sorting by confidence, then depth, puts every
    parent before its children, so any prefix of that order is a tree."""
    order = sorted(range(len(candidates)), key=lambda c: (-candidates[c][0], candidates[c][1]))
    kept = set(order[:budget])
    chain, node = [], -1
    while children := [c for c in kept if candidates[c][3] == node]:
        node = max(children, key=lambda c: candidates[c][0])
        chain.append(node)
    rest = sorted(kept - set(chain), key=lambda c: (candidates[c][1], -candidates[c][0]))
    ordered = chain + rest
    index = {c: i for i, c in enumerate(ordered)}
    return [candidates[c][2] for c in ordered], [index.get(candidates[c][3], -1) for c in ordered]


def graft_chain(chain: list[int], tokens: list[int], parents: list[int], budget: int) -> tuple[list[int], list[int]]:
    """A tree of at most `budget` drafts whose leading chain is `chain` (the hybrid's copied
    continuation) and whose other nodes are the head's tree (tokens, parents; parents before
    children): a head node equal to a chain node under the same parent is that node, the rest
    follow in the head's order (its likeliest first) while the budget lasts, with their
    descendants. An empty chain leaves the head's tree as it is."""
    if not chain:
        return tokens, parents
    merged, merged_parents = list(chain[:budget]), list(range(-1, min(len(chain), budget) - 1))
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
            same = len(merged) - 1
        where[node] = same
    return merged, merged_parents

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
from specdec.ngram import ngram_lookup
from specdec.eagle import KIND, EagleDrafter
from specdec.kv_cache import FeatureBuffer, KVShape, SessionCache, SessionKV, common_prefix_len
from specdec.sampling import DRAFT, SamplingParams, coupling_noise, probs_from_logits, sample, uniform


class FeatureDrafter:
    kind = KIND
    runs_inline = False

    def __init__(self, head: EagleDrafter, embeddings: torch.Tensor, hybrid_ngram: int = 0):
        self.head = head
        # Hybrid: where the context repeats its last `hybrid_ngram` tokens, propose what followed
        # them (prompt lookup) instead of the head's guess. 0 = never.
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
    def load(cls, folder: str, target: str = "", device: str = "cpu", hybrid_ngram: int = 0) -> "FeatureDrafter":
        """The head in `folder`, reading the embeddings of `target` (default: the model it was
        trained for)."""
        from specdec import models

        head = EagleDrafter.load(Path(folder), device=device)
        model = models.load_model(target or head.config.target, device=device)
        return cls(head, model.get_input_embeddings().weight.detach().float(), hybrid_ngram)

    def _lookup(self, job: ProposeJob) -> list[int]:
        """The hybrid's n-gram proposal, if the context repeats a long enough suffix (never for the
        rejection rule, whose q the point masses would not fit)."""
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
            proposals.append(Proposal(copied, None, point_mass=bool(copied), reused_tokens=start,
                                      computed_tokens=c - start))
            if not copied:
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


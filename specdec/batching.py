"""Several sessions' forward passes as one: caches aligned by padding, split back after.

Each session i keeps keep_i cached positions and runs n_i new tokens. In the batch, row i is laid
out as [P - keep_i pads | keep_i cached | n_i new | N - n_i pads], with P = max keep_i and
N = max n_i; the attention mask hides the pads and position ids count from keep_i, so every row
computes what it would alone (up to float rounding). Afterwards each session's cache is cut back
out of the batched one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.kv_cache import CausalLMRunner, SessionCache, common_prefix_len


@dataclass
class ForwardJob:
    """One session's part of a batched forward: logits at input positions first..len(tokens)-1."""

    entry: SessionCache
    tokens: Sequence[int]
    first: int


def _layer_tensors(entry: SessionCache, keep: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    if entry.kv is None or keep == 0:
        return None
    return [(layer.keys[..., :keep, :], layer.values[..., :keep, :]) for layer in entry.kv.layers]


@torch.inference_mode()
def batched_logits(runner: CausalLMRunner, jobs: Sequence[ForwardJob]) -> list[tuple[torch.Tensor, int]]:
    """Like CausalLMRunner.logits_from for each job, in one forward pass. Returns, per job,
    (logits [len(tokens) - first, V], reused token count)."""
    from transformers import DynamicCache

    if len(jobs) == 1:
        job = jobs[0]
        return [runner.logits_from(job.entry, job.tokens, job.first)]
    model, device = runner.model, runner.device
    keeps, pasts = [], []
    for job in jobs:
        if not 0 <= job.first < len(job.tokens):
            raise ValueError(f"first={job.first} outside 0..{len(job.tokens) - 1}")
        keep = min(common_prefix_len(job.entry.tokens[: job.entry.kv_len], job.tokens), job.first)
        past = _layer_tensors(job.entry, keep)
        keeps.append(keep if past is not None else 0)
        pasts.append(past)
    news = [list(job.tokens[keep:]) for job, keep in zip(jobs, keeps)]
    batch, pad_past, width = len(jobs), max(keeps), max(len(n) for n in news)

    input_ids = torch.zeros((batch, width), dtype=torch.long, device=device)
    positions = torch.zeros((batch, width), dtype=torch.long, device=device)
    mask = torch.zeros((batch, pad_past + width), dtype=torch.long, device=device)
    for i, (keep, new) in enumerate(zip(keeps, news)):
        input_ids[i, : len(new)] = torch.tensor(new, dtype=torch.long, device=device)
        positions[i] = torch.arange(keep, keep + width, device=device)
        mask[i, pad_past - keep : pad_past + len(new)] = 1

    cache = DynamicCache(config=model.config)
    if pad_past:
        reference = next(p for p in pasts if p is not None)
        for layer, (ref_k, ref_v) in enumerate(reference):
            keys, values = [], []
            for past, keep in zip(pasts, keeps):
                k = ref_k.new_zeros(ref_k.shape[:-2] + (pad_past, ref_k.shape[-1]))
                v = ref_v.new_zeros(ref_v.shape[:-2] + (pad_past, ref_v.shape[-1]))
                if past is not None:
                    k[..., pad_past - keep :, :] = past[layer][0]
                    v[..., pad_past - keep :, :] = past[layer][1]
                keys.append(k)
                values.append(v)
            cache.update(torch.cat(keys), torch.cat(values), layer)

    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    head = model.get_output_embeddings()
    results = []
    for i, (job, keep, new) in enumerate(zip(jobs, keeps, news)):
        rows = len(job.tokens) - job.first
        logits = head(hidden[i, len(new) - rows : len(new)])[:, : runner.vocab_size].float()
        fresh = DynamicCache(config=model.config)
        for layer_index, layer in enumerate(cache.layers):
            span = slice(pad_past - keep, pad_past + len(new))
            fresh.update(layer.keys[i : i + 1, :, span].clone(), layer.values[i : i + 1, :, span].clone(), layer_index)
        job.entry.kv = fresh
        job.entry.tokens = list(job.tokens)
        results.append((logits, keep))
    return results

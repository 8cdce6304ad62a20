"""Acceptance of the two sampling rules on the same positions, without path noise.

    python -m bench.rules --draft /path/to/draft --temperature 0.7
    python -m bench.rules --draft drafters/smollm2-eagle3 --draws 100  # the feature drafter
    python -m bench.rules --draft drafters/smollm2-eagle3 --draws 100 --temperature-scales 0.6,0.8,1

For Spec-Bench prompts (first turn, --limit per category), the target writes --tokens tokens;
at every position the target's p and the drafter's q are computed on the same prefix (after the
same temperature / top-p processing). Then, per position:
  rejection: P(accept) = sum_v min(p(v), q(v))                       (Leviathan et al., exact)
  coupled:   P(accept) = P(argmax p/E = argmax q/E), E ~ Exp(1)      (Monte Carlo, --draws noises)
and for a point-mass drafter (n-gram: it proposes the token that followed the suffix's last
match) both rules accept x with probability p(x). A feature drafter's q is its first draft's at
each position (reading the target's features, as a round's first draft does), processed on its
draft vocabulary and zero elsewhere, as the draft service sends it (at the request's temperature
times the drafter's temperature_scale); --temperature-scales measures other factors on the same
positions and noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.harness import load_prompts
from specdec.ngram import ngram_lookup
from specdec import models
from specdec.config import default_prompts_file
from specdec.eagle import EagleDrafter, is_drafter_folder
from specdec.sampling import SamplingParams, probs_from_logits
from specdec.train_draft import Conversation, TargetView, TrainOptions, batch_tensors


def coupled_agreement(p: np.ndarray, qs: list[np.ndarray], draws: int, rng: np.random.Generator) -> list[float]:
    """Monte Carlo estimate of P(argmax p/E = argmax q/E) over draws of E ~ Exp(1)^V, for each q of
    `qs` on the same draws; only tokens with mass under some distribution can win, so the rest are
    left out."""
    support = np.flatnonzero(np.logical_or.reduce([p > 0, *(q > 0 for q in qs)]))
    noise = rng.exponential(size=(draws, len(support)))
    target = np.argmax(p[support] / noise, axis=1)
    return [float(np.mean(np.argmax(q[support] / noise, axis=1) == target)) for q in qs]


def draft_distributions(target_model, draft: str, vocab: int):
    """q(sequence [1, T], params, scale) -> [T, vocab] for every position: a draft model's, or a
    feature drafter's first draft's (its draft vocabulary mapped back to the target's ids), shaped
    by params at their temperature times `scale` (None: the drafter's own temperature_scale, as
    the draft service shapes it; 1 for a draft model)."""
    if not is_drafter_folder(draft):
        draft_model = models.load_model(draft)
        return lambda sequence, params, scale=None: probs_from_logits(
            draft_model(sequence).logits[0, :, :vocab], params.temperature_times(1.0 if scale is None else scale))
    head = EagleDrafter.load(Path(draft))
    target_view = TargetView(target_model, tuple(head.config.feature_layers), vocab)

    def first_drafts(sequence: torch.Tensor, params: SamplingParams, scale: float | None = None) -> torch.Tensor:
        features, _ = target_view(sequence, torch.ones_like(sequence))
        logits = head.unrolled(target_view.embed(sequence), features, 1)[0][0]  # row t drafts token t + 1
        q = torch.zeros(logits.shape[0], vocab)
        shaped = params.temperature_times(head.config.temperature_scale if scale is None else scale)
        q[:, head.d2t] = probs_from_logits(logits, shaped)
        return q

    return first_drafts


def measure(target: str, draft: str, prompts, tokens: int, params: SamplingParams, draws: int,
            temperature_scales: tuple[float, ...] = ()) -> dict:
    """Both rules' acceptance with the q the draft service sends, and with q at the target's
    temperature times each of `temperature_scales` (`by_temperature_scale`): any q keeps either
    rule exact, so a drafter may shape its logits at a temperature of its own."""
    tokenizer = models.load_tokenizer(target)
    vocab = len(tokenizer)
    target_model = models.load_model(target)
    draft_probs = draft_distributions(target_model, draft, vocab)
    scales = (None, *temperature_scales)
    rng = np.random.default_rng(0)
    rejection, coupled, point_mass = [[] for _ in scales], [[] for _ in scales], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.inference_mode():
            out = target_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=tokens, do_sample=True, temperature=params.temperature,
                                        top_p=params.top_p, top_k=0)
            sequence = out[0].tolist()
            positions = range(len(ids) - 1, len(sequence) - 1)
            p_all = probs_from_logits(target_model(out).logits[0, :, :vocab], params)
            q_alls = [draft_probs(out, params, scale) for scale in scales]
        for t in positions:
            p, qs = p_all[t].double().numpy(), [q_all[t].double().numpy() for q_all in q_alls]
            for tally, q in zip(rejection, qs):
                tally.append(float(np.minimum(p, q).sum()))
            for tally, agreed in zip(coupled, coupled_agreement(p, qs, draws, rng)):
                tally.append(agreed)
            guess = ngram_lookup(sequence[: t + 1], 1)
            if guess:
                point_mass.append(float(p[guess[0]]))
    return {
        "positions": len(rejection[0]),
        "rejection_acceptance": statistics.mean(rejection[0]),
        "coupled_acceptance": statistics.mean(coupled[0]),
        "coupled_over_rejection": statistics.mean(coupled[0]) / statistics.mean(rejection[0]),
        "ngram_acceptance_either_rule": statistics.mean(point_mass) if point_mass else None,
        "ngram_positions": len(point_mass),
        "by_temperature_scale": {str(scale): {"rejection_acceptance": statistics.mean(r),
                                              "coupled_acceptance": statistics.mean(c)}
                                 for scale, r, c in zip(temperature_scales, rejection[1:], coupled[1:])},
    }


# Scales of q's temperature (DrafterConfig.temperature_scale) and request temperatures that
# temperature_calibration measures on conversations the target wrote itself.
TEMPERATURE_SCALES = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
CALIBRATION_TEMPERATURES = (0.4, 0.7, 1.0)


@torch.no_grad()
def temperature_calibration(drafter: EagleDrafter, target: TargetView, conversations: list[Conversation],
                            options: TrainOptions, temperatures: Sequence[float] = CALIBRATION_TEMPERATURES,
                            scales: Sequence[float] = TEMPERATURE_SCALES) -> dict:
    """The rejection rule's acceptance of a round's first draft (first_draft_acceptance) over the
    answer positions of `conversations` (train-draft's data, not Spec-Bench's prompts), for each
    request temperature and scale of q's; `chosen`: the scale with the best mean over the
    temperatures (1.0 without positions). A measure of the first draft only: for the shipped
    drafter its choice (0.75) kept fewer tokens per step in the default pipeline than 1.0
    (bench/RESULTS.md), so nothing applies it by itself."""
    totals = torch.zeros(len(temperatures), len(scales), dtype=torch.float64)
    positions = 0
    for i in range(0, len(conversations), 8):
        ids, attention, mask = batch_tensors(conversations[i : i + 8], options.max_length, options.device)
        features, logits = target(ids, attention)
        draft_logits = drafter.unrolled(target.embed(ids), features, 1)[0][mask].float()
        target_logits = logits[mask]
        del logits
        positions += len(target_logits)
        totals += first_draft_acceptance(target_logits, draft_logits, drafter.d2t, temperatures, scales).sum(-1)
    if not positions:
        return {"chosen": 1.0, "positions": 0, "acceptance": {}}
    acceptance = totals / positions
    return {"chosen": scales[int(acceptance.mean(0).argmax())], "positions": positions,
            "acceptance": {str(t): {str(s): round(float(acceptance[a, b]), 4) for b, s in enumerate(scales)}
                           for a, t in enumerate(temperatures)}}


def first_draft_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor, d2t: torch.Tensor,
                           temperatures: Sequence[float], scales: Sequence[float], rows: int = 256) -> torch.Tensor:
    """[temperatures, scales, N] float64: per position, the rejection rule's chance of keeping a draft
    sampled from q, sum_v min(p(v), q(v)) (Leviathan et al.), with p = softmax(target_logits / T)
    [N, V] and q = softmax(draft_logits / (T * scale)) [N, Vd] on the draft vocabulary (target ids
    d2t [Vd]; q is 0 elsewhere)."""
    out = torch.zeros(len(temperatures), len(scales), len(target_logits), dtype=torch.float64)
    for at in range(0, len(target_logits), rows):  # [rows, V] at a time: the target's vocabulary is wide
        chunk, drafted = target_logits[at : at + rows].float(), draft_logits[at : at + rows].float()
        for a, temperature in enumerate(temperatures):
            p = torch.softmax(chunk / temperature, dim=-1)[:, d2t]
            for b, scale in enumerate(scales):
                q = torch.softmax(drafted / (temperature * scale), dim=-1)
                out[a, b, at : at + rows] = torch.minimum(p, q).sum(-1).double()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--draft", required=True, help="a draft model sharing the target's tokenizer, or a feature drafter's folder")
    parser.add_argument("--prompts", default=str(default_prompts_file()))
    parser.add_argument("--limit", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--temperature-scales", default="",
                        help="comma-separated factors: q is also measured at --temperature times each")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompts = load_prompts(args.prompts, args.limit, ())
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    scales = tuple(float(t) for t in args.temperature_scales.split(",") if t)
    result = measure(args.target, args.draft, prompts, args.tokens, params, args.draws, scales)
    print(json.dumps({"target": args.target, "draft": args.draft, "temperature": args.temperature,
                      "prompts": len(prompts), **result}, indent=1))


if __name__ == "__main__":
    main()

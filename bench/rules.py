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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.harness import load_prompts
from specdec.ngram import ngram_lookup
from specdec import models
from specdec.config import default_prompts_file
from specdec.eagle import EagleDrafter, is_drafter_folder
from specdec.sampling import SamplingParams, probs_from_logits
from specdec.train_draft import TargetView


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
            draft_model(sequence).logits[0, :, :vocab], _scaled(params, 1.0 if scale is None else scale))
    head = EagleDrafter.load(Path(draft))
    target_view = TargetView(target_model, tuple(head.config.feature_layers), vocab)

    def first_drafts(sequence: torch.Tensor, params: SamplingParams, scale: float | None = None) -> torch.Tensor:
        features, _ = target_view(sequence, torch.ones_like(sequence))
        logits = head.unrolled(target_view.embed(sequence), features, 1)[0][0]  # row t drafts token t + 1
        q = torch.zeros(logits.shape[0], vocab)
        shaped = _scaled(params, head.config.temperature_scale if scale is None else scale)
        q[:, head.d2t] = probs_from_logits(logits, shaped)
        return q

    return first_drafts


def _scaled(params: SamplingParams, scale: float) -> SamplingParams:
    return replace(params, temperature=params.temperature * scale)


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

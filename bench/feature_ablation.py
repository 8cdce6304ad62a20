"""Fused target features against one layer alone (issue 10), measured on a CPU budget by changing
what the shipped drafter reads.

    python -m bench.feature_ablation --conversations 200 --steps 100      # make bench-feature-ablation

Two drafters trained from scratch need a GPU to learn more than a first-token guess
(bench/RESULTS.md: eight CPU minutes each taught neither). This asks the question of the drafter
that exists instead. Every variant keeps the shipped drafter's layer and LM head and gets a new
fusion map `fc` (the target's features of the variant's layers -> the 576-wide g the layer reads):

1. the least-squares fit, over every position of the training conversations, of the shipped g
   from the variant's features (with an intercept; for the shipped layers it recovers fc itself,
   a check of the fit; `none` reads no feature: g is the mean);
2. then `--steps` fine-tuning steps of the whole drafter, every variant on the same batches
   (train-draft's loss and training-time test, one target forward per batch for all variants).

After each stage: greedy chains of 5 drafts from every answer position (train-draft's held-out
measure) on held-out conversations the target wrote, and on its greedy answers to Spec-Bench
prompts (the issue's setting: --limit 2, 128 tokens), per category. The data is train-draft's;
OUT/data.pt and OUT/specbench-answers.json are reused when they exist.

The shipped layer was trained on fused features, so this favours fusing: where a single layer
comes close, fusing buys little here; where it falls short, part of the gap is the layer's habit,
which the fine-tuning steps can only partly undo.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.harness import greedy_answers
from specdec import models
from specdec.eagle import EagleDrafter
from specdec.train_draft import (Conversation, TargetView, TrainOptions, acceptance_summary, batch_tensors,
                                 chain_tallies, draft_losses, length_batches, load_conversations,
                                 save_conversations, split_heldout, synthesize)


@dataclass
class Variant:
    name: str
    layers: tuple[int, ...]
    columns: torch.Tensor  # the view's feature columns this variant reads
    drafter: EagleDrafter


def feature_columns(view_layers: tuple[int, ...], layers: tuple[int, ...], hidden: int) -> torch.Tensor:
    """Indices, in a TargetView's features over `view_layers`, of the features of `layers`."""
    return torch.cat([torch.arange(view_layers.index(layer) * hidden, (view_layers.index(layer) + 1) * hidden)
                      for layer in layers]) if layers else torch.zeros(0, dtype=torch.long)


def least_squares_fusion(gram: torch.Tensor, cross: torch.Tensor, ridge: float = 1e-10) -> nn.Linear:
    """The linear map with intercept that best gives y from x in the least-squares sense, from the
    sums gram = [x 1]^T [x 1] ([n + 1, n + 1]) and cross = [x 1]^T y ([n + 1, h]) over the samples.
    Solved on standardised columns (the target's features span nine orders of magnitude in
    variance) with a ridge of `ridge`, so that collinear features stay solvable. Returns
    nn.Linear(n, h) with that weight and bias."""
    n = gram.shape[0] - 1
    scale = gram.diagonal().clamp_min(1e-30).rsqrt()
    standardised = gram * scale[:, None] * scale[None, :] + ridge * torch.eye(n + 1, dtype=gram.dtype)
    solution = scale[:, None] * torch.linalg.solve(standardised, scale[:, None] * cross)  # [n + 1, h]
    fused = nn.Linear(n, cross.shape[1], bias=True)
    with torch.no_grad():
        fused.weight.copy_(solution[:n].T.float())
        fused.bias.copy_(solution[n].float())
    return fused


@torch.no_grad()
def fit_variants(shipped: EagleDrafter, shipped_columns: torch.Tensor, variants: list[Variant], view: TargetView,
                 conversations: list[Conversation], options: TrainOptions) -> dict[str, float]:
    """Each variant's fc := the least-squares map from its features to the shipped drafter's g over
    every position of `conversations`; returns each fit's share of g's variance explained (R^2)."""
    sums = {v.name: (torch.zeros(len(v.columns) + 1, len(v.columns) + 1, dtype=torch.float64),
                     torch.zeros(len(v.columns) + 1, shipped.config.hidden_size, dtype=torch.float64))
            for v in variants}
    target_sum = torch.zeros(shipped.config.hidden_size, dtype=torch.float64)
    target_squares, count = 0.0, 0
    for i in range(0, len(conversations), 8):
        ids, attention, _ = batch_tensors(conversations[i : i + 8], options.max_length, options.device)
        features, _ = view(ids, attention)
        rows = features[attention.bool()]
        g = shipped.fuse(rows[:, shipped_columns]).double()
        target_sum += g.sum(0)
        target_squares += float((g * g).sum())
        count += len(g)
        for v in variants:
            x = torch.cat([rows[:, v.columns].double(), torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
            gram, cross = sums[v.name]
            gram += x.T @ x
            cross += x.T @ g
    total = target_squares - float((target_sum * target_sum).sum()) / count
    explained = {}
    for v in variants:
        gram, cross = sums[v.name]
        v.drafter.fc = least_squares_fusion(gram, cross)
        solution = torch.cat([v.drafter.fc.weight.T, v.drafter.fc.bias[None]]).double()
        residual = target_squares - 2 * float((solution * cross).sum()) + float((solution * (gram @ solution)).sum())
        explained[v.name] = round(1 - residual / total, 4)
    return explained


def fine_tune(variants: list[Variant], view: TargetView, training: list[Conversation], options: TrainOptions,
              steps: int, lr: float, log) -> dict[str, list[float]]:
    """`steps` AdamW steps of every variant's whole drafter on the same batches (warm-up, then
    cosine to a tenth); returns each variant's loss per step."""
    rng = random.Random(options.seed)
    batches = length_batches(training, options.batch_tokens, options.max_length, rng)
    optimizers = {v.name: torch.optim.AdamW(v.drafter.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
                  for v in variants}
    weights = [0.8**j for j in range(options.ttt_steps)]
    losses: dict[str, list[float]] = {v.name: [] for v in variants}
    d2t = variants[0].drafter.d2t
    for step in range(steps):
        ids, attention, mask = batch_tensors([training[i] for i in next(batches)], options.max_length, options.device)
        features, logits = view(ids, attention)
        embeddings = view.embed(ids)
        scale = min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for v in variants:
            v.drafter.train()
            for group in optimizers[v.name].param_groups:
                group["lr"] = lr * scale
            parts = draft_losses(v.drafter, embeddings, features[..., v.columns], logits, mask, options.ttt_steps, d2t)
            loss = sum(w * part for w, part in zip(weights, parts)) / sum(weights)
            optimizers[v.name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(v.drafter.parameters(), 1.0)
            optimizers[v.name].step()
            v.drafter.eval()
            losses[v.name].append(round(loss.item(), 4))
        log(f"step {step + 1}/{steps}: " + " ".join(f"{name} {values[-1]:.3f}" for name, values in losses.items()))
    return losses


@torch.no_grad()
def chain_acceptance(variants: list[Variant], view: TargetView, conversations: list[Conversation],
                     groups: list[str], options: TrainOptions, depth: int = 5) -> dict[str, dict]:
    """Per variant: train-draft's held-out measure (greedy chains of `depth` from every answer
    position) over all `conversations` and per group (`groups[i]` is conversation i's), one target
    forward per batch for all variants."""
    tallies = chain_tallies([(v.drafter, v.columns) for v in variants], view, conversations, options, depth,
                            batch_size=4)
    result = {}
    for v, tally in zip(variants, tallies):
        by_group = {group: acceptance_summary([t for t, g in zip(tally, groups) if g == group], depth)
                    for group in dict.fromkeys(groups)}
        result[v.name] = {**acceptance_summary(tally, depth), "by_group": by_group}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", default="", help="feature drafter folder (default: the one shipped)")
    parser.add_argument("--variants", default="none:;last:30;high:27",
                        help="NAME:LAYERS;... besides the shipped layers ('fused'): the layers each reads")
    parser.add_argument("--out", default="/tmp/feature-ablation", help="data.pt and results.json go here")
    parser.add_argument("--conversations", type=int, default=200, help="conversations the target writes")
    parser.add_argument("--data-minutes", type=float, default=15.0)
    parser.add_argument("--fit-conversations", type=int, default=80, help="training conversations the fit reads")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps (0: the fit alone)")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--ttt-steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=2048, help="tokens of a conversation read (prompt first)")
    parser.add_argument("--limit", type=int, default=2, help="Spec-Bench prompts per category")
    parser.add_argument("--prompts", type=Path, default=None, help="prompts file (default: Spec-Bench's)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    log = lambda text: print(f"[{time.perf_counter() - started:7.1f} s] {text}", flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = TrainOptions(target=args.target, out=out, conversations=args.conversations,
                           data_minutes=args.data_minutes, answer_tokens=192, batch_tokens=args.batch_tokens,
                           ttt_steps=args.ttt_steps, max_length=args.max_length, seed=args.seed, progress=False)
    model, tokenizer = models.load_model(args.target), models.load_tokenizer(args.target)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    shipped = EagleDrafter.load(Path(args.drafter or models.default_drafter(args.target)))
    fused = tuple(shipped.config.feature_layers)
    named = [("fused", fused)] + [(name, tuple(int(x) for x in layers.split(",") if x))
                                  for name, layers in (item.split(":") for item in args.variants.split(";"))]
    view_layers = tuple(sorted({layer for _, layers in named for layer in layers}))
    view = TargetView(model, view_layers, len(tokenizer))
    hidden = shipped.config.hidden_size
    variants = [Variant(name, layers, feature_columns(view_layers, layers, hidden), copy.deepcopy(shipped))
                for name, layers in named]
    as_shipped = Variant("shipped", fused, feature_columns(view_layers, fused, hidden), shipped)

    if (out / "data.pt").is_file():
        conversations, _ = load_conversations(out / "data.pt")
    else:
        begun = time.perf_counter()
        conversations = synthesize(model, tokenizer, options, random.Random(args.seed), lambda _: None)
        save_conversations(out / "data.pt", conversations, time.perf_counter() - begun)
    heldout, training = split_heldout(conversations, 0.1, args.seed)
    heldout = [c for c in heldout if c.greedy] or heldout
    log(f"data: {len(training)} training conversations, {len(heldout)} held out "
        f"({sum(len(c.answer) for c in conversations)} answer tokens)")
    answers = greedy_answers(args.target, model, tokenizer, args.limit, args.max_new_tokens,
                             out / "specbench-answers.json", args.prompts)
    specbench = [Conversation(a.prompt, a.answer, greedy=True) for a in answers]
    categories = [a.category for a in answers]
    log(f"Spec-Bench: {len(specbench)} answers")

    def evaluate(stage: str, evaluated: list[Variant]) -> dict:
        figures = {"heldout": chain_acceptance(evaluated, view, heldout, [c.kind for c in heldout], options),
                   "specbench": chain_acceptance(evaluated, view, specbench, categories, options)}
        for v in evaluated:
            log(f"{stage} {v.name}: held out {_row(figures['heldout'][v.name])}; "
                f"Spec-Bench {_row(figures['specbench'][v.name])}")
        return figures

    results = {"feature_layers": {v.name: list(v.layers) for v in variants}, "training_conversations": len(training),
               "heldout_conversations": len(heldout), "specbench_answers": len(specbench),
               "steps": args.steps, "batch_tokens": args.batch_tokens, "ttt_steps": args.ttt_steps, "lr": args.lr}
    results["shipped"] = evaluate("shipped", [as_shipped])
    results["fit_r2"] = fit_variants(shipped, as_shipped.columns, variants, view, training[: args.fit_conversations],
                                     options)
    log(f"fits: share of g's variance explained {results['fit_r2']}")
    results["after_fit"] = evaluate("fit", variants)
    if args.steps:
        results["losses"] = fine_tune(variants, view, training, options, args.steps, args.lr, log)
        results["after_fine_tuning"] = evaluate("fine-tuned", variants)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {out / 'results.json'}")


def _row(summary: dict) -> str:
    return " ".join(f"{a:.3f}" for a in summary["acceptance_by_position"]) + f" ({summary['tokens_per_step_k5']:.2f})"


if __name__ == "__main__":
    main()

"""How well the feature drafter's confidences (Proposal.confidences) predict which drafts the
target keeps, and what cutting drafts below a confidence floor does to a round: offline, on the
target's own greedy answers to Spec-Bench prompts (bench.tree_shapes' walk), with the target's
verify of n rows timed in process on this host.

    python bench/results/zen5-stop32/calibration.py --limit 1 --max-new-tokens 128 --k 5
    python bench/results/zen5-stop32/calibration.py --limit 1 --max-new-tokens 128 --k 5 --temperature 0.7

With --temperature the answers are the target's own under the coupled rule (seed 0): its draw at
position i is argmax p(v) / E(v) with the noise of (seed, i), which a round's drafts follow when
they equal it, so a walk down the drafts is the same as greedy's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.harness import greedy_answers
from bench.tree_shapes import _walk, kept_path
from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import COUPLED, SamplingParams, coupled_draws, probs_from_logits

FLOORS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)


def kept_under(tokens, parents, confidences, floor):
    """The proposal without the drafts below `floor` (a tree stays a tree: children never score above parents)."""
    keep = [i for i, c in enumerate(confidences) if c >= floor]
    index = {old: new for new, old in enumerate(keep)}
    par = parents if parents is not None else [i - 1 for i in range(len(tokens))]
    return [tokens[i] for i in keep], [index.get(par[i], -1) for i in keep]


def coupled_answer(runner, prompt, max_new_tokens, params):
    """The target's own answer under the coupled rule: at position i, argmax p(v) / E(v)."""
    tokens, entry = list(prompt), SessionCache()
    for _ in range(max_new_tokens):
        logits = runner.forward([ForwardJob(entry, tokens, len(tokens) - 1)])[0].logits[-1:]
        tokens.append(coupled_draws(probs_from_logits(logits, params), params.seed, len(tokens))[0])
    return tokens


def verify_ms(runner, context, rows, repeats=15):
    entry = SessionCache()
    runner.forward([ForwardJob(entry, context, len(context) - 1)])
    times = []
    for _ in range(repeats):
        tokens = context + [17] * (rows - 1)
        started = time.perf_counter()
        runner.forward([ForwardJob(entry, tokens, len(context) - 1)])
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tree-nodes", default="0,7")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: coupled answers at this temperature")
    args = parser.parse_args()
    params = SamplingParams(args.temperature, seed=0, rule=COUPLED) if args.temperature else SamplingParams()
    model = models.load_model("smollm2")
    tokenizer = models.load_tokenizer("smollm2")
    runner = ModelRunner(model, model.config.vocab_size)
    drafter = FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2")
    layers = tuple(drafter.feature_layers)
    answers = []
    for made in greedy_answers("smollm2", model, tokenizer, args.limit, args.max_new_tokens, None, None):
        full = made.prompt + made.answer
        if not params.greedy:
            full = coupled_answer(runner, made.prompt, args.max_new_tokens, params)
        features = runner.forward([ForwardJob(SessionCache(), full, len(full) - 1, layers, 0)])[0].features
        answers.append((made.category, full, len(made.prompt), features))
    context = answers[0][1][:400]
    costs = {rows: round(verify_ms(runner, context, rows), 2) for rows in range(1, 9)}
    out = {"temperature": args.temperature, "verify_ms_by_rows": costs, "shapes": []}
    for nodes in (int(n) for n in args.tree_nodes.split(",")):
        bins = [[0, 0] for _ in range(10)]
        per_floor = {f: {"steps": [], "rows": []} for f in FLOORS}
        times = []
        for category, full, prompt_len, features in answers:
            entry = SessionCache()
            steps = {f: [] for f in FLOORS}
            rows = {f: [] for f in FLOORS}
            for position in range(prompt_len, len(full)):
                job = ProposeJob(entry, full[:position], args.k, params, features[: position - 1], 0, (), nodes,
                                 1e-30)  # (a floor under every draft: a chain's confidences too)
                started = time.perf_counter()
                proposal = drafter.propose_batch([job])[0]
                times.append(time.perf_counter() - started)
                continuation = full[position : position + args.k]
                path = set(kept_path(proposal.tokens, proposal.parents, continuation))
                confidences = proposal.confidences or [1.0] * len(proposal.tokens)
                for i, c in enumerate(confidences):
                    if c < 1.0:
                        bins[min(9, int(c * 10))][0] += i in path
                        bins[min(9, int(c * 10))][1] += 1
                for f in FLOORS:
                    tokens, parents = kept_under(proposal.tokens, proposal.parents, confidences, f)
                    steps[f].append(1 + len(kept_path(tokens, parents, continuation)))
                    rows[f].append(len(tokens) + 1)
            for f in FLOORS:
                for start in _walk(steps[f]):
                    per_floor[f]["steps"].append(steps[f][start])
                    per_floor[f]["rows"].append(rows[f][start])
        floors = []
        for f in FLOORS:
            s, r = per_floor[f]["steps"], per_floor[f]["rows"]
            verify = statistics.mean(costs[x] for x in r)
            floors.append({"floor": f, "tokens_per_round": round(statistics.mean(s), 3),
                           "rows_mean": round(statistics.mean(r), 2), "verify_ms_mean": round(verify, 2),
                           "tokens_per_verify_ms_vs_step": round(statistics.mean(s) / verify * costs[1], 3)})
        out["shapes"].append({"tree_nodes": nodes, "draft_ms_median": round(statistics.median(times) * 1000, 2),
                              "calibration (bin: kept/drafted)": {f"{b / 10:.1f}": f"{k}/{n} = {k / n:.2f}" if n else "-"
                                                                  for b, (k, n) in enumerate(bins)},
                              "floors": floors})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Tree shapes compared offline, in process: tokens per target step and drafting time of the
feature drafter's trees (and chains) on the target's own greedy answers to Spec-Bench prompts.

    python -m bench.tree_shapes --limit 1 --max-new-tokens 64     # make bench-tree-shapes

For every answer position the drafter proposes as it would in a round (committed tokens up to that
position, the target's features of the positions before), and the round keeps the drafts that
follow the target's own continuation down the tree (what `tree_accept` keeps: greedy answers are
the target's choices). A shape is EXPANDxCHILDRENxNODES (nodes expanded per depth, children per
node, drafts kept) or 'chain', all at depth k, with '+ngramN' for the hybrid (prompt lookup's
continuation where the context repeats its last N tokens: a chain replaced by it, a tree grafted
on it) and '+ngram0' for the head alone. Each shape reports tokens per step overall and per
category, and the rows a verify of its proposals scores (drafts + 1). Two means: over every answer
position (`tokens_per_step`), and over the rounds a decode would run, walking each answer from its
start and jumping past what each round keeps (`tokens_per_round`, what the pipeline's stats
measure; lower, since long accepted runs cover many positions but few rounds). What bounds the
head on these prompts is reported beside: P(a round keeps at least j drafts) for j = 1..k (for a
chain, what the drafter's card gives on its held-out data), the share of answer tokens in the
draft vocabulary per category, and the walked rounds that stopped at a token outside it. What the
pipeline pays for a verify of that many rows is in `make bench-tree`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.harness import greedy_answers
from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import MAX_CATCH_UP, FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams, tree_accept, tree_depths


def kept_path(tokens: list[int], parents: list[int] | None, continuation: list[int]) -> tuple[int, ...]:
    """The drafts the round keeps (tree_accept's path, root to leaf) when the target's choices are
    `continuation` (a chain when parents is None): the choice after a draft at depth d is
    continuation[d], -1 past its end."""
    parents = parents if parents is not None else [i - 1 for i in range(len(tokens))]
    choice = lambda depth: continuation[depth] if depth < len(continuation) else -1  # noqa: E731
    return tree_accept(tokens, parents, [choice(0)] + [choice(d) for d in tree_depths(parents)]).path


def off_the_leading_chain(path: tuple[int, ...]) -> int:
    """Kept nodes from the first one off the tree's leading chain (nodes 0, 1, ... in a chain) on:
    the positions a target cache that held the leading chain would compute again next round
    (what ModelRunner.keep_path now saves)."""
    on = next((j for j, node in enumerate(path) if node != j), len(path))
    return len(path) - on


def stopped_outside(kept: int, continuation: list[int], k: int, vocabulary: set[int]) -> bool:
    """Whether a round that kept `kept` drafts stopped short of depth k at a token the head cannot
    propose: the target's choice after them lies outside the draft vocabulary (only a
    prompt-lookup copy could have held it)."""
    return kept < min(k, len(continuation)) and continuation[kept] not in vocabulary


def _walk(per_position: list[int]) -> list[int]:
    """The positions a decode of an answer starts a round at, when a round from position i yields
    per_position[i] tokens."""
    starts, position = [], 0
    while position < len(per_position):
        starts.append(position)
        position += per_position[position]
    return starts


def draft_vocabulary_coverage(answers: list[tuple[str, list[int], int, torch.Tensor]],
                              vocabulary: set[int]) -> dict[str, float]:
    """The share of answer tokens the head can propose (in its draft vocabulary), per category and
    over all answers ("all")."""
    counts: dict[str, list[int]] = {}
    for category, full, prompt_len, _ in answers:
        answer = full[prompt_len:]
        tally = counts.setdefault(category, [0, 0])
        tally[0] += sum(token in vocabulary for token in answer)
        tally[1] += len(answer)
    counts["all"] = [sum(t[0] for t in counts.values()), sum(t[1] for t in counts.values())]
    return {category: round(inside / max(1, total), 3) for category, (inside, total) in counts.items()}


def evaluate(drafter: FeatureDrafter, answers: list[tuple[str, list[int], int, torch.Tensor]], k: int,
             shape: str) -> dict:
    tree, _, hybrid = shape.partition("+ngram")
    expand, children, nodes = (4, 4, 0) if tree == "chain" else (int(x) for x in tree.split("x"))
    drafter.tree_expand, drafter.tree_children = expand, children
    drafter.hybrid_ngram = int(hybrid or 0)
    steps: dict[str, list[int]] = {}
    rows, times, walked, recomputed, stopped = [], [], [], [], []
    vocabulary = set(drafter.d2t_list)
    for category, full, prompt_len, features in answers:
        entry = SessionCache()
        answer_steps = []  # tokens a round from each answer position yields
        answer_off = []  # of those kept drafts, how many lie off the tree's leading chain
        answer_stopped = []  # whether the round stopped at a token outside the draft vocabulary
        for position in range(prompt_len, len(full)):
            committed = full[:position]
            job = ProposeJob(entry, committed, k, SamplingParams(), features[: position - 1], 0, (), nodes)
            started = time.perf_counter()
            proposal = drafter.propose_batch([job])[0]
            times.append(time.perf_counter() - started)
            rows.append(len(proposal.tokens) + 1)
            path = kept_path(proposal.tokens, proposal.parents, full[position : position + k])
            answer_steps.append(1 + len(path))
            answer_off.append(off_the_leading_chain(path))
            answer_stopped.append(stopped_outside(len(path), full[position : position + k], k, vocabulary))
        steps.setdefault(category, []).extend(answer_steps)
        starts = _walk(answer_steps)
        walked.append(len(starts))
        recomputed += [answer_off[start] for start in starts]
        stopped += [answer_stopped[start] for start in starts]
    every = [s for per in steps.values() for s in per]
    return {"shape": shape, "tokens_per_step": round(statistics.mean(every), 3),
            "tokens_per_round": round(sum(len(full) - length for _, full, length, _ in answers) / sum(walked), 3),
            "verify_rows_mean": round(statistics.mean(rows), 2),
            # Walked rounds whose kept path left the leading chain, and the rows a cache holding
            # only that chain would recompute in the next Verify (keep_path saves them).
            "rounds_off_the_leading_chain": round(sum(1 for r in recomputed if r) / len(recomputed), 3),
            "recomputed_rows_per_round": round(statistics.mean(recomputed), 3),
            # Walked rounds that stopped short of k at a token the head's vocabulary lacks.
            "rounds_stopped_outside_draft_vocabulary": round(sum(stopped) / len(stopped), 3),
            # Over every answer position, P(the round keeps at least j drafts), j = 1..k: for a
            # chain the card's held-out "acceptance by position", here on Spec-Bench answers.
            "kept_at_least": [round(sum(s > j for s in every) / len(every), 3) for j in range(1, k + 1)],
            "draft_ms_median": round(statistics.median(times) * 1000, 2), "rounds": len(every),
            "by_category": {c: round(statistics.mean(per), 2) for c, per in steps.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", default="",
                        help="feature drafter folder (default: the one shipped for the target)")
    parser.add_argument("--limit", type=int, default=1, help="prompts per Spec-Bench category")
    parser.add_argument("--prompts", type=Path, default=None, help="prompts file (default: Spec-Bench's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--answers", type=Path, default=None,
                        help="keep the target's answers in this file and reuse them when it holds the same settings")
    parser.add_argument("--matmul-dtypes", default="auto",
                        help="evaluate every shape with the drafter's matrix products in each of these dtypes "
                             "(the draft service's --matmul-dtype; auto, q8_0 on a CPU with the C product, is "
                             "its default)")
    parser.add_argument("--max-catch-ups", default=str(MAX_CATCH_UP),
                        help="evaluate every shape with the drafter's --max-catch-up at each of these (0: all; "
                             "default: the draft service's)")
    parser.add_argument("--shapes", default="chain+ngram0,chain+ngram2,1x4x7+ngram0,1x4x7+ngram1,1x4x7+ngram2,"
                                                "1x4x7+ngram3,4x4x7+ngram0,4x4x7+ngram2,1x4x10+ngram2")
    args = parser.parse_args()
    model = models.load_model(args.target)
    tokenizer = models.load_tokenizer(args.target)
    runner = ModelRunner(model, model.config.vocab_size)
    folder = args.drafter or models.default_drafter(args.target)
    drafters = {dtype: FeatureDrafter.load(folder, target=args.target, matmul_dtype=dtype)
                for dtype in args.matmul_dtypes.split(",")}
    layers = tuple(next(iter(drafters.values())).feature_layers)
    answers = []
    for made in greedy_answers(args.target, model, tokenizer, args.limit, args.max_new_tokens, args.answers,
                               args.prompts):
        full = made.prompt + made.answer
        features = runner.forward([ForwardJob(SessionCache(), full, len(full) - 1, layers, 0)])[0].features
        answers.append((made.category, full, len(made.prompt), features))
    vocabulary = set(next(iter(drafters.values())).d2t_list)
    coverage = draft_vocabulary_coverage(answers, vocabulary)
    results = []
    for shape in args.shapes.split(","):
        for dtype, drafter in drafters.items():
            for limit in (int(x) for x in args.max_catch_ups.split(",")):
                drafter.max_catch_up = limit
                results.append({"matmul_dtype": dtype, "max_catch_up": limit,
                                **evaluate(drafter, answers, args.k, shape)})
    print(json.dumps({"k": args.k, "prompts": len(answers), "draft_vocabulary_coverage": coverage, "shapes": results},
                     indent=1))


if __name__ == "__main__":
    main()

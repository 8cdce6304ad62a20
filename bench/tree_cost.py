"""What a tree of drafts costs, in process: the target's verify of a chain against a tree of the same
number of drafts (its attention in C, the default on CPU; the same kernel held to one thread; and
torch's blocks), and the feature drafter proposing a chain of k against a tree of N drafts, its
matrix products as the draft service's default (auto: q8_0 blocks on a CPU with the C product),
in float16 and in float32, and several sessions' trees drafted in one batch against one call each.

    python -m bench.tree_cost --context 300      # make bench-tree

Medians of --reps timed calls after a warm-up, the compared calls taking turns. A verify is a crop
back to the context and a forward of the drafts (tree: a chain of 4, then siblings); a proposal
starts from one newly committed token, as a round's does.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.timing import medians_ms
from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import COUPLED, SamplingParams


def _tree(size: int) -> list[int]:
    """A chain of (up to) 4, then siblings hanging off its nodes in turn (size - 4 nodes off the
    leading chain, the ones whose attention reads a copy laid out as their chain's)."""
    return [i - 1 for i in range(min(4, size))] + [(i % 4) - 1 for i in range(max(0, size - 4))]


def verify_costs(runners: dict[str, ModelRunner], context: list[int], sizes: list[int], reps: int) -> list[dict]:
    """Verify times of chains and trees, for each runner (by name: its attention), in turns."""
    entries = {name: SessionCache() for name in runners}
    for name, runner in runners.items():
        runner.forward([ForwardJob(entries[name], context, len(context) - 1)])

    def verify(name: str, drafts: int, tree: list[int] | None):
        nodes = list(range(100, 100 + drafts))
        return lambda: runners[name].forward([ForwardJob(entries[name], context + nodes, len(context) - 1, tree=tree)])

    rows = [{"drafts": 0, **medians_ms({f"{name}_chain_ms": verify(name, 0, None) for name in runners}, reps)}]
    for size in sizes:
        calls = {}
        for name in runners:
            calls[f"{name}_chain_ms"] = verify(name, size, None)
            calls[f"{name}_tree_ms"] = verify(name, size, _tree(size))
        rows.append({"drafts": size, **medians_ms(calls, reps)})
    return rows


def proposing(drafter: FeatureDrafter, entries: list[SessionCache], context: list[int], features: torch.Tensor,
               k: int, params: SamplingParams, nodes: int, together: bool = True):
    """A call proposing for each session entry after `context`, with one newly committed token to
    take in, as a round's proposal has: in one propose_batch, or one call per session."""
    def call():
        jobs = []
        for entry in entries:
            if entry.kv is not None:
                entry.kv.crop(len(context) - 2)
            jobs.append(ProposeJob(entry, context, k, params, features, 0, (), nodes))
        if together:
            return drafter.propose_batch(jobs)
        return [drafter.propose_batch([job]) for job in jobs]
    return call


def draft_costs(drafters: dict[str, FeatureDrafter], context: list[int], features: torch.Tensor, k: int,
                sizes: list[int], reps: int) -> list[dict]:
    """Proposal times per sampling, for each drafter (by its matrix products' dtype), in turns."""
    rows = []
    for name, params in (("greedy", SamplingParams()), ("coupled", SamplingParams(0.7, seed=1, rule=COUPLED))):
        calls = {}
        for dtype, drafter in drafters.items():
            entry = [SessionCache()]
            calls[f"{dtype}_chain_ms"] = proposing(drafter, entry, context, features, k, params, 0)
            calls.update({f"{dtype}_tree{n}_ms": proposing(drafter, entry, context, features, k, params, n)
                          for n in sizes})
        rows.append({"sampling": name, **medians_ms(calls, reps)})
    return rows


def session_batch_costs(drafter: FeatureDrafter, context: list[int], features: torch.Tensor, k: int, nodes: int,
                        sessions: list[int], reps: int) -> list[dict]:
    """The draft service's batching: S sessions' proposals (trees of `nodes`, greedy) in one
    propose_batch against the same S one call each, in turns."""
    entries = [SessionCache() for _ in range(max(sessions))]
    rows = []
    for count in sessions:
        calls = {f"{way}_ms": proposing(drafter, entries[:count], context, features, k, SamplingParams(), nodes,
                                         together=way == "one_batch")
                 for way in ("one_batch", "one_call_each")}
        rows.append({"sessions": count, **medians_ms(calls, reps)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", default="", help="feature drafter folder (default: the one shipped for the target)")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--sizes", default="4,7,8,12,16")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--sessions", default="1,4,8", help="sessions proposing trees of 7 in one batch")
    parser.add_argument("--matmul-dtypes", default="auto,float16,float32",
                        help="the drafter's matrix products in each of these dtypes (the draft service's --matmul-dtype)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model = models.load_model(args.target)
    runner = ModelRunner(model, model.config.vocab_size)
    one_thread = ModelRunner(model, model.config.vocab_size)
    if one_thread.c_attention is not None:
        one_thread.c_attention.threads = 1
    runners = {"c_attention": runner, "c_attention_one_thread": one_thread,
               "torch_attention": ModelRunner(model, model.config.vocab_size, c_attention=False)}
    folder = args.drafter or models.default_drafter(args.target)
    drafters = {dtype: FeatureDrafter.load(folder, target=args.target, matmul_dtype=dtype)
                for dtype in args.matmul_dtypes.split(",")}
    context = torch.randint(0, 40000, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    drafter = next(iter(drafters.values()))
    prefill = ForwardJob(SessionCache(), context, len(context) - 1, drafter.feature_layers)
    features = runner.forward([prefill])[0].features  # the drafter's features of the context, for every proposal
    sessions = [int(s) for s in args.sessions.split(",")]
    print(json.dumps({"context": args.context, "verify": verify_costs(runners, context, sizes, args.reps),
                      "propose": draft_costs(drafters, context, features, args.k, [7, 12], args.reps),
                      "propose_sessions": session_batch_costs(drafter, context, features, args.k, 7, sessions,
                                                              args.reps)}, indent=1))


if __name__ == "__main__":
    main()

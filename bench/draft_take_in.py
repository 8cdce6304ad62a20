"""What the feature drafter's first proposal of a session costs: taking in the prompt.

    python -m bench.draft_take_in --contexts 300,1200

A new session's first Propose runs the drafter's layer over every prompt position (the target's
features of them) before it drafts. Times that proposal (a tree of 7, k = 5, greedy) in process
for each context length, with the drafter's products as shipped (float16 weights; calls of
eagle.WIDE_ROWS rows or more on a float32 copy of them) and with every call on the float16
weights (the products before the float32 copy), in turns, median of --reps; and a round's
proposal after it (one new committed token to take in) the same two ways.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.timing import medians_ms
from bench.tree_cost import proposing
from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import FeatureDrafter
from specdec import eagle, models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams


def with_wide_rows(wide_rows: int, call):
    """`call` with the drafter's float32 copies used from `wide_rows` rows on (1 << 30: never)."""
    def timed():
        eagle.WIDE_ROWS = wide_rows
        return call()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--contexts", default="300,1200")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    model = models.load_model(args.target)
    runner = ModelRunner(model, model.config.vocab_size)
    drafter = FeatureDrafter.load(models.default_drafter(args.target), target=args.target)
    shipped_wide_rows = eagle.WIDE_ROWS
    report = {"wide_rows": shipped_wide_rows, "contexts": {}}
    for length in (int(c) for c in args.contexts.split(",")):
        context = torch.randint(0, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
        features = runner.forward([ForwardJob(SessionCache(), context, length - 1, drafter.feature_layers)])[0].features
        # A fresh session each call takes the whole prompt in; the held one (after its first call,
        # the warm-up) one newly committed token a round.
        take_in = lambda: drafter.propose_batch(  # noqa: E731
            [ProposeJob(SessionCache(), context, 5, SamplingParams(), features, 0, (), 7)])
        a_round = proposing(drafter, [SessionCache()], context, features, 5, SamplingParams(), 7)
        try:
            report["contexts"][length] = medians_ms({
                "take_in_ms": with_wide_rows(shipped_wide_rows, take_in),
                "take_in_float16_only_ms": with_wide_rows(1 << 30, take_in),
                "round_ms": with_wide_rows(shipped_wide_rows, a_round),
                "round_float16_only_ms": with_wide_rows(1 << 30, a_round),
            }, args.reps)
        finally:
            eagle.WIDE_ROWS = shipped_wide_rows
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

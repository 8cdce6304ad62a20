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
from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import FeatureDrafter
from specdec import eagle, models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams


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
        held = SessionCache()

        def propose(wide_rows: int, entry: SessionCache | None):
            def call():
                eagle.WIDE_ROWS = wide_rows
                if entry is not None and entry.kv is not None:
                    entry.kv.crop(length - 2)  # a round: one newly committed token to take in
                job = ProposeJob(entry if entry is not None else SessionCache(), context, 5, SamplingParams(),
                                 features, 0, (), 7)
                return drafter.propose_batch([job])
            return call

        propose(shipped_wide_rows, held)()  # the held session takes the prompt in once
        try:
            report["contexts"][length] = medians_ms({
                "take_in_ms": propose(shipped_wide_rows, None),
                "take_in_float16_only_ms": propose(1 << 30, None),
                "round_ms": propose(shipped_wide_rows, held),
                "round_float16_only_ms": propose(1 << 30, held),
            }, args.reps)
        finally:
            eagle.WIDE_ROWS = shipped_wide_rows
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

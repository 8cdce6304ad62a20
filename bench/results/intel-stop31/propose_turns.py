"""The feature drafter's proposal in process: the old path (torch's attention over a mask) against the new (the C
attention over each row's own slots), in turns in one process; medians of 60 (ms). The runs in bench/RESULTS.md had a
third variant, q, k and v in one C product (an uncommitted change, not kept: 0-2% more); its column was "new" there
and the C attention alone "c-attention"."""
import time, torch
from bench.tree_cost import proposing
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams, COUPLED
model = models.load_model("smollm2")
runner = ModelRunner(model, model.config.vocab_size)
load = lambda: FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2", cpu_kernels="auto")
new, old = load(), load()
old.attention = None  # torch's attention over a mask
variants = {"old": old, "new": new}
for length in (300, 1200):
    context = torch.randint(0, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    features = runner.forward([ForwardJob(SessionCache(), context, length - 1, new.feature_layers)])[0].features
    for name, params, nodes in (("greedy tree7", SamplingParams(), 7), ("coupled T0.7 tree7", SamplingParams(0.7, seed=1, rule=COUPLED), 7),
                                ("greedy chain5", SamplingParams(), 0)):
        calls = {v: proposing(d, [SessionCache()], context, features, 5, params, nodes) for v, d in variants.items()}
        drafts = {v: c()[0].tokens for v, c in calls.items()}
        times = {v: [] for v in calls}
        for _ in range(63):
            for v, c in calls.items():
                t = time.perf_counter(); c(); times[v].append(time.perf_counter() - t)
        med = {v: sorted(ts[3:])[30] * 1000 for v, ts in times.items()}
        same = len(set(map(tuple, drafts.values()))) == 1
        print(f"{length} {name}: " + ", ".join(f"{v} {m:.2f}" for v, m in med.items()) + f"  new/old {med['new']/med['old']:.2f}  same drafts: {same}")

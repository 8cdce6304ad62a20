import time, torch, sys
from bench.tree_cost import proposing
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams, COUPLED
model = models.load_model("smollm2")
runner = ModelRunner(model, model.config.vocab_size)
ds = {"torch16": FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2", cpu_kernels="torch"),
      "c16": FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2", cpu_kernels="c"),
      "c32": FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2", matmul_dtype="float32", cpu_kernels="c")}
for length in (300, 1200):
    context = torch.randint(0, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    features = runner.forward([ForwardJob(SessionCache(), context, length - 1, ds["c16"].feature_layers)])[0].features
    for pname, params in (("greedy", SamplingParams()), ("coupled", SamplingParams(0.7, seed=1, rule=COUPLED))):
        calls = {d: proposing(dr, [SessionCache()], context, features, 5, params, 7) for d, dr in ds.items()}
        outs = {d: c()[0].tokens for d, c in calls.items()}
        res = {d: [] for d in calls}
        for r in range(25):
            for d, c in calls.items():
                t=time.perf_counter(); c(); res[d].append(time.perf_counter()-t)
        print(length, pname, " ".join("%s %.2f ms" % (d, 1000*sorted(ts[3:])[len(ts[3:])//2]) for d, ts in res.items()), outs)
        take = {d: (lambda dr=dr: dr.propose_batch([__import__("draft_service.drafters", fromlist=["ProposeJob"]).ProposeJob(SessionCache(), context, 5, params, features, 0, (), 7)])) for d, dr in ds.items()}
        res = {d: [] for d in take}
        for r in range(5):
            for d, c in take.items():
                t=time.perf_counter(); c(); res[d].append(time.perf_counter()-t)
        print(length, pname, "take-in", " ".join("%s %.1f ms" % (d, 1000*sorted(ts)[2]) for d, ts in res.items()))

import torch
from bench.tree_cost import proposing
from bench.timing import medians_ms
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams, COUPLED
model = models.load_model("smollm2")
runner = ModelRunner(model, model.config.vocab_size)
full = FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2")
products_only = FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2")
products_only.head.with_small_steps(None)
for length in (300, 1200):
    context = torch.randint(0, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    features = runner.forward([ForwardJob(SessionCache(), context, length - 1, full.feature_layers)])[0].features
    for name, params in (("greedy", SamplingParams()), ("coupled", SamplingParams(0.7, seed=1, rule=COUPLED))):
        calls = {f"{length}_{name}_{d}": proposing(dr, [SessionCache()], context, features, 5, params, 7)
                 for d, dr in (("steps_in_c", full), ("steps_in_torch", products_only))}
        print([c()[0].tokens for c in calls.values()])
        print(medians_ms(calls, 31))

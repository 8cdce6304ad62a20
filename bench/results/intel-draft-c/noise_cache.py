import functools, time, torch
from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams, COUPLED
model = models.load_model("smollm2")
runner = ModelRunner(model, model.config.vocab_size)
cached = FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2")
uncached = FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2")
uncached._draft_noise = uncached._draft_noise_uncached
context = torch.randint(0, 40000, (700,), generator=torch.Generator().manual_seed(0)).tolist()
features = runner.forward([ForwardJob(SessionCache(), context, 699, cached.feature_layers)])[0].features
params = SamplingParams(0.7, seed=1, rule=COUPLED)
times = {"cached": [], "uncached": []}
entries = {"cached": SessionCache(), "uncached": SessionCache()}
for c in range(300, 660, 2):  # a round keeps about two tokens
    for name, drafter in (("cached", cached), ("uncached", uncached)):
        job = ProposeJob(entries[name], context[:c], 5, params, features, 0, (), 7)
        t = time.perf_counter(); out = drafter.propose_batch([job]); times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    ts = sorted(ts[5:]); print(name, "median ms %.2f mean %.2f" % (1000 * ts[len(ts) // 2], 1000 * sum(ts) / len(ts)))

import time, sys, torch, statistics
from draft_service.drafters import ProposeJob
from draft_service.feature_drafter import FeatureDrafter
from specdec import models
from specdec.kv_cache import SessionCache
from specdec.runner import ForwardJob, ModelRunner
from specdec.sampling import SamplingParams
n = int(sys.argv[1]) if len(sys.argv) > 1 else 1187
model = models.load_model("smollm2")
runner = ModelRunner(model, model.config.vocab_size)
drafter = FeatureDrafter.load(models.default_drafter("smollm2"), target="smollm2", max_catch_up=int(__import__("os").environ.get("CATCH","0")))
context = torch.randint(0, 40000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
t=time.perf_counter()
features = runner.forward([ForwardJob(SessionCache(), context, n - 1, drafter.feature_layers)])[0].features
print('target prefill ms', round((time.perf_counter()-t)*1e3,1), features.shape, features.dtype)
def once():
    entry = SessionCache()
    job = ProposeJob(entry, context, 5, SamplingParams(), features, 0, (), 7)
    t=time.perf_counter(); drafter.propose_batch([job]); return (time.perf_counter()-t)*1e3
ts=[once() for _ in range(4)]
print('catch-up + tree ms', [round(x,1) for x in ts])
if len(sys.argv) > 2:
    import cProfile, pstats
    cProfile.run('once()', '/tmp/catchup.prof')
    pstats.Stats('/tmp/catchup.prof').sort_stats('cumulative').print_stats(25)

"""fixed_workload over one category's prompts (summarization by default), k given or adaptive."""
import asyncio, json, os, sys, time
from pathlib import Path
import grpc
import bench.fixed_workload as fw
from bench.harness import load_prompts
from specdec.launcher import LaunchOptions, launch
from specdec.models import AUTO_DRAFTER, DEFAULT_MODEL
from specdec.v1 import coordinator_pb2, coordinator_pb2_grpc

async def run(category, k, fixed, count):
    prompts = [p for p in load_prompts(Path('/work/shared/data/specbench-dev.jsonl'), 2, ()) if p.category == category][:count]
    pipeline = await launch(LaunchOptions(target=DEFAULT_MODEL, draft=AUTO_DRAFTER, snapshots=os.environ.get("SNAP","1")=="1", draft_flags=tuple(os.environ.get("DFLAGS","").split())))
    out = []
    try:
        async with grpc.aio.insecure_channel(pipeline.coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            async def gen(text, tokens):
                req = coordinator_pb2.GenerateRequest(prompt=text, max_new_tokens=tokens, k=k, fixed_k=fixed, ignore_eos=True)
                first = None; t0 = time.perf_counter()
                async for m in stub.Generate(req):
                    if first is None and m.token_ids: first = time.perf_counter() - t0
                    if m.HasField('stats'): return m.stats, first, time.perf_counter() - t0
            await gen(prompts[0].text, 8)
            for p in prompts:
                s, first, wall = await gen(p.text, 128)
                out.append(dict(q=p.question_id, wall=round(wall,3), first=round(first,3), rounds=s.rounds, tokens=s.generated_tokens,
                                verify=round(s.verify_s,3), draft=round(s.draft_s,3), total=round(s.total_s,3), prefill=s.target_prefill_tokens))
    finally:
        await pipeline.stop()
    return out

cat, k, fixed, count = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'fixed', int(sys.argv[4])
for r in asyncio.run(run(cat, k, fixed, count)): print(json.dumps(r))

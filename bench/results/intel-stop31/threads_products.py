import time, torch
from specdec import cpu_kernels
from specdec.cpu_kernels import PackedWeight
k = cpu_kernels.load().linear
g = torch.Generator().manual_seed(0)
for outs, ins in ((8192, 576), (960, 1152), (576, 1152), (1536, 576), (576, 1536), (576, 1728)):
    w = PackedWeight.of((torch.randn(outs, ins, generator=g) * 0.05).half())
    for rows in (1, 4):
        x = torch.randn(rows, ins, generator=g)
        ts = {1: [], 2: []}
        for _ in range(300):
            for t_ in (1, 2):
                k.threads = t_
                t = time.perf_counter(); k(x, w); ts[t_].append(time.perf_counter() - t)
        print(outs, ins, rows, " ".join(f"{n}t {sorted(v)[150]*1e6:.0f}us" for n, v in ts.items()))

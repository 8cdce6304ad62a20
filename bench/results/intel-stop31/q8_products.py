import time, torch
from specdec import cpu_kernels, ggml_blocks
from specdec.cpu_kernels import PackedWeight
k = cpu_kernels.load().linear
g = torch.Generator().manual_seed(0)
def q8(w):
    blocks = w.view(w.shape[0], -1, 32); scale = (blocks.abs().amax(-1) / 127).half()
    return ggml_blocks.Blocks(ggml_blocks.Q8_0, scale, None, ggml_blocks._codes(blocks, scale, -128, 127, torch.int8))
for outs, ins in ((8192, 576), (960, 1152), (1536, 576), (576, 1536), (576, 1728)):
    w = torch.randn(outs, ins, generator=g) * 0.05
    packs = {"f16": PackedWeight.of(w.half()), "f32": PackedWeight.of(w), "q8_0": PackedWeight.of_blocks(q8(w))}
    for rows in (1, 4):
        x = torch.randn(rows, ins, generator=g)
        ts = {n: [] for n in packs}
        for _ in range(200):
            for n, p in packs.items():
                t = time.perf_counter(); k(x, p); ts[n].append(time.perf_counter() - t)
        print(outs, ins, rows, " ".join(f"{n} {sorted(v)[100]*1e6:.0f}us" for n, v in ts.items()))
    err = (k(x, packs["q8_0"]) - k(x, packs["f16"])).abs().max() / k(x, packs["f16"]).abs().max()
    print("  q8 rel err", float(err))

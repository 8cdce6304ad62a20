"""One product's time and rate by rows (1-24) through the C kernel, on layer 3's gate_up, down and
qkv weights in their GGML blocks (Q4_1), median of 7 x 50 calls.

    python bench/results/zen5-avx512/rows_curve.py 1    # torch threads (the kernel's OpenMP team)
"""
import sys, time, torch
from specdec import cpu_kernels, ggml_blocks, models
from specdec.runner import ModelRunner
k = cpu_kernels.load()
model = models.load_model("smollm2")
runner = ModelRunner(model, model.config.vocab_size, c_blocks=False)
layers = [runner._fuse(l) for l in model.get_decoder().layers]
ws = {"gate_up": layers[3].gate_up, "down": layers[3].down, "qkv": layers[3].qkv}
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
for name, w in ws.items():
    f = ggml_blocks.factor(w); p = cpu_kernels.PackedWeight.of_blocks(f)
    line = []
    for rows in (1, 2, 4, 6, 8, 10, 12, 16, 24):
        x = torch.randn(rows, w.shape[1])
        for _ in range(20): k.linear(x, p)
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(50): k.linear(x, p)
            ts.append((time.perf_counter() - t) / 50)
        t = sorted(ts)[3]
        line.append(f"{rows}:{t*1e6:.0f}us/{2*rows*w.numel()/t/1e9:.0f}GF")
    print(name, f.format, tuple(w.shape), " ".join(line), flush=True)

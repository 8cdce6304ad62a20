"""Every product of one SmolLM2 step (the 30 layers' fused qkv, o, gate_up, down and the head), in
step order, through the C kernel on float32 packed weights and on the same weights packed back into
their GGML blocks (Q4_1 layers, Q8_0 head), at 1-96 rows; checks the two give the same bits.

    python bench/results/intel-gguf-blocks/products.py
"""
import time

import torch

from specdec import cpu_kernels, ggml_blocks, models
from specdec.runner import ModelRunner

kernels = cpu_kernels.load()
model = models.load_model("smollm2")
runner = ModelRunner(model, model.config.vocab_size, c_blocks=False)
weights = [model.get_output_embeddings().weight.detach()] + [
    getattr(layer, name) for layer in (runner._fuse(layer) for layer in model.get_decoder().layers)
    for name in ("qkv", "o", "gate_up", "down")]
started = time.perf_counter()
found = [ggml_blocks.factor(w) for w in weights]
print(f"weights found in GGML blocks: {sum(f is not None for f in found)} of {len(found)} "
      f"({sorted({f.format for f in found if f})}), {time.perf_counter() - started:.1f} s")
wide = [cpu_kernels.PackedWeight.of(w) for w in weights]
blocks = [cpu_kernels.PackedWeight.of_blocks(f) for f in found]
print("bytes: float32 %.0f MB, blocks %.0f MB" % (sum(p.data.nbytes for p in wide) / 1e6,
                                                    sum(p.data.nbytes for p in blocks) / 1e6))
generator = torch.Generator().manual_seed(0)
for rows in (1, 2, 4, 8, 12, 32, 96):
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=generator) for w in weights}
    same = all(torch.equal(kernels.linear(xs[w.shape[1]], a), kernels.linear(xs[w.shape[1]], b))
               for w, a, b in zip(weights, wide, blocks))
    times = {"float32": [], "blocks": []}
    for _ in range(5):  # in turns, so that drift in the machine's speed falls on both
        for name, packs in (("float32", wide), ("blocks", blocks)):
            t = time.perf_counter()
            for w, p in zip(weights, packs):
                kernels.linear(xs[w.shape[1]], p)
            times[name].append((time.perf_counter() - t) * 1000)
    median = {name: sorted(t)[2] for name, t in times.items()}
    print(f"rows {rows:3d}: all products float32 {median['float32']:6.1f} ms, blocks {median['blocks']:6.1f} ms "
          f"({median['float32'] / median['blocks']:.2f}x), same bits: {same}")

import time, torch
from specdec import cpu_kernels
k = cpu_kernels.load()
print("half built", k.linear.half)
torch.manual_seed(0)
for shape in ((8192, 576), (576, 1152), (1536, 576), (576,1536)):
    w = torch.randn(*shape).half()
    pw = cpu_kernels.PackedWeight.of(w)
    pf = cpu_kernels.PackedWeight.of(w.float())
    for rows in (1, 4, 8, 64, 300):
        x = torch.randn(rows, shape[1])
        ref = x.double() @ w.double().T
        outh = k.linear(x, pw); outf = k.linear(x, pf)
        assert torch.equal(outh, outf), (outh - outf).abs().max()
        fs = (("torch16", lambda: torch.nn.functional.linear(x.half(), w).float()), ("torch32", lambda: torch.nn.functional.linear(x, w.float())),
              ("C32", lambda: k.linear(x, pf)), ("C16", lambda: k.linear(x, pw)))
        line = []
        for name, f in fs:
            for _ in range(5): f()
            n = 200 if rows < 64 else 20
            t=time.perf_counter()
            for _ in range(n): f()
            line.append("%s %.1f" % (name, (time.perf_counter()-t)/n*1e6))
        print(shape, rows, " | ".join(line), "err %.2e" % (outh.double()-ref).abs().max())

import random, time
from specdec.kv_cache import common_prefix_len  # the new one; old: the loop below (804d9a6)
def old(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
rng = random.Random(0)
for n in (300, 2000, 8000):
    a = [rng.randrange(49152) for _ in range(n)]
    b = a[:-3] + [1, 2, 3, 4]  # the cache held rejected drafts past the committed prefix
    for name, f in (("old", old), ("new", common_prefix_len)):
        ts = []
        for _ in range(200):
            t = time.perf_counter(); r = f(a, b); ts.append(time.perf_counter() - t)
        print(n, name, r, f"{sorted(ts)[100]*1e6:.1f} us")

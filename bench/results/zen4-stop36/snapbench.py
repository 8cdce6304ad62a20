import asyncio, time, os, resource, numpy as np, torch, redis.asyncio as aioredis, subprocess
from specdec.kv_cache import KVShape, SessionKV, SessionCache
from specdec.kv_snapshot import SnapshotStore, encode_chunk, MAX_CHUNK_BYTES, _token_bytes
from specdec.session_store import session_key
def cpu(pid):
    f=open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split(); return (int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK')
async def main():
    r = aioredis.from_url('redis://127.0.0.1:6379/15')
    rpid = int(subprocess.check_output(['pgrep','-x','redis-server']).split()[0])
    shape = KVShape(30, 3, 64, torch.float32, torch.device('cpu'))
    n = 1187
    kv = SessionKV(shape, n); kv.data.normal_(); kv.length = n
    tokens = list(range(n))
    store = SnapshotStore(r, 'target', 'm', 2**40, 600)
    for rep in range(3):
        sid = f'bench{rep}{time.time()}'
        await r.set(session_key(sid, 'tokens'), _token_bytes(tokens)); await r.hset(session_key(sid,'meta'), 'x', 1); await r.expire(session_key(sid,'meta'), 600)
        step = max(1, MAX_CHUNK_BYTES // shape.bytes_per_token)
        c0, rc0, t0 = time.process_time(), cpu(rpid), time.perf_counter()
        enc = 0.0
        for s in range(0, n, step):
            e = min(n, s + step)
            te = time.perf_counter(); data = encode_chunk(kv, tokens, s, e); enc += time.perf_counter() - te
            code, stored = await store.append(sid, s, e, data, _token_bytes(tokens[s:e]))
            assert code == 0, code
        print(f'{n} positions {n*shape.bytes_per_token/1e6:.1f} MB: wall {1e3*(time.perf_counter()-t0):.0f} ms, encode {1e3*enc:.0f} ms, client cpu {1e3*(time.process_time()-c0):.0f} ms, redis cpu {1e3*(cpu(rpid)-rc0):.0f} ms')
    await r.flushdb()
asyncio.run(main())

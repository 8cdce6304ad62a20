import os, time, socket, sys
a, b = socket.socketpair()
n = 5000
if os.fork() == 0:
    for _ in range(n + 100):
        d = b.recv(64); b.send(d)
    os._exit(0)
for _ in range(100): a.send(b"x"); a.recv(64)
ts = []
for _ in range(n):
    t = time.perf_counter(); a.send(b"x"); a.recv(64); ts.append(time.perf_counter() - t)
ts.sort(); print(f"socketpair ping-pong RT median {ts[n//2]*1e6:.1f} us, p90 {ts[int(n*.9)]*1e6:.1f}")

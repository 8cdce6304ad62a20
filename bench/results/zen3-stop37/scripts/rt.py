import asyncio, sys, time, statistics, os
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
async def serve(port):
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start(); await server.wait_for_termination()
async def client(port, n):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest()
        for _ in range(200): await stub.Check(req)
        ts=[]
        for _ in range(n):
            t=time.perf_counter(); await stub.Check(req); ts.append(time.perf_counter()-t)
        ts.sort(); print(f"RT median {ts[len(ts)//2]*1e3:.3f} ms mean {statistics.mean(ts)*1e3:.3f}")
if sys.argv[1]=="serve": asyncio.run(serve(int(sys.argv[2])))
else: asyncio.run(client(int(sys.argv[2]), int(sys.argv[3])))

#!/usr/bin/env python3
"""Request/reply round trip, RayFlux against NATS, from the same Python
asyncio process with each system's usual client (`websockets` on RayFlux's
native protocol; `nats-py` on NATS's TCP port): one responder, one requester
sending N requests one after another (closed loop), then C requesters at
once. Prints p50/p99/max round trip in ms and requests per second.

    python3 perf/messaging/request_rtt.py rayflux HOST:PORT N C
    python3 perf/messaging/request_rtt.py nats HOST:PORT N C

Needs `pip install websockets nats-py`. Both clients are Python, so the
figures include Python's cost on each side; compare them with each other,
not with a native client.
"""
import asyncio
import json
import sys
import time

import websockets


def summary(label, rtts, seconds):
    rtts.sort()
    q = lambda p: rtts[min(len(rtts) - 1, int(len(rtts) * p))] * 1000
    print(f"{label}: {len(rtts)} requests, {len(rtts) / seconds:.0f}/s, rtt ms p50 {q(0.5):.3f} "
          f"p99 {q(0.99):.3f} max {rtts[-1] * 1000:.3f}")


async def rayflux(addr, n, c):
    url = f"ws://{addr}/v1/ws"
    topic = f"rtt-{int(time.time())}"
    async with websockets.connect(url) as responder:
        await responder.send(json.dumps({"op": "subscribe", "id": 1, "topic": topic, "group": "svc", "prefetch": 1000}))
        assert json.loads(await responder.recv())["ok"]

        async def serve():
            async for frame in responder:
                m = json.loads(frame)
                if m.get("type") == "message":
                    await responder.send(json.dumps({"op": "reply", "to": m["reply_to"], "data": m["data"],
                                                     "topic": topic, "group": "svc", "seq": m["seq"]}))
        server = asyncio.create_task(serve())

        async def requester(count, rtts):
            async with websockets.connect(url) as ws:
                for i in range(count):
                    t = time.perf_counter()
                    await ws.send(json.dumps({"op": "request", "id": i, "topic": topic, "data": "ping"}))
                    r = json.loads(await ws.recv())
                    assert r["ok"], r
                    rtts.append(time.perf_counter() - t)
        await run_phases(requester, n, c)
        server.cancel()


async def nats_(addr, n, c):
    import nats
    host, port = addr.split(":")
    nc = await nats.connect(f"nats://{host}:{port}")

    async def handler(msg):
        await msg.respond(msg.data)
    await nc.subscribe("rtt.svc", queue="svc", cb=handler)
    await nc.flush()

    async def requester(count, rtts):
        rc = await nats.connect(f"nats://{host}:{port}")
        for _ in range(count):
            t = time.perf_counter()
            await rc.request("rtt.svc", b"ping", timeout=5)
            rtts.append(time.perf_counter() - t)
        await rc.close()
    await run_phases(requester, n, c)
    await nc.close()


async def run_phases(requester, n, c):
    await requester(200, [])  # warm-up
    rtts = []
    t = time.perf_counter()
    await requester(n, rtts)
    summary("1 requester", rtts, time.perf_counter() - t)
    rtts = []
    t = time.perf_counter()
    await asyncio.gather(*(requester(n // c, rtts) for _ in range(c)))
    summary(f"{c} requesters", rtts, time.perf_counter() - t)


if __name__ == "__main__":
    kind, addr, n, c = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(rayflux(addr, n, c) if kind == "rayflux" else nats_(addr, n, c))

#!/usr/bin/env python3
"""Publish-to-acknowledgement latency on a durable topic at one ack level,
at a steady rate, from one native connection (Python `websockets`, a
client nobody on the team wrote):

  python3 perf/durable/stored_ack.py HOST:PORT TOPIC ACK RATE SECONDS

The topic is declared durable first (PUT /v1/topics/TOPIC). Prints the
count and p50/p90/p99/max in milliseconds. Run it against a node whose
--object-store is the store to measure and whose --upload-interval-ms is
the interval to report.
"""
import asyncio
import json
import sys
import time
import urllib.request

import websockets


async def run(addr, topic, ack, rate, seconds):
    req = urllib.request.Request(f"http://{addr}/v1/topics/{topic}", data=b'{"ack":"local"}', method="PUT")
    urllib.request.urlopen(req, timeout=10).read()
    sent_at = {}
    lat = []
    total = int(rate * seconds)
    async with websockets.connect(f"ws://{addr}/v1/ws", max_size=None) as ws:
        async def reader():
            while len(lat) < total:
                r = json.loads(await ws.recv())
                if not r.get("ok"):
                    raise SystemExit(f"refused: {r}")
                lat.append((time.perf_counter() - sent_at.pop(r["id"])) * 1000)
        task = asyncio.create_task(reader())
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[i] = time.perf_counter()
            await ws.send(json.dumps({"op": "publish", "id": i, "topic": topic, "data": "x" * 64, "ack": ack}))
        await task
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))]
    print(f"ack={ack} rate={rate}/s n={len(lat)} p50={q(0.5):.1f} p90={q(0.9):.1f} p99={q(0.99):.1f} max={lat[-1]:.1f} ms")


if __name__ == "__main__":
    addr, topic, ack, rate, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
    asyncio.run(run(addr, topic, ack, rate, seconds))

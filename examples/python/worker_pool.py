#!/usr/bin/env python3
"""A pool of workers sharing the commands of one topic through a RayFlux
consumer group (Python `websockets`). Each command goes to one worker; the
commands of one key (here an account) stay with one worker, in order; a
command a worker fails on is refused and comes back after a delay; one that
fails five times goes to the dead-letter topic `commands.billing.dlq`.

    pip install websockets
    python3 examples/python/worker_pool.py ws://localhost:8080/v1/ws 4

and publish commands with, for example:

    curl -XPOST 'localhost:8080/v1/topics/commands?key=acct-7' -H 'content-type: text/plain' -d 'charge 10'
"""
import asyncio
import base64
import json
import sys

import websockets

TOPIC, GROUP = "commands", "billing"


async def handle(command):
    """The work: raise to refuse the command (it is retried)."""
    await asyncio.sleep(0.01)


async def worker(url, n):
    async with websockets.connect(url) as ws:
        join = {"op": "subscribe", "id": 1, "topic": TOPIC, "group": GROUP, "prefetch": 10, "ack_timeout_ms": 30000}
        await ws.send(json.dumps(join))
        async for frame in ws:
            m = json.loads(frame)
            if m.get("type") == "reply":
                if not m["ok"]:
                    raise SystemExit(f"worker {n}: {m['error']}")
                print(f"worker {n} joined {GROUP}")
                continue
            if m.get("type") != "message":
                continue
            settle = {"topic": TOPIC, "group": GROUP, "seq": m["seq"]}
            try:
                # Text payloads come as `data`, binary ones as `data_base64`.
                await handle(m["data"] if "data" in m else base64.b64decode(m["data_base64"]))
                settle["op"] = "ack"
            except Exception as e:  # refused: again in a second
                print(f"worker {n}: {m.get('key')} #{m['seq']} failed ({e}), delivery {m['delivery']}")
                settle.update(op="nack", delay_ms=1000)
            await ws.send(json.dumps(settle))


async def main(url, workers):
    await asyncio.gather(*(worker(url, n) for n in range(workers)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4))

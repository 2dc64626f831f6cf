#!/usr/bin/env python3
"""A worker pool consuming commands through a RayFlux consumer group, as a
user would write it with Python `websockets`: 4 workers, 8 once a third of
the commands are published, 2 once two thirds are (three of the six that
go leave the group, three just drop their connection). Every command must
be processed; one is processed twice only when its worker went away before
acknowledging it (its `delivery` is then above 1).

    python3 worker_pool.py HOST:PORT COMMANDS

Prints a summary and `lost N`; exits non-zero when a command is lost or
a duplicate came without a redelivery.
"""
import asyncio
import json
import sys
import time

import websockets

TOPIC = "commands"
GROUP = "workers"
PREFETCH = 8


class Pool:
    def __init__(self, addr):
        self.addr = addr
        self.processed = {}  # command -> times processed
        self.duplicates_without_redelivery = 0
        self.redelivered = 0
        self.workers = {}
        self.next_id = 0

    async def worker(self, wid):
        async with websockets.connect(f"ws://{self.addr}/v1/ws") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": TOPIC, "group": GROUP, "prefetch": PREFETCH}))
            reply = json.loads(await ws.recv())
            assert reply.get("ok"), reply
            self.workers[wid]["ws"] = ws
            async for frame in ws:
                m = json.loads(frame)
                if m.get("type") != "message":
                    continue
                await asyncio.sleep(0.002)  # the work
                cmd = m["data"]
                self.redelivered += m["delivery"] > 1
                seen = self.processed.get(cmd, 0)
                if seen and m["delivery"] == 1:
                    self.duplicates_without_redelivery += 1
                self.processed[cmd] = seen + 1
                await ws.send(json.dumps({"op": "ack", "topic": TOPIC, "group": GROUP, "seq": m["seq"]}))

    def start(self, n):
        for _ in range(n):
            wid = self.next_id
            self.next_id += 1
            self.workers[wid] = {"task": asyncio.create_task(self.worker(wid)), "ws": None}

    async def stop(self, n, gracefully):
        for wid in list(self.workers)[:n]:
            w = self.workers.pop(wid)
            ws = w["ws"]
            if gracefully and ws is not None:
                await ws.send(json.dumps({"op": "unsubscribe", "id": 2, "topic": TOPIC, "group": GROUP}))
            w["task"].cancel()
            if ws is not None:
                if gracefully:
                    await ws.close()
                else:
                    ws.transport.abort()


async def main(addr, total):
    pool = Pool(addr)
    pool.start(4)
    while any(w["ws"] is None for w in pool.workers.values()):
        await asyncio.sleep(0.01)
    phases = []
    async with websockets.connect(f"ws://{addr}/v1/ws") as pub:
        window, sent, answered = 64, 0, 0
        t0 = time.time()
        while answered < total:
            while sent < total and sent - answered < window:
                sent += 1
                msg = {"op": "publish", "id": sent, "topic": TOPIC, "data": f"cmd-{sent}", "key": f"acct-{sent % 50}"}
                await pub.send(json.dumps(msg))
            reply = json.loads(await pub.recv())
            assert reply.get("ok"), reply
            answered += 1
            if answered == total // 3:
                pool.start(4)
                phases.append(f"8 workers at command {answered}")
            if answered == 2 * total // 3:
                await pool.stop(3, gracefully=True)
                await pool.stop(3, gracefully=False)
                phases.append(f"2 workers at command {answered}")
        rate = total / (time.time() - t0)
    deadline = time.time() + 60
    while len(pool.processed) < total and time.time() < deadline:
        await asyncio.sleep(0.05)
    await pool.stop(len(pool.workers), gracefully=True)
    lost = total - len(pool.processed)
    duplicates = sum(n - 1 for n in pool.processed.values())
    print(f"published {total} commands at {rate:.0f}/s; {'; '.join(phases)}")
    print(f"processed {len(pool.processed)} distinct; {pool.redelivered} deliveries were redeliveries (a worker left "
          f"holding them), {duplicates} commands processed twice")
    print(f"duplicates without a redelivery: {pool.duplicates_without_redelivery}")
    print(f"lost {lost}")
    return lost == 0 and pool.duplicates_without_redelivery == 0


if __name__ == "__main__":
    ok = asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    sys.exit(0 if ok else 1)

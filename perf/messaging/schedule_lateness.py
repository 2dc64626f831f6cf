#!/usr/bin/env python3
"""Scheduled-delivery lateness with many schedules pending (Python
`websockets`): schedule N messages on one topic, due evenly over the next
SPREAD seconds (starting a few seconds out, so all are pending at once),
and measure, at a plain subscriber, receive time minus `deliver_at`.

    python3 perf/messaging/schedule_lateness.py HOST:PORT 100000 20 [LEAD_MS [durable]]

With `durable`, the topic is declared durable first (`PUT /v1/topics/T`,
ack `local`): every schedule is journaled before its add is answered, and
the due messages go through the log. Prints the pending count the node reports once all are scheduled, then the
lateness p50/p90/p99/max in ms and how many arrived (all must).
"""
import asyncio
import json
import sys
import time
import urllib.request

import websockets


async def main(addr, n, spread_s):
    url = f"ws://{addr}/v1/ws"
    topic = f"lateness-{int(time.time())}"
    start_ms = int(time.time() * 1000) + int(sys.argv[4] if len(sys.argv) > 4 else 8000)  # all pending before the first is due
    lateness = []
    if len(sys.argv) > 5 and sys.argv[5] == "durable":
        put = urllib.request.Request(f"http://{addr}/v1/topics/{topic}", data=b'{"ack":"local"}', method="PUT")
        assert urllib.request.urlopen(put).status == 200
        print(f"{topic} declared durable")
    scheduling = time.time()
    async with websockets.connect(url, max_size=None) as sub, websockets.connect(url, max_size=None) as pub:
        await sub.send(json.dumps({"op": "subscribe", "id": 1, "topic": topic}))
        assert json.loads(await sub.recv())["ok"]
        window, sent, answered = 512, 0, 0
        while answered < n:
            while sent < n and sent - answered < window:
                due = start_ms + sent * spread_s * 1000 // n
                await pub.send(json.dumps({"op": "publish", "id": sent, "topic": topic, "data": str(due),
                                           "deliver_at": due, "schedule_id": f"s{sent}"}))
                sent += 1
            r = json.loads(await pub.recv())
            if not r.get("ok"):
                raise SystemExit(f"refused: {r}")
            answered += 1
        await pub.send(json.dumps({"op": "schedules", "id": 1_000_000_000, "topic": topic}))
        while True:
            r = json.loads(await pub.recv())
            if r.get("id") == 1_000_000_000:
                break
        ahead = start_ms - int(time.time() * 1000)
        took = time.time() - scheduling
        print(f"{n} scheduled in {took:.1f} s ({n / took:.0f} adds/s answered), {r['pending']} pending at the node, "
              f"the first due in {ahead} ms")
        if ahead < 0:
            print("warning: scheduling took longer than the lead; early ones are measured late")
        deadline = time.time() + spread_s + 30
        while len(lateness) < n and time.time() < deadline:
            m = json.loads(await asyncio.wait_for(sub.recv(), timeout=30))
            if m.get("type") == "message":
                lateness.append(time.time() * 1000 - int(m["data"]))
    lateness.sort()
    q = lambda p: lateness[min(len(lateness) - 1, int(len(lateness) * p))]
    print(f"arrived {len(lateness)} of {n}; lateness ms p50 {q(0.5):.1f} p90 {q(0.9):.1f} p99 {q(0.99):.1f} "
          f"max {lateness[-1]:.1f} min {lateness[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))

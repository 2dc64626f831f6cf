#!/usr/bin/env python3
"""Durable-topic figures on a running node: fill one durable topic with
about SIZE_MB of messages (1 KiB payloads, every 100th with the key
`agg-42`, the others spread over 5,000 keys), then time

  1. a key replay: every `agg-42` event (10,000 of them in 1 GB) through
     GET /v1/topics/T/messages?key=agg-42, page by page;
  2. a snapshot (POST /v1/snapshots): seal, upload, manifest; MB/s.

Restore is timed by the caller (it starts a fresh node with --restore).

  python3 perf/durable/replay.py HOST:PORT TOPIC SIZE_MB
"""
import asyncio
import json
import sys
import time
import urllib.request

import websockets

PAYLOAD = b"x" * 1000


def http(method, url, body=None):
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


async def fill(addr, topic, count):
    async with websockets.connect(f"ws://{addr}/v1/ws", max_size=None) as ws:
        window = 256
        sent = 0
        acked = 0
        while acked < count:
            while sent < count and sent - acked < window:
                key = "agg-42" if sent % 100 == 0 else f"agg-{sent % 5000 + 100}"
                msg = {"op": "publish", "id": sent, "topic": topic, "data": PAYLOAD.decode(), "key": key, "ack": "none"}
                await ws.send(json.dumps(msg))
                sent += 1
            reply = json.loads(await ws.recv())
            if not reply.get("ok"):
                raise SystemExit(f"publish refused: {reply}")
            acked += 1


def main():
    addr, topic, size_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = size_mb * 1024 * 1024 // 1060  # record: payload + key + header
    http("PUT", f"http://{addr}/v1/topics/{topic}", b'{"ack":"local"}')
    t0 = time.time()
    asyncio.run(fill(addr, topic, count))
    info = http("GET", f"http://{addr}/v1/topics/{topic}")
    # Everything written before timing the reads.
    while info["durable"]["unwritten"]:
        info = http("GET", f"http://{addr}/v1/topics/{topic}")
    print(f"filled {count} messages, {info['durable']['log_bytes'] / 1e6:.0f} MB in {info['durable']['segments']} segments, "
          f"{time.time() - t0:.1f} s")
    t0 = time.time()
    got, frm = 0, 0
    while True:
        page = http("GET", f"http://{addr}/v1/topics/{topic}/messages?key=agg-42&from_seq={frm}&limit=10000")
        got += len(page["messages"])
        if page["next_seq"] is None:
            break
        frm = page["next_seq"]
    ms = (time.time() - t0) * 1000
    print(f"key replay: {got} events of key agg-42 out of {info['durable']['log_messages']} messages in {ms:.0f} ms")
    t0 = time.time()
    made = http("POST", f"http://{addr}/v1/snapshots")
    s = time.time() - t0
    print(f"snapshot {made['id']}: {made['segments']} segments, {made['bytes'] / 1e6:.0f} MB in {s:.1f} s = "
          f"{made['bytes'] / 1e6 / s:.0f} MB/s")


if __name__ == "__main__":
    main()

"""Issue 12.1's scenario, measured: native `slow=drop` subscribers that read
slowly under a flood of 4 KiB messages. Prints the node's RSS peak, the
slowest `/healthz`, and what the subscribers got (messages, `dropped`
notices and their counts, closes).

Usage: drop_flood.py FLUXNODE_BINARY [SECONDS] [SUBSCRIBERS] [READ_BYTES_PER_SEC]

Clients: Python `websockets` (asyncio) for the subscribers, a second
process for the publisher (raw topic socket, as fast as it can send).
"""

import asyncio
import json
import multiprocessing
import re
import subprocess
import sys
import time
import urllib.request

import websockets
from websockets.sync.client import connect as sync_connect

BINARY = sys.argv[1]
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 40
SUBSCRIBERS = int(sys.argv[3]) if len(sys.argv) > 3 else 10
READ_RATE = float(sys.argv[4]) if len(sys.argv) > 4 else 160_000
PAYLOAD = "x" * 4096


def publisher(addr, seconds):
    ws = sync_connect(f"ws://{addr}/v1/topics/flood/ws?role=pub", max_size=None)
    end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end:
        for _ in range(100):
            ws.send(PAYLOAD)
        sent += 100
    ws.close()
    print(f"publisher: {sent} messages of 4 KiB in {seconds:.0f} s", flush=True)


async def subscriber(addr, stats, stop):
    async with websockets.connect(f"ws://{addr}/v1/ws?slow=drop", max_size=None, max_queue=4) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": "flood"}))
        start = time.monotonic()
        got = 0
        try:
            while not stop.is_set():
                try:
                    frame = await asyncio.wait_for(ws.recv(), 1)
                except asyncio.TimeoutError:
                    continue
                got += len(frame)
                if frame.startswith('{"type":"message"'):
                    stats["messages"] += 1
                elif (notice := json.loads(frame)).get("type") == "dropped":
                    stats["notices"] += 1
                    # Older nodes sent no count: one per sequence in the range.
                    stats["announced"] += notice.get("count", notice["to_seq"] - notice["from_seq"] + 1)
                # Read at READ_RATE bytes a second, no faster.
                ahead = got / READ_RATE - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        except websockets.ConnectionClosed as closed:
            node = f"node {closed.rcvd.code} {closed.rcvd.reason!r}" if closed.rcvd else "no close from the node"
            client = f"client {closed.sent.code} {closed.sent.reason!r}" if closed.sent else "no close from the client"
            stats["closes"].append(f"{node}, {client}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


async def main():
    node = subprocess.Popen([BINARY, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    addr = re.search(r"127\.0\.0\.1:\d+", node.stdout.readline()).group(0)
    stats = {"messages": 0, "notices": 0, "announced": 0, "closes": []}
    stop = asyncio.Event()
    subs = [asyncio.create_task(subscriber(addr, stats, stop)) for _ in range(SUBSCRIBERS)]
    await asyncio.sleep(0.5)
    pub = multiprocessing.Process(target=publisher, args=(addr, SECONDS))
    pub.start()
    rss_start, rss_peak, health_worst = rss_kib(node.pid), 0, 0.0
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        rss_peak = max(rss_peak, rss_kib(node.pid))
        t = time.monotonic()
        await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{addr}/healthz", timeout=60).read())
        health_worst = max(health_worst, time.monotonic() - t)
        await asyncio.sleep(1)
    pub.join()
    stop.set()
    await asyncio.gather(*subs)
    node.kill()
    print(f"node RSS {rss_start / 1024:.0f} MB at start, peak {rss_peak / 1024:.0f} MB; "
          f"slowest /healthz {health_worst * 1000:.0f} ms")
    print(f"{SUBSCRIBERS} drop subscribers reading {READ_RATE / 1000:.0f} KB/s: {stats['messages']} messages, "
          f"{stats['notices']} dropped notices announcing {stats['announced']} messages, "
          f"closes {stats['closes'] or 'none'}")


asyncio.run(main())

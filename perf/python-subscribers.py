#!/usr/bin/env python3
"""A Python `websockets` subscriber population (issue 16, point 1): the
server's CPU per delivery when its subscribers are a client nobody here
wrote, slower than fluxbench's, as a Python service fleet is.

One topic; SUBSCRIBERS `websockets` connections spread over PROCESSES
processes (asyncio, one event loop each); one publisher (also `websockets`)
sending RATE msg/s of 64-byte payloads for SECONDS; targets run in turns
(A, B, A, B), each with a fresh topic. RayFlux: raw topic sockets
(`/v1/topics/T/ws?role=sub|pub`, one frame per message); NATS: its
WebSocket port and text protocol (CONNECT, SUB, PUB; MSG parsed from the
byte stream, which NATS may pack many to a frame).

    python3 perf/python-subscribers.py --subscribers 100 --processes 2 \\
        --rate 500 --seconds 8 --repeat 2 \\
        --target rayflux=rayflux://127.0.0.1:18300,pid=P \\
        --target nats=nats://127.0.0.1:18222,pid=N

Prints one line per run: delivered, lost, out of order, latency p50/p99 (ms,
publish call to the subscriber's read), server CPU-s per million deliveries
(from /proc/PID/stat over the run) and the subscribers' CPU seconds; then
the ratio of each later target's CPU per delivery to the first's.
"""
import argparse
import asyncio
import multiprocessing as mp
import os
import struct
import time

import websockets

PAYLOAD = 64
# A subscriber gives up this long after the last message it got, once the
# publisher is done: what it has not received by then is lost.
QUIET_SECONDS = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_target(spec):
    name, rest = spec.split("=", 1)
    parts = rest.split(",")
    kind, addr = parts[0].split("://", 1)
    if kind not in ("rayflux", "nats"):
        raise SystemExit(f"unknown target {parts[0]}: rayflux://HOST:PORT or nats://HOST:PORT")
    pid = None
    for p in parts[1:]:
        key, value = p.split("=", 1)
        if key != "pid":
            raise SystemExit(f"unknown target option {p}")
        pid = int(value)
    return {"name": name, "kind": kind, "addr": addr, "pid": pid}


def nats_messages(buf):
    """Yields ('MSG', payload) and ('PING', None) from the front of `buf`
    (a bytearray), removing what it parsed; stops at an incomplete item."""
    while True:
        end = buf.find(b"\r\n")
        if end < 0:
            return
        line = bytes(buf[:end])
        if line.startswith(b"MSG "):
            size = int(line.split()[-1])
            if len(buf) < end + 2 + size + 2:
                return
            payload = bytes(buf[end + 2:end + 2 + size])
            del buf[:end + 2 + size + 2]
            yield "MSG", payload
        else:
            del buf[:end + 2]
            if line == b"PING":
                yield "PING", None


async def subscribe(target, topic):
    """An open subscription: a `websockets` connection that is live."""
    if target["kind"] == "rayflux":
        # Live before the 101 (docs/PROTOCOL.md).
        return await websockets.connect(f"ws://{target['addr']}/v1/topics/{topic}/ws?role=sub")
    ws = await websockets.connect(f"ws://{target['addr']}/")
    await ws.send(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB ' + topic.encode() + b" 1\r\nPING\r\n")
    buf = bytearray()
    while b"PONG\r\n" not in buf:
        buf += await ws.recv()
    return ws


async def receive(target, ws, expected, publisher_done, result):
    """Reads until `expected` messages or QUIET_SECONDS of silence after the
    publisher is done; counts and checks the order of what came."""
    nxt = 0
    got = 0
    buf = bytearray()
    while got < expected:
        try:
            frame = await asyncio.wait_for(ws.recv(), QUIET_SECONDS)
        except asyncio.TimeoutError:
            if publisher_done.is_set():
                break
            continue
        if target["kind"] == "rayflux":
            payloads = [frame]
        else:
            buf += frame
            payloads = []
            for kind, payload in nats_messages(buf):
                if kind == "PING":
                    await ws.send(b"PONG\r\n")
                else:
                    payloads.append(payload)
        now = time.time_ns() // 1000
        for payload in payloads:
            seq, sent_us = struct.unpack_from("<QQ", payload)
            if seq != nxt:
                result["out_of_order"] += 1
            nxt = seq + 1
            got += 1
            result["latency_us"].append(now - sent_us)
    result["got"] += got
    await ws.close()


def subscriber_process(target, topic, count, expected, ready, go, done, results):
    async def main():
        conns = [await subscribe(target, topic) for _ in range(count)]
        ready.put(len(conns))
        publisher_done = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, lambda: (done.wait(), loop.call_soon_threadsafe(publisher_done.set)))
        await loop.run_in_executor(None, go.wait)
        result = {"got": 0, "out_of_order": 0, "latency_us": []}
        await asyncio.gather(*(receive(target, ws, expected, publisher_done, result) for ws in conns))
        result["cpu"] = time.process_time()
        results.put(result)

    asyncio.run(main())


async def publish(target, topic, rate, seconds):
    if target["kind"] == "rayflux":
        ws = await websockets.connect(f"ws://{target['addr']}/v1/topics/{topic}/ws?role=pub")
        frame = lambda payload: payload
    else:
        ws = await websockets.connect(f"ws://{target['addr']}/")
        await ws.send(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
        frame = lambda payload: b"PUB " + topic.encode() + b" %d\r\n" % len(payload) + payload + b"\r\n"
    total = rate * seconds
    pad = bytes(PAYLOAD - 16)
    start = time.perf_counter()
    seq = 0
    while seq < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while seq < due:
            await ws.send(frame(struct.pack("<QQ", seq, time.time_ns() // 1000) + pad))
            seq += 1
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    await ws.close()
    return total, elapsed


def run(target, args, turn):
    topic = f"py-{turn}-{target['name']}-{os.getpid()}-{time.time_ns()}"
    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    go, done = ctx.Event(), ctx.Event()
    expected = args.rate * args.seconds
    per = [args.subscribers // args.processes + (1 if i < args.subscribers % args.processes else 0)
           for i in range(args.processes)]
    procs = [ctx.Process(target=subscriber_process, args=(target, topic, n, expected, ready, go, done, results))
             for n in per if n]
    for p in procs:
        p.start()
    opened = sum(ready.get(timeout=60) for _ in procs)
    cpu_before = cpu_seconds(target["pid"]) if target["pid"] else None
    go.set()
    published, elapsed = asyncio.run(publish(target, topic, args.rate, args.seconds))
    done.set()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    cpu_after = cpu_seconds(target["pid"]) if target["pid"] else None
    delivered = sum(r["got"] for r in got)
    latency = sorted(x for r in got for x in r["latency_us"])
    q = lambda p: latency[min(len(latency) - 1, int(len(latency) * p))] / 1000 if latency else float("nan")
    cpu_per_m = (cpu_after - cpu_before) / delivered * 1e6 if cpu_before is not None and delivered else None
    print(f"{target['name']:<8} turn {turn}  subscribers {opened}  published {published / elapsed:.0f}/s  "
          f"delivered {delivered / elapsed:.0f}/s  lost {published * opened - delivered}  "
          f"out of order {sum(r['out_of_order'] for r in got)}  latency ms p50 {q(0.5):.2f} p99 {q(0.99):.2f}  "
          f"server {'%.3f' % cpu_per_m if cpu_per_m is not None else '-'} CPU-s/M  "
          f"subscribers CPU {sum(r['cpu'] for r in got):.2f}s", flush=True)
    return cpu_per_m


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, help="NAME=rayflux://HOST:PORT[,pid=PID] or NAME=nats://...")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    targets = [parse_target(t) for t in args.target]
    cost = {t["name"]: [] for t in targets}
    for turn in range(args.repeat):
        for t in targets:
            cost[t["name"]].append(run(t, args, turn))
    first = targets[0]["name"]
    for t in targets[1:]:
        ratios = [f"{a / b:.2f}" if a and b else "-" for a, b in zip(cost[first], cost[t["name"]])]
        print(f"server CPU per delivery {first} / {t['name']} per turn: {' '.join(ratios)}")


if __name__ == "__main__":
    main()

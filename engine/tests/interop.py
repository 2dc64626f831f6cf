"""Interoperability check with a client nobody here wrote: Python `websockets`.

Drives the original RayFlux API (POST /publish, WebSocket /subscribe), the
raw topic socket and native batched delivery against a running fluxnode. Usage: interop.py HOST:PORT.
Exits non-zero with a message on the first failure.
"""

import asyncio
import json
import sys
import urllib.request

import websockets

ADDR = sys.argv[1]
TIMEOUT = 20


def http(method, path, body=None, content_type="application/json"):
    req = urllib.request.Request(f"http://{ADDR}{path}", data=body, method=method,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


async def wait_subscribers(topic, want):
    for _ in range(2000):
        status, info = await asyncio.to_thread(http, "GET", f"/v1/topics/{topic}")
        if status == 200 and info["subscribers"] >= want:
            return
        await asyncio.sleep(0.01)  # polling an observable, bounded
    raise AssertionError(f"{topic}: never saw {want} subscribers")


async def original_api():
    async with websockets.connect(f"ws://{ADDR}/subscribe") as ws:
        await ws.send(json.dumps({"subscriber_id": "py-1", "topic": "py.legacy"}))
        await wait_subscribers("py.legacy", 1)
        for i in range(50):
            status, body = await asyncio.to_thread(
                http, "POST", "/publish", json.dumps({"topic": "py.legacy", "message": f"msg {i} ✓"}).encode())
            assert status == 200 and body["status"] == "message accepted", (status, body)
        for i in range(50):
            frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert isinstance(frame, bytes), f"original API frames are binary, got {type(frame)}"
            assert frame.decode() == f"msg {i} ✓", frame
    status, body = await asyncio.to_thread(http, "POST", "/publish", b'{"topic": "a b", "message": "x"}')
    assert status == 400 and body["error"] == "invalid_topic", (status, body)
    print("original API: 50 messages in order, binary frames, 400 on a bad topic")


async def raw_socket():
    async with websockets.connect(f"ws://{ADDR}/v1/topics/py.raw/ws?role=sub") as sub, \
            websockets.connect(f"ws://{ADDR}/v1/topics/py.raw/ws?role=pub") as pub:
        await pub.send("text payload")
        await pub.send(b"\x00\x01binary")
        assert await asyncio.wait_for(sub.recv(), TIMEOUT) == "text payload"
        assert await asyncio.wait_for(sub.recv(), TIMEOUT) == b"\x00\x01binary"
    async with websockets.connect(f"ws://{ADDR}/v1/topics/py.raw/ws?role=sub&from=0") as replay:
        assert await asyncio.wait_for(replay.recv(), TIMEOUT) == "text payload"
        assert await asyncio.wait_for(replay.recv(), TIMEOUT) == b"\x00\x01binary"
    async with websockets.connect(f"ws://{ADDR}/v1/topics/py.raw/ws?role=sub", max_size=None) as sub:
        try:
            async with websockets.connect(f"ws://{ADDR}/v1/topics/py.raw/ws?role=pub", max_size=None) as pub:
                await pub.send(b"x" * (2 << 20))  # over the 1 MiB default limit
                await asyncio.wait_for(pub.recv(), TIMEOUT)
            raise AssertionError("oversized message was not refused")
        except websockets.exceptions.ConnectionClosedError as err:
            assert err.rcvd is not None and err.rcvd.code == 1009, err
    print("raw socket: opcodes kept, replay from history, 1009 on an oversized message")


def unpack_batch(frame):
    """The deliveries in a native batch frame (0x02, then per delivery its
    length, u32 big-endian, and its bytes), or the frame itself."""
    if not isinstance(frame, bytes) or frame[:1] != b"\x02":
        return [frame]
    records, at = [], 1
    while at < len(frame):
        n = int.from_bytes(frame[at:at + 4], "big")
        records.append(frame[at + 4:at + 4 + n])
        at += 4 + n
    assert at == len(frame), "a batch ends on a record"
    return records


async def native_batches():
    async with websockets.connect(f"ws://{ADDR}/v1/ws?delivery=batch") as sub, \
            websockets.connect(f"ws://{ADDR}/v1/ws") as pub:
        await sub.send(json.dumps({"op": "subscribe", "id": 1, "topic": "py.batch"}))
        assert json.loads(await asyncio.wait_for(sub.recv(), TIMEOUT))["ok"] is True
        # A native publish batch: 0x02, id, topic, count, then length + bytes each.
        topic, count = b"py.batch", 500
        frame = b"\x02" + (7).to_bytes(8, "big") + bytes([len(topic)]) + topic + count.to_bytes(2, "big")
        for i in range(count):
            payload = f"m{i}".encode()
            frame += len(payload).to_bytes(4, "big") + payload
        await pub.send(frame)
        reply = json.loads(await asyncio.wait_for(pub.recv(), TIMEOUT))
        assert reply["ok"] is True and reply["count"] == count, reply
        got, frames = [], 0
        while len(got) < count:
            frames += 1
            for record in unpack_batch(await asyncio.wait_for(sub.recv(), TIMEOUT)):
                assert record[:1] == b"\x01", record
                n = record[1]
                seq = int.from_bytes(record[2 + n:10 + n], "big")
                got.append((seq, record[18 + n:].decode()))
        assert got == [(i + 1, f"m{i}") for i in range(count)], got[:5]
        assert frames < count, f"{frames} frames for {count} deliveries: no batch"
    print(f"native batches: {count} deliveries in order in {frames} frames")


async def main():
    await original_api()
    await raw_socket()
    await native_batches()


asyncio.run(main())

"""Interoperability check with a client nobody here wrote: Python `websockets`.

Drives the original RayFlux API (POST /publish, WebSocket /subscribe) and the
raw topic socket against a running fluxnode. Usage: interop.py HOST:PORT.
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


async def main():
    await original_api()
    await raw_socket()


asyncio.run(main())

#!/usr/bin/env python3
"""Request/reply through RayFlux (Python `websockets`): a responder joins
the consumer group `pricing` of topic `quotes` and answers each request; a
client asks for three quotes and prints the answers, then asks a topic
nobody answers (`no_responders`).

    pip install websockets
    python3 examples/python/request_reply.py ws://localhost:8080/v1/ws
"""
import asyncio
import json
import sys

import websockets

TOPIC, GROUP = "quotes", "pricing"
PRICES = {"ACME": 12.5, "INIT": 3.25}


async def responder(url, ready):
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": TOPIC, "group": GROUP}))
        assert json.loads(await ws.recv())["ok"]
        ready.set()
        async for frame in ws:
            m = json.loads(frame)
            if m.get("type") != "message" or "reply_to" not in m:
                continue
            answer = {"op": "reply", "to": m["reply_to"], "topic": TOPIC, "group": GROUP, "seq": m["seq"]}
            price = PRICES.get(m["data"])
            if price is None:
                answer["error"] = {"code": "unknown_symbol", "message": m["data"]}
            else:
                answer["data"] = json.dumps({"symbol": m["data"], "price": price})
            await ws.send(json.dumps(answer))


async def ask(ws, id, topic, data):
    await ws.send(json.dumps({"op": "request", "id": id, "topic": topic, "data": data, "timeout_ms": 2000}))
    while True:
        r = json.loads(await ws.recv())
        if r.get("type") == "reply" and r["id"] == id:
            return r


async def main(url):
    ready = asyncio.Event()
    task = asyncio.create_task(responder(url, ready))
    await ready.wait()
    async with websockets.connect(url) as ws:
        for i, symbol in enumerate(["ACME", "INIT", "NOPE"], start=1):
            r = await ask(ws, i, TOPIC, symbol)
            print(symbol, "->", r.get("data") if r["ok"] else r["error"])
        r = await ask(ws, 9, "nobody-listens", "hello")
        print("nobody-listens ->", r["error"]["code"])
    task.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

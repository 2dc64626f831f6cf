"""Issue 12.4's last scenario, measured: one client address opens many
native connections and subscribes each to as many distinct topics as it
may, trying to fill the node's topic table; then clients from other
addresses try to subscribe to new topics. The node runs with its default
limits and `--proxy-protocol`, so that each connection can name its client
address in a PROXY v2 header, as FluxBalancer does.

Prints how many subscriptions the hostile address got, the refusal codes it
met, and how many the other addresses got.

Usage: topic_lockout.py FLUXNODE_BINARY [CONNECTIONS] [SUBSCRIPTIONS_EACH]
"""

import collections
import json
import re
import socket
import struct
import subprocess
import sys

from websockets.sync.client import connect

BINARY = sys.argv[1]
CONNECTIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
EACH = int(sys.argv[3]) if len(sys.argv) > 3 else 1024


def proxied(addr, client_ip):
    """A native connection whose PROXY v2 header names `client_ip`."""
    host, port = addr.split(":")
    sock = socket.create_connection((host, int(port)))
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
    header += socket.inet_aton(client_ip) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 50000, 8080)
    sock.sendall(header)
    return connect(f"ws://{addr}/v1/ws", sock=sock, max_size=None)


def subscribe_all(ws, prefix, count):
    """Pipelines `count` subscribes, then reads every reply."""
    for i in range(count):
        ws.send(json.dumps({"op": "subscribe", "id": i + 1, "topic": f"{prefix}-{i}"}))
    outcome = collections.Counter()
    replies = 0
    while replies < count:
        reply = json.loads(ws.recv(timeout=30))
        if reply.get("type") != "reply":
            continue
        replies += 1
        outcome["ok" if reply.get("ok") else reply["error"]["code"]] += 1
    return outcome


node = subprocess.Popen([BINARY, "--listen", "127.0.0.1:0", "--proxy-protocol"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    addr = re.search(r"127\.0\.0\.1:\d+", node.stdout.readline()).group(0)
    hostile = collections.Counter()
    kept = []
    for c in range(CONNECTIONS):
        ws = proxied(addr, "10.0.0.66")
        hostile += subscribe_all(ws, f"h{c}", EACH)
        kept.append(ws)
    print(f"hostile address, {CONNECTIONS} connections x {EACH} subscribes: {dict(hostile)}", flush=True)
    others = collections.Counter()
    for o in range(4):
        ws = proxied(addr, f"10.0.1.{o + 1}")
        others += subscribe_all(ws, f"o{o}", 100)
        kept.append(ws)
    print(f"4 other addresses x 100 new topics each: {dict(others)}", flush=True)
    for ws in kept:
        ws.close()
finally:
    node.terminate()
    node.wait()

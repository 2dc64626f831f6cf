"""Issue 12.5's scenario, measured: `GET /v1/topics` on a node with many
topics, while a healthy subscriber receives a message every millisecond.
Prints, per listing call, its time and size, the longest gap the healthy
subscriber saw during it, and the node's RSS before and after.

Usage: topic_listing.py FLUXNODE_BINARY [TOPICS] [MODE]
MODE: `all` (one GET /v1/topics, as an old client calls it) or `pages`
(every page of 1,000 through the cursor).
"""

import http.client
import json
import re
import subprocess
import sys
import threading
import time

from websockets.sync.client import connect

BINARY = sys.argv[1]
TOPICS = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
MODE = sys.argv[3] if len(sys.argv) > 3 else "all"


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


node = subprocess.Popen([BINARY, "--listen", "127.0.0.1:0", "--topics-max", str(TOPICS + 1000),
                         "--history-bytes-max", "16384"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
addr = re.search(r"127\.0\.0\.1:\d+", node.stdout.readline()).group(0)
host, port = addr.split(":")
conn = http.client.HTTPConnection(host, int(port), timeout=60)
start = time.monotonic()
for i in range(TOPICS):
    conn.request("POST", f"/v1/topics/t{i:07d}", body=b"x", headers={"content-type": "text/plain"})
    conn.getresponse().read()
print(f"{TOPICS} topics made in {time.monotonic() - start:.1f} s; node RSS {rss_mb(node.pid):.0f} MB", flush=True)

# The healthy subscriber and its publisher: one message a millisecond.
gaps = []
stop = threading.Event()
sub = connect(f"ws://{addr}/v1/topics/live/ws?role=sub")


def publish():
    pub = connect(f"ws://{addr}/v1/topics/live/ws?role=pub")
    while not stop.is_set():
        pub.send("tick")
        time.sleep(0.001)
    pub.close()


def receive():
    last = time.monotonic()
    while not stop.is_set():
        try:
            sub.recv(timeout=1)
        except TimeoutError:
            pass
        now = time.monotonic()
        gaps.append((now, now - last))
        last = now


threads = [threading.Thread(target=publish), threading.Thread(target=receive)]
for t in threads:
    t.start()
time.sleep(1)


def listing(path):
    t = time.monotonic()
    conn.request("GET", path)
    body = conn.getresponse().read()
    return time.monotonic() - t, body


before = rss_mb(node.pid)
t0 = time.monotonic()
if MODE == "all":
    took, body = listing("/v1/topics")
    calls, size, worst = 1, len(body), took
    listed = len(json.loads(body)["topics"])
else:
    calls, size, worst, listed, path = 0, 0, 0.0, 0, "/v1/topics?limit=1000"
    while True:
        took, body = listing(path)
        page = json.loads(body)
        calls, size, worst, listed = calls + 1, size + len(body), max(worst, took), listed + len(page["topics"])
        if page["next"] is None:
            break
        path = f"/v1/topics?limit=1000&after={page['next']}"
t1 = time.monotonic()
time.sleep(1)
stop.set()
for t in threads:
    t.join()
during = [gap for at, gap in gaps if t0 <= at <= t1 + 0.5]
outside = [gap for at, gap in gaps if at < t0]
print(f"{MODE}: {calls} calls listing {listed} topics, {size / 1e6:.1f} MB in all, slowest call {worst * 1000:.0f} ms, "
      f"all calls {(t1 - t0) * 1000:.0f} ms")
print(f"healthy subscriber: longest gap {max(during, default=0) * 1000:.0f} ms during the listing "
      f"({max(outside, default=0) * 1000:.0f} ms before it)")
print(f"node RSS {before:.0f} MB before the listing, {rss_mb(node.pid):.0f} MB after")
node.kill()

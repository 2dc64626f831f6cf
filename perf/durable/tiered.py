#!/usr/bin/env python3
"""Tiered reads on a running node: declare TOPIC durable keeping about
KEEP_MB on local disk, fill it with SIZE_MB of 1 KiB messages (every 100th
with key `agg-42`), wait until retention has moved the older segments to
the object store only, then time

  1. reading every message from seq 0 through GET /v1/topics/T/messages
     (pages of up to 10,000 messages or 4 MiB, JSON), store then disk;
  2. the same again (fetched segments are cached, up to 128 MiB a shard);
  3. a key replay of `agg-42` (archived segments are scanned, 4 MiB a page).

  python3 perf/durable/tiered.py HOST:PORT TOPIC SIZE_MB KEEP_MB
"""
import asyncio
import json
import sys
import time
import urllib.request

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from replay import fill, http  # noqa: E402


def metric(addr, name):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def read_all(addr, topic, query):
    t0 = time.time()
    got, frm, pages = 0, 0, 0
    while True:
        page = http("GET", f"http://{addr}/v1/topics/{topic}/messages?{query}from_seq={frm}&limit=10000")
        got += len(page["messages"])
        pages += 1
        if page["next_seq"] is None:
            return got, pages, time.time() - t0
        frm = page["next_seq"]


def main():
    addr, topic, size_mb, keep_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    count = size_mb * 1024 * 1024 // 1060
    spec = json.dumps({"ack": "local", "retention": {"max_bytes": keep_mb * 1024 * 1024}}).encode()
    http("PUT", f"http://{addr}/v1/topics/{topic}", spec)
    t0 = time.time()
    asyncio.run(fill(addr, topic, count))
    print(f"filled {count} messages in {time.time() - t0:.1f} s")
    while True:
        info = http("GET", f"http://{addr}/v1/topics/{topic}")
        d = info["durable"]
        if d["unwritten"] == 0 and metric(addr, "fluxnode_upload_backlog_bytes") == 0 and d["archived_segments"] > 0:
            break
        time.sleep(0.2)
    print(f"on disk {d['log_bytes'] / 1e6:.0f} MB ({d['segments']} segments) from seq {d['local_first_seq']}; "
          f"only in the store {d['archived_bytes'] / 1e6:.0f} MB ({d['archived_segments']} segments)")
    total_mb = (d["log_bytes"] + d["archived_bytes"]) / 1e6
    for run in ("first", "again"):
        fetched0 = metric(addr, "fluxnode_fetched_bytes_total")
        got, pages, s = read_all(addr, topic, "")
        fetched = (metric(addr, "fluxnode_fetched_bytes_total") - fetched0) / 1e6
        print(f"read all ({run}): {got} messages, {pages} pages, {total_mb:.0f} MB of records in {s:.2f} s "
              f"= {total_mb / s:.0f} MB/s; fetched from the store {fetched:.0f} MB")
    got, pages, s = read_all(addr, topic, "key=agg-42&")
    print(f"key replay agg-42: {got} events, {pages} pages, {s:.2f} s")


if __name__ == "__main__":
    main()

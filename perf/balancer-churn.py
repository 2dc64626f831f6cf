#!/usr/bin/env python3
"""Connection churn through proxies (issue 16, point 4, a second regime):
every request is a new TCP connection (`POST /v1/topics/churn` with
`Connection: close`, 64-byte body), from PROCESSES client processes, N
requests each, targets in turns. Prints connections/s and each target's own
CPU-seconds per 1,000 connections (from /proc/PID/stat), then the ratio of
each later target's CPU to the first's.

    python3 perf/balancer-churn.py --requests 3000 --repeat 2 \\
        fluxbalancer:19080:PID haproxy:19180:PID
"""
import argparse
import multiprocessing as mp
import os
import socket
import time

BODY = b"x" * 64
REQUEST = (
    b"POST /v1/topics/churn HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 64\r\n\r\n" + BODY
)


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(port, n):
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(REQUEST)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("targets", nargs="+", help="NAME:PORT:PID")
    parser.add_argument("--requests", type=int, default=3000, help="per client process")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    costs = {}
    for turn in range(args.repeat):
        for target in args.targets:
            name, port, pid = target.split(":")
            before, started = cpu_seconds(int(pid)), time.time()
            procs = [mp.Process(target=client, args=(int(port), args.requests)) for _ in range(args.processes)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
                assert p.exitcode == 0, f"{name}: a client failed"
            total = args.requests * args.processes
            elapsed, used = time.time() - started, cpu_seconds(int(pid)) - before
            cost = 1000 * used / total
            costs.setdefault(turn, []).append(cost)
            print(f"{name:12} turn {turn}  {total / elapsed:8.0f} connections/s  {cost:.3f} CPU-s per 1,000 connections")
    first = args.targets[0].split(":")[0]
    for i, target in enumerate(args.targets[1:], 1):
        ratios = " ".join(f"{costs[t][0] / costs[t][i]:.2f}" for t in costs)
        print(f"CPU per connection {first} / {target.split(':')[0]} per turn: {ratios}")


if __name__ == "__main__":
    main()

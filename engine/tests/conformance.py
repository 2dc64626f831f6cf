"""WebSocket conformance: the Autobahn TestSuite's fuzzingclient cases against
the raw topic socket, judged as Autobahn judges them.

The cases are Autobahn's own case files, run by `kosoku` (PyPI), which vendors
them with only mechanical Python 2 to 3 fixes and replaces Autobahn's Python 2
runner; the real `autobahntestsuite` package still needs Python 2. The raw
topic socket with `role=pubsub` delivers a client's own publishes back to it
verbatim and with their opcode (docs/PROTOCOL.md), so it acts as the echo
server the cases expect. Each case gets a topic of its own, so cases can run
side by side without seeing each other's messages.

Usage: conformance.py HOST:PORT --report PATH [--html DIR] [--case GLOB ...]
Prints one line per case, writes a JSON report (verdict per case and counts)
and, with --html, Autobahn's own report format; exits 1 if any case FAILED.
"""

import argparse
import asyncio
import fnmatch
import json
import sys
import time
from pathlib import Path

import kosoku
from kosoku.cases import CASES

# The fuzzingclient groups that apply to a server without extensions. Left
# out: 12.* and 13.* (permessage-deflate, which the node does not offer) and
# the 9.* cases whose messages are 1 MiB or more (9.1.3-9.1.6, 9.2.3-9.2.6,
# 9.3.* to 9.6.*), the node's default message_bytes_max; 9.* is Autobahn's
# limits and performance group, so the smaller sizes still test the path.
INCLUDE = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*",
           "9.1.1", "9.1.2", "9.2.1", "9.2.2", "9.7.*", "9.8.*", "10.1.1"]

# Cases run side by side, each on its own connection and topic. Autobahn's
# cases wait on timers of up to a few seconds (killAfter, delayed frames),
# so running them one at a time would take minutes.
CONCURRENCY = 16

# Bound on one case, far above any case's own timers (9.7.* allow 60 s), so
# a runner that never returns fails the case instead of hanging the test.
CASE_TIMEOUT_S = 90

# Autobahn's verdicts that pass. A case FAILS when its message verdict
# (`behavior`) or its closing verdict (`behaviorClose`) is anything else:
# FAILED, UNCLEAN, WRONG CODE, FAILED BY CLIENT, or ERROR (kosoku's "could
# not run": a refused connection or a crash). This is kosoku's own `passed`.
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addr", help="HOST:PORT of a running fluxnode")
    parser.add_argument("--report", required=True, help="path of the JSON report to write")
    parser.add_argument("--html", help="directory for Autobahn's own report format (HTML and JSON)")
    parser.add_argument("--case", action="append", help="case id or glob to run instead of the whole set")
    args = parser.parse_args()

    case_ids = select(args.case or INCLUDE)
    started = time.monotonic()
    results = asyncio.run(run_all(args.addr, case_ids))
    elapsed_s = time.monotonic() - started

    rows = [row(result) for result in results]
    for r in rows:
        print(line(r))
    counts = {verdict: sum(r["verdict"] == verdict for r in rows) for verdict in PASSING + ("FAILED",)}
    report = {
        "suite": f"Autobahn TestSuite fuzzingclient cases, run by kosoku {version()}",
        "url": url(args.addr, "{topic}"),
        "agent": results[0].agent if results else "",
        "elapsed_s": round(elapsed_s, 1),
        "counts": counts,
        "cases": rows,
    }
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.html:
        from kosoku._report import write_reports  # the format Autobahn's own reports use
        write_reports(results, args.html)
    summary = ", ".join(f"{count} {verdict}" for verdict, count in counts.items())
    print(f"conformance: {len(rows)} cases in {elapsed_s:.1f} s: {summary}; report in {args.report}")
    sys.exit(1 if counts["FAILED"] else 0)


def select(patterns):
    """Case ids matching any pattern, in Autobahn's order; a pattern that
    matches nothing is an error, so a typo never shrinks the run silently."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(case_id, pattern) for case_id in CASES):
            sys.exit(f"no Autobahn case matches {pattern!r}")
    return [case_id for case_id in CASES if any(fnmatch.fnmatchcase(case_id, p) for p in patterns)]


async def run_all(addr, case_ids):
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(case_id):
        async with limit:
            return await run_case(addr, case_id)

    return await asyncio.gather(*(one(case_id) for case_id in case_ids))


async def run_case(addr, case_id):
    """One case on a fresh topic; kosoku raises FailureError, holding the
    result, when the case fails."""
    topic = "autobahn-" + case_id
    try:
        results = await asyncio.wait_for(kosoku.run_fuzzingclient(url(addr, topic), [case_id]), CASE_TIMEOUT_S)
    except kosoku.FailureError as failure:
        results = failure.results
    if len(results) != 1 or results[0].case_id != case_id:
        raise RuntimeError(f"case {case_id}: kosoku returned {results!r}")
    return results[0]


def url(addr, topic):
    return f"ws://{addr}/v1/topics/{topic}/ws?role=pubsub"


def row(result):
    behavior, behavior_close = result.behavior.value, result.behavior_close.value
    passed = behavior in PASSING and behavior_close in PASSING
    return {
        "id": result.case_id,
        "verdict": behavior if passed else "FAILED",
        "behavior": behavior,
        "behavior_close": behavior_close,
        "result": result.result,
        "result_close": result.result_close,
        "remote_close_code": result.remote_close_code,
        "remote_close_reason": result.remote_close_reason,
        "duration_ms": result.duration,
        "description": result.description,
        "expectation": result.expectation,
    }


def line(r):
    text = f"{r['id']:<8} {r['verdict']}"
    if r["verdict"] != "OK":
        text += f" (behavior {r['behavior']}: {r['result']}; close {r['behavior_close']}: {r['result_close']};" \
                f" node's close code {r['remote_close_code']})"
    return text


def version():
    from importlib.metadata import version as package_version
    return package_version("kosoku")


if __name__ == "__main__":
    main()

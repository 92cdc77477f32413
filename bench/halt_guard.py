"""Halt guard: how fast a position opened while trading is halted is taken flat again, and how
fast a second EEW takes the guard over when the holder is killed -9.

    python bench/halt_guard.py [--interval-s 5] [--repeats 10] [--latency-ms 25]

After a panic's FLAT report, a "bot" opens one position on the paper exchange at a random
moment; the time until the paper account is flat again (polled in process every 5 ms) and
until the HALT_VIOLATION report appears is recorded. Target (issue 16): within
EEXIT_HALT_GUARD_S + 3 round trips. The guard's check is one full read, then the close is
read, close, verify: 4 latencies after the check, so the max can miss by about one latency.
Takeover: two EEWs, the lease holder killed -9, time until the other holds the lease; target:
within one lease period (3 x EEXIT_HALT_GUARD_S: TTL 2.5 intervals + one renewal step), plus
one loop pass (EEXIT_BLOCK_MS, 100 ms here). Writes bench/results/halt_guard.json.
"""

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eexit import guard_policy, schema  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import python_env, start_module, stop_process, wait_for  # noqa: E402


def reports(client, reason=None):
    found = []
    for _id, raw in client.xrange(schema.COMPLETED_STREAM):
        report, _ = schema.CompletionReport.from_fields(raw)
        if reason is None or report.reason == reason:
            found.append(report)
    return found


def start_eew(redis_server, paper, tmp, consumer, interval_s):
    env = python_env(REDIS_URL=redis_server.url, EEXIT_CONSUMER=consumer, EEXIT_EXCHANGE_URL=paper.base_url,
                     EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret", EEXIT_BUS_LOSS_CLOSE_S=0,
                     EEXIT_JOURNAL=os.path.join(tmp, f"{consumer}-journal.jsonl"),
                     EEXIT_HALT_GUARD_S=interval_s, EEXIT_BLOCK_MS=100)
    return start_module("eexit.eew", env, os.path.join(tmp, f"{consumer}.log"))


def percentile(values, q):
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def run(interval_s, repeats, latency_ms):
    redis_server = RedisServer(die_with_parent=True).start()
    client = redis_server.client()
    paper = PaperExchange()
    paper.start()
    paper.reset(seed="BTCUSDT:0.01")
    if latency_ms:
        paper.add_fault(kind="latency", ms=latency_ms)
    tmp = tempfile.mkdtemp(prefix="eexit-bench-guard-")
    processes = {name: start_eew(redis_server, paper, tmp, name, interval_s) for name in ("guard-a", "guard-b")}
    to_flat, to_report = [], []
    try:
        wait_for(lambda: client.xlen(schema.EEW_HEARTBEAT_STREAM), 60, message="EEW heartbeat")
        event_id = str(uuid.uuid4())
        client.xadd(schema.PANIC_STREAM, {"event_id": event_id, "reason": "BENCH_GUARD", "severity": "CRITICAL",
                                          "issued_by": "ops", "ts": str(int(time.time() * 1000))})
        wait_for(lambda: any(r.event_id == event_id for r in reports(client)), 60, message="panic report")
        for index in range(repeats):
            time.sleep(random.uniform(0, interval_s))       # a random phase against the guard's checks
            before = len(reports(client, guard_policy.HALT_VIOLATION))
            started = time.perf_counter()
            paper.set_position("ETHUSDT", 0.5 if index % 2 else -0.5)
            wait_for(lambda: not paper.positions(), 10 * interval_s + 30, interval_s=0.005, message="flat again")
            to_flat.append((time.perf_counter() - started) * 1000)
            wait_for(lambda: len(reports(client, guard_policy.HALT_VIOLATION)) > before, 30, interval_s=0.005,
                     message="violation report")
            to_report.append((time.perf_counter() - started) * 1000)
            print(f"  violation {index + 1}/{repeats}: flat after {to_flat[-1]:.0f} ms", flush=True)
        holder = client.get(schema.GUARD_LEASE_KEY).decode()
        processes[holder].send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        survivor = "guard-b" if holder == "guard-a" else "guard-a"
        wait_for(lambda: client.get(schema.GUARD_LEASE_KEY) == survivor.encode(), 10 * interval_s + 30,
                 interval_s=0.005, message="takeover")
        takeover_ms = (time.perf_counter() - killed) * 1000
        consumers = [r.extra.get("consumer") for r in reports(client, guard_policy.HALT_VIOLATION)]
    finally:
        for process in processes.values():
            stop_process(process)
        paper.stop()
        client.close()
        redis_server.stop()
    target_ms = interval_s * 1000 + 3 * latency_ms
    return {"interval_s": interval_s, "latency_ms": latency_ms, "repeats": repeats, "target_ms": target_ms,
            "to_flat_ms": {"p50": percentile(to_flat, 0.5), "p99": percentile(to_flat, 0.99),
                           "max": round(max(to_flat), 1)},
            "to_report_ms": {"p50": percentile(to_report, 0.5), "max": round(max(to_report), 1)},
            "violation_reports": len(consumers), "one_report_each": len(consumers) == repeats,
            "takeover_ms": round(takeover_ms, 1), "lease_period_ms": int(3000 * interval_s),
            "settings": {"EEXIT_HALT_GUARD_S": interval_s, "EEXIT_BLOCK_MS": 100, "paper_latency_ms": latency_ms}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval-s", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latency-ms", type=int, default=25)
    args = parser.parse_args()
    print(f"halt guard: {args.repeats} violations, EEXIT_HALT_GUARD_S={args.interval_s:g}, "
          f"latency {args.latency_ms} ms ...", flush=True)
    result = run(args.interval_s, args.repeats, args.latency_ms)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "halt_guard.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    flat = result["to_flat_ms"]
    print(f"open -> flat p50 {flat['p50']} ms, max {flat['max']} ms (target {result['target_ms']} ms); "
          f"takeover {result['takeover_ms']} ms (lease period {result['lease_period_ms']} ms); "
          f"{result['violation_reports']} reports for {args.repeats} violations")
    return 0 if result["one_report_each"] else 1


if __name__ == "__main__":
    sys.exit(main())

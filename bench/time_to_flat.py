"""Time to flat: XADD of a panic -> the EEW's FLAT report, for N positions at paper latency L.

    python bench/time_to_flat.py [--sizes 1,10,50,200] [--latencies 0,25,100] [--repeats 5]
                                 [--with-1000] [--no-naive] [--out bench/results/time_to_flat.json]

Everything real: a private redis-server, the paper exchange in this process (real HTTP) with
L ms of latency on every request, `python -m eexit.eew` as a process with its default pacing
and concurrency. Per (L, N), `repeats` runs: seed N positions on N symbols (alternating long and
short), XADD, block on the completed stream; the figure is XADD -> report as seen by this
process, wall clock, one machine. Shown next to:

  floor  3 x L: one account read, one round of closes, one verifying read, all in parallel;
  naive  ccxt with its defaults (enableRateLimit=True), fetch_positions() and one reduce-only
         market order per position, sequentially, no verification: the predecessor's method.
         Run once per (L, N), not for N = 1000.

Target (EEW issue): <= 3 x L + 100 ms for N <= 50. Prints a table of medians; writes JSON.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ccxt  # noqa: E402

from eexit import schema  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import python_env, start_module, stop_process, wait_for  # noqa: E402

def quiet_period_s(n):
    """Independent incidents: wait until the EEW's order windows (300 / 10 s, 1200 / 60 s by
    default) hold none of the previous runs' orders, so each run starts as after calm."""
    if n >= 300:
        return 60.2
    return 10.2 if n >= 50 else 0.2


def seed_for(n):
    return {f"P{i:04d}USDT": ("10" if i % 2 else "-10") for i in range(1, n + 1)}


def wait_ready(client, consumer, process, timeout_s=60):
    def ready():
        if process.poll() is not None:
            raise RuntimeError("EEW exited during start-up")
        for _id, fields in client.xrevrange(schema.EEW_HEARTBEAT_STREAM, count=10):
            if fields.get(b"service_id") == consumer.encode() and fields.get(b"status") == b"OK":
                return True
        return False
    wait_for(ready, timeout_s, message="EEW ready")


def reset(paper, n, latency):
    paper.reset(seed=seed_for(n))            # also clears faults: put the latency back
    if latency:
        paper.add_fault(kind="latency", ms=latency)


def clear_halt(client):
    """The last panic's halt stands: the EEW's halt guard would close the next seed (under the
    EEW's panic, or the naive method's orders: -2022 on a position already gone). An
    operator's resume, in effect, then a second for a guard check that read the halt to end."""
    client.delete(schema.TRADING_STATE_KEY)
    time.sleep(1.0)


def eew_run(client, paper, n, latency, timeout_s):
    clear_halt(client)
    reset(paper, n, latency)
    time.sleep(quiet_period_s(n))
    last = client.xrevrange(schema.COMPLETED_STREAM, count=1)
    last_id = last[0][0] if last else b"0-0"
    event_id = str(uuid.uuid4())
    fields = {"event_id": event_id, "reason": "BENCH", "severity": "CRITICAL",
              "issued_by": "ops", "ts": str(int(time.time() * 1000))}
    start = time.perf_counter()
    client.xadd(schema.PANIC_STREAM, fields)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = client.xread({schema.COMPLETED_STREAM: last_id}, block=1000)
        for _stream, items in reply or []:
            for entry_id, raw in items:
                last_id = entry_id
                report, _ = schema.CompletionReport.from_fields(raw)
                if report.event_id == event_id:
                    elapsed_ms = (time.perf_counter() - start) * 1000
                    flat = report.status == "FLAT" and not paper.positions()
                    return elapsed_ms, report.status, flat, report.attempts
    raise RuntimeError(f"no report within {timeout_s}s for N={n}")


def naive_run(client, paper, n, latency):
    clear_halt(client)
    reset(paper, n, latency)
    ex = ccxt.binanceusdm({"apiKey": "paper-key", "secret": "paper-secret"})   # defaults
    ex.options["fetchCurrencies"] = False
    ex.urls["api"] = {k: paper.base_url + v[v.index("/", 8):] if isinstance(v, str) else v
                      for k, v in ex.urls["api"].items()}
    ex.load_markets()
    start = time.perf_counter()
    for position in ex.fetch_positions():
        side = "sell" if position["side"] == "long" else "buy"
        ex.create_order(position["symbol"], "market", side, position["contracts"], None,
                        {"reduceOnly": True})
    elapsed_ms = (time.perf_counter() - start) * 1000
    return elapsed_ms, not paper.positions()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,10,50,200")
    parser.add_argument("--latencies", default="0,25,100")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--with-1000", action="store_true")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "time_to_flat.json"))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")] + ([1000] if args.with_1000 else [])
    latencies = [int(x) for x in args.latencies.split(",")]

    redis_server = RedisServer(die_with_parent=True).start()
    client = redis_server.client()
    tmp = tempfile.mkdtemp(prefix="eexit-bench-")
    rows = []
    try:
        for latency in latencies:
            paper = PaperExchange(latency_ms=latency, synthetic=max(sizes))
            paper.start()
            consumer = f"bench-{latency}"
            env = python_env(REDIS_URL=redis_server.url, EEXIT_CONSUMER=consumer,
                             EEXIT_EXCHANGE_URL=paper.base_url, EEXIT_API_KEY="paper-key",
                             EEXIT_API_SECRET="paper-secret", EEXIT_BUS_LOSS_CLOSE_S=0,
                             EEXIT_JOURNAL=os.path.join(tmp, f"{consumer}.jsonl"),
                             EEXIT_CLOSE_DEADLINE_S=120)
            process = start_module("eexit.eew", env, os.path.join(tmp, f"{consumer}.log"))
            try:
                wait_ready(client, consumer, process)
                eew_run(client, paper, 1, latency, 60)                    # warm the connections
                for n in sizes:
                    repeats = 1 if n >= 1000 else args.repeats if n <= 50 else min(3, args.repeats)
                    runs = [eew_run(client, paper, n, latency, 300) for _ in range(repeats)]
                    naive = None if args.no_naive or n >= 1000 else naive_run(client, paper, n, latency)
                    row = {"latency_ms": latency, "positions": n, "floor_ms": 3 * latency,
                           "eew_median_ms": round(statistics.median(r[0] for r in runs), 1),
                           "eew_runs_ms": [round(r[0], 1) for r in runs],
                           "eew_all_flat": all(r[2] for r in runs),
                           "eew_attempts": [r[3] for r in runs],
                           "naive_ms": None if naive is None else round(naive[0], 1),
                           "naive_flat": None if naive is None else naive[1],
                           "target_ms": 3 * latency + 100 if n <= 50 else None}
                    rows.append(row)
                    print(f"L={latency:>3} ms N={n:>4}  eew {row['eew_median_ms']:>8.1f} ms  "
                          f"floor {row['floor_ms']:>4} ms  naive {row['naive_ms']} ms  "
                          f"flat={row['eew_all_flat']}", flush=True)
            finally:
                stop_process(process)
                paper.stop()
    finally:
        client.close()
        redis_server.stop()

    print()
    print(f"{'L ms':>5} {'N':>5} {'floor':>7} {'EEW p50':>9} {'target':>7} {'naive':>9}  flat")
    for row in rows:
        target = "" if row["target_ms"] is None else str(row["target_ms"])
        naive = "-" if row["naive_ms"] is None else f"{row['naive_ms']:.0f}"
        print(f"{row['latency_ms']:>5} {row['positions']:>5} {row['floor_ms']:>7} "
              f"{row['eew_median_ms']:>9.1f} {target:>7} {naive:>9}  {row['eew_all_flat']}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"benchmark": "time_to_flat", "ts": int(time.time()), "python": platform.python_version(),
                   "ccxt": ccxt.__version__, "cpus": os.cpu_count(), "rows": rows}, handle, indent=2)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

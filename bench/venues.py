"""Time to flat per venue: XADD -> the EEW's FLAT report, N positions, L ms paper latency,
the venue's own dialect, limits and segments.

    python bench/venues.py [--venues binanceusdm,bybit,okx] [--positions 50] [--latency-ms 25]
                           [--repeats 5] [--out bench/results/venues.json]

Per venue: the paper exchange in that venue's dialect (in this process, real HTTP, L ms on
every request), `python -m eexit.eew` with EEXIT_EXCHANGE=<venue> and NO EEXIT_ORDER_LIMITS,
so the venue's default order limits pace the closes (Binance 300/10,1200/60, Bybit 10/1,
OKX 60/2). N positions on N synthetic symbols, alternating long/short, one-way mode. Before
each run it waits 10.2 s, so the order windows are empty. Target (issue 15): 3 x L + 100 ms. A venue
whose limit admits fewer than N orders in one window cannot meet it: the floor is shown.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ccxt  # noqa: E402

from time_to_flat import eew_run, wait_ready  # noqa: E402
from eexit import exchange, venues  # noqa: E402
from eexit.eew import parse_order_limits  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import python_env, start_module, stop_process  # noqa: E402


def limit_floor_ms(limits, n, latency):
    """The least time N orders can take under the limits: full windows waited, plus the
    read, one round trip and the verify."""
    windows = max(math.ceil(n / count) - 1 for count, _ in limits)
    worst = max(window_s for count, window_s in limits if math.ceil(n / count) - 1 == windows)
    return windows * worst * 1000 + 3 * latency


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--venues", default=",".join(sorted(venues.VENUES)))
    parser.add_argument("--positions", type=int, default=50)
    parser.add_argument("--latency-ms", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "venues.json"))
    args = parser.parse_args(argv)
    n, latency = args.positions, args.latency_ms
    redis_server = RedisServer(die_with_parent=True).start()
    client = redis_server.client()
    tmp = tempfile.mkdtemp(prefix="eexit-bench-venues-")
    rows = []
    try:
        for venue in args.venues.split(","):
            limits_text = exchange.default_order_limits(venue)
            limits = parse_order_limits(limits_text)
            paper = PaperExchange(latency_ms=latency, synthetic=n, venue=venue)
            paper.start()
            consumer = f"bench-{venue}"
            extra = {"EEXIT_API_PASSWORD": paper.api_password} if venues.VENUES[venue].NEEDS_PASSWORD else {}
            env = python_env(REDIS_URL=redis_server.url, EEXIT_CONSUMER=consumer, EEXIT_EXCHANGE=venue,
                             EEXIT_EXCHANGE_URL=paper.base_url, EEXIT_API_KEY="paper-key",
                             EEXIT_API_SECRET="paper-secret", EEXIT_BUS_LOSS_CLOSE_S=0,
                             EEXIT_JOURNAL=os.path.join(tmp, f"{consumer}.jsonl"),
                             EEXIT_CLOSE_DEADLINE_S=120, **extra)
            process = start_module("eexit.eew", env, os.path.join(tmp, f"{consumer}.log"))
            try:
                wait_ready(client, consumer, process)
                eew_run(client, paper, 1, latency, 60)               # warm the connections
                # eew_run waits 10.2 s before each run (N >= 50): every window of 10 s or less is
                # empty; Binance's 1200/60 never binds for repeats x 50 orders.
                runs = [eew_run(client, paper, n, latency, 300) for _ in range(args.repeats)]
            finally:
                stop_process(process)
                paper.stop()
            row = {"venue": venue, "scope": exchange.scope(venue), "positions": n, "latency_ms": latency,
                   "order_limits": limits_text, "target_ms": 3 * latency + 100,
                   "limit_floor_ms": limit_floor_ms(limits, n, latency),
                   "median_ms": round(statistics.median(r[0] for r in runs), 1),
                   "runs_ms": [round(r[0], 1) for r in runs], "all_flat": all(r[2] for r in runs),
                   "attempts": [r[3] for r in runs]}
            rows.append(row)
            print(f"{venue:<12} N={n} L={latency} ms limits={limits_text:<16} p50 {row['median_ms']:>8.1f} ms "
                  f"target {row['target_ms']} ms  floor {row['limit_floor_ms']} ms  flat={row['all_flat']}",
                  flush=True)
    finally:
        client.close()
        redis_server.stop()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"benchmark": "venues", "ts": int(time.time()), "python": platform.python_version(),
                   "ccxt": ccxt.__version__, "cpus": os.cpu_count(), "repeats": args.repeats, "rows": rows},
                  handle, indent=2)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

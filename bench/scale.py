"""Scale: N positions (default 1000) closed under Binance-like exchange limits.

    python bench/scale.py [--positions 1000] [--latency-ms 25] [--order-limit-10s 300]
                          [--weight-limit-1m 2400]

The paper exchange enforces the limits (429 -1015 over the order count, 429 -1003 over the
request weight) and the EEW runs with its default pacing. The floor is what the limits allow
at best: the orders spread over the fewest 10-s windows, i.e. (ceil(N / limit) - 1) x 10 s,
plus 3 x latency for reading, closing and verifying. Target: within 1.2x of the floor.
Writes bench/results/scale.json.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eexit import schema  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import python_env, start_module, stop_process, wait_for  # noqa: E402


def wait_for_report(client, event_id, timeout_s):
    last_id = b"0-0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _stream, items in client.xread({schema.COMPLETED_STREAM: last_id}, block=1000) or []:
            for entry_id, raw in items:
                last_id = entry_id
                report, _ = schema.CompletionReport.from_fields(raw)
                if report.event_id == event_id:
                    return report
    raise RuntimeError(f"no report for {event_id} within {timeout_s}s")


def run(positions, latency_ms, order_limit_10s, weight_limit_1m):
    redis_server = RedisServer(die_with_parent=True).start()
    client = redis_server.client()
    paper = PaperExchange(latency_ms=latency_ms, synthetic=positions)
    paper.start()
    paper.reset(seed={f"P{i:04d}USDT": ("10" if i % 2 else "-10") for i in range(1, positions + 1)})
    if latency_ms:
        paper.add_fault(kind="latency", ms=latency_ms)
    paper.add_fault(kind="order_limit", limit=order_limit_10s)
    paper.add_fault(kind="weight_limit", limit=weight_limit_1m)
    tmp = tempfile.mkdtemp(prefix="eexit-scale-")
    env = python_env(REDIS_URL=redis_server.url, EEXIT_CONSUMER="scale", EEXIT_EXCHANGE_URL=paper.base_url,
                     EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret", EEXIT_BUS_LOSS_CLOSE_S=0,
                     EEXIT_JOURNAL=os.path.join(tmp, "journal.jsonl"), EEXIT_CLOSE_DEADLINE_S=300)
    process = start_module("eexit.eew", env, os.path.join(tmp, "eew.log"))
    try:
        wait_for(lambda: client.xlen(schema.EEW_HEARTBEAT_STREAM), 60, message="EEW heartbeat")
        time.sleep(11)   # a fresh 10-s order window, as after an idle period
        paper.clear_requests()
        event_id = str(uuid.uuid4())
        started = time.perf_counter()
        client.xadd(schema.PANIC_STREAM, {"event_id": event_id, "reason": "BENCH_SCALE", "severity": "CRITICAL",
                                          "issued_by": "ops", "ts": str(int(time.time() * 1000))})
        report = wait_for_report(client, event_id, 600)
        elapsed_ms = (time.perf_counter() - started) * 1000
        rejected = sum(1 for r in paper.requests() if r.get("status") == 429)
    finally:
        stop_process(process)
        paper.stop()
        client.close()
        redis_server.stop()
    floor_ms = (math.ceil(positions / order_limit_10s) - 1) * 10_000 + 3 * latency_ms
    return {"positions": positions, "latency_ms": latency_ms, "order_limit_10s": order_limit_10s,
            "weight_limit_1m": weight_limit_1m, "floor_ms": floor_ms, "eew_ms": round(elapsed_ms, 1),
            "ratio": round(elapsed_ms / floor_ms, 3), "status": report.status,
            "attempts": report.attempts, "rejected_429": rejected, "account_flat": not paper.positions()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--latency-ms", type=int, default=25)
    parser.add_argument("--order-limit-10s", type=int, default=300)
    parser.add_argument("--weight-limit-1m", type=int, default=2400)
    args = parser.parse_args()
    print(f"scale: closing {args.positions} positions under {args.order_limit_10s} orders/10 s ...", flush=True)
    result = run(args.positions, args.latency_ms, args.order_limit_10s, args.weight_limit_1m)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "scale.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"N={result['positions']}: {result['eew_ms'] / 1000:.1f} s, floor {result['floor_ms'] / 1000:.1f} s, "
          f"ratio {result['ratio']:.2f}, status {result['status']}, 429s {result['rejected_429']}")
    return 0 if result["status"] == "FLAT" else 1


if __name__ == "__main__":
    sys.exit(main())

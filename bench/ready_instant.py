"""A panic published the instant the EEW says READY=1: XADD -> FLAT report (issue 24, finding 9).

    python bench/ready_instant.py [--positions 8] [--latency-ms 25] [--repeats 5]

systemd restarts an EEW exactly when a panic may be pending, so what READY=1 promises matters:
per run a fresh `python -m eexit.eew` process (real Redis, the paper exchange in this process
with L ms on every request), a NOTIFY_SOCKET read by this process; the moment READY=1 arrives,
N positions are on the paper exchange and the panic is XADDed; the figure is XADD -> the report
as seen here, and the report's event_age_ms (XADD -> the EEW took the entry). Target: FLAT
within 3 x L + 100 ms. Prints one line a run and the median.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eexit import schema  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import NotifySocket, python_env, start_module, stop_process, wait_for  # noqa: E402


def one_run(redis_server, client, paper, positions, latency_ms, tmp, number):
    notify = NotifySocket()
    consumer = f"ready-{number}"
    client.delete(schema.TRADING_STATE_KEY)     # the last run's halt: its guard would close the seed
    paper.reset(seed=",".join(f"P{i:04d}USDT:{'1' if i % 2 else '-1'}" for i in range(1, positions + 1)))
    paper.add_fault(kind="latency", ms=latency_ms)          # reset() clears faults
    env = python_env(REDIS_URL=redis_server.url, EEXIT_CONSUMER=consumer, EEXIT_EXCHANGE_URL=paper.base_url,
                     EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret", EEXIT_BUS_LOSS_CLOSE_S=0,
                     EEXIT_JOURNAL=os.path.join(tmp, f"{consumer}.jsonl"), **notify.env())
    process = start_module("eexit.eew", env, os.path.join(tmp, f"{consumer}.log"))
    try:
        wait_for(lambda: notify.times_of("READY=1"), 60, interval_s=0.0005, message="READY=1")
        assert len(paper.positions()) == positions, paper.positions()
        event_id = str(uuid.uuid4())
        start = time.perf_counter()
        client.xadd(schema.PANIC_STREAM, {"event_id": event_id, "reason": "BENCH", "severity": "CRITICAL",
                                          "issued_by": "ops", "ts": str(int(time.time() * 1000))})
        last_id = b"0-0"
        while True:
            for _stream, items in client.xread({schema.COMPLETED_STREAM: last_id}, block=1000) or []:
                for entry_id, raw in items:
                    last_id = entry_id
                    report, _ = schema.CompletionReport.from_fields(raw)
                    if report.event_id == event_id:
                        status = report.status if not paper.positions() else f"{report.status}(positions left!)"
                        return (time.perf_counter() - start) * 1000, status, report.event_age_ms
    finally:
        stop_process(process)
        notify.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=8)
    parser.add_argument("--latency-ms", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    redis_server = RedisServer(die_with_parent=True).start()
    client = redis_server.client()
    paper = PaperExchange(latency_ms=args.latency_ms, synthetic=args.positions)
    paper.start()
    tmp = tempfile.mkdtemp(prefix="eexit-ready-")
    target = 3 * args.latency_ms + 100
    figures = []
    try:
        for number in range(args.repeats):
            elapsed, status, age = one_run(redis_server, client, paper, args.positions, args.latency_ms, tmp, number)
            figures.append(elapsed)
            print(f"run {number}: {status} in {elapsed:.0f} ms (event_age_ms={age})", flush=True)
    finally:
        paper.stop()
        redis_server.stop()
    median = statistics.median(figures)
    print(f"positions={args.positions} latency_ms={args.latency_ms} repeats={args.repeats}: "
          f"median {median:.0f} ms, max {max(figures):.0f} ms; target {target} ms: "
          f"{'MET' if max(figures) <= target else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

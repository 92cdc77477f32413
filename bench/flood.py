"""Flood: one signed panic behind N forged entries -> the EEW's FLAT report (issue 14).

    python bench/flood.py [--forged 20000] [--repeats 3] [--out bench/results/flood.json]

Everything real: a private redis-server, the paper exchange in this process (real HTTP, no
added latency, 3 positions), `python -m eexit.eew` as a process with signatures required
(watchdog key) and its defaults otherwise. Per run: SIGSTOP the EEW, XADD N forged entries
(the watchdog's issuer, a plausible kid, a random 64-hex sig: each costs a full HMAC check)
in pipelines, SIGCONT, XADD one correctly signed panic; the figure is that XADD -> its FLAT
report as seen by this process (wall clock). Also: the EEW alive after each run, its RSS, the
REJECTED reports and ledger fields the forgeries left, Redis's used_memory.

Target (issue 14): FLAT within 1 s of the XADD; EEW alive; bounded memory. Writes JSON.
"""

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eexit import eew, schema, signing  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import python_env, start_module, stop_process, wait_for  # noqa: E402

KEYS = "wd-1 watchdog " + "5a" * 32
SEED = "BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:3"
TARGET_MS = 1000


def rss_kib(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


def forged(n):
    now = str(int(time.time() * 1000))
    return [{"event_id": str(uuid.uuid4()), "reason": "POSITIONS_UNGUARDED", "severity": "CRITICAL",
             "issued_by": "watchdog", "ts": now, "kid": "wd-1", "sig": secrets.token_hex(32)} for _ in range(n)]


def signed_panic():
    fields = {"event_id": str(uuid.uuid4()), "reason": "BENCH", "severity": "CRITICAL",
              "issued_by": "watchdog", "ts": str(int(time.time() * 1000))}
    return signing.sign_fields(fields, "wd-1", signing.parse_keys(KEYS, "bench"))


def run_once(client, paper, process, n):
    """(XADD -> report ms, FLAT with the paper flat, whether the panic found the whole seed)."""
    # The last run's halt stands: the halt guard would close the new seed before the panic (a
    # panic on a flat account is not what this measures). An operator's resume, in effect, then
    # a second for a guard check that read the halt before it went to end.
    client.delete(schema.TRADING_STATE_KEY)
    time.sleep(1.0)
    paper.reset(seed=SEED)
    entries = forged(n)
    process.send_signal(signal.SIGSTOP)
    try:
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for fields in entries[start:start + 1000]:
                pipe.xadd(schema.PANIC_STREAM, fields)
            pipe.execute()
    finally:
        process.send_signal(signal.SIGCONT)
    last = client.xrevrange(schema.COMPLETED_STREAM, count=1)
    last_id = last[0][0] if last else b"0-0"
    panic = signed_panic()
    started = time.perf_counter()
    client.xadd(schema.PANIC_STREAM, panic)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        reply = client.xread({schema.COMPLETED_STREAM: last_id}, block=1000, count=1000)
        for _stream, items in reply or []:
            for entry_id, raw in items:
                last_id = entry_id
                report, _ = schema.CompletionReport.from_fields(raw)
                if report.event_id == panic["event_id"]:
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    return (elapsed_ms, report.status == "FLAT" and not paper.positions(),
                            report.positions_total == len(SEED.split(",")))
    raise RuntimeError("no report for the signed panic within 120 s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forged", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "flood.json"))
    args = parser.parse_args(argv)
    redis_server = RedisServer(die_with_parent=True).start()
    client = redis_server.client()
    paper = PaperExchange(seed=SEED)
    paper.start()
    tmp = tempfile.mkdtemp(prefix="eexit-bench-flood-")
    consumer = "bench-flood"
    env = python_env(REDIS_URL=redis_server.url, EEXIT_CONSUMER=consumer, EEXIT_EXCHANGE_URL=paper.base_url,
                     EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret", EEXIT_BUS_LOSS_CLOSE_S=0,
                     EEXIT_JOURNAL=os.path.join(tmp, "journal.jsonl"), EEXIT_PANIC_HMAC_KEYS=KEYS)
    settings = {"forged_per_run": args.forged, "repeats": args.repeats, "read_batch": eew.READ_BATCH,
                "paper_latency_ms": 0, "positions": 3, "signatures": "required (HMAC of every forgery)",
                "EEXIT_BUS_LOSS_CLOSE_S": 0, "other EEW settings": "defaults"}
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    process = start_module("eexit.eew", env, os.path.join(tmp, "eew.log"))
    runs = []
    try:
        wait_for(lambda: any(f.get(b"status") == b"OK" for _i, f in client.xrevrange(schema.EEW_HEARTBEAT_STREAM, count=5)),
                 60, message="EEW ready")
        rss_start = rss_kib(process.pid)
        memory_start = int(client.info("memory")["used_memory"])
        for number in range(1, args.repeats + 1):
            elapsed_ms, flat, whole = run_once(client, paper, process, args.forged)
            wait_for(lambda: client.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)["pending"] == 0 and
                     not client.xinfo_groups(schema.PANIC_STREAM)[0]["lag"], 120, message="backlog drained")
            runs.append({"xadd_to_flat_ms": round(elapsed_ms, 1), "flat": flat, "found_whole_seed": whole,
                         "eew_alive": process.poll() is None,
                         "eew_rss_kib": rss_kib(process.pid)})
            print(f"run {number}: XADD -> FLAT {elapsed_ms:.1f} ms, flat={flat}, found the whole seed={whole}, EEW RSS "
                  f"{runs[-1]['eew_rss_kib']} KiB", flush=True)
        rejected_reports = sum(1 for _i, raw in client.xrange(schema.COMPLETED_STREAM)
                               if raw.get(b"status") == b"REJECTED")
        result = {
            "benchmark": "flood", "ts": int(time.time()), "python": platform.python_version(),
            "cpus": os.cpu_count(), "settings": settings, "runs": runs,
            "median_ms": round(statistics.median(r["xadd_to_flat_ms"] for r in runs), 1),
            "max_ms": max(r["xadd_to_flat_ms"] for r in runs), "target_ms": TARGET_MS,
            "all_flat": all(r["flat"] for r in runs), "eew_alive": process.poll() is None,
            "eew_rss_start_kib": rss_start, "eew_rss_end_kib": rss_kib(process.pid),
            "forged_total": args.forged * args.repeats, "rejected_reports": rejected_reports,
            "ledger_fields": client.hlen(schema.PROCESSED_KEY),
            "redis_used_memory_growth_bytes": int(client.info("memory")["used_memory"]) - memory_start,
        }
    finally:
        stop_process(process)
        paper.stop()
        client.close()
        redis_server.stop()
    print(f"XADD -> FLAT median {result['median_ms']} ms, max {result['max_ms']} ms (target <= {TARGET_MS}); "
          f"EEW alive={result['eew_alive']}, RSS {result['eew_rss_start_kib']} -> {result['eew_rss_end_kib']} KiB; "
          f"{result['forged_total']} forged -> {result['rejected_reports']} REJECTED reports, "
          f"{result['ledger_fields']} ledger fields; Redis +{result['redis_used_memory_growth_bytes']} bytes "
          f"(the forged entries themselves stay in the panic stream)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

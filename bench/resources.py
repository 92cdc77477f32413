"""Peak tasks (threads) and peak RSS of the EEW during a large close, and of the audit logger
after a long file: the figures the units' MemoryMax=/TasksMax= are sized from.

    python bench/resources.py [--positions 300] [--latency-ms 25] [--audit-lines 20000]

Prints one key=value line per figure. The EEW runs with its defaults (EEXIT_CLOSE_CONCURRENCY
64) against the paper exchange; threads and VmHWM are sampled from /proc every 10 ms."""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eexit import schema  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import RedisServer, python_env, start_module, stop_process, wait_for  # noqa: E402


def proc_status(pid):
    values = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                values[key] = value.split()[0] if value.split() else ""
    except OSError:
        pass
    return int(values.get("Threads", 0)), int(values.get("VmHWM", 0)) / 1024


def head_seq(audit_file):
    try:
        with open(audit_file + ".head", "rb") as f:
            return json.loads(f.read())["seq"]
    except (OSError, ValueError):
        return None


class Sampler:
    def __init__(self, pid):
        self.pid, self.threads, self.rss, self.stop = pid, 0, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.01):
            threads, rss = proc_status(self.pid)
            self.threads, self.rss = max(self.threads, threads), max(self.rss, rss)

    def done(self):
        self.stop.set()
        self.thread.join()
        return self.threads, self.rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=300)
    parser.add_argument("--latency-ms", type=int, default=25)
    parser.add_argument("--audit-lines", type=int, default=20000)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="eexit-resources-")
    server = RedisServer().start()
    paper = PaperExchange(seed={f"P{i:04d}USDT": "10" for i in range(1, args.positions + 1)},
                          latency_ms=args.latency_ms, synthetic=args.positions)
    url = paper.start()
    client = server.client()
    try:
        eew = start_module("eexit.eew", python_env(
            REDIS_URL=server.url, EEXIT_CONSUMER="eew-res", EEXIT_EXCHANGE_URL=url,
            EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret",
            EEXIT_JOURNAL=os.path.join(tmp, "journal.jsonl"), EEXIT_CLOSE_DEADLINE_S="60",
            EEXIT_BUS_LOSS_CLOSE_S="0"), os.path.join(tmp, "eew.log"))
        wait_for(lambda: client.xlen(schema.EEW_HEARTBEAT_STREAM) > 0, 60, message="EEW ready")
        idle = proc_status(eew.pid)
        sampler = Sampler(eew.pid)
        event_id = str(uuid.uuid4())
        client.xadd(schema.PANIC_STREAM, {"event_id": event_id, "reason": "BENCH", "severity": "CRITICAL",
                                          "issued_by": "ops", "ts": str(int(time.time() * 1000))})
        wait_for(lambda: any(f.get(b"event_id") == event_id.encode() for _i, f in client.xrange(schema.COMPLETED_STREAM)),
                 120, message="the report")
        threads, rss = sampler.done()
        stop_process(eew)
        print(f"eew_idle_threads={idle[0]} eew_idle_rss_mb={idle[1]:.1f}")
        print(f"eew_close_positions={args.positions} latency_ms={args.latency_ms} "
              f"eew_peak_threads={threads} eew_peak_rss_mb={rss:.1f}")

        client.flushall()
        pipe = client.pipeline(transaction=False)
        for number in range(args.audit_lines):
            pipe.xadd(schema.PANIC_STREAM, {"event_id": str(uuid.uuid4()), "reason": "BENCH", "severity": "CRITICAL",
                                            "issued_by": "ops", "ts": str(number), "context": "x" * 200})
        pipe.execute()
        audit_file = os.path.join(tmp, "audit.jsonl")
        audit_env = python_env(REDIS_URL=server.url, EEXIT_AUDIT_FILE=audit_file, EEXIT_METRICS_FILE="off")
        audit_log = os.path.join(tmp, "audit.log")
        for starts, phase in enumerate(("write", "restart"), start=1):
            audit = start_module("eexit.audit", audit_env, audit_log)
            sampler = Sampler(audit.pid)
            # The restart re-reads and verifies the whole file before READY: its peak is that.
            wait_for(lambda: head_seq(audit_file) == args.audit_lines and
                     open(audit_log, encoding="utf-8").read().count("event=connected") == starts,
                     300, interval_s=0.1, message="every line written")
            threads, rss = sampler.done()
            stop_process(audit)
            print(f"audit_{phase}_lines={args.audit_lines} audit_file_mb={os.path.getsize(audit_file) / 1e6:.1f} "
                  f"audit_peak_threads={threads} audit_peak_rss_mb={rss:.1f}")
    finally:
        client.close()
        paper.stop()
        server.stop()


if __name__ == "__main__":
    main()

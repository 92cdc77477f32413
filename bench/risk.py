"""The risk kernel (issue 25): mark move -> panic published -> verified FLAT; one account read;
the kernel's RSS and idle CPU beside the other daemons'; request weight per minute per venue.

    python bench/risk.py [--venues binanceusdm,bybit,okx] [--runs 5] [--interval 5] [--idle-s 60]

Per venue: a private redis-server, the paper exchange in that venue's dialect (real ccxt over
HTTP), `python -m eexit.risk` and `python -m eexit.eew` as processes. Each run: wait until the
kernel has a baseline, move the mark of 0.05 BTC from 65,000 to 40,000 (a 25 % drawdown) and
measure, on ONE clock (this host's wall clock; Redis runs here too):
    panic_ms   mark move -> the panic entry's id time (the kernel reads every --interval s, so
               the expected figure is uniform in [read, interval + read])
    flat_ms    mark move -> the EEW's FLAT report (ts_completed)
The target is panic_ms <= interval + one account read. Then (first venue) the kernel alone
reads an idle account for --idle-s: RSS (VmRSS, VmHWM) and CPU (utime+stime from /proc) of the
kernel (alone), then the EEW and the watchdog, and the paper's request log of the kernel alone,
turned into the venue's request weight per minute (WEIGHTS below). Prints key=value lines and
writes bench/results/risk.json (`python bench/report.py --only risk` renders its section)."""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eexit import exchange, risk, schema  # noqa: E402
from eexit.venues import risk_reads  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import RedisServer, python_env, start_module, stop_process, wait_for  # noqa: E402

# Request weight per path, from the venues' docs (Binance USDⓈ-M: IP weight, limit 2,400/min;
# Bybit v5: per-UID limits per endpoint, 10-50 req/s, listed as 1 each; OKX v5: per-endpoint
# limits in requests per 2 s, listed as 1 each). Paths not listed count 1.
WEIGHTS = {"binanceusdm": {"/fapi/v3/account": 5, "/fapi/v3/positionRisk": 5, "/fapi/v1/income": 30,
                           "/fapi/v1/multiAssetsMargin": 30, "/fapi/v1/time": 1}}
LIMITS = {"binanceusdm": "2400 weight/min per IP",
          "bybit": "wallet-balance 50 req/s, position/list 50 req/s, transaction-log 30 req/s (per UID)",
          "okx": "balance 10 req/2s, positions 10 req/2s, bills 5 req/s (per UID), public/time 10 req/2s"}


PHASE = random.Random(25)


def cpu_s(pid):
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            values[key] = value.split()[0] if value.split() else "0"
    return int(values["VmRSS"]) / 1024, int(values["VmHWM"]) / 1024


class Stack:
    def __init__(self, venue, interval_s, directory):
        self.venue, self.dir = venue, directory
        self.redis = RedisServer().start()
        self.client = self.redis.client()
        self.paper = PaperExchange(seed="BTCUSDT:0.05", venue=venue, balance="5000")
        self.url = self.paper.start()
        self.env = {"REDIS_URL": self.redis.url, "EEXIT_EXCHANGE_URL": self.url, "EEXIT_EXCHANGE": venue,
                    "EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret",
                    "EEXIT_EXCHANGE_TIMEOUT_MS": "2000", "EEXIT_RISK_INTERVAL_S": str(interval_s),
                    "EEXIT_STARTUP_GRACE_S": "600",   # no brain here: the watchdog idles
                    "EEXIT_JOURNAL": os.path.join(directory, f"journal-{venue}.jsonl"), "EEXIT_CONSUMER": "eew-bench"}
        if venue == "okx":
            self.env["EEXIT_API_PASSWORD"] = self.paper.api_password
        self.processes = {}

    def start(self, module):
        self.processes[module] = start_module(module, python_env(**self.env),
                                              os.path.join(self.dir, f"{self.venue}-{module}.log"))
        return self.processes[module]

    def stop(self, module):
        stop_process(self.processes.pop(module))

    def close(self):
        for process in self.processes.values():
            stop_process(process)
        self.paper.stop()
        self.redis.stop()

    def reset(self):
        self.paper.reset(seed="BTCUSDT:0.05")
        self.client.flushall()
        self.client.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false"})


def one_read_ms(stack, reads=10):
    """The time of one account read (snapshot + ledger) in this process, median of `reads`."""
    ex = exchange.build_exchange(exchange.ExchangeConfig.from_env(stack.env))
    times = []
    for _ in range(reads):
        started = time.perf_counter()
        snap = risk_reads.read_risk_snapshot(ex)
        risk_reads.read_cash_flows(ex, snap.venue_ts_ms - 600_000, snap.venue_ts_ms + 1)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run_once(stack):
    for module in list(stack.processes):
        stack.stop(module)
    stack.reset()
    stack.start("eexit.eew")
    stack.start("eexit.risk")
    wait_for(lambda: stack.client.get(risk.STATE_KEY) and stack.client.xlen(risk.HEARTBEAT_STREAM) >= 2, 60,
             message="kernel baseline")
    # A random phase inside the read interval (seeded per run): the worst case is a move just
    # after a read, which waits a whole interval plus the next read.
    time.sleep(PHASE.random() * float(stack.env["EEXIT_RISK_INTERVAL_S"]))
    moved_ms = time.time() * 1000
    stack.paper.set_mark("BTCUSDT", 40_000)
    panic = wait_for(lambda: stack.client.xrange(schema.PANIC_STREAM), 60, message="panic")[0]
    event, _ = schema.PanicEvent.from_fields(panic[1])
    panic_ms = schema.entry_id_ms(panic[0]) - moved_ms

    def flat():
        for _id, raw in stack.client.xrange(schema.COMPLETED_STREAM):
            report, _ = schema.CompletionReport.from_fields(raw)
            if report.event_id == event.event_id and report.status:
                return report
        return None
    report = wait_for(flat, 60, message="report")
    return event.reason, panic_ms, report.status, report.ts_completed - moved_ms


def idle(stack, idle_s):
    """An idle account for idle_s: first the kernel alone (its requests, RSS, CPU), then the EEW
    and the watchdog beside it (theirs). Returns ({module: (rss, hwm, cpu %)}, {path: count})."""
    for module in list(stack.processes):
        stack.stop(module)
    stack.reset()
    figures = {}

    def measure(modules):
        for module in modules:
            stack.start(module)
        wait_for(lambda: stack.client.xlen(risk.HEARTBEAT_STREAM) >= 2, 60, message="kernel running")
        time.sleep(2)
        stack.paper.clear_requests()
        before = {m: cpu_s(stack.processes[m].pid) for m in modules}
        time.sleep(idle_s)
        for module in modules:
            process = stack.processes[module]
            if process.poll() is not None:
                raise RuntimeError(f"{module} exited {process.returncode} during the idle measurement")
            rss, hwm = rss_mb(process.pid)
            figures[module] = (rss, hwm, 100 * (cpu_s(process.pid) - before[module]) / idle_s)
        paths = {}
        for request in stack.paper.requests():
            paths[request["path"]] = paths.get(request["path"], 0) + 1
        return paths
    paths = measure(["eexit.risk"])
    measure(["eexit.eew", "eexit.watchdog"])
    return figures, paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--venues", default="binanceusdm,bybit,okx")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--idle-s", type=float, default=60.0)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="eexit-bench-risk-")
    results = {"settings": {"EEXIT_RISK_INTERVAL_S": args.interval, "runs": args.runs, "idle_s": args.idle_s},
               "load1": os.getloadavg()[0], "venues": {}}
    print(f"settings interval_s={args.interval} runs={args.runs} idle_s={args.idle_s} "
          f"load1={os.getloadavg()[0]:.2f} cpus={os.cpu_count()} logs={directory}")
    for venue in args.venues.split(","):
        stack = Stack(venue, args.interval, directory)
        try:
            read_ms = one_read_ms(stack)
            runs = [run_once(stack) for _ in range(args.runs)]
            panics = [r[1] for r in runs]
            flats = [r[3] for r in runs]
            target = args.interval * 1000 + read_ms
            print(f"venue={venue} one_read_ms={read_ms:.1f} reasons={sorted({r[0] for r in runs})} "
                  f"statuses={sorted({r[2] for r in runs})}")
            print(f"venue={venue} panic_ms median={statistics.median(panics):.0f} max={max(panics):.0f} "
                  f"target<={target:.0f} {'met' if max(panics) <= target else 'MISSED'}")
            print(f"venue={venue} flat_ms median={statistics.median(flats):.0f} max={max(flats):.0f}")
            figures, paths = idle(stack, args.idle_s)
            for module, (rss, hwm, cpu) in figures.items():
                print(f"venue={venue} daemon={module} rss_mb={rss:.1f} hwm_mb={hwm:.1f} idle_cpu_pct={cpu:.2f}")
            per_min = {path: count * 60 / args.idle_s for path, count in sorted(paths.items())}
            weight = sum(WEIGHTS.get(venue, {}).get(path, 1) * n for path, n in per_min.items())
            print(f"venue={venue} requests_per_min={sum(per_min.values()):.1f} weight_per_min={weight:.0f} "
                  f"limit=\"{LIMITS[venue]}\" paths={per_min}")
            results["venues"][venue] = {
                "one_read_ms": read_ms, "target_ms": target, "reasons": sorted({r[0] for r in runs}),
                "statuses": sorted({r[2] for r in runs}), "panic_ms": panics, "flat_ms": flats,
                "daemons": {m: {"rss_mb": f[0], "hwm_mb": f[1], "idle_cpu_pct": f[2]} for m, f in figures.items()},
                "requests_per_min": per_min, "weight_per_min": weight, "limit": LIMITS[venue]}
        finally:
            stack.close()
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "risk.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

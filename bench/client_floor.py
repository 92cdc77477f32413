"""The floor under a warm close on this machine: the EEW's exchange requests without the EEW.

    python bench/client_floor.py [--positions 50 200] [--repeats 5] [--latency-ms 25]

The paper exchange as its own process, HTTPS, L ms on every request (as bench/https.py); the
clients built as the EEW builds them (exchange.build_exchange, markets shared by reference),
64 of them in a 64-thread pool, every connection warmed first. One close is the requests a
warm EEW close of a one-way Binance account sends, in the same shape: the account read
(positions and both order books at once), the closes in the venue's batches at once, the
verifying read (the same three at once). No Redis, no ledger, no halt, no report, no log: what
is measured is what ccxt, http.client, TLS and the paper cost on these cores, which the EEW's
figures (bench/https.py: warm N=50 wall, CPU per position) cannot go below. Prints per run the
wall time from the first read to the verifying read's answer and this process's CPU over that
span (every thread, from /proc/self/task/*/schedstat) per position. --split-cpus runs the clients
on CPU 0 and the paper on CPU 1 (a diagnostic, printed beside its figures: how much of the floor
is the paper's CPU competing with the client's on these 2 cores, which a real venue's is not).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

from eexit import exchange, flatten  # noqa: E402
from eexit.paper import make_test_cert  # noqa: E402

POOL = 64      # EEXIT_CLOSE_CONCURRENCY's default


def cpu_ms():
    """CPU time of every thread of this process (ms, nanosecond resolution)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except OSError:
            pass  # a thread that ended while listed: not one of the pool's
    return total / 1e6


class Clients:
    """POOL clients handed out last-in first-out, as eew.ExchangePool does."""

    def __init__(self, cfg):
        self.primary = exchange.build_exchange(cfg)
        self.rules = exchange.load_market_rules(self.primary)
        self.idle = [self.primary]
        for _ in range(POOL - 1):
            client = exchange.build_exchange(cfg)
            client.set_markets_from_exchange(self.primary)
            self.idle.append(client)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=POOL)
        started = threading.Barrier(POOL)

        def warm(client):
            started.wait()          # every thread holds its own client: POOL connections
            exchange.ping(client)
        list(self.pool.map(lambda _: self.run(warm), range(POOL)))

    def run(self, fn, *args):
        with self.lock:
            client = self.idle.pop()
        try:
            return fn(client, *args)
        finally:
            with self.lock:
                self.idle.append(client)

    def at_once(self, calls):
        """[(fn, args)] on pool threads at once; their results in order."""
        return [f.result() for f in [self.pool.submit(self.run, fn, *args) for fn, args in calls]]


def read_calls(ex):
    venue = exchange.venue(ex.id)
    return [(exchange.read_segment_positions, (segment,)) for segment in venue.SEGMENTS] + \
        [(exchange.read_segment_orders, (segment, book)) for segment in venue.SEGMENTS for book in venue.BOOKS]


def one_close(clients, n, run):
    calls = read_calls(clients.primary)
    segments = len(exchange.venue(clients.primary.id).SEGMENTS)
    cpu0, start = cpu_ms(), time.perf_counter()
    reads = clients.at_once(calls)
    positions = [p for readable, _ in reads[:segments] for p in readable]
    plan = flatten.plan_close(positions, clients.rules, 1, f"floor-{run}-{time.time_ns()}")
    size = exchange.batch_size(clients.primary.id)
    results = clients.at_once([(exchange.place_close_orders, (plan[i:i + size],)) for i in range(0, len(plan), size)])
    left = clients.at_once(calls)
    wall, cpu = (time.perf_counter() - start) * 1000, cpu_ms() - cpu0
    refused = [r for batch in results for r in batch if isinstance(r, Exception)]
    open_left = sum(len(readable) for readable, _ in left[:segments])
    if len(positions) != n or refused or open_left:
        raise RuntimeError(f"run {run}: read {len(positions)} of {n}, {len(refused)} refused, {open_left} left")
    return wall, cpu / n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=25)
    parser.add_argument("--split-cpus", action="store_true", help="clients on CPU 0, the paper on CPU 1")
    args = parser.parse_args(argv)
    if args.split_cpus:
        os.sched_setaffinity(0, {0})
    tmp = tempfile.mkdtemp(prefix="eexit-floor-")
    cert, key = make_test_cert(tmp)
    for n in args.positions:
        paper = subprocess.Popen([sys.executable, "-m", "eexit.paper", "--port", "0", "--synthetic", str(n),
                                  "--latency-ms", str(args.latency_ms), "--cert", cert, "--key", key],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            if args.split_cpus:
                os.sched_setaffinity(paper.pid, {1})
            url = paper.stdout.readline().strip()
            clients = Clients(exchange.ExchangeConfig.from_env({
                "EEXIT_EXCHANGE_URL": url, "EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret",
                "EEXIT_EXCHANGE_CA_FILE": cert}))
            seed = ",".join(f"P{i:04d}USDT:{10 if i % 2 else -10}" for i in range(1, n + 1))
            runs = []
            for run in range(args.repeats):
                requests.post(f"{url}/_paper/state", data=json.dumps({"seed": seed}), verify=cert, timeout=10)
                time.sleep(0.5)     # idle before the panic, as the EEW is (caches cool, as they do)
                runs.append(one_close(clients, n, run))
            walls, cpus = [w for w, _ in runs], [c for _, c in runs]
            print(f"floor N={n} L={args.latency_ms:g}: wall p50 {statistics.median(walls):.1f} ms "
                  f"(runs {', '.join(f'{w:.1f}' for w in walls)}), CPU per position p50 "
                  f"{statistics.median(cpus):.3f} ms (runs {', '.join(f'{c:.3f}' for c in cpus)}), "
                  f"load {os.getloadavg()[0]:.2f}{', --split-cpus' if args.split_cpus else ''}", flush=True)
        finally:
            paper.terminate()
            paper.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time to flat as a real exchange is met: HTTPS, connections dropped while idle, ~600 markets,
1,000 positions under enforced limits, and the naive baseline with and without ccxt's throttle.

    python bench/https.py [--latency-ms 25] [--repeats 5] [--no-1000] [--warm-only] [--timeline]
                          [--out bench/results/https.json]

Everything real: a private redis-server; the paper exchange in this process serving HTTPS with
a self-signed certificate made for the run (the EEW trusts it through EEXIT_EXCHANGE_CA_FILE)
and L ms of latency on every request; `python -m eexit.eew` as a process, DEFAULT settings
except the ones printed beside each figure (EEXIT_BUS_LOSS_CLOSE_S=0 and EEXIT_JOURNAL
everywhere: no bus-loss close in a benchmark, a journal in the temp dir). Figures (XADD ->
report as this process sees it, wall clock):

  cold fresh   the first panic right after READY=1: the connections are the ones the start-up
               warm-up opened (still opening, maybe); with EEXIT_EXCHANGE_KEEPALIVE_S=0 there is
               no warm-up and every connection is opened by the panic itself
  warm         later panics, the server keeping idle connections 60 s, the EEW's keep-alive
               at its default 20 s
  idle drop    the server drops connections idle 5 s; the panic comes after 8 s idle, with the
               default keep-alive (20 s: every connection is gone) and with 4 s (kept warm)
  CPU/pos      EEW CPU from XADD to report over the warm N=50 and N=200 runs, / positions: the
               kernel's per-thread run time (/proc/<pid>/task/*/schedstat, nanoseconds) summed
               over the EEW's threads (its pool threads live as long as it does), not /proc's
               10 ms utime+stime ticks
  READY, RSS   process start -> READY=1 (NOTIFY_SOCKET), peak RSS (VmHWM) after all runs
  N=1000       default settings (no EEXIT_CLOSE_DEADLINE_S) with Binance's order limits
               enforced by the paper exchange (300 orders / 10 s, 1200 / 60 s: 429 -1015)
  --warm-only  only the warm rows and CPU/pos (before/after pairs on a shared machine)
  --timeline   and a timeline of each warm N=50 run: when each request reached the paper
               exchange and was answered (its handler's start and end, this process's clock),
               summed into the stages of one close (what the EEW and the paper each add to 3L)
  naive        ccxt binanceusdm with its defaults (own TLS handling), fetch_positions() and one
               reduce-only market order per position, sequentially; enableRateLimit True / False
  --split-cpus the EEW and redis-server on CPU 0, this process (the paper exchange, the bench) on
               CPU 1, printed beside every figure: a diagnostic of how much of a figure is the
               paper's CPU competing with the EEW's on 2 cores (a real venue's CPU is not ours);
               the verdicts are the default run's
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ccxt  # noqa: E402

from bench.cost import peak_rss_mb, wait_for_ready  # noqa: E402
from bench.time_to_flat import seed_for, wait_ready  # noqa: E402
from eexit import schema  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
import eexit.paper  # noqa: E402
from eexit.paper import PaperExchange, make_test_cert  # noqa: E402
from tests.harness import NotifySocket, python_env, start_module, stop_process  # noqa: E402

BINANCE_LIMITS = ({"kind": "order_limit", "limit": 300},)


def cpu_seconds(pid):
    """CPU time of every live thread of pid, in seconds with nanosecond resolution: the first
    field of /proc/<pid>/task/<tid>/schedstat (time on a CPU). A thread that ended is missing."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended while we listed: its time is not ours to count
    return total / 1e9


class Bench:
    def __init__(self, client, redis_url, tmp, tls, latency):
        self.client, self.redis_url, self.tmp, self.tls, self.latency = client, redis_url, tmp, tls, latency
        self.cert = tls[0]

    def paper(self, synthetic, idle_timeout_s):
        paper = PaperExchange(synthetic=synthetic, tls=self.tls,
                              idle_timeout_s=idle_timeout_s)
        paper.start()
        return paper

    def start_eew(self, paper, consumer, settings):
        notify = NotifySocket()
        env = python_env(**notify.env())
        env.update(REDIS_URL=self.redis_url, EEXIT_CONSUMER=consumer, EEXIT_EXCHANGE_URL=paper.base_url,
                   EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret", EEXIT_BUS_LOSS_CLOSE_S="0",
                   EEXIT_EXCHANGE_CA_FILE=self.cert, EEXIT_JOURNAL=os.path.join(self.tmp, f"{consumer}.jsonl"),
                   **{k: str(v) for k, v in settings.items()})
        started = time.monotonic()
        on_cpu(0)           # the EEW and every thread it starts
        process = start_module("eexit.eew", env, os.path.join(self.tmp, f"{consumer}.log"))
        on_cpu(1)
        ready = wait_for_ready(notify, process, timeout_s=120)
        notify.close()
        if ready is None:
            raise RuntimeError(f"EEW {consumer} never sent READY=1; see {self.tmp}")
        wait_ready(self.client, consumer, process)
        return process, (ready - started) * 1000

    def panic(self, paper, process, n, quiet_s, faults=(), timeout_s=300):
        """Seed n positions, wait quiet_s, XADD, wait for the report: (ms, status, flat, cpu_s,
        whether the panic found all n positions)."""
        # The last run's halt stands: the halt guard would close this seed before the panic
        # (a panic on a flat account is not what this measures). An operator's resume, in effect;
        # then up to a second of the quiet period for a guard check that saw the halt before it
        # went to end (on the account still flat) before the seed, or it closes the seed.
        self.client.delete(schema.TRADING_STATE_KEY)
        time.sleep(min(1.0, quiet_s))
        paper.reset(seed=seed_for(n))
        for fault in ({"kind": "latency", "ms": self.latency},) + tuple(faults):
            paper.add_fault(dict(fault))
        time.sleep(quiet_s - min(1.0, quiet_s))
        last = self.client.xrevrange(schema.COMPLETED_STREAM, count=1)
        last_id = last[0][0] if last else b"0-0"
        event_id = str(uuid.uuid4())
        cpu0 = cpu_seconds(process.pid)
        start = time.perf_counter()
        self.client.xadd(schema.PANIC_STREAM, {"event_id": event_id, "reason": "BENCH", "severity": "CRITICAL",
                                               "issued_by": "ops", "ts": str(int(time.time() * 1000))})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _stream, items in self.client.xread({schema.COMPLETED_STREAM: last_id}, block=1000) or []:
                for entry_id, raw in items:
                    last_id = entry_id
                    report, _ = schema.CompletionReport.from_fields(raw)
                    if report.event_id == event_id:
                        self.last_span = (start, time.perf_counter())
                        ms = (time.perf_counter() - start) * 1000
                        return ms, report.status, report.status == "FLAT" and not paper.positions(), \
                            cpu_seconds(process.pid) - cpu0, report.positions_total == n
        raise RuntimeError(f"no report within {timeout_s}s for N={n}")


SERVED = []     # --timeline: (handler start, end, path) of every request the paper served


def record_served():
    """--timeline: wraps the paper's request handler (this process only) to log its timing."""
    handle = eexit.paper._Handler._handle

    def timed(handler, method):
        start = time.perf_counter()
        try:
            handle(handler, method)
        finally:
            SERVED.append((start, time.perf_counter(), handler.path.split("?")[0]))
    eexit.paper._Handler._handle = timed


def stages(start, end, L):
    """One warm N=50 close's stages (ms) from SERVED: reads, batches, verifying read."""
    served = sorted((a - start, b - start, path) for a, b, path in SERVED
                    if start <= a <= end and not path.endswith("/time"))    # not keep-warm pings
    batches = [r for r in served if "batchOrders" in r[2]]
    if not batches:
        return None
    reads = [r for r in served if r[0] < batches[0][0]]
    verify = [r for r in served if r[0] > max(b[1] for b in batches)]
    total = (end - start) * 1000
    return {k: round(v * 1000 if k != "total" else v, 1) for k, v in (
        ("xadd_to_first_read", reads[0][0]),
        ("read_served_minus_L", max(b - a for a, b, _ in reads) - L / 1000),
        ("last_read_to_first_batch", batches[0][0] - max(b for _, b, _ in reads)),
        ("batch_arrival_spread", batches[-1][0] - batches[0][0]),
        ("batch_served_minus_L_max", max(b - a for a, b, _ in batches) - L / 1000),
        ("last_batch_to_verify", verify[0][0] - max(b for _, b, _ in batches)),
        ("verify_served_minus_L", max(b - a for a, b, _ in verify[:3]) - L / 1000),
        ("verify_to_report", total / 1000 - max(b for _, b, _ in verify[:3])), ("total", total))}


def cpu_per_position(runs, n):
    """EEW CPU ms per position over the runs that met the whole seed."""
    counted = [r for r in runs if r[4]]
    return 1000 * sum(r[3] for r in counted) / (n * max(1, len(counted)))


def quiet(n):
    """Independent incidents: the EEW's order windows hold none of the previous run's orders."""
    return 10.2 if n > 10 else 1.0


SPLIT = {}      # --split-cpus: the setting printed beside every figure


def on_cpu(cpu):
    """This thread (and what it starts from now on) on one CPU, with --split-cpus; else nothing."""
    if SPLIT:
        os.sched_setaffinity(0, {cpu})


def row(name, runs, settings, target_ms=None, **extra):
    """A run whose panic did not find the whole seed (positions_total < n: something closed
    part of it first, e.g. a halt guard) measures less than a close: shown apart, not counted."""
    discarded = [round(r[0], 1) for r in runs if len(r) > 4 and not r[4]]
    runs = [r for r in runs if len(r) <= 4 or r[4]]
    ms = [round(r[0], 1) for r in runs]
    if discarded:
        extra["discarded_runs_ms"] = discarded
    out = {"name": name, "median_ms": round(statistics.median(ms), 1), "runs_ms": ms,
           "all_flat": all(r[2] for r in runs), "statuses": sorted({r[1] for r in runs}),
           "settings": {**settings, **SPLIT}, "target_ms": target_ms, "load_1min": round(os.getloadavg()[0], 2), **extra}
    print(f"{name:<44} {out['median_ms']:>9.1f} ms  runs {ms}  flat={out['all_flat']}  "
          f"target {target_ms}  settings {out['settings'] or 'defaults'}  load {out['load_1min']}"
          + (f"  discarded (seed not whole) {discarded}" if discarded else ""), flush=True)
    return out


def naive(paper, cert, n, latency, throttle):
    paper.reset(seed=seed_for(n))
    paper.add_fault(kind="latency", ms=latency)
    ex = ccxt.binanceusdm({"apiKey": "paper-key", "secret": "paper-secret", "enableRateLimit": throttle})
    ex.options["fetchCurrencies"] = False
    # ccxt passes verify=(verify and validateServerSsl) per request: the CA path rides there.
    ex.validateServerSsl = cert
    ex.urls["api"] = {k: paper.base_url + v[v.index("/", 8):] if isinstance(v, str) else v
                      for k, v in ex.urls["api"].items()}
    ex.load_markets()
    start = time.perf_counter()
    for position in ex.fetch_positions():
        ex.create_order(position["symbol"], "market", "sell" if position["side"] == "long" else "buy",
                        position["contracts"], None, {"reduceOnly": True})
    return (time.perf_counter() - start) * 1000, not paper.positions()


def idle_rows(bench, repeats, L, cert):
    """Cold start without warm-up, idle drops, and the naive baseline: their rows."""
    rows = []
    paper = bench.paper(200, idle_timeout_s=5)
    try:
        runs = []
        for start in range(max(3, repeats // 2)):
            process, _ = bench.start_eew(paper, f"https-nowarm-{start}", {"EEXIT_EXCHANGE_KEEPALIVE_S": 0})
            try:
                runs.append(bench.panic(paper, process, 50, 0))
            finally:
                stop_process(process)
        rows.append(row(f"cold fresh start, no warm-up, N=50 L={L}", runs, {"EEXIT_EXCHANGE_KEEPALIVE_S": 0},
                        3 * L + 150))
        for keepalive in (None, 4):
            settings = {} if keepalive is None else {"EEXIT_EXCHANGE_KEEPALIVE_S": keepalive}
            process, _ = bench.start_eew(paper, f"https-drop-{keepalive}", settings)
            try:
                bench.panic(paper, process, 1, 1.0)          # a first panic: start-up is over
                runs = [bench.panic(paper, process, 50, 8.0) for _ in range(max(3, repeats // 2))]
                rows.append(row(f"after 8 s idle, server drops at 5 s, N=50 L={L}", runs,
                                dict(settings, server_idle_timeout_s=5), 3 * L + 150))
            finally:
                stop_process(process)
        for throttle in (True, False):
            ms, flat = naive(paper, cert, 50, L, throttle)
            rows.append(row(f"naive ccxt N=50 L={L} enableRateLimit={throttle}", [(ms, "-", flat, 0)],
                            {"enableRateLimit": throttle}))
    finally:
        paper.stop()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-1000", action="store_true")
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--split-cpus", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "https.json"))
    args = parser.parse_args(argv)
    L = args.latency_ms
    if args.timeline:
        record_served()
    tmp = tempfile.mkdtemp(prefix="eexit-bench-https-")
    tls = make_test_cert(tmp)
    cert = tls[0]
    if args.split_cpus:
        SPLIT["cpus"] = "EEW+redis-server:0 paper+bench:1"
    on_cpu(0)
    redis_server = RedisServer(die_with_parent=True).start()
    on_cpu(1)           # from here this process's threads (the paper's too) start on CPU 1
    client = redis_server.client()
    bench = Bench(client, redis_server.url, tmp, tls, L)
    rows, footprint = [], []
    try:
        for synthetic in (200, 568):
            paper = bench.paper(synthetic, idle_timeout_s=60)
            markets = len(paper.market_ids())
            process, ready_ms = bench.start_eew(paper, f"https-{markets}", {})
            try:
                tag = f"{markets} markets"
                cold = bench.panic(paper, process, 50, 0)
                if not args.warm_only:
                    rows.append(row(f"cold fresh start N=50 L={L} ({tag})", [cold], {}, 3 * L + 150))
                warm50, timeline = [], []
                for _ in range(args.repeats):
                    warm50.append(bench.panic(paper, process, 50, quiet(50)))
                    if args.timeline:
                        timeline.append(stages(*bench.last_span, L))
                        print(f"  timeline (ms): {timeline[-1]}", flush=True)
                cpu50 = cpu_per_position(warm50, 50)
                rows.append(row(f"warm N=50 L={L} ({tag})", warm50, {}, 3 * L + 25,
                                cpu_ms_per_position=round(cpu50, 3),
                                **({"timeline": timeline} if timeline else {})))
                warm200 = [bench.panic(paper, process, 200, quiet(200)) for _ in range(max(3, args.repeats // 2))]
                cpu_ms = cpu_per_position(warm200, 200)
                rows.append(row(f"warm N=200 L={L} ({tag})", warm200, {}, 3 * L + 200,
                                cpu_ms_per_position=round(cpu_ms, 3)))
                print(f"  EEW CPU per position, XADD -> report: N=50 {cpu50:.3f} ms, N=200 {cpu_ms:.3f} ms "
                      f"(target 0.3)", flush=True)
                footprint.append({"markets": markets, "ready_ms": round(ready_ms, 1),
                                  "peak_rss_mb": round(peak_rss_mb(process.pid), 1),
                                  "cpu_ms_per_position": round(cpu_ms, 3),
                                  "cpu_ms_per_position_n50": round(cpu50, 3),
                                  "load_1min": round(os.getloadavg()[0], 2)})
                print(f"  READY {ready_ms:.0f} ms, peak RSS {footprint[-1]['peak_rss_mb']} MB ({tag})", flush=True)
            finally:
                stop_process(process)
                paper.stop()

        if not args.warm_only:
            rows += idle_rows(bench, args.repeats, L, cert)

        if not args.no_1000 and not args.warm_only:
            paper = bench.paper(1000, idle_timeout_s=60)
            process, _ = bench.start_eew(paper, "https-1000", {})
            try:
                floor_ms = 30_000 + 3 * L
                run = bench.panic(paper, process, 1000, 1.0, faults=BINANCE_LIMITS, timeout_s=400)
                rows.append(row(f"N=1000 defaults, Binance limits enforced, L={L}", [run],
                                {"paper_order_limit": "300/10s"}, round(1.05 * floor_ms), floor_ms=floor_ms))
            finally:
                stop_process(process)
                paper.stop()
    finally:
        client.close()
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"benchmark": "https", "ts": int(time.time()), "python": platform.python_version(),
                   "ccxt": ccxt.__version__, "cpus": os.cpu_count(), "latency_ms": L,
                   "load": os.getloadavg()[0], "rows": rows, "footprint": footprint}, handle, indent=2)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

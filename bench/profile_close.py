"""Where the EEW's CPU per position goes on the emergency path: cProfile over one warm close of
N positions, every request on this thread (the pool's threads do the same work per request).

    python bench/profile_close.py [--positions 200] [--batch 0|1] [--top 25]

The paper exchange runs as its own process (its CPU is not ours) serving HTTPS with a
certificate made for the run; the client is built as the EEW builds it (exchange.build_exchange,
the shared TLS context) and warmed by one request. Measured: one account read (positions
and both order books), the closes in the venue's batches (--batch 1: one request per order,
the pre-issue-18 path), one verifying read (the same three requests). Prints CPU ms per
position (time.process_time, this process) measured twice: first without the profiler (the
figure to compare with targets), then under cProfile (whose own overhead inflates it several
times over), with the top functions and the share of each layer.
"""

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

from eexit import exchange, flatten  # noqa: E402
from eexit.paper import make_test_cert  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--batch", type=int, default=0, help="orders per request; 0: the venue's batch size")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="cumulative", help="pstats order: cumulative, tottime")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="eexit-profile-")
    cert, key = make_test_cert(tmp)
    paper = subprocess.Popen([sys.executable, "-m", "eexit.paper", "--port", "0", "--synthetic", str(args.positions),
                              "--cert", cert, "--key", key], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = paper.stdout.readline().strip()
        ex = exchange.build_exchange(exchange.ExchangeConfig.from_env({
            "EEXIT_EXCHANGE_URL": url, "EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret",
            "EEXIT_EXCHANGE_CA_FILE": cert}))
        rules = exchange.load_market_rules(ex)
        size = args.batch or exchange.batch_size(ex.id)
        seed = ",".join(f"P{i:04d}USDT:{10 if i % 2 else -10}" for i in range(1, args.positions + 1))
        profile = cProfile.Profile(time.process_time)   # CPU, not waiting
        cpu = {False: 0.0, True: 0.0}
        for profiled in (False, True):
            for run in range(args.repeats):
                requests.post(f"{url}/_paper/state", data=json.dumps({"seed": seed}), verify=cert, timeout=10)
                exchange.ping(ex)
                start = time.process_time()
                if profiled:
                    profile.enable()
                positions = exchange.read_positions(ex)
                exchange.read_open_orders(ex)
                plan = flatten.plan_close(positions, rules, 1, f"profile-{run}-{profiled}-{time.time_ns()}")
                for i in range(0, len(plan), size):
                    results = exchange.place_close_orders(ex, plan[i:i + size])
                    assert not any(isinstance(r, Exception) for r in results), results
                left = exchange.read_positions(ex)
                exchange.read_open_orders(ex)
                profile.disable()
                cpu[profiled] += time.process_time() - start
                assert not left, f"{len(left)} positions left"
        per_position, profiled_per_position = (1000 * cpu[profiled] / (args.repeats * args.positions)
                                               for profiled in (False, True))
        print(f"batch={size}: CPU {per_position:.3f} ms per position without the profiler, "
              f"{profiled_per_position:.3f} under cProfile ({args.repeats} x {args.positions} positions, "
              f"reads and the verifying read included; load {os.getloadavg()[0]:.1f})")
        stats = pstats.Stats(profile)
        # Self time by layer ({built-in} calls such as the socket read are "other").
        layers = (("ccxt (request building, signing, parsing)", "ccxt/"), ("requests", "/requests/"),
                  ("urllib3 + http.client", ("/urllib3/", "http/client")), ("ssl", "ssl.py"),
                  ("json", "/json/"), ("eexit", "/eexit/"))
        shares, everything = {}, 0.0
        for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
            everything += tottime
            label = next((label for label, where in layers
                          if any(w in filename for w in ((where,) if isinstance(where, str) else where))), "other")
            shares[label] = shares.get(label, 0.0) + tottime
        results = os.path.join(ROOT, "bench", "results", "profile.json")
        os.makedirs(os.path.dirname(results), exist_ok=True)
        previous = {}
        if os.path.exists(results):
            with open(results, encoding="utf-8") as handle:
                previous = json.load(handle)
        previous[str(size)] = {"positions": args.positions, "repeats": args.repeats,
                               "cpu_ms_per_position": round(per_position, 3),
                               "profiled_cpu_ms_per_position": round(profiled_per_position, 3),
                               "load_1min": round(os.getloadavg()[0], 2),
                               "self_time_share": {k: round(v / everything, 3) for k, v in sorted(shares.items())}}
        with open(results, "w", encoding="utf-8") as handle:
            json.dump(previous, handle, indent=2)
        stats.sort_stats(args.sort).print_stats(args.top)
        if os.environ.get("PROFILE_DUMP"):
            stats.dump_stats(os.environ["PROFILE_DUMP"])
    finally:
        paper.terminate()
        paper.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

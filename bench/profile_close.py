"""Where the EEW's CPU per position goes on the emergency path: cProfile over one warm close of
N positions, every request on this thread (the pool's threads do the same work per request).

    python bench/profile_close.py [--positions 200] [--batch 0|1] [--top 25]

The paper exchange runs as its own process (its CPU is not ours) serving HTTPS with a
certificate made for the run; the client is built as the EEW builds it (exchange.build_exchange,
the shared TLS context) and warmed by one request. Measured: one account read, the closes in
the venue's batches (--batch 1: one request per order, the pre-issue-18 path), one verifying
read. Prints CPU ms per position (time.process_time, this process) and the top functions by
cumulative time.
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
        profile, cpu = cProfile.Profile(), 0.0
        for run in range(args.repeats):
            requests.post(f"{url}/_paper/state", data=json.dumps({"seed": seed}), verify=cert, timeout=10)
            exchange.ping(ex)
            start = time.process_time()
            profile.enable()
            positions = exchange.read_positions(ex)
            exchange.read_open_orders(ex)
            plan = flatten.plan_close(positions, rules, 1, f"profile-{run}-{time.time_ns()}")
            for i in range(0, len(plan), size):
                results = exchange.place_close_orders(ex, plan[i:i + size])
                assert not any(isinstance(r, Exception) for r in results), results
            left = exchange.read_positions(ex)
            profile.disable()
            cpu += time.process_time() - start
            assert not left, f"{len(left)} positions left"
        print(f"batch={size}: CPU {1000 * cpu / (args.repeats * args.positions):.3f} ms per position "
              f"({args.repeats} x {args.positions} positions, reads included)")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    finally:
        paper.terminate()
        paper.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

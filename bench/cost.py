"""Cost of running eexit: cold start to READY=1, peak RSS and CPU while idle, per daemon.

Each daemon runs as a real subprocess against a private redis-server and the paper exchange,
with a NOTIFY_SOCKET this script owns, exactly as systemd would run it. Idle means: healthy
heartbeats, no panic. Writes bench/results/cost.json.

    python bench/cost.py [--idle-s 60] [--starts 5]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import NotifySocket, RedisServer, python_env, start_module, stop_process  # noqa: E402

DAEMONS = ("eexit.watchdog", "eexit.eew", "eexit.brain")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def wait_for_ready(notify, process, timeout_s=30):
    """Monotonic time of READY=1, or None if the daemon exited or never said it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        times = notify.times_of("READY=1")
        if times:
            return times[0]
        time.sleep(0.002)
    return None


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def daemon_env(redis_url, paper_url, notify, workdir):
    return python_env(
        REDIS_URL=redis_url, EEXIT_EXCHANGE_URL=paper_url, EEXIT_API_KEY="paper-key",
        EEXIT_API_SECRET="paper-secret", EEXIT_CONSUMER="bench",
        EEXIT_JOURNAL=os.path.join(workdir, "eew-journal.jsonl"), **notify.env(),
    )


def measure_start(module, redis_url, paper_url, workdir):
    notify = NotifySocket()
    try:
        started = time.monotonic()
        process = start_module(module, daemon_env(redis_url, paper_url, notify, workdir),
                               os.path.join(workdir, f"{module}.log"))
        ready = wait_for_ready(notify, process)
        stop_process(process)
        return None if ready is None else (ready - started) * 1000
    finally:
        notify.close()


def measure_idle(redis_url, paper_url, idle_s, workdir):
    """All three daemons at once, as deployed; CPU and peak RSS of each over idle_s."""
    sockets, processes = {}, {}
    try:
        for module in DAEMONS:
            sockets[module] = NotifySocket()
            processes[module] = start_module(module, daemon_env(redis_url, paper_url, sockets[module], workdir),
                                             os.path.join(workdir, f"{module}.idle.log"))
        for module in DAEMONS:
            if wait_for_ready(sockets[module], processes[module]) is None:
                raise RuntimeError(f"{module} did not become ready; see {workdir}")
        time.sleep(2)  # settle: first cycles, market loading
        cpu_before = {m: cpu_seconds(p.pid) for m, p in processes.items()}
        begun = time.monotonic()
        time.sleep(idle_s)
        elapsed = time.monotonic() - begun
        results = {}
        for module, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{module} exited with {process.returncode} while idle")
            results[module] = {
                "cpu_percent": 100 * (cpu_seconds(process.pid) - cpu_before[module]) / elapsed,
                "peak_rss_mb": peak_rss_mb(process.pid),
            }
        return results
    finally:
        for process in processes.values():
            stop_process(process)
        for notify in sockets.values():
            notify.close()


def run(idle_s=60, starts=5):
    redis_server = RedisServer().start()
    paper = PaperExchange(seed={"BTCUSDT": 0.01, "ETHUSDT": -0.5})
    paper_url = paper.start()
    workdir = tempfile.mkdtemp(prefix="eexit-cost-")
    try:
        start_ms = {}
        for module in DAEMONS:
            samples = [measure_start(module, redis_server.url, paper_url, workdir) for _ in range(starts)]
            ok = [s for s in samples if s is not None]
            start_ms[module] = {"median_ms": statistics.median(ok) if ok else None,
                                "samples_ms": samples}
            if not ok:
                raise RuntimeError(f"{module} never sent READY=1; see {workdir}")
            print(f"start {module}: median {start_ms[module]['median_ms']:.0f} ms", flush=True)
        print(f"idle: measuring {idle_s}s with all three daemons running", flush=True)
        idle = measure_idle(redis_server.url, paper_url, idle_s, workdir)
        return {"ready_ms": start_ms, "idle": idle, "idle_s": idle_s}
    finally:
        paper.stop()
        redis_server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=60)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    results = run(args.idle_s, args.starts)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "cost.json"), "w") as f:
        json.dump(results, f, indent=2)
    for module, figures in results["idle"].items():
        print(f"{module}: ready {results['ready_ms'][module]['median_ms']:.0f} ms, "
              f"peak RSS {figures['peak_rss_mb']:.1f} MB, idle CPU {figures['cpu_percent']:.2f} %")


if __name__ == "__main__":
    main()

"""Crash path benchmark without systemd: kill -9 of the Exit Brain -> verified FLAT through the hook.

    python bench/hook.py [--kills 20] [--latency-ms 25] [--out bench/results/hook.json]

Plays systemd's part as tests/test_hook.py does: a private redis-server, the paper exchange
with L ms on every request, `python -m eexit.eew` (signing on) and `python -m eexit.brain` as
processes; each round seeds 3 positions, starts a brain, waits for its healthy heartbeat,
waits a random 0-1 s, kills it with SIGKILL, reaps it (systemd learns of the death from
SIGCHLD the same way) and runs what the crash unit runs (`python -m eexit.hook` with the
Environment= lines of systemd/eexit-brain-crash@.service, EEXIT_CRASH=signal:killed:KILL).
The same under the real systemd, with the crash unit's start: bench/crash_systemd.py. No watchdog: its rules fire seconds later and are
measured by bench/detection.py; between rounds the halt and the incident are cleared as a
human's resume would.

  kill->panic  = panic entry time - kill time         (Redis clock)
  kill->FLAT   = FLAT report entry time - kill time   (Redis clock; the EEW re-read the account)
  hook wall    = spawn of the hook -> its exit        (this process's monotonic clock)
  hook elapsed = the hook's own elapsed_ms log field  (after its imports)
Target (issue 19): kill->FLAT <= 3 x L + 300 ms. Also: interpreter start and the hook's
import time (`python -X importtime`, cumulative us of eexit.hook). Writes JSON.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.detection import summary  # noqa: E402
from eexit import bus, schema  # noqa: E402
from eexit.localredis import RedisServer  # noqa: E402
from eexit.paper import PaperExchange  # noqa: E402
from tests.harness import python_env, start_module, stop_process, wait_for  # noqa: E402
from tests.test_hook import EEW_KEYS, HOOK_KEY, KILLED, crash_unit_env  # noqa: E402

COMMAND = [sys.executable, "-m", "eexit.hook"]

SEED = "BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:3"
SEED_COUNT = 3


def import_costs(runs=7):
    """(interpreter start ms, import eexit.hook ms) as medians: wall time of an
    empty `python -c pass`, and the importtime cumulative figures."""
    starts, imports = [], []
    env = python_env()
    for _ in range(runs):
        began = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        starts.append((time.monotonic() - began) * 1000)
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import eexit.hook"],
                             env=env, capture_output=True, text=True, check=True).stderr
        total = 0
        for name in ("eexit.hook",):
            match = re.search(rf"\|\s+(\d+) \| {re.escape(name)}$", out, re.M)
            total += int(match.group(1)) if match else 0
        imports.append(total / 1000)
    return round(sorted(starts)[len(starts) // 2], 1), round(sorted(imports)[len(imports) // 2], 1)


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="eexit-bench-hook-")
        self.redis_server = RedisServer().start()
        self.client = self.redis_server.client()
        self.paper = PaperExchange(seed=SEED, latency_ms=args.latency_ms)
        self.url = self.paper.start()
        self.processes = []
        self.argv, self.unit_env = COMMAND, crash_unit_env(KILLED)
        self.credentials = os.path.join(self.dir, "credentials")
        os.mkdir(self.credentials, 0o700)
        with open(os.path.join(self.credentials, "hook_hmac_key"), "w", encoding="ascii") as f:
            f.write(f"hk1 exit_brain {HOOK_KEY}\n")

    def env(self, **extra):
        return python_env(REDIS_URL=self.redis_server.url, EEXIT_EXCHANGE_URL=self.url,
                          EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret",
                          EEXIT_JOURNAL=os.path.join(self.dir, "journal.jsonl"), EEXIT_CONSUMER="eew-bench",
                          **extra)

    def start(self, module, **extra):
        process = start_module(module, self.env(**extra), os.path.join(self.dir, module + ".log"))
        self.processes.append(process)
        return process

    def close(self):
        for process in self.processes:
            stop_process(process)
        self.paper.stop()
        self.redis_server.stop()

    def latest(self, stream):
        entries = self.client.xrevrange(stream, "+", "-", count=1)
        return (bus.as_text(entries[0][0]), entries[0][1]) if entries else (None, None)

    def one_kill(self, number):
        self.paper.reset(seed=SEED)
        self.paper.add_fault(kind="latency", ms=self.args.latency_ms)
        self.client.delete("eexit:watchdog:incident")
        self.client.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "cleared_by": "bench"})
        since = bus.server_time_ms(self.client)
        brain = self.start("eexit.brain", EEXIT_BRAIN_INTERVAL_S="0.5")

        def healthy_beat():
            entry_id, raw = self.latest(schema.HEARTBEAT_STREAM)
            if entry_id is None or schema.entry_id_ms(entry_id) < since:
                return False
            beat, _ = schema.Heartbeat.from_fields(raw)
            return beat.status == "OK" and beat.active_positions == SEED_COUNT
        wait_for(healthy_beat, 60, message="brain healthy")
        time.sleep(random.uniform(0.0, 1.0))
        panics_before = self.client.xlen(schema.PANIC_STREAM)
        kill_ms = bus.server_time_ms(self.client)
        brain.send_signal(signal.SIGKILL)
        brain.wait(timeout=5)
        self.processes.remove(brain)
        began = time.monotonic()
        done = subprocess.run(self.argv, env=python_env(**{"REDIS_URL": self.redis_server.url,
                                                           "CREDENTIALS_DIRECTORY": self.credentials,
                                                           **self.unit_env}),
                              capture_output=True, text=True, timeout=30)
        hook_wall_ms = (time.monotonic() - began) * 1000
        if done.returncode != 0:
            raise RuntimeError(f"hook exited {done.returncode}: {done.stderr}")
        elapsed = re.search(r"elapsed_ms=([\d.]+)", done.stderr)
        panic = wait_for(lambda: self.client.xlen(schema.PANIC_STREAM) > panics_before
                         and self.client.xrange(schema.PANIC_STREAM, "-", "+")[panics_before], 30, message="panic")
        event, _ = schema.PanicEvent.from_fields(panic[1])

        def report():
            for entry_id, raw in self.client.xrevrange(schema.COMPLETED_STREAM, "+", "-", count=50):
                found, _ = schema.CompletionReport.from_fields(raw)
                if found.event_id == event.event_id:
                    return bus.as_text(entry_id), found
            return None
        report_id, found = wait_for(report, 60, message="report")
        row = {"kill": number, "issued_by": event.issued_by, "reason": event.reason,
               "kill_to_panic_ms": schema.entry_id_ms(bus.as_text(panic[0])) - kill_ms,
               "kill_to_flat_ms": schema.entry_id_ms(report_id) - kill_ms, "status": found.status,
               "hook_wall_ms": round(hook_wall_ms, 1),
               "hook_elapsed_ms": float(elapsed.group(1)) if elapsed else None,
               "flat_on_exchange": self.paper.positions() == {}}
        print(json.dumps(row), flush=True)
        return row

    def run(self):
        self.start("eexit.eew", EEXIT_PANIC_HMAC_KEYS=EEW_KEYS)
        wait_for(lambda: self.client.xlen(schema.EEW_HEARTBEAT_STREAM), 60, message="EEW up")
        return [self.one_kill(number) for number in range(1, self.args.kills + 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=25.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "hook.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    interpreter_ms, import_ms = import_costs()
    bench = Bench(args)
    try:
        rows = bench.run()
    finally:
        bench.close()
    target_ms = 3 * args.latency_ms + 300
    data = {"kills": args.kills, "latency_ms": args.latency_ms, "positions": SEED_COUNT, "target_ms": target_ms,
            "hook_timeout_s": float(bench.unit_env.get("EEXIT_HOOK_TIMEOUT_S", 5)),
            "command": "/opt/eexit/venv/bin/python -m eexit.hook (EEXIT_CRASH=signal:killed:KILL)",
            "kill_to_panic_ms": summary([r["kill_to_panic_ms"] for r in rows]),
            "kill_to_flat_ms": summary([r["kill_to_flat_ms"] for r in rows]),
            "hook_wall_ms": summary([r["hook_wall_ms"] for r in rows]),
            "hook_elapsed_ms": summary([r["hook_elapsed_ms"] for r in rows if r["hook_elapsed_ms"] is not None]),
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "interpreter_start_ms": interpreter_ms, "import_ms": import_ms,
            "all_flat": all(r["status"] == "FLAT" and r["flat_on_exchange"] for r in rows),
            "all_from_hook": all(r["issued_by"] == "exit_brain" for r in rows), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    flat = data["kill_to_flat_ms"]
    print(f"kill -> verified FLAT through the hook, L={args.latency_ms:g} ms: p50 {flat['p50']} ms, "
          f"p99 {flat['p99']} ms (target {target_ms:g}); hook wall p50 {data['hook_wall_ms']['p50']} ms; "
          f"interpreter {interpreter_ms} ms, imports {import_ms} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

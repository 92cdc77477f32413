"""Crash path under the machine's real systemd: kill -9 of the Exit Brain -> verified FLAT.

    python bench/crash_systemd.py [--kills 20] [--latency-ms 25] [--out bench/results/crash_systemd.json]
                                  [--markdown]

Boots /lib/systemd/systemd as PID 1 in private namespaces (tests/systemd_harness.py), installs
eexit with tools/install_offline.py and the distribution's /usr/bin/python3, starts
redis-server@eexit, the paper exchange (L ms on every request) and the units as installed
(EEW, audit, watchdog, brain). Each round: positions + a resting and a conditional order, the
brain heartbeating them, then SIGKILL of the brain's main process from the host; systemd runs
ExecStopPost=, which hands `signal:killed:KILL` to the running eexit-crash-listener.service
through its FIFO (the fallback, eexit-brain-crash@signal:killed:KILL.service, only when the
listener does not answer 0; each round records which path published, from the panic's
context), which publishes; the EEW flattens and re-reads the account. Between rounds the halt is
cleared with `eexit resume` as a human would.

  kill->panic  = panic entry id time - kill time        (one kernel clock: the namespace
  kill->FLAT   = FLAT report entry id time - kill time   shares the host's wall clock)
Target (issue 23): kill->FLAT p99 <= 375 ms at L = 25 ms. Prints the systemd version and the
load average beside the figures; writes JSON, and with --markdown the BENCHMARKS.md section.
"""

import argparse
import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.detection import summary  # noqa: E402
from eexit import schema  # noqa: E402
from tests.systemd_harness import EexitHost, systemd_version  # noqa: E402

SEED = [{"symbol": "BTCUSDT", "amount": "0.01"}, {"symbol": "ETHUSDT", "amount": "-0.5"},
        {"symbol": "SOLUSDT", "amount": "3"}]
TARGET_MS = 375


def entry_ms(entry_id):
    return int(str(entry_id).split("-")[0])


def prepare(host, client):
    """Resumed, positions and orders seeded, the brain beating them (after a restart)."""
    host.wait_active("eexit-brain.service")        # before the resume: a dead brain is a new incident
    state = schema.TradingState.from_fields(client.hgetall(schema.TRADING_STATE_KEY))[0]
    if state.halted:
        host.eexit("resume", "--operator", "bench", "--ack", state.event_id)
    # StartLimitBurst=5 in 120 s would stop restarting the brain after the fifth kill.
    host.systemctl("reset-failed", "eexit-brain.service", check=False)
    host.paper("POST", "/_paper/state", {"clear_positions": True, "clear_orders": True, "positions": SEED})
    host.paper_order("BTCUSDT", "SELL", "0.01", price="200000")
    host.paper_order("BTCUSDT", "SELL", "0.01", trigger="1000")

    def beating():
        entries = client.xrevrange(schema.HEARTBEAT_STREAM, count=1)
        return entries and entries[0][1].get("active_positions") == str(len(SEED)) and entries[0][1].get("status") == "OK"
    host.wait_for(beating, 60, "the brain beating with positions")


def one_kill(host, client):
    last = client.xrevrange(schema.PANIC_STREAM, count=1)
    since = last[0][0] if last else "0-0"
    pid = host.host_pid("eexit-brain.service")
    killed_ms = time.time() * 1000
    os.kill(pid, signal.SIGKILL)
    panic_id, panic = host.wait_for(lambda: next(iter(client.xrange(schema.PANIC_STREAM, f"({since}")), None), 30,
                                    "the crash path's panic")

    def report():
        for entry_id, fields in client.xrange(schema.COMPLETED_STREAM, since):
            if fields.get("event_id") == panic["event_id"] and fields.get("status") in ("FLAT", "RESIDUAL", "FAILED"):
                return entry_id, fields
        return None
    report_id, fields = host.wait_for(report, 60, "the report")
    exposure = host.paper_exposure()
    host.wait_for(lambda: host.host_pid("eexit-brain.service") not in (0, pid), 60, "the brain restarted")
    path = json.loads(panic.get("context") or "{}").get("hook", "none")
    return {"kill_to_panic_ms": entry_ms(panic_id) - killed_ms, "kill_to_flat_ms": entry_ms(report_id) - killed_ms,
            "status": fields["status"], "issued_by": panic["issued_by"], "path": path,
            "flat_on_exchange": exposure == ([], [], [])}


def markdown(result):
    flat = result["kill_to_flat_ms"]
    verdict = "PASS" if flat["p99"] <= TARGET_MS else "MISSED"
    return f"""## 1c. Crash path under the real systemd

{result['kills']} SIGKILLs of the Exit Brain's main process (3 positions, one resting and one conditional order) under the machine's own systemd ({result['systemd']}) booted as PID 1 in private namespaces (tests/systemd_harness.py), eexit installed by tools/install_offline.py with {result['python']}, units as installed: systemd runs the brain's `ExecStopPost=`, which writes `signal:killed:KILL` into the FIFO of the running `eexit-crash-listener.service` and waits for its answer (the oneshot `eexit-brain-crash@signal:killed:KILL.service` only as the fallback); the listener runs the hook on its warm Redis connection and publishes; the EEW flattens and verifies. Paper latency L = {result['latency_ms']} ms on every request; eexit-redis and the paper exchange on the namespace's loopback. Kill time from the host's clock, entry times from their stream ids (one kernel clock). 1-minute load average at start and end: {result['load']} on {os.cpu_count()} CPUs (the machine is shared); measured {result['measured']} (`python bench/crash_systemd.py --kills {result['kills']} --latency-ms {result['latency_ms']}`).

| figure | p50 | p99 | max | target | verdict |
|---|---|---|---|---|---|
| kill → panic (ms) | {result['kill_to_panic_ms']['p50']:.0f} | {result['kill_to_panic_ms']['p99']:.0f} | {result['kill_to_panic_ms']['max']:.0f} | - | - |
| kill → verified FLAT (ms) | {flat['p50']:.0f} | {flat['p99']:.0f} | {flat['max']:.0f} | p99 ≤ 375 | {verdict} |

All runs FLAT on the exchange (positions, resting and conditional orders): {result['all_flat']}; every panic from the crash path (issued_by=exit_brain): {result['all_from_hook']}; published by (the panic's `context` hook): {result['paths']}. Before the listener (the oneshot crash unit alone, same bench, 2026-12-07, load 5.3): p50 578 ms, p99 914 ms, most of it the unit's sandbox (~75 ms) and Python's start with `import redis` (~230 ms).
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--latency-ms", type=int, default=25)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench/results/crash_systemd.json"))
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md section")
    args = parser.parse_args(argv)
    load = [round(os.getloadavg()[0], 2)]
    rounds = []
    with EexitHost("bench-crash", paper_args=("--latency-ms", str(args.latency_ms))) as host:
        host.configure()
        host.start_units()
        client = host.redis()
        python = host.run(["/usr/bin/python3", "--version"]).stdout.strip()
        for number in range(args.kills):
            prepare(host, client)
            rounds.append(one_kill(host, client))
            print(f"kill {number + 1}/{args.kills}: {rounds[-1]}", flush=True)
    load.append(round(os.getloadavg()[0], 2))
    result = {"kills": args.kills, "latency_ms": args.latency_ms, "systemd": systemd_version(), "python": python,
              "load": load, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "kill_to_panic_ms": summary([r["kill_to_panic_ms"] for r in rounds]),
              "kill_to_flat_ms": summary([r["kill_to_flat_ms"] for r in rounds]),
              "all_flat": all(r["status"] == "FLAT" and r["flat_on_exchange"] for r in rounds),
              "all_from_hook": all(r["issued_by"] == "exit_brain" for r in rounds),
              "paths": {path: sum(r["path"] == path for r in rounds) for path in sorted({r["path"] for r in rounds})},
              "rounds": rounds}
    result["target_ms"] = TARGET_MS
    result["markdown"] = markdown(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"systemd: {result['systemd']}; load {load}; kill->panic {result['kill_to_panic_ms']}; "
          f"kill->FLAT {result['kill_to_flat_ms']} (target p99 <= {TARGET_MS} ms)")
    if args.markdown:
        print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

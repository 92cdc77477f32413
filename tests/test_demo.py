"""`eexit demo` end to end as a subprocess: the end state holds and nothing is left running,
also when the demo is interrupted (SIGINT) or killed (SIGKILL) halfway. The demo's own
speed criteria are not asserted here (no timed assertions in tests); its PASS line is what
`make demo` shows."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest

from tests.harness import ROOT, python_env

DEMO = [sys.executable, "-m", "eexit.cli", "demo"]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def processes_mentioning(text):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline and alive(int(entry)):
            found.append((int(entry), cmdline))
    return found


def redis_processes(port):
    """redis-server sets its process title to `redis-server 127.0.0.1:PORT`."""
    return [(pid, cmd) for pid, cmd in processes_mentioning(f":{port}") if "redis-server" in cmd]


def wait_gone(pids, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


class DemoTest(unittest.TestCase):
    def test_demo_end_state_and_nothing_left_running(self):
        result = subprocess.run([*DEMO, "--json"], env=python_env(), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        data = json.loads(result.stdout)
        end_state = {row["criterion"]: row["ok"] for row in data["criteria"] if row["criterion"].startswith("end state")}
        self.assertTrue(end_state and all(end_state.values()), (end_state, result.stderr[-3000:]))
        self.assertEqual(data["leftover_processes"], [])
        steps = [row["step"] for row in data["timeline"]]
        self.assertEqual(steps, ["kill", "detection", "panic_published", "halted", "orders_cancelled",
                                 "positions_closed", "verified_flat"])
        self.assertTrue(all(row["offset_ms"] is not None for row in data["timeline"]), data["timeline"])
        self.assertEqual(result.returncode, 0 if data["passed"] else 1)
        port = re.search(r"redis://127\.0\.0\.1:(\d+)", result.stderr).group(1)
        self.assertEqual(redis_processes(port), [])

    def interrupted(self, sig):
        process = subprocess.Popen([*DEMO, "--json"], env=python_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.wait)                      # cleanups run last-in first-out:
        self.addCleanup(lambda: process.poll() is None and process.kill())  # kill, then reap
        pids, port = [], None
        for line in process.stderr:
            match = re.search(r"redis://127\.0\.0\.1:(\d+)", line)
            if match:
                port = match.group(1)
            if "daemons:" in line:
                pids = [int(p) for p in re.findall(r"pid (\d+)", line)]
                break
        self.assertEqual(len(pids), 3)
        redis_pids = [pid for pid, _ in redis_processes(port)]
        self.assertEqual(len(redis_pids), 1)
        process.send_signal(sig)
        process.communicate(timeout=30)
        process.stderr.close()
        process.stdout.close()
        self.assertNotEqual(process.returncode, 0)
        self.assertEqual(wait_gone(pids + redis_pids), [])

    def test_sigint_leaves_nothing_running(self):
        self.interrupted(signal.SIGINT)

    def test_sigkill_of_the_demo_leaves_nothing_running(self):
        self.interrupted(signal.SIGKILL)


if __name__ == "__main__":
    unittest.main()

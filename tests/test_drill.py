"""tools/test_panic_close.py against the embedded stack: a real EEW subprocess, real Redis,
real ccxt to the paper exchange. Exit codes are the contract."""

import json
import subprocess
import sys
import unittest

from eexit import ops, schema
from eexit.demo import Stack
from eexit.localredis import free_port
from tests.harness import ROOT

DRILL = [sys.executable, "tools/test_panic_close.py"]


def run_drill(env, *args, timeout=60):
    return subprocess.run([*DRILL, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class DrillWithoutEEW(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack(seed="BTCUSDT:0.01").start(daemons=(), orders=())
        cls.addClassCleanup(cls.stack.stop)

    def setUp(self):
        self.client = self.stack.client()
        self.client.flushall()

    def test_refuses_an_exchange_that_is_not_paper_or_sandbox(self):
        not_paper = f"http://127.0.0.1:{free_port()}"
        for extra in ((), ("--live",), ("--yes-close-real-positions",)):
            result = run_drill(self.stack.env(EEXIT_EXCHANGE_URL=not_paper), *extra)
            self.assertEqual(result.returncode, 4, result.stdout + result.stderr)
            self.assertIn("refused", result.stdout)
        self.assertEqual(self.client.xlen(schema.PANIC_STREAM), 0)

    def test_refuses_the_default_real_exchange(self):
        env = self.stack.env()
        del env["EEXIT_EXCHANGE_URL"]
        result = run_drill(env)
        self.assertEqual(result.returncode, 4, result.stdout + result.stderr)

    def test_eew_not_running_is_non_zero_and_publishes_nothing(self):
        result = run_drill(self.stack.env())
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertIn("EEW is not running", result.stdout)
        self.assertEqual(self.client.xlen(schema.PANIC_STREAM), 0)

    def test_no_report_times_out_non_zero(self):
        # Something that looks like an EEW (heartbeat and group) but never answers.
        self.client.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0", mkstream=True)
        self.client.xadd(schema.EEW_HEARTBEAT_STREAM, {"service_id": "x", "status": "OK"})
        result = run_drill(self.stack.env(), "--timeout", "1", "--json")
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        data = json.loads(result.stdout)
        self.assertFalse(data["passed"])
        self.assertEqual(self.client.xlen(schema.PANIC_STREAM), 1)


class DrillWithEEW(unittest.TestCase):
    def start(self, **env):
        stack = Stack(seed="BTCUSDT:0.01,ETHUSDT:-0.5", env=env).start(daemons=("eew",))
        self.addCleanup(stack.stop)
        client = stack.client()
        stack.wait_until(lambda: ops.latest(client, schema.EEW_HEARTBEAT_STREAM), 30, "the EEW heartbeat")
        return stack, client

    def test_pass_flat_and_halted_by_its_own_event(self):
        stack, client = self.start()
        # An older report for another event must not be taken for ours.
        client.xadd(schema.COMPLETED_STREAM, schema.CompletionReport(
            event_id="older", status="FLAT", ts_started=1, ts_completed=2, execution_time_ms=1).to_fields())
        result = run_drill(stack.env(), "--json")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        data = json.loads(result.stdout)
        self.assertTrue(data["passed"])
        self.assertEqual(data["report"]["event_id"], data["event_id"])
        self.assertEqual(stack.paper.positions(), {})
        self.assertEqual(stack.open_order_count(), 0)
        state, _, _ = ops.read_state(client)
        self.assertEqual((state.halted, state.event_id), (True, data["event_id"]))

    def test_residual_is_fail(self):
        stack, _client = self.start(EEXIT_CLOSE_DEADLINE_S="1")
        stack.paper.add_fault(kind="reject", symbol="ETHUSDT", code=-2019, msg="Margin is insufficient.")
        result = run_drill(stack.env(), "--timeout", "20")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("FAIL", result.stdout)
        self.assertIn("ETH", result.stdout)


if __name__ == "__main__":
    unittest.main()

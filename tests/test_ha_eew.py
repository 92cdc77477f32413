"""The real EEW (`python -m eexit.eew`) behind Redis Sentinel, against real ccxt and the paper
exchange: the master is SIGKILLed in the middle of a panic, and during a burst of panics.

Promises checked (docs/HA.md): every panic is executed, exactly once per event_id (exactly one
execution report on the surviving master), and the account ends flat.

The short chaos run (20 panics) is in the normal suite; EEXIT_SLOW_TESTS=1 adds a long one.
"""

import os
import shutil
import tempfile
import threading
import time
import unittest
import uuid
from collections import Counter

from eexit import bus, schema
from eexit.paper import PaperExchange
from tests.harness import python_env, start_module, stop_process, wait_for
from tests.sentinel_harness import SentinelTopology

EXECUTED = ("FLAT", "RESIDUAL", "FAILED")


def panic(event_id):
    return schema.PanicEvent(event_id=event_id, reason="HA_TEST", issued_by="ops",
                             ts=int(time.time() * 1000))


def retrying(action, timeout_s=30.0):
    """Test-side reads during a failover: back off on Redis errors like a daemon does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return action()
        except bus.REDIS_ERRORS:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class EEWBehindSentinel(unittest.TestCase):
    def setUp(self):
        # Two replicas: after the master dies one is promoted and the other still replicates,
        # so WAIT 1 keeps confirming (the three-host topology of docs/HA.md).
        self.topology = SentinelTopology(replicas=2).start()
        self.addCleanup(self.topology.stop)
        self.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5", hedge=False)
        self.paper_url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.tmp = tempfile.mkdtemp(prefix="eexit-ha-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.client = bus.connect(self.topology.url, env={})
        self.addCleanup(self.client.close)
        self.eews = []

    def start_eew(self, consumer):
        env = python_env(
            REDIS_URL=self.topology.url, EEXIT_CONSUMER=consumer,
            EEXIT_EXCHANGE_URL=self.paper_url, EEXIT_API_KEY="paper-key",
            EEXIT_API_SECRET="paper-secret",
            EEXIT_JOURNAL=os.path.join(self.tmp, f"{consumer}-journal.jsonl"),
            EEXIT_CLOSE_DEADLINE_S=10, EEXIT_BLOCK_MS=100, EEXIT_SWEEP_INTERVAL_S=0.2,
            EEXIT_CLAIM_IDLE_MS=1500, EEXIT_BUS_LOSS_CLOSE_S=0, EEXIT_HEARTBEAT_INTERVAL_S=0.1)
        log_path = os.path.join(self.tmp, f"{consumer}.log")
        process = start_module("eexit.eew", env, log_path)
        self.eews.append((consumer, process, log_path))
        self.addCleanup(stop_process, process)

        def ready():
            if process.poll() is not None:
                raise AssertionError(f"EEW {consumer} exited: {self.logs()}")
            for _id, fields in self.client.xrevrange(schema.EEW_HEARTBEAT_STREAM, count=20):
                if fields.get(b"service_id") == consumer.encode() and fields.get(b"status") == b"OK":
                    return True
            return False
        wait_for(ready, 30, message=f"EEW {consumer} ready")

    def logs(self):
        parts = []
        for consumer, _process, path in self.eews:
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f"--- {consumer}\n{f.read()[-4000:]}")
        return "\n".join(parts)

    def reports(self):
        found = []
        for _entry_id, raw in retrying(lambda: self.client.xrange(schema.COMPLETED_STREAM)):
            report, _problems = schema.CompletionReport.from_fields(raw)
            found.append(report)
        return found

    def executions(self):
        return Counter(r.event_id for r in self.reports() if r.status in EXECUTED)

    def settled(self):
        """No panic entry left unacknowledged in the EEW group."""
        summary = retrying(lambda: self.client.xpending(schema.PANIC_STREAM, schema.EEW_GROUP))
        return summary["pending"] == 0

    def wait_executions(self, event_ids, timeout_s=40):
        try:
            wait_for(lambda: set(event_ids) <= set(self.executions()) and self.settled(), timeout_s,
                     interval_s=0.1, message=f"execution reports for {len(event_ids)} panic(s)")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nreports: {self.reports()}\n{self.logs()}") from None

    def assert_flat(self):
        state = self.paper.state()
        self.assertEqual([], state["positions"])
        self.assertEqual([], state["open_orders"])

    def test_master_killed_in_the_middle_of_a_panic(self):
        self.start_eew("eew-a")
        # Orders take 1.5 s each: the close is certainly in flight when the master dies.
        self.paper.add_fault(kind="latency", ms=1500, path="/fapi/v1/order", method="POST")
        event_id = str(uuid.uuid4())
        published = bus.publish_durable(self.client, schema.PANIC_STREAM, panic(event_id),
                                        replicas=2, timeout_ms=1000)
        self.assertTrue(published.confirmed)
        wait_for(lambda: self.paper.requests(path="/fapi/v1/order", method="POST"), 20,
                 message="the EEW's first close order")
        old_port = self.topology.kill_master()
        self.topology.wait_for_failover(old_port)
        self.wait_executions([event_id])
        reports = [r for r in self.reports() if r.event_id == event_id]
        self.assertEqual(["FLAT"], [r.status for r in reports], reports)
        self.assert_flat()
        halt, _ = schema.TradingState.from_fields(retrying(lambda: self.client.hgetall(schema.TRADING_STATE_KEY)))
        self.assertEqual((True, event_id), (halt.halted, halt.event_id))

    def test_chaos_twenty_panics_master_killed_none_lost_none_doubled(self):
        self.chaos(panics=20, kill_after=7, eews=("eew-a", "eew-b"))

    @unittest.skipUnless(os.environ.get("EEXIT_SLOW_TESTS") == "1", "slow: set EEXIT_SLOW_TESTS=1")
    def test_chaos_two_hundred_panics_two_kills(self):
        self.chaos(panics=200, kill_after=60, eews=("eew-a", "eew-b", "eew-c"), second_kill_after=140)

    def chaos(self, panics, kill_after, eews, second_kill_after=None):
        """Publish `panics` panics through publish_durable while SIGKILLing the master, with
        several EEWs in the one group. Zero lost: every event_id gets an execution report.
        Zero doubled: exactly one execution report per event_id on the surviving master."""
        for consumer in eews:
            self.start_eew(consumer)
        event_ids = [f"chaos-{index:03d}-{uuid.uuid4()}" for index in range(panics)]
        published, failures = [], []

        def publisher():
            client = bus.connect(self.topology.url, env={})
            for event_id in event_ids:
                try:
                    result = retrying(lambda: bus.publish_durable(
                        client, schema.PANIC_STREAM, panic(event_id), replicas=1, timeout_ms=500,
                        give_up_after_s=10.0))
                    published.append(result)
                except bus.REDIS_ERRORS as exc:
                    failures.append((event_id, repr(exc)))
                time.sleep(0.03)
            client.close()
        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        kills = [kill_after] + ([second_kill_after] if second_kill_after else [])
        for count in kills:
            wait_for(lambda: len(published) >= count or not thread.is_alive(), 60,
                     message=f"{count} panics published")
            old_port = self.topology.kill_master()
            self.topology.wait_for_failover(old_port)
            if second_kill_after:
                self.topology.revive_killed()
        thread.join(timeout=120)
        self.assertFalse(thread.is_alive(), "publisher stuck")
        self.assertEqual([], failures)
        self.wait_executions(event_ids, timeout_s=60)
        executions = self.executions()
        lost = [e for e in event_ids if executions[e] == 0]
        doubled = {e: n for e, n in executions.items() if n > 1}
        self.assertEqual(([], {}), (lost, doubled), self.logs())
        self.assert_flat()


if __name__ == "__main__":
    unittest.main()

"""Two watchdogs (as on two hosts) watching one Exit Brain behind Redis Sentinel: the brain is
killed with positions open -> both detect it -> exactly ONE execution by the EEW.

All daemons are real processes using the redis+sentinel:// URL; the paper exchange is real
HTTP to real ccxt. The watchdogs agree on one event_id through bus.claim_incident (one script
that writes the whole claim or nothing), see docs/HA.md."""

import os
import shutil
import signal
import tempfile
import time
import unittest
from collections import Counter

from eexit import bus, schema
from eexit.paper import PaperExchange
from tests.harness import python_env, start_module, stop_process, tail_logs, wait_for
from tests.sentinel_harness import SentinelTopology

EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret",
            "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}
WATCHDOG = {"EEXIT_UNGUARDED_S": "1.0", "EEXIT_HEARTBEAT_LOST_S": "2.0", "EEXIT_DEGRADED_S": "2.0",
            "EEXIT_STAGNANT_S": "30", "EEXIT_STARTUP_GRACE_S": "15", "EEXIT_REPUBLISH_S": "3"}
EXECUTED = ("FLAT", "RESIDUAL", "FAILED")


class TwoWatchdogsOneExecution(unittest.TestCase):
    def setUp(self):
        self.topology = SentinelTopology(replicas=1).start()
        self.addCleanup(self.topology.stop)
        self.client = bus.connect(self.topology.url, env={})
        self.addCleanup(self.client.close)
        self.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:3")
        self.paper_url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.dir = tempfile.mkdtemp(prefix="eexit-ha-wd-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.processes = []
        self.addCleanup(lambda: [stop_process(p) for p in self.processes])

    def start(self, module, name, **env):
        merged = {"REDIS_URL": self.topology.url, "EEXIT_EXCHANGE_URL": self.paper_url,
                  "EEXIT_JOURNAL": os.path.join(self.dir, "journal.jsonl"),
                  "EEXIT_CONSUMER": "eew-ha", **EXCHANGE, **env}
        process = start_module(module, python_env(**merged), os.path.join(self.dir, name + ".log"))
        self.processes.append(process)
        return process

    def logs(self):
        return tail_logs(self.dir)

    def brain_guarding(self):
        entries = self.client.xrevrange(schema.HEARTBEAT_STREAM, "+", "-", count=1)
        if not entries:
            return False
        beat, _ = schema.Heartbeat.from_fields(entries[0][1])
        return beat.status == "OK" and beat.active_positions == 3

    def watchdogs_beating(self):
        services = {fields.get(b"service_id") for _id, fields in
                    self.client.xrevrange(schema.WATCHDOG_HEARTBEAT_STREAM, "+", "-", count=50)}
        return len(services) >= 2 or self.client.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 4

    def executions(self):
        reports = [schema.CompletionReport.from_fields(raw)[0]
                   for _id, raw in self.client.xrange(schema.COMPLETED_STREAM)]
        return Counter(r.event_id for r in reports if r.status in EXECUTED), reports

    def test_brain_killed_two_watchdogs_one_execution(self):
        brain = self.start("eexit.brain", "brain", EEXIT_BRAIN_INTERVAL_S="0.2")
        self.start("eexit.eew", "eew")
        self.start("eexit.watchdog", "watchdog-host-a", **WATCHDOG)
        self.start("eexit.watchdog", "watchdog-host-b", **WATCHDOG)
        wait_for(self.brain_guarding, 20, message=f"brain guarding 3 positions\n{self.logs()}")
        wait_for(self.watchdogs_beating, 20, message=f"two watchdogs running\n{self.logs()}")
        wait_for(lambda: self.client.xlen(schema.EEW_HEARTBEAT_STREAM), 20, message=f"EEW running\n{self.logs()}")
        time.sleep(0.5)   # both watchdogs have heard the brain (their start-up grace is over)

        brain.send_signal(signal.SIGKILL)
        brain.wait(timeout=5)
        wait_for(lambda: self.executions()[0], 20, message=f"an execution report\n{self.logs()}")
        self.assertEqual(self.paper.positions(), {})
        # Both watchdogs fired within milliseconds of each other; let any second incident,
        # re-publish or second execution surface (past the re-publish delay) before counting.
        time.sleep(3.5)
        executions, reports = self.executions()
        panics = {schema.PanicEvent.from_fields(raw)[0].event_id
                  for _id, raw in self.client.xrange(schema.PANIC_STREAM)}
        self.assertEqual(len(panics), 1, f"event ids published: {panics}\n{self.logs()}")
        self.assertEqual(list(executions.values()), [1], f"{reports}\n{self.logs()}")
        self.assertEqual([r.status for r in reports if r.status in EXECUTED], ["FLAT"])


if __name__ == "__main__":
    unittest.main()

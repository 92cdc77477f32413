"""Acceptance, end to end with all three daemons as real processes: kill -9 of the Exit Brain
with positions open -> exactly one POSITIONS_UNGUARDED panic from the watchdog -> the EEW makes
the paper account FLAT and halts trading. Thresholds scaled down; no timed assertions (the
detection figures are in bench/detection.py)."""

import os
import signal
import tempfile
import time
import unittest

from eexit import schema
from eexit.paper import PaperExchange
from tests.harness import RedisTestCase, python_env, start_module, stop_process, tail_logs, wait_for

EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret", "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}
WATCHDOG = {"EEXIT_UNGUARDED_S": "1.0", "EEXIT_HEARTBEAT_LOST_S": "2.0", "EEXIT_DEGRADED_S": "2.0",
            "EEXIT_STAGNANT_S": "30", "EEXIT_STARTUP_GRACE_S": "15", "EEXIT_REPUBLISH_S": "5"}


class KillBrainEndToEnd(RedisTestCase):
    def setUp(self):
        super().setUp()
        self.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:3")
        self.url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.dir = tempfile.mkdtemp(prefix="eexit-e2e-")
        self.processes = []
        self.addCleanup(lambda: [stop_process(p) for p in self.processes])

    def start(self, module, **env):
        merged = {"REDIS_URL": self.redis_server.url, "EEXIT_EXCHANGE_URL": self.url,
                  "EEXIT_JOURNAL": os.path.join(self.dir, "journal.jsonl"), "EEXIT_CONSUMER": "eew-e2e",
                  **EXCHANGE, **env}
        process = start_module(module, python_env(**merged), os.path.join(self.dir, module + ".log"))
        self.processes.append(process)
        return process

    def logs(self):
        return tail_logs(self.dir)

    def last_beat(self):
        entries = self.redis.xrevrange(schema.HEARTBEAT_STREAM, "+", "-", count=1)
        if not entries:
            return None
        return entries[0][0].decode(), schema.Heartbeat.from_fields(entries[0][1])[0]

    def test_kill_brain_with_positions_open_goes_flat_with_one_panic(self):
        brain = self.start("eexit.brain", EEXIT_BRAIN_INTERVAL_S="0.2")
        self.start("eexit.eew")
        self.start("eexit.watchdog", **WATCHDOG)
        wait_for(lambda: (beat := self.last_beat()) and beat[1].status == "OK" and beat[1].active_positions == 3,
                 20, message=f"brain guarding 3 positions\n{self.logs()}")
        wait_for(lambda: self.redis.xlen(schema.EEW_HEARTBEAT_STREAM) and self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM),
                 20, message=f"EEW and watchdog heartbeats\n{self.logs()}")
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 0)

        brain.send_signal(signal.SIGKILL)
        brain.wait(timeout=5)
        last_beat_id, _beat = self.last_beat()

        panic = wait_for(lambda: self.redis.xrange(schema.PANIC_STREAM), 15, message=f"panic\n{self.logs()}")
        panic_id, fields = panic[0]
        event, problems = schema.PanicEvent.from_fields(fields)
        self.assertEqual(problems, [])
        self.assertEqual((event.reason, event.issued_by), ("POSITIONS_UNGUARDED", "watchdog"))
        # Never before the threshold (both ids on Redis's clock).
        self.assertGreaterEqual(schema.entry_id_ms(panic_id) - schema.entry_id_ms(last_beat_id), 1000)

        def flat_report():
            for _id, raw in self.redis.xrange(schema.COMPLETED_STREAM):
                report, _ = schema.CompletionReport.from_fields(raw)
                if report.event_id == event.event_id and report.status:
                    return report
            return None
        report = wait_for(flat_report, 30, message=f"completion report\n{self.logs()}")
        self.assertEqual(report.status, "FLAT", report)
        self.assertEqual(self.paper.positions(), {})
        halt, _ = schema.TradingState.from_fields(self.redis.hgetall(schema.TRADING_STATE_KEY))
        self.assertTrue(halt.halted)

        time.sleep(2.5)   # past the lost threshold and while the brain stays dead
        event_ids = {schema.PanicEvent.from_fields(raw)[0].event_id for _id, raw in self.redis.xrange(schema.PANIC_STREAM)}
        self.assertEqual(event_ids, {event.event_id})
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 1)


if __name__ == "__main__":
    unittest.main()

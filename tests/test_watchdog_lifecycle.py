"""Issue 26, acceptance end to end: the real Exit Brain, watchdog and EEW as processes, a real
redis-server, real ccxt against the paper exchange, `eexit resume` as the operator runs it.
No crash hook is involved: these prove the watchdog's own side. No timed assertions: only
what happened and in which order (a threshold is checked as "not before").

- a resume while the brain is dead is followed by a new panic (resume does not refuse);
- DEGRADED after a resume: a new panic, by the DEGRADED rule;
- RESIDUAL with the EEW's halt guard off: the watchdog keeps closing (new event ids) until the
  exchange accepts again and a FLAT report arrives;
- a bot beating on the brain's stream does not hide the brain's death;
- kill -9 of the brain and a restart after 1 s (under every silence threshold): one panic,
  EXIT_BRAIN_RESTARTED, FLAT;
- a stale claim neither blocks the next crash nor flattens a healthy brain.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from eexit import bus, schema
from eexit.paper import PaperExchange
from eexit.schema import INCIDENT_KEY
from tests.harness import ROOT, RedisTestCase, python_env, start_module, stop_process, tail_logs, wait_for
from tests.test_watchdog import Beater

EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret", "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}
WATCHDOG = {"EEXIT_UNGUARDED_S": "1.0", "EEXIT_HEARTBEAT_LOST_S": "2.0", "EEXIT_DEGRADED_S": "2.0",
            "EEXIT_STAGNANT_S": "60", "EEXIT_STARTUP_GRACE_S": "15", "EEXIT_REPUBLISH_S": "0.5",
            "EEXIT_WATCHDOG_HEARTBEAT_S": "0.2"}
# The EEW's own halt guard is off: whatever closes is the watchdog's doing. No cooldown, so
# the operator can resume at once.
EEW = {"EEXIT_HALT_GUARD_S": "0", "EEXIT_RESUME_COOLDOWN_S": "0", "EEXIT_CONSUMER": "eew-lifecycle"}
BRAIN = {"EEXIT_BRAIN_INTERVAL_S": "0.2"}


class LifecycleTest(RedisTestCase):
    seed = "BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:3"

    def setUp(self):
        super().setUp()
        self.paper = PaperExchange(seed=self.seed)
        self.url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.dir = tempfile.mkdtemp(prefix="eexit-lifecycle-")
        self.processes = []
        self.addCleanup(lambda: [stop_process(p) for p in self.processes])

    def start(self, module, **env):
        merged = {"REDIS_URL": self.redis_server.url, "EEXIT_EXCHANGE_URL": self.url,
                  "EEXIT_JOURNAL": os.path.join(self.dir, "journal.jsonl"), **EXCHANGE, **env}
        process = start_module(module, python_env(**merged), os.path.join(self.dir, module + ".log"))
        self.processes.append(process)
        return process

    def start_all(self, watchdog=None, eew=None):
        brain = self.start("eexit.brain", **BRAIN)
        self.start("eexit.eew", **{**EEW, **(eew or {})})
        self.start("eexit.watchdog", **{**WATCHDOG, **(watchdog or {})})
        self.wait_guarding(3)
        wait_for(lambda: self.redis.xlen(schema.EEW_HEARTBEAT_STREAM) and self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM),
                 30, message=f"EEW and watchdog heartbeats\n{self.logs()}")
        return brain

    def logs(self):
        return tail_logs(self.dir)

    def log(self, module):
        with open(os.path.join(self.dir, module + ".log"), encoding="utf-8") as f:
            return f.read()

    def last_beat(self):
        entries = self.redis.xrevrange(schema.HEARTBEAT_STREAM, "+", "-", count=20)
        for entry_id, raw in entries:
            beat = schema.Heartbeat.from_fields(raw)[0]
            if beat.service_id == "exit_brain":
                return entry_id.decode(), beat
        return None

    def wait_guarding(self, positions, timeout_s=30):
        return wait_for(lambda: (b := self.last_beat()) and b[1].status == "OK" and b[1].active_positions == positions
                        and b, timeout_s, message=f"brain guarding {positions}\n{self.logs()}")

    def panics(self):
        return [(entry_id.decode(), schema.PanicEvent.from_fields(raw)[0])
                for entry_id, raw in self.redis.xrange(schema.PANIC_STREAM)]

    def reports(self, event_id=None):
        found = [schema.CompletionReport.from_fields(raw)[0] for _id, raw in self.redis.xrange(schema.COMPLETED_STREAM)]
        return [r for r in found if event_id is None or r.event_id == event_id]

    def wait_flat(self, event_id, timeout_s=40):
        report = wait_for(lambda: [r for r in self.reports(event_id) if r.status in ("FLAT", "RESIDUAL", "FAILED")],
                          timeout_s, message=f"final report for {event_id}\n{self.logs()}")[0]
        self.assertEqual(report.status, "FLAT", report)
        return report

    def wait_panic(self, count, timeout_s=20):
        return wait_for(lambda: len(p := self.panics()) >= count and p, timeout_s,
                        message=f"{count} panic(s)\n{self.logs()}")

    def halt(self):
        return schema.TradingState.from_fields(self.redis.hgetall(schema.TRADING_STATE_KEY))[0]

    def resume(self, event_id):
        result = subprocess.run([sys.executable, "-m", "eexit.cli", "resume", "--operator", "alice", "--ack", event_id],
                                env=python_env(REDIS_URL=self.redis_server.url, EEXIT_RESUME_TIMEOUT_S="30"),
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.logs())
        # (The halt may already stand again: a rule still firing panics at once.)

    def event_ids(self):
        return [event.event_id for _id, event in self.panics()]

    def kill(self, process):
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)

    # -- resume ------------------------------------------------------------------------------

    def test_a_resume_while_the_brain_is_dead_is_followed_by_a_new_panic(self):
        brain = self.start_all()
        self.kill(brain)
        [(_id, first)] = self.wait_panic(1)
        self.assertEqual(first.reason, "POSITIONS_UNGUARDED")
        self.wait_flat(first.event_id)
        self.assertIs(self.halt().halted, True)
        self.assertEqual(self.event_ids(), [first.event_id] * len(self.panics()))   # one incident while halted

        self.resume(first.event_id)                     # the brain is still dead
        second = wait_for(lambda: [e for _id, e in self.panics() if e.event_id != first.event_id], 20,
                          message=f"a panic after the resume\n{self.logs()}")[0]
        self.assertEqual((second.reason, second.issued_by), ("POSITIONS_UNGUARDED", "watchdog"))
        self.wait_flat(second.event_id)
        self.assertIs(self.halt().halted, True)
        self.assertIn(f"event=incident_closed event_id={first.event_id} why=resumed", self.log("eexit.watchdog"))

    def test_degraded_after_a_resume_panics_by_the_degraded_rule(self):
        brain = self.start_all()
        self.kill(brain)
        [(_id, first)] = self.wait_panic(1)
        self.wait_flat(first.event_id)
        self.start("eexit.brain", **BRAIN)              # back, guarding an empty account
        self.wait_guarding(0)
        self.resume(first.event_id)
        wait_for(lambda: not self.redis.exists(INCIDENT_KEY), 20, message=f"incident ended by the resume\n{self.logs()}")
        self.assertEqual(set(self.event_ids()), {first.event_id})   # the restart was absorbed by the open incident

        self.paper.add_fault(kind="error", status=503, path="positionRisk", duration_s=120)
        degraded_id = wait_for(lambda: (b := self.last_beat()) and b[1].status == "DEGRADED" and b[0], 20,
                               message=f"DEGRADED heartbeat\n{self.logs()}")
        second = wait_for(lambda: [(i, e) for i, e in self.panics() if e.event_id != first.event_id], 20,
                          message=f"a panic after DEGRADED\n{self.logs()}")[0]
        self.assertEqual(second[1].reason, "EXIT_BRAIN_DEGRADED_TOO_LONG")
        self.assertGreaterEqual(schema.entry_id_ms(second[0]) - schema.entry_id_ms(degraded_id), 2000)

    # -- only FLAT ends the closing ----------------------------------------------------------

    def test_residual_with_the_halt_guard_off_is_closed_once_the_exchange_accepts(self):
        brain = self.start_all(eew={"EEXIT_CLOSE_DEADLINE_S": "1"})
        self.paper.add_fault(kind="reject", symbol="SOLUSDT", path="order", code=-2019, msg="Margin is insufficient.",
                             duration_s=6)
        self.kill(brain)
        residual = wait_for(lambda: [r for r in self.reports() if r.status in ("RESIDUAL", "FAILED")], 30,
                            message=f"a RESIDUAL report\n{self.logs()}")[0]
        flat = wait_for(lambda: [r for r in self.reports() if r.status == "FLAT"], 60,
                        message=f"FLAT after the exchange accepts again\n{self.logs()}")[0]
        self.assertNotEqual(flat.event_id, residual.event_id)           # a new round, a new event id
        self.assertEqual(flat.issued_by, "watchdog")
        self.assertEqual(self.paper.positions(), {})
        log = self.log("eexit.watchdog")
        self.assertIn(f"level=CRITICAL event=incident_not_flat event_id={residual.event_id}", log)
        # The watchdog records the FLAT report in the incident after it reads it: wait for that.
        incident = wait_for(lambda: (i := self.redis.hgetall(INCIDENT_KEY)).get(b"completed_status") == b"FLAT" and i,
                            20, message=f"the incident records FLAT\n{self.logs()}")
        self.assertGreaterEqual(int(incident[b"round"]), 1)
        self.assertEqual(incident[b"current_event_id"].decode(), flat.event_id)

    # -- whose heartbeats --------------------------------------------------------------------

    def test_a_bot_beating_on_the_stream_does_not_hide_the_brains_death(self):
        brain = self.start_all()
        bot = Beater(self.redis_server.client(), service_id="my_bot", active_positions=0).start()
        self.addCleanup(bot.stop)
        wait_for(lambda: "event=heartbeat_ignored service_id=my_bot" in self.log("eexit.watchdog"), 20,
                 message=f"bot ignored\n{self.logs()}")
        self.kill(brain)
        [(_id, event)] = self.wait_panic(1)
        self.assertEqual(event.reason, "POSITIONS_UNGUARDED")
        self.wait_flat(event.event_id)
        self.assertEqual(self.log("eexit.watchdog").count("event=heartbeat_ignored"), 1)   # once per producer

    # -- a fast restart is a crash -----------------------------------------------------------

    def test_kill_9_and_restart_after_one_second_is_one_panic_and_flat(self):
        # Silence thresholds far above the restart gap: only the new instance can tell.
        brain = self.start_all(watchdog={"EEXIT_UNGUARDED_S": "30", "EEXIT_HEARTBEAT_LOST_S": "30"})
        _id, before = self.last_beat()
        self.kill(brain)
        time.sleep(1.0)                                 # systemd's RestartSec=1
        self.start("eexit.brain", **BRAIN)
        [(_id, event)] = self.wait_panic(1)
        self.assertEqual((event.reason, event.issued_by), ("EXIT_BRAIN_RESTARTED", "watchdog"))
        self.assertIn(before.instance, event.extra["context"])
        self.wait_flat(event.event_id)
        self.assertEqual(self.paper.positions(), {})
        self.wait_guarding(0)
        later = self.redis.xlen(schema.HEARTBEAT_STREAM)
        wait_for(lambda: self.redis.xlen(schema.HEARTBEAT_STREAM) >= later + 10, 20, message="more beats")
        self.assertEqual(set(self.event_ids()), {event.event_id})     # one panic

    def test_a_clean_stop_and_start_is_no_panic(self):
        brain = self.start_all(watchdog={"EEXIT_UNGUARDED_S": "30", "EEXIT_HEARTBEAT_LOST_S": "30"})
        _id, before = self.last_beat()
        brain.send_signal(signal.SIGTERM)
        self.assertEqual(brain.wait(timeout=10), 0)
        _id, stopped = self.last_beat()
        self.assertEqual((stopped.status, stopped.instance, stopped.active_positions), ("STOPPED", before.instance, 3))
        self.start("eexit.brain", **BRAIN)
        _id, after = self.wait_guarding(3)
        self.assertNotEqual(after.instance, before.instance)
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 20, 20, message="watchdog beats")
        self.assertEqual(self.panics(), [])

    # -- stale claims ------------------------------------------------------------------------

    def test_a_stale_claim_neither_blocks_the_next_crash_nor_flattens_a_healthy_brain(self):
        brain = self.start_all()
        stale = "cccccccc-3333-4333-8333-333333333333"
        # A crash hook that claimed a minute ago and never published (the old hook's failure).
        now_ms = bus.server_time_ms(self.redis)
        self.redis.hset(INCIDENT_KEY, mapping={"event_id": stale, "reason": "EXIT_BRAIN_DIED", "opened_by": "hook",
                                               "opened_at_ms": str(now_ms - 60_000)})
        start = self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM)
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= start + 10, 20, message="watchdog beats")
        self.assertEqual(self.panics(), [])                              # a healthy brain is not flattened
        self.assertEqual(len(self.paper.positions()), 3)
        self.kill(brain)
        [(_id, event)] = self.wait_panic(1)
        self.assertNotEqual(event.event_id, stale)
        self.assertEqual(event.reason, "POSITIONS_UNGUARDED")
        self.wait_flat(event.event_id)
        self.assertIn(f"event=stale_claim_dropped event_id={stale}", self.log("eexit.watchdog"))


if __name__ == "__main__":
    unittest.main()

"""The watchdog daemon against a real redis-server: real processes, thresholds scaled down.

The heartbeats come from the test (eexit.heartbeat.Heartbeat, the publisher any bot uses), so
each rule can be driven exactly; the Exit Brain end to end is in test_brain*.py and
test_e2e_kill_brain.py. No timed assertions: only what happened, and in which order.
"""

import ast
import os
import signal
import tempfile
import threading
import time
import unittest

from eexit import bus, schema, signing
from eexit.heartbeat import Heartbeat
from eexit.schema import INCIDENT_KEY
from eexit.watchdog import Config, Watchdog
from eexit.log import Logger
from tests.harness import NotifySocket, RedisTestCase, python_env, start_module, stop_process, wait_for

# For tests of the other rules: a beat the loaded machine delays by a second is no silence.
QUIET_SILENCE = {"EEXIT_HEARTBEAT_LOST_S": "10", "EEXIT_UNGUARDED_S": "10"}
SCALED = {"EEXIT_HEARTBEAT_LOST_S": "1.0", "EEXIT_UNGUARDED_S": "0.6", "EEXIT_DEGRADED_S": "1.0",
          "EEXIT_STAGNANT_S": "1.5", "EEXIT_STARTUP_GRACE_S": "0.5", "EEXIT_REPUBLISH_S": "30",
          "EEXIT_WATCHDOG_HEARTBEAT_S": "0.2"}


class Beater:
    """Publishes heartbeats every 0.1 s from a thread; the test changes `fields` on the fly."""

    def __init__(self, client, service_id="exit_brain", **fields):
        self.publisher = Heartbeat(client, service_id)
        self.fields = {"status": "OK", "active_positions": 0, "decision": "fresh", **fields}
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            now_ms = int(time.time() * 1000)
            decided = now_ms if self.fields["decision"] == "fresh" else self.fields["decision"]
            try:
                self.publisher.publish(self.fields["status"], self.fields["active_positions"], decided, 1.0)
            except bus.REDIS_ERRORS:
                pass   # Redis taken away by a chaos test: keep trying, as a brain would
            self._stop.wait(0.1)

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)


def panics(client):
    return [schema.PanicEvent.from_fields(fields)[0] for _id, fields in client.xrange(schema.PANIC_STREAM)]


def halt(client, event_id):
    """What the EEW writes when it executes a panic (the test plays it)."""
    client.delete(schema.TRADING_STATE_KEY)
    client.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": event_id, "reason": "test",
                                                  "halted_at": str(bus.server_time_ms(client))})


def resume(client):
    """What the EEW writes when it executes a human's resume (the test plays it): the halt
    cleared, cleared_at on Redis's clock."""
    client.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "cleared_by": "test",
                                                  "cleared_at": str(bus.server_time_ms(client))})


def publish_report(client, event_id, status="FLAT"):
    report = schema.CompletionReport(event_id=event_id, status=status, issued_by="watchdog",
                                     positions_total=0, ts_started=1, ts_completed=2, execution_time_ms=1)
    bus.publish(client, schema.COMPLETED_STREAM, report)


class WatchdogProcessTest(RedisTestCase):
    def setUp(self):
        super().setUp()
        self.logdir = tempfile.mkdtemp(prefix="eexit-wd-")
        self.processes = []
        self.beaters = []

    def tearDown(self):
        for beater in self.beaters:
            beater.stop()
        for process in self.processes:
            stop_process(process)
        super().tearDown()

    def start_watchdog(self, **env):
        merged = {**SCALED, "REDIS_URL": self.redis_server.url, **env}
        process = start_module("eexit.watchdog", python_env(**merged), os.path.join(self.logdir, "watchdog.log"))
        self.processes.append(process)
        return process

    def beater(self, **fields):
        beater = Beater(self.redis_server.client(), **fields).start()
        self.beaters.append(beater)
        return beater

    def log_text(self):
        with open(os.path.join(self.logdir, "watchdog.log"), encoding="utf-8") as f:
            return f.read()

    def wait_panics(self, count, timeout_s=10):
        return wait_for(lambda: len(panics(self.redis)) >= count and panics(self.redis), timeout_s,
                        message=f"{count} panic(s); log:\n{self.log_text()}")

    def test_silence_with_positions_is_one_positions_unguarded_panic(self):
        beater = self.beater(active_positions=2)
        self.start_watchdog()
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 10, message="watchdog heartbeat")
        self.assertEqual(panics(self.redis), [])
        beater.stop()
        [event] = self.wait_panics(1)
        self.assertEqual((event.reason, event.issued_by, event.severity), ("POSITIONS_UNGUARDED", "watchdog", "CRITICAL"))
        time.sleep(1.5)   # past the lost threshold too: still the same single panic
        self.assertEqual(len(panics(self.redis)), 1)
        stored = self.redis.hgetall(INCIDENT_KEY)
        self.assertEqual(stored[b"event_id"].decode(), event.event_id)

    def test_silence_without_positions_is_heartbeat_lost(self):
        beater = self.beater(active_positions=0)
        self.start_watchdog()
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 10, message="watchdog heartbeat")
        beater.stop()
        [event] = self.wait_panics(1)
        self.assertEqual(event.reason, "EXIT_BRAIN_HEARTBEAT_LOST")

    def test_no_heartbeat_at_all_after_start_is_an_incident(self):
        self.start_watchdog()
        [event] = self.wait_panics(1)
        self.assertEqual(event.reason, "EXIT_BRAIN_HEARTBEAT_LOST")
        self.assertIn("since start", event.extra["context"])

    def test_degraded_too_long(self):
        beater = self.beater(active_positions=0)
        self.start_watchdog(**QUIET_SILENCE)
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 10, message="watchdog heartbeat")
        beater.fields["status"] = "DEGRADED"
        [event] = self.wait_panics(1)
        self.assertEqual(event.reason, "EXIT_BRAIN_DEGRADED_TOO_LONG")

    def test_stagnant_decisions_with_positions(self):
        beater = self.beater(active_positions=1)
        self.start_watchdog(**QUIET_SILENCE)
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 10, message="watchdog heartbeat")
        beater.fields["decision"] = int(time.time() * 1000)
        [event] = self.wait_panics(1)
        self.assertEqual(event.reason, "EXIT_BRAIN_DECISION_STAGNANT")

    def test_republish_same_event_until_flat_then_a_resume_ends_the_incident(self):
        beater = self.beater(active_positions=1)
        self.start_watchdog(EEXIT_REPUBLISH_S="0.3")
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 10, message="watchdog heartbeat")
        beater.stop()
        first = self.wait_panics(2)
        self.assertEqual({event.event_id for event in first}, {first[0].event_id})
        halt(self.redis, first[0].event_id)
        publish_report(self.redis, first[0].event_id)
        wait_for(lambda: self.redis.hget(INCIDENT_KEY, "completed_status") == b"FLAT", 10, message="report seen")
        count_after_report = len(panics(self.redis))
        beater = self.beater(active_positions=0)
        # Healthy beats do not end it: only a human's resume does (the halt is the latch).
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 15, 10, message="beats")
        self.assertTrue(self.redis.exists(INCIDENT_KEY))
        resume(self.redis)
        wait_for(lambda: not self.redis.exists(INCIDENT_KEY), 10, message="incident closed by the resume")
        # The line follows the DEL: wait for it rather than race it.
        wait_for(lambda: "event=incident_closed" in self.log_text(), 10, message="incident_closed logged")
        self.assertEqual(len(panics(self.redis)), count_after_report)   # nothing re-published after the report
        beater.stop()
        events = self.wait_panics(count_after_report + 1)
        self.assertNotEqual(events[-1].event_id, first[0].event_id)    # a new incident, a new id
        self.assertEqual(events[-1].reason, "EXIT_BRAIN_HEARTBEAT_LOST")

    def test_no_rearm_while_unhealthy_even_after_report(self):
        beater = self.beater(active_positions=1)
        self.start_watchdog()
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 10, message="watchdog heartbeat")
        beater.stop()
        [event] = self.wait_panics(1)
        publish_report(self.redis, event.event_id)
        time.sleep(2.0)
        self.assertEqual([e.event_id for e in panics(self.redis)], [event.event_id])
        self.assertTrue(self.redis.exists(INCIDENT_KEY))

    def test_watchdog_killed_and_restarted_during_incident_keeps_one_event_id(self):
        beater = self.beater(active_positions=1)
        watchdog = self.start_watchdog(EEXIT_REPUBLISH_S="0.5")
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 10, message="watchdog heartbeat")
        beater.stop()
        [event] = self.wait_panics(1)
        watchdog.send_signal(signal.SIGKILL)
        watchdog.wait(timeout=5)
        self.start_watchdog(EEXIT_REPUBLISH_S="0.5")
        wait_for(lambda: "incident_recovered" in self.log_text(), 10, message="incident recovered")
        events = self.wait_panics(2)    # the restarted watchdog re-publishes: the same id
        self.assertEqual({e.event_id for e in events}, {event.event_id})

    def test_crash_between_incident_and_publish_publishes_the_recorded_id(self):
        # Claimed a moment ago (within CLAIM_GRACE_S): its opener may have died before the XADD.
        self.redis.hset(INCIDENT_KEY, mapping={"event_id": "11111111-2222-4333-8444-555555555555",
                                               "reason": "POSITIONS_UNGUARDED",
                                               "opened_at_ms": str(bus.server_time_ms(self.redis))})
        self.beater(active_positions=0)
        self.start_watchdog()
        [event] = self.wait_panics(1)
        self.assertEqual((event.event_id, event.reason), ("11111111-2222-4333-8444-555555555555", "POSITIONS_UNGUARDED"))

    def test_signed_panic_verifies(self):
        keys = "wd1 watchdog " + "ab" * 32 + ",ops1 ops " + "cd" * 32
        self.start_watchdog(EEXIT_PANIC_HMAC_KEYS="wd1 watchdog " + "ab" * 32)
        self.wait_panics(1)
        _id, fields = self.redis.xrange(schema.PANIC_STREAM)[0]
        ring = signing.load_keys({"EEXIT_PANIC_HMAC_KEYS": keys})
        self.assertEqual(signing.verify_fields(fields, ring), (True, "signature_ok"))

    def test_keys_without_a_watchdog_key_is_a_config_error(self):
        process = self.start_watchdog(EEXIT_PANIC_HMAC_KEYS="ops1 ops " + "cd" * 32)
        self.assertEqual(process.wait(timeout=10), 2)

    def test_a_key_file_holding_another_issuers_key_is_refused_naming_the_file(self):
        # The watchdog must not be able to sign as ops (issue 26 finding 9).
        credentials = tempfile.mkdtemp(prefix="eexit-creds-")
        path = os.path.join(credentials, "panic_hmac_keys")
        with open(path, "w", encoding="utf-8") as f:
            f.write("wd1 watchdog " + "ab" * 32 + "\nops1 ops " + "cd" * 32 + "\n")
        process = self.start_watchdog(CREDENTIALS_DIRECTORY=credentials)
        self.assertEqual(process.wait(timeout=10), 2)
        log = self.log_text()
        self.assertIn(f"{path} holds keys of other issuers (ops)", log)
        self.assertNotIn("cd" * 32, log)
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 0)

    def test_redis_outage_stops_pings_then_resumes(self):
        notify = NotifySocket()
        self.addCleanup(notify.close)
        self.beater(active_positions=0)
        self.start_watchdog(**notify.env(watchdog_usec=600_000))
        wait_for(lambda: len(notify.times_of("WATCHDOG=1")) >= 3, 10, message="pings")
        self.assertTrue(notify.times_of("READY=1"))
        self.redis_server.kill()
        killed_at = time.monotonic()
        wait_for(lambda: "redis_unreachable" in self.log_text(), 10, message="CRITICAL redis_unreachable")
        time.sleep(2.0)
        late = [at for at in notify.times_of("WATCHDOG=1") if at > killed_at + 1.0]
        self.assertEqual(late, [], "pings must stop while the watchdog cannot evaluate")
        self.redis_server.start()
        resumed_after = time.monotonic()
        wait_for(lambda: [at for at in notify.times_of("WATCHDOG=1") if at > resumed_after], 15, message="pings resume")
        self.assertIn("level=CRITICAL event=redis_unreachable", self.log_text())


    def test_a_command_error_on_the_heartbeat_stream_is_blind_and_says_so(self):
        # WRONGTYPE is not "Redis unreachable": the cause is named in the log and in STATUS=,
        # and the same rule as for an outage stops the pings (systemd restarts the watchdog).
        notify = NotifySocket()
        self.addCleanup(notify.close)
        self.start_watchdog(**notify.env(watchdog_usec=600_000))
        wait_for(lambda: notify.times_of("READY=1"), 10, message="READY")
        self.redis.delete(schema.HEARTBEAT_STREAM)
        self.redis.set(schema.HEARTBEAT_STREAM, "not a stream")
        wait_for(lambda: "level=CRITICAL event=blind cause=WRONGTYPE" in self.log_text(), 10,
                 message=f"CRITICAL blind\n{self.log_text()}")
        wait_for(lambda: [text for _at, text in notify.messages() if "STATUS=blind: WRONGTYPE" in text], 10,
                 message="STATUS=blind")


class ClockIndependenceTest(RedisTestCase):
    """The watchdog in-process with its clocks injected: producer clocks off by an hour and a
    step of the watchdog's wall clock change nothing; only the monotonic clock ages beats."""

    def test_producer_skew_and_wall_clock_steps_change_nothing(self):
        cfg = Config.from_env({"EEXIT_WATCHDOG_POLL_MS": "1", "EEXIT_STARTUP_GRACE_S": "0"})
        mono = [1000.0]
        wall = [1_700_000_000_000]
        logger = Logger("watchdog", stream=open(os.devnull, "w"))
        self.addCleanup(logger.stream.close)
        watchdog = Watchdog(cfg, self.redis, signing.KeyRing(), log=logger,
                            monotonic=lambda: mono[0], clock_ms=lambda: wall[0])
        publisher = Heartbeat(self.redis, "exit_brain")
        watchdog.resync()
        producer_now = int(time.time() * 1000)
        for second, (skew_ms, wall_step_ms) in enumerate([(3_600_000, 0), (-3_600_000, 3_600_000),
                                                          (3_600_000, -7_200_000), (-3_600_000, 0)] * 3):
            # A beat stamped an hour off (its decision 100 ms before its own ts), then one
            # second of monotonic time during which the watchdog's wall clock jumps.
            publish_beat(publisher, producer_now + skew_ms, positions=1)
            watchdog.step()
            wall[0] += wall_step_ms
            mono[0] += 1.0
            watchdog.step()
            self.assertIsNone(watchdog.last_trigger, f"false trigger at step {second}")
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 0)
        mono[0] += cfg.limits.unguarded_s - 1.0     # exactly at the threshold since the last beat
        watchdog.step()
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 0)
        mono[0] += 0.001
        watchdog.step()
        self.assertEqual(watchdog.last_trigger.reason, "POSITIONS_UNGUARDED")
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 1)

    def test_ages_never_read_the_wall_clock(self):
        path = os.path.join(os.path.dirname(__file__), "..", "eexit", "watchdog.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        calls = [node.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "time"]
        self.assertNotIn("time", calls)   # only time.monotonic and time.sleep are used

    def test_watchdog_does_not_import_ccxt(self):
        import subprocess
        import sys
        out = subprocess.run([sys.executable, "-c", "import sys, eexit.watchdog; print('ccxt' in sys.modules)"],
                             env=python_env(), capture_output=True, text=True, timeout=30)
        self.assertEqual(out.stdout.strip(), "False", out.stderr)

    def test_backlog_is_aged_on_the_redis_clock(self):
        publisher = Heartbeat(self.redis, "exit_brain")
        server_ms = bus.server_time_ms(self.redis)
        fields = schema.Heartbeat("exit_brain", "OK", 1, 1, 1.0, 1).to_fields()
        self.redis.xadd(schema.HEARTBEAT_STREAM, fields, id=f"{server_ms - 10_000}-0")
        cfg = Config.from_env({"EEXIT_STARTUP_GRACE_S": "0"})
        mono = [500.0]
        watchdog = Watchdog(cfg, self.redis, signing.KeyRing(), log=Logger("watchdog", stream=open(os.devnull, "w")),
                            monotonic=lambda: mono[0])
        self.addCleanup(watchdog.log.stream.close)
        watchdog.resync()
        self.assertAlmostEqual(watchdog.state.last_beat_at, 490.0, delta=1.0)
        del publisher


def publish_beat(publisher, ts_ms, positions):
    message = schema.Heartbeat(service_id="exit_brain", status="OK", active_positions=positions,
                               last_decision_ts=ts_ms - 100, latency_ms=1.0, ts=ts_ms)
    bus.publish(publisher.client, publisher.stream, message, maxlen=schema.HEARTBEAT_MAXLEN)


if __name__ == "__main__":
    unittest.main()

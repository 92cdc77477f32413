"""The watchdog's incident rule and its visibility, with real processes: a real redis-server,
the real EEW talking ccxt to the paper exchange, the real watchdog, `eexit status` as a
subprocess. The brain is played by tests.test_watchdog.Beater. No timed assertions: only what
happened, in which order.

- A watchdog holding the wrong key is visible at start (CRITICAL, DEGRADED heartbeat,
  `eexit status` exit 2), and its REJECTED panic is republished and logged CRITICAL, never
  counted as done.
- A forged unsigned copy of the watchdog's event id published first is REJECTED and does not
  silence the watchdog: its own signed panic is executed (FLAT).
- Redis stalled by a long-running script while the brain dies: the panic follows Redis
  answering again, not a fresh start-up grace later.
"""

import os
import subprocess
import sys
import tempfile
import threading
import unittest

import redis

from eexit import schema
from eexit.paper import PaperExchange
from eexit.schema import INCIDENT_KEY
from tests.harness import ROOT, RedisTestCase, python_env, start_module, stop_process, tail_logs, wait_for
from tests.test_watchdog import SCALED, Beater, panics

EEW_KEYS = "wd1 watchdog " + "ab" * 32 + ",ops1 ops " + "cd" * 32
WATCHDOG_KEY = "wd1 watchdog " + "ab" * 32
WRONG_WATCHDOG_KEY = "wd1 watchdog " + "ef" * 32
EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret", "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}


def reports(client, event_id=None):
    found = []
    for _id, raw in client.xrange(schema.COMPLETED_STREAM):
        report, _ = schema.CompletionReport.from_fields(raw)
        if event_id is None or report.event_id == event_id:
            found.append(report)
    return found


def latest_fields(client, stream):
    entries = client.xrevrange(stream, count=1)
    return {} if not entries else {k.decode(): v.decode() for k, v in entries[0][1].items()}


class IncidentProcessTest(RedisTestCase):
    def setUp(self):
        super().setUp()
        self.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5")
        self.paper_url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.dir = tempfile.mkdtemp(prefix="eexit-incident-")
        self.processes, self.beaters = [], []
        self.addCleanup(lambda: [stop_process(p) for p in self.processes])
        self.addCleanup(lambda: [b.stop() for b in self.beaters])

    def start(self, module, **env):
        merged = {"REDIS_URL": self.redis_server.url, "EEXIT_EXCHANGE_URL": self.paper_url,
                  "EEXIT_JOURNAL": os.path.join(self.dir, "journal.jsonl"), "EEXIT_CONSUMER": "eew-incident",
                  # The EEW verifies every issuer; the watchdog holds its own key only.
                  "EEXIT_PANIC_HMAC_KEYS": WATCHDOG_KEY if module == "eexit.watchdog" else EEW_KEYS,
                  **EXCHANGE, **SCALED, **env}
        process = start_module(module, python_env(**merged), os.path.join(self.dir, module + ".log"))
        self.processes.append(process)
        return process

    def beater(self, **fields):
        beater = Beater(self.redis_server.client(), **fields).start()
        self.beaters.append(beater)
        return beater

    def watchdog_log(self):
        with open(os.path.join(self.dir, "eexit.watchdog.log"), encoding="utf-8") as f:
            return f.read()

    def logs(self):
        return tail_logs(self.dir)

    def status(self):
        return subprocess.run([sys.executable, "-m", "eexit.cli", "status"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env=python_env(REDIS_URL=self.redis_server.url))

    def start_eew(self):
        self.start("eexit.eew")
        wait_for(lambda: latest_fields(self.redis, schema.EEW_HEARTBEAT_STREAM).get("signatures") == "required",
                 30, message=f"EEW heartbeat\n{self.logs()}")

    def test_wrong_key_is_visible_at_start_and_its_rejected_panic_is_republished(self):
        self.start_eew()
        beater = self.beater(active_positions=2)
        self.start("eexit.watchdog", EEXIT_PANIC_HMAC_KEYS=WRONG_WATCHDOG_KEY, EEXIT_REPUBLISH_S="0.3")

        # Before any incident: CRITICAL, DEGRADED heartbeat with the reason, status exit 2.
        wait_for(lambda: "event=eew_would_reject_our_panics" in self.watchdog_log(), 20,
                 message=f"start-up key check\n{self.logs()}")
        self.assertIn("level=CRITICAL event=eew_would_reject_our_panics consumer=eew-incident why=key_mismatch",
                      self.watchdog_log())
        beat = wait_for(lambda: (f := latest_fields(self.redis, schema.WATCHDOG_HEARTBEAT_STREAM))
                        .get("reason") == "eew_would_reject" and f, 20, message="DEGRADED watchdog heartbeat")
        self.assertEqual(beat["status"], "DEGRADED")
        self.assertIn("key_mismatch", beat["detail"])
        self.assertEqual(panics(self.redis), [])
        result = self.status()
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("watchdog: DEGRADED: eew would reject (eew-incident: key_mismatch", result.stdout)

        # The incident: REJECTED (sig_mismatch), republished, CRITICAL each time, never done.
        beater.stop()
        wait_for(lambda: len([r for r in reports(self.redis) if r.status == "REJECTED"]) >= 3, 30,
                 message=f"three REJECTED reports\n{self.logs()}")
        events = panics(self.redis)
        self.assertEqual(len({e.event_id for e in events}), 1, events)     # republished, same id
        self.assertGreaterEqual(len(events), 3)
        rejected = reports(self.redis, events[0].event_id)
        self.assertEqual({r.status for r in rejected}, {"REJECTED"})
        self.assertEqual({r.detail for r in rejected}, {"bad_signature:sig_mismatch"})
        log = self.watchdog_log()
        self.assertIn(f"level=CRITICAL event=incident_panic_rejected event_id={events[0].event_id} status=REJECTED "
                      f"why=bad_signature:sig_mismatch", log)
        self.assertIn("ours=yes", log)
        self.assertNotIn("incident_report_seen", log)
        self.assertEqual(self.redis.hget(INCIDENT_KEY, "completed_status"), b"")
        beat = wait_for(lambda: (f := latest_fields(self.redis, schema.WATCHDOG_HEARTBEAT_STREAM))
                        .get("reason") == "panic_rejected" and f, 20, message="panic_rejected heartbeat")
        self.assertIn("REJECTED", beat["detail"])
        self.assertEqual(len(self.paper.positions()), 2)                  # nothing was executed
        result = self.status()
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("watchdog: DEGRADED: panic rejected", result.stdout)

    def test_forged_copy_of_the_event_id_published_first_does_not_silence_the_watchdog(self):
        event_id = "11111111-2222-4333-8444-555555555555"
        self.redis.hset(INCIDENT_KEY, mapping={"event_id": event_id, "reason": "POSITIONS_UNGUARDED",
                                               "opened_at_ms": "1"})
        forged = schema.PanicEvent(event_id, "POSITIONS_UNGUARDED", "watchdog", 1_700_000_000_000)
        forged_entry = self.redis.xadd(schema.PANIC_STREAM, forged.to_fields()).decode()
        self.beater(active_positions=0)
        self.start("eexit.watchdog", EEXIT_REPUBLISH_S="0.5")
        wait_for(lambda: "event=incident_recovered" in self.watchdog_log(), 20, message=f"recovered\n{self.logs()}")
        self.start_eew()

        flat = wait_for(lambda: [r for r in reports(self.redis, event_id) if r.status == "FLAT"], 30,
                        message=f"FLAT for the watchdog's own entry\n{self.logs()}")
        # The forgery is REJECTED (the EEW may reach it before or after the signed copy: it
        # screens the newest batch of a backlog first), and it never stands for the incident.
        wait_for(lambda: [r for r in reports(self.redis, event_id)
                          if r.status == "REJECTED" and r.extra.get("entry_id") == forged_entry], 30,
                 message=f"REJECTED for the forged entry\n{self.logs()}")
        statuses = [r.status for r in reports(self.redis, event_id)]
        self.assertEqual(statuses.count("FLAT"), 1)
        self.assertNotEqual(flat[0].extra["entry_id"], forged_entry)      # executed: the signed copy
        self.assertEqual(self.paper.positions(), {})
        wait_for(lambda: self.redis.hget(INCIDENT_KEY, "completed_status") in (b"FLAT", None), 20,
                 message="incident completed")


class RedisStallTest(RedisTestCase):
    """A long-running script stalls Redis (clients wait; no BUSY reply before 60 s)."""

    redis_args = ("--busy-reply-threshold", "60000")
    STALL_S = 7     # longer than the client read timeout (5 s): the watchdog must resync

    def test_brain_killed_during_a_stall_is_detected_after_redis_answers_not_after_a_new_grace(self):
        directory = tempfile.mkdtemp(prefix="eexit-stall-")
        log_path = os.path.join(directory, "watchdog.log")
        # A grace far longer than the test would wait: a resync that re-applied it could not
        # publish the panic in time.
        env = {**SCALED, "REDIS_URL": self.redis_server.url, "EEXIT_UNGUARDED_S": "2.0",
               "EEXIT_HEARTBEAT_LOST_S": "3.0", "EEXIT_STAGNANT_S": "60", "EEXIT_STARTUP_GRACE_S": "120"}
        watchdog = start_module("eexit.watchdog", python_env(**env), log_path)
        self.addCleanup(stop_process, watchdog)
        beater = Beater(self.redis_server.client(), active_positions=2).start()
        self.addCleanup(beater.stop)
        wait_for(lambda: latest_fields(self.redis, schema.WATCHDOG_HEARTBEAT_STREAM).get("brain_status") == "OK"
                 and self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 5, 20, message="watchdog watching")

        beater.stop()                                   # the brain dies ...
        stalled = {}

        def stall():
            client = redis.Redis.from_url(self.redis_server.url, socket_timeout=60)
            script = ("local stop = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[1]) "
                      "while tonumber(redis.call('TIME')[1]) < stop do end "
                      "local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000)")
            stalled["ended_ms"] = client.eval(script, 0, self.STALL_S)
        thread = threading.Thread(target=stall, daemon=True)
        thread.start()                                  # ... and Redis stalls at once
        thread.join(timeout=60)
        self.assertIn("ended_ms", stalled)

        [panic_id, _fields] = wait_for(lambda: self.redis.xrange(schema.PANIC_STREAM), 30,
                                       message=f"panic after the stall\n{open(log_path).read()}")[0]
        with open(log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertIn("event=resynced", log)
        self.assertIn("startup_grace=not_reapplied", log)
        self.assertGreaterEqual(int(panic_id.decode().split("-")[0]), stalled["ended_ms"])
        self.assertIn("reason=POSITIONS_UNGUARDED", log)


if __name__ == "__main__":
    unittest.main()

"""The operator's side of issues 24 and 26, end to end: real redis-server, the real EEW and
Exit Brain as processes, real ccxt against the paper exchange, `eexit` as a subprocess.

- `eexit status` exits 2 naming the Exit Brain's `degraded_reason` (never HEALTHY beside a
  DEGRADED brain).
- `eexit resume` that stops waiting says the outcome is unknown (exit 3), and its request is
  never served afterwards: it expired on Redis's clock, checked by the EEW before answering
  and again right before it writes.
- A resume or init while an authorised panic waits (pending in the group on an EEW that died
  before its halt, or in flight in eexit:eew:inflight) is refused, without an account read.
- A request refused by a cheap check (not halted, another event holds the halt) costs no
  account read.

"A dead EEW" is played by the test: the live EEW is stopped (SIGSTOP) while the test reads
the panic into the group under another consumer name, as an EEW that died between XREADGROUP
and its halt leaves it; EEXIT_CLAIM_IDLE_MS is long, so the live EEW does not reclaim it during
the test (the reclaim is the EEW's business and tested there)."""

import json
import os
import signal
import tempfile
import time
import unittest

from eexit import bus, health, ops, resume, schema, signing
from eexit.paper import PaperExchange
from tests.acl_harness import AclRedisTestCase
from tests.harness import RedisTestCase, python_env, start_module, stop_process, wait_for
from tests.test_brain import BRAIN_ENV
from tests.test_cli import ResumeCase, beat, run_cli

DEAD_CONSUMER = "eew-dead"


class StatusBesideADegradedBrain(RedisTestCase):
    def setUp(self):
        super().setUp()
        self.paper = PaperExchange(seed="BTCUSDT:0.01")
        self.addCleanup(self.paper.stop)
        url = self.paper.start()
        self.logdir = self.enterContext(tempfile.TemporaryDirectory(prefix="eexit-status-"))
        brain = start_module("eexit.brain", python_env(REDIS_URL=self.redis_server.url, EEXIT_EXCHANGE_URL=url,
                                                       **BRAIN_ENV), os.path.join(self.logdir, "brain.log"))
        self.addCleanup(stop_process, brain)

    def latest_brain_beat(self):
        last = ops.latest(self.redis, schema.HEARTBEAT_STREAM)
        return None if last is None else last[1]

    def test_degraded_brain_is_exit_2_naming_its_degraded_reason(self):
        wait_for(lambda: (self.latest_brain_beat() or {}).get("status") == "OK", 30, message="brain OK")
        self.paper.add_fault(kind="error", status=503, path="positionRisk", duration_s=120)
        beat_fields = wait_for(lambda: (b := self.latest_brain_beat()) and b.get("status") == "DEGRADED" and b, 30,
                               message="brain DEGRADED")
        reason = beat_fields["degraded_reason"]
        self.assertTrue(reason)
        self.assertNotIn("reason", beat_fields)        # the brain says it as degraded_reason only
        for stream in (schema.EEW_HEARTBEAT_STREAM, schema.WATCHDOG_HEARTBEAT_STREAM):
            beat(self.redis, stream)
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        result = run_cli(python_env(REDIS_URL=self.redis_server.url), "status")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn(f"exit_brain: DEGRADED: {health.describe_reason(reason)}", result.stdout)
        self.assertTrue(result.stdout.splitlines()[-1].startswith("UNHEALTHY: exit_brain: DEGRADED"), result.stdout)
        data = json.loads(run_cli(python_env(REDIS_URL=self.redis_server.url), "status", "--json").stdout)
        self.assertEqual((data["exit_code"], data["daemons"]["exit_brain"]["reason"]), (2, reason))


class OperatorSideTest(ResumeCase):
    eew_env = {"EEXIT_RESUME_COOLDOWN_S": "0", "EEXIT_CLAIM_IDLE_MS": "600000", "EEXIT_HALT_GUARD_S": "0"}

    def eew(self):
        return self.processes["eew-resume"]

    def stopped_eew(self):
        """SIGSTOP the class EEW; continued at cleanup (and by the caller when it wants). Returns
        once Redis holds no blocked read of it: a read blocked when the signal landed would
        still be answered by Redis and take the next entry."""
        os.kill(self.eew().pid, signal.SIGSTOP)
        self.addCleanup(os.kill, self.eew().pid, signal.SIGCONT)
        wait_for(lambda: not any("b" in client.get("flags", "") for client in self.redis.client_list()), 10,
                 message="no blocked read left")

    def panic_read_by_a_dead_eew(self, event_id):
        """An authorised panic delivered to a consumer that then died before its halt."""
        self.stopped_eew()
        entry_id = self.publish(event_id, issued_by="ops", reason="MANUAL")
        delivered = self.redis.xreadgroup(schema.EEW_GROUP, DEAD_CONSUMER, {schema.PANIC_STREAM: ">"}, count=10)
        self.assertEqual([bus.as_text(e) for e, _ in delivered[0][1]], [entry_id])
        os.kill(self.eew().pid, signal.SIGCONT)
        return entry_id

    def account_reads(self):
        return len(self.paper.requests(path="positionRisk"))

    def wait_eew_pass(self):
        """Two EEW heartbeats: at least one whole loop pass of the (continued) EEW."""
        first = ops.latest(self.redis, schema.EEW_HEARTBEAT_STREAM)[0]
        wait_for(lambda: len(self.redis.xrange(schema.EEW_HEARTBEAT_STREAM, "(" + first, "+")) >= 2, 20,
                 message="EEW loop passes")

    # -- finding 12: no resume or init while an authorised panic waits

    def test_resume_while_a_panic_is_pending_on_a_dead_eew_is_refused_without_an_account_read(self):
        self.halted_by("ev-1")
        self.panic_read_by_a_dead_eew("ev-2")
        self.wait_eew_pass()
        reads = self.account_reads()
        result = self.resume("ev-1")
        self.assert_refused(result, "an authorised panic is not executed yet (ev-2 (pending))")
        self.assertEqual(self.state().event_id, "ev-1")
        self.assertEqual(self.account_reads(), reads, "a waiting panic refuses before any account read")

    def test_resume_while_a_panic_is_in_flight_is_refused(self):
        self.halted_by("ev-1")
        # What an EEW that claimed ev-3 and died before its halt leaves: a ledger record that
        # is not final, and the event id in the in-flight set (eexit/eew.py Ledger.claim).
        record = {"entry": None, "consumer": DEAD_CONSUMER, "stage": "claimed", "attempt": 0,
                  "ts_started": bus.server_time_ms(self.redis), "reason": "MANUAL", "issued_by": "ops"}
        self.redis.hset(schema.PROCESSED_KEY, "ev-3", json.dumps(record))
        self.redis.sadd(schema.INFLIGHT_KEY, "ev-3")
        self.assert_refused(self.resume("ev-1"), "ev-3 (in flight)")
        # Once the record is final the same resume goes through.
        self.redis.hset(schema.PROCESSED_KEY, "ev-3", json.dumps(dict(record, stage="done", status="FLAT")))
        result = self.resume("ev-1")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIs(self.state().halted, False)

    def test_init_while_a_panic_is_pending_is_refused_and_writes_nothing(self):
        self.panic_read_by_a_dead_eew("ev-9")
        self.assertFalse(self.redis.exists(schema.TRADING_STATE_KEY))
        result = run_cli(python_env(REDIS_URL=self.redis_server.url, EEXIT_RESUME_TIMEOUT_S="30"),
                         "init", "--operator", "alice")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("REFUSED: an authorised panic is not executed yet (ev-9 (pending))", result.stdout)
        self.assertFalse(self.redis.exists(schema.TRADING_STATE_KEY))
        self.assertEqual(self.redis.xlen(ops.OPS_AUDIT_STREAM), 0)

    # -- finding 11: a CLI that gave up never claims an outcome, and its request is dead

    def test_resume_that_times_out_says_outcome_unknown_and_is_never_served_afterwards(self):
        self.halted_by("ev-1")
        self.stopped_eew()                   # the EEW will read the request only after the CLI gave up
        result = self.resume("ev-1", EEXIT_RESUME_TIMEOUT_S="1")
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertIn("outcome unknown, check `eexit status`", result.stderr)
        self.assertNotIn("stays halted", result.stdout + result.stderr)
        [(_, request)] = self.redis.xrange(resume.REQUEST_STREAM)
        request_id = request[b"request_id"].decode()
        os.kill(self.eew().pid, signal.SIGCONT)
        wait_for(lambda: "resume_request_ignored" in self.log("eew-resume")
                 and "why=expired" in self.log("eew-resume"), 20, message="the EEW ignores the expired request")
        self.assert_still_halted()
        self.assertEqual([f for _, f in self.redis.xrange(resume.VERDICT_STREAM)
                          if f[b"request_id"].decode() == request_id], [])

    def test_request_that_expires_during_the_account_read_clears_nothing(self):
        self.halted_by("ev-1")
        self.paper.add_fault(kind="latency", ms=2500, path="positionRisk", duration_s=60)
        now_ms = bus.server_time_ms(self.redis)
        fields = ops.build_request("alice", "ev-1", False, signing.KeyRing(), now_ms, valid_s=1.0)
        self.redis.xadd(resume.REQUEST_STREAM, fields)
        verdict = wait_for(lambda: [f for _, f in self.redis.xrange(resume.VERDICT_STREAM)
                                    if f[b"request_id"].decode() == fields["request_id"]], 30, message="verdict")
        refusals = json.loads(verdict[0][b"refusals"])
        self.assertEqual(verdict[0][b"status"], b"RESUME_REFUSED")
        self.assertIn("the request expired", refusals[0])
        self.assert_still_halted()

    # -- issue 24 finding 10: cheap refusals before any account read

    def test_refusals_that_need_no_exchange_cost_no_account_read(self):
        self.halted_by("ev-1")
        self.halted_by("ev-2")
        reads = self.account_reads()
        self.assert_refused(self.resume("ev-1"), "halted by event ev-2")
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        result = self.resume("ev-2")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("not halted", result.stdout)
        self.assertEqual(self.account_reads(), reads)


class WaitingPanicsTest(RedisTestCase):
    """panics_waiting() against a real Redis with no EEW: what counts as waiting."""

    KEYS = signing.parse_keys("ops-1 ops " + "11" * 32, "test")

    def panic(self, event_id, signed=True):
        fields = {"event_id": event_id, "reason": "MANUAL", "severity": "CRITICAL", "issued_by": "ops",
                  "ts": str(int(time.time() * 1000))}
        return bus.as_text(self.redis.xadd(schema.PANIC_STREAM,
                                           signing.sign_fields(fields, "ops-1", self.KEYS) if signed else fields))

    def test_no_stream_nothing_waits(self):
        self.assertEqual(resume.panics_waiting(self.redis, self.KEYS), [])

    def test_without_a_group_every_authorised_entry_is_unread(self):
        self.panic("a")
        self.panic("forged", signed=False)
        self.assertEqual(resume.panics_waiting(self.redis, self.KEYS), ["a (unread)"])

    def test_pending_unread_in_flight_and_final(self):
        self.redis.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0", mkstream=True)
        self.panic("done-one")
        self.panic("pending-one")
        self.redis.xreadgroup(schema.EEW_GROUP, DEAD_CONSUMER, {schema.PANIC_STREAM: ">"}, count=2)
        self.redis.xack(schema.PANIC_STREAM, schema.EEW_GROUP, self.redis.xrange(schema.PANIC_STREAM)[0][0])
        self.redis.hset(schema.PROCESSED_KEY, "done-one", json.dumps({"stage": "done"}))
        self.panic("unread-one")
        self.redis.sadd(schema.INFLIGHT_KEY, "flying", "done-one")
        self.redis.hset(schema.PROCESSED_KEY, "flying", json.dumps({"stage": "claimed"}))
        self.assertEqual(sorted(resume.panics_waiting(self.redis, self.KEYS)),
                         ["flying (in flight)", "pending-one (pending)", "unread-one (unread)"])
        # A duplicate of a final event (another entry, same event id) halts nothing.
        self.redis.hset(schema.PROCESSED_KEY, "unread-one", json.dumps({"stage": "done"}))
        self.assertNotIn("unread-one (unread)", resume.panics_waiting(self.redis, self.KEYS))

    def test_a_backlog_too_long_to_check_refuses(self):
        for number in range(4):
            self.panic(f"p{number}", signed=False)
        self.assertEqual(resume.panics_waiting(self.redis, self.KEYS, limit=3),
                         ["more than 3 panic entries pending or unread, not all checked"])


class ResumeUnderTheShippedAcl(AclRedisTestCase):
    """The request (eexit-ops) and the EEW's whole serve path, waiting-panic checks included
    (eexit-eew), under systemd/redis-acl.conf: no command the new checks use is refused."""

    def test_waiting_panic_refuses_then_the_resume_clears_under_the_acl(self):
        admin, ops_client, eew = self.redis, self.client("eexit-ops"), self.client("eexit-eew")
        admin.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0", mkstream=True)
        report_id = bus.as_text(admin.xadd(schema.COMPLETED_STREAM, {"event_id": "ev-1", "status": "FLAT"}))
        admin.hset(schema.PROCESSED_KEY, "ev-1", json.dumps({"stage": "done", "status": "FLAT", "report": report_id}))
        admin.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "ev-1", "reason": "MANUAL"})
        entry_id = admin.xadd(schema.PANIC_STREAM, {"event_id": "ev-2", "reason": "MANUAL", "severity": "CRITICAL",
                                                    "issued_by": "ops", "ts": "1"})
        admin.xreadgroup(schema.EEW_GROUP, DEAD_CONSUMER, {schema.PANIC_STREAM: ">"})
        reads = []

        def serve():
            asked = ops.ask_resume(ops_client, lambda now_ms, valid_s: ops.build_request(
                "alice", "ev-1", False, signing.KeyRing(), now_ms, valid_s=valid_s), 30)
            [(_, fields)] = eew.xrange(resume.REQUEST_STREAM, "-", "+")[-1:]
            verdict, why = resume.serve_request(eew, fields, signing.KeyRing(), 0, lambda: reads.append(1) or ([], [], None),
                                                None, "eew-1")
            self.assertEqual((verdict["request_id"], why), (asked.request_id, None))
            return verdict
        refused = serve()
        self.assertEqual(refused["status"], resume.REFUSED)
        self.assertIn("ev-2 (pending)", refused["refusals"])
        self.assertEqual(reads, [])
        admin.xack(schema.PANIC_STREAM, schema.EEW_GROUP, entry_id)
        admin.hset(schema.PROCESSED_KEY, "ev-2", json.dumps({"stage": "done", "status": "FLAT"}))
        resumed = serve()
        self.assertEqual((resumed["status"], reads), (resume.RESUMED, [1]))
        self.assertEqual(admin.hget(schema.TRADING_STATE_KEY, "halted"), b"false")


if __name__ == "__main__":
    unittest.main()

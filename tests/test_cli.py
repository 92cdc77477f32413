"""`eexit status | panic | resume | audit verify` as real subprocesses against a real
redis-server. For resume, the real EEW answers (its checks read the paper exchange through
real ccxt); for panic, the EEW's part (the completion report) is played by the test."""

import json
import subprocess
import sys
import threading
import time
import unittest

from eexit import health, ops, resume, schema, signing
from eexit.localredis import free_port
from tests.harness import ROOT, RedisTestCase, python_env, wait_for
from tests.test_eew import EEWCase

OPS_KEY = "ops-1 ops " + "11" * 32
WATCHDOG_KEY = "wd-1 watchdog " + "22" * 32


def run_cli(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "eexit.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class FakeEEW(threading.Thread):
    """Answers each panic with a report of the given status; first publishes a report for some
    OTHER event, which the CLI must ignore."""

    def __init__(self, client, status="FLAT"):
        super().__init__(daemon=True)
        self.client = client
        self.status = status
        self.stop = threading.Event()
        self.seen = []

    def run(self):
        last = "0-0"
        while not self.stop.is_set():
            reply = self.client.xread({schema.PANIC_STREAM: last}, block=100, count=10)
            for _stream, items in reply or []:
                for entry_id, fields in items:
                    last = entry_id
                    fields = ops.decoded(fields)
                    self.seen.append(fields)
                    self.client.xadd(schema.COMPLETED_STREAM, report(
                        "someone-else", "RESIDUAL").to_fields())
                    self.client.xadd(schema.COMPLETED_STREAM, report(fields["event_id"], self.status).to_fields())


def report(event_id, status):
    now = int(time.time() * 1000)
    return schema.CompletionReport(event_id=event_id, status=status, issued_by="ops", reason="TEST",
                                   positions_total=2, positions_closed=2 if status == "FLAT" else 1,
                                   positions_failed=0 if status == "FLAT" else 1,
                                   ts_started=now - 5, ts_completed=now, execution_time_ms=5)


def beat(client, stream, status="OK", service_id=None):
    """A heartbeat now; on the brain's stream it is the brain's own (service_id exit_brain)
    unless service_id names another producer."""
    service_id = service_id or ("exit_brain" if stream == schema.HEARTBEAT_STREAM else "x")
    client.xadd(stream, schema.Heartbeat(service_id, status, 0, int(time.time() * 1000), 1.0,
                                         int(time.time() * 1000)).to_fields())


class StatusTest(RedisTestCase):
    def env(self, **more):
        return python_env(REDIS_URL=self.redis_server.url, **more)

    def test_a_bot_beating_on_the_brains_stream_does_not_make_a_degraded_brain_healthy(self):
        # Another producer's OK beat is the newest entry; status judges the brain's own beat,
        # as the watchdog does (issue 26: only the brain's service_id counts).
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        for stream in (schema.EEW_HEARTBEAT_STREAM, schema.WATCHDOG_HEARTBEAT_STREAM):
            beat(self.redis, stream)
        beat(self.redis, schema.HEARTBEAT_STREAM, status="DEGRADED")
        beat(self.redis, schema.HEARTBEAT_STREAM, service_id="my_bot")
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("exit_brain: DEGRADED", result.stdout)
        self.redis.delete(schema.HEARTBEAT_STREAM)
        beat(self.redis, schema.HEARTBEAT_STREAM, service_id="my_bot")
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("exit_brain: SILENT", result.stdout)

    def test_redis_unreachable_is_2(self):
        result = run_cli(python_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), "status")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("UNREACHABLE", result.stdout)

    def test_silent_daemon_is_2_halted_is_1_healthy_is_0(self):
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("SILENT", result.stdout)
        for _name, stream in health.DAEMON_STREAMS:
            beat(self.redis, stream)
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "e1",
                                                           "reason": "X", "halted_by": "watchdog"})
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("HALTED", result.stdout)
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        for _name, stream in health.DAEMON_STREAMS:    # fresh again: each CLI start takes seconds under load
            beat(self.redis, stream)
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("HEALTHY", result.stdout)

    def test_json_lists_panics_reports_and_pending(self):
        for _name, stream in health.DAEMON_STREAMS:
            beat(self.redis, stream)
        self.redis.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0", mkstream=True)
        event = schema.PanicEvent("ev-1", "MANUAL", "ops", int(time.time() * 1000))
        self.redis.xadd(schema.PANIC_STREAM, event.to_fields())
        self.redis.xadd(schema.PANIC_STREAM, schema.PanicEvent("ev-2", "MANUAL", "ops", 1).to_fields())
        self.redis.xreadgroup(schema.EEW_GROUP, "eew@test", {schema.PANIC_STREAM: ">"}, count=1)
        self.redis.xadd(schema.COMPLETED_STREAM, report("ev-1", "FLAT").to_fields())
        result = run_cli(self.env(), "status", "--json")
        data = json.loads(result.stdout)
        self.assertEqual(result.returncode, 1)        # no halt hash: treated as halted
        self.assertEqual([p["event_id"] for p in data["panics"]], ["ev-2", "ev-1"])
        self.assertEqual(data["panics"][1]["reports"][0]["status"], "FLAT")
        self.assertEqual(data["panics"][0]["reports"], [])
        group = data["pending"][schema.PANIC_STREAM][schema.EEW_GROUP]
        self.assertEqual(group["pending"], 1)
        self.assertEqual(group["consumers"], {"eew@test": 1})

    def test_stale_heartbeat_is_silent(self):
        for _name, stream in health.DAEMON_STREAMS:
            self.redis.xadd(stream, {"service_id": "x", "status": "OK"}, id="1000-0")
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        result = run_cli(self.env(), "status", "--json")
        self.assertEqual(result.returncode, 2)
        self.assertGreater(json.loads(result.stdout)["daemons"]["eew"]["age_ms"], 10_000)


class PanicTest(RedisTestCase):
    def env(self, **more):
        return python_env(REDIS_URL=self.redis_server.url, **more)

    def start_eew(self, status="FLAT"):
        eew = FakeEEW(self.redis_server.client(), status)
        eew.start()
        self.addCleanup(eew.join, 2)
        self.addCleanup(eew.stop.set)
        return eew

    def test_no_eew_times_out_non_zero(self):
        result = run_cli(self.env(), "panic", "--reason", "DRILL", "--timeout", "0.5")
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertIn("TIMEOUT", result.stdout)
        fields = ops.decoded(self.redis.xrange(schema.PANIC_STREAM)[0][1])
        event, problems = schema.PanicEvent.from_fields(fields)
        self.assertEqual(problems, [])
        self.assertEqual((event.issued_by, event.reason), ("ops", "DRILL"))

    def test_flat_report_for_its_own_event_is_0(self):
        eew = self.start_eew("FLAT")
        result = run_cli(self.env(), "panic", "--reason", "MANUAL", "--json", "--timeout", "10")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        data = json.loads(result.stdout)
        self.assertEqual(data["report"]["status"], "FLAT")
        self.assertEqual(data["report"]["event_id"], eew.seen[0]["event_id"])

    def test_residual_report_is_1(self):
        self.start_eew("RESIDUAL")
        result = run_cli(self.env(), "panic", "--reason", "MANUAL", "--timeout", "10")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("NOT FLAT (RESIDUAL)", result.stdout)

    def test_signs_with_the_issuers_key(self):
        eew = self.start_eew("FLAT")
        result = run_cli(self.env(EEXIT_PANIC_HMAC_KEYS=f"{OPS_KEY},{WATCHDOG_KEY}"), "panic",
                         "--reason", "MANUAL", "--timeout", "10")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        ring = signing.parse_keys(f"{OPS_KEY},{WATCHDOG_KEY}", "test")
        self.assertEqual(signing.verify_fields(eew.seen[0], ring), (True, "signature_ok"))
        self.assertEqual(eew.seen[0]["kid"], "ops-1")

    def test_keys_without_one_for_the_issuer_refuse(self):
        result = run_cli(self.env(EEXIT_PANIC_HMAC_KEYS=WATCHDOG_KEY), "panic", "--reason", "X")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 0)


class ResumeCase(EEWCase):
    """`eexit resume` as a subprocess, answered by the real EEW, which makes every check."""

    # Guard off: while halted it closes a test's deliberate residual within EEXIT_HALT_GUARD_S,
    # and a resume that takes longer than that under load then finds the account flat.
    eew_env = {"EEXIT_RESUME_COOLDOWN_S": "0", "EEXIT_HALT_GUARD_S": "0"}
    cli_keys = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.start_eew("eew-resume")

    def resume(self, event_id, *more, **env):
        settings = dict(REDIS_URL=self.redis_server.url, EEXIT_RESUME_TIMEOUT_S="30")
        if self.cli_keys:
            settings["EEXIT_PANIC_HMAC_KEYS"] = self.cli_keys
        settings.update(env)
        return run_cli(python_env(**settings), "resume", "--operator", "alice", "--ack", event_id, *more)

    def halted_by(self, event_id, **fields):
        """A panic executed by the EEW: halted, with its final report."""
        self.publish(event_id, issued_by="ops", reason="MANUAL", **fields)
        [report] = self.wait_reports(event_id)
        self.assertIn(report.status, schema.FINAL_STATUSES)
        self.assert_still_halted()

    def state(self):
        return schema.TradingState.from_fields(ops.decoded(self.redis.hgetall(schema.TRADING_STATE_KEY)))[0]

    def assert_still_halted(self):
        self.assertIs(self.state().halted, True)
        self.assertEqual(self.redis.xlen(ops.OPS_AUDIT_STREAM), 0)

    def assert_refused(self, result, text):
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(text, result.stdout)
        self.assert_still_halted()


class ResumeTest(ResumeCase):
    def test_unknown_event_refused(self):
        self.halted_by("ev-1")
        self.assert_refused(self.resume("no-such-event"), "unknown event id")

    def test_residual_positions_refused(self):
        self.halted_by("ev-1")
        self.paper.set_position("ETHUSDT", "-0.5")          # the bot ignored the halt
        result = self.resume("ev-1")
        self.assert_refused(result, "not flat")
        self.assertIn("ETH/USDT:USDT short 0.5", result.stdout)

    def test_exchange_unreadable_refused(self):
        self.halted_by("ev-1")
        self.paper.add_fault(kind="error", status=503, path="positionRisk", duration_s=60)
        self.assert_refused(self.resume("ev-1"), "cannot verify the account")

    def test_other_event_halted_refused(self):
        self.halted_by("ev-1")
        self.halted_by("ev-2")
        self.assert_refused(self.resume("ev-1"), "halted by event ev-2")

    def test_success_clears_and_audits_then_is_idempotent(self):
        self.halted_by("ev-1")
        result = self.resume("ev-1", "--json")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertTrue(json.loads(result.stdout)["resumed"])
        state, problems = schema.TradingState.from_fields(ops.decoded(self.redis.hgetall(schema.TRADING_STATE_KEY)))
        self.assertEqual(problems, [])
        self.assertIs(state.halted, False)
        self.assertEqual(state.cleared_by, "alice")
        self.assertIsNotNone(state.cleared_at)
        entries = self.redis.xrange(ops.OPS_AUDIT_STREAM)
        self.assertEqual(len(entries), 1)
        audit = ops.decoded(entries[0][1])
        self.assertEqual((audit["action"], audit["operator"], audit["event_id"]), ("resume", "alice", "ev-1"))
        self.assertEqual(audit["accept_residual"], "false")
        again = self.resume("ev-1")
        self.assertEqual(again.returncode, 0)
        self.assertIn("already resumed", again.stdout)
        self.assertEqual(self.redis.xlen(ops.OPS_AUDIT_STREAM), 1)

    def test_accept_residual_resumes_and_records_the_positions(self):
        self.halted_by("ev-1")
        self.paper.set_position("BTCUSDT", "0.01")
        result = self.resume("ev-1", "--accept-residual")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        audit = ops.decoded(self.redis.xrange(ops.OPS_AUDIT_STREAM)[0][1])
        self.assertEqual(audit["accept_residual"], "true")
        self.assertEqual(json.loads(audit["residual_positions"])[0]["symbol"], "BTC/USDT:USDT")

    def test_not_halted_refused(self):
        self.halted_by("ev-1")
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        result = self.resume("ev-1")
        self.assertEqual(result.returncode, 1)
        self.assertIn("not halted", result.stdout)

    def test_no_eew_answer_is_3_and_changes_nothing(self):
        self.halted_by("ev-1")
        result = self.resume("ev-1", REDIS_URL=self.redis_server.url.replace("/0", "/1"),
                             EEXIT_RESUME_TIMEOUT_S="1")
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertIn("no verdict from the EEW", result.stderr)
        self.assertIn("outcome unknown, check `eexit status`", result.stderr)
        self.assert_still_halted()


class ResumeSignedTest(ResumeCase):
    """Keys configured: only a request signed with the ops key gets a verdict; the EEW's own
    cooldown applies whatever the CLI's environment says."""

    eew_env = {"EEXIT_RESUME_COOLDOWN_S": "300", "EEXIT_PANIC_HMAC_KEYS": OPS_KEY}
    cli_keys = OPS_KEY

    def halted_by(self, event_id, **fields):
        signed = signing.sign_fields({"event_id": event_id, "reason": "MANUAL", "severity": "CRITICAL",
                                      "issued_by": "ops", "ts": str(int(time.time() * 1000))},
                                     "ops-1", signing.parse_keys(OPS_KEY, "test"))
        self.redis.xadd(schema.PANIC_STREAM, signed)
        [report] = self.wait_reports(event_id)
        self.assertEqual(report.status, "FLAT")

    def test_cooldown_refused(self):
        self.halted_by("ev-1")
        self.assert_refused(self.resume("ev-1", EEXIT_RESUME_COOLDOWN_S="0"), "cooldown")

    def test_unsigned_or_wrongly_signed_request_gets_no_verdict(self):
        self.halted_by("ev-1")
        unsigned = self.resume("ev-1", EEXIT_PANIC_HMAC_KEYS="", EEXIT_RESUME_TIMEOUT_S="1")
        self.assertEqual(unsigned.returncode, 3, unsigned.stdout + unsigned.stderr)
        wrong = self.resume("ev-1", EEXIT_PANIC_HMAC_KEYS="ops-1 ops " + "33" * 32, EEXIT_RESUME_TIMEOUT_S="1")
        self.assertEqual(wrong.returncode, 3, wrong.stdout + wrong.stderr)
        wait_for(lambda: self.log("eew-resume").count("resume_request_ignored") >= 2, 20,
                 message="the EEW ignored both requests")
        self.assertIn("bad_signature:missing_kid", self.log("eew-resume"))
        self.assertIn("bad_signature:sig_mismatch", self.log("eew-resume"))
        self.assertEqual(self.redis.xlen(resume.VERDICT_STREAM), 0)
        self.assert_still_halted()

    def test_keys_without_an_ops_key_refuse_at_once(self):
        result = self.resume("ev-1", EEXIT_PANIC_HMAC_KEYS=WATCHDOG_KEY)
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("none belongs to issuer 'ops'", result.stderr)


def resume_refusals(facts, accept_residual):
    """The EEW's order: the cheap refusals, then (only if none) the account read's."""
    return resume.cheap_refusals(facts) or resume.account_refusals(facts, accept_residual)


class ResumeDecisionTest(unittest.TestCase):
    """The pure decision, for the combinations the subprocess tests do not cover."""

    def facts(self, **over):
        values = dict(ack="ev", now_ms=1_000_000, state=schema.TradingState(halted=True, event_id="ev"),
                      event_found=True,
                      final=("990000-0", schema.CompletionReport(event_id="ev", status="FLAT")),
                      positions=[], open_orders=[], exchange_error=None, cooldown_s=5.0)
        values.update(over)
        return resume.ResumeFacts(**values)

    def test_clear_when_everything_holds(self):
        self.assertEqual(resume_refusals(self.facts(), False), [])

    def test_cooldown_boundary(self):
        self.assertEqual(resume_refusals(self.facts(now_ms=995_000), False), [])
        self.assertIn("cooldown", resume_refusals(self.facts(now_ms=994_999), False)[0])

    def test_missing_state_counts_as_halted(self):
        facts = self.facts(state=schema.TradingState(halted=None))
        self.assertEqual(resume_refusals(facts, False), [])

    def test_no_final_report_refused(self):
        self.assertIn("no final report", resume_refusals(self.facts(final=None), False)[0])

    def test_open_orders_refused_unless_accepted(self):
        facts = self.facts(open_orders=[object()])
        self.assertIn("open order", resume_refusals(facts, False)[0])
        self.assertEqual(resume_refusals(facts, True), [])

    def test_exchange_error_refused_even_with_accept_residual(self):
        facts = self.facts(positions=None, open_orders=None, exchange_error="NetworkError: down")
        self.assertIn("cannot verify", resume_refusals(facts, True)[0])

    def test_a_panic_stream_that_takes_no_entry_refuses_even_with_accept_residual(self):
        facts = self.facts(stream_broken="panic_stream_exhausted")
        self.assertIn("cannot take entries", resume_refusals(facts, True)[0])


class ResumeRequestTest(unittest.TestCase):
    KEYS = signing.parse_keys(OPS_KEY + "," + WATCHDOG_KEY, "test")

    def test_signed_request_checks_and_every_tampering_fails(self):
        fields = ops.build_request("alice", "ev-1", False, self.KEYS, now_ms=1_000_000, request_id="r1",
                                      valid_s=30)
        request, why = resume.check_request(fields, self.KEYS, now_ms=1_010_000)
        self.assertEqual((request, why), (resume.Request("r1", "ev-1", "alice", False, "resume", 1_030_000), None))
        for name, value in (("ack", "ev-2"), ("accept_residual", "true"), ("operator", "mallory"),
                            ("ts", "1000001"), ("request_id", "r2"), ("expires_at", "1090000")):
            with self.subTest(field=name):
                self.assertIsNone(resume.check_request(dict(fields, **{name: value}), self.KEYS, 1_000_000)[0])

    def test_a_request_expires_with_the_wait_of_its_cli(self):
        fields = ops.build_request("alice", "ev-1", False, signing.KeyRing(), now_ms=1_000_000, valid_s=30)
        self.assertEqual(fields["expires_at"], "1030000")
        self.assertIsNotNone(resume.check_request(fields, signing.KeyRing(), 1_030_000)[0])
        self.assertEqual(resume.check_request(fields, signing.KeyRing(), 1_031_000), (None, "expired:1s_ago"))
        too_long = dict(fields, expires_at=str(1_000_000 + int(resume.REQUEST_MAX_AGE_S * 1000) + 1))
        self.assertEqual(resume.check_request(too_long, signing.KeyRing(), 1_000_000)[1], "malformed:expires_at")
        self.assertEqual(resume.check_request(dict(fields, expires_at="999999"), signing.KeyRing(), 1_000_000)[1],
                         "malformed:expires_at")
        without = {k: v for k, v in fields.items() if k != "expires_at"}
        self.assertEqual(resume.check_request(without, signing.KeyRing(), 1_000_000)[1], "malformed:ts")

    def test_a_panic_signature_is_no_resume_signature_and_the_watchdog_cannot_resume(self):
        panic = signing.sign_fields({"event_id": "r1", "reason": "x", "severity": "CRITICAL", "issued_by": "ops",
                                     "ts": "1000000"}, "ops-1", self.KEYS)
        request = dict(ops.build_request("alice", "ev-1", False, signing.KeyRing(), 1_000_000, "r1"),
                       kid="ops-1", sig=panic["sig"])
        self.assertEqual(resume.check_request(request, self.KEYS, 1_000_000)[1], "bad_signature:sig_mismatch")
        watchdog = dict(ops.build_request("alice", "ev-1", False, signing.KeyRing(), 1_000_000, "r1"),
                        issued_by="watchdog")
        signed = signing.sign_fields(watchdog, "wd-1", self.KEYS, resume.REQUEST_CORE, resume.REQUEST_DOMAIN)
        self.assertEqual(resume.check_request(signed, self.KEYS, 1_000_000)[1], "not_a_resume_request_by_ops")


class StatusDecisionTest(unittest.TestCase):
    def status(self, ages, halted, statuses="OK OK OK", reasons=(None, None, None)):
        return {"daemons": {n: {"age_ms": a, "status": s if s != "-" else None, "reason": r}
                            for n, a, s, r in zip("abc", ages, statuses.split(), reasons)},
                "trading": {"halted": halted}}

    def test_exit_codes(self):
        self.assertEqual(health.status_exit_code(self.status([1, 2, 3], False), 5000), 0)
        self.assertEqual(health.status_exit_code(self.status([1, 2, 3], True), 5000), 1)
        self.assertEqual(health.status_exit_code(self.status([1, 2, 3], None), 5000), 1)
        self.assertEqual(health.status_exit_code(self.status([1, None, 3], False), 5000), 2)
        self.assertEqual(health.status_exit_code(self.status([1, 5001, 3], True), 5000), 2)

    def test_never_healthy_beside_a_degraded_daemon(self):
        degraded = self.status([1, 2, 3], False, "DEGRADED OK OK", ("cycle_overrun", None, None))
        self.assertEqual(health.status_exit_code(degraded, 5000), 2)
        self.assertEqual(health.daemon_problems(degraded, 5000), ["a: DEGRADED: cycle overrun"])
        for statuses in ("DEGRADED OK OK", "OK - OK"):      # no reason given; a status unknown
            with self.subTest(statuses=statuses):
                self.assertEqual(health.status_exit_code(self.status([1, 2, 3], False, statuses), 5000), 2)
        self.assertEqual(health.daemon_problems(self.status([1, 2, 3], True, "OK - OK"), 5000),
                         ["b: unknown status: no reason given"])


class AuditVerifyTest(unittest.TestCase):
    def write_chain(self, path, bodies):
        from eexit import audit
        prev, lines = audit.GENESIS, []
        for seq, body in enumerate(bodies, start=1):
            line, prev = audit.seal(seq, prev, body)
            lines.append(line + b"\n")
        with open(path, "wb") as f:
            f.writelines(lines)
        with open(audit.head_path(path), "w", encoding="ascii") as f:
            json.dump({"seq": len(bodies), "hash": prev}, f)

    def test_intact_is_0_tampered_is_1_with_the_line(self):
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/audit.jsonl"
            self.write_chain(path, [{"kind": "panic", "n": i} for i in range(3)])
            result = run_cli(python_env(), "audit", "verify", path)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn("OK", result.stdout)
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data.replace(b'"n":1', b'"n":7'))
            result = run_cli(python_env(), "audit", "verify", path)
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn("BROKEN", result.stdout)
            self.assertIn("line 2", result.stdout)


if __name__ == "__main__":
    unittest.main()

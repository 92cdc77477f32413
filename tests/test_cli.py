"""`eexit status | panic | resume | audit verify` as real subprocesses against a real
redis-server and, for resume, real ccxt against the paper exchange. The EEW's part (the
completion report) is played by the test where the daemon is not the subject."""

import json
import subprocess
import sys
import threading
import time
import unittest

from eexit import ops, schema, signing
from eexit.localredis import free_port
from eexit.paper import PaperExchange
from tests.harness import ROOT, RedisTestCase, python_env

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


def beat(client, stream, status="OK"):
    client.xadd(stream, schema.Heartbeat("x", status, 0, int(time.time() * 1000), 1.0,
                                         int(time.time() * 1000)).to_fields())


class StatusTest(RedisTestCase):
    def env(self, **more):
        return python_env(REDIS_URL=self.redis_server.url, **more)

    def test_redis_unreachable_is_2(self):
        result = run_cli(python_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), "status")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("UNREACHABLE", result.stdout)

    def test_silent_daemon_is_2_halted_is_1_healthy_is_0(self):
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("SILENT", result.stdout)
        for _name, stream in ops.DAEMON_STREAMS:
            beat(self.redis, stream)
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "e1",
                                                           "reason": "X", "halted_by": "watchdog"})
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("HALTED", result.stdout)
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("HEALTHY", result.stdout)

    def test_json_lists_panics_reports_and_pending(self):
        for _name, stream in ops.DAEMON_STREAMS:
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
        for _name, stream in ops.DAEMON_STREAMS:
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


class ResumeTest(RedisTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.paper = PaperExchange()
        cls.paper_url = cls.paper.start()
        cls.addClassCleanup(cls.paper.stop)

    def setUp(self):
        super().setUp()
        self.paper.reset(seed="")

    def env(self, cooldown="0", **more):
        settings = dict(REDIS_URL=self.redis_server.url, EEXIT_EXCHANGE_URL=self.paper_url,
                        EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret",
                        EEXIT_RESUME_COOLDOWN_S=cooldown)
        settings.update(more)
        return python_env(**settings)

    def halted_by(self, event_id, with_report=True, status="FLAT"):
        self.redis.xadd(schema.PANIC_STREAM, schema.PanicEvent(event_id, "MANUAL", "ops",
                                                               int(time.time() * 1000)).to_fields())
        self.redis.hset(schema.TRADING_STATE_KEY, mapping=schema.TradingState(
            halted=True, reason="MANUAL", event_id=event_id, halted_at=int(time.time() * 1000),
            halted_by="ops", requires_manual_reset=True).to_fields())
        if with_report:
            self.redis.xadd(schema.COMPLETED_STREAM, report(event_id, status).to_fields())

    def resume(self, event_id, *more, **env):
        return run_cli(self.env(**env), "resume", "--operator", "alice", "--ack", event_id, *more)

    def assert_still_halted(self):
        state, _ = schema.TradingState.from_fields(ops.decoded(self.redis.hgetall(schema.TRADING_STATE_KEY)))
        self.assertIs(state.halted, True)
        self.assertEqual(self.redis.xlen(ops.OPS_AUDIT_STREAM), 0)

    def test_unknown_event_refused(self):
        self.halted_by("ev-1")
        result = self.resume("no-such-event")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("unknown event id", result.stdout)
        self.assert_still_halted()

    def test_no_report_refused(self):
        self.halted_by("ev-1", with_report=False)
        result = self.resume("ev-1")
        self.assertEqual(result.returncode, 1)
        self.assertIn("no final report", result.stdout)
        self.assert_still_halted()

    def test_cooldown_refused(self):
        self.halted_by("ev-1")
        result = self.resume("ev-1", cooldown="300")
        self.assertEqual(result.returncode, 1)
        self.assertIn("cooldown", result.stdout)
        self.assert_still_halted()

    def test_residual_positions_refused(self):
        self.halted_by("ev-1", status="RESIDUAL")
        self.paper.set_position("ETHUSDT", "-0.5")
        result = self.resume("ev-1")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("not flat", result.stdout)
        self.assertIn("ETH/USDT:USDT short 0.5", result.stdout)
        self.assert_still_halted()

    def test_exchange_unreadable_refused(self):
        self.halted_by("ev-1")
        result = self.resume("ev-1", EEXIT_EXCHANGE_URL=f"http://127.0.0.1:{free_port()}",
                             EEXIT_EXCHANGE_TIMEOUT_MS="500")
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot verify the account", result.stdout)
        self.assert_still_halted()

    def test_other_event_halted_refused(self):
        self.halted_by("ev-1")
        self.halted_by("ev-2", with_report=False)
        result = self.resume("ev-1")
        self.assertEqual(result.returncode, 1)
        self.assertIn("halted by event ev-2", result.stdout)
        self.assert_still_halted()

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
        self.halted_by("ev-1", status="RESIDUAL")
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


class ResumeDecisionTest(unittest.TestCase):
    """The pure decision, for the combinations the subprocess tests do not cover."""

    def facts(self, **over):
        values = dict(ack="ev", now_ms=1_000_000, state=schema.TradingState(halted=True, event_id="ev"),
                      state_present=True, event_found=True,
                      final=("990000-0", schema.CompletionReport(event_id="ev", status="FLAT")),
                      positions=[], open_orders=[], exchange_error=None, cooldown_s=5.0)
        values.update(over)
        return ops.ResumeFacts(**values)

    def test_clear_when_everything_holds(self):
        self.assertEqual(ops.resume_refusals(self.facts(), False), [])

    def test_cooldown_boundary(self):
        self.assertEqual(ops.resume_refusals(self.facts(now_ms=995_000), False), [])
        self.assertIn("cooldown", ops.resume_refusals(self.facts(now_ms=994_999), False)[0])

    def test_missing_state_counts_as_halted(self):
        facts = self.facts(state=schema.TradingState(halted=None), state_present=False)
        self.assertEqual(ops.resume_refusals(facts, False), [])

    def test_open_orders_refused_unless_accepted(self):
        facts = self.facts(open_orders=[object()])
        self.assertIn("open order", ops.resume_refusals(facts, False)[0])
        self.assertEqual(ops.resume_refusals(facts, True), [])

    def test_exchange_error_refused_even_with_accept_residual(self):
        facts = self.facts(positions=None, open_orders=None, exchange_error="NetworkError: down")
        self.assertIn("cannot verify", ops.resume_refusals(facts, True)[0])


class StatusDecisionTest(unittest.TestCase):
    def status(self, ages, halted):
        return {"daemons": {n: {"age_ms": a} for n, a in zip("abc", ages)}, "trading": {"halted": halted}}

    def test_exit_codes(self):
        self.assertEqual(ops.status_exit_code(self.status([1, 2, 3], False), 5000), 0)
        self.assertEqual(ops.status_exit_code(self.status([1, 2, 3], True), 5000), 1)
        self.assertEqual(ops.status_exit_code(self.status([1, 2, 3], None), 5000), 1)
        self.assertEqual(ops.status_exit_code(self.status([1, None, 3], False), 5000), 2)
        self.assertEqual(ops.status_exit_code(self.status([1, 5001, 3], True), 5000), 2)


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

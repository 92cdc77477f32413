"""`eexit init` (the explicit first start), `eexit --version`, `eexit audit verify --json`
and the honest output of `eexit status` (unknown counts), against a real redis-server."""

import json
import os
import shutil
import tempfile
import unittest

from eexit import __version__, bus, ops, resume, schema
from tests.harness import RedisTestCase, python_env
from tests.test_cli import run_cli
from tests.test_eew import EEWCase


class InitThroughTheEEWTest(EEWCase):
    """The EEW, the halt's only writer, writes the first halted=false (eexit/resume.py)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.start_eew("eew-init")

    def env(self):
        return python_env(REDIS_URL=self.redis_server.url)

    def test_fresh_redis_gets_halted_false_with_who_when_and_an_audit_entry(self):
        result = run_cli(self.env(), "init", "--operator", "alice", "--json")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        out = json.loads(result.stdout)
        self.assertTrue(out["initialised"])
        state = {k.decode(): v.decode() for k, v in self.redis.hgetall(schema.TRADING_STATE_KEY).items()}
        self.assertEqual(state["halted"], "false")
        self.assertEqual(state["cleared_by"], "alice")
        self.assertTrue(state["cleared_at"].isdigit())
        [(entry_id, fields)] = self.redis.xrange(ops.OPS_AUDIT_STREAM)
        self.assertEqual(entry_id.decode(), out["audit_entry"])
        self.assertEqual(fields[b"action"], b"init")
        self.assertEqual(fields[b"operator"], b"alice")
        self.assertEqual(fields[b"version"], __version__.encode())
        status = run_cli(self.env(), "status", "--json")
        self.assertEqual(json.loads(status.stdout)["trading"]["halted"], False)

    def test_rerun_on_an_initialised_host_changes_nothing(self):
        self.assertEqual(run_cli(self.env(), "init", "--operator", "alice").returncode, 0)
        before = self.redis.hgetall(schema.TRADING_STATE_KEY)
        again = run_cli(self.env(), "init", "--operator", "bob")
        self.assertEqual(again.returncode, 0, again.stdout)
        self.assertIn("already initialised", again.stdout)
        self.assertEqual(self.redis.hgetall(schema.TRADING_STATE_KEY), before)
        self.assertEqual(self.redis.xlen(ops.OPS_AUDIT_STREAM), 1)


class InitTest(RedisTestCase):
    """What `eexit init` decides without asking: a state exists (refused or nothing to do),
    bad input, Redis down, no EEW answering."""

    def env(self):
        return python_env(REDIS_URL=self.redis_server.url)

    def test_no_eew_is_3_and_writes_nothing(self):
        result = run_cli(python_env(REDIS_URL=self.redis_server.url, EEXIT_RESUME_TIMEOUT_S="1"),
                         "init", "--operator", "alice")
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertIn("outcome unknown, check `eexit status`", result.stderr)
        self.assertNotIn("nothing written", result.stdout + result.stderr)   # it cannot know that
        self.assertEqual(self.redis.exists(schema.TRADING_STATE_KEY), 0)
        # The request it left is dead: expired on Redis's clock when the CLI gave up.
        [(_, request)] = self.redis.xrange(resume.REQUEST_STREAM)
        self.assertLess(int(request[b"expires_at"]), bus.server_time_ms(self.redis))

    def test_an_existing_halt_is_never_cleared(self):
        halt = {"halted": "true", "event_id": "ev-9", "reason": "POSITIONS_UNGUARDED", "requires_manual_reset": "true"}
        self.redis.hset(schema.TRADING_STATE_KEY, mapping=halt)
        result = run_cli(self.env(), "init", "--operator", "alice")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("REFUSED", result.stdout)
        self.assertIn("eexit resume", result.stdout)
        self.assertEqual({k.decode(): v.decode() for k, v in self.redis.hgetall(schema.TRADING_STATE_KEY).items()}, halt)
        self.assertEqual(self.redis.xlen(ops.OPS_AUDIT_STREAM), 0)

    def test_a_halt_flag_that_is_unreadable_is_not_cleared_either(self):
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "maybe")
        result = run_cli(self.env(), "init", "--operator", "alice")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertEqual(self.redis.hget(schema.TRADING_STATE_KEY, "halted"), b"maybe")

    def test_operator_must_name_someone_and_redis_down_is_2(self):
        self.assertEqual(run_cli(self.env(), "init", "--operator", " ").returncode, 2)
        down = run_cli(python_env(REDIS_URL="redis://127.0.0.1:1/0"), "init", "--operator", "alice")
        self.assertEqual(down.returncode, 2, down.stdout + down.stderr)

    def test_unknown_counts_are_shown_as_unknown(self):
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        self.redis.xadd(schema.PANIC_STREAM, {"event_id": "ev-r", "reason": "R", "issued_by": "ops", "ts": "1"})
        self.redis.xadd(schema.COMPLETED_STREAM, schema.CompletionReport(
            event_id="ev-r", status="REJECTED", positions_total=None, positions_closed=None,
            positions_failed=None, detail="unsigned").to_fields())
        result = run_cli(self.env(), "status")
        self.assertIn("REJECTED unknown/unknown closed in unknown time", result.stdout)
        self.assertNotIn("None", result.stdout)


class VersionAndAuditVerifyTest(unittest.TestCase):
    def test_version(self):
        result = run_cli(python_env(), "--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"eexit {__version__}"))

    def test_drill_is_a_subcommand_and_refuses_a_venue_that_is_not_paper_or_sandbox(self):
        from eexit.localredis import free_port   # noqa: PLC0415
        env = python_env(EEXIT_EXCHANGE_URL=f"http://127.0.0.1:{free_port()}", REDIS_URL="redis://127.0.0.1:1/0")
        result = run_cli(env, "drill", "--json")
        self.assertEqual(result.returncode, 4, result.stdout + result.stderr)
        self.assertIn("refused", json.loads(result.stdout)["result"])

    def test_audit_verify_cannot_read_is_not_broken(self):
        result = run_cli(python_env(), "audit", "verify", "/nonexistent/audit.jsonl")
        self.assertEqual(result.returncode, 2)
        self.assertIn("CANNOT READ", result.stdout)
        self.assertNotIn("BROKEN", result.stdout)

    def test_audit_verify_json(self):
        tmp = tempfile.mkdtemp(prefix="eexit-verify-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        broken = os.path.join(tmp, "audit.jsonl")
        with open(broken, "w", encoding="utf-8") as f:
            f.write('{"seq": 1, "not": "a sealed line"}\n')
        result = run_cli(python_env(), "audit", "verify", broken, "--json")
        out = json.loads(result.stdout)
        self.assertEqual((result.returncode, out["verdict"], out["ok"], out["exit_code"]), (1, "BROKEN", False, 1))
        self.assertEqual(out["broken_line"], 1)
        empty = os.path.join(tmp, "empty.jsonl")
        open(empty, "w").close()
        # Issue 26: an emptied file whose head was deleted proves nothing: BROKEN, never OK.
        result = run_cli(python_env(), "audit", "verify", empty, "--json")
        self.assertEqual((result.returncode, json.loads(result.stdout)["verdict"]), (1, "BROKEN"), result.stdout)
        self.assertIn(".head file is missing", json.loads(result.stdout)["reason"])
        with open(empty + ".head", "w", encoding="ascii") as f:
            json.dump({"seq": 0, "hash": "0" * 64}, f)          # what the daemon writes first
        result = run_cli(python_env(), "audit", "verify", empty, "--json")
        self.assertEqual((result.returncode, json.loads(result.stdout)["verdict"]), (0, "OK"), result.stdout)
        missing = run_cli(python_env(), "audit", "verify", os.path.join(tmp, "absent"), "--json")
        self.assertEqual((missing.returncode, json.loads(missing.stdout)["verdict"]), (2, "CANNOT READ"))


if __name__ == "__main__":
    unittest.main()

"""Exit codes keep their meaning on the edges (issue 13, behaviour 9), as real subprocesses
against a real redis-server (and, for the drill, real ccxt against the paper exchange):

- `eexit status` exits 2 when it cannot answer: a malformed REDIS_URL (naming it), an
  unusable unix socket, any unexpected error; never 1, which means "halted". It also exits 2
  naming a daemon whose heartbeat gives a `reason` (e.g. the EEW's exchange_authentication).
- `eexit panic` and the drill exit 5 on an unexpected error: never 0 (FLAT / PASS) or 1.
- No BrokenPipeError traceback under `| head -1`; `\\r` progress only on a terminal; a FAILED
  report is never printed as "verified flat".

A bug is simulated by replacing one eexit function in the child process before the command
runs (nothing about Redis or the exchange is faked)."""

import json
import subprocess
import sys
import time
import unittest

from eexit import demo, health, schema
from eexit.demo import Stack
from eexit.localredis import free_port
from tests.harness import ROOT, RedisTestCase, python_env
from tests.test_cli import FakeEEW, beat

BUG = "def bug(*_a, **_k):\n    raise RuntimeError('simulated bug')\n"


def run_cli(env, *args, patch=None, timeout=60):
    """`eexit ARGS`; with patch="module.attr", that function raises first (a simulated bug)."""
    if patch is None:
        command = [sys.executable, "-m", "eexit.cli", *args]
    else:
        module, attr = patch.rsplit(".", 1)
        code = (f"import sys, {module}\n{BUG}{module}.{attr} = bug\n"
                f"from eexit import cli\nsys.exit(cli.main({list(args)!r}))\n")
        command = [sys.executable, "-c", code]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_drill(env, *args, patch=None, timeout=60):
    if patch is None:
        command = [sys.executable, "tools/test_panic_close.py", *args]
    else:
        module, attr = patch.rsplit(".", 1)
        code = (f"import runpy, sys\nsys.argv = ['test_panic_close.py', *{list(args)!r}]\nimport {module}\n{BUG}"
                f"{module}.{attr} = bug\nrunpy.run_path('tools/test_panic_close.py', run_name='__main__')\n")
        command = [sys.executable, "-c", code]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class StatusCannotAnswer(RedisTestCase):
    def env(self, **more):
        # A beat stays fresh however slowly a CLI starts on a loaded machine (CI once took over
        # 5 s): the silence threshold is not what these tests are about (no beat is still silent).
        return python_env(REDIS_URL=self.redis_server.url, **{"EEXIT_STATUS_SILENT_S": "600", **more})

    def test_malformed_redis_url_is_2_naming_the_variable(self):
        for url in (f"redis://127.0.0.1:99999/0", "redis://127.0.0.1:notaport/0", "http://127.0.0.1:6379/0"):
            with self.subTest(url=url):
                result = run_cli(python_env(REDIS_URL=url), "status")
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                self.assertIn("REDIS_URL", result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_unusable_unix_socket_is_2(self):
        result = run_cli(python_env(REDIS_URL=f"unix:///tmp/eexit-no-such-{free_port()}.sock"), "status")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)

    def test_any_unexpected_error_is_2_never_1(self):
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "e1"})
        for patch in ("eexit.health.gather_status", "eexit.health.status_exit_code", "eexit.cli.fmt_ts"):
            with self.subTest(patch=patch):
                result = run_cli(self.env(), "status", patch=patch)
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                self.assertIn("unexpected error RuntimeError: simulated bug (exit 2)", result.stderr)

    def test_daemon_naming_a_reason_is_2_and_named(self):
        for _name, stream in health.DAEMON_STREAMS:
            beat(self.redis, stream)
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false"})
        self.assertEqual(run_cli(self.env(), "status").returncode, 0)
        # What the EEW's account check publishes when the API key is refused.
        self.redis.xadd(schema.EEW_HEARTBEAT_STREAM, dict(schema.Heartbeat(
            "eew-1", "DEGRADED", 0, int(time.time() * 1000), 1.0, int(time.time() * 1000)).to_fields(),
            reason="exchange_authentication", detail="AuthenticationError -2015"))
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("eew: DEGRADED: exchange authentication (AuthenticationError -2015)", result.stdout)
        self.assertIn("reason: exchange authentication", result.stdout)
        data = json.loads(run_cli(self.env(), "status", "--json").stdout)
        self.assertEqual(data["exit_code"], 2)
        self.assertEqual(data["daemons"]["eew"]["reason"], "exchange_authentication")
        self.assertEqual(data["problems"], ["eew: DEGRADED: exchange authentication (AuthenticationError -2015)"])
        # DEGRADED without a reason is no less degraded (issue 26: never HEALTHY beside it).
        beat(self.redis, schema.EEW_HEARTBEAT_STREAM, status="DEGRADED")
        result = run_cli(self.env(), "status")
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("eew: DEGRADED: no reason given", result.stdout.splitlines()[-1])

    def test_closed_pipe_is_no_traceback_and_keeps_the_exit_code(self):
        fields = schema.PanicEvent("e", "A_REASON_LONG_ENOUGH_TO_FILL_THE_PIPE", "ops", 1).to_fields()
        pipe = self.redis.pipeline(transaction=False)
        for number in range(1000):
            pipe.xadd(schema.PANIC_STREAM, dict(fields, event_id=f"event-{number:04d}-" + "x" * 60))
        pipe.execute()
        status = subprocess.Popen([sys.executable, "-m", "eexit.cli", "status", "--events", "1000"],
                                  env=self.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        head = subprocess.run(["head", "-1"], stdin=status.stdout, capture_output=True, text=True, timeout=60)
        status.stdout.close()
        stderr = status.stderr.read().decode()
        status.stderr.close()
        self.assertEqual(status.wait(timeout=60), 2, stderr)     # the daemons are silent: 2, as without a pipe
        self.assertTrue(head.stdout.startswith("trading:"), head.stdout)
        self.assertNotIn("Traceback", stderr)
        self.assertNotIn("BrokenPipe", stderr)


class PanicUnexpectedError(RedisTestCase):
    def test_unexpected_error_is_5_never_0_or_1(self):
        env = python_env(REDIS_URL=self.redis_server.url)
        for patch in ("eexit.ops.publish_panic", "eexit.ops.wait_for_report"):
            with self.subTest(patch=patch):
                result = run_cli(env, "panic", "--reason", "BUG", "--timeout", "1", patch=patch)
                self.assertEqual(result.returncode, 5, result.stdout + result.stderr)
                self.assertIn("Traceback", result.stderr)

    def test_help_documents_the_codes(self):
        result = run_cli(python_env(), "--help")
        self.assertIn("5 unexpected error", " ".join(result.stdout.split()))


class DrillEdges(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stack = Stack(seed="BTCUSDT:0.01").start(daemons=(), orders=())
        cls.addClassCleanup(cls.stack.stop)

    def setUp(self):
        self.client = self.stack.client()
        self.client.flushall()
        # Looks like a live EEW: a heartbeat and the group.
        self.client.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0", mkstream=True)
        self.client.xadd(schema.EEW_HEARTBEAT_STREAM, {"service_id": "x", "status": "OK"})
        # That beat must stay fresh while a drill starts on a loaded machine (CI once took 5.1 s):
        # the silence threshold is not what these tests are about.
        self.live_env = self.stack.env(EEXIT_STATUS_SILENT_S="600")

    def test_unexpected_error_is_5(self):
        result = run_drill(self.live_env, "--timeout", "1", patch="eexit.ops.read_account")
        self.assertEqual(result.returncode, 5, result.stdout + result.stderr)
        self.assertIn("outcome is unknown", result.stdout)
        self.assertIn("5 unexpected error", " ".join(run_drill(self.stack.env(), "--help").stdout.split()))

    def test_malformed_redis_url_is_2(self):
        result = run_drill(self.stack.env(REDIS_URL="redis://127.0.0.1:99999/0"))
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("REDIS_URL", result.stdout)

    def test_no_carriage_return_off_a_terminal(self):
        result = run_drill(self.live_env, "--timeout", "1")
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertNotIn("\r", result.stderr + result.stdout)

    def test_failed_report_is_never_printed_as_verified_flat(self):
        eew = FakeEEW(self.stack.client(), status="FAILED")
        eew.start()
        self.addCleanup(eew.stop.set)
        result = run_drill(self.live_env, "--timeout", "20")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("verified flat", result.stdout)
        self.assertIn("EEW finished: FAILED, NOT flat", result.stdout)

    def test_demo_timeline_calls_only_flat_verified(self):
        self.assertIn("verified flat", demo.verified_text({"status": "FLAT"}))
        for status in ("FAILED", "RESIDUAL"):
            self.assertNotIn("verified flat", demo.verified_text({"status": status}))
        self.assertIn("MISSING", demo.verified_text(None))


if __name__ == "__main__":
    unittest.main()

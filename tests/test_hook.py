"""Issue 19: `eexit panic --on-service-failure`, the Exit Brain unit's ExecStopPost= hook.

systemd as PID 1 is not available, so the tests play its part: they run the brain, and on its
death run the ExecStopPost= command line parsed from systemd/eexit-brain.service, with the
unit's Environment= lines and the variables systemd sets for ExecStopPost= (SERVICE_RESULT,
EXIT_CODE, EXIT_STATUS; CREDENTIALS_DIRECTORY holding the unit's credential files).
Real EEW, watchdog, brain and paper exchange; no timed assertion (bench/hook.py times it)."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import redis

from eexit import bus, hook, schema, watchdog
from eexit.paper import PaperExchange
from tests.harness import RedisServer, RedisTestCase, python_env, start_module, stop_process, tail_logs, wait_for
from tests.acl_harness import password, rendered_acl
from tests.test_systemd_units import read_unit
from tests.test_watchdog import SCALED, Beater, panics

ROOT = Path(__file__).resolve().parent.parent
UNIT_BIN = "/opt/eexit/venv/bin/"
WATCHDOG_KEY = "11" * 32
HOOK_KEY = "22" * 32
EEW_KEYS = f"wd1 watchdog {WATCHDOG_KEY},hk1 exit_brain {HOOK_KEY}"
EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret", "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}
WATCHDOG = {"EEXIT_UNGUARDED_S": "1.0", "EEXIT_HEARTBEAT_LOST_S": "2.0", "EEXIT_DEGRADED_S": "2.0",
            "EEXIT_STAGNANT_S": "30", "EEXIT_STARTUP_GRACE_S": "15", "EEXIT_REPUBLISH_S": "5",
            "EEXIT_PANIC_HMAC_KEYS": f"wd1 watchdog {WATCHDOG_KEY}"}
KILLED = {"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}
STOPPED = {"SERVICE_RESULT": "success", "EXIT_CODE": "exited", "EXIT_STATUS": "0"}


def exec_stop_post(bin_dir):
    """argv of the unit's ExecStopPost= (the console script mapped into bin_dir) and the
    unit's Environment= assignments."""
    service = read_unit("eexit-brain.service")["Service"]
    (line,) = service["ExecStopPost"]
    argv = shlex.split(line)
    assert argv[0].startswith(UNIT_BIN), argv
    argv[0] = str(Path(bin_dir) / argv[0][len(UNIT_BIN):])
    unit_env = dict(item.split("=", 1) for value in service.get("Environment", []) for item in shlex.split(value))
    return argv, unit_env


def console_script(bin_dir):
    """What pip's console script `eexit` is: import eexit.cli, call main()."""
    path = Path(bin_dir) / "eexit"
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom eexit.cli import main\nsys.exit(main())\n")
    path.chmod(0o755)


class HookProcess:
    """Plays systemd's ExecStopPost= for the hook: credentials directory + environment."""

    def __init__(self, testcase, credentials=None):
        self.dir = tempfile.mkdtemp(prefix="eexit-hook-")
        testcase.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir], check=False))
        console_script(self.dir)
        self.argv, self.unit_env = exec_stop_post(self.dir)
        self.credentials = Path(self.dir) / "credentials"
        self.credentials.mkdir(mode=0o700)
        for name, value in {"hook_hmac_key": f"hk1 exit_brain {HOOK_KEY}\n", **(credentials or {})}.items():
            (self.credentials / name).write_text(value)

    def run(self, redis_url, service, **env):
        merged = python_env(**{"REDIS_URL": redis_url, "CREDENTIALS_DIRECTORY": str(self.credentials),
                               **self.unit_env, **service, **env})
        done = subprocess.run(self.argv, env=merged, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stderr


class LatchTest(unittest.TestCase):
    """The pure decision, every branch."""

    def state(self, **fields):
        return schema.TradingState.from_fields(fields)[0]

    def test_table(self):
        halted_by_e1 = self.state(halted="true", event_id="e1")
        resumed = self.state(halted="false", event_id="e1", cleared_by="ann", cleared_at="2000")
        open_before_resume = {"event_id": "e1", "opened_at_ms": "1000"}
        open_after_resume = {"event_id": "e2", "opened_at_ms": "3000"}
        cases = [
            (halted_by_e1, None, True, hook.SKIP_LATCHED),
            (halted_by_e1, open_before_resume, False, hook.SKIP_LATCHED),
            (self.state(halted="true"), None, True, hook.PUBLISH),         # halted, no event: publish
            (self.state(), None, True, hook.PUBLISH),                      # fresh deployment
            (None, None, None, hook.PUBLISH),                              # unreadable: fail closed
            (None, open_after_resume, False, hook.PUBLISH),
            (resumed, None, True, hook.PUBLISH),
            (resumed, None, None, hook.PUBLISH),                           # claim failed: fail closed
            (resumed, open_after_resume, False, hook.SKIP_INCIDENT_OPEN),
            (resumed, open_before_resume, False, hook.PUBLISH),            # earlier outage's incident
            (resumed, {"event_id": "e1"}, False, hook.SKIP_INCIDENT_OPEN),  # no opened_at_ms
            (self.state(halted="false"), open_after_resume, False, hook.SKIP_INCIDENT_OPEN),
        ]
        for state, incident, claimed, expected in cases:
            with self.subTest(state=state, incident=incident, claimed=claimed):
                self.assertEqual(hook.latch(state, incident, claimed), expected)

    def test_service_facts_and_shared_key(self):
        self.assertEqual(hook.service_facts(KILLED), {"service_result": "signal", "exit_code": "killed",
                                                      "exit_status": "KILL"})
        self.assertEqual(hook.service_facts({}), {"service_result": "", "exit_code": "", "exit_status": ""})
        self.assertEqual(hook.INCIDENT_KEY, watchdog.INCIDENT_KEY)

    def test_unit_line_is_the_pinned_command(self):
        service = read_unit("eexit-brain.service")["Service"]
        self.assertEqual(service["ExecStopPost"], [f"{UNIT_BIN}eexit panic --on-service-failure"])
        timeout = float(dict(v.split("=", 1) for v in service["Environment"])["EEXIT_HOOK_TIMEOUT_S"])
        self.assertLess(timeout * 2, float(service["TimeoutStopSec"][0]))
        credentials = {v.split(":")[0] for v in service["LoadCredential"]}
        self.assertLessEqual({"hook_hmac_key", "redis_hook_password"}, credentials)


class HookRedisTest(RedisTestCase):
    """The hook process against a real Redis, no daemons."""

    def setUp(self):
        super().setUp()
        self.hook = HookProcess(self)

    def panics(self):
        return [schema.PanicEvent.from_fields(raw)[0] for _id, raw in self.redis.xrange(schema.PANIC_STREAM)]

    def test_failure_publishes_one_signed_panic_with_the_three_values(self):
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 0, err)
        (event,) = self.panics()
        self.assertEqual((event.issued_by, event.reason), ("exit_brain", "EXIT_BRAIN_DIED"))
        self.assertEqual(event.extra["kid"], "hk1")
        context = json.loads(event.extra["context"])
        self.assertEqual({k: context[k] for k in ("service_result", "exit_code", "exit_status")},
                         {"service_result": "signal", "exit_code": "killed", "exit_status": "KILL"})
        incident = {k.decode(): v.decode() for k, v in self.redis.hgetall(hook.INCIDENT_KEY).items()}
        self.assertEqual((incident["event_id"], incident["opened_by"], incident["issued_by"]),
                         (event.event_id, "hook", "exit_brain"))
        self.assertEqual(len([line for line in err.splitlines() if line.strip()]), 1, err)
        self.assertIn("event=panic_published", err)

    def test_success_publishes_nothing(self):
        code, err = self.hook.run(self.redis_server.url, STOPPED)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.panics(), [])
        self.assertFalse(self.redis.exists(hook.INCIDENT_KEY))
        self.assertIn("why=success", err)

    def test_latched_halt_and_open_incident_publish_nothing(self):
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "e-old"})
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual((code, self.panics()), (0, []), err)
        self.assertIn("why=latched held_by_event=e-old", err)
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "cleared_at": "1"})
        self.redis.hset(hook.INCIDENT_KEY, mapping={"event_id": "e-wd", "opened_by": "watchdog",
                                                    "opened_at_ms": "2"})
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual((code, self.panics()), (0, []), err)
        self.assertIn("why=incident_open held_by_event=e-wd opened_by=watchdog", err)

    def test_incident_older_than_a_resume_gets_a_new_panic(self):
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "event_id": "e-old",
                                                           "cleared_by": "ann", "cleared_at": "5000"})
        self.redis.hset(hook.INCIDENT_KEY, mapping={"event_id": "e-old", "opened_at_ms": "1000"})
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.panics()), 1)
        self.assertIn("incident=stale", err)

    def test_unset_result_fails_closed(self):
        code, err = self.hook.run(self.redis_server.url, {})
        self.assertEqual((code, len(self.panics())), (0, 1), err)

    def test_stalled_redis_exits_3_and_refused_exits_4(self):
        with socket.socket() as stall:
            stall.bind(("127.0.0.1", 0))
            stall.listen(1)        # the handshake completes, nothing ever answers
            code, err = self.hook.run(f"redis://127.0.0.1:{stall.getsockname()[1]}", KILLED,
                                      EEXIT_HOOK_TIMEOUT_S="1")
        self.assertEqual(code, hook.EXIT_TIMEOUT, err)
        self.assertIn("event=hook_timeout", err)
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]      # bound, not listening: connection refused
            code, err = self.hook.run(f"redis://127.0.0.1:{port}", KILLED, EEXIT_HOOK_TIMEOUT_S="1")
        self.assertEqual(code, hook.EXIT_REDIS, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_unconfirmed_replication_exits_5(self):
        code, err = self.hook.run(self.redis_server.url, KILLED, EEXIT_REDIS_REPLICAS="1",
                                  EEXIT_REDIS_WAIT_MS="50", EEXIT_HOOK_TIMEOUT_S="1")
        self.assertEqual(code, hook.EXIT_UNCONFIRMED, err)
        self.assertEqual(len(self.panics()), 1)      # written, only not confirmed on a replica
        self.assertIn("event=panic_replication_unconfirmed", err)

    def test_configuration_errors_exit_2(self):
        for env, needle in (({"EEXIT_HOOK_TIMEOUT_S": "60"}, "EEXIT_HOOK_TIMEOUT_S"),
                            ({"EEXIT_REDIS_REPLICAS": "x"}, "EEXIT_REDIS_REPLICAS")):
            with self.subTest(env=env):
                code, err = self.hook.run(self.redis_server.url, KILLED, **env)
                self.assertEqual(code, 2, err)
                self.assertIn(needle, err)
        (self.hook.credentials / "hook_hmac_key").write_text(f"wd1 watchdog {WATCHDOG_KEY}\n")
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual((code, self.panics()), (2, []), err)
        self.assertIn("exit_brain", err)

    def test_import_path_has_no_ccxt(self):
        probe = "import sys, eexit.cli, eexit.hook; print('ccxt' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", probe], env=python_env(), capture_output=True,
                             text=True, timeout=60, check=True).stdout
        self.assertEqual(out.strip(), "False")


class HookAclTest(unittest.TestCase):
    """Under the shipped ACL (rendered as the installer does), as eexit-hook, with the brain's
    own redis_password in the same credentials directory: the hook logs in as eexit-hook, and
    that user can do nothing but add a panic, claim an incident and read the halt."""

    @classmethod
    def setUpClass(cls):
        rendered = rendered_acl()
        cls.directory = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.directory.cleanup)
        acl = Path(cls.directory.name) / "users.acl"
        acl.write_text(rendered + f"user admin on >{password('admin')} ~* &* +@all\n")
        cls.server = RedisServer(["--aclfile", str(acl)]).start()
        cls.addClassCleanup(cls.server.stop)

    def client(self, user):
        client = self.server.client(username=user, password=password(user), decode_responses=True)
        self.addCleanup(client.close)
        return client

    def test_hook_publishes_as_its_own_user(self):
        admin = self.client("admin")
        admin.flushall()
        admin.acl_log_reset()
        hook_process = HookProcess(self, {"redis_password": password("eexit-brain"),
                                          "redis_username": "eexit-brain",
                                          "redis_hook_password": password("eexit-hook")})
        code, err = hook_process.run(self.server.url, KILLED)
        self.assertEqual(code, 0, err)
        self.assertEqual(admin.xlen(schema.PANIC_STREAM), 1)
        self.assertEqual(admin.hget(hook.INCIDENT_KEY, "opened_by"), "hook")
        clients = admin.acl_log()
        self.assertEqual([entry for entry in clients if entry.get("username") == "eexit-hook"], [])

    def test_everything_else_is_refused(self):
        admin = self.client("admin")
        admin.flushall()
        admin.hset(hook.INCIDENT_KEY, mapping={"event_id": "e-wd", "opened_by": "watchdog"})
        admin.xadd(schema.PANIC_STREAM, {"event_id": "e0"})
        admin.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0")
        c = self.client("eexit-hook")
        self.assertFalse(c.hsetnx(hook.INCIDENT_KEY, "event_id", "forged"))   # allowed, but cannot rewrite
        self.assertTrue(c.hgetall(schema.TRADING_STATE_KEY) == {})
        forbidden = [
            (c.hset, hook.INCIDENT_KEY, "event_id", "forged"),
            (c.delete, hook.INCIDENT_KEY),
            (c.hdel, hook.INCIDENT_KEY, "event_id"),
            (c.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (c.xadd, schema.HEARTBEAT_STREAM, {"status": "OK"}),
            (c.xadd, schema.COMPLETED_STREAM, {"event_id": "e0", "status": "FLAT"}),
            (c.xtrim, schema.PANIC_STREAM, 0),
            (c.xdel, schema.PANIC_STREAM, "0-1"),
            (c.xreadgroup, schema.EEW_GROUP, "x", {schema.PANIC_STREAM: ">"}),
            (c.xack, schema.PANIC_STREAM, schema.EEW_GROUP, "0-1"),
            (c.xrange, schema.COMPLETED_STREAM),
            (c.hgetall, "system:panic_close:processed"),
            (c.config_get, "*"),
            (c.keys, "*"),
        ]
        for call, *args in forbidden:
            with self.subTest(command=call.__name__, args=args):
                with self.assertRaises(redis.exceptions.NoPermissionError):
                    call(*args)
        self.assertEqual(admin.hget(hook.INCIDENT_KEY, "event_id"), "e-wd")


class WatchdogAdoptionTest(RedisTestCase):
    """What the watchdog does with an incident someone else opened (the hook's claim, or one
    planted with the hook's Redis user): heartbeats from the test, thresholds scaled down."""

    def setUp(self):
        super().setUp()
        self.logdir = tempfile.mkdtemp(prefix="eexit-hook-wd-")
        self.beaters, self.processes = [], []
        self.addCleanup(lambda: [b.stop() for b in self.beaters] + [stop_process(p) for p in self.processes])

    def start(self, **fields):
        self.beaters.append(Beater(self.redis_server.client(), **fields).start())
        self.processes.append(start_module("eexit.watchdog", python_env(**{**SCALED, "REDIS_URL": self.redis_server.url}),
                                           os.path.join(self.logdir, "watchdog.log")))
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= 3, 20, message="watchdog up")

    def log(self):
        return Path(self.logdir, "watchdog.log").read_text()

    def test_an_incident_of_an_earlier_outage_is_replaced(self):
        self.check_replaced(replay=False)

    def test_an_incident_of_an_earlier_outage_is_not_adopted_on_a_replayed_report(self):
        self.check_replaced(replay=True)

    def check_replaced(self, replay):
        used = "aaaaaaaa-1111-4111-8111-111111111111"
        self.redis.xadd(schema.PANIC_STREAM, {"event_id": used, "reason": "EXIT_BRAIN_DIED", "issued_by": "exit_brain"})
        self.redis.xadd(schema.COMPLETED_STREAM, {"event_id": used, "status": "FLAT"})
        # A human resumed after it (cleared_at on Redis's clock, later than the claim's opened_at).
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "cleared_by": "alice",
                                                          "cleared_at": str(bus.server_time_ms(self.redis))})
        self.start(active_positions=2)          # healthy heartbeats after that report
        self.redis.hsetnx(hook.INCIDENT_KEY, "event_id", used)
        self.redis.hsetnx(hook.INCIDENT_KEY, "opened_by", "hook")
        if replay:      # a replay of the used id: the EEW answers DUPLICATE, the watchdog sees a report
            self.redis.xadd(schema.COMPLETED_STREAM, {"event_id": used, "status": "DUPLICATE"})
            wait_for(lambda: "incident_closed" in self.log(), 20, message=f"dropped\n{self.log()}")
        self.beaters[0].stop()
        new = wait_for(lambda: [e for e in panics(self.redis) if e.event_id != used], 20,
                       message=f"a new panic\n{self.log()}")
        self.assertEqual([(e.issued_by, e.reason) for e in new], [("watchdog", "POSITIONS_UNGUARDED")])
        self.assertIn("event=incident_closed event_id=" + used + " why=resumed", self.log())
        self.assertEqual(self.redis.hget(hook.INCIDENT_KEY, "event_id").decode(), new[0].event_id)

    def test_a_claim_without_a_panic_is_published_at_once(self):
        claimed = "bbbbbbbb-2222-4222-8222-222222222222"
        self.start(active_positions=2)
        self.redis.hsetnx(hook.INCIDENT_KEY, "event_id", claimed)     # the hook died after its claim
        self.redis.hsetnx(hook.INCIDENT_KEY, "opened_at_ms", bus.server_time_ms(self.redis))
        self.beaters[0].stop()
        # SCALED re-publishes only after 30 s: a panic well before that is the at-once path.
        event = wait_for(lambda: panics(self.redis), 20, message=f"panic\n{self.log()}")[0]
        self.assertEqual((event.event_id, event.issued_by), (claimed, "watchdog"))


class KillBrainThroughHook(RedisTestCase):
    """The brain's death handled by the hook, and the watchdog as its backstop."""

    def setUp(self):
        super().setUp()
        self.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:3")
        self.url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.dir = tempfile.mkdtemp(prefix="eexit-hook-e2e-")
        self.processes = []
        self.addCleanup(lambda: [stop_process(p) for p in self.processes])
        self.hook = HookProcess(self)

    def start(self, module, **env):
        merged = {"REDIS_URL": self.redis_server.url, "EEXIT_EXCHANGE_URL": self.url,
                  "EEXIT_JOURNAL": os.path.join(self.dir, "journal.jsonl"), "EEXIT_CONSUMER": "eew-hook",
                  **EXCHANGE, **env}
        process = start_module(module, python_env(**merged), os.path.join(self.dir, module + ".log"))
        self.processes.append(process)
        return process

    def logs(self):
        return tail_logs(self.dir)

    def start_brain(self):
        before = self.redis.xlen(schema.HEARTBEAT_STREAM)
        brain = self.start("eexit.brain", EEXIT_BRAIN_INTERVAL_S="0.2")
        wait_for(lambda: self.redis.xlen(schema.HEARTBEAT_STREAM) > before and self.last_beat().status == "OK",
                 30, message=f"brain heartbeat OK\n{self.logs()}")
        return brain

    def start_stack(self, with_watchdog=True):
        self.start("eexit.eew", EEXIT_PANIC_HMAC_KEYS=EEW_KEYS)
        if with_watchdog:
            self.start("eexit.watchdog", **WATCHDOG)
        brain = self.start_brain()
        wait_for(lambda: self.last_beat().active_positions == 3, 20, message=f"3 positions\n{self.logs()}")
        wait_for(lambda: self.redis.xlen(schema.EEW_HEARTBEAT_STREAM), 20, message=f"EEW up\n{self.logs()}")
        if with_watchdog:
            wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM), 20, message=f"watchdog\n{self.logs()}")
        return brain

    def last_beat(self):
        entries = self.redis.xrevrange(schema.HEARTBEAT_STREAM, "+", "-", count=1)
        return schema.Heartbeat.from_fields(entries[0][1])[0] if entries else schema.Heartbeat.from_fields({})[0]

    def kill(self, brain):
        brain.send_signal(signal.SIGKILL)
        brain.wait(timeout=10)

    def panics(self):
        return [schema.PanicEvent.from_fields(raw)[0] for _id, raw in self.redis.xrange(schema.PANIC_STREAM)]

    def reports(self, event_id):
        return [r for r in (schema.CompletionReport.from_fields(raw)[0]
                            for _id, raw in self.redis.xrange(schema.COMPLETED_STREAM)) if r.event_id == event_id]

    def wait_flat(self, event_id):
        report = wait_for(lambda: (found := self.reports(event_id)) and found[0], 30,
                          message=f"report for {event_id}\n{self.logs()}")
        self.assertEqual(report.status, "FLAT", report)
        self.assertEqual(self.paper.positions(), {})
        return report

    def watchdog_log(self):
        return Path(self.dir, "eexit.watchdog.log").read_text()

    def wait_watchdog_acted(self, needle):
        """The watchdog logged `needle`, and then finished that step: a heartbeat of its own
        published after the line (it beats after acting in the same step)."""
        wait_for(lambda: needle in self.watchdog_log(), 30, message=f"{needle}\n{self.logs()}")
        seen = self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM)
        wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) > seen + 1, 30,
                 message=f"watchdog heartbeat after {needle}\n{self.logs()}")

    def test_kill_9_one_panic_from_the_hook_one_flat_report_one_incident(self):
        brain = self.start_stack()
        self.kill(brain)
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 0, err)
        (event,) = self.panics()
        self.assertEqual((event.issued_by, event.reason), ("exit_brain", "EXIT_BRAIN_DIED"))
        self.wait_flat(event.event_id)
        # The watchdog's rule fires later (the heartbeat stopped) and must add no event id.
        self.wait_watchdog_acted("reason=POSITIONS_UNGUARDED")
        self.assertEqual([p.event_id for p in self.panics()], [event.event_id], self.logs())
        self.assertEqual([r.status for r in self.reports(event.event_id)], ["FLAT"])
        self.assertEqual(self.redis.hget(hook.INCIDENT_KEY, "event_id").decode(), event.event_id)
        self.assertEqual(self.redis.hget(hook.INCIDENT_KEY, "opened_by"), b"hook")
        self.assertIn(event.event_id, self.watchdog_log())   # adopted, not a second incident
        halt, _ = schema.TradingState.from_fields(self.redis.hgetall(schema.TRADING_STATE_KEY))
        self.assertEqual((halt.halted, halt.event_id), (True, event.event_id))

    def test_deliberate_stop_publishes_nothing_and_the_watchdog_still_fires(self):
        brain = self.start_stack()
        brain.send_signal(signal.SIGTERM)
        self.assertEqual(brain.wait(timeout=20), 0)
        code, err = self.hook.run(self.redis_server.url, STOPPED)
        self.assertEqual(code, 0, err)
        self.assertIn("why=success", err)
        # The watchdog may already have fired while the brain was stopping: either way it is
        # its panic and its incident, and the hook added nothing.
        panic = wait_for(self.panics, 30, message=f"watchdog panic\n{self.logs()}")[0]
        self.assertEqual((panic.issued_by, panic.reason), ("watchdog", "POSITIONS_UNGUARDED"))
        self.wait_flat(panic.event_id)
        self.assertEqual(self.redis.hget(hook.INCIDENT_KEY, "opened_by"), b"watchdog")
        self.assertEqual({p.event_id for p in self.panics()}, {panic.event_id})

    def test_redis_unreachable_for_the_hook_the_watchdog_catches_it(self):
        brain = self.start_stack()
        self.kill(brain)
        with socket.socket() as stall:
            stall.bind(("127.0.0.1", 0))
            stall.listen(1)
            code, err = self.hook.run(f"redis://127.0.0.1:{stall.getsockname()[1]}", KILLED)
        self.assertEqual(code, hook.EXIT_TIMEOUT, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        panic = wait_for(self.panics, 30, message=f"watchdog panic\n{self.logs()}")[0]
        self.assertEqual((panic.issued_by, panic.reason), ("watchdog", "POSITIONS_UNGUARDED"))
        self.wait_flat(panic.event_id)

    def test_crash_restart_crash_within_the_latch_is_one_panic(self):
        brain = self.start_stack(with_watchdog=False)
        self.kill(brain)
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 0, err)
        (event,) = self.panics()
        self.wait_flat(event.event_id)
        for _crash in range(2):      # systemd restarts it; it dies again; nobody resumed
            brain = self.start_brain()
            self.kill(brain)
            code, err = self.hook.run(self.redis_server.url, KILLED)
            self.assertEqual(code, 0, err)
            self.assertIn(f"why=latched held_by_event={event.event_id}", err)
        self.assertEqual([p.event_id for p in self.panics()], [event.event_id])
        self.assertEqual(len(self.reports(event.event_id)), 1)


if __name__ == "__main__":
    unittest.main()

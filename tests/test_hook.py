"""The crash path's hook (eexit/hook.py) as the crash unit runs it, without systemd: the
parts that do not depend on systemd's behaviour (the latch, the atomic claim, Redis errors,
credentials, the ACL, the watchdog's adoption). What systemd does (ExecStopPost=, the crash
unit, its credentials, restarts, watchdog kills) is tested under the real systemd booted as
PID 1: tests/test_real_systemd.py. Here the hook runs as `python -m eexit.hook` with the
crash unit's Environment= lines and EEXIT_CRASH=<result>:<code>:<status> (its instance), a
credentials directory holding the files its LoadCredential= lines name.
Real EEW, watchdog, brain and paper exchange; no timed assertion (bench/ times it)."""

import json
import os
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
CRASH_UNIT = "eexit-brain-crash@.service"
WATCHDOG_KEY = "11" * 32
HOOK_KEY = "22" * 32
EEW_KEYS = f"wd1 watchdog {WATCHDOG_KEY},hk1 exit_brain {HOOK_KEY}"
EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret", "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}
WATCHDOG = {"EEXIT_UNGUARDED_S": "1.0", "EEXIT_HEARTBEAT_LOST_S": "2.0", "EEXIT_DEGRADED_S": "2.0",
            "EEXIT_STAGNANT_S": "30", "EEXIT_STARTUP_GRACE_S": "15", "EEXIT_REPUBLISH_S": "5",
            "EEXIT_PANIC_HMAC_KEYS": f"wd1 watchdog {WATCHDOG_KEY}"}
KILLED = "signal:killed:KILL"
STOPPED = "success:exited:0"


def crash_unit_env(instance):
    """The crash unit's Environment= assignments with %i = instance."""
    service = read_unit(CRASH_UNIT)["Service"]
    return dict(value.replace("%i", instance).split("=", 1) for value in service.get("Environment", []))


class HookProcess:
    """`python -m eexit.hook` with the crash unit's environment and a credentials directory."""

    def __init__(self, testcase, credentials=None):
        self.dir = tempfile.mkdtemp(prefix="eexit-hook-")
        testcase.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir], check=False))
        self.credentials = Path(self.dir) / "credentials"
        self.credentials.mkdir(mode=0o700)
        for name, value in {"hook_hmac_key": f"hk1 exit_brain {HOOK_KEY}\n", **(credentials or {})}.items():
            (self.credentials / name).write_text(value)

    def run(self, redis_url, instance, **env):
        merged = python_env(**{"REDIS_URL": redis_url, "CREDENTIALS_DIRECTORY": str(self.credentials),
                               **crash_unit_env(instance), **env})
        done = subprocess.run([sys.executable, "-m", "eexit.hook"], env=merged, capture_output=True,
                              text=True, timeout=60)
        return done.returncode, done.stderr


class LatchTest(unittest.TestCase):
    """The pure decisions, every branch."""

    def state(self, **fields):
        return schema.TradingState.from_fields(fields)[0]

    def test_latched_only_by_a_halt_naming_an_event(self):
        self.assertTrue(hook.latched(self.state(halted="true", event_id="e1")))
        for state in (self.state(halted="true"), self.state(), None,
                      self.state(halted="false", event_id="e1", cleared_by="ann", cleared_at="2000")):
            with self.subTest(state=state):
                self.assertFalse(hook.latched(state))

    def test_a_held_claim_is_an_earlier_outage_only_when_executed_and_resumed(self):
        resumed = self.state(halted="false", event_id="e1", cleared_by="ann", cleared_at="2000")
        cases = [(resumed, True, hook.EARLIER_OUTAGE), (None, True, hook.EARLIER_OUTAGE),
                 (self.state(), True, hook.EARLIER_OUTAGE),
                 (resumed, False, hook.ADOPTED),        # never executed: its publisher died
                 (resumed, None, hook.ADOPTED),         # record unreadable: re-publish (dedup-safe)
                 (self.state(halted="true"), True, hook.ADOPTED)]
        for state, processed, expected in cases:
            with self.subTest(state=state, processed=processed):
                self.assertEqual(hook.after_lost_claim(state, processed), expected)

    def test_service_facts(self):
        facts = {"service_result": "signal", "exit_code": "killed", "exit_status": "KILL"}
        self.assertEqual(hook.service_facts({"EEXIT_CRASH": KILLED}), facts)
        self.assertEqual(hook.service_facts({"SERVICE_RESULT": "signal", "EXIT_CODE": "killed",
                                             "EXIT_STATUS": "KILL"}), facts)
        self.assertEqual(hook.service_facts({"EEXIT_CRASH": "watchdog:none:none"}),
                         {"service_result": "watchdog", "exit_code": "", "exit_status": ""})
        self.assertEqual(hook.service_facts({}), {"service_result": "", "exit_code": "", "exit_status": ""})

    def test_units_wire_the_crash_path(self):
        brain = read_unit("eexit-brain.service")["Service"]
        text = (ROOT / "systemd/eexit-brain.service").read_text().replace("\\\n", " ")
        (line,) = [raw[len("ExecStopPost="):] for raw in text.splitlines() if raw.startswith("ExecStopPost=")]
        self.assertTrue(line.startswith("+/bin/sh -c "), line)
        self.assertIn("eexit-brain-crash@", line)
        credentials = {v.split(":")[0] for v in brain["LoadCredential"]}
        self.assertFalse({"hook_hmac_key", "redis_hook_password"} & credentials, "the brain holds no hook key")
        crash = read_unit(CRASH_UNIT)
        service = crash["Service"]
        self.assertEqual(service["ExecStart"], ["/opt/eexit/venv/bin/python -m eexit.hook"])
        self.assertEqual(service["Type"], ["oneshot"])
        self.assertEqual(service["SetCredential"], ["redis_username:eexit-hook"])
        sources = {v.split(":", 1)[0]: v.split(":", 1)[1] for v in service["LoadCredential"]}
        self.assertEqual(set(sources), {"hook_hmac_key", "redis_password"})
        for path in sources.values():          # the paths the trigger names when the unit fails
            self.assertIn(path, line)
        timeout = float(crash_unit_env(KILLED)["EEXIT_HOOK_TIMEOUT_S"])
        self.assertLess(timeout * 2, float(brain["TimeoutStopSec"][0]))
        self.assertLess(timeout * 2, float(service["TimeoutStartSec"][0]))
        self.assertNotIn("Install", crash)


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
        incident = {k.decode(): v.decode() for k, v in self.redis.hgetall(schema.INCIDENT_KEY).items()}
        self.assertEqual((incident["event_id"], incident["opened_by"], incident["issued_by"]),
                         (event.event_id, "hook", "exit_brain"))
        self.assertEqual(len([line for line in err.splitlines() if line.strip()]), 1, err)
        self.assertIn("event=panic_published", err)

    def test_success_publishes_nothing(self):
        code, err = self.hook.run(self.redis_server.url, STOPPED)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.panics(), [])
        self.assertFalse(self.redis.exists(schema.INCIDENT_KEY))
        self.assertIn("why=success", err)

    def test_latched_halt_publishes_nothing(self):
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "e-old"})
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual((code, self.panics()), (0, []), err)
        self.assertIn("why=latched held_by_event=e-old", err)

    def test_an_open_incident_is_republished_under_its_own_id(self):
        """Issue 26 findings 4-5: the holder's panic may never have been published (its
        publisher died after claiming): re-publishing its id runs it, or is answered DUPLICATE."""
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "cleared_at": "1"})
        self.redis.hset(schema.INCIDENT_KEY, mapping={"event_id": "e-wd", "opened_by": "watchdog"})
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 0, err)
        (event,) = self.panics()
        self.assertEqual((event.event_id, event.issued_by, event.extra["kid"]), ("e-wd", "exit_brain", "hk1"))
        self.assertIn("incident=adopted", err)
        self.assertEqual(self.redis.hget(schema.INCIDENT_KEY, "opened_by"), b"watchdog")

    def test_incident_executed_before_a_resume_gets_a_new_panic(self):
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "event_id": "e-old",
                                                           "cleared_by": "ann", "cleared_at": "5000"})
        self.redis.hset(schema.INCIDENT_KEY, mapping={"event_id": "e-old", "opened_at_ms": "99999999999999"})
        self.redis.hset(schema.PROCESSED_KEY, "e-old", '{"stage": "claimed"}')     # in flight: adopt
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual((code, [e.event_id for e in self.panics()]), (0, ["e-old"]), err)
        self.redis.delete(schema.PANIC_STREAM)
        self.redis.hset(schema.PROCESSED_KEY, "e-old", '{"stage": "done", "status": "FLAT"}')
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 0, err)
        (event,) = self.panics()
        self.assertNotEqual(event.event_id, "e-old")
        self.assertIn("incident=earlier_outage", err)

    def test_claim_and_panic_are_one_step(self):
        """The incident holds the panic's entry id and Redis's time: no claim without a panic."""
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 0, err)
        (entry_id, raw), = self.redis.xrange(schema.PANIC_STREAM)
        incident = bus.decoded(self.redis.hgetall(schema.INCIDENT_KEY))
        self.assertEqual(incident["entry_id"], entry_id.decode())
        # Redis's clock (TIME inside the script), the one the stream ids come from.
        self.assertLessEqual(abs(int(incident["opened_at_ms"]) - int(entry_id.decode().split("-")[0])), 1000)
        self.redis.delete(schema.PANIC_STREAM, schema.INCIDENT_KEY)
        self.redis.config_set("maxmemory", "1")          # the XADD is refused: no claim either
        self.addCleanup(self.redis.config_set, "maxmemory", "0")
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertNotEqual(code, 0, err)
        self.assertFalse(self.redis.exists(schema.INCIDENT_KEY), err)

    def test_unset_result_fails_closed(self):
        code, err = self.hook.run(self.redis_server.url, "")
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
        self.assertIn("level=CRITICAL event=redis_unreachable", err)

    def test_unreadable_credential_is_named_never_a_redis_error(self):
        """Issue 23: under ExecStopPost= the credential directory was inaccessible, and the
        PermissionError was logged as redis_unreachable. Reproduced by a directory of another
        user, mode 0700, read by root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH."""
        os.chown(self.hook.credentials, 65534, -1)
        merged = python_env(**{"REDIS_URL": self.redis_server.url, "CREDENTIALS_DIRECTORY": str(self.hook.credentials),
                               **crash_unit_env(KILLED)})
        done = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                               "eexit.hook"], env=merged, capture_output=True, text=True, timeout=60)
        os.chown(self.hook.credentials, 0, -1)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("level=CRITICAL event=hook_config_error", done.stderr)
        self.assertIn(str(self.hook.credentials / "hook_hmac_key"), done.stderr)
        self.assertNotIn("redis_unreachable", done.stderr)
        self.assertEqual(self.panics(), [])
        (self.hook.credentials / "hook_hmac_key").unlink()
        (self.hook.credentials / "hook_hmac_key").mkdir()
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual(code, 2, err)
        self.assertIn(str(self.hook.credentials / "hook_hmac_key"), err)

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
                self.assertIn("event=hook_config_error", err)
        (self.hook.credentials / "hook_hmac_key").write_text(f"wd1 watchdog {WATCHDOG_KEY}\n")
        code, err = self.hook.run(self.redis_server.url, KILLED)
        self.assertEqual((code, self.panics()), (2, []), err)
        self.assertIn("exit_brain", err)

    def test_import_path_is_small(self):
        probe = ("import sys, eexit.hook; print(sorted(m for m in sys.modules if m == 'ccxt' "
                 "or m.startswith('eexit.')))")
        out = subprocess.run([sys.executable, "-c", probe], env=python_env(), capture_output=True,
                             text=True, timeout=60, check=True).stdout
        self.assertEqual(out.strip(), str(["eexit.bus", "eexit.config", "eexit.hook", "eexit.log",
                                           "eexit.schema", "eexit.signing"]))


def brain_stop_post_shell(fifo_dir):
    """The brain unit's ExecStopPost= shell text as systemd hands it to /bin/sh ($$ -> $,
    \\" -> "), the listener's runtime directory replaced by fifo_dir."""
    text = (ROOT / "systemd/eexit-brain.service").read_text().replace("\\\n", " ")
    (line,) = [raw[len("ExecStopPost="):] for raw in text.splitlines() if raw.startswith("ExecStopPost=")]
    script = line[len("+/bin/sh -c '"):-1].replace("$$", "$").replace('\\"', '"')
    return script.replace("/run/eexit-crash-listener", str(fifo_dir))


class CrashListenerTest(RedisTestCase):
    """`python -m eexit.crash_listener` against a real Redis, driven by the brain unit's own
    ExecStopPost= shell text (what systemd's part does is tested in test_real_systemd.py)."""

    def setUp(self):
        super().setUp()
        self.hook = HookProcess(self)
        self.fifo_dir = Path(self.hook.dir) / "run"
        self.fifo_dir.mkdir(mode=0o700)
        env = python_env(REDIS_URL=self.redis_server.url, CREDENTIALS_DIRECTORY=str(self.hook.credentials),
                         RUNTIME_DIRECTORY=str(self.fifo_dir), EEXIT_HOOK_TIMEOUT_S="5")
        self.log = Path(self.hook.dir) / "listener.log"
        self.listener = start_module("eexit.crash_listener", env, self.log)
        self.addCleanup(stop_process, self.listener)
        wait_for(lambda: "event=ready" in self.log.read_text(), 60, message="the listener READY")

    def stop_post(self, result, code, status):
        env = {"PATH": os.environ["PATH"], "SERVICE_RESULT": result, "EXIT_CODE": code, "EXIT_STATUS": status}
        return subprocess.run(["/bin/sh", "-c", brain_stop_post_shell(self.fifo_dir)], env=env,
                              capture_output=True, text=True, timeout=60)

    def test_fifos_are_owner_only(self):
        for name in ("request", "reply"):
            mode = (self.fifo_dir / name).stat().st_mode
            self.assertEqual((oct(mode & 0o777), bool(mode & 0o010000)), ("0o600", True), name)

    def test_the_brains_shell_gets_0_and_the_listener_publishes_one_signed_panic(self):
        done = self.stop_post("signal", "killed", "KILL")
        self.assertEqual((done.returncode, done.stdout), (0, ""), done.stderr)
        (raw,) = [fields for _id, fields in self.redis.xrange(schema.PANIC_STREAM)]
        event = schema.PanicEvent.from_fields(raw)[0]
        self.assertEqual((event.issued_by, event.reason, event.extra["kid"]), ("exit_brain", "EXIT_BRAIN_DIED", "hk1"))
        context = json.loads(event.extra["context"])
        self.assertEqual((context["hook"], context["service_result"], context["exit_status"]),
                         ("crash-listener", "signal", "KILL"))
        self.assertIn(f"event=panic_published event_id={event.event_id}", self.log.read_text())
        # The same crash again (the incident is open): the same event id, which the EEW answers DUPLICATE.
        self.assertEqual(self.stop_post("watchdog", "dumped", "ABRT").returncode, 0)
        self.assertEqual({schema.PanicEvent.from_fields(f)[0].event_id
                          for _id, f in self.redis.xrange(schema.PANIC_STREAM)}, {event.event_id})

    def test_a_deliberate_stop_sends_nothing(self):
        done = self.stop_post("success", "exited", "0")
        self.assertEqual((done.returncode, self.redis.xlen(schema.PANIC_STREAM)), (0, 0))
        self.assertNotIn("panic_", self.log.read_text())

    def test_a_hook_failure_is_a_miss_and_the_shell_falls_back(self):
        """The key turned malformed: the listener's hook answers 2 (naming the file), the shell
        logs crash_listener_missed and goes on to the oneshot (here `systemctl start` of a unit
        this host lacks fails: the CRITICAL line follows)."""
        (self.hook.credentials / "hook_hmac_key").write_text("not a key\n")
        done = self.stop_post("signal", "killed", "KILL")
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertEqual(self.redis.xlen(schema.PANIC_STREAM), 0)
        self.assertIn("event=hook_config_error", self.log.read_text())
        self.assertIn("event=crash_listener_missed answer=2", done.stdout)
        self.assertIn("event=crash_path_failed unit=eexit-brain-crash@signal:killed:KILL.service", done.stdout)

    def test_parse_requests_keeps_partial_lines_and_bounds_length(self):
        from eexit.crash_listener import MAX_LINE, parse_requests
        self.assertEqual(parse_requests(b"signal:killed:KILL\nwatch"), (["signal:killed:KILL"], b"watch"))
        facts, rest = parse_requests(b"x" * 1000 + b"\n" + b"y" * 1000)
        self.assertEqual((len(facts[0]), len(rest)), (MAX_LINE, MAX_LINE))


class HookAclTest(unittest.TestCase):
    """Under the shipped ACL (rendered as the installer does), as eexit-hook (the crash unit's
    SetCredential=/LoadCredential=): that user can do nothing but run the claim-and-publish
    script, add a panic, read the halt and one idempotency record."""

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
        hook_process = HookProcess(self, {"redis_password": password("eexit-hook"),
                                          "redis_username": "eexit-hook"})
        code, err = hook_process.run(self.server.url, KILLED)
        self.assertEqual(code, 0, err)
        self.assertEqual(admin.xlen(schema.PANIC_STREAM), 1)
        self.assertEqual(admin.hget(schema.INCIDENT_KEY, "opened_by"), "hook")
        clients = admin.acl_log()
        self.assertEqual([entry for entry in clients if entry.get("username") == "eexit-hook"], [])

    def test_everything_else_is_refused(self):
        admin = self.client("admin")
        admin.flushall()
        admin.hset(schema.INCIDENT_KEY, mapping={"event_id": "e-wd", "opened_by": "watchdog"})
        admin.xadd(schema.PANIC_STREAM, {"event_id": "e0"})
        admin.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0")
        c = self.client("eexit-hook")
        self.assertFalse(c.hsetnx(schema.INCIDENT_KEY, "event_id", "forged"))   # allowed, but cannot rewrite
        self.assertIsNone(c.hget("system:panic_close:processed", "e0"))
        self.assertEqual(bus.claim_and_publish(c, schema.INCIDENT_KEY, schema.PANIC_STREAM, "e1", {}, {"x": "1"}),
                         (False, "e-wd"))
        script = c.register_script("return redis.call('DEL', KEYS[1])")
        with self.assertRaises(redis.exceptions.ResponseError):      # the script runs as eexit-hook
            script(keys=[schema.INCIDENT_KEY])
        self.assertTrue(c.hgetall(schema.TRADING_STATE_KEY) == {})
        forbidden = [
            (c.hset, schema.INCIDENT_KEY, "event_id", "forged"),
            (c.delete, schema.INCIDENT_KEY),
            (c.hdel, schema.INCIDENT_KEY, "event_id"),
            (c.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (c.xadd, schema.HEARTBEAT_STREAM, {"status": "OK"}),
            (c.xadd, schema.COMPLETED_STREAM, {"event_id": "e0", "status": "FLAT"}),
            (c.xtrim, schema.PANIC_STREAM, 0),
            (c.xdel, schema.PANIC_STREAM, "0-1"),
            (c.xreadgroup, schema.EEW_GROUP, "x", {schema.PANIC_STREAM: ">"}),
            (c.xack, schema.PANIC_STREAM, schema.EEW_GROUP, "0-1"),
            (c.xrange, schema.COMPLETED_STREAM),
            (c.hgetall, "system:panic_close:processed"),
            (c.hset, "system:panic_close:processed", "e0", "x"),
            (c.eval, "return 1", 0),
            (c.function_list,),
            (c.config_get, "*"),
            (c.keys, "*"),
        ]
        for call, *args in forbidden:
            with self.subTest(command=call.__name__, args=args):
                with self.assertRaises(redis.exceptions.NoPermissionError):
                    call(*args)
        self.assertEqual(admin.hget(schema.INCIDENT_KEY, "event_id"), "e-wd")


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
        self.redis.hsetnx(schema.INCIDENT_KEY, "event_id", used)
        self.redis.hsetnx(schema.INCIDENT_KEY, "opened_by", "hook")
        if replay:      # a replay of the used id: the EEW answers DUPLICATE, the watchdog sees a report
            self.redis.xadd(schema.COMPLETED_STREAM, {"event_id": used, "status": "DUPLICATE"})
            wait_for(lambda: "incident_closed" in self.log(), 20, message=f"dropped\n{self.log()}")
        self.beaters[0].stop()
        new = wait_for(lambda: [e for e in panics(self.redis) if e.event_id != used], 20,
                       message=f"a new panic\n{self.log()}")
        self.assertEqual([(e.issued_by, e.reason) for e in new], [("watchdog", "POSITIONS_UNGUARDED")])
        self.assertIn("event=incident_closed event_id=" + used + " why=resumed", self.log())
        self.assertEqual(self.redis.hget(schema.INCIDENT_KEY, "event_id").decode(), new[0].event_id)

    def test_a_claim_without_a_panic_is_published_at_once(self):
        claimed = "bbbbbbbb-2222-4222-8222-222222222222"
        self.start(active_positions=2)
        self.redis.hsetnx(schema.INCIDENT_KEY, "event_id", claimed)     # the hook died after its claim
        self.redis.hsetnx(schema.INCIDENT_KEY, "opened_at_ms", bus.server_time_ms(self.redis))
        self.beaters[0].stop()
        # SCALED re-publishes only after 30 s: a panic well before that is the at-once path.
        event = wait_for(lambda: panics(self.redis), 20, message=f"panic\n{self.log()}")[0]
        self.assertEqual((event.event_id, event.issued_by), (claimed, "watchdog"))


class KillBrainThroughHook(RedisTestCase):
    """The brain's death handled by the hook, and the watchdog as its backstop. (kill -9 ->
    one panic from the crash path, FLAT, the watchdog adopting its id: under the real systemd,
    tests/test_real_systemd.py, where who comes first is systemd's timing, not this test's.)"""

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
        self.assertEqual(self.redis.hget(schema.INCIDENT_KEY, "opened_by"), b"watchdog")
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

"""The shipped Redis ACL (systemd/redis-acl.conf, rendered as tools/install_offline.py does)
on a real redis-server, through real redis-py clients: every daemon can do its job on its
keys, and every forbidden command gets NOPERM."""

import importlib.util
import tempfile
import unittest
from pathlib import Path

import redis

from eexit import bus, resume, schema, tamper
from eexit import ops as ops_module
from eexit.eew import Ledger
from tests.harness import RedisServer

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("install_offline", ROOT / "tools/install_offline.py")
install_offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_offline)

USERS = ("eexit-brain", "eexit-watchdog", "eexit-eew", "eexit-audit", "eexit-ops")
ADMIN = "test-admin"  # exists only in this test, to seed and inspect
WATCHDOG_INCIDENT = "eexit:watchdog:incident"
EEW_JOURNAL = "eexit:eew:progress:7c9e6679"


def password(user):
    return f"pw-{user}-not-a-real-secret"


class RedisAclTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        template = (ROOT / "systemd/redis-acl.conf").read_text()
        rendered = install_offline.render_acl(template, {user: password(user) for user in USERS})
        cls.rendered = rendered
        cls.directory = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.directory.cleanup)
        acl_path = Path(cls.directory.name) / "users.acl"
        acl_path.write_text(rendered + f"user {ADMIN} on >{password(ADMIN)} ~* &* +@all\n")
        cls.server = RedisServer(["--aclfile", str(acl_path)]).start()
        cls.addClassCleanup(cls.server.stop)

    def client(self, user):
        client = self.server.client(username=user, password=password(user), decode_responses=True)
        self.addCleanup(client.close)
        return client

    def setUp(self):
        self.admin = self.client(ADMIN)
        self.admin.flushall()
        self.admin.xadd(schema.HEARTBEAT_STREAM, {"status": "OK", "ts": "1"})
        self.admin.xadd(schema.PANIC_STREAM, {"event_id": "e0", "issued_by": "ops"})
        self.admin.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0")
        self.admin.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "reason": "test"})

    def assertNoPerm(self, call, *args, **kwargs):
        # redis-py raises NoPermissionError exactly for a NOPERM reply.
        with self.assertRaises(redis.exceptions.NoPermissionError):
            call(*args, **kwargs)

    def test_rendered_file_has_no_comment_and_no_placeholder(self):
        self.assertNotIn("@PASSWORD_HASH@", self.rendered)
        self.assertTrue(all(line.startswith("user ") for line in self.rendered.splitlines()))
        for user in USERS:
            self.assertNotIn(password(user), self.rendered)

    def test_default_user_is_off_and_wrong_passwords_fail(self):
        with self.assertRaises(redis.exceptions.AuthenticationError):
            self.server.client().ping()
        with self.assertRaises(redis.exceptions.AuthenticationError):
            self.server.client(username="eexit-brain", password="wrong").ping()

    def test_every_user_connects_with_redis_py_and_gets_server_time(self):
        for user in USERS:
            with self.subTest(user=user):
                client = self.client(user)
                self.assertTrue(client.ping())
                self.assertEqual(len(client.time()), 2)
                # A pooled client reconnects after Redis drops it; the handshake must pass again.
                client.connection_pool.disconnect()
                self.assertTrue(client.ping())
                via_url = redis.Redis.from_url(self.server.url.replace("redis://", f"redis://{user}:{password(user)}@"))
                self.addCleanup(via_url.close)
                self.assertTrue(via_url.ping())

    def test_brain(self):
        brain = self.client("eexit-brain")
        brain.xadd(schema.HEARTBEAT_STREAM, {"status": "OK", "ts": "2"}, maxlen=schema.HEARTBEAT_MAXLEN)
        self.assertEqual(brain.hget(schema.TRADING_STATE_KEY, "halted"), "true")
        self.assertEqual(brain.hgetall(schema.TRADING_STATE_KEY)["reason"], "test")
        forbidden = [
            (brain.xrange, schema.HEARTBEAT_STREAM),
            (brain.xadd, schema.PANIC_STREAM, {"event_id": "forged"}),
            (brain.xadd, schema.COMPLETED_STREAM, {"event_id": "forged"}),
            (brain.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (brain.delete, schema.TRADING_STATE_KEY),
            (brain.delete, schema.HEARTBEAT_STREAM),
            (brain.xtrim, schema.HEARTBEAT_STREAM, 0),
            (brain.xreadgroup, schema.EEW_GROUP, "x", {schema.PANIC_STREAM: ">"}),
            (brain.set, "anything", "1"),
            (brain.flushall,),
            (brain.config_get, "requirepass"),
            (brain.keys, "*"),
        ]
        self.check_forbidden(forbidden)

    def test_watchdog(self):
        watchdog = self.client("eexit-watchdog")
        self.assertEqual(len(watchdog.xrevrange(schema.HEARTBEAT_STREAM, count=1)), 1)
        self.assertIsNotNone(watchdog.xread({schema.HEARTBEAT_STREAM: "0"}, count=10, block=10))
        watchdog.xadd(schema.PANIC_STREAM, {"event_id": "e1", "issued_by": "watchdog"})
        watchdog.hset(WATCHDOG_INCIDENT, mapping={"open": "true", "event_id": "e1"})
        watchdog.set(WATCHDOG_INCIDENT + ":lock", "1", nx=True, px=5000)
        watchdog.xadd(schema.WATCHDOG_HEARTBEAT_STREAM, {"ts": "1"}, maxlen=100)
        watchdog.delete(WATCHDOG_INCIDENT)
        self.assertEqual(len(watchdog.xrevrange(schema.COMPLETED_STREAM, count=1)), 0)
        forbidden = [
            (watchdog.hget, schema.TRADING_STATE_KEY, "halted"),
            (watchdog.xreadgroup, schema.EEW_GROUP, "wd", {schema.PANIC_STREAM: ">"}),
            (watchdog.xack, schema.PANIC_STREAM, schema.EEW_GROUP, "0-1"),
            (watchdog.xgroup_create, schema.PANIC_STREAM, "rogue", "0"),
            (watchdog.xclaim, schema.PANIC_STREAM, schema.EEW_GROUP, "wd", 0, ["0-1"]),
            (watchdog.xadd, schema.HEARTBEAT_STREAM, {"status": "OK"}),
            (watchdog.xadd, schema.COMPLETED_STREAM, {"event_id": "e1"}),
            (watchdog.xdel, schema.PANIC_STREAM, "0-1"),
            (watchdog.xtrim, schema.PANIC_STREAM, 0),
            (watchdog.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (watchdog.delete, schema.PANIC_STREAM),
            (watchdog.set, "system:anything", "1"),
        ]
        self.check_forbidden(forbidden)

    def test_eew(self):
        eew = self.client("eexit-eew")
        eew.xgroup_create(schema.PANIC_STREAM, "second_group_after_restart", id="0")
        entries = eew.xreadgroup(schema.EEW_GROUP, "eew-1", {schema.PANIC_STREAM: ">"}, count=10, block=10)
        entry_id = entries[0][1][0][0]
        self.assertEqual(len(eew.xpending_range(schema.PANIC_STREAM, schema.EEW_GROUP, "-", "+", 10)), 1)
        eew.xclaim(schema.PANIC_STREAM, schema.EEW_GROUP, "eew-2", 0, [entry_id])
        eew.xinfo_groups(schema.PANIC_STREAM)
        eew.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "e0"})
        eew.hsetnx(schema.TRADING_STATE_KEY, "halted_at", "1")
        eew.hset(EEW_JOURNAL, mapping={"stage": "closing"})
        eew.set("eexit:eew:lock", "eew-1", nx=True, px=5000)
        eew.xadd(schema.EEW_HEARTBEAT_STREAM, {"ts": "1"}, maxlen=100)
        eew.xadd(schema.COMPLETED_STREAM, {"event_id": "e0", "status": "FLAT"})
        eew.delete(EEW_JOURNAL)
        self.assertEqual(eew.xack(schema.PANIC_STREAM, schema.EEW_GROUP, entry_id), 1)
        # The EEW's own ledger code (Lua scripts, MULTI/EXEC halt) under its ACL user.
        ledger = Ledger(eew)
        self.assertEqual(ledger.claim("e9", entry_id, "eew-1", 1)[0], "new")
        ledger.update("e9", {"entry": entry_id, "stage": "closing"})
        self.assertTrue(ledger.finish("e9", {"stage": "done"}, entry_id, {"event_id": "e9", "status": "FLAT"})[0])
        ledger.halt(schema.TradingState(halted=True, reason="POSITIONS_UNGUARDED", event_id="e9"))
        # The lost-panic checks and the resume path (eexit/tamper.py, eexit/resume.py).
        self.assertIsNotNone(tamper.read_stream_state(eew)[1])
        self.assertEqual(ledger.in_flight(), {})
        ledger.reject([entry_id], {"event_id": "rejected-x", "status": "REJECTED"})
        eew.xread({resume.REQUEST_STREAM: "0"}, count=1)
        with eew.pipeline(transaction=True) as pipe:
            pipe.watch(schema.TRADING_STATE_KEY)
            pipe.multi()
            pipe.hset(schema.TRADING_STATE_KEY, "halted", "false")
            pipe.xadd("eexit:ops:audit", {"action": "resume"})
            pipe.execute()
        forbidden = [
            (eew.delete, schema.TRADING_STATE_KEY),
            (eew.xadd, schema.PANIC_STREAM, {"event_id": "self-made"}),
            (eew.xadd, schema.HEARTBEAT_STREAM, {"status": "OK"}),
            (eew.xdel, schema.PANIC_STREAM, entry_id),
            (eew.xtrim, schema.COMPLETED_STREAM, 0),
            (eew.xgroup_destroy, schema.PANIC_STREAM, schema.EEW_GROUP),
            (eew.delete, schema.PANIC_STREAM),
            (eew.set, "eexit:watchdog:incident", "cleared"),
            (eew.flushdb,),
        ]
        self.check_forbidden(forbidden)

    def test_audit(self):
        audit = self.client("eexit-audit")
        self.assertEqual(len(audit.xread({schema.PANIC_STREAM: "0", schema.COMPLETED_STREAM: "0"}, count=10)), 1)
        audit.xrange(schema.HEARTBEAT_STREAM)
        audit.xinfo_groups(schema.PANIC_STREAM)
        audit.hgetall(schema.TRADING_STATE_KEY)
        audit.set("eexit:audit:cursor", "0-1")
        audit.xadd("eexit:audit:log", {"entry": "x"})
        # Its own group on the panic stream, as eexit.audit consumes it.
        self.assertTrue(bus.ensure_group(audit, schema.PANIC_STREAM, schema.AUDIT_GROUP))
        entries = bus.read_group(audit, schema.PANIC_STREAM, schema.AUDIT_GROUP, "audit-1", block_ms=10)
        bus.claim_idle(audit, schema.PANIC_STREAM, schema.AUDIT_GROUP, "audit-2", 0)
        self.assertEqual(audit.xack(schema.PANIC_STREAM, schema.AUDIT_GROUP, entries[0][0]), 1)
        forbidden = [
            (audit.xgroup_destroy, schema.PANIC_STREAM, schema.EEW_GROUP),
            (audit.xtrim, schema.PANIC_STREAM, 0),
            (audit.xadd, schema.PANIC_STREAM, {"event_id": "x"}),
            (audit.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (audit.set, "eexit:eew:lock", "stolen"),
            (audit.delete, schema.COMPLETED_STREAM),
        ]
        self.check_forbidden(forbidden)

    def test_ops(self):
        ops = self.client("eexit-ops")
        ops.xadd(schema.PANIC_STREAM, {"event_id": "e2", "issued_by": "ops"})
        self.assertEqual(ops.hget(schema.TRADING_STATE_KEY, "halted"), "true")
        ops.xadd(resume.REQUEST_STREAM, {"request_id": "r1", "action": "resume"})
        ops.xread({resume.VERDICT_STREAM: "0"}, block=10)
        ops.xrange(ops_module.OPS_AUDIT_STREAM)
        ops.xrevrange(schema.COMPLETED_STREAM, count=5)
        ops.xread({schema.COMPLETED_STREAM: "$"}, block=10)
        ops.xinfo_groups(schema.PANIC_STREAM)
        ops.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)
        ops.xrevrange(schema.HEARTBEAT_STREAM, count=1)
        ops.hgetall(WATCHDOG_INCIDENT)
        ops.scan(match="eexit:*")
        forbidden = [
            (ops.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (ops.hdel, schema.TRADING_STATE_KEY, "halted"),
            (ops.xadd, "eexit:ops:audit", {"action": "resume"}),
            (ops.xadd, resume.VERDICT_STREAM, {"status": "RESUMED"}),
            (ops.xreadgroup, schema.EEW_GROUP, "ops", {schema.PANIC_STREAM: ">"}),
            (ops.xack, schema.PANIC_STREAM, schema.EEW_GROUP, "0-1"),
            (ops.xtrim, schema.PANIC_STREAM, 0),
            (ops.xdel, schema.COMPLETED_STREAM, "0-1"),
            (ops.delete, schema.PANIC_STREAM),
            (ops.xadd, schema.COMPLETED_STREAM, {"event_id": "fake", "status": "FLAT"}),
            (ops.xadd, schema.HEARTBEAT_STREAM, {"status": "OK"}),
            (ops.flushall,),
            (ops.keys, "*"),
            (ops.config_set, "appendonly", "no"),
            (ops.acl_list,),
        ]
        self.check_forbidden(forbidden)

    def test_the_eew_is_the_only_writer_of_the_halt(self):
        for user in USERS:
            client = self.client(user)
            with self.subTest(user=user):
                self.check_forbidden([(client.delete, schema.TRADING_STATE_KEY)])
                if user == "eexit-eew":  # it halts, and executes resume requests (eexit/resume.py)
                    client.hset(schema.TRADING_STATE_KEY, "halted", "true")
                    client.xadd(resume.VERDICT_STREAM, {"status": "RESUMED"})
                    client.xadd("eexit:ops:audit", {"action": "resume"})
                    continue
                self.check_forbidden([(client.hset, schema.TRADING_STATE_KEY, "halted", "false"),
                                      (client.hdel, schema.TRADING_STATE_KEY, "halted"),
                                      (client.xadd, "eexit:ops:audit", {"action": "resume"})])

    def test_only_the_eew_and_audit_consume_the_panic_stream(self):
        for user in USERS:
            client = self.client(user)
            with self.subTest(user=user):
                if user in ("eexit-eew", "eexit-audit"):
                    client.xreadgroup(schema.EEW_GROUP, "eew-1", {schema.PANIC_STREAM: ">"}, count=1)
                else:
                    self.check_forbidden([
                        (client.xreadgroup, schema.EEW_GROUP, "rogue", {schema.PANIC_STREAM: ">"}),
                        (client.xack, schema.PANIC_STREAM, schema.EEW_GROUP, "0-1"),
                        (client.xgroup_destroy, schema.PANIC_STREAM, schema.EEW_GROUP)])

    def check_forbidden(self, calls):
        for call, *args in calls:
            with self.subTest(command=call.__name__, args=repr(args)[:60]):
                self.assertNoPerm(call, *args)
        # State the forbidden calls could have changed is unchanged.
        groups = [group["name"] for group in self.admin.xinfo_groups(schema.PANIC_STREAM)]
        self.assertIn(schema.EEW_GROUP, groups)


if __name__ == "__main__":
    unittest.main()

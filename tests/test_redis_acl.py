"""The shipped Redis ACL (systemd/redis-acl.conf, rendered as tools/install_offline.py does)
on a real redis-server, through real redis-py clients: every daemon can do its job on its
keys, and every forbidden command gets NOPERM. Also eexit's own Redis instance
(systemd/redis-eexit.conf) with the trading bot's user."""

import unittest
from pathlib import Path

import redis

from eexit import bus, resume, schema, tamper
from eexit import ops as ops_module
from eexit.eew import Ledger
from tests.acl_harness import ADMIN, ROOT, USERS, password, write_acl_file
from tests.harness import RedisServer

WATCHDOG_INCIDENT = "eexit:watchdog:incident"
EEW_JOURNAL = "eexit:eew:progress:7c9e6679"
BUSY_FUNCTION = "#!lua name=busy\nredis.register_function('spin', function() while true do end end)"


class RedisAclTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        server = RedisServer()
        acl_path = Path(server.dir) / "users.acl"
        cls.rendered = write_acl_file(acl_path)
        server.extra_args = ["--aclfile", str(acl_path)]
        cls.server = server.start()
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
                if user != "eexit-bot":          # PING and the halt, nothing else
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
        brain.hset("exit_brain:guard", "exit_brain", "{}")          # its guard state: its own key only
        self.assertEqual(brain.hget("exit_brain:guard", "exit_brain"), "{}")
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
            (brain.hset, "exit_brain:other", "x", "1"),
            (brain.delete, "exit_brain:guard"),
            (brain.flushall,),
            (brain.config_get, "requirepass"),
            (brain.keys, "*"),
        ]
        self.check_forbidden(forbidden)

    def test_alert_notifier_only_reads(self):
        notifier = self.client("eexit-alert")
        followed = [schema.PANIC_STREAM, schema.COMPLETED_STREAM, "eexit:ops:audit", schema.HEARTBEAT_STREAM,
                    schema.EEW_HEARTBEAT_STREAM, schema.WATCHDOG_HEARTBEAT_STREAM]
        self.assertIsNotNone(notifier.xread({stream: "0" for stream in followed}, count=10, block=10))
        for stream in followed:
            notifier.xrange(stream, count=1)
            notifier.xrevrange(stream, count=1)
        notifier.xinfo_stream(schema.PANIC_STREAM)
        self.assertEqual(notifier.hgetall(schema.TRADING_STATE_KEY)["halted"], "true")
        notifier.xadd("eexit:alert:heartbeat", {"status": "OK"}, maxlen=schema.HEARTBEAT_MAXLEN)
        forbidden = [
            (notifier.xreadgroup, schema.EEW_GROUP, "alert", {schema.PANIC_STREAM: ">"}),
            (notifier.xgroup_create, schema.PANIC_STREAM, "alert_group", "0"),
            (notifier.xack, schema.PANIC_STREAM, schema.EEW_GROUP, "0-1"),
            (notifier.xclaim, schema.PANIC_STREAM, schema.EEW_GROUP, "alert", 0, ["0-1"]),
            (notifier.xinfo_groups, schema.PANIC_STREAM),
            (notifier.xadd, schema.PANIC_STREAM, {"event_id": "forged"}),
            (notifier.xadd, schema.COMPLETED_STREAM, {"event_id": "forged"}),
            (notifier.xadd, schema.HEARTBEAT_STREAM, {"status": "OK"}),
            (notifier.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (notifier.xtrim, schema.PANIC_STREAM, 0),
            (notifier.delete, "eexit:alert:heartbeat"),
            (notifier.xread, {"system:panic_close:processed": "0"}),
            (notifier.keys, "*"),
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
        self.assertEqual(bus.claim_incident(watchdog, WATCHDOG_INCIDENT, {"event_id": "e2"}), ("e2", True))
        watchdog.delete(WATCHDOG_INCIDENT)
        self.assertEqual(len(watchdog.xrevrange(schema.COMPLETED_STREAM, count=1)), 0)
        self.assertIn("halted", watchdog.hgetall(schema.TRADING_STATE_KEY))    # read-only: a resume ends its incident
        forbidden = [
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

    def test_risk_kernel(self):
        """eexit-risk: publishes panics and writes its own state, events and heartbeat; reads
        the halt and the rebase requests; nothing else (issue 25)."""
        from eexit import daemon, risk
        kernel = self.client("eexit-risk")
        daemon.preflight(kernel, risk.PROBES)
        kernel.xadd(schema.PANIC_STREAM, {"event_id": "r1", "issued_by": "risk_kernel"})
        kernel.set(risk.STATE_KEY, "{}")
        self.assertEqual(kernel.get(risk.STATE_KEY), "{}")
        kernel.xadd(risk.EVENTS_STREAM, {"kind": "baseline"})
        kernel.xadd(risk.HEARTBEAT_STREAM, {"status": "OK"})
        self.assertEqual(kernel.hgetall(schema.TRADING_STATE_KEY)["halted"], "true")
        self.client("eexit-ops").xadd(risk.REBASE_STREAM, {"request_id": "q1"})
        self.assertEqual(len(kernel.xread({risk.REBASE_STREAM: "0-0"})[0][1]), 1)
        self.assertNoPerm(kernel.xadd, risk.REBASE_STREAM, {"request_id": "forged"})
        self.assertNoPerm(kernel.hset, schema.TRADING_STATE_KEY, "halted", "false")
        self.assertNoPerm(kernel.xreadgroup, schema.EEW_GROUP, "x", {schema.PANIC_STREAM: ">"})
        self.assertNoPerm(kernel.xtrim, schema.PANIC_STREAM, maxlen=0)
        self.assertNoPerm(kernel.delete, risk.STATE_KEY)
        self.assertNoPerm(kernel.set, WATCHDOG_INCIDENT, "x")
        # It opens the shared incident as the hook does (claim and panic in one script), and
        # can never rewrite or delete an open one.
        won, _entry = bus.claim_and_publish(kernel, WATCHDOG_INCIDENT, schema.PANIC_STREAM, "r2",
                                            {"opened_by": "risk_kernel"}, {"event_id": "r2"})
        self.assertTrue(won)
        self.assertEqual(kernel.hget(WATCHDOG_INCIDENT, "event_id"), "r2")
        self.assertNoPerm(kernel.hset, WATCHDOG_INCIDENT, "event_id", "r3")
        self.assertNoPerm(kernel.delete, WATCHDOG_INCIDENT)
        self.assertIsNone(kernel.hget(schema.PROCESSED_KEY, "r2"))
        self.assertNoPerm(kernel.xadd, schema.COMPLETED_STREAM, {"event_id": "r1"})
        # Only the kernel writes its state: not ops, not the watchdog.
        self.assertNoPerm(self.client("eexit-ops").set, risk.STATE_KEY, "{}")
        self.assertNoPerm(self.client("eexit-watchdog").set, risk.STATE_KEY, "{}")
        self.assertEqual(len(self.client("eexit-alert").xrange(risk.EVENTS_STREAM)), 1)

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
        ledger.report({"event_id": "rejected-x", "status": "REJECTED"}, entry_ids=[entry_id])
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
        # How eexit.audit follows the streams: one XREAD from its file's cursors.
        self.assertEqual(len(audit.xread({schema.PANIC_STREAM: "0", schema.COMPLETED_STREAM: "0"}, count=10)), 1)
        audit.xrevrange(schema.COMPLETED_STREAM, count=1)
        audit.xrange(schema.HEARTBEAT_STREAM)
        audit.xinfo_groups(schema.PANIC_STREAM)
        audit.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)
        audit.hgetall(schema.TRADING_STATE_KEY)
        audit.time()
        forbidden = [
            (audit.xreadgroup, "audit_logger", "audit-1", {schema.PANIC_STREAM: ">"}),
            (audit.xgroup_create, schema.PANIC_STREAM, "audit_logger", "0"),
            (audit.xgroup_destroy, schema.PANIC_STREAM, schema.EEW_GROUP),
            (audit.xtrim, schema.PANIC_STREAM, 0),
            (audit.xadd, schema.PANIC_STREAM, {"event_id": "x"}),
            (audit.hset, schema.TRADING_STATE_KEY, "halted", "false"),
            (audit.set, "eexit:eew:lock", "stolen"),
            (audit.set, "eexit:audit:cursor", "0-1"),
            (audit.xadd, "eexit:audit:log", {"entry": "x"}),
            (audit.delete, schema.COMPLETED_STREAM),
        ]
        self.check_forbidden(forbidden)

    def test_audit_password_cannot_take_skip_reposition_or_ack_a_panic(self):
        """Issue 14, measured attack 2: with the audit password, NOACK reads, XGROUP CREATE ... $
        before the EEW's first start, and XACK mid-close are all NOPERM, and nothing changed."""
        audit = self.client("eexit-audit")
        eew = self.client("eexit-eew")
        [[_stream, [(entry_id, _fields)]]] = eew.xreadgroup(schema.EEW_GROUP, "eew-1", {schema.PANIC_STREAM: ">"})
        before = self.admin.xinfo_groups(schema.PANIC_STREAM)
        self.check_forbidden([
            # NOACK read in the EEW's group (takes the entry without leaving it pending)
            (audit.xreadgroup, schema.EEW_GROUP, "thief", {schema.PANIC_STREAM: ">"}, 20, None, True),
            (audit.xreadgroup, schema.EEW_GROUP, "thief", {schema.PANIC_STREAM: "0"}),
            # XACK of the entry the EEW is closing
            (audit.xack, schema.PANIC_STREAM, schema.EEW_GROUP, entry_id),
            # repositioning the group
            (audit.xgroup_setid, schema.PANIC_STREAM, schema.EEW_GROUP, "$"),
            (audit.xgroup_createconsumer, schema.PANIC_STREAM, schema.EEW_GROUP, "thief"),
            (audit.xclaim, schema.PANIC_STREAM, schema.EEW_GROUP, "thief", 0, [entry_id]),
            (audit.xautoclaim, schema.PANIC_STREAM, schema.EEW_GROUP, "thief", 0),
        ])
        self.assertEqual(before, self.admin.xinfo_groups(schema.PANIC_STREAM))
        self.assertEqual(1, self.admin.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)["pending"])
        # Before the EEW ever ran: no group yet; creating it at $ would skip this panic.
        self.admin.xgroup_destroy(schema.PANIC_STREAM, schema.EEW_GROUP)
        self.check_forbidden([
            (audit.xgroup_create, schema.PANIC_STREAM, schema.EEW_GROUP, "$", True),
            (audit.xgroup_create, "system:panic_close:new", schema.EEW_GROUP, "$", True),
        ], group_must_exist=False)
        self.assertEqual([], self.admin.xinfo_groups(schema.PANIC_STREAM))
        self.assertEqual(0, self.admin.exists("system:panic_close:new"))

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

    def test_only_the_eew_consumes_the_panic_stream(self):
        for user in USERS:
            client = self.client(user)
            with self.subTest(user=user):
                if user == "eexit-eew":
                    client.xreadgroup(schema.EEW_GROUP, "eew-1", {schema.PANIC_STREAM: ">"}, count=1)
                else:
                    self.check_forbidden([
                        (client.xreadgroup, schema.EEW_GROUP, "rogue", {schema.PANIC_STREAM: ">"}),
                        (client.xack, schema.PANIC_STREAM, schema.EEW_GROUP, "0-1"),
                        (client.xgroup_create, schema.PANIC_STREAM, "rogue", "$"),
                        (client.xgroup_setid, schema.PANIC_STREAM, schema.EEW_GROUP, "$"),
                        (client.xclaim, schema.PANIC_STREAM, schema.EEW_GROUP, "rogue", 0, ["0-1"]),
                        (client.xgroup_destroy, schema.PANIC_STREAM, schema.EEW_GROUP)])

    def test_bot(self):
        """The trading bot's user: PING and read the halt; FUNCTION, EVAL, SCAN and every write
        are NOPERM (issue 14, measured attack 5)."""
        bot = self.client("eexit-bot")
        self.assertTrue(bot.ping())
        self.assertEqual("true", bot.hget(schema.TRADING_STATE_KEY, "halted"))
        self.assertEqual("test", bot.hgetall(schema.TRADING_STATE_KEY)["reason"])
        self.check_forbidden(bot_forbidden(bot))

    def check_forbidden(self, calls, group_must_exist=True):
        for call, *args in calls:
            with self.subTest(command=call.__name__, args=repr(args)[:60]):
                self.assertNoPerm(call, *args)
        if group_must_exist:
            # State the forbidden calls could have changed is unchanged.
            groups = [group["name"] for group in self.admin.xinfo_groups(schema.PANIC_STREAM)]
            self.assertIn(schema.EEW_GROUP, groups)


def bot_forbidden(bot):
    return [
        (bot.function_load, BUSY_FUNCTION),
        (bot.function_list,),
        (bot.fcall, "spin", 0),
        (bot.eval, "while true do end", 0),
        (bot.eval, "return 1", 0),
        (bot.script_load, "return 1"),
        (bot.scan,),
        (bot.keys, "*"),
        (bot.set, "bot:fill", "x" * 1000),
        (bot.xadd, "bot:stream", {"x": "y"}),
        (bot.xadd, schema.PANIC_STREAM, {"event_id": "bot"}),
        (bot.hset, schema.TRADING_STATE_KEY, "halted", "false"),
        (bot.hset, "bot:hash", "a", "b"),
        (bot.delete, schema.TRADING_STATE_KEY),
        (bot.xrange, schema.PANIC_STREAM),
        (bot.hget, schema.PROCESSED_KEY, "e0"),
        (bot.get, "eexit:eew:lock"),
        (bot.publish, "channel", "x"),
        (bot.config_get, "maxmemory"),
        (bot.time,),
        (bot.info,),
        (bot.client_list,),
        (bot.object, "encoding", schema.TRADING_STATE_KEY),
    ]


class EexitRedisInstanceTest(unittest.TestCase):
    """systemd/redis-eexit.conf as shipped, only its paths and port moved into a temp dir, with
    the rendered ACL: durable, bounded, noeviction, and the bot can read the halt and nothing
    that harms eexit, on TCP and on the unix socket."""

    MOVED = ("bind", "port", "unixsocket", "aclfile", "dir", "logfile", "pidfile", "supervised")

    @classmethod
    def setUpClass(cls):
        server = RedisServer()
        directory = Path(server.dir)
        write_acl_file(directory / "users.acl")
        cls.socket = directory / "eexit.sock"
        shipped = (ROOT / "systemd/redis-eexit.conf").read_text().splitlines()
        kept = [line for line in shipped if line.split(" ")[0] not in cls.MOVED]
        moved = [f"bind 127.0.0.1", f"port {server.port}", f"unixsocket {cls.socket}",
                 f"aclfile {directory / 'users.acl'}", f"dir {directory}",
                 f"logfile {directory / 'redis.log'}", f"pidfile {directory / 'redis.pid'}"]
        (directory / "redis-eexit.conf").write_text("\n".join(kept + moved) + "\n")
        # The harness passes its own --port/--dir first; the included file overrides them.
        server.extra_args = ["--include", str(directory / "redis-eexit.conf")]
        cls.server = server.start()
        cls.addClassCleanup(cls.server.stop)

    def client(self, user, **options):
        client = self.server.client(username=user, password=password(user), decode_responses=True, **options)
        self.addCleanup(client.close)
        return client

    def test_durable_bounded_noeviction(self):
        admin = self.client(ADMIN)
        config = admin.config_get("*")
        self.assertEqual("yes", config["appendonly"])
        self.assertEqual("everysec", config["appendfsync"])
        self.assertEqual(str(256 * 1024 * 1024), config["maxmemory"])
        self.assertEqual("noeviction", config["maxmemory-policy"])
        self.assertEqual("770", config["unixsocketperm"])
        with self.assertRaises(redis.exceptions.AuthenticationError):
            self.server.client().ping()                  # the default user is off

    def test_bot_reads_the_halt_and_nothing_else(self):
        admin = self.client(ADMIN)
        admin.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "reason": "test"})
        admin.xadd(schema.PANIC_STREAM, {"event_id": "e0"})
        over_tcp = self.client("eexit-bot")
        over_socket = redis.Redis(unix_socket_path=str(self.socket), username="eexit-bot",
                                  password=password("eexit-bot"), decode_responses=True, socket_timeout=5)
        self.addCleanup(over_socket.close)
        for bot in (over_tcp, over_socket):
            with self.subTest(connection=bot.connection_pool.connection_class.__name__):
                self.assertTrue(bot.ping())
                self.assertEqual("true", bot.hget(schema.TRADING_STATE_KEY, "halted"))
                self.assertEqual({"halted": "true", "reason": "test"}, bot.hgetall(schema.TRADING_STATE_KEY))
                for call, *args in bot_forbidden(bot):
                    with self.subTest(command=call.__name__, args=repr(args)[:60]):
                        with self.assertRaises(redis.exceptions.NoPermissionError):
                            call(*args)
        self.assertEqual([], admin.function_list())
        self.assertEqual(["system:panic_close", "system:state:trading"], sorted(admin.keys("*")))
        self.assertEqual("true", admin.hget(schema.TRADING_STATE_KEY, "halted"))


if __name__ == "__main__":
    unittest.main()

"""Issue 14, the EEW's side, judged by outcome: a stolen Redis password of one eexit user
cannot suppress a panic or lift the halt. Redis runs the installer's rendered ACL; the real
brain, watchdog and EEW run under their own users against the paper exchange; the attacker
uses another user's password. Waits are for events (a report, a ledger stage), generous;
nothing here measures speed (bench/flood.py does)."""

import os
import signal
import tempfile
import unittest
from pathlib import Path

import redis

from eexit import schema, tamper
from eexit.paper import PaperExchange
from tests.harness import RedisServer, python_env, start_module, stop_process, tail_logs, wait_for
from tests.acl_harness import ADMIN, USERS, password, write_acl_file

SEED = "BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:3"
EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret", "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}
# The watchdog re-publishes only after a minute: a FLAT inside that minute is the EEW's doing.
WATCHDOG = {"EEXIT_UNGUARDED_S": "1.0", "EEXIT_HEARTBEAT_LOST_S": "2.0", "EEXIT_DEGRADED_S": "2.0",
            "EEXIT_STAGNANT_S": "30", "EEXIT_STARTUP_GRACE_S": "15", "EEXIT_REPUBLISH_S": "60"}
EEW = {"EEXIT_SWEEP_INTERVAL_S": "0.2", "EEXIT_BLOCK_MS": "100", "EEXIT_CLAIM_IDLE_MS": "1500",
       "EEXIT_BUS_LOSS_CLOSE_S": "0", "EEXIT_CLOSE_DEADLINE_S": "20"}
ATTACKS = {"maxlen_0": "*", "max_id": tamper.MAX_ID}     # XADD ... MAXLEN 0 <id> x y
USER_OF = {"eexit.brain": "eexit-brain", "eexit.watchdog": "eexit-watchdog", "eexit.eew": "eexit-eew"}


class TheftCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.directory.cleanup)
        acl_path = Path(cls.directory.name) / "users.acl"
        write_acl_file(acl_path)
        cls.server = RedisServer(["--aclfile", str(acl_path)]).start()
        cls.addClassCleanup(cls.server.stop)
        cls.paper = PaperExchange(seed=SEED)
        cls.paper_url = cls.paper.start()
        cls.addClassCleanup(cls.paper.stop)

    def setUp(self):
        self.admin = self.as_user(ADMIN)
        self.admin.flushall()
        self.paper.reset(seed=SEED)
        self.dir = tempfile.mkdtemp(prefix="eexit-theft-")
        self.processes = {}
        self.addCleanup(lambda: [stop_process(p) for p in self.processes.values()])

    def as_user(self, user):
        client = self.server.client(username=user, password=password(user))
        self.addCleanup(client.close)
        return client

    def start(self, module, **env):
        user = USER_OF[module]
        merged = {"REDIS_URL": self.server.url, "REDIS_USERNAME": user, "REDIS_PASSWORD": password(user),
                  "EEXIT_EXCHANGE_URL": self.paper_url, "EEXIT_JOURNAL": os.path.join(self.dir, "journal.jsonl"),
                  "EEXIT_CONSUMER": "eew-theft", **EXCHANGE, **(EEW if module == "eexit.eew" else {}), **env}
        process = start_module(module, python_env(**merged), os.path.join(self.dir, module + ".log"))
        self.processes[module] = process
        return process

    def stop(self, module):
        stop_process(self.processes.pop(module))

    def logs(self):
        return tail_logs(self.dir)

    def reports(self, status=None, reason=None):
        found = []
        for _id, raw in self.admin.xrange(schema.COMPLETED_STREAM):
            report, _ = schema.CompletionReport.from_fields(raw)
            if (status is None or report.status == status) and (reason is None or report.reason == reason):
                found.append(report)
        return found

    def wait_flat(self, reason=None, timeout_s=60):
        report = wait_for(lambda: (self.reports("FLAT", reason) or [None])[0], timeout_s,
                          message=f"a FLAT report{' for ' + reason if reason else ''}\n{self.logs()}")
        self.assertEqual(self.paper.positions(), {})
        halt, _ = schema.TradingState.from_fields(self.admin.hgetall(schema.TRADING_STATE_KEY))
        self.assertTrue(halt.halted)
        return report

    def guarded_stack(self):
        """Brain guarding the seeded positions, EEW consuming, watchdog watching."""
        self.start("eexit.brain", EEXIT_BRAIN_INTERVAL_S="0.2")
        self.start("eexit.eew")
        self.start("eexit.watchdog", **WATCHDOG)

        def guarding():
            last = self.admin.xrevrange(schema.HEARTBEAT_STREAM, count=1)
            beat = schema.Heartbeat.from_fields(last[0][1])[0] if last else None
            return beat is not None and beat.status == "OK" and beat.active_positions == 3 and \
                self.admin.xlen(schema.EEW_HEARTBEAT_STREAM) and self.admin.xlen(schema.WATCHDOG_HEARTBEAT_STREAM)
        wait_for(guarding, 30, message=f"brain guarding 3 positions, EEW and watchdog beating\n{self.logs()}")

    def kill_brain_while_the_eew_is_down(self):
        self.stop("eexit.eew")
        self.processes["eexit.brain"].send_signal(signal.SIGKILL)
        self.processes["eexit.brain"].wait(timeout=10)
        wait_for(lambda: self.admin.xlen(schema.PANIC_STREAM), 30, message=f"the watchdog's panic\n{self.logs()}")


class StreamErasedTest(TheftCase):
    """MAXLEN 0 and a maximal id, with the watchdog's and with ops' password, after the
    watchdog published its panic and before the EEW read it."""

    def erase_then_start_the_eew(self, user, attack):
        self.guarded_stack()
        self.kill_brain_while_the_eew_is_down()
        attacker = self.as_user(user)
        attacker.xadd(schema.PANIC_STREAM, {"x": "y"}, id=ATTACKS[attack], maxlen=0, approximate=False)
        self.assertEqual(self.admin.xlen(schema.PANIC_STREAM), 0, "the panic is gone")
        if attack == "max_id":
            with self.assertRaises(redis.ResponseError):       # nobody can publish again
                attacker.xadd(schema.PANIC_STREAM, {"event_id": "later"})
        self.start("eexit.eew")
        report = self.wait_flat(reason=tamper.TAMPER_REASON)
        self.assertTrue(report.event_id.startswith("tamper-"), report)

    def test_maxlen_0_with_the_watchdogs_password(self):
        self.erase_then_start_the_eew("eexit-watchdog", "maxlen_0")

    def test_max_id_with_the_watchdogs_password(self):
        self.erase_then_start_the_eew("eexit-watchdog", "max_id")

    def test_maxlen_0_with_the_ops_password(self):
        self.erase_then_start_the_eew("eexit-ops", "maxlen_0")

    def test_max_id_with_the_ops_password(self):
        self.erase_then_start_the_eew("eexit-ops", "max_id")


class GroupBypassedTest(TheftCase):
    """Entries taken past the EEW's group with the EEW's own password (after i14a the only
    user with group commands): each still ends FLAT."""

    def publish(self, event_id="ev-1"):
        return self.as_user("eexit-ops").xadd(schema.PANIC_STREAM, schema.PanicEvent(
            event_id, "MANUAL", "ops", 1).to_fields())

    def test_group_pre_created_at_dollar_before_the_first_start(self):
        self.publish()
        self.as_user("eexit-eew").xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="$")
        self.start("eexit.eew")
        self.assertEqual(self.wait_flat().event_id, "ev-1")

    def test_noack_read_by_a_thief(self):
        self.as_user("eexit-eew").xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0", mkstream=True)
        self.publish()
        stolen = self.as_user("eexit-eew").xreadgroup(schema.EEW_GROUP, "thief", {schema.PANIC_STREAM: ">"},
                                                      count=10, noack=True)
        self.assertEqual(len(stolen[0][1]), 1)
        self.start("eexit.eew")
        self.assertEqual(self.wait_flat().event_id, "ev-1")

    def test_xack_mid_close_then_restart_still_ends_flat(self):
        self.paper.add_fault(kind="hang", path="/fapi/v1/order", seconds=30, duration_s=120)
        self.start("eexit.eew")
        entry_id = self.publish().decode()

        def closing():
            record = tamper.parse_record(self.admin.hget(schema.PROCESSED_KEY, "ev-1"))
            return record is not None and record.get("attempt", 0) >= 1
        wait_for(closing, 30, message=f"the close under way\n{self.logs()}")
        self.assertEqual(self.as_user("eexit-eew").xack(schema.PANIC_STREAM, schema.EEW_GROUP, entry_id), 1)
        self.processes["eexit.eew"].send_signal(signal.SIGKILL)
        self.processes.pop("eexit.eew").wait(timeout=10)
        self.assertEqual(self.admin.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)["pending"], 0)
        self.paper.clear_faults()
        self.start("eexit.eew")
        self.assertEqual(self.wait_flat().event_id, "ev-1")
        self.assertEqual(len(self.reports("FLAT")), 1)

    def test_republished_duplicate_of_a_stranded_close_does_not_strand_it(self):
        self.paper.add_fault(kind="hang", path="/fapi/v1/order", seconds=30, duration_s=120)
        self.start("eexit.eew", EEXIT_CONSUMER="eew-first")
        entry_id = self.publish().decode()
        wait_for(lambda: (tamper.parse_record(self.admin.hget(schema.PROCESSED_KEY, "ev-1")) or {}).get("attempt"),
                 30, message=f"the close under way\n{self.logs()}")
        self.as_user("eexit-eew").xack(schema.PANIC_STREAM, schema.EEW_GROUP, entry_id)
        self.processes["eexit.eew"].send_signal(signal.SIGKILL)
        self.processes.pop("eexit.eew").wait(timeout=10)
        self.paper.clear_faults()
        self.start("eexit.eew", EEXIT_CONSUMER="eew-second")    # another instance: idle claim
        self.publish()                                          # the watchdog's republish
        report = self.wait_flat()
        self.assertEqual(report.event_id, "ev-1")
        # The republished copy's DUPLICATE report may land after the FLAT one: wait for it.
        duplicate = wait_for(lambda: self.reports("DUPLICATE"), 30, message=f"the DUPLICATE\n{self.logs()}")
        self.assertEqual(len(duplicate), 1)
        self.assertIn("original_status=", duplicate[0].detail)


class HaltWriterTest(TheftCase):
    def test_direct_hset_of_the_halt_is_noperm_for_every_user_but_the_eew(self):
        self.admin.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "ev-1"})
        for user in USERS:
            if user == "eexit-eew":
                continue
            with self.subTest(user=user):
                with self.assertRaises(redis.exceptions.NoPermissionError):
                    self.as_user(user).hset(schema.TRADING_STATE_KEY, "halted", "false")
        self.assertEqual(self.admin.hget(schema.TRADING_STATE_KEY, "halted"), b"true")


if __name__ == "__main__":
    unittest.main()

"""A drill through the real chain: the real EEW (`python -m eexit.eew`) closes positions on the
paper exchange through real ccxt, the audit logger is killed -9 mid-drill and restarted; the
file then holds every panic, report and halt exactly once, verifies, and the metrics file
agrees with Redis. Redis runs the shipped ACL and each daemon its own user: the audit logger
does all of this read-only, without a consumer group."""

import json
import os
import shutil
import signal
import tempfile
import time

from eexit import audit, schema
from eexit.paper import PaperExchange
from tests.acl_harness import AclRedisTestCase, user_url
from tests.harness import python_env, start_module, stop_process, wait_for
from tests.test_metrics import parse_exposition, value_of


class AuditDrillTest(AclRedisTestCase):
    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="eexit-audit-drill-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5", hedge=False)
        self.paper_url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.audit_path = os.path.join(self.dir, "audit.jsonl")
        self.metrics_path = os.path.join(self.dir, "eexit.prom")

    def spawn(self, module, name, user, **settings):
        env = python_env(REDIS_URL=user_url(self.redis_server, user), **settings)
        process = start_module(module, env, os.path.join(self.dir, f"{name}.log"))
        self.addCleanup(stop_process, process)
        return process

    def start_audit(self):
        return self.spawn("eexit.audit", "audit", "eexit-audit", EEXIT_AUDIT_FILE=self.audit_path,
                          EEXIT_METRICS_FILE=self.metrics_path, EEXIT_AUDIT_POLL_S="0.05",
                          EEXIT_METRICS_INTERVAL_S="0.1", EEXIT_METRICS_UP_MAX_AGE_S="3600")

    def logs(self):
        text = []
        for name in ("eew", "audit"):
            try:
                with open(os.path.join(self.dir, f"{name}.log"), encoding="utf-8", errors="replace") as f:
                    text.append(f"--- {name}\n{f.read()[-4000:]}")
            except OSError:
                text.append(f"--- {name}: no log")
        return "\n".join(text)

    def publish(self, event_id):
        return self.redis.xadd(schema.PANIC_STREAM, {
            "event_id": event_id, "reason": "DRILL", "severity": "CRITICAL", "issued_by": "ops",
            "ts": str(int(time.time() * 1000))}).decode()

    def reports(self):
        return {fields[b"event_id"].decode(): fields[b"status"].decode()
                for _id, fields in self.redis.xrange(schema.COMPLETED_STREAM)}

    def file_lines(self):
        try:
            with open(self.audit_path, "rb") as f:
                return [json.loads(line) for line in f.read().split(b"\n")[:-1]]
        except FileNotFoundError:
            return []

    def test_drill_kill_9_and_restart(self):
        self.spawn("eexit.eew", "eew", "eexit-eew", EEXIT_CONSUMER="eew-a", EEXIT_EXCHANGE_URL=self.paper_url,
                   EEXIT_API_KEY="paper-key", EEXIT_API_SECRET="paper-secret",
                   EEXIT_JOURNAL=os.path.join(self.dir, "journal.jsonl"), EEXIT_CLOSE_DEADLINE_S="5",
                   EEXIT_BLOCK_MS="100", EEXIT_SWEEP_INTERVAL_S="0.2", EEXIT_BUS_LOSS_CLOSE_S="0",
                   EEXIT_HEARTBEAT_INTERVAL_S="0.1")
        wait_for(lambda: self.redis.xlen(schema.EEW_HEARTBEAT_STREAM) > 0, 30, message=f"EEW ready\n{self.logs()}")
        first = self.start_audit()

        self.publish("drill-1")
        wait_for(lambda: "drill-1" in self.reports(), 30, message=f"the first report\n{self.logs()}")
        wait_for(lambda: any(o["kind"] == "completed" for o in self.file_lines()), 10,
                 message=f"the first report audited\n{self.logs()}")
        self.assertFalse(self.paper.positions())
        first.send_signal(signal.SIGKILL)          # mid-drill: more panics are on their way
        first.wait(timeout=5)
        self.paper.set_position("BTCUSDT", 0.02)
        self.publish("drill-2")
        self.start_audit()
        self.publish("drill-3")
        wait_for(lambda: {"drill-2", "drill-3"} <= set(self.reports()), 30, message=f"every report\n{self.logs()}")

        def audited():
            lines = self.file_lines()
            logged = {(o["stream"], o["entry_id"]) for o in lines if "stream" in o}
            expected = {(stream, entry_id.decode()) for stream in (schema.PANIC_STREAM, schema.COMPLETED_STREAM)
                        for entry_id, _ in self.redis.xrange(stream)}
            state = {k.decode(): v.decode() for k, v in self.redis.hgetall(schema.TRADING_STATE_KEY).items()}
            states = [o["fields"] for o in lines if o["kind"] == "trading_state"]
            return expected <= logged and states and states[-1] == state and lines
        lines = wait_for(audited, 10, message=f"every event in the file\n{self.logs()}")
        for stream in (schema.PANIC_STREAM, schema.COMPLETED_STREAM):
            in_stream = [entry_id.decode() for entry_id, _ in self.redis.xrange(stream)]
            in_file = [o["entry_id"] for o in lines if o.get("stream") == stream]
            self.assertEqual(sorted(in_file), in_stream, f"{stream}: each entry exactly once")
        halts = [o["fields"] for o in lines if o["kind"] == "trading_state"]
        self.assertTrue(halts and halts[-1].get("halted") == "true", halts)
        ok, line, reason = audit.verify_file(self.audit_path)
        self.assertTrue(ok, f"line {line}: {reason}")

        def settled():
            try:
                with open(self.metrics_path, encoding="utf-8") as f:
                    families = parse_exposition(f.read())
            except FileNotFoundError:
                return None
            pending = value_of(families, "eexit_group_pending", stream=schema.PANIC_STREAM, group=schema.EEW_GROUP)
            return families if value_of(families, "eexit_audit_lines") == len(self.file_lines()) and \
                pending == 0 else None
        families = wait_for(settled, 10, message=f"metrics after the drill\n{self.logs()}")
        statuses = self.reports()
        self.assertEqual(value_of(families, "eexit_last_panic_status", status=statuses["drill-3"]), 1)
        self.assertEqual(value_of(families, "eexit_trading_halted"), 1)
        self.assertEqual(value_of(families, "eexit_up", daemon="eew"), 1)
        self.assertEqual(value_of(families, "eexit_last_panic_residual_positions"), 0)
        self.assertEqual(value_of(families, "eexit_panic_stream_entries"), 3)
        self.assertEqual([schema.EEW_GROUP], [g["name"].decode() for g in self.redis.xinfo_groups(schema.PANIC_STREAM)])
        self.assertFalse(self.paper.positions())

"""The audit logger: the hash chain (pure, on files) and the daemon as a real process against a
real redis-server: kill -9 mid-stream, the crash window between fsync and XACK, torn lines,
a broken chain, a second instance, and Redis losing its streams."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from eexit import audit, schema
from eexit.log import Logger
from tests.harness import RedisTestCase, python_env, start_module, stop_process, wait_for


def quiet_log():
    return Logger("audit-test", stream=io.StringIO())


def panic_fields(number):
    return schema.PanicEvent(event_id=f"ev-{number}", reason="DRILL", issued_by="ops",
                             ts=1_700_000_000_000 + number).to_fields()


def report_fields(number, status="FLAT"):
    return schema.CompletionReport(event_id=f"ev-{number}", status=status, issued_by="ops",
                                   reason="DRILL", ts_started=1, ts_completed=2,
                                   execution_time_ms=40).to_fields()


def read_lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")[:-1]


def write_lines(path, lines):
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def parsed(path):
    return [json.loads(line) for line in read_lines(path)]


class TempDirMixin:
    def make_dir(self):
        directory = tempfile.mkdtemp(prefix="eexit-audit-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory


class ChainTests(TempDirMixin, unittest.TestCase):
    """Any edit, deletion, insertion or swap is found, and the first broken line is named."""

    LINES = 6

    def setUp(self):
        self.path = os.path.join(self.make_dir(), "audit.jsonl")
        chain = audit.AuditFile(self.path, quiet_log()).open()
        bodies = []
        for number in range(1, self.LINES + 1):
            if number % 3 == 0:
                bodies.append(audit.trading_state_body({"halted": "true", "event_id": f"ev-{number}"}, number, number))
            else:
                stream = schema.PANIC_STREAM if number % 2 else schema.COMPLETED_STREAM
                bodies.append(audit.stream_body(stream, f"{number}-0", {"event_id": f"ev-{number}"}, number))
        chain.append(bodies[:2])       # two batches: the head follows each append
        chain.append(bodies[2:])
        chain.close()
        self.original = read_lines(self.path)

    def assert_broken_at(self, line_number, fragment=""):
        ok, line, reason = audit.verify_file(self.path)
        self.assertFalse(ok, reason)
        self.assertEqual(line, line_number, reason)
        self.assertIn(fragment, reason)
        return reason

    def test_intact_chain_verifies(self):
        ok, line, reason = audit.verify_file(self.path)
        self.assertTrue(ok, reason)
        self.assertIsNone(line)
        self.assertIn(f"{self.LINES} lines", reason)
        lines = parsed(self.path)
        self.assertEqual([obj["seq"] for obj in lines], list(range(1, self.LINES + 1)))
        self.assertEqual(lines[0]["prev"], audit.GENESIS)
        for before, after in zip(lines, lines[1:]):
            self.assertEqual(after["prev"], before["hash"])

    def test_editing_any_line_names_it(self):
        for index in range(self.LINES):
            with self.subTest(line=index + 1):
                lines = list(self.original)
                lines[index] = lines[index].replace(b"ev-", b"EV-", 1)
                write_lines(self.path, lines)
                self.assert_broken_at(index + 1, "edited")

    def test_edit_with_a_recomputed_hash_is_found_at_the_next_line_or_the_head(self):
        for index in range(self.LINES):
            with self.subTest(line=index + 1):
                lines = list(self.original)
                obj = json.loads(lines[index])
                obj["fields"]["event_id"] = "forged"
                lines[index], _ = audit.seal(obj["seq"], obj["prev"], obj)
                write_lines(self.path, lines)
                if index + 1 < self.LINES:
                    self.assert_broken_at(index + 2, "prev does not match")
                else:
                    self.assert_broken_at(self.LINES, "head file")

    def test_whitespace_only_edit_is_found(self):
        lines = list(self.original)
        lines[2] = lines[2].replace(b'","', b'", "', 1)
        write_lines(self.path, lines)
        self.assert_broken_at(3, "canonical")

    def test_deleting_any_line_names_it(self):
        for index in range(self.LINES):
            with self.subTest(line=index + 1):
                write_lines(self.path, self.original[:index] + self.original[index + 1:])
                self.assert_broken_at(index + 1, "missing" if index + 1 == self.LINES else "deleted")

    def test_swapping_any_two_adjacent_lines_names_the_first(self):
        for index in range(self.LINES - 1):
            with self.subTest(lines=(index + 1, index + 2)):
                lines = list(self.original)
                lines[index], lines[index + 1] = lines[index + 1], lines[index]
                write_lines(self.path, lines)
                self.assert_broken_at(index + 1, "moved")

    def test_inserting_a_copy_names_it(self):
        for index in range(self.LINES):
            with self.subTest(after=index + 1):
                write_lines(self.path, self.original[:index + 1] + [self.original[index]] + self.original[index + 1:])
                self.assert_broken_at(index + 2)

    def test_garbage_and_blank_lines_are_found(self):
        write_lines(self.path, self.original[:3] + [b""] + self.original[3:])
        self.assert_broken_at(4, "JSON")
        write_lines(self.path, self.original[:1] + [b'{"a":1}'] + self.original[1:])
        self.assert_broken_at(2, "no hash")

    def test_torn_last_line_is_reported(self):
        with open(self.path, "ab") as f:
            f.write(self.original[0][:40])
        self.assert_broken_at(self.LINES + 1, "incomplete")

    def test_missing_or_bad_head_fails(self):
        os.unlink(audit.head_path(self.path))
        self.assert_broken_at(None, "missing")
        with open(audit.head_path(self.path), "w") as f:
            f.write("{}")
        self.assert_broken_at(None, "malformed")

    def test_head_may_lag_but_never_lead(self):
        # A crash between the file's fsync and the head's rename leaves the head one batch behind.
        lines = parsed(self.path)
        with open(audit.head_path(self.path), "wb") as f:
            f.write(audit.canonical({"seq": 2, "hash": lines[1]["hash"]}))
        ok, _, reason = audit.verify_file(self.path)
        self.assertTrue(ok, reason)

    def test_eexit_audit_verify_command(self):
        def run():
            return subprocess.run([sys.executable, "-m", "eexit.cli", "audit", "verify", self.path],
                                  env=python_env(), capture_output=True, text=True, timeout=30)
        result = run()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        lines = list(self.original)
        lines[2] = lines[2].replace(b"ev-", b"EV-", 1)
        write_lines(self.path, lines)
        result = run()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("line 3", result.stdout + result.stderr)

    def test_unreadable_file_fails(self):
        ok, line, reason = audit.verify_file(self.path + ".nope")
        self.assertFalse(ok)
        self.assertIsNone(line)
        self.assertIn("cannot read", reason)

    def test_reopening_continues_the_chain_and_moves_a_torn_tail_aside(self):
        with open(self.path, "ab") as f:
            f.write(b'{"half a line')
        chain = audit.AuditFile(self.path, quiet_log()).open()
        self.addCleanup(chain.close)
        self.assertEqual(chain.seq, self.LINES)
        chain.append([audit.stream_body(schema.PANIC_STREAM, "99-0", {"event_id": "late"}, 7)])
        ok, _, reason = audit.verify_file(self.path)
        self.assertTrue(ok, reason)
        self.assertEqual(len(read_lines(self.path)), self.LINES + 1)
        torn = [name for name in os.listdir(os.path.dirname(self.path)) if ".torn-" in name]
        self.assertEqual(len(torn), 1)
        with open(os.path.join(os.path.dirname(self.path), torn[0]), "rb") as f:
            self.assertEqual(f.read(), b'{"half a line')

    def test_resume_point_comes_from_the_file(self):
        chain = audit.AuditFile(self.path, quiet_log()).open()
        self.addCleanup(chain.close)
        written = chain.written
        self.assertEqual(written.completed_position, "4-0")
        self.assertTrue(written.has(schema.PANIC_STREAM, "1-0", {"event_id": "ev-1"}))
        self.assertTrue(written.has(schema.PANIC_STREAM, "1-0", {}))      # deleted entry: id alone
        self.assertFalse(written.has(schema.PANIC_STREAM, "1-0", {"event_id": "other"}))
        self.assertFalse(written.has(schema.PANIC_STREAM, "7-0", {"event_id": "ev-7"}))
        self.assertEqual(written.trading_state, {"halted": "true", "event_id": "ev-6"})

    def test_a_second_writer_is_refused(self):
        chain = audit.AuditFile(self.path, quiet_log()).open()
        self.addCleanup(chain.close)
        with self.assertRaises(audit.AuditFileError):
            audit.AuditFile(self.path, quiet_log()).open()

    def test_a_file_changed_behind_the_writer_stops_it(self):
        chain = audit.AuditFile(self.path, quiet_log()).open()
        self.addCleanup(chain.close)
        write_lines(self.path, self.original[:-1])
        with self.assertRaises(audit.AuditFileError):
            chain.append([audit.stream_body(schema.PANIC_STREAM, "99-0", {}, 7)])


class ConfigTests(unittest.TestCase):
    def test_defaults_live_in_the_state_directory(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        config = audit.Config.from_env({"STATE_DIRECTORY": directory})
        self.assertEqual(config.audit_file, os.path.join(directory, "audit.jsonl"))
        self.assertEqual(config.metrics_file, os.path.join(directory, "eexit.prom"))
        self.assertEqual(config.consumer, "audit-1")
        self.assertEqual(audit.Config.from_env({"STATE_DIRECTORY": directory,
                                                "EEXIT_METRICS_FILE": "off"}).metrics_file, "")

    def test_errors_name_the_variable(self):
        cases = [({}, "EEXIT_AUDIT_FILE"),
                 ({"EEXIT_AUDIT_FILE": "/nonexistent-dir/a.jsonl", "EEXIT_METRICS_FILE": "off"}, "EEXIT_AUDIT_FILE"),
                 ({"EEXIT_AUDIT_FILE": "/tmp/a.jsonl"}, "EEXIT_METRICS_FILE"),
                 ({"EEXIT_AUDIT_FILE": "/tmp/a", "EEXIT_METRICS_FILE": "/tmp/a"}, "EEXIT_METRICS_FILE.*prom"),
                 ({"STATE_DIRECTORY": "/tmp", "EEXIT_AUDIT_POLL_S": "9"}, "EEXIT_AUDIT_POLL_S")]
        for env, name in cases:
            with self.subTest(env=env):
                with self.assertRaisesRegex(audit.ConfigError, name):
                    audit.Config.from_env(env)


class AuditDaemonTests(TempDirMixin, RedisTestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.make_dir()
        self.path = os.path.join(self.dir, "audit.jsonl")
        self.metrics_path = os.path.join(self.dir, "eexit.prom")
        self.log_path = os.path.join(self.dir, "audit.log")
        self.processes = []

    def tearDown(self):
        for process in self.processes:
            stop_process(process)
        super().tearDown()

    def start(self, **more):
        settings = dict(REDIS_URL=self.redis_server.url, EEXIT_AUDIT_FILE=self.path,
                        EEXIT_METRICS_FILE=self.metrics_path, EEXIT_AUDIT_POLL_S="0.05",
                        EEXIT_METRICS_INTERVAL_S="0.1")
        settings.update(more)
        env = python_env(**settings)
        process = start_module("eexit.audit", env, self.log_path)
        self.processes.append(process)
        return process

    def log_text(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def metrics(self):
        try:
            with open(self.metrics_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def lines(self):
        try:
            return parsed(self.path)
        except FileNotFoundError:
            return []

    def stream_ids(self, stream):
        return [entry_id.decode() for entry_id, _ in self.redis.xrange(stream)]

    def logged_ids(self, stream):
        return [obj["entry_id"] for obj in self.lines() if obj.get("stream") == stream]

    def audit_pending(self):
        return self.redis.xpending(schema.PANIC_STREAM, schema.AUDIT_GROUP)["pending"]

    def assert_verifies(self):
        ok, line, reason = audit.verify_file(self.path)
        self.assertTrue(ok, f"line {line}: {reason}\n{self.log_text()}")

    def test_drill_with_kill_9_mid_stream_has_every_event_exactly_once(self):
        events, stop = 120, threading.Event()
        publisher = self.redis_server.client()
        self.addCleanup(publisher.close)

        def publish():
            # A drill's traffic: panics, their reports and halt/resume flips, back to back.
            for number in range(events):
                publisher.xadd(schema.PANIC_STREAM, panic_fields(number))
                publisher.xadd(schema.COMPLETED_STREAM, report_fields(number))
                if number % 20 == 0:
                    publisher.hset(schema.TRADING_STATE_KEY, mapping={
                        "halted": "true" if number % 40 == 0 else "false", "event_id": f"ev-{number}"})
                time.sleep(0.004)
            stop.set()

        self.start()
        thread = threading.Thread(target=publish)
        thread.start()
        self.addCleanup(thread.join)
        wait_for(lambda: len(self.lines()) >= 20, 10, message="the first lines")
        first = self.processes[-1]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=5)
        lines_at_kill = len(self.lines())
        self.assertLess(lines_at_kill, 2 * events, "the kill came after the stream ended")
        time.sleep(0.1)                      # entries keep arriving while the logger is down
        self.start()
        stop.wait(10)
        wait_for(lambda: len(self.logged_ids(schema.COMPLETED_STREAM)) >= events
                 and len(self.logged_ids(schema.PANIC_STREAM)) >= events, 10,
                 message=f"every event in the file\n{self.log_text()}")
        final_state = {k.decode(): v.decode() for k, v in self.redis.hgetall(schema.TRADING_STATE_KEY).items()}
        wait_for(lambda: (states := [o["fields"] for o in self.lines() if o["kind"] == "trading_state"])
                 and states[-1] == final_state, 5, message="the final trading state")
        wait_for(lambda: self.audit_pending() == 0, 5, message="every panic acknowledged")

        for stream in (schema.PANIC_STREAM, schema.COMPLETED_STREAM):
            self.assertEqual(self.logged_ids(stream), self.stream_ids(stream), stream)
        states = [obj["fields"] for obj in self.lines() if obj["kind"] == "trading_state"]
        for before, after in zip(states, states[1:]):
            self.assertNotEqual(before, after, "a trading state logged twice")
        for obj in self.lines():
            if obj["kind"] == "panic":
                self.assertEqual(obj["fields"], {k.decode(): v.decode() for k, v in
                                                 self.redis.xrange(schema.PANIC_STREAM, obj["entry_id"],
                                                                   obj["entry_id"])[0][1].items()})
        self.assert_verifies()

    def test_crash_between_fsync_and_ack_is_acknowledged_not_written_again(self):
        written_id = self.redis.xadd(schema.PANIC_STREAM, panic_fields(1)).decode()
        later_id = self.redis.xadd(schema.PANIC_STREAM, panic_fields(2)).decode()
        logged_report = self.redis.xadd(schema.COMPLETED_STREAM, report_fields(1)).decode()
        self.redis.xadd(schema.COMPLETED_STREAM, report_fields(2))
        # The state a crash leaves: both panics delivered to our consumer, the first one (and
        # the first report) written and fsynced, nothing acknowledged.
        self.redis.xgroup_create(schema.PANIC_STREAM, schema.AUDIT_GROUP, id="0")
        self.redis.xreadgroup(schema.AUDIT_GROUP, "audit-1", {schema.PANIC_STREAM: ">"})
        chain = audit.AuditFile(self.path, quiet_log()).open()
        chain.append([audit.stream_body(schema.PANIC_STREAM, written_id, panic_fields(1), 1),
                      audit.stream_body(schema.COMPLETED_STREAM, logged_report, report_fields(1), 1)])
        chain.close()

        self.start()
        wait_for(lambda: len(self.lines()) >= 4 and self.audit_pending() == 0, 10,
                 message=f"the backlog handled\n{self.log_text()}")
        self.assertEqual(self.logged_ids(schema.PANIC_STREAM), [written_id, later_id])
        self.assertEqual(self.logged_ids(schema.COMPLETED_STREAM), self.stream_ids(schema.COMPLETED_STREAM))
        self.assertIn("event=already_written", self.log_text())
        self.assert_verifies()

    def test_torn_line_is_moved_aside_and_the_entry_written_again(self):
        entry_id = self.redis.xadd(schema.PANIC_STREAM, panic_fields(1)).decode()
        self.redis.xgroup_create(schema.PANIC_STREAM, schema.AUDIT_GROUP, id="0")
        self.redis.xreadgroup(schema.AUDIT_GROUP, "audit-1", {schema.PANIC_STREAM: ">"})
        chain = audit.AuditFile(self.path, quiet_log()).open()
        chain.close()
        line, _ = audit.seal(1, audit.GENESIS, audit.stream_body(schema.PANIC_STREAM, entry_id, panic_fields(1), 1))
        with open(self.path, "ab") as f:
            f.write(line[:len(line) // 2])      # power lost mid-write, before the fsync
        self.start()
        wait_for(lambda: self.audit_pending() == 0, 10, message=f"the entry acknowledged\n{self.log_text()}")
        self.assertEqual(self.logged_ids(schema.PANIC_STREAM), [entry_id])
        self.assertIn("event=torn_line_moved_aside", self.log_text())
        self.assert_verifies()

    def test_a_broken_chain_refuses_to_start(self):
        chain = audit.AuditFile(self.path, quiet_log()).open()
        chain.append([audit.stream_body(schema.PANIC_STREAM, f"{n}-0", {"event_id": f"ev-{n}"}, n) for n in (1, 2)])
        chain.close()
        lines = read_lines(self.path)
        write_lines(self.path, [lines[1], lines[0]])
        process = self.start()
        self.assertEqual(process.wait(timeout=10), audit.CHAIN_BROKEN_EXIT_CODE)
        self.assertIn("event=audit_chain_broken", self.log_text())
        self.assertIn("line=1", self.log_text())
        self.assertEqual(read_lines(self.path), [lines[1], lines[0]], "the evidence was changed")

    def test_a_second_instance_exits_and_a_bad_config_is_2(self):
        self.start()
        wait_for(lambda: os.path.exists(audit.head_path(self.path)), 10, message="the first instance")
        second = self.start()
        self.assertEqual(second.wait(timeout=10), audit.IO_ERROR_EXIT_CODE)
        self.assertIn("locked by another process", self.log_text())
        bad = self.start(EEXIT_AUDIT_POLL_S="fast")
        self.assertEqual(bad.wait(timeout=10), 2)
        self.assertIn("EEXIT_AUDIT_POLL_S", self.log_text())

    def test_redis_losing_its_streams_is_caught_up_after_reconnect(self):
        # A report id from "the future" makes the recreated stream's ids lower than the resume
        # point: the logger must notice the stream was reset rather than wait for that id.
        self.redis.xadd(schema.COMPLETED_STREAM, report_fields(1), id="9999999999999-0")
        self.redis.xadd(schema.PANIC_STREAM, panic_fields(1))
        self.start()
        wait_for(lambda: len(self.lines()) == 2, 10, message=f"the first events\n{self.log_text()}")
        self.redis_server.kill()                    # no persistence: every stream is gone
        self.addCleanup(lambda: self.redis_server.process.poll() is None or self.redis_server.start())
        wait_for(lambda: "redis_unavailable" in self.log_text(), 10, message="the outage noticed")
        wait_for(lambda: b"eexit_redis_up 0" in self.metrics(), 10,
                 message=f"metrics saying Redis is down\n{self.log_text()}")
        self.redis_server.start()
        self.redis = self.redis_server.client()
        self.addCleanup(self.redis.close)
        self.redis.xadd(schema.PANIC_STREAM, panic_fields(2))
        self.redis.xadd(schema.COMPLETED_STREAM, report_fields(2))
        wait_for(lambda: len(self.lines()) == 4, 15, message=f"the new events\n{self.log_text()}")
        self.assertEqual([obj["fields"]["event_id"] for obj in self.lines()], ["ev-1", "ev-1", "ev-2", "ev-2"])
        self.assertIn("completed_stream_reset", self.log_text())
        self.assert_verifies()


if __name__ == "__main__":
    unittest.main()

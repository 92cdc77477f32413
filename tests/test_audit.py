"""The audit logger: the hash chain (pure, on files) and the daemon as a real process against a
real redis-server under the shipped ACL as the read-only eexit-audit user: kill -9 mid-stream,
the crash window between fsync and the next read, interrupted writes, a broken or forged
chain, a second instance, and Redis losing its streams."""

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
from tests.acl_harness import AclRedisTestCase, user_url
from tests.harness import python_env, start_module, stop_process, wait_for


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
        chain.append(bodies[:2])       # two batches: the head is written ahead of each
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
                if index + 1 < self.LINES:
                    self.assert_broken_at(index + 1, "deleted")
                else:
                    # Cutting the end of the last batch looks like that write being interrupted
                    # (the head is written first): it fails from the batch's first line.
                    self.assert_broken_at(3, "did not finish")

    def test_cutting_whole_batches_off_the_end_is_missing(self):
        write_lines(self.path, self.original[:1])
        self.assert_broken_at(2, "missing")

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

    def test_an_emptied_file_without_its_head_is_broken_and_the_daemon_refuses_it(self):
        """Issue 26, finding 13: emptying the file and deleting the head is never "OK: 0 lines"."""
        write_lines(self.path, [])
        os.unlink(audit.head_path(self.path))
        self.assert_broken_at(None, ".head file is missing")
        with self.assertRaises(audit.ChainBroken):
            audit.AuditFile(self.path, quiet_log()).open()

    def test_first_start_writes_the_head_before_the_file(self):
        fresh = os.path.join(self.make_dir(), "fresh.jsonl")
        audit.AuditFile(fresh, quiet_log()).open().close()
        self.assertEqual(audit.verify_file(fresh)[:2], (True, None))
        self.assertEqual(json.loads(open(audit.head_path(fresh), "rb").read())["seq"], 0)
        # A crash after the head and before the file: the next start is a clean first start.
        os.unlink(fresh)
        audit.AuditFile(fresh, quiet_log()).open().close()
        self.assertEqual(audit.verify_file(fresh)[:2], (True, None))

    def forge_appended_line(self):
        """A line appended by someone else, with a correctly recomputed chain."""
        last = parsed(self.path)[-1]
        body = audit.stream_body(schema.COMPLETED_STREAM, "99-0", {"event_id": "ev-1", "status": "FLAT"}, 9)
        line, _ = audit.seal(last["seq"] + 1, last["hash"], body)
        with open(self.path, "ab") as f:
            f.write(line + b"\n")

    def test_an_appended_forged_line_fails_naming_it(self):
        """Issue 14, behaviour 7: a head that lags the file is never accepted."""
        self.forge_appended_line()
        self.assert_broken_at(self.LINES + 1, "not recorded in the head file")
        # The old-format head (no base) of the same length is refused the same way.
        last = parsed(self.path)[self.LINES - 1]
        with open(audit.head_path(self.path), "wb") as f:
            f.write(audit.canonical({"seq": self.LINES, "hash": last["hash"]}))
        self.assert_broken_at(self.LINES + 1, "not recorded in the head file")

    def test_head_written_ahead_of_an_interrupted_write_fails_until_repaired(self):
        # The head is written before the batch: a crash mid-batch leaves it ahead of the file.
        chain = audit.AuditFile(self.path, quiet_log()).open()
        bodies = [audit.stream_body(schema.PANIC_STREAM, f"{n}-1", {"event_id": f"late-{n}"}, n) for n in (7, 8, 9)]
        seq, prev, lines = chain.seq, chain.last_hash, []
        for body in bodies:
            seq += 1
            line, prev = audit.seal(seq, prev, body)
            lines.append(line)
        chain._write_head(seq, prev)
        chain.close()
        for landed in (0, 1, 2):
            with self.subTest(lines_landed=landed):
                write_lines(self.path, self.original + lines[:landed])
                self.assert_broken_at(self.LINES + 1, "did not finish")
        with open(self.path, "ab") as f:
            f.write(lines[2][:30])                                    # and a torn third
        self.assert_broken_at(self.LINES + 1, "did not finish")
        # Starting repairs it: what landed is moved aside, the file is what the head's base says.
        chain = audit.AuditFile(self.path, quiet_log()).open()
        self.addCleanup(chain.close)
        self.assertEqual(chain.seq, self.LINES)
        self.assertEqual(read_lines(self.path), self.original)
        ok, _, reason = audit.verify_file(self.path)
        self.assertTrue(ok, reason)
        [aside] = [name for name in os.listdir(os.path.dirname(self.path)) if ".torn-" in name]
        with open(os.path.join(os.path.dirname(self.path), aside), "rb") as f:
            self.assertEqual(f.read(), lines[0] + b"\n" + lines[1] + b"\n" + lines[2][:30])

    def test_the_daemon_refuses_a_forged_line_and_does_not_reseal_it(self):
        self.forge_appended_line()
        forged, head = read_lines(self.path), open(audit.head_path(self.path), "rb").read()
        with self.assertRaises(audit.ChainBroken) as broken:
            audit.AuditFile(self.path, quiet_log()).open()
        self.assertEqual(broken.exception.line_number, self.LINES + 1)
        self.assertEqual(read_lines(self.path), forged)
        self.assertEqual(open(audit.head_path(self.path), "rb").read(), head, "the head was re-sealed")

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
        self.assertEqual(written.positions, {schema.COMPLETED_STREAM: "4-0", schema.PANIC_STREAM: "5-0",
                                             "eexit:risk:events": "0-0"})
        self.assertTrue(written.has(schema.PANIC_STREAM, "1-0", {"event_id": "ev-1"}))
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
        self.assertEqual(audit.Config.from_env({"STATE_DIRECTORY": directory,
                                                "EEXIT_METRICS_FILE": "off"}).metrics_file, "")

    def test_errors_name_the_variable(self):
        cases = [({}, "EEXIT_AUDIT_FILE"),
                 ({"EEXIT_AUDIT_FILE": "/nonexistent-dir/a.jsonl", "EEXIT_METRICS_FILE": "off"}, "EEXIT_AUDIT_FILE"),
                 ({"EEXIT_AUDIT_FILE": "/tmp/a.jsonl"}, "EEXIT_METRICS_FILE"),
                 ({"EEXIT_AUDIT_FILE": "/tmp/a", "EEXIT_METRICS_FILE": "/tmp/a"}, "EEXIT_METRICS_FILE.*prom"),
                 ({"STATE_DIRECTORY": "/tmp", "EEXIT_AUDIT_POLL_S": "9"}, "EEXIT_AUDIT_POLL_S"),
                 # The consumer group is gone: its settings are refused, not silently ignored.
                 ({"STATE_DIRECTORY": "/tmp", "EEXIT_AUDIT_CONSUMER": "audit-1"}, "EEXIT_AUDIT_CONSUMER.*no longer"),
                 ({"STATE_DIRECTORY": "/tmp", "EEXIT_AUDIT_CLAIM_IDLE_S": "60"}, "EEXIT_AUDIT_CLAIM_IDLE_S")]
        for env, name in cases:
            with self.subTest(env=env):
                with self.assertRaisesRegex(audit.ConfigError, name):
                    audit.Config.from_env(env)


class AuditDaemonTests(TempDirMixin, AclRedisTestCase):
    """The daemon runs as eexit-audit: read-only, no consumer group."""

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
        settings = dict(REDIS_URL=user_url(self.redis_server, "eexit-audit"), EEXIT_AUDIT_FILE=self.path,
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

    def assert_no_group(self):
        for stream in (schema.PANIC_STREAM, schema.COMPLETED_STREAM):
            if self.redis.exists(stream):
                self.assertEqual([], self.redis.xinfo_groups(stream), "the audit logger made a group")

    def assert_verifies(self):
        ok, line, reason = audit.verify_file(self.path)
        self.assertTrue(ok, f"line {line}: {reason}\n{self.log_text()}")

    def test_drill_with_kill_9_mid_stream_has_every_event_exactly_once(self):
        events, stop = 120, threading.Event()
        publisher = self.client("test-admin")

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
        self.assert_no_group()
        self.assert_verifies()

    def test_crash_between_fsync_and_the_next_read_neither_loses_nor_duplicates(self):
        written_id = self.redis.xadd(schema.PANIC_STREAM, panic_fields(1)).decode()
        later_id = self.redis.xadd(schema.PANIC_STREAM, panic_fields(2)).decode()
        logged_report = self.redis.xadd(schema.COMPLETED_STREAM, report_fields(1)).decode()
        self.redis.xadd(schema.COMPLETED_STREAM, report_fields(2))
        # The state a crash leaves: the first panic and the first report written and fsynced,
        # the rest not yet read. The file is the only cursor.
        chain = audit.AuditFile(self.path, quiet_log()).open()
        chain.append([audit.stream_body(schema.PANIC_STREAM, written_id, panic_fields(1), 1),
                      audit.stream_body(schema.COMPLETED_STREAM, logged_report, report_fields(1), 1)])
        chain.close()

        self.start()
        wait_for(lambda: len(self.lines()) >= 4, 10, message=f"the backlog handled\n{self.log_text()}")
        self.assertEqual(self.logged_ids(schema.PANIC_STREAM), [written_id, later_id])
        self.assertEqual(self.logged_ids(schema.COMPLETED_STREAM), self.stream_ids(schema.COMPLETED_STREAM))
        self.assertIn(f"panic_from={written_id}", self.log_text())
        self.assertNotIn("already_written", self.log_text())
        self.assert_no_group()
        self.assert_verifies()

    def test_interrupted_write_is_moved_aside_and_the_entries_written_again(self):
        first = self.redis.xadd(schema.PANIC_STREAM, panic_fields(1)).decode()
        second = self.redis.xadd(schema.PANIC_STREAM, panic_fields(2)).decode()
        chain = audit.AuditFile(self.path, quiet_log()).open()
        one, hash_one = audit.seal(1, audit.GENESIS, audit.stream_body(schema.PANIC_STREAM, first, panic_fields(1), 1))
        two, hash_two = audit.seal(2, hash_one, audit.stream_body(schema.PANIC_STREAM, second, panic_fields(2), 1))
        chain._write_head(2, hash_two)          # the head goes first ...
        chain.close()
        with open(self.path, "ab") as f:
            f.write(one + b"\n" + two[:len(two) // 2])   # ... then power is lost mid-batch
        self.start()
        wait_for(lambda: len(self.logged_ids(schema.PANIC_STREAM)) >= 2, 10,
                 message=f"the entries written again\n{self.log_text()}")
        self.assertEqual(self.logged_ids(schema.PANIC_STREAM), [first, second])
        self.assertIn("event=interrupted_write_moved_aside", self.log_text())
        self.assert_verifies()

    def test_a_forged_appended_line_refuses_to_start_and_is_not_resealed(self):
        """Issue 14, behaviour 7: the daemon never seals lines it did not write."""
        entry_id = self.redis.xadd(schema.PANIC_STREAM, panic_fields(1)).decode()
        self.start()
        wait_for(lambda: len(self.lines()) == 1, 10, message=f"the first line\n{self.log_text()}")
        stop_process(self.processes.pop())
        last = self.lines()[-1]
        forged, _ = audit.seal(2, last["hash"], audit.stream_body(
            schema.COMPLETED_STREAM, "9-0", {"event_id": "ev-1", "status": "FLAT"}, 9))
        with open(self.path, "ab") as f:
            f.write(forged + b"\n")
        before = (read_lines(self.path), open(audit.head_path(self.path), "rb").read())
        process = self.start()
        self.assertEqual(process.wait(timeout=10), audit.CHAIN_BROKEN_EXIT_CODE)
        self.assertIn("event=audit_chain_broken", self.log_text())
        self.assertIn("line=2", self.log_text())
        self.assertEqual((read_lines(self.path), open(audit.head_path(self.path), "rb").read()), before)
        ok, line, reason = audit.verify_file(self.path)
        self.assertEqual((False, 2), (ok, line), reason)
        self.assertEqual(self.logged_ids(schema.PANIC_STREAM), [entry_id])

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
        self.redis = self.client("test-admin")
        self.redis.xadd(schema.PANIC_STREAM, panic_fields(2))
        self.redis.xadd(schema.COMPLETED_STREAM, report_fields(2))
        wait_for(lambda: len(self.lines()) == 4, 15, message=f"the new events\n{self.log_text()}")
        self.assertEqual([obj["fields"]["event_id"] for obj in self.lines()], ["ev-1", "ev-1", "ev-2", "ev-2"])
        self.assertIn("event=stream_reset stream=system:panic_close:completed", self.log_text())
        self.assert_verifies()


if __name__ == "__main__":
    unittest.main()

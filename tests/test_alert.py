"""The alert notifier (eexit/alert.py): the pure core by tables, the daemon as a real process
against a real redis-server and real HTTP receivers on 127.0.0.1 (a webhook, a fake of
Telegram's sendMessage)."""

import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from eexit import alert, bus, schema
from eexit.config import ConfigError
from tests.harness import (ROOT, NotifySocket, RedisTestCase, free_port, python_env, start_module, stop_process,
                           wait_for)

TOKEN = "123456:not-a-real-token"
WEBHOOK_KEY = "not-a-real-webhook-key"
ID_IN_TEXT = re.compile(r"\(id ([^)]+)\)")


# ---------------------------------------------------------------- receivers ----

class Receiver:
    """An HTTP server on 127.0.0.1 recording every request. gate: when set to a number n,
    requests after the n-th are held (not answered) until release()."""

    def __init__(self, telegram=False, port=None):
        self.telegram = telegram
        self.port = port or free_port()
        self.requests = []            # (path, headers, body) in arrival order
        self.answered = []            # ids answered 200
        self.lock = threading.Lock()
        self.hold_after = None
        self.released = threading.Event()
        self.server = None

    def id_of(self, path, headers, body):
        if self.telegram:
            match = ID_IN_TEXT.search(json.loads(body)["text"])
            return match.group(1) if match else None
        return headers.get(alert.ID_HEADER)

    def start(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append((self.path, dict(self.headers), body))
                    held = receiver.hold_after is not None and len(receiver.requests) > receiver.hold_after
                if held:
                    receiver.released.wait(120)
                if receiver.telegram and self.path != f"/bot{TOKEN}/sendMessage":
                    answer, code = {"ok": False, "description": "Not Found"}, 404
                else:
                    answer, code = ({"ok": True, "result": {}} if receiver.telegram else {}), 200
                data = json.dumps(answer).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    return    # the notifier was killed while we held its request
                if code == 200:
                    with receiver.lock:
                        receiver.answered.append(receiver.id_of(self.path, dict(self.headers), body))

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self.server is not None:
            self.released.set()
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def ids(self):
        with self.lock:
            return [self.id_of(*request) for request in self.requests]

    def ids_of(self, kind):
        return [mid for mid in self.ids() if mid and mid.startswith(kind + ":")]


# ---------------------------------------------------------------- the pure core ----

class AlertsForEntryTest(unittest.TestCase):
    def test_table(self):
        panic = {"event_id": "e1", "reason": "brain_silent", "issued_by": "watchdog", "ts": "5"}
        rows = [
            (schema.PANIC_STREAM, panic, "panic", "PUBLISHED", True),
            (schema.COMPLETED_STREAM, {"event_id": "e1", "status": "FLAT"}, "report", "FLAT", False),
            (schema.COMPLETED_STREAM, {"event_id": "e1", "status": "DUPLICATE"}, "report", "DUPLICATE", False),
            (schema.COMPLETED_STREAM, {"event_id": "e1", "status": "RESIDUAL"}, "report", "RESIDUAL", True),
            (schema.COMPLETED_STREAM, {"event_id": "e1", "status": "FAILED"}, "report", "FAILED", True),
            (schema.COMPLETED_STREAM, {"event_id": "e1", "status": "REJECTED"}, "report", "REJECTED", True),
            (schema.COMPLETED_STREAM, {"event_id": "e1", "status": "garbage"}, "report", "garbage", True),
            (schema.COMPLETED_STREAM, {"event_id": "e1"}, "report", "?", True),
            (schema.COMPLETED_STREAM, {"event_id": "e2", "status": "FLAT", "reason": "HALT_VIOLATION"},
             "halt_violation", "FLAT", True),
            (alert.OPS_AUDIT_STREAM, {"action": "resume", "event_id": "e1", "ts": "77", "operator": "ann"},
             "resume", "RESUMED", False),
            (alert.RISK_EVENTS_STREAM, {"kind": "risk_warning", "rule": "drawdown", "context": "{}"},
             "risk_warning", "RISK_WARNING", False),
            (alert.RISK_EVENTS_STREAM, {"kind": "breach_while_halted", "rule": "margin"},
             "risk_warning", "BREACH_WHILE_HALTED", True),
            (alert.RISK_EVENTS_STREAM, {"kind": "rebase", "status": "refused", "why": "signature: sig_mismatch"},
             "risk_warning", "REBASE", True),
        ]
        for quiet in ({"kind": "risk_recovered"}, {"kind": "baseline"}, {"kind": "rebase", "status": "accepted"}):
            self.assertEqual(alert.alerts_for_entry(alert.RISK_EVENTS_STREAM, "1-0", quiet), [])
        for stream, fields, kind, status, human in rows:
            with self.subTest(stream=stream, fields=fields):
                (msg,) = alert.alerts_for_entry(stream, "1700000000000-3", fields)
                self.assertEqual((msg["kind"], msg["status"], msg["needs_human"]), (kind, status, human))
                for key in ("kind", "event_id", "status", "reason", "ts", "text", "id"):
                    self.assertIn(key, msg)
                self.assertIn(f"(id {msg['id']})", msg["text"])
                self.assertEqual(("NEEDS A HUMAN" in msg["text"]), human)
        self.assertEqual(alert.alerts_for_entry(alert.OPS_AUDIT_STREAM, "1-0", {"action": "other"}), [])
        (resume,) = alert.alerts_for_entry(alert.OPS_AUDIT_STREAM, "1-0", {"action": "resume", "ts": "77"})
        self.assertEqual(resume["id"], "resume:77")

    def test_ids_are_stable(self):
        fields = {"event_id": "e1", "status": "FLAT"}
        first = alert.alerts_for_entry(schema.COMPLETED_STREAM, "9-1", fields)
        self.assertEqual(first, alert.alerts_for_entry(schema.COMPLETED_STREAM, "9-1", fields))
        self.assertEqual(first[0]["id"], "report:9-1")

    def test_trading_state(self):
        cleared = {"halted": "false", "cleared_at": "77", "cleared_by": "ann", "event_id": "e1"}
        rows = [
            (None, {"halted": "false"}, False, []),          # first look: a baseline, no alert
            (None, {}, True, []),
            (True, {"halted": "true"}, True, []),
            (False, {"halted": "true"}, True, []),           # halting: the panic/report say it
            (True, cleared, False, ["resume:77"]),           # same id as the ops audit entry
            (True, {"halted": "0"}, False, ["resume:500"]),  # no cleared_at: Redis time
            (True, {"halted": "maybe"}, True, []),           # unreadable counts as halted
            (False, {"halted": "false"}, False, []),
        ]
        for previous, fields, halted, ids in rows:
            with self.subTest(previous=previous, fields=fields):
                now, msgs = alert.trading_alerts(previous, fields, 500)
                self.assertEqual((now, [m["id"] for m in msgs]), (halted, ids))

    def test_daemon_episodes(self):
        silent_ms = 1000
        beat = {"service_id": "eew", "status": "OK"}
        auth = {"service_id": "eew", "status": "DEGRADED", "reason": "exchange_authentication"}
        steps = [  # (last entry, now_ms, expected (kind, status) list)
            (("1000-0", beat), 1500, []),
            (("1000-0", beat), 2500, [("daemon_silent", "SILENT")]),
            (("1000-0", beat), 9000, []),                            # one per episode
            (("9000-0", beat), 9100, [("daemon_silent", "BACK")]),
            (("9100-0", auth), 9200, [("exchange_auth", "DEGRADED")]),
            (("9300-0", auth), 9400, []),                            # one per episode
            (("9300-0", auth), 20000, [("daemon_silent", "SILENT")]),
            (("20000-0", auth), 20001, [("daemon_silent", "BACK")]),  # the auth episode goes on
            (("20100-0", beat), 20200, [("exchange_auth", "CLEARED")]),
            (None, 20300, [("daemon_silent", "SILENT")]),            # stream gone: silent
        ]
        state, ids = None, []
        for last, now, expected in steps:
            state, msgs = alert.daemon_alerts("eew", state, last, now, silent_ms)
            self.assertEqual([(m["kind"], m["status"]) for m in msgs], expected, (last, now))
            ids.extend(m["id"] for m in msgs)
        self.assertEqual(len(ids), len(set(ids)), "every episode message has its own id")
        # Only the EEW's DEGRADED-with-reason is an exchange authentication alert.
        _, msgs = alert.daemon_alerts("exit_brain", None, ("1000-0", dict(auth, service_id="b")), 1001, silent_ms)
        self.assertEqual(msgs, [])
        # Equal state in, equal state out: a restart with the persisted state says nothing new.
        again, msgs = alert.daemon_alerts("eew", state, None, 20400, silent_ms)
        self.assertEqual((again, msgs), (state, []))


class BackoffTest(unittest.TestCase):
    def test_delays(self):
        self.assertEqual([alert.retry_delay_s(n, 1, 300) for n in range(1, 12)],
                         [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300])
        self.assertEqual(alert.retry_delay_s(10 ** 6, 0.5, 7), 7)

    def test_default_schedule_retries_for_at_least_an_hour(self):
        config = alert.Config.from_env({"EEXIT_ALERT_OUTBOX": os.path.join(tempfile.gettempdir(), "o.jsonl"),
                                        "EEXIT_ALERT_NTFY_URL": "https://ntfy.example/t"})
        schedule = alert.retry_schedule(config.retry_start_s, config.retry_max_s, config.retry_for_s)
        self.assertGreaterEqual(sum(schedule), 3600)
        self.assertGreaterEqual(config.retry_for_s, 3600)
        self.assertLessEqual(max(schedule), config.retry_max_s)
        self.assertGreater(len(schedule), 100)

    def test_retryable(self):
        for status, retry in ((None, True), (500, True), (503, True), (429, True), (408, True),
                              (400, False), (401, False), (403, False), (404, False)):
            self.assertEqual(alert.is_retryable(status), retry, status)


class OutboxStateTest(unittest.TestCase):
    def msg(self, mid):
        return {"id": mid, "kind": "panic", "text": mid}

    def test_transitions(self):
        state = alert.empty_state()
        state = alert.apply(state, {"op": "read", "cursors": {"s": "1-0"}, "msgs": [self.msg("a"), self.msg("b")],
                                    "sinks": ["webhook", "telegram"], "at": 1})
        self.assertEqual(alert.pending_for(state, "webhook"), ["a", "b"])
        state = alert.apply(state, {"op": "done", "id": "a", "sink": "webhook", "at": 2, "result": "delivered"})
        self.assertEqual(alert.pending_for(state, "webhook"), ["b"])
        self.assertEqual(alert.pending_for(state, "telegram"), ["a", "b"])
        state = alert.apply(state, {"op": "done", "id": "a", "sink": "telegram", "at": 3, "result": "rejected"})
        self.assertNotIn("a", state["messages"])
        self.assertEqual(state["last"]["telegram"], {"id": "a", "at": 3, "result": "rejected"})
        # A repeated done, or one for an unknown id, changes nothing but `last`.
        state = alert.apply(state, {"op": "done", "id": "a", "sink": "webhook", "at": 4, "result": "delivered"})
        self.assertEqual(sorted(state["messages"]), ["b"])
        # An id already seen is never queued again (a Redis restart gave the same ids back).
        state = alert.apply(state, {"op": "read", "cursors": {"s": "2-0"}, "msgs": [self.msg("a")],
                                    "sinks": ["webhook"], "at": 5})
        self.assertEqual(sorted(state["messages"]), ["b"])
        self.assertEqual(state["cursors"], {"s": "2-0"})
        state = alert.apply(state, {"op": "read", "trading": True, "daemons": {"eew": {"silent": None, "auth": None}},
                                    "msgs": [], "sinks": ["webhook"], "at": 6})
        self.assertEqual((state["trading"], state["cursors"]), (True, {"s": "2-0"}))
        # A snapshot (compaction) restores the same state.
        record = json.loads(json.dumps(alert.snapshot(state)))
        self.assertEqual(alert.apply(alert.empty_state(), record), state)

    def test_outbox_file_survives_a_torn_line_and_refuses_a_corrupt_one(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "outbox.jsonl")
        log = alert.Logger("test", stream=open(os.devnull, "w"))
        box = alert.Outbox(path, log).open()
        box.append({"op": "read", "cursors": {}, "msgs": [self.msg("a")], "sinks": ["w"], "at": 1})
        os.close(box.fd)
        with open(path, "ab") as f:
            f.write(b'{"op":"done","id":"a"')              # killed mid-write
        box = alert.Outbox(path, log).open()
        self.assertEqual(alert.pending_for(box.state, "w"), ["a"])
        box.append({"op": "done", "id": "a", "sink": "w", "at": 2, "result": "delivered"})
        os.close(box.fd)
        box = alert.Outbox(path, log).open()
        self.assertEqual(box.state["messages"], {})
        os.close(box.fd)
        with open(path, "r+b") as f:
            f.write(b"x")
        with self.assertRaises(alert.OutboxCorrupt):
            alert.Outbox(path, log).open()


    def test_compaction_keeps_the_state(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "outbox.jsonl")
        log = alert.Logger("test", stream=open(os.devnull, "w"))
        saved = alert.COMPACT_AFTER_LINES
        alert.COMPACT_AFTER_LINES = 3
        self.addCleanup(setattr, alert, "COMPACT_AFTER_LINES", saved)
        box = alert.Outbox(path, log).open()
        for number in range(7):
            box.append({"op": "read", "cursors": {"s": f"{number}-0"}, "msgs": [self.msg(f"m{number}")],
                        "sinks": ["w"], "at": number})
        box.append({"op": "done", "id": "m0", "sink": "w", "at": 9, "result": "delivered"})
        state = json.loads(json.dumps(box.state))
        os.close(box.fd)
        with open(path, encoding="utf-8") as f:
            self.assertLess(len(f.read().splitlines()), 4)
        reopened = alert.Outbox(path, log).open()
        self.addCleanup(os.close, reopened.fd)
        self.assertEqual(reopened.state, state)
        self.assertEqual(alert.pending_for(reopened.state, "w"), [f"m{n}" for n in range(1, 7)])


class SinkAndConfigTest(unittest.TestCase):
    def test_webhook_hmac_signs_the_exact_body(self):
        sink = alert.Sink("webhook", "http://127.0.0.1:1/hook", "webhook", hmac_key=WEBHOOK_KEY)
        msg = alert.make_message("panic", "panic:1-0", "e1", "PUBLISHED", "r", 5)
        _url, body, headers = sink.request(msg)
        expected = hmac.new(WEBHOOK_KEY.encode(), body, hashlib.sha256).hexdigest()
        self.assertEqual(headers[alert.SIGNATURE_HEADER], f"sha256={expected}")
        self.assertEqual(headers[alert.ID_HEADER], "panic:1-0")
        self.assertEqual(json.loads(body)["id"], "panic:1-0")
        self.assertNotIn(alert.SIGNATURE_HEADER, alert.Sink("w", "http://x/", "webhook").request(msg)[2])

    def test_config_refusals_name_the_setting(self):
        directory = tempfile.mkdtemp()
        base = {"EEXIT_ALERT_OUTBOX": os.path.join(directory, "o.jsonl")}
        rows = [
            ({}, "no alert sink"),
            ({"EEXIT_ALERT_WEBHOOK_URL": "ftp://x/"}, "EEXIT_ALERT_WEBHOOK_URL"),
            ({"EEXIT_ALERT_NTFY_URL": "not a url"}, "EEXIT_ALERT_NTFY_URL"),
            ({"EEXIT_ALERT_TELEGRAM_CHAT_ID": "42"}, "telegram_bot_token"),
            ({"EEXIT_ALERT_NTFY_URL": "https://n/t", "EEXIT_ALERT_RETRY_FOR_S": "60"}, "EEXIT_ALERT_RETRY_FOR_S"),
            ({"EEXIT_ALERT_NTFY_URL": "https://n/t", "EEXIT_ALERT_RETRY_START_S": "5",
              "EEXIT_ALERT_RETRY_MAX_S": "1"}, "EEXIT_ALERT_RETRY_MAX_S"),
            ({"EEXIT_ALERT_NTFY_URL": "https://n/t", "EEXIT_ALERT_SILENT_S": "0"}, "EEXIT_ALERT_SILENT_S"),
            ({"EEXIT_ALERT_NTFY_URL": "https://n/t", "EEXIT_ALERT_OUTBOX": "/nonexistent/dir/o"}, "EEXIT_ALERT_OUTBOX"),
        ]
        for extra, fragment in rows:
            with self.subTest(extra=extra):
                with self.assertRaises(ConfigError) as caught:
                    alert.Config.from_env(dict(base, **extra))
                self.assertIn(fragment, str(caught.exception))
        creds = tempfile.mkdtemp()
        with open(os.path.join(creds, "telegram_bot_token"), "w") as f:
            f.write(TOKEN)
        telegram = dict(base, EEXIT_ALERT_TELEGRAM_CHAT_ID="42", CREDENTIALS_DIRECTORY=creds,
                        EEXIT_ALERT_TELEGRAM_API="http://api.telegram.org")
        with self.assertRaises(ConfigError) as caught:
            alert.Config.from_env(telegram)
        self.assertIn("EEXIT_ALERT_TELEGRAM_API", str(caught.exception))
        self.assertNotIn(TOKEN, str(caught.exception))
        config = alert.Config.from_env(dict(telegram, EEXIT_ALERT_TELEGRAM_API="http://127.0.0.1:9/"))
        self.assertEqual(config.sinks[0].url, f"http://127.0.0.1:9/bot{TOKEN}/sendMessage")

    def test_outbox_status_parses_the_heartbeat(self):
        fields = {"status": "OK", "pending": "2", "sink_webhook_pending": "1", "sink_webhook_last_id": "panic:1-0",
                  "sink_webhook_last_at": "5", "sink_telegram_error": "HTTP 500"}
        status = alert.outbox_status(("1000-0", fields), 1500)
        self.assertEqual((status["age_ms"], status["pending"]), (500, 2))
        self.assertEqual(status["sinks"]["webhook"]["last_id"], "panic:1-0")
        self.assertEqual(status["sinks"]["telegram"]["error"], "HTTP 500")
        self.assertEqual(alert.outbox_status(None, 1)["age_ms"], None)


# ---------------------------------------------------------------- the daemon ----

class AlertDaemonTest(RedisTestCase):
    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="eexit-alert-")
        self.outbox = os.path.join(self.dir, "outbox.jsonl")
        self.log_path = os.path.join(self.dir, "alert.log")
        self.creds = os.path.join(self.dir, "creds")
        os.mkdir(self.creds)
        for name, value in (("telegram_bot_token", TOKEN), ("alert_webhook_key", WEBHOOK_KEY)):
            with open(os.path.join(self.creds, name), "w") as f:
                f.write(value + "\n")
        self.processes = []
        self.webhook = Receiver()
        self.telegram = Receiver(telegram=True)
        self.addCleanup(self.webhook.stop)
        self.addCleanup(self.telegram.stop)

    def tearDown(self):
        for process in self.processes:
            stop_process(process)
        super().tearDown()

    def start(self, **more):
        settings = dict(REDIS_URL=self.redis_server.url, EEXIT_ALERT_OUTBOX=self.outbox,
                        EEXIT_ALERT_WEBHOOK_URL=self.webhook.url() + "/hook",
                        EEXIT_ALERT_TELEGRAM_CHAT_ID="42", EEXIT_ALERT_TELEGRAM_API=self.telegram.url(),
                        EEXIT_ALERT_POLL_S="0.05", EEXIT_ALERT_RETRY_START_S="0.05",
                        EEXIT_ALERT_RETRY_MAX_S="0.2", CREDENTIALS_DIRECTORY=self.creds)
        settings.update(more)
        process = start_module("eexit.alert", python_env(**settings), self.log_path)
        self.processes.append(process)
        wait_for(lambda: "event=ready" in self.log_text() or process.poll() is not None, 20,
                 message="the notifier to start")
        self.assertIsNone(process.poll(), self.log_text())
        return process

    def log_text(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def records(self):
        with open(self.outbox, encoding="utf-8") as f:
            return [json.loads(line) for line in f.read().splitlines() if line.strip()]

    def delivered(self):
        """[(id, sink)] of every `delivered` record in the outbox, in order."""
        return [(r["id"], r["sink"]) for r in self.records() if r["op"] == "done" and r["result"] == "delivered"]

    def queued_panic_ids(self):
        return [m["id"] for r in self.records() if r["op"] == "read" for m in r["msgs"] if m["kind"] == "panic"]

    def wait_for_ids(self, receiver, ids, message):
        wait_for(lambda: set(ids) <= set(receiver.ids()), 60,
                 message=f"{message}: missing {set(ids) - set(receiver.ids())}\n{self.log_text()[-3000:]}")

    def publish_panic(self, number):
        return self.redis.xadd(schema.PANIC_STREAM, {"event_id": f"ev-{number}", "reason": "drill",
                                                     "issued_by": "ops", "ts": "1"}).decode()

    def test_panic_report_violation_and_resume_each_delivered_once_to_webhook_and_telegram(self):
        self.webhook.start()
        self.telegram.start()
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "ev-1"})
        self.start(EEXIT_ALERT_SILENT_S="3600")
        wait_for(lambda: self.redis.xlen(alert.ALERT_HEARTBEAT_STREAM) > 0, 20, message="the first heartbeat")
        panic = self.publish_panic(1)
        report = self.redis.xadd(schema.COMPLETED_STREAM, {"event_id": "ev-1", "status": "FLAT"}).decode()
        violation = self.redis.xadd(schema.COMPLETED_STREAM, {"event_id": "ev-2", "status": "FLAT",
                                                              "reason": "HALT_VIOLATION"}).decode()
        # What `eexit resume` writes: the state change and the audit entry, one timestamp.
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "cleared_by": "ann",
                                                           "cleared_at": "1700000000123"})
        self.redis.xadd(alert.OPS_AUDIT_STREAM, {"action": "resume", "operator": "ann", "event_id": "ev-1",
                                                 "ts": "1700000000123"})
        auth = self.redis.xadd(schema.EEW_HEARTBEAT_STREAM, {"service_id": "eew-1", "status": "DEGRADED",
                                                             "reason": "exchange_authentication"}).decode()
        expected = [f"panic:{panic}", f"report:{report}", f"halt_violation:{violation}", "resume:1700000000123",
                    f"exchange_auth:{auth}"]
        for receiver in (self.webhook, self.telegram):
            self.wait_for_ids(receiver, expected, "every kind delivered")
        wait_for(lambda: all((mid, sink) in self.delivered() for mid in expected for sink in ("webhook", "telegram")),
                 20, message="the deliveries recorded")
        # A later event, delivered after everything above (one sink delivers in order): any
        # repeat of the four would have arrived before it.
        last = f"panic:{self.publish_panic(2)}"
        for receiver in (self.webhook, self.telegram):
            self.wait_for_ids(receiver, [last], "the later event")
            for mid in expected:
                self.assertEqual(receiver.ids().count(mid), 1, mid)
        for mid in expected:
            for sink in ("webhook", "telegram"):
                self.assertEqual(self.delivered().count((mid, sink)), 1, (mid, sink))
        # The webhook payload: fields, HMAC over the exact body, no secret anywhere.
        for path, headers, body in self.webhook.requests:
            payload = json.loads(body)
            for key in ("kind", "event_id", "status", "reason", "ts", "text", "id"):
                self.assertIn(key, payload)
            digest = hmac.new(WEBHOOK_KEY.encode(), body, hashlib.sha256).hexdigest()
            self.assertEqual(headers[alert.SIGNATURE_HEADER], f"sha256={digest}")
            self.assertNotIn(TOKEN, body.decode())
        by_id = {json.loads(body)["id"]: json.loads(body) for _p, _h, body in self.webhook.requests}
        self.assertEqual((by_id[expected[1]]["status"], by_id[expected[1]]["event_id"]), ("FLAT", "ev-1"))
        self.assertEqual(by_id[expected[2]]["reason"], "HALT_VIOLATION")
        self.assertTrue(by_id[expected[2]]["needs_human"])
        for path, _headers, body in self.telegram.requests:
            self.assertEqual(path, f"/bot{TOKEN}/sendMessage")
            self.assertEqual(json.loads(body)["chat_id"], "42")
        # No heartbeats but the EEW's one: each daemon reported silent once, the EEW back once.
        self.assertEqual(sorted(m.rsplit(":", 1)[-1] for m in self.webhook.ids_of("daemon_silent")),
                         ["back", "eew", "exit_brain", "watchdog"])
        for secret in (TOKEN, WEBHOOK_KEY):
            self.assertNotIn(secret, self.log_text())
            with open(self.outbox, encoding="utf-8") as f:
                self.assertNotIn(secret, f.read())
        # `eexit status` reads the outbox from the notifier's heartbeat.
        wait_for(lambda: (s := alert.read_outbox_status(self.redis, bus.server_time_ms(self.redis)))["pending"] == 0
                 and s["sinks"].get("webhook", {}).get("last_id") == last, 20, message="status shows the outbox")
        status = subprocess.run([sys.executable, "-m", "eexit.cli", "status"], capture_output=True, text=True,
                                env=python_env(REDIS_URL=self.redis_server.url), cwd=ROOT, timeout=60)
        self.assertIn("alerts: pending=0", status.stdout)
        self.assertRegex(status.stdout, rf"webhook +pending=0 last delivered {re.escape(last)}")

    def test_kill_9_in_a_burst_of_50_loses_nothing_and_acknowledges_each_id_once(self):
        """Guarantee: at-least-once per sink with a stable id. Every event is received at
        least once; each id is recorded delivered exactly once per sink. The kill lands while
        the webhook holds a request, so that one is re-sent after the restart (same id)."""
        self.webhook.hold_after = 5
        self.webhook.start()
        self.telegram.start()
        first = self.start()
        wait_for(lambda: self.redis.xlen(alert.ALERT_HEARTBEAT_STREAM) > 0, 20, message="the first heartbeat")
        ids = [f"panic:{self.publish_panic(n)}" for n in range(50)]
        wait_for(lambda: len(self.webhook.requests) >= 6, 30, message="the webhook holding a request")
        held = self.webhook.ids()[5]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        self.webhook.hold_after = None
        self.webhook.released.set()
        self.start()
        for receiver in (self.webhook, self.telegram):
            self.wait_for_ids(receiver, ids, "every event after the restart")
        wait_for(lambda: all((mid, sink) in self.delivered() for mid in ids for sink in ("webhook", "telegram")),
                 30, message="every delivery recorded")
        self.assertEqual(sorted(self.queued_panic_ids()), sorted(ids), "each event queued exactly once")
        for sink in ("webhook", "telegram"):
            for mid in ids:
                self.assertEqual(self.delivered().count((mid, sink)), 1, (mid, sink))
        self.assertGreaterEqual(self.webhook.ids().count(held), 2, "the held request was sent again, same id")

    def test_a_receiver_down_for_several_retries_gets_everything_when_it_returns(self):
        self.telegram.start()                     # the webhook is down: nothing listens on its port
        self.start()
        mid = f"panic:{self.publish_panic(1)}"
        self.wait_for_ids(self.telegram, [mid], "the other sink is not delayed")
        wait_for(lambda: self.log_text().count(f"sink=webhook id={mid}") >= 4, 60,
                 message="several failed webhook attempts")
        self.assertIn("event=delivery_failed sink=webhook", self.log_text())
        self.webhook.start()
        self.wait_for_ids(self.webhook, [mid], "delivered after the receiver returned")
        wait_for(lambda: (mid, "webhook") in self.delivered(), 20, message="recorded")

    def test_a_hanging_receiver_does_not_delay_another_sink(self):
        self.webhook.hold_after = 0               # holds its first request, answers nothing
        self.webhook.start()
        self.telegram.start()
        self.start(EEXIT_ALERT_HTTP_TIMEOUT_S="60")
        ids = [f"panic:{self.publish_panic(n)}" for n in range(10)]
        self.wait_for_ids(self.telegram, ids, "telegram gets everything while the webhook hangs")
        self.assertEqual(len(self.webhook.requests), 1, "the webhook still holds its first request")
        self.assertEqual(self.webhook.answered, [])
        self.webhook.released.set()
        self.webhook.hold_after = None
        self.wait_for_ids(self.webhook, ids, "the webhook catches up once it answers")

    def test_ntfy_sink_end_to_end(self):
        ntfy = Receiver().start()
        self.addCleanup(ntfy.stop)
        self.start(EEXIT_ALERT_WEBHOOK_URL="", EEXIT_ALERT_TELEGRAM_CHAT_ID="",
                   EEXIT_ALERT_NTFY_URL=ntfy.url() + "/eexit-topic")
        report = self.redis.xadd(schema.COMPLETED_STREAM, {"event_id": "ev-9", "status": "RESIDUAL"}).decode()
        mid = f"report:{report}"
        self.wait_for_ids(ntfy, [mid], "the ntfy topic")
        (path, headers, body), = [r for r in ntfy.requests if r[1].get(alert.ID_HEADER) == mid]
        self.assertEqual(path, "/eexit-topic")
        self.assertEqual((headers["Priority"], headers["Tags"]), ("5", "report"))
        self.assertTrue(body.decode().startswith("[eexit] NEEDS A HUMAN: report RESIDUAL event=ev-9"))

    def test_a_sink_refusing_a_message_gives_it_up_and_goes_on(self):
        with open(os.path.join(self.creds, "telegram_bot_token"), "w") as f:
            f.write("999:revoked-token\n")            # the fake answers 404 to any other token
        self.webhook.start()
        self.telegram.start()
        self.start()
        ids = [f"panic:{self.publish_panic(n)}" for n in range(3)]
        self.wait_for_ids(self.webhook, ids, "the webhook is not affected")

        def rejected():
            return {r["id"] for r in self.records() if r["op"] == "done" and r["sink"] == "telegram"
                    and r["result"] == "rejected"}
        wait_for(lambda: set(ids) <= rejected(), 30, message=f"each refused message given up\n{self.log_text()}")
        self.assertIn("event=alert_given_up sink=telegram", self.log_text())
        self.assertEqual(len(self.telegram.ids()), len(set(self.telegram.ids())), "a 4xx is never retried")
        self.assertNotIn("revoked-token", self.log_text())

    def test_ready_and_watchdog_pings_to_systemd(self):
        sock = NotifySocket()
        self.addCleanup(sock.close)
        self.webhook.start()
        self.start(**sock.env(watchdog_usec=2_000_000))
        wait_for(lambda: sock.times_of("READY=1") and len(sock.times_of("WATCHDOG=1")) >= 3, 20,
                 message="READY and watchdog pings")
        self.assertLess(sock.times_of("READY=1")[0], sock.times_of("WATCHDOG=1")[0])

    def test_bad_configuration_exits_2(self):
        env = python_env(REDIS_URL=self.redis_server.url, EEXIT_ALERT_OUTBOX=self.outbox)
        result = subprocess.run([sys.executable, "-m", "eexit.alert"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("no alert sink configured", result.stderr)


if __name__ == "__main__":
    unittest.main()

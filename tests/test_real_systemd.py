"""Issue 23 under the machine's real systemd booted as PID 1 (tests/systemd_harness.py): the
project installed by tools/install_offline.py with the distribution's /usr/bin/python3, units
as installed, eexit's own redis-server@eexit, the paper exchange (`python -m eexit.paper`) as
the venue, all on the namespace's loopback. One boot for the class; each test starts from a
resumed, healthy system with positions and resting + conditional orders (setUp).

What systemd does here is the subject: READY and StatusText of Type=notify units, the crash
path (ExecStopPost=+ handing the crash to the running eexit-crash-listener.service through its
root-only FIFO, and, when the listener is stopped, starting eexit-brain-crash@.service with its
own credentials: the fallback), restarts
after kill -9, systemd's watchdog kills of a SIGSTOPped brain and EEW, a crash unit that
cannot start. Not testable here: an OOM kill (this host binds the memory controller to cgroup
v1, so MemoryMax= is not enforced inside; systemd reports it as SERVICE_RESULT=oom-kill
through the same ExecStopPost=, a branch test_hook.py runs). Waits are for events (a report,
a heartbeat, a journal line), never fixed sleeps; nothing here is timed (bench/crash_systemd.py)."""

import os
import re
import signal
import unittest

from eexit import schema
from tests.systemd_harness import DAEMON_UNITS, EexitHost, require_systemd

SEED = [{"symbol": "BTCUSDT", "amount": "0.01"}, {"symbol": "ETHUSDT", "amount": "-0.5"},
        {"symbol": "SOLUSDT", "amount": "3"}]
HOOK_KEY_FILE = "/etc/eexit/credentials/hook/hook_hmac_key"
LISTENER = "eexit-crash-listener.service"
# The crash path's journal identifiers: the oneshot crash unit and the crash listener.
ONESHOT_ID, LISTENER_ID = "eexit-hook", "eexit-crash-listener"
FINAL = ("FLAT", "RESIDUAL", "FAILED")


class RealSystemdCrashPathTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_systemd()
        cls.host = EexitHost("crashpath")
        cls.host.start()
        cls.addClassCleanup(cls.host.stop)
        cls.host.configure()
        cls.host.start_units()
        cls.redis = cls.host.redis()
        # Warnings systemd logged about an eexit unit while loading and starting them (before
        # any test kills something, which systemd rightly logs as a warning).
        cls.start_warnings = [e["MESSAGE"] for e in cls.host.journal(priority=4, identifier="systemd")
                              if "eexit" in e["MESSAGE"]]

    # ------------------------------------------------------------------ helpers

    def setUp(self):
        """Resumed, every unit active, positions + a resting and a conditional order, the brain
        heartbeating them; the panic stream's position remembered."""
        host = self.host
        # Every unit up first: a resume while the brain is down is answered by a new panic
        # (the watchdog's incident ends at the resume, and the dead brain is a new incident).
        host.systemctl("reset-failed", "eexit-brain.service", check=False)
        for unit in DAEMON_UNITS:
            if host.show(unit, "ActiveState") != "active":
                host.systemctl("start", unit)
            host.wait_active(unit)
        state = self.state()
        if state.halted:
            host.eexit("resume", "--operator", "test", "--ack", state.event_id, "--accept-residual")
        host.wait_for(lambda: not self.state().halted, 30, "the halt cleared")
        host.paper("POST", "/_paper/state", {"clear_positions": True, "clear_orders": True, "positions": SEED})
        host.paper_order("BTCUSDT", "SELL", "0.01", price="200000")
        host.paper_order("BTCUSDT", "SELL", "0.01", trigger="1000")
        host.wait_for(lambda: self.beat().get("active_positions") == str(len(SEED)) and self.beat().get("status") == "OK",
                      60, "the brain beating OK with the seeded positions")
        last = self.redis.xrevrange(schema.PANIC_STREAM, count=1)
        self.since = last[0][0] if last else "0-0"
        self.hook_runs_before = self.hook_runs()

    def state(self):
        return schema.TradingState.from_fields(self.redis.hgetall(schema.TRADING_STATE_KEY))[0]

    def beat(self):
        entries = self.redis.xrevrange(schema.HEARTBEAT_STREAM, count=1)
        return entries[0][1] if entries else {}

    def new_panics(self):
        return [fields for _id, fields in self.redis.xrange(schema.PANIC_STREAM, f"({self.since}")]

    def final_report(self, event_id):
        for _id, fields in self.redis.xrange(schema.COMPLETED_STREAM):
            if fields.get("event_id") == event_id and fields.get("status") in FINAL:
                return fields
        return None

    def wait_flat(self, timeout=60):
        """The first new panic's final report: FLAT, the halt holds, the paper account flat."""
        try:
            event_id = self.host.wait_for(lambda: self.new_panics() and self.new_panics()[0]["event_id"], timeout,
                                          "a panic")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nwatchdog:\n{self.host.journal_text('eexit-watchdog.service', 25)}\n"
                                 f"brain:\n{self.host.journal_text('eexit-brain.service', 25)}") from None
        report = self.host.wait_for(lambda: self.final_report(event_id), timeout, f"the report of {event_id}")
        self.assertEqual(report["status"], "FLAT", report)
        state = self.state()
        self.assertEqual((state.halted, state.event_id), (True, event_id),
                         [(p["event_id"], p["issued_by"], p["reason"]) for p in self.new_panics()])
        self.assertEqual(self.host.paper_exposure(), ([], [], []))
        return event_id

    def kill_brain(self, sig=signal.SIGKILL):
        pid = self.host.host_pid("eexit-brain.service")
        os.kill(pid, sig)
        return pid

    def wait_brain_back(self, old_pid):
        self.host.wait_for(lambda: self.host.host_pid("eexit-brain.service") not in (0, old_pid), 60,
                           "the brain restarted")
        self.host.wait_active("eexit-brain.service")

    def settle(self):
        """After the brain is back: one heartbeat of it, then two of the watchdog's (it beats
        after acting in the same step), so a rule that fired for the gap has published."""
        beats, watchdog_beats = self.redis.xlen(schema.HEARTBEAT_STREAM), self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM)
        self.host.wait_for(lambda: self.redis.xlen(schema.HEARTBEAT_STREAM) > beats, 30, "a heartbeat of the new brain")
        self.host.wait_for(lambda: self.redis.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) > watchdog_beats + 1, 30,
                           "the watchdog's heartbeats after it")

    def hook_runs(self, grep=None):
        """Lines of the oneshot crash unit (the fallback)."""
        return len(self.host.journal(identifier=ONESHOT_ID, grep=grep))

    def crash_path_lines(self, grep=None):
        """The hook's lines from either path (listener, then oneshot)."""
        return [*self.host.journal(identifier=LISTENER_ID, grep=grep), *self.host.journal(identifier=ONESHOT_ID, grep=grep)]

    # ------------------------------------------------------------------ tests

    def test_a_units_ready_with_status_verified_rated_and_quiet(self):
        for unit in DAEMON_UNITS:
            with self.subTest(unit=unit):
                self.assertEqual((self.host.show(unit, "Type"), self.host.show(unit, "ActiveState"),
                                  self.host.show(unit, "SubState")), ("notify", "active", "running"))
                self.assertTrue(self.host.show(unit, "StatusText"), f"{unit} sent no STATUS=")
        units = [f"/etc/systemd/system/{name}" for name in (*DAEMON_UNITS, "eexit-alert.service")]
        verify = self.host.run(["systemd-analyze", "verify", *units,
                                "/etc/systemd/system/eexit-brain-crash@.service"], check=False)
        self.assertEqual((verify.returncode, verify.stdout + verify.stderr), (0, ""))
        self.assertEqual(self.host.run(["stat", "-c", "%F %a", "/run/eexit-crash-listener/request",
                                        "/run/eexit-crash-listener"]).stdout.split("\n")[:2],
                         ["fifo 600", "directory 700"])
        for unit in (*DAEMON_UNITS, "eexit-brain-crash@signal:killed:KILL.service"):
            with self.subTest(security=unit):
                out = self.host.run(["systemd-analyze", "security", unit], check=False).stdout
                figure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))
                self.assertLessEqual(figure, 1.1, out[-300:])
        self.assertEqual(self.start_warnings, [])

    def test_kill_9_one_panic_flat_halted_and_a_second_kill_adds_none(self):
        """The crash listener publishes (its journal line names the event), not the oneshot."""
        missed = self.host.journal("eexit-brain.service", grep="crash_listener_missed")
        old = self.kill_brain()
        event_id = self.wait_flat()
        panic = self.new_panics()[0]
        self.assertEqual((panic["issued_by"], panic["reason"], panic["kid"]), ("exit_brain", "EXIT_BRAIN_DIED", "hook1"))
        self.assertIn('"hook":"crash-listener"', panic["context"])
        self.assertIn('"service_result":"signal"', panic["context"])
        self.host.wait_journal(None, f"event=panic_published .*event_id={event_id}", identifier=LISTENER_ID)
        self.wait_brain_back(old)
        # A second crash before any human resumed: the crash path stays quiet (the halt holds).
        runs = len(self.crash_path_lines("event=panic_skipped"))
        old = self.kill_brain()
        self.host.wait_for(lambda: len(self.crash_path_lines("event=panic_skipped")) > runs,
                           60, "the crash path's second run")
        self.wait_brain_back(old)
        self.settle()
        self.assertIn("why=latched", self.host.journal(identifier=LISTENER_ID)[-1]["MESSAGE"])
        self.assertEqual(self.hook_runs(), self.hook_runs_before, "the oneshot ran although the listener answered")
        self.assertEqual(self.host.journal("eexit-brain.service", grep="crash_listener_missed"), missed)
        self.assertEqual({p["event_id"] for p in self.new_panics()}, {event_id})
        self.assertEqual([p["status"] for _i, p in self.redis.xrange(schema.COMPLETED_STREAM)
                          if p.get("event_id") == event_id and p.get("status") in FINAL], ["FLAT"])

    def test_brain_kept_down_the_watchdog_flattens(self):
        self.host.systemctl("stop", "eexit-brain.service")        # deliberate: no crash path
        event_id = self.wait_flat()
        (panic,) = {p["event_id"]: p for p in self.new_panics()}.values()
        self.assertEqual((panic["issued_by"], panic["reason"]), ("watchdog", "POSITIONS_UNGUARDED"))
        self.assertEqual(panic["event_id"], event_id)
        self.assertEqual(self.hook_runs(), self.hook_runs_before, "a deliberate stop ran the crash path")

    def test_sigstop_brain_systemd_kills_it_one_panic_flat(self):
        old = self.kill_brain(signal.SIGSTOP)
        event_id = self.wait_flat()
        self.host.wait_journal("eexit-brain.service", "Watchdog timeout", timeout=30)
        self.wait_brain_back(old)
        self.settle()
        self.assertEqual({p["event_id"] for p in self.new_panics()}, {event_id})

    def test_sigstop_eew_panic_meanwhile_flat_after_restart_nothing_pending(self):
        eew = self.host.host_pid("eexit-eew.service")
        os.kill(eew, signal.SIGSTOP)
        old = self.kill_brain()
        self.host.wait_for(self.new_panics, 30, "the crash path's panic")
        event_id = self.wait_flat(timeout=90)          # systemd kills the EEW at ~14.5 s, restarts it
        self.host.wait_journal("eexit-eew.service", "Watchdog timeout", timeout=10)
        self.assertNotEqual(self.host.host_pid("eexit-eew.service"), eew)
        pending = self.redis.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)
        self.assertEqual(pending["pending"], 0, pending)
        self.wait_brain_back(old)
        self.assertEqual({p["event_id"] for p in self.new_panics()}, {event_id})

    def test_an_exit_with_an_error_code_is_a_crash_too(self):
        """SERVICE_RESULT=exit-code (here: the brain refusing a bad setting, exit 2, which is
        not restarted): the same crash path, one panic, FLAT."""
        drop_in = "/etc/systemd/system/eexit-brain.service.d/bad-setting.conf"
        self.host.write(drop_in, "[Service]\nEnvironment=EEXIT_BRAIN_INTERVAL_S=0\n", mode=0o644)
        self.addCleanup(self.host.systemctl, "daemon-reload")
        self.addCleanup(self.host.run, ["rm", "-f", drop_in])
        self.host.systemctl("daemon-reload")
        self.host.systemctl("restart", "eexit-brain.service", check=False)
        event_id = self.wait_flat()
        # The brain's start (imports, then the refusal) may outlast the watchdog's 3 s: then
        # the watchdog published first and the crash path adopted its id or found the halt.
        line = self.host.wait_for(lambda: next(iter(self.crash_path_lines("service_result=exit-code")), None), 60,
                                  "the crash path's line")
        self.assertIn("exit_status=2", line["MESSAGE"])
        self.assertRegex(line["MESSAGE"], "event=panic_published|why=latched")
        self.assertEqual({p["event_id"] for p in self.new_panics()}, {event_id})
        self.assertEqual(self.host.show("eexit-brain.service", "ActiveState"), "failed")

    def test_crash_path_failing_is_critical_naming_the_file_and_still_one_panic(self):
        """The crash unit cannot load its key: systemd refuses to start it (243/CREDENTIALS);
        the brain's ExecStopPost= says so CRITICAL naming the file; the watchdog sees the brain
        restart after a beat with open positions and flattens (issue 23 point 3: the heartbeat's
        `instance` and the watchdog's EXIT_BRAIN_RESTARTED trigger, issue 26). Without that
        trigger this fails: systemd has the brain beating again under the 3 s threshold."""
        # The listener holds its copy of the key since its start: stopped, the oneshot (which
        # loads the key at its own start) is the path that fails here.
        self.host.systemctl("stop", LISTENER)
        self.host.run(["mv", HOOK_KEY_FILE, HOOK_KEY_FILE + ".away"])
        self.addCleanup(self.host.run, ["mv", HOOK_KEY_FILE + ".away", HOOK_KEY_FILE])
        old = self.kill_brain()
        line = self.host.wait_journal("eexit-brain.service", "event=crash_path_failed", priority=2, timeout=60)
        self.assertIn(f"unreadable_credential={HOOK_KEY_FILE}", line["MESSAGE"])
        self.assertNotIn("/etc/eexit/credentials/hook/redis_password", line["MESSAGE"])
        self.wait_brain_back(old)
        event_id = self.wait_flat()
        self.assertEqual(self.new_panics()[0]["issued_by"], "watchdog")
        self.settle()
        self.assertEqual({p["event_id"] for p in self.new_panics()}, {event_id})

    def test_listener_stopped_the_oneshot_publishes_one_panic_flat(self):
        """The fallback: no listener, so the brain's shell logs crash_listener_missed and starts
        eexit-brain-crash@signal:killed:KILL.service, which publishes (context hook=crash-unit)."""
        self.host.systemctl("stop", LISTENER)                # setUp starts it again for the next test
        missed = len(self.host.journal("eexit-brain.service", grep="event=crash_listener_missed"))
        old = self.kill_brain()
        event_id = self.wait_flat()
        panic = self.new_panics()[0]
        self.assertEqual((panic["issued_by"], panic["reason"]), ("exit_brain", "EXIT_BRAIN_DIED"))
        self.assertIn('"hook":"crash-unit"', panic["context"])
        # (the oneshot's first line carries version= between the two)
        self.host.wait_journal(None, f"event=panic_published .*event_id={event_id}", identifier=ONESHOT_ID)
        self.assertGreater(len(self.host.journal("eexit-brain.service", grep="event=crash_listener_missed")), missed)
        self.wait_brain_back(old)
        self.settle()
        self.assertEqual({p["event_id"] for p in self.new_panics()}, {event_id})


if __name__ == "__main__":
    unittest.main()

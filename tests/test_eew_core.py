"""The EEW's decisions (eexit/eew_core.py), one transition at a time: the fail-closed table of
issue 24 as a reviewer would read it. tests/sim.py explores the same functions under faults."""

import unittest

from eexit import eew_core as core

Do, Kind = core.Do, core.ErrorKind


def after(panic, do, kind, status=""):
    return core.on_error(panic, core.Command(do, status), kind, "x")


class AuthorisedPanic(unittest.TestCase):
    def setUp(self):
        self.panic, commands = core.start("ev", "1-0", authorised=True)
        self.assertEqual([Do.CLAIM], [c.do for c in commands])

    def test_the_happy_path_halts_before_it_closes_and_reports(self):
        panic, commands = core.on_result(self.panic, core.Command(Do.CLAIM), core.Claim.NEW)
        self.assertEqual([Do.WRITE_HALT], [c.do for c in commands])
        panic, commands = core.on_result(panic, commands[0])
        self.assertEqual(([Do.CLOSE], True), ([c.do for c in commands], panic.halted))
        panic, commands = core.on_result(panic, commands[0], "FLAT")
        self.assertEqual([Do.REPORT], [c.do for c in commands])
        panic, commands = core.on_result(panic, commands[0], "ledger")
        self.assertEqual(([], True, core.Stage.DONE), (commands, panic.final, panic.stage))

    def test_every_failure_still_halts_closes_and_reports(self):
        for kind in (Kind.COMMAND, Kind.BUG):
            with self.subTest(kind=kind):
                panic, commands = after(self.panic, Do.CLAIM, kind)
                self.assertEqual(([Do.WRITE_HALT], True), ([c.do for c in commands], panic.degraded))
                panic, commands = after(panic, Do.WRITE_HALT, kind)
                self.assertEqual([Do.SIMPLE_CLOSE], [c.do for c in commands], "a refused halt still closes")
                panic, commands = after(panic, Do.SIMPLE_CLOSE, kind)
                self.assertEqual([(Do.REPORT, "FAILED")], [(c.do, c.status) for c in commands])

    def test_a_failed_close_falls_back_to_the_simple_one_and_a_failed_report_to_the_simplest(self):
        panic, commands = after(self.panic, Do.CLOSE, Kind.BUG)
        self.assertEqual([Do.SIMPLE_CLOSE], [c.do for c in commands])
        panic, commands = after(panic, Do.REPORT, Kind.BUG)
        self.assertEqual([(Do.REPORT, "FAILED")], [(c.do, c.status) for c in commands])
        panic, commands = after(panic, Do.REPORT, Kind.BUG, status="FAILED")
        self.assertEqual(([], core.Stage.WAITING, True, False),
                         (commands, panic.stage, panic.degraded, panic.final), "named until a report stands")

    def test_redis_unreachable_leaves_the_entry_pending(self):
        panic, commands = after(self.panic, Do.CLAIM, Kind.TRANSPORT)
        self.assertEqual(([], core.Stage.WAITING), (commands, panic.stage))

    def test_a_journaled_report_waits_and_is_never_executed_again(self):
        panic, commands = core.start("ev", "1-0", authorised=True, journaled=True)
        self.assertEqual([Do.TOUCH], [c.do for c in commands])
        panic, commands = core.on_result(panic, commands[0])
        self.assertEqual([], commands)

    def test_only_a_report_in_the_journal_does_not_stand(self):
        panic, _ = core.on_result(self.panic, core.Command(Do.REPORT), "journal")
        self.assertFalse(panic.final)
        panic, _ = core.on_result(self.panic, core.Command(Do.REPORT), "direct")
        self.assertTrue(panic.final)
        panic, _ = core.on_result(self.panic, core.Command(Do.REPORT_NO_ACTION, "DUPLICATE"), "ledger")
        self.assertFalse(panic.final, "a DUPLICATE is the entry's report, not the event's")


class UnauthorisedEntry(unittest.TestCase):
    def test_rejected_without_action_and_never_halted_on_failure(self):
        panic, commands = core.start("ev", "1-0", authorised=False)
        self.assertEqual([(Do.REJECT, "REJECTED")], [(c.do, c.status) for c in commands])
        panic, commands = after(panic, Do.REJECT, Kind.BUG)
        self.assertEqual(([], False), (commands, panic.degraded))
        self.assertEqual((False, True), (core.give_up_unauthorised(2, 3), core.give_up_unauthorised(3, 3)))


class OwnAuthority(unittest.TestCase):
    def test_a_close_on_own_authority_goes_through_the_same_transitions_as_a_panic(self):
        panic, commands = core.start_own("busloss-a-1")
        self.assertEqual(([Do.CLOSE], None, True), ([c.do for c in commands], panic.entry_id, panic.halted))
        panic, commands = core.on_result(panic, commands[0], {"status": "FLAT", "attempts": 0})
        self.assertEqual([Do.REPORT], [c.do for c in commands], "the first close reports even when flat")
        _panic, commands = after(panic, Do.REPORT, Kind.BUG)
        self.assertEqual([("FAILED", Do.REPORT)], [(c.status, c.do) for c in commands])
        panic, commands = after(core.start_own("busloss-a-2")[0], Do.CLOSE, Kind.BUG)
        self.assertEqual([Do.SIMPLE_CLOSE], [c.do for c in commands], "a failed close falls back as a panic's")

    def test_a_repeat_that_did_nothing_writes_no_report_and_the_guard_alert_only_reports(self):
        panic, commands = core.start_own("busloss-a-3", repeat=True)
        panic, commands = core.on_result(panic, commands[0], {"status": "FLAT", "attempts": 0})
        self.assertEqual((core.Stage.DONE, []), (panic.stage, commands))
        panic, commands = core.start_own("busloss-a-4", repeat=True)
        _panic, commands = core.on_result(panic, commands[0], {"status": "FLAT", "attempts": 1})
        self.assertEqual([Do.REPORT], [c.do for c in commands], "a repeat that closed something reports")
        _panic, commands = core.start_own("guard-a-5", close=False)
        self.assertEqual([Do.REPORT], [c.do for c in commands])

    def test_a_claimed_record_is_halted_before_its_close(self):
        panic, commands = core.resume_recorded("ev", None)
        self.assertEqual(([Do.WRITE_HALT], False), ([c.do for c in commands], panic.halted))


class Close(unittest.TestCase):
    def test_a_rate_limited_order_is_sent_again_and_everyone_pauses(self):
        errors = ["unset"] * 3
        again, pause = core.order_round(errors, [0, 1, 2], [None, ("rate_limited", 2.5, "rate_limited:429"),
                                                            ("rejected", None, "rejected:-2022")])
        self.assertEqual(([1], 2.5, [None, "unset", "rejected:-2022"]), (again, pause, errors))
        self.assertEqual(([0], 1.0), core.order_round(errors, [0], [("rate_limited", None, "x")]))

    def test_a_failed_read_waits_for_the_retry_after_else_backs_off(self):
        self.assertEqual(7.0, core.read_retry_s(7.0, 0))
        self.assertEqual([0.1, 0.2, 0.5, 0.5], [core.read_retry_s(None, n) for n in range(4)])
        self.assertEqual(5, core.batch_size(20, ((5, 1.0), (300, 10.0))))


class Worker(unittest.TestCase):
    def test_own_and_idle_entries_once_a_sweep_interval_new_ones_always(self):
        schedule = {}
        self.assertTrue(core.due(schedule, "sweep", 10.0, 5.0))
        self.assertEqual((core.Read.OWN, core.Read.IDLE, core.Read.NEW), core.entry_reads(True))
        self.assertFalse(core.due(schedule, "sweep", 14.9, 5.0))
        self.assertEqual((core.Read.NEW,), core.entry_reads(False))
        self.assertTrue(core.due(schedule, "sweep", 15.0, 5.0))


class Liveness(unittest.TestCase):
    def test_only_a_clean_pass_ends_the_inability(self):
        state = core.pass_ended(core.Liveness(), core.PassEnd.LOST, now=10.0)
        self.assertEqual(10.0, state.unable_since)
        state = core.pass_ended(state, core.PassEnd.BLIND, now=12.0, why="claim:WRONGTYPE")
        self.assertEqual((10.0, "claim:WRONGTYPE"), (state.unable_since, state.blind), "continuous")
        self.assertEqual(core.Liveness(), core.pass_ended(state, core.PassEnd.CLEAN, now=13.0))

    def test_the_close_on_own_authority_and_the_watchdog_pings(self):
        state = core.Liveness(unable_since=0.0, blind="x")
        self.assertEqual((False, True), (core.close_due(state, 5.0, 10.0), core.close_due(state, 10.5, 10.0)))
        self.assertFalse(core.close_due(state, 100.0, 0.0), "0 disables it")
        self.assertTrue(core.pings_allowed(state, 10.0), "pings until the close ran")
        state = core.closed(state, 10.5, 5.0)
        self.assertEqual((False, False, True), (core.pings_allowed(state, 10.0), core.close_due(state, 12.0, 10.0),
                                                core.close_due(state, 15.5, 10.0)))

    def test_the_audit_asks_xpending_for_the_whole_range(self):
        self.assertEqual(("2-0", "4-0", 4), core.pending_query(["1-0", "2-0", "3-0", "4-0"], ["2-0", "4-0"]))


class Reports(unittest.TestCase):
    def test_one_place_builds_every_report(self):
        base = dict(event_id="ev", issued_by="ops", reason="R", ts_started=1000, problems=("p",))
        report = core.report(base, dict(status="FLAT", positions_total=2, extra={"n": 3}), 1500)
        self.assertEqual(("FLAT", 500, ["p"], "3", None), (report.status, report.execution_time_ms, report.problems,
                                                          report.extra["n"], report.positions_closed))
        panic = core.Panic("ev", "1-0", True, failures=("claim:command:WRONGTYPE",))
        failed = core.report_fields(panic, core.Command(core.Do.REPORT, "FAILED", "why"), None)
        self.assertEqual(("FAILED", "halt_not_written;why"), (failed["status"], failed["detail"]))
        self.assertEqual("claim:command:WRONGTYPE", failed["extra"]["failures"])
        closed = core.report_fields(panic, core.Command(core.Do.REPORT),
                                    dict(status="FLAT", extra={"n": "1"}))
        self.assertEqual(("FLAT", "halt_not_written;", {"n": "1", "failures": "claim:command:WRONGTYPE"}),
                         (closed["status"], closed["detail"], closed["extra"]))


if __name__ == "__main__":
    unittest.main()

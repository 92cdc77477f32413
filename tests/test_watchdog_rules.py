"""The watchdog's pure core: the four rules at, just below and just above every threshold."""

import unittest
from dataclasses import replace

from eexit import schema, signing
from eexit.watchdog import (DECISION_STAGNANT, DEGRADED_TOO_LONG, HEARTBEAT_LOST, POSITIONS_UNGUARDED,
                            Config, Limits, WatchState, after_outage, evaluate, next_deadline,
                            observe, rejection_risk, report_outcome)

LIMITS = Limits(heartbeat_lost_s=5.0, unguarded_s=3.0, degraded_s=5.0, stagnant_s=30.0, startup_grace_s=5.0)
EPS = 0.001
T0 = 1000.0           # monotonic instant of the last beat in every table row
START = T0 - 100.0    # observing long enough that the grace is over


def beat(status="OK", positions=0, ts=1_700_000_000_000, decided_ms_ago=0, **extra):
    return schema.Heartbeat(service_id="exit_brain", status=status, active_positions=positions,
                            last_decision_ts=None if decided_ms_ago is None else ts - decided_ms_ago,
                            latency_ms=1.0, ts=ts, extra=extra)


def state_after(*beats, at=T0, start=START):
    state = WatchState(observing_since=start)
    for item in beats:
        state = observe(state, item, at)
    return state


def reason(state, now):
    trigger = evaluate(state, now, LIMITS)
    return None if trigger is None else trigger.reason


class SilenceRules(unittest.TestCase):
    def test_rule4_positions_unguarded_table(self):
        state = state_after(beat(positions=2))
        for silence, expected in [(0.0, None), (3.0 - EPS, None), (3.0, None),
                                  (3.0 + EPS, POSITIONS_UNGUARDED), (60.0, POSITIONS_UNGUARDED)]:
            with self.subTest(silence=silence):
                self.assertEqual(reason(state, T0 + silence), expected)

    def test_rule1_heartbeat_lost_table_without_positions(self):
        state = state_after(beat(positions=0))
        for silence, expected in [(3.0 + EPS, None), (5.0 - EPS, None), (5.0, None),
                                  (5.0 + EPS, HEARTBEAT_LOST), (3600.0, HEARTBEAT_LOST)]:
            with self.subTest(silence=silence):
                self.assertEqual(reason(state, T0 + silence), expected)

    def test_unknown_positions_count_as_open(self):
        for positions in (None,):
            state = state_after(beat(positions=positions))
            self.assertEqual(reason(state, T0 + 3.0 + EPS), POSITIONS_UNGUARDED)

    def test_unreadable_positions_field_counts_as_open(self):
        for raw in ({"active_positions": "many"}, {"active_positions": "-1"}, {}):
            fields = {"service_id": "b", "status": "OK", "last_decision_ts": "1", "ts": "1",
                      "latency_ms": "1", **raw}
            parsed, problems = schema.Heartbeat.from_fields(fields)
            self.assertTrue(problems)
            state = state_after(parsed)
            with self.subTest(raw=raw):
                self.assertEqual(reason(state, T0 + 3.0 + EPS), POSITIONS_UNGUARDED)

    def test_unguarded_wins_over_lost_when_both_hold(self):
        state = state_after(beat(positions=1))
        self.assertEqual(reason(state, T0 + 10.0), POSITIONS_UNGUARDED)


class DegradedRule(unittest.TestCase):
    def test_rule2_table_counts_from_first_degraded_beat(self):
        state = state_after(beat(status="DEGRADED"))
        # More degraded beats keep the original start; fresh beats keep rules 1/4 quiet.
        for offset in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5):
            state = observe(state, beat(status="DEGRADED"), T0 + offset)
        for elapsed, expected in [(5.0 - EPS, None), (5.0, None), (5.0 + EPS, DEGRADED_TOO_LONG)]:
            with self.subTest(elapsed=elapsed):
                self.assertEqual(reason(state, T0 + elapsed), expected)

    def test_one_ok_beat_restarts_the_degraded_clock(self):
        state = state_after(beat(status="DEGRADED"))
        state = observe(state, beat(status="OK"), T0 + 4.0)
        state = observe(state, beat(status="DEGRADED"), T0 + 4.5)
        self.assertIsNone(reason(state, T0 + 5.0 + EPS))
        state = observe(state, beat(status="DEGRADED"), T0 + 9.0)
        self.assertIsNone(reason(state, T0 + 4.5 + 5.0))
        self.assertEqual(reason(state, T0 + 4.5 + 5.0 + EPS), DEGRADED_TOO_LONG)

    def test_unknown_status_counts_as_degraded(self):
        parsed, problems = schema.Heartbeat.from_fields(
            {"service_id": "b", "status": "WEIRD", "active_positions": "0", "last_decision_ts": "1",
             "ts": "1", "latency_ms": "1"})
        self.assertIn("unknown_value:status", problems)
        state = state_after(parsed)
        state = observe(state, parsed, T0 + 4.0)
        self.assertEqual(reason(state, T0 + 5.0 + EPS), DEGRADED_TOO_LONG)

    def test_legacy_alive_is_ok(self):
        parsed, _ = schema.Heartbeat.from_fields(
            {"service_id": "b", "status": "ALIVE", "active_positions": "0", "last_decision_ts": "1",
             "ts": "1", "latency_ms": "1"})
        self.assertEqual(state_after(parsed).status, "OK")


class StagnantRule(unittest.TestCase):
    def test_rule3_table_uses_the_beats_own_clock(self):
        for decided_ms_ago, expected in [(29_999, None), (30_000, None), (30_001, DECISION_STAGNANT)]:
            with self.subTest(decided_ms_ago=decided_ms_ago):
                state = state_after(beat(positions=1, decided_ms_ago=decided_ms_ago))
                self.assertEqual(reason(state, T0), expected)

    def test_time_since_the_beat_adds_to_the_decision_age(self):
        state = state_after(beat(positions=1, decided_ms_ago=28_000))
        self.assertIsNone(reason(state, T0 + 2.0))
        self.assertEqual(reason(state, T0 + 2.0 + EPS), DECISION_STAGNANT)

    def test_stagnant_needs_open_positions(self):
        state = state_after(beat(positions=0, decided_ms_ago=3_600_000))
        self.assertIsNone(reason(state, T0))

    def test_producer_clock_offset_changes_nothing(self):
        for offset_ms in (-3_600_000, 0, 3_600_000):
            with self.subTest(offset_ms=offset_ms):
                fresh = state_after(beat(positions=1, ts=1_700_000_000_000 + offset_ms, decided_ms_ago=100))
                self.assertIsNone(reason(fresh, T0 + 3.0))
                self.assertEqual(reason(fresh, T0 + 3.0 + EPS), POSITIONS_UNGUARDED)
                stale = state_after(beat(positions=1, ts=1_700_000_000_000 + offset_ms, decided_ms_ago=30_001))
                self.assertEqual(reason(stale, T0), DECISION_STAGNANT)

    def test_unknown_decision_age_fires_after_the_threshold(self):
        first = beat(positions=1, decided_ms_ago=None)
        state = state_after(first)
        for offset in range(1, 31):
            state = observe(state, first, T0 + offset)
        self.assertIsNone(reason(state, T0 + 30.0))
        self.assertEqual(reason(state, T0 + 30.0 + EPS), DECISION_STAGNANT)

    def test_decision_in_the_producers_future_is_unknown_not_fresh(self):
        state = state_after(beat(positions=1, decided_ms_ago=-5_000))
        self.assertIsNone(state.decision_age_s)
        self.assertEqual(state.decision_unknown_since, T0)


class StartupGrace(unittest.TestCase):
    def test_no_heartbeat_after_start_fires_after_the_threshold(self):
        state = WatchState(observing_since=T0)
        for elapsed, expected in [(5.0 - EPS, None), (5.0, None), (5.0 + EPS, HEARTBEAT_LOST)]:
            with self.subTest(elapsed=elapsed):
                self.assertEqual(reason(state, T0 + elapsed), expected)

    def test_grace_longer_than_the_threshold(self):
        limits = replace(LIMITS, startup_grace_s=8.0)
        state = WatchState(observing_since=T0)
        self.assertIsNone(evaluate(state, T0 + 8.0, limits))
        self.assertEqual(evaluate(state, T0 + 8.0 + EPS, limits).reason, HEARTBEAT_LOST)

    def test_stale_beat_from_before_start_fires_when_grace_ends(self):
        state = state_after(beat(positions=2), at=T0 - 600.0, start=T0)
        self.assertIsNone(reason(state, T0 + 5.0))
        self.assertEqual(reason(state, T0 + 5.0 + EPS), POSITIONS_UNGUARDED)

    def test_a_live_beat_ends_the_grace(self):
        state = state_after(beat(positions=2), at=T0 + 0.5, start=T0)
        self.assertIsNone(reason(state, T0 + 0.5 + 3.0))
        self.assertEqual(reason(state, T0 + 0.5 + 3.0 + EPS), POSITIONS_UNGUARDED)

    def test_zero_grace(self):
        limits = replace(LIMITS, startup_grace_s=0.0)
        state = state_after(beat(positions=2), at=T0 - 600.0, start=T0)
        self.assertEqual(evaluate(state, T0 + EPS, limits).reason, POSITIONS_UNGUARDED)


class NextDeadline(unittest.TestCase):
    """The loop sleeps until next_deadline: nothing may fire before it, and the rule that
    fires first fires just after it."""

    CASES = [
        ("positions open", state_after(beat(positions=2)), POSITIONS_UNGUARDED),
        ("flat", state_after(beat(positions=0)), HEARTBEAT_LOST),
        ("unknown count", state_after(beat(positions=None)), POSITIONS_UNGUARDED),
        ("stagnant first", state_after(beat(positions=1, decided_ms_ago=29_000)), DECISION_STAGNANT),
        ("unknown decision", observe(state_after(beat(positions=1, decided_ms_ago=None), at=T0 - 29.0),
                                     beat(positions=1, decided_ms_ago=None), T0), DECISION_STAGNANT),
        ("degraded", observe(state_after(beat(status="DEGRADED"), at=T0 - 4.0), beat(status="DEGRADED"), T0),
         DEGRADED_TOO_LONG),
        ("nothing yet", WatchState(observing_since=T0), HEARTBEAT_LOST),
        ("stale beat, grace", state_after(beat(positions=0), at=T0 - 600.0, start=T0), HEARTBEAT_LOST),
    ]

    def test_nothing_fires_before_and_the_first_rule_fires_just_after(self):
        for name, state, expected in self.CASES:
            with self.subTest(name):
                deadline = next_deadline(state, T0, LIMITS)
                for before in (T0, (T0 + deadline) / 2, deadline):
                    self.assertIsNone(reason(state, before), before)
                self.assertEqual(reason(state, deadline + EPS), expected)

    def test_no_deadline_once_firing(self):
        state = state_after(beat(positions=2))
        self.assertIsNone(next_deadline(state, T0 + 100.0, LIMITS))


class IncidentCompletion(unittest.TestCase):
    """Only the owner's final report completes an incident (the EEW writes FLAT / RESIDUAL /
    FAILED only for the entry that owns the event id)."""

    def test_table(self):
        for status, expected in [("FLAT", "complete"), ("RESIDUAL", "complete"), ("FAILED", "complete"),
                                 ("REJECTED", "rejected"), ("DUPLICATE", "duplicate"),
                                 ("", "unreadable"), (None, "unreadable"), ("flat", "unreadable"),
                                 ("UNKNOWN", "unreadable")]:
            with self.subTest(status=status):
                self.assertEqual(report_outcome(status), expected)

    def test_statuses_as_parsed_from_the_wire(self):
        for raw, expected in [("FLAT", "complete"), ("REJECTED", "rejected"), ("garbage", "unreadable")]:
            report, _problems = schema.CompletionReport.from_fields({"event_id": "e", "status": raw})
            with self.subTest(raw=raw):
                self.assertEqual(report_outcome(report.status), expected)


class ResyncIsNotAStart(unittest.TestCase):
    """after_outage: the time Redis did not answer is nobody's silence; no second grace."""

    LOST_AT, NOW = T0 + 0.2, T0 + 10.2      # Redis stalled 10 s, 0.2 s after the last beat

    def resumed(self, prior, replayed=None):
        replayed = replayed if replayed is not None else WatchState(observing_since=START)
        return after_outage(prior, replayed, self.LOST_AT, self.NOW)   # Redis answers at NOW

    def test_brain_killed_during_the_stall_fires_within_the_threshold_of_redis_answering(self):
        prior = state_after(beat(positions=2))
        for replayed in (prior, WatchState(observing_since=START)):   # stream kept, or wiped
            with self.subTest(wiped=replayed is not prior):
                state = self.resumed(prior, replayed)
                # 0.2 s of silence before the stall count; the 10 s stall does not.
                self.assertIsNone(reason(state, self.NOW + 3.0 - 0.2))
                self.assertEqual(reason(state, self.NOW + 3.0 - 0.2 + EPS), POSITIONS_UNGUARDED)

    def test_no_new_grace_even_with_a_long_grace(self):
        limits = replace(LIMITS, startup_grace_s=60.0)
        prior = state_after(beat(positions=2), start=T0 - 1.0)     # still inside the first grace?
        state = self.resumed(prior)
        self.assertEqual(state.observing_since, T0 - 1.0)           # the grace started at the start
        self.assertEqual(evaluate(state, self.NOW + 3.0, limits).reason, POSITIONS_UNGUARDED)

    def test_beats_that_reached_redis_during_the_outage_keep_their_real_age(self):
        prior = state_after(beat(positions=2))
        replayed = state_after(beat(positions=2), at=T0 + 5.0)      # only the watchdog was cut off
        state = self.resumed(prior, replayed)
        self.assertEqual(state.last_beat_at, T0 + 5.0)
        self.assertEqual(reason(state, self.NOW), POSITIONS_UNGUARDED)

    def test_a_stale_beat_stays_stale(self):
        prior = state_after(beat(positions=2), at=T0 - 20.0)        # already silent 20 s before
        self.assertEqual(reason(self.resumed(prior), self.NOW), POSITIONS_UNGUARDED)

    def test_degraded_and_unknown_decision_timers_are_credited_too(self):
        prior = observe(state_after(beat(status="DEGRADED"), at=T0 - 4.0), beat(status="DEGRADED"), T0)
        state = self.resumed(prior)
        self.assertEqual(state.degraded_since, T0 - 4.0 + 10.0)
        self.assertIsNone(reason(state, self.NOW + 0.5))
        self.assertEqual(reason(state, self.NOW + 0.8 + EPS), DEGRADED_TOO_LONG)

    def test_time_after_the_last_failed_call_counts_as_silence(self):
        # Our last failed call was at NOW - 2 (then backoff): Redis may have answered since,
        # so detection is never later than the threshold after Redis answered again.
        state = after_outage(state_after(beat(positions=2)), WatchState(observing_since=START),
                             self.LOST_AT, self.NOW - 2.0)
        self.assertEqual(reason(state, self.NOW + 1.0 - 0.2 + EPS), POSITIONS_UNGUARDED)

    def test_never_heard_keeps_the_since_start_rule(self):
        prior = WatchState(observing_since=START)
        self.assertEqual(reason(self.resumed(prior), self.NOW), HEARTBEAT_LOST)


KEY_A, KEY_B = "ab" * 32, "cd" * 32


def eew_beat(ring_text=None, authorized="watchdog,risk_kernel,ops"):
    ring = signing.parse_keys(ring_text, "test") if ring_text else signing.KeyRing()
    return {"consumer": "eew-1", "authorized": authorized, **signing.advertise(ring)}


class RejectionRisk(unittest.TestCase):
    """What the EEW's heartbeat advertises against our own key: known before any incident."""

    def test_table(self):
        ours = signing.parse_keys(f"wd1 watchdog {KEY_A}", "ours")
        cases = [
            ("same key", eew_beat(f"wd1 watchdog {KEY_A},ops1 ops {KEY_B}"), ours, None),
            ("wrong key", eew_beat(f"wd1 watchdog {KEY_B}"), ours, "key_mismatch"),
            ("kid unknown to the EEW", eew_beat(f"wd2 watchdog {KEY_A}"), ours, "unknown_kid"),
            ("kid bound to another issuer", eew_beat(f"wd1 ops {KEY_A}"), ours, "key_mismatch"),
            ("we have no key", eew_beat(f"wd1 watchdog {KEY_A}"), signing.KeyRing(), "unsigned"),
            ("EEW does not verify", eew_beat(None), signing.KeyRing(), None),
            ("EEW does not verify, we sign", eew_beat(None), ours, None),
            ("not authorised", eew_beat(f"wd1 watchdog {KEY_A}", "ops,risk_kernel"), ours, "issuer_not_authorized"),
            ("older EEW says nothing", {"consumer": "eew-1"}, ours, None),
            ("garbled key checks", dict(eew_beat(f"wd1 watchdog {KEY_A}"), key_checks="wd1:x,::,"), ours,
             "key_mismatch"),
        ]
        for name, beat_fields, ring, expected in cases:
            with self.subTest(name):
                risk = rejection_risk(beat_fields, ring)
                self.assertEqual(None if risk is None else risk[0], expected, risk)

    def test_key_check_names_no_key_material(self):
        ring = signing.parse_keys(f"wd1 watchdog {KEY_A}", "ours")
        advertised = signing.advertise(ring)
        self.assertRegex(advertised["key_checks"], r"^wd1:watchdog:[0-9a-f]{8}$")
        self.assertNotIn(KEY_A[:8], str(advertised))
        self.assertNotEqual(signing.key_check(ring, "wd1"),
                            signing.key_check(signing.parse_keys(f"wd1 watchdog {KEY_B}", "b"), "wd1"))


class ConfigFromEnv(unittest.TestCase):
    def test_defaults_and_grace_follows_the_lost_threshold(self):
        cfg = Config.from_env({})
        self.assertEqual(cfg.limits, LIMITS)
        scaled = Config.from_env({"EEXIT_HEARTBEAT_LOST_S": "0.5", "EEXIT_UNGUARDED_S": "0.3"})
        self.assertEqual(scaled.limits.startup_grace_s, 0.5)
        self.assertEqual(scaled.limits.unguarded_s, 0.3)

    def test_bad_value_names_the_variable(self):
        with self.assertRaisesRegex(ValueError, "EEXIT_STAGNANT_S"):
            Config.from_env({"EEXIT_STAGNANT_S": "soon"})


if __name__ == "__main__":
    unittest.main()

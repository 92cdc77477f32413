"""schema.py: round trips, legacy names, problem codes, and a hostile fuzz of every parser."""

import math
import random
import unittest

from eexit import schema

MESSAGES = (schema.PanicEvent, schema.CompletionReport, schema.Heartbeat, schema.TradingState)


def good_panic():
    return schema.PanicEvent(event_id="e-1", reason="POSITIONS_UNGUARDED", issued_by="watchdog",
                             ts=1764331200000, extra={"context": '{"a":1}'})


def good_report():
    return schema.CompletionReport(
        event_id="e-1", status="RESIDUAL", issued_by="ops", reason="MANUAL", positions_total=3,
        positions_closed=2, positions_failed=1, failed_symbols=["ETH/USDT:USDT"], ts_started=1,
        ts_completed=5, execution_time_ms=4,
        residual_positions=[{"symbol": "ETH/USDT:USDT", "side": "short", "contracts": 0.5}],
        dust=[], orders_cancelled=2, attempts=3, event_age_ms=7, detail="", problems=["missing:ts"])


def good_heartbeat():
    return schema.Heartbeat(service_id="brain@h", status="DEGRADED", active_positions=2,
                            last_decision_ts=1764331200000, latency_ms=12.5, ts=1764331200001)


def good_state():
    return schema.TradingState(halted=True, reason="X", event_id="e-1", halted_at=5,
                               halted_by="watchdog", requires_manual_reset=True)


class RoundTrip(unittest.TestCase):
    def test_every_message_round_trips_through_str_and_bytes(self):
        for message in (good_panic(), good_report(), good_heartbeat(), good_state()):
            fields = message.to_fields()
            self.assertTrue(all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()))
            for raw in (fields, {k.encode(): v.encode() for k, v in fields.items()}):
                parsed, problems = type(message).from_fields(raw)
                self.assertEqual(problems, [], type(message).__name__)
                self.assertEqual(parsed, message)

    def test_extra_fields_never_override_known_ones(self):
        event = good_panic()
        event.extra = {"issued_by": "attacker", "sig": "ab"}
        fields = event.to_fields()
        self.assertEqual(fields["issued_by"], "watchdog")
        self.assertEqual(fields["sig"], "ab")


class LegacyAndProblems(unittest.TestCase):
    def test_legacy_source_is_read_as_issued_by(self):
        event, problems = schema.PanicEvent.from_fields(
            {"event_id": "e", "reason": "R", "severity": "CRITICAL", "source": "ops", "ts": "1"})
        self.assertEqual((event.issued_by, problems), ("ops", []))
        self.assertNotIn("source", event.extra)

    def test_issued_by_wins_over_source(self):
        event, _ = schema.PanicEvent.from_fields({"issued_by": "watchdog", "source": "ops"})
        self.assertEqual(event.issued_by, "watchdog")

    def test_alive_is_read_as_ok(self):
        beat, problems = schema.Heartbeat.from_fields(
            {"service_id": "s", "status": "ALIVE", "active_positions": "0",
             "last_decision_ts": "1", "latency_ms": "2", "ts": "3"})
        self.assertEqual((beat.status, problems), ("OK", []))

    def test_problem_codes(self):
        cases = [
            (schema.PanicEvent, {}, {"missing:event_id", "missing:reason", "missing:severity",
                                     "missing:issued_by", "missing:ts"}),
            (schema.PanicEvent, {"ts": "abc"}, {"bad_int:ts"}),
            (schema.PanicEvent, {"ts": "-5"}, {"absurd:ts"}),
            (schema.PanicEvent, {"ts": "1e30"}, {"absurd:ts"}),
            (schema.PanicEvent, {"ts": "nan"}, {"bad_int:ts"}),
            (schema.PanicEvent, {"severity": "LOW"}, {"unknown_value:severity"}),
            (schema.PanicEvent, {b"reason": b"\xff\xfe"}, {"non_utf8:reason"}),
            (schema.PanicEvent, {"reason": "x" * 5000}, {"too_long:reason"}),
            (schema.Heartbeat, {"status": "SLEEPY"}, {"unknown_value:status"}),
            (schema.Heartbeat, {"latency_ms": "inf"}, {"absurd:latency_ms"}),
            (schema.Heartbeat, {"active_positions": "2.5"}, {"bad_int:active_positions"}),
            (schema.TradingState, {"halted": "maybe"}, {"bad_bool:halted"}),
            (schema.CompletionReport, {"failed_symbols": "{"}, {"bad_json:failed_symbols"}),
            (schema.CompletionReport, {"failed_symbols": "{}"}, {"bad_json:failed_symbols"}),
        ]
        for cls, raw, expected in cases:
            _, problems = cls.from_fields(raw)
            self.assertTrue(expected <= set(problems), (cls.__name__, raw, problems))

    def test_unreadable_numbers_are_none_not_zero(self):
        beat, _ = schema.Heartbeat.from_fields({"active_positions": "lots"})
        self.assertIsNone(beat.active_positions)

    def test_integral_float_is_accepted(self):
        beat, problems = schema.Heartbeat.from_fields({"active_positions": "3.0"})
        self.assertEqual(beat.active_positions, 3)
        self.assertNotIn("bad_int:active_positions", problems)

    def test_unreadable_halt_is_not_trading_allowed(self):
        for raw in ({}, {"halted": "garbage"}, {"halted": "true"}):
            state, _ = schema.TradingState.from_fields(raw)
            self.assertFalse(state.trading_allowed, raw)
        state, _ = schema.TradingState.from_fields({"halted": "false"})
        self.assertTrue(state.trading_allowed)

    def test_not_a_map(self):
        for cls in MESSAGES:
            for raw in (None, [], "x", 5, [("a", "b")]):
                message, problems = cls.from_fields(raw)
                self.assertIn("not_a_map", problems)
                self.assertIsInstance(message, cls)

    def test_entry_id_ms(self):
        self.assertEqual(schema.entry_id_ms("1700000000000-3"), 1700000000000)
        self.assertEqual(schema.entry_id_ms(b"5-0"), 5)
        self.assertIsNone(schema.entry_id_ms("garbage"))


HOSTILE_SCALARS = [
    "", " ", "0", "-1", "-0", "1e308", "-1e308", "nan", "NaN", "inf", "-inf", "1.5", "0x10",
    str(2 ** 64), str(-2 ** 63), "9" * 400, "true", "false", "null", "[]", "{}", "[" * 5000,
    '{"a":', "\x00", "\u202e", "ALIVE", "OK", "DEGRADED", "CRITICAL", "FLAT", "é" * 10,
    "x" * (1024 * 1024), b"\xff\xfe\xfd", b"\xc3\x28", b"", b"\x00" * 10, 0, -1, 10 ** 30,
    float("nan"), float("inf"), -0.0, 1.5, True, None, object(), ["list"], {"d": 1}, bytearray(b"ba"),
]


def hostile_maps(rng, count):
    known = ["event_id", "reason", "severity", "issued_by", "source", "ts", "status", "service_id",
             "active_positions", "last_decision_ts", "latency_ms", "halted", "halted_at",
             "requires_manual_reset", "failed_symbols", "residual_positions", "positions_total",
             "execution_time_ms", "cleared_at", "problems", "dust"]
    for _ in range(count):
        raw = {}
        for _ in range(rng.randint(0, 12)):
            roll = rng.random()
            if roll < 0.6:
                key = rng.choice(known)
            elif roll < 0.8:
                key = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 20)))
            else:
                key = rng.choice(HOSTILE_SCALARS)
                try:
                    hash(key)
                except TypeError:
                    key = str(key)
            if rng.random() < 0.3:
                value = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            else:
                value = rng.choice(HOSTILE_SCALARS)
            raw[key] = value
        yield raw


class Fuzz(unittest.TestCase):
    def test_ten_thousand_hostile_maps_per_parser_raise_nothing(self):
        rng = random.Random(20261128)
        maps = list(hostile_maps(rng, 10_000))
        for cls in MESSAGES:
            for raw in maps:
                try:
                    message, problems = cls.from_fields(raw)
                    message.to_fields()
                except Exception as exc:  # the assertion is exactly that nothing escapes
                    self.fail(f"{cls.__name__}.from_fields raised {exc!r} on {list(raw)[:5]!r}")
                self.assertIsInstance(problems, list)
                for name in ("ts", "active_positions", "latency_ms", "halted_at"):
                    value = getattr(message, name, None)
                    if isinstance(value, float):
                        self.assertTrue(math.isfinite(value))


if __name__ == "__main__":
    unittest.main()

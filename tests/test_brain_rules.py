"""The Exit Brain's pure exit rules: at, just below and just past every threshold."""

import unittest

from eexit.brain import Config, ExitRules, Tracked, decide_exits, decode_tracked, encode_tracked, position_key
from eexit.exchange import Position
from eexit.flatten import closing_side

NOW = 1_700_000_000_000


def pos(side="long", entry=100.0, mark=100.0, symbol="BTC/USDT:USDT", position_side="BOTH"):
    return Position(symbol=symbol, market_id=symbol.split("/")[0] + "USDT", side=side, contracts=1.0,
                    position_side=position_side, entry_price=entry, mark_price=mark)


def rule_hit(position, rules, tracked=None, now_ms=NOW):
    exits, _tracked, _unpriced = decide_exits([position], tracked or {}, rules, now_ms)
    return exits[0].rule if exits else None


class PriceRules(unittest.TestCase):
    def test_stop_loss_long_and_short(self):
        rules = ExitRules(stop_loss_pct=2.0)
        for side, mark, expected in [("long", 98.01, None), ("long", 98.0, "stop_loss"), ("long", 97.99, "stop_loss"),
                                     ("short", 101.99, None), ("short", 102.0, "stop_loss"), ("short", 102.01, "stop_loss")]:
            with self.subTest(side=side, mark=mark):
                self.assertEqual(rule_hit(pos(side, mark=mark), rules), expected)

    def test_take_profit_long_and_short(self):
        rules = ExitRules(take_profit_pct=5.0)
        for side, mark, expected in [("long", 104.99, None), ("long", 105.0, "take_profit"), ("long", 105.01, "take_profit"),
                                     ("short", 95.01, None), ("short", 95.0, "take_profit"), ("short", 94.99, "take_profit")]:
            with self.subTest(side=side, mark=mark):
                self.assertEqual(rule_hit(pos(side, mark=mark), rules), expected)

    def test_trailing_stop_follows_the_best_mark(self):
        rules = ExitRules(trailing_stop_pct=1.0)
        key = position_key(pos())
        tracked = {key: Tracked(NOW, best_mark=100.0)}
        for mark, expected in [(99.01, None), (99.0, "trailing_stop"), (98.0, "trailing_stop")]:
            with self.subTest(mark=mark):
                self.assertEqual(rule_hit(pos(mark=mark), rules, tracked), expected)
        short_key = position_key(pos("short"))
        tracked = {short_key: Tracked(NOW, best_mark=100.0)}
        self.assertIsNone(rule_hit(pos("short", mark=100.99), rules, tracked))
        self.assertEqual(rule_hit(pos("short", mark=101.0), rules, tracked), "trailing_stop")

    def test_best_mark_is_updated_and_kept(self):
        rules = ExitRules(trailing_stop_pct=1.0)
        _exits, tracked, _ = decide_exits([pos(mark=100.0)], {}, rules, NOW)
        _exits, tracked, _ = decide_exits([pos(mark=120.0)], tracked, rules, NOW + 1000)
        _exits, tracked, _ = decide_exits([pos(mark=119.0)], tracked, rules, NOW + 2000)
        [track] = tracked.values()
        self.assertEqual((track.first_seen_ms, track.best_mark), (NOW, 120.0))
        self.assertEqual(rule_hit(pos(mark=118.8), rules, tracked), "trailing_stop")

    def test_closed_positions_are_forgotten(self):
        _exits, tracked, _ = decide_exits([pos(), pos(symbol="ETH/USDT:USDT")], {}, ExitRules(), NOW)
        self.assertEqual(len(tracked), 2)
        _exits, tracked, _ = decide_exits([pos()], tracked, ExitRules(), NOW)
        self.assertEqual(list(tracked), [position_key(pos())])

    def test_no_rules_no_exits(self):
        self.assertIsNone(rule_hit(pos(mark=1.0), ExitRules()))

    def test_stop_loss_named_before_trailing(self):
        rules = ExitRules(stop_loss_pct=2.0, trailing_stop_pct=1.0)
        self.assertEqual(rule_hit(pos(mark=90.0), rules), "stop_loss")


class HoldingAndUnpriced(unittest.TestCase):
    def test_max_holding_counts_from_first_seen(self):
        rules = ExitRules(max_holding_s=60.0)
        tracked = {position_key(pos()): Tracked(NOW)}
        for held_ms, expected in [(59_999, None), (60_000, "max_holding"), (60_001, "max_holding")]:
            with self.subTest(held_ms=held_ms):
                self.assertEqual(rule_hit(pos(), rules, tracked, NOW + held_ms), expected)
        self.assertIsNone(rule_hit(pos(), rules, {}, NOW + 10**9))   # first seen now

    def test_missing_mark_is_reported_and_holding_still_applies(self):
        rules = ExitRules(stop_loss_pct=1.0, max_holding_s=1.0)
        position = pos(mark=None)
        exits, tracked, unpriced = decide_exits([position], {position_key(position): Tracked(NOW)}, rules, NOW + 1000)
        self.assertEqual(unpriced, [position_key(position)])
        self.assertEqual([e.rule for e in exits], ["max_holding"])
        exits, _, unpriced = decide_exits([pos(entry=0.0)], {}, rules, NOW)
        self.assertEqual((exits, len(unpriced)), ([], 1))

    def test_order_side_closes(self):
        exits, _, _ = decide_exits([pos("long", mark=1.0), pos("short", mark=1000.0, symbol="ETH/USDT:USDT")],
                                   {}, ExitRules(stop_loss_pct=1.0), NOW)
        self.assertEqual([(e.position.side, closing_side(e.position)) for e in exits], [("long", "sell"), ("short", "buy")])


class ConfigFromEnv(unittest.TestCase):
    def test_defaults(self):
        cfg = Config.from_env({})
        self.assertEqual((cfg.interval_s, cfg.degraded_beat_s, cfg.deadman_s), (1.0, 0.5, 0.0))
        self.assertFalse(cfg.rules.enabled)

    def test_bad_value_names_the_variable(self):
        with self.assertRaisesRegex(ValueError, "EEXIT_STOP_LOSS_PCT"):
            Config.from_env({"EEXIT_STOP_LOSS_PCT": "-1"})


class GuardStateTest(unittest.TestCase):
    """What a restarted brain reads back (exit_brain:guard)."""

    def test_same_boot_keeps_clocks_and_marks_another_boot_keeps_marks_only(self):
        tracked = {"BTC/USDT:USDT|BOTH|long": Tracked(5_000, 70000.0), "ETH/USDT:USDT|BOTH|short": Tracked(6_000)}
        text = encode_tracked(tracked, "boot-a")
        self.assertEqual(decode_tracked(text, "boot-a", 9_000), tracked)
        other = decode_tracked(text, "boot-b", 100)
        self.assertEqual(other["BTC/USDT:USDT|BOTH|long"], Tracked(100, 70000.0))
        self.assertEqual(other["ETH/USDT:USDT|BOTH|short"], Tracked(100, None))

    def test_a_first_seen_in_the_future_restarts_at_now_and_garbage_raises(self):
        text = encode_tracked({"k": Tracked(50_000, 1.0)}, "boot-a")
        self.assertEqual(decode_tracked(text, "boot-a", 9_000), {"k": Tracked(9_000, 1.0)})
        for bad in ("", "[]", '{"boot": "b"}', '{"boot": "b", "tracked": {"k": ["x", 1]}}'):
            with self.subTest(bad=bad), self.assertRaises((ValueError, KeyError, TypeError)):
                decode_tracked(bad, "b", 1)


if __name__ == "__main__":
    unittest.main()

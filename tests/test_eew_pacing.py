"""The EEW's order pacing as a pure function: sliding windows that keep every exchange limit."""

import unittest

from eexit import eew, exchange
from eexit.config import ConfigError

BINANCE = ((300, 10.0), (1200, 60.0))


def schedule(count, limits, margin_s=0.0):
    """Send times of `count` orders placed as early as the limits allow, from t=0."""
    sent, now = [], 0.0
    for _ in range(count):
        now += max(0.0, eew.pacing_wait(sent, now, limits, margin_s))
        sent.append(now)
    return sent


def max_in_any_window(times, window_s):
    return max(sum(1 for t in times if start <= t < start + window_s) for start in times)


class PacingWait(unittest.TestCase):
    def test_a_burst_up_to_the_limit_goes_at_once(self):
        self.assertEqual(eew.pacing_wait([], 0.0, BINANCE), 0.0)
        self.assertEqual(eew.pacing_wait([0.0] * 299, 0.0, BINANCE, 0.0), 0.0)

    def test_the_next_order_waits_for_the_oldest_to_leave_the_window(self):
        sent = [float(i) / 100 for i in range(300)]         # 300 orders in the first 3 s
        self.assertAlmostEqual(eew.pacing_wait(sent, 3.0, BINANCE, 0.0), 7.0)
        self.assertAlmostEqual(eew.pacing_wait(sent, 3.0, BINANCE, 0.1), 7.1)
        self.assertEqual(eew.pacing_wait(sent, 10.1, BINANCE, 0.0), 0.0)

    def test_every_limit_holds_in_every_window(self):
        times = schedule(2500, BINANCE)
        self.assertLessEqual(max_in_any_window(times, 10.0), 300)
        self.assertLessEqual(max_in_any_window(times, 60.0), 1200)

    def test_a_thousand_orders_take_the_fewest_windows(self):
        """The rate-limit floor: 300 + 300 + 300 + 100, at 0, 10, 20 and 30 s."""
        times = schedule(1000, BINANCE)
        self.assertAlmostEqual(times[-1], 30.0)

    def test_the_minute_limit_binds_after_four_windows(self):
        times = schedule(1300, BINANCE)
        self.assertAlmostEqual(times[1199], 30.0)
        self.assertAlmostEqual(times[1200], 60.0)


class ParseOrderLimits(unittest.TestCase):
    def test_default_and_custom(self):
        self.assertEqual(eew.parse_order_limits(exchange.default_order_limits("binanceusdm")), BINANCE)
        self.assertEqual(eew.parse_order_limits(" 5/1 "), ((5, 1.0),))

    def test_bad_values_name_the_variable(self):
        for text in ("300", "x/10", "0/10", "300/0", "300/-1", "300/99999"):
            with self.assertRaises(ConfigError) as caught:
                eew.parse_order_limits(text)
            self.assertIn("EEXIT_ORDER_LIMITS", str(caught.exception))


if __name__ == "__main__":
    unittest.main()

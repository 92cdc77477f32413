"""Table tests for eexit.guard_policy (pure: no Redis, no exchange)."""

import unittest
from types import SimpleNamespace

from eexit import eew
from eexit.config import ConfigError, chosen
from eexit.guard_policy import (HALT_VIOLATION, RESIDUAL_RETRY, decide, exposure_key, lease_ms,
                                quiet_repeat, repeat_close_s, step_s)

POSITION = SimpleNamespace(symbol="BTC/USDT:USDT", position_side="BOTH", side="long")
DUST = SimpleNamespace(symbol="ETH/USDT:USDT", position_side="BOTH", side="short")
ORDER = object()


class DecideTest(unittest.TestCase):
    CASES = [
        # (policy, last status, positions, closable, orders, alerted) -> (action, reason)
        ("enforce", None, [POSITION], [POSITION], [], False, ("wait", None)),
        ("alert", None, [POSITION], [POSITION], [], False, ("wait", None)),
        ("enforce", "FLAT", [], [], [], False, ("quiet", HALT_VIOLATION)),
        ("enforce", "FLAT", [POSITION], [POSITION], [], False, ("enforce", HALT_VIOLATION)),
        ("enforce", "FLAT", [], [], [ORDER], False, ("enforce", HALT_VIOLATION)),
        ("enforce", "", [POSITION], [POSITION], [], False, ("enforce", HALT_VIOLATION)),
        ("enforce", "REJECTED", [POSITION], [POSITION], [], False, ("enforce", HALT_VIOLATION)),
        ("enforce", "RESIDUAL", [POSITION], [POSITION], [], False, ("enforce", RESIDUAL_RETRY)),
        ("enforce", "FAILED", [POSITION], [POSITION], [], False, ("enforce", RESIDUAL_RETRY)),
        # after an unfinished report a flat account still gets one report, ending the incident
        ("enforce", "FAILED", [], [], [], False, ("enforce", RESIDUAL_RETRY)),
        ("enforce", "RESIDUAL", [], [], [], False, ("enforce", RESIDUAL_RETRY)),
        # dust alone: nothing a close can do; the RESIDUAL report stands
        ("enforce", "RESIDUAL", [DUST], [], [], False, ("quiet", RESIDUAL_RETRY)),
        ("enforce", "FLAT", [DUST], [], [], False, ("quiet", HALT_VIOLATION)),
        ("alert", "FLAT", [POSITION], [POSITION], [], False, ("alert", HALT_VIOLATION)),
        ("alert", "FLAT", [POSITION], [POSITION], [], True, ("quiet", HALT_VIOLATION)),
        ("alert", "FLAT", [DUST], [], [], False, ("alert", HALT_VIOLATION)),
        ("alert", "FLAT", [], [], [], False, ("quiet", HALT_VIOLATION)),
        ("alert", "RESIDUAL", [], [], [], False, ("quiet", RESIDUAL_RETRY)),
    ]

    def test_table(self):
        for policy, last, positions, closable, orders, alerted, expected in self.CASES:
            with self.subTest(policy=policy, last=last, positions=len(positions), orders=len(orders)):
                self.assertEqual(expected, decide(policy, last, positions, closable, orders, alerted))


class TimingTest(unittest.TestCase):
    def test_lease_outlives_two_renewal_steps(self):
        for interval in (1, 5, 60):
            self.assertEqual(interval * 2500, lease_ms(interval))
            self.assertGreater(lease_ms(interval) / 1000, 4 * step_s(interval))     # missed renewals
            self.assertEqual(3 * interval, lease_ms(interval) / 1000 + step_s(interval))  # the lease period

    def test_bus_loss_close_repeats_every_guard_interval(self):
        self.assertEqual(5, repeat_close_s(5, 10, "FLAT"))
        self.assertEqual(5, repeat_close_s(5, 10, "RESIDUAL"))
        self.assertEqual(float("inf"), repeat_close_s(0, 10, "FLAT"))
        self.assertEqual(10, repeat_close_s(0, 10, "FAILED"))

    def test_quiet_repeat_only_when_nothing_was_done(self):
        self.assertTrue(quiet_repeat({"status": "FLAT", "attempts": 0}))
        self.assertFalse(quiet_repeat({"status": "FLAT", "attempts": 1}))
        self.assertFalse(quiet_repeat({"status": "FAILED", "attempts": 0}))

    def test_exposure_key_names_positions_and_order_count(self):
        self.assertEqual(exposure_key([POSITION], []), exposure_key([POSITION], []))
        self.assertNotEqual(exposure_key([POSITION], []), exposure_key([POSITION], [ORDER]))
        self.assertNotEqual(exposure_key([POSITION], []), exposure_key([], []))


class ConfigTest(unittest.TestCase):
    def test_interval_bounds_and_policy_names(self):
        self.assertEqual(0, eew.guard_interval(0))
        self.assertEqual(5, eew.guard_interval(5))
        with self.assertRaisesRegex(ConfigError, "EEXIT_HALT_GUARD_S=0.5 is below 1"):
            eew.guard_interval(0.5)
        self.assertEqual("alert", chosen("EEXIT_HALT_GUARD_POLICY", "alert", ("enforce", "alert")))
        with self.assertRaisesRegex(ConfigError, "EEXIT_HALT_GUARD_POLICY='warn' is not one of enforce,alert"):
            chosen("EEXIT_HALT_GUARD_POLICY", "warn", ("enforce", "alert"))


if __name__ == "__main__":
    unittest.main()

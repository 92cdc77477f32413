"""The deterministic fault simulator (tests/sim.py) over 10,000 seeds, and the findings of
issue 24 it reproduces on the decisions before the fix (tests.sim.LEGACY)."""

import unittest

from tests import sim

SEEDS = 10_000


class Simulator(unittest.TestCase):
    def test_every_invariant_holds_over_ten_thousand_seeds(self):
        failures = sim.explore(SEEDS)
        if failures:
            seed, why, trace = failures[0]
            self.fail(f"{len(failures)} of {SEEDS} seeds violate an invariant; first, seed {seed}: {why}\n"
                      + "\n".join(trace[-40:]) + f"\nreplay: python -m tests.sim --trace {seed}")

    def assertReproduced(self, legacy, seeds, words):
        for seed in seeds:
            ok, _trace, why = sim.run(seed, legacy=(legacy,))
            self.assertFalse(ok, f"seed {seed} passes with the legacy {legacy}")
            self.assertIn(words, why)
            self.assertTrue(sim.run(seed)[0], f"seed {seed} fails with the fixed core")

    def test_finding_1_an_authorised_panic_given_up_without_a_halt(self):
        self.assertReproduced("on_error", (25, 36, 93), "ended without a halt")

    def test_finding_2_a_pass_that_lost_redis_counted_as_clean(self):
        self.assertReproduced("clean", (12, 25, 40), "a pass that lost Redis reset the bus-loss timer")

    def test_finding_6_a_pending_panic_executed_again_by_the_audit(self):
        self.assertReproduced("pending_query", (455, 1977, 2105), "the audit runs")


if __name__ == "__main__":
    unittest.main()

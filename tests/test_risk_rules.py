"""The risk kernel's pure core (eexit/risk.py `step`): each rule at, below and past its
thresholds; cash flows; the rolling 24 h window across UTC midnight; latching (one panic per
breach, no re-fire on a stale peak, a deeper breach fires); fail-closed readings; rebase; the
state's JSON round trip; and a seeded property test over random schedules. Clock injected."""

import random
import unittest
from dataclasses import replace

from eexit import risk, signing
from eexit.config import ConfigError
from eexit.risk import Notice, Panic, Reading, RiskState, Rules, Threshold, step
from eexit.venues.risk_reads import CashFlow, RiskPosition, RiskSnapshot

T0 = 1_780_000_000_000      # epoch ms (some day in 2026)
MIN = 60_000
HOUR = 3_600_000
DD = replace(Rules(), daily_loss=Threshold(None, None))    # drawdown alone


def snap(equity=10_000.0, mm=0.0, positions=(), mode="cross", ts=None, flags=()):
    return RiskSnapshot(equity=equity, maintenance_margin=mm, margin_mode=mode, currency="USDT",
                        positions=tuple(positions), venue_ts_ms=ts, venue_flags=tuple(flags))


def pos(mark=100.0, liq=None, side="long"):
    return RiskPosition("BTC/USDT:USDT", side, 1.0, mark, liq)


class Run:
    """Feeds readings to step() on an injected clock; collects the commands."""

    def __init__(self, rules=Rules(), state=None):
        self.rules, self.state, self.now, self.commands, self.ids = rules, state or RiskState(), T0, [], 0

    def read(self, equity=10_000.0, at=None, flows=(), halted=False, **more):
        self.now = at if at is not None else self.now + 5_000
        return self.feed(Reading(snap(equity, ts=self.now, **more), tuple(flows), self.now + 1, halted=halted))

    def fail(self, at=None, error="NetworkError: down", halted=False):
        self.now = at if at is not None else self.now + 5_000
        return self.feed(Reading(error=error, halted=halted))

    def feed(self, reading):
        self.ids += 1
        self.state, out = step(self.state, self.rules, reading, self.now, f"ev{self.ids}")
        self.commands.extend(out)
        return out

    def panics(self, out=None):
        return [c for c in (self.commands if out is None else out) if isinstance(c, Panic)]

    def notices(self, kind):
        return [c for c in self.commands if isinstance(c, Notice) and c.kind == kind]


def flow(flow_id, amount, ts):
    return CashFlow(flow_id, ts, amount, "TRANSFER")


class Drawdown(unittest.TestCase):
    def test_thresholds_table(self):
        for equity, warned, panicked in [(9_001, False, False), (9_000, True, False), (8_001, True, False),
                                         (8_000, True, True), (5_000, True, True)]:
            with self.subTest(equity=equity):
                run = Run(DD)
                run.read(10_000)
                run.read(equity)
                self.assertEqual(bool(run.notices("risk_warning")), warned)
                self.assertEqual([p.reason for p in run.panics()], ["RISK_DRAWDOWN"] if panicked else [])

    def test_one_panic_per_breach_with_figures(self):
        run = Run(DD)
        run.read(10_000)
        out = run.read(7_900)
        (panic,) = run.panics(out)
        self.assertEqual(panic.reason, "RISK_DRAWDOWN")
        self.assertAlmostEqual(panic.context["values"]["drawdown"], 0.21)
        self.assertEqual(panic.context["thresholds"]["drawdown"], {"warn": 0.10, "panic": 0.20})
        self.assertEqual(panic.context["peak"], 10_000)
        for _ in range(20):
            run.read(7_900)
        self.assertEqual(len(run.panics()), 1)

    def test_withdrawal_is_no_loss_and_deposit_no_peak(self):
        run = Run(DD)
        run.read(10_000)
        run.read(7_000, flows=[flow("w1", -3_000, run.now + 1)])
        self.assertEqual(run.panics(), [])
        self.assertAlmostEqual(run.state.values["drawdown"], 0.0)
        run.read(12_000, flows=[flow("d1", 5_000, run.now + 1)])
        self.assertEqual(run.state.baseline.peak_adj, 10_000)      # the deposit is no new high
        run.read(7_000, flows=[flow("w2", -5_000, run.now + 1)])
        self.assertEqual(run.panics(), [])
        # A loss after the withdrawal is measured against the peak in today's money.
        run.read(5_500)
        self.assertAlmostEqual(run.state.values["drawdown"], 1_500 / 7_000)
        self.assertEqual([p.reason for p in run.panics()], ["RISK_DRAWDOWN"])

    def test_unexplained_drop_is_loss_and_flows_counted_once(self):
        run = Run(DD)
        run.read(10_000)
        out = run.read(7_000)          # the ledger says nothing: a loss
        self.assertEqual([p.reason for p in run.panics(out)], ["RISK_DRAWDOWN"])
        run = Run(DD)
        run.read(10_000)
        same = flow("w1", -3_000, run.now + 1)
        run.read(7_000, flows=[same])
        run.read(7_000, flows=[same])  # the overlap re-reads it: de-duplicated by id
        self.assertAlmostEqual(run.state.baseline.net_flows, -3_000)
        self.assertEqual(run.panics(), [])

    def test_flows_before_the_first_baseline_are_in_its_equity(self):
        run = Run(DD)
        run.read(10_000, flows=[flow("old", 4_000, T0 - HOUR)])
        self.assertEqual(run.state.baseline.net_flows, 0.0)
        self.assertIn("old", run.state.seen_flows)

    def test_stale_peak_never_refires_but_deeper_loss_does(self):
        run = Run(DD)
        run.read(10_000)
        run.read(7_900)
        self.assertEqual(len(run.panics()), 1)
        for equity in (7_900, 7_500, 7_000):             # resumed: stale peak, less than one step deeper
            run.read(equity)
        self.assertEqual(len(run.panics()), 1)
        run.read(6_900)                                   # 31 %: one step (10 %) deeper than 21 %
        self.assertEqual(len(run.panics()), 2)

    def test_recovery_rearms(self):
        run = Run(DD)
        run.read(10_000)
        run.read(7_900)
        run.read(9_300)      # 7 % < 10 % x 0.8: recovered, latch released, warning re-armed
        self.assertNotIn("drawdown", run.state.latches)
        self.assertEqual(len(run.notices("risk_recovered")), 1)
        run.read(7_900)
        self.assertEqual(len(run.panics()), 2)
        self.assertEqual(len(run.notices("risk_warning")), 2)

    def test_warning_hysteresis(self):
        run = Run(DD)
        run.read(10_000)
        for equity in (8_990, 9_010, 8_990, 9_100, 8_990):   # never below 8 % (x0.8 of 10 %)
            run.read(equity)
        self.assertEqual(len(run.notices("risk_warning")), 1)
        run.read(9_300)
        run.read(8_990)
        self.assertEqual(len(run.notices("risk_warning")), 2)

    def test_switched_off(self):
        rules = replace(Rules(), drawdown=Threshold(None, None), daily_loss=Threshold(None, None))
        run = Run(rules)
        run.read(10_000)
        run.read(1_000)
        self.assertEqual(run.panics(), [])


class DailyLoss(unittest.TestCase):
    RULES = replace(Rules(), drawdown=Threshold(None, 0.50))

    def test_across_utc_midnight_fires(self):
        midnight = (T0 // (24 * HOUR) + 1) * 24 * HOUR
        run = Run(self.RULES)
        run.read(10_000, at=midnight - HOUR)
        run.read(9_400, at=midnight - 30 * MIN)       # 6 % before midnight
        run.read(8_800, at=midnight + 30 * MIN)       # 12 % within 90 minutes, across midnight
        self.assertEqual([p.reason for p in run.panics()], ["RISK_DAILY_LOSS"])

    def test_same_loss_over_25_hours_does_not(self):
        run = Run(self.RULES)
        run.read(10_000, at=T0)
        run.read(9_400, at=T0 + MIN)                  # 6 %
        run.read(9_400, at=T0 + 25 * HOUR)            # nothing since: the window moved on
        run.read(8_836, at=T0 + 25 * HOUR + MIN)      # another 6 % (11.6 % in 25 h)
        self.assertEqual(run.panics(), [])
        self.assertLess(run.state.values["daily_loss"], 0.10)
        self.assertGreater(run.state.values["drawdown"], 0.11)

    def test_window_is_bounded(self):
        run = Run(self.RULES)
        for i in range(3000):
            run.read(10_000, at=T0 + i * MIN)
        self.assertLessEqual(len(run.state.window), 24 * 60 + 1)


class MarginAndLiquidation(unittest.TestCase):
    def test_margin_table(self):
        for mm, expected in [(2_999, []), (4_999, []), (5_000, ["RISK_MARGIN"]), (9_000, ["RISK_MARGIN"])]:
            with self.subTest(mm=mm):
                run = Run()
                run.read(10_000, mm=mm, positions=[pos()])
                self.assertEqual([p.reason for p in run.panics()], expected)

    def test_liquidation_distance_table(self):
        for side, mark, liq, expected in [("long", 100, 94, []), ("long", 100, 95, ["RISK_LIQUIDATION"]),
                                          ("short", 100, 104, ["RISK_LIQUIDATION"]), ("short", 100, 106, []),
                                          ("long", 100, 101, ["RISK_LIQUIDATION"])]:   # past it: distance < 0
            with self.subTest(side=side, liq=liq):
                run = Run()
                run.read(10_000, positions=[pos(mark, liq, side)])
                self.assertEqual([p.reason for p in run.panics()], expected)

    def test_unknown_liquidation_is_not_safe(self):
        self.assertEqual(risk.liquidation_distance([pos(100, None), pos(None, 90)]), (None, 2))
        run = Run()
        run.read(10_000, mm=6_000, positions=[pos(100, None)])      # unknown: the margin rule decides
        self.assertEqual([p.reason for p in run.panics()], ["RISK_MARGIN"])
        self.assertEqual(run.panics()[0].context["unknown_liquidation"], 1)
        with self.assertRaisesRegex(ConfigError, "margin rule"):
            risk.Config.from_env({"EEXIT_RISK_MARGIN_WARN": "off", "EEXIT_RISK_MARGIN_PANIC": "off"})

    def test_several_rules_one_panic(self):
        run = Run()
        run.read(10_000)
        out = run.read(7_000, mm=6_000, positions=[pos(100, 97)])
        (panic,) = run.panics(out)
        self.assertEqual(panic.reason, "RISK_DRAWDOWN")
        self.assertEqual(panic.context["rules"], ["drawdown", "daily_loss", "margin", "liquidation"])
        self.assertEqual({item["event_id"] for item in run.state.latches.values()}, {panic.event_id})


class FailClosed(unittest.TestCase):
    def test_invalid_snapshots(self):
        rules = Rules()
        for bad, why in [(snap(float("nan")), "not finite"), (snap(0.0), "<= 0"), (snap(-5.0), "<= 0"),
                         (snap(mm=float("inf")), "not finite"), (snap(ts=T0 - 31_000), "stale")]:
            with self.subTest(why=why):
                self.assertIn(why, risk.snapshot_problem(Reading(bad), rules, T0))
        self.assertEqual(risk.snapshot_problem(Reading(snap(ts=T0 - 29_000)), rules, T0), "")

    def test_blind_with_positions_fires_after_blind_s(self):
        run = Run()
        run.read(10_000, positions=[pos(100, 50)])
        start = run.now
        for offset in range(5_000, 60_000, 5_000):
            run.fail(at=start + offset)
        self.assertEqual(run.panics(), [])
        run.fail(at=start + 65_000)                    # 60 s since the first failed read
        self.assertEqual([p.reason for p in run.panics()], ["RISK_BLIND"])
        run.fail(at=start + 70_000)
        self.assertEqual(len(run.panics()), 1)
        run.read(10_000, positions=[pos(100, 50)])     # readable again: the blind latch ends
        self.assertNotIn("blind", run.state.latches)

    def test_blind_flat_never_fires_unknown_does(self):
        run = Run()
        run.read(10_000)                               # flat
        for offset in range(0, 600_000, 5_000):
            run.fail(at=T0 + 10_000 + offset)
        self.assertEqual(run.panics(), [])
        self.assertIn("NetworkError", run.state.problem)
        run = Run()                                    # exposure never seen: counted as exposure
        run.fail(at=T0)
        run.fail(at=T0 + 60_000)
        self.assertEqual([p.reason for p in run.panics()], ["RISK_BLIND"])

    def test_mode_change(self):
        run = Run()
        run.read(10_000, mode="cross")
        out = run.read(10_000, mode="isolated")
        self.assertEqual([p.reason for p in run.panics(out)], ["RISK_MODE_CHANGED"])
        self.assertEqual(run.panics()[0].context["values"]["mode"], "isolated")
        run.read(10_000, mode="isolated")
        self.assertEqual(len(run.panics()), 1)
        pinned = Run(replace(Rules(), margin_mode="portfolio"))
        pinned.read(10_000, mode="cross")
        self.assertEqual([p.reason for p in pinned.panics()], ["RISK_MODE_CHANGED"])

    def test_halted_latches_without_publishing(self):
        run = Run()
        run.read(10_000)
        run.read(7_000, halted=True)
        self.assertEqual(run.panics(), [])
        self.assertEqual(len(run.notices("breach_while_halted")), 1)
        run.read(7_000)                                # resumed: the stale peak does not re-fire
        self.assertEqual(run.panics(), [])

    def test_inputs_refused_at_start(self):
        with self.assertRaisesRegex(ConfigError, "risk rule margin needs maintenance_margin.*EEXIT_RISK_MARGIN"):
            risk.check_inputs(Rules(), {"equity", "cash_flows", "liquidation_price", "margin_mode"}, "x")
        risk.check_inputs(replace(Rules(), margin=Threshold(None, None), liquidation=Threshold(None, None)),
                          {"equity", "cash_flows", "margin_mode"}, "x")

    def test_config_bounds(self):
        with self.assertRaisesRegex(ConfigError, "must come before"):
            risk.Config.from_env({"EEXIT_RISK_DRAWDOWN_WARN": "0.3"})
        with self.assertRaisesRegex(ConfigError, "must come before"):
            risk.Config.from_env({"EEXIT_RISK_LIQUIDATION_WARN": "0.01"})
        cfg = risk.Config.from_env({"EEXIT_RISK_DAILY_LOSS_WARN": "off", "EEXIT_RISK_MARGIN_MODE": "OFF"})
        self.assertEqual(cfg.rules.daily_loss, Threshold(None, 0.10))
        self.assertNotIn("mode", cfg.rules.enabled())


class RebaseAndPersistence(unittest.TestCase):
    def test_rebase_applies_at_next_snapshot(self):
        run = Run()
        run.read(10_000)
        run.read(7_900)
        run.state = risk.request_rebase(run.state, "alice", "r1")
        run.read(7_900)
        base = run.state.baseline
        self.assertEqual((base.set_by, base.why, base.peak_adj), ("alice", "rebase", 7_900))
        self.assertEqual(run.state.latches, {})
        self.assertIn("alice", risk.describe_baseline(run.state))
        run.read(6_300)          # 20 % from the new baseline
        self.assertEqual(len(run.panics()), 2)

    def test_rebase_verification(self):
        keys = signing.parse_keys(f"rb1 risk_rebase {'ab' * 32}\nrk1 risk_kernel {'cd' * 32}", "test")
        state = RiskState()
        good = risk.build_rebase("alice", keys, T0)
        self.assertEqual(risk.verify_rebase(good, keys, state, T0), "")
        self.assertIn("sig_mismatch", risk.verify_rebase({**good, "operator": "mallory"}, keys, state, T0))
        self.assertIn("stale", risk.verify_rebase(good, keys, state, T0 + 61_000).replace("off the", "stale"))
        seen = risk.request_rebase(state, "alice", good["request_id"])
        self.assertEqual(risk.verify_rebase(good, keys, seen, T0), "replayed request_id")
        forged = signing.sign_fields({**good, "issued_by": "risk_kernel"}, "rk1", keys,
                                     risk.REBASE_CORE, risk.REBASE_DOMAIN)
        self.assertEqual(risk.verify_rebase(forged, keys, state, T0), "issued_by is not risk_rebase")
        own = signing.parse_keys(f"rk1 risk_kernel {'cd' * 32}", "t")
        rebase = f"rb1 risk_rebase {'ab' * 32}"
        self.assertTrue(risk.load_rebase_keys(own, {"EEXIT_RISK_REBASE_KEY": rebase}).has_kid("rb1"))
        with self.assertRaisesRegex(ConfigError, "no rebase could be verified"):
            risk.load_rebase_keys(own, {})
        with self.assertRaisesRegex(ConfigError, "other issuers \\(ops\\)"):
            risk.load_rebase_keys(own, {"EEXIT_RISK_REBASE_KEY": f"{rebase}\no1 ops {'ef' * 32}"})
        self.assertFalse(risk.load_rebase_keys(signing.KeyRing(), {}).configured)     # unsigned set-up

    def test_json_round_trip(self):
        run = Run()
        run.read(10_000, flows=[flow("a", 1.0, T0)])
        run.read(7_900, mm=100, positions=[pos(100, 90)])
        self.assertEqual(risk.from_json(risk.to_json(run.state)), run.state)


class Property(unittest.TestCase):
    """Random schedules (seeded): invariants hold at every step."""

    def test_invariants(self):
        for seed in range(40):
            rng = random.Random(seed)
            run = Run()
            equity, pnl_free = 10_000.0, rng.random() < 0.5
            for _ in range(200):
                roll = rng.random()
                halted = rng.random() < 0.1
                if roll < 0.1:
                    out = run.fail(halted=halted)
                else:
                    amount = round(rng.uniform(-0.3, 0.3) * equity, 2)
                    flows = [flow(f"f{run.ids}", amount, run.now + 1)] if rng.random() < 0.3 else []
                    move = 0.0 if pnl_free else rng.uniform(-0.06, 0.05) * equity
                    equity = max(1.0, equity + sum(f.amount for f in flows) + move)
                    out = run.read(equity, flows=flows, halted=halted,
                                   positions=[pos(100, 50)] if rng.random() < 0.5 else [])
                panics = run.panics(out)
                with self.subTest(seed=seed, step=run.ids):
                    self.assertLessEqual(len(panics), 1)
                    if halted:
                        self.assertEqual(panics, [])
                    for panic in panics:
                        self.assertEqual(panic.event_id, f"ev{run.ids}")
                    if pnl_free:     # transfers only: never a loss, never a panic from them
                        self.assertEqual([p for p in panics if p.reason != "RISK_BLIND"], [])
                    for rule in ("drawdown", "daily_loss"):
                        value = run.state.values.get(rule)
                        if value is not None and value >= 0.20 and run.state.problem == "":
                            self.assertIn(rule if rule == "drawdown" else "drawdown", run.state.latches)
                    self.assertEqual(risk.from_json(risk.to_json(run.state)), run.state)


if __name__ == "__main__":
    unittest.main()

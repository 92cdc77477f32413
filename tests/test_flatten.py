"""Table tests for eexit.flatten (pure: no Redis, no exchange)."""

import re
import unittest
from decimal import Decimal

from eexit.exchange import MarketRules, Position
from eexit.flatten import (FAILED, FLAT, MAX_CHUNKS_PER_POSITION, RESIDUAL, classify_residual,
                           client_order_id, closable, decide_status, dust_reason, plan_close,
                           split_amount)

BINANCE_CLIENT_ID = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")
BYBIT_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,36}$")
OKX_CLIENT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def rules(symbol="BTC/USDT:USDT", step=0.001, min_qty=0.001, max_qty=None, min_notional=None,
          contract_size=1.0):
    return MarketRules(symbol=symbol, market_id=symbol.split("/")[0] + "USDT", amount_step=step,
                       min_qty=min_qty, max_market_qty=max_qty, min_notional=min_notional,
                       price_step=0.1, contract_size=contract_size)


def pos(symbol="BTC/USDT:USDT", side="long", contracts=1.0, position_side="BOTH", mark=100.0):
    return Position(symbol=symbol, market_id=symbol.split("/")[0] + "USDT", side=side,
                    contracts=contracts, position_side=position_side, entry_price=100.0,
                    mark_price=mark)


class SplitAmountTest(unittest.TestCase):
    CASES = [
        # (contracts, step, min_qty, max_qty, expected chunks)
        (1.0, 0.001, 0.001, None, ["1.000"]),
        (0.3, 0.1, 0.1, None, ["0.3"]),                   # float 0.3 is not 0.29999
        (1.23456, 0.001, 0.001, None, ["1.234"]),          # rounded DOWN
        (0.0009, 0.001, 0.001, None, []),                  # rounds to 0: dust
        (0.0015, 0.001, 0.002, None, []),                  # 0.001 < min 0.002: dust
        (25.0, 1, 1, 10, ["10", "10", "5"]),               # split by max market qty
        (20.0, 1, 1, 10, ["10", "10"]),                    # exact multiple
        (10.0, 1, 1, 10, ["10"]),                          # equal to max: one chunk
        (10.5, 0.1, 1, 10, ["9.5", "1.0"]),                # tail below min borrows from previous
        (10.05, 0.01, 0.1, 10, ["9.95", "0.10"]),
        (12.0, 1, 1, 10.7, ["10", "2"]),                   # max itself rounded down to the step
        (5.0, 1, 1, 0.4, ["5"]),                           # max below one step: ignored
        (7.0, None, None, None, ["7.0"]),                  # no step, no limits
        (2.5, 1, None, None, ["2"]),
    ]

    def test_table(self):
        for contracts, step, min_qty, max_qty, expected in self.CASES:
            with self.subTest(contracts=contracts, step=step, min_qty=min_qty, max_qty=max_qty):
                chunks = split_amount(contracts, rules(step=step, min_qty=min_qty, max_qty=max_qty))
                self.assertEqual([Decimal(x) for x in expected], chunks)
                self.assertTrue(all(c > 0 for c in chunks))

    def test_no_rules_is_one_full_order(self):
        self.assertEqual([Decimal("3.3")], split_amount(3.3, None))

    def test_chunk_count_is_bounded_per_attempt(self):
        chunks = split_amount(1000.0, rules(step=1, min_qty=1, max_qty=1))
        self.assertEqual(MAX_CHUNKS_PER_POSITION, len(chunks))

    def test_garbage_amounts_plan_nothing(self):
        for bad in (0, -1.0, float("nan"), float("inf"), None, "x"):
            with self.subTest(bad=bad):
                self.assertEqual([], split_amount(bad, rules()))

    def test_chunks_never_exceed_position_or_max(self):
        for contracts in (0.001, 0.999, 1.0, 9.999, 10.0, 10.001, 33.333, 99.999):
            for max_qty in (None, 0.5, 1, 3.3, 10):
                with self.subTest(contracts=contracts, max_qty=max_qty):
                    chunks = split_amount(contracts, rules(max_qty=max_qty))
                    self.assertLessEqual(sum(chunks), Decimal(repr(contracts)))
                    if max_qty is not None:
                        self.assertTrue(all(c <= Decimal(repr(max_qty)) for c in chunks))
                    self.assertTrue(all((c / Decimal("0.001")) % 1 == 0 for c in chunks))


class PlanCloseTest(unittest.TestCase):
    def test_sides_and_hedge(self):
        markets = {"BTC/USDT:USDT": rules(), "ETH/USDT:USDT": rules("ETH/USDT:USDT")}
        positions = [
            pos("ETH/USDT:USDT", "short", 2.0, "BOTH"),
            pos("BTC/USDT:USDT", "long", 1.0, "LONG"),
            pos("BTC/USDT:USDT", "short", 0.5, "SHORT"),
        ]
        orders = plan_close(positions, markets, attempt=1, event_id="e1")
        got = [(o.symbol, o.side, o.amount, o.position_side) for o in orders]
        self.assertEqual([("BTC/USDT:USDT", "sell", 1.0, "LONG"),
                          ("BTC/USDT:USDT", "buy", 0.5, "SHORT"),
                          ("ETH/USDT:USDT", "buy", 2.0, "BOTH")], got)

    def test_split_orders_get_distinct_ids(self):
        markets = {"BTC/USDT:USDT": rules(step=1, min_qty=1, max_qty=10)}
        orders = plan_close([pos(contracts=25.0)], markets, attempt=1, event_id="e1")
        self.assertEqual([10.0, 10.0, 5.0], [o.amount for o in orders])
        self.assertEqual(3, len({o.client_order_id for o in orders}))

    def test_deterministic_and_attempt_scoped_ids(self):
        markets = {"BTC/USDT:USDT": rules()}
        positions = [pos(contracts=1.0)]
        first = plan_close(positions, markets, attempt=1, event_id="e1")
        again = plan_close(list(positions), dict(markets), attempt=1, event_id="e1")
        self.assertEqual(first, again)
        self.assertNotEqual(first[0].client_order_id,
                            plan_close(positions, markets, attempt=2, event_id="e1")[0].client_order_id)
        self.assertNotEqual(first[0].client_order_id,
                            plan_close(positions, markets, attempt=1, event_id="e2")[0].client_order_id)

    def test_client_ids_fit_every_venue(self):
        for args in [("e", 1, "BTC/USDT:USDT", "BOTH", 0),
                     ("x" * 500, 10**9, "WEIRD/SYM:USDT", "SHORT", 99)]:
            with self.subTest(args=args[:2]):
                for rule in (BINANCE_CLIENT_ID, BYBIT_CLIENT_ID, OKX_CLIENT_ID):
                    self.assertRegex(client_order_id(*args), rule)
                self.assertEqual(32, len(client_order_id(*args)))

    def test_id_components_all_matter(self):
        base = ("e", 1, "BTC/USDT:USDT", "LONG", 0)
        ids = {client_order_id(*base)}
        for index, other in enumerate(("f", 2, "ETH/USDT:USDT", "SHORT", 1)):
            args = list(base)
            args[index] = other
            ids.add(client_order_id(*args))
        self.assertEqual(6, len(ids))

    def test_dust_planning(self):
        markets = {"BTC/USDT:USDT": rules(min_notional=5.0), "ETH/USDT:USDT": rules("ETH/USDT:USDT")}
        positions = [pos(contracts=0.01, mark=100.0),                 # 1 USDT: reduce-only may close it
                     pos("ETH/USDT:USDT", contracts=0.0004),          # below min qty: cannot be sent
                     pos("NEW/USDT:USDT", "short", 3.0)]              # no rules: try anyway
        orders = plan_close(positions, markets, attempt=1, event_id="e")
        self.assertEqual([("BTC/USDT:USDT", "sell", 0.01), ("NEW/USDT:USDT", "buy", 3.0)],
                         [(o.symbol, o.side, o.amount) for o in orders])

    def test_empty(self):
        self.assertEqual([], plan_close([], {}, attempt=1, event_id="e"))


class ResidualTest(unittest.TestCase):
    CASES = [
        # (contracts, mark, min_qty, min_notional, expected dust reason)
        (1.0, 100.0, 0.001, 5.0, None),
        (0.0005, 100.0, 0.001, 5.0, "below_min_qty"),
        (0.01, 100.0, 0.001, 5.0, "below_min_notional"),    # 1 USDT
        (0.05, 100.0, 0.001, 5.0, None),                   # exactly 5 USDT is enough
        (0.01, None, 0.001, 5.0, None),                    # no mark: cannot call it dust
        (0.01, 100.0, 0.001, None, None),
    ]

    def test_dust_table(self):
        for contracts, mark, min_qty, min_notional, expected in self.CASES:
            with self.subTest(contracts=contracts, mark=mark, min_notional=min_notional):
                r = rules(min_qty=min_qty, min_notional=min_notional)
                self.assertEqual(expected, dust_reason(pos(contracts=contracts, mark=mark), r))

    def test_contract_size_counts_in_notional(self):
        r = rules(min_notional=5.0, contract_size=10.0)
        self.assertIsNone(dust_reason(pos(contracts=0.01, mark=100.0), r))

    def test_classify_splits_and_lists_everything(self):
        markets = {"BTC/USDT:USDT": rules(min_notional=5.0), "ETH/USDT:USDT": rules("ETH/USDT:USDT")}
        positions = [pos("ETH/USDT:USDT", "short", 2.0), pos(contracts=0.01)]
        residual, dust = classify_residual(positions, markets)
        self.assertEqual([{"symbol": "ETH/USDT:USDT", "side": "short", "position_side": "BOTH",
                           "contracts": 2.0}], residual)
        self.assertEqual([{"symbol": "BTC/USDT:USDT", "side": "long", "position_side": "BOTH",
                           "contracts": 0.01, "why": "below_min_notional"}], dust)
        self.assertEqual(positions, closable(positions, markets))   # min notional: still tried
        self.assertEqual([], closable([pos(contracts=0.0004)], markets))

    def test_status_table(self):
        markets = {"BTC/USDT:USDT": rules(min_notional=5.0)}
        self.assertEqual(FAILED, decide_status(None))
        self.assertEqual(FLAT, decide_status([]))
        self.assertEqual(FLAT, decide_status([], []))
        self.assertEqual(RESIDUAL, decide_status([], ["a resting order"]))  # can re-open exposure
        self.assertEqual(RESIDUAL, decide_status([pos(contracts=1.0)]))
        dust_only = [pos(contracts=0.0004)]
        self.assertEqual([], closable(dust_only, markets))
        self.assertEqual(RESIDUAL, decide_status(dust_only))   # dust is not flat


if __name__ == "__main__":
    unittest.main()

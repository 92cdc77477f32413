"""The risk kernel's exchange side (issue 25 points 1 and 6), per venue: real ccxt over HTTP
against the paper exchange speaking that venue's dialect. The snapshot and the cash flows
read through eexit.venues.risk_reads must equal the paper's own model (Account.risk_view, ledger)."""

import http.client
import json
import subprocess
import sys
import time
import unittest
from urllib.parse import urlsplit

import ccxt

from eexit.exchange import ExchangeConfig, build_exchange
from eexit.paper import PaperExchange
from eexit.venues import risk_reads
from eexit.venues.base import ExchangeDataError
from eexit.venues.risk_reads import CashFlow, LedgerGapError

DAY_MS = 86_400_000
BTC, ETH = "BTC/USDT:USDT", "ETH/USDT:USDT"
# Per venue: the wire fields behind E and MM in the default mode, what "unknown liquidation"
# looks like on the wire, and the currency of the totals.
# reads: the raw endpoints one snapshot requests, in order (never ccxt's unified balance).
VENUES = {
    "binanceusdm": dict(equity="totalMarginBalance", mm="totalMaintMargin", currency="USDT", mark="markPrice", reads=[
        "/fapi/v1/multiAssetsMargin", "/fapi/v1/time", "/fapi/v3/account", "/fapi/v3/positionRisk"]),
    "bybit": dict(equity="totalMarginBalance", mm="totalMaintenanceMargin", currency="USD", mark="markPrice", reads=[
        "/v5/account/info", "/v5/account/wallet-balance"] + ["/v5/position/list"] * 3),
    "okx": dict(equity="adjEq", mm="mmr", currency="USD", mark="markPx", reads=[
        "/api/v5/account/config", "/api/v5/public/time", "/api/v5/account/balance"] + ["/api/v5/account/positions"] * 2),
}


def now_ms():
    return int(time.time() * 1000)


class RiskVenueCase:
    venue = None

    @classmethod
    def setUpClass(cls):
        cls.wire = VENUES[cls.venue]
        cls.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5", venue=cls.venue, balance="5000")
        cls.paper.start()
        cls.addClassCleanup(cls.paper.stop)

    def setUp(self):
        self.paper.reset()
        self.ex = build_exchange(ExchangeConfig(
            exchange_id=self.venue, api_key="paper-key", api_secret="paper-secret", url=self.paper.base_url,
            api_password="paper-pass" if self.venue == "okx" else None, timeout_ms=2000))

    def snapshot(self):
        return risk_reads.read_risk_snapshot(self.ex)

    def flows(self, since_ms, until_ms):
        return risk_reads.read_cash_flows(self.ex, since_ms, until_ms)

    def position(self, snapshot, symbol):
        [position] = [p for p in snapshot.positions if p.symbol == symbol]
        return position

    # -- the snapshot

    def test_snapshot_equals_the_paper_model(self):
        before = now_ms()
        snap = self.snapshot()
        model = self.paper.risk_view()
        self.assertEqual(float(model["equity"]), snap.equity)
        self.assertAlmostEqual(float(model["mm"]), snap.maintenance_margin, places=6)
        self.assertEqual((self.paper.account_modes()[0], self.wire["currency"]), (snap.margin_mode, snap.currency))
        self.assertLessEqual(abs(snap.venue_ts_ms - before), 5000)
        self.assertEqual({(BTC, "long", 0.01, 65000.0), (ETH, "short", 0.5, 3200.0)},
                         {(p.symbol, p.side, p.contracts, p.mark_price) for p in snap.positions})
        eth = self.position(snap, ETH)
        self.assertAlmostEqual(float(model["positions"][("ETHUSDT", "BOTH")]["liq"]), eth.liquidation_price, places=6)
        self.assertIsNone(self.position(snap, BTC).liquidation_price)  # no positive price liquidates it: unknown
        self.assertEqual((), snap.venue_flags)

    def test_one_snapshot_reads_the_raw_endpoints_only(self):
        self.ex.load_markets()
        self.paper.clear_requests()
        self.snapshot()
        self.assertEqual(self.wire["reads"], [r["path"] for r in self.paper.requests()])

    def test_mark_move_changes_equity_and_liquidation_distance(self):
        snap = self.snapshot()
        self.paper.set_mark("ETHUSDT", 4200)          # the short loses 0.5 x 1000
        moved = self.snapshot()
        self.assertEqual(snap.equity - 500, moved.equity)
        self.assertEqual(float(self.paper.risk_view()["equity"]), moved.equity)
        self.assertGreater(moved.maintenance_margin, snap.maintenance_margin)
        distance = [abs(s.liquidation_price - s.mark_price) / s.mark_price
                    for s in (self.position(snap, ETH), self.position(moved, ETH))]
        self.assertLess(distance[1], distance[0])
        self.assertEqual(4200.0, self.position(moved, ETH).mark_price)

    def test_at_the_liquidation_price_equity_meets_maintenance_margin(self):
        liquidation = self.position(self.snapshot(), ETH).liquidation_price
        self.paper.set_mark("ETHUSDT", f"{liquidation:.2f}")
        snap = self.snapshot()
        self.assertAlmostEqual(1.0, snap.maintenance_margin / snap.equity, delta=0.01)

    def test_unknown_liquidation_price_is_none_never_far_away(self):
        for raw in ("0", ""):
            with self.subTest(raw=raw):
                self.paper.set_liquidation("ETHUSDT", raw)
                self.assertIsNone(self.position(self.snapshot(), ETH).liquidation_price)

    def test_malformed_or_non_finite_fields_raise(self):
        for name, raw in ((self.wire["equity"], "NaN"), (self.wire["equity"], "abc"), (self.wire["equity"], "inf"),
                          (self.wire["mm"], ""), (self.wire["mm"], "-1")):
            with self.subTest(field=name, raw=raw):
                self.paper.set_risk_field(name, raw)
                with self.assertRaises(ExchangeDataError):
                    self.snapshot()
                self.paper.set_risk_field(name, None)
        for raw in ("abc", "NaN", "-5"):
            with self.subTest(liquidation=raw):
                self.paper.set_liquidation("ETHUSDT", raw)
                with self.assertRaises(ExchangeDataError):
                    self.snapshot()
        self.paper.set_liquidation("ETHUSDT", None)
        for raw in ("abc", "Infinity", "-1"):
            with self.subTest(mark=raw):
                self.paper.set_position_field("ETHUSDT", self.wire["mark"], raw)
                with self.assertRaises(ExchangeDataError):
                    self.snapshot()
        self.paper.set_position_field("ETHUSDT", self.wire["mark"], None)
        self.snapshot()

    def test_unreadable_account_raises_never_a_default_snapshot(self):
        fault = self.paper.account_unreadable()
        with self.assertRaises(ccxt.BaseError):
            self.snapshot()
        self.paper.faults.clear()
        self.assertIsNotNone(fault)
        self.assertEqual(float(self.paper.risk_view()["equity"]), self.snapshot().equity)

    def test_margin_mode_is_read_and_says_which_inputs_apply(self):
        for mode in self.paper.account_modes():
            with self.subTest(mode=mode):
                self.paper.set_account_mode(mode)
                snap = self.snapshot()
                self.assertEqual(mode, snap.margin_mode)
                self.assertGreater(snap.equity, 0)
                provided = risk_reads.risk_inputs(self.ex, mode)
                self.assertEqual("maintenance_margin" in provided, snap.maintenance_margin is not None)
                if mode == "multi_assets":      # Binance's totals are USD over every collateral
                    self.assertEqual("USD", snap.currency)

    # -- cash flows

    def test_transfers_are_signed_cash_flows_counted_once_across_windows(self):
        now = now_ms()
        old = self.paper.deposit(300, ts_ms=now - 10 * DAY_MS)      # beyond one 7-day window
        mid = self.paper.withdraw(120, ts_ms=now - 3 * DAY_MS)
        self.paper.book_pnl(-7, ts_ms=now - 2 * DAY_MS)            # realised PnL: no transfer
        new = self.paper.deposit(50, ts_ms=now - 1000)
        flows = self.flows(now - 12 * DAY_MS, now + 1)
        self.assertEqual([300.0, -120.0, 50.0], [f.amount for f in flows])
        self.assertEqual(3, len({f.flow_id for f in flows}))
        self.assertTrue(all(isinstance(f, CashFlow) and f.asset == "USDT" and f.kind for f in flows))
        self.assertEqual([now - 10 * DAY_MS, now - 3 * DAY_MS, now - 1000], [f.ts_ms for f in flows])
        # Consecutive reads [a, b) + [b, c) = [a, c): nothing twice, nothing lost at the edge.
        edge = now - 3 * DAY_MS
        parts = self.flows(now - 12 * DAY_MS, edge) + self.flows(edge, now + 1)
        self.assertEqual(flows, parts)
        self.assertTrue(all(str(i) in f.flow_id for i, f in zip((old, mid, new), flows)))
        self.assertEqual(5000 + 300 - 120 - 7 + 50, self.snapshot().equity)

    def test_an_empty_interval_asks_nothing_and_a_reversed_one_is_refused(self):
        self.paper.clear_requests()
        self.assertEqual([], self.flows(5, 5))
        self.assertEqual([], self.paper.requests())
        with self.assertRaises(ValueError):
            self.flows(10, 5)

    def test_flows_from_before_the_venue_keeps_its_ledger_are_refused_never_partial(self):
        kept = risk_reads.READS[self.ex.id].ledger_kept_ms
        self.paper.clear_requests()
        with self.assertRaises(LedgerGapError):
            self.flows(now_ms() - kept - DAY_MS, now_ms())
        self.assertEqual([], self.paper.requests())

    def test_every_page_of_a_busy_ledger(self):
        now = now_ms()
        for n in range(130):
            self.paper.deposit(1 + n, ts_ms=now - 60_000 + n)
        flows = self.flows(now - 120_000, now + 1)
        self.assertEqual([1.0 + n for n in range(130)], [f.amount for f in flows])

    def test_http_admin_moves_marks_transfers_and_mode(self):
        mode = self.paper.account_modes()[-1]
        body = json.dumps({"marks": {"ETHUSDT": "3000"}, "account_mode": mode,
                           "transfers": [{"amount": "25", "ts_ms": now_ms() - 5}, {"amount": "-10"}]})
        host = urlsplit(self.paper.base_url)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=5)
        conn.request("POST", "/_paper/state", body=body, headers={"Content-Type": "application/json"})
        self.assertEqual(200, conn.getresponse().status)
        conn.close()
        snap = self.snapshot()
        self.assertEqual((mode, 5000 + 100 + 25 - 10), (snap.margin_mode, snap.equity))
        self.assertEqual([25.0, -10.0], [f.amount for f in self.flows(now_ms() - 60_000, now_ms() + 1)])
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=5)
        conn.request("POST", "/_paper/state", body=json.dumps({"account_unreadable": {"status": 502}}))
        self.assertEqual(200, conn.getresponse().status)
        conn.close()
        with self.assertRaises(ccxt.BaseError):
            self.snapshot()


class SharedParsingTest(unittest.TestCase):
    """venues/risk_reads.py's helpers, as plain functions."""

    def test_windows_cover_the_interval_edge_to_edge(self):
        self.assertEqual([(0, 7), (7, 14), (14, 15)], risk_reads.windows(0, 15, 7))
        self.assertEqual([(3, 5)], risk_reads.windows(3, 5, 7))
        self.assertEqual([], risk_reads.windows(5, 5, 7))

    def test_flows_between_dedupes_by_id_and_keeps_the_half_open_interval(self):
        flow = lambda i, ts: CashFlow(i, ts, 1.0, "T")   # noqa: E731 - a table helper
        flows = [flow("b", 20), flow("a", 10), flow("a", 10), flow("c", 30), flow("z", 9)]
        self.assertEqual(["a", "b"], [f.flow_id for f in risk_reads.flows_between(flows, 10, 30)])

    def test_prices_unknown_or_refused(self):
        for raw in (None, "", "0", 0, "0.000"):
            self.assertIsNone(risk_reads.price_or_none({"p": raw}, "p", "t"), raw)
        self.assertIsNone(risk_reads.price_or_none({}, "p", "t"))
        self.assertEqual(12.5, risk_reads.price_or_none({"p": "12.5"}, "p", "t"))
        for raw in ("abc", "NaN", "inf", "-1", [], {}):
            with self.assertRaises(ExchangeDataError, msg=raw):
                risk_reads.price_or_none({"p": raw}, "p", "t")

    def test_a_snapshot_is_whole_or_refused(self):
        ok = dict(equity=1.0, maintenance_margin=0.1, margin_mode="cross", currency="USD", positions=(),
                  venue_ts_ms=1)
        self.assertEqual(1.0, risk_reads.risk_snapshot(**ok).equity)
        for bad in (dict(margin_mode="CROSS"), dict(maintenance_margin=-0.1), dict(venue_ts_ms=0)):
            with self.assertRaises(ExchangeDataError, msg=bad):
                risk_reads.risk_snapshot(**dict(ok, **bad))
        with self.assertRaises(ExchangeDataError):
            risk_reads.field({}, "totalEquity", "wallet")
        with self.assertRaises(ExchangeDataError):
            risk_reads.risk_position("BTC/USDT:USDT", None, 1.0, None, None)
        with self.assertRaises(ExchangeDataError):
            risk_reads.cash_flow("", 1, 1.0, "T", "USDT")


class CcxtStandInTest(unittest.TestCase):
    """eexit/ccxt_lite.py, in fresh interpreters: a daemon loads only the exchange it builds,
    and ccxt stays whole for anyone who asks more of it."""

    def run_python(self, code):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        self.assertEqual(0, done.returncode, done.stdout + done.stderr)
        return json.loads(done.stdout)

    def test_only_the_built_exchange_is_imported_and_the_rest_on_demand(self):
        facts = self.run_python(
            "import json, sys\n"
            "from eexit import exchange\n"
            "import ccxt, ccxt.base.errors as errors\n"
            "ex = exchange.build_exchange(exchange.ExchangeConfig(exchange_id='okx', url='http://127.0.0.1:9'))\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('ccxt.') and m.count('.') == 1\n"
            "                and m[5:] in ('binance', 'binanceusdm', 'bybit', 'okx', 'kraken'))\n"
            "facts = dict(loaded=loaded, cls=isinstance(ccxt.okx, type) and isinstance(ex, ccxt.okx),\n"
            "             errors=ccxt.ExchangeError is errors.ExchangeError and ccxt.NotSupported is errors.NotSupported,\n"
            "             tick=ccxt.TICK_SIZE, same=ccxt is exchange.ccxt)\n"
            "facts.update(exchanges=len(ccxt.exchanges), after=isinstance(ccxt.okx, type) and\n"
            "             isinstance(ccxt.kraken, type), version=ccxt.__version__)\n"
            "print(json.dumps(facts))\n")
        self.assertEqual(["ccxt.okx"], facts["loaded"])
        self.assertTrue(facts["cls"] and facts["errors"] and facts["same"] and facts["after"])
        self.assertEqual(ccxt.TICK_SIZE, facts["tick"])
        self.assertGreater(facts["exchanges"], 100)          # ccxt.exchanges: the real __init__ ran
        self.assertEqual(ccxt.__version__, facts["version"])

    def test_an_already_imported_ccxt_is_used_unchanged(self):
        facts = self.run_python("import json, ccxt\nfrom eexit import exchange\n"
                                "print(json.dumps(dict(same=exchange.ccxt is ccxt, whole='exchanges' in vars(ccxt))))")
        self.assertEqual({"same": True, "whole": True}, facts)

    def test_the_venue_modules_imported_first_load_no_exchange_either(self):
        facts = self.run_python("import json, sys\nfrom eexit import venues\n"
                                "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ccxt.')\n"
                                "                        and m.count('.') == 1 and m != 'ccxt.base')))")
        self.assertEqual([], facts)


class BinanceRiskTest(RiskVenueCase, unittest.TestCase):
    venue = "binanceusdm"


class BybitRiskTest(RiskVenueCase, unittest.TestCase):
    venue = "bybit"

    def test_position_status_other_than_normal_is_a_venue_flag(self):
        self.paper.set_position_field("ETHUSDT", "positionStatus", "Liq")
        self.assertEqual(("ETH/USDT:USDT:positionStatus=Liq",), self.snapshot().venue_flags)

    def test_cash_flows_are_read_in_windows_of_at_most_7_days_per_type(self):
        now = now_ms()
        self.paper.deposit(300, ts_ms=now - 10 * DAY_MS)
        self.paper.clear_requests()
        self.assertEqual([300.0], [f.amount for f in self.flows(now - 12 * DAY_MS, now)])
        reads = [r["params"] for r in self.paper.requests(path="/v5/account/transaction-log")]
        self.assertEqual(4, len(reads))        # 2 windows x TRANSFER_IN, TRANSFER_OUT
        self.assertTrue(all(int(p["endTime"]) - int(p["startTime"]) < 7 * DAY_MS for p in reads))

    def test_a_transfer_whose_sign_contradicts_its_type_raises(self):
        self.paper.deposit(10)
        self.paper.account.ledger[-1]["kind"] = "withdraw"      # TRANSFER_OUT with change +10
        with self.assertRaises(ExchangeDataError):
            self.flows(now_ms() - 60_000, now_ms() + 1)


class OkxRiskTest(RiskVenueCase, unittest.TestCase):
    venue = "okx"

    def test_bills_beyond_7_days_come_from_the_archive(self):
        now = now_ms()
        self.paper.deposit(300, ts_ms=now - 10 * DAY_MS)
        self.paper.clear_requests()
        self.assertEqual([], self.flows(now - DAY_MS, now))
        self.assertEqual([300.0], [f.amount for f in self.flows(now - 12 * DAY_MS, now)])
        self.assertEqual(["/api/v5/account/bills", "/api/v5/account/bills-archive"],
                         [r["path"] for r in self.paper.requests()])

    def test_futures_mode_margin_comes_from_details_worst_currency(self):
        """acctLv 2: the account-level mmr is "" and details[] carries each currency's eq and
        mmr; MM/E is the margin use of the currency nearest its own liquidation."""
        self.paper.set_account_mode("futures")
        snap = self.snapshot()
        model = self.paper.risk_view()
        self.assertEqual(("futures", float(model["equity"])), (snap.margin_mode, snap.equity))
        self.assertAlmostEqual(float(model["mm"]), snap.maintenance_margin, places=6)   # one currency: its mmr
        details = [{"ccy": "USDT", "eq": "4000", "mmr": "400"},    # 0.1 of its equity
                   {"ccy": "BTC", "eq": "0.1", "mmr": "0.06"},     # 0.6: the worst, in BTC units
                   {"ccy": "ETH", "eq": "2", "mmr": ""}]           # no cross position
        self.paper.set_risk_field("details", details)
        snap = self.snapshot()
        self.assertAlmostEqual(0.6, snap.maintenance_margin / snap.equity, places=9)
        self.paper.set_risk_field("details", details[:1] + [{"ccy": "BTC", "eq": "0", "mmr": "0.01"}])
        snap = self.snapshot()
        self.assertEqual(1.0, snap.maintenance_margin / snap.equity)     # no equity left under a margin
        for bad in ({"ccy": "BTC", "eq": "0.1", "mmr": "abc"}, {"ccy": "BTC", "eq": "", "mmr": "0.01"},
                    {"ccy": "BTC", "eq": "0.1", "mmr": "-1"}):
            with self.subTest(detail=bad):
                self.paper.set_risk_field("details", [bad])
                with self.assertRaises(ExchangeDataError):
                    self.snapshot()
        self.paper.set_risk_field("details", None)
        self.assertIn("maintenance_margin", risk_reads.risk_inputs(self.ex, "futures"))
        self.assertNotIn("maintenance_margin", risk_reads.risk_inputs(self.ex, "spot"))


if __name__ == "__main__":
    unittest.main()

"""The paper exchange driven by real ccxt binanceusdm over real HTTP (issue 3 acceptance)."""

import hashlib
import hmac
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import unittest
from urllib.parse import urlencode, urlsplit

import ccxt

from eexit.exchange import ExchangeConfig, build_exchange
from eexit.paper import PaperExchange
from tests.harness import ROOT

BTC = "BTC/USDT:USDT"
ETH = "ETH/USDT:USDT"


def client(paper, secret="paper-secret", key="paper-key", timeout_ms=2000):
    cfg = ExchangeConfig(api_key=key, api_secret=secret, url=paper.base_url, timeout_ms=timeout_ms)
    return build_exchange(cfg)


def raw(paper, method, path, params=None, body=None, headers=None, sign=True, secret="paper-secret"):
    """One HTTP request outside ccxt; returns (status, headers, parsed JSON or text)."""
    host = urlsplit(paper.base_url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=5)
    query = params if isinstance(params, str) else urlencode(params or {})
    if sign:
        stamped = (query + "&" if query else "") + f"timestamp={int(time.time() * 1000)}"
        signature = hmac.new(secret.encode(), stamped.encode(), hashlib.sha256).hexdigest()
        query = f"{stamped}&signature={signature}"
    all_headers = {"X-MBX-APIKEY": "paper-key"}
    all_headers.update(headers or {})
    conn.request(method, path + ("?" + query if query else ""), body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return response.status, dict(response.getheaders()), data


def wait_until(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class PaperTestCase(unittest.TestCase):
    """One paper exchange per class, reset before each test; self.ex is a loaded client."""

    seed = "BTCUSDT:0.01,ETHUSDT:-0.5"
    hedge = False
    timeout_ms = 2000

    @classmethod
    def setUpClass(cls):
        cls.paper = PaperExchange(seed=cls.seed, hedge=cls.hedge)
        cls.paper.start()
        cls.addClassCleanup(cls.paper.stop)

    def setUp(self):
        self.paper.reset()
        self.ex = client(self.paper, timeout_ms=self.timeout_ms)
        self.ex.load_markets()


class OneWayTest(PaperTestCase):
    def test_load_markets_without_currency_call_and_with_realistic_filters(self):
        paths = [r["path"] for r in self.paper.requests()]
        self.assertEqual(paths, ["/fapi/v1/exchangeInfo"])
        self.assertGreaterEqual(len(self.ex.markets), 30)
        btc = self.ex.market(BTC)
        self.assertEqual(btc["precision"]["amount"], 0.001)
        self.assertEqual(btc["limits"]["market"]["max"], 120)
        self.assertEqual(btc["limits"]["cost"]["min"], 100)
        self.assertEqual(btc["precision"]["price"], 0.1)

    def test_default_ccxt_with_currencies_also_loads(self):
        ex = ccxt.binanceusdm({"apiKey": "paper-key", "secret": "paper-secret", "timeout": 2000})
        ex.urls["api"] = {k: self.paper.base_url + urlsplit(v).path for k, v in ex.urls["api"].items()}
        ex.load_markets()
        self.assertIn("/sapi/v1/capital/config/getall", [r["path"] for r in self.paper.requests()])

    def test_fetch_positions_one_way(self):
        positions = {p["symbol"]: p for p in self.ex.fetch_positions()}
        self.assertEqual(set(positions), {BTC, ETH})
        self.assertEqual((positions[BTC]["side"], positions[BTC]["contracts"]), ("long", 0.01))
        self.assertEqual((positions[ETH]["side"], positions[ETH]["contracts"]), ("short", 0.5))
        self.assertEqual([r["path"] for r in self.paper.requests()][1:],
                         ["/fapi/v1/leverageBracket", "/fapi/v3/positionRisk"])

    def test_v2_position_risk_lists_every_symbol(self):
        rows = self.ex.fapiPrivateV2GetPositionRisk()
        self.assertEqual(len(rows), len(self.ex.markets))
        self.assertEqual({r["symbol"]: r["positionAmt"] for r in rows if float(r["positionAmt"])},
                         {"BTCUSDT": "0.01", "ETHUSDT": "-0.5"})

    def test_reduce_only_market_close_fills(self):
        order = self.ex.create_order(BTC, "market", "sell", 0.01, None, {"reduceOnly": True})
        self.assertEqual((order["status"], order["filled"]), ("closed", 0.01))
        self.assertEqual(self.paper.position_amount("BTCUSDT"), 0.0)
        request = self.paper.requests(path="/fapi/v1/order")[-1]
        self.assertEqual((request["method"], request["params"]["reduceOnly"]), ("POST", "true"))

    def test_reduce_only_that_would_flip_or_increase_is_rejected_2022(self):
        for side, amount in (("sell", 0.02), ("buy", 0.01)):
            with self.assertRaises(ccxt.ExchangeError) as caught:
                self.ex.create_order(BTC, "market", side, amount, None, {"reduceOnly": True})
            self.assertIn("-2022", str(caught.exception))
        self.assertEqual(self.paper.position_amount("BTCUSDT"), 0.01)

    def test_partial_close_keeps_the_rest(self):
        self.ex.create_order(ETH, "market", "buy", 0.2, None, {"reduceOnly": True})
        self.assertAlmostEqual(self.paper.position_amount("ETHUSDT"), -0.3)

    def test_cancel_all_orders_including_conditional(self):
        self.ex.create_order(BTC, "limit", "buy", 0.01, 60000)
        self.ex.create_order(BTC, "market", "sell", 0.01, None, {"stopLossPrice": 60000, "reduceOnly": True})
        self.ex.create_order(ETH, "limit", "sell", 0.01, 3500)
        self.assertEqual(len(self.ex.fetch_open_orders(BTC)), 1)
        self.assertEqual(len(self.ex.fetch_open_orders(BTC, params={"trigger": True})), 1)
        self.ex.cancel_all_orders(BTC)
        self.assertEqual(self.ex.fetch_open_orders(BTC), [])
        self.assertEqual(len(self.ex.fetch_open_orders(BTC, params={"trigger": True})), 1)
        self.ex.cancel_all_orders(BTC, {"trigger": True})
        self.assertEqual(self.ex.fetch_open_orders(BTC, params={"trigger": True}), [])
        self.assertEqual(len(self.ex.fetch_open_orders(ETH)), 1, "other symbols untouched")
        paths = [r["path"] for r in self.paper.requests(method="DELETE")]
        self.assertEqual(paths, ["/fapi/v1/allOpenOrders", "/fapi/v1/algoOpenOrders"])

    def test_conditional_type_on_order_endpoint_is_rejected_4120(self):
        status, _, body = raw(self.paper, "POST", "/fapi/v1/order",
                              {"symbol": "BTCUSDT", "side": "SELL", "type": "STOP_MARKET", "quantity": "0.01",
                               "stopPrice": "60000"})
        self.assertEqual((status, body["code"]), (400, -4120))

    def test_fetch_and_cancel_single_orders(self):
        order = self.ex.create_order(BTC, "limit", "buy", 0.01, 60000)
        self.assertEqual(self.ex.fetch_order(order["id"], BTC)["status"], "open")
        self.ex.cancel_order(order["id"], BTC)
        self.assertEqual(self.ex.fetch_order(order["id"], BTC)["status"], "canceled")
        with self.assertRaises(ccxt.ExchangeError):
            self.ex.cancel_order(order["id"], BTC)
        algo = self.ex.create_order(BTC, "market", "sell", 0.01, None, {"stopLossPrice": 60000, "reduceOnly": True})
        self.ex.cancel_order(algo["id"], BTC, {"trigger": True})
        self.assertEqual(self.paper.state()["open_algo_orders"], [])

    def test_fetch_balance(self):
        balance = self.ex.fetch_balance()
        self.assertEqual(balance["USDT"]["total"], 1000000.0)
        self.assertEqual(self.paper.requests()[-1]["path"], "/fapi/v3/account")

    def test_countdown_cancel_all_really_cancels(self):
        self.ex.create_order(BTC, "limit", "buy", 0.01, 60000)
        self.ex.create_order(BTC, "market", "sell", 0.01, None, {"stopLossPrice": 60000, "reduceOnly": True})
        response = self.ex.fapiPrivatePostCountdownCancelAll({"symbol": "BTCUSDT", "countdownTime": 100})
        self.assertEqual(response["countdownTime"], "100")
        self.assertTrue(wait_until(lambda: not self.paper.state()["open_orders"]
                                   and not self.paper.state()["open_algo_orders"]))

    def test_countdown_zero_disarms(self):
        self.ex.create_order(BTC, "limit", "buy", 0.01, 60000)
        self.ex.fapiPrivatePostCountdownCancelAll({"symbol": "BTCUSDT", "countdownTime": 100})
        self.ex.fapiPrivatePostCountdownCancelAll({"symbol": "BTCUSDT", "countdownTime": 0})
        self.assertEqual(self.paper.state()["countdowns"], {})
        self.assertEqual(len(self.paper.state()["open_orders"]), 1)

    def test_resting_limit_and_stop_trigger_on_mark_moves(self):
        self.ex.create_order(ETH, "limit", "buy", 0.1, 3000)
        self.ex.create_order(BTC, "market", "sell", 0.01, None, {"stopLossPrice": 60000, "reduceOnly": True})
        self.paper.set_mark("ETHUSDT", 2999)
        self.assertAlmostEqual(self.paper.position_amount("ETHUSDT"), -0.4)
        self.paper.set_mark("BTCUSDT", 61000)
        self.assertEqual(self.paper.position_amount("BTCUSDT"), 0.01)
        self.paper.set_mark("BTCUSDT", 59990)
        self.assertEqual(self.paper.position_amount("BTCUSDT"), 0.0)
        self.assertEqual(self.paper.state()["open_algo_orders"], [])

    def test_filters_enforced_with_binance_codes(self):
        cases = [
            ({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.0015"}, -1111),
            ({"symbol": "ORDIUSDT", "side": "BUY", "type": "MARKET", "quantity": "100.1"}, -4005),
            ({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.001"}, -4164),
            ({"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "quantity": "0.01", "price": "60000.05",
              "timeInForce": "GTC"}, -4014),
            ({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.01",
              "positionSide": "LONG"}, -4061),
        ]
        for params, code in cases:
            status, _, body = raw(self.paper, "POST", "/fapi/v1/order", params)
            self.assertEqual((status, body["code"]), (400, code), params)
        # A reduce-only close is exempt from MIN_NOTIONAL, as on Binance.
        self.paper.set_position("BTCUSDT", "0.001")
        self.ex.create_order(BTC, "market", "sell", 0.001, None, {"reduceOnly": True})
        self.assertEqual(self.paper.position_amount("BTCUSDT"), 0.0)

    def test_market_lot_size_allows_exactly_the_maximum(self):
        self.paper.set_position("ORDIUSDT", "250")
        self.ex.create_order("ORDI/USDT:USDT", "market", "sell", 100, None, {"reduceOnly": True})
        self.assertEqual(self.paper.position_amount("ORDIUSDT"), 150.0)

    def test_batch_orders(self):
        orders = [{"symbol": "BTCUSDT", "side": "SELL", "type": "MARKET", "quantity": "0.01", "reduceOnly": "true"},
                  {"symbol": "ETHUSDT", "side": "SELL", "type": "MARKET", "quantity": "0.5", "reduceOnly": "true"}]
        status, _, body = raw(self.paper, "POST", "/fapi/v1/batchOrders", {"batchOrders": json.dumps(orders)})
        self.assertEqual(status, 200)
        self.assertEqual(body[0]["status"], "NEW")
        self.assertEqual(body[1]["code"], -2022)
        self.assertEqual(self.paper.position_amount("BTCUSDT"), 0.0)

    def test_duplicate_client_order_id_rejected_while_open(self):
        self.ex.create_order(BTC, "limit", "buy", 0.01, 60000, {"newClientOrderId": "same"})
        with self.assertRaises(ccxt.ExchangeError) as caught:
            self.ex.create_order(BTC, "limit", "buy", 0.01, 60000, {"newClientOrderId": "same"})
        self.assertIn("-4116", str(caught.exception))


class HedgeTest(PaperTestCase):
    seed = "BTCUSDT:0.02,ETHUSDT:-0.5"
    hedge = True

    def setUp(self):
        super().setUp()
        self.paper.set_position("BTCUSDT", "-0.01", "SHORT")

    def test_fetch_positions_hedge_reports_both_sides(self):
        positions = sorted((p["symbol"], p["side"], p["contracts"], p["hedged"]) for p in self.ex.fetch_positions())
        self.assertEqual(positions, [(BTC, "long", 0.02, True), (BTC, "short", 0.01, True),
                                     (ETH, "short", 0.5, True)])

    def test_close_with_position_side(self):
        self.ex.create_order(BTC, "market", "sell", 0.02, None, {"positionSide": "LONG"})
        self.assertEqual(self.paper.position_amount("BTCUSDT", "LONG"), 0.0)
        self.assertEqual(self.paper.position_amount("BTCUSDT", "SHORT"), -0.01)
        self.ex.create_order(BTC, "market", "buy", 0.01, None, {"reduceOnly": True, "hedged": True})
        self.assertEqual(self.paper.positions(), {("ETHUSDT", "SHORT"): -0.5})

    def test_hedge_rejects_reduce_only_and_missing_position_side(self):
        with self.assertRaises(ccxt.ExchangeError) as caught:
            self.ex.create_order(BTC, "market", "sell", 0.01, None, {"reduceOnly": True})
        self.assertIn("-1106", str(caught.exception))
        with self.assertRaises(ccxt.ExchangeError) as caught:
            self.ex.create_order(BTC, "market", "sell", 0.01)
        self.assertIn("-4061", str(caught.exception))

    def test_hedge_close_larger_than_side_is_rejected(self):
        with self.assertRaises(ccxt.ExchangeError) as caught:
            self.ex.create_order(BTC, "market", "buy", 0.02, None, {"positionSide": "SHORT"})
        self.assertIn("-2022", str(caught.exception))

    def test_position_mode_endpoint(self):
        self.assertEqual(self.ex.fapiPrivateGetPositionSideDual(), {"dualSidePosition": True})


class AuthAndFaultTest(PaperTestCase):
    def test_wrong_secret_and_key_raise_authentication_error(self):
        for ex in (client(self.paper, secret="wrong"), client(self.paper, key="wrong")):
            with self.assertRaises(ccxt.AuthenticationError):
                ex.fetch_balance()
        status, _, body = raw(self.paper, "GET", "/fapi/v3/account", headers={"X-MBX-APIKEY": ""})
        self.assertEqual((status, body["code"]), (401, -2014))

    def test_stale_timestamp_is_rejected_1021(self):
        stamp = int(time.time() * 1000) - 20000
        query = f"timestamp={stamp}&recvWindow=5000"
        signature = hmac.new(b"paper-secret", query.encode(), hashlib.sha256).hexdigest()
        status, _, body = raw(self.paper, "GET", "/fapi/v3/account", f"{query}&signature={signature}", sign=False)
        self.assertEqual((status, body["code"]), (400, -1021))

    def test_429_and_418_with_retry_after(self):
        for status, retry in ((429, 3), (418, 120)):
            self.paper.add_fault(kind="error", status=status, retry_after=retry, count=1)
            with self.assertRaises(ccxt.DDoSProtection):
                self.ex.fetch_balance()
            self.assertEqual(self.ex.last_response_headers["Retry-After"], str(retry))
        self.ex.fetch_balance()  # counts used up

    def test_hang_raises_request_timeout_within_configured_timeout(self):
        ex = client(self.paper, timeout_ms=300)
        ex.load_markets()
        self.paper.add_fault(kind="hang", seconds=5, path="positionRisk", count=1)
        ex.options["leverageBrackets"] = {}
        started = time.monotonic()
        with self.assertRaises(ccxt.RequestTimeout):
            ex.fetch_positions()
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertEqual(len(ex.fetch_positions()), 2, "server keeps serving")

    def test_5xx_is_exchange_not_available_and_scoped_by_path_and_duration(self):
        self.paper.add_fault(kind="error", status=503, path="positionRisk", duration_s=0.3)
        with self.assertRaises(ccxt.ExchangeNotAvailable):
            self.ex.fetch_positions()
        self.ex.fetch_balance()  # other paths unaffected
        self.assertTrue(wait_until(lambda: self._positions_work()))

    def _positions_work(self):
        try:
            return len(self.ex.fetch_positions()) == 2
        except ccxt.ExchangeNotAvailable:
            return False

    def test_connection_reset_is_network_error(self):
        self.paper.add_fault(kind="reset", count=1)
        with self.assertRaises(ccxt.NetworkError):
            self.ex.fetch_balance()
        self.ex.fetch_balance()

    def test_partial_fill_and_symbol_reject(self):
        self.paper.add_fault(kind="partial_fill", ratio=0.5, symbol="ETHUSDT", count=1)
        order = self.ex.create_order(ETH, "market", "buy", 0.5, None, {"reduceOnly": True})
        self.assertEqual((order["status"], order["filled"]), ("expired", 0.25))
        self.assertAlmostEqual(self.paper.position_amount("ETHUSDT"), -0.25)
        self.paper.add_fault(kind="reject", symbol="BTCUSDT", code=-2019, msg="Margin is insufficient.")
        with self.assertRaises(ccxt.ExchangeError) as caught:
            self.ex.create_order(BTC, "market", "sell", 0.01, None, {"reduceOnly": True})
        self.assertIn("-2019", str(caught.exception))
        self.ex.create_order(ETH, "market", "buy", 0.25, None, {"reduceOnly": True})
        self.assertEqual(self.paper.positions(), {("BTCUSDT", "BOTH"): 0.01})

    def test_weight_limit_and_headers(self):
        self.ex.fetch_balance()
        used = int(self.ex.last_response_headers["X-MBX-USED-WEIGHT-1M"])
        self.assertGreater(used, 0)
        self.paper.add_fault(kind="weight_limit", limit=used + 5)
        with self.assertRaises(ccxt.DDoSProtection) as caught:
            for _ in range(3):
                self.ex.fetch_balance()
        self.assertIn("-1003", str(caught.exception))
        self.assertIn("Retry-After", self.ex.last_response_headers)

    def test_order_rate_limit(self):
        self.paper.set_position("DOGEUSDT", "1000")
        self.paper.add_fault(kind="order_limit", limit=2)
        with self.assertRaises(ccxt.DDoSProtection) as caught:
            for _ in range(5):
                self.ex.create_order("DOGE/USDT:USDT", "market", "sell", 100, None, {"reduceOnly": True})
        self.assertIn("-1015", str(caught.exception))
        self.assertIn("X-MBX-ORDER-COUNT-10S", self.ex.last_response_headers)

    def test_latency_fault_delays(self):
        self.paper.add_fault(kind="latency", ms=150, count=1)
        started = time.monotonic()
        self.ex.fetch_balance()
        self.assertGreaterEqual(time.monotonic() - started, 0.15)


class HostileInputTest(PaperTestCase):
    def assert_binance_error(self, response, status=400, code=None):
        got_status, _, body = response
        self.assertEqual(got_status, status, body)
        self.assertIsInstance(body, dict, body)
        self.assertEqual(set(body), {"code", "msg"})
        if code is not None:
            self.assertEqual(body["code"], code, body)

    def test_hostile_requests_get_binance_errors_and_server_keeps_serving(self):
        order = "/fapi/v1/order"
        self.assert_binance_error(raw(self.paper, "GET", "/fapi/v3/account", "%%%&&==&%zz", sign=False), 400)
        self.assert_binance_error(raw(self.paper, "GET", "/fapi/v3/account", "a=1&a=2", sign=False), 400, -1101)
        self.assert_binance_error(raw(self.paper, "GET", "/fapi/v3/account", "&".join(f"k{i}=1" for i in range(500)),
                                      sign=False), 400, -1101)
        self.assert_binance_error(raw(self.paper, "GET", "/fapi/v1/premiumIndex", {"symbol": "NOPEUSDT"},
                                      sign=False), 400, -1121)
        base = {"symbol": "BTCUSDT", "side": "SELL", "type": "MARKET", "reduceOnly": "true"}
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="-0.01")), 400, -4003)
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="NaN")), 400, -1102)
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="inf")), 400, -1102)
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="1e99999")), 400)
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="0.01", symbol="../../etc")),
                                  400, -1121)
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="0.01", side="SIDEWAYS")),
                                  400, -1102)
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="0.01", reduceOnly="maybe")),
                                  400, -1130)
        self.assert_binance_error(raw(self.paper, "POST", order, dict(base, quantity="0.01", type="\x00\xff")),
                                  400, -1116)
        self.assert_binance_error(raw(self.paper, "POST", "/fapi/v1/batchOrders", {"batchOrders": "{not json"}),
                                  400, -1102)
        self.assert_binance_error(raw(self.paper, "POST", "/fapi/v1/countdownCancelAll",
                                      {"symbol": "BTCUSDT", "countdownTime": "soon"}), 400, -1102)
        self.assert_binance_error(raw(self.paper, "POST", order, body=b"x" * (2 * 1024 * 1024),
                                      headers={"Content-Type": "application/x-www-form-urlencoded"}), 413)
        self.assert_binance_error(raw(self.paper, "GET", "/no/such/path", sign=False), 404)
        self.assert_binance_error(raw(self.paper, "PUT", "/fapi/v1/order", sign=False), 404)
        self.assertEqual(self.paper.positions(), {("BTCUSDT", "BOTH"): 0.01, ("ETHUSDT", "BOTH"): -0.5})
        self.assertEqual(len(self.ex.fetch_positions()), 2)


class AdminAndCliTest(PaperTestCase):
    def test_admin_http_endpoints(self):
        status, _, state = raw(self.paper, "POST", "/_paper/state", sign=False,
                               body=json.dumps({"marks": {"BTCUSDT": 70000}, "seed": "SOLUSDT:-3"}))
        self.assertEqual(status, 200)
        self.assertEqual(state["marks"]["BTCUSDT"], "70000")
        self.assertIn({"symbol": "SOLUSDT", "position_side": "BOTH", "amount": "-3", "entry_price": "150"},
                      state["positions"])
        status, _, body = raw(self.paper, "POST", "/_paper/faults", sign=False,
                              body=json.dumps({"kind": "error", "status": 503, "path": "positionRisk", "count": 1}))
        self.assertEqual((status, len(body["faults"])), (200, 1))
        with self.assertRaises(ccxt.ExchangeNotAvailable):
            self.ex.fetch_positions()
        status, _, body = raw(self.paper, "GET", "/_paper/requests", "path=positionRisk", sign=False)
        self.assertEqual([(r["method"], r["path"]) for r in body["requests"]], [("GET", "/fapi/v3/positionRisk")])
        self.assertNotIn("signature", body["requests"][0]["params"])
        self.assertEqual(raw(self.paper, "POST", "/_paper/faults", sign=False, body="{nonsense")[0], 400)
        self.assertEqual(raw(self.paper, "POST", "/_paper/reset", sign=False, body="{}")[0], 200)
        self.assertEqual(len(self.paper.state()["positions"]), 2)

    def test_cli_prints_url_serves_and_stops_on_sigterm(self):
        process = subprocess.Popen([sys.executable, "-m", "eexit.paper", "--port", "0", "--seed",
                                    "BTCUSDT:0.01,ETHUSDT:-0.5", "--hedge", "--latency-ms", "1"],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PYTHONPATH=ROOT))
        try:
            url = process.stdout.readline().strip()
            self.assertTrue(url.startswith("http://127.0.0.1:"), url)
            ex = build_exchange(ExchangeConfig(api_key="paper-key", api_secret="paper-secret", url=url))
            sides = sorted((p["symbol"], p["side"]) for p in ex.fetch_positions())
            self.assertEqual(sides, [(BTC, "long"), (ETH, "short")])
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(timeout=5), 0)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            process.stderr.close()


class StopTest(unittest.TestCase):
    def test_stopped_exchange_refuses_kept_alive_clients(self):
        paper = PaperExchange(seed="BTCUSDT:0.01")
        paper.start()
        ex = client(paper, timeout_ms=500)
        self.assertEqual(len(ex.fetch_positions()), 1)
        paper.stop()
        with self.assertRaises(ccxt.NetworkError):
            ex.fetch_positions()


if __name__ == "__main__":
    unittest.main()

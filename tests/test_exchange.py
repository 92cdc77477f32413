"""eexit.exchange against the paper exchange through real ccxt."""

import gzip
import http.server
import json
import os
import tempfile
import threading
import time
import unittest

import ccxt

from eexit.config import ConfigError
from eexit.exchange import (ErrorClass, ExchangeConfig, MarketRules, Position, arm_deadman, build_exchange,
                            cancel_book, classify_error, load_market_rules, place_close_order,
                            read_open_orders, read_positions)
from tests.test_paper import PaperTestCase

BTC = "BTC/USDT:USDT"
ETH = "ETH/USDT:USDT"


class ConfigTest(unittest.TestCase):
    def test_defaults(self):
        cfg = ExchangeConfig.from_env({})
        self.assertEqual((cfg.exchange_id, cfg.api_key, cfg.api_secret, cfg.url, cfg.sandbox, cfg.timeout_ms),
                         ("binanceusdm", None, None, None, False, 5000))

    def test_primary_names_aliases_and_credentials_directory(self):
        cfg = ExchangeConfig.from_env({"BINANCE_API_KEY": "k1", "BINANCE_API_SECRET": "s1",
                                       "BINANCE_TESTNET": "true"})
        self.assertEqual((cfg.api_key, cfg.api_secret, cfg.sandbox), ("k1", "s1", True))
        cfg = ExchangeConfig.from_env({"EEXIT_API_KEY": "k2", "EEXIT_API_SECRET": "s2", "BINANCE_API_KEY": "k1",
                                       "BINANCE_API_SECRET": "s1", "EEXIT_SANDBOX": "false",
                                       "BINANCE_TESTNET": "true"})
        self.assertEqual((cfg.api_key, cfg.api_secret, cfg.sandbox), ("k2", "s2", False))
        with tempfile.TemporaryDirectory() as directory:
            for name, value in (("api_key", "file-key\n"), ("api_secret", "file-secret\n")):
                with open(os.path.join(directory, name), "w") as handle:
                    handle.write(value)
            cfg = ExchangeConfig.from_env({"CREDENTIALS_DIRECTORY": directory, "EEXIT_API_KEY": "env"})
            self.assertEqual((cfg.api_key, cfg.api_secret), ("file-key", "file-secret"))

    def test_bad_values_name_the_variable(self):
        cases = [
            ({"EEXIT_EXCHANGE": "nonesuch"}, "EEXIT_EXCHANGE"),
            ({"EEXIT_EXCHANGE_TIMEOUT_MS": "soon"}, "EEXIT_EXCHANGE_TIMEOUT_MS"),
            ({"EEXIT_EXCHANGE_TIMEOUT_MS": "0"}, "EEXIT_EXCHANGE_TIMEOUT_MS"),
            ({"EEXIT_EXCHANGE_URL": "ftp://x"}, "EEXIT_EXCHANGE_URL"),
            ({"EEXIT_SANDBOX": "perhaps"}, "EEXIT_SANDBOX"),
            ({"EEXIT_API_KEY": "k"}, "EEXIT_API_SECRET"),
            ({"EEXIT_SANDBOX": "true", "EEXIT_EXCHANGE_URL": "http://127.0.0.1:1"}, "EEXIT_EXCHANGE_URL"),
        ]
        for env, name in cases:
            with self.assertRaises(ConfigError, msg=env) as caught:
                ExchangeConfig.from_env(env)
            self.assertIn(name, str(caught.exception))

    def test_secrets_never_in_repr(self):
        cfg = ExchangeConfig.from_env({"EEXIT_API_KEY": "KEY-123", "EEXIT_API_SECRET": "SECRET-456"})
        self.assertNotIn("KEY-123", repr(cfg))
        self.assertNotIn("SECRET-456", repr(cfg))
        self.assertNotIn("SECRET-456", str(cfg))

    def test_build_exchange_settings(self):
        cfg = ExchangeConfig.from_env({"EEXIT_EXCHANGE_URL": "http://127.0.0.1:9/", "EEXIT_API_KEY": "k",
                                       "EEXIT_API_SECRET": "s", "EEXIT_EXCHANGE_TIMEOUT_MS": "1234"})
        ex = build_exchange(cfg)
        self.assertFalse(ex.enableRateLimit)
        self.assertEqual(ex.timeout, 1234)
        self.assertFalse(ex.options["fetchCurrencies"])
        self.assertFalse(ex.options["fetchOpenOrders"]["warnWithoutSymbol"])
        self.assertTrue(all(url.startswith("http://127.0.0.1:9/") for url in ex.urls["api"].values()))
        self.assertEqual(ex.urls["api"]["fapiPrivateV3"], "http://127.0.0.1:9/fapi/v3")
        sandbox = build_exchange(ExchangeConfig.from_env({"EEXIT_SANDBOX": "true"}))
        self.assertIn("testnet", sandbox.urls["api"]["fapiPublic"])

    def test_rawencode_is_ccxts_text_without_the_round_trip(self):
        """The batch body Binance signs is byte for byte what ccxt's own rawencode gives."""
        from ccxt.base.exchange import Exchange
        ex = build_exchange(ExchangeConfig.from_env({}))
        batch = json.dumps([{"symbol": "BTCUSDT", "quantity": "0.1", "reduceOnly": "true",
                             "newClientOrderId": "eexit-a_b-1"}])
        for params in ({"batchOrders": batch, "timestamp": 1765000000000, "recvWindow": 10000},
                       {"a": True, "b": False, "c": None, "d": 1.5, "e": "x y+z%25&=?/~ünï", "f": [1, "2"]}, {}):
            self.assertEqual(ex.rawencode(params), Exchange.rawencode(params))


class ExchangeTestCase(PaperTestCase):
    timeout_ms = 1000

    def raised(self, call, *args):
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc
        self.fail(f"{call.__name__} did not raise")


class OneWayTest(ExchangeTestCase):
    def test_read_positions(self):
        positions = sorted(read_positions(self.ex), key=lambda p: p.symbol)
        self.assertEqual(positions, [
            Position(BTC, "BTCUSDT", "long", 0.01, "BOTH", 65000.0, 65000.0),
            Position(ETH, "ETHUSDT", "short", 0.5, "BOTH", 3200.0, 3200.0),
        ])
        self.assertEqual(self.paper.requests()[-1]["path"], "/fapi/v3/positionRisk")

    def test_position_with_zero_entry_price_is_not_missed(self):
        self.paper.set_position("SOLUSDT", "7", entry_price=0)
        self.assertNotIn("SOL/USDT:USDT", [p["symbol"] for p in self.ex.fetch_positions()])  # ccxt drops it
        self.assertIn(("SOL/USDT:USDT", 7.0), [(p.symbol, p.contracts) for p in read_positions(self.ex)])

    def test_read_failures_raise_never_empty(self):
        self.ex.load_markets()
        self.paper.set_state({"clear_positions": True})
        self.assertEqual(read_positions(self.ex), [])  # a real empty account
        for fault in ({"kind": "error", "status": 503}, {"kind": "error", "status": 429},
                      {"kind": "hang", "seconds": 3}, {"kind": "reset"}):
            self.paper.add_fault(fault, path="positionRisk", count=1)
            with self.assertRaises(ccxt.NetworkError, msg=fault):
                read_positions(self.ex)
        bad = build_exchange(ExchangeConfig(api_key="paper-key", api_secret="nope", url=self.paper.base_url))
        with self.assertRaises(ccxt.AuthenticationError):
            read_positions(bad)

    def test_open_orders_both_books_and_cancel_all(self):
        self.ex.load_markets()
        self.ex.create_order(BTC, "limit", "buy", 0.01, 60000)
        self.ex.create_order(BTC, "market", "sell", 0.01, None, {"stopLossPrice": 60000, "reduceOnly": True})
        self.ex.create_order(ETH, "limit", "sell", 0.01, 3500)
        orders = read_open_orders(self.ex)
        self.assertEqual(sorted((o.market_id, o.conditional, o.reduce_only) for o in orders),
                         [("BTCUSDT", False, False), ("BTCUSDT", True, True), ("ETHUSDT", False, False)])
        for conditional in (False, True):       # each book on its own, as the EEW cancels
            cancel_book(self.ex, BTC, conditional)
        self.assertEqual([o.market_id for o in read_open_orders(self.ex)], ["ETHUSDT"])

    def test_place_close_order_one_way(self):
        result = place_close_order(self.ex, BTC, "sell", 0.01, "BOTH", "eexit-1")
        self.assertEqual((result["status"], result["filled"], result["amount"]), ("closed", 0.01, 0.01))
        params = self.paper.requests(path="/fapi/v1/order")[-1]["params"]
        self.assertEqual((params["reduceOnly"], params["newClientOrderId"], params["type"]),
                         ("true", "eexit-1", "MARKET"))
        exc = self.raised(place_close_order, self.ex, ETH, "sell", 0.5, "BOTH", "eexit-2")
        self.assertEqual(classify_error(exc), ErrorClass("reduce_only_rejected", None, -2022))
        with self.assertRaises(ValueError):
            place_close_order(self.ex, ETH, "long", 0.5, "BOTH", "eexit-3")

    def test_arm_deadman(self):
        arm_deadman(self.ex, BTC, 5000)
        self.assertEqual(self.paper.state()["countdowns"], {"BTCUSDT": 5000})
        arm_deadman(self.ex, BTC, 0)
        self.assertEqual(self.paper.state()["countdowns"], {})

    def test_market_rules(self):
        rules = load_market_rules(self.ex)
        self.assertEqual(rules["ORDI/USDT:USDT"], MarketRules("ORDI/USDT:USDT", "ORDIUSDT", 0.1, 0.1, 100.0, 5.0,
                                                              0.001, 1.0))
        self.assertEqual(rules[BTC].max_market_qty, 120.0)
        self.assertGreaterEqual(len(rules), 30)


class HedgeTest(ExchangeTestCase):
    hedge = True
    seed = "BTCUSDT:0.02,ETHUSDT:-0.5"

    def setUp(self):
        super().setUp()
        self.paper.set_position("BTCUSDT", "-0.01", "SHORT")

    def test_read_positions_hedge(self):
        positions = sorted((p.symbol, p.side, p.position_side, p.contracts) for p in read_positions(self.ex))
        self.assertEqual(positions, [(BTC, "long", "LONG", 0.02), (BTC, "short", "SHORT", 0.01),
                                     (ETH, "short", "SHORT", 0.5)])

    def test_place_close_order_hedge(self):
        for position in read_positions(self.ex):
            side = "sell" if position.side == "long" else "buy"
            result = place_close_order(self.ex, position.symbol, side, position.contracts, position.position_side,
                                       f"c-{position.market_id}-{position.position_side}")
            self.assertEqual(result["filled"], position.contracts)
        self.assertEqual(read_positions(self.ex), [])
        params = self.paper.requests(path="/fapi/v1/order")[-1]["params"]
        self.assertNotIn("reduceOnly", params)
        with self.assertRaises(ValueError):
            place_close_order(self.ex, BTC, "buy", 0.01, "LONG", "wrong-way")

    def test_position_side_errors_classified(self):
        self.ex.load_markets()
        exc = self.raised(self.ex.create_order, BTC, "market", "sell", 0.01, None, {"reduceOnly": True})
        self.assertEqual(classify_error(exc).kind, "position_side")
        exc = self.raised(self.ex.create_order, BTC, "market", "sell", 0.01)
        self.assertEqual(classify_error(exc), ErrorClass("position_side", None, -4061))


class ClassifyTest(ExchangeTestCase):
    def test_real_exceptions(self):
        self.ex.load_markets()
        fetch = self.ex.fetch_balance
        cases = [
            ({"kind": "error", "status": 429, "retry_after": 3}, "rate_limited", 3.0),
            ({"kind": "error", "status": 418, "retry_after": 90}, "rate_limited", 90.0),
            ({"kind": "error", "status": 503}, "transient", None),
            ({"kind": "error", "status": 500, "code": -1001, "msg": "Internal error."}, "transient", None),
            ({"kind": "hang", "seconds": 3}, "transient", None),
            ({"kind": "reset"}, "transient", None),
        ]
        for fault, kind, retry in cases:
            self.paper.add_fault(fault, count=1)
            exc = self.raised(fetch)
            got = classify_error(exc, self.ex)
            self.assertEqual((got.kind, got.retry_after_s), (kind, retry), (fault, exc))
        bad = build_exchange(ExchangeConfig(api_key="paper-key", api_secret="nope", url=self.paper.base_url))
        self.assertEqual(classify_error(self.raised(bad.fetch_balance)), ErrorClass("auth", None, -1022))

    def test_order_rejections(self):
        self.ex.load_markets()
        order = self.ex.create_order
        cases = [
            ((BTC, "market", "buy", 0.001), -4164),                     # min notional when opening
            (("ORDI/USDT:USDT", "market", "buy", 101), -4005),          # MARKET_LOT_SIZE
        ]
        for args, code in cases:
            self.assertEqual(classify_error(self.raised(order, *args)), ErrorClass("rejected", None, code))
        self.paper.add_fault(kind="reject", symbol="BTCUSDT", code=-1111, msg="Precision is over the maximum "
                                                                              "defined for this asset.", count=1)
        exc = self.raised(order, BTC, "market", "sell", 0.01, None, {"reduceOnly": True})
        self.assertEqual(classify_error(exc), ErrorClass("rejected", None, -1111))
        self.paper.add_fault(kind="order_limit", limit=0, count=1)
        exc = self.raised(order, BTC, "market", "sell", 0.01, None, {"reduceOnly": True})
        self.assertEqual(classify_error(exc, self.ex).kind, "rate_limited")

    def test_non_exchange_errors(self):
        self.assertEqual(classify_error(ValueError("x")).kind, "unknown")
        self.assertEqual(classify_error(ccxt.DDoSProtection('binanceusdm {"code":-2015,"msg":"x"}')).kind, "auth")
        self.assertEqual(classify_error(ccxt.RequestTimeout("t")).kind, "transient")


if __name__ == "__main__":
    unittest.main()


class VenueSeamTest(unittest.TestCase):
    """Configuration and error classification per venue (no network)."""

    def test_only_supported_venues_start_and_binance_spot_is_refused(self):
        for exchange_id in ("gate", "okex", "bybitt", "binance", "kucoinfutures"):
            with self.assertRaises(ConfigError) as caught:
                ExchangeConfig.from_env({"EEXIT_EXCHANGE": exchange_id})
            self.assertIn("supported: binanceusdm, bybit, okx", str(caught.exception))
        self.assertIn("spot", str(self.config_error({"EEXIT_EXCHANGE": "binance"})))

    def config_error(self, env):
        with self.assertRaises(ConfigError) as caught:
            ExchangeConfig.from_env(env)
        return caught.exception

    def test_passphrase_where_the_venue_needs_one_and_nowhere_else(self):
        keys = {"EEXIT_API_KEY": "k", "EEXIT_API_SECRET": "s"}
        self.assertIn("EEXIT_API_PASSWORD", str(self.config_error({"EEXIT_EXCHANGE": "okx", **keys})))
        self.assertIn("EEXIT_API_PASSWORD", str(self.config_error({**keys, "EEXIT_API_PASSWORD": "p"})))
        cfg = ExchangeConfig.from_env({"EEXIT_EXCHANGE": "okx", **keys, "EEXIT_API_PASSWORD": "PASS-789"})
        self.assertNotIn("PASS-789", repr(cfg))
        self.assertEqual("PASS-789", build_exchange(cfg).password)
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "api_password"), "w") as handle:
                handle.write("file-pass\n")
            cfg = ExchangeConfig.from_env({"EEXIT_EXCHANGE": "okx", **keys, "CREDENTIALS_DIRECTORY": directory})
            self.assertEqual("file-pass", cfg.api_password)

    def test_scope_names_every_segment(self):
        from eexit.exchange import default_order_limits, scope
        self.assertEqual("bybit:linear/USDT,linear/USDC,inverse", scope("bybit"))
        self.assertEqual("okx:SWAP,FUTURES", scope("okx"))
        self.assertEqual("binanceusdm:usdm", scope("binanceusdm"))
        self.assertEqual(("300/10,1200/60", "10/1", "60/2"),
                         tuple(default_order_limits(v) for v in ("binanceusdm", "bybit", "okx")))

    def test_each_venue_classifies_by_its_own_codes(self):
        bybit = build_exchange(ExchangeConfig.from_env({"EEXIT_EXCHANGE": "bybit"}))
        bybit.last_response_headers = {"X-Bapi-Limit-Reset-Timestamp": str(int(time.time() * 1000) + 3000)}
        kind = classify_error(ccxt.RateLimitExceeded('bybit {"retCode":10006,"retMsg":"Too many visits"}'), bybit)
        self.assertEqual(("rate_limited", 10006), (kind.kind, kind.code))
        self.assertTrue(2.0 < kind.retry_after_s <= 3.0, kind)
        cases = [
            ("bybit", ccxt.BadRequest('bybit {"retCode":10001,"retMsg":"position idx not match position mode"}'),
             ("rejected", 10001)),
            ("bybit", ccxt.InvalidOrder('bybit {"retCode":110017,"retMsg":"Reduce-only rule not satisfied"}'),
             ("reduce_only_rejected", 110017)),
            ("bybit", ccxt.AuthenticationError('bybit {"retCode":10004,"retMsg":"error sign!"}'), ("auth", 10004)),
            ("okx", ccxt.BadRequest('okx {"code":"1","msg":"","data":[{"sCode":"51000","sMsg":"Parameter clOrdId error"}]}'),
             ("rejected", 51000)),
            ("okx", ccxt.RateLimitExceeded('okx {"code":"50011","msg":"Too Many Requests","data":[]}'),
             ("rate_limited", 50011)),
            ("okx", ccxt.ExchangeError('okx {"code":"1","data":[{"sCode":"51169","sMsg":"no position"}]}'),
             ("reduce_only_rejected", 51169)),
            ("okx", ccxt.AuthenticationError('okx {"code":"50113","msg":"Invalid Sign","data":[]}'), ("auth", 50113)),
            ("binanceusdm", ccxt.ExchangeError('binanceusdm {"code":-2022,"msg":"ReduceOnly Order is rejected."}'),
             ("reduce_only_rejected", -2022)),
        ]
        for exchange_id, exc, expected in cases:
            kind = classify_error(exc, exchange_id=exchange_id)
            self.assertEqual(expected, (kind.kind, kind.code), (exchange_id, exc))


class _Plain(http.server.BaseHTTPRequestHandler):
    """Answers for ExchangeSessionTest: gzip, a redirect, a slow answer; counts connections."""
    protocol_version = "HTTP/1.1"
    connections, paths = [], []

    def setup(self):
        super().setup()
        self.connections.append(self.client_address)

    def do_GET(self):
        self.paths.append(self.path)
        if self.path == "/slow":
            time.sleep(1.0)
        status, body, headers = 200, b'{"ok":true}', {"Content-Type": "application/json"}
        if self.path == "/gzip":
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        elif self.path == "/redirect":
            status, body, headers = 302, b"", {"Location": "/target"}
        self.send_response(status)
        for key, value in dict(headers, **{"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the slow answer meets a client that timed out and closed: expected here


class ExchangeSessionTest(unittest.TestCase):
    """exchange.ExchangeSession under ccxt's own fetch(): what requests did, on http.client."""

    def setUp(self):
        _Plain.connections, _Plain.paths = [], []
        self.server = _Server(("127.0.0.1", 0), _Plain)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.ex = build_exchange(ExchangeConfig.from_env({"EEXIT_EXCHANGE_URL": self.base,
                                                          "EEXIT_EXCHANGE_TIMEOUT_MS": "300"}))

    def test_keep_alive_and_gzip(self):
        for _ in range(3):
            self.assertEqual({"ok": True}, self.ex.fetch(self.base + "/gzip"))
        self.assertEqual(1, len(_Plain.connections), "one connection kept alive for every request")

    def test_a_redirect_is_not_followed_and_fails_the_request(self):
        with self.assertRaises(ccxt.ExchangeError):
            self.ex.fetch(self.base + "/redirect")
        self.assertEqual(["/redirect"], _Plain.paths)

    def test_a_timeout_is_request_timeout_and_the_connection_is_not_reused(self):
        self.ex.fetch(self.base + "/plain")
        with self.assertRaises(ccxt.RequestTimeout):
            self.ex.fetch(self.base + "/slow")
        self.assertEqual({"ok": True}, self.ex.fetch(self.base + "/plain"))
        self.assertEqual(2, len(_Plain.connections))

    def test_a_refused_connection_is_a_network_error_not_a_timeout(self):
        self.server.shutdown()
        self.server.server_close()
        with self.assertRaises(ccxt.NetworkError) as caught:
            self.ex.fetch(self.base + "/plain")
        self.assertNotIsInstance(caught.exception, ccxt.RequestTimeout)

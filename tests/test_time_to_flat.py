"""Time to flat on a real exchange (issue 18), functionally: HTTPS with a CA file through real
ccxt, a connection the server dropped while idle, one shared TLS context, the LIFO pool, batch
order results mapped back per venue (a rejected order and a rate-limited one inside a batch),
and the deadline that grows with the work. Speed itself is measured in bench/, never here."""

import shutil
import tempfile
import threading
import unittest
import uuid

import ccxt

from eexit import eew, exchange, flatten
from eexit.config import ConfigError
from eexit.paper import PaperExchange, make_test_cert
from tests.harness import wait_for
from tests.test_eew import EEWCase
from tests.test_eew_pacing import BINANCE, schedule
from tests.test_venues import DIALECTS, venue_env

CREDENTIALS = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret"}


def client(paper, venue="binanceusdm", **env):
    cfg = exchange.ExchangeConfig.from_env({**CREDENTIALS, **venue_env(venue), "EEXIT_EXCHANGE_URL": paper.base_url,
                                            **env})
    ex = exchange.build_exchange(cfg)
    exchange.load_market_rules(ex)
    return ex, cfg


class Deadline(unittest.TestCase):
    def test_the_floor_is_when_the_pacer_lets_the_last_order_out(self):
        for limits in (BINANCE, ((10, 1.0),), ((60, 2.0),)):
            for orders in (1, 9, 10, 11, 299, 300, 301, 900, 901, 1000, 1300):
                with self.subTest(limits=limits, orders=orders):
                    self.assertAlmostEqual(eew.rate_floor_s(orders, limits, 0.0), schedule(orders, limits)[-1])

    def test_the_deadline_is_the_base_plus_the_floor(self):
        rows = [  # base, positions, limits, deadline
            (30, 0, BINANCE, 30.0), (30, 1, BINANCE, 30.0), (30, 300, BINANCE, 30.0),
            (30, 301, BINANCE, 40.1), (30, 900, BINANCE, 50.2), (30, 1000, BINANCE, 60.3),
            (30, 1300, BINANCE, 90.1), (5, 25, ((10, 1.0),), 5 + 2 * 1.1), (30, 200, ((60, 2.0),), 30 + 3 * 2.1)]
        for base, positions, limits, deadline in rows:
            with self.subTest(positions=positions, limits=limits):
                self.assertAlmostEqual(eew.close_deadline_s(base, positions, limits), deadline)

    def test_a_thousand_positions_fit_the_default_deadline(self):
        """The issue's case: 1,000 closes at Binance's limits need 30 s of pacing; the default
        30 s deadline alone ended RESIDUAL, the grown one leaves the work its own 30 s."""
        floor = schedule(1000, BINANCE)[-1]
        self.assertGreaterEqual(eew.close_deadline_s(30, 1000, BINANCE) - floor, 30)

    def test_warm_connections_cover_the_reads_and_the_first_order_window(self):
        rows = [((("usdm",), ("regular", "conditional"), 5, BINANCE, 64), 60),
                ((("usdm",), ("regular", "conditional"), 5, BINANCE, 16), 16),
                ((("a", "b", "c"), ("regular", "conditional"), 10, ((10, 1.0),), 64), 9),
                ((("SWAP", "FUTURES"), ("regular", "x", "y", "z"), 20, ((60, 2.0),), 64), 10)]
        for args, warm in rows:
            with self.subTest(args=args):
                self.assertEqual(eew.warm_connections(*args), warm)

    def test_a_batch_takes_one_pacing_slot_per_order(self):
        pacer = eew.Pacer(((5, 60.0),))
        self.assertTrue(pacer.acquire(float("inf"), 4))
        self.assertFalse(pacer.acquire(0.0, 2), "6 orders in the window: refused before the deadline")
        self.assertTrue(pacer.acquire(float("inf"), 1))
        self.assertEqual(5, len(pacer.sent))


class HTTPS(unittest.TestCase):
    """Real ccxt over HTTPS to the paper exchange with a certificate made for this test."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="eexit-tls-")
        cls.cert, cls.key = make_test_cert(cls.dir)
        cls.paper = PaperExchange(seed="BTCUSDT:0.01,ETHUSDT:-0.5", tls=(cls.cert, cls.key), idle_timeout_s=0.5)
        cls.paper.start()

    @classmethod
    def tearDownClass(cls):
        cls.paper.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_the_ca_file_is_trusted_end_to_end(self):
        self.assertTrue(self.paper.base_url.startswith("https://"))
        ex, cfg = client(self.paper, EEXIT_EXCHANGE_CA_FILE=self.cert)
        self.assertEqual(self.cert, cfg.ca_file)
        self.assertEqual({"BTC/USDT:USDT", "ETH/USDT:USDT"}, {p.symbol for p in exchange.read_positions(ex)})

    def test_without_the_ca_file_the_certificate_is_refused(self):
        with self.assertRaises(ccxt.NetworkError) as caught:
            client(self.paper)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", repr(caught.exception.__context__ or caught.exception))

    def test_an_unreadable_ca_file_is_refused_at_start(self):
        for bad in (self.dir + "/missing.pem", self.key):
            with self.subTest(bad=bad), self.assertRaises(ConfigError) as caught:
                exchange.ExchangeConfig.from_env({"EEXIT_EXCHANGE_CA_FILE": bad})
            self.assertIn("EEXIT_EXCHANGE_CA_FILE", str(caught.exception))

    def test_one_tls_context_serves_every_client(self):
        first, _ = client(self.paper, EEXIT_EXCHANGE_CA_FILE=self.cert)
        second, _ = client(self.paper, EEXIT_EXCHANGE_CA_FILE=self.cert)
        contexts = {id(ex.session.context) for ex in (first, second)}
        self.assertEqual({id(exchange.tls_context(self.cert))}, contexts)

    def test_a_connection_the_server_dropped_while_idle_is_replaced(self):
        ex, _ = client(self.paper, EEXIT_EXCHANGE_CA_FILE=self.cert)
        exchange.ping(ex)
        wait_for(lambda: not self.paper._server.connections, 10, message="idle connection dropped")
        exchange.ping(ex)
        self.assertEqual(2, len(exchange.read_positions(ex)))


class HTTPSPanic(EEWCase):
    """The whole EEW over HTTPS trusting EEXIT_EXCHANGE_CA_FILE: a panic ends FLAT."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="eexit-tls-")
        cert, key = make_test_cert(cls.dir)
        cls.paper_kwargs = {"tls": (cert, key), "idle_timeout_s": 2}
        cls.eew_env = {"EEXIT_EXCHANGE_CA_FILE": cert, "EEXIT_EXCHANGE_KEEPALIVE_S": "2"}
        super().setUpClass()
        cls.start_eew("eew-tls")

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_a_panic_over_https_ends_flat(self):
        self.paper.set_state({"seed": ",".join(f"{m}:{q}" for m, q in (
            ("BTCUSDT", "0.01"), ("ETHUSDT", "-0.5"), ("SOLUSDT", "10"), ("XRPUSDT", "-1000"),
            ("ADAUSDT", "100"), ("DOGEUSDT", "-500"), ("LINKUSDT", "5")))})
        event_id = str(uuid.uuid4())
        self.publish(event_id)
        [report] = self.wait_reports(event_id)
        self.assertEqual(("FLAT", 7, 7), (report.status, report.positions_total, report.positions_closed), report)
        self.assert_flat_on_exchange()
        batches = self.paper.requests(path="/fapi/v1/batchOrders", batches=True)
        self.assertEqual(2, len(batches), "7 closes: a batch of 5 and one of 2")


    def test_at_start_the_connections_of_one_close_round_are_opened(self):
        """Every keep-alive round pings as many connections as one close round uses (here
        capped by the suite's EEXIT_CLOSE_CONCURRENCY=8); setUp cleared the log, so this waits
        for the next round (EEXIT_EXCHANGE_KEEPALIVE_S=2 in this class)."""
        concurrency = int(self.env_for("x")["EEXIT_CLOSE_CONCURRENCY"])
        warm = eew.warm_connections(("usdm",), ("regular", "conditional"), 5, BINANCE, concurrency)
        self.assertEqual(8, warm)
        wait_for(lambda: len(self.paper.requests(path="/fapi/v1/time")) >= warm, 30,
                 message=f"{warm} keep-alive pings")

    def test_only_the_books_that_had_orders_are_cancelled(self):
        self.paper.set_state({"seed": "BTCUSDT:0.01,ETHUSDT:-0.5"})
        self.paper.add_order("BTCUSDT", "BUY", "0.01", price="60000")
        self.paper.add_order("ETHUSDT", "BUY", "0.5", trigger="3500", reduce_only=True)
        self.paper.clear_requests()
        event_id = str(uuid.uuid4())
        self.publish(event_id)
        [report] = self.wait_reports(event_id)
        self.assertEqual(("FLAT", 2), (report.status, report.orders_cancelled), report)
        self.assert_flat_on_exchange()
        cancels = sorted((r["path"], r["params"].get("symbol")) for r in self.paper.requests(method="DELETE"))
        self.assertEqual([("/fapi/v1/algoOpenOrders", "ETHUSDT"), ("/fapi/v1/allOpenOrders", "BTCUSDT")], cancels)


class Pool(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.paper = PaperExchange()
        cls.paper.start()

    @classmethod
    def tearDownClass(cls):
        cls.paper.stop()

    def test_the_most_recently_used_client_comes_first_and_clients_are_built_on_demand(self):
        _, cfg = client(self.paper)
        pool = eew.ExchangePool(cfg, 4)
        pool.load_markets()
        self.assertEqual(1, len(pool.idle))     # idle: every client built, while none works
        used = [pool.submit(lambda c: id(c)).result() for _ in range(5)]
        self.assertEqual(1, len(set(used)), "sequential work reuses one warm client")
        barrier = threading.Barrier(3, timeout=10)

        def hold(c):
            barrier.wait()
            return id(c)
        wide = {f.result() for f in [pool.submit(hold) for _ in range(3)]}
        self.assertEqual((3, 3), (len(wide), len(pool.idle)), "three at once: three clients, two new")
        self.assertIn(used[0], wide)
        last = pool.idle[-1]
        self.assertEqual(id(last), pool.submit(lambda c: id(c)).result(), "LIFO: the last returned first")
        shared = {id(c.markets) for c in pool.idle}
        self.assertEqual(1, len(shared), "markets shared by reference, not copied per client")
        pool.executor.shutdown()

    def test_keep_warm_pings_that_many_distinct_connections(self):
        _, cfg = client(self.paper)
        pool = eew.ExchangePool(cfg, 8)
        pool.load_markets()
        self.paper.clear_requests()
        pacer = eew.Pacer(((300, 10.0),))
        self.assertEqual([], pool.maintain(0.0, 3, 20.0, pacer))
        wait_for(lambda: all(f.done() for f in pool.warming), 10, message="pings done")
        self.assertEqual([], pool.maintain(1.0, 3, 20.0, pacer), "no failure, not due again yet")
        self.assertEqual(3, len(pool.idle))     # the pings are done: every client is idle
        self.assertEqual(3, len(self.paper.requests(path="/fapi/v1/time")))
        pool.executor.shutdown()

    def test_keep_warm_sends_nothing_inside_a_429_ban_window(self):
        # Issue 24, finding 5: Binance answers requests inside a ban with a longer (418) IP ban.
        _, cfg = client(self.paper)
        pool, pacer = eew.ExchangePool(cfg, 8), eew.Pacer(((300, 10.0),))
        pool.load_markets()
        self.paper.add_fault(kind="error", status=429, code=-1003, retry_after=2, path="/fapi/v1/time", count=2)
        self.paper.clear_requests()
        pool.maintain(0.0, 2, 0.01, pacer)
        wait_for(lambda: all(f.done() for f in pool.warming), 10, message="pings done")
        failures = pool.maintain(1.0, 2, 0.01, pacer)
        self.assertEqual(2, len(failures), failures)
        self.assertGreater(pacer.paused_for(), 1.0, "the 429's Retry-After pauses the pacer")
        self.assertEqual([], pool.maintain(2.0, 2, 0.01, pacer))
        self.assertEqual([], pool.warming, "no ping inside the ban window")
        self.assertEqual(2, len(self.paper.requests(path="/fapi/v1/time")))
        wait_for(lambda: pacer.paused_for() <= 0, 10, message="the ban window ends")
        pool.maintain(10.0, 2, 0.01, pacer)
        self.assertEqual(2, len(pool.warming), "pings again once the window is over")
        wait_for(lambda: all(f.done() for f in pool.warming), 10, message="pings done")
        pool.executor.shutdown()


def _batch_case(venue):
    class Batches(unittest.TestCase):
        """One batch of three closes: accepted, rejected (reduce-only), rate limited: each
        result maps back to its own order, classified like a single order's."""

        def test_per_order_results_of_one_batch(self):
            paper = PaperExchange(venue=venue, seed="BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:10")
            paper.start()
            try:
                ex, _ = client(paper, venue)
                plan = flatten.plan_close(exchange.read_positions(ex), exchange.load_market_rules(ex), 1, "ev")
                self.assertEqual(3, len(plan))
                paper.add_fault(kind="reject", symbol="ETHUSDT", count=1, msg="ReduceOnly Order is rejected.",
                                code={"binanceusdm": -2022, "bybit": 110017, "okx": 51169}[venue])
                paper.add_fault(dict(DIALECTS[venue]["rate_fault"], symbol="SOLUSDT", count=1))
                results = dict(zip((o.symbol for o in plan), exchange.place_close_orders(ex, plan)))
                self.assertIsInstance(results["BTC/USDT:USDT"], str)
                self.assertEqual("reduce_only_rejected", exchange.classify_error(results["ETH/USDT:USDT"], ex).kind)
                self.assertEqual("rate_limited", exchange.classify_error(results["SOL/USDT:USDT"], ex).kind)
                self.assertEqual({("ETHUSDT", "BOTH"): -0.5, ("SOLUSDT", "BOTH"): 10.0}, paper.positions())
                self.assertEqual(1, len(paper.requests(method="POST", batches=True)) - len(paper.requests(method="POST")),
                                 "one request carried the three orders")
                self.assertEqual([200, DIALECTS[venue]["limited"]],
                                 [r["status"] for r in paper.requests(method="POST")
                                  if r["params"].get(DIALECTS[venue]["client_id"]) in
                                  (plan[0].client_order_id, plan[2].client_order_id)])
            finally:
                paper.stop()
    Batches.__name__ = Batches.__qualname__ = f"Batches_{venue}"
    return Batches


BatchesBinance = _batch_case("binanceusdm")
BatchesBybit = _batch_case("bybit")
BatchesOKX = _batch_case("okx")


if __name__ == "__main__":
    unittest.main()

"""Paper exchange: a local Binance USDⓈ-M futures REST dialect that real ccxt `binanceusdm`
talks to, with an account model and fault injection; the same account also speaks Bybit v5
(eexit/paper/bybit.py) and OKX v5 (eexit/paper/okx.py) through serve_dialect (--venue /
venue=). Every test, the demo and the drills use it; nothing here is used against a real
exchange.

    python -m eexit.paper --port 0 [--venue binanceusdm|bybit|okx] [--api-password P]
                          [--seed BTCUSDT:0.01,ETHUSDT:-0.5] [--hedge]
                          [--latency-ms N] [--jitter-ms N] [--api-key K --api-secret S]
                          [--synthetic N] [--seed-all QTY] [--fault JSON]...

                          [--cert PEM --key PEM] [--idle-timeout-s S]

prints its base URL as the first stdout line and serves until SIGTERM. --cert/--key serve
HTTPS (make_test_cert() writes a self-signed pair for 127.0.0.1; clients trust it through
EEXIT_EXCHANGE_CA_FILE); --idle-timeout-s closes a kept-alive connection idle that long, as
real venues do. In-process:

    paper = PaperExchange(seed="BTCUSDT:0.01", hedge=False)
    base_url = paper.start()      # point ccxt at it with EEXIT_EXCHANGE_URL=base_url
    paper.add_fault(kind="error", status=503, path="positionRisk", duration_s=3)
    paper.stop()

Admin (unsigned, not logged, never faulted): GET/POST /_paper/state, POST/DELETE
/_paper/faults, GET/DELETE /_paper/requests, POST /_paper/reset.

Risk model (what the risk kernel reads, the same Account in every dialect; Account.risk_view):
equity = wallet + unrealised PnL at the marks; maintenance margin = sum of |amount| x mark x
the market's rate (MM_RATE 0.5 % unless set); liquidation price per position computed for
cross margin on one collateral (risk_view's docstring), "0"/"" when none, or set raw; the account
mode (Binance multiAssetsMargin, Bybit marginMode, OKX acctLv; set_account_mode); the ledger of
deposits, withdrawals and booked PnL with ids and timestamps (Binance /fapi/v1/income, Bybit
/v5/account/transaction-log, OKX /api/v5/account/bills[-archive]). Python: set_mark, deposit,
withdraw, book_pnl, set_account_mode, set_liquidation, set_risk_field, set_mm_rate,
account_unreadable. HTTP: POST /_paper/state with "marks", "transfers", "account_mode",
"liquidation", "risk_fields", "position_fields", "mm_rates" (Account.apply_state) and
"account_unreadable" (a fault on the dialect's account path; DELETE /_paper/faults ends it).

Fault kinds (each optionally scoped by "path" (substring), "method", "symbol", "count"
(number of matching requests) and "duration_s"; a batch order request is faulted as its
orders, and as a whole only by a fault with "batch": true, e.g. {"kind": "error",
"status": 404, "batch": true, "path": "/v5/order/create-batch"}):
  latency      ms, jitter_ms           sleep before answering
  error        status, code, msg, retry_after   e.g. 503, or 429/-1003, 418 with Retry-After
  hang         seconds (default 30)    no answer; the client times out
  reset        -                       TCP reset instead of an answer
  reject       code, msg, status       order placement for symbol rejected
  partial_fill ratio                   market orders fill only ratio of the quantity (EXPIRED)
  weight_limit limit                   per-minute request weight; over it: 429 -1003
  order_limit  limit                   orders per 10 s; over it: 429 -1015
  drop_field   field, row              the answer's rows lose `field` (only the rows of market
                                       `row`, e.g. "ETHUSDT", when given): a position row
                                       without its size, in any dialect

Symbols with a small MARKET_LOT_SIZE maxQty (so closes must be split): ORDIUSDT (100),
TIAUSDT (500), BTCUSDT (120, realistic).
"""

import argparse
import hashlib
import hmac
import itertools
import json
import math
import random
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

DEFAULT_API_KEY = "paper-key"
DEFAULT_API_SECRET = "paper-secret"
DEFAULT_API_PASSWORD = "paper-pass"
DIALECTS = ("binanceusdm", "bybit", "okx")


def _dialect(venue):
    """The module that speaks venue's wire format over the shared Account (None: Binance)."""
    if venue == "binanceusdm":
        return None
    from importlib import import_module   # noqa: PLC0415 - dialect modules import this one
    return import_module(f"eexit.paper.{venue}")
DEFAULT_BALANCE = "1000000"
MAX_BODY_BYTES = 64 * 1024
MAX_DRAIN_BYTES = 16 * 1024 * 1024
MAX_PARAMS = 64
REQUEST_LOG_SIZE = 20000
DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60000

# id, mark, tickSize, stepSize, minQty, LOT maxQty, MARKET_LOT_SIZE maxQty, min notional
_MARKETS = [
    ("BTCUSDT", "65000", "0.10", "0.001", "0.001", "1000", "120", "100"),
    ("ETHUSDT", "3200", "0.01", "0.001", "0.001", "10000", "2000", "20"),
    ("BNBUSDT", "580", "0.010", "0.01", "0.01", "100000", "2000", "5"),
    ("SOLUSDT", "150", "0.0100", "1", "1", "1000000", "5000", "5"),
    ("XRPUSDT", "0.5200", "0.0001", "0.1", "0.1", "10000000", "2000000", "5"),
    ("DOGEUSDT", "0.120000", "0.000010", "1", "1", "50000000", "30000000", "5"),
    ("ADAUSDT", "0.45000", "0.00010", "1", "1", "10000000", "5000000", "5"),
    ("AVAXUSDT", "30.000", "0.0010", "1", "1", "1000000", "50000", "5"),
    ("LINKUSDT", "14.000", "0.001", "0.01", "0.01", "1000000", "100000", "5"),
    ("DOTUSDT", "6.000", "0.001", "0.1", "0.1", "1000000", "100000", "5"),
    ("LTCUSDT", "80.00", "0.01", "0.001", "0.001", "100000", "10000", "20"),
    ("TRXUSDT", "0.12000", "0.00001", "1", "1", "10000000", "5000000", "5"),
    ("BCHUSDT", "400.00", "0.01", "0.001", "0.001", "10000", "850", "20"),
    ("ETCUSDT", "25.000", "0.001", "0.01", "0.01", "1000000", "10000", "20"),
    ("XLMUSDT", "0.10000", "0.00001", "1", "1", "10000000", "1000000", "5"),
    ("ATOMUSDT", "8.000", "0.001", "0.01", "0.01", "1000000", "30000", "5"),
    ("NEARUSDT", "5.0000", "0.0010", "1", "1", "1000000", "100000", "5"),
    ("FILUSDT", "5.000", "0.001", "0.1", "0.1", "1000000", "100000", "5"),
    ("APTUSDT", "8.0000", "0.0001", "0.1", "0.1", "1000000", "100000", "5"),
    ("ARBUSDT", "1.0000", "0.0001", "0.1", "0.1", "10000000", "1000000", "5"),
    ("OPUSDT", "2.0000", "0.0001", "0.1", "0.1", "1000000", "500000", "5"),
    ("SUIUSDT", "1.0000", "0.0001", "0.1", "0.1", "10000000", "1000000", "5"),
    ("INJUSDT", "25.000", "0.001", "0.1", "0.1", "100000", "20000", "5"),
    ("UNIUSDT", "8.0000", "0.0010", "1", "1", "1000000", "50000", "5"),
    ("AAVEUSDT", "100.00", "0.010", "0.1", "0.1", "100000", "5000", "5"),
    ("1000PEPEUSDT", "0.0100000", "0.0000001", "1", "1", "800000000", "80000000", "5"),
    ("WIFUSDT", "2.0000", "0.0001", "0.1", "0.1", "1000000", "200000", "5"),
    ("SEIUSDT", "0.40000", "0.00010", "1", "1", "10000000", "1000000", "5"),
    ("TIAUSDT", "6.0000", "0.0010", "1", "1", "1000000", "500", "5"),
    ("ORDIUSDT", "35.000", "0.001", "0.1", "0.1", "100000", "100", "5"),
    ("MKRUSDT", "2000.0", "0.10", "0.001", "0.001", "10000", "100", "5"),
    ("COMPUSDT", "50.00", "0.01", "0.001", "0.001", "100000", "10000", "5"),
]

MM_RATE = Decimal("0.005")     # the paper's maintenance margin rate unless mm_rates says otherwise
LEDGER_KINDS = ("deposit", "withdraw", "pnl")
BINANCE_MODES = {"single_asset": False, "multi_assets": True}   # -> multiAssetsMargin
CONDITIONAL_TYPES = {"STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}
ORDER_TYPES = ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET",
               "TRAILING_STOP_MARKET"]
ZERO = Decimal(0)


class BinanceError(Exception):
    """An answer in Binance's error shape: HTTP status, code, msg."""

    def __init__(self, status, code, msg, headers=None):
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg
        self.headers = headers or {}


def _bad_param(name):
    return BinanceError(400, -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def _fmt(value):
    if isinstance(value, Decimal):
        return format(value.normalize() if value == value.to_integral() else value, "f")
    return f"{value:.8f}"


def _text_or(value, default):
    """value unless None (an override of "" or "0" passes as is)."""
    return default if value is None else value


def _now_ms():
    return int(time.time() * 1000)


def parse_seed(spec):
    """"BTCUSDT:0.01,ETHUSDT:-0.5" or {"BTCUSDT": 0.01} -> {"BTCUSDT": Decimal("0.01")}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            symbol, sep, qty = part.partition(":")
            if not sep:
                raise ValueError(f"seed entry {part!r} is not SYMBOL:QTY")
            items.append((symbol, qty))
    result = {}
    for symbol, qty in items:
        try:
            amount = Decimal(str(qty).strip())
        except InvalidOperation:
            raise ValueError(f"seed quantity {qty!r} for {symbol} is not a number") from None
        if not amount.is_finite():
            raise ValueError(f"seed quantity {qty!r} for {symbol} is not finite")
        result[str(symbol).strip().upper()] = amount
    return result


class Market:
    __slots__ = ("id", "base", "quote", "category", "tick", "step", "min_qty", "max_qty", "market_max",
                 "min_notional", "price_precision", "qty_precision", "info")

    def __init__(self, market_id, tick, step, min_qty, max_qty, market_max, min_notional,
                 base=None, quote="USDT", category="linear"):
        self.id = market_id
        self.base = base or market_id[:-len(quote)]
        self.quote = quote          # = the settle coin for linear; inverse settles in base
        self.category = category    # "linear" | "inverse" (dialects other than Binance)
        self.tick = Decimal(tick)
        self.step = Decimal(step)
        self.min_qty = Decimal(min_qty)
        self.max_qty = Decimal(max_qty)
        self.market_max = Decimal(market_max)
        self.min_notional = Decimal(min_notional)
        self.price_precision = max(0, -self.tick.normalize().as_tuple().exponent)
        self.qty_precision = max(0, -self.step.normalize().as_tuple().exponent)
        self.info = {
            "symbol": market_id, "pair": market_id, "contractType": "PERPETUAL",
            "deliveryDate": 4133404800000, "onboardDate": 1569398400000, "status": "TRADING",
            "maintMarginPercent": "2.5000", "requiredMarginPercent": "5.0000",
            "baseAsset": self.base, "quoteAsset": "USDT", "marginAsset": "USDT",
            "pricePrecision": self.price_precision, "quantityPrecision": self.qty_precision,
            "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": "COIN",
            "underlyingSubType": [], "triggerProtect": "0.0500", "liquidationFee": "0.012500",
            "marketTakeBound": "0.05", "maxMoveOrderLimit": 10000,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "10000000", "tickSize": tick},
                {"filterType": "LOT_SIZE", "maxQty": max_qty, "minQty": min_qty, "stepSize": step},
                {"filterType": "MARKET_LOT_SIZE", "maxQty": market_max, "minQty": min_qty, "stepSize": step},
                {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
                {"filterType": "MIN_NOTIONAL", "notional": min_notional},
                {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500",
                 "multiplierDecimal": "4"},
            ],
            "orderTypes": ORDER_TYPES,
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
        }


# Extra segments of dialects that have them: id, mark, tick, step, min, max, market max,
# min notional, base, quote, category. Inverse quantities are USD contracts.
EXTRA_MARKETS = {
    "bybit": [
        ("BTCPERP", "65000", "0.5", "0.001", "0.001", "500", "50", "5", "BTC", "USDC", "linear"),
        ("ETHPERP", "3200", "0.05", "0.01", "0.01", "5000", "500", "5", "ETH", "USDC", "linear"),
        ("BTCUSD", "65000", "0.5", "1", "1", "1000000", "100000", "0", "BTC", "USD", "inverse"),
        ("ETHUSD", "3200", "0.05", "1", "1", "1000000", "100000", "0", "ETH", "USD", "inverse"),
    ],
}


def default_markets(synthetic=0, venue="binanceusdm"):
    """The realistic table plus `synthetic` generated symbols P0001USDT... (mark 10, step 0.1)
    for benchmarks that need hundreds of distinct positions, plus the venue's extra segments."""
    markets = {}
    marks = {}
    for market_id, mark, *rest in EXTRA_MARKETS.get(venue, []):
        markets[market_id] = Market(market_id, *rest)
        marks[market_id] = Decimal(mark)
    for market_id, mark, tick, step, min_qty, max_qty, market_max, notional in _MARKETS:
        markets[market_id] = Market(market_id, tick, step, min_qty, max_qty, market_max, notional)
        marks[market_id] = Decimal(mark)
    for n in range(1, synthetic + 1):
        market_id = f"P{n:04d}USDT"
        markets[market_id] = Market(market_id, "0.001", "0.1", "0.1", "1000000", "100000", "5")
        marks[market_id] = Decimal("10.000")
    return markets, marks


# ------------------------------------------------------------------------------- faults

class Faults:
    """Active faults; matching and expiry are O(number of faults), normally 0-3."""

    KINDS = {"latency", "error", "hang", "reset", "reject", "partial_fill", "weight_limit", "order_limit",
             "drop_field"}

    def __init__(self):
        self._lock = threading.Lock()
        self._faults = []
        self._ids = itertools.count(1)

    def add(self, fault):
        fault = dict(fault)
        kind = fault.get("kind")
        if kind not in self.KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(self.KINDS)}")
        for key in ("ms", "jitter_ms", "status", "code", "retry_after", "seconds", "ratio", "limit",
                    "count", "duration_s"):
            if key in fault and fault[key] is not None:
                value = float(fault[key])
                if not math.isfinite(value) or value < (-100000 if key == "code" else 0):
                    raise ValueError(f"fault {key}={fault[key]!r} is invalid")
        if kind == "drop_field" and not fault.get("field"):
            raise ValueError("a drop_field fault needs a field")
        if fault.get("duration_s") is not None:
            fault["expires_at"] = time.monotonic() + float(fault["duration_s"])
        if fault.get("symbol"):
            fault["symbol"] = str(fault["symbol"]).upper()
        with self._lock:
            fault["id"] = next(self._ids)
            self._faults.append(fault)
        return fault["id"]

    def clear(self):
        with self._lock:
            self._faults = []

    def list(self):
        with self._lock:
            return [dict(f) for f in self._faults]

    def take(self, kinds, path, method, symbol=None, scoped_only=False, batch=None):
        """Matching faults of the given kinds, consuming one unit of each one's count. path
        None: only faults without a "path" match (a batch request as a whole: one latency,
        one 503); scoped_only: only faults with one (the orders of a batch, see batch_item).
        batch: the path of a batch request as a whole, which a fault marked "batch": true
        (and only such a fault, besides the path-less ones) matches by its "path"."""
        if not self._faults:
            return []
        now = time.monotonic()
        matched = []
        with self._lock:
            keep = []
            for fault in self._faults:
                if fault.get("expires_at") is not None and now >= fault["expires_at"]:
                    continue
                keep.append(fault)
                if fault["kind"] not in kinds:
                    continue
                if fault.get("batch"):
                    if batch is None or fault.get("path") and fault["path"] not in batch:
                        continue
                elif fault.get("path") and (path is None or fault["path"] not in path) or \
                        scoped_only and not fault.get("path"):
                    continue
                if fault.get("method") and fault["method"].upper() != method:
                    continue
                if fault.get("symbol") and fault["symbol"] != symbol:
                    continue
                matched.append(fault)
                if fault.get("count") is not None:
                    fault["count"] = int(fault["count"]) - 1
                    if fault["count"] <= 0:
                        keep.pop()
            self._faults = keep
        return matched


# ------------------------------------------------------------------------------- account

class Account:
    """Positions, orders, marks, balance. All methods take the lock; none does I/O."""

    def __init__(self, markets, marks, hedge=False, balance=DEFAULT_BALANCE):
        self.lock = threading.RLock()
        self.markets = markets
        self.marks = dict(marks)
        self.hedge = hedge
        self.balance = Decimal(balance)
        self.positions = {}          # (market_id, positionSide) -> [amount Decimal signed, entry Decimal, updateTime]
        self.orders = {}             # orderId -> order dict (all normal orders ever, bounded)
        self.open_orders = {}        # orderId -> order dict
        self.algo_orders = {}        # algoId -> algo order dict
        self.open_algo = {}          # algoId -> algo order dict
        self.client_ids = {}         # clientOrderId -> orderId
        self.countdowns = {}         # market_id -> (deadline monotonic, countdown ms)
        self.margin_modes = {}       # (market_id, positionSide) -> "isolated" (dialects with tdMode)
        # The risk model (the risk kernel's reads; see risk_view): maintenance margin rate per
        # market, raw liquidation-price answers and account-level wire fields set by tests
        # ("0", "", "NaN"...), the account mode (None: the dialect's default) and the ledger.
        self.mm_rates = {}           # market_id -> Decimal rate (MM_RATE when absent)
        self.liquidation_overrides = {}   # market_id -> raw text every dialect answers as is
        self.risk_fields = {}        # wire field -> raw value, over the account-level answer
        self.position_fields = {}    # market_id -> {wire field: raw}, over its position rows
        self.account_mode = None
        self.ledger = []             # {"id", "ts", "amount" Decimal signed, "kind", "asset"}
        self._ledger_ids = itertools.count(5000001)
        self._order_ids = itertools.count(8000000)
        self._algo_ids = itertools.count(3000000)

    # -- seeding and marks

    def seed(self, seed):
        with self.lock:
            for market_id, amount in parse_seed(seed).items():
                self.set_position(market_id, amount)

    def set_position(self, market_id, amount, position_side=None, entry_price=None):
        market_id = market_id.upper()
        if market_id not in self.markets:
            raise ValueError(f"unknown symbol {market_id}")
        amount = Decimal(str(amount))
        with self.lock:
            if position_side is None:
                position_side = ("LONG" if amount > 0 else "SHORT") if self.hedge else "BOTH"
            position_side = position_side.upper()
            if position_side == "SHORT" and amount > 0:
                amount = -amount
            entry = Decimal(str(entry_price)) if entry_price is not None else self.marks[market_id]
            key = (market_id, position_side)
            if amount == 0:
                self.positions.pop(key, None)
            else:
                self.positions[key] = [amount, entry, _now_ms()]

    def set_mark(self, market_id, price):
        market_id = market_id.upper()
        if market_id not in self.markets:
            raise ValueError(f"unknown symbol {market_id}")
        price = Decimal(str(price))
        if not price.is_finite() or price <= 0:
            raise ValueError(f"mark price {price} must be positive")
        with self.lock:
            self.marks[market_id] = price
            self._trigger_orders(market_id)

    def position_amount(self, market_id, position_side="BOTH"):
        with self.lock:
            entry = self.positions.get((market_id.upper(), position_side.upper()))
            return entry[0] if entry else ZERO

    # -- fills

    def _fill(self, market_id, side, position_side, qty, price):
        """Apply a fill to the position; realised PnL goes to the wallet."""
        signed = qty if side == "BUY" else -qty
        key = (market_id, position_side)
        amount, entry, _ = self.positions.get(key, [ZERO, ZERO, 0])
        new_amount = amount + signed
        if amount == 0 or (amount > 0) == (signed > 0):
            total = abs(amount) + qty
            entry = (entry * abs(amount) + price * qty) / total
        else:
            closed = min(abs(amount), qty)
            direction = 1 if amount > 0 else -1
            self.balance += (price - entry) * closed * direction
            if abs(signed) > abs(amount):
                entry = price           # flipped: the remainder opened at the fill price
        if new_amount == 0:
            self.positions.pop(key, None)
        else:
            self.positions[key] = [new_amount, entry, _now_ms()]

    def _reduce_only_ok(self, market_id, side, position_side, qty):
        """Would this order only reduce (never increase or flip) the position?"""
        amount = self.positions.get((market_id, position_side), [ZERO])[0]
        if side == "BUY":
            return amount < 0 and qty <= -amount
        return amount > 0 and qty <= amount

    # -- order validation shared by /order, /batchOrders and /algoOrder

    def validate(self, p, algo):
        market = self.market(p.get("symbol"))
        side = p.get("side", "").upper()
        if side not in ("BUY", "SELL"):
            raise _bad_param("side")
        order_type = p.get("type", "").upper()
        if not order_type:
            raise _bad_param("type")
        if order_type not in ORDER_TYPES:
            raise BinanceError(400, -1116, "Invalid orderType.")
        if not algo and order_type in CONDITIONAL_TYPES:
            raise BinanceError(400, -4120, "Order type not supported for this endpoint. Please use the Algo Order API endpoints instead.")
        if algo and order_type not in CONDITIONAL_TYPES:
            raise BinanceError(400, -1116, "Invalid orderType.")
        reduce_only = _bool_param(p, "reduceOnly")
        if reduce_only and self.hedge:
            raise BinanceError(400, -1106, "Parameter 'reduceonly' sent when not required.")
        position_side = p.get("positionSide", "BOTH").upper()
        if position_side not in ("BOTH", "LONG", "SHORT"):
            raise BinanceError(400, -4061, "Order's position side does not match user's setting.")
        if self.hedge and position_side == "BOTH" or not self.hedge and position_side != "BOTH":
            raise BinanceError(400, -4061, "Order's position side does not match user's setting.")
        close_position = _bool_param(p, "closePosition")
        qty_name = "quantity"
        if close_position and algo:
            qty = None
        else:
            qty = _decimal_param(p, qty_name)
            if qty <= 0:
                raise BinanceError(400, -4003, "Quantity less than or equal to zero.")
            if qty % market.step != 0:
                raise BinanceError(400, -1111, "Precision is over the maximum defined for this asset.")
            if qty < market.min_qty:
                raise BinanceError(400, -4004, "Quantity less than min quantity.")
            limit = market.market_max if order_type.endswith("MARKET") else market.max_qty
            if qty > limit:
                raise BinanceError(400, -4005, "Quantity greater than max quantity.")
        price = None
        if order_type in ("LIMIT", "STOP", "TAKE_PROFIT"):
            price = _decimal_param(p, "price")
            _check_price(market, price)
        trigger = None
        if algo and order_type != "TRAILING_STOP_MARKET":
            trigger = _decimal_param(p, "triggerPrice" if "triggerPrice" in p else "stopPrice")
            _check_price(market, trigger)
        # Binance exempts reduce-only orders from MIN_NOTIONAL ("unless you choose reduce only").
        closing = reduce_only or (self.hedge and ((position_side == "LONG") == (side == "SELL")))
        if qty is not None and not closing:
            notional = qty * (price if price is not None else self.marks[market.id])
            if notional < market.min_notional:
                raise BinanceError(400, -4164, f"Order's notional must be no smaller than "
                                               f"{_fmt(market.min_notional)} (unless you choose reduce only).")
        return market, side, order_type, position_side, reduce_only, close_position, qty, price, trigger

    def market(self, market_id):
        if not market_id:
            raise _bad_param("symbol")
        market = self.markets.get(market_id.upper())
        if market is None:
            raise BinanceError(400, -1121, "Invalid symbol.")
        return market

    def _check_client_id(self, client_id):
        order_id = self.client_ids.get(client_id)
        if order_id is not None and (order_id in self.open_orders or order_id in self.open_algo):
            raise BinanceError(400, -4116, "ClientOrderId is duplicated.")

    # -- normal orders

    def place_order(self, p, fill_ratio=None):
        with self.lock:
            market, side, order_type, position_side, reduce_only, _, qty, price, _ = self.validate(p, algo=False)
            client_id = p.get("newClientOrderId") or f"paper{next(self._order_ids)}"
            if len(client_id) > 36:
                raise BinanceError(400, -4015, "Client order id is not valid.")
            self._check_client_id(client_id)
            if reduce_only and not self._reduce_only_ok(market.id, side, position_side, qty):
                raise BinanceError(400, -2022, "ReduceOnly Order is rejected.")
            hedge_closing = self.hedge and ((position_side == "LONG") == (side == "SELL"))
            if hedge_closing and not self._reduce_only_ok(market.id, side, position_side, qty):
                raise BinanceError(400, -2022, "ReduceOnly Order is rejected.")
            now = _now_ms()
            order_id = next(self._order_ids)
            order = {
                "orderId": order_id, "symbol": market.id, "status": "NEW", "clientOrderId": client_id,
                "price": _fmt(price) if price is not None else "0", "avgPrice": "0", "origQty": _fmt(qty),
                "executedQty": "0", "cumQty": "0", "cumQuote": "0", "timeInForce": p.get("timeInForce", "GTC"),
                "type": order_type, "reduceOnly": reduce_only, "closePosition": False, "side": side,
                "positionSide": position_side, "stopPrice": "0", "workingType": "CONTRACT_PRICE",
                "priceProtect": False, "origType": order_type, "priceMatch": "NONE",
                "selfTradePreventionMode": "NONE", "goodTillDate": 0, "time": now, "updateTime": now,
            }
            self._remember(order)
            mark = self.marks[market.id]
            if order_type == "MARKET":
                fill_qty = qty
                if fill_ratio is not None:
                    fill_qty = (qty * Decimal(str(fill_ratio)) / market.step).to_integral_value(rounding="ROUND_FLOOR") * market.step
                self._execute(order, market, fill_qty, mark)
                if fill_qty < qty:
                    order["status"] = "EXPIRED"
            elif self._marketable(side, price, mark):
                self._execute(order, market, qty, price)
            else:
                self.open_orders[order_id] = order
            if p.get("newOrderRespType", "ACK").upper() == "ACK":
                return dict(order, status="NEW", executedQty="0", cumQty="0", cumQuote="0", avgPrice="0.00")
            return dict(order)

    def _remember(self, order):
        self.orders[order["orderId"]] = order
        self.client_ids[order["clientOrderId"]] = order["orderId"]
        if len(self.orders) > 200000:   # bound memory in very long runs; oldest first
            oldest = next(iter(self.orders))
            if oldest not in self.open_orders:
                old = self.orders.pop(oldest)
                self.client_ids.pop(old["clientOrderId"], None)

    @staticmethod
    def _marketable(side, price, mark):
        return price >= mark if side == "BUY" else price <= mark

    def _execute(self, order, market, qty, price):
        if qty > 0:
            self._fill(market.id, order["side"], order["positionSide"], qty, price)
        order["executedQty"] = order["cumQty"] = _fmt(qty)
        order["cumQuote"] = _fmt((qty * price).quantize(Decimal("0.00001")))
        order["avgPrice"] = _fmt(price) if qty > 0 else "0"
        order["status"] = "FILLED" if qty == Decimal(order["origQty"]) else "PARTIALLY_FILLED"
        order["updateTime"] = _now_ms()
        self.open_orders.pop(order["orderId"], None)

    def find_order(self, p):
        with self.lock:
            market = self.market(p.get("symbol"))
            order = None
            if p.get("orderId"):
                try:
                    order = self.orders.get(int(p["orderId"]))
                except ValueError:
                    raise _bad_param("orderId") from None
            elif p.get("origClientOrderId"):
                order_id = self.client_ids.get(p["origClientOrderId"])
                order = self.orders.get(order_id) if order_id is not None else None
            else:
                raise BinanceError(400, -1102, "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!")
            if order is None or order["symbol"] != market.id:
                raise BinanceError(400, -2013, "Order does not exist.")
            return order

    def cancel_order(self, p):
        with self.lock:
            try:
                order = self.find_order(p)
            except BinanceError as exc:
                if exc.code == -2013:
                    raise BinanceError(400, -2011, "Unknown order sent.") from None
                raise
            if order["orderId"] not in self.open_orders:
                raise BinanceError(400, -2011, "Unknown order sent.")
            del self.open_orders[order["orderId"]]
            order["status"] = "CANCELED"
            order["updateTime"] = _now_ms()
            return dict(order)

    def cancel_all(self, market_id):
        with self.lock:
            for order_id in [i for i, o in self.open_orders.items() if o["symbol"] == market_id]:
                order = self.open_orders.pop(order_id)
                order["status"] = "CANCELED"

    def list_open(self, market_id=None):
        with self.lock:
            return [dict(o) for o in self.open_orders.values() if market_id is None or o["symbol"] == market_id]

    # -- algo (conditional) orders

    def place_algo(self, p):
        with self.lock:
            if p.get("algoType", "CONDITIONAL").upper() != "CONDITIONAL":
                raise BinanceError(400, -1116, "Invalid algoType.")
            market, side, order_type, position_side, reduce_only, close_position, qty, price, trigger = \
                self.validate(p, algo=True)
            algo_id = next(self._algo_ids)
            client_id = p.get("clientAlgoId") or f"paperalgo{algo_id}"
            self._check_client_id(client_id)
            now = _now_ms()
            order = {
                "algoId": algo_id, "clientAlgoId": client_id, "algoType": "CONDITIONAL",
                "orderType": order_type, "symbol": market.id, "side": side, "positionSide": position_side,
                "timeInForce": p.get("timeInForce", "GTC"), "quantity": _fmt(qty) if qty is not None else "0",
                "algoStatus": "NEW", "triggerPrice": _fmt(trigger) if trigger is not None else "0",
                "price": _fmt(price) if price is not None else "0", "icebergQuantity": None,
                "selfTradePreventionMode": "EXPIRE_MAKER", "workingType": p.get("workingType", "CONTRACT_PRICE"),
                "priceMatch": "NONE", "closePosition": close_position, "priceProtect": False,
                "reduceOnly": reduce_only, "activatePrice": "", "callbackRate": p.get("callbackRate", ""),
                "createTime": now, "updateTime": now, "triggerTime": 0, "goodTillDate": 0,
            }
            self.algo_orders[algo_id] = order
            self.client_ids[client_id] = algo_id
            self.open_algo[algo_id] = order
            return dict(order)

    def find_algo(self, p):
        with self.lock:
            order = None
            if p.get("algoId"):
                try:
                    order = self.algo_orders.get(int(p["algoId"]))
                except ValueError:
                    raise _bad_param("algoId") from None
            elif p.get("clientAlgoId"):
                order = self.algo_orders.get(self.client_ids.get(p["clientAlgoId"]))
            else:
                raise BinanceError(400, -1102, "Param 'clientAlgoId' or 'algoId' must be sent, but both were empty/null!")
            if order is None:
                raise BinanceError(400, -2013, "Order does not exist.")
            return order

    def cancel_algo(self, p):
        with self.lock:
            order = self.find_algo(p)
            if order["algoId"] not in self.open_algo:
                raise BinanceError(400, -2011, "Unknown order sent.")
            del self.open_algo[order["algoId"]]
            order["algoStatus"] = "CANCELED"
            return {"algoId": order["algoId"], "clientAlgoId": order["clientAlgoId"], "code": "200", "msg": "success"}

    def cancel_all_algo(self, market_id):
        with self.lock:
            for algo_id in [i for i, o in self.open_algo.items() if o["symbol"] == market_id]:
                self.open_algo.pop(algo_id)["algoStatus"] = "CANCELED"

    def list_open_algo(self, market_id=None):
        with self.lock:
            return [dict(o) for o in self.open_algo.values() if market_id is None or o["symbol"] == market_id]

    # -- triggers and the dead-man switch

    def _trigger_orders(self, market_id):
        """Resting limit orders fill and conditional orders fire when the mark crosses."""
        mark = self.marks[market_id]
        market = self.markets[market_id]
        for order in [o for o in self.open_orders.values() if o["symbol"] == market_id]:
            if self._marketable(order["side"], Decimal(order["price"]), mark):
                self._execute(order, market, Decimal(order["origQty"]), Decimal(order["price"]))
        for algo in [o for o in self.open_algo.values() if o["symbol"] == market_id]:
            trigger = Decimal(algo["triggerPrice"])
            stop = algo["orderType"] in ("STOP", "STOP_MARKET")
            rising = (algo["side"] == "BUY") == stop   # buy-stop and sell-take-profit fire upwards
            if not (mark >= trigger if rising else mark <= trigger):
                continue
            del self.open_algo[algo["algoId"]]
            algo["algoStatus"] = "TRIGGERED"
            algo["triggerTime"] = _now_ms()
            self._fire_algo(algo, market)

    def _fire_algo(self, algo, market):
        qty = Decimal(algo["quantity"])
        if algo["closePosition"]:
            qty = abs(self.positions.get((market.id, algo["positionSide"]), [ZERO])[0])
        params = {"symbol": market.id, "side": algo["side"], "positionSide": algo["positionSide"],
                  "quantity": _fmt(qty), "newOrderRespType": "RESULT"}
        if algo["reduceOnly"] or algo["closePosition"]:
            if not self.hedge:
                params["reduceOnly"] = "true"
        if algo["orderType"] in ("STOP", "TAKE_PROFIT"):
            params.update(type="LIMIT", price=algo["price"])
        else:
            params["type"] = "MARKET"
        try:
            order = self.place_order(params)
            algo["actualOrderId"] = str(order["orderId"])
            algo["algoStatus"] = "FINISHED"
        except BinanceError:
            # As on Binance, a triggered order that cannot execute (e.g. reduce-only with no
            # position left) expires instead of opening exposure.
            algo["algoStatus"] = "EXPIRED"

    def arm_countdown(self, market_id, countdown_ms):
        with self.lock:
            if countdown_ms == 0:
                self.countdowns.pop(market_id, None)
            else:
                self.countdowns[market_id] = (time.monotonic() + countdown_ms / 1000.0, countdown_ms)

    def expire_countdowns(self):
        if not self.countdowns:
            return
        now = time.monotonic()
        with self.lock:
            for market_id, (deadline, _) in list(self.countdowns.items()):
                if now >= deadline:
                    del self.countdowns[market_id]
                    self.cancel_all(market_id)
                    self.cancel_all_algo(market_id)

    # -- the risk model

    def transfer(self, amount, kind=None, ts_ms=None, asset="USDT"):
        """A ledger entry moving the wallet by amount: kind "deposit" (+), "withdraw" (-), or
        "pnl" (realised PnL/fees: moves the wallet but is no transfer). Returns its id."""
        amount = Decimal(str(amount))
        kind = kind or ("deposit" if amount > 0 else "withdraw")
        if not amount.is_finite() or kind not in LEDGER_KINDS or \
                kind == "deposit" and amount <= 0 or kind == "withdraw" and amount >= 0:
            raise ValueError(f"ledger entry {kind} {amount} is invalid (deposit > 0, withdraw < 0)")
        with self.lock:
            entry = {"id": next(self._ledger_ids), "ts": int(ts_ms) if ts_ms is not None else _now_ms(),
                     "amount": amount, "kind": kind, "asset": str(asset)}
            self.ledger.append(entry)
            self.balance += amount
            return entry["id"]

    def ledger_rows(self, start_ms=None, end_ms=None, kinds=None):
        with self.lock:
            return [dict(e) for e in self.ledger if (start_ms is None or e["ts"] >= start_ms)
                    and (end_ms is None or e["ts"] <= end_ms) and (kinds is None or e["kind"] in kinds)]

    def risk_view(self):
        """wallet, upl, equity (= wallet + upl at the marks), maintenance margin (sum of
        |amount| x mark x the market's rate) and per position its liquidation price: the mark
        at which equity would equal maintenance margin with every other mark held (cross
        margin, one collateral): p = (MM' - W' + entry x amt) / (amt - |amt| x rate), where
        W' = wallet + the others' upl and MM' = the others' MM; None when no positive price
        liquidates it (Binance answers "0", Bybit and OKX ""); liquidation_overrides replace
        the text in every dialect, as is. One linear
        formula for every market (Bybit's inverse contracts too: a paper simplification), and
        a hedge pair on one market is priced as if only its own side's mark moved."""
        with self.lock:
            rows = []
            for (market_id, position_side), (amount, entry, _) in self.positions.items():
                mark = self.marks[market_id]
                rate = self.mm_rates.get(market_id, MM_RATE)
                rows.append({"market_id": market_id, "position_side": position_side, "amount": amount,
                             "entry": entry, "mark": mark, "rate": rate, "upl": (mark - entry) * amount,
                             "mm": abs(amount) * mark * rate})
            upl = sum((r["upl"] for r in rows), ZERO)
            mm = sum((r["mm"] for r in rows), ZERO)
            for r in rows:
                others_wallet = self.balance + upl - r["upl"]
                divisor = r["amount"] - abs(r["amount"]) * r["rate"]
                price = (mm - r["mm"] - others_wallet + r["entry"] * r["amount"]) / divisor if divisor else ZERO
                r["liq"] = self.liquidation_overrides.get(r["market_id"], f"{price:.8f}" if price > 0 else None)
            return {"wallet": self.balance, "upl": upl, "equity": self.balance + upl, "mm": mm,
                    "positions": {(r["market_id"], r["position_side"]): r for r in rows}}

    def with_risk_fields(self, row, market_id=None):
        """row with the test-set raw fields laid over it (malformed-answer and flag tests):
        the account-level ones, or market_id's position ones."""
        with self.lock:
            return dict(row, **(self.risk_fields if market_id is None else self.position_fields.get(market_id, {})))

    # -- views

    def position_rows(self, version):
        with self.lock:
            rows = []
            risk = self.risk_view()["positions"]
            keys = list(self.positions)
            if version != 3:  # v1/v2 list every symbol and side, zero or not
                sides = ("LONG", "SHORT") if self.hedge else ("BOTH",)
                keys = [(m, s) for m in self.markets for s in (("BOTH",) + sides if self.hedge else sides)]
            for market_id, position_side in keys:
                amount, entry, updated = self.positions.get((market_id, position_side), [ZERO, ZERO, 0])
                mark = self.marks[market_id]
                notional = amount * mark
                pnl = (mark - entry) * amount + 0 if amount else ZERO
                row = {
                    "symbol": market_id, "positionSide": position_side, "positionAmt": _fmt(amount),
                    "entryPrice": _fmt(entry), "breakEvenPrice": _fmt(entry), "markPrice": _fmt(mark),
                    "unRealizedProfit": f"{pnl:.8f}", "isolatedMargin": "0",
                    "liquidationPrice": _text_or(risk[(market_id, position_side)]["liq"] if amount else None, "0"),
                    "notional": f"{notional:.8f}", "marginAsset": "USDT", "isolatedWallet": "0",
                    "updateTime": updated,
                }
                row = self.with_risk_fields(row, market_id) if amount else row
                if version == 3:
                    initial = abs(notional) / 20
                    maint = risk[(market_id, position_side)]["mm"] if amount else ZERO
                    row.update(initialMargin=f"{initial:.8f}", maintMargin=f"{maint:.8f}",
                               positionInitialMargin=f"{initial:.8f}", openOrderInitialMargin="0",
                               adl=0, bidNotional="0", askNotional="0")
                else:
                    row.update(marginType="cross", isAutoAddMargin="false", leverage="20",
                               maxNotionalValue="1000000")
                rows.append(row)
            return rows

    def account_view(self):
        with self.lock:
            risk = self.risk_view()
            pnl = risk["upl"]
            margin = sum((abs(a * self.marks[m]) / 20 for (m, _), (a, _, _) in self.positions.items()), ZERO)
            wallet = self.balance
            available = wallet + pnl - margin
            asset = {
                "asset": "USDT", "walletBalance": f"{wallet:.8f}", "unrealizedProfit": f"{pnl:.8f}",
                "marginBalance": f"{wallet + pnl:.8f}", "maintMargin": f"{risk['mm']:.8f}",
                "initialMargin": f"{margin:.8f}", "positionInitialMargin": f"{margin:.8f}",
                "openOrderInitialMargin": "0.00000000", "crossWalletBalance": f"{wallet:.8f}",
                "crossUnPnl": f"{pnl:.8f}", "availableBalance": f"{available:.8f}",
                "maxWithdrawAmount": f"{available:.8f}", "marginAvailable": True, "updateTime": _now_ms(),
            }
            positions = [{
                "symbol": m, "positionSide": s, "positionAmt": _fmt(a),
                "unrealizedProfit": f"{(self.marks[m] - e) * a:.8f}", "isolatedMargin": "0",
                "notional": f"{a * self.marks[m]:.8f}", "isolatedWallet": "0",
                "initialMargin": f"{abs(a * self.marks[m]) / 20:.8f}",
                "maintMargin": f"{risk['positions'][(m, s)]['mm']:.8f}", "updateTime": u,
            } for (m, s), (a, e, u) in self.positions.items()]
            return self.with_risk_fields({
                "totalInitialMargin": asset["initialMargin"], "totalMaintMargin": asset["maintMargin"],
                "totalWalletBalance": asset["walletBalance"], "totalUnrealizedProfit": asset["unrealizedProfit"],
                "totalMarginBalance": asset["marginBalance"], "totalPositionInitialMargin": asset["initialMargin"],
                "totalOpenOrderInitialMargin": "0.00000000", "totalCrossWalletBalance": asset["walletBalance"],
                "totalCrossUnPnl": asset["unrealizedProfit"], "availableBalance": asset["availableBalance"],
                "maxWithdrawAmount": asset["maxWithdrawAmount"], "assets": [asset], "positions": positions,
            })

    def state(self):
        """Plain-JSON snapshot for GET /_paper/state and tests."""
        with self.lock:
            risk = self.risk_view()
            return {
                "hedge": self.hedge,
                "balance": _fmt(self.balance),
                "positions": [{"symbol": m, "position_side": s, "amount": _fmt(a), "entry_price": _fmt(e)}
                              for (m, s), (a, e, _) in self.positions.items()],
                "open_orders": [dict(o) for o in self.open_orders.values()],
                "open_algo_orders": [dict(o) for o in self.open_algo.values()],
                "marks": {m: _fmt(p) for m, p in self.marks.items()},
                "countdowns": {m: ms for m, (_, ms) in self.countdowns.items()},
                "risk": {"wallet": _fmt(self.balance), "equity": _fmt(risk["equity"]), "mm": _fmt(risk["mm"]),
                         "account_mode": self.account_mode,
                         "liquidation": {m: r["liq"] for (m, _), r in risk["positions"].items()},
                         "ledger": [dict(e, amount=_fmt(e["amount"])) for e in self.ledger]},
            }

    def apply_state(self, body):
        """POST /_paper/state: {"hedge", "balance", "clear_positions", "marks": {id: price},
        "seed": "BTCUSDT:0.1" | {...}, "positions": [{"symbol","amount","position_side","entry_price"}]}"""
        if not isinstance(body, dict):
            raise ValueError("state body must be a JSON object")
        with self.lock:
            if "hedge" in body:
                self.hedge = bool(body["hedge"])
            if "balance" in body:
                self.balance = Decimal(str(body["balance"]))
            if body.get("clear_positions"):
                self.positions.clear()
            if body.get("clear_orders"):
                self.open_orders.clear()
                self.open_algo.clear()
            for market_id, price in (body.get("marks") or {}).items():
                self.set_mark(market_id, price)
            if body.get("seed"):
                self.seed(body["seed"])
            for row in body.get("positions") or []:
                self.set_position(row["symbol"], row["amount"], row.get("position_side"), row.get("entry_price"))
            # The risk model: {"mm_rates": {id: rate}, "liquidation": {id: "0" | "" | price |
            # null (computed)}, "risk_fields": {wire field: raw | null}, "position_fields": {id: {field: raw | null}}, "transfers": [{"amount",
            # "kind", "ts_ms", "asset"}]} ("account_mode": PaperExchange.set_state).
            for market_id, rate in (body.get("mm_rates") or {}).items():
                self.mm_rates[self.market(market_id).id] = Decimal(str(rate))
            for market_id, raw in (body.get("liquidation") or {}).items():
                self._override(self.liquidation_overrides, self.market(market_id).id, raw)
            for name, raw in (body.get("risk_fields") or {}).items():
                self._override(self.risk_fields, str(name), raw)
            for market_id, fields in (body.get("position_fields") or {}).items():
                table = self.position_fields.setdefault(self.market(market_id).id, {})
                for name, raw in fields.items():
                    self._override(table, str(name), raw)
            for row in body.get("transfers") or []:
                self.transfer(row["amount"], row.get("kind"), row.get("ts_ms"), row.get("asset", "USDT"))

    @staticmethod
    def _override(table, key, raw):
        if raw is None:
            table.pop(key, None)
        else:
            table[key] = raw


def _bool_param(p, name):
    value = p.get(name)
    if value is None or value == "":
        return False
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise BinanceError(400, -1130, f"Data sent for parameter '{name}' is not valid.")


def _decimal_param(p, name):
    raw = p.get(name)
    if raw is None or raw == "":
        raise _bad_param(name)
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise _bad_param(name) from None
    if not value.is_finite() or value and not -30 < value.adjusted() < 30:
        raise _bad_param(name)
    return value


def _check_price(market, price):
    if price <= 0:
        raise BinanceError(400, -4001, "Price less than 0.")
    if price % market.tick != 0:
        raise BinanceError(400, -4014, "Price not increased by tick size.")


# ------------------------------------------------------------------------------- HTTP

# (method, path) -> (handler name, weight, signed)
ROUTES = {
    ("GET", "/fapi/v1/ping"): ("ping", 1, False),
    ("GET", "/fapi/v1/time"): ("time", 1, False),
    ("GET", "/fapi/v1/exchangeInfo"): ("exchange_info", 1, False),
    ("GET", "/fapi/v1/premiumIndex"): ("premium_index", 1, False),
    ("GET", "/fapi/v1/ticker/price"): ("ticker_price", 1, False),
    ("GET", "/fapi/v2/ticker/price"): ("ticker_price", 1, False),
    ("GET", "/sapi/v1/capital/config/getall"): ("currencies", 10, True),
    ("GET", "/sapi/v1/margin/allPairs"): ("currencies", 1, True),
    ("GET", "/fapi/v1/leverageBracket"): ("leverage_bracket", 1, True),
    ("GET", "/fapi/v3/positionRisk"): ("position_risk_v3", 5, True),
    ("GET", "/fapi/v2/positionRisk"): ("position_risk_v2", 5, True),
    ("GET", "/fapi/v1/positionRisk"): ("position_risk_v2", 5, True),
    ("GET", "/fapi/v3/account"): ("account", 5, True),
    ("GET", "/fapi/v2/account"): ("account", 5, True),
    ("GET", "/fapi/v2/balance"): ("balance", 5, True),
    ("GET", "/fapi/v3/balance"): ("balance", 5, True),
    ("GET", "/fapi/v1/positionSide/dual"): ("get_dual", 30, True),
    ("POST", "/fapi/v1/positionSide/dual"): ("set_dual", 1, True),
    ("POST", "/fapi/v1/order"): ("new_order", 0, True),
    ("GET", "/fapi/v1/order"): ("get_order", 1, True),
    ("DELETE", "/fapi/v1/order"): ("cancel_order", 1, True),
    ("POST", "/fapi/v1/batchOrders"): ("batch_orders", 5, True),
    ("GET", "/fapi/v1/openOrders"): ("open_orders", 1, True),
    ("DELETE", "/fapi/v1/allOpenOrders"): ("cancel_all", 1, True),
    ("POST", "/fapi/v1/algoOrder"): ("new_algo", 0, True),
    ("GET", "/fapi/v1/algoOrder"): ("get_algo", 1, True),
    ("DELETE", "/fapi/v1/algoOrder"): ("cancel_algo", 1, True),
    ("GET", "/fapi/v1/openAlgoOrders"): ("open_algo_orders", 1, True),
    ("DELETE", "/fapi/v1/algoOpenOrders"): ("cancel_all_algo", 1, True),
    ("POST", "/fapi/v1/countdownCancelAll"): ("countdown", 10, True),
    ("GET", "/fapi/v1/multiAssetsMargin"): ("multi_assets", 30, True),
    ("GET", "/fapi/v1/income"): ("income", 30, True),
}
BATCH_PATH = "/fapi/v1/batchOrders"
ORDER_PATHS = {"/fapi/v1/order", "/fapi/v1/algoOrder"}     # a batch counts its orders (batch_item)


class HangUp(Exception):
    """A "hang" fault hit an order of a batch: the whole batch request goes unanswered (the
    orders after it are not placed), as a hung single order request would."""


def batch_item(paper, single_path, method, params, symbol, place, errors):
    """One order of a batch request, handled as the single-order endpoint would handle it:
    its own request-log entry at single_path ("in_batch": True), its own latency, hang (the
    whole batch then goes unanswered: HangUp), error and order_limit faults scoped to single_path, and one order counted against the limits.
    Returns place(); raises what a single request would have answered (the caller maps it
    into the batch's per-order result). errors = (fault_error(fault), rate_limited(retry_s),
    status_of(exc)) of the dialect. A batch is thus tested and faulted like its orders."""
    fault_error, rate_limited, status_of = errors
    entry = {"method": method, "path": single_path, "params": params, "ts": _now_ms(), "status": None,
             "in_batch": True}
    paper.request_log.append(entry)
    fault_path = single_path + "?" + "&".join(f"{k}={v}" for k, v in params.items())
    try:
        for fault in paper.faults.take({"latency"}, fault_path, method, symbol, scoped_only=True):
            time.sleep(_fault_delay_s(fault))
        for fault in paper.faults.take({"hang", "error"}, fault_path, method, symbol, scoped_only=True):
            if fault["kind"] == "hang":
                entry["status"] = "hang"
                paper._stopping.wait(float(fault.get("seconds", 30)))
                raise HangUp()
            raise fault_error(fault)
        _, orders10s, _ = paper._use_weight(0, True)
        for fault in paper.faults.take({"order_limit"}, fault_path, method, symbol):
            if orders10s > float(fault["limit"]):
                raise rate_limited(10 - time.time() % 10)
        result = place()
    except (BinanceError, DialectError) as exc:
        entry["status"] = status_of(exc)
        raise
    entry["status"] = 200
    return result


class PaperExchange:
    """The paper exchange, in-process. start() returns the base URL; stop() ends it."""

    def __init__(self, seed=None, hedge=False, latency_ms=0, jitter_ms=0, api_key=DEFAULT_API_KEY,
                 api_secret=DEFAULT_API_SECRET, port=0, synthetic=0, balance=DEFAULT_BALANCE, faults=(),
                 venue="binanceusdm", api_password=DEFAULT_API_PASSWORD, tls=None, idle_timeout_s=None):
        """tls: (cert_file, key_file) to serve HTTPS; idle_timeout_s: drop idle connections."""
        self.tls = tls
        self.idle_timeout_s = idle_timeout_s
        if venue not in DIALECTS:
            raise ValueError(f"unknown venue {venue!r}; one of {sorted(DIALECTS)}")
        self.venue = venue
        self.dialect = _dialect(venue)
        self.api_password = api_password
        markets, marks = default_markets(synthetic, venue)
        self.account = Account(markets, marks, hedge=hedge, balance=balance)
        self.account.seed(seed)
        self.api_key = api_key
        self.api_secret = api_secret.encode()
        self.port = port
        self.faults = Faults()
        if latency_ms or jitter_ms:
            self.faults.add({"kind": "latency", "ms": latency_ms, "jitter_ms": jitter_ms})
        for fault in faults:
            self.faults.add(fault)
        self.request_log = deque(maxlen=REQUEST_LOG_SIZE)
        self._initial = (seed, hedge, balance)
        self._weight_lock = threading.Lock()
        self._weight = [0, 0]           # [minute, used weight]
        self._orders10s = [0, 0]        # [10 s window, orders]
        self._orders1m = [0, 0]
        self._stopping = threading.Event()
        self._server = None
        self._threads = []
        self.base_url = None
        self._exchange_info_cache = None

    # -- lifecycle

    def start(self):
        # StreamRequestHandler.timeout: a connection idle that long gets closed after its
        # last answer, the way a venue's load balancer drops idle keep-alive connections.
        handler = type("Handler", (_Handler,), {"paper": self, "timeout": self.idle_timeout_s})
        self._server = _Server(("127.0.0.1", self.port), handler)
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
            # The handshake runs on the connection's own thread (first read), not in accept().
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                      do_handshake_on_connect=False)
        self.port = self._server.server_address[1]
        self.base_url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                 name="paper-http", daemon=True)
        tick = threading.Thread(target=self._ticker, name="paper-countdown", daemon=True)
        self._threads = [serve, tick]
        for thread in self._threads:
            thread.start()
        return self.base_url

    def stop(self):
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _ticker(self):
        while not self._stopping.wait(0.02):
            self.account.expire_countdowns()

    # -- direct accessors for tests and tools

    def add_fault(self, fault=None, **kwargs):
        return self.faults.add(dict(fault or {}, **kwargs))

    def clear_faults(self):
        self.faults.clear()

    def requests(self, path=None, method=None, batches=False):
        """Logged requests; a batch order request appears as its orders (batch_item), each
        at the single-order path, unless batches=True also lists the batch requests."""
        return [r for r in list(self.request_log)
                if (path is None or path in r["path"]) and (method is None or r["method"] == method)
                and (batches or not r.get("batch"))]

    def clear_requests(self):
        self.request_log.clear()

    def state(self):
        return self.account.state()

    def set_state(self, body):
        """Account.apply_state, plus "account_mode" (set_account_mode) and "account_unreadable":
        true or {"duration_s", "status"} (account_unreadable), which need the dialect."""
        if isinstance(body, dict) and "account_mode" in body:
            self.set_account_mode(body["account_mode"])
        self.account.apply_state(body)
        unreadable = body.get("account_unreadable") if isinstance(body, dict) else None
        if unreadable:
            self.account_unreadable(**(unreadable if isinstance(unreadable, dict) else {}))

    # -- the risk model (what the risk kernel reads, in every dialect)

    def account_modes(self):
        """The normalised account modes this dialect answers (RiskSnapshot.margin_mode); the
        first is the default."""
        return tuple(self.dialect.ACCOUNT_MODES if self.dialect else BINANCE_MODES)

    def set_account_mode(self, mode):
        """Switch the account mode the dialect reports (Binance multiAssetsMargin, Bybit
        marginMode, OKX acctLv); None: the default. Unknown to this dialect: ValueError."""
        if mode is not None and mode not in self.account_modes():
            raise ValueError(f"account mode {mode!r} is not one of {self.account_modes()} ({self.venue})")
        self.account.account_mode = mode

    def account_mode(self):
        return self.account.account_mode or self.account_modes()[0]

    def deposit(self, amount, ts_ms=None, asset="USDT"):
        """A transfer in: the wallet grows, the ledger gets an entry (returns its id)."""
        return self.account.transfer(abs(Decimal(str(amount))), "deposit", ts_ms, asset)

    def withdraw(self, amount, ts_ms=None, asset="USDT"):
        return self.account.transfer(-abs(Decimal(str(amount))), "withdraw", ts_ms, asset)

    def book_pnl(self, amount, ts_ms=None, asset="USDT"):
        """Realised PnL or fees booked to the wallet: a ledger entry that is no transfer."""
        return self.account.transfer(amount, "pnl", ts_ms, asset)

    def set_liquidation(self, market_id, raw):
        """The raw liquidation price every dialect answers for market_id's positions ("0",
        "", "abc", a price); None: computed again (Account.risk_view)."""
        self.account.apply_state({"liquidation": {market_id: raw}})

    def set_risk_field(self, name, raw):
        """Lay a raw value over the account-level risk answer's wire field name (Binance
        totalMarginBalance, Bybit totalEquity, OKX adjEq, ...); None removes it."""
        self.account.apply_state({"risk_fields": {name: raw}})

    def set_position_field(self, market_id, name, raw):
        """Lay a raw value over market_id's position rows' wire field (Bybit positionStatus
        "Liq", a malformed markPrice...); None removes it."""
        self.account.apply_state({"position_fields": {market_id: {name: raw}}})

    def set_mm_rate(self, market_id, rate):
        self.account.apply_state({"mm_rates": {market_id: rate}})

    def risk_view(self):
        return self.account.risk_view()

    def account_unreadable(self, duration_s=None, status=503):
        """Every read of the account-level risk answer fails (an "error" fault on its path)
        for duration_s (None: until clear_faults). Returns the fault id."""
        path = self.dialect.ACCOUNT_PATH if self.dialect else "/fapi/v3/account"
        return self.add_fault(kind="error", status=status, path=path, duration_s=duration_s)

    def set_mark(self, market_id, price):
        self.account.set_mark(market_id, price)

    def set_position(self, market_id, amount, position_side=None, entry_price=None):
        self.account.set_position(market_id, amount, position_side, entry_price)

    def positions(self):
        """{(market_id, position_side): float amount}, non-zero only."""
        with self.account.lock:
            return {key: float(value[0]) for key, value in self.account.positions.items()}

    def position_amount(self, market_id, position_side="BOTH"):
        return float(self.account.position_amount(market_id, position_side))

    def set_margin_mode(self, market_id, position_side, mode):
        """"cross" | "isolated" for one position (dialects whose orders carry a margin mode)."""
        self.account.margin_modes[(market_id.upper(), position_side.upper())] = mode

    def market_ids(self):
        return list(self.account.markets)

    def add_order(self, market_id, side, qty, price=None, trigger=None, position_side=None,
                  reduce_only=False):
        """Seed one resting order: a limit order (price) in the regular book, or a
        conditional stop-market order (trigger) in the conditional book; any dialect."""
        account = self.account
        position_side = position_side or ("BOTH" if not account.hedge else
                                          ("LONG" if (side.upper() == "BUY") != reduce_only else "SHORT"))
        p = {"symbol": market_id, "side": side.upper(), "quantity": str(qty), "positionSide": position_side}
        if reduce_only and not account.hedge:
            p["reduceOnly"] = "true"
        if trigger is not None:
            return account.place_algo(dict(p, type="STOP_MARKET", triggerPrice=str(trigger)))
        return account.place_order(dict(p, type="LIMIT", price=str(price), timeInForce="GTC"))

    def reset(self, seed=None, hedge=None):
        """Back to the start-up state (or a new seed), faults and request log cleared."""
        seed0, hedge0, balance0 = self._initial
        markets = self.account.markets
        _, marks = default_markets(0, self.venue)
        fresh = Account(markets, {m: marks.get(m, Decimal("10.000")) for m in markets},
                        hedge=hedge0 if hedge is None else hedge, balance=balance0)
        fresh.seed(seed0 if seed is None else seed)
        self.account = fresh
        self.faults.clear()
        self.request_log.clear()

    # -- rate accounting

    def _use_weight(self, weight, is_order):
        """Returns (used weight this minute, orders in 10 s, orders in 1 min) after counting."""
        now = time.time()
        minute, window = int(now // 60), int(now // 10)
        with self._weight_lock:
            if self._weight[0] != minute:
                self._weight = [minute, 0]
            self._weight[1] += weight
            if is_order:
                if self._orders10s[0] != window:
                    self._orders10s = [window, 0]
                if self._orders1m[0] != minute:
                    self._orders1m = [minute, 0]
                self._orders10s[1] += 1
                self._orders1m[1] += 1
            return self._weight[1], self._orders10s[1], self._orders1m[1]

    def exchange_info(self):
        if self._exchange_info_cache is None:
            self._exchange_info_cache = {
                "timezone": "UTC", "serverTime": _now_ms(), "futuresType": "U_MARGINED",
                "rateLimits": [
                    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 2400},
                    {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
                    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 300},
                ],
                "exchangeFilters": [],
                "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "-10000"}],
                "symbols": [m.info for m in self.account.markets.values()],
            }
        return dict(self._exchange_info_cache, serverTime=_now_ms())


def make_test_cert(directory):
    """(cert_file, key_file): a fresh self-signed certificate for 127.0.0.1/localhost, valid
    one day, written into directory by the openssl CLI. The cert is its own CA: pass
    cert_file as EEXIT_EXCHANGE_CA_FILE. Tests and benchmarks only."""
    cert, key = os.path.join(directory, "paper-cert.pem"), os.path.join(directory, "paper-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def _fault_delay_s(fault):
    return (float(fault.get("ms", 0)) + random.uniform(0, float(fault.get("jitter_ms", 0)))) / 1000.0


def drop_fields(paper, result, fault_path, method):
    """The answer with the drop_field faults applied: every row (a JSON object, at any depth)
    holding the fault's field loses it; a fault with "row" touches only the rows of that
    market (Binance/Bybit "symbol", OKX "instId" as BTC-USDT-SWAP -> BTCUSDT)."""
    for fault in paper.faults.take({"drop_field"}, fault_path, method):
        _drop(result, fault["field"], str(fault.get("row") or "").upper() or None)
    return result


def _drop(value, field, market_id):
    if isinstance(value, list):
        for item in value:
            _drop(item, field, market_id)
    elif isinstance(value, dict):
        row_id = value.get("symbol") or "".join(str(value.get("instId") or "").split("-")[:2])
        if field in value and (market_id is None or row_id == market_id):
            del value[field]
        for item in value.values():
            _drop(item, field, market_id)


def _take_request_faults(handler, entry, fault_path, method, symbol, fault_error, batch=None):
    """The latency, then hang/reset/error faults of one HTTP request, in every dialect. True
    when the request ended here (hung or reset): the caller returns without an answer; an
    error fault raises fault_error(fault), answered as the dialect answers errors. batch: the
    path of a batch request, faulted as a whole only by faults marked "batch"."""
    paper = handler.paper
    for fault in paper.faults.take({"latency"}, fault_path, method, symbol, batch=batch):
        time.sleep(_fault_delay_s(fault))
    for fault in paper.faults.take({"hang", "reset", "error"}, fault_path, method, symbol, batch=batch):
        if fault["kind"] == "hang":
            entry["status"] = "hang"
            paper._stopping.wait(float(fault.get("seconds", 30)))
            handler.close_connection = True
            return True
        if fault["kind"] == "reset":
            entry["status"] = "reset"
            handler._reset()
            return True
        raise fault_error(fault)
    return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = set()
        self.connections_lock = threading.Lock()

    def drop_connections(self):
        """Kept-alive connections would otherwise still be served after stop(): a stopped
        paper exchange must look like a dead exchange to every client."""
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # A client that vanished mid-answer (reset, timeout) is normal here; stay quiet.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "paper-binance/1"
    paper = None  # set per server by PaperExchange.start

    def setup(self):
        super().setup()
        # Headers and body are two writes; with Nagle on, the client's delayed ACK adds
        # ~40 ms to every answer on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PUT(self):
        self._handle("PUT")

    # -- plumbing

    def _send(self, status, payload, headers=None):
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._send_raw(status, body, dict({"Content-Type": "application/json"}, **(headers or {})))

    def _send_raw(self, status, body, headers):
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, str(value))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length is None:
            return ""
        try:
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise BinanceError(400, -1000, "Invalid Content-Length.") from None
        if length < 0 or length > MAX_BODY_BYTES:
            # Drain a moderately large body so the client can read our answer; beyond that
            # the body stays unread and the connection is closed after the answer.
            if 0 < length <= MAX_DRAIN_BYTES:
                while length > 0:
                    chunk = self.rfile.read(min(length, 65536))
                    if not chunk:
                        break
                    length -= len(chunk)
            else:
                self.close_connection = True
            raise BinanceError(413, -1000, "Request body too large.")
        return self.rfile.read(length).decode("utf-8", errors="replace") if length else ""

    def _handle(self, method):
        paper = self.paper
        split = urlsplit(self.path)
        path = split.path
        if path.startswith("/_paper/"):
            self._admin(method, path, split.query)
            return
        if paper.dialect is not None:
            serve_dialect(self, method, path, split.query, paper.dialect)
            return
        entry = self.entry = {"method": method, "path": path, "params": {}, "ts": _now_ms(), "status": None}
        paper.request_log.append(entry)
        try:
            body = self._read_body()
            params = _parse_params(split.query, body)
            entry["params"] = {k: v for k, v in params.items() if k != "signature"}
            symbol = (params.get("symbol") or "").upper() or None
            fault_path = None if path == BATCH_PATH else path  # a batch is faulted as its orders
            if path == BATCH_PATH:
                entry["batch"] = True
            if _take_request_faults(self, entry, fault_path, method, symbol, _fault_error,
                                    path if path == BATCH_PATH else None):
                return
            route = ROUTES.get((method, path))
            if route is None:
                raise BinanceError(404, -5000, f"Path {path} not found.")
            name, weight, signed = route
            if name == "open_orders" and not params.get("symbol"):
                weight = 40
            used, orders10s, orders1m = paper._use_weight(weight, path in ORDER_PATHS)
            headers = {"X-MBX-USED-WEIGHT-1M": used}
            if path in ORDER_PATHS:
                headers["X-MBX-ORDER-COUNT-10S"] = orders10s
                headers["X-MBX-ORDER-COUNT-1M"] = orders1m
            for fault in paper.faults.take({"weight_limit"}, path, method, symbol):
                if used > float(fault["limit"]):
                    retry = 60 - int(time.time()) % 60
                    raise BinanceError(429, -1003, f"Too many requests; current limit of IP is "
                                       f"{int(fault['limit'])} requests per minute.",
                                       dict(headers, **{"Retry-After": retry}))
            if path in ORDER_PATHS:
                for fault in paper.faults.take({"order_limit"}, path, method, symbol):
                    if orders10s > float(fault["limit"]):
                        raise BinanceError(429, -1015, f"Too many new orders; current limit is "
                                           f"{int(fault['limit'])} orders per TEN_SECONDS.",
                                           dict(headers, **{"Retry-After": 10 - int(time.time()) % 10}))
            if signed:
                self._authenticate(split.query, body, params)
            paper.account.expire_countdowns()
            result = drop_fields(paper, getattr(self, "_ep_" + name)(params, path, method), path, method)
            entry["status"] = 200
            self._send(200, result, headers)
        except HangUp:
            entry["status"] = "hang"          # an order of a batch hung: the batch never answers
            self.close_connection = True
        except BinanceError as exc:
            entry["status"] = exc.status
            if exc.code is None:
                self._send_raw(exc.status, exc.msg.encode(), exc.headers)
            else:
                self._send(exc.status, {"code": exc.code, "msg": exc.msg}, exc.headers)
        except Exception as exc:  # noqa: BLE001 - the server must keep serving whatever arrives
            entry["status"] = 500
            self._send(500, {"code": -1000, "msg": f"An unknown error occured while processing the request. "
                                                  f"({type(exc).__name__})"})

    def _reset(self):
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    def _authenticate(self, query, body, params):
        paper = self.paper
        key = self.headers.get("X-MBX-APIKEY")
        if not key:
            raise BinanceError(401, -2014, "API-key format invalid.")
        if not hmac.compare_digest(key, paper.api_key):
            raise BinanceError(401, -2015, "Invalid API-key, IP, or permissions for action.")
        if "timestamp" not in params:
            raise _bad_param("timestamp")
        signature = params.get("signature")
        if not signature:
            raise _bad_param("signature")
        total = query + body if query and body else (query or body)
        payload = "&".join(part for part in total.split("&") if not part.startswith("signature="))
        expected = hmac.new(paper.api_secret, payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature.lower()):
            raise BinanceError(400, -1022, "Signature for this request is not valid.")
        try:
            timestamp = int(params["timestamp"])
            recv_window = int(params.get("recvWindow", DEFAULT_RECV_WINDOW_MS))
        except ValueError:
            raise BinanceError(400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.") from None
        if recv_window <= 0 or recv_window > MAX_RECV_WINDOW_MS:
            raise BinanceError(400, -1131, "recvWindow must be less than 60000")
        now = _now_ms()
        if timestamp > now + 1000 or now - timestamp > recv_window:
            raise BinanceError(400, -1021, "Timestamp for this request is outside of the recvWindow.")

    def _admin(self, method, path, query):
        paper = self.paper
        try:
            body = self._read_body()
            data = json.loads(body) if body.strip() else {}
            if path == "/_paper/state" and method == "GET":
                return self._send(200, paper.state())
            if path == "/_paper/state" and method == "POST":
                paper.set_state(data)
                return self._send(200, paper.state())
            if path == "/_paper/faults" and method == "GET":
                return self._send(200, {"faults": paper.faults.list()})
            if path == "/_paper/faults" and method == "DELETE" or (method == "POST" and data.get("clear")):
                paper.clear_faults()
                if path == "/_paper/faults" and method == "DELETE":
                    return self._send(200, {"faults": []})
            if path == "/_paper/faults" and method == "POST":
                items = data if isinstance(data, list) else data.get("faults", [data] if "kind" in data else [])
                ids = [paper.add_fault(item) for item in items]
                return self._send(200, {"ids": ids, "faults": paper.faults.list()})
            if path == "/_paper/requests" and method == "GET":
                filters = dict(parse_qsl(query))
                return self._send(200, {"requests": paper.requests(filters.get("path"), filters.get("method"))})
            if path == "/_paper/requests" and method == "DELETE":
                paper.clear_requests()
                return self._send(200, {"requests": []})
            if path == "/_paper/reset" and method == "POST":
                paper.reset(data.get("seed"), data.get("hedge"))
                return self._send(200, paper.state())
            self._send(404, {"code": -5000, "msg": f"Path {path} not found."})
        except BinanceError as exc:
            self._send(exc.status, {"code": exc.code, "msg": exc.msg})
        except (ValueError, TypeError, KeyError, AttributeError, InvalidOperation) as exc:
            self._send(400, {"code": -1000, "msg": f"bad admin request: {exc}"})

    # -- endpoints: (params, path, method) -> JSON-able

    def _ep_ping(self, p, path, method):
        return {}

    def _ep_time(self, p, path, method):
        return {"serverTime": _now_ms()}

    def _ep_exchange_info(self, p, path, method):
        return self.paper.exchange_info()

    def _ep_premium_index(self, p, path, method):
        account = self.paper.account
        ids = [account.market(p["symbol"]).id] if p.get("symbol") else list(account.markets)
        now = _now_ms()
        rows = [{"symbol": m, "markPrice": _fmt(account.marks[m]), "indexPrice": _fmt(account.marks[m]),
                 "estimatedSettlePrice": _fmt(account.marks[m]), "lastFundingRate": "0.00010000",
                 "interestRate": "0.00010000", "nextFundingTime": now - now % 28800000 + 28800000,
                 "time": now} for m in ids]
        return rows[0] if p.get("symbol") else rows

    def _ep_ticker_price(self, p, path, method):
        account = self.paper.account
        ids = [account.market(p["symbol"]).id] if p.get("symbol") else list(account.markets)
        rows = [{"symbol": m, "price": _fmt(account.marks[m]), "time": _now_ms()} for m in ids]
        return rows[0] if p.get("symbol") else rows

    def _ep_currencies(self, p, path, method):
        return []

    def _ep_leverage_bracket(self, p, path, method):
        account = self.paper.account
        ids = [account.market(p["symbol"]).id] if p.get("symbol") else list(account.markets)
        brackets = [
            {"bracket": 1, "initialLeverage": 125, "notionalCap": 50000, "notionalFloor": 0,
             "maintMarginRatio": 0.004, "cum": 0.0},
            {"bracket": 2, "initialLeverage": 100, "notionalCap": 600000, "notionalFloor": 50000,
             "maintMarginRatio": 0.005, "cum": 50.0},
            {"bracket": 3, "initialLeverage": 20, "notionalCap": 100000000, "notionalFloor": 600000,
             "maintMarginRatio": 0.025, "cum": 12050.0},
        ]
        rows = [{"symbol": m, "notionalCoef": 1.0, "brackets": brackets} for m in ids]
        return rows

    def _ep_position_risk_v3(self, p, path, method):
        return self._filter_symbol(self.paper.account.position_rows(3), p)

    def _ep_position_risk_v2(self, p, path, method):
        return self._filter_symbol(self.paper.account.position_rows(2), p)

    def _filter_symbol(self, rows, p):
        if p.get("symbol"):
            market_id = self.paper.account.market(p["symbol"]).id
            rows = [r for r in rows if r["symbol"] == market_id]
        return rows

    def _ep_account(self, p, path, method):
        return self.paper.account.account_view()

    def _ep_balance(self, p, path, method):
        asset = self.paper.account.account_view()["assets"][0]
        return [{"accountAlias": "paper", "asset": "USDT", "balance": asset["walletBalance"],
                 "crossWalletBalance": asset["crossWalletBalance"], "crossUnPnl": asset["crossUnPnl"],
                 "availableBalance": asset["availableBalance"], "maxWithdrawAmount": asset["maxWithdrawAmount"],
                 "marginAvailable": True, "updateTime": asset["updateTime"]}]

    def _ep_get_dual(self, p, path, method):
        return {"dualSidePosition": self.paper.account.hedge}

    def _ep_set_dual(self, p, path, method):
        account = self.paper.account
        wanted = _bool_param(p, "dualSidePosition")
        with account.lock:
            if wanted == account.hedge:
                raise BinanceError(400, -4059, "No need to change position side.")
            if account.positions or account.open_orders or account.open_algo:
                raise BinanceError(400, -4068, "Position side cannot be changed if there exists position.")
            account.hedge = wanted
        return {"code": 200, "msg": "success"}

    def _order_faults(self, p, path, method):
        """Per-symbol rejects; returns the partial-fill ratio if one applies."""
        symbol = (p.get("symbol") or "").upper() or None
        for fault in self.paper.faults.take({"reject"}, path, method, symbol):
            raise BinanceError(int(fault.get("status", 400)), int(fault.get("code", -2019)),
                               fault.get("msg", "Margin is insufficient."))
        ratio = None
        for fault in self.paper.faults.take({"partial_fill"}, path, method, symbol):
            ratio = float(fault.get("ratio", 0.5))
        return ratio

    def _ep_new_order(self, p, path, method):
        ratio = self._order_faults(p, path, method)
        return self.paper.account.place_order(p, ratio)

    def _ep_batch_orders(self, p, path, method):
        raw = p.get("batchOrders")
        try:
            orders = json.loads(raw) if raw else None
        except ValueError:
            orders = None
        if not isinstance(orders, list) or not orders or not all(isinstance(o, dict) for o in orders):
            raise _bad_param("batchOrders")
        if len(orders) > 5:
            raise BinanceError(400, -4000, "Invalid number of batch place orders.")
        self.entry["batch"] = True
        results = []
        for order in orders:
            params = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in order.items()}
            try:
                results.append(batch_item(
                    self.paper, "/fapi/v1/order", method, params, (params.get("symbol") or "").upper() or None,
                    lambda p=params: self.paper.account.place_order(p, self._order_faults(p, "/fapi/v1/order", method)),
                    (_fault_error, _binance_rate_limited, lambda exc: exc.status)))
            except BinanceError as exc:
                results.append({"code": exc.code, "msg": exc.msg})
        return results

    def _ep_get_order(self, p, path, method):
        return dict(self.paper.account.find_order(p))

    def _ep_cancel_order(self, p, path, method):
        return self.paper.account.cancel_order(p)

    def _ep_open_orders(self, p, path, method):
        market_id = self.paper.account.market(p["symbol"]).id if p.get("symbol") else None
        return self.paper.account.list_open(market_id)

    def _ep_cancel_all(self, p, path, method):
        self.paper.account.cancel_all(self.paper.account.market(p.get("symbol")).id)
        return {"code": 200, "msg": "The operation of cancel all open order is done."}

    def _ep_new_algo(self, p, path, method):
        self._order_faults(p, path, method)
        return self.paper.account.place_algo(p)

    def _ep_get_algo(self, p, path, method):
        return dict(self.paper.account.find_algo(p))

    def _ep_cancel_algo(self, p, path, method):
        return self.paper.account.cancel_algo(p)

    def _ep_open_algo_orders(self, p, path, method):
        market_id = self.paper.account.market(p["symbol"]).id if p.get("symbol") else None
        return self.paper.account.list_open_algo(market_id)

    def _ep_cancel_all_algo(self, p, path, method):
        self.paper.account.cancel_all_algo(self.paper.account.market(p.get("symbol")).id)
        return {"code": 200, "msg": "The operation of cancel all open order is done."}

    def _ep_multi_assets(self, p, path, method):
        return {"multiAssetsMargin": BINANCE_MODES[self.paper.account_mode()]}

    def _ep_income(self, p, path, method):
        """The ledger as Binance's income history: deposits and withdrawals are TRANSFER,
        booked PnL REALIZED_PNL; oldest first, `page`/`limit` (max 1000) pages."""
        kinds = {"TRANSFER": ("deposit", "withdraw"), "REALIZED_PNL": ("pnl",)}
        try:
            start, end = (int(p[k]) if p.get(k) else None for k in ("startTime", "endTime"))
            limit, page = min(int(p.get("limit", 100)), 1000), max(int(p.get("page", 1)), 1)
        except ValueError:
            raise _bad_param("startTime/endTime/limit/page") from None
        wanted = kinds.get(p.get("incomeType"), ()) if p.get("incomeType") else None
        rows = [{"symbol": "", "incomeType": "REALIZED_PNL" if e["kind"] == "pnl" else "TRANSFER",
                 "income": _fmt(e["amount"]), "asset": e["asset"], "info": "", "time": e["ts"],
                 "tranId": e["id"], "tradeId": ""}
                for e in sorted(self.paper.account.ledger_rows(start, end, wanted), key=lambda e: (e["ts"], e["id"]))]
        return rows[(page - 1) * limit:page * limit]

    def _ep_countdown(self, p, path, method):
        market_id = self.paper.account.market(p.get("symbol")).id
        try:
            countdown = int(p.get("countdownTime", ""))
        except ValueError:
            raise _bad_param("countdownTime") from None
        if countdown < 0:
            raise _bad_param("countdownTime")
        self.paper.account.arm_countdown(market_id, countdown)
        return {"symbol": market_id, "countdownTime": str(countdown)}


# ------------------------------------------------------------------------------- other dialects

class DialectError(Exception):
    """An answer in a dialect's own format: JSON `payload`, or `raw` text (HTML pages)."""

    def __init__(self, status, payload=None, headers=None, raw=None, code=None):
        super().__init__(code)
        self.status, self.payload, self.headers, self.raw, self.code = status, payload, headers or {}, raw, code


def serve_dialect(h, method, path, query, d):
    """One request in dialect module d (paper.bybit, paper.okx): the same request log, fault
    engine and Account as the Binance dialect, with d's routes, signatures and envelopes.
    d provides ROUTES, parse(method, query, body), authenticate(h, method, path, query, body),
    envelope(result), translate(BinanceError), rate_limited(retry_s), fault_error(fault),
    and one ep_<name>(paper, params, path, method) per route. A fault's "path" is matched
    against the path plus "?k=v&..." of the parameters, so "settleCoin=USDC" scopes one
    segment; the log's "status" of a refused request is d's error code."""
    paper = h.paper
    entry = {"method": method, "path": path, "params": {}, "ts": _now_ms(), "status": None}
    paper.request_log.append(entry)
    try:
        try:
            body = h._read_body()
            params = d.parse(method, query, body)
            entry["params"] = params
            items = params if isinstance(params, list) else [params]
            symbol = d.symbol_of(items[0]) if items and isinstance(items[0], dict) else None
            fault_path = path + "?" + "&".join(f"{k}={v}" for item in items if isinstance(item, dict)
                                               for k, v in item.items())
            batch = None
            if d.ROUTES.get((method, path), ("",))[0] in getattr(d, "BATCHES", ()):
                # Logged and faulted as its orders (batch_item), not as one request.
                entry["batch"] = True
                fault_path, batch = None, path
            if _take_request_faults(h, entry, fault_path, method, symbol, d.fault_error, batch):
                return
            route = d.ROUTES.get((method, path))
            if route is None:
                raise d.translate(BinanceError(404, -5000, f"Path {path} not found."))
            name, signed, is_order = route
            _, orders10s, _ = paper._use_weight(1, is_order)
            if is_order:
                for fault in paper.faults.take({"order_limit"}, fault_path, method, symbol):
                    if orders10s > float(fault["limit"]):
                        raise d.rate_limited(10 - time.time() % 10)
            if signed:
                d.authenticate(h, method, path, query, body)
            paper.account.expire_countdowns()
            result = drop_fields(paper, getattr(d, "ep_" + name)(paper, params, fault_path, method), fault_path,
                                 method)
        except BinanceError as exc:
            raise d.translate(exc) from None
    except DialectError as exc:
        entry["status"] = exc.code if exc.code is not None else exc.status
        if exc.raw is not None:
            h._send_raw(exc.status, exc.raw.encode(), exc.headers)
        else:
            h._send(exc.status, exc.payload, exc.headers)
        return
    except HangUp:
        entry["status"] = "hang"              # an order of a batch hung: the batch never answers
        h.close_connection = True
        return
    except Exception as exc:  # noqa: BLE001 - the server must keep serving whatever arrives
        entry["status"] = 500
        h._send(500, d.envelope(None, error=f"System error ({type(exc).__name__})"))
        return
    entry["status"] = 200
    h._send(200, d.envelope(result))


def html_page(status):
    return DialectError(status, raw=f"<html><body><h1>{status}</h1></body></html>",
                        headers={"Content-Type": "text/html"})


def _parse_params(query, body):
    params = {}
    for source in (query, body):
        if not source:
            continue
        try:
            pairs = parse_qsl(source, keep_blank_values=True, max_num_fields=MAX_PARAMS)
        except ValueError:
            raise BinanceError(400, -1101, "Too many parameters sent for this endpoint.") from None
        for key, value in pairs:
            if key in params:
                raise BinanceError(400, -1101, "Duplicate values for a parameter detected.")
            params[key] = value
    return params


def _binance_rate_limited(retry_s):
    return BinanceError(429, -1015, "Too many new orders; current limit is reached.",
                        {"Retry-After": int(math.ceil(retry_s))})


def _fault_error(fault):
    """429/418 come with Retry-After and Binance's -1003. A 5xx without an explicit code gets
    the HTML page Binance's gateway serves (ccxt then maps the HTTP status: 5xx ->
    ExchangeNotAvailable, 504 -> RequestTimeout); with a "code" it gets Binance's JSON."""
    status = int(fault.get("status", 503))
    headers = {}
    if status in (418, 429):
        default_code, default_msg = -1003, "Too many requests; please use the websocket for live updates to avoid bans."
        retry = fault.get("retry_after", 60 if status == 418 else 1)
        headers["Retry-After"] = int(math.ceil(float(retry)))
    elif status >= 500 and "code" not in fault:
        return BinanceError(status, None, f"<html><body><h1>{status} Service Unavailable</h1></body></html>",
                            {"Content-Type": "text/html"})
    else:
        default_code, default_msg = -1000, "An unknown error occured while processing the request."
    return BinanceError(status, int(fault.get("code", default_code)), fault.get("msg", default_msg), headers)


# ------------------------------------------------------------------------------- CLI

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m eexit.paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--venue", default="binanceusdm", choices=DIALECTS, help="wire dialect")
    parser.add_argument("--api-password", default=DEFAULT_API_PASSWORD, help="passphrase (okx)")
    parser.add_argument("--seed", default="", help="SYMBOL:QTY,... (negative QTY = short)")
    parser.add_argument("--seed-all", default=None, help="open QTY on every symbol (benchmarks)")
    parser.add_argument("--synthetic", type=int, default=0, help="add N generated symbols P0001USDT...")
    parser.add_argument("--hedge", action="store_true", help="hedge mode (positionSide LONG/SHORT)")
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--jitter-ms", type=float, default=0)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--api-secret", default=DEFAULT_API_SECRET)
    parser.add_argument("--fault", action="append", default=[], help="fault as JSON, repeatable")
    parser.add_argument("--cert", default=None, help="PEM certificate: serve HTTPS (with --key)")
    parser.add_argument("--key", default=None, help="PEM private key of --cert")
    parser.add_argument("--idle-timeout-s", type=float, default=None, help="drop idle connections")
    args = parser.parse_args(argv)
    try:
        faults = [json.loads(text) for text in args.fault]
        paper = PaperExchange(seed=args.seed, hedge=args.hedge, latency_ms=args.latency_ms,
                              jitter_ms=args.jitter_ms, api_key=args.api_key, api_secret=args.api_secret,
                              port=args.port, synthetic=args.synthetic, faults=faults, venue=args.venue,
                              api_password=args.api_password, idle_timeout_s=args.idle_timeout_s,
                              tls=(args.cert, args.key) if args.cert else None)
        if args.seed_all is not None:
            amount = Decimal(args.seed_all)
            for market_id in paper.market_ids():
                paper.set_position(market_id, amount)
    except (ValueError, InvalidOperation) as exc:
        print(f"paper: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(paper.start(), flush=True)
    stop.wait()
    paper.stop()
    return 0


"""The one place in eexit that talks to an exchange, through ccxt.

Builds a ccxt exchange from configuration and offers the handful of account operations an
emergency close needs: read positions, read and cancel open orders (normal and conditional
book), place one reduce-only market order, arm the exchange's dead-man switch, and classify
errors so callers can decide between retrying, waiting, splitting and giving up.

Every read RAISES on failure: an exchange error is never an empty account (SPEC §4.1).
Binance-specific paths are used for the Binance family because ccxt's unified calls lose
information there (SPEC §5); other ccxt exchanges get the unified calls.
"""

import math
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import ccxt

from eexit.config import ConfigError, credential, env_bool, env_int, env_str

DEFAULT_EXCHANGE = "binanceusdm"
DEFAULT_TIMEOUT_MS = 5000
BINANCE_IDS = frozenset({"binanceusdm", "binance"})


@dataclass(frozen=True)
class ExchangeConfig:
    exchange_id: str = DEFAULT_EXCHANGE
    api_key: str | None = field(default=None, repr=False)
    api_secret: str | None = field(default=None, repr=False)
    url: str | None = None
    sandbox: bool = False
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    @classmethod
    def from_env(cls, env=None):
        exchange_id = env_str("EEXIT_EXCHANGE", DEFAULT_EXCHANGE, env)
        if exchange_id not in ccxt.exchanges:
            raise ConfigError(f"EEXIT_EXCHANGE={exchange_id!r} is not a ccxt exchange id")
        api_key = credential("api_key", ("EEXIT_API_KEY", "BINANCE_API_KEY"), env)
        api_secret = credential("api_secret", ("EEXIT_API_SECRET", "BINANCE_API_SECRET"), env)
        if (api_key is None) != (api_secret is None):
            missing = "EEXIT_API_SECRET (or api_secret)" if api_secret is None else "EEXIT_API_KEY (or api_key)"
            raise ConfigError(f"{missing} is required when the other half of the API credentials is set")
        url = _env_optional("EEXIT_EXCHANGE_URL", env)
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"EEXIT_EXCHANGE_URL={url!r} is not an http(s) base URL")
            url = url.rstrip("/")
        if _env_optional("EEXIT_SANDBOX", env) is not None:
            sandbox = env_bool("EEXIT_SANDBOX", False, env)
        else:
            sandbox = env_bool("BINANCE_TESTNET", False, env)
        if sandbox and url is not None:
            # Two different destinations for real orders: refuse rather than guess which one.
            raise ConfigError("EEXIT_SANDBOX and EEXIT_EXCHANGE_URL are both set; choose one")
        timeout_ms = env_int("EEXIT_EXCHANGE_TIMEOUT_MS", DEFAULT_TIMEOUT_MS, minimum=100, maximum=120000, env=env)
        return cls(exchange_id=exchange_id, api_key=api_key, api_secret=api_secret, url=url,
                   sandbox=sandbox, timeout_ms=timeout_ms)


def _env_optional(name, env):
    env = os.environ if env is None else env
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def build_exchange(cfg):
    """A synchronous ccxt exchange. ccxt's rate limiter is off: it sleeps ~200 ms between
    orders, which an emergency close cannot afford; callers pace themselves."""
    klass = getattr(ccxt, cfg.exchange_id)
    settings = {"enableRateLimit": False, "timeout": int(cfg.timeout_ms)}
    if cfg.api_key is not None:
        settings["apiKey"] = cfg.api_key
        settings["secret"] = cfg.api_secret
    ex = klass(settings)
    # A signed currency listing before the markets costs a request and needs wallet rights.
    ex.options["fetchCurrencies"] = False
    open_orders_options = ex.options.get("fetchOpenOrders")
    if not isinstance(open_orders_options, dict):
        open_orders_options = {}
        ex.options["fetchOpenOrders"] = open_orders_options
    open_orders_options["warnWithoutSymbol"] = False
    if cfg.sandbox:
        ex.set_sandbox_mode(True)
    if cfg.url is not None:
        ex.urls["api"] = _rewrite_urls(ex.urls["api"], cfg.url)
    return ex


def _rewrite_urls(api_urls, base):
    """Keep each endpoint's path, replace scheme and host with base."""
    if isinstance(api_urls, str):
        path = urlsplit(api_urls).path
        return base + path
    if isinstance(api_urls, dict):
        return {key: _rewrite_urls(value, base) for key, value in api_urls.items()}
    return api_urls


def is_binance(ex):
    return ex.id in BINANCE_IDS


# ---------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Position:
    symbol: str            # ccxt unified, e.g. "BTC/USDT:USDT"
    market_id: str         # exchange id, e.g. "BTCUSDT"
    side: str              # "long" | "short"
    contracts: float       # absolute base quantity, > 0
    position_side: str     # "BOTH" (one-way) | "LONG" | "SHORT" (hedge)
    entry_price: float
    mark_price: float | None = None


@dataclass(frozen=True)
class OpenOrder:
    id: str
    client_order_id: str | None
    symbol: str
    market_id: str
    side: str
    type: str
    amount: float | None
    reduce_only: bool
    conditional: bool      # lives in the algo/conditional book


@dataclass(frozen=True)
class MarketRules:
    symbol: str
    market_id: str
    amount_step: float | None
    min_qty: float | None
    max_market_qty: float | None   # MARKET_LOT_SIZE maxQty: larger closes must be split
    min_notional: float | None
    price_step: float | None
    contract_size: float


@dataclass(frozen=True)
class ErrorClass:
    kind: str                      # see classify_error
    retry_after_s: float | None = None
    code: int | None = None        # the exchange's own error code when one was found


class ExchangeDataError(ccxt.ExchangeError):
    """The exchange answered with something we cannot interpret as account data. Raised
    instead of guessing, so the caller treats the read as failed."""


# ---------------------------------------------------------------------------- reads

def _num(value, what):
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ExchangeDataError(f"unreadable {what}: {value!r}") from None
    if not math.isfinite(result):
        raise ExchangeDataError(f"non-finite {what}: {value!r}")
    return result


def _opt_num(value):
    if value is None or value == "":
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def load_market_rules(ex):
    """{unified symbol: MarketRules}. Raises on failure (no rules means no safe sizing)."""
    markets = ex.load_markets()
    if not markets:
        raise ExchangeDataError("exchange returned no markets")
    tick_size = ex.precisionMode == ccxt.TICK_SIZE
    rules = {}
    for symbol, market in markets.items():
        precision = market.get("precision") or {}
        limits = market.get("limits") or {}
        amount_step = _step(precision.get("amount"), tick_size)
        price_step = _step(precision.get("price"), tick_size)
        market_limits = limits.get("market") or {}
        amount_limits = limits.get("amount") or {}
        max_market = _opt_num(market_limits.get("max"))
        if max_market is None:
            max_market = _opt_num(amount_limits.get("max"))
        rules[symbol] = MarketRules(
            symbol=symbol,
            market_id=market["id"],
            amount_step=amount_step,
            min_qty=_opt_num(amount_limits.get("min")),
            max_market_qty=max_market,
            min_notional=_opt_num((limits.get("cost") or {}).get("min")),
            price_step=price_step,
            contract_size=_opt_num(market.get("contractSize")) or 1.0,
        )
    return rules


def _step(value, tick_size):
    value = _opt_num(value)
    if value is None:
        return None
    return value if tick_size else 10.0 ** -value


def _unified_symbol(ex, market_id):
    """The linear-contract market for a Binance id. An id we cannot map is returned as is:
    the position is still reported (never dropped), and closing it fails loudly later."""
    candidates = ex.markets_by_id.get(market_id) or []
    for market in candidates:
        if market.get("contract"):
            return market["symbol"]
    return candidates[0]["symbol"] if candidates else market_id


def read_positions(ex):
    """Every non-zero position. Raises on any failure; never returns [] for an error."""
    ex.load_markets()
    if is_binance(ex):
        return _read_binance_positions(ex)
    return _read_unified_positions(ex)


def _read_binance_positions(ex):
    # The raw positionRisk: ccxt's fetch_positions drops positions whose entryPrice is 0.
    rows = ex.fapiPrivateV3GetPositionRisk()
    if not isinstance(rows, list):
        raise ExchangeDataError(f"positionRisk returned {type(rows).__name__}, not a list")
    if rows and any(row.get("symbol") not in ex.markets_by_id for row in rows if isinstance(row, dict)):
        ex.load_markets(True)   # a newly listed symbol; one reload, then report what we have
    positions = []
    for row in rows:
        if not isinstance(row, dict) or "symbol" not in row or "positionAmt" not in row:
            raise ExchangeDataError(f"positionRisk row without symbol/positionAmt: {row!r}")
        amount = _num(row["positionAmt"], "positionAmt")
        if amount == 0:
            continue
        market_id = str(row["symbol"])
        position_side = str(row.get("positionSide") or "BOTH").upper()
        if position_side == "LONG":
            side = "long"
        elif position_side == "SHORT":
            side = "short"
        else:
            side = "long" if amount > 0 else "short"
        positions.append(Position(
            symbol=_unified_symbol(ex, market_id), market_id=market_id, side=side,
            contracts=abs(amount), position_side=position_side,
            entry_price=_opt_num(row.get("entryPrice")) or 0.0,
            mark_price=_opt_num(row.get("markPrice")),
        ))
    return positions


def _read_unified_positions(ex):
    rows = ex.fetch_positions()
    if not isinstance(rows, list):
        raise ExchangeDataError(f"fetch_positions returned {type(rows).__name__}, not a list")
    positions = []
    for row in rows:
        contracts = _num(row.get("contracts") or 0, "contracts")
        if contracts == 0:
            continue
        side = row.get("side")
        if side not in ("long", "short"):
            raise ExchangeDataError(f"position without a side: {row.get('symbol')!r}")
        hedged = bool(row.get("hedged"))
        market = ex.markets.get(row["symbol"]) or {}
        positions.append(Position(
            symbol=row["symbol"], market_id=market.get("id", row["symbol"]), side=side,
            contracts=abs(contracts), position_side=side.upper() if hedged else "BOTH",
            entry_price=_opt_num(row.get("entryPrice")) or 0.0,
            mark_price=_opt_num(row.get("markPrice")),
        ))
    return positions


def _book_params(ex, conditional):
    """ccxt params selecting one order book, or None when the exchange has no separate
    conditional book (only Binance keeps stops in an algo book since December 2025)."""
    if not conditional:
        return {}
    return {"trigger": True} if is_binance(ex) else None


def read_open_orders_book(ex, conditional):
    """Open orders of one book: the normal one, or (conditional=True) the algo/conditional
    one. Separate so that callers can read both books concurrently."""
    ex.load_markets()
    params = _book_params(ex, conditional)
    if params is None:
        return []
    orders = []
    for order in ex.fetch_open_orders(None, None, None, params):
        symbol = order.get("symbol") or ""
        market = ex.markets.get(symbol) or {}
        info = order.get("info") or {}
        orders.append(OpenOrder(
            id=str(order.get("id")),
            client_order_id=order.get("clientOrderId"),
            symbol=symbol,
            market_id=market.get("id") or str(info.get("symbol", symbol)),
            side=order.get("side") or "",
            type=order.get("type") or "",
            amount=_opt_num(order.get("amount")),
            reduce_only=bool(order.get("reduceOnly")),
            conditional=conditional,
        ))
    return orders


def read_open_orders(ex):
    """Open orders of the normal book and, on Binance, the algo/conditional book."""
    return read_open_orders_book(ex, False) + read_open_orders_book(ex, True)


# ---------------------------------------------------------------------------- writes

def cancel_book(ex, symbol, conditional):
    """Cancel one book for symbol (one request); raises on failure. A no-op for the
    conditional book of an exchange that has none."""
    ex.load_markets()
    params = _book_params(ex, conditional)
    if params is not None:
        ex.cancel_all_orders(symbol, params)


def cancel_all_orders(ex, symbol):
    """Cancel both books for symbol. Both cancels are always attempted; the first error is
    raised afterwards so the caller knows the symbol may still have resting orders."""
    first_error = None
    for conditional in (False, True):
        try:
            cancel_book(ex, symbol, conditional)
        except Exception as exc:  # noqa: BLE001 - re-raised below after the other book
            # Keep going: the other book must be cancelled even if this one failed.
            if first_error is None:
                first_error = exc
    if first_error is not None:
        raise first_error


def place_close_order(ex, symbol, side, amount, position_side, client_order_id):
    """One reduce-only market order. side is the ORDER side ("sell" closes a long).
    One-way (position_side "BOTH"): reduceOnly=True, so it can never open or flip exposure.
    Hedge ("LONG"/"SHORT"): Binance rejects reduceOnly there (-1106); positionSide with the
    opposite order side is what closes, so the order side is checked against it here."""
    if side not in ("buy", "sell"):
        raise ValueError(f"order side must be 'buy' or 'sell', not {side!r}")
    position_side = (position_side or "BOTH").upper()
    params = {}
    if client_order_id:
        params["newClientOrderId" if is_binance(ex) else "clientOrderId"] = client_order_id
    if position_side == "BOTH":
        params["reduceOnly"] = True
    elif position_side in ("LONG", "SHORT"):
        closing_side = "sell" if position_side == "LONG" else "buy"
        if side != closing_side:
            raise ValueError(f"a {side} order would add to a {position_side} hedge position")
        params["positionSide"] = position_side
    else:
        raise ValueError(f"unknown position_side {position_side!r}")
    order = ex.create_order(symbol, "market", side, amount, None, params)
    return {
        "id": None if order.get("id") is None else str(order.get("id")),
        "status": order.get("status"),
        "filled": _opt_num(order.get("filled")) or 0.0,
        "amount": _opt_num(order.get("amount")),
    }


def arm_deadman(ex, symbol, countdown_ms):
    """Binance's countdownCancelAll: if not re-armed within countdown_ms, the exchange itself
    cancels every open order of symbol. 0 disarms."""
    if not is_binance(ex):
        raise ccxt.NotSupported(f"{ex.id}: no dead-man switch supported by eexit")
    ex.load_markets()
    market_id = ex.market(symbol)["id"]
    ex.fapiPrivatePostCountdownCancelAll({"symbol": market_id, "countdownTime": int(countdown_ms)})


# ---------------------------------------------------------------------------- errors

_CODE_RE = re.compile(r'"code"\s*:\s*"?(-?\d+)')
_RATE_CODES = {-1003, -1015}
_AUTH_CODES = {-2014, -2015, -1022, -2008}
_TRANSIENT_CODES = {-1000, -1001, -1006, -1007, -1008, -1021}
_POSITION_SIDE_CODES = {-4061, -1106}
_REDUCE_ONLY_CODES = {-2022}
_DEFAULT_BAN_WAIT_S = 60.0
_DEFAULT_RATE_WAIT_S = 1.0


def error_code(exc):
    match = _CODE_RE.search(str(exc))
    return int(match.group(1)) if match else None


def classify_error(exc, ex=None):
    """What kind of failure exc is. Classifies by Binance code in the message first (against
    a local URL ccxt maps codes with its generic table, SPEC §5), then by ccxt class.
    ex, when given, supplies the response headers for Retry-After.

    kinds: rate_limited, transient, reduce_only_rejected, position_side, auth, rejected,
    unknown. An order whose outcome is unknown (timeout) is "transient": the caller must
    re-read the account before sending another."""
    code = error_code(exc)
    text = str(exc)
    # Codes first: they mean the same against any URL, while ccxt's class depends on it.
    if code in _RATE_CODES:
        return ErrorClass("rate_limited", _retry_after(exc, ex, text), code)
    if code in _REDUCE_ONLY_CODES:
        return ErrorClass("reduce_only_rejected", None, code)
    if code in _POSITION_SIDE_CODES:
        return ErrorClass("position_side", None, code)
    if code in _AUTH_CODES:
        # ccxt turns -2015 into DDoSProtection once a key has worked; it is still a key problem.
        return ErrorClass("auth", None, code)
    if code in _TRANSIENT_CODES:
        return ErrorClass("transient", None, code)
    if isinstance(exc, ccxt.DDoSProtection) or " 418 " in text or " 429 " in text:
        return ErrorClass("rate_limited", _retry_after(exc, ex, text), code)
    if isinstance(exc, (ccxt.AuthenticationError, ccxt.PermissionDenied, ccxt.AccountSuspended)):
        return ErrorClass("auth", None, code)
    if isinstance(exc, (ccxt.NetworkError, ccxt.InvalidNonce, ConnectionError, TimeoutError)):
        return ErrorClass("transient", None, code)
    if code is not None or isinstance(exc, ccxt.ExchangeError):
        return ErrorClass("rejected", None, code)
    return ErrorClass("unknown", None, code)


def _retry_after(exc, ex, text):
    headers = getattr(ex, "last_response_headers", None) or {}
    for key, value in headers.items():
        if key.lower() == "retry-after":
            seconds = _opt_num(value)
            if seconds is not None and seconds >= 0:
                return seconds
    if " 418 " in text:
        return _DEFAULT_BAN_WAIT_S
    return _DEFAULT_RATE_WAIT_S

"""What every venue module shares: the plain data a venue returns, and the helpers that turn
ccxt's answers into it. No venue names here (see eexit/venues/__init__.py for the interface).

Every read RAISES on failure: an exchange error is never an empty account (SPEC §4.1).
"""

import math
import re
from dataclasses import dataclass

from eexit.ccxt_lite import ccxt   # the stand-in: only the exchanges built (eexit/ccxt_lite.py)


@dataclass(frozen=True)
class Position:
    symbol: str            # ccxt unified, e.g. "BTC/USDT:USDT"
    market_id: str         # exchange id, e.g. "BTCUSDT"
    side: str              # "long" | "short"
    contracts: float       # absolute quantity in the venue's order unit, > 0
    position_side: str     # "BOTH" (one-way) | "LONG" | "SHORT" (hedge)
    entry_price: float
    mark_price: float | None = None
    margin_mode: str | None = None   # "cross" | "isolated" where the close order must say it


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
    max_market_qty: float | None   # the venue's MARKET order maximum: larger closes are split
    min_notional: float | None
    price_step: float | None
    contract_size: float


@dataclass(frozen=True)
class ErrorClass:
    kind: str                      # see classify
    retry_after_s: float | None = None
    code: int | None = None        # the venue's own error code when one was found


class ExchangeDataError(ccxt.ExchangeError):
    """The exchange answered with something we cannot interpret as account data. Raised
    instead of guessing, so the caller treats the read as failed."""


@dataclass(frozen=True)
class UnreadableRow:
    """A position row the venue answered that cannot be read (a field missing or not a
    number): its exposure is unknown. It is never dropped (a FLAT over it would be false) and
    never fails the rows beside it (those are still closed): it is reported as not flat."""
    segment: str
    symbol: str        # the row's instrument as far as it can be read, else "row <n>"
    why: str

    def describe(self):
        return f"{self.segment}:{self.symbol}:{self.why}"


def read_rows(ex, rows, segment, id_key, parse, category=None):
    """(positions, unreadable) of one segment's rows: parse(row) -> Position, or None for a
    zero row; a row parse cannot read becomes an UnreadableRow named by its id_key field."""
    positions, unreadable = [], []
    for index, row in enumerate(rows):
        try:
            position = parse(row)
        except Exception as exc:  # noqa: BLE001 - the row is reported unreadable, never dropped
            # Not raised: one bad row must not keep the readable positions beside it open.
            symbol = unified_symbol(ex, str(row[id_key]), category) if row.get(id_key) else f"row {index}"
            unreadable.append(UnreadableRow(segment, symbol, str(exc)[:100]))
            continue
        if position is not None:
            positions.append(position)
    return positions, unreadable


def num(value, what):
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ExchangeDataError(f"unreadable {what}: {value!r}") from None
    if not math.isfinite(result):
        raise ExchangeDataError(f"non-finite {what}: {value!r}")
    return result


def opt_num(value):
    """num(value), or None where the value is missing, empty, unreadable or not finite."""
    try:
        return None if value is None or value == "" else num(value, "")
    except ExchangeDataError:
        return None


def rows_of(value, what):
    if not isinstance(value, list):
        raise ExchangeDataError(f"{what} returned {type(value).__name__}, not a list")
    for row in value:
        if not isinstance(row, dict):
            raise ExchangeDataError(f"{what} row is not an object: {row!r}")
    return value


def in_segment(segment, read):
    """read() with any failure tagged by the account segment it concerns, so a report can
    name what could not be read (the exception itself is re-raised: unknown is never empty)."""
    try:
        return read()
    except Exception as exc:
        if getattr(exc, "eexit_segment", None) is None:
            exc.eexit_segment = segment
        raise


def load_market_rules(ex, max_market_qty=None):
    """{unified symbol: MarketRules} of the contract markets. max_market_qty(market), when
    given, returns the venue's market-order maximum where ccxt does not map it. Raises on
    failure (no rules means no safe sizing)."""
    markets = ex.load_markets()
    if not markets:
        raise ExchangeDataError("exchange returned no markets")
    tick_size = ex.precisionMode == ccxt.TICK_SIZE
    rules = {}
    for symbol, market in markets.items():
        precision = market.get("precision") or {}
        limits = market.get("limits") or {}
        amount_limits = limits.get("amount") or {}
        max_market = max_market_qty(market) if max_market_qty else None
        if max_market is None:
            max_market = opt_num((limits.get("market") or {}).get("max"))
        if max_market is None:
            max_market = opt_num(amount_limits.get("max"))
        rules[symbol] = MarketRules(
            symbol=symbol, market_id=market["id"],
            amount_step=_step(precision.get("amount"), tick_size),
            min_qty=opt_num(amount_limits.get("min")),
            max_market_qty=max_market,
            min_notional=opt_num((limits.get("cost") or {}).get("min")),
            price_step=_step(precision.get("price"), tick_size),
            contract_size=opt_num(market.get("contractSize")) or 1.0,
        )
    return rules


def _step(value, tick_size):
    value = opt_num(value)
    if value is None:
        return None
    return value if tick_size else 10.0 ** -value


def unified_symbol(ex, market_id, category=None):
    """The contract market for a venue id (of `category`, "linear"/"inverse", when given). An
    id we cannot map is returned as is: the position is still reported (never dropped), and
    closing it fails loudly later."""
    candidates = [m for m in ex.markets_by_id.get(market_id) or [] if m.get("contract")]
    for market in candidates:
        if category is None or market.get(category):
            return market["symbol"]
    return candidates[0]["symbol"] if candidates else market_id


def closing_side_ok(side, position_side):
    """Hedge closes carry no reduce-only guarantee on every venue: the order side is checked
    against the position side here, so a close can never add to a hedge position."""
    if side not in ("buy", "sell"):
        raise ValueError(f"order side must be 'buy' or 'sell', not {side!r}")
    position_side = (position_side or "BOTH").upper()
    if position_side not in ("BOTH", "LONG", "SHORT"):
        raise ValueError(f"unknown position_side {position_side!r}")
    if position_side != "BOTH" and side != ("sell" if position_side == "LONG" else "buy"):
        raise ValueError(f"a {side} order would add to a {position_side} hedge position")
    return position_side


# ---------------------------------------------------------------------------- errors

@dataclass(frozen=True)
class ErrorTable:
    """A venue's error codes, by kind. code_re finds the code in ccxt's exception text (ccxt
    puts the venue's body there); codes are tried before ccxt's class, because ccxt's class
    depends on the URL and its tables (SPEC §5)."""
    code_re: re.Pattern
    rate: frozenset
    auth: frozenset
    transient: frozenset
    position_side: frozenset = frozenset()
    reduce_only: frozenset = frozenset()


def classify(exc, table, retry_after):
    """kinds: rate_limited, transient, reduce_only_rejected, position_side, auth, rejected,
    unknown. An order whose outcome is unknown (timeout) is "transient": the caller must
    re-read the account before sending another. retry_after() gives the venue's hint."""
    text = str(exc)
    codes = [int(code) for code in table.code_re.findall(text) if code not in ("0", "")]
    code = codes[-1] if codes else None
    for codes, kind in ((table.rate, "rate_limited"), (table.reduce_only, "reduce_only_rejected"),
                        (table.position_side, "position_side"), (table.auth, "auth"),
                        (table.transient, "transient")):
        if code in codes:
            return ErrorClass(kind, retry_after() if kind == "rate_limited" else None, code)
    if isinstance(exc, (ccxt.DDoSProtection, ccxt.RateLimitExceeded)) or " 418 " in text or " 429 " in text:
        return ErrorClass("rate_limited", retry_after(), code)
    if isinstance(exc, (ccxt.AuthenticationError, ccxt.PermissionDenied, ccxt.AccountSuspended)):
        return ErrorClass("auth", None, code)
    if isinstance(exc, (ccxt.NetworkError, ccxt.InvalidNonce, ConnectionError, TimeoutError)):
        return ErrorClass("transient", None, code)
    if code is not None or isinstance(exc, ccxt.ExchangeError):
        return ErrorClass("rejected", None, code)
    return ErrorClass("unknown", None, code)


def item_error(venue_id, body):
    """A rejected order of a batch as the exception a single order would have raised: the
    venue's per-order code in the text, so classify() sorts it the same way."""
    return ccxt.ExchangeError(f"{venue_id} {body}")


def batch_results(rows, count, what, accepted):
    """Per-order results of one batch answer, in request order: the venue's order id, or an
    exception (item_error). A row count other than the request's is unreadable: raise."""
    rows = rows_of(rows, what)
    if len(rows) != count:
        raise ExchangeDataError(f"{what} answered {len(rows)} results for {count} orders")
    return [accepted(row) for row in rows]


def header(ex, name):
    headers = getattr(ex, "last_response_headers", None) or {}
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None

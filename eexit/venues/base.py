"""What every venue module shares: the plain data a venue returns, and the helpers that turn
ccxt's answers into it. No venue names here (see eexit/venues/__init__.py for the interface).

Every read RAISES on failure: an exchange error is never an empty account (SPEC §4.1).
"""

import math
import re
import time
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
    """What cancelling a book needs of an order (its side, type and size never matter: the
    whole book goes), and whether it was reduce-only (a reader's check)."""
    id: str
    symbol: str
    market_id: str
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


def load_market_rules(ex, market_max=None):
    """{unified symbol: MarketRules} of the contract markets. market_max: the path in ccxt's
    market to the venue's market-order maximum where ccxt does not map it (the venue's
    MARKET_MAX), tried before limits.market.max and limits.amount.max. Raises on failure (no
    rules means no safe sizing)."""
    markets = ex.load_markets()
    if not markets:
        raise ExchangeDataError("exchange returned no markets")
    if ex.precisionMode != ccxt.TICK_SIZE:
        # Every supported venue gives steps (ccxt 4.5); digits read as steps would mis-size every close.
        raise ExchangeDataError(f"{ex.id}: ccxt precision mode {ex.precisionMode} is not tick size")
    maxima = [path for path in (market_max, ("limits", "market", "max"), ("limits", "amount", "max")) if path]
    rules = {}
    for symbol, market in markets.items():
        rules[symbol] = MarketRules(
            symbol=symbol, market_id=market["id"],
            amount_step=_at(market, "precision", "amount"),
            min_qty=_at(market, "limits", "amount", "min"),
            max_market_qty=next((q for q in (_at(market, *path) for path in maxima) if q is not None), None),
            min_notional=_at(market, "limits", "cost", "min"),
            price_step=_at(market, "precision", "price"),
            contract_size=_at(market, "contractSize") or 1.0,
        )
    return rules


def _at(tree, *path):
    """opt_num of the value at path in nested objects; None where a step is missing."""
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return opt_num(tree)


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
    wait_header: str = "Retry-After"   # where a rate limit's answer says how long to wait:
    wait_until_ms: bool = False        # seconds, or (True) the window's end in epoch ms
    ban_wait_s: float = 1.0            # the wait without a hint after a 418 (an IP ban)


def retry_after(exc, ex, table):
    """Seconds to wait after a rate limit: the venue's hint in the last answer's headers,
    else table.ban_wait_s after a 418, else 1 s."""
    hint = opt_num(header(ex, table.wait_header))
    if hint is not None and table.wait_until_ms:
        return min(max(0.0, hint / 1000.0 - time.time()), 60.0)
    if hint is not None and hint >= 0:
        return hint
    return table.ban_wait_s if " 418 " in str(exc) else 1.0


def classify(exc, table, ex=None):
    """kinds: rate_limited, transient, reduce_only_rejected, position_side, auth, rejected,
    unknown. An order whose outcome is unknown (timeout) is "transient": the caller must
    re-read the account before sending another. ex, when given, holds the retry hint."""
    text = str(exc)
    found = [int(code) for code in table.code_re.findall(text) if code not in ("0", "")]
    code = found[-1] if found else None     # the venue's own code: the last one in the text
    for codes, kind in ((table.rate, "rate_limited"), (table.reduce_only, "reduce_only_rejected"),
                        (table.position_side, "position_side"), (table.auth, "auth"),
                        (table.transient, "transient")):
        if code in codes:
            return ErrorClass(kind, retry_after(exc, ex, table) if kind == "rate_limited" else None, code)
    if isinstance(exc, (ccxt.DDoSProtection, ccxt.RateLimitExceeded)) or " 418 " in text or " 429 " in text:
        return ErrorClass("rate_limited", retry_after(exc, ex, table), code)
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
    """The last answer's header name (any case), or None."""
    headers = getattr(ex, "last_response_headers", None) or {}
    return next((value for key, value in headers.items() if key.lower() == name.lower()), None)

"""OKX v5 derivatives (ccxt `okx`), through the raw v5 endpoints.

Account segments: instType SWAP and FUTURES (perpetual and dated contracts, every settle
currency); positions from /api/v5/account/positions (one page holds all), regular orders
from /trade/orders-pending (100 a page, older pages via `after`), conditional orders from
their own book /trade/orders-algo-pending for ordType "conditional,oco", "trigger" and
"move_order_stop". Cancels by id (ccxt has no cancel_all_orders for okx):
/trade/cancel-batch-orders (20 a request) and /trade/cancel-algos (10). Hedge
("long_short_mode"): posSide long/short, lower case; net mode: no posSide. tdMode must be
the position's margin mode (cross/isolated). Market maximum: maxMktSz (ccxt maps only
maxLmtSz). Quantities are contracts (sz, pos). Client ids (clOrdId): 1-32 letters/digits.
Dead-man switch: /trade/cancel-all-after, ACCOUNT-wide, timeOut 10-120 s (0 disarms).
Credentials: key, secret and passphrase. Errors: envelope `code` (50011 rate limit, HTTP
429, no retry hint: eexit waits 1 s, the limits' windows are 1-2 s) plus per-order
`sCode`/`sMsg`; a batch's code "2" (partial) is checked item by item here.
"""

import math
import re

from . import base

ID = "okx"
SEGMENTS = ("SWAP", "FUTURES")
# The algo book answers one ordType per request (conditional and oco together): one "book"
# per request, so the EEW reads them all in parallel.
BOOKS = ("regular", "conditional,oco", "trigger", "move_order_stop")
NEEDS_PASSWORD = True
ORDER_LIMITS = "60/2"        # /trade/order: 60 per 2 s (per instrument; applied account-wide)
DEADMAN = "cancel-all-after"
BATCH_ORDERS = 20            # /trade/batch-orders
DEADMAN_RANGE_S = (10, 120)   # cancel-all-after accepts 0 or 10-120 s: anything else is refused at start
MARKET_MAX = ("info", "maxMktSz")     # ccxt maps only maxLmtSz
PING = "publicGetPublicTime"
_ORDER_PAGE = 100
_GONE = {"51400", "51401", "51402", "51403"}    # cancel: already filled, cancelled or unknown
_BATCH = {False: 20, True: 10}

ERRORS = base.ErrorTable(
    code_re=re.compile(r'"s?[cC]ode"\s*:\s*"(\d+)"'),
    rate=frozenset({50011, 50061}),
    auth=frozenset({50100, 50101, 50103, 50104, 50105, 50106, 50107, 50110, 50111, 50112, 50113,
                    50114, 50120}),
    transient=frozenset({50001, 50004, 50013, 50026, 50102}),
    reduce_only=frozenset({51169}),
)


def configure(ex):
    ex.options["fetchMarkets"] = {"types": ["swap", "future"]}


def data(response, what):
    return base.rows_of((response or {}).get("data"), what)


def check_key(ex):
    position_rows(ex, "SWAP")


def read_positions(ex, segment):
    """(positions, unreadable rows): a row without a readable instId or pos is unreadable (never "no
    position": a missing pos was once read as 0, a false FLAT with 70 contracts open)."""
    ex.load_markets()
    rows = position_rows(ex, segment)
    return base.read_rows(ex, rows, segment, "instId", lambda row: position(ex, segment, row))


def position_rows(ex, segment):
    """The raw rows of /account/positions for one instType (one page holds all)."""
    return data(ex.privateGetAccountPositions({"instType": segment}), "account/positions")


def position(ex, segment, row):
    """The Position of one raw row, None when it is zero; raises when it cannot be read."""
    if not row.get("instId"):
        raise base.ExchangeDataError("position row without an instId")
    amount = base.num(row.get("pos"), "pos")
    if amount == 0:
        return None
    pos_side = str(row.get("posSide") or "net")
    side = {"long": "long", "short": "short"}.get(pos_side, "long" if amount > 0 else "short")
    market_id = str(row["instId"])
    return base.Position(
        symbol=base.unified_symbol(ex, market_id), market_id=market_id, side=side,
        contracts=abs(amount), position_side={"long": "LONG", "short": "SHORT"}.get(pos_side, "BOTH"),
        entry_price=base.opt_num(row.get("avgPx")) or 0.0, mark_price=base.opt_num(row.get("markPx")),
        margin_mode=str(row.get("mgnMode") or "cross"))


def pages(call, params, id_key, what):
    """Every row of a list read newest first, 100 a page: the next page is the one `after` the
    last row's id_key. A full page whose last row has none raises (never the first page again)."""
    rows, after = [], None
    while True:
        page = data(call(dict(params, limit=_ORDER_PAGE, **({"after": after} if after else {}))), what)
        rows.extend(page)
        if len(page) < _ORDER_PAGE:
            return rows
        after = page[-1].get(id_key)
        if not after:
            raise base.ExchangeDataError(f"{what}: a full page without a {id_key} to go on from")


def read_orders(ex, segment, book):
    ex.load_markets()
    conditional = book != "regular"
    if conditional:
        rows = pages(ex.privateGetTradeOrdersAlgoPending, {"instType": segment, "ordType": book},
                     "algoId", "algo-pending")
    else:
        rows = pages(ex.privateGetTradeOrdersPending, {"instType": segment}, "ordId", "orders-pending")
    return [base.OpenOrder(
        id=str(row.get("algoId" if conditional else "ordId")),
        symbol=base.unified_symbol(ex, str(row.get("instId"))), market_id=str(row.get("instId")),
        reduce_only=str(row.get("reduceOnly")) == "true", conditional=conditional) for row in rows]


def _check_items(response, what):
    """Raise unless every item of a batch answer succeeded (or names an order already gone)."""
    failed = [row for row in data(response, what) if str(row.get("sCode", "0")) not in {"0"} | _GONE]
    if failed:
        raise base.ExchangeDataError(f"{what}: " + ", ".join(
            f'{{"sCode": "{row.get("sCode")}", "sMsg": {row.get("sMsg")!r}}}' for row in failed[:5]))


def cancel_book(ex, symbol, conditional, orders=()):
    """Cancel by id what the read saw (OKX has no cancel-all per instrument)."""
    key, call = ("algoId", ex.privatePostTradeCancelAlgos) if conditional else \
        ("ordId", ex.privatePostTradeCancelBatchOrders)
    items = [{"instId": order.market_id, key: order.id} for order in orders]
    for start in range(0, len(items), _BATCH[conditional]):
        _check_items(call(items[start:start + _BATCH[conditional]]), "cancel")


def place_closes(ex, orders):
    """Up to BATCH_ORDERS closes in one request; per order its ordId or the exception its
    sCode means. A batch failing as a whole (envelope code "1": every item refused) raises
    from ccxt, and then every order of it counts as refused with that answer."""
    ex.load_markets()
    bodies = [_close_body(ex, o.symbol, o.side, o.amount, o.position_side, o.client_order_id, o.margin_mode)
              for o in orders]
    return base.batch_results(data(ex.privatePostTradeBatchOrders(bodies), "batch-orders"), len(bodies),
                              "batch-orders", lambda row: str(row.get("ordId")) if str(row.get("sCode")) == "0"
                              else base.item_error(ID, f'{{"sCode": "{row.get("sCode")}", "sMsg": {row.get("sMsg")!r}}}'))


def _close_body(ex, symbol, side, amount, position_side, client_order_id, margin_mode):
    position_side = base.closing_side_ok(side, position_side)
    body = {"instId": ex.market(symbol)["id"], "tdMode": margin_mode or "cross", "side": side,
            "ordType": "market", "sz": ex.amount_to_precision(symbol, amount), "reduceOnly": True}
    if position_side != "BOTH":
        body["posSide"] = position_side.lower()
    if client_order_id:
        body["clOrdId"] = client_order_id
    return body


def place_close(ex, symbol, side, amount, position_side, client_order_id, margin_mode=None):
    """reduceOnly in both modes, tdMode = the position's margin mode; posSide only in hedge."""
    ex.load_markets()
    response = ex.privatePostTradeOrder(_close_body(ex, symbol, side, amount, position_side,
                                                    client_order_id, margin_mode))
    _check_items(response, "order")
    [row] = data(response, "order")[:1] or [{}]
    return {"id": None if row.get("ordId") is None else str(row["ordId"]), "status": "open",
            "filled": 0.0, "amount": float(amount)}


def arm_deadman(ex, symbol, countdown_ms):
    """Account-wide: every order of the account is cancelled unless re-armed in time."""
    seconds = 0 if countdown_ms <= 0 else math.ceil(countdown_ms / 1000)   # range checked at start
    ex.privatePostTradeCancelAllAfter({"timeOut": str(seconds)})

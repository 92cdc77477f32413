"""Binance USDⓈ-M futures (ccxt `binanceusdm`).

Account: one segment, every USDⓈ-M contract (USDT- and USDC-margined) the key holds, read
with the raw positionRisk (ccxt's fetch_positions drops positions whose entryPrice is 0).
Books: the normal book and, since December 2025, the algo book for conditional orders
(`trigger: True` selects it in ccxt). Hedge mode: positionSide LONG/SHORT, reduceOnly is
rejected there (-1106). Market maximum: MARKET_LOT_SIZE maxQty (ccxt maps it to
limits.market.max). Dead-man switch: countdownCancelAll per symbol. Client ids: 36 of
[.A-Z:/a-z0-9_-]. Errors: `"code": -NNNN` in the body.
"""

import re

from . import base

ID = "binanceusdm"
SEGMENTS = ("usdm",)
BOOKS = ("regular", "conditional")
NEEDS_PASSWORD = False
# Per-account order limits. Sliding windows never exceed the exchange's fixed windows, yet let
# a whole burst go at once: 300 closes leave in one round, not over 10 s.
ORDER_LIMITS = "300/10,1200/60"
DEADMAN = "countdownCancelAll"
BATCH_ORDERS = 5             # POST /fapi/v1/batchOrders
DEADMAN_RANGE_S = None   # no bound beyond EEXIT_DEADMAN_S's own
MARKET_MAX = None        # MARKET_LOT_SIZE maxQty: ccxt maps it to limits.market.max
PING = "fapiPublicGetTime"   # GET /fapi/v1/time, weight 1: keeps a connection warm

ERRORS = base.ErrorTable(
    code_re=re.compile(r'"code"\s*:\s*"?(-\d+)'),
    rate=frozenset({-1003, -1015}),
    # ccxt turns -2015 into DDoSProtection once a key has worked; it is still a key problem.
    auth=frozenset({-2014, -2015, -1022, -2008}),
    transient=frozenset({-1000, -1001, -1006, -1007, -1008, -1021}),
    position_side=frozenset({-4061, -1106}),
    reduce_only=frozenset({-2022}),
    ban_wait_s=60.0,
)


def configure(ex):
    open_orders = ex.options.get("fetchOpenOrders")
    if not isinstance(open_orders, dict):
        open_orders = ex.options["fetchOpenOrders"] = {}
    open_orders["warnWithoutSymbol"] = False


def check_key(ex):
    ex.fetch_balance()       # GET /fapi/v3/account: signed, read-only, no position weight


def read_positions(ex, segment):
    """(positions, unreadable rows): a row without a readable symbol or positionAmt is unreadable."""
    ex.load_markets()
    rows = position_rows(ex, segment)
    if any(row.get("symbol") not in ex.markets_by_id for row in rows):
        ex.load_markets(True)   # a newly listed symbol; one reload, then report what we have
    return base.read_rows(ex, rows, segment, "symbol", lambda row: position(ex, segment, row))


def position_rows(ex, segment):
    """The raw rows of GET /fapi/v3/positionRisk (the one segment: every USDⓈ-M contract)."""
    return base.rows_of(ex.fapiPrivateV3GetPositionRisk(), "positionRisk")


def position(ex, segment, row):
    """The Position of one raw row, None when it is zero; raises when it cannot be read."""
    if not row.get("symbol"):
        raise base.ExchangeDataError("positionRisk row without a symbol")
    amount = base.num(row.get("positionAmt"), "positionAmt")
    if amount == 0:
        return None
    position_side = str(row.get("positionSide") or "BOTH").upper()
    side = {"LONG": "long", "SHORT": "short"}.get(position_side, "long" if amount > 0 else "short")
    market_id = str(row["symbol"])
    return base.Position(
        symbol=base.unified_symbol(ex, market_id), market_id=market_id, side=side,
        contracts=abs(amount), position_side=position_side,
        entry_price=base.opt_num(row.get("entryPrice")) or 0.0,
        mark_price=base.opt_num(row.get("markPrice")))


def read_orders(ex, segment, book):
    conditional = book == "conditional"
    ex.load_markets()
    orders = []
    for order in ex.fetch_open_orders(None, None, None, {"trigger": True} if conditional else {}):
        symbol = order.get("symbol") or ""
        market = ex.markets.get(symbol)
        orders.append(base.OpenOrder(
            id=str(order.get("id")), symbol=symbol, market_id=market["id"] if market else symbol,
            reduce_only=bool(order.get("reduceOnly")), conditional=conditional))
    return orders


def _order_params(ex, order):
    position_side = base.closing_side_ok(order.side, order.position_side)
    params = {"symbol": ex.market(order.symbol)["id"], "side": order.side.upper(), "type": "MARKET",
              "quantity": ex.amount_to_precision(order.symbol, order.amount)}
    if order.client_order_id:
        params["newClientOrderId"] = order.client_order_id
    if position_side == "BOTH":
        params["reduceOnly"] = "true"
    else:
        params["positionSide"] = position_side
    return params


def place_closes(ex, orders):
    """Up to BATCH_ORDERS closes (same rules as place_close) in one request; per order the
    order id or the exception its own rejection would be (`{"code":-2022,...}`)."""
    ex.load_markets()
    items = [_order_params(ex, order) for order in orders]
    rows = ex.fapiPrivatePostBatchOrders({"batchOrders": items})
    return base.batch_results(rows, len(items), "batchOrders", lambda row: str(row["orderId"]) if "orderId" in row
                              else base.item_error(ID, f'{{"code":{row.get("code")},"msg":{row.get("msg")!r}}}'))


def cancel_book(ex, symbol, conditional, orders=()):
    ex.load_markets()
    ex.cancel_all_orders(symbol, {"trigger": True} if conditional else {})


def place_close(ex, symbol, side, amount, position_side, client_order_id, margin_mode=None):
    """One-way: reduceOnly, so it can never open or flip exposure. Hedge: positionSide with
    the closing side (Binance never lets such an order exceed the position)."""
    position_side = base.closing_side_ok(side, position_side)
    params = {"newClientOrderId": client_order_id} if client_order_id else {}
    if position_side == "BOTH":
        params["reduceOnly"] = True
    else:
        params["positionSide"] = position_side
    order = ex.create_order(symbol, "market", side, amount, None, params)
    return {"id": None if order.get("id") is None else str(order.get("id")),
            "status": order.get("status"), "filled": base.opt_num(order.get("filled")) or 0.0,
            "amount": base.opt_num(order.get("amount"))}


def arm_deadman(ex, symbol, countdown_ms):
    """If not re-armed within countdown_ms, Binance itself cancels every open order of symbol
    (both books). 0 disarms."""
    ex.load_markets()
    ex.fapiPrivatePostCountdownCancelAll({"symbol": ex.market(symbol)["id"],
                                          "countdownTime": int(countdown_ms)})

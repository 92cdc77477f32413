"""Bybit v5 derivatives (ccxt `bybit`), through the raw v5 endpoints.

ccxt's unified calls read only linear/USDT without a symbol and check the account type with
extra private calls (SPEC §7); the raw endpoints say exactly what is read:

Account segments: linear/USDT, linear/USDC (settleCoin per request) and inverse; positions
from /v5/position/list (200 a page), orders from /v5/order/realtime (50 a page), both
followed through nextPageCursor. Books: orderFilter=Order (regular) and StopOrder
(conditional), cancelled by /v5/order/cancel-all with the same filter. Hedge mode:
positionIdx 1 (long) / 2 (short), 0 one-way; reduceOnly is accepted in both. Market maximum:
lotSizeFilter.maxMktOrderQty, which ccxt does not map. Client ids (orderLinkId): up to 36.
Dead-man switch: none used. Bybit's DCP (/v5/order/disconnected-cancel-all) cancels orders
when the PRIVATE WEBSOCKET disconnects; it is not a countdown over REST, and eexit holds no
websocket, so arming it would promise protection that never fires.
Errors: HTTP 200 with retCode/retMsg; rate limits are retCode 10006/10018 with the window's
end in X-Bapi-Limit-Reset-Timestamp (ms). Markets: linear and inverse instruments only
(public); no /v5/asset/coin/query-info, so the key needs trading permission only.
"""

import re

from . import base

ID = "bybit"
SEGMENTS = ("linear/USDT", "linear/USDC", "inverse")
BOOKS = ("regular", "conditional")
NEEDS_PASSWORD = False
ORDER_LIMITS = "10/1"        # /v5/order/create default per UID for linear and inverse: 10/s
DEADMAN = None
BATCH_ORDERS = 10            # /v5/order/create-batch, linear and inverse: 10 a request
DEADMAN_RANGE_S = None   # no bound beyond EEXIT_DEADMAN_S's own
MARKET_MAX = ("info", "lotSizeFilter", "maxMktOrderQty")     # ccxt does not map it
PING = "publicGetV5MarketTime"
_POSITION_PAGE, _ORDER_PAGE = 200, 50
_BOOK = {False: "Order", True: "StopOrder"}
_IDX = {"BOTH": 0, "LONG": 1, "SHORT": 2}

ERRORS = base.ErrorTable(
    code_re=re.compile(r'"retCode"\s*:\s*(\d+)'),
    rate=frozenset({10006, 10018}),
    auth=frozenset({10003, 10004, 10005, 10007, 10009, 10010, 33004}),
    transient=frozenset({10000, 10002, 10016, 10019}),
    reduce_only=frozenset({110017}),
    wait_header="X-Bapi-Limit-Reset-Timestamp",
    wait_until_ms=True,
)


def configure(ex):
    ex.options["fetchMarkets"] = {"types": ["linear", "inverse"]}


def _request(segment):
    category, _, settle = segment.partition("/")
    return {"category": category, **({"settleCoin": settle} if settle else {})}


def pages(call, params, limit, what):
    """Every row of a cursor-paginated v5 list."""
    rows, cursor = [], None
    while True:
        page = dict(params, limit=limit, **({"cursor": cursor} if cursor else {}))
        result = (call(page) or {}).get("result")
        if not isinstance(result, dict):
            raise base.ExchangeDataError(f"{what} answered without a result object")
        rows.extend(base.rows_of(result.get("list"), what))
        cursor = result.get("nextPageCursor") or None
        if cursor is None:
            return rows


def check_key(ex):
    ex.privateGetV5PositionList({"category": "linear", "settleCoin": "USDT", "limit": 1})


def read_positions(ex, segment):
    """(positions, unreadable rows): a row without a readable symbol, size or (size not 0) side is
    unreadable; the rows beside it are read."""
    ex.load_markets()
    category = _request(segment)["category"]
    rows = position_rows(ex, segment)
    return base.read_rows(ex, rows, segment, "symbol", lambda row: position(ex, segment, row), category)


def position_rows(ex, segment):
    """The raw rows of /v5/position/list for one segment, every page."""
    return pages(ex.privateGetV5PositionList, _request(segment), _POSITION_PAGE, "position/list")


def position(ex, segment, row):
    """The Position of one raw row, None when it is zero; raises when it cannot be read."""
    if not row.get("symbol"):
        raise base.ExchangeDataError("position row without a symbol")
    size = base.num(row.get("size"), "size")
    if size == 0:
        return None
    side = {"Buy": "long", "Sell": "short"}.get(row.get("side"))
    if side is None:
        raise base.ExchangeDataError(f"unreadable side: {row.get('side')!r}")
    idx = str(row.get("positionIdx", "0"))
    return base.Position(
        symbol=base.unified_symbol(ex, str(row["symbol"]), _request(segment)["category"]),
        market_id=str(row["symbol"]), side=side, contracts=abs(size),
        position_side={"0": "BOTH", "1": "LONG", "2": "SHORT"}.get(idx, "BOTH"),
        entry_price=base.opt_num(row.get("avgPrice")) or 0.0,
        mark_price=base.opt_num(row.get("markPrice")),
        margin_mode="isolated" if str(row.get("tradeMode")) == "1" else "cross")


def read_orders(ex, segment, book):
    conditional = book == "conditional"
    ex.load_markets()
    category = _request(segment)["category"]
    params = dict(_request(segment), openOnly=0, orderFilter=_BOOK[conditional])
    orders = []
    for row in pages(ex.privateGetV5OrderRealtime, params, _ORDER_PAGE, "order/realtime"):
        market_id = str(row.get("symbol"))
        orders.append(base.OpenOrder(
            id=str(row.get("orderId")), symbol=base.unified_symbol(ex, market_id, category),
            market_id=market_id, reduce_only=bool(row.get("reduceOnly")), conditional=conditional))
    return orders


def _category(ex, symbol):
    market = ex.market(symbol)
    return market, "inverse" if market.get("inverse") else "linear"


def cancel_book(ex, symbol, conditional, orders=()):
    ex.load_markets()
    market, category = _category(ex, symbol)
    ex.privatePostV5OrderCancelAll({"category": category, "symbol": market["id"],
                                    "orderFilter": _BOOK[conditional]})


def place_close(ex, symbol, side, amount, position_side, client_order_id, margin_mode=None):
    """reduceOnly in both modes (Bybit accepts it with positionIdx), so the order can never
    open or flip exposure; positionIdx names the hedge side."""
    ex.load_markets()
    body = _close_body(ex, symbol, side, amount, position_side, client_order_id)
    result = (ex.privatePostV5OrderCreate(body) or {}).get("result") or {}
    return {"id": None if result.get("orderId") is None else str(result["orderId"]),
            "status": "open", "filled": 0.0, "amount": float(amount)}


def _close_body(ex, symbol, side, amount, position_side, client_order_id):
    position_side = base.closing_side_ok(side, position_side)
    market, category = _category(ex, symbol)
    body = {"category": category, "symbol": market["id"], "side": side.capitalize(),
            "orderType": "Market", "qty": ex.amount_to_precision(symbol, amount),
            "positionIdx": _IDX[position_side], "reduceOnly": True}
    if client_order_id:
        body["orderLinkId"] = client_order_id
    return body


def place_closes(ex, orders):
    """Up to BATCH_ORDERS closes; one create-batch per category (a batch holds one). Per
    order: its id, or the exception its retCode (retExtInfo.list) means. A category's
    request failing gives its orders that exception when another category's request stood
    (the next attempt re-plans them alone), and is raised when none did (the whole batch
    failed: eexit.exchange then sends the orders singly)."""
    ex.load_markets()
    bodies = [_close_body(ex, o.symbol, o.side, o.amount, o.position_side, o.client_order_id) for o in orders]
    results, failures = [None] * len(bodies), []
    categories = sorted({body["category"] for body in bodies})
    for category in categories:
        indexes = [i for i, body in enumerate(bodies) if body["category"] == category]
        try:
            response = ex.privatePostV5OrderCreateBatch(
                {"category": category, "request": [{k: v for k, v in bodies[i].items() if k != "category"}
                                                   for i in indexes]}) or {}
        except Exception as exc:  # noqa: BLE001 - its orders' result, or raised below if no request stood
            failures.append(exc)
            for i in indexes:
                results[i] = exc
            continue
        rows = ((response.get("result") or {}).get("list"))
        codes = base.rows_of(((response.get("retExtInfo") or {}).get("list")) or [{}] * len(indexes), "retExtInfo")
        merged = [dict(row, **code) for row, code in zip(base.rows_of(rows, "create-batch"), codes)]
        for i, result in zip(indexes, base.batch_results(merged, len(indexes), "create-batch", lambda row: (
                str(row.get("orderId")) if str(row.get("code", 0)) == "0" and row.get("orderId") else
                base.item_error(ID, f'{{"retCode":{row.get("code")},"retMsg":{row.get("msg")!r}}}')))):
            results[i] = result
    if failures and len(failures) == len(categories):
        raise failures[0]
    return results

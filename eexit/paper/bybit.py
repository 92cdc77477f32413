"""The paper exchange's Bybit v5 dialect: the wire format ccxt `bybit` speaks, over the shared
paper Account (eexit/paper/__init__.py holds the state, the fault engine and the HTTP server).

Segments: linear/USDT, linear/USDC (BTCPERP, ETHPERP) and inverse (BTCUSD, ETHUSD); hedge
mode positionIdx 1/2 (0 one-way, anything else retCode 10001 "position idx not match
position mode"); lotSizeFilter.maxMktOrderQty enforced on MARKET orders; conditional orders
(triggerPrice) in their own book (orderFilter=StopOrder); cursor pagination; signatures
X-BAPI-SIGN = hex HMAC-SHA256(timestamp + key + recvWindow + query|body). Envelope:
{"retCode","retMsg","result","retExtInfo","time"}; errors are HTTP 200 with a retCode.
Faults (eexit.paper.serve_dialect): "error" 429 -> retCode 10006 with X-Bapi-Limit-Reset-Timestamp (now + retry_after);
418 -> HTTP 403 "access too frequent"; 5xx -> HTML; a positive "code" is sent as the retCode.
order_limit: more than `limit` orders in 10 s -> 10006.
"""

import hashlib
import hmac
import json
import time
from decimal import Decimal

from eexit import paper as core

# Binance-coded errors of the shared Account -> Bybit retCode.
_CODES = {-2022: 110017, -4116: 110072, -2019: 110007, -2011: 110001, -2013: 110001}
_RECV_WINDOW_MS = 5000


def _error(code, msg, status=200, headers=None):
    return core.DialectError(status, envelope(None, code=code, msg=msg), headers, code=code)


def envelope(result, code=0, msg="OK", error=None):
    if error is not None:
        code, msg = 10016, error
    # A batch answer carries its per-order codes outside "result" (ep_create_batch).
    ext = result.pop("retExtInfo", {}) if isinstance(result, dict) else {}
    return {"retCode": code, "retMsg": msg, "result": {} if result is None else result,
            "retExtInfo": ext, "time": core._now_ms()}


def translate(exc):
    if exc.code is None:            # an HTML 5xx page from the fault engine
        return core.DialectError(exc.status, raw=exc.msg, headers=exc.headers)
    if exc.status in (418, 429):
        return rate_limited(exc.headers.get("Retry-After", 1))
    return _error(exc.code if exc.code > 0 else _CODES.get(exc.code, 10001), exc.msg)


def rate_limited(retry_s):
    reset = int(time.time() * 1000 + float(retry_s) * 1000)
    return _error(10006, "Too many visits. Exceeded the API Rate Limit.",
                  headers={"X-Bapi-Limit-Status": 0, "X-Bapi-Limit": 10, "X-Bapi-Limit-Reset-Timestamp": reset})


def fault_error(fault):
    status = int(fault.get("status", 503))
    if status == 429:
        return rate_limited(fault.get("retry_after", 1))
    if status == 418:
        return core.DialectError(403, raw="access too frequent", headers={"Content-Type": "text/plain"})
    if status >= 500 and "code" not in fault:
        return core.html_page(status)
    code = int(fault.get("code", 10016))
    return _error(code if code > 0 else _CODES.get(code, 10016), fault.get("msg", "System error."), status)


def parse(method, query, body):
    if method == "GET":
        return core._parse_params(query, "")
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise _error(10001, "request body is not JSON") from None
    if not isinstance(data, dict):
        raise _error(10001, "request body is not an object")
    return {str(k): v for k, v in data.items()}


def symbol_of(params):
    return str(params.get("symbol") or "").upper() or None


def authenticate(h, method, path, query, body):
    paper = h.paper
    payload = query if method == "GET" else body
    key = h.headers.get("X-BAPI-API-KEY")
    if not key or not hmac.compare_digest(key, paper.api_key):
        raise _error(10003, "API key is invalid.")
    timestamp, recv = h.headers.get("X-BAPI-TIMESTAMP", ""), h.headers.get("X-BAPI-RECV-WINDOW", str(_RECV_WINDOW_MS))
    expected = hmac.new(paper.api_secret, (timestamp + key + recv + payload).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, (h.headers.get("X-BAPI-SIGN") or "").lower()):
        raise _error(10004, "error sign! origin_string[...]")
    try:
        skew = core._now_ms() - int(timestamp)
        window = int(recv)
    except ValueError:
        raise _error(10002, "invalid request, please check your server timestamp or recv_window param") from None
    if skew < -1000 or skew > window:
        raise _error(10002, "invalid request, please check your server timestamp or recv_window param")


# ------------------------------------------------------------------------------- views

def _segment(paper, p, need_scope):
    """Markets selected by category (+ settleCoin / symbol). Linear lists need one of them."""
    category = p.get("category")
    if category not in ("linear", "inverse"):
        raise _error(10001, "params error: category is invalid")
    symbol, settle = str(p.get("symbol") or "").upper(), p.get("settleCoin")
    if need_scope and category == "linear" and not symbol and not settle:
        raise _error(10001, "Missing some parameters that must be filled in: symbol or settleCoin")
    markets = [m for m in paper.account.markets.values() if m.category == category
               and (not symbol or m.id == symbol) and (not settle or m.quote == settle)]
    return category, {m.id for m in markets}


def _page(rows, p, default, maximum):
    try:
        limit = min(max(int(p.get("limit", default)), 1), maximum)
        start = int(p.get("cursor") or 0)
    except ValueError:
        raise _error(10001, "params error: limit or cursor") from None
    rest = rows[start + limit:]
    return {"list": rows[start:start + limit], "nextPageCursor": str(start + limit) if rest else ""}


def _instrument(m):
    linear = m.category == "linear"
    return {
        "symbol": m.id, "contractType": "LinearPerpetual" if linear else "InversePerpetual",
        "status": "Trading", "baseCoin": m.base, "quoteCoin": m.quote,
        "settleCoin": m.quote if linear else m.base, "launchTime": "1585526400000", "deliveryTime": "0",
        "deliveryFeeRate": "", "priceScale": str(m.price_precision),
        "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
        "priceFilter": {"minPrice": core._fmt(m.tick), "maxPrice": "1999999.80", "tickSize": core._fmt(m.tick)},
        "lotSizeFilter": {"maxOrderQty": core._fmt(m.max_qty), "maxMktOrderQty": core._fmt(m.market_max),
                          "minOrderQty": core._fmt(m.min_qty), "qtyStep": core._fmt(m.step),
                          "postOnlyMaxOrderQty": core._fmt(m.max_qty),
                          "minNotionalValue": core._fmt(m.min_notional)},
        "unifiedMarginTrade": True, "fundingInterval": 480, "settleCoinType": "",
        "copyTrading": "both", "upperFundingRate": "0.00375", "lowerFundingRate": "-0.00375",
        "isPreListing": False, "preListingInfo": None,
    }


def ep_time(paper, p, path, method):
    now = time.time_ns()
    return {"timeSecond": str(now // 10**9), "timeNano": str(now)}


def ep_instruments(paper, p, path, method):
    if p.get("status") == "PreLaunch":
        return {"category": p.get("category"), "list": [], "nextPageCursor": ""}
    category, ids = _segment(paper, p, need_scope=False)
    rows = [_instrument(paper.account.markets[i]) for i in sorted(ids)]
    return dict(_page(rows, p, 500, 1000), category=category)


def ep_tickers(paper, p, path, method):
    category, ids = _segment(paper, p, need_scope=False)
    marks = paper.account.marks
    rows = [{"symbol": i, "lastPrice": core._fmt(marks[i]), "markPrice": core._fmt(marks[i]),
             "indexPrice": core._fmt(marks[i])} for i in sorted(ids)]
    return {"category": category, "list": rows}


def ep_positions(paper, p, path, method):
    category, ids = _segment(paper, p, need_scope=True)
    account = paper.account
    with account.lock:
        rows = []
        risk = account.risk_view()["positions"]
        for (market_id, position_side), (amount, entry, updated) in sorted(account.positions.items()):
            if market_id not in ids:
                continue
            mark, model = account.marks[market_id], risk[(market_id, position_side)]
            rows.append({
                "positionIdx": {"BOTH": 0, "LONG": 1, "SHORT": 2}[position_side], "riskId": 1,
                "symbol": market_id, "side": "Buy" if amount > 0 else "Sell", "size": core._fmt(abs(amount)),
                "avgPrice": core._fmt(entry), "positionValue": core._fmt(abs(amount) * entry),
                "tradeMode": 0, "autoAddMargin": 0, "positionStatus": "Normal", "leverage": "10",
                "markPrice": core._fmt(mark), "liqPrice": core._text_or(model["liq"], ""),
                "bustPrice": "", "positionIM": "0", "positionMM": f"{model['mm']:.8f}",
                "takeProfit": "", "stopLoss": "", "trailingStop": "",
                "unrealisedPnl": f"{(mark - entry) * amount:.8f}", "curRealisedPnl": "0", "cumRealisedPnl": "0",
                "adlRankIndicator": 2, "createdTime": str(updated), "updatedTime": str(updated), "seq": 1,
                "isReduceOnly": False})
            rows[-1] = account.with_risk_fields(rows[-1], market_id)
    return dict(_page(rows, p, 20, 200), category=category)


def _order_row(o, conditional):
    idx = {"BOTH": 0, "LONG": 1, "SHORT": 2}[o["positionSide"]]
    if conditional:
        return {"orderId": str(o["algoId"]), "orderLinkId": o["clientAlgoId"], "symbol": o["symbol"],
                "side": o["side"].capitalize(), "orderType": "Market", "qty": o["quantity"], "price": "0",
                "triggerPrice": o["triggerPrice"], "orderStatus": "Untriggered", "stopOrderType": "Stop",
                "reduceOnly": o["reduceOnly"], "positionIdx": idx, "timeInForce": "IOC",
                "createdTime": str(o["createTime"]), "updatedTime": str(o["updateTime"]), "leavesQty": o["quantity"],
                "cumExecQty": "0", "orderFilter": "StopOrder"}
    return {"orderId": str(o["orderId"]), "orderLinkId": o["clientOrderId"], "symbol": o["symbol"],
            "side": o["side"].capitalize(), "orderType": "Limit", "qty": o["origQty"], "price": o["price"],
            "triggerPrice": "", "orderStatus": "New", "stopOrderType": "", "reduceOnly": o["reduceOnly"],
            "positionIdx": idx, "timeInForce": "GTC", "createdTime": str(o["time"]),
            "updatedTime": str(o["updateTime"]), "leavesQty": o["origQty"], "cumExecQty": "0"}


def _books(p):
    wanted = p.get("orderFilter")
    if wanted not in (None, "", "Order", "StopOrder"):
        raise _error(10001, "params error: orderFilter")
    return [c for c, name in ((False, "Order"), (True, "StopOrder")) if wanted in (None, "", name)]


def ep_open_orders(paper, p, path, method):
    category, ids = _segment(paper, p, need_scope=True)
    rows = []
    for conditional in _books(p):
        listed = paper.account.list_open_algo() if conditional else paper.account.list_open()
        rows += [_order_row(o, conditional) for o in listed if o["symbol"] in ids]
    return dict(_page(rows, p, 20, 50), category=category)


def ep_cancel_all(paper, p, path, method):
    _, ids = _segment(paper, p, need_scope=True)
    cancelled = []
    for market_id in sorted(ids):
        for conditional in _books(p):
            listed = paper.account.list_open_algo(market_id) if conditional else paper.account.list_open(market_id)
            cancelled += [{"orderId": str(o["algoId" if conditional else "orderId"]),
                           "orderLinkId": o["clientAlgoId" if conditional else "clientOrderId"]} for o in listed]
            (paper.account.cancel_all_algo if conditional else paper.account.cancel_all)(market_id)
    return {"list": cancelled, "success": "1"}


def ep_create(paper, p, path, method):
    account = paper.account
    category, ids = _segment(paper, p, need_scope=False)
    symbol = str(p.get("symbol") or "").upper()
    if symbol not in ids:
        raise _error(10001, "params error: symbol invalid")
    side = str(p.get("side") or "")
    if side not in ("Buy", "Sell"):
        raise _error(10001, "params error: side invalid")
    link_id = p.get("orderLinkId")
    if link_id is not None and not (isinstance(link_id, str) and 0 < len(link_id) <= 36):
        raise _error(10001, "params error: orderLinkId invalid")
    try:
        idx = int(p.get("positionIdx", 0))
    except (TypeError, ValueError):
        raise _error(10001, "params error: positionIdx") from None
    if (idx in (1, 2)) != account.hedge or idx not in (0, 1, 2):
        raise _error(10001, "position idx not match position mode")
    position_side = ("BOTH", "LONG", "SHORT")[idx]
    reduce_only = p.get("reduceOnly") in (True, "true")
    if reduce_only and account.hedge and (position_side == "LONG") != (side == "Sell"):
        raise _error(110017, "Reduce-only rule not satisfied")
    order = {"symbol": symbol, "side": side.upper(), "quantity": str(p.get("qty", "")),
             "positionSide": position_side, "newOrderRespType": "RESULT"}
    if reduce_only and not account.hedge:
        order["reduceOnly"] = "true"
    if link_id:
        order["newClientOrderId" if p.get("triggerPrice") in (None, "") else "clientAlgoId"] = link_id
    with account.lock:
        if reduce_only and account.hedge and not account._reduce_only_ok(
                symbol, side.upper(), position_side, _qty(p.get("qty"))):
            raise _error(110017, "Reduce-only rule not satisfied")
        if p.get("triggerPrice") not in (None, ""):
            placed = account.place_algo(dict(order, type="STOP_MARKET", triggerPrice=str(p["triggerPrice"])))
            return {"orderId": str(placed["algoId"]), "orderLinkId": placed["clientAlgoId"]}
        kind = str(p.get("orderType") or "")
        if kind == "Limit":
            order.update(type="LIMIT", price=str(p.get("price", "")), timeInForce="GTC")
        elif kind == "Market":
            order["type"] = "MARKET"
        else:
            raise _error(10001, "params error: orderType invalid")
        ratio = None
        for fault in paper.faults.take({"reject"}, path, method, symbol):
            raise _error(int(fault.get("code", 110007)), fault.get("msg", "ab not enough for new order"))
        for fault in paper.faults.take({"partial_fill"}, path, method, symbol):
            ratio = float(fault.get("ratio", 0.5))
        placed = account.place_order(order, ratio)
    return {"orderId": str(placed["orderId"]), "orderLinkId": placed["clientOrderId"]}


def ep_create_batch(paper, p, path, method):
    """Each item placed as /v5/order/create would; a refused one gets its retCode in
    retExtInfo.list and an empty orderId, the others go through (Bybit's batch semantics)."""
    items = p.get("request") if isinstance(p, dict) else None
    if not isinstance(items, list) or not 0 < len(items) <= 10 or not all(isinstance(i, dict) for i in items):
        raise _error(10001, "params error: request")
    rows, codes = [], []
    for item in items:
        single = dict(item, category=p.get("category"))
        try:
            rows.append(dict(core.batch_item(paper, "/v5/order/create", method, single, symbol_of(single),
                                             lambda: ep_create(paper, single, "/v5/order/create", method), _ERRORS),
                             category=p.get("category")))
            codes.append({"code": 0, "msg": "OK"})
        except (core.BinanceError, core.DialectError) as exc:
            refused = translate(exc) if isinstance(exc, core.BinanceError) else exc
            rows.append({"category": p.get("category"), "symbol": item.get("symbol"), "orderId": "",
                         "orderLinkId": item.get("orderLinkId") or ""})
            body = refused.payload or {}
            codes.append({"code": body.get("retCode", 10016), "msg": body.get("retMsg", "System error.")})
    return {"list": rows, "retExtInfo": {"list": codes}}


def _logged_status(exc):
    exc = translate(exc) if isinstance(exc, core.BinanceError) else exc
    return exc.code if exc.code is not None else exc.status


_ERRORS = (fault_error, rate_limited, _logged_status)
BATCHES = {"create_batch"}


def _qty(raw):
    try:
        return Decimal(str(raw))
    except ArithmeticError:
        raise _error(10001, "params error: qty invalid") from None


# ------------------------------------------------------------------------------- risk model

# normalised account mode -> /v5/account/info marginMode; the first is the default
ACCOUNT_MODES = {"cross": "REGULAR_MARGIN", "isolated": "ISOLATED_MARGIN", "portfolio": "PORTFOLIO_MARGIN"}
ACCOUNT_PATH = "/v5/account/wallet-balance"
_WEEK_MS = 7 * 86_400_000
_ACCOUNT_WIDE = ("accountIMRate", "accountMMRate", "totalMarginBalance", "totalAvailableBalance",
                 "totalInitialMargin", "totalMaintenanceMargin")


def ep_wallet_balance(paper, p, path, method):
    """UNIFIED only; USD totals = the paper's one collateral. In isolated margin mode the
    account-wide fields are "" (as Bybit documents)."""
    if p.get("accountType") != "UNIFIED":
        raise _error(10001, "accountType only support UNIFIED")
    risk = paper.risk_view()
    equity, mm, wallet, upl = risk["equity"], risk["mm"], risk["wallet"], risk["upl"]
    row = {"accountType": "UNIFIED", "accountLTV": "0", "accountIMRate": f"{mm * 2 / equity:.4f}" if equity else "0",
           "accountMMRate": f"{mm / equity:.4f}" if equity else "0", "totalEquity": f"{equity:.8f}",
           "totalWalletBalance": f"{wallet:.8f}", "totalMarginBalance": f"{equity:.8f}",
           "totalAvailableBalance": f"{equity - mm * 2:.8f}", "totalPerpUPL": f"{upl:.8f}",
           "totalInitialMargin": f"{mm * 2:.8f}", "totalMaintenanceMargin": f"{mm:.8f}",
           "coin": [{"coin": "USDT", "equity": f"{equity:.8f}", "usdValue": f"{equity:.8f}",
                     "walletBalance": f"{wallet:.8f}", "unrealisedPnl": f"{upl:.8f}",
                     "totalPositionMM": f"{mm:.8f}", "totalPositionIM": f"{mm * 2:.8f}"}]}
    if paper.account_mode() == "isolated":
        row.update({name: "" for name in _ACCOUNT_WIDE})
    return {"list": [paper.account.with_risk_fields(row)]}


def ep_account_info(paper, p, path, method):
    return {"unifiedMarginStatus": 5, "marginMode": ACCOUNT_MODES[paper.account_mode()],
            "isMasterTrader": False, "spotHedgingStatus": "OFF", "updatedTime": str(core._now_ms()),
            "dcpStatus": "OFF", "timeWindow": 10, "smpGroup": 0}


def ep_transaction_log(paper, p, path, method):
    """The ledger: deposits TRANSFER_IN, withdrawals TRANSFER_OUT, booked PnL TRADE; newest
    first; startTime..endTime at most 7 days apart (default: the last 24 h), cursor pages."""
    kinds = {"deposit": "TRANSFER_IN", "withdraw": "TRANSFER_OUT", "pnl": "TRADE"}
    try:
        end = int(p["endTime"]) if p.get("endTime") else core._now_ms()
        start = int(p["startTime"]) if p.get("startTime") else end - 86_400_000
    except ValueError:
        raise _error(10001, "params error: startTime or endTime") from None
    if not 0 <= end - start <= _WEEK_MS:
        raise _error(10001, "The time range between startTime and endTime cannot exceed 7 days")
    rows = [{"id": f"{e['id']}-{e['asset']}", "symbol": "", "category": "", "side": "None",
             "transactionTime": str(e["ts"]), "type": kinds[e["kind"]], "qty": "0", "size": "0",
             "currency": e["asset"], "tradePrice": "", "funding": "", "fee": "0", "cashFlow": core._fmt(e["amount"]),
             "change": core._fmt(e["amount"]), "cashBalance": "", "feeRate": "", "bonusChange": "",
             "tradeId": "", "orderId": "", "orderLinkId": ""}
            for e in sorted(paper.account.ledger_rows(start, end), key=lambda e: (e["ts"], e["id"]), reverse=True)
            if p.get("type") in (None, "", kinds[e["kind"]])]
    return _page(rows, p, 20, 50)


# (method, path) -> (endpoint, signed, counts as an order)
ROUTES = {
    ("GET", "/v5/market/time"): ("time", False, False),
    ("GET", "/v5/market/instruments-info"): ("instruments", False, False),
    ("GET", "/v5/market/tickers"): ("tickers", False, False),
    ("GET", "/v5/position/list"): ("positions", True, False),
    ("GET", "/v5/order/realtime"): ("open_orders", True, False),
    ("POST", "/v5/order/cancel-all"): ("cancel_all", True, False),
    ("POST", "/v5/order/create"): ("create", True, True),
    ("POST", "/v5/order/create-batch"): ("create_batch", True, False),   # counts its orders
    ("GET", "/v5/account/wallet-balance"): ("wallet_balance", True, False),
    ("GET", "/v5/account/info"): ("account_info", True, False),
    ("GET", "/v5/account/transaction-log"): ("transaction_log", True, False),
}

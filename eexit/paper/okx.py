"""The paper exchange's OKX v5 dialect: the wire format ccxt `okx` speaks, over the shared
paper Account (eexit/paper/__init__.py: state, faults, HTTP; serve_dialect runs each request).

Instruments: one SWAP per paper market, instId "BASE-QUOTE-SWAP" (= the Account's
"BASEQUOTE"), ctVal 1 so contracts equal base units; FUTURES lists none. maxMktSz is the
MARKET maximum. Position mode: net (posSide omitted or "net") or, with hedge=True,
long_short_mode (posSide "long"/"short", lower case; anything else sCode 51000). Margin
mode per position (PaperExchange.set_margin_mode): a close whose tdMode differs is refused
(51169: no position in that margin mode to reduce). clOrdId: 1-32 letters/digits, else 51000.
Conditional orders (Account algo book) are listed by /trade/orders-algo-pending only with
ordType "conditional,oco"; cancelled with /trade/cancel-algos. Signatures: OK-ACCESS-SIGN =
base64 HMAC-SHA256(timestamp + method + path?query + body), OK-ACCESS-PASSPHRASE checked.
Envelope {"code","msg","data"}; per-order sCode/sMsg with code "1" (all failed) or "2".
Rate limit: HTTP 429 {"code":"50011"} (no retry hint, as on OKX).
"""

import base64
import hashlib
import hmac
import json
import re
from datetime import datetime

from eexit import paper as core

_CODES = {-2022: 51169, -4116: 51016, -2019: 51008, -4005: 51202, -2011: 51400, -2013: 51400,
          -1121: 51001}
_CLIENT_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def _error(code, msg, status=200):
    return core.DialectError(status, {"code": str(code), "msg": msg, "data": []}, code=code)


def _item_error(code, msg):
    return core.DialectError(200, {"code": "1", "msg": "All operations failed",
                                   "data": [{"sCode": str(code), "sMsg": msg}]}, code=code)


def envelope(result, error=None):
    if error is not None:
        return {"code": "50001", "msg": error, "data": []}
    # A batch with refused items: "1" when all were refused, "2" when some were (OKX's codes).
    refused = [row for row in result if isinstance(row, dict) and row.get("sCode") not in (None, "0")] \
        if isinstance(result, list) else []
    if refused:
        code = "1" if len(refused) == len(result) else "2"
        return {"code": code, "msg": "All operations failed" if code == "1" else "Bulk operation partially succeeded",
                "data": result}
    return {"code": "0", "msg": "", "data": result}


def translate(exc):
    if exc.code is None:
        return core.DialectError(exc.status, raw=exc.msg, headers=exc.headers)
    if exc.status in (418, 429):
        return rate_limited(0)
    return _item_error(exc.code if exc.code > 0 else _CODES.get(exc.code, 51000), exc.msg)


def rate_limited(retry_s):
    return _error(50011, "Too Many Requests", status=429)


def fault_error(fault):
    status = int(fault.get("status", 503))
    if status in (418, 429):
        return rate_limited(0)
    if status >= 500 and "code" not in fault:
        return core.html_page(status)
    return _error(int(fault.get("code", 50001)), fault.get("msg", "Service temporarily unavailable"), status)


def parse(method, query, body):
    if method == "GET":
        return core._parse_params(query, "")
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError:
        raise _error(50002, "Invalid JSON") from None
    if not isinstance(data, (dict, list)):
        raise _error(50002, "Invalid JSON")
    return data


def symbol_of(params):
    return _account_id(params.get("instId")) or None


def authenticate(h, method, path, query, body):
    paper = h.paper
    key = h.headers.get("OK-ACCESS-KEY") or ""
    if not hmac.compare_digest(key, paper.api_key):
        raise _error(50111, "Invalid OK-ACCESS-KEY", 401)
    if not hmac.compare_digest(h.headers.get("OK-ACCESS-PASSPHRASE") or "", paper.api_password):
        raise _error(50105, "Invalid OK-ACCESS-PASSPHRASE", 401)
    timestamp = h.headers.get("OK-ACCESS-TIMESTAMP") or ""
    message = timestamp + method + path + ("?" + query if query else "") + body
    expected = base64.b64encode(hmac.new(paper.api_secret, message.encode(), hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, h.headers.get("OK-ACCESS-SIGN") or ""):
        raise _error(50113, "Invalid Sign", 401)
    try:
        sent = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000
    except ValueError:
        raise _error(50112, "Invalid OK-ACCESS-TIMESTAMP", 401) from None
    if abs(core._now_ms() - sent) > 30000:
        raise _error(50102, "Timestamp request expired", 401)


def _inst_id(market):
    return f"{market.base}-{market.quote}-SWAP"


def _account_id(inst_id):
    parts = str(inst_id or "").upper().split("-")
    return "".join(parts[:2]) if len(parts) == 3 and parts[2] == "SWAP" else ""


def _market(paper, inst_id):
    market = paper.account.markets.get(_account_id(inst_id))
    if market is None:
        raise _item_error(51001, "Instrument ID does not exist")
    return market


def _swap_only(p):
    if p.get("instType") not in ("SWAP", "FUTURES"):
        raise _error(51000, "Parameter instType error")
    return p["instType"] == "SWAP"


def _page(rows, p, id_key):
    """Newest first; `after` = an id: the rows older than it."""
    rows = sorted(rows, key=lambda r: int(r[id_key]), reverse=True)
    if p.get("after"):
        rows = [r for r in rows if int(r[id_key]) < int(p["after"])]
    return rows[:min(int(p.get("limit", 100)), 100)]


def ep_time(paper, p, path, method):
    return [{"ts": str(core._now_ms())}]


def ep_instruments(paper, p, path, method):
    if p.get("instType") != "SWAP":
        return []
    return [{"instType": "SWAP", "instId": _inst_id(m), "uly": f"{m.base}-{m.quote}",
             "instFamily": f"{m.base}-{m.quote}", "baseCcy": "", "quoteCcy": "", "settleCcy": m.quote,
             "ctVal": "1", "ctMult": "1", "ctValCcy": m.base, "ctType": "linear", "lotSz": core._fmt(m.step),
             "minSz": core._fmt(m.min_qty), "maxLmtSz": core._fmt(m.max_qty), "maxMktSz": core._fmt(m.market_max),
             "tickSz": core._fmt(m.tick), "state": "live", "lever": "100", "listTime": "1611916828000",
             "expTime": "", "alias": "", "optType": "", "stk": "", "instIdCode": n}
            for n, m in enumerate(paper.account.markets.values(), 1)]


def ep_positions(paper, p, path, method):
    if not _swap_only(p):
        return []
    account = paper.account
    with account.lock:
        rows = []
        risk = account.risk_view()["positions"]
        for (market_id, position_side), (amount, entry, updated) in sorted(account.positions.items()):
            market, mark = account.markets[market_id], account.marks[market_id]
            model = risk[(market_id, position_side)]
            rows.append({
                "instType": "SWAP", "instId": _inst_id(market), "posId": str(abs(hash((market_id, position_side)))),
                "posSide": {"BOTH": "net", "LONG": "long", "SHORT": "short"}[position_side],
                "pos": core._fmt(amount if position_side == "BOTH" else abs(amount)),
                "mgnMode": account.margin_modes.get((market_id, position_side), "cross"),
                "avgPx": core._fmt(entry), "markPx": core._fmt(mark), "ccy": market.quote, "lever": "10",
                "liqPx": core._text_or(model["liq"], ""), "mmr": f"{model['mm']:.8f}", "adl": "1",
                "upl": f"{(mark - entry) * amount:.8f}", "cTime": str(updated), "uTime": str(updated)})
            rows[-1] = account.with_risk_fields(rows[-1], market_id)
    return rows


def _order_row(paper, o, conditional):
    pos_side = {"BOTH": "net", "LONG": "long", "SHORT": "short"}[o["positionSide"]]
    inst_id = _inst_id(paper.account.markets[o["symbol"]])
    if conditional:
        return {"algoId": str(o["algoId"]), "algoClOrdId": o["clientAlgoId"], "instType": "SWAP",
                "instId": inst_id, "ordType": "conditional", "side": o["side"].lower(), "posSide": pos_side,
                "sz": o["quantity"], "slTriggerPx": o["triggerPrice"], "slOrdPx": "-1", "state": "live",
                "reduceOnly": str(o["reduceOnly"]).lower(), "tdMode": "cross", "cTime": str(o["createTime"])}
    return {"ordId": str(o["orderId"]), "clOrdId": o["clientOrderId"], "instType": "SWAP", "instId": inst_id,
            "ordType": "limit", "side": o["side"].lower(), "posSide": pos_side, "sz": o["origQty"],
            "px": o["price"], "state": "live", "reduceOnly": str(o["reduceOnly"]).lower(), "tdMode": "cross",
            "accFillSz": "0", "cTime": str(o["time"]), "uTime": str(o["updateTime"])}


def ep_open_orders(paper, p, path, method):
    if not _swap_only(p):
        return []
    return _page([_order_row(paper, o, False) for o in paper.account.list_open()], p, "ordId")


def ep_open_algo(paper, p, path, method):
    kinds = set(str(p.get("ordType") or "").split(","))
    if not kinds <= {"conditional", "oco", "trigger", "move_order_stop", "iceberg", "twap"} or kinds == {""}:
        raise _error(51000, "Parameter ordType error")
    if not _swap_only(p) or "conditional" not in kinds:
        return []
    return _page([_order_row(paper, o, True) for o in paper.account.list_open_algo()], p, "algoId")


def _cancel_items(paper, p, id_key, cancel, limit):
    if not isinstance(p, list) or not 0 < len(p) <= limit or not all(isinstance(i, dict) for i in p):
        raise _error(51000, "Parameter error")
    results = []
    for item in p:
        try:
            cancel(_market(paper, item.get("instId")).id, str(item.get(id_key)))
            results.append({id_key: str(item.get(id_key)), "sCode": "0", "sMsg": ""})
        except (core.BinanceError, core.DialectError):
            results.append({id_key: str(item.get(id_key)), "sCode": "51400",
                            "sMsg": "Cancellation failed as the order has been filled, canceled or does not exist"})
    return results


def ep_cancel_batch(paper, p, path, method):
    return _cancel_items(paper, p, "ordId",
                         lambda market_id, i: paper.account.cancel_order({"symbol": market_id, "orderId": i}), 20)


def ep_cancel_algos(paper, p, path, method):
    return _cancel_items(paper, p, "algoId", lambda market_id, i: paper.account.cancel_algo({"algoId": i}), 10)


def ep_create(paper, p, path, method):
    account = paper.account
    if not isinstance(p, dict):
        raise _error(51000, "Parameter error")
    market = _market(paper, p.get("instId"))
    side, pos_side = p.get("side"), p.get("posSide")
    if side not in ("buy", "sell"):
        raise _item_error(51000, "Parameter side error")
    if account.hedge and pos_side not in ("long", "short") or not account.hedge and pos_side not in (None, "", "net"):
        raise _item_error(51000, "Parameter posSide error")
    client_id = p.get("clOrdId")
    if client_id is not None and not _CLIENT_ID.match(str(client_id)):
        raise _item_error(51000, "Parameter clOrdId error")
    position_side = {"long": "LONG", "short": "SHORT"}.get(pos_side, "BOTH")
    reduce_only = p.get("reduceOnly") in (True, "true")
    mode = account.margin_modes.get((market.id, position_side), "cross")
    if p.get("tdMode") not in ("cross", "isolated"):
        raise _item_error(51000, "Parameter tdMode error")
    if reduce_only and (p["tdMode"] != mode or account.hedge and (position_side == "LONG") != (side == "sell")):
        raise _item_error(51169, "Order failed because you don't have any positions in this direction "
                                 "for this contract to reduce or close.")
    order = {"symbol": market.id, "side": side.upper(), "quantity": str(p.get("sz", "")),
             "positionSide": position_side, "newOrderRespType": "RESULT"}
    if client_id:
        order["newClientOrderId"] = client_id
    if reduce_only and not account.hedge:
        order["reduceOnly"] = "true"
    kind = p.get("ordType")
    if kind == "limit":
        order.update(type="LIMIT", price=str(p.get("px", "")), timeInForce="GTC")
    elif kind == "market":
        order["type"] = "MARKET"
    else:
        raise _item_error(51000, "Parameter ordType error")
    with account.lock:
        if reduce_only and account.hedge and not account._reduce_only_ok(
                market.id, side.upper(), position_side, core._decimal_param(order, "quantity")):
            raise _item_error(51169, "Order failed because you don't have any positions in this direction "
                                     "for this contract to reduce or close.")
        ratio = None
        for fault in paper.faults.take({"reject"}, path, method, market.id):
            raise _item_error(int(fault.get("code", 51008)), fault.get("msg", "Insufficient margin"))
        for fault in paper.faults.take({"partial_fill"}, path, method, market.id):
            ratio = float(fault.get("ratio", 0.5))
        placed = account.place_order(order, ratio)
    return [{"ordId": str(placed["orderId"]), "clOrdId": placed["clientOrderId"], "tag": "",
             "ts": str(core._now_ms()), "sCode": "0", "sMsg": "Order placed"}]


def ep_batch_orders(paper, p, path, method):
    """Up to 20 orders, each as /trade/order would place it; a refused one keeps its sCode."""
    if not isinstance(p, list) or not 0 < len(p) <= 20:
        raise _error(51000, "Parameter error")
    rows = []
    for item in p:
        try:
            rows.extend(core.batch_item(paper, "/api/v5/trade/order", method, item if isinstance(item, dict) else {},
                                        symbol_of(item) if isinstance(item, dict) else None,
                                        lambda i=item: ep_create(paper, i, "/api/v5/trade/order", method), _ERRORS))
        except (core.BinanceError, core.DialectError) as exc:
            refused = translate(exc) if isinstance(exc, core.BinanceError) else exc
            data = (refused.payload or {}).get("data") or [{"sCode": str(refused.code), "sMsg": ""}]
            rows.append(dict(data[0], ordId="", clOrdId=(item or {}).get("clOrdId") or ""))
    return rows


def _logged_status(exc):
    exc = translate(exc) if isinstance(exc, core.BinanceError) else exc
    return exc.code if exc.code is not None else exc.status


_ERRORS = (fault_error, rate_limited, _logged_status)
BATCHES = {"batch_orders"}


def ep_cancel_all_after(paper, p, path, method):
    try:
        seconds = int(str((p or {}).get("timeOut", "")))
    except ValueError:
        raise _error(51000, "Parameter timeOut error") from None
    if seconds != 0 and not 10 <= seconds <= 120:
        raise _error(51000, "Parameter timeOut error")
    for market_id in paper.account.markets:
        paper.account.arm_countdown(market_id, seconds * 1000)
    return [{"triggerTime": str(core._now_ms() + seconds * 1000) if seconds else "0",
             "tag": "", "ts": str(core._now_ms())}]


# ------------------------------------------------------------------------------- risk model

# normalised account mode -> /account/config acctLv; the first is the default
ACCOUNT_MODES = {"multi_currency": "3", "portfolio": "4", "futures": "2", "spot": "1"}
ACCOUNT_PATH = "/api/v5/account/balance"
_MARGIN_FIELDS = ("adjEq", "imr", "mmr", "mgnRatio", "notionalUsd", "ordFroz", "borrowFroz")
_BILLS_KEPT_MS = {"bills": 7 * 86_400_000, "bills_archive": 92 * 86_400_000}


def ep_balance(paper, p, path, method):
    """USD totals of the one collateral; in spot and futures mode (acctLv 1, 2) the
    account-level margin fields are "" (details[] carries them per currency)."""
    risk = paper.risk_view()
    equity, mm, upl = risk["equity"], risk["mm"], risk["upl"]
    ratio = f"{equity / mm:.4f}" if mm else ""
    detail = {"ccy": "USDT", "eq": f"{equity:.8f}", "cashBal": f"{risk['wallet']:.8f}", "upl": f"{upl:.8f}",
              "mmr": f"{mm:.8f}", "mgnRatio": ratio, "eqUsd": f"{equity:.8f}", "availEq": f"{equity - mm * 2:.8f}",
              "uTime": str(core._now_ms())}
    row = {"totalEq": f"{equity:.8f}", "adjEq": f"{equity:.8f}", "isoEq": "0", "imr": f"{mm * 2:.8f}",
           "mmr": f"{mm:.8f}", "mgnRatio": ratio, "notionalUsd": "0", "ordFroz": "0", "borrowFroz": "0",
           "upl": f"{upl:.8f}", "uTime": str(core._now_ms()), "details": [detail]}
    if paper.account_mode() in ("spot", "futures"):
        row.update({name: "" for name in _MARGIN_FIELDS})
    return [paper.account.with_risk_fields(row)]


def ep_config(paper, p, path, method):
    return [{"acctLv": ACCOUNT_MODES[paper.account_mode()], "uid": "44705892343619584", "mainUid": "44705892343619584",
             "posMode": "long_short_mode" if paper.account.hedge else "net_mode", "autoLoan": False,
             "greeksType": "PA", "level": "Lv1", "ctIsoMode": "automatic", "mgnIsoMode": "automatic"}]


def _bills(paper, p, name):
    """type 1 = transfer (subType 11 in, 12 out), 2 = trade (booked PnL); newest first by
    billId, `after`/`before` billId, begin/end ms; bills keeps 7 days, the archive 3 months."""
    kinds = {"deposit": ("1", "11"), "withdraw": ("1", "12"), "pnl": ("2", "1")}
    try:
        begin = max(int(p["begin"]) if p.get("begin") else 0, core._now_ms() - _BILLS_KEPT_MS[name])
        end = int(p["end"]) if p.get("end") else None
        after, before = (int(p[k]) if p.get(k) else None for k in ("after", "before"))
        limit = min(int(p.get("limit", 100)), 100)
    except ValueError:
        raise _error(51000, "Parameter error") from None
    rows = [{"billId": str(e["id"]), "ts": str(e["ts"]), "type": kinds[e["kind"]][0], "subType": kinds[e["kind"]][1],
             "balChg": core._fmt(e["amount"]), "bal": "", "ccy": e["asset"], "sz": core._fmt(abs(e["amount"])),
             "instId": "", "instType": "", "mgnMode": "", "notes": "", "ordId": "", "pnl": "0", "fee": "0",
             "execType": "", "from": "", "to": "", "posBal": "0", "posBalChg": "0"}
            for e in sorted(paper.account.ledger_rows(begin, end), key=lambda e: e["id"], reverse=True)
            if p.get("type") in (None, "", kinds[e["kind"]][0])
            and (after is None or e["id"] < after) and (before is None or e["id"] > before)]
    return rows[:limit]


def ep_bills(paper, p, path, method):
    return _bills(paper, p, "bills")


def ep_bills_archive(paper, p, path, method):
    return _bills(paper, p, "bills_archive")


# (method, path) -> (endpoint, signed, counts as an order)
ROUTES = {
    ("GET", "/api/v5/public/time"): ("time", False, False),
    ("GET", "/api/v5/public/instruments"): ("instruments", False, False),
    ("GET", "/api/v5/account/positions"): ("positions", True, False),
    ("GET", "/api/v5/trade/orders-pending"): ("open_orders", True, False),
    ("GET", "/api/v5/trade/orders-algo-pending"): ("open_algo", True, False),
    ("POST", "/api/v5/trade/cancel-batch-orders"): ("cancel_batch", True, False),
    ("POST", "/api/v5/trade/cancel-algos"): ("cancel_algos", True, False),
    ("POST", "/api/v5/trade/order"): ("create", True, True),
    ("POST", "/api/v5/trade/batch-orders"): ("batch_orders", True, False),   # counts its orders
    ("POST", "/api/v5/trade/cancel-all-after"): ("cancel_all_after", True, False),
    ("GET", "/api/v5/account/balance"): ("balance", True, False),
    ("GET", "/api/v5/account/config"): ("config", True, False),
    ("GET", "/api/v5/account/bills"): ("bills", True, False),
    ("GET", "/api/v5/account/bills-archive"): ("bills_archive", True, False),
}

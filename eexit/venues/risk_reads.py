"""The risk kernel's reads of each venue (read-only key; docs/RISK.md, docs/VENUES.md "Risk
reads"): one account snapshot from the venue's raw fields, and the venue's transfer ledger.

Only eexit.risk imports this module. The emergency close path (brain, watchdog, EEW, crash
hook) reads positions and orders through eexit.exchange and the venue modules, and never
carries the risk kernel's reads: they are not part of what must be audited to trust a close.
Positions are read here as the close path reads them (the venue module's position_rows and
position), plus the mark and liquidation price the kernel needs.

Per venue (READS below); every venue provides all RISK_INPUT_NAMES in its fullest mode:
  inputs_by_mode   {margin_mode: inputs} for the modes that provide less (a snapshot's
                   maintenance_margin is None exactly there); risk_inputs(ex, mode)
  ledger_kept_ms   how far back the venue keeps its ledger: read_cash_flows from before
                   that raises LedgerGapError (the answer could only be incomplete)
  snapshot(ex)     RiskSnapshot from the venue's raw fields (never ccxt's unified `total`);
                   raises on anything malformed or non-finite, never a partial or default one
  cash_flows(ex, since_ms, until_ms)
                   [CashFlow] of the venue's transfer ledger with since_ms <= ts_ms < until_ms,
                   oldest first, every page and window the venue needs; raises on failure
"""

from dataclasses import dataclass
from typing import Callable

from . import binanceusdm, bybit, okx
from .base import ExchangeDataError, num, rows_of


@dataclass(frozen=True)
class RiskPosition:
    symbol: str                      # ccxt unified symbol
    side: str                        # "long" | "short"
    contracts: float                 # > 0
    mark_price: float | None         # None: the venue gave none
    liquidation_price: float | None  # None: unknown (venue gave 0, "" or nothing), never "far away"


@dataclass(frozen=True)
class RiskSnapshot:
    """One read of the account for the risk kernel, from the venue's raw fields (never ccxt's
    unified `total`, which means different things per venue). margin_mode is the venue's
    account mode, normalised to one of MARGIN_MODES."""
    equity: float                    # E: margin balance incl. unrealised PnL, in `currency`
    maintenance_margin: float | None  # MM, same currency; None only in a mode whose
                                      # inputs_by_mode lacks "maintenance_margin"
    margin_mode: str
    currency: str                    # "USDT" / "USD" ...
    positions: tuple[RiskPosition, ...]
    venue_ts_ms: int                 # the venue's own time of the snapshot
    venue_flags: tuple[str, ...] = ()   # venue risk flags where the venue has them


@dataclass(frozen=True)
class CashFlow:
    flow_id: str                     # the venue's ledger id (dedupe)
    ts_ms: int
    amount: float                    # + in (deposit / transfer in), - out
    kind: str                        # the venue's type text
    asset: str = ""                  # the coin of `amount` (may differ from the snapshot's currency)


# The account modes, normalised: binanceusdm "single_asset" | "multi_assets"
# (/fapi/v1/multiAssetsMargin); bybit "isolated" | "cross" | "portfolio" (/v5/account/info
# marginMode ISOLATED_MARGIN | REGULAR_MARGIN | PORTFOLIO_MARGIN); okx "spot" | "futures" |
# "multi_currency" | "portfolio" (/api/v5/account/config acctLv 1..4).
MARGIN_MODES = frozenset({"single_asset", "multi_assets", "isolated", "cross", "portfolio",
                          "spot", "futures", "multi_currency"})


class LedgerGapError(ExchangeDataError):
    """Cash flows asked from before the venue's ledger retention: the entries are gone, so
    the answer could only be incomplete. Raised instead (the kernel cannot tell a transfer
    from PnL over that gap: a human re-bases)."""


RISK_INPUT_NAMES = frozenset({"equity", "maintenance_margin", "liquidation_price", "cash_flows", "margin_mode"})
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Reads:
    inputs_by_mode: dict
    ledger_kept_ms: int
    snapshot: Callable
    cash_flows: Callable


def risk_inputs(ex_or_id, margin_mode=None):
    """What the venue's risk snapshot provides (of RISK_INPUT_NAMES): in margin_mode (a
    RiskSnapshot.margin_mode) when given, else in the venue's fullest mode."""
    return READS[getattr(ex_or_id, "id", ex_or_id)].inputs_by_mode.get(margin_mode, RISK_INPUT_NAMES)


def read_risk_snapshot(ex):
    """One consistent RiskSnapshot from the venue's raw fields. Raises on anything unreadable
    or non-finite: never a partial or default snapshot."""
    return READS[ex.id].snapshot(ex)


def read_cash_flows(ex, since_ms, until_ms):
    """[CashFlow] with since_ms <= ts_ms < until_ms from the venue's own ledger, all
    pages/windows, oldest first. Raises on failure (never [] for an error); an empty interval
    is [] without a request, a reversed one a ValueError (the caller's bug, not the venue's),
    one starting before the venue keeps its ledger (ledger_kept_ms) LedgerGapError."""
    if until_ms < since_ms:
        raise ValueError(f"cash flows from {since_ms} until {until_ms}: the interval is reversed")
    if until_ms == since_ms:
        return []
    kept_ms = READS[ex.id].ledger_kept_ms
    if since_ms < ex.milliseconds() - kept_ms:
        raise LedgerGapError(f"{ex.id} keeps its ledger {kept_ms // DAY_MS} days: "
                             f"cash flows since {since_ms} cannot be read completely")
    return flows_between(READS[ex.id].cash_flows(ex, since_ms, until_ms), since_ms, until_ms)


def obj(value, what):
    if not isinstance(value, dict):
        raise ExchangeDataError(f"{what} returned {type(value).__name__}, not an object")
    return value


def field(row, key, what):
    """row[key] as a finite float; missing, empty, unreadable or non-finite raises."""
    if key not in row:
        raise ExchangeDataError(f"{what} without {key}")
    return num(row[key], f"{what} {key}")


def price_or_none(row, key, what):
    """A price field: None when the venue gave nothing, "" or 0 (unknown, never "far away");
    anything else must be a finite positive number, or the read raises."""
    value = row.get(key)
    if value is None or value == "":
        return None
    price = num(value, f"{what} {key}")
    if price < 0:
        raise ExchangeDataError(f"negative {what} {key}: {value!r}")
    return price or None


def risk_position(symbol, side, contracts, mark_price, liquidation_price):
    if side not in ("long", "short") or not contracts > 0:
        raise ExchangeDataError(f"position {symbol}: side {side!r} / contracts {contracts!r}")
    return RiskPosition(symbol, side, float(contracts), mark_price, liquidation_price)


def positions(ex, venue, what, mark, liquidation):
    """[(raw row, RiskPosition)] of every non-zero position of every segment, each row read
    as the close path reads it (venue.position) plus its mark and liquidation price. A row
    that cannot be read raises: a snapshot is never partial."""
    found = []
    for segment in venue.SEGMENTS:
        for row in venue.position_rows(ex, segment):
            position = venue.position(ex, segment, row)
            if position is not None:
                found.append((row, risk_position(
                    position.symbol, position.side, position.contracts,
                    price_or_none(row, mark, what), price_or_none(row, liquidation, what))))
    return found


def risk_snapshot(equity, maintenance_margin, margin_mode, currency, positions, venue_ts_ms, venue_flags=()):
    """The snapshot, checked as a whole: a mode outside MARGIN_MODES, a negative maintenance
    margin or a missing venue time raises (E <= 0 is returned: the kernel judges it)."""
    if margin_mode not in MARGIN_MODES:
        raise ExchangeDataError(f"unknown account mode {margin_mode!r}")
    if maintenance_margin is not None and maintenance_margin < 0:
        raise ExchangeDataError(f"negative maintenance margin {maintenance_margin!r}")
    if not venue_ts_ms > 0:
        raise ExchangeDataError(f"no venue time for the snapshot: {venue_ts_ms!r}")
    return RiskSnapshot(float(equity), maintenance_margin, margin_mode, str(currency), tuple(positions),
                        int(venue_ts_ms), tuple(venue_flags))


def cash_flow(flow_id, ts_ms, amount, kind, asset):
    if flow_id in (None, "") or not ts_ms > 0:
        raise ExchangeDataError(f"ledger entry without an id or time: {flow_id!r} {ts_ms!r}")
    return CashFlow(str(flow_id), int(ts_ms), float(amount), str(kind), str(asset or ""))


def windows(since_ms, until_ms, span_ms):
    """[since, until) in consecutive windows of at most span_ms (the venue's query limit)."""
    since_ms, until_ms = int(since_ms), int(until_ms)
    return [(start, min(start + span_ms, until_ms)) for start in range(since_ms, until_ms, span_ms)]


def flows_between(flows, since_ms, until_ms):
    """Each ledger id once, since_ms <= ts < until_ms, oldest first: windows and pages that
    overlap at their edges never count an entry twice."""
    unique = {flow.flow_id: flow for flow in flows if since_ms <= flow.ts_ms < until_ms}
    return sorted(unique.values(), key=lambda flow: (flow.ts_ms, flow.flow_id))


# ---------------------------------------------------------------------------- binanceusdm
# E = totalMarginBalance (wallet + unrealised), MM = totalMaintMargin, both from GET
# /fapi/v3/account: USDT only in single-asset mode, USD over every collateral asset in
# multi-assets mode (GET /fapi/v1/multiAssetsMargin). Liquidation and mark per position from
# GET /fapi/v3/positionRisk ("0" = none computed: unknown). The account answer has no
# timestamp: the venue time is GET /fapi/v1/time, read just before it (the data is at least
# that new; a transfer within that one request may show in E one read before its ledger entry).
# Weight per snapshot 1 + 30 + 5 + 5. Cash flows: GET /fapi/v1/income (weight 30 a page of
# 1000, every income type, kept for 3 months), transfers told apart by incomeType.

BINANCE_TRANSFER_TYPES = frozenset({"TRANSFER", "INTERNAL_TRANSFER", "CROSS_COLLATERAL_TRANSFER",
                                    "COIN_SWAP_DEPOSIT", "COIN_SWAP_WITHDRAW", "STRATEGY_UMFUTURES_TRANSFER"})
_INCOME_PAGE = 1000


def _binance_snapshot(ex):
    ex.load_markets()
    multi = obj(ex.fapiPrivateGetMultiAssetsMargin(), "multiAssetsMargin").get("multiAssetsMargin")
    if not isinstance(multi, bool):
        raise ExchangeDataError(f"multiAssetsMargin is not a boolean: {multi!r}")
    venue_ms = field(obj(ex.fapiPublicGetTime(), "time"), "serverTime", "time")
    account = obj(ex.fapiPrivateV3GetAccount(), "account")
    found = [position for _, position in
             positions(ex, binanceusdm, "positionRisk", "markPrice", "liquidationPrice")]
    return risk_snapshot(
        field(account, "totalMarginBalance", "account"), field(account, "totalMaintMargin", "account"),
        "multi_assets" if multi else "single_asset", "USD" if multi else "USDT", found, venue_ms)


def _binance_cash_flows(ex, since_ms, until_ms):
    flows = []
    for start, end in windows(since_ms, until_ms, 7 * DAY_MS):
        for page in range(1, 10_000):
            rows = rows_of(ex.fapiPrivateGetIncome(
                {"startTime": start, "endTime": end - 1, "limit": _INCOME_PAGE, "page": page}), "income")
            flows += [cash_flow(row.get("tranId") and f"{row['tranId']}:{row['incomeType']}:{row.get('asset')}",
                                field(row, "time", "income"), field(row, "income", "income"),
                                row["incomeType"], row.get("asset"))
                      for row in rows if row.get("incomeType") in BINANCE_TRANSFER_TYPES]
            if len(rows) < _INCOME_PAGE:
                break
        else:
            raise ExchangeDataError("income: no last page")
    return flows


# ---------------------------------------------------------------------------- bybit
# GET /v5/account/wallet-balance?accountType=UNIFIED (USD totals): E = totalMarginBalance,
# MM = totalMaintenanceMargin (accountMMRate = MM/E, liquidation at 1). Bybit's account-wide
# margin fields do not apply in isolated margin mode (GET /v5/account/info marginMode): there
# E = totalEquity and MM is None. Positions of every segment: liqPrice ("" = unknown),
# markPrice; a positionStatus other than Normal ("Liq", "Adl") is a venue flag. Venue time:
# the wallet answer's envelope `time`. Cash flows: GET /v5/account/transaction-log,
# type TRANSFER_IN / TRANSFER_OUT, windows of at most 7 days, 50 a page (cursor).

_BYBIT_MODES = {"ISOLATED_MARGIN": "isolated", "REGULAR_MARGIN": "cross", "PORTFOLIO_MARGIN": "portfolio"}
_BYBIT_TRANSFERS = {"TRANSFER_IN": 1, "TRANSFER_OUT": -1}


def _bybit_snapshot(ex):
    ex.load_markets()
    raw_mode = obj((ex.privateGetV5AccountInfo() or {}).get("result"), "account/info").get("marginMode")
    mode = _BYBIT_MODES.get(raw_mode)
    if mode is None:
        raise ExchangeDataError(f"account/info marginMode {raw_mode!r}")
    response = obj(ex.privateGetV5AccountWalletBalance({"accountType": "UNIFIED"}), "wallet-balance")
    wallet = rows_of((obj(response.get("result"), "wallet-balance")).get("list"), "wallet-balance")
    if len(wallet) != 1:
        raise ExchangeDataError(f"wallet-balance answered {len(wallet)} accounts, not 1")
    found = positions(ex, bybit, "position/list", "markPrice", "liqPrice")
    flags = [f"{position.symbol}:positionStatus={row['positionStatus']}" for row, position in found
             if row.get("positionStatus") not in (None, "", "Normal")]
    isolated = mode == "isolated"
    return risk_snapshot(
        field(wallet[0], "totalEquity" if isolated else "totalMarginBalance", "wallet-balance"),
        None if isolated else field(wallet[0], "totalMaintenanceMargin", "wallet-balance"),
        mode, "USD", [position for _, position in found], field(response, "time", "wallet-balance"), flags)


def _bybit_cash_flows(ex, since_ms, until_ms):
    flows = []
    for start, end in windows(since_ms, until_ms, 7 * DAY_MS):
        for kind, sign in _BYBIT_TRANSFERS.items():
            params = {"accountType": "UNIFIED", "type": kind, "startTime": start, "endTime": end - 1}
            for row in bybit.pages(ex.privateGetV5AccountTransactionLog, params, 50, "transaction-log"):
                amount = field(row, "change", "transaction-log")
                if amount * sign < 0 or row.get("type") != kind:
                    raise ExchangeDataError(f"transaction-log asked {kind}: {row.get('type')!r} {amount!r}")
                flows.append(cash_flow(row.get("id"), field(row, "transactionTime", "transaction-log"),
                                       amount, kind, row.get("currency")))
    return flows


# ---------------------------------------------------------------------------- okx
# GET /api/v5/account/balance (USD): in multi-currency and portfolio mode (GET
# /api/v5/account/config acctLv 3, 4) E = adjEq and MM = mmr (mgnRatio = adjEq / mmr,
# liquidation at 1). In spot and futures mode (acctLv 1, 2) those account-level fields are ""
# (details[].mgnRatio applies per currency): E = totalEq and MM is None. Positions of every
# segment: liqPx ("" = unknown), markPx. Venue time: GET /api/v5/public/time, read just
# before the balance (the data is at least that new).
# Cash flows: GET /api/v5/account/bills type 1 (transfer), 100 a page (newest first, `after`
# = billId); it keeps 7 days: an older start reads /account/bills-archive (3 months).

_OKX_ACCT_LV = {"1": "spot", "2": "futures", "3": "multi_currency", "4": "portfolio"}
_OKX_BILLS_KEPT_MS = 7 * DAY_MS - 3_600_000   # an hour's margin for clocks


def _okx_one(response, what):
    rows = okx.data(response, what)
    if len(rows) != 1:
        raise ExchangeDataError(f"{what} answered {len(rows)} rows, not 1")
    return rows[0]


def _okx_snapshot(ex):
    ex.load_markets()
    acct_lv = str(_okx_one(ex.privateGetAccountConfig(), "account/config").get("acctLv"))
    mode = _OKX_ACCT_LV.get(acct_lv)
    if mode is None:
        raise ExchangeDataError(f"account/config acctLv {acct_lv!r}")
    venue_ms = field(_okx_one(ex.publicGetPublicTime(), "public/time"), "ts", "public/time")
    balance = _okx_one(ex.privateGetAccountBalance(), "account/balance")
    found = [position for _, position in positions(ex, okx, "account/positions", "markPx", "liqPx")]
    margin = mode in ("multi_currency", "portfolio")
    equity = field(balance, "adjEq" if margin else "totalEq", "account/balance")
    mm = field(balance, "mmr", "account/balance") if margin else None
    if mode == "futures":
        mm = equity * _okx_worst_currency_margin_use(balance)
    return risk_snapshot(equity, mm, mode, "USD", found, venue_ms)


def _okx_worst_currency_margin_use(balance):
    """Futures mode (acctLv 2) margins each currency on its own: the account-level mmr is ""
    and details[].mmr (in that currency) against details[].eq applies; a currency is liquidated
    when its own mmr reaches its eq. The worst currency's mmr/eq, never an average over
    currencies that would hide it (the caller scales it to the account's equity, so MM/E is
    that currency's margin use). mmr "" or 0: no cross position in that currency; eq <= 0
    with a maintenance margin: at liquidation (1.0)."""
    worst = 0.0
    for row in rows_of(balance.get("details"), "account/balance details"):
        if row.get("mmr") in ("", None) or (mm := field(row, "mmr", "account/balance details")) == 0:
            continue
        if mm < 0:
            raise ExchangeDataError(f"account/balance details {row.get('ccy')} mmr {mm!r} < 0")
        equity = field(row, "eq", "account/balance details")
        worst = max(worst, mm / equity if equity > 0 else 1.0)
    return worst


def _okx_cash_flows(ex, since_ms, until_ms):
    archive = since_ms < ex.milliseconds() - _OKX_BILLS_KEPT_MS
    call = ex.privateGetAccountBillsArchive if archive else ex.privateGetAccountBills
    flows = []
    for row in okx.pages(call, {"type": "1", "begin": str(int(since_ms)), "end": str(int(until_ms) - 1)},
                         "billId", "account/bills"):
        if str(row.get("type")) != "1":
            raise ExchangeDataError(f"account/bills asked type 1, got {row.get('type')!r}")
        flows.append(cash_flow(row.get("billId"), field(row, "ts", "account/bills"),
                               field(row, "balChg", "account/bills"),
                               f"transfer/{row.get('subType')}", row.get("ccy")))
    return flows


READS = {
    # ledger kept: Binance's income 3 months, Bybit's transaction-log 2 years, OKX's bills-archive 3 months
    binanceusdm.ID: Reads({}, 90 * DAY_MS, _binance_snapshot, _binance_cash_flows),
    bybit.ID: Reads({"isolated": RISK_INPUT_NAMES - {"maintenance_margin"}}, 730 * DAY_MS,
                    _bybit_snapshot, _bybit_cash_flows),
    okx.ID: Reads({"spot": RISK_INPUT_NAMES - {"maintenance_margin"}}, 90 * DAY_MS,
                  _okx_snapshot, _okx_cash_flows),
}

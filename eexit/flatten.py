"""Pure planning for an emergency close: which orders flatten these positions, what is left.

No I/O, no clock, no ccxt. Positions and market rules are plain data (the shapes of
eexit.exchange.Position and MarketRules, duck-typed so tests can build them directly).

Decisions made here, and why:

- Quantities use Decimal built from the float's shortest repr, and round DOWN to the lot step:
  a close larger than the position is rejected by a reduce-only exchange and is never needed;
  the sub-step remainder cannot exist on the exchange anyway.
- A close larger than the market's maximum market quantity is split into chunks no larger than
  it. If the last chunk would fall below the minimum quantity, the chunk before it gives up the
  difference, so no chunk is unplaceable (when the quantities allow it).
- At most MAX_CHUNKS_PER_POSITION chunks per position per attempt keep one attempt bounded;
  the re-read sees what is left and the next attempt continues.
- A market without rules (unknown symbol) still gets ONE order for the full quantity: sending
  an order the exchange may reject is better than not trying (fail-closed).
- Dust = a position a market order cannot close. Below the minimum quantity after rounding it
  cannot even be expressed: it is never planned. Below the minimum notional it is STILL
  planned: venues exempt reduce-only closes from their minimum notional (e.g. "unless you
  choose reduce only"), and trying costs one request (fail-closed). If such a position survives to the
  final read it is reported as dust ("below_min_notional") rather than residual.
- Status: FLAT only when the final successful re-read shows no position at all. Dust-only is
  RESIDUAL with the dust listed (conservative: the account is not flat, an operator must look).
  No successful final read is FAILED, never FLAT and never "0 positions".
- Client order ids are derived from (event_id, attempt, symbol, position_side, chunk index) by
  SHA-256: the same request retried inside one attempt carries the same id, so the exchange
  refuses a double; a new attempt (after a re-read) gets new ids. Ours are "eexit" + 27 hex
  digits: 32 letters and digits, the strictest rule of the supported venues (one format for
  all, so no venue name is needed here).
"""

import hashlib
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation

from .schema import FINAL_STATUSES

FLAT, RESIDUAL, FAILED = FINAL_STATUSES     # the verdicts, named once in the wire contract

CLIENT_ID_PREFIX = "eexit"
CLIENT_ID_LENGTH = 32
MAX_CHUNKS_PER_POSITION = 100


@dataclass(frozen=True)
class CloseOrder:
    symbol: str
    side: str              # ORDER side: "sell" closes a long, "buy" closes a short
    amount: float
    position_side: str     # "BOTH" | "LONG" | "SHORT"
    client_order_id: str
    margin_mode: str | None = None   # the position's, where the venue wants it on the close


def _dec(value):
    """Decimal of a float/str via its shortest repr; None for missing, non-finite or <= 0."""
    try:
        number = Decimal(repr(value) if isinstance(value, float) else str(value))   # str(None): invalid
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() and number > 0 else None


def _to_step(amount, step, rounding=ROUND_FLOOR):
    """amount rounded to a whole number of steps (down unless told); unchanged without a step."""
    return amount if step is None else (amount / step).to_integral_value(rounding=rounding) * step


def client_order_id(event_id, attempt, symbol, position_side, chunk):
    digest = hashlib.sha256(f"{event_id}\n{attempt}\n{symbol}\n{position_side}\n{chunk}".encode()).hexdigest()
    return CLIENT_ID_PREFIX + digest[:CLIENT_ID_LENGTH - len(CLIENT_ID_PREFIX)]


def closing_side(position):
    return "sell" if position.side == "long" else "buy"


def split_amount(contracts, rules):
    """The chunk quantities (Decimals) that close `contracts` under `rules`; [] for dust."""
    amount = _dec(contracts)
    if amount is None:
        return []
    if rules is None:
        return [amount]
    step = _dec(rules.amount_step)
    min_qty = _dec(rules.min_qty) or Decimal(0)
    amount = _to_step(amount, step)
    if amount <= 0 or amount < min_qty:
        return []
    max_qty = _dec(rules.max_market_qty)
    max_qty = _to_step(max_qty, step) if max_qty is not None else None
    if max_qty is None or max_qty <= 0 or max_qty < min_qty or amount <= max_qty:
        return [amount]
    chunks = []
    left = amount
    while left > 0 and len(chunks) < MAX_CHUNKS_PER_POSITION:
        chunk = min(left, max_qty)
        chunks.append(chunk)
        left -= chunk
    last = chunks[-1]
    if len(chunks) > 1 and last < min_qty:
        need = _to_step(min_qty - last, step, ROUND_CEILING)
        if chunks[-2] - need >= min_qty:
            chunks[-2] -= need
            chunks[-1] += need
    return chunks


def unplaceable(position, rules):
    """True when no order quantity can express this position (below the minimum quantity)."""
    return rules is not None and not split_amount(position.contracts, rules)


def dust_reason(position, rules):
    """Why this position counts as dust in a report, or None if it is an ordinary residual."""
    if rules is None:
        return None
    if unplaceable(position, rules):
        return "below_min_qty"
    min_notional = _dec(rules.min_notional)
    mark = _dec(getattr(position, "mark_price", None))
    if min_notional is not None and mark is not None:
        size = _dec(rules.contract_size) or Decimal(1)
        if _dec(position.contracts) * size * mark < min_notional:
            return "below_min_notional"
    return None


def plan_close(positions, markets, attempt, event_id):
    """[CloseOrder] that flatten every position a quantity can express. Deterministic: same
    input, same orders, same client order ids; ordered by symbol and position side."""
    orders = []
    for position in sorted(positions, key=position_key):
        rules = markets.get(position.symbol)
        for index, amount in enumerate(split_amount(position.contracts, rules)):
            orders.append(CloseOrder(
                symbol=position.symbol, side=closing_side(position), amount=float(amount),
                position_side=position.position_side,
                client_order_id=client_order_id(event_id, attempt, position.symbol,
                                                position.position_side, index),
                margin_mode=getattr(position, "margin_mode", None)))
    return orders


def position_key(position):
    return (position.symbol, position.position_side, position.side)


def describe(position):
    return {"symbol": position.symbol, "side": position.side,
            "position_side": position.position_side, "contracts": position.contracts}


def classify_residual(positions, markets):
    """(residual, dust): lists of plain dicts for the report. Dust items say why they are dust.
    Disjoint; together they are every position passed in."""
    residual, dust = [], []
    for position in sorted(positions, key=position_key):
        why = dust_reason(position, markets.get(position.symbol))
        if why is None:
            residual.append(describe(position))
        else:
            dust.append({**describe(position), "why": why})
    return residual, dust


def decide_status(final_positions, final_orders=()):
    """FLAT | RESIDUAL | FAILED from the last re-read; None means that read failed. An open
    order left at the deadline is RESIDUAL even with no position: it can re-open exposure
    after the halt (SPEC §4.2), so the account is not safe to call flat."""
    if final_positions is None:
        return FAILED
    return FLAT if not final_positions and not final_orders else RESIDUAL


def closable(positions, markets):
    """The positions another attempt could still send an order for."""
    return [p for p in positions if not unplaceable(p, markets.get(p.symbol))]

"""The venue seam: one small module per supported derivatives venue, all with one interface.

eexit talks to exchanges only through eexit.exchange, which picks the module for the
configured EEXIT_EXCHANGE from VENUES below. Nothing outside this package names a venue.

A venue module provides exactly (compare NautilusTrader's adapters/_template/execution.py:
generate_position_status_reports, generate_order_status_reports, _cancel_all_orders,
_submit_order; here synchronous and limited to what an emergency close needs):

  ID               the ccxt exchange id
  SEGMENTS         the account segments (category/settle coin...) that together are every
                   position and order the key can hold; reports state "ID:seg,seg" as scope,
                   so a FLAT says what it covers
  NEEDS_PASSWORD   whether the key needs a passphrase (EEXIT_API_PASSWORD / api_password)
  ORDER_LIMITS     default EEXIT_ORDER_LIMITS: "orders/seconds,..." per account
  DEADMAN          name of the venue's dead-man switch, or None
  DEADMAN_RANGE_S  (min, max) seconds the switch accepts, or None; EEXIT_DEADMAN_S outside
                   it is refused at start (never clamped silently)
  configure(ex)                        ccxt options set once at build time (no private calls
                                       at load_markets beyond trading permission)
  MARKET_MAX       the path in ccxt's market to the venue's maximum MARKET order size where
                   ccxt does not map it (base.load_market_rules), else None
  read_positions(ex, segment)          (positions, unreadable): every non-zero position of one
                                       segment, all pages, and every row it cannot read
                                       (base.read_rows: such a row is named, never dropped
                                       and never fatal for the others); raises when the
                                       answer as a whole is unreadable or the request fails
  position_rows(ex, segment)           the raw rows read_positions reads (every page); raises
  position(ex, segment, row)           base.Position of one raw row, None when zero; raises
                                       when the row cannot be read (the risk reads use both)
  BOOKS            the order reads of a segment: "regular" plus the conditional/algo ones
                   (one name per request the venue needs; read in parallel)
  read_orders(ex, segment, book)       [base.OpenOrder] of one book of one segment, all
                                       pages (conditional = book != "regular"); raises
  cancel_book(ex, symbol, conditional, orders)
                                       cancel one book of symbol; `orders` are the ones the
                                       read saw there (for venues that cancel by id); raises
  place_close(ex, symbol, side, amount, position_side, client_order_id, margin_mode)
                                       one reduce-only MARKET order closing (part of) a
                                       position: the venue's hedge parameters, margin mode,
                                       client-id rules (ours: 32 letters/digits, every venue)
  BATCH_ORDERS     close orders one batch request carries
  place_closes(ex, orders)             2..BATCH_ORDERS flatten.CloseOrder closes (each as
                                       place_close would send it) in one request: per order
                                       its id, or the exception its rejection is (classified
                                       like a single order's); the request failing raises
  PING             ccxt's method for the cheapest public request (server time): keep-alive
  check_key(ex)                        one cheap private read-only call: raises (auth) when the
                                       key is wrong or revoked (the EEW's account check)
  arm_deadman(ex, symbol, countdown_ms) the venue's dead-man switch, where DEADMAN names one
  ERRORS           base.ErrorTable: the venue's own error codes by kind (rate_limited,
                   transient, auth, position_side, reduce_only_rejected; else rejected or
                   unknown) and where its rate-limit answers carry the retry hint

The risk kernel's reads of a venue (account snapshot, transfer ledger) are in risk_reads.py,
which only eexit.risk imports: the close path never carries them.

Adding a venue: one module here, one registry line below, its risk reads in risk_reads.py,
one paper dialect (eexit/paper/<id>.py) and the parametrised tests; docs/VENUES.md has the
checklist.
"""

from eexit.config import ConfigError

from . import binanceusdm, bybit, okx

VENUES = {module.ID: module for module in (binanceusdm, bybit, okx)}

# ccxt ids that look right but would trade the wrong product or none: refused by name.
_REFUSED = {"binance": "ccxt's 'binance' reads spot open orders; use 'binanceusdm' for USD-M futures"}


def venue(exchange_id):
    """The module for exchange_id; ConfigError (exit 2) naming the supported list otherwise."""
    module = VENUES.get(exchange_id)
    if module is None:
        why = _REFUSED.get(exchange_id, "not a supported venue")
        raise ConfigError(f"EEXIT_EXCHANGE={exchange_id!r}: {why}; supported: {', '.join(sorted(VENUES))}")
    return module

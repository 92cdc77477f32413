"""Let a trading bot honour eexit's halt cheaply (docs/GUARD.md).

    import redis
    from eexit.guard import is_halted

    client = redis.Redis(host="127.0.0.1", socket_timeout=0.5, socket_connect_timeout=0.5)
    if is_halted(client):
        refuse_new_entries()

Fail-closed: trading is allowed ONLY when system:state:trading exists and its `halted` field
reads "false" (or "0", as eexit.schema parses it). A missing hash or field, any other value, a Redis error of any kind
(unreachable, timeout, NOPERM, wrong type) all answer True (halted).

This is a courtesy, not the safety mechanism: eexit never relies on a bot asking. A bot that
ignores the halt is taken flat by the EEW all the same; asking first only saves fees and
slippage on a position that would be closed again.

Stdlib + redis-py only; `client` is any redis-py client (decode_responses either way). Set
short socket timeouts on it: is_halted waits as long as the client lets a command wait.
"""

TRADING_STATE_KEY = "system:state:trading"     # eexit.schema.TRADING_STATE_KEY (wire contract)
ALLOWED_VALUES = ("false", "0")                 # what eexit.schema reads as halted=False


def is_halted(client, key=TRADING_STATE_KEY):
    """True unless Redis positively says `halted` is "false". Never raises."""
    try:
        value = client.hget(key, "halted")
    except Exception:  # noqa: BLE001 - any failure to read means "not known to be allowed": halted
        return True
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    return not (isinstance(value, str) and value.strip().lower() in ALLOWED_VALUES)

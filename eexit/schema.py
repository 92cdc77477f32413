"""The wire contract: key names and one dataclass per message (SPEC §2). Pure: no I/O.

Every message has `to_fields()` (str -> str, ready for XADD/HSET) and a classmethod
`from_fields(raw)` returning `(message, problems)`; each field of a message says how it is read
(`_wire`: its kind, its bound, whether it is required). `from_fields` never raises: a safety daemon
that crashes on a malformed entry is a daemon an attacker (or a bug) can switch off with one
XADD. Problems are short codes such as `missing:event_id` or `bad_int:ts`; the caller decides
what a problem means (the EEW still executes an authorised but malformed panic, except one
with a field over MAX_TEXT: that is REJECTED, see eew.authorise).

Missing or unreadable numbers parse to None, never to 0: "0 positions" must only ever mean the
producer said 0 (SPEC §4.1, §4.6).
"""

import functools
import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Mapping

# Stream and key names (fixed by SPEC §2).
PANIC_STREAM = "system:panic_close"
COMPLETED_STREAM = "system:panic_close:completed"
HEARTBEAT_STREAM = "exit_brain:heartbeat"
EEW_HEARTBEAT_STREAM = "eexit:eew:heartbeat"
WATCHDOG_HEARTBEAT_STREAM = "eexit:watchdog:heartbeat"
TRADING_STATE_KEY = "system:state:trading"
PROCESSED_KEY = "system:panic_close:processed"
GUARD_KEY = "eexit:eew:guard"              # the halt guard's status (hash), see eexit/eew.py
GUARD_LEASE_KEY = "eexit:eew:guard:lease"   # which EEW guards: its consumer name, PX lease
INFLIGHT_KEY = "eexit:eew:inflight"        # event ids the EEW claimed, not yet final (its ledger sweep)
INCIDENT_KEY = "eexit:watchdog:incident"   # the open incident: watchdogs, the crash hook, the risk kernel

EEW_GROUP = "emergency_exit_worker"

HEARTBEAT_MAXLEN = 1000

SEVERITIES = ("CRITICAL",)
KNOWN_ISSUERS = ("risk_kernel", "exit_brain", "watchdog", "ops")
HEARTBEAT_STATUSES = ("OK", "DEGRADED", "STOPPED")   # STOPPED: the last beat of a clean stop
FINAL_STATUSES = ("FLAT", "RESIDUAL", "FAILED")     # a close's verdict: one final report per event id
REPORT_STATUSES = (*FINAL_STATUSES, "REJECTED", "DUPLICATE")

# Bounds that make a value absurd rather than merely surprising.
MAX_TEXT = 1024                       # longest text field or name; longer is the problem
                                      # too_long:<name> (the EEW rejects such a panic) and is
                                      # cut to this length for display only
MAX_TS_MS = 32503680000000            # year 3000
MAX_COUNT = 1_000_000                 # positions, orders, attempts
MAX_DURATION_MS = 10 * 365 * 86400 * 1000


def _whole(text):
    """int of "7", or of an integral float: producers in other languages write "1.0". Read as
    a float, which is exact below 2**53, far above every bound here (a larger value is
    absurd whichever way it is read)."""
    number = float(text)                      # not a number at all: ValueError
    if not number.is_integer():               # 1.5, NaN, infinities
        raise ValueError(text)
    return int(number)


_FLAGS = {"true": True, "1": True, "false": False, "0": False}


def _json_list(text):
    parsed = json.loads(text)
    if not isinstance(parsed, list):          # null, a number, an object: not the list we need
        raise ValueError(text)
    return parsed


def text_map(raw):
    """(values, problems): a raw Redis field map as str -> str, never raising. UTF-8 bytes are
    decoded (otherwise non_utf8:<name>, kept with replacement characters), a number is kept
    as its repr, any other key or value is left out (bad_type:<name>); not_a_map: no map."""
    values, problems = {}, []
    if not isinstance(raw, Mapping):
        return values, ["not_a_map"]
    for key, value in raw.items():
        name = _text(key, "key", problems)
        text = None if name is None else _text(value, name, problems)
        if text is not None:
            values[name] = text
    return values, problems


def _text(item, label, problems):
    if isinstance(item, (bytes, bytearray, memoryview)):
        item = bytes(item)
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"non_utf8:{label}")
            return item.decode("utf-8", errors="replace")
    if isinstance(item, str):
        return item
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return repr(item)
    problems.append(f"bad_type:{label}")
    return None


# How a field of each kind but text is read from its text: (parse, problem code). parse raises
# ValueError, LookupError (_FLAGS) or RecursionError (deep JSON).
_KINDS = {
    "integer": (_whole, "bad_int"),
    "number": (float, "bad_number"),
    "boolean": (lambda text: _FLAGS[text.strip().lower()], "bad_bool"),
    "json_list": (_json_list, "bad_json"),       # valid JSON that is no array: bad_json too
}


def _read(kind, text, name, problems, maximum=None, required=True, allowed=None, legacy=None):
    """The value of field `name` from its text ("" when absent), recording problems: absent
    (missing:<name> if required); a text cut at MAX_TEXT (too_long:<name>) and, with `allowed`,
    outside it after the `legacy` renames (unknown_value:<name>, kept as sent); a value parse
    cannot read (<problem>:<name>) or a number outside 0..maximum (absurd:<name>; NaN and
    infinities compare false, so they are absurd too). Never raises."""
    parse, problem = _KINDS.get(kind, (None, None))
    empty = [] if kind == "json_list" else "" if parse is None else None    # absent or unreadable
    if text == "":
        if required:
            problems.append(f"missing:{name}")
        return empty
    if parse is None:                                   # text
        if len(text) > MAX_TEXT:
            problems.append(f"too_long:{name}")
            text = text[:MAX_TEXT]
        text = (legacy or {}).get(text, text)
        if allowed is not None and text not in allowed:
            problems.append(f"unknown_value:{name}")
        return text
    try:
        value = parse(text)
    except (ValueError, LookupError, RecursionError):
        problems.append(f"{problem}:{name}")
        return empty
    if maximum is None or 0 <= value <= maximum:
        return value
    problems.append(f"absurd:{name}")
    return empty


@functools.cache
def _wire_fields(cls):
    """Every field of a message class but `extra`, in wire order: declaration order, unless the
    class names another (WIRE_ORDER: a PanicEvent keeps its constructor's order and the old
    wire order)."""
    declared = {f.name: f for f in fields(cls) if f.name != "extra"}
    return tuple(declared[name] for name in getattr(cls, "WIRE_ORDER", declared))


def _wire(kind, maximum=None, default=MISSING, factory=MISSING, aliases=(), **options):
    """A message field and how from_fields reads it: _read(kind, ..., maximum, **options), from
    the field or, when it is absent, the first of its aliases present."""
    return field(default=default, default_factory=factory,
                 metadata={"read": (kind, aliases, dict(options, maximum=maximum))})


class _Message:
    """to_fields and from_fields of a message whose fields say how they are read (_wire): in
    wire order, then `extra`, the fields no reader consumed (each cut at MAX_TEXT)."""

    OMIT_EMPTY = False      # True: an empty text field is left out, not written as ""

    def to_fields(self):
        """Known fields first, None (and with OMIT_EMPTY "") omitted; a float with 3 decimals at
        most (a latency); extra fields never override known ones."""
        encoded = {}
        for name, value in ((f.name, getattr(self, f.name)) for f in _wire_fields(type(self))):
            if value is None or (self.OMIT_EMPTY and value == ""):
                continue
            if isinstance(value, float):
                encoded[name] = str(round(value, 3))
            elif isinstance(value, bool):
                encoded[name] = "true" if value else "false"
            elif isinstance(value, (list, dict)):
                encoded[name] = json.dumps(value, separators=(",", ":"), sort_keys=True)
            else:
                encoded[name] = str(value)
        return encoded | {name: value for name, value in self.extra.items() if name not in encoded}

    @classmethod
    def from_fields(cls, raw):
        texts, problems = text_map(raw)
        values, consumed = {}, set()
        for f in _wire_fields(cls):
            kind, aliases, options = f.metadata["read"]
            present = [name for name in (f.name, *aliases) if name in texts]    # all of them consumed
            consumed.update(present)
            values[f.name] = _read(kind, texts[present[0]] if present else "", f.name, problems, **options)
        extra = {}
        for name, value in texts.items():
            if name not in consumed:
                if len(name) > MAX_TEXT or len(value) > MAX_TEXT:
                    problems.append(f"too_long:{name[:64]}")
                extra[name[:MAX_TEXT]] = value[:MAX_TEXT]
        return cls(**values, extra=extra), problems


@dataclass
class PanicEvent(_Message):
    """An order to go flat now. Published on PANIC_STREAM by the watchdog, risk kernel or ops."""

    WIRE_ORDER = ("event_id", "reason", "severity", "issued_by", "ts")

    event_id: str = _wire("text")
    reason: str = _wire("text")
    issued_by: str = _wire("text", aliases=("source",))
    ts: int | None = _wire("integer", MAX_TS_MS)
    severity: str = _wire("text", allowed=SEVERITIES, default="CRITICAL")
    extra: dict = field(default_factory=dict)   # unknown fields, e.g. sig, kid, context


@dataclass
class CompletionReport(_Message):
    """What the EEW did about one panic event. Published on COMPLETED_STREAM."""

    event_id: str = _wire("text")
    status: str = _wire("text", allowed=REPORT_STATUSES)
    issued_by: str = _wire("text", required=False, default="")
    reason: str = _wire("text", required=False, default="")
    positions_total: int | None = _wire("integer", MAX_COUNT, default=0)
    positions_closed: int | None = _wire("integer", MAX_COUNT, default=0)
    positions_failed: int | None = _wire("integer", MAX_COUNT, default=0)
    failed_symbols: list = _wire("json_list", factory=list)
    ts_started: int | None = _wire("integer", MAX_TS_MS, default=None)
    ts_completed: int | None = _wire("integer", MAX_TS_MS, default=None)
    execution_time_ms: int | None = _wire("integer", MAX_DURATION_MS, default=None)
    residual_positions: list = _wire("json_list", required=False, factory=list)  # [{"symbol","side","contracts"}]
    dust: list = _wire("json_list", required=False, factory=list)
    orders_cancelled: int | None = _wire("integer", MAX_COUNT, required=False, default=0)
    attempts: int | None = _wire("integer", MAX_COUNT, required=False, default=0)
    event_age_ms: int | None = _wire("integer", MAX_TS_MS, required=False, default=None)
    detail: str = _wire("text", required=False, default="")     # why REJECTED / FAILED, or the original of a DUPLICATE
    problems: list = _wire("json_list", required=False, factory=list)   # schema problems of the panic event
    # venue:segments the account read covered (what FLAT means)
    scope: str = _wire("text", required=False, default="")
    extra: dict = field(default_factory=dict)


@dataclass
class Heartbeat(_Message):
    """A guard's sign of life. The Exit Brain publishes on HEARTBEAT_STREAM; the EEW and the
    watchdog publish the same shape on their own streams."""

    OMIT_EMPTY = True       # an old producer sends no `instance`; we send none when we have none

    service_id: str = _wire("text")
    status: str = _wire("text", allowed=HEARTBEAT_STATUSES, legacy={"ALIVE": "OK"})
    active_positions: int | None = _wire("integer", MAX_COUNT)
    last_decision_ts: int | None = _wire("integer", MAX_TS_MS)
    latency_ms: float | None = _wire("number", MAX_DURATION_MS)
    ts: int | None = _wire("integer", MAX_TS_MS)
    # The producer's process identity, new at every start ("" = not sent).
    instance: str = _wire("text", required=False, default="")
    extra: dict = field(default_factory=dict)


@dataclass
class TradingState(_Message):
    """The halt flag in TRADING_STATE_KEY. Trading code must treat a missing or unreadable
    `halted` as halted."""

    OMIT_EMPTY = True

    halted: bool | None = _wire("boolean")
    reason: str = _wire("text", required=False, default="")
    event_id: str = _wire("text", required=False, default="")
    halted_at: int | None = _wire("integer", MAX_TS_MS, required=False, default=None)
    halted_by: str = _wire("text", required=False, default="")
    requires_manual_reset: bool | None = _wire("boolean", required=False, default=None)
    cleared_by: str = _wire("text", required=False, default="")
    cleared_at: int | None = _wire("integer", MAX_TS_MS, required=False, default=None)
    extra: dict = field(default_factory=dict)

    @property
    def trading_allowed(self):
        return self.halted is False


def entry_id_ms(entry_id):
    """The millisecond part of a stream entry id ("1700000000000-0"), or None."""
    if isinstance(entry_id, (bytes, bytearray)):
        entry_id = bytes(entry_id).decode("ascii", errors="replace")
    head, _, _ = str(entry_id).partition("-")
    return int(head) if head.isdigit() else None

"""The figures operators alert on, in the Prometheus text format (version 0.0.4).

`read_snapshot(client, base)` reads Redis into a plain `Snapshot`; `render(snapshot)` is pure
and turns it into the text node_exporter's textfile collector reads. The audit daemon writes
the result atomically every few seconds (eexit/audit.py); docs/OPERATIONS.md has alert rules.

Clocks: every age is the Redis server's TIME minus the millisecond part of a stream entry id,
both on Redis's clock, so no two hosts' clocks are ever compared (SPEC §4.7).

Fail-closed readings: a daemon with no heartbeat at all has age +Inf and is not up; a missing or
unreadable `halted` counts as halted (as the trading code must read it); an unknown number is
NaN, never 0.
"""

import json
import math
from dataclasses import dataclass, field, replace

from . import __version__, schema

HEARTBEATS = (("exit_brain", schema.HEARTBEAT_STREAM),
              ("eew", schema.EEW_HEARTBEAT_STREAM),
              ("watchdog", schema.WATCHDOG_HEARTBEAT_STREAM))
EXPECTED_GROUPS = (schema.EEW_GROUP,)   # the audit logger reads with XREAD: no group of its own
HEARTBEAT_STATES = ("OK", "DEGRADED", "STOPPED", "UNKNOWN")
PANIC_STATES = (*schema.REPORT_STATUSES, "UNKNOWN", "NONE")

REPORT_SCAN = 100      # newest completion reports searched for the last non-DUPLICATE one
PANIC_SCAN = 1000      # newest panic entries searched for the first publication of its event
UNDELIVERED_CAP = 1000  # undelivered entries are counted up to this many


@dataclass
class Counters:
    """The `_total` counters: sums over every panic entry and completion report in the audit
    file, counted as the audit daemon reads its file at start and as it appends. They survive
    restarts and grow only while the file does (a new file is a counter reset, which
    Prometheus's rate() handles). Labels are bounded: an issuer or status outside the schema
    counts as "other" / "UNKNOWN"."""

    panics: dict = field(default_factory=lambda: dict.fromkeys((*schema.KNOWN_ISSUERS, "other"), 0))
    reports: dict = field(default_factory=lambda: dict.fromkeys((*schema.REPORT_STATUSES, "UNKNOWN"), 0))
    orders_sent: int = 0
    orders_rejected: int = 0
    halt_violations: int = 0

    def add(self, stream, fields):
        if stream == schema.PANIC_STREAM:
            issuer = fields.get("issued_by", "")
            self.panics[issuer if issuer in schema.KNOWN_ISSUERS else "other"] += 1
        elif stream == schema.COMPLETED_STREAM:
            status = fields.get("status", "")
            self.reports[status if status in schema.REPORT_STATUSES else "UNKNOWN"] += 1
            self.orders_sent += _count(fields.get("orders_sent"))
            self.orders_rejected += _count(fields.get("orders_rejected"))
            if fields.get("reason") == HALT_VIOLATION and status != "DUPLICATE":
                self.halt_violations += 1


HALT_VIOLATION = "HALT_VIOLATION"


def _count(text):
    """A report's count field; absent or malformed adds nothing (the report itself is still
    counted by status)."""
    try:
        return max(0, int(text)) if text is not None else 0
    except ValueError:
        return 0


@dataclass(frozen=True)
class Snapshot:
    redis_up: bool
    audit_lines: int | None = None
    audit_last_append_ms: int | None = None      # the audit host's wall clock
    server_ms: int | None = None                 # Redis TIME when the snapshot was read
    heartbeats: dict = field(default_factory=dict)   # daemon -> (entry_id, fields) or None
    trading_state: dict = field(default_factory=dict)  # the hash; {} when absent
    last_report: tuple | None = None             # (entry_id, fields) of the newest non-DUPLICATE report
    last_report_panic_id: str | None = None      # entry id of that event's first panic entry
    panic_entries: int = 0
    completed_entries: int = 0
    groups: tuple = ()                           # ({name, pending, consumers, undelivered}, ...)
    counters: Counters | None = None             # from the audit file; None: not known
    risk_values: dict = field(default_factory=dict)  # the risk kernel's rule -> value (issue 25); {}: not running


def _text(value):
    return bytes(value).decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _fields(raw):
    return {_text(key): _text(value) for key, value in (raw or {}).items()}


def read_snapshot(client, base):
    """Read everything `render` needs from Redis. Raises the Redis error (the caller reports
    redis_up 0 next round)."""
    heartbeats = {}
    for daemon, stream in HEARTBEATS:
        newest = client.xrevrange(stream, count=1)
        heartbeats[daemon] = (_text(newest[0][0]), _fields(newest[0][1])) if newest else None
    last_report = None
    for entry_id, raw in client.xrevrange(schema.COMPLETED_STREAM, count=REPORT_SCAN):
        fields = _fields(raw)
        if fields.get("status") != "DUPLICATE":
            last_report = (_text(entry_id), fields)
            break
    panic_id = None
    if last_report is not None and last_report[1].get("event_id"):
        for entry_id, raw in client.xrevrange(schema.PANIC_STREAM, max=last_report[0], count=PANIC_SCAN):
            if _fields(raw).get("event_id") == last_report[1]["event_id"]:
                panic_id = _text(entry_id)     # keep going: the first publication is the oldest
    panic_entries = client.xlen(schema.PANIC_STREAM)
    return replace(
        base,
        redis_up=True,
        server_ms=_server_ms(client),
        heartbeats=heartbeats,
        trading_state=_fields(client.hgetall(schema.TRADING_STATE_KEY)),
        last_report=last_report,
        last_report_panic_id=panic_id,
        panic_entries=panic_entries,
        completed_entries=client.xlen(schema.COMPLETED_STREAM),
        groups=tuple(_read_groups(client, panic_entries)),
        risk_values=_read_risk_values(client),
    )


def _read_risk_values(client):
    """The risk kernel's last values per rule (eexit:risk:state, written by eexit/risk.py)."""
    raw = client.get(RISK_STATE_KEY)
    if raw is None:
        return {}
    try:
        values = json.loads(_text(raw)).get("values") or {}
    except ValueError:
        return {"unreadable": None}     # shown as NaN: the state is there but not readable
    return {str(rule): value for rule, value in values.items()}


RISK_STATE_KEY = "eexit:risk:state"


def _server_ms(client):
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _read_groups(client, panic_entries):
    infos = client.xinfo_groups(schema.PANIC_STREAM) if panic_entries or client.exists(schema.PANIC_STREAM) else []
    found = {}
    for info in infos:
        name = _text(info["name"])
        last_delivered = _text(info["last-delivered-id"])
        # Entries after last-delivered-id were never handed to any consumer of the group: a
        # panic the EEW has not even seen. Counted with XRANGE (Redis >= 5; "lag" needs 7).
        after = client.xrange(schema.PANIC_STREAM, min=last_delivered, max="+", count=UNDELIVERED_CAP + 1)
        undelivered = sum(1 for entry_id, _ in after if _text(entry_id) != last_delivered)
        found[name] = {"name": name, "pending": int(info["pending"]), "consumers": int(info["consumers"]),
                       "undelivered": min(undelivered, UNDELIVERED_CAP)}
    for name in EXPECTED_GROUPS:
        # A missing group (never created, or lost with a Redis restart) will be created at "0":
        # every entry in the stream is still to be delivered to it.
        found.setdefault(name, {"name": name, "pending": 0, "consumers": 0,
                                "undelivered": min(panic_entries, UNDELIVERED_CAP)})
    return sorted(found.values(), key=lambda group: group["name"])


# ------------------------------------------------------------------ render (pure) ----

class _Families:
    def __init__(self):
        self.lines = []

    def add(self, name, kind, help_text, samples):
        """samples: [(labels dict, value)]. HELP and TYPE once, then the samples together."""
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
            self.lines.append(f"{name}{{{label_text}}} {_value(value)}" if label_text else f"{name} {_value(value)}")

    def text(self):
        return "\n".join(self.lines) + "\n"


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text):
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value):
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _seconds(ms):
    return None if ms is None else ms / 1000


def heartbeat_reading(entry, server_ms):
    """(age seconds, status, active positions) of a daemon's newest heartbeat entry."""
    if entry is None:
        return math.inf, "UNKNOWN", None
    entry_id, fields = entry
    beat, _problems = schema.Heartbeat.from_fields(fields)
    sent_ms = schema.entry_id_ms(entry_id)
    age = math.inf if sent_ms is None or server_ms is None else max(0, server_ms - sent_ms) / 1000
    status = beat.status if beat.status in HEARTBEAT_STATES else "UNKNOWN"
    return age, status, beat.active_positions


def render(snapshot, up_max_age_s=5.0):
    out = _Families()
    out.add("eexit_redis_up", "gauge", "1 if the audit daemon could read Redis for this snapshot.",
            [({}, snapshot.redis_up)])
    out.add("eexit_audit_lines", "gauge", "Lines in the audit file (seq of the last line). "
            "It must never decrease.", [({}, snapshot.audit_lines)])
    out.add("eexit_audit_last_append_timestamp_seconds", "gauge",
            "When the audit daemon last appended a line (its wall clock); NaN if not since start.",
            [({}, _seconds(snapshot.audit_last_append_ms))])
    out.add("eexit_build_info", "gauge", "Always 1; the label names the eexit version writing this file.",
            [({"version": __version__}, 1)])
    if snapshot.counters is not None:
        _render_counters(out, snapshot.counters)
    if not snapshot.redis_up:
        return out.text()

    readings = {daemon: heartbeat_reading(snapshot.heartbeats.get(daemon), snapshot.server_ms)
                for daemon, _stream in HEARTBEATS}
    out.add("eexit_heartbeat_age_seconds", "gauge",
            "Age of the newest heartbeat on the Redis server's clock; +Inf if there is none.",
            [({"daemon": daemon}, readings[daemon][0]) for daemon, _ in HEARTBEATS])
    out.add("eexit_heartbeat_status", "gauge", "1 for the status of the newest heartbeat.",
            [({"daemon": daemon, "status": state}, readings[daemon][1] == state)
             for daemon, _ in HEARTBEATS for state in HEARTBEAT_STATES])
    out.add("eexit_heartbeat_active_positions", "gauge",
            "active_positions of the newest heartbeat; NaN if unknown.",
            [({"daemon": daemon}, readings[daemon][2]) for daemon, _ in HEARTBEATS])
    out.add("eexit_up", "gauge", f"1 if the daemon's newest heartbeat is at most {up_max_age_s:g} s old.",
            [({"daemon": daemon}, readings[daemon][0] <= up_max_age_s) for daemon, _ in HEARTBEATS])

    state, _problems = schema.TradingState.from_fields(snapshot.trading_state)
    out.add("eexit_trading_halted", "gauge",
            "1 unless system:state:trading says halted=false (missing or unreadable counts as halted).",
            [({}, state.halted is not False)])
    out.add("eexit_trading_state_present", "gauge", "1 if the hash system:state:trading exists.",
            [({}, bool(snapshot.trading_state))])

    _render_last_panic(out, snapshot)

    out.add("eexit_panic_stream_entries", "gauge", "Entries in system:panic_close (never trimmed).",
            [({}, snapshot.panic_entries)])
    out.add("eexit_completed_stream_entries", "gauge",
            "Entries in system:panic_close:completed (never trimmed).", [({}, snapshot.completed_entries)])
    for name, help_text in (
            ("pending", "Entries delivered to the group and not yet acknowledged."),
            ("undelivered", f"Entries not yet delivered to the group (counted up to {UNDELIVERED_CAP})."),
            ("consumers", "Consumers known to the group.")):
        out.add(f"eexit_group_{name}", "gauge", help_text,
                [({"stream": schema.PANIC_STREAM, "group": group["name"]}, group[name])
                 for group in snapshot.groups])
    if snapshot.risk_values:
        out.add("eexit_risk_value", "gauge", "The risk kernel's value per rule at its last valid snapshot "
                "(drawdown, daily_loss, margin: fractions; liquidation: distance; NaN: unknown).",
                [({"rule": rule}, value) for rule, value in sorted(snapshot.risk_values.items())])
    out.add("eexit_metrics_timestamp_seconds", "gauge", "Redis server time of this snapshot.",
            [({}, _seconds(snapshot.server_ms))])
    return out.text()


def _render_counters(out, counters):
    out.add("eexit_panics_total", "counter", "Panic entries in the audit trail, by issued_by.",
            [({"issuer": issuer}, n) for issuer, n in counters.panics.items()])
    out.add("eexit_reports_total", "counter", "Completion reports in the audit trail, by status.",
            [({"status": status}, n) for status, n in counters.reports.items()])
    out.add("eexit_orders_sent_total", "counter", "Close orders the EEW sent and the exchange accepted "
            "(report field orders_sent).", [({}, counters.orders_sent)])
    out.add("eexit_orders_rejected_total", "counter", "Close orders refused or failed "
            "(report field orders_rejected).", [({}, counters.orders_rejected)])
    out.add("eexit_halt_violations_total", "counter",
            f"Reports (not DUPLICATE) of panics with reason {HALT_VIOLATION}.", [({}, counters.halt_violations)])


def _render_last_panic(out, snapshot):
    report, problems = (None, []) if snapshot.last_report is None else \
        schema.CompletionReport.from_fields(snapshot.last_report[1])
    # A status outside the schema is UNKNOWN, never a label of its own: label values written
    # by any Redis client would otherwise grow the series without bound.
    status = "NONE" if report is None else report.status if report.status in schema.REPORT_STATUSES else "UNKNOWN"
    out.add("eexit_last_panic_status", "gauge",
            "1 for the status of the newest completion report that is not a DUPLICATE.",
            [({"status": state}, status == state) for state in PANIC_STATES])
    to_flat = None
    completed_ms = None if report is None else schema.entry_id_ms(snapshot.last_report[0])
    if status == "FLAT" and snapshot.last_report_panic_id is not None:
        panic_ms = schema.entry_id_ms(snapshot.last_report_panic_id)
        if panic_ms is not None and completed_ms is not None:
            to_flat = max(0, completed_ms - panic_ms) / 1000
    out.add("eexit_last_panic_time_to_flat_seconds", "gauge",
            "From the panic's first publication to its FLAT report, on the Redis clock; NaN unless FLAT.",
            [({}, to_flat)])
    out.add("eexit_last_panic_execution_seconds", "gauge",
            "execution_time_ms of the newest report, in seconds; NaN if none.",
            [({}, None if report is None else _seconds(report.execution_time_ms))])
    out.add("eexit_last_panic_completed_timestamp_seconds", "gauge",
            "When the newest report was published (Redis clock); NaN if none.",
            [({}, _seconds(completed_ms))])
    residual = None
    if report is not None and "bad_json:residual_positions" not in problems:
        if "residual_positions" in snapshot.last_report[1]:
            residual = len(report.residual_positions)
        elif status == "FLAT":
            residual = 0
    out.add("eexit_last_panic_residual_positions", "gauge",
            "Positions still open after the newest panic (residual_positions); NaN if unknown.",
            [({}, residual)])
    out.add("eexit_last_panic_positions_failed", "gauge",
            "positions_failed of the newest report; NaN if unknown.",
            [({}, None if report is None else report.positions_failed)])

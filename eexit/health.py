"""What `eexit status` reads and decides: is the safety chain healthy right now?

gather_status() reads the trading state, each daemon's latest heartbeat, the recent panics and
their reports, the pending entries and the halt guard, as plain data; the decisions
(daemon_problems, status_exit_code) are pure functions over it. Ages are measured on Redis's
clock. Apart from eexit/ops.py because the crash hook imports ops: the hook's path carries
none of this. `eexit status` (eexit/cli.py) renders it and adds the optional services'
sections (the alert outbox)."""

from . import bus, ops, schema

DAEMON_STREAMS = (("exit_brain", schema.HEARTBEAT_STREAM),
                  ("eew", schema.EEW_HEARTBEAT_STREAM),
                  ("watchdog", schema.WATCHDOG_HEARTBEAT_STREAM))


BRAIN_BEATS_SCANNED = 200    # newest entries of exit_brain:heartbeat searched for the brain's own beat


def newest_beat(client, stream, service_id=None):
    """(entry_id, fields) of the newest heartbeat on `stream`, or of the newest one whose
    service_id is `service_id`: other producers may beat on the brain's stream (a bot), and the
    watchdog judges only the brain's own beats, so status must too. None when there is none
    among the newest BRAIN_BEATS_SCANNED entries (shown as SILENT: fail-closed)."""
    if service_id is None:
        return ops.latest(client, stream)
    for entry_id, fields in client.xrevrange(stream, count=BRAIN_BEATS_SCANNED) or []:
        fields = ops.decoded(fields)
        if fields.get("service_id") == service_id:
            return ops.text(entry_id), fields
    return None


def gather_status(client, events=5, brain_service_id="exit_brain"):
    """What `eexit status` shows of the safety chain, as plain data (cli adds the sections of
    optional services, e.g. the alert outbox). The brain is judged by its own beats only
    (brain_service_id, EEXIT_BRAIN_SERVICE_ID). Raises bus.REDIS_ERRORS."""
    now_ms = bus.server_time_ms(client)
    state, problems, present = ops.read_state(client)
    daemons = {}
    for name, stream in DAEMON_STREAMS:
        last = newest_beat(client, stream, brain_service_id if name == "exit_brain" else None)
        if last is None:
            daemons[name] = {"stream": stream, "age_ms": None, "status": None}
            continue
        entry_id, fields = last
        beat, _ = schema.Heartbeat.from_fields(fields)
        sent_ms = schema.entry_id_ms(entry_id)
        daemons[name] = {"stream": stream, "age_ms": None if sent_ms is None else max(0, now_ms - sent_ms),
                         "status": beat.status or None, "service_id": beat.service_id,
                         "active_positions": beat.active_positions,
                         # Why a daemon says it cannot do its job (blind, exchange
                         # authentication, panics rejected): `reason`/`detail`, or the Exit
                         # Brain's `degraded_reason` (cycle_overrun, cycle_failed:<type>, ...).
                         "reason": beat.extra.get("reason") or beat.extra.get("degraded_reason") or None,
                         "detail": beat.extra.get("detail") or None}
    recent = []
    for entry_id, fields in client.xrevrange(schema.PANIC_STREAM, count=events) or []:
        fields = ops.decoded(fields)
        event, _ = schema.PanicEvent.from_fields(fields)
        reports = ops.find_reports(client, event.event_id) if event.event_id else []
        recent.append({"entry_id": ops.text(entry_id), "event_id": event.event_id, "reason": event.reason,
                       "issued_by": event.issued_by, "ts": event.ts,
                       "reports": [ops.report_dict(rid, r) for rid, r in reports]})
    return {
        "now_ms": now_ms,
        "trading": {"present": present, "halted": state.halted, "reason": state.reason,
                    "event_id": state.event_id, "halted_at": state.halted_at,
                    "halted_by": state.halted_by,
                    "requires_manual_reset": state.requires_manual_reset,
                    "cleared_by": state.cleared_by, "cleared_at": state.cleared_at,
                    "problems": problems},
        "daemons": daemons,
        "panics": recent,
        "pending": ops.pending_summary(client),
        "guard": guard_summary(client, now_ms),
    }


def guard_summary(client, now_ms):
    """The EEW's halt guard: who holds the lease (and for how long yet), and the holder's
    status hash (last check, last enforcement; see eexit/eew.py Worker.halt_guard)."""
    status = ops.decoded(client.hgetall(schema.GUARD_KEY))
    holder = client.get(schema.GUARD_LEASE_KEY)
    ages = {name: max(0, now_ms - int(status[f"{name}_ms"])) if status.get(f"{name}_ms", "").isdigit() else None
            for name in ("last_check", "last_enforcement")}
    return {"lease_holder": ops.text(holder) if holder is not None else None,
            "lease_ttl_s": client.ttl(schema.GUARD_LEASE_KEY) if holder is not None else None,
            "last_check": status.get("last_check"), "last_check_age_ms": ages["last_check"],
            "last_enforcement": status.get("last_enforcement"),
            "last_enforcement_event_id": status.get("last_enforcement_event_id"),
            "last_enforcement_age_ms": ages["last_enforcement"],
            "policy": status.get("policy"), "halt_event_id": status.get("halt_event_id")}


def describe_reason(reason, detail=None):
    """A heartbeat's `reason` code in words: exchange_authentication -> "exchange
    authentication"; the daemon's `detail`, if any, follows."""
    words = reason.replace("_", " ")
    return f"{words} ({detail})" if detail else words


def daemon_problems(status, silent_ms):
    """["eew: DEGRADED: exchange authentication (...)", "exit_brain: SILENT ..."]: each daemon
    that is silent (no heartbeat younger than silent_ms), not OK (DEGRADED, or a status this
    version does not know: the watchdog reads it as DEGRADED too), or whose latest heartbeat
    names a reason why it cannot do its job. A DEGRADED beat without a reason says so."""
    problems = []
    for name, daemon in status["daemons"].items():
        if daemon["age_ms"] is None or daemon["age_ms"] > silent_ms:
            problems.append(f"{name}: SILENT (no heartbeat for {silent_ms / 1000:g} s)")
        elif daemon.get("reason") or daemon.get("status") != "OK":
            why = describe_reason(daemon["reason"], daemon.get("detail")) if daemon.get("reason") else "no reason given"
            problems.append(f"{name}: {daemon.get('status') or 'unknown status'}: {why}")
    return problems


def status_exit_code(status, silent_ms):
    """2 if a daemon is silent, not OK, or says why it cannot do its job (daemon_problems),
    else 1 if trading is halted (a missing or unreadable flag counts as halted, as trading
    code reads it), else 0. A missing or degraded guard outranks a halt: protection is
    missing right now. Never 0 beside a DEGRADED Exit Brain."""
    if daemon_problems(status, silent_ms):
        return 2
    return 0 if status["trading"]["halted"] is False else 1

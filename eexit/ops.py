"""What the operator tools do, as functions over a Redis client: read the system's state,
publish a panic and wait for ITS report, and clear a halt. `eexit/cli.py` renders the results;
`tools/test_panic_close.py` and `tools/chaos.py` reuse them. Not imported by any daemon.

Decisions (is the system healthy, may trading resume) are pure functions over plain data at
the bottom of this file; ages are measured on ONE clock, the Redis server's (TIME against the
millisecond part of stream entry ids), so a skewed operator laptop changes nothing.

Stream written here besides the wire contract: `eexit:ops:audit` (see
docs/REDIS_STREAMS_SCHEMA.md, "Operator audit"): one entry per resume.
"""

import getpass
import json
import socket
import time
import uuid
from dataclasses import dataclass, field

import redis

from . import alert, bus, schema, signing
from .config import ConfigError

OPS_AUDIT_STREAM = "eexit:ops:audit"
OPS_AUDIT_MAXLEN = None          # never trimmed: it is the record of who resumed trading
DAEMON_STREAMS = (("exit_brain", schema.HEARTBEAT_STREAM),
                  ("eew", schema.EEW_HEARTBEAT_STREAM),
                  ("watchdog", schema.WATCHDOG_HEARTBEAT_STREAM))
FINAL_STATUSES = ("FLAT", "RESIDUAL", "FAILED")
SCAN_PAGE = 500


def text(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def decoded(fields):
    return {text(k): text(v) for k, v in (fields or {}).items()}


def connect(env=None):
    """bus.connect for the operator tools; a REDIS_URL that redis-py cannot parse (port out of
    range, not a number) is the configuration error it is, naming the variable (exit 2)."""
    try:
        return bus.connect(env=env)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL cannot be used: {exc}") from None


# ---------------------------------------------------------------------------- reading

def iter_reverse(client, stream, page=SCAN_PAGE):
    """(entry_id, fields) newest first, paging through the whole stream."""
    upper = "+"
    while True:
        batch = client.xrevrange(stream, max=upper, min="-", count=page)
        if not batch:
            return
        for entry_id, fields in batch:
            yield text(entry_id), decoded(fields)
        if len(batch) < page:
            return
        last = text(batch[-1][0])
        upper = "(" + last


def latest(client, stream):
    batch = client.xrevrange(stream, count=1)
    if not batch:
        return None
    return text(batch[0][0]), decoded(batch[0][1])


def find_event(client, event_id):
    """(entry_id, PanicEvent) of the newest panic entry with this event_id, or None."""
    for entry_id, fields in iter_reverse(client, schema.PANIC_STREAM):
        if fields.get("event_id") == event_id:
            event, _problems = schema.PanicEvent.from_fields(fields)
            return entry_id, event
    return None


def find_reports(client, event_id):
    """[(entry_id, CompletionReport)] for event_id, oldest first."""
    found = []
    for entry_id, fields in iter_reverse(client, schema.COMPLETED_STREAM):
        if fields.get("event_id") == event_id:
            report, _problems = schema.CompletionReport.from_fields(fields)
            found.append((entry_id, report))
    found.reverse()
    return found


def final_report(reports):
    """The first FLAT/RESIDUAL/FAILED report, or None."""
    for entry_id, report in reports:
        if report.status in FINAL_STATUSES:
            return entry_id, report
    return None


def read_state(client):
    raw = decoded(client.hgetall(schema.TRADING_STATE_KEY))
    state, problems = schema.TradingState.from_fields(raw)
    return state, problems, bool(raw)


def pending_summary(client):
    """{stream: {group: {"pending": n, "consumers": {name: n}, "lag": n|None}}} for the panic
    and completion streams. A missing stream is simply absent."""
    summary = {}
    for stream in (schema.PANIC_STREAM, schema.COMPLETED_STREAM):
        try:
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:
            continue   # no such stream yet: nothing is pending on it
        per_group = {}
        for group in groups:
            name = text(group.get("name"))
            detail = client.xpending(stream, name)
            consumers = {text(c.get("name")): int(c.get("pending", 0))
                         for c in detail.get("consumers") or []}
            lag = group.get("lag")
            per_group[name] = {"pending": int(detail.get("pending", 0)), "consumers": consumers,
                               "lag": None if lag is None else int(lag)}
        summary[stream] = per_group
    return summary


def gather_status(client, events=5):
    """Everything `eexit status` shows, as plain data. Raises bus.REDIS_ERRORS."""
    now_ms = bus.server_time_ms(client)
    state, problems, present = read_state(client)
    daemons = {}
    for name, stream in DAEMON_STREAMS:
        last = latest(client, stream)
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
                         # authentication, panics rejected): a generic pair any daemon sets.
                         "reason": beat.extra.get("reason") or None, "detail": beat.extra.get("detail") or None}
    recent = []
    for entry_id, fields in client.xrevrange(schema.PANIC_STREAM, count=events) or []:
        fields = decoded(fields)
        event, _ = schema.PanicEvent.from_fields(fields)
        reports = find_reports(client, event.event_id) if event.event_id else []
        recent.append({"entry_id": text(entry_id), "event_id": event.event_id, "reason": event.reason,
                       "issued_by": event.issued_by, "ts": event.ts,
                       "reports": [report_dict(rid, r) for rid, r in reports]})
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
        "pending": pending_summary(client),
        "guard": guard_summary(client, now_ms),
        "alerts": alert.read_outbox_status(client, now_ms),
    }


def guard_summary(client, now_ms):
    """The EEW's halt guard: who holds the lease (and for how long yet), and the holder's
    status hash (last check, last enforcement; see eexit/eew.py Worker.halt_guard)."""
    status = decoded(client.hgetall(schema.GUARD_KEY))
    holder = client.get(schema.GUARD_LEASE_KEY)
    ages = {name: max(0, now_ms - int(status[f"{name}_ms"])) if status.get(f"{name}_ms", "").isdigit() else None
            for name in ("last_check", "last_enforcement")}
    return {"lease_holder": text(holder) if holder is not None else None,
            "lease_ttl_s": client.ttl(schema.GUARD_LEASE_KEY) if holder is not None else None,
            "last_check": status.get("last_check"), "last_check_age_ms": ages["last_check"],
            "last_enforcement": status.get("last_enforcement"),
            "last_enforcement_event_id": status.get("last_enforcement_event_id"),
            "last_enforcement_age_ms": ages["last_enforcement"],
            "policy": status.get("policy"), "halt_event_id": status.get("halt_event_id")}


def report_dict(entry_id, report):
    return {"entry_id": entry_id, "event_id": report.event_id, "status": report.status,
            "positions_total": report.positions_total, "positions_closed": report.positions_closed,
            "positions_failed": report.positions_failed, "failed_symbols": report.failed_symbols,
            "residual_positions": report.residual_positions, "orders_cancelled": report.orders_cancelled,
            "ts_started": report.ts_started, "ts_completed": report.ts_completed,
            "execution_time_ms": report.execution_time_ms, "detail": report.detail,
            "issued_by": report.issued_by, "reason": report.reason, "scope": report.scope}


# ---------------------------------------------------------------------------- panic

@dataclass
class Published:
    event: schema.PanicEvent
    entry_id: str
    completed_after: str        # the completion stream's last id before publishing
    published_mono: float
    fields: dict = field(default_factory=dict)


def build_panic(reason, issued_by, keyring, context=None, now_ms=None):
    """Schema-correct panic fields, signed with the issuer's key when a key ring is
    configured. Raises ValueError when keys are configured but none belongs to issued_by:
    an unsigned event would only be REJECTED by the EEW."""
    event = schema.PanicEvent(event_id=str(uuid.uuid4()), reason=reason, issued_by=issued_by,
                              ts=int(time.time() * 1000) if now_ms is None else now_ms)
    if context:
        event.extra["context"] = json.dumps(context, separators=(",", ":"), sort_keys=True)
    fields = event.to_fields()
    if keyring.configured:
        kid = keyring.kid_for(issued_by)
        if kid is None:
            raise ValueError(f"panic keys are configured but none belongs to issuer {issued_by!r}: "
                             f"the EEW would reject the event (add a key for {issued_by})")
        fields = signing.sign_fields(fields, kid, keyring)
    return event, fields


def operator_context(**more):
    context = {"host": socket.gethostname()}
    try:
        context["user"] = getpass.getuser()
    except (KeyError, OSError):
        pass   # no user name in a container without passwd entry: the context is optional
    context.update({k: v for k, v in more.items() if v is not None})
    return context


def publish_panic(client, event, fields):
    """XADD the event; remembers where the completion stream stood so that the wait reads
    every report published after this moment (never misses one published very fast)."""
    last = latest(client, schema.COMPLETED_STREAM)
    completed_after = last[0] if last else "0-0"
    entry_id = text(client.xadd(schema.PANIC_STREAM, fields))
    return Published(event, entry_id, completed_after, time.monotonic(), fields)


def wait_for_report(client_factory, published, timeout_s, progress=None, block_ms=500):
    """The final report carrying published.event.event_id, or None at the timeout. Reports of
    other events, and DUPLICATE reports, are skipped: the answer is about THIS event.
    Redis errors are retried with a fresh client until the deadline (the report may still
    come; giving up early would turn a Redis blip into a false failure). progress(elapsed_s,
    note) is called about every block."""
    event_id = published.event.event_id
    after = published.completed_after
    deadline = published.published_mono + timeout_s
    client = client_factory()
    block_ms = min(block_ms, bus.BLOCK_MS_MAX)
    note = "waiting"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            reply = client.xread({schema.COMPLETED_STREAM: after}, count=100,
                                 block=max(1, min(block_ms, int(remaining * 1000))))
            note = "waiting"
        except bus.REDIS_ERRORS as exc:
            # Keep waiting with a fresh connection: Redis may be restarting.
            note = f"redis unavailable ({type(exc).__name__}), retrying"
            reply = None
            time.sleep(min(0.2, max(0.0, remaining)))
            client = client_factory()
        for _stream, items in reply or []:
            for entry_id, fields in items:
                after = text(entry_id)
                fields = decoded(fields)
                if fields.get("event_id") != event_id:
                    continue
                report, _problems = schema.CompletionReport.from_fields(fields)
                if report.status != "DUPLICATE":
                    return after, report
        if progress:
            progress(time.monotonic() - published.published_mono, note)


# ---------------------------------------------------------------------------- resume

@dataclass
class ResumeFacts:
    """What `resume` found, all plain data, for the pure decision below."""
    ack: str
    now_ms: int
    state: schema.TradingState
    state_present: bool
    event_found: bool
    final: tuple | None                 # (entry_id, CompletionReport) or None
    positions: list | None              # [Position] read from the exchange; None = not read
    open_orders: list | None
    exchange_error: str | None
    cooldown_s: float


def resume_refusals(facts, accept_residual):
    """Reasons (strings) to refuse clearing the halt; empty means clear it."""
    reasons = []
    state = facts.state
    if not facts.event_found:
        reasons.append(f"unknown event id {facts.ack}: no such event on {schema.PANIC_STREAM}")
        return reasons
    if state.halted is False:
        reasons.append("trading is not halted: nothing to resume")
        return reasons
    if state.event_id and state.event_id != facts.ack:
        reasons.append(f"trading was halted by event {state.event_id}, not {facts.ack}: "
                       f"acknowledge the event that halted it")
    if facts.final is None:
        reasons.append(f"no final report for event {facts.ack} on {schema.COMPLETED_STREAM}: "
                       f"the emergency exit has not finished (or never ran)")
    else:
        report_ms = schema.entry_id_ms(facts.final[0]) or 0
        waited_s = (facts.now_ms - report_ms) / 1000.0
        if waited_s < facts.cooldown_s:
            reasons.append(f"cooldown: the report is {waited_s:.0f} s old, resume is allowed "
                           f"{facts.cooldown_s - waited_s:.0f} s from now "
                           f"(EEXIT_RESUME_COOLDOWN_S={facts.cooldown_s:g})")
    if facts.exchange_error is not None:
        reasons.append(f"cannot verify the account on the exchange: {facts.exchange_error}")
    elif facts.positions is not None and not accept_residual:
        if facts.positions:
            listed = ", ".join(f"{p.symbol} {p.side} {p.contracts:g}" for p in facts.positions)
            reasons.append(f"the account is not flat: {listed} (close them, or pass --accept-residual)")
        if facts.open_orders:
            reasons.append(f"{len(facts.open_orders)} open order(s) on the exchange "
                           f"(cancel them, or pass --accept-residual)")
    return reasons


def read_account(env=None):
    """(positions, open_orders, error_text) from the configured exchange. ccxt is imported
    here, not at module load: status and panic must work on a host without exchange access."""
    from . import exchange   # noqa: PLC0415 - ccxt costs ~0.5 s; only resume and the drill need it
    try:
        cfg = exchange.ExchangeConfig.from_env(env)
        ex = exchange.build_exchange(cfg)
        return exchange.read_positions(ex), exchange.read_open_orders(ex), None
    except Exception as exc:  # noqa: BLE001 - any failure means "not verified", reported as such
        return None, None, f"{type(exc).__name__}: {str(exc)[:300]}"


def gather_resume_facts(client, ack, cooldown_s, env=None, account_reader=read_account):
    state, _problems, present = read_state(client)
    found = find_event(client, ack)
    final = final_report(find_reports(client, ack)) if found else None
    positions = orders = error = None
    if found and final is not None:
        positions, orders, error = account_reader(env)
    return ResumeFacts(ack=ack, now_ms=bus.server_time_ms(client), state=state, state_present=present,
                       event_found=found is not None, final=final, positions=positions,
                       open_orders=orders, exchange_error=error, cooldown_s=cooldown_s)


class StateChanged(Exception):
    """The halt hash changed between the checks and the write (e.g. a new panic)."""


def clear_halt(client, facts, operator, accept_residual):
    """Write halted=false with cleared_by/cleared_at and the audit entry, atomically, and only
    if the halt hash is still what the checks saw. Returns the audit entry id."""
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(schema.TRADING_STATE_KEY)
            current, _, _ = read_state(pipe)
            if current.event_id != facts.state.event_id or current.halted != facts.state.halted:
                raise StateChanged(f"the halt changed meanwhile (now event {current.event_id or '-'}); "
                                   f"run `eexit status` and try again")
            seconds, micros = pipe.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            report_entry, report = facts.final
            audit = {
                "action": "resume", "operator": operator, "event_id": facts.ack, "ts": str(now_ms),
                "accept_residual": "true" if accept_residual else "false",
                "residual_positions": json.dumps([
                    {"symbol": p.symbol, "side": p.side, "contracts": p.contracts,
                     "position_side": p.position_side} for p in facts.positions or []],
                    separators=(",", ":")),
                "open_orders": str(len(facts.open_orders or [])),
                "report_entry_id": report_entry, "report_status": report.status,
                "halted_reason": current.reason, "halted_by": current.halted_by,
                "halted_at": "" if current.halted_at is None else str(current.halted_at),
                "host": socket.gethostname(),
            }
            pipe.multi()
            pipe.hset(schema.TRADING_STATE_KEY, mapping={
                "halted": "false", "requires_manual_reset": "false",
                "cleared_by": operator, "cleared_at": str(now_ms)})
            pipe.xadd(OPS_AUDIT_STREAM, audit)
            _hset, audit_id = pipe.execute()
            return text(audit_id)
        except redis.WatchError:
            raise StateChanged("the halt changed meanwhile (a new panic?); run `eexit status` and try again") from None


# ---------------------------------------------------------------------------- health

def describe_reason(reason, detail=None):
    """A heartbeat's `reason` code in words: exchange_authentication -> "exchange
    authentication"; the daemon's `detail`, if any, follows."""
    words = reason.replace("_", " ")
    return f"{words} ({detail})" if detail else words


def daemon_problems(status, silent_ms):
    """["eew: exchange authentication (...)", "brain: SILENT ..."]: each daemon that is silent
    (no heartbeat younger than silent_ms) or whose latest heartbeat names a reason why it
    cannot do its job."""
    problems = []
    for name, daemon in status["daemons"].items():
        if daemon["age_ms"] is None or daemon["age_ms"] > silent_ms:
            problems.append(f"{name}: SILENT (no heartbeat for {silent_ms / 1000:g} s)")
        elif daemon.get("reason"):
            problems.append(f"{name}: {daemon['status'] or '?'}: {describe_reason(daemon['reason'], daemon.get('detail'))}")
    return problems


def status_exit_code(status, silent_ms):
    """2 if a daemon is silent or says why it cannot do its job (daemon_problems), else 1 if
    trading is halted (a missing or unreadable flag counts as halted, as trading code reads
    it), else 0. A missing guard outranks a halt: protection is missing right now."""
    if daemon_problems(status, silent_ms):
        return 2
    return 0 if status["trading"]["halted"] is False else 1

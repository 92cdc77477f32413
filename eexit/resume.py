"""Lifting the halt, with one writer: the EEW (issue 14).

ACLs cannot tell `HSET system:state:trading halted true` from `... halted false`, so whoever
may write the halt may lift it without any check. Hence only the EEW's Redis user may write
the trading state; `eexit resume` asks, the EEW decides:

    eexit resume --operator NAME --ack EVENT_ID [--accept-residual]
      -> XADD system:resume_request  {request_id, action=resume, ack, operator,
                                      accept_residual, issued_by=ops, ts, expires_at, kid, sig}
         (built by ops.build_request: the EEW only checks and serves requests)
    EEW: signature (ops key, domain "eexit-resume-v1"), not expired (Redis clock),
         request_id claimed once in its ledger (a replayed copy gets no second verdict),
         then the refusals over facts it gathers itself, the cheap ones first: the halt,
         its own ledger record of the event, the final report on the completed stream, the
         cooldown on Redis's clock (EEXIT_RESUME_COOLDOWN_S, read by the EEW), whether the
         panic stream can still take entries, authorised panics not yet executed
         (panics_waiting); only if none of these refuses, a fresh read of the whole account
         on the exchange (the one expensive step: a request never costs a read it cannot use)
      -> under WATCH of the halt: not expired, no panic waiting (again), the halt as checked
      -> halt cleared + eexit:ops:audit entry in one MULTI
      -> XADD system:resume_verdict {request_id, status RESUMED | RESUME_REFUSED, refusals, ...}
    eexit resume prints the verdict (exit 0 resumed, 1 refused, 3 no verdict in time: the
    outcome is unknown to it; `eexit status` shows the halt).

A request expires. `ts` and `expires_at` are stamped on Redis's clock (the CLI reads TIME), and
expires_at - ts is the CLI's wait (EEXIT_RESUME_TIMEOUT_S); the CLI waits VERDICT_GRACE_S
longer than that for the verdict. The EEW answers nothing expired, and checks the expiry again
right before its write, so a halt is never cleared by a request whose CLI has given up (the
write is one round trip after that check, well inside the grace).

No resume or init while an authorised panic waits (issue 26): an entry of the panic stream
pending in the EEW's group, or not yet read by it, or an event id in eexit:eew:inflight, whose
ledger record is not final, refuses. An EEW that died between reading a panic and writing its
halt would otherwise let a resume of the previous event restart trading until the entry is
reclaimed. "Authorised" is the signature check (any issuer): over-approximating only delays a
resume until the EEW has reported a forgery.

`eexit init` (the explicit first start) asks the same way, action "init": the EEW writes
halted=false (who, when, audit entry) only where no trading state exists; verdict INITIALISED
or INIT_REFUSED.

Why a verdict stream of its own and not the completed stream: the completed stream holds
panic reports, read by the watchdog and the audit logger as such; a verdict is not one.
Unsigned requests pass only where panics pass unsigned too (no key ring configured); then
the ACL (only ops may XADD a request) is the only check of who asked.

Pure: check_request, cheap_refusals, waiting_refusals, account_refusals, audit_fields, verdict_fields.
Shell (the EEW calls it, with its own exchange read): serve_request, panics_waiting.
"""

import json
from dataclasses import dataclass

import redis

from . import bus, schema, signing, tamper

REQUEST_STREAM = "system:resume_request"
VERDICT_STREAM = "system:resume_verdict"
OPS_AUDIT_STREAM = "eexit:ops:audit"
VERDICT_MAXLEN = 10_000                # approximate; a verdict matters for seconds
REQUEST_MAX_AGE_S = 600.0              # the longest a request may stay valid (the CLI's longest wait)
REQUEST_CORE = ("kid", "request_id", "action", "ack", "operator", "accept_residual", "issued_by", "ts",
                "expires_at")
REQUEST_DOMAIN = b"eexit-resume-v1\n"
REQUEST_ISSUER = "ops"
RESUMED, REFUSED = "RESUMED", "RESUME_REFUSED"
INITIALISED, INIT_REFUSED = "INITIALISED", "INIT_REFUSED"
ACTIONS = ("resume", "init")
LEDGER_PREFIX = "resume:"              # ledger field claiming one request id
WAITING_SCAN = 512                     # entries (pending, unread) checked; more refuses


# ---------------------------------------------------------------------------- the request

@dataclass(frozen=True)
class Request:
    request_id: str
    ack: str
    operator: str
    accept_residual: bool
    action: str = "resume"
    expires_at: int = 0                 # epoch ms, Redis clock


def check_request(fields, keyring, now_ms, max_age_s=REQUEST_MAX_AGE_S):
    """(Request, None) or (None, why). Never raises on any input."""
    ok, why = signing.verify_fields(fields, keyring, REQUEST_CORE, REQUEST_DOMAIN)
    if not ok:
        return None, f"bad_signature:{why}"
    get = fields.get
    if get("action") not in ACTIONS or get("issued_by") != REQUEST_ISSUER:
        return None, "not_a_resume_request_by_ops"
    if not get("request_id") or not get("ack") or not (get("operator") or "").strip() \
            or get("accept_residual") not in ("true", "false"):
        return None, "malformed"
    try:
        ts, expires_at = int(get("ts")), int(get("expires_at"))
    except (TypeError, ValueError):
        return None, "malformed:ts"
    if not ts < expires_at <= ts + max_age_s * 1000:
        return None, "malformed:expires_at"
    if now_ms > expires_at:
        return None, f"expired:{(now_ms - expires_at) / 1000:.0f}s_ago"
    if ts - now_ms > max_age_s * 1000:
        return None, f"from_the_future:{(ts - now_ms) / 1000:.0f}s"
    return Request(get("request_id"), get("ack"), get("operator").strip(), get("accept_residual") == "true",
                   get("action"), expires_at), None


# ---------------------------------------------------------------------------- the decision

@dataclass
class ResumeFacts:
    """What the EEW found, all plain data, for the pure decision below."""
    ack: str
    now_ms: int
    state: schema.TradingState
    event_found: bool
    final: tuple | None                 # (report entry id, CompletionReport) or None
    cooldown_s: float
    stream_broken: str | None = None    # the panic stream cannot take entries (tamper reason)
    positions: list | None = None       # [Position] read from the exchange; None = not read
    open_orders: list | None = None
    exchange_error: str | None = None


def cheap_refusals(facts):
    """Every reason to refuse that needs no exchange read (the account's facts are ignored):
    the EEW reads the account only when this is empty."""
    state = facts.state
    if not facts.event_found:
        return [f"unknown event id {facts.ack}: the EEW has no record of executing it"]
    if state.halted is False:
        return ["trading is not halted: nothing to resume"]
    reasons = []
    if state.event_id and state.event_id != facts.ack:
        reasons.append(f"trading was halted by event {state.event_id}, not {facts.ack}: "
                       f"acknowledge the event that halted it")
    if facts.stream_broken:
        reasons.append(f"the panic stream cannot take entries ({facts.stream_broken}): no panic "
                       f"could stop trading; repair {schema.PANIC_STREAM} first")
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
    return reasons


def account_refusals(facts, accept_residual):
    """The fresh account read's reasons to refuse; an account not read is one."""
    if facts.exchange_error is not None:
        return [f"cannot verify the account on the exchange: {facts.exchange_error}"]
    if facts.positions is None:
        return ["the account was not read: nothing shows it is flat"]
    reasons = []
    if not accept_residual:
        if facts.positions:
            listed = ", ".join(f"{p.symbol} {p.side} {p.contracts:g}" for p in facts.positions)
            reasons.append(f"the account is not flat: {listed} (close them, or pass --accept-residual)")
        if facts.open_orders:
            reasons.append(f"{len(facts.open_orders)} open order(s) on the exchange "
                           f"(cancel them, or pass --accept-residual)")
    return reasons


def waiting_refusals(waiting):
    """[] or the one refusal for authorised panics not executed yet (panics_waiting)."""
    if not waiting:
        return []
    shown = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
    return [f"an authorised panic is not executed yet ({shown}): the EEW halts for it next; wait for "
            f"its report (`eexit status`), then acknowledge the event that holds the halt"]


def panics_waiting(client, keyring, limit=WAITING_SCAN):
    """["<event_id> (pending|unread|in flight)"] for authorised panics without a final ledger
    record, over what Redis holds now: entries of the panic stream pending in the EEW's group
    or after its last-delivered id, and the event ids in eexit:eew:inflight. More than `limit`
    entries pending or unread cannot all be checked: that refuses too (fail-closed; the EEW
    works the backlog down). Raises the client's errors."""
    # No stream: nothing pending or unread. No group: the EEW creates it at 0 and reads the
    # whole stream, so all of it is unread.
    stream_info, group = tamper.read_stream_state(client)
    last = (group or {}).get("last-delivered-id") or "0-0"
    pending = [bus.as_text(item["message_id"]) for item in client.xpending_range(
        schema.PANIC_STREAM, schema.EEW_GROUP, "-", "+", limit + 1)] if group else []
    unread = client.xrange(schema.PANIC_STREAM, "(" + last, "+", count=limit + 1) if stream_info else []
    if len(pending) > limit or len(unread) > limit:
        return [f"more than {limit} panic entries pending or unread, not all checked"]
    entries = [(bus.as_text(entry_id), bus.decoded(fields), "unread") for entry_id, fields in unread]
    pipe = client.pipeline(transaction=False)
    for entry_id in pending:
        pipe.xrange(schema.PANIC_STREAM, entry_id, entry_id)
    # An entry deleted while pending has no content the EEW could execute: skipped here
    # (the EEW's tamper check reports deletions).
    entries += [(entry_id, bus.decoded(found[0][1]), "pending")
                for entry_id, found in zip(pending, pipe.execute()) if found]
    # (event id as the EEW derives it, where), authorised (any issuer) entries only
    waiting = [(fields.get("event_id") or f"entry-{entry_id}", where) for entry_id, fields, where in entries
               if signing.verify_fields(fields, keyring)[0]]
    inflight = sorted(bus.as_text(event_id) for event_id in client.smembers(schema.INFLIGHT_KEY))
    waiting += [(event_id, "in flight") for event_id in inflight]
    ids = sorted({event_id for event_id, _ in waiting})
    records = dict(zip(ids, client.hmget(schema.PROCESSED_KEY, ids))) if ids else {}
    return list(dict.fromkeys(f"{event_id} ({where})" for event_id, where in waiting
                              if (tamper.parse_record(records[event_id]) or {}).get("stage") != "done"))


def audit_fields(facts, request, state, now_ms, consumer):
    """The eexit:ops:audit entry of one init (facts None) or resume."""
    if facts is None:
        from . import __version__   # noqa: PLC0415 - the package's version, for the audit entry
        return {"action": "init", "operator": request.operator, "ts": str(now_ms), "version": __version__,
                "request_id": request.request_id, "cleared_by_consumer": consumer}
    report_entry, report = facts.final
    residual = [{"symbol": p.symbol, "side": p.side, "contracts": p.contracts,
                 "position_side": p.position_side} for p in facts.positions or []]
    return {"action": "resume", "operator": request.operator, "event_id": request.ack, "ts": str(now_ms),
            "accept_residual": "true" if request.accept_residual else "false",
            "residual_positions": json.dumps(residual, separators=(",", ":")),
            "open_orders": str(len(facts.open_orders or [])),
            "report_entry_id": report_entry, "report_status": report.status,
            "halted_reason": state.reason, "halted_by": state.halted_by,
            "halted_at": "" if state.halted_at is None else str(state.halted_at),
            "request_id": request.request_id, "cleared_by_consumer": consumer}


def verdict_fields(request_id, ack, operator, refusals, audit_id=None, positions=None, action="resume"):
    statuses = (INIT_REFUSED, INITIALISED) if action == "init" else (REFUSED, RESUMED)
    return {"request_id": request_id, "status": statuses[0] if refusals else statuses[1], "event_id": ack,
            "operator": operator, "refusals": json.dumps(refusals),
            "audit_entry": audit_id or "", "audit_stream": OPS_AUDIT_STREAM,
            "residual_positions": json.dumps([f"{p.symbol} {p.side} {p.contracts:g}" for p in positions or []])}


# ---------------------------------------------------------------------------- the EEW's shell

def serve_request(client, fields, keyring, cooldown_s, read_account, stream_broken, consumer):
    """Answer one request from the request stream: (verdict fields, None), or (None, why) when
    nothing is answered (a forged, stale or expired request, or one another instance took: no
    verdict, so a flood of forgeries writes nothing). Raises the client's errors;
    read_account() -> (positions, open_orders, error_text) never raises and is called only
    when every cheap check passed (a request costs no exchange read it cannot use)."""
    fields = bus.decoded(fields)
    request, why = check_request(fields, keyring, bus.server_time_ms(client))
    if request is None:
        return None, why
    if not client.hsetnx(schema.PROCESSED_KEY, LEDGER_PREFIX + request.request_id, str(bus.server_time_ms(client))):
        return None, "already_answered"
    if request.action == "init":
        facts, refusals = None, []
    else:
        raw = bus.decoded(client.hgetall(schema.TRADING_STATE_KEY))
        state, _problems = schema.TradingState.from_fields(raw)
        record = tamper.parse_record(client.hget(schema.PROCESSED_KEY, request.ack)) \
            if not request.ack.startswith(("entry:", LEDGER_PREFIX)) else None
        final = None
        if (record or {}).get("stage") == "done" and record.get("status") in schema.FINAL_STATUSES:
            report_id = record.get("report") or "0-0"
            found = client.xrange(schema.COMPLETED_STREAM, report_id, report_id)
            if found:
                report, _ = schema.CompletionReport.from_fields(bus.decoded(found[0][1]))
                final = (bus.as_text(found[0][0]), report) if report.event_id == request.ack else None
        facts = ResumeFacts(request.ack, bus.server_time_ms(client), state, record is not None, final,
                            cooldown_s, stream_broken)
        # Cheapest first: the halt and the ledger (read above), then the panic stream, and the
        # exchange only when nothing else refuses.
        refusals = cheap_refusals(facts) or waiting_refusals(panics_waiting(client, keyring))
        if not refusals:
            facts.positions, facts.open_orders, facts.exchange_error = read_account()
            refusals = account_refusals(facts, request.accept_residual)
    audit_id = None
    if not refusals:
        audit_id, refusals = _lift(client, request, keyring, facts, consumer)
    verdict = verdict_fields(request.request_id, request.ack, request.operator, refusals, audit_id,
                             facts and facts.positions, request.action)
    client.xadd(VERDICT_STREAM, verdict, maxlen=VERDICT_MAXLEN, approximate=True)
    return verdict, None


def _lift(client, request, keyring, facts, consumer):
    """halted=false (cleared_by/at) and the eexit:ops:audit entry in one MULTI under WATCH of
    the halt, if the request has not expired, no authorised panic waits (checked again: the
    account read took up to seconds) and the halt is as checked: an init (facts None) writes
    only where no trading state exists (the first start), a resume only while the halt is the
    one its checks saw. (the audit entry id, []), or (None, [refusal]) if nothing was written."""
    init = facts is None
    halt = None if init else (facts.state.event_id, facts.state.halted)     # the halt the checks saw
    refusal = "a trading state exists: init never clears a halt (use `eexit status` and `eexit resume`)" \
        if init else "the halt changed meanwhile (a new panic?); run `eexit status` and try again"
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(schema.TRADING_STATE_KEY)
            raw = bus.decoded(pipe.hgetall(schema.TRADING_STATE_KEY))
            state, _ = schema.TradingState.from_fields(raw)
            if (raw and init) or (not init and (state.event_id, state.halted) != halt):
                return None, [refusal]
            waiting = waiting_refusals(panics_waiting(pipe, keyring))
            if waiting:
                return None, waiting
            now_ms = bus.server_time_ms(pipe)
            if now_ms > request.expires_at:
                return None, [f"the request expired {now_ms - request.expires_at} ms before the halt could be "
                              f"written (it is valid EEXIT_RESUME_TIMEOUT_S): nothing changed; ask again"]
            pipe.multi()
            pipe.hset(schema.TRADING_STATE_KEY, mapping={
                "halted": "false", "requires_manual_reset": "false",
                "cleared_by": request.operator, "cleared_at": str(now_ms)})
            pipe.xadd(OPS_AUDIT_STREAM, audit_fields(facts, request, state, now_ms, consumer))
            return bus.as_text(pipe.execute()[1]), []
        except redis.WatchError:
            # Someone wrote the halt between the check and the write (a new panic's halt):
            # write nothing; the operator looks again. Never lift a halt the checks did not see.
            return None, [refusal]

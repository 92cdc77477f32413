"""Lifting the halt, with one writer: the EEW (issue 14).

ACLs cannot tell `HSET system:state:trading halted true` from `... halted false`, so whoever
may write the halt may lift it without any check. Hence only the EEW's Redis user may write
the trading state; `eexit resume` asks, the EEW decides:

    eexit resume --operator NAME --ack EVENT_ID [--accept-residual]
      -> XADD system:resume_request  {request_id, action=resume, ack, operator,
                                      accept_residual, issued_by=ops, ts, kid, sig}
    EEW: signature (ops key, domain "eexit-resume-v1"), request age <= REQUEST_MAX_AGE_S,
         request_id claimed once in its ledger (a replayed copy gets no second verdict),
         then resume_refusals() over facts it gathers itself: the halt, its own ledger record
         of the event, the final report on the completed stream, the cooldown on Redis's
         clock (EEXIT_RESUME_COOLDOWN_S, read by the EEW), a fresh read of the whole account
         on the exchange, and whether the panic stream can still take entries
      -> halt cleared + eexit:ops:audit entry in one MULTI under WATCH of the halt
      -> XADD system:resume_verdict {request_id, status RESUMED | RESUME_REFUSED, refusals, ...}
    eexit resume prints the verdict (exit 0 resumed, 1 refused, 3 no verdict in time).

`eexit init` (the explicit first start) asks the same way, action "init": the EEW writes
halted=false (who, when, audit entry) only where no trading state exists; verdict INITIALISED
or INIT_REFUSED.

Why a verdict stream of its own and not the completed stream: the completed stream holds
panic reports, read by the watchdog and the audit logger as such; a verdict is not one.
Unsigned requests pass only where panics pass unsigned too (no key ring configured); then
the ACL (only ops may XADD a request) is the only check of who asked.

Pure: build_request, check_request, resume_refusals, audit_fields, verdict_fields.
Shell (the EEW calls it, with its own exchange read): serve_request.
"""

import json
import time
import uuid
from dataclasses import dataclass

import redis

from . import bus, schema, signing, tamper

REQUEST_STREAM = "system:resume_request"
VERDICT_STREAM = "system:resume_verdict"
OPS_AUDIT_STREAM = "eexit:ops:audit"
VERDICT_MAXLEN = 10_000                # approximate; a verdict matters for seconds
REQUEST_MAX_AGE_S = 60.0               # a request older than this (Redis clock) is refused
REQUEST_CORE = ("kid", "request_id", "action", "ack", "operator", "accept_residual", "issued_by", "ts")
REQUEST_DOMAIN = b"eexit-resume-v1\n"
REQUEST_ISSUER = "ops"
RESUMED, REFUSED = "RESUMED", "RESUME_REFUSED"
INITIALISED, INIT_REFUSED = "INITIALISED", "INIT_REFUSED"
ACTIONS = ("resume", "init")
FINAL_STATUSES = ("FLAT", "RESIDUAL", "FAILED")
LEDGER_PREFIX = "resume:"              # ledger field claiming one request id


# ---------------------------------------------------------------------------- the request

def build_request(operator, ack, accept_residual, keyring, now_ms=None, request_id=None, action="resume"):
    """The request's fields, signed with the ops key when a key ring is configured. Raises
    ValueError if keys are configured but none belongs to ops (the EEW would refuse).
    action "init" (`eexit init`, ack "-") asks for halted=false where no trading state exists."""
    fields = {"request_id": request_id or str(uuid.uuid4()), "action": action, "ack": ack,
              "operator": operator, "accept_residual": "true" if accept_residual else "false",
              "issued_by": REQUEST_ISSUER, "ts": str(int(time.time() * 1000) if now_ms is None else now_ms)}
    if not keyring.configured:
        return fields
    kid = keyring.kid_for(REQUEST_ISSUER)
    if kid is None:
        raise ValueError("keys are configured but none belongs to issuer 'ops': the EEW would "
                         "refuse the resume request (add an ops key)")
    return signing.sign_fields(fields, kid, keyring, REQUEST_CORE, REQUEST_DOMAIN)


@dataclass(frozen=True)
class Request:
    request_id: str
    ack: str
    operator: str
    accept_residual: bool
    action: str = "resume"


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
        age_s = (now_ms - int(get("ts"))) / 1000.0
    except (TypeError, ValueError):
        return None, "malformed:ts"
    if not -max_age_s <= age_s <= max_age_s:
        return None, f"stale:{age_s:.0f}s"
    return Request(get("request_id"), get("ack"), get("operator").strip(), get("accept_residual") == "true",
                   get("action")), None


# ---------------------------------------------------------------------------- the decision

@dataclass
class ResumeFacts:
    """What the EEW found, all plain data, for the pure decision below."""
    ack: str
    now_ms: int
    state: schema.TradingState
    state_present: bool
    event_found: bool
    final: tuple | None                 # (report entry id, CompletionReport) or None
    positions: list | None              # [Position] read from the exchange; None = not read
    open_orders: list | None
    exchange_error: str | None
    cooldown_s: float
    stream_broken: str | None = None    # the panic stream cannot take entries (tamper reason)


def resume_refusals(facts, accept_residual):
    """Reasons (strings) to refuse clearing the halt; empty means clear it."""
    reasons = []
    state = facts.state
    if not facts.event_found:
        reasons.append(f"unknown event id {facts.ack}: the EEW has no record of executing it")
        return reasons
    if state.halted is False:
        reasons.append("trading is not halted: nothing to resume")
        return reasons
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


def residual_list(positions):
    return [{"symbol": p.symbol, "side": p.side, "contracts": p.contracts,
             "position_side": p.position_side} for p in positions or []]


def audit_fields(facts, request, state, now_ms, consumer):
    """The eexit:ops:audit entry of one resume."""
    report_entry, report = facts.final
    return {"action": "resume", "operator": request.operator, "event_id": request.ack, "ts": str(now_ms),
            "accept_residual": "true" if request.accept_residual else "false",
            "residual_positions": json.dumps(residual_list(facts.positions), separators=(",", ":")),
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
    nothing is answered (a forged or stale request, or one another instance took: no verdict,
    so a flood of forgeries writes nothing). Raises the client's errors; read_account() ->
    (positions, open_orders, error_text) never raises."""
    fields = bus.decoded(fields)
    request, why = check_request(fields, keyring, bus.server_time_ms(client))
    if request is None:
        return None, why
    if not client.hsetnx(schema.PROCESSED_KEY, LEDGER_PREFIX + request.request_id, str(bus.server_time_ms(client))):
        return None, "already_answered"
    if request.action == "init":
        audit_id, refusals = _init(client, request, consumer)
        verdict = verdict_fields(request.request_id, request.ack, request.operator, refusals, audit_id, action="init")
        client.xadd(VERDICT_STREAM, verdict, maxlen=VERDICT_MAXLEN, approximate=True)
        return verdict, None
    state_raw = bus.decoded(client.hgetall(schema.TRADING_STATE_KEY))
    state, _problems = schema.TradingState.from_fields(state_raw)
    record = tamper.parse_record(client.hget(schema.PROCESSED_KEY, request.ack)) \
        if not request.ack.startswith(("entry:", LEDGER_PREFIX)) else None
    final = None
    if record is not None and record.get("stage") == "done" and record.get("status") in FINAL_STATUSES:
        found = client.xrange(schema.COMPLETED_STREAM, record.get("report") or "0-0", record.get("report") or "0-0")
        if found:
            report, _ = schema.CompletionReport.from_fields(bus.decoded(found[0][1]))
            final = (bus.as_text(found[0][0]), report) if report.event_id == request.ack else None
    positions = orders = error = None
    if record is not None and final is not None:
        positions, orders, error = read_account()
    facts = ResumeFacts(ack=request.ack, now_ms=bus.server_time_ms(client), state=state, state_present=bool(state_raw),
                        event_found=record is not None, final=final, positions=positions, open_orders=orders,
                        exchange_error=error, cooldown_s=cooldown_s, stream_broken=stream_broken)
    refusals = resume_refusals(facts, request.accept_residual)
    audit_id = None
    if not refusals:
        audit_id, refusals = _clear(client, facts, request, consumer)
    verdict = verdict_fields(request.request_id, request.ack, request.operator, refusals, audit_id, positions)
    client.xadd(VERDICT_STREAM, verdict, maxlen=VERDICT_MAXLEN, approximate=True)
    return verdict, None


def _init(client, request, consumer):
    """halted=false with who/when and an audit entry, only where no trading state exists (the
    first start). (audit id, []) or (None, [refusal])."""
    from . import __version__   # noqa: PLC0415 - the package's version, for the audit entry
    return _lift(client, request, lambda raw, _state: not raw, lambda now_ms, _state: {
        "action": "init", "operator": request.operator, "ts": str(now_ms), "version": __version__,
        "request_id": request.request_id, "cleared_by_consumer": consumer},
        "a trading state exists: init never clears a halt (use `eexit status` and `eexit resume`)")


def _clear(client, facts, request, consumer):
    """Clear the halt, only if it is still what the checks saw. (audit id, []) or (None, [refusal])."""
    return _lift(client, request,
                 lambda _raw, state: (state.event_id, state.halted) == (facts.state.event_id, facts.state.halted),
                 lambda now_ms, state: audit_fields(facts, request, state, now_ms, consumer),
                 "the halt changed meanwhile (a new panic?); run `eexit status` and try again")


def _lift(client, request, still_as_checked, audit, refusal):
    """halted=false (cleared_by/at) and the eexit:ops:audit entry in one MULTI under WATCH of
    the halt, if still_as_checked(raw, state): (the audit entry id, []), or (None, [refusal])
    if nothing was written."""
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(schema.TRADING_STATE_KEY)
            raw = bus.decoded(pipe.hgetall(schema.TRADING_STATE_KEY))
            state, _ = schema.TradingState.from_fields(raw)
            if not still_as_checked(raw, state):
                return None, [refusal]
            now_ms = bus.server_time_ms(pipe)
            pipe.multi()
            pipe.hset(schema.TRADING_STATE_KEY, mapping={
                "halted": "false", "requires_manual_reset": "false",
                "cleared_by": request.operator, "cleared_at": str(now_ms)})
            pipe.xadd(OPS_AUDIT_STREAM, audit(now_ms, state))
            return bus.as_text(pipe.execute()[1]), []
        except redis.WatchError:
            # Someone wrote the halt between the check and the write (a new panic's halt):
            # write nothing; the operator looks again. Never lift a halt the checks did not see.
            return None, [refusal]

"""What the operator tools do, as functions over a Redis client: read the system's state,
publish a panic and wait for ITS report, and ask the EEW to clear a halt (eexit/resume.py).
`eexit/cli.py` renders the results; the drill, the demo and `tools/chaos.py` reuse them. No
daemon imports it, nor does the crash hook (it builds its own panic); what only `eexit status`
needs lives in eexit/health.py. Building a resume request is here too (build_request): the EEW
only checks and serves it. Ages are measured on ONE clock, the Redis server's (TIME against
the millisecond part of stream entry ids), so a skewed operator laptop changes nothing.

Streams written here besides panics: `system:resume_request` (see docs/REDIS_STREAMS_SCHEMA.md,
"Resume"); the EEW answers on `system:resume_verdict` and writes `eexit:ops:audit`.
"""

import getpass
import json
import socket
import time
import uuid
from dataclasses import dataclass, field

import redis

from . import bus, resume, schema, signing
from .config import ConfigError

OPS_AUDIT_STREAM = resume.OPS_AUDIT_STREAM   # written by the EEW on each resume; never trimmed
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


def report_event_ids(fields):
    """The event ids a report is about: its event_id, or for the EEW's summary of a batch of
    rejected entries, the (first REJECTED_IDS_SHOWN) event ids it lists in event_ids."""
    if fields.get("status") == "REJECTED" and fields.get("event_ids"):
        try:
            listed = json.loads(fields["event_ids"])
        except ValueError:
            listed = None
        if isinstance(listed, list) and listed:
            return [str(event_id) for event_id in listed]
    return [fields.get("event_id", "")]


def final_report(reports):
    """The first FLAT/RESIDUAL/FAILED report, or None."""
    for entry_id, report in reports:
        if report.status in schema.FINAL_STATUSES:
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
    other events, and DUPLICATE reports, are skipped: the answer is about THIS event."""
    event_id = published.event.event_id

    def final_for_event(fields):
        return fields.get("event_id") == event_id and \
            schema.CompletionReport.from_fields(fields)[0].status != "DUPLICATE"
    found = wait_on_stream(client_factory, schema.COMPLETED_STREAM, published.completed_after,
                           published.published_mono, timeout_s, final_for_event, progress, block_ms)
    return None if found is None else (found[0], schema.CompletionReport.from_fields(found[1])[0])


def wait_on_stream(client_factory, stream, after, started_mono, timeout_s, match, progress=None, block_ms=500):
    """(entry_id, fields) of the first entry after `after` for which match(fields), or None at
    the timeout. Redis errors are retried with a fresh client until the deadline (the answer
    may still come; giving up early would turn a Redis blip into a false failure).
    progress(elapsed_s, note) is called about every block."""
    deadline = started_mono + timeout_s
    client = client_factory()
    block_ms = min(block_ms, bus.BLOCK_MS_MAX)
    note = "waiting"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            reply = client.xread({stream: after}, count=100,
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
                if match(fields):
                    return after, fields
        if progress:
            progress(time.monotonic() - started_mono, note)


# ---------------------------------------------------------------------------- account, resume

def read_account(env=None):
    """(positions, open_orders, error_text) from the configured exchange (the drill's before/
    after reads; resume's flat check is the EEW's own). ccxt is imported here, not at module
    load: status and panic must work on a host without exchange access."""
    from . import exchange   # noqa: PLC0415 - ccxt costs ~0.5 s; only the drill needs it
    try:
        cfg = exchange.ExchangeConfig.from_env(env)
        ex = exchange.build_exchange(cfg)
        return exchange.read_positions(ex), exchange.read_open_orders(ex), None
    except Exception as exc:  # noqa: BLE001 - any failure means "not verified", reported as such
        return None, None, f"{type(exc).__name__}: {str(exc)[:300]}"


VERDICT_GRACE_S = 2.0   # the CLI waits this much longer than its request stays valid


def build_request(operator, ack, accept_residual, keyring, now_ms=None, request_id=None, action="resume",
                  valid_s=30.0):
    """A resume/init request for the EEW (eexit/resume.py serves it): its fields, signed with
    the ops key when a key ring is configured. Raises ValueError if keys are configured but
    none belongs to ops (the EEW would refuse).
    action "init" (`eexit init`, ack "-") asks for halted=false where no trading state exists.
    now_ms should be Redis's clock (the EEW's); the request expires valid_s after it."""
    now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
    fields = {"request_id": request_id or str(uuid.uuid4()), "action": action, "ack": ack,
              "operator": operator, "accept_residual": "true" if accept_residual else "false",
              "issued_by": resume.REQUEST_ISSUER, "ts": str(now_ms),
              "expires_at": str(now_ms + int(valid_s * 1000))}
    if not keyring.configured:
        return fields
    kid = keyring.kid_for(resume.REQUEST_ISSUER)
    if kid is None:
        raise ValueError("keys are configured but none belongs to issuer 'ops': the EEW would "
                         "refuse the resume request (add an ops key)")
    return signing.sign_fields(fields, kid, keyring, resume.REQUEST_CORE, resume.REQUEST_DOMAIN)


@dataclass
class ResumeAsked:
    request_id: str
    verdicts_after: str         # the verdict stream's last id before asking
    asked_mono: float           # taken before the request was stamped
    expires_at: int             # epoch ms on Redis's clock: the EEW acts on it no later
    wait_s: float               # how long the CLI waits for the verdict (valid + grace)


def ask_resume(client, build, valid_s):
    """XADD the resume/init request build(now_ms, valid_s) returns (resume.build_request with
    the operator's arguments bound), stamped with Redis's clock, the one the EEW checks the
    expiry on: it stays valid valid_s, and the wait (ResumeAsked.wait_s, counted from before
    the stamp) ends VERDICT_GRACE_S after that, so no verdict can come after the CLI gave up.
    Remembers where the verdict stream stood, so no verdict is missed."""
    asked_mono = time.monotonic()
    fields = build(bus.server_time_ms(client), valid_s)
    last = latest(client, resume.VERDICT_STREAM)
    client.xadd(resume.REQUEST_STREAM, fields)
    return ResumeAsked(fields["request_id"], last[0] if last else "0-0", asked_mono, int(fields["expires_at"]),
                       valid_s + VERDICT_GRACE_S)


def wait_for_verdict(client_factory, asked, progress=None):
    """The EEW's verdict fields for this request, or None when the wait ends (the outcome is
    then unknown: a verdict may have been written that Redis did not deliver to us)."""
    found = wait_on_stream(client_factory, resume.VERDICT_STREAM, asked.verdicts_after, asked.asked_mono,
                           asked.wait_s, lambda fields: fields.get("request_id") == asked.request_id, progress)
    return found[1] if found else None

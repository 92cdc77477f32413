"""The operator's side of the risk kernel (issue 25, docs/RISK.md): its rows in `eexit status`,
`eexit risk rebase`, and the baseline line after `eexit resume`. Kept apart from ops.py,
health.py and cli.py (which call into it in one line each), and from eexit/risk.py, the daemon.
Not imported by any daemon; imports no ccxt.

    eexit risk rebase --operator NAME [--json]
        exit 0 accepted (the next valid snapshot becomes the peak and window), 1 refused (the
        kernel says why), 2 configuration or Redis unreachable, 3 no answer in time (outcome
        unknown: check `eexit status`)
"""

import dataclasses
import json
import time

from . import bus, health, ops, risk, schema, signing
from .console import emit


def gather(client, now_ms):
    """The kernel's rows, or None when it never ran (it is opt-in): per rule the value,
    thresholds, warning and latch; mode; blindness; the baseline; the last snapshot's age; the
    kernel's heartbeat. Raises bus.REDIS_ERRORS."""
    raw = client.get(risk.STATE_KEY)
    last = ops.latest(client, risk.HEARTBEAT_STREAM)
    if raw is None and last is None:
        return None
    document = json.loads(ops.text(raw)) if raw is not None else {}
    rules = document.pop("rules", {})
    interval_s = document.pop("interval_s", None)
    state = risk.from_json(json.dumps(document)) if document else risk.RiskState()
    beat = schema.Heartbeat.from_fields(last[1])[0] if last else None
    rows = {}
    for rule in risk.RULES:
        threshold = rules.get(rule, {})
        rows[rule] = {"value": state.values.get(rule), "warn": threshold.get("warn"), "panic": threshold.get("panic"),
                      "on": threshold.get("warn") is not None or threshold.get("panic") is not None,
                      "warned": rule in state.warned, "latched": state.latches.get(rule)}
    rows["mode"] = {"value": state.last_mode or None, "pinned": rules.get("margin_mode"),
                    "baseline_mode": state.baseline.margin_mode if state.baseline else None,
                    "latched": state.latches.get("mode")}
    rows["blind"] = {"problem": state.problem or None, "blind_s": rules.get("blind_s"),
                     "since_ms": state.blind_since_ms, "latched": state.latches.get("blind")}
    baseline = None if state.baseline is None else {**dataclasses.asdict(state.baseline),
                                                    "peak": state.baseline.peak_adj + state.baseline.net_flows}
    sent_ms = schema.entry_id_ms(last[0]) if last else None
    return {"rules": rows, "baseline": baseline, "baseline_text": risk.describe_baseline(state),
            "figures": state.figures, "interval_s": interval_s,
            "snapshot_age_ms": None if state.last_valid_ms is None else max(0, now_ms - state.last_valid_ms),
            "rebase_pending": state.rebase_pending or None,
            "heartbeat": {"age_ms": None if sent_ms is None else max(0, now_ms - sent_ms),
                          "status": beat.status if beat else None,
                          "reason": beat.extra.get("reason") if beat else None,
                          "detail": beat.extra.get("detail") if beat else None}}


def problems(risk_status, silent_ms):
    """Why a kernel that ran cannot vouch: silent beyond max(silent_ms, 3 intervals), or its
    heartbeat names a reason (blind, baseline_lost). `eexit status` then exits 2."""
    if not risk_status:
        return []
    beat = risk_status["heartbeat"]
    allowed = max(silent_ms, 3000 * (risk_status["interval_s"] or 5))
    if beat["age_ms"] is None or beat["age_ms"] > allowed:
        return [f"risk_kernel: SILENT (no heartbeat for {allowed / 1000:g} s)"]
    if beat["reason"]:
        return [f"risk_kernel: {beat['status'] or '?'}: {health.describe_reason(beat['reason'], beat['detail'])}"]
    return []


def amend(status, silent_ms, code):
    """The status exit code with the kernel's problems counted (added to status["problems"])."""
    found = problems(status.get("risk"), silent_ms)
    status["problems"] = status.get("problems", []) + found
    return 2 if found else code


def print_status(risk_status, fmt_age):
    """The kernel's lines in `eexit status`: one per rule, the baseline, the last snapshot's age."""
    if risk_status is None:
        emit("risk kernel: not running (opt-in: eexit-risk.service)")
        return
    beat = risk_status["heartbeat"]
    emit(f"risk kernel: {beat['status'] or 'SILENT'} last heartbeat {fmt_age(beat['age_ms'])}, "
         f"last valid snapshot {fmt_age(risk_status['snapshot_age_ms'])}"
         + (f" reason: {health.describe_reason(beat['reason'], beat['detail'])}" if beat["reason"] else ""))
    for rule, row in risk_status["rules"].items():
        latch = row.get("latched")
        latched = f" LATCHED ({latch.get('reason')} {latch.get('event_id') or 'while halted'})" if latch else ""
        if rule == "mode":
            emit(f"  {rule:<12} {row['value'] or '-'} pinned={row['pinned']} baseline={row['baseline_mode'] or '-'}{latched}")
        elif rule == "blind":
            emit(f"  {rule:<12} {row['problem'] or 'readable'} (panic after {row['blind_s']} s with exposure){latched}")
        elif not row["on"]:
            emit(f"  {rule:<12} off")
        else:
            value = "-" if row["value"] is None else f"{row['value']:.4f}"
            emit(f"  {rule:<12} {value} warn={row['warn']} panic={row['panic']}"
                 f"{' WARNED' if row['warned'] else ''}{latched}")
    emit(f"  baseline     {risk_status['baseline_text']}")


def print_baseline_after_resume(env):
    """After a resume: which risk baseline applies from now on, if the kernel runs."""
    try:
        client = ops.connect(env)
        risk_status = gather(client, bus.server_time_ms(client))
    except bus.REDIS_ERRORS as exc:
        emit(f"risk kernel baseline: unknown (Redis: {type(exc).__name__})")
        return
    if risk_status is not None:
        emit(f"risk kernel baseline that applies now: {risk_status['baseline_text']}; "
             f"`eexit risk rebase --operator NAME` to start from the current equity")


# ---------------------------------------------------------------------------- rebase

def cmd_rebase(args, cfg, env, print_json):
    """Ask the kernel (its state's only writer) to re-base; it checks the signature and records
    the verdict on eexit:risk:events (and so in the audit file)."""
    keyring = signing.load_keys(env)
    try:
        client = ops.connect(env)
        fields = risk.build_rebase(args.operator.strip(), keyring, bus.server_time_ms(client))
        last = ops.latest(client, risk.EVENTS_STREAM)
        asked_mono = time.monotonic()
        client.xadd(risk.REBASE_STREAM, fields)
    except bus.REDIS_ERRORS as exc:
        emit(f"eexit risk rebase: Redis unreachable ({type(exc).__name__}: {exc}); nothing changed", err=True)
        return 2
    # The kernel refuses a request older than REBASE_MAX_AGE_MS: waiting that long (plus a
    # read interval) means no verdict can come after we gave up.
    wait_s = risk.REBASE_MAX_AGE_MS / 1000 + 5
    found = ops.wait_on_stream(lambda: bus.connect(env=env), risk.EVENTS_STREAM, last[0] if last else "0-0",
                               asked_mono, wait_s, lambda f: f.get("kind") == "rebase"
                               and f.get("request_id") == fields["request_id"])
    if found is None:
        emit(f"eexit risk rebase: no answer from the risk kernel within {wait_s:g} s: the request has expired, "
             f"nothing changed (is eexit-risk running? `eexit status`)", err=True)
        return 3
    verdict = found[1]
    accepted = verdict.get("status") == "accepted"
    if args.json:
        print_json({"accepted": accepted, "request_id": fields["request_id"], "operator": args.operator,
                    "why": verdict.get("why"), "before": verdict.get("before"), "stream": risk.EVENTS_STREAM})
    elif accepted:
        emit(f"ACCEPTED: the next valid snapshot becomes the baseline (set_by={args.operator}); "
             f"before: {verdict.get('before')}")
    else:
        emit(f"REFUSED: {verdict.get('why')}")
    return 0 if accepted else 1


def add_parser(sub, handler):
    p = sub.add_parser("risk", help="risk kernel tools (docs/RISK.md)")
    risk_sub = p.add_subparsers(dest="risk_command", required=True)
    r = risk_sub.add_parser("rebase", help="re-base the risk kernel's peak and window on purpose (signed, recorded)")
    r.add_argument("--operator", required=True)
    r.add_argument("--json", action="store_true")
    r.set_defaults(handler=handler)

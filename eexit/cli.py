"""`eexit`: the operator's command line.

    eexit status [--events N] [--json]
        exit 0 healthy, 1 trading halted, 2 cannot vouch: a daemon silent, DEGRADED (the
        Exit Brain's `degraded_reason` or a daemon's `reason` named) or naming a reason it
        cannot do its job, Redis unreachable, a configuration error, or any unexpected error
        (status never exits 1 unless it read a halt)
    eexit panic --reason TEXT [--issued-by ops] [--timeout S] [--json]
        exit 0 only when the report for THIS event says FLAT; 1 any other report;
        3 no report before the timeout; 2 configuration or Redis unreachable
    eexit resume --operator NAME --ack EVENT_ID [--accept-residual] [--json]
        asks the EEW (signed request, eexit/resume.py), which checks and clears the halt;
        exit 0 halt cleared (or already cleared for that event); 1 refused (among others:
        an authorised panic not executed yet); 2 configuration or Redis unreachable; 3 no
        verdict within EEXIT_RESUME_TIMEOUT_S + 2 s: the outcome is unknown (check `eexit
        status`); the request expired first on Redis's clock, so the EEW acts on it no more
    eexit panic --on-service-failure
        systemd's ExecStopPost= hook of the Exit Brain's unit (eexit/hook.py has its exit codes)
    eexit risk rebase --operator NAME [--json]
        asks the risk kernel to take its next valid snapshot as the new peak and window
        (eexit/risk_ops.py): exit 0 accepted, 1 refused, 2 configuration or Redis, 3 no answer
    eexit audit verify FILE [--json]
        exit 0 the audit file's hash chain holds; 1 it is broken; 2 it cannot be read
    eexit init --operator NAME [--json]
        first start: asks the EEW (like resume) for halted=false (who, when, eexit:ops:audit)
        only if no trading state exists; exit 0 written or already halted=false; 1 refused (a
        halt exists, or an authorised panic is not executed yet); 2 Redis unreachable; 3 no
        verdict in time: outcome unknown, as for resume
    eexit drill [--reason DRILL] [--timeout S] [--json] [--live --yes-close-real-positions]
        the panic drill (eexit/drill.py): exit 0 PASS, 1 FAIL, 3 timeout/EEW not running,
        4 refused (not paper or sandbox), 2 configuration
    eexit --version
    eexit demo [--json] [--keep-logs] [--venue binanceusdm|bybit|okx]
        the embedded stack end to end; exit 0 PASS, 1 FAIL
    Every command but status: 5 an unexpected error (traceback on stderr): the outcome is
    unknown, never read as success or as a refusal. Output to a closed pipe (`| head`) is
    dropped silently; the exit code stays the command's answer.

Environment: REDIS_URL (and the Redis credentials of eexit.bus), EEXIT_PANIC_HMAC_KEYS or the
credential panic_hmac_keys (panic signs with the issuer's key, resume with the ops key, when
keys are configured), EEXIT_RESUME_TIMEOUT_S (30; the cooldown EEXIT_RESUME_COOLDOWN_S and the
account read are the EEW's), EEXIT_STATUS_SILENT_S (5: a daemon whose last heartbeat is older is silent),
EEXIT_PANIC_TIMEOUT_S (60).
"""

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

from . import __version__, bus, health, ops, resume, risk_ops, schema, signing
from .config import CONFIG_EXIT_CODE, ConfigError, env_float, env_int
from .console import Progress, emit, known, report_line

# The paper exchange's dialects (eexit.paper.DIALECTS; a test pins that they agree): named here
# so that `eexit` does not load the paper exchange to parse its arguments.
DEMO_VENUES = ("binanceusdm", "bybit", "okx")
EXIT_OK, EXIT_FAIL, EXIT_UNHEALTHY, EXIT_TIMEOUT, EXIT_INTERNAL = 0, 1, 2, 3, 5
EPILOG = ("exit codes: status 0 healthy, 1 halted, 2 cannot vouch (silent or degraded daemon, Redis, "
          "configuration, unexpected error); panic 0 FLAT, 1 other report, 2 configuration or Redis, "
          "3 timeout; resume and init 0 cleared, 1 refused, 2 configuration or Redis, 3 no verdict in time "
          "(outcome unknown: check status); every command but status: "
          "5 unexpected error (outcome unknown)")


@dataclass(frozen=True)
class Config:
    silent_s: float
    resume_timeout_s: float
    panic_timeout_s: float
    status_events: int

    @classmethod
    def from_env(cls, env=None):
        return cls(
            silent_s=env_float("EEXIT_STATUS_SILENT_S", 5.0, minimum=0.1, env=env),
            resume_timeout_s=env_float("EEXIT_RESUME_TIMEOUT_S", 30.0, minimum=1.0, maximum=600.0, env=env),
            panic_timeout_s=env_float("EEXIT_PANIC_TIMEOUT_S", 60.0, minimum=0.1, env=env),
            status_events=env_int("EEXIT_STATUS_EVENTS", 5, minimum=0, maximum=1000, env=env),
        )


def fmt_ts(ms):
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{int(ms) % 1000:03d}Z"


def fmt_age(ms):
    return "never" if ms is None else f"{ms / 1000:.1f} s ago"


def print_json(data):
    emit(json.dumps(data, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------- status

def cmd_status(args, cfg, env):
    try:
        client = ops.connect(env)
        status = health.gather_status(client, events=args.events if args.events is not None else cfg.status_events,
                                      brain_service_id=os.environ.get("EEXIT_BRAIN_SERVICE_ID") or "exit_brain")
        from . import alert   # noqa: PLC0415 - the notifier's module, only for this section
        status["alerts"] = alert.read_outbox_status(client, status["now_ms"])
        status["risk"] = risk_ops.gather(client, status["now_ms"])     # None: the kernel never ran
    except bus.REDIS_ERRORS as exc:
        # Nothing can be known without Redis: that is the "unhealthy" answer, not a crash.
        if args.json:
            print_json({"redis": "unreachable", "error": f"{type(exc).__name__}: {exc}", "exit_code": 2})
        else:
            emit(f"redis: UNREACHABLE ({type(exc).__name__}: {exc})")
        return EXIT_UNHEALTHY
    code = health.status_exit_code(status, cfg.silent_s * 1000)
    status["silent_after_ms"] = int(cfg.silent_s * 1000)
    status["problems"] = health.daemon_problems(status, cfg.silent_s * 1000)
    code = risk_ops.amend(status, cfg.silent_s * 1000, code)
    status["exit_code"] = code
    if args.json:
        print_json(status)
        return code
    trading = status["trading"]
    if trading["halted"] is False:
        cleared = f" (cleared by {trading['cleared_by']} at {fmt_ts(trading['cleared_at'])})" if trading["cleared_by"] else ""
        emit(f"trading: ALLOWED{cleared}")
    elif not trading["present"]:
        emit("trading: HALTED (no state written yet, read as halted; first start: `eexit init --operator NAME`)")
    else:
        emit(f"trading: HALTED since {fmt_ts(trading['halted_at'])} by {trading['halted_by'] or '-'} "
              f"reason={trading['reason'] or '-'} event={trading['event_id'] or '-'}"
              + (" requires manual reset" if trading["requires_manual_reset"] else ""))
    emit("daemons:")
    for name, daemon in status["daemons"].items():
        silent = daemon["age_ms"] is None or daemon["age_ms"] > cfg.silent_s * 1000
        state = "SILENT" if silent else (daemon["status"] or "?")
        extra = ""
        if daemon.get("active_positions") is not None:
            extra = f" active_positions={daemon['active_positions']}"
        if daemon.get("reason"):
            extra += f" reason: {health.describe_reason(daemon['reason'], daemon.get('detail'))}"
        emit(f"  {name:<11} {state:<8} last heartbeat {fmt_age(daemon['age_ms'])}{extra}")
    emit(f"panic events (newest {len(status['panics'])}):")
    for event in status["panics"]:
        outcome = " / ".join(report_line(r) for r in event["reports"]) or "NO REPORT"
        emit(f"  {fmt_ts(event['ts'])} {event['event_id']} {event['reason']} by {event['issued_by']}: {outcome}")
    guard = status["guard"]
    emit(f"halt guard: holder={guard['lease_holder'] or '-'} policy={guard['policy'] or '-'} "
         f"last check {fmt_age(guard['last_check_age_ms'])}: {guard['last_check'] or '-'}; "
         f"last enforcement {fmt_age(guard['last_enforcement_age_ms'])}: {guard['last_enforcement'] or '-'}"
         + (f" ({guard['last_enforcement_event_id']})" if guard["last_enforcement_event_id"] else ""))
    emit("pending:")
    if not status["pending"]:
        emit("  (no consumer groups yet)")
    for stream, groups in status["pending"].items():
        for group, info in groups.items():
            consumers = ", ".join(f"{name}={count}" for name, count in info["consumers"].items()) or "-"
            lag = "" if info["lag"] is None else f" unread={info['lag']}"
            emit(f"  {stream} / {group}: pending={info['pending']}{lag} ({consumers})")
    print_alerts(status["alerts"])
    risk_ops.print_status(status["risk"], fmt_age)
    emit({0: "HEALTHY", 1: "HALTED"}.get(code) or "UNHEALTHY: " + "; ".join(status["problems"]))
    return code


def print_alerts(alerts):
    """The alert outbox, as the notifier last reported it (eexit.alert heartbeat)."""
    if alerts["age_ms"] is None:
        emit("alerts: no notifier heartbeat (eexit-alert not running?)")
        return
    emit(f"alerts: pending={alerts['pending']} notifier {alerts['status']} {fmt_age(alerts['age_ms'])}")
    for name, sink in sorted(alerts["sinks"].items()):
        last_at = int(sink["last_at"]) if sink.get("last_at", "").isdigit() else None
        error = f" error={sink['error']}" if sink.get("error") else ""
        emit(f"  {name:<9} pending={sink.get('pending', '?')} last {sink.get('last_result') or '-'} "
              f"{sink.get('last_id') or '-'} at {fmt_ts(last_at)}{error}")


# ---------------------------------------------------------------------------- panic

def cmd_panic(args, cfg, env):
    timeout_s = args.timeout if args.timeout is not None else cfg.panic_timeout_s
    keyring = signing.load_keys(env)
    try:
        event, fields = ops.build_panic(args.reason, args.issued_by, keyring,
                                        context=ops.operator_context(tool="eexit panic"))
    except ValueError as exc:
        emit(f"eexit panic: {exc}", err=True)
        return CONFIG_EXIT_CODE
    try:
        client = ops.connect(env)
        published = ops.publish_panic(client, event, fields)
    except bus.REDIS_ERRORS as exc:
        emit(f"eexit panic: could not publish, Redis unreachable ({type(exc).__name__}: {exc})", err=True)
        return EXIT_UNHEALTHY
    if not args.json:
        emit(f"published event_id={event.event_id} entry={published.entry_id} "
              f"reason={event.reason} issued_by={event.issued_by} signed={'yes' if 'sig' in fields else 'no'}")
    progress = Progress(f"waiting for the report of {event.event_id}")
    found = ops.wait_for_report(lambda: ops.connect(env), published, timeout_s, progress)
    progress.done()
    if found is None:
        message = f"no report for event {event.event_id} within {timeout_s:g} s: is the EEW running? (`eexit status`)"
        if args.json:
            print_json({"event_id": event.event_id, "entry_id": published.entry_id, "report": None,
                        "error": message, "exit_code": EXIT_TIMEOUT})
        else:
            emit(f"TIMEOUT: {message}")
        return EXIT_TIMEOUT
    entry_id, report = found
    code = EXIT_OK if report.status == "FLAT" else EXIT_FAIL
    if args.json:
        print_json({"event_id": event.event_id, "entry_id": published.entry_id,
                    "report": ops.report_dict(entry_id, report), "exit_code": code})
    else:
        emit(f"report: status={report.status} positions {known(report.positions_closed)}/"
              f"{known(report.positions_total)} closed, {known(report.positions_failed)} failed "
              f"{report.failed_symbols or ''} orders_cancelled={known(report.orders_cancelled)} "
              f"execution_time_ms={report.execution_time_ms}" + (f" scope={report.scope}" if report.scope else "")
              + (f" detail={report.detail}" if report.detail else ""))
        for residual in report.residual_positions:
            emit(f"  residual: {residual}")
        emit("FLAT" if code == EXIT_OK else f"NOT FLAT ({report.status})")
    return code


# ---------------------------------------------------------------------------- resume

def ask_eew(client, env, cfg, action, operator, ack="-", accept_residual=False):
    """Publish a signed resume/init request (valid EEXIT_RESUME_TIMEOUT_S on Redis's clock)
    and wait for the EEW's verdict: (asked, verdict fields or None at the end of the wait).
    Raises ConfigError (keys without an ops key: nothing published) and bus.REDIS_ERRORS."""
    keyring = signing.load_keys(env)

    def build(now_ms, valid_s):
        try:
            return ops.build_request(operator, ack, accept_residual, keyring, now_ms, action=action,
                                        valid_s=valid_s)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    asked = ops.ask_resume(client, build, cfg.resume_timeout_s)
    return asked, ops.wait_for_verdict(lambda: bus.connect(env=env), asked)


def outcome_unknown(command, asked, as_json):
    """A CLI that stopped waiting never claims an outcome (exit 3): the EEW may have cleared
    the halt and its verdict not reached us. The request is dead now: it expired on Redis's
    clock before the wait ended, and the EEW checks that right before it writes."""
    message = (f"no verdict from the EEW within {asked.wait_s:g} s (EEXIT_RESUME_TIMEOUT_S + "
               f"{ops.VERDICT_GRACE_S:g} s): outcome unknown, check `eexit status`. Request {asked.request_id} "
               f"expired at {fmt_ts(asked.expires_at)} (Redis clock): the EEW no longer acts on it. "
               f"Is eexit-eew running?")
    if as_json:
        print_json({"outcome": "unknown", "request_id": asked.request_id, "message": message,
                    "exit_code": EXIT_TIMEOUT})
    emit(f"eexit {command}: {message}", err=True)
    return EXIT_TIMEOUT


def cmd_resume(args, cfg, env):
    """Ask the EEW (the only writer of the halt) and print its verdict; the checks are its."""
    try:
        client = ops.connect(env)
        # Already cleared for this very event: saying so (exit 0) makes the command safe to re-run.
        state, _, _ = ops.read_state(client)
        if state.halted is False and state.event_id == args.ack and state.cleared_by:
            message = f"already resumed: event {args.ack} cleared by {state.cleared_by} at {fmt_ts(state.cleared_at)}"
            if args.json:
                print_json({"resumed": True, "already": True, "message": message})
            else:
                emit(message)
            return EXIT_OK
        asked, verdict = ask_eew(client, env, cfg, "resume", args.operator.strip(), args.ack, args.accept_residual)
    except bus.REDIS_ERRORS as exc:
        emit(f"eexit resume: Redis unreachable ({type(exc).__name__}: {exc}); nothing changed", err=True)
        return EXIT_UNHEALTHY
    if verdict is None:
        return outcome_unknown("resume", asked, args.json)
    reasons = json.loads(verdict.get("refusals") or "[]")
    residual = json.loads(verdict.get("residual_positions") or "[]")
    audit_id = verdict.get("audit_entry") or None
    if args.json:
        print_json({"resumed": not reasons, "refusals": reasons, "event_id": args.ack,
                    "operator": args.operator, "audit_entry": audit_id, "residual_positions": residual,
                    "audit_stream": ops.OPS_AUDIT_STREAM, "request_id": asked.request_id})
    elif reasons:
        emit("REFUSED: trading stays halted")
        for reason in reasons:
            emit(f"  - {reason}")
    else:
        emit(f"RESUMED: trading allowed again; cleared_by={args.operator} event={args.ack} "
              f"audit={ops.OPS_AUDIT_STREAM} {audit_id}" + (f" accepted residual: {residual}" if residual else ""))
        risk_ops.print_baseline_after_resume(env)
    return EXIT_FAIL if reasons else EXIT_OK


# ---------------------------------------------------------------------------- audit, demo

def cmd_audit_verify(args, cfg, env):
    """exit 0 the chain holds; 1 it is broken (a line named); 2 the file cannot be read (that
    proves nothing either way, so it is not called BROKEN)."""
    try:
        from . import audit   # noqa: PLC0415 - the audit daemon is optional for the other commands
    except ImportError as exc:
        emit(f"eexit audit verify: the audit module is not available ({exc})", err=True)
        return CONFIG_EXIT_CODE
    try:
        with open(args.file, "rb"):
            pass
    except OSError as exc:
        verdict, code, line, reason = "CANNOT READ", CONFIG_EXIT_CODE, None, exc.strerror or type(exc).__name__
    else:
        ok, line, reason = audit.verify_file(args.file)
        verdict, code = ("OK", EXIT_OK) if ok else ("BROKEN", EXIT_FAIL)
    if args.json:
        print_json({"file": args.file, "verdict": verdict, "ok": code == EXIT_OK, "broken_line": line,
                    "reason": reason, "exit_code": code})
    else:
        where = f" at line {line}" if line is not None else ""
        emit(f"{verdict}: {args.file}{where}: {reason or 'hash chain intact'}")
    return code


# ---------------------------------------------------------------------------- init, drill

def cmd_init(args, cfg, env):
    """The explicit first start: asks the EEW (the halt's only writer) to write halted=false
    (who, when) and an eexit:ops:audit entry when NO trading state exists. It never touches an
    existing state: a halt, even one from a panic this host never saw, is lifted only by
    `eexit resume`. exit 0 written (or already halted=false: nothing to do), 1 refused (a halt
    exists), 2 Redis unreachable or configuration, 3 no verdict from the EEW."""
    written, refusals = "", []
    try:
        client = bus.connect(env=env)
        state, _problems, present = ops.read_state(client)
        if not present:
            asked, verdict = ask_eew(client, env, cfg, "init", args.operator.strip())
            if verdict is None:
                return outcome_unknown("init", asked, args.json)
            written = verdict.get("audit_entry") or ""
            refusals = json.loads(verdict.get("refusals") or "[]")
            state, _problems, present = ops.read_state(client)
    except bus.REDIS_ERRORS as exc:
        emit(f"eexit init: Redis unreachable ({type(exc).__name__}: {exc}); nothing changed", err=True)
        return EXIT_UNHEALTHY
    if written:
        code, message = EXIT_OK, f"INITIALISED: trading allowed; halted=false by {args.operator} (audit {written})"
    elif state.halted is False:
        code, message = EXIT_OK, (f"already initialised: halted=false (cleared by {state.cleared_by or '-'} "
                                  f"at {fmt_ts(state.cleared_at)}); nothing written")
    elif refusals:
        code, message = EXIT_FAIL, "REFUSED: " + "; ".join(refusals)
    else:
        code, message = EXIT_FAIL, (f"REFUSED: a trading state exists and says halted "
                                    f"(event {state.event_id or '-'}, reason {state.reason or '-'}); "
                                    f"init never clears a halt: use `eexit status` and `eexit resume`")
    if args.json:
        print_json({"initialised": bool(written), "audit_entry": written or None, "halted": state.halted,
                    "message": message, "exit_code": code})
    else:
        emit(message)
    return code


def cmd_drill(args, cfg, env):
    from . import drill   # noqa: PLC0415 - ccxt and the exchange only for this command
    return drill.run(args, env)


def cmd_demo(args, cfg, env):
    from . import demo   # noqa: PLC0415 - starts processes; only this command needs it
    return demo.run(json_output=args.json, keep_logs=args.keep_logs, venue=args.venue)


def build_parser():
    parser = argparse.ArgumentParser(prog="eexit", description="eexit operator tools", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"eexit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="trading state, daemon heartbeats, recent panics, pending entries")
    p.add_argument("--events", type=int, default=None, help="panic events to show (default 5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("panic", help="publish a panic and wait for its report (exit 0 only on FLAT)")
    p.add_argument("--reason", required=True)
    p.add_argument("--issued-by", default="ops", choices=schema.KNOWN_ISSUERS)
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the report (default 60)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_panic)

    p = sub.add_parser("resume", help="clear the halt after a panic (checks report, account, cooldown)")
    p.add_argument("--operator", required=True)
    p.add_argument("--ack", required=True, metavar="EVENT_ID")
    p.add_argument("--accept-residual", action="store_true",
                   help="resume even though positions or orders remain on the exchange")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_resume)

    risk_ops.add_parser(sub, lambda args, cfg, env: risk_ops.cmd_rebase(args, cfg, env, print_json))

    p = sub.add_parser("audit", help="audit file tools")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    v = audit_sub.add_parser("verify", help="check the hash chain of an audit file")
    v.add_argument("file")
    v.add_argument("--json", action="store_true")
    v.set_defaults(handler=cmd_audit_verify)

    p = sub.add_parser("init", help="first start: write halted=false if no trading state exists (never clears a halt)")
    p.add_argument("--operator", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_init)

    from . import drill   # noqa: PLC0415 - only its argument list; the drill's imports are light
    drill.add_arguments(sub.add_parser("drill", help="publish a signed panic on a paper/sandbox account "
                                                     "and verify it ends flat and halted"))
    sub.choices["drill"].set_defaults(handler=cmd_drill)

    p = sub.add_parser("demo", help="private Redis + paper exchange + the three daemons; kill the Exit Brain; timeline")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs and print where")
    p.add_argument("--venue", default="binanceusdm", choices=DEMO_VENUES,
                   help="the paper exchange's dialect and EEXIT_EXCHANGE of the daemons")
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv=None):
    if list(sys.argv[1:] if argv is None else argv) == ["panic", "--on-service-failure"]:
        # systemd's ExecStopPost= hook: dispatched before argparse, and it takes no other
        # argument; its settings come from the environment systemd sets.
        from . import hook   # noqa: PLC0415 - only the hook needs it
        return hook.run()
    args = build_parser().parse_args(argv)
    env = os.environ
    try:
        cfg = Config.from_env(env)
        if args.command in ("resume", "init", "risk") and not args.operator.strip():
            raise ConfigError("--operator must name a person")
        return args.handler(args, cfg, env)
    except ConfigError as exc:
        emit(f"eexit {args.command}: configuration error: {exc}", err=True)
        return CONFIG_EXIT_CODE
    except KeyboardInterrupt:
        emit(f"\neexit {args.command}: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the exit code must keep its meaning
        # A bug, or an environment nobody anticipated. The traceback goes to stderr for the
        # report; the exit code must not read as an answer: status cannot vouch (2, never
        # "halted"), the others' outcome is unknown (5, never "FLAT" or "refused").
        code = EXIT_UNHEALTHY if args.command == "status" else EXIT_INTERNAL
        try:
            traceback.print_exc()
        except BrokenPipeError:
            pass   # stderr is gone too: the exit code is all that is left to say it
        emit(f"eexit {args.command}: unexpected error {type(exc).__name__}: {str(exc)[:300]} (exit {code})", err=True)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""`eexit`: the operator's command line.

    eexit status [--events N] [--json]
        exit 0 healthy, 1 trading halted, 2 a daemon silent or Redis unreachable
    eexit panic --reason TEXT [--issued-by ops] [--timeout S] [--json]
        exit 0 only when the report for THIS event says FLAT; 1 any other report;
        3 no report before the timeout; 2 configuration or Redis unreachable
    eexit resume --operator NAME --ack EVENT_ID [--accept-residual] [--json]
        asks the EEW (signed request, eexit/resume.py), which checks and clears the halt;
        exit 0 halt cleared (or already cleared for that event); 1 refused; 2 configuration
        or Redis unreachable; 3 no verdict from the EEW before EEXIT_RESUME_TIMEOUT_S
    eexit audit verify FILE
        exit 0 the audit file's hash chain holds; 1 it is broken
    eexit demo [--json] [--keep-logs]
        the embedded stack end to end; exit 0 PASS, 1 FAIL

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
from dataclasses import dataclass

from . import bus, ops, resume, schema, signing
from .config import CONFIG_EXIT_CODE, ConfigError, env_float, env_int

EXIT_OK, EXIT_FAIL, EXIT_UNHEALTHY, EXIT_TIMEOUT = 0, 1, 2, 3


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
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


class Progress:
    """One line on stderr while waiting: rewritten in place on a terminal, a line every few
    seconds otherwise (logs stay readable). stdout stays clean for --json."""

    def __init__(self, label, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_line = 0.0

    def __call__(self, elapsed_s, note):
        line = f"{self.label}: {note} {elapsed_s:5.1f} s"
        if self.tty:
            self.stream.write("\r" + line + " " * 8)
        elif elapsed_s - self.last_line >= 5.0:
            self.stream.write(line + "\n")
            self.last_line = elapsed_s
        else:
            return
        self.stream.flush()

    def done(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- status

def cmd_status(args, cfg, env):
    try:
        client = bus.connect(env=env)
        status = ops.gather_status(client, events=args.events if args.events is not None else cfg.status_events)
    except bus.REDIS_ERRORS as exc:
        # Nothing can be known without Redis: that is the "unhealthy" answer, not a crash.
        if args.json:
            print_json({"redis": "unreachable", "error": f"{type(exc).__name__}: {exc}", "exit_code": 2})
        else:
            print(f"redis: UNREACHABLE ({type(exc).__name__}: {exc})")
        return EXIT_UNHEALTHY
    code = ops.status_exit_code(status, cfg.silent_s * 1000)
    status["silent_after_ms"] = int(cfg.silent_s * 1000)
    status["exit_code"] = code
    if args.json:
        print_json(status)
        return code
    trading = status["trading"]
    if trading["halted"] is False:
        cleared = f" (cleared by {trading['cleared_by']} at {fmt_ts(trading['cleared_at'])})" if trading["cleared_by"] else ""
        print(f"trading: ALLOWED{cleared}")
    elif not trading["present"]:
        print("trading: HALTED (no state written yet; trading code treats a missing flag as halted)")
    else:
        print(f"trading: HALTED since {fmt_ts(trading['halted_at'])} by {trading['halted_by'] or '-'} "
              f"reason={trading['reason'] or '-'} event={trading['event_id'] or '-'}"
              + (" requires manual reset" if trading["requires_manual_reset"] else ""))
    print("daemons:")
    for name, daemon in status["daemons"].items():
        silent = daemon["age_ms"] is None or daemon["age_ms"] > cfg.silent_s * 1000
        state = "SILENT" if silent else (daemon["status"] or "?")
        extra = ""
        if daemon.get("active_positions") is not None:
            extra = f" active_positions={daemon['active_positions']}"
        print(f"  {name:<11} {state:<8} last heartbeat {fmt_age(daemon['age_ms'])}{extra}")
    print(f"panic events (newest {len(status['panics'])}):")
    for event in status["panics"]:
        reports = event["reports"]
        outcome = " / ".join(
            f"{r['status']} {r['positions_closed']}/{r['positions_total']} closed in {r['execution_time_ms']} ms"
            for r in reports) or "NO REPORT"
        print(f"  {fmt_ts(event['ts'])} {event['event_id']} {event['reason']} by {event['issued_by']}: {outcome}")
    print("pending:")
    if not status["pending"]:
        print("  (no consumer groups yet)")
    for stream, groups in status["pending"].items():
        for group, info in groups.items():
            consumers = ", ".join(f"{name}={count}" for name, count in info["consumers"].items()) or "-"
            lag = "" if info["lag"] is None else f" unread={info['lag']}"
            print(f"  {stream} / {group}: pending={info['pending']}{lag} ({consumers})")
    print({0: "HEALTHY", 1: "HALTED", 2: "UNHEALTHY: a daemon is silent"}[code])
    return code


# ---------------------------------------------------------------------------- panic

def cmd_panic(args, cfg, env):
    timeout_s = args.timeout if args.timeout is not None else cfg.panic_timeout_s
    keyring = signing.load_keys(env)
    try:
        event, fields = ops.build_panic(args.reason, args.issued_by, keyring,
                                        context=ops.operator_context(tool="eexit panic"))
    except ValueError as exc:
        print(f"eexit panic: {exc}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    try:
        client = bus.connect(env=env)
        published = ops.publish_panic(client, event, fields)
    except bus.REDIS_ERRORS as exc:
        print(f"eexit panic: could not publish, Redis unreachable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EXIT_UNHEALTHY
    if not args.json:
        print(f"published event_id={event.event_id} entry={published.entry_id} "
              f"reason={event.reason} issued_by={event.issued_by} signed={'yes' if 'sig' in fields else 'no'}")
    progress = Progress(f"waiting for the report of {event.event_id}")
    found = ops.wait_for_report(lambda: bus.connect(env=env), published, timeout_s, progress)
    progress.done()
    if found is None:
        message = f"no report for event {event.event_id} within {timeout_s:g} s: is the EEW running? (`eexit status`)"
        if args.json:
            print_json({"event_id": event.event_id, "entry_id": published.entry_id, "report": None,
                        "error": message, "exit_code": EXIT_TIMEOUT})
        else:
            print(f"TIMEOUT: {message}")
        return EXIT_TIMEOUT
    entry_id, report = found
    code = EXIT_OK if report.status == "FLAT" else EXIT_FAIL
    if args.json:
        print_json({"event_id": event.event_id, "entry_id": published.entry_id,
                    "report": ops.report_dict(entry_id, report), "exit_code": code})
    else:
        print(f"report: status={report.status} positions {report.positions_closed}/{report.positions_total} closed, "
              f"{report.positions_failed} failed {report.failed_symbols or ''} orders_cancelled={report.orders_cancelled} "
              f"execution_time_ms={report.execution_time_ms}" + (f" detail={report.detail}" if report.detail else ""))
        for residual in report.residual_positions:
            print(f"  residual: {residual}")
        print("FLAT" if code == EXIT_OK else f"NOT FLAT ({report.status})")
    return code


# ---------------------------------------------------------------------------- resume

def cmd_resume(args, cfg, env):
    """Ask the EEW (the only writer of the halt) and print its verdict; the checks are its."""
    try:
        keyring = signing.load_keys(env)
        fields = resume.build_request(args.operator.strip(), args.ack, args.accept_residual, keyring)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        client = bus.connect(env=env)
        # Already cleared for this very event: saying so (exit 0) makes the command safe to re-run.
        state, _, _ = ops.read_state(client)
        if state.halted is False and state.event_id == args.ack and state.cleared_by:
            message = f"already resumed: event {args.ack} cleared by {state.cleared_by} at {fmt_ts(state.cleared_at)}"
            if args.json:
                print_json({"resumed": True, "already": True, "message": message})
            else:
                print(message)
            return EXIT_OK
        asked = ops.ask_resume(client, fields)
    except bus.REDIS_ERRORS as exc:
        print(f"eexit resume: Redis unreachable ({type(exc).__name__}: {exc}); nothing changed", file=sys.stderr)
        return EXIT_UNHEALTHY
    verdict = ops.wait_for_verdict(lambda: bus.connect(env=env), asked, cfg.resume_timeout_s)
    if verdict is None:
        print(f"eexit resume: no verdict from the EEW within {cfg.resume_timeout_s:g} s "
              f"(EEXIT_RESUME_TIMEOUT_S); trading stays halted. Is eexit-eew running? (eexit status)",
              file=sys.stderr)
        return EXIT_TIMEOUT
    reasons = json.loads(verdict.get("refusals") or "[]")
    residual = json.loads(verdict.get("residual_positions") or "[]")
    audit_id = verdict.get("audit_entry") or None
    if args.json:
        print_json({"resumed": not reasons, "refusals": reasons, "event_id": args.ack,
                    "operator": args.operator, "audit_entry": audit_id, "residual_positions": residual,
                    "audit_stream": ops.OPS_AUDIT_STREAM, "request_id": asked.request_id})
    elif reasons:
        print("REFUSED: trading stays halted")
        for reason in reasons:
            print(f"  - {reason}")
    else:
        print(f"RESUMED: trading allowed again; cleared_by={args.operator} event={args.ack} "
              f"audit={ops.OPS_AUDIT_STREAM} {audit_id}" + (f" accepted residual: {residual}" if residual else ""))
    return EXIT_FAIL if reasons else EXIT_OK


# ---------------------------------------------------------------------------- audit, demo

def cmd_audit_verify(args, cfg, env):
    try:
        from . import audit   # noqa: PLC0415 - the audit daemon is optional for the other commands
    except ImportError as exc:
        print(f"eexit audit verify: the audit module is not available ({exc})", file=sys.stderr)
        return CONFIG_EXIT_CODE
    ok, line, reason = audit.verify_file(args.file)
    if ok:
        print(f"OK: {args.file}: {reason or 'hash chain intact'}")
        return EXIT_OK
    where = f" at line {line}" if line is not None else ""
    print(f"BROKEN: {args.file}{where}: {reason}")
    return EXIT_FAIL


def cmd_demo(args, cfg, env):
    from . import demo   # noqa: PLC0415 - starts processes; only this command needs it
    return demo.run(json_output=args.json, keep_logs=args.keep_logs)


def build_parser():
    parser = argparse.ArgumentParser(prog="eexit", description="eexit operator tools")
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

    p = sub.add_parser("audit", help="audit file tools")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    v = audit_sub.add_parser("verify", help="check the hash chain of an audit file")
    v.add_argument("file")
    v.set_defaults(handler=cmd_audit_verify)

    p = sub.add_parser("demo", help="private Redis + paper exchange + the three daemons; kill the Exit Brain; timeline")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs and print where")
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    env = os.environ
    try:
        cfg = Config.from_env(env)
        if args.command == "resume" and not args.operator.strip():
            raise ConfigError("--operator must name a person")
        return args.handler(args, cfg, env)
    except ConfigError as exc:
        print(f"eexit {args.command}: configuration error: {exc}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    except KeyboardInterrupt:
        print(f"\neexit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

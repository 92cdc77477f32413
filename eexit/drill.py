"""The panic drill: prove, on a paper or sandbox account, that a panic closes everything.

    eexit drill [--reason DRILL] [--timeout 30] [--json] [--live --yes-close-real-positions]

(installed with the package; tools/test_panic_close.py is a wrapper kept for old scripts.)

Uses the same environment as the daemons (REDIS_URL, EEXIT_EXCHANGE (the venue; the paper
exchange must speak its dialect: python -m eexit.paper --venue ...), EEXIT_EXCHANGE_URL /
EEXIT_SANDBOX, EEXIT_API_KEY/SECRET(/PASSWORD) or credentials, EEXIT_PANIC_HMAC_KEYS for
signing as `ops`). It reads the account through the same venue seam as the EEW and fails
unless the report's scope is the configured venue's.

Steps: refuse unless the exchange is the paper exchange or a ccxt sandbox (a real account only
with BOTH --live and --yes-close-real-positions); check that the EEW is alive (its heartbeat
and its consumer group) WITHOUT publishing anything otherwise, because a panic left in the
stream would close the account whenever an EEW next starts; read the account; publish a
signed panic with event_id, ts, issued_by=ops; wait for the report with THIS event_id (not
the newest one); check the report is FLAT, trading is halted by this event, and the
exchange, read by this tool, holds no position and no open order. Prints the timeline.

Exit codes: 0 PASS; 1 FAIL (report not FLAT, not halted, account not flat); 3 timeout or the
EEW not running; 4 refused (not paper/sandbox); 2 configuration or Redis unreachable; 5 an
unexpected error (traceback on stderr): the outcome is unknown, never read as PASS or FAIL.
The progress line is rewritten in place only on a terminal; a closed stdout (`| head`) does
not stop the drill.
"""

import argparse
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request

from . import bus, ops, schema, signing
from .console import Progress, emit, report_line
from .config import CONFIG_EXIT_CODE, ConfigError, env_float

EXIT_PASS, EXIT_FAIL, EXIT_TIMEOUT, EXIT_REFUSED, EXIT_INTERNAL = 0, 1, 3, 4, 5


def is_paper_exchange(url, timeout_s=2.0):
    """True only if url answers the paper exchange's admin endpoint with its state shape. A
    loopback URL alone proves nothing (an SSH tunnel to a real exchange is loopback too)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/_paper/state", timeout=timeout_s) as answer:
            body = json.loads(answer.read(1_000_000).decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return isinstance(body, dict) and {"positions", "open_orders", "open_algo_orders"} <= set(body)


def exchange_kind(env):
    """"paper", "sandbox" or "live" for the configured exchange (ConfigError if malformed)."""
    from eexit import exchange   # noqa: PLC0415 - ccxt only after the arguments parsed
    cfg = exchange.ExchangeConfig.from_env(env)
    if cfg.sandbox:
        return "sandbox", cfg
    if cfg.url is not None and is_paper_exchange(cfg.url):
        return "paper", cfg
    return "live", cfg


def eew_alive(client, silent_ms):
    """(alive, why): a fresh EEW heartbeat AND a consumer in the EEW group."""
    last = ops.latest(client, schema.EEW_HEARTBEAT_STREAM)
    if last is None:
        return False, f"no EEW heartbeat on {schema.EEW_HEARTBEAT_STREAM}"
    age = bus.server_time_ms(client) - (schema.entry_id_ms(last[0]) or 0)
    if age > silent_ms:
        return False, f"the EEW's last heartbeat is {age / 1000:.1f} s old"
    groups = ops.pending_summary(client).get(schema.PANIC_STREAM, {})
    if schema.EEW_GROUP not in groups:
        return False, f"no consumer group {schema.EEW_GROUP} on {schema.PANIC_STREAM}"
    return True, f"EEW heartbeat {age} ms old"


def add_arguments(parser):
    parser.add_argument("--reason", default="DRILL")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the report")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--live", action="store_true", help="allow a real (non-paper, non-sandbox) account")
    parser.add_argument("--yes-close-real-positions", action="store_true",
                        help="second confirmation required with --live")
    return parser


def main(argv=None):
    parser = argparse.ArgumentParser(description="panic drill: publish, wait for this event's report, verify flat",
                                     epilog="exit codes: 0 PASS, 1 FAIL, 2 configuration or Redis unreachable, "
                                            "3 timeout or EEW not running, 4 refused (not paper/sandbox), "
                                            "5 unexpected error (outcome unknown)")
    args = add_arguments(parser).parse_args(argv)
    try:
        return run(args, os.environ)
    except Exception as exc:  # noqa: BLE001 - the exit code must keep its meaning
        # A bug or an unanticipated environment: the traceback is for the report; 5 says
        # "outcome unknown" (the panic may have been published: check `eexit status`).
        traceback.print_exc()
        emit(f"FAIL: unexpected error {type(exc).__name__}: {str(exc)[:300]}; the outcome is unknown, "
             f"check `eexit status` (exit {EXIT_INTERNAL})")
        return EXIT_INTERNAL


def run(args, env):
    """The drill with parsed arguments; returns the exit code."""
    out = {"passed": False, "steps": []}

    def say(text):
        if not args.json:
            emit(text)

    def finish(code, why):
        out.update(passed=code == EXIT_PASS, exit_code=code, result=why)
        if args.json:
            emit(json.dumps(out, indent=2, default=str))
        else:
            emit(("PASS: " if code == EXIT_PASS else "FAIL: ") + why)
        return code

    try:
        silent_ms = env_float("EEXIT_STATUS_SILENT_S", 5.0, minimum=0.1, env=env) * 1000
        kind, cfg = exchange_kind(env)
        keyring = signing.load_keys(env)
        from eexit import exchange   # noqa: PLC0415 - imported by exchange_kind already
        scope = exchange.scope(cfg.exchange_id)
    except ConfigError as exc:
        return finish(CONFIG_EXIT_CODE, f"configuration error: {exc}")
    out["exchange"], out["scope"] = kind, scope
    if kind == "live" and not (args.live and args.yes_close_real_positions):
        return finish(EXIT_REFUSED, "refused: the exchange is neither the paper exchange nor a sandbox; this drill "
                                    "CLOSES EVERY POSITION. Pass --live --yes-close-real-positions to run it anyway")
    say(f"exchange: {kind}, scope {scope} (the drill and the EEW read these segments)")
    try:
        client = ops.connect(env)
        alive, why = eew_alive(client, silent_ms)
    except ConfigError as exc:
        return finish(CONFIG_EXIT_CODE, f"configuration error: {exc}")
    except bus.REDIS_ERRORS as exc:
        return finish(CONFIG_EXIT_CODE, f"Redis unreachable: {type(exc).__name__}: {exc}")
    if not alive:
        return finish(EXIT_TIMEOUT, f"the EEW is not running ({why}); nothing was published")
    say(f"preflight: {why}")

    before_positions, before_orders, error = ops.read_account(env)
    if error is not None:
        return finish(EXIT_FAIL, f"cannot read the account before the drill: {error}")
    out["before"] = {"positions": len(before_positions), "open_orders": len(before_orders)}
    say(f"account before: {len(before_positions)} positions, {len(before_orders)} open orders")

    try:
        event, fields = ops.build_panic(args.reason, "ops", keyring, context=ops.operator_context(tool="drill"))
        published = ops.publish_panic(client, event, fields)
    except ValueError as exc:
        return finish(CONFIG_EXIT_CODE, str(exc))
    except bus.REDIS_ERRORS as exc:
        return finish(CONFIG_EXIT_CODE, f"could not publish: {type(exc).__name__}: {exc}")
    out["event_id"] = event.event_id
    say(f"published event_id={event.event_id} entry={published.entry_id} signed={'sig' in fields}")

    progress = Progress(f"waiting for the report of {event.event_id}")
    found = ops.wait_for_report(lambda: ops.connect(env), published, args.timeout,
                                None if args.json else progress)
    progress.done()
    received_ms = int(time.time() * 1000)
    if found is None:
        return finish(EXIT_TIMEOUT, f"no report for event {event.event_id} within {args.timeout:g} s")
    entry_id, report = found
    out["report"] = ops.report_dict(entry_id, report)
    state, _, _ = ops.read_state(client)
    after_positions, after_orders, error = ops.read_account(env)
    verified_ms = int(time.time() * 1000)

    t0 = event.ts
    finished = "EEW verified flat" if report.status == "FLAT" else f"EEW finished: {report.status}, NOT flat"
    timeline = [("published", event.ts), ("EEW started", report.ts_started), ("halted", state.halted_at),
                (finished, report.ts_completed), ("report received", received_ms),
                ("drill re-read the account", verified_ms)]
    out["timeline"] = {name: None if at is None else at - t0 for name, at in timeline}
    say("timeline (ms after publishing)")
    for name, at in timeline:
        say(f"  {'n/a' if at is None else f'{at - t0:+6d}'} ms  {name}")
    say(f"report: {report_line(ops.report_dict(entry_id, report))}")

    failures = []
    if report.status != "FLAT":
        failures.append(f"report status {report.status} {report.detail}".strip())
    if report.scope != scope:
        # A FLAT covering other segments than this drill reads proves nothing about them.
        failures.append(f"report scope {report.scope or '-'} is not the configured {scope}")
    if not (state.halted is True and state.event_id == event.event_id):
        failures.append(f"trading not halted by this event (halted={state.halted}, event_id={state.event_id or '-'})")
    if error is not None:
        failures.append(f"cannot re-read the account: {error}")
    else:
        if after_positions:
            failures.append("positions left: " + ", ".join(f"{p.symbol} {p.side} {p.contracts:g}" for p in after_positions))
        if after_orders:
            failures.append(f"{len(after_orders)} open orders left")
    if failures:
        return finish(EXIT_FAIL, "; ".join(failures))
    say(f"trading stays halted; to resume: eexit resume --operator NAME --ack {event.event_id}")
    return finish(EXIT_PASS, f"flat and halted, report {report.execution_time_ms} ms")


if __name__ == "__main__":
    sys.exit(main())

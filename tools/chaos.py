#!/usr/bin/env python3
"""Automated chaos suite on the embedded stack (private redis-server, paper exchange, the three
daemons as real subprocesses; see eexit/demo.py `Stack`).

    python tools/chaos.py [--runs N] [--scenario NAME ...] [--ci] [--soak MINUTES]
                          [--seed S] [--json] [--keep-logs] [--list]

Every run starts a fresh stack with thresholds scaled down (unguarded 1 s), the watchdog only
once the guard beats (no since-start false alarm on a loaded machine), injects its fault
at a random moment, and then asserts the END STATE, polling until it holds or a deadline:

    flat             no position and no open order on the exchange
    halted           system:state:trading halted=true, or missing (read as halted: a Redis
                     restart without persistence can wipe it after the EEW wrote it)
    not lost         every authorised event_id has exactly one final report (FLAT)
    not doubled      ... and never two; forged event_ids have only REJECTED reports
    nothing pending  the EEW group has nothing pending and nothing unread

Scenarios (kill -9 is SIGKILL; "random" is drawn from --seed):
    kill_brain          SIGKILL the Exit Brain (baseline)
    kill_eew_mid_close  orders slowed to 150 ms each; SIGKILL the EEW at a random moment
                        during the close, restart it: the redelivery resumes, one report
    kill_eew_before     EEW down when the panic is published; restarted after a random delay
    kill_watchdog       SIGKILL the watchdog at a random moment around the detection and
                        restart it: the open incident is recovered, no second event_id
    redis_restart       Redis (AOF, appendfsync always) SIGKILLed and restarted at a random
                        moment around the panic; the chain recovers and goes flat
    redis_wipe          the same without persistence: every key is lost; if the wipe came
                        after the report, only flat / not un-halted / nothing pending count
    exchange_hang       positionRisk hangs (the client times out) on the EEW's first reads
    exchange_5xx        the first order requests answer 503
    exchange_429        the first order requests answer 429 -1003 with Retry-After: 1
    duplicate_events    one signed ops panic XADDed three times: one FLAT, two DUPLICATE
    forged_events       unsigned and badly signed "watchdog" panics change nothing
                        (REJECTED, still not halted, positions intact); then the brain dies
    clock_skew          a guard whose clock is an hour off (both ways) beats: no false
                        panic; then it falls silent: the panic comes

Exit code 0 when every run passed. --runs N prints a table (runs, passed, lost, doubled,
kill-to-flat p50/max). --ci runs a short subset once (CI, tests/test_chaos.py); --soak M
repeats every scenario for M minutes. Human-readable by default, --json for scripts.
"""

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eexit import bus, ops, schema, signing  # noqa: E402
from eexit.demo import Stack  # noqa: E402

SEED_POSITIONS = "BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:20"
ORDERS = (   # demo.DEMO_ORDERS format: market id, side, quantity, price, trigger, reduce-only
    ("BTCUSDT", "buy", 0.01, 50000, None, False),
    ("ETHUSDT", "buy", 0.5, None, 3500, True),
)
FAST = {
    "EEXIT_UNGUARDED_S": "1", "EEXIT_HEARTBEAT_LOST_S": "1.5", "EEXIT_DEGRADED_S": "1.5",
    "EEXIT_STARTUP_GRACE_S": "0.5", "EEXIT_BRAIN_INTERVAL_S": "0.2", "EEXIT_REPUBLISH_S": "1",
    "EEXIT_WATCHDOG_HEARTBEAT_S": "0.2", "EEXIT_HEARTBEAT_INTERVAL_S": "0.2",
    "EEXIT_CLAIM_IDLE_MS": "1000", "EEXIT_SWEEP_INTERVAL_S": "0.5", "EEXIT_EXCHANGE_TIMEOUT_MS": "1000",
    "EEXIT_BLOCK_MS": "200", "EEXIT_CLOSE_DEADLINE_S": "15",
}
END_STATE_TIMEOUT_S = 30.0
REDIS_AOF = ("--appendonly", "yes", "--appendfsync", "always")


class ScenarioFailed(Exception):
    pass


# ---------------------------------------------------------------------------- end state

def end_state_problems(stack, client, reports_wiped=False):
    """[] when the end state holds, else what is wrong. Pure reading; no waiting."""
    problems = []
    positions = stack.paper.positions()
    if positions:
        problems.append(f"not flat: {sorted(positions)}")
    if stack.open_order_count():
        problems.append(f"{stack.open_order_count()} open orders")
    state, _, _ = ops.read_state(client)
    # A missing flag is read as halted by every reader (SPEC §2); only an explicit false, or
    # garbage that still parses as false, would let trading resume.
    if state.halted is False:
        problems.append("not halted (halted=false)")
    if not reports_wiped:
        problems += report_problems(stack, client)
    group = ops.pending_summary(client).get(schema.PANIC_STREAM, {}).get(schema.EEW_GROUP)
    if group is None:
        problems.append("no EEW group")
    elif group["pending"] or group["lag"]:
        problems.append(f"EEW group pending={group['pending']} unread={group['lag']}")
    return problems


def classify_events(stack, client):
    """{event_id: authorised?} for every panic entry, by the stack's key ring."""
    ring = signing.parse_keys(stack.keyring_text(), "chaos")
    events = {}
    for _entry_id, fields in ops.iter_reverse(client, schema.PANIC_STREAM):
        ok, _reason = signing.verify_fields(fields, ring)
        event_id = fields.get("event_id", "")
        events[event_id] = events.get(event_id, False) or ok
    return events


def count_reports(client):
    """{event_id: {status: n}}"""
    counts = {}
    for _entry_id, fields in ops.iter_reverse(client, schema.COMPLETED_STREAM):
        for event_id in ops.report_event_ids(fields):
            per = counts.setdefault(event_id, {})
            per[fields.get("status", "?")] = per.get(fields.get("status", "?"), 0) + 1
    return counts


def final_counts(counts):
    """{event_id: number of FLAT/RESIDUAL/FAILED reports}"""
    return {event_id: sum(statuses.get(s, 0) for s in schema.FINAL_STATUSES) for event_id, statuses in counts.items()}


def report_problems(stack, client):
    """Lost and doubled events. A Redis restart without persistence may wipe the panic entry
    while the EEW re-publishes its journaled report afterwards: a final report whose event is
    no longer in the stream is fine, two final reports for one event_id never are."""
    problems = []
    counts = count_reports(client)
    events = classify_events(stack, client)
    finals = final_counts(counts)
    if not any(events.values()) and not any(finals.values()):
        problems.append("no panic handled: no authorised event and no final report")
    for event_id, final in finals.items():
        if final > 1:
            problems.append(f"doubled: {final} final reports for {event_id}")
    for event_id, authorised in events.items():
        statuses = counts.get(event_id, {})
        final = finals.get(event_id, 0)
        if authorised and final == 0:
            problems.append(f"lost: no final report for {event_id}")
        elif authorised and final == 1 and statuses.get("FLAT", 0) != 1:
            problems.append(f"event {event_id} ended {statuses}")
        elif not authorised and (final or not statuses.get("REJECTED")):
            problems.append(f"forged event {event_id} got {statuses or 'no report'}")
    return problems


def lost_and_doubled(stack, client):
    counts = count_reports(client)
    finals = final_counts(counts)
    lost = sum(1 for event_id, authorised in classify_events(stack, client).items()
               if authorised and finals.get(event_id, 0) == 0)
    doubled = sum(1 for final in finals.values() if final > 1)
    return lost, doubled


# ---------------------------------------------------------------------------- helpers

def wait(stack, predicate, timeout_s, what):
    return stack.wait_until(predicate, timeout_s, what, interval_s=0.01)


def panic_published(client):
    return ops.latest(client, schema.PANIC_STREAM)


def ops_panic(stack, client, reason="CHAOS"):
    ring = signing.parse_keys(stack.keyring_text(), "chaos")
    event, fields = ops.build_panic(reason, "ops", ring, context={"tool": "chaos"})
    client.xadd(schema.PANIC_STREAM, fields)
    return event, fields


def kill_brain(stack):
    return stack.kill_daemon("brain")


# ---------------------------------------------------------------------------- scenarios
# Each returns the trigger time (epoch ms) from which kill-to-flat is measured.

def sc_kill_brain(stack, client, rng):
    return kill_brain(stack)


def sc_kill_eew_mid_close(stack, client, rng):
    stack.paper.add_fault(kind="latency", ms=150, path="/fapi/v1/order")
    t0 = kill_brain(stack)
    wait(stack, lambda: panic_published(client), 10, "the panic")
    time.sleep(rng.uniform(0.0, 0.35))
    stack.kill_daemon("eew")
    time.sleep(rng.uniform(0.0, 0.5))
    stack.start_daemon("eew")
    return t0


def sc_kill_eew_before(stack, client, rng):
    stack.kill_daemon("eew")
    t0 = kill_brain(stack)
    wait(stack, lambda: panic_published(client), 10, "the panic")
    time.sleep(rng.uniform(0.0, 1.5))
    stack.start_daemon("eew")
    return t0


def sc_kill_watchdog(stack, client, rng):
    t0 = kill_brain(stack)
    time.sleep(rng.uniform(0.0, 1.6))        # before, around or after the 1 s detection
    stack.kill_daemon("watchdog")
    time.sleep(rng.uniform(0.0, 0.5))
    stack.start_daemon("watchdog")
    return t0


def sc_redis_restart(stack, client, rng):
    """Redis with an fsync-always AOF (the deployment's setting) killed and restarted."""
    t0 = kill_brain(stack)
    time.sleep(rng.uniform(0.0, 1.6))
    stack.redis.restart()
    return t0


def sc_redis_wipe(stack, client, rng):
    """Redis WITHOUT persistence killed and restarted: every stream and key is lost. If the
    report already existed, the wipe erased the evidence too: then only the account and the
    halt can be checked (a missing halt flag reads as halted)."""
    t0 = kill_brain(stack)
    time.sleep(rng.uniform(0.0, 1.1))     # mostly before the report (detection at 1 s)
    reported = bool(final_counts(count_reports(client)))
    stack.redis.restart()
    return t0, {"reports_wiped": reported}


def sc_exchange_hang(stack, client, rng):
    t0 = kill_brain(stack)
    stack.paper.add_fault(kind="hang", seconds=5, path="positionRisk", count=rng.randint(1, 2))
    return t0


def sc_exchange_5xx(stack, client, rng):
    t0 = kill_brain(stack)
    stack.paper.add_fault(kind="error", status=503, path="/fapi/v1/order", count=rng.randint(1, 3))
    return t0


def sc_exchange_429(stack, client, rng):
    t0 = kill_brain(stack)
    stack.paper.add_fault(kind="error", status=429, code=-1003, retry_after=1, path="/fapi/v1/order",
                          count=rng.randint(1, 3))
    return t0


def sc_duplicate_events(stack, client, rng):
    t0 = int(time.time() * 1000)
    _event, fields = ops_panic(stack, client)
    for _ in range(2):
        time.sleep(rng.uniform(0.0, 0.2))
        client.xadd(schema.PANIC_STREAM, fields)
    wait(stack, lambda: sum(count_reports(client).get(fields["event_id"], {}).values()) >= 3, 20,
         "three reports for the duplicated event")
    statuses = count_reports(client)[fields["event_id"]]
    if statuses != {"FLAT": 1, "DUPLICATE": 2}:
        raise ScenarioFailed(f"duplicated event got {statuses}")
    return t0


def sc_forged_events(stack, client, rng):
    ring = signing.parse_keys(stack.keyring_text(), "chaos")
    unsigned = schema.PanicEvent("forged-unsigned", "POSITIONS_UNGUARDED", "watchdog", int(time.time() * 1000))
    client.xadd(schema.PANIC_STREAM, unsigned.to_fields())
    fake = schema.PanicEvent("forged-badsig", "POSITIONS_UNGUARDED", "watchdog", int(time.time() * 1000))
    forged = dict(fake.to_fields(), kid=ring.kid_for("watchdog"), sig="0" * 64)
    client.xadd(schema.PANIC_STREAM, forged)
    wait(stack, lambda: all(count_reports(client).get(e) for e in ("forged-unsigned", "forged-badsig")), 20,
         "REJECTED reports for the forgeries")
    state, _, _ = ops.read_state(client)
    if state.halted is True or len(stack.paper.positions()) != 3:
        raise ScenarioFailed(f"a forgery acted: halted={state.halted} positions={stack.paper.positions()}")
    return kill_brain(stack)


class SkewedGuard:
    """A guard whose wall clock is `skew_ms` off, beating every 0.1 s from a thread (10 beats
    per unguarded threshold: a scheduling hiccup on a loaded machine is no silence)."""

    def __init__(self, client, skew_ms):
        self.client, self.skew_ms = client, skew_ms
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopped.is_set():
            ts = int(time.time() * 1000) + self.skew_ms
            # The brain's service_id: the watchdog judges only that one (EEXIT_BRAIN_SERVICE_ID).
            beat = schema.Heartbeat("exit_brain", "OK", 3, ts - 50, 5.0, ts)
            try:
                bus.publish(self.client, schema.HEARTBEAT_STREAM, beat, maxlen=schema.HEARTBEAT_MAXLEN)
            except bus.REDIS_ERRORS:
                pass   # the run fails on its end state if the guard could not beat
            self.stopped.wait(0.1)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopped.set()
        self.thread.join(timeout=5)


def sc_clock_skew(stack, client, rng):
    """A guard whose wall clock is an hour off beats healthily: no panic. Then it stops.

    The guard beats BEFORE the watchdog starts (the watchdog's since-start rule would fire
    on a watchdog that ran longer than its lost threshold without any beat: that is the rule
    working, not the skew), and "healthily for a while" is counted in the watchdog's own
    heartbeats, which it publishes after every evaluation: events, not sleeps."""
    skew_ms = rng.choice((-1, 1)) * 3600 * 1000
    guard = SkewedGuard(stack.client(), skew_ms).start()
    try:
        wait(stack, lambda: ops.latest(client, schema.HEARTBEAT_STREAM), 10, "the skewed guard's first beat")
        stack.start_daemon("watchdog")
        wait(stack, lambda: watchdog_saw_brain(client), 30, "the watchdog seeing the skewed guard")
        evaluated = client.xlen(schema.WATCHDOG_HEARTBEAT_STREAM)
        # 12 more watchdog beats (0.2 s apart in FAST): well past the 1 s unguarded threshold.
        wait(stack, lambda: client.xlen(schema.WATCHDOG_HEARTBEAT_STREAM) >= evaluated + 12, 30,
             "the watchdog evaluating the skewed guard")
        if client.xlen(schema.PANIC_STREAM):
            raise ScenarioFailed(f"false panic with a guard clock skewed by {skew_ms // 1000:+d} s")
    finally:
        guard.stop()
    return int(time.time() * 1000)


def watchdog_saw_brain(client):
    last = ops.latest(client, schema.WATCHDOG_HEARTBEAT_STREAM)
    return last is not None and last[1].get("brain_status") == "OK"


SCENARIOS = {
    "kill_brain": (sc_kill_brain, ("eew", "watchdog", "brain")),
    "kill_eew_mid_close": (sc_kill_eew_mid_close, ("eew", "watchdog", "brain")),
    "kill_eew_before": (sc_kill_eew_before, ("eew", "watchdog", "brain")),
    "kill_watchdog": (sc_kill_watchdog, ("eew", "watchdog", "brain")),
    "redis_restart": (sc_redis_restart, ("eew", "watchdog", "brain")),
    "redis_wipe": (sc_redis_wipe, ("eew", "watchdog", "brain")),
    "exchange_hang": (sc_exchange_hang, ("eew", "watchdog", "brain")),
    "exchange_5xx": (sc_exchange_5xx, ("eew", "watchdog", "brain")),
    "exchange_429": (sc_exchange_429, ("eew", "watchdog", "brain")),
    "duplicate_events": (sc_duplicate_events, ("eew", "watchdog", "brain")),
    "forged_events": (sc_forged_events, ("eew", "watchdog", "brain")),
    "clock_skew": (sc_clock_skew, ("eew",)),   # starts the watchdog itself
}
CI_SUBSET = ("kill_brain", "kill_eew_mid_close", "kill_watchdog", "redis_restart", "redis_wipe", "exchange_429",
             "duplicate_events", "forged_events", "clock_skew")


def run_one(name, rng, keep_logs=False):
    """One run of one scenario on a fresh stack. Returns a result dict."""
    action, daemons = SCENARIOS[name]
    redis_args = REDIS_AOF if name == "redis_restart" else ()
    stack = Stack(seed=SEED_POSITIONS, env=FAST, keep_workdir=keep_logs, redis_args=redis_args)
    result = {"scenario": name, "passed": False, "problems": [], "lost": 0, "doubled": 0, "flat_ms": None}
    notes = []
    try:
        # The watchdog starts only once the guard beats: its since-start rule (no heartbeat
        # for the lost threshold, 1.5 s here) would otherwise fire while a loaded machine is
        # still importing the brain. That is the rule working, not the scenario.
        stack.start(daemons=[d for d in daemons if d != "watchdog"], orders=ORDERS)
        client = stack.client()
        wait(stack, lambda: ops.latest(client, schema.EEW_HEARTBEAT_STREAM), 30, "the EEW")
        if "brain" in daemons:
            wait(stack, lambda: ops.latest(client, schema.HEARTBEAT_STREAM), 30, "the brain's first heartbeat")
            stack.start_daemon("watchdog")
            wait(stack, lambda: stack.guarded(client, 3) and watchdog_saw_brain(client), 30, "the brain guarding")
            wait(stack, lambda: stack.running_for("watchdog") > 0.7, 5, "the watchdog's grace")
        outcome = action(stack, client, rng)
        t0, flags = outcome if isinstance(outcome, tuple) else (outcome, {})
        wiped = flags.get("reports_wiped", False)
        if wiped:
            notes.append("Redis wiped after the report: reports not checkable")
        deadline = time.monotonic() + END_STATE_TIMEOUT_S
        problems = ["not checked"]
        while time.monotonic() < deadline:
            try:
                client = stack.client() if problems == ["redis"] else client
                problems = end_state_problems(stack, client, wiped)
            except bus.REDIS_ERRORS:
                problems = ["redis"]   # Redis restarting: poll again with a fresh client
            if not problems:
                result["flat_ms"] = int(time.time() * 1000) - t0
                break
            time.sleep(0.02)
        if not problems:
            time.sleep(0.3)   # settle: a late second report or re-publish would show now
            problems = end_state_problems(stack, client, wiped)
        result["problems"] = problems
        if not client.hexists(schema.TRADING_STATE_KEY, "halted"):
            notes.append("halt flag missing (read as halted)")
        result["note"] = "; ".join(notes)
        result["lost"], result["doubled"] = lost_and_doubled(stack, client)
        result["passed"] = not problems
    except (ScenarioFailed, TimeoutError) as exc:
        result["problems"] = [str(exc)]
    except Exception as exc:  # noqa: BLE001 - a broken run is a failed run, with its traceback
        result["problems"] = [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)]
    finally:
        if not result["passed"]:
            result["logs"] = {n: [line.rstrip() for line in stack.log_tail(n, 8)] for n in stack.processes}
        stack.stop()
        if keep_logs:
            result["workdir"] = stack.workdir
    return result


def summarise(results):
    table = {}
    for r in results:
        row = table.setdefault(r["scenario"], {"runs": 0, "passed": 0, "lost": 0, "doubled": 0, "flat_ms": []})
        row["runs"] += 1
        row["passed"] += r["passed"]
        row["lost"] += r["lost"]
        row["doubled"] += r["doubled"]
        if r["flat_ms"] is not None:
            row["flat_ms"].append(r["flat_ms"])
    for row in table.values():
        times = row.pop("flat_ms")
        row["flat_p50_ms"] = int(statistics.median(times)) if times else None
        row["flat_max_ms"] = max(times) if times else None
    return table


def print_table(table):
    print(f"{'scenario':<20} {'runs':>4} {'pass':>4} {'fail':>4} {'lost':>4} {'doubled':>7} "
          f"{'flat p50':>9} {'flat max':>9}")
    for name, row in table.items():
        p50 = "-" if row["flat_p50_ms"] is None else f"{row['flat_p50_ms']} ms"
        worst = "-" if row["flat_max_ms"] is None else f"{row['flat_max_ms']} ms"
        print(f"{name:<20} {row['runs']:>4} {row['passed']:>4} {row['runs'] - row['passed']:>4} "
              f"{row['lost']:>4} {row['doubled']:>7} {p50:>9} {worst:>9}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="chaos suite on the embedded stack")
    parser.add_argument("--runs", type=int, default=1, help="runs per scenario")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="only these (repeatable)")
    parser.add_argument("--ci", action="store_true", help="the short CI subset, once each")
    parser.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="repeat all scenarios for MINUTES")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    names = list(args.scenario or (CI_SUBSET if args.ci else SCENARIOS))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    results = []
    interrupted = False

    def on_sigterm(_signo, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else (lambda text: print(text, flush=True))
    say(f"chaos: seed {seed}, scenarios {', '.join(names)}, "
        + (f"soak {args.soak:g} min" if args.soak else f"{args.runs} run(s) each"))
    soak_end = time.monotonic() + args.soak * 60 if args.soak else None
    try:
        run_index = 0
        while True:
            for name in names:
                result = run_one(name, rng, args.keep_logs)
                results.append(result)
                flat = "-" if result["flat_ms"] is None else f"{result['flat_ms']} ms"
                say(f"  {'PASS' if result['passed'] else 'FAIL'} {name:<20} flat after {flat}"
                    + (f"  note: {result['note']}" if result.get("note") else "")
                    + ("" if result["passed"] else f"  {result['problems']}"))
                if not result["passed"]:
                    for daemon, lines in result.get("logs", {}).items():
                        for line in lines:
                            say(f"      [{daemon}] {line}")
            run_index += 1
            if soak_end is not None:
                if time.monotonic() >= soak_end:
                    break
            elif run_index >= args.runs:
                break
    except KeyboardInterrupt:
        interrupted = True
        say("chaos: interrupted; the table covers the finished runs")
    table = summarise(results)
    passed = bool(results) and all(r["passed"] for r in results)
    if args.json:
        print(json.dumps({"seed": seed, "passed": passed, "interrupted": interrupted, "table": table,
                          "runs": results}, indent=2, default=str))
    else:
        print_table(table)
        print(("INTERRUPTED, " if interrupted else "") + ("PASS" if passed else "FAIL"))
    if interrupted:
        return 130
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

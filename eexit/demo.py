"""`eexit demo` (`make demo`): the whole safety chain on one machine, end to end.

Starts a private redis-server on 127.0.0.1, the paper exchange (in this process) with several
positions plus resting and conditional orders, and the three daemons as subprocesses with
HMAC-signed panics configured; waits until the Exit Brain guards the positions; SIGKILLs it;
and records, on the exchange and in Redis, when each step happened:

    kill -> detection (the watchdog's panic `ts`) -> panic published (its stream entry)
    -> trading halted (`halted_at`) -> orders cancelled (seen on the exchange)
    -> positions closed (seen on the exchange) -> verified flat (the EEW's FLAT report)

judged against the seed runbook (detection < 5.5 s, close < 10 s, total < 15 s) and eexit's
own target (kill -> verified flat <= 3.5 s with the default 3 s unguarded threshold).

`Stack` is reused by tools/chaos.py and the tests. Every child process is started in its own
session with PR_SET_PDEATHSIG, and everything is stopped in `finally`: Ctrl-C, SIGTERM, an
exception or even SIGKILL of this process leaves nothing running. Not part of the daemons'
auditable surface (no daemon imports it).
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import bus, ops, schema
from .localredis import RedisServer, die_with_parent, stop_process

DAEMON_MODULES = {"eew": "eexit.eew", "watchdog": "eexit.watchdog", "brain": "eexit.brain"}
DEMO_SEED = "BTCUSDT:0.01,ETHUSDT:-0.5,SOLUSDT:20,XRPUSDT:-1000"
# (market id, side, quantity, limit price, trigger price, reduce-only): resting entries that
# could re-open exposure after the halt, and the bot's protective conditional orders (the
# conditional book). Seeded into the paper exchange directly, so any venue's dialect has them.
DEMO_ORDERS = (
    ("BTCUSDT", "buy", 0.01, 50000, None, False),
    ("ETHUSDT", "sell", 0.5, 4000, None, False),
    ("SOLUSDT", "buy", 10, 100, None, False),
    ("BTCUSDT", "sell", 0.01, None, 60000, True),
    ("ETHUSDT", "buy", 0.5, None, 3500, True),
    ("SOLUSDT", "sell", 20, None, 100, True),
)
SEED_CRITERIA_MS = {"detect": 5500, "close": 10000, "total": 15000}
TARGET_END_TO_END_MS = 3500
UNGUARDED_S = 3.0
STARTUP_GRACE_S = 2.0


def now_ms():
    return int(time.time() * 1000)


class Stack:
    """Private Redis + in-process paper exchange + daemon subprocesses, all on 127.0.0.1.

    env: extra settings for every daemon (thresholds scaled down in tests). Each daemon's
    output goes to <workdir>/<name>.log."""

    def __init__(self, seed=DEMO_SEED, hedge=False, env=None, keep_workdir=False, paper_latency_ms=0,
                 redis_args=(), venue="binanceusdm"):
        self.seed = seed
        self.venue = venue
        self.redis_args = tuple(redis_args)
        self.hedge = hedge
        self.extra_env = dict(env or {})
        self.keep_workdir = keep_workdir
        self.paper_latency_ms = paper_latency_ms
        self.workdir = tempfile.mkdtemp(prefix="eexit-stack-")
        self.redis = None
        self.paper = None
        self.paper_url = None
        self.processes = {}
        self.started_mono = {}
        # One key per issuer, fresh per stack: forged or unsigned events are REJECTED.
        self.keys = {issuer: (f"{issuer}-demo", secrets.token_hex(32)) for issuer in ("watchdog", "ops")}

    # -- lifecycle

    def start(self, daemons=tuple(DAEMON_MODULES), orders=DEMO_ORDERS):
        self.redis = self.make_redis().start()
        self.paper = self.make_paper()
        self.paper_url = self.paper.start()
        if orders:
            self.place_orders(orders)
        for name in daemons:
            self.start_daemon(name)
        return self

    def make_redis(self):
        return RedisServer(self.redis_args, die_with_parent=True)

    def make_paper(self, **options):
        from .paper import PaperExchange   # noqa: PLC0415 - the paper exchange is for demo/tests only
        return PaperExchange(seed=self.seed, hedge=self.hedge, latency_ms=self.paper_latency_ms,
                             venue=self.venue, **options)

    def stop(self):
        """Stop everything this stack started; safe to call twice and after partial starts."""
        for name in list(self.processes):
            self.stop_daemon(name)
        if self.paper is not None:
            self.paper.stop()
            self.paper = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def leftovers(self):
        """Child processes still alive (should be none after stop())."""
        alive = [f"{name} pid {p.pid}" for name, p in self.processes.items() if p.poll() is None]
        return alive

    # -- environment

    def keyring_text(self, only=None):
        return ",".join(f"{kid} {issuer} {key}" for issuer, (kid, key) in self.keys.items()
                        if only is None or issuer == only)

    def env(self, **more):
        """Environment for a daemon or an operator tool pointed at this stack."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EEXIT_", "REDIS_", "BINANCE_"))}
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY"):
            env.pop(key, None)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update({
            "REDIS_URL": self.redis.url,
            **self.exchange_env(),
            "EEXIT_PANIC_HMAC_KEYS": self.keyring_text(),
            "EEXIT_JOURNAL": os.path.join(self.workdir, "eew-journal.jsonl"),
            "EEXIT_CONSUMER": "eew-stack",
            "EEXIT_UNGUARDED_S": str(UNGUARDED_S),
            # The watchdog stays silent for its start-up grace; 2 s keeps the demo short and
            # is still longer than the brain needs for its first heartbeat.
            "EEXIT_STARTUP_GRACE_S": str(STARTUP_GRACE_S),
        })
        env.update({k: str(v) for k, v in self.extra_env.items()})
        env.update({k: str(v) for k, v in more.items()})
        return env

    # -- daemons

    def log_path(self, name):
        return os.path.join(self.workdir, f"{name}.log")

    def start_daemon(self, name):
        with open(self.log_path(name), "ab") as log:
            # A signer holds its own key only (signing.check_own_keys); the EEW verifies them all.
            own = {"EEXIT_PANIC_HMAC_KEYS": self.keyring_text("watchdog")} if name == "watchdog" else {}
            process = subprocess.Popen([sys.executable, "-m", DAEMON_MODULES[name]], env=self.env(**own),
                                       stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                       start_new_session=True, preexec_fn=die_with_parent)
        self.processes[name] = process
        self.started_mono[name] = time.monotonic()
        return process

    def kill_daemon(self, name, sig=signal.SIGKILL):
        """Send sig; returns the wall-clock ms just before sending. Waits for the exit."""
        process = self.processes[name]
        sent = now_ms()
        if process.poll() is None:
            process.send_signal(sig)
            process.wait(timeout=10)
        return sent

    def stop_daemon(self, name, timeout_s=5.0):
        process = self.processes.get(name)
        if process is None:
            return None
        return stop_process(process, timeout_s)

    def running_for(self, name):
        return time.monotonic() - self.started_mono[name]

    def restart_daemon(self, name):
        self.kill_daemon(name)
        return self.start_daemon(name)

    def log_tail(self, name, lines=15):
        try:
            with open(self.log_path(name), encoding="utf-8", errors="replace") as f:
                return f.readlines()[-lines:]
        except OSError:
            return []

    # -- exchange

    def exchange_env(self):
        env = {"EEXIT_EXCHANGE": self.venue, "EEXIT_EXCHANGE_URL": self.paper_url,
               "EEXIT_API_KEY": self.paper.api_key, "EEXIT_API_SECRET": self.paper.api_secret.decode()}
        if self.venue == "okx":
            env["EEXIT_API_PASSWORD"] = self.paper.api_password
        return env

    def exchange(self):
        from . import exchange   # noqa: PLC0415 - ccxt only where orders are placed
        ex = exchange.build_exchange(exchange.ExchangeConfig.from_env(self.exchange_env()))
        ex.load_markets()
        return ex

    def place_orders(self, orders):
        for market_id, side, amount, price, trigger, reduce_only in orders:
            self.paper.add_order(market_id, side, amount, price=price, trigger=trigger, reduce_only=reduce_only)

    def open_order_count(self):
        state = self.paper.state()
        return len(state["open_orders"]) + len(state["open_algo_orders"])

    # -- redis views

    def client(self):
        return bus.connect(self.redis.url, env={})

    def wait_until(self, predicate, timeout_s, what, interval_s=0.02):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except bus.REDIS_ERRORS:
                value = None   # Redis restarting in a chaos scenario: keep polling until the deadline
            if value:
                return value
            time.sleep(interval_s)
        raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")

    def guarded(self, client, positions):
        """True once the brain's latest heartbeat is OK with `positions` and the EEW and the
        watchdog have heartbeats too."""
        last = ops.latest(client, schema.HEARTBEAT_STREAM)
        if last is None:
            return False
        beat, _ = schema.Heartbeat.from_fields(last[1])
        if beat.status != "OK" or beat.active_positions != positions:
            return False
        return all(ops.latest(client, stream) for stream in (schema.EEW_HEARTBEAT_STREAM,
                                                              schema.WATCHDOG_HEARTBEAT_STREAM))


# ---------------------------------------------------------------------------- the demo

def observe(stack, client, kill_ms, timeout_s=20.0):
    """Poll the exchange and Redis every few ms after the kill until the FLAT report (or the
    timeout). Returns the raw observations; every time is epoch ms on this host's clock."""
    seen = {"kill": kill_ms}
    deadline = time.monotonic() + timeout_s
    event_id = None
    while time.monotonic() < deadline:
        at = now_ms()
        if "orders_cancelled" not in seen and stack.open_order_count() == 0:
            seen["orders_cancelled"] = at
        if "positions_closed" not in seen and not stack.paper.positions():
            seen["positions_closed"] = at
        if event_id is None:
            last = ops.latest(client, schema.PANIC_STREAM)
            if last is not None:
                event, _ = schema.PanicEvent.from_fields(last[1])
                event_id = event.event_id
                seen.update(event_id=event_id, reason=event.reason, issued_by=event.issued_by,
                            detected=event.ts, published=schema.entry_id_ms(last[0]))
        if event_id is not None and "halted" not in seen:
            state, _, _ = ops.read_state(client)
            if state.halted and state.event_id == event_id:
                seen["halted"] = state.halted_at
        if event_id is not None:
            final = ops.final_report(ops.find_reports(client, event_id))
            if final is not None and "halted" in seen:
                entry_id, report = final
                seen.update(report=ops.report_dict(entry_id, report), verified=report.ts_completed,
                            report_published=schema.entry_id_ms(entry_id))
                break
        time.sleep(0.005)
    return seen


def verified_text(report):
    """The last timeline row: only a FLAT report is ever called "verified flat"."""
    if report is None:
        return "EEW report MISSING"
    if report["status"] == "FLAT":
        return "verified flat: EEW re-read the account, report FLAT"
    return f"EEW finished, report {report['status']}: NOT flat"


def judge(seen, stack, client):
    """(timeline rows, criteria rows, passed). Offsets are ms after the kill."""
    kill = seen["kill"]

    def offset(key):
        return None if seen.get(key) is None else seen[key] - kill

    timeline = [
        ("kill", 0, "Exit Brain SIGKILLed"),
        ("detection", offset("detected"), f"watchdog detected {seen.get('reason', '?')}"),
        ("panic_published", offset("published"), f"panic published on {schema.PANIC_STREAM} "
                                                 f"(event {seen.get('event_id', '?')}, by {seen.get('issued_by', '?')})"),
        ("halted", offset("halted"), "trading halted (system:state:trading)"),
        ("orders_cancelled", offset("orders_cancelled"), "all resting and conditional orders cancelled (exchange)"),
        ("positions_closed", offset("positions_closed"), "all positions closed (exchange)"),
        ("verified_flat", offset("verified"), verified_text(seen.get("report"))),
    ]
    report = seen.get("report") or {}
    reports = ops.find_reports(client, seen["event_id"]) if seen.get("event_id") else []
    pending = ops.pending_summary(client).get(schema.PANIC_STREAM, {}).get(schema.EEW_GROUP, {})
    end_to_end = offset("verified") if report.get("status") == "FLAT" else None   # only FLAT is "flat"
    close = offset("positions_closed")
    total = max((v for v in (offset("verified"), offset("halted"), close) if v is not None), default=None)
    end_state = {
        "report FLAT": report.get("status") == "FLAT",
        "exactly one report for the event": len(reports) == 1,
        "exchange flat": not stack.paper.positions(),
        "no open orders": stack.open_order_count() == 0,
        "trading halted": "halted" in seen,
        "nothing pending in the EEW group": pending.get("pending", 1) == 0,
    }

    def within(value, limit):
        return value is not None and value < limit

    criteria = [
        ("seed: detection < 5.5 s", offset("detected"), within(offset("detected"), SEED_CRITERIA_MS["detect"])),
        ("seed: positions closed < 10 s", close, within(close, SEED_CRITERIA_MS["close"])),
        ("seed: flat and halted < 15 s", total, within(total, SEED_CRITERIA_MS["total"])),
        (f"eexit: kill -> verified flat <= {TARGET_END_TO_END_MS / 1000:g} s", end_to_end,
         end_to_end is not None and end_to_end <= TARGET_END_TO_END_MS),
    ]
    criteria += [(f"end state: {name}", None, ok) for name, ok in end_state.items()]
    return timeline, criteria, all(ok for _, _, ok in criteria)


def run(json_output=False, keep_logs=False, venue="binanceusdm"):
    """The demo. Returns the exit code: 0 PASS, 1 FAIL (including any error)."""
    def on_sigterm(_signo, _frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if json_output else (lambda *a: print(*a, flush=True))
    stack = Stack(keep_workdir=keep_logs, venue=venue)
    result = {"passed": False}
    try:
        say("eexit demo: starting a private redis-server, the paper exchange and the three daemons ...")
        stack.start()
        positions = len(stack.paper.positions())
        say(f"  redis-server {stack.redis.url}   paper exchange ({venue} dialect) {stack.paper_url}")
        say(f"  {positions} positions ({stack.seed}), {len(DEMO_ORDERS)} open orders "
            f"(3 resting limit, 3 conditional in the algo book)")
        say("  daemons: " + ", ".join(f"{n} pid {p.pid}" for n, p in stack.processes.items())
            + f"; watchdog unguarded threshold {UNGUARDED_S:g} s; panics HMAC-signed")
        client = stack.client()
        stack.wait_until(lambda: stack.guarded(client, positions), 30, "the Exit Brain to guard the positions")
        # Past the watchdog's start-up grace, so the kill meets a fully armed watchdog.
        stack.wait_until(lambda: stack.running_for("watchdog") > STARTUP_GRACE_S + 0.2, 10, "the watchdog's grace")
        last_beat = ops.latest(client, schema.HEARTBEAT_STREAM)
        say("  Exit Brain guarding; killing it with SIGKILL now")
        kill_ms = stack.kill_daemon("brain")
        seen = observe(stack, client, kill_ms)
        seen["last_heartbeat"] = schema.entry_id_ms(last_beat[0]) if last_beat else None
        timeline, criteria, passed = judge(seen, stack, client)
        result = {"passed": passed, "timeline": [{"step": s, "offset_ms": o, "what": w} for s, o, w in timeline],
                  "criteria": [{"criterion": c, "value_ms": v, "ok": ok} for c, v, ok in criteria],
                  "last_heartbeat_offset_ms": None if seen["last_heartbeat"] is None else seen["last_heartbeat"] - kill_ms,
                  "report": seen.get("report")}
        if not json_output:
            print_result(result)
        if not passed:
            for name in stack.processes:
                for line in stack.log_tail(name):
                    say(f"  [{name}] {line.rstrip()}")
    except KeyboardInterrupt:
        say("eexit demo: interrupted; stopping everything")
        result = {"passed": False, "error": "interrupted"}
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure as FAIL after cleaning up
        say(f"eexit demo: ERROR {type(exc).__name__}: {exc}")
        for name in stack.processes:
            for line in stack.log_tail(name):
                say(f"  [{name}] {line.rstrip()}")
        result = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)
    leftovers = stack.leftovers()
    result["leftover_processes"] = leftovers
    if leftovers:
        result["passed"] = False
    if keep_logs:
        result["logs"] = stack.workdir
    if json_output:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"stopped redis-server, paper exchange and daemons: "
              f"{'nothing left running' if not leftovers else 'STILL RUNNING: ' + ', '.join(leftovers)}")
        if keep_logs:
            print(f"logs kept in {stack.workdir}")
        print("PASS" if result["passed"] else "FAIL")
    return 0 if result["passed"] else 1


def print_result(result):
    print()
    print("timeline (ms after the kill)")
    if result.get("last_heartbeat_offset_ms") is not None:
        print(f"  {result['last_heartbeat_offset_ms']:>+7d} ms  last Exit Brain heartbeat")
    for row in result["timeline"]:
        offset = "    n/a" if row["offset_ms"] is None else f"{row['offset_ms']:>+7d}"
        print(f"  {offset} ms  {row['what']}")
    report = result.get("report")
    if report:
        print(f"  report: {report['status']} {report['positions_closed']}/{report['positions_total']} positions closed, "
              f"{report['orders_cancelled']} orders cancelled, EEW execution {report['execution_time_ms']} ms")
    print()
    print("criteria")
    for row in result["criteria"]:
        value = "" if row["value_ms"] is None else f"{row['value_ms'] / 1000:7.3f} s"
        print(f"  {'PASS' if row['ok'] else 'FAIL'}  {row['criterion']:<46} {value}")
    print()

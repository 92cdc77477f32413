"""The Exit Brain: guards open positions with the operator's exit rules and says so honestly.

    python -m eexit.brain

Each cycle (EEXIT_BRAIN_INTERVAL_S, default 1 s):
  1. read every position through ccxt (eexit.exchange.read_positions; raises on any failure,
     an exchange error is never an empty account),
  2. apply the pure exit rules (`decide_exits`) per position: stop-loss %, take-profit %,
     trailing stop % (from the most favourable mark seen), maximum holding time,
  3. close a position that hits one with one reduce-only market order (hedge mode:
     positionSide), the order side opposite to the position (flatten.closing_side),
  4. optionally arm the exchange's dead-man switch (EEXIT_DEADMAN_S, below),
  5. publish a heartbeat on `exit_brain:heartbeat`: status, active_positions (the count just
     read), last_decision_ts (end of the last completed evaluation), latency_ms, ts,
  6. send WATCHDOG=1 to systemd, but ONLY after a cycle that completed healthy and whose
     heartbeat reached Redis: never from a timer thread, never from an exception handler
     (SPEC §4.6). A brain that cannot guard is restarted by systemd and panicked by the watchdog.

DEGRADED. A cycle that failed (exchange error or timeout, a close order rejected, a position
without a mark price, a dead-man arm failed) or ran longer than EEXIT_BRAIN_LATENCY_BUDGET_MS
makes the heartbeat DEGRADED. The exchange calls run in a worker thread while the main thread
keeps time: once a cycle is over budget it publishes a DEGRADED heartbeat every
EEXIT_BRAIN_DEGRADED_BEAT_S (0.5 s) until the cycle ends, so a hung exchange shows up as
DEGRADED (watchdog rule 2), not as silence. While degraded, the next cycle starts after 0.5 s.
When the count of positions is unknown (read failed or still running) the heartbeat omits
active_positions, which the watchdog reads as "positions open" (fail-closed). Each exchange
request is bounded by EEXIT_EXCHANGE_TIMEOUT_MS, so a cycle ends; a second cycle never starts
while the previous one still runs (the ccxt client is not shared between threads).

Halt. `system:state:trading` halted=true (written by the EEW) forbids OPENING exposure. The Exit
Brain never opens anything: every order it sends is reduce-only. So it keeps enforcing its exits
while halted (closing is what a halt wants), and reports the flag in its heartbeat (`halted`).

Dead-man switch (EEXIT_DEADMAN_S, default 0 = off). When set, every cycle re-arms the venue's
switch (docs/VENUES.md; refused at start where the venue has none) for each symbol with open
orders, with countdown EEXIT_DEADMAN_S. If the brain stops re-arming (dead, hung, cut off),
the exchange itself cancels ALL open orders of those symbols (or of the whole account, where
the switch is account-wide), which protects against resting entry orders re-opening
exposure while nobody guards. The trade-off: it also cancels protective stop-loss/take-profit orders placed by the
bot, so after a brain outage longer than the countdown the positions sit on the exchange with
no resting protection until the watchdog's panic closes them. Use it when the watchdog + EEW
path is deployed (it is the backstop); keep it off if resting stops are your only protection.
It costs one extra request per cycle plus one per symbol with open orders.

Exit rules are global percentages applied to each position (0 = rule off). Holding time counts
from when a brain first saw the position (the exchange's position row carries no open time),
on the host's monotonic clock (CLOCK_MONOTONIC, shared by every process of one boot): a wall
clock step neither ends nor extends it.

Guard state survives a restart. What the rules remember per position (first seen, most
favourable mark) is written to the hash `exit_brain:guard`, field = EEXIT_BRAIN_SERVICE_ID,
whenever it changes, and read back at start: a brain restarted after a crash keeps its
trailing-stop high-water marks and holding clocks instead of starting from the current price.
After a reboot (another boot id) the holding clocks restart (the monotonic clock did); the
marks are kept. The brain's Redis user may write only that key (systemd/redis-acl.conf). A
state that cannot be written or read is logged (ERROR) and guarding goes on: only a later
restart would lose the marks.

Process identity and clean stop. Every heartbeat carries `instance` (eexit.heartbeat.INSTANCE,
new at every process start). On SIGTERM the brain ends its cycle and sends one last heartbeat
with status STOPPED; a crash sends none, so the watchdog sees the next instance as a restart
after a crash (EXIT_BRAIN_RESTARTED) when positions were open.
"""

import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for_future
from dataclasses import dataclass
from pathlib import Path

from . import bus, daemon, flatten, schema
from .config import ConfigError, nested, setting, settings
from .heartbeat import Heartbeat, wall_ms
from .log import Logger
from .notify import Notifier

GUARD_STATE_KEY = "exit_brain:guard"     # hash: service_id -> JSON of the tracked positions

# ---------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class ExitRules:
    # close when the loss reaches this % of entry (0 = off); when the gain reaches this %;
    # when the mark retreats this % from its best; after this long (since first seen)
    stop_loss_pct: float = setting("EEXIT_STOP_LOSS_PCT", 0.0, 0, 100)
    take_profit_pct: float = setting("EEXIT_TAKE_PROFIT_PCT", 0.0, 0, 10000)
    trailing_stop_pct: float = setting("EEXIT_TRAILING_STOP_PCT", 0.0, 0, 100)
    max_holding_s: float = setting("EEXIT_MAX_HOLDING_S", 0.0, 0, 366 * 86400)

    @property
    def enabled(self):
        return any((self.stop_loss_pct, self.take_profit_pct, self.trailing_stop_pct, self.max_holding_s))


@dataclass(frozen=True)
class Tracked:
    first_seen_ms: int               # monotonic ms (the host's CLOCK_MONOTONIC)
    best_mark: float | None = None   # most favourable mark seen: highest (long), lowest (short)


def encode_tracked(tracked, boot_id):
    return json.dumps({"boot": boot_id, "tracked": {key: [t.first_seen_ms, t.best_mark]
                                                    for key, t in sorted(tracked.items())}}, sort_keys=True)


def decode_tracked(text, boot_id, now_ms):
    """Tracked positions from encode_tracked's JSON. Another boot: the monotonic clock restarted,
    so holding clocks restart at now_ms; the marks stay. ValueError on anything unreadable."""
    data = json.loads(text)
    same_boot = data["boot"] == boot_id
    tracked = {}
    for key, (first_seen_ms, best_mark) in data["tracked"].items():
        first_seen = int(first_seen_ms) if same_boot and int(first_seen_ms) <= now_ms else now_ms
        tracked[str(key)] = Tracked(first_seen, None if best_mark is None else float(best_mark))
    return tracked


@dataclass(frozen=True)
class Exit:
    position: object                 # exchange.Position
    rule: str                        # stop_loss | take_profit | trailing_stop | max_holding
    detail: str


def position_key(position):
    return f"{position.symbol}|{position.position_side}|{position.side}"


def decide_exits(positions, tracked, rules, now_ms):
    """-> (exits, tracked for the positions still open, keys of positions without a usable
    price). Thresholds hit at equality: a stop at exactly -2 % closes."""
    exits, new_tracked, unpriced = [], {}, []
    for position in positions:
        key = position_key(position)
        track = tracked.get(key) or Tracked(first_seen_ms=now_ms)
        mark, entry = position.mark_price, position.entry_price
        priced = mark is not None and mark > 0 and entry is not None and entry > 0
        if priced:
            best = track.best_mark if track.best_mark is not None else mark
            track = Tracked(track.first_seen_ms, max(best, mark) if position.side == "long" else min(best, mark))
        else:
            unpriced.append(key)
        new_tracked[key] = track
        rule = _first_rule_hit(position, track, rules, now_ms, priced)
        if rule is not None:
            exits.append(Exit(position, *rule))
    return exits, new_tracked, unpriced


def _first_rule_hit(position, track, rules, now_ms, priced):
    if priced:
        direction = 1.0 if position.side == "long" else -1.0
        pnl_pct = (position.mark_price - position.entry_price) / position.entry_price * 100.0 * direction
        if rules.stop_loss_pct and pnl_pct <= -rules.stop_loss_pct:
            return "stop_loss", f"pnl={pnl_pct:.4f}%"
        if rules.take_profit_pct and pnl_pct >= rules.take_profit_pct:
            return "take_profit", f"pnl={pnl_pct:.4f}%"
        if rules.trailing_stop_pct:
            retreat_pct = (track.best_mark - position.mark_price) / track.best_mark * 100.0 * direction
            if retreat_pct >= rules.trailing_stop_pct:
                return "trailing_stop", f"retreat={retreat_pct:.4f}% best={track.best_mark}"
    held_s = (now_ms - track.first_seen_ms) / 1000.0
    if rules.max_holding_s and held_s >= rules.max_holding_s:
        return "max_holding", f"held={held_s:.3f}s"
    return None


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Config:
    service_id: str = setting("EEXIT_BRAIN_SERVICE_ID", "exit_brain")
    interval_s: float = setting("EEXIT_BRAIN_INTERVAL_S", 1.0, 0.05, 60)
    latency_budget_ms: float = setting("EEXIT_BRAIN_LATENCY_BUDGET_MS", 1000.0, 10, 60000)
    degraded_beat_s: float = setting("EEXIT_BRAIN_DEGRADED_BEAT_S", 0.5, 0.05, 5)
    rules: ExitRules = nested(ExitRules)
    deadman_s: float = setting("EEXIT_DEADMAN_S", 0.0, 0, 3600)
    from_env = classmethod(settings)


# ---------------------------------------------------------------------------- shell

class Brain:
    def __init__(self, cfg, exchange_module, ex, client, notifier=None, log=None):
        self.cfg = cfg
        self.exchange = exchange_module     # eexit.exchange, imported late (ccxt is heavy)
        self.ex = ex
        self.client = client
        self.notifier = notifier or Notifier(env={})
        self.log = log or Logger("brain")
        self.beat = Heartbeat(client, cfg.service_id)
        self.trouble = daemon.RedisTrouble(self.log)
        self.tracked = {}                   # only touched by the cycle thread (and run() before it starts)
        self.saved_tracked = {}
        self.last_positions = None          # the last count read, for the STOPPED beat
        self.last_decision_ts = None
        self.halted = "unknown"
        self.stop_requested = threading.Event()
        # One long-lived cycle thread: a new thread per second is wasted work on a small VPS.
        self.cycle_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brain-cycle")

    # -- one cycle, in the worker thread ---------------------------------------------------

    def cycle(self):
        """(positions read, decided_at_ms, problems: why this completed cycle is DEGRADED)."""
        positions = self.exchange.read_positions(self.ex)
        exits, self.tracked, unpriced = decide_exits(positions, self.tracked, self.cfg.rules, monotonic_ms())
        self._save_guard_state()
        decided_at_ms = wall_ms()
        problems = [f"no_price:{','.join(unpriced)}"] if unpriced else []
        for exit_ in exits:
            problems += self._tried(f"exit_failed:{exit_.position.symbol}", self._close, exit_,
                                    symbol=exit_.position.symbol, rule=exit_.rule)
        if self.cfg.deadman_s > 0:
            problems += self._tried("deadman_failed", self._arm_deadman)
        return len(positions), decided_at_ms, problems

    def _tried(self, problem, action, *args, **fields):
        """[] once action(*args) returned; [problem] if it raised (logged, the event named by
        the problem's part before the colon), which makes this cycle DEGRADED."""
        try:
            action(*args)
            return []
        except Exception as exc:  # noqa: BLE001 - one close, or reading orders / arming the switch
            # The other exits still go out and the cycle ends; the next one re-reads the account
            # and tries again (an exit rule still holds if the position is still there; a switch
            # not armed may fire or may never fire, so it is re-armed each cycle).
            kind = self.exchange.classify_error(exc, self.ex).kind
            self.log.error(problem.partition(":")[0], **fields, kind=kind, error=type(exc).__name__,
                           detail=str(exc)[:200])
            return [problem]

    def _save_guard_state(self):
        if self.tracked == self.saved_tracked:
            return
        try:
            self.client.hset(GUARD_STATE_KEY, self.cfg.service_id, encode_tracked(self.tracked, boot_id()))
            self.saved_tracked = self.tracked
        except bus.REDIS_ERRORS as exc:
            # Guarding goes on with the state in memory; only a restart before the next
            # successful write would start these positions' marks afresh. Retried next cycle.
            self.log.error("guard_state_unsaved", error=type(exc).__name__, detail=str(exc)[:200])

    def load_guard_state(self):
        """The tracked positions a previous process of this brain left in Redis."""
        try:
            text = self.client.hget(GUARD_STATE_KEY, self.cfg.service_id)
            self.tracked = {} if text is None else decode_tracked(bus.as_text(text), boot_id(), monotonic_ms())
        except (*bus.REDIS_ERRORS, ValueError, KeyError, TypeError) as exc:
            # Unreadable: start from zero, as before this state existed, and say so.
            self.log.error("guard_state_unreadable", error=type(exc).__name__, detail=str(exc)[:200])
            self.tracked = {}
        self.saved_tracked = self.tracked
        self.log.info("guard_state_loaded", positions=len(self.tracked))

    def _close(self, exit_):
        """Send the close of one exit; raises what the exchange raised."""
        position = exit_.position
        client_order_id = "eexitbrain" + uuid.uuid4().hex[:22]   # 32 letters/digits: every venue
        self.log.info("exit_rule_hit", symbol=position.symbol, side=position.side, rule=exit_.rule,
                      detail=exit_.detail, contracts=position.contracts, client_order_id=client_order_id)
        order = self.exchange.place_close_order(self.ex, position.symbol, flatten.closing_side(position),
                                                position.contracts, position.position_side,
                                                client_order_id, position.margin_mode)
        self.log.info("exit_sent", symbol=position.symbol, rule=exit_.rule, order_id=order["id"],
                      status=order["status"], filled=order["filled"])

    def _arm_deadman(self):
        """Re-arm the switch for every symbol with open orders; raises what the exchange raised."""
        for symbol in sorted({order.symbol for order in self.exchange.read_open_orders(self.ex)}):
            self.exchange.arm_deadman(self.ex, symbol, int(self.cfg.deadman_s * 1000))

    # -- the main thread: timing, heartbeats, pings ----------------------------------------

    def _run_cycle_in_worker(self, started):
        """Runs cycle() on the cycle thread; while it overruns its budget, publishes a DEGRADED
        heartbeat every degraded_beat_s. Returns (result or None, error or None)."""
        future = self.cycle_thread.submit(self.cycle)
        wait_s = max(0.0, started + self.cfg.latency_budget_ms / 1000.0 - time.monotonic())
        # wait(), not result(timeout): a TimeoutError raised INSIDE cycle() is the built-in
        # one that result() also raises on a timeout; mistaking it for an overrun spun here.
        while not wait_for_future([future], timeout=wait_s).done:
            # Over budget and still running (a hung exchange): DEGRADED, count unknown.
            self._publish("DEGRADED", None, (time.monotonic() - started) * 1000, reason="cycle_overrun")
            wait_s = self.cfg.degraded_beat_s
        try:
            return future.result(), None
        except Exception as exc:  # noqa: BLE001 - cycle()'s own failure, handled by the caller
            return None, exc

    def _publish(self, status, positions, latency_ms, reason=""):
        extra = {"halted": self.halted}
        if reason:
            extra["degraded_reason"] = reason[:200]
        try:
            self.beat.publish(status, positions, self.last_decision_ts, latency_ms, extra)
            return True
        except bus.REDIS_ERRORS as exc:
            # The watchdog will see silence and act (fail-closed); we keep guarding positions,
            # and withhold WATCHDOG=1 for this cycle, saying why in STATUS=. A command error
            # (NOPERM, WRONGTYPE) is logged once as redis_command_error, not reconnected.
            kind = self.trouble.report(exc, "XADD", schema.HEARTBEAT_STREAM)
            self.notifier.status(f"heartbeat not published ({kind} error: {daemon.cause(exc)})")
            return False

    def _read_halt(self):
        """"true" | "false" | "unset" | "unknown", for the heartbeat and the log only."""
        try:
            raw = self.client.hgetall(schema.TRADING_STATE_KEY)
        except bus.REDIS_ERRORS as exc:
            # Unknown halt state changes nothing for a brain that only reduces exposure.
            self.log.warning("halt_state_unreadable", error=type(exc).__name__)
            return "unknown"
        if not raw:
            return "unset"
        state, _problems = schema.TradingState.from_fields(raw)
        return {True: "true", False: "false"}.get(state.halted, "unknown")

    def run_once(self):
        """One cycle end to end; returns True when it was healthy (and pinged)."""
        started = time.monotonic()
        halted = self._read_halt()
        if halted != self.halted:
            self.log.info("halt_state", halted=halted, note="exits stay allowed; the brain never opens")
            self.halted = halted
        result, error = self._run_cycle_in_worker(started)
        latency_ms = (time.monotonic() - started) * 1000
        if error is not None:
            kind = self.exchange.classify_error(error, self.ex).kind
            self.log.error("cycle_failed", error=type(error).__name__, kind=kind, detail=str(error)[:300],
                           latency_ms=round(latency_ms, 1))
            self._publish("DEGRADED", None, latency_ms, reason=f"cycle_failed:{type(error).__name__}")
            return False
        self.last_positions, self.last_decision_ts, problems = result
        if latency_ms > self.cfg.latency_budget_ms:
            problems.append("over_latency_budget")
        status = "DEGRADED" if problems else "OK"
        published = self._publish(status, self.last_positions, latency_ms, reason=",".join(problems))
        if status == "OK" and published:
            self.notifier.ping()
            return True
        self.log.warning("cycle_degraded", problems=",".join(problems) or "heartbeat_failed",
                         positions=self.last_positions, latency_ms=round(latency_ms, 1))
        return False

    def run(self):
        self.notifier.ready("guarding")
        self.log.info("started", interval_s=self.cfg.interval_s, rules=self.cfg.rules,
                      deadman_s=self.cfg.deadman_s, latency_budget_ms=self.cfg.latency_budget_ms)
        if not self.cfg.rules.enabled:
            self.log.warning("no_exit_rules", note="the brain heartbeats and counts positions but closes nothing")
        self.load_guard_state()
        while not self.stop_requested.is_set():
            started = time.monotonic()
            # Healthy: the next cycle on the interval's beat; degraded: degraded_beat_s from now.
            healthy = self.run_once()
            pause = started + self.cfg.interval_s - time.monotonic() if healthy else self.cfg.degraded_beat_s
            self.stop_requested.wait(max(0.0, pause))
        # A clean stop says so: the next instance is then a restart, not a crash. Not published
        # (logged by _publish): the next start counts as a crash, a needless flatten, never a missed one.
        self._publish("STOPPED", self.last_positions, 0.0)
        self.notifier.stopping()
        self.log.info("stopped")


def monotonic_ms():
    return int(time.monotonic() * 1000)


def boot_id():
    """This boot's id (Linux), so guard state written before a reboot is not read on the
    monotonic clock of the next one; "" where the kernel has none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


# Harmless preflight probes (daemon.preflight): XADD with id 0-0 always fails after the ACL check.
PROBES = (("XADD", schema.HEARTBEAT_STREAM, "0-0", "f", "v"), ("HGETALL", schema.TRADING_STATE_KEY),
          ("HGET", GUARD_STATE_KEY, "probe"), ("TIME",))


def main():
    log = Logger("brain")

    def start():
        from . import exchange   # ccxt: ~0.5 s; only the brain and the EEW pay for it
        cfg = Config.from_env()
        exchange_cfg = exchange.ExchangeConfig.from_env()
        venue, name = exchange.venue(exchange_cfg.exchange_id), exchange_cfg.exchange_id
        low, high = venue.DEADMAN_RANGE_S or (0, cfg.deadman_s)
        if cfg.deadman_s > 0 and (venue.DEADMAN is None or not low <= cfg.deadman_s <= high):
            # A switch that can never fire must not look armed: refuse rather than degrade.
            raise ConfigError(f"EEXIT_DEADMAN_S={cfg.deadman_s:g}: " + (
                f"{name} has no dead-man switch eexit can arm; set it to 0" if venue.DEADMAN is None
                else f"{name}'s dead-man switch takes {low}-{high} s"))
        notifier = Notifier()
        brain = Brain(cfg, exchange, exchange.build_exchange(exchange_cfg), bus.connect(), notifier, log)
        stop = brain.stop_requested
        daemon.on_stop_signal(stop.set)
        if daemon.wait_for_redis(brain.client, PROBES, log, stop.is_set, stop.wait, notifier):
            brain.run()
    return daemon.main(log, start)


if __name__ == "__main__":
    sys.exit(main())

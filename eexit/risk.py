"""The risk kernel: the account itself can pull the emergency exit.

    python -m eexit.risk

The seed's "Risk Kernel" producer of `system:panic_close`, a daemon of its own beside the three
core daemons (a bug here can never stop the EEW). Every EEXIT_RISK_INTERVAL_S it reads one
snapshot of the account through the venue seam (venues.risk_reads.read_risk_snapshot: equity E,
maintenance margin MM, positions with mark and liquidation prices, the account's margin mode,
the venue's own timestamp), then the venue's cash-flow ledger up to that snapshot, and feeds
both to the pure `step(state, rules, reading, now_ms, new_id) -> (state, commands)`. Never
ccxt's unified `total`, which means different things per venue. docs/RISK.md argues the rules
and defaults; docs/CONFIG.md lists the EEXIT_RISK_* settings.

Rules (each with a warn and a panic threshold, each "off"-able):
    drawdown     from the cash-flow-adjusted high-water mark     RISK_DRAWDOWN     10 % / 20 %
    daily_loss   from the highest point of the rolling 24 h      RISK_DAILY_LOSS    5 % / 10 %
    margin       u = MM / E (venues liquidate at 1.0)            RISK_MARGIN       0.3 / 0.5
    liquidation  nearest position's distance to its liq. price   RISK_LIQUIDATION  10 % / 5 %
    mode         margin mode differs from the pinned one         RISK_MODE_CHANGED (panic)
    blind        no valid snapshot for EEXIT_RISK_BLIND_S with   RISK_BLIND        (panic)
                 exposure (unknown exposure counts as exposure)
    venue flags  any flag the venue raises                       risk_warning only

Cash flows. Adjusted equity A = E - F, F = the sum of the ledger's transfers since the
baseline was set; the peak and the window hold A, so a deposit or withdrawal moves neither the
peak nor the loss, and an equity drop no ledger entry explains counts as loss. Percentages are
taken against the peak in today's money (peak + F). The ledger is read up to the snapshot's
venue timestamp only, so a transfer is counted exactly when the equity shows it.

One panic per breach. A breach latches its rule (event id, value, time) in the state BEFORE the
panic is published, so a crash in between re-publishes the same event id (the EEW de-duplicates).
A latched rule is silent until its value recovers past the warn threshold times
EEXIT_RISK_HYSTERESIS (the latch and the warning re-arm), or deepens by one more step (the gap
between its warn and panic thresholds): so a resume after a risk panic never re-fires at once on
the old peak, and a further loss is still caught. Several rules breaching in one read are one
panic (the first named in RULES order gives the reason; the others are in its context). While
trading is halted the kernel latches and warns but publishes nothing: the halt stands already,
one incident is one halt. Before a halt, a panic goes through the incident the watchdogs and the
crash hook share (Kernel.publish, bus.claim_and_publish): another producer's open incident is
joined under its event id, never doubled.

Baseline. The peak, the window and the latches live in Redis (eexit:risk:state, written by this
kernel alone) and survive restarts. Only `eexit risk rebase --operator NAME` moves the baseline
(a request signed with the `risk_rebase` key on eexit:risk:rebase_request; verified here with
the credential risk_rebase_key, apart from the signing key in panic_hmac_keys;
refused and recorded when forged or stale). Every baseline change, rebase verdict, warning and
panic is an entry on eexit:risk:events (never trimmed; the alert notifier sends its warnings as
kind `risk_warning`). A state key gone while eexit:risk:events shows history is not re-based
silently: the heartbeat says DEGRADED reason=baseline_lost until an operator re-bases.

Heartbeat eexit:risk:heartbeat every read: OK, or DEGRADED with reason (blind, baseline_lost,
redis) and detail. Exit 2: configuration, or an enabled rule whose inputs the venue does not
provide (named, with the setting that switches it off).
"""

import json
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from . import bus, daemon, hook, schema, signing
from .config import ConfigError, credential, env_bool, env_float, env_int, env_str
from .heartbeat import Heartbeat, wall_ms
from .log import Logger
from .notify import Notifier

ISSUER = "risk_kernel"
REBASE_ISSUER = "risk_rebase"
STATE_KEY = "eexit:risk:state"
EVENTS_STREAM = "eexit:risk:events"
HEARTBEAT_STREAM = "eexit:risk:heartbeat"
REBASE_STREAM = "eexit:risk:rebase_request"
REBASE_CORE = ("kid", "request_id", "operator", "issued_by", "ts")
REBASE_DOMAIN = b"eexit-risk-rebase-v1\n"
REBASE_MAX_AGE_MS = 60_000

RULES = ("drawdown", "daily_loss", "margin", "liquidation")
REASONS = {"drawdown": "RISK_DRAWDOWN", "daily_loss": "RISK_DAILY_LOSS", "margin": "RISK_MARGIN",
           "liquidation": "RISK_LIQUIDATION", "blind": "RISK_BLIND", "mode": "RISK_MODE_CHANGED"}
NEEDS = {"drawdown": {"equity", "cash_flows"}, "daily_loss": {"equity", "cash_flows"},
         "margin": {"equity", "maintenance_margin"}, "liquidation": {"liquidation_price"},
         "mode": {"margin_mode"}}
SWITCH = {**{rule: f"EEXIT_RISK_{rule.upper()}_WARN/_PANIC" for rule in RULES},
          "mode": "EEXIT_RISK_MARGIN_MODE"}
WINDOW_MS = 24 * 3600 * 1000
BUCKET_MS = 60_000           # window resolution: one max per minute (1,440 entries at most)
FLOW_OVERLAP_MS = 600_000    # re-read the ledger this far back: late entries, de-duplicated by id
FLOWS_KEPT = 1000
REBASES_KEPT = 100
USD_LIKE = ("USD", "USDT", "USDC")     # transfers valued 1:1 in a USD or USDT account


# ---------------------------------------------------------------------------- pure core

@dataclass(frozen=True)
class Threshold:
    warn: float | None
    panic: float | None
    lower_is_worse: bool = False    # liquidation distance: smaller is worse

    @property
    def on(self):
        return self.warn is not None or self.panic is not None

    def crossed(self, value, limit):
        if value is None or limit is None:
            return False
        return value <= limit if self.lower_is_worse else value >= limit

    def recovered(self, value, hysteresis):
        """Back past the warn (else panic) threshold by the hysteresis: warnings and latches re-arm."""
        ref = self.warn if self.warn is not None else self.panic
        if value is None:
            return True
        return value > ref / hysteresis if self.lower_is_worse else value < ref * hysteresis

    def deeper(self, value, latched):
        """A latched breach that worsened by one more step fires again (a stale peak does not)."""
        if value is None or self.panic is None:
            return False
        step = abs(self.panic - self.warn) if self.warn is not None else self.panic / 2
        return value <= latched - step if self.lower_is_worse else value >= latched + step


@dataclass(frozen=True)
class Rules:
    drawdown: Threshold = Threshold(0.10, 0.20)
    daily_loss: Threshold = Threshold(0.05, 0.10)
    margin: Threshold = Threshold(0.30, 0.50)
    liquidation: Threshold = Threshold(0.10, 0.05, lower_is_worse=True)
    margin_mode: str = "auto"       # "auto": pinned by the baseline; "off": rule off
    venue_flags: bool = True
    blind_s: float = 60.0
    stale_s: float = 30.0
    hysteresis: float = 0.8

    def enabled(self):
        on = [rule for rule in RULES if getattr(self, rule).on]
        return on + (["mode"] if self.margin_mode != "off" else [])


@dataclass(frozen=True)
class Baseline:
    peak_adj: float             # high-water mark of adjusted equity A = E - net_flows
    net_flows: float            # ledger transfers since this baseline was set (+ in, - out)
    margin_mode: str            # the mode the account had when the baseline was set
    set_by: str                 # "kernel" (first snapshot) or the operator of a rebase
    set_at_ms: int
    why: str                    # first_snapshot | rebase


@dataclass(frozen=True)
class RiskState:
    baseline: Baseline | None = None
    window: tuple = ()          # ((bucket, last_ts_ms, max A), ...) oldest first, last 24 h
    latches: dict = field(default_factory=dict)     # rule -> {event_id, value, at_ms, published}
    warned: tuple = ()          # rules (and "flags") whose warning is out
    last_valid_ms: int | None = None
    blind_since_ms: int | None = None
    exposure: bool | None = None    # positions at the last valid snapshot; None: never seen
    last_equity: float | None = None
    last_mode: str = ""
    values: dict = field(default_factory=dict)      # rule -> value at the last valid snapshot
    figures: dict = field(default_factory=dict)     # equity, MM, peak, window max, flows ...
    problem: str = ""           # why the last read gave no valid snapshot
    flows_until_ms: int | None = None
    seen_flows: tuple = ()
    rebase_pending: str = ""    # operator whose accepted rebase applies at the next snapshot
    rebases_seen: tuple = ()


@dataclass(frozen=True)
class Reading:
    """One read: the snapshot (None when unreadable: `error` says why), the ledger up to
    flows_until_ms, and whether trading is halted."""
    snapshot: object = None
    flows: tuple = ()
    flows_until_ms: int | None = None
    error: str = ""
    halted: bool = False


@dataclass(frozen=True)
class Panic:
    reason: str
    event_id: str
    context: dict


@dataclass(frozen=True)
class Notice:
    kind: str                   # risk_warning | risk_recovered | breach_while_halted | baseline
    rule: str
    context: dict


def snapshot_problem(reading, rules, now_ms):
    """Why this reading is no valid snapshot, or "" (fail-closed: unreadable, non-finite,
    E <= 0, or stale by the venue's own timestamp)."""
    snap = reading.snapshot
    if snap is None:
        return reading.error or "no snapshot"
    if snap.maintenance_margin is None and rules.margin.on and rules.margin_mode == "off":
        # No mode rule to name the cause: the margin rule cannot be judged, so we are blind.
        return f"maintenance_margin not provided in mode {snap.margin_mode}"
    for name in ("equity", "maintenance_margin"):
        value = getattr(snap, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            if value is None and name == "maintenance_margin":
                continue    # the mode changed to one without it: RISK_MODE_CHANGED names that
            return f"{name} not finite: {value!r}"
    if snap.equity <= 0:
        return f"equity {snap.equity} <= 0"
    # A negative maintenance margin never gets here: the venue seam refuses it (base.risk_snapshot).
    if snap.venue_ts_ms is not None and now_ms - snap.venue_ts_ms > rules.stale_s * 1000:
        return f"stale: venue time {(now_ms - snap.venue_ts_ms) / 1000:.1f}s behind"
    return ""


def liquidation_distance(positions):
    """(nearest distance to liquidation as a fraction of mark, positions with an unknown one).
    0, "" or absent liquidation (or mark) prices are unknown, never far away: the margin rule
    covers those positions (Config refuses the liquidation rule without it)."""
    nearest, unknown = None, 0
    for pos in positions:
        mark, liq = pos.mark_price, pos.liquidation_price
        if not mark or not liq or mark <= 0 or liq <= 0:
            unknown += 1
            continue
        distance = (mark - liq) / mark if pos.side == "long" else (liq - mark) / mark
        nearest = distance if nearest is None else min(nearest, distance)
    return nearest, unknown


def roll_window(window, now_ms, adjusted):
    kept = [entry for entry in window if entry[1] > now_ms - WINDOW_MS]
    bucket = now_ms // BUCKET_MS
    if kept and kept[-1][0] == bucket:
        kept[-1] = (bucket, now_ms, max(kept[-1][2], adjusted))
    else:
        kept.append((bucket, now_ms, adjusted))
    return tuple(kept)


def loss_fraction(high_adj, adjusted, net_flows):
    """Loss from high_adj to adjusted, against the high in today's money (high + flows)."""
    today = high_adj + net_flows
    loss = high_adj - adjusted
    if loss <= 0:
        return 0.0
    return 1.0 if today <= 0 else loss / today


def take_flows(state, flows, until_ms, currency):
    """Add the ledger entries not seen before to net_flows (de-duplicated by flow id). A flow in
    the snapshot's currency or a USD stablecoin counts 1:1; one in another coin cannot be
    valued here: it is skipped and named in a risk_warning (its equity change counts as PnL)."""
    seen = set(state.seen_flows)
    fresh = [flow for flow in flows if flow.flow_id not in seen]
    valued = [flow for flow in fresh if getattr(flow, "asset", "") in ("", currency) + USD_LIKE]
    baseline = state.baseline
    if baseline is not None and valued:
        baseline = replace(baseline, net_flows=baseline.net_flows + sum(flow.amount for flow in valued))
    ids = (state.seen_flows + tuple(flow.flow_id for flow in fresh))[-FLOWS_KEPT:]
    notes = [Notice("risk_warning", "cash_flows", {"unvalued": [f"{flow.flow_id}:{flow.amount}:{flow.asset}"]})
             for flow in fresh if flow not in valued and baseline is not None]
    return replace(state, baseline=baseline, seen_flows=ids,
                   flows_until_ms=until_ms if until_ms is not None else state.flows_until_ms), notes


def apply_baseline(state, snap, now_ms):
    """A baseline where none is (first snapshot) or an accepted rebase waits; its Notice."""
    if state.baseline is not None and not state.rebase_pending:
        return state, []
    by = state.rebase_pending or "kernel"
    baseline = Baseline(peak_adj=snap.equity, net_flows=0.0, margin_mode=snap.margin_mode, set_by=by,
                        set_at_ms=now_ms, why="rebase" if state.rebase_pending else "first_snapshot")
    latches = {rule: latch for rule, latch in state.latches.items() if rule not in ("drawdown", "daily_loss", "mode")}
    state = replace(state, baseline=baseline, window=(), latches=latches, rebase_pending="",
                    warned=tuple(r for r in state.warned if r not in ("drawdown", "daily_loss")))
    return state, [Notice("baseline", "baseline", {**asdict(baseline), "equity": snap.equity})]


def measure(state, snap):
    """Each rule's value and the figures behind them (the context of a panic)."""
    base = state.baseline
    adjusted = snap.equity - base.net_flows
    window_high = max(entry[2] for entry in state.window)
    nearest, unknown = liquidation_distance(snap.positions)
    values = {"drawdown": loss_fraction(base.peak_adj, adjusted, base.net_flows),
              "daily_loss": loss_fraction(window_high, adjusted, base.net_flows),
              "margin": None if snap.maintenance_margin is None else snap.maintenance_margin / snap.equity,
              "liquidation": nearest}
    figures = {"equity": snap.equity, "maintenance_margin": snap.maintenance_margin,
               "currency": snap.currency, "peak": base.peak_adj + base.net_flows,
               "window_high": window_high + base.net_flows, "net_flows": base.net_flows,
               "positions": len(snap.positions), "unknown_liquidation": unknown,
               "margin_mode": snap.margin_mode, "pinned_mode": base.margin_mode,
               "venue_ts_ms": snap.venue_ts_ms}
    return values, figures


def step(state, rules, reading, now_ms, new_id):
    """The kernel's decision for one read at `now_ms` (Redis's clock, epoch ms). new_id: the
    event id a panic published by this step takes. Returns (state, [Panic | Notice])."""
    problem = snapshot_problem(reading, rules, now_ms)
    if problem:
        return blind_step(state, rules, reading, problem, now_ms, new_id)
    snap = reading.snapshot
    # Flows first: before a baseline exists (or under a pending rebase) they are only marked
    # seen, since the snapshot's equity already holds them.
    state, flow_notes = take_flows(state, reading.flows, reading.flows_until_ms, snap.currency)
    state, notes = apply_baseline(state, snap, now_ms)
    notes = flow_notes + notes
    base = state.baseline
    adjusted = snap.equity - base.net_flows
    state = replace(state, baseline=replace(base, peak_adj=max(base.peak_adj, adjusted)),
                    window=roll_window(state.window, now_ms, adjusted))
    values, figures = measure(state, snap)
    state = replace(state, values=values, figures=figures, last_valid_ms=now_ms, blind_since_ms=None,
                    problem="", exposure=bool(snap.positions), last_equity=snap.equity,
                    last_mode=snap.margin_mode, latches={k: v for k, v in state.latches.items() if k != "blind"})
    breaches, commands = [], list(notes)
    for rule in RULES:
        threshold = getattr(rules, rule)
        if not threshold.on:
            continue
        state, fire, notes = judge(state, rules, rule, values[rule], threshold, figures)
        commands.extend(notes)
        if fire:
            breaches.append(rule)
    pinned = base.margin_mode if rules.margin_mode == "auto" else rules.margin_mode
    if rules.margin_mode != "off":
        if snap.margin_mode != pinned and "mode" not in state.latches:
            breaches.append("mode")
        elif snap.margin_mode == pinned and "mode" in state.latches:
            state = replace(state, latches={k: v for k, v in state.latches.items() if k != "mode"})
    state, flag_notes = judge_flags(state, rules, snap.venue_flags)
    commands.extend(flag_notes)
    if breaches:
        context = {"values": {rule: values.get(rule, snap.margin_mode) for rule in breaches},
                   "thresholds": {rule: thresholds_of(rules, rule, pinned) for rule in breaches},
                   **figures}
        state, fired = latch(state, breaches, context, reading.halted, now_ms, new_id)
        commands.extend(fired)
    return state, commands


def thresholds_of(rules, rule, pinned=""):
    if rule == "mode":
        return {"pinned": pinned}
    if rule == "blind":
        return {"blind_s": rules.blind_s}
    threshold = getattr(rules, rule)
    return {"warn": threshold.warn, "panic": threshold.panic}


def judge(state, rules, rule, value, threshold, figures):
    """(state, fire?, notices) for one rule: warnings once per crossing with hysteresis; a
    panic when the panic threshold is crossed and the rule is not latched (or got deeper)."""
    notes, warned, latches = [], set(state.warned), dict(state.latches)
    recovered = threshold.recovered(value, rules.hysteresis)
    context = {"value": value, "warn": threshold.warn, "panic": threshold.panic, **figures}
    if rule in warned and recovered:
        warned.discard(rule)
        notes.append(Notice("risk_recovered", rule, context))
    elif rule not in warned and threshold.crossed(value, threshold.warn):
        warned.add(rule)
        notes.append(Notice("risk_warning", rule, context))
    fire = False
    if rule in latches:
        if recovered:
            del latches[rule]
        elif threshold.deeper(value, latches[rule]["value"]):
            fire = True
    elif threshold.crossed(value, threshold.panic):
        fire = True
    return replace(state, warned=tuple(sorted(warned)), latches=latches), fire, notes


def judge_flags(state, rules, flags):
    """Venue risk flags: one risk_warning when a set of flags appears, re-armed when none."""
    if not rules.venue_flags:
        return state, []
    warned = set(state.warned)
    if flags and "flags" not in warned:
        return replace(state, warned=tuple(sorted(warned | {"flags"}))), [
            Notice("risk_warning", "venue_flags", {"flags": list(flags)})]
    if not flags and "flags" in warned:
        return replace(state, warned=tuple(sorted(warned - {"flags"}))), [Notice("risk_recovered", "venue_flags", {})]
    return state, []


def latch(state, breaches, context, halted, now_ms, new_id):
    """Latch every breached rule under ONE event id, then publish one panic (reason: the first
    breach) unless trading is halted already (the halt stands: one incident, one halt)."""
    event_id = "" if halted else new_id
    latches = dict(state.latches)
    for rule in breaches:
        value = context["values"].get(rule)
        latches[rule] = {"event_id": event_id, "value": value if isinstance(value, (int, float)) else None,
                         "at_ms": now_ms, "published": halted, "reason": REASONS[breaches[0]]}
    state = replace(state, latches=latches)
    context = {**context, "rules": breaches}
    if halted:
        return state, [Notice("breach_while_halted", breaches[0], context)]
    return state, [Panic(REASONS[breaches[0]], new_id, context)]


def blind_step(state, rules, reading, problem, now_ms, new_id):
    """No valid snapshot: after EEXIT_RISK_BLIND_S of that with exposure (or exposure never
    seen), RISK_BLIND. A flat account stays unpanicked; the heartbeat says DEGRADED."""
    since = state.blind_since_ms if state.blind_since_ms is not None else now_ms
    state = replace(state, problem=problem, blind_since_ms=since)
    exposed = state.exposure is not False
    if now_ms - since < rules.blind_s * 1000 or not exposed or "blind" in state.latches:
        return state, []
    context = {"values": {"blind": (now_ms - since) / 1000}, "thresholds": {"blind": thresholds_of(rules, "blind")},
               "problem": problem, "exposure": "unknown" if state.exposure is None else "positions",
               "last_valid_ms": state.last_valid_ms}
    return latch(state, ["blind"], context, reading.halted, now_ms, new_id)


def request_rebase(state, operator, request_id):
    """An accepted rebase: the baseline is set from the next valid snapshot."""
    return replace(state, rebase_pending=operator,
                   rebases_seen=(state.rebases_seen + (request_id,))[-REBASES_KEPT:])


def mark_published(state, rule_event_id):
    latches = {rule: {**item, "published": True} if item["event_id"] == rule_event_id else item
               for rule, item in state.latches.items()}
    return replace(state, latches=latches)


def unpublished(state):
    """{event_id: reason} of latched panics not yet published (a crash between latch and XADD)."""
    return {item["event_id"]: item.get("reason", "") for item in state.latches.values()
            if not item["published"] and item["event_id"]}


def to_json(state):
    return json.dumps(asdict(state), sort_keys=True, separators=(",", ":"))


def from_json(text):
    raw = json.loads(text)
    base = raw.pop("baseline", None)
    raw["window"] = tuple(tuple(entry) for entry in raw.get("window", ()))
    for name in ("warned", "seen_flows", "rebases_seen"):
        raw[name] = tuple(raw.get(name, ()))
    known = {name for name in RiskState.__dataclass_fields__}
    return RiskState(baseline=Baseline(**base) if base else None, **{k: v for k, v in raw.items() if k in known})


def describe_baseline(state):
    """One line for `eexit status` and `eexit resume`: which baseline applies."""
    base = state.baseline
    if base is None:
        return "none yet: the next valid snapshot sets it"
    latched = ",".join(sorted(state.latches)) or "none"
    pending = f"; rebase by {state.rebase_pending} pending" if state.rebase_pending else ""
    return (f"peak {base.peak_adj + base.net_flows:.2f} (net flows {base.net_flows:+.2f}) set by {base.set_by} "
            f"at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(base.set_at_ms / 1000))} ({base.why}); latched: {latched} (silent until recovered or one step "
            f"deeper){pending}")


# ---------------------------------------------------------------------------- config

def threshold(name, default, env, maximum=1.0):
    """A fraction in (0, maximum], or None for "off"."""
    raw = env_str(name, str(default), env)
    return None if raw.lower() == "off" else env_float(name, default, minimum=1e-6, maximum=maximum, env=env)


def pair(warn_name, warn, panic_name, panic, env, lower_is_worse=False):
    result = Threshold(threshold(warn_name, warn, env), threshold(panic_name, panic, env), lower_is_worse)
    if result.warn is not None and result.panic is not None and not result.crossed(result.panic, result.warn):
        raise ConfigError(f"{warn_name}={result.warn} must come before {panic_name}={result.panic} "
                          f"(a warning after the panic would never be seen)")
    return result


@dataclass(frozen=True)
class Config:
    rules: Rules
    interval_s: float
    redis_replicas: int
    redis_wait_ms: int

    @classmethod
    def from_env(cls, env=None):
        rules = Rules(
            drawdown=pair("EEXIT_RISK_DRAWDOWN_WARN", 0.10, "EEXIT_RISK_DRAWDOWN_PANIC", 0.20, env),
            daily_loss=pair("EEXIT_RISK_DAILY_LOSS_WARN", 0.05, "EEXIT_RISK_DAILY_LOSS_PANIC", 0.10, env),
            margin=pair("EEXIT_RISK_MARGIN_WARN", 0.30, "EEXIT_RISK_MARGIN_PANIC", 0.50, env),
            liquidation=pair("EEXIT_RISK_LIQUIDATION_WARN", 0.10, "EEXIT_RISK_LIQUIDATION_PANIC", 0.05, env,
                             lower_is_worse=True),
            margin_mode=env_str("EEXIT_RISK_MARGIN_MODE", "auto", env).lower(),
            venue_flags=env_bool("EEXIT_RISK_VENUE_FLAGS", True, env),
            blind_s=env_float("EEXIT_RISK_BLIND_S", 60.0, minimum=1.0, maximum=3600, env=env),
            stale_s=env_float("EEXIT_RISK_STALE_S", 30.0, minimum=1.0, maximum=3600, env=env),
            hysteresis=env_float("EEXIT_RISK_HYSTERESIS", 0.8, minimum=0.1, maximum=1.0, env=env))
        if rules.liquidation.on and not rules.margin.on:
            raise ConfigError("EEXIT_RISK_LIQUIDATION_* needs the margin rule (EEXIT_RISK_MARGIN_*): positions "
                              "with an unknown liquidation price are judged by it, never taken as safe")
        return cls(rules=rules,
                   interval_s=env_float("EEXIT_RISK_INTERVAL_S", 5.0, minimum=1.0, maximum=300, env=env),
                   redis_replicas=env_int("EEXIT_REDIS_REPLICAS", 0, minimum=0, maximum=16, env=env),
                   redis_wait_ms=env_int("EEXIT_REDIS_WAIT_MS", 500, minimum=1, maximum=10000, env=env))


def check_inputs(rules, provided, venue_id):
    """ConfigError naming the first enabled rule whose inputs the venue does not provide."""
    for rule in rules.enabled():
        missing = NEEDS[rule] - set(provided)
        if missing:
            raise ConfigError(f"risk rule {rule} needs {','.join(sorted(missing))}, which {venue_id} does not "
                              f"provide: switch it off ({SWITCH[rule]}=off) or use a venue that does")


REBASE_KEY_CREDENTIAL = "risk_rebase_key"


def load_rebase_keys(panic_keys, env=None):
    """The ring that verifies rebase requests: the credential risk_rebase_key (or the variable
    EEXIT_RISK_REBASE_KEY), `kid risk_rebase hexkey` lines only. Kept out of panic_hmac_keys, which
    holds the kernel's own signing key and nothing else (signing.check_own_keys). Signed panics
    without a rebase key would make every rebase unverifiable: refused at start (exit 2)."""
    text = credential(REBASE_KEY_CREDENTIAL, ("EEXIT_RISK_REBASE_KEY",), env)
    ring = signing.parse_keys(text, f"credential {REBASE_KEY_CREDENTIAL} / EEXIT_RISK_REBASE_KEY") if text \
        else signing.KeyRing()
    signing.check_own_keys(ring, REBASE_ISSUER, f"credential {REBASE_KEY_CREDENTIAL} / EEXIT_RISK_REBASE_KEY")
    if panic_keys.configured and not ring.configured:
        raise ConfigError(f"panic keys are configured but credential {REBASE_KEY_CREDENTIAL} / EEXIT_RISK_REBASE_KEY "
                          f"is not: no rebase could be verified (docs/RISK.md)")
    return ring


def verify_rebase(fields, keyring, state, now_ms):
    """"" if this rebase request may apply, else why it is refused."""
    if fields.get("issued_by") != REBASE_ISSUER:
        return "issued_by is not risk_rebase"
    ok, why = signing.verify_fields(fields, keyring, REBASE_CORE, REBASE_DOMAIN)
    if not ok:
        return f"signature: {why}"
    if not fields.get("operator") or not fields.get("request_id"):
        return "operator or request_id missing"
    if fields["request_id"] in state.rebases_seen:
        return "replayed request_id"
    try:
        age = now_ms - int(fields.get("ts", ""))
    except ValueError:
        return "ts unreadable"
    if abs(age) > REBASE_MAX_AGE_MS:
        return f"ts {age / 1000:.0f}s off the Redis clock (max {REBASE_MAX_AGE_MS // 1000}s)"
    return ""


def build_rebase(operator, keyring, now_ms):
    """Fields of a rebase request, signed with the risk_rebase key when keys are configured."""
    fields = {"request_id": str(uuid.uuid4()), "operator": operator, "issued_by": REBASE_ISSUER, "ts": str(now_ms)}
    if keyring.configured:
        kid = keyring.kid_for(REBASE_ISSUER)
        if kid is None:
            raise ConfigError(f"panic keys are configured but none for issuer {REBASE_ISSUER}: "
                              f"the risk kernel would refuse the rebase (docs/RISK.md)")
        fields = signing.sign_fields(fields, kid, keyring, REBASE_CORE, REBASE_DOMAIN)
    return fields


# ---------------------------------------------------------------------------- shell

class Kernel:
    def __init__(self, cfg, client, ex, keyring, rebase_keys, notifier, log, monotonic=time.monotonic):
        self.cfg, self.client, self.ex, self.keyring, self.rebase_keys = cfg, client, ex, keyring, rebase_keys
        self.notifier, self.log, self.monotonic = notifier, log, monotonic
        self.kid = keyring.kid_for(ISSUER) if keyring.configured else None
        self.beat = Heartbeat(client, ISSUER, HEARTBEAT_STREAM)
        self.state = RiskState()
        self.lost = ""
        self.mode_checked = False
        self.saved = False              # written eexit:risk:state at least once (this process)
        self.rebase_cursor = "$"
        self.stopping = False

    def load(self):
        """The state from Redis; none while eexit:risk:events has history is a lost baseline,
        said loudly (heartbeat DEGRADED) until an operator re-bases."""
        raw = self.client.get(STATE_KEY)
        if raw is not None:
            self.state = from_json(bus.as_text(raw))
        elif self.state.baseline is not None:
            self.state = self.restored(self.state)
        elif self.client.xlen(EVENTS_STREAM):
            self.lost = "state key eexit:risk:state missing while eexit:risk:events has history"
            self.log.critical("baseline_lost", detail=self.lost)
        newest = self.client.xrevrange(REBASE_STREAM, "+", "-", count=1)
        self.rebase_cursor = bus.as_text(newest[0][0]) if newest else "0-0"

    def read(self, now_ms):
        """One Reading: snapshot, then the ledger up to its venue time, then the halt."""
        from .venues import risk_reads   # noqa: PLC0415 - ccxt only in the daemon, not for status
        # Only an explicit halt mutes a panic: a missing or unreadable state publishes (fail-closed).
        halted = schema.TradingState.from_fields(bus.decoded(self.client.hgetall(schema.TRADING_STATE_KEY)))[0].halted
        try:
            snap = risk_reads.read_risk_snapshot(self.ex)
            flows, until = (), None
            if "cash_flows" in risk_reads.risk_inputs(self.ex):
                until = (snap.venue_ts_ms or now_ms) + 1
                # A pending rebase starts afresh from this snapshot: its equity holds every
                # earlier transfer (so a ledger gap, LedgerGapError, is healed by a rebase).
                start = until if self.state.rebase_pending else (self.state.flows_until_ms or until)
                flows = tuple(risk_reads.read_cash_flows(self.ex, start - FLOW_OVERLAP_MS, until))
        except Exception as exc:  # noqa: BLE001 - any failure is "no valid snapshot": the blind rule decides
            return Reading(error=f"{type(exc).__name__}: {str(exc)[:200]}", halted=halted is True)
        if not self.mode_checked:
            # The venue's inputs depend on the account mode: checked against the pinned mode
            # (else the one found) at the first snapshot; ConfigError is exit 2 naming the rule.
            mode = self.state.baseline.margin_mode if self.state.baseline else snap.margin_mode
            mode = mode if self.cfg.rules.margin_mode in ("auto", "off") else self.cfg.rules.margin_mode
            check_inputs(self.cfg.rules, risk_reads.risk_inputs(self.ex, mode), f"{self.ex.id} in mode {mode}")
            self.mode_checked = True
        return Reading(snap, flows, until, halted=halted is True)

    def cycle(self):
        now_ms = bus.server_time_ms(self.client)
        self.take_rebases(now_ms)
        reading = self.read(now_ms)
        state, commands = step(self.state, self.cfg.rules, reading, now_ms, str(uuid.uuid4()))
        if self.ledger_lagged(state, reading, commands):
            return      # decided again at the next read, whose snapshot and ledger agree
        if state.baseline is not None and state.baseline.why == "rebase":
            self.lost = ""
        self.save(state)
        for command in commands:
            self.perform(command)
        for event_id, reason in unpublished(self.state).items():
            self.publish(event_id, reason, {"republished": True})
        status, why = self.health()
        self.beat.publish(status, len(reading.snapshot.positions) if reading.snapshot else None, now_ms,
                          extra=why)
        self.notifier.status(f"{status} {why.get('reason', '')}".strip())

    def ledger_lagged(self, state, reading, commands):
        """A loss panic from a read whose equity may already hold a transfer the ledger had
        not yet shown up to the snapshot's venue time (both are separate requests): one more
        ledger read; a transfer found after that time defers the decision by one read."""
        from .venues import risk_reads   # noqa: PLC0415 - see read
        losses = [c for c in commands if isinstance(c, Panic) and {"drawdown", "daily_loss"} & set(c.context["rules"])]
        if not losses or reading.flows_until_ms is None:
            return False
        try:
            later = risk_reads.read_cash_flows(self.ex, reading.flows_until_ms, reading.flows_until_ms + FLOW_OVERLAP_MS)
        except Exception as exc:  # noqa: BLE001 - the read that fired was valid: fire (fail-closed)
            self.log.warning("ledger_recheck_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            return False
        fresh = [flow.flow_id for flow in later if flow.flow_id not in state.seen_flows]
        if fresh:
            self.log.warning("breach_deferred", why="transfer after the snapshot", flows=",".join(fresh[:5]))
        return bool(fresh)

    def health(self):
        for reason, detail in (("baseline_lost", self.lost), ("blind", self.state.problem)):
            if detail:
                return "DEGRADED", {"reason": reason, "detail": detail}
        return "OK", {}

    def save(self, state):
        self.state = state
        document = {**json.loads(to_json(state)), "rules": asdict(self.cfg.rules),
                    "interval_s": self.cfg.interval_s}
        previous = self.client.set(STATE_KEY, json.dumps(document, sort_keys=True, separators=(",", ":")), get=True)
        if previous is None and self.saved and state.baseline is not None:
            self.save(self.restored(state))     # the key vanished since our last write
        self.saved = True

    def restored(self, state):
        """Redis lost our state under us (flushed, or restarted without persistence): the state
        in memory is the truth and is written back; the panics it holds may have gone with the
        panic stream, so they are published again under their own event ids (the EEW
        de-duplicates what it still knows)."""
        latches = {rule: {**item, "published": not item["event_id"]} for rule, item in state.latches.items()}
        self.log.critical("state_restored_from_memory", latched=",".join(sorted(latches)) or "none")
        return replace(state, latches=latches)

    def event(self, kind, **fields):
        self.client.xadd(EVENTS_STREAM, {"kind": kind, "ts": str(wall_ms()),
                                         **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                            for k, v in fields.items()}})

    def perform(self, command):
        if isinstance(command, Panic):
            self.log.critical("rule_fired", reason=command.reason, event_id=command.event_id,
                              rules=",".join(command.context.get("rules", [])))
            self.publish(command.event_id, command.reason, command.context)
            return
        level = self.log.info if command.kind in ("risk_recovered", "baseline") else self.log.warning
        level(command.kind, rule=command.rule, value=command.context.get("value", "-"))
        self.event(command.kind, rule=command.rule, context=command.context)

    def publish(self, event_id, reason, context):
        """Through the incident the watchdogs and the crash hook share (eexit:watchdog:incident,
        bus.claim_and_publish: the claim and the panic in one step). Won: our panic opens it.
        Lost to an open incident X (another producer fired first, even in the same instant):
        our panic goes out under X's event id, which the EEW executes once (the copy is
        DUPLICATE; it runs if X's own panic was lost): one incident, one halt. X finished and a
        human resumed since (no watchdog closed it): our own event, unclaimed. The hook's claim
        (hook.claim, hook.after_lost_claim) decides, so both producers read a held incident alike."""
        fields = signing.signed_panic(event_id, reason, ISSUER, wall_ms(), context, self.keyring)
        notes = {}      # what could not be read: the claim then joins or publishes (fail-closed)
        _how, incident, written = hook.claim(self.client, event_id, fields,
                                             {"reason": reason, "opened_by": ISSUER, "issued_by": ISSUER},
                                             hook.read_state(self.client, notes), notes)
        if incident != event_id:
            fields = signing.signed_panic(incident, reason, ISSUER, wall_ms(), context, self.keyring)
        published = bus.publish_durable(self.client, schema.PANIC_STREAM, fields, self.cfg.redis_replicas,
                                        self.cfg.redis_wait_ms, give_up_after_s=2.0, entry_id=written)
        self.save(mark_published(self.state, event_id))
        self.event("panic", event_id=incident, reason=reason, entry_id=published.entry_id)
        self.log.critical("panic_published", event_id=incident, reason=reason, entry_id=published.entry_id,
                          confirmed=published.confirmed, signed=self.kid is not None, rule_event=event_id,
                          **notes)

    def take_rebases(self, now_ms):
        reply = self.client.xread({REBASE_STREAM: self.rebase_cursor}, count=10)
        for _stream, entries in reply or []:
            for entry_id, raw in entries:
                self.rebase_cursor = bus.as_text(entry_id)
                fields = bus.decoded(raw)
                refused = verify_rebase(fields, self.rebase_keys, self.state, now_ms)
                operator, request_id = fields.get("operator", "?")[:64], fields.get("request_id", "?")[:64]
                if refused:
                    self.log.critical("rebase_refused", request_id=request_id, operator=operator, why=refused)
                    self.event("rebase", status="refused", request_id=request_id, operator=operator, why=refused)
                    continue
                self.save(request_rebase(self.state, operator, request_id))
                self.log.warning("rebase_accepted", request_id=request_id, operator=operator)
                self.event("rebase", status="accepted", request_id=request_id, operator=operator,
                           before=describe_baseline(self.state))

    def run(self):
        backoff = daemon.Backoff(0.1, 2.0)
        loaded = False
        self.notifier.ready("reading")
        self.log.info("started", rules=asdict(self.cfg.rules), interval_s=self.cfg.interval_s,
                      signed=self.kid is not None)
        while not self.stopping:
            started = self.monotonic()
            try:
                if not loaded:
                    self.load()
                    loaded = True
                self.cycle()
                backoff.reset()
                self.notifier.ping()
                wait = self.cfg.interval_s - (self.monotonic() - started)
            except bus.REDIS_ERRORS as exc:
                # Without Redis the kernel can neither publish nor keep its baseline: retry with
                # backoff and reload; the pings stop, so systemd restarts a kernel that stays blind.
                loaded, wait = False, backoff.next()
                self.log.critical("redis_unreachable" if bus.is_transport_error(exc) else "blind",
                                  cause=daemon.cause(exc), retry_in_s=wait)
            self.sleep(wait)
        self.notifier.stopping()
        self.log.info("stopped")

    def sleep(self, seconds):
        deadline = self.monotonic() + seconds
        while not self.stopping and self.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - self.monotonic())))


PROBES = (("XADD", schema.PANIC_STREAM, "0-0", "f", "v"), ("XADD", EVENTS_STREAM, "0-0", "f", "v"),
          ("EVALSHA", "0" * 40, "2", schema.INCIDENT_KEY, schema.PANIC_STREAM),
          ("SCRIPT", "LOAD", "return 1"),
          ("HGET", schema.INCIDENT_KEY, "event_id"), ("HGET", schema.PROCESSED_KEY, "x"),
          ("XADD", HEARTBEAT_STREAM, "0-0", "f", "v"), ("GET", STATE_KEY), ("XLEN", EVENTS_STREAM),
          ("XREVRANGE", REBASE_STREAM, "+", "-", "COUNT", "1"), ("HGETALL", schema.TRADING_STATE_KEY), ("TIME",))


def main():
    log = Logger("risk")

    def start():
        from . import exchange   # noqa: PLC0415 - see Kernel.read
        from .venues.risk_reads import MARGIN_MODES, risk_inputs   # noqa: PLC0415 - imports ccxt, as exchange
        cfg = Config.from_env()
        if cfg.rules.margin_mode not in MARGIN_MODES | {"auto", "off"}:
            raise ConfigError(f"EEXIT_RISK_MARGIN_MODE={cfg.rules.margin_mode!r} is none of auto, off, "
                              f"{', '.join(sorted(MARGIN_MODES))}")
        keyring = signing.load_keys()
        signing.check_own_keys(keyring, ISSUER, signing.key_source())
        rebase_keys = load_rebase_keys(keyring)
        ex_cfg = exchange.ExchangeConfig.from_env()
        check_inputs(cfg.rules, risk_inputs(ex_cfg.exchange_id), ex_cfg.exchange_id)
        ex = exchange.build_exchange(ex_cfg)
        client = bus.connect()
        notifier = Notifier()
        daemon.check_exchange_timeout(ex_cfg.timeout_ms, notifier)
        kernel = Kernel(cfg, client, ex, keyring, rebase_keys, notifier, log)
        daemon.on_stop_signal(lambda: setattr(kernel, "stopping", True))
        if daemon.wait_for_redis(client, PROBES, log, lambda: kernel.stopping, time.sleep, notifier):
            kernel.run()
    return daemon.main(log, start)


if __name__ == "__main__":
    sys.exit(main())

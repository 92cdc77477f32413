"""The watchdog: reads the Exit Brain's heartbeats and publishes exactly one panic per incident.

    python -m eexit.watchdog

Rules (SPEC §3), evaluated by the pure `evaluate(state, now, limits)`:

    1 no heartbeat for > EEXIT_HEARTBEAT_LOST_S (5)                   EXIT_BRAIN_HEARTBEAT_LOST
    2 status DEGRADED continuously for > EEXIT_DEGRADED_S (5)         EXIT_BRAIN_DEGRADED_TOO_LONG
    3 positions open and last decision older than EEXIT_STAGNANT_S    EXIT_BRAIN_DECISION_STAGNANT
    4 positions open and no heartbeat for > EEXIT_UNGUARDED_S (3)     POSITIONS_UNGUARDED

Rule 4 is checked first, then 1, 2, 3: when several hold, the most specific reason is named.
"> threshold" is strict: exactly at the threshold nothing fires.

Clocks (SPEC §4.7). A heartbeat's age is measured on THIS process's monotonic clock from the
moment the blocking XREAD returned it (loopback delivery is < 1 ms). Entries that were already
in the stream when the watchdog (re)connected, or arrived while it waited for a deadline, are
backdated by their age on the Redis server's clock (TIME minus the entry id's milliseconds:
one clock, Redis's, on both sides).

Timing. The loop blocks in XREAD (EEXIT_WATCHDOG_POLL_MS) while the next rule deadline
(`next_deadline`) is further away than 0.25 s; nearer than that it sleeps on its monotonic
clock until 1 ms past the deadline and reads without blocking, because Redis rounds a BLOCK
timeout up to its hz tick (100 ms at hz 10). Detection therefore overshoots a threshold by
a few ms (bench/detection.py), independent of Redis's hz. The
producer's `ts` is never compared with any clock of ours, and no age is read from the wall
clock: `time.time` is used only to stamp outgoing messages. Rule 3 compares the heartbeat's
`last_decision_ts` with the same heartbeat's `ts` (both the producer's clock), plus the time
since receipt on our monotonic clock.

Fail-closed readings of a heartbeat: active_positions missing or unreadable counts as
positions open; a status other than OK counts as DEGRADED; an unknown decision age (missing
ts or last_decision_ts) with positions open counts as stagnant once it has been unknown for
longer than the stagnant threshold.

Start-up grace (EEXIT_STARTUP_GRACE_S, default = EEXIT_HEARTBEAT_LOST_S): after start, no
rule fires until either the grace has passed or a heartbeat sent after that moment has
arrived (the brain is evidently up; rules apply from then on). So a brain starting together
with the watchdog is not a false incident. After the grace the ages are real: a stale beat
found in the stream fires at once, and no heartbeat at all fires EXIT_BRAIN_HEARTBEAT_LOST.
The grace delays detection of a brain that died just before the watchdog started by at most
the grace; set it lower to trade that for false alarms at boot. The grace applies once per
process start: a resync after Redis did not answer is not a start (`after_outage`). There,
the time Redis did not answer is not counted as the brain's silence (nobody could beat), and
beats found in the stream keep their real ages; so a brain killed during a Redis stall is
detected within its threshold (3 s unguarded) of Redis answering again. "Did not answer" is
what the watchdog saw: from its last successful evaluation to its last failed call, or to the
end of a call Redis held (a stalled Redis answers it only when the stall ends).

Incidents. The first trigger opens an incident: a new event_id is written to the hash
`eexit:watchdog:incident` BEFORE the panic is published, so a crash in between re-publishes
the same id after restart. While the incident is open no new event_id is created. Until the
OWNER of the event_id reports FLAT, RESIDUAL or FAILED on `system:panic_close:completed`
(`report_outcome`; the EEW writes those only for the entry that owns the event_id) the SAME
event is re-published after EEXIT_REPUBLISH_S, then with doubling delays up to 30 s (the EEW
de-duplicates by event_id; re-publishing covers a panic entry lost with a Redis restart). A
REJECTED report never completes the incident: it is logged CRITICAL
(`incident_panic_rejected` with the EEW's reason and whether the rejected entry was ours: a
forged copy of our event_id published first is REJECTED too), the heartbeat turns DEGRADED
with reason=panic_rejected, and the republishing goes on. DUPLICATE means another entry owns
the event_id: we wait for its final report. The incident closes, re-arming the watchdog,
only when a completing report has been seen AND heartbeats have been healthy (status OK,
fresh, no rule firing) continuously for EEXIT_REARM_S. A restarted watchdog recovers the
open incident from the hash.

Panics the EEW would reject are visible before any incident: every EEW heartbeat says which
issuers it authorises and which signing keys it holds (`signing.advertise`: key id, issuer,
an 8-hex key check). The watchdog compares that with its own key at (re)sync and on every EEW
heartbeat (`rejection_risk`); on a mismatch it logs CRITICAL `eew_would_reject_our_panics`
and its heartbeat is DEGRADED with reason=eew_would_reject and the detail; `eexit status`
names it and exits 2.

Redis unreachable, or blind (a command error such as NOPERM, WRONGTYPE or OOM on reading
heartbeats or publishing): reconnect with backoff (0.1 s doubling to 2 s; daemon.Backoff), log
CRITICAL redis_unreachable / blind with the cause each attempt, say it in STATUS=, and stop
WATCHDOG=1 pings once no evaluation succeeded for longer than the systemd watchdog
interval, so systemd sees a watchdog that cannot watch. The watchdog publishes its own
heartbeat on `eexit:watchdog:heartbeat` every EEXIT_WATCHDOG_HEARTBEAT_S: status OK, or
DEGRADED with `reason` (panic_rejected, eew_would_reject) and `detail`.

Other openers of the incident (opened_by=hook: the brain unit's ExecStopPost= hook, eexit/hook.py,
which publishes the moment the brain's process dies): the watchdog adopts such an incident
when its rules fire or when a report arrives, and closes it by the same re-arm rule, so one
death is one event id. An incident it would adopt (on a rule, a report or a restart) is
closed instead when the brain sent an OK heartbeat after that event's final report: it
belongs to an earlier outage, and a rule that fires opens a new one. An adopted id that has
no panic entry yet is published at once.

This module must not import ccxt (start-up < 0.5 s, RSS < 40 MB).
"""

import json
import sys
import time
import uuid
from dataclasses import dataclass, field, replace

from . import bus, daemon, schema, signing
from .config import ConfigError, env_float, env_int
from .heartbeat import Heartbeat, wall_ms
from .log import Logger
from .notify import Notifier

INCIDENT_KEY = "eexit:watchdog:incident"
ISSUER = "watchdog"

HEARTBEAT_LOST = "EXIT_BRAIN_HEARTBEAT_LOST"
DEGRADED_TOO_LONG = "EXIT_BRAIN_DEGRADED_TOO_LONG"
DECISION_STAGNANT = "EXIT_BRAIN_DECISION_STAGNANT"
POSITIONS_UNGUARDED = "POSITIONS_UNGUARDED"

BACKLOG_REPLAY = 50          # heartbeats replayed on (re)connect to rebuild degraded_since
REPORT_SCAN = 1000           # completion reports / panics scanned when recovering an incident
MAX_REPUBLISH_S = 30.0       # cap of the doubling republish delay
ENTRIES_KEPT = 100           # our own panic entry ids remembered per incident
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 2.0
LOCAL_WAIT_S = 0.25          # nearer a rule deadline than this, wait on our clock, not in XREAD
IDLE_BLOCK_S = 0.5           # longest blocking XREAD: bounds SIGTERM handling and ping spacing


# ---------------------------------------------------------------------------- pure core

@dataclass(frozen=True)
class Limits:
    heartbeat_lost_s: float = 5.0
    unguarded_s: float = 3.0
    degraded_s: float = 5.0
    stagnant_s: float = 30.0
    startup_grace_s: float = 5.0


@dataclass(frozen=True)
class WatchState:
    """What the watchdog knows, every instant on its own monotonic clock."""

    observing_since: float                  # start, or the last Redis (re)connect
    last_beat_at: float | None = None       # when the last heartbeat was sent
    status: str | None = None               # "OK" or "DEGRADED" (anything unreadable: DEGRADED)
    active_positions: int | None = None     # None: unknown, counted as open
    degraded_since: float | None = None
    decision_age_s: float | None = None     # producer's ts - last_decision_ts, at the beat
    decision_unknown_since: float | None = None


@dataclass(frozen=True)
class Trigger:
    reason: str
    detail: str


def observe(state, beat, received_at):
    """The state after heartbeat `beat` (a schema.Heartbeat) sent at monotonic `received_at`."""
    status = "OK" if beat.status == "OK" else "DEGRADED"
    degraded_since = None if status == "OK" else (state.degraded_since if state.degraded_since is not None else received_at)
    decision_age_s = None
    if beat.ts is not None and beat.last_decision_ts is not None and beat.last_decision_ts <= beat.ts:
        decision_age_s = (beat.ts - beat.last_decision_ts) / 1000.0
    unknown_since = None if decision_age_s is not None else (
        state.decision_unknown_since if state.decision_unknown_since is not None else received_at)
    return replace(state, last_beat_at=received_at, status=status,
                   active_positions=beat.active_positions, degraded_since=degraded_since,
                   decision_age_s=decision_age_s, decision_unknown_since=unknown_since)


def evaluate(state, now, limits=Limits()):
    """The rule that fires at monotonic instant `now`, or None."""
    observed_for = now - state.observing_since
    heard_since_start = state.last_beat_at is not None and state.last_beat_at >= state.observing_since
    if observed_for <= limits.startup_grace_s and not heard_since_start:
        return None
    if state.last_beat_at is None:
        if observed_for > limits.heartbeat_lost_s:
            return Trigger(HEARTBEAT_LOST, f"no heartbeat in {observed_for:.3f}s since start")
        return None
    positions_open = state.active_positions is None or state.active_positions > 0
    positions = "unknown" if state.active_positions is None else state.active_positions
    silence = now - state.last_beat_at
    if positions_open and silence > limits.unguarded_s:
        return Trigger(POSITIONS_UNGUARDED, f"no heartbeat for {silence:.3f}s with positions={positions}")
    if silence > limits.heartbeat_lost_s:
        return Trigger(HEARTBEAT_LOST, f"no heartbeat for {silence:.3f}s")
    if state.degraded_since is not None and now - state.degraded_since > limits.degraded_s:
        return Trigger(DEGRADED_TOO_LONG, f"DEGRADED for {now - state.degraded_since:.3f}s")
    if positions_open:
        if state.decision_age_s is not None:
            decision_age = state.decision_age_s + silence
            if decision_age > limits.stagnant_s:
                return Trigger(DECISION_STAGNANT, f"last decision {decision_age:.3f}s old with positions={positions}")
        elif state.decision_unknown_since is not None and now - state.decision_unknown_since > limits.stagnant_s:
            return Trigger(DECISION_STAGNANT, f"decision age unknown for {now - state.decision_unknown_since:.3f}s "
                                              f"with positions={positions}")
    return None


def next_deadline(state, now, limits=Limits()):
    """The earliest monotonic instant after `now` at which a rule could start to fire without
    a new heartbeat (rules fire just AFTER it), or None. Lets the loop wake exactly then
    instead of polling blindly, so detection overshoots a threshold by ~1 ms, not a poll."""
    candidates = []
    if state.last_beat_at is None or state.last_beat_at < state.observing_since:
        candidates.append(state.observing_since + limits.startup_grace_s)
    if state.last_beat_at is None:
        candidates.append(state.observing_since + max(limits.startup_grace_s, limits.heartbeat_lost_s))
    else:
        candidates.append(state.last_beat_at + limits.heartbeat_lost_s)
        if state.active_positions is None or state.active_positions > 0:
            candidates.append(state.last_beat_at + limits.unguarded_s)
            if state.decision_age_s is not None:
                candidates.append(state.last_beat_at + limits.stagnant_s - state.decision_age_s)
            elif state.decision_unknown_since is not None:
                candidates.append(state.decision_unknown_since + limits.stagnant_s)
        if state.degraded_since is not None:
            candidates.append(state.degraded_since + limits.degraded_s)
    future = [at for at in candidates if at >= now]
    return min(future) if future else None


def healthy(state, now, limits=Limits()):
    """Heartbeats fresh, status OK and no rule firing: what re-arming requires."""
    return (state.last_beat_at is not None and state.status == "OK"
            and now - state.last_beat_at <= limits.unguarded_s
            and evaluate(state, now, limits) is None)


def after_outage(prior, replayed, lost_at, answered_at):
    """The state to evaluate from when Redis did not answer the watchdog from monotonic
    `lost_at` (its last successful evaluation) until `answered_at` (its last failed call, or
    the end of a call Redis held). A resync is not a start: the start-up grace is not applied
    again. Beats found in the stream keep their real ages (Redis's
    clock); what was known from before the outage (a wiped stream keeps only our memory) is
    credited with the outage, since nobody could beat to a Redis that did not answer. So a
    guard that died during the outage is detected within its threshold of Redis answering
    again, and one that is alive has that threshold to beat again."""
    newer = replayed.last_beat_at is not None and (prior.last_beat_at is None
                                                   or replayed.last_beat_at >= prior.last_beat_at)
    base, outage = (replayed if newer else prior), max(0.0, answered_at - lost_at)

    def credited(at):
        return at if at is None or at >= lost_at else at + outage
    return replace(base, observing_since=prior.observing_since, last_beat_at=credited(base.last_beat_at),
                   degraded_since=credited(base.degraded_since),
                   decision_unknown_since=credited(base.decision_unknown_since))


COMPLETING_STATUSES = ("FLAT", "RESIDUAL", "FAILED")


def report_outcome(status):
    """What a completion report for the incident's event id means for the incident:
        "complete"   FLAT, RESIDUAL or FAILED: the EEW writes these only for the entry that
                     owns the event id, so the panic was executed (the incident may re-arm)
        "rejected"   REJECTED: that entry was refused (our key or issuer, or a forged copy
                     of our event id); the panic is NOT executed: keep republishing, CRITICAL
        "duplicate"  DUPLICATE: another entry owns the event id; wait for ITS final report
        "unreadable" anything else: not proof of anything, keep republishing (fail-closed)"""
    if status in COMPLETING_STATUSES:
        return "complete"
    return {"REJECTED": "rejected", "DUPLICATE": "duplicate"}.get(status, "unreadable")


def rejection_risk(eew_beat, keyring, issuer=ISSUER):
    """(code, detail) saying why the EEW that published heartbeat extra fields `eew_beat`
    would REJECT this watchdog's panics, or None. Compares what the EEW advertises
    (`authorized`, `signatures`, `key_checks`: see signing.advertise) with our own key; an
    EEW that advertises nothing (older version) cannot be checked and gives None."""
    authorized = eew_beat.get("authorized")
    if authorized is not None and issuer not in authorized.split(","):
        return "issuer_not_authorized", f"EEXIT_AUTHORIZED_SOURCES={authorized}"
    if eew_beat.get("signatures") != "required":
        return None
    kid = keyring.kid_for(issuer) if keyring.configured else None
    if kid is None:
        return "unsigned", "the EEW requires signatures; this watchdog has no key"
    theirs = {item.partition(":")[0]: item for item in eew_beat.get("key_checks", "").split(",")}
    if kid not in theirs:
        return "unknown_kid", f"kid {kid} is not in the EEW's key ring"
    if theirs[kid] != signing.key_check(keyring, kid):
        return "key_mismatch", f"the EEW holds {theirs[kid]}, we hold {signing.key_check(keyring, kid)}"
    return None


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Config:
    limits: Limits
    poll_ms: int
    republish_s: float
    rearm_s: float
    heartbeat_s: float
    redis_replicas: int
    redis_wait_ms: int

    @classmethod
    def from_env(cls, env=None):
        # Upper bounds: a threshold of hours is a watchdog that never fires.
        lost = env_float("EEXIT_HEARTBEAT_LOST_S", 5.0, minimum=0.01, maximum=600, env=env)
        limits = Limits(
            heartbeat_lost_s=lost,
            unguarded_s=env_float("EEXIT_UNGUARDED_S", 3.0, minimum=0.01, maximum=600, env=env),
            degraded_s=env_float("EEXIT_DEGRADED_S", 5.0, minimum=0.01, maximum=3600, env=env),
            stagnant_s=env_float("EEXIT_STAGNANT_S", 30.0, minimum=0.01, maximum=3600, env=env),
            startup_grace_s=env_float("EEXIT_STARTUP_GRACE_S", lost, minimum=0.0, maximum=600, env=env),
        )
        return cls(
            limits=limits,
            # The blocking XREAD's timeout (Redis rounds it up to its hz tick, 100 ms by
            # default); near a rule deadline the loop waits on its own clock instead.
            poll_ms=env_int("EEXIT_WATCHDOG_POLL_MS", 25, minimum=1, maximum=100, env=env),
            republish_s=env_float("EEXIT_REPUBLISH_S", 5.0, minimum=0.1, maximum=600, env=env),
            rearm_s=env_float("EEXIT_REARM_S", 5.0, minimum=0.0, maximum=3600, env=env),
            heartbeat_s=env_float("EEXIT_WATCHDOG_HEARTBEAT_S", 1.0, minimum=0.05, maximum=60, env=env),
            # With Sentinel: replicas that must hold a panic before it counts as published.
            redis_replicas=env_int("EEXIT_REDIS_REPLICAS", 0, minimum=0, maximum=16, env=env),
            redis_wait_ms=env_int("EEXIT_REDIS_WAIT_MS", 500, minimum=1, maximum=10000, env=env),
        )


# ---------------------------------------------------------------------------- shell

@dataclass
class Incident:
    event_id: str
    reason: str
    detail: str
    opened_at_ms: int
    publish_count: int = 0
    completed_status: str = ""      # status of the first completion report seen
    next_publish_at: float = 0.0    # monotonic
    republish_delay_s: float = 0.0
    healthy_since: float | None = None
    refused: str = ""               # the last REJECTED (or unreadable) report, until one is not
    entries: list = field(default_factory=list)    # our panic entry ids (in memory only)

    def to_fields(self):
        return {"event_id": self.event_id, "reason": self.reason, "detail": self.detail,
                "opened_at_ms": str(self.opened_at_ms), "publish_count": str(self.publish_count),
                "completed_status": self.completed_status}


class Watchdog:
    def __init__(self, cfg, client, keyring, notifier=None, log=None,
                 monotonic=time.monotonic, clock_ms=wall_ms):
        self.cfg = cfg
        self.client = client
        self.keyring = keyring
        self.kid = keyring.kid_for(ISSUER) if keyring.configured else None
        self.notifier = notifier or Notifier(env={})
        self.log = log or Logger("watchdog")
        self.monotonic = monotonic      # every age is measured on this clock
        self.clock_ms = clock_ms        # wall clock, only to stamp outgoing messages
        self.own_beat = Heartbeat(client, "watchdog", schema.WATCHDOG_HEARTBEAT_STREAM)
        self.state = WatchState(observing_since=monotonic())
        self.incident = None
        self.last_trigger = None
        self.last_problems = []
        self.beat_id = "0-0"
        self.report_id = "0-0"
        self.eew_beat_id = "0-0"
        self.eew_risks = {}             # EEW consumer -> (code, detail): it would reject our panics
        self.synced_before = False
        self.failed_at = 0.0            # monotonic: our last Redis call that failed
        self.last_evaluated = monotonic()
        self.last_evaluated_ms = clock_ms()
        self.next_own_beat = 0.0
        self.last_ping = 0.0
        self.stopping = False

    # -- start-up and reconnect --------------------------------------------------------

    def resync(self):
        """Rebuild state from Redis after start or reconnect: the recent heartbeats (aged on
        Redis's clock), the open incident, what the EEWs accept, and the read positions of
        the streams. The start-up grace starts at the first sync only (see after_outage)."""
        self._noting_failure(self._resync)

    def _noting_failure(self, work):
        try:
            work()
        except bus.REDIS_ERRORS:
            self.failed_at = self.monotonic()    # Redis did not answer until here (after_outage)
            raise

    def _resync(self):
        asked_at = self.monotonic()
        server_ms = bus.server_time_ms(self.client)
        now = self.monotonic()      # after Redis answered: a stall ends only now
        recent = self.client.xrevrange(schema.HEARTBEAT_STREAM, "+", "-", count=BACKLOG_REPLAY)
        state = WatchState(observing_since=self.state.observing_since if self.synced_before else now)
        for entry_id, fields in reversed(recent):
            entry_ms = schema.entry_id_ms(entry_id)
            age_s = max(0, server_ms - entry_ms) / 1000.0 if entry_ms is not None else float("inf")
            state = self._observe(state, fields, now - age_s)
        if self.synced_before:
            # Credited: up to our last failed call, or to now if Redis held this one (stalled).
            answered_at = now if now - asked_at > LOCAL_WAIT_S else max(self.failed_at, self.last_evaluated)
            state = after_outage(self.state, state, self.last_evaluated, answered_at)
            self.log.info("resynced", outage_s=round(answered_at - self.last_evaluated, 3),
                          startup_grace="not_reapplied")
        self.synced_before = True
        self.state = state
        self.beat_id = bus.as_text(recent[0][0]) if recent else "0-0"
        # The newest EEW heartbeat now; the other EEW instances' within their next beat.
        self.eew_beat_id, eew_fields = self._newest(schema.EEW_HEARTBEAT_STREAM)
        if eew_fields is not None:
            self._check_eew(eew_fields)
        self.report_id, _report = self._newest(schema.COMPLETED_STREAM)
        self._recover_incident(now)

    def _newest(self, stream):
        """(entry id, fields) of the newest entry of `stream`; ("0-0", None) when it is empty."""
        newest = self.client.xrevrange(stream, "+", "-", count=1)
        return (bus.as_text(newest[0][0]), newest[0][1]) if newest else ("0-0", None)

    def _recover_incident(self, now):
        stored = {bus.as_text(k): bus.as_text(v) for k, v in self.client.hgetall(INCIDENT_KEY).items()}
        if self.incident is None and stored.get("event_id"):
            if self._drop_if_outlived(stored["event_id"]):
                return
            try:
                opened_at_ms = int(stored.get("opened_at_ms", "0"))
            except ValueError:
                opened_at_ms = 0
            self.incident = Incident(stored["event_id"], stored.get("reason") or HEARTBEAT_LOST,
                                     stored.get("detail", ""), opened_at_ms,
                                     republish_delay_s=self.cfg.republish_s)
            self.log.critical("incident_recovered", event_id=self.incident.event_id,
                              reason=self.incident.reason)
        if self.incident is None:
            return
        incident = self.incident
        if not stored.get("event_id"):
            # Redis lost the hash (restart without persistence): our memory is the record.
            self.client.hset(INCIDENT_KEY, mapping=incident.to_fields())
        if not incident.completed_status:
            incident.completed_status = self._find_report(incident.event_id)
        if incident.completed_status:
            return
        # No panic entry: we crashed between the hash and the XADD, or Redis lost it: publish now.
        incident.next_publish_at = now + (incident.republish_delay_s if self._panic_published(incident.event_id) else 0.0)

    def _find(self, stream, message, event_id):
        """(entry id, message) of the newest `message` (schema class) on `stream` with this
        event_id: for a report, only one that completes the incident (report_outcome).
        (None, None) if there is none."""
        for entry_id, fields in self.client.xrevrange(stream, "+", "-", count=REPORT_SCAN):
            found, _problems = message.from_fields(fields)
            if found.event_id == event_id and (message is schema.PanicEvent
                                               or report_outcome(found.status) == "complete"):
                return entry_id, found
        return None, None

    def _drop_if_outlived(self, event_id):
        """Close the shared incident event_id, and return True, when that event has a final
        report and the brain sent an OK heartbeat after it: the incident belongs to an earlier
        outage (a hook's incident nobody adopted, or one planted with a used event id, which
        the EEW would only answer DUPLICATE), so adopting it would suppress this outage's
        panic. Two watchdogs doing this at once can open two incidents: a needless second
        flatten, never a missed one."""
        entry_id, _report = self._find(schema.COMPLETED_STREAM, schema.CompletionReport, event_id)
        if entry_id is None:
            return False
        later = self.client.xrange(schema.HEARTBEAT_STREAM, bus.as_text(entry_id), "+", count=REPORT_SCAN)
        if any(schema.Heartbeat.from_fields(beat)[0].status == "OK" for _id, beat in later):
            self.log.warning("incident_outlived", event_id=event_id)
            self._close_incident(Incident(event_id, "", "", 0))
            return True
        return False

    def _panic_published(self, event_id):
        return self._find(schema.PANIC_STREAM, schema.PanicEvent, event_id)[1] is not None

    def _find_report(self, event_id):
        _entry_id, report = self._find(schema.COMPLETED_STREAM, schema.CompletionReport, event_id)
        return "" if report is None else report.status

    # -- one iteration -------------------------------------------------------------------

    def _observe(self, state, fields, sent_at):
        beat, problems = schema.Heartbeat.from_fields(fields)
        if problems != self.last_problems:
            # Kept and read fail-closed (see observe); logged when the set changes, so the
            # producer gets fixed without a line per beat.
            self.last_problems = problems
            self.log.warning("heartbeat_problems", problems=",".join(problems) or "none")
        return observe(state, beat, sent_at)

    def step(self):
        """Wait for heartbeats or the next rule deadline, then evaluate and act. Raises
        REDIS_ERRORS."""
        self._noting_failure(self._step)

    def _step(self):
        streams = {schema.HEARTBEAT_STREAM: self.beat_id, schema.COMPLETED_STREAM: self.report_id,
                   schema.EEW_HEARTBEAT_STREAM: self.eew_beat_id}
        before = self.monotonic()
        deadline = next_deadline(self.state, before, self.cfg.limits)
        if deadline is not None and deadline - before <= LOCAL_WAIT_S:
            # Redis times out a blocked XREAD only as finely as its `hz` (100 ms at the
            # default 10), so near a deadline we sleep on our own clock and then read without
            # blocking. Anything that arrived meanwhile is backdated by its age on Redis's
            # clock, bounded by how long we slept (a Redis clock step cannot age it further).
            time.sleep(max(0.0, deadline - before) + 0.001)
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            pipe.xread(streams, count=100)
            (seconds, micros), reply = pipe.execute()
            server_ms = int(seconds) * 1000 + int(micros) // 1000
            received_at = self.monotonic()
            max_age_s = received_at - before
        else:
            # A heartbeat wakes the XREAD at once, so blocking until just before the next rule
            # deadline (or our own heartbeat, or a systemd ping) costs no detection time and
            # keeps an idle watchdog from spinning.
            wait_s = IDLE_BLOCK_S if deadline is None else deadline - before - LOCAL_WAIT_S
            wait_s = min(wait_s, self.next_own_beat - before, self.notifier.max_block_s(IDLE_BLOCK_S))
            block_ms = max(self.cfg.poll_ms, int(wait_s * 1000))
            reply = self.client.xread(streams, count=100, block=block_ms)
            server_ms = None
            received_at = self.monotonic()
        for stream, entries in reply or []:
            stream = bus.as_text(stream)
            for entry_id, fields in entries:
                if stream == schema.HEARTBEAT_STREAM:
                    self.beat_id = bus.as_text(entry_id)
                    sent_at = received_at
                    entry_ms = schema.entry_id_ms(entry_id)
                    if server_ms is not None and entry_ms is not None:
                        sent_at -= min(max(0, server_ms - entry_ms) / 1000.0, max_age_s)
                    self.state = self._observe(self.state, fields, sent_at)
                elif stream == schema.EEW_HEARTBEAT_STREAM:
                    self.eew_beat_id = bus.as_text(entry_id)
                    self._check_eew(fields)
                else:
                    self.report_id = bus.as_text(entry_id)
                    if self.incident is None:
                        # Another opener's incident (the ExecStopPost hook, another watchdog)
                        # is adopted when a report arrives, so it closes by our re-arm rule.
                        self._recover_incident(received_at)
                    self._on_report(fields)
        now = self.monotonic()
        trigger = evaluate(self.state, now, self.cfg.limits)
        self._act(trigger, now)
        self.last_evaluated = now
        self.last_evaluated_ms = self.clock_ms()
        if now >= self.next_own_beat:
            self.next_own_beat = now + self.cfg.heartbeat_s
            status, why = self._health()
            self.own_beat.publish(status, 0, self.last_evaluated_ms, latency_ms=(now - received_at) * 1000,
                                  extra={"incident": self.incident.event_id if self.incident else "",
                                         "brain_status": self.state.status or "none", **why})

    def _health(self):
        """(status, fields) of our own heartbeat: DEGRADED with `reason` and `detail` while our
        incident's panic is refused, or while an EEW says it would reject our panics. A
        watchdog whose panics are not executed must be visible to `eexit status` and alerts."""
        if self.incident is not None and self.incident.refused:
            return "DEGRADED", {"reason": "panic_rejected", "detail": self.incident.refused}
        if self.eew_risks:
            consumer, (code, detail) = min(self.eew_risks.items())
            return "DEGRADED", {"reason": "eew_would_reject", "detail": f"{consumer}: {code}: {detail}"}
        return "OK", {}

    def _check_eew(self, fields):
        """Compare one EEW heartbeat's advertised keys with ours (rejection_risk); log when
        the answer for that EEW instance changes."""
        beat, _problems = schema.Heartbeat.from_fields(fields)
        consumer = beat.extra.get("consumer") or beat.service_id or "unknown"
        risk = rejection_risk(beat.extra, self.keyring)
        if risk is not None and self.eew_risks.get(consumer) != risk:
            self.log.critical("eew_would_reject_our_panics", consumer=consumer, why=risk[0], detail=risk[1])
            self.eew_risks[consumer] = risk
        elif risk is None and self.eew_risks.pop(consumer, None):
            self.log.info("eew_accepts_our_panics", consumer=consumer)

    def _on_report(self, fields):
        """Only the owner's FLAT / RESIDUAL / FAILED completes the incident (report_outcome).
        A REJECTED report never does: the panic was not executed, so we keep republishing
        on the backoff schedule, and say so at CRITICAL and in our heartbeat."""
        report, _problems = schema.CompletionReport.from_fields(fields)
        incident = self.incident
        if incident is None or report.event_id != incident.event_id or incident.completed_status:
            return
        outcome = report_outcome(report.status)
        entry_id = report.extra.get("entry_id", "") or "-"
        ours = "unknown" if not incident.entries else ("yes" if entry_id in incident.entries else "no")
        if outcome == "complete":
            incident.completed_status, incident.refused = report.status, ""
            level = self.log.info if report.status == "FLAT" else self.log.critical
            level("incident_report_seen", event_id=incident.event_id, status=report.status, entry_id=entry_id)
            self.client.hset(INCIDENT_KEY, "completed_status", report.status)
        elif outcome == "duplicate":
            # Another entry owns the event id (the EEW authorised and claimed it): the panic
            # is being executed; its owner's final report completes the incident.
            incident.refused = ""
            self.log.warning("incident_report_not_final", event_id=incident.event_id, status=report.status,
                             entry_id=entry_id, ours=ours, detail=report.detail or "-")
        else:
            incident.refused = f"{report.status or 'unreadable'}: {report.detail or '-'} entry={entry_id} ours={ours}"
            self.log.critical("incident_panic_rejected", event_id=incident.event_id,
                              status=report.status or "unreadable", why=report.detail or "-", entry_id=entry_id,
                              ours=ours, publish_count=incident.publish_count,
                              next_publish_in_s=round(max(0.0, incident.next_publish_at - self.monotonic()), 3))

    def _act(self, trigger, now):
        if trigger is not None and (self.last_trigger is None or trigger.reason != self.last_trigger.reason):
            self.log.critical("rule_fired", reason=trigger.reason, detail=trigger.detail,
                              incident=self.incident.event_id if self.incident else "")
        self.last_trigger = trigger
        if self.incident is None:
            if trigger is not None:
                self._open_incident(trigger, now)
            return
        incident = self.incident
        if not incident.completed_status and now >= incident.next_publish_at:
            self._publish_panic(incident, now)
        if healthy(self.state, now, self.cfg.limits):
            if incident.healthy_since is None:
                incident.healthy_since = now
            if incident.completed_status and now - incident.healthy_since >= self.cfg.rearm_s:
                self._close_incident(incident)
        else:
            incident.healthy_since = None

    def _open_incident(self, trigger, now):
        candidate = Incident(str(uuid.uuid4()), trigger.reason, trigger.detail, self.clock_ms(),
                             republish_delay_s=self.cfg.republish_s)
        # The hash first: a crash before the XADD then re-publishes THIS id after restart.
        # Watchdogs on several hosts share INCIDENT_KEY: the first claim (HSETNX event_id) wins
        # and the others adopt its event_id, so one outage is one execution (docs/HA.md).
        claim = {**candidate.to_fields(), "opened_by": ISSUER}
        event_id, won = bus.claim_incident(self.client, INCIDENT_KEY, claim)
        if not won and self._drop_if_outlived(event_id):
            event_id, won = bus.claim_incident(self.client, INCIDENT_KEY, claim)
        if won:
            self.incident = candidate
            self.log.critical("incident_opened", event_id=event_id, reason=trigger.reason,
                              detail=trigger.detail)
            self._publish_panic(candidate, now)
            return
        adopted = Incident(event_id, trigger.reason, trigger.detail, self.clock_ms(),
                           republish_delay_s=self.cfg.republish_s)
        adopted.completed_status = self._find_report(event_id)
        # The winner publishes; we re-publish the SAME id only if no report appears in time
        # (covers a winner that died between its claim and its XADD): fail-closed, and never
        # a second execution.
        # No panic entry at all for it: its opener died (or was stopped) between claim and
        # XADD; publish now rather than after the republish delay.
        adopted.next_publish_at = now + (self.cfg.republish_s if self._panic_published(event_id) else 0.0)
        self.incident = adopted
        opened_by = bus.as_text(self.client.hget(INCIDENT_KEY, "opened_by") or b"")
        self.log.critical("incident_adopted", event_id=event_id, reason=trigger.reason, opened_by=opened_by,
                          completed_status=adopted.completed_status)

    def _publish_panic(self, incident, now):
        context = {"detail": incident.detail, "publish_count": incident.publish_count + 1,
                   "brain_status": self.state.status, "brain_positions": self.state.active_positions}
        event = schema.PanicEvent(event_id=incident.event_id, reason=incident.reason,
                                  issued_by=ISSUER, ts=self.clock_ms(),
                                  extra={"context": json.dumps(context, sort_keys=True)})
        fields = event.to_fields()
        if self.kid is not None:
            fields = signing.sign_fields(fields, self.kid, self.keyring)
        published = bus.publish_durable(self.client, schema.PANIC_STREAM, fields,
                                        self.cfg.redis_replicas, self.cfg.redis_wait_ms,
                                        give_up_after_s=2.0)
        entry_id = published.entry_id
        if not published.confirmed:
            # Written, but a failover could still lose it: the republish schedule below keeps
            # publishing the same event_id until a completion report appears.
            self.log.critical("panic_replication_unconfirmed", event_id=incident.event_id,
                              replicas_acked=published.replicas_acked)
        if incident.publish_count > 0:
            incident.republish_delay_s = min(incident.republish_delay_s * 2, MAX_REPUBLISH_S)
        incident.publish_count += 1
        incident.entries = [*incident.entries[-(ENTRIES_KEPT - 1):], bus.as_text(entry_id)]
        incident.next_publish_at = now + incident.republish_delay_s
        self.client.hset(INCIDENT_KEY, mapping=incident.to_fields())
        self.log.critical("panic_published", event_id=incident.event_id, reason=incident.reason,
                          entry_id=entry_id, publish_count=incident.publish_count,
                          signed=self.kid is not None)

    def _close_incident(self, incident):
        # Delete only our own incident: never a hash a concurrent tool rewrote.
        stored = self.client.hget(INCIDENT_KEY, "event_id")
        if stored is not None and bus.as_text(stored) == incident.event_id:
            self.client.delete(INCIDENT_KEY)
        self.log.info("incident_closed", event_id=incident.event_id,
                      completed_status=incident.completed_status, rearmed=True)
        self.incident = None

    # -- the loop --------------------------------------------------------------------------

    def _maybe_ping(self, now):
        """WATCHDOG=1 while evaluations succeed; stops once none succeeded for longer than the
        systemd interval, so systemd restarts a watchdog that cannot watch."""
        interval = self.notifier.watchdog_interval_s
        if interval is None or now - self.last_evaluated > interval:
            return
        if now - self.last_ping >= interval / 4:
            self.notifier.ping()
            self.last_ping = now

    def run(self):
        backoff = daemon.Backoff(BACKOFF_START_S, BACKOFF_MAX_S)
        synced = False
        self.notifier.ready("watching")
        self.log.info("started", limits=self.cfg.limits, poll_ms=self.cfg.poll_ms,
                      signed=self.kid is not None)
        while not self.stopping:
            try:
                if not synced:
                    self.resync()
                    synced = True
                    backoff.reset()
                    self.log.info("synced", brain_status=self.state.status or "none",
                                  incident=self.incident.event_id if self.incident else "")
                    self.notifier.status("watching")
                self.step()
            except bus.REDIS_ERRORS as exc:
                # Cannot read heartbeats or publish: reconnect with backoff and re-sync, which
                # re-reads the stream on Redis's clock (no new start-up grace: after_outage). The
                # pings stop once this lasts longer than the systemd interval (fail-closed:
                # systemd then restarts us and shows the failure).
                # A command error (NOPERM, WRONGTYPE, OOM) on these paths is no better: we are
                # blind; STATUS= says which, and the same pings rule applies.
                synced = False
                wait, why = backoff.next(), "redis_unreachable" if bus.is_transport_error(exc) else "blind"
                self.log.critical(why, cause=daemon.cause(exc), error=type(exc).__name__,
                                  detail=str(exc)[:200], retry_in_s=wait)
                self.notifier.status(f"{why}: {daemon.cause(exc)}")
                self._sleep(wait)
            self._maybe_ping(self.monotonic())
        self.notifier.stopping()
        self.log.info("stopped")

    def _sleep(self, seconds):
        deadline = self.monotonic() + seconds
        while not self.stopping and self.monotonic() < deadline:
            self._maybe_ping(self.monotonic())
            time.sleep(min(0.05, max(0.0, deadline - self.monotonic())))


# Harmless preflight probes (daemon.preflight): reads, and XADD with id 0-0, which always
# fails after the ACL check.
PROBES = (("XREVRANGE", schema.HEARTBEAT_STREAM, "+", "-", "COUNT", "1"),
          ("XREAD", "COUNT", "1", "STREAMS", schema.COMPLETED_STREAM, "$"),
          ("XADD", schema.PANIC_STREAM, "0-0", "f", "v"),
          ("XADD", schema.WATCHDOG_HEARTBEAT_STREAM, "0-0", "f", "v"),
          ("HGETALL", INCIDENT_KEY), ("TIME",))


def main():
    log = Logger("watchdog")

    def start():
        cfg = Config.from_env()
        keyring = signing.load_keys()
        if keyring.configured and keyring.kid_for(ISSUER) is None:
            raise ConfigError(f"{signing.ENV_VARIABLE} / {signing.CREDENTIAL_FILE} has keys but none for "
                              f"issuer {ISSUER}: its panics would be rejected")
        client = bus.connect()
        notifier = Notifier()
        watchdog = Watchdog(cfg, client, keyring, notifier, log)
        daemon.on_stop_signal(lambda: setattr(watchdog, "stopping", True))
        if daemon.wait_for_redis(client, PROBES, log, lambda: watchdog.stopping, time.sleep, notifier):
            watchdog.run()
    return daemon.main(log, start)


if __name__ == "__main__":
    sys.exit(main())

"""The watchdog: reads the Exit Brain's heartbeats and publishes exactly one panic per incident.

    python -m eexit.watchdog

Rules (SPEC §3), evaluated by the pure `evaluate(state, now, limits)`:

    1 no heartbeat for > EEXIT_HEARTBEAT_LOST_S (5)                   EXIT_BRAIN_HEARTBEAT_LOST
    2 status DEGRADED continuously for > EEXIT_DEGRADED_S (5)         EXIT_BRAIN_DEGRADED_TOO_LONG
    3 positions open and last decision older than EEXIT_STAGNANT_S    EXIT_BRAIN_DECISION_STAGNANT
    4 positions open and no heartbeat for > EEXIT_UNGUARDED_S (3)     POSITIONS_UNGUARDED
    R a new brain process after a beat with positions open and no     EXIT_BRAIN_RESTARTED
      clean stop (an event, not a state: `restarted`, below)

Rule 4 is checked first, then 1, 2, 3 (then R): when several hold, the most specific reason is named.
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
positions open; a status other than OK or STOPPED counts as DEGRADED; an unknown decision age (missing
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

Incidents: one pure function, `step(incident, inputs, now)` -> (incident, commands), over the
rule that fires, the brain's restart, completion reports, the halt and the shared incident
hash; the shell performs its commands (claim, publish, store, close, log). The lifecycle is
tied to the halt, not to a timer:
- A trigger with no incident open opens one: a new event_id is claimed in the hash
  `eexit:watchdog:incident` (one script; watchdogs and the crash hook share it) BEFORE the panic
  is published, in the same step, so a crash in between re-publishes the same id.
- While it is open no new one starts; every further trigger is absorbed by it.
- Closing: the current round's panic is re-published (same event_id) after EEXIT_REPUBLISH_S,
  then with doubling delays up to 30 s, until the owner of the event_id reports (the EEW
  de-duplicates; re-publishing covers a panic lost with a Redis restart). FLAT ends the
  closing. RESIDUAL or FAILED does not: CRITICAL `incident_not_flat`, our heartbeat DEGRADED
  (reason=incident_not_flat), and after the back-off the next round's panic, with a new
  event_id derived from the incident's (uuid5: every watchdog derives the same one), so the
  EEW executes it again; this repeats until a FLAT report, whatever the EEW's halt guard is
  set to. A REJECTED report never completes a round: logged CRITICAL
  (`incident_panic_rejected` with the EEW's reason and whether the rejected entry was ours:
  a forged copy of our event_id published first is REJECTED too), the heartbeat turns
  DEGRADED with reason=panic_rejected, and the republishing goes on. DUPLICATE means another
  entry owns the event_id: we wait for its final report.
- The incident ends only when a human resumes: `system:state:trading` halted=false with
  `cleared_at` later than the incident's `opened_at_ms`. Both are Redis TIME (the watchdog
  reads TIME with the halt every step), so no host's clock skew matters. From then on any
  rule that fires opens a new incident and publishes at once, also in the very step of the
  resume. `eexit resume` does not look at the brain (a choice: resuming beside a dead or
  degraded brain is answered by a new panic within the rule's threshold, which also covers a
  brain that dies a second after the resume).
- Adoption: an incident someone else opened (the crash hook, opened_by=hook; another watchdog)
  is adopted when our claim loses, when a report arrives while we have none, and at start
  (a restarted watchdog recovers its own the same way). A claim that has no panic in the
  stream yet is published at once with its id (its opener may have died between claim and
  XADD); one older than CLAIM_GRACE_S (10 s, the hook's longest bound) in its first round is
  stale: it is deleted, so it neither blocks the next crash nor flattens a healthy brain.

A fast restart is a crash. Heartbeats carry `instance` (new at every process start) and a
clean stop sends a last beat with status STOPPED. A beat from a new instance after one that
reported open or unknown positions and was not STOPPED is trigger EXIT_BRAIN_RESTARTED (once;
`restarted`): one panic even when the crash hook failed and systemd restarted the brain
before any silence threshold. Only restarts seen live count: beats replayed at the first
start do not (a restart before the watchdog ran is the crash hook's).

Whose heartbeats. Only beats with the brain's `service_id` (EEXIT_BRAIN_SERVICE_ID, default
exit_brain) are judged; another producer on the stream (a bot's own heartbeat) is ignored and
logged once per service_id (`heartbeat_ignored`). Redis ACLs cannot refuse it: they scope
keys, not field values.

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
DEGRADED with `reason` (panic_rejected, incident_not_flat, eew_would_reject) and `detail`.

This module must not import ccxt (start-up < 0.5 s, RSS < 40 MB).
"""

import sys
import time
import uuid
from dataclasses import dataclass, replace
from enum import Enum

import redis

from . import bus, daemon, schema, signing, tamper
from .config import nested, setting, settings
from .heartbeat import Heartbeat, wall_ms
from .log import Logger
from .notify import Notifier

ISSUER = "watchdog"

HEARTBEAT_LOST = "EXIT_BRAIN_HEARTBEAT_LOST"
DEGRADED_TOO_LONG = "EXIT_BRAIN_DEGRADED_TOO_LONG"
DECISION_STAGNANT = "EXIT_BRAIN_DECISION_STAGNANT"
POSITIONS_UNGUARDED = "POSITIONS_UNGUARDED"
BRAIN_RESTARTED = "EXIT_BRAIN_RESTARTED"

STREAMS_READ = (schema.HEARTBEAT_STREAM, schema.COMPLETED_STREAM, schema.EEW_HEARTBEAT_STREAM)
BACKLOG_REPLAY = 50          # heartbeats replayed on (re)connect to rebuild degraded_since
REPORT_SCAN = 1000           # completion reports / panics scanned when recovering an incident
CLAIM_GRACE_S = 10.0         # a claim without its panic this long (the hook's longest bound) is stale
MAX_REPUBLISH_S = 30.0       # cap of the doubling republish delay
ENTRIES_KEPT = 100           # our own panic entry ids remembered per incident
LOCAL_WAIT_S = 0.25          # nearer a rule deadline than this, wait on our clock, not in XREAD
IDLE_BLOCK_S = 0.5           # longest blocking XREAD: bounds SIGTERM handling and ping spacing


# ---------------------------------------------------------------------------- pure core

@dataclass(frozen=True)
class Limits:
    # Upper bounds: a threshold of hours is a watchdog that never fires.
    heartbeat_lost_s: float = setting("EEXIT_HEARTBEAT_LOST_S", 5.0, 0.01, 600)
    unguarded_s: float = setting("EEXIT_UNGUARDED_S", 3.0, 0.01, 600)
    degraded_s: float = setting("EEXIT_DEGRADED_S", 5.0, 0.01, 3600)
    stagnant_s: float = setting("EEXIT_STAGNANT_S", 30.0, 0.01, 3600)
    startup_grace_s: float = setting("EEXIT_STARTUP_GRACE_S", 5.0, 0.0, 600, default_from="heartbeat_lost_s")


@dataclass(frozen=True)
class WatchState:
    """What the watchdog knows, every instant on its own monotonic clock."""

    observing_since: float                  # start, or the last Redis (re)connect
    last_beat_at: float | None = None       # when the last heartbeat was sent
    status: str | None = None               # "OK", "DEGRADED" (anything unreadable) or "STOPPED"
    active_positions: int | None = None     # None: unknown, counted as open
    degraded_since: float | None = None
    decision_age_s: float | None = None     # producer's ts - last_decision_ts, at the beat
    decision_unknown_since: float | None = None
    instance: str = ""                      # the guard's process identity in its last beat
    stopped: bool = False                   # its last beat was a clean stop (STOPPED)


@dataclass(frozen=True)
class Trigger:
    reason: str
    detail: str


def observe(state, beat, received_at):
    """The state after heartbeat `beat` (a schema.Heartbeat) sent at monotonic `received_at`.
    STOPPED (a clean stop's last beat) is no DEGRADED: the guard is gone, and the silence rules
    run from this beat exactly as if it had been the last OK one."""
    status = beat.status if beat.status in ("OK", "STOPPED") else "DEGRADED"
    degraded_since = None if status != "DEGRADED" else (
        state.degraded_since if state.degraded_since is not None else received_at)
    decision_age_s = None
    if beat.ts is not None and beat.last_decision_ts is not None and beat.last_decision_ts <= beat.ts:
        decision_age_s = (beat.ts - beat.last_decision_ts) / 1000.0
    unknown_since = None if decision_age_s is not None else (
        state.decision_unknown_since if state.decision_unknown_since is not None else received_at)
    return replace(state, last_beat_at=received_at, status=status,
                   active_positions=beat.active_positions, degraded_since=degraded_since,
                   decision_age_s=decision_age_s, decision_unknown_since=unknown_since,
                   instance=beat.instance, stopped=beat.status == "STOPPED")


def rule_deadlines(state, limits=Limits()):
    """[(monotonic instant, reason, detail(now))]: every rule that can fire without a new
    heartbeat, in order of precedence (4, 1, 2, 3), each firing once `now` is strictly past its
    instant. One table for evaluate and next_deadline, so the loop wakes exactly when a rule
    can fire. Until a beat sent after the start arrives, nothing fires within the grace."""
    start, last = state.observing_since, state.last_beat_at
    not_before = start if last is not None and last >= start else start + limits.startup_grace_s
    if last is None:
        rules = [(start + limits.heartbeat_lost_s, HEARTBEAT_LOST,
                  lambda now: f"no heartbeat in {now - start:.3f}s since start")]
        return [(max(at, not_before), reason, detail) for at, reason, detail in rules]
    positions_open = state.active_positions is None or state.active_positions > 0
    held = f"with positions={'unknown' if state.active_positions is None else state.active_positions}"
    rules = [(last + limits.unguarded_s, POSITIONS_UNGUARDED,
              lambda now: f"no heartbeat for {now - last:.3f}s {held}")] if positions_open else []
    rules.append((last + limits.heartbeat_lost_s, HEARTBEAT_LOST,
                  lambda now: f"no heartbeat for {now - last:.3f}s"))
    if state.degraded_since is not None:
        rules.append((state.degraded_since + limits.degraded_s, DEGRADED_TOO_LONG,
                      lambda now: f"DEGRADED for {now - state.degraded_since:.3f}s"))
    if positions_open and state.decision_age_s is not None:
        rules.append((last + limits.stagnant_s - state.decision_age_s, DECISION_STAGNANT, lambda now:
                      f"last decision {state.decision_age_s + now - last:.3f}s old {held}"))
    elif positions_open and state.decision_unknown_since is not None:
        rules.append((state.decision_unknown_since + limits.stagnant_s, DECISION_STAGNANT, lambda now:
                      f"decision age unknown for {now - state.decision_unknown_since:.3f}s {held}"))
    return [(max(at, not_before), reason, detail) for at, reason, detail in rules]


def evaluate(state, now, limits=Limits()):
    """The rule that fires at monotonic instant `now`, or None."""
    fired = (Trigger(reason, detail(now)) for at, reason, detail in rule_deadlines(state, limits) if now > at)
    return next(fired, None)


def next_deadline(state, now, limits=Limits()):
    """The earliest monotonic instant after `now` at which a rule could start to fire without
    a new heartbeat (rules fire just AFTER it), or None. Lets the loop wake exactly then
    instead of polling blindly, so detection overshoots a threshold by ~1 ms, not a poll."""
    return min((at for at, _reason, _detail in rule_deadlines(state, limits) if at >= now), default=None)


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




def report_outcome(status):
    """What a completion report's status means for the incident:
        "complete"   FLAT, RESIDUAL, FAILED: the owner of the event id executed it
        "rejected"   REJECTED: not executed (bad signature, unauthorised issuer, ...)
        "duplicate"  DUPLICATE: another entry owns the event id; wait for ITS final report
        "unreadable" anything else: not proof of anything, keep republishing (fail-closed)"""
    if status in schema.FINAL_STATUSES:
        return "complete"
    return {"REJECTED": "rejected", "DUPLICATE": "duplicate"}.get(status, "unreadable")


def restarted(state, beat):
    """Trigger EXIT_BRAIN_RESTARTED when `beat` comes from a new process of the guard (another
    `instance`) after a beat that reported positions open or unknown and was no clean stop
    (STOPPED): a crash, however fast systemd restarted it (~2 s, under every silence threshold)."""
    if not beat.instance or state.instance in ("", beat.instance) or state.stopped or state.active_positions == 0:
        return None
    positions = "unknown" if state.active_positions is None else state.active_positions
    return Trigger(BRAIN_RESTARTED, f"instance {state.instance} -> {beat.instance} without a clean stop, "
                                    f"positions={positions}")


ROUND_NAMESPACE = uuid.UUID("6c1f6f4e-2f3a-4b8e-9a51-0e5e7e1d2c44")


@dataclass(frozen=True)
class Incident:
    """One outage, from the first trigger until a resume clears the halt after it opened."""

    event_id: str               # its first panic's event id: the identity of the shared claim
    reason: str
    detail: str
    opened_at_ms: int           # Redis TIME: one clock with the resume's cleared_at
    opened_by: str = ISSUER
    round: int = 0              # closing round: a RESIDUAL or FAILED report starts the next one
    publish_count: int = 0      # panics published in this round (0: none found in the stream)
    outcome: str = ""           # "FLAT" once the current round's panic reported FLAT: closing done
    refused: str = ""           # the last REJECTED (or unreadable) report, until one is not
    delay_s: float = 5.0        # the next republish back-off (doubles up to MAX_REPUBLISH_S)
    next_publish_at: float = 0.0    # monotonic

    @property
    def current(self):
        """The event id of this round's panics: round 0 the incident's own; later rounds an id
        derived from it, the same in every watchdog (HA watchdogs publish each round once)."""
        return self.event_id if self.round == 0 else str(uuid.uuid5(ROUND_NAMESPACE, f"{self.event_id}/{self.round}"))

    def to_fields(self):
        return {"event_id": self.event_id, "reason": self.reason, "detail": self.detail,
                "opened_at_ms": str(self.opened_at_ms), "opened_by": self.opened_by, "round": str(self.round),
                "current_event_id": self.current, "publish_count": str(self.publish_count),
                "completed_status": self.outcome}

    @classmethod
    def from_fields(cls, stored, republish_s):
        """From the shared hash (ours, or the hook's: it writes event_id, reason, opened_by,
        opened_at_ms); unreadable numbers are 0 (an opened_at of 0 is older than any resume)."""
        def number(name):
            text = stored.get(name) or "0"
            return int(text) if text.isdigit() else 0
        return cls(stored["event_id"], stored.get("reason") or HEARTBEAT_LOST, stored.get("detail", ""),
                   number("opened_at_ms"), stored.get("opened_by", ""), number("round"), number("publish_count"),
                   "FLAT" if stored.get("completed_status") == "FLAT" else "", delay_s=republish_s)


@dataclass(frozen=True)
class Inputs:
    """What the shell read since the last step."""

    redis_ms: int                           # Redis TIME now
    trigger: Trigger | None = None          # a rule firing now, or the brain's restart (once)
    reports: tuple = ()                     # schema.CompletionReport, in stream order
    halt: object = None                     # schema.TradingState read this step, None if unread
    found: Incident | None = None           # the shared incident another opener holds; publish_count
                                            # 0 when the stream has no panic of its current id
    new_id: str = ""                        # the event id a new incident takes
    own_entries: tuple = ()                 # stream ids of the panics this process published


class Do(str, Enum):
    CLAIM = "claim"         # claim the shared incident; lost: drop the rest, step again with `found`
    PUBLISH = "publish"     # XADD the signed panic for incident.current, then STORE
    STORE = "store"         # write the incident's hash
    CLOSE = "close"         # delete the hash if it still holds this incident
    NOTE = "note"           # log only


@dataclass(frozen=True)
class Command:
    do: Do
    incident: Incident
    level: str = ""         # the log line that goes with it ("" none)
    event: str = ""
    fields: tuple = ()      # (key, value) pairs


def resumed(incident, halt):
    """A human cleared the halt after the incident opened: the incident is over."""
    return (halt is not None and halt.halted is False and halt.cleared_at is not None
            and halt.cleared_at > incident.opened_at_ms)


def step(incident, inputs, now, republish_s):
    """(incident, commands): the incident lifecycle at monotonic `now`, pure.

    - No incident: a trigger opens one (CLAIM, PUBLISH at once). A `found` incident is adopted,
      unless it is a stale claim (round 0, no panic in the stream, older than CLAIM_GRACE_S):
      that is dropped, so it neither blocks a crash nor flattens a healthy brain.
    - A resume (the halt cleared after the incident opened) ends it at once; a trigger in the
      same step opens the next one.
    - Reports for the current round's event id: FLAT ends the closing (the incident stays,
      absorbing triggers, until the resume); RESIDUAL or FAILED starts the next round, a new
      event id published after the back-off; REJECTED, DUPLICATE or unreadable keep the
      round's panic being re-published.
    - Until FLAT: re-publish on the back-off (republish_s, doubling up to MAX_REPUBLISH_S)."""
    commands = []
    if incident is None and inputs.found is not None:
        incident = _take_over(inputs.found, inputs, now, commands)
    if incident is not None and resumed(incident, inputs.halt):
        commands.append(Command(Do.CLOSE, incident, "info", "incident_closed",
                                (("why", "resumed"), ("cleared_by", inputs.halt.cleared_by or "-"),
                                 ("outcome", incident.outcome or "closing"))))
        incident = None
    if incident is None:
        if inputs.trigger is None:
            return None, commands
        incident = Incident(inputs.new_id, inputs.trigger.reason, inputs.trigger.detail, inputs.redis_ms,
                            delay_s=republish_s)
        commands.append(Command(Do.CLAIM, incident, "critical", "incident_opened",
                                (("reason", incident.reason), ("detail", incident.detail))))
    for report in inputs.reports:
        incident = _on_report(incident, report, inputs.own_entries, now, commands)
    if incident.outcome != "FLAT" and now >= incident.next_publish_at:
        incident = replace(incident, publish_count=incident.publish_count + 1, next_publish_at=now + incident.delay_s,
                           delay_s=min(incident.delay_s * 2, MAX_REPUBLISH_S))
        commands.append(Command(Do.PUBLISH, incident))
    return incident, commands


def _take_over(found, inputs, now, commands):
    stale = found.round == 0 and found.publish_count == 0 and \
        inputs.redis_ms - found.opened_at_ms > CLAIM_GRACE_S * 1000
    if stale:
        commands.append(Command(Do.CLOSE, found, "warning", "stale_claim_dropped",
                                (("opened_by", found.opened_by or "-"), ("opened_at_ms", found.opened_at_ms))))
        return None
    # A claim without its panic yet (its opener may have died between claim and XADD):
    # publish the same id at once; the EEW de-duplicates if the opener's XADD lands too.
    adopted = replace(found, next_publish_at=now + (found.delay_s if found.publish_count else 0.0))
    event = "incident_adopted" if found.opened_by not in (ISSUER, "") else "incident_recovered"
    commands.append(Command(Do.NOTE, adopted, "critical", event,
                            (("reason", found.reason), ("opened_by", found.opened_by or "-"),
                             ("round", found.round), ("outcome", found.outcome or "closing"))))
    return adopted


def _on_report(incident, report, own_entries, now, commands):
    if report.event_id != incident.current or incident.outcome == "FLAT":
        return incident
    outcome = report_outcome(report.status)
    entry_id = report.extra.get("entry_id", "") or "-"
    ours = "unknown" if not own_entries else ("yes" if entry_id in own_entries else "no")
    facts = (("event_id", incident.current), ("status", report.status or "unreadable"), ("entry_id", entry_id))
    if report.status == "FLAT":
        incident = replace(incident, outcome="FLAT", refused="")
        commands.append(Command(Do.STORE, incident, "info", "incident_report_seen", facts + (("round", incident.round),)))
    elif outcome == "complete":
        # Not flat: keep closing with a new event id (the EEW executes each id once), on the
        # back-off, whatever the EEW's halt guard is set to. CRITICAL each round; the alert
        # notifier also sees the EEW's report of each round.
        incident = replace(incident, round=incident.round + 1, publish_count=0, refused="",
                           next_publish_at=now + incident.delay_s)
        commands.append(Command(Do.STORE, incident, "critical", "incident_not_flat",
                                facts + (("failed_symbols", ",".join(report.failed_symbols or []) or "-"),
                                         ("next_round", incident.round), ("next_event_id", incident.current),
                                         ("next_publish_in_s", round(incident.next_publish_at - now, 3)))))
    elif outcome == "duplicate":
        # Another entry owns the event id (the EEW authorised and claimed it): its owner's
        # final report completes the round.
        incident = replace(incident, refused="")
        commands.append(Command(Do.NOTE, incident, "warning", "incident_report_not_final",
                                facts + (("ours", ours), ("detail", report.detail or "-"))))
    else:
        incident = replace(incident, refused=f"{report.status or 'unreadable'}: {report.detail or '-'} "
                                             f"entry={entry_id} ours={ours}")
        commands.append(Command(Do.NOTE, incident, "critical", "incident_panic_rejected",
                                facts[:2] + (("why", report.detail or "-"), ("entry_id", entry_id), ("ours", ours),
                                         ("publish_count", incident.publish_count),
                                         ("next_publish_in_s", round(max(0.0, incident.next_publish_at - now), 3)))))
    return incident


def health(incident, eew_risks):
    """(status, fields) of our own heartbeat: DEGRADED with `reason` and `detail` while our
    incident's panic is refused or its closing is not flat yet, or while an EEW says it
    would reject our panics. A watchdog whose panics are not executed must be visible to
    `eexit status` and alerts."""
    if incident is not None and incident.refused:
        return "DEGRADED", {"reason": "panic_rejected", "detail": incident.refused}
    if incident is not None and incident.round > 0 and incident.outcome != "FLAT":
        return "DEGRADED", {"reason": "incident_not_flat",
                            "detail": f"round {incident.round} event_id={incident.current}"}
    if eew_risks:
        consumer, (code, detail) = min(eew_risks.items())
        return "DEGRADED", {"reason": "eew_would_reject", "detail": f"{consumer}: {code}: {detail}"}
    return "OK", {}


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
    limits: Limits = nested(Limits)
    # The blocking XREAD's timeout (Redis rounds it up to its hz tick, 100 ms by default);
    # near a rule deadline the loop waits on its own clock instead.
    poll_ms: int = setting("EEXIT_WATCHDOG_POLL_MS", 25, 1, 100)
    republish_s: float = setting("EEXIT_REPUBLISH_S", 5.0, 0.1, 600)
    # The brain's service_id: only its beats are judged (another producer is ignored).
    brain_service_id: str = setting("EEXIT_BRAIN_SERVICE_ID", "exit_brain")
    heartbeat_s: float = setting("EEXIT_WATCHDOG_HEARTBEAT_S", 1.0, 0.05, 60)
    # With Sentinel: replicas that must hold a panic before it counts as published.
    redis_replicas: int = setting("EEXIT_REDIS_REPLICAS", 0, 0, 16)
    redis_wait_ms: int = setting("EEXIT_REDIS_WAIT_MS", 500, 1, 10000)
    from_env = classmethod(settings)


# ---------------------------------------------------------------------------- shell

def time_and_halt(client):
    """(Redis TIME in ms, the halt as schema.TradingState or None) in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(schema.TRADING_STATE_KEY)
    (seconds, micros), raw_halt = pipe.execute()
    halt = schema.TradingState.from_fields(raw_halt)[0] if raw_halt else None     # None: no halt hash
    return int(seconds) * 1000 + int(micros) // 1000, halt


def find_entry(client, stream, event_id, wanted):
    """The newest entry of `stream` (among REPORT_SCAN) with this event_id and wanted(fields)."""
    for _entry_id, fields in client.xrevrange(stream, "+", "-", count=REPORT_SCAN):
        if bus.as_text(fields.get(b"event_id", fields.get("event_id", b""))) == event_id and wanted(fields):
            return fields
    return None


def final_reports(client, event_id):
    """The newest FLAT / RESIDUAL / FAILED report for event_id, as a 0- or 1-tuple."""
    fields = find_entry(client, schema.COMPLETED_STREAM, event_id,
                        lambda f: report_outcome(bus.as_text(f.get(b"status", f.get("status", b"")))) == "complete")
    return () if fields is None else (schema.CompletionReport.from_fields(fields)[0],)


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
        self.own_entries = []           # stream ids of the panics we published for self.incident
        self.restart = None             # a restart seen in a beat, until the next step acts on it
        self.last_trigger = None
        self.last_problems = []
        self.ignored_services = set()   # other producers on the brain's stream, logged once each
        # Where each XREAD of ours continues: after the last entry read.
        self.read_from = dict.fromkeys(STREAMS_READ, "0-0")
        self.eew_risks = {}             # EEW consumer -> (code, detail): it would reject our panics
        self.synced_before = False
        self.failed_at = 0.0            # monotonic: our last Redis call that failed
        self.last_evaluated = monotonic()
        self.next_own_beat = 0.0
        self.last_ping = 0.0
        self.stopping = False

    # -- start-up and reconnect --------------------------------------------------------

    def resync(self):
        """Rebuild state from Redis after start or reconnect: the recent heartbeats (aged on
        Redis's clock), the open incident, what the EEWs accept, and the read positions of
        the streams. The start-up grace starts at the first sync only (see after_outage).
        Raises REDIS_ERRORS (run() notes when: failed_at)."""
        asked_at = self.monotonic()
        server_ms, halt = time_and_halt(self.client)
        now = self.monotonic()      # after Redis answered: a stall ends only now
        # The recent heartbeats; of the other streams where they end (the newest EEW heartbeat
        # is checked now, the other EEW instances' within their next beat; the reports that
        # matter are read by event id). All read before anything is replaced: a resync that
        # fails leaves what we knew for the next one.
        newest = [(stream, self.client.xrevrange(stream, "+", "-", count=count))
                  for stream, count in zip(STREAMS_READ, (BACKLOG_REPLAY, 1, 1))]
        prior, read_up_to = self.state, self.read_from
        self.state = WatchState(observing_since=prior.observing_since if self.synced_before else now)
        self.read_from = dict.fromkeys(STREAMS_READ, "0-0")
        for stream, entries in newest:
            self._take(stream, reversed(entries), server_ms, now, read_up_to)
        if self.synced_before:
            # Credited: up to our last failed call, or to now if Redis held this one (stalled).
            answered_at = now if now - asked_at > LOCAL_WAIT_S else max(self.failed_at, self.last_evaluated)
            self.state = after_outage(prior, self.state, self.last_evaluated, answered_at)
            self.log.info("resynced", outage_s=round(answered_at - self.last_evaluated, 3),
                          startup_grace="not_reapplied")
        self.synced_before = True
        self._advance(now, server_ms, halt, (), recover=True)

    def _read_found(self):
        """(Incident or None, its final reports) from the shared hash: another opener's claim
        (the hook, another watchdog) or our own from before a restart. publish_count 0 means
        the panic stream holds no panic of its current event id."""
        stored = bus.decoded(self.client.hgetall(schema.INCIDENT_KEY))
        if not stored.get("event_id"):
            return None, ()
        found = Incident.from_fields(stored, self.cfg.republish_s)
        published = find_entry(self.client, schema.PANIC_STREAM, found.current, lambda fields: True)
        found = replace(found, publish_count=max(found.publish_count, 1) if published else 0)
        return found, final_reports(self.client, found.current)

    # -- one iteration -------------------------------------------------------------------

    def _take(self, stream, entries, server_ms, received_at, read_up_to, max_age_s=float("inf")):
        """Feed one stream's entries (oldest first) into what we know; returns its completion
        reports. A heartbeat sent `age` before `received_at`: its age on Redis's clock (TIME
        minus its id's ms), at most max_age_s. A restart counts only in a beat after
        read_up_to[stream], seen live (not one replayed at the first start)."""
        up_to, reports = tamper.parse_id(read_up_to[stream]), ()
        for entry_id, fields in entries:
            self.read_from[stream] = bus.as_text(entry_id)
            if stream == schema.EEW_HEARTBEAT_STREAM:
                self._check_eew(fields)
                continue
            if stream == schema.COMPLETED_STREAM:
                reports += (schema.CompletionReport.from_fields(fields)[0],)
                continue
            beat, problems = schema.Heartbeat.from_fields(fields)
            if beat.service_id != self.cfg.brain_service_id:
                # Only the brain's own beats are judged: a bot beating here must neither hide the
                # brain's death nor overwrite its positions. ACLs cannot refuse it (they scope keys,
                # not field values), so it is ignored and said once per producer.
                if beat.service_id not in self.ignored_services:
                    self.ignored_services.add(beat.service_id)
                    self.log.warning("heartbeat_ignored", service_id=beat.service_id or "-",
                                     watching=self.cfg.brain_service_id)
                continue
            if problems != self.last_problems:
                # Kept and read fail-closed (see observe); logged when the set changes, so the
                # producer gets fixed without a line per beat.
                self.last_problems = problems
                self.log.warning("heartbeat_problems", problems=",".join(problems) or "none")
            if self.restart is None and self.synced_before and tamper.parse_id(entry_id) > up_to:
                self.restart = restarted(self.state, beat)
            entry_ms = schema.entry_id_ms(entry_id)
            age_s = float("inf") if entry_ms is None else max(0, server_ms - entry_ms) / 1000.0
            self.state = observe(self.state, beat, received_at - min(age_s, max_age_s))
        return reports

    def step(self):
        """Wait for heartbeats or the next rule deadline, then evaluate and act. Raises
        REDIS_ERRORS (run() notes when: failed_at)."""
        before = self.monotonic()
        deadline = next_deadline(self.state, before, self.cfg.limits)
        near = deadline is not None and deadline - before <= LOCAL_WAIT_S
        if near:
            # Redis times out a blocked XREAD only as finely as its `hz` (100 ms at the
            # default 10), so near a deadline we sleep on our own clock and then read without
            # blocking. Anything that arrived meanwhile is backdated by its age on Redis's
            # clock, bounded by how long we slept (a Redis clock step cannot age it further).
            time.sleep(max(0.0, deadline - before) + 0.001)
            block_ms = None
        else:
            # A heartbeat wakes the XREAD at once, so blocking until just before the next rule
            # deadline (or our own heartbeat, or a systemd ping) costs no detection time and
            # keeps an idle watchdog from spinning.
            wait_s = IDLE_BLOCK_S if deadline is None else deadline - before - LOCAL_WAIT_S
            wait_s = min(wait_s, self.next_own_beat - before, self.notifier.max_block_s(IDLE_BLOCK_S))
            block_ms = max(self.cfg.poll_ms, int(wait_s * 1000))
        reply = self.client.xread(self.read_from, count=100, block=block_ms)
        server_ms, halt = time_and_halt(self.client)
        received_at = self.monotonic()
        max_age_s = received_at - before if near else 0.0
        reports = ()
        for stream, entries in reply or []:
            reports += self._take(bus.as_text(stream), entries, server_ms, received_at, self.read_from,
                                  max_age_s)
        now = self.monotonic()
        self._advance(now, server_ms, halt, reports)
        self.last_evaluated = now
        if now >= self.next_own_beat:
            self.next_own_beat = now + self.cfg.heartbeat_s
            status, why = health(self.incident, self.eew_risks)
            self.own_beat.publish(status, 0, self.clock_ms(), latency_ms=(now - received_at) * 1000,
                                  extra={"incident": self.incident.event_id if self.incident else "",
                                         "brain_status": self.state.status or "none", **why})

    def _advance(self, now, server_ms, halt, reports, recover=False, attempts=3):
        """Evaluate the rules, run the incident function and perform its commands. With no
        incident of ours and reports, or to `recover` (a (re)sync, a lost claim), the incident
        another opener holds (the crash hook, another watchdog, ours before a restart) is read
        with its final report first, so it is adopted and lives and ends by the same rules as
        our own; to recover our own incident, its final report is read."""
        found = None
        if self.incident is None and (reports or recover):
            found, final = self._read_found()
            reports += final
        elif recover:
            reports += final_reports(self.client, self.incident.current)
            if not self.client.hget(schema.INCIDENT_KEY, "event_id"):
                # Redis lost the hash (restart without persistence): our memory is the record.
                self.client.hset(schema.INCIDENT_KEY, mapping=self.incident.to_fields())
        trigger = evaluate(self.state, now, self.cfg.limits) or self.restart
        if trigger is not None and (self.last_trigger is None or trigger.reason != self.last_trigger.reason):
            self.log.critical("rule_fired", reason=trigger.reason, detail=trigger.detail,
                              incident=self.incident.event_id if self.incident else "")
        self.last_trigger = trigger
        inputs = Inputs(server_ms, trigger, reports, halt, found, str(uuid.uuid4()), tuple(self.own_entries))
        incident, commands = step(self.incident, inputs, now, self.cfg.republish_s)
        for command in commands:
            # CLAIM: the hash first, so a crash before the XADD re-publishes THIS id after a
            # restart. Watchdogs on several hosts and the crash hook share the incident key: the
            # first claim (bus.claim_incident) wins and the others adopt its event_id (docs/HA.md).
            if command.do is Do.CLAIM and not bus.claim_incident(self.client, schema.INCIDENT_KEY,
                                                                 command.incident.to_fields())[1]:
                if attempts == 0:
                    raise redis.ResponseError(
                        f"{schema.INCIDENT_KEY}: claimed and lost three times in one step")
                # Another opener holds the incident: adopt it (or drop it if stale) and decide again.
                return self._advance(now, server_ms, halt, reports, True, attempts - 1)
            if command.do is Do.PUBLISH:
                self._publish_panic(command.incident)
            elif command.do is Do.STORE:
                self.client.hset(schema.INCIDENT_KEY, mapping=command.incident.to_fields())
            elif command.do is Do.CLOSE:
                # Delete only this incident: never a hash a concurrent opener rewrote.
                stored = self.client.hget(schema.INCIDENT_KEY, "event_id")
                if stored is not None and bus.as_text(stored) == command.incident.event_id:
                    self.client.delete(schema.INCIDENT_KEY)
                self.incident, self.own_entries = None, []
            if command.do is Do.CLAIM or command.event in ("incident_adopted", "incident_recovered"):
                self.own_entries = []
            if command.event:
                getattr(self.log, command.level)(command.event, **{"event_id": command.incident.event_id,
                                                                   **dict(command.fields)})
        self.restart = None         # acted on: a restart is one trigger, not a standing rule
        self.incident = incident

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

    def _publish_panic(self, incident):
        context = {"detail": incident.detail, "publish_count": incident.publish_count, "incident": incident.event_id,
                   "round": incident.round, "brain_status": self.state.status,
                   "brain_positions": self.state.active_positions}
        fields = signing.signed_panic(incident.current, incident.reason, ISSUER, self.clock_ms(), context,
                                      self.keyring)
        published = bus.publish_durable(self.client, schema.PANIC_STREAM, fields,
                                        self.cfg.redis_replicas, self.cfg.redis_wait_ms,
                                        give_up_after_s=2.0)
        if not published.confirmed:
            # Written, but a failover could still lose it: the republish schedule keeps
            # publishing this round's event_id until a completion report appears.
            self.log.critical("panic_replication_unconfirmed", event_id=incident.current,
                              replicas_acked=published.replicas_acked)
        self.own_entries = [*self.own_entries[-(ENTRIES_KEPT - 1):], bus.as_text(published.entry_id)]
        self.client.hset(schema.INCIDENT_KEY, mapping=incident.to_fields())
        self.log.critical("panic_published", event_id=incident.current, incident=incident.event_id,
                          round=incident.round, reason=incident.reason, entry_id=published.entry_id,
                          publish_count=incident.publish_count, signed=self.kid is not None)


    # -- the loop --------------------------------------------------------------------------

    def _maybe_ping(self, now):
        """WATCHDOG=1 while evaluations succeed; stops once none succeeded for longer than the
        systemd interval, so systemd restarts a watchdog that cannot watch."""
        interval = self.notifier.watchdog_interval_s
        if interval is not None and now - self.last_evaluated <= interval \
                and now - self.last_ping >= interval / 4:
            self.notifier.ping()
            self.last_ping = now

    def run(self):
        backoff = daemon.Backoff()      # 0.1 s doubling to 2 s
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
                self.failed_at = self.monotonic()    # Redis did not answer until here (after_outage)
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
                resume_at = self.monotonic() + wait
                while not self.stopping and self.monotonic() < resume_at:
                    self._maybe_ping(self.monotonic())
                    time.sleep(min(0.05, max(0.0, resume_at - self.monotonic())))
            self._maybe_ping(self.monotonic())
        self.notifier.stopping()
        self.log.info("stopped")


# Harmless preflight probes (daemon.preflight): reads, XADD with id 0-0 and EVALSHA of no
# script, which always fail after the ACL check (an ACL file older than the claim script
# refuses at start, not at the first claim).
PROBES = (("XREVRANGE", schema.HEARTBEAT_STREAM, "+", "-", "COUNT", "1"),
          ("XREAD", "COUNT", "1", "STREAMS", schema.COMPLETED_STREAM, "$"),
          ("XADD", schema.PANIC_STREAM, "0-0", "f", "v"),
          ("XADD", schema.WATCHDOG_HEARTBEAT_STREAM, "0-0", "f", "v"),
          ("HGETALL", schema.INCIDENT_KEY), ("HGETALL", schema.TRADING_STATE_KEY), ("TIME",),
          ("EVALSHA", "0" * 40, "1", schema.INCIDENT_KEY), ("SCRIPT", "LOAD", "return 0"))


def main():
    log = Logger("watchdog")

    def start():
        cfg = Config.from_env()
        keyring = signing.load_keys()
        signing.check_own_keys(keyring, ISSUER, signing.key_source())
        client = bus.connect()
        notifier = Notifier()
        watchdog = Watchdog(cfg, client, keyring, notifier, log)
        daemon.on_stop_signal(lambda: setattr(watchdog, "stopping", True))
        if daemon.wait_for_redis(client, PROBES, log, lambda: watchdog.stopping, time.sleep, notifier):
            watchdog.run()
    return daemon.main(log, start)


if __name__ == "__main__":
    sys.exit(main())

"""The EEW's decisions, sans I/O: pure functions of (state, input, now) -> (state, commands).

eexit/eew.py (the shell) performs each command (Redis, the exchange, the journal) and feeds
its result or its error back; it decides nothing about a panic itself. tests/sim.py drives
these functions through seeded fault schedules and checks the invariants after every step.

One panic entry (Panic, start/on_result/on_error):

    unauthorised -------------------------------------------> REJECT (report, ack; no action)
    authorised --> CLAIM --new/resume--> WRITE_HALT --> CLOSE --> REPORT --> done
                         --duplicate--> REPORT_NO_ACTION (DUPLICATE)
                         --done-------> ACK (the report stands; only the ack was missing)
    a claimed record (resume_recorded) ------> WRITE_HALT --> CLOSE --> REPORT --> done
    own authority (start_own: bus loss, guard) ----------> CLOSE --> REPORT --> done

Fail-closed (issue 24): whatever fails while handling an AUTHORISED panic (a bug, a Redis
command error, unexpected exchange data), the EEW still halts (or keeps the halt), attempts
the close by the simplest path (SIMPLE_CLOSE: a fresh close with no ledger bookkeeping),
reports what it could, and marks the panic `degraded` (the heartbeat names it) until a final
report stands. A transport error (Redis unreachable) leaves the entry pending: it is resumed
after the reconnect, and the bus-loss close covers the gap (Liveness). FAILED without a halt
is only for entries that are not authorised (give_up_unauthorised). One final report per
event id: the report script writes it once per event id (eexit/eew.py, FINISH_LUA); a panic
whose report waits in the journal is never executed again (start(journaled=True)).

One close (close_next, round_pause, close_summary): eexit/eew.py's Closer.execute reads the
account, then asks close_next after every read whether another round (cancel + close) runs,
round_pause how long to back off after a round with errors, and close_summary what the report
says (never FLAT over an unreadable row, a failed read or an open order). tests/sim.py's
close_run explores that loop.

The worker (Liveness, pass_ended/close_due/closed): the bus-loss timer measures continuous
inability to do the job; only a clean pass (entries read, nothing refused, Redis kept) ends it.
"""

import enum
import json
from dataclasses import dataclass, replace

from . import flatten, guard_policy, schema


class Stage(str, enum.Enum):
    RECEIVED = "received"
    CLAIMING = "claiming"
    HALTING = "halting"
    CLOSING = "closing"
    REPORTING = "reporting"
    WAITING = "waiting"          # left pending: resumed at the next delivery
    DONE = "done"


class ErrorKind(str, enum.Enum):
    TRANSPORT = "transport"      # Redis unreachable: nothing was decided by the server
    COMMAND = "command"          # Redis refused (NOPERM, WRONGTYPE, ...): retrying fixes nothing
    BUG = "bug"                  # an exception of ours or data we did not expect


class Claim(str, enum.Enum):
    NEW = "new"
    RESUME = "resume"
    DONE = "done"
    DUPLICATE = "duplicate"


class Do(str, enum.Enum):
    REJECT = "reject"                        # one REJECTED report + ack, no ledger field
    CLAIM = "claim"                          # HSETNX the ledger record
    WRITE_HALT = "write_halt"                # system:state:trading halted
    CLOSE = "close"                          # read, cancel + close, verify (the Closer)
    SIMPLE_CLOSE = "simple_close"            # the same without ledger bookkeeping
    REPORT = "report"                        # final report + done + ack (journal if Redis cannot)
    REPORT_NO_ACTION = "report_no_action"    # DUPLICATE / FAILED without action, + ack
    ACK = "ack"
    TOUCH = "touch"                          # keep the entry ours (reset its idle time)


class PassEnd(str, enum.Enum):
    CLEAN = "clean"              # entries read and every job step done
    BLIND = "blind"              # a command error on the job path
    LOST = "lost"                # Redis went away during the pass


@dataclass(frozen=True)
class Command:
    do: Do
    status: str = ""             # the report's status for REPORT_NO_ACTION / a failed close
    detail: str = ""


@dataclass(frozen=True)
class Panic:
    event_id: str
    entry_id: str | None
    authorised: bool
    stage: Stage = Stage.RECEIVED
    halted: bool = False
    closed_by: Do | None = None
    failures: tuple = ()         # "<command>:<kind>:<detail>", in order
    degraded: bool = False       # a failure happened: the heartbeat names the event
    final: bool = False          # a final report stands (ledger) or waits in the journal
    quiet: bool = False          # a repeated bus-loss close: nothing done, no report


def start(event_id, entry_id, authorised, journaled=False):
    """A delivered entry. journaled: its final report waits in the local journal (the ledger
    could not take it): never execute again, the journal publishes it and acknowledges."""
    panic = Panic(event_id, entry_id, authorised)
    if not authorised:
        return replace(panic, stage=Stage.REPORTING), [Command(Do.REJECT, "REJECTED")]
    if journaled:
        # Kept ours (no other instance claims it idle and runs it again) until published.
        return replace(panic, stage=Stage.WAITING), [Command(Do.TOUCH)]
    return replace(panic, stage=Stage.CLAIMING), [Command(Do.CLAIM)]


def start_own(event_id, close=True, repeat=False):
    """A close on the EEW's own authority (bus loss, halt guard): no entry, nothing to claim;
    the halt is written with the report (Redis may be what is lost; the guard's halt stands).
    close=False: the report only (the guard's alert policy). repeat: a repeated bus-loss close
    that found nothing to do writes no report (the first one stands)."""
    panic = Panic(event_id, None, True, stage=Stage.CLOSING if close else Stage.REPORTING, halted=True,
                  quiet=repeat)
    return panic, [Command(Do.CLOSE if close else Do.REPORT)]


def resume_recorded(event_id, entry_id):
    """A claimed ledger record to finish (a lost panic's tamper close, a stranded record)."""
    return Panic(event_id, entry_id, True, stage=Stage.HALTING), [Command(Do.WRITE_HALT)]


def on_result(panic, command, result=None):
    """The command succeeded with `result` (a Claim for CLAIM, the report fields of a close,
    for REPORT where it stands: "ledger", "direct" or "journal")."""
    do = command.do
    if do is Do.CLAIM:
        if result in (Claim.NEW, Claim.RESUME):
            return replace(panic, stage=Stage.HALTING), [Command(Do.WRITE_HALT)]
        if result is Claim.DUPLICATE:
            return replace(panic, stage=Stage.REPORTING), [Command(Do.REPORT_NO_ACTION, "DUPLICATE")]
        return replace(panic, stage=Stage.REPORTING), [Command(Do.ACK)]
    if do is Do.WRITE_HALT:
        return replace(panic, stage=Stage.CLOSING, halted=True), [Command(Do.CLOSE)]
    if do in (Do.CLOSE, Do.SIMPLE_CLOSE):
        if panic.quiet and guard_policy.quiet_repeat(result):
            return replace(panic, stage=Stage.DONE, closed_by=do), []
        return replace(panic, stage=Stage.REPORTING, closed_by=do), [Command(Do.REPORT)]
    if do is Do.TOUCH:
        return panic, []
    # The event's final report stands after REPORT "ledger"/"direct" ("journal": it waits for
    # Redis) and for ACK (written before); a DUPLICATE report is this entry's, not the event's.
    stands = (do is Do.REPORT and result != "journal") or do is Do.ACK
    return replace(panic, stage=Stage.DONE, final=panic.final or stands), []


def on_error(panic, command, kind, detail=""):
    """The command failed. Authorised panics fail closed; see the module docstring."""
    failed = replace(panic, failures=panic.failures + (f"{command.do.value}:{kind.value}:{detail}",))
    if kind is ErrorKind.TRANSPORT and command.do is not Do.CLOSE:
        # Redis unreachable: the entry stays pending and is resumed after the reconnect (a
        # report the shell could not write is already journaled by it).
        return replace(failed, stage=Stage.WAITING), []
    if not panic.authorised:
        return replace(failed, stage=Stage.WAITING), []      # give_up_unauthorised decides
    failed = replace(failed, degraded=True)
    do = command.do
    if do is Do.CLAIM:
        # No record could be claimed: halt and close all the same (a close acts only on what
        # the exchange says is left, so an instance that does own the record loses nothing).
        return replace(failed, stage=Stage.HALTING), [Command(Do.WRITE_HALT)]
    if do in (Do.WRITE_HALT, Do.CLOSE):
        # The halt refused: the close still runs, the report says the halt is missing. The close
        # failed: the simplest one, without the ledger bookkeeping that may be what failed.
        return replace(failed, stage=Stage.CLOSING), [Command(Do.SIMPLE_CLOSE)]
    if do is Do.SIMPLE_CLOSE:
        return replace(failed, stage=Stage.REPORTING, closed_by=do), [
            Command(Do.REPORT, "FAILED", f"close_failed:{detail}")]
    if do is Do.REPORT and not command.status:
        # Building or writing the report failed: the simplest report, FAILED naming why.
        return replace(failed, stage=Stage.REPORTING), [Command(Do.REPORT, "FAILED", f"report_failed:{detail}")]
    # The simplest report failed too, or an ack / DUPLICATE report did: left pending, the
    # heartbeat names the event until a later delivery gets a final report written.
    return replace(failed, stage=Stage.WAITING), []


class Read(str, enum.Enum):
    OWN = "own"                  # this consumer's pending entries (a restart, a journaled report)
    IDLE = "idle"                # entries other consumers left idle for EEXIT_CLAIM_IDLE_MS
    NEW = "new"                  # entries never delivered (the read blocks once READY=1 is sent)


def entry_reads(sweep_due):
    """Where a pass's entries come from, tried in order until one read returns entries (NEW
    always ends it): own pending entries and then idle ones of other consumers once per sweep
    interval (again at once only after a full batch), then new ones. An entry left pending on
    purpose (its report waits in the journal) never keeps the read of new entries from running."""
    return (Read.OWN, Read.IDLE, Read.NEW) if sweep_due else (Read.NEW,)


def pending_query(batch_ids, candidate_ids):
    """(min, max, count) of the XPENDING that tells which candidates of an audited batch are
    pending: count covers every entry of the range (other pending entries of the batch could
    fill a count of len(candidates), and a pending panic would look skipped: run twice)."""
    return candidate_ids[0], candidate_ids[-1], len(batch_ids)


def give_up_unauthorised(deliveries, max_deliveries):
    """An entry that is not authorised and whose rejection keeps failing: after
    EEXIT_MAX_DELIVERIES a FAILED report without any action (never a halt: it may be a
    forgery built to crash us)."""
    return deliveries >= max_deliveries


# ------------------------------------------------------------------------------ the worker

@dataclass(frozen=True)
class Liveness:
    """Continuous inability to do the job: since when, why (command errors: "blind"), and
    the close on own authority while it lasts."""
    unable_since: float | None = None
    blind: str | None = None
    blind_closed: bool = False
    next_close: float | None = None


def pass_ended(state, outcome, now, why=None):
    """A pass ended. Only a clean one ends the inability; a reconnect alone does not."""
    if outcome is PassEnd.CLEAN:
        return Liveness()
    return replace(state, unable_since=now if state.unable_since is None else state.unable_since,
                   blind=why if outcome is PassEnd.BLIND else state.blind)


def due(schedule, timer, now, every_s=None):
    """Whether the worker's `timer` is due now (schedule: timer -> monotonic time it is next
    due; absent: due now); if so and every_s is given, it is next due every_s from now."""
    if now < schedule.get(timer, now):
        return False
    if every_s is not None:
        schedule[timer] = now + every_s
    return True


def unable_for(state, now):
    return 0.0 if state.unable_since is None else max(0.0, now - state.unable_since)


def close_due(state, now, limit_s):
    """Whether the close on own authority (bus loss / blindness) runs now."""
    return (limit_s > 0 and state.unable_since is not None and unable_for(state, now) > limit_s
            and (state.next_close is None or now >= state.next_close))


def closed(state, now, repeat_in_s):
    return replace(state, blind_closed=state.blind is not None, next_close=now + repeat_in_s)


def pings_allowed(state, limit_s):
    """WATCHDOG=1 while blind only until the close on own authority ran (or never, without
    that close): systemd then restarts the EEW, whose preflight says what is wrong."""
    return state.blind is None or not (state.blind_closed or limit_s <= 0)


# ------------------------------------------------------------------------------ reports

NO_COUNTS = dict(positions_total=None, positions_closed=None, positions_failed=None)


def report(base, fields, now_ms):
    """The one place a CompletionReport is built. base: event_id, issued_by, reason,
    ts_started, optionally event_age_ms, problems; fields: status, counts, detail, scope ...
    and "extra" (extra wire fields)."""
    fields = dict(fields)
    extra = fields.pop("extra", {})
    built = schema.CompletionReport(
        event_id=base["event_id"][:schema.MAX_TEXT], issued_by=(base.get("issued_by") or "")[:schema.MAX_TEXT],
        reason=(base.get("reason") or "")[:schema.MAX_TEXT], event_age_ms=base.get("event_age_ms"),
        problems=list(base.get("problems") or ()), ts_started=base["ts_started"], ts_completed=now_ms,
        execution_time_ms=max(0, now_ms - base["ts_started"]), **{**NO_COUNTS, **fields})
    built.extra.update({key: str(value) for key, value in extra.items()})
    return built


def report_fields(panic, command, closed, scope=""):
    """A panic's report fields: its close's (`closed`), or FAILED naming why when the command
    says so (the close or the report failed); either way naming a halt that could not be
    written and the failures on the way (the heartbeat named them meanwhile)."""
    fields = dict(status="FAILED", detail=command.detail, scope=scope) if command.status else dict(closed)
    detail = ("" if panic.halted else "halt_not_written;") + fields.get("detail", "")
    fields["detail"] = detail[:schema.MAX_TEXT] if command.status else detail
    fields["extra"] = dict(fields.get("extra", {}))
    if panic.failures:
        fields["extra"]["failures"] = ";".join(panic.failures)[-1000:]
    return fields


# ------------------------------------------------------------------------------ one close

READ_BACKOFF_S = (0.1, 0.2, 0.5)


def read_retry_s(retry_after_s, attempt):
    """Seconds before the account is read again after a failed read: the venue's Retry-After
    if it gave one, else a short back-off. Unknown is never empty: the read is retried until
    the deadline (and a close that never read reports FAILED)."""
    if retry_after_s is not None:
        return retry_after_s
    return READ_BACKOFF_S[min(attempt, len(READ_BACKOFF_S) - 1)]


def batch_size(venue_batch, limits):
    """Orders per close request: the venue's batch endpoint, never more than the tightest
    order limit lets out at once."""
    return min(venue_batch, min(count for count, _ in limits))


def order_round(errors, pending, outcomes):
    """After one request for the `pending` orders of a batch (outcomes: per order None once
    the exchange accepted it, else (error kind, retry_after_s, text)): fills `errors` (per
    order None or a text) and returns (the orders to send again, the seconds every thread
    pauses or None). A 429/418 is sent again with the SAME client order id after Retry-After
    (the request was refused; a new id would be refused as a duplicate), and every thread
    waits: the limit is per account/IP. Anything else ends that order's attempt and the
    re-read decides: the outcome may be unknown (timeout) or the position changed (-2022). A
    refused order in a batch is treated exactly like a refused single order."""
    again, pause = [], None
    for i, outcome in zip(pending, outcomes):
        if outcome is not None and outcome[0] == "rate_limited":
            again.append(i)
            pause = max(pause or 0.0, outcome[1] or 1.0)
        else:
            errors[i] = None if outcome is None else outcome[2]
    return again, pause


def close_next(account, rules, now, deadline):
    """After every account read: another round (cancel + close) while the read holds anything
    to act on (a closable position, an open order, a row that could not be read: never
    flat) and the deadline is ahead; None (no read) stops too, and close_summary says why."""
    return account is not None and now < deadline and bool(
        account.orders or account.unreadable or flatten.closable(account.positions, rules))


def round_pause(failed_rounds, left_s):
    """Seconds to back off after a round with errors (or an unreadable row): a stuck position
    must not hammer the exchange, but the close keeps trying until the deadline."""
    return min(0.05 * 2 ** failed_rounds, 1.0, left_s)


def close_summary(record, account, rules, cancelled, sent, errors, scope, read_error):
    """The report fields of a close from its last read (None: it failed until the deadline).
    orders_sent/orders_rejected (close orders accepted / refused or failed, this run of the
    close) feed the metrics counters (eexit/metrics.py)."""
    initial = set(record.get("initial") or [])
    extra = {"orders_sent": str(sent), "orders_rejected": str(sum(1 for e in errors if e.startswith("close:")))}
    if errors:
        extra["errors"] = json.dumps(errors[-50:])
    fields = dict(positions_total=len(initial), orders_cancelled=cancelled, attempts=record.get("attempt", 0),
                  scope=scope, extra=extra)
    if account is None:
        # Orders were sent but nothing confirms what happened: not FLAT, not RESIDUAL.
        return dict(fields, status=flatten.FAILED, detail=f"verify_unreadable_until_deadline:{read_error}")
    residual, dust = flatten.classify_residual(account.positions, rules)
    left = {"|".join(flatten.position_key(p)) for p in account.positions}
    detail = f"open_orders_remaining:{len(account.orders)}" if account.orders else ""
    status, rows = flatten.decide_status(account.positions, account.orders), account.unreadable
    if rows:
        # A row whose exposure is unknown: the account was not read whole, never FLAT.
        status, fields["positions_total"] = flatten.FAILED, len(initial) + len(rows)
        more = f";+{len(rows) - 5}_more" if len(rows) > 5 else ""
        detail = " ".join(filter(None, ["position_rows_unreadable:" + ";".join(
            u.describe() for u in rows[:5]) + more, detail]))
    return dict(fields, status=status, positions_closed=len(initial - left), positions_failed=len(left) + len(rows),
                failed_symbols=sorted({p.symbol for p in account.positions} | {u.symbol for u in rows}),
                residual_positions=residual, dust=dust, detail=detail)

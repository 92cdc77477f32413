"""Deterministic fault simulator for the EEW's decisions (eexit/eew_core.py).

    python -m tests.sim --seeds 100000 [--start N] [--legacy [on_error,clean,pending_query]] [--trace SEED]

Each seed builds a schedule from random.Random(seed): panics (authorised, forged, duplicated,
without event_id) published at random moments; one or two workers; Redis transport loss and
command errors before and after every command, a ledger hash that turns WRONGTYPE, a
completed stream that refuses; exchange read errors, refused orders, 429s, partial fills, a
bot re-opening positions, unexpected exchange data (a bug while closing); crashes and restarts
at every command boundary (the ledger, the journal and the pending entries persist); clock
jumps. The REAL core drives every decision (core.start / on_result / on_error, pass_ended,
close_due, pending_query, and tamper.skipped_entries for the stream audit); the World below
performs its commands the way eexit/eew.py's Worker.perform does. After every step the
invariants are checked:

  - never a FLAT report while the account read for it held exposure;
  - every authorised panic ends halted (trading halted: its own halt, or one already standing
    when its own write was refused) with a final report (checked once faults heal);
  - the halt is written (or its write was refused and reported) before the event's first order;
  - at most one final report per event id, ever; exactly one at the end;
  - no entry acknowledged without its report (its own, or its event's final one);
  - the bus-loss timer only grows while the inability lasts (never reset by a lost pass);
  - the stream audit never executes an entry that is pending (it would run twice);
  - no exception escapes the loop.

Each seed also runs close_run: Closer.execute's loop (read -> round -> re-read until flat or
the deadline) over a simulated account, every decision the core's (close_next, round_pause,
close_summary), with its own invariants after every read (see close_run).

A failing seed prints its trace (one line a step) and the command to replay it.

--legacy swaps in the decisions of the code before issue 24 (a model of them: that code was
not sans-I/O, so they are re-stated here in a few lines each, see LEGACY), all or the named
ones: on_error reproduces finding 1 (an authorised panic given up FAILED without a halt),
clean finding 2 (a pass that lost Redis counted as clean), pending_query finding 6 (XPENDING
count len(candidates): a pending panic run again by the audit).
"""

import argparse
import re
import sys
from dataclasses import dataclass, replace
from random import Random

from eexit import eew_core as core
from eexit import flatten, tamper
from eexit.venues.base import MarketRules, Position, UnreadableRow

BUS_LOSS_S = 10.0
IDLE_S = 15.0
SWEEP_S = 5.0
MAX_DELIVERIES = 3
FINAL = ("FLAT", "RESIDUAL", "FAILED")


class RedisDown(Exception):
    """Transport error."""


class RedisRefused(Exception):
    """Command error (WRONGTYPE, NOPERM)."""


class Crash(Exception):
    """The worker process dies here."""


class Bug(Exception):
    """Unexpected data or a bug in the shell while performing a command."""


class Violation(AssertionError):
    pass


@dataclass
class Entry:
    entry_id: str
    event_id: str
    authorised: bool


# ------------------------------------------------------------------------------ legacy decisions

def legacy_on_error(panic, command, kind, detail, deliveries):
    """eexit/eew.py before issue 24 (handle_isolated): a bug on an entry is retried and, after
    EEXIT_MAX_DELIVERIES, reported FAILED with no halt; a command error leaves it pending."""
    failed = replace(panic, failures=panic.failures + (f"{command.do.value}:{kind.value}:{detail}",))
    if kind is core.ErrorKind.BUG and deliveries >= MAX_DELIVERIES and command.do is not core.Do.REPORT_NO_ACTION:
        return replace(failed, stage=core.Stage.REPORTING), [core.Command(core.Do.REPORT_NO_ACTION, "FAILED")]
    return replace(failed, stage=core.Stage.WAITING), []


def legacy_clean(entries, blind, lost):
    """Old iteration(): clean when entries were read and no step was blind, lost or not."""
    return entries is not None and blind is None


def legacy_pending_query(batch_ids, candidate_ids):
    return candidate_ids[0], candidate_ids[-1], len(candidate_ids)


LEGACY = {"on_error": legacy_on_error, "clean": legacy_clean, "pending_query": legacy_pending_query}


# ------------------------------------------------------------------------------ the world

class World:
    """Redis (stream, group, ledger, completed stream, trading state), the exchange account,
    the workers' journals (on disk: they survive crashes), and the fault schedule."""

    def __init__(self, seed, legacy=()):
        self.rng = Random(seed)
        self.legacy = legacy
        self.now = 0.0
        self.step = 0
        self.redis_up = True
        self.ledger_broken = self.completed_broken = False
        self.p_redis = self.rng.choice((0.0, 0.02, 0.08, 0.2))
        self.p_exchange = self.rng.choice((0.0, 0.1, 0.3))
        self.p_crash = self.rng.choice((0.0, 0.02, 0.06))
        self.stream, self.pending, self.delivered = [], {}, 0   # pending: id -> [consumer, since, n]
        self.ledger, self.completed, self.halts, self.reported = {}, [], set(), set()
        self.positions = {f"S{i}": 1.0 for i in range(self.rng.randint(0, 3))}
        self.orders = self.rng.randint(0, 1)
        self.journals = {}
        self.ordered = set()          # events that sent an order
        self.halt_tried = set()       # events whose halt write was attempted
        self.trace = []
        # Handling that keeps failing (a bug on this event's data): its claim or its close
        # raises at every delivery (the simple close, every other time).
        self.poison = {f"ev{self.rng.randint(0, 3)}": self.rng.choice(("claim", "close"))} \
            if self.rng.random() < 0.1 else {}

    def log(self, text):
        self.trace.append(f"{self.step:3d} t={self.now:7.1f} {text}")

    # Redis: one command under the schedule's faults
    def redis(self, name, apply, ledger=False, completed=False):
        if not self.redis_up:
            raise RedisDown(name)
        roll = self.rng.random()
        if roll < self.p_redis / 3:
            self.log(f"redis {name}: transport error before")
            raise RedisDown(name)
        if (ledger and self.ledger_broken) or (completed and self.completed_broken) or roll < self.p_redis / 2:
            self.log(f"redis {name}: command error")
            raise RedisRefused(name)
        result = apply()
        if roll < self.p_redis * 2 / 3:
            self.log(f"redis {name}: applied, reply lost")
            raise RedisDown(name)
        return result

    def ack(self, entry_id):
        if entry_id in self.pending:
            event_id = next(e.event_id for e in self.stream if e.entry_id == entry_id)
            if not any(r["entry_id"] == entry_id or (r["event_id"] == event_id and r["status"] in FINAL)
                       for r in self.completed):
                raise Violation(f"entry {entry_id} acknowledged without its report")
            del self.pending[entry_id]

    def add_report(self, report):
        if report["status"] in FINAL and not report["event_id"].startswith("busloss-"):
            if any(r["event_id"] == report["event_id"] and r["status"] in FINAL for r in self.completed):
                raise Violation(f"second final report for {report['event_id']}")
        self.completed.append(report)
        self.log(f"report {report['event_id']} {report['status']} entry={report['entry_id']}")

    def finish(self, key, entry_id, report):
        """FINISH_LUA: the report unless the record is done or a report stands (the reported
        set), the done record, the XACK; another entry of a finished event gets a DUPLICATE."""
        if not self.halts and not key.startswith("entry:"):
            self.halts.add(key)               # ensure_halted: a final report never without a halt
        record = self.ledger.get(key, {})
        if record.get("stage") == "done":
            if entry_id and record.get("entry") and record["entry"] != entry_id:
                self.add_report(dict(report, status="DUPLICATE"))
                self.ledger[f"entry:{entry_id}"] = {"stage": "done", "entry": entry_id}
        else:
            if key not in self.reported:
                self.reported.add(key)
                self.add_report(report)
            self.ledger[key] = {"stage": "done", "entry": entry_id}
        self.ack(entry_id)

    def publish_direct(self, key, report):
        """REPORT_LUA with an event id: once per event id."""
        if key not in self.reported:
            self.reported.add(key)
            self.add_report(report)
        return True

    def xpending_range(self, low, high, count):
        ids = sorted((i for i in self.pending if tamper.parse_id(low) <= tamper.parse_id(i) <= tamper.parse_id(high)),
                     key=tamper.parse_id)
        return ids[:count]

    # the exchange
    def close(self, event_id, simple):
        """Read, close, re-read (three rounds at most); (status, the last read)."""
        if (self.rng.random() < self.p_exchange / 4 and not simple) or \
                (self.poison.get(event_id) == "close" and (not simple or self.rng.random() < 0.5)):
            raise Bug("unexpected exchange data")
        read = None
        for _round in range(3):
            if self.rng.random() < self.p_exchange:
                read = None
                continue
            read = (dict(self.positions), self.orders)
            if not read[0] and not read[1]:
                break
            self.ordered.add(event_id)
            if not (event_id in self.halts or event_id in self.halt_tried):
                raise Violation(f"order for {event_id} before its halt")
            self.orders = 0
            for symbol in list(self.positions):
                roll = self.rng.random()
                if roll < self.p_exchange / 2:
                    continue                                # refused / 429: the re-read decides
                if roll < self.p_exchange:
                    self.positions[symbol] /= 2             # partial fill
                else:
                    del self.positions[symbol]
            if self.rng.random() < 0.05:
                self.positions["BOT"] = 1.0                 # a bot re-opens after the halt
            read = (dict(self.positions), self.orders) if self.rng.random() >= self.p_exchange else None
        status = flatten.decide_status(None if read is None else list(read[0]), () if read is None else [1] * read[1])
        if status == "FLAT" and read and (read[0] or read[1]):
            raise Violation(f"FLAT for {event_id} with exposure in the read {read}")
        return status


# ------------------------------------------------------------------------------ a worker

class SimWorker:
    def __init__(self, world, name):
        self.world, self.name = world, name
        self.journal = world.journals.setdefault(name, [])   # persisted across crashes
        self.restart()

    def restart(self):
        self.live = core.Liveness(unable_since=self.world.now)
        self.schedule = {}            # Worker.at: timers (core.due)
        self.audited = 0

    def maybe_crash(self, where):
        if self.world.rng.random() < self.world.p_crash:
            self.world.log(f"{self.name} crashes {where}")
            raise Crash(where)

    def journaled(self):
        done = {item["key"] for item in self.journal if item["type"] == "published"}
        return {item["key"] for item in self.journal if item["type"] == "report"} - done

    # one pass of Worker.iteration()
    def one_pass(self):
        w = self.world
        self.blind, self.lost, entries = None, False, None
        try:
            if not w.redis_up:
                raise RedisDown("connect")
            self.publish_journal()
            self.audit()
            entries = self.next_entries()
            for entry in entries:
                if self.lost:
                    break
                self.handle(entry)
        except RedisDown:
            self.lost = True
        except RedisRefused as exc:
            self.blind = f"{exc}"
        clean = (LEGACY["clean"] if "clean" in w.legacy else lambda e, b, lost: e is not None and b is None and not lost)(
            entries, self.blind, self.lost)
        self.end_pass(clean)

    def end_pass(self, clean):
        w, before = self.world, self.live
        outcome = core.PassEnd.CLEAN if clean else core.PassEnd.BLIND if self.blind else core.PassEnd.LOST
        self.live = core.pass_ended(self.live, outcome, w.now, self.blind)
        if self.lost and self.live.unable_since is None:
            raise Violation(f"{self.name}: a pass that lost Redis reset the bus-loss timer")
        if not clean and before.unable_since is not None and self.live.unable_since != before.unable_since:
            raise Violation(f"{self.name}: the bus-loss timer restarted while the inability lasted")
        if core.close_due(self.live, w.now, BUS_LOSS_S):
            self.bus_loss_close(repeat=self.live.next_close is not None)
            self.live = core.closed(self.live, w.now, 5.0)

    def bus_loss_close(self, repeat):
        """OwnAuthority.bus_loss_close: the real core's close on own authority (core.start_own),
        its report to the ledger, else the journal; a repeat that did nothing reports nothing."""
        w = self.world
        event_id = f"busloss-{self.name}-{w.step}"
        w.halt_tried.add(event_id)            # written with the report (Redis may be what is lost)
        w.log(f"{self.name} bus-loss close repeat={repeat}")
        panic = self.drive(*core.start_own(event_id, repeat=repeat))
        if panic.stage is not core.Stage.DONE or (panic.closed_by is None and not panic.failures):
            raise Violation(f"{event_id}: the close on own authority did not run to its end: {panic}")

    def publish_journal(self):
        w = self.world
        for key in sorted(self.journaled()):
            item = next(i for i in reversed(self.journal) if i["type"] == "report" and i["key"] == key)
            w.redis("finish(journal)", lambda: w.finish(key, item["entry_id"], item["report"]), ledger=True)
            if key.startswith("busloss-"):
                w.halts.add(key)
            self.journal.append({"type": "published", "key": key})

    def deliver(self, entry_ids):
        for entry_id in entry_ids:
            record = self.world.pending.setdefault(entry_id, [self.name, self.world.now, 0])
            record[:] = [self.name, self.world.now, record[2] + 1]
        return [e for e in self.world.stream if e.entry_id in entry_ids]

    def next_entries(self):
        """Worker.next_entries: the reads core.entry_reads names, in its order."""
        w = self.world

        def read_new():
            new = [e.entry_id for e in w.stream[w.delivered:w.delivered + 4]]
            w.delivered += len(new)
            return self.deliver(new)
        for read in core.entry_reads(core.due(self.schedule, "sweep", w.now, SWEEP_S)):
            if read is core.Read.OWN:
                own = [i for i, (c, _, _) in w.pending.items() if c == self.name]
                entries = w.redis("xreadgroup 0", lambda: self.deliver(own)) if own else []
            elif read is core.Read.IDLE:
                idle = [i for i, (c, since, _) in w.pending.items()
                        if c != self.name and w.now - since > IDLE_S]
                entries = w.redis("xautoclaim", lambda: self.deliver(idle)) if idle else []
            else:
                return w.redis("xreadgroup >", read_new)
            if entries:
                return entries
        raise Violation("entry_reads ended without a read of new entries")

    def audit(self):
        """Worker.audit_stream: authorised entries the group passed by, neither pending nor
        recorded, are executed from the stream."""
        w = self.world
        batch = w.stream[self.audited:w.delivered]
        if not batch:
            return
        candidates = [(e.entry_id, e, e.event_id) for e in batch if e.authorised]
        if candidates:
            query = LEGACY["pending_query"] if "pending_query" in w.legacy else core.pending_query
            low, high, count = query([e.entry_id for e in batch], [c[0] for c in candidates])
            pending = set(w.redis("xpending", lambda: w.xpending_range(low, high, count)))
            records = w.redis("hmget", lambda: {c[2]: w.ledger.get(c[2]) for c in candidates}, ledger=True)
            for entry_id, entry in tamper.skipped_entries(candidates, pending, records):
                if entry_id in w.pending:
                    raise Violation(f"the audit runs {entry_id}, pending with {w.pending[entry_id][0]}: twice")
                self.handle(entry)
        self.audited = w.delivered

    # one entry: the real core, commands performed here
    def handle(self, entry):
        self.drive(*core.start(entry.event_id, entry.entry_id, entry.authorised,
                               journaled=entry.event_id in self.journaled()))

    def drive(self, panic, commands):
        """Entries.drive: perform the core's commands, feeding each result or error back."""
        job = {"status": None}
        while commands:
            command, commands = commands[0], commands[1:]
            self.maybe_crash(f"before {command.do.value} of {panic.event_id}")
            try:
                result = self.perform(panic, command, job)
            except RedisDown:
                self.lost = True
                panic, more = core.on_error(panic, command, core.ErrorKind.TRANSPORT, "down")
            except (RedisRefused, Bug) as exc:
                kind = core.ErrorKind.COMMAND if isinstance(exc, RedisRefused) else core.ErrorKind.BUG
                if kind is core.ErrorKind.COMMAND:
                    self.blind = self.blind or str(exc)
                if "on_error" in self.world.legacy:
                    deliveries = self.world.pending.get(panic.entry_id, [0, 0, 0])[2]
                    panic, more = LEGACY["on_error"](panic, command, kind, type(exc).__name__, deliveries)
                else:
                    panic, more = core.on_error(panic, command, kind, type(exc).__name__)
            else:
                panic, more = core.on_result(panic, command, result)
            self.maybe_crash(f"after {command.do.value} of {panic.event_id}")
            commands = more + commands
        return panic

    def perform(self, panic, command, job):
        w, do, event_id, entry_id = self.world, command.do, panic.event_id, panic.entry_id
        if do is core.Do.CLAIM:
            if w.poison.get(event_id) == "claim":
                raise Bug("unexpected record")

            def claim():
                record = w.ledger.get(event_id)
                if record is None:
                    w.ledger[event_id] = {"entry": entry_id, "stage": "claimed"}
                    return core.Claim.NEW
                if record["entry"] != entry_id:
                    return core.Claim.DUPLICATE
                return core.Claim.DONE if record["stage"] == "done" else core.Claim.RESUME
            return w.redis("claim", claim, ledger=True)
        if do is core.Do.WRITE_HALT:
            w.halt_tried.add(event_id)
            return w.redis("halt", lambda: w.halts.add(event_id))
        if do in (core.Do.CLOSE, core.Do.SIMPLE_CLOSE):
            ordered = event_id in w.ordered
            job["status"] = w.close(event_id, simple=do is core.Do.SIMPLE_CLOSE)
            return {"status": job["status"], "attempts": int(event_id in w.ordered and not ordered)}
        if do is core.Do.REPORT:
            if not command.status and w.rng.random() < w.p_exchange / 5:
                raise Bug("report fields")
            return self.finish_report(event_id, entry_id, command.status or job["status"])
        if do is core.Do.REPORT_NO_ACTION:
            report = {"event_id": event_id, "status": command.status, "entry_id": entry_id}
            return w.redis("finish(entry)", lambda: w.finish(f"entry:{entry_id}", entry_id, report), ledger=True)
        if do is core.Do.ACK:
            return w.redis("xack", lambda: w.ack(entry_id))
        if do is core.Do.TOUCH:
            return w.redis("xclaim", lambda: w.pending.get(entry_id, [0, 0, 0]).__setitem__(1, w.now))

        def reject():
            w.add_report({"event_id": event_id, "status": "REJECTED", "entry_id": entry_id})
            w.ack(entry_id)
        return w.redis("reject", reject, completed=True)

    def finish_report(self, event_id, entry_id, status):
        """Worker.finish_report: ledger, else journal (+ straight onto the stream when Redis
        refuses rather than being away)."""
        w = self.world
        report = {"event_id": event_id, "status": status, "entry_id": entry_id}
        try:
            w.redis("finish", lambda: w.finish(event_id, entry_id, report), ledger=True, completed=True)
            if entry_id is None:
                w.halts.add(event_id)         # own authority: the halt is written with the report
            return "ledger"
        except RedisDown:
            self.lost, published = True, False
        except RedisRefused:
            self.blind = self.blind or "finish"
            try:
                published = w.redis("direct", lambda: w.publish_direct(event_id, report), completed=True)
            except (RedisDown, RedisRefused):
                published = False
        self.journal.append({"type": "report", "key": event_id, "entry_id": entry_id, "report": report,
                             "published": published})
        return "direct" if published else "journal"


# ------------------------------------------------------------------------------ one close

@dataclass
class Read:
    """One account read as eexit/eew.py's Account holds it."""
    positions: list
    orders: list
    unreadable: list


CLOSE_RULES = {f"S{i}": MarketRules(f"S{i}", f"S{i}", 0.01, 0.1, None, None, None, 1.0) for i in range(4)}


def close_run(seed):
    """Closer.execute's loop over a simulated account, every decision the core's (close_next,
    round_pause, close_summary): reads that fail (now and then until the deadline), closes
    refused / rate-limited / partly filled, open orders, a bot re-opening, a row that cannot
    be read (and may become readable), positions below the minimum quantity (dust), a clock
    the exchange's latency and the pauses advance. After every read: the loop stops only
    with nothing closable left, no order, no unreadable row, or at the deadline. At the end:
    FLAT only over an empty last read, an unreadable row or a failed read never FLAT, the
    counts consistent. Returns (ok, trace, why) like run()."""
    rng, trace, now, deadline = Random(seed), [], 0.0, 30.0
    positions = {f"S{i}": rng.choice((0.05, 0.5, 2.0)) for i in range(rng.randint(0, 4))}
    rows, orders = {"ROW"} if rng.random() < 0.2 else set(), rng.randint(0, 2)
    p_fail, exchange_down = rng.choice((0.0, 0.1, 0.3)), rng.random() < 0.05

    def read():
        nonlocal now
        for attempt in range(10_000):                       # Closer.read_account retries
            now += rng.choice((0.025, 0.1, 0.5, 5.0))       # 5 s: a timeout
            if not exchange_down and rng.random() >= p_fail:
                held = [Position(s, s, "long", q, "BOTH", 1.0) for s, q in sorted(positions.items())]
                return Read(held, [object()] * orders, [UnreadableRow("swap", r, "pos_missing") for r in rows])
            wait = core.read_retry_s(rng.choice((None, None, 1.0, 30.0)), attempt)   # a 429's Retry-After
            if not 0 < wait <= 30.0:
                raise Violation(f"read retry in {wait}s")
            if now + wait > deadline:
                return None
            now += wait
        raise Violation("the read never ends")

    def send(symbols):
        """Closer._close: one batch, 429s sent again as core.order_round says."""
        nonlocal now
        errors, pending = ["rate_limited:retries_exhausted"] * len(symbols), list(range(len(symbols)))
        for _ in range(8):                                  # MAX_RATE_RETRIES
            if not pending:
                break
            failures = [None] * 3 + [("rate_limited", rng.choice((None, 0.5)), "rate_limited:429"),
                                     ("rejected", None, "rejected:-2022")]
            outcomes = [rng.choice(failures) if rng.random() < p_fail else None for _ in pending]
            sent, (pending, pause) = list(pending), core.order_round(errors, pending, outcomes)
            for i, outcome in zip(sent, outcomes):
                limited = outcome is not None and outcome[0] == "rate_limited"
                if limited != (i in pending) or (not limited and errors[i] != (outcome and outcome[2])):
                    raise Violation(f"order_round: {outcome} -> sent again {i in pending}, error {errors[i]}")
                if limited and (pause is None or pause < (outcome[1] or 1.0)):
                    raise Violation(f"order_round pauses {pause} under a Retry-After of {outcome[1]}")
            now += pause or 0.0
        return dict(zip(symbols, errors))

    def check(account, why):
        if account is not None and now < deadline and not core.close_next(account, CLOSE_RULES, now, deadline) \
                and (orders or rows or flatten.closable(account.positions, CLOSE_RULES)):
            raise Violation(f"the close stopped with work left and time ahead ({why})")

    try:
        record = {"attempt": 0}
        account = read()
        trace.append(f"t={now:5.2f} read {account}")
        if account is not None:
            record["initial"] = sorted("|".join(flatten.position_key(p)) for p in account.positions)
        failed_rounds, errors = 0, []
        while core.close_next(account, CLOSE_RULES, now, deadline):
            record["attempt"] += 1
            failed = []
            orders = 0 if rng.random() >= p_fail else orders          # cancel-all
            placeable = [symbol for symbol in positions if not flatten.unplaceable(
                Position(symbol, symbol, "long", positions[symbol], "BOTH", 1.0), CLOSE_RULES.get(symbol))]
            for symbol, error in send(placeable).items():               # dust: no order can take it
                if error is not None:
                    failed.append(f"close:{symbol}:{error}")
                elif rng.random() < p_fail:
                    positions[symbol] = round(positions[symbol] / 2, 2)   # partial fill
                else:
                    del positions[symbol]
            if rows and rng.random() < 0.3:
                rows.clear()
                positions["ROW"] = 1.0                         # the row reads again: a position
            if rng.random() < 0.05:
                positions["BOT"], orders = 1.0, orders + 1     # a bot re-opens after the halt
            errors += failed
            trace.append(f"t={now:5.2f} round {record['attempt']}: left {positions} orders={orders} rows={rows}")
            if failed or account.unreadable:
                failed_rounds += 1
                pause = core.round_pause(failed_rounds, deadline - now)
                if pause > max(0.0, deadline - now) + 1e-9 or pause > 1.0:
                    raise Violation(f"pause {pause} past the deadline or over a second")
                now += max(0.0, pause)
            account = read()
            trace.append(f"t={now:5.2f} read {account}")
            check(account, f"round {record['attempt']}")
            if record["attempt"] > 10_000:
                raise Violation("the close never ends")
        check(account, "first read")
        fields = core.close_summary(record, account, CLOSE_RULES, 0, 0, errors, "sim", "timeout")
        trace.append(f"summary {fields['status']} {fields.get('detail')}")
        if fields["status"] == flatten.FLAT and (account is None or account.positions or account.orders
                                                 or account.unreadable):
            raise Violation(f"FLAT over the read {account}")
        if account is not None and account.unreadable and (
                fields["status"] != flatten.FAILED or fields["positions_failed"] < len(account.unreadable)):
            raise Violation(f"an unreadable row reported {fields['status']} failed={fields['positions_failed']}")
        if account is not None and fields["positions_closed"] > fields["positions_total"]:
            raise Violation(f"closed {fields['positions_closed']} of {fields['positions_total']}")
    except Violation as exc:
        return False, trace, str(exc)
    except Exception as exc:  # noqa: BLE001 - the invariant "no exception escapes"
        return False, trace, f"exception escaped: {type(exc).__name__}: {exc}"
    return True, trace, ""


# ------------------------------------------------------------------------------ one schedule

def run(seed, legacy=(), steps=40):
    """Run one seed; returns (ok, trace, why)."""
    w = World(seed, legacy)
    workers = [SimWorker(w, "a")] + ([SimWorker(w, "b")] if w.rng.random() < 0.4 else [])
    events = []
    for number in range(w.rng.randint(1, 4)):
        kind = w.rng.random()
        event_id = f"ev{number}" if kind > 0.1 else ""
        if kind > 0.85 and events:
            event_id = events[-1][0] or "ev0"            # a duplicate
        events.append((event_id, kind > 0.15))           # 15% forged
    try:
        for w.step in range(steps):
            roll = w.rng.random()
            if events and roll < 0.2:
                event_id, authorised = events.pop(0)
                entry_id = f"{len(w.stream) + 1}-0"
                w.stream.append(Entry(entry_id, event_id or f"entry-{entry_id}", authorised))
                w.log(f"publish {entry_id} {event_id or '(no event_id)'} authorised={authorised}")
            elif roll < 0.27:
                w.redis_up = not w.redis_up
                w.log(f"redis {'up' if w.redis_up else 'down'}")
            elif roll < 0.30:
                w.ledger_broken = not w.ledger_broken
                w.log(f"ledger {'WRONGTYPE' if w.ledger_broken else 'repaired'}")
            elif roll < 0.32:
                w.completed_broken = not w.completed_broken
                w.log(f"completed stream {'refusing' if w.completed_broken else 'repaired'}")
            elif roll < 0.34:
                w.positions["BOT"] = 1.0
                w.log("a bot opens a position")
            w.now += w.rng.choice((0.1, 0.5, 1.0, 3.0, 30.0))      # 30 s: a clock jump / stall
            step_workers(w, workers)
        w.redis_up, w.ledger_broken, w.completed_broken, w.p_redis, w.p_crash = True, False, False, 0.0, 0.0
        w.p_exchange = 0.0
        w.log("faults heal")
        for w.step in range(steps, steps + 12):
            if events:
                event_id, authorised = events.pop(0)
                entry_id = f"{len(w.stream) + 1}-0"
                w.stream.append(Entry(entry_id, event_id or f"entry-{entry_id}", authorised))
            w.now += SWEEP_S + IDLE_S
            step_workers(w, workers)
        final_checks(w)
    except Violation as exc:
        return False, w.trace, str(exc)
    except Exception as exc:  # noqa: BLE001 - the invariant "no exception escapes the loop"
        return False, w.trace, f"exception escaped: {type(exc).__name__}: {exc}"
    return True, w.trace, ""


def step_workers(w, workers):
    for worker in workers:
        try:
            worker.one_pass()
        except Crash:
            worker.restart()


def final_checks(w):
    for entry in w.stream:
        if not entry.authorised:
            continue
        finals = [r for r in w.completed if r["event_id"] == entry.event_id and r["status"] in FINAL]
        if len(finals) != 1:
            raise Violation(f"authorised {entry.event_id}: {len(finals)} final reports")
        if entry.event_id not in w.halts and not (entry.event_id in w.halt_tried and w.halts):
            raise Violation(f"authorised {entry.event_id} ended without a halt ({finals[0]['status']})")
    if w.pending:
        raise Violation(f"entries left pending after the faults healed: {sorted(w.pending)}")


def explore(seeds, start=0, legacy=()):
    """[(seed, why, trace)] of the failing seeds."""
    failures = []
    for seed in range(start, start + seeds):
        ok, trace, why = run(seed, legacy)
        if ok and not legacy:
            ok, trace, why = close_run(seed)
        if not ok:
            failures.append((seed, why, trace))
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--legacy", nargs="?", const=",".join(LEGACY), default="",
                        help="the decisions before issue 24: all, or a comma list of " + ",".join(LEGACY))
    parser.add_argument("--trace", type=int, help="print one seed's trace")
    args = parser.parse_args(argv)
    args.legacy = tuple(name for name in args.legacy.split(",") if name)
    unknown = set(args.legacy) - set(LEGACY)
    if unknown:
        parser.error(f"--legacy: unknown {','.join(sorted(unknown))}")
    if args.trace is not None:
        ok, trace, why = run(args.trace, args.legacy)
        if ok and not args.legacy:
            ok, trace, why = close_run(args.trace)
        print("\n".join(trace))
        print("OK" if ok else f"VIOLATION: {why}")
        return 0 if ok else 1
    failures = explore(args.seeds, args.start, args.legacy)
    kinds = {}
    for seed, why, _trace in failures:
        kinds.setdefault(re.sub(r"\bev\d+|\b\d+-0\b|^[ab]: ", "*", why)[:70], []).append(seed)
    print(f"{args.seeds} seeds from {args.start}: {len(failures)} failed")
    for why, seeds in sorted(kinds.items(), key=lambda item: -len(item[1])):
        print(f"  {len(seeds):6d}  {why}  seeds {seeds[:8]}")
    if failures:
        seed, why, trace = failures[0]
        print(f"\nfirst failure, seed {seed}: {why}\n" + "\n".join(trace[-30:]))
        print(f"replay: python -m tests.sim --trace {seed}" + (f" --legacy {','.join(args.legacy)}" if args.legacy else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

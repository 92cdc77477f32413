"""The Emergency Exit Worker: `python -m eexit.eew`.

Consumes `system:panic_close` in group `emergency_exit_worker` and, for each entry:

    authorise -> claim the event_id -> halt trading -> read the account fresh
    -> cancel all orders + close all positions (concurrent, paced, reduce-only)
    -> re-read, repeat until flat or the deadline -> report -> acknowledge

Reading order
    Config                   every knob, from the environment (ConfigError -> exit 2)
    authorise / event ids    pure decisions about one entry
    Ledger                   the idempotency record `system:panic_close:processed` and the
                             atomic "write report + mark done + XACK" script
    Journal                  local append-only outbox for reports Redis could not take
    Pacer, ExchangePool      order pacing and one ccxt client per worker thread
    Closer                   one panic against the exchange -> CompletionReport
    Job, Entries             one entry: eexit/eew_core.py decides, Entries.perform acts
    LostPanics               lost-panic checks (eexit/tamper.py), resume requests (eexit/resume.py)
    OwnAuthority             the bus-loss close and the halt guard: closes on own authority,
                             through the same core transitions as a panic (core.start_own)
    Worker                   the loop: iteration() does one pass, run() repeats it; whether a
                             pass was clean, and the bus-loss timer, is core.Liveness; its
                             timers are one schedule (Worker.at, core.due); every Redis error
                             is classified in one place (Worker.redis_failed)
    main()

Idempotency. The hash `system:panic_close:processed` maps each executed event_id to a JSON
record {entry, consumer, stage, attempt, ts_started, initial, ...}. The record is created
with HSETNX after authorisation, so exactly one stream entry owns an event_id: a redelivery
of that entry (crash, restart, claim by another instance) resumes it; any other entry with
the same event_id gets a DUPLICATE report naming the owner and no exchange action. The final
report, the record's stage "done" and the XACK are written by one Lua script: a report is
never written twice and an entry is never acknowledged without its report. The set
eexit:eew:reported holds every event id with a final report, so a report published straight
onto the stream while the ledger refused (fail-closed handling, below) is not written again. DUPLICATE entries
are recorded under the field "entry:<stream id>" with the same script, so their redelivery
does not repeat the report either. A missing event_id is "entry-<stream id>": deterministic,
never random. Unauthorised entries claim nothing, so a forger cannot pre-empt a real event_id.

Not relying on the group (issue 14: ACLs cannot scope consumer groups or XADD's options).
Every claimed event_id is also in the set eexit:eew:inflight until its final report; the
ledger sweep resumes a record there that is not final while its entry is not pending (an
XACK mid-close, a deletion, a restart). The stream audit executes authorised entries the
group passed by without a record (a NOACK read, a group pre-created at `$`). The tamper
check closes on own authority when panics were removed before delivery or the stream can take
no entry. A DUPLICATE of a record that is not final triggers the sweep at once.

Floods. A batch (READ_BATCH entries) is screened locally first (signature before any schema
parse); authorised entries run, then all rejected ones get ONE report and their XACK in one
script, and leave no ledger field. Behind a backlog longer than a batch the newest batch is
screened too, so a real panic does not wait for thousands of forgeries ahead of it; its turn
in the group later finds its record done.

Where the group starts. A group created on a new (or group-less) stream starts at "0", the
beginning of the stream: a panic published before the EEW ever ran, or while its group was
lost, is still executed (fail-closed). Replaying history is cheap and harmless because every
entry already handled finds its own "done" record and is only acknowledged.

Threads. ccxt's sync client keeps per-request state (session, last response headers that
hold Retry-After), so clients are not shared: the pool holds one client per worker thread,
built on demand and handed out most-recently-used first, all sharing (by reference) the
markets loaded once at start-up and one TLS context (exchange.tls_context). Every supported
venue signs with a timestamp + HMAC, no nonce sequence, so parallel clients on one key are fine.

Warm connections (issue 18). Right after the markets load, and every
EEXIT_EXCHANGE_KEEPALIVE_S (20 s) after that, the pool sends one public server-time request on
each of as many connections as one close round uses (warm_connections: every account read at
once, or the batches of the first order window: 60 on Binance, 9 on Bybit, 10 on OKX), so a
panic meets open TLS connections instead of 60 handshakes. Closes go out in the venue's batch
endpoint (5 / 10 / 20 orders a request), each order paced as one order; a refused order in a
batch is handled exactly like a refused single order. The deadline grows with the work:
EEXIT_CLOSE_DEADLINE_S plus the time the order limits need for the positions found
(close_deadline_s). The account read is NOT started concurrently with the halt write: the
Worker writes the halt first and the Closer starts after it, which keeps "halt before any
cancel or close" without an ordering argument about two concurrent requests.

Which books get a cancel. Every (symbol, book) in which the fresh read (both books) saw an
open order gets that book's cancel-all; a symbol's other, empty book and a symbol with a
position but no order seen get none: a blind cancel there finds nothing the read did not, while
it costs up to two requests per position on the critical path (N = 50: +100 requests, several
latencies). An order placed after the read (a bot ignoring the halt) is seen by the verifying
read that follows every attempt, and the loop does not end while any order is open: the next
attempt cancels it.

Concurrency with cancels. Cancels and closes of one attempt run in parallel: closes are
reduce-only (hedge mode: the venue's position side, which never lets them exceed it), so a
resting order filling meanwhile cannot make a close open exposure; the re-read after every
attempt catches whatever the race left, and the next attempt cancels again.

Bus loss and blindness. If the EEW cannot do its job continuously for longer than
EEXIT_BUS_LOSS_CLOSE_S, whether Redis is unreachable (transport errors) or answers with
command errors on reading, claiming, recording or reporting panics (NOPERM, WRONGTYPE: the
EEW is "blind"), the whole safety chain is blind: the EEW flattens on its own authority
(event_id "busloss-<consumer>-<ms>"), halts, journals the report, and publishes it once Redis
takes it. The timer measures continuous inability; a reconnect alone does not restart it.
While the inability lasts the close repeats every EEXIT_HALT_GUARD_S (a bot may reopen while
nobody watches); a repeat that found nothing to do writes no report. Command errors are
logged once (redis_command_error) and never cause a reconnect.

Halt guard. While system:state:trading says halted, the EEW holding the lease
eexit:eew:guard:lease reads the whole account every EEXIT_HALT_GUARD_S and takes any exposure
flat through the same Closer, reporting it as its own event (guard-<consumer>-<ms>, reason
HALT_VIOLATION or RESIDUAL_RETRY); EEXIT_HALT_GUARD_POLICY=alert reports and sends nothing.
Decisions: eexit/guard_policy.py; shell: Worker.halt_guard; status: the hash eexit:eew:guard.

Fail-closed handling (eexit/eew_core.py decides, Worker.drive performs). Whatever fails while
handling an authorised panic (a bug, a Redis command error, unexpected exchange data), the EEW
halts (or keeps the halt), closes by the simplest path, reports what it could, and names the
event in its heartbeat (panic_unreported:<event_id>) until a final report stands. A report the
ledger refuses goes straight onto the completed stream and into the journal, which later marks
it done and acknowledges without writing it twice. Only an entry that is NOT authorised and
whose rejection fails EEXIT_MAX_DELIVERIES times gets FAILED without any action. A journal
line that cannot be used is quarantined (<journal>.quarantine), never fatal.

Exchange key. markets load from public endpoints, so a private read-only call (the balance)
runs every EEXIT_ACCOUNT_CHECK_S; a refused key makes the heartbeat DEGRADED with
degraded_reason=exchange_authentication. Panics are still halted and attempted.

systemd. Before READY=1 the preflight (eexit/daemon.py) checks Redis's version and the ACL
(exit 2 naming the command and user). READY=1 once Redis answers, the markets are loaded, the
first round of warm connections is open and the first pass (journal, lost-panic checks,
pending entries) is done: a panic published at READY=1 meets a worker that can act at once;
WATCHDOG=1 only from the loop (and between close attempts, which are loop progress), blocking
reads at most half of WatchdogSec; EEXIT_EXCHANGE_TIMEOUT_MS must be below half of it (exit 2).
A blind EEW stops WATCHDOG=1 once its close on own authority has run (see Worker).
"""

import collections
import itertools
import json
import os
import socket
import sys
import threading
import time
import traceback
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from . import bus, daemon, exchange, flatten, guard_policy, resume, schema, signing, tamper
from . import eew_core as core
from .config import ConfigError, env_str, setting, settings
from .heartbeat import Heartbeat, wall_ms
from .log import Logger
from .notify import Notifier

log = Logger("eew")

SERVICE_ID = "emergency_exit_worker"
BUS_LOSS_REASON = "BUS_LOST"
MAX_RATE_RETRIES = 8          # 429s for one order inside one attempt before the re-read decides
KEEPALIVE_S = 0.5           # while a close attempt runs: ping the watchdog, keep our entry fresh
# Harmless probes for the preflight, queued inside MULTI and DISCARDed: Redis checks each
# queued command against the ACL, so a NOPERM names what the EEW may not do. One per command
# the EEW uses, on the key it uses it on.
_PANIC, _GROUP, _STATE = schema.PANIC_STREAM, schema.EEW_GROUP, schema.TRADING_STATE_KEY
PROBES = (
    ("XREADGROUP", "GROUP", _GROUP, "preflight", "COUNT", "1", "STREAMS", _PANIC, ">"), ("XACK", _PANIC, _GROUP, "0-1"),
    ("XPENDING", _PANIC, _GROUP, "IDLE", "1", "-", "+", "1"), ("XCLAIM", _PANIC, _GROUP, "preflight", "0", "0-1"),
    ("XGROUP", "CREATE", _PANIC, _GROUP, "0", "MKSTREAM"), ("EVALSHA", "0" * 40, "0"), ("SCRIPT", "LOAD", "return 0"),
    ("HSETNX", schema.PROCESSED_KEY, "preflight", "x"), ("HGET", schema.PROCESSED_KEY, "preflight"),
    ("HSET", _STATE, "f", "v"), ("HDEL", _STATE, "f"), ("EXISTS", _STATE), ("TIME",),
    ("XADD", schema.COMPLETED_STREAM, "*", "f", "v"), ("XADD", schema.EEW_HEARTBEAT_STREAM, "*", "f", "v"),
    ("EVALSHA", "0" * 40, "1", schema.GUARD_LEASE_KEY), ("HSET", schema.GUARD_KEY, "f", "v"),
    ("HGETALL", schema.GUARD_KEY), ("HGETALL", _STATE),
    # lost panics (eexit/tamper.py) and resume requests (eexit/resume.py)
    ("XINFO", "STREAM", _PANIC), ("XINFO", "GROUPS", _PANIC), ("XRANGE", _PANIC, "-", "+", "COUNT", "1"),
    ("SMEMBERS", "eexit:eew:inflight"), ("SREM", "eexit:eew:inflight", "x"), ("SADD", "eexit:eew:reported", "x"), ("SISMEMBER", "eexit:eew:reported", "x"), ("EVALSHA", "0" * 40, "1", "eexit:eew:reported"), ("HMGET", schema.PROCESSED_KEY, "x"),
    ("XREAD", "COUNT", "1", "STREAMS", resume.REQUEST_STREAM, "0"),
    ("XADD", resume.VERDICT_STREAM, "*", "f", "v"), ("XADD", resume.OPS_AUDIT_STREAM, "*", "f", "v"))
PACING_MARGIN_S = 0.1
# Venues and their load balancers drop kept-alive connections idle for about a minute or
# more; a ping every 20 s keeps the warm ones well inside that (0 disables it).
DEFAULT_KEEPALIVE_S = 20
REPORTED_KEY = "eexit:eew:reported"   # event ids with a final report (once per id, ledger or not)
READ_BATCH = 512                      # entries per read: a flood costs O(1) round trips per batch
REJECTED_IDS_SHOWN = 20               # entry ids a rejection summary names
RESUME_READ_S = 5.0                   # the account read behind a resume verdict
SIMPLE_CLOSE_ATTEMPT = 1000           # the fail-closed close's first attempt number


# ------------------------------------------------------------------------------ config

def guard_interval(seconds):
    """0 disables the halt guard; otherwise at least MIN_INTERVAL_S (each check is a full
    account read against the venue's request-weight budget)."""
    if 0 < seconds < guard_policy.MIN_INTERVAL_S:
        raise ConfigError(f"EEXIT_HALT_GUARD_S={seconds:g} is below {guard_policy.MIN_INTERVAL_S:g} "
                          "(0 disables the guard)")
    return seconds


@dataclass(frozen=True, repr=False)     # no repr: the keyring and the exchange credentials never reach a log
class Config:
    """Every knob, read once from the environment (ConfigError -> exit 2); each one's meaning
    is a row of docs/CONFIG.md. The settings are one table; the fields after them are read by
    from_env because their defaults depend on the environment (the state directory, the venue)
    or they come from elsewhere (the Redis URL, the exchange, the keyring)."""
    close_deadline_s: float = setting("EEXIT_CLOSE_DEADLINE_S", 30.0, 1, 3600)
    claim_idle_ms: int = setting("EEXIT_CLAIM_IDLE_MS", 15000, 100, 3_600_000)
    sweep_interval_s: float = setting("EEXIT_SWEEP_INTERVAL_S", 5.0, 0.05, 3600)
    bus_loss_close_s: float = setting("EEXIT_BUS_LOSS_CLOSE_S", 10.0, 0, 3600)
    concurrency: int = setting("EEXIT_CLOSE_CONCURRENCY", 64, 1, 256)
    block_ms: int = setting("EEXIT_BLOCK_MS", 1000, 10, bus.BLOCK_MS_MAX)
    heartbeat_interval_s: float = setting("EEXIT_HEARTBEAT_INTERVAL_S", 1.0, 0.05, 60)
    account_check_s: float = setting("EEXIT_ACCOUNT_CHECK_S", 60.0, 1, 3600)
    keepalive_s: float = setting("EEXIT_EXCHANGE_KEEPALIVE_S", float(DEFAULT_KEEPALIVE_S), 0, 3600)
    max_deliveries: int = setting("EEXIT_MAX_DELIVERIES", 3, 1, 100)
    halt_guard_s: float = setting("EEXIT_HALT_GUARD_S", 5.0, 0, 3600, check=guard_interval)
    resume_cooldown_s: float = setting("EEXIT_RESUME_COOLDOWN_S", 300.0, 0, 86400)
    # Only issuers that exist: a typo ("watchdgo") would otherwise reject the real watchdog's panics.
    authorized_sources: tuple = setting("EEXIT_AUTHORIZED_SOURCES", schema.KNOWN_ISSUERS,
                                        choices=schema.KNOWN_ISSUERS)
    halt_guard_policy: str = setting("EEXIT_HALT_GUARD_POLICY", "enforce", choices=guard_policy.POLICIES)
    consumer: str = setting("EEXIT_CONSUMER", socket.gethostname())      # default: this host's name
    journal_path: str = None
    order_limits: tuple = None          # ((orders, window_s), ...)
    redis_url: str = None
    exchange_config: exchange.ExchangeConfig = None
    keyring: signing.KeyRing = None

    @classmethod
    def from_env(cls, env=None):
        read = settings(cls, env)
        # systemd's StateDirectory=eexit sets STATE_DIRECTORY (/var/lib/eexit): the default lives there.
        state_dir = env_str("STATE_DIRECTORY", "/var/lib/eexit", env).split(":")[0]
        journal_path = env_str("EEXIT_JOURNAL", os.path.join(state_dir, "eew-journal.jsonl"), env)
        try:
            with open(journal_path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            # Refuse to start: without a journal a bus-loss report could not be kept.
            raise ConfigError(f"EEXIT_JOURNAL={journal_path!r} cannot be opened for append: "
                              f"{exc.strerror}") from None
        exchange_config = exchange.ExchangeConfig.from_env(env)
        return replace(
            read, journal_path=journal_path, order_limits=parse_order_limits(env_str(
                "EEXIT_ORDER_LIMITS", exchange.default_order_limits(exchange_config.exchange_id), env)),
            redis_url=bus.redis_url(env), exchange_config=exchange_config, keyring=signing.load_keys(env))


def parse_order_limits(text):
    """"300/10,1200/60" -> ((300, 10.0), (1200, 60.0)): at most N orders in any S seconds."""
    limits = []
    for item in text.split(","):
        count, _, window = item.strip().partition("/")
        try:
            limit = (int(count), float(window))
        except ValueError:
            raise ConfigError(f"EEXIT_ORDER_LIMITS item {item.strip()!r} is not orders/seconds") from None
        if limit[0] < 1 or not 0 < limit[1] <= 3600:
            raise ConfigError(f"EEXIT_ORDER_LIMITS item {item.strip()!r} is out of range")
        limits.append(limit)
    return tuple(limits)


# ------------------------------------------------------------------------------ pure decisions

def pacing_wait(sent, now, limits, margin_s=PACING_MARGIN_S):
    """Seconds until one more order keeps every limit: for each (count, window), the count-th
    most recent send must be older than the window (plus a margin for network jitter). `sent`
    holds send times, oldest first."""
    wait = 0.0
    for count, window_s in limits:
        if len(sent) >= count:
            wait = max(wait, sent[-count] + window_s + margin_s - now)
    return wait


def rate_floor_s(orders, limits, margin_s=PACING_MARGIN_S):
    """The least time the limits need to let `orders` orders out (a burst of `count` per window
    at once, sliding): the last order waits (orders-1)//count whole windows."""
    if orders <= 0:
        return 0.0
    return max(((orders - 1) // count) * (window_s + margin_s) for count, window_s in limits)


def close_deadline_s(base_s, positions, limits):
    """A panic's deadline: EEXIT_CLOSE_DEADLINE_S for the work itself plus the time the order
    limits force on `positions` closes. A fixed deadline below the floor (30 s holds 900
    closes at 300 / 10 s) would end a large account RESIDUAL with the exchange still willing."""
    return base_s + rate_floor_s(positions, limits)


def warm_connections(segments, books, batch, limits, concurrency):
    """Connections one close round uses at once: every read of the account (positions per
    segment, each book per segment) and the batches the first order window lets out."""
    first_window = min(count for count, _ in limits)
    return min(concurrency, max(len(segments) * (1 + len(books)), -(-first_window // batch)))


def _pairs(fields):
    return [item for name_value in fields.items() for item in name_value]


def authorise(fields, authorized_sources, keyring):
    """(ok, reason) for an entry's decoded fields. Cheap (no schema parse: a forgery costs one
    HMAC at most). Refuses a field or name over schema.MAX_TEXT (a cut event_id would share
    its ledger record with another event, which is then DUPLICATE and never closes), then
    checks the claimed issuer, then its signature when keys are configured."""
    too_long = next((name for name, value in fields.items()
                     if len(name) > schema.MAX_TEXT or len(value) > schema.MAX_TEXT), None)
    if too_long is not None:
        return False, f"too_long:{too_long[:64]}"
    issuer = fields.get("issued_by") or fields.get("source") or ""
    if issuer not in authorized_sources:
        return False, f"unauthorized_issuer:{issuer or '(none)'}"
    signed, why = signing.verify_fields(fields, keyring)
    if not signed:
        return False, f"bad_signature:{why}"
    return True, why


# ------------------------------------------------------------------------------ ledger (Redis)

# KEYS: processed hash, completed stream, panic stream, in-flight set, reported set.
# ARGV: field, done-record JSON, group, entry id ("" for none), then report field/value pairs.
# Writes the report only if the field is not already "done" and no report of it stands (the
# reported set: a report published straight onto the stream while the ledger refused, see
# REPORT_LUA); always acknowledges the entry and takes the field out of the in-flight set. An
# entry whose event another entry finished gets its own report, as a DUPLICATE: no entry is
# acknowledged without a report.
FINISH_LUA = """
redis.call('SREM', KEYS[4], ARGV[1])
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  local ok, rec = pcall(cjson.decode, existing)
  if ok and type(rec) == 'table' and rec['stage'] == 'done' then
    if ARGV[4] ~= '' and type(rec['entry']) == 'string' and rec['entry'] ~= ARGV[4] then
      for i = 5, #ARGV - 1, 2 do if ARGV[i] == 'status' then ARGV[i + 1] = 'DUPLICATE' end end
      redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
      redis.call('HSET', KEYS[1], 'entry:' .. ARGV[4], cjson.encode({entry = ARGV[4], stage = 'done', status = 'DUPLICATE'}))
    end
    if ARGV[4] ~= '' then redis.call('XACK', KEYS[3], ARGV[3], ARGV[4]) end
    return {0, tostring(rec['report'] or '')}
  end
end
local id = ''
if redis.call('SISMEMBER', KEYS[5], ARGV[1]) == 0 then
  id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
  redis.call('SADD', KEYS[5], ARGV[1])
end
local rec = cjson.decode(ARGV[2])
rec['report'] = id
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
if ARGV[4] ~= '' then redis.call('XACK', KEYS[3], ARGV[3], ARGV[4]) end
return {id ~= '' and 1 or 0, id}
"""

# KEYS: completed stream, panic stream, reported set. ARGV: group, event id, number of report
# pairs N, N*2 report field/values, then entry ids to XACK. A report without the ledger, in
# one script: an event's report straight onto the stream while the ledger refused it (once per
# event id via the reported set: '' if one stands; written in this order because a script is
# not rolled back, so a refused XADD leaves no mark), or, with event id '', one summary
# report for a batch of rejected entries and their XACK (a forgery costs no round trip and
# leaves no ledger field).
REPORT_LUA = """
if ARGV[2] ~= '' and redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then return '' end
local last = 3 + tonumber(ARGV[3]) * 2
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4, last))
if ARGV[2] ~= '' then redis.call('SADD', KEYS[3], ARGV[2]) end
if #ARGV > last then redis.call('XACK', KEYS[2], ARGV[1], unpack(ARGV, last + 1)) end
return id
"""

# KEYS: processed hash. ARGV: field, record JSON. Progress updates never overwrite "done".
UPDATE_LUA = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  local ok, rec = pcall(cjson.decode, existing)
  if ok and type(rec) == 'table' and rec['stage'] == 'done' then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: guard lease. ARGV: consumer, lease ms. Take the lease if free, renew it if ours; never
# touch another holder's (fencing): 1 if we hold it afterwards.
LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class Ledger:
    """The idempotency record and the report/ack script, on one Redis client."""

    def __init__(self, client):
        self.client = client          # the scripts are registered on it and run there
        scripts = map(client.register_script, (FINISH_LUA, UPDATE_LUA, LEASE_LUA, REPORT_LUA))
        self._finish, self._update, self._lease, self._report = scripts

    def hold_lease(self, consumer, lease_ms):
        return bool(self._lease(keys=[schema.GUARD_LEASE_KEY], args=[consumer, lease_ms]))

    def claim(self, event_id, entry_id, consumer, now_ms, event=None):
        """("new" | "resume" | "done" | "duplicate", record) for this entry and event_id.
        The record keeps the event's reason and issuer, so a close can be resumed from the
        ledger alone (its entry acknowledged or deleted by someone else), and the event id
        joins the in-flight set that the ledger sweep reads (FINISH_LUA takes it out)."""
        record = {"entry": entry_id, "consumer": consumer, "stage": "claimed", "attempt": 0,
                  "ts_started": now_ms}
        if event is not None:
            record.update(reason=event.reason, issued_by=event.issued_by)
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(schema.PROCESSED_KEY, event_id, json.dumps(record))
        pipe.sadd(schema.INFLIGHT_KEY, event_id)    # harmless for a done record: the sweep drops it
        if pipe.execute()[0]:
            return "new", record
        existing = self.record(event_id)
        if existing is None:
            # Someone overwrote the record with garbage. Executing is the fail-closed reading
            # (a close acts only on what is left); the report script then writes a clean record.
            log.error("processed_record_unreadable", event_id=event_id, entry_id=entry_id)
            return "resume", record
        if existing.get("entry") != entry_id:
            return "duplicate", existing
        return ("done" if existing.get("stage") == "done" else "resume"), existing

    def record(self, event_id):
        """The record of event_id as a dict, or None if absent or not readable JSON (the
        caller decides: claim() executes, fail-closed)."""
        return tamper.parse_record(self.client.hget(schema.PROCESSED_KEY, event_id))

    def update(self, event_id, record):
        self._update(keys=[schema.PROCESSED_KEY], args=[event_id, json.dumps(record)])

    def finish(self, ledger_field, done_record, entry_id, report_fields):
        """Write the report unless one stands, mark done, XACK. Returns (written, report id)."""
        written, report_id = self._finish(
            keys=[schema.PROCESSED_KEY, schema.COMPLETED_STREAM, schema.PANIC_STREAM, schema.INFLIGHT_KEY, REPORTED_KEY],
            args=[ledger_field, json.dumps(done_record), schema.EEW_GROUP, entry_id or "",
                  *_pairs(report_fields)])
        return bool(written), bus.as_text(report_id)

    def publish(self, item):
        """A report item (Entries.finish_report's, or the journal's): its halt (force_halt:
        written; else only restored if it vanished), then FINISH_LUA. (written, report id)."""
        self.halt(schema.TradingState.from_fields(item["halt"])[0], force=bool(item.get("force_halt")))
        return self.finish(item["key"], item["done"], item.get("entry_id"), item["report"])

    def report(self, report_fields, event_id="", entry_ids=()):
        """REPORT_LUA: a report without the ledger (an event's, or, with the entry ids, the
        summary of a batch of rejected entries, acknowledged with it); its id, '' if a report
        of event_id stood already."""
        return bus.as_text(self._report(
            keys=[schema.COMPLETED_STREAM, schema.PANIC_STREAM, REPORTED_KEY],
            args=[schema.EEW_GROUP, event_id, len(report_fields), *_pairs(report_fields), *entry_ids]))

    def in_flight(self):
        """{event_id: record or None} for every event id in the in-flight set."""
        ids = [bus.as_text(event_id) for event_id in self.client.smembers(schema.INFLIGHT_KEY)]
        raws = self.client.hmget(schema.PROCESSED_KEY, ids) if ids else []
        return {event_id: tamper.parse_record(raw) for event_id, raw in zip(ids, raws)}

    def halt(self, state, force=True):
        """Write the halt; a previous reset's cleared_by/cleared_at no longer apply. force=False
        (beside a report) writes it only if the trading state vanished (Redis restarted without
        persistence between our halt and our report), so a final report never exists without
        its halt; an existing state is our halt, a newer one, or an operator's deliberate reset."""
        if not force and self.client.exists(schema.TRADING_STATE_KEY):
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(schema.TRADING_STATE_KEY, "cleared_by", "cleared_at")
        pipe.hset(schema.TRADING_STATE_KEY, mapping=state.to_fields())
        pipe.execute()


# ------------------------------------------------------------------------------ journal (disk)

class Journal:
    """Append-only JSON lines, fsynced: {"type": "report", "key", "entry_id", "report", "halt"}
    then, once Redis took it, {"type": "published", "key"}. Survives restarts."""

    def __init__(self, path):
        self.path = path

    def append(self, item):
        _write_synced(self.path, "a", [json.dumps(item, separators=(",", ":"), sort_keys=True) + "\n"])

    def unpublished(self):
        """Reports not yet marked published. A line that cannot be used (torn by a crash,
        or valid JSON missing a field) is moved to <journal>.quarantine with a CRITICAL log:
        one bad line must never stop the rest of the journal (or any later panic). Its
        entry, if any, is still pending in Redis and is resumed from there."""
        waiting, keep, bad = {}, [], []
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                item = _journal_item(line)
                if item is None:
                    bad.append(line if line.endswith("\n") else line + "\n")
                    continue
                keep.append(line)
                if item["type"] == "report":
                    waiting[item["key"]] = item
                else:
                    waiting.pop(item["key"], None)
        if bad:
            self._quarantine(bad, keep)
        return list(waiting.values())

    def _quarantine(self, bad, keep):
        quarantine, temporary = self.path + ".quarantine", self.path + ".tmp"
        _write_synced(quarantine, "a", bad)
        _write_synced(temporary, "w", keep)
        os.replace(temporary, self.path)
        log.critical("journal_lines_quarantined", lines=len(bad), path=self.path, quarantine=quarantine,
                     note="look at them: a report there never reached Redis")


def _write_synced(path, mode, lines):
    with open(path, mode, encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())


def _journal_item(line):
    """The journal item on this line, or None if it is not one we can publish."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if not isinstance(item, dict) or not isinstance(item.get("key"), str):
        return None
    usable_report = (item.get("type") == "report" and isinstance(item.get("entry_id"), (str, type(None)))
                     and all(isinstance(item.get(name), dict) for name in ("done", "report", "halt"))
                     and all(isinstance(value, str) for value in item["report"].values()))
    return item if usable_report or item.get("type") == "published" else None


# ------------------------------------------------------------------------------ exchange access

class Pacer:
    """Order pacing shared by all worker threads: at most N orders in any S seconds for each
    configured limit (pacing_wait), plus a pause that a 429/418 Retry-After imposes on every
    thread."""

    def __init__(self, limits):
        self.limits = limits
        self.sent = collections.deque(maxlen=max(count for count, _ in limits))
        self.paused_until = 0.0
        self.lock = threading.Lock()

    def pause(self, seconds):
        with self.lock:
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def paused_for(self):
        with self.lock:
            return max(0.0, self.paused_until - time.monotonic())

    def acquire(self, deadline, orders=1):
        """Wait for `orders` slots (and the pause to end); False if that would pass the
        deadline. A batch takes one slot per order in it: venues count each order."""
        while True:
            with self.lock:
                now = time.monotonic()
                wait = max(self.paused_until - now, pacing_wait(list(self.sent) + [now] * (orders - 1), now,
                                                                self.limits))
                if wait <= 0:
                    self.sent.extend([now] * orders)
                    return True
            if now + wait > deadline:
                return False
            time.sleep(wait)


class ExchangePool:
    """Up to `size` ccxt clients for `size` threads; markets loaded once and shared. Clients
    are handed out last-in first-out: a panic gets the connections used (or kept warm) most
    recently, which the venue has not dropped; the ones at the bottom only serve bursts wider
    than the warm set. Clients are built on demand, so an idle EEW holds only those it uses."""

    def __init__(self, cfg, size):
        self.cfg = cfg
        self.exchange_id = cfg.exchange_id
        self.rules = None
        self.primary = None            # the client that loaded the markets; others share them
        self.idle = []                 # most recently used last; every client built, while none works
        self.warming = []
        self.next_warm = 0.0
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="eew-exchange")

    @property
    def ready(self):
        return self.rules is not None

    def load_markets(self):
        """Raises on failure; the caller retries. Keeps the loading client."""
        primary = exchange.build_exchange(self.cfg)
        rules = exchange.load_market_rules(primary)
        with self.lock:
            self.primary = primary
            self.idle.append(primary)
        self.rules = rules

    def submit(self, fn, *args):
        """Run fn(client, *args) on a worker thread with a client of its own."""
        return self.executor.submit(self._with_client, fn, args)

    def _with_client(self, fn, args):
        """fn(client, *args) with the most recently used idle client, else a new one. Never more
        than `size` in use: only the executor's `size` threads take clients (load_markets runs
        once, at start)."""
        with self.lock:
            client = self.idle.pop() if self.idle else None
        if client is None:
            client = exchange.build_exchange(self.cfg)
            # By reference (ccxt's set_markets would deep-copy every market into every client: 64
            # copies of 600 markets). ccxt only reads them; a reload replaces, never mutates.
            client.set_markets_from_exchange(self.primary)
        try:
            return fn(client, *args)
        finally:
            with self.lock:
                self.idle.append(client)

    def maintain(self, now, warm, interval_s, pacer):
        """Keep `warm` connections alive: every interval_s (0: never) one ping on each, and
        right after the markets loaded, so a panic finds them open. Returns the failures of
        the previous round (texts): a failed ping says nothing about the account, and the
        panic that needs the connection opens a new one. A 429/418 (a ping's or a panic's)
        pauses the pacer, and no ping goes out inside that ban window: Binance answers
        requests during a ban with a longer (418) IP ban, which would cost the next close."""
        failures = []
        if self.warming and all(f.done() for f in self.warming):
            failures = [_error_text(f.exception(), self.exchange_id) for f in self.warming if f.exception()]
            self.warming = []
        paused = pacer.paused_for()
        if paused > 0:
            self.next_warm = max(self.next_warm, now + paused)
        elif self.ready and not self.warming and interval_s > 0 and now >= self.next_warm:
            self.next_warm = now + interval_s
            self.warming = self.keep_warm(warm, pacer)
        return failures

    def keep_warm(self, count, pacer):
        """One cheap request on each of the `count` most recently used connections at once
        (opening the missing ones), so they are alive when a panic comes. Returns the futures;
        never blocks the caller."""
        # Bounded: a thread busy elsewhere (the account check) must not hold the pings, and a
        # panic arriving meanwhile, for long.
        barrier = threading.Barrier(count, timeout=1)

        def ping(client):
            try:
                # Every ping holds its client until all started: `count` distinct connections.
                barrier.wait()
            except threading.BrokenBarrierError:
                pass  # a slow start only means fewer distinct connections this time
            try:
                exchange.ping(client)
            except Exception as exc:  # noqa: BLE001 - classified for the ban window, then re-raised
                kind = exchange.classify_error(exc, client)    # this client holds the Retry-After
                if kind.kind == "rate_limited":
                    pacer.pause(kind.retry_after_s or 1.0)
                raise                                          # maintain() reports the failure
        return [self.submit(ping) for _ in range(count)]



def _sleep(seconds, keepalive):
    """Sleep on the main thread in KEEPALIVE_S slices, calling keepalive() between them."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, KEEPALIVE_S))
        keepalive()


def log_bug(event, exc, **fields):
    """An exception of ours, or data we did not expect: one ERROR line with the traceback,
    taken inside the except block (issue 24, finding 3)."""
    log.error(event, **fields, error=type(exc).__name__, message=str(exc)[:300],
              traceback=traceback.format_exc()[-2000:])


def best_effort(event, event_id, fn, *args, **kwargs):
    """fn(*args, **kwargs) where a Redis error must not stop what goes on (bookkeeping beside
    a close, never the close itself; a report the journal keeps anyway): it is logged as
    `event` (None); the caller says why that is safe."""
    try:
        return fn(*args, **kwargs)
    except bus.REDIS_ERRORS as exc:
        log.warning(event, event_id=event_id, error=type(exc).__name__)
        return None


def _error_text(exc, exchange_id):
    """Short, secret-free description of an exchange failure for logs and reports, naming the
    account segment when the failure concerns one."""
    kind = exchange.classify_error(exc, exchange_id=exchange_id)
    text = f"{kind.kind}:{kind.code}" if kind.code is not None else f"{kind.kind}:{type(exc).__name__}"
    segment = getattr(exc, "eexit_segment", None)
    return f"{text}:segment={segment}" if segment else text


@dataclass
class Account:
    positions: list
    orders: list
    unreadable: list = field(default_factory=list)   # venues.base.UnreadableRow: never flat


# ------------------------------------------------------------------------------ one panic

class Closer:
    """Executes one panic against the exchange. Exchange failures never raise out of here:
    they are retried inside the deadline and end up in the report."""

    def __init__(self, config, pool, pacer):
        self.config = config
        self.pool = pool
        self.pacer = pacer
        self.last_read_error = ""
        self.scope = exchange.scope(pool.exchange_id)

    def read_account(self, deadline, event_id, keepalive):
        """Positions and open orders, fresh, retried until the deadline; None if never read
        (self.last_read_error then says why, naming the segment that failed)."""
        wait = 0.0
        for attempt in itertools.count():
            # A 429's pause (any thread's) or the back-off after a failed read.
            wait = max(wait, self.pacer.paused_for())
            if wait > 0:
                if time.monotonic() + wait > deadline:
                    return None
                _sleep(wait, keepalive)
            try:
                if not self.pool.ready:
                    self.pool.load_markets()
                # Every segment and book at once: one latency, not one per segment.
                venue = exchange.venue(self.pool.exchange_id)
                positions = [self.pool.submit(exchange.read_segment_positions, segment) for segment in venue.SEGMENTS]
                books = [self.pool.submit(exchange.read_segment_orders, segment, book)
                         for segment in venue.SEGMENTS for book in venue.BOOKS]
                reads = [part.result() for part in positions]     # (positions, unreadable rows)
                account = Account([p for readable, _ in reads for p in readable],
                                  [o for book in books for o in book.result()],
                                  [u for _, unreadable in reads for u in unreadable])
                if account.unreadable:
                    log.error("position_rows_unreadable", event_id=event_id,
                              rows=";".join(u.describe() for u in account.unreadable))
                return account
            except Exception as exc:  # noqa: BLE001 - any failure means "account unknown"
                # Unknown is never empty: wait and read again until the deadline; the caller
                # reports FAILED if no read ever succeeds.
                kind = exchange.classify_error(exc, exchange_id=self.pool.exchange_id)
                self.last_read_error = _error_text(exc, self.pool.exchange_id)
                wait = core.read_retry_s(kind.retry_after_s, attempt)
                if kind.kind == "rate_limited":
                    self.pacer.pause(wait)
                log.warning("account_read_failed", event_id=event_id, error=self.last_read_error,
                            retry_in_s=wait)

    def run_round(self, account, attempt, event_id, deadline, keepalive):
        """Cancel all orders on every book where the fresh read saw orders, and send every
        close of the plan, concurrently. Waits for all of them, calling keepalive() about every
        KEEPALIVE_S from this (the main) thread meanwhile. Returns (cancelled, sent, errors)."""
        plan = flatten.plan_close(account.positions, self.pool.rules or {}, attempt, event_id)
        books = collections.defaultdict(list)
        for order in account.orders:
            books[order.symbol, order.conditional].append(order)
        # Only the books that had orders: an empty book's cancel finds nothing the read did not.
        cancels = {self.pool.submit(self._cancel, *book, orders): (book[0], orders)
                   for book, orders in sorted(books.items())}
        size = core.batch_size(exchange.batch_size(self.pool.exchange_id), self.pacer.limits)
        closes = {self.pool.submit(self._close, plan[i:i + size], deadline): plan[i:i + size]
                  for i in range(0, len(plan), size)}
        waiting = set(cancels) | set(closes)
        while waiting:
            _done, waiting = futures.wait(waiting, timeout=KEEPALIVE_S)
            if waiting:
                keepalive()
        errors = [f"cancel:{symbol}:{f.result()}" for f, (symbol, _) in cancels.items() if f.result()]
        cancelled = sum(len(orders) for f, (_, orders) in cancels.items() if f.result() is None)
        results = [(order, error) for f, batch in closes.items() for order, error in zip(batch, f.result())]
        errors += [f"close:{order.symbol}:{order.position_side}:{error}" for order, error in results if error]
        sent = sum(1 for _, error in results if error is None)
        log.info("close_round", event_id=event_id, attempt=attempt, positions=len(account.positions),
                 orders_seen=len(account.orders), planned=len(plan), sent=sent, cancelled=cancelled,
                 errors=len(errors))
        return cancelled, sent, errors

    def _cancel(self, client, symbol, conditional, orders):
        """None on success, else a short error text. Runs on a pool thread."""
        try:
            exchange.cancel_book(client, symbol, conditional, orders)
            return None
        except Exception as exc:  # noqa: BLE001 - one failed cancel is recorded, not raised
            # The re-read shows whether orders are still resting; the next attempt cancels again.
            return _error_text(exc, self.pool.exchange_id)

    def _close(self, client, orders, deadline):
        """One batch (the venue's batch endpoint; one order alone goes to the single one):
        per order None once the exchange accepted it, else a short error text. Which orders
        are sent again (429/418, with the same client order id) is core.order_round's call;
        the others of a batch stand. Runs on a pool thread."""
        errors, pending = ["rate_limited:retries_exhausted"] * len(orders), list(range(len(orders)))
        for _ in range(MAX_RATE_RETRIES):
            if not pending:
                break
            if not self.pacer.acquire(deadline, len(pending)):
                for i in pending:
                    errors[i] = "deadline"
                break
            try:
                results = exchange.place_close_orders(client, [orders[i] for i in pending], lambda exc: log.warning(
                    "close_batch_refused", orders=len(pending), error=_error_text(exc, self.pool.exchange_id),
                    then="single_orders"))
            except Exception as exc:  # noqa: BLE001 - classified by order_round, never swallowed
                # The request itself failed: the same outcome for every order in it.
                results = [exc] * len(pending)
            pending, pause = core.order_round(errors, pending, [self._outcome(r, client) for r in results])
            if pause is not None:
                self.pacer.pause(pause)
        return errors

    def _outcome(self, result, client):
        """None for an accepted order, else (error kind, retry_after_s, text) for the core."""
        if not isinstance(result, Exception):
            return None
        kind = exchange.classify_error(result, client)    # this client holds the Retry-After
        return kind.kind, kind.retry_after_s, _error_text(result, self.pool.exchange_id)

    def execute(self, event_id, record, keepalive):
        """Halt is the caller's job. Reads, then closes and verifies as core.close_next says
        (until flat or the deadline); returns the report fields that depend on the exchange
        (core.close_summary). keepalive() runs while an attempt waits for the exchange,
        keepalive(True) before every attempt (persist the attempt number in the record)."""
        started = time.monotonic()
        account = self.read_account(started + self.config.close_deadline_s, event_id, keepalive)
        if account is None:
            return dict(status=flatten.FAILED, scope=self.scope, attempts=record.get("attempt", 0),
                        detail=f"positions_unreadable_until_deadline:{self.last_read_error}")
        # The work is known now: the deadline grows with the closes the limits must pace.
        deadline = started + close_deadline_s(self.config.close_deadline_s, len(account.positions),
                                              self.pacer.limits)
        if record.get("initial") is None:
            record["initial"] = sorted({"|".join(flatten.position_key(p)) for p in account.positions})
        cancelled, sent, errors, failed_rounds = 0, 0, [], 0
        while core.close_next(account, self.pool.rules or {}, time.monotonic(), deadline):
            record["attempt"] = record.get("attempt", 0) + 1
            keepalive(True)
            done, accepted, failed = self.run_round(account, record["attempt"], event_id, deadline, keepalive)
            cancelled, sent, errors = cancelled + done, sent + accepted, errors + failed
            if failed or account.unreadable:
                failed_rounds += 1
                _sleep(core.round_pause(failed_rounds, deadline - time.monotonic()), keepalive)
            account = self.read_account(deadline, event_id, keepalive)
        return core.close_summary(record, account, self.pool.rules or {}, cancelled, sent, errors,
                                  scope=self.scope, read_error=self.last_read_error)


# ------------------------------------------------------------------------------ the loop

def report_base(event, event_id, problems=(), ts_started=None):
    """What every report of an entry or event starts from (core.report's base): the event id,
    the event's issuer and reason, the problems found in it, when its handling started."""
    return dict(event_id=event_id, issued_by=event.issued_by, reason=event.reason,
                problems=tuple(problems), ts_started=ts_started or wall_ms())


@dataclass
class Job:
    """What the shell keeps while it performs one panic's commands (the decisions are the
    core's): the event, the report base, the ledger record, the close's report fields; for a
    close on own authority its keepalive, the halt it reports and extra report fields."""
    event: schema.PanicEvent
    base: dict
    record: dict = None
    fields: dict = None
    halt_state: schema.TradingState = None
    keepalive: object = None            # None: Entries.close_keepalive (entry and record kept fresh)
    force_halt: bool = None             # None: write the halt with the report when there is no entry
    extra: dict = field(default_factory=dict)

    def halt(self, event_id):
        """The halt of this event, built once (halted_at is when it was first written)."""
        if self.halt_state is None:
            self.halt_state = schema.TradingState(
                halted=True, reason=self.event.reason or "UNSPECIFIED", event_id=event_id, halted_at=wall_ms(),
                halted_by=self.event.issued_by or "unknown", requires_manual_reset=True)
        return self.halt_state


class Entries:
    """One entry at a time (part of Worker): screen it, let the core decide (eexit/eew_core.py),
    perform its commands (perform), report (finish_report, with the journal when Redis cannot
    take it). Uses the Worker's redis, ledger, closer, journal and config."""

    def next_entries(self):
        """The pass's entries, read where core.entry_reads says, in its order."""
        cfg = self.config
        group = (self.redis, schema.PANIC_STREAM, schema.EEW_GROUP, cfg.consumer)
        for read in core.entry_reads(core.due(self.at, "sweep", time.monotonic(), cfg.sweep_interval_s)):
            if read is core.Read.OWN:
                entries = bus.read_group(*group, block_ms=0, pending=True, count=READ_BATCH)
                if len(entries) == READ_BATCH:
                    self.at.pop("sweep")       # more of our backlog: next pass
            elif read is core.Read.IDLE:
                entries = bus.claim_idle(*group, cfg.claim_idle_ms)
                if entries:
                    log.info("claimed_idle_entries", entries=",".join(e for e, _ in entries))
            else:
                # Before READY=1 the first pass does not block: READY follows it at once.
                return bus.read_group(*group, block_ms=self.block_ms if self.ready_sent else 1,
                                      count=READ_BATCH)
            if entries:
                return entries

    def screen(self, entry_id, raw):
        """(event, event_id, problems, allowed, why) for one entry; local work, no Redis. The
        schema parse only for authorised entries: a flood of forgeries costs their HMAC."""
        # Decoded with undecodable bytes replaced: such an entry fails verification rather
        # than crashing the loop.
        fields = bus.decoded(raw)
        allowed, why = authorise(fields, self.config.authorized_sources, self.config.keyring)
        if allowed:
            event, problems = schema.PanicEvent.from_fields(raw)
        else:
            event, problems = schema.PanicEvent(fields.get("event_id", ""), fields.get("reason", ""),
                                                fields.get("issued_by") or fields.get("source", ""), None), []
        if not event.event_id:
            problems = [*problems, "derived:event_id"]
        # An entry without an event_id gets one from its stream id: deterministic, so its
        # redelivery is recognised.
        return event, event.event_id or f"entry-{entry_id}", problems, allowed, why

    def handle_batch(self, entries):
        """Authorised entries first, in stream order; then every rejected entry of the batch
        in one script (one summary report + XACK): forged entries cannot delay a real panic
        by more than their local signature check, nor leave more than one report per batch.
        Redis lost mid-batch: the rest stays pending for the next delivery."""
        rejected = []
        for entry_id, raw in entries:
            if self.redis is None:
                return
            screened = self.screen(entry_id, raw)
            if screened[3]:
                self.handle_entry(entry_id, screened)
            else:
                rejected.append((entry_id, screened))
        if rejected:
            self.job_step("report_rejected", schema.COMPLETED_STREAM, lambda: self.reject_batch(rejected))

    def reject_batch(self, rejected):
        """REJECTED for the batch's rejected entries. A bug while reporting them leaves them
        pending; after EEXIT_MAX_DELIVERIES each gets FAILED without any action
        (core.give_up_unauthorised): never a halt for an entry that is not authorised."""
        try:
            self.report_rejected(rejected)
            return
        except bus.REDIS_ERRORS:
            raise                      # job_step tells transport from command errors
        except Exception as exc:  # noqa: BLE001 - classified below: these entries are not authorised
            log_bug("rejection_failed", exc, entries=len(rejected))
            error = type(exc).__name__
        for entry_id, (event, event_id, _problems, _allowed, why) in rejected:
            pending = self.redis.xpending_range(schema.PANIC_STREAM, schema.EEW_GROUP, min=entry_id,
                                                max=entry_id, count=1)
            if core.give_up_unauthorised(int(pending[0]["times_delivered"]) if pending else 0,
                                         self.config.max_deliveries):
                base = report_base(event, event_id, (f"internal_error:{error}",))
                self.report_without_action(entry_id, base, "FAILED", f"not_authorised:{why}; handling failed")

    def report_rejected(self, rejected):
        """One REJECTED report for the batch's rejected entries: the entry's own (event_id cut
        to schema.MAX_TEXT) for one, a summary naming the first REJECTED_IDS_SHOWN for more."""
        ids = [entry_id for entry_id, _ in rejected]
        event, event_id, _problems, _allowed, detail = rejected[0][1]
        if len(rejected) > 1:
            event, event_id = schema.PanicEvent("", "", "", None), f"rejected-{ids[0]}-{len(ids)}"
            why = collections.Counter(screened[4] for _, screened in rejected)
            detail = ",".join(f"{reason}={count}" for reason, count in sorted(why.items()))
        base = report_base(event, event_id)
        report = core.report(base, dict(status="REJECTED", detail=detail, extra=dict(
            entry_id=ids[0], rejected_count=len(ids), entry_ids=json.dumps(ids[:REJECTED_IDS_SHOWN]),
            event_ids=json.dumps([s[1][:schema.MAX_TEXT] for _, s in rejected[:REJECTED_IDS_SHOWN]]))),
            base["ts_started"])
        report_id = self.ledger.report(report.to_fields(), entry_ids=ids)
        log.warning("panics_rejected", count=len(ids), first=ids[0], last=ids[-1], report=report_id, why=detail[:300])

    def handle_entry(self, entry_id, screened):
        event, event_id, problems, allowed, _why = screened     # allowed: rejections go by batch
        log.info("panic_received", event_id=event_id, entry_id=entry_id, issued_by=event.issued_by,
                 reason=event.reason, problems=",".join(problems))
        panic, commands = core.start(event_id, entry_id, allowed, journaled=event_id in self.journaled)
        record = {"entry": entry_id, "consumer": self.config.consumer, "stage": "claimed", "attempt": 0}
        self.drive(panic, commands, Job(event, report_base(event, event_id, problems), record))

    def drive(self, panic, commands, job):
        """Perform the core's commands in order, feeding each result or error back."""
        self.current_event = panic.event_id
        while commands:
            command, commands = commands[0], commands[1:]
            try:
                result = self.perform(panic, command, job)
            except bus.REDIS_ERRORS as exc:
                kind = self.redis_failed(exc, command.do.value, panic.event_id)
                panic, more = core.on_error(panic, command, kind, daemon.cause(exc))
            except Exception as exc:  # noqa: BLE001 - fail closed: the core decides what comes next
                log_bug("entry_failed", exc, event_id=panic.event_id, entry_id=panic.entry_id,
                        stage=command.do.value)
                panic, more = core.on_error(panic, command, core.ErrorKind.BUG, type(exc).__name__)
            else:
                panic, more = core.on_result(panic, command, result)
            commands = more + commands
        if panic.degraded and not panic.final:
            self.unreported[panic.event_id] = panic.failures[-1] if panic.failures else ""
            log.critical("panic_unreported", event_id=panic.event_id, failures=";".join(panic.failures)[-500:])
        elif panic.final:
            self.unreported.pop(panic.event_id, None)
        self.set_status("waiting for panic events")

    def perform(self, panic, command, job):
        """One command of the core, against Redis or the exchange; its result for the core."""
        do, event_id, entry_id = command.do, panic.event_id, panic.entry_id
        if do is core.Do.CLAIM:
            sent_ms = schema.entry_id_ms(entry_id)
            job.base["event_age_ms"] = bus.server_time_ms(self.redis) - sent_ms if sent_ms is not None else None
            outcome, job.record = self.ledger.claim(event_id, entry_id, self.config.consumer,
                                                    job.base["ts_started"], job.event)
            job.base["ts_started"] = job.record.get("ts_started") or job.base["ts_started"]
            log.info("panic_claimed", event_id=event_id, entry_id=entry_id, outcome=outcome,
                     age_ms=job.base["event_age_ms"], attempt=job.record.get("attempt", 0))
            return core.Claim(outcome)
        if do is core.Do.WRITE_HALT:
            self.ledger.halt(job.halt(event_id))
            job.record.update(stage="halted", consumer=self.config.consumer)
            self.save_progress(event_id, job.record)
            return None
        if do in (core.Do.CLOSE, core.Do.SIMPLE_CLOSE):
            self.set_status(f"closing event {event_id}")
            if do is core.Do.SIMPLE_CLOSE:
                # Nothing from the ledger record (it may be what failed), no bookkeeping: a fresh
                # record whose attempt numbers (client order ids) no normal attempt uses.
                record, keepalive = {"attempt": SIMPLE_CLOSE_ATTEMPT}, self.ping
            else:
                record = job.record
                keepalive = job.keepalive or self.close_keepalive(event_id, entry_id, record)
            job.fields = self.closer.execute(event_id, record, keepalive)
            return job.fields
        if do is core.Do.REPORT:
            fields = core.report_fields(panic, command, job.fields, self.closer.scope)
            fields["extra"].update(job.extra)
            return self.finish_report(event_id, entry_id, job.record, job.base, fields, job.halt(event_id),
                                      job.force_halt)
        if do is core.Do.REPORT_NO_ACTION:
            record = job.record or {}
            detail = f"original_entry={record.get('entry')} original_status={record.get('status') or record.get('stage')}"
            if record.get("stage") != tamper.FINAL_STAGE:
                self.at.pop("guard_sweep", None)   # the original may be stranded: the sweep looks now
            return self.report_without_action(entry_id, job.base, "DUPLICATE", detail)
        if do is core.Do.TOUCH:
            return self.touch_entry(event_id, entry_id)
        # ACK (REJECT never comes here: rejected entries go by batch, reject_batch). The report
        # stands (written by the script that acknowledges); only the XACK is missing.
        return self.redis.xack(schema.PANIC_STREAM, schema.EEW_GROUP, entry_id)

    def close_keepalive(self, event_id, entry_id, record):
        """keepalive(save=False) for a close: keep our entry fresh, ping the watchdog while the
        exchange answers (progress of the loop's own work), and persist the record before
        every attempt (save: a resumed close uses new client order ids) and every second (it
        is not stranded)."""
        def keepalive(save=False):
            self.touch_entry(event_id, entry_id)
            if save or wall_ms() - record.get("ts_updated", 0) > 1000:
                self.save_progress(event_id, record)
            self.notifier.ping()
        return keepalive

    def ping(self, _save=False):
        """The keepalive of a close without bookkeeping (the simple close, the bus-loss close)."""
        self.notifier.ping()

    def report_without_action(self, entry_id, base, status, detail):
        """DUPLICATE (or FAILED for an entry that is not authorised): report + ack, recorded
        under "entry:<stream id>" so its redelivery does not repeat the report."""
        report = core.report(base, dict(status=status, detail=detail, extra={"entry_id": entry_id}), wall_ms())
        done = {"entry": entry_id, "stage": "done", "status": report.status}
        self.ledger.finish(f"entry:{entry_id}", done, entry_id, report.to_fields())

    def save_progress(self, event_id, record):
        """Persist the attempt counter, so a resumed close uses new client order ids. Best
        effort: keep closing, the exchange work matters more than bookkeeping. Worst case a
        restart reuses attempt numbers: the exchange refuses ids still open, and the re-read
        re-plans from what is actually left."""
        record["ts_updated"] = wall_ms()
        if self.ledger is not None:
            best_effort("progress_not_saved", event_id, self.ledger.update, event_id, record)

    def touch_entry(self, event_id, entry_id):
        """Reset our entry's idle time so other instances do not claim a close in progress.
        Best effort: keep closing. Worst case another instance claims the entry and closes too:
        both act reduce-only on what the exchange says is left, and the report script writes
        exactly one final report."""
        if self.redis is not None and entry_id is not None:     # a close on own authority has no entry
            best_effort("entry_not_touched", event_id, self.redis.xclaim, schema.PANIC_STREAM,
                        schema.EEW_GROUP, self.config.consumer, min_idle_time=0, message_ids=[entry_id],
                        justid=True)

    def finish_report(self, event_id, entry_id, record, base, fields, halt, force_halt=None):
        """Report, done record, XACK (none without an entry): "ledger". If Redis cannot take
        it, journaled ("journal"); on a command error (Redis reachable, the ledger refusing)
        also published straight to the completed stream ("direct"): the report stands, and
        the journal later marks it done and acknowledges without writing it again. force_halt
        (default: no entry, i.e. our own authority) writes the halt; otherwise it is only
        restored if it vanished."""
        now = wall_ms()
        force_halt = entry_id is None if force_halt is None else force_halt
        extra = {"entry_id": entry_id or "", "consumer": self.config.consumer, **fields.get("extra", {})}
        report = core.report(base, dict(fields, extra=extra), now)
        self.last_positions = report.positions_failed
        log.info("panic_completed", event_id=event_id, **{name: getattr(report, name) for name in (
            "status", "positions_total", "positions_closed", "positions_failed", "orders_cancelled", "attempts",
            "execution_time_ms")})
        done = {"entry": entry_id, "consumer": self.config.consumer, "stage": "done",
                "status": report.status, "attempt": (record or {}).get("attempt", 0),
                "ts_started": base["ts_started"], "ts_completed": now}
        item = {"type": "report", "key": event_id, "entry_id": entry_id, "done": done,
                "report": report.to_fields(), "halt": halt.to_fields(),
                "force_halt": force_halt}     # bus loss: nobody has halted yet
        if self.ledger is not None:
            try:
                self.ledger.publish(item)
                return "ledger"
            except bus.REDIS_ERRORS as exc:
                # Redis cannot take the report now: journal it below. The entry stays
                # pending; after reconnecting the journal is published (report + done + XACK
                # in one script) before any entry is read, so the redelivery finds "done".
                if self.trouble.report(exc, "finish_report", schema.PROCESSED_KEY) == "transport":
                    self.lost_redis(exc)
                else:
                    # The ledger refuses: the report straight onto the completed stream, once per
                    # event id (one may stand already). Refused too: the journal keeps it and the
                    # heartbeat names the event until it stands.
                    item["published"] = best_effort("report_not_published", event_id, self.ledger.report,
                                                    item["report"], event_id) is not None
        self.journal.append(item)
        self.journaled.add(event_id)
        log.error("report_journaled", event_id=event_id, status=report.status, published=item.get("published", ""),
                  path=self.config.journal_path)
        return "direct" if item.get("published") else "journal"

    def publish_journal(self):
        if not self.journaled:
            return
        for item in self.journal.unpublished():
            written, report_id = self.ledger.publish(item)
            self.journal.append({"type": "published", "key": item["key"], "report_id": report_id})
            self.journaled.discard(item["key"])
            self.unreported.pop(item["key"], None)
            log.info("journal_published", event_id=item["key"], report_id=report_id, written=written)
        self.journaled = set()


class LostPanics:
    """Panics that never reach the group's read (part of Worker): the tamper check, stranded
    ledger records, entries the group skipped, a backlog's newest batch (eexit/tamper.py); and
    resume requests (eexit/resume.py), one a pass and only in a pass without panics."""

    def guard(self):
        """Every pass: the tamper check (one round trip when idle). Every sweep interval:
        stranded ledger records and entries the group skipped. A bug
        here is logged and the pass goes on to read entries: these checks are a second line;
        dying or skipping the read would stop the first."""
        try:
            stream_info, group = tamper.read_stream_state(self.redis)
            if group is None:
                return                     # no group (yet): the next read recreates it
            finding = tamper.decide_tampering(stream_info, group, self.tamper_seen)
            self.stream_broken = "panic_stream_exhausted" if \
                stream_info.get("last-generated-id") == tamper.MAX_ID else None
            if finding is not None:
                self.tamper_close(finding)
            if int(stream_info.get("entries-added") or 0) - int(group.get("entries-read") or 0) > READ_BATCH:
                self.peek_tail(group)
            if core.due(self.at, "guard_sweep", time.monotonic(), self.config.sweep_interval_s):
                self.sweep_ledger()
                self.audit_stream(group)
        except bus.REDIS_ERRORS:
            raise                      # job_step tells transport from command errors
        except Exception as exc:  # noqa: BLE001 - never block the panic path on the checks
            log_bug("guard_error", exc)

    def peek_tail(self, group):
        """A backlog longer than one batch (a flood of forgeries ahead of a real panic): screen
        the newest batch too, and execute an authorised entry found there now, so the real
        panic does not wait for the whole backlog; its turn in the group later finds its ledger
        record done and only acknowledges it. Each entry is peeked at most once."""
        low = max(tamper.parse_id(self.peek_cursor), tamper.parse_id(group.get("last-delivered-id")))
        batch = self.redis.xrevrange(schema.PANIC_STREAM, "+", "({}-{}".format(*low), count=READ_BATCH)
        if batch:
            self.peek_cursor = bus.as_text(batch[0][0])
        # Past last-delivered-id: nothing there is pending.
        self.run_unrecorded(batch[::-1], False, log.warning, "panic_taken_ahead_of_backlog")

    def run_unrecorded(self, batch, check_pending, say, event, **fields):
        """Execute the authorised entries of a stream batch (oldest first) that no ledger record
        names and, with check_pending, that nobody holds in the group (claim_idle covers those);
        say(event, ...) logs each."""
        ids = [bus.as_text(entry_id) for entry_id, _ in batch]
        screened = [(entry_id, self.screen(entry_id, raw)) for entry_id, (_, raw) in zip(ids, batch)]
        # tamper.skipped_entries passes its candidates' second item through: here the screened entry.
        candidates = [(entry_id, item, item[1]) for entry_id, item in screened if item[3]]
        if not candidates:
            return
        pending = set()
        if check_pending:
            low, high, count = core.pending_query(ids, [entry_id for entry_id, _, _ in candidates])
            pending = {bus.as_text(item["message_id"]) for item in self.redis.xpending_range(
                schema.PANIC_STREAM, schema.EEW_GROUP, low, high, count)}
        raws = self.redis.hmget(schema.PROCESSED_KEY, [event_id for _, _, event_id in candidates])
        records = {event_id: tamper.parse_record(raw) for (_, _, event_id), raw in zip(candidates, raws)}
        for entry_id, item in tamper.skipped_entries(candidates, pending, records):
            say(event, entry_id=entry_id, event_id=item[1], **fields)
            self.handle_entry(entry_id, item)

    def tamper_close(self, finding):
        """A lost panic of unknown content: close on our own authority, once per finding."""
        event = schema.PanicEvent(event_id=finding.event_id, reason=tamper.TAMPER_REASON,
                                  issued_by=tamper.TAMPER_ISSUER, ts=wall_ms())
        outcome, record = self.ledger.claim(event.event_id, None, self.config.consumer, wall_ms(), event)
        self.tamper_seen.add(finding.key)
        if outcome == "done":
            return
        log.critical("panic_stream_tampered", event_id=event.event_id, finding=finding.reason,
                     detail=finding.detail, action="closing_on_own_authority")
        self.set_status(f"panic stream tampered ({finding.reason}): flattening on own authority")
        self.run_recorded(event, record, [finding.reason])

    def run_recorded(self, event, record, problems):
        """Halt, close and report a claimed ledger record (tamper close or stranded record)."""
        panic, commands = core.resume_recorded(event.event_id, record.get("entry"))
        base = report_base(event, event.event_id, problems, record.get("ts_started"))
        self.drive(panic, commands, Job(event, base, record))

    def sweep_ledger(self):
        """Resume records that are not final while no group entry carries them."""
        records = self.ledger.in_flight()
        entries = [r["entry"] for r in records.values() if r and r.get("entry")]
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in entries:
            pipe.xpending_range(schema.PANIC_STREAM, schema.EEW_GROUP, entry_id, entry_id, 1)
        pending = {entry_id for entry_id, found in zip(entries, pipe.execute() if entries else []) if found}
        stranded, finished = tamper.stranded_records(records, pending, self.config.consumer,
                                                     bus.server_time_ms(self.redis), self.config.claim_idle_ms)
        if finished:
            self.redis.srem(schema.INFLIGHT_KEY, *finished)
        for event_id in stranded:
            record = records[event_id]
            log.critical("panic_stranded_resumed", event_id=event_id, entry_id=record.get("entry"),
                         stage=record.get("stage"), owner=record.get("consumer"))
            record["consumer"] = self.config.consumer
            event = schema.PanicEvent(event_id=event_id, reason=record.get("reason") or "UNSPECIFIED",
                                      issued_by=record.get("issued_by") or "unknown", ts=record.get("ts_started"))
            self.run_recorded(event, record, ["resumed_from_ledger"])

    def audit_stream(self, group):
        """Authorised entries up to the group's last-delivered-id that are neither pending nor
        recorded were taken past us (NOACK read, group created at `$`): execute them."""
        last = group.get("last-delivered-id") or "0-0"
        if tamper.parse_id(self.audit_cursor) >= tamper.parse_id(last):
            return
        batch = self.redis.xrange(schema.PANIC_STREAM, "(" + self.audit_cursor, last, count=READ_BATCH)
        self.run_unrecorded(batch, True, log.critical, "panic_skipped_by_group", last_delivered=last,
                            action="executing_from_stream")
        self.audit_cursor = bus.as_text(batch[-1][0]) if len(batch) == READ_BATCH else last
        if len(batch) == READ_BATCH:
            self.at.pop("guard_sweep", None)    # more to check: next pass

    def serve_resume_request(self):
        """At most one resume request per pass, and only in a pass without panics: each may
        cost a full account read (eexit/resume.py)."""
        reply = self.redis.xread({resume.REQUEST_STREAM: self.resume_cursor}, count=1)
        for _stream, items in reply or []:
            for entry_id, fields in items:
                self.resume_cursor = bus.as_text(entry_id)
                verdict, why = resume.serve_request(
                    self.redis, fields, self.config.keyring, self.config.resume_cooldown_s,
                    self.account_for_resume, self.stream_broken, self.config.consumer)
                if verdict is None:
                    log.warning("resume_request_ignored", entry_id=self.resume_cursor, why=why)
                else:
                    log.info("resume_verdict", refusals=len(json.loads(verdict["refusals"])), **{
                        name: verdict[name] for name in ("request_id", "status", "event_id", "operator")})

    def account_for_resume(self):
        """(positions, open_orders, error) from a fresh read of the whole account."""
        account = self.closer.read_account(time.monotonic() + RESUME_READ_S, "resume", self.notifier.ping)
        if account is None:
            return None, None, f"positions_unreadable_for_{RESUME_READ_S:g}s"
        if account.unreadable:
            return None, None, "position_rows_unreadable:" + ";".join(u.describe() for u in account.unreadable)
        return account.positions, account.orders, None


class OwnAuthority:
    """Closes on the EEW's own authority (part of Worker): the bus-loss close while the EEW
    cannot do its job, and the halt guard while trading is halted (decisions:
    eexit/guard_policy.py)."""

    def own_event_id(self, prefix):
        return f"{prefix}-{self.config.consumer}-{wall_ms()}"

    def own_close(self, event_id, reason, repeat=False, **job):
        """A close on the EEW's own authority through the core (core.start_own), like a panic's:
        no entry, a report of its own. job: Job fields (the guard's halt, keepalive, a report
        without orders). Returns the report's status (FAILED if the close itself kept failing)."""
        now = wall_ms()
        event = schema.PanicEvent(event_id=event_id, reason=reason, issued_by=SERVICE_ID, ts=now)
        job = Job(event, report_base(event, event_id, ts_started=now),
                  {"entry": None, "stage": "halted", "attempt": 0, "ts_started": now}, **job)
        job.base["event_age_ms"] = 0
        self.drive(*core.start_own(event_id, close=job.fields is None, repeat=repeat), job)
        return (job.fields or {}).get("status", flatten.FAILED)

    def bus_loss_close(self, down_s, repeat=False):
        """Flatten without an event: Redis unreachable or refusing our commands, hence the
        whole safety chain, is blind. Repeated every guard interval while that lasts; a repeat
        that found nothing to do writes no report (the first one stands)."""
        event_id = self.own_event_id("busloss")
        log.critical("bus_loss_close", event_id=event_id, redis_down_s=round(down_s, 1), repeat=repeat)
        self.set_status(f"redis lost {down_s:.0f}s: flattening on own authority")
        return self.own_close(event_id, BUS_LOSS_REASON, repeat, keepalive=self.ping)

    # -- halt guard (decisions: eexit/guard_policy.py)

    def halt_guard(self):
        """While trading is halted, one EEW (the holder of GUARD_LEASE_KEY) reads the whole
        account every EEXIT_HALT_GUARD_S and acts as guard_policy.decide() says: a close as
        for a panic, with a report of its own (event_id guard-<consumer>-<ms>). Runs from the
        loop between entries, so never during this EEW's own panic; reads and closes go
        through the Closer (its pacer) with guard_keepalive. Status: GUARD_KEY (a hash)."""
        cfg, now = self.config, time.monotonic()
        step_s = guard_policy.step_s(cfg.halt_guard_s)
        if cfg.halt_guard_s <= 0 or not core.due(self.at, "lease", now, step_s):
            return
        state, _ = schema.TradingState.from_fields(self.redis.hgetall(schema.TRADING_STATE_KEY))
        if state.halted is not True or not self.hold_guard():
            self.guard_alerted = None
            return
        if not core.due(self.at, "guard_check", now, cfg.halt_guard_s):
            return
        last = self.last_final_status(state.event_id)
        account = None if last is None else self.closer.read_account(now + cfg.halt_guard_s, "halt-guard",
                                                                     self.guard_keepalive)
        status = {"holder": cfg.consumer, "policy": cfg.halt_guard_policy, "halt_event_id": state.event_id,
                  "last_check_ms": wall_ms(), "last_check": "waiting_for_report" if last is None else "unreadable"}
        if account is not None:
            key = guard_policy.exposure_key(account.positions, account.orders)
            # An unreadable row is exposure (never "flat"), though nothing a close can act on.
            action, reason = guard_policy.decide(cfg.halt_guard_policy, last, account.positions or account.unreadable,
                                                 flatten.closable(account.positions, self.pool.rules or {}),
                                                 account.orders, key == self.guard_alerted)
            status["last_check"] = (f"positions={len(account.positions)} orders={len(account.orders)}"
                                    f" unreadable_rows={len(account.unreadable)}"
                                    if account.positions or account.orders or account.unreadable else "flat")
            # Still the holder after the read (renewed): a holder cut off during a long read
            # may have lost the lease, and then its successor acts, not both. And still the same
            # halt: a resume served meanwhile (by another EEW) is a human's decision, and the bot
            # may trade again at once; the next check judges whatever halt stands then.
            if action in ("enforce", "alert") and self.hold_guard() and self.halt_stands(state):
                self.guard_alerted = key
                status.update(self.guard_close(state, action, reason, account))
        if self.redis is not None:      # None: Redis went away during the close (report journaled)
            self.redis.hset(schema.GUARD_KEY, mapping=status)

    def halt_stands(self, state):
        """Whether trading is still halted by the halt `state` read before the account."""
        now, _ = schema.TradingState.from_fields(self.redis.hgetall(schema.TRADING_STATE_KEY))
        return now.halted is True and now.event_id == state.event_id

    def last_final_status(self, halt_event_id):
        """The status of the last final report for this halt: the guard's own latest if it
        reported on this halt, else the halt event's report; "" if the halt has none (an
        operator's halt: any exposure is new); None while that report is not written."""
        guard = bus.decoded(self.redis.hgetall(schema.GUARD_KEY))
        if guard.get("last_status_for") == halt_event_id and guard.get("last_status"):
            return guard["last_status"]
        record = self.ledger.record(halt_event_id) if halt_event_id else None
        if record is None:
            return ""
        return record.get("status", "") if record.get("stage") == "done" else None

    def guard_close(self, state, action, reason, account):
        """One enforcement (or, policy alert, a report and no orders); the guard status fields."""
        event_id, fields = self.own_event_id("guard"), None
        log.critical("halt_guard_" + action, event_id=event_id, halt_event_id=state.event_id, reason=reason,
                     positions=len(account.positions), orders=len(account.orders))
        if action == "alert":
            seen = {"initial": ["|".join(flatten.position_key(p)) for p in account.positions]}
            fields = dict(core.close_summary(seen, account, self.pool.rules or {}, 0, 0, [], self.closer.scope, ""),
                          status=flatten.RESIDUAL,
                          detail=f"policy_alert:no_orders_sent open_orders:{len(account.orders)}")
        else:
            self.set_status(f"halt guard: closing ({reason})")
        status = self.own_close(event_id, reason, fields=fields, halt_state=state, force_halt=False,
                                keepalive=self.guard_keepalive, extra={"halt_event_id": state.event_id})
        done = {"last_enforcement_ms": wall_ms(), "last_enforcement_event_id": event_id,
                "last_enforcement": f"{reason} {status}"}
        if action == "enforce":
            done.update(last_status=status, last_status_for=state.event_id)
        return done

    def hold_guard(self):
        return self.ledger.hold_lease(self.config.consumer, guard_policy.lease_ms(self.config.halt_guard_s))

    def guard_keepalive(self, _save=False):
        """While the guard reads or closes: watchdog pings, and the lease renewed every step
        so that no other EEW starts guarding meanwhile."""
        self.notifier.ping()
        if self.ledger is None or not core.due(self.at, "lease", time.monotonic(),
                                               guard_policy.step_s(self.config.halt_guard_s)):
            return
        # Not renewed (a Redis error): keep closing, the close is reduce-only and re-reads before
        # it ends. If the lease lapses meanwhile another EEW's guard may act too, reduce-only on
        # what is left.
        if best_effort("guard_lease_not_renewed", self.current_event, self.hold_guard) is False:
            log.warning("guard_lease_lost", event_id=self.current_event)


class Worker(Entries, LostPanics, OwnAuthority):
    """The loop: performs the core's commands (eexit/eew_core.py) and feeds results back.

    Blindness: the EEW is "unable" from the first moment it cannot do its job (Redis
    unreachable, or a command error on reading, claiming, recording or reporting panics) until
    a pass reads entries cleanly again (core.Liveness); a reconnect alone does not end it. Once
    unable for longer than EEXIT_BUS_LOSS_CLOSE_S it closes on its own authority, either way.

    WATCHDOG=1 while blind by a command error: pings continue until that close has run (it is
    loop progress; stopping earlier would let systemd kill us before the close, and the units
    never retry exit 2), then stop, with the reason in STATUS= and the heartbeat, so systemd
    restarts the EEW and the restarted one runs its preflight again. With the close disabled
    (EEXIT_BUS_LOSS_CLOSE_S=0) the pings stop at once. Redis merely unreachable is not
    blindness of the EEW itself: pings continue and reconnecting is the job."""

    def __init__(self, config, notifier=None):
        self.config = config
        self.notifier = notifier or Notifier()
        self.block_ms = int(min(config.block_ms, self.notifier.max_block_s(config.block_ms / 1000) * 1000))
        self.pool = ExchangePool(config.exchange_config, config.concurrency)
        venue = exchange.venue(config.exchange_config.exchange_id)
        self.warm = warm_connections(venue.SEGMENTS, venue.BOOKS, venue.BATCH_ORDERS, config.order_limits,
                                     config.concurrency)
        self.closer = Closer(config, self.pool, Pacer(config.order_limits))
        self.journal = Journal(config.journal_path)
        self.journaled = {item["key"] for item in self.journal.unpublished()}   # reports waiting on disk
        self.trouble = daemon.RedisTrouble(log)
        self.backoff = daemon.Backoff(0.1, 2.0)
        self.redis = self.ledger = self.heartbeat = None
        self.stopping = self.preflighted = self.ready_sent = False
        self.status_text = ""
        self.at = {}                      # timer -> monotonic time it is next due (core.due)
        self.account_future = None
        self.account_problem = None       # "exchange_authentication" while the key is refused
        self.live = core.Liveness(unable_since=time.monotonic())      # until the first clean pass
        self.pass_blind, self.pass_lost = None, False
        self.unreported = {}              # event_id -> why: authorised panics without a final report
        self.guard_alerted = None         # exposure_key of the last alert-policy report
        self.current_event = "-"
        self.last_positions = None
        self.tamper_seen = set()          # tamper findings already closed for (keys)
        self.stream_broken = None         # the panic stream cannot take entries (reason)
        self.audit_cursor = self.resume_cursor = "0-0"   # stream audit / resume requests read to here
        self.peek_cursor = "0-0"          # newest entry screened ahead of a backlog

    # -- lifecycle

    def run(self):
        daemon.on_stop_signal(lambda: setattr(self, "stopping", True))
        log.info("starting", consumer=self.config.consumer, block_ms=self.block_ms,
                 deadline_s=self.config.close_deadline_s, claim_idle_ms=self.config.claim_idle_ms,
                 bus_loss_close_s=self.config.bus_loss_close_s, concurrency=self.config.concurrency,
                 authorized=",".join(self.config.authorized_sources),
                 signatures=signing.advertise(self.config.keyring)["signatures"])
        while not self.stopping:
            self.iteration()
        self.notifier.stopping()
        log.info("stopped", consumer=self.config.consumer)

    def iteration(self):
        """One pass, then core.pass_ended decides whether the EEW was able to do its job."""
        self.pass_blind, self.pass_lost = None, False
        entries = self.survive(self.one_pass)
        self.end_pass(entries is not None and self.pass_blind is None and not self.pass_lost)

    def survive(self, step):
        """step() for the loop, which must never die: a Redis error is classified
        (redis_failed); a bug outside entry handling is logged and makes the pass not clean:
        if it repeats, the bus-loss close runs (fail-closed), where dying would stop all panics."""
        try:
            return step()
        except ConfigError:
            raise
        except bus.REDIS_ERRORS as exc:
            self.redis_failed(exc, "iteration")
        except Exception as exc:  # noqa: BLE001 - the loop must never die (see above)
            log_bug("loop_error", exc, event_id=self.current_event)
            self.pass_blind = self.pass_blind or f"loop_error:{type(exc).__name__}"
            time.sleep(0.2)
        finally:
            self.current_event = "-"
        return None

    def one_pass(self):
        """Liveness, Redis, markets, journal, the lost-panic checks, at most one batch of
        entries; then (only after the panics) the halt guard and one resume request. Returns
        the entries read, None if none could be read."""
        self.beat()
        if not self.bus_ok():
            return None
        self.ensure_markets()
        self.check_account()
        self.job_step("publish_journal", schema.PROCESSED_KEY, self.publish_journal)
        self.job_step("guard", schema.PANIC_STREAM, self.guard)
        entries = self.job_step("read_entries", schema.PANIC_STREAM, self.next_entries)
        self.handle_batch(entries or [])
        if entries is not None and self.pass_blind is None:
            if not entries:    # panics first: a resume request only in a pass that had none
                self.job_step("resume", resume.REQUEST_STREAM, self.serve_resume_request)
            self.job_step("halt_guard", schema.GUARD_KEY, self.halt_guard)
        self.send_ready()
        return entries

    def end_pass(self, clean):
        before, now = self.live, time.monotonic()
        outcome = core.PassEnd.CLEAN if clean else core.PassEnd.BLIND if self.pass_blind else core.PassEnd.LOST
        self.live = core.pass_ended(self.live, outcome, now, self.pass_blind)
        if before.blind and not self.live.blind:
            log.info("blind_ended", was=before.blind)
        if clean:
            self.backoff.reset()
            return
        if self.live.blind and self.live.blind != before.blind:
            log.critical("blind", why=self.live.blind, close_in_s=self.config.bus_loss_close_s)
        self.survive(self.on_unable)

    def job_step(self, step, key, fn):
        """fn(), or None after a Redis error (redis_failed: transport -> Redis dropped, command
        -> blind). Skipped (None) once Redis was lost in this pass."""
        if self.redis is None:
            return None
        try:
            return fn()
        except bus.REDIS_ERRORS as exc:
            self.redis_failed(exc, step, key)
            return None

    # -- liveness

    def beat(self):
        """WATCHDOG=1 and the EEW heartbeat. Only called from the loop's own progress."""
        if core.pings_allowed(self.live, self.config.bus_loss_close_s):
            self.notifier.ping()
        beat_due = core.due(self.at, "beat", time.monotonic(), self.config.heartbeat_interval_s)
        if self.heartbeat is None or not beat_due:
            return
        # Named until the report stands in Redis: failed handling, or a report only on disk
        # (the journal survives a restart, this process's memory does not).
        waiting = list(self.unreported) + sorted(set(self.journaled) - set(self.unreported))
        unreported = ",".join(f"panic_unreported:{event_id}" for event_id in waiting[:3])
        reasons = [why for why in ("" if self.pool.ready else "markets_not_loaded",
                                   self.journaled and "journal_backlog", unreported, self.account_problem,
                                   self.live.blind and f"blind:{self.live.blind}", self.stream_broken) if why]
        extra = {"consumer": self.config.consumer,   # what we accept: watchdogs check it
                 "authorized": ",".join(self.config.authorized_sources),
                 **signing.advertise(self.config.keyring)}
        if reasons:
            # `reason` is what `eexit status` and the alert notifier read from any heartbeat.
            extra["reason"] = extra["degraded_reason"] = ",".join(reasons)
        try:
            self.heartbeat.publish("DEGRADED" if reasons else "OK", self.last_positions, wall_ms(), extra=extra)
        except bus.REDIS_ERRORS as exc:
            if self.trouble.report(exc, "XADD", schema.EEW_HEARTBEAT_STREAM) == "transport":
                raise
            # Our heartbeat refused (NOPERM, WRONGTYPE): `eexit status` sees it go stale; the
            # panic path is separate and still served.

    def set_status(self, text):
        if text != self.status_text:
            self.status_text = text
            self.notifier.status(text)

    def send_ready(self):
        """READY=1 once the EEW can act at once: Redis read, markets loaded, the first round
        of warm connections open and the first pass's work (journal, lost-panic checks,
        pending entries) done. systemd restarts an EEW exactly when a panic may be pending:
        a panic published at READY=1 then meets warm connections, not a start-up."""
        if self.ready_sent or not self.pool.ready or self.pool.warming or self.pass_blind or self.pass_lost:
            return
        self.notifier.ready("waiting for panic events")
        self.ready_sent = True
        self.set_status("waiting for panic events")

    # -- Redis

    def bus_ok(self):
        if self.redis is not None:
            return True
        if not core.due(self.at, "reconnect", time.monotonic()):
            self.pass_lost = True
            return False
        client = None
        try:
            client = bus.connect(self.config.redis_url)
            if not self.preflighted:
                # Before READY=1, once: version, ACL. Refusals are ConfigError (exit 2).
                daemon.preflight(client, PROBES, multi=True)
                self.preflighted = True
            client.ping()
            bus.ensure_group(client, schema.PANIC_STREAM, schema.EEW_GROUP, start_id="0")
        except bus.REDIS_ERRORS as exc:
            # Still down: back off and let on_unable decide about a bus-loss close. Reachable but
            # refusing our group (NOPERM, WRONGTYPE): blind, not down, and the same back-off.
            if self.redis_failed(exc, "connect", schema.PANIC_STREAM) is core.ErrorKind.COMMAND:
                self.at["reconnect"] = time.monotonic() + self.backoff.next()
                client.close()
            return False
        self.redis, self.ledger = client, Ledger(client)
        self.heartbeat = Heartbeat(client, self.config.consumer, schema.EEW_HEARTBEAT_STREAM)
        self.at.pop("sweep", None)     # a restart may have left our entries pending
        self.at.pop("guard_sweep", None)
        self.audit_cursor = "0-0"      # check the whole stream against the group once more
        self.resume_cursor = f"{max(0, bus.server_time_ms(client) - int(resume.REQUEST_MAX_AGE_S * 1000))}-0"
        log.info("redis_connected", down_s=round(core.unable_for(self.live, time.monotonic()), 3))
        return True

    def redis_failed(self, exc, step, key=""):
        """The one place a Redis error is classified (bus.is_transport_error, logged by
        daemon.RedisTrouble): transport -> the client is dropped and the pass is LOST (an
        entry being handled stays pending, resumed after the reconnect); command -> blind on
        this path (no reconnect: the same command would fail the same way; on_unable closes on
        own authority once that lasts too long). Returns the core.ErrorKind."""
        kind = core.ErrorKind(self.trouble.report(exc, step, key))
        if kind is core.ErrorKind.TRANSPORT:
            self.lost_redis(exc)
        else:
            self.pass_blind = self.pass_blind or f"{step}:{daemon.cause(exc)}"
        return kind

    def lost_redis(self, exc):
        """Redis went away: this pass is not clean (core.PassEnd.LOST), the client is dropped."""
        self.pass_lost = True
        if self.redis is not None:
            log.error("redis_lost", event_id=self.current_event, error=type(exc).__name__, cause=daemon.cause(exc))
            try:
                self.redis.close()
            except bus.REDIS_ERRORS:
                # Closing a dead connection may fail; the client is dropped either way and
                # a fresh one is built on reconnect.
                pass
        self.redis = self.ledger = self.heartbeat = None
        self.at["reconnect"] = time.monotonic() + self.backoff.next()
        self.set_status(f"redis unreachable for {core.unable_for(self.live, time.monotonic()):.0f}s: "
                        f"{daemon.cause(exc)}")

    def on_unable(self):
        """Unable to do the job: maybe flatten on our own authority, then wait a little."""
        limit = self.config.bus_loss_close_s
        if core.close_due(self.live, time.monotonic(), limit):
            status = self.bus_loss_close(core.unable_for(self.live, time.monotonic()),
                                         repeat=self.live.next_close is not None)
            self.live = core.closed(self.live, time.monotonic(), guard_policy.repeat_close_s(
                self.config.halt_guard_s, limit, status))
        if self.live.blind is not None and not core.pings_allowed(self.live, limit):
            self.set_status(f"blind ({self.live.blind}): watchdog pings stopped"
                            + (", closed on own authority" if self.live.blind_closed else ""))
        wait = self.at.get("reconnect", 0.0) - time.monotonic() if self.redis is None else self.backoff.next()
        time.sleep(max(0.0, min(wait, 0.5)))

    def ensure_markets(self):
        if self.pool.ready or not core.due(self.at, "markets", time.monotonic()):
            return
        try:
            self.pool.load_markets()
            log.info("markets_loaded", markets=len(self.pool.rules))
        except Exception as exc:  # noqa: BLE001 - retried; events are still handled meanwhile
            # Not ready: READY=1 is withheld and the heartbeat says DEGRADED; a panic arriving
            # now still runs and retries the markets inside its own deadline.
            self.at["markets"] = time.monotonic() + 2.0
            log.error("markets_load_failed", error=_error_text(exc, self.pool.exchange_id))
            return
        if not self.ready_sent and self.config.keepalive_s > 0:
            # Warm the connections before READY=1 (send_ready waits for the round to end).
            self.pool.maintain(time.monotonic(), self.warm, self.config.keepalive_s, self.closer.pacer)
            futures.wait(self.pool.warming, timeout=self.config.exchange_config.timeout_ms / 1000 + 1)

    def check_account(self):
        """One private read-only call every EEXIT_ACCOUNT_CHECK_S, on a pool thread (never
        blocking the loop): markets load from a public endpoint, so only this shows a wrong
        or revoked key before a panic needs it. A refused key makes the heartbeat DEGRADED
        (degraded_reason=exchange_authentication); panics are still halted and attempted."""
        if self.account_future is not None and self.account_future.done():
            try:
                self.account_future.result()
                if self.account_problem:
                    log.info("exchange_account_ok", was=self.account_problem)
                self.account_problem = None
            except Exception as exc:  # noqa: BLE001 - classified: only a refused key degrades
                # A transient failure says nothing about the key: keep the last verdict.
                kind = exchange.classify_error(exc, exchange_id=self.pool.exchange_id)
                if kind.kind == "auth":
                    if self.account_problem is None:
                        log.critical("exchange_authentication_failed", error=_error_text(exc, self.pool.exchange_id),
                                     note="panics will halt trading but cannot close positions")
                    self.account_problem = "exchange_authentication"
                else:
                    log.warning("account_check_failed", error=_error_text(exc, self.pool.exchange_id))
            self.account_future = None
        failures = self.pool.maintain(time.monotonic(), self.warm, self.config.keepalive_s, self.closer.pacer)
        if failures:
            log.warning("keepalive_failed", failed=len(failures), of=self.warm, error=failures[0])
        if self.pool.ready and self.account_future is None and self.closer.pacer.paused_for() <= 0 \
                and core.due(self.at, "account_check", time.monotonic(), self.config.account_check_s):
            # The venue's cheapest signed read: no position-read weight on Binance, and it does
            # not show in a panic's own reads.
            self.account_future = self.pool.submit(exchange.check_key)


def main(argv=None):
    def start():
        config = Config.from_env()
        notifier = Notifier()
        daemon.check_exchange_timeout(config.exchange_config.timeout_ms, notifier)
        Worker(config, notifier).run()
    return daemon.main(log, start)


if __name__ == "__main__":
    sys.exit(main())

"""The audit logger: a tamper-evident, append-only record of every panic, report and halt.

    python -m eexit.audit

Redis may run without persistence, so the streams alone are not an audit trail. This daemon
copies three sources into one file (EEXIT_AUDIT_FILE), one JSON line per event:

    panic          system:panic_close, consumed in group `audit_logger` (own pending first,
                   then new; a stable consumer name, EEXIT_AUDIT_CONSUMER)
    completed      system:panic_close:completed, followed with a plain XREAD
    trading_state  system:state:trading, polled every EEXIT_AUDIT_POLL_S; a line when it changes

Every line is canonical JSON (sorted keys, no spaces, ASCII) carrying `seq` (1, 2, ...), `prev`
(the previous line's `hash`; 64 zeros for line 1) and `hash`, the SHA-256 of the line's own
canonical JSON without `hash`. An edit breaks the line's hash, a deletion, insertion or swap
breaks `seq` and `prev`. A chain cannot show that its LAST lines were cut off, so after every
append the daemon also writes `<file>.head` (atomically: temp, fsync, rename) with the seq and
hash of the last line; `verify_file` checks the file against it. Both files together can still
be rewritten by whoever can write them: ship the Prometheus metric `eexit_audit_lines` (or
copies of the file) off the host to anchor them (docs/OPERATIONS.md).

Exactly once. Lines are written and fsynced BEFORE the panic entries are acknowledged. The
resume point comes from the file itself, never from a separate cursor: every stream line names
its stream and entry id, so on start the daemon knows every entry it has written. A crash
between fsync and XACK leaves the entry pending; it is redelivered, recognised as written, and
only acknowledged (no duplicate). The completion stream is read from the newest completion
entry id in the file (no gap). A line torn by a crash mid-write (no final newline) was never
acknowledged: it is moved aside to `<file>.torn-<ms>` and the entry is written again.

Exit codes: 2 bad configuration; 3 the audit file fails verification on start (an operator
must look: appending to a broken chain would bury the break); 1 the audit file cannot be
locked, read, written or fsynced (systemd restarts us; entries not yet acknowledged stay in
Redis). Redis being unreachable is not an exit: back off, reconnect, catch up.

The same loop writes Prometheus metrics (eexit/metrics.py) to EEXIT_METRICS_FILE every
EEXIT_METRICS_INTERVAL_S for node_exporter's textfile collector.
"""

import fcntl
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

from . import bus, daemon, metrics, schema
from .config import ConfigError, env_float, env_str
from .log import Logger
from .notify import Notifier

GENESIS = "0" * 64
KIND_BY_STREAM = {schema.PANIC_STREAM: "panic", schema.COMPLETED_STREAM: "completed"}
KINDS = ("panic", "completed", "trading_state")
CHAIN_KEYS = ("seq", "prev", "hash")

IO_ERROR_EXIT_CODE = 1
CHAIN_BROKEN_EXIT_CODE = 3

READ_COUNT = 64
# Harmless preflight probes (daemon.preflight): a read of a group that does not exist fails
# after the ACL check; XACK of an id never delivered changes nothing.
PROBES = (("XREADGROUP", "GROUP", "eexit-preflight", "preflight", "COUNT", "1", "STREAMS", schema.PANIC_STREAM, ">"),
          ("XACK", schema.PANIC_STREAM, schema.AUDIT_GROUP, "0-1"),
          ("XPENDING", schema.PANIC_STREAM, schema.AUDIT_GROUP),
          ("XREVRANGE", schema.COMPLETED_STREAM, "+", "-", "COUNT", "1"),
          ("HGETALL", schema.TRADING_STATE_KEY), ("TIME",))


class AuditFileError(Exception):
    """The audit file could not be locked, read, written or fsynced. Deliberately not an
    OSError, so that it is never mistaken for a Redis connection error (bus.REDIS_ERRORS)."""


class ChainBroken(Exception):
    def __init__(self, line_number, reason):
        super().__init__(f"line {line_number}: {reason}" if line_number else reason)
        self.line_number = line_number
        self.reason = reason


# ---------------------------------------------------------------- the chain (pure) ----

def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def seal(seq, prev, body):
    """The `seq`-th line holding `body` after a line whose hash is `prev`.
    Returns (line bytes without newline, the line's hash)."""
    content = {key: value for key, value in body.items() if key not in CHAIN_KEYS}
    content.update(seq=seq, prev=prev)
    digest = hashlib.sha256(canonical(content)).hexdigest()
    content["hash"] = digest
    return canonical(content), digest


def check_line(raw, expected_seq, expected_prev):
    """The parsed line, or raise ChainBroken naming what is wrong with it."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChainBroken(expected_seq, "not a JSON line (edited, or garbage inserted)") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("hash"), str):
        raise ChainBroken(expected_seq, "not an audit line (no hash)")
    if canonical(obj) != raw:
        raise ChainBroken(expected_seq, "not in canonical form (the line was edited)")
    content = {key: value for key, value in obj.items() if key != "hash"}
    if hashlib.sha256(canonical(content)).hexdigest() != obj["hash"]:
        raise ChainBroken(expected_seq, "content does not match its hash (the line was edited)")
    seq = obj.get("seq")
    if type(seq) is not int or seq != expected_seq:
        raise ChainBroken(expected_seq, f"seq is {seq!r}, expected {expected_seq} "
                                        "(a line was deleted, inserted or moved)")
    if obj.get("prev") != expected_prev:
        raise ChainBroken(expected_seq, f"prev does not match the hash of line {expected_seq - 1} "
                                        "(a line was deleted, inserted or moved before this one)")
    if obj.get("kind") not in KINDS:
        raise ChainBroken(expected_seq, f"unknown kind {obj.get('kind')!r}")
    return obj


def split_lines(data):
    """(complete lines, torn tail). A tail without a final newline is an interrupted write."""
    head, newline, tail = data.rpartition(b"\n")
    if not newline:
        return [], data
    return head.split(b"\n"), tail


def check_chain(lines):
    """Verify complete lines in order; returns the parsed lines or raises ChainBroken."""
    parsed, prev = [], GENESIS
    for number, raw in enumerate(lines, start=1):
        obj = check_line(raw, number, prev)
        parsed.append(obj)
        prev = obj["hash"]
    return parsed


def check_head(parsed, head):
    """Compare the verified lines with the head record {seq, hash} (None: no head file);
    raise ChainBroken. The head may lag the file (a crash between the file's fsync and the
    head's rename), never lead it."""
    if head is None:
        if parsed:
            raise ChainBroken(None, "the .head file is missing: cannot show that no lines were "
                                    "cut off the end")
        return
    seq = head.get("seq") if isinstance(head, dict) else None
    if type(seq) is not int or seq < 0 or not isinstance(head.get("hash"), str):
        raise ChainBroken(None, "the head file is malformed")
    if seq > len(parsed):
        raise ChainBroken(len(parsed) + 1, f"missing: the head file records {seq} lines, the file "
                                           f"has {len(parsed)} (lines were cut off the end)")
    recorded = parsed[seq - 1]["hash"] if seq else GENESIS
    if recorded != head["hash"]:
        raise ChainBroken(seq or None, "does not match the hash recorded in the head file "
                                       "(the line was rewritten)")


def head_path(path):
    return path + ".head"


def read_head(path):
    """The head record, or None when there is no head file; raise ChainBroken if unreadable."""
    try:
        with open(head_path(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChainBroken(None, f"cannot read the head file: {exc.strerror}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ChainBroken(None, "the head file is not JSON") from None


def verify_data(data, head):
    """Verify file content against its head record; returns the parsed lines."""
    lines, torn = split_lines(data)
    parsed = check_chain(lines)
    if torn:
        raise ChainBroken(len(lines) + 1, "incomplete (no final newline): an interrupted write; "
                                          "the daemon moves it aside when it starts")
    check_head(parsed, head)
    return parsed


def verify_file(path):
    """Check an audit file and its head. Returns (ok, first broken line number or None, reason).
    Used by `eexit audit verify FILE`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return False, None, f"cannot read {path}: {exc.strerror}"
    try:
        parsed = verify_data(data, read_head(path))
    except ChainBroken as broken:
        return False, broken.line_number, str(broken)
    last = parsed[-1]["hash"] if parsed else GENESIS
    return True, None, f"{len(parsed)} lines, chain intact, head {last}"


# ------------------------------------------------------- what the file already holds ----

def text(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return str(value)


def decode_fields(raw):
    return {text(key): text(value) for key, value in (raw or {}).items()}


def fields_digest(fields):
    return hashlib.sha256(canonical(fields)).hexdigest()


def id_key(entry_id):
    ms, _, seq = str(entry_id).partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (-1, -1)


def stream_body(stream, entry_id, fields, logged_ms):
    return {"kind": KIND_BY_STREAM[stream], "stream": stream, "entry_id": entry_id,
            "fields": fields, "logged_ms": logged_ms}


def trading_state_body(fields, server_ms, logged_ms):
    return {"kind": "trading_state", "key": schema.TRADING_STATE_KEY, "exists": bool(fields),
            "fields": fields, "server_ms": server_ms, "logged_ms": logged_ms}


class Written:
    """What the lines already in the file say: the resume point for every source."""

    def __init__(self):
        self.seen = {}                      # (stream, entry_id) -> digest of its fields
        self.completed_position = "0-0"     # newest completion entry id in the file
        self.trading_state = {}             # last logged contents of the hash ({} = absent)
        self.counters = metrics.Counters()  # the _total counters of the metrics file

    def add(self, body):
        if body["kind"] == "trading_state":
            self.trading_state = body["fields"]
            return
        self.counters.add(body["stream"], body["fields"])
        key = (body["stream"], body["entry_id"])
        self.seen[key] = fields_digest(body["fields"])
        if body["stream"] == schema.COMPLETED_STREAM and \
                id_key(body["entry_id"]) > id_key(self.completed_position):
            self.completed_position = body["entry_id"]

    def has(self, stream, entry_id, fields):
        """True when this entry is already in the file. A pending entry deleted from the stream
        comes back with no fields: its id alone identifies it. An id with different fields is a
        different event (a stream recreated after a Redis restart reused the id): not written."""
        digest = self.seen.get((stream, entry_id))
        return digest is not None and (not fields or digest == fields_digest(fields))


# ------------------------------------------------------------------- file I/O ----

def fsync_directory(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data, mode=0o600):
    """Replace `path` with `data` so that a reader sees the old or the new file, never a part:
    write a temp file beside it, fsync, rename, fsync the directory. Raises OSError. The temp
    name does not end in .prom, so node_exporter never reads a half-written file. `mode` is
    set explicitly because the unit's UMask=0077 would hide the metrics from node_exporter."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass    # the temp file was never created or is already gone; the caller gets the first error
        raise
    fsync_directory(path)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class AuditFile:
    """The open, locked audit file and the in-memory end of its chain."""

    def __init__(self, path, log):
        self.path = path
        self.log = log
        self.written = Written()
        self.seq = 0
        self.last_hash = GENESIS
        self.size = 0
        self.fd = None

    def open(self):
        """Lock, verify, repair a torn tail, and load the resume point.
        Raises AuditFileError or ChainBroken."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise AuditFileError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            # Two writers would fork the chain: refuse rather than wait.
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise AuditFileError(f"{self.path} is locked by another process (a second audit "
                                 "logger?)") from None
        try:
            data = self._read_all()
            lines, torn = split_lines(data)
            if torn:
                self._move_torn_tail(torn, len(data) - len(torn))
            parsed = check_chain(lines)
            check_head(parsed, read_head(self.path))
            for obj in parsed:
                self.written.add(obj)
            if parsed:
                self.seq, self.last_hash = parsed[-1]["seq"], parsed[-1]["hash"]
            self.size = len(data) - len(torn)
            self._write_head()
        except OSError as exc:
            raise AuditFileError(f"cannot read or repair {self.path}: {exc.strerror}") from None
        return self

    def _read_all(self):
        chunks, offset = [], 0
        while True:
            chunk = os.pread(self.fd, 1 << 20, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def _move_torn_tail(self, torn, keep):
        aside = f"{self.path}.torn-{int(time.time() * 1000)}"
        write_atomic(aside, torn)
        os.ftruncate(self.fd, keep)
        os.fsync(self.fd)
        self.log.error("torn_line_moved_aside", file=self.path, bytes=len(torn), moved_to=aside,
                       note="an interrupted write, never acknowledged; the entry is written again")

    def _write_head(self):
        write_atomic(head_path(self.path), canonical({"seq": self.seq, "hash": self.last_hash}) + b"\n")

    def append(self, bodies):
        """Append one line per body, fsync, then update the head. Returns when the lines are on
        disk; raises AuditFileError (the caller exits: after a failed write or fsync the file's
        state is unknown, and the unacknowledged entries stay in Redis for the next start)."""
        if not bodies:
            return
        chunks, seq, prev = [], self.seq, self.last_hash
        for body in bodies:
            seq += 1
            line, prev = seal(seq, prev, body)
            chunks.append(line + b"\n")
        data = b"".join(chunks)
        try:
            if os.fstat(self.fd).st_size != self.size:
                raise AuditFileError(f"{self.path} changed size behind our back "
                                     f"({os.fstat(self.fd).st_size} bytes, expected {self.size})")
            write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError as exc:
            raise AuditFileError(f"cannot append to {self.path}: {exc.strerror}") from None
        self.size += len(data)
        self.seq, self.last_hash = seq, prev
        for body in bodies:
            self.written.add(body)
        try:
            self._write_head()
        except OSError as exc:
            raise AuditFileError(f"cannot write {head_path(self.path)}: {exc.strerror}") from None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------- the daemon ----

@dataclass(frozen=True)
class Config:
    redis_url: str
    audit_file: str
    metrics_file: str          # "" when metrics are off
    consumer: str
    poll_s: float
    metrics_interval_s: float
    claim_idle_s: float
    up_max_age_s: float

    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        # systemd's StateDirectory=eexit-audit sets STATE_DIRECTORY: the defaults live there.
        state_dir = (env.get("STATE_DIRECTORY") or "").split(":")[0]
        audit_file = env_str("EEXIT_AUDIT_FILE", os.path.join(state_dir, "audit.jsonl") if state_dir else None, env)
        metrics_file = env_str("EEXIT_METRICS_FILE", os.path.join(state_dir, "eexit.prom") if state_dir else None, env)
        if metrics_file.lower() == "off":
            metrics_file = ""
        for name, path in (("EEXIT_AUDIT_FILE", audit_file), ("EEXIT_METRICS_FILE", metrics_file)):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ConfigError(f"{name}={path!r}: the directory does not exist")
        if metrics_file and not metrics_file.endswith(".prom"):
            # node_exporter's textfile collector reads only *.prom: any other name is a file
            # nobody reads, and alerts that never fire.
            raise ConfigError(f"EEXIT_METRICS_FILE={metrics_file!r} must end in .prom (or be off)")
        consumer = env_str("EEXIT_AUDIT_CONSUMER", "audit-1", env)
        return cls(
            redis_url=bus.redis_url(env),
            audit_file=audit_file,
            metrics_file=metrics_file,
            consumer=consumer,
            poll_s=env_float("EEXIT_AUDIT_POLL_S", 1.0, minimum=0.01, maximum=bus.BLOCK_MS_MAX / 1000, env=env),
            metrics_interval_s=env_float("EEXIT_METRICS_INTERVAL_S", 5.0, minimum=0.05, maximum=300, env=env),
            claim_idle_s=env_float("EEXIT_AUDIT_CLAIM_IDLE_S", 60.0, minimum=0.1, maximum=86400, env=env),
            up_max_age_s=env_float("EEXIT_METRICS_UP_MAX_AGE_S", 5.0, minimum=0.1, maximum=3600, env=env),
        )


class AuditLogger:
    def __init__(self, config, audit_file, log, notifier):
        self.config = config
        self.file = audit_file
        self.log = log
        self.notifier = notifier
        self.client = None
        self.completed_position = audit_file.written.completed_position
        self.last_append_ms = None
        self.next_metrics = 0.0

    # One source each; every method raises the Redis error to the loop.

    def record(self, stream, entries):
        """Write the entries not yet in the file (one fsync), then acknowledge panic entries."""
        now = int(time.time() * 1000)
        bodies = []
        for entry_id, raw in entries:
            fields = decode_fields(raw)
            if self.file.written.has(stream, entry_id, fields):
                self.log.info("already_written", stream=stream, entry_id=entry_id)
                continue
            if (stream, entry_id) in self.file.written.seen:
                self.log.warning("entry_id_reused", stream=stream, entry_id=entry_id,
                                 note="same id, different fields: a recreated stream; written")
            bodies.append(stream_body(stream, entry_id, fields, now))
        self.file.append(bodies)
        if bodies:
            self.last_append_ms = now
            for body in bodies:
                self.log.info("written", seq=self.file.seq, kind=body["kind"], entry_id=body["entry_id"],
                              event_id=body["fields"].get("event_id", ""))
        if stream == schema.PANIC_STREAM and entries:
            self.client.xack(stream, schema.AUDIT_GROUP, *[entry_id for entry_id, _ in entries])

    def catch_up(self):
        """After every (re)connect: own pending entries, then entries orphaned by another
        consumer name."""
        bus.ensure_group(self.client, schema.PANIC_STREAM, schema.AUDIT_GROUP)
        while True:
            pending = bus.read_group(self.client, schema.PANIC_STREAM, schema.AUDIT_GROUP,
                                     self.config.consumer, block_ms=0, count=READ_COUNT, pending=True)
            if not pending:
                break
            self.record(schema.PANIC_STREAM, pending)
        claimed = bus.claim_idle(self.client, schema.PANIC_STREAM, schema.AUDIT_GROUP, self.config.consumer,
                                 int(self.config.claim_idle_s * 1000), count=READ_COUNT)
        if claimed:
            self.log.warning("claimed_orphaned_entries", count=len(claimed))
            self.record(schema.PANIC_STREAM, claimed)

    def poll_panics(self):
        entries = bus.read_group(self.client, schema.PANIC_STREAM, schema.AUDIT_GROUP,
                                 self.config.consumer, block_ms=1, count=READ_COUNT)
        self.record(schema.PANIC_STREAM, entries)

    def poll_completed(self, block_ms):
        # Checked every round, not only after our own reconnect: redis-py retries a command
        # over a fresh connection by itself, so a Redis restart may never reach our except.
        newest = self.client.xrevrange(schema.COMPLETED_STREAM, count=1)
        newest_id = text(newest[0][0]) if newest else "0-0"
        if id_key(newest_id) < id_key(self.completed_position):
            # The stream is behind what we logged: Redis lost it. Read it again from the start;
            # Written.has() keeps entries we already hold from being written twice.
            self.log.warning("completed_stream_reset", logged_up_to=self.completed_position,
                             stream_newest=newest_id)
            self.completed_position = "0-0"
        reply = self.client.xread({schema.COMPLETED_STREAM: self.completed_position},
                                  count=READ_COUNT, block=block_ms)
        entries = [(text(entry_id), fields) for _stream, items in reply or [] for entry_id, fields in items]
        self.record(schema.COMPLETED_STREAM, entries)
        if entries:
            self.completed_position = entries[-1][0]

    def poll_trading_state(self):
        fields = decode_fields(self.client.hgetall(schema.TRADING_STATE_KEY))
        if fields == self.file.written.trading_state:
            return
        now = int(time.time() * 1000)
        self.file.append([trading_state_body(fields, bus.server_time_ms(self.client), now)])
        self.last_append_ms = now
        self.log.info("written", seq=self.file.seq, kind="trading_state",
                      halted=fields.get("halted", "absent"), event_id=fields.get("event_id", ""))

    def write_metrics(self, redis_up):
        if not self.config.metrics_file or time.monotonic() < self.next_metrics:
            return
        self.next_metrics = time.monotonic() + self.config.metrics_interval_s
        snapshot = metrics.Snapshot(redis_up=False, audit_lines=self.file.seq,
                                    audit_last_append_ms=self.last_append_ms, counters=self.file.written.counters)
        if redis_up:
            # A Redis error here propagates: the loop reconnects and the next round reports
            # redis_up 0.
            snapshot = metrics.read_snapshot(self.client, snapshot)
        try:
            write_atomic(self.config.metrics_file, metrics.render(snapshot, self.config.up_max_age_s).encode(),
                         mode=0o644)
        except OSError as exc:
            # Metrics are not the audit trail: keep auditing, say so each round. A stale file
            # is visible to Prometheus (node_textfile_mtime_seconds) and alerted on.
            self.log.error("metrics_write_failed", file=self.config.metrics_file, error=exc.strerror)

    def run(self, stop):
        backoff, reported_lines = daemon.Backoff(0.2, 5.0), None
        block_ms = max(1, int(self.notifier.max_block_s(self.config.poll_s) * 1000))
        while not stop.is_set():
            self.notifier.ping()
            try:
                if self.client is None:
                    self.client = bus.connect(url=self.config.redis_url)
                    self.catch_up()
                    self.log.info("connected", consumer=self.config.consumer, lines=self.file.seq,
                                  completed_from=self.completed_position)
                    backoff.reset()
                self.poll_panics()
                self.poll_completed(block_ms)
                self.poll_trading_state()
                self.write_metrics(redis_up=True)
                if self.file.seq != reported_lines:
                    reported_lines = self.file.seq
                    self.notifier.status(f"lines={reported_lines}")
            except bus.REDIS_ERRORS as exc:
                # Redis is gone, slow or lost its state. Nothing unacknowledged is lost (it stays
                # pending or in the stream); reconnect with backoff and catch up from the file.
                wait = backoff.next()
                self.log.warning("redis_unavailable", error=type(exc).__name__, cause=daemon.cause(exc),
                                 detail=str(exc)[:200], retry_in_s=wait)
                self.drop_client()
                self.write_metrics(redis_up=False)
                stop.wait(wait)

    def drop_client(self):
        if self.client is not None:
            try:
                self.client.close()
            except bus.REDIS_ERRORS:
                pass    # the connection is being thrown away; a failed close changes nothing
            self.client = None


def main():
    log = Logger("audit")
    return daemon.main(log, lambda: _start(log))


def _start(log):
    config = Config.from_env()
    stop = threading.Event()
    daemon.on_stop_signal(stop.set)
    probe_client = bus.connect(url=config.redis_url)
    try:
        if not daemon.wait_for_redis(probe_client, PROBES, log, stop.is_set, stop.wait):
            return 0
    finally:
        probe_client.close()
    audit_file = AuditFile(config.audit_file, log)
    try:
        audit_file.open()
    except ChainBroken as broken:
        log.critical("audit_chain_broken", file=config.audit_file, line=broken.line_number or "",
                     reason=broken.reason, action="not starting: move the file and its .head aside "
                     "after looking at them; the streams in Redis still hold the events")
        return CHAIN_BROKEN_EXIT_CODE
    except AuditFileError as exc:
        log.critical("audit_file_error", error=str(exc))
        return IO_ERROR_EXIT_CODE
    notifier = Notifier()
    notifier.ready(status=f"lines={audit_file.seq}")
    log.info("ready", file=config.audit_file, lines=audit_file.seq, metrics_file=config.metrics_file or "off")
    logger = AuditLogger(config, audit_file, log, notifier)
    try:
        logger.run(stop)
    except AuditFileError as exc:
        # After a failed write or fsync the file's state is unknown: stop, let systemd restart
        # us, and let the start-up check verify the file and move a torn line aside.
        log.critical("audit_file_error", error=str(exc))
        return IO_ERROR_EXIT_CODE
    finally:
        notifier.stopping()
        logger.drop_client()
        audit_file.close()
    log.info("stopped", lines=audit_file.seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())

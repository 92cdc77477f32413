"""The audit logger: a tamper-evident, append-only record of every panic, report and halt.

    python -m eexit.audit

Redis may run without persistence, so the streams alone are not an audit trail. This daemon
copies three sources into one file (EEXIT_AUDIT_FILE), one JSON line per event:

    panic          system:panic_close             followed with a plain XREAD (no consumer group)
    completed      system:panic_close:completed   followed with a plain XREAD, in the same call
    risk           eexit:risk:events              the risk kernel's baselines and rebases, same call
    trading_state  system:state:trading, polled every EEXIT_AUDIT_POLL_S; a line when it changes

The audit logger reads, never consumes: it has no consumer group, and its Redis user may not
run XREADGROUP, XACK, XGROUP or XCLAIM at all (systemd/redis-acl.conf), so its password can
neither take, acknowledge, skip nor reposition the EEW's panics (issue 14).

Every line is canonical JSON (sorted keys, no spaces, ASCII) carrying `seq` (1, 2, ...), `prev`
(the previous line's `hash`; 64 zeros for line 1) and `hash`, the SHA-256 of the line's own
canonical JSON without `hash`. An edit breaks the line's hash, a deletion, insertion or swap
breaks `seq` and `prev`. A chain cannot show that its LAST lines were cut off, nor that lines
were added with a recomputed chain, so the daemon also keeps `<file>.head` (written atomically:
temp, fsync, rename) with the seq and hash of the last line it wrote.

The head is written BEFORE the lines it records (a write-ahead record: `seq`/`hash` of the batch
about to be appended, `base_seq`/`base_hash` of the file before it), then the lines are appended
and fsynced. So the only states a crash can leave are: file == head, or file == base (plus
possibly part of the batch, complete lines or a torn one). A file holding lines the head does
not record (more lines than `seq`) is never a crash of ours: it is a forgery, `verify_file`
names its first such line, and the daemon refuses to start on it (exit 3) instead of sealing
it. On start the daemon moves an interrupted batch (lines after `base`, torn or not) aside to
`<file>.torn-<ms>` and writes those entries again from Redis. Verification also fails on an
interrupted batch (an operator cannot tell it from the batch being cut off); starting the
daemon repairs it. Both files together can still be rewritten by whoever can write them: ship
the Prometheus metric `eexit_audit_lines` (or copies of the file) off the host to anchor them
(docs/OPERATIONS.md).

Exactly once. The resume point comes from the file itself, never from a separate cursor: every
stream line names its stream and entry id, so on start the daemon reads each stream from the
newest entry id the file holds for it. Stream ids only grow, so nothing after that id is
skipped, and nothing at or before it is read again: a crash between fsync and the next read
neither loses nor duplicates a line. A stream found behind that id (Redis lost it) is read
again from the start; lines already held (same id, same fields) are not written twice.

Exit codes: 2 bad configuration; 3 the audit file fails verification on start, including
lines the head does not record (an operator must look: appending to a broken or forged chain
would bury the break); 1 the audit file cannot be locked, read, written or fsynced (systemd
restarts us; entries not yet written are still in Redis). Redis being unreachable is not an
exit: back off, reconnect, catch up.

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
# eexit:risk:events: the risk kernel's baselines, rebase verdicts, warnings and panics (issue 25).
KIND_BY_STREAM = {schema.PANIC_STREAM: "panic", schema.COMPLETED_STREAM: "completed", "eexit:risk:events": "risk"}
KINDS = ("panic", "completed", "trading_state", "risk")
CHAIN_KEYS = ("seq", "prev", "hash")

IO_ERROR_EXIT_CODE = 1
CHAIN_BROKEN_EXIT_CODE = 3

READ_COUNT = 64
# Harmless preflight probes (daemon.preflight): all reads. The audit user is read-only (it
# may not touch any consumer group: SECURITY.md), so it probes exactly what it reads.
PROBES = (("XREAD", "COUNT", "1", "STREAMS", schema.PANIC_STREAM, schema.COMPLETED_STREAM, "0-0", "0-0"),
          ("XREVRANGE", schema.COMPLETED_STREAM, "+", "-", "COUNT", "1"),
          ("HGETALL", schema.TRADING_STATE_KEY), ("TIME",))
REMOVED_SETTINGS = ("EEXIT_AUDIT_CONSUMER", "EEXIT_AUDIT_CLAIM_IDLE_S")   # the group is gone


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
    """Verify complete lines in order; returns their hashes or raises ChainBroken. Hashes, not
    the parsed lines: a long file's parsed lines cost several times its size in memory."""
    hashes, prev = [], GENESIS
    for number, raw in enumerate(lines, start=1):
        prev = check_line(raw, number, prev)["hash"]
        hashes.append(prev)
    return hashes


def head_record(seq, last_hash, base_seq, base_hash):
    """The head written before appending lines base_seq+1..seq (base == seq: nothing pending)."""
    return {"seq": seq, "hash": last_hash, "base_seq": base_seq, "base_hash": base_hash}


def committed_lines(hashes, head):
    """How many of the verified lines (their hashes) the head vouches for, or raise ChainBroken.

    The head is written before the lines it records (see the module docstring), so:
      file == head.seq lines, the last one's hash == head.hash      all lines committed
      head.base_seq <= file < head.seq, line base matches base_hash  an interrupted write:
                                                                     the first base lines
      more lines than head.seq                                       forged: never ours
      fewer lines than base, or a hash that does not match           cut off or rewritten
    A head without base_* (written by an older version) has nothing pending. A missing head is
    never legitimate, not even beside an empty file: the daemon writes the head before it
    creates the file (AuditFile.open), so an emptied file whose head was deleted is BROKEN."""
    if head is None:
        raise ChainBroken(None, f"the .head file is missing: cannot show that no lines were cut off "
                                f"the end ({len(hashes)} lines left; an emptied file is no proof of anything)")
    if not isinstance(head, dict):
        raise ChainBroken(None, "the head file is malformed")
    seq, base = head.get("seq"), head.get("base_seq", head.get("seq"))
    recorded = (head.get("hash"), head.get("base_hash", head.get("hash")))
    if type(seq) is not int or type(base) is not int or not 0 <= base <= seq or \
            not all(isinstance(value, str) for value in recorded):
        raise ChainBroken(None, "the head file is malformed")
    count = len(hashes)
    if count > seq:
        raise ChainBroken(seq + 1, f"not recorded in the head file (it records {seq} lines, the file "
                                   f"has {count}): lines appended by someone other than the audit "
                                   "daemon, with a recomputed chain")
    committed, expected = (seq, recorded[0]) if count == seq else (base, recorded[1])
    if count < committed:
        raise ChainBroken(count + 1, f"missing: the head file records {committed} lines, the file "
                                     f"has {count} (lines were cut off the end)")
    if (hashes[committed - 1] if committed else GENESIS) != expected:
        raise ChainBroken(committed or None, "does not match the hash recorded in the head file "
                                             "(the line was rewritten)")
    return committed


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
    """Verify file content against its head record; returns the lines' hashes."""
    lines, torn = split_lines(data)
    hashes = check_chain(lines)
    committed = committed_lines(hashes, head)
    pending = head is not None and committed < head["seq"]
    if pending or torn:
        what = (f"the head records a write of lines {committed + 1}..{head['seq']} that did not "
                "finish (a crash mid-write, or those lines were cut off)") if pending else \
            "incomplete (no final newline): an interrupted write"
        raise ChainBroken(committed + 1, f"{what}; the audit daemon moves it aside when it starts "
                                         "and writes those entries again from Redis")
    return hashes


def verify_file(path):
    """Check an audit file and its head. Returns (ok, first broken line number or None, reason).
    Used by `eexit audit verify FILE`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return False, None, f"cannot read {path}: {exc.strerror}"
    try:
        hashes = verify_data(data, read_head(path))
    except ChainBroken as broken:
        return False, broken.line_number, str(broken)
    return True, None, f"{len(hashes)} lines, chain intact, head {hashes[-1] if hashes else GENESIS}"


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
        self.positions = {stream: "0-0" for stream in KIND_BY_STREAM}   # newest entry id per stream
        self.trading_state = {}             # last logged contents of the hash ({} = absent)
        self.counters = metrics.Counters()  # the _total counters of the metrics file

    def add(self, body):
        if body["kind"] == "trading_state":
            self.trading_state = body["fields"]
            return
        self.counters.add(body["stream"], body["fields"])
        key = (body["stream"], body["entry_id"])
        self.seen[key] = fields_digest(body["fields"])
        if id_key(body["entry_id"]) > id_key(self.positions[body["stream"]]):
            self.positions[body["stream"]] = body["entry_id"]

    def has(self, stream, entry_id, fields):
        """True when this entry is already in the file. An id with different fields is a
        different event (a stream recreated after a Redis restart reused the id): not written."""
        digest = self.seen.get((stream, entry_id))
        return digest is not None and digest == fields_digest(fields)


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
        """Lock, verify, move an interrupted write aside, and load the resume point.
        Raises AuditFileError or ChainBroken."""
        try:
            if not os.path.exists(self.path) and not os.path.exists(head_path(self.path)):
                # The very first start: the head first (an empty chain), then the file, so
                # that no crash leaves a file without its head (which verification refuses).
                write_atomic(head_path(self.path), canonical(head_record(0, GENESIS, 0, GENESIS)) + b"\n")
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
            hashes = check_chain(lines)
            committed = committed_lines(hashes, read_head(self.path))
            keep = sum(len(line) + 1 for line in lines[:committed])
            if keep < len(data):
                # An interrupted write (see committed_lines): never acknowledged anywhere, the
                # entries are still in Redis and are read again from the cursor below.
                self._move_aside(data[keep:], keep, lines=len(hashes) - committed, torn=bool(torn))
            for raw in lines[:committed]:
                self.written.add(json.loads(raw))       # verified above
            if committed:
                self.seq, self.last_hash = committed, hashes[committed - 1]
            self.size = keep
            self._write_head(self.seq, self.last_hash)
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

    def _move_aside(self, tail, keep, lines, torn):
        aside = f"{self.path}.torn-{int(time.time() * 1000)}"
        write_atomic(aside, tail)
        os.ftruncate(self.fd, keep)
        os.fsync(self.fd)
        self.log.error("interrupted_write_moved_aside", file=self.path, bytes=len(tail), lines=lines,
                       torn=torn, moved_to=aside, note="a write the head had not committed; the "
                       "entries are written again from Redis")

    def _write_head(self, seq, last_hash):
        record = head_record(seq, last_hash, self.seq, self.last_hash)
        write_atomic(head_path(self.path), canonical(record) + b"\n")

    def append(self, bodies):
        """Record the batch in the head, then append one line per body and fsync. Returns when
        the lines are on disk; raises AuditFileError (the caller exits: after a failed write or
        fsync the file's state is unknown; the start-up check moves an interrupted batch aside
        and the entries are read again from Redis)."""
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
            self._write_head(seq, prev)
            write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError as exc:
            raise AuditFileError(f"cannot append to {self.path}: {exc.strerror}") from None
        self.size += len(data)
        self.seq, self.last_hash = seq, prev
        for body in bodies:
            self.written.add(body)

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
    poll_s: float
    metrics_interval_s: float
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
        for name in REMOVED_SETTINGS:
            if env.get(name):
                raise ConfigError(f"{name} is no longer used: the audit logger follows the streams "
                                  "with XREAD and has no consumer group; remove it")
        return cls(
            redis_url=bus.redis_url(env),
            audit_file=audit_file,
            metrics_file=metrics_file,
            poll_s=env_float("EEXIT_AUDIT_POLL_S", 1.0, minimum=0.01, maximum=bus.BLOCK_MS_MAX / 1000, env=env),
            metrics_interval_s=env_float("EEXIT_METRICS_INTERVAL_S", 5.0, minimum=0.05, maximum=300, env=env),
            up_max_age_s=env_float("EEXIT_METRICS_UP_MAX_AGE_S", 5.0, minimum=0.1, maximum=3600, env=env),
        )


class AuditLogger:
    def __init__(self, config, audit_file, log, notifier):
        self.config = config
        self.file = audit_file
        self.log = log
        self.notifier = notifier
        self.client = None
        self.positions = dict(audit_file.written.positions)
        self.last_append_ms = None
        self.next_metrics = 0.0

    # One source each; every method raises the Redis error to the loop.

    def record(self, stream, entries):
        """Write the entries not yet in the file (one fsync)."""
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

    def poll_streams(self, block_ms):
        """Both streams in one XREAD from the newest id the file holds for each."""
        for stream, position in self.positions.items():
            # Checked every round, not only after our own reconnect: redis-py retries a command
            # over a fresh connection by itself, so a Redis restart may never reach our except.
            newest = self.client.xrevrange(stream, count=1)
            newest_id = text(newest[0][0]) if newest else "0-0"
            if id_key(newest_id) < id_key(position):
                # The stream is behind what we logged: Redis lost it. Read it again from the
                # start; Written.has() keeps entries we already hold from being written twice.
                self.log.warning("stream_reset", stream=stream, logged_up_to=position, stream_newest=newest_id)
                self.positions[stream] = "0-0"
        reply = self.client.xread(self.positions, count=READ_COUNT, block=block_ms)
        for stream_name, items in reply or []:
            stream = text(stream_name)
            entries = [(text(entry_id), fields) for entry_id, fields in items]
            self.record(stream, entries)
            if entries:
                self.positions[stream] = entries[-1][0]

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
                    self.log.info("connected", lines=self.file.seq,
                                  panic_from=self.positions[schema.PANIC_STREAM],
                                  completed_from=self.positions[schema.COMPLETED_STREAM])
                    backoff.reset()
                self.poll_streams(block_ms)
                self.poll_trading_state()
                self.write_metrics(redis_up=True)
                if self.file.seq != reported_lines:
                    reported_lines = self.file.seq
                    self.notifier.status(f"lines={reported_lines}")
            except bus.REDIS_ERRORS as exc:
                # Redis is gone, slow or lost its state. Nothing not yet written is lost (it is
                # still in the stream); reconnect with backoff and read on from the file's cursor.
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

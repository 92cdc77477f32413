"""The alert notifier: tells a human about every panic, report, halt violation, resume, silent
daemon and exchange authentication failure.

    python -m eexit.alert

Not on the EEW's critical path: it only READS Redis (its ACL user cannot write anything but its
own heartbeat), and the EEW never waits for it. It follows, with plain XREAD from cursors it
keeps itself (never a consumer group: nobody but the EEW and the audit logger may touch the
panic stream's groups):

    system:panic_close              -> panic
    system:panic_close:completed    -> report (halt_violation when reason=HALT_VIOLATION)
    eexit:ops:audit                 -> resume (action=resume)
    system:state:trading            -> resume (halted true -> false), polled
    the daemons' heartbeat streams  -> daemon_silent (older than EEXIT_ALERT_SILENT_S on the
                                       Redis clock), exchange_auth (EEW heartbeat DEGRADED with
                                       a `reason`); one alert per episode, one when it ends

Guarantee: at-least-once delivery per sink, with a stable message id (`<kind>:<stream entry
id>`, see message_id). A message is delivered when the sink answered 2xx and a `delivered`
record is fsynced in the outbox; a kill between the two re-sends it once with the same id, so
a receiver can recognise the retry. What is read from Redis and what is queued are ONE journal
line (the stream cursor and the messages it produced), so a kill never loses an event and
never queues one twice.

The outbox (EEXIT_ALERT_OUTBOX) is an append-only JSON-lines journal, fsynced per write and
compacted (temp, fsync, rename) when it grows; apply() is its pure state machine. A torn last
line (a kill mid-write) was never acknowledged to anyone and is cut off on start.

Delivery: one worker thread per sink, so a sink that is down or hangs never delays another.
Each worker sends its oldest pending message; transport errors, 5xx, 408 and 429 are retried
with capped exponential backoff (retry_delay_s) until EEXIT_ALERT_RETRY_FOR_S after the message
was queued (default 24 h, at least 1 h); any other 4xx is a command error that no retry can
fix: the message is given up for that sink at once and logged CRITICAL.

Exit codes: 2 bad configuration; 3 the outbox is corrupt (a line in the middle does not
parse: an operator must look); 1 the outbox cannot be locked, written or fsynced (systemd
restarts us; nothing acknowledged is lost). Redis being unreachable is not an exit: the
workers keep delivering what is queued while the loop backs off and reconnects.
"""

import fcntl
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import bus, health, schema
from .config import CONFIG_EXIT_CODE, ConfigError, env_float, env_str
from .heartbeat import Heartbeat
from .log import Logger
from .notify import Notifier

OPS_AUDIT_STREAM = "eexit:ops:audit"          # written by eexit/ops.py (not imported: a daemon)
ALERT_HEARTBEAT_STREAM = "eexit:alert:heartbeat"
RISK_EVENTS_STREAM = "eexit:risk:events"     # written by eexit/risk.py (not imported: ccxt-free but not needed)
FOLLOWED = (schema.PANIC_STREAM, schema.COMPLETED_STREAM, OPS_AUDIT_STREAM, RISK_EVENTS_STREAM)
RISK_ALERTED = ("risk_warning", "breach_while_halted")   # the risk kernel's kinds a human hears of
DAEMONS = (("exit_brain", schema.HEARTBEAT_STREAM), ("eew", schema.EEW_HEARTBEAT_STREAM),
           ("watchdog", schema.WATCHDOG_HEARTBEAT_STREAM))
ROUTINE = ("FLAT", "DUPLICATE")    # any other report status (RESIDUAL, FAILED, REJECTED, unknown) needs a human
SIGNATURE_HEADER = "X-Eexit-Signature"
ID_HEADER = "X-Eexit-Id"

IO_ERROR_EXIT_CODE = 1
CORRUPT_EXIT_CODE = 3
READ_COUNT = 100
COMPACT_AFTER_LINES = 5000
SEEN_KEPT = 20000
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0


# ------------------------------------------------------------ which alerts (pure) ----

def message_id(kind, entry_id, suffix=""):
    """Stable across retries and restarts: the kind and the stream entry that caused it."""
    return f"{kind}:{entry_id}" + (f":{suffix}" if suffix else "")


def make_message(kind, msg_id, event_id="", status="", reason="", ts=None, detail="", needs_human=False):
    flag = "NEEDS A HUMAN: " if needs_human else ""
    words = [f"[eexit] {flag}{kind}", status, f"event={event_id}" if event_id else "",
             f"reason={reason}" if reason else "", detail, f"(id {msg_id})"]
    return {"id": msg_id, "kind": kind, "event_id": event_id, "status": status, "reason": reason,
            "ts": ts, "needs_human": needs_human, "text": " ".join(w for w in words if w)}


def alerts_for_entry(stream, entry_id, fields):
    """The messages one stream entry produces (fields: str -> str)."""
    ts = schema.entry_id_ms(entry_id)
    if stream == schema.PANIC_STREAM:
        event, _ = schema.PanicEvent.from_fields(fields)
        return [make_message("panic", message_id("panic", entry_id), event.event_id, "PUBLISHED",
                             event.reason, event.ts or ts, f"issued_by={event.issued_by or '?'}",
                             needs_human=True)]
    if stream == schema.COMPLETED_STREAM:
        report, _ = schema.CompletionReport.from_fields(fields)
        kind = "halt_violation" if report.reason == "HALT_VIOLATION" else "report"
        detail = f"closed {report.positions_closed}/{report.positions_total}"
        if report.residual_positions:
            detail += f" residual={json.dumps(report.residual_positions, separators=(',', ':'))[:300]}"
        if report.detail:
            detail += f" detail={report.detail[:300]}"
        return [make_message(kind, message_id(kind, entry_id), report.event_id, report.status or "?",
                             report.reason, report.ts_completed or ts, detail,
                             needs_human=kind == "halt_violation" or report.status not in ROUTINE)]
    if stream == RISK_EVENTS_STREAM:
        # The risk kernel's warnings (once per crossing, hysteresis: the kernel decides), its
        # breaches while trading is halted, and refused rebase requests: kind risk_warning.
        kind = fields.get("kind", "")
        if kind in RISK_ALERTED or (kind == "rebase" and fields.get("status") == "refused"):
            detail = f"rule={fields.get('rule', '-')} {fields.get('context', fields.get('why', ''))[:300]}"
            return [make_message("risk_warning", message_id("risk_warning", entry_id), status=kind.upper(),
                                 reason=fields.get("rule", ""), ts=ts, detail=detail,
                                 needs_human=kind != "risk_warning")]
        return []
    if stream == OPS_AUDIT_STREAM and fields.get("action") == "resume":
        # Same id as the trading-state change it wrote (cleared_at == ts): one message.
        return [resume_message(fields.get("ts") or entry_id, fields.get("event_id", ""),
                               f"operator={fields.get('operator', '?')}", ts)]
    return []


def resume_message(cleared_at, event_id, detail, ts):
    return make_message("resume", message_id("resume", cleared_at), event_id, "RESUMED", "", ts, detail)


def trading_alerts(previous, fields, server_ms):
    """(new remembered halted value, messages) for a poll of system:state:trading. Only a
    halted -> not halted change is an alert (halting is announced by the panic and report)."""
    halted = fields.get("halted", "").strip().lower() not in ("false", "0")   # missing/unreadable: halted
    if previous is True and not halted:
        cleared_at = fields.get("cleared_at") or str(server_ms)
        return halted, [resume_message(cleared_at, fields.get("event_id", ""),
                                       f"cleared_by={fields.get('cleared_by') or '?'}", server_ms)]
    return halted, []


def daemon_alerts(name, previous, last, now_ms, silent_ms):
    """(new episode state, messages) for one daemon. previous: {"silent": id|None, "auth": id|None}
    (the entry that opened the episode); last: (entry_id, fields) of its newest heartbeat or
    None. Ages are Redis TIME minus the entry id's ms: one clock, no cross-host wall clocks."""
    state = dict(previous or {"silent": None, "auth": None})
    out = []
    entry_id = last[0] if last else "none"
    sent_ms = schema.entry_id_ms(entry_id) if last else None
    age_ms = None if sent_ms is None else now_ms - sent_ms
    if age_ms is None or age_ms > silent_ms:
        if state["silent"] is None:
            state["silent"] = entry_id
            age = "never" if age_ms is None else f"{age_ms / 1000:.1f}s"
            out.append(make_message("daemon_silent", message_id("daemon_silent", entry_id, name), "",
                                    "SILENT", "", now_ms, f"daemon={name} last_heartbeat_age={age}",
                                    needs_human=True))
        return state, out
    if state["silent"] is not None:
        out.append(make_message("daemon_silent", message_id("daemon_silent", state["silent"], f"{name}:back"),
                                "", "BACK", "", now_ms, f"daemon={name} heartbeating again"))
        state["silent"] = None
    beat, _ = schema.Heartbeat.from_fields(last[1])
    reason = beat.extra.get("reason", "")
    if name == "eew" and beat.status == "DEGRADED" and reason:
        if state["auth"] is None:
            state["auth"] = entry_id
            out.append(make_message("exchange_auth", message_id("exchange_auth", entry_id), "", "DEGRADED",
                                    reason, now_ms, "the EEW's account check fails", needs_human=True))
    elif state["auth"] is not None:
        out.append(make_message("exchange_auth", message_id("exchange_auth", state["auth"], "cleared"),
                                "", "CLEARED", "", now_ms, "the EEW's account check passes again"))
        state["auth"] = None
    return state, out


# ------------------------------------------------------------ backoff (pure) ----

def retry_delay_s(attempt, start_s, max_s):
    """Delay before retry number `attempt` (1 = the first retry): start, 2x, 4x ... capped."""
    return min(max_s, start_s * (2 ** min(max(attempt - 1, 0), 60)))


def retry_schedule(start_s, max_s, retry_for_s):
    """The delays a message sees before it is given up (for tests and docs)."""
    delays, total, attempt = [], 0.0, 1
    while total < retry_for_s:
        delay = retry_delay_s(attempt, start_s, max_s)
        delays.append(delay)
        total += delay
        attempt += 1
    return delays


def is_retryable(status):
    """None: transport error (no HTTP answer). 5xx, 408, 429: the sink may recover."""
    return status is None or status >= 500 or status in (408, 429)


# ------------------------------------------------------------ outbox state (pure) ----

def empty_state():
    return {"cursors": {}, "trading": None, "daemons": {}, "messages": {}, "seen": {},
            "last": {}}


def apply(state, record):
    """The outbox state after one journal record (mutates and returns `state`).

    read     {cursors, trading?, daemons?, msgs: [message], sinks, at}: what was read and queued
    done     {id, sink, at, result: delivered|rejected|expired}: that sink is finished with it
    Messages: {id: {"msg", "pending": [sinks], "queued_at"}}; an id already seen is not queued
    again (Redis lost its streams and gave the same ids back, or a resume seen twice)."""
    op = record.get("op")
    if op == "read":
        state["cursors"].update(record.get("cursors", {}))
        if "trading" in record:
            state["trading"] = record["trading"]
        state["daemons"].update(record.get("daemons", {}))
        for msg in record.get("msgs", []):
            if msg["id"] in state["seen"]:
                continue
            state["seen"][msg["id"]] = record["at"]
            state["messages"][msg["id"]] = {"msg": msg, "pending": list(record["sinks"]),
                                            "queued_at": record["at"]}
    elif op == "done":
        entry = state["messages"].get(record["id"])
        if entry is not None and record["sink"] in entry["pending"]:
            entry["pending"].remove(record["sink"])
            if not entry["pending"]:
                del state["messages"][record["id"]]
        state["last"][record["sink"]] = {"id": record["id"], "at": record["at"], "result": record["result"]}
    elif op == "snapshot":
        state = {key: record[key] for key in empty_state()}
    return state


def snapshot(state):
    seen = sorted(state["seen"].items(), key=lambda item: item[1])[-SEEN_KEPT:]
    return dict({key: state[key] for key in empty_state()}, op="snapshot", seen=dict(seen))


def pending_for(state, sink):
    """Message ids pending for a sink, oldest first."""
    return [mid for mid, entry in sorted(state["messages"].items(), key=lambda item: item[1]["queued_at"])
            if sink in entry["pending"]]


# ------------------------------------------------------------ the outbox file ----

class OutboxError(Exception):
    """The outbox cannot be locked, written or fsynced (not an OSError: never mistaken for a
    Redis connection error)."""


class OutboxCorrupt(Exception):
    pass


class Outbox:
    """The journal file plus its state, shared by the reader loop and the sink workers."""

    def __init__(self, path, log):
        self.path, self.log = path, log
        self.state = empty_state()
        self.lines = 0
        self.lock = threading.Condition()
        self.fd = None

    def open(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise OutboxError(f"cannot open or lock {self.path} (a second notifier?): {exc.strerror}") from None
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            head, newline, torn = data.rpartition(b"\n")
            if torn:
                # A kill mid-write: never fsynced as a whole, never acted upon. Cut it off.
                self.log.warning("torn_outbox_line_cut", bytes=len(torn))
                os.ftruncate(self.fd, len(head) + len(newline))
                os.fsync(self.fd)
        except OSError as exc:
            # main exits 1; systemd restarts us and we try again.
            raise OutboxError(f"cannot read or repair {self.path}: {exc.strerror}") from None
        for number, raw in enumerate(head.split(b"\n") if newline else [], start=1):
            try:
                record = json.loads(raw)
                if record.get("op") not in ("read", "done", "snapshot"):
                    raise ValueError("unknown op")
                self.state = apply(self.state, record)
            except (ValueError, KeyError, TypeError, AttributeError):
                # Not a torn tail but a damaged middle: guessing what it said could drop or
                # repeat alerts. main exits 3 for an operator to look.
                raise OutboxCorrupt(f"{self.path} line {number} is not an outbox record") from None
            self.lines += 1
        return self

    def append(self, record):
        """Write one record, fsync, then apply it. Raises OutboxError."""
        data = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        with self.lock:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
                os.fsync(self.fd)
            except OSError as exc:
                raise OutboxError(f"cannot append to {self.path}: {exc.strerror}") from None
            self.state = apply(self.state, record)
            self.lines += 1
            if self.lines >= COMPACT_AFTER_LINES:
                self._compact()
            self.lock.notify_all()

    def _compact(self):
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(snapshot(self.state), separators=(",", ":"), sort_keys=True).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            fd = os.open(tmp, os.O_RDWR | os.O_APPEND)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self.path)
            dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)
        except OSError as exc:
            raise OutboxError(f"cannot compact {self.path}: {exc.strerror}") from None
        os.close(self.fd)
        self.fd, self.lines = fd, 1


# ------------------------------------------------------------ sinks ----

@dataclass(frozen=True)
class Sink:
    name: str
    url: str            # never logged for telegram: the token is in its path
    kind: str           # webhook | telegram | ntfy
    chat_id: str = ""
    hmac_key: str = ""

    def request(self, msg):
        """(url, body bytes, headers) for one message."""
        if self.kind == "telegram":
            body = json.dumps({"chat_id": self.chat_id, "text": msg["text"],
                               "disable_web_page_preview": True}).encode()
            return self.url, body, {"Content-Type": "application/json"}
        if self.kind == "ntfy":
            headers = {"Title": f"eexit {msg['kind']} {msg['status']}"[:200], ID_HEADER: msg["id"],
                       "Priority": "5" if msg["needs_human"] else "3", "Tags": msg["kind"]}
            return self.url, msg["text"].encode(), headers
        body = json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", ID_HEADER: msg["id"]}
        if self.hmac_key:
            digest = hmac.new(self.hmac_key.encode(), body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        return self.url, body, headers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None     # a 3xx surfaces as HTTPError: urllib would re-send a POST as a bodiless GET


# No proxies from the environment (the tests talk only to 127.0.0.1), no redirects.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def send(sink, msg, timeout_s):
    """(ok, http status or None, short error). Never raises; the error text never holds the URL."""
    url, body, headers = sink.request(msg)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with OPENER.open(request, timeout=timeout_s) as response:
            answer = response.read(65536)
            if sink.kind == "telegram" and not json.loads(answer or b"{}").get("ok"):
                return False, response.status, "telegram answered ok=false"
            return True, response.status, ""
    except urllib.error.HTTPError as exc:
        return False, exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # Transport: refused, reset, timed out, a broken answer. Retried by the worker.
        reason = getattr(exc, "reason", None)
        return False, None, type(reason if isinstance(reason, BaseException) else exc).__name__


class SinkWorker(threading.Thread):
    """Delivers one sink's messages, oldest first; never touches another sink."""

    def __init__(self, sink, outbox, config, log, stop):
        super().__init__(name=f"sink-{sink.name}", daemon=True)
        self.sink, self.outbox, self.config, self.log, self.stop = sink, outbox, config, log, stop
        self.attempts = {}
        self.last_error = ""
        self.failure = None

    def run(self):
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - see below
            # OutboxError: the outbox state on disk is unknown. Anything else is a bug. Either
            # way this sink delivers nothing more: stop the daemon (exit 1, systemd restarts
            # us) rather than keep pinging the watchdog with a dead sink.
            self.failure = exc
            self.stop.set()

    def _next(self):
        with self.outbox.lock:
            ids = pending_for(self.outbox.state, self.sink.name)
            if not ids:
                self.outbox.lock.wait(0.5)
                return None
            entry = self.outbox.state["messages"][ids[0]]
            return dict(entry["msg"]), entry["queued_at"]

    def _loop(self):
        while not self.stop.is_set():
            picked = self._next()
            if picked is None:
                continue
            msg, queued_at = picked
            ok, status, error = send(self.sink, msg, self.config.http_timeout_s)
            now = int(time.time() * 1000)
            if ok:
                self.outbox.append({"op": "done", "id": msg["id"], "sink": self.sink.name, "at": now,
                                    "result": "delivered"})
                self.log.info("delivered", sink=self.sink.name, id=msg["id"], status=status,
                              attempts=self.attempts.pop(msg["id"], 0) + 1)
                self.last_error = ""
                continue
            self.last_error = error
            attempt = self.attempts[msg["id"]] = self.attempts.get(msg["id"], 0) + 1
            expired = (now - queued_at) / 1000 >= self.config.retry_for_s
            if not is_retryable(status) or expired:
                # A 4xx means the sink refuses this message; retrying cannot change that.
                result = "expired" if is_retryable(status) else "rejected"
                self.outbox.append({"op": "done", "id": msg["id"], "sink": self.sink.name, "at": now,
                                    "result": result})
                self.attempts.pop(msg["id"], None)
                self.log.critical("alert_given_up", sink=self.sink.name, id=msg["id"], result=result,
                                  error=error, attempts=attempt)
                continue
            delay = retry_delay_s(attempt, self.config.retry_start_s, self.config.retry_max_s)
            self.log.warning("delivery_failed", sink=self.sink.name, id=msg["id"], error=error,
                             attempt=attempt, retry_in_s=round(delay, 3))
            self.stop.wait(delay)


def outbox_status(last, now_ms):
    """What `eexit status` shows of the alert outbox, from the notifier's newest heartbeat
    (entry_id, fields) or None: {"age_ms", "status", "pending", "sinks": {name: {...}}}."""
    if last is None:
        return {"age_ms": None, "status": None, "pending": None, "sinks": {}}
    entry_id, fields = last
    sent_ms = schema.entry_id_ms(entry_id)
    sinks = {}
    for key, value in fields.items():
        name, _, item = key[len("sink_"):].partition("_") if key.startswith("sink_") else ("", "", "")
        if name and item:
            sinks.setdefault(name, {})[item] = value
    pending = fields.get("pending", "")
    return {"age_ms": None if sent_ms is None else max(0, now_ms - sent_ms), "status": fields.get("status"),
            "pending": int(pending) if pending.isdigit() else None, "sinks": sinks}


def read_outbox_status(client, now_ms):
    newest = client.xrevrange(ALERT_HEARTBEAT_STREAM, count=1)
    return outbox_status((bus.as_text(newest[0][0]), decoded(newest[0][1])) if newest else None, now_ms)


# ------------------------------------------------------------ the daemon ----

def optional_credential(name, env):
    """A secret from $CREDENTIALS_DIRECTORY/<name>; "" when absent or empty (the installer
    creates the optional ones empty so that the unit's LoadCredential= finds a file)."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return ""
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"credential {name} is unreadable: {type(exc).__name__}") from None


def _http_url(name, url, loopback_only_plain=False):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL")
    if loopback_only_plain and parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(f"{name} uses plain http to a remote host: the bot token would cross the "
                          f"network in clear; use https")
    return url.rstrip("/") if name == "EEXIT_ALERT_TELEGRAM_API" else url


def _is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    redis_url: str
    outbox: str
    sinks: tuple
    silent_s: float
    poll_s: float
    http_timeout_s: float
    retry_start_s: float
    retry_max_s: float
    retry_for_s: float
    brain_service_id: str = "exit_brain"     # the brain is judged by its own beats only

    @classmethod
    def from_env(cls, env=None):
        env = os.environ if env is None else env
        state_dir = (env.get("STATE_DIRECTORY") or "").split(":")[0]
        outbox = env_str("EEXIT_ALERT_OUTBOX", os.path.join(state_dir, "outbox.jsonl") if state_dir else None, env)
        if not os.path.isdir(os.path.dirname(os.path.abspath(outbox))):
            raise ConfigError(f"EEXIT_ALERT_OUTBOX={outbox!r}: the directory does not exist")
        sinks = []
        webhook = env_str("EEXIT_ALERT_WEBHOOK_URL", "", env)
        if webhook:
            sinks.append(Sink("webhook", _http_url("EEXIT_ALERT_WEBHOOK_URL", webhook), "webhook",
                              hmac_key=optional_credential("alert_webhook_key", env)))
        chat_id = env_str("EEXIT_ALERT_TELEGRAM_CHAT_ID", "", env)
        if chat_id:
            token = optional_credential("telegram_bot_token", env)
            if not token:
                raise ConfigError("EEXIT_ALERT_TELEGRAM_CHAT_ID is set but the credential "
                                  "telegram_bot_token is missing or empty")
            api = _http_url("EEXIT_ALERT_TELEGRAM_API", env_str("EEXIT_ALERT_TELEGRAM_API",
                                                                 "https://api.telegram.org", env), True)
            sinks.append(Sink("telegram", f"{api}/bot{token}/sendMessage", "telegram", chat_id=chat_id))
        ntfy = env_str("EEXIT_ALERT_NTFY_URL", "", env)
        if ntfy:
            sinks.append(Sink("ntfy", _http_url("EEXIT_ALERT_NTFY_URL", ntfy), "ntfy"))
        if not sinks:
            raise ConfigError("no alert sink configured: set EEXIT_ALERT_WEBHOOK_URL, "
                              "EEXIT_ALERT_TELEGRAM_CHAT_ID or EEXIT_ALERT_NTFY_URL")
        start = env_float("EEXIT_ALERT_RETRY_START_S", 1.0, minimum=0.01, maximum=60, env=env)
        return cls(
            redis_url=bus.redis_url(env), outbox=outbox, sinks=tuple(sinks),
            silent_s=env_float("EEXIT_ALERT_SILENT_S", 10.0, minimum=0.5, maximum=3600, env=env),
            poll_s=env_float("EEXIT_ALERT_POLL_S", 1.0, minimum=0.01, maximum=bus.BLOCK_MS_MAX / 1000, env=env),
            http_timeout_s=env_float("EEXIT_ALERT_HTTP_TIMEOUT_S", 10.0, minimum=0.1, maximum=60, env=env),
            retry_start_s=start,
            retry_max_s=env_float("EEXIT_ALERT_RETRY_MAX_S", 300.0, minimum=start, maximum=3600, env=env),
            retry_for_s=env_float("EEXIT_ALERT_RETRY_FOR_S", 86400.0, minimum=3600, maximum=30 * 86400, env=env),
            brain_service_id=env_str("EEXIT_BRAIN_SERVICE_ID", "exit_brain", env),
        )


def decoded(fields):
    return {bus.as_text(k): bus.as_text(v) for k, v in (fields or {}).items()}


def id_key(entry_id):
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() and (seq or "0").isdigit() else (-1, -1)


class AlertDaemon:
    def __init__(self, config, outbox, workers, log, notifier):
        self.config, self.outbox, self.workers, self.log, self.notifier = config, outbox, workers, log, notifier
        self.sink_names = [sink.name for sink in config.sinks]
        self.client = None
        self.beat = None

    def cursors(self):
        """Where to read each stream from. First start: from the newest entry when Redis first
        answers, before READY (history before installation is not announced)."""
        cursors = dict(self.outbox.state["cursors"])
        for stream in FOLLOWED:
            newest = self.client.xrevrange(stream, count=1)
            newest_id = bus.as_text(newest[0][0]) if newest else "0-0"
            if stream not in cursors:
                cursors[stream] = newest_id
            elif id_key(newest_id) < id_key(cursors[stream]):
                # Redis lost the stream (restart without persistence): read it from the start;
                # ids already seen are not queued twice (apply).
                self.log.warning("stream_reset", stream=stream, cursor=cursors[stream], newest=newest_id)
                cursors[stream] = "0-0"
        return cursors

    def poll_streams(self, block_ms):
        cursors = dict(self.outbox.state["cursors"])      # fixed by connect() this round
        reply = self.client.xread(cursors, count=READ_COUNT, block=block_ms)
        msgs, moved = [], {}
        for stream, items in reply or []:
            stream = bus.as_text(stream)
            for entry_id, fields in items:
                entry_id = bus.as_text(entry_id)
                msgs.extend(alerts_for_entry(stream, entry_id, decoded(fields)))
                moved[stream] = entry_id
        if moved:
            # The messages and the cursor past their entries: one fsynced line, never apart.
            self.queue(msgs, cursors=dict(cursors, **moved))

    def poll_state(self):
        now_ms = bus.server_time_ms(self.client)
        fields = decoded(self.client.hgetall(schema.TRADING_STATE_KEY))
        previous = self.outbox.state["trading"]
        halted, msgs = trading_alerts(previous, fields, now_ms)
        daemons, changed = {}, halted != previous
        for name, stream in DAEMONS:
            # Another producer on the brain's stream (a bot) must not hide the brain's silence.
            last = health.newest_beat(self.client, stream, self.config.brain_service_id if name == "exit_brain" else None)
            before = self.outbox.state["daemons"].get(name)
            after, more = daemon_alerts(name, before, last, now_ms, self.config.silent_s * 1000)
            msgs.extend(more)
            daemons[name] = after
            changed = changed or after != before
        if changed or msgs:
            self.queue(msgs, trading=halted, daemons=daemons)

    def queue(self, msgs, **read):
        self.outbox.append(dict(read, op="read", msgs=msgs, sinks=self.sink_names, at=int(time.time() * 1000)))
        for msg in msgs:
            self.log.info("queued", id=msg["id"], kind=msg["kind"], event_id=msg["event_id"])

    def heartbeat(self):
        """Our own heartbeat, carrying the outbox summary that `eexit status` shows."""
        with self.outbox.lock:
            state = self.outbox.state
            extra = {"pending": len(state["messages"])}
            for worker in self.workers:
                name = worker.sink.name
                last = state["last"].get(name, {})
                extra.update({f"sink_{name}_pending": len(pending_for(state, name)),
                              f"sink_{name}_last_id": last.get("id", ""),
                              f"sink_{name}_last_at": last.get("at", ""),
                              f"sink_{name}_last_result": last.get("result", ""),
                              f"sink_{name}_error": worker.last_error})
        status = "DEGRADED" if any(worker.last_error for worker in self.workers) else "OK"
        self.beat.publish(status, None, None, extra=extra)

    def connect(self):
        """Connect and fix the cursors (on a first start: here). Raises bus.REDIS_ERRORS."""
        if self.client is None:
            self.client = bus.connect(url=self.config.redis_url)
            self.beat = Heartbeat(self.client, "eexit-alert", ALERT_HEARTBEAT_STREAM)
        cursors = self.cursors()
        if cursors != self.outbox.state["cursors"]:
            self.queue([], cursors=cursors)

    def run(self, stop):
        backoff = BACKOFF_START_S
        block_ms = max(1, int(self.notifier.max_block_s(self.config.poll_s) * 1000))
        while not stop.is_set():
            self.notifier.ping()
            try:
                self.connect()
                self.poll_streams(block_ms)
                self.poll_state()
                self.heartbeat()
                backoff = BACKOFF_START_S
            except bus.REDIS_ERRORS as exc:
                # Nothing read is lost (the cursor only moves with what it queued); the workers
                # keep delivering meanwhile. Reconnect with backoff.
                self.log.warning("redis_unavailable", error=type(exc).__name__, detail=str(exc)[:200],
                                 retry_in_s=backoff)
                self.client = None
                stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)


def main():
    log = Logger("alert")
    try:
        config = Config.from_env()
    except ConfigError as exc:
        log.critical("config_error", error=str(exc))
        return CONFIG_EXIT_CODE
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    outbox = Outbox(config.outbox, log)
    try:
        outbox.open()
    except OutboxCorrupt as exc:
        log.critical("outbox_corrupt", error=str(exc), action="not starting: move the file aside after "
                     "looking at it; the streams in Redis still hold the events")
        return CORRUPT_EXIT_CODE
    except OutboxError as exc:
        log.critical("outbox_error", error=str(exc))
        return IO_ERROR_EXIT_CODE
    names = [sink.name for sink in config.sinks]
    for mid, entry in list(outbox.state["messages"].items()):
        for sink in [s for s in entry["pending"] if s not in names]:
            # A sink removed from the configuration: nobody will ever deliver to it.
            outbox.append({"op": "done", "id": mid, "sink": sink, "at": int(time.time() * 1000),
                           "result": "unconfigured"})
    workers = [SinkWorker(sink, outbox, config, log, stop) for sink in config.sinks]
    for worker in workers:
        worker.start()
    notifier = Notifier()
    daemon = AlertDaemon(config, outbox, workers, log, notifier)
    try:
        # Before READY, so that READY means "following from here" on a first start too.
        daemon.connect()
    except bus.REDIS_ERRORS as exc:
        # Not fatal: the loop retries; a first start then follows from when Redis answers.
        log.warning("redis_unavailable", error=type(exc).__name__, detail=str(exc)[:200])
        daemon.client = None
    except OutboxError as exc:
        log.critical("outbox_error", error=str(exc))
        return IO_ERROR_EXIT_CODE
    notifier.ready(status=f"pending={len(outbox.state['messages'])}")
    log.info("ready", outbox=config.outbox, sinks=",".join(names), pending=len(outbox.state["messages"]))
    try:
        daemon.run(stop)
    except OutboxError as exc:
        log.critical("outbox_error", error=str(exc))
        return IO_ERROR_EXIT_CODE
    finally:
        notifier.stopping()
    failed = [worker for worker in workers if worker.failure]
    if failed:
        log.critical("sink_worker_failed", sink=failed[0].sink.name, error=type(failed[0].failure).__name__,
                     # Only the outbox's own message: another exception's text could hold a URL.
                     detail=str(failed[0].failure)[:200] if isinstance(failed[0].failure, OutboxError) else "")
        return IO_ERROR_EXIT_CODE
    log.info("stopped", pending=len(outbox.state["messages"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

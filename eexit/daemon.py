"""What every eexit daemon shares: main() with config errors as exit 2, a stop flag set only by
signal handlers, one backoff scheme, Redis error classification with causes logged at the first
failure, and the start-up preflight (Redis reachable, version supported, every command the
daemon uses permitted). Like huey's BaseProcess: a daemon module supplies its job; this module
supplies how a daemon starts, waits and stops.

Preflight (before READY=1). Redis unreachable at start is not a configuration error: the cause
is logged at once and the daemon keeps retrying (the EEW applies its bus-loss rules meanwhile).
These ARE configuration errors, refused with exit 2 and a message naming them:
  - a wrong password / unknown user (AuthenticationError): no retry can fix it;
  - a Redis older than MIN_REDIS_VERSION (7.0: XPENDING ... IDLE needs 6.2, and the security
    work relies on Redis 7's XINFO STREAM entries-added / max-deleted-entry-id);
  - a command the daemon needs refused by the ACL (NOPERM), found by harmless probes: Redis
    checks the ACL before it executes a command, so a call that fails harmlessly after the
    check (XADD key 0-0 ..., a read of a group that does not exist) proves the permission, and
    with MULTI the probed commands are only queued (ACL-checked) and then DISCARDed.
After start-up an AuthenticationError is a transport error (a password rotated under a running
daemon heals with a reconnect once the credential file is right).

Causes (AuthenticationError, connection refused, DNS, timeout, NOPERM, WRONGTYPE...) are logged
the first time they occur and then at most once per CAUSE_LOG_INTERVAL_S each, so a daemon
retrying ten times a second neither hides nor floods the reason.
"""

import signal
import time
import traceback

import redis

from . import bus
from .config import CONFIG_EXIT_CODE, ConfigError

MIN_REDIS_VERSION = (7, 0)
CAUSE_LOG_INTERVAL_S = 30.0
TRANSPORT_CAUSES = (("refused", "connection_refused"), ("name or service not known", "dns"),
                    ("nodename nor servname", "dns"), ("temporary failure in name resolution", "dns"),
                    ("no such file", "socket_missing"))        # (text in the error, cause named)


def main(log, start):
    """Run start() -> exit code; a ConfigError anywhere before or during it is exit 2, any
    other exception exit 1; both logged at CRITICAL, every line with its journal priority."""
    try:
        return start() or 0
    except ConfigError as exc:
        # The only exit on our own: running a configuration nobody intended is worse than
        # not running, and systemd shows the failed unit (exit code 2, never retried).
        log.critical("config_error", detail=str(exc))
        log.summary("CRITICAL", f"eexit.{log.daemon}: configuration error: {exc}")
        return CONFIG_EXIT_CODE
    except Exception as exc:
        # Broad on purpose: a bug. Its traceback goes to the journal line by line at CRITICAL
        # (printed bare it would be filed at info), then exit 1 as an uncaught exception
        # would, so systemd restarts the unit (its restart policy decides what follows).
        log.critical("unhandled_exception", error=type(exc).__name__)
        for line in traceback.format_exc().rstrip().splitlines():
            log.summary("CRITICAL", f"eexit.{log.daemon}: {line}")
        return 1


def on_stop_signal(callback):
    """SIGTERM and SIGINT call callback(); nothing else ever sets a daemon's stop flag."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: callback())
    signal.signal(signal.SIGINT, lambda _signum, _frame: callback())


class Backoff:
    """start, doubling up to maximum; reset() after a success."""

    def __init__(self, start=0.1, maximum=2.0):
        self.start, self.maximum, self.current = start, maximum, start

    def next(self):
        wait, self.current = self.current, min(self.current * 2, self.maximum)
        return wait

    def reset(self):
        self.current = self.start


def cause(exc):
    """A short, secret-free name for why a Redis call failed."""
    text = str(exc)
    if isinstance(exc, redis.AuthenticationError) or text.startswith(("WRONGPASS", "NOAUTH")):
        return "authentication"
    if isinstance(exc, redis.ResponseError):
        return text.split(" ", 1)[0] or type(exc).__name__      # NOPERM, WRONGTYPE, ERR, OOM ...
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    lowered = text.lower()
    return next((name for needle, name in TRANSPORT_CAUSES if needle in lowered), type(exc).__name__)


class RedisTrouble:
    """Classifies a Redis error and logs its cause, rate-limited per cause."""

    def __init__(self, log, interval_s=CAUSE_LOG_INTERVAL_S, monotonic=time.monotonic):
        self.log, self.interval_s, self.monotonic = log, interval_s, monotonic
        self.last_logged = {}

    def report(self, exc, command="", key=""):
        """Log exc at once, then at most once per interval_s for the same cause (a transport
        cause, or a command error of that command and key), and return "transport" or "command"."""
        why = cause(exc)
        kind = "transport" if bus.is_transport_error(exc) else "command"
        seen = (kind, why) if kind == "transport" else (kind, command, key, why)
        now = self.monotonic()
        if now - self.last_logged.get(seen, -self.interval_s - 1) >= self.interval_s:
            self.last_logged[seen] = now
            if kind == "transport":
                self.log.error("redis_unreachable", cause=why, error=type(exc).__name__,
                               detail=str(exc)[:200])
            else:
                self.log.error("redis_command_error", command=command or "-", key=key or "-",
                               error=str(exc)[:200])
        return kind


def redis_user(client):
    kwargs = getattr(client.connection_pool, "connection_kwargs", {})
    return kwargs.get("username") or "default"


def preflight(client, probes, multi=False):
    """Raise ConfigError if the credentials are refused, Redis is too old, or a probed command
    is refused; transport errors propagate (the caller retries). probes: command tuples whose
    harmless execution, or mere queueing inside MULTI when multi=True, proves the ACL allows
    them."""
    try:
        reply = client.execute_command("HELLO")         # every ACL user of ours may call it
        hello = dict(zip(reply[::2], reply[1::2])) if isinstance(reply, list) else reply
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        if cause(exc) == "authentication":
            raise ConfigError(f"REDIS_URL / redis_password: Redis refused the credentials of ACL user "
                              f"{redis_user(client)!r}") from None
        if isinstance(exc, redis.exceptions.NoPermissionError):
            raise _refused(client, ("HELLO",)) from None
        if bus.is_transport_error(exc):
            raise
        hello = {}      # HELLO without arguments exists from 6.2 (6.0 wants a protocol version)
    text = bus.as_text({bus.as_text(k): v for k, v in hello.items()}.get("version", "older than 6.2"))
    if tuple(int(part) if part.isdigit() else 0 for part in text.split(".")[:2]) < MIN_REDIS_VERSION:
        raise ConfigError(f"Redis {text} is too old: eexit needs Redis "
                          f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer")
    # One connection for every probe: inside MULTI the commands are only queued (ACL-checked),
    # and DISCARD drops them.
    connection, refused = client.connection_pool.get_connection(), None
    transaction = ((("MULTI",),), (("DISCARD",),)) if multi else ((), ())
    try:
        for probe in transaction[0] + tuple(probes) + transaction[1]:
            try:
                connection.send_command(*probe)
                connection.read_response()
            except redis.exceptions.NoPermissionError:
                refused = refused or probe
            except redis.ResponseError as exc:
                if bus.is_transport_error(exc):
                    raise
                # Any other error came after the ACL check: the command is permitted (and a
                # DISCARD after a refusal: the transaction is gone either way).
    except BaseException:
        connection.disconnect()     # a half-read reply or MULTI must never be reused
        raise
    finally:
        client.connection_pool.release(connection)
    if refused is not None:
        raise _refused(client, refused)


def _refused(client, probe):
    command = " ".join(bus.as_text(part) for part in probe[:2] if not bus.as_text(part).isdigit())
    return ConfigError(f"REDIS_URL: ACL user {redis_user(client)!r} may not run "
                       f"{bus.as_text(probe[0]).upper()} ({command}): grant it in the Redis ACL")


def wait_for_redis(client, probes, log, stopped, sleep, notifier=None):
    """Preflight until it passes; transport failures are logged (cause at once, rate-limited)
    and retried with backoff. Returns False if stopped first. ConfigError propagates."""
    trouble, backoff = RedisTrouble(log), Backoff(0.1, 2.0)
    while not stopped():
        try:
            preflight(client, probes)
            return True
        except bus.REDIS_ERRORS as exc:
            if not bus.is_transport_error(exc):
                raise
            # Not reachable yet: this is no configuration error; keep trying, say why.
            trouble.report(exc, "preflight")
            if notifier is not None:
                notifier.status(f"redis unreachable: {cause(exc)}")
            sleep(backoff.next())
    return False


def check_exchange_timeout(timeout_ms, notifier):
    """One blocking exchange call must end well within half of WatchdogSec."""
    interval = notifier.watchdog_interval_s
    if interval is not None and timeout_ms / 1000 >= interval / 2:
        raise ConfigError(f"EEXIT_EXCHANGE_TIMEOUT_MS={timeout_ms} must be below half of "
                          f"WATCHDOG_USEC={int(interval * 1e6)} (WatchdogSec): a hanging exchange "
                          f"call would stop the watchdog pings and systemd would kill the daemon")

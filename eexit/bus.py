"""Redis: connect with timeouts always set, create consumer groups, read and publish.

Every connection has a connect timeout, a read timeout and a health check (SPEC §4.10: a
half-open connection without timeouts hung the predecessor forever). Blocking reads must use a
block time well below the read timeout; `BLOCK_MS_MAX` enforces that.
"""

import os
from urllib.parse import unquote, urlsplit, urlunsplit

import redis

from .config import ConfigError, credential

DEFAULT_URL = "redis://localhost:6379/0"
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0
HEALTH_CHECK_S = 10
BLOCK_MS_MAX = int(READ_TIMEOUT_S * 1000 / 2)

# What a daemon sees when Redis is gone, slow, restarting or lost its state. Callers catch
# exactly these, back off and reconnect; anything else is a bug and is logged as such.
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                redis.ResponseError, OSError)


def redis_url(env=None):
    env = os.environ if env is None else env
    url = (env.get("REDIS_URL") or DEFAULT_URL).strip()
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REDIS_URL has scheme {scheme!r}; use redis://, rediss:// or unix://")
    return url


def connect(url=None, env=None, read_timeout_s=READ_TIMEOUT_S):
    """A client for REDIS_URL. The password may be in the URL or in the credential file
    `redis_password` (user in `redis_username`), which wins so that no secret needs to be in
    an environment file. Connecting is lazy: the first command raises if Redis is down."""
    url = url or redis_url(env)
    password = credential("redis_password", ("REDIS_PASSWORD",), env)
    username = credential("redis_username", ("REDIS_USERNAME",), env)
    parts = urlsplit(url)
    options = dict(
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=read_timeout_s,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_S,
        decode_responses=False,
    )
    if password is not None or username is not None:
        # redis-py lets a password in the URL override keyword arguments, so the URL's
        # credentials are removed before the credential files' values are applied.
        options["username"] = username if username is not None else (
            unquote(parts.username) if parts.username else None)
        options["password"] = password if password is not None else (
            unquote(parts.password) if parts.password else None)
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return redis.Redis.from_url(url, **options)


def ensure_group(client, stream, group, start_id="0"):
    """Create `group` on `stream` (and the stream) unless it exists. Idempotent; call it after
    every reconnect and on NOGROUP, because a Redis restart without persistence loses groups
    (SPEC §4.10). A new group starts at "0" by default: a panic published before any consumer
    existed is still executed (fail-closed)."""
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
        return True
    except redis.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


def is_nogroup(exc):
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


def read_group(client, stream, group, consumer, block_ms, count=16, pending=False):
    """XREADGROUP one batch: new entries (">"), or with pending=True this consumer's own
    delivered-but-unacknowledged entries ("0"). Returns [(entry_id, fields)]; a lost group is
    recreated and the read retried once."""
    if block_ms > BLOCK_MS_MAX:
        raise ValueError(f"block_ms {block_ms} exceeds {BLOCK_MS_MAX}: it must stay below the read timeout")
    start = "0" if pending else ">"
    for attempt in (1, 2):
        try:
            reply = client.xreadgroup(group, consumer, {stream: start}, count=count,
                                      block=None if pending else block_ms)
            break
        except redis.ResponseError as exc:
            if attempt == 2 or not is_nogroup(exc):
                raise
            ensure_group(client, stream, group)
    entries = []
    for _stream, items in reply or []:
        for entry_id, fields in items:
            # A pending entry deleted from the stream comes back with fields None.
            entries.append((_text(entry_id), fields or {}))
    return entries


def claim_idle(client, stream, group, consumer, min_idle_ms, count=16):
    """Take over entries that another consumer received but left unacknowledged for longer
    than min_idle_ms (it crashed or hangs). XPENDING + XCLAIM work on Redis >= 5, unlike
    XAUTOCLAIM whose reply shape changed between 6.2 and 7 (SPEC §6)."""
    pending = client.xpending_range(stream, group, min="-", max="+", count=count, idle=min_idle_ms)
    ids = [item["message_id"] for item in pending if _text(item["consumer"]) != consumer]
    if not ids:
        return []
    claimed = client.xclaim(stream, group, consumer, min_idle_time=min_idle_ms, message_ids=ids)
    return [(_text(entry_id), fields or {}) for entry_id, fields in claimed]


def server_time_ms(client):
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def publish(client, stream, message, maxlen=None):
    """XADD a schema message; returns the entry id. maxlen trims approximately (heartbeats)."""
    entry_id = client.xadd(stream, message.to_fields(), maxlen=maxlen, approximate=True)
    return _text(entry_id)


def _text(value):
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)

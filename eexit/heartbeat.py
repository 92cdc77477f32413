"""A schema-correct heartbeat publisher for any process the watchdog should guard.

If your own bot is the thing that guards open positions, let it say so honestly:

    from eexit.heartbeat import Heartbeat
    beat = Heartbeat.from_env("my_bot")                 # REDIS_URL, timeouts set
    beat.ok(active_positions=len(positions), last_decision_ts=decided_at_ms)

Call it once per completed guard cycle (about every second). Say `beat.degraded(...)` when a
cycle failed or ran late, and pass active_positions=None when you do not know the count: the
watchdog then assumes positions are open (fail-closed). Never beat from a timer or an
exception handler: a heartbeat claims that the guard logic ran.

Process identity. Every beat carries `instance`, a random id made once per process start
(INSTANCE). On a clean stop (SIGTERM) say `beat.stopped(...)`: one last beat with status
STOPPED. The watchdog treats a new `instance` after a beat that reported open (or unknown)
positions and no STOPPED beat as a crash and restart (EXIT_BRAIN_RESTARTED: one panic), however
fast the restart was.

`beat.publish(...)` raises the Redis error when Redis is unreachable; the caller decides (the
Exit Brain logs it and keeps guarding, and the missing beats make the watchdog act).
"""

import functools
import time
import uuid

from . import bus, schema

INSTANCE = uuid.uuid4().hex[:16]     # this process's identity in every heartbeat it sends


def wall_ms():
    """Epoch milliseconds for the `ts` fields. Never used to measure an age: the watchdog
    times heartbeats on its own monotonic clock."""
    return int(time.time() * 1000)


class Heartbeat:
    def __init__(self, client, service_id, stream=schema.HEARTBEAT_STREAM):
        self.client = client
        self.service_id = service_id
        self.stream = stream

    @classmethod
    def from_env(cls, service_id, stream=schema.HEARTBEAT_STREAM, env=None):
        return cls(bus.connect(env=env), service_id, stream)

    def publish(self, status, active_positions, last_decision_ts, latency_ms=None, extra=None):
        """XADD one heartbeat (trimmed MAXLEN ~ 1000); returns the entry id."""
        message = schema.Heartbeat(
            service_id=self.service_id, status=status, active_positions=active_positions,
            last_decision_ts=last_decision_ts, latency_ms=latency_ms, ts=wall_ms(),
            instance=INSTANCE, extra={key: str(value) for key, value in (extra or {}).items()})
        return bus.publish(self.client, self.stream, message, maxlen=schema.HEARTBEAT_MAXLEN)

    # ok / degraded / stopped(active_positions, last_decision_ts, latency_ms=None, extra=None):
    # publish() with that status. STOPPED is the last beat of a clean stop: the next instance
    # is then a restart, not a crash.
    ok = functools.partialmethod(publish, "OK")
    degraded = functools.partialmethod(publish, "DEGRADED")
    stopped = functools.partialmethod(publish, "STOPPED")

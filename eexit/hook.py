"""The Exit Brain's crash path: one signed panic the moment the brain's process dies.

How systemd runs it (systemd/eexit-brain.service, systemd/eexit-brain-crash@.service,
docs/DEPLOY.md "The crash path"):
    brain unit   ExecStopPost=+/bin/sh -c ...: unless SERVICE_RESULT is `success` (a deliberate
                 stop), it starts eexit-brain-crash@<SERVICE_RESULT>:<EXIT_CODE>:<EXIT_STATUS>.service
                 and waits for it; if that unit fails, it writes a CRITICAL line naming the
                 unit, its result and any unreadable credential file.
    crash unit   Type=oneshot, `python -m eexit.hook`, its own DynamicUser= sandbox, its own
                 LoadCredential= (hook_hmac_key, redis_password) and Redis user eexit-hook;
                 EEXIT_CRASH=%i carries the three facts.
    listener     the warm path, tried first by that shell: eexit/crash_listener.py (a running
                 unit, same credentials and Redis user) calls run() below with its open
                 Redis connection for each `result:code:status` written into its FIFO; the
                 shell starts the crash unit unless it answers 0.
Why not this module in ExecStopPost= itself, nor OnFailure= (measured with systemd 252 booted
in tests/systemd_harness.py, docs/SPEC §8): ExecStopPost= processes get no credentials (the
directory is unmounted when the main process exits), and OnFailure= does not fire when
Restart= schedules a restart (the unit passes through auto-restart, never failed; RestartMode=
only exists from 254). A unit started by systemctl gets its own credentials on every version
from 247 on.

Facts: EEXIT_CRASH=result:code:status, else SERVICE_RESULT / EXIT_CODE / EXIT_STATUS (the
legacy `eexit panic --on-service-failure` ExecStopPost= form). SERVICE_RESULT=success
publishes nothing; anything else, or unset, publishes (issued_by=exit_brain,
reason=EXIT_BRAIN_DIED, context JSON with the facts).

The latch (one crash, one executed panic; a restart loop does not flatten twice):
    1 the halt holds (system:state:trading halted=true naming an event) -> publish nothing: a
      panic was executed and no human has resumed since.
    2 otherwise claim the incident the watchdogs share (eexit:watchdog:incident) AND publish a
      new event, in one atomic step (bus.claim_and_publish): no claim exists without its panic.
    3 the claim was held by event X: X's execution finished (its record in
      system:panic_close:processed has stage "done") and the halt is off since -> a human
      resumed after it: X was an earlier outage, publish the new event unclaimed. Otherwise re-publish X under
      our signature: if X was never published (its publisher died) it runs now, if it was,
      the EEW answers DUPLICATE. Nothing here compares clocks.
    Fail-closed: whatever cannot be read publishes; a refused claim (an old ACL without
    EVALSHA) publishes unclaimed.

Exit codes (the brain unit's ExecStopPost= logs a CRITICAL line for any non-zero one):
    0  the panic is durable (XADD answered, and WAIT saw EEXIT_REDIS_REPLICAS replicas), or
       nothing to publish (a deliberate stop, or the halt holds)
    2  configuration error: a credential file unreadable or malformed (the line names it),
       no exit_brain key, a bad setting
    3  the bound EEXIT_HOOK_TIMEOUT_S passed before the panic was durable
    4  Redis unreachable (transport) or refused a command (NOPERM, ...): the line says which
    5  the panic was written but replication to the replicas was not confirmed
    1  anything else (a bug): logged with the exception's type
Every outcome is one key=value line on stderr (the journal), CRITICAL whenever no panic was
published for a crash. The watchdog remains the backstop: it treats the brain's restart
after a beat with open positions as the crash it was (issue 23 point 3).

Bound: EEXIT_HOOK_TIMEOUT_S (5 s; 0.5 to 10) covers the run after start-up, enforced by a
real-time timer on top of the Redis socket timeouts; the crash unit's TimeoutStartSec=15 and
the brain's TimeoutStopSec=15 stay above it.

Credentials ($CREDENTIALS_DIRECTORY of the crash unit): hook_hmac_key `kid exit_brain hexkey`
(fallback for tools: EEXIT_PANIC_HMAC_KEYS / panic_hmac_keys), redis_password and
redis_username (eexit-hook). Settings: EEXIT_HOOK_TIMEOUT_S, EEXIT_REDIS_REPLICAS (0),
EEXIT_REDIS_WAIT_MS (500). Imports: redis and the small eexit modules only.
"""

import json
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

from redis.backoff import NoBackoff
from redis.retry import Retry

from . import bus, schema, signing
from .config import CONFIG_EXIT_CODE, ConfigError, credential, env_float, env_int
from .log import Logger

ISSUER = "exit_brain"
REASON = "EXIT_BRAIN_DIED"
OPENED_BY = "hook"
HOOK_KEY_CREDENTIAL = "hook_hmac_key"
SERVICE_VARIABLES = ("SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS")

EXIT_OK, EXIT_BUG, EXIT_TIMEOUT, EXIT_REDIS, EXIT_UNCONFIRMED = 0, 1, 3, 4, 5

# How the published event id was chosen.
CLAIMED, ADOPTED, EARLIER_OUTAGE, UNCLAIMED = "claimed", "adopted", "earlier_outage", "unclaimed"


class HookTimeout(Exception):
    """The bound passed (raised by the interval timer into whatever call was blocking)."""


# ---------------------------------------------------------------------------- pure core

def service_facts(env):
    """service_result, exit_code, exit_status ("" when unknown): from EEXIT_CRASH
    (`result:code:status`, the crash unit's instance name), else systemd's ExecStopPost=
    variables."""
    crash = (env.get("EEXIT_CRASH") or "").strip()
    values = (crash.split(":", 2) + ["", ""])[:3] if crash else \
        [env.get(name) or "" for name in SERVICE_VARIABLES]
    return {name.lower(): "" if value.strip() in ("", "none") else value.strip()
            for name, value in zip(SERVICE_VARIABLES, values)}


def latched(state):
    """The halt holds for an executed panic that no human has cleared: nothing to publish.
    state None (unreadable) is not latched: fail-closed."""
    return state is not None and state.halted is True and bool(state.event_id)


def after_lost_claim(state, holder_done):
    """The claim was held by another event X. X's execution finished (holder_done: its
    idempotency record's stage is "done") and the halt is off since (a resume came after it)
    -> EARLIER_OUTAGE: a new event. Anything else, including an execution in flight or an
    unreadable state or record -> ADOPTED: re-publish X (a duplicate is answered DUPLICATE, a
    panic whose publisher died runs now)."""
    if holder_done is True and (state is None or state.halted is not True):
        return EARLIER_OUTAGE
    return ADOPTED


# ---------------------------------------------------------------------------- shell

def load_credentials(env):
    """The signing key ring, after reading every credential file the hook uses, so that an
    unreadable or malformed one is a ConfigError naming its file (config.credential does for
    the reading), never a Redis error (issue 23 found a PermissionError logged as
    redis_unreachable)."""
    text = credential(HOOK_KEY_CREDENTIAL, (), env)
    for name in ("redis_password", "redis_username"):
        credential(name, (), env)      # read now: connect() cannot fail on it
    origin = f"credential file {Path(env.get('CREDENTIALS_DIRECTORY') or '.') / HOOK_KEY_CREDENTIAL}"
    ring = signing.parse_keys(text, origin) if text is not None else signing.load_keys(env)
    if ring.configured and ring.kid_for(ISSUER) is None:
        raise ConfigError(f"the hook's signing keys hold none for issuer {ISSUER}: its panic would be REJECTED")
    return ring


def read_state(client, notes):
    try:
        return schema.TradingState.from_fields(bus.decoded(client.hgetall(schema.TRADING_STATE_KEY)))[0]
    except bus.REDIS_ERRORS as exc:
        # Fail-closed: an unknown halt publishes. The publish below says whether Redis is
        # really gone (then exit 4) or only this read was refused.
        notes["state"] = f"unreadable:{type(exc).__name__}"
        return None


def claim(client, event_id, fields, claim_fields, state, notes):
    """(how, event id to publish, entry id already written or None), by the latch's rules 2-3.
    The risk kernel claims through here too, so both read a held incident alike."""
    try:
        won, value = bus.claim_and_publish(client, schema.INCIDENT_KEY, schema.PANIC_STREAM, event_id,
                                           claim_fields, fields)
    except bus.REDIS_ERRORS as exc:
        if bus.is_transport_error(exc):
            raise
        # A command error (NOPERM: an ACL from before the script): publish unclaimed.
        notes["claim"] = f"refused:{type(exc).__name__}:{str(exc)[:80]}"
        return UNCLAIMED, event_id, None
    if won:
        return CLAIMED, event_id, value
    notes["held_by_event"] = value
    try:
        raw = client.hget(schema.PROCESSED_KEY, value)
        record = json.loads(raw) if raw is not None else {}
        # Only a FINISHED execution counts: "claimed"/"halted" records are in flight, the
        # halt is about to be (or is) written.
        done = isinstance(record, dict) and record.get("stage") == "done"
    except (*bus.REDIS_ERRORS, ValueError) as exc:
        notes["holder_record"] = f"unreadable:{type(exc).__name__}"
        done = None
    how = after_lost_claim(state, done)
    return how, (event_id if how == EARLIER_OUTAGE else value), None


def publish_on_failure(env, log, started, notes, facts, client=None, origin=None):
    """The whole hook after the success check; returns an exit code, raises only HookTimeout
    and the exceptions run() turns into codes. client: a connection kept warm by the crash
    listener (eexit/crash_listener.py), else a new one."""
    timeout_s = env_float("EEXIT_HOOK_TIMEOUT_S", 5.0, minimum=0.5, maximum=10.0, env=env)
    replicas = env_int("EEXIT_REDIS_REPLICAS", 0, minimum=0, env=env)
    wait_ms = env_int("EEXIT_REDIS_WAIT_MS", 500, minimum=1, env=env)
    keyring = load_credentials(env)
    remaining = lambda: timeout_s - (time.monotonic() - started)   # noqa: E731
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, remaining()))
    client = client or bus.connect(env=env, read_timeout_s=max(0.1, remaining()))
    # No retries inside redis-py: publish_durable retries within OUR bound, and the reads
    # before it fail closed at once instead of spending the bound on a refused port.
    client.set_retry(Retry(NoBackoff(), 0))
    origin = origin or ("crash-unit" if env.get("EEXIT_CRASH") else "ExecStopPost")
    context = {**facts, "host": socket.gethostname(), "hook": origin}
    now_ms = int(time.time() * 1000)
    state = read_state(client, notes)
    if latched(state):
        signal.setitimer(signal.ITIMER_REAL, 0)
        log.info("panic_skipped", why="latched", held_by_event=state.event_id, **notes, **facts)
        return EXIT_OK
    new_id = str(uuid.uuid4())
    # Signed with the exit_brain key: load_credentials refused a ring that holds none.
    fields = signing.signed_panic(new_id, REASON, ISSUER, now_ms, context, keyring)
    claim_fields = {"reason": REASON, "opened_by": OPENED_BY, "issued_by": ISSUER,
                    "detail": " ".join(f"{k}={v or '-'}" for k, v in facts.items())}
    how, event_id, written = claim(client, new_id, fields, claim_fields, state, notes)
    if event_id != new_id:
        fields = signing.signed_panic(event_id, REASON, ISSUER, now_ms, context, keyring)
    published = bus.publish_durable(client, schema.PANIC_STREAM, fields, replicas, wait_ms,
                                    # its backoff sleeps up to 0.5 s: stop retrying before
                                    # the timer, so a refused Redis says 4, a stalled one 3
                                    give_up_after_s=max(0.05, remaining() - 0.75), entry_id=written)
    signal.setitimer(signal.ITIMER_REAL, 0)
    outcome = dict(event_id=event_id, entry_id=published.entry_id, reason=REASON, issued_by=ISSUER,
                   incident=how, **notes, signed="sig" in fields, replicas_acked=published.replicas_acked,
                   elapsed_ms=round((time.monotonic() - started) * 1000, 1), **facts)
    log.critical("panic_published" if published.confirmed else "panic_replication_unconfirmed", **outcome)
    return EXIT_OK if published.confirmed else EXIT_UNCONFIRMED


def _raise_timeout(_signum, _frame):
    raise HookTimeout()


def run(env=None, log=None, client=None, origin=None):
    """The hook; returns its exit code and never raises (systemd must get a code, not a trace).
    The crash listener passes its warm client and origin="crash-listener" (the panic's
    context says which path published)."""
    started = time.monotonic()
    env = os.environ if env is None else env
    log = log or Logger("hook")
    facts = service_facts(env)
    if facts["service_result"] == "success":
        log.info("panic_skipped", why="success", **facts)
        return EXIT_OK
    notes = {}
    try:
        return publish_on_failure(env, log, started, notes, facts, client, origin)
    except HookTimeout:
        # Redis (or the host) stalled: give systemd its stop back. The watchdog's rules still
        # catch the death; this line says why the fast path did not.
        code, event, cause = EXIT_TIMEOUT, "hook_timeout", "bound EEXIT_HOOK_TIMEOUT_S passed"
    except (ConfigError, ValueError) as exc:
        # A credential file or setting: the message names it. No Redis contact was made.
        code, event, cause = CONFIG_EXIT_CODE, "hook_config_error", str(exc)
    except bus.REDIS_ERRORS as exc:
        # Credentials were read before any Redis call, so this is Redis: gone (transport) or
        # refusing (NOPERM, ...). Nothing was published, or not known to be.
        code, event = EXIT_REDIS, "redis_unreachable" if bus.is_transport_error(exc) else "redis_refused"
        cause = f"{type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - last resort: systemd must get a code and a line, not a trace
        code, event, cause = EXIT_BUG, "hook_failed", f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    log.critical(event, hook_exit_code=code, cause=cause, published="no",
                 elapsed_ms=round((time.monotonic() - started) * 1000, 1), **notes, **facts)
    return code


if __name__ == "__main__":
    sys.exit(run())

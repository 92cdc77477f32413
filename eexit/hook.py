"""`eexit panic --on-service-failure`: the Exit Brain unit's ExecStopPost= hook.

When the brain's process dies, systemd knows at once and runs ExecStopPost= with
SERVICE_RESULT, EXIT_CODE and EXIT_STATUS set (systemd.exec(5)). This publishes one signed
panic for it, so a crash is handled in milliseconds instead of after the watchdog's heartbeat
thresholds (which stay, for hangs and degradation, and as the backstop for this hook).

    SERVICE_RESULT=success        a deliberate stop: publish nothing, exit 0, no Redis contact
                                  (positions left open are still the watchdog's rules' job)
    anything else, or unset       one panic: issued_by=exit_brain, reason=EXIT_BRAIN_DIED,
                                  context = JSON with service_result, exit_code, exit_status

Exit codes (systemd logs a non-zero one and shows the unit as failed; it never hangs the stop):
    0  the panic is durable (XADD answered, and WAIT saw EEXIT_REDIS_REPLICAS replicas), or
       nothing to publish (result success, or the latch below holds)
    2  configuration error (a malformed variable or credential, no exit_brain key)
    3  the bound EEXIT_HOOK_TIMEOUT_S passed before the panic was durable
    4  Redis unreachable or refused a command (transport error, NOPERM, ...)
    5  the panic was written but replication to the replicas was not confirmed
    1  anything else (a bug): logged with the exception's type
Every outcome is exactly one key=value line on stderr (the journal). It does not wait for
the EEW's report.

Bound: EEXIT_HOOK_TIMEOUT_S (5 s; 0.5 to 10) covers the whole run after start-up, enforced by
a real-time timer on top of the Redis socket timeouts; it must stay well under the unit's
TimeoutStopSec (15 s in systemd/eexit-brain.service), so a dead Redis never makes systemd
kill the hook or delay the brain's restart by more than the bound.

The latch (one incident, one panic; a restart loop publishes once):
    1 trading halted (system:state:trading halted=true) by an event not yet cleared by a
      human -> publish nothing: the EEW has acted on that event and nobody resumed.
    2 otherwise claim the incident the watchdogs share (eexit:watchdog:incident, HSETNX of the
      event id, opened_by=hook): won -> publish; lost -> an incident is open, whoever opened it
      publishes and re-publishes its id -> publish nothing. Exception: an open incident opened
      before a human's resume (cleared_at later than its opened_at_ms) belongs to an earlier
      outage -> publish a new event anyway, without a claim.
    Fail-closed: if the state or the incident cannot be read, publish.
The watchdog adopts the hook's incident (when its rules fire, or when the report arrives)
and closes it like its own, so its later rules add no second event id.

Credentials (systemd LoadCredential= of the brain's unit; see docs/DEPLOY.md, SECURITY.md):
    hook_hmac_key          `kid exit_brain hexkey` (signing.py's format); fallback, for tests
                           and tools: EEXIT_PANIC_HMAC_KEYS / panic_hmac_keys. No key at all:
                           unsigned (works only with an EEW that verifies nothing).
    redis_hook_password    the Redis user eexit-hook's password (user: redis_hook_username,
                           default eexit-hook); without it the ordinary Redis credentials.
Settings: EEXIT_HOOK_TIMEOUT_S, EEXIT_REDIS_REPLICAS (0), EEXIT_REDIS_WAIT_MS (500) -- the
watchdog's replica settings.

Imports: redis and the small eexit modules only; never ccxt (bench/hook.py measures it).
"""

import os
import signal
import socket
import sys
import time

from redis.backoff import NoBackoff
from redis.retry import Retry

from . import bus, ops, schema, signing
from .config import CONFIG_EXIT_CODE, ConfigError, credential, env_float, env_int
from .log import Logger

ISSUER = "exit_brain"
REASON = "EXIT_BRAIN_DIED"
INCIDENT_KEY = "eexit:watchdog:incident"      # the watchdog's key (tests check they agree)
OPENED_BY = "hook"
HOOK_KEY_CREDENTIAL = "hook_hmac_key"
HOOK_PASSWORD_CREDENTIAL = "redis_hook_password"
HOOK_USERNAME_CREDENTIAL = "redis_hook_username"
HOOK_REDIS_USER = "eexit-hook"
SERVICE_VARIABLES = ("SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS")

EXIT_OK, EXIT_BUG, EXIT_TIMEOUT, EXIT_REDIS, EXIT_UNCONFIRMED = 0, 1, 3, 4, 5

PUBLISH, SKIP_SUCCESS, SKIP_LATCHED, SKIP_INCIDENT_OPEN = "publish", "success", "latched", "incident_open"


class HookTimeout(Exception):
    """The bound passed (raised by the interval timer into whatever call was blocking)."""


# ---------------------------------------------------------------------------- pure core

def service_facts(env):
    """The three values systemd sets for ExecStopPost=, "" when unset."""
    return {name.lower(): (env.get(name) or "").strip() for name in SERVICE_VARIABLES}


def latch(state, incident, claimed):
    """PUBLISH or a SKIP_* reason, from plain data:
    state    schema.TradingState, or None when it could not be read (-> publish)
    incident the incident hash as {str: str} when our claim lost, else None
    claimed  True: we won the claim; False: lost; None: the claim could not be made."""
    if state is not None and state.halted is True and state.event_id:
        return SKIP_LATCHED
    if claimed is not False or state is None:
        return PUBLISH
    opened = _int(incident.get("opened_at_ms")) if incident else None
    if state.halted is False and state.cleared_at is not None and opened is not None \
            and state.cleared_at > opened:
        return PUBLISH      # the open incident predates a human's resume: an earlier outage
    return SKIP_INCIDENT_OPEN


def _int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- shell

def hook_keyring(env):
    """The hook's own key (hook_hmac_key), else the shared variable/credential of signing."""
    text = credential(HOOK_KEY_CREDENTIAL, (), env)
    ring = signing.parse_keys(text, f"credential {HOOK_KEY_CREDENTIAL}") if text else signing.load_keys(env)
    if ring.configured and ring.kid_for(ISSUER) is None:
        raise ConfigError(f"the hook's signing keys hold none for issuer {ISSUER}: its panic would be REJECTED")
    return ring


def hook_redis_env(env):
    """An environment for bus.connect that logs in as the hook's Redis user when its password
    credential exists. The credential directory is dropped from the copy because bus reads
    `redis_password` from it first, and that file is the brain's, not the hook's."""
    password = credential(HOOK_PASSWORD_CREDENTIAL, (), env)
    if password is None:
        return env
    connect_env = {k: v for k, v in env.items() if k != "CREDENTIALS_DIRECTORY"}
    connect_env["REDIS_PASSWORD"] = password
    connect_env["REDIS_USERNAME"] = credential(HOOK_USERNAME_CREDENTIAL, (), env) or HOOK_REDIS_USER
    for name in ("redis_sentinel_username", "redis_sentinel_password"):
        value = credential(name, (name.upper(),), env)
        if value is not None:
            connect_env[name.upper()] = value
    return connect_env


def _decoded(raw):
    return {bus.as_text(k): bus.as_text(v) for k, v in (raw or {}).items()}


def publish_on_failure(env, log, started, notes):
    """The whole hook after the success check; returns an exit code, raises only HookTimeout
    and the exceptions run() turns into codes. `notes` collects what went wrong on the way,
    for the one line that ends the run."""
    timeout_s = env_float("EEXIT_HOOK_TIMEOUT_S", 5.0, minimum=0.5, maximum=10.0, env=env)
    replicas = env_int("EEXIT_REDIS_REPLICAS", 0, minimum=0, env=env)
    wait_ms = env_int("EEXIT_REDIS_WAIT_MS", 500, minimum=1, env=env)
    remaining = lambda: timeout_s - (time.monotonic() - started)   # noqa: E731
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, remaining()))
    facts = service_facts(env)
    keyring = hook_keyring(env)
    client = bus.connect(env=hook_redis_env(env), read_timeout_s=max(0.1, remaining()))
    # No retries inside redis-py: publish_durable retries within OUR bound, and the reads
    # before it fail closed at once instead of spending the bound on a refused port.
    client.set_retry(Retry(NoBackoff(), 0))
    context = {**facts, "host": socket.gethostname(), "hook": "ExecStopPost"}
    event, fields = ops.build_panic(REASON, ISSUER, keyring, context=context)

    state = incident = None
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(schema.TRADING_STATE_KEY)
        pipe.time()
        raw_state, (seconds, micros) = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        state, _problems = schema.TradingState.from_fields(_decoded(raw_state))
    except bus.REDIS_ERRORS as exc:
        # Fail-closed: an unknown latch publishes. The XADD below will say whether Redis is
        # really gone (then exit 4) or only this read was refused.
        notes["state"] = f"unreadable:{type(exc).__name__}"
        now_ms = event.ts
    claimed = None
    if state is None or not (state.halted is True and state.event_id):
        try:
            held, won = bus.claim_incident(client, INCIDENT_KEY, {
                "event_id": event.event_id, "reason": REASON, "opened_by": OPENED_BY,
                "issued_by": ISSUER, "opened_at_ms": now_ms,
                "detail": " ".join(f"{k}={v or '-'}" for k, v in facts.items())})
            claimed = won
            if not won:
                incident = _decoded(client.hgetall(INCIDENT_KEY)) or {"event_id": held}
        except bus.REDIS_ERRORS as exc:
            notes["claim"] = f"failed:{type(exc).__name__}"
    decision = latch(state, incident, claimed)
    if decision != PUBLISH:
        signal.setitimer(signal.ITIMER_REAL, 0)
        held = state.event_id if decision == SKIP_LATCHED else (incident or {}).get("event_id", "")
        log.info("panic_skipped", why=decision, held_by_event=held,
                 opened_by=(incident or {}).get("opened_by", ""), **notes, **facts)
        return EXIT_OK
    published = bus.publish_durable(client, schema.PANIC_STREAM, fields, replicas, wait_ms,
                                    # its backoff sleeps up to 0.5 s: stop retrying before
                                    # the timer, so a refused Redis says 4, a stalled one 3
                                    give_up_after_s=max(0.05, remaining() - 0.75))
    signal.setitimer(signal.ITIMER_REAL, 0)
    elapsed_ms = round((time.monotonic() - started) * 1000, 1)
    outcome = dict(event_id=event.event_id, entry_id=published.entry_id, reason=REASON, issued_by=ISSUER,
                   incident="claimed" if claimed else ("stale" if claimed is False else "unknown"), **notes,
                   signed="sig" in fields, replicas_acked=published.replicas_acked, elapsed_ms=elapsed_ms, **facts)
    if not published.confirmed:
        log.critical("panic_replication_unconfirmed", **outcome)
        return EXIT_UNCONFIRMED
    log.critical("panic_published", **outcome)
    return EXIT_OK


def _raise_timeout(_signum, _frame):
    raise HookTimeout()


def run(env=None, log=None):
    """The hook; returns its exit code and never raises (systemd must get a code, not a trace)."""
    started = time.monotonic()
    env = os.environ if env is None else env
    log = log or Logger("hook")
    facts = service_facts(env)
    if facts["service_result"] == "success":
        log.info("panic_skipped", why=SKIP_SUCCESS, **facts)
        return EXIT_OK
    notes = {}
    try:
        return publish_on_failure(env, log, started, notes)
    except HookTimeout:
        # Redis (or the host) stalled: give systemd its stop back. The watchdog's heartbeat
        # rules still catch the death; this line says why the fast path did not.
        code, event, detail = EXIT_TIMEOUT, "hook_timeout", "bound EEXIT_HOOK_TIMEOUT_S passed"
    except (ConfigError, ValueError) as exc:
        # ValueError: build_panic found keys but none for exit_brain -- configuration too.
        code, event, detail = CONFIG_EXIT_CODE, "config_error", str(exc)
    except bus.REDIS_ERRORS as exc:
        # Transport or command error (NOPERM included): nothing was published, or not known
        # to be; the watchdog's heartbeat rules remain the way this death gets handled.
        code, event, detail = EXIT_REDIS, "redis_unreachable", f"{type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - last resort: systemd must get a code and a line, not a trace
        code, event, detail = EXIT_BUG, "hook_failed", f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    log.critical(event, hook_exit_code=code, detail=detail,
                 elapsed_ms=round((time.monotonic() - started) * 1000, 1), **notes, **facts)
    return code


if __name__ == "__main__":
    sys.exit(run())

"""The crash listener: the brain's crash path, already running (issue 23; docs/DEPLOY.md §7).

Why: the oneshot crash unit (eexit-brain-crash@.service) spends ~75 ms on its sandbox and
~230 ms starting Python and importing redis before the hook's own ~15 ms of work (measured
under systemd 252, docs/BENCHMARKS.md §1c). This daemon has all of that done before the crash.

How (systemd/eexit-crash-listener.service, the brain's ExecStopPost=):
    FIFOs   in its RuntimeDirectory /run/eexit-crash-listener (mode 0700, the unit's dynamic
            user): `request` and `reply`, mode 0600. Only root beside this daemon can open them:
            the brain's `ExecStopPost=+` shell runs as root; the brain's own process (another
            dynamic user, ProtectSystem=strict) cannot, so a compromised brain cannot ask for
            a panic here either.
    request one line `result:code:status` (SERVICE_RESULT:EXIT_CODE:EXIT_STATUS) -> the very
            same hook as `python -m eexit.hook` (eexit.hook.run: the latch, the claim-and-
            publish script, the CRITICAL lines), on this daemon's warm Redis connection and
            with its own credentials (hook_hmac_key, redis_password, Redis user eexit-hook).
    reply   the hook's exit code and a newline, written non-blocking: if the shell is no
            longer reading (it gave up), the reply is dropped and logged. The shell counts
            only `0` as done; anything else, or no answer in time, starts the oneshot crash
            unit (the loud fallback). A duplicate is harmless: the hook re-publishes the open
            incident's event id and the EEW answers DUPLICATE.
Warm: READY=1 once both FIFOs exist and Redis answered PING; then PING every KEEPALIVE_S (a
failed one is logged, and redis-py reconnects at the next command). The FIFO is read with
select() between watchdog pings; no Redis call blocks longer than the socket timeout
(min(2 s, EEXIT_HOOK_TIMEOUT_S)) while idle, and a request is bounded by the hook's
EEXIT_HOOK_TIMEOUT_S timer exactly as in the crash unit.
The FIFO is opened read-write, so the listener always holds a writer itself: no EOF between
requests, and a writer's open never blocks while the listener runs.
Exit codes: 0 stopped, 2 configuration (a credential file unreadable, a bad setting), 1 a bug.
"""

import os
import select
import stat
import sys
import time
from pathlib import Path

from . import bus, daemon, hook
from .config import ConfigError, env_float
from .log import Logger
from .notify import Notifier

RUNTIME_DIRECTORY = "/run/eexit-crash-listener"
KEEPALIVE_S = 5.0
MAX_LINE = 256
ORIGIN = "crash-listener"


def parse_requests(buffer):
    """(complete lines as `result:code:status` facts, the rest of the buffer). A line longer
    than MAX_LINE is cut, not dropped: any request is a crash (fail-closed)."""
    *lines, rest = buffer.split(b"\n")
    facts = [line.decode("ascii", "replace").strip()[:MAX_LINE] for line in lines]
    return facts, rest[-MAX_LINE:]


def make_fifo(path):
    """A fresh FIFO at path, mode 0600, opened read-write non-blocking (its fd)."""
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        raise ConfigError(f"{path} is not a FIFO")
    return fd


def answer(reply_path, code, log):
    """Write the hook's exit code to the reply FIFO if the shell still reads it."""
    try:
        with open(os.open(reply_path, os.O_WRONLY | os.O_NONBLOCK), "wb", buffering=0) as reply:
            reply.write(f"{code}\n".encode())
    except OSError as exc:
        # ENXIO: nobody reads (the shell timed out and started the oneshot), or the write
        # failed. Nothing lost: the fallback runs the same hook.
        log.warning("reply_dropped", hook_exit_code=code, cause=type(exc).__name__)


def keepalive(client, log, notifier, healthy, listening):
    """PING Redis; returns whether it answered. A change is logged and said in STATUS= (a
    listener that cannot publish now says so)."""
    try:
        client.ping()
        answered, cause = True, ""
    except bus.REDIS_ERRORS as exc:
        # Transport or refusal: the next command reconnects; a request meanwhile runs the
        # hook anyway and answers its code (the shell falls back on non-zero).
        answered, cause = False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if answered != healthy:
        if answered:
            log.info("redis_keepalive_ok")
        else:
            log.error("redis_keepalive_failed", cause=cause)
        notifier.status(listening if answered else "Redis unreachable: crashes go to the oneshot crash unit")
    return answered


def serve(env, log):
    hook.load_credentials(env)              # a bad key refuses the start (exit 2), naming the file
    timeout_s = env_float("EEXIT_HOOK_TIMEOUT_S", 5.0, minimum=0.5, maximum=10.0, env=env)
    directory = Path(env.get("RUNTIME_DIRECTORY") or RUNTIME_DIRECTORY)
    request_fd = make_fifo(directory / "request")
    os.close(make_fifo(directory / "reply"))
    client = bus.connect(env=env, read_timeout_s=min(2.0, timeout_s))
    notifier, stopped, listening = Notifier(env, log), [], f"listening on {directory}/request"
    daemon.on_stop_signal(lambda: stopped.append(True))
    healthy = keepalive(client, log, notifier, True, listening)
    while not healthy and not stopped:
        # READY only with a warm connection: until then the brain's shell falls back.
        time.sleep(0.5)
        notifier.ping()
        healthy = keepalive(client, log, notifier, healthy, listening)
    notifier.ready(listening)
    log.info("ready", fifo=str(directory / "request"), hook_timeout_s=timeout_s)
    buffer, last_ping = b"", time.monotonic()
    while not stopped:
        notifier.ping()
        readable, _w, _x = select.select([request_fd], [], [], notifier.max_block_s(1.0))
        if readable:
            buffer += os.read(request_fd, 4096)
            requests, buffer = parse_requests(buffer)
            for facts in requests:
                code = hook.run({**env, "EEXIT_CRASH": facts}, log, client, ORIGIN)
                answer(directory / "reply", code, log)
        if time.monotonic() - last_ping >= KEEPALIVE_S:
            # Pings go on while Redis is gone (a restart cannot bring Redis back, and each
            # request still runs the hook and answers its code, so the brain's shell falls
            # back on the oneshot); STATUS= says why this listener cannot publish now.
            healthy, last_ping = keepalive(client, log, notifier, healthy, listening), time.monotonic()
    notifier.stopping()
    return 0


def main():
    log = Logger(ORIGIN)
    return daemon.main(log, lambda: serve(os.environ, log))


if __name__ == "__main__":
    sys.exit(main())

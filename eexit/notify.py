"""sd_notify for the daemons: READY, WATCHDOG, STOPPING, STATUS.

The datagram goes out on a NON-BLOCKING socket: a supervisor that does not drain
NOTIFY_SOCKET (the queue holds ~10 datagrams) must never stall a safety loop. A send that
would block, or a missing socket, drops the datagram and is logged once per kind of failure;
under systemd the dropped pings are visible to systemd (it restarts the unit for missing
watchdog pings: the fail-closed outcome). Without NOTIFY_SOCKET every call does nothing.
(sdnotify's blocking sendall() stalled the EEW's loop for 200 s in a test harness.)
"""

import functools
import os
import socket

from .log import Logger


class Notifier:
    def __init__(self, env=None, log=None):
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace: a leading NUL byte.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket = None
        self._log = log or Logger("notify")
        self._failures_logged = set()
        usec = env.get("WATCHDOG_USEC", "")
        owned = env.get("WATCHDOG_PID", "") in ("", str(os.getpid()))     # the pings are ours to send
        self.watchdog_interval_s = int(usec) / 1e6 if usec.isdigit() and owned and int(usec) > 0 else None

    def max_block_s(self, wanted_s):
        """The longest a loop may block between pings: at most half the watchdog interval."""
        return wanted_s if self.watchdog_interval_s is None else min(wanted_s, self.watchdog_interval_s / 2)

    def ready(self, status=None):
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text):
        self._send(f"STATUS={text}")

    def _send(self, message):
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode("utf-8", errors="replace"), self._address)
        except OSError as exc:
            # Full queue (BlockingIOError), socket gone, or refused: drop this datagram and go
            # on with the loop; systemd notices missing pings on its own. Logged once per kind.
            kind = type(exc).__name__
            if kind not in self._failures_logged:
                self._failures_logged.add(kind)
                self._log.error("sd_notify_dropped", error=kind, note="datagram dropped; logged once")

    ping = functools.partialmethod(_send, "WATCHDOG=1")
    stopping = functools.partialmethod(_send, "STOPPING=1")

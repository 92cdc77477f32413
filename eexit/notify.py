"""sd_notify for the daemons: READY, WATCHDOG, STOPPING, STATUS.

Without NOTIFY_SOCKET (run by hand, in tests without a socket) every call does nothing, which
is what sdnotify does too; under systemd a failed send is invisible to us but not to systemd,
which then restarts the unit for missing watchdog pings: the fail-closed outcome.
"""

import os

import sdnotify


class Notifier:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        self._notifier = sdnotify.SystemdNotifier()
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        owned = pid == "" or pid == str(os.getpid())
        self.watchdog_interval_s = int(usec) / 1e6 if usec.isdigit() and owned and int(usec) > 0 else None

    def max_block_s(self, wanted_s):
        """The longest a loop may block between pings: at most half the watchdog interval."""
        if self.watchdog_interval_s is None:
            return wanted_s
        return min(wanted_s, self.watchdog_interval_s / 2)

    def ready(self, status=None):
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def ping(self):
        self._send("WATCHDOG=1")

    def status(self, text):
        self._send(f"STATUS={text}")

    def stopping(self):
        self._send("STOPPING=1")

    def _send(self, message):
        self._notifier.notify(message)

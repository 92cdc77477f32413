"""One event per line, key=value, for the journal. Never pass a secret to these functions.

Under systemd (JOURNAL_STREAM set: stderr is the journal) each line starts with the
sd-daemon priority prefix of its level (`<2>` CRITICAL, `<3>` ERROR, `<4>` WARNING, `<6>`
INFO), so `journalctl -p err` shows exactly the ERROR and CRITICAL lines; journald strips the
prefix. Elsewhere (a terminal, a test, a file) lines carry no prefix. The first line every
Logger writes names the package version (`version=`), so the journal shows which code ran."""

import functools
import os
import sys
import time

from . import __version__

_NEEDS_QUOTES = set(' "=\t\n\r')
PRIORITIES = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6}


def _format_value(value):
    text = str(value)
    if text == "" or any(ch in _NEEDS_QUOTES for ch in text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    return text


class Logger:
    """Writes `ts=... level=... event=... key=value ...` lines to stderr (journald adds its own
    timestamp; ours is epoch ms so lines can be matched with stream entries)."""

    def __init__(self, daemon, stream=None, env=None):
        self.daemon = daemon
        self.stream = stream
        env = os.environ if env is None else env
        self.journal = bool(env.get("JOURNAL_STREAM"))
        self.version_logged = False

    def _write(self, level, event, **fields):
        if not self.version_logged:
            fields = {"version": __version__, **fields}
            self.version_logged = True
        head = f"ts={int(time.time() * 1000)} daemon={self.daemon} level={level} event={event}"
        self.summary(level, head + "".join(f" {key}={_format_value(value)}" for key, value in fields.items()))

    def summary(self, level, text):
        """One line at its level, with the priority prefix under the journal. Also the one
        writer of every key=value line; called directly, a line for a person, not key=value
        (`eexit.eew: configuration error: ...`), so `journalctl -p err` shows why a unit
        refused to start."""
        prefix = f"<{PRIORITIES[level]}>" if self.journal else ""
        line = prefix + text.replace("\n", " ")
        out = self.stream or sys.stderr
        try:
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must not stop a safety daemon; the audit streams in
            # Redis remain the record of what happened.
            pass

    # info / warning / error / critical(event, **fields): one line at that level.
    info = functools.partialmethod(_write, "INFO")
    warning = functools.partialmethod(_write, "WARNING")
    error = functools.partialmethod(_write, "ERROR")
    critical = functools.partialmethod(_write, "CRITICAL")

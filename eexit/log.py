"""One event per line, key=value, for the journal. Never pass a secret to these functions."""

import sys
import time

_NEEDS_QUOTES = set(' "=\t\n\r')


def _format_value(value):
    text = str(value)
    if text == "" or any(ch in _NEEDS_QUOTES for ch in text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    return text


def format_line(level, event, fields):
    parts = [f"level={level}", f"event={event}"]
    parts.extend(f"{key}={_format_value(value)}" for key, value in fields.items())
    return " ".join(parts)


class Logger:
    """Writes `ts=... level=... event=... key=value ...` lines to stderr (journald adds its own
    timestamp; ours is epoch ms so lines can be matched with stream entries)."""

    def __init__(self, daemon, stream=None):
        self.daemon = daemon
        self.stream = stream

    def _write(self, level, event, fields):
        line = f"ts={int(time.time() * 1000)} daemon={self.daemon} " + format_line(level, event, fields)
        out = self.stream or sys.stderr
        try:
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must not stop a safety daemon; the audit streams in
            # Redis remain the record of what happened.
            pass

    def info(self, event, **fields):
        self._write("INFO", event, fields)

    def warning(self, event, **fields):
        self._write("WARNING", event, fields)

    def error(self, event, **fields):
        self._write("ERROR", event, fields)

    def critical(self, event, **fields):
        self._write("CRITICAL", event, fields)

"""What the operator tools print with: `eexit` (eexit/cli.py) and the drill (eexit/drill.py)
share these, and neither imports the other for them (no import circle). Not imported by any
daemon."""

import os
import sys


def known(value):
    """A count the report did not carry is "unknown", never None and never 0."""
    return "unknown" if value is None else value


def report_line(r):
    """One line for a report dict (ops.report_dict): status, positions closed, duration."""
    took = "unknown time" if r.get("execution_time_ms") is None else f"{r['execution_time_ms']} ms"
    return (f"{r['status']} {known(r.get('positions_closed'))}/{known(r.get('positions_total'))} "
            f"closed in {took}" + (f" scope={r['scope']}" if r.get("scope") else "")
            + (f" ({r['detail']})" if r.get("detail") else ""))


def emit(text="", err=False):
    """print() that survives a reader that went away (`eexit status | head -1`): the rest of
    the output goes to /dev/null and the command still ends with its own exit code, without
    a BrokenPipeError traceback."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        # Nobody reads any more: nothing to tell them. Point the descriptor at /dev/null so
        # the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class Progress:
    """One line on stderr while waiting: rewritten in place on a terminal, a line every few
    seconds otherwise (logs stay readable). stdout stays clean for --json."""

    def __init__(self, label, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_line = 0.0

    def __call__(self, elapsed_s, note):
        line = f"{self.label}: {note} {elapsed_s:5.1f} s"
        if self.tty:
            self._write("\r" + line + " " * 8)
        elif elapsed_s - self.last_line >= 5.0:
            self._write(line + "\n")
            self.last_line = elapsed_s

    def done(self):
        if self.tty:
            self._write("\n")

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # The progress line is a courtesy: a closed stream must not stop the wait for
            # the report, whose outcome is the exit code.
            self.tty = False
            self.last_line = float("inf")

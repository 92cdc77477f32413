"""A private redis-server per test class, and helpers for real-process tests.

The binary comes from $REDIS_SERVER_BIN, else PATH, else a pip-installed bundle (the
`redis-server` PyPI package ships one). If none is found, every test that needs Redis fails
with a message saying how to install one: nothing is skipped silently.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

# The redis-server helpers live in eexit/localredis.py (the demo and the chaos suite use them
# too); re-exported here so tests keep importing them from the harness.
from eexit.localredis import INSTALL_HINT, RedisServer, find_redis_server, free_port, stop_process  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RedisTestCase(unittest.TestCase):
    """One private redis-server per test class; flushed before each test."""

    redis_args = ()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis_server = RedisServer(cls.redis_args).start()
        cls.addClassCleanup(cls.redis_server.stop)

    def setUp(self):
        super().setUp()
        self.redis = self.redis_server.client()
        self.redis.flushall()
        self.addCleanup(self.redis.close)


def python_env(**overrides):
    """Environment for a daemon subprocess: this checkout importable, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def start_module(module, env, log_path=None):
    """Start `python -m <module>` with its stderr/stdout to log_path (or DEVNULL)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        if log_path:
            out.close()


def tail_logs(directory, chars=2500):
    """The last `chars` of every *.log in directory, for a failing test's message."""
    parts = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".log"):
            with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                parts.append(f"--- {name}\n{f.read()[-chars:]}")
    return "\n".join(parts)


# A wait's timeout only bounds how long a failing test takes, never what passes: a loaded
# 2-core CI machine once took over 10 s to start a daemon. So every timeout is stretched by
# EEXIT_TEST_TIMEOUT_SCALE (3); a passing test returns at the event, as before.
TIMEOUT_SCALE = float(os.environ.get("EEXIT_TEST_TIMEOUT_SCALE", "3"))


def wait_for(predicate, timeout_s, interval_s=0.02, message="condition"):
    """Poll predicate until truthy; returns its value or fails the test with `message`."""
    timeout_s *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)




class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET. Pass `env()` to a
    daemon; `messages()` returns [(monotonic receipt time, text)] of what it sent."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="eexit-notify-")
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self._received = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self):
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self._received.append((time.monotonic(), data.decode("utf-8", errors="replace")))

    def env(self, watchdog_usec=None):
        values = {"NOTIFY_SOCKET": self.path}
        if watchdog_usec is not None:
            values["WATCHDOG_USEC"] = str(int(watchdog_usec))
        return values

    def messages(self):
        with self._lock:
            return list(self._received)

    def times_of(self, line):
        """Receipt times of messages containing `line` (e.g. "WATCHDOG=1")."""
        return [at for at, text in self.messages() if line in text.split("\n")]

    def close(self):
        self._closed = True
        self._thread.join(timeout=1)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

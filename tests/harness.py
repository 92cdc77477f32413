"""A private redis-server per test class, and helpers for real-process tests.

The binary comes from $REDIS_SERVER_BIN, else PATH, else a pip-installed bundle (the
`redis-server` PyPI package ships one). If none is found, every test that needs Redis fails
with a message saying how to install one: nothing is skipped silently.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_HINT = ("no redis-server binary found: install one with `apt-get install -y redis-server`, "
                "or `pip install redis-server`, or set REDIS_SERVER_BIN=/path/to/redis-server")


def find_redis_server():
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise RuntimeError(f"REDIS_SERVER_BIN={explicit} is not an executable file; {INSTALL_HINT}")
    found = shutil.which("redis-server") or (os.access("/usr/bin/redis-server", os.X_OK) and "/usr/bin/redis-server")
    if found:
        return found
    try:
        import redis_server  # PyPI bundle, optional
        return redis_server.REDIS_SERVER_PATH
    except (ImportError, AttributeError):
        pass
    raise RuntimeError(INSTALL_HINT)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server on 127.0.0.1 and a free port, no persistence, stopped by PID.

    kill()/restart() let chaos tests take Redis away mid-test; restart() reuses the port so
    clients reconnect to the same URL.
    """

    def __init__(self, extra_args=()):
        self.binary = find_redis_server()
        self.dir = tempfile.mkdtemp(prefix="eexit-redis-")
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s=10.0):
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--unixsocket", os.path.join(self.dir, "redis.sock"),
                "--logfile", os.path.join(self.dir, "redis.log"), *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                               socket_connect_timeout=0.5).ping():
                    return self
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                # ResponseError: with an ACL file the default user may be disabled; the
                # server is up if it answers at all.
                if self._answers_at_all():
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING within {timeout_s}s: {self.log_tail()}")

    def _answers_at_all(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return bool(sock.recv(64))
        except OSError:
            return False

    def log_tail(self):
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def kill(self):
        """SIGKILL, as a crash would; waits until the process is gone."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self):
        self.kill()
        return self.start()

    def client(self, **options):
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2, **options)


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


def stop_process(process, timeout_s=5.0):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    return process.returncode


def wait_for(predicate, timeout_s, interval_s=0.02, message="condition"):
    """Poll predicate until truthy; returns its value or fails the test with `message`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)

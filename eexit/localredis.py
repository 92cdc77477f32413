"""A private redis-server on 127.0.0.1 for the demo, the drill's self-test, the chaos suite
and the tests. Not imported by any daemon: the daemons talk to whatever REDIS_URL names.

The binary comes from $REDIS_SERVER_BIN, else PATH, else /usr/bin/redis-server, else a
pip-installed bundle (the `redis-server` PyPI package ships one).
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis

INSTALL_HINT = ("no redis-server binary found: install one with `apt-get install -y redis-server`, "
                "or `pip install redis-server`, or set REDIS_SERVER_BIN=/path/to/redis-server")

_PR_SET_PDEATHSIG = 1


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


def die_with_parent():
    """preexec_fn for child processes of the demo and the chaos suite: the kernel SIGKILLs the
    child when the process that started it dies, even by SIGKILL, so nothing is left running.
    Linux only; elsewhere a no-op (the callers' finally blocks still stop their children)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class RedisServer:
    """A redis-server on 127.0.0.1 and a free port, no persistence, stopped by PID.

    kill()/restart() let chaos tests take Redis away mid-test; restart() reuses the port so
    clients reconnect to the same URL. With die_with_parent=True the server is killed by the
    kernel if the starting process dies.
    """

    def __init__(self, extra_args=(), die_with_parent=False):
        self.binary = find_redis_server()
        self.dir = tempfile.mkdtemp(prefix="eexit-redis-")
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.process = None
        self.started = False      # once up, restart() keeps the port: clients hold its URL

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s=10.0):
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--unixsocket", os.path.join(self.dir, "redis.sock"),
                "--logfile", os.path.join(self.dir, "redis.log"), *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=die_with_parent if self.die_with_parent else None)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                if not self.started and "Address already in use" in self.log_tail():
                    # Another process took the free port between free_port() and this start
                    # (parallel test workers): a first start may take another one.
                    self.port = free_port()
                    return self.start(timeout_s)
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {timeout_s}s: {self.log_tail()}")
            try:
                # Ours, not another process's server on a port taken meanwhile (its pid), and
                # done loading its AOF/RDB: INFO answers while loading, every data command
                # then fails with BusyLoadingError.
                info = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                                   socket_connect_timeout=0.5).info()
                if info.get("process_id") == self.process.pid and not info.get("loading"):
                    self.started = True
                    return self
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                # ResponseError: with an ACL file the default user may be disabled; the
                # server is up if it answers at all.
                if self._answers_at_all() and self.process.poll() is None:
                    self.started = True
                    return self
            time.sleep(0.02)

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


def stop_process(process, timeout_s=5.0):
    """SIGTERM, then SIGKILL after timeout_s; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    return process.returncode

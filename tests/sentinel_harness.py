"""A Sentinel topology on 127.0.0.1 for the HA tests: one master, one replica, three sentinels.

Every process is a real `redis-server` (the sentinels are `redis-server <conf> --sentinel`) on a
free loopback port, stopped by PID. Failover is tuned to be fast enough for CI:
down-after-milliseconds 500 and a small failover-timeout, so a killed master is replaced in
about 1-3 s. `kill_master()` SIGKILLs whichever server the sentinels currently name as master;
`wait_for_failover()` returns once the sentinels agree on a new one and it answers as master.
"""

import os
import shutil
import subprocess
import tempfile
import time

import redis

from eexit.localredis import RedisServer, find_redis_server, free_port
from tests.harness import stop_process

SERVICE = "mymaster"


class SentinelProcess:
    """One `redis-server --sentinel` with its own config file (sentinels rewrite it)."""

    def __init__(self):
        self.binary = find_redis_server()
        self.dir = tempfile.mkdtemp(prefix="eexit-sentinel-")
        self.port = free_port()
        self.myid = os.urandom(20).hex()
        self.config_path = os.path.join(self.dir, "sentinel.conf")
        self.process = None

    def configure(self, service, master_port, replica_ports, peers, quorum, down_after_ms,
                  failover_timeout_ms):
        """Write the config. Naming the replicas and the other sentinels up front saves the
        ~5 s in which sentinels would otherwise discover them (INFO every 10 s, hello every
        2 s); without them a failover cannot be voted."""
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
                 f"logfile {os.path.join(self.dir, 'sentinel.log')}", f"sentinel myid {self.myid}",
                 f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
                 f"sentinel down-after-milliseconds {service} {down_after_ms}",
                 f"sentinel failover-timeout {service} {failover_timeout_ms}",
                 f"sentinel parallel-syncs {service} 1"]
        lines += [f"sentinel known-replica {service} 127.0.0.1 {port}" for port in replica_ports]
        lines += [f"sentinel known-sentinel {service} 127.0.0.1 {peer.port} {peer.myid}"
                  for peer in peers if peer is not self]
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return self

    def start(self, timeout_s=10.0):
        self.process = subprocess.Popen([self.binary, self.config_path, "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sentinel exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.client().ping():
                    return self
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"sentinel did not answer PING within {timeout_s}s: {self.log_tail()}")

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1,
                           socket_connect_timeout=1, retry=None, decode_responses=True)

    def log_tail(self):
        try:
            with open(os.path.join(self.dir, "sentinel.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return "(no log)"

    def stop(self):
        if self.process:
            stop_process(self.process, timeout_s=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelTopology:
    """master + replica + three sentinels. `url` is the REDIS_URL a daemon gets."""

    def __init__(self, replicas=1, sentinels=3, down_after_ms=500, failover_timeout_ms=2000,
                 server_args=()):
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        # The master waits 5 s by default before a diskless full sync to a new replica.
        self.server_args = ["--repl-diskless-sync-delay", "0", *server_args]
        self.servers = []        # RedisServer, master first
        self.sentinels = []
        self.killed = []

    @property
    def url(self):
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout_s=20.0):
        try:
            master = RedisServer(self.server_args).start()
            self.servers.append(master)
            for _ in range(self.replica_count):
                self.servers.append(RedisServer(
                    [*self.server_args, "--replicaof", "127.0.0.1", str(master.port)]).start())
            quorum = self.sentinel_count // 2 + 1
            self.sentinels = [SentinelProcess() for _ in range(self.sentinel_count)]
            for sentinel in self.sentinels:
                sentinel.configure(SERVICE, master.port, [s.port for s in self.servers[1:]],
                                   self.sentinels, quorum, self.down_after_ms,
                                   self.failover_timeout_ms).start()
            self._wait(self._settled, timeout_s, "replicas in sync and sentinels knowing each other")
        except BaseException:
            self.stop()
            raise
        return self

    def _settled(self):
        for server in self.servers[1:]:
            info = server.client().info("replication")
            if info.get("master_link_status") != "up":
                return False
        for sentinel in self.sentinels:
            try:
                state = sentinel.client().sentinel_master(SERVICE)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                return False
            if (int(state["num-other-sentinels"]) < self.sentinel_count - 1
                    or int(state["num-slaves"]) < self.replica_count):
                return False
        return True

    def master_port(self):
        """The master's port as the first answering sentinel names it."""
        for sentinel in self.sentinels:
            try:
                address = sentinel.client().sentinel_get_master_addr_by_name(SERVICE)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if address:
                return int(address[1])
        raise RuntimeError("no sentinel names a master")

    def server_on(self, port):
        return next(s for s in self.servers if s.port == port)

    def master(self):
        return self.server_on(self.master_port())

    def kill_master(self):
        """SIGKILL the current master, as a crashed host would. Returns its port."""
        master = self.master()
        master.kill()
        self.killed.append(master)
        return master.port

    def wait_for_failover(self, old_port, timeout_s=20.0):
        """Until every live sentinel names a master other than old_port and that server
        reports role:master. Returns the new master's port."""
        def promoted():
            ports = set()
            for sentinel in self.sentinels:
                address = sentinel.client().sentinel_get_master_addr_by_name(SERVICE)
                ports.add(int(address[1]) if address else None)
            if len(ports) != 1:
                return None
            port = ports.pop()
            if port in (None, old_port):
                return None
            role = self.server_on(port).client().info("replication").get("role")
            return port if role == "master" else None
        return self._wait(promoted, timeout_s, f"a failover away from port {old_port}")

    def revive_killed(self, timeout_s=20.0):
        """Restart the killed servers as replicas of the current master (a crashed host coming
        back) and wait until the master and the sentinels count them again."""
        master_port = self.master_port()
        for server in self.killed:
            server.extra_args = [*self.server_args, "--replicaof", "127.0.0.1", str(master_port)]
            server.start()
        self.killed = []

        def counted():
            info = self.server_on(master_port).client().info("replication")
            if int(info.get("connected_slaves", 0)) < self.replica_count:
                return False
            return all(int(s.client().sentinel_master(SERVICE)["num-slaves"]) >= self.replica_count
                       and not any("s_down" in r["flags"] for r in s.client().sentinel_slaves(SERVICE))
                       for s in self.sentinels)
        self._wait(counted, timeout_s, "revived replicas in sync and seen by the sentinels")

    def _wait(self, predicate, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = predicate()
            except (redis.ConnectionError, redis.TimeoutError):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                logs = "\n".join(s.log_tail()[-800:] for s in self.sentinels)
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{logs}")
            time.sleep(0.05)

    def stop(self):
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()

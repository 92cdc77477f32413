"""A full drill as deployed: the four daemons as real processes, each logged in to Redis as its
own ACL user (systemd/redis-acl.conf, rendered by tools/install_offline.py), each reading its
secrets from its own $CREDENTIALS_DIRECTORY like under systemd's LoadCredential=, signed
panics, real ccxt to the paper exchange. The Exit Brain is SIGKILLed; the chain must end FLAT.

Then two promises are checked:
  - every daemon did its job under least privilege: no NOPERM anywhere in their logs;
  - no secret (exchange key and secret, HMAC keys, Redis passwords) appears in any log line,
    any Redis key or stream entry, the EEW journal, the audit file or `eexit status` output.
"""

import importlib.util
import os
import secrets
import subprocess
import sys
import unittest
from pathlib import Path

from eexit import ops, schema
from eexit.demo import DAEMON_MODULES, DEMO_ORDERS, STARTUP_GRACE_S, Stack
from eexit.localredis import RedisServer, die_with_parent

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("install_offline", ROOT / "tools/install_offline.py")
install_offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_offline)

MODULES = dict(DAEMON_MODULES, audit="eexit.audit")
ADMIN = ("test-admin", secrets.token_hex(16))


class AclStack(Stack):
    """demo.Stack with an ACL'd Redis and per-daemon credential directories instead of
    secrets in the environment."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.passwords = {name: secrets.token_urlsafe(24) for name in (*MODULES, "ops", "bot", "hook", "alert", "risk")}
        self.api = (secrets.token_hex(20), secrets.token_hex(32))

    def secrets(self):
        return [*self.passwords.values(), *self.api, *(key for _kid, key in self.keys.values())]

    def start(self, daemons=tuple(MODULES), orders=DEMO_ORDERS):
        return super().start(daemons, orders)

    def make_redis(self):
        users = {f"eexit-{name}": password for name, password in self.passwords.items()}
        acl = install_offline.render_acl((ROOT / "systemd/redis-acl.conf").read_text(), users)
        acl_path = Path(self.workdir) / "users.acl"
        acl_path.write_text(acl + f"user {ADMIN[0]} on >{ADMIN[1]} ~* &* +@all\n")
        return RedisServer(["--aclfile", str(acl_path)], die_with_parent=True)

    def make_paper(self):
        return super().make_paper(api_key=self.api[0], api_secret=self.api[1])

    def credentials(self, name):
        """The files systemd would put in $CREDENTIALS_DIRECTORY for this daemon's unit."""
        directory = Path(self.workdir) / "credentials" / name
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = {"redis_username": f"eexit-{name}", "redis_password": self.passwords[name]}
        if name in ("brain", "eew", "ops"):
            files.update(api_key=self.api[0], api_secret=self.api[1])
        own = {"watchdog": ["watchdog"], "ops": ["ops"], "eew": list(self.keys)}.get(name, [])
        if own:
            files["panic_hmac_keys"] = "\n".join(f"{self.keys[i][0]} {i} {self.keys[i][1]}" for i in own) + "\n"
        for file_name, value in files.items():
            (directory / file_name).write_text(value + "\n")
        return str(directory)

    def daemon_env(self, name):
        env = self.env(CREDENTIALS_DIRECTORY=self.credentials(name),
                       EEXIT_AUDIT_FILE=os.path.join(self.workdir, "audit.jsonl"),
                       EEXIT_METRICS_FILE=os.path.join(self.workdir, "eexit.prom"))
        for variable in ("EEXIT_API_KEY", "EEXIT_API_SECRET", "EEXIT_PANIC_HMAC_KEYS"):
            env.pop(variable, None)
        return env

    def start_daemon(self, name):
        with open(self.log_path(name), "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", MODULES[name]], env=self.daemon_env(name),
                                       stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                       start_new_session=True, preexec_fn=die_with_parent)
        self.processes[name] = process
        self.started_mono[name] = __import__("time").monotonic()
        return process

    def client(self):
        return self.redis.client(username=ADMIN[0], password=ADMIN[1])


def redis_dump(client):
    """Every key's content as text, whatever its type."""
    chunks = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "stream":
            value = client.xrange(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = client.get(key)
        chunks.append(f"{key!r} {kind} {value!r}")
    return "\n".join(chunks)


class DrillUnderAclTest(unittest.TestCase):
    def test_drill_flat_under_least_privilege_and_no_secret_leaks(self):
        stack = AclStack(seed="BTCUSDT:0.01,ETHUSDT:-0.5")
        self.addCleanup(stack.stop)
        stack.start()
        client = stack.client()
        positions = len(stack.paper.positions())
        try:
            stack.wait_until(lambda: stack.guarded(client, positions), 30, "the brain guarding, EEW and watchdog up")
            stack.wait_until(lambda: stack.running_for("watchdog") > STARTUP_GRACE_S + 0.2, 10, "the watchdog's grace")
            stack.kill_daemon("brain")
            report = stack.wait_until(lambda: ops.latest(client, schema.COMPLETED_STREAM), 30, "the EEW's report")
        except TimeoutError:
            tails = {name: "".join(stack.log_tail(name, 20)) for name in stack.processes}
            raise AssertionError(f"drill did not complete under the ACL: {tails}") from None
        parsed, _ = schema.CompletionReport.from_fields(report[1])
        self.assertEqual(parsed.status, "FLAT", report)
        self.assertEqual(parsed.issued_by, "watchdog")
        self.assertFalse(stack.paper.positions())
        self.assertEqual(client.hget(schema.TRADING_STATE_KEY, "halted"), b"true")
        stack.wait_until(lambda: b'"panic"' in Path(stack.workdir, "audit.jsonl").read_bytes()
                         if Path(stack.workdir, "audit.jsonl").exists() else False, 10, "the audit record")

        status = subprocess.run([sys.executable, "-m", "eexit.cli", "status"], env=stack.daemon_env("ops"),
                                cwd=stack.workdir, capture_output=True, text=True, timeout=60)
        self.assertIn("halt", (status.stdout + status.stderr).lower())
        for name in MODULES:
            stack.stop_daemon(name)

        logs = {name: Path(stack.log_path(name)).read_text(errors="replace") for name in MODULES}
        for name, text in logs.items():
            with self.subTest(daemon=name):
                self.assertTrue(text.strip(), f"{name} wrote no log at all")
                self.assertNotIn("NOPERM", text.upper())
                self.assertNotIn("no permissions", text)
        self.assertNotIn("no permissions", status.stdout + status.stderr)

        haystacks = dict(logs, redis=redis_dump(client), status=status.stdout + status.stderr)
        # Every file the daemons wrote: EEW journal, audit file and its head, metrics.
        for path in Path(stack.workdir).iterdir():
            if path.is_file() and not path.name.endswith((".log", ".acl")):
                haystacks[path.name] = path.read_text(errors="replace")
        self.assertIn("audit.jsonl", haystacks)
        for secret in stack.secrets():
            for where, text in haystacks.items():
                with self.subTest(where=where, secret=secret[:4] + "..."):
                    # assertFalse, not assertNotIn: a failure must not print the haystack.
                    self.assertFalse(secret[:16] in text, f"a secret (or its first 16 characters) is in {where}")


if __name__ == "__main__":
    unittest.main()

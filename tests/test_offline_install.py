"""The air-gapped install: build a wheelhouse (the one step that may use the network, as on
the connected machine), then tools/install_offline.py installs into a fresh venv under a
temporary root while pip cannot reach any index, and the result works. Both steps run with
the distribution's own python3 (Debian 12: /usr/bin/python3, 3.11.2, below the 3.11.3 where
redis-py stops needing async-timeout), as docs/DEPLOY.md says (tests/staging.py).

About 20-30 s (ccxt is large). Building the wheelhouse needs the package index; on a machine
without it the test fails, saying so, rather than skipping."""

import os
import re
import shutil
import stat
import subprocess
import tempfile
import unittest
from pathlib import Path

import redis

from tests import staging
from tests.harness import RedisServer
from tests.staging import offline_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools/install_offline.py"
UNITS = ("eexit-brain.service", "eexit-watchdog.service", "eexit-eew.service", "eexit-audit.service",
         "eexit-alert.service", "eexit-risk.service")
DAEMONS = ("brain", "watchdog", "eew", "audit", "alert", "ops", "hook")


class LockTest(unittest.TestCase):
    def test_requirements_in_is_setup_py_install_requires_and_the_lock_pins_them_with_hashes(self):
        wanted = [line.strip() for line in (ROOT / "requirements.in").read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
        setup_py = (ROOT / "setup.py").read_text()
        declared = re.findall(r'"([a-z][a-z0-9_.-]*>=[0-9.]+)"', setup_py[setup_py.index("install_requires"):])
        self.assertEqual(sorted(wanted), sorted(declared))
        lock = (ROOT / "requirements.lock").read_text()
        for requirement in wanted:
            name = requirement.split(">=")[0]
            self.assertRegex(lock, rf"(?m)^{re.escape(name)}==\S+ \\\n    --hash=sha256:[0-9a-f]{{64}}")

    def test_every_pin_has_hashes_and_the_lock_serves_python_before_3_11_3(self):
        """Debian 12's python3 is 3.11.2: redis-py needs async-timeout there (not from 3.11.3),
        so the lock carries it under that marker; every pin is followed by its hashes."""
        lock = (ROOT / "requirements.lock").read_text()
        pins = re.findall(r"(?m)^([a-z0-9][a-z0-9_.-]*)==(\S+)(?: ;[^\\]*)? \\\n    --hash=sha256:[0-9a-f]{64}", lock)
        self.assertEqual(len(pins), len(re.findall(r"(?m)^[a-z0-9][a-z0-9_.-]*==", lock)), lock[:500])
        self.assertRegex(lock, r"(?m)^async-timeout==\S+ ; python_full_version < '3\.11\.3' \\$")


class OfflineInstallTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="eexit-offline-"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.wheelhouse = staging.wheelhouse()
        cls.root = cls.tmp / "root"
        cls.install = cls.run_install()

    @classmethod
    def run_install(cls, wheelhouse=None):
        return staging.install(wheelhouse or cls.wheelhouse, cls.root, cwd=cls.tmp)

    def test_install_succeeded_and_printed_next_steps(self):
        self.assertEqual(self.install.returncode, 0, self.install.stdout[-2000:] + self.install.stderr[-2000:])
        self.assertIn("--no-index", self.install.stdout)
        self.assertIn("Next steps", self.install.stdout)
        self.assertIn("aclfile", self.install.stdout)

    def test_pip_really_could_not_reach_an_index(self):
        python = self.root / "opt/eexit/venv/bin/python"
        attempt = subprocess.run([str(python), "-m", "pip", "download", "--no-deps", "-d", str(self.tmp / "dl"),
                                  "ccxt"], capture_output=True, text=True, timeout=120, env=offline_env())
        self.assertNotEqual(attempt.returncode, 0, attempt.stdout)

    def test_venv_runs_eexit_and_its_dependencies(self):
        python = self.root / "opt/eexit/venv/bin/python"
        code = ("import eexit, eexit.signing, eexit.bus, eexit.notify, ccxt, redis, redis.asyncio, platform; "
                "print(eexit.__file__); print(ccxt.__version__); print(platform.python_version())")
        result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120,
                                env=offline_env(), cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn(str(self.root / "opt/eexit/venv"), result.stdout.splitlines()[0])
        # The venv is the distribution's interpreter, not the one running the tests.
        self.assertEqual(result.stdout.splitlines()[2], staging.distro_python_version())

    def test_files_and_modes(self):
        etc = self.root / "etc/eexit"
        mode = lambda path: stat.S_IMODE(path.stat().st_mode)
        self.assertEqual(mode(etc / "eexit.env"), 0o640)
        self.assertEqual((etc / "eexit.env").read_text(), (ROOT / "systemd/eexit.env.example").read_text())
        self.assertEqual(mode(etc / "credentials"), 0o700)
        for daemon in DAEMONS:
            self.assertEqual(mode(etc / "credentials" / daemon), 0o700)
            self.assertEqual(mode(etc / "credentials" / daemon / "redis_password"), 0o600)
        self.assertEqual(mode(etc / "redis-acl.conf"), 0o640)
        # The keys a daemon reads at start exist, empty, so that an unfilled one stops the
        # daemon with exit 2 naming it rather than systemd's nameless 243/CREDENTIALS.
        for daemon, name in (("brain", "api_key"), ("brain", "api_secret"), ("eew", "api_key"),
                             ("eew", "api_secret"), ("eew", "panic_hmac_keys"), ("watchdog", "panic_hmac_keys")):
            self.assertEqual(((etc / "credentials" / daemon / name).read_text(),
                              mode(etc / "credentials" / daemon / name)), ("", 0o600), f"{daemon}/{name}")
        # eexit's own redis-server instance config (redis-server@eexit), rendered as shipped.
        redis_conf = self.root / "etc/redis/redis-eexit.conf"
        self.assertEqual(redis_conf.read_text(), (ROOT / "systemd/redis-eexit.conf").read_text())
        self.assertEqual(mode(redis_conf), 0o640)
        for unit in UNITS:
            installed = self.root / "etc/systemd/system" / unit
            self.assertEqual(installed.read_text(), (ROOT / "systemd" / unit).read_text())
            self.assertEqual(mode(installed), 0o644)

    def test_generated_passwords_work_against_the_rendered_acl(self):
        etc = self.root / "etc/eexit"
        server = RedisServer(["--aclfile", str(etc / "redis-acl.conf")]).start()
        self.addCleanup(server.stop)
        for daemon in DAEMONS:
            secret = (etc / "credentials" / daemon / "redis_password").read_text().strip()
            self.assertGreaterEqual(len(secret), 32)
            self.assertNotIn(secret, (etc / "redis-acl.conf").read_text())
            client = server.client(username=f"eexit-{daemon}", password=secret)
            self.addCleanup(client.close)
            self.assertTrue(client.ping())
        with self.assertRaises(redis.exceptions.AuthenticationError):
            server.client(username="eexit-ops", password="guess").ping()

    def test_wheelhouse_is_locked_and_summed(self):
        lock = (self.wheelhouse / "requirements.lock").read_text().splitlines()
        wheels = sorted(path.name for path in self.wheelhouse.glob("*.whl"))
        self.assertEqual(len(lock), len(wheels))
        self.assertTrue(all(" --hash=sha256:" in line for line in lock), lock)
        listed = [line.split("  ", 1)[1] for line in (self.wheelhouse / "SHA256SUMS").read_text().splitlines()]
        self.assertEqual(sorted(listed), sorted([*wheels, "requirements.lock"]))
        # Every dependency wheel comes from a file the committed lock names (by version).
        committed = {line.split(" ")[0].lower().replace("-", "_") for line in
                     (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
        for line in lock:
            pin = line.split(" ")[0].lower()
            if not pin.startswith("eexit=="):
                self.assertIn(pin, committed)
        self.assertIn("--require-hashes", self.install.stdout)
        self.assertIn(f"match SHA256SUMS", self.install.stdout)

    def test_altered_or_extra_files_are_refused_before_anything_is_installed(self):
        for name, alter in (("changed", lambda wh: open(next(wh.glob("redis-*.whl")), "ab").write(b"x")),
                            ("extra", lambda wh: (wh / "evil-1.0-py3-none-any.whl").write_bytes(b"PK"))):
            copy = self.tmp / f"wheelhouse-{name}"
            shutil.copytree(self.wheelhouse, copy)
            alter(copy)
            result = staging.install(copy, self.tmp / f"root-{name}", cwd=self.tmp)
            self.assertNotEqual(result.returncode, 0, result.stdout)
            self.assertIn("SHA256SUMS", result.stderr)
            self.assertFalse((self.tmp / f"root-{name}/opt/eexit/venv").exists())

    def test_rerun_with_a_newer_wheelhouse_upgrades_and_keeps_secrets_and_settings(self):
        etc = self.root / "etc/eexit"
        before = {d: (etc / "credentials" / d / "redis_password").read_text() for d in DAEMONS}
        self.addCleanup((etc / "eexit.env").write_text, (etc / "eexit.env").read_text())
        (etc / "eexit.env").write_text("REDIS_URL=redis://127.0.0.1:6380/0\n")
        acl_before = (etc / "redis-acl.conf").read_text()
        again = self.run_install(staging.bumped("99.0.1"))
        self.assertEqual(again.returncode, 0, again.stdout[-2000:] + again.stderr[-2000:])
        self.assertEqual({d: (etc / "credentials" / d / "redis_password").read_text() for d in DAEMONS}, before)
        self.assertEqual((etc / "eexit.env").read_text(), "REDIS_URL=redis://127.0.0.1:6380/0\n")
        self.assertEqual((etc / "eexit.env.new").read_text(), (ROOT / "systemd/eexit.env.example").read_text())
        self.assertIn(f"config: {etc / 'eexit.env'} kept", again.stdout)
        self.assertEqual((etc / "redis-acl.conf").read_text(), acl_before)
        self.assertIn("code: eexit 0.", again.stdout)
        self.assertIn("-> 99.0.1", again.stdout)
        version = subprocess.run([str(self.root / "opt/eexit/venv/bin/eexit"), "--version"],
                                 capture_output=True, text=True, timeout=60, env=offline_env())
        self.assertEqual(version.stdout.strip(), "eexit 99.0.1", version.stderr)


if __name__ == "__main__":
    unittest.main()

"""The air-gapped install: build a wheelhouse (the one step that may use the network, as on
the connected machine), then tools/install_offline.py installs into a fresh venv under a
temporary root while pip cannot reach any index, and the result works.

About 20-30 s (ccxt is large). Building the wheelhouse needs the package index; on a machine
without it the test fails, saying so, rather than skipping."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import redis

from tests.harness import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools/install_offline.py"
UNITS = ("eexit-brain.service", "eexit-watchdog.service", "eexit-eew.service", "eexit-audit.service")
DAEMONS = ("brain", "watchdog", "eew", "audit", "ops")


def offline_env():
    """pip sees an index and proxies on a closed local port, no config file, no retries."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_INDEX_URL=f"{closed}/simple", PIP_EXTRA_INDEX_URL="", PIP_CONFIG_FILE=os.devnull,
               HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed, https_proxy=closed,
               PIP_RETRIES="0", PIP_TIMEOUT="3")
    return env


class OfflineInstallTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="eexit-offline-"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        # Build from a copy so the wheel build leaves no build/ or egg-info in the checkout.
        source = cls.tmp / "source"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "bench"))
        cls.wheelhouse = cls.tmp / "wheelhouse"
        built = subprocess.run([sys.executable, str(SCRIPT), "wheelhouse", "--out", str(cls.wheelhouse),
                                "--project", str(source)], capture_output=True, text=True, timeout=600)
        if built.returncode != 0:
            raise AssertionError("building the wheelhouse failed (it needs the package index, like "
                                 f"the connected machine it stands for):\n{built.stdout[-1500:]}\n{built.stderr[-1500:]}")
        cls.root = cls.tmp / "root"
        cls.install = cls.run_install()

    @classmethod
    def run_install(cls):
        return subprocess.run([sys.executable, str(SCRIPT), "install", "--wheelhouse", str(cls.wheelhouse),
                               "--root", str(cls.root)], capture_output=True, text=True, timeout=600,
                              env=offline_env(), cwd=cls.tmp)

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
        code = ("import eexit, eexit.signing, eexit.bus, eexit.notify, ccxt, redis; "
                "print(eexit.__file__); print(ccxt.__version__)")
        result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120,
                                env=offline_env(), cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn(str(self.root / "opt/eexit/venv"), result.stdout.splitlines()[0])

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

    def test_rerun_keeps_secrets_and_settings(self):
        etc = self.root / "etc/eexit"
        before = {d: (etc / "credentials" / d / "redis_password").read_text() for d in DAEMONS}
        self.addCleanup((etc / "eexit.env").write_text, (etc / "eexit.env").read_text())
        (etc / "eexit.env").write_text("REDIS_URL=redis://127.0.0.1:6380/0\n")
        acl_before = (etc / "redis-acl.conf").read_text()
        again = self.run_install()
        self.assertEqual(again.returncode, 0, again.stderr[-2000:])
        self.assertEqual({d: (etc / "credentials" / d / "redis_password").read_text() for d in DAEMONS}, before)
        self.assertEqual((etc / "eexit.env").read_text(), "REDIS_URL=redis://127.0.0.1:6380/0\n")
        self.assertEqual((etc / "redis-acl.conf").read_text(), acl_before)


if __name__ == "__main__":
    unittest.main()

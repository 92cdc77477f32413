"""The shipped systemd units: `systemd-analyze verify` prints nothing, `systemd-analyze
security --offline=true` rates each at most 1.1 (issue 14), and the unit texts keep the promises that
the analyzer cannot see (no BindsTo/PartOf, start limits in [Unit], credentials, notify)."""

import configparser
import re
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = ("eexit-brain.service", "eexit-watchdog.service", "eexit-eew.service", "eexit-audit.service",
         "eexit-alert.service", "eexit-risk.service")
# The brain's crash path (a oneshot template started by the brain's ExecStopPost=): analysed
# and verified like the others; its text is checked in tests/test_hook.py.
CRASH_UNIT = "eexit-brain-crash@.service"
# The warm crash path: a daemon like the others, but with the crash unit's Redis user and key.
LISTENER_UNIT = "eexit-crash-listener.service"
MAX_EXPOSURE = 1.1
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HOST_UNITS = Path("/usr/lib/systemd/system")
PYTHON_IN_UNITS = "/opt/eexit/venv/bin/python"


def read_unit(name):
    """{section: {key: [values]}}: systemd keys repeat, configparser would keep one."""
    sections, current = {}, None
    for raw in (UNIT_DIR / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def exposure(name):
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(UNIT_DIR / name)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None:
        raise AssertionError(f"no exposure figure for {name}: rc={result.returncode} "
                             f"{result.stdout[-500:]} {result.stderr[-500:]}")
    return float(match.group(1))


def make_verify_root(directory):
    """A root where verify finds the host's stock units (sysinit.target etc.), the units
    under test, and an executable at the ExecStart path."""
    root = Path(directory)
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    python = root / PYTHON_IN_UNITS.lstrip("/")
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    shell = root / "bin/sh"                            # the brain's ExecStopPost=+/bin/sh
    shell.parent.mkdir(parents=True)
    shutil.copy(python, shell)
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    for name in (*UNITS, LISTENER_UNIT, CRASH_UNIT):
        shutil.copy(UNIT_DIR / name, target / name)
    return root, target


def verify(root, unit_path):
    return subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", str(unit_path)],
                          capture_output=True, text=True, timeout=60)


@unittest.skipIf(SYSTEMD_ANALYZE is None,
                 "SKIPPED LOUDLY: systemd-analyze not installed (apt-get install -y systemd); "
                 "the unit hardening and verify checks did NOT run")
class SystemdAnalyzeTest(unittest.TestCase):
    def test_security_exposure_at_most_1_1(self):
        figures = {name: exposure(name) for name in (*UNITS, LISTENER_UNIT, CRASH_UNIT)}
        print(f"\nsystemd-analyze security exposure: {figures}")
        for name, figure in figures.items():
            with self.subTest(unit=name):
                self.assertLessEqual(figure, MAX_EXPOSURE)

    @unittest.skipUnless(HOST_UNITS.is_dir(), f"{HOST_UNITS} missing: no stock units to verify against")
    def test_verify_prints_nothing(self):
        with tempfile.TemporaryDirectory() as directory:
            root, target = make_verify_root(directory)
            for name in (*UNITS, LISTENER_UNIT, CRASH_UNIT.replace("@", "@verify")):
                with self.subTest(unit=name):
                    result = verify(root, target / name)
                    self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    @unittest.skipUnless(HOST_UNITS.is_dir(), f"{HOST_UNITS} missing: no stock units to verify against")
    def test_verify_would_catch_a_typo(self):
        """Proves the verify check above is not vacuous in this setup."""
        with tempfile.TemporaryDirectory() as directory:
            root, target = make_verify_root(directory)
            broken = target / "eexit-brain.service"
            broken.write_text(broken.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
            result = verify(root, broken)
            self.assertIn("NoNewPrivilege", result.stdout + result.stderr)


class UnitTextTest(unittest.TestCase):
    """What the analyzer does not judge: the issue's and the predecessor's requirements."""

    def test_each_unit(self):
        for name in UNITS:
            with self.subTest(unit=name):
                unit = read_unit(name)
                service, unit_section = unit["Service"], unit["Unit"]
                self.assertEqual(service["Type"], ["notify"])
                self.assertEqual(service["NotifyAccess"], ["main"])
                self.assertIn("WatchdogSec", service)
                self.assertEqual(service["EnvironmentFile"], ["/etc/eexit/eexit.env"])
                self.assertEqual(service["DynamicUser"], ["yes"])
                self.assertEqual(service["Restart"], ["always"])
                # 2: bad configuration, never retried; the audit logger adds 3 (broken chain).
                self.assertEqual(service["RestartPreventExitStatus"][0].split()[0], "2")
                self.assertTrue(service["ExecStart"][0].startswith(f"{PYTHON_IN_UNITS} -m eexit."))
                credentials = [value.split(":")[0] for value in service["LoadCredential"]]
                self.assertIn("redis_password", credentials)
                self.assertIn("StartLimitIntervalSec", unit_section)
                for key in ("StartLimitIntervalSec", "StartLimitBurst", "StartLimitInterval"):
                    self.assertNotIn(key, service, "start limits belong in [Unit]")
                for section in unit.values():
                    for key in ("BindsTo", "PartOf", "Requires", "Requisite"):
                        self.assertNotIn(key, section)
                self.assertEqual(service["SetCredential"], [f"redis_username:{name[:-len('.service')]}"])

    def test_crash_listener_is_a_hardened_daemon_with_the_crash_units_credentials(self):
        """Issue 23: the same hardening as the daemons, the same grant as the oneshot crash unit
        (Redis user eexit-hook, its key), a root-only runtime directory for its FIFO."""
        listener, crash = read_unit(LISTENER_UNIT), read_unit(CRASH_UNIT)
        service = listener["Service"]
        for key, value in (("Type", ["notify"]), ("NotifyAccess", ["main"]), ("DynamicUser", ["yes"]),
                           ("Restart", ["always"]), ("EnvironmentFile", ["/etc/eexit/eexit.env"]),
                           ("ExecStart", [f"{PYTHON_IN_UNITS} -m eexit.crash_listener"]),
                           ("RuntimeDirectory", ["eexit-crash-listener"]), ("RuntimeDirectoryMode", ["0700"])):
            self.assertEqual(service[key], value, key)
        self.assertIn("WatchdogSec", service)
        self.assertEqual(service["RestartPreventExitStatus"][0].split()[0], "2")
        for key in ("SetCredential", "LoadCredential"):
            self.assertEqual(service[key], crash["Service"][key], key)
        self.assertEqual(service["Environment"], ["EEXIT_HOOK_TIMEOUT_S=5"])
        self.assertIn("StartLimitIntervalSec", listener["Unit"])
        for section in listener.values():
            for key in ("BindsTo", "PartOf", "Requires", "Requisite"):
                self.assertNotIn(key, section)
        brain = (UNIT_DIR / "eexit-brain.service").read_text()
        self.assertIn("/run/eexit-crash-listener", brain)
        self.assertIn("eexit-brain-crash@", brain)

    def test_memory_and_tasks_are_bounded_on_every_unit(self):
        """Issue 14, behaviour 8; the sizing is argued in each unit's header comment."""
        units = {name: read_unit(name)["Service"] for name in (*UNITS, LISTENER_UNIT)}
        for name, service in units.items():
            with self.subTest(unit=name):
                self.assertRegex(service["MemoryMax"][0], r"^\d+[MG]$")
                self.assertGreater(int(service["TasksMax"][0]), 1)
                self.assertIn("MemoryMax=", (UNIT_DIR / name).read_text().split("[Unit]")[0])
        # Every EEXIT_CLOSE_CONCURRENCY the EEW accepts (up to 256 threads) must be able to start.
        self.assertGreater(int(units["eexit-eew.service"]["TasksMax"][0]), 256 + 1)

    def test_brain_watchdog_is_three_seconds(self):
        self.assertEqual(read_unit("eexit-brain.service")["Service"]["WatchdogSec"], ["3"])

    def test_exchange_credentials_only_where_needed(self):
        for name, wants_exchange in (("eexit-brain.service", True), ("eexit-eew.service", True),
                                     ("eexit-watchdog.service", False), ("eexit-audit.service", False),
                                     ("eexit-risk.service", True)):
            with self.subTest(unit=name):
                credentials = {v.split(":")[0] for v in read_unit(name)["Service"]["LoadCredential"]}
                self.assertEqual({"api_key", "api_secret"} <= credentials, wants_exchange)
                if not wants_exchange:
                    self.assertFalse({"api_key", "api_secret"} & credentials)

    def test_signing_keys_for_issuer_and_verifier(self):
        for name in ("eexit-watchdog.service", "eexit-eew.service", "eexit-risk.service"):
            credentials = {v.split(":")[0] for v in read_unit(name)["Service"]["LoadCredential"]}
            self.assertIn("panic_hmac_keys", credentials, name)

    def test_env_example_parses_and_holds_no_secret(self):
        text = (UNIT_DIR / "eexit.env.example").read_text()
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str
        parser.read_string("[env]\n" + text)
        names = set(parser["env"])
        self.assertIn("REDIS_URL", names)
        for name in names:
            self.assertNotRegex(name.lower(), r"secret|password|api_key|hmac")


if __name__ == "__main__":
    unittest.main()

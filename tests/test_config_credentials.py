"""Credentials that cannot be read end a daemon's start with exit 2 and one line naming the file
and the unit setting that should provide it (LoadCredential=), at the journal priority of
CRITICAL; never a traceback. (Under the real systemd, tests/test_installed_host.py.)"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from eexit.config import ConfigError, credential, credential_provider
from tests.harness import ROOT, free_port, python_env

DISTRO_PYTHON = "/usr/bin/python3"


class CredentialTest(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="eexit-creds-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def env(self, **extra):
        return {"CREDENTIALS_DIRECTORY": str(self.dir), **extra}

    def refused(self, env, name="api_key"):
        with self.assertRaises(ConfigError) as caught:
            credential(name, ("EEXIT_API_KEY",), env)
        message = str(caught.exception)
        self.assertIn(f"credential {name}: ", message)
        self.assertIn(f"LoadCredential={name}:", message)
        return message

    def test_a_readable_file_wins_over_the_variable(self):
        (self.dir / "api_key").write_text("from-file\n")
        self.assertEqual(credential("api_key", ("EEXIT_API_KEY",), self.env(EEXIT_API_KEY="from-env")), "from-file")

    def test_a_file_absent_from_the_directory_falls_back_to_the_variable_or_none(self):
        self.assertEqual(credential("api_key", ("EEXIT_API_KEY",), self.env(EEXIT_API_KEY="from-env")), "from-env")
        self.assertIsNone(credential("api_key", ("EEXIT_API_KEY",), self.env()))

    def test_a_directory_that_does_not_exist_is_refused(self):
        missing = self.dir / "gone"
        message = self.refused({"CREDENTIALS_DIRECTORY": str(missing), "EEXIT_API_KEY": "from-env"})
        self.assertIn(f"CREDENTIALS_DIRECTORY={missing} does not exist", message)

    def test_an_unreadable_file_is_refused_naming_it(self):
        (self.dir / "api_key").mkdir()      # as root, a directory is what cannot be read
        message = self.refused(self.env(EEXIT_API_KEY="from-env"))
        self.assertIn(f"cannot read {self.dir / 'api_key'} (IsADirectoryError", message)

    def test_an_empty_or_non_utf8_file_is_refused_without_quoting_it(self):
        (self.dir / "api_key").write_text("  \n")
        self.assertIn("is empty", self.refused(self.env()))
        (self.dir / "api_key").write_bytes(b"\xffsecret\xfe")
        message = self.refused(self.env())
        self.assertIn("is not UTF-8", message)
        self.assertNotIn("secret", message.replace("credential", ""))
        self.assertNotIn("0xff", message)

    def test_the_provider_is_the_units_load_credential_under_systemd(self):
        self.assertTrue(credential_provider("/run/credentials/eexit-eew.service", "api_key").startswith(
            "eexit-eew.service's LoadCredential=api_key:<file> provides it"))
        shell = credential_provider("/etc/eexit/credentials/ops", "api_key")
        self.assertIn("LoadCredential=api_key:<file>", shell)
        self.assertIn("CREDENTIALS_DIRECTORY", shell)

    @unittest.skipUnless(os.geteuid() == 0 and os.access(DISTRO_PYTHON, os.X_OK),
                         "needs root (to drop to nobody) and /usr/bin/python3")
    def test_permission_denied_as_another_user_is_a_config_error_not_a_traceback(self):
        """What a DynamicUser= process meets in a credentials directory it may not enter: the
        path test itself raised PermissionError before (outside the try)."""
        (self.dir / "api_key").write_text("k\n")
        os.chmod(self.dir, 0o700)
        code = ("import sys; from eexit.config import credential, ConfigError\n"
                "try:\n    credential('api_key', ())\nexcept ConfigError as exc:\n"
                "    print(exc); sys.exit(2)\n")
        result = subprocess.run([DISTRO_PYTHON, "-c", code], capture_output=True, text=True, timeout=60,
                                user=65534, group=65534, cwd="/",
                                env={"PYTHONPATH": str(ROOT), "CREDENTIALS_DIRECTORY": str(self.dir)})
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn(f"cannot read {self.dir / 'api_key'} (PermissionError: Permission denied)", result.stdout)
        self.assertIn("LoadCredential=api_key:<file>", result.stdout)


class DaemonRefusesTest(unittest.TestCase):
    """A daemon under the journal (JOURNAL_STREAM set) refusing its configuration: exit 2, every
    line of its output carries a priority, the summary line at CRITICAL (<2>)."""

    def run_daemon(self, module, **env):
        result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120,
                                cwd=ROOT, env=python_env(JOURNAL_STREAM="8:4242", **env))
        lines = (result.stdout + result.stderr).splitlines()
        self.assertEqual(result.returncode, 2, lines)
        self.assertNotIn("Traceback", result.stderr)
        self.assertTrue(lines and all(line[:3] in ("<2>", "<3>", "<4>", "<6>") for line in lines), lines)
        return lines

    def test_an_unreadable_credential_is_exit_2_naming_the_file_and_load_credential(self):
        directory = Path(tempfile.mkdtemp(prefix="eexit-creds-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        (directory / "panic_hmac_keys").mkdir()
        lines = self.run_daemon("eexit.watchdog", CREDENTIALS_DIRECTORY=directory,
                                REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
        summary = [line for line in lines if line.startswith("<2>eexit.watchdog: configuration error: ")]
        self.assertEqual(len(summary), 1, lines)
        self.assertIn(f"cannot read {directory / 'panic_hmac_keys'}", summary[0])
        self.assertIn("LoadCredential=panic_hmac_keys:<file>", summary[0])

    def test_a_bad_setting_summary_reaches_the_journal_as_critical(self):
        lines = self.run_daemon("eexit.eew", REDIS_URL="bogus://nowhere",
                                EEXIT_JOURNAL=str(Path(tempfile.gettempdir()) / f"eexit-unused-{os.getpid()}.jsonl"))
        self.assertTrue(any(line.startswith("<2>eexit.eew: configuration error: REDIS_URL") for line in lines), lines)


if __name__ == "__main__":
    unittest.main()

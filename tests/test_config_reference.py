"""docs/CONFIG.md is the one configuration reference: every environment variable and
credential file the code in eexit/ reads is a row there, and every row is read by the code.
The scanner is tested too: a variable planted in a copy of the package is found, and the
comparison names it."""

import re
import shutil
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs/CONFIG.md"

# How the code reads configuration (eexit/config.py and its few direct readers).
ENV_READS = re.compile(
    r"""(?:\benv_(?:str|int|float|bool|list)|\b_env_optional)\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|\b(?:env|environ)\.get\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|\b(?:env|environ)\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]"""
    r"""|["']((?:EEXIT|REDIS|BINANCE)_[A-Z0-9_]+)["']""")
# credential("x") (config.py), optional_credential("x") (alert.py), and a name held in a
# constant: CREDENTIAL_FILE = "x" (signing.py), HOOK_KEY_CREDENTIAL = "x" (hook.py).
CREDENTIAL_READS = re.compile(r"""\b(?:optional_)?credential\(\s*["']([a-z][a-z0-9_]*)["']"""
                              r"""|[A-Z_]*CREDENTIAL(?:_FILE)?\s*=\s*["']([a-z0-9_]+)["']""")
ROW = re.compile(r"^\|\s*`([A-Za-z][A-Za-z0-9_]*)`\s*\|", re.M)


def names_in_code(package):
    """(environment variable names, credential file names) read by the .py files."""
    variables, credentials = set(), set()
    for path in sorted(Path(package).glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in ENV_READS.finditer(text):
            variables.add(next(group for group in match.groups() if group))
        for match in CREDENTIAL_READS.finditer(text):
            credentials.add(next(group for group in match.groups() if group))
    return variables, credentials


def names_in_reference(text):
    """(variables, credential files): the first cell of each table row, split by section."""
    variables_part, _, credentials_part = text.partition("## Credential files")
    return set(ROW.findall(variables_part)), set(ROW.findall(credentials_part))


def differences(package, reference_text):
    """Human-readable lines, empty when code and reference agree."""
    code_vars, code_creds = names_in_code(package)
    doc_vars, doc_creds = names_in_reference(reference_text)
    lines = [f"read by the code, missing from docs/CONFIG.md: {name}" for name in sorted(code_vars - doc_vars)]
    lines += [f"credential file read by the code, missing from docs/CONFIG.md: {name}"
              for name in sorted(code_creds - doc_creds)]
    lines += [f"in docs/CONFIG.md, read nowhere in eexit/: {name}" for name in sorted(doc_vars - code_vars)]
    lines += [f"credential file in docs/CONFIG.md, read nowhere: {name}" for name in sorted(doc_creds - code_creds)]
    return lines


class ConfigReferenceTest(unittest.TestCase):
    def test_code_and_reference_agree(self):
        problems = differences(ROOT / "eexit", REFERENCE.read_text(encoding="utf-8"))
        self.assertEqual(problems, [], "\n".join(problems))

    def test_the_scan_finds_what_the_daemons_read(self):
        variables, credentials = names_in_code(ROOT / "eexit")
        self.assertLessEqual({"REDIS_URL", "EEXIT_UNGUARDED_S", "EEXIT_SANDBOX", "EEXIT_API_KEY",
                              "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"}, variables)
        self.assertLessEqual({"api_key", "api_secret", "api_password", "redis_password", "redis_username",
                              "panic_hmac_keys", "hook_hmac_key",
                              "telegram_bot_token", "alert_webhook_key"}, credentials)

    def test_a_planted_variable_or_credential_fails_the_comparison(self):
        tmp = Path(tempfile.mkdtemp(prefix="eexit-config-ref-"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        package = tmp / "eexit"
        shutil.copytree(ROOT / "eexit", package, ignore=shutil.ignore_patterns("__pycache__"))
        reference = REFERENCE.read_text(encoding="utf-8")
        self.assertEqual(differences(package, reference), [])
        with open(package / "brain.py", "a", encoding="utf-8") as module:
            module.write('\nPLANTED = env_int("EEXIT_PLANTED_FOR_TEST", 1, minimum=0)\n'
                         'PLANTED_SECRET = credential("planted_secret", ())\n'
                         'PLANTED_RAW = os.environ.get("PLANTED_RAW_NAME")\n')
        self.assertEqual(differences(package, reference), [
            "read by the code, missing from docs/CONFIG.md: EEXIT_PLANTED_FOR_TEST",
            "read by the code, missing from docs/CONFIG.md: PLANTED_RAW_NAME",
            "credential file read by the code, missing from docs/CONFIG.md: planted_secret"])

    def test_a_row_nothing_reads_fails_the_comparison(self):
        extra = REFERENCE.read_text(encoding="utf-8").replace(
            "| `REDIS_URL` |", "| `EEXIT_NOT_READ_ANYWHERE` | 1 | | brain | all | x |\n| `REDIS_URL` |", 1)
        self.assertEqual(differences(ROOT / "eexit", extra),
                         ["in docs/CONFIG.md, read nowhere in eexit/: EEXIT_NOT_READ_ANYWHERE"])


if __name__ == "__main__":
    unittest.main()

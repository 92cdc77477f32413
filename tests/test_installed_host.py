"""The docs run on an installed host under the host's real systemd. tests/systemd_harness.py
boots Debian's systemd as PID 1 of private namespaces; eexit is installed there with
tools/install_offline.py and the distribution's /usr/bin/python3, from a wheelhouse built as
docs/DEPLOY.md §1 says (docs/DEPLOY.md §2, the `sh install` blocks, done by the harness).
Then every `sh` and `sh systemd` block of docs/DEPLOY.md and docs/CHAOS_TEST_RUNBOOK.md runs,
in order, as root in one bash session per document: the paper install end to end (keys,
eexit's own redis-server@eexit, the paper exchange as a transient unit, the units enabled,
`eexit init`, status, the upgrade restart), then the runbook (status, the drill, resume, a
forged event, the collection steps with `eexit audit verify`). A command passes when its
exit status is the one its `# exit N` comment names (0 without one) and no redis-cli line
answers NOAUTH, NOPERM, WRONGPASS or ERR. `sh install` blocks are the packaging steps, `sh
example` blocks hold placeholders, `sh chaos` blocks inject failures (the crash-path tests of
issue 23 run those cases), `text`/`ini` are not commands: those are not run.

Also here, on the units as installed: `systemd-analyze verify` prints nothing, `systemd-analyze
security` of the loaded units (online) is at most 1.1 and equals docs/DEPLOY.md's table, systemd
logs no warning about an eexit unit, every daemon's journal lines carry the priority of their
level and the first one names the version, the metrics after the drill hold the counters, and a
configuration error is in `journalctl -p err -u eexit-eew` (the summary line, not only the
key=value line). The table itself is checked against the unit files without systemd.

One boot, install and docs run: about 3-4 minutes (most of it the install and the drill).
MemoryMax=/TasksMax= are not relied on here (not enforced inside on a cgroup-v1 host)."""

import json
import re
import shlex
import unittest
from pathlib import Path

from eexit import __version__
from tests import systemd_harness
from tests.test_metrics import parse_exposition, value_of
from tests.test_systemd_units import MAX_EXPOSURE, read_unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("docs/DEPLOY.md", "docs/CHAOS_TEST_RUNBOOK.md")
BLOCK_TAGS = {"sh": True, "sh systemd": True, "sh install": False, "sh example": False, "sh chaos": False,
              "text": False, "ini": False}   # ini: unit-file lines, not commands
REDIS_REFUSALS = re.compile(r"^(\(error\) )?(NOAUTH|NOPERM|WRONGPASS|ERR) ", re.M)
EXPECTED_EXIT = re.compile(r"\s#\s*exit (\d+)\b")
WORKDIR = "/root/eexit-docs"     # inside the booted system (an overlay: nothing reaches the host)
PRIORITY_OF_LEVEL = {"INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
DAEMONS = {"eexit-eew.service": "eexit-eew", "eexit-audit.service": "eexit-audit",
           "eexit-watchdog.service": "eexit-watchdog", "eexit-brain.service": "eexit-brain"}
BAD_SETTINGS = "/etc/eexit/bad-redis-url.env"


def doc_blocks(text):
    """[(tag, [command, ...])] of the fenced blocks; continuation lines joined."""
    blocks, tag, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if tag is None:
                tag, lines = line[3:].strip(), []
            else:
                blocks.append((tag, join_continuations(lines)))
                tag = None
        elif tag is not None:
            lines.append(line)
    return blocks


def join_continuations(lines):
    commands, current = [], ""
    for line in lines:
        current += line.rstrip("\\").strip() + (" " if line.endswith("\\") else "")
        if not line.endswith("\\"):
            if current.strip() and not current.strip().startswith("#"):
                commands.append(current.strip())
            current = ""
    return commands


def script_for(doc):
    """One bash script: each runnable command, then a check of its exit status."""
    parts = ['cd "$WORKDIR"']
    for tag, commands in doc_blocks((ROOT / doc).read_text()):
        if not BLOCK_TAGS.get(tag, False):
            continue
        for command in commands:
            match = EXPECTED_EXIT.search(command)
            want = int(match.group(1)) if match else 0
            parts.append(f"echo {shlex.quote(f'+ {command}')}")
            parts.append(command)
            parts.append(f"rc=$?; if [ $rc -ne {want} ]; then echo {shlex.quote('DOC-COMMAND-FAILED: ' + command)}"
                         f" \"(exit $rc, want {want})\"; exit 97; fi")
    return "\n".join(parts) + "\n"


def unit_table():
    """docs/DEPLOY.md's table of the units: {unit: {column: text}}."""
    text = (ROOT / "docs/DEPLOY.md").read_text()
    section = text[text.index("## The units"):]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    table = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    return table


def instance(unit):
    return unit.replace("@.", "@docs.")


def installer_units():
    from tests.staging import installer
    return installer().UNITS


class DocBlockTests(unittest.TestCase):
    def test_every_block_is_tagged(self):
        for doc in DOCS:
            for tag, commands in doc_blocks((ROOT / doc).read_text()):
                self.assertIn(tag, BLOCK_TAGS, f"{doc}: a ``` block tagged {tag!r} ({commands[:1]})")

    def test_parser(self):
        text = "x\n```sh\na \\\n  b   # exit 1\n# note\n\nc\n```\n```sh systemd\nsystemctl x\n```\n"
        self.assertEqual(doc_blocks(text), [("sh", ["a b   # exit 1", "c"]), ("sh systemd", ["systemctl x"])])

    def test_sections_are_numbered_once_each(self):
        for doc in DOCS:
            numbers = re.findall(r"(?m)^## (\d+)\.", (ROOT / doc).read_text())
            self.assertEqual(len(numbers), len(set(numbers)), f"{doc}: {numbers}")

    def test_the_unit_table_is_the_installed_units_and_their_settings(self):
        table = unit_table()
        self.assertEqual(sorted(table), sorted(installer_units()))
        for unit, row in table.items():
            service, section = read_unit(unit)["Service"], read_unit(unit)["Unit"]
            watchdog = service.get("WatchdogSec")
            self.assertEqual(row["watchdog"], f"{watchdog[0]} s" if watchdog else "none", unit)
            self.assertEqual(row["MemoryMax / TasksMax"], f"{service['MemoryMax'][0]} / {service['TasksMax'][0]}", unit)
            interval, burst = section["StartLimitIntervalSec"][0], section.get("StartLimitBurst", [None])[0]
            if service.get("Restart") != ["always"]:
                self.assertTrue(row["restart"].startswith("no"), f"{unit}: {row['restart']}")
            elif interval == "0":
                self.assertIn("never gives up", row["restart"], unit)
            else:
                self.assertIn(f"after {burst} starts in {interval} s", row["restart"], unit)
            self.assertLessEqual(float(row["`systemd-analyze security`"].strip("*")), MAX_EXPOSURE, unit)


class InstalledHostTest(unittest.TestCase):
    """The paper install of docs/DEPLOY.md and the runbook under the real systemd."""

    @classmethod
    def setUpClass(cls):
        systemd_harness.require_systemd()
        cls.sd = systemd_harness.BootedSystemd("eexit-docs")
        cls.sd.start()
        cls.addClassCleanup(cls.sd.stop)
        installed = cls.sd.install_project()
        cls.install_output = installed.stdout
        cls.sd.run(["mkdir", "-p", WORKDIR])
        env = {"HOME": "/root", "USER": "alice", "WORKDIR": WORKDIR}
        cls.ran = {}
        for doc in DOCS:
            cls.ran[doc] = cls.sd.run(["bash", "-c", script_for(doc)], check=False, timeout=600, env=env)
            if cls.ran[doc].returncode != 0:
                break
        # systemd's own lines about eexit units, before any test below makes one fail on purpose.
        cls.manager_warnings = [entry["MESSAGE"] for entry in cls.sd.journal(priority=4, identifier="systemd")
                                if "eexit" in entry["MESSAGE"]]

    def output(self, doc):
        ran = self.ran.get(doc)
        if ran is None:
            return "(not run: the document before it failed)"
        journals = "".join(f"{unit}: {self.sd.journal_text(unit, 15)}\n" for unit in DAEMONS)
        return f"exit {ran.returncode}\n{ran.stdout[-6000:]}\n{ran.stderr[-3000:]}\njournals:\n{journals}"

    def assert_doc_ran(self, doc):
        self.assertIn(doc, self.ran, self.output(DOCS[0]))
        self.assertEqual(self.ran[doc].returncode, 0, self.output(doc))
        self.assertNotRegex(self.ran[doc].stdout, REDIS_REFUSALS)

    def test_deploy_commands_run(self):
        self.assert_doc_ran("docs/DEPLOY.md")

    def test_runbook_commands_run(self):
        self.assert_doc_ran("docs/CHAOS_TEST_RUNBOOK.md")

    def test_first_start_then_drill_then_resume(self):
        self.assert_doc_ran("docs/CHAOS_TEST_RUNBOOK.md")
        deploy, runbook = self.ran["docs/DEPLOY.md"].stdout, self.ran["docs/CHAOS_TEST_RUNBOOK.md"].stdout
        self.assertIn("INITIALISED: trading allowed", deploy)
        verdicts = [line for line in (deploy + runbook).splitlines() if line in ("HEALTHY", "HALTED")]
        self.assertEqual(verdicts[:1], ["HEALTHY"], deploy)
        self.assertIn("HALTED", verdicts)
        self.assertEqual(verdicts[-1], "HEALTHY", runbook)
        drill = json.loads(self.sd.read(f"{WORKDIR}/drill.json"))
        self.assertTrue(drill["passed"], drill)
        self.assertEqual(drill["report"]["status"], "FLAT")
        self.assertIn("RESUMED", runbook)
        self.assertRegex(runbook, r"(?m)^OK: /var/lib/eexit-audit/audit.jsonl: \d+ lines, chain intact")

    def test_units_verify_clean_and_security_online_matches_the_table(self):
        # A template (name@.service) is verified and analysed as an instance of it.
        units = {instance(unit): row for unit, row in unit_table().items()}
        verify = self.sd.run(["systemd-analyze", "verify", *[f"/etc/systemd/system/{unit}" for unit in units]],
                             check=False)
        self.assertEqual((verify.returncode, verify.stdout + verify.stderr), (0, ""))
        for unit, row in units.items():
            result = self.sd.run(["systemd-analyze", "security", "--no-pager", unit])
            level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout).group(1))
            self.assertLessEqual(level, MAX_EXPOSURE, unit)
            self.assertEqual(level, float(row["`systemd-analyze security`"].strip("*")), unit)

    def test_systemd_logs_no_warning_about_an_eexit_unit(self):
        self.assert_doc_ran("docs/DEPLOY.md")
        self.assertEqual(self.manager_warnings, [])

    def test_daemon_lines_carry_version_and_journal_priority(self):
        self.assert_doc_ran("docs/DEPLOY.md")
        for unit, identifier in DAEMONS.items():
            entries = self.sd.journal(identifier=identifier)
            self.assertTrue(entries, unit)
            self.assertIn(f" version={__version__} ", entries[0]["MESSAGE"] + " ")
            for entry in entries:
                level = re.search(r" level=(\w+) ", entry["MESSAGE"] + " ")
                if level:
                    self.assertEqual(entry["PRIORITY"], PRIORITY_OF_LEVEL[level.group(1)], entry["MESSAGE"])

    def test_metrics_after_the_drill_have_the_counters(self):
        self.assert_doc_ran("docs/CHAOS_TEST_RUNBOOK.md")

        def counted():
            text = self.sd.run(["cat", "/var/lib/eexit-audit/eexit.prom"], check=False).stdout
            families = parse_exposition(text) if text else {}
            if "eexit_reports_total" in families and value_of(families, "eexit_reports_total", status="FLAT") >= 1:
                return families
            return None
        families = self.sd.wait_for(counted, 60, "a FLAT report counted in the metrics file")
        self.assertGreaterEqual(value_of(families, "eexit_panics_total", issuer="ops"), 1)
        self.assertGreaterEqual(value_of(families, "eexit_orders_sent_total"), 1)
        self.assertEqual(value_of(families, "eexit_orders_rejected_total"), 0)
        self.assertEqual(value_of(families, "eexit_build_info", version=__version__), 1)

    def test_zz_a_bad_setting_is_in_journalctl_p_err(self):
        """Last (it stops the EEW): a bad REDIS_URL from a drop-in's extra EnvironmentFile= (a
        later file wins), restart refused with exit 2, and the reason at priority err or above,
        summary line included; then the drop-in goes and the EEW is READY again."""
        self.assert_doc_ran("docs/DEPLOY.md")
        sd = self.sd
        sd.write(BAD_SETTINGS, "REDIS_URL=bogus://nowhere\n", mode=0o640)
        sd.write("/etc/systemd/system/eexit-eew.service.d/zz-bad.conf",
                 f"[Service]\nEnvironmentFile={BAD_SETTINGS}\n", mode=0o644)
        sd.systemctl("daemon-reload")
        try:
            sd.systemctl("restart", "eexit-eew", check=False)
            sd.wait_for(lambda: sd.show("eexit-eew", "ExecMainStatus") == "2", 60, "the EEW to exit 2")
            shown = sd.run(["journalctl", "--no-pager", "-o", "cat", "-p", "err", "-u", "eexit-eew"]).stdout
            self.assertRegex(shown, r"(?m)^eexit\.eew: configuration error: REDIS_URL")
            self.assertRegex(shown, r"(?m)level=CRITICAL event=config_error .*REDIS_URL")
        finally:
            sd.run(["rm", "-rf", "/etc/systemd/system/eexit-eew.service.d", BAD_SETTINGS])
            sd.systemctl("daemon-reload")
            sd.systemctl("reset-failed", "eexit-eew", check=False)
            sd.systemctl("start", "eexit-eew")
        sd.wait_active("eexit-eew")

    def test_zz_an_empty_credential_is_exit_2_naming_it_and_its_load_credential(self):
        """Last too (it stops the EEW): the key file the installer created empty, as an
        operator who has not filled it in leaves it; then the key goes back."""
        self.assert_doc_ran("docs/DEPLOY.md")
        sd, key = self.sd, "/etc/eexit/credentials/eew/api_key"
        saved = sd.read(key)
        sd.write(key, "")
        try:
            sd.systemctl("restart", "eexit-eew", check=False)
            sd.wait_for(lambda: sd.show("eexit-eew", "ExecMainStatus") == "2", 60, "the EEW to exit 2")
            shown = sd.run(["journalctl", "--no-pager", "-o", "cat", "-p", "err", "-u", "eexit-eew"]).stdout
            self.assertIn("eexit.eew: configuration error: credential api_key: /run/credentials/eexit-eew.service/"
                          "api_key is empty; eexit-eew.service's LoadCredential=api_key:<file> provides it", shown)
            self.assertNotIn("Traceback", sd.journal_text("eexit-eew", 200))
        finally:
            sd.write(key, saved)
            sd.systemctl("reset-failed", "eexit-eew", check=False)
            sd.systemctl("start", "eexit-eew")
        sd.wait_active("eexit-eew")


if __name__ == "__main__":
    unittest.main()

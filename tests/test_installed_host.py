"""The docs run on an installed host. An install is staged into a temporary root (the
wheelhouse of tests/staging.py, pip cut off from any index), redis-server runs with the
rendered ACL, the paper exchange stands in for the venue, and the four daemons run from the
staged venv the way their units start them (EnvironmentFile=, LoadCredential=/SetCredential=
into a private CREDENTIALS_DIRECTORY, STATE_DIRECTORY, JOURNAL_STREAM). Then every ```sh
block of docs/DEPLOY.md and docs/CHAOS_TEST_RUNBOOK.md runs in one bash session per document,
with /etc/eexit, /opt/eexit and /var/lib/eexit* mapped into the staged root. A command passes
when its exit status is the one its `# exit N` comment names (0 without one) and no redis-cli
line answers NOAUTH, NOPERM, WRONGPASS or ERR. Blocks tagged `sh systemd` need PID-1 systemd,
`sh install` are the packaging steps (tests/staging.py runs them, with --root), `sh example`
holds placeholders, `text` is not a command; those are not run.

Also here: the first start (init) ends HEALTHY, the drill passes, status goes HEALTHY ->
HALTED -> HEALTHY, the metrics file after the drill holds the counters, every daemon's first
line names the version, and journald priority prefixes (`<3>` error, `<6>` info)."""

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

from eexit import __version__, schema
from eexit.demo import DEMO_SEED
from eexit.localredis import free_port, stop_process
from eexit.paper import PaperExchange
from tests import staging
from tests.harness import RedisServer, wait_for
from tests.test_metrics import parse_exposition, value_of

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("docs/DEPLOY.md", "docs/CHAOS_TEST_RUNBOOK.md")
UNITS = ("eexit-eew.service", "eexit-audit.service", "eexit-watchdog.service", "eexit-brain.service")
BLOCK_TAGS = {"sh": True, "sh systemd": False, "sh install": False, "sh example": False, "text": False,
              "ini": False}   # ini: unit-file lines, not commands
REDIS_REFUSALS = re.compile(r"^(\(error\) )?(NOAUTH|NOPERM|WRONGPASS|ERR) ", re.M)
EXPECTED_EXIT = re.compile(r"\s#\s*exit (\d+)\b")


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


def staged_text(text, root):
    for prefix in ("/etc/eexit", "/opt/eexit", "/var/lib/eexit"):
        text = text.replace(prefix, str(root) + prefix)
    return text


def script_for(doc, root):
    """One bash script: each runnable command, then a check of its exit status."""
    parts = ["cd \"$WORKDIR\""]
    for tag, commands in doc_blocks((ROOT / doc).read_text()):
        if not BLOCK_TAGS.get(tag, False):
            continue
        for command in commands:
            match = EXPECTED_EXIT.search(command)
            want = int(match.group(1)) if match else 0
            shown = shlex.quote(f"+ {command}")
            parts.append(f"echo {shown}")
            parts.append(staged_text(command, root))
            parts.append(f"rc=$?; if [ $rc -ne {want} ]; then echo {shlex.quote('DOC-COMMAND-FAILED: ' + command)}"
                         f" \"(exit $rc, want {want})\"; exit 97; fi")
    return "\n".join(parts) + "\n"


class DocBlockTests(unittest.TestCase):
    def test_every_block_is_tagged(self):
        for doc in DOCS:
            for tag, commands in doc_blocks((ROOT / doc).read_text()):
                self.assertIn(tag, BLOCK_TAGS, f"{doc}: a ``` block tagged {tag!r} ({commands[:1]})")

    def test_parser(self):
        text = "x\n```sh\na \\\n  b   # exit 1\n# note\n\nc\n```\n```sh systemd\nsystemctl x\n```\n"
        self.assertEqual(doc_blocks(text), [("sh", ["a b   # exit 1", "c"]), ("sh systemd", ["systemctl x"])])


class InstalledHostTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="eexit-host-"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.root = cls.tmp / "root"
        installed = staging.install(staging.wheelhouse(), cls.root, cwd=cls.tmp)
        if installed.returncode != 0:
            raise AssertionError(f"staged install failed:\n{installed.stdout[-2000:]}\n{installed.stderr[-2000:]}")
        cls.paper = PaperExchange(seed=DEMO_SEED)
        paper_url = cls.paper.start()
        cls.addClassCleanup(cls.paper.stop)
        etc = cls.root / "etc/eexit"
        cls.redis = RedisServer(["--aclfile", str(etc / "redis-acl.conf")]).start()
        cls.addClassCleanup(cls.redis.stop)
        cls.operator_setup(etc, paper_url)
        cls.processes = {}
        for unit in UNITS:
            run_dir = cls.tmp / "run" / unit
            run_dir.mkdir(parents=True)
            cls.processes[unit] = staging.unit_process(cls.root, unit, run_dir, cls.log(unit))
            cls.addClassCleanup(stop_process, cls.processes[unit])
        workdir = cls.tmp / "work"
        workdir.mkdir()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(workdir),
               "USER": "alice", "WORKDIR": str(workdir)}
        cls.ran = {}
        cls.wait_healthy(env)
        cls.workdir = workdir
        for doc in DOCS:
            cls.ran[doc] = subprocess.run(["bash", "-c", script_for(doc, cls.root)], env=env, cwd=workdir,
                                          capture_output=True, text=True, timeout=300)

    @classmethod
    def operator_setup(cls, etc, paper_url):
        """What DEPLOY.md's steps 1-3 ask of the operator: exchange keys, HMAC keys, settings."""
        creds = etc / "credentials"
        for daemon in ("brain", "eew", "ops"):
            for name, value in (("api_key", cls.paper.api_key), ("api_secret", cls.paper.api_secret.decode())):
                (creds / daemon / name).write_text(value + "\n")
                (creds / daemon / name).chmod(0o600)
        watchdog_key, ops_key, hook_key = secrets.token_hex(32), secrets.token_hex(32), secrets.token_hex(32)
        for daemon, lines in (("watchdog", [f"wd1 watchdog {watchdog_key}"]), ("ops", [f"ops1 ops {ops_key}"]),
                              ("eew", [f"wd1 watchdog {watchdog_key}", f"ops1 ops {ops_key}",
                                       f"hook1 exit_brain {hook_key}"])):
            (creds / daemon / "panic_hmac_keys").write_text("\n".join(lines) + "\n")
            (creds / daemon / "panic_hmac_keys").chmod(0o600)
        (creds / "hook" / "hook_hmac_key").write_text(f"hook1 exit_brain {hook_key}\n")
        (creds / "hook" / "hook_hmac_key").chmod(0o600)
        settings = etc / "eexit.env"
        text = settings.read_text().replace("REDIS_URL=redis://127.0.0.1:6379/0", f"REDIS_URL={cls.redis.url}")
        text = text.replace("EEXIT_SANDBOX=true", "# EEXIT_SANDBOX=true  (the paper exchange instead)")
        settings.write_text(text + f"EEXIT_EXCHANGE_URL={paper_url}\n"
                                   # The drill's resume runs right after it, not 300 s later.
                                   "EEXIT_RESUME_COOLDOWN_S=0\nEEXIT_METRICS_INTERVAL_S=0.2\n")

    @classmethod
    def log(cls, unit):
        return cls.tmp / "run" / f"{unit}.log"

    @classmethod
    def wait_healthy(cls, env):
        """Until every daemon has a heartbeat (an event in Redis), so status can be HEALTHY."""
        password = (cls.root / "etc/eexit/credentials/ops/redis_password").read_text().strip()
        client = cls.redis.client(username="eexit-ops", password=password)
        try:
            wait_for(lambda: all(client.xlen(stream) for stream in (
                schema.HEARTBEAT_STREAM, schema.EEW_HEARTBEAT_STREAM, schema.WATCHDOG_HEARTBEAT_STREAM)),
                60, 0.1, "a heartbeat of every daemon")
        finally:
            client.close()

    def output(self, doc):
        ran = self.ran[doc]
        return (f"exit {ran.returncode}\n{ran.stdout[-6000:]}\n{ran.stderr[-3000:]}\nlogs:\n"
                + "".join(f"{unit}: {self.log(unit).read_text()[-1500:]}\n" for unit in UNITS))

    def test_deploy_commands_run(self):
        self.assertEqual(self.ran["docs/DEPLOY.md"].returncode, 0, self.output("docs/DEPLOY.md"))
        self.assertNotRegex(self.ran["docs/DEPLOY.md"].stdout, REDIS_REFUSALS)

    def test_runbook_commands_run(self):
        self.assertEqual(self.ran["docs/CHAOS_TEST_RUNBOOK.md"].returncode, 0, self.output("docs/CHAOS_TEST_RUNBOOK.md"))
        self.assertNotRegex(self.ran["docs/CHAOS_TEST_RUNBOOK.md"].stdout, REDIS_REFUSALS)

    def test_first_start_then_drill_then_resume(self):
        deploy, runbook = self.ran["docs/DEPLOY.md"].stdout, self.ran["docs/CHAOS_TEST_RUNBOOK.md"].stdout
        self.assertIn("INITIALISED: trading allowed", deploy)
        verdicts = [line for line in (deploy + runbook).splitlines() if line in ("HEALTHY", "HALTED")]
        self.assertEqual(verdicts[:1], ["HEALTHY"], deploy)
        self.assertIn("HALTED", verdicts)
        self.assertEqual(verdicts[-1], "HEALTHY", runbook)
        drill = json.loads((self.workdir / "drill.json").read_text())
        self.assertTrue(drill["passed"], drill)
        self.assertEqual(drill["report"]["status"], "FLAT")
        self.assertIn("RESUMED", runbook)

    def test_metrics_after_the_drill_have_the_counters(self):
        path = self.root / "var/lib/eexit-audit/eexit.prom"

        def counted():
            families = parse_exposition(path.read_text()) if path.exists() else {}
            if "eexit_reports_total" in families and value_of(families, "eexit_reports_total", status="FLAT") >= 1:
                return families
            return None
        families = wait_for(counted, 30, 0.1, "a FLAT report counted in the metrics file")
        self.assertGreaterEqual(value_of(families, "eexit_panics_total", issuer="ops"), 1)
        self.assertGreaterEqual(value_of(families, "eexit_orders_sent_total"), 1)
        self.assertEqual(value_of(families, "eexit_orders_rejected_total"), 0)
        self.assertEqual(value_of(families, "eexit_build_info", version=__version__), 1)

    def test_daemon_lines_carry_version_and_journal_priority(self):
        for unit in UNITS:
            lines = self.log(unit).read_text().splitlines()
            self.assertTrue(lines, unit)
            self.assertTrue(lines[0].startswith("<6>"), lines[0])
            self.assertIn(f" version={__version__} ", lines[0] + " ")
            for line in lines:
                if line.startswith("<"):
                    level = re.search(r" level=(\w+)", line).group(1)
                    self.assertEqual(line[:3], {"INFO": "<6>", "WARNING": "<4>", "ERROR": "<3>", "CRITICAL": "<2>"}[level], line)

    def test_an_error_line_gets_priority_3(self):
        """The EEW started against a Redis that is not there logs `redis_lost` as an ERROR."""
        run_dir = self.tmp / "run" / "no-redis"
        run_dir.mkdir(parents=True)
        log = run_dir / "eew.log"
        process = staging.unit_process(self.root, "eexit-eew.service", run_dir, log,
                                       {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                                        "EEXIT_JOURNAL": str(run_dir / "journal.jsonl")})
        self.addCleanup(stop_process, process)
        lines = wait_for(lambda: [line for line in log.read_text().splitlines() if " level=ERROR " in line]
                         and log.read_text().splitlines(), 60, 0.05, "an ERROR line from the EEW")
        errors = [line for line in lines if " level=ERROR " in line]
        self.assertTrue(all(line.startswith("<3>") for line in errors), errors)
        self.assertTrue(all(line.startswith("<6>") for line in lines if " level=INFO " in line), lines)


if __name__ == "__main__":
    unittest.main()

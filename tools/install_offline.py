#!/usr/bin/env python3
"""Install eexit on a machine with no network, from a wheelhouse built on a connected one.

On a connected machine of the target's kind, with the target's own Python (Debian 12:
/usr/bin/python3, 3.11.2; the wheelhouse holds the files for the Python that builds it, and
the committed lock's markers are evaluated for it), in a throwaway venv that brings pip:
    python3 -m venv /tmp/eexit-build
    /tmp/eexit-build/bin/python tools/install_offline.py wheelhouse --out eexit-wheelhouse
    tar czf eexit-offline.tgz eexit-wheelhouse tools/install_offline.py systemd docs
On the target, as root:
    python3 tools/install_offline.py install --wheelhouse eexit-wheelhouse

`wheelhouse` downloads only what requirements.lock pins, hash-checked (--require-hashes), and
writes the wheelhouse's own requirements.lock (each wheel with its hash) and SHA256SUMS.
`install` never contacts an index (pip runs with --no-index --find-links), and:
  - checks every file of the wheelhouse against its SHA256SUMS (and refuses unlisted files);
  - creates the venv /opt/eexit/venv and installs the wheelhouse's lock into it with
    --require-hashes: a wheelhouse with a newer eexit version upgrades eexit;
  - creates /etc/eexit (0755), /etc/eexit/eexit.env from the example if absent (0640),
    /etc/eexit/credentials/<daemon>/ (0700) for brain, watchdog, eew, audit, ops, hook, and
    in them the key files the daemons read at start, empty (0600) until the operator fills
    them in (EMPTY_CREDENTIALS);
  - generates a random Redis password per ACL user into credentials/<daemon>/redis_password
    unless one exists (0600), writes credentials/ops/redis_username, and renders
    /etc/eexit/redis-acl.conf from the template with their SHA-256 hashes (0640, group
    redis if that group exists);
  - installs the units into /etc/systemd/system (0644), replacing older versions of them;
  - prints what it changed (code version, units, config files, credentials) and the next
    steps (exchange keys, HMAC keys, Redis aclfile, enable the units, `eexit init`, drill).
It never overwrites an existing credential, nor an env or ACL file that differs from what it
would write: the shipped version goes to eexit.env.new / redis-acl.conf.new beside it, and
it says so. So it can be re-run to upgrade.
`--root DIR` installs under DIR instead of / (staging and tests); a venv is not relocatable,
so a staged tree is for inspection, not for copying elsewhere.
"""

import argparse
import grp
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
UNITS = ("eexit-brain.service", "eexit-watchdog.service", "eexit-eew.service", "eexit-audit.service",
         "eexit-alert.service", "eexit-risk.service",     # eexit-risk: installed, never enabled (opt-in)
         # the brain's warm crash path (enabled; the brain's ExecStopPost= writes to its FIFO)
         "eexit-crash-listener.service",
         # the brain's crash path: started by the brain unit's ExecStopPost=, never enabled
         "eexit-brain-crash@.service")
# bot: the trading bot's read-only user; hook: the brain's crash path (eexit-brain-crash@.service
# and eexit-crash-listener.service share it)
DAEMONS = ("brain", "watchdog", "eew", "audit", "alert", "ops", "bot", "hook", "risk")
# Secrets created empty so that the unit's LoadCredential= finds a file. Optional ones (an
# empty file means "not used"): fill them in to enable the sink or the signature. Required
# ones, read by the daemon at start: until filled in, the daemon stops with exit 2 and a
# CRITICAL journal line naming the credential and its LoadCredential= (a missing file would
# fail the unit with systemd's 243/CREDENTIALS "Protocol error", which names nothing).
EMPTY_CREDENTIALS = {"alert": ("telegram_bot_token", "alert_webhook_key"),
                     "brain": ("api_key", "api_secret"), "eew": ("api_key", "api_secret", "panic_hmac_keys"),
                     "watchdog": ("panic_hmac_keys",),
                     "risk": ("api_key", "api_secret", "panic_hmac_keys", "risk_rebase_key")}
PASSWORD_PLACEHOLDER = "@PASSWORD_HASH@"
WHEELHOUSE_LOCK = "requirements.lock"   # inside the wheelhouse: every wheel with its own hash
SUMS = "SHA256SUMS"


def redis_user(daemon):
    return f"eexit-{daemon}"


def render_acl(template, passwords):
    """The Redis ACL file from the template: comment and blank lines dropped (Redis accepts
    neither), @PASSWORD_HASH@ on each `user NAME` line replaced by `#<sha256(password)>`.
    passwords maps user name -> password; a templated user without one is a ValueError."""
    lines = []
    for raw in template.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if PASSWORD_PLACEHOLDER in line:
            name = line.split()[1]
            if name not in passwords:
                raise ValueError(f"no password for ACL user {name}")
            digest = hashlib.sha256(passwords[name].encode("utf-8")).hexdigest()
            line = line.replace(PASSWORD_PLACEHOLDER, f"#{digest}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def under(root, path):
    return Path(root) / str(path).lstrip("/")


def run(command, env=None):
    print("+ " + " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True, env=env)


def build_wheelhouse(args):
    """The wheelhouse for the Python running this, from the committed lock only:
    1. `pip download --require-hashes` of every locked file (a file whose hash is not in the
       lock is refused by pip: nothing unlocked enters);
    2. any locked sdist and eexit itself built into wheels;
    3. the wheelhouse's own requirements.lock: every wheel pinned with ITS hash (built wheels
       hash differently from the sdists the lock names, which step 1 checked);
    4. SHA256SUMS of every file, which `install` verifies before pip runs."""
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"wheelhouse: {out} is not empty; give a new directory (an old eexit wheel "
                 "beside the new one would make the install ambiguous)")
    lock = Path(args.lock).resolve()
    download = out / ".download"
    run([sys.executable, "-m", "pip", "download", "--require-hashes", "--no-deps", "--dest", download,
         "--requirement", lock])
    for archive in sorted(download.iterdir()):
        if archive.name.endswith(".whl"):
            archive.rename(out / archive.name)
        else:
            run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--use-pep517", "--wheel-dir", out, archive])
    shutil.rmtree(download)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--use-pep517", "--wheel-dir", out, args.project])
    wheels = sorted(out.glob("*.whl"))
    (out / WHEELHOUSE_LOCK).write_text("".join(
        f"{wheel_requirement(wheel.name)} --hash=sha256:{sha256_file(wheel)}\n" for wheel in wheels))
    sums = write_sums(out)
    print(f"wheelhouse ready: {out} ({len(wheels)} wheels, {WHEELHOUSE_LOCK}, {SUMS}); "
          f"sha256 of {SUMS}: {sha256_file(sums)} (compare it on the target before installing). "
          f"Copy it with this script, systemd/ and docs/ to the target.")


def wheel_requirement(file_name):
    """`name==version` from a wheel's file name (PEP 427: name-version-...whl)."""
    name, version = file_name.split("-")[:2]
    return f"{name}=={version}"


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_sums(directory):
    """SHA256SUMS (sha256sum's format: `sha256sum -c SHA256SUMS` checks it too)."""
    files = sorted(path for path in directory.iterdir() if path.is_file() and path.name != SUMS)
    sums = directory / SUMS
    sums.write_text("".join(f"{sha256_file(path)}  {path.name}\n" for path in files))
    return sums


def verify_sums(directory):
    """Every file listed in SHA256SUMS matches and every file of the wheelhouse is listed.
    Returns the number of files; exits naming the first mismatch (nothing installed)."""
    sums = directory / SUMS
    if not sums.is_file():
        sys.exit(f"install: {sums} missing: refusing a wheelhouse that cannot be checked")
    listed = {}
    for number, line in enumerate(sums.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            sys.exit(f"install: {sums} line {number} is malformed")
        listed[name] = digest
    present = {path.name for path in directory.iterdir() if path.is_file() and path.name != SUMS}
    if present - set(listed):
        sys.exit(f"install: not listed in {SUMS}: {', '.join(sorted(present - set(listed)))}")
    for name, digest in sorted(listed.items()):
        if name not in present:
            sys.exit(f"install: {name} is listed in {SUMS} but missing")
        if sha256_file(directory / name) != digest:
            sys.exit(f"install: {name} does not match its SHA256SUMS line: corrupted or altered")
    if WHEELHOUSE_LOCK not in listed:
        sys.exit(f"install: {WHEELHOUSE_LOCK} missing from the wheelhouse")
    return len(listed)


def write_new(path, text, mode):
    """Create path with text and mode unless it exists; returns True if written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return True


def installed_version(python):
    """The eexit version in a venv, or None (no venv yet, or eexit not in it)."""
    if not Path(python).exists():
        return None
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('eexit'))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def install(args):
    root = Path(args.root).resolve()
    wheelhouse = Path(args.wheelhouse).resolve()
    if not any(wheelhouse.glob("eexit-*.whl")):
        sys.exit(f"install: no eexit-*.whl in {wheelhouse}; build it with `wheelhouse` first")
    print(f"checked: {verify_sums(wheelhouse)} files of {wheelhouse} match {SUMS}")
    venv = under(root, "/opt/eexit/venv")
    etc = under(root, "/etc/eexit")
    systemd_dir = under(root, "/etc/systemd/system")
    changes = []

    before = installed_version(venv / "bin/python")
    run([args.python, "-m", "venv", venv])
    pip_env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    # Every wheel pinned and hash-checked; a pinned newer eexit replaces the installed one.
    run([venv / "bin/python", "-m", "pip", "install", "--no-index", "--find-links", wheelhouse,
         "--require-hashes", "--requirement", wheelhouse / WHEELHOUSE_LOCK], env=pip_env)
    after = installed_version(venv / "bin/python")
    if before != after:
        changes.append(f"code: eexit {before or '(none)'} -> {after} in {venv}")
    else:
        changes.append(f"code: eexit {after} unchanged (same version; a release bumps eexit/__init__.py)")

    etc.mkdir(parents=True, exist_ok=True)
    etc.chmod(0o755)
    changes.append(keep_or_new(etc / "eexit.env", (PROJECT / "systemd/eexit.env.example").read_text(), 0o640))
    passwords = {}
    for daemon in DAEMONS:
        directory = etc / "credentials" / daemon
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        if write_new(directory / "redis_password", secrets.token_urlsafe(32) + "\n", 0o600):
            changes.append(f"credential: new Redis password {directory / 'redis_password'}")
        passwords[redis_user(daemon)] = (directory / "redis_password").read_text().strip()
        for name in EMPTY_CREDENTIALS.get(daemon, ()):
            write_new(directory / name, "", 0o600)
    # The daemons get their Redis user from their unit (SetCredential=); ops tools run by a
    # person read it from here, with CREDENTIALS_DIRECTORY=/etc/eexit/credentials/ops.
    write_new(etc / "credentials/ops/redis_username", redis_user("ops") + "\n", 0o600)
    (etc / "credentials").chmod(0o700)

    acl_text = render_acl((PROJECT / "systemd/redis-acl.conf").read_text(), passwords)
    changes.append(keep_or_new(etc / "redis-acl.conf", acl_text, 0o640))
    acl_path = etc / "redis-acl.conf"

    # eexit's own redis-server instance (systemd's redis-server@eexit, docs/DEPLOY.md): its
    # config is the operator's once edited, like the ACL.
    redis_conf = under(root, "/etc/redis/redis-eexit.conf")
    redis_conf.parent.mkdir(parents=True, exist_ok=True)
    changes.append(keep_or_new(redis_conf, (PROJECT / "systemd/redis-eexit.conf").read_text(), 0o640))
    for path in (acl_path, acl_path.with_name("redis-acl.conf.new"), redis_conf):
        if path.exists():
            try:
                os.chown(path, -1, grp.getgrnam("redis").gr_gid)
            except (KeyError, PermissionError):
                print(f"note: no group 'redis' here (or not root): make {path} readable by redis-server")

    systemd_dir.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        # Units are eexit's own: replaced on upgrade (local changes belong in drop-ins,
        # /etc/systemd/system/<unit>.d/*.conf, which this never touches).
        shipped, target = (PROJECT / "systemd" / unit).read_text(), systemd_dir / unit
        old = target.read_text() if target.exists() else None
        if old != shipped:
            target.write_text(shipped)
            changes.append(f"unit: {target} {'installed' if old is None else 'updated'}")
        target.chmod(0o644)
    print("\nchanged:" if changes else "\nchanged: nothing")
    for line in filter(None, changes):
        print(f"  {line}")
    print_next_steps(etc, acl_path)


def keep_or_new(path, text, mode):
    """Create path with text if absent. An existing file that differs is the operator's: kept,
    and the shipped version goes to `<path>.new` beside it. Returns what happened (or "")."""
    if write_new(path, text, mode):
        return f"config: {path} created"
    if path.read_text() == text:
        return ""
    new = path.with_name(path.name + ".new")
    if new.exists() and new.read_text() == text:
        return f"config: {path} kept (yours); shipped version still in {new}"
    new.write_text(text)
    new.chmod(mode)
    return f"config: {path} kept (yours, it differs from the shipped one); shipped version written to {new}"


def print_next_steps(etc, acl_path):
    print(f"""
eexit installed. Next steps (details: docs/DEPLOY.md; every setting: docs/CONFIG.md):
 1. Edit {etc}/eexit.env (REDIS_URL, exchange, thresholds).
 2. Exchange keys (trade only, no withdrawal, IP allow-list), one file each, mode 0600:
      {etc}/credentials/brain/api_key  .../brain/api_secret
      {etc}/credentials/eew/api_key    .../eew/api_secret
      {etc}/credentials/ops/api_key    .../ops/api_secret   (read-only key: `eexit resume`
                                                              and `eexit drill` read the account)
 3. Panic signing keys (generate: python3 -c "import secrets; print(secrets.token_hex(32))"):
      {etc}/credentials/watchdog/panic_hmac_keys   one line: wd1 watchdog <hexkey>
      {etc}/credentials/eew/panic_hmac_keys        every issuer's line (watchdog, ops, exit_brain, risk_kernel)
      {etc}/credentials/ops/panic_hmac_keys        one line: ops1 ops <hexkey>
      {etc}/credentials/hook/hook_hmac_key         one line: hook1 exit_brain <hexkey> (the brain unit's crash hook)
 4. Redis: eexit's own instance (/etc/redis/redis-eexit.conf: loopback port 6380 and a unix
    socket, AOF, noeviction, aclfile {acl_path}): systemctl enable --now redis-server@eexit
    and REDIS_URL=redis://127.0.0.1:6380/0 in eexit.env (docs/DEPLOY.md); your bot reads the
    halt there as eexit-bot (credentials/bot/redis_password) and keeps its own Redis. Check: REDISCLI_AUTH="$(cat {etc}/credentials/ops/redis_password)" \\
      redis-cli --user eexit-ops PING
 5. systemctl daemon-reload && systemctl enable --now eexit-eew eexit-audit eexit-watchdog eexit-brain
    Alerts (docs/ALERTS.md): EEXIT_ALERT_* in eexit.env, the Telegram bot token in
      {etc}/credentials/alert/telegram_bot_token, then systemctl enable --now eexit-alert
 6. First start (ops tools read {etc}/credentials/ops):
      set -a; . {etc}/eexit.env; set +a; export CREDENTIALS_DIRECTORY={etc}/credentials/ops
      /opt/eexit/venv/bin/eexit init --operator "$USER"    # halted=false, audited; never clears a halt
      /opt/eexit/venv/bin/eexit status                     # HEALTHY
 7. Drill against the exchange testnet before going live: /opt/eexit/venv/bin/eexit drill,
    then eexit resume --operator "$USER" --ack <event_id> (docs/CHAOS_TEST_RUNBOOK.md).
 8. Optional, opt-in: the risk kernel (docs/RISK.md): a READ-ONLY exchange key in
      {etc}/credentials/risk/api_key .../risk/api_secret, {etc}/credentials/risk/panic_hmac_keys
      (rk1 risk_kernel <hexkey>; the EEW's file gets this line too) and .../risk/risk_rebase_key
      (rb1 risk_rebase <hexkey>; ops's file gets this line too), then systemctl enable --now eexit-risk""")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    wheel = commands.add_parser("wheelhouse", help="build the wheelhouse (connected machine)")
    wheel.add_argument("--out", required=True, help="directory for the wheels")
    wheel.add_argument("--project", default=str(PROJECT), help="eexit source tree (default: this one)")
    wheel.add_argument("--lock", default=str(PROJECT / "requirements.lock"),
                       help="hashed lock of the dependencies (default: requirements.lock of this tree)")
    wheel.set_defaults(handler=build_wheelhouse)
    setup = commands.add_parser("install", help="install from a wheelhouse (no network)")
    setup.add_argument("--wheelhouse", required=True)
    setup.add_argument("--root", default="/", help="install under this directory (default /)")
    setup.add_argument("--python", default=sys.executable, help="interpreter for the venv")
    setup.set_defaults(handler=install)
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except subprocess.CalledProcessError as exc:
        # A failed pip or venv step leaves a half-made venv that the next run rebuilds; stop
        # here rather than install units that would start a broken interpreter.
        sys.exit(f"{args.command}: command failed with exit status {exc.returncode}")


if __name__ == "__main__":
    main()

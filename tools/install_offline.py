#!/usr/bin/env python3
"""Install eexit on a machine with no network, from a wheelhouse built on a connected one.

On a connected machine (same OS and Python minor version as the target):
    python3 tools/install_offline.py wheelhouse --out eexit-wheelhouse
    tar czf eexit-offline.tgz eexit-wheelhouse tools/install_offline.py systemd docs
On the target, as root:
    python3 tools/install_offline.py install --wheelhouse eexit-wheelhouse

`install` never contacts an index (pip runs with --no-index --find-links), and:
  - creates the venv /opt/eexit/venv and installs eexit and its dependencies into it;
  - creates /etc/eexit (0755), /etc/eexit/eexit.env from the example if absent (0640),
    /etc/eexit/credentials/<daemon>/ (0700) for brain, watchdog, eew, audit, ops;
  - generates a random Redis password per ACL user into credentials/<daemon>/redis_password
    unless one exists (0600), writes credentials/ops/redis_username, and renders
    /etc/eexit/redis-acl.conf from the template with their SHA-256 hashes (0640, group
    redis if that group exists);
  - installs the units into /etc/systemd/system (0644);
  - prints the next steps (exchange keys, HMAC keys, Redis aclfile, enable the units).
It never overwrites an existing env file, credential or changed ACL file (it writes
redis-acl.conf.new beside it), so it can be re-run to upgrade.
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
         "eexit-alert.service")
DAEMONS = ("brain", "watchdog", "eew", "audit", "alert", "ops")
# Optional secrets created empty (an empty file means "not used"), so that the unit's
# LoadCredential= finds a file: fill them in to enable the sink or the signature.
EMPTY_CREDENTIALS = {"alert": ("telegram_bot_token", "alert_webhook_key")}
PASSWORD_PLACEHOLDER = "@PASSWORD_HASH@"


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
    """Wheels of eexit and every dependency, for the Python running this (pip wheel fetches
    what is missing from the index configured for pip)."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "--wheel-dir", out, args.project])
    print(f"wheelhouse ready: {out} ({len(list(out.glob('*.whl')))} wheels); copy it with this "
          f"script, systemd/ and docs/ to the target.")


def write_new(path, text, mode):
    """Create path with text and mode unless it exists; returns True if written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return True


def install(args):
    root = Path(args.root).resolve()
    wheelhouse = Path(args.wheelhouse).resolve()
    if not any(wheelhouse.glob("eexit-*.whl")):
        sys.exit(f"install: no eexit-*.whl in {wheelhouse}; build it with `wheelhouse` first")
    venv = under(root, "/opt/eexit/venv")
    etc = under(root, "/etc/eexit")
    systemd_dir = under(root, "/etc/systemd/system")

    run([args.python, "-m", "venv", venv])
    pip_env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    run([venv / "bin/python", "-m", "pip", "install", "--no-index", "--find-links", wheelhouse,
         "--upgrade", "eexit"], env=pip_env)

    etc.mkdir(parents=True, exist_ok=True)
    etc.chmod(0o755)
    write_new(etc / "eexit.env", (PROJECT / "systemd/eexit.env.example").read_text(), 0o640)
    passwords = {}
    for daemon in DAEMONS:
        directory = etc / "credentials" / daemon
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        write_new(directory / "redis_password", secrets.token_urlsafe(32) + "\n", 0o600)
        passwords[redis_user(daemon)] = (directory / "redis_password").read_text().strip()
        for name in EMPTY_CREDENTIALS.get(daemon, ()):
            write_new(directory / name, "", 0o600)
    # The daemons get their Redis user from their unit (SetCredential=); ops tools run by a
    # person read it from here, with CREDENTIALS_DIRECTORY=/etc/eexit/credentials/ops.
    write_new(etc / "credentials/ops/redis_username", redis_user("ops") + "\n", 0o600)
    (etc / "credentials").chmod(0o700)

    acl_path = etc / "redis-acl.conf"
    acl_text = render_acl((PROJECT / "systemd/redis-acl.conf").read_text(), passwords)
    if acl_path.exists() and acl_path.read_text() != acl_text:
        # The operator may have added users for other clients: never overwrite their file.
        acl_path = acl_path.with_name("redis-acl.conf.new")
        print(f"note: {etc / 'redis-acl.conf'} differs from the template; new version in {acl_path}")
    acl_path.write_text(acl_text)
    acl_path.chmod(0o640)
    try:
        os.chown(acl_path, -1, grp.getgrnam("redis").gr_gid)
    except (KeyError, PermissionError):
        print(f"note: no group 'redis' here (or not root): make {acl_path} readable by redis-server")

    systemd_dir.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        shutil.copy(PROJECT / "systemd" / unit, systemd_dir / unit)
        (systemd_dir / unit).chmod(0o644)
    print_next_steps(etc, acl_path)


def print_next_steps(etc, acl_path):
    print(f"""
eexit installed. Next steps (details: docs/DEPLOY.md):
 1. Edit {etc}/eexit.env (REDIS_URL, exchange, thresholds).
 2. Exchange keys (trade only, no withdrawal, IP allow-list), one file each, mode 0600:
      {etc}/credentials/brain/api_key  .../brain/api_secret
      {etc}/credentials/eew/api_key    .../eew/api_secret
 3. Panic signing keys (generate: python3 -c "import secrets; print(secrets.token_hex(32))"):
      {etc}/credentials/watchdog/panic_hmac_keys   one line: wd1 watchdog <hexkey>
      {etc}/credentials/eew/panic_hmac_keys        every issuer's line (watchdog, ops, risk_kernel)
      {etc}/credentials/ops/panic_hmac_keys        one line: ops1 ops <hexkey>
 4. Redis: add users for your other clients (see docs/DEPLOY.md), then in redis.conf
      aclfile {acl_path}
    and restart redis-server. Check: redis-cli --user eexit-ops --askpass PING
 5. systemctl daemon-reload && systemctl enable --now eexit-eew eexit-watchdog eexit-brain
    (eexit-audit once `python -m eexit.audit` exists)
    Alerts (docs/ALERTS.md): EEXIT_ALERT_* in eexit.env, the Telegram bot token in
      {etc}/credentials/alert/telegram_bot_token, then systemctl enable --now eexit-alert
 6. Run a drill against the exchange testnet before going live (docs/DEPLOY.md).""")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    wheel = commands.add_parser("wheelhouse", help="build the wheelhouse (connected machine)")
    wheel.add_argument("--out", required=True, help="directory for the wheels")
    wheel.add_argument("--project", default=str(PROJECT), help="eexit source tree (default: this one)")
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

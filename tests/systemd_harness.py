"""The machine's real systemd booted as PID 1 of private namespaces, for tests whose subject is
systemd's behaviour (credentials, watchdog kills, restarts, OnFailure=, the journal).

Recipe (measured on Debian 12, systemd 252; issue 23, docs/SPEC §8):
  launcher  moves itself into a fresh child of the host's cgroup2 hierarchy
            (/sys/fs/cgroup/unified on a hybrid host, /sys/fs/cgroup on a pure v2 one), then
            `unshare --pid --fork --kill-child --mount --propagation private --uts --ipc --net
            --cgroup` runs the set-up script below as PID 1 of the new namespaces;
  inside    tmpfs for the overlay layers, overlays (upper dir on that tmpfs) for /etc /var /opt
            /root; a private /dev (null zero full random urandom tty bound from the host, a new
            devpts, shm); proc mounted fresh with /proc/sys bound read-only (sysctls are not
            namespaced: the host's are never written); sysfs read-only; cgroup2 at
            /sys/fs/cgroup (the namespace's root is the fresh child group); private tmpfs on
            /run /tmp /var/tmp /etc/systemd/system; `ip link set lo up` in the new network
            namespace (loopback only, the host's network is never touched); an empty
            /etc/machine-id; the hardware, clock, tty and login units masked; a minimal target
            (TARGET) holding dbus.socket and journald; `mount --make-rshared /` (without it
            every LoadCredential= fails: systemd makes / shared itself only on bare metal);
            then exec /lib/systemd/systemd --unit=TARGET with container=<name>.
  enter     `nsenter -t <init pid> -m -u -i -n -p -C` (run(), systemctl(), journal()).
  teardown  SIGRTMIN+4 (poweroff) to the init, SIGKILL by that PID if it outlives
            POWEROFF_S, the cgroup and the staging directory removed. Nothing persists on the
            host: every write inside lands on a tmpfs of the namespace. Paths outside the
            overlaid ones (e.g. this source tree) are the host's own: read them, never write.
On a host whose memory and pids controllers are bound to cgroup v1 (this kind of machine),
MemoryMax=/TasksMax= are NOT enforced inside: a test relying on them must say so.

API (other tests use this; keep it small and stable):
    with BootedSystemd("name") as sd:     # or sd = BootedSystemd(...); sd.start(); sd.stop()
        sd.run(["cmd", ...], check=True, input=None, timeout=60, env=None) -> CompletedProcess
        sd.sh("shell text", ...)              same, through /bin/sh -c
        sd.systemctl("start", "unit")         -> CompletedProcess (check=True by default)
        sd.main_pid("unit") -> int            the unit's MainPID inside the namespace (0 = none)
        sd.host_pid("unit") -> int            the same process seen from the host (for kill/stop)
        sd.show("unit", "Prop") -> str        `systemctl show -p Prop --value`
        sd.journal(unit=None, priority=None, grep=None) -> [{"PRIORITY": int, "MESSAGE": str, ...}]
        sd.wait_for(predicate, timeout, what) -> the predicate's truthy value (polls, no fixed sleep)
        sd.wait_journal(unit, pattern, priority=None, timeout=30) -> the first matching entry
        sd.wait_active(unit, timeout=60)      until ActiveState=active (READY for Type=notify)
        sd.write(path, text, mode=0o600)      a file inside (overlay), as root
        sd.read(path) -> str
        sd.install_project()                  tools/install_offline.py install, run inside with
                                              the distribution's /usr/bin/python3, from a
                                              wheelhouse built on the host as docs/DEPLOY.md says
                                              (cached per source tree; see build_wheelhouse)
    EexitHost(name, paper_args=(), env_lines=())   a BootedSystemd with eexit installed and
                                              configured as a paper install (see its docstring):
                                              configure(), start_units(), eexit(...), redis(),
                                              paper(...), paper_order(...), paper_exposure()
    skip_reason() -> str | None               why this machine cannot boot it (None: it can)
    require_systemd(testcase)                 skip (or, under CI=true, fail) when it cannot

Everything the tests do inside waits for events (wait_for polls a condition; no fixed sleep).
"""

import ctypes
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = "/lib/systemd/systemd"
DISTRO_PYTHON = "/usr/bin/python3"
TARGET = "eexit-test.target"
POWEROFF_S = 20
PR_SET_PDEATHSIG = 1
BOOT_S = 90
# Units that need hardware, the clock, a tty or a login, or that write host-wide state: masked.
MASKED = (
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-sysctl.service",
    "systemd-modules-load.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount", "systemd-timesyncd.service", "systemd-random-seed.service",
    "systemd-remount-fs.service", "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.timer", "systemd-tmpfiles-clean.service", "getty.target", "getty@tty1.service",
    "console-getty.service", "serial-getty@.service", "systemd-logind.service", "systemd-user-sessions.service",
    "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service", "systemd-firstboot.service",
    "systemd-machine-id-commit.service", "systemd-hwdb-update.service", "ldconfig.service",
    "systemd-journald-audit.socket", "systemd-pstore.service", "systemd-boot-system-token.service",
    "systemd-fsck-root.service", "dev-hugepages.mount", "dev-mqueue.mount", "sys-kernel-config.mount",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount",
    "systemd-ask-password-console.path", "systemd-ask-password-wall.path", "systemd-networkd.service",
    "systemd-resolved.service", "networking.service", "ifupdown-wait-online.service",
    "systemd-networkd-wait-online.service", "cron.service", "ssh.service", "e2scrub_reap.service",
    "systemd-journal-catalog-update.service", "systemd-sysusers.service", "kmod-static-nodes.service",
    "systemd-repart.service", "systemd-confext.service", "systemd-sysext.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "man-db.timer", "fstrim.timer", "e2scrub_all.timer", "logrotate.timer",
)
TARGET_UNIT = f"""[Unit]
Description=eexit test boot: journald and D-Bus, nothing else
Wants=systemd-journald.socket systemd-journald.service dbus.socket
After=systemd-journald.socket dbus.socket
AllowIsolate=yes
"""

SETUP_SCRIPT = r"""
set -eu
stage=$1; name=$2; target=$3; systemd=$4
masks=$5
# Layers for the overlays on a tmpfs of this namespace (the host sees an empty directory).
mount -t tmpfs -o mode=0700 eexit-stage "$stage"
for d in etc var opt root; do
  mkdir -p "$stage/upper/$d" "$stage/work/$d"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$stage/upper/$d,workdir=$stage/work/$d" "/$d"
done
# A private /dev, built aside and moved over the host's.
mkdir -p "$stage/dev"
mount -t tmpfs -o mode=0755,nosuid eexit-dev "$stage/dev"
for n in null zero full random urandom tty; do
  touch "$stage/dev/$n"; mount --bind "/dev/$n" "$stage/dev/$n"
done
mkdir -p "$stage/dev/pts" "$stage/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$stage/dev/pts"
ln -s pts/ptmx "$stage/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$stage/dev/shm"
ln -s /proc/self/fd "$stage/dev/fd"; ln -s /proc/self/fd/0 "$stage/dev/stdin"
ln -s /proc/self/fd/1 "$stage/dev/stdout"; ln -s /proc/self/fd/2 "$stage/dev/stderr"
mount --move "$stage/dev" /dev
# proc of this PID namespace; /proc/sys read-only (sysctls are host-wide).
mount -t proc -o nosuid,nodev,noexec proc /proc
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=0755,nosuid,nodev eexit-run /run
mount -t tmpfs -o mode=1777,nosuid,nodev eexit-tmp /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev eexit-vartmp /var/tmp
mount -t tmpfs -o mode=0755 eexit-units /etc/systemd/system
ip link set lo up
hostname "$name"
: > /etc/machine-id
for unit in $masks; do ln -sf /dev/null "/etc/systemd/system/$unit"; done
cat > "/etc/systemd/system/$target"
mount --make-rshared /
exec env -i container="$name" PATH=/usr/sbin:/usr/bin:/sbin:/bin "$systemd" --unit="$target"
"""


def cgroup2_root():
    """The host's cgroup2 mount: /sys/fs/cgroup/unified (hybrid) or /sys/fs/cgroup (pure v2)."""
    for path in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(path, "cgroup.procs")) and \
                os.path.exists(os.path.join(path, "cgroup.subtree_control")):
            return path
    return None


def skip_reason():
    """Why this machine cannot boot systemd for a test, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount, unshare, cgroups)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no systemd binary at {SYSTEMD}"
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH"
    if cgroup2_root() is None:
        return "no cgroup2 hierarchy mounted (/sys/fs/cgroup/unified or /sys/fs/cgroup)"
    return None


def require_systemd(testcase=None):
    """Skip with the reason where systemd cannot be booted; under CI=true that is a failure,
    never a skip (CI installs Debian's systemd package: a real-systemd test must run there)."""
    reason = skip_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        raise AssertionError(f"real-systemd test cannot run under CI=true: {reason}")
    raise unittest.SkipTest(f"real systemd unavailable: {reason}")


def wait_for(predicate, timeout, what, interval=0.02):
    """Poll predicate until it returns something truthy; that value, or AssertionError naming
    what was awaited. Polls a condition: never a fixed sleep standing in for an event."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def systemd_version():
    out = subprocess.run([SYSTEMD, "--version"], capture_output=True, text=True).stdout
    return out.split("\n", 1)[0].strip()


class BootedSystemd:
    """One booted systemd; see the module docstring for the API."""

    def __init__(self, name="eexit-test", extra_units=None):
        self.name = name
        self.extra_units = dict(extra_units or {})   # file name -> text, written into /etc/systemd/system
        self.dir = None
        self.cgroup = None
        self.launcher = None
        self.pid = None

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        require_systemd()
        self.dir = Path(tempfile.mkdtemp(prefix=f"eexit-systemd-{self.name}-"))
        (self.dir / "stage").mkdir()
        self.cgroup = os.path.join(cgroup2_root(), f"eexit-test-{self.name}-{os.getpid()}-{id(self) & 0xffff:x}")
        os.mkdir(self.cgroup)
        console = open(self.dir / "console.log", "wb")
        cgroup_procs = os.path.join(self.cgroup, "cgroup.procs")

        def enter_cgroup():
            # In the child before exec: the launcher (and so the namespace's init) lives in the
            # fresh group, which becomes the root of the new cgroup namespace. If the test
            # process dies without stop(), the kernel kills unshare, and --kill-child its init.
            with open(cgroup_procs, "w") as handle:
                handle.write(str(os.getpid()))
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        command = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
                   "--uts", "--ipc", "--net", "--cgroup", "/bin/sh", "-c", SETUP_SCRIPT, "eexit-setup",
                   str(self.dir / "stage"), self.name, TARGET, SYSTEMD, " ".join(MASKED)]
        try:
            self.launcher = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=console,
                                             stderr=subprocess.STDOUT, preexec_fn=enter_cgroup,
                                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            self.launcher.stdin.write(TARGET_UNIT.encode())
            self.launcher.stdin.close()
            self.pid = wait_for(self._init_pid, 30, "the namespace's init to exec systemd")
            wait_for(lambda: os.path.exists(f"/proc/{self.pid}/root/run/systemd/private"), BOOT_S,
                     f"systemd's private socket ({self.console_tail()})")
            for file_name, text in self.extra_units.items():
                self.write(f"/etc/systemd/system/{file_name}", text, mode=0o644)
            if self.extra_units:
                self.systemctl("daemon-reload")
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_S)
            if state.stdout.strip() not in ("running", "degraded"):
                raise AssertionError(f"systemd did not finish booting: {state.stdout.strip()!r}; "
                                     f"{self.console_tail()}")
        except BaseException:
            self.stop()
            raise
        finally:
            console.close()

    def _init_pid(self):
        """The unshare child (PID 1 inside) once it has exec'd systemd."""
        if self.launcher.poll() is not None:
            raise AssertionError(f"the launcher exited {self.launcher.returncode}: {self.console_tail()}")
        try:
            children = Path(f"/proc/{self.launcher.pid}/task/{self.launcher.pid}/children").read_text().split()
            for child in children:
                if os.readlink(f"/proc/{child}/exe") == os.path.realpath(SYSTEMD):
                    return int(child)
        except OSError:
            return None
        return None

    def console_tail(self, lines=30):
        try:
            text = (self.dir / "console.log").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "console: " + " | ".join(text.splitlines()[-lines:])

    def stop(self):
        """Poweroff (SIGRTMIN+4), SIGKILL by PID if it outlives POWEROFF_S, remove the cgroup
        and the staging directory. Safe to call twice."""
        if self.launcher is not None:
            if self.pid is not None and self.launcher.poll() is None:
                try:
                    os.kill(self.pid, signal.SIGRTMIN + 4)
                    self.launcher.wait(POWEROFF_S)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            if self.launcher.poll() is None:
                for pid in (self.pid, self.launcher.pid):
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                self.launcher.wait(30)
            self.launcher = None
        if self.cgroup is not None:
            remove_cgroup(self.cgroup)
            self.cgroup = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.pid = None

    # ---------------------------------------------------------------- inside

    def run(self, command, check=True, input=None, timeout=60, env=None):
        """command inside every namespace of the booted system, as root, cwd /; output as text."""
        environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                       "SYSTEMD_COLORS": "0"}
        environment.update(env or {})
        full = ["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "-C", "--wd=/", "--",
                "env", "-i", *[f"{k}={v}" for k, v in environment.items()], *map(str, command)]
        result = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"inside {self.name}: {shlex.join(map(str, command))} exited "
                                 f"{result.returncode}\nstdout: {result.stdout[-3000:]}\n"
                                 f"stderr: {result.stderr[-3000:]}")
        return result

    def sh(self, script, **kwargs):
        return self.run(["/bin/sh", "-c", script], **kwargs)

    def systemctl(self, *args, check=True, timeout=90):
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit, prop):
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def main_pid(self, unit):
        return int(self.show(unit, "MainPID") or 0)

    def host_pid(self, unit):
        """The unit's main process as the host sees it (to signal it from the test): the member
        of the unit's cgroup whose innermost NSpid is the MainPID systemd reports."""
        inside = self.main_pid(unit)
        if not inside:
            return 0
        group = self.show(unit, "ControlGroup")
        for pid in Path(self.cgroup + group, "cgroup.procs").read_text().split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspids = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
            if int(nspids[-1]) == inside:
                return int(pid)
        raise AssertionError(f"{unit}: MainPID {inside} not found in {group}")

    def journal(self, unit=None, priority=None, grep=None, identifier=None):
        """Journal entries (dicts; PRIORITY as int) of a unit or syslog identifier, at or above
        a priority (0 emerg .. 7 debug), optionally whose MESSAGE matches grep (a regex)."""
        command = ["journalctl", "--no-pager", "-o", "json", "--output-fields=MESSAGE,PRIORITY,_PID,"
                   "SYSLOG_IDENTIFIER,_SYSTEMD_UNIT,UNIT,__REALTIME_TIMESTAMP"]
        if unit:
            command += ["-u", unit]
        if identifier:
            command += ["-t", identifier]
        if priority is not None:
            command += ["-p", str(priority)]
        if grep:
            command += ["-g", grep]
        result = self.run(command, check=False)
        entries = []
        for line in result.stdout.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = entry.get("MESSAGE")
            if isinstance(message, list):     # journald gives non-UTF-8 messages as byte arrays
                message = bytes(message).decode("utf-8", "replace")
            entry["MESSAGE"] = message or ""
            entry["PRIORITY"] = int(entry.get("PRIORITY", 6))
            entries.append(entry)
        return entries

    def wait_for(self, predicate, timeout=30, what="a condition"):
        return wait_for(predicate, timeout, what, interval=0.05)

    def wait_journal(self, unit, pattern, priority=None, timeout=30, identifier=None):
        return self.wait_for(lambda: next(iter(self.journal(unit, priority, pattern, identifier)), None),
                             timeout, f"journal of {unit or identifier} to show /{pattern}/")

    def wait_active(self, unit, timeout=60):
        def active():
            state = self.show(unit, "ActiveState")
            if state == "failed":
                raise AssertionError(f"{unit} failed: {self.journal_text(unit)}")
            return state == "active"
        return self.wait_for(active, timeout, f"{unit} to be active (READY)")

    def journal_text(self, unit, last=40):
        return "\n".join(e["MESSAGE"] for e in self.journal(unit)[-last:])

    def write(self, path, text, mode=0o600):
        self.run(["/bin/sh", "-c", 'umask 077; mkdir -p "$(dirname "$1")"; cat > "$1"; chmod "$2" "$1"',
                  "write", path, f"{mode:o}"], input=text)

    def read(self, path):
        return self.run(["cat", path]).stdout

    def install_project(self, wheelhouse=None):
        """tools/install_offline.py install, inside, with the distribution's Python, from the
        wheelhouse build_wheelhouse() made on the host (visible inside at the same path)."""
        wheelhouse = wheelhouse or build_wheelhouse()
        return self.run([DISTRO_PYTHON, ROOT / "tools/install_offline.py", "install",
                         "--wheelhouse", wheelhouse, "--python", DISTRO_PYTHON], timeout=600)


def remove_cgroup(path):
    """rmdir the group and the empty groups systemd made under it, deepest first."""
    for directory, _subdirs, _files in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        for _ in range(100):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                # Processes are still leaving (the kernel reaps the namespace's members).
                time.sleep(0.05)


# -------------------------------------------------------------------- the wheelhouse

def source_digest():
    """What the wheelhouse depends on: the package, setup.py, the lock and the installer."""
    digest = hashlib.sha256()
    files = sorted([*ROOT.glob("eexit/**/*.py"), ROOT / "setup.py", ROOT / "requirements.lock",
                    ROOT / "tools/install_offline.py"])
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_wheelhouse(cache_root=ROOT / "build"):
    """The wheelhouse as docs/DEPLOY.md builds it: a venv of the distribution's Python, then
    `tools/install_offline.py wheelhouse --out DIR`. Cached per source digest under
    cache_root (a rebuild costs ~1 min), so the tests of one run share it. The default,
    build/ of this tree (`make clean` removes it), is visible inside the booted system, where
    /tmp and /var/tmp are private.

    Two fallbacks, used only while the installer or the lock predates issue 23's fix (each a
    no-op once it is in): an installer whose `pip wheel` needs `wheel` in Debian's venv
    (`invalid command 'bdist_wheel'`) gets it installed and runs again; a lock without
    async-timeout (redis-py needs it below Python 3.11.3), which pip's resolver refuses on
    this Python, gets async-timeout's wheel added to the wheelhouse, its lock and SHA256SUMS."""
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    out = Path(cache_root) / f"eexit-wheelhouse-{source_digest()}"
    # One builder at a time (test classes run in parallel): the others wait and reuse it.
    with open(Path(cache_root) / ".wheelhouse.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "SHA256SUMS").is_file():
            _build_wheelhouse(cache_root, out)
    return out


def _build_wheelhouse(cache_root, out):
    build = Path(tempfile.mkdtemp(prefix="eexit-wheelhouse-build-", dir=cache_root))
    try:
        venv = build / "venv"
        subprocess.run([DISTRO_PYTHON, "-m", "venv", venv], check=True, capture_output=True)
        python = str(venv / "bin/python")
        wheels = build / "wheels"
        command = [python, ROOT / "tools/install_offline.py", "wheelhouse", "--out", wheels]
        made = subprocess.run(command, capture_output=True, text=True)
        if made.returncode != 0 and "bdist_wheel" in made.stdout + made.stderr:
            # An installer from before --use-pep517: give the build venv `wheel` and retry.
            shutil.rmtree(wheels, ignore_errors=True)
            subprocess.run([python, "-m", "pip", "install", "-q", "wheel"], check=True, capture_output=True)
            made = subprocess.run(command, capture_output=True, text=True)
        if made.returncode != 0:
            raise AssertionError(f"wheelhouse build failed: {made.stdout[-2000:]} {made.stderr[-2000:]}")
        _add_missing_requirements(python, wheels)
        shutil.rmtree(out, ignore_errors=True)      # an interrupted earlier build (no SHA256SUMS)
        wheels.rename(out)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _add_missing_requirements(python, wheels):
    check = [python, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", wheels,
             "--require-hashes", "--requirement", wheels / "requirements.lock"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return
    subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--dest", wheels,
                    "async-timeout>=4.0.3"], check=True, capture_output=True)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import install_offline
    finally:
        sys.path.pop(0)
    extra = next(wheels.glob("async_timeout-*.whl"))
    with open(wheels / "requirements.lock", "a") as lock:
        lock.write(f"{install_offline.wheel_requirement(extra.name)} "
                   f"--hash=sha256:{install_offline.sha256_file(extra)}\n")
    install_offline.write_sums(wheels)
    subprocess.run(check, check=True, capture_output=True)


# -------------------------------------------------------------------- an installed eexit host

INSTALLED_PYTHON = "/opt/eexit/venv/bin/python"
EEXIT = "/opt/eexit/venv/bin/eexit"
PAPER_PORT = 8899
PAPER_URL = f"http://127.0.0.1:{PAPER_PORT}"
REDIS_SOCKET = "/run/redis-eexit/redis-server.sock"
# The crash listener before the brain: the brain's crash path is warm from its first crash.
DAEMON_UNITS = ("eexit-eew.service", "eexit-audit.service", "eexit-watchdog.service", "eexit-crash-listener.service",
                "eexit-brain.service")
# Paper exchange control from the test: stdlib only, run inside with the distribution's Python.
# argv: base method path json-body signed(0/1) key secret -> the JSON answer on stdout.
PAPER_CTL = r"""
import hashlib, hmac, json, sys, time, urllib.parse, urllib.request
base, method, path, body, signed, key, secret = sys.argv[1:8]
body = json.loads(body) if body else None
headers, data, url = {}, None, base + path
if signed == "1":
    query = dict(body or {}, timestamp=int(time.time() * 1000))
    text = urllib.parse.urlencode(query)
    text += "&signature=" + hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()
    headers["X-MBX-APIKEY"] = key
    url += "?" + text
elif body is not None:
    data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
request = urllib.request.Request(url, data=data, method=method, headers=headers)
try:
    with urllib.request.urlopen(request, timeout=10) as answer:
        sys.stdout.write(answer.read().decode())
except urllib.error.HTTPError as error:
    sys.stdout.write(error.read().decode()); sys.exit(1)
"""


class EexitHost(BootedSystemd):
    """A booted systemd with eexit installed by tools/install_offline.py and configured as
    docs/DEPLOY.md says for a paper install: eexit's own redis-server@eexit, the paper exchange
    (`python -m eexit.paper`, a transient unit eexit-paper.service, loopback :8899) as the venue,
    exchange keys and panic signing keys in /etc/eexit/credentials, then the units.

        host = EexitHost("name", paper_args=("--latency-ms", "25")); host.start()
        host.configure()                 install + credentials + env + redis + paper (no units)
        host.start_units()               DAEMON_UNITS, each waited for READY; then `eexit init`
        host.eexit("status")             the CLI as an operator runs it (ops credentials)
        host.redis()                     a redis-py client on the host side, as eexit-ops,
                                         through the namespace's unix socket
        host.paper("GET", "/_paper/state"), host.paper_order(...), host.paper_flat()
    """

    def __init__(self, name="eexit-host", paper_args=(), env_lines=(), extra_units=None):
        super().__init__(name, extra_units)
        self.paper_args = tuple(paper_args)
        self.env_lines = tuple(env_lines)
        self.keys = {}
        self._clients = []

    def stop(self):
        for client in self._clients:
            client.close()
        self._clients = []
        super().stop()

    def configure(self, wheelhouse=None):
        self.install_project(wheelhouse)
        creds = "/etc/eexit/credentials"
        for daemon in ("brain", "eew", "ops"):
            self.write(f"{creds}/{daemon}/api_key", "paper-key\n")
            self.write(f"{creds}/{daemon}/api_secret", "paper-secret\n")
        import secrets
        self.keys = {issuer: secrets.token_hex(32) for issuer in ("watchdog", "ops", "exit_brain")}
        lines = {"watchdog": f"wd1 watchdog {self.keys['watchdog']}", "ops": f"ops1 ops {self.keys['ops']}",
                 "exit_brain": f"hook1 exit_brain {self.keys['exit_brain']}"}
        self.write(f"{creds}/watchdog/panic_hmac_keys", lines["watchdog"] + "\n")
        self.write(f"{creds}/ops/panic_hmac_keys", lines["ops"] + "\n")
        self.write(f"{creds}/eew/panic_hmac_keys", "\n".join(lines.values()) + "\n")
        self.write(f"{creds}/hook/hook_hmac_key", lines["exit_brain"] + "\n")
        settings = self.read("/etc/eexit/eexit.env")
        settings = settings.replace("REDIS_URL=redis://127.0.0.1:6379/0", "REDIS_URL=redis://127.0.0.1:6380/0")
        settings = settings.replace("EEXIT_SANDBOX=true", "# EEXIT_SANDBOX=true  (the paper exchange instead)")
        settings += f"EEXIT_EXCHANGE_URL={PAPER_URL}\nEEXIT_RESUME_COOLDOWN_S=0\n" + \
            "".join(line + "\n" for line in self.env_lines)
        self.write("/etc/eexit/eexit.env", settings, mode=0o640)
        self.systemctl("enable", "--now", "redis-server@eexit.service")
        self.wait_active("redis-server@eexit.service")
        self.run(["systemd-run", "--unit=eexit-paper", "--property=Type=exec", INSTALLED_PYTHON, "-m",
                  "eexit.paper", "--port", str(PAPER_PORT), *self.paper_args])
        self.wait_for(lambda: self.paper("GET", "/_paper/state", check=False) is not None, 60,
                      "the paper exchange to answer")
        self.systemctl("daemon-reload")

    def start_units(self, units=DAEMON_UNITS, init=True):
        for unit in units:
            self.systemctl("enable", "--now", unit)
        for unit in units:
            self.wait_active(unit)
        if init:
            self.eexit("init", "--operator", "test")

    def ops_env(self):
        return {"CREDENTIALS_DIRECTORY": "/etc/eexit/credentials/ops", "USER": "test", "HOME": "/root"}

    def eexit(self, *args, check=True, timeout=120):
        """The CLI with eexit.env's settings and the ops credentials, as DEPLOY.md step 6."""
        script = 'set -a; . /etc/eexit/eexit.env; set +a; exec "$0" "$@"'
        return self.run(["/bin/sh", "-c", script, EEXIT, *args], check=check, timeout=timeout, env=self.ops_env())

    def redis(self, user="eexit-ops", daemon="ops"):
        """A client from the host through the namespace's unix socket (the path resolves
        through /proc/<init>/root), logged in as an eexit ACL user."""
        import redis
        password = self.read(f"/etc/eexit/credentials/{daemon}/redis_password").strip()
        client = redis.Redis(unix_socket_path=f"/proc/{self.pid}/root{REDIS_SOCKET}", username=user,
                             password=password, socket_timeout=10, decode_responses=True)
        self._clients.append(client)
        return client

    def paper(self, method, path, body=None, signed=False, check=True):
        result = self.run([DISTRO_PYTHON, "-c", PAPER_CTL, PAPER_URL, method, path,
                           json.dumps(body) if body is not None else "", "1" if signed else "0",
                           "paper-key", "paper-secret"], check=False)
        if result.returncode != 0:
            if check:
                raise AssertionError(f"paper {method} {path}: {result.stdout} {result.stderr[-500:]}")
            return None
        return json.loads(result.stdout)

    def paper_order(self, symbol, side, qty, price=None, trigger=None):
        """A resting limit order (price) or a conditional stop-market order (trigger)."""
        if trigger is not None:
            return self.paper("POST", "/fapi/v1/algoOrder", {
                "algoType": "CONDITIONAL", "symbol": symbol, "side": side, "type": "STOP_MARKET",
                "quantity": str(qty), "triggerPrice": str(trigger)}, signed=True)
        return self.paper("POST", "/fapi/v1/order", {"symbol": symbol, "side": side, "type": "LIMIT",
                                                     "quantity": str(qty), "price": str(price),
                                                     "timeInForce": "GTC"}, signed=True)

    def paper_exposure(self):
        """(open positions, open orders, open conditional orders) on the paper exchange."""
        state = self.paper("GET", "/_paper/state")
        positions = [p for p in state["positions"] if float(p["amount"]) != 0]
        return positions, state["open_orders"], state["open_algo_orders"]

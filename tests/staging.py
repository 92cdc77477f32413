"""A staged install shared by the install tests: the wheelhouse is built once per test run
(it is the slow part, ~10-30 s: it downloads the locked files from the package index, as the
connected machine does) and removed at exit. Not a test module.

distro_python()       the distribution's own interpreter (Debian 12: /usr/bin/python3, 3.11.2):
                      the docs' `python3` on the target and on the connected machine
wheelhouse()          the wheelhouse of this source tree (tools/install_offline.py wheelhouse), built
                      as the docs say: in a venv of distro_python()
bumped(version)       a copy of it whose eexit wheel says `version` (an upgrade release)
install(wh, root)     tools/install_offline.py install into root, pip cut off from any index
"""

import atexit
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools/install_offline.py"
DISTRO_PYTHON = "/usr/bin/python3"
_CACHE = {}


def distro_python():
    """/usr/bin/python3 once it can make a venv (ensurepip): Debian needs python3-venv for
    that, which .ci/run installs. Without it this is an AssertionError saying so (the install
    tests fail rather than test another Python)."""
    if "python" not in _CACHE:
        probe = subprocess.run([DISTRO_PYTHON, "-c", "import ensurepip, platform; ensurepip.version(); "
                                "print(platform.python_version())"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise AssertionError(f"{DISTRO_PYTHON} cannot make a venv (Debian: apt-get install "
                                 f"python3-venv): {probe.stderr[-500:]}")
        _CACHE["python"] = (DISTRO_PYTHON, probe.stdout.strip())
    return _CACHE["python"][0]


def distro_python_version():
    distro_python()
    return _CACHE["python"][1]


def build_python():
    """The wheelhouse builder of docs/DEPLOY.md: a venv of the distribution's python3 (its pip)."""
    if "build_python" not in _CACHE:
        venv = workspace() / "build-venv"
        subprocess.run([distro_python(), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        _CACHE["build_python"] = str(venv / "bin/python")
    return _CACHE["build_python"]


def installer():
    """tools/install_offline.py as a module (its hashing helpers)."""
    if "module" not in _CACHE:
        spec = importlib.util.spec_from_file_location("install_offline", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CACHE["module"] = module
    return _CACHE["module"]


def workspace():
    if "tmp" not in _CACHE:
        _CACHE["tmp"] = Path(tempfile.mkdtemp(prefix="eexit-staging-"))
        atexit.register(shutil.rmtree, _CACHE["tmp"], ignore_errors=True)
    return _CACHE["tmp"]


def source_copy(name, version=None):
    """This tree without .git and build litter (the wheel build leaves egg-info behind)."""
    source = workspace() / name
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "bench"))
    if version is not None:
        init = source / "eexit/__init__.py"
        init.write_text(re.sub(r'__version__ = "[^"]+"', f'__version__ = "{version}"', init.read_text()))
    return source


def wheelhouse():
    if "wheelhouse" not in _CACHE:
        out = workspace() / "wheelhouse"
        built = subprocess.run([build_python(), str(SCRIPT), "wheelhouse", "--out", str(out),
                                "--project", str(source_copy("source"))],
                               capture_output=True, text=True, timeout=900)
        if built.returncode != 0:
            raise AssertionError("building the wheelhouse failed (it needs the package index, like "
                                 f"the connected machine it stands for):\n{built.stdout[-1500:]}\n"
                                 f"{built.stderr[-1500:]}")
        _CACHE["wheelhouse"] = (out, built.stdout)
    return _CACHE["wheelhouse"][0]


def bumped(version):
    """The same dependency wheels, a rebuilt eexit wheel with `version`, a new lock and sums."""
    module = installer()
    out = workspace() / f"wheelhouse-{version}"
    shutil.copytree(wheelhouse(), out)
    for old in out.glob("eexit-*.whl"):
        old.unlink()
    subprocess.run([build_python(), "-m", "pip", "wheel", "--no-deps", "--use-pep517", "--wheel-dir", str(out),
                    str(source_copy(f"source-{version}", version))],
                   check=True, capture_output=True, timeout=600)
    (out / module.WHEELHOUSE_LOCK).write_text("".join(
        f"{module.wheel_requirement(w.name)} --hash=sha256:{module.sha256_file(w)}\n"
        for w in sorted(out.glob("*.whl"))))
    module.write_sums(out)
    return out


def offline_env():
    """pip sees an index and proxies on a closed local port, no config file, no retries."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_INDEX_URL=f"{closed}/simple", PIP_EXTRA_INDEX_URL="", PIP_CONFIG_FILE=os.devnull,
               HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed, https_proxy=closed,
               PIP_RETRIES="0", PIP_TIMEOUT="3")
    return env


def install(wheelhouse_dir, root, cwd=None):
    """As the docs say (`python3 tools/install_offline.py install`), with the distribution's
    python3: the venv is made by it."""
    return subprocess.run([distro_python(), str(SCRIPT), "install", "--wheelhouse", str(wheelhouse_dir),
                           "--root", str(root)], capture_output=True, text=True, timeout=600,
                          env=offline_env(), cwd=cwd or workspace())

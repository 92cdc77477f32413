"""`python -m tests [-j N] [name ...]`: run the suite (or the named modules, classes or tests)
in N worker processes and end with one tally line.

CI reads the last line, `N passed, N failed, N skipped`, summed from the real unittest results
of every worker; the exit code is non-zero when anything failed or errored (a worker that died
mid-unit counts as a failure of that unit), or when no test ran.

The unit of work is one test class: every class starts its own redis-server, paper exchange
and temporary directory, on ports the kernel hands out, so classes do not share state; the
tests of one class run in order in one process. A module whose classes share a per-process
fixture runs as one unit: the modules using tests/staging.py (the offline-install wheelhouse,
built once per process) together, and any module that sets `RUN_AS_ONE_UNIT = True`.
N long-lived workers (`python -m tests --worker FD`, imports paid once each) take units from
one queue, longest first by tests/durations.json (a unit it does not know goes first: a new
test may be slow); each unit's verbose output is printed as one block when the unit ends, and
every failure is printed in full at the end. N: -j, else $EEXIT_TEST_JOBS, else 4; -j 1 runs
everything in this process. `--save-durations` rewrites tests/durations.json from this run.
"""

import argparse
import collections
import importlib
import io
import json
import os
import selectors
import subprocess
import sys
import time
import traceback
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATIONS = os.path.join(ROOT, "tests", "durations.json")
DEFAULT_JOBS = 4
STAGING = "tests.staging"


# ------------------------------------------------------------------------------ planning

def test_classes(loader, module):
    """(attribute name, class) of every TestCase class with tests, as loadTestsFromModule finds them."""
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, type) and issubclass(obj, unittest.TestCase) and loader.getTestCaseNames(obj):
            yield name, obj


def uses_staging(module):
    staging = sys.modules.get(STAGING)
    return staging is not None and any(value is staging or getattr(value, "__module__", None) == STAGING
                                       for value in vars(module).values())


def targets_of(loader, name):
    """[(module, class attribute or None, [method] or None)] for one name as given: a module,
    a class, a test method; a name that resolves to none of these is passed to unittest as is
    (its loader then reports the error as a failing test)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name, rest = ".".join(parts[:cut]), parts[cut:]
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - not importable here: unittest's loader reports why, as a test
            continue
        if not rest:
            return [(module_name, attr, None) for attr, _cls in test_classes(loader, module)]
        cls = getattr(module, rest[0], None)
        if isinstance(cls, type) and issubclass(cls, unittest.TestCase) and len(rest) <= 2:
            return [(module_name, rest[0], rest[1:] or None)]
        break
    return [(name, None, None)]


def plan(loader, names):
    """Units of work: {"name", "targets"}; classes of a grouped module share one unit."""
    if not names:
        names = sorted("tests." + f[:-3] for f in os.listdir(os.path.join(ROOT, "tests"))
                       if f.startswith("test") and f.endswith(".py"))
    units = collections.OrderedDict()
    for name in names:
        for module_name, attr, methods in targets_of(loader, name):
            module = sys.modules.get(module_name)
            if module is not None and uses_staging(module):
                key = STAGING
            elif module is not None and getattr(module, "RUN_AS_ONE_UNIT", False):
                key = module_name
            else:
                key = f"{module_name}.{attr}" if attr else module_name
            units.setdefault(key, {"name": key, "targets": []})["targets"].append([module_name, attr, methods])
    return list(units.values())


def longest_first(units):
    try:
        with open(DURATIONS, encoding="utf-8") as handle:
            known = json.load(handle)
    except (OSError, ValueError):
        known = {}     # no history: discovery order
    return sorted(units, key=lambda unit: -known.get(unit["name"], float("inf")))


# ------------------------------------------------------------------------------ one unit

class QuietResult(unittest.TextTestResult):
    """Verbose per-test lines; the failures themselves are collected and printed at the end."""

    def printErrors(self):
        pass


def run_unit(unit):
    """Run one unit in this process: its tally, verbose output and failures, as plain data."""
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for module_name, attr, methods in unit["targets"]:
        try:
            if attr is None:
                suite.addTests(loader.loadTestsFromName(module_name))
                continue
            cls = getattr(importlib.import_module(module_name), attr)
            suite.addTests([cls(method) for method in methods] if methods else loader.loadTestsFromTestCase(cls))
        except Exception:  # noqa: BLE001 - a module that cannot load is a failing test, not a dead worker
            return failed_unit(unit, module_name, traceback.format_exc())
    stream = io.StringIO()
    started = time.monotonic()
    result = unittest.TextTestRunner(stream=stream, verbosity=2, resultclass=QuietResult).run(suite)
    return dict(tally(result), name=unit["name"], seconds=round(time.monotonic() - started, 2),
                output=stream.getvalue(), problems=problems(result))


def tally(result):
    """passed/failed/skipped of the tests that ran. A class- or module-level error or skip
    (setUpClass) counts as failed or skipped once, without a test of its own in testsRun."""
    def real(pairs):
        return sum(1 for test, _ in pairs if isinstance(test, unittest.TestCase))
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = (result.testsRun - real(result.failures) - real(result.errors) - len(result.unexpectedSuccesses)
              - real(result.skipped))
    return {"run": result.testsRun, "passed": passed, "failed": failed, "skipped": len(result.skipped)}


def problems(result):
    return ([["FAIL", str(test), text] for test, text in result.failures] +
            [["ERROR", str(test), text] for test, text in result.errors] +
            [["UNEXPECTED SUCCESS", str(test), ""] for test in result.unexpectedSuccesses])


def failed_unit(unit, what, text):
    """The result of a unit that could not run (a module that does not load, a worker that
    exited under it): one failure, never a silent zero."""
    return dict(name=unit["name"], run=0, passed=0, failed=1, skipped=0, seconds=0.0, output="",
                problems=[["ERROR", what, text]])


def worker(commands_fd, answers_fd):
    """`--worker IN OUT`: run each unit read from fd IN (one JSON line each), answer on fd OUT.
    Own pipes, not stdin/stdout: a test's child process inherits neither, and what tests
    print cannot garble an answer."""
    for fd in (commands_fd, answers_fd):
        os.set_inheritable(fd, False)
    with os.fdopen(commands_fd, encoding="utf-8") as commands, os.fdopen(answers_fd, "w", encoding="utf-8") as answers:
        for line in commands:
            answers.write(json.dumps(run_unit(json.loads(line))) + "\n")
            answers.flush()
    return 0


# ------------------------------------------------------------------------------ the run

class Worker:
    def __init__(self):
        commands_read, commands_write = os.pipe()
        answers_read, answers_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests", "--worker", str(commands_read), str(answers_write)], cwd=ROOT,
            stdin=subprocess.DEVNULL, pass_fds=(commands_read, answers_write))
        os.close(commands_read)
        os.close(answers_write)
        self.commands = os.fdopen(commands_write, "w", encoding="utf-8")
        self.answers = os.fdopen(answers_read, encoding="utf-8")
        self.unit = None

    def give(self, unit):
        self.unit = unit
        try:
            self.commands.write(json.dumps(unit) + "\n")
            self.commands.flush()
        except BrokenPipeError:
            pass         # it died: the end of its answers follows, and reports this unit failed

    def finish(self):
        """No more work (or the worker died): its command pipe closed, the worker exits."""
        try:
            self.commands.close()
        except BrokenPipeError:
            pass         # the worker is gone already
        returncode = self.process.wait()
        self.answers.close()
        return returncode


def run_parallel(units, jobs, report):
    queue = collections.deque(units)
    selector = selectors.DefaultSelector()

    def next_unit(worker):
        if queue:
            worker.give(queue.popleft())
        else:
            selector.unregister(worker.answers)
            worker.finish()

    def start():
        worker = Worker()
        selector.register(worker.answers, selectors.EVENT_READ, worker)
        next_unit(worker)

    for _ in range(min(jobs, len(queue))):
        start()
    while selector.get_map():
        for key, _events in selector.select():
            worker = key.data
            line = worker.answers.readline()
            if line:
                report(json.loads(line))
                next_unit(worker)
                continue
            # The worker exited under its unit: that unit failed; a fresh worker goes on.
            selector.unregister(worker.answers)
            unit = worker.unit
            report(failed_unit(unit, unit["name"], f"the worker running it exited with code {worker.finish()}\n"))
            if queue:
                start()


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tests", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="modules, classes or tests (default: every tests/test*.py)")
    parser.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("EEXIT_TEST_JOBS") or DEFAULT_JOBS),
                        help=f"worker processes (default $EEXIT_TEST_JOBS, else {DEFAULT_JOBS}; 1: this process)")
    parser.add_argument("--save-durations", action="store_true", help="rewrite tests/durations.json from this run")
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    jobs, save = args.jobs, args.save_durations
    units = longest_first(plan(unittest.TestLoader(), args.names))
    started = time.monotonic()
    results = []

    def report(result):
        results.append(result)
        print(f"=== {result['name']} ({result['seconds']:.1f}s)\n{result['output']}", end="", flush=True)

    if jobs <= 1 or len(units) <= 1:
        jobs = 1
        for unit in units:
            report(run_unit(unit))
    else:
        run_parallel(units, jobs, report)
    for result in results:
        for kind, test, text in result["problems"]:
            print(f"{'=' * 70}\n{kind}: {test}\n{'-' * 70}\n{text}", flush=True)
    if save:
        with open(DURATIONS, "w", encoding="utf-8") as handle:
            json.dump({r["name"]: r["seconds"] for r in sorted(results, key=lambda r: r["name"])}, handle, indent=1)
            handle.write("\n")
    passed, failed, skipped = (sum(r[key] for r in results) for key in ("passed", "failed", "skipped"))
    ran = sum(r["run"] for r in results)
    print(f"{len(results)} units, {ran} tests in {time.monotonic() - started:.1f}s with {jobs} workers", flush=True)
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 0 if failed == 0 and ran > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the production paths load (issue 24, finding 8 and behaviour 5): the three daemons and
the crash hook never load the paper exchange (a test fixture) nor the alert notifier (543 lines
the hook does not use); `eexit` does not load the paper exchange to parse its arguments; cli
and drill import no circle. Checked twice: in a fresh interpreter (what really loads) and on
the import graph tools/surface.py counts (what a reviewer must read, lazy imports included)."""

import json
import subprocess
import sys
import unittest

from tests.harness import ROOT, python_env

sys.path.insert(0, ROOT)
from tools import surface  # noqa: E402 - tools/ is not a package on the default path

FORBIDDEN_ON_THE_SAFETY_PATH = ("eexit.paper", "eexit.alert", "eexit.cli", "eexit.drill", "eexit.demo")


def loaded_after(*modules):
    """The eexit modules a fresh interpreter holds after importing `modules`."""
    code = (f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(n for n in sys.modules if n == 'eexit' or n.startswith('eexit.'))))\n")
    result = subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(result.stderr)
    return json.loads(result.stdout)


def offending(modules):
    return [m for m in modules if any(m == bad or m.startswith(bad + ".") for bad in FORBIDDEN_ON_THE_SAFETY_PATH)]


class ImportPathsTest(unittest.TestCase):
    def test_the_hook_and_the_daemons_load_neither_the_paper_exchange_nor_alert(self):
        for entry in ("eexit.hook", "eexit.crash_listener", "eexit.brain", "eexit.watchdog", "eexit.eew"):
            with self.subTest(entry=entry):
                self.assertEqual(offending(loaded_after(entry)), [])

    def test_the_counted_surface_holds_the_hook_and_none_of_them(self):
        reachable = surface.reachable()
        # eexit.ops is no longer on it: the crash hook builds its panic itself (issue 23).
        self.assertTrue({"eexit.hook", "eexit.crash_listener", "eexit.brain", "eexit.watchdog", "eexit.eew"} <= reachable)
        self.assertNotIn("eexit.ops", reachable)
        self.assertEqual(offending(sorted(reachable)), [])
        figures = surface.measure()
        for kind in ("max_class", "max_function"):
            self.assertGreater(figures[kind]["lines"], 0)
            self.assertTrue(figures[kind]["name"].startswith("eexit"))

    def test_eexit_loads_no_paper_exchange_and_drill_no_cli(self):
        loaded = loaded_after("eexit.cli")
        self.assertEqual([m for m in loaded if m.startswith(("eexit.paper", "eexit.alert", "eexit.drill"))], [])
        self.assertNotIn("eexit.cli", loaded_after("eexit.drill"))

    def test_the_demo_venues_are_the_paper_dialects(self):
        from eexit import cli, paper   # noqa: PLC0415
        self.assertEqual(tuple(cli.DEMO_VENUES), tuple(paper.DIALECTS))


if __name__ == "__main__":
    unittest.main()

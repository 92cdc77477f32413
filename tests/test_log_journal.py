"""eexit/log.py under systemd: sd-daemon priority prefixes when JOURNAL_STREAM is set, none
otherwise; the first line of every Logger names the version."""

import io
import unittest

from eexit import __version__
from eexit.log import Logger


def lines_of(env):
    out = io.StringIO()
    log = Logger("eew", stream=out, env=env)
    log.info("starting", consumer="c")
    log.warning("w")
    log.error("e", detail="x y")
    log.critical("c")
    log.info("again")
    return out.getvalue().splitlines()


class JournalPriorityTest(unittest.TestCase):
    def test_prefixes_match_levels_under_the_journal(self):
        lines = lines_of({"JOURNAL_STREAM": "8:12345"})
        self.assertEqual([line[:3] for line in lines], ["<6>", "<4>", "<3>", "<2>", "<6>"])
        self.assertIn(" level=ERROR event=e ", lines[2])

    def test_no_prefix_elsewhere(self):
        for env in ({}, {"JOURNAL_STREAM": ""}):
            self.assertTrue(all(line.startswith("ts=") for line in lines_of(env)), env)

    def test_a_summary_line_carries_its_priority_and_stays_one_line(self):
        for env, prefix in (({"JOURNAL_STREAM": "8:12345"}, "<2>"), ({}, "")):
            out = io.StringIO()
            Logger("eew", stream=out, env=env).summary("CRITICAL", "eexit.eew: configuration error: A\nB")
            self.assertEqual(out.getvalue(), f"{prefix}eexit.eew: configuration error: A B\n")

    def test_first_line_names_the_version_once(self):
        lines = lines_of({})
        self.assertIn(f" version={__version__} consumer=c", lines[0])
        self.assertFalse(any("version=" in line for line in lines[1:]))


if __name__ == "__main__":
    unittest.main()

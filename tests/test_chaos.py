"""The chaos suite's CI subset (tools/chaos.py --ci): real daemons, real Redis, real ccxt to the
paper exchange, faults injected at random moments; every run's END STATE is asserted (flat,
halted, exactly one final report per authorised event_id, forgeries REJECTED, nothing
pending). Under two minutes; the long soak is `tools/chaos.py --soak MINUTES`."""

import json
import subprocess
import sys
import unittest

from tests.harness import ROOT


class ChaosCISubset(unittest.TestCase):
    def test_ci_subset_passes(self):
        result = subprocess.run([sys.executable, "tools/chaos.py", "--ci", "--json"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        data = json.loads(result.stdout)
        failed = [(r["scenario"], r["problems"], r.get("logs")) for r in data["runs"] if not r["passed"]]
        self.assertEqual(failed, [], f"seed {data['seed']}")
        self.assertEqual(result.returncode, 0)
        for name, row in data["table"].items():
            self.assertEqual((row["lost"], row["doubled"]), (0, 0), name)


if __name__ == "__main__":
    unittest.main()

"""The `_total` counters and eexit_build_info: counted from audit-file bodies (pure), rendered
in the format the strict parser of tests/test_metrics.py accepts, bounded labels."""

import unittest

from eexit import __version__, metrics, schema
from tests.test_metrics import parse_exposition, value_of


def report(status, **more):
    return schema.CompletionReport(event_id="e", status=status, **more).to_fields()


class CounterTests(unittest.TestCase):
    def counted(self):
        counters = metrics.Counters()
        counters.add(schema.PANIC_STREAM, {"event_id": "a", "issued_by": "watchdog"})
        counters.add(schema.PANIC_STREAM, {"event_id": "b", "issued_by": "ops"})
        counters.add(schema.PANIC_STREAM, {"event_id": "c", "issued_by": "someone\nelse"})
        counters.add(schema.COMPLETED_STREAM, report("FLAT", extra={"orders_sent": "3", "orders_rejected": "1"}))
        counters.add(schema.COMPLETED_STREAM, report("REJECTED"))
        counters.add(schema.COMPLETED_STREAM, report("FLAT", reason="HALT_VIOLATION"))
        counters.add(schema.COMPLETED_STREAM, report("DUPLICATE", reason="HALT_VIOLATION"))
        counters.add(schema.COMPLETED_STREAM, dict(report("bogus"), orders_sent="x"))
        return counters

    def test_counts_by_issuer_status_and_report_fields(self):
        families = parse_exposition(metrics.render(metrics.Snapshot(redis_up=False, counters=self.counted())))
        for name in ("eexit_panics_total", "eexit_reports_total", "eexit_orders_sent_total",
                     "eexit_orders_rejected_total", "eexit_halt_violations_total"):
            self.assertEqual(families[name]["type"], "counter", name)
        self.assertEqual(value_of(families, "eexit_panics_total", issuer="watchdog"), 1)
        self.assertEqual(value_of(families, "eexit_panics_total", issuer="ops"), 1)
        self.assertEqual(value_of(families, "eexit_panics_total", issuer="other"), 1)
        self.assertEqual(value_of(families, "eexit_panics_total", issuer="risk_kernel"), 0)
        self.assertEqual(value_of(families, "eexit_reports_total", status="FLAT"), 2)
        self.assertEqual(value_of(families, "eexit_reports_total", status="REJECTED"), 1)
        self.assertEqual(value_of(families, "eexit_reports_total", status="UNKNOWN"), 1)
        self.assertEqual(value_of(families, "eexit_orders_sent_total"), 3)
        self.assertEqual(value_of(families, "eexit_orders_rejected_total"), 1)
        self.assertEqual(value_of(families, "eexit_halt_violations_total"), 1)
        self.assertEqual(value_of(families, "eexit_build_info", version=__version__), 1)

    def test_unknown_counters_are_not_rendered_as_zero(self):
        families = parse_exposition(metrics.render(metrics.Snapshot(redis_up=False)))
        self.assertNotIn("eexit_panics_total", families)
        self.assertIn("eexit_build_info", families)


if __name__ == "__main__":
    unittest.main()

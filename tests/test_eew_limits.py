"""Over-long fields are REJECTED, never cut into a collision (issue 14, behaviour 6).

The limit is schema.MAX_TEXT = 1,024 characters for any text field or field name. A longer
value is the parse problem `too_long:<name>`, and the EEW's authorise() rejects the panic:
a REJECTED report, zero exchange requests, and no ledger record under the cut event_id (so
a later event sharing those 1,024 characters is not its DUPLICATE). Both sides of the limit
run through the real EEW and the paper exchange."""

import json
import unittest
import uuid

from eexit import ops, schema, signing
from eexit.eew import authorise
from tests.harness import wait_for
from tests.test_eew import EEWCase

KEYS = "wd1 watchdog " + "ab" * 32
KEYRING = signing.parse_keys(KEYS, "test")


def signed(event_id, **extra):
    fields = {"event_id": event_id, "reason": "TEST", "severity": "CRITICAL", "issued_by": "watchdog",
              "ts": "1764331200000", **extra}
    return signing.sign_fields(fields, "wd1", KEYRING)


class AuthoriseTest(unittest.TestCase):
    """The pure decision, on both sides of the limit, for every kind of text."""

    def decide(self, fields):
        return authorise(fields, ("watchdog",), KEYRING)

    def test_at_the_limit_is_authorised_one_more_is_rejected(self):
        at_limit = "a" * schema.MAX_TEXT
        self.assertTrue(self.decide(signed(at_limit))[0], "1,024 characters is within the limit")
        cases = {"event_id": signed(at_limit + "b"),
                 "reason": signed(str(uuid.uuid4()), reason="R" * (schema.MAX_TEXT + 1)),
                 "context": signed(str(uuid.uuid4()), context="c" * (schema.MAX_TEXT + 1)),
                 "k" * 64: signed(str(uuid.uuid4()), **{"k" * (schema.MAX_TEXT + 1): "v"})}
        for name, fields in cases.items():
            with self.subTest(field=name[:20]):
                self.assertEqual((False, f"too_long:{name}"), self.decide(fields))

    def test_long_extra_names_sharing_a_prefix_are_a_problem_not_a_silent_merge(self):
        prefix = "x" * schema.MAX_TEXT
        _, problems = schema.PanicEvent.from_fields({prefix + "1": "a", prefix + "2": "b"})
        self.assertIn(f"too_long:{'x' * 64}", problems)


class LongEventIdTest(EEWCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.start_eew("eew-limits", EEXIT_PANIC_HMAC_KEYS=KEYS)

    def publish_signed(self, event_id):
        return self.redis.xadd(schema.PANIC_STREAM, signed(event_id)).decode()

    def test_two_ids_sharing_1024_characters_over_the_limit_are_both_rejected(self):
        self.paper.set_position("BTCUSDT", 0.01)
        self.paper.clear_requests()
        shared = uuid.uuid4().hex * 32                               # 1,024 characters
        entries = [self.publish_signed(shared + tail) for tail in ("-first", "-second")]
        # One REJECTED report per batch read (issue 14, flood): one each, or one summary.
        def rejected():
            found = [ops.decoded(raw) for _id, raw in self.redis.xrange(schema.COMPLETED_STREAM)]
            found = [f for f in found if f.get("status") == "REJECTED"]
            ids = [entry for f in found for entry in json.loads(f["entry_ids"])]
            return found if ids == entries else None
        reports = wait_for(rejected, 30, message="both entries rejected")
        for report in reports:                                       # shown cut to the limit
            self.assertEqual(set(ops.report_event_ids(report)), {shared})
            self.assertIn("too_long:event_id", report["detail"])
        self.assertEqual([], self.paper.requests())
        self.assertEqual({("BTCUSDT", "BOTH"): 0.01}, self.paper.positions())
        self.assertFalse(self.redis.hexists(schema.PROCESSED_KEY, shared), "a ledger record under the cut id")

    def test_two_ids_at_the_limit_sharing_1023_characters_are_both_executed(self):
        shared = (uuid.uuid4().hex * 32)[:schema.MAX_TEXT - 1]
        for tail in ("1", "2"):
            with self.subTest(event=tail):
                self.paper.set_position("BTCUSDT", 0.01)
                self.publish_signed(shared + tail)
                [report] = self.wait_reports(shared + tail)
                self.assertEqual("FLAT", report.status, report.detail)
                wait_for(lambda: not self.paper.positions(), 10, message="flat on the exchange")


if __name__ == "__main__":
    unittest.main()

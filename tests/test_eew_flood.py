"""Issue 14, flood: 20,000 forged entries ahead of one signed panic. The signed panic ends FLAT,
the EEW stays alive, and the forgeries leave a bounded trace (a few summary reports, no ledger
field, nothing pending). The speed figure is bench/flood.py's, not asserted here."""

import math
import secrets
import time
import uuid

from eexit import eew, ops, schema, signing
from tests.harness import wait_for
from tests.test_eew import EEWCase

KEYS = "wd-1 watchdog " + "5a" * 32
FORGED = 20_000


class FloodTest(EEWCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.start_eew("eew-flood", EEXIT_PANIC_HMAC_KEYS=KEYS)

    def test_signed_panic_behind_20000_forgeries_ends_flat_with_a_bounded_trace(self):
        self.paper.set_position("BTCUSDT", 0.01)
        self.paper.set_position("ETHUSDT", -0.5)
        now = str(int(time.time() * 1000))
        pipe = self.redis.pipeline(transaction=False)
        for number in range(FORGED):
            pipe.xadd(schema.PANIC_STREAM, {"event_id": f"forged-{number}", "reason": "POSITIONS_UNGUARDED",
                                            "severity": "CRITICAL", "issued_by": "watchdog", "ts": now,
                                            "kid": "wd-1", "sig": secrets.token_hex(32)})
            if number % 1000 == 999:
                pipe.execute()
        pipe.execute()
        signed = signing.sign_fields({"event_id": str(uuid.uuid4()), "reason": "TEST", "severity": "CRITICAL",
                                      "issued_by": "watchdog", "ts": now}, "wd-1", signing.parse_keys(KEYS, "t"))
        self.redis.xadd(schema.PANIC_STREAM, signed)
        [report] = self.wait_reports(signed["event_id"], timeout_s=120)
        self.assertEqual(report.status, "FLAT")
        self.assertEqual(self.paper.positions(), {})

        def drained():
            group = self.redis.xinfo_groups(schema.PANIC_STREAM)[0]
            return group["lag"] == 0 and group["pending"] == 0
        wait_for(drained, 120, message=f"backlog drained\n{self.log('eew-flood')}")
        self.assertIsNone(self.processes["eew-flood"].poll(), "the EEW is alive")
        reports = [ops.decoded(raw) for _id, raw in self.redis.xrange(schema.COMPLETED_STREAM)]
        rejected = [fields for fields in reports if fields.get("status") == "REJECTED"]
        self.assertLessEqual(len(rejected), 2 * math.ceil(FORGED / eew.READ_BATCH) + 2)
        self.assertEqual(sum(int(r.get("rejected_count", 1)) for r in rejected), FORGED)
        for summary in rejected:
            self.assertLessEqual(len(ops.report_event_ids(summary)), eew.REJECTED_IDS_SHOWN)
        self.assertEqual(self.redis.hkeys(schema.PROCESSED_KEY), [signed["event_id"].encode()])

"""eexit/tamper.py: the lost-panic decisions, table-tested, and the same decisions fed from a
real redis-server's XINFO after each real attack (so the table matches what Redis 7 reports)."""

import unittest

from eexit import schema, tamper
from tests.harness import RedisTestCase

S, G = schema.PANIC_STREAM, schema.EEW_GROUP


def stream(added, length, last="5-0", first="1-0", deleted="0-0"):
    return {"entries-added": added, "length": length, "last-generated-id": last,
            "recorded-first-entry-id": first if length else "0-0", "max-deleted-entry-id": deleted}


def group(delivered="0-0", read=None):
    return {"name": G, "last-delivered-id": delivered, "entries-read": read}


class DecideTamperingTable(unittest.TestCase):
    CASES = [
        # (name, stream_info, group_info, expected reason or None)
        ("empty stream, new group", stream(0, 0, last="0-0"), group(), None),
        ("new group at 0, entries waiting", stream(3, 3), group(), None),
        ("everything delivered", stream(3, 3), group("3-0", 3), None),
        ("some delivered, rest waiting", stream(5, 5), group("2-0", 2), None),
        ("delivered entries trimmed", stream(5, 2, first="4-0"), group("4-0", 4), None),
        ("trim stopped at delivered entries", stream(5, 3, first="3-0"), group("4-0", 4), None),
        ("MAXLEN 0 after full delivery: the XADD's own entry is lost",
         stream(6, 0, last="6-0"), group("5-0", 5), "panic_trimmed_before_delivery"),
        ("MAXLEN 0 before any read", stream(3, 0, last="3-0"), group(), "panic_trimmed_before_delivery"),
        ("MAXLEN 1 over undelivered entries", stream(4, 1, first="4-0", last="4-0"), group("1-0", 1),
         "panic_trimmed_before_delivery"),
        ("stream exhausted", stream(2, 0, last=tamper.MAX_ID), group("1-0", 1), "panic_stream_exhausted"),
        ("XDEL of an undelivered entry", stream(3, 2, deleted="3-0"), group("2-0", 2),
         "panic_deleted_before_delivery"),
        ("XDEL of a delivered entry", stream(3, 2, deleted="2-0"), group("3-0", 3), None),
        ("group pre-created at $, nothing removed", stream(3, 3), group("3-0", None), None),
        ("group pre-created at $, entries removed", stream(3, 1, first="3-0"), group("2-0", None),
         "group_position_unverifiable"),
        ("no group", stream(3, 3), None, None),
        ("no stream", None, group(), None),
    ]

    def test_table(self):
        for name, stream_info, group_info, expected in self.CASES:
            with self.subTest(name):
                finding = tamper.decide_tampering(stream_info, group_info)
                self.assertEqual(finding.reason if finding else None, expected)

    def test_a_finding_already_acted_on_is_not_repeated_but_a_new_loss_is(self):
        first = tamper.decide_tampering(stream(4, 1, first="4-0", last="4-0"), group("1-0", 1))
        self.assertEqual(first.key, "trim-2")
        self.assertIsNone(tamper.decide_tampering(stream(5, 2, first="4-0", last="5-0"), group("1-0", 1),
                                                  {first.key}))
        again = tamper.decide_tampering(stream(6, 1, first="6-0", last="6-0"), group("1-0", 1), {first.key})
        self.assertEqual(again.key, "trim-4")
        self.assertEqual(again.event_id, "tamper-trim-4")

    def test_several_findings_come_one_after_the_other(self):
        both = stream(3, 0, last=tamper.MAX_ID, deleted="3-0")
        first = tamper.decide_tampering(both, group("1-0", 1))
        second = tamper.decide_tampering(both, group("1-0", 1), {first.key})
        self.assertEqual((first.reason, second.reason), ("panic_stream_exhausted", "panic_deleted_before_delivery"))

    def test_ids_compare_as_numbers_and_garbage_is_the_smallest(self):
        self.assertGreater(tamper.parse_id("10-0"), tamper.parse_id("9-5"))
        self.assertEqual(tamper.parse_id(b"7-3"), (7, 3))
        self.assertEqual(tamper.parse_id("junk"), (0, 0))
        self.assertEqual(tamper.parse_id(None), (0, 0))


class SkippedAndStrandedTable(unittest.TestCase):
    def test_skipped_entries(self):
        candidates = [("1-0", {"a": 1}, "ev-1"), ("2-0", {}, "ev-2"), ("3-0", {}, "ev-3"), ("4-0", {}, "ev-1")]
        records = {"ev-1": {"entry": "1-0", "stage": "done"}, "ev-2": None, "ev-3": None}
        self.assertEqual(tamper.skipped_entries(candidates, {"3-0"}, records), [("2-0", {})])

    def test_stranded_records(self):
        records = {
            "done": {"entry": "1-0", "stage": "done", "consumer": "me"},
            "gone": None,
            "mine-acked": {"entry": "2-0", "stage": "halted", "consumer": "me", "ts_started": 900},
            "mine-pending": {"entry": "3-0", "stage": "closing", "consumer": "me"},
            "other-fresh": {"entry": "4-0", "stage": "closing", "consumer": "b", "ts_updated": 990},
            "other-idle": {"entry": "5-0", "stage": "claimed", "consumer": "b", "ts_started": 100},
            "busloss-mine": {"entry": None, "stage": "halted", "consumer": "me", "ts_started": 999},
        }
        resume, drop = tamper.stranded_records(records, {"3-0"}, "me", now_ms=1000, idle_ms=500)
        self.assertEqual(resume, ["busloss-mine", "mine-acked", "other-idle"])
        self.assertEqual(drop, ["done", "gone"])


class RealRedisAttacks(RedisTestCase):
    """Each attack done to a real stream; the decision from the real XINFO replies."""

    def finding(self):
        found = tamper.decide_tampering(*tamper.read_stream_state(self.redis))
        return found.reason if found else None

    def deliver(self):
        return self.redis.xreadgroup(G, "eew", {S: ">"}, count=100)

    def setUp(self):
        super().setUp()
        self.redis.xgroup_create(S, G, id="0", mkstream=True)

    def test_normal_life_is_not_tampering(self):
        self.assertIsNone(self.finding())
        ids = [self.redis.xadd(S, {"event_id": f"e{i}"}) for i in range(3)]
        self.assertIsNone(self.finding())
        self.deliver()
        self.redis.xack(S, G, *ids)
        self.assertIsNone(self.finding())
        self.redis.xadd(S, {"event_id": "e3"})
        self.assertIsNone(self.finding())
        self.deliver()
        self.redis.xtrim(S, maxlen=1, approximate=False)          # delivered history trimmed: nothing lost
        self.assertIsNone(self.finding())

    def test_maxlen_zero_with_an_undelivered_panic(self):
        self.redis.xadd(S, {"event_id": "e0"})
        self.deliver()
        self.redis.xadd(S, {"event_id": "undelivered"})
        self.redis.xadd(S, {"x": "y"}, maxlen=0, approximate=False)
        self.assertEqual(self.finding(), "panic_trimmed_before_delivery")
        self.redis.xadd(S, {"event_id": "later"})
        self.deliver()                          # reading on does not hide the loss
        self.assertEqual(tamper.decide_tampering(*tamper.read_stream_state(self.redis)).key, "trim-2")

    def test_maxlen_one_served_to_the_blocked_reader_still_counts_the_loss(self):
        self.redis.xadd(S, {"event_id": "e0"})
        self.deliver()
        for i in range(3):
            self.redis.xadd(S, {"event_id": f"undelivered-{i}"})
        self.redis.xadd(S, {"x": "y"}, maxlen=1, approximate=False)
        self.deliver()                          # the EEW's read gets only the attacker's entry
        found = tamper.decide_tampering(*tamper.read_stream_state(self.redis))
        self.assertEqual((found.reason, found.key), ("panic_trimmed_before_delivery", "trim-3"))

    def test_maxlen_zero_when_everything_was_delivered(self):
        self.redis.xadd(S, {"event_id": "e0"})
        self.deliver()
        self.redis.xadd(S, {"x": "y"}, maxlen=0, approximate=False)
        self.assertEqual(self.finding(), "panic_trimmed_before_delivery")

    def test_exhausted_stream(self):
        self.redis.xadd(S, {"x": "y"}, id=tamper.MAX_ID, maxlen=0, approximate=False)
        self.assertEqual(self.finding(), "panic_stream_exhausted")

    def test_xdel_of_an_undelivered_entry(self):
        self.redis.xadd(S, {"event_id": "e0"})
        self.deliver()
        victim = self.redis.xadd(S, {"event_id": "e1"})
        self.redis.xadd(S, {"event_id": "e2"})
        self.redis.xdel(S, victim)
        self.assertEqual(self.finding(), "panic_deleted_before_delivery")

    def test_group_pre_created_at_dollar(self):
        self.redis.delete(S)
        self.redis.xadd(S, {"event_id": "e0"})
        self.redis.xgroup_create(S, G, id="$")
        self.assertIsNone(self.finding())       # nothing removed: skipped_entries() finds e0
        self.redis.xadd(S, {"x": "y"}, maxlen=0, approximate=False)
        self.assertEqual(self.finding(), "group_position_unverifiable")


if __name__ == "__main__":
    unittest.main()

"""EEW acceptance under failure: duplicates and redelivery, kill -9 mid-close, a second
instance taking over, Redis lost long enough for the EEW to flatten on its own authority."""

import json
import os
import signal
import uuid
from collections import defaultdict
from decimal import Decimal

from eexit import schema
from tests.harness import stop_process, wait_for
from tests.test_eew import EEWCase

SLOW_ORDERS_MS = 700


class DuplicateAndRedeliveryTest(EEWCase):
    def test_three_publishes_and_a_redelivery_after_restart_execute_once(self):
        self.paper.set_state({"seed": "BTCUSDT:0.01,ETHUSDT:-0.5"})
        # The halt guard reads the account too; this test counts the execution's own reads.
        no_guard = dict(EEXIT_HALT_GUARD_S=0)
        self.start_eew("eew-a", **no_guard)
        event_id = str(uuid.uuid4())
        entries = [self.publish(event_id) for _ in range(3)]
        reports = self.wait_reports(event_id, 3)
        self.assertEqual(["DUPLICATE", "DUPLICATE", "FLAT"], sorted(r.status for r in reports))
        for duplicate in (r for r in reports if r.status == "DUPLICATE"):
            self.assertIn(f"original_entry={entries[0]}", duplicate.detail)
        orders_after_first = len(self.order_requests())
        self.assertEqual(2, orders_after_first)

        stop_process(self.processes["eew-a"])
        self.redis.xgroup_setid(schema.PANIC_STREAM, schema.EEW_GROUP, "0")   # redeliver all
        fourth = self.publish(event_id)
        self.start_eew("eew-a", **no_guard)
        reports = self.wait_reports(event_id, 4)
        wait_for(lambda: self.redis.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)["pending"] == 0,
                 10, message="everything acknowledged")
        reports = self.reports(event_id)
        self.assertEqual(["DUPLICATE"] * 3 + ["FLAT"], sorted(r.status for r in reports))
        self.assertEqual(fourth, reports[-1].extra["entry_id"])
        self.assertEqual(orders_after_first, len(self.order_requests()), "no second execution")
        self.assertEqual(2, len(self.paper.requests(path="positionRisk")),
                         "one read and one verify: the account was read by one execution only")


class KillMidCloseTest(EEWCase):
    def test_kill_9_between_two_close_orders_then_restart_finishes_once(self):
        seed = {"BTCUSDT": Decimal("0.02"), "ETHUSDT": Decimal("-0.5"), "SOLUSDT": Decimal("30")}
        self.paper.set_state({"seed": {k: str(v) for k, v in seed.items()}})
        self.paper.add_fault(kind="latency", ms=SLOW_ORDERS_MS, path="/fapi/v1/order")
        process = self.start_eew("eew-a", EEXIT_CLOSE_CONCURRENCY=1)
        event_id = str(uuid.uuid4())
        self.publish(event_id)
        wait_for(lambda: len(self.paper.positions()) == 2, 15, message="first close filled")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)
        self.assertEqual([], self.reports(event_id))
        pending = self.redis.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)
        self.assertEqual(1, pending["pending"], "the entry stays pending across the crash")

        self.paper.clear_faults()
        self.start_eew("eew-a")
        [report] = self.wait_reports(event_id)
        self.assertEqual("FLAT", report.status, report)
        self.assertEqual((3, 3, 0), (report.positions_total, report.positions_closed,
                                     report.positions_failed))
        self.assertEqual({}, self.paper.positions())
        filled = defaultdict(Decimal)
        ids = set()
        for request in self.order_requests():
            if request["status"] == 200:
                filled[request["params"]["symbol"]] += Decimal(request["params"]["quantity"])
                ids.add(request["params"]["newClientOrderId"])
        self.assertEqual({k: abs(v) for k, v in seed.items()}, dict(filled), "nothing doubled")
        self.assertEqual(3, len(ids))
        wait_for(lambda: self.redis.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)["pending"] == 0,
                 5, message="acknowledged after the report")
        self.assertEqual(1, len(self.reports(event_id)))


class RedisKilledBeforeTheAckTest(EEWCase):
    """Redis dies while the close runs, so neither the report nor the XACK can be written;
    it comes back with its data (AOF, fsync always): exactly one report, written from the
    journal, the entry acknowledged, nothing closed twice."""

    redis_args = ("--appendonly", "yes", "--appendfsync", "always")

    def test_redis_killed_between_the_close_and_the_report_then_back_gives_one_report(self):
        self.paper.set_state({"seed": "BTCUSDT:0.02,ETHUSDT:-0.5,SOLUSDT:30"})
        self.paper.add_fault(kind="latency", ms=SLOW_ORDERS_MS, path="/fapi/v1/order")
        self.start_eew("eew-a", EEXIT_CLOSE_CONCURRENCY=1)
        journal = os.path.join(self.tmp, "eew-a-journal.jsonl")
        event_id = str(uuid.uuid4())
        self.publish(event_id)
        wait_for(lambda: len(self.paper.positions()) == 2, 15, message="first close filled")
        self.redis_server.kill()

        def journaled():
            if not os.path.exists(journal):
                return None
            with open(journal, encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip() and event_id in line] or None
        try:
            [item] = wait_for(journaled, 20, message=f"report journaled\n{self.log('eew-a')}")
            self.assertEqual(("report", "FLAT"), (item["type"], item["report"]["status"]))
        finally:
            self.redis_server.start()
        [report] = self.wait_reports(event_id)
        self.assertEqual("FLAT", report.status)
        wait_for(lambda: self.redis.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)["pending"] == 0, 10,
                 message="acknowledged after the report")
        self.assertEqual(1, len(self.reports(event_id)))
        self.assertEqual({}, self.paper.positions())
        self.assertEqual(3, len([r for r in self.order_requests() if r["status"] == 200]), "nothing doubled")


    def test_redis_lost_mid_batch_leaves_the_rest_pending_and_no_loop_error(self):
        # Finding 2: two panics in one batch; Redis dies during the first one's close. The
        # second is not handled without Redis (it used to fail with AttributeError on
        # self.redis and escape to loop_error); after Redis returns both end with one report.
        self.paper.set_state({"seed": "BTCUSDT:0.02,ETHUSDT:-0.5,SOLUSDT:30"})
        self.paper.add_fault(kind="latency", ms=SLOW_ORDERS_MS, path="/fapi/v1/order")
        self.start_eew("eew-b", EEXIT_CLOSE_CONCURRENCY=1, EEXIT_BLOCK_MS=1000)
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        pipe = self.redis.pipeline(transaction=True)
        for event_id in (first, second):
            pipe.xadd(schema.PANIC_STREAM, {"event_id": event_id, "reason": "TEST", "severity": "CRITICAL",
                                            "issued_by": "watchdog", "ts": "1"})
        pipe.execute()
        wait_for(lambda: len(self.paper.positions()) == 2, 15, message="first close filled")
        self.redis_server.kill()
        try:
            wait_for(lambda: "redis_lost" in self.log("eew-b"), 20, message="the EEW saw Redis go")
        finally:
            self.redis_server.start()
        for event_id in (first, second):
            self.assertEqual(1, len(self.wait_reports(event_id)))
        wait_for(lambda: self.redis.xpending(schema.PANIC_STREAM, schema.EEW_GROUP)["pending"] == 0, 10,
                 message="both acknowledged")
        self.assertEqual({}, self.paper.positions())
        with open(os.path.join(self.tmp, "eew-b.log"), encoding="utf-8") as handle:
            whole = handle.read()
        self.assertNotIn("loop_error", whole)
        self.assertNotIn("AttributeError", whole)


class TwoInstancesTest(EEWCase):
    def test_second_instance_claims_the_entry_of_a_killed_one_and_finishes(self):
        self.paper.set_state({"seed": "BTCUSDT:0.02,ETHUSDT:-0.5,SOLUSDT:30,XRPUSDT:500"})
        self.paper.add_fault(kind="latency", ms=SLOW_ORDERS_MS, path="/fapi/v1/order")
        for consumer in ("eew-a", "eew-b"):
            self.start_eew(consumer, EEXIT_CLOSE_CONCURRENCY=1, EEXIT_CLAIM_IDLE_MS=1000)
        event_id = str(uuid.uuid4())
        self.publish(event_id)

        def owner():
            rows = self.redis.xpending_range(schema.PANIC_STREAM, schema.EEW_GROUP, "-", "+", 10)
            return rows[0]["consumer"].decode() if rows else None
        first = wait_for(owner, 10, message="an instance took the entry")
        wait_for(lambda: len(self.paper.positions()) <= 3, 15, message="first close filled")
        # While the owner works, its entry must not look idle to the other instance.
        self.assertEqual(first, owner())
        self.processes[first].send_signal(signal.SIGKILL)
        self.processes[first].wait(timeout=5)
        self.paper.clear_faults()

        [report] = self.wait_reports(event_id)
        survivor = "eew-b" if first == "eew-a" else "eew-a"
        self.assertEqual("FLAT", report.status, report)
        self.assertEqual(survivor, report.extra["consumer"])
        self.assertEqual(4, report.positions_total)
        self.assertEqual({}, self.paper.positions())


class BusLossTest(EEWCase):
    def test_redis_lost_long_enough_flattens_journals_and_publishes_on_return(self):
        self.paper.set_state({"seed": "BTCUSDT:0.01,ETHUSDT:-0.5"})
        self.start_eew("eew-a", EEXIT_BUS_LOSS_CLOSE_S=1.5)
        journal = os.path.join(self.tmp, "eew-a-journal.jsonl")
        self.redis_server.kill()
        try:
            wait_for(lambda: self.paper.positions() == {}, 20, message="flattened on bus loss")

            def journaled():
                with open(journal, encoding="utf-8") as handle:
                    return [json.loads(line) for line in handle if line.strip()]
            [item] = wait_for(journaled, 10, message="report journaled")
            self.assertEqual("report", item["type"])
            self.assertEqual("FLAT", item["report"]["status"])
            self.assertEqual("BUS_LOST", item["report"]["reason"])
        finally:
            self.redis_server.start()
        [report] = self.wait_reports(item["key"])
        self.assertEqual(("FLAT", 2, 2), (report.status, report.positions_total,
                                          report.positions_closed))
        self.assertEqual(b"true", self.redis.hget(schema.TRADING_STATE_KEY, "halted"))
        self.assertEqual(item["key"].encode(), self.redis.hget(schema.TRADING_STATE_KEY, "event_id"))
        wait_for(lambda: [i["type"] for i in journaled()] == ["report", "published"], 5,
                 message="journal marks the report published")

        # The group was lost with Redis; the EEW recreated it and is not deaf.
        self.paper.set_position("SOLUSDT", 10)
        event_id = str(uuid.uuid4())
        self.publish(event_id)
        [after] = self.wait_reports(event_id)
        self.assertEqual("FLAT", after.status)
        self.assertEqual({}, self.paper.positions())


if __name__ == "__main__":
    import unittest
    unittest.main()

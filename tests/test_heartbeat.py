"""eexit.heartbeat.Heartbeat: what a user's own bot publishes, read back through the schema."""

import unittest

from eexit import schema
from eexit.heartbeat import Heartbeat
from tests.harness import RedisTestCase


class HeartbeatPublisherTest(RedisTestCase):
    def read_all(self, stream=schema.HEARTBEAT_STREAM):
        return [schema.Heartbeat.from_fields(fields) for _id, fields in self.redis.xrange(stream)]

    def test_three_lines_give_a_schema_correct_beat(self):
        beat = Heartbeat.from_env("my_bot", env={"REDIS_URL": self.redis_server.url})
        self.addCleanup(beat.client.close)
        beat.ok(active_positions=3, last_decision_ts=1_700_000_000_000, latency_ms=12.5)
        [(parsed, problems)] = self.read_all()
        self.assertEqual(problems, [])
        self.assertEqual((parsed.service_id, parsed.status, parsed.active_positions, parsed.last_decision_ts,
                          parsed.latency_ms), ("my_bot", "OK", 3, 1_700_000_000_000, 12.5))
        self.assertIsNotNone(parsed.ts)

    def test_unknown_count_is_omitted_not_zero(self):
        beat = Heartbeat(self.redis, "my_bot")
        beat.degraded(active_positions=None, last_decision_ts=None, extra={"why": "fetch failed"})
        [(parsed, problems)] = self.read_all()
        self.assertEqual(parsed.status, "DEGRADED")
        self.assertIsNone(parsed.active_positions)
        self.assertIn("missing:active_positions", problems)
        self.assertEqual(parsed.extra, {"why": "fetch failed"})

    def test_other_stream_and_trimming(self):
        beat = Heartbeat(self.redis, "eew", stream=schema.EEW_HEARTBEAT_STREAM)
        for _ in range(1200):
            beat.ok(0, 1)
        self.assertLess(self.redis.xlen(schema.EEW_HEARTBEAT_STREAM), 1200)
        self.assertEqual(self.redis.xlen(schema.HEARTBEAT_STREAM), 0)

    def test_every_beat_carries_this_process_instance_and_a_clean_stop_says_stopped(self):
        import subprocess
        import sys
        from eexit.heartbeat import INSTANCE
        from tests.harness import python_env
        first, second = Heartbeat(self.redis, "my_bot"), Heartbeat(self.redis, "my_bot")
        first.ok(1, 1)
        second.stopped(1, 1, 0.0)                   # one process, one identity
        [(ok, _), (stopped, problems)] = self.read_all()
        self.assertEqual(problems, [])
        self.assertEqual((ok.instance, stopped.instance, stopped.status), (INSTANCE, INSTANCE, "STOPPED"))
        other = subprocess.run([sys.executable, "-c", "from eexit.heartbeat import INSTANCE; print(INSTANCE)"],
                               env=python_env(), capture_output=True, text=True, timeout=30).stdout.strip()
        self.assertNotEqual(other, INSTANCE)        # a new process, a new identity
        self.assertRegex(other, "^[0-9a-f]{16}$")


if __name__ == "__main__":
    unittest.main()

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


if __name__ == "__main__":
    unittest.main()

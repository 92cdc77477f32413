"""bus.py against a real redis-server: URLs, timeouts, groups that survive a Redis restart."""

import os
import tempfile
import threading
import unittest

import redis

from eexit import bus, schema
from eexit.config import ConfigError
from tests.harness import RedisTestCase, wait_for


class Urls(unittest.TestCase):
    def test_default_and_schemes(self):
        self.assertEqual(bus.redis_url({}), bus.DEFAULT_URL)
        for url in ("redis://h:1/0", "rediss://h:1/0", "unix:///run/redis.sock"):
            self.assertEqual(bus.redis_url({"REDIS_URL": url}), url)
        with self.assertRaises(ConfigError) as caught:
            bus.redis_url({"REDIS_URL": "http://h"})
        self.assertIn("REDIS_URL", str(caught.exception))

    def test_timeouts_and_health_checks_always_set(self):
        client = bus.connect("redis://127.0.0.1:1/0", env={})
        kwargs = client.connection_pool.connection_kwargs
        self.assertEqual(kwargs["socket_timeout"], bus.READ_TIMEOUT_S)
        self.assertEqual(kwargs["socket_connect_timeout"], bus.CONNECT_TIMEOUT_S)
        self.assertEqual(kwargs["health_check_interval"], bus.HEALTH_CHECK_S)

    def test_password_from_credentials_directory_wins(self):
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "redis_password"), "w") as f:
                f.write("s3cret\n")
            client = bus.connect("redis://:inurl@127.0.0.1:1/0", env={"CREDENTIALS_DIRECTORY": directory})
            self.assertEqual(client.connection_pool.connection_kwargs["password"], "s3cret")

    def test_block_time_must_stay_below_read_timeout(self):
        with self.assertRaises(ValueError):
            bus.read_group(None, "s", "g", "c", block_ms=bus.BLOCK_MS_MAX + 1)


class Groups(RedisTestCase):
    def client(self):
        return bus.connect(self.redis_server.url, env={})

    def test_ensure_group_is_idempotent(self):
        client = self.client()
        self.assertTrue(bus.ensure_group(client, schema.PANIC_STREAM, schema.EEW_GROUP))
        self.assertFalse(bus.ensure_group(client, schema.PANIC_STREAM, schema.EEW_GROUP))
        groups = client.xinfo_groups(schema.PANIC_STREAM)
        self.assertEqual([g["name"] for g in groups], [schema.EEW_GROUP.encode()])

    def test_entry_published_before_the_group_exists_is_delivered(self):
        client = self.client()
        client.xadd(schema.PANIC_STREAM, {"event_id": "early"})
        bus.ensure_group(client, schema.PANIC_STREAM, schema.EEW_GROUP)
        entries = bus.read_group(client, schema.PANIC_STREAM, schema.EEW_GROUP, "c1", block_ms=100)
        self.assertEqual(entries[0][1][b"event_id"], b"early")

    def test_pending_then_claim_idle(self):
        client = self.client()
        bus.ensure_group(client, schema.PANIC_STREAM, schema.EEW_GROUP)
        client.xadd(schema.PANIC_STREAM, {"event_id": "p"})
        first = bus.read_group(client, schema.PANIC_STREAM, schema.EEW_GROUP, "dead", block_ms=100)
        self.assertEqual(len(first), 1)
        again = bus.read_group(client, schema.PANIC_STREAM, schema.EEW_GROUP, "dead", block_ms=100, pending=True)
        self.assertEqual([e for e, _ in again], [e for e, _ in first])
        self.assertEqual(bus.claim_idle(client, schema.PANIC_STREAM, schema.EEW_GROUP, "dead", 0), [])
        claimed = bus.claim_idle(client, schema.PANIC_STREAM, schema.EEW_GROUP, "alive", 0)
        self.assertEqual([e for e, _ in claimed], [e for e, _ in first])

    def test_group_recreated_after_redis_restart_and_blocked_reader_resumes(self):
        client = self.client()
        bus.ensure_group(client, schema.PANIC_STREAM, schema.EEW_GROUP)
        received = []
        errors = []
        stop = threading.Event()

        def reader():
            # The shape of a daemon loop: on a Redis error, reconnect and ensure the group.
            reader_client = self.client()
            while not stop.is_set():
                try:
                    for entry_id, fields in bus.read_group(reader_client, schema.PANIC_STREAM,
                                                           schema.EEW_GROUP, "c1", block_ms=200):
                        received.append(fields.get(b"event_id"))
                        reader_client.xack(schema.PANIC_STREAM, schema.EEW_GROUP, entry_id)
                except bus.REDIS_ERRORS as exc:
                    errors.append(type(exc).__name__)
                    stop.wait(0.05)
                    try:
                        bus.ensure_group(reader_client, schema.PANIC_STREAM, schema.EEW_GROUP)
                    except bus.REDIS_ERRORS:
                        pass

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(stop.set)
        client.xadd(schema.PANIC_STREAM, {"event_id": "before"})
        wait_for(lambda: b"before" in received, 5, message="entry before restart")

        self.redis_server.restart()        # no persistence: stream and group are gone
        wait_for(lambda: errors, 5, message="the reader to notice Redis went away")
        publisher = self.client()
        wait_for(lambda: publisher.exists(schema.PANIC_STREAM), 5, message="group recreated with MKSTREAM")
        self.assertEqual(publisher.xinfo_groups(schema.PANIC_STREAM)[0]["name"], schema.EEW_GROUP.encode())
        publisher.xadd(schema.PANIC_STREAM, {"event_id": "after"})
        wait_for(lambda: b"after" in received, 5, message="entry after restart")

    def test_read_group_recreates_a_lost_group(self):
        client = self.client()
        bus.ensure_group(client, schema.PANIC_STREAM, schema.EEW_GROUP)
        client.xgroup_destroy(schema.PANIC_STREAM, schema.EEW_GROUP)
        client.xadd(schema.PANIC_STREAM, {"event_id": "x"})
        entries = bus.read_group(client, schema.PANIC_STREAM, schema.EEW_GROUP, "c1", block_ms=100)
        self.assertEqual(len(entries), 1)

    def test_publish_and_server_time(self):
        client = self.client()
        entry_id = bus.publish(client, schema.HEARTBEAT_STREAM,
                               schema.Heartbeat("s", "OK", 0, 1, 2.0, 3), maxlen=schema.HEARTBEAT_MAXLEN)
        self.assertEqual(schema.entry_id_ms(entry_id) // 1000, bus.server_time_ms(client) // 1000)

    def test_unreachable_redis_raises_quickly_instead_of_hanging(self):
        client = bus.connect("redis://127.0.0.1:1/0", env={})
        with self.assertRaises(redis.ConnectionError):
            client.ping()


if __name__ == "__main__":
    unittest.main()

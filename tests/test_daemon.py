"""The shared daemon pieces that are pure: backoff, error classification and causes, rate-limited
cause logging, REDIS_URL checks, journal line validation."""

import io
import json
import unittest

import redis

from eexit import bus, daemon
from eexit.config import ConfigError
from eexit.eew import _journal_item
from eexit.log import Logger


class BackoffTest(unittest.TestCase):
    def test_doubles_to_the_cap_and_resets(self):
        backoff = daemon.Backoff(0.1, 0.5)
        self.assertEqual([backoff.next() for _ in range(5)], [0.1, 0.2, 0.4, 0.5, 0.5])
        backoff.reset()
        self.assertEqual(backoff.next(), 0.1)


class ClassificationTest(unittest.TestCase):
    TRANSPORT = [redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
                 redis.TimeoutError("Timeout reading from socket"), redis.BusyLoadingError("LOADING"),
                 redis.AuthenticationError("invalid username-password pair"),
                 redis.ReadOnlyError("You can't write against a read only replica."),
                 redis.ResponseError("MASTERDOWN Link with MASTER is down"), OSError("reset")]
    COMMAND = [redis.exceptions.NoPermissionError("this user has no permissions to run the 'xack' command"),
               redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
               redis.ResponseError("ERR unknown command 'XAUTOCLAIM'"),
               redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
               redis.ResponseError("BUSY Redis is busy running a script")]

    def test_transport_and_command_errors(self):
        for exc in self.TRANSPORT:
            with self.subTest(exc=exc):
                self.assertTrue(bus.is_transport_error(exc))
                self.assertIsInstance(exc, bus.REDIS_ERRORS)
        for exc in self.COMMAND:
            with self.subTest(exc=exc):
                self.assertFalse(bus.is_transport_error(exc))
                self.assertIsInstance(exc, bus.REDIS_ERRORS)

    def test_causes_name_the_reason_without_the_message(self):
        cases = {"connection_refused": self.TRANSPORT[0], "timeout": self.TRANSPORT[1],
                 "authentication": self.TRANSPORT[3], "WRONGTYPE": self.COMMAND[1], "OOM": self.COMMAND[3],
                 "dns": redis.ConnectionError("Error -2 connecting to nohost:6379. Name or service not known.")}
        for expected, exc in cases.items():
            with self.subTest(expected=expected):
                self.assertEqual(daemon.cause(exc), expected)

    def test_causes_are_logged_at_once_then_rate_limited_per_cause(self):
        out, now = io.StringIO(), [0.0]
        trouble = daemon.RedisTrouble(Logger("t", out), interval_s=30, monotonic=lambda: now[0])
        self.assertEqual(trouble.report(self.TRANSPORT[0], "connect"), "transport")
        self.assertEqual(trouble.report(self.TRANSPORT[0], "connect"), "transport")
        self.assertEqual(trouble.report(self.COMMAND[1], "HSETNX", "k"), "command")
        now[0] = 31.0
        trouble.report(self.TRANSPORT[0], "connect")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("event=redis_unreachable", lines[0])
        self.assertIn("cause=connection_refused", lines[0])
        self.assertIn("event=redis_command_error command=HSETNX key=k error=", lines[1])


class RedisUrlTest(unittest.TestCase):
    def test_accepted_forms(self):
        for url in ("redis://127.0.0.1:6379/0", "redis://u:p@127.0.0.1/3", "rediss://127.0.0.1:6380/1",
                    "unix:///run/redis/redis.sock", "unix:///run/redis/redis.sock?db=2",
                    "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/0"):
            with self.subTest(url=url):
                self.assertEqual(bus.redis_url({"REDIS_URL": url}), url)

    def test_refused_forms_name_redis_url(self):
        for url in ("redis://127.0.0.1:99999/0", "redis://127.0.0.1:0/0", "redis://127.0.0.1:x/0",
                    "redis://127.0.0.1:6379/abc", "redis://:6379/0", "unix://", "unix:///s.sock?db=a",
                    "http://127.0.0.1/0", "redis+sentinel://127.0.0.1:26379/"):
            with self.subTest(url=url), self.assertRaises(ConfigError) as caught:
                bus.redis_url({"REDIS_URL": url})
            self.assertIn("REDIS_URL", str(caught.exception))

    def test_unix_socket_client_has_no_keepalive_and_keeps_its_path(self):
        client = bus.connect("unix:///run/redis/redis.sock?db=0", env={"REDIS_PASSWORD": "x"})
        kwargs = client.connection_pool.connection_kwargs
        self.assertEqual(kwargs["path"], "/run/redis/redis.sock")
        self.assertNotIn("socket_keepalive", kwargs)
        self.assertEqual(kwargs["password"], "x")


class JournalLineTest(unittest.TestCase):
    GOOD = {"type": "report", "key": "e1", "entry_id": "1-0", "done": {}, "report": {"status": "FLAT"},
            "halt": {"halted": "true"}}

    def test_usable_and_unusable_lines(self):
        self.assertEqual(_journal_item(json.dumps(self.GOOD)), self.GOOD)
        self.assertEqual(_journal_item(json.dumps({"type": "published", "key": "e1"}))["key"], "e1")
        broken = [dict(self.GOOD, halt=None), {k: v for k, v in self.GOOD.items() if k != "done"},
                  dict(self.GOOD, report={"status": 1}), dict(self.GOOD, entry_id=5), dict(self.GOOD, key=3),
                  dict(self.GOOD, type="other")]
        for item in broken:
            with self.subTest(item=item):
                self.assertIsNone(_journal_item(json.dumps(item)))
        for line in ('{"type": "rep', "[]", "null", ""):
            self.assertIsNone(_journal_item(line))


if __name__ == "__main__":
    unittest.main()

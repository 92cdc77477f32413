"""eexit.guard.is_halted: trading is allowed only when Redis positively says so."""

import redis

from eexit import schema
from eexit.guard import is_halted
from tests.harness import RedisTestCase, free_port


class IsHaltedTest(RedisTestCase):
    def test_table(self):
        rows = [
            (None, True),                       # no state written yet
            ({"reason": "x"}, True),            # no halted field
            ({"halted": "true"}, True),
            ({"halted": "1"}, True),
            ({"halted": "maybe"}, True),
            ({"halted": ""}, True),
            ({"halted": "false"}, False),
            ({"halted": "FALSE "}, False),
            ({"halted": "0"}, False),           # eexit.schema reads "0" as False too
        ]
        text_client = self.redis_server.client(decode_responses=True)
        self.addCleanup(text_client.close)
        for fields, halted in rows:
            with self.subTest(fields=fields):
                self.redis.delete(schema.TRADING_STATE_KEY)
                if fields:
                    self.redis.hset(schema.TRADING_STATE_KEY, mapping=fields)
                self.assertIs(is_halted(self.redis), halted)
                self.assertIs(is_halted(text_client), halted)

    def test_wrong_type_is_halted(self):
        self.redis.set(schema.TRADING_STATE_KEY, "false")
        self.assertIs(is_halted(self.redis), True)

    def test_unreachable_redis_is_halted(self):
        client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
        self.addCleanup(client.close)
        self.assertIs(is_halted(client), True)

    def test_redis_stopped_after_allowing_is_halted(self):
        self.redis.hset(schema.TRADING_STATE_KEY, "halted", "false")
        server = type(self.redis_server)().start()
        client = server.client()
        client.hset(schema.TRADING_STATE_KEY, "halted", "false")
        self.assertIs(is_halted(client), False)
        server.stop()
        self.assertIs(is_halted(client), True)
        client.close()

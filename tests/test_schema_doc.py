"""Every redis-cli example in docs/REDIS_STREAMS_SCHEMA.md runs against a real redis-server and
what it stores parses with schema.py without problems: the doc cannot drift from the code."""

import os
import shlex

from eexit import ops, resume, schema, signing
from tests.harness import ROOT, RedisTestCase

DOC = os.path.join(ROOT, "docs", "REDIS_STREAMS_SCHEMA.md")

PARSER_BY_KEY = {
    schema.PANIC_STREAM: schema.PanicEvent,
    schema.COMPLETED_STREAM: schema.CompletionReport,
    schema.HEARTBEAT_STREAM: schema.Heartbeat,
    schema.TRADING_STATE_KEY: schema.TradingState,
}

RESUME_FIELDS = {
    resume.REQUEST_STREAM: set(ops.build_request("alice", "ev", False, signing.KeyRing())),
    resume.VERDICT_STREAM: set(resume.verdict_fields("r", "ev", "alice", [])),
}


def doc_commands():
    with open(DOC, encoding="utf-8") as doc:
        for line in doc:
            line = line.strip()
            if line.startswith("redis-cli "):
                yield shlex.split(line)[1:]


def as_map(flat_pairs):
    if isinstance(flat_pairs, dict):
        return flat_pairs
    return dict(zip(flat_pairs[::2], flat_pairs[1::2]))


class SchemaDocExamples(RedisTestCase):
    def test_doc_has_examples_for_every_message(self):
        keys = {args[1] for args in doc_commands()}
        self.assertTrue(set(PARSER_BY_KEY) <= keys, keys)

    def test_every_example_runs_and_parses_without_problems(self):
        parsed = 0
        for args in doc_commands():
            reply = self.redis.execute_command(*args)
            command, key = args[0].upper(), args[1]
            parser = PARSER_BY_KEY.get(key)
            if command in ("XRANGE", "XREVRANGE"):
                self.assertTrue(reply, args)
                for _entry_id, fields in reply:
                    _message, problems = parser.from_fields(as_map(fields))
                    self.assertEqual(problems, [], args)
                    parsed += 1
            elif command == "HGETALL":
                _message, problems = parser.from_fields(as_map(reply))
                self.assertEqual(problems, [], args)
                parsed += 1
        self.assertGreaterEqual(parsed, 6)

    def test_doc_examples_are_what_the_code_writes(self):
        """Every field an XADD example writes is one the dataclass knows (or keeps as extra);
        required fields missing from an example show up as parse problems above."""
        for args in doc_commands():
            if args[0].upper() != "XADD":
                continue
            key = args[1]
            rest = args[2:]
            if rest[0].upper() == "MAXLEN":
                rest = rest[3:]
            fields = as_map(rest[1:])
            if key in RESUME_FIELDS:       # eexit/resume.py builds these, not a schema dataclass
                self.assertEqual(set(fields), RESUME_FIELDS[key], key)
                continue
            message, _ = PARSER_BY_KEY[key].from_fields(fields)
            documented_extra = {"context"}
            self.assertEqual(set(message.extra) - documented_extra, set(), key)
            self.assertTrue(set(fields) - {"source"} <= set(message.to_fields()), key)

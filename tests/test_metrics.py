"""Metrics: a strict parser written to the Prometheus text exposition format 0.0.4, the pure
`render` over hand-made snapshots, and the file the audit daemon writes after a drill-like
sequence, compared value by value with the state in Redis."""

import math
import os
import re
import shutil
import tempfile
import unittest

from eexit import audit, metrics, schema
from tests.harness import RedisTestCase, python_env, start_module, stop_process, wait_for

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


class FormatError(ValueError):
    pass


def parse_value(text):
    if text in ("NaN", "+Inf", "-Inf"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not FLOAT.match(text):
        raise FormatError(f"bad value {text!r}")
    return float(text)


def parse_labels(text, where):
    """`text` starts just after '{'; returns (labels, rest after '}')."""
    labels, i = {}, 0
    while True:
        if text[i:i + 1] == "}":
            return labels, text[i + 1:]
        j = text.find("=", i)
        if j < 0:
            raise FormatError(f"{where}: label without '='")
        name = text[i:j]
        if not LABEL_NAME.match(name) or name.startswith("__"):
            raise FormatError(f"{where}: bad label name {name!r}")
        if name in labels:
            raise FormatError(f"{where}: label {name} twice")
        if text[j + 1:j + 2] != '"':
            raise FormatError(f"{where}: label value not quoted")
        value, k = [], j + 2
        while True:
            if k >= len(text):
                raise FormatError(f"{where}: unterminated label value")
            ch = text[k]
            if ch == "\\":
                escaped = text[k + 1:k + 2]
                if escaped not in ('\\', '"', "n"):
                    raise FormatError(f"{where}: bad escape \\{escaped}")
                value.append("\n" if escaped == "n" else escaped)
                k += 2
            elif ch == '"':
                k += 1
                break
            elif ch == "\n":
                raise FormatError(f"{where}: raw newline in a label value")
            else:
                value.append(ch)
                k += 1
        labels[name] = "".join(value)
        if text[k:k + 1] == ",":
            k += 1
        elif text[k:k + 1] != "}":
            raise FormatError(f"{where}: expected ',' or '}}' after label {name}")
        i = k


def parse_exposition(text):
    """{name: {"type", "help", "samples": {frozenset(labels): value}}}, or FormatError.

    Rules enforced: the text ends with a newline; HELP and TYPE at most once per name, TYPE
    before the name's first sample; a family's samples are contiguous; valid metric and label
    names (no reserved `__`), only the escapes \\\\ \\" \\n in label values (\\\\ \\n in HELP);
    values are floats or NaN/+Inf/-Inf; an optional integer timestamp; no duplicate series;
    this exporter uses only gauges and counters, so a sample's name is its family's name."""
    if not text.endswith("\n"):
        raise FormatError("does not end with a newline")
    families, finished, current = {}, set(), None
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        where = f"line {number}"
        if line == "":
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not METRIC_NAME.match(name):
                    raise FormatError(f"{where}: bad metric name {name!r}")
                family = families.setdefault(name, {"type": None, "help": None, "samples": {}})
                if name in finished or family["samples"]:
                    raise FormatError(f"{where}: {parts[1]} for {name} after its samples")
                if parts[1] == "TYPE":
                    if family["type"] is not None:
                        raise FormatError(f"{where}: second TYPE for {name}")
                    if len(parts) != 4 or parts[3] not in TYPES:
                        raise FormatError(f"{where}: bad type")
                    family["type"] = parts[3]
                else:
                    if family["help"] is not None:
                        raise FormatError(f"{where}: second HELP for {name}")
                    help_text = parts[3] if len(parts) == 4 else ""
                    if re.fullmatch(r"([^\\]|\\[\\n])*", help_text) is None:
                        raise FormatError(f"{where}: bad escape in HELP")
                    family["help"] = help_text
                if current is not None and current != name:
                    finished.add(current)
                current = name
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            labels, rest = parse_labels(line[brace + 1:], where)
            if not rest.startswith(" "):
                raise FormatError(f"{where}: no space before the value")
            rest = rest[1:]
        else:
            if space < 0:
                raise FormatError(f"{where}: no value")
            name, labels, rest = line[:space], {}, line[space + 1:]
        if not METRIC_NAME.match(name):
            raise FormatError(f"{where}: bad metric name {name!r}")
        fields = rest.split(" ")
        if len(fields) not in (1, 2) or "" in fields:
            raise FormatError(f"{where}: expected 'value [timestamp]', got {rest!r}")
        value = parse_value(fields[0])
        if len(fields) == 2 and not re.fullmatch(r"-?\d+", fields[1]):
            raise FormatError(f"{where}: bad timestamp {fields[1]!r}")
        if name in finished:
            raise FormatError(f"{where}: samples of {name} are not contiguous")
        if current is not None and current != name:
            finished.add(current)
        current = name
        family = families.setdefault(name, {"type": None, "help": None, "samples": {}})
        if family["type"] not in (None, "gauge", "counter", "untyped"):
            raise FormatError(f"{where}: unexpected type {family['type']}")
        key = frozenset(labels.items())
        if key in family["samples"]:
            raise FormatError(f"{where}: duplicate series {name}{labels}")
        family["samples"][key] = value
    return families


def value_of(families, name, **labels):
    return families[name]["samples"][frozenset(labels.items())]


class ParserTests(unittest.TestCase):
    """The parser is only worth something if it rejects what the format forbids."""

    GOOD = '# HELP a_b x \\\\ y\n# TYPE a_b gauge\na_b{l="q\\"\\n\\\\"} 1.5e3\na_b 2 1700000000000\nc NaN\n'

    def test_accepts_the_format(self):
        families = parse_exposition(self.GOOD)
        self.assertEqual(value_of(families, "a_b", l='q"\n\\'), 1500.0)
        self.assertEqual(value_of(families, "a_b"), 2.0)
        self.assertTrue(math.isnan(value_of(families, "c")))

    def test_rejects_violations(self):
        bad = {
            "no final newline": "a 1",
            "bad name": "1a 1\n",
            "bad value": "a one\n",
            "bad escape": 'a{l="\\t"} 1\n',
            "unquoted label": "a{l=1} 1\n",
            "reserved label": 'a{__l="x"} 1\n',
            "duplicate label": 'a{l="x",l="y"} 1\n',
            "duplicate series": "a 1\na 2\n",
            "split family": "a 1\nb 1\na{l=\"x\"} 2\n",
            "type after samples": "a 1\n# TYPE a gauge\n",
            "two types": "# TYPE a gauge\n# TYPE a gauge\na 1\n",
            "unknown type": "# TYPE a meter\na 1\n",
            "bad timestamp": "a 1 soon\n",
            "two spaces": "a  1\n",
            "bad help escape": "# HELP a x \\t\na 1\n",
            "unterminated": 'a{l="x} 1\n',
        }
        for case, text in bad.items():
            with self.subTest(case=case):
                with self.assertRaises(FormatError):
                    parse_exposition(text)


def beat(status="OK", positions="0"):
    return {"service_id": "x", "status": status, "active_positions": positions,
            "last_decision_ts": "1", "latency_ms": "1", "ts": "1"}


class RenderTests(unittest.TestCase):
    NOW = 1_700_000_010_000

    def render(self, up_max_age_s=5.0, **fields):
        base = dict(redis_up=True, audit_lines=7, server_ms=self.NOW, groups=())
        base.update(fields)
        return parse_exposition(metrics.render(metrics.Snapshot(**base), up_max_age_s))

    def test_redis_down_says_only_that(self):
        families = parse_exposition(metrics.render(metrics.Snapshot(redis_up=False, audit_lines=3)))
        self.assertEqual(set(families), {"eexit_redis_up", "eexit_audit_lines", "eexit_build_info",
                                         "eexit_audit_last_append_timestamp_seconds"})
        self.assertEqual(value_of(families, "eexit_redis_up"), 0)
        self.assertEqual(value_of(families, "eexit_audit_lines"), 3)
        self.assertTrue(math.isnan(value_of(families, "eexit_audit_last_append_timestamp_seconds")))

    def test_every_family_is_typed_and_documented(self):
        families = self.render()
        for name, family in families.items():
            self.assertEqual(family["type"], "counter" if name.endswith("_total") else "gauge", name)
            self.assertTrue(family["help"], name)

    def test_heartbeats(self):
        families = self.render(heartbeats={
            "exit_brain": (f"{self.NOW - 1500}-0", beat("DEGRADED", "3")),
            "eew": (f"{self.NOW - 5000}-3", beat("ALIVE")),
            "watchdog": None})
        for daemon, age, status, up, positions in (("exit_brain", 1.5, "DEGRADED", 1, 3),
                                                   ("eew", 5.0, "OK", 1, 0),
                                                   ("watchdog", math.inf, "UNKNOWN", 0, math.nan)):
            with self.subTest(daemon=daemon):
                self.assertEqual(value_of(families, "eexit_heartbeat_age_seconds", daemon=daemon), age)
                for state in metrics.HEARTBEAT_STATES:
                    self.assertEqual(value_of(families, "eexit_heartbeat_status", daemon=daemon, status=state),
                                     1 if state == status else 0)
                self.assertEqual(value_of(families, "eexit_up", daemon=daemon), up)
                got = value_of(families, "eexit_heartbeat_active_positions", daemon=daemon)
                self.assertTrue(got == positions or (math.isnan(got) and math.isnan(positions)))
        families = self.render(up_max_age_s=4.99, heartbeats={"eew": (f"{self.NOW - 5000}-0", beat())})
        self.assertEqual(value_of(families, "eexit_up", daemon="eew"), 0)

    def test_halted_unless_it_says_false(self):
        for state, halted, present in (({}, 1, 0), ({"halted": "false"}, 0, 1), ({"halted": "true"}, 1, 1),
                                       ({"halted": "maybe"}, 1, 1), ({"reason": "x"}, 1, 1)):
            with self.subTest(state=state):
                families = self.render(trading_state=state)
                self.assertEqual(value_of(families, "eexit_trading_halted"), halted)
                self.assertEqual(value_of(families, "eexit_trading_state_present"), present)

    def report(self, status, **more):
        fields = schema.CompletionReport(event_id="ev", status=status, execution_time_ms=250,
                                         positions_failed=0, **more).to_fields()
        return (f"{self.NOW - 1000}-0", fields)

    def test_last_panic(self):
        families = self.render()
        self.assertEqual(value_of(families, "eexit_last_panic_status", status="NONE"), 1)
        for name in ("time_to_flat_seconds", "execution_seconds", "residual_positions", "positions_failed"):
            self.assertTrue(math.isnan(value_of(families, f"eexit_last_panic_{name}")), name)

        families = self.render(last_report=self.report("FLAT"), last_report_panic_id=f"{self.NOW - 1800}-0")
        self.assertEqual(value_of(families, "eexit_last_panic_status", status="FLAT"), 1)
        self.assertEqual(value_of(families, "eexit_last_panic_status", status="NONE"), 0)
        self.assertEqual(value_of(families, "eexit_last_panic_time_to_flat_seconds"), 0.8)
        self.assertEqual(value_of(families, "eexit_last_panic_execution_seconds"), 0.25)
        self.assertEqual(value_of(families, "eexit_last_panic_completed_timestamp_seconds"), (self.NOW - 1000) / 1000)
        self.assertEqual(value_of(families, "eexit_last_panic_residual_positions"), 0)

        residual = [{"symbol": "BTC/USDT:USDT", "side": "long", "contracts": 1},
                    {"symbol": "ETH/USDT:USDT", "side": "short", "contracts": 2}]
        families = self.render(last_report=self.report("RESIDUAL", residual_positions=residual),
                               last_report_panic_id=f"{self.NOW - 1800}-0")
        self.assertEqual(value_of(families, "eexit_last_panic_status", status="RESIDUAL"), 1)
        self.assertTrue(math.isnan(value_of(families, "eexit_last_panic_time_to_flat_seconds")))
        self.assertEqual(value_of(families, "eexit_last_panic_residual_positions"), 2)

    def test_a_status_outside_the_schema_is_unknown(self):
        entry_id, fields = self.report("FLAT")
        fields["status"] = "WEIRD"
        families = self.render(last_report=(entry_id, fields))
        self.assertEqual(value_of(families, "eexit_last_panic_status", status="UNKNOWN"), 1)
        self.assertEqual(len(families["eexit_last_panic_status"]["samples"]), len(metrics.PANIC_STATES))

    def test_label_values_are_escaped_to_the_format(self):
        odd = 'odd "group" \\ with\nnewline'
        families = self.render(groups=({"name": odd, "pending": 1, "consumers": 0, "undelivered": 0},))
        self.assertEqual(value_of(families, "eexit_group_pending", stream=schema.PANIC_STREAM, group=odd), 1)

    def test_groups(self):
        groups = ({"name": "rogue", "pending": 0, "consumers": 1, "undelivered": 0},
                  {"name": "emergency_exit_worker", "pending": 2, "consumers": 1, "undelivered": 5})
        families = self.render(groups=groups)
        labels = {"stream": schema.PANIC_STREAM, "group": "emergency_exit_worker"}
        self.assertEqual(value_of(families, "eexit_group_pending", **labels), 2)
        self.assertEqual(value_of(families, "eexit_group_undelivered", **labels), 5)
        self.assertEqual(value_of(families, "eexit_group_consumers", **labels), 1)


class MetricsFileTests(RedisTestCase):
    """The daemon's file after a drill-like sequence matches Redis value by value."""

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="eexit-metrics-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.metrics_path = os.path.join(self.dir, "eexit.prom")
        self.audit_path = os.path.join(self.dir, "audit.jsonl")

    def start(self):
        env = python_env(REDIS_URL=self.redis_server.url, EEXIT_AUDIT_FILE=self.audit_path,
                         EEXIT_METRICS_FILE=self.metrics_path, EEXIT_AUDIT_POLL_S="0.05",
                         EEXIT_METRICS_INTERVAL_S="0.05", EEXIT_METRICS_UP_MAX_AGE_S="3600")
        process = start_module("eexit.audit", env, os.path.join(self.dir, "audit.log"))
        self.addCleanup(stop_process, process)
        return process

    def read_metrics(self):
        try:
            with open(self.metrics_path, encoding="utf-8") as f:
                return parse_exposition(f.read())
        except FileNotFoundError:
            return None

    def test_values_match_the_state_after_a_drill(self):
        r = self.redis
        r.xadd(schema.HEARTBEAT_STREAM, beat("DEGRADED", "2"))
        eew_beat = r.xadd(schema.EEW_HEARTBEAT_STREAM, beat()).decode()
        # The watchdog published ev-1 and re-published it; the EEW went flat, and a later
        # duplicate report must not hide that outcome. ev-2 is still waiting for the EEW.
        r.xadd(schema.PANIC_STREAM, {"event_id": "ev-1", "reason": "R", "issued_by": "watchdog", "ts": "1"},
               id="1700000000000-0")
        r.xadd(schema.PANIC_STREAM, {"event_id": "ev-1", "reason": "R", "issued_by": "watchdog", "ts": "1"},
               id="1700000000400-0")
        r.xgroup_create(schema.PANIC_STREAM, schema.EEW_GROUP, id="0")
        r.xreadgroup(schema.EEW_GROUP, "eew-1", {schema.PANIC_STREAM: ">"}, count=1)
        residual = [{"symbol": "BTC/USDT:USDT", "side": "long", "contracts": 0.001}]
        r.xadd(schema.COMPLETED_STREAM, schema.CompletionReport(
            event_id="ev-1", status="FLAT", execution_time_ms=900, positions_failed=0,
            residual_positions=residual).to_fields(), id="1700000001250-0")
        r.xadd(schema.COMPLETED_STREAM, schema.CompletionReport(event_id="ev-1", status="DUPLICATE").to_fields())
        r.xadd(schema.PANIC_STREAM, {"event_id": "ev-2", "reason": "R", "issued_by": "ops", "ts": "2"})
        r.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "event_id": "ev-1"})
        self.start()
        # 3 panics + 2 reports + 1 trading state = 6 lines.
        families = wait_for(lambda: (m := self.read_metrics()) and value_of(m, "eexit_audit_lines") == 6 and m, 10, message="metrics after the audit caught up")

        self.assertEqual(value_of(families, "eexit_redis_up"), 1)
        now = value_of(families, "eexit_metrics_timestamp_seconds")
        self.assertEqual(value_of(families, "eexit_heartbeat_age_seconds", daemon="eew"),
                         round(now - schema.entry_id_ms(eew_beat) / 1000, 3))
        self.assertEqual(value_of(families, "eexit_heartbeat_age_seconds", daemon="watchdog"), math.inf)
        self.assertEqual(value_of(families, "eexit_heartbeat_status", daemon="exit_brain", status="DEGRADED"), 1)
        self.assertEqual(value_of(families, "eexit_heartbeat_active_positions", daemon="exit_brain"), 2)
        self.assertEqual(value_of(families, "eexit_up", daemon="eew"), 1)
        self.assertEqual(value_of(families, "eexit_up", daemon="watchdog"), 0)
        self.assertEqual(value_of(families, "eexit_trading_halted"), 1)
        self.assertEqual(value_of(families, "eexit_last_panic_status", status="FLAT"), 1)
        self.assertEqual(value_of(families, "eexit_last_panic_time_to_flat_seconds"), 1.25)
        self.assertEqual(value_of(families, "eexit_last_panic_execution_seconds"), 0.9)
        self.assertEqual(value_of(families, "eexit_last_panic_residual_positions"), 1)
        self.assertEqual(value_of(families, "eexit_panic_stream_entries"), 3)
        self.assertEqual(value_of(families, "eexit_completed_stream_entries"), 2)
        eew = {"stream": schema.PANIC_STREAM, "group": schema.EEW_GROUP}
        self.assertEqual(value_of(families, "eexit_group_pending", **eew), 1)
        self.assertEqual(value_of(families, "eexit_group_undelivered", **eew), 2)
        self.assertEqual(value_of(families, "eexit_group_consumers", **eew), 1)
        # Only the EEW's group: the audit logger reads with XREAD and creates none.
        self.assertEqual([schema.EEW_GROUP], sorted(dict(labels)["group"] for labels in families["eexit_group_pending"]["samples"]))

        r.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false", "cleared_by": "ops"})
        wait_for(lambda: (m := self.read_metrics()) and value_of(m, "eexit_trading_halted") == 0, 10,
                 message="the resume reflected")
        ok, line, reason = audit.verify_file(self.audit_path)
        self.assertTrue(ok, reason)
        self.assertFalse([name for name in os.listdir(self.dir) if ".tmp." in name], "temp files left")
        # node_exporter runs as another user; the audit trail stays private.
        self.assertEqual(os.stat(self.metrics_path).st_mode & 0o777, 0o644)
        self.assertEqual(os.stat(self.audit_path).st_mode & 0o777, 0o600)


if __name__ == "__main__":
    unittest.main()

"""Acceptance of the risk kernel (issue 25), end to end: `python -m eexit.risk` and the EEW as
real processes, real ccxt against the paper exchange (Binance USDⓈ-M dialect), a private
redis-server. Each test moves the paper account and waits for events (no timed assertions;
speed is bench/risk.py's). Intervals scaled down: a read every 1 s, blind after 3 s."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from eexit import metrics, risk, schema
from eexit.paper import PaperExchange
from tests.harness import ROOT, RedisTestCase, python_env, start_module, stop_process, tail_logs, wait_for

EXCHANGE = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret", "EEXIT_EXCHANGE_TIMEOUT_MS": "2000"}
KERNEL = {"EEXIT_RISK_INTERVAL_S": "1", "EEXIT_RISK_BLIND_S": "3"}
BTC = "BTCUSDT"
KERNEL_KEY = f"rk1 risk_kernel {'a1' * 32}"
REBASE_KEY = f"rb1 risk_rebase {'b2' * 32}"
WATCHDOG_KEY = f"wd1 watchdog {'d4' * 32}"
WATCHDOG_INCIDENT = "eexit:watchdog:incident"


class RiskEndToEnd(RedisTestCase):
    venue = "binanceusdm"
    other_mode = "multi_assets"      # an account mode the paper's dialect answers besides its default

    def setUp(self):
        super().setUp()
        # 0.05 BTC at 65,000 on a 5,000 wallet: a mark at 40,000 is a 25 % drawdown.
        self.paper = PaperExchange(seed="BTCUSDT:0.05", venue=self.venue, balance="5000")
        self.url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.dir = tempfile.mkdtemp(prefix="eexit-risk-e2e-")
        self.processes = []
        self.addCleanup(lambda: [stop_process(p) for p in self.processes])
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "false"})

    def start(self, module, **env):
        merged = {"REDIS_URL": self.redis_server.url, "EEXIT_EXCHANGE_URL": self.url, "EEXIT_EXCHANGE": self.venue,
                  "EEXIT_JOURNAL": os.path.join(self.dir, "journal.jsonl"), "EEXIT_CONSUMER": "eew-risk",
                  **EXCHANGE, **env}
        if self.venue == "okx":
            merged["EEXIT_API_PASSWORD"] = self.paper.api_password
        process = start_module(module, python_env(**merged), os.path.join(self.dir, module + ".log"))
        self.processes.append(process)
        return process

    def kernel(self, **env):
        return self.start("eexit.risk", **{**KERNEL, **env})

    def logs(self):
        return tail_logs(self.dir)

    def state(self):
        raw = self.redis.get(risk.STATE_KEY)
        return None if raw is None else json.loads(raw)

    def beats(self):
        return self.redis.xlen(risk.HEARTBEAT_STREAM)

    def settle(self, reads=3):
        """Wait until the kernel has completed `reads` more reads."""
        target = self.beats() + reads
        wait_for(lambda: self.beats() >= target, 30, message=f"{reads} kernel reads\n{self.logs()}")

    def panics(self):
        return [schema.PanicEvent.from_fields(raw)[0] for _id, raw in self.redis.xrange(schema.PANIC_STREAM)]

    def wait_panic(self, reason):
        found = wait_for(lambda: [p for p in self.panics() if p.reason == reason], 30,
                         message=f"{reason} panic\n{self.logs()}")
        return found[0]

    def wait_report(self, event_id):
        def report():
            for _id, raw in self.redis.xrange(schema.COMPLETED_STREAM):
                parsed, _ = schema.CompletionReport.from_fields(raw)
                if parsed.event_id == event_id and parsed.status:
                    return parsed
            return None
        return wait_for(report, 30, message=f"report for {event_id}\n{self.logs()}")

    def halted(self):
        return schema.TradingState.from_fields(self.redis.hgetall(schema.TRADING_STATE_KEY))[0]

    def ready(self):
        wait_for(lambda: (s := self.state()) and s.get("baseline"), 30, message=f"kernel baseline\n{self.logs()}")
        self.settle(1)

    # -- the acceptance points

    def test_mark_move_one_drawdown_panic_flat_halted(self):
        self.start("eexit.eew")
        self.kernel(EEXIT_RISK_DAILY_LOSS_PANIC="off", EEXIT_RISK_DAILY_LOSS_WARN="off")
        self.ready()
        self.paper.set_mark(BTC, 40_000)
        panic = self.wait_panic("RISK_DRAWDOWN")
        self.assertEqual(panic.issued_by, "risk_kernel")
        context = json.loads(panic.extra["context"])
        self.assertGreaterEqual(context["values"]["drawdown"], 0.20)
        self.assertEqual(context["thresholds"]["drawdown"], {"warn": 0.1, "panic": 0.2})
        self.assertEqual(self.wait_report(panic.event_id).status, "FLAT")
        self.assertEqual(self.paper.positions(), {})
        halt = self.halted()
        self.assertEqual((halt.halted, halt.reason, halt.halted_by), (True, "RISK_DRAWDOWN", "risk_kernel"))
        self.settle(3)
        self.assertEqual(len(self.panics()), 1)      # one panic per breach; halted: no more

    def test_withdrawal_no_panic_deposit_no_peak(self):
        self.kernel()
        self.ready()
        peak = self.state()["baseline"]["peak_adj"]
        self.paper.withdraw(1_500)                    # 30 % of the equity, by the ledger
        self.settle(3)
        self.paper.deposit(4_000)
        self.settle(3)
        self.paper.withdraw(4_000)
        self.settle(3)
        self.assertEqual(self.panics(), [])
        state = self.state()
        self.assertEqual(state["baseline"]["peak_adj"], peak)
        self.assertAlmostEqual(state["baseline"]["net_flows"], -1_500)
        self.assertLess(state["values"]["drawdown"], 0.01)

    def test_transfer_booked_after_the_snapshot_time_defers_not_panics(self):
        """The race of two requests: the equity already shows a withdrawal whose ledger entry
        is stamped after the snapshot's venue time. The loss panic is deferred until the ledger
        and the snapshot agree: no panic."""
        self.kernel(EEXIT_RISK_DAILY_LOSS_PANIC="off", EEXIT_RISK_DAILY_LOSS_WARN="off")
        self.ready()
        self.paper.withdraw(2_000, ts_ms=int(time.time() * 1000) + 3_000)     # 40 %, stamped 3 s ahead
        wait_for(lambda: "breach_deferred" in self.logs(), 30, message=f"deferral\n{self.logs()}")
        wait_for(lambda: self.state()["baseline"]["net_flows"] == -2_000, 30, message=f"flow counted\n{self.logs()}")
        self.settle(2)
        self.assertEqual(self.panics(), [])

    def test_margin_and_liquidation(self):
        self.kernel()
        self.ready()
        self.paper.set_liquidation(BTC, "63000")      # 3 % below the mark of 65,000
        self.assertEqual(self.wait_panic("RISK_LIQUIDATION").issued_by, "risk_kernel")
        self.paper.set_liquidation(BTC, "0")          # unknown: never "far away" ...
        self.settle(2)
        self.assertEqual(self.state()["figures"]["unknown_liquidation"], 1)
        self.paper.set_mm_rate(BTC, 0.9)              # ... the margin rule decides: u = 0.58
        self.wait_panic("RISK_MARGIN")

    def test_blind_with_positions_goes_flat(self):
        self.start("eexit.eew")
        self.kernel()
        self.ready()
        self.paper.account_unreadable()
        panic = self.wait_panic("RISK_BLIND")
        self.paper.clear_faults()
        self.assertEqual(self.wait_report(panic.event_id).status, "FLAT")
        self.assertEqual(self.paper.positions(), {})

    def test_flat_account_unreadable_no_panic_degraded(self):
        self.paper.reset(seed="")
        self.kernel()
        self.ready()
        self.paper.account_unreadable()

        def degraded():
            newest = self.redis.xrevrange(risk.HEARTBEAT_STREAM, count=1)
            beat = schema.Heartbeat.from_fields(newest[0][1])[0] if newest else None
            return beat is not None and beat.status == "DEGRADED" and beat.extra.get("reason") == "blind"
        wait_for(degraded, 30, message=f"DEGRADED blind heartbeat\n{self.logs()}")
        time.sleep(0)   # the blind threshold passes within the reads below
        self.settle(5)
        self.assertEqual(self.panics(), [])

    def test_mode_switch(self):
        self.kernel()
        self.ready()
        self.paper.set_account_mode(self.other_mode)
        panic = self.wait_panic("RISK_MODE_CHANGED")
        self.assertEqual(json.loads(panic.extra["context"])["values"]["mode"], self.other_mode)

    def test_kill_9_keeps_peak_and_window(self):
        kernel = self.kernel()
        self.ready()
        self.paper.set_mark(BTC, 60_000)              # -250: a 5 % loss, under every panic
        self.settle(2)
        before = self.state()
        kernel.send_signal(signal.SIGKILL)
        kernel.wait(timeout=10)
        self.kernel()
        self.settle(2)
        after = self.state()
        self.assertEqual(after["baseline"], before["baseline"])
        # The oldest window entry (bucket and its highest adjusted equity) is the one from before.
        self.assertEqual(after["window"][0][::2], before["window"][0][::2])
        self.assertAlmostEqual(after["values"]["daily_loss"], before["values"]["daily_loss"])
        self.assertEqual(self.panics(), [])
        text = metrics.render(metrics.read_snapshot(self.redis, metrics.Snapshot(redis_up=False)))
        self.assertIn('eexit_risk_value{rule="drawdown"} 0.0', text)
        self.assertIn('eexit_risk_value{rule="liquidation"} NaN', text)

    def test_redis_losing_everything_republishes_the_latched_panic(self):
        self.kernel()
        self.ready()
        self.paper.set_mm_rate(BTC, 0.9)             # u = 0.58: RISK_MARGIN, no EEW: stays latched
        first = self.wait_panic("RISK_MARGIN")
        self.redis.flushall()                         # a Redis restart without persistence
        again = wait_for(lambda: [p for p in self.panics() if p.reason == "RISK_MARGIN"], 30,
                         message=f"republished panic\n{self.logs()}")
        self.assertEqual(again[0].event_id, first.event_id)
        self.assertIn("state_restored_from_memory", self.logs())
        self.assertIsNotNone(self.state()["baseline"])

    def test_rebase_signed_accepted_forged_refused(self):
        audit_file = os.path.join(self.dir, "audit.jsonl")
        self.start("eexit.audit", EEXIT_AUDIT_FILE=audit_file, EEXIT_METRICS_FILE=os.path.join(self.dir, "m.prom"))
        self.kernel(EEXIT_PANIC_HMAC_KEYS=KERNEL_KEY, EEXIT_RISK_REBASE_KEY=REBASE_KEY)
        self.ready()
        env = python_env(REDIS_URL=self.redis_server.url, EEXIT_PANIC_HMAC_KEYS=f"o1 risk_rebase {'c3' * 32}")
        forged = subprocess.run([sys.executable, "-m", "eexit.cli", "risk", "rebase", "--operator", "mallory"],
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(forged.returncode, 1, forged.stdout + forged.stderr)
        self.assertIn("REFUSED", forged.stdout)
        env["EEXIT_PANIC_HMAC_KEYS"] = f"o1 ops {'c4' * 32}\n{REBASE_KEY}"     # ops holds its own and the rebase key
        good = subprocess.run([sys.executable, "-m", "eexit.cli", "risk", "rebase", "--operator", "alice"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(good.returncode, 0, good.stdout + good.stderr)
        wait_for(lambda: self.state()["baseline"]["set_by"] == "alice", 30, message=self.logs())
        verdicts = [{k.decode(): v.decode() for k, v in raw.items()}
                    for _id, raw in self.redis.xrange(risk.EVENTS_STREAM) if raw[b"kind"] == b"rebase"]
        self.assertEqual([(v["operator"], v["status"]) for v in verdicts], [("mallory", "refused"), ("alice", "accepted")])
        def audited():
            with open(audit_file, encoding="utf-8") as lines:
                rows = [json.loads(line) for line in lines if '"kind":"risk"' in line]
            return [(r["fields"].get("operator"), r["fields"].get("status")) for r in rows
                    if r["fields"].get("kind") == "rebase"]
        wait_for(lambda: os.path.exists(audit_file) and len(audited()) == 2, 30, message=f"audit lines\n{self.logs()}")
        self.assertEqual(audited(), [("mallory", "refused"), ("alice", "accepted")])
        status = subprocess.run([sys.executable, "-m", "eexit.cli", "status", "--json"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        risk_rows = json.loads(status.stdout)["risk"]
        text = subprocess.run([sys.executable, "-m", "eexit.cli", "status"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60).stdout
        self.assertRegex(text, r"risk kernel: OK last heartbeat .*, last valid snapshot")
        self.assertRegex(text, r"drawdown +0\.0+ warn=0\.1 panic=0\.2")
        self.assertIn("set by alice", text)
        self.assertEqual(risk_rows["baseline"]["set_by"], "alice")
        self.assertEqual(set(risk_rows["rules"]), {"drawdown", "daily_loss", "margin", "liquidation", "mode", "blind"})

    def test_with_the_watchdog_one_incident_one_halt(self):
        """The watchdog's panic first (the brain never beats: EXIT_BRAIN_HEARTBEAT_LOST), then a
        mark move past the drawdown: the kernel latches and warns, it does not halt again."""
        self.start("eexit.eew")
        self.kernel()
        self.ready()
        self.start("eexit.watchdog", EEXIT_STARTUP_GRACE_S="0.5", EEXIT_HEARTBEAT_LOST_S="1")
        first = wait_for(lambda: self.panics(), 30, message=f"watchdog panic\n{self.logs()}")[0]
        self.assertEqual(first.issued_by, "watchdog")
        self.wait_report(first.event_id)
        self.paper.set_position(BTC, 0.05, entry_price=65_000)    # the bot traded again while halted
        self.paper.set_mark(BTC, 40_000)
        wait_for(lambda: self.redis.xrange(risk.EVENTS_STREAM) and any(
            raw[b"kind"] == b"breach_while_halted" for _id, raw in self.redis.xrange(risk.EVENTS_STREAM)),
            30, message=f"breach while halted\n{self.logs()}")
        self.assertEqual({p.issued_by for p in self.panics()}, {"watchdog"})
        self.assertEqual(self.halted().event_id, first.event_id)

    def reports(self, event_id):
        return sorted(r.status for r in (schema.CompletionReport.from_fields(raw)[0]
                                         for _id, raw in self.redis.xrange(schema.COMPLETED_STREAM))
                      if r.event_id == event_id)

    def start_signed(self, module, **env):
        """Panics signed: the kernel with its own key, the watchdog with its own; the EEW
        verifies both (an unsigned or foreign-signed panic would be refused)."""
        keys = {"eexit.risk": KERNEL_KEY, "eexit.watchdog": WATCHDOG_KEY, "eexit.eew": f"{KERNEL_KEY}\n{WATCHDOG_KEY}"}
        if module == "eexit.risk":
            return self.kernel(EEXIT_PANIC_HMAC_KEYS=KERNEL_KEY, EEXIT_RISK_REBASE_KEY=REBASE_KEY, **env)
        return self.start(module, EEXIT_PANIC_HMAC_KEYS=keys[module], **env)

    def test_both_fire_before_a_halt_one_incident_one_halt(self):
        """The watchdog and the kernel both fire before the EEW halts (the EEW is not running
        yet: the same window as firing in one instant). The kernel's claim loses to the
        watchdog's open incident, so its panic carries the incident's event id: the EEW
        executes the incident once (the copy is DUPLICATE), one halt."""
        self.start_signed("eexit.risk")
        self.ready()
        self.start_signed("eexit.watchdog", EEXIT_STARTUP_GRACE_S="0.5", EEXIT_HEARTBEAT_LOST_S="1")
        first = wait_for(lambda: self.panics(), 30, message=f"watchdog panic\n{self.logs()}")[0]
        self.assertEqual(first.issued_by, "watchdog")
        self.paper.set_mark(BTC, 40_000)
        joined = self.wait_panic("RISK_DRAWDOWN")
        self.assertEqual((joined.issued_by, joined.event_id), ("risk_kernel", first.event_id))
        self.assertIn(b"sig", self.redis.xrange(schema.PANIC_STREAM)[-1][1])      # the kernel signs its copy
        self.start_signed("eexit.eew")
        wait_for(lambda: "FLAT" in self.reports(first.event_id), 60, message=f"FLAT\n{self.logs()}")
        self.assertEqual(self.paper.positions(), {})
        halt = self.halted()
        self.assertEqual((halt.halted, halt.event_id, halt.halted_by), (True, first.event_id, "watchdog"))
        wait_for(lambda: len(self.reports(first.event_id)) >= len(self.panics()), 30, message=self.logs())
        self.settle(3)
        self.assertEqual({first.event_id}, {p.event_id for p in self.panics()})     # one incident
        self.assertEqual(["FLAT"], [s for s in self.reports(first.event_id) if s != "DUPLICATE"])   # one halt
        self.assertEqual(first.event_id, self.redis.hget(WATCHDOG_INCIDENT, "event_id").decode())

    def test_kernel_first_its_signed_panic_is_executed_and_the_watchdog_joins(self):
        """The kernel's signed panic (issued_by=risk_kernel) opens the shared incident; an EEW
        that verifies signatures executes it to FLAT and halts; the watchdog firing after
        adopts that incident instead of opening a second one."""
        self.start_signed("eexit.risk")
        self.ready()
        self.paper.set_mark(BTC, 40_000)
        panic = self.wait_panic("RISK_DRAWDOWN")
        [(_entry, raw)] = self.redis.xrange(schema.PANIC_STREAM)
        self.assertEqual((b"risk_kernel", True), (raw[b"issued_by"], b"sig" in raw))
        incident = {k.decode(): v.decode() for k, v in self.redis.hgetall(WATCHDOG_INCIDENT).items()}
        self.assertEqual((panic.event_id, "risk_kernel", "RISK_DRAWDOWN"),
                         (incident["event_id"], incident["opened_by"], incident["reason"]))
        self.start_signed("eexit.watchdog", EEXIT_STARTUP_GRACE_S="0.5", EEXIT_HEARTBEAT_LOST_S="1")
        wait_for(lambda: "incident_adopted" in self.logs(), 30, message=f"watchdog adopts\n{self.logs()}")
        self.start_signed("eexit.eew")
        wait_for(lambda: "FLAT" in self.reports(panic.event_id), 60, message=f"FLAT\n{self.logs()}")
        self.assertEqual(self.paper.positions(), {})
        halt = self.halted()
        self.assertEqual((halt.halted, halt.event_id, halt.reason, halt.halted_by),
                         (True, panic.event_id, "RISK_DRAWDOWN", "risk_kernel"))
        self.settle(3)
        self.assertEqual({panic.event_id}, {p.event_id for p in self.panics()})
        self.assertEqual(["FLAT"], [s for s in self.reports(panic.event_id) if s != "DUPLICATE"])


class BybitRiskEndToEnd(RiskEndToEnd):
    venue = "bybit"
    other_mode = "portfolio"


    def test_rule_the_mode_cannot_feed_exits_2_naming_it(self):
        self.paper.set_account_mode("isolated")      # no account-wide maintenance margin
        kernel = self.kernel()
        self.assertEqual(kernel.wait(timeout=60), 2, self.logs())
        self.assertIn("risk rule margin needs maintenance_margin", self.logs())
        self.assertIn("EEXIT_RISK_MARGIN_WARN/_PANIC=off", self.logs())


class OkxRiskEndToEnd(RiskEndToEnd):
    venue = "okx"
    other_mode = "portfolio"


if __name__ == "__main__":
    import unittest
    unittest.main()

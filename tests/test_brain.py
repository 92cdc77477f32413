"""The Exit Brain as a real process: real Redis, real ccxt over HTTP to the paper exchange,
a NOTIFY_SOCKET owned by the test. No timed assertions."""

import os
import signal
import tempfile
import threading
import time
import unittest

from eexit import brain as brain_module
from eexit import exchange, schema
from eexit.brain import GUARD_STATE_KEY
from eexit.log import Logger
from eexit.paper import PaperExchange
from tests.harness import NotifySocket, RedisTestCase, python_env, start_module, stop_process, wait_for

BRAIN_ENV = {"EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret",
             "EEXIT_EXCHANGE_TIMEOUT_MS": "1000", "EEXIT_BRAIN_INTERVAL_S": "0.2",
             "EEXIT_BRAIN_LATENCY_BUDGET_MS": "400"}
# The tests here are about DEGRADED and STAGNANT beats: a silence rule must not win the race when
# a loaded machine delays a beat by a second (CI once saw HEARTBEAT_LOST at 1.0 s).
WATCHDOG_ENV = {"EEXIT_HEARTBEAT_LOST_S": "10", "EEXIT_UNGUARDED_S": "10", "EEXIT_DEGRADED_S": "1.0",
                "EEXIT_STAGNANT_S": "30", "EEXIT_REPUBLISH_S": "30", "EEXIT_STARTUP_GRACE_S": "10"}


def beats(client, since="-"):
    return [(entry_id, schema.Heartbeat.from_fields(fields)) for entry_id, fields
            in client.xrange(schema.HEARTBEAT_STREAM, since, "+")]


class BrainProcessTest(RedisTestCase):
    seed = "BTCUSDT:0.01,ETHUSDT:-0.5"

    def setUp(self):
        super().setUp()
        self.paper = PaperExchange(seed=self.seed)
        self.paper_url = self.paper.start()
        self.addCleanup(self.paper.stop)
        self.notify = NotifySocket()
        self.addCleanup(self.notify.close)
        self.logdir = tempfile.mkdtemp(prefix="eexit-brain-")
        self.processes = []
        self.addCleanup(lambda: [stop_process(p) for p in self.processes])

    def start(self, module, **env):
        merged = {"REDIS_URL": self.redis_server.url, "EEXIT_EXCHANGE_URL": self.paper_url, **env}
        process = start_module(module, python_env(**merged), os.path.join(self.logdir, module + ".log"))
        self.processes.append(process)
        return process

    def start_brain(self, **env):
        return self.start("eexit.brain", **{**BRAIN_ENV, **self.notify.env(watchdog_usec=3_000_000), **env})

    def log_text(self, module="eexit.brain"):
        with open(os.path.join(self.logdir, module + ".log"), encoding="utf-8") as f:
            return f.read()

    def latest_beat(self):
        found = beats(self.redis)
        return found[-1][1] if found else None

    def wait_beat(self, predicate, timeout_s=15, message="heartbeat"):
        def check():
            latest = self.latest_beat()
            return latest if latest and predicate(*latest) else None
        return wait_for(check, timeout_s, message=f"{message}; log:\n{self.log_text()[-3000:]}")

    def test_honest_heartbeat_and_pings_after_healthy_cycles(self):
        self.start_brain()
        beat, problems = self.wait_beat(lambda b, p: b.status == "OK", message="OK heartbeat")
        self.assertEqual(problems, [])
        self.assertEqual((beat.service_id, beat.active_positions), ("exit_brain", 2))
        self.assertIsNotNone(beat.last_decision_ts)
        self.assertLessEqual(beat.last_decision_ts, beat.ts)
        wait_for(lambda: len(self.notify.times_of("WATCHDOG=1")) >= 3, 10, message="WATCHDOG=1 pings")
        self.assertTrue(self.notify.times_of("READY=1"))
        self.paper.set_position("BTCUSDT", 0)
        self.wait_beat(lambda b, p: b.active_positions == 1, message="count follows the account")

    def test_stop_loss_closes_reduce_only_even_when_halted(self):
        self.redis.hset(schema.TRADING_STATE_KEY, mapping={"halted": "true", "reason": "test"})
        self.start_brain(EEXIT_STOP_LOSS_PCT="2")
        self.wait_beat(lambda b, p: b.status == "OK" and b.active_positions == 2, message="guarding 2")
        self.assertEqual(self.latest_beat()[0].extra.get("halted"), "true")
        self.paper.set_mark("BTCUSDT", 65000 * 0.97)       # long BTC down 3 %
        wait_for(lambda: self.paper.position_amount("BTCUSDT") == 0, 15, message="BTC closed")
        self.assertEqual(self.paper.position_amount("ETHUSDT"), -0.5)
        [order] = [r for r in self.paper.requests(path="/fapi/v1/order", method="POST")]
        self.assertEqual((order["params"]["reduceOnly"], order["params"]["side"]), ("true", "SELL"))
        self.assertIn("exit_rule_hit", self.log_text())
        self.wait_beat(lambda b, p: b.active_positions == 1, message="one left")

    def test_exchange_error_is_degraded_with_count_unknown(self):
        self.start_brain()
        self.wait_beat(lambda b, p: b.status == "OK", message="OK heartbeat")
        self.paper.add_fault(kind="error", status=503, path="positionRisk", duration_s=60)
        beat, problems = self.wait_beat(lambda b, p: b.status == "DEGRADED", message="DEGRADED heartbeat")
        self.assertIsNone(beat.active_positions)             # never "0" for a failed read
        self.assertIn("missing:active_positions", problems)
        self.assertIn("cycle_failed", beat.extra.get("degraded_reason", ""))

    def test_hung_exchange_degraded_beats_pings_stop_and_watchdog_fires(self):
        self.start_brain()
        self.start("eexit.watchdog", **WATCHDOG_ENV)
        self.wait_beat(lambda b, p: b.status == "OK", message="OK heartbeat")
        wait_for(lambda: self.notify.times_of("WATCHDOG=1"), 10, message="first ping")
        self.paper.add_fault(kind="hang", seconds=30, path="positionRisk")
        self.wait_beat(lambda b, p: b.status == "DEGRADED", message="DEGRADED heartbeat")
        degraded_seen = time.monotonic()
        panic = wait_for(lambda: self.redis.xrange(schema.PANIC_STREAM), 20,
                         message=f"panic; watchdog log:\n{self.log_text('eexit.watchdog')}")
        event, _ = schema.PanicEvent.from_fields(panic[0][1])
        self.assertEqual((event.reason, event.issued_by), ("EXIT_BRAIN_DEGRADED_TOO_LONG", "watchdog"))
        # Heartbeats kept coming (DEGRADED, every ~0.5 s) while no WATCHDOG=1 was sent.
        later = [b for _id, (b, _p) in beats(self.redis) if b.status == "DEGRADED"]
        self.assertGreaterEqual(len(later), 3)
        self.assertEqual([at for at in self.notify.times_of("WATCHDOG=1") if at > degraded_seen], [])
        self.paper.clear_faults()
        self.wait_beat(lambda b, p: b.status == "OK", timeout_s=20, message="recovers after the hang")

    def test_failing_exchange_makes_decisions_stagnant(self):
        self.start_brain()
        self.start("eexit.watchdog", **{**WATCHDOG_ENV, "EEXIT_DEGRADED_S": "60", "EEXIT_STAGNANT_S": "1.5"})
        self.wait_beat(lambda b, p: b.status == "OK", message="OK heartbeat")
        self.paper.add_fault(kind="error", status=503, path="positionRisk", duration_s=60)
        panic = wait_for(lambda: self.redis.xrange(schema.PANIC_STREAM), 20,
                         message=f"panic; watchdog log:\n{self.log_text('eexit.watchdog')}")
        event, _ = schema.PanicEvent.from_fields(panic[0][1])
        self.assertEqual(event.reason, "EXIT_BRAIN_DECISION_STAGNANT")

    def test_deadman_is_armed_for_symbols_with_open_orders(self):
        ex = exchange.build_exchange(exchange.ExchangeConfig.from_env(
            {"EEXIT_EXCHANGE_URL": self.paper_url, "EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret"}))
        ex.create_order("ETH/USDT:USDT", "limit", "buy", 0.1, 3000.0)
        self.start_brain(EEXIT_DEADMAN_S="10")
        # The paper logs a request as it arrives and fills in its parameters once parsed:
        # wait for the one that names the symbol, not for the first entry to appear.
        wait_for(lambda: [r for r in self.paper.requests(path="countdownCancelAll") if "ETHUSDT" in str(r["params"])],
                 15, message=f"countdownCancelAll for ETHUSDT; requests: "
                             f"{self.paper.requests(path='countdownCancelAll')}; log:\n{self.log_text()[-2000:]}")
        self.wait_beat(lambda b, p: b.status == "OK", message="OK with dead-man armed")


    def test_trailing_marks_survive_a_restart_and_a_clean_stop_says_stopped(self):
        self.start_brain(EEXIT_TRAILING_STOP_PCT="5")
        first, _ = self.wait_beat(lambda b, p: b.status == "OK" and b.active_positions == 2, message="guarding 2")
        self.paper.set_mark("BTCUSDT", 70000)                  # the long's high-water mark
        wait_for(lambda: "70000" in (self.redis.hget(GUARD_STATE_KEY, "exit_brain") or b"").decode(), 15,
                 message=f"guard state saved\n{self.log_text()[-2000:]}")
        brain = self.processes[-1]
        brain.send_signal(signal.SIGTERM)
        self.assertEqual(brain.wait(timeout=15), 0)
        stopped = self.latest_beat()[0]
        self.assertEqual((stopped.status, stopped.instance), ("STOPPED", first.instance))
        self.paper.set_mark("BTCUSDT", 67000)                  # 4.3 % below the mark: no exit yet
        self.start_brain(EEXIT_TRAILING_STOP_PCT="5")
        restarted, _ = self.wait_beat(lambda b, p: b.status == "OK" and b.instance != first.instance,
                                      message="the new instance guarding")
        self.assertEqual(self.paper.position_amount("BTCUSDT"), 0.01)
        self.assertIn("event=guard_state_loaded positions=2", self.log_text())
        # 5.7 % below the high-water mark of the PREVIOUS process, 1.5 % below what the new one
        # saw first: only a resumed mark closes it.
        self.paper.set_mark("BTCUSDT", 66000)
        wait_for(lambda: self.paper.position_amount("BTCUSDT") == 0, 15,
                 message=f"trailing stop from the resumed mark\n{self.log_text()[-2000:]}")
        self.assertIn("rule=trailing_stop", self.log_text())


class CycleTimeoutTest(RedisTestCase):
    """Issue 26 finding 7: a built-in TimeoutError raised INSIDE cycle() (on 3.11 it is also
    concurrent.futures.TimeoutError) is a failed cycle, not an overrun to wait out: one
    DEGRADED beat, no busy loop."""

    def test_a_timeout_error_inside_the_cycle_is_one_degraded_beat(self):
        paper = PaperExchange(seed="BTCUSDT:0.01")
        url = paper.start()
        self.addCleanup(paper.stop)
        ex = exchange.build_exchange(exchange.ExchangeConfig.from_env(
            {"EEXIT_EXCHANGE_URL": url, "EEXIT_API_KEY": "paper-key", "EEXIT_API_SECRET": "paper-secret"}))

        class TimingOutBrain(brain_module.Brain):
            def cycle(self):
                raise TimeoutError("timed out")                 # what a socket read raises

        cfg = brain_module.Config.from_env({})
        log = Logger("brain", stream=open(os.devnull, "w"))
        self.addCleanup(log.stream.close)
        brain = TimingOutBrain(cfg, exchange, ex, self.redis, log=log)
        self.addCleanup(brain.cycle_thread.shutdown)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (brain.run_once(), done.set()), daemon=True)
        worker.start()
        worker.join(timeout=30)
        self.assertTrue(done.is_set(), "run_once did not return")
        [(_id, (beat, _problems))] = beats(self.redis)
        self.assertEqual((beat.status, beat.extra.get("degraded_reason")), ("DEGRADED", "cycle_failed:TimeoutError"))


if __name__ == "__main__":
    unittest.main()

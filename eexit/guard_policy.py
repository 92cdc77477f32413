"""Pure decisions of the EEW's halt guard (issue 16): what one guard check of a halted account
does, and the guard lease's timings. No I/O, no clock: eexit/eew.py (Worker.halt_guard) reads
the account and Redis and acts on the answers.

- The guard acts only once the halt's own incident is finished: while the report of the halt's
  event_id is not written (a panic still executing somewhere), its executor is on it.
- The reason comes from the last final report for the halt: RESIDUAL or FAILED left work
  (RESIDUAL_RETRY), anything else means the exposure is new (HALT_VIOLATION).
- enforce: anything a close can act on (a closable position, an open order) is closed as for a
  panic. After an unfinished report a flat account still gets one report (FLAT,
  RESIDUAL_RETRY) so the incident ends with a FLAT. Dust alone after RESIDUAL is left to the
  human (the RESIDUAL report lists it; re-reporting it every interval helps nobody).
- alert: no orders, ever; a report (status RESIDUAL: the account is not flat) once per
  distinct exposure, so an unchanged position is not re-reported every interval.
- A check that finds nothing to do writes no report.
"""

from . import flatten

HALT_VIOLATION = "HALT_VIOLATION"
RESIDUAL_RETRY = "RESIDUAL_RETRY"
POLICIES = ("enforce", "alert")
MIN_INTERVAL_S = 1.0          # each check costs one full account read (positions + both books)
UNFINISHED = (flatten.RESIDUAL, flatten.FAILED)


def decide(policy, last_status, positions, closable, orders, already_alerted=False):
    """(action, reason): action is "wait", "quiet", "enforce" or "alert".
    last_status: the last final report's status for this halt ("" if the halt has no report,
    e.g. an operator's halt), None while that report is not written yet."""
    if last_status is None:
        return "wait", None
    reason = RESIDUAL_RETRY if last_status in UNFINISHED else HALT_VIOLATION
    if policy == "alert":
        return ("alert" if (positions or orders) and not already_alerted else "quiet"), reason
    if closable or orders or (last_status in UNFINISHED and not positions):
        return "enforce", reason
    return "quiet", reason


def exposure_key(positions, orders):
    """What an alert-policy report is about: the same key is reported once."""
    return "|".join(sorted("/".join(flatten.position_key(p)) for p in positions)) + f"#{len(orders)}"


def lease_ms(interval_s):
    """The lease key's TTL, 2.5 check intervals: the holder renews every step (half an
    interval, and while it closes), so only a dead or cut-off holder loses it. The lease
    period is TTL + step = 3 intervals: another EEW, trying every step, holds the lease at
    most that long (plus one loop pass, EEXIT_BLOCK_MS) after the holder died."""
    return int(2500 * interval_s)


def step_s(interval_s):
    """How often a holder renews and a non-holder tries to take the lease."""
    return interval_s / 2


def quiet_repeat(fields):
    """A repeated own-authority close (bus loss) that found nothing to do: not worth a report."""
    return fields.get("status") == flatten.FLAT and not fields.get("attempts")


def repeat_close_s(guard_s, bus_loss_close_s, status):
    """When the own-authority close of a bus loss runs again while the EEW is still unable:
    every guard interval (a bot may reopen while nobody watches); with the guard disabled,
    never after a FLAT, else after another EEXIT_BUS_LOSS_CLOSE_S."""
    if guard_s > 0:
        return guard_s
    return float("inf") if status == flatten.FLAT else bus_loss_close_s

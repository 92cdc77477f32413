"""Lost panics: is the panic stream intact, and did every panic reach the EEW? (issue 14)

Redis ACLs cannot restrict XADD's options, consumer-group commands or group names. So anyone
allowed to publish a panic can also erase or block every later one:

    XADD system:panic_close MAXLEN 0 * x y          deletes every entry not yet delivered
    XADD system:panic_close 18446744073709551615-18446744073709551615 x y
                                                    no XADD can ever succeed again

and a user with group rights can pre-create the EEW's group at `$`, read entries NOACK or
XACK an entry mid-close. Prevention by design (one stream per issuer) would not help against
the first two: the issuer's own stolen password still trims or exhausts its own stream. So the
EEW checks, and treats what it finds as a lost panic, fail-closed:

- decide_tampering(): entries deleted before delivery to the EEW's group, or a stream that
  can take no entry -> the EEW closes on its own authority (reason PANIC_STREAM_TAMPERED),
  reports on the completed stream (which still works), logs CRITICAL. Checked on every loop
  pass from XINFO STREAM + XINFO GROUPS (one pipelined round trip, no entry is read).
- skipped_entries(): authorised entries at or before the group's last-delivered-id that are
  neither pending nor recorded in the ledger were taken from the group by someone else (NOACK
  read, a group pre-created at `$`) -> the EEW executes them with their real content.
- stranded_records(): ledger records that are not final while their entry is not pending
  (acknowledged mid-close, deleted, lost in a restart) -> the EEW resumes them.

Why the counts prove a loss (Redis >= 7.0). entries-added counts every entry ever added to the
stream; the group's entries-read counts entries delivered to the group. Trimming (XADD MAXLEN,
XTRIM) removes the oldest entries and does not move max-deleted-entry-id; XDEL does. So:
  - XDEL of an undelivered entry: max-deleted-entry-id > last-delivered-id.
  - trim (or XDEL) of undelivered entries: entries-added - entries-read (undelivered, ever)
    exceeds the entries the stream still holds after last-delivered-id. The excess is the
    number lost; it never shrinks (a lost entry is never delivered), so it names the loss and
    each new loss is acted on once, even if the check ran only after the EEW read on.
  - a group whose entries-read is unknown while last-delivered-id is not 0-0 was created or
    moved by someone else (the EEW creates its group at 0, and reading makes entries-read
    known); if entries were ever removed from the stream nothing proves the removed ones were
    delivered.
Each finding carries a key; the EEW closes under the event id "tamper-<key>" claimed in its
ledger, so a finding is acted on exactly once, across restarts too.

Pure functions over plain data; read_stream_state() is the one Redis read they need.
"""

import json
from collections import namedtuple

import redis

from . import bus, schema

MAX_ID = "18446744073709551615-18446744073709551615"
TAMPER_REASON = "PANIC_STREAM_TAMPERED"
TAMPER_ISSUER = "emergency_exit_worker"
FINAL_STAGE = "done"
COUNT_LIMIT = 1000       # undelivered entries counted per check; a bigger backlog waits


# reason: panic_stream_exhausted | panic_deleted_before_delivery | ...; key: names this
# finding, the tamper close's event id is "tamper-<key>"; detail: for the log and the report.
class Tampering(namedtuple("Tampering", "reason key detail")):
    @property
    def event_id(self):
        return f"tamper-{self.key}"


def parse_id(entry_id):
    """"ms-seq" -> (ms, seq); anything else -> (0, 0), the smallest id (never hides a loss:
    comparisons against it make entries look undelivered)."""
    text = entry_id.decode() if isinstance(entry_id, (bytes, bytearray)) else str(entry_id or "0-0")
    ms, _, seq = text.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def _int(value):
    return None if value is None else int(value)


def decide_tampering(stream_info, group_info, last_seen=frozenset()):
    """The first finding not in last_seen (keys already acted on), or None.

    stream_info: XINFO STREAM as a dict (Redis's field names); group_info: the EEW group's
    XINFO GROUPS dict, or None if the group does not exist (the caller recreates it)."""
    if not stream_info or not group_info:
        return None
    added = _int(stream_info.get("entries-added")) or 0
    length = _int(stream_info.get("length")) or 0
    delivered_to = parse_id(group_info.get("last-delivered-id"))
    entries_read = _int(group_info.get("entries-read"))
    findings = []
    if parse_id(stream_info.get("last-generated-id")) == parse_id(MAX_ID):
        findings.append(Tampering("panic_stream_exhausted", f"exhausted-{added}",
                                  "the panic stream's last id is the maximum: no panic can be published"))
    deleted = parse_id(stream_info.get("max-deleted-entry-id"))
    if deleted > delivered_to:
        findings.append(Tampering("panic_deleted_before_delivery", "xdel-{}-{}".format(*deleted),
                                  "an entry after the group's last-delivered-id was deleted"))
    if entries_read is None and delivered_to != (0, 0):
        if added > length:
            findings.append(Tampering("group_position_unverifiable", "group-{}-{}-{}".format(*delivered_to, added),
                                      "the group was positioned by someone else and entries were removed"))
    else:
        undelivered = added - (entries_read or 0)
        present = _int(stream_info.get("entries-after-last-delivered"))
        if present is None:
            # Not counted (a backlog beyond COUNT_LIMIT): only a stream whose first entry is
            # after last-delivered-id proves a loss from the counters alone.
            first = parse_id(stream_info.get("recorded-first-entry-id"))
            present = length if length == 0 or first > delivered_to else undelivered
        lost = undelivered - present
        if lost > 0:
            findings.append(Tampering("panic_trimmed_before_delivery", f"trim-{lost}",
                                      f"{lost} entries were removed before delivery to the group"))
    return next((finding for finding in findings if finding.key not in last_seen), None)


def read_stream_state(client, stream=schema.PANIC_STREAM, group=schema.EEW_GROUP):
    """(stream_info, group_info) for decide_tampering; group_info None if the group is gone,
    ({}, None) if the stream is.
    One pipelined round trip, plus one XRANGE counting the entries after last-delivered-id
    when some were added but not delivered (none when idle; at most COUNT_LIMIT). Raises the
    client's other errors."""
    pipe = client.pipeline(transaction=True)
    pipe.xinfo_stream(stream)
    pipe.xinfo_groups(stream)
    try:
        stream_info, groups = pipe.execute()
    except redis.ResponseError as exc:
        if "no such key" not in str(exc):
            raise
        # No stream (Redis lost its data, or a test flushed it): nothing to judge; the next
        # group read recreates stream and group (bus.read_group on NOGROUP).
        return {}, None
    stream_info = bus.decoded(stream_info, drop=("first-entry", "last-entry"))
    group_info = next((bus.decoded(g) for g in groups if bus.as_text(g.get("name")) == group), None)
    if group_info is not None:
        undelivered = int(stream_info.get("entries-added") or 0) - int(group_info.get("entries-read") or 0)
        if 0 < undelivered <= COUNT_LIMIT:
            after = client.xrange(stream, "(" + str(group_info.get("last-delivered-id") or "0-0"), "+",
                                  count=undelivered)
            stream_info["entries-after-last-delivered"] = len(after)
    return stream_info, group_info


def skipped_entries(candidates, pending_ids, records):
    """Authorised entries the group passed by without the EEW recording them: [(entry_id, item)].

    candidates: [(entry_id, item, event_id)] authorised entries at or before last-delivered-id
    (item: passed through as it is; the EEW's screened entry);
    pending_ids: ids pending in the group (someone holds them: claim_idle covers them);
    records: {event_id: ledger record dict or None}. An entry whose event_id has a record of
    another entry was a duplicate: its event is handled, nothing to do."""
    return [(entry_id, item) for entry_id, item, event_id in candidates
            if entry_id not in pending_ids and records.get(event_id) is None]


def stranded_records(records, pending_ids, consumer, now_ms, idle_ms):
    """(resume, drop): event ids of non-final records nobody is working on, and event ids
    whose record is final or gone (no longer in flight).

    records: {event_id: record dict or None}. A record is stranded when its entry is not
    pending (acknowledged by someone else, deleted, or a bus-loss/tamper close that never had
    one) and it is ours, or untouched for idle_ms (its owner died)."""
    resume, drop = [], []
    for event_id, record in sorted(records.items()):
        if record is None or record.get("stage") == FINAL_STAGE:
            drop.append(event_id)
            continue
        if record.get("entry") in pending_ids:
            continue
        touched = record.get("ts_updated") or record.get("ts_started") or 0
        if record.get("consumer") == consumer or now_ms - touched > idle_ms:
            resume.append(event_id)
    return resume, drop


def parse_record(raw):
    """A ledger record as a dict, or None if absent or not a JSON object."""
    try:
        parsed = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None

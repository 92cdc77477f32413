"""Signed panic events: key loading, sign/verify, tampering of every signed field, fuzzing."""

import hashlib
import hmac
import os
import random
import tempfile
import unittest
from pathlib import Path

from eexit.config import ConfigError
from eexit.signing import (CORE_FIELDS, KeyRing, canonical_bytes, check_own_keys, key_source, load_keys, parse_keys,
                           sign_fields, verify_fields)

WATCHDOG_KEY = "11" * 32
OPS_KEY = "a5" * 32
KEYS_TEXT = f"wd1 watchdog {WATCHDOG_KEY}\n# comment\n\nops1 ops {OPS_KEY}\n"


def ring():
    return parse_keys(KEYS_TEXT, "test")


def event(**overrides):
    fields = {"event_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "reason": "POSITIONS_UNGUARDED",
              "severity": "CRITICAL", "issued_by": "watchdog", "ts": "1771070400000",
              "context": '{"note": "not signed"}'}
    fields.update(overrides)
    return fields


class LoadKeysTest(unittest.TestCase):
    def test_credential_file_wins_over_environment(self):
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "panic_hmac_keys").write_text(KEYS_TEXT)
            keys = load_keys({"CREDENTIALS_DIRECTORY": directory,
                              "EEXIT_PANIC_HMAC_KEYS": f"other ops {OPS_KEY}"})
        self.assertEqual(keys.kids(), ("wd1", "ops1"))
        self.assertEqual(keys.issuer_of("wd1"), "watchdog")
        self.assertEqual(keys.kid_for("ops"), "ops1")

    def test_environment_fallback_with_commas(self):
        keys = load_keys({"EEXIT_PANIC_HMAC_KEYS": f"wd1 watchdog {WATCHDOG_KEY}, ops1 ops {OPS_KEY}"})
        self.assertEqual(keys.kids(), ("wd1", "ops1"))

    def test_nothing_configured_is_an_empty_ring(self):
        keys = load_keys({})
        self.assertFalse(keys.configured)
        self.assertEqual(verify_fields(event(), keys), (True, "unsigned_allowed"))

    def test_malformed_entries_raise_without_echoing_the_secret(self):
        secret = "ab" * 40
        bad_texts = [f"wd1 watchdog", f"wd1 watchdog {secret} extra", f"wd/1 watchdog {secret}",
                     f"wd1 watch*dog {secret}", f"wd1 watchdog {secret}zz", f"wd1 watchdog {secret}a",
                     "wd1 watchdog " + "ab" * 31, f"wd1 watchdog {secret}\nwd1 ops {secret}",
                     "# only a comment\n"]
        for text in bad_texts:
            with self.subTest(text=text[:20]):
                with self.assertRaises(ConfigError) as caught:
                    load_keys({"EEXIT_PANIC_HMAC_KEYS": text})
                self.assertNotIn(secret[:16], str(caught.exception))

    def test_repr_never_shows_key_bytes(self):
        text = repr(ring()) + repr(ring()._entries)
        self.assertNotIn(WATCHDOG_KEY[:8], text)
        self.assertNotIn(repr(bytes.fromhex(WATCHDOG_KEY))[:12], text)
        self.assertIn("wd1:watchdog", repr(ring()))


class SignVerifyTest(unittest.TestCase):
    def test_round_trip(self):
        signed = sign_fields(event(), "wd1", ring())
        self.assertEqual(signed["kid"], "wd1")
        self.assertRegex(signed["sig"], r"^[0-9a-f]{64}$")
        self.assertEqual(verify_fields(signed, ring()), (True, "signature_ok"))

    def test_known_vector(self):
        """Pins the canonical encoding so another language can reproduce it."""
        signed = sign_fields(event(), "wd1", ring())
        message = (b"eexit-panic-v1\nkid=3:wd1\nevent_id=36:7c9e6679-7425-40de-944b-e07fc1f90ae7\n"
                   b"reason=19:POSITIONS_UNGUARDED\nseverity=8:CRITICAL\nissued_by=8:watchdog\n"
                   b"ts=13:1771070400000\n")
        self.assertEqual(canonical_bytes(signed, "watchdog"), message)
        expected = hmac.new(bytes.fromhex(WATCHDOG_KEY), message, hashlib.sha256).hexdigest()
        self.assertEqual(signed["sig"], expected)

    def test_bytes_from_redis_without_decode_responses(self):
        signed = sign_fields(event(), "wd1", ring())
        raw = {key.encode(): value.encode() for key, value in signed.items()}
        self.assertEqual(verify_fields(raw, ring()), (True, "signature_ok"))

    def test_legacy_source_field(self):
        fields = event()
        fields["source"] = fields.pop("issued_by")
        signed = sign_fields(fields, "wd1", ring())
        self.assertEqual(verify_fields(signed, ring()), (True, "signature_ok"))
        conflicting = dict(signed, issued_by="ops")
        self.assertEqual(verify_fields(conflicting, ring()), (False, "issuer_ambiguous"))

    def test_unsigned_extra_fields_do_not_matter(self):
        signed = sign_fields(event(), "wd1", ring())
        signed["context"] = "changed"
        signed["audit_note"] = "added"
        self.assertEqual(verify_fields(signed, ring()), (True, "signature_ok"))

    def test_tampering_any_core_field_is_rejected(self):
        signed = sign_fields(event(), "wd1", ring())
        for name in CORE_FIELDS:
            for new_value in (signed[name] + "x", signed[name][:-1], signed[name].upper() + "0"):
                with self.subTest(field=name, value=new_value):
                    ok, reason = verify_fields(dict(signed, **{name: new_value}), ring())
                    self.assertFalse(ok)
                    self.assertIn(reason, {"sig_mismatch", "unknown_kid", "kid_issuer_mismatch"})

    def test_moving_bytes_between_fields_is_rejected(self):
        signed = sign_fields(event(reason="AB", severity="CRITICAL"), "wd1", ring())
        shifted = dict(signed, reason="ABC", severity="RITICAL")
        self.assertEqual(verify_fields(shifted, ring()), (False, "sig_mismatch"))

    def test_each_rejection_reason(self):
        keys = ring()
        signed = sign_fields(event(), "wd1", keys)
        ops_signed = sign_fields(event(issued_by="ops"), "ops1", keys)
        cases = {
            "missing_sig": {k: v for k, v in signed.items() if k != "sig"},
            "missing_kid": {k: v for k, v in signed.items() if k != "kid"},
            "unknown_kid": dict(signed, kid="nope"),
            "kid_issuer_mismatch": dict(signed, issued_by="ops"),
            "bad_sig_format": dict(signed, sig="zz" * 32),
            "sig_mismatch": dict(signed, sig=ops_signed["sig"]),
            "missing_field": {k: v for k, v in signed.items() if k != "ts"},
        }
        for expected, fields in cases.items():
            with self.subTest(expected=expected):
                self.assertEqual(verify_fields(fields, keys), (False, expected))
        self.assertEqual(verify_fields(dict(signed, sig=signed["sig"][:-2]), keys),
                         (False, "bad_sig_format"))
        self.assertEqual(verify_fields({k: v for k, v in signed.items() if k != "issued_by"}, keys),
                         (False, "missing_field"))
        self.assertEqual(verify_fields(dict(signed, reason="\ud800"), keys), (False, "malformed"))
        self.assertEqual(verify_fields(dict(signed, reason=None), keys), (False, "malformed"))

    def test_forged_by_a_holder_of_another_issuers_key(self):
        """The watchdog's key cannot produce an ops event, even with the ops kid."""
        keys = ring()
        forged = sign_fields(event(), "wd1", keys)
        forged.update(issued_by="ops", kid="ops1")
        self.assertEqual(verify_fields(forged, keys), (False, "sig_mismatch"))

    def test_uppercase_hex_signature_is_accepted(self):
        signed = sign_fields(event(), "wd1", ring())
        self.assertEqual(verify_fields(dict(signed, sig=signed["sig"].upper()), ring()),
                         (True, "signature_ok"))

    def test_sign_refuses_misuse(self):
        keys = ring()
        for fields, kid in ((event(), "nope"), (event(), "ops1"), (event(reason=""), "wd1"),
                            ({k: v for k, v in event().items() if k != "issued_by"}, "wd1"), ("x", "wd1")):
            with self.subTest(kid=kid):
                with self.assertRaises(ValueError):
                    sign_fields(fields, kid, keys)

    def test_empty_ring_allows_anything(self):
        for fields in (event(), {}, None, "garbage"):
            self.assertEqual(verify_fields(fields, KeyRing()), (True, "unsigned_allowed"))


class FuzzTest(unittest.TestCase):
    """>= 10,000 hostile inputs: no exception, never a false accept."""

    def test_hostile_inputs(self):
        rng = random.Random(20260214)
        keys = ring()
        good = sign_fields(event(), "wd1", keys)
        alphabet = ["", "a", "0", "\x00", "\ud800", "é", "=", ":", "\n", "9" * 70, "wd1", "ops1",
                    "watchdog", "ops", good["sig"], good["sig"].upper(), "g" * 64, " " * 64]
        names = list(CORE_FIELDS) + ["sig", "source", "context", "", "\ud800"]

        def hostile_value():
            choice = rng.random()
            if choice < 0.08:
                return rng.choice([None, 7, 3.5, [], {}, object(), b"\xff\xfe", bytearray(b"ops")])
            if choice < 0.12:
                return "x" * rng.choice([65 * 1024, 70000])
            if choice < 0.4:
                return rng.choice(alphabet)
            return "".join(chr(rng.randrange(0, 0x11000)) if rng.random() < 0.3 else rng.choice("0123456789abcdef")
                           for _ in range(rng.randrange(0, 80)))

        cases = 0
        accepted = 0
        for _ in range(12000):
            kind = rng.random()
            if kind < 0.05:
                fields = rng.choice([None, 0, "str", b"bytes", [("kid", "wd1")], object(), 3.2])
            elif kind < 0.5:
                fields = dict(good)
                for _ in range(rng.randrange(1, 4)):
                    name = rng.choice(names)
                    if rng.random() < 0.2:
                        fields.pop(name, None)
                    else:
                        fields[name] = hostile_value()
            else:
                fields = {rng.choice(names + [b"kid", 5, None]): hostile_value()
                          for _ in range(rng.randrange(0, 9))}
            ok, reason = verify_fields(fields, keys)
            cases += 1
            self.assertIsInstance(reason, str)
            if ok:
                accepted += 1
                # An accept is only possible if every signed field is the original.
                plain = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
                for name in CORE_FIELDS:
                    self.assertEqual(str(plain.get(name) or plain.get("source")), good[name], name)
        self.assertGreaterEqual(cases, 10000)
        self.assertLess(accepted, cases)


class SignerKeysTest(unittest.TestCase):
    """A signer's ring holds its own issuer's key only (issue 26 finding 9)."""

    OWN = "wd1 watchdog " + "ab" * 32
    OPS = "ops1 ops " + "cd" * 32

    def test_own_key_only_passes_and_an_empty_ring_passes(self):
        check_own_keys(parse_keys(self.OWN, "t"), "watchdog", "f")
        check_own_keys(KeyRing(), "watchdog", "f")

    def test_another_issuers_key_names_the_origin_and_the_issuer_never_the_key(self):
        with self.assertRaises(ConfigError) as caught:
            check_own_keys(parse_keys(f"{self.OWN}\n{self.OPS}", "t"), "watchdog", "/run/creds/panic_hmac_keys")
        self.assertIn("/run/creds/panic_hmac_keys holds keys of other issuers (ops)", str(caught.exception))
        self.assertNotIn("cd" * 32, str(caught.exception))
        with self.assertRaises(ConfigError):
            check_own_keys(parse_keys(self.OPS, "t"), "watchdog", "f")      # no own key at all

    def test_key_source_names_the_credential_file_or_the_variable(self):
        directory = tempfile.mkdtemp()
        self.assertEqual(key_source({"CREDENTIALS_DIRECTORY": directory}), "EEXIT_PANIC_HMAC_KEYS")
        Path(directory, "panic_hmac_keys").write_text(self.OWN)
        self.assertEqual(key_source({"CREDENTIALS_DIRECTORY": directory}), os.path.join(directory, "panic_hmac_keys"))


if __name__ == "__main__":
    unittest.main()

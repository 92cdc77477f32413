"""HMAC-SHA256 signatures on panic events, so that `issued_by` is proven, not self-declared.

Anyone who can XADD to `system:panic_close` could claim to be the watchdog (predecessor defect
12). With keys configured, every issuer signs the event's core fields with its own key and the
EEW rejects anything whose signature does not check out. Keys are per issuer: the watchdog
holds only the watchdog's key, so a compromised watchdog host can forge watchdog events but
not ops events, and a bot with Redis access but no key can forge nothing.

Wire fields added to a panic event
    kid   key id (which key signed it; the key ring binds each kid to one issuer)
    sig   64 lowercase hex digits, HMAC-SHA256(key, canonical bytes)

Canonical bytes (version 1), reproducible in any language:
    b"eexit-panic-v1\\n", then for each name in CORE_FIELDS order
    (kid, event_id, reason, severity, issued_by, ts):
        name + b"=" + decimal byte length of the UTF-8 value + b":" + value + b"\\n"
The length prefix makes the encoding unambiguous whatever the values contain. The legacy
field `source` stands in for `issued_by` when `issued_by` is absent (both present and
different is rejected). Fields outside CORE_FIELDS are not signed: they are audit context.

Key ring: the credential file `panic_hmac_keys` (systemd LoadCredential=, read from
$CREDENTIALS_DIRECTORY) or, for tests and tools, the variable EEXIT_PANIC_HMAC_KEYS. One key
per line (a comma also separates entries), `kid issuer hexkey`, hexkey at least 32 bytes;
blank lines and lines starting with `#` are ignored. Generate a key with
`python3 -c "import secrets; print(secrets.token_hex(32))"`.

API
    load_keys(env=None) -> KeyRing        ConfigError on a malformed file; empty ring if none
    key_source(env=None)                  -> the credential file's path, or the variable's name
    check_own_keys(keyring, issuer, origin)  a signer's ring holds its own key only, else
                                          ConfigError (exit 2) naming origin
    sign_fields(fields, kid, keyring)     -> new dict with `kid` and `sig`; ValueError if the
                                             kid is unknown, belongs to another issuer, or a
                                             core field is missing (a caller bug, not input)
    key_check(keyring, kid)               -> "kid:issuer:check" identifying the key (see below)
    advertise(keyring)                    -> what the EEW's heartbeat says about its keys
    verify_fields(fields, keyring)        -> (ok, reason); never raises, whatever `fields` is
        empty ring            -> (True,  "unsigned_allowed")   verification not configured
        good signature        -> (True,  "signature_ok")
        otherwise (False, one of): "malformed", "missing_field", "issuer_ambiguous",
            "missing_kid", "missing_sig", "unknown_kid", "kid_issuer_mismatch",
            "bad_sig_format", "sig_mismatch"
Key check. The EEW's heartbeat carries `signatures` (required / not_configured) and
`key_checks` = "kid:issuer:check,..." with check = the first 8 hex digits of
HMAC-SHA256(key, "eexit-key-check"), so a watchdog (or a tool) can tell BEFORE any incident
whether the EEW would reject its signatures. 32 bits of a MAC over a fixed string reveal
nothing usable about a 256-bit key (the usual key check value of key ceremonies).
Pure: no I/O except load_keys reading the credential; no logging. Nothing here puts key
material in a repr, an exception message or a return value.
"""

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field

from eexit import schema
from eexit.config import ConfigError, credential

CREDENTIAL_FILE = "panic_hmac_keys"
ENV_VARIABLE = "EEXIT_PANIC_HMAC_KEYS"
CORE_FIELDS = ("kid", "event_id", "reason", "severity", "issued_by", "ts")
MIN_KEY_BYTES = 32
_DOMAIN = b"eexit-panic-v1\n"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")     # a kid or an issuer
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_SIG_RE = re.compile(r"[0-9a-fA-F]{64}")
_KEY_CHECK_DOMAIN = b"eexit-key-check"
_MAX_VALUE_CHARS = 64 * 1024  # an event field larger than this is hostile, not a panic


@dataclass(frozen=True)
class _Key:
    issuer: str
    secret: bytes = field(repr=False)


class KeyRing:
    """kid -> (issuer, key), in file order. Immutable. Its repr names kids and issuers, never
    key bytes; _secret is the one way to a key."""

    def __init__(self, entries=None):
        self._entries = dict(entries or {})

    @property
    def configured(self):
        return bool(self._entries)

    def kids(self):
        return tuple(self._entries)

    def has_kid(self, kid):
        return kid in self._entries

    def issuer_of(self, kid):
        entry = self._entries.get(kid)
        return None if entry is None else entry.issuer

    def kid_for(self, issuer):
        """The first kid (in file order) that belongs to issuer, or None: what a daemon or
        tool signs with when it holds only its own key."""
        return next((kid for kid, entry in self._entries.items() if entry.issuer == issuer), None)

    def _secret(self, kid):
        return self._entries[kid].secret

    def __repr__(self):
        pairs = ", ".join(f"{kid}:{entry.issuer}" for kid, entry in self._entries.items())
        return f"KeyRing({pairs})"


def parse_keys(text, origin):
    """Key ring from the `kid issuer hexkey` text. Errors name the origin and the entry
    number, never the entry's content (it holds a secret)."""
    entries = {}
    chunks = text.replace(",", "\n").splitlines()
    for number, chunk in enumerate(chunks, start=1):
        line = chunk.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"{origin} entry {number}: expected 'kid issuer hexkey'")
        kid, issuer, hexkey = parts
        if not (_NAME_RE.fullmatch(kid) and _NAME_RE.fullmatch(issuer)):
            raise ConfigError(f"{origin} entry {number}: kid and issuer must be 1-64 of [A-Za-z0-9._-]")
        if not _HEX_RE.fullmatch(hexkey) or len(hexkey) % 2:
            raise ConfigError(f"{origin} entry {number}: key is not hexadecimal")
        if len(hexkey) // 2 < MIN_KEY_BYTES:
            raise ConfigError(f"{origin} entry {number}: key shorter than {MIN_KEY_BYTES} bytes")
        if kid in entries:
            raise ConfigError(f"{origin} entry {number}: duplicate kid {kid}")
        entries[kid] = _Key(issuer, bytes.fromhex(hexkey))
    return KeyRing(entries)


def load_keys(env=None):
    """The key ring from $CREDENTIALS_DIRECTORY/panic_hmac_keys, else EEXIT_PANIC_HMAC_KEYS,
    else empty (verification not configured: every event passes as "unsigned_allowed").
    A file that exists but holds no key is a ConfigError: someone meant to configure keys."""
    text = credential(CREDENTIAL_FILE, (ENV_VARIABLE,), env)
    if text is None:
        return KeyRing()
    ring = parse_keys(text, f"credential {CREDENTIAL_FILE} / {ENV_VARIABLE}")
    if not ring.configured:
        raise ConfigError(f"credential {CREDENTIAL_FILE} / {ENV_VARIABLE} holds no key")
    return ring


def key_source(env=None):
    """Where load_keys reads the ring from: the credential file's path, else the variable."""
    env = os.environ if env is None else env
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory and os.path.exists(os.path.join(directory, CREDENTIAL_FILE)):
        return os.path.join(directory, CREDENTIAL_FILE)
    return ENV_VARIABLE


def check_own_keys(keyring, issuer, origin):
    """A SIGNER's key ring (watchdog, crash hook, risk kernel, ops tools) must hold its own
    issuer's key and nothing else: a key of another issuer would let it sign as that issuer
    (a watchdog signing as ops). ConfigError (exit 2) naming `origin` (the file or variable)
    and the other issuers -- never key material. An empty ring (signing not configured) passes.
    The EEW verifies and holds every issuer's key: it does not call this."""
    if not keyring.configured:
        return
    others = sorted({keyring.issuer_of(kid) for kid in keyring.kids()} - {issuer})
    if others:
        raise ConfigError(f"{origin} holds keys of other issuers ({', '.join(others)}): the {issuer} "
                          f"must hold only its own key; remove those lines")
    if keyring.kid_for(issuer) is None:
        raise ConfigError(f"{origin} holds no key for issuer {issuer}: its panics would be rejected")


def _normalise(fields):
    """str -> str copy of a field mapping (str or UTF-8 bytes; numbers as their repr); None if
    it is not a mapping or holds anything else (schema.text_map: as every Redis field map is read)."""
    values, problems = schema.text_map(fields)
    return None if problems else values


def _refusal(plain, kid, keyring, core):
    """(issuer, reason): the claimed issuer (issued_by, or the legacy `source` when issued_by
    is absent), and why `kid` cannot sign these fields -- None when it can. One rule for
    sign_fields (a refusal is a caller bug) and verify_fields (a refusal is a rejection)."""
    issued_by, source = plain.get("issued_by"), plain.get("source")
    if issued_by is not None and source is not None and issued_by != source:
        return None, "issuer_ambiguous"
    issuer = issued_by if issued_by is not None else source
    if not issuer or any(not plain.get(name) for name in core if name not in ("kid", "issued_by")):
        return issuer, "missing_field"
    if not keyring.has_kid(kid):
        return issuer, "unknown_kid"
    if keyring.issuer_of(kid) != issuer:
        return issuer, "kid_issuer_mismatch"
    return issuer, None


def canonical_bytes(fields, issuer, core=CORE_FIELDS, domain=_DOMAIN):
    """The signed bytes (see module docstring). Raises UnicodeEncodeError on a lone
    surrogate; verify_fields turns that into "malformed". Another message kind (a resume
    request) passes its own core fields and domain, so no signature is valid for both."""
    parts = [domain]
    for name in core:
        value = issuer if name == "issued_by" else fields[name]
        data = value.encode("utf-8")
        parts.append(name.encode("ascii") + b"=" + str(len(data)).encode("ascii") + b":" + data + b"\n")
    return b"".join(parts)


def _mac(keyring, kid, fields, issuer, core, domain):
    message = canonical_bytes(fields, issuer, core, domain)
    return hmac.new(keyring._secret(kid), message, hashlib.sha256).digest()


def sign_fields(fields, kid, keyring, core=CORE_FIELDS, domain=_DOMAIN):
    """A copy of fields with `kid` and `sig` set. The kid must be in the ring and belong to
    the event's issued_by. Raises ValueError on misuse; the message names no secret."""
    plain = _normalise(fields)
    if plain is None:
        raise ValueError("fields must be a mapping of str to str")
    issuer, refusal = _refusal(plain, kid, keyring, core)
    if refusal:
        raise ValueError(f"cannot sign with kid {kid!r}: {refusal}")
    plain["kid"] = kid
    plain["sig"] = _mac(keyring, kid, plain, issuer, core, domain).hex()
    return plain


def verify_fields(fields, keyring, core=CORE_FIELDS, domain=_DOMAIN):
    """(ok, reason) for a panic event's fields as read from the stream. See the module
    docstring for the reason codes. Never raises on any input."""
    if not keyring.configured:
        return True, "unsigned_allowed"
    plain = _normalise(fields)
    if plain is None or any(len(value) > _MAX_VALUE_CHARS for value in plain.values()):
        return False, "malformed"
    kid, sig = plain.get("kid"), plain.get("sig")
    if not kid:
        return False, "missing_kid"
    if not sig:
        return False, "missing_sig"
    issuer, refusal = _refusal(plain, kid, keyring, core)
    if refusal:
        return False, refusal
    if not _SIG_RE.fullmatch(sig):
        return False, "bad_sig_format"
    try:
        expected = _mac(keyring, kid, plain, issuer, core, domain)
    except UnicodeEncodeError:
        return False, "malformed"
    if not hmac.compare_digest(expected, bytes.fromhex(sig)):
        return False, "sig_mismatch"
    return True, "signature_ok"


def key_check(keyring, kid):
    """"kid:issuer:check", check = the first 8 hex digits of HMAC-SHA256(key, "eexit-key-check")."""
    check = hmac.new(keyring._secret(kid), _KEY_CHECK_DOMAIN, hashlib.sha256).hexdigest()[:8]
    return f"{kid}:{keyring.issuer_of(kid)}:{check}"


def signed_panic(event_id, reason, issuer, ts_ms, context, keyring):
    """A panic's wire fields, its context (a dict) as compact sorted JSON, signed with issuer's
    first key when the ring holds one. Unsigned otherwise: an empty ring means verification is
    off; a ring without the issuer's key refused the daemon's start (check_own_keys)."""
    context = json.dumps(context, separators=(",", ":"), sort_keys=True, default=str)
    fields = schema.PanicEvent(event_id=event_id, reason=reason, issued_by=issuer, ts=ts_ms,
                               extra={"context": context}).to_fields()
    kid = keyring.kid_for(issuer)
    return fields if kid is None else sign_fields(fields, kid, keyring)


def advertise(keyring):
    """The heartbeat fields by which the EEW says which signatures it accepts."""
    return {"signatures": "required" if keyring.configured else "not_configured",
            "key_checks": ",".join(key_check(keyring, kid) for kid in keyring.kids())}

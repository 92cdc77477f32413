"""The one place in eexit that talks to an exchange, through ccxt and the venue seam.

Builds a ccxt exchange from configuration and offers the handful of account operations an
emergency close needs: read positions, read and cancel open orders (normal and conditional
book), place one reduce-only market order, arm the exchange's dead-man switch, and classify
errors so callers can decide between retrying, waiting, splitting and giving up. Each call
goes to the module of the configured venue (eexit/venues/, whose docstring is the interface);
this module holds no venue-specific decision.

Every read RAISES on failure: an exchange error is never an empty account (SPEC §4.1).
"""

import functools
import http.client
import select
import ssl
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import certifi
import requests

from eexit.ccxt_lite import ccxt   # before eexit.venues: the stand-in, not every exchange
from eexit.config import ConfigError, credential, env_bool, env_int, env_str
from eexit.venues import base, venue
from eexit.venues.base import (ErrorClass, ExchangeDataError, MarketRules, OpenOrder, Position,  # noqa: F401
                               in_segment)

DEFAULT_EXCHANGE = "binanceusdm"
DEFAULT_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class ExchangeConfig:
    exchange_id: str = DEFAULT_EXCHANGE
    api_key: str | None = field(default=None, repr=False)
    api_secret: str | None = field(default=None, repr=False)
    api_password: str | None = field(default=None, repr=False)
    url: str | None = None
    sandbox: bool = False
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    ca_file: str | None = None

    @classmethod
    def from_env(cls, env=None):
        exchange_id = env_str("EEXIT_EXCHANGE", DEFAULT_EXCHANGE, env)
        module = venue(exchange_id)
        api_key = credential("api_key", ("EEXIT_API_KEY", "BINANCE_API_KEY"), env)
        api_secret = credential("api_secret", ("EEXIT_API_SECRET", "BINANCE_API_SECRET"), env)
        if (api_key is None) != (api_secret is None):
            missing = "EEXIT_API_SECRET (or api_secret)" if api_secret is None else "EEXIT_API_KEY (or api_key)"
            raise ConfigError(f"{missing} is required when the other half of the API credentials is set")
        api_password = credential("api_password", ("EEXIT_API_PASSWORD",), env)
        if module.NEEDS_PASSWORD and api_key is not None and api_password is None:
            raise ConfigError(f"EEXIT_API_PASSWORD (or api_password) is required for {exchange_id}")
        if not module.NEEDS_PASSWORD and api_password is not None:
            # A passphrase the venue never asks for is a sign of a key meant for another venue.
            raise ConfigError(f"EEXIT_API_PASSWORD (or api_password) is set but {exchange_id} takes none")
        url = env_str("EEXIT_EXCHANGE_URL", "", env) or None      # unset or blank: none
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"EEXIT_EXCHANGE_URL={url!r} is not an http(s) base URL")
            url = url.rstrip("/")
        sandbox_name = "EEXIT_SANDBOX" if env_str("EEXIT_SANDBOX", "", env) else "BINANCE_TESTNET"   # legacy
        sandbox = env_bool(sandbox_name, False, env)
        if sandbox and url is not None:
            # Two different destinations for real orders: refuse rather than guess which one.
            raise ConfigError("EEXIT_SANDBOX and EEXIT_EXCHANGE_URL are both set; choose one")
        timeout_ms = env_int("EEXIT_EXCHANGE_TIMEOUT_MS", DEFAULT_TIMEOUT_MS, minimum=100, maximum=120000, env=env)
        ca_file = env_str("EEXIT_EXCHANGE_CA_FILE", "", env) or None
        if ca_file is not None:
            try:
                tls_context(ca_file)
            except (OSError, ssl.SSLError) as exc:
                # Refused at start: a trust store we cannot load would fail every panic's TLS.
                raise ConfigError(f"EEXIT_EXCHANGE_CA_FILE={ca_file!r} is not a readable PEM CA bundle: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        return cls(exchange_id=exchange_id, api_key=api_key, api_secret=api_secret,
                   api_password=api_password, url=url,
                   sandbox=sandbox, timeout_ms=timeout_ms, ca_file=ca_file)


@functools.lru_cache(maxsize=4)
def tls_context(ca_file=None):
    """The one verifying TLS context every client of a process shares: built once, from
    EEXIT_EXCHANGE_CA_FILE when set (the COMPLETE trust store then, certifi not added: behind
    a TLS-intercepting proxy give its CA, or a bundle with both), else certifi's bundle. Left
    to itself, requests handed urllib3 the bundle's path and every new connection built a
    context and re-read ~150 KB of PEM (30+ ms CPU each, 60 of them in a cold panic)."""
    return ssl.create_default_context(cafile=ca_file or certifi.where())


class ExchangeSession:
    """ccxt's HTTP session (ex.session) on the standard library's http.client, which urllib3
    itself wraps: ccxt still builds, signs and sorts every request and answer; what goes is
    requests' and urllib3's layers around it, most of a request's CPU (docs/BENCHMARKS.md §10).
    Verifies with the shared tls_context and reads no environment (no proxy, no netrc, no
    REQUESTS_CA_BUNDLE). A client serves one thread at a time (ExchangePool hands them out so;
    ccxt keeps per-client state such as the last answer's headers): its connection is kept
    alive and replaced when the server closed it while idle, as urllib3 does. A request is
    never retried (its outcome may be unknown). A 3xx is not followed (an order is never
    re-sent elsewhere) and fails the request (ExchangeError: the account is unknown, never
    empty). Other failures raise what requests raised, so ccxt sorts them as before: a
    timeout is RequestTimeout (an order may have been placed), TLS and connection failures
    NetworkError."""

    def __init__(self, context):
        self.context = context
        self.headers = requests.utils.default_headers()     # ccxt merges them into each request
        self.cookies = {}                                    # ccxt clears them; none is ever sent
        self.idle = []                                       # [((scheme, host), connection)], LIFO

    def request(self, method, url, data=None, headers=None, timeout=None, verify=True, **options):
        if not verify or any(options.values()):
            # ccxt passes verify=True, proxies=None, files=None: anything else is not what eexit built.
            raise ValueError(f"eexit's exchange session sends verified and direct only: {verify} {options}")
        parts = urlsplit(url)
        origin = (parts.scheme, parts.netloc)
        conn, reusable = self._connection(origin, timeout), False
        try:
            target = f"{parts.path}?{parts.query}" if parts.query else parts.path
            conn.request(method, target, headers=headers or {},
                         body=b"" if data is None and method not in ("GET", "HEAD") else data)
            answer = conn.getresponse()
            body = answer.read()
            reusable = not answer.will_close
        except (OSError, http.client.HTTPException) as exc:
            raise _transport_error(exc, connecting=False) from exc
        finally:
            # Only a connection that delivered a whole answer is reused; any other is closed.
            if reusable:
                self.idle.append((origin, conn))
            else:
                conn.close()
        response = requests.Response()
        response.status_code, response.reason, response.url = answer.status, answer.reason, url
        response.headers = requests.structures.CaseInsensitiveDict(answer.getheaders())
        coding = response.headers.get("Content-Encoding", "").lower()
        try:
            # ccxt asks for gzip or deflate, as requests did; a venue may answer with either.
            response._content = zlib.decompress(body, 16 + zlib.MAX_WBITS) if coding == "gzip" else \
                zlib.decompress(body) if coding == "deflate" else body
        except zlib.error as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        if 300 <= answer.status < 400:
            # ccxt would parse the redirect's body (often empty) as the answer: an empty list of orders.
            raise requests.exceptions.TooManyRedirects(f"{answer.status} {answer.reason} not followed",
                                                       response=response)
        return response

    def _connection(self, origin, timeout):
        """The last idle connection to origin (scheme, host) the server has not closed, else a
        new one, connected here (a failure to connect is told from one after sending)."""
        while self.idle:
            idle_origin, conn = self.idle.pop()
            readable = select.poll()
            readable.register(conn.sock, select.POLLIN)
            if idle_origin == origin and not readable.poll(0):    # readable while idle: closed
                conn.sock.settimeout(timeout)
                return conn
            conn.close()
        scheme, host = origin
        conn = http.client.HTTPSConnection(host, timeout=timeout, context=self.context) if scheme == "https" \
            else http.client.HTTPConnection(host, timeout=timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise _transport_error(exc, connecting=True) from exc
        return conn

    def close(self):
        """Closes the idle connections (ccxt's close() calls it)."""
        while self.idle:
            self.idle.pop()[1].close()


def _transport_error(exc, connecting):
    """The requests exception that Session.request raised for exc (ccxt sorts those)."""
    if isinstance(exc, TimeoutError):
        return (requests.exceptions.ConnectTimeout if connecting else requests.exceptions.ReadTimeout)(exc)
    if isinstance(exc, ssl.SSLError):
        return requests.exceptions.SSLError(exc)
    return requests.exceptions.ConnectionError(exc)


def build_exchange(cfg):
    """A synchronous ccxt exchange. ccxt's rate limiter is off: it sleeps ~200 ms between
    orders, which an emergency close cannot afford; callers pace themselves. HTTPS verifies
    with the process-wide tls_context (ExchangeSession reads no environment, so
    REQUESTS_CA_BUNDLE is ignored: EEXIT_EXCHANGE_CA_FILE is the setting)."""
    settings = {"enableRateLimit": False, "timeout": int(cfg.timeout_ms),
                "session": ExchangeSession(tls_context(cfg.ca_file))}
    if cfg.api_key is not None:
        settings["apiKey"] = cfg.api_key
        settings["secret"] = cfg.api_secret
    if cfg.api_password is not None:
        settings["password"] = cfg.api_password
    ex = getattr(ccxt, cfg.exchange_id)(settings)
    # A signed currency listing before the markets costs a request and needs wallet rights.
    ex.options["fetchCurrencies"] = False
    ex.has["fetchCurrencies"] = False
    venue(ex.id).configure(ex)
    # ccxt's rawencode is unquote(urlencode(params)): it percent-encodes every character of a
    # batch's JSON only to decode it again, a third of a batch close's CPU on Binance
    # (docs/BENCHMARKS.md §10). The same text without the round trip.
    ex.rawencode = _rawencode
    if cfg.sandbox:
        ex.set_sandbox_mode(True)
    if cfg.url is not None:
        ex.urls["api"] = _rewrite_urls(ex.urls["api"], cfg.url)
    return ex


def _rawencode(params, sort=False):
    """What ccxt's rawencode returns: urlencode quotes str(value) (booleans as true/false) and
    unquote restores it exactly, so the text is the values joined as they are."""
    return "&".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in params.items())


def _rewrite_urls(api_urls, base_url):
    """Keep each endpoint's path, replace scheme and host with base_url."""
    if isinstance(api_urls, str):
        return base_url + urlsplit(api_urls).path
    if isinstance(api_urls, dict):
        return {key: _rewrite_urls(value, base_url) for key, value in api_urls.items()}
    return api_urls


def venue_of(ex):
    return venue(ex.id)


def scope(exchange_id):
    """The account segments a read covers, e.g. "bybit:linear/USDT,linear/USDC,inverse"."""
    return f"{exchange_id}:{','.join(venue(exchange_id).SEGMENTS)}"


def check_key(ex):
    """One cheap private read-only call; raises when the key is refused."""
    venue_of(ex).check_key(ex)


def read_segment_positions(ex, segment):
    """(positions, unreadable rows) of one segment; a failure carries the segment
    (exc.eexit_segment)."""
    return in_segment(segment, lambda: venue_of(ex).read_positions(ex, segment))


def read_segment_orders(ex, segment, book):
    """One book (a name from the venue's BOOKS) of one segment; failures carry both."""
    return in_segment(f"{segment}:{book}", lambda: venue_of(ex).read_orders(ex, segment, book))


def default_order_limits(exchange_id):
    return venue(exchange_id).ORDER_LIMITS


def load_market_rules(ex):
    """{unified symbol: MarketRules}. Raises on failure (no rules means no safe sizing)."""
    return base.load_market_rules(ex, venue_of(ex).MARKET_MAX)


def read_positions(ex):
    """Every non-zero position of every segment. Raises; never [] for an error. A row that
    cannot be read fails the whole read here (ExchangeDataError naming it, tagged with its
    segment): callers without a per-row report (brain, operator tools) never act on a part
    of the account as if it were all of it. The EEW reads per segment and closes the rest."""
    positions = []
    for segment in venue_of(ex).SEGMENTS:
        readable, unreadable = read_segment_positions(ex, segment)
        if unreadable:
            error = ExchangeDataError("unreadable position rows: " + "; ".join(u.describe() for u in unreadable))
            error.eexit_segment = segment
            raise error
        positions.extend(readable)
    return positions


def read_open_orders(ex):
    """Open orders of every book of every segment: the regular books first, then the
    conditional/algo ones."""
    books = sorted(venue_of(ex).BOOKS, key=lambda book: book != "regular")
    return [order for book in books for segment in venue_of(ex).SEGMENTS
            for order in read_segment_orders(ex, segment, book)]


def cancel_book(ex, symbol, conditional, orders=()):
    """Cancel one book for symbol; raises on failure. orders: what the read saw there."""
    venue_of(ex).cancel_book(ex, symbol, conditional, orders)


def place_close_order(ex, symbol, side, amount, position_side, client_order_id, margin_mode=None):
    """One reduce-only market order. side is the ORDER side ("sell" closes a long);
    position_side "BOTH" (one-way) or "LONG"/"SHORT" (hedge, checked against side)."""
    return venue_of(ex).place_close(ex, symbol, side, amount, position_side, client_order_id, margin_mode)


def batch_size(exchange_id):
    """Close orders one request can carry (the venue's batch endpoint)."""
    return venue(exchange_id).BATCH_ORDERS


def place_close_orders(ex, orders, on_batch_refused=None):
    """flatten.CloseOrder items, at most batch_size: [order id | exception] in order. An
    exception in the list is that order's rejection (classify_error sorts it like a single
    order's). A batch request that fails as a whole falls back to the single-order endpoint
    for its orders, in this same call (on_batch_refused(exc) is told): batching is an
    optimisation, and a venue refusing it may cost time, never the close. Two failures are
    raised instead, concerning every order: a rate limit (more requests would deepen the ban;
    the caller waits and retries) and a timeout (the batch may have been placed, and singles
    would wait out the same timeout; the caller's re-read decides). A single order
    rate-limited during the fallback ends it: the orders not yet sent get that answer."""
    module = venue_of(ex)
    if len(orders) > 1:
        try:
            return module.place_closes(ex, orders)
        except Exception as exc:  # noqa: BLE001 - raised, or its orders sent singly
            # A timeout may have placed the batch; a rate limit would deepen the ban: both raised.
            if isinstance(exc, ccxt.RequestTimeout) or classify_error(exc, ex).kind == "rate_limited":
                raise
            if on_batch_refused is not None:
                on_batch_refused(exc)
    results, limited = [], None
    for order in orders:
        result = limited or _place_single(module, ex, order)
        if limited is None and isinstance(result, Exception) and classify_error(result, ex).kind == "rate_limited":
            limited = result
        results.append(result)
    return results


def _place_single(module, ex, o):
    """One order's id, or the exception that is its result (never raised: the other orders of
    the call are still sent, and the caller classifies it like a batch item's rejection)."""
    try:
        return module.place_close(ex, o.symbol, o.side, o.amount, o.position_side, o.client_order_id,
                                  o.margin_mode)["id"]
    except Exception as exc:  # noqa: BLE001 - returned as this order's result, never swallowed
        return exc


def ping(ex):
    """The venue's cheapest public request (server time): keeps a connection from idling out."""
    getattr(ex, venue_of(ex).PING)()


def arm_deadman(ex, symbol, countdown_ms):
    """The venue's dead-man switch for symbol (0 disarms); ccxt.NotSupported where none."""
    module = venue_of(ex)
    if module.DEADMAN is None:
        raise ccxt.NotSupported(f"{ex.id}: no dead-man switch supported by eexit")
    module.arm_deadman(ex, symbol, countdown_ms)


def classify_error(exc, ex=None, exchange_id=None):
    """What kind of failure exc is, by the venue's own codes first, then by ccxt class. ex,
    when given, supplies the venue and the response headers holding retry hints."""
    exchange_id = ex.id if ex is not None else exchange_id or DEFAULT_EXCHANGE
    return base.classify(exc, venue(exchange_id).ERRORS, ex)


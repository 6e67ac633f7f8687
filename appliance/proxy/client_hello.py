"""A guest's TLS ClientHello, read from its first bytes: sans-IO, never decrypting.

The transparent HTTPS relay routes a connection by the name the guest asks for
(SNI) and then forwards every byte unchanged.  So this module only reads: it
checks the record layer (handshake records only, until the hello is complete),
reassembles the ClientHello handshake message across records and feeds, parses
it strictly and hands back what the relay decides on.  What it refuses, it
refuses with a few words for the access log (`BadHello`), never with any other
exception, whatever the bytes.

Decisions are made on as few bytes as possible: a first byte that is not a
handshake record is refused at once (plain HTTP to port 443, an SSLv2 hello),
and a hello whose declared length is over the limit is refused as soon as the
four bytes of its header are in, before its body is buffered.

The host name is checked the way a resolver and the site's policy will read it:
ASCII, a DNS name of letters, digits and hyphens (no underscores), lower-cased,
one trailing dot stripped, and never an IP literal (RFC 6066 3 forbids them;
a name a browser would read as an IPv4 address counts as one).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

__all__ = ["MAX_HELLO", "BadHello", "ClientHello", "HelloReader"]

MAX_HELLO = 16384  # bytes of the ClientHello handshake message beyond which it is refused
MAX_RECORD = 16384  # 2^14: the largest TLSPlaintext fragment (RFC 8446 5.1)
MAX_NAME = 253

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_HOST_NAME = 0
_READ = frozenset((_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS))
_TYPE_LENGTH = struct.Struct("!HH").unpack_from

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}", re.ASCII)
_HEX = re.compile(r"0x[0-9a-f]*", re.ASCII)


class BadHello(ValueError):
    """Why the first bytes are no acceptable ClientHello; str(exc) is short words for the
    access log, e.g. "not TLS", "oversized hello", "bad SNI", "bad record length"."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the relay routes by; everything else in the hello is forwarded unread."""

    sni: str | None  # the host_name from server_name, lower-case ASCII, validated; None: no SNI
    alpn: tuple[str, ...]  # ALPN protocol names offered, in order (latin-1 decoded), () if none
    version: int  # highest offered: supported_versions (no GREASE) if present, else legacy_version


class HelloReader:
    """Feed bytes as they arrive; it answers once the whole ClientHello handshake message is in.

    A refusal is final: once feed() raised BadHello, every later feed raises the same.
    """

    __slots__ = ("_error", "_hello", "_hs", "_left", "_limit", "_need", "_pos", "_raw", "_records")

    def __init__(self, limit: int = MAX_HELLO) -> None:
        self._limit = limit
        self._raw = bytearray()  # every byte fed
        self._pos = 0  # where in _raw the record layer has read up to
        self._left = 0  # bytes of the current record's body not yet read; 0: at a header
        self._records = 0  # record headers accepted so far
        self._hs = bytearray()  # the handshake message, reassembled from the records' bodies
        self._need = 0  # its whole length (header included) once known, else 0
        self._hello: ClientHello | None = None
        self._error: str | None = None

    @property
    def raw(self) -> bytes:
        """every byte fed so far, unchanged (what the relay forwards upstream)"""
        return bytes(self._raw)

    @property
    def pending(self) -> int:
        """len(raw), cheap (the relay bounds its buffer with it)"""
        return len(self._raw)

    def feed(self, data: bytes) -> ClientHello | None:
        """None: need more bytes.  Raises BadHello.  After it returned a ClientHello, further
        feeds are appended to `raw` only (and return the same hello)."""
        self._raw += data
        if self._hello is not None:
            return self._hello
        if self._error is not None:
            raise BadHello(self._error)
        try:
            return self._advance()
        except BadHello as exc:
            self._error = str(exc)
            raise

    def _advance(self) -> ClientHello | None:
        raw = self._raw
        end = len(raw)
        while True:
            pos = self._pos
            if self._left == 0:  # at a record header: judge each byte as it comes
                avail = end - pos
                if avail == 0:
                    return None
                first = self._records == 0
                if raw[pos] != _HANDSHAKE:
                    raise BadHello("not TLS" if first else "non-handshake record before hello")
                if avail >= 2 and raw[pos + 1] != 3:
                    raise BadHello("not TLS" if first else "bad record version")
                if avail >= 3 and raw[pos + 2] > 4:
                    raise BadHello("bad record version")
                if avail < 5:
                    return None
                length = (raw[pos + 3] << 8) | raw[pos + 4]
                if length == 0 or length > MAX_RECORD:
                    raise BadHello("bad record length")
                self._records += 1
                self._pos = pos + 5
                self._left = length
                continue
            take = min(self._left, end - pos)
            if take == 0:
                return None
            hs = self._hs
            hs += raw[pos : pos + take]
            self._pos = pos + take
            self._left -= take
            if hs[0] != _CLIENT_HELLO:
                raise BadHello("not a ClientHello")
            if self._need == 0 and len(hs) >= 4:
                length = (hs[1] << 16) | (hs[2] << 8) | hs[3]
                if length > self._limit:
                    raise BadHello("oversized hello")
                self._need = 4 + length
            if self._need and len(hs) >= self._need:
                if len(hs) > self._need or self._left:
                    raise BadHello("data after hello")
                self._hello = parse_client_hello(bytes(hs[4:]))
                return self._hello


def _ext_lengths_ok(body: bytes, prefix: int) -> int:
    """The inner list's length, which must fill the extension exactly and not be empty."""
    n = len(body)
    if n < prefix:
        raise BadHello("truncated extension")
    inner = int.from_bytes(body[:prefix], "big")
    if inner + prefix != n:
        raise BadHello("bad extension length")
    return inner


def _server_name(body: bytes) -> str | None:
    """The host_name of a server_name extension (RFC 6066 3), checked."""
    if not body:
        raise BadHello("empty server_name")
    if _ext_lengths_ok(body, 2) == 0:
        raise BadHello("empty server_name")
    i, n = 2, len(body)
    host: bytes | None = None
    while i < n:
        if i + 3 > n:
            raise BadHello("truncated SNI")
        kind = body[i]
        length = (body[i + 1] << 8) | body[i + 2]
        i += 3
        if i + length > n:
            raise BadHello("truncated SNI")
        if kind == _HOST_NAME:
            if host is not None:
                raise BadHello("two SNI host names")
            host = body[i : i + length]
        i += length
    return None if host is None else check_host_name(host)


def check_host_name(name: bytes) -> str:
    """The SNI host name as the relay routes by it: lower-case DNS name, no trailing dot."""
    if not name.isascii():
        raise BadHello("non-ASCII SNI")
    host = name.decode("ascii").lower()
    if host.endswith("."):
        host = host[:-1]
    if ":" in host:
        raise BadHello("IP literal in SNI")
    if not host or len(host) > MAX_NAME or not _HOST.fullmatch(host):
        raise BadHello("bad SNI")
    # what a browser's URL parser reads as an IPv4 address: the last label numeric
    # ("198.51.100.3", "3325256707", "198.51.25603") or hexadecimal ("0xc6.0x33.0x64.3")
    last = host.rpartition(".")[2]
    if last.isdigit() or _HEX.fullmatch(last):
        raise BadHello("IP literal in SNI")
    return host


def _alpn(body: bytes) -> tuple[str, ...]:
    """The protocol_name_list of RFC 7301 3.1: at least one name, none empty."""
    if _ext_lengths_ok(body, 2) == 0:
        raise BadHello("bad ALPN")
    names = []
    i, n = 2, len(body)
    while i < n:
        length = body[i]
        i += 1
        if length == 0 or i + length > n:
            raise BadHello("bad ALPN")
        names.append(body[i : i + length].decode("latin-1"))
        i += length
    return tuple(names)


def _supported_versions(body: bytes) -> int | None:
    """The highest version offered (RFC 8446 4.2.1), GREASE (RFC 8701) ignored; None if only
    GREASE was offered (then the legacy version stands)."""
    length = _ext_lengths_ok(body, 1)
    if length == 0 or length % 2:
        raise BadHello("bad supported_versions")
    best: int | None = None
    for i in range(1, len(body), 2):
        hi, lo = body[i], body[i + 1]
        if hi == lo and lo & 0x0F == 0x0A:
            continue
        v = (hi << 8) | lo
        if best is None or v > best:
            best = v
    return best


def parse_client_hello(d: bytes) -> ClientHello:
    """The body of a ClientHello handshake message (RFC 8446 4.1.2), without its 4-byte header."""
    n = len(d)
    if n < 35:
        raise BadHello("truncated hello")
    if d[0] != 3:
        raise BadHello("bad hello version")
    legacy_version = (d[0] << 8) | d[1]
    sid = d[34]
    if sid > 32:
        raise BadHello("bad session id")
    i = 35 + sid
    if i + 2 > n:
        raise BadHello("truncated hello")
    suites = (d[i] << 8) | d[i + 1]
    i += 2
    if suites < 2 or suites % 2:
        raise BadHello("bad cipher suites")
    i += suites
    if i + 1 > n:
        raise BadHello("truncated hello")
    methods = d[i]
    i += 1
    if methods < 1:
        raise BadHello("bad compression methods")
    i += methods
    if i > n:
        raise BadHello("truncated hello")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    version: int | None = None
    if i < n:
        if i + 2 > n:
            raise BadHello("truncated extensions")
        total = (d[i] << 8) | d[i + 1]
        i += 2
        if i + total != n:
            raise BadHello("bad extensions length")
        kinds: list[int] = []
        wanted: list[tuple[int, int, int]] = []
        while i < n:
            if i + 4 > n:
                raise BadHello("truncated extension")
            kind, length = _TYPE_LENGTH(d, i)
            kinds.append(kind)
            i += 4 + length
            if i > n:
                raise BadHello("truncated extension")
            if kind in _READ:
                wanted.append((kind, i - length, i))
        if len(set(kinds)) != len(kinds):
            raise BadHello("duplicate extension")
        for kind, start, stop in wanted:
            if kind == _EXT_SERVER_NAME:
                sni = _server_name(d[start:stop])
            elif kind == _EXT_ALPN:
                alpn = _alpn(d[start:stop])
            else:
                version = _supported_versions(d[start:stop])
    return ClientHello(sni=sni, alpn=alpn, version=legacy_version if version is None else version)

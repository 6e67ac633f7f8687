"""Where an HTTP/1.x message ends: heads and body framing, one strict grammar, sans-IO.

The relay passes request and response bytes through unchanged and keeps upstream
connections to the site's web proxy alive across guests, so it must know exactly
where each head and each body ends (RFC 9112 section 6).  Two parsers that read
one message's length two ways are how requests are smuggled; so this reader is
narrower than the RFC allows a recipient to be: no bare LF, no obs-fold, no
whitespace before a colon, no Content-Length beside Transfer-Encoding, no
Transfer-Encoding in HTTP/1.0, one Content-Length value.  What it refuses, it
refuses with the status a guest is answered (`BadMessage.status`); a response it
refuses is answered 502.

The head parsers take the bytes received so far and answer None until the head
is complete; a body's `BodyFraming.feed` says how many leading bytes of what
arrived belong to the body, skipping chunk data by arithmetic (never per byte).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, overload

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_HEAD",
    "MAX_HEADERS",
    "MAX_TRAILERS",
    "BadMessage",
    "BodyFraming",
    "RequestHead",
    "ResponseHead",
    "check_framing",
    "parse_request_head",
    "parse_response_head",
]

MAX_HEAD = 65536  # bytes of a head: start line + header lines + the final CRLFCRLF
MAX_HEADERS = 100  # header lines in a head
MAX_CHUNK_LINE = 8192  # bytes of a chunk-size line or a trailer line, CRLF included
MAX_TRAILERS = 65536  # bytes of a chunked body's trailer section

Buffer = bytes | bytearray | memoryview
Headers = tuple[tuple[bytes, bytes], ...]

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = _TCHAR + rb"+"
# a field value: bytes >= 0x20 and HTAB, no leading or trailing whitespace (RFC 9110 5.5)
_VALUE = rb"(?:[\x21-\xff]+(?:[ \t]+[\x21-\xff]+)*)?"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\xff]*))?")
# one header line per match: a match starts after a CRLF (the block follows the start line) and ends
# at the next CRLF, so as many matches as CRLFs means every line matched whole (and no
# bare CR or LF anywhere: neither is in the grammar)
_FIELD_LINES = re.compile(rb"(?<=\r\n)(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n")
_FIELD_LINE = re.compile(_TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n")
_LEADING_CRLF = re.compile(rb"(?:\r\n)*")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXT = (
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
# at most 15 hex digits (under 2^60): a server that reads sizes as signed 64-bit integers
# must not see another end of the body than the relay does
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})" + _CHUNK_EXT + rb"\r\n")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_TCHAR_ONLY = re.compile(_TOKEN)
_METHOD = re.compile(_TCHAR + rb"*")


class BadMessage(ValueError):
    """A head or body the relay does not pass on; `status` is what a guest is answered
    (400, 431, 501, 505; 502 for what an upstream sent)."""

    status: int

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


# -- bodies ---------------------------------------------------------------------------------

_NONE: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_CLOSE: Final = 3

# chunked states
_SIZE: Final = 0  # reading a chunk-size line
_DATA: Final = 1  # inside chunk data (`_left` bytes to go)
_DATA_CR: Final = 2  # the CR after chunk data
_DATA_LF: Final = 3  # the LF after chunk data
_TRAILER: Final = 4  # reading trailer lines until the empty one
_END: Final = 5


class _UntilClose:
    """`BodyFraming.until_close()` (on the class): a response body that ends when its sender
    closes, never done by feed; `body.until_close` (on a body): whether it is one."""

    @overload
    def __get__(self, obj: None, owner: type[BodyFraming]) -> Callable[[], BodyFraming]: ...
    @overload
    def __get__(self, obj: BodyFraming, owner: type[BodyFraming]) -> bool: ...
    def __get__(
        self, obj: BodyFraming | None, owner: type[BodyFraming]
    ) -> bool | Callable[[], BodyFraming]:
        if obj is None:
            return lambda: owner(_CLOSE)
        return obj._mode == _CLOSE


class BodyFraming:
    """Counts one message body's bytes as they pass (the bytes pass through unchanged).

    `until_close` is both the factory (`BodyFraming.until_close()`) and, on a body, whether
    it is one (`body.until_close`): a descriptor tells the two apart.
    """

    __slots__ = (
        "_left",
        "_line",
        "_mode",
        "_state",
        "_status",
        "_trailer",
        "_trailers_allowed",
        "done",
        "remaining",
    )

    until_close = _UntilClose()

    done: bool  # the body's last byte (for chunked: the trailer section's last CRLF) was consumed
    remaining: int  # for length(): bytes still to come (may be spliced as they are); -1 otherwise

    def __init__(self, mode: int, n: int = -1, status: int = 400, trailers: bool = True) -> None:
        self._mode = mode
        # A request's trailer fields would reach the upstream unchecked (an identity
        # header among them), so only a response's may pass.
        self._trailers_allowed = trailers
        self._state = _SIZE
        self._left = 0  # chunk data bytes to go
        self._line = b""  # a chunk-size or trailer line received in part
        self._trailer = 0  # trailer section bytes so far
        self._status = status  # what a guest is answered when the body is bad
        self.remaining = n
        self.done = mode == _NONE or (mode == _LENGTH and n == 0)

    def __repr__(self) -> str:
        kind = ("none", "length", "chunked", "until_close")[self._mode]
        return f"<BodyFraming {kind} done={self.done} remaining={self.remaining}>"

    @classmethod
    def none(cls) -> BodyFraming:
        """No body: done at once.  One shared instance: a body of none never changes (feed
        takes nothing from it), and the HTTP path asks for one several times a request."""
        return _NO_BODY

    @classmethod
    def length(cls, n: int) -> BodyFraming:
        """A Content-Length body: done after n bytes."""
        return cls(_LENGTH, n)

    @classmethod
    def chunked(cls, trailers: bool = True) -> BodyFraming:
        """A chunked body: done after the last chunk and the trailer section (which must
        be empty when `trailers` is false: a guest's request)."""
        return cls(_CHUNKED, trailers=trailers)

    def feed(self, data: Buffer) -> int:
        """How many leading bytes of `data` belong to this body (<= len(data)); sets
        `done` when they include its end.  Raises BadMessage on bad chunked syntax."""
        mode = self._mode
        if mode == _LENGTH:
            n = self.remaining
            if len(data) < n:
                n = len(data)
            self.remaining -= n
            if not self.remaining:
                self.done = True
            return n
        if mode == _CHUNKED:
            if self._state == _DATA and self._left >= len(data):
                self._left -= len(data)  # the common case: a piece inside one chunk
                return len(data)
            return self._feed_chunked(data if not isinstance(data, memoryview) else data.tobytes())
        if mode == _CLOSE:
            return len(data)
        return 0

    def _bad(self, reason: str) -> BadMessage:
        return BadMessage(reason, self._status)

    def _read_line(self, data: bytes | bytearray, pos: int) -> tuple[bytes | None, int]:
        """A whole line (CRLF included) from the partial one and `data[pos:]`, or None and
        len(data) when the line goes on past `data`."""
        have = self._line
        budget = MAX_CHUNK_LINE - len(have)
        lf = data.find(b"\n", pos, pos + budget)
        if lf == -1:
            if len(data) - pos >= budget:
                raise self._bad("chunk-size or trailer line over 8 KiB")
            self._line = have + data[pos:]
            return None, len(data)
        line = have + data[pos : lf + 1] if have else bytes(data[pos : lf + 1])
        self._line = b""
        if len(line) < 2 or line[-2] != 13:
            raise self._bad("a chunked body line ends in a bare LF")
        return line, lf + 1

    def _feed_chunked(self, data: bytes | bytearray) -> int:
        n = len(data)
        pos = 0
        state = self._state
        try:
            while pos < n:
                if state == _DATA:
                    left = self._left
                    if left > n - pos:
                        self._left = left - (n - pos)
                        pos = n
                        break
                    pos += left
                    self._left = 0
                    if data[pos : pos + 2] == b"\r\n":
                        pos += 2
                        state = _SIZE
                    else:
                        state = _DATA_CR
                elif state == _SIZE:
                    line, pos = self._read_line(data, pos)
                    if line is None:
                        break
                    m = _CHUNK_SIZE.fullmatch(line)
                    if m is None:
                        raise self._bad("bad chunk-size line")
                    size = int(m.group(1), 16)
                    if size:
                        self._left = size
                        state = _DATA
                    else:
                        state = _TRAILER
                elif state == _DATA_CR:
                    if data[pos] != 13:
                        raise self._bad("no CRLF after chunk data")
                    pos += 1
                    state = _DATA_LF
                elif state == _DATA_LF:
                    if data[pos] != 10:
                        raise self._bad("no CRLF after chunk data")
                    pos += 1
                    state = _SIZE
                elif state == _TRAILER:
                    line, pos = self._read_line(data, pos)
                    if line is None:
                        break
                    self._trailer += len(line)
                    if self._trailer > MAX_TRAILERS:
                        raise self._bad("trailer section over 64 KiB")
                    if line == b"\r\n":
                        state = _END
                        self.done = True
                        break
                    if _FIELD_LINE.fullmatch(line) is None:
                        raise self._bad("bad trailer field line")
                    if not self._trailers_allowed:
                        raise self._bad("request trailer fields are not relayed")
                else:  # _END
                    break
        finally:
            self._state = state
        return pos


_NO_BODY = BodyFraming(_NONE)


# -- heads ----------------------------------------------------------------------------------


def _field(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _tokens(headers: Headers, name: bytes) -> list[bytes]:
    """The lower-cased elements of every `name` header's comma list."""
    out: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            for p in value.split(b","):  # (a loop, not generators: twice a request)
                if e := p.strip(b" \t").lower():
                    out.append(e)
    return out


def _keep_alive(headers: Headers, version: bytes) -> bool:
    connection = _tokens(headers, b"connection")
    if version == b"1.1":
        return b"close" not in connection
    return b"keep-alive" in connection and b"close" not in connection


def _framing_fields(headers: Sequence[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes]]:
    """(Transfer-Encoding values, Content-Length values), as sent."""
    te: list[bytes] = []
    cl: list[bytes] = []
    for key, value in headers:
        low = key.lower()
        if low == b"transfer-encoding":
            te.append(value)
        elif low == b"content-length":
            cl.append(value)
    return te, cl


def _content_length(values: list[bytes], status: int) -> int:
    """One Content-Length, sent once or as a list or repeats of the same digits."""
    seen = {p.strip(b" \t") for value in values for p in value.split(b",")}
    if len(seen) != 1:
        raise BadMessage("conflicting Content-Length values", status)
    (digits,) = seen
    if _DIGITS.fullmatch(digits) is None:
        raise BadMessage("Content-Length must be at most 18 digits", status)
    return int(digits)


def _codings(values: list[bytes]) -> list[bytes]:
    return [e for e in (p.strip(b" \t").lower() for v in values for p in v.split(b",")) if e]


def _request_body(headers: Sequence[tuple[bytes, bytes]], version: bytes) -> BodyFraming:
    te, cl = _framing_fields(headers)
    if te:
        if version != b"1.1":
            # a 1.0 reader may ignore it and read the body as further requests
            raise BadMessage("Transfer-Encoding needs HTTP/1.1")
        if cl:
            raise BadMessage("Content-Length and Transfer-Encoding together")
        codings = _codings(te)
        if not codings or codings[-1] != b"chunked":
            raise BadMessage("a request's last transfer coding must be chunked")
        if len(codings) > 1:
            if b"chunked" in codings[:-1] or not all(_TCHAR_ONLY.fullmatch(c) for c in codings):
                raise BadMessage("bad Transfer-Encoding")
            raise BadMessage("transfer codings other than chunked are not relayed", 501)
        return BodyFraming.chunked(trailers=False)
    if cl:
        n = _content_length(cl, 400)
        return BodyFraming.length(n)
    return BodyFraming.none()


def check_framing(headers: Sequence[tuple[bytes, bytes]], version: bytes = b"1.1") -> None:
    """Refuse (BadMessage) a request head whose body length two parsers could read
    two ways (request smuggling, RFC 9112 section 6.1): Content-Length beside
    Transfer-Encoding, Transfer-Encoding in HTTP/1.0, a Transfer-Encoding not ending
    in chunked, a bad or conflicting Content-Length.  The same rule as
    RequestHead.body, for heads another parser read."""
    _request_body(headers, version)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A checked request head; `size` bytes of the buffer were its (leading CRLFs included)."""

    method: str  # a token, as sent (case-sensitive)
    target: str  # as sent, visible ASCII only
    version: bytes  # b"1.0" or b"1.1"
    headers: Headers  # (name as sent, value without surrounding whitespace)
    size: int

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (give it lower-case), or None."""
        return _field(self.headers, name)

    def keep_alive(self) -> bool:
        """Whether the client lets the connection carry another request after this one."""
        return _keep_alive(self.headers, self.version)

    def upgrade(self) -> bool:
        """An Upgrade header with a Connection token "upgrade" (WebSocket and the like)."""
        return self.header(b"upgrade") is not None and b"upgrade" in _tokens(
            self.headers, b"connection"
        )

    def body(self) -> BodyFraming:
        """This request's body framing, or BadMessage (RFC 9112 section 6.3)."""
        return _request_body(self.headers, self.version)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A checked response head; `size` bytes of the buffer were its."""

    version: bytes
    status: int
    reason: bytes
    headers: Headers
    size: int

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (give it lower-case), or None."""
        return _field(self.headers, name)

    def keep_alive(self) -> bool:
        """Whether the server lets the connection carry another request after this one."""
        return _keep_alive(self.headers, self.version)

    def body(self, request_method: str) -> BodyFraming:
        """This response's body framing (RFC 9112 section 6.3), given its request's
        method; BadMessage 502 when two readers could read its length two ways."""
        status = self.status
        if request_method == "HEAD" or status < 200 or status in (204, 304):
            return BodyFraming.none()
        if request_method == "CONNECT" and status < 300:
            return BodyFraming.none()  # the tunnel follows
        te, cl = _framing_fields(self.headers)
        if te:
            if self.version != b"1.1":
                raise BadMessage("Transfer-Encoding in an HTTP/1.0 response", 502)
            if cl:
                # the recipient must drop one; we pass bytes on unchanged, so we drop the message
                raise BadMessage("Content-Length and Transfer-Encoding together", 502)
            codings = _codings(te)
            if codings and codings[-1] == b"chunked":
                if b"chunked" in codings[:-1]:
                    raise BadMessage("chunked applied twice", 502)
                return BodyFraming(_CHUNKED, status=502)  # a bad chunk is the upstream's fault
            return BodyFraming.until_close()
        if cl:
            return BodyFraming.length(_content_length(cl, 502))
        return BodyFraming.until_close()


def _bytes(buf: Buffer) -> bytes | bytearray:
    if isinstance(buf, memoryview):
        return buf[: MAX_HEAD + 4].tobytes()
    return buf


def _skip_crlf(buf: bytes | bytearray) -> int:
    """Where the empty lines a client may send before a request line end (RFC 9112 2.2)."""
    m = _LEADING_CRLF.match(buf, 0, MAX_HEAD)
    return m.end() if m else 0


def _find_head(buf: bytes | bytearray, status: int) -> tuple[int, int] | None:
    """(start, end): the head is buf[start:end] (end at its CRLFCRLF); None: not yet."""
    start = 0
    if buf[:1] == b"\r":
        start = _skip_crlf(buf)
    end = buf.find(b"\r\n\r\n", start, MAX_HEAD)
    if end != -1:
        return start, end
    if len(buf) >= MAX_HEAD:
        raise BadMessage("head over 64 KiB", 431 if status == 400 else status)
    if buf.count(b"\n", start) != buf.count(b"\r\n", start):
        raise BadMessage("a head line ends in a bare LF", status)
    return None


def _fields(data: bytes | bytearray, pos: int, end: int, status: int) -> Headers:
    """The header lines in data[pos:end] (each ending in CRLF) as (name, value) pairs."""
    lines = data.count(b"\r\n", pos, end)
    if lines > MAX_HEADERS:
        raise BadMessage("more than 100 header lines", 431 if status == 400 else status)
    pairs = _FIELD_LINES.findall(data, pos, end)
    if len(pairs) != lines:
        raise BadMessage(_field_fault(bytes(data[pos:end])), status)
    return tuple(pairs)


def _field_fault(block: bytes) -> str:
    """Why a header block failed (slow path: refusals only)."""
    for line in block.split(b"\r\n")[:-1]:
        if _FIELD_LINE.fullmatch(line + b"\r\n"):
            continue
        if b"\n" in line or b"\r" in line:
            return "a bare LF or CR in a head"
        if line[:1] in (b" ", b"\t"):
            return "obs-fold (a header line starting with whitespace)"
        name, colon, _ = line.partition(b":")
        if not colon:
            return "a header line without a colon"
        if name.rstrip(b" \t") != name:
            return "whitespace before a header's colon"
        if _TCHAR_ONLY.fullmatch(name) is None:
            return "a header name that is not a token"
        return "a control byte in a header value"
    return "a bad header line"


def _version(major: bytes, minor: bytes, status: int) -> bytes:
    if major == b"1" and minor in (b"0", b"1"):
        return b"1." + minor
    raise BadMessage(f"HTTP/{major.decode()}.{minor.decode()} is not relayed", status)


def parse_request_head(buf: Buffer) -> RequestHead | None:
    """The request head at the start of `buf`, or None while it is incomplete;
    BadMessage (400, 431, 501, 505) for what the relay does not pass on."""
    data = _bytes(buf)
    found = _find_head(data, 400)
    if found is None:
        _early_request_line(data)
        return None
    start, end = found
    eol = data.find(b"\r\n", start)
    m = _REQUEST_LINE.fullmatch(data, start, eol)
    if m is None:
        raise BadMessage(_request_line_fault(data[start:eol]))
    method, target, major, minor = m.groups()
    version = _version(major, minor, 505)
    return RequestHead(
        method.decode("ascii"),
        target.decode("latin-1"),
        version,
        _fields(data, eol + 2, end + 2, 400),
        end + 4,
    )


def _request_line_fault(line: bytes | bytearray) -> str:
    parts = line.split(b" ")
    if len(parts) == 3 and re.fullmatch(rb"HTTP/[0-9]\.[0-9]", parts[2]):
        return "a bad request method or target"
    return "a bad request line"


def _early_request_line(data: bytes | bytearray) -> None:
    """Refuse a request line that is complete and wrong before the rest of the head comes
    (a TLS hello on port 80 need not wait for 64 KiB)."""
    start = _skip_crlf(data) if data[:1] == b"\r" else 0
    eol = data.find(b"\r\n", start)
    if eol == -1:
        if start < len(data) and data[start] != 13:  # a CR may begin an empty line
            method_end = _METHOD.match(data, start).end()  # type: ignore[union-attr]
            if method_end == start or (method_end < len(data) and data[method_end] != 32):
                raise BadMessage("a bad request line")
        return
    m = _REQUEST_LINE.fullmatch(data, start, eol)
    if m is None:
        raise BadMessage(_request_line_fault(data[start:eol]))
    _version(m.group(3), m.group(4), 505)


def parse_response_head(buf: Buffer) -> ResponseHead | None:
    """The response head at the start of `buf`, or None while it is incomplete;
    BadMessage 502 for what the relay does not pass on to a guest."""
    data = _bytes(buf)
    found = _find_head(data, 502)
    if found is None:
        return None
    start, end = found
    if start:
        raise BadMessage("empty lines before a status line", 502)
    eol = data.find(b"\r\n")
    m = _STATUS_LINE.fullmatch(data, 0, eol)
    if m is None:
        raise BadMessage("a bad status line", 502)
    major, minor, code, reason = m.groups()
    return ResponseHead(
        _version(major, minor, 502),
        int(code),
        bytes(reason or b""),
        _fields(data, eol + 2, end + 2, 502),
        end + 4,
    )

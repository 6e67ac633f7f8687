"""Counting the messages an SMTP server accepted, from the bytes a relay passes (sans-IO).

Fed both directions of one plaintext SMTP session in the order the relay moved them
(`client`: guest to server; `server`: server to guest), in any chunks.  Each command
line the guest sends waits, in order, for one reply of the server (pipelining, RFC
2920, is just several in flight); a reply is its last line ("250 ok" after "250-...").
A message is counted when the reply to its end of data is 2xx: the "." after DATA
(whose content is skipped up to CRLF.CRLF, so a dot-stuffed "..", a line split
across chunks, or a "." inside a line end nothing; a reply that comes while the
content is still being read ends it too: the server took some other end, such as a
bare-LF "."), or BDAT ... LAST (RFC 3030, whose chunk is skipped by its size).  One
count per transaction (an LMTP server's reply per recipient is not SMTP).  After a
220 to STARTTLS the rest is encrypted: the observer stops (`encrypted`) and counts
nothing more.  Memory is bounded: a line outside the
content is kept to LINE_LIMIT bytes (the rest of it is dropped until its end), and a
guest that sends more than HOLD_LIMIT bytes before the reply to DATA or STARTTLS came
(no SMTP client does) or more than MAX_PENDING commands without a reply makes it
give up (`stopped`, the count so far kept).
"""

from __future__ import annotations

from collections import deque

LINE_LIMIT = 4096
HOLD_LIMIT = 64 * 1024
MAX_PENDING = 1024

# what a reply in the queue answers
_GREETING, _COMMAND, _DATA, _END, _CHUNK, _LAST, _STARTTLS = range(7)
# how the guest's bytes are read
_LINES, _CONTENT, _SKIP, _WAIT = range(4)
_END_MARK = b"\r\n.\r\n"

Bytes = bytes | bytearray | memoryview


class SmtpMessages:
    """Messages the server accepted in one SMTP session (`messages`)."""

    __slots__ = (
        "_cbuf",
        "_chunk_left",
        "_clong",
        "_expect",
        "_mode",
        "_sbuf",
        "_slong",
        "_tail",
        "encrypted",
        "messages",
        "stopped",
    )

    def __init__(self) -> None:
        self.messages = 0
        self.encrypted = False  # STARTTLS was accepted: nothing after it is readable
        self.stopped = False  # not reading any more (encrypted, or a guest out of bounds)
        self._expect: deque[int] = deque((_GREETING,))
        self._mode = _LINES
        self._cbuf = bytearray()  # guest bytes not read yet
        self._clong: bytes | None = None  # the kept start of an overlong guest line
        self._sbuf = bytearray()
        self._slong: bytes | None = None
        self._tail = b""  # the content's last bytes (its end mark may span chunks)
        self._chunk_left = 0  # BDAT bytes still to skip

    # -- guest to server ------------------------------------------------------------
    def client(self, data: Bytes) -> None:
        if self.stopped:
            return
        self._cbuf += data
        self._read_client()

    def _read_client(self) -> None:
        buf = self._cbuf
        while buf and not self.stopped:
            mode = self._mode
            if mode == _WAIT:  # the reply to DATA or STARTTLS says how to read on
                if len(buf) > HOLD_LIMIT:
                    self._stop()
                return
            if mode == _CONTENT:
                window = self._tail + buf
                at = window.find(_END_MARK)
                if at < 0:
                    self._tail = bytes(window[-4:])
                    buf.clear()
                    return
                del buf[: at + len(_END_MARK) - len(self._tail)]
                self._tail = b""
                self._mode = _LINES
                self._expects(_END)
                continue
            if mode == _SKIP:
                n = min(self._chunk_left, len(buf))
                del buf[:n]
                self._chunk_left -= n
                if not self._chunk_left:
                    self._mode = _LINES
                continue
            line = self._line(buf, client=True)
            if line is None:
                return
            self._command(line)

    def _command(self, line: bytes) -> None:
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"DATA":
            self._expects(_DATA)
            self._mode = _WAIT
        elif verb == b"STARTTLS":
            self._expects(_STARTTLS)
            self._mode = _WAIT
        elif verb == b"BDAT" and len(words) >= 2 and words[1].isdigit():
            last = len(words) >= 3 and words[2].upper() == b"LAST"
            self._expects(_LAST if last else _CHUNK)
            self._chunk_left = int(words[1])
            if self._chunk_left:
                self._mode = _SKIP
        else:
            self._expects(_COMMAND)

    def _expects(self, what: int) -> None:
        if len(self._expect) >= MAX_PENDING:
            self._stop()
            return
        self._expect.append(what)

    # -- server to guest ------------------------------------------------------------
    def server(self, data: Bytes) -> None:
        if self.stopped:
            return
        buf = self._sbuf
        buf += data
        while not self.stopped:
            line = self._line(buf, client=False)
            if line is None:
                return
            if line[3:4] == b"-":  # more lines of this reply follow
                continue
            self._reply(line[:3])

    def _reply(self, code: bytes) -> None:
        if not self._expect:
            if self._mode == _CONTENT:
                # the server saw an end of data we did not (a bare-LF ".", which some
                # servers take): its reply ends the content all the same
                self._mode, self._tail = _LINES, b""
                self.messages += code[:1] == b"2"
            return  # else unasked (a 421 before closing, say): nothing it could count
        what = self._expect.popleft()
        ok = code[:1] == b"2"
        if what in (_END, _LAST):
            self.messages += ok
        elif what == _DATA:
            if code == b"354":
                self._mode, self._tail = _CONTENT, b"\r\n"  # content starts on a new line
            else:
                self._mode = _LINES
            self._read_client()
        elif what == _STARTTLS:
            if code == b"220":
                self.encrypted = True
                self._stop()
                return
            self._mode = _LINES
            self._read_client()

    # -- both -----------------------------------------------------------------------
    def _line(self, buf: bytearray, client: bool) -> bytes | None:
        """The next whole line out of buf (without its line end, at most LINE_LIMIT
        bytes of it), or None until it is in."""
        end = buf.find(b"\n")
        long = self._clong if client else self._slong
        if end < 0:
            if long is not None:
                buf.clear()  # the rest of an overlong line: dropped
            elif len(buf) > LINE_LIMIT:
                long = bytes(buf[:LINE_LIMIT])
                buf.clear()
                if client:
                    self._clong = long
                else:
                    self._slong = long
            return None
        line = bytes(buf[:end]).rstrip(b"\r")
        del buf[: end + 1]
        if long is not None:
            line = long
            if client:
                self._clong = None
            else:
                self._slong = None
        return line[:LINE_LIMIT]

    def _stop(self) -> None:
        self.stopped = True
        self._cbuf.clear()
        self._sbuf.clear()
        self._expect.clear()
        self._tail = b""


__all__ = ["HOLD_LIMIT", "LINE_LIMIT", "MAX_PENDING", "SmtpMessages"]

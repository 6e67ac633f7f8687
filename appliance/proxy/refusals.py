"""A "no" in each protocol's own words (sans-IO: bytes in, bytes out).

Mail clients show server replies to their users, so a refusal is a short
dialog in the protocol: SMTP answers the greeting and EHLO, then refuses every
mail transaction with the reply code (530/554) until QUIT; POP3 greets, lists
AUTH-RESP-CODE in CAPA (RFC 2449/3206) and refuses USER/PASS/APOP/AUTH with
`-ERR [AUTH]` / `[SYS/PERM]` / `[SYS/TEMP]`.  "Upstream down" in SMTP is the
RFC 5321 421 greeting.  IMAP greets with `* BYE` (RFC 9051 7.1.5) and an
`[ALERT]`, which clients must show, or `[UNAVAILABLE]` (RFC 5530).  A spent
quota (a rule's quota_bytes_per_day) is a transient no: SMTP greets and answers
each transaction with 452 4.7.1 (the client keeps the mail and tries later), POP3
`-ERR [SYS/TEMP]`, IMAP `* BYE [LIMIT]` (RFC 5530), HTTP 429.  A TLS
service waits for the ClientHello and answers with a fatal alert
(`access_denied`; `unrecognized_name` for a name that does not resolve,
RFC 6066 3): a client that is sent an alert before its hello may see a
reset instead of the alert.  No text here ever carries an upstream address: the
wording is built from the refusal kind, the rule name and the portal URL only.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from appliance.proxy.client_hello import BadHello, HelloReader
from appliance.proxy.gate import NO_SUCH_HOST, Refusal

MAX_LINE = 4096
MAX_COMMANDS = 20  # commands a refusal dialog answers before it closes


# The words are the same in every mail protocol; each has its own codes in front
# (login, denied, limit, unavailable)
_WORDS = {
    "login": "log in first at {portal}",
    "denied": "access denied by site policy{rule}",
    "limit": "too many connections from you, try again later",
    "unavailable": "mail service temporarily unavailable, try again later",
    "quota": "quota for today used up, try again tomorrow",
}
_CODES = {
    "smtp": {"login": "530 5.7.0", "denied": "554 5.7.1", "limit": "421 4.7.0",
             "unavailable": "421 4.3.0", "quota": "452 4.7.1"},
    "pop3": {"login": "-ERR [AUTH]", "denied": "-ERR [SYS/PERM]", "limit": "-ERR [SYS/TEMP]",
             "unavailable": "-ERR [SYS/TEMP]", "quota": "-ERR [SYS/TEMP]"},
    "imap": {"login": "* BYE [ALERT]", "denied": "* BYE [ALERT]",
             "limit": "* BYE [UNAVAILABLE]", "unavailable": "* BYE [UNAVAILABLE]",
             "quota": "* BYE [LIMIT]"},
}  # fmt: skip


def mail_reply(protocol: str, r: Refusal) -> str:
    """The refusal line of a mail protocol (smtp, pop3, imap), without CRLF."""
    rule = f" (rule {r.rule})" if r.rule and r.kind == "denied" else ""
    words = _WORDS[r.kind].format(portal=r.portal_url, rule=rule)
    return f"{_CODES[protocol][r.kind]} {words}"


def smtp_reply(r: Refusal) -> str:
    return mail_reply("smtp", r)


def pop3_reply(r: Refusal) -> str:
    return mail_reply("pop3", r)


def imap_reply(r: Refusal) -> str:
    return mail_reply("imap", r)


# TLS alert descriptions (RFC 8446 6)
ACCESS_DENIED = 49
INTERNAL_ERROR = 80
UNRECOGNIZED_NAME = 112


def tls_alert(description: int) -> bytes:
    """One fatal alert record, in the clear (no handshake has happened)."""
    return bytes((21, 3, 3, 0, 2, 2, description))


def tls_refusal(r: Refusal) -> bytes:
    if r.kind in ("login", "denied", "quota"):
        return tls_alert(ACCESS_DENIED)
    if r.reason == NO_SUCH_HOST:
        return tls_alert(UNRECOGNIZED_NAME)
    return tls_alert(INTERNAL_ERROR)


@dataclass
class RefusalDialog:
    """A tiny server that can only say no, politely and in protocol."""

    protocol: str  # smtp | pop3 | imap | tls | tcp
    refusal: Refusal
    _buf: bytes = b""
    closed: bool = False
    answered: int = 0
    hello: HelloReader | None = None  # tls: the ClientHello the alert answers

    def greeting(self) -> bytes:
        """Bytes to send at connect; `closed` is True when the dialog ends right there."""
        if self.protocol == "tls":
            self.hello = HelloReader()
            return b""
        if self.protocol == "imap":
            self.closed = True
            return (imap_reply(self.refusal) + "\r\n").encode()
        if self.protocol == "smtp":
            if self.refusal.kind in ("unavailable", "limit"):
                self.closed = True
                return (smtp_reply(self.refusal) + "\r\n").encode()
            return b"220 guest gateway ESMTP (refusing)\r\n"
        if self.protocol == "pop3":
            return b"+OK guest gateway POP3 ready\r\n"
        self.closed = True
        return b""

    def feed(self, data: bytes) -> bytes:
        """Client bytes in; reply bytes out.  Sets `closed` after QUIT or a line too long."""
        if self.hello is not None:
            return self._hello(data)
        self._buf += data
        out = []
        while not self.closed and b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            out.append(self._answer(line.strip().decode("latin-1")))
            self.answered += 1
            if self.answered >= MAX_COMMANDS:  # no mail client needs more to read the refusal;
                self.closed = True  # and a flood of empty lines must not make us talk 50x more
        if len(self._buf) > MAX_LINE:
            self.closed = True
        return "".join(out).encode()

    def _hello(self, data: bytes) -> bytes:
        """The alert once the ClientHello is in (or cannot be one); nothing for bytes
        that are not TLS at all."""
        assert self.hello is not None
        try:
            if self.hello.feed(data) is None:
                return b""
        except BadHello as exc:
            self.closed = True
            return b"" if str(exc) == "not TLS" else tls_refusal(self.refusal)
        self.closed = True
        return tls_refusal(self.refusal)

    def _answer(self, line: str) -> str:
        verb = line.split(" ", 1)[0].upper()
        if self.protocol == "smtp":
            if verb in ("EHLO", "HELO"):
                return "250 guest gateway\r\n"
            if verb in ("NOOP", "RSET"):
                return "250 2.0.0 ok\r\n"
            if verb == "QUIT":
                self.closed = True
                return "221 2.0.0 bye\r\n"
            return smtp_reply(self.refusal) + "\r\n"
        if verb == "CAPA":
            return "+OK\r\nUSER\r\nAUTH-RESP-CODE\r\n.\r\n"
        if verb in ("NOOP",):
            return "+OK\r\n"
        if verb == "QUIT":
            self.closed = True
            return "+OK bye\r\n"
        return pop3_reply(self.refusal) + "\r\n"


_TITLES = {
    302: "Found",
    403: "Forbidden",
    429: "Too Many Requests",
    502: "Bad Gateway",
    511: "Network Authentication Required",
}


def http_refusal(r: Refusal, wants_html: bool) -> tuple[int, bytes]:
    """Status and whole response for a refused request (302 for browsers, 511 for the rest)."""
    url = html.escape(r.portal_url)
    extra = ""
    if r.kind == "login":
        status = 302 if wants_html else 511
        extra = f"Location: {r.portal_url}\r\n" if status == 302 else ""
        body = (
            f'<p>Please log in on the <a href="{url}">guest portal</a> first.</p>'
            f'<meta http-equiv="refresh" content="0;url={url}">'
        )
    elif r.kind == "denied":
        status = 403
        rule = html.escape(r.rule) if r.rule else "no rule"
        body = (
            f"<p>Access denied by site policy: {html.escape(r.reason)}.</p>"
            f"<p>Rule: <b>{rule}</b></p>"
        )
    elif r.kind == "limit":
        status = 429
        body = "<p>Too many connections from your device; try again shortly.</p>"
    elif r.kind == "quota":
        status = 429
        body = "<p>Your quota for today on this service is used up; try again tomorrow.</p>"
    else:
        status = 502
        body = "<p>The web service is not reachable right now; try again shortly.</p>"
    page = (
        f"<!doctype html><html><head><title>{status} {_TITLES[status]}</title></head>"
        f"<body><h1>{_TITLES[status]}</h1>{body}</body></html>\n"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_TITLES[status]}\r\n{extra}"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(page)}\r\nCache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return status, head + page

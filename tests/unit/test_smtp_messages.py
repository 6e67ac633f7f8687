"""The SMTP observer: messages the server accepted, from both directions' bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.proxy.smtp_messages import HOLD_LIMIT, LINE_LIMIT, SmtpMessages

pytestmark = pytest.mark.unit

C, S = "client", "server"
Dialog = list[tuple[str, bytes]]

GREET = [(S, b"220 mx.example ESMTP\r\n"), (C, b"EHLO guest\r\n")]
EHLO_REPLY = (S, b"250-mx.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 STARTTLS\r\n")


def mail(body: bytes, end_reply: bytes = b"250 2.0.0 queued\r\n") -> Dialog:
    return [
        (C, b"MAIL FROM:<a@x>\r\n"),
        (S, b"250 ok\r\n"),
        (C, b"RCPT TO:<b@y>\r\n"),
        (S, b"250 ok\r\n"),
        (C, b"DATA\r\n"),
        (S, b"354 go ahead\r\n"),
        (C, body + b".\r\n"),
        (S, end_reply),
    ]


BODY = b"Subject: hi\r\n\r\n..a stuffed dot\r\n.x\r\nnot the end: \r\n.\r \r\nlast\r\n"
PIPELINED = [
    (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<nobody@y>\r\nDATA\r\n"),
    (S, b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n"),
    (C, b"one\r\n.\r\n"),
    (S, b"250 queued\r\n"),
]
BDAT = [
    (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 13\r\nQUIT\r\n.\r\nDATABDAT 3 LAST\r\nabc"),
    (S, b"250 ok\r\n250 ok\r\n250 13 bytes\r\n250 queued\r\n"),
]
DIALOG: Dialog = [
    *GREET,
    EHLO_REPLY,
    *mail(BODY),
    *mail(b"refused at the end\r\n", b"554 5.7.1 spam\r\n"),
    *PIPELINED,
    (C, b"RSET\r\n"),
    (S, b"250 ok\r\n"),
    (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody@y>\r\nDATA\r\n"),
    (S, b"250 ok\r\n550 no such user\r\n554 5.5.1 no valid recipients\r\n"),
    (C, b"RSET\r\n"),  # (DATA refused: what follows are commands again)
    (S, b"250 ok\r\n"),
    *BDAT,
    (C, b"QUIT\r\n"),
    (S, b"221 bye\r\n"),
]
DIALOG_COUNT = 3  # BODY, the pipelined one, the BDAT one


def run(dialog: Dialog, obs: SmtpMessages | None = None) -> SmtpMessages:
    obs = obs or SmtpMessages()
    for side, data in dialog:
        (obs.client if side == C else obs.server)(data)
    return obs


def test_counts_only_what_the_server_accepted_at_end_of_data() -> None:
    obs = run(DIALOG)
    assert obs.messages == DIALOG_COUNT
    assert not obs.encrypted and not obs.stopped


def test_a_rejected_recipient_never_reaching_data_is_no_message() -> None:
    dialog = [
        *GREET,
        EHLO_REPLY,
        (C, b"MAIL FROM:<a@x>\r\n"),
        (S, b"250 ok\r\n"),
        (C, b"RCPT TO:<x@elsewhere>\r\n"),
        (S, b"554 5.7.1 Relay access denied\r\n"),
        (C, b"QUIT\r\n"),
        (S, b"221 bye\r\n"),
    ]
    assert run(dialog).messages == 0


def test_starttls_accepted_stops_reading() -> None:
    hello_like = bytes(range(256)) + b"\r\nDATA\r\n.\r\n250 ok\r\n"
    obs = run(
        [
            *GREET,
            EHLO_REPLY,
            *mail(b"before\r\n"),
            (C, b"STARTTLS\r\n"),
            (S, b"220 2.0.0 ready\r\n"),
            *mail(b"after, encrypted in real life\r\n"),
            (C, hello_like),
            (S, hello_like),
        ]
    )
    assert obs.encrypted and obs.stopped
    assert obs.messages == 1


def test_starttls_refused_reads_on() -> None:
    obs = run(
        [
            *GREET,
            EHLO_REPLY,
            (C, b"STARTTLS\r\n"),
            (S, b"454 4.7.0 TLS not available\r\n"),
            *mail(b"plain\r\n"),
        ]
    )
    assert not obs.encrypted and obs.messages == 1


def test_the_end_mark_split_byte_by_byte() -> None:
    obs = run([*GREET, EHLO_REPLY, *mail(b"x\r\n")[:6]])
    for b in b"line\r\n.\r\n":
        obs.client(bytes([b]))
    assert obs.messages == 0
    obs.server(b"250 ")
    assert obs.messages == 0  # the reply's line is not complete yet
    obs.server(b"queued\r\n")
    assert obs.messages == 1


def test_an_overlong_line_is_not_kept_whole() -> None:
    obs = run([*GREET, EHLO_REPLY])
    for _ in range(100):
        obs.client(b"X" * 10_000)
    assert len(obs._cbuf) <= LINE_LIMIT
    obs.client(b"\r\n")
    obs.server(b"500 5.5.2 line too long\r\n")
    run(mail(b"after\r\n"), obs)
    assert obs.messages == 1 and not obs.stopped


def test_a_guest_not_waiting_for_354_beyond_the_bound_makes_it_give_up() -> None:
    obs = run([*GREET, EHLO_REPLY, *mail(b"")[:4], (C, b"DATA\r\n")])
    obs.client(b"y" * (HOLD_LIMIT + 1))
    assert obs.stopped and not obs.encrypted and len(obs._cbuf) == 0
    obs.server(b"354 go\r\n")
    obs.client(b".\r\n")
    obs.server(b"250 ok\r\n")
    assert obs.messages == 0


def test_a_reply_during_the_content_ends_it() -> None:
    obs = run([*GREET, EHLO_REPLY, *mail(b"")[:6]])
    obs.client(b"bare line feeds\n.\n")  # a server that takes this as the end
    obs.server(b"250 queued\r\n")
    run(mail(b"next\r\n"), obs)
    assert obs.messages == 2


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for p in [*points, len(data)]:
        out.append(data[start:p])
        start = p
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=1000), max_size=8), min_size=1))
def test_any_split_of_the_dialog_gives_the_same_count(cuts: list[list[int]]) -> None:
    obs = SmtpMessages()
    for i, (side, data) in enumerate(DIALOG):
        for piece in splits(data, cuts[i % len(cuts)]):
            (obs.client if side == C else obs.server)(piece)
    assert obs.messages == DIALOG_COUNT


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=40))
def test_random_bytes_never_raise_and_stay_bounded(turns: list[tuple[bool, bytes]]) -> None:
    obs = SmtpMessages()
    for to_server, data in turns:
        (obs.client if to_server else obs.server)(data)
        assert len(obs._cbuf) <= HOLD_LIMIT + 300 and len(obs._sbuf) <= LINE_LIMIT + 300
    assert obs.messages >= 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 2 LAST\r\n", b".\r\n", b"\r\n"]),
        max_size=30,
    ),
    st.lists(st.sampled_from([b"250 ok\r\n", b"354 go\r\n", b"220 tls\r\n", b"250-x\r\n"])),
)
def test_smtp_like_noise_never_raises(cmds: list[bytes], replies: list[bytes]) -> None:
    obs = SmtpMessages()
    for c, r in zip(cmds, replies, strict=False):
        obs.client(c)
        obs.server(r)
    assert obs.messages <= len(replies)


LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def stuffed(lines: list[bytes]) -> bytes:
    """A message body as a client sends it after DATA: CRLF lines, a leading dot doubled."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


# one transaction: (its dialog, whether the server accepted a message)
TRANSACTION = st.one_of(
    st.tuples(st.lists(LINE, max_size=6), st.booleans(), st.booleans()).map(
        lambda t: (
            mail(stuffed(t[0]), b"250 ok\r\n" if t[1] else b"554 no\r\n")
            if t[2]
            else [
                (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
                (S, b"250 ok\r\n250 ok\r\n354 go\r\n"),
                (C, stuffed(t[0]) + b".\r\n"),
                (S, b"250-ok\r\n250 queued\r\n" if t[1] else b"451 later\r\n"),
            ],
            t[1],
        )
    ),
    st.binary(max_size=60).map(
        lambda body: (
            [
                (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"),
                (C, b"BDAT %d LAST\r\n" % len(body) + body),
                (S, b"250 ok\r\n250 ok\r\n250 queued\r\n"),
            ],
            True,
        )
    ),
    st.just(
        (
            [
                (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<x@z>\r\nDATA\r\n"),
                (S, b"250 ok\r\n554 relay denied\r\n554 no valid recipients\r\n"),
            ],
            False,
        )
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TRANSACTION, max_size=6), st.lists(st.integers(0, 200), max_size=6))
def test_generated_dialogs_count_the_accepted_ones_in_any_split(
    transactions: list[tuple[Dialog, bool]], cuts: list[int]
) -> None:
    dialog = [*GREET, EHLO_REPLY]
    for turns, _ in transactions:
        dialog += [*turns, (C, b"RSET\r\n"), (S, b"250 ok\r\n")]
    obs = SmtpMessages()
    for side, data in dialog:
        for piece in splits(data, cuts):
            (obs.client if side == C else obs.server)(piece)
    assert obs.messages == sum(ok for _, ok in transactions)
    assert not obs.stopped

"""The ClientHello reader the HTTPS relay routes by: real hellos from Python's ssl, openssl
s_client and curl give their SNI, ALPN and version in every split; each malformed or
refused hello fails with its reason; no byte sequence makes it raise anything else."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.proxy.client_hello import MAX_HELLO, BadHello, ClientHello, HelloReader

pytestmark = pytest.mark.unit


# --- real hellos -------------------------------------------------------------------------


def python_hello(
    server_hostname: str | None = "www.example.com",
    alpn: list[str] | None = None,
    tls12_only: bool = False,
) -> bytes:
    """The first flight Python's ssl (OpenSSL) sends, without any network."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


REAL = python_hello(alpn=["h2", "http/1.1"])


def capture(argv: list[str], timeout: float = 10.0) -> bytes:
    """What a real client sends first to a plain TCP listener on loopback; `argv` has
    {port} where the port goes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(timeout)
        port = listener.getsockname()[1]
        cmd = [a.replace("{port}", str(port)) for a in argv]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                reader = HelloReader()
                while reader.feed(conn.recv(4096) or b"") is None:
                    assert reader.pending < 65536, "no hello"
                return reader.raw
        finally:
            proc.kill()
            proc.wait()


def handshake_of(first_flight: bytes) -> bytes:
    """The handshake message carried in the records of `first_flight` (one hello)."""
    out, i = b"", 0
    while i < len(first_flight):
        length = int.from_bytes(first_flight[i + 3 : i + 5], "big")
        out += first_flight[i + 5 : i + 5 + length]
        i += 5 + length
    return out


def records(message: bytes, size: int = 16384, version: int = 0x0301, ctype: int = 22) -> bytes:
    """`message` re-framed into records of at most `size` bytes."""
    out = b""
    for i in range(0, len(message), size):
        piece = message[i : i + size]
        out += struct.pack("!BHH", ctype, version, len(piece)) + piece
    return out


def split_feed(data: bytes, cuts: Iterable[int]) -> tuple[ClientHello | None, HelloReader]:
    reader = HelloReader()
    result, last = None, 0
    for cut in [*sorted(set(cuts)), len(data)]:
        result = reader.feed(data[last:cut])
        last = cut
    return result, reader


def outcome(data: bytes, cuts: Iterable[int] = ()) -> ClientHello | str | None:
    """The hello, the refusal's reason or None (more bytes wanted)."""
    try:
        return split_feed(data, cuts)[0]
    except BadHello as exc:
        return f"BadHello: {exc}"


def test_python_tls13_hello_with_sni_and_alpn() -> None:
    assert HelloReader().feed(REAL) == ClientHello(
        sni="www.example.com", alpn=("h2", "http/1.1"), version=0x0304
    )


def test_python_hello_without_sni_or_alpn() -> None:
    assert HelloReader().feed(python_hello(None)) == ClientHello(None, (), 0x0304)


def test_tls12_only_hello_reports_its_legacy_version() -> None:
    hello = HelloReader().feed(python_hello("old.example", tls12_only=True))
    assert hello == ClientHello("old.example", (), 0x0303)


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_openssl_s_client_hello() -> None:
    connect = ["-connect", "127.0.0.1:{port}", "-servername", "x.example", "-alpn", "h2"]
    raw = capture(["openssl", "s_client", *connect])
    hello = HelloReader().feed(raw)
    assert hello == ClientHello(sni="x.example", alpn=("h2",), version=0x0304)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_hello() -> None:
    resolve = ["--resolve", "curl.example:{port}:127.0.0.1", "https://curl.example:{port}/"]
    raw = capture(["curl", "-sk", "--max-time", "5", *resolve])
    hello = HelloReader().feed(raw)
    assert hello is not None
    assert hello.sni == "curl.example"
    assert "http/1.1" in hello.alpn
    assert hello.version == 0x0304


# --- splits --------------------------------------------------------------------------------


def test_one_byte_at_a_time() -> None:
    reader = HelloReader()
    results = [reader.feed(REAL[i : i + 1]) for i in range(len(REAL))]
    assert results[:-1] == [None] * (len(REAL) - 1)
    assert results[-1] == HelloReader().feed(REAL)
    assert reader.raw == REAL
    assert reader.pending == len(REAL)


@pytest.mark.parametrize("size", [1, 7, 100, 300])
def test_hello_reframed_into_small_records(size: int) -> None:
    reframed = records(handshake_of(REAL), size)
    assert len(reframed) > len(REAL)  # more records than the one it came in
    whole, reader = split_feed(reframed, ())
    assert whole == HelloReader().feed(REAL)
    bytewise, reader = split_feed(reframed, range(len(reframed)))
    assert bytewise == whole
    assert reader.raw == reframed


def test_feeds_after_the_hello_only_append() -> None:
    reader = HelloReader()
    hello = reader.feed(REAL)
    later = records(b"\x01\x00", ctype=21) + b"anything at all"
    assert reader.feed(later) is hello
    assert reader.feed(b"") is hello
    assert reader.raw == REAL + later
    assert reader.pending == len(REAL) + len(later)


def test_bytes_after_the_hello_record_in_the_same_feed_are_kept() -> None:
    early_data = records(b"\x17" * 40, ctype=23)
    reader = HelloReader()
    assert reader.feed(REAL + early_data) == HelloReader().feed(REAL)
    assert reader.raw == REAL + early_data


# --- hand-built hellos -------------------------------------------------------------------


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(kind: int, body: bytes) -> bytes:
    return u16(kind) + u16(len(body)) + body


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn(*names: bytes) -> bytes:
    body = b"".join(bytes([len(n)]) + n for n in names)
    return ext(16, u16(len(body)) + body)


def versions(*vs: int) -> bytes:
    body = b"".join(u16(v) for v in vs)
    return ext(43, bytes([len(body)]) + body)


def body(extensions: bytes | None = b"", legacy: int = 0x0303, session_id: bytes = b"\x00" * 32,
         suites: bytes = b"\x13\x01\x13\x02", methods: bytes = b"\x00") -> bytes:  # fmt: skip
    out = u16(legacy) + b"\x42" * 32 + bytes([len(session_id)]) + session_id
    out += u16(len(suites)) + suites + bytes([len(methods)]) + methods
    if extensions is not None:
        out += u16(len(extensions)) + extensions
    return out


def message(hello_body: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + len(hello_body).to_bytes(3, "big") + hello_body


def hello(*extensions: bytes, **kw: object) -> bytes:
    """A whole first flight: one record, one ClientHello with these extensions."""
    return records(message(body(b"".join(extensions), **kw)))  # type: ignore[arg-type]


def refused(data: bytes) -> str:
    """The reason, asserting the reader refuses and keeps refusing."""
    reader = HelloReader()
    with pytest.raises(BadHello) as first:
        reader.feed(data)
    with pytest.raises(BadHello) as again:
        reader.feed(b"\x16")
    assert str(again.value) == str(first.value)
    return str(first.value)


def parsed(data: bytes) -> ClientHello:
    result = HelloReader().feed(data)
    assert result is not None
    return result


def test_built_hello_parses() -> None:
    data = hello(sni(b"Shop.Example.COM."), alpn(b"h2", b"http/1.1"), versions(0x0304, 0x0303))
    assert parsed(data) == ClientHello("shop.example.com", ("h2", "http/1.1"), 0x0304)


def test_hello_without_any_extension_block() -> None:
    assert parsed(records(message(body(None)))) == ClientHello(None, (), 0x0303)


def test_grease_versions_are_ignored() -> None:
    assert parsed(hello(versions(0x1A1A, 0x0303, 0x0304, 0xFAFA))).version == 0x0304
    assert parsed(hello(versions(0x0303, 0xAAAA))).version == 0x0303
    assert parsed(hello(versions(0x3A3A), legacy=0x0303)).version == 0x0303


def test_other_name_types_in_server_name_are_skipped() -> None:
    assert parsed(hello(sni(b"opaque", name_type=7))).sni is None
    entries = b"\x07" + u16(3) + b"abc" + b"\x00" + u16(9) + b"a.example"
    assert parsed(hello(ext(0, u16(len(entries)) + entries))).sni == "a.example"


def test_names_at_the_length_limits_pass() -> None:
    label63 = b"a" * 63 + b".example"
    assert parsed(hello(sni(label63))).sni == label63.decode()
    name253 = b".".join([b"b" * 63] * 3 + [b"c" * 61])
    assert len(name253) == 253
    assert parsed(hello(sni(name253))).sni == name253.decode()
    assert parsed(hello(sni(name253 + b"."))).sni == name253.decode()
    assert parsed(hello(sni(b"xn--bcher-kva.example"))).sni == "xn--bcher-kva.example"
    assert parsed(hello(sni(b"1.example"))).sni == "1.example"
    assert parsed(hello(sni(b"localhost"))).sni == "localhost"


def test_not_tls_on_the_first_byte() -> None:
    for first in (b"G", b"\x80", b"\x15", b"\x17", b"\x00"):
        assert refused(first) == "not TLS"
    assert refused(b"GET / HTTP/1.1\r\nHost: x.example\r\n\r\n") == "not TLS"
    sslv2 = bytes.fromhex("802e0100020015000000100100800300800700c0") + bytes(16)
    assert refused(sslv2) == "not TLS"
    assert refused(b"\x16\x02") == "not TLS"  # the major version byte is wrong
    assert refused(b"\x16\x03\x05") == "bad record version"


def test_record_lengths() -> None:
    assert refused(b"\x16\x03\x01\x00\x00") == "bad record length"
    assert refused(b"\x16\x03\x01\x40\x01") == "bad record length"
    reader = HelloReader()  # exactly 2^14 is a record, waiting for its bytes
    assert reader.feed(b"\x16\x03\x03\x40\x00\x01") is None


def test_handshake_type_other_than_client_hello() -> None:
    assert refused(records(message(body(), kind=2))) == "not a ClientHello"
    assert refused(b"\x16\x03\x01\x00\x10\x02") == "not a ClientHello"  # on its first byte


def test_oversized_hello_refused_before_its_bytes_arrive() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (MAX_HELLO + 1).to_bytes(3, "big")
    assert refused(header) == "oversized hello"
    assert HelloReader().feed(b"\x16\x03\x01\x40\x00\x01" + MAX_HELLO.to_bytes(3, "big")) is None
    # the header split over two records is judged as soon as its fourth byte is in
    split_header = records(b"\x01\x00", version=0x0303) + records(b"\x40\x01")
    assert refused(split_header) == "oversized hello"


def test_limit_is_the_callers() -> None:
    data = hello(sni(b"a.example"))
    length = len(handshake_of(data)) - 4
    assert HelloReader(limit=length).feed(data) is not None
    with pytest.raises(BadHello, match="oversized hello"):
        HelloReader(limit=length - 1).feed(data[:9])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (records(message(body()[:30])), "truncated hello"),
        (records(message(body(legacy=0x0203))), "bad hello version"),
        (records(message(body(session_id=b"\x00" * 33))), "bad session id"),
        (records(message(body(suites=b"\x13"))), "bad cipher suites"),
        (records(message(body(suites=b""))), "bad cipher suites"),
        (records(message(body(methods=b""))), "bad compression methods"),
        (records(message(body(None) + b"\x00")), "truncated extensions"),
        (records(message(body(None) + u16(5) + ext(0x1234, b""))), "bad extensions length"),
        (records(message(body(None) + u16(4) + ext(0x1234, b"x"))), "bad extensions length"),
        (records(message(body(None) + u16(3) + b"\x00\x01\x00")), "truncated extension"),
        (hello(u16(0x1234) + u16(9) + b"short"), "truncated extension"),
        (hello(ext(0, u16(20) + b"\x00" + u16(9) + b"a.example")), "bad extension length"),
        (hello(ext(0, u16(12) + b"\x00" + u16(30) + b"a.example")), "truncated SNI"),
        (hello(ext(0, u16(2) + b"\x00\x00")), "truncated SNI"),
        (hello(ext(0, b"\x00")), "truncated extension"),
        (hello(ext(16, u16(4) + b"\x05h2x")), "bad ALPN"),
        (hello(ext(16, u16(3) + b"\x00h2")), "bad ALPN"),
        (hello(ext(16, u16(0))), "bad ALPN"),
        (hello(ext(16, b"")), "truncated extension"),
        (hello(ext(43, b"\x03\x03\x04\x03")), "bad supported_versions"),
        (hello(ext(43, b"\x04\x03\x04")), "bad extension length"),
        (hello(ext(43, b"\x00")), "bad supported_versions"),
    ],
    ids=lambda v: v.replace(" ", "-") if isinstance(v, str) else "",
)
def test_malformed_lengths(data: bytes, reason: str) -> None:
    assert refused(data) == reason


def test_duplicate_extensions() -> None:
    assert refused(hello(alpn(b"h2"), alpn(b"h2"))) == "duplicate extension"
    assert refused(hello(ext(0xFF01, b"\x00"), sni(b"a.example"), ext(0xFF01, b"\x00"))) == (
        "duplicate extension"
    )
    assert refused(hello(sni(b"a.example"), sni(b"b.example"))) == "duplicate extension"


def test_two_host_names() -> None:
    assert refused(hello(sni(b"a.example", b"b.example"))) == "two SNI host names"
    assert refused(hello(sni(b"a.example", b"a.example"))) == "two SNI host names"


@pytest.mark.parametrize(
    "name",
    [
        b"198.51.100.3",
        b"198.51.100.3.",
        b"3325256707",
        b"198.51.25603",
        b"0xc6.0x33.0x64.3",
        b"a.0x10",
        b"2001:db8::1",
        b"[2001:db8::1]",
        b"::ffff:198.51.100.3",
        b"a.example:443",
    ],
)
def test_ip_literal_sni(name: bytes) -> None:
    assert refused(hello(sni(name))) == "IP literal in SNI"


@pytest.mark.parametrize(
    "name",
    ["bücher.example".encode(), "bücher.example".encode("latin-1"), b"a.example\xff"],
)
def test_non_ascii_sni(name: bytes) -> None:
    assert refused(hello(sni(name))) == "non-ASCII SNI"


@pytest.mark.parametrize(
    "name",
    [
        b"a" * 64 + b".example",
        b".".join([b"b" * 63] * 3 + [b"c" * 62]),  # 254
        b"_dmarc.example",
        b"a_b.example",
        b"-a.example",
        b"a-.example",
        b"a..example",
        b".a.example",
        b"a.example..",
        b".",
        b"",
        b"a example",
        b"a.example\x00",
        b"a.example/x",
        b"*.example",
    ],
)
def test_bad_host_names(name: bytes) -> None:
    assert refused(hello(sni(name))) == "bad SNI"


def test_empty_server_name_extension_is_malformed_in_a_client_hello() -> None:
    assert refused(hello(ext(0, b""))) == "empty server_name"
    assert refused(hello(ext(0, u16(0)))) == "empty server_name"


@pytest.mark.parametrize("ctype", [20, 21, 23, 24])
def test_other_records_before_the_hello_is_complete(ctype: int) -> None:
    message_ = handshake_of(REAL)
    data = records(message_[:100]) + records(b"\x01" if ctype == 20 else b"\x02\x28", ctype=ctype)
    assert refused(data) == "non-handshake record before hello"
    # decided on the record's first byte
    assert refused(records(message_[:100]) + bytes([ctype])) == "non-handshake record before hello"


def test_data_after_the_hello_in_its_record() -> None:
    message_ = handshake_of(REAL)
    assert refused(records(message_ + b"\x14\x00\x00\x00")) == "data after hello"
    # decided once the hello is in, while the record still declares more
    whole = records(message_ + b"\x00")
    assert refused(whole[:-1]) == "data after hello"


def test_record_versions() -> None:
    message_ = handshake_of(REAL)
    for version in (0x0300, 0x0301, 0x0302, 0x0303, 0x0304):
        assert parsed(records(message_, version=version)) == parsed(REAL)
    later = records(message_[:50]) + records(message_[50:], version=0x0205)
    assert refused(later) == "bad record version"


# --- hypothesis ------------------------------------------------------------------------------

PREFIXES = [
    b"",
    b"\x16",
    b"\x16\x03\x01",
    b"\x16\x03\x01\x01\x00",
    b"\x16\x03\x01\x01\x00\x01\x00\x00\xfc\x03\x03",
    REAL[:120],
]


def feed_all(chunks: Iterable[bytes]) -> Iterator[ClientHello | None]:
    reader = HelloReader()
    fed = b""
    refusal: str | None = None
    for chunk in chunks:
        fed += chunk
        try:
            result = reader.feed(chunk)
        except BadHello as exc:
            assert refusal is None or str(exc) == refusal
            refusal = str(exc)
            assert refusal
            continue
        assert refusal is None
        assert result is None or isinstance(result, ClientHello)
        yield result
    assert reader.raw == fed
    assert reader.pending == len(fed)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PREFIXES), st.lists(st.binary(max_size=80), max_size=12))
def test_arbitrary_bytes_in_arbitrary_chunks(prefix: bytes, chunks: list[bytes]) -> None:
    list(feed_all([prefix, *chunks]))


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0, 1, 0x20, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


HELLO_MESSAGE = handshake_of(REAL)


@st.composite
def reframed_mutation(draw: st.DrawFn) -> bytes:
    """A mutated hello body with its handshake and record lengths made right again, so
    the mutation reaches the hello's own parser."""
    new_body = draw(mutated(HELLO_MESSAGE[4:]))
    return records(message(new_body), draw(st.sampled_from([16384, 100, 7])))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(REAL), reframed_mutation()), st.lists(st.integers(0, 600)))
def test_mutated_real_hellos(data: bytes, cuts: list[int]) -> None:
    whole = outcome(data)
    assert whole is None or isinstance(whole, ClientHello) or whole.startswith("BadHello: ")
    # the same bytes in any split come to the same answer, down to the refusal's reason
    assert outcome(data, [c for c in cuts if c <= len(data)]) == whole


@settings(max_examples=200)
@given(
    st.sampled_from([REAL, python_hello(None), records(HELLO_MESSAGE, 100)]),
    st.lists(st.integers(0, 700)),
)
def test_any_split_of_a_real_hello_gives_the_same_hello(data: bytes, cuts: list[int]) -> None:
    result, reader = split_feed(data, [c for c in cuts if c <= len(data)])
    assert result == HelloReader().feed(data)
    assert result is not None
    assert reader.raw == data

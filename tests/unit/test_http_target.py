"""The request-target and Host grammar: every way a request names a host that the site's
web proxy or a resolver would read differently from us is a 400, and what passes is
rebuilt from what we checked."""

from __future__ import annotations

import ipaddress
import string
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.proxy.http_target import (
    BadTarget,
    HostPort,
    connect_target,
    explicit_target,
    parse_host,
    transparent_target,
)

pytestmark = pytest.mark.unit

ORIG = ("203.0.113.80", 80)


def test_a_browser_request_on_the_transparent_port() -> None:
    req = transparent_target("/a/b?c=1", ["WWW.Example.com."], ORIG)
    assert req.dest == HostPort("www.example.com", 80, False)
    assert req.absolute() == "http://www.example.com/a/b?c=1"
    assert req.path == "/a/b?c=1"
    # HTTP/1.0 without Host: the address the guest dialled
    assert transparent_target("/", [], ORIG).dest == HostPort("203.0.113.80", 80, True)
    assert transparent_target("/", ["www.example.com:80"], ORIG).dest.port == 80


@pytest.mark.parametrize(
    ("target", "hosts"),
    [
        # the review's finding: absolute-form to the segment, Host saying a public name
        ("http://198.51.100.1:8000/login", ["www.example.com"]),
        ("http://198.51.100.3/", ["www.example.com"]),
        # Host steering the web proxy to another port
        ("/", ["www.example.com:8000"]),
        ("http://www.example.com:8000/", ["www.example.com:8000"]),
        # userinfo, brackets, zone ids, percent
        ("/", ["x@198.51.100.3"]),
        ("http://x@198.51.100.3/", []),
        ("http://www.example.com@198.51.100.3/", ["www.example.com"]),
        ("/", ["[::ffff:198.51.100.3]"]),
        ("http://[::ffff:198.51.100.3]/", []),
        ("http://[::ffff:c633:6403]/", []),
        ("/", ["198.51.100.3%25eth0"]),
        ("/", ["www%2eexample.com"]),
        # numbers a resolver reads as addresses
        ("/", ["3325256707"]),
        ("/", ["0xc6.0x33.0x64.3"]),
        ("/", ["198.51.25603"]),
        ("/", ["010.0.0.1"]),
        ("/", ["198.51.100.03"]),
        ("/", ["1.2.3.4.5"]),
        # two Hosts, empty, not ASCII, other schemes and forms
        ("/", ["www.example.com", "198.51.100.3"]),
        ("/", [""]),
        ("/", ["ex\u00e4mple.com"]),
        ("https://www.example.com/", []),
        ("*", ["www.example.com"]),
        ("www.example.com:80", ["www.example.com"]),
        ("/\u00e4", ["www.example.com"]),
    ],
)
def test_refused_forms_on_the_transparent_port(target: str, hosts: list[str]) -> None:
    with pytest.raises(BadTarget):
        transparent_target(target, hosts, ORIG)


def test_absolute_form_on_the_transparent_port_must_agree_with_host() -> None:
    req = transparent_target("http://www.example.com/x", ["www.example.com"], ORIG)
    assert req.absolute() == "http://www.example.com/x"
    assert transparent_target("http://www.example.com/x", [], ORIG).dest.host == "www.example.com"
    with pytest.raises(BadTarget):
        transparent_target("http://www.example.org/x", ["www.example.com"], ORIG)


def test_explicit_and_connect_targets() -> None:
    req = explicit_target("http://www.example.com:8080/a?b")
    assert req.dest == HostPort("www.example.com", 8080, False)
    assert req.absolute() == "http://www.example.com:8080/a?b"
    assert explicit_target("http://www.example.com?q").path == "/?q"
    assert explicit_target("http://www.example.com/#frag").path == "/"
    assert explicit_target("http://www.example.com#frag").path == "/"
    assert connect_target("www.example.com:443").dest == HostPort("www.example.com", 443, False)
    for bad in (
        "[::ffff:198.51.100.3]:443",
        "x@198.51.100.3:443",
        "www.example.com",
        "www.example.com:0",
        "www.example.com:65536",
        "www.example.com:+443",
        "www.example.com:443:443",
    ):
        with pytest.raises(BadTarget):
            connect_target(bad)
    for bad in ("/relative", "ftp://x/", "http://a:x/", "http://a:99999/", "http://[::1/"):
        with pytest.raises(BadTarget):
            explicit_target(bad)


# -- fuzzed: whatever passes is exactly a name or a dotted IPv4 address ---------------------
_ANY_HOST = st.text(alphabet=string.printable + "\u00e4\u0131\uff0e", max_size=40)


def _reads_the_same(dest: HostPort) -> None:
    """What the grammar admits, every reader agrees on: a dotted IPv4 address that
    ipaddress parses to itself, or a name with no character a URL parser treats as
    structure, which urllib splits back into the same host and port."""
    if dest.numeric:
        assert str(ipaddress.IPv4Address(dest.host)) == dest.host
    else:
        assert set(dest.host) <= set(string.ascii_lowercase + string.digits + "-_.")
        last = dest.host.rsplit(".", 1)[-1]
        assert not last.isdigit() and not last.startswith("0x")
    parts = urlsplit(f"http://{dest.authority(80)}/")
    assert (parts.hostname, parts.port or 80) == (dest.host, dest.port)


@settings(max_examples=2000, deadline=None)
@given(_ANY_HOST, st.text(alphabet=string.printable, max_size=30))
def test_fuzzed_heads_either_refuse_or_name_one_host(host: str, path: str) -> None:
    for target, hosts in (("/" + path, [host]), (f"http://{host}/{path}", [])):
        try:
            req = transparent_target(target, hosts, ORIG)
        except BadTarget:
            continue
        _reads_the_same(req.dest)
        assert req.dest.port == 80
        # the rebuilt URL, parsed by a URL parser, goes where we checked
        parts = urlsplit(req.absolute())
        assert parts.hostname == req.dest.host and not parts.username


@settings(max_examples=1000, deadline=None)
@given(_ANY_HOST, st.integers(min_value=-5, max_value=70000))
def test_fuzzed_authorities(host: str, port: int) -> None:
    for text in (f"{host}:{port}", host):
        try:
            dest = parse_host(text, 80)
        except BadTarget:
            continue
        _reads_the_same(dest)
        assert 0 < dest.port < 65536


@given(st.ip_addresses(v=4))
def test_every_dotted_address_is_taken_as_itself(addr: ipaddress.IPv4Address) -> None:
    assert parse_host(str(addr), 80) == HostPort(str(addr), 80, True)

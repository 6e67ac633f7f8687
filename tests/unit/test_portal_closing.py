"""The portal's waitress closes connections the app marks (captive answers), keeps others."""

from __future__ import annotations

import http.client
import socket
import threading
from typing import Any

import pytest

from appliance.portal.app import CLOSE_HEADER
from appliance.portal.service import make_server

pytestmark = pytest.mark.unit


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    headers = [("Content-Type", "text/plain"), ("Content-Length", "2")]
    if environ["PATH_INFO"] == "/captive":
        headers.append((CLOSE_HEADER, "1"))
    start_response("200 OK", headers)
    return [b"ok"]


def test_marked_responses_close_the_connection_others_stay_alive() -> None:
    server = make_server(app, "127.0.0.1", 0)
    port = server.socket.getsockname()[1]
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/plain")
        r = c.getresponse()
        assert r.read() == b"ok" and r.getheader("Connection") is None and not r.will_close
        c.request("GET", "/captive")  # same connection, kept alive
        r = c.getresponse()
        assert r.read() == b"ok"
        assert r.getheader("Connection") == "close" and r.getheader(CLOSE_HEADER) is None
        assert r.will_close
        # and the server really closes it: a raw HTTP/1.1 client reads EOF, no timeout
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /captive HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in data
    finally:
        server.close()

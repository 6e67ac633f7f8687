"""A misbehaving 'agent' for the client tests: TLS with a given certificate, then slow or garbage.

usage: fake_agent.py MODE HOST PORT CERT KEY   (MODE: slow | garbage | html)
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time

ANSWERS = {
    "garbage": b"\x00\x01 this is not HTTP at all \xff\r\n\r\n",
    "html": b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 14\r\n\r\n"
    b"<html>hi</html",
}


def serve(conn: socket.socket, ctx: ssl.SSLContext, mode: str) -> None:
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
        tls.recv(65536)
        if mode == "slow":
            time.sleep(30)
        else:
            tls.sendall(ANSWERS[mode])
        tls.close()
    except OSError:
        pass


def main() -> None:
    mode, host, port, cert, key = sys.argv[1:6]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    lsock = socket.create_server((host, int(port)))
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve, args=(conn, ctx, mode), daemon=True).start()


if __name__ == "__main__":
    main()

"""The home relay benchmark's test server: a greeting, then bulk bytes or a trickle.

    python homebulk.py HOST PORT

On connect it sends one byte (b"+"), then reads one request line:
`bulk N` sends the first N bytes of `pattern` and closes; `trickle` sends the
time (time.time(), one line) every 20 ms until the peer goes; anything else, or
EOF, closes.  `pattern` never repeats (every 64 KiB carries its own offset), so
a resumed stream that skipped or repeated a block cannot hash the same.  One
thread per connection: it only copies pre-made blocks into the kernel.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import sys
import threading
import time

BLOCK = 1 << 20
_BASE = bytes(random.Random(17).randbytes(BLOCK))


def block(i: int) -> bytearray:
    """The i-th MiB of the pattern: one random MiB with its stream offset every 64 KiB."""
    b = bytearray(_BASE)
    for k in range(0, BLOCK, 65536):
        struct.pack_into(">Q", b, k, i * BLOCK + k)
    return b


def pattern_sha256(n: int) -> str:
    """The SHA-256 of the pattern's first n bytes (what a client must have received)."""
    h = hashlib.sha256()
    for i in range((n + BLOCK - 1) // BLOCK):
        h.update(block(i)[: n - i * BLOCK])
    return h.hexdigest()


def _serve(conn: socket.socket) -> None:
    with conn:
        try:
            conn.sendall(b"+")
            line = conn.makefile("rb").readline(64).split()
            if len(line) == 2 and line[0] == b"bulk":
                n = int(line[1])
                for i in range((n + BLOCK - 1) // BLOCK):
                    conn.sendall(block(i)[: n - i * BLOCK])
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)  # the peer's close: nothing is cut off behind us
            elif line == [b"trickle"]:
                while True:
                    conn.sendall(f"{time.time():.6f}\n".encode())
                    time.sleep(0.02)
        except (OSError, ValueError):
            pass


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    srv = socket.create_server((host, port), backlog=512)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()

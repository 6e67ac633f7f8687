"""Several proxy workers: the shared per-user counts, the supervisor, and a real relay
with two workers on loopback (limits exact across them, reload reaches both)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from relay_helpers import free_port

from appliance.proxy.counts import SharedCounts
from appliance.proxy.workers import run_workers

pytestmark = pytest.mark.unit


def test_shared_counts_match_a_plain_counter_through_collisions_and_deletions() -> None:
    counts = SharedCounts(slots=16)  # tiny: long probe runs, wrap-around, shifted deletions
    model: Counter[tuple[str, str]] = Counter()
    rnd = random.Random(7)
    users = [(f"u{i}", rnd.choice(["pop3", "smtp", "http"])) for i in range(12)]
    for _ in range(5000):
        user, service = rnd.choice(users)
        if rnd.random() < 0.55:
            ok = counts.take(user, service, 3)
            assert ok == (model[(user, service)] < 3)
            if ok:
                model[(user, service)] += 1
        elif model[(user, service)]:
            counts.give(user, service)
            model[(user, service)] -= 1
        for u, s in users:
            assert counts.get(u, s) == model[(u, s)]
        assert len(counts) == sum(1 for v in model.values() if v)
    for (u, s), n in model.items():
        for _ in range(n):
            counts.give(u, s)
    assert len(counts) == 0


def test_shared_counts_are_exact_across_forked_processes() -> None:
    counts = SharedCounts()
    r, w = os.pipe()
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            got = sum(counts.take("alice", "pop3", 100) for _ in range(2000))
            os.write(w, f"{got}\n".encode())
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(w)
    got = [int(x) for x in os.read(r, 100).split()]
    os.close(r)
    assert sum(got) == 100 and counts.get("alice", "pop3") == 100
    assert counts.take("alice", "smtp", 100)  # another service has its own count


def test_supervisor_forwards_reload_and_stop_and_ends_all_when_one_dies(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from appliance.proxy.workers import run_workers
stop = []
def work(i, listening):
    signal.signal(signal.SIGHUP, lambda *_: open({str(marks)!r} + f"/hup{{i}}", "w").close())
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    listening()
    if i == 1 and os.environ.get("CRASH"):
        time.sleep(0.3)
        return 3
    while not stop:
        time.sleep(0.05)
    return 0
sys.exit(run_workers(2, work, lambda: open({str(marks)!r} + "/ready", "w").close()))
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 10
        while not (marks / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (marks / "ready").exists()
        proc.send_signal(signal.SIGHUP)
        while len(list(marks.glob("hup*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(p.name for p in marks.glob("hup*")) == ["hup0", "hup1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    # a worker that exits on its own takes the others down, and the parent says so
    crash = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "CRASH": "1"})
    try:
        assert crash.wait(10) == 1
    finally:
        crash.kill()


def test_run_workers_returns_when_every_worker_is_done_and_restores_signals() -> None:
    before = [signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)]
    ready = []
    assert run_workers(2, lambda i, listening: (listening(), 0)[1], lambda: ready.append(1)) == 0
    assert ready == [1]
    assert [signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)] == before


class Hello(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"HELLO\n")
        while self.request.recv(4096):
            pass


def test_two_workers_keep_the_per_user_limit_and_both_reload(tmp_path: Path) -> None:
    up = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Hello)
    up.daemon_threads = True
    threading.Thread(target=up.serve_forever, daemon=True).start()
    port = free_port()
    table = tmp_path / "table.json"
    spec = {
        "listeners": [{"service": "bulk", "protocol": "tcp", "port": port}],
        "servers": {"bulk": [f"127.0.0.1:{up.server_address[1]}"]},
        "users": {"127.0.0.1": {"user": "alice", "allow": ["bulk"], "max_connections": 3}},
    }
    table.write_text(json.dumps(spec))
    ready = tmp_path / "ready"
    relay = subprocess.Popen(
        [
            *(sys.executable, "-m", "appliance.proxy", str(table), "--host", "127.0.0.1"),
            *("--workers", "2", "--ready-file", str(ready)),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        relayed = 0
        for _ in range(20):  # spread over both workers by the kernel
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
            if s.recv(16) == b"HELLO\n":
                relayed += 1
        assert relayed == 3  # not 3 per worker
        # the table no longer allows it: SIGHUP reaches both workers, all three close
        spec["users"]["127.0.0.1"]["allow"] = []
        table.write_text(json.dumps(spec))
        relay.send_signal(signal.SIGHUP)
        for s in socks:
            assert s.recv(16) == b""
    finally:
        for s in socks:
            s.close()
        relay.send_signal(signal.SIGTERM)
        _, err = relay.communicate(timeout=10)
        up.shutdown()
    assert relay.returncode == 0, err
    stats = [
        json.loads(line.split("counters: ", 1)[1])
        for line in err.splitlines()
        if "counters: " in line
    ]
    assert len(stats) == 2  # one line per worker
    total = Counter[str]()
    for s in stats:
        total.update(s)
    assert total["bulk/refused-limit"] == 17 and total["bulk/revoked"] == 3
    assert all(s for s in stats), stats  # both got connections (all 20 on one: 2**-19)

"""Several proxy worker processes on the same ports, for the cores of the box.

One Python process uses one core; new connections cost Python work, so the
proxy forks `proxy.workers` of them (0: one per core), each with its own event
loop, gate and listeners bound with SO_REUSEPORT: the kernel hands each new
connection to one of them.  The per-user connection counts are shared
(counts.SharedCounts); everything else a worker needs it reads from the shared
session store and the tables, as one process did.

The parent only forwards signals (SIGHUP reloads every worker's tables,
SIGTERM and SIGINT stop them) and waits.  A worker that dies on its own ends
the others and the parent exits 1: systemd restarts the role
(Restart=on-failure) with fresh counts, rather than a half-dead proxy whose
counts a crashed worker can no longer give back.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger("appliance.proxy")

PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def worker_count(configured: int) -> int:
    """0 means one worker per core this process may run on."""
    return configured if configured > 0 else max(1, len(os.sched_getaffinity(0)))


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


Work = Callable[[int, Callable[[], None]], int]


class _Supervisor:
    def __init__(self) -> None:
        self.children: dict[int, int] = {}  # pid -> worker number
        self.stopping = False
        self.terminated = False  # we sent SIGTERM to the workers

    def forward(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        self.signal_all(signum)

    def signal_all(self, signum: int) -> None:
        if signum == signal.SIGTERM:
            self.terminated = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def run_workers(n: int, work: Work, ready: Callable[[], None] | None = None) -> int:
    """Fork n workers running `work(i, listening)` and wait for them; the exit code.

    Each worker calls `listening()` once its listeners are bound; the parent calls
    `ready()` when all n have.  The caller's signal handlers are back on return.
    """
    sup = _Supervisor()
    # before the first fork: no signal can find the parent unprepared
    previous = {sig: signal.signal(sig, sup.forward) for sig in FORWARDED}
    try:
        return _run(sup, n, work, ready)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(sup: _Supervisor, n: int, work: Work, ready: Callable[[], None] | None) -> int:
    r, w = os.pipe()
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(r)
                for sig in FORWARDED:
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent()

                def listening() -> None:
                    os.write(w, b".")
                    os.close(w)  # the parent sees EOF once every worker listened or died

                code = work(i, listening)
            except BaseException:
                log.exception("proxy worker %d failed", i)
            finally:
                os._exit(code)
        sup.children[pid] = i
    os.close(w)
    said = b""
    while len(said) < n:
        chunk = os.read(r, n)
        if not chunk:  # a worker died before it listened
            break
        said += chunk
    os.close(r)
    if len(said) == n and ready is not None:
        ready()
    rc = 0
    while sup.children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        i = sup.children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not (sup.terminated and code == -signal.SIGTERM):
            rc = rc or 1  # (a worker that our own SIGTERM ended did not fail)
        if not sup.stopping:  # nobody asked: the others go too (see the module's docstring)
            if code != 0:
                log.error("proxy worker %d exited (%d): stopping the others", i, code)
            sup.stopping = True
            sup.signal_all(signal.SIGTERM)
    return rc

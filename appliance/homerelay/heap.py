"""Hand the heap's free pages back to the kernel before a link's TLS buffer is carved.

Each TLS connection the relay accepts gets a 256 KiB read buffer from uvloop, of
which an idle link touches a page or two.  glibc serves it from the heap once its
moving mmap threshold has risen past 256 KiB (any larger block freed at start
does that), and the heap's free space is mostly pages other objects already
wrote: the untouched buffer is then resident all the same, some 30 KiB per idle
household.  `malloc_trim(0)` returns every whole free page first (about 20 us
with a thousand households linked), so a new buffer starts on fresh pages.  A
fixed low threshold would do the same for the buffers but also map and unmap each
256 KiB frame of a bulk stream, which cost a quarter of the relay's throughput.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable

# a budget of trims: a burst of registrations (a thousand in two seconds in the
# benchmark) is trimmed for each, while a flood of bare TCP connects spends at most
# RATE trims a second of the loop (some 2% of it)
RATE, BURST = 1000.0, 200.0

_trim: Callable[[int], int] | None = None
# not glibc: nothing to trim with (nor its moving threshold to work around)
with contextlib.suppress(OSError):
    _trim = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
_tokens, _last = BURST, 0.0


def release_free_pages() -> None:
    """Return the heap's whole free pages (a no-op where the C library has no trim, or
    once the budget is spent)."""
    global _tokens, _last
    if _trim is None:
        return
    now = time.monotonic()
    _tokens = min(BURST, _tokens + (now - _last) * RATE)
    _last = now
    if _tokens < 1.0:
        return
    _tokens -= 1.0
    _trim(0)

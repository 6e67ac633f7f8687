"""Hand the heap's free pages back to the kernel before a link's TLS buffer is carved.

Each TLS connection the relay accepts gets a 256 KiB read buffer from uvloop, of
which an idle link touches a page or two.  glibc serves it from the heap once its
moving mmap threshold has risen past 256 KiB (any larger block freed at start
does that), and the heap's free space is mostly pages other objects already
wrote: the untouched buffer is then resident all the same, some 30 KiB per idle
household.  `malloc_trim(0)` returns every whole free page first (about 20 us
with a thousand households linked), so a new buffer starts on fresh pages.  A
fixed low threshold would do the same for the buffers but also map and unmap each
256 KiB frame of a bulk stream, which cost a fifth of the relay's throughput.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
_name = ctypes.util.find_library("c")
if _name:
    _trim = getattr(ctypes.CDLL(_name), "malloc_trim", None)  # glibc only


def release_free_pages() -> None:
    """Return the heap's whole free pages (a no-op where the C library has no trim)."""
    if _trim is not None:
        _trim(0)

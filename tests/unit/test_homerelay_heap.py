"""The relay's trim before each accepted connection (homerelay/heap.py): bounded."""

from __future__ import annotations

import platform
import time

import pytest

from appliance.homerelay import heap

pytestmark = pytest.mark.unit


def test_a_flood_of_connections_spends_at_most_the_trim_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(heap, "_trim", trims.append)
    monkeypatch.setattr(heap, "_tokens", heap.BURST)
    monkeypatch.setattr(heap, "_last", time.monotonic())
    t0 = time.monotonic()
    for _ in range(20_000):
        heap.release_free_pages()
    elapsed = time.monotonic() - t0
    assert heap.BURST <= len(trims) <= heap.BURST + heap.RATE * elapsed + 1
    assert trims[0] == 0  # malloc_trim(0): every arena, keep no pad
    time.sleep(0.05)  # the budget comes back with time: a registration a while later
    before = len(trims)
    heap.release_free_pages()
    assert len(trims) == before + 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_the_trim_is_glibcs_malloc_trim() -> None:
    assert heap._trim is not None
    heap.release_free_pages()  # a real call: harmless

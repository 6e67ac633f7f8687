"""The one cursor over the store's event tables: each event handed out once, in id
order; a read that fails loses nothing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from appliance.state.follow import Cursor

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Ev:
    id: int


class Table:
    def __init__(self, n: int) -> None:
        self.rows = [Ev(i) for i in range(1, n + 1)]
        self.fail_after: int | None = None  # reads after this many fail
        self.reads = 0

    def read(self, last: int, limit: int) -> list[Ev]:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise OSError("database is locked")
        return [e for e in self.rows if e.id > last][:limit]


def test_poll_and_drain_hand_out_each_event_once_in_order() -> None:
    t = Table(25)
    c = Cursor(t.read, 0)
    assert [e.id for e in c.poll(10)] == list(range(1, 11))
    assert [e.id for e in c.drain(10)] == list(range(11, 26))
    assert c.poll() == [] and c.drain() == []
    t.rows.append(Ev(26))
    assert [e.id for e in c.drain(10)] == [26]


def test_a_failing_later_batch_loses_none_of_the_earlier_ones() -> None:
    t = Table(25)
    c = Cursor(t.read, 0)
    t.fail_after = 1  # the first batch reads, the second fails
    with pytest.raises(OSError):
        c.drain(10)
    assert c.last == 0
    t.fail_after = None
    assert [e.id for e in c.drain(10)] == list(range(1, 26))


def test_a_cursor_starts_after_the_id_it_is_given() -> None:
    t = Table(5)
    assert [e.id for e in Cursor(t.read, 3).drain()] == [4, 5]

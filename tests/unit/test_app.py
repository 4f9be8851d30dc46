"""The composition root's process-wide helpers, without sockets."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from nanomsg.app import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the setting is process-wide: give the other tests a normal collector


def test_freezing_the_startup_heap_sets_every_object_made_so_far_aside(unfrozen: None) -> None:
    made_at_startup = [[] for _ in range(1000)]  # containers: tracked by the collector
    assert gc.get_freeze_count() == 0
    freeze_startup_heap()
    # Full collections walk none of them from now on (the tail they cost a large answer).
    assert gc.get_freeze_count() >= len(made_at_startup)
    walked = {id(item) for generation in range(3) for item in gc.get_objects(generation)}
    assert not any(id(item) in walked for item in made_at_startup)
    made_later: list[int] = []
    assert any(item is made_later for item in gc.get_objects(0))

"""The composition root's process-wide helpers, without sockets."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator

import pytest

from nanomsg.app import YOUNG_COLLECTION_THRESHOLD, App, tune_collector
from nanomsg.config import Config
from nanomsg.store.postgres import PostgresStore


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    yield
    # The settings are process-wide: give the other tests a normal collector.
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_freezing_the_startup_heap_sets_every_object_made_so_far_aside(unfrozen: None) -> None:
    made_at_startup = [[] for _ in range(1000)]  # containers: tracked by the collector
    assert gc.get_freeze_count() == 0
    tune_collector()
    # Full collections walk none of them from now on (the tail they cost a large answer).
    assert gc.get_freeze_count() >= len(made_at_startup)
    walked = {id(item) for generation in range(3) for item in gc.get_objects(generation)}
    assert not any(id(item) in walked for item in made_at_startup)
    made_later: list[int] = []
    assert any(item is made_later for item in gc.get_objects(0))


def test_a_server_collects_its_young_objects_less_often(unfrozen: None) -> None:
    _, middle, old = gc.get_threshold()
    tune_collector()
    assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, middle, old)
    # A large answer's rows (a few thousand containers alive at once) start no collection.
    before = gc.get_stats()[0]["collections"]
    rows = [(n, [n], {"n": n}) for n in range(2000)]
    assert gc.get_stats()[0]["collections"] == before
    assert len(rows) == 2000


def test_the_app_gives_its_postgresql_store_the_list_cache_the_config_names() -> None:
    config = Config(jwt_secret="s" * 32, database_url="postgresql://u@db/chat", list_cache_mb=3)
    store = App(config).store
    assert isinstance(store, PostgresStore) and store._list_cache is not None
    assert store._list_cache._max_bytes == 3 << 20
    off = App(dataclasses.replace(config, list_cache_mb=0)).store
    assert isinstance(off, PostgresStore) and off._list_cache is None

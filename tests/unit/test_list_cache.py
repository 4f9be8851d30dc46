"""ListCache: an entry is served only at the version and read mark it was read with, each user
gets their own part of a shared room entry, and the bytes held stay under the bound, the rooms
listed least recently going first."""

from __future__ import annotations

import sys

import orjson
import pytest

from nanomsg.models import Conversation
from nanomsg.store.list_cache import ENTRY_OVERHEAD, NOTED_USERS, USER_OVERHEAD, ListCache


def conversation(
    room_id: int, read_seq: int = 0, unread: int = 0, content: str = "hi"
) -> Conversation:
    """A room's entry with a latest message: 3 events, ``read_seq`` read, ``unread`` unread."""
    stamp = "2026-01-02T03:04:05.678Z"
    return Conversation(
        room_id, f"uuid-{room_id}", f"room {room_id}", 80, "group", "entity", 10, 3, stamp,
        stamp, None, False, stamp, read_seq, unread, 30 + room_id, 3, "bob", "entity",
        content, stamp, None, False, None, None, None,
    )  # fmt: skip


def test_an_entry_is_served_at_its_version_and_read_mark_only() -> None:
    cache = ListCache(1 << 20)
    entry = conversation(1, read_seq=2, unread=1)
    cache.put(7, entry, "alice")
    assert cache.get(1, 7, "alice", 2) is entry
    assert cache.get(1, 8, "alice", 2) is None  # the room changed since
    assert cache.get(1, 7, "alice", 3) is None  # the read mark moved since
    assert cache.get(1, 7, "bob", 2) is None  # never read for that user
    assert cache.get(2, 7, "alice", 2) is None  # never read


def test_users_share_the_room_entry_and_keep_their_own_part() -> None:
    cache = ListCache(1 << 20)
    cache.put(7, conversation(1, read_seq=2, unread=1), "alice")
    cache.put(7, conversation(1, read_seq=0, unread=3), "bob")
    alice, bob = cache.get(1, 7, "alice", 2), cache.get(1, 7, "bob", 0)
    assert alice is not None and bob is not None
    assert (alice.read_seq, alice.unread, bob.read_seq, bob.unread) == (2, 1, 0, 3)
    assert bob == conversation(1, read_seq=0, unread=3)
    assert bob.message_content is alice.message_content  # the room's text is held once
    assert len(cache) == 1


def test_a_new_version_replaces_the_entry_and_every_users_part() -> None:
    cache = ListCache(1 << 20)
    cache.put(7, conversation(1, read_seq=2, unread=1), "alice")
    cache.put(7, conversation(1), "bob")
    cache.put(8, conversation(1, read_seq=2, unread=2, content="news"), "alice")
    found = cache.get(1, 8, "alice", 2)
    assert found is not None and (found.message_content, found.unread) == ("news", 2)
    assert cache.get(1, 7, "alice", 2) is None
    assert cache.get(1, 8, "bob", 0) is None  # bob's part was of the old version
    assert cache.size == ENTRY_OVERHEAD + len_of(found) + USER_OVERHEAD


def len_of(entry: Conversation) -> int:
    """The text the estimate counts for an entry: its name and its latest message."""
    return sys.getsizeof(entry.name) + sys.getsizeof(entry.message_content)


def test_the_bytes_held_stay_under_the_bound_dropping_the_least_recently_listed_rooms() -> None:
    one = ENTRY_OVERHEAD + len_of(conversation(1)) + USER_OVERHEAD
    cache = ListCache(3 * one)
    for room_id in (1, 2, 3):
        cache.put(7, conversation(room_id), "alice")
    assert len(cache) == 3 and cache.size == 3 * one
    assert cache.get(1, 7, "alice", 0) is not None  # room 1 listed again: 2 is now the oldest
    cache.put(7, conversation(4), "alice")
    assert cache.size <= 3 * one
    assert cache.get(2, 7, "alice", 0) is None
    assert all(cache.get(room_id, 7, "alice", 0) is not None for room_id in (1, 3, 4))
    cache.put(7, conversation(4), "bob")  # a second user's part takes room too
    assert cache.size <= 3 * one
    assert cache.get(1, 7, "alice", 0) is None  # the oldest went for it


def test_a_long_message_counts_for_its_size_and_an_entry_over_the_bound_is_not_kept() -> None:
    cache = ListCache(10_000)
    cache.put(7, conversation(1, content="x" * 20_000), "alice")
    assert len(cache) == 0 and cache.size == 0
    cache.put(7, conversation(1, content="€" * 1000), "alice")
    assert cache.size >= ENTRY_OVERHEAD + USER_OVERHEAD + 2000  # two bytes a code point


def test_a_cache_of_no_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ListCache(0)


def test_an_entrys_json_is_written_once_for_the_cached_tuple_and_counted() -> None:
    cache = ListCache(1 << 20)
    kept = cache.put(7, conversation(1, read_seq=2, unread=1, content='say "hi" \u20ac'), "alice")
    bobs = cache.put(7, conversation(1, read_seq=0, unread=3), "bob")
    assert bobs is not kept and bobs == conversation(1, read_seq=0, unread=3, content=bobs[19])
    before = cache.size
    alice_json = cache.entry_json("alice", kept)
    assert alice_json is not None
    assert orjson.dumps([alice_json]) == orjson.dumps([kept.to_json()])
    assert cache.size - before >= len(orjson.dumps(kept.to_json()))  # counts against the bound
    assert cache.entry_json("alice", kept) is alice_json  # written once
    bob_json = cache.entry_json("bob", bobs)
    assert orjson.dumps([bob_json]) == orjson.dumps([bobs.to_json()])
    assert cache.entry_json("alice", conversation(1, read_seq=2, unread=1)) is None  # a copy
    assert cache.entry_json("bob", kept) is None  # another user's tuple
    moved = cache.put(7, conversation(1, read_seq=3, unread=0), "alice")  # a new read mark
    assert cache.entry_json("alice", kept) is None
    assert orjson.loads(orjson.dumps([cache.entry_json("alice", moved)]))[0]["unread"] == 0
    cache.put(8, conversation(1, read_seq=3, unread=4), "alice")  # the room changed
    assert cache.entry_json("alice", moved) is None


def test_the_bytes_counted_return_to_the_entries_alone_once_their_json_is_dropped() -> None:
    cache = ListCache(1 << 20)
    kept = cache.put(7, conversation(1), "alice")
    alone = cache.size
    cache.entry_json("alice", kept)
    assert cache.size > alone
    cache.put(7, conversation(1, read_seq=1), "alice")  # rewritten when next asked
    assert cache.size == alone


def test_a_users_list_is_checked_first_after_their_first_and_while_half_of_it_was_held() -> None:
    cache = ListCache(1 << 20)
    assert not cache.checks_first("alice")  # never seen: read at once
    cache.note("alice", 0, 10)
    assert cache.checks_first("alice")  # the first list is now held
    cache.note("alice", 4, 10)
    assert not cache.checks_first("alice")
    cache.note("alice", 5, 10)
    assert cache.checks_first("alice")
    cache.note("alice", 0, 0)  # an empty page says nothing
    assert cache.checks_first("alice")
    assert not cache.checks_first("bob")


def test_the_users_noted_are_bounded_the_least_recent_forgotten_first() -> None:
    cache = ListCache(1 << 20)
    cache.note("first", 0, 1)
    for n in range(NOTED_USERS):
        cache.note(f"user {n}", 0, 1)
    assert not cache.checks_first("first")  # forgotten: read at once, as a new user
    assert cache.checks_first(f"user {NOTED_USERS - 1}")

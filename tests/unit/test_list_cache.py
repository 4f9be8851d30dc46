"""ListCache: an entry is served only to its user, at the version and read mark it was read
with; its JSON is written once it is served; a user's next list is checked first only while
the cache held most of their last one; the bytes held stay under the bound, the users who
listed least recently going first."""

from __future__ import annotations

import sys

import orjson
import pytest

from nanomsg.models import Conversation
from nanomsg.store.list_cache import ENTRY_OVERHEAD, KEEP_EVERY, USER_OVERHEAD, ListCache


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


def size_of(entry: Conversation) -> int:
    """The estimate of a kept entry: its overhead, its name and its latest message."""
    return ENTRY_OVERHEAD + sys.getsizeof(entry.name) + sys.getsizeof(entry.message_content)


def test_an_entry_is_served_to_its_user_at_its_version_and_read_mark_only() -> None:
    cache = ListCache(1 << 20)
    entry = conversation(1, read_seq=2, unread=1)
    cache.put(7, entry, "alice")
    assert cache.get(1, 7, "alice", 2) is entry
    assert cache.get(1, 8, "alice", 2) is None  # the room changed since
    assert cache.get(1, 7, "alice", 3) is None  # the read mark moved since
    assert cache.get(1, 7, "bob", 2) is None  # never read for that user
    assert cache.get(2, 7, "alice", 2) is None  # never read


def test_a_new_read_replaces_the_users_entry_of_that_room_and_its_counted_bytes() -> None:
    cache = ListCache(1 << 20)
    cache.put(7, conversation(1, read_seq=2, unread=1), "alice")
    cache.put(7, conversation(1), "bob")
    newer = conversation(1, read_seq=2, unread=2, content="news")
    cache.put(8, newer, "alice")
    assert cache.get(1, 8, "alice", 2) is newer
    assert cache.get(1, 7, "alice", 2) is None
    assert cache.get(1, 7, "bob", 0) is not None  # bob's entry is his own
    assert len(cache) == 2
    assert cache.size == 2 * USER_OVERHEAD + size_of(newer) + size_of(conversation(1))


def test_an_entrys_json_is_written_once_served_from_the_cache_and_counted() -> None:
    cache = ListCache(1 << 20)
    kept = conversation(1, read_seq=2, unread=1, content='say "hi" \u20ac')
    cache.put(7, kept, "alice")
    assert cache.entry_json("alice", kept) is None  # only just read: written by the caller
    assert cache.get(1, 7, "alice", 2) is kept
    before = cache.size
    written = cache.entry_json("alice", kept)
    assert written is not None
    assert orjson.dumps([written]) == orjson.dumps([kept.to_json()])
    assert cache.size - before >= len(orjson.dumps(kept.to_json()))  # counts against the bound
    assert cache.entry_json("alice", kept) is written  # written once
    assert cache.entry_json("alice", conversation(1, read_seq=2, unread=1)) is None  # a copy
    assert cache.entry_json("bob", kept) is None  # another user
    moved = conversation(1, read_seq=3, unread=0)
    cache.put(7, moved, "alice")  # a new read mark
    assert cache.size == USER_OVERHEAD + size_of(moved)  # the JSON went with its entry
    assert cache.entry_json("alice", kept) is None
    assert cache.entry_json("alice", moved) is None  # not served yet
    assert cache.get(1, 7, "alice", 3) is moved
    assert orjson.loads(orjson.dumps([cache.entry_json("alice", moved)]))[0]["unread"] == 0


def test_a_users_list_is_checked_first_after_their_first_and_while_half_of_it_was_held() -> None:
    cache = ListCache(1 << 20)
    assert not cache.checks_first("alice")  # never seen: read at once
    cache.note("alice", 0, 10)  # nothing kept of theirs: nothing to say
    assert not cache.checks_first("alice")
    cache.put(7, conversation(1), "alice")
    cache.note("alice", 0, 1)
    assert cache.checks_first("alice")  # their first list is now held
    cache.note("alice", 4, 10)
    assert not cache.checks_first("alice")
    cache.note("alice", 5, 10)
    assert cache.checks_first("alice")
    cache.note("alice", 0, 0)  # an empty page says nothing
    assert cache.checks_first("alice")
    assert not cache.checks_first("bob")


def test_the_bytes_held_stay_under_the_bound_dropping_the_users_who_listed_least_recently() -> None:
    one = USER_OVERHEAD + size_of(conversation(1))
    cache = ListCache(3 * one)
    for user in ("alice", "bob", "carol"):
        cache.put(7, conversation(1), user)
        cache.note(user, 0, 1)
    assert cache.size == 3 * one
    cache.note("alice", 1, 1)  # alice listed again: bob is now the least recent
    cache.put(7, conversation(1), "dave")
    assert cache.size <= 3 * one
    assert cache.get(1, 7, "bob", 0) is None
    assert all(cache.get(1, 7, user, 0) is not None for user in ("alice", "carol", "dave"))


def test_a_list_larger_than_the_bound_drops_the_others_first_and_is_not_kept_whole() -> None:
    one = USER_OVERHEAD + size_of(conversation(1))
    cache = ListCache(3 * one)
    cache.put(7, conversation(1), "alice")
    for room_id in range(1, 6):
        cache.put(7, conversation(room_id), "bob")
        assert cache.size <= 3 * one
    assert cache.get(1, 7, "alice", 0) is None  # alice went first
    assert len(cache) < 5


def test_a_long_message_counts_for_its_size() -> None:
    cache = ListCache(10_000)
    cache.put(7, conversation(1, content="x" * 20_000), "alice")
    assert len(cache) == 0 and cache.size == 0  # more than the bound: not kept
    cache.put(7, conversation(1, content="€" * 1000), "alice")
    assert cache.size >= ENTRY_OVERHEAD + USER_OVERHEAD + 2000  # two bytes a code point


def test_a_cache_of_no_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ListCache(0)


def test_lists_that_keep_changing_are_kept_once_in_keep_every() -> None:
    cache = ListCache(1 << 20)
    assert cache.keeps("alice")  # never seen: kept, so that the next list can be answered
    cache.put(7, conversation(1), "alice")
    cache.note("alice", 0, 1)  # the first list
    assert cache.keeps("alice")
    kept = []
    for _ in range(3 * KEEP_EVERY):
        cache.note("alice", 0, 1)  # the cache held none of it
        kept.append(cache.keeps("alice"))
    assert kept.count(True) == 3  # one list in KEEP_EVERY
    cache.note("alice", 1, 1)  # held again: every list kept
    assert cache.keeps("alice") and cache.checks_first("alice")


def test_the_cache_knows_whether_a_users_last_list_held_all_their_rooms_until_the_next() -> None:
    cache = ListCache(1 << 20)
    assert cache.whole("u") is None  # a user it does not hold
    cache.put(1, conversation(1), "u")
    cache.note("u", 0, 7, whole=True)
    assert cache.whole("u") == 7
    cache.note("u", 7, 8)  # a page that may not hold them all
    assert cache.whole("u") is None
    cache.note("u", 0, 0, whole=True)  # a whole list of no room
    assert cache.whole("u") == 0
    cache.note("nobody", 0, 3, whole=True)
    assert cache.whole("nobody") is None

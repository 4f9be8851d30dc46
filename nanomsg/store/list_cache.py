"""A process's copy of conversation-list entries, so that a list whose rooms have not changed
since this process last read them costs one short statement instead of every room's latest
message and unread count.

An entry is valid for one version of its room, which the backend reads with each page: on
PostgreSQL the room row's ``xmin``, which every room event (message, edit, deletion), every
change of the room's settings and its deletion write anew, so an entry is never served for a
room that changed since, whichever process changed it. The entry holds the room's part of a
``Conversation`` (shared by every user who lists the room) and, per user, the read mark it was
read with and that user's unread count; a user's part is used only while the mark is the one
the page reads, since the count depends on it.

Bounded by an estimate of the bytes it holds: past ``max_bytes`` the rooms listed least
recently are dropped, with their users' parts. Dropping costs only a later re-read.

Checking costs a statement of its own (the page's versions and read marks), which a list
the cache cannot answer pays on top of reading every room. So the cache also remembers, for
the users who listed recently (``NOTED_USERS``), whether their last list could have been
answered mostly from it (``note``); a list is checked against the cache first only then
(``checks_first``), and otherwise read as without a cache and its entries kept.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import orjson

from nanomsg.models import Conversation

# Where the user's part (read_seq, unread) sits among a Conversation's fields.
_READ_SEQ = Conversation._fields.index("read_seq")
_UNREAD = Conversation._fields.index("unread")
assert _UNREAD == _READ_SEQ + 1
# Estimated bytes of a room's entry beyond its name and latest message's text (the first user's
# tuple with its stamps, uuids and ints, the record, the LRU's slot), and of each further
# user's part (a tuple sharing the first one's fields, its dict slot). Measured with
# tracemalloc over the benchmark's 1 000 rooms (short names and messages): 1 695 bytes an
# entry with its first user (estimated 1 713) and 256 per further user.
ENTRY_OVERHEAD = 1000
USER_OVERHEAD = 300
# Beyond the written bytes of a user's entry: the Fragment holding them and its dict slot.
WRITTEN_OVERHEAD = 150
# Users whose last list the cache remembers (``note``), the least recent forgotten first:
# ~120 bytes each, ~0.5 MiB in all.
NOTED_USERS = 4096


@dataclass(slots=True)
class _Entry:
    """One room at one version: each user's ``Conversation`` of it, all sharing the first
    one's fields but the user's part, and the estimated bytes they take."""

    version: int
    first: Conversation
    size: int
    users: dict[str, Conversation] = field(default_factory=dict)
    # Each user's entry as written JSON, when first asked for (``ListCache.entry_json``).
    written: dict[str, tuple[orjson.Fragment, int]] = field(default_factory=dict)


class ListCache:
    """Conversation entries by room and version, at most ``max_bytes`` (estimated) in all."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._max_bytes = max_bytes
        self._bytes = 0
        self._rooms: OrderedDict[int, _Entry] = OrderedDict()
        self._checks_first: OrderedDict[str, bool] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rooms)

    @property
    def size(self) -> int:
        """The estimated bytes held."""
        return self._bytes

    def checks_first(self, user: str) -> bool:
        """Whether ``user``'s next list should be checked against the cache before anything
        else is read (see ``note``); not for a user it does not remember."""
        return self._checks_first.get(user, False)

    def note(self, user: str, hits: int, rooms: int) -> None:
        """``user`` listed ``rooms`` rooms, of which the cache held ``hits`` as they were read
        (whichever way they were read). Their next list is checked first if that was at least
        half of them, or if this was the first list the cache remembers of theirs (it now
        holds that list's entries); a list of no room changes nothing."""
        if rooms == 0:
            return
        first = user not in self._checks_first
        self._checks_first[user] = first or 2 * hits >= rooms
        self._checks_first.move_to_end(user)
        if len(self._checks_first) > NOTED_USERS:
            self._checks_first.popitem(last=False)

    def get(self, room_id: int, version: int, user: str, read_seq: int) -> Conversation | None:
        """The entry of ``room_id`` for ``user`` if this process read it at ``version`` for that
        user with that read mark; None otherwise."""
        entry = self._rooms.get(room_id)
        if entry is None or entry.version != version:
            return None
        found = entry.users.get(user)
        if found is None or found[_READ_SEQ] != read_seq:
            return None
        self._rooms.move_to_end(room_id)
        return found

    def entry_json(self, user: str, conversation: Conversation) -> orjson.Fragment | None:
        """The list entry of ``conversation`` as written JSON (``orjson.dumps`` of its
        ``to_json``, put in an answer as it is) if it is the one this cache holds for ``user``
        (as ``get`` or ``put`` returned it), None otherwise. Written on the first call and
        kept with the user's part: a user's entry is fixed at one version and read mark, and
        handing the kept bytes on costs ~0.2 us an entry against ~1.5 us for writing it
        (measured: BENCHMARKS.md, "The conversation list")."""
        entry = self._rooms.get(conversation.id)
        if entry is None or entry.users.get(user) is not conversation:
            return None
        written = entry.written.get(user)
        if written is not None:
            return written[0]
        text = orjson.dumps(conversation.to_json())
        grown = sys.getsizeof(text) + WRITTEN_OVERHEAD
        fragment = orjson.Fragment(text)
        entry.written[user] = (fragment, grown)
        entry.size += grown
        self._bytes += grown
        self._trim()
        return fragment

    def put(self, version: int, conversation: Conversation, user: str) -> Conversation:
        """Keep ``conversation``, read for ``user`` at ``version`` of its room, and return it as
        kept (equal to it; ``entry_json`` knows only that one); an entry of another version is
        replaced (with its users' parts)."""
        room_id = conversation.id
        entry = self._rooms.get(room_id)
        if entry is None or entry.version != version:
            if entry is not None:
                self._drop(room_id)
            content = conversation.message_content
            size = (
                ENTRY_OVERHEAD
                + sys.getsizeof(conversation.name)
                + (0 if content is None else sys.getsizeof(content))
            )
            entry = _Entry(version, conversation, size)
            self._rooms[room_id] = entry
            self._bytes += size
        else:
            self._rooms.move_to_end(room_id)
            first = entry.first  # the room's text once, whoever reads it
            conversation = Conversation._make(
                (*first[:_READ_SEQ], *conversation[_READ_SEQ : _UNREAD + 1], *first[_UNREAD + 1 :])
            )
        if user not in entry.users:
            entry.size += USER_OVERHEAD
            self._bytes += USER_OVERHEAD
        elif user in entry.written:  # the user's part changed (a new read mark): rewrite it
            _, freed = entry.written.pop(user)
            entry.size -= freed
            self._bytes -= freed
        entry.users[user] = conversation
        self._trim()
        return conversation

    def _trim(self) -> None:
        """Drop the rooms listed least recently until the bytes held are within the bound."""
        while self._bytes > self._max_bytes and self._rooms:
            self._drop(next(iter(self._rooms)))

    def _drop(self, room_id: int) -> None:
        self._bytes -= self._rooms.pop(room_id).size

"""A process's copy of the conversation-list entries it answered, per user, so that a list
whose rooms have not changed since costs one short statement instead of every room's latest
message and unread count.

An entry is valid for one version of its room, which the backend reads with each page: on
PostgreSQL the room row's ``xmin``, which every room event (message, edit, deletion), every
change of the room's settings and its deletion write anew, so an entry is not served for a
room that changed since, whichever process changed it (a 32-bit transaction id: two versions
of a row share one only if the later write lands on the same id 2^32 transactions later). A
user's entry also depends on their read mark (the unread count does), so it is served only
while the page reads the mark it was read with.

Checking costs a statement of its own (the page's versions and read marks), which a list the
cache cannot answer pays on top of reading every room. So the cache also remembers whether a
user's last list could have been answered mostly from it (``note``); their next list is
checked first only then (``checks_first``), and otherwise read as without a cache. Such a
list's entries are kept only every ``KEEP_EVERY``-th time while the user's lists keep
changing (``keeps``): keeping costs more than it saves when nothing kept is served again,
and a list kept now and then is enough to see when they stop changing.

Bounded by an estimate of the bytes it holds: past ``max_bytes`` the users who listed least
recently are dropped with their entries. Dropping costs only a later re-read.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import orjson

from nanomsg.models import Conversation

_READ_SEQ = Conversation._fields.index("read_seq")
# Estimated bytes of a kept entry beyond its room's name and latest message's text (the tuple
# with its stamps, uuids and ints, the dict slot), and of a user's record. Measured with
# tracemalloc over the benchmark's 1 000 rooms (short names and messages): 1 470 bytes an
# entry, estimated 1 708; its JSON once served, 801 bytes, estimated 839.
ENTRY_OVERHEAD = 1600
USER_OVERHEAD = 400
# Beyond the written bytes of an entry's JSON: the Fragment holding them and its dict slot.
WRITTEN_OVERHEAD = 150
# While a user's lists keep changing, the entries of one list in this many are kept (``keeps``).
KEEP_EVERY = 4


@dataclass(slots=True)
class _User:
    """A user's kept entries by room id, with the room version each was read at; the JSON of
    those ``get`` has served (None until ``entry_json`` writes it); whether their next list is
    checked first; and the estimated bytes they take."""

    entries: dict[int, tuple[int, Conversation, int]] = field(default_factory=dict)
    written: dict[int, tuple[orjson.Fragment, int] | None] = field(default_factory=dict)
    checks_first: bool = True
    lists: int = 0  # lists noted
    misses: int = 0  # lists noted in a row that the cache mostly could not answer
    whole: int | None = None  # rooms of their last list, if it held all their rooms
    size: int = USER_OVERHEAD


class ListCache:
    """Conversation entries by user, room and version, at most ``max_bytes`` (estimated)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._max_bytes = max_bytes
        self._bytes = 0
        self._users: OrderedDict[str, _User] = OrderedDict()

    def __len__(self) -> int:
        """The entries held, all users together."""
        return sum(len(kept.entries) for kept in self._users.values())

    @property
    def size(self) -> int:
        """The estimated bytes held."""
        return self._bytes

    def checks_first(self, user: str) -> bool:
        """Whether ``user``'s next list should be checked against the cache before anything
        else is read (see ``note``); not for a user it does not hold."""
        kept = self._users.get(user)
        return kept is not None and kept.checks_first

    def note(self, user: str, hits: int, rooms: int, *, whole: bool = False) -> None:
        """``user`` listed ``rooms`` rooms, of which the cache held ``hits`` as they were read
        (whichever way they were read); ``whole``: that list held every room they may read
        (``whole`` answers it until their next list). Their next list is checked first if
        that was at least half of them, or if this was the first list the cache holds of
        theirs (it now holds that list's entries); a list of no room changes nothing else.
        The user becomes the most recent to go when the cache is full."""
        kept = self._users.get(user)
        if kept is None:
            return
        kept.whole = rooms if whole else None
        if rooms == 0:
            return
        kept.checks_first = kept.lists == 0 or 2 * hits >= rooms
        kept.misses = 0 if kept.checks_first else kept.misses + 1
        kept.lists += 1
        self._users.move_to_end(user)

    def whole(self, user: str) -> int | None:
        """How many rooms ``user``'s last list held, if it held every room they may read (a
        first page with room to spare); None if it did not, or the cache does not know. A
        hint for how to read their next list (they may have gained rooms since), never an
        answer."""
        kept = self._users.get(user)
        return None if kept is None else kept.whole

    def keeps(self, user: str) -> bool:
        """Whether the entries of ``user``'s list, read without checking the cache first,
        should be kept: always for a user it does not hold or whose last list it mostly held;
        one list in ``KEEP_EVERY`` while their lists keep changing."""
        kept = self._users.get(user)
        return kept is None or kept.misses % KEEP_EVERY == 0

    def get(self, room_id: int, version: int, user: str, read_seq: int) -> Conversation | None:
        """The entry of ``room_id`` for ``user`` if this process read it for them at
        ``version`` with that read mark; None otherwise."""
        kept = self._users.get(user)
        if kept is None:
            return None
        entry = kept.entries.get(room_id)
        if entry is None or entry[0] != version or entry[1][_READ_SEQ] != read_seq:
            return None
        if room_id not in kept.written:
            kept.written[room_id] = None  # served: its JSON is worth keeping
        return entry[1]

    def entry_json(self, user: str, conversation: Conversation) -> orjson.Fragment | None:
        """The list entry of ``conversation`` as written JSON (``orjson.dumps`` of its
        ``to_json``, put in an answer as it is) if it is the tuple this cache holds for
        ``user`` and ``get`` has served it; None otherwise (the caller writes the entry).
        Written on the first such call and kept: an entry is fixed at one version and read
        mark, and handing the kept bytes on costs ~0.3 us an entry against ~1.3 us for writing
        it. A tuple only just read (``put``) is not written here: a list whose rooms all
        change between requests would pay for bytes never used again (measured:
        BENCHMARKS.md, "The conversation list")."""
        kept = self._users.get(user)
        if kept is None:
            return None
        room_id = conversation.id
        entry = kept.entries.get(room_id)
        if entry is None or entry[1] is not conversation or room_id not in kept.written:
            return None
        written = kept.written[room_id]
        if written is not None:
            return written[0]
        # As text: the bytes orjson returns keep its whole 4 KiB buffer (tracemalloc: 4 098
        # bytes each for ~420 of JSON), the text only what it holds.
        text = orjson.dumps(conversation.to_json()).decode()
        grown = sys.getsizeof(text) + WRITTEN_OVERHEAD
        fragment = orjson.Fragment(text)
        kept.written[room_id] = (fragment, grown)
        kept.size += grown
        self._bytes += grown
        self._trim(user)
        return fragment

    def put(self, version: int, conversation: Conversation, user: str) -> None:
        """Keep ``conversation``, read for ``user`` at ``version`` of its room, in place of
        what was kept for them of that room."""
        kept = self._users.get(user)
        if kept is None:
            kept = self._users[user] = _User()
            self._bytes += kept.size
        room_id = conversation.id
        content = conversation.message_content
        size = (
            ENTRY_OVERHEAD
            + sys.getsizeof(conversation.name)
            + (0 if content is None else sys.getsizeof(content))
        )
        grown = size
        old = kept.entries.get(room_id)
        if old is not None:
            grown -= old[2]
            written = kept.written.pop(room_id, None)
            if written is not None:
                grown -= written[1]
        kept.entries[room_id] = (version, conversation, size)
        kept.size += grown
        self._bytes += grown
        if self._bytes > self._max_bytes:
            self._trim(user)

    def _trim(self, user: str) -> None:
        """Drop the users who listed least recently until the bytes held are within the
        bound; ``user``, whose list is being kept, goes last, and only their entries."""
        while self._bytes > self._max_bytes and self._users:
            oldest = next(iter(self._users))
            if oldest == user and len(self._users) > 1:
                self._users.move_to_end(user)
                continue
            dropped = self._users.pop(oldest)
            self._bytes -= dropped.size

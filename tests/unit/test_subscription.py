"""The subscription machine: its table is complete and its transitions are the documented ones."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from nanomsg.models import Principal, Room, Rule
from nanomsg.permissions import DECISIONS, Access, evaluate
from nanomsg.subscription import TRANSITIONS, SubEvent, Subscription, Subscriptions, SubState

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def test_the_table_has_an_entry_for_every_state_and_event() -> None:
    # The pairs come from the enums, not from the table: a state or event added without its
    # row fails here.
    expected = set(itertools.product(SubState, SubEvent))
    missing = expected - set(TRANSITIONS)
    assert not missing, sorted((s.value, e.value) for s, e in missing)
    assert set(TRANSITIONS) == expected


@pytest.mark.parametrize(
    ("events", "final"),
    [
        ((SubEvent.GRANTED,), SubState.LIVE),
        ((SubEvent.GRANTED_RESUME,), SubState.REPLAYING),
        ((SubEvent.GRANTED_RESUME, SubEvent.REPLAYED), SubState.LIVE),
        ((SubEvent.GRANTED, SubEvent.GRANTED_RESUME), SubState.REPLAYING),  # resume when held
        ((SubEvent.DENIED,), SubState.GONE),
        ((SubEvent.GRANTED, SubEvent.REVOKED), SubState.GONE),
        ((SubEvent.GRANTED_RESUME, SubEvent.LEFT), SubState.GONE),
        ((SubEvent.REPLAYED,), SubState.LOADING),  # a late replay result changes nothing
    ],
)
def test_transitions_follow_the_table(events: tuple[SubEvent, ...], final: SubState) -> None:
    sub = Subscription(7, explicit=True)
    assert sub.state is SubState.LOADING and not sub.joined
    for event in events:
        sub.fire(event)
    assert sub.state is final
    assert sub.joined == (final in (SubState.LIVE, SubState.REPLAYING))


@pytest.mark.parametrize("event", list(SubEvent))
def test_gone_is_terminal(event: SubEvent) -> None:
    sub = Subscription(7, explicit=False)
    sub.fire(SubEvent.LEFT)
    assert sub.fire(event) is SubState.GONE


def test_only_grants_join_and_every_way_out_ends_in_gone() -> None:
    for (state, event), after in TRANSITIONS.items():
        if event in (SubEvent.DENIED, SubEvent.REVOKED, SubEvent.LEFT):
            assert after is SubState.GONE, (state, event)
        if state is not SubState.GONE and after in (SubState.LIVE, SubState.REPLAYING):
            assert event is not SubEvent.DENIED


# -- Subscriptions: the rooms of one connection in a few bytes each ------------------------------

READER = evaluate(
    Principal(user="u", entity="e", level=0, exp=0, claims={}),
    Room(1, "r", "r", 10, "group", "other", 100, 0, T0, T0),
    (Rule(1, "u", "user", "rw", 0, True, T0, T0),),
)


def live(room_id: int, *, explicit: bool = True, access: Access | None = READER) -> Subscription:
    sub = Subscription(room_id, explicit=explicit)
    sub.fire(SubEvent.GRANTED)
    sub.access = access
    return sub


def test_a_live_room_with_no_floor_is_a_code_not_an_object() -> None:
    rooms = Subscriptions()
    for room_id in (30, 10, 20):
        rooms.set(live(room_id, explicit=room_id != 20))
    assert rooms.objects is None  # no object kept for any of them
    assert len(rooms) == 3 and list(rooms) == [10, 20, 30]  # ascending room ids
    assert 20 in rooms and 15 not in rooms and "20" not in rooms
    sub = rooms[20]
    assert (sub.room_id, sub.state, sub.explicit, sub.access) == (20, SubState.LIVE, False, READER)
    assert sub.access is READER  # the shared decision itself, not a copy
    assert rooms.get(15) is None
    with pytest.raises(KeyError):
        rooms[15]
    assert [s.room_id for s in rooms.values()] == [10, 20, 30]


def test_changes_to_a_room_are_kept_by_set() -> None:
    rooms = Subscriptions()
    rooms.add(7, explicit=False)
    assert rooms[7].state is SubState.LOADING and rooms[7].access is None
    sub = rooms[7]
    sub.explicit, sub.access = True, READER
    sub.fire(SubEvent.GRANTED)
    assert rooms[7].state is SubState.LOADING  # a compact room's object is a copy...
    rooms.set(sub)
    assert (rooms[7].state, rooms[7].explicit, rooms[7].access) == (SubState.LIVE, True, READER)
    sub.fire(SubEvent.LEFT)
    rooms.set(sub)  # ...and GONE is forgotten
    assert 7 not in rooms and len(rooms) == 0


def test_a_room_with_a_floor_or_held_frames_is_kept_as_its_object_then_compact_again() -> None:
    rooms = Subscriptions()
    rooms.set(live(8))
    resuming = rooms[8]
    resuming.fire(SubEvent.GRANTED_RESUME)
    resuming.min_seq, resuming.held = 5, []
    rooms.set(resuming)
    assert rooms.objects == {8: resuming} and rooms[8] is resuming  # promoted
    assert [sub.room_id for sub in rooms.kept()] == [8]
    resuming.held.append(b"frame")  # the driver holds frames on the stored object
    assert rooms[8].held == [b"frame"]
    resuming.fire(SubEvent.REPLAYED)
    resuming.held = None
    rooms.set(resuming)
    assert rooms.objects == {8: resuming}  # the floor still matters
    resuming.min_seq = 0
    rooms.set(resuming)
    assert rooms.objects is None and rooms.kept() == []  # demoted
    assert rooms[8].state is SubState.LIVE and rooms[8] is not resuming


def test_a_decision_that_is_not_shared_keeps_the_room_as_an_object() -> None:
    odd = Access(read=True, write=False, admin=False, reason="made elsewhere")
    rooms = Subscriptions()
    rooms.set(live(3, access=odd))
    assert rooms.objects is not None and rooms[3].access is odd
    assert rooms.pop(3) is not None and rooms.objects is None and len(rooms) == 0
    assert rooms.pop(3) is None


def test_room_ids_take_four_bytes_until_one_needs_eight() -> None:
    rooms = Subscriptions()
    for room_id in range(1, 101):
        rooms.set(live(room_id))
    assert rooms._ids.itemsize == 4
    huge = 2**40 + 3
    rooms.set(live(huge))
    rooms.set(live(-(2**33)))
    assert rooms._ids.itemsize == 8
    assert list(rooms) == [-(2**33), *range(1, 101), huge]
    assert rooms[huge].room_id == huge and rooms[50].access is READER
    assert 2**31 not in rooms


def test_every_state_flag_and_shared_decision_survives_its_code() -> None:
    # The states come from the enum: one added without a code fails here.
    rooms = Subscriptions()
    for i, (state, explicit, access) in enumerate(
        itertools.product(
            [state for state in SubState if state is not SubState.GONE],
            [False, True],
            [None, *DECISIONS],
        )
    ):
        sub = Subscription(i, explicit=explicit)
        sub.state, sub.access = state, access
        rooms.set(sub)
        assert rooms.objects is None
        back = rooms[i]
        assert (back.state, back.explicit, back.access) == (state, explicit, access)

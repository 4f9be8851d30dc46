"""The subscription machine: its table is complete and its transitions are the documented ones."""

from __future__ import annotations

import itertools

import pytest

from nanomsg.subscription import TRANSITIONS, SubEvent, Subscription, SubState


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

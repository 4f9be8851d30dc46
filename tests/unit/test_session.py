"""The pure session state machine: every transition, without sockets or an event loop."""

from __future__ import annotations

import typing
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from nanomsg import codec
from nanomsg.auth import Verifier, mint
from nanomsg.clock import FakeClock
from nanomsg.events import (
    Arm,
    AuthRefused,
    BadArgs,
    BadJson,
    ChangeMessage,
    ChangeRefused,
    Close,
    Command,
    DeleteMessage,
    Disarm,
    DmReady,
    EditMessage,
    Effect,
    EndReplay,
    EventStored,
    GetPastMessages,
    HistoryLoaded,
    Join,
    Leave,
    LoadHistory,
    LoadRoom,
    MarkRead,
    MessageRefused,
    MessageStored,
    OpenDm,
    Publish,
    Quit,
    ReadMarked,
    Replayed,
    RoomLoaded,
    RoomMissing,
    RunOpenDm,
    SelectRoom,
    Send,
    SendMessage,
    SetReadMark,
    SetReceiving,
    Settle,
    StorageFailed,
    StoreMessage,
    Subscribe,
    Timer,
    Token,
    TooLarge,
    Unknown,
    Unsubscribe,
)
from nanomsg.models import Message, Principal, Room, RoomAccess, Rule
from nanomsg.permissions import Access, evaluate
from nanomsg.session import (
    _COMMANDS,
    MAX_CLOSE_REASON,
    TRANSITIONS,
    CloseCode,
    Limits,
    Session,
    State,
    _close_reason,
)
from nanomsg.subscription import SubState

SECRET = "unit-secret-0123456789abcdef-0123456789"
USER = str(uuid.uuid4())
ENTITY = str(uuid.uuid4())
OTHER_ENTITY = str(uuid.uuid4())
T0 = datetime(2026, 11, 23, tzinfo=UTC)


def sent(effects: list[Effect]) -> list[dict[str, object]]:
    return [orjson.loads(e.payload) for e in effects if isinstance(e, Send)]


def closes(effects: list[Effect]) -> list[int]:
    return [e.code for e in effects if isinstance(e, Close)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def session(clock: FakeClock) -> Session:
    verifier = Verifier.from_material(clock=clock, secret=SECRET, leeway=5)
    s = Session(verifier, clock, Limits(auth_timeout=10, refresh_grace=30))
    s.start()
    return s


def token(
    clock: FakeClock, user: str = USER, entity: str = ENTITY, level: int = 100, ttl=600
) -> Token:
    return Token(
        mint(secret=SECRET, user=user, entity=entity, level=level, now=clock.wall(), ttl=ttl)
    )


def room(room_id: int = 7, owner: str = OTHER_ENTITY, last_seq: int = 3) -> Room:
    return Room(room_id, str(uuid.uuid4()), "r", 500, "group", owner, 100, last_seq, T0, T0)


def rule(room_id: int, flags: str, subject: str = USER, kind: str = "user") -> Rule:
    return Rule(room_id, subject, kind, flags, 0, True, T0, T0)


def access(flags: str, room_id: int = 7) -> RoomAccess:
    return RoomAccess(room(room_id), (rule(room_id, flags),))


def authed(session: Session, clock: FakeClock) -> Session:
    session.receive(token(clock))
    return session


def in_room(session: Session, clock: FakeClock, flags: str = "rw", room_id: int = 7) -> Session:
    authed(session, clock)
    session.receive(SelectRoom(room_id))
    session.result(RoomLoaded(room_id, access(flags, room_id)))
    return session


def test_every_state_has_an_answer_for_every_command() -> None:
    # The commands come from the Command union itself, not from the table's own list.
    commands = set(typing.get_args(Command))
    assert commands == set(_COMMANDS)
    for state in State:
        assert set(TRANSITIONS[state]) == commands, state


def test_start_asks_for_a_token_and_arms_the_auth_timer(clock: FakeClock) -> None:
    verifier = Verifier.from_material(clock=clock, secret=SECRET)
    effects = Session(verifier, clock, Limits(auth_timeout=10)).start()
    assert effects[0] == Send(codec.START)
    assert Arm(Timer.AUTH, clock.wall() + 10) in effects


def test_valid_token_answers_ready_and_arms_expiry(session: Session, clock: FakeClock) -> None:
    effects = session.receive(token(clock, ttl=600))
    assert sent(effects) == [{"type": "status", "data": "READY"}]
    assert Disarm(Timer.AUTH) in effects
    assert Arm(Timer.EXPIRY, int(clock.wall()) + 600 + 5) in effects
    assert session.state is State.READY


def test_bad_token_answers_badauth_and_third_failure_closes_1008(
    session: Session, clock: FakeClock
) -> None:
    first = session.receive(Token("not.a.jwt"))
    assert sent(first) == [{"type": "status", "data": "BADAUTH"}] and not closes(first)
    second = session.receive(SelectRoom(1))  # other commands count as trials too
    assert sent(second) == [{"type": "query", "data": "TOKEN?"}] and not closes(second)
    third = session.receive(Token(None))
    assert sent(third) == [{"type": "status", "data": "BADAUTH"}]
    assert closes(third) == [CloseCode.POLICY]
    assert session.state is State.CLOSED


@pytest.mark.parametrize(
    "command",
    [
        SelectRoom(1),
        SendMessage("x", None),
        GetPastMessages(50, None),
        Unknown(),
        BadArgs("m", "r"),
        TooLarge(),
    ],
)
def test_commands_before_auth_get_token_query(session: Session, command: object) -> None:
    effects = session.receive(command)  # type: ignore[arg-type]
    assert sent(effects) == [{"type": "query", "data": "TOKEN?"}]
    assert session.trials == 1


def test_quit_closes_1000_in_any_live_state(session: Session, clock: FakeClock) -> None:
    assert closes(session.receive(Quit())) == [CloseCode.NORMAL]
    s2 = Session(session.verifier, clock, session.limits)
    authed(s2, clock)
    assert closes(s2.receive(Quit())) == [CloseCode.NORMAL]


def test_bad_json_answers_badjson_then_closes_1003(session: Session) -> None:
    effects = session.receive(BadJson())
    assert sent(effects) == [{"type": "status", "data": "BADJSON"}]
    assert closes(effects) == [CloseCode.UNSUPPORTED]


def test_closed_session_ignores_everything(session: Session, clock: FakeClock) -> None:
    session.receive(Quit())
    for command in (token(clock), SelectRoom(1), Quit(), BadJson()):
        assert session.receive(command) == []


def test_auth_timer_closes_1008_only_while_waiting_for_a_token(
    session: Session, clock: FakeClock
) -> None:
    assert closes(session.timer_fired(Timer.AUTH)) == [CloseCode.POLICY]
    s2 = Session(session.verifier, clock, session.limits)
    authed(s2, clock)
    assert s2.timer_fired(Timer.AUTH) == []


def test_unknown_command_after_auth_gets_command_query(session: Session, clock: FakeClock) -> None:
    authed(session, clock)
    assert sent(session.receive(Unknown())) == [{"type": "query", "data": "COMMAND?"}]
    assert session.state is State.READY


def test_send_and_history_without_room_get_selectroom_query(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    assert sent(session.receive(SendMessage("hi", None))) == [
        {"type": "query", "data": "SELECTROOM?"}
    ]
    assert sent(session.receive(GetPastMessages(50, None))) == [
        {"type": "query", "data": "SELECTROOM?"}
    ]


def test_select_room_loads_then_connects_and_joins_after_the_stored_seq(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    assert session.receive(SelectRoom(7)) == [LoadRoom(7)]
    loaded = access("r")
    effects = session.result(RoomLoaded(7, loaded))
    assert sent(effects) == [{"type": "status", "data": "CONNECTED"}]
    assert effects[-1] == Join(7, 3, access=loaded)  # the hub keeps the rules for the next select
    assert session.room_id == 7


def test_select_room_refused_for_missing_room_or_no_read(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    session.receive(SelectRoom(7))
    assert sent(session.result(RoomLoaded(7, None))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]
    session.receive(SelectRoom(7))
    refused = session.result(RoomLoaded(7, access("w")))  # write-only rule: no read
    assert sent(refused) == [{"type": "status", "data": "NOTAUTHORIZED"}]
    assert session.room_id is None


def test_selecting_another_room_leaves_the_previous_one(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    session.receive(SelectRoom(8))
    loaded = access("r", 8)
    effects = session.result(RoomLoaded(8, loaded))
    assert effects[0] == Leave(7)
    assert Join(8, 3, access=loaded) in effects


def test_failed_select_leaves_the_previous_room(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    session.receive(SelectRoom(8))
    effects = session.result(RoomLoaded(8, None))
    assert Leave(7) in effects and session.room_id is None


def test_reselecting_the_same_room_answers_connected_without_rejoining(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    session.receive(SelectRoom(7))
    effects = session.result(RoomLoaded(7, access("r")))
    assert sent(effects) == [{"type": "status", "data": "CONNECTED"}]
    assert not any(isinstance(e, Join | Leave) for e in effects)


def test_message_with_write_is_stored_then_published(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, flags="rw")
    effects = session.receive(SendMessage("hello", "c1"))
    assert len(effects) == 1 and isinstance(effects[0], StoreMessage)
    new = effects[0].new
    assert (new.room_id, new.emitter, new.entity, new.content, new.client_id) == (
        7,
        USER,
        ENTITY,
        "hello",
        "c1",
    )
    msg = Message(1, 7, 4, USER, ENTITY, "hello", T0, "c1")
    assert session.result(MessageStored(msg, True)) == [Publish(msg)]


def test_idempotent_resend_answers_only_the_sender(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    session.receive(SendMessage("hello", "c1"))
    msg = Message(1, 7, 4, USER, ENTITY, "hello", T0, "c1")
    assert session.result(MessageStored(msg, False)) == [Send(codec.message_frame(msg))]


def test_message_without_write_is_notauthorized(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, flags="r")
    assert sent(session.receive(SendMessage("x", None))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]


def test_storage_failure_answers_unavailable(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    session.receive(SendMessage("x", None))
    assert sent(session.result(StorageFailed())) == [{"type": "status", "data": "UNAVAILABLE"}]


def test_room_gone_on_send_leaves_and_names_the_room(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    session.receive(SendMessage("x", None))
    effects = session.result(RoomMissing(7))
    assert Leave(7) in effects
    assert sent(effects) == [{"type": "status", "data": "NOTAUTHORIZED", "room_id": 7}]


def test_every_pipelined_send_to_a_deleted_room_is_answered(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    session.receive(SendMessage("a", None))
    session.receive(SendMessage("b", None))  # pipelined: submitted before a's result
    first = session.result(RoomMissing(7))
    second = session.result(RoomMissing(7))
    assert Leave(7) in first and not any(isinstance(e, Leave) for e in second)
    notice = {"type": "status", "data": "NOTAUTHORIZED", "room_id": 7}
    assert sent(first) == [notice] and sent(second) == [notice]
    assert session.room_id is None


def test_bad_args_and_too_large_after_auth(session: Session, clock: FakeClock) -> None:
    authed(session, clock)
    assert sent(session.receive(BadArgs("select_room", "room_id must be a positive integer"))) == [
        {"type": "status", "data": "BADARGS", "reason": "room_id must be a positive integer"}
    ]
    assert sent(session.receive(TooLarge())) == [{"type": "status", "data": "TOOLARGE"}]


def test_history_loads_latest_then_ends_with_count(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    effects = session.receive(GetPastMessages(2, 10))
    assert isinstance(effects[0], LoadHistory)
    q = effects[0].query
    assert (q.room_id, q.limit, q.before, q.newest) == (7, 2, 10, True)
    msgs = (Message(1, 7, 8, USER, ENTITY, "a", T0), Message(2, 7, 9, USER, ENTITY, "b", T0))
    frames = sent(session.result(HistoryLoaded(msgs)))
    assert [f["type"] for f in frames] == ["message", "message", "status"]
    assert frames[-1] == {"type": "status", "data": "HISTORYEND", "count": 2}


def test_expiry_stops_receiving_and_sends_expired(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    clock.advance(600 + 6)
    effects = session.timer_fired(Timer.EXPIRY)
    assert SetReceiving(False) in effects
    assert sent(effects) == [{"type": "status", "data": "EXPIRED"}]
    assert Arm(Timer.REFRESH, clock.wall() + 30) in effects
    assert session.state is State.EXPIRED
    assert sent(session.receive(SendMessage("x", None))) == [{"type": "query", "data": "TOKEN?"}]


def test_expiry_timer_before_exp_plus_leeway_rearms(session: Session, clock: FakeClock) -> None:
    authed(session, clock)
    clock.advance(600 + 2)  # past exp, within the 5 s leeway
    effects = session.timer_fired(Timer.EXPIRY)
    assert all(isinstance(e, Arm) for e in effects) and session.state is State.READY


def test_refresh_with_same_user_keeps_room_and_receiving(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    clock.advance(606)
    session.timer_fired(Timer.EXPIRY)
    effects = session.receive(token(clock))
    assert sent(effects) == [{"type": "status", "data": "READY"}]
    assert SetReceiving(True) in effects and Disarm(Timer.REFRESH) in effects
    assert session.state is State.READY and session.room_id == 7


def test_refresh_with_another_user_is_badauth_and_close(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    clock.advance(606)
    session.timer_fired(Timer.EXPIRY)
    effects = session.receive(token(clock, user=str(uuid.uuid4())))
    assert sent(effects) == [{"type": "status", "data": "BADAUTH"}]
    assert closes(effects) == [CloseCode.POLICY]


def test_no_refresh_within_grace_closes_1008(session: Session, clock: FakeClock) -> None:
    authed(session, clock)
    clock.advance(606)
    session.timer_fired(Timer.EXPIRY)
    clock.advance(30)
    assert closes(session.timer_fired(Timer.REFRESH)) == [CloseCode.POLICY]


def test_refresh_that_lowers_level_drops_only_the_rooms_it_no_longer_reads(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    # Room 7 is read through an entity rule for level 50 and up, room 8 through a user rule.
    by_level = RoomAccess(room(7), (Rule(7, ENTITY, "entity", "r", 50, True, T0, T0),))
    session.receive(Subscribe(7))
    session.result(RoomLoaded(7, by_level))
    session.receive(Subscribe(8))
    session.result(RoomLoaded(8, access("r", 8)))
    effects = session.receive(token(clock, level=5))
    # Each held room is loaded again, like a select (the driver answers from the rules the
    # hub keeps): the connection keeps no rules of its own.
    assert [e for e in effects if isinstance(e, LoadRoom)] == [LoadRoom(7), LoadRoom(8)]
    assert sent(effects) == [{"type": "status", "data": "READY"}]
    effects = session.result(RoomLoaded(7, by_level)) + session.result(
        RoomLoaded(8, access("r", 8))
    )
    # Each room decided alone.
    assert Leave(7) in effects and Leave(8) not in effects
    assert sent(effects) == [{"type": "status", "data": "NOTAUTHORIZED", "room_id": 7}]
    assert set(session.subs) == {8}


def test_a_refresh_decides_each_room_on_the_rules_its_load_brings_not_on_the_old_ones(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    by_level = RoomAccess(room(7), (Rule(7, ENTITY, "entity", "r", 50, True, T0, T0),))
    session.receive(Subscribe(7))
    session.result(RoomLoaded(7, by_level))
    session.receive(token(clock, level=5))
    # The rules changed meanwhile (a user rule for this user now): the load brings them, and
    # the room is kept although the rules the subscription was granted on would refuse it.
    now = RoomAccess(room(7), (*by_level.rules, rule(7, "r")))
    assert session.result(RoomLoaded(7, now)) == []
    assert set(session.subs) == {7} and session.subs[7].access == evaluate_for(5, now)


def test_a_refresh_whose_room_cannot_be_read_again_leaves_that_room_only(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    for room_id in (7, 8):
        session.receive(Subscribe(room_id))
        session.result(RoomLoaded(room_id, access("r", room_id)))
    effects = session.receive(token(clock, level=5))
    assert [e for e in effects if isinstance(e, LoadRoom)] == [LoadRoom(7), LoadRoom(8)]
    # Storage down and no rules on the hub: room 7 is not kept on a decision made for the
    # old level; room 8 is decided when its rules come.
    effects = session.result(StorageFailed(7))
    assert effects == [Leave(7), Send(codec.revoked(7))]
    assert session.result(RoomLoaded(8, access("r", 8))) == []
    assert set(session.subs) == {8}
    # Nothing is waiting any more: a later failure is an ordinary one.
    assert sent(session.result(StorageFailed(8))) == [{"type": "status", "data": "UNAVAILABLE"}]


def test_a_refresh_for_the_same_entity_and_level_loads_nothing(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    effects = session.receive(token(clock))
    assert not any(isinstance(e, LoadRoom) for e in effects)


def evaluate_for(level: int, rules: RoomAccess) -> Access:
    """The decision for this test's user at ``level``."""
    return evaluate(
        Principal(user=USER, entity=ENTITY, level=level, exp=0, claims={}), rules.room, rules.rules
    )


def test_reauthorize_revokes_when_rule_removed(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    effects = session.reauthorize(7, RoomAccess(room(), ()))
    assert effects == [Leave(7), Send(codec.revoked(7))]
    assert session.room_id is None


def test_reauthorize_revokes_when_room_deleted(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    assert Leave(7) in session.reauthorize(7, None)


def test_reauthorize_updates_write_permission(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, flags="rw")
    assert session.reauthorize(7, access("r")) == []
    assert sent(session.receive(SendMessage("x", None))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]


def test_reauthorize_for_another_room_does_nothing(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    assert session.reauthorize(8, RoomAccess(room(8), ())) == []
    assert session.room_id == 7


def test_select_with_since_joins_for_a_replay_then_ends_it_with_resumed(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    session.receive(SelectRoom(7, since=2))
    loaded = access("r")
    effects = session.result(RoomLoaded(7, loaded))
    assert sent(effects) == [{"type": "status", "data": "CONNECTED"}]
    assert effects[-1] == Join(7, 3, since=2, access=loaded)
    msg = Message(1, 7, 3, USER, ENTITY, "missed", T0)
    done = session.result(Replayed(7, (msg,), True))
    frames = sent(done)
    assert frames[0]["data"]["seq"] == 3  # type: ignore[index]
    assert frames[1] == {
        "type": "status",
        "data": "RESUMED",
        "room_id": 7,
        "count": 1,
        "complete": True,
    }
    assert done[-1] == EndReplay(7)


def test_resuming_the_current_room_rejoins_it_without_leaving_it(
    session: Session, clock: FakeClock
) -> None:
    # Leaving first would drop the room's channel when this connection is its only local
    # reader, and the join would rebuild it at whatever position the kept rules say.
    in_room(session, clock)
    session.receive(SelectRoom(7, since=0))
    loaded = access("r")
    effects = session.result(RoomLoaded(7, loaded))
    assert not any(isinstance(e, Leave) for e in effects)
    assert effects[-1] == Join(7, 3, since=0, access=loaded)
    assert sent(effects) == [{"type": "status", "data": "CONNECTED"}]


def test_resuming_another_room_leaves_the_previous_one(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    session.receive(SelectRoom(8, since=0))
    loaded = access("r", room_id=8)
    effects = session.result(RoomLoaded(8, loaded))
    assert effects[0] == Leave(7) and effects[-1] == Join(8, 3, since=0, access=loaded)


def test_replay_storage_failure_leaves_the_room(session: Session, clock: FakeClock) -> None:
    authed(session, clock)
    session.receive(SelectRoom(7, since=0))
    session.result(RoomLoaded(7, access("r")))
    effects = session.result(StorageFailed())
    assert Leave(7) in effects
    assert sent(effects) == [{"type": "status", "data": "UNAVAILABLE"}]
    assert session.room_id is None


def test_replay_for_a_room_lost_meanwhile_sends_nothing(session: Session, clock: FakeClock) -> None:
    authed(session, clock)
    session.receive(SelectRoom(7, since=0))
    session.result(RoomLoaded(7, access("r")))
    session.reauthorize(7, None)  # room deleted while the replay was read
    msg = Message(1, 7, 1, USER, ENTITY, "x", T0)
    assert session.result(Replayed(7, (msg,), True)) == [EndReplay(7)]


def test_history_and_replay_frames_are_marked_history_and_live_frames_are_not(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    msg = Message(1, 7, 3, USER, ENTITY, "old", T0)
    session.receive(GetPastMessages(50, None))
    history = sent(session.result(HistoryLoaded((msg,))))
    assert history[0] == {"type": "message", "data": {**msg.to_json(), "history": True}}
    session.receive(SelectRoom(7, since=2))
    session.result(RoomLoaded(7, access("r")))
    replay = sent(session.result(Replayed(7, (msg,), True)))
    assert replay[0] == {"type": "message", "data": {**msg.to_json(), "history": True}}
    # The echo of an idempotent resend acknowledges a send: a live frame, unchanged.
    assert session.result(MessageStored(msg, False)) == [Send(codec.message_frame(msg))]
    assert b"history" not in codec.message_frame(msg)


def test_a_message_refused_by_storage_gets_badargs_with_the_reason(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    effects = session.result(MessageRefused("content refused by storage"))
    assert sent(effects) == [
        {"type": "status", "data": "BADARGS", "reason": "content refused by storage"}
    ]
    assert session.room_id == 7  # the connection keeps its room


def test_a_refused_token_answers_the_exact_badauth_and_names_the_reason_for_the_log(
    session: Session, clock: FakeClock
) -> None:
    effects = session.receive(token(clock, ttl=-60))
    assert [e for e in effects if isinstance(e, Send)] == [Send(codec.BADAUTH)]
    assert AuthRefused("token expired") in effects


def test_closing_for_failed_tokens_puts_the_last_reason_in_the_close_reason(
    session: Session, clock: FakeClock
) -> None:
    session.receive(Token("not.a.jwt"))
    session.receive(SelectRoom(1))
    effects = session.receive(token(clock, ttl=-60))
    close = [e for e in effects if isinstance(e, Close)]
    assert close == [Close(CloseCode.POLICY, "too many failed attempts: token expired")]


def test_closing_for_commands_before_any_token_keeps_the_plain_close_reason(
    session: Session,
) -> None:
    for _ in range(2):
        session.receive(SelectRoom(1))
    effects = session.receive(Unknown())
    assert [e for e in effects if isinstance(e, Close)] == [
        Close(CloseCode.POLICY, "too many failed attempts")
    ]


def test_a_refresh_token_for_another_user_is_refused_with_its_reason(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    effects = session.receive(token(clock, user=str(uuid.uuid4())))
    assert AuthRefused("token for another user") in effects
    assert Close(CloseCode.POLICY, "token for another user") in effects


def test_close_reasons_are_cut_to_what_a_close_frame_holds() -> None:
    assert _close_reason("short") == "short"
    cut = _close_reason("é" * 100)
    assert len(cut.encode()) <= MAX_CLOSE_REASON and cut == "é" * 61


# -- several rooms per connection ------------------------------------------------------------------


def subscribed(session: Session, room_id: int, flags: str = "rw") -> list[Effect]:
    assert session.receive(Subscribe(room_id)) == [LoadRoom(room_id)]
    return session.result(RoomLoaded(room_id, access(flags, room_id)))


def test_subscribing_to_rooms_joins_each_and_keeps_the_others(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    for room_id in (7, 8, 9):
        effects = subscribed(session, room_id)
        assert sent(effects) == [{"type": "status", "data": "SUBSCRIBED", "room_id": room_id}]
        join = effects[-1]
        assert isinstance(join, Join) and (join.room_id, join.last_seq, join.since) == (
            room_id,
            3,
            None,
        )
        assert not any(isinstance(e, Leave) for e in effects)
    assert set(session.subs) == {7, 8, 9}
    assert session.room_id is None  # subscribing selects nothing
    assert all(sub.state is SubState.LIVE for sub in session.subs.values())


def test_select_room_leaves_a_selected_room_but_not_a_subscribed_one(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock, room_id=7)  # selected only
    subscribed(session, 8)
    session.receive(SelectRoom(8))  # select a subscribed room: 7 is left
    effects = session.result(RoomLoaded(8, access("rw", 8)))
    assert effects[0] == Leave(7)
    assert not any(isinstance(e, Join) for e in effects)  # 8 is already joined
    assert session.room_id == 8 and set(session.subs) == {8}
    session.receive(SelectRoom(9))  # select another: 8 stays, it was subscribed
    effects = session.result(RoomLoaded(9, access("rw", 9)))
    assert not any(isinstance(e, Leave) for e in effects)
    assert session.room_id == 9 and set(session.subs) == {8, 9}


def test_one_room_past_max_subscriptions_is_toomany(clock: FakeClock) -> None:
    verifier = Verifier.from_material(clock=clock, secret=SECRET, leeway=5)
    session = Session(verifier, clock, Limits(max_subscriptions=2))
    session.start()
    authed(session, clock)
    subscribed(session, 7)
    subscribed(session, 8)
    assert sent(session.receive(Subscribe(9))) == [
        {"type": "status", "data": "TOOMANY", "room_id": 9}
    ]
    assert sent(session.receive(SelectRoom(9))) == [
        {"type": "status", "data": "TOOMANY", "room_id": 9}
    ]
    assert set(session.subs) == {7, 8}
    # A room already held is no new one.
    assert session.receive(Subscribe(8)) == [LoadRoom(8)]


def test_a_select_that_replaces_the_selected_room_does_not_count_twice(
    clock: FakeClock,
) -> None:
    verifier = Verifier.from_material(clock=clock, secret=SECRET, leeway=5)
    session = Session(verifier, clock, Limits(max_subscriptions=1))
    session.start()
    in_room(session, clock, room_id=7)
    assert session.receive(SelectRoom(8)) == [LoadRoom(8)]


def test_a_refused_subscribe_names_the_room_and_keeps_the_others(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock, room_id=7)
    subscribed(session, 8)
    session.receive(Subscribe(9))
    refused = session.result(RoomLoaded(9, None))  # no such room: answered like a forbidden one
    assert sent(refused) == [{"type": "status", "data": "NOTAUTHORIZED", "room_id": 9}]
    session.receive(Subscribe(10))
    refused = session.result(RoomLoaded(10, access("w", 10)))  # no read
    assert sent(refused) == [{"type": "status", "data": "NOTAUTHORIZED", "room_id": 10}]
    assert set(session.subs) == {7, 8} and session.room_id == 7


def test_unsubscribe_leaves_the_room_and_a_room_not_held_is_answered_alike(
    session: Session, clock: FakeClock
) -> None:
    authed(session, clock)
    subscribed(session, 7)
    subscribed(session, 8)
    effects = session.receive(Unsubscribe(7))
    assert effects == [Leave(7), Send(codec.unsubscribed(7))]
    assert set(session.subs) == {8}
    assert session.receive(Unsubscribe(42)) == [Send(codec.unsubscribed(42))]


def test_unsubscribing_the_selected_room_unselects_it(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    assert session.receive(Unsubscribe(7)) == [Leave(7), Send(codec.unsubscribed(7))]
    assert session.room_id is None
    assert sent(session.receive(SendMessage("x", None))) == [
        {"type": "query", "data": "SELECTROOM?"}
    ]


def test_a_message_to_a_room_not_held_is_checked_then_stored_and_echoed_to_the_sender(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock, room_id=7)
    command = SendMessage("hi", "c1", room_id=8)
    assert not session.pipelinable(command)  # its rules must be read first
    assert session.receive(command) == [LoadRoom(8)]
    (store,) = session.result(RoomLoaded(8, access("w", 8)))  # write without read is enough
    assert isinstance(store, StoreMessage) and store.new.room_id == 8
    msg = Message(1, 8, 4, USER, ENTITY, "hi", T0)
    # Not a receiver of room 8: the echo comes to it alone, after the room's delivery.
    assert session.result(MessageStored(msg, True)) == [
        Publish(msg),
        Send(codec.message_frame(msg)),
    ]
    assert session.room_id == 7 and set(session.subs) == {7}


def test_a_message_to_a_room_not_held_without_write_is_notauthorized(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock, room_id=7)
    session.receive(SendMessage("hi", None, room_id=8))
    assert sent(session.result(RoomLoaded(8, access("r", 8)))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]
    session.receive(SendMessage("hi", None, room_id=9))
    assert sent(session.result(RoomLoaded(9, None))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]
    assert set(session.subs) == {7}


def test_a_message_to_a_subscribed_room_is_stored_at_once_and_echoed_by_the_room(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock, room_id=7)
    subscribed(session, 8)
    command = SendMessage("hi", None, room_id=8)
    assert session.pipelinable(command)
    (store,) = session.receive(command)
    assert isinstance(store, StoreMessage) and store.new.room_id == 8
    msg = Message(1, 8, 4, USER, ENTITY, "hi", T0)
    assert session.result(MessageStored(msg, True)) == [Publish(msg)]


def test_history_of_a_room_not_held_needs_read_access(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    assert session.receive(GetPastMessages(5, None, room_id=8)) == [LoadRoom(8)]
    (load,) = session.result(RoomLoaded(8, access("r", 8)))
    assert isinstance(load, LoadHistory) and load.query.room_id == 8
    session.receive(GetPastMessages(5, None, room_id=9))
    assert sent(session.result(RoomLoaded(9, access("w", 9)))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]
    # A room held is read at once.
    (load,) = session.receive(GetPastMessages(5, 3, room_id=7))
    assert isinstance(load, LoadHistory) and (load.query.room_id, load.query.before) == (7, 3)


def test_revocation_of_one_room_keeps_the_others(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    subscribed(session, 8)
    assert session.reauthorize(8, None) == [Leave(8), Send(codec.revoked(8))]
    assert set(session.subs) == {7} and session.room_id == 7
    assert session.reauthorize(7, RoomAccess(room(7), ())) == [Leave(7), Send(codec.revoked(7))]
    assert len(session.subs) == 0 and session.room_id is None


def test_subscribe_with_since_replays_that_room_alone(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    session.receive(Subscribe(8, since=1))
    loaded = access("r", 8)
    effects = session.result(RoomLoaded(8, loaded))
    assert sent(effects) == [{"type": "status", "data": "SUBSCRIBED", "room_id": 8}]
    assert effects[-1] == Join(8, 3, since=1, access=loaded)
    assert session.subs[8].state is SubState.REPLAYING
    assert session.subs[7].state is SubState.LIVE
    msg = Message(1, 8, 2, USER, ENTITY, "missed", T0)
    done = session.result(Replayed(8, (msg,), True))
    assert sent(done)[-1] == {
        "type": "status",
        "data": "RESUMED",
        "room_id": 8,
        "count": 1,
        "complete": True,
    }
    assert done[-1] == EndReplay(8)
    assert session.subs[8].state is SubState.LIVE


def test_a_failed_replay_drops_only_its_room(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    session.receive(Subscribe(8, since=0))
    session.result(RoomLoaded(8, access("r", 8)))
    effects = session.result(StorageFailed())
    assert Leave(8) in effects and Leave(7) not in effects
    assert sent(effects) == [{"type": "status", "data": "UNAVAILABLE"}]
    assert set(session.subs) == {7}


def test_a_failed_load_forgets_a_room_only_being_loaded(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    session.receive(Subscribe(8))
    assert set(session.subs) == {7, 8}  # counted while loading
    assert sent(session.result(StorageFailed())) == [{"type": "status", "data": "UNAVAILABLE"}]
    assert set(session.subs) == {7}


def test_closing_leaves_every_room_held(session: Session, clock: FakeClock) -> None:
    in_room(session, clock, room_id=7)
    subscribed(session, 8)
    effects = session.receive(Quit())
    assert Leave(7) in effects and Leave(8) in effects
    assert len(session.subs) == 0


# -- edit and delete ---------------------------------------------------------------------------


def event(kind: str, seq: int = 5, room_id: int = 7, target: int = 2) -> Message:
    return Message(40, room_id, seq, USER, ENTITY, "new", T0, kind=kind, target_seq=target)


def test_edit_and_delete_go_to_the_use_cases_for_the_selected_room_or_the_one_named(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    principal = session.principal
    assert principal is not None
    assert session.receive(EditMessage(2, "new")) == [ChangeMessage(principal, 7, 2, "new")]
    assert session.receive(DeleteMessage(2)) == [ChangeMessage(principal, 7, 2, None)]
    # A room not held: no load and no subscription; the use case decides.
    assert session.receive(DeleteMessage(3, 12)) == [ChangeMessage(principal, 12, 3, None)]
    assert 12 not in session.subs


def test_edit_and_delete_without_a_room_ask_for_one(session: Session, clock: FakeClock) -> None:
    authed(session, clock)
    assert sent(session.receive(EditMessage(2, "x"))) == [{"type": "query", "data": "SELECTROOM?"}]
    assert sent(session.receive(DeleteMessage(2))) == [{"type": "query", "data": "SELECTROOM?"}]


@pytest.mark.parametrize("command", [EditMessage(2, "x"), DeleteMessage(2)])
def test_edit_and_delete_before_auth_or_expired_count_as_tries(
    session: Session, clock: FakeClock, command: Command
) -> None:
    assert sent(session.receive(command)) == [{"type": "query", "data": "TOKEN?"}]
    assert session.trials == 1


def test_a_stored_event_of_a_held_room_is_published_and_comes_back_with_the_room(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    session.receive(EditMessage(2, "new"))
    edit = event("edit")
    assert session.result(EventStored(edit)) == [Publish(edit)]


def test_a_stored_event_of_a_room_not_held_is_published_and_acknowledged_with_its_frame(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    session.receive(DeleteMessage(2, 12))
    delete = event("delete", room_id=12)
    out = session.result(EventStored(delete))
    assert out[0] == Publish(delete)
    assert sent(out) == [{"type": "deleted", "data": delete.event_json()}]


def test_a_refused_edit_answers_with_its_status(session: Session, clock: FakeClock) -> None:
    in_room(session, clock)
    session.receive(EditMessage(2, "x"))
    assert sent(session.result(ChangeRefused(b'{"type":"status","data":"NOTAUTHORIZED"}'))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]
    assert 7 in session.subs  # a refusal keeps the room


def test_an_edit_that_storage_failed_is_unavailable_and_keeps_the_room(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    session.receive(EditMessage(2, "x"))
    assert sent(session.result(StorageFailed())) == [{"type": "status", "data": "UNAVAILABLE"}]
    assert session.subs[7].state is SubState.LIVE


# -- read marks ----------------------------------------------------------------------------------


def test_read_goes_to_the_use_case_for_the_selected_room_or_the_one_named(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    principal = session.principal
    assert principal is not None
    assert session.receive(MarkRead(4)) == [SetReadMark(principal, 7, 4)]
    # A room not held: no load, no subscription; the use case decides.
    assert session.receive(MarkRead(0, 12)) == [SetReadMark(principal, 12, 0)]
    assert 12 not in session.subs


def test_read_without_a_room_asks_for_one_and_before_auth_counts_as_a_try(
    session: Session, clock: FakeClock
) -> None:
    assert sent(session.receive(MarkRead(2))) == [{"type": "query", "data": "TOKEN?"}]
    assert session.trials == 1
    authed(session, clock)
    assert sent(session.receive(MarkRead(2))) == [{"type": "query", "data": "SELECTROOM?"}]


def test_a_mark_held_answers_readmark_and_a_refusal_its_status(
    session: Session, clock: FakeClock
) -> None:
    in_room(session, clock)
    assert sent(session.result(ReadMarked(7, 3))) == [
        {"type": "status", "data": "READMARK", "room_id": 7, "seq": 3}
    ]
    assert sent(session.result(ChangeRefused(codec.NOTAUTHORIZED))) == [
        {"type": "status", "data": "NOTAUTHORIZED"}
    ]
    assert sent(session.result(StorageFailed())) == [{"type": "status", "data": "UNAVAILABLE"}]
    assert 7 in session.subs  # a failed read leaves the room held


# -- DMs -----------------------------------------------------------------------------------------


def test_authenticating_settles_the_dms_waiting_for_the_user_once(
    session: Session, clock: FakeClock
) -> None:
    effects = session.receive(token(clock))
    assert session.principal is not None
    assert effects[-1] == Settle(session.principal)
    refreshed = session.receive(token(clock))  # a refresh does not settle again
    assert not [e for e in refreshed if isinstance(e, Settle)]


def test_open_dm_goes_to_the_use_case_and_answers_dm_with_the_room(
    session: Session, clock: FakeClock
) -> None:
    other = str(uuid.uuid4())
    assert sent(session.receive(OpenDm(other))) == [{"type": "query", "data": "TOKEN?"}]
    authed(session, clock)
    assert session.principal is not None
    assert session.receive(OpenDm(other)) == [RunOpenDm(session.principal, other)]
    assert sent(session.result(DmReady(31))) == [{"type": "status", "data": "DM", "room_id": 31}]
    assert 31 not in session.subs  # the DM is not held until selected or subscribed


def test_edits_and_deletes_are_pipelined_like_sends_whatever_room_they_name(
    session: Session, clock: FakeClock
) -> None:
    """They change no session state (the driver decides and stores them), so they may be
    handed on behind sends in flight, for the selected room or any other; a history read
    may not (it answers with a long reply)."""
    in_room(session, clock, room_id=7)
    for command in (
        EditMessage(1, "x"),
        DeleteMessage(1),
        EditMessage(1, "x", room_id=8),
        DeleteMessage(1, room_id=9),
    ):
        assert session.pipelinable(command), command
        (change,) = session.receive(command)
        assert isinstance(change, ChangeMessage)
    assert not session.pipelinable(GetPastMessages(5, None))

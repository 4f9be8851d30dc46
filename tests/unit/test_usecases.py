"""The use-case layer's rules, without sockets, on a real SQLite store in a temporary file:
who may edit and delete, DMs (oneself refused, one room per pair, tenant isolation), read marks
(clamped, never backwards, only in readable rooms) and the conversation list."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from nanomsg.clock import FakeClock
from nanomsg.models import Principal, Room
from nanomsg.store.base import NewMessage, NewRoom
from nanomsg.store.sqlite import SqliteStore
from nanomsg.usecases import BadArgs, Forbidden, NoSuchRoom, UseCases

pytestmark = pytest.mark.asyncio

ACME = "11111111-1111-4111-8111-111111111111"
GLOBEX = "22222222-2222-4222-8222-222222222222"


def person(entity: str = ACME, level: int = 0) -> Principal:
    return Principal(user=str(uuid.uuid4()), entity=entity, level=level, exp=0, claims={})


@pytest_asyncio.fixture
async def cases(tmp_path: Path) -> AsyncIterator[UseCases]:
    store = SqliteStore(str(tmp_path / "usecases.db"))
    await store.open()
    try:
        yield UseCases(store, FakeClock())
    finally:
        await store.close()


async def group(cases: UseCases, admin: Principal) -> Room:
    """A group room of ``admin``'s entity: ``admin`` holds rwa; the entity rw from level 0."""
    return await cases.store.create_room(
        NewRoom("g", 100, "group", admin.entity, 10, admin.user, admin.level, cases.now(), 0)
    )


async def post(cases: UseCases, room: Room, who: Principal, text: str = "hi") -> int:
    message, _ = await cases.store.append_message(
        NewMessage(room.id, who.user, who.entity, text, None, cases.now())
    )
    return message.seq


# -- edit and delete ----------------------------------------------------------------------------


async def test_the_author_edits_and_another_member_may_not(cases: UseCases) -> None:
    admin, author, member = person(), person(), person()
    room = await group(cases, admin)
    seq = await post(cases, room, author, "helo")
    changed = await cases.edit(author, room.id, seq, "hello")
    assert (changed.event.seq, changed.event.target_seq, changed.message.content) == (
        2,
        seq,
        "hello",
    )
    with pytest.raises(Forbidden, match="not the author"):
        await cases.edit(member, room.id, seq, "mine now")
    with pytest.raises(Forbidden, match="not the author"):  # admins delete, never edit
        await cases.edit(admin, room.id, seq, "moderated")


async def test_delete_by_the_author_or_a_room_admin_but_not_another_member(
    cases: UseCases,
) -> None:
    admin, author, member = person(), person(), person()
    room = await group(cases, admin)
    first, second = await post(cases, room, author), await post(cases, room, author)
    with pytest.raises(Forbidden, match="not the author"):
        await cases.delete(member, room.id, first)
    assert (await cases.delete(author, room.id, first)).message.deleted
    assert (await cases.delete(admin, room.id, second)).message.deleted_by == admin.user
    with pytest.raises(Forbidden, match="deleted"):
        await cases.delete(admin, room.id, second)
    with pytest.raises(Forbidden, match="deleted"):
        await cases.edit(author, room.id, first, "back")


async def test_edit_and_delete_answer_unknown_seq_bad_args_and_foreign_rooms_no_such_room(
    cases: UseCases,
) -> None:
    admin, author = person(), person()
    room = await group(cases, admin)
    await post(cases, room, author)
    with pytest.raises(BadArgs, match="no message has seq 9"):
        await cases.edit(author, room.id, 9, "x")
    with pytest.raises(BadArgs):
        await cases.delete(author, room.id, -1)
    with pytest.raises(BadArgs, match="empty"):
        await cases.edit(author, room.id, 1, "  ")
    outsider = person(GLOBEX)
    for room_id in (room.id, 10**9):  # foreign and missing: the same answer
        with pytest.raises(NoSuchRoom):
            await cases.delete(outsider, room_id, 1)


async def test_a_reader_without_write_may_neither_edit_nor_delete(cases: UseCases) -> None:
    admin, reader = person(), person(GLOBEX)
    room = await group(cases, admin)
    await cases.store.put_rule(room.id, reader.user, "user", "r", 0, True, cases.now())
    seq = await post(cases, room, reader)  # posted while it could write, say
    with pytest.raises(Forbidden, match="write"):
        await cases.edit(reader, room.id, seq, "x")
    with pytest.raises(Forbidden, match="write"):
        await cases.delete(reader, room.id, seq)


# -- DMs ----------------------------------------------------------------------------------------


async def test_a_dm_with_oneself_is_refused(cases: UseCases) -> None:
    me = person()
    with pytest.raises(BadArgs, match="another user"):
        await cases.open_dm(me, me.user)


async def test_a_dm_within_one_entity_is_open_to_both_once_the_other_shows_up(
    cases: UseCases,
) -> None:
    alice, bob = person(), person()
    opened = await cases.open_dm(alice, bob.user)
    assert opened.created and opened.invited  # bob's entity is not known yet
    settled = await cases.settle(bob)
    assert settled.added == (opened.room.id,)
    assert (await cases.readable(bob, opened.room.id)).room.type == "user2user"
    again = await cases.open_dm(bob, alice.user)
    assert (again.room.id, again.created, again.invited) == (opened.room.id, False, False)


async def test_a_cross_entity_dm_stays_an_invitation_until_accepted(cases: UseCases) -> None:
    alice, mallory = person(ACME), person(GLOBEX)
    opened = await cases.open_dm(alice, mallory.user)
    seq = await post(cases, opened.room, alice, "for your eyes after accepting")
    assert (await cases.settle(mallory)).invited == (opened.room.id,)
    with pytest.raises(NoSuchRoom):
        await cases.readable(mallory, opened.room.id)
    with pytest.raises(NoSuchRoom):
        await cases.mark_read(mallory, opened.room.id, seq)
    assert await cases.conversations(mallory, "id", 10, 0) == []
    await cases.store.set_accepted(opened.room.id, mallory.user, "user", True, cases.now())
    assert (await cases.readable(mallory, opened.room.id)).rights.write


async def test_asking_for_a_dm_one_was_invited_to_accepts_it(cases: UseCases) -> None:
    alice, mallory = person(ACME), person(GLOBEX)
    opened = await cases.open_dm(alice, mallory.user)
    await cases.settle(mallory)
    mine = await cases.open_dm(mallory, alice.user)
    assert mine.room.id == opened.room.id and not mine.created
    assert (await cases.readable(mallory, opened.room.id)).rights.read


# -- read marks and the conversation list -------------------------------------------------------


async def test_read_marks_clamp_never_go_back_and_list_every_member(cases: UseCases) -> None:
    admin, member = person(), person()
    room = await group(cases, admin)
    await cases.store.put_rule(room.id, member.user, "user", "rw", 0, True, cases.now())
    for _ in range(3):
        await post(cases, room, admin)
    assert await cases.mark_read(member, room.id, 99) == 3
    assert await cases.mark_read(member, room.id, 1) == 3
    with pytest.raises(BadArgs):
        await cases.mark_read(member, room.id, -1)
    marks = {m.user: m.seq for m in await cases.reads(admin, room.id)}
    assert marks == {admin.user: 0, member.user: 3}
    with pytest.raises(NoSuchRoom):
        await cases.reads(person(GLOBEX), room.id)


async def test_conversations_count_unread_messages_of_others_and_order_by_activity(
    cases: UseCases,
) -> None:
    me, other = person(), person()
    old, fresh = await group(cases, me), await group(cases, me)
    clock = cases.clock
    assert isinstance(clock, FakeClock)
    clock.advance(10)
    await post(cases, old, other)
    clock.advance(10)
    await post(cases, fresh, other)
    await post(cases, fresh, me)
    listed = await cases.conversations(me, "activity", 10, 0)
    assert [(c.room.id, c.state.unread) for c in listed] == [(fresh.id, 1), (old.id, 1)]
    with pytest.raises(BadArgs, match="order"):
        await cases.conversations(me, "name", 10, 0)

"""The conversation routes of the HTTP side-port over real sockets, on each real store: DMs
(POST /dm), read marks (POST /rooms/{id}/read, GET /rooms/{id}/reads) and the per-room state
GET /rooms and GET /rooms/all answer. Each good case sits next to its bad ones."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from nanomsg.store.base import NewMessage
from tests.integration.test_http_api import Api, Caller, api, store_url

__all__ = ["api", "store_url"]  # fixtures, imported for pytest

pytestmark = pytest.mark.asyncio


async def send(api: Api, room_id: int, who: Caller, text: str = "hi") -> int:
    message, _ = await api.store.append_message(
        NewMessage(room_id, who.user, who.entity, text, None, datetime.now(UTC))
    )
    return message.seq


# -- POST /dm -----------------------------------------------------------------------------------


async def test_post_dm_answers_the_same_room_to_both_sides(api: Api) -> None:
    alice = api.caller()
    bob = api.caller(entity=alice.entity)
    first = await api.call("POST", "/dm", alice, json={"user": bob.user.upper()})
    assert first.status == 200, first.body
    room = first.content["room"]
    assert room["type"] == "user2user" and first.content["created"] is True
    second = await api.call("POST", "/dm", bob, json={"user": alice.user})
    assert second.status == 200
    assert second.content["room"]["id"] == room["id"] and second.content["created"] is False
    assert second.content["invited"] is False
    members = await api.call("GET", f"/rooms/{room['id']}", bob)
    assert members.status == 200 and members.content["access"] == "rw"


async def test_post_dm_with_oneself_or_a_bad_user_is_400(api: Api) -> None:
    me = api.caller()
    for body, reason in (
        ({"user": me.user}, "a DM needs another user than the caller"),
        ({"user": me.user.upper()}, "a DM needs another user than the caller"),
        ({"user": "not-a-uuid"}, "field 'user' must be a UUID"),
        ({"user": 7}, "field 'user' must be a UUID"),
        ({}, "exactly one of user is required"),
        ({"user": str(uuid.uuid4()), "x": 1}, "unknown field 'x'"),
    ):
        reply = await api.call("POST", "/dm", me, json=body)
        assert (reply.status, reply.reason) == (400, reason), body


async def test_same_entity_dm_is_readable_by_the_other_at_their_first_request(api: Api) -> None:
    alice = api.caller()
    bob = api.caller(entity=alice.entity)
    room_id = (await api.call("POST", "/dm", alice, json={"user": bob.user})).content["room"]["id"]
    await send(api, room_id, alice, "hello bob")
    history = await api.call("GET", f"/rooms/{room_id}/messages", bob)
    assert history.status == 200 and [m["content"] for m in history.content] == ["hello bob"]


async def test_a_dm_is_private_to_its_two_users_whatever_the_rank_of_others(api: Api) -> None:
    alice = api.caller()
    bob = api.caller(entity=alice.entity)
    chief = api.caller(entity=alice.entity, level=1_000_000_000)  # top rank of their entity
    room_id = (await api.call("POST", "/dm", alice, json={"user": bob.user})).content["room"]["id"]
    await send(api, room_id, alice, "between us")
    for method, path in (("GET", f"/rooms/{room_id}"), ("GET", f"/rooms/{room_id}/messages")):
        reply = await api.call(method, path, chief)
        assert (reply.status, reply.reason) == (404, "no such room"), path
    listed = await api.call("GET", "/rooms/all", chief)
    assert room_id not in [room["id"] for room in listed.content]


async def test_cross_entity_dm_is_a_pending_invitation_until_accepted(api: Api) -> None:
    alice, mallory = api.caller(), api.caller()  # two entities
    opened = await api.call("POST", "/dm", alice, json={"user": mallory.user})
    room_id = opened.content["room"]["id"]
    await send(api, room_id, alice, "secret")
    listed = await api.call("GET", "/rooms", mallory)
    [invite] = [item for item in listed.content if item["room_id"] == room_id]
    assert invite["accepted"] is False
    assert invite["room"]["last_message"] is None and invite["room"]["unread"] == 0
    for method, path, body in (
        ("GET", f"/rooms/{room_id}/messages", None),
        ("GET", f"/rooms/{room_id}/reads", None),
        ("POST", f"/rooms/{room_id}/read", {"seq": 1}),
    ):
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        reply = await api.call(method, path, mallory, **kwargs)
        assert (reply.status, reply.reason) == (404, "no such room"), path
    assert (await api.call("GET", "/rooms/all", mallory)).content == []
    accepted = await api.call(
        "PUT", f"/rooms/{room_id}/invitation", mallory, json={"accepted": True}
    )
    assert accepted.status == 200
    history = await api.call("GET", f"/rooms/{room_id}/messages", mallory)
    assert [m["content"] for m in history.content] == ["secret"]
    [item] = (await api.call("GET", "/rooms/all", mallory)).content
    assert (item["id"], item["unread"], item["last_message"]["content"]) == (room_id, 1, "secret")


async def test_declined_cross_entity_dm_stays_unreadable(api: Api) -> None:
    alice, mallory = api.caller(), api.caller()
    room_id = (await api.call("POST", "/dm", alice, json={"user": mallory.user})).content["room"][
        "id"
    ]
    declined = await api.call(
        "PUT", f"/rooms/{room_id}/invitation", mallory, json={"accepted": False}
    )
    assert declined.status == 200 and declined.content["accepted"] is False
    await send(api, room_id, alice, "still stored")
    reply = await api.call("GET", f"/rooms/{room_id}/messages", mallory)
    assert reply.status == 404


# -- read marks ---------------------------------------------------------------------------------


async def test_post_read_moves_the_mark_forward_only_and_clamps_it(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    for _ in range(3):
        await send(api, room_id, owner)
    answers = []
    for seq in (2, 1, 10**6):
        reply = await api.call("POST", f"/rooms/{room_id}/read", owner, json={"seq": seq})
        assert reply.status == 200, reply.body
        answers.append(reply.content)
    assert answers == [{"room_id": room_id, "seq": s} for s in (2, 2, 3)]
    reads = await api.call("GET", f"/rooms/{room_id}/reads", owner)
    assert reads.status == 200
    assert [(r["user"], r["seq"]) for r in reads.content] == [(owner.user, 3)]


async def test_post_read_refuses_bad_seqs_and_foreign_rooms_like_missing_ones(api: Api) -> None:
    owner, outsider = api.caller(), api.caller()
    room_id = await api.room(owner)
    for body, reason in (
        ({"seq": -1}, "field 'seq' must be between 0 and 9223372036854775807"),
        ({"seq": "1"}, "field 'seq' must be an integer"),
        ({"seq": True}, "field 'seq' must be an integer"),
        ({"seq": None}, "field 'seq' must be an integer"),
        ({}, "field 'seq' is required"),
    ):
        reply = await api.call("POST", f"/rooms/{room_id}/read", owner, json=body)
        assert (reply.status, reply.reason) == (400, reason), body
    foreign = await api.call("POST", f"/rooms/{room_id}/read", outsider, json={"seq": 1})
    missing = await api.call("POST", f"/rooms/{2**62}/read", outsider, json={"seq": 1})
    assert (foreign.status, foreign.body) == (missing.status, missing.body)
    assert foreign.status == 404


# -- the conversation list ----------------------------------------------------------------------


async def test_rooms_all_carries_state_and_orders_by_activity_with_paging(api: Api) -> None:
    me = api.caller()
    other = api.caller(entity=me.entity)
    older, newer = await api.room(me), await api.room(me)
    await send(api, newer, other, "first")
    await send(api, older, other, "a")
    await send(api, older, other, "b")
    await api.call("POST", f"/rooms/{older}/read", me, json={"seq": 1})
    by_activity = await api.call("GET", "/rooms/all?order=activity", me)
    assert by_activity.status == 200
    assert [r["id"] for r in by_activity.content] == [older, newer]
    top = by_activity.content[0]
    assert (top["last_seq"], top["read_seq"], top["unread"]) == (2, 1, 1)
    assert top["last_message"]["content"] == "b" and top["last_activity_at"].endswith("Z")
    page = await api.call("GET", "/rooms/all?order=activity&limit=1&offset=1", me)
    assert [r["id"] for r in page.content] == [newer]
    by_id = await api.call("GET", "/rooms/all", me)
    assert [r["id"] for r in by_id.content] == [older, newer]
    bad = await api.call("GET", "/rooms/all?order=name", me)
    assert (bad.status, bad.reason) == (400, "query parameter 'order' must be one of: id, activity")


async def test_rooms_all_answers_a_page_of_up_to_1000_rooms_and_refuses_more(
    api: Api,
) -> None:
    """A user's whole list of 1 000 rooms comes in one answer; the other lists stay at 500."""
    me = api.caller()
    room_id = await api.room(me)
    whole = await api.call("GET", "/rooms/all?limit=1000", me)
    assert whole.status == 200 and [r["id"] for r in whole.content] == [room_id]
    more = await api.call("GET", "/rooms/all?limit=1001", me)
    assert more.status == 400 and "limit" in more.reason
    rules = await api.call("GET", "/rooms?limit=501", me)
    assert rules.status == 400


async def test_rooms_all_entries_carry_exactly_the_fields_of_the_room_and_its_state(
    api: Api,
) -> None:
    """Every field of an entry, with a tombstone as latest message: the entry written from the
    row has the records' fields, in their order, stamps cut to milliseconds."""
    me = api.caller()
    other = api.caller(entity=me.entity)
    room_id = await api.room(me)
    seq = await send(api, room_id, other, "gone")
    await api.store.delete_message(room_id, seq, other.user, False, datetime.now(UTC))
    reply = await api.call("GET", "/rooms/all", me)
    [entry] = [r for r in reply.content if r["id"] == room_id]
    assert list(entry) == [
        "id",
        "uuid",
        "name",
        "level_admin",
        "type",
        "entity_owner",
        "max_entity_rules",
        "last_seq",
        "createdAt",
        "updatedAt",
        "last_message",
        "last_activity_at",
        "read_seq",
        "unread",
    ]
    last = entry["last_message"]
    assert (last["content"], last["deleted"], last["deleted_by"]) == ("", True, other.user)
    assert (entry["last_seq"], entry["unread"]) == (2, 0)
    for stamp in (entry["createdAt"], entry["last_activity_at"], last["deleted_at"]):
        assert len(stamp) == 24 and stamp.endswith("Z"), stamp


async def test_get_rooms_items_carry_the_state_of_readable_rooms(api: Api) -> None:
    me = api.caller()
    room_id = await api.room(me)
    await send(api, room_id, api.caller(entity=me.entity), "news")
    reply = await api.call("GET", "/rooms", me)
    [item] = [i for i in reply.content if i["room_id"] == room_id and i["kind"] == "user"]
    assert (item["room"]["unread"], item["room"]["last_message"]["content"]) == (1, "news")


async def test_post_dm_for_a_deleted_dm_is_404(api: Api) -> None:
    alice = api.caller(level=1000)
    bob = api.caller(entity=alice.entity)
    room_id = (await api.call("POST", "/dm", alice, json={"user": bob.user})).content["room"]["id"]
    # No one administers a DM by rank (it is private to its two users): storage deletes it.
    refused = await api.call("DELETE", f"/rooms/{room_id}", alice)
    assert refused.status == 403, refused.body
    assert await api.store.delete_room(room_id, datetime.now(UTC))
    again = await api.call("POST", "/dm", bob, json={"user": alice.user})
    assert (again.status, again.reason) == (404, "no such room")


async def test_http_history_shows_edits_in_place_and_deleted_messages_as_tombstones(
    api: Api,
) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    kept, gone = await send(api, room_id, owner, "draft"), await send(api, room_id, owner, "oops")
    await api.store.edit_message(room_id, kept, owner.user, "final", datetime.now(UTC))
    await api.store.delete_message(room_id, gone, owner.user, False, datetime.now(UTC))
    reply = await api.call("GET", f"/rooms/{room_id}/messages", owner)
    assert reply.status == 200
    first, second = reply.content
    assert (first["seq"], first["content"], "edited_at" in first) == (kept, "final", True)
    assert (second["seq"], second["content"], second["deleted"]) == (gone, "", True)
    assert second["deleted_by"] == owner.user and "oops" not in str(reply.body)

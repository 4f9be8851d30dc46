"""The permission rules of protocol.md section 8, over a real WebSocket and the HTTP side-port.

Every case is checked the way a client sees it: the answer to ``select_room``, whether a message
can be sent (its echo, or ``NOTAUTHORIZED``), and whether ``get_past_messages`` works. Rooms are
created with ``level_admin`` 500 by an owner at level 500 of the *owner* entity, so a group room
starts with the creator's ``rwa`` user rule and the automatic ``entity`` rule ``rw`` at level 100
for the owner entity. Other users come from a *partner* entity (the subject of entity rules) or a
*stranger* entity (which no rule ever names).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, NamedTuple

import orjson
import pytest

from tests.integration.conftest import Client, Server, User

pytestmark = pytest.mark.asyncio

CONNECTED = {"type": "status", "data": "CONNECTED"}
NOTAUTHORIZED = {"type": "status", "data": "NOTAUTHORIZED"}
SELECTROOM_Q = {"type": "query", "data": "SELECTROOM?"}
LEVEL_ADMIN = 500
SEED = "seed"
PROBE = "probe"
LIVE_DEADLINE = 1.0  # protocol.md section 8: changes reach open connections well under a second
MISSING_ROOM = 2**62


class Outcome(NamedTuple):
    """What a user observed: select's answer, the send's answer, the history read over the
    WebSocket, and the access GET /rooms/{id} reports ("404" when it hides the room)."""

    select: str
    send: str
    history: list[str] | str
    http: str


ADMIN = Outcome("CONNECTED", "echo", [SEED, PROBE], "rwa")
FULL = Outcome("CONNECTED", "echo", [SEED, PROBE], "rw")
READ_ONLY = Outcome("CONNECTED", "NOTAUTHORIZED", [SEED], "r")
REFUSED = Outcome("NOTAUTHORIZED", "SELECTROOM?", "SELECTROOM?", "404")


def revoked(room_id: int) -> dict[str, Any]:
    return {"type": "status", "data": "NOTAUTHORIZED", "room_id": room_id}


def _word(frame: dict[str, Any]) -> str:
    """A plain status or query frame as its word; anything else verbatim, so a stray field
    (``room_id`` on a reply, a ``reason``) or an unexpected frame shows up in the diff."""
    if set(frame) == {"type", "data"} and frame["type"] in ("status", "query"):
        return str(frame["data"])
    return repr(frame)


def _send_word(frame: dict[str, Any], user: User, room_id: int) -> str:
    if frame.get("type") == "message":
        data = frame["data"]
        if (data["content"], data["emitter"], data["room_id"]) == (PROBE, user.user, room_id):
            return "echo"
    return _word(frame)


async def read_history(client: Client) -> list[str] | str:
    """``get_past_messages``: the contents read up to ``HISTORYEND``, or the refusal's word."""
    await client.send({"type": "get_past_messages"})
    contents: list[str] = []
    while True:
        frame = await client.recv()
        if frame.get("type") == "message":
            contents.append(frame["data"]["content"])
        elif frame.get("data") == "HISTORYEND":
            assert frame["count"] == len(contents), frame
            return contents
        else:
            assert not contents, frame
            return _word(frame)


async def probe_on(server: Server, client: Client, user: User, room_id: int) -> Outcome:
    """On an authenticated client: select the room, try to send PROBE, read the history; then
    ask the HTTP side-port what access it grants."""
    selected = await client.ask({"type": "select_room", "room_id": room_id})
    sent = await client.ask({"type": "message", "content": PROBE})
    history = await read_history(client)
    status, reply = await server.call("GET", f"/rooms/{room_id}", user)
    http = reply["content"]["access"] if status == 200 else str(status)
    return Outcome(_word(selected), _send_word(sent, user, room_id), history, http)


async def probe(server: Server, user: User, room_id: int) -> Outcome:
    return await probe_on(server, await server.login(user), user, room_id)


async def seeded_room(server: Server, owner: User) -> int:
    """A group room with level_admin 500 holding one message, SEED, from its owner."""
    room_id = await server.create_room(owner, level_admin=LEVEL_ADMIN)
    client = await server.join(owner, room_id)
    echo = await client.ask({"type": "message", "content": SEED})
    assert echo["type"] == "message" and echo["data"]["seq"] == 1, echo
    await client.close()
    return room_id


async def accept(server: Server, user: User, room_id: int, accepted: bool, **extra: Any) -> None:
    body = {"accepted": accepted, **extra}
    status, reply = await server.call("PUT", f"/rooms/{room_id}/invitation", user, body)
    assert status == 200, reply
    assert reply["content"]["accepted"] is accepted


async def send_until(client: Client, wanted: str, user: User, room_id: int) -> list[str]:
    """Send PROBE again and again until the answer is ``wanted`` ("echo" or "NOTAUTHORIZED");
    fail if that takes longer than LIVE_DEADLINE or anything but those two answers arrives.
    Returns every answer seen."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIVE_DEADLINE
    while True:
        answer = _send_word(await client.ask({"type": "message", "content": PROBE}), user, room_id)
        seen.append(answer)
        assert answer in ("echo", "NOTAUTHORIZED"), seen
        if answer == wanted:
            return seen
        assert loop.time() < deadline, f"still {answer!r} after {LIVE_DEADLINE}s: {seen}"
        await asyncio.sleep(0.02)


# -- the static matrix ---------------------------------------------------------------------------

# A rule is "<target> <flags>[@<level>]": target "user" is a user rule on the probing user,
# "owner" / "partner" an entity rule on that entity (level = the minimum levelOnEntity).
MATRIX = [
    # Owner-entity admins: same entity as the creator, level >= level_admin, no rule of their own.
    pytest.param("owner", 500, (), ADMIN, id="owner-entity-admin-at-level-admin"),
    pytest.param("owner", 1000, (), ADMIN, id="owner-entity-admin-above-level-admin"),
    pytest.param("owner", 500, ("user b",), ADMIN, id="owner-entity-admin-ignores-user-ban"),
    pytest.param("owner", 500, ("owner b@0",), ADMIN, id="owner-entity-admin-ignores-entity-ban"),
    # Owner entity below level_admin: only the automatic entity rule rw at level 100.
    pytest.param("owner", 499, (), FULL, id="owner-entity-499-gets-automatic-rw"),
    pytest.param("owner", 100, (), FULL, id="owner-entity-100-gets-automatic-rw"),
    pytest.param("owner", 99, (), REFUSED, id="owner-entity-99-gets-nothing"),
    pytest.param("owner", 50, (), REFUSED, id="owner-entity-50-gets-nothing"),
    pytest.param("owner", 300, ("owner b@0",), REFUSED, id="owner-entity-member-entity-ban"),
    pytest.param("owner", 300, ("user b",), REFUSED, id="owner-entity-member-user-ban"),
    # User rules.
    pytest.param("partner", 100, ("user r",), READ_ONLY, id="user-rule-r-reads-only"),
    pytest.param("partner", 100, ("user rw",), FULL, id="user-rule-rw-reads-and-writes"),
    pytest.param("partner", 100, ("user w",), REFUSED, id="user-rule-w-alone-cannot-select"),
    pytest.param("partner", 100, ("user a",), ADMIN, id="user-rule-a-implies-rw"),
    # Entity rules admit from their level up, and only their own entity.
    pytest.param("partner", 300, ("partner rw@300",), FULL, id="entity-rule-rw300-admits-300"),
    pytest.param("partner", 400, ("partner rw@300",), FULL, id="entity-rule-rw300-admits-400"),
    pytest.param("partner", 299, ("partner rw@300",), REFUSED, id="entity-rule-rw300-not-299"),
    pytest.param("stranger", 1000, ("partner rw@300",), REFUSED, id="entity-rule-other-entity"),
    pytest.param("partner", 300, ("partner r@300",), READ_ONLY, id="entity-rule-r-reads-only"),
    pytest.param("partner", 300, ("partner r@300", "user w"), FULL, id="rules-flags-are-united"),
    # Bans.
    pytest.param("partner", 300, ("user b", "partner rw@0"), REFUSED, id="user-ban-beats-entity"),
    pytest.param("partner", 300, ("user rw", "partner b@0"), REFUSED, id="entity-ban-beats-user"),
    pytest.param("partner", 300, ("partner rwb@0",), REFUSED, id="entity-rule-with-b"),
    pytest.param("partner", 300, ("user rwb",), REFUSED, id="user-rule-with-b"),
    pytest.param(
        "partner", 200, ("user rw", "partner b@300"), FULL, id="entity-ban-below-its-level-n/a"
    ),
]


@pytest.mark.parametrize(("entity", "level", "rules", "expected"), MATRIX)
async def test_permission_matrix_over_websocket(
    server: Server, entity: str, level: int, rules: tuple[str, ...], expected: Outcome
) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    entities = {"owner": owner.entity, "partner": str(uuid.uuid4()), "stranger": str(uuid.uuid4())}
    room_id = await seeded_room(server, owner)
    subject = server.user(entity=entities[entity], level=level)
    for rule in rules:
        target, _, spec = rule.partition(" ")
        flags, _, rule_level = spec.partition("@")
        if target == "user":
            await server.grant(owner, room_id, subject.user, flags, kind="user")
        else:
            await server.grant(
                owner, room_id, entities[target], flags, kind="entity", level=int(rule_level)
            )
    assert await probe(server, subject, room_id) == expected


# -- HTTP side of the same rules -----------------------------------------------------------------


async def test_owner_entity_admin_without_own_rule_manages_members_even_when_banned(
    server: Server,
) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    admin = server.user(entity=owner.entity, level=LEVEL_ADMIN)
    guest = server.user()
    room_id = await seeded_room(server, owner)
    members = f"/rooms/{room_id}/members"

    status, reply = await server.call("GET", f"/rooms/{room_id}", admin)
    assert (status, reply["content"]["access"]) == (200, "rwa")
    assert await server.grant(admin, room_id, guest.user, "rw") == 201
    assert await probe(server, guest, room_id) == FULL
    status, reply = await server.call("DELETE", f"{members}/{guest.user}?kind=user", admin)
    assert status == 200, reply
    assert await probe(server, guest, room_id) == REFUSED

    await server.grant(owner, room_id, admin.user, "b")
    status, reply = await server.call("GET", f"/rooms/{room_id}", admin)
    assert (status, reply["content"]["access"]) == (200, "rwa")
    assert await server.grant(admin, room_id, guest.user, "r") == 201
    assert await probe(server, guest, room_id) == READ_ONLY._replace(history=[SEED, PROBE])


@pytest.mark.parametrize(
    ("level", "read_status", "manage_status"),
    [(499, 200, 403), (100, 200, 403), (50, 404, 404)],
    ids=["499-reads-but-403", "100-reads-but-403", "50-sees-nothing-404"],
)
async def test_owner_entity_member_below_level_admin_cannot_manage(
    server: Server, level: int, read_status: int, manage_status: int
) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    member = server.user(entity=owner.entity, level=level)
    room_id = await seeded_room(server, owner)
    status, reply = await server.call("GET", f"/rooms/{room_id}", member)
    assert status == read_status, reply
    if status == 200:
        assert reply["content"]["access"] == "rw"
    body = {"entity_UUID": member.user, "kind": "user", "permissions": "rwa"}
    status, reply = await server.call("PUT", f"/rooms/{room_id}/members", member, body)
    assert status == manage_status, reply
    status, reply = await server.call("DELETE", f"/rooms/{room_id}", member)
    assert status == manage_status, reply
    # Nothing was granted or deleted by the refused calls.
    expected = FULL if read_status == 200 else REFUSED
    assert await probe(server, member, room_id) == expected


# -- invitations ---------------------------------------------------------------------------------


async def test_pending_invitation_is_refused_until_accepted_then_connected(
    server: Server,
) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    guest = server.user()
    room_id = await seeded_room(server, owner)
    await server.grant(owner, room_id, guest.user, "rw", kind="user", invite=True)
    client = await server.login(guest)
    assert await probe_on(server, client, guest, room_id) == REFUSED
    await accept(server, guest, room_id, True)
    assert await probe_on(server, client, guest, room_id) == FULL


async def test_declined_invitation_is_refused(server: Server) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    guest = server.user()
    room_id = await seeded_room(server, owner)
    await server.grant(owner, room_id, guest.user, "rw", kind="user", invite=True)
    await accept(server, guest, room_id, False)
    assert await probe(server, guest, room_id) == REFUSED


async def test_pending_entity_invitation_admits_its_levels_once_accepted_for_the_entity(
    server: Server,
) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    partner = str(uuid.uuid4())
    senior = server.user(entity=partner, level=300)
    junior = server.user(entity=partner, level=299)
    room_id = await seeded_room(server, owner)
    await server.grant(owner, room_id, partner, "rw", kind="entity", level=300, invite=True)
    assert await probe(server, senior, room_id) == REFUSED
    await accept(server, senior, room_id, True, use_parent_entity=True)
    assert await probe(server, senior, room_id) == FULL
    assert await probe(server, junior, room_id) == REFUSED


# -- live changes on open connections ------------------------------------------------------------


async def test_downgrade_rw_to_r_stops_sending_silently_and_keeps_reading(server: Server) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    member = server.user()
    room_id = await seeded_room(server, owner)
    await server.grant(owner, room_id, member.user, "rw")
    watcher = await server.join(owner, room_id)
    client = await server.join(member, room_id)
    assert await send_until(client, "echo", member, room_id) == ["echo"]

    await server.grant(owner, room_id, member.user, "r")
    answers = await send_until(client, "NOTAUTHORIZED", member, room_id)
    # Each reply is exactly an echo or the bare NOTAUTHORIZED: no room_id frame was pushed.
    assert answers[-1] == "NOTAUTHORIZED"
    await watcher.send({"type": "message", "content": "still readable"})
    frame = await client.recv()
    assert frame["type"] == "message" and frame["data"]["content"] == "still readable", frame
    history = await read_history(client)
    assert isinstance(history, list) and history[0] == SEED and history[-1] == "still readable"


async def test_upgrade_r_to_rw_allows_sending_silently(server: Server) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    member = server.user()
    room_id = await seeded_room(server, owner)
    await server.grant(owner, room_id, member.user, "r")
    client = await server.join(member, room_id)
    assert await send_until(client, "NOTAUTHORIZED", member, room_id) == ["NOTAUTHORIZED"]
    await server.grant(owner, room_id, member.user, "rw")
    answers = await send_until(client, "echo", member, room_id)
    assert set(answers) <= {"NOTAUTHORIZED", "echo"}


@pytest.mark.parametrize("change", ["user-ban", "entity-ban", "declined-own-invitation"])
async def test_losing_read_while_connected_pushes_notauthorized_and_stops_delivery(
    server: Server, change: str
) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    member = server.user()
    room_id = await seeded_room(server, owner)
    await server.grant(
        owner, room_id, member.user, "rw", invite=change == "declined-own-invitation"
    )
    if change == "declined-own-invitation":
        await accept(server, member, room_id, True)
    watcher = await server.join(owner, room_id)
    client = await server.join(member, room_id)

    if change == "user-ban":
        await server.grant(owner, room_id, member.user, "b")
    elif change == "entity-ban":
        await server.grant(owner, room_id, member.entity, "b", kind="entity", level=0)
    else:
        await accept(server, member, room_id, False)
    assert await client.recv(timeout=LIVE_DEADLINE) == revoked(room_id)

    echo = await watcher.ask({"type": "message", "content": "after the change"})
    assert echo["data"]["content"] == "after the change"
    assert await client.silent(0.3)
    assert await client.ask({"type": "message", "content": "x"}) == SELECTROOM_Q
    assert await client.ask({"type": "get_past_messages"}) == SELECTROOM_Q
    assert await client.ask({"type": "select_room", "room_id": room_id}) == NOTAUTHORIZED


async def test_bans_while_connected_leave_owner_entity_admin_untouched(server: Server) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    admin = server.user(entity=owner.entity, level=LEVEL_ADMIN)
    canary = server.user(entity=owner.entity, level=100)  # admitted by the automatic rw@100
    room_id = await seeded_room(server, owner)
    client = await server.join(admin, room_id)
    canary_client = await server.join(canary, room_id)

    await server.grant(owner, room_id, admin.user, "b")
    await server.grant(owner, room_id, owner.entity, "b", kind="entity", level=0)
    # The canary losing the room proves the re-check with both bans has run for the room.
    assert await canary_client.recv(timeout=LIVE_DEADLINE) == revoked(room_id)
    # The admin got nothing pushed: the next frame is the reply to its own message.
    echo = await client.ask({"type": "message", "content": "admin still here"})
    assert echo["type"] == "message" and echo["data"]["content"] == "admin still here", echo
    assert await read_history(client) == [SEED, "admin still here"]


# -- cross-entity isolation ----------------------------------------------------------------------


async def test_notauthorized_frame_is_identical_for_existing_missing_and_deleted_rooms(
    server: Server,
) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    intruder = server.user(level=1000)
    room_id = await seeded_room(server, owner)
    deleted = await server.create_room(owner, level_admin=LEVEL_ADMIN)
    status, reply = await server.call("DELETE", f"/rooms/{deleted}", owner)
    assert status == 200, reply
    client = await server.login(intruder)
    raw: list[Any] = []
    for target in (room_id, MISSING_ROOM, deleted):
        await client.send({"type": "select_room", "room_id": target})
        raw.append(await asyncio.wait_for(client.ws.recv(), 5))
    assert orjson.loads(raw[0]) == NOTAUTHORIZED
    assert raw[1] == raw[0] and raw[2] == raw[0]


async def test_other_entity_user_at_any_level_cannot_reach_the_room(server: Server) -> None:
    owner = server.user(level=LEVEL_ADMIN)
    mate = server.user(entity=owner.entity, level=100)
    intruder = server.user(level=1000)
    room_id = await seeded_room(server, owner)

    assert await probe(server, intruder, room_id) == REFUSED

    status, listing = await server.call("GET", "/rooms/all?limit=100", owner)
    assert status == 200 and room_id in [room["id"] for room in listing["content"]]
    for path in ("/rooms/all?limit=100", "/rooms?limit=100"):
        status, listing = await server.call("GET", path, intruder)
        assert status == 200, listing
        assert room_id not in [room.get("id") for room in listing["content"]]
        assert room_id not in [room.get("room", {}).get("id") for room in listing["content"]]

    attempts: list[tuple[str, str, Any]] = [
        ("GET", "/rooms/{}", None),
        ("GET", "/rooms/{}/messages", None),
        ("PUT", "/rooms/{}/members", {"entity_UUID": intruder.user, "permissions": "rwa"}),
        (
            "PUT",
            "/rooms/{}/members",
            {"entity_UUID": intruder.entity, "kind": "entity", "permissions": "rw", "level": 0},
        ),
        ("DELETE", "/rooms/{}/members/" + owner.entity + "?kind=entity", None),
        ("DELETE", "/rooms/{}", None),
    ]
    for method, template, body in attempts:
        status, reply = await server.call(method, template.format(room_id), intruder, body)
        missing = await server.call(method, template.format(MISSING_ROOM), intruder, body)
        assert status == 404, (method, template, reply)
        assert (status, reply) == missing, (method, template)  # indistinguishable from absent

    # None of the refused calls changed anything.
    assert await probe(server, intruder, room_id) == REFUSED
    assert await probe(server, mate, room_id) == FULL
    status, reply = await server.call("GET", f"/rooms/{room_id}", owner)
    assert status == 200 and reply["content"]["room"]["id"] == room_id

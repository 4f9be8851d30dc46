"""The HTTP side-port over real sockets, against each real store (SQLite file and PostgreSQL).

PostgreSQL's database is shared by the session, so every test works in rooms it creates, with
fresh user and entity UUIDs, and never assumes empty tables.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from nanomsg.auth import Verifier, mint
from nanomsg.clock import SystemClock
from nanomsg.config import Config
from nanomsg.http_api import build_http_app
from nanomsg.store.base import HistoryQuery, NewMessage, RoomGone, Store, StoreUnavailable
from nanomsg.store.factory import store_from_url
from nanomsg.usecases import UseCases
from tests.conftest import SECRET, TokenFactory

CREATE_LEVEL = 100
NO_BODY: Any = object()


@dataclass(frozen=True)
class Caller:
    user: str
    entity: str
    level: int
    token: str


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def content(self) -> Any:
        return self.body["content"]

    @property
    def reason(self) -> str | None:
        reason: str | None = self.body["meta"].get("reason")
        return reason


class FaultyStore:
    """Delegates to a real store, but ``fail`` makes named methods raise a chosen exception."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.fail: dict[str, BaseException] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if name in self.fail:
                raise self.fail[name]
            return await method(*args, **kwargs)

        return call


@dataclass
class Api:
    client: TestClient[Any, Any]
    store: Store
    faults: FaultyStore
    make_token: TokenFactory
    notified: list[int] = field(default_factory=list)
    ready: dict[str, bool] = field(default_factory=dict)
    notify_error: Exception | None = None

    def caller(self, *, entity: str | None = None, level: int = 100) -> Caller:
        user, entity = str(uuid.uuid4()), entity or str(uuid.uuid4())
        token = self.make_token(user=user, entity=entity, level=level)
        return Caller(user=user, entity=entity, level=level, token=token)

    async def call(
        self,
        method: str,
        path: str,
        who: Caller | None = None,
        *,
        json: Any = NO_BODY,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> Reply:
        hdrs = dict(headers or {})
        if who is not None:
            hdrs["Authorization"] = f"Bearer {who.token}"
        if json is not NO_BODY:
            data = orjson.dumps(json)
            hdrs.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, headers=hdrs, data=data) as resp:
            raw = await resp.read()
            body = orjson.loads(raw) if raw else None
            return Reply(resp.status, body, resp.headers)

    async def room(self, owner: Caller, **fields: Any) -> int:
        """Create a room as ``owner`` and return its id."""
        reply = await self.call(
            "POST", "/rooms", owner, json={"name": "room", "level_admin": 100, **fields}
        )
        assert reply.status == 200, reply.body
        room_id: int = reply.content["room"]["id"]
        return room_id

    async def grant(self, admin: Caller, room_id: int, subject: str, **fields: Any) -> Reply:
        body = {"entity_UUID": subject, "permissions": "rw", **fields}
        return await self.call("PUT", f"/rooms/{room_id}/members", admin, json=body)

    async def post_messages(self, room_id: int, author: Caller, stamps: list[datetime]) -> None:
        for i, stamp in enumerate(stamps):
            await self.store.append_message(
                NewMessage(room_id, author.user, author.entity, f"m{i}", None, stamp)
            )


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'http.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest_asyncio.fixture
async def api(store_url: str, make_token: TokenFactory) -> AsyncIterator[Api]:
    store = store_from_url(store_url)
    await store.open()
    faults = FaultyStore(store)
    holder: list[Api] = []

    async def notify(room_id: int) -> None:
        if holder[0].notify_error is not None:
            raise holder[0].notify_error
        holder[0].notified.append(room_id)

    async def readiness() -> dict[str, bool]:
        return dict(holder[0].ready)

    clock = SystemClock()
    app = build_http_app(
        store=faults,
        verifier=Verifier.from_material(clock=clock, secret=SECRET),
        clock=clock,
        config=Config(jwt_secret=SECRET, room_create_level=CREATE_LEVEL),
        readiness=readiness,
        # No writer or hub: these tests read and change rooms, never post; change notices
        # are recorded instead of relayed.
        usecases=UseCases(faults, clock, notify_room_changed=notify),
    )
    try:
        async with TestClient(TestServer(app)) as client:
            holder.append(Api(client, store, faults, make_token))
            holder[0].ready.update(storage=True, broker=True)
            yield holder[0]
    finally:
        await store.close()


def assert_envelope(reply: Reply, status: int) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    assert reply.headers["Vary"] == "Origin"
    assert reply.body["meta"]["code"] == status
    assert isinstance(reply.body["meta"]["message"], str) and reply.body["meta"]["message"]
    if status >= 400:
        assert reply.body["content"] == {}
        assert reply.reason


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_missing_token_is_an_enveloped_401_with_cors(api: Api) -> None:
    reply = await api.call("GET", "/rooms/all")
    assert_envelope(reply, 401)
    assert reply.reason == "missing bearer token"
    assert reply.body["meta"]["message"] == "Unauthorized"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Bearer not-a-jwt", "malformed token"),
        ("Basic dXNlcjpwYXNz", "missing bearer token"),
        ("Bearer ", "missing bearer token"),
        ("WRONG_KEY", "bad signature"),
        ("EXPIRED", "token expired"),
    ],
)
async def test_bad_token_is_401_with_precise_reason(
    api: Api, make_token: TokenFactory, header: str, reason: str
) -> None:
    if header == "WRONG_KEY":
        other = mint(
            secret="another-secret-0123456789abcdef-0123",
            user=str(uuid.uuid4()),
            entity=str(uuid.uuid4()),
            level=100,
            now=SystemClock().wall(),
        )
        header = f"Bearer {other}"
    elif header == "EXPIRED":
        header = f"Bearer {make_token(ttl=-3600)}"
    reply = await api.call("GET", "/test/token", headers={"Authorization": header})
    assert_envelope(reply, 401)
    assert reply.reason == reason


@pytest.mark.asyncio
async def test_bad_token_on_a_write_changes_nothing(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    reply = await api.call(
        "DELETE", f"/rooms/{room_id}", headers={"Authorization": "Bearer garbage"}
    )
    assert_envelope(reply, 401)
    assert (await api.call("GET", f"/rooms/{room_id}", owner)).status == 200


@pytest.mark.asyncio
async def test_test_token_returns_the_verified_claims(api: Api) -> None:
    me = api.caller(level=42)
    reply = await api.call("GET", "/test/token", me)
    assert_envelope(reply, 200)
    assert reply.body["meta"] == {"code": 200, "message": "OK"}
    assert reply.content["userUUID"] == me.user
    assert reply.content["entityUUID"] == me.entity
    assert reply.content["levelOnEntity"] == 42


# -- public endpoints, envelope, CORS, routing ---------------------------------------------------


@pytest.mark.asyncio
async def test_healthz_needs_no_token(api: Api) -> None:
    reply = await api.call("GET", "/healthz")
    assert_envelope(reply, 200)
    assert reply.content == {"status": "ok", "closes": {}}


@pytest.mark.asyncio
async def test_readyz_is_200_when_all_ready_and_503_naming_what_is_not(api: Api) -> None:
    reply = await api.call("GET", "/readyz")
    assert_envelope(reply, 200)
    assert reply.content == {"storage": True, "broker": True}
    api.ready["broker"] = False
    reply = await api.call("GET", "/readyz")
    assert reply.status == 503
    assert reply.content == {"storage": True, "broker": False}


@pytest.mark.asyncio
async def test_openapi_document_parses_and_lists_every_path(api: Api) -> None:
    reply = await api.call("GET", "/openapi.json")
    assert reply.status == 200
    assert reply.body["openapi"].startswith("3.1")
    paths = reply.body["paths"]
    assert set(paths) == {
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/test/token",
        "/rooms",
        "/rooms/all",
        "/rooms/{id}",
        "/rooms/{id}/members",
        "/rooms/{id}/members/{uuid}",
        "/rooms/{id}/invitation",
        "/rooms/{id}/messages",
        "/rooms/{id}/messages/{seq}",
        "/rooms/{id}/read",
        "/rooms/{id}/reads",
        "/dm",
    }
    assert set(paths["/rooms/{id}/messages/{seq}"]) - {"parameters"} == {"patch", "delete"}
    assert set(paths["/rooms"]) == {"get", "post"}
    assert set(paths["/rooms/{id}"]) >= {"get", "delete"}
    assert "put" in paths["/rooms/{id}/members"]
    assert "delete" in paths["/rooms/{id}/members/{uuid}"]


@pytest.mark.asyncio
async def test_unknown_path_is_an_enveloped_404(api: Api) -> None:
    for who in (None, api.caller()):
        reply = await api.call("GET", "/nope", who)
        assert_envelope(reply, 404)
        assert reply.body["meta"]["message"] == "Not Found"


@pytest.mark.asyncio
async def test_wrong_method_is_an_enveloped_405_with_allow(api: Api) -> None:
    reply = await api.call("PATCH", "/rooms", api.caller(), json={})
    assert_envelope(reply, 405)
    assert set(reply.headers["Allow"].split(",")) - {"HEAD"} == {"GET", "POST"}


@pytest.mark.asyncio
async def test_cors_preflight_is_204_without_token(api: Api) -> None:
    reply = await api.call(
        "OPTIONS",
        "/rooms/1/members",
        headers={"Origin": "https://partner.example", "Access-Control-Request-Method": "PUT"},
    )
    assert reply.status == 204
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    assert "PUT" in reply.headers["Access-Control-Allow-Methods"]
    allowed = reply.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


@pytest.mark.asyncio
async def test_method_override_header_is_ignored(api: Api) -> None:
    owner = api.caller()
    member = api.caller()
    room_id = await api.room(owner)
    await api.grant(owner, room_id, member.user)
    override = {"X-HTTP-Method-Override": "DELETE"}
    reply = await api.call("POST", f"/rooms/{room_id}", owner, headers=override, json={})
    assert_envelope(reply, 405)
    path = f"/rooms/{room_id}/members/{member.user}"
    reply = await api.call("POST", path, owner, headers=override, json={})
    assert_envelope(reply, 405)
    assert (await api.call("GET", f"/rooms/{room_id}", owner)).status == 200
    assert (await api.call("GET", f"/rooms/{room_id}", member)).status == 200


@pytest.mark.asyncio
async def test_method_override_in_body_or_query_is_refused(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    reply = await api.call(
        "POST", "/rooms", owner, json={"name": "x", "level_admin": 1, "_method": "DELETE"}
    )
    assert_envelope(reply, 400)
    assert "_method" in (reply.reason or "")
    reply = await api.call("GET", f"/rooms/{room_id}?_method=DELETE", owner)
    assert_envelope(reply, 400)
    assert (await api.call("GET", f"/rooms/{room_id}", owner)).status == 200


# -- POST /rooms ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_room_answers_200_with_the_room(api: Api) -> None:
    me = api.caller()
    reply = await api.call("POST", "/rooms", me, json={"name": "probe-room", "level_admin": 100})
    assert_envelope(reply, 200)
    assert reply.body["meta"] == {"code": 200, "message": "OK"}
    room = reply.content["room"]
    assert room["name"] == "probe-room"
    assert room["entity_owner"] == me.entity
    assert room["type"] == "group"
    assert room["max_entity_rules"] == 100
    assert room["level_admin"] == 100
    assert api.notified == []


@pytest.mark.asyncio
async def test_create_room_takes_type_and_max_entity_rules(api: Api) -> None:
    me = api.caller()
    body = {"name": "dm", "level_admin": 0, "type": "user2user", "max_entity_rules": 2}
    reply = await api.call("POST", "/rooms", me, json=body)
    assert_envelope(reply, 200)
    assert reply.content["room"]["type"] == "user2user"
    assert reply.content["room"]["max_entity_rules"] == 2


@pytest.mark.asyncio
async def test_create_room_below_create_level_is_403(api: Api) -> None:
    me = api.caller(level=CREATE_LEVEL - 1)
    reply = await api.call("POST", "/rooms", me, json={"name": "r", "level_admin": 1})
    assert_envelope(reply, 403)
    listed = await api.call("GET", "/rooms/all", me)
    assert listed.content == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"level_admin": 100}, "name"),
        ({"name": "", "level_admin": 100}, "name"),
        ({"name": "   ", "level_admin": 100}, "name"),
        ({"name": "x" * 101, "level_admin": 100}, "name"),
        ({"name": 5, "level_admin": 100}, "name"),
        ({"name": "a\u0000b", "level_admin": 100}, "name"),
        ({"name": "r"}, "level_admin"),
        ({"name": "r", "level_admin": True}, "level_admin"),
        ({"name": "r", "level_admin": 1.5}, "level_admin"),
        ({"name": "r", "level_admin": "100"}, "level_admin"),
        ({"name": "r", "level_admin": -5}, "level_admin"),
        ({"name": "r", "level_admin": 1001}, "level_admin"),
        ({"name": "r", "level_admin": 1, "type": "channel"}, "type"),
        ({"name": "r", "level_admin": 1, "max_entity_rules": 1}, "max_entity_rules"),
        ({"name": "r", "level_admin": 1, "max_entity_rules": False}, "max_entity_rules"),
        ({"name": "r", "level_admin": 1, "entity_owner": str(uuid.uuid4())}, "entity_owner"),
    ],
)
async def test_create_room_rejects_bad_fields_naming_the_field(
    api: Api, body: dict[str, Any], field_name: str
) -> None:
    me = api.caller()
    reply = await api.call("POST", "/rooms", me, json=body)
    assert_envelope(reply, 400)
    assert f"'{field_name}'" in (reply.reason or "")
    assert (await api.call("GET", "/rooms/all", me)).content == []


@pytest.mark.asyncio
async def test_create_room_accepts_a_name_of_exactly_100_chars(api: Api) -> None:
    reply = await api.call(
        "POST", "/rooms", api.caller(), json={"name": "x" * 100, "level_admin": 1000}
    )
    assert_envelope(reply, 200)


@pytest.mark.asyncio
async def test_invalid_json_is_400(api: Api) -> None:
    reply = await api.call(
        "POST",
        "/rooms",
        api.caller(),
        data=b'{"name": ',
        headers={"Content-Type": "application/json"},
    )
    assert_envelope(reply, 400)
    assert reply.reason == "invalid JSON"


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [[], "room", 5, None])
async def test_non_object_body_is_400(api: Api, body: Any) -> None:
    reply = await api.call("POST", "/rooms", api.caller(), json=body)
    assert_envelope(reply, 400)
    assert reply.reason == "body must be a JSON object"


@pytest.mark.asyncio
async def test_multipart_body_is_415_and_creates_nothing(api: Api) -> None:
    me = api.caller()
    form = aiohttp.FormData()
    form.add_field("name", "r")
    form.add_field("level_admin", "100")
    form.add_field("file", b"x" * 1000, filename="evil.bin")
    reply = await api.call("POST", "/rooms", me, data=form)
    assert_envelope(reply, 415)
    assert (await api.call("GET", "/rooms/all", me)).content == []


@pytest.mark.asyncio
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_non_json_content_type_is_415(api: Api, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    data = b'{"name": "r", "level_admin": 1}'
    reply = await api.call("POST", "/rooms", api.caller(), data=data, headers=headers)
    assert_envelope(reply, 415)


@pytest.mark.asyncio
async def test_body_over_64_kib_is_413(api: Api) -> None:
    body = {"name": "r", "level_admin": 1, "pad": "x" * (64 * 1024)}
    reply = await api.call("POST", "/rooms", api.caller(), json=body)
    assert_envelope(reply, 413)


# -- GET /rooms (the caller's rules) -------------------------------------------------------------


@pytest.mark.asyncio
async def test_list_rules_gives_my_rules_with_their_rooms(api: Api) -> None:
    me = api.caller()
    room_id = await api.room(me)
    reply = await api.call("GET", "/rooms", me)
    assert_envelope(reply, 200)
    mine = {(r["kind"], r["entity_UUID"]): r for r in reply.content}
    assert set(mine) == {("user", me.user), ("entity", me.entity)}
    assert mine[("user", me.user)]["permissions"] == "rwa"
    assert mine[("user", me.user)]["room"]["id"] == room_id
    assert all(r["room_id"] == room_id and r["accepted"] is True for r in reply.content)


@pytest.mark.asyncio
async def test_list_rules_filters_on_accepted(api: Api) -> None:
    owner, guest = api.caller(), api.caller()
    pending_room = await api.room(owner, name="pending")
    joined_room = await api.room(owner, name="joined")
    await api.grant(owner, pending_room, guest.user, invite=True)
    await api.grant(owner, joined_room, guest.user)

    pending = await api.call("GET", "/rooms?accepted=false", guest)
    assert [r["room"]["id"] for r in pending.content] == [pending_room]
    assert pending.content[0]["accepted"] is False
    accepted = await api.call("GET", "/rooms?accepted=true", guest)
    assert [r["room"]["id"] for r in accepted.content] == [joined_room]
    both = await api.call("GET", "/rooms", guest)
    assert sorted(r["room"]["id"] for r in both.content) == sorted([pending_room, joined_room])


@pytest.mark.asyncio
async def test_list_rules_pages_with_limit_and_offset(api: Api) -> None:
    me = api.caller()
    ids = [await api.room(me, type="user2user") for _ in range(3)]  # one rule each
    first = await api.call("GET", "/rooms?limit=2", me)
    second = await api.call("GET", "/rooms?limit=2&offset=2", me)
    assert [r["room_id"] for r in first.content] == ids[:2]
    assert [r["room_id"] for r in second.content] == ids[2:]


@pytest.mark.asyncio
async def test_list_rules_hides_entity_rules_above_my_level(api: Api) -> None:
    owner = api.caller()
    junior = api.caller(entity=owner.entity, level=50)
    await api.room(owner)  # its entity rule is at level 100
    reply = await api.call("GET", "/rooms", junior)
    assert_envelope(reply, 200)
    assert reply.content == []


@pytest.mark.asyncio
async def test_list_rules_pages_are_full_despite_hidden_entity_rules(api: Api) -> None:
    owner = api.caller()
    junior = api.caller(entity=owner.entity, level=50)
    ids = [await api.room(owner) for _ in range(3)]  # each with an entity rule at level 100
    for room_id in ids:
        await api.grant(owner, room_id, junior.user, permissions="r")
    first = await api.call("GET", "/rooms?limit=2", junior)
    second = await api.call("GET", "/rooms?limit=2&offset=2", junior)
    assert [(r["room_id"], r["kind"]) for r in first.content] == [(i, "user") for i in ids[:2]]
    assert [(r["room_id"], r["kind"]) for r in second.content] == [(ids[2], "user")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "query",
    [
        "accepted=yes",
        "accepted=True",
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=-1",
        "offset=-1",
        "offset=1.5",
        "limit=1&limit=2",
        "sort=name",
    ],
)
async def test_list_rules_rejects_bad_query(api: Api, query: str) -> None:
    reply = await api.call("GET", f"/rooms?{query}", api.caller())
    assert_envelope(reply, 400)


# -- GET /rooms/all ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_all_rooms_lists_only_rooms_visible_to_me(api: Api) -> None:
    me, stranger, friend = api.caller(), api.caller(), api.caller()
    mine = await api.room(me)
    await api.room(stranger)
    shared = await api.room(friend)
    await api.grant(friend, shared, me.user)
    pending = await api.room(friend)
    await api.grant(friend, pending, me.user, invite=True)

    reply = await api.call("GET", "/rooms/all", me)
    assert_envelope(reply, 200)
    assert [room["id"] for room in reply.content] == [mine, shared]
    stranger_view = await api.call("GET", "/rooms/all", stranger)
    assert mine not in [room["id"] for room in stranger_view.content]


@pytest.mark.asyncio
async def test_all_rooms_pages_and_rejects_bad_limit(api: Api) -> None:
    me = api.caller()
    ids = [await api.room(me) for _ in range(3)]
    page = await api.call("GET", "/rooms/all?limit=1&offset=1", me)
    assert [room["id"] for room in page.content] == ids[1:2]
    for query in ("limit=0", "limit=x", "offset=-3", "accepted=true"):
        assert_envelope(await api.call("GET", f"/rooms/all?{query}", me), 400)


@pytest.mark.asyncio
async def test_all_rooms_lists_only_rooms_i_may_read(api: Api) -> None:
    owner = api.caller()
    colleague = api.caller(entity=owner.entity, level=99)  # below level_admin 100
    guest = api.caller(entity=owner.entity, level=99)
    mine = [await api.room(owner) for _ in range(3)]
    readable = [mine[0], mine[2]]
    await api.grant(owner, mine[0], guest.user, permissions="r")
    await api.grant(owner, mine[1], guest.user, permissions="rw")
    await api.grant(owner, mine[1], guest.user, permissions="w")  # write alone: not listed
    await api.grant(owner, mine[2], guest.user, permissions="r")
    await api.grant(owner, mine[2], owner.entity, kind="entity", permissions="rw", level=0)
    banned = await api.room(owner)
    await api.grant(owner, banned, guest.user, permissions="rw")
    await api.grant(owner, banned, guest.entity, kind="entity", permissions="b", level=99)

    # Owner entity but below level_admin: only the room whose entity rule admits level 0.
    listed = await api.call("GET", "/rooms/all", colleague)
    assert [room["id"] for room in listed.content] == [mine[2]]
    listed = await api.call("GET", "/rooms/all?limit=1", guest)
    assert [room["id"] for room in listed.content] == [mine[0]]
    listed = await api.call("GET", "/rooms/all?limit=1&offset=1", guest)
    assert [room["id"] for room in listed.content] == [mine[2]]
    listed = await api.call("GET", "/rooms/all", guest)
    assert [room["id"] for room in listed.content] == readable
    for room_id in [*mine, banned]:
        access = await api.call("GET", f"/rooms/{room_id}", guest)
        assert (access.status == 200) == (room_id in readable)


# -- GET /rooms/{id} -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_room_gives_the_room_and_my_access(api: Api) -> None:
    owner, member = api.caller(), api.caller()
    room_id = await api.room(owner, name="visible")
    await api.grant(owner, room_id, member.user, permissions="r")
    reply = await api.call("GET", f"/rooms/{room_id}", owner)
    assert_envelope(reply, 200)
    assert reply.content["room"]["name"] == "visible"
    assert reply.content["access"] == "rwa"
    reply = await api.call("GET", f"/rooms/{room_id}", member)
    assert reply.content["access"] == "r"


@pytest.mark.asyncio
async def test_get_room_is_404_alike_for_outsiders_and_missing_rooms(api: Api) -> None:
    owner, outsider = api.caller(), api.caller(level=1000)
    room_id = await api.room(owner)
    hidden = await api.call("GET", f"/rooms/{room_id}", outsider)
    missing = await api.call("GET", f"/rooms/{2**62}", outsider)
    assert_envelope(hidden, 404)
    assert_envelope(missing, 404)
    assert hidden.body == missing.body


@pytest.mark.asyncio
@pytest.mark.parametrize("bad_id", ["abc", "0", "-1", "1.0", "%201", "1e3", "0x10"])
async def test_bad_room_id_is_400(api: Api, bad_id: str) -> None:
    me = api.caller()
    for method, path in [
        ("GET", f"/rooms/{bad_id}"),
        ("DELETE", f"/rooms/{bad_id}"),
        ("GET", f"/rooms/{bad_id}/messages"),
        ("DELETE", f"/rooms/{bad_id}/members/{me.user}"),
    ]:
        reply = await api.call(method, path, me)
        assert_envelope(reply, 400)
        assert reply.reason == "room id must be a positive integer"
    reply = await api.call("PUT", f"/rooms/{bad_id}/members", me, json={})
    assert_envelope(reply, 400)


@pytest.mark.asyncio
async def test_room_id_beyond_any_stored_id_is_404_not_500(api: Api) -> None:
    reply = await api.call("GET", f"/rooms/{2**70}", api.caller())
    assert_envelope(reply, 404)


# -- DELETE /rooms/{id} --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_admin_soft_deletes_room_keeping_history(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    await api.post_messages(room_id, owner, [datetime.now(UTC)])
    reply = await api.call("DELETE", f"/rooms/{room_id}", owner)
    assert_envelope(reply, 200)
    assert reply.content == {}
    assert api.notified == [room_id]
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", owner), 404)
    assert_envelope(await api.call("GET", f"/rooms/{room_id}/messages", owner), 404)
    assert_envelope(await api.call("DELETE", f"/rooms/{room_id}", owner), 404)
    assert await api.store.room_access(room_id) is None
    kept = await api.store.history(HistoryQuery(room_id=room_id, limit=10))
    assert [m.content for m in kept] == ["m0"]
    assert room_id not in [r["id"] for r in (await api.call("GET", "/rooms/all", owner)).content]


@pytest.mark.asyncio
async def test_owner_entity_admin_may_delete_room(api: Api) -> None:
    owner = api.caller()
    colleague = api.caller(entity=owner.entity, level=100)
    room_id = await api.room(owner, level_admin=100)
    assert_envelope(await api.call("DELETE", f"/rooms/{room_id}", colleague), 200)


@pytest.mark.asyncio
async def test_delete_room_is_403_for_readers_and_404_for_outsiders(api: Api) -> None:
    owner, member, outsider = api.caller(), api.caller(), api.caller(level=1000)
    low_colleague = api.caller(entity=owner.entity, level=100)
    room_id = await api.room(owner, level_admin=500)
    await api.grant(owner, room_id, member.user, permissions="rw")
    assert_envelope(await api.call("DELETE", f"/rooms/{room_id}", member), 403)
    assert_envelope(await api.call("DELETE", f"/rooms/{room_id}", low_colleague), 403)
    assert_envelope(await api.call("DELETE", f"/rooms/{room_id}", outsider), 404)
    assert (await api.call("GET", f"/rooms/{room_id}", owner)).status == 200
    assert api.notified == [room_id]  # only the grant


# -- PUT /rooms/{id}/members ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_put_member_creates_with_201_then_updates_with_200(api: Api) -> None:
    owner, member = api.caller(), api.caller()
    room_id = await api.room(owner)
    created = await api.grant(owner, room_id, member.user, permissions="r", level=7)
    assert_envelope(created, 201)
    assert created.body["meta"]["message"] == "Created"
    assert created.content["entity_UUID"] == member.user
    assert created.content["kind"] == "user"
    assert created.content["permissions"] == "r"
    assert created.content["level"] == 7
    assert created.content["accepted"] is True
    assert (await api.call("GET", f"/rooms/{room_id}", member)).content["access"] == "r"

    updated = await api.grant(owner, room_id, member.user, permissions="rw")
    assert_envelope(updated, 200)
    assert updated.content["permissions"] == "rw"
    assert (await api.call("GET", f"/rooms/{room_id}", member)).content["access"] == "rw"
    assert api.notified == [room_id, room_id]


@pytest.mark.asyncio
async def test_put_member_accepts_userUUID_alias(api: Api) -> None:
    owner, member = api.caller(), api.caller()
    room_id = await api.room(owner)
    body = {"userUUID": member.user, "permissions": "r"}
    reply = await api.call("PUT", f"/rooms/{room_id}/members", owner, json=body)
    assert_envelope(reply, 201)
    assert reply.content["entity_UUID"] == member.user


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"permissions": "r"}, "entity_UUID"),
        ({"entity_UUID": "U", "userUUID": "U", "permissions": "r"}, "entity_UUID"),
        ({"entity_UUID": "not-a-uuid", "permissions": "r"}, "entity_UUID"),
        ({"userUUID": 5, "permissions": "r"}, "userUUID"),
        ({"entity_UUID": "U", "permissions": "rwx"}, "permissions"),
        ({"entity_UUID": "U", "permissions": "rr"}, "permissions"),
        ({"entity_UUID": "U", "permissions": ""}, "permissions"),
        ({"entity_UUID": "U", "permissions": "rwbaa"}, "permissions"),
        ({"entity_UUID": "U", "permissions": 3}, "permissions"),
        ({"entity_UUID": "U"}, "permissions"),
        ({"entity_UUID": "U", "permissions": "r", "level": True}, "level"),
        ({"entity_UUID": "U", "permissions": "r", "level": "5"}, "level"),
        ({"entity_UUID": "U", "permissions": "r", "level": -1}, "level"),
        ({"entity_UUID": "U", "permissions": "r", "level": 1_000_001}, "level"),
        ({"entity_UUID": "U", "permissions": "r", "invite": "yes"}, "invite"),
        ({"entity_UUID": "U", "permissions": "r", "invite": 1}, "invite"),
        ({"entity_UUID": "U", "permissions": "r", "kind": "group"}, "kind"),
        ({"entity_UUID": "U", "permissions": "r", "accepted": True}, "accepted"),
    ],
)
async def test_put_member_rejects_bad_fields_naming_the_field(
    api: Api, body: dict[str, Any], needle: str
) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    body = {k: (str(uuid.uuid4()) if v == "U" else v) for k, v in body.items()}
    reply = await api.call("PUT", f"/rooms/{room_id}/members", owner, json=body)
    assert_envelope(reply, 400)
    assert needle in (reply.reason or "")
    assert api.notified == []


@pytest.mark.asyncio
async def test_put_member_is_403_for_readers_and_404_for_outsiders(api: Api) -> None:
    owner, member, outsider = api.caller(), api.caller(), api.caller(level=1000)
    room_id = await api.room(owner)
    await api.grant(owner, room_id, member.user, permissions="rw")
    api.notified.clear()
    target = str(uuid.uuid4())
    assert_envelope(await api.grant(member, room_id, target, permissions="rwa"), 403)
    assert_envelope(await api.grant(outsider, room_id, outsider.user, permissions="rwa"), 404)
    assert_envelope(await api.grant(owner, 2**62, target), 404)
    assert (await api.call("GET", f"/rooms/{room_id}", outsider)).status == 404
    assert api.notified == []


@pytest.mark.asyncio
async def test_too_many_rules_counts_the_creators_rules(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner, max_entity_rules=3)  # group: 2 automatic rules
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert_envelope(await api.grant(owner, room_id, first), 201)
    refused = await api.grant(owner, room_id, second)
    assert_envelope(refused, 403)
    assert refused.reason == "TOO_MANY_RULES"
    assert_envelope(await api.grant(owner, room_id, first, permissions="r"), 200)


# -- DELETE /rooms/{id}/members/{uuid} -----------------------------------------------------------


@pytest.mark.asyncio
async def test_delete_member_without_body_revokes_access(api: Api) -> None:
    owner, member = api.caller(), api.caller()
    room_id = await api.room(owner)
    await api.grant(owner, room_id, member.user)
    api.notified.clear()
    reply = await api.call("DELETE", f"/rooms/{room_id}/members/{member.user}", owner)
    assert_envelope(reply, 200)
    assert reply.content == {}
    assert api.notified == [room_id]
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", member), 404)
    again = await api.call("DELETE", f"/rooms/{room_id}/members/{member.user}", owner)
    assert_envelope(again, 404)
    assert again.reason == "no such member"
    assert api.notified == [room_id]


@pytest.mark.asyncio
async def test_delete_member_kind_deletes_only_that_kind(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    subject = str(uuid.uuid4())
    await api.grant(owner, room_id, subject, kind="user")
    await api.grant(owner, room_id, subject, kind="entity", level=5)
    path = f"/rooms/{room_id}/members/{subject}"
    assert_envelope(await api.call("DELETE", f"{path}?kind=entity", owner), 200)
    found = await api.store.room_access(room_id)
    assert found is not None
    assert [r.kind for r in found.rules if r.subject == subject] == ["user"]
    assert_envelope(await api.call("DELETE", f"{path}?kind=entity", owner), 404)
    assert_envelope(await api.call("DELETE", path, owner), 200)


@pytest.mark.asyncio
async def test_delete_member_rejects_bad_uuid_and_kind(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    reply = await api.call("DELETE", f"/rooms/{room_id}/members/not-a-uuid", owner)
    assert_envelope(reply, 400)
    assert "uuid" in (reply.reason or "")
    reply = await api.call("DELETE", f"/rooms/{room_id}/members/{owner.user}?kind=room", owner)
    assert_envelope(reply, 400)
    assert (await api.call("GET", f"/rooms/{room_id}", owner)).status == 200


@pytest.mark.asyncio
async def test_delete_member_is_403_for_readers_and_404_for_outsiders(api: Api) -> None:
    owner, member, outsider = api.caller(), api.caller(), api.caller(level=1000)
    room_id = await api.room(owner)
    await api.grant(owner, room_id, member.user)
    path = f"/rooms/{room_id}/members/{owner.user}"
    assert_envelope(await api.call("DELETE", path, member), 403)
    assert_envelope(await api.call("DELETE", path, outsider), 404)
    assert (await api.call("GET", f"/rooms/{room_id}", owner)).content["access"] == "rwa"


# -- PUT /rooms/{id}/invitation ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pending_invitation_grants_nothing_until_accepted(api: Api) -> None:
    owner, guest = api.caller(), api.caller()
    room_id = await api.room(owner)
    invited = await api.grant(owner, room_id, guest.user, invite=True)
    assert invited.content["accepted"] is False
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", guest), 404)
    assert_envelope(await api.call("GET", f"/rooms/{room_id}/messages", guest), 404)
    api.notified.clear()

    reply = await api.call("PUT", f"/rooms/{room_id}/invitation", guest, json={"accepted": True})
    assert_envelope(reply, 200)
    assert reply.content["accepted"] is True
    assert reply.content["entity_UUID"] == guest.user
    assert api.notified == [room_id]
    assert (await api.call("GET", f"/rooms/{room_id}", guest)).content["access"] == "rw"


@pytest.mark.asyncio
async def test_declined_invitation_grants_nothing(api: Api) -> None:
    owner, guest = api.caller(), api.caller()
    room_id = await api.room(owner)
    await api.grant(owner, room_id, guest.user)  # accepted by the admin
    assert (await api.call("GET", f"/rooms/{room_id}", guest)).status == 200
    reply = await api.call("PUT", f"/rooms/{room_id}/invitation", guest, json={"accepted": False})
    assert_envelope(reply, 200)
    assert reply.content["accepted"] is False
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", guest), 404)


@pytest.mark.asyncio
async def test_invitation_without_my_rule_is_404(api: Api) -> None:
    owner, stranger = api.caller(), api.caller()
    room_id = await api.room(owner)
    body = {"accepted": True}
    assert_envelope(await api.call("PUT", f"/rooms/{room_id}/invitation", stranger, json=body), 404)
    assert_envelope(await api.call("PUT", f"/rooms/{2**62}/invitation", stranger, json=body), 404)
    assert api.notified == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [{}, {"accepted": "maybe"}, {"accepted": 1}, {"accepted": True, "use_parent_entity": "no"}],
)
async def test_invitation_rejects_bad_body(api: Api, body: dict[str, Any]) -> None:
    owner, guest = api.caller(), api.caller()
    room_id = await api.room(owner)
    await api.grant(owner, room_id, guest.user, invite=True)
    reply = await api.call("PUT", f"/rooms/{room_id}/invitation", guest, json=body)
    assert_envelope(reply, 400)
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", guest), 404)


@pytest.mark.asyncio
async def test_invitation_for_parent_entity_respects_the_rule_level(api: Api) -> None:
    owner = api.caller()
    partner_entity = str(uuid.uuid4())
    senior = api.caller(entity=partner_entity, level=60)
    junior = api.caller(entity=partner_entity, level=40)
    room_id = await api.room(owner)
    await api.grant(owner, room_id, partner_entity, kind="entity", level=50, invite=True)
    body = {"accepted": True, "use_parent_entity": True}
    path = f"/rooms/{room_id}/invitation"
    assert_envelope(await api.call("PUT", path, junior, json=body), 404)
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", senior), 404)  # still pending
    reply = await api.call("PUT", path, senior, json=body)
    assert_envelope(reply, 200)
    assert reply.content["kind"] == "entity"
    assert reply.content["entity_UUID"] == partner_entity
    assert (await api.call("GET", f"/rooms/{room_id}", senior)).status == 200
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", junior), 404)


@pytest.mark.asyncio
async def test_ban_rule_cannot_be_declined_by_its_subject(api: Api) -> None:
    owner, member = api.caller(), api.caller()
    room_id = await api.room(owner)
    await api.grant(owner, room_id, member.entity, kind="entity", permissions="rw", level=0)
    await api.grant(owner, room_id, member.user, permissions="b")
    path = f"/rooms/{room_id}/invitation"
    reply = await api.call("PUT", path, member, json={"accepted": False})
    assert_envelope(reply, 403)
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", member), 404)


# -- permission semantics ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_entity_rule_admits_members_at_or_above_its_level(api: Api) -> None:
    owner = api.caller()
    partner = str(uuid.uuid4())
    at_level = api.caller(entity=partner, level=100)
    below = api.caller(entity=partner, level=99)
    room_id = await api.room(owner)
    await api.grant(owner, room_id, partner, kind="entity", permissions="r", level=100)
    assert (await api.call("GET", f"/rooms/{room_id}", at_level)).content["access"] == "r"
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", below), 404)


@pytest.mark.asyncio
async def test_ban_denies_despite_other_rules(api: Api) -> None:
    owner = api.caller()
    partner = str(uuid.uuid4())
    member = api.caller(entity=partner, level=100)
    room_id = await api.room(owner)
    await api.grant(owner, room_id, partner, kind="entity", permissions="rw", level=0)
    assert (await api.call("GET", f"/rooms/{room_id}", member)).status == 200
    await api.grant(owner, room_id, member.user, permissions="b")
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", member), 404)
    assert_envelope(await api.call("GET", f"/rooms/{room_id}/messages", member), 404)


@pytest.mark.asyncio
async def test_owner_entity_admin_cannot_be_banned(api: Api) -> None:
    owner = api.caller(level=500)
    colleague_admin = api.caller(entity=owner.entity, level=500)
    room_id = await api.room(owner, level_admin=500)
    assert_envelope(await api.grant(owner, room_id, colleague_admin.user, permissions="b"), 201)
    await api.grant(owner, room_id, owner.entity, kind="entity", permissions="b", level=0)
    reply = await api.call("GET", f"/rooms/{room_id}", colleague_admin)
    assert_envelope(reply, 200)
    assert reply.content["access"] == "rwa"


@pytest.mark.asyncio
async def test_other_entity_is_isolated_from_my_room(api: Api) -> None:
    owner = api.caller()
    other = api.caller(level=1000)
    room_id = await api.room(owner)
    await api.post_messages(room_id, owner, [datetime.now(UTC)])
    listed = await api.call("GET", "/rooms/all", other)
    assert room_id not in [room["id"] for room in listed.content]
    assert room_id not in [r["room_id"] for r in (await api.call("GET", "/rooms", other)).content]
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", other), 404)
    assert_envelope(await api.call("GET", f"/rooms/{room_id}/messages", other), 404)
    assert_envelope(await api.grant(other, room_id, other.user, permissions="rwa"), 404)
    path = f"/rooms/{room_id}/members/{owner.user}"
    assert_envelope(await api.call("DELETE", path, other), 404)
    assert_envelope(await api.call("DELETE", f"/rooms/{room_id}", other), 404)
    body = {"accepted": True, "use_parent_entity": True}
    assert_envelope(await api.call("PUT", f"/rooms/{room_id}/invitation", other, json=body), 404)
    assert (await api.call("GET", f"/rooms/{room_id}", owner)).content["access"] == "rwa"
    assert api.notified == []


# -- GET /rooms/{id}/messages --------------------------------------------------------------------


def _seqs(reply: Reply) -> list[int]:
    return [m["seq"] for m in reply.content]


@pytest.mark.asyncio
async def test_history_defaults_to_the_latest_50_oldest_first(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    start = datetime.now(UTC)
    await api.post_messages(room_id, owner, [start + timedelta(seconds=i) for i in range(60)])
    reply = await api.call("GET", f"/rooms/{room_id}/messages", owner)
    assert_envelope(reply, 200)
    assert _seqs(reply) == list(range(11, 61))
    assert reply.content[-1]["content"] == "m59"
    assert reply.content[-1]["emitter"] == owner.user


@pytest.mark.asyncio
async def test_history_pages_with_before_and_after(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    start = datetime.now(UTC)
    await api.post_messages(room_id, owner, [start + timedelta(seconds=i) for i in range(12)])
    path = f"/rooms/{room_id}/messages"
    assert _seqs(await api.call("GET", f"{path}?after=5&limit=3", owner)) == [6, 7, 8]
    assert _seqs(await api.call("GET", f"{path}?before=10&limit=3", owner)) == [7, 8, 9]
    assert _seqs(await api.call("GET", f"{path}?limit=2", owner)) == [11, 12]
    assert _seqs(await api.call("GET", f"{path}?after=0&limit=2", owner)) == [1, 2]
    assert _seqs(await api.call("GET", f"{path}?after=12", owner)) == []


@pytest.mark.asyncio
async def test_history_date_window_covers_whole_utc_days_inclusive(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    stamps = [
        datetime(2026, 11, 22, 23, 59, 59, 999000, tzinfo=UTC),  # seq 1: day before
        datetime(2026, 11, 23, 0, 0, 0, tzinfo=UTC),  # seq 2: first instant
        datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC),  # seq 3
        datetime(2026, 11, 23, 23, 59, 59, 999000, tzinfo=UTC),  # seq 4: last millisecond
        datetime(2026, 11, 24, 0, 0, 0, tzinfo=UTC),  # seq 5: day after
    ]
    await api.post_messages(room_id, owner, stamps)
    path = f"/rooms/{room_id}/messages"
    day = await api.call("GET", f"{path}?dateFrom=2026-11-23&dateTo=2026-11-23", owner)
    assert_envelope(day, 200)
    assert _seqs(day) == [2, 3, 4]
    naive = await api.call(
        "GET", f"{path}?dateFrom=2026-11-23T12:00:00&dateTo=2026-11-24T00:00:00", owner
    )
    assert _seqs(naive) == [3, 4, 5]
    zoned = await api.call("GET", f"{path}?dateFrom=2026-11-23T13:00:00%2B01:00", owner)
    assert _seqs(zoned) == [3, 4, 5]
    until = await api.call("GET", f"{path}?dateTo=2026-11-22", owner)
    assert _seqs(until) == [1]
    capped = await api.call("GET", f"{path}?dateFrom=2026-11-23&limit=2", owner)
    assert _seqs(capped) == [2, 3]


@pytest.mark.asyncio
async def test_history_date_window_and_seq_cursors_narrow_each_other(api: Api) -> None:
    """Every bound given applies; a window that ends before it starts is empty (200), since
    the OpenAPI document cannot declare one parameter's bounds by another's."""
    owner = api.caller()
    room_id = await api.room(owner)
    day = datetime(2026, 11, 23, tzinfo=UTC)
    await api.post_messages(room_id, owner, [day + timedelta(hours=i) for i in range(6)])
    path = f"/rooms/{room_id}/messages"
    after = await api.call("GET", f"{path}?dateFrom=2026-11-23T01:00&after=3", owner)
    assert_envelope(after, 200)
    assert _seqs(after) == [4, 5, 6]
    before = await api.call("GET", f"{path}?dateTo=2026-11-23T03:00Z&before=3", owner)
    assert _seqs(before) == [1, 2]
    inverted = await api.call("GET", f"{path}?dateFrom=2026-11-24&dateTo=2026-11-23", owner)
    assert_envelope(inverted, 200)
    assert inverted.content == []


@pytest.mark.asyncio
async def test_history_bound_beyond_year_9999_or_before_year_1_in_utc_is_clamped(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    await api.post_messages(room_id, owner, [datetime(2026, 11, 23, tzinfo=UTC)])
    path = f"/rooms/{room_id}/messages"
    early = await api.call("GET", f"{path}?dateFrom=0001-01-01T00:00%2B05:00", owner)
    assert_envelope(early, 200)
    assert _seqs(early) == [1]
    late = await api.call("GET", f"{path}?dateTo=9999-12-31T23:00-05:00", owner)
    assert_envelope(late, 200)
    assert _seqs(late) == [1]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "query",
    [
        "dateFrom=yesterday",
        "dateFrom=",
        "dateTo=2026-13-01",
        "dateTo=2026-02-29",
        "dateFrom=2026-11-23T24:00",
        "dateFrom=2026-11-23t10:00",
        "dateFrom=%EF%BC%92026-11-23",
        "dateFrom=2026-11-23T10:00:00%2B24:00",
        "before=-1",
        "before=9223372036854775808",
        "after=x",
        "limit=0",
        "limit=501",
        "limit=true",
        "page=2",
        "after=1&after=2",
    ],
)
async def test_history_rejects_bad_query(api: Api, query: str) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    reply = await api.call("GET", f"/rooms/{room_id}/messages?{query}", owner)
    assert_envelope(reply, 400)


@pytest.mark.asyncio
async def test_history_needs_read_access(api: Api) -> None:
    owner, reader, writer_only = api.caller(), api.caller(), api.caller()
    room_id = await api.room(owner)
    await api.grant(owner, room_id, reader.user, permissions="r")
    await api.grant(owner, room_id, writer_only.user, permissions="w")
    await api.post_messages(room_id, owner, [datetime.now(UTC)])
    path = f"/rooms/{room_id}/messages"
    assert [m["content"] for m in (await api.call("GET", path, reader)).content] == ["m0"]
    assert_envelope(await api.call("GET", path, writer_only), 404)
    assert_envelope(await api.call("GET", path, api.caller()), 404)


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_storage_unavailable_is_503_without_details(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    api.faults.fail["room_access"] = StoreUnavailable("connection refused to 10.0.0.7:5432")
    reply = await api.call("GET", f"/rooms/{room_id}", owner)
    assert_envelope(reply, 503)
    assert reply.reason == "storage unavailable"
    assert "10.0.0.7" not in orjson.dumps(reply.body).decode()


@pytest.mark.asyncio
async def test_room_gone_during_an_operation_is_404(api: Api) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    api.faults.fail["put_rule"] = RoomGone(room_id)
    reply = await api.grant(owner, room_id, str(uuid.uuid4()))
    assert_envelope(reply, 404)


@pytest.mark.asyncio
async def test_unexpected_error_is_500_without_details_and_server_keeps_serving(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    owner = api.caller()
    room_id = await api.room(owner)
    api.faults.fail["room_access"] = RuntimeError('relation "room_rules" SELECT secret')
    reply = await api.call("GET", f"/rooms/{room_id}", owner)
    assert_envelope(reply, 500)
    assert "secret" not in orjson.dumps(reply.body).decode()
    assert "RuntimeError" in caplog.text
    del api.faults.fail["room_access"]
    assert_envelope(await api.call("GET", f"/rooms/{room_id}", owner), 200)


@pytest.mark.asyncio
async def test_failed_notification_does_not_fail_a_stored_change(api: Api) -> None:
    owner, member = api.caller(), api.caller()
    room_id = await api.room(owner)
    api.notify_error = ConnectionError("broker down")
    assert_envelope(await api.grant(owner, room_id, member.user, permissions="r"), 201)
    assert (await api.call("GET", f"/rooms/{room_id}", member)).status == 200

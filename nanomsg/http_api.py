"""The HTTP side-port for partner backends: rooms, members, invitations, history and posting.

Built by ``build_http_app`` from injected collaborators (no global state). Every answer, errors
included, is the original's JSON envelope ``{"meta": {"code", "message"[, "reason"]},
"content"}``; ``/openapi.json`` is the one exception, served bare so tools can read it.

Deliberately *not* kept from the original (protocol-baseline.md section 3/4): method override,
multipart bodies, unenveloped 401s, database details in reasons, 500s on bad ids, a body required
on DELETE, and ``/rooms/all`` listing every room. Access follows one rule, from
``permissions.evaluate``: 404 for a room the caller may not read (whether or not it exists),
403 when the caller may read it but lacks the right.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from http import HTTPStatus
from typing import Any, NoReturn

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nanomsg import codec, events
from nanomsg.auth import AuthError, Verifier, canonical_uuid
from nanomsg.clock import Clock, utc_datetime
from nanomsg.config import Config
from nanomsg.http_guard import BODY_TIMEOUT, connection_middleware
from nanomsg.models import ROOM_TYPES, RULE_KINDS, Principal, Room, Rule
from nanomsg.openapi import (
    CONVERSATIONS_LIMIT_MAX,
    HISTORY_LIMIT_DEFAULT,
    INSTANT_PATTERN,
    LEVEL_ADMIN_MAX,
    MAX_BODY_BYTES,
    MAX_ENTITY_RULES_DEFAULT,
    MAX_ENTITY_RULES_MAX,
    MAX_ENTITY_RULES_MIN,
    MAX_ID,
    MEMBERS_LIMIT_DEFAULT,
    NAME_MAX_LEN,
    NAME_PATTERN,
    PAGE_LIMIT_MAX,
    ROOM_ENTITY_LEVEL_DEFAULT,
    ROOMS_LIMIT_DEFAULT,
    RULE_LEVEL_MAX,
    build_openapi,
)
from nanomsg.permissions import Access, evaluate, is_valid_flags
from nanomsg.store.base import (
    HistoryQuery,
    LimitBelowRules,
    NewRoom,
    RoomChanges,
    RoomGone,
    Store,
    StoreUnavailable,
    TooManyRules,
)
from nanomsg.store.common import CONVERSATION_ORDERS
from nanomsg.usecases import BadArgs, Forbidden, NoSuchMessage, NoSuchRoom, UseCases

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AuthedHandler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]
Readiness = Callable[[], Awaitable[dict[str, bool]]]
# Connections the WebSocket server closed itself, by close code (reported by /healthz).
CloseCounts = Callable[[], Mapping[int, int]]

READINESS_TIMEOUT = 5.0
CORS_ALLOW_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = "86400"
_SHOWN_NAME_MAX = 40  # longest client-supplied field name echoed back in a reason
ROOM_ID_SEGMENT = "{id:(?!all$)[^{}/]+}"  # aiohttp's default segment, except "all"


# -- envelope and errors -------------------------------------------------------------------------


class HttpError(Exception):
    """An answer other than success: its status and a short reason safe to show the caller.

    ``close`` ends the connection after the answer, for requests whose body was not read to
    its end (what is left of it must not be taken for the next request).
    """

    def __init__(self, status: int, reason: str, *, close: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close


def bad_request(reason: str) -> HttpError:
    return HttpError(400, reason)


def envelope(
    status: int,
    content: Any = None,
    *,
    reason: str | None = None,
    headers: Mapping[str, str] | None = None,
    page: Mapping[str, Any] | None = None,
) -> web.Response:
    """The original's envelope; ``content`` defaults to ``{}``; errors carry ``meta.reason``.

    ``page`` adds paging fields (``has_more`` and the cursor to pass next) to ``meta``, so a
    paged list keeps ``content`` a bare list, as it was before paging was reported.
    """
    meta: dict[str, Any] = {"code": status, "message": HTTPStatus(status).phrase}
    if reason is not None:
        meta["reason"] = reason
    if page is not None:
        meta.update(page)
    body = orjson.dumps({"meta": meta, "content": {} if content is None else content})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _shown(name: str) -> str:
    """A client-supplied name, cut short enough to echo back in a reason."""
    return name if len(name) <= _SHOWN_NAME_MAX else name[:_SHOWN_NAME_MAX] + "..."


_AIOHTTP_REASONS = {
    404: "no such endpoint",
    405: "method not allowed",
    413: f"body larger than {MAX_BODY_BYTES} bytes",
}


def _cors(response: web.StreamResponse) -> None:
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Vary"] = "Origin"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Cache-Control", "no-store")


def _preflight(request: web.Request) -> web.Response:
    """204 for a CORS preflight on a known path, listing the path's methods; no token needed."""
    exc = request.match_info.http_exception
    if isinstance(exc, web.HTTPMethodNotAllowed):
        methods = sorted(exc.allowed_methods | {"OPTIONS"})
    else:
        methods = ["OPTIONS"]
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": ", ".join(methods),
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE,
        },
    )


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer preflights, turn every failure into an envelope, and add the CORS headers.

    Unexpected exceptions are logged with their traceback and answered 500 without details.
    """
    try:
        if request.method == "OPTIONS" and not isinstance(
            request.match_info.http_exception, web.HTTPNotFound
        ):
            response: web.StreamResponse = _preflight(request)
        else:
            response = await handler(request)
    except HttpError as exc:
        response = envelope(exc.status, reason=exc.reason)
        if exc.close:
            response.force_close()
    except web.HTTPException as exc:  # routing (404, 405) and body size (413)
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        reason = _AIOHTTP_REASONS.get(exc.status, HTTPStatus(exc.status).phrase.lower())
        response = envelope(exc.status, reason=reason, headers=allow)
    except NoSuchRoom:
        response = envelope(404, reason="no such room")
    except Forbidden as exc:
        response = envelope(403, reason=exc.reason)
    except NoSuchMessage:
        response = envelope(404, reason="no such message")
    except BadArgs as exc:
        response = envelope(400, reason=exc.reason)
    except StoreUnavailable:
        log.warning("storage unavailable during %s %s", request.method, request.path)
        response = envelope(503, reason="storage unavailable")
    except RoomGone:
        response = envelope(404, reason="no such room")
    except TooManyRules:
        response = envelope(403, reason="TOO_MANY_RULES")
    except LimitBelowRules as exc:
        response = envelope(
            409,
            reason=f"max_entity_rules {exc.requested} is below the {exc.rules} rules"
            " the room holds; delete rules first",
        )
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = envelope(500, reason="internal error")
    _cors(response)
    return response


# -- input validation ----------------------------------------------------------------------------


async def read_body(request: web.Request) -> bytes:
    """The whole request body, within the application's body timeout (408, closing the
    connection, past it). A client that hangs up or breaks the framing mid-body gets a 400
    that it will likely never read, and nothing is logged: neither is a server fault."""
    timeout = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(timeout):
            return await request.read()  # raises 413 past client_max_size
    except TimeoutError:
        raise HttpError(
            408, f"request body not received within {timeout:g} s", close=True
        ) from None
    except (ConnectionError, HttpProcessingError):
        raise HttpError(400, "incomplete or malformed request body", close=True) from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object: 415 unless JSON, 413 if too big, 400 if malformed."""
    if request.content_type != "application/json":
        raise HttpError(415, "Content-Type must be application/json")
    raw = await read_body(request)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("invalid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("body must be a JSON object")
    return data


MESSAGE_FIELDS = ("content", "client_id", "system")


async def read_message_body(request: web.Request) -> dict[str, Any]:
    """The body of ``POST /rooms/{id}/messages`` as a JSON object, parsed as the WebSocket
    codec parses a frame: JSON that only the lenient parser reads (an escaped lone surrogate,
    a number beyond a double) is still an object, so the field at fault gets its own reason
    instead of "invalid JSON"."""
    if request.content_type != "application/json":
        raise HttpError(415, "Content-Type must be application/json")
    raw = await read_body(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("invalid JSON") from None
    data, _ = codec.loads_json(text)
    if data is codec.NOT_JSON:
        raise bad_request("invalid JSON")
    if not isinstance(data, dict):
        raise bad_request("body must be a JSON object")
    return data


def checked_message(data: dict[str, Any], max_content: int) -> tuple[str, str | None, bool]:
    """``content``, ``client_id`` and ``system`` of a message body, checked: unknown fields
    and ``null`` are refused, and content and client_id go through the WebSocket codec's own
    checks (``codec.message_command``), so both transports accept and refuse the same text, with
    the same reasons. Content over ``max_content`` is 400 (the WebSocket's TOOLARGE): 413 is
    the side-port's answer to a body over its byte limit, and the document's contract is
    that an input it declares invalid is 400."""
    body = JsonBody(data, MESSAGE_FIELDS)
    if data.get("client_id", "") is None:
        raise bad_request("client_id must not be null (leave it out for none)")
    # The codec reads the same two fields from a frame; ``system`` is not one of them.
    decoded = _codec_message(data, max_content)
    system = body.boolean("system", default=False)
    return decoded.content, decoded.client_id, system


def checked_edit(data: dict[str, Any], max_content: int) -> str:
    """The ``content`` of an edit body (``PATCH /rooms/{id}/messages/{seq}``), its only field,
    checked by the same codec function as a message's content (``checked_message``), so an
    edit accepts and refuses exactly the text a post does, with the same reasons."""
    JsonBody(data, ("content",))
    return _codec_message(data, max_content).content


def _codec_message(data: dict[str, Any], max_content: int) -> events.SendMessage:
    """``codec.message_command`` on a body, its refusals as 400s with the codec's reasons."""
    decoded = codec.message_command(data, max_content)
    if isinstance(decoded, events.TooLarge):
        raise bad_request(f"content must be at most {max_content} characters")
    if isinstance(decoded, events.BadArgs):
        raise bad_request(decoded.reason)
    assert isinstance(decoded, events.SendMessage)
    return decoded


_ABSENT: Any = object()  # a body field that was not given
_NAME_RE = re.compile(NAME_PATTERN)
_INSTANT_RE = re.compile(INSTANT_PATTERN)
_UTC_MIN = datetime.min.replace(tzinfo=UTC)
_UTC_MAX = datetime.max.replace(tzinfo=UTC)


def is_control(ch: str) -> bool:
    """C0 (NUL included), DEL and C1: what ``CONTROL_CHARS`` of the document names."""
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


class JsonBody:
    """A JSON object checked field by field; unknown fields are refused up front."""

    def __init__(self, data: dict[str, Any], allowed: Collection[str]) -> None:
        unknown = sorted(key for key in data if key not in allowed)
        if unknown:
            raise bad_request(f"unknown field '{_shown(unknown[0])}'")
        self.data = data

    def _get(self, name: str, required: bool) -> Any:
        """The field's value; ``_ABSENT`` when it is missing and not required.

        ``null`` is a value like any other here, and the typed getters refuse it: the document
        declares no field nullable, so ``null`` never stands for "use the default".
        """
        if name not in self.data:
            if required:
                raise bad_request(f"field '{name}' is required")
            return _ABSENT
        return self.data[name]

    def text(
        self,
        name: str,
        *,
        default: str | None = None,
        max_len: int = 1000,
        choices: Collection[str] | None = None,
        pattern: re.Pattern[str] | None = None,
    ) -> str:
        """A string field; required when ``default`` is None. ``pattern`` (matched whole) is
        the field's pattern in the OpenAPI document."""
        value = self._get(name, default is None)
        if value is _ABSENT and default is not None:
            return default
        if not isinstance(value, str):
            raise bad_request(f"field '{name}' must be a string")
        if choices is not None and value not in choices:
            raise bad_request(f"field '{name}' must be one of: {', '.join(choices)}")
        if not value.strip():
            raise bad_request(f"field '{name}' must not be empty")
        if len(value) > max_len:
            raise bad_request(f"field '{name}' must be at most {max_len} characters")
        if any(is_control(ch) for ch in value):
            raise bad_request(f"field '{name}' must not contain control characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise bad_request(f"field '{name}' must not be blank")
        return value

    def integer(self, name: str, *, lo: int, hi: int, default: int | None = None) -> int:
        """An integer field in [lo, hi].

        As in JSON Schema, a number with a zero fraction (``100.0``) is an integer; a bool is
        not.
        """
        value = self._get(name, default is None)
        if value is _ABSENT and default is not None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"field '{name}' must be an integer")
        if not lo <= value <= hi:
            raise bad_request(f"field '{name}' must be between {lo} and {hi}")
        return value

    def boolean(self, name: str, *, default: bool | None = None) -> bool:
        value = self._get(name, default is None)
        if value is _ABSENT and default is not None:
            return default
        if not isinstance(value, bool):
            raise bad_request(f"field '{name}' must be a boolean")
        return value

    def one_uuid(self, *names: str) -> str:
        """Exactly one of ``names`` (aliases of one field), holding a UUID."""
        given = [name for name in names if name in self.data]
        if len(given) != 1:
            raise bad_request(f"exactly one of {', '.join(names)} is required")
        value = canonical_uuid(self.data[given[0]])
        if value is None:
            raise bad_request(f"field '{given[0]}' must be a UUID")
        return value


def _parse_uint(text: str, max_digits: int = 19) -> int | None:
    """A non-negative decimal integer written plainly (no sign, spaces or underscores)."""
    if not text or len(text) > max_digits or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def parse_instant(text: str, *, end_of_day: bool) -> datetime | None:
    """``text`` as a UTC instant if it matches ``INSTANT_PATTERN``, else None.

    A date is a whole UTC day: its first or, with ``end_of_day``, its last instant. A date and
    time without a zone is UTC. A time whose zone puts it before year 1 or after year 9999 in
    UTC is clamped to that end: as a bound it means "from the beginning" or "to the end".
    """
    if not _INSTANT_RE.fullmatch(text):
        return None
    if len(text) == 10:
        day = date.fromisoformat(text)
        return datetime.combine(day, time.max if end_of_day else time.min, tzinfo=UTC)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return _UTC_MIN if moment.year == 1 else _UTC_MAX


class QueryArgs:
    """The query string, checked: unknown or repeated parameters are refused."""

    def __init__(self, request: web.Request, allowed: Collection[str]) -> None:
        query = request.rel_url.query
        for key in query:
            if key not in allowed:
                raise bad_request(f"unknown query parameter '{_shown(key)}'")
            if len(query.getall(key)) > 1:
                raise bad_request(f"query parameter '{key}' given more than once")
        self.values: dict[str, str] = {key: query[key] for key in query}

    def has(self, name: str) -> bool:
        return name in self.values

    def integer(self, name: str, *, lo: int, hi: int, default: int | None = None) -> int | None:
        if name not in self.values:
            return default
        value = _parse_uint(self.values[name])
        if value is None or not lo <= value <= hi:
            raise bad_request(f"query parameter '{name}' must be an integer from {lo} to {hi}")
        return value

    def flag(self, name: str) -> bool | None:
        if name not in self.values:
            return None
        text = self.values[name]
        if text not in ("true", "false"):
            raise bad_request(f"query parameter '{name}' must be true or false")
        return text == "true"

    def choice(self, name: str, choices: Collection[str]) -> str | None:
        if name not in self.values:
            return None
        if self.values[name] not in choices:
            raise bad_request(f"query parameter '{name}' must be one of: {', '.join(choices)}")
        return self.values[name]

    def instant(self, name: str, *, end_of_day: bool) -> datetime | None:
        """A date or a date and time, as ``parse_instant`` reads it; 400 otherwise."""
        if name not in self.values:
            return None
        moment = parse_instant(self.values[name], end_of_day=end_of_day)
        if moment is None:
            raise bad_request(
                f"query parameter '{name}' must be a date (YYYY-MM-DD) or a date and time "
                "(YYYY-MM-DDThh:mm[:ss[.ffffff]], then Z, +hh:mm or -hh:mm, or no zone for UTC)"
            )
        return moment

    def page(self, default_limit: int, most: int = PAGE_LIMIT_MAX) -> tuple[int, int]:
        """``limit`` (1 to ``most``) and ``offset`` (0 or more)."""
        limit = self.integer("limit", lo=1, hi=most, default=default_limit)
        offset = self.integer("offset", lo=0, hi=MAX_ID, default=0)
        assert limit is not None and offset is not None
        return limit, offset


def path_room_id(request: web.Request) -> int:
    """The ``{id}`` path segment: a positive integer, else 400."""
    value = _parse_uint(request.match_info["id"], max_digits=100)
    if value is None or value < 1:
        raise bad_request("room id must be a positive integer")
    if value > MAX_ID:
        raise HttpError(404, "no such room")
    return value


def path_seq(request: web.Request) -> int:
    """The ``{seq}`` path segment: a positive integer up to ``MAX_ID``, else 400 (the reason
    the WebSocket's ``edit`` and ``delete`` give for a bad ``seq``)."""
    value = _parse_uint(request.match_info["seq"], max_digits=100)
    if value is None or not 1 <= value <= MAX_ID:
        raise bad_request("seq must be a positive integer")
    return value


def path_uuid(request: web.Request, name: str) -> str:
    """A UUID path segment, in its canonical lower-case form; else 400."""
    value = canonical_uuid(request.match_info[name])
    if value is None:
        raise bad_request(f"{name} must be a UUID")
    return value


def _no_such_room() -> NoReturn:
    raise HttpError(404, "no such room")


def _unreadable_state() -> dict[str, Any]:
    """The state fields of a room the caller may not read: nothing of its messages."""
    return {"last_message": None, "last_activity_at": None, "read_seq": 0, "unread": 0}


def _lists(principal: Principal, rule: Rule) -> bool:
    """Whether GET /rooms lists ``rule`` to ``principal``: its user rule, or its entity's rule
    at or below its level."""
    if rule.kind == "user":
        return rule.subject == principal.user
    return rule.subject == principal.entity and rule.level <= principal.level


# -- the application -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Granted:
    """A room the caller may read, and what the caller may do in it."""

    room: Room
    access: Access
    rules: tuple[Rule, ...]


class HttpApi:
    """The handlers, sharing the injected store, verifier, clock and callbacks."""

    def __init__(
        self,
        *,
        store: Store,
        verifier: Verifier,
        clock: Clock,
        config: Config,
        readiness: Readiness,
        usecases: UseCases,
        closes: CloseCounts = dict,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.clock = clock
        self.config = config
        self.readiness = readiness
        self.closes = closes
        # The process's one use-case layer, shared with the WebSocket driver.
        self.usecases = usecases
        self.spec = orjson.dumps(
            build_openapi(
                room_create_level=config.room_create_level, max_content=config.max_content
            )
        )

    # -- plumbing ---------------------------------------------------------------------------

    def authed(self, handler: AuthedHandler) -> Handler:
        """Wrap ``handler`` so it runs only with a verified bearer token."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await handler(request, self.authenticate(request))

        return wrapped

    def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(401, "missing bearer token")
        try:
            return self.verifier.verify(token.strip())
        except AuthError as exc:
            raise HttpError(401, str(exc)) from None

    def now(self) -> datetime:
        return utc_datetime(self.clock.wall())

    async def room_for(self, principal: Principal, room_id: int, *, admin: bool) -> Granted:
        """The room if the caller may read it (else 404) and, with ``admin``, administer it
        (else 403). A DM waiting for the caller's entity is settled first, so its invitee
        reads it from their first request on."""
        await self.usecases.settle(principal)
        found = await self.store.room_access(room_id)
        if found is None:
            _no_such_room()
        access = evaluate(principal, found.room, found.rules)
        if not access.read:
            _no_such_room()
        if admin and not access.admin:
            raise HttpError(403, "admin permission required")
        return Granted(room=found.room, access=access, rules=found.rules)

    async def changed(self, room_id: int, before: tuple[Rule, ...] | None = None) -> None:
        """Tell every process to re-check live connections of the room, and, given the
        room's rules ``before`` the change, tell the users whose user rules changed what the
        room now is to them (the use case's ``rules_changed``: the one place for that).

        The change is already stored, so a failing notification is logged, not reported as a
        failure of the request.
        """
        await self.usecases.room_changed(room_id)
        if before is None:
            return
        try:
            found = await self.store.room_access(room_id)
        except StoreUnavailable:
            log.warning("user events of room %d not sent: storage unavailable", room_id)
            return
        self.usecases.rules_changed(room_id, before, found.rules if found is not None else ())

    # -- public -----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        closes = {str(code): count for code, count in sorted(self.closes().items())}
        return envelope(200, {"status": "ok", "closes": closes})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT):
                checks = await self.readiness()
        except Exception:
            log.exception("readiness check failed")
            return envelope(503, reason="readiness check failed")
        ready = all(checks.values())
        return envelope(200 if ready else 503, checks, reason=None if ready else "not ready")

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.spec, content_type="application/json")

    # -- authenticated ----------------------------------------------------------------------

    async def test_token(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        return envelope(200, principal.claims)

    async def create_room(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        body = JsonBody(
            await read_json_object(request),
            ("name", "level_admin", "type", "max_entity_rules", "entity_level"),
        )
        name = body.text("name", max_len=NAME_MAX_LEN, pattern=_NAME_RE)
        level_admin = body.integer("level_admin", lo=0, hi=LEVEL_ADMIN_MAX)
        room_type = body.text("type", default="group", choices=ROOM_TYPES)
        max_rules = body.integer(
            "max_entity_rules",
            lo=MAX_ENTITY_RULES_MIN,
            hi=MAX_ENTITY_RULES_MAX,
            default=MAX_ENTITY_RULES_DEFAULT,
        )
        # Given means given: null is not "the default" for a field added with a clear type.
        entity_level = (
            body.integer("entity_level", lo=0, hi=RULE_LEVEL_MAX)
            if "entity_level" in body.data
            else ROOM_ENTITY_LEVEL_DEFAULT
        )
        if "entity_level" in body.data and room_type != "group":
            # Only a group room gets the owner entity's rule; a level for no rule is a mistake.
            raise bad_request("field 'entity_level' applies only to group rooms")
        if principal.level < self.config.room_create_level:
            raise HttpError(
                403, f"levelOnEntity {self.config.room_create_level} needed to create rooms"
            )
        room = await self.store.create_room(
            NewRoom(
                name=name,
                level_admin=level_admin,
                type=room_type,
                entity_owner=principal.entity,
                max_entity_rules=max_rules,
                creator_user=principal.user,
                creator_level=principal.level,
                now=self.now(),
                entity_level=entity_level,
            )
        )
        return envelope(200, {"room": room.to_json()})

    async def patch_room(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """Rename a room, or change its ``level_admin`` or rule limit (admins).

        A changed ``level_admin`` changes who is an owner-entity admin, so live connections
        are re-checked as after a rule change.
        """
        QueryArgs(request, ())
        room_id = path_room_id(request)
        fields = ("name", "level_admin", "max_entity_rules")
        body = JsonBody(await read_json_object(request), fields)
        if not any(name in body.data for name in fields):
            raise bad_request(f"at least one of {', '.join(fields)} is required")
        changes = RoomChanges(
            name=(
                body.text("name", max_len=NAME_MAX_LEN, pattern=_NAME_RE)
                if "name" in body.data
                else None
            ),
            level_admin=(
                body.integer("level_admin", lo=0, hi=LEVEL_ADMIN_MAX)
                if "level_admin" in body.data
                else None
            ),
            max_entity_rules=(
                body.integer("max_entity_rules", lo=MAX_ENTITY_RULES_MIN, hi=MAX_ENTITY_RULES_MAX)
                if "max_entity_rules" in body.data
                else None
            ),
        )
        await self.room_for(principal, room_id, admin=True)
        room = await self.store.update_room(room_id, changes, self.now())
        await self.changed(room_id)
        return envelope(200, {"room": room.to_json()})

    async def list_members(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """The room's rules (users and entities), for its admins, paged.

        A room holds at most ``max_entity_rules`` (<= 1000) rules and every permission check
        reads them all, so the page is cut from that one read: entity rules first, then user
        rules, each by subject.
        """
        limit, offset = QueryArgs(request, ("limit", "offset")).page(MEMBERS_LIMIT_DEFAULT)
        room_id = path_room_id(request)
        granted = await self.room_for(principal, room_id, admin=True)
        rules = granted.rules[offset : offset + limit]
        has_more = offset + len(rules) < len(granted.rules)
        page: dict[str, Any] = {"has_more": has_more}
        if has_more:
            page["next_offset"] = offset + len(rules)
        content = [
            {**rule.to_json(), "status": "accepted" if rule.accepted else "pending"}
            for rule in rules
        ]
        return envelope(200, content, page=page)

    async def list_rules(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        query = QueryArgs(request, ("accepted", "limit", "offset"))
        accepted = query.flag("accepted")
        limit, offset = query.page(ROOMS_LIMIT_DEFAULT)
        # Entity rules above the caller's level are not the caller's (as for invitations); the
        # store leaves them out before paging, so pages are full.
        await self.usecases.settle(principal)
        pairs = await self.store.rules_of(
            principal.user, principal.entity, principal.level, accepted, limit, offset
        )
        # Two queries in all: the rules, then the state of every room of the page the caller
        # may read; a room it may not read (a pending invitation) shows no message of it.
        states = await self.usecases.room_states(principal, sorted({r.id for _, r in pairs}))
        content = [
            {
                **rule.to_json(),
                "room": {
                    **room.to_json(),
                    **(states[room.id].to_json() if room.id in states else _unreadable_state()),
                },
            }
            for rule, room in pairs
        ]
        return envelope(200, content)

    async def list_rooms(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """The conversation list: one query for the page, states included. Each entry is
        written from its row (``Conversation.to_json``), without a record per room, or is
        the JSON the store's list cache kept for it."""
        query = QueryArgs(request, ("limit", "offset", "order"))
        order = query.choice("order", CONVERSATION_ORDERS) or "id"
        # Pages up to CONVERSATIONS_LIMIT_MAX, twice the other lists': a user's whole list of
        # 1 000 rooms in one answer.
        limit, offset = query.page(ROOMS_LIMIT_DEFAULT, CONVERSATIONS_LIMIT_MAX)
        entries = await self.usecases.conversation_entries(principal, order, limit, offset)
        return envelope(200, entries)

    async def open_dm(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        body = JsonBody(await read_json_object(request), ("user",))
        other = body.one_uuid("user")
        opened = await self.usecases.open_dm(principal, other)
        return envelope(
            200,
            {"room": opened.room.to_json(), "created": opened.created, "invited": opened.invited},
        )

    async def mark_read(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        room_id = path_room_id(request)
        body = JsonBody(await read_json_object(request), ("seq",))
        seq = body.integer("seq", lo=0, hi=MAX_ID)
        await self.usecases.settle(principal)
        held = await self.usecases.mark_read(principal, room_id, seq)
        return envelope(200, {"room_id": room_id, "seq": held})

    async def reads(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        room_id = path_room_id(request)
        await self.usecases.settle(principal)
        marks = await self.usecases.reads(principal, room_id)
        return envelope(200, [mark.to_json() for mark in marks])

    async def get_room(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        granted = await self.room_for(principal, path_room_id(request), admin=False)
        return envelope(200, {"room": granted.room.to_json(), "access": granted.access.flags})

    async def delete_room(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        granted = await self.room_for(principal, path_room_id(request), admin=True)
        room_id = granted.room.id
        if not await self.store.delete_room(room_id, self.now()):
            _no_such_room()
        await self.changed(room_id, granted.rules)
        return envelope(200)

    async def put_member(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        QueryArgs(request, ())
        room_id = path_room_id(request)
        body = JsonBody(
            await read_json_object(request),
            ("entity_UUID", "userUUID", "kind", "permissions", "level", "invite"),
        )
        subject = body.one_uuid("entity_UUID", "userUUID")
        kind = body.text("kind", default="user", choices=RULE_KINDS)
        if kind == "entity" and "userUUID" in body.data:
            raise bad_request("field 'userUUID' names a user: give an entity as entity_UUID")
        permissions = body.text("permissions", max_len=4)
        if not is_valid_flags(permissions):
            raise bad_request("field 'permissions' must use only r, w, b, a, each at most once")
        level = body.integer("level", lo=0, hi=RULE_LEVEL_MAX, default=0)
        invite = body.boolean("invite", default=False)
        granted = await self.room_for(principal, room_id, admin=True)
        rule, created = await self.store.put_rule(
            room_id, subject, kind, permissions, level, not invite, self.now()
        )
        await self.changed(room_id, granted.rules)
        return envelope(201 if created else 200, rule.to_json())

    async def delete_member(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        kind = QueryArgs(request, ("kind",)).choice("kind", RULE_KINDS)
        room_id = path_room_id(request)
        subject = path_uuid(request, "uuid")
        granted = await self.room_for(principal, room_id, admin=True)
        if not await self.store.delete_rule(room_id, subject, kind):
            raise HttpError(404, "no such member")
        await self.changed(room_id, granted.rules)
        return envelope(200)

    async def put_invitation(
        self, request: web.Request, principal: Principal
    ) -> web.StreamResponse:
        """Accept or decline the caller's own rule; open without read access (a pending rule
        grants nothing), but a caller with no such rule gets 404 like any outsider."""
        QueryArgs(request, ())
        room_id = path_room_id(request)
        body = JsonBody(await read_json_object(request), ("accepted", "use_parent_entity"))
        accepted = body.boolean("accepted")
        use_entity = body.boolean("use_parent_entity", default=False)
        await self.usecases.settle(principal)  # a DM decided first is then answered here
        kind, subject = ("entity", principal.entity) if use_entity else ("user", principal.user)
        found = await self.store.room_access(room_id)
        if found is None:
            _no_such_room()
        rule = next((r for r in found.rules if r.kind == kind and r.subject == subject), None)
        if rule is None or (kind == "entity" and rule.level > principal.level):
            # "No such invitation" would tell an outsider that the room exists: only a caller
            # who may read the room, or holds a rule in it that GET /rooms lists, learns that.
            if not evaluate(principal, found.room, found.rules).read and not any(
                _lists(principal, r) for r in found.rules
            ):
                _no_such_room()
            raise HttpError(404, "no such invitation")
        if "b" in rule.permissions:
            # Only accepted rules count, so declining a ban would lift it.
            raise HttpError(403, "a ban cannot be accepted or declined")
        updated = await self.store.set_accepted(room_id, subject, kind, accepted, self.now())
        if updated is None:
            raise HttpError(404, "no such invitation")
        await self.changed(room_id, found.rules)
        return envelope(200, updated.to_json())

    async def messages(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        room_id = path_room_id(request)
        query = QueryArgs(request, ("dateFrom", "dateTo", "before", "after", "limit"))
        date_from = query.instant("dateFrom", end_of_day=False)
        date_to = query.instant("dateTo", end_of_day=True)
        before = query.integer("before", lo=0, hi=MAX_ID)
        after = query.integer("after", lo=0, hi=MAX_ID)
        limit = query.integer("limit", lo=1, hi=PAGE_LIMIT_MAX, default=HISTORY_LIMIT_DEFAULT)
        assert limit is not None
        # Every bound given applies (a date window and seq cursors narrow each other); a window
        # that ends before it starts is empty, not an error: the document cannot say otherwise.
        await self.room_for(principal, room_id, admin=False)
        # A date window or ``after`` reads forwards from its start; otherwise the latest ones.
        # A date window combines with the seq cursors, so it can be paged like the rest.
        newest = after is None and date_from is None
        found = await self.store.history(
            HistoryQuery(
                room_id=room_id,
                limit=limit + 1,  # one more than asked: whether another page follows
                before=before,
                after=after,
                date_from=date_from,
                date_to=date_to,
                newest=newest,
            )
        )
        has_more = len(found) > limit
        page: dict[str, Any] = {"has_more": has_more}
        if newest:
            found = found[-limit:]  # the extra one is the oldest
            if has_more:
                page["next_before"] = found[0].seq
        else:
            found = found[:limit]  # the extra one is the newest
            if has_more:
                page["next_after"] = found[-1].seq
        return envelope(200, [message.to_json() for message in found], page=page)

    async def post_message(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """Store and deliver a message as a WebSocket send does (the ``post`` use case): 200
        with the message frame's ``data``, the same for a ``client_id`` repeat (which is
        delivered to nobody again)."""
        QueryArgs(request, ())
        room_id = path_room_id(request)
        content, client_id, system = checked_message(
            await read_message_body(request), self.config.max_content
        )
        await self.usecases.settle(principal)
        posted = await self.usecases.post(principal, room_id, content, client_id, system=system)
        return envelope(200, posted.message.to_json())

    async def edit_message(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """Edit the caller's own message (the ``edit`` use case, as the WebSocket's ``edit``):
        200 with the ``edited`` frame's ``data``; the event reaches the room's WebSocket
        receivers on every process like one made over the WebSocket."""
        QueryArgs(request, ())
        room_id, seq = path_room_id(request), path_seq(request)
        content = checked_edit(await read_message_body(request), self.config.max_content)
        await self.usecases.settle(principal)
        changed = await self.usecases.edit(principal, room_id, seq, content)
        return envelope(200, changed.event.event_json())

    async def delete_message(
        self, request: web.Request, principal: Principal
    ) -> web.StreamResponse:
        """Soft-delete a message, the caller's own or, for a room admin, anyone's (the
        ``delete`` use case): 200 with the ``deleted`` frame's ``data``, delivered as above."""
        QueryArgs(request, ())
        room_id, seq = path_room_id(request), path_seq(request)
        await self.usecases.settle(principal)
        changed = await self.usecases.delete(principal, room_id, seq)
        return envelope(200, changed.event.event_json())

    # -- routes -----------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        """Every route. ``{id}`` never matches ``all``, so that ``/rooms/all`` answers 405 (with
        ``Allow: GET``) to the methods of ``/rooms/{id}`` instead of taking "all" for an id."""
        a = self.authed
        routes = [
            web.route("GET", "/healthz", self.healthz),
            web.route("GET", "/readyz", self.readyz),
            web.route("GET", "/openapi.json", self.openapi),
            web.route("GET", "/test/token", a(self.test_token)),
            web.route("POST", "/rooms", a(self.create_room)),
            web.route("GET", "/rooms", a(self.list_rules)),
            web.route("GET", "/rooms/all", a(self.list_rooms)),
            web.route("GET", "/rooms/{id}", a(self.get_room)),
            web.route("DELETE", "/rooms/{id}", a(self.delete_room)),
            web.route("PATCH", "/rooms/{id}", a(self.patch_room)),
            web.route("GET", "/rooms/{id}/members", a(self.list_members)),
            web.route("PUT", "/rooms/{id}/members", a(self.put_member)),
            web.route("DELETE", "/rooms/{id}/members/{uuid}", a(self.delete_member)),
            web.route("PUT", "/rooms/{id}/invitation", a(self.put_invitation)),
            web.route("GET", "/rooms/{id}/messages", a(self.messages)),
            web.route("POST", "/rooms/{id}/messages", a(self.post_message)),
            web.route("PATCH", "/rooms/{id}/messages/{seq}", a(self.edit_message)),
            web.route("DELETE", "/rooms/{id}/messages/{seq}", a(self.delete_message)),
            web.route("POST", "/rooms/{id}/read", a(self.mark_read)),
            web.route("GET", "/rooms/{id}/reads", a(self.reads)),
            web.route("POST", "/dm", a(self.open_dm)),
        ]
        return [
            web.route(r.method, r.path.replace("{id}", ROOM_ID_SEGMENT), r.handler) for r in routes
        ]


def build_http_app(
    *,
    store: Store,
    verifier: Verifier,
    clock: Clock,
    config: Config,
    readiness: Readiness,
    usecases: UseCases,
    closes: CloseCounts = dict,
) -> web.Application:
    """The side-port application; the caller owns the store and runs the app. ``usecases`` is
    the process's one use-case layer (``app.build_usecases``), the WebSocket driver's too:
    posting, edits and deletions, read marks, DMs and the user events of rule changes."""
    api = HttpApi(
        store=store,
        verifier=verifier,
        clock=clock,
        config=config,
        readiness=readiness,
        usecases=usecases,
        closes=closes,
    )
    app = web.Application(
        middlewares=[connection_middleware, envelope_middleware], client_max_size=MAX_BODY_BYTES
    )
    app[BODY_TIMEOUT] = config.http_body_timeout
    app.add_routes(api.routes())
    return app

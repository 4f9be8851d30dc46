"""The HTTP side-port's contract: its input limits and its OpenAPI 3.1 document.

The limits live here, next to the document that publishes them, and ``http_api`` validates with
the same constants and the same regular expressions (``NAME_PATTERN``, ``INSTANT_PATTERN``), so
the document cannot drift from what the server enforces. Patterns are written so that they mean
the same in ECMA-262 (the dialect of JSON Schema) and in Python's ``re``: ASCII classes spelt
out (``[0-9]``, never ``\\d`` or ``\\s``), and the server matches them whole (``fullmatch``).
"""

from __future__ import annotations

from typing import Any

MAX_BODY_BYTES = 64 * 1024
MAX_ID = 2**63 - 1
NAME_MAX_LEN = 100
LEVEL_ADMIN_MAX = 1000
MAX_ENTITY_RULES_MIN = 2
MAX_ENTITY_RULES_MAX = 1000
MAX_ENTITY_RULES_DEFAULT = 100
RULE_LEVEL_MAX = 1_000_000
PAGE_LIMIT_MAX = 500
ROOMS_LIMIT_DEFAULT = 100
MEMBERS_LIMIT_DEFAULT = 100
ROOM_ENTITY_LEVEL_DEFAULT = 100  # the original's fixed level of a group room's entity rule
HISTORY_LIMIT_DEFAULT = 50

# No stored text may hold a control character: C0 (NUL included, which PostgreSQL cannot store
# in text), DEL and C1.
CONTROL_CHARS = "\\x00-\\x1f\\x7f-\\x9f"
# Characters that make a name blank besides the controls: Unicode's spaces and the BOM.
_SPACES = " \\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
NAME_PATTERN = f"^[^{CONTROL_CHARS}]*[^{CONTROL_CHARS}{_SPACES}][^{CONTROL_CHARS}]*$"

# A calendar date that exists (leap years included), year 0001 to 9999.
_YEAR = "(?!0000)[0-9]{4}"
_DATE = (
    f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    "|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
    "|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)-02-29)"
)
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\\.[0-9]{1,6})?)?"
_ZONE = "(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
# A date (a whole UTC day) or a date and time, with an optional zone (UTC without one).
INSTANT_PATTERN = f"^{_DATE}(?:[T ]{_TIME}{_ZONE}?)?$"

_JSON = "application/json"
_UUID: dict[str, Any] = {"type": "string", "format": "uuid"}
_STAMP: dict[str, Any] = {"type": "string", "format": "date-time"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _envelope(content: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["meta", "content"],
        "properties": {"meta": _ref("Meta"), "content": content},
    }


def _ok(description: str, content: dict[str, Any], status: str = "200") -> dict[str, Any]:
    return {
        status: {"description": description, "content": {_JSON: {"schema": _envelope(content)}}}
    }


def _paged(description: str, items: dict[str, Any], cursors: dict[str, str]) -> dict[str, Any]:
    """A 200 whose ``content`` is a list and whose ``meta`` says whether another page follows
    and, when one does, the cursor to pass for it (``cursors``: name -> description)."""
    meta = {
        "type": "object",
        "required": ["code", "message", "has_more"],
        "properties": {
            "code": {"type": "integer"},
            "message": {"type": "string"},
            "has_more": {
                "type": "boolean",
                "description": "Whether another page follows; its cursor is given only then.",
            },
            **{
                name: {"type": "integer", "minimum": 0, "description": text}
                for name, text in cursors.items()
            },
        },
    }
    schema = {
        "type": "object",
        "required": ["meta", "content"],
        "properties": {"meta": meta, "content": {"type": "array", "items": items}},
    }
    return {"200": {"description": description, "content": {_JSON: {"schema": schema}}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/E{code}"} for code in codes}


def _body(schema: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
    """A required JSON body; ``example`` is a valid one (tests send it to every route)."""
    return {"required": True, "content": {_JSON: {"schema": schema, "example": example}}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_ROOM_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    "description": "Room id (a positive integer; anything else is 400).",
}
_LIMIT_ROOMS = _query(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": ROOMS_LIMIT_DEFAULT},
    "Page size.",
)
_OFFSET = _query(
    "offset", {"type": "integer", "minimum": 0, "maximum": MAX_ID, "default": 0}, "Rows to skip."
)

_INSTANT: dict[str, Any] = {"type": "string", "pattern": INSTANT_PATTERN}
_SEQ: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
_EMPTY: dict[str, Any] = {"type": "object", "maxProperties": 0}

_ERROR_TEXT = {
    400: "Invalid input: bad id, bad field, unknown field or query parameter, invalid JSON, "
    "a body cut short.",
    401: "Missing or invalid bearer token; meta.reason says why (e.g. `token expired`).",
    403: "The caller may read the room but lacks the right (or, for POST /rooms, the level); "
    "meta.reason `TOO_MANY_RULES` when the room holds max_entity_rules rules.",
    404: "No such room, or a room the caller may not read (indistinguishable on purpose).",
    409: "The change conflicts with the room's state: a max_entity_rules below the number of "
    "rules the room holds (meta.reason says how many).",
    408: "The body did not arrive within the body timeout (the connection is closed).",
    413: f"Body larger than {MAX_BODY_BYTES} bytes.",
    415: "Body is not application/json (multipart is never accepted).",
    503: "Storage unavailable.",
}


def _schemas() -> dict[str, Any]:
    return {
        "Meta": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status."},
                "message": {"type": "string", "description": "The HTTP reason phrase."},
                "reason": {"type": "string", "description": "Why, on errors only."},
            },
        },
        "Error": _envelope(_EMPTY),
        "Room": {
            "type": "object",
            "required": [
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
            ],
            "properties": {
                "id": {"type": "integer"},
                "uuid": _UUID,
                "name": {"type": "string"},
                "level_admin": {"type": "integer"},
                "type": {"enum": ["group", "user2user"]},
                "entity_owner": _UUID,
                "max_entity_rules": {"type": "integer"},
                "last_seq": {"type": "integer", "description": "Seq of the room's last message."},
                "createdAt": _STAMP,
                "updatedAt": _STAMP,
            },
        },
        "Rule": {
            "type": "object",
            "required": [
                "room_id",
                "entity_UUID",
                "kind",
                "level",
                "permissions",
                "accepted",
                "createdAt",
                "updatedAt",
            ],
            "properties": {
                "room_id": {"type": "integer"},
                "entity_UUID": {**_UUID, "description": "userUUID (kind user) or entityUUID."},
                "kind": {"enum": ["user", "entity"]},
                "level": {"type": "integer"},
                "permissions": {"type": "string", "pattern": "^[rwba]{0,4}$"},
                "accepted": {"type": "boolean"},
                "createdAt": _STAMP,
                "updatedAt": _STAMP,
            },
        },
        "Member": {
            "allOf": [
                _ref("Rule"),
                {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {
                            "enum": ["accepted", "pending"],
                            "description": "pending: not accepted (an open or declined "
                            "invitation), grants nothing.",
                        }
                    },
                },
            ]
        },
        "RoomChanges": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "description": "At least one field; the others stay as they are.",
            "properties": {
                # The same rules as on creation, by reference, so the two cannot drift.
                "name": {"$ref": "#/components/schemas/NewRoom/properties/name"},
                "level_admin": {"$ref": "#/components/schemas/NewRoom/properties/level_admin"},
                "max_entity_rules": {
                    "type": "integer",
                    "minimum": MAX_ENTITY_RULES_MIN,
                    "maximum": MAX_ENTITY_RULES_MAX,
                    "description": "Not below the number of rules the room holds (else 409).",
                },
            },
        },
        "RuleWithRoom": {
            "allOf": [
                _ref("Rule"),
                {"type": "object", "properties": {"room": _ref("Conversation")}},
            ]
        },
        "Message": {
            "type": "object",
            "required": ["content", "emitter", "id", "room_id", "seq", "entity", "created_at"],
            "properties": {
                "content": {"type": "string"},
                "emitter": _UUID,
                "id": {"type": "integer"},
                "room_id": {"type": "integer"},
                "seq": {"type": "integer"},
                "entity": _UUID,
                "created_at": _STAMP,
                "createdAt": _STAMP,
                "updatedAt": _STAMP,
                "client_id": {"type": "string"},
                "system": {
                    "const": True,
                    "description": "Present on system messages (posted by a partner backend).",
                },
                "edited_at": {**_STAMP, "description": "Present once edited: the latest edit."},
                "deleted": {
                    "const": True,
                    "description": "A tombstone: the message was deleted; `content` is empty.",
                },
                "deleted_at": _STAMP,
                "deleted_by": _UUID,
            },
        },
        "RoomState": {
            "type": "object",
            "required": ["last_seq", "last_message", "last_activity_at", "read_seq", "unread"],
            "description": "The room as the caller's conversation list shows it. In GET /rooms "
            "a room the caller may not read (a pending invitation) has `last_message` and "
            "`last_activity_at` null and `unread` 0.",
            "properties": {
                "last_seq": {
                    "type": "integer",
                    "description": "Seq of the room's latest event (message, edit or delete).",
                },
                "last_message": {
                    "anyOf": [_ref("Message"), {"type": "null"}],
                    "description": "The latest message (a tombstone if deleted); null if none.",
                },
                "last_activity_at": {
                    "anyOf": [_STAMP, {"type": "null"}],
                    "description": "When the latest event was stored (the room's creation "
                    "while it has none).",
                },
                "read_seq": {"type": "integer", "description": "The caller's read mark."},
                "unread": {
                    "type": "integer",
                    "description": "Messages after the read mark, not the caller's, not deleted.",
                },
            },
        },
        "Conversation": {"allOf": [_ref("Room"), _ref("RoomState")]},
        "ReadMark": {
            "type": "object",
            "required": ["user", "seq", "updated_at"],
            "properties": {
                "user": _UUID,
                "seq": {"type": "integer", "description": "Every seq up to it is read."},
                "updated_at": {
                    "anyOf": [_STAMP, {"type": "null"}],
                    "description": "When the mark last moved; null for a member who never read.",
                },
            },
        },
        "OpenDm": {
            "type": "object",
            "additionalProperties": False,
            "required": ["user"],
            "properties": {
                "user": {**_UUID, "description": "The other user (not the caller), any case."}
            },
        },
        "ReadMarkMove": {
            "type": "object",
            "additionalProperties": False,
            "required": ["seq"],
            "properties": {
                "seq": {
                    **_SEQ,
                    "description": "Read up to this seq; never moves the mark backwards, and "
                    "a seq past the room's latest is clamped to it.",
                }
            },
        },
        "NewRoom": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "level_admin"],
            "properties": {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": NAME_MAX_LEN,
                    "pattern": NAME_PATTERN,
                    "description": "Not blank (not only spaces); no control characters "
                    "(U+0000-U+001F, U+007F-U+009F).",
                },
                "level_admin": {"type": "integer", "minimum": 0, "maximum": LEVEL_ADMIN_MAX},
                "type": {"enum": ["group", "user2user"], "default": "group"},
                "max_entity_rules": {
                    "type": "integer",
                    "minimum": MAX_ENTITY_RULES_MIN,
                    "maximum": MAX_ENTITY_RULES_MAX,
                    "default": MAX_ENTITY_RULES_DEFAULT,
                    "description": "Counts every rule, the creator's automatic ones included.",
                },
                "entity_level": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": RULE_LEVEL_MAX,
                    "default": ROOM_ENTITY_LEVEL_DEFAULT,
                    "description": "Group rooms only: the lowest levelOnEntity of the owner "
                    "entity admitted by its automatic `rw` rule. Members below it do not see "
                    "the room (unless they reach level_admin or hold a rule of their own).",
                },
            },
            # entity_level sets the level of a rule only group rooms get.
            "if": {"required": ["type"], "properties": {"type": {"const": "user2user"}}},
            "then": {"not": {"required": ["entity_level"]}},
        },
        "PutMember": {
            "type": "object",
            "additionalProperties": False,
            "required": ["permissions"],
            "description": "Exactly one of entity_UUID and userUUID (an alias for user rules: "
            "with kind entity it is refused). A UUID in any case names the same subject; it is "
            "stored and answered in lower case.",
            "oneOf": [
                {"required": ["entity_UUID"], "not": {"required": ["userUUID"]}},
                {
                    "required": ["userUUID"],
                    "not": {"required": ["entity_UUID"]},
                    "properties": {"kind": {"const": "user"}},
                },
            ],
            "properties": {
                "entity_UUID": _UUID,
                "userUUID": _UUID,
                "kind": {"enum": ["user", "entity"], "default": "user"},
                "permissions": {
                    "type": "string",
                    "pattern": "^(?!.*(.).*\\1)[rwba]{1,4}$",
                    "description": "Flags r (read), w (write), a (admin, implies r and w), "
                    "b (banned, denies all), each at most once.",
                },
                "level": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": RULE_LEVEL_MAX,
                    "default": 0,
                    "description": "For entity rules: the lowest levelOnEntity admitted.",
                },
                "invite": {
                    "type": "boolean",
                    "default": False,
                    "description": "true: a pending invitation (grants nothing until accepted).",
                },
            },
        },
        "Invitation": {
            "type": "object",
            "additionalProperties": False,
            "required": ["accepted"],
            "properties": {
                "accepted": {"type": "boolean"},
                "use_parent_entity": {
                    "type": "boolean",
                    "default": False,
                    "description": "Answer for the caller's entity rule (at or below the "
                    "caller's level) instead of the caller's user rule.",
                },
            },
        },
    }


def _paths(room_create_level: int) -> dict[str, Any]:
    room_content = {
        "type": "object",
        "required": ["room"],
        "properties": {"room": _ref("Room")},
    }
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness, and the connections the server closed itself",
                "security": [],
                "responses": _ok(
                    "Alive. `closes`: WebSocket connections this process closed itself since it "
                    "started, by close code (1006: dropped without a close handshake).",
                    {
                        "type": "object",
                        "required": ["status", "closes"],
                        "properties": {
                            "status": {"const": "ok"},
                            "closes": {
                                "type": "object",
                                "propertyNames": {"pattern": "^[0-9]{4}$"},
                                "additionalProperties": {"type": "integer", "minimum": 1},
                            },
                        },
                    },
                ),
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness of storage and broker",
                "security": [],
                "responses": {
                    **_ok(
                        "Every dependency is ready.",
                        {"type": "object", "additionalProperties": {"type": "boolean"}},
                    ),
                    "503": {
                        "description": "Some dependency is not ready; content says which.",
                        "content": {_JSON: {"schema": _envelope({"type": "object"})}},
                    },
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document (served without the envelope)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1 document.",
                        "content": {_JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/test/token": {
            "get": {
                "summary": "The caller's verified token claims",
                "responses": {
                    **_ok("Claims.", {"type": "object"}),
                    **_errors(400, 401),
                },
            }
        },
        "/rooms": {
            "post": {
                "summary": "Create a room owned by the caller's entity",
                "description": f"Needs levelOnEntity >= {room_create_level}. Also creates an "
                "accepted `rwa` user rule for the creator and, for group rooms, an accepted `rw` "
                "entity rule for the owning entity at level `entity_level` (default 100: members "
                "below it do not see the room). Answers 200, as the original.",
                "requestBody": _body(_ref("NewRoom"), {"name": "support", "level_admin": 100}),
                "responses": {
                    **_ok("Created.", room_content),
                    **_errors(400, 401, 403, 413, 415, 503),
                },
            },
            "get": {
                "summary": "The caller's rules (user rules, and entity rules at or below the "
                "caller's level), each with its room",
                "parameters": [
                    _query("accepted", {"enum": ["true", "false"]}, "Filter on acceptance."),
                    _LIMIT_ROOMS,
                    _OFFSET,
                ],
                "responses": {
                    **_ok("Rules.", {"type": "array", "items": _ref("RuleWithRoom")}),
                    **_errors(400, 401, 503),
                },
            },
        },
        "/rooms/all": {
            "get": {
                "summary": "The caller's conversation list: rooms it may read, with their state",
                "description": "Each room carries its latest message, last activity, the "
                "caller's read mark and unread count; the whole page is one database query.",
                "parameters": [
                    _query(
                        "order",
                        {"enum": ["id", "activity"], "default": "id"},
                        "`id`: by room id; `activity`: the most recently active first.",
                    ),
                    _LIMIT_ROOMS,
                    _OFFSET,
                ],
                "responses": {
                    **_ok("Rooms.", {"type": "array", "items": _ref("Conversation")}),
                    **_errors(400, 401, 503),
                },
            }
        },
        "/dm": {
            "post": {
                "summary": "The direct-message room of the caller and another user",
                "description": "The same `user2user` room whoever asks first (created on the "
                "first call), with an accepted `rw` rule for each user and no entity rule. The "
                "other user can read it at once when their token shows the caller's entity; "
                "from another entity it is a pending invitation they accept with PUT "
                "/rooms/{id}/invitation (`invited` says it is still pending). Asking for a DM "
                "one was invited to accepts it. 400 for a DM with oneself; 404 once the "
                "pair's DM was deleted.",
                "requestBody": _body(
                    _ref("OpenDm"), {"user": "7f3a2c1e-5b4d-4e8f-9a6b-0c1d2e3f4a5b"}
                ),
                "responses": {
                    **_ok(
                        "The DM room.",
                        {
                            "type": "object",
                            "required": ["room", "created", "invited"],
                            "properties": {
                                "room": _ref("Room"),
                                "created": {"type": "boolean"},
                                "invited": {"type": "boolean"},
                            },
                        },
                    ),
                    **_errors(400, 401, 404, 413, 415, 503),
                },
            }
        },
        "/rooms/{id}": {
            "parameters": [_ROOM_ID],
            "get": {
                "summary": "A room the caller may read, with the caller's flags",
                "responses": {
                    **_ok(
                        "The room.",
                        {
                            "type": "object",
                            "required": ["room", "access"],
                            "properties": {
                                "room": _ref("Room"),
                                "access": {"type": "string", "pattern": "^r?w?a?$"},
                            },
                        },
                    ),
                    **_errors(400, 401, 404, 503),
                },
            },
            "patch": {
                "summary": "Rename a room or change its level_admin or rule limit (admins)",
                "description": "Live connections are re-checked at once, as after a rule "
                "change (a higher level_admin can take the room from owner-entity members).",
                "requestBody": _body(_ref("RoomChanges"), {"name": "support desk"}),
                "responses": {
                    **_ok("The updated room.", room_content),
                    **_errors(400, 401, 403, 404, 409, 413, 415, 503),
                },
            },
            "delete": {
                "summary": "Soft-delete a room (admins); history is kept but the room is gone",
                "responses": {
                    **_ok("Deleted.", _EMPTY),
                    **_errors(400, 401, 403, 404, 503),
                },
            },
        },
        "/rooms/{id}/members": {
            "parameters": [_ROOM_ID],
            "get": {
                "summary": "The room's rules, users and entities (admins), paged",
                "description": "Entity rules first, then user rules, each by subject.",
                "parameters": [
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": PAGE_LIMIT_MAX,
                            "default": MEMBERS_LIMIT_DEFAULT,
                        },
                        "Page size.",
                    ),
                    _OFFSET,
                ],
                "responses": {
                    **_paged(
                        "Rules.",
                        _ref("Member"),
                        {"next_offset": "The offset of the next page."},
                    ),
                    **_errors(400, 401, 403, 404, 503),
                },
            },
            "put": {
                "summary": "Create or update a rule (admins)",
                "requestBody": _body(
                    _ref("PutMember"),
                    {"entity_UUID": "00000000-0000-4000-8000-0000000000c3", "permissions": "rw"},
                ),
                "responses": {
                    **_ok("Rule updated.", _ref("Rule")),
                    **_ok("Rule created.", _ref("Rule"), status="201"),
                    **_errors(400, 401, 403, 404, 413, 415, 503),
                },
            },
        },
        "/rooms/{id}/members/{uuid}": {
            "parameters": [
                _ROOM_ID,
                {
                    "name": "uuid",
                    "in": "path",
                    "required": True,
                    "schema": _UUID,
                    "description": "The rule's subject, in any case.",
                },
            ],
            "delete": {
                "summary": "Delete a subject's rules (admins); no body needed",
                "parameters": [
                    _query(
                        "kind",
                        {"enum": ["user", "entity"]},
                        "Only the rule of this kind; default: every rule of the subject.",
                    )
                ],
                "responses": {
                    **_ok("Deleted.", _EMPTY),
                    **_errors(400, 401, 403, 404, 503),
                },
            },
        },
        "/rooms/{id}/invitation": {
            "parameters": [_ROOM_ID],
            "put": {
                "summary": "Accept or decline the caller's own rule",
                "description": "Open to invitees without read access. 404 when the caller has "
                "no such rule; 403 for a ban rule, which its subject cannot change.",
                "requestBody": _body(_ref("Invitation"), {"accepted": True}),
                "responses": {
                    **_ok("The updated rule.", _ref("Rule")),
                    **_errors(400, 401, 403, 404, 413, 415, 503),
                },
            },
        },
        "/rooms/{id}/read": {
            "parameters": [_ROOM_ID],
            "post": {
                "summary": "Move the caller's read mark in a room it may read",
                "requestBody": _body(_ref("ReadMarkMove"), {"seq": 1}),
                "responses": {
                    **_ok(
                        "The mark now held (never lower than before, never past the room's "
                        "latest seq).",
                        {
                            "type": "object",
                            "required": ["room_id", "seq"],
                            "properties": {
                                "room_id": {"type": "integer"},
                                "seq": {"type": "integer"},
                            },
                        },
                    ),
                    **_errors(400, 401, 404, 413, 415, 503),
                },
            },
        },
        "/rooms/{id}/reads": {
            "parameters": [_ROOM_ID],
            "get": {
                "summary": 'Every member\'s read mark (for "seen by"), by user',
                "description": "Users holding a mark, and users named by an accepted, "
                "unbanned user rule (seq 0 until they read).",
                "responses": {
                    **_ok("Read marks.", {"type": "array", "items": _ref("ReadMark")}),
                    **_errors(400, 401, 404, 503),
                },
            },
        },
        "/rooms/{id}/messages": {
            "parameters": [_ROOM_ID],
            "get": {
                "summary": "History of a room the caller may read, oldest first",
                "description": "A date window (dateFrom/dateTo) and seq cursors (before/after) "
                "narrow each other: every bound given applies, and a window that ends before "
                "it starts is empty. With dateFrom or after: the oldest `limit` matches, and "
                "meta.next_after to page forwards. Otherwise: the latest `limit` matches, and "
                "meta.next_before to page backwards. meta.has_more says whether another page "
                "follows.",
                "parameters": [
                    _query(
                        "dateFrom",
                        _INSTANT,
                        "Date YYYY-MM-DD (from 00:00 UTC that day) or date and time "
                        "YYYY-MM-DDThh:mm[:ss[.ffffff]] with Z, +hh:mm, -hh:mm or no zone "
                        "(UTC); inclusive.",
                    ),
                    _query(
                        "dateTo",
                        _INSTANT,
                        "Date (to the end of that UTC day) or date and time, as dateFrom; "
                        "inclusive.",
                    ),
                    _query("before", _SEQ, "Exclusive seq bound."),
                    _query("after", _SEQ, "Exclusive seq bound."),
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": PAGE_LIMIT_MAX,
                            "default": HISTORY_LIMIT_DEFAULT,
                        },
                        "Page size.",
                    ),
                ],
                "responses": {
                    **_paged(
                        "Messages, oldest first.",
                        _ref("Message"),
                        {
                            "next_before": "Pass as `before` for the older page (pages read "
                            "backwards).",
                            "next_after": "Pass as `after` for the newer page (pages read "
                            "forwards, with dateFrom or after).",
                        },
                    ),
                    **_errors(400, 401, 404, 503),
                },
            },
        },
    }


def build_openapi(*, room_create_level: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP side-port, as served on ``/openapi.json``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nanomsg HTTP API",
            "version": "1.0.0",
            "description": "Side-port for partner backends. Every answer except this document "
            "is an envelope `{meta: {code, message, reason?}, content}`. Unknown body fields "
            "and unknown query parameters are refused with 400. No method override.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(room_create_level),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": _schemas(),
            "responses": {
                f"E{code}": {
                    "description": text,
                    "content": {_JSON: {"schema": _ref("Error")}},
                }
                for code, text in _ERROR_TEXT.items()
            },
        },
    }

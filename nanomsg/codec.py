"""Frames <-> events. All validation of incoming frames happens here, once; the session never
sees a raw dict. Server frames that never change are encoded once at import.

``decode`` never raises, whatever the text: valid JSON always becomes a command, and a field
the command reads that is out of range, of the wrong type or not storable gets ``BADARGS``
naming it, while fields the command does not read are ignored whatever they hold.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from nanomsg.auth import canonical_uuid
from nanomsg.events import (
    BadArgs,
    BadJson,
    Command,
    DeleteMessage,
    EditMessage,
    GetPastMessages,
    MarkRead,
    OpenDm,
    Quit,
    SelectRoom,
    SendMessage,
    Subscribe,
    Token,
    TooLarge,
    Unknown,
    Unsubscribe,
)
from nanomsg.models import Message

MAX_ID = 2**63 - 1
MAX_ID_DIGITS = len(str(MAX_ID))  # a longer digit string is out of range without parsing it
HISTORY_DEFAULT = 50
HISTORY_MAX = 500
CLIENT_ID_MAX = 64


def _frame(kind: str, data: str, **extra: Any) -> bytes:
    return orjson.dumps({"type": kind, "data": data, **extra})


# Byte-for-byte the original's frames (protocol-baseline.md), except NOTAUTHORIZED, which the
# original sent without its closing brace.
START = _frame("query", "START?")
TOKEN_Q = _frame("query", "TOKEN?")
COMMAND_Q = _frame("query", "COMMAND?")
SELECTROOM_Q = _frame("query", "SELECTROOM?")
READY = _frame("status", "READY")
BADAUTH = _frame("status", "BADAUTH")
BADJSON = _frame("status", "BADJSON")
CONNECTED = _frame("status", "CONNECTED")
NOTAUTHORIZED = _frame("status", "NOTAUTHORIZED")
TOOLARGE = _frame("status", "TOOLARGE")
UNAVAILABLE = _frame("status", "UNAVAILABLE")
EXPIRED = _frame("status", "EXPIRED")


def badargs(reason: str) -> bytes:
    return _frame("status", "BADARGS", reason=reason)


def history_end(count: int) -> bytes:
    return _frame("status", "HISTORYEND", count=count)


def resumed(room_id: int, count: int, complete: bool) -> bytes:
    """Ends a resume replay; live messages follow."""
    return _frame("status", "RESUMED", room_id=room_id, count=count, complete=complete)


def subscribed(room_id: int) -> bytes:
    return _frame("status", "SUBSCRIBED", room_id=room_id)


def unsubscribed(room_id: int) -> bytes:
    return _frame("status", "UNSUBSCRIBED", room_id=room_id)


def too_many(room_id: int) -> bytes:
    """A subscription past ``--max-subscriptions``."""
    return _frame("status", "TOOMANY", room_id=room_id)


def revoked(room_id: int) -> bytes:
    """Sent when a live connection loses read access to its room."""
    return _frame("status", "NOTAUTHORIZED", room_id=room_id)


def dm_opened(room_id: int) -> bytes:
    """Answers ``open_dm``: the DM's room id."""
    return _frame("status", "DM", room_id=room_id)


def read_mark(room_id: int, seq: int) -> bytes:
    """Answers ``read``: the mark the user now holds in the room."""
    return _frame("status", "READMARK", room_id=room_id, seq=seq)


def receipt(room_id: int, user: str, seq: int) -> dict[str, Any]:
    """A read receipt as the object the hub and the relay carry (an ephemeral event of the
    room, sent as it is: ``{"type":"read","data":{...}}``)."""
    return {"type": "read", "data": {"room_id": room_id, "user": user, "seq": seq}}


def signal_frame(data: dict[str, Any]) -> bytes:
    """An ephemeral room event (a read receipt) as sent: its object, encoded once."""
    return orjson.dumps(data)


def user_event_frame(data: dict[str, Any]) -> bytes:
    """An event about the connection's own user: ``{"type":"user_event","data":{...}}``."""
    return orjson.dumps({"type": "user_event", "data": data})


def message_frame(message: Message) -> bytes:
    """A live room message (and the echo that acknowledges a send)."""
    return orjson.dumps({"type": "message", "data": message.to_json()})


def history_frame(message: Message) -> bytes:
    """A stored message sent again on request (``get_past_messages`` or a resume replay): the
    live frame's ``data`` plus ``"history": true``, so a client can tell it from new traffic."""
    data = message.to_json()
    data["history"] = True
    return orjson.dumps({"type": "message", "data": data})


_EVENT_TYPES = {"message": "message", "edit": "edited", "delete": "deleted"}


def event_frame(event: Message) -> bytes:
    """A live room event: ``message`` (as ``message_frame``), ``edited`` or ``deleted``, its
    ``data`` from ``Message.event_json``. The hub encodes it once for the whole room."""
    if event.kind == "message":
        return message_frame(event)
    return orjson.dumps({"type": _EVENT_TYPES[event.kind], "data": event.event_json()})


def event_history_frame(event: Message) -> bytes:
    """A stored room event sent again (history page, resume replay): the live frame's
    ``data`` plus ``"history": true``."""
    if event.kind == "message":
        return history_frame(event)
    data = event.event_json()
    data["history"] = True
    return orjson.dumps({"type": _EVENT_TYPES[event.kind], "data": data})


def _int_field(obj: dict[str, Any], key: str, *, minimum: int, digits_ok: bool) -> int | None:
    """An integer field (bool is not one); a string of digits only where the original took it."""
    value = obj[key]
    if isinstance(value, str) and digits_ok and value.isascii() and value.isdigit():
        # int() refuses strings of over 4300 digits (it raises); anything past 19 significant
        # digits is out of range anyway.
        digits = value.lstrip("0") or "0"  # int() counts leading zeros towards its limit
        if len(digits) > MAX_ID_DIGITS:
            return None
        value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not minimum <= value <= MAX_ID:
        return None
    return value


def _text_problem(value: str, lenient: bool) -> str | None:
    """Why a string cannot be stored and sent on, or None. PostgreSQL refuses U+0000 in text,
    and a lone surrogate (``"\\ud800"`` is valid JSON) cannot be encoded as UTF-8 at all.
    Only the fallback parser (``lenient``) lets a lone surrogate through; orjson refuses them,
    so text it parsed needs no encoding test (which would cost ~4 us per 1 000 characters)."""
    if "\x00" in value:
        return "must not contain U+0000"
    if lenient and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must not contain a lone surrogate"
    return None


def _lenient_int(digits: str) -> int | float:
    """JSON integers for the fallback parser: beyond 20 digits they become floats (possibly
    infinite), as orjson reads them, instead of raising in int() past 4300 digits."""
    return int(digits) if len(digits) <= 20 else float(digits)


def _not_json(constant: str) -> None:
    """NaN and Infinity are not JSON; the standard library would accept them."""
    raise ValueError(f"{constant} is not JSON")


NOT_JSON = object()


def loads_json(data: str) -> tuple[object, bool]:
    """Parse JSON: (the value, or ``NOT_JSON`` when it is not JSON; whether the lenient
    fallback parser read it).

    orjson refuses some valid JSON: numbers beyond a double (``1e400``, long integers) and
    escaped lone surrogates (``"\\ud800"``). Those are read again with the standard library,
    so that only the field holding them is refused, and only if the command reads it. The
    second parse costs nothing on the usual path: it runs only for text orjson refused.
    """
    try:
        return orjson.loads(data), False
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data, parse_int=_lenient_int, parse_constant=_not_json), True
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return NOT_JSON, True


def decode(data: str, *, max_content: int) -> Command:
    """Turn one text frame into a command; never raises."""
    obj, lenient = loads_json(data)
    if not isinstance(obj, dict):
        return BadJson()
    kind = obj.get("type")
    if not isinstance(kind, str):
        return Unknown()
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return Unknown()
    return decoder(obj, max_content, lenient)


def _token(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    # Only a JSON true asks for the user event stream; anything else leaves it off (a token
    # command is never refused for a field besides its content).
    return Token(obj.get("content"), obj.get("user_events") is True)


def _select_room(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    if "room_id" not in obj:
        return BadArgs("select_room", "room_id is required")
    room_id = _int_field(obj, "room_id", minimum=1, digits_ok=True)
    if room_id is None:
        return BadArgs("select_room", "room_id must be a positive integer")
    since = None
    if obj.get("since") is not None:
        since = _int_field(obj, "since", minimum=0, digits_ok=False)
        if since is None:
            return BadArgs("select_room", "since must be an integer seq >= 0")
    return SelectRoom(room_id, since)


def _room_field(obj: dict[str, Any], command: str) -> int | BadArgs | None:
    """The optional ``room_id`` of a command acting on a room (None: the selected room)."""
    if obj.get("room_id") is None:
        return None
    room_id = _int_field(obj, "room_id", minimum=1, digits_ok=False)
    if room_id is None:
        return BadArgs(command, "room_id must be a positive integer")
    return room_id


def _subscribe(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    if obj.get("room_id") is None:
        return BadArgs("subscribe", "room_id is required")
    room_id = _room_field(obj, "subscribe")
    if not isinstance(room_id, int):
        return room_id or BadArgs("subscribe", "room_id is required")
    since = None
    if obj.get("since") is not None:
        since = _int_field(obj, "since", minimum=0, digits_ok=False)
        if since is None:
            return BadArgs("subscribe", "since must be an integer seq >= 0")
    return Subscribe(room_id, since)


def _unsubscribe(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    room_id = _room_field(obj, "unsubscribe")
    if not isinstance(room_id, int):
        return room_id or BadArgs("unsubscribe", "room_id is required")
    return Unsubscribe(room_id)


def _content(
    obj: dict[str, Any], command: str, max_content: int, lenient: bool
) -> str | BadArgs | TooLarge:
    """The ``content`` of a message or edit: a non-empty storable string within the limit."""
    content = obj.get("content")
    if not isinstance(content, str):
        return BadArgs(command, "content must be a string")
    if not content:
        return BadArgs(command, "content must not be empty")
    if len(content) > max_content:
        return TooLarge()
    problem = _text_problem(content, lenient)
    if problem is not None:
        return BadArgs(command, f"content {problem}")
    return content


def _target_seq(obj: dict[str, Any], command: str) -> int | BadArgs:
    """The ``seq`` of the message an edit or delete acts on."""
    if obj.get("seq") is None:
        return BadArgs(command, "seq is required")
    seq = _int_field(obj, "seq", minimum=1, digits_ok=False)
    if seq is None:
        return BadArgs(command, "seq must be a positive integer")
    return seq


def _edit(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    room_id = _room_field(obj, "edit")
    if isinstance(room_id, BadArgs):
        return room_id
    seq = _target_seq(obj, "edit")
    if isinstance(seq, BadArgs):
        return seq
    content = _content(obj, "edit", max_content, lenient)
    if not isinstance(content, str):
        return content
    return EditMessage(seq, content, room_id)


def _delete(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    room_id = _room_field(obj, "delete")
    if isinstance(room_id, BadArgs):
        return room_id
    seq = _target_seq(obj, "delete")
    if isinstance(seq, BadArgs):
        return seq
    return DeleteMessage(seq, room_id)


def _read(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    room_id = _room_field(obj, "read")
    if isinstance(room_id, BadArgs):
        return room_id
    if obj.get("seq") is None:
        return BadArgs("read", "seq is required")
    seq = _int_field(obj, "seq", minimum=0, digits_ok=False)
    if seq is None:
        return BadArgs("read", "seq must be an integer >= 0")
    return MarkRead(seq, room_id)


def _open_dm(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    if obj.get("user") is None:
        return BadArgs("open_dm", "user is required")
    user = canonical_uuid(obj["user"])
    if user is None:
        return BadArgs("open_dm", "user must be a UUID")
    return OpenDm(user)


def message_command(obj: dict[str, Any], max_content: int) -> Command:
    """The ``message`` command an object stands for (``SendMessage``, or ``BadArgs`` /
    ``TooLarge``): the one check of content and client_id, which the HTTP side-port's
    ``POST /rooms/{id}/messages`` calls too, so both transports refuse the same text."""
    return _message(obj, max_content, True)


def _message(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    room_id = _room_field(obj, "message")
    if isinstance(room_id, BadArgs):
        return room_id
    content = _content(obj, "message", max_content, lenient)
    if not isinstance(content, str):
        return content
    client_id = obj.get("client_id")
    if client_id is not None:
        if not isinstance(client_id, str) or not 1 <= len(client_id) <= CLIENT_ID_MAX:
            return BadArgs("message", f"client_id must be a string of 1-{CLIENT_ID_MAX} characters")
        problem = _text_problem(client_id, lenient)
        if problem is not None:
            return BadArgs("message", f"client_id {problem}")
    return SendMessage(content, client_id, room_id)


def _get_past_messages(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    room_id = _room_field(obj, "get_past_messages")
    if isinstance(room_id, BadArgs):
        return room_id
    limit = HISTORY_DEFAULT
    if obj.get("limit") is not None:
        got = _int_field(obj, "limit", minimum=1, digits_ok=False)
        if got is None or got > HISTORY_MAX:
            return BadArgs("get_past_messages", f"limit must be an integer from 1 to {HISTORY_MAX}")
        limit = got
    before = None
    if obj.get("before") is not None:
        before = _int_field(obj, "before", minimum=1, digits_ok=False)
        if before is None:
            return BadArgs("get_past_messages", "before must be a positive integer seq")
    return GetPastMessages(limit, before, room_id)


def _quit(obj: dict[str, Any], max_content: int, lenient: bool) -> Command:
    return Quit()


_DECODERS = {
    "token": _token,
    "select_room": _select_room,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "message": _message,
    "get_past_messages": _get_past_messages,
    "edit": _edit,
    "delete": _delete,
    "read": _read,
    "open_dm": _open_dm,
    "quit": _quit,
}

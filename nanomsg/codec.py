"""Frames <-> events. All validation of incoming frames happens here, once; the session never
sees a raw dict. Server frames that never change are encoded once at import.
"""

from __future__ import annotations

from typing import Any

import orjson

from nanomsg.events import (
    BadArgs,
    BadJson,
    Command,
    GetPastMessages,
    Quit,
    SelectRoom,
    SendMessage,
    Token,
    TooLarge,
    Unknown,
)
from nanomsg.models import Message

MAX_ID = 2**63 - 1
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


def revoked(room_id: int) -> bytes:
    """Sent when a live connection loses read access to its room."""
    return _frame("status", "NOTAUTHORIZED", room_id=room_id)


def message_frame(message: Message) -> bytes:
    return orjson.dumps({"type": "message", "data": message.to_json()})


def _int_field(obj: dict[str, Any], key: str, *, minimum: int, digits_ok: bool) -> int | None:
    """An integer field (bool is not one); a string of digits only where the original took it."""
    value = obj[key]
    if isinstance(value, str) and digits_ok and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not minimum <= value <= MAX_ID:
        return None
    return value


def decode(data: str, *, max_content: int) -> Command:
    """Turn one text frame into a command; never raises."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return BadJson()
    if not isinstance(obj, dict):
        return BadJson()
    kind = obj.get("type")
    if not isinstance(kind, str):
        return Unknown()
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return Unknown()
    return decoder(obj, max_content)


def _token(obj: dict[str, Any], max_content: int) -> Command:
    return Token(obj.get("content"))


def _select_room(obj: dict[str, Any], max_content: int) -> Command:
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


def _message(obj: dict[str, Any], max_content: int) -> Command:
    content = obj.get("content")
    if not isinstance(content, str):
        return BadArgs("message", "content must be a string")
    if not content:
        return BadArgs("message", "content must not be empty")
    if len(content) > max_content:
        return TooLarge()
    client_id = obj.get("client_id")
    if client_id is not None and (
        not isinstance(client_id, str) or not 1 <= len(client_id) <= CLIENT_ID_MAX
    ):
        return BadArgs("message", f"client_id must be a string of 1-{CLIENT_ID_MAX} characters")
    return SendMessage(content, client_id)


def _get_past_messages(obj: dict[str, Any], max_content: int) -> Command:
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
    return GetPastMessages(limit, before)


def _quit(obj: dict[str, Any], max_content: int) -> Command:
    return Quit()


_DECODERS = {
    "token": _token,
    "select_room": _select_room,
    "message": _message,
    "get_past_messages": _get_past_messages,
    "quit": _quit,
}

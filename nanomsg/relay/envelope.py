"""The relay envelope: the one payload format of every relay, for every kind of traffic.

A payload is one JSON object naming the process that sent it first, so a receiver recognises
its own echoes from the first bytes without decoding the rest::

    {"n": "<node>", "r": 7, "m": [[id, seq, emitter, entity, content, created_at, client_id], ...],
     "s": [{...}, ...]}                                  on a room's channel
    {"n": "<node>", "c": [7, 12]}                          on the control channel
    {"n": "<node>", "u": [["<user>", {...}], ...]}         on the control channel

- ``m``: stored events of room ``r`` (messages, edits, deletions), in the order they were
  published (receivers order by ``seq`` anyway). One array per event, positional, with
  ``created_at`` in RFC 3339 with microseconds and its UTC offset, so the event is rebuilt
  exactly. A plain message has the 7 fields above; any other event appends ``kind``
  (``"edit"``, ``"delete"``, or ``"message"`` for a system message), ``target_seq`` (the
  message edited or deleted, null for a message) and ``system``. Each event is encoded once,
  by ``encode_message``, and the envelope is joined from those bytes.
- ``s``: signals of room ``r``: ephemeral JSON objects (no seq, never stored), handed as they
  are to the receivers' signal handler.
- ``c``: room-change notices: ids of rooms whose rules changed (or that were deleted).
- ``u``: user events: ephemeral objects (no seq, never stored) for every connection of a
  user, each a pair of the user's UUID and the event's ``data``. They travel on the control
  channel, which every process subscribes to, so a user event costs one PUBLISH and reaches
  every process whether or not it holds a connection of that user.

Every key but ``n`` is optional; a payload may carry several kinds. The payloads of the
previous format (one message ``{"n","id","r","s",...}`` or one notice
``{"n","room_changed":id}`` per payload) are still understood, so processes of both formats
can share a broker while a deployment is upgraded (see docs/operations.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from nanomsg.models import Message
from nanomsg.relay.base import RelayHandlers

EVENT_KINDS = ("message", "edit", "delete")  # the stored room events an envelope carries


@dataclass(slots=True)
class Envelope:
    """A decoded payload."""

    node: str
    room_id: int | None = None
    messages: list[Message] = field(default_factory=list)
    signals: list[dict[str, Any]] = field(default_factory=list)
    notices: list[int] = field(default_factory=list)
    user_events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def header(node: str) -> bytes:
    """The first bytes of every payload ``node`` sends (``node`` is a hex id: no escaping)."""
    return b'{"n":"' + node.encode() + b'"'


def encode_message(message: Message) -> bytes:
    """One room event as the positional array ``m`` holds: the only per-event encoding.

    A plain message is the 7 fields it always was; any other event (an edit, a delete, a
    system message) adds ``kind``, ``target_seq`` and ``system``, so the receiving process
    rebuilds the same frame."""
    fields: tuple[Any, ...] = (
        message.id,
        message.seq,
        message.emitter,
        message.entity,
        message.content,
        message.created_at,  # orjson writes RFC 3339 with microseconds, in C
        message.client_id,
    )
    if message.kind != "message" or message.system:
        fields += (message.kind, message.target_seq, message.system)
    return orjson.dumps(fields)


def room_payload(
    head: bytes, room_id: int, messages: list[bytes], signals: list[bytes] | None = None
) -> bytes:
    """A room channel payload from ``header(node)`` and already-encoded messages and signals."""
    parts = [head, b',"r":%d' % room_id]
    if messages:
        parts += [b',"m":[', b",".join(messages), b"]"]
    if signals:
        parts += [b',"s":[', b",".join(signals), b"]"]
    parts.append(b"}")
    return b"".join(parts)


def control_payload(head: bytes, rooms: list[int]) -> bytes:
    """A control channel payload carrying room-change notices."""
    return head + b',"c":' + orjson.dumps(rooms) + b"}"


def user_payload(head: bytes, events: list[bytes]) -> bytes:
    """A control channel payload carrying user events, each encoded by ``encode_user_event``."""
    return head + b',"u":[' + b",".join(events) + b"]}"


def encode_user_event(user: str, data: dict[str, Any]) -> bytes:
    """One user event as the pair ``u`` holds."""
    return orjson.dumps((user, data))


def from_node(data: bytes, head: bytes) -> bool:
    """Whether a payload was sent by the node whose ``header`` is ``head`` (an own echo)."""
    return data.startswith(head)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _message(room_id: int, row: Any) -> Message:
    if not isinstance(row, list) or len(row) not in (7, 10):
        raise TypeError("a room event is an array of 7 or 10")
    msg_id, seq, emitter, entity, content, created_at, client_id = row[:7]
    if client_id is not None:
        client_id = _str(client_id)
    kind, target_seq, system = ("message", None, False) if len(row) == 7 else row[7:]
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown room event kind {kind!r}")
    if target_seq is not None:
        target_seq = _int(target_seq)
    if (kind == "message") != (target_seq is None):
        raise ValueError("an edit or delete names its target_seq, a message none")
    if not isinstance(system, bool):
        raise TypeError("system is a boolean")
    return Message(
        id=_int(msg_id),
        room_id=room_id,
        seq=_int(seq),
        emitter=_str(emitter),
        entity=_str(entity),
        content=_str(content),
        created_at=datetime.fromisoformat(_str(created_at)),
        client_id=client_id,
        kind=kind,
        target_seq=target_seq,
        system=system,
    )


def _legacy_message(obj: dict[str, Any]) -> Message:
    """The previous format: one message per payload, named fields."""
    client_id = obj.get("k")
    return Message(
        id=_int(obj["id"]),
        room_id=_int(obj["r"]),
        seq=_int(obj["s"]),
        emitter=_str(obj["e"]),
        entity=_str(obj["en"]),
        content=_str(obj["c"]),
        created_at=datetime.fromisoformat(_str(obj["t"])),
        client_id=None if client_id is None else _str(client_id),
    )


def decode(data: bytes | str) -> Envelope:
    """A payload, checked field by field; raises ValueError, TypeError or KeyError when it is
    not one (the relay logs it and goes on)."""
    obj = orjson.loads(data)
    if not isinstance(obj, dict):
        raise TypeError(f"expected an object, got {type(obj).__name__}")
    out = Envelope(node=_str(obj["n"]))
    if "room_changed" in obj:  # previous format: one notice
        out.notices.append(_int(obj["room_changed"]))
        return out
    if "id" in obj:  # previous format: one message
        message = _legacy_message(obj)
        out.room_id = message.room_id
        out.messages.append(message)
        return out
    notices = obj.get("c", [])
    if not isinstance(notices, list):
        raise TypeError("c is an array of room ids")
    out.notices = [_int(room) for room in notices]
    pairs = obj.get("u", [])
    if not isinstance(pairs, list):
        raise TypeError("u is an array of [user, event] pairs")
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[1], dict):
            raise TypeError("a user event is a [user, object] pair")
        out.user_events.append((_str(pair[0]), pair[1]))
    rows, signals = obj.get("m", []), obj.get("s", [])
    if not isinstance(rows, list) or not isinstance(signals, list):
        raise TypeError("m and s are arrays")
    if rows or signals:
        room_id = out.room_id = _int(obj["r"])
        out.messages = [_message(room_id, row) for row in rows]
        for signal in signals:
            if not isinstance(signal, dict):
                raise TypeError("a signal is an object")
        out.signals = signals
    return out


def hand_over(data: bytes, head: bytes, handlers: RelayHandlers) -> None:
    """Hand a received payload to the handlers, unless it is the receiver's own echo (its
    process delivered it locally before publishing). Raises what ``decode`` raises."""
    if from_node(data, head):
        return
    envelope = decode(data)
    for room_id in envelope.notices:
        handlers.room_changed(room_id)
    for message in envelope.messages:
        handlers.message(message)
    if envelope.user_events and handlers.user_event is not None:
        for user, event in envelope.user_events:
            handlers.user_event(user, event)
    if envelope.signals and envelope.room_id is not None and handlers.signal is not None:
        for signal in envelope.signals:
            handlers.signal(envelope.room_id, signal)

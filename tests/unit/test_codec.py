"""Decoding client frames into commands, and the exact bytes of the server's fixed frames."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanomsg import codec
from nanomsg.auth import Verifier, mint
from nanomsg.clock import FakeClock
from nanomsg.events import (
    BadArgs,
    BadJson,
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
from nanomsg.session import Limits, Session

COMMAND_TYPES = (
    BadArgs,
    BadJson,
    DeleteMessage,
    EditMessage,
    Subscribe,
    Unsubscribe,
    GetPastMessages,
    MarkRead,
    OpenDm,
    Quit,
    SelectRoom,
    SendMessage,
    Token,
    TooLarge,
    Unknown,
)


def short_id(value: object) -> str:
    """A test id that stays readable for 5 000-character parameters."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} chars)"


def decode(text: str, max_content: int = 10) -> object:
    return codec.decode(text, max_content=max_content)


def test_fixed_frames_are_byte_for_byte_the_originals() -> None:
    assert codec.START == b'{"type":"query","data":"START?"}'
    assert codec.READY == b'{"type":"status","data":"READY"}'
    assert codec.BADAUTH == b'{"type":"status","data":"BADAUTH"}'
    assert codec.TOKEN_Q == b'{"type":"query","data":"TOKEN?"}'
    assert codec.COMMAND_Q == b'{"type":"query","data":"COMMAND?"}'
    assert codec.SELECTROOM_Q == b'{"type":"query","data":"SELECTROOM?"}'
    assert codec.CONNECTED == b'{"type":"status","data":"CONNECTED"}'
    assert codec.BADJSON == b'{"type":"status","data":"BADJSON"}'


def test_notauthorized_is_valid_json_unlike_the_original() -> None:
    assert codec.NOTAUTHORIZED == b'{"type":"status","data":"NOTAUTHORIZED"}'


@pytest.mark.parametrize("text", ["{not json", "null", "[]", "1", '"token"', "", "true"])
def test_non_objects_and_garbage_are_badjson(text: str) -> None:
    assert decode(text) == BadJson()


@pytest.mark.parametrize("text", ['{"type":"nope"}', '{"content":"no type"}', '{"type":3}'])
def test_unknown_or_missing_type_is_unknown(text: str) -> None:
    assert decode(text) == Unknown()


def test_token_passes_content_through_for_the_verifier() -> None:
    assert decode('{"type":"token","content":"a.b.c"}') == Token("a.b.c")
    assert decode('{"type":"token"}') == Token(None)


@pytest.mark.parametrize(
    ("raw", "room"), [("1", 1), ('"42"', 42), ("9223372036854775807", 2**63 - 1)]
)
def test_select_room_accepts_integers_and_digit_strings(raw: str, room: int) -> None:
    assert decode(f'{{"type":"select_room","room_id":{raw}}}') == SelectRoom(room)


@pytest.mark.parametrize(
    "raw", ['"abc"', "0", "-1", "1.5", "true", "null", "[]", "9223372036854775808"]
)
def test_select_room_rejects_non_positive_integers(raw: str) -> None:
    got = decode(f'{{"type":"select_room","room_id":{raw}}}')
    assert isinstance(got, BadArgs) and "room_id" in got.reason


def test_select_room_since_is_an_optional_non_negative_seq() -> None:
    assert decode('{"type":"select_room","room_id":3,"since":0}') == SelectRoom(3, 0)
    assert decode('{"type":"select_room","room_id":3,"since":null}') == SelectRoom(3, None)
    for bad in ('"5"', "-1", "1.5", "true"):
        got = decode(f'{{"type":"select_room","room_id":3,"since":{bad}}}')
        assert isinstance(got, BadArgs) and "since" in got.reason, bad


def test_select_room_without_room_id_is_badargs() -> None:
    assert decode('{"type":"select_room"}') == BadArgs("select_room", "room_id is required")


def test_message_content_rules() -> None:
    assert decode('{"type":"message","content":"hi","extra":1}') == SendMessage("hi", None)
    assert decode('{"type":"message","content":"hi","client_id":"c-1"}') == SendMessage("hi", "c-1")
    for bad in ("12345", "null", '{"a":1}', "[1]", '""'):
        got = decode(f'{{"type":"message","content":{bad}}}')
        assert isinstance(got, BadArgs) and "content" in got.reason, bad
    assert isinstance(decode('{"type":"message"}'), BadArgs)


def test_content_limit_counts_code_points_not_bytes() -> None:
    assert decode('{"type":"message","content":"éééééééééé"}') == SendMessage("é" * 10, None)
    assert decode('{"type":"message","content":"ééééééééééé"}') == TooLarge()
    assert decode('{"type":"message","content":"🙂🙂🙂🙂🙂🙂🙂🙂🙂🙂"}') == SendMessage(
        "🙂" * 10, None
    )


@pytest.mark.parametrize("client_id", ['""', "5", '"' + "x" * 65 + '"'])
def test_bad_client_id_is_badargs(client_id: str) -> None:
    got = decode(f'{{"type":"message","content":"a","client_id":{client_id}}}')
    assert isinstance(got, BadArgs) and "client_id" in got.reason


def test_get_past_messages_defaults_and_bounds() -> None:
    assert decode('{"type":"get_past_messages"}') == GetPastMessages(50, None)
    assert decode('{"type":"get_past_messages","limit":500,"before":9}') == GetPastMessages(500, 9)
    for bad in ('"limit":0', '"limit":501', '"limit":"5"', '"before":0', '"before":"x"'):
        assert isinstance(decode(f'{{"type":"get_past_messages",{bad}}}'), BadArgs), bad


def test_quit() -> None:
    assert decode('{"type":"quit"}') == Quit()


def test_iso_utc_has_milliseconds_a_z_and_converts_other_zones() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from nanomsg.clock import iso_utc

    assert iso_utc(datetime(2026, 3, 1, 12, 0, 5, 123456, tzinfo=UTC)) == "2026-03-01T12:00:05.123Z"
    paris = timezone(timedelta(hours=2))
    assert (
        iso_utc(datetime(2026, 3, 1, 14, 0, 0, 999999, tzinfo=paris)) == "2026-03-01T12:00:00.999Z"
    )


# -- content that cannot be stored, and valid JSON orjson alone would refuse -------------------


@pytest.mark.parametrize(
    ("field", "raw", "reason"),
    [
        ("content", r'"a\u0000b"', "content must not contain U+0000"),
        ("content", r'"\ud800"', "content must not contain a lone surrogate"),
        ("content", r'"ok \udfff then"', "content must not contain a lone surrogate"),
        ("client_id", r'"c\u0000"', "client_id must not contain U+0000"),
        ("client_id", r'"\udc00"', "client_id must not contain a lone surrogate"),
    ],
)
def test_text_no_storage_can_keep_is_badargs_naming_the_field(
    field: str, raw: str, reason: str
) -> None:
    fields = {"content": '"hello"', field: raw}
    text = '{"type":"message",' + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    assert decode(text, max_content=100) == BadArgs("message", reason)


@pytest.mark.parametrize(
    "unread",
    ["1e400", "-1e400", "1" * 5000, r'"\ud800"', r'{"deep":[1e999]}', r'"\u0000"'],
    ids=short_id,
)
def test_fields_a_command_does_not_read_are_ignored_whatever_they_hold(unread: str) -> None:
    assert decode(f'{{"type":"message","content":"hi","x":{unread}}}') == SendMessage("hi", None)
    assert decode(f'{{"type":"select_room","room_id":4,"x":{unread}}}') == SelectRoom(4)
    assert decode(f'{{"type":"quit","content":{unread}}}') == Quit()
    assert decode(f'{{"type":"get_past_messages","x":{unread}}}') == GetPastMessages(50, None)
    assert decode(f'{{"type":"nope","x":{unread}}}') == Unknown()


@pytest.mark.parametrize(
    "huge", ["1e400", "-1e400", "1E+999", "1" * 5000, "-" + "1" * 5000], ids=short_id
)
def test_numbers_beyond_a_double_in_a_read_field_are_badargs_for_that_field(huge: str) -> None:
    for command, field in [
        ("select_room", "room_id"),
        ("get_past_messages", "limit"),
        ("get_past_messages", "before"),
        ("message", "content"),
        ("message", "client_id"),
    ]:
        extra = ',"content":"x"' if field == "client_id" else ""
        got = decode(f'{{"type":"{command}","{field}":{huge}{extra}}}')
        assert isinstance(got, BadArgs) and got.reason.startswith(field), (command, field)
    got = decode(f'{{"type":"select_room","room_id":1,"since":{huge}}}')
    assert isinstance(got, BadArgs) and got.reason.startswith("since")


def test_a_lone_surrogate_type_or_token_is_not_a_json_error() -> None:
    assert decode(r'{"type":"\ud800"}') == Unknown()
    assert decode(r'{"type":"token","content":"\ud800"}') == Token("\ud800")


@pytest.mark.parametrize(
    "digits", ["1" * 5000, "9" * 20, "9223372036854775808", "0" * 5000], ids=short_id
)
def test_room_id_digit_strings_of_any_length_are_badargs_not_a_crash(digits: str) -> None:
    assert decode(f'{{"type":"select_room","room_id":"{digits}"}}') == BadArgs(
        "select_room", "room_id must be a positive integer"
    )


def test_room_id_digit_strings_with_leading_zeros_are_read() -> None:
    assert decode(f'{{"type":"select_room","room_id":"{"0" * 5000}42"}}') == SelectRoom(42)


@pytest.mark.parametrize(
    "text", ["NaN", '{"type":"quit","x":NaN}', "[Infinity]", '{"a":-Infinity}']
)
def test_nan_and_infinity_are_not_json(text: str) -> None:
    assert decode(text) == BadJson()


def test_nesting_beyond_what_the_parsers_follow_is_badjson_not_a_crash() -> None:
    assert decode("[" * 5000 + "]" * 5000) == BadJson()
    assert decode('{"type":"quit","x":' + "[" * 5000 + "]" * 5000 + "}") == BadJson()


def test_history_frames_add_history_true_to_the_live_frame() -> None:
    from datetime import UTC, datetime

    from nanomsg.models import Message

    msg = Message(1, 7, 3, "u", "e", "hi", datetime(2026, 1, 1, tzinfo=UTC), "c")
    live = orjson.loads(codec.message_frame(msg))
    assert live == {"type": "message", "data": msg.to_json()}
    assert orjson.loads(codec.history_frame(msg)) == {
        "type": "message",
        "data": {**msg.to_json(), "history": True},
    }


# -- decode never raises: property-based ---------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON number written out as is: beyond a double, or longer than int() parses."""

    text: str


ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates and NUL included
RAW_NUMBERS = st.one_of(
    st.sampled_from(["1e400", "-1e400", "1E+999", "0.0", "-0", "1e-400", "12.50"]),
    st.sampled_from([19, 20, 21, 400, 4300, 4301, 6000]).map(lambda n: Raw("9" * n)),
).map(lambda v: v if isinstance(v, Raw) else Raw(v))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(ANY_CHAR, max_size=30),
    st.from_regex(r"\A[0-9]{1,40}\Z"),  # digit strings, which some fields accept
    RAW_NUMBERS,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(ANY_CHAR, max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)
FIELDS = ["type", "content", "room_id", "since", "limit", "before", "client_id", "seq", "user"]
COMMANDS = [
    "token",
    "select_room",
    "subscribe",
    "unsubscribe",
    "message",
    "get_past_messages",
    "edit",
    "delete",
    "read",
    "open_dm",
    "quit",
]


def dump(value: object) -> str:
    """JSON text for ``value`` (``Raw`` numbers verbatim, surrogates as escapes)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)  # ensure_ascii: "\ud800" comes out as an escape


SESSION_SECRET = "unit-secret-0123456789abcdef-0123456789"
SESSION_CLOCK = FakeClock(now=1_800_000_000)
SESSION_TOKEN = Token(
    mint(
        secret=SESSION_SECRET,
        user=str(uuid.uuid4()),
        entity=str(uuid.uuid4()),
        level=100,
        now=SESSION_CLOCK.wall(),
    )
)


def session_in(state: str) -> Session:
    verifier = Verifier.from_material(clock=SESSION_CLOCK, secret=SESSION_SECRET)
    session = Session(verifier, SESSION_CLOCK, Limits())
    session.start()
    if state != "AWAIT_TOKEN":
        session.receive(SESSION_TOKEN)
    return session


def check_command(command: object) -> None:
    """What a decoded command may be, and what the session makes of it: never an exception,
    and a send only with content every store keeps and orjson writes."""
    assert isinstance(command, COMMAND_TYPES)
    if isinstance(command, MarkRead):
        assert type(command.seq) is int and 0 <= command.seq <= codec.MAX_ID
    if isinstance(command, OpenDm):
        assert command.user == str(uuid.UUID(command.user))  # canonical lower-case form
    if isinstance(command, EditMessage):
        assert command.content and "\x00" not in command.content
        command.content.encode("utf-8")
    if isinstance(command, SendMessage):
        for text in (command.content, command.client_id or "x"):
            assert "\x00" not in text
            text.encode("utf-8")
        orjson.dumps(command.content)
    for state in ("AWAIT_TOKEN", "READY"):
        session_in(state).receive(command)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(ANY_CHAR), st.binary().map(lambda b: b.decode("utf-8", "replace"))))
def test_decode_never_raises_on_any_text(text: str) -> None:
    check_command(codec.decode(text, max_content=4096))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.one_of(st.sampled_from(COMMANDS), JSON_VALUES),
    fields=st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=5)), JSON_VALUES),
    max_content=st.integers(min_value=1, max_value=4096),
)
def test_decode_never_raises_on_any_json_value_in_any_field_of_any_command(
    kind: object, fields: dict[str, object], max_content: int
) -> None:
    text = dump({"type": kind, **{k: v for k, v in fields.items() if k != "type"}})
    command = codec.decode(text, max_content=max_content)
    check_command(command)
    assert not isinstance(command, BadJson), text  # all of it is valid JSON


def test_subscribe_and_unsubscribe_take_a_room_id_and_subscribe_an_optional_since() -> None:
    assert decode('{"type":"subscribe","room_id":7}') == Subscribe(7)
    assert decode('{"type":"subscribe","room_id":7,"since":3}') == Subscribe(7, 3)
    assert decode('{"type":"unsubscribe","room_id":7}') == Unsubscribe(7)
    assert decode('{"type":"subscribe","room_id":"7"}') == BadArgs(
        "subscribe", "room_id must be a positive integer"
    )
    assert decode('{"type":"unsubscribe"}') == BadArgs("unsubscribe", "room_id is required")


def test_message_and_history_take_an_optional_room_id() -> None:
    assert decode('{"type":"message","content":"x","room_id":8}') == SendMessage("x", None, 8)
    assert decode('{"type":"message","content":"x","room_id":null}') == SendMessage("x", None)
    assert decode('{"type":"get_past_messages","room_id":8}') == GetPastMessages(50, None, 8)
    assert decode('{"type":"message","content":"x","room_id":-1}') == BadArgs(
        "message", "room_id must be a positive integer"
    )


def test_the_new_room_frames_name_their_room() -> None:
    assert codec.subscribed(7) == b'{"type":"status","data":"SUBSCRIBED","room_id":7}'
    assert codec.unsubscribed(7) == b'{"type":"status","data":"UNSUBSCRIBED","room_id":7}'
    assert codec.too_many(7) == b'{"type":"status","data":"TOOMANY","room_id":7}'


def test_edit_and_delete_take_a_seq_and_an_optional_room_id() -> None:
    assert decode('{"type":"edit","seq":4,"content":"new"}') == EditMessage(4, "new")
    assert decode('{"type":"edit","seq":4,"content":"new","room_id":9}') == EditMessage(4, "new", 9)
    assert decode('{"type":"delete","seq":4}') == DeleteMessage(4)
    assert decode('{"type":"delete","seq":4,"room_id":9}') == DeleteMessage(4, 9)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"type":"edit","content":"x"}', "seq is required"),
        ('{"type":"edit","seq":null,"content":"x"}', "seq is required"),
        ('{"type":"edit","seq":0,"content":"x"}', "seq must be a positive integer"),
        ('{"type":"edit","seq":"4","content":"x"}', "seq must be a positive integer"),
        ('{"type":"edit","seq":4.5,"content":"x"}', "seq must be a positive integer"),
        ('{"type":"edit","seq":true,"content":"x"}', "seq must be a positive integer"),
        ('{"type":"edit","seq":1e400,"content":"x"}', "seq must be a positive integer"),
        ('{"type":"edit","seq":4}', "content must be a string"),
        ('{"type":"edit","seq":4,"content":7}', "content must be a string"),
        ('{"type":"edit","seq":4,"content":""}', "content must not be empty"),
        ('{"type":"edit","seq":4,"content":"a\\u0000"}', "content must not contain U+0000"),
        (
            '{"type":"edit","seq":4,"content":"\\ud800"}',
            "content must not contain a lone surrogate",
        ),
        ('{"type":"edit","seq":4,"content":"x","room_id":0}', "room_id must be a positive integer"),
        ('{"type":"delete"}', "seq is required"),
        ('{"type":"delete","seq":-3}', "seq must be a positive integer"),
        ('{"type":"delete","seq":[1]}', "seq must be a positive integer"),
        ('{"type":"delete","seq":1,"room_id":"9"}', "room_id must be a positive integer"),
    ],
)
def test_bad_edit_and_delete_fields_are_badargs_naming_the_field(text: str, reason: str) -> None:
    command = "edit" if '"edit"' in text else "delete"
    assert decode(text) == BadArgs(command, reason)


def test_an_edit_over_the_content_limit_is_toolarge() -> None:
    assert decode('{"type":"edit","seq":4,"content":"' + "x" * 11 + '"}') == TooLarge()
    assert decode('{"type":"edit","seq":4,"content":"' + "x" * 10 + '"}') == EditMessage(
        4, "x" * 10
    )


def test_edited_and_deleted_frames_carry_the_event_data_and_history_adds_history_true() -> None:
    from datetime import UTC, datetime

    from nanomsg.models import Message

    at = datetime(2026, 1, 1, tzinfo=UTC)
    edit = Message(9, 7, 5, "u", "e", "new", at, kind="edit", target_seq=3)
    delete = Message(10, 7, 6, "u", "e", "", at, kind="delete", target_seq=3)
    plain = Message(1, 7, 3, "u", "e", "hi", at)
    assert codec.event_frame(plain) == codec.message_frame(plain)
    assert codec.event_history_frame(plain) == codec.history_frame(plain)
    for event, kind in ((edit, "edited"), (delete, "deleted")):
        assert orjson.loads(codec.event_frame(event)) == {"type": kind, "data": event.event_json()}
        assert orjson.loads(codec.event_history_frame(event)) == {
            "type": kind,
            "data": {**event.event_json(), "history": True},
        }


def test_read_takes_a_non_negative_seq_and_an_optional_room_id() -> None:
    assert decode('{"type":"read","seq":0}') == MarkRead(0)
    assert decode('{"type":"read","seq":12}') == MarkRead(12)
    assert decode('{"type":"read","seq":12,"room_id":9}') == MarkRead(12, 9)
    assert decode(f'{{"type":"read","seq":{codec.MAX_ID}}}') == MarkRead(codec.MAX_ID)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"type":"read"}', "seq is required"),
        ('{"type":"read","seq":null}', "seq is required"),
        ('{"type":"read","seq":-1}', "seq must be an integer >= 0"),
        ('{"type":"read","seq":"4"}', "seq must be an integer >= 0"),
        ('{"type":"read","seq":4.5}', "seq must be an integer >= 0"),
        ('{"type":"read","seq":true}', "seq must be an integer >= 0"),
        ('{"type":"read","seq":1e400}', "seq must be an integer >= 0"),
        ('{"type":"read","seq":' + "9" * 30 + "}", "seq must be an integer >= 0"),
        ('{"type":"read","seq":[1]}', "seq must be an integer >= 0"),
        ('{"type":"read","seq":1,"room_id":0}', "room_id must be a positive integer"),
    ],
)
def test_bad_read_fields_are_badargs_naming_the_field(text: str, reason: str) -> None:
    assert decode(text) == BadArgs("read", reason)


def test_readmark_and_receipt_frames_are_exact() -> None:
    assert codec.read_mark(7, 12) == b'{"type":"status","data":"READMARK","room_id":7,"seq":12}'
    assert codec.signal_frame(codec.receipt(7, "u-1", 12)) == (
        b'{"type":"read","data":{"room_id":7,"user":"u-1","seq":12}}'
    )


def test_open_dm_takes_a_uuid_in_its_canonical_form() -> None:
    user = "0b7e8f1a-3c2d-4e5f-8a9b-0c1d2e3f4a5b"
    assert decode(f'{{"type":"open_dm","user":"{user}"}}') == OpenDm(user)
    assert decode(f'{{"type":"open_dm","user":"{user.upper()}"}}') == OpenDm(user)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"type":"open_dm"}', "user is required"),
        ('{"type":"open_dm","user":null}', "user is required"),
        ('{"type":"open_dm","user":"bob"}', "user must be a UUID"),
        ('{"type":"open_dm","user":7}', "user must be a UUID"),
        (
            '{"type":"open_dm","user":["0b7e8f1a-3c2d-4e5f-8a9b-0c1d2e3f4a5b"]}',
            "user must be a UUID",
        ),
        ('{"type":"open_dm","user":"0b7e8f1a3c2d4e5f8a9b0c1d2e3f4a5b"}', "user must be a UUID"),
    ],
)
def test_bad_open_dm_user_is_badargs_naming_the_field(text: str, reason: str) -> None:
    assert decode(text) == BadArgs("open_dm", reason)


def test_dm_status_frame_is_exact() -> None:
    assert codec.dm_opened(12) == b'{"type":"status","data":"DM","room_id":12}'


def test_token_asks_for_user_events_only_with_a_json_true() -> None:
    assert decode('{"type":"token","content":"t","user_events":true}') == Token("t", True)
    for other in ("false", "1", '"true"', "null", "{}"):
        text = f'{{"type":"token","content":"t","user_events":{other}}}'
        assert decode(text) == Token("t", False), other
    assert decode('{"type":"token","content":"t"}') == Token("t")


def test_user_event_frame_is_exact() -> None:
    data = {"event": "room_added", "room_id": 12}
    assert codec.user_event_frame(data) == (
        b'{"type":"user_event","data":{"event":"room_added","room_id":12}}'
    )

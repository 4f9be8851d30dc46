"""Decoding client frames into commands, and the exact bytes of the server's fixed frames."""

from __future__ import annotations

import pytest

from nanomsg import codec
from nanomsg.events import (
    BadArgs,
    BadJson,
    GetPastMessages,
    Quit,
    SelectRoom,
    SendMessage,
    Token,
    TooLarge,
    Unknown,
)


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

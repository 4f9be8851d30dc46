"""The side-port's validators accept exactly what its OpenAPI document declares valid.

The document's patterns are ECMA-262 regular expressions that the server also matches with
Python's ``re``; these properties check, without sockets, that the two readings and the
server's parsing agree on every value a generator can produce from the document.
"""

from __future__ import annotations

import re
from datetime import UTC
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomsg.http_api import HttpError, JsonBody, checked_edit, parse_instant
from nanomsg.openapi import (
    EDIT_TEXT_PATTERN,
    INSTANT_PATTERN,
    NAME_MAX_LEN,
    NAME_PATTERN,
    build_openapi,
)

NAME_RE = re.compile(NAME_PATTERN)


def _name_accepted(name: str) -> bool:
    try:
        JsonBody({"name": name}, ("name",)).text("name", max_len=NAME_MAX_LEN, pattern=NAME_RE)
    except HttpError as exc:
        assert exc.status == 400
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.from_regex(INSTANT_PATTERN, fullmatch=True))
def test_every_instant_the_pattern_admits_parses_to_a_utc_instant(text: str) -> None:
    for end_of_day in (False, True):
        moment = parse_instant(text, end_of_day=end_of_day)
        assert moment is not None, text
        assert moment.tzinfo is UTC or moment.utcoffset() is not None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-02-29",
        "2026-11-23T24:00",
        "2026-11-23t10:00",
        "2026-11-23T10:00+24:00",
        "\uff12026-11-23",  # a fullwidth digit
        "2026-11-23\n",
        "0000-01-01",
        "2026-11-23T10:00:00.1234567",
    ],
)
def test_instants_outside_the_pattern_are_refused(text: str) -> None:
    assert parse_instant(text, end_of_day=False) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=NAME_MAX_LEN))
def test_room_name_is_accepted_exactly_when_the_document_pattern_matches(name: str) -> None:
    assert _name_accepted(name) == bool(name and NAME_RE.fullmatch(name))


@settings(max_examples=200, deadline=None)
@given(st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda n: len(n) <= NAME_MAX_LEN))
def test_every_name_the_pattern_admits_is_accepted(name: str) -> None:
    assert _name_accepted(name)


@pytest.mark.parametrize(
    "name", ["a\u0000b", "\u0000", "tab\there", "bell\u0085", "  ", "\u3000", "\ufeff"]
)
def test_names_with_control_characters_or_only_spaces_are_refused(name: str) -> None:
    assert not _name_accepted(name)


@pytest.mark.parametrize("value", [362881.0, 1e2, 0.0])
def test_integral_float_is_an_integer_as_in_json_schema(value: float) -> None:
    assert JsonBody({"level": value}, ("level",)).integer("level", lo=0, hi=10**6) == int(value)


@pytest.mark.parametrize("value", [1.5, True, "3", None])
def test_non_integers_and_null_are_refused_for_an_integer_field(value: Any) -> None:
    with pytest.raises(HttpError, match="'level' must be an integer"):
        JsonBody({"level": value}, ("level",)).integer("level", lo=0, hi=10**6, default=0)


@pytest.mark.parametrize(
    ("method", "default"), [("boolean", False), ("text", "user")], ids=["boolean", "text"]
)
def test_null_is_refused_for_an_optional_field_with_a_default(method: str, default: Any) -> None:
    body = JsonBody({"field": None}, ("field",))
    with pytest.raises(HttpError, match="'field' must be a"):
        getattr(body, method)("field", default=default)
    assert getattr(JsonBody({}, ("field",)), method)("field", default=default) == default


def _integer_query_parameters(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path, item in document["paths"].items():
        operations = [op for key, op in item.items() if key != "parameters"]
        for operation in operations:
            for parameter in [*item.get("parameters", []), *operation.get("parameters", [])]:
                if parameter["schema"].get("type") == "integer":
                    found.append((f"{path} {parameter['name']}", parameter["schema"]))
    return found


def test_every_integer_parameter_of_the_document_has_an_upper_bound() -> None:
    """The server refuses integers past 2^63-1 (ids and seqs are 64-bit): every integer the
    document declares says so."""
    parameters = _integer_query_parameters(build_openapi(room_create_level=100))
    assert parameters
    unbounded = [name for name, schema in parameters if "maximum" not in schema]
    assert unbounded == []


EDIT_RE = re.compile(EDIT_TEXT_PATTERN)


def _edit_accepted(content: str) -> bool:
    """What the server takes as an edit's content: the body check, then the edit use case's
    refusal of blank content (``str.strip``)."""
    try:
        checked = checked_edit({"content": content}, max_content=50)
    except HttpError as exc:
        assert exc.status == 400
        return False
    return bool(checked.strip())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=50))
def test_edit_content_is_accepted_exactly_when_the_document_pattern_matches(content: str) -> None:
    assert _edit_accepted(content) == bool(EDIT_RE.fullmatch(content))


def test_the_edit_pattern_names_exactly_the_whitespace_python_strips() -> None:
    """Every code point but U+0000 and the surrogates, alone: blank to ``str.strip`` exactly
    when the document's pattern refuses it."""
    for code in range(1, 0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        assert (EDIT_RE.fullmatch(char) is None) == char.isspace(), hex(code)

"""SQLite's fast conversions agree with the general ones they replace on the changes path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from nanomsg.store import common
from nanomsg.store.sqlite import from_micros, message_from_row, to_micros

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STAMPS = [
    datetime(2026, 12, 6, 10, 26, 45, 123456, tzinfo=UTC),
    datetime(2026, 12, 6, 15, 56, 45, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("stamp", STAMPS)
def test_to_micros_is_the_exact_microseconds_since_the_epoch(stamp: datetime) -> None:
    assert to_micros(stamp) == (stamp - _EPOCH) // timedelta(microseconds=1)
    assert from_micros(to_micros(stamp)) == stamp


def test_utc_returns_a_utc_stamp_itself_and_converts_another_zone() -> None:
    stamp = STAMPS[0]
    assert common.utc(stamp) is stamp
    converted = common.utc(STAMPS[1])
    assert converted == STAMPS[1] and converted.tzinfo is UTC


def test_naive_stamps_are_still_refused() -> None:
    naive = datetime(2026, 12, 6, 10, 26)
    with pytest.raises(ValueError):
        to_micros(naive)
    with pytest.raises(ValueError):
        common.utc(naive)


@pytest.mark.parametrize("changed", [False, True])
def test_message_from_row_matches_the_general_mapping(changed: bool) -> None:
    created = to_micros(STAMPS[0])
    later = created + 5_000_000 if changed else None
    row = (
        7,
        3,
        12,
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        "hello",
        created,
        "c-1" if changed else None,
        "message",
        None,
        int(changed),
        later,
        later,
        "00000000-0000-4000-8000-000000000003" if changed else None,
    )
    expected = common.message_from_row(row, from_micros)
    assert message_from_row(row) == expected
    assert message_from_row(("lead", *row), 1) == expected
    assert isinstance(message_from_row(row).system, bool)

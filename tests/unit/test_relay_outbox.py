"""The relay's publish queue and envelope, without sockets: what is kept, what is dropped,
what goes first, and that a payload comes back as it went."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from nanomsg.models import Message
from nanomsg.relay.base import RelayHandlers
from nanomsg.relay.envelope import decode, encode_message, from_node, hand_over, header
from nanomsg.relay.outbox import Outbox, Packet, Signal
from nanomsg.relay.redis import RedisRelay
from nanomsg.relay.redis_cluster import RedisClusterRelay

NODE = "a" * 32
T0 = datetime(2026, 12, 6, 5, 0, 0, 123456, tzinfo=UTC)


def msg(room: int, seq: int, content: str = "hello", client_id: str | None = None) -> Message:
    return Message(
        id=room * 100_000 + seq,
        room_id=room,
        seq=seq,
        emitter="11111111-1111-4111-8111-111111111111",
        entity="22222222-2222-4222-8222-222222222222",
        content=content,
        created_at=T0 + timedelta(milliseconds=seq),
        client_id=client_id,
    )


class Heard:
    """Records what a relay hands to the hub."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.changed: list[int] = []
        self.resynced: list[int] = []
        self.signals: list[tuple[int, dict[str, Any]]] = []
        self.user_events: list[tuple[str, dict[str, Any]]] = []

    def handlers(self) -> RelayHandlers:
        return RelayHandlers(
            message=self.messages.append,
            room_changed=self.changed.append,
            resync=self.resynced.append,
            signal=lambda room, data: self.signals.append((room, data)),
            user_event=lambda user, data: self.user_events.append((user, data)),
        )


def replay(packets: list[Packet]) -> Heard:
    """What another node hears from these packets, in order."""
    heard = Heard()
    for packet in packets:
        hand_over(packet.payload, header("b" * 32), heard.handlers())
    return heard


# -- the queue policy ----------------------------------------------------------------------------


def test_a_notice_followed_by_more_messages_than_the_bound_is_kept_and_sent_first() -> None:
    outbox = Outbox(NODE, max_entries=100)
    outbox.notice(7)
    for seq in range(1, 10_001):
        outbox.message(msg(7, seq))
    assert outbox.notices == [7]
    assert outbox.dropped == 10_000 - 100
    packets = outbox.take()
    assert packets[0].room_id is None and packets[0].notices == (7,)
    heard = replay(packets)
    assert heard.changed == [7]
    assert [m.seq for m in heard.messages] == list(range(9_901, 10_001))  # the newest 100


def test_messages_past_the_bound_drop_the_oldest_and_are_counted() -> None:
    outbox = Outbox(NODE, max_entries=3)
    for seq in range(1, 6):
        outbox.message(msg(1, seq))
    assert [e.seq for e in outbox.entries if isinstance(e, Message)] == [3, 4, 5]
    assert outbox.dropped == 2
    assert len(outbox) == 3


def test_notices_are_coalesced_by_room_in_first_seen_order() -> None:
    outbox = Outbox(NODE, max_entries=10)
    for room in (5, 3, 5, 5, 9, 3):
        outbox.notice(room)
    assert outbox.notices == [5, 3, 9]
    (packet,) = outbox.take()
    assert decode(packet.payload).notices == [5, 3, 9]
    assert not outbox


def test_notices_are_never_dropped_however_many_rooms_change() -> None:
    outbox = Outbox(NODE, max_entries=1)
    for room in range(1, 5_001):
        outbox.notice(room)
        outbox.message(msg(room, 1))
    assert outbox.notices == list(range(1, 5_001))
    assert outbox.dropped == 4_999


def test_unsent_packets_go_back_ahead_of_newer_ones_notices_never_dropped() -> None:
    outbox = Outbox(NODE, max_entries=4)
    outbox.notice(1)
    outbox.message(msg(1, 1))
    outbox.message(msg(1, 2))
    unsent = outbox.take()  # the broker is down
    outbox.notice(2)
    outbox.notice(1)
    for seq in (3, 4, 5):
        outbox.message(msg(1, seq))
    outbox.put_back(unsent)
    assert outbox.notices == [1, 2]  # the unsent one first, coalesced with its repeat
    kept = [e.seq for e in outbox.entries if isinstance(e, Message)]
    assert kept == [2, 3, 4, 5]  # the oldest of the whole queue went
    assert outbox.dropped == 1


def test_a_pass_is_one_payload_per_room_with_its_messages_in_order() -> None:
    outbox = Outbox(NODE)
    for seq in (1, 2, 3):
        outbox.message(msg(10, seq))
        outbox.message(msg(20, seq))
    packets = outbox.take()
    assert [p.room_id for p in packets] == [10, 20]
    heard = replay(packets)
    assert [(m.room_id, m.seq) for m in heard.messages] == [
        (10, 1), (10, 2), (10, 3), (20, 1), (20, 2), (20, 3),
    ]  # fmt: skip


def test_a_room_backlog_is_split_into_bounded_payloads() -> None:
    outbox = Outbox(NODE, max_payload=4_096)
    for seq in range(1, 101):
        outbox.message(msg(3, seq, content="x" * 200))
    packets = outbox.take()
    assert len(packets) > 1
    assert all(len(p.payload) <= 4_096 + 512 for p in packets)
    assert [m.seq for m in replay(packets).messages] == list(range(1, 101))


def test_a_message_larger_than_the_payload_bound_still_goes_alone() -> None:
    outbox = Outbox(NODE, max_payload=100)
    outbox.message(msg(3, 1, content="y" * 1_000))
    outbox.message(msg(3, 2))
    packets = outbox.take()
    assert [len(p.entries) for p in packets] == [1, 1]
    assert [m.content for m in replay(packets).messages] == ["y" * 1_000, "hello"]


def test_signals_share_the_bounded_queue_and_their_room_payload() -> None:
    outbox = Outbox(NODE, max_entries=2)
    outbox.signal(4, {"typing": "u1"})
    outbox.message(msg(4, 1))
    outbox.signal(4, {"typing": "u2"})  # drops the oldest entry, the first signal
    assert outbox.dropped == 1
    assert outbox.entries == [msg(4, 1), Signal(4, {"typing": "u2"})]
    heard = replay(outbox.take())
    assert heard.signals == [(4, {"typing": "u2"})]
    assert [m.seq for m in heard.messages] == [1]


def test_user_events_share_the_bounded_queue_and_go_in_one_control_payload() -> None:
    outbox = Outbox(NODE, max_entries=3)
    outbox.user_event("u1", {"event": "read", "room_id": 4, "seq": 2})
    outbox.message(msg(4, 1))
    outbox.user_event("u2", {"event": "room_added", "room_id": 5})
    packets = outbox.take()
    controls = [p for p in packets if p.room_id is None]
    assert len(controls) == 1  # both user events, one PUBLISH on the control channel
    assert controls[0].payload.startswith(header(NODE) + b',"u":[')
    heard = replay(packets)
    assert heard.user_events == [
        ("u1", {"event": "read", "room_id": 4, "seq": 2}),
        ("u2", {"event": "room_added", "room_id": 5}),
    ]
    assert [m.seq for m in heard.messages] == [1] and heard.changed == []
    outbox.put_back(controls)  # not taken by the broker: queued again, bounded like messages
    assert len(outbox.entries) == 2
    outbox.user_event("u3", {"event": "invited", "room_id": 6})
    outbox.user_event("u4", {"event": "invited", "room_id": 7})
    assert outbox.dropped == 1


def test_an_outbox_without_room_is_refused() -> None:
    with pytest.raises(ValueError):
        Outbox(NODE, max_entries=0)


# -- the envelope --------------------------------------------------------------------------------


def test_a_message_comes_back_exactly_as_it_went() -> None:
    offset = timezone(timedelta(hours=2))
    sent = [
        msg(1, 1, content='quotes " \\ and \u0000 and emoji \U0001f600', client_id="c-1"),
        msg(1, 2, client_id=None),
        Message(1, 1, 3, "e", "n", "", datetime(2026, 1, 1, tzinfo=UTC), "k"),
        Message(2, 1, 4, "e", "n", "z", datetime(2026, 1, 1, 12, 30, 1, 5, tzinfo=offset)),
        Message(3, 1, 5, "e", "n", "posted", datetime(2026, 1, 1, tzinfo=UTC), system=True),
    ]
    outbox = Outbox(NODE)
    for message in sent:
        outbox.message(message)
    assert replay(outbox.take()).messages == sent


def test_a_system_message_crosses_the_relay_marked_and_a_plain_one_as_before() -> None:
    plain = msg(1, 1, client_id="k")
    system = dataclasses.replace(plain, system=True)
    assert orjson.loads(encode_message(plain))[7:] == []  # the previous release's 7 elements
    assert orjson.loads(encode_message(system))[7:] == ["message", None, True]
    outbox = Outbox(NODE)
    outbox.message(system)
    heard = replay(outbox.take())
    assert heard.messages == [system] and heard.messages[0].system


def test_edits_deletes_and_system_messages_come_back_exactly_as_they_went() -> None:
    edit = msg(1, 5, content="fixed")
    sent = [
        msg(1, 4),
        Message(**{**_fields(edit), "kind": "edit", "target_seq": 4}),
        Message(**{**_fields(msg(1, 6, content="")), "kind": "delete", "target_seq": 4}),
        Message(**{**_fields(msg(1, 7, content="a document")), "system": True}),
    ]
    outbox = Outbox(NODE)
    for message in sent:
        outbox.message(message)
    packets = outbox.take()
    assert replay(packets).messages == sent
    # A plain message keeps the seven fields every process of the previous format reads.
    rows = orjson.loads(packets[0].payload)["m"]
    assert [len(row) for row in rows] == [7, 10, 10, 10]


def _fields(message: Message) -> dict[str, Any]:
    return {name: getattr(message, name) for name in Message.__slots__}


def test_own_echoes_are_recognised_from_the_first_bytes() -> None:
    outbox = Outbox(NODE)
    outbox.message(msg(1, 1))
    outbox.notice(1)
    heard = Heard()
    for packet in outbox.take():
        assert from_node(packet.payload, header(NODE))
        assert not from_node(packet.payload, header("c" * 32))
        hand_over(packet.payload, header(NODE), heard.handlers())
    assert heard.messages == [] and heard.changed == []


def test_payloads_of_the_previous_format_are_still_understood() -> None:
    message = msg(5, 9, client_id="old")
    legacy_message = orjson.dumps(
        {
            "n": "x",
            "id": message.id,
            "r": 5,
            "s": 9,
            "e": message.emitter,
            "en": message.entity,
            "c": message.content,
            "t": message.created_at.isoformat(),
            "k": "old",
        }
    )
    legacy_notice = orjson.dumps({"n": "x", "room_changed": 12})
    assert decode(legacy_message).messages == [message]
    assert decode(legacy_notice).notices == [12]


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"{}",
        b'{"n":1}',
        b'{"n":"x","c":"7"}',
        b'{"n":"x","c":[true]}',
        b'{"n":"x","m":[[1,2]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","not a date",null]]}',
        b'{"n":"x","r":1,"m":[[1,"2","e","n","c","2026-01-01T00:00:00+00:00",null]]}',
        b'{"n":"x","r":1,"s":[1]}',
        b'{"n":"x","u":{}}',
        b'{"n":"x","u":[["u1"]]}',
        b'{"n":"x","u":[[1,{}]]}',
        b'{"n":"x","u":[["u1",[]]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","2026-01-01T00:00:00+00:00",null,false]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","2026-01-01T00:00:00+00:00",null,true,1]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","2026-01-01T00:00:00+00:00",null,"edit"]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","2026-01-01T00:00:00+00:00",null,"pin",1,false]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","2026-01-01T00:00:00+00:00",null,"edit",null,false]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","2026-01-01T00:00:00+00:00",null,"message",1,false]]}',
        b'{"n":"x","r":1,"m":[[1,2,"e","n","c","2026-01-01T00:00:00+00:00",null,"edit",1,0]]}',
        b"not json",
    ],
)
def test_malformed_payloads_raise_what_the_relay_logs_and_skips(payload: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        hand_over(payload, header(NODE), Heard().handlers())


# -- missed notices --------------------------------------------------------------------------------


def test_every_control_subscription_re_checks_every_watched_room() -> None:
    """A (re)subscribed control channel means notices may have been missed meanwhile."""
    heard = Heard()
    relay = RedisRelay("redis://127.0.0.1:1/0", heard.handlers(), prefix="p")
    for room in (3, 8):
        relay.watch(room)  # not connected: only recorded
    relay.dispatch({"type": "subscribe", "channel": b"p:room:3", "data": 2})
    assert heard.resynced == [3] and heard.changed == []
    relay.dispatch({"type": "subscribe", "channel": b"p:control", "data": 1})
    assert sorted(heard.changed) == [3, 8]
    relay.dispatch({"type": "subscribe", "channel": b"p:control", "data": 1})
    assert sorted(heard.changed) == [3, 3, 8, 8]


def test_every_control_subscription_of_the_cluster_relay_re_checks_every_watched_room() -> None:
    heard = Heard()
    relay = RedisClusterRelay("redis://127.0.0.1:1", heard.handlers(), prefix="p")
    relay.watch(4)  # no slot map yet: only recorded
    shard: Any = None  # a confirmation does not depend on which shard sent it
    relay.dispatch(shard, {"type": "ssubscribe", "channel": b"p:room:4", "data": 1})
    assert heard.resynced == [4] and heard.changed == []
    relay.dispatch(shard, {"type": "ssubscribe", "channel": b"p:control", "data": 1})
    assert heard.changed == [4]


def test_a_user_event_payload_decodes_to_its_pairs_and_an_own_echo_is_skipped() -> None:
    payload = header("a" * 32) + b',"u":[["u1",{"event":"room_removed","room_id":9}]]}'
    assert decode(payload).user_events == [("u1", {"event": "room_removed", "room_id": 9})]
    heard = Heard()
    hand_over(payload, header("a" * 32), heard.handlers())
    assert heard.user_events == []
    hand_over(payload, header("b" * 32), heard.handlers())
    assert heard.user_events == [("u1", {"event": "room_removed", "room_id": 9})]

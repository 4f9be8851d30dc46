"""The per-connection protocol state machine: pure and sans-I/O.

Commands (decoded by the codec), results of storage operations and timer firings go in; a list
of effects comes out, which the I/O shell (``ws_server``) carries out in order. Nothing here
touches a socket, the event loop, the database or the broker, so every transition is tested
without them (tests/unit/test_session.py).

States and what each command does in each state live in ``TRANSITIONS``, one table, mirrored by
protocol.md section 3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from nanomsg import codec
from nanomsg.auth import AuthError, Verifier
from nanomsg.clock import Clock, utc_datetime
from nanomsg.events import (
    Arm,
    AuthRefused,
    BadArgs,
    BadJson,
    ChangeMessage,
    ChangeRefused,
    Close,
    Command,
    DeleteMessage,
    Disarm,
    DmReady,
    EditMessage,
    Effect,
    EndReplay,
    EventStored,
    GetPastMessages,
    HistoryLoaded,
    Join,
    Leave,
    LoadHistory,
    LoadRoom,
    MarkRead,
    MessageRefused,
    MessageStored,
    OpenDm,
    Publish,
    Quit,
    ReadMarked,
    Replayed,
    Result,
    RoomLoaded,
    RoomMissing,
    RunOpenDm,
    SelectRoom,
    Send,
    SendMessage,
    SetReadMark,
    SetReceiving,
    Settle,
    StorageFailed,
    StoreMessage,
    Subscribe,
    Timer,
    Token,
    TooLarge,
    Unknown,
    Unsubscribe,
)
from nanomsg.models import Principal, RoomAccess, Rule
from nanomsg.permissions import Access, evaluate
from nanomsg.store.base import HistoryQuery, NewMessage
from nanomsg.subscription import SubEvent, Subscription, Subscriptions, SubState

MAX_TRIALS = 3  # bad tokens plus other commands before auth, as in the original
MAX_CLOSE_REASON = 123  # bytes of UTF-8 a WebSocket close reason may hold (RFC 6455 5.5)


class CloseCode:
    """WebSocket close codes the server sends (protocol.md section 5)."""

    NORMAL = 1000  # quit
    GOING_AWAY = 1001  # server shutting down
    UNSUPPORTED = 1003  # BADJSON
    INVALID_UTF8 = 1007  # text frame that is not UTF-8
    POLICY = 1008  # auth failures, auth timeout, expiry without refresh
    TOO_BIG = 1009  # frame over --max-frame
    INTERNAL = 1011  # a bug on our side
    SLOW_CONSUMER = 4000  # backlog over --max-backlog
    PING_TIMEOUT = 4001  # no pong within --ping-timeout


class State(Enum):
    AWAIT_TOKEN = "AWAIT_TOKEN"  # after START?, until a valid token
    READY = "READY"  # authenticated; a room may be selected
    EXPIRED = "EXPIRED"  # token expired: receives nothing, may only send a token
    CLOSED = "CLOSED"  # a Close effect was emitted; everything else is ignored


@dataclass(frozen=True, slots=True)
class Limits:
    auth_timeout: float = 10.0
    refresh_grace: float = 30.0
    max_subscriptions: int = 500  # rooms held at once (subscribed or selected)


Handler = Callable[["Session", Command], list[Effect]]
RoomCommand = SelectRoom | Subscribe | SendMessage | GetPastMessages


@dataclass(frozen=True, slots=True)
class _Load:
    """What the LoadRoom out is for: the command waiting for the room's rules."""

    room_id: int
    command: RoomCommand


class Session:
    """One connection's protocol state: its connection state and the rooms it holds.

    ``subs`` maps each room held to its ``Subscription`` (a machine of its own, kept in a few
    bytes per room, see nanomsg/subscription.py); ``room_id`` is the selected room, the one
    commands without a ``room_id`` act on (held, unless None)."""

    # Slots: every connection has one, and an idle connection's memory is counted in bytes.
    __slots__ = (
        "_load",
        "_rechecks",
        "_replay",
        "clock",
        "limits",
        "principal",
        "refusal",
        "room_id",
        "state",
        "subs",
        "trials",
        "verifier",
    )

    def __init__(self, verifier: Verifier, clock: Clock, limits: Limits) -> None:
        self.verifier = verifier
        self.clock = clock
        self.limits = limits
        self.state = State.AWAIT_TOKEN
        self.principal: Principal | None = None
        self.trials = 0
        self.refusal: str | None = None  # why the last token was refused, for the close reason
        self.room_id: int | None = None  # the selected room
        self.subs = Subscriptions()
        # The LoadRoom out (a room command waits for its rules) and the room whose resume
        # replay is out. Commands that load are barriers, so there is at most one of each.
        self._load: _Load | None = None
        self._replay: int | None = None
        # Rooms whose rules are being read again after a token refresh changed the principal
        # (each decided again when its LoadRoom answers); None when there are none.
        self._rechecks: set[int] | None = None

    @property
    def access(self) -> Access | None:
        """The decision on the selected room, if any."""
        sub = self.subs.get(self.room_id) if self.room_id is not None else None
        return sub.access if sub is not None else None

    def pipelinable(self, command: Command) -> bool:
        """Whether ``command`` may be answered behind sends still in flight: it changes no
        session state (only Send, StoreMessage or ChangeMessage comes out)."""
        if self.state is not State.READY:
            return False
        if type(command) is SendMessage:
            if command.room_id is None or command.room_id == self.room_id:
                return True
            sub = self.subs.get(command.room_id)
            return sub is not None and sub.joined  # a room not held is loaded first
        return type(command) in _PIPELINABLE

    # -- entry points ---------------------------------------------------------------------------

    def start(self) -> list[Effect]:
        """The connection is open: ask for a token and start the auth clock."""
        return [
            Send(codec.START),
            Arm(Timer.AUTH, self.clock.wall() + self.limits.auth_timeout),
        ]

    def receive(self, command: Command) -> list[Effect]:
        handler = TRANSITIONS[self.state][type(command)]
        return handler(self, command)

    def result(self, result: Result) -> list[Effect]:
        """The outcome of the LoadRoom / StoreMessage / LoadHistory the session asked for."""
        if self.state is State.CLOSED:
            return []
        if isinstance(result, RoomLoaded):
            return self._room_loaded(result)
        if isinstance(result, MessageStored):
            message = result.message
            held = self.subs.get(message.room_id)
            if result.created:
                if held is not None and held.joined:
                    return [Publish(message)]  # the echo comes with the room's traffic
                # Posted to a room this connection does not hold: its own echo is the ack.
                return [Publish(message), Send(codec.message_frame(message))]
            # An idempotent resend: everyone already has it; answer the sender alone.
            return [Send(codec.message_frame(message))]
        if isinstance(result, EventStored):
            event = result.event
            held = self.subs.get(event.room_id)
            if held is not None and held.joined:
                return [Publish(event)]  # the acknowledgement comes with the room's traffic
            return [Publish(event), Send(codec.event_frame(event))]
        if isinstance(result, ChangeRefused):
            return [Send(result.reply)]
        if isinstance(result, ReadMarked):
            return [Send(codec.read_mark(result.room_id, result.seq))]
        if isinstance(result, DmReady):
            return [Send(codec.dm_opened(result.room_id))]
        if isinstance(result, MessageRefused):
            return [Send(codec.badargs(result.reason))]
        if isinstance(result, HistoryLoaded):
            out: list[Effect] = [Send(codec.event_history_frame(m)) for m in result.messages]
            out.append(Send(codec.history_end(len(result.messages))))
            return out
        if isinstance(result, Replayed):
            self._replay = None
            sub = self.subs.get(result.room_id)
            if sub is None or sub.state is not SubState.REPLAYING:
                return [EndReplay(result.room_id)]  # the room was lost while reading the replay
            sub.fire(SubEvent.REPLAYED)
            self.subs.set(sub)
            out = [Send(codec.event_history_frame(m)) for m in result.messages]
            out.append(Send(codec.resumed(result.room_id, len(result.messages), result.complete)))
            out.append(EndReplay(result.room_id))
            return out
        if isinstance(result, RoomMissing):
            self._load = None
            if result.room_id not in self.subs:
                # A pipelined send to a room already lost (or never held): every send still
                # gets its answer.
                return [Send(codec.revoked(result.room_id))]
            return self._lose(result.room_id)
        assert isinstance(result, StorageFailed)
        rechecks = self._rechecks
        if rechecks is not None and result.room_id in rechecks:
            # A room whose rules could not be read again for the new principal cannot be
            # decided: it is left (the client may select or subscribe again), never kept on a
            # decision made for the old entity or level.
            self._recheck_done(rechecks, result.room_id)
            return self._lose(result.room_id)
        self._load_failed()
        if self._replay is not None:
            # A resume whose replay could not be read: leave rather than leave a gap.
            room_id, self._replay = self._replay, None
            return [*self._drop(room_id, SubEvent.REVOKED), Send(codec.UNAVAILABLE)]
        return [Send(codec.UNAVAILABLE)]

    def timer_fired(self, timer: Timer) -> list[Effect]:
        now = self.clock.wall()
        if timer is Timer.AUTH and self.state is State.AWAIT_TOKEN:
            return self._close(CloseCode.POLICY, "no valid token in time")
        if timer is Timer.EXPIRY and self.state is State.READY:
            assert self.principal is not None
            expires_at = self.verifier.expires_at(self.principal)
            if now < expires_at:  # refreshed since the timer was armed
                return [Arm(Timer.EXPIRY, expires_at)]
            self.state = State.EXPIRED
            return [
                SetReceiving(False),
                Send(codec.EXPIRED),
                Arm(Timer.REFRESH, now + self.limits.refresh_grace),
            ]
        if timer is Timer.REFRESH and self.state is State.EXPIRED:
            return self._close(CloseCode.POLICY, "token expired")
        return []

    def reauthorize(self, room_id: int, access: RoomAccess | None) -> list[Effect]:
        """The rules of a held room changed (or it was deleted): re-evaluate that room."""
        sub = self.subs.get(room_id)
        if sub is None or not sub.joined or self.principal is None or self.state is State.CLOSED:
            return []
        if access is not None and access.room.id != room_id:
            return []
        decision = evaluate(self.principal, access.room if access else None, self._rules(access))
        if decision.read:
            sub.access = decision
            self.subs.set(sub)
            return []
        return self._lose(room_id)

    # -- handlers, referenced from TRANSITIONS -----------------------------------------------------

    def _authenticate(self, command: Command) -> list[Effect]:
        assert isinstance(command, Token)
        try:
            principal = self.verifier.verify(command.token)
        except AuthError as exc:
            return self._refused(str(exc))
        self.principal = _kept(principal)
        self.state = State.READY
        self.trials, self.refusal = 0, None
        return [
            Disarm(Timer.AUTH),
            Send(codec.READY),
            Arm(Timer.EXPIRY, self.verifier.expires_at(principal)),
            # DMs opened with this user by their own entity become readable (once per
            # connection, as the side-port does per request).
            Settle(self.principal, command.user_events),
        ]

    def _refresh(self, command: Command) -> list[Effect]:
        """A token on an authenticated or expired connection: renew it for the same user."""
        assert isinstance(command, Token) and self.principal is not None
        try:
            principal = self.verifier.verify(command.token)
        except AuthError as exc:
            return self._refused(str(exc))
        if principal.user != self.principal.user:
            reason = "token for another user"
            return [
                Send(codec.BADAUTH),
                AuthRefused(reason),
                *self._close(CloseCode.POLICY, reason),
            ]
        changed = (principal.entity, principal.level) != (
            self.principal.entity,
            self.principal.level,
        )
        was_expired = self.state is State.EXPIRED
        self.principal = _kept(principal)
        self.state = State.READY
        self.trials, self.refusal = 0, None
        out: list[Effect] = []
        if was_expired:
            out += [Disarm(Timer.REFRESH), SetReceiving(True)]
        out += [Send(codec.READY), Arm(Timer.EXPIRY, self.verifier.expires_at(principal))]
        if changed:
            # Another entity or level: every held room is decided again, each on its own. Its
            # rules are loaded like a select's: the driver answers from the rules the hub keeps
            # for rooms live on the process (current after every change notice), and reads
            # storage only for a room it has none for. Connections keep no rules of their own.
            rooms = [sub.room_id for sub in self.subs.values() if sub.joined]
            if rooms:
                self._rechecks = set(rooms)
                out += [LoadRoom(room_id) for room_id in rooms]
        return out

    def _token_query(self, command: Command) -> list[Effect]:
        return self._trial(codec.TOKEN_Q)

    def _select(self, command: Command) -> list[Effect]:
        assert isinstance(command, SelectRoom)
        return self._load_for(command.room_id, command, explicit=False)

    def _subscribe(self, command: Command) -> list[Effect]:
        assert isinstance(command, Subscribe)
        return self._load_for(command.room_id, command, explicit=True)

    def _unsubscribe(self, command: Command) -> list[Effect]:
        assert isinstance(command, Unsubscribe)
        out = self._drop(command.room_id, SubEvent.LEFT)
        out.append(Send(codec.unsubscribed(command.room_id)))
        return out

    def _send(self, command: Command) -> list[Effect]:
        assert isinstance(command, SendMessage) and self.principal is not None
        room_id = command.room_id if command.room_id is not None else self.room_id
        if room_id is None:
            return [Send(codec.SELECTROOM_Q)]
        sub = self.subs.get(room_id)
        if sub is None or sub.access is None:
            self._load = _Load(room_id, command)  # a room not held: needs its rules first
            return [LoadRoom(room_id)]
        if not sub.access.write:
            return [Send(codec.NOTAUTHORIZED)]
        return [StoreMessage(self._new_message(room_id, command))]

    def _history(self, command: Command) -> list[Effect]:
        assert isinstance(command, GetPastMessages)
        room_id = command.room_id if command.room_id is not None else self.room_id
        if room_id is None:
            return [Send(codec.SELECTROOM_Q)]
        sub = self.subs.get(room_id)
        if sub is None or sub.access is None:
            self._load = _Load(room_id, command)
            return [LoadRoom(room_id)]
        return [LoadHistory(_history_query(room_id, command))]

    def _change(self, command: Command) -> list[Effect]:
        """edit / delete: the use case decides (same rules as the HTTP side-port); a room
        not held needs no subscription, like a send."""
        assert isinstance(command, EditMessage | DeleteMessage) and self.principal is not None
        room_id = command.room_id if command.room_id is not None else self.room_id
        if room_id is None:
            return [Send(codec.SELECTROOM_Q)]
        content = command.content if isinstance(command, EditMessage) else None
        return [ChangeMessage(self.principal, room_id, command.seq, content)]

    def _read(self, command: Command) -> list[Effect]:
        """read: the mark-read use case decides (same rules as ``POST /rooms/{id}/read``); a
        room not held needs no subscription, only read access."""
        assert isinstance(command, MarkRead) and self.principal is not None
        room_id = command.room_id if command.room_id is not None else self.room_id
        if room_id is None:
            return [Send(codec.SELECTROOM_Q)]
        return [SetReadMark(self.principal, room_id, command.seq)]

    def _open_dm(self, command: Command) -> list[Effect]:
        """open_dm: the open-DM use case decides (same rules as ``POST /dm``)."""
        assert isinstance(command, OpenDm) and self.principal is not None
        return [RunOpenDm(self.principal, command.user)]

    def _quit(self, command: Command) -> list[Effect]:
        return self._close(CloseCode.NORMAL, "bye")

    def _bad_json(self, command: Command) -> list[Effect]:
        return [
            Send(codec.BADJSON),
            *self._close(CloseCode.UNSUPPORTED, "frame is not a JSON object"),
        ]

    def _command_query(self, command: Command) -> list[Effect]:
        return [Send(codec.COMMAND_Q)]

    def _bad_args(self, command: Command) -> list[Effect]:
        assert isinstance(command, BadArgs)
        return [Send(codec.badargs(command.reason))]

    def _too_large(self, command: Command) -> list[Effect]:
        return [Send(codec.TOOLARGE)]

    def _ignore(self, command: Command) -> list[Effect]:
        return []

    # -- helpers -----------------------------------------------------------------------------------

    def _refused(self, reason: str) -> list[Effect]:
        """A token refused: ``BADAUTH`` as the original sent it, and the reason for the log
        (and for the close reason, should this try be the last)."""
        self.refusal = reason
        return self._trial(codec.BADAUTH, AuthRefused(reason))

    def _trial(self, reply: bytes, *why: Effect) -> list[Effect]:
        """A failed auth attempt or a command before auth; the third one closes, naming why the
        last token was refused, if one was."""
        self.trials += 1
        out: list[Effect] = [Send(reply), *why]
        if self.trials >= MAX_TRIALS:
            reason = "too many failed attempts"
            if self.refusal is not None:
                reason = _close_reason(f"{reason}: {self.refusal}")
            out += self._close(CloseCode.POLICY, reason)
        return out

    def _close(self, code: int, reason: str) -> list[Effect]:
        out: list[Effect] = []
        for room_id in list(self.subs):
            out += self._drop(room_id, SubEvent.LEFT)
        self.state = State.CLOSED
        out.append(Close(code, reason))
        return out

    def _load_for(
        self, room_id: int, command: SelectRoom | Subscribe, explicit: bool
    ) -> list[Effect]:
        """select_room / subscribe: the room's rules are read (or taken from the hub) first.
        A room not held yet counts against ``max_subscriptions`` from now on, except a select
        that will replace the selected room (which it leaves)."""
        if room_id not in self.subs:
            held = len(self.subs)
            selected = self.subs.get(self.room_id) if self.room_id is not None else None
            if not explicit and selected is not None and not selected.explicit:
                held -= 1
            if held >= self.limits.max_subscriptions:
                return [Send(codec.too_many(room_id))]
            self.subs.add(room_id, explicit=explicit)
        self._load = _Load(room_id, command)
        return [LoadRoom(room_id)]

    def _load_failed(self) -> None:
        """The LoadRoom out failed: forget a room that was only being loaded."""
        load, self._load = self._load, None
        if load is not None:
            sub = self.subs.get(load.room_id)
            if sub is not None and sub.state is SubState.LOADING:
                self.subs.pop(load.room_id)

    def _recheck_done(self, rechecks: set[int], room_id: int) -> None:
        rechecks.discard(room_id)
        if not rechecks:
            self._rechecks = None

    def _room_loaded(self, loaded: RoomLoaded) -> list[Effect]:
        load = self._load
        rechecks = self._rechecks
        if (
            rechecks is not None
            and loaded.room_id in rechecks
            and (load is None or load.room_id != loaded.room_id)
        ):
            # A held room decided again after a refresh changed the principal.
            self._recheck_done(rechecks, loaded.room_id)
            return self.reauthorize(loaded.room_id, loaded.access)
        if load is None or load.room_id != loaded.room_id or self.principal is None:
            return []
        self._load = None
        access = loaded.access
        decision = evaluate(self.principal, access.room if access else None, self._rules(access))
        command = load.command
        if isinstance(command, SendMessage):
            # A room not held: missing, unreadable and read-only rooms answer alike.
            if access is None or not decision.write:
                return [Send(codec.NOTAUTHORIZED)]
            return [StoreMessage(self._new_message(loaded.room_id, command))]
        if isinstance(command, GetPastMessages):
            if access is None or not decision.read:
                return [Send(codec.NOTAUTHORIZED)]
            return [LoadHistory(_history_query(loaded.room_id, command))]
        if access is None or not decision.read:
            return self._refuse(loaded.room_id, command)
        sub = self.subs.get(loaded.room_id)
        if sub is None:  # lost while its rules were read
            sub = Subscription(loaded.room_id, explicit=False)
        sub.access = decision
        since = command.since
        # A resume of a room already held joins again (to get its replay lined up with the live
        # stream) but does not leave first: leaving could drop the room's channel on this
        # process, and the join would then rebuild it from a position that may be stale.
        rejoin = not sub.joined or since is not None
        out: list[Effect] = []
        if isinstance(command, Subscribe):
            sub.explicit = True
            self.subs.set(sub)
            out.append(Send(codec.subscribed(loaded.room_id)))
        else:
            previous = self.room_id
            if previous is not None and previous != loaded.room_id:
                out += self._leave_selected(previous)
            self.subs.set(sub)
            self.room_id = loaded.room_id
            out.append(Send(codec.CONNECTED))
        if rejoin:
            sub.fire(SubEvent.GRANTED_RESUME if since is not None else SubEvent.GRANTED)
            self.subs.set(sub)
            if since is not None:
                self._replay = loaded.room_id
            out.append(Join(loaded.room_id, access.room.last_seq, since, access))
        return out

    def _refuse(self, room_id: int, command: RoomCommand) -> list[Effect]:
        """select_room / subscribe of a room the user may not read (or that does not exist)."""
        out: list[Effect] = []
        if isinstance(command, Subscribe):
            out += self._drop(room_id, SubEvent.DENIED)
            out.append(Send(codec.revoked(room_id)))
            return out
        # select_room, as before: the previous room is left too (unless subscribed).
        previous = self.room_id
        if previous is not None and previous != room_id:
            out += self._leave_selected(previous)
        out += self._drop(room_id, SubEvent.DENIED)
        self.room_id = None
        out.append(Send(codec.NOTAUTHORIZED))
        return out

    def _leave_selected(self, room_id: int) -> list[Effect]:
        """Another room is being selected: the previous one is left unless it was subscribed
        explicitly (then it is only no longer the selected one)."""
        sub = self.subs.get(room_id)
        self.room_id = None
        if sub is None or sub.explicit:
            return []
        return self._drop(room_id, SubEvent.LEFT)

    def _drop(self, room_id: int, event: SubEvent) -> list[Effect]:
        """Stop holding ``room_id``: its subscription ends (``event``), the hub forgets it."""
        sub = self.subs.pop(room_id)
        if self.room_id == room_id:
            self.room_id = None
        if self._replay == room_id:
            self._replay = None
        if self._rechecks is not None and room_id in self._rechecks:
            self._recheck_done(self._rechecks, room_id)
        if sub is None:
            return []
        joined = sub.joined
        sub.fire(event)
        return [Leave(room_id)] if joined else []

    def _lose(self, room_id: int) -> list[Effect]:
        """Read access to a held room is gone: leave it and say so, naming the room."""
        if room_id not in self.subs:
            return []
        out = self._drop(room_id, SubEvent.REVOKED)
        out.append(Send(codec.revoked(room_id)))
        return out

    def _new_message(self, room_id: int, command: SendMessage) -> NewMessage:
        assert self.principal is not None
        return NewMessage(
            room_id=room_id,
            emitter=self.principal.user,
            entity=self.principal.entity,
            content=command.content,
            client_id=command.client_id,
            now=utc_datetime(self.clock.wall()),
        )

    @staticmethod
    def _rules(access: RoomAccess | None) -> tuple[Rule, ...]:
        return access.rules if access else ()


def _history_query(room_id: int, command: GetPastMessages) -> HistoryQuery:
    return HistoryQuery(room_id=room_id, limit=command.limit, before=command.before, newest=True)


def _close_reason(text: str) -> str:
    """``text`` cut to what a close frame can carry."""
    data = text.encode("utf-8")
    if len(data) <= MAX_CLOSE_REASON:
        return text
    return data[:MAX_CLOSE_REASON].decode("utf-8", "ignore")


def _kept(principal: Principal) -> Principal:
    """The principal as a connection keeps it: without the token's raw claims, which nothing
    after authentication reads and which would cost every idle connection ~800 bytes."""
    return replace(principal, claims={})


S = Session
# edit and delete too: the driver pipelines them like sends (driver.Driver._change).
_PIPELINABLE: frozenset[type] = frozenset({EditMessage, DeleteMessage, BadArgs, TooLarge, Unknown})
_COMMANDS: tuple[type, ...] = (
    Token,
    SelectRoom,
    Subscribe,
    Unsubscribe,
    SendMessage,
    GetPastMessages,
    EditMessage,
    DeleteMessage,
    MarkRead,
    OpenDm,
    Quit,
    Unknown,
    BadArgs,
    TooLarge,
    BadJson,
)


def _row(default: Handler, **special: Handler) -> dict[type, Handler]:
    names = {cls.__name__: cls for cls in _COMMANDS}
    row = {cls: default for cls in _COMMANDS}
    for name, handler in special.items():
        row[names[name]] = handler
    return row


# What each command does in each state. protocol.md section 3 mirrors this table, and
# tests/unit/test_session.py checks that every (state, command) pair has an entry.
TRANSITIONS: dict[State, dict[type, Handler]] = {
    State.AWAIT_TOKEN: _row(
        S._token_query, Token=S._authenticate, Quit=S._quit, BadJson=S._bad_json
    ),
    State.READY: _row(
        S._command_query,
        Token=S._refresh,
        SelectRoom=S._select,
        Subscribe=S._subscribe,
        Unsubscribe=S._unsubscribe,
        SendMessage=S._send,
        GetPastMessages=S._history,
        EditMessage=S._change,
        DeleteMessage=S._change,
        MarkRead=S._read,
        OpenDm=S._open_dm,
        Quit=S._quit,
        BadArgs=S._bad_args,
        TooLarge=S._too_large,
        BadJson=S._bad_json,
    ),
    State.EXPIRED: _row(S._token_query, Token=S._refresh, Quit=S._quit, BadJson=S._bad_json),
    State.CLOSED: _row(S._ignore),
}

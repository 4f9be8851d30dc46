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
    Close,
    Command,
    Disarm,
    Effect,
    EndReplay,
    GetPastMessages,
    HistoryLoaded,
    Join,
    Leave,
    LoadHistory,
    LoadRoom,
    MessageRefused,
    MessageStored,
    Publish,
    Quit,
    Replayed,
    Result,
    RoomLoaded,
    RoomMissing,
    SelectRoom,
    Send,
    SendMessage,
    SetReceiving,
    StorageFailed,
    StoreMessage,
    Timer,
    Token,
    TooLarge,
    Unknown,
)
from nanomsg.models import Principal, RoomAccess, Rule
from nanomsg.permissions import Access, evaluate
from nanomsg.store.base import HistoryQuery, NewMessage

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


Handler = Callable[["Session", Command], list[Effect]]


class Session:
    """One connection's protocol state."""

    def __init__(self, verifier: Verifier, clock: Clock, limits: Limits) -> None:
        self.verifier = verifier
        self.clock = clock
        self.limits = limits
        self.state = State.AWAIT_TOKEN
        self.principal: Principal | None = None
        self.trials = 0
        self.refusal: str | None = None  # why the last token was refused, for the close reason
        self.room_id: int | None = None
        self.access: Access | None = None
        # The room a LoadRoom is out for, and whether it is a re-check (after a token refresh
        # that changed entity or level) rather than a select_room.
        self._loading: int | None = None
        self._recheck = False
        self._since: int | None = None  # of the select_room being loaded
        self._replaying = False

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
            if result.created:
                return [Publish(result.message)]
            # An idempotent resend: everyone already has it; answer the sender alone.
            return [Send(codec.message_frame(result.message))]
        if isinstance(result, MessageRefused):
            return [Send(codec.badargs(result.reason))]
        if isinstance(result, HistoryLoaded):
            out: list[Effect] = [Send(codec.history_frame(m)) for m in result.messages]
            out.append(Send(codec.history_end(len(result.messages))))
            return out
        if isinstance(result, Replayed):
            self._replaying = False
            if result.room_id != self.room_id:  # the room was lost while reading the replay
                return [EndReplay()]
            out = [Send(codec.history_frame(m)) for m in result.messages]
            out.append(Send(codec.resumed(result.room_id, len(result.messages), result.complete)))
            out.append(EndReplay())
            return out
        if isinstance(result, RoomMissing):
            self._loading = None
            if result.room_id != self.room_id:
                # A pipelined send to a room already lost: every send still gets its answer.
                return [Send(codec.revoked(result.room_id))]
            return self._lose_room(result.room_id)
        assert isinstance(result, StorageFailed)
        self._loading = None
        if self._replaying and self.room_id is not None:
            # A resume whose replay could not be read: leave rather than leave a gap.
            self._replaying = False
            room_id, self.room_id, self.access = self.room_id, None, None
            return [Leave(room_id), Send(codec.UNAVAILABLE)]
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

    def reauthorize(self, access: RoomAccess | None) -> list[Effect]:
        """The room's rules changed (or it was deleted): re-evaluate the selected room."""
        if self.room_id is None or self.principal is None or self.state is State.CLOSED:
            return []
        if access is not None and access.room.id != self.room_id:
            return []
        decision = evaluate(self.principal, access.room if access else None, self._rules(access))
        if decision.read:
            self.access = decision
            return []
        return self._lose_room(self.room_id)

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
        if changed and self.room_id is not None:
            self._loading, self._recheck = self.room_id, True
            out.append(LoadRoom(self.room_id))
        return out

    def _token_query(self, command: Command) -> list[Effect]:
        return self._trial(codec.TOKEN_Q)

    def _select(self, command: Command) -> list[Effect]:
        assert isinstance(command, SelectRoom)
        self._loading, self._recheck, self._since = command.room_id, False, command.since
        return [LoadRoom(command.room_id)]

    def _send(self, command: Command) -> list[Effect]:
        assert isinstance(command, SendMessage) and self.principal is not None
        if self.room_id is None or self.access is None:
            return [Send(codec.SELECTROOM_Q)]
        if not self.access.write:
            return [Send(codec.NOTAUTHORIZED)]
        new = NewMessage(
            room_id=self.room_id,
            emitter=self.principal.user,
            entity=self.principal.entity,
            content=command.content,
            client_id=command.client_id,
            now=utc_datetime(self.clock.wall()),
        )
        return [StoreMessage(new)]

    def _history(self, command: Command) -> list[Effect]:
        assert isinstance(command, GetPastMessages)
        if self.room_id is None:
            return [Send(codec.SELECTROOM_Q)]
        query = HistoryQuery(
            room_id=self.room_id, limit=command.limit, before=command.before, newest=True
        )
        return [LoadHistory(query)]

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
        if self.room_id is not None:
            out.append(Leave(self.room_id))
            self.room_id = self.access = None
        self.state = State.CLOSED
        out.append(Close(code, reason))
        return out

    def _room_loaded(self, loaded: RoomLoaded) -> list[Effect]:
        if self._loading != loaded.room_id or self.principal is None:
            return []
        self._loading = None
        access = loaded.access
        decision = evaluate(self.principal, access.room if access else None, self._rules(access))
        if self._recheck:
            if decision.read and self.room_id == loaded.room_id:
                self.access = decision
                return []
            return self._lose_room(loaded.room_id)
        out: list[Effect] = []
        if not decision.read or access is None:
            if self.room_id is not None:
                out.append(Leave(self.room_id))
            self.room_id = self.access = None
            out.append(Send(codec.NOTAUTHORIZED))
            return out
        since = self._since
        # A resume of the current room joins again (to get its replay lined up with the live
        # stream) but does not leave first: leaving could drop the room's channel on this
        # process, and the join would then rebuild it from a position that may be stale.
        rejoin = self.room_id != loaded.room_id or since is not None
        if self.room_id is not None and self.room_id != loaded.room_id:
            out.append(Leave(self.room_id))
        self.room_id, self.access = loaded.room_id, decision
        out.append(Send(codec.CONNECTED))
        if rejoin:
            self._replaying = since is not None
            out.append(Join(loaded.room_id, access.room.last_seq, since, access))
        return out

    def _lose_room(self, room_id: int) -> list[Effect]:
        """Access to the selected room is gone: leave it and say so, naming the room."""
        if self.room_id != room_id:
            return []
        self.room_id = self.access = None
        return [Leave(room_id), Send(codec.revoked(room_id))]

    @staticmethod
    def _rules(access: RoomAccess | None) -> tuple[Rule, ...]:
        return access.rules if access else ()


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
_COMMANDS: tuple[type, ...] = (
    Token,
    SelectRoom,
    SendMessage,
    GetPastMessages,
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
        SendMessage=S._send,
        GetPastMessages=S._history,
        Quit=S._quit,
        BadArgs=S._bad_args,
        TooLarge=S._too_large,
        BadJson=S._bad_json,
    ),
    State.EXPIRED: _row(S._token_query, Token=S._refresh, Quit=S._quit, BadJson=S._bad_json),
    State.CLOSED: _row(S._ignore),
}

"""The command driver of a /chat connection: which command runs when, what the session's
effects do, and the storage runner.

The WebSocket adapter (``ws_server.Connection``) turns bytes into commands and frames into bytes;
this part sits between it and the pure ``Session``:

- **Scheduling.** Commands are handed to the session in order. Up to ``PIPELINE`` sends, edits
  and deletes of a connection are handed to the batching writer (``store.writer``) without
  waiting for each other, so one connection is not capped by commit latency; their results are
  applied strictly in the order of the commands. Every other command waits until those before
  it are answered, so replies still come in command order (protocol.md section 2).
- **Effects.** Replies go to the adapter's outbox, room membership to the hub, timers to the
  adapter's timer table, storage operations to the runner.
- **Storage runner.** Room loads, history reads and resume replays run as tasks owned by the
  server; their results go back to the session, history and replays as long replies that the
  adapter writes as the client reads them.

``Driver`` is a mixin of ``Connection``: one object per connection, so splitting the code costs
an idle connection no memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nanomsg import codec
from nanomsg import usecases as usecases_mod
from nanomsg.events import (
    Arm,
    AuthRefused,
    BadArgs,
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
    HistoryLoaded,
    Join,
    Leave,
    LoadHistory,
    LoadRoom,
    MessageRefused,
    MessageStored,
    Publish,
    ReadMarked,
    Replayed,
    Result,
    RoomLoaded,
    RoomMissing,
    RunOpenDm,
    Send,
    SendMessage,
    SetReadMark,
    SetReceiving,
    Settle,
    StorageFailed,
    StoreMessage,
    Timer,
    TooLarge,
    Unknown,
)
from nanomsg.fanout import text_frame
from nanomsg.models import RoomAccess
from nanomsg.session import Session
from nanomsg.store.base import (
    ContentRefused,
    HistoryQuery,
    MessageChange,
    RoomGone,
    Store,
    StoreUnavailable,
)
from nanomsg.store.writer import Stored

if TYPE_CHECKING:
    from nanomsg.usecases import UseCases
    from nanomsg.ws_server import WsServer

# Connection log lines keep the adapter's logger name: operators filter on one name per
# connection, whichever half of the connection code writes the line.
log = logging.getLogger("nanomsg.ws_server")

INBOX_PAUSE = 32  # commands queued behind a slow store operation before we stop reading
INBOX_RESUME = 8
PIPELINE = 64  # sends, edits and deletes of one connection in flight at once
# Commands whose READY handler changes no session state (only Send, StoreMessage or
# ChangeMessage comes out), so they may be answered behind sends still in flight. Anything
# else is a barrier.
PIPELINABLE: frozenset[type] = frozenset(
    {SendMessage, EditMessage, DeleteMessage, BadArgs, TooLarge, Unknown}
)


@dataclass(eq=False, slots=True)
class _Reply:
    """A history reply or resume replay of one connection, written as the client reads it."""

    frames: list[bytes] = field(default_factory=list)  # not yet handed to the transport
    size: int = 0  # bytes in ``frames``
    streamed: int = 0  # bytes handed to the transport so far: room earned for held frames
    streaming: bool = False  # the result is in: frames written now go behind the reply


class Driver:
    """Command scheduling, session effects and the storage runner of one connection.

    The slots are the driver's own state; the other attributes and the methods declared below
    are the adapter's (``ws_server.Connection``), declared here for the type checker only."""

    __slots__ = ("busy", "held", "held_bytes", "inbox", "pipeline", "receiving", "reply")

    server: WsServer
    conn_id: str
    session: Session | None
    inbox: list[Command]
    busy: bool
    pipeline: list[_InFlight | list[Effect]]
    paused: bool
    draining: bool
    receiving: bool
    closing: bool
    # Live frames (room id, frame) held behind a long reply being written, not None then.
    held: list[tuple[int, bytes]] | None
    held_bytes: int  # bytes held: behind a long reply, and by subscriptions replaying
    reply: _Reply | None

    if TYPE_CHECKING:

        def _write(self, data: bytes) -> None: ...

        def _update_reading(self) -> None: ...

        def _send_reply(self) -> None: ...

        def _arm(self, timer: Timer | None, delay: float) -> None: ...

        def _disarm(self, timer: Timer | str | None) -> None: ...

        def close(self, code: int, reason: str = "") -> None: ...

        def write_frame(self, frame: bytes, seq: int, room_id: int = 0) -> None: ...

        def write_signal(self, frame: bytes, room_id: int, about: str | None) -> None: ...

        def write_user_event(self, frame: bytes, data: dict[str, Any]) -> None: ...

    def _pump(self) -> None:
        """Hand queued commands to the session in order: sends, edits and deletes may overlap
        (up to ``PIPELINE``), any other command waits for everything before it to be
        answered."""
        session = self.session
        while (
            not self.busy
            and self.inbox
            and session is not None
            and not self.closing
            and not self.draining
        ):
            if self.pipeline:
                command = self.inbox[0]
                if not session.pipelinable(command) or len(self.pipeline) >= PIPELINE:
                    break
                del self.inbox[0]
                for effect in session.receive(command):
                    if isinstance(effect, StoreMessage):
                        self._submit(effect)
                    elif isinstance(effect, ChangeMessage):
                        self._change(effect)
                    else:  # a reply: it waits behind the sends in flight
                        self.pipeline.append([effect])
            else:
                self.apply(session.receive(self.inbox.pop(0)))
        if self.paused and len(self.inbox) <= INBOX_RESUME:
            self._update_reading()

    # -- effects ------------------------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        loads: list[int] = []  # rooms whose rules are read from storage, in one task
        for effect in effects:
            if isinstance(effect, Send):
                self._write(text_frame(effect.payload))
            elif isinstance(effect, Publish):
                self.server.hub.publish(effect.message)
            elif isinstance(effect, Join):
                self._join(effect)
            elif isinstance(effect, EndReplay):
                self._end_replay(effect.room_id)
            elif isinstance(effect, Leave):
                self._leave(effect.room_id)
            elif isinstance(effect, StoreMessage):
                self._submit(effect)
            elif isinstance(effect, ChangeMessage):
                self._change(effect)
            elif isinstance(effect, LoadRoom) and (
                cached := self.server.hub.cached_access(effect.room_id)
            ):
                # The room is live on this process: its rules are known and kept current.
                assert self.session is not None
                self.apply(self.session.result(RoomLoaded(effect.room_id, cached)))
            elif isinstance(effect, LoadRoom):
                loads.append(effect.room_id)
            elif isinstance(effect, LoadHistory | SetReadMark | RunOpenDm):
                self.busy = True
                self.server.spawn(self._run(effect))
            elif isinstance(effect, Settle):
                if effect.user_events:
                    # The client asked for its user's events: they reach it from now on.
                    self.server.hub.add_user(self, effect.principal.user)
                # Commands wait for it (a select_room of a DM just settled must find it
                # readable); it runs once per connection, at authentication.
                self.busy = True
                self.server.spawn(self._settle(effect))
            elif isinstance(effect, Arm):
                self._arm(effect.timer, effect.at - self.server.clock.wall())
            elif isinstance(effect, Disarm):
                self._disarm(effect.timer)
            elif isinstance(effect, SetReceiving):
                self.receiving = effect.on
            elif isinstance(effect, Close):
                self.close(effect.code, effect.reason)
            elif isinstance(effect, AuthRefused):
                log.info("connection %s: token refused: %s", self.conn_id, effect.reason)
        if loads:
            # One room for a select or a send; every held room the hub keeps no rules for
            # after a refresh changed the principal. Later commands wait for all of them.
            self.busy = True
            self.server.spawn(self._load_rooms(loads))

    def _end_replay(self, room_id: int) -> None:
        """The replay of ``room_id`` is written (into the long reply): the live frames its
        subscription held meanwhile follow it, before anything held behind the reply since."""
        subs = self.session.subs if self.session is not None else None
        sub = subs.get(room_id) if subs is not None else None
        if subs is None or sub is None or sub.held is None:
            return
        frames, sub.held = sub.held, None
        subs.set(sub)  # a live room with no floor goes back to its compact form
        if self.reply is not None and self.reply.streaming:
            self.held = [(room_id, frame) for frame in frames] + (self.held or [])
            return
        self.held_bytes -= sum(map(len, frames))
        for frame in frames:
            self._write(frame)

    def _leave(self, room_id: int) -> None:
        """The session dropped ``room_id``: the hub forgets this receiver there, and frames of
        that room still held (by its replay, or behind a long reply) are never written."""
        self.server.hub.leave(self, room_id)
        if self.held:
            self.held = [(room, frame) for room, frame in self.held if room != room_id]
        self.held_bytes = self.held_total()

    def held_total(self) -> int:
        """Bytes held: behind a long reply, and by the subscriptions whose replay is read."""
        size = sum(len(frame) for _, frame in self.held or ())
        if self.session is not None:
            for sub in self.session.subs.kept():
                if sub.held:
                    size += sum(map(len, sub.held))
        return size

    def leave_all(self) -> None:
        """Closing: this connection receives nothing more from any room it holds, nor any
        user event."""
        if self.session is not None:
            for room_id in self.session.subs:
                self.server.hub.leave(self, room_id)
            if self.session.principal is not None:
                self.server.hub.remove_user(self, self.session.principal.user)

    def _join(self, join: Join) -> None:
        live_from = self.server.hub.join(self, join.room_id, join.last_seq, join.access)
        subs = self.session.subs if self.session is not None else None
        sub = subs.get(join.room_id) if subs is not None else None
        if subs is None or sub is None:
            return
        # The hub writes this receiver no seq below ``live_from``: a floor under it would
        # never drop anything, so only a ``since`` at or past it needs one (and then only
        # until the room's stream passes it, see ``Connection.write_frame``).
        since = join.since
        sub.min_seq = since if since is not None and since >= live_from else 0
        if since is None:
            subs.set(sub)
            return
        # Replay seqs since+1 .. live_from-1 from storage; live frames of the room from
        # live_from on are held by its subscription until the replay is written, so the client
        # sees no gap and no duplicate. Other rooms' frames flow meanwhile.
        if sub.held is None:
            sub.held = []
        subs.set(sub)
        self.busy = True
        self.server.spawn(self._run(_Replay(join.room_id, since, live_from)))

    def _submit(self, effect: StoreMessage) -> None:
        entry = _InFlight(self)
        self.pipeline.append(entry)
        self.server.writer.enqueue(effect.new, entry)

    def _change(self, effect: ChangeMessage) -> None:
        """An edit or delete, pipelined like a send: the use case's rule decides it on the
        rights the subscription holds for a room held, else on the rules kept for a room live
        here (no task, no storage read either way) and the writer stores it in turn with the
        sends; the result is applied in command order. A refusal decided now is the status
        word, in its turn. A room whose rules are not kept here is read first
        (``_decide_change``), holding later commands back so that seqs keep the commands'
        order."""
        usecases = self.server.usecases
        sub = self.session.subs.get(effect.room_id) if self.session is not None else None
        change: MessageChange | None
        try:
            if sub is not None and sub.access is not None:
                # A room held: decided on the rights its subscription holds, as a send is
                # (kept current by the hub's re-checks), by the same rule.
                change = usecases.change_in(
                    effect.principal, effect.room_id, sub.access, effect.seq, effect.content
                )
            else:
                change = usecases.kept_change(
                    effect.principal, effect.room_id, effect.seq, effect.content
                )
        except usecases_mod.UseCaseError as exc:
            assert self.session is not None
            effects = self.session.result(_refusal(exc))
            if self.pipeline:
                self.pipeline.append(effects)  # answered behind what is in flight
            else:
                self.apply(effects)
            return
        entry = _InFlight(self, change=True)
        self.pipeline.append(entry)
        if change is None:
            self.busy = True
            self.server.spawn(self._decide_change(effect, entry))
            return
        self.server.writer.enqueue(change, entry)

    async def _decide_change(self, effect: ChangeMessage, entry: _InFlight) -> None:
        """``_change`` for a room whose rules are not kept here: read them, then hand the
        change to the writer (or answer the refusal) in its turn."""
        try:
            change = await self.server.usecases.new_change(
                effect.principal, effect.room_id, effect.seq, effect.content
            )
        except usecases_mod.UseCaseError as exc:
            entry.result = _refusal(exc)
        except StoreUnavailable:
            entry.result = StorageFailed()
        except Exception:
            log.exception("deciding an edit or delete failed unexpectedly")
            entry.result = StorageFailed()
        else:
            self.server.writer.enqueue(change, entry)
        finally:
            self.busy = False
        if entry.result is not None:
            self._advance()
        else:
            self._pump()

    def _advance(self) -> None:
        """Apply the results at the head of the pipeline that are ready, in command order."""
        pipeline = self.pipeline
        while pipeline:
            head = pipeline[0]
            if isinstance(head, list):
                del pipeline[0]
                if self.session is not None and not self.closing:
                    self.apply(head)
                continue
            result = head.result
            if result is None:
                break
            del pipeline[0]
            if self.session is not None and not self.closing:
                self.apply(self.session.result(result))
            elif isinstance(result, MessageStored) and result.created:
                # The sender is gone, but the message is stored: the room must still get it.
                self.server.hub.publish(result.message)
            elif isinstance(result, EventStored):
                # The editor is gone, but the event is stored and holds a seq: the room must
                # get it (receivers would otherwise wait for a gap fill).
                self.server.hub.publish(result.event)
        self._pump()

    async def _dm_opened(self, room_id: int) -> None:
        """A DM was opened with this connection's user, whose rule waits for their entity:
        settle it with this connection's principal, then tell the client what it now is
        (``room_added`` when readable, ``invited`` while pending). Every connection of the
        user does this; settling is idempotent and each answers its own client."""
        session = self.session
        principal = session.principal if session is not None else None
        if principal is None:
            return
        usecases = self.server.usecases
        try:
            await usecases.settle(principal)
            event = await usecases.dm_state(principal, room_id)
        except StoreUnavailable:
            return  # ephemeral: GET /rooms tells the same later
        if event is not None and not self.closing:
            self.write_user_event(text_frame(codec.user_event_frame(event)), event)

    async def _settle(self, effect: Settle) -> None:
        """The settle use case at authentication. Storage down is no reason to refuse the
        connection: the DMs stay pending until the user's next request settles them."""
        try:
            await self.server.usecases.settle(effect.principal)
        except StoreUnavailable:
            log.info("connection %s: pending DMs not settled: storage down", self.conn_id)
        except Exception:
            log.exception("settling pending DMs failed unexpectedly")
        finally:
            self.busy = False
        if self.session is not None and not self.closing:
            self._pump()

    async def _load_rooms(self, room_ids: list[int]) -> None:
        """Read the rules of ``room_ids`` from storage and hand each to the session, in order
        (a room that could not be read is ``StorageFailed`` naming it)."""
        hub = self.server.hub
        notices = hub.notices
        results: list[Result] = []
        try:
            for room_id in room_ids:
                try:
                    access = await self.server.store.room_access(room_id)
                    results.append(RoomLoaded(room_id, access))
                except StoreUnavailable:
                    results.append(StorageFailed(room_id))
                except Exception:
                    log.exception("storage operation failed unexpectedly")
                    results.append(StorageFailed(room_id))
        finally:
            self.busy = False
        for result in results:
            if self.session is None or self.closing:
                return
            self.apply(self.session.result(result))
        if hub.notices != notices:
            # A change notice came while the rules were read: they may predate it, and a
            # room's channel, if this join made it, never heard it. Re-check the rooms as
            # after a notice: their kept rules are dropped, then read again, and their
            # receivers (this one included) decided on them. Rare: a notice per rule change,
            # anywhere, within these storage reads.
            for room_id in room_ids:
                hub.room_changed(room_id)
        self._pump()

    async def _run(self, effect: LoadHistory | SetReadMark | RunOpenDm | _Replay) -> None:
        store = self.server.store
        result: Result
        try:
            if isinstance(effect, LoadHistory):
                # A history page is a page of the room's event stream: messages (deleted ones
                # as tombstones) with the edits and deletions between them.
                result = HistoryLoaded(tuple(await store.events(effect.query)))
            elif isinstance(effect, SetReadMark):
                result = await _mark_read(self.server.usecases, effect, self)
            elif isinstance(effect, RunOpenDm):
                result = await _open_dm(self.server.usecases, effect)
            else:
                result = await effect.load(store, self.server.config.resume_cap)
        except StoreUnavailable:
            result = StorageFailed()
        except Exception:
            log.exception("storage operation failed unexpectedly")
            result = StorageFailed()
        finally:
            self.busy = False
        if self.session is not None and not self.closing:
            if isinstance(result, HistoryLoaded | Replayed):
                # A long reply: written as the client reads it, live frames held behind it.
                self.busy = True
                if self.reply is None:
                    self.reply = _Reply()
                self.reply.streaming = True
                if self.held is None:
                    self.held, self.held_bytes = [], 0
                self.apply(self.session.result(result))
                self._send_reply()
            else:
                self.apply(self.session.result(result))
            self._pump()

    def reauthorize(self, room_id: int, access: RoomAccess | None) -> None:
        if self.session is not None and not self.closing:
            self.apply(self.session.reauthorize(room_id, access))


@dataclass(eq=False, slots=True)
class _InFlight:
    """A send, edit or delete (``change``) handed to the batching writer; called with its
    outcome after the commit."""

    conn: Driver
    result: Result | None = None
    change: bool = False

    def __call__(self, outcome: Stored | Exception) -> None:
        if self.change:
            self.result = _change_result(outcome)
        elif isinstance(outcome, tuple):
            self.result = MessageStored(*outcome)
        elif isinstance(outcome, RoomGone):
            self.result = RoomMissing(int(outcome.args[0]) if outcome.args else 0)
        elif isinstance(outcome, ContentRefused):
            self.result = MessageRefused("content refused by storage")
        else:
            if not isinstance(outcome, StoreUnavailable):
                error = outcome if isinstance(outcome, Exception) else None
                log.error("storing a message failed unexpectedly: %r", outcome, exc_info=error)
            self.result = StorageFailed()
        self.conn._advance()


def _change_result(outcome: Stored | Exception) -> Result:
    """The writer's outcome for an edit or delete as the session takes it: the use case's
    mapping (``usecases.change_outcome``), its refusals as status words."""
    try:
        changed = usecases_mod.change_outcome(outcome)
    except usecases_mod.UseCaseError as exc:
        return _refusal(exc)
    except StoreUnavailable:
        return StorageFailed()
    return EventStored(changed.event)


def _refusal(exc: usecases_mod.UseCaseError) -> ChangeRefused:
    """A use case's refusal as the WebSocket's status word: BADARGS with its reason, else
    NOTAUTHORIZED (NoSuchRoom and Forbidden alike: rooms are not probed)."""
    if isinstance(exc, usecases_mod.BadArgs):
        return ChangeRefused(codec.badargs(exc.reason))
    return ChangeRefused(codec.NOTAUTHORIZED)


async def _mark_read(usecases: UseCases, effect: SetReadMark, origin: object) -> Result:
    """Run the mark-read use case (which sends the coalesced receipt); a room the user may
    not read is ``NOTAUTHORIZED``, as for any room command (StoreUnavailable propagates)."""
    try:
        held = await usecases.mark_read(effect.principal, effect.room_id, effect.seq, origin=origin)
    except usecases_mod.BadArgs as exc:
        return ChangeRefused(codec.badargs(exc.reason))
    except usecases_mod.UseCaseError:
        return ChangeRefused(codec.NOTAUTHORIZED)
    return ReadMarked(effect.room_id, held)


async def _open_dm(usecases: UseCases, effect: RunOpenDm) -> Result:
    """Run the open-DM use case; a DM with oneself is ``BADARGS`` with the reason."""
    try:
        opened = await usecases.open_dm(effect.principal, effect.user)
    except usecases_mod.BadArgs as exc:
        return ChangeRefused(codec.badargs(exc.reason))
    except usecases_mod.UseCaseError:
        return ChangeRefused(codec.NOTAUTHORIZED)
    return DmReady(opened.room.id)


@dataclass(frozen=True, slots=True)
class _Replay:
    """Read what a resuming connection missed: seq in (since, live_from), the latest ``cap``."""

    room_id: int
    since: int
    live_from: int

    async def load(self, store: Store, cap: int) -> Replayed:
        missed = max(self.live_from - 1 - self.since, 0)
        if missed == 0:
            return Replayed(self.room_id, (), True)
        query = HistoryQuery(
            room_id=self.room_id,
            limit=min(missed, cap),
            after=self.since,
            before=self.live_from,
            newest=True,
        )
        # Every event of the room's stream: a resume brings the edits and deletions made
        # meanwhile as their own frames.
        return Replayed(self.room_id, tuple(await store.events(query)), missed <= cap)

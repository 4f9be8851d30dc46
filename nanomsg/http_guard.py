"""Connection limits of the HTTP side-port: read timeouts, a cap on open connections, and quiet
logging of malformed requests.

aiohttp has no timeout for a request head that trickles in (its keep-alive timer is an
implementation detail, an hour by default), so a client could hold a connection, and a file
descriptor, for as long as it likes. Here every side-port connection goes through a
``GuardedConnection``, a thin protocol in front of aiohttp's own, which

- refuses connections past ``--http-max-connections`` with a 503 envelope and closes them;
- gives a connection ``--http-header-timeout`` seconds, from when it opens or its previous
  answer was sent, to deliver a complete request head (an idle keep-alive connection counts
  as one that sends no head), and aborts it after that;
- bounds the sending of each answer by ``--http-body-timeout`` (a client that does not read
  its answer is aborted).

The request body has the same ``--http-body-timeout`` to arrive; ``http_api`` reads it under
that bound (``BODY_TIMEOUT`` on the application). The guard learns where a request starts and
ends from ``connection_middleware``, the application's outermost middleware.

All state lives in the ``ConnectionGuard`` owned by the app and in its connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

BODY_TIMEOUT = web.AppKey("body_timeout", float)
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refused connections
CAP_REASON = "too many connections"


def _refusal() -> bytes:
    """The whole answer written to a connection past the cap: a 503 envelope, then close."""
    status = HTTPStatus.SERVICE_UNAVAILABLE
    body = orjson.dumps(
        {
            "meta": {"code": status.value, "message": status.phrase, "reason": CAP_REASON},
            "content": {},
        }
    )
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Access-Control-Allow-Origin: *\r\n"
        "Cache-Control: no-store\r\n"
        "Retry-After: 1\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGuard:
    """Counts the side-port's open connections and holds the limits they are checked against."""

    def __init__(self, *, header_timeout: float, body_timeout: float, max_connections: int) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0  # connections refused since the last log line about them
        self._refusal = _refusal()
        self._last_refusal_log: float | None = None

    def protocol_factory(self, inner: ProtocolFactory) -> Callable[[], GuardedConnection]:
        """A protocol factory for ``loop.create_server`` wrapping aiohttp's ``inner`` one."""
        return lambda: GuardedConnection(self, inner)

    def admit(self) -> bool:
        """Count a new connection in, or refuse it when the cap is reached."""
        if self.open < self.max_connections:
            self.open += 1
            return True
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if self._last_refusal_log is None or now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            # One line per interval however many are refused, so a flood cannot flood the log.
            log.warning(
                "side-port at its cap of %d connections: %d connection(s) refused with 503",
                self.max_connections,
                self.refused,
            )
            self._last_refusal_log = now
            self.refused = 0
        return False

    def release(self) -> None:
        self.open -= 1

    @property
    def refusal(self) -> bytes:
        return self._refusal


class GuardedConnection(asyncio.Protocol):
    """One side-port connection: aiohttp's protocol behind a head timer and the cap.

    Only the methods asyncio calls on a protocol are forwarded; aiohttp talks to the transport
    directly, so nothing else passes through here.
    """

    def __init__(self, guard: ConnectionGuard, inner_factory: ProtocolFactory) -> None:
        self._guard = guard
        self._inner_factory = inner_factory
        self._inner: asyncio.BaseProtocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._closed = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._guard.admit():
            transport.write(self._guard.refusal)
            transport.close()
            return
        self._counted = True
        self._arm()
        self._inner = self._inner_factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if isinstance(self._inner, asyncio.Protocol):
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if isinstance(self._inner, asyncio.Protocol):
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._disarm()
        if self._counted:
            self._counted = False
            self._guard.release()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # -- requests ---------------------------------------------------------------------------

    def request_started(self) -> None:
        """A complete request head arrived: the head timer stops."""
        self._disarm()

    def request_finished(self) -> None:
        """The answer was sent: the next request head has ``header_timeout`` from now."""
        if not self._closed:
            self._arm()

    async def send(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Send ``response`` now, giving the client ``body_timeout`` to take it.

        aiohttp would send it after the middleware returns; sending it here tells the guard when
        the answer is out, and bounds a client that does not read. aiohttp's own
        prepare/write_eof afterwards finds the response already sent and does nothing.
        """
        try:
            async with asyncio.timeout(self._guard.body_timeout):
                await response.prepare(request)
                await response.write_eof()
            if not response.keep_alive and self._transport is not None:
                # An answer that ends the connection (a 408 for a body that stalled, say):
                # close now, rather than let aiohttp linger reading what is left of the body.
                self._transport.close()
        except TimeoutError:
            self.abort(f"answer not taken within {self._guard.body_timeout:g} s")
        except ConnectionError:
            pass  # the client left; aiohttp sees it too and drops the connection

    def abort(self, why: str) -> None:
        """Drop the connection at once (no lingering: the peer is not cooperating)."""
        if self._transport is not None and not self._closed:
            peer = self._transport.get_extra_info("peername")
            log.debug("side-port connection from %s closed: %s", peer, why)
            self._transport.abort()

    # -- the head timer ----------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.header_timeout, self._head_overdue)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_overdue(self) -> None:
        self._timer = None
        self.abort(f"no complete request head within {self._guard.header_timeout:g} s")


def connection_of(request: web.BaseRequest) -> GuardedConnection | None:
    """The guarded connection ``request`` came on; None when served without the guard (tests
    that run the application on aiohttp's own test server)."""
    transport = request.transport
    if transport is None:
        return None
    protocol = transport.get_protocol()
    return protocol if isinstance(protocol, GuardedConnection) else None


@web.middleware
async def connection_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: tells the connection where a request starts and ends."""
    conn = connection_of(request)
    if conn is None:
        return await handler(request)
    conn.request_started()
    try:
        response = await handler(request)
        await conn.send(request, response)
        return response
    finally:
        conn.request_finished()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through ``guard``; otherwise aiohttp's ``TCPSite``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            reuse_port=self._reuse_port or None,
        )


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, except that a malformed request (a parse error, such as a NUL
    in a header) is one DEBUG line without traceback: any client can send one, so it must not
    write an ERROR with a traceback per request. Everything else passes through unchanged."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            remote = args[0] if args else "?"
            # aiohttp's message goes on to quote the offending bytes over several lines.
            what = str(exc.message).partition("\n")[0].rstrip(": ")
            log.debug("malformed HTTP request from %s: %s", remote, what)
            return
        super().log(level, msg, *args, **kwargs)


def server_log() -> ServerLog:
    """The logger to give aiohttp's request handlers (``AppRunner(logger=...)``)."""
    return ServerLog(logging.getLogger("aiohttp.server"))

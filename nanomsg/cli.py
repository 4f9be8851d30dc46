"""Command line: ``nanomsg serve | migrate | token``. Every setting is a flag and a variable."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from nanomsg.app import App, build_verifier, tune_collector, url_host
from nanomsg.auth import is_uuid, mint
from nanomsg.clock import SystemClock, utc_datetime
from nanomsg.config import OPTIONS, Config, ConfigError, add_options, duration, from_namespace
from nanomsg.store.base import NewRoom, StoreUnavailable
from nanomsg.supervisor import Supervisor

DEV_ENTITY = "00000000-0000-4000-8000-00000000d3e7"
DEV_USERS = ("00000000-0000-4000-8000-0000000000a1", "00000000-0000-4000-8000-0000000000b2")
# The settings `nanomsg token` signs with; the only server flags its --help lists.
TOKEN_SETTINGS = ("jwt_secret", "jwt_audience", "jwt_issuer")


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanomsg", description="nanomsg chat server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the WebSocket server and the HTTP side-port")
    add_options(serve, environ)
    migrate = sub.add_parser("migrate", help="apply pending database migrations and exit")
    add_options(migrate, environ)
    token = sub.add_parser(
        "token",
        help="mint an HS256 token for testing",
        description="Print an HS256 token signed with the server's secret, with the server's "
        "audience and issuer (if set), on one line.",
    )
    token.add_argument("--user", required=True, help="userUUID claim (a UUID)")
    token.add_argument("--entity", required=True, help="entityUUID claim (a UUID)")
    token.add_argument("--level", type=int, default=100, help="levelOnEntity claim")
    token.add_argument("--ttl", type=duration, default=3600.0, help="lifetime: 3600, 30m, 1h")
    _add_settings(token, environ, TOKEN_SETTINGS)
    return parser


def _add_settings(
    parser: argparse.ArgumentParser, environ: dict[str, str], names: Sequence[str]
) -> None:
    """Add the flags of the settings ``names`` only, after the command's own, each defaulting
    to its variable.

    ``token`` shows its own flags and the three settings it signs with, not the server's ~30
    (``add_options`` adds every setting); the rest of its Config keeps the defaults, unused.
    """
    group = parser.add_argument_group("signing (the server's settings)")
    for opt in OPTIONS:
        if opt.name not in names:
            continue
        raw = environ.get(opt.env)
        try:
            default = opt.default if raw is None else opt.kind(raw)
        except ValueError as exc:
            raise ConfigError(f"{opt.env}: {exc}") from None
        group.add_argument(
            opt.flag,
            dest=opt.name,
            type=opt.kind,
            default=default,
            help=f"{opt.help} [env {opt.env}]",
        )


def _secret_source(config: Config, environ: dict[str, str]) -> str:
    """Where a set signing secret came from: its variable, else the flag (which overrides it)."""
    return (
        "NANOMSG_JWT_SECRET"
        if environ.get("NANOMSG_JWT_SECRET") == config.jwt_secret
        else "--jwt-secret"
    )


def main(argv: Sequence[str] | None = None) -> int:
    environ = dict(os.environ)
    try:
        args = build_parser(environ).parse_args(argv)
        config = from_namespace(args)
        if args.command == "token":
            return _token(config, args)
        if args.command == "migrate":
            config.validate(need_key=False)
            return _run(_migrate(config))
        # The dev banner prints a secret it generated; one the operator set is not printed
        # (it may be a real one), the banner names where it came from instead.
        secret_source = _secret_source(config, environ) if config.jwt_secret else ""
        if config.dev and not config.jwt_secret:
            config = replace(config, jwt_secret=secrets.token_hex(32))
        config.validate()
        build_verifier(config, SystemClock())  # a bad key file is a configuration error
    except ConfigError as exc:
        print(f"nanomsg: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.workers > 1:
        return _run(Supervisor(config).run())
    return _run(_serve(config, secret_source))


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        loop_factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(coro)
    except StoreUnavailable as exc:
        print(f"nanomsg: storage unavailable: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nanomsg: {exc}", file=sys.stderr)
        return 1


def _token(config: Config, args: argparse.Namespace) -> int:
    if not config.jwt_secret:
        raise ConfigError("no signing secret: set NANOMSG_JWT_SECRET (or --jwt-secret)")
    config.validate()
    for flag, value in (("--user", args.user), ("--entity", args.entity)):
        if not is_uuid(value):
            raise ConfigError(f"{flag} must be a UUID (the server refuses anything else)")
    print(
        mint(
            secret=config.jwt_secret,
            user=args.user,
            entity=args.entity,
            level=args.level,
            now=SystemClock().wall(),
            ttl=args.ttl,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
        )
    )
    return 0


async def _migrate(config: Config) -> int:
    from nanomsg.store.factory import store_from_url

    store = store_from_url(config.database_url, pg_pool_size=1)
    await store.open()
    await store.close()
    print("nanomsg: migrations applied")
    return 0


async def _serve(config: Config, secret_source: str = "") -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    app = App(config)
    try:
        await app.start()
    except BaseException:
        # Release what did start (an open store keeps a worker thread alive).
        await app.stop()
        raise
    tune_collector()
    try:
        if config.dev:
            await _dev_banner(app, config, secret_source)
        await stop.wait()
    finally:
        await app.stop()
    return 0


async def _dev_banner(app: App, config: Config, secret_source: str) -> None:
    """Print ready tokens, a room to select and a wscat line, for trying the server by hand.

    ``secret_source`` names the variable or flag the signing secret came from; empty when the
    secret was generated for this run, which is then printed so other tools can sign with it.
    """
    clock = app.clock
    rooms = await app.store.rooms_visible_to(DEV_USERS[0], DEV_ENTITY, 100, 1, 0)
    if rooms:
        room = rooms[0]
    else:
        room = await app.store.create_room(
            NewRoom(
                name="dev-lobby",
                level_admin=100,
                type="group",
                entity_owner=DEV_ENTITY,
                max_entity_rules=100,
                creator_user=DEV_USERS[0],
                creator_level=100,
                now=utc_datetime(clock.wall()),
            )
        )
    tokens = [
        mint(
            secret=config.jwt_secret,
            user=user,
            entity=DEV_ENTITY,
            level=100,
            now=clock.wall(),
            ttl=86400,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
        )
        for user in DEV_USERS
    ]
    host = url_host(config.host)
    url = f"ws://{host}:{app.ws_port}/chat"
    print(
        "\n".join(
            [
                *(
                    [
                        "nanomsg dev mode: a fresh signing secret for this run only.",
                        f"  NANOMSG_JWT_SECRET={config.jwt_secret}",
                    ]
                    if not secret_source
                    else [f"nanomsg dev mode: tokens signed with the secret from {secret_source}."]
                ),
                f"  room {room.id} ({room.name}) is open to both users below",
                f"  token A: {tokens[0]}",
                f"  token B: {tokens[1]}",
                f"  try:  npx wscat -c {url}",
                f'  then: {{"type":"token","content":"{tokens[0]}"}}',
                f'        {{"type":"select_room","room_id":{room.id}}}',
                '        {"type":"message","content":"hello"}',
                f"  HTTP: curl -H 'Authorization: Bearer <token>' "
                f"http://{host}:{app.http_port}/rooms",
            ]
        ),
        flush=True,
    )

"""Shared fixtures: key material, token factory, and real PostgreSQL/Redis endpoints.

Tests that need PostgreSQL or Redis skip with a clear reason when those are unreachable, unless
NANOMSG_REQUIRE_SERVICES=1, in which case they fail: CI must never silently skip them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import socket
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import uvloop

from nanomsg.auth import mint
from nanomsg.clock import SystemClock

SECRET = "test-secret-0123456789abcdef-0123456789"
PG_URL = os.environ.get("NANOMSG_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("NANOMSG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE = os.environ.get("NANOMSG_REQUIRE_SERVICES", "") not in ("", "0", "false", "no")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def _need(service: str, url: str, default_port: int) -> None:
    if _reachable(url, default_port):
        return
    message = f"{service} unreachable at {url}"
    if REQUIRE:
        pytest.fail(f"{message} and NANOMSG_REQUIRE_SERVICES is set")
    pytest.skip(f"{message}; start it or set NANOMSG_TEST_* to run these tests")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _create_db(name: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_db(name: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _run_sync(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to completion from sync code, even when a loop is already running
    in this thread (a sync fixture requested from inside an async one)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coro).result()


def new_pg_database() -> tuple[str, Callable[[], None]]:
    """Create an empty database; returns its URL and a function that drops it."""
    _need("PostgreSQL", PG_URL, 5432)
    name = "nanomsg_t_" + secrets.token_hex(6)
    _run_sync(_create_db(name))
    return with_database(PG_URL, name), lambda: _run_sync(_drop_db(name))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database shared by the session's tests; tests isolate by creating their own rooms."""
    url, drop = new_pg_database()
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty database for one test (migrations and the like)."""
    url, drop = new_pg_database()
    try:
        yield url
    finally:
        drop()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, as the server does in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def redis_url() -> str:
    _need("Redis", REDIS_URL, 6379)
    return REDIS_URL


@pytest.fixture
def secret() -> str:
    return SECRET


TokenFactory = Callable[..., str]


@pytest.fixture
def make_token() -> TokenFactory:
    """make_token(user=..., entity=..., level=100, ttl=3600, **extra claims) -> HS256 token."""

    def factory(
        user: str | None = None,
        entity: str | None = None,
        level: int = 100,
        ttl: float = 3600.0,
        now: float | None = None,
    ) -> str:
        return mint(
            secret=SECRET,
            user=user or str(uuid.uuid4()),
            entity=entity or str(uuid.uuid4()),
            level=level,
            now=SystemClock().wall() if now is None else now,
            ttl=ttl,
        )

    return factory


def pytest_unconfigure(config: pytest.Config) -> None:
    """Fail the run, naming them, when threads that keep the process alive are left behind
    (an aiosqlite connection never closed, say): the interpreter would wait for them at exit
    and CI would hang after printing a green summary."""
    import sys
    import threading
    import time

    deadline = time.monotonic() + 2.0
    while True:
        left = [
            t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        names = ", ".join(sorted(t.name for t in left))
        print(
            f"threads left running after the tests (close what a test opens): {names}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(int(pytest.ExitCode.TESTS_FAILED))

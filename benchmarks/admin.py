"""Room and member setup through the HTTP side-port (README "HTTP API"), as a partner backend
would do it: ``POST /rooms`` and ``PUT /rooms/{id}/members`` with ``Authorization: Bearer``.

The admin identity of a run is user 0 of entity 0 at level 100 (enough to create rooms under
the default ``--room-create-level``). Rooms are created with ``level_admin`` 1000 so that
nobody is an owner-entity admin by level: members get their rights from rules, the path real
traffic takes. A ``group`` room's automatic entity rule (``rw`` from level 100 of the
creator's entity) admits the fan-out subscribers; chat users come from another entity at
level 0 and get one ``rw`` user rule each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp

from benchmarks.tokens import entity_uuid, mint, user_uuid

ADMIN_USER = 0
ADMIN_ENTITY = 0
USER_ENTITY = 1


class SetupError(RuntimeError):
    """The side-port refused a setup request."""


class Admin:
    """A partner backend's HTTP client for one run (bounded concurrency)."""

    def __init__(
        self,
        http_url: str,
        *,
        secret: str,
        nonce: int,
        audience: str = "",
        issuer: str = "",
        concurrency: int = 32,
    ) -> None:
        self.base = http_url.rstrip("/")
        self.token = mint(
            secret,
            user=user_uuid(nonce, ADMIN_USER),
            entity=entity_uuid(nonce, ADMIN_ENTITY),
            level=100,
            audience=audience,
            issuer=issuer,
        )
        self.concurrency = concurrency
        self.session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> Admin:
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.token}"},
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.session is not None
        self.requests += 1
        try:
            async with self.session.request(method, self.base + path, json=body) as resp:
                try:
                    data: dict[str, Any] = await resp.json(content_type=None)
                except Exception:
                    data = {}
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SetupError(f"{method} {self.base}{path}: {exc}") from None
        if status not in (200, 201):
            reason = data.get("meta", {}).get("reason", "") if isinstance(data, dict) else ""
            raise SetupError(f"{method} {path}: HTTP {status} {reason}".strip())
        return data

    async def create_room(self, name: str, *, max_entity_rules: int = 100) -> int:
        body = {"name": name, "level_admin": 1000, "max_entity_rules": max_entity_rules}
        data = await self._call("POST", "/rooms", body)
        return int(data["content"]["room"]["id"])

    async def create_rooms(self, prefix: str, count: int, **kwargs: Any) -> list[int]:
        """``count`` rooms named ``prefix-<i>``, created with bounded concurrency, in order."""
        names = [f"{prefix}-{i}" for i in range(count)]
        ids = await self._bounded([self._room_job(n, kwargs) for n in names])
        return [int(i) for i in ids]

    def _room_job(self, name: str, kwargs: dict[str, Any]) -> Any:
        return lambda: self.create_room(name, **kwargs)

    async def add_member(self, room_id: int, user: str, permissions: str = "rw") -> None:
        body = {"userUUID": user, "permissions": permissions}
        await self._call("PUT", f"/rooms/{room_id}/members", body)

    async def add_members(self, pairs: Sequence[tuple[int, str]], permissions: str = "rw") -> None:
        """One user rule per (room, userUUID), with bounded concurrency."""
        await self._bounded([self._member_job(room, user, permissions) for room, user in pairs])

    def _member_job(self, room: int, user: str, permissions: str) -> Any:
        return lambda: self.add_member(room, user, permissions)

    async def _bounded(self, jobs: list[Any]) -> list[Any]:
        """Run zero-argument coroutine factories with ``concurrency`` workers; keep order."""
        results: list[Any] = [None] * len(jobs)
        next_index = 0

        async def lane() -> None:
            nonlocal next_index
            while next_index < len(jobs):
                i = next_index
                next_index += 1
                results[i] = await jobs[i]()

        await asyncio.gather(*(lane() for _ in range(min(self.concurrency, len(jobs)) or 1)))
        return results

"""A throwaway 3-master Redis Cluster built from ``redis-server`` processes, for tests.

Each node listens on 127.0.0.1 on a free port (its cluster bus on port + 10000, which must be
free too), keeps its cluster state in ``nodes-<port>.conf`` under a temporary directory, and
persists no data. ``LocalCluster.stop`` kills every process it started, whatever happened, so
a failing test never leaves servers behind. ``kill`` + ``revive`` SIGKILL one node and start
it again on the same port with the same ``nodes.conf``: it rejoins with the same id and slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import REQUIRE

START_TIMEOUT = 20.0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_ports(count: int) -> list[int]:
    """Ports P whose cluster bus port P + 10000 is free as well, both below the usual ephemeral
    range (32768+), so a restarted node does not find its port taken by some client socket."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(12000, 22000)
        if port not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
    return ports


def need_redis_server() -> None:
    """Skip (or fail under NANOMSG_REQUIRE_SERVICES=1) when the binaries are missing."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if not missing:
        return
    message = f"{' and '.join(missing)} not on PATH: cannot start a local Redis Cluster"
    if REQUIRE:
        pytest.fail(f"{message} and NANOMSG_REQUIRE_SERVICES is set")
    pytest.skip(f"{message}; install redis-server (>= 7.0) to run these tests")


@dataclass
class LocalCluster:
    """Three cluster-enabled redis-server processes joined into one cluster, no replicas."""

    directory: Path
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, index: int) -> str:
        return f"redis://127.0.0.1:{self.ports[index]}"

    # -- process control ------------------------------------------------------------------------

    def _spawn(self, port: int) -> None:
        args = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.directory / f"nodes-{port}.conf"),
            "--cluster-node-timeout",
            "5000",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / f"redis-{port}.log"),
        ]
        self.procs[port] = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start(self) -> None:
        """Start the nodes, create the cluster, wait until every node reports it ok."""
        self.ports = free_cluster_ports(3)
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            self._wait_sync(port, lambda c: bool(c.ping()))
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout!r}")
        for port in self.ports:
            self._wait_sync(port, _cluster_ok_sync)

    def _wait_sync(self, port: int, ready: Callable[[redis.Redis], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            client = redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                if ready(client):
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis node {port} not ready within {START_TIMEOUT}s")
            time.sleep(0.05)

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no goodbye to its clients beyond the socket reset)."""
        proc = self.procs[port]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(5)

    async def revive(self, port: int) -> None:
        """Start a killed node again with its nodes.conf; return once the cluster is ok."""
        self._spawn(port)
        try:
            await self.wait_ok()
        except RuntimeError:
            if self.procs[port].poll() is not None:
                log = (self.directory / f"redis-{port}.log").read_text(errors="replace")
                raise RuntimeError(f"redis node {port} exited on restart:\n{log[-2000:]}") from None
            raise

    async def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Every node answers and reports cluster_state:ok (without blocking the loop)."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while True:
                client = aioredis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
                try:
                    info = await client.execute_command("CLUSTER INFO")
                    if info.get("cluster_state") == "ok":
                        break
                except redis.RedisError:
                    pass
                finally:
                    await client.aclose()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis node {port}: cluster not ok within {timeout}s")
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def move_slot(self, slot: int, to_port: int) -> None:
        """Give an empty slot to another master (the new owner is told first, then the rest);
        the old owner drops its shard channels in that slot and tells their subscribers."""
        ids = {}
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=2.0, decode_responses=True)
            try:
                ids[port] = str(client.execute_command("CLUSTER MYID"))
            finally:
                client.close()
        for port in sorted(self.ports, key=lambda p: p != to_port):
            client = redis.Redis(port=port, socket_timeout=2.0)
            try:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[to_port])
            finally:
                client.close()

    # -- inspection -----------------------------------------------------------------------------

    def slot_owners(self) -> dict[int, int]:
        """Slot -> port of the master serving it, as the first node sees it."""
        client = redis.Redis(port=self.ports[0], socket_timeout=2.0)
        try:
            ranges = client.execute_command("CLUSTER SLOTS")
        finally:
            client.close()
        owners: dict[int, int] = {}
        # Each entry: [first slot, last slot, [master host, master port, id], replicas...].
        for first, last, master, *_replicas in ranges:
            for slot in range(int(first), int(last) + 1):
                owners[slot] = int(master[1])
        return owners

    def shard_numsub(self, port: int, *channels: str) -> dict[str, int]:
        client = redis.Redis(port=port, socket_timeout=2.0, decode_responses=True)
        try:
            pairs = client.execute_command("PUBSUB SHARDNUMSUB", *channels)
        finally:
            client.close()
        return {str(name): int(count) for name, count in pairs}

    def shard_channels(self, port: int, pattern: str) -> set[str]:
        client = redis.Redis(port=port, socket_timeout=2.0, decode_responses=True)
        try:
            names = client.execute_command("PUBSUB SHARDCHANNELS", pattern)
        finally:
            client.close()
        return {str(name) for name in names}


def _cluster_ok_sync(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER INFO")  # parsed into a dict by redis-py
    return bool(info.get("cluster_state") == "ok")


@contextlib.contextmanager
def local_cluster(directory: Path) -> Iterator[LocalCluster]:
    """A started cluster; its processes are killed on exit, even if starting failed halfway."""
    cluster = LocalCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

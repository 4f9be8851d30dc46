"""Settings: one frozen dataclass, built from command-line flags and ``NANOMSG_*`` variables.

Every setting is declared once in ``OPTIONS``; the CLI turns each into a flag (``--jwt-secret``)
whose default comes from the environment variable of the same name (``NANOMSG_JWT_SECRET``).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A setting is missing or invalid; the message is one line naming the variable."""


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # attribute name; flag is --name-with-dashes, env is NANOMSG_NAME
    kind: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "NANOMSG_" + self.name.upper()


def duration(text: str) -> float:
    """Seconds, or a number with a unit: 30s, 5m, 1h, 2d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "127.0.0.1", "address to listen on (both ports)"),
    Option("port", int, 7777, "WebSocket port (path /chat)"),
    Option("http_port", int, 7778, "HTTP side-port for partner backends"),
    Option("database_url", str, "sqlite:///nanomsg.db", "sqlite:///path or postgresql://..."),
    Option("redis_url", str, "", "redis://... to relay between processes; empty: in-process"),
    Option(
        "redis_cluster",
        _bool,
        False,
        "the Redis URL names a node of a Redis Cluster: use sharded pub/sub",
    ),
    Option(
        "redis_prefix",
        str,
        "nanomsg",
        "channel name prefix, so several deployments can share one Redis",
    ),
    Option("jwt_secret", str, "", "HS256 shared secret (at least 32 bytes)"),
    Option("jwt_public_key", str, "", "PEM file with an RS256 or ES256 public key"),
    Option("jwt_audience", str, "", "required 'aud' claim, when set"),
    Option("jwt_issuer", str, "", "required 'iss' claim, when set"),
    Option("jwt_leeway", float, 5.0, "seconds of clock skew allowed on exp"),
    Option("auth_timeout", duration, 10.0, "seconds a new connection has to send a valid token"),
    Option("refresh_grace", duration, 30.0, "seconds an expired connection has to send a token"),
    Option("max_frame", int, 65536, "largest incoming WebSocket message, in bytes (close 1009)"),
    Option("max_content", int, 4096, "longest message content, in code points (TOOLARGE)"),
    Option("room_create_level", int, 100, "levelOnEntity needed to create rooms"),
    Option(
        "http_header_timeout",
        duration,
        10.0,
        "seconds a side-port connection has to send a request head (from opening or last answer)",
    ),
    Option(
        "http_body_timeout",
        duration,
        30.0,
        "seconds a side-port request body has to arrive, and an answer to be taken by the client",
    ),
    Option(
        "http_max_connections",
        int,
        1024,
        "side-port connections open at once; more are answered 503 and closed",
    ),
    Option("max_backlog", int, 1 << 20, "bytes queued to a slow reader before it is closed"),
    Option(
        "max_outbound",
        int,
        256 << 20,
        "bytes queued to all readers of the process; past it the largest backlogs are closed",
    ),
    Option(
        "ping_interval",
        duration,
        20.0,
        "seconds between keepalive pings; no pong by the next ping closes (0: off)",
    ),
    Option(
        "compression",
        _bool,
        False,
        "offer permessage-deflate (room messages compressed once per message)",
    ),
    Option("pg_pool_size", int, 10, "PostgreSQL connections per process"),
    Option(
        "list_cache_mb",
        int,
        64,
        "MiB of conversation-list entries kept per process on PostgreSQL (0: none)",
    ),
    Option(
        "write_shards",
        int,
        2,
        "message writers per process, each committing one batch at a time (rooms by id)",
    ),
    Option("write_batch", int, 500, "most messages committed in one storage transaction"),
    Option(
        "resume_cap", int, 1000, "most room events replayed by select_room or subscribe with since"
    ),
    Option(
        "max_subscriptions",
        int,
        500,
        "rooms one connection may hold at once (subscribe, select_room); one more is TOOMANY",
    ),
    Option("workers", int, 1, "processes sharing the ports (SO_REUSEPORT); >1 needs Redis"),
    Option(
        "reuse_port",
        _bool,
        False,
        "bind with SO_REUSEPORT so several processes share the ports (set for workers)",
    ),
    Option(
        "shutdown_timeout",
        duration,
        10.0,
        "seconds SIGTERM waits for sends in flight before closing",
    ),
    Option("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Option("dev", _bool, False, "generate a signing secret and print ready tokens"),
)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 7777
    http_port: int = 7778
    database_url: str = "sqlite:///nanomsg.db"
    redis_url: str = ""
    redis_cluster: bool = False
    redis_prefix: str = "nanomsg"
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway: float = 5.0
    auth_timeout: float = 10.0
    refresh_grace: float = 30.0
    max_frame: int = 65536
    max_content: int = 4096
    room_create_level: int = 100
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_max_connections: int = 1024
    max_backlog: int = 1 << 20
    max_outbound: int = 256 << 20
    ping_interval: float = 20.0
    compression: bool = False
    pg_pool_size: int = 10
    list_cache_mb: int = 64
    write_shards: int = 2
    write_batch: int = 500
    resume_cap: int = 1000
    max_subscriptions: int = 500
    workers: int = 1
    reuse_port: bool = False
    shutdown_timeout: float = 10.0
    log_level: str = "INFO"
    dev: bool = False

    def validate(self, *, need_key: bool = True) -> Config:
        """Raise ConfigError naming the variable of the first invalid setting."""
        if need_key and not self.jwt_secret and not self.jwt_public_key:
            raise ConfigError(
                "no signing key: set NANOMSG_JWT_SECRET (or --jwt-secret), "
                "NANOMSG_JWT_PUBLIC_KEY, or run `nanomsg serve --dev`"
            )
        if self.jwt_secret and len(self.jwt_secret.encode()) < 32:
            raise ConfigError("NANOMSG_JWT_SECRET must be at least 32 bytes")
        if not (
            self.database_url.startswith("sqlite://")
            or self.database_url.startswith(("postgresql://", "postgres://"))
        ):
            raise ConfigError("NANOMSG_DATABASE_URL must start with sqlite:// or postgresql://")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("NANOMSG_REDIS_URL must start with redis://, rediss:// or unix://")
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(f"NANOMSG_{name.upper()} must be a port number (0-65535)")
        positive = (
            "auth_timeout",
            "refresh_grace",
            "max_frame",
            "max_content",
            "max_backlog",
            "http_header_timeout",
            "http_body_timeout",
            "http_max_connections",
            "max_outbound",
        )
        for name in positive:
            # Written so that nan and inf (which float() and duration() accept) are refused too.
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"NANOMSG_{name.upper()} must be positive")
        if not 0 <= self.jwt_leeway < math.inf:  # nan here would make every token never expire
            raise ConfigError("NANOMSG_JWT_LEEWAY must be a finite number of seconds >= 0")
        if self.workers < 1:
            raise ConfigError("NANOMSG_WORKERS must be at least 1")
        if self.workers > 1 and not self.redis_url:
            raise ConfigError(
                "NANOMSG_WORKERS > 1 needs NANOMSG_REDIS_URL: workers relay through Redis"
            )
        if self.workers > 1 and (self.port == 0 or self.http_port == 0):
            raise ConfigError("NANOMSG_WORKERS > 1 needs fixed ports: port 0 cannot be shared")
        if self.redis_cluster and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ConfigError(
                "NANOMSG_REDIS_CLUSTER needs a redis:// NANOMSG_REDIS_URL naming a cluster node"
            )
        if self.resume_cap < 1:
            raise ConfigError("NANOMSG_RESUME_CAP must be at least 1")
        if self.max_subscriptions < 1:
            raise ConfigError("NANOMSG_MAX_SUBSCRIPTIONS must be at least 1")
        if not 0 < self.shutdown_timeout < math.inf:
            raise ConfigError("NANOMSG_SHUTDOWN_TIMEOUT must be positive")
        for name in ("write_shards", "write_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"NANOMSG_{name.upper()} must be at least 1")
        if self.pg_pool_size < 1:
            raise ConfigError("NANOMSG_PG_POOL_SIZE must be at least 1")
        if not 0 <= self.list_cache_mb <= 1 << 20:
            raise ConfigError("NANOMSG_LIST_CACHE_MB must be between 0 and 1048576")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("NANOMSG_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        return self


def add_options(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Add one flag per setting; each flag's default is its environment variable's value."""
    for opt in OPTIONS:
        raw = environ.get(opt.env)
        if raw is not None:
            try:
                default = opt.kind(raw)
            except ValueError as exc:
                raise ConfigError(f"{opt.env}: {exc}") from None
        else:
            default = opt.default
        if opt.kind is _bool:
            parser.add_argument(
                opt.flag,
                dest=opt.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{opt.help} [env {opt.env}]",
            )
        else:
            parser.add_argument(
                opt.flag,
                dest=opt.name,
                type=opt.kind,
                default=default,
                help=f"{opt.help} [env {opt.env}; default {opt.default!r}]",
            )


def from_namespace(ns: argparse.Namespace) -> Config:
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in vars(ns).items() if k in names})


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Build a Config from ``NANOMSG_*`` variables only (used by tests and tools)."""
    parser = argparse.ArgumentParser()
    add_options(parser, os.environ if environ is None else environ)
    ns = parser.parse_args([])
    for key, value in overrides.items():
        setattr(ns, key, value)
    return from_namespace(ns)

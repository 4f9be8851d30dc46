"""Relay through a Redis Cluster with sharded pub/sub (placeholder until implemented)."""

from __future__ import annotations

from nanomsg.relay.redis import RedisRelay


class RedisClusterRelay(RedisRelay):
    """Not implemented yet: behaves as RedisRelay against one node."""

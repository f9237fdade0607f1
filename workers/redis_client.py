"""A plain Redis client per broker URL and process, for discflow's own keys."""
from __future__ import annotations

import os
from functools import lru_cache

import redis


@lru_cache(maxsize=4)
def _client(url: str, pid: int) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=30, health_check_interval=30)


def redis_client(url: str) -> redis.Redis:
    # Keyed by pid: a prefork child must not reuse its parent's socket.
    return _client(url, os.getpid())

"""Per-job progress counters in Redis, for progress bars and `discflow status`."""
from __future__ import annotations

from workers import redis_keys
from workers.redis_client import redis_client


def set_total(broker_url: str, job_id: str, stage: str, total: int) -> None:
    key = redis_keys.job_progress(job_id)
    redis_client(broker_url).pipeline().hset(key, f"{stage}:total", total).expire(key, 86400).execute()


def advance(broker_url: str, job_id: str, stage: str, done: int = 1) -> None:
    key = redis_keys.job_progress(job_id)
    redis_client(broker_url).pipeline().hincrby(key, f"{stage}:done", done).expire(key, 86400).execute()


def read(broker_url: str, job_id: str) -> dict[str, int]:
    raw = redis_client(broker_url).hgetall(redis_keys.job_progress(job_id))
    return {key.decode(): int(value) for key, value in raw.items()}


def restart(broker_url: str, job_id: str) -> None:
    """Zero the done-counters (totals stay) before a resumed run counts again."""
    client = redis_client(broker_url)
    key = redis_keys.job_progress(job_id)
    done = [field for field in client.hkeys(key) if field.endswith(b":done")]
    if done:
        client.hdel(key, *done)

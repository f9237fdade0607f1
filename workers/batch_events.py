"""Which of an import's store batches have started and finished, so that its finish task can wait
for the last ones by blocking on Redis instead of polling every 0.1 s (which added 50 ms to an
import on average). It blocks only while every missing batch is running in another process: a
batch still queued may need the very slot the finish holds."""
from __future__ import annotations

import time

from workers import redis_keys
from workers.redis_client import redis_client

EXPIRE_SECONDS = 86400


def started(broker_url: str, job_id: str, number: int) -> None:
    key = redis_keys.job_batches_running(job_id)
    redis_client(broker_url).pipeline().sadd(key, number).expire(key, EXPIRE_SECONDS).execute()


def finished(broker_url: str, job_id: str, number: int) -> None:
    key = redis_keys.job_batches_done(job_id)
    pipeline = redis_client(broker_url).pipeline().rpush(key, number).expire(key, EXPIRE_SECONDS)
    pipeline.delete(redis_keys.job_batches_waited_since(job_id)).execute()  # the job moves: no batch is overdue


def restart(broker_url: str, job_id: str) -> None:
    """Forget the last run's batches (a resumed job runs its unfinished ones again)."""
    redis_client(broker_url).delete(redis_keys.job_batches_running(job_id), redis_keys.job_batches_done(job_id),
                                    redis_keys.job_batches_waited_since(job_id))


def wait_for_one(broker_url: str, job_id: str, missing: list[int], timeout: float) -> bool:
    """Block until some batch finishes (at most ``timeout`` s) when all of ``missing`` are running;
    False at once when one of them has not started."""
    client = redis_client(broker_url)
    running = client.smembers(redis_keys.job_batches_running(job_id))
    if not {str(number).encode() for number in missing} <= running:
        return False
    client.blpop([redis_keys.job_batches_done(job_id)], timeout=max(timeout, 0.01))  # 0 would block forever
    return True


def overdue(broker_url: str, job_id: str, missing: list[int], after_seconds: float) -> list[int]:
    """The batches of ``missing`` that never started although no batch has finished for
    ``after_seconds`` while the finish waited (its first call starts that clock, each finished batch
    resets it). Returning some restarts the clock, so batches sent again are given as long."""
    client = redis_client(broker_url)
    key = redis_keys.job_batches_waited_since(job_id)
    now = time.time()
    client.set(key, now, nx=True, ex=EXPIRE_SECONDS)
    if now - float(client.get(key) or now) < after_seconds:
        return []
    running = client.smembers(redis_keys.job_batches_running(job_id))
    lost = [number for number in missing if str(number).encode() not in running]
    if lost:
        client.set(key, now, ex=EXPIRE_SECONDS)
    return lost

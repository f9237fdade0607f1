"""Cancelling a job: a flag in Redis that every task of the job checks before it starts work.

Revoking by task id cannot reach tasks that a canvas has not published yet; a flag can.
"""
from __future__ import annotations

from workers import redis_keys
from workers.redis_client import redis_client


class JobCancelled(Exception):
    """The operator cancelled the job; its remaining tasks stop before doing any work."""


def cancel(broker_url: str, job_id: str, ttl_seconds: int = 7 * 86400) -> None:
    redis_client(broker_url).set(redis_keys.job_cancelled(job_id), 1, ex=ttl_seconds)


def uncancel(broker_url: str, job_id: str) -> None:
    redis_client(broker_url).delete(redis_keys.job_cancelled(job_id))


def is_cancelled(broker_url: str, job_id: str) -> bool:
    return bool(redis_client(broker_url).exists(redis_keys.job_cancelled(job_id)))


def ensure_not_cancelled(task, job_id: str) -> None:
    """Raise JobCancelled when the job was cancelled (call first thing in a task)."""
    if is_cancelled(task.app.conf.broker_url, job_id):
        raise JobCancelled(f"job {job_id} was cancelled")

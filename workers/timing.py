"""Stage timing: the one place where every task's queue wait, run time and bytes are recorded.

The publish time is stamped into a message header (Celery has no enqueue timestamp of its own);
the worker measures the rest. Records go to a Redis list per job today; the ledger subscribes
to the same records (``add_sink``).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from celery.signals import before_task_publish

from workers import redis_keys
from workers.redis_client import redis_client

PUBLISHED_HEADER = "discflow_published"


@dataclass
class TaskTiming:
    job_id: str
    stage: str
    task_id: str
    started: float
    name: str = ""
    worker: str = ""
    finished: float = 0.0
    queue_wait: float = 0.0
    instances: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def count(self, instances: int = 0, bytes_in: int = 0, bytes_out: int = 0) -> None:
        self.instances += instances
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out


Sink = Callable[[TaskTiming], None]
_sinks: list[Sink] = []


def add_sink(sink: Sink) -> None:
    """Register another consumer of timing records (e.g. the job ledger)."""
    _sinks.append(sink)


@before_task_publish.connect
def _stamp_publish_time(headers: dict | None = None, **_: object) -> None:
    if headers is not None:
        headers.setdefault(PUBLISHED_HEADER, time.time())


def _published_at(task) -> float | None:
    request = getattr(task, "request", None)
    value = getattr(request, PUBLISHED_HEADER, None) if request is not None else None
    if value is None and request is not None:
        value = (getattr(request, "headers", None) or {}).get(PUBLISHED_HEADER)
    return float(value) if value is not None else None


@contextmanager
def stage_timer(task, job_id: str, stage: str, part: str = "") -> Iterator[TaskTiming]:
    """Time one task run; the body adds instance and byte counts to the yielded record.

    A task that runs two stages times each with its own ``part``: records are keyed by task id
    and name, so the part is appended to the name (``discflow.store.import_batch:prepare``)."""
    started = time.time()
    published = _published_at(task)
    request = getattr(task, "request", None)
    name = (getattr(task, "name", "") or "") + (f":{part}" if part else "")
    record = TaskTiming(job_id=job_id, stage=stage, task_id=getattr(request, "id", None) or "", started=started,
                        name=name, worker=getattr(request, "hostname", None) or "",
                        queue_wait=max(0.0, started - published) if published else 0.0)
    try:
        yield record
    finally:
        record.finished = time.time()
        _emit(task, record)


def _emit(task, record: TaskTiming) -> None:
    app = getattr(task, "app", None)
    if app is not None:
        client = redis_client(app.conf.broker_url)
        key = redis_keys.job_timings(record.job_id)
        client.pipeline().rpush(key, json.dumps(asdict(record))).expire(
            key, app.conf.result_expires or 86400).execute()
    for sink in _sinks:
        sink(record)


def read_timings(app, job_id: str) -> list[TaskTiming]:
    raw = redis_client(app.conf.broker_url).lrange(redis_keys.job_timings(job_id), 0, -1)
    records = [TaskTiming(**json.loads(item)) for item in raw]
    # A redelivered task (at-least-once) reports twice: its last run counts.
    return list({(r.task_id, r.name): r for r in records}.values())

"""The import's finish waits on Redis for the last batches, only while they run elsewhere."""
from __future__ import annotations

import threading
import time

from workers import batch_events


def test_the_finish_blocks_only_while_every_missing_batch_runs(system_redis: str) -> None:
    job = "job-batch-events"
    started = time.monotonic()
    assert not batch_events.wait_for_one(system_redis, job, [0, 1], timeout=5)  # queued: give the slot back
    assert time.monotonic() - started < 1
    batch_events.started(system_redis, job, 0)
    batch_events.started(system_redis, job, 1)
    threading.Timer(0.3, batch_events.finished, (system_redis, job, 1)).start()
    started = time.monotonic()
    assert batch_events.wait_for_one(system_redis, job, [0, 1], timeout=5)
    assert 0.25 < time.monotonic() - started < 2  # woken by the batch, not by the timeout
    started = time.monotonic()
    assert batch_events.wait_for_one(system_redis, job, [0], timeout=0.3)  # nothing finishes: the timeout
    assert 0.25 < time.monotonic() - started < 2
    batch_events.restart(system_redis, job)  # a resumed job: the last run's batches run again
    assert not batch_events.wait_for_one(system_redis, job, [0], timeout=5)


def test_a_batch_that_never_started_is_overdue_only_while_the_job_stands_still(system_redis: str) -> None:
    job = "job-batch-overdue"
    batch_events.restart(system_redis, job)
    assert batch_events.overdue(system_redis, job, [3, 4], after_seconds=0.3) == []  # starts the clock
    batch_events.started(system_redis, job, 3)
    time.sleep(0.2)
    batch_events.finished(system_redis, job, 2)  # the job moves: the clock starts again
    assert batch_events.overdue(system_redis, job, [3, 4], after_seconds=0.3) == []
    time.sleep(0.4)
    assert batch_events.overdue(system_redis, job, [3, 4], after_seconds=0.3) == [4], "3 runs; 4 was lost"
    assert batch_events.overdue(system_redis, job, [3, 4], after_seconds=0.3) == [], "sent again: wait anew"
    batch_events.restart(system_redis, job)

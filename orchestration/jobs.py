"""Submitting jobs, following them to the end, cancelling and resuming them (the Python API behind
the CLI, the batch files and the HTTP API)."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from celery.result import AsyncResult
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestration.ledger import Ledger
from tasks.scan import REQUEST, resume_job_task, scan_export_task, scan_import_task
from tasks.spool import JobSpool
from workers import job_control, progress
from workers.app import PRIORITIES, app
from workers.settings import get_settings

ProgressCallback = Callable[[dict[str, int]], None]
FIRST_TASK = {"export": scan_export_task, "import": scan_import_task}


class JobFailed(Exception):
    """The job could not run at all (bad source, broken canvas); the message is for the operator."""


class JobCancelledError(JobFailed):
    """The operator cancelled the job while the client was waiting for it."""


class UnknownJob(LookupError):
    pass


def new_job_id(kind: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    return f"{kind[:2]}{stamp}-{uuid.uuid4().hex[:8]}"


def submit(kind: str, request: dict[str, Any], priority: str = "normal", submitted_by: str | None = None) -> str:
    """Record the job in the ledger, write its request to the spool, publish its first task.

    The scan task's id is the job id: Celery carries it through ``replace`` to the final task,
    so the job's result is this id's result. Every later task inherits the priority.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; choose one of {', '.join(PRIORITIES)}")
    job_id = new_job_id(kind)
    spool = JobSpool(get_settings().spool_dir, job_id).create()
    spool.write(REQUEST, {**request, "priority": priority})
    Ledger().create_job(job_id, kind, request, priority, submitted_by)
    try:
        FIRST_TASK[kind].apply_async((job_id,), task_id=job_id, priority=PRIORITIES[priority])
    except Exception as error:  # a job that was never queued must not stay "queued" in the ledger
        Ledger().fail_job(job_id, f"could not queue the job: {error}")
        raise
    return job_id


def submit_export(request: dict[str, Any], priority: str = "normal") -> str:
    return submit("export", request, priority)


def submit_import(request: dict[str, Any], priority: str = "normal") -> str:
    return submit("import", request, priority)


def wait(job_id: str, on_progress: ProgressCallback | None = None, timeout: float | None = None,
         poll_seconds: float = 0.02, task_id: str | None = None,
         health_check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Block until the job's last task has finished; return its (counts-only) result.

    ``task_id`` names the run to follow when it is not the first (``resume`` starts a new one);
    ``health_check`` raises when the workers this client started have died.
    """
    result = AsyncResult(task_id or job_id, app=app)
    limit = timeout or get_settings().job_timeout_seconds
    deadline = time.monotonic() + limit
    while not _ready(result):
        if time.monotonic() > deadline:
            raise JobFailed(f"job {job_id} did not finish within {limit:.0f} s")
        if on_progress:
            _quietly(on_progress, lambda: progress.read(app.conf.broker_url, job_id))
        if health_check:
            health_check()
        time.sleep(poll_seconds)
    if result.failed():
        _await_ledger(job_id)
        raise _failure(job_id, result.result)
    if on_progress:
        on_progress(progress.read(app.conf.broker_url, job_id))
    return result.get(propagate=False)


LEDGER_SETTLE_SECONDS = 2.0
"""How long a client that saw a run fail waits for the ledger to say so."""


def _await_ledger(job_id: str) -> None:
    """Celery stores a task's failure before its ``task_failure`` handler records the job as failed
    (orchestration.worker_ledger): wait, briefly, until the ledger shows the run has ended, so a
    client that sees the failure finds the ledger up to date (as it does for a success)."""
    deadline = time.monotonic() + LEDGER_SETTLE_SECONDS
    while time.monotonic() < deadline:
        try:
            job = Ledger().job(job_id)
        except Exception:  # noqa: BLE001 - an unreachable ledger must not hide the job's own error
            return
        if job is None or job.state not in ("queued", "running"):
            return
        time.sleep(0.02)


def _ready(result: AsyncResult) -> bool:
    """Whether the run has ended; False while Redis is unreachable (a restart is waited out)."""
    try:
        return result.ready()
    except (RedisConnectionError, OSError):
        time.sleep(0.5)
        return False


def _quietly(callback: ProgressCallback, read: Callable[[], dict[str, int]]) -> None:
    try:
        callback(read())
    except (RedisConnectionError, OSError):
        pass  # progress bars pause while Redis restarts


def _failure(job_id: str, error: Any) -> JobFailed:
    text = f"{type(error).__name__}: {error}" if isinstance(error, Exception) else str(error)
    if "JobCancelled" in text or job_control.is_cancelled(app.conf.broker_url, job_id):
        return JobCancelledError(f"job {job_id} was cancelled")
    return JobFailed(text)


def cancel(job_id: str) -> bool:
    """Stop a queued or running job: its remaining tasks end before they do any work.

    Returns False when the job had already ended (nothing to cancel)."""
    ledger = Ledger()
    if ledger.job(job_id) is None:
        raise UnknownJob(f"no job {job_id} in the ledger")
    cancelled = ledger.cancel_job(job_id)
    if cancelled:
        job_control.cancel(app.conf.broker_url, job_id)
    return cancelled


def resume(job_id: str) -> str:
    """Run a job that did not succeed again, redoing only what did not finish; returns the run's
    task id (to pass to ``wait``)."""
    ledger = Ledger()
    job = ledger.job(job_id)
    if job is None:
        raise UnknownJob(f"no job {job_id} in the ledger")
    if job.state in ("queued", "running"):
        raise JobFailed(f"job {job_id} is still {job.state}; cancel it first or wait for it")
    if job.state == "succeeded":
        raise JobFailed(f"job {job_id} already succeeded; nothing to resume")
    ledger.requeue_job(job_id)
    job_control.uncancel(app.conf.broker_url, job_id)
    run_id = f"{job_id}.run{job.runs + 1}"
    resume_job_task.apply_async((job_id, job.kind), task_id=run_id, priority=PRIORITIES.get(job.priority, 5))
    return run_id

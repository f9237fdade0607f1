"""Submitting jobs and following them to the end (Python API behind the CLI)."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from celery.result import AsyncResult

from tasks.scan import REQUEST, scan_export_task, scan_import_task
from tasks.spool import JobSpool
from workers import progress
from workers.app import app
from workers.settings import get_settings

ProgressCallback = Callable[[dict[str, int]], None]


class JobFailed(Exception):
    """The job could not run at all (bad source, broken canvas); the message is for the operator."""


def new_job_id(kind: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    return f"{kind[:2]}{stamp}-{uuid.uuid4().hex[:8]}"


FIRST_TASK = {"export": scan_export_task, "import": scan_import_task}


def submit(kind: str, request: dict[str, Any]) -> str:
    """Write the request to the spool and publish the job's first task; returns the job id.

    The scan task's id is the job id: Celery carries it through ``replace`` to the final task,
    so the job's result is this id's result.
    """
    job_id = new_job_id(kind)
    spool = JobSpool(get_settings().spool_dir, job_id).create()
    spool.write(REQUEST, request)
    FIRST_TASK[kind].apply_async((job_id,), task_id=job_id)
    return job_id


def submit_export(request: dict[str, Any]) -> str:
    return submit("export", request)


def submit_import(request: dict[str, Any]) -> str:
    return submit("import", request)


def wait(job_id: str, on_progress: ProgressCallback | None = None, timeout: float | None = None,
         poll_seconds: float = 0.05) -> dict[str, Any]:
    """Block until the job's last task has finished; return its (counts-only) result."""
    result = AsyncResult(job_id, app=app)
    deadline = time.monotonic() + (timeout or get_settings().job_timeout_seconds)
    while not result.ready():
        if time.monotonic() > deadline:
            raise JobFailed(f"job {job_id} did not finish within {timeout or get_settings().job_timeout_seconds:.0f} s")
        if on_progress:
            on_progress(progress.read(app.conf.broker_url, job_id))
        time.sleep(poll_seconds)
    if result.failed():
        error = result.result
        raise JobFailed(f"{type(error).__name__}: {error}" if isinstance(error, Exception) else str(error))
    if on_progress:
        on_progress(progress.read(app.conf.broker_url, job_id))
    return result.get(propagate=False)

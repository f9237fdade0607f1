"""Every Redis key discflow writes, in one place (Celery's own keys aside)."""
from __future__ import annotations

PREFIX = "discflow"


def job_timings(job_id: str) -> str:
    """List of JSON timing records, one per finished task of the job."""
    return f"{PREFIX}:job:{job_id}:timings"


def job_progress(job_id: str) -> str:
    """Hash of counters (instances done per stage) for progress bars."""
    return f"{PREFIX}:job:{job_id}:progress"


def job_cancelled(job_id: str) -> str:
    """Set when an operator cancels the job; every task of the job checks it first."""
    return f"{PREFIX}:job:{job_id}:cancelled"


def job_batches_running(job_id: str) -> str:
    """Set of the import's store batches that have started (see workers.batch_events)."""
    return f"{PREFIX}:job:{job_id}:batches-running"


def job_batches_done(job_id: str) -> str:
    """List with one entry per store batch finished, for the import's finish to block on."""
    return f"{PREFIX}:job:{job_id}:batches-done"


def job_batches_waited_since(job_id: str) -> str:
    """When the import's finish began waiting for its missing batches (or last sent them again)."""
    return f"{PREFIX}:job:{job_id}:batches-waited-since"

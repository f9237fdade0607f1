"""The job summary: outcome from the spool, timing per stage from the workers' records."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from tasks.spool import JobSpool, read_json
from workers.timing import TaskTiming

EXPORT_STAGES = ("scan", "transcode", "media")
IMPORT_STAGES = ("scan", "transcode", "store")


def stage_table(timings: list[TaskTiming], stages: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per stage: wall seconds (first start to last end), summed task seconds, bytes, queue wait."""
    by_stage: dict[str, list[TaskTiming]] = defaultdict(list)
    for timing in timings:
        by_stage[timing.stage].append(timing)
    table = {}
    for stage in stages:
        records = by_stage.get(stage, [])
        table[stage] = {
            "seconds": round(max((r.finished for r in records), default=0) - min((r.started for r in records), default=0), 4),
            "task_seconds": round(sum(r.seconds for r in records), 4),
            "tasks": len(records),
            "instances": max((r.instances for r in records), default=0) if stage == "scan" else sum(r.instances for r in records),
            "bytes_in": sum(r.bytes_in for r in records),
            "bytes_out": sum(r.bytes_out for r in records),
            "queue_wait_seconds": round(sum(r.queue_wait for r in records), 4),
        }
        table[stage].update(_rates(table[stage]))
    return table


def _rates(row: dict[str, float]) -> dict[str, float]:
    """Throughput over the stage's wall time: instances/s and MB/s (of the bytes it wrote)."""
    wall = row["seconds"]
    if wall <= 0:
        return {"instances_per_second": 0.0, "mb_per_second": 0.0}
    return {"instances_per_second": round(row["instances"] / wall, 2),
            "mb_per_second": round(max(row["bytes_out"], row["bytes_in"]) / wall / 1e6, 2)}


def job_summary(spool: JobSpool, timings: list[TaskTiming], wall_seconds: float, stages: tuple[str, ...]
                ) -> dict[str, Any]:
    """The spool's outcome of a finished job, with its stage table and wall time added."""
    summary = read_json(spool.summary_path)
    summary["stages"] = stage_table(timings, stages)
    for row in summary["stages"].values():
        row["bytes"] = row["bytes_out"]
    summary["seconds"] = round(wall_seconds, 3)
    return summary


def export_summary(spool: JobSpool, timings: list[TaskTiming], wall_seconds: float) -> dict[str, Any]:
    return job_summary(spool, timings, wall_seconds, EXPORT_STAGES)


def import_summary(spool: JobSpool, timings: list[TaskTiming], wall_seconds: float) -> dict[str, Any]:
    return job_summary(spool, timings, wall_seconds, IMPORT_STAGES)


def ledger_summary(job, runs: list, now_seconds: float | None = None) -> dict[str, Any]:
    """A job's summary as the ledger knows it (same field names as the CLI's), for status and report."""
    stages = EXPORT_STAGES if job.kind == "export" else IMPORT_STAGES
    timings = [TaskTiming(job_id=r.job_id, stage=r.stage, task_id=r.task_id, started=r.started, name=r.name,
                          worker=r.worker, finished=r.finished, queue_wait=r.queue_wait, instances=r.instances,
                          bytes_in=r.bytes_in, bytes_out=r.bytes_out) for r in runs]
    summary = dict(job.summary or {})
    summary.update(job_id=job.id, kind=job.kind, status=job.state, priority=job.priority,
                   submitted_by=job.submitted_by, created_at=_iso(job.created_at), started_at=_iso(job.started_at),
                   finished_at=_iso(job.finished_at), runs=job.runs, resumable=job.resumable, error=job.error,
                   stages=stage_table(timings, stages))
    for row in summary["stages"].values():
        row["bytes"] = row["bytes_out"]
    if job.started_at and job.finished_at:
        summary["seconds"] = round((job.finished_at - job.started_at).total_seconds(), 3)
    summary.setdefault("instances", {"total": job.instances_total, "ok": job.instances_ok,
                                     "failed": job.instances_failed})
    return summary


def _iso(moment) -> str | None:
    return moment.isoformat() if moment else None

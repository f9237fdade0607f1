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
    return table


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

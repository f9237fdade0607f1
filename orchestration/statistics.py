"""Department statistics from the job ledger, shaped like the source study's figures and tables.

- ``periods``: exports and imports per month or year (its Figures 1-2): jobs submitted, jobs that
  succeeded, instances written or stored, bytes. A period is the job's ``created_at`` in UTC;
  periods with no job between the first and the last are listed with zeros, so a chart shows gaps.
- ``syntaxes``: transfer syntaxes found on imported media (its Table 1): instances per syntax summed
  over import jobs (the scan's count in the job summary), the share of all instances, and on how
  many discs the syntax occurred.
- ``stage_times``: mean and p95 seconds per kind and syntax policy (its Tables 2-3): the job's wall
  time (finished_at - started_at) and each stage's wall time (last task end - first task start).
  Only succeeded jobs that ran once count: a failed job stops early, and a resumed job's spans
  include the pause between its runs.

p95 is the nearest-rank percentile: the ceil(0.95 n)-th smallest value (the maximum for n < 20).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from statistics import fmean
from typing import Any, Optional

from pydicom.uid import UID
from rich.table import Table
from sqlalchemy import func, select

from orchestration.ledger import Ledger
from orchestration.ledger_schema import Job, TaskRun
from orchestration.summary import EXPORT_STAGES, IMPORT_STAGES

PERIODS = ("month", "year")
KINDS = ("export", "import")
STAGE_ORDER = tuple(dict.fromkeys(EXPORT_STAGES + IMPORT_STAGES))
POLICY_OPTION = {"export": "syntax", "import": "send"}
"""The request key that names a job's syntax policy (`--syntax` for exports, `--send` for imports)."""
DEFAULT_POLICY = {"export": "keep", "import": "negotiate"}
TIMED_STATE = "succeeded"
"""Only jobs in this state (and run once) count in stage_times."""
MB = 1_000_000


@dataclass(frozen=True)
class JobRow:
    """The few columns of a job the statistics need (not its full summary: failure lists can be long)."""
    id: str
    kind: str
    state: str
    created_at: datetime
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    instances: int
    bytes: int
    runs: int
    policy: str
    syntaxes: dict[str, int]


def ledger_statistics(ledger: Optional[Ledger] = None, by: str = "month", since: Optional[date] = None
                      ) -> dict[str, list[dict[str, Any]]]:
    """``{"periods": [...], "syntaxes": [...], "stage_times": [...]}`` for jobs created on or after ``since``."""
    if by not in PERIODS:
        raise ValueError(f"unknown period {by!r}; choose month or year")
    ledger = ledger or Ledger()
    cutoff = datetime.combine(since, time.min, tzinfo=timezone.utc) if since else None
    jobs = job_rows(ledger, cutoff)
    return {"periods": period_table(jobs, by), "syntaxes": syntax_table(jobs),
            "stage_times": stage_time_table(jobs, stage_spans(ledger, cutoff))}


# --- queries ----------------------------------------------------------------------------------

def job_rows(ledger: Ledger, cutoff: Optional[datetime] = None) -> list[JobRow]:
    # JSON paths, not whole documents: both SQLite and PostgreSQL extract them in the query.
    query = select(Job.id, Job.kind, Job.state, Job.created_at, Job.started_at, Job.finished_at, Job.instances_ok,
                   Job.bytes_total, Job.runs, Job.options["syntax"].as_string(), Job.options["send"].as_string(),
                   Job.summary["syntaxes"]).order_by(Job.created_at)
    if cutoff:
        query = query.where(Job.created_at >= cutoff)
    with ledger.session() as session:
        return [_job_row(*row) for row in session.execute(query)]


def _job_row(job_id, kind, state, created, started, finished, instances, size, runs, syntax, send, syntaxes) -> JobRow:
    policy = (syntax if kind == "export" else send) or DEFAULT_POLICY.get(kind, "")
    return JobRow(job_id, kind, state, utc(created), utc(started), utc(finished), instances or 0, size or 0,
                  runs or 1, policy, {str(uid): int(count) for uid, count in (syntaxes or {}).items()})


def stage_spans(ledger: Ledger, cutoff: Optional[datetime] = None) -> dict[str, dict[str, float]]:
    """Per timed job and stage: last task end minus first task start, computed by the database."""
    query = (select(TaskRun.job_id, TaskRun.stage, func.min(TaskRun.started), func.max(TaskRun.finished))
             .join(Job, Job.id == TaskRun.job_id).where(Job.state == TIMED_STATE, Job.runs == 1)
             .group_by(TaskRun.job_id, TaskRun.stage))
    if cutoff:
        query = query.where(Job.created_at >= cutoff)
    spans: dict[str, dict[str, float]] = defaultdict(dict)
    with ledger.session() as session:
        for job_id, stage, first, last in session.execute(query):
            spans[job_id][stage] = last - first
    return spans


def utc(moment: Optional[datetime]) -> Optional[datetime]:
    """SQLite hands back naive datetimes (the ledger writes UTC), PostgreSQL aware ones."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


# --- aggregation ------------------------------------------------------------------------------

def period_table(jobs: list[JobRow], by: str) -> list[dict[str, Any]]:
    """Per period and kind: jobs submitted, succeeded, instances and bytes."""
    table: dict[str, dict[str, dict[str, int]]] = {}
    for job in jobs:
        counts = table.setdefault(period_of(job.created_at, by), _empty_period())[job.kind]
        counts["jobs"] += 1
        counts["succeeded"] += job.state == "succeeded"
        counts["instances"] += job.instances
        counts["bytes"] += job.bytes
    return [{"period": period, **table.get(period, _empty_period())} for period in _period_range(table, by)]


def _empty_period() -> dict[str, dict[str, int]]:
    return {kind: {"jobs": 0, "succeeded": 0, "instances": 0, "bytes": 0} for kind in KINDS}


def period_of(moment: datetime, by: str) -> str:
    return moment.strftime("%Y-%m" if by == "month" else "%Y")


def _period_range(table: dict[str, Any], by: str) -> list[str]:
    """Every period from the first to the last one seen, gaps included."""
    if not table:
        return []
    first, last = min(table), max(table)
    if by == "year":
        return [str(year) for year in range(int(first), int(last) + 1)]
    year, month = map(int, first.split("-"))
    periods = []
    while f"{year:04d}-{month:02d}" <= last:
        periods.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return periods


def syntax_table(jobs: list[JobRow]) -> list[dict[str, Any]]:
    """Instances per transfer syntax on imported media, most frequent first, with their share in percent."""
    instances: dict[str, int] = defaultdict(int)
    discs: dict[str, int] = defaultdict(int)
    for job in jobs:
        if job.kind != "import":
            continue
        for uid, count in job.syntaxes.items():
            instances[uid] += count
            discs[uid] += 1
    total = sum(instances.values())
    ordered = sorted(instances, key=lambda uid: (-instances[uid], uid))
    return [{"uid": uid, "name": UID(uid).name, "instances": instances[uid], "discs": discs[uid],
             "percent": round(100 * instances[uid] / total, 2)} for uid in ordered]


def stage_time_table(jobs: list[JobRow], spans: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Mean and p95 seconds of the job and of each stage, per kind and syntax policy."""
    groups: dict[tuple[str, str], list[JobRow]] = defaultdict(list)
    for job in jobs:
        if job.state == TIMED_STATE and job.runs == 1 and job.started_at and job.finished_at:
            groups[(job.kind, job.policy)].append(job)
    return [_stage_row(kind, policy, groups[(kind, policy)], spans)
            for kind, policy in sorted(groups, key=lambda key: (_rank(KINDS, key[0]), key[1]))]


def _stage_row(kind: str, policy: str, jobs: list[JobRow], spans: dict[str, dict[str, float]]) -> dict[str, Any]:
    walls = [(job.finished_at - job.started_at).total_seconds() for job in jobs]
    per_stage: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        for stage, seconds in spans.get(job.id, {}).items():
            per_stage[stage].append(seconds)
    stages = {stage: {"jobs": len(per_stage[stage]), **mean_p95(per_stage[stage])}
              for stage in sorted(per_stage, key=lambda name: _rank(STAGE_ORDER, name))}
    return {"kind": kind, "policy": policy, "jobs": len(jobs), **mean_p95(walls), "stages": stages}


def mean_p95(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_seconds": 0.0, "p95_seconds": 0.0}
    return {"mean_seconds": round(fmean(values), 3), "p95_seconds": round(nearest_rank(values, 95), 3)}


def nearest_rank(values: list[float], percent: int) -> float:
    """The ceil(percent/100 * n)-th smallest value (integer arithmetic: 0.95 * 20 is not exactly 19)."""
    ordered = sorted(values)
    rank = max(1, (percent * len(ordered) + 99) // 100)
    return ordered[rank - 1]


def _rank(order: tuple[str, ...], name: str) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


# --- terminal tables ----------------------------------------------------------------------------

def statistics_tables(stats: dict[str, list[dict[str, Any]]], by: str = "month") -> list[Table]:
    """The tables `discflow stats` prints: jobs per period, syntaxes on imported media, stage times per kind.

    Narrow enough for an 80-column terminal (the JSON has the syntax UIDs)."""
    kinds = [kind for kind in KINDS if any(row["kind"] == kind for row in stats["stage_times"])]
    return [_periods_table(stats["periods"], by), _syntaxes_table(stats["syntaxes"]),
            *(_stage_times_table(kind, [r for r in stats["stage_times"] if r["kind"] == kind]) for kind in kinds)]


def _periods_table(periods: list[dict[str, Any]], by: str) -> Table:
    table = Table(title=f"Exports and imports per {by}")
    for column in ("period", "exports", "ok", "instances", "MB", "imports", "ok", "instances", "MB"):
        table.add_column(column, justify="left" if column == "period" else "right")
    for row in periods:
        cells = [row["period"]]
        for kind in KINDS:
            counts = row[kind]
            cells += [str(counts["jobs"]), str(counts["succeeded"]), str(counts["instances"]),
                      f"{counts['bytes'] / MB:.1f}"]
        table.add_row(*cells)
    return table


def _syntaxes_table(syntaxes: list[dict[str, Any]]) -> Table:
    table = Table(title="Transfer syntaxes on imported media")
    for column in ("transfer syntax", "instances", "%", "discs"):
        table.add_column(column, justify="left" if column == "transfer syntax" else "right")
    for row in syntaxes:
        table.add_row(row["name"], str(row["instances"]), f"{row['percent']:.1f}", str(row["discs"]))
    return table


def _stage_times_table(kind: str, rows: list[dict[str, Any]]) -> Table:
    stages = [s for s in STAGE_ORDER if any(s in row["stages"] for row in rows)]
    table = Table(title=f"{kind.capitalize()} seconds, mean/p95 (succeeded jobs)")
    for column in ("policy", "jobs", "job", *stages):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for row in rows:
        cells = [row["policy"], str(row["jobs"]), _mean_p95_text(row)]
        cells += [_mean_p95_text(row["stages"][s]) if s in row["stages"] else "" for s in stages]
        table.add_row(*cells)
    return table


def _mean_p95_text(row: dict[str, Any]) -> str:
    return f"{row['mean_seconds']:.2f}/{row['p95_seconds']:.2f}"

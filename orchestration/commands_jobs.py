"""`discflow status | report | cancel | resume | batch`: jobs as the ledger knows them."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from orchestration import console as terminal
from orchestration.batch_file import BatchError, read_batch
from orchestration.cli import EXIT_CODES, _fail, _report, cli, follow, runtime
from orchestration.jobs import JobCancelledError, JobFailed, UnknownJob, cancel as cancel_job, resume as resume_job
from orchestration.jobs import submit, wait
from orchestration.ledger import FINAL_STATES, Ledger
from orchestration.report_html import report_html
from orchestration.summary import ledger_summary
from workers import progress
from workers.app import app
from workers.embedded import EmbeddedBrokerError
from workers.settings import get_settings


def job_summary_from_ledger(job_id: str) -> dict[str, Any]:
    ledger = Ledger()
    job = ledger.job(job_id)
    if job is None:
        _fail(f"no job {job_id} in the ledger ({ledger.url.split('@')[-1]})")
    summary = ledger_summary(job, ledger.task_runs(job_id))
    if get_settings().broker_url and job.state not in FINAL_STATES:
        summary["progress"] = progress.read(app.conf.broker_url, job_id)
    return summary


@cli.command()
def status(
    job_id: Annotated[Optional[str], typer.Argument(help="One job; without it, the newest jobs.")] = None,
    limit: Annotated[int, typer.Option(help="How many jobs to list.")] = 20,
    watch: Annotated[bool, typer.Option(help="Redraw every second until every listed job has ended.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Jobs and their state, progress and timing, from the job ledger.

    Examples:

        discflow status                       # the 20 newest jobs

        discflow status ex20261201184512-3fa2c1d0 --json

        discflow status --watch               # a live table until the queue is empty
    """
    if job_id:
        summary = job_summary_from_ledger(job_id)
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
        else:
            terminal.print_job_status(summary)
        return
    if as_json:
        typer.echo(json.dumps([job_row(job) for job in Ledger().jobs(limit)], indent=2))
        return
    while True:
        rows = [job_row(job) for job in Ledger().jobs(limit)]
        terminal.print_job_list(rows)
        if not watch or all(row["status"] in FINAL_STATES for row in rows):
            return
        time.sleep(1)


def job_row(job) -> dict[str, Any]:
    row = {"job_id": job.id, "kind": job.kind, "status": job.state, "priority": job.priority,
           "created_at": job.created_at.isoformat(), "instances": {"total": job.instances_total,
                                                                   "ok": job.instances_ok,
                                                                   "failed": job.instances_failed},
           "resumable": job.resumable, "error": job.error}
    if job.started_at and job.finished_at:
        row["seconds"] = round((job.finished_at - job.started_at).total_seconds(), 3)
    if get_settings().broker_url and job.state not in FINAL_STATES:
        row["progress"] = progress.read(app.conf.broker_url, job.id)
    return row


@cli.command()
def report(
    job_id: Annotated[str, typer.Argument(help="The job id (printed by export/import, listed by status).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary and stage table as JSON.")] = False,
    html: Annotated[Optional[Path], typer.Option(help="Also write the report as a standalone HTML page.")] = None,
) -> None:
    """A job's stage table: wall time, summed task time, queue wait, instances/s and MB/s per stage.

    Examples:

        discflow report ex20261201184512-3fa2c1d0

        discflow report ex20261201184512-3fa2c1d0 --json

        discflow report ex20261201184512-3fa2c1d0 --html report.html
    """
    summary = job_summary_from_ledger(job_id)
    if html:
        html.write_text(report_html(summary, Ledger().outcomes(job_id)), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        terminal.print_summary(summary, summary["kind"])
        terminal.print_queue_wait(summary)


@cli.command()
def cancel(job_id: Annotated[str, typer.Argument(help="The job to stop.")]) -> None:
    """Stop a queued or running job; tasks already running finish their batch, the rest never start.

    Example: `discflow cancel ex20261201184512-3fa2c1d0` (then `discflow resume` to go on later)
    """
    try:
        cancelled = cancel_job(job_id)
    except UnknownJob as error:
        _fail(str(error))
    if not cancelled:
        _fail(f"job {job_id} has already ended ({Ledger().job(job_id).state}); nothing to cancel", 1)
    typer.echo(f"cancelled {job_id}")


@cli.command()
def resume(
    job_id: Annotated[str, typer.Argument(help="A failed, partial or cancelled job.")],
    detach: Annotated[bool, typer.Option(help="Return at once; follow with `discflow status`.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary object.")] = False,
) -> None:
    """Run a job again, redoing only what did not finish: converted instances are not converted
    again, stored instances not sent again.

    Examples:

        discflow resume im20261201184512-3fa2c1d0          # after the PACS is back

        discflow resume ex20261201184512-3fa2c1d0 --json
    """
    job = Ledger().job(job_id)
    if job is None:
        _fail(f"no job {job_id} in the ledger")
    if detach and not get_settings().broker_url:
        _fail("--detach needs workers that outlive this command: set DISCFLOW_BROKER_URL")
    started = time.monotonic()
    try:
        with runtime():  # the report is printed before the embedded default (if any) is stopped
            run_id = resume_job(job_id)
            if detach:
                typer.echo(json.dumps({"job_id": job_id, "run": run_id, "status": "queued"}) if as_json else run_id)
                raise typer.Exit(0)
            summary = follow(job_id, job.kind, as_json, started, run_id)
            _report(summary, as_json, f"{job.kind} (resumed)")
    except JobCancelledError as error:
        _fail(str(error), EXIT_CODES["cancelled"])
    except (JobFailed, EmbeddedBrokerError) as error:
        _fail(str(error), 1)


@cli.command()
def batch(
    file: Annotated[Path, typer.Argument(help="CSV (header row) or YAML list: one job per row.")],
    priority: Annotated[str, typer.Option(help="Priority for rows that name none.")] = "batch",
    wait_for_all: Annotated[bool, typer.Option("--wait", help="Wait for every job and report each.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Submit many jobs at once (the nightly batch). Rows name `kind` (export|import) and the options
    of that command by their long names without dashes.

    Example CSV (import rows fill disc, to, send, rules instead):

        kind,source,syntax,out,disc,to,priority
        export,/data/studies/a,keep,/srv/out/a,,,batch
        import,,,,/srv/inbox/cd1.iso,PACS@10.0.0.5:104,urgent

    Examples:

        discflow batch nightly.csv                 # needs DISCFLOW_BROKER_URL and running workers

        discflow batch nightly.yaml --wait --json  # on the embedded default: runs them all, then reports
    """
    try:
        jobs = read_batch(file, default_priority=priority)
    except BatchError as error:
        _fail(str(error))
    detached = bool(get_settings().broker_url) and not wait_for_all
    with runtime():
        submitted = [{"job_id": submit(job.kind, job.request, job.priority), "kind": job.kind, "line": job.line}
                     for job in jobs]
        if not detached:
            for entry in submitted:
                entry["status"] = _wait_quietly(entry["job_id"])
        # reported before the embedded default (if any) is stopped
        if as_json:
            typer.echo(json.dumps(submitted, indent=2))
        else:
            for entry in submitted:
                typer.echo("\t".join(str(entry.get(key, "queued")) for key in ("job_id", "kind", "status")))
        failed = [e for e in submitted if e.get("status") not in (None, "succeeded")]
        raise typer.Exit(1 if not detached and failed else 0)


def _wait_quietly(job_id: str) -> str:
    try:
        wait(job_id)
    except JobCancelledError:
        return "cancelled"
    except JobFailed:
        return "failed"
    job = Ledger().job(job_id)
    return job.state if job else "unknown"

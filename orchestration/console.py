"""Terminal output: progress bars while a job runs, the stage table at the end."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
MB = 1_000_000


@contextmanager
def job_progress(stages: tuple[str, ...], enabled: bool) -> Iterator[Any]:
    """Yield a callback that takes the job's progress counters and redraws one bar per stage."""
    if not enabled or not console.is_terminal:
        yield None
        return
    bars = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)
    tasks = {stage: bars.add_task(stage, total=None) for stage in stages}

    def update(counters: dict[str, int]) -> None:
        for stage, task in tasks.items():
            total = counters.get(f"{stage}:total")
            bars.update(task, completed=counters.get(f"{stage}:done", 0), total=total if total else None)

    with bars:
        yield update


def print_summary(summary: dict[str, Any], title: str) -> None:
    out = Console()
    table = Table(title=f"{title} {summary['job_id']}: {summary['status']}")
    for column in ("stage", "wall s", "task s", "tasks", "instances", "MB in", "MB out"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, row in summary["stages"].items():
        table.add_row(stage, f"{row['seconds']:.2f}", f"{row['task_seconds']:.2f}", str(row["tasks"]),
                      str(row["instances"]), f"{row['bytes_in'] / MB:.1f}", f"{row['bytes_out'] / MB:.1f}")
    table.add_row("total", f"{summary.get('seconds', 0):.2f}", "", "", "", "", "", style="bold")
    out.print(table)
    counts = summary["instances"]
    out.print(", ".join(f"{key}: {value}" for key, value in counts.items()))
    for volume in summary.get("volumes", []):
        out.print(f"volume {volume['path']}  {volume['bytes'] / MB:.1f} MB  {volume['instances']} instances")
    for failure in summary.get("failures", []):
        out.print(f"[red]failed[/red] {failure['file']}: {failure['reason']}")
    skipped = summary.get("skipped", [])
    if skipped:
        out.print(f"{len(skipped)} file(s) skipped (not DICOM or incomplete); see --json for the list")


def print_listing(listing: dict[str, Any]) -> None:
    out = Console()
    table = Table(title=f"{listing['instances']} instances on the disc "
                        f"({'DICOMDIR' if listing['used_dicomdir'] else 'no usable DICOMDIR: files walked'})")
    for column in ("patient", "study date", "study", "series", "modality", "images", "MB"):
        table.add_column(column)
    for patient in listing["patients"]:
        for study in patient["studies"]:
            for series in study["series"]:
                table.add_row(f"{patient['name']} ({patient['id']})", study["date"], study["description"],
                              f"{series['number']} {series['description']}".strip(), series["modality"],
                              str(series["instances"]), f"{series['bytes'] / MB:.1f}")
    out.print(table)
    for syntax, count in listing["syntaxes"].items():
        out.print(f"{count:6d}  {syntax}")
    for problem in listing["dicomdir_problems"]:
        out.print(f"[yellow]DICOMDIR[/yellow] {problem}")
    for problem in listing["problems"]:
        colour = "red" if problem["severity"] == "error" else "yellow"
        out.print(f"[{colour}]{problem['severity']}[/{colour}] {problem['file']}: {problem['reason']}", highlight=False)


def print_job_list(rows: list[dict[str, Any]]) -> None:
    out = Console()
    table = Table(title=f"{len(rows)} newest jobs")
    for column in ("job", "kind", "status", "priority", "created", "instances", "progress", "s"):
        table.add_column(column)
    for row in rows:
        counts = row["instances"]
        table.add_row(row["job_id"], row["kind"], row["status"], row["priority"], row["created_at"][:19],
                      f"{counts['ok']}/{counts['total']}" + (f" ({counts['failed']} failed)" if counts["failed"] else ""),
                      _progress_text(row.get("progress")), str(row.get("seconds", "")))
    out.print(table)


def _progress_text(counters: dict[str, int] | None) -> str:
    if not counters:
        return ""
    stages = sorted({key.split(":")[0] for key in counters})
    return " ".join(f"{stage} {counters.get(f'{stage}:done', 0)}/{counters.get(f'{stage}:total', '?')}"
                    for stage in stages)


def print_job_status(summary: dict[str, Any]) -> None:
    out = Console()
    out.print(f"{summary['kind']} {summary['job_id']}: [bold]{summary['status']}[/bold] "
              f"(priority {summary['priority']}, by {summary['submitted_by']}, run {summary['runs']})")
    if summary.get("progress"):
        out.print(f"progress: {_progress_text(summary['progress'])}")
    if summary.get("error"):
        out.print(f"[red]error[/red] {summary['error']}", highlight=False)
    if summary.get("resumable") and summary["status"] != "succeeded":
        out.print(f"resumable: discflow resume {summary['job_id']}")
    if summary.get("stages"):
        print_summary(summary, summary["kind"])


def print_queue_wait(summary: dict[str, Any]) -> None:
    out = Console()
    for stage, row in summary["stages"].items():
        out.print(f"{stage:>10}: queue wait {row['queue_wait_seconds']:.2f} s over {row['tasks']} tasks, "
                  f"{row['instances_per_second']:.1f} instances/s, {row['mb_per_second']:.1f} MB/s")

"""`discflow` sub-commands for bench (registered on the shared Typer app when imported)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestration import console as terminal
from orchestration.cli import cli


@cli.command()
def bench(
    images: Annotated[int, typer.Option(help="Instances in the benchmark study.")] = 500,
    modality: Annotated[str, typer.Option(help="CT (512x512 slices) or MR (64x64), from pydicom-data.")] = "CT",
    workers: Annotated[int, typer.Option(help="Worker processes for the steady state (0: one per CPU).")] = 0,
    runs: Annotated[int, typer.Option(help="Runs per row; medians are reported.")] = 3,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the full report (JSON) here.")] = None,
    markdown_file: Annotated[Optional[Path], typer.Option("--markdown", help="Write the Markdown tables here.")] = None,
    corpus_dir: Annotated[Optional[Path], typer.Option(help="Cache for the generated study "
                                                            "(default: bench-corpus/ beside the spool).")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes for the per-task overhead table.")] = "1,10,25,50,200",
    profile: Annotated[Optional[Path], typer.Option(help="Also profile the slowest export inline with "
                                                         "pyinstrument; HTML written here.")] = None,
    only: Annotated[str, typer.Option(help="Measure only these parts (comma-separated): "
                                           "export, import, node, embedded, scaling.")] = "",
) -> None:
    """Measure export and import (the study's Tables 2 and 3) beside DCMTK and Orthanc, in one run.

    Builds a JPEG-lossless study from pydicom-data once (cached), starts one Redis and one worker,
    Orthanc twice (TCP_NODELAY=1 and stock) on loopback, and prints Markdown tables with peer
    columns; ratios (peer time / discflow time) come last. Needs DCMTK, xorriso and Orthanc.

    Examples:

        discflow bench

        discflow bench --images 200 --runs 5 --json bench.json --markdown bench.md

        discflow bench --images 20 --runs 1        # a quick check, about a minute

        discflow bench --only import               # Table 3 only, after a change to the import
    """
    from orchestration.benchmark import BENCH_PARTS, BenchOptions, run_bench
    from orchestration.benchmark_report import markdown
    from orchestration.jobs import JobFailed

    sizes = _batch_sizes(batch_sizes)
    if modality not in ("CT", "MR") or images < 1 or runs < 1 or not sizes:
        terminal.console.print("[red]error:[/red] --modality is CT or MR; --images, --runs and each of "
                               "--batch-sizes (comma-separated) are at least 1")
        raise typer.Exit(2)
    parts = tuple(part.strip() for part in only.split(",") if part.strip()) or BENCH_PARTS
    if not set(parts) <= set(BENCH_PARTS):
        terminal.console.print(f"[red]error:[/red] --only takes {', '.join(BENCH_PARTS)}")
        raise typer.Exit(2)
    options = BenchOptions(images=images, modality=modality, workers=workers, runs=runs, corpus_dir=corpus_dir,
                           batch_sizes=sizes, profile_html=profile, parts=parts)
    try:
        report = run_bench(options, _progress_printer())
    except (RuntimeError, JobFailed, OSError) as error:  # a peer missing or failing, a job failing
        terminal.console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(1)
    text = markdown(report)
    if json_file:
        json_file.write_text(json.dumps(report, indent=2))
    if markdown_file:
        markdown_file.write_text(text)
    typer.echo(text, nl=False)


def _batch_sizes(text: str) -> tuple[int, ...]:
    """"1,10,50" -> (1, 10, 50); () when any is not a positive integer."""
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        return ()
    return sizes if sizes and min(sizes) >= 1 else ()


def _progress_printer() -> Callable[[str], None]:
    """Progress lines on stderr with the seconds since the bench started (stdout is the report)."""
    started = time.monotonic()

    def say(line: str) -> None:
        terminal.console.print(f"[{time.monotonic() - started:7.1f} s] {line}", highlight=False, markup=False,
                               soft_wrap=True)
    return say

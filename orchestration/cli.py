"""The `discflow` command: one sub-command per operator action."""
from __future__ import annotations

import gc
import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from orchestration import console as terminal
from orchestration.jobs import JobCancelledError, JobFailed, submit, wait
from orchestration.summary import EXPORT_STAGES, IMPORT_STAGES, job_summary
from orchestration.listing import disc_listing
from tasks.media_source import MediaError
from tasks.reconcile import RulesError, load_rules
from tasks.scan import read_medium
from tasks.spool import JobSpool
from tasks.transfer_syntax import POLICIES
from workers.app import PRIORITIES, STAGES, app, use_broker
from workers.embedded import EmbeddedBrokerError, EmbeddedRuntime
from workers.settings import get_settings
from workers.timing import read_timings

cli = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Export studies to CD/DVD/USB media and import outside media, on Celery workers.")

EXIT_CODES = {"succeeded": 0, "failed": 1, "partial": 3, "cancelled": 4}


class UsageError(Exception):
    pass


_embedded: EmbeddedRuntime | None = None
"""The embedded default of this command, while it runs (its workers are health-checked while waiting)."""


@contextmanager
def runtime(concurrency: int = 0) -> Iterator[None]:
    """Use the configured Redis and its workers, or start the embedded default for this command.

    Re-entrant: an inner ``runtime()`` uses the outer one's embedded default, so that a command can
    print its report before the embedded workers are stopped."""
    global _embedded
    settings = get_settings()
    if settings.broker_url or _embedded is not None:
        yield
        return
    log_dir = Path(settings.spool_dir).parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedRuntime(concurrency or settings.worker_concurrency, log_dir=log_dir) as embedded:
        use_broker(embedded.url)
        _embedded = embedded
        try:
            yield
        finally:
            _embedded = None


def _fail(message: str, code: int = 2) -> None:
    terminal.console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def run_job(kind: str, request: dict[str, Any], as_json: bool, priority: str = "normal") -> dict[str, Any]:
    """Submit one job, follow it with progress bars, return its summary with stage timings."""
    started = time.monotonic()
    with runtime():
        job_id = submit(kind, request, priority)
        return follow(job_id, kind, as_json, started)


def follow(job_id: str, kind: str, as_json: bool, started: float, run_id: str | None = None) -> dict[str, Any]:
    """Wait for a submitted job (or one run of it) with progress bars; return its summary."""
    stages = EXPORT_STAGES if kind == "export" else IMPORT_STAGES
    with terminal.job_progress(stages[1:], enabled=not as_json) as on_progress:
        wait(job_id, on_progress, task_id=run_id, health_check=_embedded.assert_alive if _embedded else None)
    timings = read_timings(app, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    return job_summary(spool, timings, time.monotonic() - started, stages)


def submit_or_run(kind: str, request: dict[str, Any], as_json: bool, priority: str, detach: bool, title: str) -> None:
    """``--detach``: print the job id and return at once; otherwise run the job to the end and report."""
    if priority not in PRIORITIES:
        _fail(f"unknown --priority {priority!r}; choose one of {', '.join(PRIORITIES)}")
    if detach:
        if not get_settings().broker_url:
            _fail("--detach needs workers that outlive this command: set DISCFLOW_BROKER_URL and run `discflow worker`")
        job_id = submit(kind, request, priority)
        typer.echo(json.dumps({"job_id": job_id, "status": "queued"}) if as_json else job_id)
        raise typer.Exit(0)
    try:
        with runtime():  # the report is printed before the embedded default (if any) is stopped
            summary = run_job(kind, request, as_json, priority)
            if kind == "export":
                from orchestration.commands_media import burn_volumes
                burn_volumes(summary, request.get("burn_device") or get_settings().burn_device, as_json)
            _report(summary, as_json, title)
    except JobCancelledError as error:
        _fail(str(error), 4)
    except (JobFailed, EmbeddedBrokerError) as error:
        _fail(str(error), 1)


def _report(summary: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        terminal.print_summary(summary, title)
    raise typer.Exit(EXIT_CODES.get(summary["status"], 1))


def _source(source: Optional[Path], from_node: Optional[str], patient_id: Optional[str],
            study_uid: list[str], accession: Optional[str]) -> dict[str, Any]:
    if bool(source) == bool(from_node):
        raise UsageError("give exactly one of --source DIR or --from-node AE@HOST:PORT")
    if source:
        if not source.is_dir():
            raise UsageError(f"source folder not found: {source}")
        return {"folder": str(source.resolve())}
    if not (patient_id or study_uid or accession):
        raise UsageError("--from-node needs --patient-id, --study-uid or --accession")
    from tasks.dimse import Node  # pynetdicom: imported by the commands that need it (0.15 s)
    Node.parse(from_node)  # fail early on a malformed address
    return {"node": from_node, "patient_id": patient_id, "study_uids": list(study_uid), "accession_number": accession}


@cli.command()
def export(
    source: Annotated[Optional[Path], typer.Option(help="Folder of DICOM files (searched recursively).")] = None,
    from_node: Annotated[Optional[str], typer.Option(help="DICOM node to query and retrieve from, AE@HOST:PORT.")] = None,
    patient_id: Annotated[Optional[str], typer.Option(help="With --from-node: the patient's ID.")] = None,
    study_uid: Annotated[list[str], typer.Option(help="With --from-node: a Study Instance UID (repeatable).")] = [],
    accession: Annotated[Optional[str], typer.Option(help="With --from-node: an accession number.")] = None,
    syntax: Annotated[str, typer.Option(help=f"Transfer-syntax policy: {', '.join(POLICIES)}.")] = "keep",
    out: Annotated[Path, typer.Option(help="Folder for the disc images (VOL001.ISO, ...).")] = Path("out"),
    volume_capacity: Annotated[Optional[int], typer.Option(help="Usable bytes per volume (default: the --media type's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Instances per transcode task.")] = None,
    profile: Annotated[str, typer.Option(help="Media profile: auto, STD-GEN-CD, STD-GEN-DVD-JPEG, STD-GEN-DVD-J2K, "
                                              "STD-GEN-USB-JPEG, STD-GEN-USB-J2K, GUIDELINE.")] = "auto",
    media: Annotated[Optional[str], typer.Option(help="cd (700 MB), dvd (4.7 GB), dvd-dl (8.5 GB), bd (25 GB), "
                                                      "usb (a folder USB001/, no ISO).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Report to put on the disc (.pdf or .txt), per job.")] = None,
    viewer: Annotated[Optional[Path], typer.Option(help="Viewer folder copied to VIEWER/ with AUTORUN.INF.")] = None,
    hot_folder: Annotated[Optional[Path], typer.Option(help="Disc-robot hot folder for each finished volume.")] = None,
    robot: Annotated[Optional[str], typer.Option(help="Robot reading --hot-folder: primera (.JRQ) or epson (.JDF).")] = None,
    burn_device: Annotated[Optional[str], typer.Option(help="Burn each volume to this drive with xorriso and verify "
                                                            "({n}: volume number).")] = None,
    priority: Annotated[str, typer.Option(help="urgent (a patient waits at the desk), normal or batch.")] = "normal",
    detach: Annotated[bool, typer.Option(help="Print the job id and return; follow with `discflow status`.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary object.")] = False,
) -> None:
    """Export studies to ISO 9660 disc images with a DICOMDIR (IHE PDI layout).

    Examples:

        discflow export --source ./study --syntax keep --out ./out

        discflow export --from-node ORTHANC@127.0.0.1:4242 --patient-id 12345 --syntax uncompressed --out ./out

        discflow export --source ./study --profile GUIDELINE --report report.txt --viewer /srv/viewer --media dvd

        discflow export --source ./study --media usb --out /media/stick

        DISCFLOW_BROKER_URL=redis://127.0.0.1:6379/0 discflow export --source ./study --json

        DISCFLOW_BROKER_URL=redis://127.0.0.1:6379/0 discflow export --source ./study --priority urgent --detach
    """
    try:
        request = export_request(source=source, from_node=from_node, patient_id=patient_id, study_uid=study_uid,
                                 accession=accession, syntax=syntax, out=out, volume_capacity=volume_capacity,
                                 batch_size=batch_size, profile=profile, media=media, report=report, viewer=viewer,
                                 hot_folder=hot_folder, robot=robot, burn_device=burn_device)
    except (UsageError, ValueError) as error:
        _fail(str(error))
    submit_or_run("export", request, as_json, priority, detach, "export")


def export_request(*, source: Optional[Path] = None, from_node: Optional[str] = None, patient_id: Optional[str] = None,
                   study_uid: list[str] = (), accession: Optional[str] = None, syntax: str = "keep",
                   out: Path = Path("out"), volume_capacity: Optional[int] = None, batch_size: Optional[int] = None,
                   profile: str = "auto", media: Optional[str] = None, report: Optional[Path] = None,
                   viewer: Optional[Path] = None, hot_folder: Optional[Path] = None, robot: Optional[str] = None,
                   burn_device: Optional[str] = None) -> dict[str, Any]:
    """An export job's request, checked now so that a mistake fails before any work (UsageError, ValueError)."""
    from orchestration.commands_media import media_options
    if syntax not in POLICIES:
        raise UsageError(f"unknown --syntax {syntax!r}; choose one of {', '.join(POLICIES)}")
    request = {"source": _source(source, from_node, patient_id, list(study_uid), accession), "syntax": syntax,
               "out_dir": str(out.resolve()), "volume_capacity": volume_capacity, "batch_size": batch_size,
               "burn_device": burn_device,
               **media_options(syntax, profile, media, report, viewer, hot_folder, robot, burn_device)}
    out.mkdir(parents=True, exist_ok=True)
    return request


def import_request(*, disc: Path, to: Optional[str], send: str = "negotiate", rules: Optional[Path] = None,
                   study: list[str] = ()) -> dict[str, Any]:
    """An import job's request, checked now (UsageError, ValueError, RulesError)."""
    from tasks.dimse import STORE_MODES, Node  # pynetdicom: imported by the commands that need it (0.15 s)
    if not disc.exists():
        raise UsageError(f"disc not found: {disc}")
    if send not in STORE_MODES:
        raise UsageError(f"unknown --send {send!r}; choose one of {', '.join(STORE_MODES)}")
    if not to:
        raise UsageError("--to AE@HOST:PORT is required (or use --list)")
    Node.parse(to)
    load_rules(rules)
    return {"medium": str(disc.resolve()), "node": to, "send": send, "studies": list(study),
            "rules": str(rules.resolve()) if rules else None}


@cli.command("import")
def import_(
    disc: Annotated[Path, typer.Argument(help="An ISO image, a ZIP, or a folder / mounted drive.")],
    to: Annotated[Optional[str], typer.Option(help="The local PACS, AE@HOST:PORT.")] = None,
    send: Annotated[str, typer.Option(help="keep | uncompressed | negotiate (original where the PACS accepts it).")] = "negotiate",
    rules: Annotated[Optional[Path], typer.Option(help="Reconciliation rules (TOML).")] = None,
    study: Annotated[list[str], typer.Option(help="Import only this Study Instance UID (repeatable).")] = [],
    list_only: Annotated[bool, typer.Option("--list", help="Only show what is on the disc.")] = False,
    priority: Annotated[str, typer.Option(help="urgent, normal or batch.")] = "normal",
    detach: Annotated[bool, typer.Option(help="Print the job id and return; follow with `discflow status`.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Import an outside disc into the local PACS; the disc is treated as untrusted.

    Examples:

        discflow import disc.iso --list

        discflow import disc.iso --to PACS@127.0.0.1:4242 --send keep --json

        discflow import /media/cdrom --to PACS@127.0.0.1:4242 --rules rules.toml --study 1.2.3.4
    """
    if not disc.exists():
        _fail(f"disc not found: {disc}")
    if list_only:
        _list_disc(disc, as_json)
        return
    try:
        request = import_request(disc=disc, to=to, send=send, rules=rules, study=study)
    except (UsageError, ValueError, RulesError) as error:
        _fail(str(error))
    submit_or_run("import", request, as_json, priority, detach, "import")


def _list_disc(disc: Path, as_json: bool) -> None:
    try:
        found = read_medium(disc)
    except MediaError as error:
        _fail(str(error), 1)
    listing = disc_listing(found)
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
    else:
        terminal.print_listing(listing)
    raise typer.Exit(0 if found.instances else 1)


@cli.command()
def demo(
    images: Annotated[int, typer.Option(help="Instances in the demo CT study.")] = 200,
    out: Annotated[Path, typer.Option(help="Folder for the disc image.")] = Path("out"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build a CT study from the real slice in pydicom-data and export it, on the embedded default.

    Example: `discflow demo` prints where VOL001.ISO is.
    """
    from orchestration.corpus import StudySpec, build_study
    study = get_settings().spool_dir.parent / "demo-study"
    if not study.is_dir() or len(list(study.glob("*.dcm"))) != images:
        terminal.console.print(f"building a {images}-image CT study in {study} ...")
        for old in study.glob("*.dcm"):
            old.unlink()
        build_study(study, StudySpec(images=images))
    out.mkdir(parents=True, exist_ok=True)
    request = {"source": {"folder": str(study)}, "syntax": "keep", "out_dir": str(out.resolve())}
    submit_or_run("export", request, as_json, "normal", False, "demo export")


@cli.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = ",".join(STAGES),
    concurrency: Annotated[int, typer.Option(help="Worker processes (0: one per CPU).")] = 0,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[Optional[str], typer.Option(help="Worker node name, e.g. transcode1@%h.")] = None,
) -> None:
    """Run a Celery worker for discflow's queues (needs DISCFLOW_BROKER_URL).

    Example: `DISCFLOW_BROKER_URL=redis://127.0.0.1:6379/0 discflow worker --queues transcode --concurrency 8`
    """
    unknown = set(queues.split(",")) - set(STAGES)
    if unknown:
        _fail(f"unknown queue(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    if not get_settings().broker_url:
        _fail("set DISCFLOW_BROKER_URL to the Redis all workers share, e.g. redis://127.0.0.1:6379/0")
    argv = ["worker", "-Q", queues, "-l", loglevel, "-E"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if hostname:
        argv += ["-n", hostname]
    app.worker_main(argv)


# Sub-commands kept in their own modules register themselves on `cli` when imported.
from orchestration import commands_bench, commands_jobs, commands_media, commands_ops, commands_service  # noqa: E402,F401


def main() -> None:
    # What is imported lives as long as the process: exempt it from the garbage collector, which
    # otherwise walks it all again at exit (0.3 s of every command).
    gc.freeze()
    for number in _STOP_SIGNALS:
        if signal.getsignal(number) is signal.SIG_DFL:  # `nohup discflow ...` keeps SIGHUP ignored
            signal.signal(number, _stop_on_signal)
    cli(prog_name="discflow")


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop_on_signal(number: int, _frame: object) -> None:
    """`kill`, a service manager's stop or a closed terminal end a command as Ctrl-C does: the
    embedded Redis and workers it started are stopped on the way out, not left running (Python's
    default for SIGTERM exits at once, without unwinding). A second signal must not cut that
    clean-up short, so the signals are ignored from here on."""
    for stop in _STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    raise SystemExit(128 + number)


if __name__ == "__main__":
    # Run as `python -m orchestration.cli`: the sub-command modules registered themselves on the
    # importable module's app, not on this __main__ copy.
    from orchestration.cli import main as registered_main
    sys.exit(registered_main())

"""`discflow` sub-commands for media (registered on the shared Typer app when imported):
``validate`` a disc, ``burn`` (or hand to a robot) an image, and the export's media options."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from orchestration import console as terminal
from orchestration.cli import _fail, cli
from tasks.burn import ROBOTS, BurnError, VolumeToBurn, burn_to_device, handoff_to_robot, verify_device
from tasks.media_source import MediaError
from tasks.profiles import AUTO, MEDIA_CAPACITY_BYTES, ProfileError, check_policy, profile_named
from tasks.report_document import ReportError, read_report_file
from tasks.validate import ValidationReport, validate_medium
from tasks.viewer_bundle import ViewerError, load_viewer
from workers.settings import get_settings


def media_options(syntax: str, profile: str, media: Optional[str], report: Optional[Path], viewer: Optional[Path],
                  hot_folder: Optional[Path], robot: Optional[str], burn_device: Optional[str]) -> dict[str, Any]:
    """The export request's media keys, checked now so that a mistake fails before any work (ValueError)."""
    settings = get_settings()
    chosen = None if profile.lower() == AUTO else profile_named(profile).name
    check_policy(syntax, chosen)
    if media is not None and media not in MEDIA_CAPACITY_BYTES:
        raise ProfileError(f"unknown --media {media!r}; choose one of {', '.join(MEDIA_CAPACITY_BYTES)}")
    if report is not None:
        try:
            read_report_file(report)
        except ReportError as error:
            raise ValueError(str(error)) from error
    try:
        bundle = load_viewer(viewer or settings.viewer_dir, settings.viewer_start)
    except ViewerError as error:
        raise ValueError(str(error)) from error
    if chosen and profile_named(chosen).requires_viewer and bundle is None:
        raise ProfileError(f"profile {chosen} requires a viewer on the disc: give --viewer DIR or set DISCFLOW_VIEWER_DIR")
    if robot is not None and robot not in ROBOTS:
        raise ValueError(f"unknown --robot {robot!r}; choose {' or '.join(ROBOTS)}")
    if hot_folder is not None and not hot_folder.is_dir():
        raise ValueError(f"hot folder not found: {hot_folder}")
    if media == "usb" and (burn_device or hot_folder):
        raise ValueError("--media usb writes folders; --burn-device and --hot-folder burn ISO images")
    return {"profile": chosen or AUTO, "media": media, "report": str(report.resolve()) if report else None,
            "viewer_dir": str(viewer.resolve()) if viewer else None,
            "hot_folder": str(hot_folder.resolve()) if hot_folder else None, "robot": robot}


def _device_for(device: str, number: int, count: int, interactive: bool) -> str:
    """The drive for volume ``number``: ``{n}`` in the device names one per volume (file-backed
    drives); one real drive needs a fresh disc per volume, asked for on a terminal."""
    if "{n}" in device:
        return device.replace("{n}", str(number))
    if count > 1 and number > 1:
        if not interactive:
            raise BurnError(f"volume {number} of {count} needs another disc in {device}; burn it with "
                            f"`discflow burn` or give a device with {{n}}")
        typer.prompt(f"Insert a blank disc for volume {number} of {count} into {device} and press Enter",
                     default="", show_default=False)
    return device


def burn_volumes(summary: dict[str, Any], device: Optional[str], as_json: bool) -> None:
    """Burn each ISO volume of a finished export to ``device`` and verify it by reading it back;
    the outcome goes into the summary (a failed burn makes the job partial)."""
    if not device or summary.get("status") == "failed":
        _print_media(summary, as_json)
        return
    interactive = sys.stdin.isatty() and not as_json
    volumes = [v for v in summary.get("volumes", []) if str(v["path"]).upper().endswith(".ISO")]
    burned = []
    for number, volume in enumerate(volumes, start=1):
        image = Path(volume["path"])
        try:
            target = _device_for(device, number, len(volumes), interactive)
            digest = burn_to_device(image, target)
            burned.append({"volume": volume.get("label"), "device": target, "verified": True, "sha256": digest})
        except (BurnError, OSError) as error:
            burned.append({"volume": volume.get("label"), "device": device, "verified": False, "error": str(error)})
            summary.setdefault("failures", []).append({"file": str(image), "reason": f"burn: {error}"})
            summary["status"] = "partial"
    summary["burn"] = burned
    _print_media(summary, as_json)


def _print_media(summary: dict[str, Any], as_json: bool) -> None:
    if as_json or "profile" not in summary:
        return
    out = terminal.console
    converted = summary.get("converted_for_profile") or {}
    line = f"profile {summary['profile']} on {summary.get('media', 'cd')}"
    if converted.get("count"):
        line += (f"; {converted['count']} instance(s) converted to Explicit VR Little Endian because the profile "
                 f"forbids their syntax ({', '.join(f'{n} x {s}' for s, n in converted['by_syntax'].items())})")
    out.print(line, highlight=False)
    for volume in summary.get("volumes", []):
        extra = f", robot job {volume['handoff']}" if volume.get("handoff") else ""
        extra += f", [red]robot hand-off failed: {volume['handoff_error']}[/red]" if volume.get("handoff_error") else ""
        out.print(f"volume {volume.get('label', '')}: {volume['path']} ({volume.get('thumbnails', 0)} thumbnail(s), "
                  f"{volume.get('reports', 0)} report(s), checksums {volume.get('checksums', '-')}){extra}",
                  highlight=False)
    for problem in summary.get("profile_problems", []):
        out.print(f"[yellow]profile {summary['profile']}:[/yellow] {problem}", highlight=False)
    for burned in summary.get("burn", []):
        state = "burned and verified" if burned["verified"] else f"[red]not burned: {burned['error']}[/red]"
        out.print(f"volume {burned['volume']} -> {burned['device']}: {state}", highlight=False)


def print_validation(report: ValidationReport) -> None:
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"{report.medium}" + (f" (profile {report.profile})" if report.profile else ""))
    for rule in report.rules:
        mark = "[green]PASS[/green]" if rule.passed else "[red]FAIL[/red]"
        out.print(f"{mark}  {rule.rule:<21} {rule.reason}")
        for detail in rule.details[:20]:
            out.print(f"      {detail}")
        if len(rule.details) > 20:
            out.print(f"      ... {len(rule.details) - 20} more (see --json)")
    out.print("valid" if report.passed else f"{sum(not r.passed for r in report.rules)} rule(s) failed")


@cli.command()
def validate(
    medium: Annotated[Path, typer.Argument(help="An ISO image, a ZIP, or a folder / mounted disc / USB stick.")],
    profile: Annotated[Optional[str], typer.Option(help="Check against this profile (STD-GEN-CD, ..., GUIDELINE).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check a disc: Part 10 files, DICOMDIR (readable, consistent both ways), file IDs, transfer
    syntaxes, display attributes, report, web content, autorun and programs. One line per rule;
    exit status 0 when every rule passes, 1 when one fails, 2 for a usage error.

    Examples:

        discflow validate disc.iso

        discflow validate /media/cdrom --profile GUIDELINE

        discflow validate portal-download.zip --json
    """
    if not medium.exists():
        _fail(f"medium not found: {medium}")
    try:
        report = validate_medium(medium, profile)
    except ProfileError as error:
        _fail(str(error))
    except MediaError as error:
        _fail(str(error), 1)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_validation(report)
    raise typer.Exit(0 if report.passed else 1)


@cli.command()
def burn(
    image: Annotated[Path, typer.Argument(help="A volume image written by `discflow export` (VOL001.ISO).")],
    device: Annotated[Optional[str], typer.Option(help="Drive to burn with xorriso, e.g. /dev/sr0.")] = None,
    hot_folder: Annotated[Optional[Path], typer.Option(help="Disc-robot hot folder instead of a drive.")] = None,
    robot: Annotated[str, typer.Option(help="primera (.JRQ) or epson (.JDF, needs the file-set: use export).")] = "primera",
    verify_only: Annotated[bool, typer.Option("--verify-only", help="Only read the disc back and compare.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Burn a volume image to a drive and verify it against its checksum manifest, or hand it to a
    disc robot's hot folder.

    Examples:

        discflow burn out/VOL001.ISO --device /dev/sr0

        discflow burn out/VOL001.ISO --device /dev/sr0 --verify-only

        discflow burn out/VOL001.ISO --hot-folder /mnt/ptburn --robot primera
    """
    settings = get_settings()
    device = device or settings.burn_device
    hot_folder = hot_folder or settings.burn_hot_folder
    if not image.is_file():
        _fail(f"image not found: {image}")
    if bool(device) == bool(hot_folder):
        _fail("give exactly one of --device or --hot-folder (or set DISCFLOW_BURN_DEVICE)")
    try:
        if hot_folder:
            volume = VolumeToBurn(image, image.stem.upper(), 1, 1)
            result = {"image": str(image), "job_file": str(handoff_to_robot(
                volume, hot_folder, robot, robot_path=settings.burn_robot_path, copies=settings.burn_copies))}
        else:
            digest = verify_device(image, device) if verify_only else burn_to_device(image, device)
            result = {"image": str(image), "device": device, "verified": True, "sha256": digest}
    except BurnError as error:
        if as_json:
            typer.echo(json.dumps({"image": str(image), "verified": False, "error": str(error)}))
            raise typer.Exit(1)
        _fail(str(error), 1)
    typer.echo(json.dumps(result) if as_json else
               (f"handed to the robot: {result['job_file']}" if hot_folder else f"{device}: burned and verified"))

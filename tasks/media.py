"""assemble-media: lay out the PDI file-set of each volume, write DICOMDIR, index and the ISO image.

Per volume (each a complete file-set, labelled "n of m"): DICOMDIR (records keyed for the job's
profile), the DICOM files, README.TXT, INDEX.HTM with a thumbnail per series and links to the
reports, IHE_PDI/ (thumbnails, report copies), the viewer bundle with AUTORUN.INF when one is
configured, and a SHA-256 manifest beside the image. ``--media usb`` writes the same tree as a
folder ``USB001/`` instead of an ISO. With a robot hot folder configured, each finished ISO is
handed to the robot (tasks.burn); burning to a local drive is the CLI's job (the drive is at the
operator's desk, not necessarily at the worker).
"""
from __future__ import annotations

from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

from celery import chord
from pydicom import config
from pydicom.datadict import tag_for_keyword

from tasks.burn import BurnError, VolumeToBurn, handoff_to_robot, write_folder_checksums, \
    write_image_checksum
from tasks.dicomdir import RECORD_INSTANCE_KEYWORDS, DirectoryEntry, file_id_for, write_dicomdir
from tasks.disc_index import attach_web_content, index_html, readme_text, summarize
from tasks.iso_image import build_folder, build_iso
from tasks.manifest import Manifest, as_json, dataset_from_json, read_manifest
from tasks.profiles import MEDIA_CAPACITY_BYTES, conversion_summary
from tasks.spool import JobSpool, read_json, write_json
from tasks.viewer_bundle import ViewerBundle, autorun_inf, load_viewer
from tasks.volume_plan import Output, plan_volumes
from tasks.web_content import WEB_INSTANCE_KEYWORDS, build_web_content
from workers import progress
from workers.app import app
from workers.job_control import ensure_not_cancelled
from workers.settings import get_settings
from workers.timing import stage_timer


def load_manifest(spool: JobSpool) -> Manifest:
    return read_manifest(spool.manifest_path)


def resolve_outputs(spool: JobSpool, manifest: Manifest) -> tuple[dict[int, Output], list[dict[str, str]]]:
    """The file each instance contributes to the media, and the instances that failed to convert."""
    outputs: dict[int, Output] = {}
    failures: list[dict[str, str]] = []
    for instance in manifest.instances:
        if instance.action == "copy":
            outputs[instance.index] = Output(instance.index, instance.source, instance.transfer_syntax,
                                             instance.sop_instance_uid, instance.size)
    for batch in spool.outcomes("transcode"):
        for outcome in batch:
            index = outcome["index"]
            if outcome["ok"]:
                outputs[index] = Output(index, outcome["path"], outcome["transfer_syntax"],
                                        outcome["sop_instance_uid"], outcome["bytes_out"])
            else:
                failures.append({"file": manifest.instances[index].source, "reason": outcome["reason"]})
    return outputs, failures


def volume_capacity(options: dict[str, Any]) -> int | None:
    """Bytes per volume: --volume-capacity, else the --media type's, else the configured default
    (a CD). None for a USB folder without an explicit capacity: one volume."""
    if options.get("volume_capacity"):
        return int(options["volume_capacity"])
    if options.get("media"):
        return MEDIA_CAPACITY_BYTES[options["media"]]
    return get_settings().volume_capacity_bytes


def job_viewer(options: dict[str, Any]) -> ViewerBundle | None:
    settings = get_settings()
    return load_viewer(options.get("viewer_dir") or settings.viewer_dir, settings.viewer_start)


def plan_media(spool: JobSpool, manifest: Manifest | None = None) -> int:
    """Decide the volumes; write the plan to the spool; return how many volumes there are.
    ``manifest``: the job's, when the caller has just written it."""
    manifest = manifest or load_manifest(spool)
    outputs, failures = resolve_outputs(spool, manifest)
    viewer = job_viewer(manifest.options)
    reserved = viewer.disc_bytes if viewer else 0
    volumes = plan_volumes(manifest, outputs, volume_capacity(manifest.options), reserved) if outputs else []
    write_json(spool.path / "media" / "plan.json", {
        "volumes": volumes, "outputs": {i: as_json(o) for i, o in outputs.items()}, "failures": failures})
    return len(volumes)


def _directory_entries(manifest: Manifest, indices: list[int], outputs: dict[str, Any]) -> list[tuple[DirectoryEntry, str]]:
    """Directory entries for one volume with their file IDs, patient > study > series > instance number."""
    # Series in Series Number order (as a reader lists them), instances in Instance Number order.
    instances = sorted((manifest.instances[i] for i in indices),
                       key=lambda i: (i.patient, i.study, _series_number(manifest, i.series), i.series,
                                      _instance_number(i.attributes), i.index))
    numbers: dict[str, dict[int, int]] = defaultdict(dict)
    per_series: dict[int, int] = defaultdict(int)
    # Each patient, study and series is parsed once and shared by its instances (the writers only read
    # them): parsing them per instance was most of this stage's time.
    levels: dict[tuple[str, int], Any] = {}

    def level(kind: str, index: int) -> Any:
        if (kind, index) not in levels:
            levels[kind, index] = dataset_from_json(getattr(manifest, kind)[index].attributes)
        return levels[kind, index]

    entries = []
    for instance in instances:
        patient_no = numbers["patient"].setdefault(instance.patient, len(numbers["patient"]) + 1)
        study_no = numbers["study"].setdefault(instance.study, len(numbers["study"]) + 1)
        series_no = numbers["series"].setdefault(instance.series, len(numbers["series"]) + 1)
        per_series[instance.series] += 1
        output = outputs[str(instance.index)]
        entry = DirectoryEntry(
            file_id=file_id_for(patient_no, study_no, series_no, per_series[instance.series]),
            sop_class_uid=instance.sop_class_uid, sop_instance_uid=output["sop_instance_uid"],
            transfer_syntax=output["transfer_syntax"],
            patient=level("patients", instance.patient), study=level("studies", instance.study),
            series=level("series", instance.series),
            instance=dataset_from_json(_entry_attributes(instance.attributes)),
        )
        entries.append((entry, output["path"]))
    return entries


def _entry_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """The part of an instance's header subset (DICOM JSON) that the DICOMDIR records and the web
    content read: a few of its ~20 attributes, so converting it to a Dataset costs a fifth."""
    wanted = _entry_json_keys()
    return {key: value for key, value in attributes.items() if key in wanted}


@cache
def _entry_json_keys() -> frozenset[str]:
    return frozenset(f"{tag_for_keyword(keyword):08X}" for keyword in RECORD_INSTANCE_KEYWORDS | WEB_INSTANCE_KEYWORDS)


def _series_number(manifest: Manifest, series: int) -> int:
    return _instance_number(manifest.series[series].attributes, "00200011")


def _instance_number(attributes: dict[str, Any], tag: str = "00200013") -> int:
    value = (attributes.get(tag, {}).get("Value") or [0])[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def assemble_volume(spool: JobSpool, number: int, manifest: Manifest | None = None) -> dict[str, Any]:
    """Write volume ``number`` (1-based): DICOMDIR, README.TXT, INDEX.HTM, web content, viewer, and
    the ISO image (or USB folder) with its checksum manifest; hand it to a robot when configured.
    ``manifest``: the job's, when the caller holds it already."""
    manifest = manifest or load_manifest(spool)
    options = manifest.options
    plan = read_json(spool.path / "media" / "plan.json")
    volume_count = len(plan["volumes"])
    # Header values were checked when scanned and records repair what breaks its VR: validating every
    # value again while parsing the manifest's JSON cost a third of this stage.
    with config.disable_value_validation():
        pairs = _directory_entries(manifest, plan["volumes"][number - 1], plan["outputs"])
    entries = [entry for entry, _ in pairs]
    staging = spool.path / "media" / f"VOL{number:03d}"
    dicomdir = staging / "DICOMDIR"
    write_dicomdir(dicomdir, entries, file_set_id=_label(number), profile=options.get("profile_resolved"))
    web = build_web_content(pairs, options.get("report_texts") or {})
    viewer = job_viewer(options)
    summary = summarize(entries, volume_no=number, volume_count=volume_count,
                        institution=get_settings().institution_name, viewer=viewer.start if viewer else None)
    attach_web_content(summary, web.thumbnails,
                       {uid: [(r.title, r.pdf, r.text) for r in links] for uid, links in web.reports.items()})
    files = [("DICOMDIR", dicomdir)] + [("/".join(entry.file_id), Path(path)) for entry, path in pairs]
    files += viewer.files if viewer else []
    extra = [("README.TXT", readme_text(summary).encode("ascii", "replace")),
             ("INDEX.HTM", index_html(summary).encode("utf-8")), *web.files]
    if viewer and viewer.start:
        extra.append(("AUTORUN.INF", autorun_inf(viewer.start, f"DICOM {number} of {volume_count}")))
    out_dir = Path(options.get("out_dir") or spool.path / "out")
    result = {"volume": number, "label": f"{number} of {volume_count}", "instances": len(entries),
              "bytes_in": sum(Path(p).stat().st_size for _, p in pairs), "thumbnails": len(web.thumbnails),
              "reports": sum(len(links) for links in web.reports.values())}
    if options.get("media") == "usb":
        result.update(_write_usb(out_dir / f"USB{number:03d}", files, extra))
    else:
        result.update(_write_iso(out_dir / f"VOL{number:03d}.ISO", files, extra, number, volume_count, options))
    write_json(staging / "result.json", result)
    return result


def _write_usb(root: Path, files: list[tuple[str, Path]], extra: list[tuple[str, bytes]]) -> dict[str, Any]:
    size, digests = build_folder(root, files, extra_files=extra)
    return {"path": str(root), "bytes": size, "checksums": str(write_folder_checksums(root, digests))}


def _write_iso(iso_path: Path, files: list[tuple[str, Path]], extra: list[tuple[str, bytes]], number: int,
               volume_count: int, options: dict[str, Any]) -> dict[str, Any]:
    size, digest = build_iso(iso_path, files, volume_id=_label(number), extra_files=extra)
    checksums = write_image_checksum(iso_path, digest)
    written: dict[str, Any] = {"path": str(iso_path), "bytes": size, "checksums": str(checksums)}
    settings = get_settings()
    hot_folder = options.get("hot_folder") or settings.burn_hot_folder
    if hot_folder:
        volume = VolumeToBurn(iso_path, _label(number), number, volume_count, options.get("media") or "cd",
                              files=[*files, *extra])
        try:
            job_file = handoff_to_robot(volume, Path(hot_folder), options.get("robot") or settings.burn_robot,
                                        robot_path=settings.burn_robot_path, copies=settings.burn_copies)
            written["handoff"] = str(job_file)
        except (BurnError, OSError) as error:  # the image is fine; the operator can hand it over again
            written["handoff_error"] = str(error)
    return written


def _label(number: int) -> str:
    return f"{get_settings().volume_label[:12]}_{number:03d}".upper()


def finish_export(spool: JobSpool, manifest: Manifest | None = None) -> dict[str, Any]:
    """Write the job's outcome to the spool; return only counts (task results are visible to operators)."""
    manifest = manifest or load_manifest(spool)
    plan = read_json(spool.path / "media" / "plan.json")
    volumes = [read_json(spool.path / "media" / f"VOL{n:03d}" / "result.json")
               for n in range(1, len(plan["volumes"]) + 1)]
    written = sum(v["instances"] for v in volumes)
    failed = len(plan["failures"])
    total = len(manifest.instances)
    status = "succeeded" if written == total and not failed else ("partial" if written else "failed")
    summary = {
        "job_id": spool.job_id, "status": status,
        "instances": {"total": total, "written": written, "failed": failed},
        "volumes": [_volume_summary(v) for v in volumes],
        "failures": plan["failures"], "skipped": manifest.skipped,
        "profile": manifest.options.get("profile_resolved"), "media": manifest.options.get("media") or "cd",
        "converted_for_profile": _converted_for_profile(manifest),
        "profile_problems": manifest.options.get("profile_problems") or [],
    }
    write_json(spool.summary_path, summary)
    return {"job_id": spool.job_id, "status": status, "written": written, "failed": failed}


def _volume_summary(volume: dict[str, Any]) -> dict[str, Any]:
    keys = ("path", "bytes", "instances", "label", "checksums", "thumbnails", "reports", "handoff", "handoff_error")
    return {key: volume[key] for key in keys if key in volume}


def _converted_for_profile(manifest: Manifest) -> dict[str, Any]:
    """How many instances (and which files) were converted only because the profile forbids their syntax."""
    converted = manifest.options.get("converted_for_profile") or []
    summary = conversion_summary(manifest.options)
    summary["files"] = [{"file": manifest.instances[c["index"]].source, "from": c["from"], "to": c["to"]}
                        for c in converted]
    return summary


def _spool(job_id: str) -> JobSpool:
    return JobSpool(get_settings().spool_dir, job_id)


@app.task(bind=True, name="discflow.media.plan")
def plan_media_task(self, _batches: list, job_id: str):
    ensure_not_cancelled(self, job_id)
    spool = _spool(job_id)
    wait_for_batches(self, spool, "transcode")
    return media_stage(self, job_id, spool)


def media_stage(task, job_id: str, spool: JobSpool, part: str = "", manifest: Manifest | None = None):
    """Plan the volumes (timed as the media stage; ``part`` names it inside another stage's task,
    which may pass the ``manifest`` it has just written), then assemble[volume 1..n] -> finish.
    A single volume (the usual disc) is assembled and finished in this task: two hops fewer,
    and the manifest is not parsed again in another process (together 30-80 ms of a 0.5 s export)."""
    with stage_timer(task, job_id, "media", part) as timing:
        if part:
            timing.queue_wait = 0.0  # the task's queue wait is counted with its own stage
        manifest = manifest or load_manifest(spool)
        volume_count = plan_media(spool, manifest)
    if volume_count:
        progress.set_total(task.app.conf.broker_url, job_id, "media", volume_count)
    if volume_count <= 1:
        if volume_count:
            ensure_not_cancelled(task, job_id)  # the scan or transcode may have run a while: no disc then
            _timed_assembly(task, job_id, spool, 1, "assemble", manifest)
        with stage_timer(task, job_id, "media", "finish") as timing:
            timing.queue_wait = 0.0
            return finish_export(spool, manifest)
    header = [assemble_volume_task.si(job_id, n) for n in range(1, volume_count + 1)]
    return task.replace(chord(header, finish_export_task.s(job_id)))


def wait_for_batches(task, spool: JobSpool, stage: str, outcome_stage: str | None = None,
                     countdown: float = 2) -> None:
    """A chord body may be released early when a header task ran twice (at-least-once delivery
    counts both runs), and an import's batches run outside any chord (the scan starts them):
    come back every ``countdown`` seconds, for up to 30 minutes, until every batch's
    outcome is in the spool."""
    missing = spool.unfinished_batches(stage, outcome_stage)
    if missing:
        raise task.retry(countdown=countdown, max_retries=int(1800 / countdown), exc=RuntimeError(
            f"batch(es) {', '.join(map(str, missing[:10]))} of the {outcome_stage or stage} stage never finished"))


@app.task(bind=True, name="discflow.media.assemble")
def assemble_volume_task(self, job_id: str, number: int) -> dict[str, int]:
    ensure_not_cancelled(self, job_id)
    return _timed_assembly(self, job_id, _spool(job_id), number)


def _timed_assembly(task, job_id: str, spool: JobSpool, number: int, part: str = "",
                    manifest: Manifest | None = None) -> dict[str, int]:
    with stage_timer(task, job_id, "media", part) as timing:
        if part:
            timing.queue_wait = 0.0
        result = assemble_volume(spool, number, manifest)
        timing.count(result["instances"], result["bytes_in"], result["bytes"])
    progress.advance(task.app.conf.broker_url, job_id, "media", 1)
    return {"volume": number, "instances": result["instances"], "bytes": result["bytes"]}


@app.task(bind=True, name="discflow.media.finish")
def finish_export_task(self, _volumes: list, job_id: str) -> dict[str, Any]:
    spool = _spool(job_id)
    volume_count = len(read_json(spool.path / "media" / "plan.json")["volumes"])
    missing = [n for n in range(1, volume_count + 1)
               if not (spool.path / "media" / f"VOL{n:03d}" / "result.json").exists()]
    if missing:  # released early by a volume task that ran twice: come back when all are written
        raise self.retry(countdown=2, max_retries=900,
                         exc=RuntimeError(f"volume(s) {', '.join(map(str, missing))} were never written"))
    with stage_timer(self, job_id, "media"):
        return finish_export(_spool(job_id))

"""assemble-media: lay out the PDI file-set of each volume, write DICOMDIR, index and the ISO image."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from celery import chord

from tasks.dicomdir import DirectoryEntry, file_id_for, write_dicomdir
from tasks.disc_index import index_html, readme_text, summarize
from tasks.iso_image import build_iso
from tasks.manifest import Manifest, dataset_from_json
from tasks.spool import JobSpool, read_json, write_json
from tasks.volume_plan import Output, plan_volumes
from workers import progress
from workers.app import app
from workers.settings import get_settings
from workers.timing import stage_timer


def load_manifest(spool: JobSpool) -> Manifest:
    return Manifest.from_json(read_json(spool.manifest_path))


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


def plan_media(spool: JobSpool) -> int:
    """Decide the volumes; write the plan to the spool; return how many volumes there are."""
    manifest = load_manifest(spool)
    outputs, failures = resolve_outputs(spool, manifest)
    capacity = int(manifest.options.get("volume_capacity") or get_settings().volume_capacity_bytes)
    volumes = plan_volumes(manifest, outputs, capacity) if outputs else []
    write_json(spool.path / "media" / "plan.json", {
        "volumes": volumes, "outputs": {i: asdict(o) for i, o in outputs.items()}, "failures": failures})
    return len(volumes)


def _directory_entries(manifest: Manifest, indices: list[int], outputs: dict[str, Any]) -> list[tuple[DirectoryEntry, str]]:
    """Directory entries for one volume with their file IDs, patient > study > series > instance number."""
    instances = sorted((manifest.instances[i] for i in indices),
                       key=lambda i: (i.patient, i.study, i.series, _instance_number(i.attributes), i.index))
    numbers: dict[str, dict[int, int]] = defaultdict(dict)
    per_series: dict[int, int] = defaultdict(int)
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
            patient=dataset_from_json(manifest.patients[instance.patient].attributes),
            study=dataset_from_json(manifest.studies[instance.study].attributes),
            series=dataset_from_json(manifest.series[instance.series].attributes),
            instance=dataset_from_json(instance.attributes),
        )
        entries.append((entry, output["path"]))
    return entries


def _instance_number(attributes: dict[str, Any]) -> int:
    value = attributes.get("00200013", {}).get("Value", [0])[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def assemble_volume(spool: JobSpool, number: int) -> dict[str, Any]:
    """Write volume ``number`` (1-based): DICOMDIR, README.TXT, INDEX.HTM and the ISO image."""
    manifest = load_manifest(spool)
    plan = read_json(spool.path / "media" / "plan.json")
    volume_count = len(plan["volumes"])
    pairs = _directory_entries(manifest, plan["volumes"][number - 1], plan["outputs"])
    entries = [entry for entry, _ in pairs]
    staging = spool.path / "media" / f"VOL{number:03d}"
    dicomdir = staging / "DICOMDIR"
    write_dicomdir(dicomdir, entries, file_set_id=_label(number))
    settings = get_settings()
    summary = summarize(entries, volume_no=number, volume_count=volume_count, institution=settings.institution_name)
    out_dir = Path(manifest.options.get("out_dir") or spool.path / "out")
    iso_path = out_dir / f"VOL{number:03d}.ISO"
    files = [("DICOMDIR", dicomdir)] + [("/".join(entry.file_id), Path(path)) for entry, path in pairs]
    extra = [("README.TXT", readme_text(summary).encode("ascii", "replace")),
             ("INDEX.HTM", index_html(summary).encode("utf-8"))]
    size = build_iso(iso_path, files, volume_id=_label(number), extra_files=extra)
    result = {"volume": number, "path": str(iso_path), "bytes": size, "instances": len(entries),
              "bytes_in": sum(Path(p).stat().st_size for _, p in pairs)}
    write_json(staging / "result.json", result)
    return result


def _label(number: int) -> str:
    return f"{get_settings().volume_label[:12]}_{number:03d}".upper()


def finish_export(spool: JobSpool) -> dict[str, Any]:
    """Write the job's outcome to the spool; return only counts (task results are visible to operators)."""
    manifest = load_manifest(spool)
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
        "volumes": [{"path": v["path"], "bytes": v["bytes"], "instances": v["instances"]} for v in volumes],
        "failures": plan["failures"], "skipped": manifest.skipped,
    }
    write_json(spool.summary_path, summary)
    return {"job_id": spool.job_id, "status": status, "written": written, "failed": failed}


def _spool(job_id: str) -> JobSpool:
    return JobSpool(get_settings().spool_dir, job_id)


@app.task(bind=True, name="discflow.media.plan")
def plan_media_task(self, _batches: list, job_id: str):
    spool = _spool(job_id)
    with stage_timer(self, job_id, "media"):
        volume_count = plan_media(spool)
    if not volume_count:
        return self.replace(finish_export_task.si([], job_id))
    progress.set_total(self.app.conf.broker_url, job_id, "media", volume_count)
    header = [assemble_volume_task.si(job_id, n) for n in range(1, volume_count + 1)]
    return self.replace(chord(header, finish_export_task.s(job_id)))


@app.task(bind=True, name="discflow.media.assemble")
def assemble_volume_task(self, job_id: str, number: int) -> dict[str, int]:
    with stage_timer(self, job_id, "media") as timing:
        result = assemble_volume(_spool(job_id), number)
        timing.count(result["instances"], result["bytes_in"], result["bytes"])
    progress.advance(self.app.conf.broker_url, job_id, "media", 1)
    return {"volume": number, "instances": result["instances"], "bytes": result["bytes"]}


@app.task(bind=True, name="discflow.media.finish")
def finish_export_task(self, _volumes: list, job_id: str) -> dict[str, Any]:
    with stage_timer(self, job_id, "media"):
        return finish_export(_spool(job_id))

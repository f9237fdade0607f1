"""transcode: convert a batch of instances to the job's transfer syntax, one outcome per instance."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from tasks import transfer_syntax
from tasks.decode_guard import DecodeGuardError, guarded
from tasks.manifest import Instance
from tasks.media_source import MediaError, Medium, RefusedFile, extract, open_medium
from tasks.reconcile import apply_edits
from tasks.spool import JobSpool, atomic_writer, read_json, write_json
from workers import progress
from workers.app import app
from workers.job_control import ensure_not_cancelled
from workers.settings import get_settings
from workers.timing import stage_timer


@dataclass
class Outcome:
    """What became of one instance in a stage; ``path`` is the file the next stage uses."""
    index: int
    ok: bool
    path: str = ""
    transfer_syntax: str = ""
    sop_instance_uid: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    reason: str = ""


def transcode_instance(spool: JobSpool, instance: Instance) -> Outcome:
    destination = spool.transcoded_path(instance.index)
    source = Path(instance.source)
    try:
        if instance.action == "rewrite" and not instance.target_syntax:
            result = transfer_syntax.rewrite_part10(source, destination)
        else:
            result = transfer_syntax.convert_file(source, destination, str(instance.target_syntax))
    except transfer_syntax.ConversionError as error:
        return Outcome(instance.index, False, reason=str(error), bytes_in=instance.size)
    except Exception as error:  # noqa: BLE001 — one bad instance must not fail its batch
        return Outcome(instance.index, False, reason=f"{type(error).__name__}: {error}", bytes_in=instance.size)
    return Outcome(instance.index, True, str(destination), result.transfer_syntax, result.sop_instance_uid,
                   result.bytes_in, result.bytes_out)


def redo_failed(outcome_path: Path, instances: list[Instance], work) -> list[Outcome]:
    """Run ``work`` on each instance that has no successful outcome yet (a rerun or a resume
    redoes only what failed), and record the batch's outcomes atomically."""
    previous = {o["index"]: Outcome(**o) for o in read_json(outcome_path)} if outcome_path.exists() else {}
    if previous and all(o.ok for o in previous.values()):
        return [previous[i.index] for i in instances]
    outcomes = [previous[i.index] if i.index in previous and previous[i.index].ok else work(i) for i in instances]
    write_json(outcome_path, [asdict(o) for o in outcomes])
    return outcomes


def transcode_batch(spool: JobSpool, number: int) -> list[Outcome]:
    """Convert one batch; instances already converted (by an earlier run) are not redone."""
    instances = [Instance(**i) for i in read_json(spool.batch_path("transcode", number))]
    return redo_failed(spool.outcome_path("transcode", number), instances,
                       lambda instance: transcode_instance(spool, instance))


@app.task(bind=True, name="discflow.transcode.batch")
def transcode_batch_task(self, job_id: str, number: int) -> dict[str, int]:
    ensure_not_cancelled(self, job_id)
    settings = get_settings()
    spool = JobSpool(settings.spool_dir, job_id)
    with stage_timer(self, job_id, "transcode") as timing:
        outcomes = transcode_batch(spool, number)
        timing.count(len(outcomes), sum(o.bytes_in for o in outcomes), sum(o.bytes_out for o in outcomes))
    progress.advance(self.app.conf.broker_url, job_id, "transcode", len(outcomes))
    return {"batch": number, "ok": sum(o.ok for o in outcomes), "failed": sum(not o.ok for o in outcomes)}


# --- import: take instances off the medium, reconcile, convert when the send mode asks ---------

def _imported_path(spool: JobSpool, index: int, suffix: str = "") -> Path:
    return spool.source_dir / f"{index // 1000:04d}" / f"{index:08d}{suffix}.dcm"


def _write_edited(path: Path, instance: Instance, reason: str) -> None:
    """Apply reconciliation edits (pixel data untouched, not decoded) and write proper Part 10."""
    dataset = pydicom.dcmread(path, force=True)
    apply_edits(dataset, instance.edits, reason)
    meta = dataset.file_meta
    meta.TransferSyntaxUID = meta.get("TransferSyntaxUID") or instance.transfer_syntax
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    with atomic_writer(path) as handle:
        dataset.save_as(handle, enforce_file_format=True)


def prepare_import_instance(medium: Medium, spool: JobSpool, instance: Instance, send: str,
                            reason: str) -> Outcome:
    extracted = _imported_path(spool, instance.index)
    try:
        size = extract(medium, instance.source, extracted, max_bytes=instance.size)
        if instance.action == "rewrite" and not instance.edits:
            transfer_syntax.rewrite_part10(extracted, extracted)
        elif instance.edits or instance.action == "rewrite":
            _write_edited(extracted, instance, reason)
        path, syntax = extracted, instance.transfer_syntax
        if send == "uncompressed" and transfer_syntax.needs_conversion(syntax, ExplicitVRLittleEndian):
            path = _imported_path(spool, instance.index, "-raw")
            syntax = _guarded_decode(extracted, path, instance.source)
    except (transfer_syntax.ConversionError, RefusedFile, MediaError, DecodeGuardError) as error:
        return Outcome(instance.index, False, reason=str(error), bytes_in=instance.size)
    except Exception as error:  # noqa: BLE001 — one bad file must not fail its batch
        return Outcome(instance.index, False, reason=f"{type(error).__name__}: {error}", bytes_in=instance.size)
    return Outcome(instance.index, True, str(path), syntax, instance.sop_instance_uid, size, path.stat().st_size)


def _guarded_decode(source: Path, destination: Path, label: str) -> str:
    """Decode untrusted pixel data to Explicit VR Little Endian in a child process with a time and
    a memory limit (tasks.decode_guard); a stopped decode leaves no temp file behind."""
    settings = get_settings()
    try:
        return guarded(transfer_syntax.convert_file, source, destination, ExplicitVRLittleEndian,
                       seconds=settings.decode_timeout_seconds, memory_bytes=settings.decode_memory_bytes,
                       label=label).transfer_syntax
    except DecodeGuardError:
        destination.with_name(f".{destination.name}.part").unlink(missing_ok=True)
        raise


def prepare_import_batch(spool: JobSpool, number: int) -> list[Outcome]:
    """Extract (and reconcile, convert) one batch; instances already prepared are not redone."""
    outcome_path = spool.outcome_path("transcode", number)
    instances = [Instance(**i) for i in read_json(spool.batch_path("store", number))]
    if outcome_path.exists() and all(o["ok"] for o in read_json(outcome_path)):
        return [Outcome(**o) for o in read_json(outcome_path)]
    request = read_json(spool.path / "request.json")
    send, reason = request.get("send", "negotiate"), request.get("reason", "COERCE")
    with open_medium(Path(request["medium"])) as medium:
        return redo_failed(outcome_path, instances,
                           lambda instance: prepare_import_instance(medium, spool, instance, send, reason))


@app.task(bind=True, name="discflow.transcode.prepare_import")
def prepare_import_batch_task(self, job_id: str, number: int) -> dict[str, int]:
    ensure_not_cancelled(self, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    with stage_timer(self, job_id, "transcode") as timing:
        outcomes = prepare_import_batch(spool, number)
        timing.count(len(outcomes), sum(o.bytes_in for o in outcomes), sum(o.bytes_out for o in outcomes))
    progress.advance(self.app.conf.broker_url, job_id, "transcode", len(outcomes))
    return {"batch": number, "ok": sum(o.ok for o in outcomes), "failed": sum(not o.ok for o in outcomes)}

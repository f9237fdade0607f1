"""transcode: convert a batch of instances to the job's transfer syntax, one outcome per instance."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from tasks import transfer_syntax
from tasks.decode_guard import DecodeGuardError, guarded, guarded_each
from tasks.manifest import Instance
from tasks.media_source import MediaError, Medium, RefusedFile, extract, opened_medium
from tasks.reconcile import apply_edits
from tasks.spool import JobSpool, atomic_writer, instance_folder, read_json, write_json
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
    on_medium: bool = False
    """``path`` is the file's path on the import medium (sent from there), not in the spool."""


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
    return spool.source_dir / instance_folder(index) / f"{index:08d}{suffix}.dcm"


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


def _failure_reason(error: Exception) -> str:
    """The reason an instance is reported with: the message of the errors that name the file and
    say why, the type and the message of any other."""
    if isinstance(error, (transfer_syntax.ConversionError, RefusedFile, MediaError, DecodeGuardError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def needs_decode(instance: Instance, send: str) -> bool:
    """Whether sending ``instance`` in mode ``send`` needs its pixel data decoded first."""
    return send == "uncompressed" and transfer_syntax.needs_conversion(instance.transfer_syntax,
                                                                      ExplicitVRLittleEndian)


def _extract_instance(medium: Medium, spool: JobSpool, instance: Instance, reason: str) -> tuple[Path, int]:
    """Take the instance off the medium into the spool and apply its reconciliation edits (no decode)."""
    extracted = _imported_path(spool, instance.index)
    size = extract(medium, instance.source, extracted, max_bytes=instance.size)
    if instance.action == "rewrite" and not instance.edits:
        transfer_syntax.rewrite_part10(extracted, extracted)
    elif instance.edits or instance.action == "rewrite":
        _write_edited(extracted, instance, reason)
    return extracted, size


def _prepared(spool: JobSpool, instance: Instance, size: int, decoded: tuple[bool, str] | None = None) -> Outcome:
    """The outcome of an extracted instance: as extracted, or its decode's ``(True, syntax)`` or
    ``(False, reason)``."""
    if decoded is None:
        path, syntax = _imported_path(spool, instance.index), instance.transfer_syntax
    elif decoded[0]:
        path, syntax = _imported_path(spool, instance.index, "-raw"), decoded[1]
    else:
        return Outcome(instance.index, False, reason=decoded[1], bytes_in=instance.size)
    return Outcome(instance.index, True, str(path), syntax, instance.sop_instance_uid, size, path.stat().st_size)


def prepare_import_instance(medium: Medium, spool: JobSpool, instance: Instance, send: str,
                            reason: str) -> Outcome:
    try:
        extracted, size = _extract_instance(medium, spool, instance, reason)
        decoded = None
        if needs_decode(instance, send):
            decoded = True, _guarded_decode(extracted, _imported_path(spool, instance.index, "-raw"),
                                            instance.source)
    except Exception as error:  # noqa: BLE001 — one bad file must not fail its batch
        return Outcome(instance.index, False, reason=_failure_reason(error), bytes_in=instance.size)
    return _prepared(spool, instance, size, decoded)


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


def _decode(source: Path, destination: Path) -> str:
    """One decode in the batch's guarded child (module level: monkeypatching convert_file reaches it)."""
    return transfer_syntax.convert_file(source, destination, ExplicitVRLittleEndian).transfer_syntax


def _guarded_decodes(decodes: list[tuple[Path, Path, str]]) -> list[tuple[bool, str]]:
    """``(True, syntax)`` or ``(False, reason)`` for each ``(source, destination, label)``: all in one
    guarded child (tasks.decode_guard.guarded_each: the time limit per file, the memory limit for the
    child), a file's own error a reason, the others go on. Only if that child dies as a whole (a
    time or memory limit, a crash) is each decode redone in a child of its own, so that the file
    that did it is named and refused exactly as prepare_import_instance would."""
    settings = get_settings()
    if len(decodes) > 1:
        try:
            return guarded_each(_decode, [(source, destination) for source, destination, _ in decodes],
                                seconds=settings.decode_timeout_seconds, memory_bytes=settings.decode_memory_bytes,
                                label=f"{len(decodes)} decodes from {decodes[0][2]}", describe=_failure_reason)
        except Exception:  # noqa: BLE001 — not knowing which file did it, ask each on its own
            for _, destination, _ in decodes:
                destination.with_name(f".{destination.name}.part").unlink(missing_ok=True)
    results = []
    for source, destination, label in decodes:
        try:
            results.append((True, _guarded_decode(source, destination, label)))
        except Exception as error:  # noqa: BLE001 — one bad file must not fail its batch
            results.append((False, _failure_reason(error)))
    return results


def _sent_from_medium(medium: Medium, instance: Instance, send: str) -> bool:
    """A file in a folder medium that goes to the PACS unchanged is sent from the medium (opened
    beneath its root without following links, like extract): a copy into the spool cost ~1 ms of
    file creation per instance plus a second read, and protected nothing more."""
    return (medium.kind == "folder" and instance.action == "copy" and not instance.edits
            and not needs_decode(instance, send))


def _left_on_medium(medium: Medium, instance: Instance) -> Outcome:
    try:
        size = medium.size(instance.source)
    except Exception as error:  # noqa: BLE001 — a file gone or swapped since the scan: this one fails
        return Outcome(instance.index, False, reason=_failure_reason(error), bytes_in=instance.size)
    if size != instance.size:
        return Outcome(instance.index, False, bytes_in=instance.size,
                       reason=f"{instance.source}: {size} bytes now, {instance.size} when the medium was scanned")
    return Outcome(instance.index, True, instance.source, instance.transfer_syntax, instance.sop_instance_uid,
                   size, size, on_medium=True)


def prepare_import_instances(medium: Medium, spool: JobSpool, instances: list[Instance], send: str,
                             reason: str) -> dict[int, Outcome]:
    """prepare_import_instance for each instance, by index, with the same outcomes and reasons, but
    the decodes (``send == "uncompressed"``) of all of them in one guarded child, not one each."""
    outcomes: dict[int, Outcome] = {}
    extracted: list[tuple[Instance, Path, int]] = []
    for instance in instances:
        if _sent_from_medium(medium, instance, send):
            outcomes[instance.index] = _left_on_medium(medium, instance)
            continue
        try:
            path, size = _extract_instance(medium, spool, instance, reason)
        except Exception as error:  # noqa: BLE001 — one bad file must not fail its batch
            outcomes[instance.index] = Outcome(instance.index, False, reason=_failure_reason(error),
                                               bytes_in=instance.size)
            continue
        if needs_decode(instance, send):
            extracted.append((instance, path, size))
        else:
            outcomes[instance.index] = _prepared(spool, instance, size)
    decoded = _guarded_decodes([(path, _imported_path(spool, instance.index, "-raw"), instance.source)
                                for instance, path, _ in extracted])
    for (instance, _, size), result in zip(extracted, decoded, strict=True):
        outcomes[instance.index] = _prepared(spool, instance, size, result)
    return outcomes


def prepare_import_batch(spool: JobSpool, number: int, medium: Medium | None = None) -> list[Outcome]:
    """Extract (and reconcile, convert) one batch; instances already prepared are not redone.
    ``medium``: the job's medium when the caller has it open already."""
    outcome_path = spool.outcome_path("transcode", number)
    instances = [Instance(**i) for i in read_json(spool.batch_path("store", number))]
    previous = read_json(outcome_path) if outcome_path.exists() else None
    if previous is not None and all(o["ok"] for o in previous):
        return [Outcome(**o) for o in previous]
    prepared = {o["index"] for o in previous or [] if o["ok"]}  # as redo_failed: only the failed are redone
    request = read_json(spool.path / "request.json")
    send, reason = request.get("send", "negotiate"), request.get("reason", "COERCE")
    with opened_medium(request["medium"], medium) as opened:
        outcomes = prepare_import_instances(opened, spool, [i for i in instances if i.index not in prepared],
                                            send, reason)
    return redo_failed(outcome_path, instances, lambda instance: outcomes[instance.index])


@app.task(bind=True, name="discflow.transcode.prepare_import")
def prepare_import_batch_task(self, job_id: str, number: int) -> dict[str, int]:
    ensure_not_cancelled(self, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    with stage_timer(self, job_id, "transcode") as timing:
        outcomes = prepare_import_batch(spool, number)
        timing.count(len(outcomes), sum(o.bytes_in for o in outcomes), sum(o.bytes_out for o in outcomes))
    progress.advance(self.app.conf.broker_url, job_id, "transcode", len(outcomes))
    return {"batch": number, "ok": sum(o.ok for o in outcomes), "failed": sum(not o.ok for o in outcomes)}

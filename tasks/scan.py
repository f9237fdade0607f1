"""scan: read headers only, group patient > study > series, write the manifest, build the canvas."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery import chord

from tasks.dicom_header import NotDicomError, read_header
from tasks.manifest import Instance, Manifest, ManifestBuilder, as_json
from tasks.media_scan import FoundInstance, MediaScan, scan_medium
from tasks.media_source import open_medium
from tasks.reconcile import PatientLookup, load_rules, plan_instance_edits, plan_patient_edits
from tasks.spool import JobSpool, read_json, write_json
from workers import batch_events, progress
from workers.app import app
from workers.job_control import ensure_not_cancelled
from workers.settings import get_settings
from workers.timing import stage_timer

REQUEST = "request.json"


class SourceError(Exception):
    """The job's source is missing, empty or unreachable; the message is for the operator."""


def walk_files(root: Path) -> Iterator[Path]:
    """Every regular file below ``root`` in a stable order, without following symlinks."""
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def scan_files(paths: list[str], builder: ManifestBuilder) -> None:
    """Read each file's header into ``builder``; a file that is not DICOM is listed as skipped."""
    for name in paths:
        path = Path(name)
        try:
            header = read_header(path)
        except NotDicomError as error:
            builder.skip(path, str(error))
            continue
        instance = builder.add(path, path.stat().st_size, header.dataset, header.transfer_syntax)
        instance.action = "copy" if header.part10 else "rewrite"


def plan_conversions(manifest: Manifest, policy: str, profile: str | None = None, media: str = "cd") -> list[int]:
    """Mark what each instance needs under ``policy`` within the media ``profile`` (None: ``auto``);
    return the indices that need a transcode task. See tasks.profiles."""
    from tasks.profiles import plan_profile_conversions
    return plan_profile_conversions(manifest, policy, profile, media)[1]


def list_export_source(spool: JobSpool) -> int:
    """Fetch the study into the spool when the source is a DICOM node; split the source's files
    into chunks for :func:`scan_chunk`; return how many."""
    request: dict[str, Any] = spool.read(REQUEST)
    source = request["source"]
    if "node" in source:
        from tasks.retrieve import retrieve_to_spool
        retrieve_to_spool(source, spool)
        root = spool.source_dir
    else:
        root = Path(source["folder"])
    if not root.is_dir():
        raise SourceError(f"source folder not found: {root}")
    files = [str(path) for path in walk_files(root)]
    count = -(-len(files) // max(1, get_settings().scan_chunk_files))
    for stale in (spool.batch_path("scan", 0).parent, spool.outcome_path("scan", 0).parent):
        shutil.rmtree(stale, ignore_errors=True)  # a scan run again: its chunks are this listing's only
    for number in range(count):  # even chunks, in walk order
        write_json(spool.batch_path("scan", number), files[number * len(files) // count:
                                                            (number + 1) * len(files) // count])
    return count


def scan_chunk(spool: JobSpool, number: int) -> None:
    """Read the headers of one chunk into a partial manifest in the spool."""
    builder = ManifestBuilder(spool.job_id, "export", {})
    scan_files(read_json(spool.batch_path("scan", number)), builder)
    write_json(spool.outcome_path("scan", number), builder.manifest.to_json())


def merge_scan(spool: JobSpool, chunk_count: int) -> tuple[Manifest, list[int]]:
    """The job's manifest from its chunks (grouped as one pass over the files would have), with
    its reports added and conversions planned; written to the spool."""
    request: dict[str, Any] = spool.read(REQUEST)
    builder = ManifestBuilder(spool.job_id, "export", request)
    for number in range(chunk_count):
        builder.merge(Manifest.from_json(read_json(spool.outcome_path("scan", number))))
    manifest = builder.manifest
    if not manifest.instances:
        raise SourceError(f"no DICOM instances found in the source ({len(manifest.skipped)} files skipped)")
    from tasks.profiles import plan_export
    work = plan_export(spool, builder, request)  # reports added, profile chosen, conversions planned
    spool.write("manifest.json", manifest.to_json())
    return manifest, work


def scan_export(spool: JobSpool) -> tuple[Manifest, list[int]]:
    """Scan the job's source (folder or DICOM node) and plan its conversions, in this process
    (the tasks run the same steps with the chunks in parallel)."""
    return scan_chunks_here(spool, list_export_source(spool))


def scan_chunks_here(spool: JobSpool, chunk_count: int) -> tuple[Manifest, list[int]]:
    """Every chunk, one after the other, then the merge."""
    for number in range(chunk_count):
        scan_chunk(spool, number)
    return merge_scan(spool, chunk_count)


@app.task(bind=True, name="discflow.scan.export")
def scan_export_task(self, job_id: str):
    """List the source; a small one is scanned here, a larger one by a chunk task per
    ``scan_chunk_files`` files (a setting), then :func:`merge_scan_task`."""
    ensure_not_cancelled(self, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    with stage_timer(self, job_id, "scan") as timing:
        chunk_count = list_export_source(spool)
        if chunk_count <= 1:
            manifest, work = scan_chunks_here(spool, chunk_count)
            timing.count(len(manifest.instances), manifest.source_bytes(), 0)
    if chunk_count > 1:
        chunks = [scan_chunk_task.si(job_id, number) for number in range(chunk_count)]
        return self.replace(chord(chunks, merge_scan_task.s(job_id, chunk_count)))
    return _start_export(self, job_id, spool, manifest, work)


@app.task(bind=True, name="discflow.scan.chunk")
def scan_chunk_task(self, job_id: str, number: int) -> int:
    ensure_not_cancelled(self, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    with stage_timer(self, job_id, "scan"):
        scan_chunk(spool, number)
    return number


@app.task(bind=True, name="discflow.scan.merge")
def merge_scan_task(self, _chunks: list, job_id: str, chunk_count: int):
    from tasks.media import wait_for_batches

    ensure_not_cancelled(self, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    wait_for_batches(self, spool, "scan", countdown=0.5)
    with stage_timer(self, job_id, "scan") as timing:
        manifest, work = merge_scan(spool, chunk_count)
        timing.count(len(manifest.instances), manifest.source_bytes(), 0)
    return _start_export(self, job_id, spool, manifest, work)


def _start_export(task, job_id: str, spool: JobSpool, manifest: Manifest, work: list[int]):
    """Write the transcode batches and hand on to them; with nothing to transcode, run the media
    stage here (:func:`tasks.media.media_stage`: a single volume is assembled in this task)."""
    from tasks.media import media_stage

    batch_count = write_batches(spool, manifest, work)
    progress.set_total(task.app.conf.broker_url, job_id, "transcode", len(work))
    if not batch_count:
        return media_stage(task, job_id, spool, part="plan", manifest=manifest)
    return task.replace(export_canvas(job_id, batch_count))


def export_canvas(job_id: str, batch_count: int):
    """transcode[batch 1..n] -> plan-media (which fans out assemble-media per volume)."""
    from tasks.media import plan_media_task
    from tasks.transcode import transcode_batch_task

    if not batch_count:
        return plan_media_task.si([], job_id)
    header = [transcode_batch_task.si(job_id, number) for number in range(batch_count)]
    return chord(header, plan_media_task.s(job_id))


def write_batches(spool: JobSpool, manifest: Manifest, work: list[int], stage: str = "transcode") -> int:
    """Write one small work file per batch, so a task never parses the whole manifest; return the
    number of batches."""
    batch_size = int(manifest.options.get("batch_size") or get_settings().batch_size)
    batches = manifest.batches(batch_size, work)
    for number, indices in enumerate(batches):
        # as_json, not asdict: the same JSON without deep-copying every instance's attributes.
        write_json(spool.batch_path(stage, number), [as_json(manifest.instances[i]) for i in indices])
    return len(batches)


def read_medium(location: str | Path, on_found: Callable[[FoundInstance], None] | None = None) -> MediaScan:
    """Everything scan learns from a medium: instances (headers only) and problems."""
    settings = get_settings()
    with open_medium(Path(location)) as medium:
        return scan_medium(medium, max_pixels=settings.max_pixels_per_instance, on_found=on_found)


class ImportPlanner:
    """Builds the import manifest one found instance at a time: grouping, the studies asked for,
    reconciliation edits; each batch goes to ``on_batch(number, instances)`` as soon as it is full,
    so storing starts while the rest of the medium is still being read."""

    def __init__(self, job_id: str, request: dict[str, Any], lookup: PatientLookup | None = None,
                 on_batch: Callable[[int, list[Instance]], None] | None = None) -> None:
        self.rules = load_rules(Path(request["rules"]) if request.get("rules") else None)
        # Instances are sent as they are: no directory record or disc index needs their
        # attributes (a fifth of the scan's CPU); patient, study and series keep theirs.
        self.builder = ManifestBuilder(job_id, "import", request, instance_keywords=())
        self.batch_count = 0
        self._lookup, self._on_batch = lookup, on_batch
        self._wanted = set(request.get("studies") or [])
        self._batch_size = int(request.get("batch_size") or get_settings().import_batch_size)
        self._patient_edits: dict[int, dict[str, str]] = {}
        self._batch: list[Instance] = []

    def add(self, item: FoundInstance) -> None:
        if self._wanted and item.study_instance_uid not in self._wanted:
            return
        instance = self.builder.add(item.path, item.size, item.header, item.transfer_syntax)
        instance.action = "copy" if item.has_preamble else "rewrite"
        if instance.patient not in self._patient_edits:
            self._patient_edits[instance.patient] = plan_patient_edits(item.header, self.rules, self._lookup)
        instance.edits = {**self._patient_edits[instance.patient], **plan_instance_edits(item.header, self.rules)}
        self._batch.append(instance)
        if len(self._batch) == self._batch_size:
            self._close_batch()

    def _close_batch(self) -> None:
        if self._batch:
            if self._on_batch is not None:
                self._on_batch(self.batch_count, self._batch)
            self.batch_count += 1
            self._batch = []

    def finish(self, found: MediaScan) -> Manifest:
        """The manifest, once the whole medium is read: the last batch closed, problems listed."""
        self._close_batch()
        manifest = self.builder.manifest
        for problem in found.problems:
            entry = {"file": problem.file, "reason": problem.reason}
            if problem.severity == "error":
                manifest.skipped.append({**entry, "kind": "refused"})
            elif problem.reason.startswith("skipped"):
                manifest.skipped.append({**entry, "kind": "not-dicom"})
            else:
                manifest.notes.append(entry)
        manifest.options.update(syntaxes=found.syntaxes(), used_dicomdir=found.used_dicomdir,
                                dicomdir_problems=found.dicomdir_problems, reason=self.rules.reason)
        return manifest


def build_import_manifest(job_id: str, request: dict[str, Any], found: MediaScan,
                          lookup: PatientLookup | None = None) -> Manifest:
    """Group what the medium holds, keep the studies asked for, and plan reconciliation edits."""
    planner = ImportPlanner(job_id, request, lookup)
    for item in found.instances:
        planner.add(item)
    return planner.finish(found)


def scan_import(spool: JobSpool, on_batch: Callable[[int, list[Instance]], None] | None = None) -> Manifest:
    """Read the medium into the manifest; with ``on_batch``, each full batch is handed on at once."""
    request: dict[str, Any] = spool.read(REQUEST)
    planner = ImportPlanner(spool.job_id, request, on_batch=on_batch)
    spool.write(REQUEST, {**request, "reason": planner.rules.reason})  # before any batch task reads it
    manifest = planner.finish(read_medium(request["medium"], planner.add))
    spool.write("manifest.json", manifest.to_json())
    return manifest


@app.task(bind=True, name="discflow.scan.import")
def scan_import_task(self, job_id: str):
    from tasks.store import finish_import_task
    from tasks.transcode import needs_decode

    ensure_not_cancelled(self, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    send = spool.read(REQUEST).get("send", "negotiate")

    def store_at_once(number: int, instances: list[Instance]) -> None:
        write_json(spool.batch_path("store", number), [as_json(instance) for instance in instances])
        batch_canvas(job_id, number, send, decodes=any(needs_decode(i, send) for i in instances)).apply_async()

    with stage_timer(self, job_id, "scan") as timing:
        manifest = scan_import(spool, store_at_once)  # every batch, the last one too, is started here
        timing.count(len(manifest.instances), manifest.source_bytes(), 0)
    broker = self.app.conf.broker_url
    progress.set_total(broker, job_id, "transcode", len(manifest.instances))
    progress.set_total(broker, job_id, "store", len(manifest.instances))
    return self.replace(finish_import_task.si([], job_id))  # it waits until every batch's outcome is in


def batch_canvas(job_id: str, number: int, send: str, decodes: bool = True):
    """One import batch: prepare (on the transcode queue, it decodes) -> store when the send mode
    decompresses and the batch holds compressed instances (``decodes``); else prepare and store
    in one task on the store queue."""
    from celery import chain
    from tasks.store import import_batch_task, store_batch_task
    from tasks.transcode import prepare_import_batch_task

    if send != "uncompressed" or not decodes:
        return import_batch_task.si(job_id, number)
    return chain(prepare_import_batch_task.si(job_id, number), store_batch_task.si(job_id, number))


def import_canvas(job_id: str, batch_count: int, send: str):
    """Each batch (:func:`batch_canvas`) -> finish: how ``resume`` runs an import again (a first
    run's scan starts each batch itself as soon as it is full)."""
    from tasks.store import finish_import_task

    if not batch_count:
        return finish_import_task.si([], job_id)
    return chord([batch_canvas(job_id, n, send) for n in range(batch_count)], finish_import_task.s(job_id))


@app.task(bind=True, name="discflow.scan.resume")
def resume_job_task(self, job_id: str, kind: str):
    """Run a job again from what its spool holds: finished batches are skipped, failed instances
    redone; a job whose scan never finished is scanned again."""
    ensure_not_cancelled(self, job_id)
    spool = JobSpool(get_settings().spool_dir, job_id)
    if not spool.manifest_path.exists():
        return self.replace((scan_export_task if kind == "export" else scan_import_task).si(job_id))
    stage = "transcode" if kind == "export" else "store"
    batch_count = len(list((spool.path / "batches" / stage).glob("*.json")))
    progress.restart(self.app.conf.broker_url, job_id)
    batch_events.restart(self.app.conf.broker_url, job_id)  # a batch the last run left "running" runs again
    if kind == "export":
        return self.replace(export_canvas(job_id, batch_count))
    return self.replace(import_canvas(job_id, batch_count, spool.read(REQUEST).get("send", "negotiate")))

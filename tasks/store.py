"""store: C-STORE prepared instances to the PACS over parallel associations; finish the import."""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tasks.dimse import Node, store_files
from tasks.manifest import read_manifest
from tasks.media_source import MediaError, Medium, open_medium, opened_medium
from tasks.spool import JobSpool, read_json, write_json
from workers import batch_events, progress
from workers.app import app
from workers.job_control import ensure_not_cancelled
from workers.settings import get_settings
from workers.timing import stage_timer

logger = logging.getLogger(__name__)


@dataclass
class StoreResult:
    index: int
    ok: bool
    status: int | None = None
    sent_syntax: str = ""
    bytes: int = 0
    reason: str = ""


def store_batch(spool: JobSpool, number: int, medium: Medium | None = None) -> list[StoreResult]:
    """Send what the prepare step produced for batch ``number``; a batch already stored is not resent.
    ``medium``: the job's medium when the caller has it open already."""
    outcome_path = spool.outcome_path("store", number)
    previous = {r["index"]: StoreResult(**r) for r in read_json(outcome_path)} if outcome_path.exists() else {}
    prepared = read_json(spool.outcome_path("transcode", number))
    results = {p["index"]: StoreResult(p["index"], False, reason=p["reason"]) for p in prepared if not p["ok"]}
    results.update({i: r for i, r in previous.items() if r.ok})
    pending = [p for p in prepared if p["ok"] and p["index"] not in results]
    if pending:
        settings = get_settings()
        request = read_json(spool.path / "request.json")
        with _opener(request["medium"], any(p.get("on_medium") for p in pending), medium) as opener:
            outcomes = store_files(Node.parse(request["node"]), [Path(p["path"]) for p in pending],
                                   mode=request.get("send", "negotiate"), associations=settings.store_associations,
                                   calling_ae=settings.ae_title, timeout=settings.network_timeout_seconds,
                                   retries=settings.store_retries, backoff=settings.store_backoff_seconds,
                                   opener=opener)
        for item, outcome in zip(pending, outcomes):
            results[item["index"]] = StoreResult(item["index"], outcome.ok, outcome.status, outcome.sent_syntax or "",
                                                 item["bytes_out"], outcome.reason)
    ordered = [results[p["index"]] for p in prepared]
    write_json(outcome_path, [asdict(r) for r in ordered])
    return ordered


def _medium_if_readable(spool: JobSpool) -> AbstractContextManager[Medium | None]:
    """The job's medium, or None when it is gone (a resumed job whose files are all in the spool
    needs none; a part that does need it opens it and reports why it cannot)."""
    try:
        return open_medium(Path(spool.read("request.json")["medium"]))
    except (MediaError, OSError):
        return nullcontext(None)


@contextmanager
def _opener(location: str, needed: bool, medium: Medium | None) -> Iterator[Callable[[Path], BinaryIO]]:
    """Opens spool files (absolute paths) plainly and files left on the medium (relative paths,
    see tasks.transcode._sent_from_medium) through the medium, beneath its root only."""
    if not needed:
        yield lambda path: path.open("rb")
        return
    with opened_medium(location, medium) as opened:
        yield lambda path: path.open("rb") if path.is_absolute() else opened.open(str(path))


def finish_import(spool: JobSpool) -> dict[str, Any]:
    """Write the job's outcome to the spool; return counts only (task results are visible to operators)."""
    manifest = read_manifest(spool.manifest_path)
    stored = {r["index"]: r for batch in spool.outcomes("store") for r in batch}
    refused = [{"file": s["file"], "reason": s["reason"]} for s in manifest.skipped if s.get("kind") == "refused"]
    failures = [{"file": manifest.instances[i].source, "reason": r["reason"]} for i, r in stored.items() if not r["ok"]]
    failures += refused
    not_dicom = [s for s in manifest.skipped if s.get("kind") != "refused"]
    ok = sum(1 for r in stored.values() if r["ok"])
    total = len(manifest.instances) + len(refused)
    status = "succeeded" if ok == total else ("partial" if ok else "failed")
    summary = {
        "job_id": spool.job_id, "status": status,
        "instances": {"total": total, "stored": ok, "failed": len(failures), "skipped": len(not_dicom)},
        "syntaxes": manifest.options.get("syntaxes", {}),
        "failures": failures, "skipped": not_dicom, "notes": manifest.notes,
        "dicomdir": {"used": manifest.options.get("used_dicomdir", False),
                     "problems": manifest.options.get("dicomdir_problems", [])},
        "sent_syntaxes": _count(r["sent_syntax"] for r in stored.values() if r["ok"]),
    }
    write_json(spool.summary_path, summary)
    if status == "succeeded":
        shutil.rmtree(spool.source_dir, ignore_errors=True)  # extracted copies of patient data
    return {"job_id": spool.job_id, "status": status, "stored": ok, "failed": len(failures)}


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _spool(job_id: str) -> JobSpool:
    return JobSpool(get_settings().spool_dir, job_id)


@app.task(bind=True, name="discflow.store.batch")
def store_batch_task(self, job_id: str, number: int) -> dict[str, int]:
    ensure_not_cancelled(self, job_id)
    return _timed_store(self, job_id, number)


@app.task(bind=True, name="discflow.store.import_batch")
def import_batch_task(self, job_id: str, number: int) -> dict[str, int]:
    """Take one batch off the medium (copy, reconcile) and store it, in one task: used when
    nothing needs decoding, so the batch saves a Celery round trip and stays on the store queue.
    (A batch to decompress goes through the transcode queue: ``tasks.scan.batch_canvas``.)"""
    from tasks.transcode import prepare_import_batch

    ensure_not_cancelled(self, job_id)
    spool = _spool(job_id)
    with _medium_if_readable(spool) as medium:  # opened and listed once for both parts
        with stage_timer(self, job_id, "transcode", part="prepare") as timing:
            outcomes = prepare_import_batch(spool, number, medium)
            timing.count(len(outcomes), sum(o.bytes_in for o in outcomes), sum(o.bytes_out for o in outcomes))
        progress.advance(self.app.conf.broker_url, job_id, "transcode", len(outcomes))
        return _timed_store(self, job_id, number, part="store", medium=medium)


def _timed_store(task, job_id: str, number: int, part: str = "", medium: Medium | None = None) -> dict[str, int]:
    broker = task.app.conf.broker_url
    batch_events.started(broker, job_id, number)
    with stage_timer(task, job_id, "store", part) as timing:
        if part:
            timing.queue_wait = 0.0  # the task waited in the queue once: counted with its first part
        results = store_batch(_spool(job_id), number, medium)
        sent = sum(r.bytes for r in results if r.ok)
        timing.count(len(results), sent, sent)
    batch_events.finished(broker, job_id, number)
    progress.advance(broker, job_id, "store", len(results))
    return {"batch": number, "ok": sum(r.ok for r in results), "failed": sum(not r.ok for r in results)}


FINISH_BLOCK_SECONDS = 5.0
"""How long the finish may block on batches running elsewhere before it polls again."""


@app.task(bind=True, name="discflow.store.finish")
def finish_import_task(self, _batches: list, job_id: str) -> dict[str, Any]:
    from tasks.media import wait_for_batches

    spool = _spool(job_id)
    deadline = time.monotonic() + FINISH_BLOCK_SECONDS
    while (missing := spool.unfinished_batches("store")) and time.monotonic() < deadline:
        if not batch_events.wait_for_one(self.app.conf.broker_url, job_id, missing, deadline - time.monotonic()):
            break  # a batch is still queued: give this process back to it, come back in 0.1 s
    if missing and (lost := batch_events.overdue(self.app.conf.broker_url, job_id, missing,
                                                 get_settings().visibility_timeout_seconds + LOST_BATCH_GRACE_SECONDS)):
        resend_batches(job_id, spool, lost)
    wait_for_batches(self, spool, "store", countdown=0.1)
    with stage_timer(self, job_id, "store"):
        return finish_import(spool)


LOST_BATCH_GRACE_SECONDS = 30.0
"""Beyond the broker's visibility timeout (after which a killed worker's messages are redelivered),
how long the job may stand still before a batch that never started is sent again."""


def resend_batches(job_id: str, spool: JobSpool, numbers: list[int]) -> None:
    """Send store batches again whose message vanished. Redis hands a worker a message before kombu
    records it as unacknowledged, so a worker killed in between loses it for good (kombu issues
    #305, #1836), and the job would wait out its 30 minutes. Batches are idempotent: one that was
    only late runs twice and stores nothing twice."""
    from tasks.scan import REQUEST, batch_canvas

    send = spool.read(REQUEST).get("send", "negotiate")
    logger.warning("job %s: store batch(es) %s never finished; sent again", job_id, ", ".join(map(str, numbers)))
    for number in numbers:
        batch_canvas(job_id, number, send).apply_async()

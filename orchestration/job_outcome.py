"""A finished job's spool (manifest, outcomes, summary) turned into ledger rows and audit events."""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from orchestration import audit
from orchestration.ledger import Ledger
from tasks.manifest import Manifest, read_manifest
from tasks.spool import JobSpool, read_json
from workers.settings import get_settings

logger = logging.getLogger(__name__)


def record_finished_job(ledger: Ledger, job_id: str) -> None:
    spool = JobSpool(get_settings().spool_dir, job_id)
    summary = read_json(spool.summary_path)
    manifest = read_manifest(spool.manifest_path)
    rows = instance_rows(spool, manifest)
    ledger.record_outcomes(job_id, rows)
    ledger.set_bytes(job_id, sum(row["bytes"] for row in rows if row["ok"]))
    ledger.finish_job(job_id, summary)
    record_audit(ledger, manifest, summary, rows)


def instance_rows(spool: JobSpool, manifest: Manifest) -> list[dict[str, Any]]:
    """One row per instance: syntax in and out, bytes, DIMSE status, and why it failed."""
    rows = {i.index: {"index": i.index, "sop_instance_uid": i.sop_instance_uid, "source_syntax": i.transfer_syntax,
                      "target_syntax": i.transfer_syntax, "bytes": i.size, "ok": manifest.kind == "export",
                      "dimse_status": None, "reason": ""}
            for i in manifest.instances}
    for batch in spool.outcomes("transcode"):
        for outcome in batch:
            row = rows[outcome["index"]]
            row.update(target_syntax=outcome["transfer_syntax"] or row["target_syntax"], reason=outcome["reason"],
                       ok=outcome["ok"] if manifest.kind == "export" else row["ok"],
                       bytes=outcome["bytes_out"] or row["bytes"])
            if outcome["sop_instance_uid"]:
                row["sop_instance_uid"] = outcome["sop_instance_uid"]
    for batch in spool.outcomes("store"):
        for stored in batch:
            rows[stored["index"]].update(ok=stored["ok"], dimse_status=stored["status"], reason=stored["reason"],
                                         target_syntax=stored["sent_syntax"] or rows[stored["index"]]["target_syntax"])
    if manifest.kind == "export":
        _mark_unwritten(spool, manifest, rows)
    return list(rows.values())


def _mark_unwritten(spool: JobSpool, manifest: Manifest, rows: dict[int, dict[str, Any]]) -> None:
    plan_path = spool.path / "media" / "plan.json"
    if not plan_path.exists():
        return
    planned = {index for volume in read_json(plan_path)["volumes"] for index in volume}
    for index, row in rows.items():
        if index not in planned and row["ok"]:
            row.update(ok=False, reason=row["reason"] or "not written to any volume")


def record_audit(ledger: Ledger, manifest: Manifest, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """PS3.15 audit messages for the job; also to syslog when DISCFLOW_AUDIT_SYSLOG is set."""
    settings = get_settings()
    for event_code, message in audit_messages(manifest, summary, rows):
        ledger.record_audit(manifest.job_id, event_code, audit.outcome_code(summary["status"]), message)
        if settings.audit_syslog:
            try:
                audit.send_syslog(message, settings.audit_syslog)
            except OSError as error:
                logger.warning("audit: syslog %s unreachable: %s", settings.audit_syslog, error)


def audit_messages(manifest: Manifest, summary: dict[str, Any], rows: list[dict[str, Any]]
                   ) -> list[tuple[str, str]]:
    settings = get_settings()
    studies = audit_studies(manifest, rows)
    outcome = audit.outcome_code(summary["status"])
    common = dict(outcome=outcome, user=settings.ae_title, source_id=settings.audit_source_id or socket.gethostname())
    if manifest.kind == "export":
        media = manifest.options.get("media") or "cd"
        destination = ", ".join(v["path"] for v in summary.get("volumes", [])) or "(none)"
        return [("110106", audit.export_message(studies, media=media, destination=destination, **common))]
    node = manifest.options.get("node", "")
    ae, _, host = node.partition("@")
    label = str(manifest.options.get("medium", ""))
    media = manifest.options.get("media_type") or _medium_kind(Path(label))
    by_patient: dict[str, list[audit.AuditStudy]] = {}
    for study in studies:  # DICOM Instances Transferred names one patient per message
        by_patient.setdefault(study.patient_id, []).append(study)
    return [("110107", audit.import_message(studies, media=media, source_media_label=label, **common))] + [
        ("110104", audit.instances_transferred_message(group, action="R", source_ae=settings.ae_title,
                                                       destination_ae=ae, destination_host=host, **common))
        for group in by_patient.values()]


def _medium_kind(medium: Path) -> str:
    """An ISO is a CD or DVD image by its size; a folder or ZIP most often came on a USB stick."""
    if medium.suffix.lower() != ".iso":
        return "usb"
    try:
        return "dvd" if medium.stat().st_size > 700 * 1000 * 1000 else "cd"
    except OSError:
        return "cd"


def audit_studies(manifest: Manifest, rows: list[dict[str, Any]]) -> list[audit.AuditStudy]:
    # The instances that made it; when none did, the ones attempted (a failure is audited too).
    ok = {row["index"] for row in rows if row["ok"]} or {row["index"] for row in rows}
    studies: dict[int, Any] = {}
    for instance in manifest.instances:
        if instance.index not in ok:
            continue
        study = studies.get(instance.study)
        if study is None:
            patient = manifest.patients[manifest.studies[instance.study].parent].attributes
            study = studies[instance.study] = audit.AuditStudy(
                manifest.studies[instance.study].key, {}, _value(patient, "00100020"), _value(patient, "00100010"))
        study.sop_classes[instance.sop_class_uid] = study.sop_classes.get(instance.sop_class_uid, 0) + 1
    return list(studies.values())


def _value(attributes: dict[str, Any], tag: str) -> str:
    values = attributes.get(tag, {}).get("Value") or [""]
    first = values[0]
    return str(first.get("Alphabetic", "")) if isinstance(first, dict) else str(first)

"""Export from a DICOM node: C-FIND what the request names, C-GET it into the job's spool."""
from __future__ import annotations

from typing import Any

from tasks.dimse import Node, find_instances, retrieve_series
from tasks.spool import JobSpool
from workers.settings import get_settings


class RetrieveError(Exception):
    pass


def retrieve_to_spool(source: dict[str, Any], spool: JobSpool) -> int:
    """Retrieve every series matching the request into ``spool.source_dir``; return instances received."""
    settings = get_settings()
    node = Node.parse(source["node"])
    series = find_instances(node, patient_id=source.get("patient_id"), study_uids=source.get("study_uids") or (),
                            accession_number=source.get("accession_number"), calling_ae=settings.ae_title,
                            timeout=settings.network_timeout_seconds)
    if not series:
        raise RetrieveError(f"{node.ae_title}@{node.host}:{node.port} has no study matching the request")
    result = retrieve_series(node, series, spool.source_dir, associations=settings.retrieve_associations,
                             calling_ae=settings.ae_title, timeout=settings.network_timeout_seconds)
    if result.failures and not result.instances:
        reasons = "; ".join(str(f) for f in result.failures[:3])
        raise RetrieveError(f"retrieve from {node.ae_title} failed: {reasons}")
    return result.instances

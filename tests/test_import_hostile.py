"""A hostile-disc corpus through the whole import: every refusal is named, every valid file arrives."""
from __future__ import annotations

import time

import pytest

import hostile_media
from orchestration.jobs import submit_import, wait
from peers import orthanc, orthanc_factory  # noqa: F401 — fixtures
from tasks.spool import JobSpool, read_json
from workers.settings import get_settings

pytestmark = pytest.mark.slow


def test_hostile_corpus_imports_what_is_valid(system_cluster, orthanc, tmp_path):
    seen_before: set[str] = set()
    for build in hostile_media.CASES:
        (tmp_path / build.__name__).mkdir()
        case = build(tmp_path / build.__name__)
        job_id = submit_import({"medium": str(case.location), "node": str(orthanc.node), "send": "negotiate",
                                "rules": None, "studies": []})
        started = time.monotonic()
        wait(job_id, timeout=300)
        summary = read_json(JobSpool(get_settings().spool_dir, job_id).summary_path)
        stored = orthanc.instance_uids()
        assert case.valid <= stored, f"{case.name}: valid instances missing from the PACS"
        assert not (case.not_imported & (stored - seen_before)), f"{case.name}: refused content reached the PACS"
        reasons = {failure["file"]: failure["reason"] for failure in summary["failures"]}
        for file, fragment in case.refused.items():
            named = [reason for path, reason in reasons.items() if file in path or path in file]
            assert any(fragment in reason for reason in named), f"{case.name}: {file} not refused with {fragment!r}"
        assert summary["instances"]["failed"] == len(summary["failures"])
        assert summary["status"] in ("succeeded", "partial")
        assert time.monotonic() - started < 120
        seen_before = stored

"""A PACS that refuses some instances, refuses them for a while, or goes down in the middle of an
import: discflow retries what may pass, says exactly what is missing, and a resume stores only that.

The PACS is :class:`refusing_scp.RefusingStorageSCP`, a real pynetdicom Storage SCP on loopback;
the disc is an ISO made by discflow's own export; the import runs through real Redis and real
worker processes. (A PACS down from the start is covered in test_jobs_e2e.py.)

The first tests call :func:`tasks.dimse.store_files` directly (no Celery): which statuses are
retried, how often, and what the outcome says.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest

from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import resume, submit, wait
from orchestration.ledger import Ledger
from refusing_scp import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH, OUT_OF_RESOURCES, RefusingStorageSCP
from tasks import dimse
from tasks.manifest import Manifest
from tasks.spool import JobSpool, read_json
from workers.settings import get_settings, reload_settings

slow = pytest.mark.slow

IMAGES = 30
BATCH_SIZE = 6
DOWN_AFTER = 11
"""The PACS stores this many instances of the import, then goes down (mid-batch)."""
STORE_RETRIES = 2
"""Attempts per instance = STORE_RETRIES + 1; the workers' backoff waits 0.5 s, then 1 s."""


# --------------------------------------------------------------------------------------
# Fixtures


class Study(NamedTuple):
    folder: Path
    files: list[Path]
    uids: list[str]
    """SOP Instance UIDs, in the order of ``files``."""


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """FAULT^TEST's CT study (two series)."""
    folder = tmp_path_factory.mktemp("fault-study")
    files = build_study(folder, StudySpec(images=IMAGES, patient_name="FAULT^TEST", patient_id="FLT-1"))
    return Study(folder, files, [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                                 for path in files])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``system_cluster`` for the whole module: a database of the machine's Redis that no other
    session uses, its own spool and ledger, and two worker processes started with fewer store
    retries than the default (workers inherit the environment). One cluster for the three
    imports saves two worker start-ups and shutdowns (~10 s each on a busy 2-core machine)."""
    from conftest import _cluster, claimed_system_redis
    folder = tmp_path_factory.mktemp("pacs-faults")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DISCFLOW_SPOOL_DIR", str(folder / "spool"))
            patch.setenv("DISCFLOW_STORE_RETRIES", str(STORE_RETRIES))
            patch.setenv("DISCFLOW_NETWORK_TIMEOUT_SECONDS", "10")
            reload_settings()
            with claimed_system_redis() as url:
                yield from _cluster(url, count=2, concurrency=1, log_dir=folder)
    finally:
        reload_settings()


@pytest.fixture(scope="module")
def disc(cluster: str, study: Study, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study exported by discflow's own export job (``keep``): one ISO volume."""
    out = tmp_path_factory.mktemp("fault-disc")
    job_id = submit("export", {"source": {"folder": str(study.folder)}, "syntax": "keep", "out_dir": str(out)})
    result = wait(job_id, timeout=180)
    assert result["status"] == "succeeded", result
    return out / "VOL001.ISO"


@pytest.fixture
def pacs(tmp_path: Path):
    with RefusingStorageSCP(tmp_path / "pacs") as scp:
        yield scp


def _import(disc: Path, pacs: RefusingStorageSCP) -> str:
    return submit("import", {"medium": str(disc), "node": str(pacs.node), "send": "keep", "studies": [],
                             "rules": None, "batch_size": BATCH_SIZE})


def _spool(job_id: str) -> JobSpool:
    return JobSpool(get_settings().spool_dir, job_id)


def _cli_status(job_id: str) -> dict:
    """``discflow status JOB --json``, run in this process (a new interpreter costs seconds)."""
    from typer.testing import CliRunner

    from orchestration.cli import cli
    result = CliRunner().invoke(cli, ["status", job_id, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _disc_files(job_id: str) -> dict[str, str]:
    """SOP Instance UID -> the file on the disc it came from (as the job's manifest names it)."""
    manifest = Manifest.from_json(read_json(_spool(job_id).manifest_path))
    return {instance.sop_instance_uid: instance.source for instance in manifest.instances}


def _resume_and_count(pacs: RefusingStorageSCP, job_id: str) -> Counter[str]:
    """Resume the job, wait for it; return the C-STOREs the PACS received during the resume."""
    before = pacs.snapshot()
    run_id = resume(job_id)
    wait(job_id, timeout=180, task_id=run_id)
    return pacs.snapshot() - before


def _names_the_pacs_gone(reason: str, pacs: RefusingStorageSCP) -> bool:
    """A connection refused, or (caught as the port closed) an association request reset."""
    return (f"cannot connect to {pacs.node}" in reason or f"{pacs.node} aborted the association" in reason
            or f"{pacs.node} broke off the association request" in reason
            or "the association was aborted or timed out while sending" in reason)


def _assert_complete(job_id: str, pacs: RefusingStorageSCP, uids: list[str], runs: int) -> None:
    ledger = Ledger()
    job = ledger.job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed, job.runs) == ("succeeded", IMAGES, 0, runs)
    outcomes = ledger.outcomes(job_id)
    assert all(o.ok and o.dimse_status == 0 and o.reason == "" for o in outcomes), \
        [(o.sop_instance_uid, o.dimse_status, o.reason) for o in outcomes if not o.ok]
    assert {o.sop_instance_uid for o in outcomes} == set(uids) == pacs.received_uids()
    assert pacs.stored == Counter(uids)  # every instance stored exactly once, over every run


# --------------------------------------------------------------------------------------
# store_files against the refusing PACS (no Celery): what is retried and what is reported


def test_out_of_resources_is_retried_with_backoff_other_failures_are_not(study, pacs):
    files, uids = study.files[:8], study.uids[:8]
    pacs.refuse(uids[0:2], OUT_OF_RESOURCES, times=1)  # transient, passes the second time
    pacs.refuse(uids[2:3], OUT_OF_RESOURCES)  # never passes
    pacs.refuse(uids[3:4], CANNOT_UNDERSTAND)
    pacs.refuse(uids[4:5], DATA_SET_DOES_NOT_MATCH)
    outcomes = dimse.store_files(pacs.node, files, mode="keep", associations=2, retries=2, backoff=0.05,
                                 timeout=5)
    assert [o.ok for o in outcomes] == [True, True, False, False, False, True, True, True]
    assert [o.status for o in outcomes] == [0, 0, 0xA700, 0xC000, 0xA900, 0, 0, 0]
    assert outcomes[2].reason == "status 0xA700 (failure) (gave up after 3 attempts)"
    assert outcomes[3].reason.startswith("status 0xC000") and "gave up" not in outcomes[3].reason
    assert outcomes[4].reason.startswith("status 0xA900") and "gave up" not in outcomes[4].reason
    assert [pacs.attempts[uid] for uid in uids] == [2, 2, 3, 1, 1, 1, 1, 1]  # permanent refusals: never resent
    assert pacs.received_uids() == {uids[0], uids[1], *uids[5:]}


def test_a_pacs_that_goes_down_mid_association_loses_nothing_it_answered(study, pacs):
    files, uids = study.files, study.uids
    pacs.go_down_after(5)
    outcomes = dimse.store_files(pacs.node, files[:12], mode="keep", associations=3, retries=1, backoff=0.05,
                                 timeout=5)
    assert pacs.went_down.is_set()
    stored = {o.sop_instance_uid for o in outcomes if o.ok}
    assert len(stored) == 5 and stored == pacs.received_uids()  # ok <=> on the PACS, for every instance
    for outcome in outcomes:
        if not outcome.ok:
            assert outcome.status is None and _names_the_pacs_gone(outcome.reason, pacs), outcome.reason
            assert outcome.reason.endswith("(gave up after 2 attempts)")


# --------------------------------------------------------------------------------------
# Whole imports through Redis and the workers


@slow
def test_pacs_refusing_some_instances_then_resume_sends_only_those(cluster, disc, pacs, study):
    uids = study.uids
    permanent = {uids[3], uids[14], uids[22]}  # in three different batches
    exhausted = {uids[9], uids[28]}  # Out of Resources on every attempt of this run
    pacs.refuse(permanent, CANNOT_UNDERSTAND).refuse(exhausted, OUT_OF_RESOURCES)
    job_id = _import(disc, pacs)
    wait(job_id, timeout=180)

    ledger = Ledger()
    job = ledger.job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed, job.resumable) == ("partial", IMAGES - 5, 5, True)
    failed = {o.sop_instance_uid: o for o in ledger.outcomes(job_id) if not o.ok}
    assert set(failed) == permanent | exhausted
    for uid in permanent:
        assert failed[uid].dimse_status == CANNOT_UNDERSTAND and "0xC000" in failed[uid].reason
        assert pacs.attempts[uid] == 1  # a permanent refusal is not sent again
    for uid in exhausted:
        assert failed[uid].dimse_status == OUT_OF_RESOURCES and "0xA700" in failed[uid].reason
        assert f"gave up after {STORE_RETRIES + 1} attempts" in failed[uid].reason
        assert pacs.attempts[uid] == STORE_RETRIES + 1
    assert pacs.received_uids() == set(uids) - permanent - exhausted

    summary = _cli_status(job_id)
    assert (summary["status"], summary["resumable"]) == ("partial", True)
    assert summary["instances"]["stored"] == IMAGES - 5 and summary["instances"]["failed"] == 5
    on_disc = _disc_files(job_id)
    reported = {failure["file"]: failure["reason"] for failure in summary["failures"]}
    assert reported == {on_disc[uid]: failed[uid].reason for uid in failed}
    assert "FAULT^TEST" not in json.dumps(summary) and "FLT-1" not in json.dumps(summary)

    pacs.stop_refusing()
    sent_again = _resume_and_count(pacs, job_id)
    assert sent_again == Counter(permanent | exhausted)  # nothing already stored was sent again
    _assert_complete(job_id, pacs, uids, runs=2)


@slow
def test_transient_refusals_pass_on_retry_without_a_resume(cluster, disc, pacs, study):
    uids = study.uids
    transient = {uids[0], uids[8], uids[19], uids[29]}
    pacs.refuse(transient, OUT_OF_RESOURCES, times=1)
    job_id = _import(disc, pacs)
    result = wait(job_id, timeout=180)
    assert result["status"] == "succeeded", result
    _assert_complete(job_id, pacs, uids, runs=1)
    assert pacs.attempts == Counter(uids) + Counter(transient)  # each refused once, then stored
    assert pacs.refused == Counter(transient)


@slow
def test_pacs_down_in_the_middle_then_resume_sends_only_what_is_missing(cluster, disc, pacs, study):
    uids = study.uids
    pacs.go_down_after(DOWN_AFTER)
    job_id = _import(disc, pacs)
    wait(job_id, timeout=180)
    assert pacs.went_down.is_set()

    ledger = Ledger()
    job = ledger.job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed, job.resumable) == \
        ("partial", DOWN_AFTER, IMAGES - DOWN_AFTER, True)
    outcomes = ledger.outcomes(job_id)
    stored = {o.sop_instance_uid for o in outcomes if o.ok}
    assert stored == pacs.received_uids() and len(stored) == DOWN_AFTER  # the ledger knows exactly what is missing
    for outcome in (o for o in outcomes if not o.ok):
        assert outcome.dimse_status is None
        assert _names_the_pacs_gone(outcome.reason, pacs), outcome.reason
        assert outcome.reason.endswith(f"(gave up after {STORE_RETRIES + 1} attempts)")
    summary = read_json(_spool(job_id).summary_path)
    on_disc = _disc_files(job_id)
    assert sorted(f["file"] for f in summary["failures"]) == sorted(on_disc[o.sop_instance_uid]
                                                                     for o in outcomes if not o.ok)

    pacs.start()  # back, on the same port
    missing = set(uids) - stored
    sent_again = _resume_and_count(pacs, job_id)
    assert sent_again == Counter(missing)
    _assert_complete(job_id, pacs, uids, runs=2)

"""Faults while a job runs: a worker's child process, or a whole worker, SIGKILLed in the middle of
the transcode stage of a 500-instance export or the store stage of a 500-instance import loses no instance."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pydicom
import pytest

from peers import orthanc, orthanc_factory  # noqa: F401 — fixtures
from disc_checks import directory_leaves, xorriso_extract
from orchestration.jobs import submit, wait
from orchestration.ledger import Ledger
from workers import progress
from workers.app import app

pytestmark = pytest.mark.slow


def celery_children() -> list[int]:
    """Prefork children of this test's celery workers (a child's parent is a celery main process)."""
    commands = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                commands[int(entry.name)] = ((entry / "cmdline").read_bytes(),
                                             int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]))
            except (OSError, IndexError, ValueError):
                continue
    mains = {pid for pid, (cmd, parent) in commands.items() if b"celery" in cmd and parent == os.getpid()}
    return [pid for pid, (cmd, parent) in commands.items() if parent in mains]


def kill_worker_children() -> None:
    children = celery_children()
    assert children, "no worker child found to kill"
    for pid in children:  # each child is in the middle of a batch
        os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_child_loses_no_instance_of_an_import(system_cluster, large_study, orthanc, tmp_path):
    exported = submit("export", {"source": {"folder": str(large_study)}, "syntax": "keep",
                                 "out_dir": str(tmp_path / "disc")})
    wait(exported, timeout=300)
    job_id = submit("import", {"medium": str(tmp_path / "disc" / "VOL001.ISO"), "node": str(orthanc.node),
                               "send": "keep", "studies": [], "rules": None, "batch_size": 20})
    wait_for_progress(job_id, "store", 60)
    kill_worker_children()
    wait(job_id, timeout=600)
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", FAULT_IMAGES, 0)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in large_study.glob("*.dcm")}
    assert orthanc.instance_uids() == expected


def test_a_killed_worker_child_loses_no_instance(system_cluster, large_study, tmp_path):
    out = tmp_path / "out"
    job_id = submit("export", {"source": {"folder": str(large_study)}, "syntax": "jpeg-lossless",
                               "out_dir": str(out), "batch_size": 20})
    wait_for_progress(job_id, "transcode", 100)
    kill_worker_children()
    wait(job_id, timeout=600)
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", FAULT_IMAGES, 0)
    root = xorriso_extract(out / "VOL001.ISO", tmp_path / "extracted")
    uids = [str(pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID), stop_before_pixels=True).SOPInstanceUID)
            for leaf in directory_leaves(root / "DICOMDIR")]
    assert len(uids) == len(set(uids)) == FAULT_IMAGES  # every instance exactly once

FAULT_IMAGES = 500


@pytest.fixture(scope="module")
def large_study(tmp_path_factory) -> Path:
    from orchestration.corpus import StudySpec, build_study
    folder = tmp_path_factory.mktemp("study-500")
    build_study(folder, StudySpec(images=FAULT_IMAGES, patient_name="FAULT^KILL", patient_id="KILL-500"))
    return folder


@pytest.fixture
def quick_redelivery(monkeypatch):
    """Workers hand a vanished worker's tasks to another after 15 s instead of 10 minutes."""
    monkeypatch.setenv("DISCFLOW_VISIBILITY_TIMEOUT_SECONDS", "15")


def kill_one_whole_worker() -> int:
    """SIGKILL one worker's main process and its children, as a host that loses power."""
    children = celery_children()
    mains = sorted({int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    for pid in children})
    assert mains, "no worker to kill"
    victim = mains[0]
    for pid in [victim, *[c for c in children if _parent(c) == victim]]:
        os.kill(pid, signal.SIGKILL)
    return victim


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def wait_for_progress(job_id: str, stage: str, done: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while progress.read(app.conf.broker_url, job_id).get(f"{stage}:done", 0) < done:
        assert time.monotonic() < deadline, f"{stage} did not reach {done}"
        time.sleep(0.05)


def test_a_killed_whole_worker_loses_no_instance_of_an_export(quick_redelivery, system_cluster, large_study,
                                                             tmp_path):
    out = tmp_path / "out"
    job_id = submit("export", {"source": {"folder": str(large_study)}, "syntax": "jpeg-lossless",
                               "out_dir": str(out), "batch_size": 20})
    wait_for_progress(job_id, "transcode", 100)
    kill_one_whole_worker()
    wait(job_id, timeout=600)
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", FAULT_IMAGES, 0)
    assert sum(1 for o in Ledger().outcomes(job_id) if o.ok) == FAULT_IMAGES
    root = xorriso_extract(out / "VOL001.ISO", tmp_path / "extracted")
    uids = [str(pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID), stop_before_pixels=True).SOPInstanceUID)
            for leaf in directory_leaves(root / "DICOMDIR")]
    assert len(uids) == len(set(uids)) == FAULT_IMAGES


def test_a_killed_whole_worker_loses_no_instance_of_an_import(quick_redelivery, system_cluster, large_study,
                                                             orthanc, tmp_path):
    exported = submit("export", {"source": {"folder": str(large_study)}, "syntax": "keep",
                                 "out_dir": str(tmp_path / "disc")})
    wait(exported, timeout=300)
    job_id = submit("import", {"medium": str(tmp_path / "disc" / "VOL001.ISO"), "node": str(orthanc.node),
                               "send": "keep", "studies": [], "rules": None, "batch_size": 20})
    wait_for_progress(job_id, "store", 60)
    kill_one_whole_worker()
    wait(job_id, timeout=600)
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", FAULT_IMAGES, 0)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in large_study.glob("*.dcm")}
    assert orthanc.instance_uids() == expected
    assert {o.sop_instance_uid for o in Ledger().outcomes(job_id) if o.ok} == expected

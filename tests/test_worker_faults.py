"""Faults while a job runs: a worker's child process, or a whole worker, SIGKILLed in the middle of
the transcode stage of a 500-instance export or the store stage of a 500-instance import loses no instance."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
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


FAULT_IMAGES = 500


def _parent(pid: int) -> int:
    """The parent process id of ``pid`` (-1 once it is gone)."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def celery_children() -> list[int]:
    """Prefork children of this test's celery workers (a child's parent is a celery main process)."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    parents = {pid: _parent(pid) for pid in pids}
    mains = {pid for pid in pids if parents[pid] == os.getpid() and b"celery" in _cmdline(pid)}
    return [pid for pid in pids if parents[pid] in mains]


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def kill_worker_children() -> None:
    """SIGKILL every prefork child: each is in the middle of a batch."""
    children = celery_children()
    assert children, "no worker child found to kill"
    for pid in children:
        os.kill(pid, signal.SIGKILL)


def kill_one_whole_worker() -> None:
    """SIGKILL one worker's main process and its children, as a host that loses power."""
    children = celery_children()
    mains = sorted({_parent(pid) for pid in children})
    assert mains, "no worker to kill"
    victim = mains[0]
    for pid in [victim, *[c for c in children if _parent(c) == victim]]:
        os.kill(pid, signal.SIGKILL)


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


def wait_for_progress(job_id: str, stage: str, done: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while progress.read(app.conf.broker_url, job_id).get(f"{stage}:done", 0) < done:
        assert time.monotonic() < deadline, f"{stage} did not reach {done}"
        time.sleep(0.05)


def export_survives(kill: Callable[[], None], study: Path, tmp_path: Path) -> None:
    """Kill workers mid-transcode of an export; the ISO then holds every instance exactly once."""
    out = tmp_path / "out"
    job_id = submit("export", {"source": {"folder": str(study)}, "syntax": "jpeg-lossless",
                               "out_dir": str(out), "batch_size": 20})
    wait_for_progress(job_id, "transcode", 100)
    kill()
    wait(job_id, timeout=600)
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", FAULT_IMAGES, 0)
    assert sum(1 for o in Ledger().outcomes(job_id) if o.ok) == FAULT_IMAGES
    root = xorriso_extract(out / "VOL001.ISO", tmp_path / "extracted")
    uids = [str(pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID), stop_before_pixels=True).SOPInstanceUID)
            for leaf in directory_leaves(root / "DICOMDIR")]
    assert len(uids) == len(set(uids)) == FAULT_IMAGES


def import_survives(kill: Callable[[], None], study: Path, pacs, tmp_path: Path) -> None:
    """Kill workers mid-store of an import; the PACS and the ledger then hold every instance."""
    exported = submit("export", {"source": {"folder": str(study)}, "syntax": "keep",
                                 "out_dir": str(tmp_path / "disc")})
    wait(exported, timeout=300)
    job_id = submit("import", {"medium": str(tmp_path / "disc" / "VOL001.ISO"), "node": str(pacs.node),
                               "send": "keep", "studies": [], "rules": None, "batch_size": 20})
    wait_for_progress(job_id, "store", 60)
    kill()
    wait(job_id, timeout=600)
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", FAULT_IMAGES, 0)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.glob("*.dcm")}
    assert pacs.instance_uids() == expected
    assert {o.sop_instance_uid for o in Ledger().outcomes(job_id) if o.ok} == expected


def test_a_killed_worker_child_loses_no_instance(system_cluster, large_study, tmp_path):
    export_survives(kill_worker_children, large_study, tmp_path)


def test_a_killed_worker_child_loses_no_instance_of_an_import(system_cluster, large_study, orthanc, tmp_path):
    import_survives(kill_worker_children, large_study, orthanc, tmp_path)


def test_a_killed_whole_worker_loses_no_instance_of_an_export(quick_redelivery, system_cluster, large_study,
                                                             tmp_path):
    export_survives(kill_one_whole_worker, large_study, tmp_path)


def test_a_killed_whole_worker_loses_no_instance_of_an_import(quick_redelivery, system_cluster, large_study,
                                                             orthanc, tmp_path):
    import_survives(kill_one_whole_worker, large_study, orthanc, tmp_path)

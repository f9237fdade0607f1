"""Spool and output on a nearly full disk: a clear error, no half-written ISO, the job resumable."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CT_IMAGES
from orchestration.jobs import JobFailed, resume, submit, wait
from orchestration.ledger import Ledger
from workers.settings import reload_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs: the 210-image study (~110 MB as it is) does not fit on it."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def spool_on_small_disk(small_disk: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.setenv("DISCFLOW_SPOOL_DIR", str(small_disk / "spool"))
    monkeypatch.setenv("DISCFLOW_DATA_DIR", str(tmp_path / "ledger"))  # the ledger stays writable
    reload_settings()
    yield small_disk
    monkeypatch.undo()
    reload_settings()


@pytest.fixture
def cluster_on_small_disk(spool_on_small_disk: Path, spool, system_cluster) -> Iterator[Path]:
    yield spool_on_small_disk


@pytest.fixture
def spool(spool_on_small_disk: Path) -> Path:  # overrides conftest's: the workers inherit the small disk
    return spool_on_small_disk / "spool"


def test_a_full_disk_fails_clearly_and_resume_finishes_after_space_is_freed(cluster_on_small_disk, ct_study,
                                                                            tmp_path):
    disk = cluster_on_small_disk
    out = disk / "out"
    job_id = submit("export", {"source": {"folder": str(ct_study)}, "syntax": "uncompressed", "out_dir": str(out),
                               "batch_size": 20})
    with pytest.raises(JobFailed) as failure:
        wait(job_id, timeout=300)
    assert "No space left on device" in str(failure.value)
    job = Ledger().job(job_id)
    assert job.state == "failed" and job.resumable and "No space left on device" in job.error
    assert not (out / "VOL001.ISO").exists()
    assert not [p for p in disk.rglob("*.part")], "a half-written file was left behind"

    subprocess.run(["mount", "-o", "remount,size=600m", str(disk)], check=True)
    wait(job_id, timeout=300, task_id=resume(job_id))
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok) == ("succeeded", CT_IMAGES)
    assert (out / "VOL001.ISO").stat().st_size > 100_000_000
    assert os.path.exists(f"{out}/VOL001.ISO.SHA256")

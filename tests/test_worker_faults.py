"""Faults while a job runs: a worker's child process SIGKILLed mid-transcode loses no instance."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pydicom
import pytest

from conftest import CT_IMAGES
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


def test_a_killed_worker_child_loses_no_instance(system_cluster, ct_study, tmp_path):
    out = tmp_path / "out"
    job_id = submit("export", {"source": {"folder": str(ct_study)}, "syntax": "j2k-lossless", "out_dir": str(out),
                               "batch_size": 10})
    deadline = time.monotonic() + 120
    while progress.read(app.conf.broker_url, job_id).get("transcode:done", 0) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    children = celery_children()
    assert children, "no worker child found to kill"
    for pid in children:  # each child is in the middle of a transcode batch
        os.kill(pid, signal.SIGKILL)
    wait(job_id, timeout=600)
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", CT_IMAGES, 0)
    root = xorriso_extract(out / "VOL001.ISO", tmp_path / "extracted")
    leaves = directory_leaves(root / "DICOMDIR")
    uids = [str(pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID), stop_before_pixels=True).SOPInstanceUID)
            for leaf in leaves]
    assert len(uids) == len(set(uids)) == CT_IMAGES  # every instance exactly once
    assert len(list(root.joinpath("DICOM").rglob("*"))) >= CT_IMAGES

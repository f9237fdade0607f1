"""Redis restarted in the middle of a job: the job completes (or ends resumable and resume completes it)."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import redis

from conftest import CT_IMAGES
from disc_checks import directory_leaves, xorriso_extract
from orchestration.jobs import JobFailed, resume, submit, wait
from orchestration.ledger import Ledger
from peers import free_port
from workers import progress
from workers.app import app, use_broker
from workers.embedded import LocalWorkers, redis_server_binary

pytestmark = pytest.mark.slow


class DurableRedis:
    """A private redis-server that keeps an append-only file, as a production broker should."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "DurableRedis":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
                                         "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


@pytest.fixture
def durable_cluster(spool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DurableRedis]:
    monkeypatch.setenv("DISCFLOW_VISIBILITY_TIMEOUT_SECONDS", "15")
    server = DurableRedis(tmp_path / "redis").start()
    use_broker(server.url)
    workers = LocalWorkers(server.url, concurrency=1, count=2, log_dir=tmp_path).start()
    try:
        yield server
    finally:
        workers.stop()
        server.stop()


def test_a_job_survives_a_redis_restart(durable_cluster: DurableRedis, ct_study: Path, tmp_path: Path):
    out = tmp_path / "out"
    job_id = submit("export", {"source": {"folder": str(ct_study)}, "syntax": "jpeg-lossless",
                               "out_dir": str(out), "batch_size": 10})
    deadline = time.monotonic() + 120
    while progress.read(app.conf.broker_url, job_id).get("transcode:done", 0) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    durable_cluster.stop()
    time.sleep(2)
    durable_cluster.start()
    try:
        wait(job_id, timeout=240)
    except JobFailed:  # the other allowed outcome: failed, resumable, and resume completes it
        assert Ledger().job(job_id).resumable
        wait(job_id, timeout=240, task_id=resume(job_id))
    job = Ledger().job(job_id)
    assert (job.state, job.instances_ok) == ("succeeded", CT_IMAGES)
    root = xorriso_extract(out / "VOL001.ISO", tmp_path / "extracted")
    uids = [str(pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID), stop_before_pixels=True).SOPInstanceUID)
            for leaf in directory_leaves(root / "DICOMDIR")]
    assert len(uids) == len(set(uids)) == CT_IMAGES

"""Load: 20 concurrent jobs (10 exports, 10 imports, 200 instances each) on two workers; nothing lost,
memory bounded. Prints peak RSS per worker process and Redis memory for the README's guarantees."""
from __future__ import annotations

import collections
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import redis

from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import submit, wait
from orchestration.ledger import Ledger
from peers import free_port
from test_worker_faults import celery_children, _parent

pytestmark = pytest.mark.slow
IMAGES = 200


def peak_rss_mb(pid: int) -> float:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_twenty_concurrent_jobs_lose_nothing(system_cluster, tmp_path):
    require = pytest.importorskip("shutil").which("storescp")
    if not require:
        pytest.skip("storescp not installed")
    study = tmp_path / "study"
    build_study(study, StudySpec(images=IMAGES, patient_name="LOAD^TEST", patient_id="LOAD-1"))
    disc = submit("export", {"source": {"folder": str(study)}, "syntax": "keep", "out_dir": str(tmp_path / "disc")})
    wait(disc, timeout=300)
    received = tmp_path / "pacs"
    received.mkdir()
    port = free_port()
    pacs = subprocess.Popen(["storescp", "--fork", "+uf", "--accept-all", "--bit-preserving", "-od", str(received),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        jobs = []
        for n in range(10):
            jobs.append(submit("export", {"source": {"folder": str(study)}, "syntax": "keep",
                                          "out_dir": str(tmp_path / f"out{n}")}))
            jobs.append(submit("import", {"medium": str(tmp_path / "disc" / "VOL001.ISO"),
                                          "node": f"PACS@127.0.0.1:{port}", "send": "keep", "studies": [],
                                          "rules": None}))
        for job_id in jobs:
            wait(job_id, timeout=900)
        seconds = time.monotonic() - started
    finally:
        pacs.terminate()
        pacs.wait(10)

    ledger = Ledger()
    states = collections.Counter(ledger.job(job_id).state for job_id in jobs)
    assert states == {"succeeded": 20}
    assert all(ledger.job(job_id).instances_ok == IMAGES for job_id in jobs)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.glob("*.dcm")}
    copies = collections.Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                 for p in received.iterdir())
    assert set(copies) == expected and set(copies.values()) == {10}  # every instance, once per import job
    for n in range(10):
        assert (tmp_path / f"out{n}" / "VOL001.ISO").stat().st_size > IMAGES * 500_000

    client = redis.Redis.from_url(system_cluster)
    memory_mb = client.info("memory")["used_memory"] / 1e6
    lasting = [key for key in client.scan_iter() if client.ttl(key) == -1 and client.type(key) != b"none"]
    children = celery_children()
    rss = {pid: round(peak_rss_mb(pid), 1) for pid in {*children, *map(_parent, children)} if pid > 0}
    print(f"\n20 jobs x {IMAGES} instances in {seconds:.1f} s; Redis used_memory {memory_mb:.1f} MB; "
          f"peak RSS per worker process (MB): {sorted(rss.values())}; keys without expiry: "
          f"{sorted(k.decode() for k in lasting)}")
    assert max(rss.values()) < 1024
    assert all(k.startswith((b"_kombu", b"unacked", b"discflow:test-claim")) or k in (b"scan", b"transcode",
               b"media", b"store") for k in lasting), lasting

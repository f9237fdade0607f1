"""Jobs at department scale on real Redis and real workers: ledger written by the workers, detach,
status and report, cancel and resume, batch files, priorities."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from conftest import _cluster
from disc_checks import directory_leaves, xorriso_extract
from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import JobCancelledError, cancel, resume, submit, wait
from orchestration.ledger import Ledger
from workers import progress
from workers.app import app

pytestmark = pytest.mark.slow


def discflow(*args: str, broker: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISCFLOW_BROKER_URL": broker}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small-study")
    build_study(folder, StudySpec(images=6, patient_name="JOBS^SECRET", patient_id="JOB-777"))
    return folder


def test_detached_export_is_followed_by_status_and_report(system_cluster, small_study, tmp_path):
    submitted = discflow("export", "--source", str(small_study), "--out", str(tmp_path / "out"), "--detach",
                         "--json", broker=system_cluster)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    wait(job_id, timeout=120)
    status = json.loads(discflow("status", job_id, "--json", broker=system_cluster).stdout)
    assert status["status"] == "succeeded" and status["instances"]["written"] == 6
    report = discflow("report", job_id, "--json", "--html", str(tmp_path / "report.html"), broker=system_cluster)
    stages = json.loads(report.stdout)["stages"]
    assert set(stages) == {"scan", "transcode", "media"}
    for stage in ("scan", "media"):
        assert stages[stage]["tasks"] >= 1 and stages[stage]["queue_wait_seconds"] >= 0
        assert stages[stage]["seconds"] > 0 and stages[stage]["task_seconds"] > 0
    assert stages["media"]["instances"] == 6 and stages["media"]["mb_per_second"] > 0
    assert "<table>" in (tmp_path / "report.html").read_text()
    listing = json.loads(discflow("status", "--json", broker=system_cluster).stdout)
    assert [row["job_id"] for row in listing] == [job_id]
    for text in (submitted.stdout, status, report.stdout, listing):
        assert "JOBS^SECRET" not in str(text) and "JOB-777" not in str(text)
    ledger = Ledger()
    assert len(ledger.outcomes(job_id)) == 6 and all(o.ok for o in ledger.outcomes(job_id))
    [audit] = ledger.audit_events(job_id)
    assert audit.event_code == "110106" and audit.outcome == 0


def test_detach_needs_a_shared_broker(small_study, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DISCFLOW_BROKER_URL"}
    result = subprocess.run([sys.executable, "-m", "orchestration.cli", "export", "--source", str(small_study),
                             "--detach"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "--detach needs workers" in result.stderr


def test_cancel_then_resume_redoes_only_what_did_not_finish(system_cluster, ct_study, tmp_path):
    out = tmp_path / "out"
    job_id = submit("export", {"source": {"folder": str(ct_study)}, "syntax": "jpeg-lossless",
                               "out_dir": str(out), "batch_size": 10})
    deadline = time.monotonic() + 120
    while progress.read(app.conf.broker_url, job_id).get("transcode:done", 0) < 40:
        assert time.monotonic() < deadline, "transcode never started"
        time.sleep(0.05)
    assert cancel(job_id)
    with pytest.raises(JobCancelledError):
        wait(job_id, timeout=120)
    ledger = Ledger()
    assert ledger.job(job_id).state == "cancelled"
    outcomes = Ledger().job(job_id)
    done_before = {p: p.stat().st_mtime_ns for p in (Path(os.environ["DISCFLOW_SPOOL_DIR"]) / job_id / "outcomes"
                                                      / "transcode").glob("*.json")}
    assert 4 <= len(done_before) < 21 and outcomes.resumable
    assert not (out / "VOL001.ISO").exists()

    run_id = resume(job_id)
    wait(job_id, timeout=300, task_id=run_id)
    job = ledger.job(job_id)
    assert (job.state, job.instances_ok, job.runs) == ("succeeded", 210, 2)
    for path, mtime in done_before.items():  # batches converted before the cancel were not converted again
        assert path.stat().st_mtime_ns == mtime
    root = xorriso_extract(out / "VOL001.ISO", tmp_path / "extracted")
    leaves = directory_leaves(root / "DICOMDIR")
    assert len(leaves) == 210
    uids = {str(pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID), stop_before_pixels=True).SOPInstanceUID)
            for leaf in leaves}
    assert len(uids) == 210


def test_batch_file_submits_every_row_and_refuses_a_bad_one(system_cluster, small_study, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"kind,source,syntax,out\nexport,{small_study},keep,{tmp_path}/a\nexport,{small_study},magic,x\n")
    refused = discflow("batch", str(bad), broker=system_cluster)
    assert refused.returncode == 2 and "line 3: unknown --syntax 'magic'" in refused.stderr
    assert Ledger().jobs() == []  # nothing submitted when one row is wrong
    good = tmp_path / "nightly.yaml"
    good.write_text(f"- kind: export\n  source: {small_study}\n  out: {tmp_path}/a\n"
                    f"- kind: export\n  source: {small_study}\n  syntax: uncompressed\n  out: {tmp_path}/b\n"
                    f"  priority: urgent\n")
    result = discflow("batch", str(good), "--wait", "--json", broker=system_cluster)
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert [e["status"] for e in entries] == ["succeeded", "succeeded"]
    assert {Ledger().job(e["job_id"]).priority for e in entries} == {"batch", "urgent"}
    assert (tmp_path / "a" / "VOL001.ISO").exists() and (tmp_path / "b" / "VOL001.ISO").exists()


@pytest.fixture
def one_worker(system_redis, tmp_path):
    """One worker process with one slot: jobs can only overtake each other by priority."""
    yield from _cluster(system_redis, count=1, concurrency=1, log_dir=tmp_path)


def test_an_urgent_job_overtakes_the_nightly_batch(one_worker, small_study, tmp_path):
    request = {"source": {"folder": str(small_study)}, "syntax": "keep"}
    batch = [submit("export", {**request, "out_dir": str(tmp_path / f"b{n}")}, "batch") for n in range(20)]
    urgent = submit("export", {**request, "out_dir": str(tmp_path / "urgent")}, "urgent")
    wait(urgent, timeout=300)
    urgent_done = Ledger().job(urgent).finished_at
    for job_id in batch:
        wait(job_id, timeout=300)
    finished = [Ledger().job(job_id).finished_at for job_id in batch]
    after = sum(1 for moment in finished if moment > urgent_done)
    print(f"urgent job finished before {after} of 20 batch jobs")
    assert after >= 15


def _storescp(port: int, folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(["storescp", "--aetitle", "PACS", "--output-directory", str(folder), "--accept-all",
                                "--bit-preserving", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import socket
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("storescp did not start")


def test_import_into_a_pacs_that_is_down_then_resume_when_it_is_back(system_cluster, small_study, tmp_path,
                                                                   monkeypatch):
    from conftest import require_tools
    from peers import free_port
    require_tools("storescp")
    exported = submit("export", {"source": {"folder": str(small_study)}, "syntax": "keep",
                                 "out_dir": str(tmp_path / "disc")})
    wait(exported, timeout=120)
    port = free_port()  # nothing listens here yet: the PACS is down
    job_id = submit("import", {"medium": str(tmp_path / "disc" / "VOL001.ISO"), "node": f"PACS@127.0.0.1:{port}",
                               "send": "keep", "studies": [], "rules": None})
    wait(job_id, timeout=180)
    ledger = Ledger()
    job = ledger.job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed, job.resumable) == ("failed", 0, 6, True)
    assert all("refused" in o.reason or "connect" in o.reason.lower() or o.reason for o in ledger.outcomes(job_id))

    pacs = _storescp(port, tmp_path / "pacs")
    try:
        run_id = resume(job_id)
        wait(job_id, timeout=180, task_id=run_id)
    finally:
        pacs.terminate()
        pacs.wait(10)
    job = ledger.job(job_id)
    assert (job.state, job.instances_ok, job.instances_failed) == ("succeeded", 6, 0)
    outcomes = ledger.outcomes(job_id)
    assert [o.dimse_status for o in outcomes] == [0] * 6 and all(o.ok for o in outcomes)
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "pacs").iterdir()}
    assert received == {o.sop_instance_uid for o in outcomes}
    codes = sorted(event.event_code for event in ledger.audit_events(job_id))
    assert codes == ["110104", "110104", "110107", "110107"]  # one pair per run: the failed one, then the resumed one


@pytest.fixture
def workers_per_queue(system_redis, tmp_path):
    """Two worker processes on different queues, as a department scales them: CPU-heavy apart."""
    from workers.app import use_broker
    from workers.embedded import LocalWorkers
    use_broker(system_redis)
    groups = [LocalWorkers(system_redis, 1, log_dir=tmp_path, queues=("scan", "media"), label="scanmedia").start(),
              LocalWorkers(system_redis, 2, log_dir=tmp_path, queues=("transcode", "store"), label="transcode").start()]
    try:
        yield system_redis
    finally:
        for group in groups:
            group.stop()


def test_workers_on_different_queues_share_a_job(workers_per_queue, small_study, tmp_path):
    job_id = submit("export", {"source": {"folder": str(small_study)}, "syntax": "jpeg-lossless",
                               "out_dir": str(tmp_path / "out"), "batch_size": 2})
    wait(job_id, timeout=120)
    runs = Ledger().task_runs(job_id)
    workers_by_stage = {}
    for run in runs:
        workers_by_stage.setdefault(run.stage, set()).add(run.worker.split("-")[0])
    assert workers_by_stage == {"scan": {"scanmedia0"}, "transcode": {"transcode0"}, "media": {"scanmedia0"}}
    assert sum(run.instances for run in runs if run.stage == "transcode") == 6
    assert Ledger().job(job_id).state == "succeeded"

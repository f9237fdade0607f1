"""No patient name or ID in task arguments, task results, Redis, worker logs at INFO, or the CLI's
job listings, after an export and an import of a study with a known (canary) patient."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import redis

from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import submit, wait
from orchestration.ledger import Ledger
from peers import storescp, storescp_factory  # noqa: F401 — fixtures
from workers.app import use_broker
from workers.embedded import LocalWorkers

pytestmark = pytest.mark.slow
CANARIES = ("PRIVACY^CANARY", "PRIVACY", "CANARY-4711")


@pytest.fixture
def info_logging_cluster(system_redis, tmp_path):
    use_broker(system_redis)
    workers = LocalWorkers(system_redis, 1, count=2, log_dir=tmp_path / "logs", loglevel="INFO")
    (tmp_path / "logs").mkdir()
    workers.start()
    try:
        yield system_redis, tmp_path / "logs"
    finally:
        workers.stop()


def test_no_patient_identifier_leaves_the_spool(info_logging_cluster, storescp, tmp_path):
    url, logs = info_logging_cluster
    study = tmp_path / "study"
    build_study(study, StudySpec(images=8, patient_name=CANARIES[0], patient_id=CANARIES[2]))
    assert CANARIES[2] in str(pydicom.dcmread(next(study.glob("*.dcm"))).PatientID)  # the canary is really there
    exported = submit("export", {"source": {"folder": str(study)}, "syntax": "jpeg-lossless",
                                 "out_dir": str(tmp_path / "out")})
    wait(exported, timeout=120)
    imported = submit("import", {"medium": str(tmp_path / "out" / "VOL001.ISO"), "node": str(storescp.node),
                                 "send": "uncompressed", "studies": [], "rules": None})
    wait(imported, timeout=120)
    assert Ledger().job(imported).state == "succeeded"

    client = redis.Redis.from_url(url)
    stored = []
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"string":
            stored.append(client.get(key))
        elif kind == b"list":
            stored.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            stored.extend(client.hgetall(key).values())
        elif kind == b"zset":
            stored.extend(member for member, _ in client.zrange(key, 0, -1, withscores=True))
    redis_text = b"\n".join(stored).decode("utf-8", "replace")
    assert "celery-task-meta" in "".join(k.decode() for k in client.scan_iter()) or redis_text  # results are there
    log_text = "\n".join(p.read_text(errors="replace") for p in logs.iterdir())
    assert "Task discflow.scan.export" in log_text  # INFO lines were written: the check below means something
    env = {**os.environ, "DISCFLOW_BROKER_URL": url}
    listing = subprocess.run([sys.executable, "-m", "orchestration.cli", "status", "--json"], capture_output=True,
                             text=True, env=env, timeout=60).stdout
    reports = [subprocess.run([sys.executable, "-m", "orchestration.cli", "report", job, "--json"],
                              capture_output=True, text=True, env=env, timeout=60).stdout
               for job in (exported, imported)]
    assert json.loads(listing)
    for where, text in (("Redis", redis_text), ("worker logs at INFO", log_text), ("status", listing),
                        *(("report", r) for r in reports)):
        for canary in CANARIES:
            assert canary not in text, f"{canary!r} found in {where}"

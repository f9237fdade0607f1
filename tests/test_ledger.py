"""The job ledger on SQLite and on the machine's PostgreSQL: schema by Alembic, idempotent writes."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import inspect, text

from ledger_databases import ledger_url  # noqa: F401 — fixture
from orchestration.ledger import Ledger
from orchestration.summary import ledger_summary


def timing_row(job_id: str, task_id: str, stage: str, started: float, seconds: float, **counts) -> dict:
    return {"job_id": job_id, "task_id": task_id, "name": f"discflow.{stage}.batch", "stage": stage,
            "worker": "w1@host", "started": started, "finished": started + seconds,
            "queue_wait": counts.pop("queue_wait", 0.0), "instances": counts.pop("instances", 0),
            "bytes_in": counts.pop("bytes_in", 0), "bytes_out": counts.pop("bytes_out", 0)}


def test_schema_is_created_by_alembic(ledger_url):
    ledger = Ledger(ledger_url)
    tables = set(inspect(ledger.engine).get_table_names())
    assert {"jobs", "task_runs", "instance_outcomes", "audit_events", "alembic_version"} <= tables
    with ledger.engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar() == "0001"
    Ledger._engines.pop(ledger_url).dispose()
    Ledger(ledger_url)  # a second process opening the same database upgrades nothing and does not fail


def test_schema_upgrade_is_skipped_only_at_the_head_revision(ledger_url):
    """Every process opens the ledger; it imports Alembic only when alembic_version is not the head,
    which it reads from the migration scripts' text: that must agree with Alembic's own reading."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from orchestration.ledger import MIGRATIONS, head_revisions, schema_is_current
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert head_revisions() == set(ScriptDirectory.from_config(config).get_heads())
    ledger = Ledger(ledger_url)
    assert schema_is_current(ledger.engine)
    with ledger.engine.begin() as connection:
        connection.execute(text("update alembic_version set version_num = 'older'"))
    assert not schema_is_current(ledger.engine)
    with ledger.engine.begin() as connection:
        connection.execute(text("drop table alembic_version"))
    assert not schema_is_current(ledger.engine)  # a database Alembic never touched


def test_job_lifecycle_and_patient_identifiers_kept_out(ledger_url):
    ledger = Ledger(ledger_url)
    request = {"source": {"node": "PACS@10.0.0.1:104", "patient_id": "SECRET-42"}, "syntax": "keep"}
    ledger.create_job("ex1", "export", request, "urgent", "desk1")
    job = ledger.job("ex1")
    assert (job.state, job.priority, job.submitted_by) == ("queued", "urgent", "desk1")
    assert "SECRET-42" not in str(job.options)
    ledger.mark_running("ex1")
    ledger.mark_running("ex1")  # a second task starting changes nothing
    assert ledger.job("ex1").state == "running"
    ledger.finish_job("ex1", {"status": "partial", "instances": {"total": 3, "written": 2, "failed": 1},
                              "failures": [{"file": "a.dcm", "reason": "bad"}]})
    job = ledger.job("ex1")
    assert (job.state, job.instances_total, job.instances_ok, job.instances_failed) == ("partial", 3, 2, 1)
    assert job.resumable and job.finished_at is not None
    ledger.requeue_job("ex1")
    assert (ledger.job("ex1").state, ledger.job("ex1").runs) == ("queued", 2)
    assert ledger.cancel_job("ex1") and ledger.job("ex1").state == "cancelled"
    assert not ledger.cancel_job("ex1")  # already ended
    ledger.finish_job("ex1", {"status": "succeeded", "instances": {"total": 3, "written": 3, "failed": 0}})
    assert ledger.job("ex1").state == "cancelled"  # a late finish does not undo the operator's cancel


def test_a_redelivered_task_leaves_one_row(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.create_job("im1", "import", {"medium": "/d.iso"})
    start = time.time()
    ledger.record_task(timing_row("im1", "t1", "store", start, 1.0, instances=25))
    ledger.record_task(timing_row("im1", "t1", "store", start + 5, 2.0, instances=25))  # at-least-once: ran again
    ledger.record_task(timing_row("im1", "t2", "store", start, 1.5, instances=10, queue_wait=0.25))
    runs = ledger.task_runs("im1")
    assert len(runs) == 2
    assert {r.task_id: r.finished - r.started for r in runs} == pytest.approx({"t1": 2.0, "t2": 1.5})
    ledger.record_outcomes("im1", [{"index": i, "sop_instance_uid": f"1.2.{i}", "source_syntax": "1.2.840.10008.1.2.1",
                                    "target_syntax": "1.2.840.10008.1.2.1", "bytes": 10, "ok": i != 1,
                                    "dimse_status": 0 if i != 1 else 0xA700, "reason": ""} for i in range(3)])
    ledger.record_outcomes("im1", [{"index": 1, "sop_instance_uid": "1.2.1", "source_syntax": "x", "target_syntax": "x",
                                    "bytes": 10, "ok": True, "dimse_status": 0, "reason": ""}])  # resumed
    outcomes = ledger.outcomes("im1")
    assert [o.ok for o in outcomes] == [True, True, True] and outcomes[1].dimse_status == 0


def test_stage_table_from_the_ledger_has_queue_wait_and_rates(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.create_job("ex2", "export", {})
    start = time.time()
    ledger.record_task(timing_row("ex2", "a", "transcode", start, 2.0, instances=50, bytes_out=50_000_000,
                                  queue_wait=0.5))
    ledger.record_task(timing_row("ex2", "b", "transcode", start + 1, 2.0, instances=50, bytes_out=50_000_000,
                                  queue_wait=1.5))
    summary = ledger_summary(ledger.job("ex2"), ledger.task_runs("ex2"))
    row = summary["stages"]["transcode"]
    assert row["seconds"] == pytest.approx(3.0, abs=1e-3) and row["task_seconds"] == pytest.approx(4.0, abs=1e-3)
    assert row["queue_wait_seconds"] == pytest.approx(2.0) and row["tasks"] == 2
    assert row["instances_per_second"] == pytest.approx(100 / 3, abs=0.01)
    assert row["mb_per_second"] == pytest.approx(100 / 3, abs=0.01)
    assert summary["status"] == "queued" and summary["job_id"] == "ex2"


def test_audit_events_are_kept(ledger_url):
    ledger = Ledger(ledger_url)
    ledger.record_audit("ex3", "110106", 0, "<AuditMessage/>")
    [event] = ledger.audit_events("ex3")
    assert (event.event_code, event.outcome, event.message) == ("110106", 0, "<AuditMessage/>")

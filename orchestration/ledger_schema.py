"""The job ledger's tables: jobs, per-task stage timings, per-instance outcomes, audit events.

Alembic migrations in ``orchestration/migrations`` create and evolve these; this module is the
one description both the code and the migrations read.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    """queued, running, succeeded, partial, failed, cancelled."""
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    """The request, with patient identifiers removed (operators list jobs)."""
    submitted_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    instances_total: Mapped[int] = mapped_column(Integer, default=0)
    instances_ok: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    resumable: Mapped[bool] = mapped_column(Boolean, default=False)
    runs: Mapped[int] = mapped_column(Integer, default=1)


class TaskRun(Base):
    """One task's timing, written by the worker that ran it; a redelivered task overwrites its row."""
    __tablename__ = "task_runs"
    __table_args__ = (UniqueConstraint("job_id", "task_id", "name", name="uq_task_runs_task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    task_id: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(128))
    stage: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str] = mapped_column(String(255), default="")
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float] = mapped_column(Float)
    queue_wait: Mapped[float] = mapped_column(Float, default=0.0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)


class InstanceOutcome(Base):
    """What became of one instance of a job (the last run's word)."""
    __tablename__ = "instance_outcomes"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_instance_outcomes_instance"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    index: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    source_syntax: Mapped[str] = mapped_column(String(64), default="")
    target_syntax: Mapped[str] = mapped_column(String(64), default="")
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    ok: Mapped[bool] = mapped_column(Boolean, default=False)
    dimse_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class AuditEvent(Base):
    """A DICOM PS3.15 audit message (XML) about a job."""
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    event_code: Mapped[str] = mapped_column(String(16))
    """110106 Export, 110107 Import, 110104 DICOM Instances Transferred."""
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    outcome: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text)

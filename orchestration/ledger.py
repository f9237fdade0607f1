"""The job ledger: durable jobs, stage timings, per-instance outcomes and audit events.

SQLite by default (a file beside the spool), PostgreSQL by ``DISCFLOW_DATABASE_URL``; the schema
is created and upgraded by Alembic on first use. Every write is an upsert, so a task that runs
twice (at-least-once delivery) leaves one row, not two.
"""
from __future__ import annotations

import ast
import functools
import getpass
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, ProgrammingError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orchestration.ledger_schema import AuditEvent, InstanceOutcome, Job, TaskRun
from workers.settings import Settings, get_settings

MIGRATIONS = Path(__file__).with_name("migrations")
FINAL_STATES = ("succeeded", "partial", "failed", "cancelled")
PRIVATE_OPTIONS = ("patient_id", "patient_name")
"""Request keys kept out of the ledger's job options: job lists are shown to every operator."""


def database_url(settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    if settings.database_url:
        return settings.database_url
    folder = settings.data_dir or Path(settings.spool_dir).parent
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'ledger.sqlite3'}"


def now() -> datetime:
    return datetime.now(timezone.utc)


def _engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(connection, _record) -> None:  # workers write from several processes at once
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def head_revisions() -> set[str] | None:
    """The newest revision(s) in migrations/versions, read from the scripts' text (importing Alembic
    costs half a second of every command's start); None when a script cannot be read that way."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        source = script.read_text(encoding="utf-8")
        revision = re.search(r"^revision\s*(?::[^=]*)?=\s*(.+)$", source, re.MULTILINE)
        down = re.search(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", source, re.MULTILINE)
        try:
            revision_id = ast.literal_eval(revision.group(1).strip()) if revision else None
            down_ids = ast.literal_eval(down.group(1).strip()) if down else None
        except (ValueError, SyntaxError):
            return None
        if not isinstance(revision_id, str):
            return None
        revisions.add(revision_id)
        parents.update([down_ids] if isinstance(down_ids, str) else (down_ids or ()))
    return (revisions - parents) or None


def schema_is_current(engine: Engine) -> bool:
    """Whether alembic_version already names exactly the head revision(s): one cheap SELECT."""
    heads = head_revisions()
    if not heads:
        return False
    try:
        with engine.connect() as connection:
            stamped = {row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))}
    except (OperationalError, ProgrammingError):
        return False  # no alembic_version table yet: a new database
    return stamped == heads


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision; safe when several processes race to do it."""
    if schema_is_current(engine):
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    for attempt in range(5):
        try:
            with engine.begin() as connection:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))  # another process is creating the same tables


class Ledger:
    """One database; cheap to create per process (engines are cached per URL)."""

    _engines: dict[str, Engine] = {}
    _lock = threading.Lock()

    def __init__(self, url: str | None = None) -> None:
        self.url = url or database_url()
        with self._lock:
            if self.url not in self._engines:
                engine = _engine(self.url)
                upgrade_schema(engine)
                self._engines[self.url] = engine
        self.engine = self._engines[self.url]
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- jobs -------------------------------------------------------------------------------

    def create_job(self, job_id: str, kind: str, request: dict[str, Any], priority: str = "normal",
                   submitted_by: str | None = None) -> None:
        options = _public_options(request)
        with self.session() as session:
            session.merge(Job(id=job_id, kind=kind, state="queued", priority=priority, options=options,
                              submitted_by=submitted_by or _user(), created_at=now(), error="", resumable=False,
                              runs=1, instances_total=0, instances_ok=0, instances_failed=0, bytes_total=0))

    def job(self, job_id: str) -> Job | None:
        with self.session() as session:
            return session.get(Job, job_id)

    def jobs(self, limit: int = 20, states: Iterable[str] | None = None, since: datetime | None = None) -> list[Job]:
        query = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if states:
            query = query.where(Job.state.in_(list(states)))
        if since:
            query = query.where(Job.created_at >= since)
        with self.session() as session:
            return list(session.scalars(query))

    def mark_running(self, job_id: str, started: datetime | None = None) -> None:
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.state == "queued")
                            .values(state="running", started_at=started or now()))

    def finish_job(self, job_id: str, summary: dict[str, Any]) -> None:
        """Record the job's outcome from its summary (the spool's summary.json)."""
        counts = summary.get("instances", {})
        ok = counts.get("written", counts.get("stored", 0))
        values = dict(state=summary["status"], finished_at=now(), summary=_public_summary(summary),
                      instances_total=counts.get("total", 0), instances_ok=ok,
                      instances_failed=counts.get("failed", 0), error="",
                      resumable=summary["status"] != "succeeded")
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.state != "cancelled").values(**values))

    def fail_job(self, job_id: str, error: str, resumable: bool = True) -> None:
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.state.not_in(("cancelled",)))
                            .values(state="failed", finished_at=now(), error=error[:2000], resumable=resumable))

    def cancel_job(self, job_id: str) -> bool:
        with self.session() as session:
            result = session.execute(update(Job).where(Job.id == job_id, Job.state.in_(("queued", "running")))
                                     .values(state="cancelled", finished_at=now(), resumable=True))
            return result.rowcount > 0

    def requeue_job(self, job_id: str) -> None:
        with self.session() as session:
            job = session.get(Job, job_id)
            job.state, job.finished_at, job.error, job.runs = "queued", None, "", job.runs + 1

    def set_bytes(self, job_id: str, total: int) -> None:
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(bytes_total=total))

    # --- timings, outcomes, audit -----------------------------------------------------------

    def record_task(self, row: dict[str, Any]) -> None:
        """Upsert one task's timing (keyed by job, task id and task name)."""
        self._upsert(TaskRun, [row], ("job_id", "task_id", "name"))

    def task_runs(self, job_id: str) -> list[TaskRun]:
        with self.session() as session:
            return list(session.scalars(select(TaskRun).where(TaskRun.job_id == job_id).order_by(TaskRun.started)))

    def record_outcomes(self, job_id: str, rows: list[dict[str, Any]]) -> None:
        for start in range(0, len(rows), 500):
            self._upsert(InstanceOutcome, [{**row, "job_id": job_id} for row in rows[start:start + 500]],
                         ("job_id", "index"))

    def outcomes(self, job_id: str) -> list[InstanceOutcome]:
        with self.session() as session:
            query = select(InstanceOutcome).where(InstanceOutcome.job_id == job_id).order_by(InstanceOutcome.index)
            return list(session.scalars(query))

    def record_audit(self, job_id: str, event_code: str, outcome: int, message: str) -> None:
        with self.session() as session:
            session.add(AuditEvent(job_id=job_id, event_code=event_code, event_time=now(), outcome=outcome,
                                   message=message))

    def audit_events(self, job_id: str | None = None) -> list[AuditEvent]:
        query = select(AuditEvent).order_by(AuditEvent.event_time)
        if job_id:
            query = query.where(AuditEvent.job_id == job_id)
        with self.session() as session:
            return list(session.scalars(query))

    def _upsert(self, model: type, rows: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
        if not rows:
            return
        statement = _upsert_statement(self.engine.dialect.name, model, tuple(rows[0]), keys)
        with self.session() as session:
            session.connection().execute(statement, rows)


@functools.cache
def _upsert_statement(dialect_name: str, model: type, columns: tuple[str, ...], keys: tuple[str, ...]) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE with bound parameters, built once per shape: SQLAlchemy
    then compiles it once, where a statement with the rows' values inlined was compiled for every
    task a worker ran (10 % of an import's worker CPU)."""
    dialect = {"sqlite": sqlite, "postgresql": postgresql}[dialect_name]
    statement = dialect.insert(model)
    changed = {name: statement.excluded[name] for name in columns if name not in keys}
    return statement.on_conflict_do_update(index_elements=list(keys), set_=changed)


def _public_options(request: dict[str, Any]) -> dict[str, Any]:
    source = dict(request.get("source") or {})
    for key in PRIVATE_OPTIONS:
        if source.get(key):
            source[key] = "(given)"
    return {**request, **({"source": source} if source else {})}


def _public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as stored: counts, stages, volumes, failures (file and reason), syntaxes."""
    return {key: value for key, value in summary.items() if key not in ("skipped", "notes")}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

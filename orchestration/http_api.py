"""A small HTTP API for a RIS or a front-desk page: submit, follow, report, cancel and resume jobs.

Every route needs ``Authorization: Bearer <token>`` (the OpenAPI schema and docs stay public: they
describe, they do not act). The API only submits to the shared broker the workers already use; it
never starts an embedded one, because jobs must outlive the request that created them.
Handlers are plain ``def``: the ledger and Celery calls block, so Starlette runs them in a thread pool.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, HTTPException, Query, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError as BrokerUnreachable
from pydantic import BaseModel, ConfigDict, Field

from orchestration.cli import UsageError, export_request, import_request
from orchestration.commands_jobs import job_row
from orchestration.jobs import JobFailed, UnknownJob, cancel, resume, submit
from orchestration.ledger import FINAL_STATES, Ledger
from orchestration.summary import ledger_summary
from tasks.reconcile import RulesError
from tasks.transfer_syntax import POLICIES
from workers import progress
from workers.app import app as celery_app

Priority = Literal["urgent", "normal", "batch"]
JobState = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]
REQUEST_ERRORS = (UsageError, ValueError, RulesError)
"""What the request builders raise for a bad option: the operator's mistake, answered with 422."""


class ExportJob(BaseModel):
    """The options of `discflow export`, by long name; paths are paths on the API's host."""
    model_config = ConfigDict(extra="forbid")

    source: Optional[str] = Field(None, description="Folder of DICOM files (searched recursively).")
    from_node: Optional[str] = Field(None, description="DICOM node to retrieve from, AE@HOST:PORT.")
    patient_id: Optional[str] = Field(None, description="With from_node: the patient's ID (kept out of the ledger).")
    study_uid: list[str] = Field(default_factory=list, description="With from_node: Study Instance UIDs.")
    accession: Optional[str] = Field(None, description="With from_node: an accession number.")
    syntax: str = Field("keep", description=f"Transfer-syntax policy: {', '.join(POLICIES)}.")
    out: str = Field(..., description="Folder for the disc images (VOL001.ISO, ...); required: "
                                      "a default relative to the server's directory would surprise.")
    volume_capacity: Optional[int] = Field(None, gt=0, description="Usable bytes per volume.")
    batch_size: Optional[int] = Field(None, gt=0, description="Instances per transcode task.")
    profile: str = Field("auto", description="Media profile, e.g. STD-GEN-CD, STD-GEN-DVD-JPEG, GUIDELINE.")
    media: Optional[str] = Field(None, description="cd, dvd, dvd-dl, bd or usb.")
    report: Optional[str] = Field(None, description="Report (.pdf or .txt) to put on the disc.")
    viewer: Optional[str] = Field(None, description="Viewer folder copied to VIEWER/.")
    hot_folder: Optional[str] = Field(None, description="Disc-robot hot folder for each finished volume.")
    robot: Optional[str] = Field(None, description="primera or epson.")
    priority: Priority = "normal"
    # No burn_device: `discflow export` burns to a drive from the CLI process, which the API does not have.


class ImportJob(BaseModel):
    """The options of `discflow import`, by long name; ``disc`` is a path on the API's host."""
    model_config = ConfigDict(extra="forbid")

    disc: str = Field(..., description="An ISO image, a ZIP, or a folder / mounted drive.")
    to: str = Field(..., description="The local PACS, AE@HOST:PORT.")
    send: str = Field("negotiate", description="keep | uncompressed | negotiate.")
    rules: Optional[str] = Field(None, description="Reconciliation rules (TOML).")
    study: list[str] = Field(default_factory=list, description="Import only these Study Instance UIDs.")
    priority: Priority = "normal"


class JobSubmitted(BaseModel):
    job_id: str
    status: str = "queued"
    run: Optional[str] = Field(None, description="The run's task id, for a resumed job.")


def create_api(token: str) -> FastAPI:
    """The API app; every route requires ``token`` as a bearer token."""
    if not token:
        raise ValueError("the HTTP API needs a non-empty token")
    api = FastAPI(title="discflow", version="1", dependencies=[Depends(_bearer_check(token))],
                  description="Submit and follow disc export/import jobs. Send `Authorization: Bearer <token>`.")
    _add_routes(api)
    return api


def _bearer_check(token: str) -> Callable[..., None]:
    expected = token.encode()
    scheme = HTTPBearer(auto_error=False, description="The token from DISCFLOW_API_TOKEN.")

    def check(credentials: Optional[HTTPAuthorizationCredentials] = Depends(scheme)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        # Constant time: the token is the only thing between the network and patient data.
        if not secrets.compare_digest(given, expected):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def _add_routes(api: FastAPI) -> None:
    submitted = dict(response_model=JobSubmitted, response_model_exclude_none=True, tags=["jobs"])
    api.post("/jobs/export", status_code=201, responses=_errors(422, 503), **submitted)(submit_export)
    api.post("/jobs/import", status_code=201, responses=_errors(422, 503), **submitted)(submit_import)
    api.get("/jobs", tags=["jobs"], responses=_errors())(list_jobs)
    api.get("/jobs/{job_id}", tags=["jobs"], responses=_errors(404))(job_status)
    api.get("/jobs/{job_id}/report", tags=["jobs"], responses=_errors(404))(job_report)
    api.post("/jobs/{job_id}/cancel", tags=["jobs"], responses=_errors(404, 409))(cancel_job)
    api.post("/jobs/{job_id}/resume", status_code=202, responses=_errors(404, 409), **submitted)(resume_job)


ERRORS = {401: "Missing or wrong bearer token.", 404: "No such job in the ledger.",
          409: "The job is in the wrong state for this (already ended, still running, already succeeded).",
          422: "A bad option; `detail` is the operator's message.", 503: "The job broker (Redis) is unreachable."}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Documented error answers: every one is ``{"detail": "<message>"}``."""
    return {code: {"description": ERRORS[code]} for code in (401, *codes)}


def submit_export(body: ExportJob) -> JobSubmitted:
    """Queue an export job (the options of `discflow export --detach`)."""
    options = body.model_dump(exclude={"priority"})
    paths = {key: Path(options[key]) if options[key] else None for key in ("source", "report", "viewer", "hot_folder")}
    try:
        request = export_request(**{**options, **paths, "out": Path(body.out)})
    except REQUEST_ERRORS as error:
        raise HTTPException(422, str(error)) from error
    return JobSubmitted(job_id=_submit("export", request, body.priority))


def submit_import(body: ImportJob) -> JobSubmitted:
    """Queue an import job (the options of `discflow import --detach`)."""
    try:
        request = import_request(disc=Path(body.disc), to=body.to, send=body.send, study=body.study,
                                 rules=Path(body.rules) if body.rules else None)
    except REQUEST_ERRORS as error:
        raise HTTPException(422, str(error)) from error
    return JobSubmitted(job_id=_submit("import", request, body.priority))


def _submit(kind: str, request: dict[str, Any], priority: str) -> str:
    try:
        return submit(kind, request, priority, submitted_by="api")
    except BrokerUnreachable as error:  # the front desk should hear "try again", not a stack trace
        raise HTTPException(503, f"the job broker is unreachable: {error}") from error


def list_jobs(limit: int = Query(20, ge=1, le=500), state: Optional[list[JobState]] = Query(None)
              ) -> list[dict[str, Any]]:
    """The newest jobs first: the rows of `discflow status --json` (the CLI's own function, so both agree)."""
    return [job_row(job) for job in Ledger().jobs(limit, states=state)]


def job_status(job_id: str) -> dict[str, Any]:
    """One job: the fields of `discflow status JOB --json` (summary, stages, and progress while it runs)."""
    ledger = Ledger()
    job = _known_job(ledger, job_id)
    summary = ledger_summary(job, ledger.task_runs(job_id))
    if job.state not in FINAL_STATES:
        summary["progress"] = progress.read(celery_app.conf.broker_url, job_id)
    return summary


def job_report(job_id: str) -> dict[str, Any]:
    """The stage table: wall and task seconds, queue wait, instances/s and MB/s per stage."""
    ledger = Ledger()
    summary = ledger_summary(_known_job(ledger, job_id), ledger.task_runs(job_id))
    keys = ("job_id", "kind", "status", "seconds", "instances", "stages")
    return {key: summary[key] for key in keys if key in summary}


def cancel_job(job_id: str) -> dict[str, Any]:
    """Stop a queued or running job; 409 when it has already ended."""
    try:
        cancelled = cancel(job_id)
    except UnknownJob as error:
        raise HTTPException(404, str(error)) from error
    if not cancelled:
        raise HTTPException(409, f"job {job_id} has already ended ({Ledger().job(job_id).state}); nothing to cancel")
    return {"job_id": job_id, "status": "cancelled"}


def resume_job(job_id: str) -> JobSubmitted:
    """Run a failed, partial or cancelled job again, redoing only what did not finish."""
    try:
        run_id = resume(job_id)
    except UnknownJob as error:
        raise HTTPException(404, str(error)) from error
    except JobFailed as error:  # still running, or already succeeded
        raise HTTPException(409, str(error)) from error
    return JobSubmitted(job_id=job_id, run=run_id)


def _known_job(ledger: Ledger, job_id: str):
    job = ledger.job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} in the ledger")
    return job

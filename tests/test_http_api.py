"""The HTTP API against real Redis and real worker processes: bearer token on every route, submit and
follow an export, 422 with the operator's message, 404 for unknown jobs, the OpenAPI schema, and
`discflow api` refusing to start without a token or a shared broker."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from orchestration.corpus import StudySpec, build_study
from orchestration.http_api import create_api
from orchestration.ledger import FINAL_STATES
from workers.settings import reload_settings

TOKEN = "front-desk-7f3a9c1e5b"
PATIENT_NAME, PATIENT_ID = "API^SECRET", "API-4242"


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("api-study")
    build_study(folder, StudySpec(images=6, patient_name=PATIENT_NAME, patient_id=PATIENT_ID))
    return folder


@pytest.fixture
def client(spool) -> TestClient:
    """An authorised client on a private ledger (the spool's); no broker needed until a job is submitted."""
    return TestClient(create_api(TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture
def cluster_client(system_cluster, monkeypatch) -> TestClient:
    monkeypatch.setenv("DISCFLOW_BROKER_URL", system_cluster)
    reload_settings()
    return TestClient(create_api(TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})


def test_every_route_needs_the_token(spool):
    api = create_api(TOKEN)
    anonymous = TestClient(api)
    routes = [(method, route.path.replace("{job_id}", "ex1")) for route in api.routes if isinstance(route, APIRoute)
              for method in route.methods]
    assert len(routes) == 7
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        for method, path in routes:
            response = anonymous.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
    assert anonymous.get("/openapi.json").status_code == 200  # describes, does not act


def test_openapi_schema_documents_routes_bodies_and_the_token(client):
    schema = TestClient(client.app).get("/openapi.json").json()
    assert set(schema["paths"]) == {"/jobs/export", "/jobs/import", "/jobs", "/jobs/{job_id}",
                                    "/jobs/{job_id}/report", "/jobs/{job_id}/cancel", "/jobs/{job_id}/resume"}
    assert set(schema["paths"]["/jobs/export"]) == {"post"} and set(schema["paths"]["/jobs/{job_id}"]) == {"get"}
    export = schema["components"]["schemas"]["ExportJob"]
    assert {"source", "syntax", "out", "profile", "media", "priority"} <= set(export["properties"])
    assert "out" in export["required"] and "burn_device" not in export["properties"]
    assert {"disc", "to", "send", "rules", "study", "priority"} <= set(schema["components"]["schemas"]["ImportJob"]
                                                                        ["properties"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_a_bad_option_is_a_422_with_the_message(client, small_study, tmp_path):
    response = client.post("/jobs/export", json={"source": str(small_study), "syntax": "magic", "out": str(tmp_path)})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("unknown --syntax 'magic'; choose one of keep, uncompressed")
    missing = client.post("/jobs/export", json={"source": "/nonexistent/study", "out": str(tmp_path)})
    assert (missing.status_code, missing.json()["detail"]) == (422, "source folder not found: /nonexistent/study")
    disc = client.post("/jobs/import", json={"disc": "/nonexistent.iso", "to": "PACS@127.0.0.1:104"})
    assert (disc.status_code, disc.json()["detail"]) == (422, "disc not found: /nonexistent.iso")
    for body in ({"source": str(small_study)},  # no out
                 {"source": str(small_study), "out": str(tmp_path), "priority": "asap"},
                 {"source": str(small_study), "out": str(tmp_path), "burn_device": "/dev/sr0"}):
        assert client.post("/jobs/export", json=body).status_code == 422, body
    assert client.get("/jobs").json() == []  # nothing was submitted


def test_unknown_jobs_are_404(client):
    for method, path in (("GET", "/jobs/ex-nope"), ("GET", "/jobs/ex-nope/report"), ("POST", "/jobs/ex-nope/cancel"),
                         ("POST", "/jobs/ex-nope/resume")):
        response = client.request(method, path)
        assert response.status_code == 404 and "no job ex-nope" in response.json()["detail"], path


@pytest.mark.slow
def test_submit_an_export_and_follow_it_to_the_report(cluster_client, system_cluster, small_study, tmp_path):
    out = tmp_path / "out"
    submitted = cluster_client.post("/jobs/export", json={"source": str(small_study), "out": str(out),
                                                          "syntax": "jpeg-lossless", "priority": "urgent"})
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["job_id"]
    assert submitted.json() == {"job_id": job_id, "status": "queued"}
    job = _poll_until_final(cluster_client, job_id)
    assert job["status"] == "succeeded", job
    assert (job["kind"], job["priority"], job["submitted_by"]) == ("export", "urgent", "api")
    assert job["instances"]["written"] == 6 and (out / "VOL001.ISO").exists()
    assert job == _cli_status(job_id, system_cluster)  # the same fields as `discflow status JOB --json`

    report = cluster_client.get(f"/jobs/{job_id}/report").json()
    assert set(report["stages"]) == {"scan", "transcode", "media"}
    for stage in ("scan", "transcode", "media"):
        row = report["stages"][stage]
        assert row["tasks"] >= 1 and row["seconds"] > 0 and row["queue_wait_seconds"] >= 0
    assert report["stages"]["media"]["instances"] == 6 and report["status"] == "succeeded"

    listing = cluster_client.get("/jobs", params={"limit": 5}).json()
    assert [row["job_id"] for row in listing] == [job_id]
    assert cluster_client.post(f"/jobs/{job_id}/cancel").status_code == 409  # already ended
    resumed = cluster_client.post(f"/jobs/{job_id}/resume")
    assert resumed.status_code == 409 and "already succeeded" in resumed.json()["detail"]
    for text in (submitted.text, json.dumps(job), json.dumps(report), json.dumps(listing)):
        assert PATIENT_NAME not in text and PATIENT_ID not in text


def _poll_until_final(client: TestClient, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in FINAL_STATES:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s"
        time.sleep(0.2)


def _cli_status(job_id: str, broker: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "orchestration.cli", "status", job_id, "--json"],
                            capture_output=True, text=True, env={**os.environ, "DISCFLOW_BROKER_URL": broker},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _discflow_api(*args: str, env: dict[str, str], **popen) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if k not in ("DISCFLOW_API_TOKEN", "DISCFLOW_BROKER_URL")}
    return subprocess.Popen([sys.executable, "-m", "orchestration.cli", "api", *args], env={**clean, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_discflow_api_refuses_to_start_without_a_token_or_a_broker():
    for env, message in (({"DISCFLOW_BROKER_URL": "redis://127.0.0.1:6379/0"}, "set DISCFLOW_API_TOKEN"),
                         ({"DISCFLOW_API_TOKEN": TOKEN}, "set DISCFLOW_BROKER_URL")):
        process = _discflow_api(env=env)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 2 and message in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_discflow_api_serves_on_loopback_with_the_token(spool):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A broker URL that is never dialled: listing an empty ledger does not touch Redis.
    process = _discflow_api("--port", str(port), env={"DISCFLOW_API_TOKEN": TOKEN,
                                                      "DISCFLOW_BROKER_URL": "redis://127.0.0.1:6379/15"})
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_http(f"{base}/openapi.json", process)
        assert httpx.get(f"{base}/jobs").status_code == 401
        response = httpx.get(f"{base}/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert (response.status_code, response.json()) == (200, [])
    finally:
        process.terminate()
        process.communicate(timeout=30)


def _wait_for_http(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"`discflow api` did not answer at {url} within {timeout} s")

"""`discflow flower`: basic auth required, loopback by default, and Flower's view of a real job
(tasks named by stage, no patient identifier anywhere in what it shows)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from orchestration import commands_ops
from orchestration.cli import cli
from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import submit, wait
from workers.settings import reload_settings

PATIENT_NAME = "FLOWER^SECRET"
PATIENT_ID = "FLW-4242"
CREDENTIALS = ("desk", "pw-4-flower-test")


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch):
    """A clean DISCFLOW_*/FLOWER_* environment; the test sets what it needs, settings re-read after."""
    for name in {*os.environ, "FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API"}:
        if name.startswith(("DISCFLOW_FLOWER", "FLOWER_")) or name == "DISCFLOW_BROKER_URL":
            monkeypatch.setenv(name, "")  # recorded, so the command's own os.environ edits are undone too
            monkeypatch.delenv(name)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        reload_settings()

    reload_settings()
    yield set_env
    monkeypatch.undo()
    reload_settings()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records what `discflow flower` would hand to Celery, instead of serving."""
    calls: list[list[str]] = []
    monkeypatch.setattr(commands_ops.app, "start", lambda argv: calls.append(list(argv)) or 0)
    monkeypatch.setattr(commands_ops, "use_broker", lambda url: None)
    return calls


def invoke(*args: str):
    return CliRunner().invoke(cli, ["flower", *args])


def test_refuses_without_broker(settings_env, started):
    settings_env(DISCFLOW_FLOWER_BASIC_AUTH="desk:pw")
    result = invoke()
    assert result.exit_code == 2
    assert "DISCFLOW_BROKER_URL" in result.output and "Traceback" not in result.output
    assert started == []


@pytest.mark.parametrize("credentials", [None, "desk", "desk:", ":pw", "desk:pw,night"])
def test_refuses_without_usable_basic_auth(settings_env, started, credentials):
    settings_env(DISCFLOW_BROKER_URL="redis://127.0.0.1:6379/0")
    result = invoke(*(["--basic-auth", credentials] if credentials is not None else []))
    assert result.exit_code == 2
    assert "basic auth" in result.output.lower()
    assert started == []


def test_loopback_by_default_and_credentials_kept_out_of_argv(settings_env, started, monkeypatch):
    settings_env(DISCFLOW_BROKER_URL="redis://127.0.0.1:6379/0", DISCFLOW_FLOWER_BASIC_AUTH="desk:pw")
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    result = invoke()
    assert result.exit_code == 0, result.output
    [argv] = started
    assert argv[0] == "flower"
    assert "--address=127.0.0.1" in argv and "--port=5555" in argv
    assert not any("pw" in arg for arg in argv)
    assert os.environ["FLOWER_BASIC_AUTH"] == "desk:pw"
    assert "FLOWER_UNAUTHENTICATED_API" not in os.environ


def test_options_beat_settings(settings_env, started):
    settings_env(DISCFLOW_BROKER_URL="redis://127.0.0.1:6379/0", DISCFLOW_FLOWER_BASIC_AUTH="desk:pw",
                 DISCFLOW_FLOWER_ADDRESS="127.0.0.2", DISCFLOW_FLOWER_PORT="5600")
    assert invoke().exit_code == 0
    assert invoke("--address", "0.0.0.0", "--port", "5601", "--basic-auth", "a:b,c:d").exit_code == 0
    first, second = started
    assert "--address=127.0.0.2" in first and "--port=5600" in first
    assert "--address=0.0.0.0" in second and "--port=5601" in second
    assert os.environ["FLOWER_BASIC_AUTH"] == "a:b,c:d"


# --- Flower against the machine's Redis, two real workers, a real export -----------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _discflow_command() -> list[str]:
    script = Path(sys.executable).with_name("discflow")
    if script.exists():
        return [str(script)]
    found = shutil.which("discflow")
    return [found] if found else [sys.executable, "-c", "from orchestration.cli import main; main()"]


def _wait_until_answering(base: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"discflow flower exited with {process.returncode}:\n{log.read_text()}")
        try:
            if requests.get(f"{base}/api/workers", auth=CREDENTIALS, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    pytest.fail(f"Flower did not answer within {timeout} s:\n{log.read_text()}")


@pytest.fixture
def flower_url(system_cluster: str, tmp_path: Path):
    port = _free_port()
    log = tmp_path / "flower.log"
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLOWER_")}
    env.update(DISCFLOW_BROKER_URL=system_cluster, DISCFLOW_FLOWER_BASIC_AUTH=":".join(CREDENTIALS))
    with log.open("wb") as output:
        process = subprocess.Popen([*_discflow_command(), "flower", "--port", str(port)], env=env, cwd=tmp_path,
                                   stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answering(base, process, log)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class FlowerWatch:
    """Polls /api/tasks while a job runs, remembering every name each task id had and every answer.

    Flower keeps one record per task id, and the scan task's id is the job id, which Celery hands on through
    ``replace`` to the job's last task (the one that finishes it): the scan record is visible while the job
    runs, then overwritten. So the test watches during the job, not only after it.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.names: dict[str, set[str]] = {}
        self.answers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> dict[str, dict]:
        response = requests.get(f"{self.base}/api/tasks", auth=CREDENTIALS, timeout=5)
        response.raise_for_status()
        self.answers.append(response.text)
        tasks = response.json()
        for uuid, task in tasks.items():
            if task.get("name"):
                self.names.setdefault(uuid, set()).add(task["name"])
        return tasks

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except requests.RequestException:
                pass
            self._stop.wait(0.05)  # the scan record lives only until the job ends (see above)

    def __enter__(self) -> "FlowerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def job_tasks(self, job_id: str, timeout: float = 60) -> dict[str, dict]:
        """Poll until every task of the job has finished, as Flower saw it (scan, transcode, media)."""
        deadline = time.monotonic() + timeout
        tasks: dict[str, dict] = {}
        while time.monotonic() < deadline:
            tasks = {uuid: task for uuid, task in self.poll().items() if uuid == job_id or job_id in json.dumps(task)}
            stages = {name.split(".")[1] for uuid in tasks for name in self.names.get(uuid, ())}
            if {"scan", "transcode", "media"} <= stages and all(t.get("state") == "SUCCESS" for t in tasks.values()):
                return tasks
            time.sleep(0.5)
        pytest.fail(f"Flower never showed the job's finished scan/transcode/media tasks; it saw: {tasks}")


@pytest.mark.slow
def test_flower_shows_the_job_by_stage_without_patient_identifiers(flower_url, spool, tmp_path):
    unauthenticated = requests.get(f"{flower_url}/api/tasks", timeout=5)
    assert unauthenticated.status_code == 401
    wrong = requests.get(f"{flower_url}/api/tasks", auth=("desk", "guess"), timeout=5)
    assert wrong.status_code == 401
    assert requests.get(f"{flower_url}/", timeout=5).status_code == 401  # the dashboard too

    study = tmp_path / "study"
    build_study(study, StudySpec(images=32, patient_name=PATIENT_NAME, patient_id=PATIENT_ID))
    assert PATIENT_ID.encode() in next(study.glob("*.dcm")).read_bytes()  # the check below is not vacuous
    with FlowerWatch(flower_url) as watch:
        job_id = submit("export", {"source": {"folder": str(study)}, "syntax": "jpeg-lossless",
                                   "out_dir": str(tmp_path / "out"), "batch_size": 4})
        wait(job_id, timeout=300)
        tasks = watch.job_tasks(job_id)

    names = {name for uuid in tasks for name in watch.names[uuid]}
    assert "discflow.scan.export" in watch.names[job_id], watch.names[job_id]
    assert all(name.startswith(("discflow.scan.", "discflow.transcode.", "discflow.media.")) for name in names), names
    assert sum(task["name"].startswith("discflow.transcode.") for task in tasks.values()) == 8  # 32 images, 4 a batch
    details = []
    for uuid in tasks:
        detail = requests.get(f"{flower_url}/api/task/info/{uuid}", auth=CREDENTIALS, timeout=5)
        assert detail.status_code == 200
        details.append(detail.text)
    seen = "\n".join(watch.answers + details).lower()
    assert job_id.lower() in seen
    for identifier in (PATIENT_NAME, PATIENT_ID, "SECRET", "FLOWER^", "FLW-"):
        assert identifier.lower() not in seen, f"{identifier!r} is visible in Flower"

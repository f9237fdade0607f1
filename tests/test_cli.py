"""The `discflow` command as an operator meets it: exit codes, one-line errors, JSON summary."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.corpus import StudySpec, build_study


def discflow(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_missing_source_is_a_one_line_error():
    result = discflow("export", "--source", "/nonexistent/study", "--out", "/tmp/x")
    assert result.returncode == 2
    assert "source folder not found: /nonexistent/study" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_unknown_syntax_is_refused():
    result = discflow("export", "--source", ".", "--syntax", "jpeg2000-magic")
    assert result.returncode == 2 and "unknown --syntax" in result.stderr


def test_empty_source_fails_clearly_on_the_embedded_default(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    result = discflow("export", "--source", str(empty), "--out", str(tmp_path / "out"),
                      env={"DISCFLOW_SPOOL_DIR": str(tmp_path / "spool")})
    assert result.returncode == 1
    assert "no DICOM instances found in the source (1 files skipped)" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_summary_on_the_embedded_default_lists_skipped_files(tmp_path):
    study = tmp_path / "study"
    build_study(study, StudySpec(images=12, patient_name="CLI^TEST", patient_id="CLI-1"))
    (study / "AUTORUN.INF").write_text("[autorun]\nopen=viewer.exe\n")
    result = discflow("export", "--source", str(study), "--syntax", "jpeg-lossless", "--out", str(tmp_path / "out"),
                      "--json", env={"DISCFLOW_SPOOL_DIR": str(tmp_path / "spool")})
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded"
    assert summary["instances"] == {"total": 12, "written": 12, "failed": 0}
    assert set(summary["stages"]) >= {"scan", "transcode", "media"}
    for stage in ("scan", "transcode", "media"):
        assert {"seconds", "task_seconds", "bytes_in", "bytes_out"} <= set(summary["stages"][stage])
    assert summary["stages"]["transcode"]["instances"] == 12
    [volume] = summary["volumes"]
    assert Path(volume["path"]).stat().st_size == volume["bytes"] and volume["instances"] == 12
    assert [Path(s["file"]).name for s in summary["skipped"]] == ["AUTORUN.INF"]


def test_import_list_shows_the_disc(tmp_path):
    study = tmp_path / "study"
    build_study(study, StudySpec(images=4, patient_name="LIST^TEST", patient_id="LST-1"))
    result = discflow("import", str(study), "--list", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["instances"] == 4
    assert listing["patients"][0]["id"] == "LST-1"
    assert listing["syntaxes"] == {"Explicit VR Little Endian": 4}


def test_worker_needs_a_broker():
    result = discflow("worker", env={"DISCFLOW_BROKER_URL": ""})
    assert result.returncode == 2 and "DISCFLOW_BROKER_URL" in result.stderr


@pytest.mark.parametrize("command", ["export", "import", "demo", "worker"])
def test_every_command_has_worked_examples_in_its_help(command):
    result = discflow(command, "--help")
    assert result.returncode == 0 and ("Example" in result.stdout or "discflow " in result.stdout)


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        found.update(int(child) for child in children)
        pending.extend(int(child) for child in children)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_embedded_redis_and_workers(tmp_path):
    """An operator's `kill` (or a service manager's stop) leaves no Redis or worker behind."""
    study = tmp_path / "study"
    build_study(study, StudySpec(images=200, patient_name="TERM^TEST", patient_id="TERM-1"))
    command = [sys.executable, "-m", "orchestration.cli", "export", "--source", str(study), "--syntax",
               "uncompressed", "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, env={**os.environ, "DISCFLOW_SPOOL_DIR": str(tmp_path / "spool")},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    started: set[int] = set()
    while time.monotonic() < deadline and process.poll() is None:
        started = _descendants(process.pid)
        if len(started) >= 3:  # Redis, the worker and its pool: the job is running
            break
        time.sleep(0.1)
    assert len(started) >= 3, "the embedded Redis and worker did not start"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in started):
        time.sleep(0.1)
    assert not [pid for pid in started if _alive(pid)], "processes left running after SIGTERM"


def test_a_command_started_under_nohup_keeps_ignoring_sighup():
    """`nohup discflow export ... &` must survive the operator logging out."""
    probe = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
             "import orchestration.cli as cli; cli.cli = lambda **_: None; cli.main()\n"
             "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,"
             " signal.getsignal(signal.SIGTERM) is cli._stop_on_signal)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]

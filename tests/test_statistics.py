"""`discflow stats` on SQLite and on the machine's PostgreSQL: a ledger with known jobs over several
months, and exact counts, syntax shares, means and nearest-rank p95 (the ceil(0.95 n)-th smallest)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from ledger_databases import ledger_url  # noqa: F401 — fixture
from orchestration.ledger import Ledger
from orchestration.ledger_schema import Job
from orchestration.statistics import ledger_statistics, nearest_rank
from orchestration.statistics_plot import plot_statistics

UTC = timezone.utc
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
JPEG_LOSSLESS, J2K_LOSSLESS = "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90"


def add_job(ledger: Ledger, job_id: str, kind: str, created: datetime, policy: str, *, wall: float,
            state: str = "succeeded", instances: int = 10, size: int = 1_000_000, transcode: float = 1.0,
            syntaxes: dict[str, int] | None = None, runs: int = 1) -> None:
    """One job through the Ledger API; then its timestamps set to known values (the API stamps 'now')."""
    request = {"syntax": policy, "out_dir": "/out"} if kind == "export" else {"send": policy, "medium": "/d.iso"}
    ledger.create_job(job_id, kind, request, "normal", "test")
    started = created + timedelta(seconds=3)
    ledger.mark_running(job_id, started)
    begin = started.timestamp()
    for task_id, stage, offset, seconds in (("s", "scan", 0.0, 0.5), ("t1", "transcode", 0.5, transcode / 2),
                                            ("t2", "transcode", 0.5 + transcode / 4, transcode * 3 / 4),
                                            ("m", "media" if kind == "export" else "store", 0.5 + transcode, 0.25)):
        ledger.record_task({"job_id": job_id, "task_id": task_id, "name": f"discflow.{stage}.batch", "stage": stage,
                            "worker": "w1", "started": begin + offset, "finished": begin + offset + seconds,
                            "queue_wait": 0.1, "instances": instances, "bytes_in": size, "bytes_out": size})
    if state == "failed":
        ledger.fail_job(job_id, "scan: no DICOM instances found")
    else:
        done = "written" if kind == "export" else "stored"
        ledger.finish_job(job_id, {"status": state, "instances": {"total": instances, done: instances, "failed": 0},
                                   **({"syntaxes": syntaxes} if syntaxes else {})})
        ledger.set_bytes(job_id, size)
    with ledger.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(created_at=created, started_at=started,
                                                                   finished_at=started + timedelta(seconds=wall),
                                                                   runs=runs))


@pytest.fixture
def department(ledger_url) -> Ledger:
    """Dec 2025 to Mar 2026 with an empty February:
    - 20 'uncompressed' exports, wall 1..20 s, transcode span 0.5..10 s (12 in January, 8 in March);
    - March: a 'keep' export of 8 s, a failed 'keep' export, a resumed 'keep' export (left out of times);
    - imports: negotiate 12 s (Dec), negotiate 18 s and a partial 'keep' one (March)."""
    ledger = Ledger(ledger_url)
    for n in range(1, 21):
        created = datetime(2026, 1, n, 9, 0, tzinfo=UTC) if n <= 12 else datetime(2026, 3, n, 14, 0, tzinfo=UTC)
        add_job(ledger, f"ex{n:02d}", "export", created, "uncompressed", wall=float(n), transcode=n / 2)
    march = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    add_job(ledger, "ex-keep", "export", march, "keep", wall=8.0)
    add_job(ledger, "ex-failed", "export", march, "keep", wall=1.0, state="failed", instances=0, size=0)
    add_job(ledger, "ex-resumed", "export", march, "keep", wall=500.0, runs=2)
    add_job(ledger, "im-dec", "import", datetime(2025, 12, 31, 23, 30, tzinfo=UTC), "negotiate", wall=12.0,
            instances=90, size=9_000_000, syntaxes={JPEG_LOSSLESS: 60, EXPLICIT: 30})
    add_job(ledger, "im-mar", "import", march, "negotiate", wall=18.0, instances=60, size=6_000_000,
            syntaxes={EXPLICIT: 50, J2K_LOSSLESS: 10})
    add_job(ledger, "im-partial", "import", march, "keep", wall=30.0, state="partial", instances=40,
            size=4_000_000, syntaxes={IMPLICIT: 50})
    return ledger


def test_jobs_per_month_with_the_empty_month_shown(department):
    periods = ledger_statistics(department, by="month")["periods"]
    assert [p["period"] for p in periods] == ["2025-12", "2026-01", "2026-02", "2026-03"]
    december, january, february, march = periods
    assert december["import"] == {"jobs": 1, "succeeded": 1, "instances": 90, "bytes": 9_000_000}
    assert december["export"]["jobs"] == 0
    assert january["export"] == {"jobs": 12, "succeeded": 12, "instances": 120, "bytes": 12_000_000}
    assert february == {"period": "2026-02", "export": {"jobs": 0, "succeeded": 0, "instances": 0, "bytes": 0},
                        "import": {"jobs": 0, "succeeded": 0, "instances": 0, "bytes": 0}}
    assert march["export"] == {"jobs": 11, "succeeded": 10, "instances": 100, "bytes": 10_000_000}
    assert march["import"] == {"jobs": 2, "succeeded": 1, "instances": 100, "bytes": 10_000_000}


def test_jobs_per_year_and_since(department):
    years = ledger_statistics(department, by="year")["periods"]
    assert [(y["period"], y["export"]["jobs"], y["import"]["jobs"]) for y in years] == [("2025", 0, 1), ("2026", 23, 2)]
    since = ledger_statistics(department, by="month", since=date(2026, 2, 1))
    assert [p["period"] for p in since["periods"]] == ["2026-03"]
    assert {row["uid"]: row["instances"] for row in since["syntaxes"]} == {EXPLICIT: 50, IMPLICIT: 50, J2K_LOSSLESS: 10}


def test_transfer_syntaxes_on_imported_media(department):
    syntaxes = ledger_statistics(department)["syntaxes"]
    assert [(s["uid"], s["instances"], s["percent"], s["discs"]) for s in syntaxes] == [
        (EXPLICIT, 80, 40.0, 2), (JPEG_LOSSLESS, 60, 30.0, 1), (IMPLICIT, 50, 25.0, 1), (J2K_LOSSLESS, 10, 5.0, 1)]
    assert syntaxes[0]["name"] == "Explicit VR Little Endian"
    assert syntaxes[1]["name"].startswith("JPEG Lossless, Non-Hierarchical, First-Order Prediction")


def test_mean_and_nearest_rank_p95_per_kind_and_policy(department):
    rows = {(r["kind"], r["policy"]): r for r in ledger_statistics(department)["stage_times"]}
    assert list(rows) == [("export", "keep"), ("export", "uncompressed"), ("import", "negotiate")]
    uncompressed = rows[("export", "uncompressed")]
    assert uncompressed["jobs"] == 20
    assert (uncompressed["mean_seconds"], uncompressed["p95_seconds"]) == (10.5, 19.0)  # wall 1..20 s
    transcode = uncompressed["stages"]["transcode"]  # span 0.5..10 s
    assert (transcode["jobs"], transcode["mean_seconds"], transcode["p95_seconds"]) == (20, 5.25, 9.5)
    assert uncompressed["stages"]["scan"] == {"jobs": 20, "mean_seconds": 0.5, "p95_seconds": 0.5}
    assert list(uncompressed["stages"]) == ["scan", "transcode", "media"]
    keep = rows[("export", "keep")]  # the failed and the resumed job are left out
    assert (keep["jobs"], keep["mean_seconds"], keep["p95_seconds"]) == (1, 8.0, 8.0)
    imports = rows[("import", "negotiate")]
    assert (imports["jobs"], imports["mean_seconds"], imports["p95_seconds"]) == (2, 15.0, 18.0)
    assert list(imports["stages"]) == ["scan", "transcode", "store"]


def test_nearest_rank_percentile():
    assert nearest_rank(list(range(1, 21)), 95) == 19  # ceil(19.0): not 19.05 (linear), not 20 (max)
    assert nearest_rank(list(range(1, 22)), 95) == 20  # ceil(19.95)
    assert nearest_rank([3.0], 95) == 3.0


def test_plot_is_a_png_a_person_can_read(department, tmp_path):
    path = plot_statistics(ledger_statistics(department), tmp_path / "stats.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1500, 1000) and 30_000 < len(data) < 2_000_000


def test_an_empty_ledger_gives_empty_tables_and_still_a_picture(ledger_url, tmp_path):
    statistics = ledger_statistics(Ledger(ledger_url))
    assert statistics == {"periods": [], "syntaxes": [], "stage_times": []}
    assert plot_statistics(statistics, tmp_path / "empty.png").stat().st_size > 10_000


def discflow(*args: str, database: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DISCFLOW_DATABASE_URL": database}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_json_prints_the_same_numbers_and_the_table_and_plot(department, tmp_path):
    result = discflow("stats", "--by", "year", "--json", "--plot", str(tmp_path / "s.png"), database=department.url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ledger_statistics(department, by="year")
    assert (tmp_path / "s.png").stat().st_size > 30_000
    table = discflow("stats", "--since", "2026-01-01", database=department.url)
    assert table.returncode == 0, table.stderr
    assert "2026-03" in table.stdout and "2025-12" not in table.stdout and "Explicit VR Little Endian" in table.stdout
    assert "10.50/19.00" in table.stdout and "Import seconds" in table.stdout


def test_cli_refuses_a_bad_period_or_day(tmp_path):
    for args, message in ((("--by", "week"), "unknown --by 'week'"), (("--since", "March"), "YYYY-MM-DD")):
        result = discflow("stats", *args, database=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr

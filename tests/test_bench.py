"""`discflow bench` on a tiny corpus: every row is measured, discflow delivers every instance.

Not a timed test: the figures are for docs/performance.md, measured on a quiet machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require_tools
from orchestration.benchmark_report import EXPORT_ROWS, IMPORT_ROWS, PACS
from orchestration.local_peers import find_binary

pytestmark = [pytest.mark.peers, pytest.mark.slow]
IMAGES = 20
BATCH_SIZES = (1, 25)
"""Two of the default five keep the test under a minute; the full set runs in `discflow bench`."""


def expected_keys() -> set[str]:
    keys = {f"export/{row}/{tool}" for row in EXPORT_ROWS for tool in ("discflow", "dcmtk", "orthanc-media")}
    keys |= {f"import/{row}/{tool}@{pacs}" for row in IMPORT_ROWS for tool in ("discflow", "dcmsend") for pacs in PACS}
    keys |= {f"node/keep/discflow@{pacs}" for pacs in PACS} | {"import/jpeg-keep-iso/discflow@nodelay"}
    keys |= {"embedded/keep/discflow-cli", "scaling/uncompressed/workers=1", "scaling/uncompressed/workers=2",
             "overhead/keep/inline", "overhead/keep/celery", "scaling/cpu-loop/processes=1",
             "scaling/cpu-loop/processes=2"}
    keys |= {f"overhead/batch={size}/{tool}" for size in BATCH_SIZES for tool in ("inline", "celery-1", "celery-2")}
    return keys


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_tools("dcmdjpeg", "dcmmkdir", "dcmsend", "xorriso")
    if find_binary("Orthanc", "/usr/sbin/Orthanc") is None:
        pytest.skip("Orthanc is not installed (Debian package 'orthanc')")
    folder = tmp_path_factory.mktemp("bench")
    environment = {key: value for key, value in os.environ.items() if key != "DISCFLOW_BROKER_URL"}
    environment["DISCFLOW_SPOOL_DIR"] = str(folder / "spool")  # the bench's corpus and scratch go beside it
    command = [sys.executable, "-m", "orchestration.cli", "bench", "--images", str(IMAGES), "--runs", "1",
               "--workers", "2", "--batch-sizes", ",".join(map(str, BATCH_SIZES)),
               "--json", str(folder / "bench.json"), "--markdown", str(folder / "bench.md")]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "**Table 2" in finished.stdout and "**Table 3" in finished.stdout
    assert finished.stdout.rfind("\n**") == finished.stdout.find("\n**Ratios**"), "ratios are printed last"
    assert (folder / "bench.md").read_text() == finished.stdout
    assert (folder / "spool").parent.joinpath("bench-corpus").is_dir(), "the corpus is cached beside the spool"
    return json.loads((folder / "bench.json").read_text())


def test_every_row_is_measured_with_positive_times(report):
    rows = {row["key"]: row for row in report["measurements"]}
    assert expected_keys() <= set(rows), sorted(expected_keys() - set(rows))
    for key, row in rows.items():
        assert row["runs"] and all(run["seconds"] > 0 for run in row["runs"]), key
        assert row["median_seconds"] > 0, key


def test_discflow_exports_and_imports_every_instance(report):
    for row in report["measurements"]:
        if row["tool"].startswith(("discflow", "celery", "inline", "workers")):
            assert row["expected_instances"] == IMAGES, row["key"]
            assert row["complete"], (row["key"], [run["instances"] for run in row["runs"]])
    imports = [row for row in report["measurements"] if row["table"] == "import"]
    assert all(run["instances"] == IMAGES for row in imports for run in row["runs"]), "checked in Orthanc"


def test_corpus_is_realistic_and_ratios_are_reported(report):
    corpus = report["corpus"]
    assert corpus["images"] == IMAGES
    assert 2.0 <= corpus["ratio"] <= 3.5, "JPEG lossless ratio near real CT"
    names = {ratio["name"] for ratio in report["ratios"]}
    assert {"export keep", "export uncompressed", "import jpeg-keep (nodelay PACS)"} <= names
    assert all(ratio["ratio"] > 0 for ratio in report["ratios"])
    assert report["overhead"]["best_batch_size"]["batch_size"] in BATCH_SIZES
    assert report["scaling"]["speedup"] > 0
    assert report["scaling"]["machine_speedup"] > 0, "the machine's own ceiling is measured beside it"

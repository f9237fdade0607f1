"""Batch files: many jobs in one CSV (header row) or YAML list, checked before any is submitted."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.reconcile import RulesError

EXPORT_KEYS = {"source", "from_node", "patient_id", "study_uid", "accession", "syntax", "out", "volume_capacity",
               "batch_size", "profile", "media", "report", "viewer", "hot_folder", "robot", "burn_device"}
IMPORT_KEYS = {"disc", "to", "send", "rules", "study"}
PATH_KEYS = {"source", "out", "report", "viewer", "hot_folder", "disc", "rules"}
LIST_KEYS = {"study_uid", "study"}
INT_KEYS = {"volume_capacity", "batch_size"}


class BatchError(ValueError):
    """A batch file that cannot be read, or a row that would fail; names the line."""


@dataclass
class BatchJob:
    line: int
    kind: str
    request: dict[str, Any]
    priority: str


def read_batch(path: Path, default_priority: str = "batch") -> list[BatchJob]:
    """Every row checked (the same checks as the export/import commands) before anything runs."""
    rows = _rows(path)
    if not rows:
        raise BatchError(f"{path}: no jobs in the file")
    return [_job(number, row, default_priority) for number, row in rows]


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise BatchError(f"batch file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            loaded = yaml.safe_load(text) or []
        except yaml.YAMLError as error:
            raise BatchError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(loaded, list) or not all(isinstance(item, dict) for item in loaded):
            raise BatchError(f"{path}: expected a list of jobs (mappings)")
        return [(number, item) for number, item in enumerate(loaded, start=1)]
    reader = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return [(number, {k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()})
            for number, row in enumerate(reader, start=2)]


def _job(line: int, row: dict[str, Any], default_priority: str) -> BatchJob:
    from orchestration.cli import UsageError, export_request, import_request
    kind = str(row.get("kind", "")).strip()
    allowed = {"export": EXPORT_KEYS, "import": IMPORT_KEYS}.get(kind)
    if allowed is None:
        raise BatchError(f"line {line}: kind must be export or import, not {kind!r}")
    options = {k: v for k, v in row.items() if k not in ("kind", "priority")}
    unknown = set(options) - allowed
    if unknown:
        raise BatchError(f"line {line}: unknown {kind} option(s): {', '.join(sorted(unknown))}")
    try:
        build = export_request if kind == "export" else import_request
        request = build(**{key: _typed(key, value) for key, value in options.items()})
    except (UsageError, ValueError, RulesError) as error:
        raise BatchError(f"line {line}: {error}") from error
    return BatchJob(line, kind, request, str(row.get("priority") or default_priority))


def _typed(key: str, value: Any) -> Any:
    if key in PATH_KEYS:
        return Path(str(value))
    if key in LIST_KEYS:
        return value if isinstance(value, list) else [v for v in str(value).split(";") if v]
    if key in INT_KEYS:
        return int(value)
    return str(value)

"""The bench's records, and what it reports: medians, ratios (peer time / discflow time), targets,
the study's Table 2 and Table 3 with peer columns (Markdown), and JSON."""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

Say = Callable[[str], None]


@dataclass
class Run:
    """One timed run of one row."""
    seconds: float
    bytes: int = 0
    instances: int = 0
    """discflow: instances written (export) or found stored in the PACS afterwards (import)."""
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class Measurement:
    """All runs of one row of one table, for one tool (and one PACS set-up for network rows)."""
    table: str
    row: str
    tool: str
    pacs: str = ""
    runs: list[Run] = field(default_factory=list)
    expected_instances: int = 0
    """When set, every run must have delivered this many instances (``complete``)."""

    @property
    def key(self) -> str:
        return f"{self.table}/{self.row}/{self.tool}" + (f"@{self.pacs}" if self.pacs else "")

    @property
    def median(self) -> float:
        return statistics.median(run.seconds for run in self.runs) if self.runs else 0.0

    def median_stages(self) -> dict[str, float]:
        names = {name for run in self.runs for name in run.stages}
        return {name: round(statistics.median(run.stages.get(name, 0.0) for run in self.runs), 3)
                for name in sorted(names, key=_stage_order)}

    @property
    def complete(self) -> bool:
        if not self.expected_instances:
            return True
        return all(run.instances == self.expected_instances for run in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "table": self.table, "row": self.row, "tool": self.tool, "pacs": self.pacs,
                "median_seconds": round(self.median, 3), "median_stages": self.median_stages(),
                "bytes": max((run.bytes for run in self.runs), default=0),
                "expected_instances": self.expected_instances, "complete": self.complete,
                "runs": [asdict(run) for run in self.runs]}


_STAGE_ORDER = ("scan", "transcode", "store", "media", "decompress", "copy", "dicomdir", "iso")


def _stage_order(name: str) -> int:
    return _STAGE_ORDER.index(name) if name in _STAGE_ORDER else len(_STAGE_ORDER)


class Results:
    """The measurements of one bench, keyed by table/row/tool@pacs, in the order first measured."""

    def __init__(self, say: Say) -> None:
        self.rows: dict[str, Measurement] = {}
        self.say = say

    def add(self, template: Measurement, run: Run) -> None:
        row = self.rows.setdefault(template.key, template)
        row.runs.append(run)
        counted = f", {run.instances} instances" if run.instances else ""
        self.say(f"{row.key} run {len(row.runs)}: {run.seconds:.2f} s{counted}")

    def median(self, key: str) -> float:
        row = self.rows.get(key)
        return row.median if row and row.runs else 0.0


# ----------------------------------------------------------------------------- what is compared

PUBLISHED_SECONDS = {
    "export/uncompressed": 161.0, "export/keep": 159.0,
    "import/raw-keep": 24.0, "import/raw-uncompressed": 24.0,
    "import/jpeg-keep": 15.0, "import/jpeg-uncompressed": 51.0,
}
"""The study's Table 2 (2 min 41 s / 2 min 39 s) and Table 3, for a 400-600 image CT/MR study."""

EXPORT_ROWS = {
    "uncompressed": "JPEG-lossless source → uncompressed disc (`--syntax uncompressed`)",
    "keep": "JPEG-lossless source → JPEG-lossless disc (`--syntax keep`)",
}
IMPORT_ROWS = {
    "raw-keep": "uncompressed disc, `--send keep`",
    "raw-uncompressed": "uncompressed disc, `--send uncompressed`",
    "jpeg-keep": "JPEG-lossless disc, sent as is (`--send keep`)",
    "jpeg-uncompressed": "JPEG-lossless disc, decompressed first (`--send uncompressed`)",
}
EXPORT_PEERS = {"uncompressed": ("dcmtk", "orthanc-media"), "keep": ("dcmtk", "orthanc-media")}
PACS = {"nodelay": "Orthanc with TCP_NODELAY=1", "stock": "stock Orthanc (Nagle on)"}


@dataclass
class Ratio:
    name: str
    peer: str
    peer_seconds: float
    discflow_seconds: float
    target: float | None = None
    """The ratio the issue asks for (peer / discflow >= target); None: for information."""

    @property
    def value(self) -> float:
        return self.peer_seconds / self.discflow_seconds if self.discflow_seconds else math.nan

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "peer": self.peer, "peer_seconds": round(self.peer_seconds, 3),
                "discflow_seconds": round(self.discflow_seconds, 3), "ratio": round(self.value, 3),
                "target": self.target, "met": self.met}


def ratios(results: Results) -> list[Ratio]:
    """Peer median / discflow median per row (> 1: discflow is faster), then the published times."""
    found: list[Ratio] = []
    for row, label in EXPORT_ROWS.items():
        mine = results.median(f"export/{row}/discflow")
        for peer in EXPORT_PEERS[row]:
            target = 1.0 if peer == "dcmtk" else None
            found.append(Ratio(f"export {row}", _peer_label(peer, row), results.median(f"export/{row}/{peer}"),
                               mine, target))
    for pacs in PACS:
        for row in IMPORT_ROWS:
            target = 1.0 if pacs == "nodelay" else None
            found.append(Ratio(f"import {row} ({pacs} PACS)", "dcmsend (TCP_NODELAY=1)",
                               results.median(f"import/{row}/dcmsend@{pacs}"),
                               results.median(f"import/{row}/discflow@{pacs}"), target))
    for name, published in PUBLISHED_SECONDS.items():
        table, row = name.split("/")
        mine = results.median(f"{name}/discflow@nodelay" if table == "import" else f"{name}/discflow")
        target = 50.0 if name == "export/keep" else (10.0 if table == "import" else None)
        found.append(Ratio(f"{table} {row}", "the study's published time", published, mine, target))
    return [ratio for ratio in found if ratio.peer_seconds and ratio.discflow_seconds]


def _peer_label(peer: str, row: str) -> str:
    if peer == "dcmtk":
        return "dcmdjpeg ×2 + dcmmkdir + xorriso" if row == "uncompressed" else "copy + dcmmkdir + xorriso"
    return "Orthanc /media ZIP" + (" ?transcode=raw" if row == "uncompressed" else "")


# --------------------------------------------------------------------------- scaling, overhead


def scaling(results: Results, concurrency: int) -> dict[str, Any]:
    """The export's speed-up on N processes, and the machine's own for a plain CPU-bound loop."""
    one = results.median("scaling/uncompressed/workers=1")
    many = results.median(f"scaling/uncompressed/workers={concurrency}")
    loop_one = results.median("scaling/cpu-loop/processes=1")
    loop_many = results.median(f"scaling/cpu-loop/processes={concurrency}")
    return {"processes": concurrency, "one_seconds": round(one, 3), "many_seconds": round(many, 3),
            "speedup": round(one / many, 3) if many else None, "target": 1.6,
            "met": (one / many >= 1.6) if many else None,
            "machine_speedup": round(loop_one / loop_many, 3) if loop_many else None}


def overhead(results: Results, batch_sizes: tuple[int, ...], images: int, concurrency: int) -> dict[str, Any]:
    """Celery + Redis against the same stage functions in one process, per batch size, and a fitted
    fixed + per-task cost; the keep export's overhead against the 15 % target."""
    rows = []
    for size in batch_sizes:
        inline = results.median(f"overhead/batch={size}/inline")
        one = results.median(f"overhead/batch={size}/celery-1")
        many = results.median(f"overhead/batch={size}/celery-{concurrency}")
        rows.append({"batch_size": size, "tasks": math.ceil(images / size), "inline_seconds": round(inline, 3),
                     "celery_1_seconds": round(one, 3), f"celery_{concurrency}_seconds": round(many, 3),
                     "overhead_1_percent": round(100 * (one - inline) / inline, 1) if inline else None})
    fixed, per_task = _fit([(row["tasks"], row["celery_1_seconds"] - row["inline_seconds"]) for row in rows])
    keep_inline, keep_celery = results.median("overhead/keep/inline"), results.median("overhead/keep/celery")
    keep_percent = 100 * (keep_celery - keep_inline) / keep_inline if keep_inline else None
    return {"rows": rows, "fixed_seconds": round(fixed, 4), "per_task_seconds": round(per_task, 5),
            "keep": {"inline_seconds": round(keep_inline, 3), "celery_seconds": round(keep_celery, 3),
                     "overhead_percent": round(keep_percent, 1) if keep_percent is not None else None,
                     "target_percent": 15.0, "met": keep_percent <= 15.0 if keep_percent is not None else None},
            "best_batch_size": _best_batch(rows, concurrency)}


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares: extra seconds = fixed + per_task × tasks."""
    if len(points) < 2:
        return (points[0][1] if points else 0.0), 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def _best_batch(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """The batch size with the lowest wall time on every core, and the sizes within 5 % of it."""
    column = f"celery_{concurrency}_seconds"
    timed = [row for row in rows if row[column]]
    if not timed:
        return {}
    best = min(timed, key=lambda row: row[column])
    close = [row["batch_size"] for row in timed if row[column] <= best[column] * 1.05]
    return {"batch_size": best["batch_size"], "seconds": best[column], "within_5_percent": close}


# ------------------------------------------------------------------------------------- output


def report_json(results: Results, context: dict[str, Any]) -> dict[str, Any]:
    images, concurrency = context["corpus"]["images"], context["options"]["concurrency"]
    batch_sizes = tuple(context["options"]["batch_sizes"])
    return {**context, "measurements": [row.to_json() for row in results.rows.values()],
            "scaling": scaling(results, concurrency),
            "overhead": overhead(results, batch_sizes, images, concurrency),
            "ratios": [ratio.to_json() for ratio in ratios(results)]}


def markdown(report: dict[str, Any]) -> str:
    """The tables in the study's shapes with peer columns; ratios last."""
    rows = {row["key"]: row for row in report["measurements"]}
    parts = [_header(report), _table2(rows, report), _table3(rows), _node_table(rows), _embedded(rows),
             _scaling_table(report["scaling"]), _overhead_table(report["overhead"], report["options"]["concurrency"]),
             _ratio_list(report["ratios"])]
    return "\n\n".join(part for part in parts if part) + "\n"


def _s(row: dict[str, Any] | None) -> str:
    return f"{row['median_seconds']:.2f}" if row else "—"


def _stages(row: dict[str, Any] | None) -> str:
    if not row or not row["median_stages"]:
        return "—"
    return " / ".join(f"{value:.2f}" for value in row["median_stages"].values())


def _ratio(peer: dict[str, Any] | None, mine: dict[str, Any] | None) -> str:
    if not peer or not mine or not mine["median_seconds"]:
        return "—"
    return f"**{peer['median_seconds'] / mine['median_seconds']:.2f}**"


def _header(report: dict[str, Any]) -> str:
    corpus, options, machine = report["corpus"], report["options"], report["machine"]
    return (f"Corpus: {corpus['images']} {corpus['modality']} images, {corpus['raw_bytes'] / 1e6:.0f} MB uncompressed, "
            f"{corpus['jpeg_bytes'] / 1e6:.0f} MB JPEG lossless (ratio {corpus['ratio']:.2f}:1). "
            f"Medians of {options['runs']} runs; steady state: one Redis and one worker with "
            f"{options['concurrency']} processes already running. Machine: {machine['cpus']} CPUs, "
            f"{machine['platform']}{_steal(machine)}. Ratio = peer time / discflow time (> 1: discflow is faster).")


def _steal(machine: dict[str, Any]) -> str:
    steal = machine.get("cpu_steal_percent")
    return "" if steal is None else f"; CPU time taken by the hypervisor for other guests during the run: {steal:.1f} %"


def _table2(rows: dict[str, dict[str, Any]], report: dict[str, Any]) -> str:
    lines = ["**Table 2 — export to a disc image** (seconds; stages: scan / transcode / media; "
             "DCMTK: decode-or-copy / dcmmkdir / xorriso)", "",
             "| source → disc | discflow s | MB | discflow stages | DCMTK s | DCMTK stages | ratio | "
             "Orthanc media ZIP s | ratio | study s | study / discflow |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for row, label in EXPORT_ROWS.items():
        mine, dcmtk = rows.get(f"export/{row}/discflow"), rows.get(f"export/{row}/dcmtk")
        orthanc = rows.get(f"export/{row}/orthanc-media")
        published = PUBLISHED_SECONDS[f"export/{row}"]
        size = f"{mine['bytes'] / 1e6:.0f}" if mine else "—"
        lines.append(f"| {label} | {_s(mine)} | {size} | {_stages(mine)} | {_s(dcmtk)} | {_stages(dcmtk)} | "
                     f"{_ratio(dcmtk, mine)} | {_s(orthanc)} | {_ratio(orthanc, mine)} | {published:.0f} | "
                     f"{_published_ratio(published, mine)} |")
    return "\n".join(lines)


def _published_ratio(published: float, mine: dict[str, Any] | None) -> str:
    return f"{published / mine['median_seconds']:.0f}×" if mine and mine["median_seconds"] else "—"


def _table3(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["**Table 3 — import by C-STORE into Orthanc on loopback** (seconds; stages: scan / transcode / store)",
             "", "| disc, send mode | discflow s | discflow stages | dcmsend s | ratio | "
             "discflow s, stock PACS | dcmsend s, stock PACS | ratio | study s | study / discflow |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, label in IMPORT_ROWS.items():
        fast, fast_peer = rows.get(f"import/{row}/discflow@nodelay"), rows.get(f"import/{row}/dcmsend@nodelay")
        stock, stock_peer = rows.get(f"import/{row}/discflow@stock"), rows.get(f"import/{row}/dcmsend@stock")
        published = PUBLISHED_SECONDS[f"import/{row}"]
        lines.append(f"| {label} | {_s(fast)} | {_stages(fast)} | {_s(fast_peer)} | {_ratio(fast_peer, fast)} | "
                     f"{_s(stock)} | {_s(stock_peer)} | {_ratio(stock_peer, stock)} | {published:.0f} | "
                     f"{_published_ratio(published, fast)} |")
    lines.append("")
    lines.append("Both read the disc as a mounted drive shows it (a folder; dcmsend `+rd` via its DICOMDIR). "
                 "First PACS: Orthanc with TCP_NODELAY=1 in its environment; stock PACS: Orthanc as shipped. "
                 "dcmsend always runs with TCP_NODELAY=1; `-dn` sends as stored, `+dls` decompresses.")
    iso = rows.get("import/jpeg-keep-iso/discflow@nodelay")
    if iso:
        lines.append(f"discflow from the `.iso` file itself (pycdlib, never mounted), JPEG-lossless disc, keep: "
                     f"{_s(iso)} s (stages {_stages(iso)}).")
    return "\n".join(lines)


def _node_table(rows: dict[str, dict[str, Any]]) -> str:
    found = [(pacs, rows.get(f"node/keep/discflow@{pacs}")) for pacs in PACS]
    if not any(row for _, row in found):
        return ""
    lines = ["**Export from a node** (C-FIND by patient ID + C-GET, `--syntax keep`; stages: scan / transcode / media)",
             "", "| PACS | discflow s | MB | stages |", "|---|---:|---:|---|"]
    for pacs, row in found:
        size = f"{row['bytes'] / 1e6:.0f}" if row else "—"
        lines.append(f"| {PACS[pacs]} | {_s(row)} | {size} | {_stages(row)} |")
    return "\n".join(lines)


def _embedded(rows: dict[str, dict[str, Any]]) -> str:
    embedded, steady = rows.get("embedded/keep/discflow-cli"), rows.get("export/keep/discflow")
    if not embedded:
        return ""
    stages = embedded["median_stages"]
    return (f"**Embedded default**: `discflow export --syntax keep` as a fresh process with no broker configured "
            f"(starts Redis and a worker, exports, stops them): {_s(embedded)} s, against {_s(steady)} s in the "
            f"steady state; of which {stages.get('runtime_and_job', 0):.2f} s from starting Redis to the summary, "
            f"{stages.get('imports_and_shutdown', 0):.2f} s interpreter start-up, imports and shutdown.")


def _scaling_table(result: dict[str, Any]) -> str:
    if not result["one_seconds"]:
        return ""
    verdict = "met" if result["met"] else "missed"
    return ("**Scaling** (`--syntax uncompressed`, JPEG-lossless source)\n\n| worker processes | s | speed-up |\n"
            f"|---:|---:|---:|\n| 1 | {result['one_seconds']:.2f} | 1.00 |\n"
            f"| {result['processes']} | {result['many_seconds']:.2f} | {result['speedup']:.2f} |\n\n"
            f"Target ≥ {result['target']}× with two processes: {verdict}.{_machine_ceiling(result)}")


def _machine_ceiling(result: dict[str, Any]) -> str:
    ceiling = result.get("machine_speedup")
    if not ceiling:
        return ""
    return (f" This machine's own ceiling, a plain CPU-bound loop timed between the runs: "
            f"{result['processes']} processes at once were {ceiling:.2f}× as fast as one "
            f"(the export reached {result['speedup'] / ceiling:.0%} of that).")


def _overhead_table(result: dict[str, Any], concurrency: int) -> str:
    if not any(row.get("inline_seconds") for row in result["rows"]):  # scaling not measured (--only)
        return ""
    lines = ["**Per-task overhead** (`--syntax uncompressed`: same stage functions in one process vs the "
             "Celery canvas on Redis)", "",
             f"| batch size | transcode tasks | one process, no Celery s | Celery, 1 process s | overhead | "
             f"Celery, {concurrency} processes s |", "|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        percent = f"{row['overhead_1_percent']:+.1f} %" if row["overhead_1_percent"] is not None else "—"
        lines.append(f"| {row['batch_size']} | {row['tasks']} | {row['inline_seconds']:.2f} | "
                     f"{row['celery_1_seconds']:.2f} | {percent} | {row[f'celery_{concurrency}_seconds']:.2f} |")
    keep, best = result["keep"], result["best_batch_size"]
    lines += ["", f"Fitted canvas cost: {result['fixed_seconds'] * 1000:.0f} ms per job + "
                  f"{result['per_task_seconds'] * 1000:.1f} ms per transcode task."]
    if keep["inline_seconds"]:
        lines.append(f"`--syntax keep` (no transcode task): {keep['inline_seconds']:.2f} s in one process, "
                     f"{keep['celery_seconds']:.2f} s through Celery ({keep['overhead_percent']:+.1f} %, "
                     f"target ≤ {keep['target_percent']:.0f} %).")
    if best:
        lines.append(f"Fastest on {concurrency} processes: batch size {best['batch_size']} "
                     f"({best['seconds']:.2f} s); within 5 %: {', '.join(map(str, best['within_5_percent']))}.")
    return "\n".join(lines)


def _ratio_list(found: list[dict[str, Any]]) -> str:
    lines = ["**Ratios** (peer or published time / discflow time, medians; target in brackets)", ""]
    for ratio in found:
        target = f" [≥ {ratio['target']:g}: {'met' if ratio['met'] else 'MISSED'}]" if ratio["target"] else ""
        lines.append(f"- {ratio['name']}: {ratio['peer']} {ratio['peer_seconds']:.2f} s / discflow "
                     f"{ratio['discflow_seconds']:.2f} s = **{ratio['ratio']:.2f}**{target}")
    return "\n".join(lines)

"""`discflow bench`: the source study's Table 2 (export) and Table 3 (import), measured beside DCMTK
and Orthanc in the same run on the same files, plus scaling and per-task overhead.

Everything discflow does here goes through the product's own path: ``orchestration.jobs.submit``
and ``wait`` on one Redis with local worker processes that stay up for the whole bench (the steady
state a department runs), stage timings from ``workers.timing``. The embedded default (private
Redis and workers started by the CLI) is measured once per run as a subprocess, start-up included.

The peers (DCMTK pipelines, Orthanc's media ZIP, dcmsend) are in ``benchmark_peers``; medians,
ratios and the Markdown tables in ``benchmark_report``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from orchestration import benchmark_peers as peers
from orchestration.benchmark_report import Measurement, Results, Run, Say, report_json
from orchestration.corpus import StudySpec, build_study
from orchestration.local_peers import OrthancPeer, start_orthanc
from orchestration.jobs import new_job_id, submit, wait
from orchestration.summary import EXPORT_STAGES, IMPORT_STAGES, job_summary
from tasks import transfer_syntax
from tasks.spool import JobSpool, read_json
from workers.app import app, use_broker
from workers.embedded import EmbeddedRedis, LocalWorkers
from workers.settings import get_settings, reload_settings
from workers.timing import read_timings

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
BENCH_PATIENT_ID = "DF-BENCH-0001"
"""Synthetic; still never printed or logged (the rule for patient IDs holds in benchmarks too)."""
CORPUS_VERSION = 1
"""Bump when the corpus recipe changes, so cached corpora are rebuilt."""
REAL_CT_RATIOS = (2.0, 3.5)
"""JPEG-lossless compression ratios of real CT; the corpus should land inside."""


BENCH_PARTS = ("export", "import", "node", "embedded", "scaling")


@dataclass
class BenchOptions:
    images: int = 500
    modality: str = "CT"
    workers: int = 0
    """Pool processes of the steady-state worker (0: one per CPU)."""
    runs: int = 3
    corpus_dir: Path | None = None
    """Where corpora are cached (default: bench-corpus/ beside the spool)."""
    batch_sizes: tuple[int, ...] = (1, 10, 25, 50, 200)
    profile_html: Path | None = None
    """Also profile the slowest stage (inline) with pyinstrument and write its HTML here."""
    parts: tuple[str, ...] = BENCH_PARTS
    """Which parts to measure (a subset of :data:`BENCH_PARTS`), e.g. only ``import`` after a change."""

    @property
    def concurrency(self) -> int:
        return self.workers or os.cpu_count() or 2


# ------------------------------------------------------------------------------------ corpus


@dataclass
class Corpus:
    """One study in two encodings with the same UIDs: JPEG lossless (the source) and uncompressed."""
    root: Path
    images: int
    modality: str
    jpeg_bytes: int
    raw_bytes: int
    study_instance_uid: str

    @property
    def jpeg_lossless(self) -> Path:
        return self.root / "jpeg-lossless"

    @property
    def uncompressed(self) -> Path:
        return self.root / "uncompressed"

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.jpeg_bytes if self.jpeg_bytes else 0.0


def corpus_home(options: BenchOptions) -> Path:
    return options.corpus_dir or get_settings().spool_dir.parent / "bench-corpus"


def ensure_corpus(options: BenchOptions, say: Say) -> Corpus:
    """The cached corpus for these options, built and verified bit-exact once (outside git)."""
    root = corpus_home(options) / f"{options.modality.lower()}-{options.images}-v{CORPUS_VERSION}"
    marker = root / "corpus.json"
    if marker.exists():
        return Corpus(root=root, **read_json(marker))
    say(f"building the {options.images}-image {options.modality} corpus in {root} (once) ...")
    building = Path(tempfile.mkdtemp(prefix=root.name + "-", dir=_parent(root)))
    try:
        corpus = _build_corpus(building, options)
        (building / "corpus.json").write_text(json.dumps(_corpus_fields(corpus), indent=2))
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)  # whole or not at all: an interrupted build leaves no half corpus
    finally:
        shutil.rmtree(building, ignore_errors=True)
    say(f"corpus: {corpus.images} images, {corpus.raw_bytes / 1e6:.0f} MB uncompressed, "
        f"{corpus.jpeg_bytes / 1e6:.0f} MB JPEG lossless (ratio {corpus.ratio:.2f}:1), every file bit-exact")
    if options.modality == "CT" and not REAL_CT_RATIOS[0] <= corpus.ratio <= REAL_CT_RATIOS[1]:
        say(f"warning: ratio {corpus.ratio:.2f}:1 is outside real CT's {REAL_CT_RATIOS[0]}-{REAL_CT_RATIOS[1]}:1")
    return Corpus(root=root, **read_json(marker))


def _parent(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    return root.parent


def _corpus_fields(corpus: Corpus) -> dict[str, Any]:
    return {key: value for key, value in asdict(corpus).items() if key != "root"}


def _build_corpus(folder: Path, options: BenchOptions) -> Corpus:
    raw, jpeg = folder / "uncompressed", folder / "jpeg-lossless"
    jpeg.mkdir(parents=True)
    # Several series, as a real study has. build_study shifts each slice and adds noise (sd 6), so
    # no two slices are alike and JPEG lossless lands at ~2.5:1 (3.5:1 without the noise): inside
    # real CT's range, where the codec works as hard as on patient data. Checked after the build.
    spec = StudySpec(images=options.images, series=3 if options.images >= 30 else 1, modality=options.modality,
                     patient_name="BENCH^STUDY", patient_id=BENCH_PATIENT_ID, accession_number="BENCH0001")
    paths = build_study(raw, spec)
    raw_bytes = jpeg_bytes = 0
    for path in paths:
        _complete_attributes(path)
        result = transfer_syntax.convert_file(path, jpeg / path.name, JPEG_LOSSLESS)
        _verify_bit_exact(path, jpeg / path.name)
        raw_bytes, jpeg_bytes = raw_bytes + path.stat().st_size, jpeg_bytes + result.bytes_out
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return Corpus(folder, len(paths), options.modality, jpeg_bytes, raw_bytes, study_uid)


def _complete_attributes(path: Path) -> None:
    """Fill what a modality always writes and the pydicom-data slice left empty (DCMTK's dcmmkdir
    refuses a DICOMDIR without Study Date/Time/ID, so the peer pipeline needs them too)."""
    dataset = pydicom.dcmread(path)
    dataset.StudyDate = dataset.ContentDate = dataset.InstanceCreationDate = "20240115"
    dataset.StudyTime = dataset.ContentTime = dataset.InstanceCreationTime = "101500"
    dataset.StudyID, dataset.PatientBirthDate, dataset.PatientSex = "1", "19700101", "O"
    dataset.Manufacturer, dataset.InstitutionName = "discflow bench", "discflow"
    dataset.save_as(path, enforce_file_format=True)


def _verify_bit_exact(raw: Path, jpeg: Path) -> None:
    """Decode the lossless file with pydicom's own decoders (not the encoder's library) and compare."""
    encoded, original = pydicom.dcmread(jpeg), pydicom.dcmread(raw)
    if str(encoded.file_meta.TransferSyntaxUID) != JPEG_LOSSLESS:
        raise RuntimeError(f"{jpeg.name}: not JPEG lossless SV1")
    if not np.array_equal(encoded.pixel_array, original.pixel_array):
        raise RuntimeError(f"{jpeg.name}: JPEG lossless pixels differ from the uncompressed original")


# --------------------------------------------------------------------- steady-state cluster


class Cluster:
    """One Redis (the configured one, else an embedded one) and one local worker, kept running."""

    def __init__(self, log_dir: Path, concurrency: int) -> None:
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.redis: EmbeddedRedis | None = None
        self.workers: LocalWorkers | None = None
        self.url = get_settings().broker_url or ""

    def start(self) -> Cluster:
        if not self.url:
            self.redis = EmbeddedRedis().start()
            self.url = self.redis.url
        use_broker(self.url)
        return self.restart_workers(self.concurrency)

    def restart_workers(self, concurrency: int) -> Cluster:
        """Stop the worker (if any) and start one with ``concurrency`` pool processes; wait for it."""
        if self.workers:
            self.workers.stop()
        self.concurrency = concurrency
        self.workers = LocalWorkers(self.url, concurrency, log_dir=self.log_dir).start()
        _wait_for_worker(self.workers)
        return self

    def stop(self) -> None:
        if self.workers:
            self.workers.stop()
        if self.redis:
            self.redis.stop()


def _wait_for_worker(workers: LocalWorkers, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in workers.processes):
            raise RuntimeError("the local worker exited at start-up; see worker0.log in the bench folder")
        if app.control.ping(timeout=0.5):
            return
    raise RuntimeError(f"the local worker did not answer within {timeout:.0f} s")


@contextmanager
def bench_environment(work: Path) -> Iterator[None]:
    """A private spool for the bench (workers inherit it), unless a shared broker is configured:
    then its workers already agree on a spool and the bench must use that one."""
    if get_settings().broker_url:
        yield
        return
    previous = os.environ.get("DISCFLOW_SPOOL_DIR")
    os.environ["DISCFLOW_SPOOL_DIR"] = str(work / "spool")
    reload_settings()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DISCFLOW_SPOOL_DIR", None)
        else:
            os.environ["DISCFLOW_SPOOL_DIR"] = previous
        reload_settings()


# ----------------------------------------------------------------------- discflow's own runs


def export_request(source: Path | str, syntax: str, out: Path, batch_size: int | None = None) -> dict[str, Any]:
    """The request `discflow export` builds (orchestration.cli.export_request): ``source`` is a
    folder, or a node AE@HOST:PORT (then the study is asked for by the bench patient's ID)."""
    from orchestration.cli import export_request as cli_export_request
    if isinstance(source, Path):
        return cli_export_request(source=source, syntax=syntax, out=out, batch_size=batch_size)
    return cli_export_request(from_node=source, patient_id=BENCH_PATIENT_ID, syntax=syntax, out=out,
                              batch_size=batch_size)


def import_request(medium: Path, node: str, send: str) -> dict[str, Any]:
    """The request `discflow import DISC --to NODE --send SEND` builds (orchestration.cli)."""
    from orchestration.cli import import_request as cli_import_request
    return cli_import_request(disc=medium, to=node, send=send)


def run_job(kind: str, request: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Submit and wait as the CLI does (steady state: Redis and workers already up); (summary, seconds)."""
    started = peers.start_clock()
    job_id = submit(kind, request)
    wait(job_id)
    seconds = time.monotonic() - started
    stages = EXPORT_STAGES if kind == "export" else IMPORT_STAGES
    summary = job_summary(JobSpool(get_settings().spool_dir, job_id), read_timings(app, job_id), seconds, stages)
    shutil.rmtree(get_settings().spool_dir / job_id, ignore_errors=True)  # keep the disk for the next run
    return summary, seconds


def discflow_export(source: Path | str, syntax: str, out: Path, batch_size: int | None = None) -> Run:
    """One export from a folder (Path) or a node ("AE@HOST:PORT") in the steady state."""
    shutil.rmtree(out, ignore_errors=True)
    summary, seconds = run_job("export", export_request(source, syntax, out, batch_size))
    return Run(seconds, sum(volume["bytes"] for volume in summary["volumes"]), summary["instances"]["written"],
               {stage: row["seconds"] for stage, row in summary["stages"].items()})


def discflow_import(medium: Path, node: str, send: str, stored: Callable[[], int]) -> Run:
    """One import; ``stored`` asks the PACS how many instances it holds (the count that matters)."""
    summary, seconds = run_job("import", import_request(medium, node, send))
    sent = sum(row["bytes"] for stage, row in summary["stages"].items() if stage == "store")
    return Run(seconds, sent, stored(), {stage: row["seconds"] for stage, row in summary["stages"].items()})


def export_inline(folder: Path, syntax: str, out: Path, batch_size: int | None = None) -> Run:
    """The same stage functions in this process, no Celery, no Redis (what the canvas costs extra)."""
    from tasks.media import assemble_volume, finish_export, plan_media
    from tasks.scan import REQUEST, scan_export, write_batches
    from tasks.transcode import transcode_batch

    shutil.rmtree(out, ignore_errors=True)
    spool = JobSpool(get_settings().spool_dir, new_job_id("export")).create()
    spool.write(REQUEST, export_request(folder, syntax, out, batch_size))
    marks = [peers.start_clock()]
    manifest, work = scan_export(spool)
    batches = write_batches(spool, manifest, work)
    marks.append(time.monotonic())
    for number in range(batches):
        transcode_batch(spool, number)
    marks.append(time.monotonic())
    for number in range(1, plan_media(spool) + 1):
        assemble_volume(spool, number)
    finish_export(spool)
    marks.append(time.monotonic())
    summary = read_json(spool.summary_path)
    shutil.rmtree(spool.path, ignore_errors=True)
    stages = {name: round(marks[i + 1] - marks[i], 4) for i, name in enumerate(EXPORT_STAGES)}
    return Run(marks[-1] - marks[0], sum(v["bytes"] for v in summary["volumes"]), summary["instances"]["written"],
               stages)


def embedded_export(folder: Path, out: Path, spool: Path) -> Run:
    """`discflow export --syntax keep` as an operator types it, with no broker configured: the
    embedded default starts its own Redis and workers, so start-up is included."""
    shutil.rmtree(out, ignore_errors=True)
    environment = {key: value for key, value in os.environ.items() if key != "DISCFLOW_BROKER_URL"}
    environment["DISCFLOW_SPOOL_DIR"] = str(spool)
    command = [sys.executable, "-m", "orchestration.cli", "export", "--source", str(folder), "--syntax", "keep",
               "--out", str(out), "--json"]
    started = peers.start_clock()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    if finished.returncode != 0:
        raise RuntimeError(f"embedded export failed ({finished.returncode}): {finished.stderr[-2000:]}")
    summary = json.loads(finished.stdout)
    shutil.rmtree(spool, ignore_errors=True)
    # The CLI's own "seconds" run from starting Redis and the worker to the summary; the rest is
    # the interpreter's start-up and imports, and stopping the worker and Redis.
    stages = {stage: row["seconds"] for stage, row in summary["stages"].items()}
    stages.update(runtime_and_job=summary["seconds"], imports_and_shutdown=round(seconds - summary["seconds"], 3))
    return Run(seconds, sum(v["bytes"] for v in summary["volumes"]), summary["instances"]["written"], stages)


def profile_inline_export(folder: Path, syntax: str, out: Path, html: Path) -> str:
    """Profile the slowest export (inline, so the profile sees every stage) with pyinstrument."""
    try:
        from pyinstrument import Profiler
    except ImportError as missing:
        raise RuntimeError("--profile needs pyinstrument (pip install pyinstrument)") from missing
    profiler = Profiler(interval=0.002)
    with profiler:
        export_inline(folder, syntax, out)
    html.write_text(profiler.output_html())
    return profiler.output_text(unicode=False, color=False, show_all=False)


# ------------------------------------------------------------------------------- the sections


@dataclass
class Bench:
    """What every section needs: the options, the corpus, a scratch folder, the running cluster."""
    options: BenchOptions
    corpus: Corpus
    work: Path
    cluster: Cluster
    results: Results
    orthancs: dict[str, OrthancPeer] = field(default_factory=dict)
    """"nodelay" (TCP_NODELAY=1 in its environment) and "stock" (Orthanc as shipped)."""
    discs: dict[str, Path] = field(default_factory=dict)
    """"raw" / "jpeg": discflow's own discs, extracted as a mounted drive shows them."""
    profile: str = ""
    """pyinstrument's text profile of the slowest export, when asked for."""

    @property
    def out(self) -> Path:
        return self.work / "out"

    def measure(self, table: str, row: str, tool: str, run: Run, pacs: str = "", counted: bool = True) -> None:
        expected = self.corpus.images if counted else 0
        self.results.add(Measurement(table, row, tool, pacs, expected_instances=expected), run)


def prepare_discs(bench: Bench) -> None:
    """discflow's uncompressed and JPEG-lossless discs of the corpus (the import rows' input); these
    first exports also warm the worker up, so they are not counted."""
    for name, syntax in (("raw", "uncompressed"), ("jpeg", "keep")):
        run = discflow_export(bench.corpus.jpeg_lossless, syntax, bench.out)
        iso = bench.work / f"{name}.iso"
        shutil.move(str(next(bench.out.glob("VOL001.ISO"))), iso)
        bench.discs[name] = peers.extract_iso(iso, bench.work / f"disc-{name}")
        bench.results.say(f"{name} disc: {run.bytes / 1e6:.0f} MB, {run.instances} instances (warm-up, not counted)")


def warm_up_import(bench: Bench) -> None:
    """One import before the measured ones: the steady state is a worker that has run one, with
    the import's modules loaded in every pool process."""
    peer = bench.orthancs["nodelay"]
    discflow_import(bench.discs["jpeg"], str(peer.node), "keep", peer.instance_count)
    peer.delete_all_studies()


def export_rows(bench: Bench) -> None:
    """Table 2: the same JPEG-lossless files to a finished ISO, discflow then its DCMTK peer."""
    source = bench.corpus.jpeg_lossless
    for row, decompress in (("uncompressed", True), ("keep", False)):
        bench.measure("export", row, "discflow", discflow_export(source, row, bench.out))
        run = peers.dcmtk_export(source, bench.work / "staging", bench.work / "dcmtk.iso", decompress)
        bench.measure("export", row, "dcmtk", run)
    shutil.rmtree(bench.out, ignore_errors=True)


IMPORT_SENDS = {"raw-keep": ("raw", "keep"), "raw-uncompressed": ("raw", "uncompressed"),
                "jpeg-keep": ("jpeg", "keep"), "jpeg-uncompressed": ("jpeg", "uncompressed")}


def import_rows(bench: Bench) -> None:
    """Table 3 into each Orthanc: discflow, then dcmsend, on the same disc as a mounted drive shows
    it (a folder); the PACS is emptied after every row so each starts from the same state."""
    for pacs, peer in bench.orthancs.items():
        for row, (disc, send) in IMPORT_SENDS.items():
            medium = bench.discs[disc]
            bench.measure("import", row, "discflow", discflow_import(medium, str(peer.node), send, peer.instance_count),
                          pacs)
            peer.delete_all_studies()
            bench.measure("import", row, "dcmsend", peers.dcmsend(peer, medium, send == "uncompressed"), pacs)
            peer.delete_all_studies()
        if pacs == "nodelay":  # an .iso file as the operator gets it (read with pycdlib, never mounted)
            run = discflow_import(bench.work / "jpeg.iso", str(peer.node), "keep", peer.instance_count)
            bench.measure("import", "jpeg-keep-iso", "discflow", run, pacs)
            peer.delete_all_studies()


def node_rows(bench: Bench) -> None:
    """Export from each PACS by patient ID (C-FIND + C-GET), and Orthanc's own media ZIP export."""
    for pacs, peer in bench.orthancs.items():
        study_id = peers.load_study(peer, bench.corpus.jpeg_lossless)
        run = discflow_export(str(peer.node), "keep", bench.out)
        bench.measure("node", "keep", "discflow", run, pacs)
        if pacs == "nodelay":  # REST, so Nagle does not matter: one Orthanc is enough
            zip_path = bench.work / "orthanc-media.zip"
            bench.measure("export", "keep", "orthanc-media", peers.orthanc_media(peer, study_id, zip_path),
                          counted=False)
            if peers.supports_media_transcode(peer):
                run = peers.orthanc_media(peer, study_id, zip_path, transcode=peers.UNCOMPRESSED)
                bench.measure("export", "uncompressed", "orthanc-media", run, counted=False)
            zip_path.unlink(missing_ok=True)
        peer.delete_all_studies()
    shutil.rmtree(bench.out, ignore_errors=True)


def embedded_row(bench: Bench) -> None:
    run = embedded_export(bench.corpus.jpeg_lossless, bench.out, bench.work / "embedded-spool")
    bench.measure("embedded", "keep", "discflow-cli", run)


def scaling_rows(bench: Bench) -> None:
    """The transcode-heavy export on N and on 1 worker processes, beside the same comparison for a
    plain CPU-bound loop (what this machine gives N processes at all); then the per-task overhead of
    the canvas: the same export through Celery and inline in this process, for each batch size.
    N and 1 alternate run by run, so that a shared machine's drift (its speed moved by 20 % within
    minutes here) falls on both alike; each switch starts a fresh worker, warmed up by one
    uncounted export."""
    source, many = bench.corpus.jpeg_lossless, bench.options.concurrency
    for _ in range(bench.options.runs):
        for processes in dict.fromkeys((many, 1)):
            _use_processes(bench, processes)
            bench.measure("scaling", "uncompressed", f"workers={processes}",
                          discflow_export(source, "uncompressed", bench.out))
        for processes, run in cpu_loop_runs(many).items():
            bench.measure("scaling", "cpu-loop", f"processes={processes}", run, counted=False)
    for processes in dict.fromkeys((1, many)):
        _use_processes(bench, processes)
        for _ in range(bench.options.runs):
            _overhead_run(bench, processes)
    shutil.rmtree(bench.out, ignore_errors=True)


def _use_processes(bench: Bench, processes: int) -> None:
    if bench.cluster.concurrency != processes:
        bench.cluster.restart_workers(processes)
        discflow_export(bench.corpus.jpeg_lossless, "uncompressed", bench.out)  # warm the fresh pool up


def _overhead_run(bench: Bench, processes: int) -> None:
    source, out = bench.corpus.jpeg_lossless, bench.out
    for size in bench.options.batch_sizes:
        bench.measure("overhead", f"batch={size}", f"celery-{processes}",
                      discflow_export(source, "uncompressed", out, size))
        if processes == 1:  # the fair comparison for one process without Celery
            bench.measure("overhead", f"batch={size}", "inline", export_inline(source, "uncompressed", out, size))
    if processes == bench.options.concurrency:  # keep: the steady-state set-up against one process
        bench.measure("overhead", "keep", "celery", discflow_export(source, "keep", out))
        bench.measure("overhead", "keep", "inline", export_inline(source, "keep", out))


CPU_LOOP = 10_000_000
"""Iterations of the plain loop that measures the machine (about 0.5 s on one core here)."""


def cpu_loop_runs(processes: int, loops: int = CPU_LOOP) -> dict[int, Run]:
    """The machine's own ceiling for N processes: N loops one after another in one process against
    N loops at once in N processes (a perfectly parallel job), both timed from this process."""
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_cpu_loop, [1] * processes, chunksize=1)  # every process is up before the clock starts
        started = peers.start_clock()
        pool.apply(_cpu_loop, (loops,))
        alone = time.monotonic() - started
        started = time.monotonic()
        pool.map(_cpu_loop, [loops] * processes, chunksize=1)
        together = time.monotonic() - started  # from the parent: processes that start late count
    return {processes: Run(together), 1: Run(alone * processes)}


def _cpu_loop(loops: int) -> int:
    total = 0
    for number in range(loops):
        total += number * number
    return total


# ------------------------------------------------------------------------------------ the run


def run_bench(options: BenchOptions, say: Say) -> dict[str, Any]:
    """Build (or reuse) the corpus, measure every table, return the JSON report."""
    missing = peers.missing_tools()
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)} (apt-get install dcmtk xorriso orthanc)")
    corpus = ensure_corpus(options, say)
    work = Path(tempfile.mkdtemp(prefix="discflow-bench-", dir=_parent(corpus_home(options))))
    results = Results(say)
    counters = _cpu_counters()
    try:
        with bench_environment(work):
            bench = Bench(options, corpus, work, Cluster(work / "logs", options.concurrency), results)
            _measure_all(bench, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = report_json(results, _context(options, corpus, _steal_percent(counters, _cpu_counters())))
    if bench.profile:
        report["profile"] = bench.profile
    return report


def _measure_all(bench: Bench, say: Say) -> None:
    (bench.work / "logs").mkdir()
    try:
        with _orthancs(bench.work, while_starting=bench.cluster.start) as orthancs:
            bench.orthancs = orthancs
            say(f"Redis, a worker with {bench.cluster.concurrency} processes and two Orthancs are up")
            prepare_discs(bench)
            if "import" in bench.options.parts:
                warm_up_import(bench)
            for number in range(1, bench.options.runs + 1):
                say(f"run {number} of {bench.options.runs}")
                with _orthanc_logs_on_error(orthancs):
                    for part, rows in (("export", export_rows), ("import", import_rows), ("node", node_rows),
                                       ("embedded", embedded_row)):
                        if part in bench.options.parts:
                            rows(bench)
        if "scaling" in bench.options.parts:
            scaling_rows(bench)
        if bench.options.profile_html:
            bench.profile = profile_inline_export(bench.corpus.jpeg_lossless, "uncompressed", bench.out,
                                                  bench.options.profile_html)
            say(f"profile of the inline uncompressed export written to {bench.options.profile_html}")
    finally:
        bench.cluster.stop()


@contextmanager
def _orthanc_logs_on_error(orthancs: dict[str, OrthancPeer]) -> Iterator[None]:
    """An error answer of Orthanc's REST API, with the end of each Orthanc's log (the bench's
    folder, logs included, is removed when it stops)."""
    try:
        yield
    except urllib.error.HTTPError as error:
        logs = "\n".join(f"--- Orthanc {name}:\n{peer.log()[-2000:]}" for name, peer in orthancs.items())
        raise RuntimeError(f"Orthanc answered {error} ({error.url})\n{logs}") from error


@contextmanager
def _orthancs(work: Path, while_starting: Callable[[], Any]) -> Iterator[dict[str, OrthancPeer]]:
    """A TCP_NODELAY Orthanc and a stock one, started beside ``while_starting`` (each takes seconds)."""
    with ThreadPoolExecutor(2) as pool:
        starting = {name: pool.submit(start_orthanc, work / f"orthanc-{name}", tcp_nodelay=name == "nodelay")
                    for name in ("nodelay", "stock")}
        try:
            while_starting()
        finally:
            started = {name: future.result() for name, future in starting.items() if not future.exception()}
    try:
        for future in starting.values():
            future.result()  # raise the first start-up failure, after the others are recorded
        yield started
    finally:
        for peer in started.values():
            peer.stop(graceful=False)  # a throw-away PACS: its folder goes with the bench's


def _cpu_counters() -> tuple[int, int] | None:
    """(stolen, total) CPU time of all CPUs in jiffies, from /proc/stat; None where there is none."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[7], sum(fields)


def _steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time the hypervisor gave other guests during the run: on a shared VM the
    figures move with it, so the report says how much there was."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def _context(options: BenchOptions, corpus: Corpus, steal_percent: float | None = None) -> dict[str, Any]:
    import platform
    return {
        "options": {"images": options.images, "modality": options.modality, "runs": options.runs,
                    "concurrency": options.concurrency, "batch_sizes": list(options.batch_sizes),
                    "default_batch_size": get_settings().batch_size,
                    "broker": "configured" if get_settings().broker_url else "embedded"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_steal_percent": steal_percent},
        "tools": peers.tool_versions(),
        "corpus": {**_corpus_fields(corpus), "ratio": round(corpus.ratio, 3)},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

"""tasks.decode_guard: one decode in a child process, stopped at a time and a memory limit."""
from __future__ import annotations

import io
import os
import resource
import signal
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tasks import transfer_syntax
from tasks.decode_guard import DecodeCrashError, DecodeGuardError, DecodeLimitError, guarded, guarded_each

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GB = 1 << 30
JPEG_LOSSLESS = "JPEG-LL.dcm"  # pydicom-data: 1024 x 256, signed 16-bit, JPEG Lossless SV1 (.4.70)


# --- functions run in the child (module level: what a caller would pass) ---------------------

def sleep_forever(pid_file: Path) -> None:
    pid_file.write_text(str(os.getpid()))
    # Deaf to the polite signals: only a SIGKILL from the parent (or the child's own alarm) ends it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    while True:
        time.sleep(3600)


def allocate(size: int) -> int:
    block = np.ones(size, dtype=np.uint8)  # touched, not just reserved
    return int(block[-1]) + len(block) - 1


def hoard() -> None:
    """Keeps every small object it makes, as a parser building entries does, until memory runs out
    (small objects fill the allocator's arenas, so nothing is left even to format a message)."""
    objects = []
    while True:
        objects.append(bytes(200))


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def add(a: int, b: int, *, times: int = 1) -> int:
    return (a + b) * times


# --- time ------------------------------------------------------------------------------------

def test_a_decode_that_never_ends_is_killed_at_the_time_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(DecodeLimitError, match=r"^DICOM/P0000001/I0000007: decoding exceeded 1\.5 s"):
        guarded(sleep_forever, pid_file, seconds=1.5, memory_bytes=GB, label="DICOM/P0000001/I0000007")
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 4.0, f"stopped after {elapsed:.2f} s"
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie is left
        os.kill(child, 0)


def test_an_exception_in_the_waiting_parent_kills_the_child(tmp_path):
    """Celery's soft time limit raises inside the task while it waits: the decode must not live on."""
    pid_file = tmp_path / "child.pid"

    def interrupt(number, frame):
        raise TimeoutError("soft time limit")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(TimeoutError):
            guarded(sleep_forever, pid_file, seconds=60, memory_bytes=GB, label="x")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_test_timer_in_the_parent_is_left_alone():
    """The guard must not disturb the caller's SIGALRM handler or interval timer (pytest-timeout,
    Celery's time limits)."""
    def handler(number, frame):
        raise AssertionError("the parent's timer fired")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        assert guarded(add, 2, 3, times=2, seconds=5, memory_bytes=GB, label="x") == 10
        assert signal.getsignal(signal.SIGALRM) is handler
        assert 25.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- memory ----------------------------------------------------------------------------------

def test_allocating_4_gb_fails_with_the_memory_message():
    limits_before = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(DecodeLimitError,
                       match=r"^DICOM/BIG: decoding exceeded the 1024 MB memory limit \(MemoryError"):
        guarded(allocate, 4 * GB, seconds=30, memory_bytes=GB, label="DICOM/BIG")
    assert resource.getrlimit(resource.RLIMIT_AS) == limits_before, "the limit leaked into the parent"


def test_memory_exhausted_step_by_step_still_reads_as_the_memory_limit():
    """When the limit is reached by many allocations that are all still held, there is no memory
    left to describe the error: the child must still report the memory limit, not die silently."""
    with pytest.raises(DecodeLimitError, match=r"^DICOM/HOARD: decoding exceeded the 64 MB memory limit"):
        guarded(hoard, seconds=30, memory_bytes=64 << 20, label="DICOM/HOARD")


def test_memory_below_the_limit_is_available():
    """The limit is headroom above what the worker maps already, not a cap that a process with
    numpy and the codecs loaded would exceed before decoding anything."""
    size = 256 << 20
    assert guarded(allocate, size, seconds=30, memory_bytes=GB, label="x") == size


def test_a_memory_error_wrapped_by_the_decoder_still_reads_as_the_memory_limit():
    def wrapped():
        try:
            allocate(4 * GB)
        except Exception as error:  # as transfer_syntax._decode wraps plugin failures
            raise transfer_syntax.ConversionError(f"cannot decode the Pixel Data: {error}") from error

    with pytest.raises(DecodeLimitError, match="memory limit"):
        guarded(wrapped, seconds=30, memory_bytes=GB, label="DICOM/WRAPPED")


# --- crashes and errors ----------------------------------------------------------------------

def test_a_crashing_decoder_is_reported_and_the_caller_survives():
    with pytest.raises(DecodeCrashError, match=r"^DICOM/SEGV: the decoding process died of SIGSEGV"):
        guarded(crash, seconds=10, memory_bytes=GB, label="DICOM/SEGV")
    assert guarded(add, 1, 1, seconds=10, memory_bytes=GB, label="after") == 2


def test_the_function_s_own_error_comes_back_unchanged(tmp_path):
    junk = tmp_path / "NOTDICOM"
    junk.write_bytes(b"MZ" + bytes(300))
    with pytest.raises(transfer_syntax.ConversionError) as raised:
        guarded(transfer_syntax.convert_file, junk, tmp_path / "out.dcm", transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN,
                seconds=10, memory_bytes=GB, label="NOTDICOM")
    with pytest.raises(transfer_syntax.ConversionError) as direct:
        transfer_syntax.convert_file(junk, tmp_path / "out.dcm", transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN)
    assert str(raised.value) == str(direct.value)
    assert raised.value.source == junk
    assert not isinstance(raised.value, DecodeGuardError)


def test_a_system_exit_in_the_child_does_not_stop_the_caller():
    with pytest.raises(RuntimeError, match="SystemExit while decoding"):
        guarded(os.sys.exit, 3, seconds=10, memory_bytes=GB, label="x")


# --- a real conversion -----------------------------------------------------------------------

def test_guarded_jpeg_lossless_conversion_is_bit_exact_and_equal_to_unguarded(tmp_path):
    source = Path(get_testdata_file(JPEG_LOSSLESS))
    plain = transfer_syntax.convert_file(source, tmp_path / "plain.dcm", transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN)
    result = guarded(transfer_syntax.convert_file, source, tmp_path / "guarded.dcm",
                     transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN, seconds=60, memory_bytes=2 * GB,
                     label=JPEG_LOSSLESS)

    assert result == plain
    assert result.transfer_syntax == transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN
    assert (tmp_path / "guarded.dcm").read_bytes() == (tmp_path / "plain.dcm").read_bytes()
    original = pydicom.dcmread(source)
    written = pydicom.dcmread(tmp_path / "guarded.dcm")
    assert original.PixelRepresentation == 1
    assert written.file_meta.TransferSyntaxUID == transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN
    expected, got = original.pixel_array, written.pixel_array
    assert got.dtype == expected.dtype and got.shape == expected.shape == (1024, 256)
    assert np.array_equal(got, expected), "guarded conversion changed pixel values"


def test_guard_overhead_is_measured(tmp_path):
    """Printed (run with -s) for the report; bounded only loosely (a fork per call)."""
    calls = 10
    started = time.perf_counter()
    for _ in range(calls):
        guarded(add, 1, 2, seconds=10, memory_bytes=GB, label="x")
    per_call = (time.perf_counter() - started) / calls

    source = Path(get_testdata_file(JPEG_LOSSLESS))
    target = transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN
    transfer_syntax.convert_file(source, tmp_path / "warm.dcm", target)
    started = time.perf_counter()
    for n in range(calls):
        transfer_syntax.convert_file(source, tmp_path / f"plain{n}.dcm", target)
    plain = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for n in range(calls):
        guarded(transfer_syntax.convert_file, source, tmp_path / f"guarded{n}.dcm", target,
                seconds=60, memory_bytes=2 * GB, label=JPEG_LOSSLESS)
    guarded_time = (time.perf_counter() - started) / calls
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"\ndecode guard: {per_call * 1000:.1f} ms per call with nothing to do (parent peak RSS {rss} MB); "
          f"JPEG lossless 1024x256 to Explicit VR LE: {plain * 1000:.1f} ms unguarded, "
          f"{guarded_time * 1000:.1f} ms guarded")
    assert per_call < 0.5


# --- wired into the import (runs once prepare_import_instance uses the guard) -------------------

def _hang(*args, **kwargs):
    while True:
        time.sleep(3600)


def _balloon(*args, **kwargs):
    return allocate(8 * GB)


@pytest.fixture
def import_spool(tmp_path, monkeypatch):
    """A folder medium with one JPEG-LS instance and a spool; the guard's limits set small."""
    from workers.settings import reload_settings

    if not hasattr(reload_settings(), "decode_timeout_seconds"):
        pytest.skip("the decode guard is not wired into prepare_import_instance yet")
    monkeypatch.setenv("DISCFLOW_DECODE_TIMEOUT_SECONDS", "2")
    monkeypatch.setenv("DISCFLOW_DECODE_MEMORY_BYTES", str(GB))
    reload_settings()
    folder = tmp_path / "disc"
    folder.mkdir()
    source = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    (folder / "I0000001").write_bytes(source.read_bytes())
    yield folder, tmp_path / "spool"
    monkeypatch.undo()
    reload_settings()


def _prepare(folder: Path, spool_root: Path):
    from tasks.manifest import Instance
    from tasks.media_scan import scan_medium
    from tasks.media_source import open_medium
    from tasks.spool import JobSpool
    from tasks.transcode import prepare_import_instance

    spool = JobSpool(spool_root, "job").create()
    with open_medium(folder) as medium:
        (found,) = scan_medium(medium).instances
        instance = Instance(index=0, source=found.path, size=found.size, sop_class_uid=found.sop_class_uid,
                            sop_instance_uid=found.sop_instance_uid, transfer_syntax=found.transfer_syntax,
                            patient=0, study=0, series=0)
        started = time.monotonic()
        outcome = prepare_import_instance(medium, spool, instance, "uncompressed", "COERCE")
    return outcome, time.monotonic() - started, spool


def test_import_decode_is_guarded_bit_exact(import_spool):
    outcome, _, _ = _prepare(*import_spool)
    assert outcome.ok, outcome.reason
    assert outcome.transfer_syntax == transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN
    source = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    assert np.array_equal(pydicom.dcmread(outcome.path).pixel_array, source.pixel_array)


def test_import_decode_that_hangs_is_stopped_and_named(import_spool, monkeypatch):
    monkeypatch.setattr(transfer_syntax, "convert_file", _hang)
    outcome, elapsed, spool = _prepare(*import_spool)
    assert not outcome.ok
    assert outcome.reason.startswith("I0000001: decoding exceeded 2 s"), outcome.reason
    assert elapsed < 10
    assert not list(spool.path.rglob("*.part")), "a killed decode left a temp file in the spool"


def test_import_decode_that_balloons_is_stopped_and_named(import_spool, monkeypatch):
    monkeypatch.setattr(transfer_syntax, "convert_file", _balloon)
    outcome, _, _ = _prepare(*import_spool)
    assert not outcome.ok
    assert outcome.reason.startswith("I0000001: decoding exceeded the 1024 MB memory limit"), outcome.reason



# --- many decodes in one child (guarded_each) -------------------------------------------------

def divide(a: int, b: int) -> float:
    return a / b


def allocate_wrapped(size: int) -> int:
    try:
        return allocate(size)
    except Exception as error:  # as transfer_syntax._decode wraps plugin failures
        raise transfer_syntax.ConversionError(f"cannot decode the Pixel Data: {error}") from error


def test_guarded_each_runs_every_call_in_one_child_and_describes_each_error():
    results = guarded_each(divide, [(6, 3), (1, 0), (8, 2)], seconds=5, memory_bytes=GB, label="x")
    assert results == [(True, 2), (False, "ZeroDivisionError: division by zero"), (True, 4)]
    pids = guarded_each(os.getpid, [(), (), ()], seconds=5, memory_bytes=GB, label="x")
    assert len({pid for _, pid in pids}) == 1 and pids[0][1] != os.getpid()
    assert guarded_each(divide, [], seconds=5, memory_bytes=GB, label="x") == []


def test_guarded_each_stops_a_call_at_its_own_time_limit_not_the_batch_s():
    started = time.monotonic()
    with pytest.raises(DecodeLimitError, match=r"^10 calls: decoding exceeded"):
        guarded_each(time.sleep, [(0,)] * 3 + [(3600,)] + [(0,)] * 6, seconds=1, memory_bytes=GB, label="10 calls")
    elapsed = time.monotonic() - started
    assert elapsed < 4.0, f"stopped after {elapsed:.2f} s (the batch's limit is 10 s)"


def test_guarded_each_memory_limit_or_crash_ends_the_whole_child():
    with pytest.raises(DecodeLimitError, match=r"^b: decoding exceeded the 1024 MB memory limit"):
        guarded_each(allocate, [(1,), (4 * GB,), (1,)], seconds=30, memory_bytes=GB, label="b")
    with pytest.raises(DecodeLimitError, match="memory limit"):  # wrapped by the decoder: still the limit
        guarded_each(allocate_wrapped, [(1,), (4 * GB,)], seconds=30, memory_bytes=GB, label="c")
    with pytest.raises(DecodeCrashError, match=r"^b: the decoding process died of SIGSEGV"):
        guarded_each(crash, [(), ()], seconds=10, memory_bytes=GB, label="b")
    with pytest.raises(RuntimeError, match="SystemExit while decoding"):
        guarded_each(os.sys.exit, [(3,)], seconds=10, memory_bytes=GB, label="b")


# --- a batch of the import: its decodes in one child -------------------------------------------

GOOD = 5
"""Good JPEG-LS instances in the batch medium, besides the bad ones."""


def _retagged(name: str, uid: str) -> bytes:
    """A real compressed instance under a new SOP Instance UID (pixel data untouched)."""
    dataset = pydicom.dcmread(get_testdata_file(name))
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = uid
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _codestream_field(name: str, marker: bytes, offset: int, value: bytes) -> bytes:
    """A real instance with ``value`` written ``offset`` bytes after ``marker`` in its first frame
    (what the fuzz found: a decoder that crashes or takes all memory), under a new UID."""
    data = bytearray(_retagged(name, pydicom.uid.generate_uid()))
    start = data.index(marker, data.index(b"\xe0\x7f\x10\x00"))
    data[start + offset:start + offset + len(value)] = value
    return bytes(data)


BAD = {
    "BADSEGV": ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7", 7, b"\x00\x00"),  # width 0: SIGSEGV in GDCM
    "BADABRT": ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7", 4, b"\xfd"),  # precision 253: SIGABRT in GDCM
    "BADMEMORY": ("JPEG-LL.dcm", b"\xff\xc3", 5, b"\x00\x00"),  # height 0: libjpeg takes all memory
}


@pytest.fixture
def batch_medium(tmp_path, monkeypatch):
    """A folder medium with GOOD JPEG-LS instances and the BAD ones; the guard's limits set small."""
    from workers.settings import reload_settings

    monkeypatch.setenv("DISCFLOW_DECODE_TIMEOUT_SECONDS", "2")
    monkeypatch.setenv("DISCFLOW_DECODE_MEMORY_BYTES", str(GB))
    reload_settings()
    folder = tmp_path / "disc"
    folder.mkdir()
    for n in range(GOOD):
        (folder / f"GOOD{n}").write_bytes(_retagged("MR_small_jpeg_ls_lossless.dcm", pydicom.uid.generate_uid()))
    for name, field in BAD.items():
        (folder / name).write_bytes(_codestream_field(*field))
    yield folder
    monkeypatch.undo()
    reload_settings()


def _batch_spool(folder: Path, root: Path, job: str):
    """scan_import + write_batches, as the scan task does, all instances in batch 0."""
    from tasks.scan import REQUEST, scan_import, write_batches
    from tasks.spool import JobSpool

    spool = JobSpool(root, job).create()
    spool.write(REQUEST, {"medium": str(folder), "node": "x", "send": "uncompressed", "rules": None, "studies": [],
                          "batch_size": 100})
    manifest = scan_import(spool)
    assert write_batches(spool, manifest, [i.index for i in manifest.instances], "store") == 1
    return spool, manifest


def _forks(monkeypatch) -> list[int]:
    """Counts the forks made from now on (in this process)."""
    forks, fork = [], os.fork
    parent = os.getpid()

    def counting():
        if os.getpid() == parent:
            forks.append(1)
        return fork()

    monkeypatch.setattr(os, "fork", counting)
    return forks


def test_import_batch_decodes_in_one_child(batch_medium, tmp_path, monkeypatch):
    from tasks.transcode import prepare_import_batch

    for name in BAD:
        (batch_medium / name).unlink()
    spool, manifest = _batch_spool(batch_medium, tmp_path / "spool", "job")
    forks = _forks(monkeypatch)
    outcomes = prepare_import_batch(spool, 0)
    assert len(forks) == 1, f"{len(forks)} children for a batch of {GOOD}"
    assert len(outcomes) == GOOD and all(o.ok for o in outcomes), [o.reason for o in outcomes]
    source = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).pixel_array
    for outcome in outcomes:
        assert outcome.transfer_syntax == transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN
        assert outcome.path.endswith("-raw.dcm")
        assert np.array_equal(pydicom.dcmread(outcome.path).pixel_array, source)


def test_import_batch_with_crashing_files_prepares_the_good_ones_and_names_the_bad(batch_medium, tmp_path,
                                                                                    monkeypatch):
    """One child for the batch dies (a crash, the memory limit): each decode is redone in a child of
    its own, and the outcomes are those of prepare_import_instance one by one, reasons and all."""
    from tasks import transcode
    from tasks.media_source import open_medium
    from tasks.spool import read_json

    spool, manifest = _batch_spool(batch_medium, tmp_path / "spool", "job")
    outcomes = {manifest.instances[o.index].source: o for o in transcode.prepare_import_batch(spool, 0)}
    assert set(outcomes) == {f"GOOD{n}" for n in range(GOOD)} | set(BAD)
    for name, outcome in outcomes.items():
        if name.startswith("GOOD"):
            assert outcome.ok and outcome.transfer_syntax == transfer_syntax.EXPLICIT_VR_LITTLE_ENDIAN, outcome
        else:
            assert not outcome.ok
            assert outcome.reason.startswith(f"{name}: ") and "decoding" in outcome.reason, outcome.reason
    assert "died of SIGSEGV" in outcomes["BADSEGV"].reason
    assert "died of SIGABRT" in outcomes["BADABRT"].reason
    assert not list(spool.path.rglob("*.part")), "a killed decode left a temp file in the spool"

    # The same instances one by one, each decode in its own child (the per-instance path).
    alone, _ = _batch_spool(batch_medium, tmp_path / "spool", "alone")
    with open_medium(batch_medium) as medium:
        for instance in manifest.instances:
            one = transcode.prepare_import_instance(medium, alone, instance, "uncompressed", "COERCE")
            batch = outcomes[instance.source]
            assert (one.ok, one.transfer_syntax, one.sop_instance_uid, one.bytes_in, one.bytes_out) == \
                   (batch.ok, batch.transfer_syntax, batch.sop_instance_uid, batch.bytes_in, batch.bytes_out)
            if instance.source != "BADMEMORY":  # the time or the memory limit, whichever comes first
                assert one.reason == batch.reason

    # A rerun redoes only what failed: the three bad ones, not the good ones.
    recorded = read_json(spool.outcome_path("transcode", 0))
    asked = []
    prepare = transcode.prepare_import_instances
    monkeypatch.setattr(transcode, "prepare_import_instances",
                        lambda medium, spool, instances, *rest: asked.extend(i.source for i in instances)
                        or prepare(medium, spool, instances, *rest))
    again = transcode.prepare_import_batch(spool, 0)
    assert sorted(asked) == sorted(BAD)
    assert [o for o in read_json(spool.outcome_path("transcode", 0)) if o["ok"]] == \
           [o for o in recorded if o["ok"]]
    assert [o.ok for o in again] == [o["ok"] for o in recorded]


def _fail_one(fails: str, hang: bool):
    original = transfer_syntax.convert_file

    def convert_file(source, destination, target, **options):
        if Path(source).name == fails:
            if hang:
                _hang()
            raise transfer_syntax.ConversionError(f"cannot decode {fails}")
        return original(source, destination, target, **options)

    return convert_file


def test_import_batch_one_file_s_error_leaves_the_others_in_the_same_child(batch_medium, tmp_path, monkeypatch):
    from tasks.transcode import prepare_import_batch

    for name in BAD:
        (batch_medium / name).unlink()
    spool, manifest = _batch_spool(batch_medium, tmp_path / "spool", "job")
    monkeypatch.setattr(transfer_syntax, "convert_file", _fail_one("00000002.dcm", hang=False))
    forks = _forks(monkeypatch)
    outcomes = prepare_import_batch(spool, 0)
    assert len(forks) == 1, "an ordinary error of one file made the batch redo its decodes one by one"
    assert [o.ok for o in outcomes] == [o.index != 2 for o in outcomes]
    assert outcomes[2].reason == "cannot decode 00000002.dcm"


def test_import_batch_with_a_hanging_file_is_stopped_at_the_per_file_limit(batch_medium, tmp_path, monkeypatch):
    """The batch's child is stopped when one file runs past the per-file limit (2 s), not after
    2 s x the batch; the redo one by one then names the file."""
    from tasks.transcode import prepare_import_batch

    for name in BAD:
        (batch_medium / name).unlink()
    spool, manifest = _batch_spool(batch_medium, tmp_path / "spool", "job")
    monkeypatch.setattr(transfer_syntax, "convert_file", _fail_one("00000003.dcm", hang=True))
    started = time.monotonic()
    outcomes = prepare_import_batch(spool, 0)
    elapsed = time.monotonic() - started
    assert [o.ok for o in outcomes] == [o.index != 3 for o in outcomes]
    assert outcomes[3].reason == f"{manifest.instances[3].source}: decoding exceeded 2 s; stopped"
    assert elapsed < 2 * GOOD, f"{elapsed:.1f} s: the batch's child was not stopped at the per-file limit"
    assert not list(spool.path.rglob("*.part"))

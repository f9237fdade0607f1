"""tasks.dimse against real peers: Orthanc (stock, TCP_NODELAY, uncompressed-only) and storescp."""
from __future__ import annotations

import io
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from peers import (  # noqa: F401  (fixtures are found by name)
    UNCOMPRESSED_SYNTAXES,
    OrthancPeer,
    StoreScpPeer,
    free_port,
    orthanc,
    orthanc_factory,
    storescp,
    storescp_factory,
)
from tasks import dicom_wire, dimse
from tasks.dimse import Node, SeriesRef, StoreOutcome

pytestmark = pytest.mark.peers

PATIENT_ID = "DF-TEST-1"
ACCESSION = "DF-ACC-1"


@dataclass
class Study:
    study_uid: str
    series_uids: list[str]
    files: list[Path]
    """Explicit VR Little Endian, 16-bit signed CT (14 bits stored)."""
    jpeg_files: list[Path]
    """The same instances as JPEG Lossless SV1 (dcmcjpeg)."""

    def by_uid(self, files: list[Path]) -> dict[str, Path]:
        return {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): path for path in files}


def write_instances(directory: Path, count: int, series_count: int = 1, *, patient_id: str = PATIENT_ID,
                    accession: str = ACCESSION) -> tuple[str, list[str], list[Path]]:
    """``count`` CT instances from pydicom's 693_UNCR.dcm with fresh UIDs; each one's pixels differ."""
    template = dcmread(get_testdata_file("693_UNCR.dcm"))
    pixels = template.pixel_array
    study_uid, series_uids = generate_uid(), [generate_uid() for _ in range(series_count)]
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(count):
        dataset = template.copy()
        dataset.PatientName, dataset.PatientID, dataset.AccessionNumber = "DOE^JANE", patient_id, accession
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uids[index % series_count]
        dataset.SeriesNumber = index % series_count + 1
        dataset.InstanceNumber = index + 1
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        marked = pixels.copy()
        marked[0, :16] = index - 8  # signed values, unique per instance
        dataset.PixelData = marked.tobytes()
        path = directory / f"{index:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, series_uids, files


def jpeg_lossless_copies(files: list[Path], directory: Path) -> list[Path]:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (DCMTK) is needed to make JPEG lossless files")
    directory.mkdir(parents=True, exist_ok=True)
    copies = [directory / path.name for path in files]
    for source, target in zip(files, copies):
        subprocess.run(["dcmcjpeg", "+e1", str(source), str(target)], check=True)  # Process 14 SV1
    return copies


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("study")
    study_uid, series_uids, files = write_instances(root / "plain", 30, series_count=2)
    return Study(study_uid, series_uids, files, jpeg_lossless_copies(files, root / "jpeg"))


def read(path_or_bytes: Path | bytes) -> Dataset:
    return dcmread(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes)


def pixel_bytes(path_or_bytes: Path | bytes) -> bytes:
    """The Pixel Data value as stored: native bytes, or the encapsulated fragments."""
    return bytes(read(path_or_bytes).PixelData)


def stored_uids(outcomes: list[StoreOutcome]) -> set[str]:
    return {str(outcome.sop_instance_uid) for outcome in outcomes}


def assert_all_ok(outcomes: list[StoreOutcome]) -> None:
    failed = [outcome for outcome in outcomes if not outcome.ok]
    assert not failed, failed[:3]


# --------------------------------------------------------------------------------------
# Pure parts


def test_node_parse() -> None:
    assert Node.parse("ORTHANC@127.0.0.1:4242") == Node("ORTHANC", "127.0.0.1", 4242)
    assert Node.parse(" PACS@pacs.example.org:104 ") == Node("PACS", "pacs.example.org", 104)
    assert Node.parse("PACS@[::1]:11112") == Node("PACS", "::1", 11112)
    assert str(Node.parse("PACS@[::1]:11112")) == "PACS@[::1]:11112"
    for bad in ("ORTHANC", "ORTHANC@127.0.0.1", "@host:104", "A_TITLE_LONGER_THAN_16@h:104",
                "PACS@host:0", "PACS@host:70000", "PACS@host:port", "PA\\CS@h:104"):
        with pytest.raises(ValueError, match="AE|port|node"):
            Node.parse(bad)


def test_find_refuses_an_open_query() -> None:
    node = Node("ORTHANC", "127.0.0.1", 1)
    with pytest.raises(ValueError, match="whole PACS"):
        dimse.find_instances(node)
    with pytest.raises(ValueError, match="must not contain"):
        dimse.find_instances(node, patient_id="DF-*")


def test_instance_file_name_is_safe() -> None:
    assert dimse.instance_file_name("1.2.840.113619.2.1") == "1.2.840.113619.2.1"
    for hostile in ("../../etc/passwd", "1.2/3", "1..2", "", "x" * 70):
        name = dimse.instance_file_name(hostile)
        assert len(name) == 40 and "/" not in name and ".." not in name


def test_retrieve_contexts_fit_one_association() -> None:
    for classes in ([], ["1.2.840.10008.5.1.4.1.1.2"], [f"1.2.3.{n}" for n in range(20)]):
        contexts, roles = dimse.retrieve_contexts(classes)
        assert len(contexts) <= dimse.MAX_CONTEXTS
        assert len(roles) == len({cx.abstract_syntax for cx in contexts[1:]})
    contexts, _ = dimse.retrieve_contexts(["1.2.840.10008.5.1.4.1.1.2"])
    ct = [cx.transfer_syntax for cx in contexts if cx.abstract_syntax == "1.2.840.10008.5.1.4.1.1.2"]
    assert [JPEGLosslessSV1] in ct and [ExplicitVRLittleEndian, "1.2.840.10008.1.2"] in ct


def test_pack_contexts_spreads_more_than_128_over_associations() -> None:
    needs = {(f"1.2.3.{n}", "1.2.840.10008.1.2.4.70"):
             dimse.wanted_contexts(f"1.2.3.{n}", "1.2.840.10008.1.2.4.70", "negotiate") for n in range(100)}
    groups = dimse.pack_contexts(needs)
    assert len(groups) == 2
    assert all(len(contexts) <= 128 for contexts, _ in groups)
    assert sorted(key for _, keys in groups for key in keys) == sorted(needs)


# --------------------------------------------------------------------------------------
# C-FIND and C-GET


def test_find_and_retrieve_study(orthanc: OrthancPeer, study: Study, tmp_path: Path) -> None:
    for path in study.files:
        orthanc.upload(path)

    found = dimse.find_instances(orthanc.node, patient_id=PATIENT_ID)
    assert {ref.series_instance_uid for ref in found} == set(study.series_uids)
    assert {ref.study_instance_uid for ref in found} == {study.study_uid}
    assert [ref.number_of_instances for ref in found] == [15, 15]
    assert found == dimse.find_instances(orthanc.node, accession_number=ACCESSION)
    assert found == dimse.find_instances(orthanc.node, study_uids=[study.study_uid])
    assert dimse.find_instances(orthanc.node, patient_id="DF-NOBODY") == []

    result = dimse.retrieve_series(orthanc.node, found, tmp_path / "received", associations=4)
    assert result.ok, result.failures
    assert result.instances == 30
    sent = study.by_uid(study.files)
    received = sorted((tmp_path / "received").iterdir())
    assert {path.name for path in received} == set(sent)
    assert result.bytes == sum(path.stat().st_size for path in received)
    for path in received:
        assert dcmread(path).file_meta.MediaStorageSOPInstanceUID == path.name
        assert pixel_bytes(path) == pixel_bytes(sent[path.name])
    print(f"\nC-GET 30 instances: {result.seconds:.2f} s, syntaxes {result.transfer_syntaxes}")


def test_retrieve_keeps_stored_jpeg_lossless(orthanc: OrthancPeer, study: Study, tmp_path: Path) -> None:
    """With one context per syntax for CT, Orthanc sends what it stores (here JPEG lossless)."""
    assert_all_ok(dimse.store_files(orthanc.node, study.jpeg_files, mode="keep"))
    found = dimse.find_instances(orthanc.node, study_uids=[study.study_uid])
    result = dimse.retrieve_series(orthanc.node, found, tmp_path)
    assert result.ok and result.transfer_syntaxes == {JPEGLosslessSV1: 30}
    sent = study.by_uid(study.jpeg_files)
    for uid, path in sent.items():
        assert pixel_bytes(tmp_path / uid) == pixel_bytes(path)


def test_retrieve_reports_a_series_the_pacs_does_not_have(orthanc: OrthancPeer, tmp_path: Path) -> None:
    missing = SeriesRef(generate_uid(), generate_uid())
    result = dimse.retrieve_series(orthanc.node, [missing], tmp_path)
    # Orthanc answers an unknown series with a failure status, or with success and nothing sent
    assert result.instances == 0
    assert all(failure.series_instance_uid == missing.series_instance_uid for failure in result.failures)


def test_retrieve_from_a_pacs_that_is_down(tmp_path: Path) -> None:
    node = Node("DOWN", "127.0.0.1", free_port())
    series = [SeriesRef(generate_uid(), generate_uid()) for _ in range(3)]
    result = dimse.retrieve_series(node, series, tmp_path, associations=2, retries=1, backoff=0.05, timeout=5)
    assert result.instances == 0
    assert sorted(f.series_instance_uid for f in result.failures) == sorted(s.series_instance_uid for s in series)
    assert all("cannot connect to DOWN@127.0.0.1" in f.reason and "after 2 attempts" in f.reason
               for f in result.failures)


def plain_connection_open(event: object, *connected: threading.Event) -> None:
    """dimse's EVT_CONN_OPEN handler without TCP_NODELAY/TCP_QUICKACK: pynetdicom as shipped."""
    for flag in connected:
        flag.set()


def test_retrieve_timing_stock_vs_nodelay(orthanc_factory: Callable[..., OrthancPeer], study: Study,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Print only: C-GET of 30 instances from stock / TCP_NODELAY Orthanc, our socket tuning on/off."""
    lines = []
    for nodelay in (False, True):
        peer = orthanc_factory(tcp_nodelay=nodelay)
        for path in study.files:
            peer.upload(path)
        found = dimse.find_instances(peer.node, patient_id=PATIENT_ID)
        for associations, ours in ((1, False), (1, True), (4, True)):
            with monkeypatch.context() as patch:
                if not ours:
                    patch.setattr(dimse, "_on_connection_open", plain_connection_open)
                result = dimse.retrieve_series(peer.node, found, tmp_path / f"{nodelay}-{associations}-{ours}",
                                               associations=associations)
            assert result.ok and result.instances == 30
            lines.append(f"Orthanc TCP_NODELAY={int(nodelay)} discflow low-latency={'on ' if ours else 'off'} "
                         f"associations={associations}: C-GET 30 instances in {result.seconds:.2f} s")
    print("\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------
# C-STORE


def test_store_keep_jpeg_lossless(orthanc: OrthancPeer, study: Study) -> None:
    outcomes = dimse.store_files(orthanc.node, study.jpeg_files, mode="keep")
    assert_all_ok(outcomes)
    assert {outcome.sent_syntax for outcome in outcomes} == {JPEGLosslessSV1}
    assert orthanc.instance_uids() == stored_uids(outcomes)
    for outcome in outcomes:
        orthanc_id = orthanc.lookup(str(outcome.sop_instance_uid))
        assert orthanc_id is not None
        assert orthanc.transfer_syntax(orthanc_id) == JPEGLosslessSV1
        assert pixel_bytes(orthanc.file_bytes(orthanc_id)) == pixel_bytes(outcome.file)


def test_store_negotiate_into_uncompressed_only_pacs(orthanc_factory: Callable[..., OrthancPeer],
                                                     study: Study) -> None:
    peer = orthanc_factory(accepted_transfer_syntaxes=UNCOMPRESSED_SYNTAXES)
    outcomes = dimse.store_files(peer.node, study.jpeg_files, mode="negotiate")
    assert_all_ok(outcomes)
    assert {outcome.sent_syntax for outcome in outcomes} <= set(UNCOMPRESSED_SYNTAXES)
    # the same SOP Instance UIDs arrive (pydicom 3's decompress() would mint new ones by default)
    assert peer.instance_uids() == stored_uids(outcomes)
    originals = study.by_uid(study.files)
    for outcome in outcomes:
        stored = read(peer.file_bytes(str(peer.lookup(str(outcome.sop_instance_uid)))))
        assert stored.file_meta.TransferSyntaxUID in UNCOMPRESSED_SYNTAXES
        assert np.array_equal(stored.pixel_array, dcmread(originals[str(outcome.sop_instance_uid)]).pixel_array)


def test_store_keep_refused_by_uncompressed_only_pacs(orthanc_factory: Callable[..., OrthancPeer],
                                                      study: Study) -> None:
    peer = orthanc_factory(accepted_transfer_syntaxes=UNCOMPRESSED_SYNTAXES)
    started = time.perf_counter()
    outcomes = dimse.store_files(peer.node, study.jpeg_files[:3], mode="keep", backoff=5)
    assert time.perf_counter() - started < 5, "a refused syntax is not a transient failure"
    assert all(not outcome.ok and outcome.status is None for outcome in outcomes)
    assert "accepted none of the proposed presentation contexts" in outcomes[0].reason
    assert peer.instance_uids() == set()


def test_store_uncompressed_mode_decompresses(orthanc: OrthancPeer, study: Study) -> None:
    outcomes = dimse.store_files(orthanc.node, study.jpeg_files[:4], mode="uncompressed")
    assert_all_ok(outcomes)
    for outcome in outcomes:
        orthanc_id = str(orthanc.lookup(str(outcome.sop_instance_uid)))
        assert orthanc.transfer_syntax(orthanc_id) == outcome.sent_syntax == ExplicitVRLittleEndian


def test_store_is_duplicate_safe(orthanc: OrthancPeer, study: Study) -> None:
    assert_all_ok(dimse.store_files(orthanc.node, study.files, mode="keep"))
    assert_all_ok(dimse.store_files(orthanc.node, study.files, mode="keep"))
    assert len(orthanc.instance_uids()) == 30


def test_store_to_storescp_over_parallel_associations(storescp_factory: Callable[..., StoreScpPeer],
                                                       study: Study) -> None:
    peer = storescp_factory(extra_args=["--verbose"])
    files = study.files[5:] + study.jpeg_files[:5]  # 30 distinct instances, two syntaxes
    outcomes = dimse.store_files(peer.node, files, mode="keep", associations=4)
    assert_all_ok(outcomes)
    received = peer.received_files()
    assert {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in received} == stored_uids(outcomes)
    assert peer.log().count("Association Release") == 4  # (the readiness probe is no association)
    for path in received:  # bit-preserving storescp: the dataset arrives byte for byte
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        original = next(o.file for o in outcomes if o.sop_instance_uid == uid)
        assert pixel_bytes(path) == pixel_bytes(original)


@pytest.mark.filterwarnings("ignore:Expected implicit VR")
def test_store_reports_unreadable_files_and_sends_the_rest(storescp: StoreScpPeer, study: Study,
                                                           tmp_path: Path) -> None:
    junk = tmp_path / "README.TXT"
    junk.write_text("not DICOM at all\n" * 20)
    outcomes = dimse.store_files(storescp.node, [junk, *study.files[:3]], mode="negotiate")
    assert not outcomes[0].ok and outcomes[0].status is None
    assert "not a DICOM instance" in outcomes[0].reason or "cannot read" in outcomes[0].reason
    assert_all_ok(outcomes[1:])


def test_store_to_a_pacs_that_is_down(study: Study) -> None:
    node = Node("DOWN", "127.0.0.1", free_port())
    started = time.perf_counter()
    outcomes = dimse.store_files(node, study.files[:6], associations=2, retries=2, backoff=0.05, timeout=5)
    assert time.perf_counter() - started < 5
    assert len(outcomes) == 6 and all(not outcome.ok and outcome.status is None for outcome in outcomes)
    assert all("cannot connect to DOWN@127.0.0.1" in outcome.reason for outcome in outcomes)
    assert all("after 3 attempts" in outcome.reason for outcome in outcomes)


def test_store_to_a_peer_that_aborts(storescp_factory: Callable[..., StoreScpPeer], study: Study) -> None:
    peer = storescp_factory(abort="after")
    outcomes = dimse.store_files(peer.node, study.files[:2], associations=1, retries=1, backoff=0.05, timeout=5)
    assert all(not outcome.ok and outcome.status is None for outcome in outcomes)
    assert all("after 2 attempts" in outcome.reason for outcome in outcomes), outcomes


# --------------------------------------------------------------------------------------
# TCP_NODELAY and timing


def test_every_socket_has_tcp_nodelay(orthanc: OrthancPeer, study: Study, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = dimse.set_tcp_nodelay

    def spy(sock: socket.socket) -> None:
        real(sock)
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(dimse, "set_tcp_nodelay", spy)  # C-FIND, C-GET (pynetdicom)
    monkeypatch.setattr(dicom_wire, "set_tcp_nodelay", spy)  # C-STORE
    dimse.store_files(orthanc.node, study.files[:4], associations=2)
    found = dimse.find_instances(orthanc.node, study_uids=[study.study_uid])
    dimse.retrieve_series(orthanc.node, found, tmp_path, associations=2)
    assert len(seen) >= 4 and all(seen)


def test_tcp_nodelay_handler_serves_acceptors_too(study: Study) -> None:
    """The same handler, bound on a pynetdicom server (a future C-MOVE destination)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    seen: list[tuple[int, str]] = []

    def on_store(event: evt.Event) -> int:
        association_socket = event.assoc.dul.socket
        seen.append((association_socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                     type(association_socket).__name__))
        return 0x0000

    ae = AE("DISCFLOW")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[dimse.TCP_NODELAY_HANDLER, (evt.EVT_C_STORE, on_store)])
    try:
        assert_all_ok(dimse.store_files(Node("DISCFLOW", "127.0.0.1", port), study.files[:2], associations=1))
    finally:
        server.shutdown()
    assert seen == [(1, "_QuickAckSocket")] * 2


def test_store_timing_200_instances(orthanc_factory: Callable[..., OrthancPeer], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Print only: stock vs TCP_NODELAY Orthanc, 1 vs 4 associations, our low-latency socket on/off."""
    _, _, files = write_instances(tmp_path / "files", 200, patient_id="DF-TIMING")
    lines = []
    # The full grid is `discflow bench`'s; here the stock peer without and with our remedies.
    for nodelay, associations, ours in ((False, 1, False), (False, 4, True), (True, 4, True)):
        peer = orthanc_factory(tcp_nodelay=nodelay)
        with monkeypatch.context() as patch:
            if not ours:
                patch.setattr(dicom_wire, "set_tcp_nodelay", lambda sock: None)
                patch.setattr(dicom_wire, "quick_ack", lambda sock: None)
            started = time.perf_counter()
            outcomes = dimse.store_files(peer.node, files, mode="keep", associations=associations)
            seconds = time.perf_counter() - started
        assert_all_ok(outcomes)
        lines.append(f"Orthanc TCP_NODELAY={int(nodelay)} discflow low-latency={'on ' if ours else 'off'} "
                     f"associations={associations}: 200 C-STOREs in {seconds:5.2f} s")
        peer.stop()
    print("\n" + "\n".join(lines))

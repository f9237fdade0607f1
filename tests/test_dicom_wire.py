"""tasks.dicom_wire: the file meta parser against pydicom's, and peers that break the protocol."""
from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pydicom.data
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import MaximumLengthNotification

from tasks import dicom_wire, dimse, part10
from tasks.dimse import Node


def _part10_files() -> list[Path]:
    """pydicom's own test files (local: pydicom-data's would be looked up online)."""
    files = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))
    return [path for path in files if path.read_bytes()[128:132] == b"DICM"]


def test_file_meta_agrees_with_pydicom() -> None:
    """The UIDs and the data set offset the sender uses are the ones pydicom reads from the meta."""
    parsed = 0
    for path in _part10_files():
        meta = part10.read_file_meta(path.read_bytes()[:16384])
        if meta is None:
            continue  # a meta we leave to pydicom (no UIDs, undefined length): the fallback path
        file_meta, offset = split_dataset(path)
        assert meta.dataset_offset == offset, path.name
        assert meta.sop_class_uid == str(file_meta.MediaStorageSOPClassUID), path.name
        assert meta.sop_instance_uid == str(file_meta.MediaStorageSOPInstanceUID), path.name
        assert meta.transfer_syntax == str(file_meta.TransferSyntaxUID), path.name
        parsed += 1
    assert parsed >= 50


@pytest.mark.parametrize("head", [b"", b"\0" * 200, b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff"])
def test_file_meta_of_junk_is_left_to_pydicom(head: bytes) -> None:
    assert part10.read_file_meta(head) is None


@contextmanager
def _peer(behave: Callable[[socket.socket, bytes], None]) -> Iterator[Node]:
    """A TCP peer on loopback that reads the A-ASSOCIATE-RQ and then does ``behave``."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                try:
                    pdu_type, body = dicom_wire.read_pdu(connection)
                    behave(connection, struct.pack(">BxI", pdu_type, len(body)) + body)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Node("HOSTILE", "127.0.0.1", server.getsockname()[1])
    finally:
        server.close()
        thread.join(5)


def _huge_pdu(connection: socket.socket, _request: bytes) -> None:
    connection.sendall(struct.pack(">BxI", 0x02, 1 << 31))


def _abort(connection: socket.socket, _request: bytes) -> None:
    connection.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")


def _accept_with_tiny_pdus(connection: socket.socket, request: bytes) -> None:
    """Accepts every context, but announces a maximum PDU length of 16 bytes."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(request)
    primitive = rq.to_primitive()
    primitive.result = 0x00
    for context in primitive.presentation_context_definition_list:
        context.result = 0x00
        context.transfer_syntax = context.transfer_syntax[:1]
    primitive.presentation_context_definition_results_list = primitive.presentation_context_definition_list
    tiny = MaximumLengthNotification()
    tiny.maximum_length_received = 16
    primitive.user_information = [tiny, *[item for item in primitive.user_information
                                          if not isinstance(item, MaximumLengthNotification)]]
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(primitive)
    connection.sendall(ac.encode())
    connection.recv(1024)  # the A-ABORT that follows


def _reject_permanently(connection: socket.socket, _request: bytes) -> None:
    connection.sendall(b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03")  # rejected-permanent, user, AE not recognised


@pytest.mark.parametrize("behave, reason, attempts", [
    (_huge_pdu, "broke off the association request", 2),
    (_abort, "aborted the association request", 2),
    (_reject_permanently, "rejected the association (Rejected Permanent, Service User: Calling AE title", 1),
    (_accept_with_tiny_pdus, "accepts P-DATA PDUs of at most 16 bytes", 1),
])
def test_hostile_peer_fails_each_file_with_a_reason(behave: Callable[[socket.socket, bytes], None], reason: str,
                                                    attempts: int) -> None:
    """Nothing the peer sends can crash the sender or make it allocate what the peer claims; a
    transient failure is retried, a permanent rejection is not."""
    files = [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))]
    with _peer(behave) as node:
        outcomes = dimse.store_files(node, files, mode="keep", associations=1, retries=1, backoff=0.01, timeout=5)
    assert [outcome.ok for outcome in outcomes] == [False, False]
    for outcome in outcomes:
        assert reason in outcome.reason, outcome.reason
        assert f"after {attempts} attempt" in outcome.reason, outcome.reason

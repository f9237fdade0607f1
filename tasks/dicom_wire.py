"""A lean, blocking DICOM upper layer for C-STORE: one socket, no reactor thread, no re-encoding.

pynetdicom spends 7-9 ms of CPU per C-STORE (a reactor thread per association, DIMSE messages
and PDUs built as objects, the dataset copied several times); on 2 cores shared with the PACS
that, not the network, bounded the import. Here pynetdicom's own PDU classes still encode and
decode the association PDUs (A-ASSOCIATE-RQ/AC/RJ), but the data path is ours: the C-STORE-RQ
command set (6 elements, Implicit VR Little Endian) and the file's own bytes after its file
meta, in P-DATA-TF fragments as large as the peer allows, each one ``sendmsg`` call; then the
C-STORE-RSP is read and parsed. Measured: ~10x less CPU than pynetdicom, faster than dcmsend.

Every byte the peer sends is checked against the PDU grammar; a PDU over :data:`MAX_PDU_READ`
or anything unexpected aborts the association (:class:`WireBroken`), never the process.
"""
from __future__ import annotations

import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
MAX_PDU = 262_144
"""The largest P-DATA PDU we accept (what we announce in A-ASSOCIATE-RQ)."""
MAX_PDU_READ = 1 << 20
"""A PDU longer than this from the peer is refused: a broken or hostile peer cannot make us
allocate without bound (responses are a few hundred bytes)."""
MIN_PEER_PDU = 1024
"""A peer that takes smaller PDUs than this is refused (DCMTK's own minimum is 4096)."""
SEND_FRAGMENT = 1 << 20
"""Fragment size when the peer sets no maximum (0 means unlimited)."""
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")
_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_COMMAND, _LAST = 0x01, 0x02


class AssociationFailed(ConnectionError):
    """No association (or it broke); ``transient`` says whether trying again may help."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class WireBroken(ConnectionError):
    """The association ended mid-operation (closed, aborted, timed out, protocol error):
    the instance in flight got no response and may be sent again on a new association."""


def set_tcp_nodelay(sock: socket.socket) -> None:
    """Switch Nagle's algorithm off: a small PDU goes out at once, not after the peer's ACK."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def quick_ack(sock: socket.socket) -> None:
    """ACK at once (Linux TCP_QUICKACK; not sticky, so set before every read).

    A stock peer keeps Nagle on and writes a response PDU in more than one send(); its second
    write waits for our ACK of the first, which Linux delays ~40 ms. ACKing at once removes the
    stall on the peer's side.
    """
    if _TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass  # a closing socket: the read that follows reports it


@dataclass(frozen=True)
class StoreResponse:
    status: int
    error_comment: str = ""


class StoreAssociation:
    """An established association that sends C-STORE requests one after the other."""

    def __init__(self, sock: socket.socket, accepted: dict[int, tuple[str, str]], peer_max_pdu: int,
                 peer_ae_title: str) -> None:
        self._sock = sock
        self.accepted = accepted
        """Context id -> (abstract syntax, transfer syntax) of every accepted context."""
        self.peer_ae_title = peer_ae_title
        self._fragment = (peer_max_pdu or SEND_FRAGMENT) - _PDV_HEADER.size
        self._message_id = 0
        self.broken = False

    def context_for(self, sop_class: str, syntax: str) -> int | None:
        return next((cid for cid, pair in self.accepted.items() if pair == (sop_class, syntax)), None)

    def c_store(self, context_id: int, sop_class: str, sop_instance: str, dataset: BinaryIO,
                length: int) -> StoreResponse:
        """Send one instance and wait for its response; :class:`WireBroken` when none can come.

        ``dataset`` yields ``length`` bytes: the data set encoded in the context's transfer syntax,
        without file meta. It is read one fragment at a time, so a large file is never held whole."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = _store_command(sop_class, sop_instance, self._message_id)
        try:
            self._send_pdv(context_id, command, _COMMAND | _LAST)
            self._send_dataset(context_id, dataset, length)
            return self._read_response(self._message_id)
        except (OSError, struct.error, ValueError) as exc:
            self.broken = True
            raise WireBroken(f"the association broke while sending: {exc}") from exc

    def _send_dataset(self, context_id: int, dataset: BinaryIO, length: int) -> None:
        remaining = length
        while True:
            wanted = min(self._fragment, remaining)
            fragment = dataset.read(wanted)
            if len(fragment) != wanted:  # half a data set is on the wire: only an abort ends it
                raise ValueError(f"the file ended {remaining - len(fragment)} bytes early while it was sent")
            remaining -= wanted
            self._send_pdv(context_id, fragment, 0 if remaining else _LAST)
            if not remaining:
                return

    def _send_pdv(self, context_id: int, fragment: bytes | memoryview, flags: int) -> None:
        header = (_PDU_HEADER.pack(0x04, len(fragment) + _PDV_HEADER.size)
                  + _PDV_HEADER.pack(len(fragment) + 2, context_id, flags))
        sent = self._sock.sendmsg([header, fragment])
        if sent < len(header) + len(fragment):  # a full send buffer: finish the rest blocking
            self._sock.sendall((header + bytes(fragment))[sent:])

    def _read_response(self, message_id: int) -> StoreResponse:
        command = bytearray()
        while True:
            pdu_type, body = read_pdu(self._sock)
            if pdu_type != 0x04:
                raise WireBroken(_unexpected(pdu_type, "a C-STORE response"))
            for flags, value in _pdvs(body):
                if flags & _COMMAND:
                    command += value
                    if flags & _LAST:
                        return _parse_response(bytes(command), message_id)

    def release(self) -> None:
        """A-RELEASE, then close; a peer that does not answer is simply closed on."""
        try:
            if not self.broken:
                self._sock.sendall(_RELEASE_RQ)
                pdu_type, _ = read_pdu(self._sock)
                if pdu_type != 0x06:
                    self._sock.sendall(_ABORT)
        except (OSError, ValueError):
            pass
        finally:
            self._sock.close()

    def abort(self) -> None:
        try:
            self._sock.sendall(_ABORT)
        except OSError:
            pass
        finally:
            self._sock.close()


@contextmanager
def store_association(host: str, port: int, called_ae: str, calling_ae: str,
                      contexts: Sequence[PresentationContext], timeout: float) -> Iterator[StoreAssociation]:
    """An established association (TCP_NODELAY, immediate ACKs); released on exit, aborted when
    the block raised. :class:`AssociationFailed` when none could be established."""
    association = open_association(host, port, called_ae, calling_ae, contexts, timeout)
    try:
        yield association
    except BaseException:
        association.abort()
        raise
    association.release()


def open_association(host: str, port: int, called_ae: str, calling_ae: str,
                     contexts: Sequence[PresentationContext], timeout: float) -> StoreAssociation:
    node = f"{called_ae}@{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise AssociationFailed(f"cannot connect to {node} (refused, unreachable or no answer in {timeout:g} s: "
                                f"{exc.strerror or exc})", transient=True) from exc
    set_tcp_nodelay(sock)
    proposed = _numbered(contexts)
    try:
        sock.sendall(_associate_rq(calling_ae, called_ae, proposed))
        pdu_type, body = read_pdu(sock)
        return _established(sock, pdu_type, body, proposed, node, called_ae)
    except AssociationFailed:
        sock.close()
        raise
    except (OSError, ValueError, struct.error) as exc:
        sock.close()
        reason = (f"did not answer the association request in {timeout:g} s" if isinstance(exc, TimeoutError)
                  else f"broke off the association request ({exc})")
        raise AssociationFailed(f"{node} {reason}", transient=True) from exc


def _numbered(contexts: Sequence[PresentationContext]) -> dict[int, PresentationContext]:
    numbered = {}
    for number, context in enumerate(contexts):
        copy = PresentationContext()
        copy.context_id = 2 * number + 1
        copy.abstract_syntax = context.abstract_syntax
        copy.transfer_syntax = list(context.transfer_syntax)
        numbered[copy.context_id] = copy
    return numbered


def _associate_rq(calling_ae: str, called_ae: str, contexts: dict[int, PresentationContext]) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = list(contexts.values())
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [maximum, implementation, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _established(sock: socket.socket, pdu_type: int, body: bytes, proposed: dict[int, PresentationContext],
                 node: str, called_ae: str) -> StoreAssociation:
    whole = _PDU_HEADER.pack(pdu_type, len(body)) + body
    if pdu_type == 0x03:
        answer = A_ASSOCIATE_RJ()
        answer.decode(whole)
        rejected = answer.to_primitive()
        raise AssociationFailed(f"{node} rejected the association ({rejected.result_str}, {rejected.source_str}: "
                                f"{rejected.reason_str})", transient=rejected.result == 0x02)
    if pdu_type == 0x07:
        raise AssociationFailed(f"{node} aborted the association request", transient=True)
    if pdu_type != 0x02:
        raise AssociationFailed(f"{node} answered the association request with PDU type 0x{pdu_type:02X}",
                                transient=True)
    answer = A_ASSOCIATE_AC()
    answer.decode(whole)
    accepted_primitive = answer.to_primitive()
    accepted = {cx.context_id: (str(proposed[cx.context_id].abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in accepted_primitive.presentation_context_definition_results_list
                if cx.result == 0x00 and cx.context_id in proposed and cx.transfer_syntax}
    if not accepted:
        sock.sendall(_RELEASE_RQ)
        raise AssociationFailed(f"{node} accepted none of the proposed presentation contexts", transient=False)
    peer_max = next((item.maximum_length_received for item in accepted_primitive.user_information
                     if isinstance(item, MaximumLengthNotification)), 0) or 0
    if 0 < peer_max < MIN_PEER_PDU:  # a fragment of nothing would never end a data set
        sock.sendall(_ABORT)
        raise AssociationFailed(f"{node} accepts P-DATA PDUs of at most {peer_max} bytes; discflow needs "
                                f"{MIN_PEER_PDU} or more", transient=False)
    return StoreAssociation(sock, accepted, min(peer_max, SEND_FRAGMENT) if peer_max else 0, called_ae)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU; ValueError for one over :data:`MAX_PDU_READ`."""
    pdu_type, length = _PDU_HEADER.unpack(_read_exactly(sock, _PDU_HEADER.size))
    if length > MAX_PDU_READ:
        raise ValueError(f"the peer sent a {length}-byte PDU (type 0x{pdu_type:02X}); at most {MAX_PDU_READ} taken")
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        quick_ack(sock)
        count = sock.recv_into(view[received:])
        if not count:
            raise ConnectionResetError("the peer closed the connection")
        received += count
    return bytes(buffer)


def _pdvs(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(message control header, fragment) of each PDV in a P-DATA-TF body."""
    offset = 0
    while offset < len(body):
        length, _context, flags = _PDV_HEADER.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > len(body):
            raise ValueError("a malformed PDV in a P-DATA-TF PDU")
        yield flags, body[offset + 6:offset + 4 + length]
        offset += 4 + length


def _unexpected(pdu_type: int, waiting_for: str) -> str:
    names = {0x05: "an A-RELEASE request", 0x07: "an A-ABORT"}
    return f"the peer sent {names.get(pdu_type, f'PDU type 0x{pdu_type:02X}')} instead of {waiting_for}"


# ------------------------------------------------------------------------------------- DIMSE


def _element(group: int, element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(group, element, len(value)) + value


def _uid(text: str) -> bytes:
    value = text.encode("ascii")
    return value + b"\x00" * (len(value) % 2)


def _store_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """C-STORE-RQ (PS3.7 9.3.1.1), Implicit VR Little Endian, priority MEDIUM, data set present."""
    body = b"".join((
        _element(0x0000, 0x0002, _uid(sop_class)),
        _element(0x0000, 0x0100, struct.pack("<H", 0x0001)),
        _element(0x0000, 0x0110, struct.pack("<H", message_id)),
        _element(0x0000, 0x0700, struct.pack("<H", 0x0000)),
        _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),
        _element(0x0000, 0x1000, _uid(sop_instance)),
    ))
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def _command_elements(command: bytes) -> dict[int, bytes]:
    elements, offset = {}, 0
    while offset + _ELEMENT.size <= len(command):
        group, element, length = _ELEMENT.unpack_from(command, offset)
        offset += _ELEMENT.size
        if group != 0x0000 or offset + length > len(command):
            raise ValueError("a malformed DIMSE command set")
        elements[element] = command[offset:offset + length]
        offset += length
    return elements


def _parse_response(command: bytes, message_id: int) -> StoreResponse:
    elements = _command_elements(command)
    if struct.unpack("<H", elements.get(0x0100, b"\0\0"))[0] != 0x8001:
        raise ValueError("the peer's response is not a C-STORE-RSP")
    if struct.unpack("<H", elements.get(0x0120, b"\0\0"))[0] != message_id:
        raise ValueError("the peer answered another request than the one in flight")
    if 0x0900 not in elements:
        raise ValueError("the peer's C-STORE-RSP has no Status")
    comment = elements.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    return StoreResponse(struct.unpack("<H", elements[0x0900])[0], comment)

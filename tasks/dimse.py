"""DICOM networking: find studies (C-FIND), retrieve series (C-GET), store files (C-STORE).

Plain functions, no Celery. Every association discflow opens goes through
:func:`_association`, which binds :func:`_on_connection_open` (exported for servers as
:data:`TCP_NODELAY_HANDLER`): Nagle's algorithm is off on
every socket discflow opens, and on Linux we ACK at once, which also removes the stall a
stock (Nagle-on) peer would add on its side (see "Known behaviour of the peers" in
DESIGN.md). A future Storage SCP (C-MOVE destination) passes the same handler to
``ae.start_server(..., evt_handlers=[TCP_NODELAY_HANDLER, ...])``.

Pixel data is never decoded on the way through: received instances are written as the
bytes that arrived; C-STORE goes over :mod:`tasks.dicom_wire`, which sends each file's own
bytes after its file meta unless the peer refuses their transfer syntax and the caller
allowed a conversion. C-FIND and C-GET use pynetdicom's associations.

Limits worth knowing:

* An association carries at most 128 presentation contexts. C-GET needs one for the query
  model and one per storage SOP class it may receive (with the SCP role), so
  :func:`retrieve_series` proposes the classes the PACS reported in *SOPClassesInStudy*
  (one context per transfer syntax, so the PACS can send what it stores) and fills the rest
  with pynetdicom's common storage classes. An instance of a class outside those fails as a
  C-GET sub-operation and is reported per series.
* :func:`store_files` needs one context per (SOP class, transfer syntax); more than 128 are
  spread over several associations.
"""
from __future__ import annotations

import hashlib
import io
import os
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from pynetdicom.status import code_to_category
from pynetdicom.transport import AssociationSocket

from tasks.dicom_wire import (
    AssociationFailed,
    StoreAssociation,
    WireBroken,
    quick_ack,
    set_tcp_nodelay,
    store_association,
)
from tasks.part10 import META_PROBE, read_file_meta
from tasks.spool import atomic_writer

LOGGER = logging.getLogger(__name__)
if logging.getLogger("pynetdicom").level == logging.NOTSET:
    # pynetdicom logs C-FIND/C-GET identifiers (Patient ID, ...) at INFO: keep them out of
    # worker logs unless someone asked for pynetdicom's logging explicitly.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

MAX_CONTEXTS = 128
"""Presentation contexts per association (context ids are odd numbers 1..255)."""
MAX_PDU = 262_144
"""The largest PDU we accept; the peer's own maximum bounds what we send."""
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
RETRIEVE_SYNTAXES = (JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless,
                     JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000)
"""Compressed syntaxes offered, one context each, for the SOP classes a study holds, so the
PACS can send what it stores; lossy ones only let lossy-stored data arrive unchanged."""
FALLBACK_RETRIEVE_SYNTAXES = (JPEGLosslessSV1, *UNCOMPRESSED)
"""One context per other storage class: the PACS picks one of these for the whole class."""
STORE_MODES = ("keep", "uncompressed", "negotiate")
_UID_FILE_NAME = re.compile(r"^[0-9][0-9.]{0,63}$")
_NODE_TEXT = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


# --------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Node:
    """A DICOM application entity on the network."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        title = self.ae_title.strip()
        if not title or len(self.ae_title) > 16 or "\\" in title or not title.isprintable():
            raise ValueError(f"not a valid AE title: {self.ae_title!r} (1-16 printable characters, no backslash)")
        if not 0 < self.port < 65536:
            raise ValueError(f"not a valid TCP port: {self.port}")
        if not self.host:
            raise ValueError("a DICOM node needs a host")

    @classmethod
    def parse(cls, text: str) -> Node:
        """``"ORTHANC@127.0.0.1:4242"`` (IPv6 as ``AE@[::1]:104``) to a Node."""
        match = _NODE_TEXT.match(text.strip())
        if match is None:
            raise ValueError(f"not a DICOM node: {text!r}; expected AE_TITLE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(match["ae"], match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class SeriesRef:
    """A series found on a PACS, as C-FIND reported it."""

    study_instance_uid: str
    series_instance_uid: str
    number_of_instances: int | None = None
    modality: str | None = None
    sop_classes_in_study: tuple[str, ...] = ()
    """SOP Classes in Study (0008,0062) when the PACS returns it: what C-GET must accept."""


@dataclass(frozen=True)
class RetrieveFailure:
    series_instance_uid: str
    reason: str


@dataclass
class RetrieveResult:
    instances: int
    bytes: int
    failures: list[RetrieveFailure]
    seconds: float
    transfer_syntaxes: dict[str, int] = field(default_factory=dict)
    """Instances received per transfer syntax UID (what the PACS chose to send)."""

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class StoreOutcome:
    file: Path
    sop_instance_uid: str | None
    status: int | None
    """The C-STORE response status, None when no response came (or nothing was sent)."""
    sent_syntax: str | None
    ok: bool
    reason: str = ""


class DimseError(RuntimeError):
    """A DIMSE operation failed as a whole (status or missing response)."""


# --------------------------------------------------------------------------------------
# Associations, TCP_NODELAY


class _QuickAckSocket(AssociationSocket):
    """An AssociationSocket that ACKs at once before every read (Linux TCP_QUICKACK).

    A stock peer keeps Nagle on and writes a response PDU in more than one send(); its second
    write then waits for our ACK of the first, which Linux delays ~40 ms. ACKing at once
    removes that stall on the peer's side (measured: 100 C-STOREs into stock Orthanc on one
    association 5.0 s -> 0.9 s). The flag is not sticky, so it is set before each read.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        if self.socket is not None:
            quick_ack(self.socket)
        return super().recv(nr_bytes)


def _on_connection_open(event: evt.Event, *args: Any) -> None:
    """EVT_CONN_OPEN fires for requestor and acceptor sockets before any PDU is sent:
    Nagle off (TCP_NODELAY) and immediate ACKs (see :class:`_QuickAckSocket`)."""
    association_socket = event.assoc.dul.socket
    set_tcp_nodelay(association_socket.socket)
    if type(association_socket) is AssociationSocket:
        association_socket.__class__ = _QuickAckSocket  # same layout; only recv() differs
    for connected in args:
        connected.set()


TCP_NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _on_connection_open)
"""Bind on every association and server: ``evt_handlers=[TCP_NODELAY_HANDLER, ...]``."""


def _pause_reactor(assoc: Association) -> None:
    """Stop the association's reactor thread for certain before a request (pynetdicom 3 race).

    pynetdicom's ``send_*``/``release`` clear ``_reactor_checkpoint`` and wait for
    ``_is_paused``, but that flag is still True from the previous pause when the reactor has
    not yet woken up from it; the reactor then wakes, takes our response off the DIMSE queue
    ("Received unexpected C-STORE service message") and the request waits for the whole
    DIMSE timeout before aborting. Fast peers and busy CPUs make it likelier (seen: about 1 in
    100 associations under load). Forgetting the stale flag makes the wait a real handshake.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return  # a pynetdicom without this mechanism: nothing to work around
    checkpoint.clear()
    assoc._is_paused = False
    deadline = time.monotonic() + 5
    while not assoc._is_paused and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0001)


def _application_entity(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


@contextmanager
def _association(node: Node, calling_ae: str, timeout: float, contexts: list[PresentationContext],
                 *, roles: Sequence[Any] = (), handlers: Sequence[tuple[Any, ...]] = ()) -> Iterator[Association]:
    """An established association to ``node`` (TCP_NODELAY on), released on exit."""
    connected = threading.Event()
    assoc = _application_entity(calling_ae, timeout).associate(
        node.host, node.port, contexts=contexts, ae_title=node.ae_title, max_pdu=MAX_PDU,
        ext_neg=list(roles) or None,
        evt_handlers=[(evt.EVT_CONN_OPEN, _on_connection_open, [connected]), *handlers])
    if not assoc.is_established:
        raise _association_failure(assoc, node, connected.is_set(), timeout)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            _pause_reactor(assoc)
            assoc.release()


def _association_failure(assoc: Association, node: Node, connected: bool, timeout: float) -> AssociationFailed:
    if not connected:
        return AssociationFailed(f"cannot connect to {node} (refused, unreachable or no answer in {timeout:g} s)",
                                 transient=True)
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        return AssociationFailed(f"{node} rejected the association ({answer.result_str}, {answer.source_str}: "
                                 f"{answer.reason_str})", transient=answer.result == 0x02)
    if answer is not None and answer.result == 0x00:
        return AssociationFailed(f"{node} accepted none of the proposed presentation contexts", transient=False)
    if assoc.is_aborted:
        return AssociationFailed(f"{node} aborted the association request", transient=True)
    return AssociationFailed(f"{node} did not answer the association request in {timeout:g} s", transient=True)


def _status_text(code: int) -> str:
    return f"0x{code:04X} ({code_to_category(code).lower()})"


# --------------------------------------------------------------------------------------
# C-FIND


def find_instances(node: Node, *, patient_id: str | None = None, study_uids: Sequence[str] = (),
                   accession_number: str | None = None, calling_ae: str = "DISCFLOW",
                   timeout: float = 30) -> list[SeriesRef]:
    """Series of the studies matching every given key (Study Root C-FIND, STUDY then SERIES).

    Keys match exactly: wildcards are refused, and studies whose returned Patient ID or
    Accession Number differs from the one asked for are dropped. Raises
    :class:`AssociationFailed` when the PACS cannot be reached, :class:`DimseError` when a
    C-FIND fails.
    """
    if not (patient_id or study_uids or accession_number):
        raise ValueError("find_instances needs a patient id, an accession number or study UIDs; "
                         "it will not list a whole PACS")
    for key in (patient_id, accession_number):
        if key and any(wildcard in key for wildcard in "*?\\"):
            raise ValueError("patient id and accession number must not contain '*', '?' or '\\'")
    contexts = [build_context(StudyRootQueryRetrieveInformationModelFind)]
    with _association(node, calling_ae, timeout, contexts) as assoc:
        studies = _find_studies(assoc, patient_id, list(study_uids) or [None], accession_number)
        found = [ref for uid, sop_classes in studies.items() for ref in _find_series(assoc, uid, sop_classes)]
    LOGGER.info("C-FIND on %s: %d studies, %d series", node, len(studies), len(found))
    return found


def _c_find(assoc: Association, query: Dataset) -> Iterator[Dataset]:
    _pause_reactor(assoc)
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise DimseError("C-FIND: no response (association aborted or timed out)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and identifier is not None:
            yield identifier
        elif code != 0x0000:
            raise DimseError(f"C-FIND failed with status {_status_text(code)}")


def _find_studies(assoc: Association, patient_id: str | None, study_uids: list[str | None],
                  accession_number: str | None) -> dict[str, tuple[str, ...]]:
    """Study Instance UID -> SOP Classes in Study (empty when the PACS does not say)."""
    studies: dict[str, tuple[str, ...]] = {}
    for study_uid in study_uids:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid or ""
        query.PatientID = patient_id or ""
        query.AccessionNumber = accession_number or ""
        query.SOPClassesInStudy = ""
        for answer in _c_find(assoc, query):
            if _matches(answer, patient_id, accession_number) and answer.get("StudyInstanceUID"):
                studies[str(answer.StudyInstanceUID)] = _uids(answer.get("SOPClassesInStudy"))
    return studies


def _matches(answer: Dataset, patient_id: str | None, accession_number: str | None) -> bool:
    return ((not patient_id or answer.get("PatientID") == patient_id)
            and (not accession_number or answer.get("AccessionNumber") == accession_number))


def _uids(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(str(uid) for uid in value) if isinstance(value, MultiValue) else (str(value),)


def _find_series(assoc: Association, study_uid: str, sop_classes: tuple[str, ...]) -> list[SeriesRef]:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.NumberOfSeriesRelatedInstances = ""
    found = []
    for answer in _c_find(assoc, query):
        count = answer.get("NumberOfSeriesRelatedInstances")
        found.append(SeriesRef(study_uid, str(answer.SeriesInstanceUID),
                               int(count) if count not in (None, "") else None,
                               str(answer.get("Modality") or "") or None, sop_classes))
        LOGGER.debug("series %s in study %s", answer.SeriesInstanceUID, study_uid)
    return found


# --------------------------------------------------------------------------------------
# C-GET


def retrieve_contexts(sop_classes_in_study: Sequence[str]) -> tuple[list[PresentationContext], list[Any]]:
    """Presentation contexts and SCP roles for C-GET, at most :data:`MAX_CONTEXTS` in all.

    The study's own classes get one context per syntax (a PACS picks one syntax per context,
    and separate contexts let it send each instance as stored); if they do not fit, they
    and every other common storage class get one multi-syntax context each.
    """
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    known = list(dict.fromkeys(sop_classes_in_study))
    common = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    if len(known) * (len(RETRIEVE_SYNTAXES) + 1) <= MAX_CONTEXTS - 1:
        for sop_class in known:
            contexts += [build_context(sop_class, syntax) for syntax in RETRIEVE_SYNTAXES]
            contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
        others = [uid for uid in common if uid not in known]
    else:
        others = known + common
    for sop_class in list(dict.fromkeys(others))[:MAX_CONTEXTS - len(contexts)]:
        contexts.append(build_context(sop_class, list(FALLBACK_RETRIEVE_SYNTAXES)))
    roles = [build_role(uid, scp_role=True) for uid in dict.fromkeys(cx.abstract_syntax for cx in contexts[1:])]
    return contexts, roles


class _Received:
    """What the C-STORE sub-operations of one retrieve wrote (shared by its associations)."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.instances = 0
        self.bytes = 0
        self.transfer_syntaxes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, size: int, transfer_syntax: str) -> None:
        with self._lock:
            self.instances += 1
            self.bytes += size
            self.transfer_syntaxes[transfer_syntax] += 1


def instance_file_name(sop_instance_uid: str) -> str:
    """The UID itself when it is a plain UID, else its SHA-1 (never a path, never '..')."""
    if _UID_FILE_NAME.match(sop_instance_uid) and ".." not in sop_instance_uid:
        return sop_instance_uid
    return hashlib.sha1(sop_instance_uid.encode()).hexdigest()


def _on_c_store(event: evt.Event, received: _Received) -> int:
    """Write the dataset as received (with a file meta) under its SOP Instance UID."""
    sop_instance_uid = str(event.request.AffectedSOPInstanceUID)
    encoded = event.encoded_dataset()
    try:
        with atomic_writer(received.destination / instance_file_name(sop_instance_uid)) as handle:
            handle.write(encoded)
    except OSError:
        LOGGER.exception("cannot write a received instance into %s", received.destination)
        return 0xA700
    received.add(len(encoded), str(event.context.transfer_syntax))
    LOGGER.debug("received %s", sop_instance_uid)
    return 0x0000


def retrieve_series(node: Node, series: Sequence[SeriesRef], destination: Path, *, associations: int = 4,
                    calling_ae: str = "DISCFLOW", timeout: float = 30, retries: int = 3,
                    backoff: float = 0.5) -> RetrieveResult:
    """C-GET each series over up to ``associations`` parallel associations into ``destination``.

    Every instance is written as received (Part 10, no decoding), atomically, named by
    :func:`instance_file_name`. A series whose C-GET fails is reported, the others go on;
    an association that cannot be opened is retried like in :func:`store_files`. Running it
    again is harmless: files are replaced atomically.
    """
    started = time.perf_counter()
    destination.mkdir(parents=True, exist_ok=True)
    pending: queue.SimpleQueue[SeriesRef] = queue.SimpleQueue()
    for ref in series:
        pending.put(ref)
    received = _Received(destination)
    contexts, roles = retrieve_contexts([uid for ref in series for uid in ref.sop_classes_in_study])
    failures: list[RetrieveFailure] = []
    width = max(1, min(associations, len(series)))

    policy = _Retry(retries, backoff)

    def work(_: int) -> None:
        failures.extend(_retrieve_worker(node, pending, received, contexts, roles, calling_ae, timeout, policy))

    with ThreadPoolExecutor(width, thread_name_prefix="c-get") as pool:
        list(pool.map(work, range(width)))
    result = RetrieveResult(received.instances, received.bytes, failures, time.perf_counter() - started,
                            dict(received.transfer_syntaxes))
    LOGGER.info("C-GET from %s: %d series, %d instances, %d bytes, %d failed series in %.2f s", node,
                len(series), result.instances, result.bytes, len(failures), result.seconds)
    return result


@dataclass(frozen=True)
class _Retry:
    retries: int
    backoff: float

    def wait(self, attempt: int) -> None:
        """Sleep before attempt number ``attempt`` (0 = the first: no wait)."""
        if attempt:
            time.sleep(self.backoff * 2 ** (attempt - 1))


def _retrieve_worker(node: Node, pending: queue.SimpleQueue[SeriesRef], received: _Received,
                     contexts: list[PresentationContext], roles: list[Any], calling_ae: str,
                     timeout: float, policy: _Retry) -> list[RetrieveFailure]:
    """Take series off ``pending`` until it is empty; one association, reopened if it breaks."""
    failures = []
    handlers = [(evt.EVT_C_STORE, _on_c_store, [received])]
    attempt = 0
    while not pending.empty():
        policy.wait(attempt)
        attempt += 1
        try:
            with _association(node, calling_ae, timeout, contexts, roles=roles, handlers=handlers) as assoc:
                attempt = 0  # every association takes at least one series: no endless loop
                while assoc.is_established and (ref := _next(pending)) is not None:
                    if (reason := _get_series(assoc, ref)) is not None:
                        failures.append(RetrieveFailure(ref.series_instance_uid, reason))
        except AssociationFailed as exc:
            if not exc.transient or attempt > policy.retries:
                reason = f"{exc.reason} (gave up after {attempt} attempt{'s' * (attempt != 1)})"
                failures += [RetrieveFailure(ref.series_instance_uid, reason) for ref in _drain(pending)]
    return failures


def _next(pending: queue.SimpleQueue[SeriesRef]) -> SeriesRef | None:
    try:
        return pending.get_nowait()
    except queue.Empty:
        return None


def _drain(pending: queue.SimpleQueue[SeriesRef]) -> Iterator[SeriesRef]:
    while (ref := _next(pending)) is not None:
        yield ref


def _get_series(assoc: Association, ref: SeriesRef) -> str | None:
    """C-GET one series; None on success, else why it (partly) failed."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = ref.study_instance_uid
    query.SeriesInstanceUID = ref.series_instance_uid
    final: Dataset | None = None
    _pause_reactor(assoc)
    for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
        if not status:
            return "no C-GET response (association aborted or timed out)"
        if int(status.Status) != 0xFF00:
            final = status
    if final is None:
        return "C-GET ended without a final response"
    code = int(final.Status)
    if code == 0x0000:
        return None
    failed = final.get("NumberOfFailedSuboperations")
    return f"C-GET status {_status_text(code)}" + (f", {failed} sub-operations failed" if failed else "")


# --------------------------------------------------------------------------------------
# C-STORE (over tasks.dicom_wire: no reactor thread, the file's own bytes sent as they are)


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    dataset_offset: int | None
    """Where the data set starts after the file meta; None: encode with pydicom (no usable meta)."""


@dataclass(frozen=True)
class _StoreOptions:
    node: Node
    mode: str
    calling_ae: str
    timeout: float
    policy: _Retry
    opener: Opener


ContextKey = tuple[str, tuple[str, ...]]
"""(SOP Class UID, transfer syntaxes) of one proposed presentation context."""


Opener = Callable[[Path], BinaryIO]
"""Opens a file to send; e.g. one that opens files on a medium beneath its root only."""


def _open_file(path: Path) -> BinaryIO:
    return path.open("rb")


def _read_header(path: Path, opener: Opener) -> _Header | StoreOutcome:
    """SOP class, instance and syntax from the file meta (a 16 KB read), else from pydicom."""
    try:
        with opener(path) as handle:
            meta = read_file_meta(handle.read(META_PROBE))
    except Exception as exc:  # OSError, or a medium's refusal: this file fails, the others go on
        return StoreOutcome(path, None, None, None, False, f"cannot read the file: {getattr(exc, 'strerror', 0) or exc}")
    if meta is not None:
        return _Header(path, meta.sop_class_uid, meta.sop_instance_uid, UID(meta.transfer_syntax), meta.dataset_offset)
    return _read_header_with_pydicom(path, opener)


def _read_header_with_pydicom(path: Path, opener: Opener) -> _Header | StoreOutcome:
    try:
        with opener(path) as handle:
            dataset = dcmread(handle, force=True, stop_before_pixels=True,
                              specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception as exc:  # untrusted files: any parse error fails this file only
        return StoreOutcome(path, None, None, None, False, f"cannot read the DICOM header: {exc}")
    meta = dataset.file_meta
    sop_class = meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID") or dataset.get("SOPInstanceUID")
    if not sop_class or not sop_instance:
        return StoreOutcome(path, None, None, None, False, "not a DICOM instance: no SOP Class/Instance UID")
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None:
        syntax = ImplicitVRLittleEndian if dataset.original_encoding[0] else ExplicitVRLittleEndian
    return _Header(path, str(sop_class), str(sop_instance), UID(str(syntax)), None)


def wanted_contexts(sop_class: str, transfer_syntax: str, mode: str) -> list[ContextKey]:
    """The presentation contexts ``mode`` proposes for one (SOP class, file syntax)."""
    if mode == "keep":
        return [(sop_class, (transfer_syntax,))]
    if mode == "uncompressed" or transfer_syntax in UNCOMPRESSED:
        return [(sop_class, UNCOMPRESSED)]
    return [(sop_class, (transfer_syntax,)), (sop_class, UNCOMPRESSED)]


def pack_contexts(needs: dict[Any, list[ContextKey]],
                  limit: int = MAX_CONTEXTS) -> list[tuple[list[ContextKey], list[Any]]]:
    """Group keys so that each group's contexts fit one association: [(contexts, keys), ...]."""
    groups: list[tuple[list[ContextKey], list[Any]]] = []
    for key, wanted in needs.items():
        for contexts, keys in groups:
            if len(set(contexts) | set(wanted)) <= limit:
                contexts.extend(cx for cx in wanted if cx not in contexts)
                keys.append(key)
                break
        else:
            groups.append((list(dict.fromkeys(wanted)), [key]))
    return groups


def store_files(node: Node, files: Sequence[Path], *, mode: str = "negotiate", associations: int = 4,
                calling_ae: str = "DISCFLOW", timeout: float = 30, retries: int = 3,
                backoff: float = 0.5, opener: Opener = _open_file) -> list[StoreOutcome]:
    """C-STORE every file to ``node``; one :class:`StoreOutcome` per file, in order.

    ``mode``: ``keep`` sends the original bytes in their own syntax (refused files fail);
    ``uncompressed`` sends Explicit/Implicit VR Little Endian (decompressing when needed);
    ``negotiate`` proposes both and converts only what the peer refuses in its own syntax.
    Transient failures (no connection, abort, timeout, transient rejection, and a C-STORE
    status that says the PACS is short of resources: 0xA7xx Out of Resources, 0x0213 Resource
    Limitation) are retried on a new association after ``backoff * 2**n`` seconds, ``retries``
    times. Other failure statuses (0xA9xx, 0xCxxx, 0x01xx, ...) say the PACS will not take this
    instance as it is: they are reported at once, never resent. Every file is read through
    ``opener`` (default: a plain open).
    """
    if mode not in STORE_MODES:
        raise ValueError(f"unknown store mode {mode!r}; expected one of {', '.join(STORE_MODES)}")
    started = time.perf_counter()
    options = _StoreOptions(node, mode, calling_ae, timeout, _Retry(retries, backoff), opener)
    headers = [_read_header(Path(path), opener) for path in files]
    outcomes: dict[int, StoreOutcome] = {i: h for i, h in enumerate(headers) if isinstance(h, StoreOutcome)}
    chunks = _store_chunks([(i, h) for i, h in enumerate(headers) if isinstance(h, _Header)], mode, associations)
    with ThreadPoolExecutor(max(1, associations), thread_name_prefix="c-store") as pool:
        for done in pool.map(lambda chunk: _store_chunk(options, *chunk), chunks):
            outcomes.update(done)
    result = [outcomes[i] for i in range(len(headers))]
    LOGGER.info("C-STORE to %s (%s): %d files, %d failed, %d associations in %.2f s", node, mode, len(result),
                sum(not o.ok for o in result), len(chunks), time.perf_counter() - started)
    return result


def _store_chunks(headers: list[tuple[int, _Header]], mode: str, associations: int
                  ) -> list[tuple[list[PresentationContext], list[tuple[int, _Header]]]]:
    """Work units (contexts, files) for one association each: <= 128 contexts, files round-robin."""
    needs = {(h.sop_class_uid, str(h.transfer_syntax)): wanted_contexts(h.sop_class_uid, h.transfer_syntax, mode)
             for _, h in headers}
    chunks = []
    for context_keys, keys in pack_contexts(needs):
        in_group = set(keys)
        members = [(i, h) for i, h in headers if (h.sop_class_uid, str(h.transfer_syntax)) in in_group]
        contexts = [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in context_keys]
        width = max(1, min(associations, len(members)))
        chunks += [(contexts, members[n::width]) for n in range(width)]
    return chunks


def _store_chunk(options: _StoreOptions, contexts: list[PresentationContext],
                 members: list[tuple[int, _Header]]) -> dict[int, StoreOutcome]:
    """Send ``members`` on one association; reopen it (with backoff) while failures are transient.

    An instance the PACS refused for lack of resources (:func:`is_transient_status`) is sent
    again in the next round, with the instances the broken association left; when the
    attempts run out it keeps the PACS's status and says how often it was tried.
    """
    outcomes: dict[int, StoreOutcome] = {}
    refused: dict[int, StoreOutcome] = {}
    """Instances whose last attempt got a transient failure status (sent again next round)."""
    pending, reason, attempts = list(members), "", 0
    node = options.node
    while pending and attempts <= options.policy.retries:
        options.policy.wait(attempts)
        attempts += 1
        unsent = pending
        try:
            with store_association(node.host, node.port, node.ae_title, options.calling_ae, contexts,
                                   options.timeout) as wire:
                unsent = _send_until_broken(wire, pending, options, outcomes)
            reason = "the association was aborted or timed out while sending"
        except AssociationFailed as exc:
            reason = exc.reason
            if not exc.transient:
                break
        finally:
            pending = _retry_later(pending, unsent, outcomes, refused)
    for index, header in pending:
        attempt_text = f"gave up after {attempts} attempt{'s' * (attempts != 1)}"
        last = refused.get(index)
        outcomes[index] = (replace(last, reason=f"{last.reason} ({attempt_text})") if last is not None else
                           StoreOutcome(header.path, header.sop_instance_uid, None, None, False,
                                        f"{reason} ({attempt_text})"))
    return outcomes


def _retry_later(pending: list[tuple[int, _Header]], unsent: list[tuple[int, _Header]],
                 outcomes: dict[int, StoreOutcome], refused: dict[int, StoreOutcome]) -> list[tuple[int, _Header]]:
    """What the next round sends, in the original order: the instances this round did not reach
    and those the PACS refused for a transient reason (their outcome moves to ``refused``)."""
    not_reached = {index for index, _ in unsent}
    again = []
    for index, header in pending:
        if index in not_reached:
            refused.pop(index, None)  # the last word on it is now the association's failure
            again.append((index, header))
        elif not outcomes[index].ok and is_transient_status(outcomes[index].status):
            refused[index] = outcomes.pop(index)
            again.append((index, header))
        else:
            refused.pop(index, None)
    return again


def is_transient_status(status: int | None) -> bool:
    """A C-STORE failure that may pass when tried again later (PS3.4 Annex B.2.3, PS3.7 Annex C):
    0xA7xx Refused: Out of Resources, 0x0213 Resource Limitation."""
    return status is not None and (0xA700 <= status <= 0xA7FF or status == 0x0213)


def _send_until_broken(wire: StoreAssociation, pending: list[tuple[int, _Header]], options: _StoreOptions,
                       outcomes: dict[int, StoreOutcome]) -> list[tuple[int, _Header]]:
    """Send in order; return what is left when the association breaks (else [])."""
    for position, (index, header) in enumerate(pending):
        outcome = _send_one(wire, header, options)
        if outcome is None:
            return pending[position:]
        outcomes[index] = outcome
    return []


def _send_one(wire: StoreAssociation, header: _Header, options: _StoreOptions) -> StoreOutcome | None:
    """C-STORE one file; None when no response came (the caller retries on a new association)."""
    mode = options.mode
    syntax, convert = _choose_syntax(wire, header, mode)
    if syntax is None:
        return _outcome(header, None, None, f"{wire.peer_ae_title} accepted no presentation context for "
                        f"{UID(header.sop_class_uid).name} in {header.transfer_syntax.name}" +
                        ("" if mode == "keep" else " or uncompressed"))
    try:
        payload, length = _payload(header, UID(syntax), convert, options.opener)
    except Exception as exc:  # any codec or encoding error: this file fails, the others go on
        return _outcome(header, None, None, f"cannot convert from {header.transfer_syntax.name}: {exc}")
    context_id = wire.context_for(header.sop_class_uid, syntax)
    try:
        with payload:
            response = wire.c_store(context_id, header.sop_class_uid, header.sop_instance_uid, payload, length)
    except WireBroken as exc:
        LOGGER.warning("C-STORE to %s: %s", wire.peer_ae_title, exc)
        return None
    code = response.status
    ok = code_to_category(code) in ("Success", "Warning")
    reason = "" if code == 0 else f"status {_status_text(code)}" + (
        f": {response.error_comment}" if response.error_comment else "")
    LOGGER.debug("stored %s as %s: 0x%04X", header.sop_instance_uid, syntax, code)
    return _outcome(header, code, syntax, reason, ok)


def _outcome(header: _Header, status: int | None, syntax: str | None, reason: str, ok: bool = False) -> StoreOutcome:
    return StoreOutcome(header.path, header.sop_instance_uid, status, syntax, ok, reason)


def _choose_syntax(wire: StoreAssociation, header: _Header, mode: str) -> tuple[str | None, bool]:
    """(syntax to send in, whether the file must be converted) given the accepted contexts."""
    accepted = {syntax for sop_class, syntax in wire.accepted.values() if sop_class == header.sop_class_uid}
    original = str(header.transfer_syntax)
    if original in accepted and (mode != "uncompressed" or not header.transfer_syntax.is_compressed):
        return original, False
    if mode == "keep":
        return None, False
    target = next((syntax for syntax in UNCOMPRESSED if syntax in accepted), None)
    return target, target is not None


def _payload(header: _Header, syntax: UID, convert: bool, opener: Opener) -> tuple[BinaryIO, int]:
    """(stream, length) of the data set in ``syntax``: the file's own bytes after its meta when
    nothing changes, else pydicom's encoding of the (decompressed when asked) data set."""
    if not convert and header.dataset_offset is not None:
        handle = opener(header.path)  # a real file, from either opener (spool or folder medium)
        try:
            length = os.fstat(handle.fileno()).st_size - header.dataset_offset
            handle.seek(header.dataset_offset)
        except OSError:
            handle.close()
            raise
        return handle, length
    dataset = _converted(header, convert, opener)
    encoded = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise ValueError(f"pydicom cannot encode the data set in {syntax.name}")
    return io.BytesIO(encoded), len(encoded)


def _converted(header: _Header, decompress: bool, opener: Opener) -> Dataset:
    """The whole dataset, re-encoded by :func:`_payload`; pixel data is decompressed only when
    asked and compressed."""
    with opener(header.path) as handle:
        dataset = dcmread(handle, force=True)
    if not hasattr(dataset, "file_meta") or "TransferSyntaxUID" not in dataset.file_meta:
        dataset.ensure_file_meta()
        dataset.file_meta.TransferSyntaxUID = header.transfer_syntax
    if decompress and header.transfer_syntax.is_compressed:
        # pydicom 3 mints a new SOP Instance UID by default; a decompressed copy is the same instance.
        dataset.decompress(generate_instance_uid=False)
    return dataset

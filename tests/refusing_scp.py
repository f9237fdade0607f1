"""A real Storage SCP (pynetdicom) that refuses chosen instances and can go down and come back.

The PACS of the fault tests::

    pacs = RefusingStorageSCP(tmp_path / "pacs").start()
    pacs.refuse({uid_a, uid_b}, CANNOT_UNDERSTAND)           # every attempt, for good
    pacs.refuse({uid_c}, OUT_OF_RESOURCES, times=1)          # the first attempt only: a transient refusal
    pacs.go_down_after(12)                                   # 12 instances stored, then the PACS "crashes"
    ...
    pacs.start()                                             # back, on the same port
    pacs.stop()

What it accepts is written to ``folder`` as received (Part 10, named by SOP Instance UID), and
answered 0x0000 only once it is on disk. Every C-STORE request is counted per SOP Instance UID
(:attr:`attempts`, refused ones too), every stored one in :attr:`stored`, so a test can tell what
a resume sent again. Going down is deterministic: exactly ``count`` instances are stored; the
next C-STORE on any association finds the PACS gone (no answer, the association aborted) and
the listening port closes, so new associations are refused until :meth:`start`.

TCP_NODELAY is set on accepted sockets (the handler discflow itself uses), so tests do not pay
the ~40 ms Nagle stall per instance.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

from peers import free_port
from tasks.dimse import TCP_NODELAY_HANDLER, Node, instance_file_name

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
"""Refused: Out of Resources (PS3.4 B.2.3): transient, a sender should try again later."""
DATA_SET_DOES_NOT_MATCH = 0xA900
"""Error: Data Set does not match SOP Class: permanent."""
CANNOT_UNDERSTAND = 0xC000
"""Error: Cannot understand: permanent."""


@dataclass(frozen=True)
class Refusal:
    """Answer ``status`` to a C-STORE of any of ``sop_instance_uids``: on every attempt
    (``times`` None) or on the first ``times`` attempts of each, then accept it."""

    sop_instance_uids: frozenset[str]
    status: int
    times: int | None = None

    def applies(self, sop_instance_uid: str, attempt: int) -> bool:
        return sop_instance_uid in self.sop_instance_uids and (self.times is None or attempt <= self.times)


class RefusingStorageSCP:
    """A Storage SCP on a loopback port that stays the same across :meth:`stop` / :meth:`start`."""

    def __init__(self, folder: Path, *, ae_title: str = "PACS", port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.node = Node(ae_title, host, port or free_port())
        self.attempts: Counter[str] = Counter()
        """C-STORE requests per SOP Instance UID, whatever the answer (or none)."""
        self.stored: Counter[str] = Counter()
        """Instances written and answered with success, per SOP Instance UID."""
        self.refused: Counter[str] = Counter()
        """Instances answered with a failure status, per SOP Instance UID."""
        self.went_down = threading.Event()
        """Set when the PACS went down (:meth:`go_down_after` or :meth:`stop`); cleared by :meth:`start`."""
        self._refusals: list[Refusal] = []
        self._down_after: int | None = None
        self._reserved = 0  # stores admitted under the go-down budget (done or in flight)
        self._lock = threading.Lock()
        self._server = None
        self._stopping: threading.Thread | None = None

    # --- rules -------------------------------------------------------------------------------

    def refuse(self, sop_instance_uids: Iterable[str], status: int = OUT_OF_RESOURCES,
               times: int | None = None) -> RefusingStorageSCP:
        """Answer ``status`` for these instances (always, or on their first ``times`` attempts)."""
        with self._lock:
            self._refusals.append(Refusal(frozenset(sop_instance_uids), status, times))
        return self

    def stop_refusing(self) -> RefusingStorageSCP:
        with self._lock:
            self._refusals.clear()
        return self

    def go_down_after(self, count: int) -> RefusingStorageSCP:
        """Store ``count`` more instances, then go down: the next C-STORE gets no answer (its
        association is aborted) and the port closes until :meth:`start`."""
        with self._lock:
            self._down_after, self._reserved = count, 0
            self.went_down.clear()
        return self

    # --- what arrived ------------------------------------------------------------------------

    def received_uids(self) -> set[str]:
        """SOP Instance UIDs of the files in the folder (the PACS's holdings; files are named by
        :func:`tasks.dimse.instance_file_name`, the UID itself for every plain UID)."""
        return {path.name for path in self.folder.iterdir() if not path.name.startswith(".")}

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.attempts)

    # --- running -----------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def start(self) -> RefusingStorageSCP:
        """Listen (again) on the same port; a previous go-down is forgotten."""
        self._join_stopping()
        if self._server is not None:
            return self
        with self._lock:
            self._down_after = None
            self.went_down.clear()
        ae = AE(ae_title=self.node.ae_title)
        ae.maximum_associations = 64
        ae.maximum_pdu_size = 0  # unlimited: whole instances in few PDUs (pynetdicom parses each in Python)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server((self.node.host, self.node.port), block=False,
                                       evt_handlers=[TCP_NODELAY_HANDLER, (evt.EVT_C_STORE, self._on_c_store)])
        return self

    def stop(self) -> None:
        """Close the port and abort every open association (a PACS that went away)."""
        self._join_stopping()
        self._shutdown()

    def __enter__(self) -> RefusingStorageSCP:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _shutdown(self, abort_associations: bool = True) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # stops accepting; the port is closed from here on
        if abort_associations:
            for assoc in list(server.active_associations):
                assoc.abort()
        self.went_down.set()

    def _go_down(self) -> None:
        """Close the port, but let the associations that are open finish answering what they
        stored: each dies on its next C-STORE (see :meth:`_on_c_store`), so every instance is
        either on disk and answered with success, or not on disk and not answered."""
        self._shutdown(abort_associations=False)

    def _join_stopping(self) -> None:
        if self._stopping is not None:
            self._stopping.join(30)
            self._stopping = None

    # --- the C-STORE handler -----------------------------------------------------------------

    def _on_c_store(self, event: evt.Event) -> int:
        sop_instance_uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.attempts[sop_instance_uid] += 1
            attempt = self.attempts[sop_instance_uid]
            going_down = self._down_after is not None and self._reserved >= self._down_after
            if not going_down and self._down_after is not None:
                self._reserved += 1
            status = next((r.status for r in self._refusals if r.applies(sop_instance_uid, attempt)), None)
            if going_down and self._stopping is None:
                self._stopping = threading.Thread(target=self._go_down, name="pacs-going-down", daemon=True)
                self._stopping.start()
        if going_down:
            # Nothing written, no answer: the association dies under the sender, as when a PACS crashes.
            event.assoc.abort(block=False)
            return OUT_OF_RESOURCES  # never reaches the sender: the A-ABORT goes out first
        if status is not None:
            with self._lock:
                self.refused[sop_instance_uid] += 1
            LOGGER.debug("refusing %s (attempt %d) with 0x%04X", sop_instance_uid, attempt, status)
            return status
        path = self.folder / instance_file_name(sop_instance_uid)
        temporary = path.with_name(f".{path.name}.{threading.get_ident()}.part")
        temporary.write_bytes(event.encoded_dataset())
        os.replace(temporary, path)
        with self._lock:
            self.stored[sop_instance_uid] += 1
        return SUCCESS

"""Real DICOM peers on this host: Orthanc and DCMTK storescp, each on free ports in its own folder.

Used by ``discflow bench`` (to measure discflow beside real PACS software) and, through the
pytest fixtures in ``tests/peers.py``, by the interoperability tests.

``start_orthanc(folder, tcp_nodelay=True, accepted_transfer_syntaxes=[...])`` starts one Orthanc,
``start_storescp(folder)`` one storescp; ``peer.stop()`` stops either.
A peer whose program is missing raises :class:`PeerUnavailable` (the tests turn that into a skip).

``tcp_nodelay=True`` sets ``TCP_NODELAY=1`` in the peer's environment: DCMTK (inside Orthanc
and storescp) then switches Nagle's algorithm off on its DICOM sockets. Without it the peer
behaves like a stock PACS (see "Known behaviour of the peers" in DESIGN.md).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.dimse import Node

UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
"""For ``accepted_transfer_syntaxes``: a PACS that accepts only uncompressed data."""

_STARTUP_SECONDS = 30.0


class PeerUnavailable(RuntimeError):
    """The peer's program is not installed on this host."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def find_binary(name: str, *fallbacks: str) -> str | None:
    """``name`` on PATH, else the first existing fallback path (``/usr/sbin`` is often off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    return next((path for path in fallbacks if os.access(path, os.X_OK)), None)


def peer_environment(tcp_nodelay: bool) -> dict[str, str]:
    """The environment for a DCMTK-based peer: TCP_NODELAY=1 only when asked for."""
    environment = dict(os.environ)
    environment.pop("TCP_NODELAY", None)
    if tcp_nodelay:
        environment["TCP_NODELAY"] = "1"
    return environment


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes], *, group: bool = False, graceful: bool = True) -> None:
    """Terminate ``process`` (and its process group when it forks children), then kill."""
    if process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    try:
        send(signal.SIGTERM if graceful else signal.SIGKILL)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------
# Orthanc


@dataclass
class OrthancPeer:
    """A running Orthanc: its DICOM node, its REST API on localhost and its tmp directory."""

    node: Node
    http_port: int
    directory: Path
    discflow_port: int
    """The port registered for AE "DISCFLOW" in DicomModalities (for C-MOVE to discflow)."""
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest_bytes(self, path: str, body: bytes | None = None, timeout: float = 60) -> bytes:
        """GET (or POST ``body`` to) ``path`` on the REST API; the raw answer."""
        request = urllib.request.Request(self.base_url + path, data=body, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.read()

    def rest(self, path: str, body: bytes | dict[str, Any] | None = None) -> Any:
        """GET (or POST) ``path`` and decode the JSON answer."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        return json.loads(self.rest_bytes(path, body))

    def upload(self, path: Path) -> dict[str, Any]:
        """POST a Part 10 file to /instances; Orthanc's answer (ID, Status, ...)."""
        return self.rest("/instances", Path(path).read_bytes())  # type: ignore[no-any-return]

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance stored."""
        expanded = self.rest("/instances?expand")
        return {instance["MainDicomTags"]["SOPInstanceUID"] for instance in expanded}

    def lookup(self, sop_instance_uid: str) -> str | None:
        """Orthanc's instance id for a SOP Instance UID, or None."""
        for match in json.loads(self.rest_bytes("/tools/lookup", sop_instance_uid.encode())):
            if match.get("Type") == "Instance":
                return str(match["ID"])
        return None

    def file_bytes(self, orthanc_id: str) -> bytes:
        """The stored Part 10 file of an instance, byte for byte."""
        return self.rest_bytes(f"/instances/{orthanc_id}/file")

    def transfer_syntax(self, orthanc_id: str) -> str:
        """The transfer syntax UID of the stored file (metadata, plain text)."""
        return self.rest_bytes(f"/instances/{orthanc_id}/metadata/TransferSyntax").decode().strip()

    def statistics(self) -> dict[str, Any]:
        return self.rest("/statistics")  # type: ignore[no-any-return]

    def instance_count(self) -> int:
        """How many instances Orthanc holds now (from /statistics, cheap at any size)."""
        return int(self.statistics()["CountInstances"])

    def delete(self, path: str, timeout: float = 120) -> None:
        """DELETE ``path`` on the REST API (e.g. ``/studies/{id}``)."""
        request = urllib.request.Request(self.base_url + path, method="DELETE")
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()

    def delete_all_studies(self) -> None:
        """Empty the PACS between benchmark runs (faster than starting a fresh Orthanc)."""
        for study in self.rest("/studies"):
            self.delete(f"/studies/{study}")

    def log(self) -> str:
        return _log_tail(self.directory / "orthanc.log", lines=200)

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM (Orthanc then takes ~3.5 s to stop) or, for throwaway peers, SIGKILL."""
        _stop(self.process, graceful=graceful)


def orthanc_config(directory: Path, dicom_port: int, http_port: int, discflow_port: int,
                   accepted_transfer_syntaxes: Sequence[str] | None,
                   extra_config: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON configuration of a private, localhost-only test Orthanc."""
    config: dict[str, Any] = {
        "Name": "discflow-test",
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "StorageCompression": False,
        "Plugins": [],
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {"discflow": ["DISCFLOW", "127.0.0.1", discflow_port]},
        "SaveJobs": False,
        # fsync per instance measures the disk, not the network; the timing tests want the latter.
        "SyncStorageArea": False,
    }
    if accepted_transfer_syntaxes is not None:
        config["AcceptedTransferSyntaxes"] = list(accepted_transfer_syntaxes)
    config.update(extra_config or {})
    return config


def start_orthanc(directory: Path, *, tcp_nodelay: bool = False,
                  accepted_transfer_syntaxes: Sequence[str] | None = None,
                  discflow_port: int | None = None, extra_config: dict[str, Any] | None = None,
                  attempts: int = 3) -> OrthancPeer:
    """Start Orthanc in ``directory`` on free ports; wait until REST and DICOM answer."""
    binary = find_binary("Orthanc", "/usr/sbin/Orthanc")
    if binary is None:
        raise PeerUnavailable("Orthanc is not installed (Debian package 'orthanc', /usr/sbin/Orthanc)")
    error = ""
    for _ in range(attempts):  # a free port may be taken between probe and bind: try again
        try:
            return _launch_orthanc(binary, directory, tcp_nodelay, accepted_transfer_syntaxes,
                                   discflow_port or free_port(), extra_config)
        except RuntimeError as exc:
            error = str(exc)
    raise RuntimeError(error)


def _launch_orthanc(binary: str, directory: Path, tcp_nodelay: bool,
                    accepted_transfer_syntaxes: Sequence[str] | None, discflow_port: int,
                    extra_config: dict[str, Any] | None) -> OrthancPeer:
    directory.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(directory, dicom_port, http_port, discflow_port,
                            accepted_transfer_syntaxes, extra_config)
    config_path = directory / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = directory / "orthanc.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen([binary, str(config_path)], cwd=directory, stdout=log,
                                   stderr=subprocess.STDOUT, env=peer_environment(tcp_nodelay))
    peer = OrthancPeer(Node("ORTHANC", "127.0.0.1", dicom_port), http_port, directory,
                       discflow_port, process)
    try:
        _wait_for_orthanc(peer, log_path)
    except RuntimeError:
        peer.stop()
        raise
    return peer


def _wait_for_orthanc(peer: OrthancPeer, log_path: Path) -> None:
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {peer.process.returncode}:\n{_log_tail(log_path)}")
        try:
            peer.rest("/system")
            if _port_open(peer.node.port):
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer within {_STARTUP_SECONDS:.0f} s:\n{_log_tail(log_path)}")


# --------------------------------------------------------------------------------------
# DCMTK storescp


@dataclass
class StoreScpPeer:
    """A running DCMTK storescp writing every received instance into ``output``."""

    node: Node
    output: Path
    directory: Path
    process: subprocess.Popen[bytes]

    def received_files(self) -> list[Path]:
        return sorted(path for path in self.output.iterdir() if path.is_file())

    def log(self) -> str:
        return _log_tail(self.directory / "storescp.log", lines=200)

    def stop(self) -> None:
        _stop(self.process, group=True)


def start_storescp(directory: Path, *, ae_title: str = "STORESCP", tcp_nodelay: bool = False,
                   abort: str | None = None, extra_args: Sequence[str] = ()) -> StoreScpPeer:
    """Start ``storescp`` (all syntaxes, bit-preserving, one forked child per association).

    ``abort="after"`` or ``"during"`` makes it abort every association after / while receiving
    a C-STORE request: the nearest storescp comes to failing. It cannot answer a C-STORE with
    a failure status; a refusing SCP needs another implementation.
    """
    binary = find_binary("storescp")
    if binary is None:
        raise PeerUnavailable("DCMTK storescp is not installed (Debian package 'dcmtk')")
    output = directory / "received"
    output.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary, "--aetitle", ae_title, "--output-directory", str(output),
               "--accept-all", "--bit-preserving", "--fork", *extra_args]
    if abort is not None:
        command.append({"after": "--abort-after", "during": "--abort-during"}[abort])
    log_path = directory / "storescp.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen([*command, str(port)], cwd=directory, stdout=log,
                                   stderr=subprocess.STDOUT, env=peer_environment(tcp_nodelay),
                                   start_new_session=True)
    peer = StoreScpPeer(Node(ae_title, "127.0.0.1", port), output, directory, process)
    _wait_for_port(peer, log_path)
    return peer


def _wait_for_port(peer: StoreScpPeer, log_path: Path) -> None:
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise RuntimeError(f"storescp exited with {peer.process.returncode}:\n{_log_tail(log_path)}")
        if _port_open(peer.node.port):
            return
        time.sleep(0.05)
    peer.stop()
    raise RuntimeError(f"storescp did not listen within {_STARTUP_SECONDS:.0f} s:\n{_log_tail(log_path)}")

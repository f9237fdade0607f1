"""Real DICOM peers for tests: pytest fixtures over :mod:`orchestration.local_peers`.

Import the fixtures into a test module (pytest then finds them there)::

    from peers import orthanc, orthanc_factory, storescp, storescp_factory

``orthanc_factory(tcp_nodelay=True, accepted_transfer_syntaxes=[...])`` starts one more
Orthanc per call and stops every one of them at teardown; ``storescp_factory`` does the same
for storescp.
A peer that is not installed skips the test instead of failing it.

The peers themselves (start-up, REST helpers, TCP_NODELAY environment) live in
``orchestration/local_peers.py`` because ``discflow bench`` starts the same ones.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestration import local_peers
from orchestration.local_peers import (  # noqa: F401 — re-exported for the tests
    UNCOMPRESSED_SYNTAXES,
    OrthancPeer,
    PeerUnavailable,
    StoreScpPeer,
    find_binary,
    free_port,
    orthanc_config,
    peer_environment,
)


def start_orthanc(directory: Path, **options: Any) -> OrthancPeer:
    """:func:`orchestration.local_peers.start_orthanc`, skipping the test when Orthanc is missing."""
    try:
        return local_peers.start_orthanc(directory, **options)
    except PeerUnavailable as missing:
        pytest.skip(str(missing))


def start_storescp(directory: Path, **options: Any) -> StoreScpPeer:
    """:func:`orchestration.local_peers.start_storescp`, skipping the test when DCMTK is missing."""
    try:
        return local_peers.start_storescp(directory, **options)
    except PeerUnavailable as missing:
        pytest.skip(str(missing))


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OrthancPeer]]:
    """A function starting one Orthanc per call (options as :func:`start_orthanc`)."""
    started: list[OrthancPeer] = []

    def start(**options: Any) -> OrthancPeer:
        peer = start_orthanc(tmp_path_factory.mktemp("orthanc"), **options)
        started.append(peer)
        return peer

    yield start
    for peer in reversed(started):
        peer.stop(graceful=False)  # its tmp dir is thrown away; orthanc.log stays for debugging


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancPeer]) -> OrthancPeer:
    """A stock (Nagle on) Orthanc accepting every transfer syntax."""
    return orthanc_factory()


@pytest.fixture
def storescp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., StoreScpPeer]]:
    """A function starting one storescp per call (options as :func:`start_storescp`)."""
    started: list[StoreScpPeer] = []

    def start(**options: Any) -> StoreScpPeer:
        peer = start_storescp(tmp_path_factory.mktemp("storescp"), **options)
        started.append(peer)
        return peer

    yield start
    for peer in reversed(started):
        peer.stop()


@pytest.fixture
def storescp(storescp_factory: Callable[..., StoreScpPeer]) -> StoreScpPeer:
    return storescp_factory()

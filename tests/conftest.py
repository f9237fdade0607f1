"""Shared fixtures: a real CT study, a private spool, Redis brokers with real worker processes."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from orchestration.corpus import StudySpec, build_study
from workers.app import use_broker
from workers.embedded import EmbeddedRedis, LocalWorkers
from workers.settings import reload_settings

SYSTEM_REDIS = os.environ.get("DISCFLOW_TEST_REDIS", "redis://127.0.0.1:6379")
CT_IMAGES = 210


def require_tools(*names: str) -> None:
    missing = [name for name in names if not shutil.which(name)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (bash .ci/run installs them)")


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """210 CT instances from the real 512x512 slice, fresh UIDs, two series."""
    folder = tmp_path_factory.mktemp("ct-study")
    build_study(folder, StudySpec(images=CT_IMAGES, patient_name="TEST^EXPORT", patient_id="DF-E2E-1"))
    return folder


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "spool"
    monkeypatch.setenv("DISCFLOW_SPOOL_DIR", str(folder))
    reload_settings()
    yield folder
    monkeypatch.undo()
    reload_settings()


def _cluster(url: str, count: int, concurrency: int, log_dir: Path) -> Iterator[str]:
    client = redis.Redis.from_url(url)
    for key in client.scan_iter():  # a previous run's queues, but not the claim
        if key != b"discflow:test-claim":
            client.delete(key)
    use_broker(url)
    workers = LocalWorkers(url, concurrency=concurrency, count=count, log_dir=log_dir).start()
    try:
        yield url
    finally:
        workers.stop()


@pytest.fixture
def embedded_cluster(spool: Path, tmp_path: Path) -> Iterator[str]:
    """The embedded default: bundled redis-server on a free port plus one local worker."""
    server = EmbeddedRedis().start()
    try:
        yield from _cluster(server.url, count=1, concurrency=2, log_dir=tmp_path)
    finally:
        server.stop()


def _claim_database(server: str) -> tuple[str, redis.Redis]:
    """A Redis database no other test session is using (sessions may run side by side)."""
    for number in range(1, 16):
        client = redis.Redis.from_url(f"{server}/{number}", socket_connect_timeout=1)
        if client.set("discflow:test-claim", os.getpid(), nx=True, ex=3600):
            return f"{server}/{number}", client
    pytest.skip(f"every database of {server} is claimed by another test session")


@contextmanager
def claimed_system_redis() -> Iterator[str]:
    """A database of the machine's own Redis that no other test session uses, emptied afterwards."""
    try:
        redis.Redis.from_url(SYSTEM_REDIS, socket_connect_timeout=1).ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {SYSTEM_REDIS} (bash .ci/run starts one)")
    url, claim = _claim_database(SYSTEM_REDIS)
    try:
        yield url
    finally:
        claim.flushdb()


@pytest.fixture
def system_redis(spool: Path) -> Iterator[str]:
    with claimed_system_redis() as url:
        yield url


@pytest.fixture
def system_cluster(system_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The machine's own Redis with two worker processes, as a department would run it; exports
    scan in chunks of 64 files here (the embedded cluster keeps one chunk), so both paths run."""
    monkeypatch.setenv("DISCFLOW_SCAN_CHUNK_FILES", "64")
    yield from _cluster(system_redis, count=2, concurrency=1, log_dir=tmp_path)

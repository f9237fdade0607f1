"""The two ledgers every ledger test runs against: a SQLite file and a fresh PostgreSQL database."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

POSTGRES_SERVER = os.environ.get("DISCFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    yield from _postgres_database()


def _postgres_database() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {POSTGRES_SERVER}: {error}")
    name = f"discflow_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{POSTGRES_SERVER.split('://', 1)[1]}/{name}"
    finally:
        from orchestration.ledger import Ledger
        engine = Ledger._engines.pop(f"postgresql+psycopg://{POSTGRES_SERVER.split('://', 1)[1]}/{name}", None)
        if engine is not None:
            engine.dispose()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

"""Fixtures: every database test runs once per database, and KMS is moto's server over real HTTP.

Databases: a test that asks for `database`, `db_url` or `engine` runs on SQLite, PostgreSQL and
MariaDB (narrow with `@pytest.mark.databases("postgresql", ...)`). A server that does not answer
is skipped, or fails the test when KMS_FIELD_REQUIRE_DATABASES=1 (as CI sets). Nothing connects
before a test needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.databases import (
    DATABASES,
    REQUIRE_DATABASES,
    SERVER_URLS,
    URL_VARIABLES,
    create_private_database,
    drop_private_database,
    drop_test_objects,
    probe,
    shown,
)
from tests.kms_server import KmsServer, isolate_aws_environment

REAL_AWS = bool(os.environ.get("KMS_FIELD_TEST_AWS_KEY_ID"))

_unreachable: dict[str, str | None] = {}  # database -> why it does not answer; probed once


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "databases(*names): run only on these of " + ", ".join(DATABASES)
    )
    if not REAL_AWS:  # a run against real AWS keeps the caller's credentials
        isolate_aws_environment(os.environ)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("databases")
    names = list(marker.args) if marker else list(DATABASES)
    unknown = set(names) - set(DATABASES)
    if not names or unknown:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: databases() takes names from {DATABASES}, "
            f"got {sorted(unknown) or 'none'}"
        )
    metafunc.parametrize("database", names, ids=names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REAL_AWS:
        return
    skip = pytest.mark.skip(reason="set KMS_FIELD_TEST_AWS_KEY_ID to run against real AWS KMS")
    for item in items:
        if item.get_closest_marker("aws"):
            item.add_marker(skip)


def _require_reachable(database: str, url: str) -> None:
    if database not in _unreachable:
        _unreachable[database] = probe(url)
    problem = _unreachable[database]
    if problem is None:
        return
    message = (
        f"{database} does not answer at {shown(url)} ({problem}); "
        f"start it or point {URL_VARIABLES[database]} at one"
    )
    if REQUIRE_DATABASES:
        pytest.fail(f"{message}. KMS_FIELD_REQUIRE_DATABASES=1 forbids skipping.", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def db_url(database: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database; every table (and kf_test* schema) is dropped afterwards."""
    if database == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite'}"
        return
    _require_reachable(database, SERVER_URLS[database])
    url = _private_url(database)
    drop_test_objects(url)
    yield url
    drop_test_objects(url)


_private: dict[str, str] = {}  # database -> URL of this session's own database on that server


def _private_url(database: str) -> str:
    if database not in _private:
        _private[database] = create_private_database(SERVER_URLS[database])
    return _private[database]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for database, url in _private.items():
        drop_private_database(SERVER_URLS[database], url)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def kms_server() -> Iterator[KmsServer]:
    """moto's KMS server (fresh state) behind our fault injector, for the whole session."""
    with KmsServer() as server:
        yield server


@pytest.fixture
def kms(kms_server: KmsServer) -> Iterator[KmsServer]:
    """The session's KMS server with counts reset and no faults."""
    kms_server.reset_counts()
    kms_server.clear_faults()
    yield kms_server
    kms_server.clear_faults()


@pytest.fixture
def kms_env(kms: KmsServer, monkeypatch: pytest.MonkeyPatch) -> KmsServer:
    """`kms`, with this process's environment set so a plain `boto3.client("kms")` reaches it."""
    for name, value in kms.env().items():
        monkeypatch.setenv(name, value)
    return kms

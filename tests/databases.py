"""The databases the suite runs on, how to tell whether one answers, and how to leave it empty."""

from __future__ import annotations

import os
import secrets

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

# Tests may create schemas (PostgreSQL) or databases (MariaDB) with this prefix; cleanup drops them.
EXTRA_SCHEMA_PREFIX = "kf_test"

URL_VARIABLES = {
    "postgresql": "KMS_FIELD_TEST_POSTGRESQL_URL",
    "mariadb": "KMS_FIELD_TEST_MARIADB_URL",
}
SERVER_URLS = {
    "postgresql": os.environ.get(
        URL_VARIABLES["postgresql"], "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get(URL_VARIABLES["mariadb"], "mysql+pymysql://root@127.0.0.1:3306/test"),
}
DATABASES = ("sqlite", *SERVER_URLS)  # SQLite: a fresh file per test, always available
# CI sets it: a server that does not answer fails its tests instead of skipping them.
REQUIRE_DATABASES = os.environ.get("KMS_FIELD_REQUIRE_DATABASES", "") in {"1", "true", "yes"}


def shown(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def probe(url: str) -> str | None:
    """None if the database answers `SELECT 1`, else why not (one line)."""
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip()
        return f"{type(exc).__name__}: {reason.splitlines()[0] if reason else ''}"
    finally:
        engine.dispose()
    return None


def create_private_database(url: str) -> str:
    """Create a database of this test session's own on the server of ``url``; return its URL.

    Each pytest run gets its own database, so two runs (two developers, CI and a benchmark)
    never drop each other's tables.
    """
    name = f"kf_run_{os.getpid()}_{secrets.token_hex(3)}"
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            quote = connection.dialect.identifier_preparer.quote
            connection.exec_driver_sql(f"CREATE DATABASE {quote(name)}")
    finally:
        engine.dispose()
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_private_database(server_url: str, private_url: str) -> None:
    name = sa.make_url(private_url).database
    assert name and name.startswith("kf_run_")
    engine = sa.create_engine(server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            quote = connection.dialect.identifier_preparer.quote
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote(name)} WITH (FORCE)")
            else:
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote(name)}")
    finally:
        engine.dispose()


def drop_test_objects(url: str) -> None:
    """Drop every table in the default schema and every schema named kf_test*."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            dialect = connection.dialect.name
            # A test that leaked an open transaction must make this fail, not hang.
            if dialect == "postgresql":
                connection.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            elif dialect == "mysql":
                connection.exec_driver_sql("SET SESSION lock_wait_timeout = 10")
                connection.exec_driver_sql("SET SESSION foreign_key_checks = 0")
            quote = connection.dialect.identifier_preparer.quote_schema
            for schema in sa.inspect(connection).get_schema_names():
                if schema.startswith(EXTRA_SCHEMA_PREFIX):
                    drop = "DROP SCHEMA {} CASCADE" if dialect == "postgresql" else "DROP SCHEMA {}"
                    connection.exec_driver_sql(drop.format(quote(schema)))
            metadata = sa.MetaData()
            metadata.reflect(connection)
            metadata.drop_all(connection)
    finally:
        engine.dispose()

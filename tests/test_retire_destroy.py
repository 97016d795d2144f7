"""Retire and destroy on every database: a census of every column (not only the known ones),
grace periods on the database's clock, and what destroy erases from the key table's storage.

The review that prompted these tests re-encrypted users.email, then retired and destroyed v1
while orders.ship_to, a column nobody had declared, still held rows under it: those rows were
lost. Each test below reproduces such a mistake and checks that it is now refused, naming what
to fix, with every row still readable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope, lifecycle
from sqlalchemy_kms_field.census import ColumnRef, header_prefixes
from sqlalchemy_kms_field.reencrypt import reencrypt_column
from sqlalchemy_kms_field.scan import ScanProgress
from tests.databases import SERVER_URLS
from tests.helpers import configure_local, error_texts, reset_global_registry, unwrapped_key

ACTIVE_TTL = 1.0
SHIP_TO = ["1 Main St, Springfield", "22 Rue de la Paix, Paris", "5 Baker St, London"]


def app_tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """users.email is what the models declare; orders is the application's other table."""
    users = sa.Table(
        "users",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    orders = sa.Table(
        "orders",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ship_to", kf.EncryptedString(400, key="pii")),
        sa.Column("label", kf.EncryptedBytes(key="pii")),
        sa.Column("note", sa.String(200)),
    )
    return users, orders


USERS, ORDERS = app_tables(sa.MetaData())
MODELS = sa.MetaData()  # what the models given to retire declare: users only
USERS.to_metadata(MODELS)


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[kf.KeyRegistry]:
    reset_global_registry(monkeypatch)
    yield configure_local(engine, active_ttl=ACTIVE_TTL)


def fill(engine: sa.Engine) -> None:
    """Users and orders on v1, then the rotation to v2."""
    USERS.create(engine)
    ORDERS.create(engine)
    with engine.begin() as conn:
        conn.execute(USERS.insert(), [{"id": i, "email": f"u{i}@example.com"} for i in (1, 2)])
        conn.execute(
            ORDERS.insert(),
            [{"id": i, "ship_to": a, "label": a.encode()} for i, a in enumerate(SHIP_TO)],
        )
        conn.execute(ORDERS.insert().values(id=9, ship_to=None, label=None, note="plain"))
    kf.rotate_data_key("pii")


def readable(engine: sa.Engine) -> tuple[list[Any], list[Any]]:
    kf.configure(
        master_key=kf.get_registry().master_key, key_store=kf.get_registry().key_store
    )  # a fresh process: nothing cached
    with engine.connect() as conn:
        users = conn.execute(sa.select(USERS.c.email).order_by(USERS.c.id)).scalars().all()
        orders = conn.execute(sa.select(ORDERS.c.ship_to).order_by(ORDERS.c.id)).scalars().all()
    return list(users), list(orders)


def everyone() -> tuple[list[Any], list[Any]]:
    return ["u1@example.com", "u2@example.com"], [*SHIP_TO, None]


def move_back(engine: sa.Engine, column: str, version: int, seconds: float) -> None:
    """Move a version's ``column`` (activated_at, retired_at, created_at) back in time."""
    keys = sa.table("kms_field_keys", sa.column("name"), sa.column("version"),
                    sa.column(column, sa.DateTime))  # fmt: skip
    mine = (keys.c.name == "pii") & (keys.c.version == version)
    with engine.begin() as conn:
        when = conn.execute(sa.select(keys.c[column]).where(mine)).scalar_one()
        conn.execute(keys.update().where(mine).values({column: when - timedelta(seconds=seconds)}))


def wait_out_active_ttl(engine: sa.Engine, version: int) -> None:
    move_back(engine, "activated_at", version, ACTIVE_TTL + 3)


def state(registry: kf.KeyRegistry, version: int) -> str:
    return registry.key_store.get("pii", version).state.value


# A column nobody declared --------------------------------------------------------------------


def test_retire_and_destroy_refused_while_an_undeclared_column_holds_the_version(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill(engine)
    deks = [unwrapped_key(registry, "pii", v) for v in (1, 2)]
    reencrypt_column(engine, "users", "email", key="pii")  # the only column anyone knew of

    with pytest.raises(kf.KeyStateError) as refused:
        lifecycle.retire_data_key("pii", 1, metadata=MODELS)
    message = str(refused.value)
    assert "orders.ship_to: 3 rows, undeclared" in message
    assert "orders.label: 3 rows, undeclared" in message
    assert "users.email" not in message and "orders.note" not in message
    assert "--key pii" in message
    for text in error_texts(refused.value):
        assert not any(a in text for a in SHIP_TO)
        assert not any(d.hex() in text for d in deks)
    assert state(registry, 1) == "readable"
    assert readable(engine) == everyone()

    reencrypt_column(engine, "orders", "ship_to", key="pii")
    with pytest.raises(kf.KeyStateError, match=r"orders\.label: 3 rows") as refused:
        lifecycle.retire_data_key("pii", 1, metadata=MODELS)
    assert "ship_to" not in str(refused.value)
    reencrypt_column(engine, "orders", "label", key="pii")
    lifecycle.retire_data_key("pii", 1, metadata=MODELS)
    assert state(registry, 1) == "retired"

    # After the retirement, a copy of an old value lands in a column nobody declared (a
    # restore from an old backup, a support tool's copy): destroy runs the census again.
    with engine.begin() as conn:
        old = conn.execute(sa.text("SELECT ship_to FROM orders WHERE id = 0")).scalar_one()
        planted = registry.data_key("pii", 2).encrypt_text(b"x", b"").replace("pii:2:", "pii:1:")
        conn.execute(sa.text("UPDATE orders SET note = :v WHERE id = 9"), {"v": planted})
    assert old.startswith("kf2:pii:2:")
    move_back(engine, "retired_at", 1, 3 * 86400)
    with pytest.raises(kf.KeyStateError, match=r"orders\.note: 1 rows, undeclared") as refused:
        lifecycle.destroy_data_key("pii", 1, confirm=True, metadata=MODELS)
    assert "before destroying it" in str(refused.value)
    assert registry.key_store.get("pii", 1).wrapped_key != b""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE orders SET note = NULL WHERE id = 9"))

    done = lifecycle.destroy_data_key("pii", 1, confirm=True, metadata=MODELS)
    assert (done.name, done.version, done.grace_skipped) == ("pii", 1, False)
    assert done.scan.found == [] and done.scan.tables >= 3
    assert state(registry, 1) == "destroyed"
    assert readable(engine) == everyone()


def test_both_formats_kf1_and_kf2_count_as_on_the_version(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    assert header_prefixes("pii", 1) == {"kf1": "kf1:pii:1:", "kf2": "kf2:pii:1:"}
    fill(engine)
    reencrypt_column(engine, "users", "email", key="pii")
    reencrypt_column(engine, "orders", "ship_to", key="pii")
    reencrypt_column(engine, "orders", "label", key="pii")
    wait_out_active_ttl(engine, 2)
    kf1_text, kf1_bytes = "kf1:pii:1:" + "A" * 40, b"kf1:pii:1:" + bytes(40)
    with engine.begin() as conn:  # values of the legacy format, in a known and an unknown column
        conn.execute(sa.text("UPDATE orders SET note = :v WHERE id = 9"), {"v": kf1_text})
        conn.execute(sa.text("UPDATE orders SET label = :v WHERE id = 0"), {"v": kf1_bytes})
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (3, :v)"), {"v": kf1_text})
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (4, :v)"), {"v": "kf1:pii:2:x"})

    [email] = lifecycle.column_census([ColumnRef("users", "email", "pii")])
    assert email.by_version == {1: 1, 2: 3}
    assert email.by_format == {"kf1": {1: 1, 2: 1}, "kf2": {1: 0, 2: 2}}
    assert (email.in_format("kf1"), email.in_format("kf2"), email.other) == (2, 2, 0)

    with pytest.raises(kf.KeyStateError) as refused:  # the known columns first: a cheap refusal
        lifecycle.retire_data_key("pii", 1, metadata=MODELS)
    message = str(refused.value)
    assert "orders.label: 1 rows" in message  # binary, recorded by its job
    assert "users.email: 1 rows" in message
    assert "undeclared" not in message
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM users WHERE id = 3"))
        conn.execute(sa.text("UPDATE orders SET label = NULL WHERE id = 0"))
    with pytest.raises(kf.KeyStateError) as refused:  # then the scan of every column
        lifecycle.retire_data_key("pii", 1, metadata=MODELS)
    assert "(orders.note: 1 rows, undeclared)" in str(refused.value)
    assert state(registry, 1) == "readable"


def test_key_names_differing_only_in_case_are_told_apart(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    # MySQL/MariaDB's default collations ignore case: 'kf1:PII:1:' = 'kf1:pii:1:' there.
    fill(engine)
    reencrypt_column(engine, "users", "email", key="pii")
    reencrypt_column(engine, "orders", "ship_to", key="pii")
    reencrypt_column(engine, "orders", "label", key="pii")
    wait_out_active_ttl(engine, 2)
    other = "kf1:PII:1:" + "A" * 40  # a value of another key, 'PII'
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (5, :v)"), {"v": other})

    [email] = lifecycle.column_census([ColumnRef("users", "email", "pii")])
    assert (email.by_version, email.other) == ({1: 0, 2: 2}, 1)
    lifecycle.retire_data_key("pii", 1, metadata=MODELS)  # 'PII' v1 is not 'pii' v1
    assert state(registry, 1) == "retired"


# Grace periods on the database's clock ---------------------------------------------------------


def test_retire_waits_active_ttl_after_the_next_version_became_active(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    kf.rotate_data_key("pii")  # v1 holds no row anywhere, but a process may still write it
    v2 = registry.key_store.get("pii", 2)
    assert v2.activated_at is not None
    assert abs((registry.key_store.clock() - v2.activated_at).total_seconds()) < 30
    move_back(engine, "created_at", 2, 86400)  # reserved long ago, by a host with another clock

    with pytest.raises(kf.KeyStateError, match="active_ttl") as refused:
        lifecycle.retire_data_key("pii", 1)
    assert "retry in" in str(refused.value) and "database clock" in str(refused.value)
    assert state(registry, 1) == "readable"

    time.sleep(ACTIVE_TTL + 2.5)  # active_ttl and the margin, measured on the database
    lifecycle.retire_data_key("pii", 1)
    assert state(registry, 1) == "retired"
    retired_at = registry.key_store.get("pii", 1).retired_at
    assert retired_at is not None and retired_at >= v2.activated_at


def test_a_reencryption_waits_from_the_activation_not_the_reservation(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill(engine)
    # v2 was reserved (created_at) a day ago, by a host whose clock was off, but became active
    # just now: a process may still write v1 for active_ttl, so the job must wait it out.
    move_back(engine, "created_at", 2, 86400)
    started = time.monotonic()
    reencrypt_column(engine, "users", "email", key="pii")
    assert time.monotonic() - started >= ACTIVE_TTL


def test_destroy_waits_its_grace_period_unless_loudly_skipped(
    engine: sa.Engine, registry: kf.KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    fill(engine)
    for column in ("email", "ship_to", "label"):
        reencrypt_column(engine, "users" if column == "email" else "orders", column, key="pii")
    lifecycle.retire_data_key("pii", 1)

    with pytest.raises(kf.KeyStateError, match="grace period of 3 days ends in") as refused:
        lifecycle.destroy_data_key("pii", 1, confirm=True)
    assert "skip_grace_period=True" in str(refused.value)
    assert "--skip-grace-period" in str(refused.value)
    with pytest.raises(kf.KeyStateError, match="grace period of 4 s"):
        lifecycle.destroy_data_key("pii", 1, confirm=True, grace_period=4)
    with pytest.raises(kf.ConfigurationError, match="grace_period"):
        lifecycle.destroy_data_key("pii", 1, confirm=True, grace_period=-1)
    assert state(registry, 1) == "retired"

    time.sleep(1.2)
    lifecycle.destroy_data_key("pii", 1, confirm=True, grace_period=1.0)  # a short period ended
    assert state(registry, 1) == "destroyed"

    kf.rotate_data_key("pii")  # v3; v2 moves out of the way the same way, then skips the grace
    for column in ("email", "ship_to", "label"):
        reencrypt_column(engine, "users" if column == "email" else "orders", column, key="pii")
    lifecycle.retire_data_key("pii", 2)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_kms_field"):
        done = lifecycle.destroy_data_key("pii", 2, confirm=True, skip_grace_period=True)
    assert done.grace_skipped
    assert any("GRACE PERIOD SKIPPED" in r.getMessage() for r in caplog.records)
    assert state(registry, 2) == "destroyed"
    assert readable(engine) == everyone()


def test_an_old_key_table_keeps_working_and_is_upgraded(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = sa.Table(  # the key table as releases before activated_at/retired_at made it
        "kms_field_keys",
        sa.MetaData(),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("wrapped_key", sa.LargeBinary(4096), nullable=False),
        sa.Column("master_key_id", sa.String(2048), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False, server_default="data"),
    )
    old.create(engine)
    reset_global_registry(monkeypatch)
    registry = kf.configure(
        master_key=kf.LocalMasterKey(bytes(32)), key_store=kf.SqlKeyStore(engine), active_ttl=0
    )
    registry.create_data_key("pii")
    registry.rotate_data_key("pii")  # an application of this release, on the old table
    USERS.create(engine)
    with engine.begin() as conn:
        conn.execute(USERS.insert().values(id=1, email="u1@example.com"))
    assert [(k.version, k.activated_at) for k in registry.key_store.versions()] == [
        (1, None), (2, None),
    ]  # fmt: skip

    with pytest.raises(kf.KeyStateError, match="retry in"):  # upgraded; v2's activation: now
        lifecycle.retire_data_key("pii", 1)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("kms_field_keys")}
    assert {"activated_at", "retired_at"} <= columns
    assert all(k.activated_at is not None for k in registry.key_store.versions())
    kf.SqlKeyStore(engine).create_table()  # idempotent
    wait_out_active_ttl(engine, 2)
    lifecycle.retire_data_key("pii", 1)
    assert state(registry, 1) == "retired"
    with engine.connect() as conn:
        assert conn.execute(sa.select(USERS.c.email)).scalar_one() == "u1@example.com"


# Schemas ---------------------------------------------------------------------------------------


@pytest.fixture
def schemas(engine: sa.Engine) -> Iterator[tuple[str, str]]:
    """Two more schemas. On MariaDB a schema is a database of the whole server, which other
    test sessions' cleanup drops if it is named kf_test*: these get names of their own."""
    prefix = "kf_test_" if engine.dialect.name == "postgresql" else f"kfs_{os.getpid()}_"
    names = (f"{prefix}billing", f"{prefix}crm")
    with engine.begin() as conn:
        for name in names:
            conn.exec_driver_sql(f"CREATE SCHEMA {name}")
    yield names
    with engine.begin() as conn:
        for name in names:
            cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name}{cascade}")


@pytest.mark.databases("postgresql", "mariadb")
def test_the_scan_covers_every_schema_named(
    engine: sa.Engine, registry: kf.KeyRegistry, schemas: tuple[str, str]
) -> None:
    fill(engine)
    for column in ("email", "ship_to", "label"):
        reencrypt_column(engine, "users" if column == "email" else "orders", column, key="pii")
    wait_out_active_ttl(engine, 2)
    old = registry.data_key("pii", 1)
    quote = engine.dialect.identifier_preparer.quote
    billing, crm = schemas
    with engine.begin() as conn:
        for schema, table in ((billing, "invoices"), (crm, "contacts")):
            where = f"{quote(schema)}.{quote(table)}"
            conn.exec_driver_sql(f"CREATE TABLE {where} (id INT PRIMARY KEY, addr TEXT)")
            conn.execute(
                sa.text(f"INSERT INTO {where} VALUES (1, :v), (2, :v)"),
                {
                    "v": old.encrypt_text(
                        b"an address", envelope.encode_context(table, "addr", "str")
                    )
                },
            )

    steps: list[ScanProgress] = []
    with pytest.raises(kf.KeyStateError) as refused:
        lifecycle.retire_data_key("pii", 1, schemas=[crm, billing], progress=steps.append)
    assert f"{billing}.invoices.addr: 2 rows, undeclared" in str(refused.value)
    assert f"{crm}.contacts.addr: 2 rows, undeclared" in str(refused.value)
    assert [s.tables_done for s in steps] == list(range(1, steps[-1].tables_total + 1))
    assert {f"{billing}.invoices", f"{crm}.contacts", "orders"} <= {s.table for s in steps}
    assert steps[-1].schemas == f"(default), {billing}, {crm}"

    with pytest.raises(kf.KeyStateError) as refused:  # only the schemas named are scanned
        lifecycle.retire_data_key("pii", 1, schemas=[crm])
    assert f"{crm}.contacts" in str(refused.value) and "billing" not in str(refused.value)
    if engine.dialect.name == "postgresql":  # on MariaDB, "*" is every database of the server
        with pytest.raises(kf.KeyStateError) as refused:
            lifecycle.retire_data_key("pii", 1, schemas=["*"])
        assert f"{billing}.invoices" in str(refused.value)
        assert f"{crm}.contacts" in str(refused.value)
    with pytest.raises(kf.ConfigurationError, match=r"'kf_test_nowhere' does not exist.*--schema"):
        lifecycle.retire_data_key("pii", 1, schemas=["kf_test_nowhere"])
    assert state(registry, 1) == "readable"


# What destroy erases ---------------------------------------------------------------------------


def retire_v1(engine: sa.Engine, registry: kf.KeyRegistry) -> bytes:
    """v1 retired (no row on it); returns its wrapped key as stored."""
    kf.rotate_data_key("pii")
    wait_out_active_ttl(engine, 2)
    wrapped = registry.key_store.get("pii", 1).wrapped_key
    lifecycle.retire_data_key("pii", 1)
    return wrapped


def heap(engine: sa.Engine) -> bytes:
    """The key table's relation file as on disk (the server runs on this machine)."""
    with engine.connect() as conn:
        conn.exec_driver_sql("CHECKPOINT")  # flush dirty pages to the file
        data = conn.exec_driver_sql(
            "SELECT pg_read_binary_file(pg_relation_filepath('kms_field_keys'))"
        ).scalar_one()
    return bytes(data)


@pytest.mark.databases("postgresql")
def test_destroy_removes_the_wrapped_key_from_the_postgresql_heap(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    wrapped = retire_v1(engine, registry)
    assert len(wrapped) >= 40

    assert wrapped in heap(engine)  # the test can see the bytes it looks for
    with engine.begin() as conn:  # what destroy did before: blank the row, nothing more
        conn.execute(sa.text("UPDATE kms_field_keys SET state = state WHERE version = 1"))
    assert wrapped in heap(engine)  # an UPDATE leaves the old row version as a dead tuple

    done = lifecycle.destroy_data_key("pii", 1, confirm=True, skip_grace_period=True)

    assert done.erased.vacuumed is True and done.erased.problem is None
    assert wrapped not in heap(engine)
    assert wrapped[: len(wrapped) // 2] not in heap(engine)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT state, wrapped_key FROM kms_field_keys WHERE version = 1")
        ).one()
    assert (row.state, bytes(row.wrapped_key)) == ("destroyed", b"")  # a tombstone


@pytest.mark.databases("sqlite")
def test_destroy_leaves_no_copy_in_the_sqlite_file(
    engine: sa.Engine, registry: kf.KeyRegistry, db_url: str
) -> None:
    wrapped = retire_v1(engine, registry)
    path = Path(sa.make_url(db_url).database or "")
    assert wrapped in path.read_bytes()

    done = lifecycle.destroy_data_key("pii", 1, confirm=True, skip_grace_period=True)

    assert done.erased.vacuumed is None
    engine.dispose()
    assert wrapped not in path.read_bytes()
    assert state(registry, 1) == "destroyed"


@pytest.mark.databases("postgresql")
def test_destroy_reports_a_vacuum_that_could_not_run(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    retire_v1(engine, registry)
    with engine.connect() as reader:  # a long transaction that read the key table holds a lock
        reader.execute(sa.text("SELECT count(*) FROM kms_field_keys")).scalar_one()
        started = time.monotonic()
        done = lifecycle.destroy_data_key("pii", 1, confirm=True, skip_grace_period=True)
        assert time.monotonic() - started < 30  # VACUUM FULL waited 5 s for its lock, no more
        reader.rollback()

    assert (done.erased.vacuumed, done.erased.problem) == (False, "LockNotAvailable")
    assert state(registry, 1) == "destroyed"  # the destroy itself is committed
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "0"  # reset


@pytest.mark.databases("postgresql")
def test_destroy_outwaits_an_older_transaction_of_another_database(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    # A transaction with an id, running in another database of the server when the destroy
    # commits, holds back what any VACUUM may remove: the old row version would be copied.
    wrapped = retire_v1(engine, registry)
    elsewhere = sa.create_engine(SERVER_URLS["postgresql"], poolclass=NullPool)
    outcome: list[Any] = []
    with elsewhere.connect() as other:
        other.exec_driver_sql("SELECT txid_current()")  # it has a transaction id from now on
        worker = threading.Thread(
            target=lambda: outcome.append(
                lifecycle.destroy_data_key("pii", 1, confirm=True, skip_grace_period=True)
            )
        )
        worker.start()
        time.sleep(2)
        assert worker.is_alive()  # waiting for the older transaction
        other.rollback()
    worker.join(timeout=60)
    elsewhere.dispose()

    [done] = outcome
    assert (done.erased.vacuumed, done.erased.older_transactions) == (True, 0)
    assert wrapped not in heap(engine)

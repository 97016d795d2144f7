"""Re-encryption jobs on every database: every kind of primary key, resuming, compare-and-swap,
plaintext in and out, and the refusals. Rows are counted per key version by SQL on the header."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.dialects import mysql

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import census, envelope
from sqlalchemy_kms_field.reencrypt import (
    decrypt_column,
    encrypt_column,
    job,
    jobs_table,
    reencrypt_column,
    sweep,
)
from sqlalchemy_kms_field.reencrypt import transform as transforms
from sqlalchemy_kms_field.reencrypt.tables import FINISH, ranges_table
from tests.helpers import (
    MASTER_KEY_B64,
    MASTER_KEY_BYTES,
    assert_no_secret,
    configure_local,
    error_texts,
    reset_global_registry,
    unwrapped_key,
)
from tests.legacy import kf1_binary, kf1_text

EMAILS: list[str | None] = [
    "alice@example.com",
    "bob+tag@example.org",
    None,
    "carol.o'neil@example.net",
    "",
    "dave:colon@example.com",
    "eve@example.io",
    "frank_underscore@example.com",
    "grace%percent@example.com",
]
PHOTOS: list[bytes | None] = [
    bytes(range(256)),
    b"",
    b"\x00kf1:pii:1:not a header in the middle",
    None,
    b"\xff" * 40,
    b"photo-5",
    b"photo-6",
    None,
    b"photo-8",
]
N = len(EMAILS)
NON_NULL_EMAILS = sum(e is not None for e in EMAILS)
NON_NULL_PHOTOS = sum(p is not None for p in PHOTOS)
SECRET_TEXTS = [e for e in EMAILS if e] + ["photo-5", "photo-6", "photo-8"]

PK_KINDS = ["integer", "uuid", "text", "composite"]
_INT_KEYS = [10, -3, 7, 42, 0, 5, 100, 8, 1]
_TEXT_KEYS = ["m", "alpha", "Zed", "row 10", "row 2", "x-1", "émile", "0", "zz"]
_PAIR_KEYS = [
    (1, "b"),
    (1, "a"),
    (2, "a"),
    (0, "z"),
    (2, "c"),
    (1, "c"),
    (3, "a"),
    (2, "b"),
    (0, "a"),
]


class Crash(Exception):
    """Raised by a progress callback to simulate a job killed between two batches."""


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[kf.KeyRegistry]:
    reset_global_registry(monkeypatch)
    yield configure_local(engine)


# Tables and raw views ---------------------------------------------------------------------------


def people_table(
    metadata: sa.MetaData, pk_kind: str = "integer", schema: str | None = None
) -> sa.Table:
    pk: list[sa.Column[Any]]
    if pk_kind == "integer":
        pk = [sa.Column("id", sa.Integer, primary_key=True, autoincrement=False)]
    elif pk_kind == "uuid":
        pk = [sa.Column("id", sa.Uuid, primary_key=True)]
    elif pk_kind == "text":
        pk = [sa.Column("id", sa.String(40), primary_key=True)]
    else:
        pk = [
            sa.Column("tenant", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("code", sa.String(20), primary_key=True),
        ]
    return sa.Table(
        "people",
        metadata,
        *pk,
        sa.Column("n", sa.Integer, nullable=False, unique=True),  # the row's index in EMAILS
        sa.Column("email", kf.EncryptedString(320, key="pii")),
        sa.Column("photo", kf.EncryptedBytes(key="pii")),
        schema=schema,
    )


def pk_values(pk_kind: str, i: int) -> dict[str, Any]:
    if pk_kind == "integer":
        return {"id": _INT_KEYS[i]}
    if pk_kind == "uuid":
        return {"id": uuid.uuid5(uuid.NAMESPACE_URL, f"person/{i}")}
    if pk_kind == "text":
        return {"id": _TEXT_KEYS[i]}
    tenant, code = _PAIR_KEYS[i]
    return {"tenant": tenant, "code": code}


def make_people(engine: sa.Engine, pk_kind: str = "integer", schema: str | None = None) -> sa.Table:
    t = people_table(sa.MetaData(), pk_kind, schema)
    t.create(engine)
    rows = [
        {**pk_values(pk_kind, i), "n": i, "email": EMAILS[i], "photo": PHOTOS[i]} for i in range(N)
    ]
    with engine.begin() as conn:
        conn.execute(t.insert(), rows)
    return t


def reflected(engine: sa.Engine, table: sa.Table) -> sa.Table:
    """The table as the database describes it: plain types, no decryption."""
    return sa.Table(table.name, sa.MetaData(), schema=table.schema, autoload_with=engine)


def raw_rows(engine: sa.Engine, table: sa.Table) -> dict[int, tuple[Any, Any]]:
    """``n -> (email, photo)`` exactly as stored."""
    t = raw_table(table)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.n, t.c.email, t.c.photo)).all()
    return {r.n: (r.email, None if r.photo is None else bytes(r.photo)) for r in rows}


def raw_table(table: sa.Table) -> sa.TableClause:
    """The same table with untyped columns: what it selects is what the database holds."""
    return sa.table(table.name, *(sa.column(c.name) for c in table.columns), schema=table.schema)


def read_rows(engine: sa.Engine, table: sa.Table) -> dict[int, tuple[Any, Any]]:
    """``n -> (email, photo)`` decrypted by the column types."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.n, table.c.email, table.c.photo)).all()
    return {r.n: (r.email, r.photo) for r in rows}


def originals() -> dict[int, tuple[Any, Any]]:
    return {i: (EMAILS[i], PHOTOS[i]) for i in range(N)}


def count_prefix(engine: sa.Engine, table: sa.Table, column: str, prefix: str) -> int:
    """Rows of a text column whose stored value starts with ``prefix``, counted by SQL."""
    t = raw_table(table)
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(t).where(t.c[column].like(prefix + "%"))
        return int(conn.execute(query).scalar_one())


def versions(values: Iterable[Any]) -> Counter[str]:
    """How many stored values are NULL, on each version of 'pii', or plaintext."""
    out: Counter[str] = Counter()
    for value in values:
        if value is None:
            out["null"] += 1
            continue
        found = envelope.parse_header(value)
        out["plain" if found is None else f"{found[0]}:{found[1]}"] += 1
    return out


def job_row(engine: sa.Engine, table: str, column: str, operation: str) -> Any:
    j = jobs_table.c
    with engine.connect() as conn:
        return conn.execute(
            sa.select(jobs_table).where(
                j.table_name == table, j.column_name == column, j.operation == operation
            )
        ).one_or_none()


def assert_clean(
    exc: BaseException, registry: kf.KeyRegistry, plaintexts: Iterable[str | bytes]
) -> None:
    """No key and no plaintext in the error, nor in anything it was chained from."""
    keys = [MASTER_KEY_BYTES] + [
        unwrapped_key(registry, s.name, s.version)
        for s in registry.key_store.versions()
        if s.wrapped_key
    ]
    plain = [p for p in plaintexts if len(p) >= 5]
    for text in error_texts(exc):
        assert_no_secret(text, keys)
        for p in plain:
            spellings = [p] if isinstance(p, str) else [repr(p), p.hex()]
            for s in spellings:
                assert s not in text, f"plaintext {s[:6]!r}... in: {text[:300]!r}"


class TransformSpy:
    """Counts the values the job decrypts or encrypts (``_Transform.many``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = transforms._Transform.many

        def spy(transform: transforms._Transform, values: Any) -> Any:
            self.calls += len(values)
            return real(transform, values)

        monkeypatch.setattr(transforms._Transform, "many", spy)


# Re-encryption ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pk_kind", PK_KINDS)
def test_reencrypt_moves_every_row_whatever_the_primary_key(
    engine: sa.Engine,
    registry: kf.KeyRegistry,
    pk_kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = make_people(engine, pk_kind)
    kf.rotate_data_key("pii")
    before = raw_rows(engine, t)
    assert versions(v[0] for v in before.values()) == {"pii:1": NON_NULL_EMAILS, "null": 1}

    # Killed after the first batch, then rerun: the checkpoint holds a key of this kind.
    def crash(done: int, todo: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        reencrypt_column(engine, "people", "email", key="pii", batch_size=4, progress=crash)
    assert count_prefix(engine, t, "email", "kf2:pii:2:") == 4

    plain = reflected(engine, t)
    pk = list(plain.primary_key.columns)
    with engine.connect() as conn:
        fourth = conn.execute(
            sa.select(*pk).where(plain.c.email.is_not(None)).order_by(*pk).limit(4)
        ).all()[-1]
    starts: list[Any] = []
    real_sweep = sweep._Job.sweep

    def spy(job: Any, claim: Any, owner: str, *ahead: Any) -> None:
        starts.append(claim.start)
        real_sweep(job, claim, owner, *ahead)

    monkeypatch.setattr(sweep._Job, "sweep", spy)
    result = reencrypt_column(engine, "people", "email", key="pii", batch_size=4)
    assert starts[0] == tuple(fourth), "the rerun did not resume after the checkpoint"
    assert (result.rows_written, result.finished, result.remaining) == (
        NON_NULL_EMAILS - 4,
        True,
        0,
    )

    photos = reencrypt_column(engine, "people", "photo", key="pii", batch_size=4)
    assert (photos.rows_written, photos.finished) == (NON_NULL_PHOTOS, True)

    after = raw_rows(engine, t)
    assert count_prefix(engine, t, "email", "kf2:pii:2:") == NON_NULL_EMAILS
    assert count_prefix(engine, t, "email", "kf2:pii:1:") == 0
    assert versions(v[0] for v in after.values()) == {"pii:2": NON_NULL_EMAILS, "null": 1}
    assert versions(v[1] for v in after.values()) == {"pii:2": NON_NULL_PHOTOS, "null": 2}
    for n, (email, photo) in after.items():  # every value rewritten, NULLs left alone
        assert (email is None) == (before[n][0] is None)
        assert (photo is None) == (before[n][1] is None)
        assert email is None or email != before[n][0]
        assert photo is None or photo != before[n][1]
    registry.forget()
    assert read_rows(engine, t) == originals()


@pytest.fixture
def schema(engine: sa.Engine) -> Iterator[str]:
    """A second schema. On MariaDB a schema is a database of the whole server, and every test
    session's cleanup drops all kf_test* databases there, so it gets a name of its own."""
    if engine.dialect.name == "postgresql":  # inside this session's private database
        name = "kf_test_s"
    else:
        name = f"kfs_{os.getpid()}_{secrets.token_hex(3)}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {name}")
    yield name
    with engine.begin() as conn:
        cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name}{cascade}")


@pytest.mark.databases("postgresql", "mariadb")
def test_reencrypt_a_schema_qualified_table(
    engine: sa.Engine, registry: kf.KeyRegistry, schema: str
) -> None:
    t = make_people(engine, "composite", schema=schema)
    people_table(sa.MetaData()).create(engine)  # a same-named table in the default schema
    kf.rotate_data_key("pii")

    result = reencrypt_column(engine, "people", "email", key="pii", schema=schema, batch_size=4)
    photos = reencrypt_column(engine, "people", "photo", key="pii", schema=schema, batch_size=4)

    assert (result.rows_written, photos.rows_written) == (NON_NULL_EMAILS, NON_NULL_PHOTOS)
    assert str(result.column) == f"{schema}.people.email"
    after = raw_rows(engine, t)
    assert versions(v[0] for v in after.values()) == {"pii:2": NON_NULL_EMAILS, "null": 1}
    assert versions(v[1] for v in after.values()) == {"pii:2": NON_NULL_PHOTOS, "null": 2}
    registry.forget()
    assert read_rows(engine, t) == originals()
    assert census.ColumnRef("people", "email", "pii", schema) in census.known_columns(engine)
    row = job_row(engine, "people", "email", "reencrypt")
    assert (row.table_schema, row.rows_done, row.finished_at is not None) == (
        schema,
        NON_NULL_EMAILS,
        True,
    )


def test_rows_already_on_the_target_are_not_decrypted(
    engine: sa.Engine, registry: kf.KeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make_people(engine)  # 8 emails on v1
    kf.rotate_data_key("pii")
    with engine.begin() as conn:
        conn.execute(
            t.insert(),
            [{"id": 1000 + i, "n": N + i, "email": f"new{i}@example.com"} for i in range(5)],
        )
    on_v2 = {n: v for n, v in raw_rows(engine, t).items() if n >= N}
    spy = TransformSpy(monkeypatch)

    first = reencrypt_column(engine, "people", "email", key="pii", batch_size=3)
    assert (spy.calls, first.rows_written) == (NON_NULL_EMAILS, NON_NULL_EMAILS)
    after = raw_rows(engine, t)
    assert {n: v for n, v in after.items() if n >= N} == on_v2  # untouched, byte for byte
    assert count_prefix(engine, t, "email", "kf2:pii:2:") == NON_NULL_EMAILS + 5

    spy.calls = 0
    second = reencrypt_column(engine, "people", "email", key="pii", batch_size=3)
    assert (spy.calls, second.rows_written, second.sweeps, second.finished) == (0, 0, 1, True)
    assert raw_rows(engine, t) == after


def test_a_crashed_job_resumes_from_its_checkpoint(
    engine: sa.Engine, registry: kf.KeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = people_table(sa.MetaData())
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(
            t.insert(), [{"id": i, "n": i, "email": f"user{i}@example.com"} for i in range(10)]
        )
    kf.rotate_data_key("pii")
    spy = TransformSpy(monkeypatch)
    calls: list[tuple[int, int]] = []

    def crash_after_two_batches(done: int, todo: int) -> None:
        calls.append((done, todo))
        if len(calls) == 2:
            raise Crash

    with pytest.raises(Crash):
        reencrypt_column(
            engine, "people", "email", key="pii", batch_size=3, progress=crash_after_two_batches
        )
    assert calls == [(3, 10), (6, 10)]
    row = job_row(engine, "people", "email", "reencrypt")
    assert (row.target_version, row.finished_at) == (2, None)
    # The checkpoint lives on the job's range (ranges.py), committed with each batch.
    with engine.connect() as conn:
        r = ranges_table.c
        done = conn.execute(
            sa.select(sa.func.sum(r.rows_done), sa.func.count()).where(
                r.table_name == "people", r.column_name == "email", r.range_no != FINISH
            )
        ).one()
    assert tuple(done) == (6, 1)
    assert count_prefix(engine, t, "email", "kf2:pii:2:") == 6
    # On servers the job reads (and decrypts) one batch ahead while it writes the last one.
    read_ahead = 0 if engine.dialect.name == "sqlite" else 3
    assert 6 <= spy.calls <= 6 + read_ahead

    spy.calls = 0
    result = reencrypt_column(engine, "people", "email", key="pii", batch_size=3)
    assert (result.rows_written, result.rows_conflicted, result.finished) == (4, 0, True)
    assert spy.calls == 4  # resumed after row 6: rows 0-5 were neither decrypted nor written
    row = job_row(engine, "people", "email", "reencrypt")
    assert row.rows_done == 10  # continued from 6, not restarted
    assert row.finished_at is not None
    assert count_prefix(engine, t, "email", "kf2:pii:2:") == 10
    registry.forget()
    with engine.connect() as conn:
        emails = conn.execute(sa.select(t.c.email).order_by(t.c.id)).scalars().all()
    assert emails == [f"user{i}@example.com" for i in range(10)]


def test_dry_run_counts_and_changes_nothing(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    t = make_people(engine)
    kf.rotate_data_key("pii")
    before = raw_rows(engine, t)

    result = reencrypt_column(engine, "people", "email", key="pii", dry_run=True)
    photos = reencrypt_column(engine, "people", "photo", key="pii", dry_run=True)

    assert (result.dry_run, result.remaining, result.rows_written) == (True, NON_NULL_EMAILS, 0)
    assert (result.finished, result.target_version) == (False, 2)
    assert photos.remaining == NON_NULL_PHOTOS
    assert raw_rows(engine, t) == before
    assert job_row(engine, "people", "email", "reencrypt") is None
    assert census.known_columns(engine) == []


def test_rows_per_second_throttles_the_job(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    t = people_table(sa.MetaData())
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(
            t.insert(), [{"id": i, "n": i, "email": f"u{i}@example.com"} for i in range(12)]
        )
    kf.rotate_data_key("pii")

    started = time.monotonic()
    result = reencrypt_column(
        engine, "people", "email", key="pii", batch_size=4, rows_per_second=30
    )
    elapsed = time.monotonic() - started

    assert result.rows_written == 12
    assert elapsed >= 0.3, f"12 rows at 30 rows/s took only {elapsed:.2f} s"  # 0.4 s expected
    assert elapsed < 10


def test_a_row_changed_during_the_batch_is_not_overwritten(
    engine: sa.Engine, registry: kf.KeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make_people(engine)
    v1 = registry.data_key("pii", 1)
    kf.rotate_data_key("pii")
    victim = 5  # n of the row the application changes
    stored = raw_rows(engine, t)[victim][0]
    # The application writes meanwhile, from a process still on v1 (its active version is cached).
    app_value = v1.encrypt_text(
        b"changed-by-the-app@example.com", envelope.encode_context("people", "email", "str")
    )
    real = transforms._Transform.many
    changed: list[Any] = []

    def transform_then_race(transform: transforms._Transform, values: Any) -> Any:
        out = real(transform, values)
        if stored in values and not changed:
            # After the job's SELECT of this batch, before its UPDATE: another connection commits.
            with engine.connect() as other:
                other.execute(
                    sa.text("UPDATE people SET email = :v WHERE n = :n"),
                    {"v": app_value, "n": victim},
                )
                other.commit()
            changed.append(stored)
        return out

    monkeypatch.setattr(transforms._Transform, "many", transform_then_race)
    result = reencrypt_column(engine, "people", "email", key="pii", batch_size=20, settle_timeout=5)

    assert changed, "the race was never staged"
    assert result.rows_conflicted == 1
    assert result.sweeps >= 2  # the census found the application's v1 value and swept again
    assert result.finished
    assert count_prefix(engine, t, "email", "kf2:pii:2:") == NON_NULL_EMAILS
    registry.forget()
    got = read_rows(engine, t)
    assert got[victim][0] == "changed-by-the-app@example.com"
    assert all(got[n][0] == EMAILS[n] for n in range(N) if n != victim)


def test_an_undecryptable_row_stops_the_batch_with_a_clean_error(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    t = make_people(engine)
    kf.rotate_data_key("pii")
    broken = raw_rows(engine, t)[6][0]
    tampered = broken[:-3] + ("A" if broken[-3] != "A" else "B") + broken[-2:]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE people SET email = :v WHERE n = 6"), {"v": tampered})
    before = raw_rows(engine, t)

    with pytest.raises(kf.KmsFieldError) as raised:
        reencrypt_column(engine, "people", "email", key="pii", batch_size=50)

    error = raised.value
    assert isinstance(error, kf.ReencryptionError)
    assert (error.table, error.column, error.primary_key) == ("people", "email", (_INT_KEYS[6],))
    assert "people.email" in str(error) and "'pii' version 1" in str(error)
    assert_clean(error, registry, SECRET_TEXTS)
    assert raw_rows(engine, t) == before  # nothing of that batch was written

    result = reencrypt_column(engine, "people", "email", key="pii", skip_undecryptable=True)
    assert (result.skipped, result.finished, result.rows_written) == (
        [_INT_KEYS[6]],
        True,
        NON_NULL_EMAILS - 1,
    )
    assert raw_rows(engine, t)[6][0] == tampered


def test_no_in_memory_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)
    for url in ("sqlite://", "sqlite:///:memory:"):
        engine = sa.create_engine(url)
        try:
            with pytest.raises(kf.ConfigurationError, match="in-memory SQLite"):
                reencrypt_column(engine, "people", "email", key="pii")
            with pytest.raises(kf.ConfigurationError, match="in-memory SQLite"):
                encrypt_column(engine, "people", "email", key="pii")
        finally:
            engine.dispose()


def test_a_table_without_primary_key_is_refused(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    t = sa.Table(
        "logbook",
        sa.MetaData(),
        sa.Column("at", sa.Integer),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"at": 1, "email": "alice@example.com"}])
    kf.rotate_data_key("pii")
    before = raw_rows_of(engine, "logbook", "email")

    with pytest.raises(kf.ConfigurationError, match="no primary key") as raised:
        reencrypt_column(engine, "logbook", "email", key="pii")
    assert "'logbook'" in str(raised.value)
    assert_clean(raised.value, registry, ["alice@example.com"])
    assert raw_rows_of(engine, "logbook", "email") == before


def raw_rows_of(engine: sa.Engine, table: str, column: str) -> list[Any]:
    t = sa.Table(table, sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(t.c[column])).scalars().all(), key=repr)


# Plaintext in and out ---------------------------------------------------------------------------

PLAIN_EMAILS: list[str | None] = [
    f"user{i}@example.com" if i % 5 else ("" if i == 5 else None) for i in range(12)
]


def app_users(metadata: sa.MetaData) -> sa.Table:
    """The application's view while the column is migrated: header-less values are plaintext."""
    return sa.Table(
        "users",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii", accept_plaintext=True)),
    )


@pytest.fixture
def plain_users(engine: sa.Engine, registry: kf.KeyRegistry) -> sa.Table:
    """``users.email`` in plaintext, then widened for ciphertext as migration 0003 does."""
    plain = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(320)),
    )
    plain.create(engine)
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "email": e} for i, e in enumerate(PLAIN_EMAILS)])
        operations = Operations(MigrationContext.configure(conn))
        with operations.batch_alter_table("users") as batch:
            batch.alter_column(
                "email", type_=kf.EncryptedString(320, key="pii"), existing_type=sa.String(320)
            )
    return app_users(sa.MetaData())


def app_read(engine: sa.Engine, users: sa.Table) -> list[str | None]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(users.c.email).order_by(users.c.id)).scalars())


def raw_users(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT email FROM users ORDER BY id")).scalars())


def test_encrypt_column_while_the_application_reads(
    engine: sa.Engine, plain_users: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert app_read(engine, plain_users) == PLAIN_EMAILS
    seen: list[Counter[str]] = []

    def read_between_batches(done: int, todo: int) -> None:
        assert app_read(engine, plain_users) == PLAIN_EMAILS
        seen.append(versions(raw_users(engine)))

    result = encrypt_column(
        engine, "users", "email", key="pii", batch_size=3, progress=read_between_batches
    )

    non_null = sum(e is not None for e in PLAIN_EMAILS)
    assert (result.rows_written, result.finished, result.target_version) == (non_null, True, 1)
    assert len(seen) == 4
    assert seen[0] == {"pii:1": 3, "plain": non_null - 3, "null": 2}  # mixed, and still read
    assert app_read(engine, plain_users) == PLAIN_EMAILS
    assert versions(raw_users(engine)) == {"pii:1": non_null, "null": 2}
    assert count_prefix(engine, plain_users, "email", "kf2:pii:1:") == non_null
    for stored, plain in zip(raw_users(engine), PLAIN_EMAILS, strict=True):
        assert (stored is None) == (plain is None)
        assert not plain or plain not in stored
    # The application without the migration flag reads the finished column too.
    strict = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    assert app_read(engine, strict) == PLAIN_EMAILS
    assert census.ColumnRef("users", "email", "pii") in census.known_columns(engine)

    # Run again (after a rotation, even): nothing to do, nothing refused, nothing decrypted.
    stored = raw_users(engine)
    kf.rotate_data_key("pii")
    spy = TransformSpy(monkeypatch)
    again = encrypt_column(engine, "users", "email", key="pii", batch_size=3)
    assert (again.rows_written, again.finished, again.sweeps, spy.calls) == (0, True, 1, 0)
    assert raw_users(engine) == stored


def test_decrypt_column_gives_back_the_plaintext(
    engine: sa.Engine, plain_users: sa.Table, registry: kf.KeyRegistry
) -> None:
    encrypt_column(engine, "users", "email", key="pii", batch_size=5)
    kf.rotate_data_key("pii")
    with engine.begin() as conn:  # a row written on v2 after the rotation
        conn.execute(
            plain_users.update().where(plain_users.c.id == 1).values(email="v2@example.com")
        )
    expected = ["v2@example.com" if i == 1 else e for i, e in enumerate(PLAIN_EMAILS)]
    assert versions(raw_users(engine))["pii:2"] == 1

    result = decrypt_column(engine, "users", "email", key="pii", batch_size=5)

    assert (result.rows_written, result.finished) == (sum(e is not None for e in expected), True)
    assert raw_users(engine) == expected
    assert app_read(engine, plain_users) == expected
    assert census.known_columns(engine) == []  # no longer an encrypted column
    again = decrypt_column(engine, "users", "email", key="pii")
    assert (again.rows_written, again.finished) == (0, True)


def test_encrypt_and_decrypt_a_binary_column(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    plain = sa.Table(
        "files",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("photo", sa.LargeBinary),
    )
    plain.create(engine)
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "photo": p} for i, p in enumerate(PHOTOS)])
    app = sa.Table(
        "files",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("photo", kf.EncryptedBytes(key="pii", accept_plaintext=True)),
    )

    def stored() -> list[bytes | None]:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(plain.c.photo).order_by(plain.c.id)).scalars()
            return [None if v is None else bytes(v) for v in rows]

    encrypted = encrypt_column(engine, "files", "photo", key="pii", batch_size=4)
    left = [p for p, v in zip(PHOTOS, stored(), strict=True) if v is not None and v == p]
    assert left == [], f"left in plaintext by a finished={encrypted.finished} job"
    assert versions(stored()) == {"pii:1": NON_NULL_PHOTOS, "null": 2}
    assert encrypted.rows_written == NON_NULL_PHOTOS
    with engine.connect() as conn:
        assert conn.execute(sa.select(app.c.photo).order_by(app.c.id)).scalars().all() == PHOTOS

    decrypted = decrypt_column(engine, "files", "photo", key="pii", batch_size=4)
    assert decrypted.rows_written == NON_NULL_PHOTOS
    assert stored() == PHOTOS


@pytest.mark.databases("postgresql", "mariadb")
def test_a_column_too_narrow_for_ciphertext_loses_nothing(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """encrypt_column on a column that was not widened: the database must refuse the batch (no
    value may be cut short), and the error must not carry the batch's plaintext with it."""
    plain = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(40)),
    )
    plain.create(engine)
    secrets = [f"secret-person-{i}@example.com" for i in range(4)]
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "email": e} for i, e in enumerate(secrets)])

    error: BaseException | None = None
    try:
        encrypt_column(engine, "users", "email", key="pii", batch_size=10)
    except Exception as exc:
        error = exc

    for stored, secret in zip(raw_users(engine), secrets, strict=True):
        assert stored == secret or decrypts_to(registry, stored, secret), (
            f"the plaintext was replaced by {stored!r}, which does not decrypt to it: lost"
        )
    assert error is not None, "the job reported success on a column too narrow for ciphertext"
    assert_clean(error, registry, secrets)


def decrypts_to(registry: kf.KeyRegistry, stored: str, plaintext: str) -> bool:
    try:
        name, version = envelope.parse_header(stored) or ("", 0)
        context = envelope.encode_context("users", "email", "str")
        return registry.data_key(name, version).decrypt_text(stored, context) == plaintext.encode()
    except kf.KmsFieldError:
        return False


NON_ASCII = ["Ωmegasecretxyz Üñíçødé", "zoë-qvxjwyzk@exämple.com", "東京都渋谷区secretward"]


def assert_no_fragment(exc: BaseException, plaintexts: Iterable[str]) -> None:
    """Not even four characters of a plaintext (a database may quote the start of a value)."""
    for text in error_texts(exc):
        for p in plaintexts:
            for i in range(len(p) - 3):
                assert p[i : i + 4] not in text, f"plaintext fragment {p[i : i + 4]!r} in {text!r}"


def test_encrypt_and_decrypt_non_ascii_plaintext(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """Names and addresses are rarely ASCII: the documented path (widen as migration 0003 does,
    encrypt, later decrypt) must carry them in and out unchanged."""
    plain = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(320)),
    )
    plain.create(engine)
    with engine.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "email": e} for i, e in enumerate(NON_ASCII)])
    try:
        with engine.begin() as conn:
            operations = Operations(MigrationContext.configure(conn))
            with operations.batch_alter_table("users") as batch:
                batch.alter_column(
                    "email", type_=kf.EncryptedString(320, key="pii"), existing_type=sa.String(320)
                )
    except sa.exc.DBAPIError as exc:
        pytest.fail(
            "widening the column to EncryptedString(320) as migration 0003 does failed on "
            f"{engine.dialect.name}: {type(exc.orig).__name__}: the plaintext does not fit the "
            "ciphertext column's character set"
        )
    users = app_users(sa.MetaData())

    encrypt_column(engine, "users", "email", key="pii")
    assert versions(raw_users(engine)) == {"pii:1": len(NON_ASCII)}
    assert app_read(engine, users) == NON_ASCII
    decrypt_column(engine, "users", "email", key="pii")
    assert raw_users(engine) == NON_ASCII


def test_decrypt_column_of_non_ascii_values(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    """A column encrypted from day one, then taken back out: either the plaintext comes back, or
    a clean error leaves every row encrypted and quotes no plaintext."""
    users = sa.Table(
        "users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    users.create(engine)
    with engine.begin() as conn:
        conn.execute(users.insert(), [{"id": i, "email": e} for i, e in enumerate(NON_ASCII)])
    before = raw_users(engine)

    try:
        decrypt_column(engine, "users", "email", key="pii")
    except Exception as exc:
        assert raw_users(engine) == before  # nothing of the batch was written
        assert_no_fragment(exc, NON_ASCII)
        assert_clean(exc, registry, NON_ASCII)
        assert isinstance(exc, kf.KmsFieldError), f"not a library error: {type(exc).__name__}"
        assert "users.email" in str(exc)
    else:
        assert raw_users(engine) == NON_ASCII


# PostgreSQL's batch statement -------------------------------------------------------------------


@pytest.fixture
def cursor_engine(db_url: str, cursor: str) -> Iterator[sa.Engine]:
    """An engine whose psycopg connections use the default cursor, or (``cursor="client"``)
    the ClientCursor; the tests parametrize ``cursor``."""
    import psycopg

    args = {"cursor_factory": psycopg.ClientCursor} if cursor == "client" else {}
    engine = sa.create_engine(db_url, connect_args=args)
    yield engine
    engine.dispose()


@pytest.mark.databases("postgresql")
@pytest.mark.parametrize("cursor", ["default", "client"])
@pytest.mark.parametrize("pk_kind", ["integer", "composite"])
def test_postgresql_writes_a_batch_in_one_statement_whatever_the_cursor(
    cursor_engine: sa.Engine, registry: kf.KeyRegistry, cursor: str, pk_kind: str
) -> None:
    """psycopg's default cursor sends the arrays in binary, with the checkpoint in the same
    statement; its ClientCursor cannot send binary parameters and gets text arrays instead."""
    engine = cursor_engine
    seen: list[str] = []

    def record(conn: Any, dbapi_cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    t = make_people(engine, pk_kind)
    kf.rotate_data_key("pii")
    sa.event.listen(engine, "before_cursor_execute", record)
    result = reencrypt_column(engine, "people", "email", key="pii", batch_size=3)
    photos = reencrypt_column(engine, "people", "photo", key="pii", batch_size=3)
    sa.event.remove(engine, "before_cursor_execute", record)

    batch_writes = [s for s in seen if s.startswith(("WITH", "UPDATE")) and "unnest(" in s]
    assert len(batch_writes) == 3 + 3  # 8 emails and 7 photos in batches of 3
    if cursor == "default":
        assert all(s.startswith("WITH moved AS (UPDATE") for s in batch_writes)
        assert all("kms_field_job_ranges" in s and ")b::" in s for s in batch_writes)
    else:
        assert all(s.startswith("UPDATE") and "CAST(CAST(" in s for s in batch_writes)
    assert (result.rows_written, photos.rows_written) == (NON_NULL_EMAILS, NON_NULL_PHOTOS)
    assert count_prefix(engine, t, "email", "kf2:pii:2:") == NON_NULL_EMAILS
    with engine.connect() as conn:  # the checkpoints counted every row
        done = conn.execute(
            sa.select(jobs_table.c.column_name, jobs_table.c.rows_done).where(
                jobs_table.c.table_name == "people"
            )
        ).all()
    assert sorted(done) == [("email", NON_NULL_EMAILS), ("photo", NON_NULL_PHOTOS)]
    registry.forget()
    assert read_rows(engine, t) == originals()


@pytest.mark.databases("postgresql")
@pytest.mark.parametrize("cursor", ["default", "client"])
def test_postgresql_table_and_column_names_with_percent_signs(
    cursor_engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """The batch statement is a driver-level string, where "%" is special."""
    engine = cursor_engine
    t = sa.Table(
        "odd%(x)s table",
        sa.MetaData(),
        sa.Column("id%", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("e%s", kf.EncryptedString(100, key="pii")),
    )
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id%": i, "e%s": f"user{i}@example.com"} for i in range(7)])
    kf.rotate_data_key("pii")
    result = reencrypt_column(engine, "odd%(x)s table", "e%s", key="pii", batch_size=3)
    assert (result.rows_written, result.finished) == (7, True)
    with engine.connect() as conn:
        stored = conn.execute(sa.text('SELECT "e%s" FROM "odd%(x)s table"')).scalars().all()
        assert all(v.startswith("kf2:pii:2:") for v in stored)
        assert conn.execute(sa.select(t.c["e%s"]).order_by(t.c["id%"])).scalars().all() == [
            f"user{i}@example.com" for i in range(7)
        ]


# Format kf1 to kf2, and the context values are bound to -----------------------------------------
# Raw tables (plain Text and LargeBinary columns): what the job reads and writes is checked by
# decrypting with the data key and the context the values must be bound to.


BIN_VARCHAR = mysql.VARCHAR(600, charset="utf8mb4", collation="utf8mb4_bin")


def docs_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "docs",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        # A binary collation on MariaDB, as the library's types declare: header checks by SQL
        # are exact (case-sensitive) there.
        sa.Column("body", sa.String(600).with_variant(BIN_VARCHAR, "mysql", "mariadb")),
        sa.Column("blob", sa.LargeBinary),
    )


def ctx(codec: str, column: str = "body", table: str = "docs") -> bytes:
    return envelope.encode_context(table, column, codec)


def stored_docs(engine: sa.Engine) -> dict[int, tuple[Any, Any]]:
    t = docs_table(sa.MetaData())
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.id, t.c.body, t.c.blob)).all()
    return {r.id: (r.body, None if r.blob is None else bytes(r.blob)) for r in rows}


def open_value(registry: kf.KeyRegistry, stored: str | bytes, context: bytes) -> bytes:
    """Decrypt one stored value with the key version its header names, under ``context``."""
    found = envelope.parse(stored)
    assert found is not None, stored
    key = registry.data_key(found[1], found[2])
    if isinstance(stored, bytes):
        return key.decrypt_binary(stored, context)
    return key.decrypt_text(stored, context)


def fill_docs(engine: sa.Engine, rows: dict[int, tuple[Any, Any]]) -> sa.Table:
    t = docs_table(sa.MetaData())
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i, "body": b, "blob": p} for i, (b, p) in rows.items()])
    return t


def test_kf1_values_move_to_kf2_on_the_same_version_and_after_a_rotation(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    v1 = registry.data_key("pii", 1)
    texts = {i: f"person{i}@exämple.com" for i in range(12)}
    blobs = {i: bytes([i]) * (i * 3) for i in range(12)}
    fill_docs(
        engine,
        {i: (kf1_text(v1, texts[i].encode()), kf1_binary(v1, blobs[i])) for i in range(12)},
    )
    assert versions(v[0] for v in stored_docs(engine).values()) == {"pii:1": 12}

    # Version 1 is still the active one: kf1:pii:1: rows are not done, they are kf1.
    dry = reencrypt_column(engine, "docs", "body", key="pii", codec="str", dry_run=True)
    assert (dry.remaining, dry.target_version) == (12, 1)
    text_job = reencrypt_column(engine, "docs", "body", key="pii", codec="str", batch_size=5)
    blob_job = reencrypt_column(engine, "docs", "blob", key="pii", batch_size=5)

    assert (text_job.rows_written, text_job.finished, text_job.codec) == (12, True, "str")
    assert (blob_job.rows_written, blob_job.codec, blob_job.context) == (
        12,
        "bytes",
        ("docs", "blob"),
    )
    after = stored_docs(engine)
    assert all(
        b.startswith("kf2:pii:1:") and p.startswith(b"kf2:pii:1:") for b, p in after.values()
    )
    registry.forget()
    for i, (body, blob) in after.items():
        assert open_value(registry, body, ctx("str")) == texts[i].encode()
        assert open_value(registry, blob, ctx("bytes", "blob")) == blobs[i]
        with pytest.raises(kf.DecryptionError):  # bound to its place now
            open_value(registry, body, ctx("str", "blob"))

    # A rotation with a mix: kf1 on the new version too (a process of the old library version
    # wrote it), kf2 on the old one, and kf2 on the new one, which is left alone.
    kf.rotate_data_key("pii")
    v2 = registry.data_key("pii", 2)
    t = docs_table(sa.MetaData())
    mixed = {
        100: kf1_text(v2, b"kf1 on v2"),
        101: v1.encrypt_text(b"kf2 on v1", ctx("str")),
        102: v2.encrypt_text(b"kf2 on v2", ctx("str")),
    }
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i, "body": v} for i, v in mixed.items()])
    result = reencrypt_column(engine, "docs", "body", key="pii", batch_size=5)

    assert (result.rows_written, result.codec, result.target_version) == (14, "str", 2)
    final = stored_docs(engine)
    assert final[102][0] == mixed[102], "a kf2 value on the target version is not rewritten"
    assert all(b.startswith("kf2:pii:2:") for b, _ in final.values())
    assert open_value(registry, final[100][0], ctx("str")) == b"kf1 on v2"
    assert open_value(registry, final[101][0], ctx("str")) == b"kf2 on v1"
    assert reencrypt_column(engine, "docs", "body", key="pii").rows_written == 0


def test_a_text_column_holding_only_kf1_values_needs_the_codec(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    v1 = registry.data_key("pii", 1)
    fill_docs(engine, {i: (kf1_text(v1, b'{"a": 1}'), None) for i in range(3)})
    before = stored_docs(engine)

    with pytest.raises(kf.ConfigurationError, match="codec=") as raised:
        reencrypt_column(engine, "docs", "body", key="pii")
    message = str(raised.value)
    assert "--codec" in message and "docs.body" in message and "'json'" in message
    assert stored_docs(engine) == before
    assert job_row(engine, "docs", "body", "reencrypt") is None

    result = reencrypt_column(engine, "docs", "body", key="pii", codec="json")
    assert result.rows_written == 3
    assert {open_value(registry, b, ctx("json")) for b, _ in stored_docs(engine).values()} == {
        b'{"a": 1}'
    }


@pytest.mark.parametrize("codec", ["json", "int", "decimal", "datetime"])
def test_the_codec_is_learnt_from_the_kf2_values_in_the_column(
    engine: sa.Engine, registry: kf.KeyRegistry, codec: str
) -> None:
    v1 = registry.data_key("pii", 1)
    fill_docs(
        engine,
        {
            1: (kf1_text(v1, b"41"), None),
            2: (v1.encrypt_text(b"42", ctx(codec)), None),
            3: (None, None),
            4: (kf1_text(v1, b"43"), None),
        },
    )
    kf.rotate_data_key("pii")

    result = reencrypt_column(engine, "docs", "body", key="pii", batch_size=2)

    assert (result.codec, result.rows_written, result.finished) == (codec, 3, True)
    after = stored_docs(engine)
    registry.forget()
    for i, plain in ((1, b"41"), (2, b"42"), (4, b"43")):
        body = after[i][0]
        assert body.startswith("kf2:pii:2:")
        assert open_value(registry, body, ctx(codec)) == plain
        for other in ("str", "json", "int"):
            if other != codec:
                with pytest.raises(kf.DecryptionError):
                    open_value(registry, body, ctx(other))
        # Padded as that codec's values are by default: the length tells nothing.
        raw = envelope.b64decode(body[len("kf2:pii:2:") :])
        pad = envelope.DEFAULT_PADS.get(codec, 0)
        assert len(raw) - 12 - 16 == envelope.padded_size(2, pad)


def test_values_written_for_an_explicit_context_need_that_context(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """A column type declaring context=("customers", "email_address") (say, after a table was
    renamed): the job on docs.body must be told, or it would bind the values elsewhere."""
    v1 = registry.data_key("pii", 1)
    declared = envelope.encode_context("customers", "email_address", "str")
    fill_docs(
        engine,
        {i: (v1.encrypt_text(f"c{i}@example.com".encode(), declared), None) for i in range(5)},
    )
    kf.rotate_data_key("pii")
    before = stored_docs(engine)

    with pytest.raises(kf.ConfigurationError) as raised:
        reencrypt_column(engine, "docs", "body", key="pii")
    message = str(raised.value)
    assert "context=" in message and "--context" in message and "--codec" in message
    assert "docs.body" in message
    assert stored_docs(engine) == before
    assert job_row(engine, "docs", "body", "reencrypt") is None
    with pytest.raises(kf.ConfigurationError, match="codec 'int'"):  # a wrong codec, told
        reencrypt_column(engine, "docs", "body", key="pii", codec="int")
    assert stored_docs(engine) == before

    result = reencrypt_column(engine, "docs", "body", key="pii", context="customers.email_address")

    assert (result.rows_written, result.context, result.codec) == (
        5,
        ("customers", "email_address"),
        "str",
    )
    for i, (body, _) in stored_docs(engine).items():
        assert body.startswith("kf2:pii:2:")
        assert open_value(registry, body, declared) == f"c{i}@example.com".encode()
    again = reencrypt_column(
        engine, "docs", "body", key="pii", context=("customers", "email_address")
    )
    assert (again.rows_written, again.finished) == (0, True)


def test_a_kf2_value_moved_from_another_column_is_not_laundered(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """An attacker who can write SQL copies a kf2 value of another column (same data key) into
    docs.body, hoping the re-encryption rebinds it to docs.body. It must stop at that row."""
    v1 = registry.data_key("pii", 1)
    rows = {i: (v1.encrypt_text(f"body {i}".encode(), ctx("str")), None) for i in range(1, 9)}
    secret = v1.encrypt_text(b"123-45-6789", ctx("str", "ssn", "people"))
    rows[5] = (secret, None)
    fill_docs(engine, rows)
    kf.rotate_data_key("pii")
    before = stored_docs(engine)

    with pytest.raises(kf.ReencryptionError) as raised:
        reencrypt_column(engine, "docs", "body", key="pii", batch_size=3)

    error = raised.value
    assert error.primary_key == (5,)
    assert isinstance(error.__cause__, kf.DecryptionError)
    assert "'pii' version 1" in str(error) and "moved" in str(error)
    assert_clean(error, registry, ["123-45-6789"])
    after = stored_docs(engine)
    assert after[5] == before[5]
    assert all(after[i] == before[i] for i in range(4, 9)), "the failed batch wrote nothing"

    skipped = reencrypt_column(
        engine, "docs", "body", key="pii", batch_size=3, skip_undecryptable=True
    )
    assert (skipped.skipped, skipped.rows_written) == ([5], 4)
    assert stored_docs(engine)[5][0] == secret, "left as it was: still unreadable as docs.body"
    with pytest.raises(kf.DecryptionError):
        open_value(registry, secret, ctx("str"))


@pytest.mark.parametrize(
    "value",
    [
        "KF1:pii:1:AAECAwQFBgcICQoLDPp4JMWlGgqDp2JlpH50hA",
        " kf2:pii:1:AAECAwQFBgcICQoL6HASWEK_r9vyS5lrdviRBhI",
        "kf3:pii:1:AAECAwQFBgcICQoL6HASWEK_r9vyS5lrdviRBhI",
        "kf2:other:1:AAECAwQFBgcICQoL6HASWEK_r9vyS5lrdviRBhI",
    ],
    ids=["upper-case", "leading-space", "unknown-format", "another-key"],
)
def test_encrypt_refuses_what_is_or_looks_like_ciphertext(
    engine: sa.Engine, registry: kf.KeyRegistry, value: str
) -> None:
    fill_docs(engine, {1: ("plain one", None), 2: (value, None), 3: ("plain three", None)})
    before = stored_docs(engine)

    with pytest.raises(kf.ReencryptionError) as raised:
        encrypt_column(engine, "docs", "body", key="pii")

    assert raised.value.primary_key == (2,)
    assert "ciphertext" in str(raised.value)
    assert stored_docs(engine) == before, "nothing encrypted, nothing encrypted twice"

    result = encrypt_column(engine, "docs", "body", key="pii", skip_undecryptable=True)
    assert (result.skipped, result.rows_written, result.codec) == ([2], 2, "str")
    after = stored_docs(engine)
    assert after[2] == before[2]
    assert open_value(registry, after[1][0], ctx("str")) == b"plain one"


def test_encrypt_binds_the_codec_given_or_learnt(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill_docs(engine, {1: ('{"a": 1}', b"raw"), 2: ("[2]", None)})

    result = encrypt_column(engine, "docs", "body", key="pii", codec="json", pad=64)
    blobs = encrypt_column(engine, "docs", "blob", key="pii")

    assert (result.codec, blobs.codec) == ("json", "bytes")
    after = stored_docs(engine)
    assert open_value(registry, after[1][0], ctx("json")) == b'{"a": 1}'
    assert open_value(registry, after[1][1], ctx("bytes", "blob")) == b"raw"
    assert len(envelope.b64decode(after[2][0][len("kf2:pii:1:") :])) == 12 + 64 + 16
    # The application then writes a plaintext row; a second run learns "json" from the column.
    with engine.begin() as conn:
        conn.execute(docs_table(sa.MetaData()).insert(), [{"id": 3, "body": '"x"'}])
    again = encrypt_column(engine, "docs", "body", key="pii")
    assert (again.codec, again.rows_written) == ("json", 1)
    assert open_value(registry, stored_docs(engine)[3][0], ctx("json")) == b'"x"'


def test_decrypt_column_reads_kf1_and_kf2(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    v1 = registry.data_key("pii", 1)
    kf.rotate_data_key("pii")
    v2 = registry.data_key("pii", 2)
    fill_docs(
        engine,
        {
            1: (kf1_text(v1, "é one".encode()), kf1_binary(v2, b"\x00one")),
            2: (
                v2.encrypt_text(b"two", ctx("str"), 16),
                v1.encrypt_binary(b"two", ctx("bytes", "blob")),
            ),
            3: (kf1_text(v2, b"three"), None),
        },
    )

    texts = decrypt_column(engine, "docs", "body", key="pii")
    blobs = decrypt_column(engine, "docs", "blob", key="pii")

    assert (texts.rows_written, blobs.rows_written) == (3, 2)
    assert stored_docs(engine) == {1: ("é one", b"\x00one"), 2: ("two", b"two"), 3: ("three", None)}


def test_only_kf1_values_then_a_kf2_value_met_by_decrypt(
    engine: sa.Engine, registry: kf.KeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decrypt needs no codec for kf1 values; a kf2 value written meanwhile is learnt from."""
    v1 = registry.data_key("pii", 1)
    fill_docs(engine, {1: (kf1_text(v1, b"one"), None), 2: (kf1_text(v1, b"two"), None)})
    monkeypatch.setattr(job, "_kf2_samples", lambda *args, **kwargs: [])
    with engine.begin() as conn:
        conn.execute(
            docs_table(sa.MetaData()).insert(),
            [{"id": 3, "body": v1.encrypt_text(b"three", ctx("int"))}],
        )
    result = decrypt_column(engine, "docs", "body", key="pii")
    assert (result.rows_written, result.codec) == (3, None)
    assert [b for b, _ in stored_docs(engine).values()] == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"codec": "varchar"}, "codec='varchar' is not a codec"),
        ({"codec": "bytes"}, "'bytes' is for binary columns"),
        ({"pad": -1}, "pad=-1"),
        ({"pad": 1.5}, "pad=1.5"),
        ({"context": "docs"}, "context='docs'"),
        ({"context": "a.b.c"}, "table.column"),
    ],
)
def test_bad_format_options_are_refused_naming_the_argument(
    engine: sa.Engine, registry: kf.KeyRegistry, options: dict[str, Any], complaint: str
) -> None:
    fill_docs(engine, {1: ("x", b"y")})
    with pytest.raises(kf.ConfigurationError) as raised:
        reencrypt_column(engine, "docs", "body", key="pii", **options)
    assert complaint in str(raised.value)
    with pytest.raises(kf.ConfigurationError, match="use 'bytes'"):
        encrypt_column(engine, "docs", "blob", key="pii", codec="str")
    assert stored_docs(engine) == {1: ("x", b"y")}


# Row-bound columns (bind_to) --------------------------------------------------------------------


def accounts_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "accounts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tenant", sa.String(20), nullable=False),
        sa.Column("ssn", kf.EncryptedString(40, key="pii", bind_to=("id", "tenant"))),
    )


SSNS = {i: f"{100 + i}-45-{6789 + i}" for i in range(1, 8)}


def test_a_row_bound_column_is_rotated_and_stays_bound_to_its_row(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    t = accounts_table(sa.MetaData())
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(
            t.insert(), [{"id": i, "tenant": f"t{i % 3}", "ssn": s} for i, s in SSNS.items()]
        )
    kf.rotate_data_key("pii")
    raw = raw_table(t)
    with engine.connect() as conn:
        before = dict(conn.execute(sa.select(raw.c.id, raw.c.ssn)).all())

    # Not told the bound columns, the job cannot authenticate any value: it refuses, naming it.
    with pytest.raises(kf.ConfigurationError, match="--bind-to"):
        reencrypt_column(engine, "accounts", "ssn", key="pii")
    with pytest.raises(kf.ConfigurationError, match="bind_to="):
        reencrypt_column(engine, "accounts", "ssn", key="pii", bind_to=("id", "nope"))

    # A value copied into another row: the job stops at that row, it does not rebind it.
    with engine.begin() as conn:
        conn.execute(raw.update().where(raw.c.id == 5).values(ssn=before[2]))
    with pytest.raises(kf.ReencryptionError) as raised:
        reencrypt_column(engine, "accounts", "ssn", key="pii", bind_to=("id", "tenant"))
    assert raised.value.primary_key == (5,)
    assert_clean(raised.value, registry, list(SSNS.values()))
    with engine.begin() as conn:
        conn.execute(raw.update().where(raw.c.id == 5).values(ssn=before[5]))

    result = reencrypt_column(
        engine, "accounts", "ssn", key="pii", bind_to=("id", "tenant"), batch_size=3
    )

    assert (result.rows_written, result.finished, result.codec) == (7, True, "str")
    with engine.connect() as conn:
        after = dict(conn.execute(sa.select(raw.c.id, raw.c.ssn)).all())
    assert all(v.startswith("kf2:pii:2:") for v in after.values())
    registry.forget()
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(t.c.id, t.c.ssn)).all()) == SSNS
    with engine.begin() as conn:  # still bound: another row's value does not read here
        conn.execute(raw.update().where(raw.c.id == 5).values(ssn=after[2]))
    with engine.connect() as conn, pytest.raises(kf.DecryptionError):
        conn.execute(sa.select(t.c.ssn).where(t.c.id == 5)).all()


def test_decrypt_and_encrypt_a_row_bound_column(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    t = accounts_table(sa.MetaData())
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i, "tenant": "t", "ssn": s} for i, s in SSNS.items()])
    raw = raw_table(t)

    out = decrypt_column(engine, "accounts", "ssn", key="pii", bind_to=("id", "tenant"))
    assert out.rows_written == 7
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(raw.c.id, raw.c.ssn)).all()) == SSNS

    back = encrypt_column(engine, "accounts", "ssn", key="pii", bind_to=["id", "tenant"])
    assert back.rows_written == 7
    registry.forget()
    with engine.connect() as conn:
        assert dict(conn.execute(sa.select(t.c.id, t.c.ssn)).all()) == SSNS


# The command line passes the options through ----------------------------------------------------


def run_cli(
    engine: sa.Engine, *args: str, code: int = 0, models: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``kms-field ARGS`` in a subprocess; ``models``: a module file the models setting names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_FIELD_")}
    if models is not None:
        env["KMS_FIELD_MODELS"] = f"{models.stem}:metadata"
    env.update(
        KMS_FIELD_DATABASE_URL=engine.url.render_as_string(hide_password=False),
        KMS_FIELD_MASTER_KEY="local-env:KF_TEST_MASTER_KEY",
        KF_TEST_MASTER_KEY=MASTER_KEY_B64,
        KMS_FIELD_ACTIVE_TTL="0",
        PYTHONIOENCODING="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_kms_field.cli", *args],
        env=env,
        cwd=models.parent if models is not None else None,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.databases("sqlite", "postgresql")
def test_cli_reencrypt_takes_codec_context_and_bind_to(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    v1 = registry.data_key("pii", 1)
    declared = envelope.encode_context("customers", "email_address", "json")
    fill_docs(
        engine,
        {1: (kf1_text(v1, b'"one"'), None), 2: (v1.encrypt_text(b'"two"', declared), None)},
    )
    before = stored_docs(engine)

    refused = run_cli(engine, "reencrypt", "docs.body", "--key", "pii", code=1).stderr
    assert "--context" in refused and "--codec" in refused
    wrong = run_cli(engine, "reencrypt", "docs.body", "--codec", "varchar", code=2).stderr
    assert "--codec" in wrong
    assert stored_docs(engine) == before

    done = run_cli(
        engine, "reencrypt", "docs.body", "--key", "pii", "--context", "customers.email_address"
    ).stdout
    assert "reencrypt docs.body: finished" in done
    assert "bound to:     customers.email_address, codec json" in done
    after = stored_docs(engine)
    assert {open_value(registry, b, declared) for b, _ in after.values()} == {b'"one"', b'"two"'}

    run_cli(
        engine,
        "decrypt-column",
        "docs.body",
        "--key",
        "pii",
        "--context",
        "customers.email_address",
    )
    assert stored_docs(engine) == {1: ('"one"', None), 2: ('"two"', None)}
    run_cli(engine, "encrypt-column", "docs.body", "--key", "pii", "--codec", "json", "--pad", "32")
    encrypted = stored_docs(engine)
    assert open_value(registry, encrypted[1][0], ctx("json")) == b'"one"'
    assert len(envelope.b64decode(encrypted[1][0][len("kf2:pii:1:") :])) == 12 + 32 + 16


MODELS = """
import sqlalchemy as sa

import sqlalchemy_kms_field as kf

metadata = sa.MetaData()
docs = sa.Table(
    "docs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("body", kf.Encrypted(sa.Integer(), key="pii", context="customers.age")),
)
"""


@pytest.mark.databases("sqlite")
def test_cli_takes_context_codec_and_pad_from_the_models(
    engine: sa.Engine, registry: kf.KeyRegistry, tmp_path: Path
) -> None:
    """A column holding only kf1 values cannot tell its codec; the models' declaration does."""
    v1 = registry.data_key("pii", 1)
    fill_docs(engine, {1: (kf1_text(v1, b"41"), None), 2: (kf1_text(v1, b"-7"), None)})
    models = tmp_path / "engine_models.py"
    models.write_text(MODELS, encoding="utf-8")

    run_cli(engine, "reencrypt", "docs.body", "--key", "pii", code=1)  # no models: no codec
    done = run_cli(engine, "reencrypt", "docs.body", "--key", "pii", models=models).stdout

    assert "bound to:     customers.age, codec int" in done
    declared = envelope.encode_context("customers", "age", "int")
    after = stored_docs(engine)
    assert [open_value(registry, b, declared) for b, _ in after.values()] == [b"41", b"-7"]
    body = after[1][0]
    assert len(envelope.b64decode(body[len("kf2:pii:1:") :])) == 12 + 16 + 16  # the int pad


def test_damaged_values_met_first_are_skipped_when_told_the_codec(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """The codec is checked on the first few kf2 values; if those are the damaged ones, the
    caller who knows the codec can still let the job skip them (and only them)."""
    v1 = registry.data_key("pii", 1)
    rows = {i: (v1.encrypt_text(f"v{i}".encode(), ctx("str")), None) for i in range(1, 11)}
    for i in (1, 2, 3):  # damaged: the tag no longer matches
        body = rows[i][0]
        rows[i] = (body[:-2] + ("AA" if body[-2:] != "AA" else "BA"), None)
    fill_docs(engine, rows)
    kf.rotate_data_key("pii")

    with pytest.raises(kf.ConfigurationError, match="skip_undecryptable"):
        reencrypt_column(engine, "docs", "body", key="pii")
    with pytest.raises(kf.ConfigurationError):
        reencrypt_column(engine, "docs", "body", key="pii", codec="str")
    result = reencrypt_column(
        engine, "docs", "body", key="pii", codec="str", skip_undecryptable=True
    )

    assert (sorted(result.skipped), result.rows_written) == ([1, 2, 3], 7)
    after = stored_docs(engine)
    assert all(after[i] == rows[i] for i in (1, 2, 3))
    assert all(
        open_value(registry, after[i][0], ctx("str")) == f"v{i}".encode() for i in range(4, 11)
    )

"""Blind indexes across rotations, on every database: a data-key rotation leaves them alone; an
index-key rotation keeps lookups working at every moment of the reindex, also when the reindex
is killed (a subprocess, SIGKILL) and resumed, also through ``alembic upgrade``; an index-key
version is retired only once no row holds it; another process's rotation is seen."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import lifecycle
from sqlalchemy_kms_field.census import ColumnRef
from sqlalchemy_kms_field.reencrypt import reencrypt_column, reindex_column
from tests.helpers import (
    MASTER_KEY_B64,
    assert_no_secret,
    configure_local,
    local_master_key,
    raw_values,
    reset_global_registry,
    wait_for_orphaned_statements,
)
from tests.job_progress import job_progress
from tests.test_blind_index import (
    INDEX_KEY,
    START,
    USERS,
    Base,
    User,
    all_secrets,
    assert_clean,
    assert_every_row_found,
    assert_indexed,
    count_prefix,
    insert_users,
    orm_ids,
    raw_indexes,
    shout,
)

ROOT = Path(__file__).resolve().parent.parent
REINDEX_SCRIPT = Path(__file__).resolve().parent / "scripts" / "bidx_reindex.py"
V1, V2, V3 = (f"kf2:{INDEX_KEY}:{v}:" for v in (1, 2, 3))
INDEX_COLUMN = ColumnRef("bidx_users", "email_index", INDEX_KEY)


def many(n: int) -> dict[int, str | None]:
    rows: dict[int, str | None] = {i: f"User{i}@Example.com" for i in range(1, n + 1)}
    rows[n + 1] = None
    return rows


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> kf.KeyRegistry:
    """Keys as in test_blind_index.py, and the tables. ``active_ttl`` is 1 s: a reindex waits
    that long after an index-key rotation, for every process to learn the new version."""
    reset_global_registry(monkeypatch)
    registry = configure_local(engine, active_ttl=1)
    registry.create_index_key(INDEX_KEY)
    Base.metadata.create_all(engine)
    return registry


def index_versions(registry: kf.KeyRegistry) -> list[tuple[int, str]]:
    return [(k.version, k.state.value) for k in registry.key_store.versions(INDEX_KEY)]


def job_row(engine: sa.Engine) -> Any:
    with engine.connect() as conn:
        return job_progress(conn, "bidx_users", "reindex", "email_index")


def spot_check(engine: sa.Engine, rows: dict[int, str | None], start: int, size: int) -> None:
    """``size`` rows from the ``start``-th: through one IN, and the first few one by one."""
    emails = {i: e for i, e in rows.items() if e is not None}
    ids = sorted(emails)
    some = {i: emails[i] for i in (ids[(start + k) % len(ids)] for k in range(size))}
    assert orm_ids(engine, User.email.in_(list(some.values()))) == set(some)
    for i in list(some)[:3]:
        assert orm_ids(engine, User.email == shout(emails[i])) == {i}, (i, emails[i])


def wait_and_kill(
    proc: subprocess.Popen[Any],
    engine: sa.Engine,
    at_least: int,
    between: Callable[[int, Any], None],
    timeout: float = 90,
) -> int:
    """Call ``between(poll, job row or None)`` repeatedly while ``proc`` reindexes; SIGKILL it
    once the job has committed ``at_least`` rows. Returns the rows its checkpoint counts then."""
    deadline = time.monotonic() + timeout
    polls = 0
    while time.monotonic() < deadline:
        row = job_row(engine)
        if row is not None and row.finished_at is None and row.rows_done >= at_least:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            wait_for_orphaned_statements(engine)
            after = job_row(engine)  # a batch may have committed just before the kill
            assert after.finished_at is None and after.rows_done >= row.rows_done
            return int(after.rows_done)
        assert proc.poll() is None, f"the reindex ended before it was killed: {proc.returncode}"
        between(polls, row)
        polls += 1
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail(f"the reindex did not commit {at_least} rows within {timeout} s")


# Data-key rotation ------------------------------------------------------------------------------


def test_a_data_key_rotation_leaves_index_values_byte_identical(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    rows = {**START, **{i: f"user{i}@example.com" for i in range(6, 20)}}
    insert_users(engine, rows)
    before = raw_indexes(engine)
    before_emails = raw_values(engine, "bidx_users", "email")
    kf.rotate_data_key("pii")
    result = reencrypt_column(engine, "bidx_users", "email", key="pii", batch_size=4)
    assert result.finished and result.rows_written == sum(e is not None for e in rows.values())
    after_emails = raw_values(engine, "bidx_users", "email")
    assert all(v is None or v.startswith("kf2:pii:2:") for v in after_emails)
    assert after_emails != before_emails
    assert raw_indexes(engine) == before
    assert count_prefix(engine, V1) == result.rows_written
    assert_indexed(engine, rows)
    # New writes: ciphertext under data key v2, index still under index key v1.
    with Session(engine) as session:
        session.add(User(id=100, email="Newcomer@example.com"))
        session.commit()
    assert (raw_indexes(engine)[100] or "").startswith(V1)
    assert_indexed(engine, {**rows, 100: "Newcomer@example.com"})


# Index-key rotation and reindex -----------------------------------------------------------------


def test_after_an_index_key_rotation_lookups_find_both_versions_then_reindex_moves_all(
    engine: sa.Engine, registry: kf.KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_kms_field")
    rows = many(30)
    insert_users(engine, rows)
    v1_values = raw_indexes(engine)
    assert count_prefix(engine, V1) == 30

    key = kf.rotate_index_key(INDEX_KEY)
    assert (key.name, key.version) == (INDEX_KEY, 2)
    assert index_versions(registry) == [(1, "readable"), (2, "active")]
    assert raw_indexes(engine) == v1_values  # a rotation rewrites no row
    assert_every_row_found(engine, rows)

    # New writes are under v2; the rows they did not touch stay on v1.
    with Session(engine) as session:
        session.add(User(id=100, email="Newcomer@example.com"))
        session.get_one(User, 1).email = "changed@example.com"
        session.commit()
    with engine.begin() as conn:
        conn.execute(USERS.update().where(USERS.c.id == 2).values(email="other@example.com"))
    rows.update({100: "Newcomer@example.com", 1: "changed@example.com", 2: "other@example.com"})
    assert (count_prefix(engine, V1), count_prefix(engine, V2)) == (28, 3)
    assert_every_row_found(engine, rows)
    with_email = {i for i, e in rows.items() if e is not None}
    assert orm_ids(engine, User.email.in_(["CHANGED@example.com", "user5@example.com"])) == {1, 5}
    assert orm_ids(engine, User.email != "changed@example.com") == with_email - {1}
    assert orm_ids(engine, User.email != "USER7@example.com") == with_email - {7}
    assert orm_ids(engine, User.email.not_in(["user7@example.com", "other@example.com"])) == (
        with_email - {2, 7}
    )

    # The reindex: after every committed batch, every row is still found.
    on_v1: list[int] = []

    def between_batches(done: int, todo: int) -> None:
        on_v1.append(count_prefix(engine, V1))
        spot_check(engine, rows, start=0, size=len(rows))

    result = reindex_column(
        engine, User.__table__.c.email_index, batch_size=4, progress=between_batches
    )
    assert result.finished and result.operation == "reindex" and result.target_version == 2
    assert result.rows_written == 28 and result.rows_conflicted == 0
    assert on_v1[0] == 24 and on_v1[-1] == 0 and on_v1 == sorted(on_v1, reverse=True)
    assert (count_prefix(engine, V1), count_prefix(engine, V2)) == (0, 31)
    assert_indexed(engine, rows)
    census = lifecycle.column_census([INDEX_COLUMN])[0]
    assert (census.by_version, census.nulls, census.other) == ({1: 0, 2: 31}, 1, 0)
    job = job_row(engine)
    assert job.finished_at is not None and job.rows_done == 28 and job.target_version == 2
    assert "index key 'email-index' version 2 stored, verified and activated" in caplog.text
    assert_no_secret(caplog.text, all_secrets(registry))


def test_a_unique_index_holds_while_two_index_versions_are_live(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """Between rotate_index_key and the end of the reindex, "ann@example.com" is stored under
    v1 while a new "ANN@example.com" would be written under v2: the constraint must still see
    them as the same email."""
    insert_users(engine, {1: "ann@example.com"})
    kf.rotate_index_key(INDEX_KEY)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(USERS.insert(), {"id": 2, "email": "ANN@example.com"})
    assert_every_row_found(engine, {1: "ann@example.com"})
    reindex_column(engine, User.__table__.c.email_index)
    assert_indexed(engine, {1: "ann@example.com"})


def test_a_killed_reindex_keeps_lookups_working_and_resumes(
    engine: sa.Engine, db_url: str, registry: kf.KeyRegistry
) -> None:
    rows = many(120)
    insert_users(engine, rows)
    kf.rotate_index_key(INDEX_KEY)
    env = {
        **os.environ,
        "KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64,
        "KMS_FIELD_ACTIVE_TTL": "1",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, str(REINDEX_SCRIPT), db_url, "--batch-size", "4"]
    proc = subprocess.Popen(
        [*command, "--rows-per-second", "40"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    done = wait_and_kill(
        proc, engine, at_least=24, between=lambda n, job: spot_check(engine, rows, 10 * n, 10)
    )
    output = proc.stdout.read() if proc.stdout else ""
    assert_no_secret(output, all_secrets(registry))

    # Killed mid-run: each committed batch came with its checkpoint, and nothing else.
    on_v1, on_v2 = count_prefix(engine, V1), count_prefix(engine, V2)
    assert on_v2 == done and on_v1 == 120 - done and on_v1 > 0, (on_v1, on_v2, done)
    assert_every_row_found(engine, rows)

    result = reindex_column(engine, User.__table__.c.email_index, batch_size=16)  # the rerun
    assert result.finished and result.rows_written == on_v1 and result.rows_conflicted == 0
    assert (count_prefix(engine, V1), count_prefix(engine, V2)) == (0, 120)
    assert job_row(engine).rows_done == 120
    assert_indexed(engine, rows)


def test_lookups_in_another_process_see_its_rotation_and_reindex(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """An application process (keys cached for active_ttl) keeps serving while a migration
    elsewhere rotates the index key and reindexes: it must still find every row, because the
    reindex waits active_ttl before it moves the first row."""
    rows = many(12)
    insert_users(engine, rows)
    assert_every_row_found(engine, rows)  # this process has now cached index key v1 alone
    elsewhere = kf.KeyRegistry(local_master_key(), kf.SqlKeyStore(engine), active_ttl=1)
    elsewhere.rotate_index_key(INDEX_KEY)
    reindex_column(engine, User.__table__.c.email_index, registry=elsewhere)
    assert count_prefix(engine, V2) == 12
    assert_every_row_found(engine, rows)


# Retiring an index-key version ------------------------------------------------------------------


def test_retiring_index_key_v1_is_refused_while_rows_hold_it(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    insert_users(engine, {i: f"user{i}@example.com" for i in range(1, 11)})
    kf.rotate_index_key(INDEX_KEY)
    insert_users(engine, {11: "user11@example.com"})
    census = lifecycle.column_census([INDEX_COLUMN])[0]
    assert census.by_version == {1: 10, 2: 1}
    # No reindex ran yet, so only the model's metadata can tell that email_index holds v1.
    with pytest.raises(kf.KmsFieldError) as caught:
        lifecycle.retire_data_key(INDEX_KEY, 1, metadata=Base.metadata)
    assert_clean(caught.value, registry)
    assert isinstance(caught.value, kf.KeyStateError), caught.value
    assert "bidx_users.email_index: 10 rows" in str(caught.value)
    assert INDEX_COLUMN in lifecycle.known_columns(Base.metadata)
    assert index_versions(registry) == [(1, "readable"), (2, "active")]
    assert_every_row_found(engine, {i: f"user{i}@example.com" for i in range(1, 12)})


def test_retiring_index_key_v1_is_allowed_after_the_reindex(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    rows = {i: f"user{i}@example.com" for i in range(1, 11)}
    insert_users(engine, rows)
    kf.rotate_index_key(INDEX_KEY)
    reindex_column(engine, User.__table__.c.email_index, batch_size=3)
    counts = lifecycle.retire_data_key(INDEX_KEY, 1, metadata=Base.metadata)
    assert [(c.column, c.by_version) for c in counts if c.column == INDEX_COLUMN] == [
        (INDEX_COLUMN, {1: 0, 2: 10})
    ]
    assert index_versions(registry) == [(1, "retired"), (2, "active")]
    assert [k.version for k in registry.index_keys(INDEX_KEY)] == [2]
    with pytest.raises(kf.KeyStateError, match="retired") as caught:
        registry.index_key(INDEX_KEY, 1)
    assert_clean(caught.value, registry)
    with pytest.raises(kf.KeyStateError, match="active version") as caught:
        lifecycle.retire_data_key(INDEX_KEY, 2, metadata=Base.metadata)
    assert_clean(caught.value, registry)
    assert_indexed(engine, rows)


# Through alembic upgrade, killed and rerun --------------------------------------------------------

MIGRATION = '''\
"""Rotate the blind-index key of bidx_users.email and reindex it."""

import os

from alembic import op

import sqlalchemy_kms_field as kf

revision = "{revision}"
down_revision = {down_revision!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.rotate_index_key("email-index")
    op.reindex_column(
        "bidx_users",
        "email_index",
        index=kf.BlindIndex("email", key="email-index", normalizer="email"),
        batch_size=4,
        rows_per_second=float(os.environ.get("BIDX_ROWS_PER_SECOND") or 0) or None,
    )


def downgrade() -> None:
    pass
'''


def alembic_environment(where: Path) -> Path:
    """The repository's Alembic env.py and alembic.ini, with two index-key migrations."""
    for name in ("env.py", "alembic.ini", "script.py.mako"):
        shutil.copy(ROOT / "migrations" / name, where / name)
    versions = where / "versions"
    versions.mkdir()
    for revision, down in (("bidx1", None), ("bidx2", "bidx1")):
        text = MIGRATION.format(revision=revision, down_revision=down)
        (versions / f"{revision}.py").write_text(text)
    key_file = where / "master.key"
    key_file.write_text(MASTER_KEY_B64 + "\n")
    return where / "alembic.ini"


def stamped(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return []
        return list(conn.scalars(sa.text("SELECT version_num FROM alembic_version")))


def test_alembic_rotates_and_reindexes_resuming_after_a_kill(
    engine: sa.Engine,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine)
    registry.create_index_key(INDEX_KEY)
    Base.metadata.create_all(engine)
    rows = many(80)
    insert_users(engine, rows)

    ini = alembic_environment(tmp_path)
    env = {
        **os.environ,
        "KMS_FIELD_DATABASE_URL": db_url,
        "KMS_FIELD_MASTER_KEY": f"local:{tmp_path / 'master.key'}",
        "KMS_FIELD_ACTIVE_TTL": "1",
        "PYTHONPATH": str(ROOT),
    }
    alembic = [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade"]
    outputs: list[str] = []

    def upgrade(target: str) -> None:
        proc = subprocess.run(
            [*alembic, target], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        registry.forget()  # the migration rotated: read the live index keys again

    seen: list[Any] = []

    def between(n: int, job: Any) -> None:
        # This process learns of the migration's rotation when its job appears (an application
        # would after active_ttl: see test_lookups_in_another_process_see_its_rotation_and_reindex).
        if job is not None:
            if not seen:
                registry.forget()
                seen.append(job)
            spot_check(engine, rows, 10 * n, 10)

    assert_every_row_found(engine, rows)
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen(
            [*alembic, "bidx1"],
            cwd=tmp_path,
            env={**env, "BIDX_ROWS_PER_SECOND": "40"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        done = wait_and_kill(killed, engine, at_least=12, between=between)
    outputs.append((tmp_path / "killed.log").read_text())
    registry.forget()
    assert (count_prefix(engine, V1), count_prefix(engine, V2)) == (80 - done, done)
    assert stamped(engine) == []
    assert_every_row_found(engine, rows)

    upgrade("bidx1")  # resumes the reindex; does not rotate a second time
    assert index_versions(registry) == [(1, "readable"), (2, "active")]
    assert (count_prefix(engine, V1), count_prefix(engine, V2)) == (0, 80)
    assert stamped(engine) == ["bidx1"]
    assert_indexed(engine, rows)

    upgrade("head")  # the reindex finished: the next migration rotates again
    assert index_versions(registry) == [(1, "readable"), (2, "readable"), (3, "active")]
    assert (count_prefix(engine, V2), count_prefix(engine, V3)) == (0, 80)
    assert stamped(engine) == ["bidx2"]
    assert_indexed(engine, rows)
    for text in outputs:
        assert "Traceback" not in text, text
        assert_no_secret(text, all_secrets(registry))

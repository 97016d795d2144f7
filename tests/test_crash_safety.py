"""Crash safety of re-encryption (DESIGN invariants 4 and 5), with real processes and databases.

- ``alembic upgrade head`` rotating a data key and re-encrypting a large table, SIGKILLed three
  times part way, then run to the end: nothing lost, one rotation, the checkpoint consistent
  with the rows after every kill. Also killed between the rotation and the job's first batch.
- ``alembic upgrade head`` moving a large table from the legacy format kf1 to kf2 on the same
  key version, SIGKILLed part way and rerun: every row readable through the ORM model, kf2.
- The walkthrough migrations in ``migrations/`` run as they are, up and back down.
- A job that meets a corrupt value stops naming the row, writes nothing of that batch, resumes
  from its checkpoint once the value is repaired, and can skip such rows on request.
- KMS refusing to unwrap a data key part way through a job (in a fresh process) stops it with a
  clear error; nothing is lost, and the rerun finishes once KMS answers again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope
from sqlalchemy_kms_field.exc import ReencryptionError
from sqlalchemy_kms_field.reencrypt import jobs_table, reencrypt_column
from sqlalchemy_kms_field.registry import data_key_context
from tests.helpers import raises_kf, reset_global_registry, wait_for_orphaned_statements
from tests.kms_server import KmsServer
from tests.legacy import kf1_text

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "migrations"
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Rows and batch size of the SIGKILL test per database: PostgreSQL gets the full 200,000 rows.
# MariaDB gets fewer: PyMySQL sends the compare-and-swap UPDATEs one row at a time.
CRASH_SIZES = {"postgresql": (200_000, 2000), "sqlite": (20_000, 200), "mariadb": (10_000, 100)}
# SQLite re-encrypts 20,000 rows in well under a second, faster than a busy machine lets the test's
# poller see 80% done before 100%: paced, the last fifth takes 0.8 s (None: unpaced).
CRASH_RATES = {"postgresql": None, "sqlite": 5000, "mariadb": None}
KILL_AT = (0.10, 0.45, 0.80)  # fractions of the table re-encrypted (rows_done) at each SIGKILL

USERS_REVISION = '''"""users with an encrypted email, the key store and data key "pii".

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

import sqlalchemy_kms_field as kf

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii"), nullable=False),
    )
    op.create_key_store()
    op.create_data_key("pii")
'''

ROTATE_REVISION = '''"""Rotate data key "pii" and re-encrypt users.email.

Revision ID: 0002
Revises: 0001
"""

import os
import signal

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.rotate_data_key("pii")
    if os.environ.get("KF_TEST_KILL_AFTER_ROTATION"):  # a SIGKILL landing exactly here
        os.kill(os.getpid(), signal.SIGKILL)
    op.reencrypt_column(
        "users", "email", key="pii", batch_size={batch_size}, rows_per_second={rate}
    )
'''

users = sa.table("users", sa.column("id", sa.Integer), sa.column("email", sa.String))


def users_table(metadata: sa.MetaData | None = None) -> sa.Table:
    """``users`` as the application declares it: the email goes through the library's type."""
    return sa.Table(
        "users",
        metadata or sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii"), nullable=False),
    )


# Fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    kf.LocalMasterKey.generate_file(path)
    return path


# The registries of this module re-read the active version every time (active_ttl=0): no
# process here writes under a cached version, so a job has no other process to wait for.


def configure(engine: sa.Engine, key_file: Path) -> kf.KeyRegistry:
    """A fresh registry (no key in memory) with the master key the subprocesses use."""
    return kf.configure(
        master_key=kf.LocalMasterKey.from_file(key_file),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=0,
    )


def alembic_env(db_url: str, master_key: str) -> dict[str, str]:
    return {
        **os.environ,
        "KMS_FIELD_DATABASE_URL": db_url,
        "KMS_FIELD_MASTER_KEY": master_key,
        # No application process caches the active version here (env.py reads this variable).
        "KMS_FIELD_ACTIVE_TTL": "0",
        "PYTHONUNBUFFERED": "1",
    }


def alembic_command(ini: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "alembic", "-c", str(ini), *args]


def run_alembic(ini: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        alembic_command(ini, *args),
        cwd=ini.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"alembic {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


def plaintexts(n: int, seed: int = 0) -> dict[int, str]:
    """What the test writes: distinct per row, some of it not ASCII."""
    rng = random.Random(seed)
    return {
        i: f"user{i}.{rng.randrange(16**6):06x}@{'exämple' if i % 7 == 0 else 'example'}.com"
        for i in range(1, n + 1)
    }


EMAIL_CONTEXT = envelope.encode_context("users", "email", "str")


def fill_users(engine: sa.Engine, values: dict[int, str], fmt: str = envelope.FORMAT) -> None:
    """Insert ``values`` as EncryptedString stores them: UTF-8, under the active version, in
    format kf2 (bound to users.email) or, with ``fmt="kf1"``, as the library used to.

    The active data key is looked up once (the type would ask the registry for every value,
    which re-reads the key store each time with active_ttl=0).
    """
    active = kf.get_registry().active_key("pii")
    if fmt == envelope.LEGACY_FORMAT:
        rows = [(i, kf1_text(active, v.encode("utf-8"))) for i, v in values.items()]
    else:
        rows = [
            (i, active.encrypt_text(v.encode("utf-8"), EMAIL_CONTEXT)) for i, v in values.items()
        ]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # COPY: an executemany of 200,000 rows takes 20 s on a small machine, COPY 3 s.
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            with cursor.copy("COPY users (id, email) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            conn.execute(users.insert(), [{"id": i, "email": e} for i, e in rows])


def decrypted(engine: sa.Engine) -> dict[int, str]:
    """Every row of users, read back through EncryptedString (with the configured registry)."""
    t = users_table()
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(t.c.id, t.c.email)).all())


def assert_all_equal(got: dict[int, str], expected: dict[int, Any]) -> None:
    assert len(got) == len(expected), f"{len(got)} rows, expected {len(expected)}"
    wrong = [i for i in expected if got.get(i) != expected[i]]
    shown = [(i, got.get(i), expected[i]) for i in wrong[:5]]
    assert not wrong, f"{len(wrong)} rows differ (id, got, expected): {shown}"


def count_on_version(
    engine: sa.Engine,
    version: int,
    where: sa.ColumnElement[bool] | None = None,
    fmt: str = envelope.FORMAT,
) -> int:
    """Rows whose stored value starts with <fmt>:pii:<version>: (SQL only, nothing decrypted)."""
    q = (
        sa.select(sa.func.count())
        .select_from(users)
        .where(users.c.email.like(f"{fmt}:pii:{version}:%"))
    )
    if where is not None:
        q = q.where(where)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def raw_rows(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(users.c.id, users.c.email)).all())


def job_row(engine: sa.Engine, operation: str = "reencrypt") -> Any:
    j = jobs_table.c
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(jobs_table.name):
            return None
        return conn.execute(
            sa.select(jobs_table).where(j.table_name == "users", j.operation == operation)
        ).one_or_none()


def key_versions(engine: sa.Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT version, state FROM kms_field_keys WHERE name = 'pii' ORDER BY version")
        )
        return [(int(v), str(s)) for v, s in rows]


def stamped(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))]


def wait_for_rows_done(
    engine: sa.Engine, at_least: int, process: subprocess.Popen[Any], log: Path
) -> None:
    """Poll the checkpoint of the job until rows_done >= at_least (the process must live on)."""
    j = jobs_table.c
    progress = sa.select(j.rows_done).where(j.table_name == "users", j.operation == "reencrypt")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the migration exited ({process.returncode}) before rows_done reached "
                f"{at_least}:\n{log.read_text()[-3000:]}"
            )
        try:
            with engine.connect() as conn:
                done = conn.execute(progress).scalar_one_or_none()
        except sa.exc.DBAPIError:  # the table does not exist yet, or SQLite is busy
            done = None
        if done is not None and done >= at_least:
            return
        time.sleep(0.01)
    pytest.fail(f"rows_done did not reach {at_least} within 240 s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def migrations_dir(tmp_path: Path) -> Path:
    """An Alembic environment in a temporary folder: the example alembic.ini and env.py."""
    folder = tmp_path / "alembic"
    (folder / "versions").mkdir(parents=True)
    shutil.copy(MIGRATIONS / "alembic.ini", folder)
    shutil.copy(MIGRATIONS / "env.py", folder)
    (folder / "versions" / "0001_users.py").write_text(USERS_REVISION)
    return folder


# alembic upgrade, SIGKILLed three times ------------------------------------------------


@pytest.mark.slow
def test_sigkilled_rotation_migration_resumes_and_loses_nothing(
    database: str, db_url: str, engine: sa.Engine, key_file: Path, migrations_dir: Path
) -> None:
    rows, batch_size = CRASH_SIZES[database]
    (migrations_dir / "versions" / "0002_rotate.py").write_text(
        ROTATE_REVISION.replace("{batch_size}", str(batch_size)).replace(
            "{rate}", str(CRASH_RATES[database])
        )
    )
    ini = migrations_dir / "alembic.ini"
    env = alembic_env(db_url, f"local:{key_file}")
    run_alembic(ini, env, "upgrade", "0001")
    configure(engine, key_file)
    expected = plaintexts(rows)
    fill_users(engine, expected)
    assert count_on_version(engine, 1) == rows

    for run, fraction in enumerate(KILL_AT, start=1):
        log = migrations_dir.parent / f"upgrade-{run}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                alembic_command(ini, "upgrade", "head"),
                cwd=migrations_dir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_for_rows_done(engine, int(rows * fraction), process, log)
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
        wait_for_orphaned_statements(engine)

        job = job_row(engine)
        assert job.finished_at is None
        assert job.target_version == 2
        assert rows * fraction <= job.rows_done < rows, "killed too late to be part way"
        # Each batch commits together with its checkpoint: exactly the rows up to last_key
        # are on version 2, no more, no fewer (the ids are 1..rows).
        (last_id,) = json.loads(job.last_key)
        assert last_id == job.rows_done
        assert count_on_version(engine, 2) == job.rows_done
        assert count_on_version(engine, 2, users.c.id <= last_id) == last_id
        assert count_on_version(engine, 1) == rows - job.rows_done
        assert stamped(engine) == ["0001"], "a killed migration must not be stamped"
        assert key_versions(engine) == [(1, "readable"), (2, "active")], (
            f"run {run}: the rerun rotated again"
        )

    run_alembic(ini, env, "upgrade", "head")

    assert stamped(engine) == ["0002"]
    assert key_versions(engine) == [(1, "readable"), (2, "active")], "exactly one rotation"
    job = job_row(engine)
    assert job.finished_at is not None
    assert job.rows_done == rows, "each run resumed from the checkpoint and counted each row once"
    assert job.rows_skipped == 0
    assert count_on_version(engine, 2) == rows
    assert count_on_version(engine, 1) == 0
    configure(engine, key_file)  # nothing in memory: every version is unwrapped from the store
    assert_all_equal(decrypted(engine), expected)


@pytest.mark.databases("sqlite")  # the migration's logic, not the database's, is at stake
def test_killed_right_after_the_rotation_a_rerun_does_not_rotate_again(
    database: str, db_url: str, engine: sa.Engine, key_file: Path, migrations_dir: Path
) -> None:
    """The moment between the rotation's commit and the job's first checkpoint: no job row says
    that a re-encryption to version 2 is under way, yet the rerun must not rotate once more."""
    (migrations_dir / "versions" / "0002_rotate.py").write_text(
        ROTATE_REVISION.replace("{batch_size}", "100").replace("{rate}", "None")
    )
    ini = migrations_dir / "alembic.ini"
    env = alembic_env(db_url, f"local:{key_file}")
    run_alembic(ini, env, "upgrade", "0001")
    configure(engine, key_file)
    expected = plaintexts(500)
    fill_users(engine, expected)

    killed = subprocess.run(
        alembic_command(ini, "upgrade", "head"),
        cwd=migrations_dir,
        env={**env, "KF_TEST_KILL_AFTER_ROTATION": "1"},
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    assert key_versions(engine) == [(1, "readable"), (2, "active")]
    assert stamped(engine) == ["0001"]

    run_alembic(ini, env, "upgrade", "head")

    assert stamped(engine) == ["0002"]
    assert count_on_version(engine, 1) == 0
    assert key_versions(engine) == [(1, "readable"), (2, "active")], (
        "the rerun rotated a second time: the killed run's rotation was not remembered"
    )


# kf1 to kf2 with alembic upgrade, SIGKILLed ---------------------------------------------

TO_KF2_REVISION = '''"""Move users.email from format kf1 to kf2 on the same data key version.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.reencrypt_column("users", "email", key="pii", batch_size={batch_size}, codec="str")
'''

KF1_ROWS, KF1_BATCH = 200_000, 2000


class Base(DeclarativeBase):
    pass


class User(Base):
    """The application's model of ``users``."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))


@pytest.mark.slow
@pytest.mark.databases("postgresql")
def test_sigkilled_kf1_to_kf2_migration_resumes_and_every_row_reads(
    database: str, db_url: str, engine: sa.Engine, key_file: Path, migrations_dir: Path
) -> None:
    """A table written by the library before kf2 (no context in the AAD): the migration moves
    each row to kf2 on the same key version, is killed half way, and a rerun finishes it."""
    (migrations_dir / "versions" / "0002_to_kf2.py").write_text(
        TO_KF2_REVISION.replace("{batch_size}", str(KF1_BATCH))
    )
    ini = migrations_dir / "alembic.ini"
    env = alembic_env(db_url, f"local:{key_file}")
    run_alembic(ini, env, "upgrade", "0001")
    configure(engine, key_file)
    expected = plaintexts(KF1_ROWS, seed=1)
    fill_users(engine, expected, fmt="kf1")
    assert count_on_version(engine, 1, fmt="kf1") == KF1_ROWS

    log = migrations_dir.parent / "to-kf2.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            alembic_command(ini, "upgrade", "head"),
            cwd=migrations_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_rows_done(engine, int(KF1_ROWS * 0.4), process, log)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    wait_for_orphaned_statements(engine)

    job = job_row(engine)
    assert (job.target_version, job.finished_at) == (1, None)
    assert KF1_ROWS * 0.4 <= job.rows_done < KF1_ROWS, "killed too late to be part way"
    (last_id,) = json.loads(job.last_key)
    assert last_id == job.rows_done  # each batch committed with its checkpoint, no more
    assert count_on_version(engine, 1) == job.rows_done
    assert count_on_version(engine, 1, users.c.id <= last_id) == last_id
    assert count_on_version(engine, 1, fmt="kf1") == KF1_ROWS - job.rows_done
    assert stamped(engine) == ["0001"]
    configure(engine, key_file)
    half = {i: expected[i] for i in (1, last_id, last_id + 1, KF1_ROWS)}
    with Session(engine) as session:  # both formats read meanwhile
        got = dict(session.execute(sa.select(User.id, User.email).where(User.id.in_(half))).all())
    assert got == half

    run_alembic(ini, env, "upgrade", "head")

    assert stamped(engine) == ["0002"]
    assert key_versions(engine) == [(1, "active")], "no rotation: the same key version"
    job = job_row(engine)
    assert job.finished_at is not None
    assert job.rows_done == KF1_ROWS, "every row written once: resumed, not redone"
    assert count_on_version(engine, 1) == KF1_ROWS
    assert count_on_version(engine, 1, fmt="kf1") == 0
    configure(engine, key_file)  # nothing in memory: unwrapped from the store again
    with Session(engine) as session:
        assert_all_equal(dict(session.execute(sa.select(User.id, User.email)).all()), expected)
    # Bound to users.email now: the same value copied to another row's column does not read.
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT)"))
        conn.execute(sa.text("INSERT INTO customers SELECT id, email FROM users WHERE id = 1"))
    customers = sa.Table(
        "customers",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", kf.EncryptedText(key="pii")),
    )
    with engine.connect() as conn, raises_kf(kf.DecryptionError):
        conn.execute(sa.select(customers.c.email)).all()


# The walkthrough migrations as they are ---------------------------------------------


def test_walkthrough_migrations_upgrade_then_downgrade_to_plaintext(
    database: str, db_url: str, engine: sa.Engine, key_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    ini = folder / "alembic.ini"
    env = alembic_env(db_url, f"local:{key_file}")
    emails = {i: f"user{i}@example.com" for i in range(1, 101)}

    run_alembic(ini, env, "upgrade", "head")

    assert stamped(engine) == ["0004"]
    assert key_versions(engine) == [(1, "readable"), (2, "active")]
    assert count_on_version(engine, 2) == 100
    for operation in ("encrypt", "reencrypt"):
        assert job_row(engine, operation).finished_at is not None
    configure(engine, key_file)
    assert_all_equal(decrypted(engine), emails)

    run_alembic(ini, env, "downgrade", "0002")

    assert stamped(engine) == ["0002"]
    assert raw_rows(engine) == emails, "the downgrade leaves the plaintext emails"
    assert job_row(engine, "decrypt").finished_at is not None


# A job failing on a corrupt value ------------------------------------------------------

FAIL_ROWS, FAIL_BATCH, BAD_ID = 2000, 100, 1050


def corrupt(value: str) -> str:
    """Flip one character in the middle of the body (stays base64url, fails authentication)."""
    head_end = value.index(":", value.index(":", 4) + 1) + 1
    at = head_end + (len(value) - head_end) // 2
    flipped = "B" if value[at] == "A" else "A"
    return value[:at] + flipped + value[at + 1 :]


def set_raw(engine: sa.Engine, row_id: int, value: str) -> None:
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == row_id).values(email=value))


def test_corrupt_value_stops_the_job_which_resumes_once_repaired(
    database: str, engine: sa.Engine, key_file: Path
) -> None:
    store = kf.SqlKeyStore(engine)
    store.create_table()
    registry = configure(engine, key_file)
    registry.create_data_key("pii")
    users_table(sa.MetaData()).create(engine)
    expected = plaintexts(FAIL_ROWS)
    fill_users(engine, expected)
    registry.rotate_data_key("pii")
    good = raw_rows(engine)[BAD_ID]
    set_raw(engine, BAD_ID, corrupt(good))
    before = raw_rows(engine)

    with pytest.raises(ReencryptionError) as raised:
        reencrypt_column(engine, "users", "email", key="pii", batch_size=FAIL_BATCH)

    error = raised.value
    assert (error.table, error.column, error.primary_key) == ("users", "email", (BAD_ID,))
    assert "users.email" in str(error)
    assert str(BAD_ID) in str(error)
    assert isinstance(error.__cause__, kf.DecryptionError)
    job = job_row(engine)
    done = (BAD_ID - 1) // FAIL_BATCH * FAIL_BATCH  # the batches before the bad row's
    assert (job.rows_done, json.loads(job.last_key), job.finished_at) == (done, [done], None)
    after = raw_rows(engine)
    assert count_on_version(engine, 2) == done
    assert all(after[i] == before[i] for i in range(done + 1, FAIL_ROWS + 1)), (
        "the failed batch, and everything after it, is untouched"
    )
    configure(engine, key_file)
    t = users_table()
    with engine.connect() as conn:
        readable = dict(conn.execute(sa.select(t.c.id, t.c.email).where(t.c.id != BAD_ID)).all())
        with raises_kf(kf.DecryptionError):  # fail closed
            conn.execute(sa.select(t.c.email).where(t.c.id == BAD_ID)).all()
    assert_all_equal(readable, {i: v for i, v in expected.items() if i != BAD_ID})

    # Repaired, the rerun resumes after the last committed batch instead of starting over.
    set_raw(engine, BAD_ID, good)
    result = reencrypt_column(engine, "users", "email", key="pii", batch_size=FAIL_BATCH)

    assert result.finished
    assert (result.rows_written, result.rows_conflicted) == (FAIL_ROWS - done, 0)
    # One sweep, or two when the job ends within active_ttl + 2 s of the rotation: then it
    # waits for every process to know the new version and counts (and sweeps) once more.
    assert result.sweeps in (1, 2)
    resumed = job_row(engine)
    assert resumed.rows_done == FAIL_ROWS, "rows_done continues from the checkpoint"
    assert resumed.started_at == job.started_at, "the same job, resumed"
    assert resumed.finished_at is not None
    assert count_on_version(engine, 2) == FAIL_ROWS
    configure(engine, key_file)
    assert_all_equal(decrypted(engine), expected)

    # skip_undecryptable: the job finishes and names the row it could not read.
    kf.rotate_data_key("pii")
    good = raw_rows(engine)[BAD_ID]
    set_raw(engine, BAD_ID, corrupt(good))

    result = reencrypt_column(
        engine, "users", "email", key="pii", batch_size=FAIL_BATCH, skip_undecryptable=True
    )

    assert result.finished
    assert result.skipped == [BAD_ID]
    assert result.rows_written == FAIL_ROWS - 1
    skipped_job = job_row(engine)
    assert (skipped_job.rows_skipped, skipped_job.target_version) == (1, 3)
    assert skipped_job.finished_at is not None
    assert count_on_version(engine, 3) == FAIL_ROWS - 1
    assert raw_rows(engine)[BAD_ID] == corrupt(good), "a skipped row is left as it was"
    set_raw(engine, BAD_ID, good)
    configure(engine, key_file)
    assert_all_equal(decrypted(engine), expected)


# KMS refusing part way through a job --------------------------------------------------

KMS_ROWS, KMS_BATCH = 1000, 50
HALF = KMS_ROWS // 2


def kms_registry(
    engine: sa.Engine, kms: KmsServer, key_id: str, previous: str | None = None
) -> kf.KeyRegistry:
    """A fresh registry (nothing unwrapped yet) whose master key is KMS key ``key_id``."""
    return kf.configure(
        master_key=kf.AwsKmsMasterKey(key_id, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=0,
        previous_master_keys=[kf.AwsKmsMasterKey(previous, client=kms.client())]
        if previous
        else [],
    )


def run_job_process(db_url: str, master_key: str, kms: KmsServer, *extra: str) -> dict[str, Any]:
    """The re-encryption in a fresh process: every data key is unwrapped through KMS again."""
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "reencrypt_job.py"),
            db_url,
            master_key,
            "users",
            "email",
            "pii",
            f"--batch-size={KMS_BATCH}",
            *extra,
        ],
        env={**os.environ, **kms.env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout, f"no report (exit {result.returncode}):\n{result.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if report["ok"] else 1), result.stderr[-3000:]
    return report


def test_kms_refusing_mid_run_stops_the_job_and_loses_nothing(
    database: str, db_url: str, engine: sa.Engine, kms: KmsServer
) -> None:
    # Versions 1 and 3 are wrapped by KMS key A, version 2 by key B (a rewrap half done; B is
    # a previous master key): a job to version 3 unwraps version 2 only when it reaches the rows
    # written under it, half way through the table.
    key_a, key_b = kms.create_key("pii A"), kms.create_key("pii B")
    kf.SqlKeyStore(engine).create_table()
    users_table(sa.MetaData()).create(engine)
    expected = plaintexts(KMS_ROWS)
    registry = kms_registry(engine, kms, key_a)
    registry.create_data_key("pii")
    fill_users(engine, {i: expected[i] for i in range(1, HALF + 1)})
    registry.rotate_data_key("pii")
    fill_users(engine, {i: expected[i] for i in range(HALF + 1, KMS_ROWS + 1)})
    registry.rotate_data_key("pii")
    v2 = registry.key_store.get("pii", 2)
    moved = kms.client().re_encrypt(
        CiphertextBlob=v2.wrapped_key,
        SourceEncryptionContext=data_key_context("pii", 2),
        DestinationKeyId=key_b,
        DestinationEncryptionContext=data_key_context("pii", 2),
    )
    registry.key_store.replace_wrapped(
        "pii", 2, v2.wrapped_key, moved["CiphertextBlob"], "aws-kms:" + moved["KeyId"]
    )
    assert [v for v, _ in key_versions(engine)] == [1, 2, 3]
    before = raw_rows(engine)

    # KMS refuses every unwrap: a job (in a registry with no key in memory) stops before it
    # writes anything, with the KMS error code.
    kms.inject("Decrypt", "DisabledException")
    kms_registry(engine, kms, key_a, previous=key_b)
    with pytest.raises(kf.MasterKeyError) as refused:
        reencrypt_column(engine, "users", "email", key="pii", batch_size=KMS_BATCH)

    assert refused.value.code == "DisabledException"
    assert "disabled" in str(refused.value)
    assert raw_rows(engine) == before
    assert job_row(engine) is None

    # KMS refuses key B only: the job stops at the first row under version 2.
    kms.clear_faults()
    kms.inject("Decrypt", "AccessDeniedException", key_id=key_b)
    previous = f"--previous-master-key=aws-kms:{key_b}"
    report = run_job_process(db_url, f"aws-kms:{key_a}", kms, previous)

    assert not report["ok"]
    error = report["error"]
    assert (error["type"], error["table"], error["column"]) == (
        "ReencryptionError",
        "users",
        "email",
    )
    assert error["primary_key"] == [HALF + 1]
    assert str(HALF + 1) in error["message"]
    assert "AccessDeniedException" in error["message"]
    assert [(c["type"], c["code"]) for c in report["causes"]][:1] == [
        ("MasterKeyError", "AccessDeniedException")
    ]
    job = job_row(engine)
    assert (job.rows_done, job.finished_at) == (HALF, None)
    after = raw_rows(engine)
    assert count_on_version(engine, 3) == HALF
    assert all(after[i] == before[i] for i in range(HALF + 1, KMS_ROWS + 1))

    # Nothing is lost: once KMS answers, every row decrypts (in a registry with no key cached).
    kms.clear_faults()
    kms_registry(engine, kms, key_a, previous=key_b)
    assert_all_equal(decrypted(engine), expected)

    kms.reset_counts()
    report = run_job_process(db_url, f"aws-kms:{key_a}", kms, previous)

    assert report["ok"], report
    assert report["finished"]
    assert report["rows_written"] == KMS_ROWS - HALF
    assert kms.counts["Decrypt"] == 2, "one unwrap per version the job needs (3, then 2)"
    assert job_row(engine).rows_done == KMS_ROWS
    assert job_row(engine).finished_at is not None
    assert count_on_version(engine, 3) == KMS_ROWS
    assert_all_equal(decrypted(engine), expected)

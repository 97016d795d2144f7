"""Re-encryption while the application keeps writing (DESIGN invariants 4 and 5).

The job writes with compare-and-swap, so a row the application changed after the job read it
is never overwritten with stale data; and it ends only when a census finds no row left on
another version, although processes keep writing under the old version for up to
``active_ttl`` seconds after a rotation.

- A row changed between the job's read and its write (injected at that exact moment): the
  change survives, the job counts a conflict and sweeps again.
- Writer processes updating random rows through the ORM during a job, one of them still on the
  old version long after the rotation: every row ends equal to its last write, on the new
  version.
- A process that writes rarely, under the old version, within its active_ttl: the job must not
  declare itself finished while such a write can still come.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.reencrypt import jobs_table, reencrypt_column
from tests.helpers import reset_global_registry

WRITER = Path(__file__).resolve().parent / "scripts" / "orm_writer.py"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))


USERS: sa.Table = User.__table__  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    kf.LocalMasterKey.generate_file(path)
    return path


def setup_users(engine: sa.Engine, key_file: Path, rows: int, active_ttl: float) -> kf.KeyRegistry:
    """Key store, data key "pii" v1, and ``rows`` users whose email is ``f"{id}-init"``."""
    store = kf.SqlKeyStore(engine)
    store.create_table()
    registry = kf.configure(
        master_key=kf.LocalMasterKey.from_file(key_file), key_store=store, active_ttl=active_ttl
    )
    registry.create_data_key("pii")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(USERS.insert(), [{"id": i, "email": f"{i}-init"} for i in range(1, rows + 1)])
    return registry


def stored_versions(engine: sa.Engine) -> dict[int, int]:
    """Rows per data key version, by the header prefix alone (SQL, nothing decrypted)."""
    email = sa.column("email", sa.String)  # untyped: the SQL sees the stored text
    version = sa.func.substr(email, 9, 1)  # kf2:pii:<version>: with one-digit versions
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(version, sa.func.count())
            .select_from(sa.table("users", email))
            .group_by(version)
        ).all()
    return {int(v): int(n) for v, n in rows}


def decrypted(engine: sa.Engine) -> dict[int, str]:
    with Session(engine) as session:
        return {u.id: u.email for u in session.scalars(sa.select(User))}


def assert_rows_equal(got: dict[int, str], expected: dict[int, str]) -> None:
    wrong = [(i, got.get(i), v) for i, v in expected.items() if got.get(i) != v]
    assert len(got) == len(expected)
    assert not wrong, f"{len(wrong)} rows lost their last write (id, got, written): {wrong[:5]}"


def job_row(engine: sa.Engine) -> Any:
    j = jobs_table.c
    with engine.connect() as conn:
        return conn.execute(
            sa.select(jobs_table).where(j.table_name == "users", j.operation == "reencrypt")
        ).one()


# A change injected between the job's read and its write ----------------------------------


def test_row_changed_between_read_and_write_is_not_overwritten(
    database: str, engine: sa.Engine, key_file: Path
) -> None:
    rows = 1000
    # active_ttl=0: no process of this test caches the active version, so nothing but the
    # injected writes below can leave a row on version 1.
    registry = setup_users(engine, key_file, rows, active_ttl=0)
    registry.rotate_data_key("pii")
    old = registry.data_key("pii", 1)
    app = sa.create_engine(engine.url)  # the application: connections of its own
    stale = {5: "5-stale-a", 50: "50-stale-b", 99: "99-stale-c"}  # written under version 1
    fresh = {77: "77-fresh"}  # written through the ORM, under the active version 2
    injected: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def interleave(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The first batch has read rows 1..100 and is about to write them: the application
        # changes four of them now, and commits.
        # (On PostgreSQL a batch is one statement with its checkpoint: WITH moved AS ...)
        head = statement.lstrip().upper()
        is_data_write = head.startswith("WITH MOVED AS") or (
            head.startswith("UPDATE") and "users" in statement and "kms_field_jobs" not in statement
        )
        if injected or not is_data_write:
            return
        injected.append(statement)
        with app.begin() as other:
            for row_id, value in stale.items():
                other.execute(
                    sa.text("UPDATE users SET email = :v WHERE id = :id"),
                    {
                        "v": old.encrypt_text(value.encode(), USERS.c.email.type.context_bytes()),
                        "id": row_id,
                    },
                )
        with Session(app) as session, session.begin():
            for row_id, value in fresh.items():
                session.get_one(User, row_id).email = value

    try:
        result = reencrypt_column(engine, "users", "email", key="pii", batch_size=100)
    finally:
        sa.event.remove(engine, "before_cursor_execute", interleave)
        app.dispose()

    assert injected, "the job never wrote"
    assert result.finished
    assert result.rows_conflicted == len(stale) + len(fresh), "each changed row is a conflict"
    assert result.sweeps >= 2, "the rows written under version 1 meanwhile need a second sweep"
    assert result.rows_written == rows - len(fresh)
    assert stored_versions(engine) == {2: rows}
    expected = {i: f"{i}-init" for i in range(1, rows + 1)} | stale | fresh
    assert_rows_equal(decrypted(engine), expected)
    assert job_row(engine).finished_at is not None


# Writer processes during a job -----------------------------------------------------------


@dataclass
class Writer:
    index: int
    active_ttl: float
    process: subprocess.Popen[bytes]
    ready: Path
    out: Path
    log: Path

    def report(self) -> dict[str, Any]:
        self.process.wait(timeout=60)
        assert self.process.returncode == 0, self.log.read_text()[-3000:]
        report: dict[str, Any] = json.loads(self.out.read_text())
        return report


@pytest.fixture
def writers(tmp_path: Path) -> Iterator[list[Writer]]:
    """Writer processes started by the test; any still running at the end is killed."""
    started: list[Writer] = []
    yield started
    for w in started:
        if w.process.poll() is None:
            w.process.kill()
            w.process.wait(timeout=30)


def start_writer(
    writers: list[Writer],
    tmp_path: Path,
    db_url: str,
    key_file: Path,
    *,
    rows: int,
    count: int,
    active_ttl: float,
    stop: Path,
    extra: tuple[str, ...] = (),
) -> Writer:
    index = len(writers)
    ready, out, log = (tmp_path / f"writer-{index}.{s}" for s in ("ready", "json", "log"))
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                str(WRITER),
                db_url,
                str(key_file),
                f"--rows={rows}",
                f"--writers={count}",
                f"--index={index}",
                f"--active-ttl={active_ttl}",
                f"--ready={ready}",
                f"--stop={stop}",
                f"--out={out}",
                *extra,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    writer = Writer(index, active_ttl, process, ready, out, log)
    writers.append(writer)
    return writer


def wait_ready(writers: list[Writer]) -> None:
    deadline = time.monotonic() + 60
    for w in writers:
        while not w.ready.exists():
            assert w.process.poll() is None, f"writer {w.index} died:\n{w.log.read_text()}"
            assert time.monotonic() < deadline, f"writer {w.index} never wrote"
            time.sleep(0.02)


def expected_values(rows: int, reports: list[dict[str, Any]]) -> dict[int, str]:
    expected = {i: f"{i}-init" for i in range(1, rows + 1)}
    for report in reports:
        expected |= {int(k): v for k, v in report["last"].items()}
    return expected


WRITER_ROWS, WRITER_BATCH, WRITER_RATE = 2000, 50, 1500.0  # the first sweep takes about 1.5 s
STALE_TTL = 5.0  # the stale writer caches version 1 this long: past the first sweep


def test_orm_writers_during_reencryption_keep_their_last_write(
    database: str, db_url: str, engine: sa.Engine, key_file: Path, tmp_path: Path, writers: Any
) -> None:
    # The job's registry has the same active_ttl as the slowest writer, as the library asks.
    registry = setup_users(engine, key_file, WRITER_ROWS, active_ttl=STALE_TTL)
    stop = tmp_path / "stop"
    options: dict[str, Any] = {"rows": WRITER_ROWS, "count": 2, "stop": stop}
    # One writer sees the rotation at once; the other reads the active version only once the
    # first is writing (just before the rotation) and keeps it for STALE_TTL seconds.
    fresh_writer = start_writer(
        writers, tmp_path, db_url, key_file, active_ttl=0.0, extra=("--interval=0.005",), **options
    )
    start_writer(
        writers,
        tmp_path,
        db_url,
        key_file,
        active_ttl=STALE_TTL,
        extra=("--interval=0.005", f"--after={fresh_writer.ready}"),
        **options,
    )
    wait_ready(writers)
    time.sleep(0.3)

    rotated_at = time.time()
    registry.rotate_data_key("pii")
    result = reencrypt_column(
        engine,
        "users",
        "email",
        key="pii",
        batch_size=WRITER_BATCH,
        rows_per_second=WRITER_RATE,
    )
    finished_at = time.time()
    stop.touch()
    fresh, stale = (w.report() for w in writers)

    # What the test set out to create: writes under the new version during the job, and
    # writes under the old one after the rotation, for a while.
    assert float(fresh["first_write"]["2"]) < finished_at
    assert float(stale["last_write"]["1"]) > rotated_at + 1, "the stale writer never was stale"
    timing = (
        f"job finished {finished_at - rotated_at:.1f} s after the rotation "
        f"({result.sweeps} sweeps, {result.rows_conflicted} conflicts); the writer with "
        f"active_ttl={STALE_TTL} wrote under version 1 until "
        f"{float(stale['last_write']['1']) - rotated_at:.1f} s after it; writes per version: "
        f"{fresh['writes']} and {stale['writes']}"
    )
    assert result.finished
    # Rows changed under the job (conflicts) or written under version 1 behind it (census).
    assert result.rows_conflicted > 0 or result.sweeps > 1, timing
    assert stored_versions(engine) == {2: WRITER_ROWS}, timing
    assert_rows_equal(decrypted(engine), expected_values(WRITER_ROWS, [fresh, stale]))
    assert job_row(engine).finished_at is not None


# A rare writer, still on the old version -------------------------------------------------

RARE_TTL = 4.0


@pytest.mark.databases("sqlite")  # the job's logic, not the database's, is at stake
def test_job_does_not_finish_while_a_process_may_still_write_the_old_version(
    database: str, db_url: str, engine: sa.Engine, key_file: Path, tmp_path: Path, writers: Any
) -> None:
    """Invariant 4 lets a process write under the old version for up to active_ttl after a
    rotation; invariant 5 says the job ends only when no row is left on another version. A
    census that finds none before active_ttl has passed proves nothing: a process that writes
    once in a while (here every 0.5 s) can still write under version 1 afterwards."""
    rows = 500
    registry = setup_users(engine, key_file, rows, active_ttl=RARE_TTL)
    stop = tmp_path / "stop"
    rare = start_writer(
        writers,
        tmp_path,
        db_url,
        key_file,
        rows=rows,
        count=1,
        active_ttl=RARE_TTL,
        stop=stop,
        extra=("--interval=0.5", "--until-version=2"),
    )
    wait_ready(writers)

    rotated_at = time.time()
    registry.rotate_data_key("pii")
    result = reencrypt_column(engine, "users", "email", key="pii", batch_size=100)
    finished_at = time.time()
    report = rare.report()  # it stops by itself after its first write under version 2

    last_old = float(report["last_write"]["1"])
    assert last_old > rotated_at, "the writer never wrote under version 1 after the rotation"
    assert result.finished
    assert stored_versions(engine) == {2: rows}, (
        f"the job reported finished {finished_at - rotated_at:.1f} s after the rotation, but "
        f"a process with active_ttl={RARE_TTL} (the job's own) wrote under version 1 until "
        f"{last_old - rotated_at:.1f} s after it; those rows stay on version 1"
    )
    assert_rows_equal(decrypted(engine), expected_values(rows, [report]))

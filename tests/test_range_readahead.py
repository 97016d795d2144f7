"""A worker keeps its read-ahead across ranges: it claims the next range while the last
batches of the current one are written. These tests hold that to what ranges promise: each
range swept once by its holder, finished once, after its last batch; a claim ahead never takes
the range being written nor the finishing step; its lease is renewed like the current one's.

Real PostgreSQL and MariaDB (SQLite sweeps without read-ahead: one range after the other).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.census import ColumnRef
from sqlalchemy_kms_field.reencrypt import control, ranges, reencrypt_column, workers
from sqlalchemy_kms_field.reencrypt.tables import FINISH, control_table, db_now, ranges_table
from tests.helpers import reset_global_registry
from tests.test_concurrent_writers import setup_users, stored_versions

REF = ColumnRef("users", "email", "pii")


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    kf.LocalMasterKey.generate_file(path)
    return path


def range_rows(engine: sa.Engine) -> list[Any]:
    r = ranges_table.c
    with engine.connect() as conn:
        return conn.execute(
            sa.select(ranges_table).where(r.table_name == "users").order_by(r.range_no)
        ).all()


@pytest.mark.databases("postgresql", "mariadb", "sqlite")
def test_one_worker_sweeps_each_range_once_across_many_ranges(
    engine: sa.Engine, key_file: Path
) -> None:
    # 3,000 rows in ranges of 200 (2 batches each): 15 range ends, each one a moment where
    # the next range is claimed ahead while the current one's last batches are written.
    rows = 3000
    registry = setup_users(engine, key_file, rows, active_ttl=0.0)
    registry.rotate_data_key("pii")
    result = reencrypt_column(
        engine, "users", "email", key="pii", registry=registry, batch_size=100, range_rows=200
    )
    assert result.finished
    # Every row written once, none found changed under it (a range swept twice, the second
    # time from a checkpoint behind the batches in flight, would show as conflicts).
    assert (result.rows_written, result.rows_conflicted) == (rows, 0)
    assert stored_versions(engine) == {2: rows}
    ranges_ = range_rows(engine)
    # 15 full ranges, the open-ended last one (rows inserted past the last key), FINISH.
    assert len(ranges_) == rows // 200 + 2 and ranges_[-1].range_no == FINISH
    assert all(r.finished_at is not None for r in ranges_)
    # Each range's committed rows are exactly its own: 200 each, none counted twice.
    done = [int(r.rows_done) for r in ranges_ if r.range_no != FINISH]
    assert done == [200] * (rows // 200) + [0]
    # Ranges finish in order, each after the one before (a range finishes only once its last
    # batch is committed, and the next range's batches come after).
    finished = [r.finished_at for r in ranges_ if r.range_no != FINISH]
    assert finished == sorted(finished)


@pytest.mark.databases("postgresql", "mariadb")
def test_a_claim_ahead_takes_neither_the_current_range_nor_the_finishing_step(
    engine: sa.Engine, key_file: Path
) -> None:
    registry = setup_users(engine, key_file, 400, active_ttl=0.0)
    registry.rotate_data_key("pii")
    started = reencrypt_column(
        engine, "users", "email", key="pii", registry=registry, workers=0, range_rows=200
    )
    run = started.run_id
    assert run is not None
    first = ranges.claim(engine, REF, run, "a", lease=30)
    assert first is not None and first.range_no == 0
    # A plain claim by the holder gives its own range back (a worker resuming it)...
    again = ranges.claim(engine, REF, run, "a", lease=30)
    assert again is not None and again.range_no == 0
    # ... a claim ahead never does: it takes the next free range.
    ahead = ranges.claim(engine, REF, run, "a", lease=30, ahead=True)
    assert ahead is not None and ahead.range_no == 1
    ahead = ranges.claim(engine, REF, run, "a", lease=30, ahead=True)
    assert ahead is not None and ahead.range_no == 2  # the open-ended last range
    # Every range held: nothing ahead, not even the finishing step (others are unfinished).
    assert ranges.claim(engine, REF, run, "a", lease=30, ahead=True) is None
    assert ranges.claim(engine, REF, run, "b", lease=30, ahead=True) is None
    # With all finished, the finishing step is still only for a plain claim.
    with engine.begin() as conn:
        for n in (0, 1, 2):
            ranges.finish(conn, REF, n, "a")
    assert ranges.claim(engine, REF, run, "a", lease=30, ahead=True) is None
    last = ranges.claim(engine, REF, run, "a", lease=30)
    assert last is not None and last.finishing


@pytest.mark.databases("postgresql", "mariadb")
def test_the_heartbeat_renews_a_range_claimed_ahead_and_release_frees_it(
    engine: sa.Engine, key_file: Path
) -> None:
    registry = setup_users(engine, key_file, 600, active_ttl=0.0)
    registry.rotate_data_key("pii")
    started = reencrypt_column(
        engine, "users", "email", key="pii", registry=registry, workers=0, range_rows=200
    )
    assert started.run_id is not None
    run = control.Run(REF, "reencrypt", started.run_id, ranges=3)
    current = ranges.claim(engine, REF, run.run_id, "a", lease=1)
    ahead = ranges.claim(engine, REF, run.run_id, "a", lease=1, ahead=True)
    other = ranges.claim(engine, REF, run.run_id, "b", lease=30)
    assert current and ahead and other
    assert (current.range_no, ahead.range_no, other.range_no) == (0, 1, 2)

    def lease_of(n: int) -> Any:
        return next(r.lease_until for r in range_rows(engine) if r.range_no == n)

    before = lease_of(1)
    beat = control.beat(
        engine, run, "a", range_no=0, rows_done=0, rate=0.0, state="working", lease=60,
        also=[1, 2],
    )  # fmt: skip
    assert beat.lease_kept
    assert lease_of(1) > before, "the range claimed ahead had its lease renewed"
    assert beat.lost == (2,), "a range another worker holds is not renewed: reported lost"
    with engine.begin() as conn:
        ranges.release(conn, REF, [1, 2], "a")
    owners = {r.range_no: r.owner for r in range_rows(engine)}
    assert owners[1] is None, "released: any worker may claim it now"
    assert owners[0] == "a" and owners[2] == "b", "release frees only this worker's ranges"


def _reading_ahead() -> bool:
    """True while a sweep's read-ahead threads (``kms-field_N``) run in this process."""
    return any(t.name.startswith("kms-field_") for t in threading.enumerate())


@pytest.mark.databases("postgresql", "mariadb")
def test_workers_read_ahead_only_while_this_machine_has_a_core_for_each(
    engine: sa.Engine, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 2000
    registry = setup_users(engine, key_file, rows, active_ttl=0.0)
    registry.rotate_data_key("pii")
    seen: list[bool] = []

    def run(cores: int) -> None:
        monkeypatch.setattr(workers, "_cores", lambda: cores)
        seen.clear()
        result = reencrypt_column(
            engine, "users", "email", key="pii", registry=registry, batch_size=100,
            range_rows=200, workers=2, progress=lambda done, todo: seen.append(_reading_ahead()),
        )  # fmt: skip
        assert result.finished and result.rows_written == rows

    # Two workers of the job on a machine of one core: neither reads ahead, ever.
    run(1)
    assert len(seen) >= rows // 100 and not any(seen)
    # On two cores both do (the same job again, after a rotation).
    registry.rotate_data_key("pii")
    run(2)
    assert all(seen)
    assert stored_versions(engine) == {3: rows}


@pytest.mark.databases("postgresql", "mariadb")
def test_a_worker_stops_reading_ahead_once_another_joins_on_its_cores_and_loses_no_row(
    engine: sa.Engine, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One core, one worker: it reads ahead. Another worker of the job registers on this
    # machine meanwhile (a second process joining): from the next page on, no read-ahead; the
    # worker drains what it read and goes on alone from its last committed batch.
    rows = 3000
    registry = setup_users(engine, key_file, rows, active_ttl=0.0)
    registry.rotate_data_key("pii")
    monkeypatch.setattr(workers, "_cores", lambda: 1)
    monkeypatch.setattr(workers, "RECOUNT_SECONDS", 0.0)
    seen: list[bool] = []
    other = workers.worker_name()  # of this host and this (living) process: counted

    def progress(done: int, todo: int) -> None:
        seen.append(_reading_ahead())
        if len(seen) == 3:  # mid-range: ranges of 2 batches, and one claimed ahead
            with engine.begin() as conn:
                ctl = conn.execute(sa.select(control_table)).one()
                run = control.Run(REF, "reencrypt", ctl.run_id, ranges=0)
                control.register(conn, run, other, db_now(conn))
        if len(seen) == 15:  # the other worker leaves
            control.leave(engine, control.Run(REF, "reencrypt", "", ranges=0), other)

    result = reencrypt_column(
        engine, "users", "email", key="pii", registry=registry, batch_size=100, range_rows=200,
        progress=progress,
    )  # fmt: skip
    assert result.finished and (result.rows_written, result.rows_conflicted) == (rows, 0)
    assert all(seen[:3]), "alone on its core, the worker read ahead"
    # What it had read and computed ahead was written (at most two batches), then no more
    # while the other worker was there; alone again, it reads ahead from its next range on.
    assert not any(seen[3 + 2 : 15])
    assert all(seen[15 + 2 :]) and len(seen) > 15 + 2
    # No row left behind nor done twice where it switched: each range's own rows, 200 each,
    # and nothing left for the finishing step's census to find.
    done = [int(r.rows_done) for r in range_rows(engine)]
    assert done == [200] * (rows // 200) + [0, 0]
    assert stored_versions(engine) == {2: rows}

"""Range claims: a job's primary-key ranges, planned once and claimed by any number of workers.

A range is ``(after_key, upto_key]`` in primary-key order, with its own checkpoint
(``last_key``, committed with each batch) and a lease: the worker holding it renews
``lease_until`` with its heartbeat; once the lease has passed (the worker was killed, or lost
the database), any worker may claim the range and resume after its last committed batch.

Claims are ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB, at READ COMMITTED,
so workers never wait for each other's claims. SQLite has no such lock: one worker per job.
The checkpoint and the range's finish are compare-and-swap on the owner, so a worker whose
lease was taken over cannot move a range it no longer holds.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..census import ColumnRef
from .records import _dump_key, _load_key
from .tables import FINISH, db_now, place, place_values, ranges_table

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """This worker's lease on its range passed and another worker may hold it: drop it."""


@dataclass(frozen=True)
class Claim:
    """A range held by this worker: resume after ``start`` (None: from the beginning)."""

    range_no: int
    start: tuple[Any, ...] | None
    upto: tuple[Any, ...] | None

    @property
    def finishing(self) -> bool:
        return self.range_no == FINISH


def where(ref: ColumnRef) -> list[Any]:
    return place(ranges_table, ref.schema, ref.table, ref.column)


def plan(
    conn: Connection,
    ref: ColumnRef,
    run_id: str,
    t: sa.Table,
    pk: Sequence[sa.Column[Any]],
    size: int,
    after: tuple[Any, ...] | None,
) -> int:
    """Split the table after ``after`` into ranges of about ``size`` rows; returns how many.

    Boundaries come from the primary-key index alone (one ``OFFSET size - 1`` step per range),
    so planning reads no value. The last range is open-ended: rows inserted past the last key
    meanwhile are in it. Then the finishing step, :data:`FINISH`.
    """
    pk_expr = pk[0] if len(pk) == 1 else sa.tuple_(*pk)
    binds = [sa.bindparam(f"b_{i}", type_=c.type) for i, c in enumerate(pk)]
    step = sa.select(*pk).order_by(*pk).offset(size - 1).limit(1)
    step_after = step.where(pk_expr > (binds[0] if len(pk) == 1 else sa.tuple_(*binds)))
    bounds: list[tuple[Any, ...] | None] = [after]
    while True:
        last = bounds[-1]
        if last is None:
            row = conn.execute(step).first()
        else:
            row = conn.execute(step_after, {f"b_{i}": v for i, v in enumerate(last)}).first()
        if row is None:
            break
        bounds.append(tuple(row))
    bounds.append(None)  # the end
    now = db_now(conn)
    common = {
        **place_values(ref.schema, ref.table, ref.column),
        "run_id": run_id,
        "last_key": None,
        "rows_done": 0,
        "rows_skipped": 0,
        "owner": None,
        "lease_until": None,
        "finished_at": None,
        "updated_at": now,
    }
    rows = [
        {
            **common,
            "range_no": i,
            "after_key": None if lo is None else _dump_key(lo),
            "upto_key": None if hi is None else _dump_key(hi),
            "rows_planned": size,
        }
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ]
    rows.append({**common, "range_no": FINISH, "after_key": None, "upto_key": None})
    rows[-1]["rows_planned"] = 0
    conn.execute(sa.insert(ranges_table), rows)
    return len(rows) - 1


def _claim_connection(engine: Engine) -> Any:
    conn = engine.connect()
    if engine.dialect.name != "sqlite":
        # Every statement sees what the other workers committed just before (MariaDB's
        # REPEATABLE READ would show the claim its first snapshot).
        conn = conn.execution_options(isolation_level="READ COMMITTED")
    return conn


def claim(
    engine: Engine,
    ref: ColumnRef,
    run_id: str,
    owner: str,
    lease: float,
    *,
    ahead: bool = False,
) -> Claim | None:
    """Take the first range nobody holds (or whose lease passed); None if there is none now.

    The finishing step is taken only once every other range has finished. ``ahead``: a claim
    made while this worker still works on a range: never the finishing step, and never a
    range this worker holds already (its current one, whose rows are being written).
    """
    r = ranges_table.c
    with _claim_connection(engine) as conn, conn.begin():
        now = db_now(conn)
        q = (
            sa.select(ranges_table)
            .where(
                *where(ref),
                r.run_id == run_id,
                r.finished_at.is_(None),
                sa.or_(r.owner.is_(None), r.lease_until < now, r.owner == owner)
                if not ahead
                else sa.or_(r.owner.is_(None), sa.and_(r.lease_until < now, r.owner != owner)),
                *([r.range_no != FINISH] if ahead else []),
            )
            .order_by(r.range_no)
            .limit(1)
        )
        if engine.dialect.name != "sqlite":
            q = q.with_for_update(skip_locked=True)
        row = conn.execute(q).first()
        if row is None:
            return None
        if row.range_no == FINISH and unfinished(conn, ref, run_id, besides_finish=True):
            return None
        if row.owner is not None and row.owner != owner:
            log.info("%s: range %d of a worker whose lease passed, resumed", ref, row.range_no)
        conn.execute(
            sa.update(ranges_table)
            .where(*where(ref), r.range_no == row.range_no)
            .values(owner=owner, lease_until=now + timedelta(seconds=lease))
        )
    start = _load_key(row.last_key) or _load_key(row.after_key)
    return Claim(row.range_no, start, _load_key(row.upto_key))


def unfinished(conn: Connection, ref: ColumnRef, run_id: str, *, besides_finish: bool) -> int:
    r = ranges_table.c
    q = sa.select(sa.func.count()).where(*where(ref), r.run_id == run_id, r.finished_at.is_(None))
    if besides_finish:
        q = q.where(r.range_no != FINISH)
    return int(conn.execute(q).scalar_one())


def renew(conn: Connection, ref: ColumnRef, range_no: int, owner: str, lease: float) -> bool:
    """Extend the lease on a range this worker holds; False if it no longer holds it."""
    r = ranges_table.c
    until = db_now(conn) + timedelta(seconds=lease)
    done = conn.execute(
        sa.update(ranges_table)
        .where(*where(ref), r.range_no == range_no, r.owner == owner, r.finished_at.is_(None))
        .values(lease_until=until)
    )
    return done.rowcount == 1


def release(conn: Connection, ref: ColumnRef, range_nos: Sequence[int], owner: str) -> None:
    """Free ranges this worker holds and has not finished (any worker may claim them now)."""
    r = ranges_table.c
    conn.execute(
        sa.update(ranges_table)
        .where(
            *where(ref),
            r.range_no.in_(range_nos),
            r.owner == owner,
            r.finished_at.is_(None),
        )
        .values(owner=None, lease_until=None)
    )


def finish(conn: Connection, ref: ColumnRef, range_no: int, owner: str) -> sa.Row[Any]:
    """Mark a range finished (once: only its owner can); returns the range's row."""
    r = ranges_table.c
    done = conn.execute(
        sa.update(ranges_table)
        .where(*where(ref), r.range_no == range_no, r.owner == owner, r.finished_at.is_(None))
        .values(finished_at=db_now(conn), lease_until=None)
    )
    if done.rowcount != 1:
        raise LeaseLost(f"range {range_no} of {ref}")
    return conn.execute(sa.select(ranges_table).where(*where(ref), r.range_no == range_no)).one()


def checkpoint_statement(ref: ColumnRef) -> sa.Update:
    """A batch's checkpoint on its range: last key, rows done, skipped; only by the owner."""
    r = ranges_table.c
    return (
        sa.update(ranges_table)
        .where(
            *where(ref),
            r.range_no == sa.bindparam("cp_range", type_=sa.Integer),
            r.owner == sa.bindparam("cp_owner", type_=sa.String(96)),
        )
        .values(
            last_key=sa.bindparam("last_key", type_=sa.Text),
            rows_done=r.rows_done + sa.bindparam("n", type_=sa.BigInteger),
            rows_skipped=r.rows_skipped + sa.bindparam("s", type_=sa.BigInteger),
            updated_at=sa.bindparam("now", type_=sa.DateTime),
        )
    )

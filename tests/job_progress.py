"""A job's progress as its checkpoints record it: the job row, with the rows done and the last
key committed taken from its ranges while it runs (each range keeps its own checkpoint)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from sqlalchemy_kms_field.reencrypt import jobs_table
from sqlalchemy_kms_field.reencrypt.tables import FINISH, ranges_table


def job_progress(conn: sa.Connection, table: str, operation: str, column: str | None = None) -> Any:
    """The job row of ``table`` (``column``) and ``operation``, or None; while ranges exist,
    ``rows_done`` sums them and ``last_key`` is the last key committed by the highest range
    that committed one (a single worker takes ranges in order)."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(jobs_table.name):
        return None
    j = jobs_table.c
    q = sa.select(jobs_table).where(j.table_name == table, j.operation == operation)
    if column is not None:
        q = q.where(j.column_name == column)
    row = conn.execute(q).one_or_none()
    if row is None:
        return None
    view = SimpleNamespace(**row._mapping)
    if not inspector.has_table(ranges_table.name):
        return view
    r = ranges_table.c
    ranges = conn.execute(
        sa.select(r.range_no, r.rows_done, r.last_key)
        .where(r.table_name == table, r.column_name == row.column_name)
        .order_by(r.range_no)
    ).all()
    if ranges and row.finished_at is None:
        view.rows_done = sum(int(x.rows_done) for x in ranges)
        keyed = [x for x in ranges if x.last_key is not None and x.range_no != FINISH]
        keyed = keyed or [x for x in ranges if x.last_key is not None]
        view.last_key = keyed[-1].last_key if keyed else None
    return view

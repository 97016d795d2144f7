"""The job records in ``kms_field_jobs``: start or resume, finish, the checkpointed key.

One row per (column, operation) holds the target version and when the job started and
finished; :func:`unfinished_jobs` is what key rotation and retirement consult.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import census
from ..census import ColumnRef
from .tables import place_values, ranges_table

jobs_table = census.jobs_table

log = logging.getLogger(__name__)


Operation = Literal["reencrypt", "encrypt", "decrypt", "reindex"]


@dataclass
class JobResult:
    """What a job did. ``finished`` is True once the census found no row left to do."""

    column: ColumnRef
    operation: Operation
    target_version: int | None
    rows_written: int = 0
    rows_conflicted: int = 0  # changed by the application meanwhile; picked up again
    sweeps: int = 0
    remaining: int = 0
    finished: bool = False
    dry_run: bool = False
    skipped: list[Any] = field(default_factory=list)  # primary keys of undecryptable rows
    context: tuple[str, str] | None = None  # the (table, column) kf2 values are bound to
    codec: str | None = None  # given, or learnt from the column's kf2 values
    run_id: str | None = None  # the run of the job (its ranges); see run_job(workers=0)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _job_where(ref: ColumnRef, operation: str) -> list[sa.ColumnElement[bool]]:
    j = jobs_table.c
    return [
        j.table_schema == (ref.schema or ""),
        j.table_name == ref.table,
        j.column_name == ref.column,
        j.operation == operation,
    ]


def _start(
    conn: Connection, ref: ColumnRef, operation: Operation, target: int | None
) -> tuple[bool, tuple[Any, ...] | None]:
    """Resume the unfinished job with the same target, or start a new one.

    Returns whether it resumed, and the last key done by a release that kept one checkpoint
    per job (ranges now keep their own).
    """
    row = conn.execute(sa.select(jobs_table).where(*_job_where(ref, operation))).one_or_none()
    now = _now()
    if (
        row is not None
        and row.finished_at is None
        and row.target_version == target
        and row.key_name == ref.key
    ):
        log.info("resuming %s of %s after %d rows", operation, ref, row.rows_done)
        return True, _load_key(row.last_key)
    fresh = {
        "key_name": ref.key,
        "target_version": target,
        "last_key": None,
        "rows_done": 0,
        "rows_skipped": 0,
        "started_at": now,
        "updated_at": now,
        "finished_at": None,
    }
    if row is None:
        conn.execute(
            sa.insert(jobs_table).values(
                **place_values(ref.schema, ref.table, ref.column),
                operation=operation,
                **fresh,
            )
        )
    else:
        conn.execute(sa.update(jobs_table).where(*_job_where(ref, operation)).values(fresh))
    if operation != "decrypt":
        census.record_column(conn, ref)
    return False, None


def _finish(conn: Connection, ref: ColumnRef, operation: Operation, *, skipped: int) -> None:
    conn.execute(
        sa.update(jobs_table)
        .where(*_job_where(ref, operation))
        .values(finished_at=_now(), updated_at=_now())
    )
    if operation == "decrypt" and not skipped:
        c = census.columns_table.c
        conn.execute(
            sa.delete(census.columns_table).where(
                c.table_schema == (ref.schema or ""),
                c.table_name == ref.table,
                c.column_name == ref.column,
            )
        )


def unfinished_jobs(conn: Connection | Engine, key: str | None = None) -> list[sa.Row[Any]]:
    """Jobs started and not finished (optionally only those of data key ``key``)."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(jobs_table.name):
        return []
    j = jobs_table.c
    columns: list[Any] = list(jobs_table.c)
    if inspector.has_table(ranges_table.name):
        # Rows done: those of finished ranges (in the job row) and those of the running ones.
        # Updated: the last checkpoint of any of its ranges (the job row moves when one ends).
        r = ranges_table.c
        of_job = [
            r.table_schema == j.table_schema,
            r.table_name == j.table_name,
            r.column_name == j.column_name,
        ]
        running = (
            sa.select(sa.func.coalesce(sa.func.sum(r.rows_done), 0))
            .where(*of_job, r.finished_at.is_(None))
            .scalar_subquery()
        )
        last_checkpoint = sa.select(sa.func.max(r.updated_at)).where(*of_job).scalar_subquery()
        # SUM is NUMERIC on PostgreSQL and DECIMAL on MariaDB: the count stays an int.
        rows_done = sa.cast(j.rows_done + running, sa.BigInteger).label("rows_done")
        columns[columns.index(j.rows_done)] = rows_done
        updated_at = sa.func.coalesce(last_checkpoint, j.updated_at)
        columns[columns.index(j.updated_at)] = sa.type_coerce(updated_at, j.updated_at.type).label(
            "updated_at"
        )
    q = sa.select(*columns).where(jobs_table.c.finished_at.is_(None))
    if key is not None:
        q = q.where(jobs_table.c.key_name == key)
    if isinstance(conn, Engine):
        with conn.connect() as c:
            return list(c.execute(q))
    return list(conn.execute(q))


# Primary keys in the checkpoint ------------------------------------------------------------


def _dump_key(key: tuple[Any, ...]) -> str:
    return json.dumps([_dump_value(v) for v in key])


def _dump_value(v: Any) -> Any:
    if isinstance(v, uuid.UUID):
        return {"uuid": str(v)}
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, (int, str)) or v is None:
        return v
    return {"str": str(v)}


def _load_key(text: str | None) -> tuple[Any, ...] | None:
    if text is None:
        return None
    out = []
    for v in json.loads(text):
        if isinstance(v, dict):
            if "uuid" in v:
                v = uuid.UUID(v["uuid"])
            elif "hex" in v:
                v = bytes.fromhex(v["hex"])
            else:
                v = v["str"]
        out.append(v)
    return tuple(out)


def _show_key(key: tuple[Any, ...]) -> str:
    return repr(key[0]) if len(key) == 1 else repr(key)

"""The tables through which the workers of one job coordinate, in the job's own database.

* ``kms_field_job_control``: one row per column with a job under way: which operation, the
  run's id (a cancelled job and the next one never mix), and whether it is paused.
* ``kms_field_job_ranges``: the job's primary-key ranges, each with its checkpoint, the worker
  holding it and until when (its lease), and when it finished. The last range,
  :data:`FINISH`, is the finishing step: the census and the ``active_ttl`` wait, done once.
* ``kms_field_job_workers``: each worker's heartbeat, range, rows, rate and state (status).

The ``kms_field_jobs`` row of the job (``records.py``) stays what other commands consult.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from ..key_store import utc_now

_metadata = sa.MetaData()

# Finishing is claimed like a range, after every other range finished: one worker does it.
FINISH = 2**31 - 1


def _moment() -> sa.types.TypeEngine[Any]:
    # Microseconds on MariaDB too (its DATETIME keeps whole seconds by default).
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _where_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("table_schema", sa.String(128), primary_key=True),  # "" for the default
        sa.Column("table_name", sa.String(128), primary_key=True),
        sa.Column("column_name", sa.String(128), primary_key=True),
    ]


control_table = sa.Table(
    "kms_field_job_control",
    _metadata,
    *_where_columns(),
    sa.Column("operation", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("started_at", _moment(), nullable=False),
)

ranges_table = sa.Table(
    "kms_field_job_ranges",
    _metadata,
    *_where_columns(),
    sa.Column("range_no", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("after_key", sa.Text, nullable=True),  # JSON; exclusive; NULL: the start
    sa.Column("upto_key", sa.Text, nullable=True),  # JSON; inclusive; NULL: the end
    sa.Column("last_key", sa.Text, nullable=True),  # the checkpoint: last key committed
    sa.Column("rows_planned", sa.BigInteger, nullable=False),
    sa.Column("rows_done", sa.BigInteger, nullable=False),
    sa.Column("rows_skipped", sa.BigInteger, nullable=False),
    sa.Column("owner", sa.String(96), nullable=True),
    sa.Column("lease_until", _moment(), nullable=True),
    sa.Column("finished_at", _moment(), nullable=True),
    sa.Column("updated_at", _moment(), nullable=False),
)

workers_table = sa.Table(
    "kms_field_job_workers",
    _metadata,
    *_where_columns(),
    sa.Column("worker", sa.String(96), primary_key=True),
    sa.Column("run_id", sa.String(32), nullable=False),
    sa.Column("range_no", sa.Integer, nullable=True),
    sa.Column("rows_done", sa.BigInteger, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),  # rows per second, since the last heartbeat
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("started_at", _moment(), nullable=False),
    sa.Column("heartbeat_at", _moment(), nullable=False),
)


TABLES = (control_table, ranges_table, workers_table)


def create_tables(conn: Connection | Engine) -> None:
    _metadata.create_all(conn, checkfirst=True)


def place(table: sa.Table, schema: str | None, table_name: str, column: str) -> list[Any]:
    """The WHERE clause naming one column's rows in ``table`` (one of the tables above)."""
    return [
        table.c.table_schema == (schema or ""),
        table.c.table_name == table_name,
        table.c.column_name == column,
    ]


def place_values(schema: str | None, table_name: str, column: str) -> dict[str, str]:
    """The columns naming one column's row, to insert it into ``table`` (as ``place`` finds it)."""
    return {"table_schema": schema or "", "table_name": table_name, "column_name": column}


def db_now(conn: Connection) -> Any:
    """The database's clock (UTC): leases and heartbeats never compare two hosts' clocks."""
    return conn.execute(sa.select(utc_now())).scalar_one()

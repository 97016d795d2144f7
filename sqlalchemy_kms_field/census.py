"""Counting rows per data key version with SQL alone, from the header prefix of stored values.

No value is decrypted: ``kf1:pii:2:`` at the start of a stored value is enough to know the key
version it is on. The census decides when a re-encryption is finished and when a data key
version may be retired. Known encrypted columns are recorded in ``kms_field_columns``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import envelope
from .envelope import IndexKey
from .exc import ConfigurationError

_metadata = sa.MetaData()

columns_table = sa.Table(
    "kms_field_columns",
    _metadata,
    sa.Column("table_schema", sa.String(128), primary_key=True),  # "" for the default schema
    sa.Column("table_name", sa.String(128), primary_key=True),
    sa.Column("column_name", sa.String(128), primary_key=True),
    sa.Column("key_name", sa.String(64), nullable=False),
    sa.Column("recorded_at", sa.DateTime, nullable=False),
)

# Checkpoints of re-encryption jobs (written by reencrypt.py, read by status).
jobs_table = sa.Table(
    "kms_field_jobs",
    _metadata,
    sa.Column("table_schema", sa.String(128), primary_key=True),
    sa.Column("table_name", sa.String(128), primary_key=True),
    sa.Column("column_name", sa.String(128), primary_key=True),
    sa.Column("operation", sa.String(16), primary_key=True),
    sa.Column("key_name", sa.String(64), nullable=False),
    sa.Column("target_version", sa.Integer, nullable=True),
    sa.Column("last_key", sa.Text, nullable=True),  # JSON list of the last primary key done
    sa.Column("rows_done", sa.BigInteger, nullable=False),
    sa.Column("rows_skipped", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime, nullable=True),
)


@dataclass(frozen=True, order=True)
class ColumnRef:
    """An encrypted column: ``schema.table.column`` under data key ``key``."""

    table: str
    column: str
    key: str
    schema: str | None = None

    def __str__(self) -> str:
        prefix = f"{self.schema}." if self.schema else ""
        return f"{prefix}{self.table}.{self.column}"


@dataclass
class Census:
    """Rows of one column per key version of its data key, counted by header prefix."""

    column: ColumnRef
    total: int
    nulls: int
    by_version: dict[int, int] = field(default_factory=dict)
    other: int = 0  # neither NULL nor on a known version: plaintext, or another key's values

    def on_other_versions(self, version: int) -> int:
        """Rows that are not NULL and not on ``version``."""
        return self.total - self.nulls - self.by_version.get(version, 0)


def prefix(key: str, version: int, binary: bool) -> str | bytes:
    head = envelope.header(key, version)
    return head.encode("ascii") if binary else head


def _on_version(
    col: sa.ColumnElement[Any], key: str, version: int, binary: bool
) -> sa.ColumnElement[bool]:
    """The value is under ``key`` ``version``: a stored value, or a blind-index value in
    either of its formats (``kf2``, context-bound, and ``kf1`` of older releases)."""
    heads = {prefix(key, version, binary)}
    if not binary:
        heads |= {f"{fmt}:{key}:{version}:" for fmt in (IndexKey.LEGACY_FORMAT, IndexKey.FORMAT)}
    return sa.or_(*(starts_with(col, head) for head in sorted(heads, key=str)))


def starts_with(column: sa.ColumnElement[Any], value: str | bytes) -> sa.ColumnElement[bool]:
    """``column`` starts with ``value``, exactly (no LIKE wildcards, case-sensitive on MySQL)."""
    typ: sa.types.TypeEngine[Any] = sa.LargeBinary() if isinstance(value, bytes) else sa.String()
    empty = sa.literal(value[:0], typ)
    # coalesce: SQLite's substr() of an empty BLOB is NULL, which would hide the row.
    return sa.func.coalesce(sa.func.substr(column, 1, len(value)), empty) == sa.literal(value, typ)


def is_binary(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.types._Binary)


def reflect(conn: Connection | Engine, table: str, schema: str | None = None) -> sa.Table:
    try:
        return sa.Table(table, sa.MetaData(), schema=schema, autoload_with=conn)
    except sa.exc.NoSuchTableError:
        where = f"{schema}.{table}" if schema else table
        raise ConfigurationError(f"table {where!r} does not exist") from None


def count_versions(
    conn: Connection, table: sa.Table, ref: ColumnRef, versions: Iterable[int]
) -> Census:
    """One scan of the column: total rows, NULLs, rows per version of ``ref.key``."""
    if ref.column not in table.c:
        raise ConfigurationError(f"table {table.fullname!r} has no column {ref.column!r}")
    col = table.c[ref.column]
    binary = is_binary(col)
    versions = sorted(set(versions))
    counts = [
        sa.func.sum(sa.case((_on_version(col, ref.key, v, binary), 1), else_=0)) for v in versions
    ]
    row = conn.execute(
        sa.select(sa.func.count(), sa.func.count(col), *counts).select_from(table)
    ).one()
    total, non_null = int(row[0]), int(row[1])
    by_version = {v: int(n or 0) for v, n in zip(versions, row[2:], strict=True)}
    return Census(
        column=ref,
        total=total,
        nulls=total - non_null,
        by_version=by_version,
        other=non_null - sum(by_version.values()),
    )


# Known columns -----------------------------------------------------------------------------


def create_tables(conn: Connection | Engine) -> None:
    _metadata.create_all(conn, checkfirst=True)


def record_column(conn: Connection, ref: ColumnRef) -> None:
    """Remember that ``ref`` holds values of ``ref.key`` (idempotent)."""
    t = columns_table
    where = (
        (t.c.table_schema == (ref.schema or ""))
        & (t.c.table_name == ref.table)
        & (t.c.column_name == ref.column)
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    if conn.execute(sa.update(t).where(where).values(key_name=ref.key, recorded_at=now)).rowcount:
        return
    conn.execute(
        sa.insert(t).values(
            table_schema=ref.schema or "", table_name=ref.table, column_name=ref.column,
            key_name=ref.key, recorded_at=now,
        )
    )  # fmt: skip


def known_columns(conn: Connection | Engine) -> list[ColumnRef]:
    """Columns recorded by encrypt/re-encrypt jobs (empty if none ran yet)."""
    if not sa.inspect(conn).has_table(columns_table.name):
        return []
    t = columns_table
    if isinstance(conn, Engine):
        with conn.connect() as c:
            rows = list(c.execute(sa.select(t)))
    else:
        rows = list(conn.execute(sa.select(t)))
    return sorted(
        ColumnRef(r.table_name, r.column_name, r.key_name, r.table_schema or None) for r in rows
    )


def columns_from_metadata(metadata: sa.MetaData) -> list[ColumnRef]:
    """Every column of ``metadata`` declared with one of this library's encrypted types."""
    from .blind_index import BlindIndex
    from .types import _EncryptedType

    found = []
    for table in metadata.tables.values():
        for col in table.columns:
            if isinstance(col.type, _EncryptedType | BlindIndex):
                found.append(ColumnRef(table.name, col.name, col.type.key, table.schema))
    return sorted(found)


def merge(*groups: Sequence[ColumnRef]) -> list[ColumnRef]:
    seen: dict[tuple[str | None, str, str], ColumnRef] = {}
    for group in groups:
        for ref in group:
            seen.setdefault((ref.schema, ref.table, ref.column), ref)
    return sorted(seen.values())

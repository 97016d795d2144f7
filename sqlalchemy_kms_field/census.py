"""Counting rows per data key version with SQL alone, from the header prefix of stored values.

No value is decrypted: ``kf1:pii:2:`` (or ``kf2:pii:2:``) at the start of a stored value is
enough to know the key version it is on. The census decides when a re-encryption is finished and
when a data key version may be retired. Known encrypted columns are recorded in
``kms_field_columns``; ``scan.py`` counts the same way over every column of the database.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from . import envelope
from .exc import ConfigurationError

# Every stored-value format a census counts: a value in any of them is "on" its key version.
FORMATS: tuple[str, ...] = ("kf1", "kf2")

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

# Re-encryption jobs (written by the reencrypt package, read by status and key rotation).
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

    def where(self) -> tuple[str | None, str, str]:
        """Schema, table and column: the place, whatever the key."""
        return (self.schema, self.table, self.column)


@dataclass
class Census:
    """Rows of one column per key version of its data key, counted by header prefix."""

    column: ColumnRef
    total: int
    nulls: int
    by_version: dict[int, int] = field(default_factory=dict)  # every format together
    other: int = 0  # neither NULL nor on a known version: plaintext, or another key's values
    by_format: dict[str, dict[int, int]] = field(default_factory=dict)  # format -> version -> n

    def on_other_versions(self, version: int) -> int:
        """Rows that are not NULL and not on ``version``."""
        return self.total - self.nulls - self.by_version.get(version, 0)

    def in_format(self, fmt: str) -> int:
        """Rows in stored-value format ``fmt`` (``kf1``, ``kf2``), whatever their version."""
        return sum(self.by_format.get(fmt, {}).values())


def header_prefixes(key: str, version: int) -> dict[str, str]:
    """The header of ``key`` version ``version`` in every format: ``{"kf1": "kf1:pii:2:", ...}``.

    Every census counts a value in any of these as on that version.
    """
    rest = envelope.header(key, version).split(":", 1)[1]  # checks the name and the version
    return {fmt: f"{fmt}:{rest}" for fmt in FORMATS}


def prefix(key: str, version: int, binary: bool, fmt: str = "kf1") -> str | bytes:
    head = header_prefixes(key, version)[fmt]
    return head.encode("ascii") if binary else head


class _Head(sa.sql.functions.FunctionElement[Any]):
    """The first ``n`` characters (bytes) of a column, compared byte for byte on MySQL."""

    inherit_cache = True


@compiles(_Head)
def _head_default(element: _Head, compiler: SQLCompiler, **kw: Any) -> str:
    return f"substr({compiler.process(element.clauses, **kw)})"


@compiles(_Head, "mysql")
@compiles(_Head, "mariadb")
def _head_mysql(element: _Head, compiler: SQLCompiler, **kw: Any) -> str:
    # The default collations ignore case ('KF1:PII' = 'kf1:pii'): a binary string compares
    # exactly, and makes the comparison with the literal binary too.
    return f"CAST(substr({compiler.process(element.clauses, **kw)}) AS BINARY)"


def starts_with(column: sa.ColumnElement[Any], value: str | bytes) -> sa.ColumnElement[bool]:
    """``column`` starts with ``value``, exactly (no LIKE wildcards, case-sensitive on MySQL)."""
    typ: sa.types.TypeEngine[Any] = sa.LargeBinary() if isinstance(value, bytes) else sa.String()
    empty = sa.literal(value[:0], typ)
    head = _Head(column, sa.literal_column("1"), sa.literal_column(str(len(value))))
    # coalesce: SQLite's substr() of an empty BLOB is NULL, which would hide the row.
    return sa.func.coalesce(head, empty) == sa.literal(value, typ)


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
    cells = [(v, fmt) for v in sorted(set(versions)) for fmt in FORMATS]
    counts = [
        sa.func.sum(sa.case((starts_with(col, prefix(ref.key, v, binary, fmt)), 1), else_=0))
        for v, fmt in cells
    ]
    row = conn.execute(
        sa.select(sa.func.count(), sa.func.count(col), *counts).select_from(table)
    ).one()
    total, non_null = int(row[0]), int(row[1])
    by_format: dict[str, dict[int, int]] = {fmt: {} for fmt in FORMATS}
    for (v, fmt), n in zip(cells, row[2:], strict=True):
        by_format[fmt][v] = int(n or 0)
    by_version = {v: sum(by_format[fmt][v] for fmt in FORMATS) for v, _ in cells}
    return Census(
        column=ref,
        total=total,
        nulls=total - non_null,
        by_version=by_version,
        other=non_null - sum(by_version.values()),
        by_format=by_format,
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


def declared_column(
    metadata: sa.MetaData, table: str, column: str, schema: str | None = None
) -> sa.Column[Any] | None:
    """The column ``metadata`` declares as ``schema.table.column`` (None if it does not)."""
    declared = metadata.tables.get(f"{schema}.{table}" if schema else table)
    return None if declared is None or column not in declared.c else declared.c[column]


def merge(*groups: Sequence[ColumnRef]) -> list[ColumnRef]:
    seen: dict[tuple[str | None, str, str], ColumnRef] = {}
    for group in groups:
        for ref in group:
            seen.setdefault((ref.schema, ref.table, ref.column), ref)
    return sorted(seen.values())

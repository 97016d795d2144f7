"""Rows of a tenant column per tenant-key version, summed over tenants, by SQL alone.

A column declared with ``tenant=`` holds ``kf2:pii.t.42:3:...`` (or ``kf2:pii.h.<hash>:3:...``):
its values are under the keys of its tenants, not under ``pii`` itself, so the census of
``census.py`` (one header prefix per version of the column's key) finds none of them. Here one
scan groups the values whose header names a tenant key of the column's key by the version
field of the header, and a second counts the distinct tenant keys: a bounded answer (a row per
version, not per tenant) at any number of tenants. Nothing is decrypted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from .census import FORMATS, ColumnRef, reflect, starts_with
from .tenants import TABLE_NAME


@dataclass
class TenantCensus:
    """Values of one column under tenant keys of ``column.key``, per tenant-key version."""

    column: ColumnRef
    by_version: dict[int, int] = field(default_factory=dict)  # all tenants together
    tenants: int = 0  # distinct tenants with a value in the column
    rows: int = 0  # values under a tenant key of column.key (any version)


class _HeaderField(sa.sql.functions.FunctionElement[Any]):
    """Field ``n`` (1-based) of a stored value split on ':'. The separator is written into the
    SQL text (no bound parameter), so the expression can be repeated in GROUP BY. ``n`` is a
    class attribute (one class per field), so that the statement cache tells them apart."""

    inherit_cache = True
    n = 0


class _KeyName(_HeaderField):
    inherit_cache = True
    n = 2


class _Version(_HeaderField):
    inherit_cache = True
    n = 3


def _arg(element: _HeaderField, compiler: SQLCompiler, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_KeyName)
@compiles(_Version)
def _field_default(element: _HeaderField, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite: no split function. Every format tag is three characters and a ':' (kf1:, kf2:),
    # so the key name starts at character 5; the version follows the name's ':'.
    col = _arg(element, compiler, **kw)
    rest = f"substr({col}, 5)"
    if element.n == 2:
        return f"substr({rest}, 1, instr({rest}, ':') - 1)"
    after = f"substr({rest}, instr({rest}, ':') + 1)"
    return f"substr({after}, 1, instr({after}, ':') - 1)"


@compiles(_KeyName, "postgresql")
@compiles(_Version, "postgresql")
def _field_postgresql(element: _HeaderField, compiler: SQLCompiler, **kw: Any) -> str:
    return f"split_part({_arg(element, compiler, **kw)}, ':', {int(element.n)})"


@compiles(_KeyName, "mysql")
@compiles(_Version, "mysql")
@compiles(_KeyName, "mariadb")
@compiles(_Version, "mariadb")
def _field_mysql(element: _HeaderField, compiler: SQLCompiler, **kw: Any) -> str:
    col = _arg(element, compiler, **kw)
    return f"SUBSTRING_INDEX(SUBSTRING_INDEX({col}, ':', {int(element.n)}), ':', -1)"


def tenant_bases(
    engine: Engine, table_name: str = TABLE_NAME, schema: str | None = None
) -> set[str]:
    """The data keys that wrap tenant keys (none if the tenant key table does not exist)."""
    if not sa.inspect(engine).has_table(table_name, schema=schema):
        return set()
    t = sa.table(table_name, sa.column("base"), schema=schema)
    with engine.connect() as conn:
        return {str(b) for b in conn.execute(sa.select(t.c.base).distinct()).scalars()}


def is_tenant_value(col: sa.ColumnElement[Any], base: str) -> sa.ColumnElement[bool]:
    """``col`` holds a value under a tenant key of data key ``base`` (exact header prefix)."""
    return sa.or_(
        *(starts_with(col, f"{fmt}:{base}.{kind}.") for fmt in FORMATS for kind in ("t", "h"))
    )


def count_tenant_versions(conn: Connection, table: sa.Table, ref: ColumnRef) -> TenantCensus:
    """The census of ``ref``'s values under tenant keys of ``ref.key``: two scans, a result
    row per tenant-key version."""
    found = TenantCensus(ref)
    if ref.column not in table.c:
        return found
    col = table.c[ref.column]
    if isinstance(col.type, sa.types._Binary):
        return found  # tenant keys are for text columns only
    mine = is_tenant_value(col, ref.key)
    version = _Version(col)
    for v, n in conn.execute(
        sa.select(version, sa.func.count()).where(mine).group_by(version)
    ).all():
        try:
            number = int(v)
        except (TypeError, ValueError):
            continue  # not a version: counted as "other" by the caller's census
        found.by_version[number] = found.by_version.get(number, 0) + int(n)
    found.rows = sum(found.by_version.values())
    if found.rows:
        found.tenants = int(
            conn.execute(
                sa.select(sa.func.count(sa.distinct(_KeyName(col)))).where(mine)
            ).scalar_one()
        )
    return found


def tenant_column_census(
    engine: Engine, columns: Sequence[ColumnRef]
) -> dict[ColumnRef, TenantCensus]:
    """The tenant-key census of each of ``columns`` whose key wraps tenant keys."""
    bases = tenant_bases(engine)
    wanted = [ref for ref in columns if ref.key in bases]
    out: dict[ColumnRef, TenantCensus] = {}
    if not wanted:
        return out
    with engine.connect() as conn:
        for ref in wanted:
            out[ref] = count_tenant_versions(conn, reflect(conn, ref.table, ref.schema), ref)
    return out

"""Every column of the database, searched for values under one key version (no decryption).

Known columns (recorded by jobs, declared by models) are the fast path of ``status``. Retire and
destroy must not trust them: a column nobody declared may still hold values under the version,
and destroying it would make them unreadable forever. So they look at every table of the
default schema and of the schemas named, every text and binary column (on SQLite, whose columns
hold any type, every column), and count the values that start with the version's header in any
format, with one query per table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .census import FORMATS, ColumnRef, header_prefixes, starts_with
from .constants import ALL_SCHEMAS as ALL_SCHEMAS
from .exc import ConfigurationError


@dataclass(frozen=True)
class Found:
    """A column holding values under the scanned version, counted per format."""

    column: ColumnRef
    by_format: dict[str, int]

    @property
    def rows(self) -> int:
        return sum(self.by_format.values())


@dataclass(frozen=True)
class ScanProgress:
    """Sent to a scan's ``progress`` callback after each table."""

    tables_done: int
    tables_total: int
    table: str  # the table just scanned
    columns_done: int
    seconds: float
    schemas: str  # the schemas scanned, for the final report


@dataclass
class Scan:
    """What :func:`scan_database` looked at, what it found, and how long it took."""

    key: str
    version: int
    schemas: list[str | None]  # None: the default schema
    tables: int = 0
    columns: int = 0
    seconds: float = 0.0
    found: list[Found] = field(default_factory=list)

    def schema_names(self) -> str:
        return ", ".join(s or "(default)" for s in self.schemas)


Progress = Callable[[ScanProgress], None]

# ALL_SCHEMAS ("*", constants.py) in ``schemas``: every schema the user can see, but the system's.
_SYSTEM_SCHEMAS = {"information_schema", "performance_schema", "mysql", "sys", "pg_catalog"}


def scan_database(
    engine: Engine,
    key: str,
    version: int,
    *,
    schemas: Sequence[str | None] = (),
    progress: Progress | None = None,
) -> Scan:
    """Count, in every table of the default schema and of ``schemas``, the values under
    ``key`` version ``version`` in any stored-value format. ``schemas`` may hold
    :data:`ALL_SCHEMAS` (``"*"``): every schema but the system ones.

    A table that cannot be read raises: a scan that skipped it would prove nothing.
    """
    started = time.monotonic()
    with engine.connect() as conn:
        wanted = _check_schemas(conn, schemas)
        tables = [(s, name) for s in wanted for name in _relations(conn, s)]
        scan = Scan(key, version, wanted)
        for done, (schema, name) in enumerate(tables, 1):
            found, columns = _scan_table(conn, schema, name, key, header_prefixes(key, version))
            conn.rollback()  # no snapshot held across the whole scan
            scan.found += found
            scan.columns += columns
            scan.tables = done
            if progress is not None:
                label = f"{schema}.{name}" if schema else name
                elapsed = time.monotonic() - started
                progress(ScanProgress(done, len(tables), label, scan.columns, elapsed,
                                      scan.schema_names()))  # fmt: skip
    scan.seconds = time.monotonic() - started
    return scan


def _check_schemas(conn: Connection, schemas: Sequence[str | None]) -> list[str | None]:
    named = sorted({s for s in schemas if s})
    if ALL_SCHEMAS in named:
        every = sa.inspect(conn).get_schema_names()
        named = sorted(s for s in every if s.lower() not in _SYSTEM_SCHEMAS)
    elif named:
        existing = set(sa.inspect(conn).get_schema_names())
        missing = [s for s in named if s not in existing]
        if missing:
            raise ConfigurationError(
                f"schema {', '.join(map(repr, missing))} does not exist in the database; "
                "name existing schemas in schemas= (--schema)"
            )
    return [None, *(s for s in named if s != _default_schema(conn))]


def _default_schema(conn: Connection) -> str | None:
    return conn.dialect.default_schema_name


def _relations(conn: Connection, schema: str | None) -> list[str]:
    """Tables, and materialized views (they hold copies of values) where there are any."""
    inspector = sa.inspect(conn)
    names = list(inspector.get_table_names(schema))
    try:
        names += inspector.get_materialized_view_names(schema)
    except NotImplementedError:
        pass
    return sorted(names)


def _scan_table(
    conn: Connection, schema: str | None, name: str, key: str, heads: dict[str, str]
) -> tuple[list[Found], int]:
    """One query counting, for every candidate column of the table, the values per format."""
    sqlite = conn.dialect.name == "sqlite"
    longest = max(len(h) for h in heads.values())
    candidates = []
    for col in sa.inspect(conn).get_columns(name, schema):
        mode = "any" if sqlite else _mode(col["type"], longest)
        if mode is not None:
            candidates.append((col["name"], mode))
    if not candidates:
        return [], 0
    table = sa.table(name, *(sa.column(c) for c, _ in candidates), schema=schema)
    cells = [(c, fmt) for c, _ in candidates for fmt in FORMATS]
    modes = dict(candidates)
    sums = [
        sa.func.sum(sa.case((_matches(table.c[c], modes[c], heads[fmt]), 1), else_=0))
        for c, fmt in cells
    ]
    try:
        row = conn.execute(sa.select(*sums).select_from(table)).one()
    except sa.exc.DBAPIError as exc:
        where = f"{schema}.{name}" if schema else name
        conn.rollback()
        raise ConfigurationError(
            f"cannot scan table {where!r} ({type(exc.orig).__name__}), so nothing proves the "
            "key version unused there: grant this database user SELECT on it"
        ) from None
    counts: dict[str, dict[str, int]] = {}
    for (c, fmt), n in zip(cells, row, strict=True):
        counts.setdefault(c, {})[fmt] = int(n or 0)
    found = [
        Found(ColumnRef(name, c, key, schema), by_format)
        for c, by_format in counts.items()
        if any(by_format.values())
    ]
    return found, len(candidates)


def _mode(typ: Any, longest: int) -> str | None:
    """``text`` or ``binary`` for a column that can hold a header; None for any other."""
    if isinstance(typ, sa.Enum) or type(typ).__name__ == "SET":
        return None  # only the listed values fit
    if isinstance(typ, sa.types._Binary):
        mode = "binary"
    elif isinstance(typ, sa.String):
        mode = "text"
    else:
        return None
    length = getattr(typ, "length", None)
    return None if length is not None and length < longest else mode


def _matches(col: sa.ColumnElement[Any], mode: str, head: str) -> sa.ColumnElement[bool]:
    if mode == "any":  # SQLite: a TEXT or a BLOB value, in a column of any declared type
        as_bytes = sa.cast(col, sa.LargeBinary)
        return starts_with(as_bytes, head.encode("ascii"))
    return starts_with(col, head.encode("ascii") if mode == "binary" else head)

"""Dialect-specific statements: PostgreSQL's one-statement batch write (``UPDATE ... FROM
unnest(arrays)``, optionally with the checkpoint in the same statement).

Other dialects use the portable executemany UPDATE built in ``sweep.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .ranges import LeaseLost


class _PgUpdate:
    """``UPDATE ... FROM unnest(arrays)`` with the compare-and-swap condition on every row.

    One statement per batch instead of one per row. With psycopg 3 the arrays travel in
    binary format (``%(name)b``): the server then neither parses nor unescapes them, which saves
    about a quarter of its work per row. Other drivers (and psycopg's ClientCursor, which cannot
    send binary parameters) get the same statement with text and integer arrays sent as one
    string each, in PostgreSQL's array syntax: drivers dump a list of strings element by element
    in Python (psycopg: a regular expression per element), which cost more than the UPDATE.
    """

    def __init__(
        self,
        engine: Engine,
        t: sa.Table,
        pk: Sequence[sa.Column[Any]],
        col: sa.Column[Any],
        source: sa.Column[Any] | None = None,
        companion: sa.Column[Any] | None = None,
        checkpoint: sa.Update | None = None,
    ) -> None:
        from sqlalchemy.dialects.postgresql import ARRAY

        dialect = engine.dialect
        q = dialect.identifier_preparer.quote
        names = [f"pk_{i}" for i in range(len(pk))] + ["old_value", "new_value"]
        types = [c.type for c in pk] + [col.type, col.type]
        match = [f"t.{q(c.name)} = v.pk_{i}" for i, c in enumerate(pk)]
        if source is None:
            match.append(f"t.{q(col.name)} = v.old_value")
        else:
            names.append("old_source")
            types.append(source.type)
            match.append(f"t.{q(col.name)} IS NOT DISTINCT FROM v.old_value")
            match.append(f"t.{q(source.name)} = v.old_source")
        sets = [f"{q(col.name)} = v.new_value"]
        if companion is not None:
            names.append("companion_value")
            types.append(companion.type)
            sets.append(f"{q(companion.name)} = v.companion_value")
        head = (
            f"UPDATE {dialect.identifier_preparer.format_table(t)} AS t SET {', '.join(sets)} "
            "FROM unnest("
        )
        tail = f") AS v({', '.join(names)}) WHERE {' AND '.join(match)} AND "
        sql_types = [_unsized(typ.compile(dialect)) for typ in types]
        # A batch is one range of primary keys, and saying so (redundant with the match on
        # each key) lets PostgreSQL read just that range of the primary-key index: without it
        # the planner merge-joins from the start of the index, so that each batch costs more
        # the further it is into the table (quadratic in the table size).
        self.n = len(pk)
        cols = ", ".join(f"t.{q(c.name)}" for c in pk)

        def key_range(bind: Callable[[str], str]) -> str:
            lo = ", ".join(bind(f"lo_{i}") for i in range(self.n))
            hi = ", ".join(bind(f"hi_{i}") for i in range(self.n))
            if self.n == 1:
                return f"{cols} BETWEEN {lo} AND {hi}"
            return f"({cols}) >= ({lo}) AND ({cols}) <= ({hi})"

        # Binary (psycopg 3): a driver-level statement; the values as SQLAlchemy read them,
        # through the bind processor of their column type where it has one.
        self.binary: bool | None = None if dialect.driver == "psycopg" else False
        arrays = ", ".join(f"%({n})b::{st}[]" for n, st in zip(names, sql_types, strict=True))
        # (For the driver as it is: the dialect's quoting already doubled any "%" in a name.)
        self.binary_sql = head + arrays + tail + key_range(lambda n: f"%({n})s")
        self.processors = {
            n: proc
            for n, typ in zip(names, types, strict=True)
            if (proc := typ.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        # With the checkpoint: one statement (a data-modifying WITH), so a batch is one round
        # trip to the server in autocommit instead of four (BEGIN, UPDATE, checkpoint, COMMIT).
        self.single = False
        if checkpoint is not None and self.binary is not False:
            compiled = checkpoint.compile(dialect=dialect)
            self.checkpoint_params = compiled.construct_params(
                {"last_key": None, "n": 0, "s": 0, "now": None, "cp_range": 0, "cp_owner": ""}
            )
            self.single = all(
                b.type.dialect_impl(dialect).bind_processor(dialect) is None
                for b in compiled.binds.values()
            )
            self.single_sql = (
                f"WITH moved AS ({self.binary_sql} RETURNING 1) {compiled.string} "
                "RETURNING (SELECT count(*) FROM moved)"
            )

        # Text: a SQLAlchemy statement; text and integer arrays rendered as one literal each.
        self.literals: dict[str, Callable[[list[Any]], str]] = {}
        casts = []
        binds = []
        for n, typ, st in zip(names, types, sql_types, strict=True):
            render = _pg_text_array if isinstance(typ, sa.String) else None
            if isinstance(typ, sa.Integer):
                render = _pg_int_array
            if render is None:
                casts.append(f"CAST(:{n} AS {st}[])")
                binds.append(sa.bindparam(n, type_=ARRAY(_unsized_type(typ))))
            else:
                casts.append(f"CAST(CAST(:{n} AS TEXT) AS {st}[])")
                binds.append(sa.bindparam(n, type_=sa.Text()))
                self.literals[n] = render
        for i, c in enumerate(pk):
            binds += [sa.bindparam(f"lo_{i}", type_=c.type), sa.bindparam(f"hi_{i}", type_=c.type)]
        # text() doubles "%" for the driver itself: undo the quoting's doubling.
        text = head + ", ".join(casts) + tail + key_range(lambda n: f":{n}")
        if dialect.identifier_preparer.quote("%") == '"%%"':
            text = text.replace("%%", "%")
        self.text_statement = sa.text(text).bindparams(*binds)

    def _binary(self, conn: Connection) -> bool:
        """Whether this connection's cursors can send binary parameters (decided once)."""
        if self.binary is None:
            import psycopg

            driver = conn.connection.driver_connection
            factory = getattr(driver, "cursor_factory", None)
            self.binary = not (factory and issubclass(factory, psycopg.ClientCursor))
        return self.binary

    def single_statement(self, conn: Connection) -> bool:
        """True if a batch and its checkpoint go as one statement on this connection."""
        return self.single and self._binary(conn)

    def execute(
        self,
        conn: Connection,
        columns: dict[str, Any],
        checkpoint: dict[str, Any] | None = None,
    ) -> int:
        """Write one batch (a list of values per array name); returns the rows matched.

        With ``checkpoint`` (only where :meth:`single_statement` said so), the job's checkpoint
        is updated by the same statement.
        """
        binary = self._binary(conn)
        if checkpoint is not None and not (binary and self.single):
            raise AssertionError("the checkpoint needs the single-statement form")
        if binary:
            for name, process in self.processors.items():
                columns[name] = [process(v) for v in columns[name]]
        # The key range: rows come in primary-key order (the page is read ORDER BY the key).
        params: dict[str, Any] = {}
        for i in range(self.n):
            params[f"lo_{i}"], params[f"hi_{i}"] = columns[f"pk_{i}"][0], columns[f"pk_{i}"][-1]
        if binary:
            params.update(columns)
            if checkpoint is not None:
                params.update(self.checkpoint_params, **checkpoint)
                moved = conn.exec_driver_sql(self.single_sql, params).scalar()
                if moved is None:  # the checkpoint matched no range: another worker holds it
                    raise LeaseLost(f"range {checkpoint.get('cp_range')}")
                return int(moved)
            return int(conn.exec_driver_sql(self.binary_sql, params).rowcount)
        for name, render in self.literals.items():
            columns[name] = render(columns[name])
        params.update(columns)
        return int(conn.execute(self.text_statement, params).rowcount)


def _plain_result(typ: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> bool:
    """True if SQLAlchemy returns values of ``typ`` as the driver gives them."""
    try:
        return typ.dialect_impl(dialect).result_processor(dialect, None) is None
    except Exception:  # some processors depend on the driver's type code: assume they apply
        return False


def _pg_int_array(values: list[Any]) -> str:
    return "{" + ",".join([str(int(v)) for v in values]) + "}"


def _pg_text_array(values: list[Any]) -> str:
    """Strings (or None) in PostgreSQL's array input syntax, each element double-quoted."""
    if not values:
        return "{}"
    if None in values:
        return "{" + ",".join(["NULL" if v is None else _pg_quote(v) for v in values]) + "}"
    joined = "".join(values)
    if '"' in joined or "\\" in joined:
        return "{" + ",".join([_pg_quote(v) for v in values]) + "}"
    return '{"' + '","'.join(values) + '"}'


def _pg_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unsized(sql_type: str) -> str:
    # PostgreSQL silently truncates an explicit cast to varchar(n): cast to the unsized type
    # so that a value too long for the column fails the UPDATE instead of losing data.
    unsized = re.sub(r"\s*\([^)]*\)", "", sql_type)
    # ... except that an unsized CHAR is char(1): bpchar is the unsized blank-padded type.
    return {"CHAR": "BPCHAR", "NCHAR": "BPCHAR", "CHARACTER": "BPCHAR"}.get(unsized, unsized)


def _unsized_type(typ: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    # psycopg binds render as ``%(x)s::VARCHAR(40)[]``: the same silent truncation as above.
    if isinstance(typ, sa.String):
        return sa.Text()
    if isinstance(typ, sa.LargeBinary):
        return sa.LargeBinary()
    return typ

"""Row binding: a value also authenticated with other columns of its row (``bind_to=("id",)``).

A value bound to its row's ``id`` does not decrypt in another row, even in the same column: the
bound columns' values are part of its associated data. They must be known when the value is
written (a client-side primary key, a tenant id), so:

* Writes: one ``before_execute`` hook encrypts bound values itself, with the row's values taken
  from the statement's parameters (INSERT values, UPDATE values, or an UPDATE's
  ``WHERE col = :param``, as the ORM writes them). It hands the ciphertext to the type as a
  :class:`Sealed` value, which the bind processor passes through. A write that cannot supply a
  bound column's value fails loudly; it never writes an unbound value.
* Reads: the column is selected as ``value || SEP || CAST(bound AS text) ...`` (the type's
  ``column_expression``), so the result processor sees the row's bound values with the value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Insert, Update

from .exc import ConfigurationError, DecryptionError, EncryptionError

if TYPE_CHECKING:
    from .types import _EncryptedType

# Between the value and each bound column's text. Not in a header or base64url; a bound value
# that contains it is refused on write, and a read that splits into the wrong count fails.
SEP = "\x1f"


class Sealed:
    """A ciphertext the hook computed for a row-bound column; the bind processor passes it on."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Sealed(...)"


def read_expression(typ: _EncryptedType[Any], colexpr: Any) -> Any:
    """``colexpr`` followed by the text of each bound column of the same FROM clause."""
    table = getattr(colexpr, "table", None)
    if table is None:
        raise ConfigurationError(
            f"{typ!r} is bound to columns {typ.bind_to} of its row; select it from its table"
        )
    expr: Any = sa.type_coerce(colexpr, sa.String())
    for name in typ.bind_to:
        bound = sa.func.coalesce(sa.cast(table.c[name], sa.String()), "")
        expr = expr + SEP + bound
    return sa.type_coerce(expr, typ)


def split(typ: _EncryptedType[Any], value: str) -> tuple[str, list[tuple[str, str]]]:
    """The stored value and ``(name, text)`` of each bound column, from a read expression."""
    parts = value.split(SEP)
    if len(parts) != len(typ.bind_to) + 1:
        raise DecryptionError(
            f"{typ._where()} is bound to {', '.join(typ.bind_to)} of its row, but was read "
            "without them (or a bound column holds a separator character); select the "
            "column through its table"
        )
    return parts[0], list(zip(typ.bind_to, parts[1:], strict=True))


def _as_text(conn: Connection, column: sa.Column[Any], value: Any) -> str:
    """The text ``CAST(column AS text)`` gives for ``value`` once stored."""
    if value is None:
        raise EncryptionError(
            f"{column.table.name}.{column.name} is NULL, but an encrypted column of the row is "
            "bound to it; give it a value before writing the encrypted one"
        )
    process = column.type._cached_bind_processor(conn.dialect)
    text = str(process(value) if process is not None else value)
    if SEP in text:
        raise EncryptionError(
            f"{column.table.name}.{column.name} holds a control character (0x1f) that a bound "
            "column may not hold"
        )
    return text


def _bound_columns(table: Any) -> list[sa.Column[Any]]:
    from .types import _EncryptedType

    return [c for c in table.c if isinstance(c.type, _EncryptedType) and c.type.bind_to]


def _where_params(stmt: Any) -> dict[str, Any]:
    """Column key -> bind parameter, for each ``column = :param`` of an UPDATE's WHERE."""
    found: dict[str, Any] = {}
    where = getattr(stmt, "whereclause", None)
    stack = [where] if where is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, sa.BinaryExpression) and node.operator is operators.eq:
            left, right = node.left, node.right
            if isinstance(right, sa.Column) and isinstance(left, sa.BindParameter):
                left, right = right, left
            if isinstance(left, sa.Column) and isinstance(right, sa.BindParameter):
                found[left.key] = right
        elif isinstance(node, sa.BooleanClauseList) and node.operator is operators.and_:
            stack.extend(node.clauses)
    return found


# The blind-index hook must run first (it hashes the plaintext that this hook then seals), and
# engine events run in the order they were registered: register it now, whatever imported what.
from . import blind_index_writes  # noqa: E402, F401


@event.listens_for(Engine, "before_execute", retval=True)
def _seal_bound_values(
    conn: Connection,
    clauseelement: Any,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
    execution_options: Any,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    if not isinstance(clauseelement, (Insert, Update)):
        return clauseelement, multiparams, params
    targets = _bound_columns(clauseelement.table)
    if not targets:
        return clauseelement, multiparams, params
    if getattr(clauseelement, "_multi_values", None):
        raise EncryptionError(
            "multi-row .values() cannot supply the bound columns of a row-bound encrypted "
            "column; pass the rows as execute() parameters"
        )
    stmt_values: dict[str, Any] = {
        str(getattr(k, "key", k)): v for k, v in (clauseelement._values or {}).items()
    }
    insert = isinstance(clauseelement, Insert)
    where = {} if insert else _where_params(clauseelement)
    for col in targets:
        typ: _EncryptedType[Any] = col.type  # type: ignore[assignment]
        if col.key in stmt_values:
            bind = stmt_values[col.key]
            if not isinstance(bind, sa.BindParameter) or bind.callable is not None:
                raise EncryptionError(f"{typ._where()} needs a Python value, not a SQL expression")
            if not bind.required:  # .values(col=python value): sealed into the statement
                defaults: dict[str, Any] = {}  # Python defaults of bound columns, computed now
                row = _row(conn, typ, col, stmt_values, where, defaults, insert)
                sealed = Sealed(typ.encrypt_for_row(bind.value, row))
                clauseelement = clauseelement.values({**defaults, col.key: sealed})
                continue
            name = bind.key
        else:
            name = col.key
        multiparams = [
            _seal_params(conn, typ, col, name, p, stmt_values, where, insert) for p in multiparams
        ]
        if params:
            params = _seal_params(conn, typ, col, name, params, stmt_values, where, insert)
    return clauseelement, multiparams, params


def _seal_params(
    conn: Connection,
    typ: _EncryptedType[Any],
    col: sa.Column[Any],
    name: str,
    p: dict[str, Any],
    stmt_values: dict[str, Any],
    where: dict[str, Any],
    insert: bool,
) -> dict[str, Any]:
    if name not in p or p[name] is None or isinstance(p[name], Sealed):
        return p
    work = dict(p)
    row = _row(conn, typ, col, stmt_values, where, work, insert)
    work[name] = Sealed(typ.encrypt_for_row(p[name], row))
    return work


def _row(
    conn: Connection,
    typ: _EncryptedType[Any],
    col: sa.Column[Any],
    stmt_values: dict[str, Any],
    where: dict[str, Any],
    p: dict[str, Any],
    insert: bool,
) -> list[tuple[str, str]]:
    """``(name, text)`` of each column ``typ`` is bound to, from this row's parameters."""
    row = []
    for name in typ.bind_to:
        bound = col.table.c[name]
        value: Any = _MISSING
        for source in (stmt_values.get(name), where.get(name)):
            if isinstance(source, sa.BindParameter):
                value = p.get(source.key, _MISSING) if source.required else source.value
                if value is not _MISSING:
                    break
        if value is _MISSING:
            value = p.get(name, _MISSING)
        if value is _MISSING and insert:
            value = _python_default(bound)
            if value is not _MISSING:
                p[name] = value  # the INSERT writes the value the ciphertext is bound to
        if value is _MISSING:
            raise EncryptionError(
                f"{typ._where()} is bound to {col.table.name}.{name}, which this statement does "
                f"not set or select its row by (WHERE {name} = ...): include {name!r} in the "
                "write"
            )
        row.append((name, _as_text(conn, bound, value)))
    return row


_MISSING = object()


def _python_default(column: sa.Column[Any]) -> Any:
    """A bound column's Python-side default (``default=uuid.uuid4``), computed now, or _MISSING."""
    default = column.default
    if default is None or not (default.is_scalar or default.is_callable):
        return _MISSING
    arg: Any = default.arg  # type: ignore[attr-defined]
    if default.is_scalar:
        return arg
    try:
        return arg(None)  # SQLAlchemy wraps a no-argument callable to take the context
    except Exception:  # noqa: S110 - a default that needs the execution context
        pass
    return _MISSING

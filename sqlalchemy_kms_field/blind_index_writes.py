"""Blind-index columns fill themselves on every write, never left stale.

The ORM, Core ``insert()``/``update()`` with parameters or ``.values()``, executemany, and
upserts (``on_conflict_do_update`` on PostgreSQL and SQLite, ``on_duplicate_key_update`` on
MySQL/MariaDB) all go through one ``before_execute`` hook, which computes the index value of
each source value written. A write whose index value cannot be computed in Python (a SQL
expression assigned to the source) is refused, naming the fix.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.dml import Insert, Update

from . import census
from .blind_index import BlindIndex, index_columns, index_table
from .envelope import IndexKey
from .exc import EncryptionError, KmsFieldError
from .registry import get_registry

# (plaintext, primary key or None) of each row an INSERT writes: for the uniqueness check.
Written = list[tuple[Any, tuple[Any, ...] | None]]


# Registered before the row-binding hook (row_binding.py imports this module first): that hook
# replaces a row-bound source's plaintext with its ciphertext, which must never be hashed.
@event.listens_for(Engine, "before_execute", retval=True)
def _fill_indexes(
    conn: Connection,
    clauseelement: Any,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
    execution_options: Any,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    if not isinstance(clauseelement, (Insert, Update)):
        return clauseelement, multiparams, params
    indexes = index_columns(clauseelement.table)
    for source, index in indexes.items():
        typ: BlindIndex = index.type  # type: ignore[assignment]
        where = index_table(index)
        clauseelement, key, written = _source_param(clauseelement, source, index, typ, where)
        if key is not None:
            fill = _fill_params if typ.tenant is None else _tenant_filler(clauseelement)
            multiparams = [fill(p, key, index, typ, where) for p in multiparams]
            if params:
                params = fill(params, key, index, typ, where)
            pk = [c.key for c in index.table.primary_key.columns]
            written = [
                (p[key], tuple(p[k] for k in pk) if all(k in p for k in pk) else None)
                for p in (*multiparams, params)
                if p and p.get(key) is not None
            ]
        if isinstance(clauseelement, Insert):
            clauseelement = _fill_upsert(clauseelement, source, index, typ, where)
            if written and _is_unique(index) and typ.tenant is None:
                _check_other_forms(conn, index, typ, where, written)
    return clauseelement, multiparams, params


def _fill_params(
    p: dict[str, Any], key: str, index: sa.Column[Any], typ: BlindIndex, where: str
) -> dict[str, Any]:
    if key not in p:
        return p
    p = dict(p)
    p[index.key] = typ.compute(p[key], where)
    return p


def _source_param(
    stmt: Any, source: str, index: sa.Column[Any], typ: BlindIndex, where: str
) -> tuple[Any, str | None, Written]:
    """Fill the index from ``.values()``; return the execute() parameter holding the source,
    and what ``.values()`` wrote."""
    if getattr(stmt, "select", None) is not None:
        names = {getattr(c, "key", c) for c in getattr(stmt, "_select_names", None) or ()}
        if source in names and index.key not in names:
            raise EncryptionError(
                f"INSERT ... FROM SELECT cannot fill blind index {index.key!r}; select it too, "
                "or insert the rows with execute() parameters"
            )
        return stmt, None, []
    for row in getattr(stmt, "_multi_values", None) or ():
        for values in row:
            keys = {getattr(k, "key", k) for k in values} if isinstance(values, dict) else set()
            if source in keys and index.key not in keys:
                raise EncryptionError(
                    f"multi-row .values() cannot fill blind index {index.key!r}; pass the "
                    "rows as execute() parameters instead"
                )
    assigned = {getattr(c, "key", c): v for c, v in (getattr(stmt, "_values", None) or {}).items()}
    if source not in assigned:
        return stmt, source, []
    value = assigned[source]
    if isinstance(value, sa.BindParameter) and value.callable is None:
        if value.required:  # bindparam("name"): the value comes with execute()
            return stmt, value.key, []
        tenant = _tenant_in(stmt, typ, {}) if typ.tenant is not None else None
        stmt = stmt.values({index.key: typ.compute(value.value, where, tenant)})
        pk = [assigned.get(c.key) for c in index.table.primary_key.columns]
        known = all(isinstance(v, sa.BindParameter) and not v.required for v in pk)
        key = tuple(v.value for v in pk) if known else None  # type: ignore[union-attr]
        return stmt, None, [(value.value, key)] if value.value is not None else []
    raise EncryptionError(
        f"cannot compute blind index {index.key!r} from a SQL expression assigned to "
        f"{source!r}; assign a Python value"
    )


# Upserts ------------------------------------------------------------------------------------


def _fill_upsert(
    stmt: Insert, source: str, index: sa.Column[Any], typ: BlindIndex, where: str
) -> Insert:
    """The UPDATE half of an upsert that sets the source sets the index column too.

    ``excluded.email`` (``inserted.email`` on MySQL) becomes ``excluded.email_index``, which the
    INSERT half has just computed; a Python value gets its index value; anything else is
    refused, since the index would keep the old value's index (the old email would still find
    the row, and uniqueness would break).
    """
    clauses = _upsert_clauses(stmt)
    changed = [_fill_upsert_clause(c, source, index, typ, where) for c in clauses]
    if all(new is old for new, old in zip(changed, clauses, strict=True)):
        return stmt
    stmt = stmt._generate()  # a copy: the application's statement stays as it was
    if hasattr(stmt, "apply_syntax_extension_point"):  # SQLAlchemy 2.1
        stmt.apply_syntax_extension_point(lambda existing: changed, "post_values")
    else:
        stmt._post_values_clause = changed[0]
    return stmt


def _upsert_clauses(stmt: Insert) -> list[Any]:
    """The ON CONFLICT / ON DUPLICATE KEY clauses of ``stmt`` (SQLite allows several)."""
    clause = stmt._post_values_clause
    if clause is None:
        return []
    return list(getattr(clause, "clauses", None) or [clause])


def _fill_upsert_clause(
    clause: Any, source: str, index: sa.Column[Any], typ: BlindIndex, where: str
) -> Any:
    sets: dict[Any, Any] | None = getattr(clause, "update_values_to_set", None)
    if sets is None:
        sets = getattr(clause, "update", None)  # MySQL's OnDuplicateClause
    if not sets:
        return clause  # DO NOTHING, or not an upsert
    value = next((v for k, v in sets.items() if getattr(k, "key", k) == source), None)
    if value is None:
        return clause
    new = {k: v for k, v in sets.items() if getattr(k, "key", k) != index.key}
    new[index.key] = _upsert_index_value(value, source, index, typ, where)
    return _with_upsert_sets(clause, new)


def _upsert_index_value(
    value: Any, source: str, index: sa.Column[Any], typ: BlindIndex, where: str
) -> Any:
    alias = getattr(value, "table", None)
    if (
        isinstance(alias, sa.Alias)
        and isinstance(value, sa.ColumnElement)
        and value.shares_lineage(index.table.c[source])  # excluded.email, also of an entity
        and index.key in alias.c
    ):
        return alias.c[index.key]  # excluded.email -> excluded.email_index
    if isinstance(value, sa.sql.elements.Null):
        return sa.null()
    if isinstance(value, sa.BindParameter) and value.callable is None and not value.required:
        return typ.compute(value.value, where)
    raise EncryptionError(
        f"the update part of this upsert sets {source!r} to a SQL expression, so blind index "
        f"{index.key!r} cannot be computed: set it to the inserted value (stmt.excluded."
        f"{source} on PostgreSQL and SQLite, stmt.inserted.{source} on MySQL/MariaDB) or to "
        "a Python value"
    )


def _with_upsert_sets(clause: Any, sets: dict[Any, Any]) -> Any:
    """A copy of ON CONFLICT / ON DUPLICATE KEY ``clause`` that sets ``sets`` instead."""
    if hasattr(clause, "update_values_to_set"):  # PostgreSQL or SQLite
        kwargs = {
            "index_elements": clause.inferred_target_elements,
            "index_where": clause.inferred_target_whereclause,
            "set_": sets,
            "where": clause.update_whereclause,
        }
        if getattr(clause, "constraint_target", None) is not None:  # PostgreSQL only
            kwargs.update(constraint=clause.constraint_target, index_elements=None)
        return type(clause)(**kwargs)
    order = clause._parameter_ordering or []
    ordered = [(k, sets[k]) for k in order if k in sets]  # as the application asked
    ordered += [(k, v) for k, v in sets.items() if k not in order]
    return type(clause)(clause.inserted_alias, ordered if order else sets)


# Uniqueness across the forms of an index value ----------------------------------------------


def _is_unique(index: sa.Column[Any]) -> bool:
    table = index.table
    return (
        bool(index.unique)
        or any(
            isinstance(c, sa.UniqueConstraint) and list(c.columns) == [index]
            for c in table.constraints
        )
        or any(i.unique and list(i.columns) == [index] for i in table.indexes)
    )


def _check_other_forms(
    conn: Connection, index: sa.Column[Any], typ: BlindIndex, where: str, written: Written
) -> None:
    """A unique constraint on the index column compares index values, and a row may hold the
    same value in another form: a ``kf1`` value of an older release (until a reindex replaces
    it), or the value under an older index-key version (while a rotation's reindex runs). Look
    for those before inserting; the row an upsert updates (same primary key) does not count."""
    keys = get_registry().index_keys(typ.key)
    legacy = _may_hold_legacy(conn, index)
    if len(keys) < 2 and not legacy:
        return
    fields, n = typ.context_fields(where), typ._nbytes
    others: dict[str, int] = {}  # index value in another form -> position in ``written``
    for i, (plain, _) in enumerate(written):
        data = typ._data(plain)
        for k in keys:
            if legacy:
                others[k.compute_legacy(data, n)] = i
            if k is not keys[0]:
                others[k.compute(data, n, fields)] = i
    pk = list(index.table.primary_key.columns)
    query = sa.select(index, *pk).where(index.in_(sorted(others)))
    for row in conn.execute(query):
        own = written[others[row[0]]][1]
        if own is None or tuple(row[1:]) != own:
            raise sa.exc.IntegrityError(
                f"INSERT INTO {index.table}",  # no parameters: they are plaintext
                None,
                DuplicateIndexValue(
                    f"a row with the same {index.name!r} already exists under another form of "
                    f"index key {typ.key!r} (an older version, or a value not reindexed yet)"
                ),
            )


# engine -> (schema, table, column) -> (the column may hold kf1 values, until when to believe it)
_legacy: weakref.WeakKeyDictionary[Engine, dict[tuple[str | None, str, str], tuple[bool, float]]]
_legacy = weakref.WeakKeyDictionary()


def _may_hold_legacy(conn: Connection, index: sa.Column[Any]) -> bool:
    """True unless this process has seen that ``index`` holds no ``kf1`` value.

    Once none is left (reindexed, or never any), none comes back: this release writes kf2 only
    (upgrade every process before reindexing). So the probe, one scan, runs once per process
    and column; while kf1 values remain it runs again every ``active_ttl``.
    """
    known = _legacy.setdefault(conn.engine, {})
    where = (index.table.schema, index.table.name, index.name)
    found, until = known.get(where, (True, 0.0))
    if time.monotonic() < until:
        return found
    probe = sa.select(sa.literal(1)).select_from(index.table)
    probe = probe.where(census.starts_with(index, f"{IndexKey.LEGACY_FORMAT}:")).limit(1)
    found = conn.execute(probe).first() is not None
    ttl = get_registry().active_ttl if found else float("inf")
    known[where] = (found, time.monotonic() + ttl)
    return found


class DuplicateIndexValue(KmsFieldError):
    """The ``orig`` of the IntegrityError raised for a duplicate caught across index forms."""


# Keeping loaded entities in step -----------------------------------------------------------


@event.listens_for(Mapper, "mapper_configured")
def _track_sources(mapper: Mapper[Any], class_: type) -> None:
    """Setting ``user.email`` also sets ``user.email_index`` on the object (the database row
    gets it from the before_execute hook either way)."""
    for table in mapper.tables:
        for source, index in index_columns(table).items():
            source_prop = mapper.get_property_by_column(table.c[source])
            index_prop = mapper.get_property_by_column(index)
            typ: BlindIndex = index.type  # type: ignore[assignment]

            def on_set(
                target: Any,
                value: Any,
                old: Any,
                initiator: Any,
                _attr: str = index_prop.key,
                _typ: BlindIndex = typ,
                _where: str = index_table(index),
            ) -> None:
                if _typ.tenant is None:
                    setattr(target, _attr, _typ.compute(value, _where))
                else:  # the row's tenant may not be set yet: the write hook computes it
                    tenant = getattr(target, _typ.tenant, None)
                    setattr(target, _attr, _typ.compute(value, _where, tenant) if tenant else None)

            event.listen(getattr(class_, source_prop.key), "set", on_set)


# Tenant-scoped indexes (BlindIndex(..., tenant="tenant_id")): the row's tenant comes from the
# same parameters, the statement's .values(), or an UPDATE's WHERE tenant_id = ...


def _tenant_filler(stmt: Any) -> Any:
    def fill(
        p: dict[str, Any], key: str, index: sa.Column[Any], typ: BlindIndex, where: str
    ) -> dict[str, Any]:
        if key not in p:
            return p
        p = dict(p)
        p[index.key] = typ.compute(p[key], where, _tenant_in(stmt, typ, p))
        return p

    return fill


def _tenant_in(stmt: Any, typ: BlindIndex, p: dict[str, Any]) -> Any:
    from .row_binding import _where_params

    name = typ.tenant or ""
    assigned = {getattr(c, "key", c): v for c, v in (getattr(stmt, "_values", None) or {}).items()}
    sources = [assigned.get(name)]
    if isinstance(stmt, Update):
        sources.append(_where_params(stmt).get(name))
    for source in sources:
        if isinstance(source, sa.BindParameter):
            value = p.get(source.key) if source.required else source.value
            if value is not None:
                return value
    if p.get(name) is not None:
        return p[name]
    raise EncryptionError(
        f"blind index {typ!r} is scoped to tenant column {name!r}, which this statement does "
        f"not set or select its row by (WHERE {name} = ...): include {name!r} in the write"
    )

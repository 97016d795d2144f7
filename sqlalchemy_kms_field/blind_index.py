"""Blind indexes: find rows by an encrypted value, and enforce uniqueness, without decrypting.

A blind index is a companion column holding ``HMAC-SHA256(index key, normalize(plaintext))``
under an index key of its own (wrapped by the master key like data keys, but never touched by a
data-key rotation)::

    class User(Base):
        email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))
        email_index: Mapped[str | None] = mapped_column(
            kf.BlindIndex("email", key="email-index", normalizer="email"), unique=True
        )

    session.scalars(select(User).where(User.email == "Ann@Example.com"))   # via the index

Writes fill the index column by themselves: the ORM, Core ``insert()``/``update()`` with
parameters or ``.values()``, and executemany, all go through one ``before_execute`` hook. An
index value carries its index-key version in a header (``kf1:email-index:2:…``); lookups match
every live version, so an index-key rotation keeps lookups working at every moment while
``reindex`` recomputes the column in resumable batches.
"""

from __future__ import annotations

import unicodedata
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.types import TypeDecorator

from . import envelope
from .exc import ConfigurationError, EncryptionError, KmsFieldError, UnsupportedOperationError
from .registry import get_registry

Normalizer = Callable[[str], str]


def _email(value: str) -> str:
    return unicodedata.normalize("NFKC", value).strip().lower()


NORMALIZERS: dict[str, Normalizer] = {
    "exact": lambda v: v,
    "strip": str.strip,
    "lower": str.lower,
    "casefold": str.casefold,
    "nfkc": lambda v: unicodedata.normalize("NFKC", v),
    "email": _email,  # NFKC, no surrounding spaces, lowercased: Ann@Example.COM = ann@example.com
}


def _normalizer(spec: str | Sequence[str] | Normalizer) -> Normalizer:
    if callable(spec):
        return spec
    names = [spec] if isinstance(spec, str) else list(spec)
    try:
        steps = [NORMALIZERS[n] for n in names]
    except KeyError as exc:
        raise ConfigurationError(
            f"unknown normalizer {exc.args[0]!r}; use one of {sorted(NORMALIZERS)}, a list of "
            "them, or a function str -> str"
        ) from None

    def normalize(value: str) -> str:
        for step in steps:
            value = step(value)
        return value

    return normalize


class BlindIndex(TypeDecorator[str]):
    """The type of a blind-index column for the encrypted column named ``source``.

    ``key`` names the index key (create it with ``kf.create_index_key``). ``normalizer``: one of
    ``exact`` (default), ``strip``, ``lower``, ``casefold``, ``nfkc``, ``email``, a list of
    them applied in order, or a function. ``bits`` truncates the MAC (multiple of 8, 16 to 256):
    fewer bits leak less (more values share an index value) but lookups then return false
    positives, which :func:`find` filters after decryption.
    """

    impl = sa.String
    cache_ok = True

    def __init__(
        self,
        source: str,
        key: str,
        normalizer: str | tuple[str, ...] | Normalizer = "exact",
        bits: int = 256,
    ) -> None:
        if bits % 8 or not 16 <= bits <= 256:
            raise ConfigurationError(f"bits must be a multiple of 8 from 16 to 256, got {bits}")
        self.source = source
        self.key = envelope.check_key_name(key)
        self.normalizer = tuple(normalizer) if isinstance(normalizer, list) else normalizer
        self.bits = bits
        self._normalize = _normalizer(self.normalizer)
        self._nbytes = bits // 8
        head = len(envelope.header(self.key, 10**envelope.MAX_VERSION_DIGITS - 1))
        self._length = head + len(envelope.b64encode(bytes(self._nbytes)))
        super().__init__(self._length)

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            # Exact, case-sensitive comparisons: index values differ in case only by chance.
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(
                mysql.VARCHAR(self._length, charset="ascii", collation="ascii_bin")
            )
        return self.impl_instance

    def __repr__(self) -> str:
        args = [repr(self.source), f"key={self.key!r}"]
        if self.normalizer != "exact":
            name = getattr(self.normalizer, "__name__", None)
            shown = self.normalizer if isinstance(self.normalizer, (str, tuple)) else name
            args.append(f"normalizer={shown!r}")
        if self.bits != 256:
            args.append(f"bits={self.bits}")
        return f"BlindIndex({', '.join(args)})"

    @property
    def exact(self) -> bool:
        """True if equal index values mean equal normalized values (no truncation)."""
        return self.bits == 256

    def _data(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if not isinstance(value, str):
            value = str(value)
        return self._normalize(value).encode("utf-8")

    def compute(self, value: Any) -> str | None:
        """The index value of ``value`` under the active index key version (None for None)."""
        if value is None:
            return None
        return get_registry().index_keys(self.key)[0].compute(self._data(value), self._nbytes)

    def candidates(self, value: Any) -> list[str]:
        """The index values ``value`` may have: one per live index key version."""
        data = self._data(value)
        return [k.compute(data, self._nbytes) for k in get_registry().index_keys(self.key)]

    def matches(self, a: Any, b: Any) -> bool:
        """True if ``a`` and ``b`` are equal once normalized (used to drop false positives)."""
        return a is not None and b is not None and self._data(a) == self._data(b)


# Finding a column's blind index ------------------------------------------------------------

_indexes: weakref.WeakKeyDictionary[sa.FromClause, dict[str, sa.Column[Any]]] = (
    weakref.WeakKeyDictionary()
)


def _index_columns(table: Any) -> dict[str, sa.Column[Any]]:
    """Source column key -> blind-index column, for a Table, Alias or other FROM clause."""
    try:
        return _indexes[table]
    except (KeyError, TypeError):
        pass
    found = {c.type.source: c for c in table.c if isinstance(c.type, BlindIndex)}
    try:
        _indexes[table] = found
    except TypeError:
        pass
    return found


def index_for(column: Any) -> sa.Column[Any] | None:
    """The blind-index column declared for ``column`` (a Column or an ORM attribute)."""
    expr = column.__clause_element__() if hasattr(column, "__clause_element__") else column
    table = getattr(expr, "table", None)
    if table is None:
        return None
    return _index_columns(table).get(expr.key)


_EQ = {operators.eq, operators.in_op}
_NE = {operators.ne, operators.not_in_op}


def rewrite_comparison(expr: Any, op: Any, other: tuple[Any, ...]) -> Any:
    """``email == x`` as ``email_index IN (index values of x)``; None if no index applies."""
    if op not in _EQ and op not in _NE:
        return None
    index = index_for(expr)
    if index is None:
        return None
    typ: BlindIndex = index.type  # type: ignore[assignment]
    values = other[0]
    if op in (operators.in_op, operators.not_in_op):
        if isinstance(values, sa.ClauseElement) or not isinstance(values, list | tuple | set):
            raise UnsupportedOperationError(
                f"IN on {index.key}'s source needs a list of Python values to hash"
            )
    else:
        values = [values]
    if any(isinstance(v, sa.ClauseElement) or hasattr(v, "__clause_element__") for v in values):
        raise UnsupportedOperationError(
            f"comparing encrypted column {expr.key!r} through its blind index needs Python "
            "values (they are hashed in Python), not SQL expressions or bind parameters"
        )
    hashes = sorted({h for v in values if v is not None for h in typ.candidates(v)})
    return index.not_in(hashes) if op in _NE else index.in_(hashes)


# Filling index columns on writes -----------------------------------------------------------


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
    table = clauseelement.table
    indexes = _index_columns(table)
    if not indexes:
        return clauseelement, multiparams, params
    for source, index in indexes.items():
        typ: BlindIndex = index.type  # type: ignore[assignment]
        clauseelement, key = _source_param(clauseelement, source, index, typ)
        if key is not None:
            multiparams = [_fill_params(p, key, index, typ) for p in multiparams]
            if params:
                params = _fill_params(params, key, index, typ)
            if isinstance(clauseelement, Insert) and _is_unique(index):
                values = [p[key] for p in (*multiparams, params) if p and p.get(key) is not None]
                _check_older_versions(conn, index, typ, values)
    return clauseelement, multiparams, params


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


def _check_older_versions(
    conn: Connection, index: sa.Column[Any], typ: BlindIndex, values: list[Any]
) -> None:
    """While an index-key rotation is under way, a unique constraint on the index column only
    sees duplicates under the same version: look for the value under the older live versions
    too before inserting it."""
    keys = get_registry().index_keys(typ.key)
    if len(keys) < 2 or not values:
        return
    older = [k.compute(typ._data(v), typ._nbytes) for v in values for k in keys[1:]]
    found = conn.execute(sa.select(index).where(index.in_(older)).limit(1)).first()
    if found is not None:
        raise sa.exc.IntegrityError(
            f"INSERT INTO {index.table}",  # no parameters: they are plaintext
            None,
            DuplicateIndexValue(
                f"a row with the same {index.name!r} already exists under an older version of "
                f"index key {typ.key!r} (a reindex is under way)"
            ),
        )


class DuplicateIndexValue(KmsFieldError):
    """The ``orig`` of the IntegrityError raised for a duplicate caught across index versions."""


def _fill_params(
    p: dict[str, Any], key: str, index: sa.Column[Any], typ: BlindIndex
) -> dict[str, Any]:
    if key not in p:
        return p
    p = dict(p)
    p[index.key] = typ.compute(p[key])
    return p


def _source_param(
    stmt: Any, source: str, index: sa.Column[Any], typ: BlindIndex
) -> tuple[Any, str | None]:
    """Fill the index from ``.values()``; return the execute() parameter holding the source."""
    if getattr(stmt, "select", None) is not None:
        names = {getattr(c, "key", c) for c in getattr(stmt, "_select_names", None) or ()}
        if source in names and index.key not in names:
            raise EncryptionError(
                f"INSERT ... FROM SELECT cannot fill blind index {index.key!r}; select it too, "
                "or insert the rows with execute() parameters"
            )
        return stmt, None
    for row in getattr(stmt, "_multi_values", None) or ():
        for values in row:
            keys = {getattr(k, "key", k) for k in values} if isinstance(values, dict) else set()
            if source in keys and index.key not in keys:
                raise EncryptionError(
                    f"multi-row .values() cannot fill blind index {index.key!r}; pass the "
                    "rows as execute() parameters instead"
                )
    for col, value in (getattr(stmt, "_values", None) or {}).items():
        if getattr(col, "key", col) != source:
            continue
        if isinstance(value, sa.BindParameter) and value.callable is None:
            if value.required:  # bindparam("name"): the value comes with execute()
                return stmt, value.key
            return stmt.values({index.key: typ.compute(value.value)}), None
        raise EncryptionError(
            f"cannot compute blind index {index.key!r} from a SQL expression assigned to "
            f"{source!r}; assign a Python value"
        )
    return stmt, source


# Keeping loaded entities in step -----------------------------------------------------------


@event.listens_for(Mapper, "mapper_configured")
def _track_sources(mapper: Mapper[Any], class_: type) -> None:
    """Setting ``user.email`` also sets ``user.email_index`` on the object (the database row
    gets it from the before_execute hook either way)."""
    for table in mapper.tables:
        for source, index in _index_columns(table).items():
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
            ) -> None:
                setattr(target, _attr, _typ.compute(value))

            event.listen(getattr(class_, source_prop.key), "set", on_set)


# Exact lookups with truncated indexes --------------------------------------------------------


def find(session: Any, attribute: Any, value: Any) -> list[Any]:
    """Entities whose encrypted ``attribute`` equals ``value`` (normalized), exactly.

    Looks up through the blind index, then drops the false positives that a truncated index
    (``bits < 256``) lets through, by comparing decrypted values. ``attribute`` is an ORM
    attribute such as ``User.email``.
    """
    index = index_for(attribute)
    if index is None:
        raise ConfigurationError(f"{attribute} has no BlindIndex column")
    typ: BlindIndex = index.type  # type: ignore[assignment]
    entity = attribute.class_
    rows = session.scalars(sa.select(entity).where(attribute == value)).all()
    return [r for r in rows if typ.matches(getattr(r, attribute.key), value)]

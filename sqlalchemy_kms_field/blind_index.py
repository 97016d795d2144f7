"""Blind indexes: find rows by an encrypted value, and enforce uniqueness, without decrypting.

A blind index is a companion column holding ``HMAC-SHA256(K, normalize(plaintext))`` under an
index key of its own (wrapped by the master key like data keys, but never touched by a
data-key rotation)::

    class User(Base):
        email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))
        email_index: Mapped[str | None] = mapped_column(
            kf.BlindIndex("email", key="email-index", normalizer="email"), unique=True
        )

    session.scalars(select(User).where(User.email == "Ann@Example.com"))   # via the index

``K`` is derived from the index key and the index's context (logical table and column,
normalizer, bits; see :class:`~sqlalchemy_kms_field.envelope.IndexKey`), so index values are
bound to their column: the same email in two columns, or under two truncations, gives
unrelated values. Writes fill the index column by themselves (see ``blind_index_writes``). An
index value carries its index-key version in a header (``kf2:email-index:2:…``); lookups match
every live version, and the ``kf1`` values of older releases, so an index-key rotation or an
upgrade keeps lookups working at every moment while ``reindex`` recomputes the column in
resumable batches.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql import operators
from sqlalchemy.types import TypeDecorator

from . import envelope
from .exc import ConfigurationError, EncryptionError, UnsupportedOperationError
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

_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class NormalizerRef:
    """A custom normalizer named ``"package.module:function"``, imported when first called.

    Autogenerate renders a ``BlindIndex`` whose normalizer is a function with a reference in its
    place: the migration creates the column without importing the application (a normalizer
    does not change the DDL), and an index computed through the reference (a reindex in a
    migration) equals the function's own, since the name is what binds index values to it.
    """

    __slots__ = ("_function", "name")

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _REF.fullmatch(name):
            raise ConfigurationError(f"NormalizerRef needs 'package.module:function', got {name!r}")
        self.name = name
        self._function: Normalizer | None = None

    def __call__(self, value: str) -> str:
        return (self._function or self._resolve())(value)

    def _resolve(self) -> Normalizer:
        module_name, _, path = self.name.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
            for part in path.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(
                f"cannot import the custom normalizer {self.name!r} ({type(exc).__name__}): "
                "make that module importable here, or pass the function itself as normalizer="
            ) from None
        if not callable(found):
            raise ConfigurationError(f"the custom normalizer {self.name!r} is not a function")
        self._function = found
        return found  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NormalizerRef) and other.name == self.name

    def __hash__(self) -> int:
        return hash((NormalizerRef, self.name))

    def __repr__(self) -> str:
        # Fully qualified: Alembic renders a type as "sqlalchemy_kms_field." + its repr, and the
        # migration imports sqlalchemy_kms_field (render_item), which imports this module.
        return f"sqlalchemy_kms_field.blind_index.NormalizerRef({self.name!r})"


def _function_ref(function: Callable[..., Any]) -> NormalizerRef:
    """The reference that names ``function``; refused where no name can find it again."""
    module = getattr(function, "__module__", None) or "builtins"
    qualname = getattr(function, "__qualname__", "")
    if "<" in qualname or not _REF.fullmatch(f"{module}:{qualname}"):
        raise ConfigurationError(
            f"a custom normalizer must be a function defined at module level (got "
            f"{qualname or function!r} in {module}): its module and name identify its index "
            "values and let migrations refer to it; define it with def at module level"
        )
    return NormalizerRef(f"{module}:{qualname}")


NormalizerSpec = str | tuple[str, ...] | Normalizer


def _normalizer(spec: NormalizerSpec) -> tuple[Normalizer, str]:
    """The normalizing function of ``spec`` and its identity (part of every index value's key):
    ``builtin:email``, ``builtin:strip,casefold`` or ``function:package.module:function``."""
    if isinstance(spec, NormalizerRef):
        return spec, f"function:{spec.name}"
    if callable(spec):
        return spec, f"function:{_function_ref(spec).name}"
    names = [spec] if isinstance(spec, str) else list(spec)
    try:
        steps = [NORMALIZERS[n] for n in names]
    except (KeyError, TypeError):
        unknown = [n for n in names if not isinstance(n, str) or n not in NORMALIZERS]
        raise ConfigurationError(
            f"unknown normalizer {unknown[0]!r}; use one of {sorted(NORMALIZERS)}, a list of "
            "them, or a function str -> str defined at module level"
        ) from None
    if not steps:
        raise ConfigurationError("normalizer= needs at least one name")

    def normalize(value: str) -> str:
        for step in steps:
            value = step(value)
        return value

    return normalize, "builtin:" + ",".join(names)


def table_name(column: Any) -> str | None:
    """The name of the one Table that ``column`` (a Table's, an alias's) belongs to."""
    names = {
        c.table.name
        for c in getattr(column, "base_columns", ()) or ()
        if isinstance(getattr(c, "table", None), sa.Table)
    }
    return names.pop() if len(names) == 1 else None


class BlindIndex(TypeDecorator[str]):
    """The type of a blind-index column for the encrypted column named ``source``.

    ``key`` names the index key (create it with ``kf.create_index_key``). ``normalizer``: one of
    ``exact`` (default), ``strip``, ``lower``, ``casefold``, ``nfkc``, ``email``, a list of
    them applied in order, or a function defined at module level. ``bits`` truncates the MAC
    (multiple of 8, 16 to 256): fewer bits leak less (more values share an index value) but
    then ``==`` and ``IN`` cannot be exact, so they are refused: look rows up with
    :func:`find`, which drops the false positives after decryption.

    ``context`` binds the index values to their place: by default ``"<table>.<source>"`` of
    the table the column is on. Give it explicitly (``context="users.email"``) before renaming
    the table or the source column, so that the stored index values keep matching.
    """

    impl = sa.String
    cache_ok = True

    def __init__(
        self,
        source: str,
        key: str,
        normalizer: NormalizerSpec | list[str] = "exact",
        bits: int = 256,
        context: str | tuple[str, str] | None = None,
        tenant: str | None = None,
    ) -> None:
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise ConfigurationError(f"tenant= must name a column, got {tenant!r}")
        self.tenant = tenant  # scoped to a tenant: see tenants.py (tenant_match)
        if not isinstance(bits, int) or bits % 8 or not 16 <= bits <= 256:
            raise ConfigurationError(f"bits must be a multiple of 8 from 16 to 256, got {bits}")
        self._place = None if context is None else envelope.context_name(context)
        self.source = source
        self.key = envelope.check_key_name(key)
        self.normalizer: NormalizerSpec = (
            tuple(normalizer) if isinstance(normalizer, list) else normalizer
        )
        self.bits = bits
        self.context = context
        self._normalize, self._normalizer_id = _normalizer(self.normalizer)
        self._nbytes = bits // 8
        self._columns: tuple[sa.Column[Any], ...] = ()  # the columns this type is on
        self._fields: dict[str, tuple[str, ...]] = {}  # table name -> context_fields()
        head = len(envelope.IndexKey.header_for(self.key, 10**envelope.MAX_VERSION_DIGITS - 1))
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

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        # Remember the Column (and so, later, the table) for compute() without a table. A new
        # tuple, not append: a copy of this type (Column.copy) must not share the list.
        super()._set_parent(parent, outer=outer, **kw)
        if isinstance(parent, sa.Column):
            self._columns = (*self._columns, parent)

    def __repr__(self) -> str:
        args = [repr(self.source), f"key={self.key!r}"]
        if self.normalizer != "exact":
            shown: Any = self.normalizer
            if callable(shown) and not isinstance(shown, NormalizerRef):
                shown = _function_ref(shown)  # never a built-in's name: see _function_ref
            args.append(f"normalizer={shown!r}")
        if self.bits != 256:
            args.append(f"bits={self.bits}")
        if self.context is not None:
            args.append(f"context={self.context!r}")
        if self.tenant is not None:
            args.append(f"tenant={self.tenant!r}")
        return f"BlindIndex({', '.join(args)})"

    @property
    def exact(self) -> bool:
        """True if equal index values mean equal normalized values (no truncation)."""
        return self.bits == 256

    def context_fields(self, table: str | None = None) -> tuple[str, ...]:
        """What the index values are bound to: table, column, normalizer identity and bits.

        Table and column are those of ``context=`` if given, else ``table`` (by default the
        table this type's column is on) and the source column.
        """
        name = table if table is not None else self._attached_table()
        fields = self._fields.get(name)
        if fields is None:
            place = self._place or (name, self.source)
            fields = self._fields[name] = (*place, self._normalizer_id, str(self.bits))
        return fields

    def _attached_table(self) -> str:
        if self.context is not None:
            return ""  # unused: the explicit context wins
        names = {n for n in map(table_name, self._columns) if n is not None}
        if len(names) == 1:
            return names.pop()
        where = f"on tables {sorted(names)}" if names else "not on a table's column yet"
        raise ConfigurationError(
            f"{self!r} is {where}, so its index values cannot be bound to their column: pass "
            "table= (the table the column is on), or declare context='table.column'"
        )

    def _data(self, value: Any, tenant: object = None) -> bytes:
        if self.tenant is not None:
            # A tenant-scoped index MACs the tenant (length-prefixed) before the value.
            if tenant is None:
                raise EncryptionError(
                    f"{self!r} is scoped to tenant column {self.tenant!r}: its index value "
                    "needs the row's tenant (write it with the row's tenant column; look up "
                    "with kf.tenant_match). encrypt_column with index= does not support "
                    "tenant-scoped indexes: encrypt the column, then reindex the index"
                )
            scope = str(tenant).encode("utf-8")
            return len(scope).to_bytes(4, "big") + scope + self._value_data(value)
        return self._value_data(value)

    def _value_data(self, value: Any) -> bytes:
        if value.__class__.__name__ == "Sealed":  # row_binding's ciphertext: never hash it
            raise EncryptionError(
                f"{self!r}: the source value reached the index already encrypted; this is a bug "
                "in the order of the write hooks, please report it"
            )
        if isinstance(value, bytes):
            return value
        if not isinstance(value, str):
            value = str(value)
        return self._normalize(value).encode("utf-8")

    def compute(self, value: Any, table: str | None = None, tenant: object = None) -> str | None:
        """The index value of ``value`` under the active index key version (None for None).

        ``table``: the name of the table the index column is on (by default the table of the
        Column this type is on; not needed with ``context=``).
        """
        if value is None:
            return None
        fields = self.context_fields(table)
        key = get_registry().index_keys(self.key)[0]
        return key.compute(self._data(value, tenant), self._nbytes, fields)

    def candidates(self, value: Any, table: str | None = None, tenant: object = None) -> list[str]:
        """The index values ``value`` may have: one per live index key version, and the
        context-free ``kf1`` value of older releases that a reindex has not replaced yet."""
        fields = self.context_fields(table)
        data, n = self._data(value, tenant), self._nbytes
        found: list[str] = []
        for key in get_registry().index_keys(self.key):
            found.append(key.compute(data, n, fields))
            if self.tenant is None:  # (no kf1 value was ever scoped to a tenant)
                found.append(key.compute_legacy(data, n))
        return found

    def matches(self, a: Any, b: Any) -> bool:
        """True if ``a`` and ``b`` are equal once normalized (used to drop false positives)."""
        return a is not None and b is not None and self._value_data(a) == self._value_data(b)


# Finding a column's blind index ------------------------------------------------------------

_indexes: weakref.WeakKeyDictionary[sa.FromClause, dict[str, sa.Column[Any]]] = (
    weakref.WeakKeyDictionary()
)


def index_columns(table: Any) -> dict[str, sa.Column[Any]]:
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
    return index_columns(table).get(expr.key)


def index_table(index: sa.Column[Any]) -> str:
    """The table name that binds the values of blind-index column ``index``."""
    typ: BlindIndex = index.type  # type: ignore[assignment]
    if typ.context is not None:
        return ""
    name = table_name(index)
    if name is None:
        raise ConfigurationError(
            f"cannot tell which table blind-index column {index.key!r} is on: declare "
            f"context='table.{typ.source}' on its BlindIndex"
        )
    return name


_EQ = {operators.eq, operators.in_op}
_NE = {operators.ne, operators.not_in_op}


def lookup_values(index: sa.Column[Any], values: Sequence[Any]) -> list[str]:
    """Every index value that rows holding one of ``values`` may have in column ``index``."""
    typ: BlindIndex = index.type  # type: ignore[assignment]
    table = index_table(index)
    return sorted({h for v in values if v is not None for h in typ.candidates(v, table)})


def rewrite_comparison(expr: Any, op: Any, other: tuple[Any, ...]) -> Any:
    """``email == x`` as ``email_index IN (index values of x)``; None if no index applies."""
    if op not in _EQ and op not in _NE:
        return None
    index = index_for(expr)
    if index is None:
        return None
    typ: BlindIndex = index.type  # type: ignore[assignment]
    if typ.tenant is not None:
        raise UnsupportedOperationError(
            f"{expr.key!r} is looked up through blind index {index.key!r}, which is scoped to "
            f"tenant column {typ.tenant!r}: use kf.tenant_match(<Entity>.{expr.key}, value, "
            "tenant=...), which also filters on the tenant"
        )
    if not typ.exact:
        raise UnsupportedOperationError(
            f"{expr.key!r} is looked up through blind index {index.key!r}, truncated to "
            f"{typ.bits} bits: other values share its index values, so ==, !=, IN and NOT IN "
            "would silently return (or drop) the wrong rows; use kf.find(session, "
            f"<Entity>.{expr.key}, value), which drops them after decryption"
        )
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
    hashes = lookup_values(index, list(values))
    return index.not_in(hashes) if op in _NE else index.in_(hashes)


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
    entity = attribute.parent.entity  # the class, or the aliased class the attribute is of
    if value is None:
        return []
    criterion = index.in_(lookup_values(index, [value]))
    rows = session.scalars(sa.select(entity).where(criterion)).all()
    return [r for r in rows if typ.matches(getattr(r, attribute.key), value)]


# Alembic renders user types as "<module>.<repr>": make that the public, stable path.
BlindIndex.__module__ = "sqlalchemy_kms_field"

# Writes fill index columns: registers the hooks (imported last: it uses the names above).
from . import blind_index_writes  # noqa: E402, F401

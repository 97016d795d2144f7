"""SQLAlchemy column types that encrypt on bind and decrypt on result.

The types only delegate: the stored format lives in ``envelope``, the keys in ``registry``.
Constructor arguments are hashable and not secret, so the statement cache key and Alembic's
rendering show ``EncryptedString(320, key='pii')`` and nothing else.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import sys
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import Label, UnaryExpression
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from . import envelope, metrics, row_binding, tenants
from .blind_index import rewrite_comparison
from .envelope import DataKey
from .exc import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    KeyNotFoundError,
    KeyStateError,
    UnsupportedOperationError,
)
from .registry import get_registry
from .row_binding import Sealed

T = TypeVar("T")

DEFAULT_KEY = "default"

# Operators that mean something on ciphertext: NULL checks only.
_NULL_OPS = {operators.is_, operators.is_not}
_NULLABLE_EQ = {operators.eq, operators.ne}


class _Comparator(TypeDecorator.Comparator[Any]):
    def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
        rewritten = self._check(op, other)
        if rewritten is not None:
            return rewritten
        return super().operate(op, *other, **kwargs)

    def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
        rewritten = self._check(op, (other,))
        if rewritten is not None:
            return rewritten
        return super().reverse_operate(op, other, **kwargs)

    def _check(self, op: Any, other: tuple[Any, ...]) -> Any:
        """None if the operation is fine as it is, a rewritten expression, or an error."""
        if op in _NULL_OPS or (op in _NULLABLE_EQ and len(other) == 1 and other[0] is None):
            return None
        if op in _NULLABLE_EQ and len(other) == 1 and _same_column(self.expr, other[0]):
            # SQLAlchemy itself compares a column with its annotated self (e.g. ORM
            # update().values() looks columns up in dicts); that equality is identity.
            return None
        rewritten = rewrite_comparison(self.expr, op, other)  # through a blind index, if any
        if rewritten is not None:
            return rewritten
        name = getattr(op, "__name__", str(op)).rstrip("_")
        raise UnsupportedOperationError(
            f"cannot apply {name!r} to encrypted column {_describe(self.expr)}: values are "
            "encrypted with random nonces, so SQL comparisons, LIKE and ordering on them mean "
            "nothing; declare a BlindIndex column for equality lookups, or filter on another "
            "column (IS NULL works)"
        )


@event.listens_for(Engine, "before_execute")
def _refuse_meaningless(conn: Any, clauseelement: Any, *args: Any) -> None:
    """What never reaches the comparator: a bare ``order_by(col)``/``group_by(col)``, SQL
    functions of an encrypted column (``func.lower(col)``, ``func.max(col)``) and DISTINCT."""
    for clause in (
        *getattr(clauseelement, "_order_by_clauses", ()),
        *getattr(clauseelement, "_group_by_clauses", ()),
    ):
        element = clause
        while isinstance(element, (UnaryExpression, Label)):
            element = element.element
        if isinstance(getattr(element, "type", None), _EncryptedType):
            raise UnsupportedOperationError(
                f"cannot ORDER BY or GROUP BY encrypted column {_describe(element)}: values are "
                "encrypted with random nonces, so their order and equality mean nothing"
            )
    distinct = bool(getattr(clauseelement, "_distinct", False))
    for column in getattr(clauseelement, "_raw_columns", ()):
        if distinct and isinstance(getattr(column, "type", None), _EncryptedType):
            raise UnsupportedOperationError(
                f"cannot SELECT DISTINCT encrypted column {_describe(column)}: equal values "
                "have different ciphertexts"
            )
        if isinstance(column, (FunctionElement, UnaryExpression, Label)):
            _refuse_functions_of(column)
    where = getattr(clauseelement, "whereclause", None)
    if where is not None:
        _refuse_functions_of(where)


def _refuse_functions_of(expr: Any) -> None:
    """Refuse a SQL function (or DISTINCT) applied to an encrypted column; ``count`` is fine
    (it counts non-NULL values, which are NULL in the clear)."""
    for node in visitors.iterate(expr):
        if isinstance(node, FunctionElement) and getattr(node, "name", "") != "count":
            what = f"SQL function {getattr(node, 'name', 'function')}()"
        elif isinstance(node, UnaryExpression) and node.operator is operators.distinct_op:
            what = "DISTINCT"
        else:
            continue
        for inner in visitors.iterate(node):
            if isinstance(getattr(inner, "type", None), _EncryptedType) and isinstance(
                inner, sa.ColumnClause
            ):
                raise UnsupportedOperationError(
                    f"cannot apply {what} to encrypted column {_describe(inner)}: the database "
                    "sees only ciphertext; compute it in Python after reading the values"
                )


def _same_column(expr: Any, other: Any) -> bool:
    return isinstance(other, sa.ColumnElement) and hash(other) == hash(expr)


def _describe(expr: Any) -> str:
    table = getattr(getattr(expr, "table", None), "name", None)
    name = getattr(expr, "name", None) or "expression"
    return f"{table}.{name}" if table else str(name)


class _EncryptedType(TypeDecorator[T]):
    """Shared machinery. Subclasses set ``codec`` (and ``_binary``) and the two codec methods.

    A value is bound to its place (format kf2): the table and column the type is attached to,
    or the explicit ``context="table.column"``, and the codec, are authenticated with it.
    """

    cache_ok = True
    impl: Any = sa.Text
    comparator_factory = _Comparator
    _binary = False
    codec = "str"

    key: str
    accept_plaintext: bool
    context: tuple[str, str] | None
    pad: int
    _column: sa.Column[Any] | None = None
    _copy = False
    _context_bytes: bytes | None = None

    def _setup(
        self,
        key: str,
        accept_plaintext: bool,
        context: str | tuple[str, str] | None,
        pad: int | None,
        default_pad: int = 0,
        bind_to: tuple[str, ...] | list[str] | str = (),
        tenant: str | None = None,
    ) -> None:
        self.key = envelope.check_key_name(key)
        names = (bind_to,) if isinstance(bind_to, str) else tuple(bind_to)
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ConfigurationError(f"bind_to must name distinct columns, got {bind_to!r}")
        self._extra_bind = names
        self.tenant = tenant
        if tenant is not None:  # a key per tenant (tenants.py): values are bound to the tenant
            if not isinstance(tenant, str) or not tenant:
                raise ConfigurationError(f"tenant= must name a column, got {tenant!r}")
            tenants.check_base(key)
            names = (tenant, *(n for n in names if n != tenant))
        if names and self._binary:
            raise ConfigurationError(
                f"{type(self).__name__} cannot be bound to other columns of its row (bind_to, "
                "tenant): "
                "a binary value cannot be read together with them; use EncryptedText or "
                "EncryptedString for a row-bound value"
            )
        self.bind_to = names
        self.accept_plaintext = bool(accept_plaintext)
        self.context = None if context is None else envelope.context_name(context)
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
            raise ConfigurationError(f"pad must be a whole number of bytes (0: none), got {pad!r}")
        self._explicit_pad = pad
        self.pad = default_pad if pad is None else pad

    # Where the type stands: the column it is attached to ------------------------------------

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        if not isinstance(parent, sa.Column):
            return
        if self._column is not None and self._column is not parent and not self._copy:
            raise ConfigurationError(
                f"this {type(self).__name__} is already the type of column "
                f"{self._column.name!r}; give each encrypted column a type instance of its own "
                "(values are bound to their column)"
            )
        self._column, self._copy = parent, False
        self.__dict__.pop("_context_bytes", None)

    def copy(self, **kw: Any) -> Any:
        # Copies serve a column's dialect-specific form (same column) or a copied Column
        # (which attaches the copy to itself next): both keep the place until re-attached.
        other = super().copy(**kw)
        other._copy = True
        return other

    def place(self) -> tuple[str, str]:
        """``(table, column)`` this type's values are bound to; ConfigurationError if unknown."""
        if self.context is not None:
            return self.context
        col = self._column
        table = getattr(col, "table", None) if col is not None else None
        if col is None or not isinstance(table, sa.Table):
            raise ConfigurationError(
                f"{self!r} is not the type of a table's column, so it cannot know which table "
                "and column its values belong to; use it in a Column of a Table (or a mapped "
                "column), or pass context='table.column'"
            )
        return table.name, col.name

    def row_context(self, row: list[tuple[str, str]]) -> bytes:
        """The context of a row-bound value: this column's, plus the bound columns' text."""
        table, column = self.place()
        return envelope.encode_context(table, column, self.codec, row)

    def encrypt_for_row(self, value: Any, row: list[tuple[str, str]]) -> Any:
        """The stored form of ``value`` bound to ``row`` (used by the row-binding hook)."""
        self._check_bind_to()
        data = self._serialize(value)
        if self.tenant is not None:
            return tenants.seal(self, data, row)
        key = get_registry().active_key(self.key)
        if metrics.ON:
            metrics.encrypted(key)
        return key.encrypt_text(data, self.row_context(row), self.pad)

    def _check_bind_to(self) -> None:
        col = self._column
        if col is None or not isinstance(col.table, sa.Table):
            self.place()  # raises, naming the fix
            return
        for name in self.bind_to:
            bound = col.table.c.get(name)
            if bound is None:
                raise ConfigurationError(
                    f"{self._where()} is bound to column {name!r} (bind_to), which table "
                    f"{col.table.name!r} does not have"
                )
            if bound is col.table.autoincrement_column:
                raise ConfigurationError(
                    f"{self._where()} cannot be bound to {name!r}: it is an autoincrement key, "
                    "unknown until the row is inserted; bind to a client-side key (a UUID "
                    "with default=uuid.uuid4) or a tenant id instead"
                )

    @property
    def _has_column_expression(self) -> bool:
        return bool(self.bind_to)

    def column_expression(self, colexpr: Any) -> Any:
        if not self.bind_to:
            return None
        return row_binding.read_expression(self, colexpr)

    @property
    def _header_name(self) -> str:
        """The longest key name in this column's headers (a tenant key's name: 63)."""
        return "x" * 63 if self.tenant is not None else self.key

    def context_bytes(self) -> bytes:
        """The associated-data context of this column's values (computed once)."""
        ctx = self._context_bytes
        if ctx is None:
            table, column = self.place()
            ctx = self._context_bytes = envelope.encode_context(table, column, self.codec)
        return ctx

    def _where(self) -> str:
        try:
            return "{}.{}".format(*self.place())
        except ConfigurationError:
            return "an encrypted column"

    # Codec: plaintext Python value <-> bytes -----------------------------------------------

    def _serialize(self, value: Any) -> bytes:
        raise NotImplementedError

    def _deserialize(self, data: bytes) -> T:
        raise NotImplementedError

    def _str_limit(self) -> int:
        """Characters a str value may have to be UTF-8 encoded as it is (-1: never, use
        ``_serialize``); lets the bind processor serialize the common case inline."""
        return -1

    def _deserializer(self) -> Callable[[bytes], Any]:
        """``_deserialize`` for the result processor; a type may return a faster equivalent."""
        return self._deserialize

    def _from_plaintext(self, value: Any) -> T:
        """A header-less stored value read in plaintext-migration mode."""
        return value  # type: ignore[no-any-return]

    # SQLAlchemy hooks -----------------------------------------------------------------------

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.__class__ is Sealed:
            return value.value
        if self.bind_to:
            raise self._unbound_write()
        data = self._serialize(value)
        ctx = self.context_bytes()
        key = get_registry().active_key(self.key)
        if metrics.ON:
            metrics.encrypted(key)
        if self._binary:
            return key.encrypt_binary(data, ctx, self.pad)
        return key.encrypt_text(data, ctx, self.pad)

    def process_result_value(self, value: Any, dialect: Dialect) -> T | None:
        if value is None:
            return None
        try:
            return self._decrypt_result(value)
        except DecryptionError as exc:
            if metrics.ON:
                metrics.decryption_failed(self, self.key, exc)
            raise

    def _decrypt_result(self, value: Any) -> T:
        if self._binary:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise self._not_ours(value)
            value = bytes(value)
        elif not isinstance(value, str):
            raise self._not_ours(value)
        ctx: bytes | None = None
        row: list[tuple[str, str]] = []
        if self.bind_to:
            value, row = row_binding.split(self, value)
            ctx = self.row_context(row)
        found = envelope.parse(value)
        if found is None:
            return self._plaintext_or_fail(value)
        if self.tenant is not None:
            key = tenants.read_key(self, found[1], found[2], row)
        else:
            key = self._key(found[1], found[2])
        if ctx is None:
            ctx = self.context_bytes()
        try:
            data = key.decrypt_binary(value, ctx) if self._binary else key.decrypt_text(value, ctx)
        except DecryptionError as exc:
            raise DecryptionError(f"{self._where()}: {exc}") from None
        decoded = self._decoded(data, key)
        if metrics.ON:
            metrics.decrypted(key, self)
        return decoded

    def _decoded(self, data: bytes, key: DataKey) -> T:
        """``_deserialize``, with any failure as a DecryptionError that holds no plaintext."""
        try:
            return self._deserialize(data)
        except Exception:  # noqa: S110 - its text may hold the plaintext: dropped, not chained
            pass
        raise DecryptionError(
            f"{self._where()}: a value under data key {key.name!r} version {key.version} "
            f"authenticated but is not a valid {self.codec} value"
        )

    # The same, without TypeDecorator's layers per value (they cost about as much as the
    # cipher): used where the impl type has no processor of its own, as with every driver here.

    def _unbound_write(self) -> EncryptionError:
        return EncryptionError(
            f"{self._where()} is bound to {', '.join(self.bind_to)} of its row, but this write "
            "did not go through the row-binding hook (an upsert's SET, a bindparam without "
            "the row?); write it with insert()/update() and the bound columns' values"
        )

    def bind_processor(self, dialect: Dialect) -> Any:
        general = super().bind_processor(dialect)
        if general is None or self.bind_to or self._impl_processes(dialect, "bind"):
            return general
        serialize, name, binary, pad = self._serialize, self.key, self._binary, self.pad
        context_bytes, limit = self.context_bytes, self._str_limit()
        # The active key is asked for every value (it changes on rotation); the encrypter
        # built for it, with this column's associated data, is kept until it does. Threads
        # may interleave the two updates: an encrypter holds its own key and header, so the
        # worst is a value written under the version another thread was just given.
        current: DataKey | None = None
        encrypt: Callable[[bytes], Any] = bytes

        def process(value: Any) -> Any:
            nonlocal current, encrypt
            if value is None:
                return None
            # A str that _serialize would take as it is, inline; anything else goes there (to
            # be refused, if it must be: a ciphertext, too long, not Unicode, not a str).
            try:
                if value.__class__ is str and len(value) <= limit and value[:2] != "kf":
                    data = value.encode("utf-8")
                else:
                    data = serialize(value)
            except UnicodeEncodeError:  # its text quotes the value: refused by _serialize
                data = serialize(value)
            key = get_registry().active_key(name)
            if key is not current:
                ctx = context_bytes()
                encrypt = key.binary_encrypter(ctx, pad) if binary else key.text_encrypter(ctx, pad)
                current = key
            if metrics.ON:
                metrics.encrypted(key)
            return encrypt(data)

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        general = super().result_processor(dialect, coltype)
        if general is not None and self.tenant is not None and self.bind_to == (self.tenant,):
            if not self._impl_processes(dialect, "result", coltype):
                return tenants.result_processor(self, general)
        if general is None or self._binary or self.bind_to:
            return general
        if self._impl_processes(dialect, "result", coltype):
            return general
        deserialize, name, context_bytes = self._deserializer(), self.key, self.context_bytes
        typ = self
        # The decrypter of the key version last read, and that version's headers (kf2, kf1):
        # a value starting with one is looked up under the same header string, no split.
        # Threads may interleave these updates: a decrypter checks the value's header
        # itself, so a mismatched pair only sends the value to the general path.
        current: DataKey | None = None
        decrypt: Callable[[str], bytes] = str.encode
        prefixes: tuple[str, ...] = ()
        lookup = ""

        def process(value: Any) -> Any:
            # The common case inline: a text value under this column's key, already
            # unwrapped. Anything else (and any failure) takes the general path.
            nonlocal current, decrypt, prefixes, lookup
            if value.__class__ is str:
                if value.startswith(prefixes):
                    key = get_registry().key_for_header(lookup)
                else:
                    head = value.rpartition(":")[0]
                    if head[:4] == "kf1:":  # legacy: the registry files versions under kf2
                        head = "kf2" + head[3:]
                    key = get_registry().key_for_header(head)
                if key is not None:
                    if key is not current and key.name == name:
                        decrypt, current = key.text_decrypter(context_bytes()), key
                        prefixes, lookup = (key.header, key.legacy_header), key.header[:-1]
                    if key is current:
                        try:
                            decoded = deserialize(decrypt(value))
                        except Exception:  # noqa: S110 - the general path raises, plaintext-free
                            pass
                        else:
                            if metrics.ON:
                                metrics.decrypted(key, typ)
                            return decoded
            return general(value)

        return process

    def _impl_processes(self, dialect: Dialect, kind: str, coltype: Any = None) -> bool:
        impl = self.load_dialect_impl(dialect).dialect_impl(dialect)
        if kind == "bind":
            return impl.bind_processor(dialect) is not None
        return impl.result_processor(dialect, coltype) is not None

    def literal_processor(self, dialect: Dialect) -> Any:
        # Raised here, not in process_literal_param: SQLAlchemy wraps errors of the latter in
        # a CompileError that quotes the value, i.e. the plaintext.
        raise UnsupportedOperationError(
            f"refusing to render a value of {self!r} as a SQL literal: it would put the "
            "plaintext into the SQL text; use bound parameters"
        )

    def _key(self, name: str, version: int) -> DataKey:
        if name != self.key:
            raise DecryptionError(
                f"{self._where()}: the value was written under data key {name!r} version "
                f"{version}, but this column uses data key {self.key!r}: values cannot move "
                "between keys"
            )
        try:
            return get_registry().data_key(name, version)
        except (KeyNotFoundError, KeyStateError) as exc:
            raise DecryptionError(
                f"{self._where()}: cannot decrypt a value under data key {name!r} version "
                f"{version}: {exc}"
            ) from exc

    def _not_ours(self, value: Any) -> DecryptionError:
        return DecryptionError(
            f"{self._where()} (data key {self.key!r}) holds a {type(value).__name__}, not "
            "sqlalchemy-kms-field ciphertext; check the column's SQL type"
        )

    def _plaintext_or_fail(self, value: Any) -> T:
        # A value that starts like our header but does not parse was altered: never plaintext.
        if self.accept_plaintext and not envelope.looks_like_header(value):
            try:
                return self._from_plaintext(value)
            except Exception:  # noqa: S110 - the error would quote the stored plaintext
                pass
            raise DecryptionError(
                f"{self._where()}: a plaintext value (accept_plaintext=True) is not a valid "
                f"{self.codec} value"
            )
        if self.accept_plaintext:
            raise DecryptionError(
                f"{self._where()}: a value starts like a sqlalchemy-kms-field header but does "
                "not parse (altered?); it is refused, not returned as plaintext"
            )
        raise DecryptionError(self._plaintext_found())

    def _plaintext_found(self) -> str:
        where = self._where()
        table, _, column = where.rpartition(".")
        fix = (
            f"op.encrypt_column({table!r}, {column!r}, key={self.key!r}) in a migration, or "
            f"`kms-field encrypt-column {where} --key {self.key}`"
            if table
            else "op.encrypt_column(...) or `kms-field encrypt-column`"
        )
        if self.tenant is not None:  # one key per tenant: encrypt_column knows one per column
            fix = (
                f"`kms-field tenants encrypt {where}`, or "
                "sqlalchemy_kms_field.tenant_rotation.encrypt_tenants(table, column)"
            )
        return (
            f"{where}: a value in a column encrypted with data key {self.key!r} is not "
            "sqlalchemy-kms-field ciphertext (no 'kf2:' header): plaintext left by a type "
            f"change? Encrypt the column's rows ({fix}), declaring the type with "
            "accept_plaintext=True until that has run"
        )

    def _refuse_ciphertext(self, value: str | bytes) -> None:
        if value[:2] in ("kf", b"kf"):
            envelope.refuse_ciphertext(value)

    def _mysql_text(self, dialect: Dialect, length: int | None) -> TypeEngine[Any]:
        # A binary collation: compare-and-swap and the header census must be exact
        # (case-sensitive). utf8mb4, not ascii, so that a plaintext column can be widened to
        # this type and encrypted in place, and decrypted back, whatever its characters.
        if length is not None and length <= 16000:
            return dialect.type_descriptor(
                mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin")
            )
        return dialect.type_descriptor(mysql.LONGTEXT(charset="utf8mb4", collation="utf8mb4_bin"))

    def _args_repr(self, *positional: str) -> str:
        args = [p for p in positional if p]
        if self.key != DEFAULT_KEY:
            args.append(f"key={self.key!r}")
        if self.context is not None:
            dotted = any("." in part for part in self.context)
            args.append(f"context={self.context if dotted else '.'.join(self.context)!r}")
        if self.tenant is not None:
            args.append(f"tenant={self.tenant!r}")
        if self._extra_bind:
            args.append(f"bind_to={self._extra_bind!r}")
        if self._explicit_pad is not None:
            args.append(f"pad={self._explicit_pad}")
        if self.accept_plaintext:
            args.append("accept_plaintext=True")
        return f"{type(self).__name__}({', '.join(args)})"


class EncryptedString(_EncryptedType[str]):
    """A string of at most ``length`` characters, stored encrypted.

    ``length`` counts plaintext characters: the database column is sized for the ciphertext of
    ``length`` characters of any Unicode text (about 5.5 times as many ASCII characters).
    ``key`` names the data key. ``context="table.column"`` names the place values are bound to
    (default: the table and column the type is attached to; set it to keep a renamed column
    readable). ``pad`` pads plaintexts to a multiple of that many bytes, so that lengths leak
    only their bucket (default 0: exact lengths). ``accept_plaintext=True`` reads header-less
    values as plaintext, for the window of ``op.encrypt_column``; values with a header must
    still authenticate.
    """

    cache_ok = True
    impl = sa.String

    def __init__(
        self,
        length: int | None = None,
        key: str = DEFAULT_KEY,
        accept_plaintext: bool = False,
        *,
        context: str | tuple[str, str] | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
        tenant: str | None = None,
    ) -> None:
        self._setup(key, accept_plaintext, context, pad, bind_to=bind_to, tenant=tenant)
        self.length = length
        if length is None:
            super().__init__()
        else:
            super().__init__(self._stored_length())

    def _stored_length(self) -> int | None:
        if self.length is None:
            return None
        return envelope.text_length(4 * self.length, self._header_name, self.pad)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return self._mysql_text(dialect, self._stored_length())
        return self.impl_instance

    def _serialize(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise EncryptionError(
                f"{self!r} for {self._where()} takes str values, got {type(value).__name__}"
            )
        if self.length is not None and len(value) > self.length:
            raise EncryptionError(
                f"a value of {len(value)} characters does not fit {self!r} for "
                f"{self._where()}; raise the length"
            )
        self._refuse_ciphertext(value)
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise EncryptionError(
                f"{self!r} cannot store this str: it is not valid Unicode (a lone surrogate?)"
            ) from None

    def _deserialize(self, data: bytes) -> str:
        return data.decode("utf-8")

    def _str_limit(self) -> int:
        if type(self)._serialize is not EncryptedString._serialize:
            return -1  # a subclass serializes in its own way
        return sys.maxsize if self.length is None else self.length

    def _deserializer(self) -> Callable[[bytes], Any]:
        if type(self)._deserialize is not EncryptedString._deserialize:
            return self._deserialize
        return bytes.decode  # UTF-8, strict: _deserialize without its method call

    def __repr__(self) -> str:
        return self._args_repr("" if self.length is None else str(self.length))


class EncryptedText(EncryptedString):
    """Text of any length, stored encrypted (LONGTEXT on MySQL/MariaDB)."""

    cache_ok = True
    impl = sa.Text

    def __init__(
        self,
        key: str = DEFAULT_KEY,
        accept_plaintext: bool = False,
        *,
        context: str | tuple[str, str] | None = None,
        pad: int | None = None,
        tenant: str | None = None,
    ) -> None:
        super().__init__(
            None,
            key=key,
            accept_plaintext=accept_plaintext,
            context=context,
            pad=pad,
            tenant=tenant,
        )

    def __repr__(self) -> str:
        return self._args_repr()


class EncryptedBytes(_EncryptedType[bytes]):
    """Binary data, stored as the header bytes followed by the raw AEAD output."""

    cache_ok = True

    impl = sa.LargeBinary
    _binary = True
    codec = "bytes"

    def __init__(
        self,
        length: int | None = None,
        key: str = DEFAULT_KEY,
        accept_plaintext: bool = False,
        *,
        context: str | tuple[str, str] | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
        tenant: str | None = None,
    ) -> None:
        self._setup(key, accept_plaintext, context, pad, bind_to=bind_to, tenant=tenant)
        self.length = length
        if length is None:
            super().__init__()
        else:
            super().__init__(envelope.binary_length(length, self.key, self.pad))

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            size = (
                None
                if self.length is None
                else envelope.binary_length(self.length, self.key, self.pad)
            )
            if size is None or size > 16000:
                return dialect.type_descriptor(mysql.LONGBLOB())
            return dialect.type_descriptor(mysql.VARBINARY(size))
        return self.impl_instance

    def _serialize(self, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise EncryptionError(
                f"{self!r} for {self._where()} takes bytes values, got {type(value).__name__}"
            )
        data = bytes(value)
        if self.length is not None and len(data) > self.length:
            raise EncryptionError(
                f"a value of {len(data)} bytes does not fit {self!r} for {self._where()}"
            )
        self._refuse_ciphertext(data)
        return data

    def _deserialize(self, data: bytes) -> bytes:
        return data

    def __repr__(self) -> str:
        return self._args_repr("" if self.length is None else str(self.length))


class EncryptedJSON(_EncryptedType[Any]):
    """A JSON document (dict, list, str, number, bool), stored encrypted. None is SQL NULL.

    Changes inside a loaded dict are not tracked: assign a new value to save a change.
    """

    cache_ok = True
    codec = "json"

    def __init__(
        self,
        key: str = DEFAULT_KEY,
        accept_plaintext: bool = False,
        *,
        context: str | tuple[str, str] | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
        tenant: str | None = None,
    ) -> None:
        self._setup(key, accept_plaintext, context, pad, bind_to=bind_to, tenant=tenant)
        super().__init__()

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return self._mysql_text(dialect, None)
        return self.impl_instance

    def _serialize(self, value: Any) -> bytes:
        if isinstance(value, str):
            self._refuse_ciphertext(value)
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError):
            pass  # the error text may quote the value
        raise EncryptionError(
            f"{self!r} for {self._where()} takes JSON-serializable values, got "
            f"{type(value).__name__}"
        )

    def _deserialize(self, data: bytes) -> Any:
        return json.loads(data)

    def _from_plaintext(self, value: Any) -> Any:
        return json.loads(value)

    def __repr__(self) -> str:
        return self._args_repr()


# Generic wrapper ---------------------------------------------------------------------------

Codec = tuple[str, type | tuple[type, ...], Callable[[Any], str], Callable[[str], Any]]


def _enum_codec(inner: sa.Enum) -> Codec:
    enum_class = inner.enum_class
    if enum_class is not None:
        return "enum", enum_class, lambda v: v.name, lambda s: enum_class[s]

    def check(v: Any) -> str:
        if v not in inner.enums:
            # Not the value itself: it is plaintext.
            raise EncryptionError(f"a value that is not one of the members of {inner!r}")
        return str(v)

    def load(s: str) -> str:
        if s not in inner.enums:
            raise ValueError("not a member")
        return s

    return "enum", str, check, load


def _codec(inner: TypeEngine[Any]) -> Codec:
    """How a value of ``inner``'s Python type becomes text and back, losslessly."""
    if isinstance(inner, sa.Enum):
        return _enum_codec(inner)
    if isinstance(inner, sa.Boolean):
        return "bool", bool, lambda v: "1" if v else "0", _load_bool
    if isinstance(inner, sa.DateTime):
        return "datetime", dt.datetime, dt.datetime.isoformat, dt.datetime.fromisoformat
    if isinstance(inner, sa.Date):
        return "date", dt.date, dt.date.isoformat, dt.date.fromisoformat
    if isinstance(inner, sa.Time):
        return "time", dt.time, dt.time.isoformat, dt.time.fromisoformat
    if isinstance(inner, sa.Interval):
        return (
            "interval",
            dt.timedelta,
            lambda v: f"{v.days}:{v.seconds}:{v.microseconds}",
            lambda s: dt.timedelta(*map(int, s.split(":"))),
        )
    if isinstance(inner, sa.Uuid):
        if inner.as_uuid:
            return "uuid", uuid.UUID, str, uuid.UUID
        return "uuid", str, lambda v: str(uuid.UUID(v)), lambda s: str(uuid.UUID(s))
    if isinstance(inner, sa.Integer):
        return "int", int, str, int
    if isinstance(inner, sa.Float) and not inner.asdecimal:
        return "float", (float, int), lambda v: repr(float(v)), float
    if isinstance(inner, sa.Numeric):
        return "decimal", (decimal.Decimal, int), str, decimal.Decimal
    if isinstance(inner, (sa.String, sa.LargeBinary, sa.JSON)):
        raise TypeError(
            f"use EncryptedString, EncryptedBytes or EncryptedJSON, not Encrypted({inner!r})"
        )
    raise TypeError(f"Encrypted() does not know how to serialize {inner!r} yet")


def _load_bool(s: str) -> bool:
    if s not in ("0", "1"):
        raise ValueError("not a boolean")
    return s == "1"


def _default_pad(codec: str, inner: TypeEngine[Any]) -> int:
    pad = envelope.DEFAULT_PADS.get(codec, 0)
    if isinstance(inner, sa.Enum):
        # Every member the same length: a bucket that holds the longest name.
        longest = max((len(e.encode("utf-8")) for e in inner.enums), default=0)
        pad = max(pad, envelope.padded_size(longest, 16))
    return pad


class Encrypted(_EncryptedType[Any]):
    """Encrypt a value of another column type: ``Encrypted(sa.Date(), key="pii")``.

    Supported: Date, DateTime (with or without time zone), Time, Interval, Integer, Numeric,
    Float, Boolean, Enum and Uuid. Each value is serialized losslessly to text (ISO 8601 for
    times, the member name for enums) and comes back as the same Python type. These types have
    few possible values, so their plaintexts are padded by default (16 to 48 bytes, every
    member of an Enum to the same length): a value's length does not give it away.
    """

    cache_ok = True
    impl = sa.String

    def __init__(
        self,
        inner: TypeEngine[Any],
        key: str = DEFAULT_KEY,
        accept_plaintext: bool = False,
        *,
        context: str | tuple[str, str] | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
        tenant: str | None = None,
    ) -> None:
        self.inner = sa.types.to_instance(inner)
        self.codec, self._py_type, self._encode, self._decode = _codec(self.inner)
        default_pad = _default_pad(self.codec, self.inner)
        self._setup(
            key, accept_plaintext, context, pad, default_pad, bind_to=bind_to, tenant=tenant
        )
        super().__init__(envelope.text_length(255, self._header_name, self.pad))

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return self._mysql_text(dialect, envelope.text_length(255, self._header_name, self.pad))
        return self.impl_instance

    def _serialize(self, value: Any) -> bytes:
        if not isinstance(value, self._py_type) or (
            isinstance(value, bool) and self._py_type in (int, (float, int), (decimal.Decimal, int))
        ):
            raise EncryptionError(
                f"{self!r} for {self._where()} cannot store a {type(value).__name__}"
            )
        text = self._encode(value)
        if len(text.encode("utf-8")) > 255:
            raise EncryptionError(f"the serialized value is too long for {self!r}")
        return text.encode("utf-8")

    def _deserialize(self, data: bytes) -> Any:
        return self._decode(data.decode("utf-8"))

    def _from_plaintext(self, value: Any) -> Any:
        return self._decode(value)

    def __repr__(self) -> str:
        inner = repr(self.inner)
        if type(self.inner).__module__.startswith("sqlalchemy."):
            inner = "sa." + inner  # Alembic's migration files import sqlalchemy as sa
        return self._args_repr(inner)


# Alembic renders user types as "<module>.<repr>": make that the public, stable path.
for _cls in (Encrypted, EncryptedBytes, EncryptedJSON, EncryptedString, EncryptedText):
    _cls.__module__ = "sqlalchemy_kms_field"
del _cls

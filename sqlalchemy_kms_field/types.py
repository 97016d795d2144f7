"""SQLAlchemy column types that encrypt on bind and decrypt on result.

The types only delegate: the stored format lives in ``envelope``, the keys in ``registry``.
Constructor arguments are hashable and not secret, so the statement cache key and Alembic's
rendering show ``EncryptedString(320, key='pii')`` and nothing else.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import Label, UnaryExpression
from sqlalchemy.types import TypeDecorator, TypeEngine

from . import envelope
from .blind_index import rewrite_comparison
from .envelope import DataKey
from .exc import (
    DecryptionError,
    EncryptionError,
    KeyNotFoundError,
    KeyStateError,
    UnsupportedOperationError,
)
from .registry import get_registry

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
def _refuse_ordering(conn: Any, clauseelement: Any, *args: Any) -> None:
    """A bare ``order_by(col)``/``group_by(col)`` never reaches the comparator: check here."""
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


def _same_column(expr: Any, other: Any) -> bool:
    return isinstance(other, sa.ColumnElement) and hash(other) == hash(expr)


def _describe(expr: Any) -> str:
    table = getattr(getattr(expr, "table", None), "name", None)
    name = getattr(expr, "name", None) or "expression"
    return f"{table}.{name}" if table else str(name)


class _EncryptedType(TypeDecorator[T]):
    """Shared machinery. Subclasses set ``_binary`` and implement the two codec methods."""

    cache_ok = True
    impl: Any = sa.Text
    comparator_factory = _Comparator
    _binary = False

    key: str
    accept_plaintext: bool

    def _setup(self, key: str, accept_plaintext: bool) -> None:
        self.key = envelope.check_key_name(key)
        self.accept_plaintext = bool(accept_plaintext)

    # Codec: plaintext Python value <-> bytes -----------------------------------------------

    def _serialize(self, value: Any) -> bytes:
        raise NotImplementedError

    def _deserialize(self, data: bytes) -> T:
        raise NotImplementedError

    def _from_plaintext(self, value: Any) -> T:
        """A header-less stored value read in plaintext-migration mode."""
        return value  # type: ignore[no-any-return]

    # SQLAlchemy hooks -----------------------------------------------------------------------

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        data = self._serialize(value)
        key = get_registry().active_key(self.key)
        if self._binary:
            return key.encrypt_binary(data)
        return key.encrypt_text(data)

    def process_result_value(self, value: Any, dialect: Dialect) -> T | None:
        if value is None:
            return None
        if self._binary:
            value = bytes(value)
            found = envelope.parse_header(value)
            if found is None:
                return self._plaintext_or_fail(value)
            return self._deserialize(self._key(*found).decrypt_binary(value))
        head = value.rpartition(":")[0]
        key = get_registry().key_for_header(head)
        if key is None or key.name != self.key:
            found = envelope.parse_header(value)
            if found is None:
                return self._plaintext_or_fail(value)
            key = self._key(*found)
        return self._deserialize(key.decrypt_text(value))

    # The same, without TypeDecorator's layers per value (they cost about as much as the
    # cipher): used where the impl type has no processor of its own, as with every driver here.

    def bind_processor(self, dialect: Dialect) -> Any:
        general = super().bind_processor(dialect)
        if general is None or self._impl_processes(dialect, "bind"):
            return general
        serialize, name, binary = self._serialize, self.key, self._binary

        def process(value: Any) -> Any:
            if value is None:
                return None
            data = serialize(value)
            key = get_registry().active_key(name)
            return key.encrypt_binary(data) if binary else key.encrypt_text(data)

        return process

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        general = super().result_processor(dialect, coltype)
        if general is None or self._binary or self._impl_processes(dialect, "result", coltype):
            return general
        deserialize, name = self._deserialize, self.key

        def process(value: Any) -> Any:
            # The common case inline: a text value under this column's key, already unwrapped.
            if value is not None and (
                key := get_registry().key_for_header(value.rpartition(":")[0])
            ):
                if key.name == name:
                    return deserialize(key.decrypt_text(value))
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
                f"the value was written under data key {name!r} version {version}, but this "
                f"column uses data key {self.key!r}: values cannot move between keys"
            )
        try:
            return get_registry().data_key(name, version)
        except (KeyNotFoundError, KeyStateError) as exc:
            raise DecryptionError(
                f"cannot decrypt a value under data key {name!r} version {version}: {exc}"
            ) from exc

    def _plaintext_or_fail(self, value: Any) -> T:
        # A value that starts like our header but does not parse was altered: never plaintext.
        if self.accept_plaintext and value[:4] not in ("kf1:", b"kf1:"):
            return self._from_plaintext(value)
        raise DecryptionError(
            f"a value in a column encrypted with data key {self.key!r} is not "
            "sqlalchemy-kms-field ciphertext (no 'kf1:' header); if the column is being "
            "migrated from plaintext, declare it with accept_plaintext=True"
        )

    def _refuse_ciphertext(self, value: str | bytes) -> None:
        if value[:4] in ("kf1:", b"kf1:"):
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
        if self.accept_plaintext:
            args.append("accept_plaintext=True")
        return f"{type(self).__name__}({', '.join(args)})"


class EncryptedString(_EncryptedType[str]):
    """A string of at most ``length`` characters, stored encrypted.

    ``length`` counts plaintext characters: the database column is sized for the ciphertext of
    ``length`` characters of any Unicode text (about 5.5 times as many ASCII characters).
    ``accept_plaintext=True`` reads header-less values as plaintext, for the window of
    ``op.encrypt_column``; values with a header must still authenticate.
    """

    cache_ok = True
    impl = sa.String

    def __init__(
        self, length: int | None = None, key: str = DEFAULT_KEY, accept_plaintext: bool = False
    ) -> None:
        self._setup(key, accept_plaintext)
        self.length = length
        if length is None:
            super().__init__()
        else:
            super().__init__(envelope.text_length(4 * length, self.key))

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            n = None if self.length is None else envelope.text_length(4 * self.length, self.key)
            return self._mysql_text(dialect, n)
        return self.impl_instance

    def _serialize(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise EncryptionError(f"{self!r} takes str values, got {type(value).__name__}")
        if self.length is not None and len(value) > self.length:
            raise EncryptionError(
                f"a value of {len(value)} characters does not fit {self!r}; raise the length"
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

    def __repr__(self) -> str:
        return self._args_repr("" if self.length is None else str(self.length))


class EncryptedText(EncryptedString):
    """Text of any length, stored encrypted (LONGTEXT on MySQL/MariaDB)."""

    cache_ok = True
    impl = sa.Text

    def __init__(self, key: str = DEFAULT_KEY, accept_plaintext: bool = False) -> None:
        super().__init__(None, key=key, accept_plaintext=accept_plaintext)

    def __repr__(self) -> str:
        return self._args_repr()


class EncryptedBytes(_EncryptedType[bytes]):
    """Binary data, stored as the header bytes followed by the raw AEAD output."""

    cache_ok = True

    impl = sa.LargeBinary
    _binary = True

    def __init__(
        self, length: int | None = None, key: str = DEFAULT_KEY, accept_plaintext: bool = False
    ) -> None:
        self._setup(key, accept_plaintext)
        self.length = length
        if length is None:
            super().__init__()
        else:
            super().__init__(envelope.binary_length(length, self.key))

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            size = None if self.length is None else envelope.binary_length(self.length, self.key)
            if size is None or size > 16000:
                return dialect.type_descriptor(mysql.LONGBLOB())
            return dialect.type_descriptor(mysql.VARBINARY(size))
        return self.impl_instance

    def _serialize(self, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise EncryptionError(f"{self!r} takes bytes values, got {type(value).__name__}")
        data = bytes(value)
        if self.length is not None and len(data) > self.length:
            raise EncryptionError(f"a value of {len(data)} bytes does not fit {self!r}")
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

    def __init__(self, key: str = DEFAULT_KEY, accept_plaintext: bool = False) -> None:
        self._setup(key, accept_plaintext)
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
        except (TypeError, ValueError) as exc:
            raise EncryptionError(
                f"{self!r} takes JSON-serializable values, got {type(value).__name__}"
            ) from exc

    def _deserialize(self, data: bytes) -> Any:
        return json.loads(data)

    def _from_plaintext(self, value: Any) -> Any:
        return json.loads(value)

    def __repr__(self) -> str:
        return self._args_repr()


# Generic wrapper ---------------------------------------------------------------------------

Codec = tuple[type | tuple[type, ...], Callable[[Any], str], Callable[[str], Any]]


def _enum_codec(inner: sa.Enum) -> Codec:
    enum_class = inner.enum_class
    if enum_class is not None:
        return enum_class, lambda v: v.name, lambda s: enum_class[s]

    def check(v: Any) -> str:
        if v not in inner.enums:
            raise EncryptionError(f"{v!r} is not one of the values of {inner!r}")
        return str(v)

    return str, check, str


def _codec(inner: TypeEngine[Any]) -> Codec:
    """How a value of ``inner``'s Python type becomes text and back, losslessly."""
    if isinstance(inner, sa.Enum):
        return _enum_codec(inner)
    if isinstance(inner, sa.Boolean):
        return bool, lambda v: "1" if v else "0", lambda s: s == "1"
    if isinstance(inner, sa.DateTime):
        return dt.datetime, dt.datetime.isoformat, dt.datetime.fromisoformat
    if isinstance(inner, sa.Date):
        return dt.date, dt.date.isoformat, dt.date.fromisoformat
    if isinstance(inner, sa.Time):
        return dt.time, dt.time.isoformat, dt.time.fromisoformat
    if isinstance(inner, sa.Interval):
        return (
            dt.timedelta,
            lambda v: f"{v.days}:{v.seconds}:{v.microseconds}",
            lambda s: dt.timedelta(*map(int, s.split(":"))),
        )
    if isinstance(inner, sa.Uuid):
        if inner.as_uuid:
            return uuid.UUID, str, uuid.UUID
        return str, lambda v: str(uuid.UUID(v)), str
    if isinstance(inner, sa.Integer):
        return int, str, int
    if isinstance(inner, sa.Float) and not inner.asdecimal:
        return (float, int), lambda v: repr(float(v)), float
    if isinstance(inner, sa.Numeric):
        return (decimal.Decimal, int), str, decimal.Decimal
    if isinstance(inner, (sa.String, sa.LargeBinary, sa.JSON)):
        raise TypeError(
            f"use EncryptedString, EncryptedBytes or EncryptedJSON, not Encrypted({inner!r})"
        )
    raise TypeError(f"Encrypted() does not know how to serialize {inner!r} yet")


class Encrypted(_EncryptedType[Any]):
    """Encrypt a value of another column type: ``Encrypted(sa.Date(), key="pii")``.

    Supported: Date, DateTime (with or without time zone), Time, Interval, Integer, Numeric,
    Float, Boolean, Enum and Uuid. Each value is serialized losslessly to text (ISO 8601 for
    times, the member name for enums) and comes back as the same Python type.
    """

    cache_ok = True
    impl = sa.String

    def __init__(
        self, inner: TypeEngine[Any], key: str = DEFAULT_KEY, accept_plaintext: bool = False
    ) -> None:
        self._setup(key, accept_plaintext)
        self.inner = sa.types.to_instance(inner)
        self._py_type, self._encode, self._decode = _codec(self.inner)
        super().__init__(envelope.text_length(255, self.key))

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return self._mysql_text(dialect, envelope.text_length(255, self.key))
        return self.impl_instance

    def _serialize(self, value: Any) -> bytes:
        if not isinstance(value, self._py_type) or (
            isinstance(value, bool) and self._py_type in (int, (float, int), (decimal.Decimal, int))
        ):
            raise EncryptionError(f"{self!r} cannot store a {type(value).__name__}")
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

"""What a job does to one stored value: re-encrypt, encrypt, decrypt, reindex.

No database access here except the codec sampling the caller hands in: each class turns old
values into new ones and says, by SQL on the header prefix alone, which rows still need it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from .. import census, envelope
from ..blind_index import BlindIndex
from ..envelope import DataKey, IndexKey
from ..exc import ConfigurationError, DecryptionError, KmsFieldError
from ..registry import KeyRegistry
from .records import Operation


class _Transform:
    """What one job does to one stored value, and which rows it concerns (by SQL alone).

    A kf2 value is bound to its context: ``place`` = (logical table, column), the codec (given,
    or learnt from the column itself by :meth:`learn_codec`) and, for a row-bound column, the
    text of the columns ``bind_to`` names, read with each row. kf1 values (format 1) were bound
    to nothing and open under any context.
    """

    def __init__(
        self,
        operation: Operation,
        key: str,
        target: DataKey | None,
        registry: KeyRegistry,
        binary: bool,
        place: tuple[str, str],
        codec: str | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
    ) -> None:
        self.operation = operation
        self.key = key
        self.target = target
        self.registry = registry
        self.binary = binary
        self.place = place
        self.bind_to = bind_to
        self.codec: str | None = None
        self.context = b""  # encode_context(*place, codec) once the codec is known
        self.pad = 0
        self._pad_given = pad
        if codec is not None:
            self._set_codec(codec)
        # Every format's prefix of this key: "kf1:pii:", "kf2:pii:" (all of the same length).
        self.key_prefixes = [f"{fmt}:{key}:" for fmt in envelope.FORMATS]
        # Source keys met so far, by their exact header (bytes for binary columns), as the
        # method that opens a value (value, context): a row's header is one dict lookup.
        self._openers: dict[str | bytes, Callable[[Any, bytes], bytes]] = {}
        self._colon: str | bytes = b":" if binary else ":"
        self._after_name = len(self.key_prefixes[0])

    def _set_codec(self, codec: str) -> None:
        self.codec = codec
        self.context = envelope.encode_context(*self.place, codec)
        given = self._pad_given
        self.pad = envelope.DEFAULT_PADS.get(codec, 0) if given is None else given

    def pending(self, col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        """Rows this job still has to rewrite."""
        ours = sa.or_(*(self._starts(col, prefix) for prefix in self.key_prefixes))
        if self.operation == "decrypt":
            return ours
        if self.operation == "encrypt":
            return sa.and_(col.is_not(None), sa.not_(ours))
        # Re-encryption: everything not yet kf2 under the target version, kf1 values of the
        # target version included (they are moved to kf2 in place).
        assert self.target is not None
        return sa.and_(col.is_not(None), sa.not_(self._starts(col, self.target.header)))

    def _starts(self, col: sa.ColumnElement[Any], text: str) -> sa.ColumnElement[bool]:
        return census.starts_with(col, text.encode("ascii") if self.binary else text)

    def contexts(self, bound: Sequence[Sequence[str]] | None) -> bytes | list[bytes]:
        """The context of every value (one for all, unless the column binds row fields)."""
        if not self.bind_to or self.codec is None:  # no codec yet: kf1 values, which ignore it
            return self.context
        assert bound is not None, "a row-bound column's values come with their bound columns"
        table, column, codec, names = *self.place, self.codec, self.bind_to
        return [
            envelope.encode_context(table, column, codec, zip(names, row, strict=True))
            for row in bound
        ]

    # The codec ------------------------------------------------------------------------------

    def candidates(self) -> list[str]:
        """The codecs a value of this column may have been written with."""
        if self.codec is not None:
            return [self.codec]
        return ["bytes"] if self.binary else [c for c in envelope.CODECS if c != "bytes"]

    def learn_codec(self, samples: Sequence[Sequence[Any]]) -> None:
        """Find the codec (or check the one given) on kf2 values of this column.

        ``samples``: (value, text of each bound column). The codec whose context authenticates
        one of them is the column's. None does: the values were written for another context (a
        type declaring ``context=`` or ``bind_to=``), or were moved here from another column.
        """
        reasons: list[str] = []
        for sample in samples:
            value: str | bytes = bytes(sample[0]) if self.binary else str(sample[0])
            row = list(zip(self.bind_to, sample[1:], strict=True))
            found = envelope.parse(value)
            if found is None or found[0] != envelope.FORMAT or found[1] != self.key:
                continue
            try:
                source = self.registry.data_key(found[1], found[2])
            except KmsFieldError as exc:  # a retired version, KMS refusing: try another value
                reasons.append(str(exc))
                continue
            for codec in self.candidates():
                context = envelope.encode_context(*self.place, codec, row)
                try:
                    if isinstance(value, bytes):
                        source.decrypt_binary(value, context)
                    else:
                        source.decrypt_text(value, context)
                except DecryptionError:
                    continue
                self._set_codec(codec)
                return
        if not samples:
            return
        table, column = self.place
        tried = f"codec {self.codec!r}" if self.codec else "any codec"
        bound = f", bound to {', '.join(self.bind_to)}" if self.bind_to else ""
        why = f" ({'; '.join(reasons[:2])})" if reasons else ""
        raise ConfigurationError(
            f"the kf2 values of data key {self.key!r} in this column do not authenticate under "
            f"context {table}.{column}{bound} with {tried}{why}: if the column type declares "
            "context=..., pass the same context= (CLI --context TABLE.COLUMN); if it declares "
            "bind_to=..., pass the same bind_to= (CLI --bind-to); pass the column's codec= "
            "(CLI --codec) if it is known; if these values are damaged, pass codec= (CLI --codec) "
            "with skip_undecryptable=True (CLI --skip-undecryptable) to skip them"
        )

    def need_codec(self) -> str:
        """The codec to write with; a text column with no kf2 value to learn it from needs it."""
        if self.codec is None and self.binary:
            self._set_codec("bytes")
        if self.codec is None and self.operation == "encrypt":
            self._set_codec("str")
        if self.codec is None:
            table, column = self.place
            raise ConfigurationError(
                f"no kf2 value of data key {self.key!r} in {table}.{column} tells its codec: "
                "pass codec= (CLI --codec): 'str' for EncryptedString and EncryptedText, "
                "'json' for EncryptedJSON, the inner type's codec for Encrypted(...), one of "
                f"{', '.join(c for c in envelope.CODECS if c != 'bytes')}"
            )
        return self.codec

    # Rewriting values -----------------------------------------------------------------------

    def __call__(self, value: Any) -> Any:
        return self.many([value])[0]

    def many(
        self, values: Sequence[Any], bound: Sequence[Sequence[str]] | None = None
    ) -> list[Any]:
        """The new value of each of ``values``; raises KmsFieldError at the first that fails.

        ``bound``: for a row-bound column, the text of its bound columns in each value's row.
        """
        if self.binary:
            values = [bytes(v) for v in values]
        target, pad, binary = self.target, self.pad, self.binary
        if self.operation == "encrypt":
            for value in values:
                _refuse_ciphertext(value)
            assert target is not None
            plaintexts = values if binary else [v.encode("utf-8") for v in values]
            return target.encrypt_many(plaintexts, self.contexts(bound), pad_to=pad, binary=binary)
        if self.codec is None:  # a decrypt job, until it meets a kf2 value to learn from
            self._learn_from(values, bound)
        # The common case, once per row: a header met before (an exact match of one checked
        # in _opener), one dict lookup.
        openers, colon, after = self._openers, self._colon, self._after_name
        contexts = self.contexts(bound)
        if isinstance(contexts, bytes):
            plaintexts = [
                (openers.get(v[: v.find(colon, after) + 1]) or self._opener(v))(v, contexts)
                for v in values
            ]
        else:
            plaintexts = [
                (openers.get(v[: v.find(colon, after) + 1]) or self._opener(v))(v, c)
                for v, c in zip(values, contexts, strict=True)
            ]
        if target is not None:
            return target.encrypt_many(plaintexts, self.contexts(bound), pad_to=pad, binary=binary)
        return plaintexts if binary else [p.decode("utf-8") for p in plaintexts]  # decrypt

    def _learn_from(self, values: Sequence[Any], bound: Sequence[Sequence[str]] | None) -> None:
        for i, value in enumerate(values):
            found = envelope.parse(value)
            if found is not None and found[0] == envelope.FORMAT and found[1] == self.key:
                try:
                    self.learn_codec([(value, *(bound[i] if bound else ()))])
                except ConfigurationError as exc:  # this row's problem (or every kf2 row's)
                    raise DecryptionError(str(exc)) from None
                return

    def _opener(self, value: Any) -> Callable[[Any, bytes], bytes]:
        """Check the header of ``value`` and remember how to open values with that header."""
        found = envelope.parse(value)
        if found is None:
            raise KmsFieldError(
                f"value is not ciphertext of data key {self.key!r} (no 'kf2:' or 'kf1:' header)"
            )
        fmt, name, version = found
        if name != self.key:
            raise KmsFieldError(f"value is under data key {name!r}, not {self.key!r}")
        source = self.registry.data_key(name, version)
        opener: Callable[[Any, bytes], bytes]
        opener = source.decrypt_binary if self.binary else source.decrypt_text
        head = envelope.header(name, version, fmt)
        self._openers[head.encode("ascii") if self.binary else head] = opener
        return opener


def _refuse_ciphertext(value: str | bytes) -> None:
    """Invariant 2, for encrypt: no value that is (or looks like) a ciphertext of ours."""
    found = envelope.parse(value)
    if found is not None:
        raise KmsFieldError(
            f"value is already ciphertext ({found[0]} under data key {found[1]!r} version "
            f"{found[2]})"
        )
    if envelope.looks_like_header(value):
        raise KmsFieldError(
            "value starts like a damaged ciphertext header (kf<digits>: in another case or "
            "after spaces): refusing to encrypt what is probably an altered ciphertext"
        )


class _WithIndex:
    """Encrypt a plaintext value and compute its blind-index value in the same pass.

    ``table`` is the logical table the index values are bound to (see BlindIndex.context_fields).
    """

    def __init__(self, inner: _Transform, index: BlindIndex, target: IndexKey, table: str) -> None:
        self.inner = inner
        self.index = index
        self.target = target
        self.fields = index.context_fields(table)

    def pending(self, col: sa.Column[Any]) -> sa.ColumnElement[bool]:
        return self.inner.pending(col)

    def __call__(self, value: Any) -> tuple[Any, str]:
        new = self.inner(value)
        plain = bytes(value) if self.inner.binary else value
        return new, self.target.compute(self.index._data(plain), self.index._nbytes, self.fields)

    def many(self, values: Sequence[Any]) -> list[tuple[Any, str]]:
        return [self(value) for value in values]


class _Reindex:
    """Recompute a blind-index value from its encrypted source under the active index key.

    Pending: every value not under the active version's header, which includes the context-free
    ``kf1`` values of older releases (same key version, another format).

    A source bound to other columns of its row (``bind_to``, and ``tenant=``, which binds to the
    tenant column and picks the tenant's key) and a tenant-scoped index need those columns: the
    job reads them (``bound``, as text) with each row and hands them to :meth:`__call__`.
    """

    def __init__(
        self, index: BlindIndex, target: IndexKey, registry: KeyRegistry, table: str
    ) -> None:
        self.index = index
        self.target = target
        self.registry = registry
        self.fields = index.context_fields(table)
        self.source_type = _declared_source(index)
        typ = self.source_type
        self.bind_to: tuple[str, ...] = () if typ is None else tuple(typ.bind_to)
        wanted = [*self.bind_to, *([index.tenant] if index.tenant else [])]
        self.bound = tuple(dict.fromkeys(wanted))  # read with each row, in this order
        self._source_contexts = _source_contexts(index, table, typ)

    def pending(self, col: sa.Column[Any], source: sa.Column[Any]) -> sa.ColumnElement[bool]:
        return sa.and_(
            source.is_not(None),
            sa.or_(col.is_(None), sa.not_(census.starts_with(col, self.target.header))),
        )

    def __call__(self, old: Any, source_value: Any, bound: Sequence[str] = ()) -> str:
        binary = not isinstance(source_value, str)
        if binary:
            source_value = bytes(source_value)
        found = envelope.parse_header(source_value)
        if found is None:
            raise KmsFieldError("the source value is not ciphertext (no 'kf1:' or 'kf2:' header)")
        if self.bound:
            row = dict(zip(self.bound, bound, strict=True))
            key, context, scope = self._from_row(found, row, binary)
        else:  # the common case: nothing read but the source
            key, scope = self.registry.data_key(*found), None
            context = self._source_contexts[binary]
        if binary:
            plaintext = key.decrypt_binary(source_value, context)
        else:
            plaintext = key.decrypt_text(source_value, context)
        value: Any = plaintext if binary else plaintext.decode("utf-8")
        return self.target.compute(self.index._data(value, scope), self.index._nbytes, self.fields)

    def _from_row(
        self, found: tuple[str, int], row: dict[str, str], binary: bool
    ) -> tuple[DataKey, bytes, str | None]:
        """The source's key and context, and the index's tenant, from the row's bound columns."""
        typ = self.source_type
        if typ is not None and self.bind_to:
            context = typ.row_context([(name, row[name]) for name in self.bind_to])
        else:
            context = self._source_contexts[binary]
        if typ is not None and typ.tenant is not None:
            from ..tenants import read_key

            key = read_key(typ, found[0], found[1], [(typ.tenant, row[typ.tenant])])
        else:
            key = self.registry.data_key(*found)
        return key, context, row[self.index.tenant] if self.index.tenant else None


def _declared_source(index: BlindIndex) -> Any:
    """The encrypted source column's type where the model declares it (else None)."""
    from ..types import _EncryptedType

    for column in index._columns:
        typ = getattr(column.table.c.get(index.source), "type", None)
        if isinstance(typ, _EncryptedType):
            return typ
    return None


def _source_contexts(index: BlindIndex, table: str, typ: Any) -> dict[bool, bytes]:
    """The context of the index's encrypted source values (text, binary): the source column's
    own type where the model declares it, else (table, source, str | bytes)."""
    if typ is not None:
        return {typ._binary: typ.context_bytes(), not typ._binary: typ.context_bytes()}
    return {
        False: envelope.encode_context(table, index.source, "str"),
        True: envelope.encode_context(table, index.source, "bytes"),
    }


def _check_format_options(codec: str | None, pad: int | None) -> None:
    if codec is not None and codec not in envelope.CODECS:
        raise ConfigurationError(
            f"codec={codec!r} is not a codec: use one of {', '.join(envelope.CODECS)}"
        )
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
        raise ConfigurationError(f"pad={pad!r}: use a whole number of bytes, 0 or more")

"""Batched, resumable, compare-and-swap rewriting of an encrypted column, in SQLAlchemy Core.

One engine serves three jobs: ``reencrypt`` (every row to the active data key version),
``encrypt`` (plaintext column to ciphertext, in place) and ``decrypt`` (the way back out).

How it cannot lose data:

* Keyset pagination by primary key; rows that need no work are filtered out by SQL on the
  header prefix, without decrypting them.
* Each batch is computed first (decrypt, encrypt), then written in ONE transaction together
  with its checkpoint in ``kms_field_jobs``. A kill at any moment leaves either the whole batch
  and its checkpoint, or neither; a rerun resumes after the last committed batch.
* Every write is compare-and-swap: ``UPDATE t SET col = :new WHERE pk = :pk AND col = :old``.
  A row the application changed meanwhile is left alone, and picked up again by the census.
* After a sweep, a census by SQL alone counts the rows still needing work (for example rows
  written by a process whose active version had not refreshed yet) and sweeps again, until
  none are left or ``settle_timeout`` passes. Only then is the job marked finished.
* No ORM is involved, so no ORM events fire.

What it writes is format kf2, bound to the column's context (``envelope.encode_context``): the
logical table and column (``context=``, default the job's own), the codec (``codec=``, else
learnt from the kf2 values already in the column) and, for row-bound columns, the bound
columns' text (``bind_to=``). A value that does not authenticate in that context (moved from
elsewhere) stops the job at its row. Legacy kf1 values are read, and a re-encryption rewrites
them as kf2 even on the target version.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import census, envelope
from .blind_index import BlindIndex
from .census import ColumnRef
from .envelope import DataKey, IndexKey
from .exc import ConfigurationError, DecryptionError, KmsFieldError, ReencryptionError
from .key_store import ACTIVE_TTL_MARGIN
from .registry import KeyRegistry, get_registry

log = logging.getLogger(__name__)
# The waits for other processes (active_ttl): shown by the command line and Alembic runs even
# when the rest of the library's INFO is not.
WAIT_LOG = logging.getLogger("sqlalchemy_kms_field.waits")

Operation = Literal["reencrypt", "encrypt", "decrypt", "reindex"]
ProgressCallback = Callable[[int, int], None]  # (rows done in this run, rows to do at start)
T = TypeVar("T")

jobs_table = census.jobs_table


@dataclass
class JobResult:
    """What a job did. ``finished`` is True once the census found no row left to do."""

    column: ColumnRef
    operation: Operation
    target_version: int | None
    rows_written: int = 0
    rows_conflicted: int = 0  # changed by the application meanwhile; picked up again
    sweeps: int = 0
    remaining: int = 0
    finished: bool = False
    dry_run: bool = False
    skipped: list[Any] = field(default_factory=list)  # primary keys of undecryptable rows
    context: tuple[str, str] | None = None  # the (table, column) kf2 values are bound to
    codec: str | None = None  # given, or learnt from the column's kf2 values


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


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
    """

    def __init__(
        self, index: BlindIndex, target: IndexKey, registry: KeyRegistry, table: str
    ) -> None:
        self.index = index
        self.target = target
        self.registry = registry
        self.fields = index.context_fields(table)
        self._source_contexts = _source_contexts(index, table)

    def pending(self, col: sa.Column[Any], source: sa.Column[Any]) -> sa.ColumnElement[bool]:
        return sa.and_(
            source.is_not(None),
            sa.or_(col.is_(None), sa.not_(census.starts_with(col, self.target.header))),
        )

    def __call__(self, old: Any, source_value: Any) -> str:
        binary = not isinstance(source_value, str)
        if binary:
            source_value = bytes(source_value)
        found = envelope.parse_header(source_value)
        if found is None:
            raise KmsFieldError("the source value is not ciphertext (no 'kf1:' or 'kf2:' header)")
        key = self.registry.data_key(*found)
        context = self._source_contexts[binary]
        if binary:
            plaintext = key.decrypt_binary(source_value, context)
        else:
            plaintext = key.decrypt_text(source_value, context)
        value: Any = plaintext if binary else plaintext.decode("utf-8")
        return self.target.compute(self.index._data(value), self.index._nbytes, self.fields)


def _source_contexts(index: BlindIndex, table: str) -> dict[bool, bytes]:
    """The context of the index's encrypted source values (text, binary): the source column's
    own type where the model declares it, else (table, source, str | bytes)."""
    from .types import _EncryptedType

    for column in index._columns:
        typ = getattr(column.table.c.get(index.source), "type", None)
        if isinstance(typ, _EncryptedType):
            if typ.bind_to:
                raise ConfigurationError(
                    f"reindex of {index.source!r}: its values are bound to "
                    f"{', '.join(typ.bind_to)} of their row, which reindex does not read yet"
                )
            return {typ._binary: typ.context_bytes(), not typ._binary: typ.context_bytes()}
    return {
        False: envelope.encode_context(table, index.source, "str"),
        True: envelope.encode_context(table, index.source, "bytes"),
    }


def run_job(
    engine: Engine,
    table: str,
    column: str,
    *,
    key: str,
    operation: Operation = "reencrypt",
    schema: str | None = None,
    batch_size: int = 2000,
    rows_per_second: float | None = None,
    dry_run: bool = False,
    skip_undecryptable: bool = False,
    settle_timeout: float | None = None,
    progress: ProgressCallback | None = None,
    registry: KeyRegistry | None = None,
    index: BlindIndex | None = None,
    index_column: str | None = None,
    wait_for_processes: bool = True,
    context: str | tuple[str, str] | None = None,
    codec: str | None = None,
    pad: int | None = None,
    bind_to: Sequence[str] | str = (),
) -> JobResult:
    """Rewrite every row of ``table.column`` that needs it; see the module docstring.

    ``operation="reindex"`` recomputes the blind-index column ``column`` (declared as
    ``index``, a BlindIndex) from its encrypted source under the active version of index key
    ``key``; the compare-and-swap then also requires the source to be unchanged.
    ``operation="encrypt"`` with ``index`` and ``index_column`` fills that blind-index column
    in the same UPDATE as the ciphertext.

    ``wait_for_processes``: a reindex first waits until ``active_ttl`` (plus a margin) has
    passed since the target index-key version was created, since a process that has not
    re-read the live versions yet would not find a row whose index already moved; and a
    re-encryption does not declare itself finished before that moment, since such a process may
    still write under the old version.

    ``context`` (``"table.column"`` or a tuple; default ``(table, column)``) and ``codec``
    (one of ``envelope.CODECS``) are what kf2 values are bound to: pass those of the column
    type when it declares ``context=``. Without ``codec``, the job learns it from the kf2
    values already in the column (``"bytes"`` for binary columns, ``"str"`` for encrypt); a
    text column holding only kf1 values needs it. ``pad``: the padding of the values written
    (default ``envelope.DEFAULT_PADS.get(codec, 0)``). ``bind_to``: the columns of the row
    the values are bound to, as the column type declares them. Values in format kf1 are read
    and, by ``reencrypt``, rewritten as kf2, also when they are already on the target version.

    ``settle_timeout`` bounds how long the job keeps sweeping rows that other processes are
    still writing under an older version (default: twice the registry's ``active_ttl`` plus
    30 seconds). ``skip_undecryptable`` records rows that fail to decrypt instead of stopping.
    """
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    _check_format_options(codec, pad)
    place = (table, column) if context is None else envelope.context_name(context)
    if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "re-encryption commits each batch on its own connection; an in-memory SQLite "
            "database is private to one connection: use a database file"
        )
    registry = registry or get_registry()
    envelope.check_key_name(key)
    if operation == "reindex":
        if index is None or index.key != key:
            raise ConfigurationError("reindex needs index=BlindIndex(...) with the same key")
        target_index = registry.index_keys(key)[0]
        target: DataKey | None = None
    else:
        target = None if operation == "decrypt" else registry.active_key(key)
    if settle_timeout is None:
        settle_timeout = 2 * registry.active_ttl + 30

    census.create_tables(engine)
    t = census.reflect(engine, table, schema)
    ref = ColumnRef(table, column, key, schema)
    if column not in t.c:
        raise ConfigurationError(f"table {t.fullname!r} has no column {column!r}")
    col = t.c[column]
    pk = list(t.primary_key.columns)
    if not pk:
        raise ConfigurationError(
            f"table {t.fullname!r} has no primary key; re-encryption pages and writes by it"
        )
    source = None
    bound: list[sa.Column[Any]] = []  # columns of the row the values are bound to
    transform: Any
    codec_used: str | None = None
    if operation == "reindex":
        assert index is not None
        if index.source not in t.c:
            raise ConfigurationError(f"table {t.fullname!r} has no column {index.source!r}")
        source = t.c[index.source]
        transform = _Reindex(index, target_index, registry, table)
        pending = transform.pending(col, source)
        version: int | None = target_index.version
    else:
        binary = census.is_binary(col)
        if codec is not None and (codec == "bytes") != binary:
            raise ConfigurationError(
                f"codec={codec!r} does not fit {'binary' if binary else 'text'} column "
                f"{ref}: " + ("use 'bytes'" if binary else "'bytes' is for binary columns")
            )
        bound = _bound_columns(t, col, bind_to, index)
        names = tuple(c.name for c in bound)
        transform = _Transform(
            operation, key, target, registry, binary, place, codec, pad, bind_to=names
        )
        pending = transform.pending(col)
        version = target.version if target else None
        try:
            transform.learn_codec(_kf2_samples(engine, col, bound, key, binary))
        except ConfigurationError:
            # The few values sampled may be the damaged ones: told the codec and to skip what
            # does not decrypt, the job goes on (each such row is skipped, named and left).
            if codec is None or not skip_undecryptable:
                raise
            log.warning("%s of %s: sampled kf2 values do not authenticate", operation, ref)
        if operation != "decrypt":
            transform.need_codec()
        codec_used = transform.codec
    companion = None
    if operation == "encrypt" and index is not None:
        if index_column is None or index_column not in t.c:
            raise ConfigurationError(
                f"encrypt with a blind index needs index_column= naming a column of {t.fullname!r}"
            )
        companion = t.c[index_column]
        transform = _WithIndex(transform, index, registry.index_keys(index.key)[0], table)
    result = JobResult(ref, operation, version, dry_run=dry_run)
    if operation != "reindex":
        result.context, result.codec = place, codec_used

    todo = 0  # counted (a scan of the table) only for a dry run or a progress display
    if dry_run or progress is not None:
        with engine.connect() as conn:
            todo = _count(conn, t, pending)
    if dry_run:
        result.remaining = todo
        return result

    if operation == "reindex" and wait_for_processes:
        _wait_until_every_process_knows(registry, key, target_index.version, "lookups")
    last = _start(engine, ref, operation, result.target_version)
    if companion is not None and index is not None:
        with engine.begin() as conn:
            census.record_column(conn, ColumnRef(table, companion.name, index.key, schema))
    job = _Job(
        engine,
        t,
        ref,
        operation,
        transform,
        pk,
        col,
        batch_size,
        rows_per_second,
        skip_undecryptable,
        progress,
        todo,
        result,
        source=source,
        pending=pending,
        companion=companion,
        bound=bound,
    )
    deadline = None
    while True:
        job.sweep(last)
        with engine.connect() as conn:
            left = _count(conn, t, pending) - len(result.skipped)
        result.remaining = max(left, 0)
        if left <= 0:
            # A clean census proves nothing while a process may still write under the old
            # version (for up to active_ttl after the rotation): wait that out, then count again.
            if operation == "reencrypt" and target is not None and wait_for_processes:
                if _wait_until_every_process_knows(registry, key, target.version, "writes"):
                    last = None
                    continue
            break
        # Rows written meanwhile under an old version (or conflicts): sweep again, bounded.
        now = time.monotonic()
        deadline = deadline or now + settle_timeout
        if now >= deadline:
            raise ReencryptionError(
                f"{left} rows of {ref} still need {operation} after {settle_timeout:.0f} s of "
                "sweeping: some process keeps writing under another data key version; check "
                "that every process uses the same key store and active_ttl, then rerun",
                table=str(ref.table),
                column=ref.column,
            )
        log.info(
            "%s of %s: %d rows left after sweep %d, sweeping again",
            operation,
            ref,
            left,
            result.sweeps,
        )
        time.sleep(min(1.0, settle_timeout / 10))
        last = None
    _finish(engine, ref, operation, skipped=len(result.skipped))
    result.finished = True
    log.info(
        "%s of %s finished: %d rows written, %d conflicts, %d sweeps, %d skipped",
        operation,
        ref,
        result.rows_written,
        result.rows_conflicted,
        result.sweeps,
        len(result.skipped),
    )
    return result


class _Job:
    def __init__(
        self,
        engine: Engine,
        t: sa.Table,
        ref: ColumnRef,
        operation: Operation,
        transform: Any,
        pk: Sequence[sa.Column[Any]],
        col: sa.Column[Any],
        batch_size: int,
        rows_per_second: float | None,
        skip_undecryptable: bool,
        progress: ProgressCallback | None,
        todo: int,
        result: JobResult,
        source: sa.Column[Any] | None = None,
        pending: sa.ColumnElement[bool] | None = None,
        companion: sa.Column[Any] | None = None,
        bound: Sequence[sa.Column[Any]] = (),
    ) -> None:
        # ``bound``: the columns a row-bound value is bound to, read (as text) after it.
        self.bound = len(bound)
        # ``companion``: a blind-index column written in the same UPDATE (encrypt with index);
        # the transform then returns (new value, index value).
        self.companion = companion
        # ``source``: for reindex, the encrypted column the index column ``col`` is computed
        # from; it is read with each row and must be unchanged when the row is written.
        self.source = source
        self.engine, self.t, self.ref, self.operation = engine, t, ref, operation
        self.transform, self.pk, self.col = transform, pk, col
        self.batch_size, self.rate = batch_size, rows_per_second
        self.skip_undecryptable, self.progress, self.todo = skip_undecryptable, progress, todo
        self.result = result
        self.skipped_set: set[tuple[Any, ...]] = set()
        pk_expr = pk[0] if len(pk) == 1 else sa.tuple_(*pk)
        reads: list[Any] = [col] if source is None else [col, source]
        reads += [_bound_text(c) for c in bound]
        if pending is None:
            pending = transform.pending(col)
        self.page = sa.select(*pk, *reads).where(pending).order_by(*pk).limit(batch_size)
        # The pages after the first: the same statement every time (compiled once).
        after = [sa.bindparam(f"last_{i}", type_=c.type) for i, c in enumerate(pk)]
        self.next_page = self.page.where(
            pk_expr > (after[0] if len(pk) == 1 else sa.tuple_(*after))
        )
        # Rows straight from the driver's cursor where no column needs SQLAlchemy's result
        # processing: building Row objects costs more than the driver's own fetch.
        self.raw_rows = all(_plain_result(c.type, engine.dialect) for c in [*pk, *reads])
        where = [c == sa.bindparam(f"pk_{i}", type_=c.type) for i, c in enumerate(pk)]
        old = sa.bindparam("old_value", type_=col.type)
        where.append(col == old if source is None else col.is_not_distinct_from(old))
        if source is not None:
            where.append(source == sa.bindparam("old_source", type_=source.type))
        values = {col.name: sa.bindparam("new_value", type_=col.type)}
        if companion is not None:
            values[companion.name] = sa.bindparam("companion_value", type_=companion.type)
        self.update = sa.update(t).where(*where).values(values)
        # Read and compute batch k+1 in a thread while batch k is written (not on SQLite,
        # where a reader on a second connection can hold up the writer's commit).
        self.pipelined = engine.dialect.name != "sqlite"
        self.checkpoint = (
            sa.update(jobs_table)
            .where(*_job_where(ref, operation))
            .values(
                last_key=sa.bindparam("last_key"),
                rows_done=jobs_table.c.rows_done + sa.bindparam("n", type_=sa.BigInteger),
                rows_skipped=jobs_table.c.rows_skipped + sa.bindparam("s", type_=sa.BigInteger),
                updated_at=sa.bindparam("now"),
            )
        )
        self.pg_update = (
            _PgUpdate(engine, t, pk, col, source, companion, self.checkpoint)
            if engine.dialect.name == "postgresql"
            else None
        )

    def sweep(self, last: tuple[Any, ...] | None) -> None:
        self.result.sweeps += 1
        if not self.pipelined:
            while True:
                started = time.monotonic()
                batch = self._read(last)
                if batch is None:
                    return
                self._commit(batch)
                self._pace(batch, started)
                last = batch.last
        # Three stages: a thread fetches the next pages (keyset paging needs only the last key
        # of the page before), a thread decrypts and encrypts them (holding the GIL), and this
        # thread writes and commits (the driver releases the GIL while the database works).
        # Fetching ahead keeps the computing thread from waiting for the database; at most four
        # pages are in memory. Batches are disjoint key ranges, every write is compare-and-swap
        # and commits with its own checkpoint, so the overlap changes nothing.
        pages: queue.Queue[Any] = queue.Queue(maxsize=1)
        stop = threading.Event()

        def hand_over(item: Any) -> None:
            while not stop.is_set():
                try:
                    pages.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def fetch_all(last: tuple[Any, ...] | None) -> None:
            try:
                while not stop.is_set():
                    rows = self._fetch(last)
                    hand_over(rows)
                    if not rows:
                        return
                    last = tuple(rows[-1][: len(self.pk)])
            except BaseException as exc:  # handed to this thread, which raises it
                hand_over(exc)

        with ThreadPoolExecutor(2, thread_name_prefix="kms-field") as pool:
            pool.submit(fetch_all, last)
            computing: Future[_Batch] | None = None
            try:
                while True:
                    started = time.monotonic()
                    rows = pages.get()
                    if isinstance(rows, BaseException):
                        raise rows
                    upcoming = pool.submit(self._compute, rows) if rows else None
                    if computing is not None:
                        batch = computing.result()
                        self._commit(batch)
                        self._pace(batch, started)
                    if upcoming is None:
                        return
                    computing = upcoming
            finally:
                stop.set()

    def _pace(self, batch: _Batch, started: float) -> None:
        if self.rate:
            time.sleep(max(0.0, batch.count / self.rate - (time.monotonic() - started)))

    def _read(self, last: tuple[Any, ...] | None) -> _Batch | None:
        """The next page of rows to do after ``last``, computed; None when there is none."""
        rows = self._fetch(last)
        return self._compute(rows) if rows else None

    def _fetch(self, last: tuple[Any, ...] | None) -> Sequence[Any]:
        """The next page of rows to do after ``last`` (empty when there is none)."""
        page, params = self.page, {}
        if last is not None:
            page, params = self.next_page, {f"last_{i}": v for i, v in enumerate(last)}

        def read() -> Sequence[Any]:
            with self.engine.connect() as conn:
                if self.engine.dialect.name == "postgresql":
                    # No BEGIN and ROLLBACK round trips around the one SELECT (psycopg sends
                    # both; with PyMySQL, switching autocommit would cost more than it saves).
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                result = conn.execute(page, params)
                if not self.raw_rows:
                    return result.all()
                try:
                    return list(result.cursor.fetchall())
                finally:
                    result.close()

        return self._retrying(read)

    def _commit(self, batch: _Batch) -> None:
        """Write a batch and its checkpoint in one transaction."""

        checkpoint = {
            "last_key": _dump_key(batch.last),
            "n": len(batch.rows),
            "s": batch.skipped,
            "now": _now(),
        }

        def write() -> int:
            with self.engine.connect() as conn:
                pg = self.pg_update
                if batch.rows and pg is not None and pg.single_statement(conn):
                    # One statement is one transaction even in autocommit: rows and checkpoint.
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    return pg.execute(conn, batch.columns(), checkpoint)
                with conn.begin():
                    written = self._write(conn, batch) if batch.rows else 0
                    conn.execute(self.checkpoint, checkpoint)
                return written

        written = self._retrying(write)
        todo = len(batch.rows)
        if written >= 0 and todo >= written:
            # Drivers report the rows matched by the executemany; misses are conflicts.
            self.result.rows_conflicted += todo - written
            self.result.rows_written += written
        else:
            self.result.rows_written += todo
        if self.progress:
            self.progress(self.result.rows_written + self.result.rows_conflicted, self.todo)

    def _retrying(self, attempt: Callable[[], T]) -> T:
        for n in range(4):
            try:
                return attempt()
            except sa.exc.StatementError as exc:
                # The parameters hold old and new values (plaintext, for decrypt): never show them.
                exc.hide_parameters = True
                if not isinstance(exc, sa.exc.OperationalError):
                    raise self._refused(exc) from (None if self.operation == "decrypt" else exc)
                # Deadlock, serialization failure or lost connection: the batch rolled back.
                if n == 3:
                    raise ReencryptionError(
                        f"{self.operation} of {self.ref} failed after retries: the database "
                        f"said {type(exc.orig).__name__}; every row is intact, rerun to resume",
                        table=self.ref.table,
                        column=self.ref.column,
                    ) from exc
                time.sleep(0.1 * 2**n)
        raise AssertionError("unreachable")

    def _refused(self, exc: sa.exc.StatementError) -> ReencryptionError:
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or (getattr(orig, "args", None) or [None])[0]
        # A database's message may quote the value (MariaDB does): for decrypt it would be
        # plaintext, so only the error class and code are shown then.
        said = type(orig).__name__ + (f" {code}" if code else "")
        if self.operation != "decrypt":
            said += f": {str(orig).strip().splitlines()[0] if str(orig).strip() else ''}"
        return ReencryptionError(
            f"{self.operation} of {self.ref}: the database refused a batch ({said}); nothing "
            "of that batch was written, every row is intact; fix the cause (a column too "
            "narrow for the new values?) and rerun to resume",
            table=self.ref.table,
            column=self.ref.column,
        )

    def _write(self, conn: Connection, batch: _Batch) -> int:
        if self.pg_update is None:
            return int(conn.execute(self.update, batch.params()).rowcount)
        return self.pg_update.execute(conn, batch.columns())

    def _compute(self, rows: Sequence[Any]) -> _Batch:
        n = len(self.pk)
        transform = self.transform
        with_source = self.source is not None
        companion = self.companion is not None
        last = tuple(rows[-1][:n])
        if not with_source:
            # The common case, a batch where every row converts: one tight loop. Should a row
            # fail, the loop below does the batch again row by row, to name or skip that row.
            try:
                if self.bound:
                    news = transform.many([r[n] for r in rows], [r[n + 1 :] for r in rows])
                else:
                    news = transform.many([row[n] for row in rows])
            except KmsFieldError:
                pass
            else:
                return _Batch(rows, news, n, False, companion, last, len(rows), 0)
        kept: list[Any] = []
        news = []
        skipped = 0
        for row in rows:
            try:
                if with_source:
                    new = transform(row[n], row[n + 1])
                elif self.bound:
                    new = transform.many([row[n]], [row[n + 1 :]])[0]
                else:
                    new = transform(row[n])
            except KmsFieldError as exc:
                key = tuple(row[:n])
                if isinstance(exc, ConfigurationError) or not self.skip_undecryptable:
                    raise ReencryptionError(
                        f"{self.operation} of {self.ref} stopped at the row with primary key "
                        f"{_show_key(key)}: {exc}. Nothing of this batch was written and no row "
                        "was changed; rerun to resume once that row is fixed, or pass "
                        "skip_undecryptable=True (CLI --skip-undecryptable) to leave such rows "
                        "as they are",
                        table=self.ref.table,
                        column=self.ref.column,
                        primary_key=key,
                    ) from exc
                if key not in self.skipped_set:
                    self.skipped_set.add(key)
                    self.result.skipped.append(key if n > 1 else key[0])
                    skipped += 1
                    log.warning(
                        "%s of %s: skipped row %s: %s",
                        self.operation,
                        self.ref,
                        _show_key(key),
                        exc,
                    )
                continue
            kept.append(row)
            news.append(new)
        return _Batch(kept, news, n, with_source, companion, last, len(rows), skipped)


class _Batch:
    """A computed page: the rows to write (primary key, old value[, old source]), their new
    values (with the companion's for encrypt with a blind index), and where the page ended."""

    __slots__ = ("companion", "count", "last", "n", "news", "rows", "skipped", "source")

    def __init__(
        self,
        rows: Sequence[Any],
        news: list[Any],
        n: int,
        source: bool,
        companion: bool,
        last: tuple[Any, ...],
        count: int,
        skipped: int,
    ) -> None:
        self.rows, self.news, self.n, self.source, self.companion = rows, news, n, source, companion
        self.last, self.count, self.skipped = last, count, skipped

    def columns(self) -> dict[str, list[Any]]:
        n, rows = self.n, self.rows
        out = {f"pk_{i}": [r[i] for r in rows] for i in range(n)}
        out["old_value"] = [r[n] for r in rows]
        if self.companion:
            out["new_value"] = [new for new, _ in self.news]
            out["companion_value"] = [index for _, index in self.news]
        else:
            out["new_value"] = self.news
        if self.source:
            out["old_source"] = [r[n + 1] for r in rows]
        return out

    def params(self) -> list[dict[str, Any]]:
        columns = self.columns()
        return [
            dict(zip(columns, values, strict=True))
            for values in zip(*columns.values(), strict=True)
        ]


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
                {"last_key": None, "n": 0, "s": 0, "now": None}
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
                return int(conn.exec_driver_sql(self.single_sql, params).scalar_one())
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


def _wait_until_every_process_knows(
    registry: KeyRegistry, key: str, version: int, what: str
) -> bool:
    """Sleep until every process has re-read the active versions since ``version`` was activated.

    Processes re-read them every ``active_ttl`` seconds, so that is active_ttl (plus a margin)
    after its activation, measured on the database's clock (a version activated by a release
    that did not record it counts as activated now). True if it had to wait.
    """
    store = registry.key_store
    now = store.clock()
    activated = store.get(key, version).activated_at or now
    ready = activated + timedelta(seconds=registry.active_ttl + ACTIVE_TTL_MARGIN)
    wait = (ready - now).total_seconds()
    if wait <= 0:
        return False
    why = {
        "writes": "may still write under a version older than %r version %d; the job "
        "finishes after that",
        "lookups": "may not look up index values under %r version %d yet; the reindex starts "
        "after that",
    }[what]
    WAIT_LOG.info(
        "waiting %.0f s (active_ttl %g s) for every process to re-read the key states: until "
        "then one " + why,
        wait,
        registry.active_ttl,
        key,
        version,
    )
    time.sleep(wait)
    return True


def _check_format_options(codec: str | None, pad: int | None) -> None:
    if codec is not None and codec not in envelope.CODECS:
        raise ConfigurationError(
            f"codec={codec!r} is not a codec: use one of {', '.join(envelope.CODECS)}"
        )
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 0):
        raise ConfigurationError(f"pad={pad!r}: use a whole number of bytes, 0 or more")


def _bound_columns(
    t: sa.Table, col: sa.Column[Any], bind_to: Sequence[str] | str, index: BlindIndex | None
) -> list[sa.Column[Any]]:
    names = (bind_to,) if isinstance(bind_to, str) else tuple(bind_to)
    for name in names:
        if name not in t.c or name == col.name or names.count(name) > 1:
            raise ConfigurationError(
                f"bind_to={names!r}: name distinct other columns of table {t.fullname!r}, as "
                "the column type's bind_to does"
            )
    if names and index is not None:
        raise ConfigurationError(
            "a row-bound column (bind_to) cannot be encrypted with its blind index in one job: "
            "encrypt it, then reindex the blind index"
        )
    return [t.c[name] for name in names]


def _bound_text(column: sa.Column[Any]) -> sa.ColumnElement[str]:
    """A bound column as text, exactly as the column types read it (row_binding)."""
    return sa.func.coalesce(sa.cast(column, sa.String()), "")


def _kf2_samples(
    engine: Engine,
    col: sa.Column[Any],
    bound: Sequence[sa.Column[Any]],
    key: str,
    binary: bool,
    n: int = 3,
) -> list[Any]:
    """A few kf2 values of data key ``key`` in ``col`` (with their bound columns' text), to
    learn the column's codec from."""
    prefix = f"{envelope.FORMAT}:{key}:"
    where = census.starts_with(col, prefix.encode("ascii") if binary else prefix)
    query = sa.select(col, *(_bound_text(c) for c in bound)).where(where).limit(n)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]


def _count(conn: Connection, t: sa.Table, where: sa.ColumnElement[bool]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(t).where(where)).scalar_one())


def _job_where(ref: ColumnRef, operation: str) -> list[sa.ColumnElement[bool]]:
    j = jobs_table.c
    return [
        j.table_schema == (ref.schema or ""),
        j.table_name == ref.table,
        j.column_name == ref.column,
        j.operation == operation,
    ]


def _start(
    engine: Engine, ref: ColumnRef, operation: Operation, target: int | None
) -> tuple[Any, ...] | None:
    """Resume the unfinished job with the same target, or start a new one. Returns last key."""
    with engine.begin() as conn:
        row = conn.execute(sa.select(jobs_table).where(*_job_where(ref, operation))).one_or_none()
        now = _now()
        if (
            row is not None
            and row.finished_at is None
            and row.target_version == target
            and row.key_name == ref.key
        ):
            log.info("resuming %s of %s after %d rows", operation, ref, row.rows_done)
            return _load_key(row.last_key)
        fresh = {
            "key_name": ref.key,
            "target_version": target,
            "last_key": None,
            "rows_done": 0,
            "rows_skipped": 0,
            "started_at": now,
            "updated_at": now,
            "finished_at": None,
        }
        if row is None:
            conn.execute(
                sa.insert(jobs_table).values(
                    table_schema=ref.schema or "",
                    table_name=ref.table,
                    column_name=ref.column,
                    operation=operation,
                    **fresh,
                )
            )
        else:
            conn.execute(sa.update(jobs_table).where(*_job_where(ref, operation)).values(fresh))
        if operation != "decrypt":
            census.record_column(conn, ref)
    return None


def _finish(engine: Engine, ref: ColumnRef, operation: Operation, *, skipped: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.update(jobs_table)
            .where(*_job_where(ref, operation))
            .values(finished_at=_now(), updated_at=_now())
        )
        if operation == "decrypt" and not skipped:
            c = census.columns_table.c
            conn.execute(
                sa.delete(census.columns_table).where(
                    c.table_schema == (ref.schema or ""),
                    c.table_name == ref.table,
                    c.column_name == ref.column,
                )
            )


def unfinished_jobs(conn: Connection | Engine, key: str | None = None) -> list[sa.Row[Any]]:
    """Jobs started and not finished (optionally only those of data key ``key``)."""
    if not sa.inspect(conn).has_table(jobs_table.name):
        return []
    q = sa.select(jobs_table).where(jobs_table.c.finished_at.is_(None))
    if key is not None:
        q = q.where(jobs_table.c.key_name == key)
    if isinstance(conn, Engine):
        with conn.connect() as c:
            return list(c.execute(q))
    return list(conn.execute(q))


# Primary keys in the checkpoint ------------------------------------------------------------


def _dump_key(key: tuple[Any, ...]) -> str:
    return json.dumps([_dump_value(v) for v in key])


def _dump_value(v: Any) -> Any:
    if isinstance(v, uuid.UUID):
        return {"uuid": str(v)}
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, (int, str)) or v is None:
        return v
    return {"str": str(v)}


def _load_key(text: str | None) -> tuple[Any, ...] | None:
    if text is None:
        return None
    out = []
    for v in json.loads(text):
        if isinstance(v, dict):
            if "uuid" in v:
                v = uuid.UUID(v["uuid"])
            elif "hex" in v:
                v = bytes.fromhex(v["hex"])
            else:
                v = v["str"]
        out.append(v)
    return tuple(out)


def _show_key(key: tuple[Any, ...]) -> str:
    return repr(key[0]) if len(key) == 1 else repr(key)


def reencrypt_column(
    engine: Engine, table: str, column: str, *, key: str, **kwargs: Any
) -> JobResult:
    """Move every row of ``table.column`` to the active version of data key ``key``."""
    return run_job(engine, table, column, key=key, operation="reencrypt", **kwargs)


def encrypt_column(
    engine: Engine, table: str, column: str, *, key: str, **kwargs: Any
) -> JobResult:
    """Encrypt a plaintext text or binary column in place under data key ``key``.

    Widen the column first (``EncryptedString(n)`` needs more room than ``String(n)``), and
    let the application read with ``accept_plaintext=True`` until the job has finished.
    """
    return run_job(engine, table, column, key=key, operation="encrypt", **kwargs)


def reindex_column(
    engine: Engine, index_column: sa.Column[Any], *, schema: str | None = None, **kwargs: Any
) -> JobResult:
    """Recompute a blind-index column (a model's ``BlindIndex`` column) under its active key.

    Run it after ``rotate_index_key``; lookups match every live index-key version meanwhile.
    """
    index = index_column.type
    if not isinstance(index, BlindIndex):
        raise ConfigurationError(f"{index_column} is not a BlindIndex column")
    table = index_column.table
    return run_job(
        engine,
        table.name,
        index_column.name,
        key=index.key,
        operation="reindex",
        index=index,
        schema=schema if schema is not None else table.schema,
        **kwargs,
    )


def decrypt_column(
    engine: Engine, table: str, column: str, *, key: str, **kwargs: Any
) -> JobResult:
    """Decrypt ``table.column`` back to plaintext in place (the way back out)."""
    return run_job(engine, table, column, key=key, operation="decrypt", **kwargs)

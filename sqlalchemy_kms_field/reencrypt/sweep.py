"""One sweep over a key range: read pages by primary key, compute them, write each batch
with compare-and-swap together with its checkpoint, retrying what the database rolled back.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..census import ColumnRef
from ..exc import ReencryptionError
from .batch import _Batch, _Compute
from .ranges import Claim, LeaseLost, checkpoint_statement
from .records import JobResult, Operation, _dump_key, _now
from .statements import _PgUpdate, _plain_result

log = logging.getLogger(__name__)


ProgressCallback = Callable[[int, int], None]  # (rows done in this run, rows to do at start)
T = TypeVar("T")


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
        self._compute = _Compute(
            ref,
            operation,
            transform,
            len(pk),
            result,
            with_source=source is not None,
            companion=companion is not None,
            bound=len(bound),
            skip_undecryptable=skip_undecryptable,
        )
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
        # The same within a range: up to its last key, inclusive.
        upto = [sa.bindparam(f"upto_{i}", type_=c.type) for i, c in enumerate(pk)]
        in_range = pk_expr <= (upto[0] if len(pk) == 1 else sa.tuple_(*upto))
        self.page_upto = self.page.where(in_range)
        self.next_page_upto = self.next_page.where(in_range)
        # Called before each batch is written: pause, pacing, a lost lease or a cancelled job
        # (set by the worker running this sweep; see workers.py).
        self.gate: Callable[[], None] = lambda: None
        self.paced: Callable[[int, float], None] = lambda rows, seconds: None
        self.claim: Claim | None = None
        self.owner = ""
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
        # where a reader on a second connection can hold up the writer's commit), while
        # ``read_ahead()`` says so, asked before each page: a worker reads ahead only while its
        # machine has a core for each worker there (workers.py); past that the two extra
        # threads only take turns on the same cores, costing CPU per row and throughput.
        self.pipelined = engine.dialect.name != "sqlite"
        self.read_ahead: Callable[[], bool] = lambda: True
        self.checkpoint = checkpoint_statement(ref)
        self.pg_update = (
            _PgUpdate(engine, t, pk, col, source, companion, self.checkpoint)
            if engine.dialect.name == "postgresql"
            else None
        )

    def sweep(
        self,
        claim: Claim,
        owner: str,
        next_claim: Callable[[], Claim | None] | None = None,
        range_done: Callable[[Claim], None] | None = None,
    ) -> None:
        """Every row to do in the range ``claim`` holds, after its checkpoint; then, while
        ``next_claim`` gives one, in the next range, each ended by ``range_done``.

        ``next_claim`` is called as soon as the last page of a range is read, while that
        range's last batches are still computed and written (the read-ahead runs on across
        ranges instead of draining at each one's end); ``range_done(claim)`` is called once
        every batch of that range is committed, before any batch of the next one is.

        Reading ahead takes two more threads; ``read_ahead()`` is asked before each page is
        read: once it says no, the sweep drains what it read and goes on in this thread alone,
        from the last batch it committed; from one batch after the other, it returns at a
        range's end when ``read_ahead()`` says yes again (the worker's next sweep reads ahead).
        """
        self.owner = owner
        following: Claim | None = claim
        if self.pipelined and self.read_ahead():
            following = self._sweep_reading_ahead(claim, next_claim, range_done)
        while following is not None:
            self._sweep_one(following)
            if range_done is not None:
                range_done(following)
            if next_claim is None or (self.pipelined and self.read_ahead()):
                return
            following = next_claim()

    def _sweep_reading_ahead(
        self,
        claim: Claim,
        next_claim: Callable[[], Claim | None] | None,
        range_done: Callable[[Claim], None] | None,
    ) -> Claim | None:
        """:meth:`sweep` with read-ahead; returns where to go on without it (None: done)."""
        # Three stages: a thread fetches the next pages (keyset paging needs only the last key
        # of the page before) and, at a range's end, claims the next range; a thread decrypts
        # and encrypts them (holding the GIL); and this thread writes and commits (the driver
        # releases the GIL while the database works). Fetching ahead keeps the computing
        # thread from waiting for the database; at most four pages are in memory. Batches are
        # disjoint key ranges, every write is compare-and-swap and commits with its own
        # range's checkpoint, and a range is finished only after its last batch committed, so
        # the overlap changes nothing.
        pages: queue.Queue[Any] = queue.Queue(maxsize=1)
        stop = threading.Event()
        # After a range's last page: (claim, END); where reading ahead stops within a range:
        # (claim, SWITCH); after the last item: None.
        END, SWITCH = object(), object()

        def hand_over(item: Any) -> None:
            while not stop.is_set():
                try:
                    pages.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def fetch_all(claim: Claim | None) -> None:
            try:
                while claim is not None and not stop.is_set():
                    last = claim.start
                    while not stop.is_set():
                        if not self.read_ahead():
                            hand_over((claim, SWITCH))
                            hand_over(None)
                            return
                        rows = self._fetch(claim, last)
                        if not rows:
                            break
                        hand_over((claim, rows))
                        last = tuple(rows[-1][: len(self.pk)])
                    hand_over((claim, END))
                    if stop.is_set() or next_claim is None or not self.read_ahead():
                        break
                    claim = next_claim()
                hand_over(None)
            except BaseException as exc:  # handed to this thread, which raises it
                hand_over(exc)

        resume: Claim | None = None
        with ThreadPoolExecutor(2, thread_name_prefix="kms-field") as pool:
            pool.submit(fetch_all, claim)
            # In order: batches computing or computed, and range ends. The newest stays in
            # flight while the one before is written (or its range finished).
            ahead: collections.deque[tuple[Claim, Any]] = collections.deque()
            written: Claim | None = None  # the range of the last batch committed, from there
            try:
                while True:
                    started = time.monotonic()
                    item = pages.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is not None:
                        held, rows = item
                        marker = rows is END or rows is SWITCH
                        ahead.append((held, rows if marker else pool.submit(self._compute, rows)))
                    while ahead and (len(ahead) > 1 or item is None):
                        held, computing = ahead.popleft()
                        if computing is END:
                            if range_done is not None:
                                range_done(held)
                            continue
                        if computing is SWITCH:
                            # Resume after this range's last batch committed here, if any.
                            resume = (
                                written if written and written.range_no == held.range_no else held
                            )
                            continue
                        batch = computing.result()
                        self._commit(batch, held)
                        written = Claim(held.range_no, batch.last, held.upto)
                        self._pace(batch, started)
                    if item is None:
                        return resume
            finally:
                stop.set()

    def _sweep_one(self, claim: Claim) -> None:
        """One range, one batch after the other (SQLite, which must not read on a second
        connection, or a worker not reading ahead)."""
        last = claim.start
        while True:
            started = time.monotonic()
            rows = self._fetch(claim, last)
            if not rows:
                return
            batch = self._compute(rows)
            self._commit(batch, claim)
            self._pace(batch, started)
            last = batch.last

    def _pace(self, batch: _Batch, started: float) -> None:
        if self.rate:
            time.sleep(max(0.0, batch.count / self.rate - (time.monotonic() - started)))

    def _fetch(self, claim: Claim, last: tuple[Any, ...] | None) -> Sequence[Any]:
        """The next page of rows to do in ``claim``'s range after ``last`` (empty: none)."""
        page, params = self.page, {}
        if last is not None:
            page, params = self.next_page, {f"last_{i}": v for i, v in enumerate(last)}
        upto = claim.upto
        if upto is not None:
            page = self.page_upto if last is None else self.next_page_upto
            params.update({f"upto_{i}": v for i, v in enumerate(upto)})

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

    def _commit(self, batch: _Batch, claim: Claim) -> None:
        """Write a batch and its checkpoint on ``claim``'s range in one transaction."""
        self.claim = claim  # the range written now (a worker's gate checks its lease)
        self.gate()
        checkpoint = {
            "last_key": _dump_key(batch.last),
            "n": len(batch.rows),
            "s": batch.skipped,
            "now": _now(),
            "cp_range": claim.range_no,
            "cp_owner": self.owner,
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
                    if conn.execute(self.checkpoint, checkpoint).rowcount != 1:
                        # Another worker holds the range now: roll this batch back.
                        raise LeaseLost(f"range {checkpoint['cp_range']} of {self.ref}")
                return written

        started = time.monotonic()
        written = self._retrying(write)
        self.paced(batch.count, time.monotonic() - started)
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


def _bound_text(column: sa.Column[Any]) -> sa.ColumnElement[str]:
    """A bound column as text, exactly as the column types read it (row_binding)."""
    return sa.func.coalesce(sa.cast(column, sa.String()), "")

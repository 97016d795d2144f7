"""The public entry points: check the arguments, build the transform, run sweeps until the
census finds no row left, wait out ``active_ttl``, and record the job finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import census, envelope
from ..blind_index import BlindIndex
from ..census import ColumnRef
from ..envelope import DataKey
from ..exc import ConfigurationError, ReencryptionError
from ..key_store import ACTIVE_TTL_MARGIN
from ..registry import KeyRegistry, get_registry
from . import control, ranges
from .pacing import Pacing
from .ranges import Claim
from .records import JobResult, Operation, _finish, _job_where, jobs_table
from .sweep import ProgressCallback, _bound_text, _Job
from .tables import FINISH
from .transform import _check_format_options, _Reindex, _Transform, _WithIndex
from .workers import Worker, add_rows_done, run_workers, worker_name

log = logging.getLogger(__name__)
# The waits for other processes (active_ttl): shown by the command line and Alembic runs even
# when the rest of the library's INFO is not.
WAIT_LOG = logging.getLogger("sqlalchemy_kms_field.waits")


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
    workers: int = 1,
    join: bool = False,
    lease_seconds: float = 30.0,
    heartbeat_seconds: float | None = None,
    range_rows: int | None = None,
    pacing: Pacing | None = None,
    on_start: Callable[[], None] | None = None,
    run_id: str | None = None,
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
    30 seconds). ``skip_undecryptable`` records rows that fail to decrypt instead of stopping
    (one warning at the end gives their count and the first few).

    Workers: the job is split into primary-key ranges of about ``range_rows`` rows (default 50
    batches) recorded in the database. ``workers`` runs that many workers in threads of this
    process; ``join=True`` adds this process's workers to the job already under way on the
    column (another process or machine). Each worker holds its range under a lease of
    ``lease_seconds``, renewed every ``heartbeat_seconds`` (default a third of the lease, at
    most 5 s): a worker killed leaves its range to be resumed once the lease has passed.
    Without ``join``, a job already running on the column (live workers) is refused
    (:class:`JobConflictError`). The call returns once the job is finished (by whichever
    worker took the finishing step). SQLite: one worker per job. ``pacing`` (a
    :class:`~sqlalchemy_kms_field.reencrypt.pacing.Pacing`) holds workers back while the
    database's replication lag or batch latency is above a bound. ``on_start`` is called once
    the job is started (others can join it from then on). ``workers=0`` only starts (or
    resumes) the job and returns: ``result.run_id`` names the run, which ``join=True`` with
    ``run_id=`` then joins only while it lasts (:class:`RunOver` once it is over).
    """
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    _check_worker_options(engine, workers, join, lease_seconds, range_rows)
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
    if operation != "reindex" and not join:  # checked once, when the job starts
        _refuse_tenant_values(engine, col, ref, operation)
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
        for name in transform.bound:
            if name not in t.c:
                raise ConfigurationError(
                    f"reindex of {ref}: table {t.fullname!r} has no column {name!r}, which the "
                    "source values or the index are bound to"
                )
        bound = [t.c[name] for name in transform.bound]
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
    if companion is not None and index is not None:
        with engine.begin() as conn:
            census.record_column(conn, ColumnRef(table, companion.name, index.key, schema))
    worker_names = [worker_name() for _ in range(workers)]
    run = control.start(
        engine,
        ref,
        operation,
        result.target_version,
        join=join,
        workers=worker_names,
        lease=lease_seconds,
        t=t,
        pk=pk,
        range_rows=range_rows or 50 * batch_size,
        run_id=run_id if join else None,
    )
    result.run_id = run.run_id
    if workers == 0:
        if on_start is not None:
            on_start()
        return result

    if on_start is not None:
        on_start()  # the job exists now: others may join it

    def new_job(result: JobResult) -> _Job:
        return _Job(
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

    def finish(worker: Worker, claim: Claim) -> None:
        """The finishing step, once per job: the census, and sweeps until it finds no row
        left (rows written meanwhile under an old version, conflicts, skipped rows)."""
        job, result = worker.job, worker.job.result
        result.sweeps += 1  # the ranges were the first pass over the table
        deadline, swept = None, False
        while True:
            with engine.connect() as conn:
                left = _count(conn, t, pending) - len(job._compute.skipped_set)
            result.remaining = max(left, 0)
            if left <= 0:
                # A clean census proves nothing while a process may still write under the old
                # version (up to active_ttl after the rotation): wait that out, count again.
                if operation == "reencrypt" and target is not None and wait_for_processes:
                    if _wait_until_every_process_knows(registry, key, target.version, "writes"):
                        continue
                break
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
            if swept:
                log.info("%s of %s: %d rows left, sweeping again", operation, ref, left)
                time.sleep(min(1.0, settle_timeout / 10))
            result.sweeps += 1
            job.sweep(claim, worker.id)  # the whole table, after the step's own checkpoint
            claim, swept = Claim(FINISH, None, None), True
        worker.gate()  # not if it was cancelled meanwhile
        with engine.begin() as conn:
            last = ranges.finish(conn, ref, FINISH, worker.id)
            add_rows_done(conn, ref, operation, last)
            _finish(conn, ref, operation, skipped=len(job._compute.skipped_set))
            control.close(conn, run)
        result.finished = True

    beat = heartbeat_seconds or max(min(lease_seconds / 3, 5.0), 0.05)
    crew = [
        Worker(
            engine,
            run,
            new_job(JobResult(ref, operation, version, dry_run=False)),
            finish,
            name=name,
            lease=lease_seconds,
            heartbeat=beat,
            pace=pacing.gate(engine) if pacing is not None else None,
        )
        for name in worker_names
    ]
    try:
        outcomes = run_workers(crew) if len(crew) > 1 else [_one(crew[0])]
    finally:
        for worker in crew:
            worker.job._compute.log_skipped()  # one line for all rows skipped, not one each
    for worker in crew:
        r = worker.job.result
        result.rows_written += r.rows_written
        result.rows_conflicted += r.rows_conflicted
        result.sweeps += r.sweeps
        result.skipped += r.skipped
        result.remaining = max(result.remaining, r.remaining)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    result.finished = any(outcomes) or _finished(engine, ref, operation)
    log.info(
        "%s of %s %s: %d rows written by %d worker%s here, %d conflicts, %d skipped",
        operation,
        ref,
        "finished" if result.finished else "left to other workers",
        result.rows_written,
        len(crew),
        "s" if len(crew) > 1 else "",
        result.rows_conflicted,
        len(result.skipped),
    )
    return result


def _check_worker_options(
    engine: Engine, workers: int, join: bool, lease: float, range_rows: int | None
) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigurationError(f"workers={workers!r}: use a whole number, 0 or more")
    if workers == 0 and join:
        raise ConfigurationError("workers=0 only starts the job: it cannot join one")
    if not lease > 0:
        raise ConfigurationError(f"lease_seconds={lease!r}: use a number of seconds above 0")
    if range_rows is not None and range_rows < 1:
        raise ConfigurationError(f"range_rows={range_rows!r}: use a whole number, 1 or more")
    if engine.dialect.name == "sqlite" and (workers > 1 or join):
        raise ConfigurationError(
            "SQLite runs one worker per job (it has no row locks to share ranges with, and "
            "serializes writers anyway): use workers=1 without join (CLI: no --workers or "
            "--join), or PostgreSQL or MariaDB for parallel workers"
        )


def _one(worker: Worker) -> bool:
    return worker.run()


def _finished(engine: Engine, ref: ColumnRef, operation: Operation) -> bool:
    with engine.connect() as conn:
        row = conn.execute(sa.select(jobs_table).where(*_job_where(ref, operation))).first()
    return row is not None and row.finished_at is not None


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


def _refuse_tenant_values(
    engine: Engine, col: sa.Column[Any], ref: ColumnRef, operation: Operation
) -> None:
    """A column declared with ``tenant=`` holds values under one key per tenant (headers
    ``kf2:<key>.t.<tenant>:`` or ``kf2:<key>.h.<hash>:``): a column job knows one data key per
    column, so it would find nothing to do (decrypt) or stop at the first row. Refuse up front."""
    from ..tenant_census import is_tenant_value
    from ..tenants import TABLE_NAME, tenant_table

    if census.is_binary(col):
        return  # tenant keys are for text columns (EncryptedBytes refuses tenant=)
    key = ref.key
    tenant_keys = tenant_table(sa.MetaData())
    under_tenant_keys = is_tenant_value(col, key)
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(TABLE_NAME):
            return
        # The column is scanned only if data key `key` has tenant keys at all (an index lookup):
        # a job on a billion rows of an ordinary column does not pay a scan for this check.
        has_tenants = sa.select(tenant_keys.c.version).where(tenant_keys.c.base == key).limit(1)
        if conn.execute(has_tenants).first() is None:
            return
        found = conn.execute(sa.select(sa.literal(1)).where(under_tenant_keys).limit(1)).first()
    if found is not None:
        raise ConfigurationError(
            f"{ref} holds values under tenant keys of data key {key!r} (a column declared "
            f"with tenant=); {operation} works with one data key per column. Rotate the "
            f"tenants' keys and move their rows with kms-field tenants rotate {key} --all "
            "(Python: sqlalchemy_kms_field.tenant_rotation.reencrypt_tenants)"
        )


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

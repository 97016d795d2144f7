"""Celery tasks for re-encryption: fan a job out over the workers and broker a team already runs.

Optional (``pip install sqlalchemy-kms-field[celery]``). Nothing here schedules anything:
:func:`enqueue_job` starts the job (plans its ranges in the database) and sends N tasks; each
task runs one worker's claim loop (:func:`~sqlalchemy_kms_field.reencrypt.run_job` joining
that run), and the job's ranges do the rest. A Celery worker killed mid-way
leaves its range to the other tasks once its lease has passed; enqueue again to add workers or
to resume a job whose tasks all died.

::

    # in the Celery app's module, after kf.configure(...) (the key store's engine is used)
    from sqlalchemy_kms_field.celery import install, enqueue_job
    install(app)

    # anywhere with the same broker (no key, no database URL travels through it):
    enqueue_job(app, "users", "email", key="pii", workers=8, batch_size=2000)

The worker processes must be configured (``kf.configure``) like the application: the task
uses the configured registry and its key store's engine. A reindex needs the column's
``BlindIndex``, which only the models know: ``install(app, metadata=Base.metadata)`` in the
worker, and ``enqueue_job(app, "users", "email_index", operation="reindex",
metadata=Base.metadata, workers=8)`` (the index key comes from the model).
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import Engine

from .blind_index import BlindIndex
from .census import declared_column
from .exc import ConfigurationError
from .reencrypt import RunOver, run_job
from .registry import KeyRegistry, get_registry

log = logging.getLogger(__name__)

TASK_NAME = "sqlalchemy_kms_field.run_worker"

# What a task may be told (JSON-serializable; never a key, a value or a URL).
_OPTIONS = {
    "schema",
    "batch_size",
    "rows_per_second",
    "skip_undecryptable",
    "lease_seconds",
    "heartbeat_seconds",
    "range_rows",
    "context",
    "codec",
    "pad",
    "bind_to",
    "settle_timeout",
}
_OPERATIONS = ("reencrypt", "encrypt", "decrypt", "reindex")


def run_worker(
    table: str,
    column: str,
    *,
    key: str,
    run_id: str,
    operation: str = "reencrypt",
    metadata: sa.MetaData | None = None,
    **options: Any,
) -> dict[str, Any]:
    """One worker of run ``run_id`` of the job on ``table.column``; returns what it did once
    the job is finished. A task delivered again after the run is over does nothing.
    ``metadata``: the models, for a reindex (given to :func:`install`, not sent)."""
    _check(operation, options)
    index = None
    if operation == "reindex":
        index = _index(
            metadata, table, column, options.get("schema"), where="install(app, metadata=...)"
        )
    registry = get_registry()
    try:
        result = run_job(
            registry.key_store.engine,
            table,
            column,
            key=key,
            operation=operation,  # type: ignore[arg-type]
            registry=registry,
            join=True,
            run_id=run_id,
            index=index,
            **options,
        )
    except RunOver:  # delivered again (brokers deliver at least once), or enqueued late
        log.info("%s.%s: run %s is over; nothing to do", table, column, run_id)
        return {"run_id": run_id, "over": True}
    return {
        "run_id": run_id,
        "finished": result.finished,
        "rows_written": result.rows_written,
        "rows_conflicted": result.rows_conflicted,
        "skipped": len(result.skipped),
    }


def _check(operation: str, options: dict[str, Any]) -> None:
    if operation not in _OPERATIONS:
        raise ConfigurationError(
            f"operation={operation!r}: a Celery task runs {', '.join(_OPERATIONS)}"
        )
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigurationError(
            f"{', '.join(sorted(unknown))}: not an option of a Celery re-encryption task; use "
            f"{', '.join(sorted(_OPTIONS))}"
        )


def _index(
    metadata: sa.MetaData | None, table: str, column: str, schema: str | None, where: str
) -> BlindIndex:
    """For a reindex: the BlindIndex the models declare ``table.column`` with."""
    if metadata is None:
        raise ConfigurationError(
            f"a reindex of {table}.{column} needs the models' BlindIndex: pass {where} "
            "(the MetaData that declares the column)"
        )
    declared = declared_column(metadata, table, column, schema)
    if declared is None or not isinstance(declared.type, BlindIndex):
        raise ConfigurationError(
            f"{table}.{column}: the metadata given to {where.partition('(')[0]} declares no "
            "BlindIndex column of that name (reindex the index column, not its source)"
        )
    return declared.type


def install(app: Celery, *, metadata: sa.MetaData | None = None) -> Any:
    """Register the worker task on ``app`` (under :data:`TASK_NAME`); returns the task.
    ``metadata``: the models (``Base.metadata``), which a reindex task needs."""

    def task(table: str, column: str, **kwargs: Any) -> dict[str, Any]:
        return run_worker(table, column, metadata=metadata, **kwargs)

    # Not acks_late: a task lost with its worker is not run again; its range is reclaimed by
    # the other tasks once the lease passes (enqueue again to add workers).
    return app.task(name=TASK_NAME, acks_late=False)(task)


def enqueue_job(
    app: Celery,
    table: str,
    column: str,
    *,
    key: str | None = None,
    workers: int,
    operation: str = "reencrypt",
    queue: str | None = None,
    engine: Engine | None = None,
    registry: KeyRegistry | None = None,
    metadata: sa.MetaData | None = None,
    **options: Any,
) -> list[Any]:
    """Start (or resume) the job on ``table.column`` here, then send ``workers`` tasks that run
    it together; returns their AsyncResults.

    The job's ranges are planned here, with the configured registry (or ``registry``) and its
    key store's engine (or ``engine``); the tasks carry the run's id, so a task delivered again
    after the run is over does nothing. Enqueue again to add workers, or to resume a job
    whose tasks all died. A reindex takes ``metadata`` (the models: the column's BlindIndex
    gives the index key) instead of ``key``; the workers need it too (:func:`install`).
    """
    _check(operation, options)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigurationError(f"workers={workers!r}: use a whole number, 1 or more")
    index = None
    if operation == "reindex":
        index = _index(
            metadata, table, column, options.get("schema"), where="enqueue_job(metadata=...)"
        )
        if key is not None and key != index.key:
            raise ConfigurationError(
                f"key={key!r}: {table}.{column} is indexed under {index.key!r}; drop key="
            )
        key = index.key
    elif key is None:
        raise ConfigurationError(f"{operation} of {table}.{column} needs key= (the data key)")
    registry = registry or get_registry()
    engine = engine or registry.key_store.engine
    started = run_job(
        engine, table, column, key=key, operation=operation,  # type: ignore[arg-type]
        registry=registry, workers=0, index=index, **options,
    )  # fmt: skip
    kwargs = {"key": key, "operation": operation, "run_id": started.run_id, **options}
    sent = {"queue": queue} if queue else {}
    return [
        app.send_task(TASK_NAME, args=(table, column), kwargs=kwargs, **sent)
        for _ in range(workers)
    ]

"""Job control: one job per column at a time, joined by more workers, paused, resumed,
cancelled; a column forgotten; what every worker is doing.

A job is named by its column (``users.email``): at most one job runs on a column at a time.
Starting a second one while the first has live workers is refused (join it instead); a job
whose workers all died is resumed by the next start. Workers read the control row with every
heartbeat, so pause, resume and cancel reach every worker within one heartbeat.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import census
from ..census import ColumnRef
from ..exc import ConfigurationError, ReencryptionError
from . import ranges
from .records import Operation, _job_where, _start, jobs_table
from .tables import (
    FINISH,
    control_table,
    create_tables,
    db_now,
    place,
    place_values,
    ranges_table,
    workers_table,
)

log = logging.getLogger(__name__)


class JobConflictError(ReencryptionError):
    """Another job is under way on this column (join it, wait for it, or cancel it)."""


class RunOver(JobConflictError):
    """A worker was sent to join a run of a job that has since finished or been cancelled."""


class JobCancelled(ReencryptionError):
    """The job was cancelled (``kms-field jobs cancel``) while this worker ran."""


@dataclass(frozen=True)
class Run:
    """One job under way on a column: what workers need to find their ranges."""

    ref: ColumnRef
    operation: Operation
    run_id: str
    ranges: int  # planned (the finishing step not counted)


def _where(table: sa.Table, ref: ColumnRef) -> list[Any]:
    return place(table, ref.schema, ref.table, ref.column)


def live_workers(conn: Connection, ref: ColumnRef, run_id: str, lease: float) -> list[str]:
    """Workers of the run whose heartbeat is more recent than ``lease`` seconds, and that are
    not known dead: a worker of this host whose process is gone is dead at once (a rerun after
    a kill need not wait for its lease). The dead ones' rows go and their ranges are freed."""
    w = workers_table.c
    since = db_now(conn) - timedelta(seconds=lease)
    live, dead = [], []
    for row in conn.execute(sa.select(w.worker, w.heartbeat_at).where(*_where(workers_table, ref))):
        if row.heartbeat_at >= since and not _gone(row.worker):
            live.append(row.worker)
        else:
            dead.append(row.worker)
    if dead:
        r = ranges_table.c
        conn.execute(
            sa.update(ranges_table)
            .where(*_where(ranges_table, ref), r.owner.in_(dead), r.finished_at.is_(None))
            .values(owner=None, lease_until=None)
        )
        conn.execute(
            sa.delete(workers_table).where(*_where(workers_table, ref), w.worker.in_(dead))
        )
    return [name for name in live if _run_of(conn, ref, name) == run_id]


def workers_here(conn: Connection, ref: ColumnRef, run_id: str) -> int:
    """How many workers of the run run on this machine (threads of this process included;
    those of a process that is gone not counted)."""
    w = workers_table.c
    q = sa.select(w.worker).where(*_where(workers_table, ref), w.run_id == run_id)
    names = conn.execute(q).scalars()
    return sum(1 for name in names if name.partition(":")[0] == this_host() and not _gone(name))


def this_host() -> str:
    """The host part of the workers' names (``host:pid:random``)."""
    return socket.gethostname()[:60]


def _run_of(conn: Connection, ref: ColumnRef, worker: str) -> str | None:
    w = workers_table.c
    q = sa.select(w.run_id).where(*_where(workers_table, ref), w.worker == worker)
    return conn.execute(q).scalar_one_or_none()


def _gone(worker: str) -> bool:
    """True if ``worker`` (``host:pid:...``) ran on this host in a process that no longer is."""
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    if host != this_host() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # this process: its workers are threads, alive or signed off
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def start(
    engine: Engine,
    ref: ColumnRef,
    operation: Operation,
    target: int | None,
    *,
    join: bool,
    workers: list[str],
    lease: float,
    t: sa.Table,
    pk: list[sa.Column[Any]],
    range_rows: int,
    run_id: str | None = None,
) -> Run:
    """Start the job, resume it, or join it (``join``); register ``workers`` in the same step.

    Refuses a second job on a column whose job has live workers, unless ``join`` names the
    same job (same operation, same target version).
    """
    census.create_tables(engine)
    create_tables(engine)
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                return _start_locked(
                    conn, ref, operation, target, join, workers, lease, t, pk, range_rows, run_id
                )
        except sa.exc.IntegrityError:  # two starts inserted the control row at once
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_locked(
    conn: Connection,
    ref: ColumnRef,
    operation: Operation,
    target: int | None,
    join: bool,
    workers: list[str],
    lease: float,
    t: sa.Table,
    pk: list[sa.Column[Any]],
    range_rows: int,
    run_id: str | None,
) -> Run:
    q = sa.select(control_table).where(*_where(control_table, ref))
    if conn.dialect.name != "sqlite":
        q = q.with_for_update()  # starts and joins of one column, one at a time
    ctl = conn.execute(q).first()
    live = live_workers(conn, ref, ctl.run_id, lease) if ctl is not None else []
    job = conn.execute(sa.select(jobs_table).where(*_job_where(ref, operation))).first()
    running = job is not None and job.finished_at is None
    if live and ctl is not None and (not join or ctl.operation != operation):
        how = (
            "join it with --join (join=True), wait for it to finish, or cancel it with "
            f"`kms-field jobs cancel {ref}`"
            if ctl.operation == operation
            else f"wait for it to finish, or cancel it with `kms-field jobs cancel {ref}`"
        )
        raise JobConflictError(
            f"a {ctl.operation} job is already running on {ref} ({len(live)} live worker"
            f"{'s' if len(live) != 1 else ''}): {how}",
            table=ref.table,
            column=ref.column,
        )
    if join and run_id is not None and (ctl is None or ctl.run_id != run_id):
        raise RunOver(
            f"the {operation} run {run_id} of {ref} is over (finished or cancelled)",
            table=ref.table,
            column=ref.column,
        )
    if join and (ctl is None or ctl.operation != operation or not running):
        raise JobConflictError(
            f"no {operation} job of {ref} is under way to join: start it without --join "
            "(join=False)",
            table=ref.table,
            column=ref.column,
        )
    if join and job is not None and job.target_version != target:
        raise JobConflictError(
            f"the {operation} job of {ref} moves rows to version {job.target_version}, not "
            f"{target}: join it with the same key store, or wait for it to finish",
            table=ref.table,
            column=ref.column,
        )
    resumed, after = _start(conn, ref, operation, target)
    now = db_now(conn)
    if resumed and ctl is not None and ctl.operation == operation and _has_ranges(conn, ref, ctl):
        run = Run(ref, operation, ctl.run_id, _count_ranges(conn, ref, ctl.run_id))
        if not join:
            log.info("%s of %s: resuming its unfinished ranges", operation, ref)
    else:
        # A new run: the ranges of any earlier one go (its job row says what it did).
        run_id = secrets.token_hex(8)  # (a join never gets here)
        for table in (ranges_table, workers_table, control_table):
            conn.execute(sa.delete(table).where(*_where(table, ref)))
        conn.execute(
            sa.insert(control_table).values(
                **place_values(ref.schema, ref.table, ref.column),
                operation=operation,
                run_id=run_id,
                paused=False,
                started_at=now,
            )
        )
        count = ranges.plan(conn, ref, run_id, t, pk, range_rows, after)
        run = Run(ref, operation, run_id, count)
    for worker in workers:
        register(conn, run, worker, now)
    return run


def _has_ranges(conn: Connection, ref: ColumnRef, ctl: Any) -> bool:
    return _count_ranges(conn, ref, ctl.run_id) > 0


def _count_ranges(conn: Connection, ref: ColumnRef, run_id: str) -> int:
    r = ranges_table.c
    q = sa.select(sa.func.count()).where(
        *_where(ranges_table, ref), r.run_id == run_id, r.range_no != FINISH
    )
    return int(conn.execute(q).scalar_one())


def register(conn: Connection, run: Run, worker: str, now: datetime) -> None:
    conn.execute(sa.delete(workers_table).where(*_where(workers_table, run.ref), _me(worker)))
    conn.execute(
        sa.insert(workers_table).values(
            **place_values(run.ref.schema, run.ref.table, run.ref.column),
            worker=worker,
            run_id=run.run_id,
            range_no=None,
            rows_done=0,
            rate=0.0,
            state="starting",
            started_at=now,
            heartbeat_at=now,
        )
    )


def _me(worker: str) -> Any:
    return workers_table.c.worker == worker


@dataclass
class Beat:
    """What a heartbeat learnt: whether the job is paused or gone, and the lease kept."""

    paused: bool
    ended: bool
    lease_kept: bool
    lost: tuple[int, ...] = ()  # of the ranges ``also`` named, those whose lease was not kept


def beat(
    engine: Engine,
    run: Run,
    worker: str,
    *,
    range_no: int | None,
    rows_done: int,
    rate: float,
    state: str,
    lease: float,
    also: Sequence[int] = (),
) -> Beat:
    """A worker's heartbeat: renew its range's lease (and those of the ranges it claimed
    ahead, ``also``), report itself, read pause and cancel."""
    with engine.begin() as conn:
        kept = True
        if range_no is not None:
            kept = ranges.renew(conn, run.ref, range_no, worker, lease)
        lost = tuple(n for n in also if not ranges.renew(conn, run.ref, n, worker, lease))
        conn.execute(
            sa.update(workers_table)
            .where(*_where(workers_table, run.ref), _me(worker))
            .values(
                heartbeat_at=db_now(conn),
                range_no=range_no,
                rows_done=rows_done,
                rate=rate,
                state=state,
            )
        )
        ctl = conn.execute(sa.select(control_table).where(*_where(control_table, run.ref))).first()
    ended = ctl is None or ctl.run_id != run.run_id
    return Beat(paused=bool(ctl and ctl.paused), ended=ended, lease_kept=kept, lost=lost)


def ended(engine: Engine, run: Run) -> bool:
    """True once the run is over: finished (by any worker) or cancelled."""
    with engine.connect() as conn:
        ctl = conn.execute(sa.select(control_table).where(*_where(control_table, run.ref))).first()
    return ctl is None or ctl.run_id != run.run_id


def close(conn: Connection, run: Run) -> None:
    """The run is over (finished): its control and worker rows go. Its ranges stay (each with
    when it finished, and its rows) until the next job of the column starts."""
    for table in (control_table, workers_table):
        conn.execute(sa.delete(table).where(*_where(table, run.ref)))


def leave(engine: Engine, run: Run, worker: str) -> None:
    """A worker stops: its row goes and the range it held (if any) is free at once."""
    r = ranges_table.c
    with engine.begin() as conn:
        conn.execute(
            sa.update(ranges_table)
            .where(*_where(ranges_table, run.ref), r.owner == worker, r.finished_at.is_(None))
            .values(owner=None, lease_until=None)
        )
        conn.execute(sa.delete(workers_table).where(*_where(workers_table, run.ref), _me(worker)))


# Commands ------------------------------------------------------------------------------------


def _column(engine: Engine, table: str, column: str, schema: str | None) -> ColumnRef:
    return ColumnRef(table, column, "", schema)


def set_paused(
    engine: Engine, table: str, column: str, paused: bool, *, schema: str | None = None
) -> str:
    """Pause (or resume) the job of ``table.column``; every worker sees it within a heartbeat.

    Returns the job's operation. A paused worker keeps its range and renews its lease.
    """
    ref = _column(engine, table, column, schema)
    create_tables(engine)
    with engine.begin() as conn:
        ctl = conn.execute(sa.select(control_table).where(*_where(control_table, ref))).first()
        if ctl is None:
            raise ConfigurationError(f"no job is under way on {ref}: nothing to pause or resume")
        conn.execute(
            sa.update(control_table).where(*_where(control_table, ref)).values(paused=paused)
        )
    return str(ctl.operation)


def cancel(engine: Engine, table: str, column: str, *, schema: str | None = None) -> list[str]:
    """Cancel every unfinished job of ``table.column``; returns the operations cancelled.

    Its workers stop within a heartbeat, after their batch in flight (committed or not, every
    row stays readable). Rows already rewritten stay so: a cancelled encrypt-column leaves
    ciphertext that ``decrypt-column`` takes back out. The job no longer blocks key rotation.
    """
    ref = _column(engine, table, column, schema)
    census.create_tables(engine)
    create_tables(engine)
    with engine.begin() as conn:
        j = jobs_table.c
        gone = (
            conn.execute(
                sa.select(j.operation).where(
                    j.table_schema == (schema or ""),
                    j.table_name == table,
                    j.column_name == column,
                    j.finished_at.is_(None),
                )
            )
            .scalars()
            .all()
        )
        ctl = conn.execute(sa.select(control_table).where(*_where(control_table, ref))).first()
        if not gone and ctl is None:
            raise ConfigurationError(f"no unfinished job on {ref}: nothing to cancel")
        conn.execute(
            sa.delete(jobs_table).where(
                j.table_schema == (schema or ""),
                j.table_name == table,
                j.column_name == column,
                j.finished_at.is_(None),
            )
        )
        for t in (control_table, ranges_table, workers_table):
            conn.execute(sa.delete(t).where(*_where(t, ref)))
    return sorted({str(op) for op in gone} | ({str(ctl.operation)} if ctl else set()))


def forget(
    engine: Engine, table: str, column: str, *, schema: str | None = None, force: bool = False
) -> str:
    """Remove ``table.column`` from the known encrypted columns (``kms_field_columns``).

    Refused while a job runs on it, and while any of its values still carries a header of
    the key recorded for it (it would then protect a key version that rows still need), unless
    ``force``. Returns the data key name it was known under.
    """
    ref = _column(engine, table, column, schema)
    census.create_tables(engine)
    create_tables(engine)
    c = census.columns_table.c
    at = [c.table_schema == (schema or ""), c.table_name == table, c.column_name == column]
    with engine.begin() as conn:
        row = conn.execute(sa.select(census.columns_table).where(*at)).first()
        if row is None:
            raise ConfigurationError(f"{ref} is not a known encrypted column: nothing to forget")
        if conn.execute(sa.select(control_table).where(*_where(control_table, ref))).first():
            raise ConfigurationError(
                f"a job is under way on {ref}: cancel it first (`kms-field jobs cancel {ref}`)"
            )
        known = ColumnRef(table, column, row.key_name, schema)
        if not force:
            left = _values_of_key(conn, known)
            if left:
                raise ConfigurationError(
                    f"{left:,} values of {ref} are still ciphertext of data key "
                    f"{row.key_name!r}: decrypt the column first (`kms-field decrypt-column "
                    f"{ref} --key {row.key_name}`), or pass --force if they are not needed"
                )
        conn.execute(sa.delete(census.columns_table).where(*at))
        j = jobs_table.c
        conn.execute(
            sa.delete(jobs_table).where(
                j.table_schema == (schema or ""),
                j.table_name == table,
                j.column_name == column,
                j.finished_at.is_(None),
            )
        )
    return str(row.key_name)


def _values_of_key(conn: Connection, ref: ColumnRef) -> int:
    """Values of ``ref`` carrying a header of its data key (any format, any version)."""
    try:
        t = census.reflect(conn, ref.table, ref.schema)
    except ConfigurationError:
        return 0  # the table is gone: nothing left to protect
    if ref.column not in t.c:
        return 0
    col = t.c[ref.column]
    binary = census.is_binary(col)
    heads = [f"{fmt}:{ref.key}:" for fmt in census.FORMATS]
    ours = sa.or_(*(census.starts_with(col, h.encode() if binary else h) for h in heads))
    return int(conn.execute(sa.select(sa.func.count()).select_from(t).where(ours)).scalar_one())


# Status --------------------------------------------------------------------------------------


@dataclass
class WorkerStatus:
    worker: str
    state: str
    range_no: int | None
    rows_done: int
    rate: float
    heartbeat_age: float  # seconds since its last heartbeat
    alive: bool


@dataclass
class JobStatus:
    column: ColumnRef
    operation: str
    paused: bool
    ranges: int
    ranges_finished: int
    rows_done: int
    rows_left: int  # at most (planned rows of the unfinished ranges, less what they did)
    rate: float  # rows per second, every live worker together
    workers: list[WorkerStatus] = field(default_factory=list)

    @property
    def seconds_left(self) -> float | None:
        return self.rows_left / self.rate if self.rate > 0 else None


def status(engine: Engine, *, lease: float = 30.0) -> list[JobStatus]:
    """Every job under way: its ranges, each worker's range, rate and heartbeat, time left."""
    if not sa.inspect(engine).has_table(control_table.name):
        return []
    out = []
    with engine.connect() as conn:
        now = db_now(conn)
        for ctl in conn.execute(sa.select(control_table)):
            ref = ColumnRef(ctl.table_name, ctl.column_name, "", ctl.table_schema or None)
            r = ranges_table.c
            rows = conn.execute(
                sa.select(ranges_table).where(
                    *_where(ranges_table, ref), r.run_id == ctl.run_id, r.range_no != FINISH
                )
            ).all()
            w = workers_table.c
            workers = []
            for wr in conn.execute(
                sa.select(workers_table)
                .where(*_where(workers_table, ref), w.run_id == ctl.run_id)
                .order_by(w.worker)
            ):
                age = (now - wr.heartbeat_at).total_seconds()
                workers.append(
                    WorkerStatus(
                        wr.worker,
                        wr.state,
                        wr.range_no,
                        int(wr.rows_done),
                        float(wr.rate),
                        age,
                        age <= lease,
                    )
                )
            left = sum(
                max(int(x.rows_planned) - int(x.rows_done), 0) for x in rows if not x.finished_at
            )
            out.append(
                JobStatus(
                    column=ref,
                    operation=ctl.operation,
                    paused=bool(ctl.paused),
                    ranges=len(rows),
                    ranges_finished=sum(1 for x in rows if x.finished_at is not None),
                    rows_done=sum(int(x.rows_done) for x in rows),
                    rows_left=left,
                    rate=sum(x.rate for x in workers if x.alive),
                    workers=workers,
                )
            )
    return out

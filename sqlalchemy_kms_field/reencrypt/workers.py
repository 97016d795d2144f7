"""A worker: claims ranges until none is left, keeps its lease alive with a heartbeat, obeys
pause and cancel, and, if it is the one to take the finishing step, finishes the job.

Any number of workers may run one job: threads of one process (``run_job(workers=N)``),
processes (``kms-field reencrypt ... --workers N``), machines (``--join``), or Celery tasks
(``sqlalchemy_kms_field.celery``). They coordinate through the job's tables only.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..census import ColumnRef
from . import control, ranges
from .control import JobCancelled, Run
from .pacing import Gate
from .ranges import Claim, LeaseLost
from .records import Operation, _job_where, _now, jobs_table
from .sweep import _Job

log = logging.getLogger(__name__)


RECOUNT_SECONDS = 1.0  # how often a worker counts the job's workers on its machine


class _Finished(Exception):
    """The job was finished by another worker while this one waited or held a stale range."""


def worker_name() -> str:
    """``host:pid:random``: unique, and says where to look for a worker that misbehaves."""
    return f"{control.this_host()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """One worker of a run. :meth:`run` returns True if this worker finished the job."""

    def __init__(
        self,
        engine: Engine,
        run: Run,
        job: _Job,
        finish: Callable[[Worker, Claim], None],
        *,
        name: str,
        lease: float,
        heartbeat: float,
        pace: Gate | None = None,
    ) -> None:
        self.engine, self.run_, self.job, self.finish = engine, run, job, finish
        self.id, self.lease, self.heartbeat = name, lease, heartbeat
        self.pace = pace  # pacing by the database's health; may sleep (pacing.py)
        self.range_no: int | None = None
        self.state = "starting"
        self.paused = False
        self.ended = False
        self.lost: set[int] = set()  # ranges whose lease a heartbeat found taken over
        # Ranges claimed ahead (while the one before ends) and not finished yet: their leases
        # are renewed with the heartbeat too. Written by the sweep's threads.
        self.ahead: set[int] = set()
        self._ahead_lock = threading.Lock()
        self._stop = threading.Event()
        job.gate = self.gate
        job.read_ahead = self._read_ahead
        self._reads_ahead, self._counted = True, float("-inf")
        if pace is not None:
            job.paced = pace.after

    # Called by the sweep before each batch is written ------------------------------------

    def gate(self) -> None:
        if self.ended:
            raise self._over()
        writing = self.job.claim  # the range of the batch about to be written, if any
        if writing is not None and writing.range_no in self.lost:
            raise LeaseLost(f"range {writing.range_no} of {self.run_.ref}")
        state = self.state
        while self.paused and not self.ended:
            self.state = "paused"
            time.sleep(min(0.2, self.heartbeat))
        self.state = state
        if self.ended:
            raise self._over()
        if self.pace is not None:
            self.pace.hold(alive=self._alive)

    def _alive(self) -> None:
        if self.ended:
            raise self._over()

    def _over(self) -> Exception:
        """The run ended under this worker: finished by another worker, or cancelled."""
        return _Finished() if self._job_finished() else self._cancelled()

    def _cancelled(self) -> JobCancelled:
        ref = self.run_.ref
        return JobCancelled(
            f"the {self.run_.operation} job of {ref} was cancelled; every row is readable "
            "(rows already rewritten stay so)",
            table=ref.table,
            column=ref.column,
        )

    # The loop ------------------------------------------------------------------------------

    def run(self) -> bool:
        beating = threading.Thread(target=self._beat, name=f"kms-field-heartbeat-{self.id}")
        beating.daemon = True
        beating.start()
        try:
            return self._claim_loop()
        finally:
            self._stop.set()
            beating.join(timeout=5 + self.heartbeat)
            try:
                control.leave(self.engine, self.run_, self.id)
            except Exception:  # the database went away: the heartbeat simply stops
                log.warning("%s: worker %s could not sign off", self.run_.ref, self.id)

    def _claim_loop(self) -> bool:
        ref, run = self.run_.ref, self.run_
        while True:
            try:
                self.gate()
            except _Finished:
                return False
            claim = ranges.claim(self.engine, ref, run.run_id, self.id, self.lease)
            if claim is None:
                if control.ended(self.engine, run):
                    if not self._job_finished():
                        raise self._cancelled()
                    return False
                self.state = "waiting"  # for the last ranges, or for a lease to pass
                time.sleep(min(0.2, self.heartbeat))
                continue
            self.lost.discard(claim.range_no)
            self.range_no = claim.range_no
            try:
                if claim.finishing:
                    self.state = "finishing"
                    self.finish(self, claim)
                    return True
                self.state = "working"
                self.job.sweep(claim, self.id, self._claim_ahead, self._range_done)
            except _Finished:
                return False
            except LeaseLost as lost:
                log.warning(
                    "%s: worker %s lost its lease on %s (another worker resumes it)",
                    ref,
                    self.id,
                    str(lost).partition(" of ")[0],
                )
            finally:
                self.range_no, self.job.claim = None, None
                self._release_ahead()

    def _claim_ahead(self) -> Claim | None:
        """The next range, claimed while the current one's last batches are written (in the
        sweep's reading thread); None if none is free now (or the job is paused or over):
        the claim loop then takes over, which also takes the finishing step."""
        if self.paused or self.ended:
            return None
        claim = ranges.claim(
            self.engine, self.run_.ref, self.run_.run_id, self.id, self.lease, ahead=True
        )
        if claim is not None:
            with self._ahead_lock:
                self.lost.discard(claim.range_no)
                self.ahead.add(claim.range_no)
        return claim

    def _read_ahead(self) -> bool:
        """Read ahead while this machine has a core for each of the job's workers on it.

        One worker reading ahead keeps 1-1.5 cores busy (a thread reads, one computes, one
        writes); where the workers outnumber the cores, the extra threads only take turns on
        them, which costs CPU per row and throughput (README, "Performance"). Asked before
        each page; the workers on this machine are counted at most once a second, so workers
        joining or leaving change the answer within about a second."""
        now = time.monotonic()
        if now >= self._counted + RECOUNT_SECONDS:
            with self.engine.connect() as conn:
                here = control.workers_here(conn, self.run_.ref, self.run_.run_id)
            self._reads_ahead, self._counted = here <= _cores(), now
        return self._reads_ahead

    def _range_done(self, claim: Claim) -> None:
        """Every batch of ``claim``'s range is committed: finish it (only if still held)."""
        self.gate()
        with self.engine.begin() as conn:
            row = ranges.finish(conn, self.run_.ref, claim.range_no, self.id)
            add_rows_done(conn, self.run_.ref, self.run_.operation, row)
        with self._ahead_lock:  # the heartbeat renews the next range as the current one now
            self.ahead.discard(claim.range_no)
            self.range_no = min(self.ahead) if self.ahead else None

    def _release_ahead(self) -> None:
        """Ranges claimed ahead but not done (the sweep stopped): free them for any worker."""
        with self._ahead_lock:
            held, self.ahead = sorted(self.ahead), set()
        if held:
            with self.engine.begin() as conn:
                ranges.release(conn, self.run_.ref, held, self.id)

    def _job_finished(self) -> bool:
        with self.engine.connect() as conn:
            q = sa.select(jobs_table.c.finished_at).where(
                *_job_where(self.run_.ref, self.run_.operation)
            )
            return conn.execute(q).scalar_one_or_none() is not None

    def _beat(self) -> None:
        last_rows, last_time = 0, time.monotonic()
        while not self._stop.wait(self.heartbeat):
            result = self.job.result
            rows = result.rows_written + result.rows_conflicted
            now = time.monotonic()
            with self._ahead_lock:
                holding = self.range_no  # (the range may finish while this beat runs)
                ahead = sorted(self.ahead - {holding})
            rate = (rows - last_rows) / max(now - last_time, 1e-6)
            last_rows, last_time = rows, now
            try:
                beat = control.beat(
                    self.engine,
                    self.run_,
                    self.id,
                    range_no=holding,
                    rows_done=rows,
                    rate=rate,
                    state=(self.pace.state if self.pace else "") or self.state,
                    lease=self.lease,
                    also=ahead,
                )
            except Exception as exc:  # the lease may pass meanwhile; the checkpoints say so
                log.warning(
                    "%s: heartbeat of %s failed: %s", self.run_.ref, self.id, type(exc).__name__
                )
                continue
            self.paused, self.ended = beat.paused, beat.ended
            with self._ahead_lock:
                if holding is not None and not beat.lease_kept and holding == self.range_no:
                    self.lost.add(holding)
                self.lost.update(n for n in beat.lost if n in self.ahead)


def _cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system says)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def add_rows_done(conn: Connection, ref: ColumnRef, operation: Operation, row: Any) -> None:
    """A finished range's rows, added to the job's record (``kms_field_jobs``)."""
    conn.execute(
        jobs_table.update()
        .where(*_job_where(ref, operation))
        .values(
            rows_done=jobs_table.c.rows_done + row.rows_done,
            rows_skipped=jobs_table.c.rows_skipped + row.rows_skipped,
            updated_at=_now(),
        )
    )


def run_workers(workers: list[Worker]) -> list[Any]:
    """Run several workers in threads of this process; returns what each returned or raised."""
    out: list[Any] = [None] * len(workers)

    def one(i: int) -> None:
        try:
            out[i] = workers[i].run()
        except BaseException as exc:  # handed back to the caller
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out

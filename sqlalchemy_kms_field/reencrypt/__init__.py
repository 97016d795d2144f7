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

The package, by concern:

* ``job.py``: the public entry points (``run_job`` and the four column jobs);
* ``records.py``: the job records (``kms_field_jobs``), start, resume, finish;
* ``transform.py``: what a job does to one value, and which rows need it (SQL on the header);
* ``sweep.py``: one sweep over a key range, batch by batch with its checkpoint;
* ``batch.py``: a page of rows computed (new values, rows skipped, summarised once);
* ``statements.py``: dialect-specific statements (PostgreSQL's one-statement batch write);
* ``tables.py``, ``ranges.py``, ``workers.py``: the job's ranges, claimed by any number of
  workers under leases kept alive by heartbeats; ``control.py``: one job per column, join,
  pause, resume, cancel, forget, status; ``pacing.py``: holding back by the database's health.
"""

from .control import (
    JobCancelled,
    JobConflictError,
    JobStatus,
    RunOver,
    WorkerStatus,
    cancel,
    forget,
    set_paused,
    status,
)
from .job import (
    WAIT_LOG,
    decrypt_column,
    encrypt_column,
    reencrypt_column,
    reindex_column,
    run_job,
)
from .pacing import Pacing
from .records import JobResult, Operation, jobs_table, unfinished_jobs
from .sweep import ProgressCallback

__all__ = [
    "WAIT_LOG",
    "JobCancelled",
    "JobConflictError",
    "JobResult",
    "JobStatus",
    "Operation",
    "Pacing",
    "ProgressCallback",
    "RunOver",
    "WorkerStatus",
    "cancel",
    "decrypt_column",
    "encrypt_column",
    "forget",
    "jobs_table",
    "reencrypt_column",
    "reindex_column",
    "run_job",
    "set_paused",
    "status",
    "unfinished_jobs",
]

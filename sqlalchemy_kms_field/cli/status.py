"""``kms-field status``: key states, rows per key version in each known column, unfinished jobs.

Known columns are those recorded by jobs (encrypted columns under their data key, blind-index
columns under their index key) and those the models declare. Rows are counted by SQL on the
header prefix of the stored values: nothing is decrypted, and no master key is needed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from .. import lifecycle, metrics, reencrypt
from ..census import FORMATS, Census, ColumnRef
from ..exc import KmsFieldError
from ..key_store import StoredKey
from ..tenant_census import TenantCensus, tenant_column_census
from .app import App
from .config import ENV, PROG
from .keys import JOB_COMMAND
from .output import (
    add_row,
    census_table,
    duration,
    job_column,
    key_json,
    keys_table,
    new_table,
    when,
)
from .tenant_status import tenant_json, tenant_rows, tenant_table, without_tenant_values


def cmd_status(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=False)
    stored = registry.key_store.versions()
    kinds = {k.name: k.kind for k in stored}
    refs = app.known_columns(registry)
    counts: list[Census] = []
    problems: list[tuple[ColumnRef, str]] = []
    for ref in refs:
        try:
            counts += lifecycle.column_census([ref], registry=registry)
        except KmsFieldError as exc:  # a dropped table must not hide the other columns
            problems.append((ref, str(exc)))
    jobs = reencrypt.unfinished_jobs(registry.key_store.engine)
    # Values under tenant keys (a column declared with tenant=) are counted apart, not "other".
    tenant = tenant_column_census(registry.key_store.engine, [c.column for c in counts])
    counts = without_tenant_values(counts, tenant)
    if args.json:
        print(json.dumps(_status_json(stored, kinds, counts, problems, jobs, tenant), indent=2))
        return 0

    title = "data keys" if set(kinds.values()) <= {"data"} else "keys"
    app.console.print(keys_table(title, stored) if stored else "no data keys yet")
    app.say()
    if not refs:
        app.say(
            "no encrypted column is known yet: set "
            f"{ENV['models']} to your models, or run a reencrypt/encrypt-column job"
        )
    for key in sorted({c.column.key for c in counts}):
        app.console.print(census_table(key, stored, [c for c in counts if c.column.key == key]))
        active = registry.key_store.active_version(key)
        job = JOB_COMMAND.get(kinds.get(key, "data"), "reencrypt")
        for c in counts:
            behind = c.on_other_versions(active) - c.other - tenant_rows(tenant, c) if active else 0
            if c.column.key == key and behind:
                app.say(f"  {c.column}: {behind:,} rows on older versions: {PROG} {job} {c.column}")
        found = [t for t in tenant.values() if t.column.key == key and t.rows]
        if found:
            app.console.print(tenant_table(key, found))
        app.say()
    for ref, problem in problems:
        app.say(f"{ref}: cannot count: {problem}", style="yellow")
    if any(c.other for c in counts):
        app.say(
            "other: rows neither NULL nor on a version of the column's key (plaintext, or "
            "values of another key)"
        )
    if jobs:
        _print_jobs(app, jobs, counts)
    else:
        app.say("no unfinished jobs")
    return 0


JobFigures = tuple[int | None, float | None, float | None]  # rows left, rows/s, seconds left
JOB_FIGURES = ("rows_left", "rate", "eta_seconds")


def _job_figures(job: Any, counts: Sequence[Census]) -> JobFigures:
    """Rows left (from the census), rate and ETA of a job, as kms_field.job.* report them."""
    remaining = None
    for c in counts:
        ref = c.column
        if (ref.schema or "", ref.table, ref.column) != (
            job.table_schema or "",
            job.table_name,
            job.column_name,
        ):
            continue
        if job.operation == "reencrypt" and job.target_version:
            remaining = c.on_other_versions(job.target_version) - c.other
        elif job.operation == "encrypt":
            remaining = c.other
        elif job.operation == "decrypt":
            remaining = sum(c.by_version.values())
    rate, eta = metrics.job_rate(job.rows_done, job.started_at, job.updated_at, remaining)
    return remaining, rate, eta


def _print_jobs(app: App, jobs: Sequence[Any], counts: Sequence[Census]) -> None:
    table = new_table(
        "unfinished jobs",
        "column",
        "operation",
        "key",
        "target version",
        "rows done",
        "rows skipped",
        "rows left",
        "rate",
        "eta",
        "updated_at",
    )
    for job in jobs:
        remaining, rate, eta = _job_figures(job, counts)
        add_row(
            table,
            job_column(job),
            job.operation,
            job.key_name,
            job.target_version or "-",
            f"{job.rows_done:,}",
            f"{job.rows_skipped:,}",
            "-" if remaining is None else f"{remaining:,}",
            "-" if rate is None else f"{rate:,.0f} rows/s",
            "-" if eta is None else duration(eta),
            when(job.updated_at),
        )
    app.console.print(table)
    app.say(
        f"rerun `{PROG} reencrypt` (or encrypt-/decrypt-column, or reindex) on these to finish them"
    )


def _status_json(
    stored: Sequence[StoredKey],
    kinds: dict[str, str],
    counts: Sequence[Census],
    problems: Sequence[tuple[ColumnRef, str]],
    jobs: Sequence[Any],
    tenant: dict[ColumnRef, TenantCensus],
) -> dict[str, object]:
    return {
        "keys": [key_json(k) for k in stored],
        "columns": [
            {
                "column": str(c.column),
                "schema": c.column.schema,
                "table": c.column.table,
                "name": c.column.column,
                "key": c.column.key,
                "kind": kinds.get(c.column.key),
                "by_version": {str(v): n for v, n in sorted(c.by_version.items())},
                "by_format": {fmt: c.in_format(fmt) for fmt in FORMATS},
                "nulls": c.nulls,
                "other": c.other,
                "total": c.total,
                **tenant_json(tenant.get(c.column)),
            }
            for c in counts
        ],
        "problems": [{"column": str(ref), "error": text} for ref, text in problems],
        "unfinished_jobs": [
            {
                "column": job_column(job),
                "operation": job.operation,
                "key": job.key_name,
                "target_version": job.target_version,
                "rows_done": job.rows_done,
                "rows_skipped": job.rows_skipped,
                "updated_at": when(job.updated_at),
                **dict(zip(JOB_FIGURES, _job_figures(job, counts), strict=True)),
            }
            for job in jobs
        ],
    }

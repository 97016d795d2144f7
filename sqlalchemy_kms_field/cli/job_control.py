"""Workers and job control on the command line.

``--workers N`` runs N workers of a job on this machine (this process and N - 1 others that
join it), ``--join`` adds this machine's workers to a job under way; ``--max-lag`` and
``--max-batch-seconds`` hold workers back by the database's health. ``kms-field jobs status |
pause | resume | cancel TABLE.COLUMN`` act on every worker of a job within a heartbeat;
``kms-field forget-column TABLE.COLUMN`` removes a column from the known encrypted columns.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import Refused, UsageError

if TYPE_CHECKING:  # the parser imports this module: --help imports neither SQLAlchemy nor rich
    from .app import App


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("use a whole number, 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError("use a whole number, 1 or more")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("use a number of seconds above 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("use a number of seconds above 0")
    return value


def add_worker_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("workers (PostgreSQL and MariaDB; SQLite runs one worker)")
    group.add_argument(
        "--workers", type=_count, default=1, metavar="N", help="workers on this machine (default 1)"
    )
    group.add_argument(
        "--join", action="store_true", help="join the job under way on the column (another machine)"
    )
    group.add_argument(
        "--lease",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="a killed worker's range is resumed by another after this long (default 30)",
    )
    group.add_argument(
        "--range-rows",
        type=_count,
        metavar="N",
        help="rows per range that workers claim (default 50 batches)",
    )
    group.add_argument(
        "--max-lag",
        type=_seconds,
        metavar="SECONDS",
        help="hold while the database's replication lag is above this",
    )
    group.add_argument(
        "--max-batch-seconds",
        type=_seconds,
        metavar="SECONDS",
        help="rest after a batch whose write took longer than this",
    )


def worker_options(args: argparse.Namespace) -> dict[str, Any]:
    """run_job's keyword arguments for the worker flags."""
    if getattr(args, "dry_run", False) and (args.workers > 1 or args.join):
        raise UsageError("--dry-run only counts rows: drop --workers and --join")
    if args.workers > 1 and args.join:
        raise UsageError("--join adds this process to a job; run several with --workers N alone")
    from ..reencrypt.pacing import Pacing

    options: dict[str, Any] = {"join": args.join, "lease_seconds": args.lease}
    if args.range_rows is not None:
        options["range_rows"] = args.range_rows
    if args.max_lag is not None or args.max_batch_seconds is not None:
        options["pacing"] = Pacing(max_lag=args.max_lag, max_batch_seconds=args.max_batch_seconds)
    return options


class Joiners:
    """With --workers N: the N - 1 processes that join the job this process starts."""

    def __init__(self, app: App, args: argparse.Namespace) -> None:
        self.count = args.workers - 1
        self.children: list[tuple[subprocess.Popen[bytes], Any]] = []
        if self.count and app.engine().dialect.name == "sqlite":
            raise UsageError("SQLite runs one worker per job: drop --workers")
        argv = list(getattr(args, "argv", None) or sys.argv[1:])
        self.argv = [*_without_workers(argv), "--join"]

    def start(self) -> None:
        """Called once the job has started (so that they find it to join)."""
        for _ in range(self.count):
            log = tempfile.TemporaryFile()
            process = subprocess.Popen(
                [sys.executable, "-m", "sqlalchemy_kms_field.cli", *self.argv],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            self.children.append((process, log))

    def wait(self) -> None:
        """Wait for them; a failed one is reported (the job is safe: its range went back)."""
        failed = []
        for process, log in self.children:
            process.wait()
            if process.returncode != 0:
                log.seek(0)
                lines = log.read().decode("utf-8", "replace").strip().splitlines()
                failed.append(lines[-1] if lines else f"exit status {process.returncode}")
            log.close()
        self.children.clear()
        if failed:
            raise Refused(f"{len(failed)} worker process(es) failed: {failed[0]}")

    def kill(self) -> None:
        for process, log in self.children:
            if process.poll() is None:
                process.terminate()
                process.wait()
            log.close()
        self.children.clear()


def _without_workers(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--workers":
            skip = True
            continue
        if item.startswith("--workers="):
            continue
        out.append(item)
    return out


# Commands ------------------------------------------------------------------------------------


def add_commands(add: Callable[..., argparse.ArgumentParser], commands: Any, common: Any) -> None:
    jobs = commands.add_parser(
        "jobs",
        help="jobs under way: status, pause, resume, cancel",
        parents=[common],
    )
    group = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND", required=True)
    p = add(group, "status", cmd_jobs_status, "each job under way: its workers, rate, time left")
    p.add_argument(
        "--lease", type=_seconds, default=30.0, metavar="SECONDS", help=argparse.SUPPRESS
    )
    for name, handler, help in (
        ("pause", cmd_pause, "pause every worker of the job on TABLE.COLUMN (within a heartbeat)"),
        ("resume", cmd_resume, "resume a paused job"),
        (
            "cancel",
            cmd_cancel,
            "cancel the job on TABLE.COLUMN: its workers stop; rows already done stay done",
        ),
    ):
        p = add(group, name, handler, help)
        p.add_argument("column", metavar="TABLE.COLUMN")
        p.add_argument("--schema", metavar="S", help="schema of the table")
    p = add(
        commands,
        "forget-column",
        cmd_forget,
        "remove TABLE.COLUMN from the known encrypted columns (refused while it holds ciphertext)",
    )
    p.add_argument("column", metavar="TABLE.COLUMN")
    p.add_argument("--schema", metavar="S", help="schema of the table")
    p.add_argument(
        "--force", action="store_true", help="forget it even though values still carry the key"
    )


def _column(args: argparse.Namespace) -> tuple[str | None, str, str]:
    from .jobs import parse_column

    return parse_column(args.column, args.schema)


def cmd_pause(app: App, args: argparse.Namespace) -> int:
    from .. import reencrypt

    schema, table, column = _column(args)
    op = reencrypt.set_paused(app.engine(), table, column, True, schema=schema)
    app.say(f"{op} of {args.column}: paused (every worker holds within a heartbeat)")
    return 0


def cmd_resume(app: App, args: argparse.Namespace) -> int:
    from .. import reencrypt

    schema, table, column = _column(args)
    op = reencrypt.set_paused(app.engine(), table, column, False, schema=schema)
    app.say(f"{op} of {args.column}: resumed")
    return 0


def cmd_cancel(app: App, args: argparse.Namespace) -> int:
    from .. import reencrypt

    schema, table, column = _column(args)
    ops = reencrypt.cancel(app.engine(), table, column, schema=schema)
    app.say(
        f"cancelled {', '.join(ops)} of {args.column}: its workers stop within a heartbeat; "
        "rows already rewritten stay so and every row is readable"
    )
    return 0


def cmd_forget(app: App, args: argparse.Namespace) -> int:
    from .. import reencrypt

    schema, table, column = _column(args)
    key = reencrypt.forget(app.engine(), table, column, schema=schema, force=args.force)
    app.say(f"{args.column} is no longer a known encrypted column (it was under data key {key!r})")
    return 0


def cmd_jobs_status(app: App, args: argparse.Namespace) -> int:
    from .. import reencrypt

    jobs = reencrypt.status(app.engine(), lease=args.lease)
    if not jobs:
        app.say("no job under way")
        return 0
    for job in jobs:
        left = job.seconds_left
        eta = f", about {_duration(left)} left" if left is not None else ""
        app.say(
            f"{job.operation} {job.column}{' (PAUSED)' if job.paused else ''}: "
            f"{job.ranges_finished}/{job.ranges} ranges, {job.rows_done:,} rows done, "
            f"{job.rate:,.0f} rows/s{eta}"
        )
        for w in job.workers:
            where = f"range {w.range_no}" if w.range_no is not None else "no range"
            alive = "" if w.alive else f" (no heartbeat for {w.heartbeat_age:.0f} s)"
            app.say(
                f"  {w.worker}: {w.state}, {where}, {w.rows_done:,} rows, {w.rate:,.0f} rows/s"
                f"{alive}"
            )
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["Joiners", "add_commands", "add_worker_options", "worker_options"]

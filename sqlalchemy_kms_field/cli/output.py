"""What the commands print: rich tables, plain lines, and the progress of long jobs.

rich is imported only here and only when something is printed, so that ``--help`` and the
"install the [cli] extra" message work without it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..census import FORMATS, Census
from ..key_store import KeyState, StoredKey
from .config import PROG
from .errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table

    from .app import App


def make_console() -> Console:
    try:
        from rich.console import Console
    except ImportError:
        raise UsageError(
            f"{PROG} needs rich for its output: pip install 'sqlalchemy-kms-field[cli]'"
        ) from None
    width = None
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        width = 1000  # logs and pipes: never fold key ids, paths and column names
    return Console(width=width, highlight=False)


def new_table(title: str | None, *headers: str) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(h, overflow="fold")
    return table


def add_row(table: Table, *cells: object) -> None:
    from rich.text import Text

    table.add_row(*(Text("" if c is None else str(c)) for c in cells))


def keys_table(title: str | None, stored: Sequence[StoredKey]) -> Table:
    show_kind = any(k.kind != "data" for k in stored)  # only once blind-index keys exist
    headers = ["name", "version", *(["kind"] if show_kind else []), "state", "master key id"]
    table = new_table(title, *headers, "created_at")
    for k in stored:
        add_row(
            table,
            k.name,
            k.version,
            *([k.kind] if show_kind else []),
            k.state.value,
            k.master_key_id or "-",
            when(k.created_at),
        )
    return table


VERSION_COLUMNS = 4  # at most this many per-version columns in a census table


def census_table(key: str, stored: Sequence[StoredKey], counts: Sequence[Census]) -> Table:
    """Rows per version of ``key``'s columns, at most VERSION_COLUMNS version columns wide:
    every version while there are that few; then the active version and the newest versions
    that hold rows, older ones that hold rows summed in one column, and versions without rows
    counted in the title."""
    versions = [k for k in stored if k.name == key and k.state is not KeyState.PENDING]
    kind = versions[0].kind if versions else "data"
    shown = [k.version for k in versions]
    if len(shown) > VERSION_COLUMNS:
        used = {v for c in counts for v, n in c.by_version.items() if n}
        active = [k.version for k in versions if k.state is KeyState.ACTIVE][-1:]
        shown = sorted(used | set(active))
    older: list[int] = []
    if len(shown) > VERSION_COLUMNS:
        older, shown = shown[: -(VERSION_COLUMNS - 1)], shown[-(VERSION_COLUMNS - 1) :]
    states = {k.version: k.state.value for k in versions}
    headers = [f"v{v} ({states.get(v, 'unknown')})" for v in shown]
    if older:
        headers.insert(0, f"older: v{older[0]}-v{older[-1]}")
    formats = [f"{fmt} rows" for fmt in FORMATS]  # a format migration ends when kf1 is 0
    empty = len(versions) - len([k for k in versions if k.version in (*shown, *older)])
    title = f"{kind} key {key!r}: rows per version"
    if empty:
        title += f" ({empty} version{'s' if empty > 1 else ''} without rows not shown)"
    table = new_table(title, "column", *headers, *formats, "NULL", "other", "total")
    for c in counts:
        per_version = [c.by_version.get(v, 0) for v in shown]
        if older:
            per_version.insert(0, sum(c.by_version.get(v, 0) for v in older))
        per_format = [c.in_format(fmt) for fmt in FORMATS]
        numbers = [f"{n:,}" for n in (*per_version, *per_format, c.nulls, c.other, c.total)]
        add_row(table, c.column, *numbers)
    return table


def key_json(k: StoredKey) -> dict[str, object]:
    return {
        "name": k.name,
        "version": k.version,
        "kind": k.kind,
        "state": k.state.value,
        "master_key_id": k.master_key_id,
        "created_at": when(k.created_at),
    }


def job_column(job: Any) -> str:
    return ".".join(p for p in (job.table_schema, job.table_name, job.column_name) if p)


def when(value: object) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if hasattr(value, "isoformat") else "-"


def duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class JobProgress:
    """A rich progress bar on a terminal; elsewhere a plain line every N batches or S seconds."""

    def __init__(
        self, app: App, label: str, *, every_batches: int = 10, every_seconds: float = 5.0
    ) -> None:
        self.app = app
        self.label = label
        self.every_batches = every_batches
        self.every_seconds = every_seconds
        self.started = time.monotonic()
        self.batches = 0
        self._last_line = (0, self.started)  # batches, time of the last plain line
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        console = self.app.console
        if console.is_terminal and not console.is_dumb_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows"),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task(self.label, total=None, rate="")
            self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, done: int, todo: int) -> None:
        """The job's progress callback, called after each committed batch."""
        self.batches += 1
        now = time.monotonic()
        rate = done / max(now - self.started, 1e-6)
        total = max(todo, done)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total, rate=f"{rate:,.0f} rows/s")
            return
        batches, last = self._last_line
        due = self.batches - batches >= self.every_batches or now - last >= self.every_seconds
        if not due and done < total:  # the line at 100% always shows
            return
        self._last_line = (self.batches, now)
        left = duration((total - done) / rate) if rate > 0 else "?"
        percent = 100 * done / total if total else 100
        self.app.say(
            f"{self.label}: {done:,}/{total:,} rows ({percent:.0f}%), {rate:,.0f} rows/s, "
            f"about {left} left"
        )


class ScanDisplay:
    """Progress of a database-wide scan: a rich bar on a terminal, else a plain line every
    ``every_seconds``; at the end, always, how much was scanned and how long it took."""

    def __init__(self, app: App, label: str, *, every_seconds: float = 5.0) -> None:
        self.app = app
        self.label = label
        self.every_seconds = every_seconds
        self._last = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ScanDisplay:
        console = self.app.console
        if console.is_terminal and not console.is_dumb_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tables  {task.fields[table]}"),
                console=console,
                transient=True,
            )
            self._task = self._bar.add_task(self.label, total=None, table="")
            self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, step: Any) -> None:
        """The scan's progress callback (a ``scan.ScanProgress``), after each table."""
        done, total = step.tables_done, step.tables_total
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total, table=step.table)
        elif done < total and time.monotonic() - self._last >= self.every_seconds:
            self._last = time.monotonic()
            self.app.say(f"{self.label}: {done:,}/{total:,} tables ({step.table})")
        if done == total:
            self.app.say(
                f"{self.label}: scanned {total:,} tables ({step.columns_done:,} columns that can "
                f"hold a value) in {step.schemas} in {step.seconds:.1f} s"
            )

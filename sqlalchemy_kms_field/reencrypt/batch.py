"""The batch computation: a page of rows in, their new values out (or the row that stops the
job, or the rows skipped as undecryptable, summarised once per job rather than one line each).

Runs in the computing thread of a sweep; holds no connection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..census import ColumnRef
from ..exc import ConfigurationError, KmsFieldError, ReencryptionError
from .records import JobResult, Operation, _show_key

log = logging.getLogger(__name__)

SHOWN_SKIPS = 5  # skipped rows named in the summary; the rest are counted


class _Compute:
    """Computes pages for one job: its transform, what each row carries, what to skip."""

    def __init__(
        self,
        ref: ColumnRef,
        operation: Operation,
        transform: Any,
        n: int,
        result: JobResult,
        *,
        with_source: bool,
        companion: bool,
        bound: int,
        skip_undecryptable: bool,
    ) -> None:
        self.ref, self.operation, self.transform, self.n = ref, operation, transform, n
        self.result, self.source, self.companion = result, with_source, companion
        self.bound, self.skip_undecryptable = bound, skip_undecryptable
        self.skipped_set: set[tuple[Any, ...]] = set()
        self.reasons: list[str] = []  # why the first few skipped rows failed

    def __call__(self, rows: Sequence[Any]) -> _Batch:
        n = self.n
        transform = self.transform
        with_source = self.source
        companion = self.companion
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
                    new = transform(row[n], row[n + 1], row[n + 2 :])
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
                    if len(self.reasons) < SHOWN_SKIPS:
                        self.reasons.append(f"{_show_key(key)}: {exc}")
                continue
            kept.append(row)
            news.append(new)
        return _Batch(kept, news, n, with_source, companion, last, len(rows), skipped)

    def log_skipped(self) -> None:
        """One warning for all the rows skipped so far: their count and the first few."""
        if not self.skipped_set:
            return
        more = len(self.skipped_set) - len(self.reasons)
        log.warning(
            "%s of %s: %d rows skipped (they do not decrypt; unchanged): %s%s",
            self.operation,
            self.ref,
            len(self.skipped_set),
            "; ".join(self.reasons),
            f"; and {more} more" if more > 0 else "",
        )


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

"""What ``kms-field status`` shows of columns with a key per tenant: rows per tenant-key
version summed over tenants, and how many tenants (``tenant_census.py`` counts them by SQL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..census import Census, ColumnRef
from ..tenant_census import TenantCensus
from .output import VERSION_COLUMNS, add_row, new_table

if TYPE_CHECKING:
    from rich.table import Table


def without_tenant_values(
    counts: Sequence[Census], tenant: dict[ColumnRef, TenantCensus]
) -> list[Census]:
    """``counts`` whose "other" no longer holds the values under tenant keys (shown apart)."""
    out = []
    for c in counts:
        found = tenant.get(c.column)
        out.append(c if found is None else replace(c, other=c.other - found.rows))
    return out


def tenant_rows(tenant: dict[ColumnRef, TenantCensus], c: Census) -> int:
    found = tenant.get(c.column)
    return 0 if found is None else found.rows


def tenant_table(key: str, found: Sequence[TenantCensus]) -> Table:
    """At most VERSION_COLUMNS version columns, as the census tables: the newest versions that
    hold rows, older ones summed in one column."""
    shown = sorted({v for f in found for v, n in f.by_version.items() if n})
    older: list[int] = []
    if len(shown) > VERSION_COLUMNS:
        older, shown = shown[: -(VERSION_COLUMNS - 1)], shown[-(VERSION_COLUMNS - 1) :]
    headers = [f"v{v}" for v in shown]
    if older:
        headers.insert(0, f"older: v{older[0]}-v{older[-1]}")
    title = f"tenant keys of data key {key!r}: rows per tenant key version, all tenants"
    table = new_table(title, "column", *headers, "tenants", "rows")
    for f in found:
        per_version = [f.by_version.get(v, 0) for v in shown]
        if older:
            per_version.insert(0, sum(f.by_version.get(v, 0) for v in older))
        add_row(table, f.column, *(f"{n:,}" for n in (*per_version, f.tenants, f.rows)))
    return table


def tenant_json(found: TenantCensus | None) -> dict[str, object]:
    if found is None:
        return {}
    return {
        "tenant_keys": {
            "by_version": {str(v): n for v, n in sorted(found.by_version.items())},
            "tenants": found.tenants,
            "rows": found.rows,
        }
    }

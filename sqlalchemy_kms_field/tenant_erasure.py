"""Erasing one tenant: a census of what will become unreadable, a grace period, then its keys go.

``erase_tenant(key, tenant)`` alone only counts: every column of the database is scanned for
values under each of the tenant's key versions (by their header, no decryption). With
``confirm=True`` it retires every version: within ``max_age`` (at most ``active_ttl``) every
process refuses to read or write that tenant's values, naming the erasure, and
``restore_tenant`` still undoes it. Run again once the grace period has passed on the
database's clock (or with ``skip_grace_period=True``), it destroys them: the wrapped tenant keys
are overwritten and erased (VACUUM FULL on PostgreSQL), so every value of that tenant, in the
live database and in every copy of it, depends on a tenant key that no longer exists anywhere
but in copies of the tenant key table. Those copies (backups, replicas, WAL) are wrapped by an
intermediate key that is itself wrapped by the KMS master key: rotating the intermediate key
(``rewrap_tenant_keys``) and then shredding the master key (``kms-field keys shred``) makes
them useless too. See the README's "A data key per tenant".

Blind indexes: an index value computed from the tenant's value stays a test of a guess for
whoever holds the index key, which every tenant shares. Given the application's ``metadata``,
the census also counts the blind-index columns whose source holds the tenant's values, and the
destroying step first sets those index values to NULL (in the rows whose source is under the
tenant's keys); without it they stay, and the README says how to clear them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .blind_index import BlindIndex
from .census import FORMATS, ColumnRef, declared_column, starts_with
from .erasure import Erased, vacuum_full
from .exc import ConfigurationError, KeyNotFoundError, KeyStateError
from .key_store import KeyState, utc_now
from .lifecycle import DESTROY_GRACE_PERIOD
from .scan import Found, Progress, scan_database
from .tenants import TenantKeyring, TenantVersion, get_keyring, tenant_key_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexValues:
    """A blind-index column whose source holds the tenant's values: ``rows`` index values
    computed from them (counted by the census; set to NULL when the keys are destroyed)."""

    column: ColumnRef  # the blind-index column (``key``: its index key)
    source: str  # the encrypted column it is computed from
    rows: int


@dataclass
class TenantErasure:
    """What :func:`erase_tenant` found and did. ``stage``: ``"census"`` (nothing done),
    ``"retired"`` (unreadable everywhere, still restorable until ``destroy_after``) or
    ``"destroyed"`` (for good)."""

    key: str
    tenant: str
    key_name: str
    stage: str
    versions: list[TenantVersion]
    found: list[Found] = field(default_factory=list)  # rows per column, every version summed
    indexes: list[IndexValues] = field(default_factory=list)  # given the models' metadata
    indexes_cleared: int = 0  # index values set to NULL by this call
    tables: int = 0
    seconds: float = 0.0
    destroy_after: datetime | None = None  # database clock, UTC
    erased: Erased | None = None

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.found)


def tenant_census(
    key: str,
    tenant: object,
    *,
    schemas: Sequence[str] = (),
    progress: Progress | None = None,
    keyring: TenantKeyring | None = None,
    metadata: sa.MetaData | None = None,
) -> TenantErasure:
    """Rows per table and column under any key version of ``tenant`` (every column scanned);
    with the application's ``metadata``, also the blind-index values computed from them."""
    keyring = get_keyring() if keyring is None else keyring
    text = str(tenant)
    name = tenant_key_name(key, text)
    versions = keyring.versions(key, text)
    if not versions:
        raise KeyNotFoundError(
            f"tenant {text!r} of data key {key!r} has no key ({name!r}): nothing to erase"
        )
    census = TenantErasure(key, text, name, "census", versions)
    by_column: dict[object, Found] = {}
    for v in versions:
        scan = scan_database(keyring.engine, name, v.version, schemas=schemas, progress=progress)
        census.tables = scan.tables
        census.seconds += scan.seconds
        for found in scan.found:
            seen = by_column.get(found.column)
            if seen is None:
                by_column[found.column] = Found(found.column, dict(found.by_format))
            else:
                for fmt, n in found.by_format.items():
                    seen.by_format[fmt] = seen.by_format.get(fmt, 0) + n
    census.found = list(by_column.values())
    if metadata is not None:
        with keyring.engine.connect() as conn:
            census.indexes = [
                IndexValues(ref, source, int(conn.execute(count).scalar_one()))
                for ref, source, count, _ in _index_statements(census, metadata)
            ]
    return census


def _index_statements(
    census: TenantErasure, metadata: sa.MetaData
) -> list[tuple[ColumnRef, str, sa.Select[Any], sa.Update]]:
    """For each blind-index column whose source holds the tenant's values (per ``metadata``):
    the count of its values in those rows, and the UPDATE setting them to NULL. The statements
    use bare columns (no column types): nothing is decrypted, hashed or refused."""
    out = []
    for found in census.found:
        ref = found.column
        values_column = declared_column(metadata, ref.table, ref.column, ref.schema)
        if values_column is None:
            continue
        declared = values_column.table
        for col in declared.c:
            typ = col.type
            if not isinstance(typ, BlindIndex) or declared.c.get(typ.source) is not values_column:
                continue
            bare = sa.table(
                ref.table, sa.column(ref.column), sa.column(col.name), schema=ref.schema
            )
            mine = sa.or_(
                *(starts_with(bare.c[ref.column], f"{fmt}:{census.key_name}:") for fmt in FORMATS)
            )
            present = sa.and_(mine, bare.c[col.name].is_not(None))
            count = sa.select(sa.func.count()).select_from(bare).where(present)
            clear = bare.update().where(present).values({col.name: None})
            out.append(
                (ColumnRef(ref.table, col.name, typ.key, ref.schema), ref.column, count, clear)
            )
    return out


def _clear_indexes(keyring: TenantKeyring, census: TenantErasure, metadata: sa.MetaData) -> None:
    """Set the tenant's blind-index values to NULL (before its keys go: if this fails, nothing
    is destroyed and the erasure can be run again)."""
    with keyring.engine.begin() as conn:
        for ref, _, _, clear in _index_statements(census, metadata):
            try:
                census.indexes_cleared += conn.execute(clear).rowcount
            except sa.exc.DBAPIError as exc:
                raise ConfigurationError(
                    f"cannot set the blind-index values of tenant {census.tenant!r} in {ref} to "
                    f"NULL ({type(exc.orig).__name__}: is the column NOT NULL?); nothing was "
                    "destroyed: make the column nullable or delete the tenant's rows, then run "
                    "the erasure again"
                ) from None


def erase_tenant(
    key: str,
    tenant: object,
    *,
    confirm: bool = False,
    grace_period: float = DESTROY_GRACE_PERIOD,
    skip_grace_period: bool = False,
    schemas: Sequence[str] = (),
    progress: Progress | None = None,
    keyring: TenantKeyring | None = None,
    metadata: sa.MetaData | None = None,
) -> TenantErasure:
    """Erase ``tenant``'s key versions under data key ``key`` (see the module docstring).

    Without ``confirm`` it returns the census and changes nothing. With it: retires every
    version, and destroys them once they have been retired for ``grace_period`` seconds on the
    database's clock (``skip_grace_period=True``: now, with a warning in the log).
    ``metadata`` (the application's models): the blind-index values computed from the
    tenant's values are counted, and set to NULL just before the keys are destroyed.
    """
    if grace_period < 0:
        raise ConfigurationError(f"grace_period must be 0 or more seconds, got {grace_period}")
    keyring = get_keyring() if keyring is None else keyring
    census = tenant_census(
        key, tenant, schemas=schemas, progress=progress, keyring=keyring, metadata=metadata
    )
    states = {v.state for v in census.versions}
    if states == {KeyState.DESTROYED.value}:
        census.stage = "destroyed"
        if confirm and metadata is not None and any(i.rows for i in census.indexes):
            _clear_indexes(keyring, census, metadata)  # erased before they were counted
        return census
    if not confirm:
        return census
    t = keyring.table
    mine = t.c.key_name == census.key_name
    with keyring.engine.begin() as conn:
        usable = (KeyState.ACTIVE.value, KeyState.READABLE.value)
        conn.execute(
            t.update()
            .where(mine, t.c.state.in_(usable))
            .values(state=KeyState.RETIRED.value, retired_at=utc_now())
        )
        retired_at, now = conn.execute(
            sa.select(sa.func.max(t.c.retired_at), utc_now()).where(mine)
        ).one()
    keyring.forget()
    census.destroy_after = retired_at + timedelta(seconds=grace_period)
    census.stage = "retired"
    log.warning("tenant %r of data key %r retired for erasure", census.tenant, key)
    if now < census.destroy_after and not skip_grace_period:
        return census
    if now < census.destroy_after:
        log.warning(
            "GRACE PERIOD SKIPPED: destroying the keys of tenant %r of data key %r now",
            census.tenant,
            key,
        )
    if metadata is not None:
        _clear_indexes(keyring, census, metadata)
    census.erased = _destroy(keyring, census.key_name)
    census.versions = keyring.versions(key, census.tenant)
    census.stage = "destroyed"
    log.warning(
        "tenant %r of data key %r erased: its key versions are destroyed", census.tenant, key
    )
    return census


def restore_tenant(key: str, tenant: object, *, keyring: TenantKeyring | None = None) -> None:
    """Undo an erasure within its grace period: the retired versions become usable again."""
    keyring = get_keyring() if keyring is None else keyring
    text = str(tenant)
    versions = keyring.versions(key, text)
    retired = [v.version for v in versions if v.state == KeyState.RETIRED.value]
    if not retired:
        states = ", ".join(sorted({v.state for v in versions})) or "no key"
        raise KeyStateError(
            f"tenant {text!r} of data key {key!r} is not being erased ({states}); nothing to "
            "restore (a destroyed key cannot come back)"
        )
    t = keyring.table
    name = tenant_key_name(key, text)
    with keyring.engine.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.key_name == name, t.c.state == KeyState.RETIRED.value)
            .values(state=KeyState.READABLE.value, retired_at=None)
        )
        conn.execute(
            t.update()
            .where(t.c.key_name == name, t.c.version == max(retired))
            .values(state=KeyState.ACTIVE.value)
        )
    keyring.forget()


def _destroy(keyring: TenantKeyring, name: str) -> Erased:
    """Overwrite, then erase, the wrapped keys (as ``SqlKeyStore.destroy`` does for data keys)."""
    t = keyring.table
    mine = (t.c.key_name == name) & (t.c.state == KeyState.RETIRED.value)
    with keyring.engine.begin() as conn:
        dialect = conn.dialect.name
        if dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA secure_delete = ON")
        for version, wrapped in conn.execute(sa.select(t.c.version, t.c.wrapped_key).where(mine)):
            zeros = "0" * len(wrapped)  # same length: MySQL/SQLite overwrite the bytes in place
            conn.execute(t.update().where(mine, t.c.version == version).values(wrapped_key=zeros))
        conn.execute(t.update().where(mine).values(wrapped_key="", state=KeyState.DESTROYED.value))
        if dialect != "postgresql":
            return Erased(dialect, vacuumed=None)
        destroyed_at = conn.execute(
            sa.text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")
        ).scalar_one()
    keyring.forget()
    return vacuum_full(keyring.engine, t, destroyed_at)

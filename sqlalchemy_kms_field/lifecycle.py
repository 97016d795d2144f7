"""Data key life cycle beyond create and rotate: rewrap (master key rotation), retire, destroy.

Rewrapping touches only the key store: O(keys), never a data row. Retiring or destroying a
version is allowed only when a census of every column of the database (not only the known ones)
finds no row on it, and only after the grace periods, measured on the database's clock: retire
waits until every process has seen a newer version active (``active_ttl``), destroy until the
version has been retired for ``grace_period`` (3 days by default).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import EllipsisType

import sqlalchemy as sa

from . import census, scan
from .census import Census, ColumnRef
from .constants import DESTROY_GRACE_PERIOD as DESTROY_GRACE_PERIOD
from .erasure import Erased
from .exc import ConfigurationError, KeyStateError, MasterKeyError
from .key_store import ACTIVE_TTL_MARGIN, KeyState, SqlKeyStore, StoredKey
from .master_keys import AwsKmsMasterKey
from .registry import KeyRegistry, get_registry, key_context
from .scan import Progress, Scan

# The versions whose wrapped key is still needed: everything but pending and destroyed.
SURVIVING = frozenset({KeyState.ACTIVE, KeyState.READABLE, KeyState.RETIRED})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rewrapped:
    name: str
    version: int
    old_master_key_id: str
    new_master_key_id: str


def rewrap_data_keys(
    names: Sequence[str] | None = None,
    *,
    registry: KeyRegistry | None = None,
    from_application: str | EllipsisType | None = ...,
) -> list[Rewrapped]:
    """Rewrap every stored data key under the registry's current master key.

    Within AWS KMS the new wrapped key is made by ``ReEncrypt``; between providers (local to
    AWS, say) the key is unwrapped by the old master key, which must be listed in
    ``previous_master_keys``, and wrapped by the new one. Either way the old master key must
    still allow Decrypt during the rewrap: each new wrapped key is unwrapped and compared with
    the old one before it replaces it (compare-and-swap). No data row changes.

    ``from_application``: the application the keys are wrapped under now, when it is not the
    registry's own: ``None`` for keys made before ``application`` was configured. They are
    rewrapped into the registry's application.

    A version already wrapped by the registry's master key, in its application, is left as it
    is (see :func:`already_rewrapped`): a rerun, or a rewrap after one new version, touches only
    what needs it.
    """
    registry = registry or get_registry()
    source = registry.application if from_application is ... else from_application
    done = []
    for stored in registry.key_store.versions():
        if names is not None and stored.name not in names:
            continue
        if stored.state not in SURVIVING or already_rewrapped(registry, stored, source):
            continue
        done.append(_rewrap_one(registry, stored, source))
    return done


def already_rewrapped(registry: KeyRegistry, stored: StoredKey, source: str | None) -> bool:
    """True if ``stored`` is wrapped by the registry's master key under its application."""
    return source == registry.application and registry.master_key.can_unwrap(stored.master_key_id)


def _rewrap_one(registry: KeyRegistry, stored: StoredKey, source: str | None) -> Rewrapped:
    master = registry.master_key
    old_context = key_context(stored.name, stored.version, stored.kind, source)
    context = registry.context(stored.name, stored.version, stored.kind)
    old_master = registry._master_for(stored)  # only a configured master key may unwrap
    plaintext = old_master.unwrap(stored.wrapped_key, old_context, stored.master_key_id)
    moved = None
    if old_context == context:
        moved = master.rewrap(stored.wrapped_key, context, stored.master_key_id)
    if moved is None:
        moved = master.wrap(plaintext, context)
    new_wrapped, new_id = moved
    if not hmac.compare_digest(master.unwrap(new_wrapped, context, new_id), plaintext):
        raise MasterKeyError(
            f"rewrapped data key {stored.name!r} version {stored.version} did not verify; "
            "the old wrapped key was kept",
            code="VerificationFailed",
        )
    if not registry.key_store.replace_wrapped(
        stored.name, stored.version, stored.wrapped_key, new_wrapped, new_id
    ):
        raise KeyStateError(
            f"data key {stored.name!r} version {stored.version} changed during the rewrap "
            "(another rewrap running?); rerun it"
        )
    log.info("rewrapped data key %r version %d: %s -> %s",
             stored.name, stored.version, stored.master_key_id, new_id)  # fmt: skip
    return Rewrapped(stored.name, stored.version, stored.master_key_id, new_id)


@dataclass(frozen=True)
class Shredded:
    """What :func:`shred_master_key` did: the versions it rewrapped, and when KMS deletes
    the old master key."""

    old_master_key_id: str
    rewrapped: list[Rewrapped]
    deletion_date: datetime


def shred_master_key(
    old_master_key: AwsKmsMasterKey,
    *,
    pending_window_days: int = 30,
    confirm: bool = False,
    registry: KeyRegistry | None = None,
) -> Shredded:
    """Crypto-shredding that holds against backups: move every surviving key version (active,
    readable, retired) to the registry's master key, verify each, then schedule
    ``old_master_key`` for deletion in KMS (7 to 30 days; ``CancelKeyDeletion`` undoes it
    until then). Once KMS has deleted it, every copy of a wrapped key it made (backups,
    archives, replicas, the wrapped keys of destroyed versions) is unreadable for good.

    Refuses, before scheduling anything, if any version still depends on the old key.
    """
    registry = registry or get_registry()
    old_id = _check_shred(old_master_key, registry, pending_window_days, confirm)
    mover = KeyRegistry(
        registry.master_key,
        registry.key_store,
        previous_master_keys=(old_master_key, *registry.previous_master_keys),
        application=registry.application,
    )
    moved = rewrap_data_keys(registry=mover)
    for stored in registry.key_store.versions():
        depends = stored.state in SURVIVING or stored.state is KeyState.PENDING
        if depends and stored.master_key_id == old_id:
            raise KeyStateError(
                f"{stored.kind} key {stored.name!r} version {stored.version} "
                f"({stored.state.value}) still depends on {old_id}; the deletion was not "
                "scheduled. Rerun the shred (a key was created meanwhile?)"
            )
        if stored.state in SURVIVING:  # verify: the new master key alone unwraps it
            context = registry.context(stored.name, stored.version, stored.kind)
            registry.master_key.unwrap(stored.wrapped_key, context, stored.master_key_id)
    when = old_master_key.schedule_deletion(pending_window_days)
    registry.forget()
    log.warning("master key %s scheduled for deletion on %s", old_id, when.isoformat())
    return Shredded(old_id, moved, when)


def _check_shred(
    old: AwsKmsMasterKey, registry: KeyRegistry, pending_window_days: int, confirm: bool
) -> str:
    if not isinstance(old, AwsKmsMasterKey):
        raise ConfigurationError(
            "old_master_key must be an AwsKmsMasterKey: only a KMS key can be scheduled for "
            "deletion (delete a local key file yourself, with every copy of it)"
        )
    if not 7 <= pending_window_days <= 30:
        raise ConfigurationError(
            f"pending_window_days must be 7 to 30 (KMS's waiting period), got {pending_window_days}"
        )
    old_id = "aws-kms:" + old.key_arn
    if registry.master_key.can_unwrap(old_id):
        raise ConfigurationError(
            f"the master key to shred ({old_id}) is the configured master key: configure the "
            "new master key and name the old one as old_master_key (--old-master-key)"
        )
    if not confirm:
        raise KeyStateError(
            f"shredding schedules {old_id} for deletion: once KMS deletes it, every wrapped "
            "key it made, in every backup, archive and replica, is unreadable forever; pass "
            "confirm=True (--yes-shred) to do it"
        )
    return old_id


def column_census(
    columns: Sequence[ColumnRef], *, registry: KeyRegistry | None = None
) -> list[Census]:
    """Rows per key version (and per format) for each column, by SQL on the header prefix."""
    registry = registry or get_registry()
    engine = registry.key_store.engine
    versions: dict[str, list[int]] = {}
    for stored in registry.key_store.versions():
        versions.setdefault(stored.name, []).append(stored.version)
    out = []
    with engine.connect() as conn:
        for ref in columns:
            table = census.reflect(conn, ref.table, ref.schema)
            out.append(census.count_versions(conn, table, ref, versions.get(ref.key, [])))
    return out


def known_columns(
    metadata: sa.MetaData | None = None, *, registry: KeyRegistry | None = None
) -> list[ColumnRef]:
    """Columns recorded by jobs in the key store's database, plus those of ``metadata``."""
    registry = registry or get_registry()
    recorded = census.known_columns(registry.key_store.engine)
    declared = census.columns_from_metadata(metadata) if metadata is not None else []
    return census.merge(recorded, declared)


def retire_data_key(
    name: str,
    version: int,
    *,
    metadata: sa.MetaData | None = None,
    columns: Sequence[ColumnRef] = (),
    schemas: Sequence[str] = (),
    progress: Progress | None = None,
    registry: KeyRegistry | None = None,
) -> list[Census]:
    """Retire ``name`` version ``version``: it no longer decrypts (an index key: matches).

    Refused while any column of the database holds a value under it: the known columns (those
    recorded by jobs, those of ``metadata`` and ``columns``) and every text and binary column
    of every table in the default schema and in ``schemas`` (``["*"]``: every schema but the
    system ones; ``progress`` hears of each table). Refused, too, until ``active_ttl`` (plus a
    margin) has passed on the database's clock since a newer version became active: until
    then a process may still write under it. Returns the census of the known columns.
    """
    registry = registry or get_registry()
    store = registry.key_store
    stored = store.get(name, version)
    if stored.state is KeyState.RETIRED:
        return []
    if stored.state not in (KeyState.READABLE, KeyState.ACTIVE):
        raise KeyStateError(f"{_what(stored)} is {stored.state.value}")
    if store.active_version(name) == version:
        raise KeyStateError(
            f"{_what(stored)} is the active version; rotate the key and "
            f"{_job(stored)} every column first"
        )
    store.upgrade()  # the grace periods need activated_at and retired_at
    # Cheap refusals first, the scan of the whole database last: it must start once no
    # process can write under the version any more.
    counts = _census_of_known_columns(stored, metadata, columns, registry, "retiring")
    _refuse_until_everyone_moved(store, stored, registry.active_ttl)
    _scan_every_column(stored, schemas, counts, progress, registry, "retiring")
    store.retire(name, version)
    registry.forget()
    log.info("%s %r version %d retired", _kind(stored), name, version)
    return counts


@dataclass(frozen=True)
class Destroyed:
    """What :func:`destroy_data_key` did: the census that allowed it, and what it erased."""

    name: str
    version: int
    scan: Scan
    erased: Erased
    grace_skipped: bool


def destroy_data_key(
    name: str,
    version: int,
    *,
    confirm: bool = False,
    grace_period: float = DESTROY_GRACE_PERIOD,
    skip_grace_period: bool = False,
    metadata: sa.MetaData | None = None,
    columns: Sequence[ColumnRef] = (),
    schemas: Sequence[str] = (),
    progress: Progress | None = None,
    registry: KeyRegistry | None = None,
) -> Destroyed:
    """Erase a RETIRED version's wrapped key for good (crypto-shredding). Needs ``confirm=True``.

    Refused until the version has been retired for ``grace_period`` seconds on the database's
    clock (3 days by default; ``skip_grace_period=True`` overrides it, loudly), and while any
    column holds a value under it (the census of :func:`retire_data_key`, run again).

    What it reaches: the key-store row stays as a tombstone (state ``destroyed``, empty wrapped
    key, so the version number is never reused); the wrapped key is overwritten, and on
    PostgreSQL the key table is rewritten (VACUUM FULL) without the old row versions.
    What it does not reach: the database's write-ahead/redo/undo logs and their archives,
    replicas, and backups still hold the old wrapped key, which the master key can unwrap:
    only retiring the master key itself (a shred) makes those copies useless.
    """
    registry = registry or get_registry()
    store = registry.key_store
    stored = store.get(name, version)
    if stored.state is not KeyState.RETIRED:
        raise KeyStateError(
            f"{_what(stored)} is {stored.state.value}; only a retired version can be destroyed"
        )
    if not confirm:
        raise KeyStateError(
            f"destroying {_what(stored)} makes every value ever written under it unreadable "
            "forever; pass confirm=True (--yes-destroy) to do it"
        )
    if grace_period < 0:
        raise ConfigurationError(f"grace_period must be 0 or more seconds, got {grace_period}")
    store.upgrade()
    stored = store.get(name, version)  # retired_at, filled in by the upgrade if it was missing
    _refuse_within_grace(store, stored, grace_period, skip_grace_period)
    counts = _census_of_known_columns(stored, metadata, columns, registry, "destroying")
    found = _scan_every_column(stored, schemas, counts, progress, registry, "destroying")
    erased = store.destroy(name, version)
    registry.forget()
    log.warning("%s %r version %d destroyed", _kind(stored), name, version)
    return Destroyed(name, version, found, erased, skip_grace_period)


def _census_of_known_columns(
    stored: StoredKey,
    metadata: sa.MetaData | None,
    columns: Sequence[ColumnRef],
    registry: KeyRegistry,
    doing: str,
) -> list[Census]:
    """Rows per version in the known columns of the key; refuses if any is on the version."""
    refs = [r for r in census.merge(known_columns(metadata, registry=registry), columns)
            if r.key == stored.name]  # fmt: skip
    counts = column_census(refs, registry=registry)
    _refuse_if_used(stored, {c.column: c.by_version.get(stored.version, 0) for c in counts}, doing)
    return counts


def _scan_every_column(
    stored: StoredKey,
    schemas: Sequence[str],
    known: Sequence[Census],
    progress: Progress | None,
    registry: KeyRegistry,
    doing: str,
) -> Scan:
    """Every text and binary column of the default schema, of ``schemas`` and of the known
    columns' schemas, searched for values under the version; refuses if any holds one."""
    name, version = stored.name, stored.version
    everywhere = [*schemas, *(c.column.schema for c in known if c.column.schema)]
    found = scan.scan_database(
        registry.key_store.engine, name, version, schemas=everywhere, progress=progress
    )
    log.info("scanned %d tables (%d columns) of %s for %r version %d in %.1f s", found.tables,
             found.columns, found.schema_names(), name, version, found.seconds)  # fmt: skip
    declared = {c.column.where() for c in known}
    _refuse_if_used(stored, {f.column: f.rows for f in found.found}, doing, declared)
    return found


def _refuse_if_used(
    stored: StoredKey,
    rows: dict[ColumnRef, int],
    doing: str,
    declared: set[tuple[str | None, str, str]] | None = None,
) -> None:
    """Refuse naming every column with rows on the version. With ``declared`` (the known
    columns), the others are marked undeclared: their jobs need the key named."""
    used = sorted((ref, n) for ref, n in rows.items() if n)
    if not used:
        return
    unknown = {ref for ref, _ in used if declared is not None and ref.where() not in declared}
    detail = ", ".join(
        f"{ref}: {n:,} rows" + (", undeclared" if ref in unknown else "") for ref, n in used
    )
    name = stored.name
    hint = f" (an undeclared column needs its key named: key={name!r} (CLI --key {name}))"
    raise KeyStateError(
        f"{_what(stored)} is still used ({detail}); {_job(stored)} these columns before {doing} "
        f"it{hint if unknown else ''}"
    )


def _refuse_until_everyone_moved(store: SqlKeyStore, stored: StoredKey, active_ttl: float) -> None:
    """Processes re-read the active version every active_ttl s: until then one may write."""
    now = store.clock()
    moved = store.superseded_at(stored.name, stored.version) or now
    ready = moved + timedelta(seconds=active_ttl + ACTIVE_TTL_MARGIN)
    if now < ready:
        left = (ready - now).total_seconds()
        raise KeyStateError(
            f"{_what(stored)} was superseded {(now - moved).total_seconds():.0f} s ago (database "
            f"clock): processes may write under it until active_ttl ({active_ttl:g} s) plus "
            f"{ACTIVE_TTL_MARGIN:g} s have passed; retry in {left:.0f} s"
        )


def _refuse_within_grace(
    store: SqlKeyStore, stored: StoredKey, grace_period: float, skip: bool
) -> None:
    now = store.clock()
    retired = stored.retired_at or now
    ends = retired + timedelta(seconds=grace_period)
    if now >= ends:
        return
    if skip:
        log.warning(
            "GRACE PERIOD SKIPPED: destroying %s %r version %d, retired only %.0f s ago "
            "(grace period %.0f s)",
            _kind(stored), stored.name, stored.version, (now - retired).total_seconds(),
            grace_period,
        )  # fmt: skip
        return
    left = _duration((ends - now).total_seconds())
    raise KeyStateError(
        f"{_what(stored)} was retired at {retired:%Y-%m-%d %H:%M:%S} UTC (database clock); "
        f"its grace period of {_duration(grace_period)} ends in {left} "
        f"({ends:%Y-%m-%d %H:%M:%S} UTC). Wait, or pass skip_grace_period=True "
        "(--skip-grace-period) to destroy it now"
    )


def _kind(stored: StoredKey) -> str:
    return "index key" if stored.kind == "index" else "data key"


def _what(stored: StoredKey) -> str:
    return f"{_kind(stored)} {stored.name!r} version {stored.version}"


def _job(stored: StoredKey) -> str:
    return "reindex" if stored.kind == "index" else "re-encrypt"


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    days, hours = s // 86400, s % 86400 // 3600
    return f"{days} days" + (f" {hours} h" if hours else "")

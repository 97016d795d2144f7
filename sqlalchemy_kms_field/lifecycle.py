"""Data key life cycle beyond create and rotate: rewrap (master key rotation), retire, destroy.

Rewrapping touches only the key store: O(keys), never a data row. Retiring a version is allowed
only when a census proves that no known column still holds a row on it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import EllipsisType

import sqlalchemy as sa

from . import census
from .census import Census, ColumnRef
from .exc import ConfigurationError, KeyStateError, MasterKeyError
from .key_store import KeyState, StoredKey
from .master_keys import AwsKmsMasterKey
from .registry import KeyRegistry, get_registry, key_context

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
    """
    registry = registry or get_registry()
    source = registry.application if from_application is ... else from_application
    done = []
    for stored in registry.key_store.versions():
        if names is not None and stored.name not in names:
            continue
        if stored.state not in SURVIVING:
            continue
        done.append(_rewrap_one(registry, stored, source))
    return done


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
    """Rows per key version for each column, by SQL on the header prefix (no decryption)."""
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
    registry: KeyRegistry | None = None,
) -> list[Census]:
    """Retire ``name`` version ``version`` once no known column holds a row on it.

    Known columns: those recorded by encrypt/re-encrypt jobs, those of ``metadata`` and
    ``columns``. A retired version no longer decrypts. Returns the census that allowed it.
    """
    registry = registry or get_registry()
    store = registry.key_store
    stored = store.get(name, version)
    if stored.state is KeyState.RETIRED:
        return []
    if stored.state not in (KeyState.READABLE, KeyState.ACTIVE):
        raise KeyStateError(f"data key {name!r} version {version} is {stored.state.value}")
    if store.active_version(name) == version:
        raise KeyStateError(
            f"data key {name!r} version {version} is the active version; rotate the key and "
            "re-encrypt every column first"
        )
    refs = [r for r in census.merge(known_columns(metadata, registry=registry), columns)
            if r.key == name]  # fmt: skip
    if not refs:
        raise ConfigurationError(
            f"no column is known to use data key {name!r}, so nothing proves version {version} "
            "unused: pass the model metadata (or --models), or re-encrypt the columns first"
        )
    counts = column_census(refs, registry=registry)
    still = [(c.column, c.by_version.get(version, 0)) for c in counts if c.by_version.get(version)]
    if still:
        detail = ", ".join(f"{ref}: {n} rows" for ref, n in still)
        raise KeyStateError(
            f"data key {name!r} version {version} is still used ({detail}); re-encrypt these "
            "columns before retiring it"
        )
    store.set_state(name, version, KeyState.RETIRED)
    registry.forget()
    log.info("data key %r version %d retired", name, version)
    return counts


def destroy_data_key(
    name: str, version: int, *, confirm: bool = False, registry: KeyRegistry | None = None
) -> None:
    """Erase a RETIRED version's wrapped key (crypto-shredding). Needs ``confirm=True``."""
    registry = registry or get_registry()
    stored = registry.key_store.get(name, version)
    if stored.state is not KeyState.RETIRED:
        raise KeyStateError(
            f"data key {name!r} version {version} is {stored.state.value}; only a retired "
            "version can be destroyed"
        )
    if not confirm:
        raise KeyStateError(
            f"destroying data key {name!r} version {version} makes every value ever written "
            "under it unreadable forever; pass confirm=True (--yes-destroy) to do it"
        )
    registry.key_store.destroy(name, version)
    registry.forget()
    log.warning("data key %r version %d destroyed", name, version)

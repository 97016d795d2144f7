"""Data key life cycle beyond create and rotate: rewrap (master key rotation), retire, destroy.

Rewrapping touches only the key store: O(keys), never a data row. Retiring a version is allowed
only when a census proves that no known column still holds a row on it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from . import census
from .census import Census, ColumnRef
from .exc import ConfigurationError, KeyStateError, MasterKeyError
from .key_store import KeyState
from .registry import KeyRegistry, get_registry, key_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rewrapped:
    name: str
    version: int
    old_master_key_id: str
    new_master_key_id: str


def rewrap_data_keys(
    names: Sequence[str] | None = None, *, registry: KeyRegistry | None = None
) -> list[Rewrapped]:
    """Rewrap every stored data key under the registry's current master key.

    Within AWS KMS the new wrapped key is made by ``ReEncrypt``; between providers (local to
    AWS, say) the key is unwrapped by the old master key, which must be listed in
    ``previous_master_keys``, and wrapped by the new one. Either way the old master key must
    still allow Decrypt during the rewrap: each new wrapped key is unwrapped and compared with
    the old one before it replaces it (compare-and-swap). No data row changes.
    """
    registry = registry or get_registry()
    master = registry.master_key
    done = []
    for stored in registry.key_store.versions():
        if names is not None and stored.name not in names:
            continue
        if stored.state not in (KeyState.ACTIVE, KeyState.READABLE, KeyState.RETIRED):
            continue
        context = key_context(stored.name, stored.version, stored.kind)
        old_master = registry._master_for(stored)
        plaintext = old_master.unwrap(stored.wrapped_key, context, stored.master_key_id)
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
        done.append(Rewrapped(stored.name, stored.version, stored.master_key_id, new_id))
    return done


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

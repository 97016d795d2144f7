"""A data key per tenant: chosen per row, created on first use, wrapped by an intermediate key.

A column declared ``EncryptedString(320, key="pii", tenant="tenant_id")`` encrypts the value of
each row under the data key of that row's tenant. The key hierarchy::

    master key (AWS KMS)  --wraps-->  intermediate key: data key "pii", version N (key store)
    intermediate key      --wraps-->  tenant key "pii.t.42", version M (kms_field_tenant_keys)
    tenant key            --encrypts-> the values of tenant 42: "kf2:pii.t.42:M:<body>"

A process makes one KMS call per intermediate-key version (the registry unwraps it once); every
tenant key is unwrapped locally (AES-GCM-SIV), kept in a bounded cache (entries and age), and
read again from its table at least every ``max_age`` seconds (never longer than the registry's
``active_ttl``), so a rotation or an erasure reaches every process in bounded time.

The tenant key's wrapped form is itself a kf2 value under the intermediate key
(``kf2:pii:N:...``), bound to its row (key name and version): the scan that ``keys retire``
runs finds tenant keys still wrapped by version N and refuses to retire it, like any value.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import flag_modified

from . import envelope, metrics
from .envelope import DataKey
from .exc import ConfigurationError, DecryptionError, KeyStateError
from .key_store import KeyState, utc_now
from .registry import KeyRegistry, get_registry

if TYPE_CHECKING:
    from .types import _EncryptedType

log = logging.getLogger(__name__)

TABLE_NAME = "kms_field_tenant_keys"
# base + ".h." + 32 hex digits must fit a key name (63 characters).
MAX_BASE_LENGTH = 63 - 3 - 32
_LITERAL = re.compile(r"[a-z0-9][a-z0-9-]*")
_STRIPES = 64  # single-flight locks, shared by tenants with the same hash


def check_base(base: str) -> str:
    """``base`` if it can be the intermediate key of tenant keys (short enough for their names)."""
    envelope.check_key_name(base)
    if len(base) > MAX_BASE_LENGTH:
        raise ConfigurationError(
            f"data key name {base!r} is too long to name tenant keys: with tenant=, use a key "
            f"name of at most {MAX_BASE_LENGTH} characters"
        )
    return base


def tenant_key_name(base: str, tenant: str) -> str:
    """The data key name of ``tenant`` (the text its tenant column gives) under ``base``.

    ``pii.t.42`` for tenant ids of lowercase letters, digits and '-' (integers, UUIDs) that fit;
    ``pii.h.<32 hex digits of SHA-256>`` for any other text. Either way the name is in every
    value's header, so SQL counts a tenant's rows with ``LIKE 'kf2:pii.t.42:%'``.
    """
    if not tenant:
        raise ConfigurationError(f"a tenant of data key {base!r} cannot be the empty string")
    literal = f"{base}.t.{tenant}"
    if len(literal) <= 63 and _LITERAL.fullmatch(tenant):
        return literal
    return f"{base}.h.{hashlib.sha256(tenant.encode('utf-8')).hexdigest()[:32]}"


def _binary_text(length: int) -> sa.types.TypeEngine[str]:
    # Exact comparisons on MySQL/MariaDB: names differing in case are different tenants, and
    # compare-and-swap on the wrapped key must be byte for byte.
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


_TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def tenant_table(metadata: sa.MetaData, name: str = TABLE_NAME) -> sa.Table:
    """One row per tenant key version; the primary key decides races between first writes."""
    return sa.Table(
        name,
        metadata,
        sa.Column("key_name", _binary_text(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("base", _binary_text(64), nullable=False),  # the intermediate key's name
        sa.Column("tenant", _binary_text(255), nullable=False),  # as CAST(tenant AS text) gives
        sa.Column("wrapped_key", _binary_text(255), nullable=False),  # '' once destroyed
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("retired_at", _TIMESTAMP, nullable=True),
        sa.Index(f"{name}_base_tenant", "base", "tenant"),
    )


def wrap_context(table: str, key_name: str, version: int) -> bytes:
    """The associated data binding a wrapped tenant key to its row (name and version)."""
    return envelope.encode_context(
        table, "wrapped_key", "tenant-key", [("key_name", key_name), ("version", str(version))]
    )


@dataclass
class _Entry:
    """What one process knows of one tenant key: its usable versions, unwrapped."""

    keys: dict[int, DataKey]
    active: DataKey | None
    states: dict[int, str]  # every version's state, for the errors
    loaded_at: float
    retired_at: datetime | None = None


@dataclass(frozen=True)
class TenantVersion:
    key_name: str
    version: int
    base: str
    tenant: str
    state: str
    created_at: datetime
    retired_at: datetime | None
    wrapped_by: int | None  # the intermediate key version; None once destroyed


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0  # entries read from the table (first use, expiry or eviction)
    created: int = 0  # tenant keys this process created
    evicted: int = 0
    loop_loads: int = 0  # loads inside a processor on an event loop (asyncio, not steady state)
    extra: dict[str, int] = field(default_factory=dict)


class TenantKeyring:
    """Tenant keys of one process: created on first use, unwrapped by intermediate keys from
    the registry, cached with a bound on entries (``max_keys``) and on age (``max_age`` s)."""

    def __init__(
        self,
        registry: KeyRegistry,
        *,
        max_keys: int = 100_000,
        max_age: float | None = None,
        table_name: str = TABLE_NAME,
    ) -> None:
        if max_keys < 1:
            raise ConfigurationError("max_keys must be at least 1")
        if max_age is None:
            max_age = registry.active_ttl
        if max_age < 0:
            raise ConfigurationError("max_age must be zero or more seconds")
        self.registry = registry
        self.engine = registry.key_store.engine
        self.max_keys = max_keys
        # Re-read at least every active_ttl: an erasure or rotation reaches every process then.
        self.max_age = min(max_age, registry.active_ttl)
        self.table = tenant_table(sa.MetaData(schema=registry.key_store.table.schema), table_name)
        self.stats = CacheStats()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        # (column type, tenant text) -> (entry, key name, encrypter): see seal()
        self._writers: dict[tuple[Any, str], tuple[_Entry, str, Callable[[bytes], str]]] = {}
        self._lock = threading.Lock()  # never held across a database call
        # Held across the load of a tenant's key: the registry's kind of lock, which a task on
        # an event loop awaits (asyncio.py) instead of blocking the loop's thread.
        self._stripes = [registry._new_lock() for _ in range(_STRIPES)]

    def __repr__(self) -> str:
        return f"TenantKeyring(table={self.table.fullname!r}, max_keys={self.max_keys})"

    def create_table(self) -> None:
        self.table.metadata.create_all(self.engine, checkfirst=True)

    def __len__(self) -> int:
        return len(self._cache)

    # Keys for values ---------------------------------------------------------------------

    def active_key(self, base: str, tenant: str) -> DataKey:
        """The key new values of ``tenant`` are written under; created on first use."""
        name = tenant_key_name(base, tenant)
        entry = self._entry(name, base, tenant, create=True)
        if entry.active is None:
            raise KeyStateError(self._unusable(base, tenant, entry, "write"))
        return entry.active

    def key(self, base: str, tenant: str, name: str, version: int) -> DataKey:
        """The key of a value read from a row of ``tenant``, whose header names ``name``."""
        expected = tenant_key_name(base, tenant)
        if name != expected:
            raise DecryptionError(
                f"the value was written under data key {name!r}, but its row belongs to tenant "
                f"{tenant!r}, whose key is {expected!r}: values cannot move between tenants"
            )
        entry = self._entry(name, base, tenant, create=False)
        key = entry.keys.get(version)
        if key is None:
            if version in entry.states and entry.states[version] == KeyState.READABLE:
                entry = self._entry(name, base, tenant, create=False, force=True)
                key = entry.keys.get(version)
            if key is None:
                raise DecryptionError(self._unusable(base, tenant, entry, "read", version))
        return key

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()
            self._writers.clear()

    def _entry(
        self, name: str, base: str, tenant: str, *, create: bool, force: bool = False
    ) -> _Entry:
        now = time.monotonic()
        entry = self._cache.get(name)
        if entry is not None and not force and now - entry.loaded_at < self.max_age:
            self.stats.hits += 1
            return entry
        with self._stripes[hash(name) % _STRIPES]:  # single flight per tenant
            entry = self._cache.get(name)
            fresh = entry is not None and time.monotonic() - entry.loaded_at < self.max_age
            if entry is not None and fresh and not force:
                return entry
            entry = self._load(name, base, tenant, create=create)
            self._remember(name, entry)
            return entry

    def _remember(self, name: str, entry: _Entry) -> None:
        """Cache ``entry`` as the newest, evicting the oldest beyond ``max_keys``."""
        with self._lock:
            self._cache[name] = entry
            self._cache.move_to_end(name)
            while len(self._cache) > self.max_keys:
                self._cache.popitem(last=False)
                self.stats.evicted += 1

    def _load(self, name: str, base: str, tenant: str, *, create: bool) -> _Entry:
        self._check_loop(f"loading the key of tenant {tenant!r} of data key {base!r}", base)
        started = time.monotonic()
        rows = self._rows(name)
        generated: bytes | None = None
        if not rows and create:
            generated = self._create(name, base, tenant)
            rows = self._rows(name)
        self.stats.loads += 1
        if metrics.ON:
            metrics.cache_miss("tenant")
        return self._entry_from(base, name, rows, started, generated)

    def _entry_from(
        self,
        base: str,
        name: str,
        rows: Sequence[Any],
        started: float,
        generated: bytes | None = None,
    ) -> _Entry:
        """The cache entry of ``rows``; ``generated``: the version 1 this process just stored,
        which must unwrap again to the same bytes before anything is written under it."""
        keys: dict[int, DataKey] = {}
        states: dict[int, str] = {}
        active: DataKey | None = None
        retired_at = None
        for row in rows:
            version, state = int(row.version), str(row.state)
            states[version] = state
            retired_at = row.retired_at or retired_at
            if state not in (KeyState.ACTIVE, KeyState.READABLE):
                continue
            raw = self._unwrap(base, name, version, str(row.wrapped_key))
            if version == 1 and generated is not None and not hmac.compare_digest(raw, generated):
                raise KeyStateError(
                    f"tenant key {name!r} version 1 did not verify: the stored wrapped key does "
                    "not unwrap to the generated key"
                )
            keys[version] = DataKey(name, version, raw)
            if state == KeyState.ACTIVE and (active is None or version > active.version):
                active = keys[version]
        return _Entry(keys, active, states, started, retired_at)

    def _rows(self, name: str) -> Sequence[Any]:
        t = self.table
        try:
            with self.engine.connect() as conn:
                return conn.execute(
                    sa.select(t.c.version, t.c.wrapped_key, t.c.state, t.c.retired_at)
                    .where(t.c.key_name == name)
                    .order_by(t.c.version)
                ).all()
        except (sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
            if sa.inspect(self.engine).has_table(t.name, schema=t.schema):
                raise
            raise ConfigurationError(
                f"the tenant key table {t.fullname!r} does not exist: create it with "
                "kf.create_tenant_table() (or `kms-field setup`)"
            ) from exc

    def _unwrap(self, base: str, name: str, version: int, wrapped: str) -> bytes:
        found = envelope.parse(wrapped)
        if found is None or found[1] != base:
            raise KeyStateError(
                f"tenant key {name!r} version {version} in {self.table.fullname} is not wrapped "
                f"by data key {base!r}; refusing to use it"
            )
        intermediate = self.registry.data_key(base, found[2])
        return intermediate.decrypt_text(wrapped, wrap_context(self.table.name, name, version))

    def _wrap(self, base: str, name: str, version: int, raw: bytes) -> str:
        intermediate = self.registry.active_key(base)
        return intermediate.encrypt_text(raw, wrap_context(self.table.name, name, version))

    def _create(self, name: str, base: str, tenant: str) -> bytes | None:
        """Version 1 of a new tenant's key (its bytes), or None if another process's insert won
        the race (decided by the primary key): the caller reads the winner's key back."""
        raw = os.urandom(envelope.KEY_SIZE)
        wrapped = self._wrap(base, name, 1, raw)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    self.table.insert().values(
                        key_name=name,
                        version=1,
                        base=base,
                        tenant=tenant,
                        wrapped_key=wrapped,
                        state=KeyState.ACTIVE.value,
                        created_at=utc_now(),
                    )
                )
        except sa.exc.IntegrityError:
            return None  # the winner's row is read back; this key was never used
        except sa.exc.OperationalError as exc:
            if self.engine.dialect.name != "sqlite" or "locked" not in str(exc.orig):
                raise
            ensure = (
                "await sqlalchemy_kms_field.asyncio.ensure_tenant_key"
                if self.registry.key_store.is_async
                else "kf.ensure_tenant_key"
            )
            raise ConfigurationError(
                f"cannot create the key of tenant {tenant!r} of data key {base!r}: the SQLite "
                "database is locked by a write transaction (yours?). On SQLite the first write "
                "of a new tenant must come before any other write of its transaction; or "
                f"create the key first with {ensure}({base!r}, {tenant!r})"
            ) from None
        self.stats.created += 1
        log.info("tenant key %r version 1 created", name)
        return raw

    def _check_loop(self, what: str, base: str) -> None:
        """On an event loop, a load is awaited inside SQLAlchemy's greenlet (an AsyncSession
        or AsyncConnection call); anywhere else it would block the loop: refused, naming the
        awaitable that does it ahead."""
        if not self.registry.key_store.is_async:
            return
        from sqlalchemy.util.concurrency import in_greenlet

        from .asyncio import _on_loop

        if not _on_loop():
            return
        if not in_greenlet():
            raise ConfigurationError(
                f"{what} would block the event loop here (outside an AsyncSession or "
                "AsyncConnection call): call `await sqlalchemy_kms_field.asyncio."
                f"ensure_tenant_key({base!r}, tenant)` before, or `await sqlalchemy_kms_field."
                f"asyncio.preload_tenants({base!r})` at start-up"
            )
        self.stats.loop_loads += 1

    def _unusable(
        self, base: str, tenant: str, entry: _Entry, action: str, version: int | None = None
    ) -> str:
        states = set(entry.states.values())
        who = f"tenant {tenant!r} of data key {base!r}"
        if states and states <= {KeyState.DESTROYED.value}:
            return f"cannot {action}: {who} was erased (its key versions are destroyed)"
        if states and states <= {KeyState.DESTROYED.value, KeyState.RETIRED.value}:
            return (
                f"cannot {action}: {who} is being erased (its keys were retired at "
                f"{entry.retired_at} UTC and will be destroyed after the grace period)"
            )
        if version is not None:
            state = entry.states.get(version, "missing")
            return f"cannot {action}: {who} has no usable key version {version} ({state})"
        return f"cannot {action}: {who} has no active key version"

    def preload(self, base: str, *, limit: int | None = None, batch_size: int = 10_000) -> int:
        """Unwrap the keys of up to ``limit`` (default ``max_keys``) tenants of ``base`` now, a
        batch of rows per query (at start-up, so that first requests do not wait)."""
        limit = self.max_keys if limit is None else min(limit, self.max_keys)
        t = self.table
        rows_by_name: dict[str, list[Any]] = {}
        last: str | None = None
        loaded = 0
        while loaded < limit:
            q = (
                sa.select(t.c.key_name, t.c.version, t.c.wrapped_key, t.c.state, t.c.retired_at)
                .where(t.c.base == base)
                .order_by(t.c.key_name, t.c.version)
                .limit(batch_size)
            )
            if last is not None:
                q = q.where(t.c.key_name > last)
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
            if not rows:
                break
            if len(rows) == batch_size:  # the last name may continue in the next batch
                rows = [r for r in rows if r.key_name != rows[-1].key_name] or rows
            rows_by_name.clear()
            for r in rows:
                rows_by_name.setdefault(r.key_name, []).append(r)
            for name, versions in rows_by_name.items():
                if loaded >= limit:
                    break
                entry = self._entry_from(base, name, versions, time.monotonic())
                if metrics.ON:
                    metrics.cache_miss("tenant")
                self._remember(name, entry)
                loaded += 1
            last = rows[-1].key_name
        return loaded

    # Administration -------------------------------------------------------------------------

    def versions(self, base: str, tenant: str | None = None) -> list[TenantVersion]:
        t = self.table
        q = sa.select(t).where(t.c.base == base).order_by(t.c.key_name, t.c.version)
        if tenant is not None:
            q = q.where(t.c.key_name == tenant_key_name(base, tenant))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        out = []
        for r in rows:
            found = envelope.parse(r.wrapped_key) if r.wrapped_key else None
            out.append(
                TenantVersion(
                    r.key_name,
                    int(r.version),
                    r.base,
                    r.tenant,
                    r.state,
                    r.created_at,
                    r.retired_at,
                    None if found is None else found[2],
                )
            )
        return out

    def rotate(self, base: str, tenant: str) -> DataKey:
        """Version N+1 of ``tenant``'s key, active at once; N stays readable. Values move to it
        with :func:`reencrypt_tenant`."""
        name = tenant_key_name(base, tenant)
        t = self.table
        for _ in range(20):
            raw = os.urandom(envelope.KEY_SIZE)
            try:
                with self.engine.begin() as conn:
                    rows = conn.execute(
                        sa.select(t.c.version, t.c.state).where(t.c.key_name == name)
                    ).all()
                    if not rows:
                        break
                    if not any(r.state == KeyState.ACTIVE for r in rows):
                        raise KeyStateError(f"tenant {tenant!r} of data key {base!r} is erased")
                    version = max(int(r.version) for r in rows) + 1
                    conn.execute(
                        t.insert().values(
                            key_name=name,
                            version=version,
                            base=base,
                            tenant=tenant,
                            wrapped_key=self._wrap(base, name, version, raw),
                            state=KeyState.ACTIVE.value,
                            created_at=utc_now(),
                        )
                    )
                    conn.execute(
                        t.update()
                        .where(t.c.key_name == name, t.c.version < version)
                        .where(t.c.state == KeyState.ACTIVE.value)
                        .values(state=KeyState.READABLE.value)
                    )
            except sa.exc.IntegrityError:
                continue  # a concurrent rotation took this number
            return self._entry(name, base, tenant, create=False, force=True).keys[version]
        raise KeyStateError(f"tenant {tenant!r} of data key {base!r} has no key to rotate")

    def rewrap(self, base: str, *, batch_size: int = 1000) -> int:
        """Rewrap every tenant key of ``base`` under its active intermediate version: O(tenants),
        no value row touched. Resumable: a rerun picks up the keys not yet on the active
        version; each batch commits with compare-and-swap on the old wrapped key."""
        t = self.table
        target = self.registry.active_key(base)
        done = 0
        last: tuple[str, int] | None = None
        while True:
            q = (
                sa.select(t.c.key_name, t.c.version, t.c.wrapped_key)
                .where(t.c.base == base, t.c.wrapped_key != "")
                .where(~_starts(t.c.wrapped_key, target.header))
                .order_by(t.c.key_name, t.c.version)
                .limit(batch_size)
            )
            if last is not None:
                q = q.where(sa.tuple_(t.c.key_name, t.c.version) > sa.tuple_(*last))
            with self.engine.connect() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return done
            params = []
            for name, version, wrapped in rows:
                ctx = wrap_context(t.name, name, version)
                raw = self._unwrap(base, name, version, wrapped)
                params.append(
                    {"k": name, "v": version, "old": wrapped, "new": target.encrypt_text(raw, ctx)}
                )
            stmt = (
                t.update()
                .where(
                    t.c.key_name == sa.bindparam("k"),
                    t.c.version == sa.bindparam("v"),
                    t.c.wrapped_key == sa.bindparam("old"),
                )
                .values(wrapped_key=sa.bindparam("new"))
            )
            with self.engine.begin() as conn:
                conn.execute(stmt, params)
            done += len(params)
            last = (rows[-1][0], rows[-1][1])


def _starts(column: sa.ColumnElement[str], prefix: str) -> sa.ColumnElement[bool]:
    from .census import starts_with

    return starts_with(column, prefix)


# The process-wide keyring, following the configured registry -------------------------------

_keyring: TenantKeyring | None = None
_settings: dict[str, Any] = {}
_keyring_lock = threading.Lock()


def configure_tenants(
    *, max_keys: int = 100_000, max_age: float | None = None, table_name: str = TABLE_NAME
) -> TenantKeyring:
    """Set the tenant-key cache bounds: at most ``max_keys`` tenants' keys in memory (the one
    loaded longest ago dropped first), each re-read after ``max_age`` seconds (default and at most
    the registry's ``active_ttl``). Optional; call after :func:`configure`."""
    global _keyring
    with _keyring_lock:
        _settings.clear()
        _settings.update(max_keys=max_keys, max_age=max_age, table_name=table_name)
        _keyring = TenantKeyring(get_registry(), **_settings)
    return _keyring


def get_keyring() -> TenantKeyring:
    """The keyring of the configured registry (rebuilt when :func:`configure` is called)."""
    global _keyring
    registry = get_registry()
    keyring = _keyring
    if keyring is None or keyring.registry is not registry:
        with _keyring_lock:
            keyring = _keyring
            if keyring is None or keyring.registry is not registry:
                keyring = _keyring = TenantKeyring(registry, **_settings)
    return keyring


def create_tenant_table() -> None:
    """Create the tenant key table (next to the key store) if it does not exist."""
    get_keyring().create_table()


def ensure_tenant_key(key: str, tenant: object) -> DataKey:
    """The active key of ``tenant`` under data key ``key``, created now if it has none (for
    onboarding a tenant ahead of its first write)."""
    return get_keyring().active_key(key, str(tenant))


def rotate_tenant_key(key: str, tenant: object) -> DataKey:
    """Add and activate version N+1 of ``tenant``'s key under data key ``key``."""
    return get_keyring().rotate(key, str(tenant))


def rewrap_tenant_keys(key: str, *, batch_size: int = 1000) -> int:
    """After ``rotate_data_key(key)``: rewrap every tenant key under the new version."""
    return get_keyring().rewrap(key, batch_size=batch_size)


# Hooks of the column types (types.py calls these for a column declared with tenant=) --------


def write_key(typ: _EncryptedType[Any], row: list[tuple[str, str]]) -> DataKey:
    tenant = _tenant_text(typ, row)
    return get_keyring().active_key(typ.key, tenant)


def seal(typ: _EncryptedType[Any], data: bytes, row: list[tuple[str, str]]) -> str:
    """The stored value of ``data`` in ``row`` of a tenant column. For a column bound to its
    tenant alone, the encrypter of each tenant's active key is kept with the cache entry it came
    from (as the read path does), so a value costs no context encoding or key-name work."""
    keyring = get_keyring()
    if typ.bind_to != (typ.tenant,):
        key = write_key(typ, row)
        if metrics.ON:  # under the column's key: never a series per tenant
            metrics.tenant_encrypted(typ.key, key.version)
        return key.encrypt_text(data, typ.row_context(row), typ.pad)
    tenant = row[0][1]
    cached = keyring._writers.get((typ, tenant))
    if cached is not None:
        entry, name, encrypt = cached
        if (
            keyring._cache.get(name) is entry
            and time.monotonic() - entry.loaded_at < keyring.max_age
        ):
            if metrics.ON and entry.active is not None:
                metrics.tenant_encrypted(typ.key, entry.active.version)
            return encrypt(data)
    key = write_key(typ, row)
    entry_now = keyring._cache.get(key.name)
    encrypt = key.text_encrypter(typ.row_context(row), typ.pad)
    if entry_now is not None and entry_now.active is key:
        if len(keyring._writers) >= keyring.max_keys:
            keyring._writers.clear()
        keyring._writers[(typ, tenant)] = (entry_now, key.name, encrypt)
    if metrics.ON:
        metrics.tenant_encrypted(typ.key, key.version)
    return encrypt(data)


def read_key(
    typ: _EncryptedType[Any], name: str, version: int, row: list[tuple[str, str]]
) -> DataKey:
    tenant = _tenant_text(typ, row)
    try:
        return get_keyring().key(typ.key, tenant, name, version)
    except DecryptionError as exc:
        raise DecryptionError(f"{typ._where()}: {exc}") from None


def _tenant_text(typ: _EncryptedType[Any], row: list[tuple[str, str]]) -> str:
    for name, text in row:
        if name == typ.tenant:
            if not text:
                raise DecryptionError(f"{typ._where()}: the row's tenant ({name}) is NULL")
            return text
    raise ConfigurationError(f"{typ._where()}: the row's tenant column {typ.tenant!r} is missing")


# ORM updates: the unit of work writes ``UPDATE ... SET email = ? WHERE id = ?``, without the
# row's tenant. When an object's tenant-keyed column changes, its tenant attribute is flagged as
# modified too, so that the UPDATE sets it (to the value it has) and the row-binding hook finds
# the tenant in the statement's parameters.

_tenant_attributes: dict[Any, list[tuple[str, str]]] = {}  # mapper -> (value attr, tenant attr)


def _tenant_pairs(mapper: Any) -> list[tuple[str, str]]:
    pairs = _tenant_attributes.get(mapper)
    if pairs is None:
        pairs = []
        for prop in mapper.column_attrs:
            for column in prop.columns:
                tenant = getattr(column.type, "tenant", None)
                if tenant is None or not isinstance(column, sa.Column):
                    continue
                tenant_column = column.table.c[tenant]
                tenant_prop = mapper.get_property_by_column(tenant_column)
                pairs.append((prop.key, tenant_prop.key))
        _tenant_attributes[mapper] = pairs
    return pairs


@event.listens_for(Mapper, "before_update")
def _include_tenant(mapper: Any, connection: Any, target: Any) -> None:
    pairs = _tenant_pairs(mapper)
    if not pairs:
        return
    state = sa.inspect(target)
    for value_key, tenant_key in pairs:
        if state.attrs[value_key].history.has_changes():
            flag_modified(target, tenant_key)


def result_processor(typ: _EncryptedType[Any], general: Callable[[Any], Any]) -> Any:
    """The read path of a tenant column bound to its tenant alone, without the general path's
    layers per value: the decrypter of each tenant's key version last read is kept (with the
    cache entry it came from, so that an expired or reloaded entry, an erasure say, sends the
    value back to the general path). Anything unusual takes the general path, which raises
    the errors."""
    from .row_binding import SEP

    deserialize = typ._deserializer()
    base = typ.key
    # tenant text -> (cache entry, tenant key name, header, decrypter, key); at most max_keys.
    seen: dict[str, tuple[_Entry, str, str, Callable[[str], bytes], DataKey]] = {}

    def learn(stored: str, tenant: str) -> None:
        keyring = get_keyring()
        name = tenant_key_name(base, tenant)
        found = envelope.parse(stored)
        if found is None or found[1] != name:
            return
        key = keyring.key(base, tenant, name, found[2])
        entry = keyring._cache.get(name)
        if entry is None or entry.keys.get(found[2]) is not key:
            return
        if len(seen) >= keyring.max_keys:
            seen.clear()
        seen[tenant] = (
            entry,
            name,
            key.header,
            key.text_decrypter(typ.row_context([(typ.tenant or "", tenant)])),
            key,
        )

    def process(value: Any) -> Any:
        if value.__class__ is str:
            stored, sep, tenant = value.rpartition(SEP)
            if sep:
                hit = seen.get(tenant)
                if hit is None:
                    try:
                        learn(stored, tenant)
                    except Exception:  # noqa: S110 - the general path raises it, plaintext-free
                        pass
                    hit = seen.get(tenant)
                if hit is not None and stored.startswith(hit[2]):
                    keyring = get_keyring()  # (configure() may have replaced it)
                    entry = hit[0]
                    if (
                        keyring._cache.get(hit[1]) is entry
                        and time.monotonic() - entry.loaded_at < keyring.max_age
                    ):
                        try:
                            decoded = deserialize(hit[3](stored))
                        except Exception:  # noqa: S110 - the general path raises, plaintext-free
                            pass
                        else:
                            if metrics.ON:
                                metrics.decrypted(hit[4], typ)
                            return decoded
                    else:
                        seen.pop(tenant, None)
        return general(value)

    return process


def tenant_match(attribute: Any, value: Any, *, tenant: object) -> sa.ColumnElement[bool]:
    """``tenant_id = :tenant AND email_index IN (...)``: rows of ``tenant`` whose encrypted
    ``attribute`` equals ``value`` (or one of a list of values), through a blind index declared
    with ``tenant=``. Index values of the same value under two tenants differ, so a lookup
    never finds another tenant's row, and a unique constraint on (tenant, index) is per tenant.
    """
    from .blind_index import BlindIndex, index_for, index_table

    index = index_for(attribute)
    if index is None:
        raise ConfigurationError(f"{attribute} has no BlindIndex column")
    typ = index.type
    assert isinstance(typ, BlindIndex)
    if typ.tenant is None:
        raise ConfigurationError(
            f"blind index {index.key!r} is not scoped to a tenant: compare with == instead"
        )
    if tenant is None:
        raise ConfigurationError("tenant_match needs the tenant (tenant=...)")
    values = list(value) if isinstance(value, list | tuple | set) else [value]
    where = index_table(index)
    hashes = sorted({h for v in values if v is not None for h in typ.candidates(v, where, tenant)})
    return sa.and_(index.table.c[typ.tenant] == tenant, index.in_(hashes))

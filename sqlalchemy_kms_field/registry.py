"""The process-wide registry of unwrapped data keys.

Each data key version is unwrapped by the master key once per process, even when many threads
ask for it at the same moment (single flight), then kept in memory. The state of every version
is re-read from the key store at most every ``active_ttl`` seconds, so every process moves to a
newly rotated version on its own and stops using a retired or destroyed one.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import sqlalchemy as sa

from . import envelope, metrics
from .envelope import DataKey, IndexKey
from .exc import ConfigurationError, KeyNotFoundError, KeyStateError, MasterKeyError
from .key_store import KeyState, SqlKeyStore, StoredKey
from .master_keys import Context, MasterKey

log = logging.getLogger(__name__)
T = TypeVar("T")

PURPOSES = {"data": "sqlalchemy-kms-field data key", "index": "sqlalchemy-kms-field index key"}
USABLE = frozenset({KeyState.ACTIVE, KeyState.READABLE})  # the states that unwrap
STALE_FACTOR = 3  # default stale_ttl: this many active_ttl
# Reads re-check the states at most this often even with a shorter active_ttl (active_ttl=0
# means "re-read before every write"; before every read it would cost a query per value).
READ_RECHECK = 0.2
_APPLICATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")


def key_context(
    name: str, version: int, kind: str = "data", application: str | None = None
) -> Context:
    """The KMS encryption context that binds a wrapped key to its purpose, name and version,
    and, when one is configured, to its application."""
    context = {"purpose": PURPOSES[kind], "key_name": name, "key_version": str(version)}
    if application is not None:
        context["application"] = application
    return context


def data_key_context(name: str, version: int, application: str | None = None) -> Context:
    """The KMS encryption context of a data key."""
    return key_context(name, version, "data", application)


def check_application(application: str | None) -> str | None:
    """``application`` if it is a valid application identifier (or None)."""
    if application is not None and not _APPLICATION.fullmatch(application):
        raise ConfigurationError(
            "application must be 1 to 64 letters, digits, '.', '_', '/' or '-', starting with "
            f"a letter or digit (got {application!r})"
        )
    return application


class KeyRegistry:
    """Unwrapped data keys for one process. Usually reached through :func:`configure`.

    Every ``active_ttl`` seconds the first use re-reads the state of every version from the key
    store (one query): a rotation is picked up, and a retired or destroyed version is dropped from
    memory. If the store cannot be read, the process goes on with what it last confirmed for at
    most ``stale_ttl`` seconds after that confirmation, then refuses to encrypt or decrypt.
    """

    def __init__(
        self,
        master_key: MasterKey,
        key_store: SqlKeyStore,
        *,
        active_ttl: float = 60.0,
        stale_ttl: float | None = None,
        previous_master_keys: Sequence[MasterKey] = (),
        application: str | None = None,
    ) -> None:
        if active_ttl < 0:
            raise ConfigurationError("active_ttl must be zero or more seconds")
        if stale_ttl is None:
            stale_ttl = STALE_FACTOR * max(active_ttl, READ_RECHECK)
        if stale_ttl < active_ttl:
            raise ConfigurationError(
                f"stale_ttl ({stale_ttl:g} s) must be at least active_ttl ({active_ttl:g} s)"
            )
        self.master_key = master_key
        self.previous_master_keys = tuple(previous_master_keys)
        self.key_store = key_store
        self.active_ttl = active_ttl
        self.stale_ttl = stale_ttl
        self.application = check_application(application)
        self._keys: dict[str, DataKey] = {}  # by header without its final ':'
        self._active: dict[str, DataKey] = {}
        self._index_keys: dict[tuple[str, int], IndexKey] = {}
        self._live_index: dict[str, list[IndexKey]] = {}
        self._states: dict[str, list[StoredKey]] = {}  # the key store as last read, by name
        self._confirmed_at = -math.inf  # monotonic time of the last successful read
        self._fresh_until = -math.inf  # writes trust the cached states until then
        self._read_until = -math.inf  # reads trust them until then (READ_RECHECK at least)
        self._generation = 0  # one more at each read of the states
        self._refresh_lock = self._new_lock()
        self._locks: dict[object, AbstractContextManager[object]] = {}
        self._locks_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyRegistry(master_key={self.master_key!r}, key_store={self.key_store!r})"

    def context(self, name: str, version: int, kind: str = "data") -> Context:
        """The KMS encryption context of a key version under this registry's application."""
        return key_context(name, version, kind, self.application)

    # Reading keys ----------------------------------------------------------------------------

    def key_for_header(self, head: str) -> DataKey | None:
        """The cached key for a header without its final ':' (``kf1:pii:2``), if unwrapped."""
        if time.monotonic() >= self._read_until:
            self._refresh()
        return self._keys.get(head)

    def data_key(self, name: str, version: int) -> DataKey:
        """Data key ``name`` version ``version``, unwrapping it on first use (single flight)."""
        if time.monotonic() >= self._read_until:
            self._refresh()
        head = envelope.header(name, version)[:-1]
        key = self._keys.get(head)
        if key is not None:
            return key
        with self._lock_for(head):
            key = self._keys.get(head)
            if key is None:
                generation = self._generation
                stored = self._fetch(name, version)
                _check_kind(stored, "data")
                key = DataKey(name, version, self._unwrap(stored))
                if self._still_usable(generation, name, version):
                    self._keys[head] = key
        return key

    def active_key(self, name: str) -> DataKey:
        """The version new values of ``name`` are written under (re-read every active_ttl s)."""
        key = self._active.get(name)
        if key is not None and time.monotonic() < self._fresh_until:
            return key
        if time.monotonic() >= self._fresh_until:
            self._refresh()
        with self._lock_for(("active", name)):
            key = self._active.get(name)
            if key is not None:
                return key
            generation = self._generation
            key = self.data_key(name, self._active_version(name))
            if generation == self._generation:  # else the states changed meanwhile: ask again
                self._active[name] = key
            return key

    def _active_version(self, name: str) -> int:
        stored = self._known(name)
        _check_kind(stored[0], "data")
        active = [s.version for s in stored if s.state is KeyState.ACTIVE]
        if not active:
            raise KeyNotFoundError(
                f"data key {name!r} has no active version; run rotate_data_key({name!r})"
            )
        return max(active)

    def _known(self, name: str) -> list[StoredKey]:
        """The versions of ``name`` as last read; read again once if the name is new here."""
        stored = self._states.get(name)
        if stored is None:
            self._refresh(force=True)
            stored = self._states.get(name)
        if not stored:
            self.key_store.get(name, 1)  # raises a clear KeyNotFoundError for unknown names
            raise KeyNotFoundError(f"no key named {name!r} in the key store")
        return stored

    def preload(self, names: Iterable[str] | None = None) -> list[DataKey]:
        """Unwrap every readable version of ``names`` (default: all) now, e.g. at start-up."""
        wanted = None if names is None else set(names)
        loaded = []
        for stored in self.key_store.versions():
            if wanted is not None and stored.name not in wanted:
                continue
            if stored.state not in USABLE:
                continue
            if stored.kind == "index":
                self.index_keys(stored.name)
            else:
                loaded.append(self.data_key(stored.name, stored.version))
        for name in {k.name for k in loaded}:
            self.active_key(name)
        return loaded

    def forget(self) -> None:
        """Drop every unwrapped key from memory (the next use unwraps again)."""
        with self._refresh_lock:
            self._fresh_until = self._read_until = -math.inf
            self._keys.clear()
            self._active.clear()
            self._index_keys.clear()
            self._live_index.clear()

    # Key states ------------------------------------------------------------------------------

    def _refresh(self, *, force: bool = False) -> None:
        """Re-read the state of every version (once for all threads) and drop what is no
        longer usable; on failure go on only within ``stale_ttl`` of the last confirmation."""
        with self._refresh_lock:
            started = time.monotonic()
            if not force and started < self._fresh_until:
                return  # another thread has just done it
            try:
                stored = self.key_store.versions()
            except (sa.exc.SQLAlchemyError, ConfigurationError) as exc:
                self._unconfirmed(started, exc)
                return
            self._apply(stored, started)

    def _apply(self, stored: list[StoredKey], started: float) -> None:
        states: dict[str, list[StoredKey]] = {}
        for s in stored:
            states.setdefault(s.name, []).append(s)
        usable = {(s.name, s.version) for s in stored if s.state in USABLE}
        # versions() is sorted by name and version: the highest active version wins.
        active = {s.name: s.version for s in stored if s.state is KeyState.ACTIVE}
        # In place, item by item: a thread unwrapping meanwhile must not lose its insert.
        for head, key in list(self._keys.items()):
            if (key.name, key.version) not in usable:
                del self._keys[head]
                log.info("data key %r version %d dropped from memory: no longer usable",
                         key.name, key.version)  # fmt: skip
        for pair in list(self._index_keys):
            if pair not in usable:
                del self._index_keys[pair]
        for name, key in list(self._active.items()):
            if active.get(name) != key.version:
                del self._active[name]
        self._live_index.clear()
        self._states = states
        self._generation += 1
        self._confirmed_at = started
        self._fresh_until = started + self.active_ttl
        self._read_until = started + max(self.active_ttl, READ_RECHECK)

    def _still_usable(self, generation: int, name: str, version: int) -> bool:
        """Whether a key just unwrapped may be cached: the states were not read again
        meanwhile, or the new read finds it usable too (else a refresh that ran during the
        unwrap could not have dropped it, and it would outlive active_ttl)."""
        if generation == self._generation:
            return True
        return any(s.version == version and s.state in USABLE for s in self._states.get(name, []))

    def _unconfirmed(self, now: float, exc: Exception) -> None:
        """The key store could not be read (down, renamed, or on SQLite locked by a long write
        transaction). Within ``stale_ttl`` of the last confirmation, go on with what it said
        and try again after ``active_ttl``; past it, fail closed: a version retired or
        destroyed meanwhile must not be used, and nothing may be written under a version that
        may have stopped being active long ago."""
        cause = (
            type(exc.orig).__name__ if isinstance(exc, sa.exc.DBAPIError) else type(exc).__name__
        )
        if self._confirmed_at == -math.inf:
            raise exc
        deadline = self._confirmed_at + self.stale_ttl
        if now >= deadline:
            raise KeyStateError(
                f"the key store {self.key_store.table.fullname!r} could not be read ({cause}) "
                f"for {now - self._confirmed_at:.3g} s, longer than stale_ttl "
                f"({self.stale_ttl:g} s): refusing to encrypt or decrypt with key versions "
                "whose state is unknown; fix the database connection (or raise stale_ttl)"
            ) from exc
        log.warning(
            "could not re-read the key versions from the key store (%s); going on with the "
            "versions known for at most %.3g s more",
            cause,
            deadline - now,
        )
        self._fresh_until = min(now + self.active_ttl, deadline)
        self._read_until = min(now + max(self.active_ttl, READ_RECHECK), deadline)

    # Creating and rotating -------------------------------------------------------------------

    def create_data_key(self, name: str, *, exist_ok: bool = False) -> DataKey:
        """Create version 1 of ``name``: generated, wrapped, stored, verified, then active."""
        envelope.check_new_key_name(name)
        if exist_ok and self.key_store.versions(name):
            return self.active_key(name)
        self.prove_master_key(f"create data key {name!r}")
        version = self.key_store.reserve_version(name, only_first=True)
        if version == 0:
            if exist_ok:
                return self.active_key(name)
            raise ConfigurationError(
                f"data key {name!r} already exists; use rotate_data_key({name!r}) for a new version"
            )
        return self._finish_new_version(name, version)

    def rotate_data_key(self, name: str) -> DataKey:
        """Add version N+1 of an existing key and make it active; older versions stay readable."""
        envelope.check_key_name(name)
        if not self.key_store.versions(name):
            raise KeyNotFoundError(
                f"no data key named {name!r} in the key store; "
                f"create it with create_data_key({name!r})"
            )
        self.prove_master_key(f"rotate data key {name!r}")
        return self._finish_new_version(name, self.key_store.reserve_version(name))

    def _finish_new_version(self, name: str, version: int, kind: str = "data") -> DataKey:
        plaintext = self._new_version(name, version, kind)
        key = DataKey(name, version, plaintext)
        self.key_store.activate(name, version)
        self._keys[key.header[:-1]] = key  # after activate: a refresh drops pending versions
        self._fresh_until = self._read_until = -math.inf  # read the states again at next use
        log.info("data key %r version %d stored, verified and activated", name, version)
        return key

    def _new_version(self, name: str, version: int, kind: str) -> bytes:
        try:
            return self._generate_and_verify(name, version, kind)
        except BaseException:
            # Nothing was written under this version: free its number, so that a retry of
            # create_data_key does not find a half-made key (KMS refused, process killed...).
            self.key_store.discard_pending(name, version)
            raise

    def _generate_and_verify(self, name: str, version: int, kind: str) -> bytes:
        context = self.context(name, version, kind)
        generated = self._master_call(self.master_key.generate_data_key, context)
        plaintext, wrapped, master_key_id = generated
        self.key_store.store_wrapped(name, version, wrapped, master_key_id)
        # Invariant 3: read back what was stored and unwrap it again before anything is
        # written under this version.
        stored = self.key_store.get(name, version)
        master = self._master_for(stored)
        again = self._master_call(master.unwrap, stored.wrapped_key, context, stored.master_key_id)
        if not hmac.compare_digest(again, plaintext):
            raise MasterKeyError(
                f"{kind} key {name!r} version {version} did not verify: the stored wrapped key "
                "does not unwrap to the generated key; it was not activated",
                code="VerificationFailed",
            )
        return plaintext

    def prove_master_key(self, action: str) -> None:
        """Refuse ``action`` (a write to the key store) unless the configured master key is the
        one that wraps the versions in use, and really unwraps the active ones (invariant 3).

        A master key that cannot read the key store must not write to it: a rotation under the
        wrong key would make a version that no application can unwrap the active one.
        """
        in_use = [s for s in self.key_store.versions() if s.state in USABLE]
        for stored in in_use:
            if not self.master_key.can_unwrap(stored.master_key_id):
                raise MasterKeyError(
                    f"refusing to {action}: {stored.kind} key {stored.name!r} version "
                    f"{stored.version} is wrapped by {stored.master_key_id}, not by the "
                    f"configured master key {self.master_key.key_id}, so nothing was written. "
                    "If this is the wrong master key, configure the right one; to move to a new "
                    "master key, rewrap first (`kms-field keys rewrap`, or rewrap_data_keys() in "
                    "Python) with the old key among the previous master keys",
                    code="WrongMasterKey",
                )
        for stored in in_use:
            if stored.state is KeyState.ACTIVE:
                try:
                    if stored.kind == "index":
                        self.index_key(stored.name, stored.version)
                    else:
                        self.data_key(stored.name, stored.version)
                except MasterKeyError as exc:
                    raise MasterKeyError(
                        f"refusing to {action}: the configured master key "
                        f"{self.master_key.key_id} cannot unwrap {stored.kind} key "
                        f"{stored.name!r} version {stored.version} ({exc.code}), so nothing was "
                        "written; configure the master key that wraps the key store, or rewrap "
                        "(`kms-field keys rewrap`, or rewrap_data_keys() in Python)",
                        code=exc.code,
                    ) from exc

    # Blind-index keys --------------------------------------------------------------------

    def create_index_key(self, name: str, *, exist_ok: bool = False) -> IndexKey:
        """Create version 1 of blind-index key ``name`` (separate from every data key)."""
        envelope.check_new_key_name(name)
        if exist_ok and self.key_store.versions(name):
            return self.index_keys(name)[0]
        self.prove_master_key(f"create index key {name!r}")
        version = self.key_store.reserve_version(name, only_first=True, kind="index")
        if version == 0:
            if exist_ok:
                return self.index_keys(name)[0]
            raise ConfigurationError(
                f"index key {name!r} already exists; use "
                f"rotate_index_key({name!r}) for a new version"
            )
        return self._finish_index_version(name, version)

    def rotate_index_key(self, name: str) -> IndexKey:
        """Add version N+1 of an index key; lookups match every live version until reindexed."""
        envelope.check_key_name(name)
        if not self.key_store.versions(name):
            raise KeyNotFoundError(
                f"no index key named {name!r} in the key store; "
                f"create it with create_index_key({name!r})"
            )
        self.prove_master_key(f"rotate index key {name!r}")
        return self._finish_index_version(name, self.key_store.reserve_version(name, kind="index"))

    def _finish_index_version(self, name: str, version: int) -> IndexKey:
        key = IndexKey(name, version, self._new_version(name, version, "index"))
        self.key_store.activate(name, version)
        self._index_keys[(name, version)] = key
        self._fresh_until = self._read_until = -math.inf
        log.info("index key %r version %d stored, verified and activated", name, version)
        return key

    def index_key(self, name: str, version: int) -> IndexKey:
        key = self._index_keys.get((name, version))
        if key is not None:
            return key
        with self._lock_for(("index", name, version)):
            key = self._index_keys.get((name, version))
            if key is None:
                generation = self._generation
                stored = self._fetch(name, version)
                _check_kind(stored, "index")
                key = IndexKey(name, version, self._unwrap(stored))
                if self._still_usable(generation, name, version):
                    self._index_keys[(name, version)] = key
        return key

    def index_keys(self, name: str) -> list[IndexKey]:
        """Live versions of index key ``name``, the active one first (re-read every active_ttl)."""
        keys = self._live_index.get(name)
        if keys is not None and time.monotonic() < self._fresh_until:
            return keys
        if time.monotonic() >= self._fresh_until:
            self._refresh()
        with self._lock_for(("live-index", name)):
            keys = self._live_index.get(name)
            if keys is not None:
                return keys
            generation = self._generation
            stored = self._states.get(name)
            if stored is None:
                self._refresh(force=True)
                stored = self._states.get(name)
            if not stored:
                raise KeyNotFoundError(
                    f"no index key named {name!r} in the key store; "
                    f"create it with create_index_key({name!r})"
                )
            _check_kind(stored[0], "index")
            active = max((s.version for s in stored if s.state is KeyState.ACTIVE), default=None)
            live = sorted(
                (s.version for s in stored if s.state in USABLE),
                key=lambda v: (v != active, -v),
            )
            if active is None or not live:
                raise KeyNotFoundError(f"index key {name!r} has no active version")
            keys = [self.index_key(name, v) for v in live]
            if generation == self._generation:
                self._live_index[name] = keys
            return keys

    # Internals -------------------------------------------------------------------------------

    def _unwrap(self, stored: StoredKey) -> bytes:
        if stored.state not in USABLE:
            raise KeyStateError(
                f"{stored.kind} key {stored.name!r} version {stored.version} is "
                f"{stored.state.value} and cannot be used"
            )
        context = self.context(stored.name, stored.version, stored.kind)
        master = self._master_for(stored)
        if metrics.ON:
            metrics.cache_miss(stored.kind)
        try:
            return self._master_call(
                master.unwrap, stored.wrapped_key, context, stored.master_key_id
            )
        except MasterKeyError as exc:
            raise MasterKeyError(
                f"{stored.kind} key {stored.name!r} version {stored.version} (wrapped by "
                f"{stored.master_key_id}) does not unwrap: {exc}",
                code=exc.code,
            ) from exc

    def _master_call(self, call: Callable[..., T], *args: Any) -> T:
        """A call to the master key (KMS over HTTP); the async registry makes it in a thread."""
        return call(*args)

    def _master_for(self, stored: StoredKey) -> MasterKey:
        """The configured master key that wrapped ``stored``; anything else is refused
        (invariant 9: a row planted by someone with write access to the database, wrapped by a
        KMS key they control, must never become usable)."""
        for master in (self.master_key, *self.previous_master_keys):
            if master.can_unwrap(stored.master_key_id):
                return master
        raise MasterKeyError(
            f"{stored.kind} key {stored.name!r} version {stored.version} in the key store is "
            f"wrapped by {stored.master_key_id or 'nothing'}, which is neither the configured "
            f"master key ({self.master_key.key_id}) nor one of previous_master_keys: refusing to "
            "use it. If that master key is yours, add it to previous_master_keys and rewrap; "
            "if not, someone wrote this row to the key store",
            code="UnexpectedMasterKey",
        )

    def _lock_for(self, what: object) -> AbstractContextManager[object]:
        with self._locks_lock:
            lock = self._locks.get(what)
            if lock is None:
                lock = self._locks[what] = self._new_lock()
            return lock

    # Overridden by asyncio.AsyncKeyRegistry, whose locks and loads must not block the loop.

    def _new_lock(self) -> AbstractContextManager[object]:
        """A lock held while the key store or the master key is called."""
        return threading.Lock()

    def _fetch(self, name: str, version: int) -> StoredKey:
        """The stored (wrapped) form of a key version, read from the key store."""
        return self.key_store.get(name, version)


_registry: KeyRegistry | None = None


def configure(
    *,
    master_key: MasterKey,
    key_store: SqlKeyStore,
    active_ttl: float = 60.0,
    stale_ttl: float | None = None,
    previous_master_keys: Sequence[MasterKey] = (),
    application: str | None = None,
) -> KeyRegistry:
    """Configure the process-wide registry that encrypted columns use.

    ``active_ttl``: how often (seconds) each process re-reads the key states. ``stale_ttl``
    (default ``3 * active_ttl``, at least 0.6 s): how long after its last successful read a
    process goes on when the key store cannot be read, before it refuses to encrypt and decrypt.
    ``previous_master_keys``: master keys that may still unwrap (during a rewrap).
    ``application``: an identifier bound into every wrapped key's encryption context, so that
    a wrapped key copied from another application's key store does not unwrap.

    Call once at start-up. Calling it again replaces the registry (and forgets unwrapped keys).
    With a key store on an async engine, the registry is an
    :class:`~sqlalchemy_kms_field.asyncio.AsyncKeyRegistry`: then ``await
    sqlalchemy_kms_field.asyncio.preload()`` at start-up.
    """
    global _registry
    cls = KeyRegistry
    if getattr(key_store, "is_async", False):  # asyncio: keys load without blocking the loop
        from .asyncio import AsyncKeyRegistry

        cls = AsyncKeyRegistry
    _registry = cls(
        master_key,
        key_store,
        active_ttl=active_ttl,
        stale_ttl=stale_ttl,
        previous_master_keys=previous_master_keys,
        application=application,
    )
    return _registry


def _check_kind(stored: StoredKey, kind: str) -> None:
    if stored.kind != kind:
        raise KeyStateError(
            f"{stored.name!r} is {'an' if stored.kind == 'index' else 'a'} {stored.kind} key; "
            f"it cannot be used as {'an' if kind == 'index' else 'a'} {kind} key"
        )


def get_registry() -> KeyRegistry:
    registry = _registry
    if registry is None:
        raise ConfigurationError(
            "sqlalchemy_kms_field is not configured: call sqlalchemy_kms_field.configure("
            "master_key=..., key_store=...) at start-up"
        )
    return registry


def create_data_key(name: str, *, exist_ok: bool = False) -> DataKey:
    """Create version 1 of data key ``name`` in the configured registry."""
    return get_registry().create_data_key(name, exist_ok=exist_ok)


def rotate_data_key(name: str) -> DataKey:
    """Add and activate version N+1 of data key ``name``."""
    return get_registry().rotate_data_key(name)


def create_index_key(name: str, *, exist_ok: bool = False) -> IndexKey:
    """Create version 1 of blind-index key ``name`` in the configured registry."""
    return get_registry().create_index_key(name, exist_ok=exist_ok)


def rotate_index_key(name: str) -> IndexKey:
    """Add and activate version N+1 of blind-index key ``name``."""
    return get_registry().rotate_index_key(name)


def preload(names: Iterable[str] | None = None) -> list[DataKey]:
    """Unwrap all readable data key versions now, so that no request waits for KMS."""
    return get_registry().preload(names)

"""The process-wide registry of unwrapped data keys.

Each data key version is unwrapped by the master key once per process, even when many threads
ask for it at the same moment (single flight), then kept in memory. The active version of each
name is re-read from the key store at most every ``active_ttl`` seconds, so every process moves
to a newly rotated version on its own.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

import sqlalchemy as sa

from . import envelope
from .envelope import DataKey, IndexKey
from .exc import ConfigurationError, KeyNotFoundError, KeyStateError, MasterKeyError
from .key_store import KeyState, SqlKeyStore, StoredKey
from .master_keys import Context, MasterKey

log = logging.getLogger(__name__)
T = TypeVar("T")

PURPOSES = {"data": "sqlalchemy-kms-field data key", "index": "sqlalchemy-kms-field index key"}


def key_context(name: str, version: int, kind: str = "data") -> Context:
    """The KMS encryption context that binds a wrapped key to its purpose, name and version."""
    return {"purpose": PURPOSES[kind], "key_name": name, "key_version": str(version)}


def data_key_context(name: str, version: int) -> Context:
    """The KMS encryption context of a data key."""
    return key_context(name, version, "data")


class KeyRegistry:
    """Unwrapped data keys for one process. Usually reached through :func:`configure`."""

    def __init__(
        self,
        master_key: MasterKey,
        key_store: SqlKeyStore,
        *,
        active_ttl: float = 60.0,
        previous_master_keys: Sequence[MasterKey] = (),
    ) -> None:
        if active_ttl < 0:
            raise ConfigurationError("active_ttl must be zero or more seconds")
        self.master_key = master_key
        self.previous_master_keys = tuple(previous_master_keys)
        self.key_store = key_store
        self.active_ttl = active_ttl
        self._keys: dict[str, DataKey] = {}  # by header without its final ':'
        self._active: dict[str, tuple[DataKey, float]] = {}
        self._index_keys: dict[tuple[str, int], IndexKey] = {}
        self._live_index: dict[str, tuple[list[IndexKey], float]] = {}
        self._locks: dict[object, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyRegistry(master_key={self.master_key!r}, key_store={self.key_store!r})"

    # Reading keys ----------------------------------------------------------------------------

    def key_for_header(self, head: str) -> DataKey | None:
        """The cached key for a header without its final ':' (``kf1:pii:2``), if unwrapped."""
        return self._keys.get(head)

    def data_key(self, name: str, version: int) -> DataKey:
        """Data key ``name`` version ``version``, unwrapping it on first use (single flight)."""
        head = envelope.header(name, version)[:-1]
        key = self._keys.get(head)
        if key is not None:
            return key
        with self._lock_for(head):
            key = self._keys.get(head)
            if key is None:
                stored = self.key_store.get(name, version)
                _check_kind(stored, "data")
                key = DataKey(name, version, self._unwrap(stored))
                self._keys[head] = key
        return key

    def active_key(self, name: str) -> DataKey:
        """The version new values of ``name`` are written under (re-read every active_ttl s)."""
        entry = self._active.get(name)
        now = time.monotonic()
        if entry is not None and now < entry[1]:
            return entry[0]
        with self._lock_for(("active", name)):
            entry = self._active.get(name)
            if entry is not None and time.monotonic() < entry[1]:
                return entry[0]
            try:
                version = self.key_store.active_version(name)
            except sa.exc.OperationalError as exc:
                if entry is None:
                    raise
                return self._keep(self._active, name, entry, exc)[0]
            if version is None:
                self.key_store.get(name, 1)  # raises a clear KeyNotFoundError for unknown names
                raise KeyNotFoundError(
                    f"data key {name!r} has no active version; run rotate_data_key({name!r})"
                )
            key = self.data_key(name, version)
            self._active[name] = (key, time.monotonic() + self.active_ttl)
            return key

    def preload(self, names: Iterable[str] | None = None) -> list[DataKey]:
        """Unwrap every readable version of ``names`` (default: all) now, e.g. at start-up."""
        wanted = None if names is None else set(names)
        loaded = []
        for stored in self.key_store.versions():
            if wanted is not None and stored.name not in wanted:
                continue
            if stored.state not in (KeyState.ACTIVE, KeyState.READABLE):
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
        self._keys.clear()
        self._active.clear()
        self._index_keys.clear()
        self._live_index.clear()

    # Creating and rotating -------------------------------------------------------------------

    def create_data_key(self, name: str, *, exist_ok: bool = False) -> DataKey:
        """Create version 1 of ``name``: generated, wrapped, stored, verified, then active."""
        envelope.check_key_name(name)
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
        return self._finish_new_version(name, self.key_store.reserve_version(name))

    def _finish_new_version(self, name: str, version: int, kind: str = "data") -> DataKey:
        plaintext = self._new_version(name, version, kind)
        key = DataKey(name, version, plaintext)
        self._keys[key.header[:-1]] = key
        self.key_store.activate(name, version)
        self._active.pop(name, None)
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
        context = key_context(name, version, kind)
        plaintext, wrapped, master_key_id = self.master_key.generate_data_key(context)
        self.key_store.store_wrapped(name, version, wrapped, master_key_id)
        # Invariant 3: read back what was stored and unwrap it again before anything is
        # written under this version.
        stored = self.key_store.get(name, version)
        again = self._master_for(stored).unwrap(stored.wrapped_key, context, stored.master_key_id)
        if not hmac.compare_digest(again, plaintext):
            raise MasterKeyError(
                f"{kind} key {name!r} version {version} did not verify: the stored wrapped key "
                "does not unwrap to the generated key; it was not activated",
                code="VerificationFailed",
            )
        return plaintext

    # Blind-index keys --------------------------------------------------------------------

    def create_index_key(self, name: str, *, exist_ok: bool = False) -> IndexKey:
        """Create version 1 of blind-index key ``name`` (separate from every data key)."""
        envelope.check_key_name(name)
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
        return self._finish_index_version(name, self.key_store.reserve_version(name, kind="index"))

    def _finish_index_version(self, name: str, version: int) -> IndexKey:
        key = IndexKey(name, version, self._new_version(name, version, "index"))
        self._index_keys[(name, version)] = key
        self.key_store.activate(name, version)
        self._live_index.pop(name, None)
        log.info("index key %r version %d stored, verified and activated", name, version)
        return key

    def index_key(self, name: str, version: int) -> IndexKey:
        key = self._index_keys.get((name, version))
        if key is not None:
            return key
        with self._lock_for(("index", name, version)):
            key = self._index_keys.get((name, version))
            if key is None:
                stored = self.key_store.get(name, version)
                _check_kind(stored, "index")
                key = IndexKey(name, version, self._unwrap(stored))
                self._index_keys[(name, version)] = key
        return key

    def index_keys(self, name: str) -> list[IndexKey]:
        """Live versions of index key ``name``, the active one first (re-read every active_ttl)."""
        entry = self._live_index.get(name)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        with self._lock_for(("live-index", name)):
            entry = self._live_index.get(name)
            if entry is not None and time.monotonic() < entry[1]:
                return entry[0]
            try:
                stored = self.key_store.versions(name)
                active = self.key_store.active_version(name)
            except sa.exc.OperationalError as exc:
                if entry is None:
                    raise
                return self._keep(self._live_index, name, entry, exc)[0]
            if not stored:
                raise KeyNotFoundError(
                    f"no index key named {name!r} in the key store; "
                    f"create it with create_index_key({name!r})"
                )
            _check_kind(stored[0], "index")
            live = sorted(
                (s.version for s in stored if s.state in (KeyState.ACTIVE, KeyState.READABLE)),
                key=lambda v: (v != active, -v),
            )
            if active is None or not live:
                raise KeyNotFoundError(f"index key {name!r} has no active version")
            keys = [self.index_key(name, v) for v in live]
            self._live_index[name] = (keys, time.monotonic() + self.active_ttl)
            return keys

    # Internals -------------------------------------------------------------------------------

    def _keep(
        self, cache: dict[str, tuple[T, float]], name: str, entry: tuple[T, float], exc: Exception
    ) -> tuple[T, float]:
        """The key store could not be read (down, or on SQLite locked by a long write
        transaction): go on with the versions known, and try again after ``active_ttl``.

        Nothing is lost by it: a value written under the version known is readable, and a
        re-encryption finds it by its header and moves it (its census sweeps again)."""
        log.warning(
            "could not re-read the live versions of key %r from the key store (%s); "
            "going on with the versions known and trying again in %.3g s",
            name,
            type(exc.orig).__name__ if isinstance(exc, sa.exc.DBAPIError) else type(exc).__name__,
            self.active_ttl,
        )
        kept = (entry[0], time.monotonic() + self.active_ttl)
        cache[name] = kept
        return kept

    def _unwrap(self, stored: StoredKey) -> bytes:
        if stored.state is not KeyState.ACTIVE and stored.state is not KeyState.READABLE:
            raise KeyStateError(
                f"{stored.kind} key {stored.name!r} version {stored.version} is "
                f"{stored.state.value} and cannot be used"
            )
        context = key_context(stored.name, stored.version, stored.kind)
        return self._master_for(stored).unwrap(stored.wrapped_key, context, stored.master_key_id)

    def _master_for(self, stored: StoredKey) -> MasterKey:
        for master in (self.master_key, *self.previous_master_keys):
            if master.can_unwrap(stored.master_key_id):
                return master
        raise ConfigurationError(
            f"data key {stored.name!r} version {stored.version} is wrapped by "
            f"{stored.master_key_id}, which is neither the configured master key nor one of "
            "previous_master_keys; configure it, or rewrap the data keys"
        )

    def _lock_for(self, what: object) -> threading.Lock:
        with self._locks_lock:
            lock = self._locks.get(what)
            if lock is None:
                lock = self._locks[what] = threading.Lock()
            return lock


_registry: KeyRegistry | None = None


def configure(
    *,
    master_key: MasterKey,
    key_store: SqlKeyStore,
    active_ttl: float = 60.0,
    previous_master_keys: Sequence[MasterKey] = (),
) -> KeyRegistry:
    """Configure the process-wide registry that encrypted columns use.

    Call once at start-up. Calling it again replaces the registry (and forgets unwrapped keys).
    """
    global _registry
    _registry = KeyRegistry(
        master_key, key_store, active_ttl=active_ttl, previous_master_keys=previous_master_keys
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

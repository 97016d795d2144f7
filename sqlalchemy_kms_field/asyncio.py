"""asyncio applications: a key store on an async engine, and keys that never block the loop.

SQLAlchemy runs the sync part of ``AsyncSession`` and async Core (bind and result processors
included) in a greenlet on the event loop's thread, and its async engines offer a sync facade
(``async_engine.sync_engine``) whose calls work only inside that greenlet. This module keeps
the library's code sync and bridges it the same way (``greenlet_spawn`` / ``await_only``):

- :class:`AsyncKeyRegistry` is the registry for a key store on an async engine (what
  :func:`sqlalchemy_kms_field.configure` builds for one). Its locks make a task that waits
  for another task's key load await, never block the thread (a ``threading.Lock`` held
  across an ``await`` by one task and wanted by another on the same thread deadlocks the loop).
- ``await preload()`` unwraps every readable key version (the master key's calls run in a
  worker thread) and starts a background task that re-reads the key states every
  ``active_ttl / 2`` seconds and unwraps any new version *before* the processors need it. In
  steady state no processor calls the database or KMS for keys.
- If a processor finds the states expired all the same (a late background refresh), it starts
  a refresh in a task of its own and goes on with the states known, within ``stale_ttl`` of
  the last successful read (the sync registry's rule when the store cannot be read).
- A key version not in memory is unwrapped from the wrapped key read with the states, and
  states past ``stale_ttl`` are re-read, in place when SQLAlchemy's greenlet allows it: the
  database query and the KMS call are awaited, the loop serves other tasks meanwhile.
- Where no greenlet runs (building a blind-index lookup, ``Model.email == ...``, or setting a
  column that has a blind index, outside a session call) a load would have to block the loop:
  it raises :class:`~sqlalchemy_kms_field.exc.ConfigurationError` naming the fix
  (``await preload()``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy.util.concurrency import await_only, greenlet_spawn, in_greenlet

from .envelope import DataKey, IndexKey, header
from .exc import ConfigurationError, KeyStateError
from .key_store import KeyState, SqlKeyStore, StoredKey
from .master_keys import MasterKey
from .registry import USABLE, KeyRegistry, get_registry

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_REFRESH_PERIOD = 0.05  # seconds between two background reads of the key states, at least

__all__ = [
    "AsyncKeyRegistry",
    "close",
    "create_data_key",
    "create_index_key",
    "ensure_tenant_key",
    "preload",
    "preload_tenants",
    "rotate_data_key",
    "rotate_index_key",
    "run_sync",
]


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _would_block(what: str) -> ConfigurationError:
    return ConfigurationError(
        f"{what} would block the event loop here (outside an AsyncSession or AsyncConnection "
        "call, where no database call can be awaited): call `await "
        "sqlalchemy_kms_field.asyncio.preload()` at start-up, which unwraps every readable "
        "version and keeps them fresh in the background"
    )


class _LoopAwareLock:
    """A lock that tasks on the event loop wait for by awaiting (in SQLAlchemy's greenlet),
    and other threads by blocking. On the loop, tasks first queue on an asyncio lock, so the
    thread lock is only ever contended by other threads, which never wait on the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._task_lock: asyncio.Lock | None = None
        self._task_lock_loop: asyncio.AbstractEventLoop | None = None
        self._task_held = False

    def _tasks(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._task_lock is None or self._task_lock_loop is not loop:
            self._task_lock, self._task_lock_loop = asyncio.Lock(), loop
        return self._task_lock

    def __enter__(self) -> _LoopAwareLock:
        if not _on_loop():
            self._lock.acquire()
            return self
        tasks = self._tasks()
        if in_greenlet():
            await_only(tasks.acquire())
            self._lock.acquire()
            self._task_held = True
            return self
        # Outside a greenlet nothing can await, so nothing under this lock yields to another
        # task: only a task suspended while holding it could make us wait, forever.
        if tasks.locked():
            raise _would_block("waiting for a key another task is loading")
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        held, self._task_held = self._task_held, False
        self._lock.release()
        if held and self._task_lock is not None:
            self._task_lock.release()


class AsyncKeyRegistry(KeyRegistry):
    """The registry of a process whose key store is on an async engine. See the module doc."""

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
        if not key_store.is_async:
            raise ConfigurationError(
                f"{key_store!r} is on a sync engine; give SqlKeyStore the async engine "
                "(create_async_engine(...)) or use sqlalchemy_kms_field.configure with a sync one"
            )
        super().__init__(
            master_key,
            key_store,
            active_ttl=active_ttl,
            stale_ttl=stale_ttl,
            previous_master_keys=previous_master_keys,
            application=application,
        )
        self.refresh_period = max(active_ttl / 2, MIN_REFRESH_PERIOD)
        self.loop_loads = 0  # keys and states loaded inside a processor on the loop (not steady)
        self.refreshes_started = 0  # refreshes a processor started in a task of their own
        self._soon: asyncio.Task[None] | None = None
        self._kept: set[str] | None = set()  # names the background refresh keeps; None: all
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # Hooks of KeyRegistry: what may run where -------------------------------------------------

    def _new_lock(self) -> AbstractContextManager[object]:
        return _LoopAwareLock()

    def _refresh(self, *, force: bool = False) -> None:
        if _on_loop():
            # On the loop, expired states are re-read by a task of their own while this one
            # goes on with those known, within stale_ttl of the last read (as the sync registry
            # does when the store cannot be read): a processor then needs no second connection
            # while its own holds one (many tasks doing so could exhaust the pool).
            age = time.monotonic() - self._confirmed_at
            if not force and age < self.stale_ttl:
                self._refresh_soon()
                return
            if not in_greenlet():
                if not force and self._task is not None and not self._task.done():
                    raise KeyStateError(
                        f"the key states were last read {age:.3g} s ago, longer than stale_ttl "
                        f"({self.stale_ttl:g} s): the background refresh is failing (see the "
                        "warnings it logs); refusing to use key versions whose state is unknown"
                    )
                raise _would_block("reading the key states")
            self.loop_loads += 1
        super()._refresh(force=force)

    def _refresh_soon(self) -> None:
        """Start a refresh in a task of its own, unless one is under way."""
        if self._soon is None or self._soon.done():
            self._soon = asyncio.get_running_loop().create_task(self._refresh_logged())
            self.refreshes_started += 1

    def _fetch(self, name: str, version: int) -> StoredKey:
        # The wrapped key as read with the states (within stale_ttl, the age the states are
        # trusted at anyway): a processor that loads it needs no second connection while its
        # request holds one, so requests missing a key cannot exhaust the pool.
        for stored in self._states.get(name, ()):
            if stored.version == version:
                return stored
        if _on_loop():
            if not in_greenlet():
                raise _would_block(f"loading key {name!r} version {version}")
            self.loop_loads += 1
        return super()._fetch(name, version)

    def _unwrap(self, stored: StoredKey) -> bytes:
        if _on_loop():
            if not in_greenlet():
                raise _would_block(f"unwrapping key {stored.name!r} version {stored.version}")
            self.loop_loads += 1
        return super()._unwrap(stored)

    def _master_call(self, call: Callable[..., T], *args: Any) -> T:
        """The master key's call (KMS over HTTP) in a worker thread where this runs in
        SQLAlchemy's greenlet on the loop (a processor's load, the background refresh, an
        awaited rotation): this task awaits it and the loop serves the others meanwhile."""
        if _on_loop() and in_greenlet():
            result: T = await_only(asyncio.to_thread(call, *args))
            return result
        return call(*args)

    # Preload and background refresh ----------------------------------------------------------

    async def preload_async(
        self, names: Iterable[str] | None = None, *, refresh: bool = True
    ) -> list[DataKey]:
        """Unwrap every readable version of ``names`` (default: all) without blocking the
        loop, and (``refresh=True``) keep them fresh with a background task from now on."""
        if names is None:
            self._kept = None
        elif self._kept is not None:
            self._kept.update(names)
        await self.refresh_async()
        if refresh and (self._task is None or self._task.done()):
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(
                self._refresh_forever(self._stop), name="kms-field-refresh"
            )
        return [k for k in list(self._keys.values()) if self._wanted(k.name)]

    async def refresh_async(self) -> None:
        """Re-read the key states and unwrap every newly usable version of the kept names
        before the processors can ask for it; then point them at the new active versions."""
        started = time.monotonic()
        try:
            stored = await greenlet_spawn(self.key_store.versions)
        except Exception:
            # Let the registry judge (go on within stale_ttl, or fail closed, loudly).
            await greenlet_spawn(KeyRegistry._refresh, self, force=True)
            return
        for s in stored:
            if s.state in USABLE and self._wanted(s.name):
                await self._load(s)
        await greenlet_spawn(self._apply_and_warm, stored, started)

    async def _load(self, stored: StoredKey) -> None:
        try:
            await greenlet_spawn(self._load_once, stored)
        except Exception as exc:  # a processor that needs it retries, and raises clearly
            log.warning(
                "could not unwrap %s key %r version %d in the background (%s)",
                stored.kind,
                stored.name,
                stored.version,
                type(exc).__name__,
            )

    def _load_once(self, stored: StoredKey) -> None:
        """Unwrap ``stored`` unless in memory, under the lock a processor's load of the same
        version takes (single flight: one unwrap per version, whoever asks first)."""
        name, version = stored.name, stored.version
        if stored.kind == "index":
            with self._lock_for(("index", name, version)):
                if (name, version) not in self._index_keys:
                    key = IndexKey(name, version, KeyRegistry._unwrap(self, stored))
                    self._index_keys[(name, version)] = key
            return
        head = header(name, version)[:-1]
        with self._lock_for(head):
            if head not in self._keys:
                self._keys[head] = DataKey(name, version, KeyRegistry._unwrap(self, stored))

    def _apply_and_warm(self, stored: list[StoredKey], started: float) -> None:
        with self._refresh_lock:
            self._apply(stored, started)
        # Everything is in memory now: these only fill the active and live-index maps.
        for name in {s.name for s in stored if self._wanted(s.name)}:
            kinds = {s.kind for s in stored if s.name == name}
            active = any(s.state is KeyState.ACTIVE for s in stored if s.name == name)
            if not active:
                continue
            if kinds == {"index"}:
                self.index_keys(name)
            elif kinds == {"data"}:
                self.active_key(name)

    def _wanted(self, name: str) -> bool:
        return self._kept is None or name in self._kept

    async def _refresh_forever(self, stop: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self.refresh_period)
                return  # close(): never cancelled in the middle of a query
            except TimeoutError:
                pass
            await self._refresh_logged()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh_async()
        except Exception as exc:
            log.warning(
                "refreshing the key states failed (%s); retrying in %.3g s",
                type(exc).__name__,
                self.refresh_period,
            )

    async def close(self) -> None:
        """Stop the background refresh (e.g. at shutdown, before disposing of the engine)."""
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            await task
        soon, self._soon = self._soon, None
        if soon is not None:
            await soon  # a refresh a processor started: let its query finish


# Module-level conveniences, like the sync ones, for the configured registry ----------------


def _async_registry() -> AsyncKeyRegistry:
    registry = get_registry()
    if not isinstance(registry, AsyncKeyRegistry):
        raise ConfigurationError(
            "the configured key store is on a sync engine; for an asyncio application give "
            "SqlKeyStore the async engine: configure(key_store=SqlKeyStore(async_engine), ...)"
        )
    return registry


async def run_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a sync function of this library (``store.create_table``, ``registry.retire``...)
    where its key-store calls await the async engine and its master-key calls (KMS) run in a
    worker thread: the loop serves other tasks meanwhile."""
    result: T = await greenlet_spawn(fn, *args, **kwargs)
    return result


async def preload(names: Iterable[str] | None = None, *, refresh: bool = True) -> list[DataKey]:
    """Unwrap all readable key versions (of ``names``) now, and keep them fresh in the
    background, so that no request waits for KMS or the key store. Call it at start-up."""
    return await _async_registry().preload_async(names, refresh=refresh)


async def close() -> None:
    """Stop the background refresh of the configured registry."""
    await _async_registry().close()


async def ensure_tenant_key(key: str, tenant: object) -> DataKey:
    """``await``-able :func:`sqlalchemy_kms_field.ensure_tenant_key`: the active key of
    ``tenant`` under data key ``key``, created now if it has none (onboarding a tenant)."""
    from .tenants import ensure_tenant_key as ensure

    return await run_sync(ensure, key, tenant)


async def preload_tenants(key: str, *, limit: int | None = None) -> int:
    """Unwrap the keys of up to ``limit`` (default: the cache's ``max_keys``) tenants of data
    key ``key`` now (at start-up, after :func:`preload`): the number of tenants loaded.

    A tenant key not in memory (a new tenant, one past the cache's bounds, or an entry older
    than its ``max_age``) is read inside the processor that needs it, awaited: the loop serves
    other tasks meanwhile, but that request holds a second connection of the pool for it."""
    from .tenants import get_keyring

    return await run_sync(get_keyring().preload, key, limit=limit)


def _admin(method: str) -> Callable[..., Awaitable[Any]]:
    async def call(name: str, **kwargs: Any) -> Any:
        return await run_sync(getattr(_async_registry(), method), name, **kwargs)

    call.__name__ = method
    call.__doc__ = f"``await``-able :func:`sqlalchemy_kms_field.{method}`."
    return call


create_data_key = _admin("create_data_key")
rotate_data_key = _admin("rotate_data_key")
create_index_key = _admin("create_index_key")
rotate_index_key = _admin("rotate_index_key")

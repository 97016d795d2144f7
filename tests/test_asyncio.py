"""asyncio applications (issue 12): the key store on an async engine, the column types and blind
indexes under AsyncSession and async Core on aiosqlite, asyncpg and asyncmy (MariaDB), no
deadlock when many tasks need a key refresh at once, no key I/O inside processors once
preloaded, a clear error where a load would block the loop, and a rotation plus re-encryption
by another process picked up within active_ttl without stalling the loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import sqlalchemy_kms_field as kf
import sqlalchemy_kms_field.asyncio as kfa
from sqlalchemy_kms_field import registry as kf_registry
from tests.async_support import PEOPLE, Base, Memo, Person, StallProbe, async_url
from tests.helpers import (
    MASTER_KEY_B64,
    MASTER_KEY_BYTES,
    local_master_key,
    raw_values,
    reset_global_registry,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)


def run_in_thread(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    """Run a coroutine on a fresh loop in a thread: a deadlocked loop (which no asyncio
    timeout can interrupt) shows up as a thread still alive after ``timeout``."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coro_fn())  # type: ignore[arg-type]
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return "deadlocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


async def setup(engine: AsyncEngine, active_ttl: float, **kw: Any) -> kf.KeyRegistry:
    store = kf.SqlKeyStore(engine)
    await kfa.run_sync(store.create_table)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    registry = kf.configure(
        master_key=local_master_key(), key_store=store, active_ttl=active_ttl, **kw
    )
    await kfa.create_data_key("pii")
    await kfa.create_index_key("email-index")
    return registry


async def request(engine: AsyncEngine, i: int) -> None:
    """What a request handler does: insert a row, find it by its email, read it back."""
    async with AsyncSession(engine) as session:
        session.add(Person(id=i, email=f"User{i}@Example.org"))
        await session.commit()
        found = (
            await session.scalars(sa.select(Person).where(Person.email == f"user{i}@example.org"))
        ).one()
        assert found.id == i and found.email == f"User{i}@Example.org"


@pytest.fixture
def aurl(db_url: str) -> str:
    return async_url(db_url)


def test_the_key_store_takes_an_async_engine_orm_and_core(aurl: str, engine: sa.Engine) -> None:
    """The issue's first failure: SqlKeyStore(async_engine) raised TypeError at the first
    key fetch. Now the ORM, async Core and blind-index lookups work on each async driver."""

    async def scenario() -> list[Any]:
        aengine = create_async_engine(aurl)
        try:
            registry = await setup(aengine, active_ttl=60)
            assert isinstance(registry, kfa.AsyncKeyRegistry)
            loaded = await kfa.preload()
            assert {(k.name, k.version) for k in loaded} == {("pii", 1)}
            await asyncio.gather(*(request(aengine, i) for i in range(1, 21)))
            async with aengine.begin() as conn:  # async Core
                await conn.execute(PEOPLE.insert(), [{"id": 100, "email": "core@example.org"}])
                rows = (
                    await conn.execute(
                        sa.select(PEOPLE.c.id, PEOPLE.c.email).where(
                            PEOPLE.c.email == "CORE@example.org"
                        )
                    )
                ).all()
            return [tuple(r) for r in rows]
        finally:
            await kfa.close()
            await aengine.dispose()

    assert run_in_thread(scenario) == [(100, "core@example.org")]
    stored = raw_values(engine, "async_people", "email")
    assert len(stored) == 21 and all(v.startswith("kf2:pii:1:") for v in stored)
    assert not any("example.org" in v.lower() for v in stored)


@pytest.mark.databases("sqlite")
def test_the_plain_registry_on_an_async_engine_fails_or_deadlocks(aurl: str) -> None:
    """The issue's workaround, reproduced: past active_ttl, either a blind-index lookup built
    on the loop re-reads the states outside SQLAlchemy's greenlet (MissingGreenlet), or the
    sync registry's thread lock, held by a task awaiting the key store, blocks the thread
    when a second task on the loop wants it (deadlock)."""

    async def scenario() -> None:
        aengine = create_async_engine(aurl)
        try:
            await setup(aengine, active_ttl=0.3)
            registry = kf.get_registry()
            plain = kf.KeyRegistry(registry.master_key, registry.key_store, active_ttl=0.3)
            kf_registry._registry = plain
            await asyncio.gather(*(request(aengine, i) for i in range(20)))
            await asyncio.sleep(0.5)  # past active_ttl: every task wants to re-read the states
            await asyncio.gather(*(request(aengine, i) for i in range(20, 60)))
        finally:
            await aengine.dispose()

    try:
        outcome = run_in_thread(scenario, timeout=15)
    except sa.exc.SQLAlchemyError as exc:
        outcome = type(exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc).__name__
    assert outcome in ("deadlocked", "MissingGreenlet")


@pytest.mark.parametrize("stale_ttl", [0.9, 0.3], ids=["within-stale-ttl", "past-stale-ttl"])
def test_many_tasks_finding_the_states_expired_do_not_deadlock(aurl: str, stale_ttl: float) -> None:
    """Without the background refresh, tasks find the states expired. Within stale_ttl the
    first one starts a refresh in a task of its own and all go on; past it each re-reads them
    in place, and they await one another instead of blocking the loop. (No blind-index lookup
    here: its hashes are computed outside a session call, where nothing can re-read the
    states; see the next tests.
    12 tasks: past stale_ttl each holds a connection while it needs another for the key
    store, so more tasks than the pool's 15 connections would wait for the pool's timeout.)"""

    async def one(aengine: AsyncEngine, i: int) -> None:
        async with AsyncSession(aengine) as session:
            session.add(Memo(id=i, text=f"memo {i}"))
            await session.commit()
            session.expunge_all()
            found = await session.get(Memo, i)
            assert found is not None and found.text == f"memo {i}"

    async def scenario() -> tuple[int, int]:
        aengine = create_async_engine(aurl)
        try:
            registry = await setup(aengine, active_ttl=0.3, stale_ttl=stale_ttl)
            assert isinstance(registry, kfa.AsyncKeyRegistry)
            await kfa.preload(refresh=False)
            loads, started = registry.loop_loads, registry.refreshes_started
            await asyncio.gather(*(one(aengine, i) for i in range(12)))
            await asyncio.sleep(0.5)
            await asyncio.gather(*(one(aengine, i) for i in range(12, 24)))
            await kfa.close()  # waits for a refresh a processor started
            return registry.loop_loads - loads, registry.refreshes_started - started
        finally:
            await kfa.close()
            await aengine.dispose()

    outcome = run_in_thread(scenario, timeout=60)
    assert outcome != "deadlocked"
    loads, started = outcome
    if stale_ttl > 0.5:
        assert started >= 1 and loads == 0  # re-read by a task of its own
    else:
        assert loads >= 1  # re-read in place, awaited


@pytest.mark.databases("sqlite", "postgresql")
def test_once_preloaded_no_processor_loads_keys(aurl: str) -> None:
    """The background refresh re-reads the states every active_ttl / 2: across several
    active_ttl, no processor (nor a blind-index lookup built outside a session call) loads
    a key or the states."""

    async def scenario() -> tuple[int, int]:
        aengine = create_async_engine(aurl)
        try:
            registry = await setup(aengine, active_ttl=0.5)
            assert isinstance(registry, kfa.AsyncKeyRegistry)
            await kfa.preload()
            before = registry.loop_loads
            deadline = time.monotonic() + 2.0  # four times active_ttl
            i = 0
            while time.monotonic() < deadline:
                criterion = Person.email == "nobody@example.org"  # built on the loop
                await asyncio.gather(*(request(aengine, i + j) for j in range(10)))
                async with AsyncSession(aengine) as session:
                    assert (await session.scalars(sa.select(Person).where(criterion))).all() == []
                i += 10
            return registry.loop_loads - before, i
        finally:
            await kfa.close()
            await aengine.dispose()

    loads, served = run_in_thread(scenario)
    assert served >= 20
    assert loads == 0


@pytest.mark.databases("sqlite")
def test_a_load_that_would_block_the_loop_says_how_to_avoid_it(aurl: str) -> None:
    async def scenario() -> None:
        aengine = create_async_engine(aurl)
        try:
            await setup(aengine, active_ttl=60)
            kf.get_registry().forget()
            Person.email == "ann@example.org"  # noqa: B015 - hashes with the index key
        finally:
            await kfa.close()
            await aengine.dispose()

    with pytest.raises(kf.ConfigurationError, match=r"would block the event loop.*preload\(\)"):
        run_in_thread(scenario)


def test_which_registry_a_store_gets(engine: sa.Engine, aurl: str) -> None:
    """An async engine, or its sync facade, gets the AsyncKeyRegistry; a sync engine cannot."""
    with pytest.raises(kf.ConfigurationError, match="async engine"):
        kfa.AsyncKeyRegistry(local_master_key(), kf.SqlKeyStore(engine))
    assert not isinstance(
        kf.configure(master_key=local_master_key(), key_store=kf.SqlKeyStore(engine)),
        kfa.AsyncKeyRegistry,
    )
    aengine = create_async_engine(aurl)
    for store in (kf.SqlKeyStore(aengine), kf.SqlKeyStore(aengine.sync_engine)):
        assert store.is_async and store.engine is aengine.sync_engine
        registry = kf.configure(master_key=local_master_key(), key_store=store)
        assert isinstance(registry, kfa.AsyncKeyRegistry)


@pytest.mark.databases("postgresql")
def test_a_rotation_by_another_process_is_picked_up_without_a_stall(
    db_url: str, aurl: str, engine: sa.Engine
) -> None:
    """An asyncpg application serves concurrent requests while another process rotates the
    key and re-encrypts the column: the application writes under the new version within
    active_ttl of the rotation, every row stays readable, the event loop never stalls for more
    than a few milliseconds, and a processor loads a key at most once: when a request reads a
    row the other process re-encrypted before this one's background refresh saw the new
    version (the job starts right after the rotation), one task reads that version and unwraps
    it, awaited, while the others wait for it (single flight)."""
    active_ttl = 1.0

    async def scenario() -> dict[str, Any]:
        aengine = create_async_engine(aurl, pool_size=10)
        probe = StallProbe()
        try:
            registry = await setup(aengine, active_ttl=active_ttl)
            assert isinstance(registry, kfa.AsyncKeyRegistry)
            await kfa.preload()
            refreshes: list[tuple[float, float]] = []  # when the background refresh ran
            refresh = registry.refresh_async

            async def timed_refresh() -> None:
                started = time.monotonic()
                try:
                    await refresh()
                finally:
                    refreshes.append((started, time.monotonic() + probe.tick))

            registry.refresh_async = timed_refresh  # type: ignore[method-assign]
            await asyncio.gather(*(request(aengine, i) for i in range(1, 301)))
            before = registry.loop_loads
            first_v2: list[float] = []
            stop = asyncio.Event()
            counter = iter(range(1000, 10**6))

            async def client() -> None:
                while not stop.is_set():
                    i = next(counter)
                    await request(aengine, i)
                    async with aengine.connect() as conn:
                        raw = (
                            await conn.execute(
                                sa.text("SELECT email FROM async_people WHERE id = :i"), {"i": i}
                            )
                        ).scalar_one()
                    if raw.startswith("kf2:pii:2:") and not first_v2:
                        first_v2.append(time.monotonic())
                    await asyncio.sleep(0.005)

            probe.start()
            clients = [asyncio.create_task(client()) for _ in range(8)]
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                os.path.join(ROOT, "tests", "async_rotate_worker.py"),
                db_url,
                "async_people",
                "email",
                str(active_ttl),
                cwd=ROOT,
                env={**os.environ, "KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64},
                stdout=asyncio.subprocess.PIPE,
            )
            assert worker.stdout is not None
            rotated_line = (await worker.stdout.readline()).decode().split()
            assert rotated_line[:2] == ["rotated", "2"], rotated_line
            rotated_at = float(rotated_line[2])
            done_line = (await asyncio.wait_for(worker.stdout.readline(), 120)).decode()
            assert await worker.wait() == 0
            stop.set()
            await asyncio.gather(*clients)
            await probe.stop()
            async with AsyncSession(aengine) as session:  # everything still reads
                people = (await session.scalars(sa.select(Person))).all()
                assert all(p.email == f"User{p.id}@Example.org" for p in people)
            return {
                "picked_up_after": first_v2[0] - rotated_at if first_v2 else None,
                "loop_loads": registry.loop_loads - before,
                "longest_stall": probe.longest(),
                "longest_stall_in_refresh": max(probe.longest(a, b) for a, b in refreshes),
                "refreshes": len(refreshes),
                "rows": len(people),
                "job": json.loads(done_line.split(" ", 1)[1]),
            }
        finally:
            await kfa.close()
            await aengine.dispose()

    figures = run_in_thread(scenario, timeout=300)
    print("rotation picked up:", figures)
    assert figures["job"]["finished"] is True
    assert figures["picked_up_after"] is not None
    assert figures["picked_up_after"] < active_ttl  # background refresh every active_ttl / 2
    # 0, or 2 (the wrapped key fetched and unwrapped once) when the race above happened: never
    # one load per request or per row.
    assert figures["loop_loads"] in (0, 2)
    # The stall while a key refresh runs: a few milliseconds (see benchmarks/bench_async.py
    # and the README); generous here, because other test sessions share the cores.
    assert figures["refreshes"] >= 2
    assert figures["longest_stall_in_refresh"] < 0.05
    stored = raw_values(engine, "async_people", "email")
    assert len(stored) == figures["rows"] and all(v.startswith("kf2:pii:2:") for v in stored)


README = os.path.join(ROOT, "README.md")


@pytest.mark.databases("sqlite", "postgresql")
def test_the_readme_example_runs(aurl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = open(README, encoding="utf-8").read()
    block = text.split("<!-- asyncio-example -->", 1)[1].split("```python\n", 1)[1]
    source = block.split("\n```", 1)[0]
    monkeypatch.setenv("KMS_FIELD_LOCAL_MASTER_KEY", MASTER_KEY_B64)

    class Base(sa.orm.DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True)
        email: sa.orm.Mapped[str] = sa.orm.mapped_column(kf.EncryptedString(320, key="pii"))
        email_index: sa.orm.Mapped[str | None] = sa.orm.mapped_column(
            kf.BlindIndex("email", key="email-index", normalizer="email"), unique=True
        )

    namespace: dict[str, Any] = {"Base": Base, "User": User}
    exec(compile(source, README, "exec"), namespace)  # noqa: S102 - our own README
    assert run_in_thread(lambda: namespace["main"](aurl)) == "Ann@Example.com"


@pytest.mark.databases("sqlite")
def test_find_through_run_sync(aurl: str) -> None:
    """kf.find takes a sync session: AsyncSession.run_sync hands it one (as the README says)."""

    async def scenario() -> list[int]:
        aengine = create_async_engine(aurl)
        try:
            await setup(aengine, active_ttl=60)
            await kfa.preload()
            await request(aengine, 7)
            async with AsyncSession(aengine) as session:
                found = await session.run_sync(kf.find, Person.email, "USER7@example.org")
            return [p.id for p in found]
        finally:
            await kfa.close()
            await aengine.dispose()

    assert run_in_thread(scenario) == [7]


@pytest.mark.databases("sqlite")
def test_a_failing_background_refresh_fails_closed_after_stale_ttl(
    aurl: str, engine: sa.Engine
) -> None:
    """The key store becomes unreadable: within stale_ttl requests go on with the states
    known; past it, lookups and reads refuse (KeyStateError), as the sync registry does."""

    async def scenario() -> list[str]:
        aengine = create_async_engine(aurl)
        outcomes = []
        try:
            await setup(aengine, active_ttl=0.2, stale_ttl=1.5)
            await kfa.preload()
            await request(aengine, 1)
            with engine.begin() as conn:  # the store cannot be read any more
                conn.exec_driver_sql("ALTER TABLE kms_field_keys RENAME TO kms_field_keys_gone")
            await asyncio.sleep(0.3)
            await request(aengine, 2)  # within stale_ttl
            await asyncio.sleep(1.5)
            for attempt in (lambda: Person.email == "user1@example.org", None):
                try:
                    if attempt is not None:
                        attempt()
                    else:
                        async with AsyncSession(aengine) as session:
                            await session.get(Person, 1)
                except Exception as exc:
                    error = getattr(exc, "orig", None) or exc
                    outcomes.append(f"{type(error).__name__}: {error}")
            return outcomes
        finally:
            await kfa.close()
            await aengine.dispose()

    outcomes = run_in_thread(scenario)
    assert len(outcomes) == 2, outcomes
    assert all(o.startswith("KeyStateError") and "stale_ttl" in o for o in outcomes), outcomes


class SlowMasterKey(kf.LocalMasterKey):
    """A local master key that answers like a slow KMS: each call takes ``delay`` seconds."""

    delay = 0.25

    def generate_data_key(self, context: Any) -> tuple[bytes, bytes, str]:
        time.sleep(self.delay)
        return super().generate_data_key(context)

    def unwrap(self, wrapped: bytes, context: Any, master_key_id: str) -> bytes:
        time.sleep(self.delay)
        return super().unwrap(wrapped, context, master_key_id)


def test_an_awaited_rotation_calls_the_master_key_off_the_loop(aurl: str) -> None:
    """``await rotate_data_key()`` made its GenerateDataKey and verifying Decrypt on the loop:
    a slow KMS stalled every request for as long. They run in a worker thread now: the loop
    keeps ticking while the rotation waits for the master key."""

    async def scenario() -> tuple[float, float, int]:
        aengine = create_async_engine(aurl)
        try:
            store = kf.SqlKeyStore(aengine)
            await kfa.run_sync(store.create_table)
            kf.configure(master_key=SlowMasterKey(MASTER_KEY_BYTES), key_store=store)
            await kfa.create_data_key("pii")
            probe = StallProbe()
            probe.start()
            started = time.monotonic()
            key = await kfa.rotate_data_key("pii")
            took = time.monotonic() - started
            await probe.stop()
            return took, probe.longest(), key.version
        finally:
            await kfa.close()
            await aengine.dispose()

    took, longest_stall, version = run_in_thread(scenario)
    print(f"rotation took {took:.3f} s, the loop stalled at most {longest_stall * 1000:.1f} ms")
    assert version == 2
    assert took >= 2 * SlowMasterKey.delay  # the master key was called (generate, verify)
    assert longest_stall < SlowMasterKey.delay / 2, longest_stall

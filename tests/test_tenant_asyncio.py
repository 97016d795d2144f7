"""Tenant columns in asyncio applications (issue 13 follow-up, point 2): under AsyncSession on
aiosqlite, asyncpg and asyncmy (MariaDB), the first read of a tenant (its key read from
kms_field_tenant_keys) and the first write of a new tenant (its key created) neither fail with
MissingGreenlet nor deadlock the loop when many tasks touch the same new tenants at once; where
no database call can be awaited, a clear error names what to call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_kms_field as kf
import sqlalchemy_kms_field.asyncio as kfa
from sqlalchemy_kms_field import tenants
from tests.async_support import StallProbe, async_url
from tests.helpers import local_master_key, raw_values, reset_tenants
from tests.test_asyncio import run_in_thread

pytestmark = pytest.mark.databases("sqlite", "postgresql", "mariadb")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "async_tenant_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    body: Mapped[str | None] = mapped_column(kf.EncryptedText(key="pii", tenant="tenant_id"))


NOTES: sa.Table = Note.__table__  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    reset_tenants(monkeypatch)
    yield


@pytest.fixture
def aurl(db_url: str) -> str:
    return async_url(db_url)


async def setup(aengine: AsyncEngine, active_ttl: float = 60) -> kf.KeyRegistry:
    store = kf.SqlKeyStore(aengine)
    await kfa.run_sync(store.create_table)
    async with aengine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    registry = kf.configure(master_key=local_master_key(), key_store=store, active_ttl=active_ttl)
    await kfa.create_data_key("pii")
    await kfa.run_sync(kf.create_tenant_table)
    await kfa.preload()
    return registry


async def write_and_read(aengine: AsyncEngine, i: int, tenant: str) -> str | None:
    """What a request does: write a row of ``tenant`` (maybe its first), read it back."""
    async with AsyncSession(aengine) as session:
        session.add(Note(id=i, tenant_id=tenant, body=f"note {i} of {tenant}"))
        await session.commit()
        session.expunge_all()
        found = await session.get(Note, i)
        return None if found is None else found.body


def test_first_writes_and_reads_of_new_tenants_under_asyncsession(
    aurl: str, engine: sa.Engine
) -> None:
    """Twelve concurrent requests, four new tenants, nothing preloaded: each first write
    creates the tenant's key inside its processor (one key per tenant, whoever wins), awaited;
    the reads of a fresh process load them the same way; the loop never deadlocks. (Twelve:
    a load inside a processor takes a second connection while its request holds one, so more
    requests than the pool's 15 connections, all loading, would wait for the pool's timeout;
    the next test shows the way around it.)"""

    async def scenario() -> dict[str, Any]:
        aengine = create_async_engine(aurl)
        probe = StallProbe()
        try:
            await setup(aengine)
            probe.start()
            names = [f"t{i % 4}" for i in range(12)]
            bodies = await asyncio.gather(
                *(write_and_read(aengine, i, t) for i, t in enumerate(names))
            )
            tenants.get_keyring().forget()  # a fresh process: no tenant key in memory
            async with AsyncSession(aengine) as session:
                notes = (await session.scalars(sa.select(Note).order_by(Note.id))).all()
                again = [n.body for n in notes]
            await probe.stop()
            return {
                "bodies": bodies,
                "again": again,
                "stall": probe.longest(),
                "loop_loads": tenants.get_keyring().stats.loop_loads,
            }
        finally:
            await kfa.close()
            await aengine.dispose()

    outcome = run_in_thread(scenario, timeout=60)
    assert outcome != "deadlocked"
    expected = [f"note {i} of t{i % 4}" for i in range(12)]
    assert outcome["bodies"] == expected and outcome["again"] == expected
    assert outcome["loop_loads"] >= 4  # loaded inside processors, awaited
    print("longest loop stall:", outcome["stall"])
    stored = raw_values(engine, "async_tenant_notes", "body")
    assert sorted({v.split(":")[1] for v in stored}) == [f"pii.t.t{i}" for i in range(4)]
    with engine.connect() as conn:
        keys = conn.execute(
            sa.text("SELECT key_name, count(*) FROM kms_field_tenant_keys GROUP BY key_name")
        ).all()
    assert sorted(tuple(k) for k in keys) == [(f"pii.t.t{i}", 1) for i in range(4)]


def test_ensured_and_preloaded_tenants_need_no_load_in_a_processor(
    aurl: str, engine: sa.Engine
) -> None:
    """The way for many concurrent requests: ``await ensure_tenant_key`` when a tenant is
    onboarded, ``await preload_tenants`` at start-up. Then forty concurrent requests of
    eight tenants load nothing inside a processor."""

    async def scenario() -> dict[str, Any]:
        aengine = create_async_engine(aurl)
        try:
            await setup(aengine)
            created = [await kfa.ensure_tenant_key("pii", f"t{i}") for i in range(8)]
            tenants.get_keyring().forget()  # a fresh process, at start-up:
            loaded = await kfa.preload_tenants("pii")
            before = tenants.get_keyring().stats.loop_loads
            bodies = await asyncio.gather(
                *(write_and_read(aengine, i, f"t{i % 8}") for i in range(40))
            )
            return {
                "created": [(k.name, k.version) for k in created],
                "loaded": loaded,
                "bodies": bodies,
                "loop_loads": tenants.get_keyring().stats.loop_loads - before,
            }
        finally:
            await kfa.close()
            await aengine.dispose()

    outcome = run_in_thread(scenario, timeout=60)
    assert outcome != "deadlocked"
    assert outcome["created"] == [(f"pii.t.t{i}", 1) for i in range(8)]
    assert outcome["loaded"] == 8
    assert outcome["bodies"] == [f"note {i} of t{i % 8}" for i in range(40)]
    assert outcome["loop_loads"] == 0


def test_a_tenant_load_that_would_block_the_loop_names_the_awaitable(aurl: str) -> None:
    """Outside a session call nothing can be awaited: the sync ensure_tenant_key on the loop
    is refused with the awaitable to call, instead of MissingGreenlet."""

    async def scenario() -> None:
        aengine = create_async_engine(aurl)
        try:
            await setup(aengine)
            kf.ensure_tenant_key("pii", "t9")
        finally:
            await kfa.close()
            await aengine.dispose()

    with pytest.raises(
        kf.ConfigurationError,
        match=r"would block the event loop.*asyncio\.ensure_tenant_key\('pii', tenant\)",
    ):
        run_in_thread(scenario)

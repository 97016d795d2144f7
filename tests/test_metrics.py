"""OpenTelemetry metrics and the audit hook (issue 12), read back through the SDK's
InMemoryMetricReader after a known workload: exactly one KMS Decrypt per version per process,
N encryptions after N inserts, failures by reason, job progress; the audit hook sees places and
versions, never values; nothing of OpenTelemetry is imported or costs anything until enabled.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import sqlalchemy_kms_field as kf
import sqlalchemy_kms_field.asyncio as kfa
from sqlalchemy_kms_field import metrics
from tests.async_support import PEOPLE, Base, Person, async_url
from tests.helpers import configure_local, raises_kf, reset_global_registry
from tests.kms_server import KmsServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    reset_global_registry(monkeypatch)
    reader = InMemoryMetricReader()
    kf.enable_metrics(MeterProvider(metric_readers=[reader]))
    yield reader
    kf.disable_metrics()
    kf.set_audit_hook(None)


def points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, Any], ...], Any]]:
    """metric name -> {sorted attributes: value (sum, gauge value, or histogram count)}."""
    found: dict[str, dict[tuple[tuple[str, Any], ...], Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # a histogram: how many were recorded
                    attributes = tuple(sorted((point.attributes or {}).items()))
                    found.setdefault(metric.name, {})[attributes] = value
    return found


def by_version(found: dict[str, Any], name: str) -> dict[int, int]:
    return {dict(a)["version"]: v for a, v in found.get(name, {}).items()}


@pytest.fixture
def kms_master(kms: KmsServer) -> kf.AwsKmsMasterKey:
    alias = f"alias/kf-metrics-{uuid.uuid4().hex[:12]}"
    kms.create_alias(alias, kms.create_key("metrics"))
    return kf.AwsKmsMasterKey(alias, client=kms.client())


def test_known_workload_gives_exact_counts(
    reader: InMemoryMetricReader, engine: sa.Engine, kms: KmsServer, kms_master: Any
) -> None:
    store = kf.SqlKeyStore(engine)
    store.create_table()
    Base.metadata.create_all(engine)
    registry = kf.configure(master_key=kms_master, key_store=store)
    kf.create_index_key("email-index")
    kf.create_data_key("pii")
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert(), [{"id": i, "email": f"u{i}@x.org"} for i in range(30)])
    kf.rotate_data_key("pii")
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert(), [{"id": i, "email": f"u{i}@x.org"} for i in range(30, 50)])

    registry.forget()  # as a fresh process: nothing unwrapped yet
    kms.reset_counts()
    before = points(reader)
    with engine.connect() as conn:
        emails = conn.execute(sa.select(PEOPLE.c.email).order_by(PEOPLE.c.id)).scalars().all()
        again = conn.execute(sa.select(PEOPLE.c.email)).scalars().all()
    assert emails == [f"u{i}@x.org" for i in range(50)] and len(again) == 50
    found = points(reader)

    assert kms.counts == {"Decrypt": 2}  # one per version read; the fixture counts the wire
    decrypts = found["kms_field.kms.calls"][(("operation", "Decrypt"), ("outcome", "success"))]
    decrypts_before = before["kms_field.kms.calls"][
        (("operation", "Decrypt"), ("outcome", "success"))
    ]
    assert decrypts - decrypts_before == 2
    assert (
        found["kms_field.kms.duration"][(("operation", "Decrypt"), ("outcome", "success"))]
        == decrypts
    )
    assert by_version(found, "kms_field.encryptions") == {1: 30, 2: 20}
    assert by_version(found, "kms_field.decryptions") == {1: 60, 2: 40}
    data = (("kind", "data"),)
    misses_before = before.get("kms_field.key_cache.misses", {}).get(data, 0)
    assert found["kms_field.key_cache.misses"][data] - misses_before == 2
    assert found["kms_field.key_cache.hits"][(("kind", "data"),)] == 150
    assert "kms_field.decryption.failures" not in found
    attributes = [str(a) for points_ in found.values() for a in points_]
    assert attributes and not any("x.org" in a for a in attributes)  # no value in any attribute


def test_decryption_failures_by_reason(
    reader: InMemoryMetricReader, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_local(engine)
    kf.create_index_key("email-index")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        rows = [{"id": 1, "email": "a@x.org"}, {"id": 2, "email": "b@x.org"}]
        conn.execute(PEOPLE.insert(), rows)
        good = conn.execute(sa.text("SELECT email FROM async_people WHERE id = 1")).scalar_one()
        moved = good[:-4] + ("AAAA" if good[-4:] != "AAAA" else "BBBB")  # altered
        conn.execute(sa.text("UPDATE async_people SET email = :v WHERE id = 2"), {"v": moved})
        conn.execute(PEOPLE.insert(), [{"id": 3, "email": None}])
        conn.execute(
            sa.text("UPDATE async_people SET email = :v WHERE id = 3"), {"v": "kf2:pii:9:abc"}
        )
    for i, reason in ((2, "authentication"), (3, "key_unavailable")):
        with raises_kf(kf.DecryptionError), engine.connect() as conn:
            conn.execute(sa.select(PEOPLE.c.email).where(PEOPLE.c.id == i)).all()
        failures = points(reader)["kms_field.decryption.failures"]
        key = (("column", "email"), ("key", "pii"), ("reason", reason), ("table", "async_people"))
        assert failures[key] == 1, failures


def test_audit_hook_sees_places_and_versions_never_values(
    reader: InMemoryMetricReader, engine: sa.Engine
) -> None:
    configure_local(engine)
    kf.create_index_key("email-index")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert(), [{"id": i, "email": f"u{i}@x.org"} for i in range(40)])
    events: list[kf.AuditEvent] = []
    kf.set_audit_hook(events.append)
    with engine.connect() as conn:
        assert len(conn.execute(sa.select(PEOPLE.c.email)).all()) == 40
    assert events == [kf.AuditEvent("async_people", "email", "pii", 1)] * 40
    assert all("x.org" not in repr(e) for e in events)

    events.clear()
    kf.set_audit_hook(events.append, sample=0.25)
    with engine.connect() as conn:
        for _ in range(10):
            conn.execute(sa.select(PEOPLE.c.email)).all()
    assert 40 < len(events) < 180  # 100 expected of 400; far outside is a broken sampler

    def refuse(event: kf.AuditEvent) -> None:
        raise RuntimeError("audit trail unavailable")

    kf.set_audit_hook(refuse)
    with pytest.raises(RuntimeError, match="audit trail unavailable"), engine.connect() as conn:
        conn.execute(sa.select(PEOPLE.c.email)).all()
    with pytest.raises(kf.ConfigurationError, match="sample"):
        kf.set_audit_hook(events.append, sample=0)


def test_job_progress_is_published(reader: InMemoryMetricReader, engine: sa.Engine) -> None:
    configure_local(engine)
    kf.create_index_key("email-index")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert(), [{"id": i, "email": f"u{i}@x.org"} for i in range(500)])
    kf.rotate_data_key("pii")
    result = kf.reencrypt_column(
        engine,
        "async_people",
        "email",
        key="pii",
        batch_size=100,
        progress=metrics.job_progress("async_people.email"),
    )
    assert result.finished and result.rows_written == 500
    found = points(reader)
    job = (("job", "async_people.email"),)
    assert found["kms_field.job.rows_done"][job] == 500
    assert found["kms_field.job.rate"][job] > 0
    assert found["kms_field.job.eta"][job] == 0


@pytest.mark.databases("postgresql")
def test_an_async_application_unwraps_each_version_once(
    reader: InMemoryMetricReader, db_url: str, kms: KmsServer, kms_master: Any
) -> None:
    async def scenario() -> None:
        aengine = create_async_engine(async_url(db_url))
        try:
            store = kf.SqlKeyStore(aengine)
            await kfa.run_sync(store.create_table)
            async with aengine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            registry = kf.configure(master_key=kms_master, key_store=store, active_ttl=0.5)
            await kfa.create_index_key("email-index")
            await kfa.create_data_key("pii")
            await kfa.rotate_data_key("pii")
            async with aengine.begin() as conn:  # rows under v2, written before a "restart"
                await conn.execute(
                    PEOPLE.insert(), [{"id": i, "email": f"u{i}@x.org"} for i in range(100, 120)]
                )
            registry.forget()
            kms.reset_counts()

            async def read(i: int) -> None:
                async with AsyncSession(aengine) as session:
                    found = await session.get(Person, i)
                    assert found is not None and found.email == f"u{i}@x.org"

            # Requests race the preload for v2: one of them unwraps it, not both.
            await asyncio.gather(kfa.preload(), *(read(i) for i in range(100, 120)))

            async def one(i: int) -> None:
                async with AsyncSession(aengine) as session:
                    session.add(Person(id=i, email=f"u{i}@x.org"))
                    await session.commit()
                    assert (await session.get(Person, i)) is not None

            await asyncio.gather(*(one(i) for i in range(40)))
            await asyncio.sleep(1.2)  # two refreshes: no new unwrap
            await asyncio.gather(*(one(i) for i in range(40, 60)))
        finally:
            await kfa.close()
            await aengine.dispose()

    asyncio.run(scenario())
    assert kms.counts == {"Decrypt": 3}  # pii v1, v2 and the index key, once each
    assert by_version(points(reader), "kms_field.encryptions")[2] == 60


def test_nothing_of_opentelemetry_without_enable(tmp_path: Path) -> None:
    """Without enable_metrics (or with the extra absent) the library never imports it."""
    code = (
        "import sys, sqlalchemy as sa, sqlalchemy_kms_field as kf\n"
        "from tests.helpers import configure_local\n"
        "from tests.async_support import Base, PEOPLE\n"
        f"engine = sa.create_engine('sqlite:///{tmp_path / 'x.sqlite'}')\n"
        "configure_local(engine); kf.create_index_key('email-index')\n"
        "Base.metadata.create_all(engine)\n"
        "with engine.begin() as c: c.execute(PEOPLE.insert(), [{'id': 1, 'email': 'a@x.org'}])\n"
        "with engine.connect() as c: c.execute(sa.select(PEOPLE)).all()\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules), 'imported'\n"
        "sys.modules['opentelemetry'] = None  # as if the extra were not installed\n"
        "try:\n    kf.enable_metrics()\nexcept kf.ConfigurationError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'sqlalchemy-kms-field[otel]'" in result.stdout

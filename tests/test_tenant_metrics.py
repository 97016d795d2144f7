"""Metrics on tenant columns (issue 13 follow-up, point 3): encryptions, decryptions and
decryption failures of values under tenant keys are counted like any column's, under the
column's data key (the tenant keys' intermediate key) and the tenant key's version, never with
a tenant id or a tenant key name in the attributes (a million tenants would be a million
series). Read back through the OpenTelemetry SDK's InMemoryMetricReader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.tenant_erasure import erase_tenant
from tests.helpers import configure_local, raises_kf, reset_tenants
from tests.test_metrics import points


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "metric_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    body: Mapped[str | None] = mapped_column(kf.EncryptedText(key="pii", tenant="tenant_id"))
    # Bound to the row as well as the tenant: the general (not the fast) path of the types.
    title: Mapped[str | None] = mapped_column(
        kf.EncryptedString(80, key="pii", tenant="tenant_id", bind_to=("id",))
    )


notes: sa.Table = Note.__table__  # type: ignore[assignment]
TENANT = (("key", "pii"), ("tenant_keys", True))


@pytest.fixture
def reader(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryMetricReader]:
    reset_tenants(monkeypatch)
    configure_local(engine)
    kf.create_tenant_table()
    Base.metadata.create_all(engine)
    reader = InMemoryMetricReader()
    kf.enable_metrics(MeterProvider(metric_readers=[reader]))
    yield reader
    kf.disable_metrics()
    kf.set_audit_hook(None)


def tenant_points(found: dict[str, Any], name: str) -> dict[int, int]:
    """version -> count of the series of tenant keys of 'pii'."""
    out = {}
    for attributes, value in found.get(name, {}).items():
        a = dict(attributes)
        if a.get("tenant_keys") is True:
            assert set(a) == {"key", "version", "tenant_keys"} and a["key"] == "pii", a
            out[a["version"]] = value
    return out


def no_tenant_in_attributes(found: dict[str, Any]) -> None:
    text = repr([a for series in found.values() for a in series])
    assert "pii.t." not in text and "pii.h." not in text and "acme" not in text.lower()
    assert "secret" not in text


def test_tenant_values_are_counted_under_the_column_key(
    reader: InMemoryMetricReader, engine: sa.Engine
) -> None:
    rows = [
        {"id": i, "tenant_id": t, "body": f"secret {i}", "title": f"secret title {i}"}
        for i, t in enumerate(["41", "42", "Acme Corp"] * 10)
    ]
    with engine.begin() as conn:  # Core executemany, first writes of three new tenants
        conn.execute(notes.insert(), rows)
    kf.rotate_tenant_key("pii", "42")
    with Session(engine) as session:  # the ORM: ten more values under tenant 42's version 2
        session.add_all(Note(id=100 + i, tenant_id="42", body=f"secret {i}") for i in range(10))
        session.commit()
    with engine.connect() as conn:
        bodies = conn.execute(sa.select(notes.c.body)).scalars().all()
        titles = conn.execute(sa.select(notes.c.title)).scalars().all()
    assert len(bodies) == 40 and all(b.startswith("secret ") for b in bodies)
    assert len([t for t in titles if t]) == 30

    found = points(reader)
    no_tenant_in_attributes(found)
    # 30 rows x 2 columns on version 1; 10 bodies under tenant 42's version 2.
    assert tenant_points(found, "kms_field.encryptions") == {1: 60, 2: 10}
    assert tenant_points(found, "kms_field.decryptions") == {1: 60, 2: 10}
    assert found["kms_field.key_cache.hits"][(("kind", "data"),)] == 140
    # Tenant keys read from their table and unwrapped here (three tenants, 42 twice).
    assert found["kms_field.key_cache.misses"][(("kind", "tenant"),)] >= 3
    assert "kms_field.decryption.failures" not in found


def test_tenant_decryption_failures_by_reason(
    reader: InMemoryMetricReader, engine: sa.Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(
            notes.insert(),
            [{"id": i, "tenant_id": t, "body": f"secret {i}"} for i, t in ((1, "41"), (2, "42"))],
        )
    raw = sa.table("metric_notes", sa.column("id"), sa.column("body"))
    with engine.begin() as conn:
        first = conn.execute(sa.select(raw.c.body).where(raw.c.id == 1)).scalar_one()
        conn.execute(sa.insert(notes).values(id=3, tenant_id="42"))
        conn.execute(raw.update().where(raw.c.id == 3).values(body=first))  # moved to 42
        altered = first[:-4] + ("AAAA" if first[-4:] != "AAAA" else "BBBB")
        conn.execute(sa.insert(notes).values(id=4, tenant_id="41"))
        conn.execute(raw.update().where(raw.c.id == 4).values(body=altered))
    erase_tenant("pii", "42", confirm=True, skip_grace_period=True)

    for row_id, reason in ((3, "wrong_key"), (4, "authentication"), (2, "key_unavailable")):
        with raises_kf(kf.DecryptionError), engine.connect() as conn:
            conn.execute(sa.select(notes.c.body).where(notes.c.id == row_id)).all()
        failures = points(reader)["kms_field.decryption.failures"]
        key = (("column", "body"), ("key", "pii"), ("reason", reason), ("table", "metric_notes"))
        assert failures.get(key) == 1, failures
    no_tenant_in_attributes(points(reader))


def test_the_audit_hook_names_the_tenant_key(
    reader: InMemoryMetricReader, engine: sa.Engine
) -> None:
    """The audit trail is per decryption, not a metric series: it names the tenant's key
    (whose data was read is what an audit is for), never a value."""
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": 1, "tenant_id": "42", "body": "secret"}])
    events: list[kf.AuditEvent] = []
    kf.set_audit_hook(events.append)
    with engine.connect() as conn:
        conn.execute(sa.select(notes.c.body)).all()
        conn.execute(sa.select(notes.c.body)).all()
    assert events == [kf.AuditEvent("metric_notes", "body", "pii.t.42", 1)] * 2

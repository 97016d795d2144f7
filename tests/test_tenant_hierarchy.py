"""The key hierarchy of tenant keys (issue 13, point 3), with KMS calls counted at the wire.

master key (moto's KMS over HTTP) -> intermediate key (data key "pii", one version at a time)
-> a key per tenant. A fresh process reading rows of many tenants makes one KMS Decrypt per
intermediate-key version, never one per tenant; the tenant-key cache holds at most
``max_keys`` tenants and re-reads each after ``max_age``; rotating the intermediate key
rewraps tenant keys without touching a row, and the old version cannot be retired before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import lifecycle, tenants
from tests.helpers import reset_tenants
from tests.kms_server import KmsServer

TENANTS = 40

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("body", kf.EncryptedText(key="pii", tenant="tenant_id")),
)


@pytest.fixture
def setup(
    engine: sa.Engine, kms: KmsServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[sa.Engine, KmsServer, str]]:
    reset_tenants(monkeypatch)
    key_id = kms.create_key("tenant hierarchy")
    fresh_process(engine, kms, key_id)
    kf.SqlKeyStore(engine).create_table()
    kf.create_data_key("pii")
    kf.create_tenant_table()
    metadata.create_all(engine)
    yield engine, kms, key_id


def fresh_process(engine: sa.Engine, kms: KmsServer, key_id: str, **bounds: float) -> None:
    """What a new process has: a registry and a tenant keyring with nothing unwrapped."""
    kf.configure(
        master_key=kf.AwsKmsMasterKey(key_id, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
        active_ttl=60,
    )
    if bounds:
        kf.configure_tenants(**bounds)  # type: ignore[arg-type]
    else:
        tenants._settings.clear()


def write(engine: sa.Engine, first_tenant: int, count: int) -> None:
    for t in range(first_tenant, first_tenant + count):
        with engine.begin() as conn:  # (on SQLite a new tenant's key needs its own transaction)
            rows = [{"id": t * 10 + i, "tenant_id": t, "body": f"n{t}-{i}"} for i in range(3)]
            conn.execute(notes.insert(), rows)


def read_all(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(notes.c.id, notes.c.body)).all())


def raw(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, body FROM notes")).all())


def test_one_kms_call_per_intermediate_version_whatever_the_tenants(setup) -> None:  # type: ignore[no-untyped-def]
    engine, kms, key_id = setup
    write(engine, 1, TENANTS)
    assert len(tenants.get_keyring().versions("pii")) == TENANTS

    fresh_process(engine, kms, key_id)
    kms.reset_counts()
    values = read_all(engine)
    assert len(values) == 3 * TENANTS and values[10] == "n1-0"
    assert kms.counts["Decrypt"] == 1  # the intermediate key, once; 40 tenant keys locally
    assert kms.counts["GenerateDataKey"] == 0

    # A new intermediate version: new tenants' keys are wrapped by it, old ones keep v1.
    kf.rotate_data_key("pii")
    write(engine, 100, 5)
    fresh_process(engine, kms, key_id)
    kms.reset_counts()
    assert len(read_all(engine)) == 3 * (TENANTS + 5)
    assert {k.wrapped_by for k in tenants.get_keyring().versions("pii")} == {1, 2}
    assert kms.counts["Decrypt"] == 2  # v1 and v2, never one per tenant

    # Rewrap moves every tenant key to v2: O(tenants), not one value row touched.
    before = raw(engine)
    assert kf.rewrap_tenant_keys("pii", batch_size=7) == TENANTS
    assert raw(engine) == before
    assert {k.wrapped_by for k in tenants.get_keyring().versions("pii")} == {2}
    assert kf.rewrap_tenant_keys("pii") == 0  # a rerun finds nothing left
    fresh_process(engine, kms, key_id)
    kms.reset_counts()
    assert len(read_all(engine)) == 3 * (TENANTS + 5)
    assert kms.counts["Decrypt"] == 1  # only v2 is needed now


def test_the_intermediate_version_cannot_retire_while_it_wraps_tenant_keys(setup) -> None:  # type: ignore[no-untyped-def]
    engine, kms, key_id = setup
    write(engine, 1, 3)
    kf.rotate_data_key("pii")
    kf.get_registry().active_ttl = 0  # no other process here: no wait for one to move
    time.sleep(2.1)  # but the margin of 2 s after the rotation stays
    with pytest.raises(kf.KeyStateError, match=r"kms_field_tenant_keys\.wrapped_key: 3 rows"):
        lifecycle.retire_data_key("pii", 1)
    kf.rewrap_tenant_keys("pii")
    lifecycle.retire_data_key("pii", 1)
    fresh_process(engine, kms, key_id)
    assert len(read_all(engine)) == 9


def test_the_cache_is_bounded_in_entries_and_age(setup) -> None:  # type: ignore[no-untyped-def]
    engine, kms, key_id = setup
    write(engine, 1, TENANTS)
    fresh_process(engine, kms, key_id, max_keys=10, max_age=0.5)
    keyring = tenants.get_keyring()
    kms.reset_counts()
    assert len(read_all(engine)) == 3 * TENANTS
    assert len(keyring) == 10  # the 10 tenants loaded last only
    assert keyring.stats.evicted == TENANTS - 10
    loads = keyring.stats.loads
    assert len(read_all(engine)) == 3 * TENANTS  # evicted tenants are read again from the table
    assert keyring.stats.loads > loads
    # Age: a tenant read again after max_age is re-read from its table (where an erasure or a
    # rotation shows), without a KMS call.
    fresh_process(engine, kms, key_id, max_keys=1000, max_age=0.5)
    keyring = tenants.get_keyring()
    read_all(engine)
    loads = keyring.stats.loads
    read_all(engine)
    assert keyring.stats.loads == loads  # young entries: no reads
    time.sleep(0.6)
    read_all(engine)
    assert keyring.stats.loads == loads + TENANTS
    assert kms.counts["Decrypt"] == 2  # one per fresh process: the intermediate key
    with pytest.raises(kf.ConfigurationError, match="max_keys"):
        kf.configure_tenants(max_keys=0)


def test_autogenerate_never_proposes_to_drop_the_tenant_keys() -> None:
    from sqlalchemy_kms_field.alembic_ops import include_object

    assert not include_object(None, "kms_field_tenant_keys", "table", True, None)
    assert include_object(None, "someone_elses_table", "table", True, None)

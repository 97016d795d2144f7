"""Data key life cycle on every database: rewrap under another master key (no data row changes),
census, known columns, retire (only when no row is left) and destroy."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import lifecycle
from sqlalchemy_kms_field.census import ColumnRef
from sqlalchemy_kms_field.reencrypt import reencrypt_column
from tests.helpers import (
    MASTER_KEY_BYTES,
    assert_no_secret,
    configure_local,
    error_texts,
    raises_kf,
    reset_global_registry,
    unwrapped_key,
)
from tests.kms_server import KmsServer

KEY_A = MASTER_KEY_BYTES
KEY_B = bytes(range(100, 132))

V1_ROWS = {
    1: ("alice@example.com", b"alice-photo"),
    2: ("bob@example.org", None),
    3: ("carol@example.net", b"carol-photo"),
}
V2_ROWS = {4: ("dave@example.com", b"dave-photo"), 5: ("eve@example.io", b"eve-photo")}
NULL_ROWS = {6: (None, None), 7: (None, b"frank-photo")}
SECRETS = [
    "alice@example.com",
    "bob@example.org",
    "carol@example.net",
    "dave@example.com",
    "eve@example.io",
]


def people_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "people",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
        sa.Column("photo", kf.EncryptedBytes(key="pii")),
    )


PEOPLE = people_table(sa.MetaData())


@pytest.fixture(scope="module")
def client(kms_server: KmsServer) -> Any:
    """One boto3 KMS client for the module (building one costs more than the calls it makes)."""
    return kms_server.client()


@pytest.fixture
def unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)


def fill(engine: sa.Engine) -> None:
    """People on v1, then on v2 (the active version), and rows with NULLs; 'pii' must exist."""
    PEOPLE.create(engine)
    insert(engine, V1_ROWS)
    kf.rotate_data_key("pii")
    insert(engine, {**V2_ROWS, **NULL_ROWS})


def insert(engine: sa.Engine, rows: dict[int, tuple[Any, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(
            PEOPLE.insert(), [{"id": i, "email": e, "photo": p} for i, (e, p) in rows.items()]
        )


def everyone() -> dict[int, tuple[Any, Any]]:
    return {**V1_ROWS, **V2_ROWS, **NULL_ROWS}


def read(engine: sa.Engine) -> dict[int, tuple[Any, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(PEOPLE).order_by(PEOPLE.c.id)).all()
    return {r.id: (r.email, r.photo) for r in rows}


def dump(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every data row exactly as stored."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, email, photo FROM people ORDER BY id")).all()
    return [(i, e, None if p is None else bytes(p)) for i, e, p in rows]


def stored_keys(registry: kf.KeyRegistry) -> list[tuple[int, str, bytes, str]]:
    return [
        (s.version, s.master_key_id, s.wrapped_key, s.state.value)
        for s in registry.key_store.versions("pii")
    ]


def assert_clean(
    exc: BaseException, keys: Iterable[bytes], plaintexts: Iterable[str] = SECRETS
) -> None:
    for text in error_texts(exc):
        assert_no_secret(text, [KEY_A, KEY_B, *keys])
        for p in plaintexts:
            assert p not in text, f"plaintext in: {text[:300]!r}"


# Rewrap: O(keys), never a data row --------------------------------------------------------------


def test_rewrap_from_one_local_master_key_to_another(engine: sa.Engine, unconfigured: None) -> None:
    a, b = kf.LocalMasterKey(KEY_A), kf.LocalMasterKey(KEY_B)
    old = configure_local(engine, master_key=a)
    fill(engine)
    deks = [unwrapped_key(old, "pii", v) for v in (1, 2)]
    rows, keys = dump(engine), stored_keys(old)
    assert {k[1] for k in keys} == {a.key_id}

    registry = kf.configure(
        master_key=b, key_store=kf.SqlKeyStore(engine), previous_master_keys=[a]
    )
    done = lifecycle.rewrap_data_keys()

    assert [(r.name, r.version, r.old_master_key_id, r.new_master_key_id) for r in done] == [
        ("pii", 1, a.key_id, b.key_id),
        ("pii", 2, a.key_id, b.key_id),
    ]
    assert dump(engine) == rows  # not one data row touched
    after = stored_keys(registry)
    assert [(v, m, s) for v, m, _, s in after] == [
        (1, b.key_id, "readable"),
        (2, b.key_id, "active"),
    ]
    assert all(new[2] != was[2] for new, was in zip(after, keys, strict=True))

    only_b = kf.configure(master_key=b, key_store=kf.SqlKeyStore(engine))  # A is not needed
    assert read(engine) == everyone()
    assert [unwrapped_key(only_b, "pii", v) for v in (1, 2)] == deks  # same data keys
    only_b.forget()
    assert read(engine) == everyone()

    kf.configure(master_key=a, key_store=kf.SqlKeyStore(engine))  # and A alone no longer reads
    with raises_kf(kf.KmsFieldError) as raised:
        read(engine)
    assert raised.value is not None
    assert_clean(raised.value, deks)


def test_rewrap_from_one_aws_key_to_another(
    engine: sa.Engine, unconfigured: None, kms: KmsServer, client: Any
) -> None:
    old_id, new_id = kms.create_key("old master"), kms.create_key("new master")
    old = configure_local(engine, names=(), master_key=kf.AwsKmsMasterKey(old_id, client=client))
    old.create_data_key("pii")
    fill(engine)
    rows = dump(engine)
    assert all(old_id in m for _, m, _, _ in stored_keys(old))
    blob = client.encrypt(KeyId=old_id, Plaintext=b"canary")["CiphertextBlob"]
    kms.reset_counts()

    registry = kf.configure(
        master_key=kf.AwsKmsMasterKey(new_id, client=client),
        key_store=kf.SqlKeyStore(engine),
        previous_master_keys=[kf.AwsKmsMasterKey(old_id, client=client)],
    )
    done = lifecycle.rewrap_data_keys()

    assert [r.version for r in done] == [1, 2]
    assert kms.counts["ReEncrypt"] == 2  # once per version, inside KMS
    assert kms.counts["GenerateDataKey"] == kms.counts["Encrypt"] == 0
    assert dump(engine) == rows
    assert all(new_id in m and old_id not in m for _, m, _, _ in stored_keys(registry))

    # The old key is disabled: it refuses everything from now on.
    for operation in ("Decrypt", "ReEncrypt"):
        kms.inject(operation, "DisabledException", key_id=old_id)
    with pytest.raises(ClientError, match="DisabledException"):
        client.decrypt(CiphertextBlob=blob)  # the fault really bites the old key
    kms.reset_counts()
    kf.configure(
        master_key=kf.AwsKmsMasterKey(new_id, client=client), key_store=kf.SqlKeyStore(engine)
    )
    assert read(engine) == everyone()
    assert kms.counts["Decrypt"] == 2  # one unwrap per version, all under the new key


def test_rewrap_from_a_local_key_to_aws(
    engine: sa.Engine, unconfigured: None, kms: KmsServer, client: Any
) -> None:
    local = kf.LocalMasterKey(KEY_A)
    old = configure_local(engine, master_key=local)
    fill(engine)
    deks = [unwrapped_key(old, "pii", v) for v in (1, 2)]
    rows = dump(engine)
    key_id = kms.create_key("production master")
    kms.reset_counts()

    kf.configure(
        master_key=kf.AwsKmsMasterKey(key_id, client=client),
        key_store=kf.SqlKeyStore(engine),
        previous_master_keys=[local],
    )
    done = lifecycle.rewrap_data_keys()

    assert [(r.version, r.old_master_key_id) for r in done] == [
        (1, local.key_id),
        (2, local.key_id),
    ]
    assert all(
        r.new_master_key_id.startswith("aws-kms:") and key_id in r.new_master_key_id for r in done
    )
    assert kms.counts["Encrypt"] == 2 and kms.counts["ReEncrypt"] == 0
    assert dump(engine) == rows

    aws_only = kf.configure(
        master_key=kf.AwsKmsMasterKey(key_id, client=client), key_store=kf.SqlKeyStore(engine)
    )
    assert read(engine) == everyone()
    assert [unwrapped_key(aws_only, "pii", v) for v in (1, 2)] == deks
    assert all(m.startswith("aws-kms:") for _, m, _, _ in stored_keys(aws_only))


# Census and known columns -----------------------------------------------------------------------


@pytest.fixture
def registry(engine: sa.Engine, unconfigured: None) -> Iterator[kf.KeyRegistry]:
    yield configure_local(engine, names=("pii", "pii-2"))


def test_column_census_counts_what_was_inserted(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill(engine)  # emails: 3 on v1, 2 on v2, 2 NULL; photos: 2 on v1, 3 on v2, 2 NULL
    kf.rotate_data_key("pii")  # v3: active, no row yet
    other_key = registry.active_key("pii-2")
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO people (id, email, photo) VALUES (8, :e, :p), (9, :e2, NULL)"),
            {
                "e": "plain@example.com",
                "p": b"plain photo",
                "e2": other_key.encrypt_text(b"x", b""),
            },
        )

    email, photo = lifecycle.column_census(
        [ColumnRef("people", "email", "pii"), ColumnRef("people", "photo", "pii")]
    )

    assert (email.total, email.nulls, email.by_version, email.other) == (
        9,
        2,
        {1: 3, 2: 2, 3: 0},
        2,
    )
    assert (photo.total, photo.nulls, photo.by_version, photo.other) == (
        9,
        3,
        {1: 2, 2: 3, 3: 0},
        1,
    )
    assert email.on_other_versions(2) == 5
    assert email.column == ColumnRef("people", "email", "pii")


def test_known_columns_come_from_jobs_and_metadata(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill(engine)
    assert lifecycle.known_columns() == []
    reencrypt_column(engine, "people", "email", key="pii")
    models = sa.MetaData()
    sa.Table(
        "orders",
        models,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("card", kf.EncryptedString(19, key="pii-2")),
        sa.Column("note", sa.String(100)),
    )
    people_table(models)

    assert lifecycle.known_columns() == [ColumnRef("people", "email", "pii")]
    assert lifecycle.known_columns(models) == [
        ColumnRef("orders", "card", "pii-2"),
        ColumnRef("people", "email", "pii"),
        ColumnRef("people", "photo", "pii"),
    ]


# Retire and destroy -----------------------------------------------------------------------------


def retired_days_ago(engine: sa.Engine, name: str, version: int, *, days: float) -> None:
    """Move a version's retirement back in time, as if ``days`` had passed since."""
    keys = sa.table("kms_field_keys", sa.column("name"), sa.column("version"),
                    sa.column("retired_at", sa.DateTime))  # fmt: skip
    mine = (keys.c.name == name) & (keys.c.version == version)
    with engine.begin() as conn:
        retired = conn.execute(sa.select(keys.c.retired_at).where(mine)).scalar_one()
        earlier = retired - timedelta(days=days, seconds=1)
        conn.execute(keys.update().where(mine).values(retired_at=earlier))


def test_retire_only_when_no_row_is_left(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    fill(engine)
    deks = [unwrapped_key(registry, "pii", v) for v in (1, 2)]
    kept = dump(engine)[0][1]  # alice's email on v1, kept aside

    # Nothing declares the columns: the scan of every column still finds them, once every
    # process has moved to v2 (active_ttl after the rotation; before that, retire says so).
    with pytest.raises(kf.KeyStateError, match="retry in") as raised:
        lifecycle.retire_data_key("pii", 1)
    time.sleep(3.1)  # active_ttl (1 s) and the 2 s margin
    with pytest.raises(kf.KeyStateError, match="still used") as raised:
        lifecycle.retire_data_key("pii", 1)
    assert "people.email: 3 rows, undeclared" in str(raised.value)
    assert "people.photo: 2 rows, undeclared" in str(raised.value)
    assert_clean(raised.value, deks)
    with pytest.raises(kf.KeyStateError, match="active version") as raised:
        lifecycle.retire_data_key("pii", 2, metadata=PEOPLE.metadata)
    assert_clean(raised.value, deks)
    with pytest.raises(kf.KeyStateError) as raised:
        lifecycle.retire_data_key("pii", 1, metadata=PEOPLE.metadata)
    assert "people.email: 3 rows" in str(raised.value)
    assert "people.photo: 2 rows" in str(raised.value)
    assert_clean(raised.value, deks)
    reencrypt_column(engine, "people", "email", key="pii")
    with pytest.raises(kf.KeyStateError, match=r"people\.photo: 2 rows") as raised:
        lifecycle.retire_data_key("pii", 1, metadata=PEOPLE.metadata)
    assert "people.email" not in str(raised.value)
    assert registry.key_store.get("pii", 1).state is kf.KeyState.READABLE

    reencrypt_column(engine, "people", "photo", key="pii")
    counts = lifecycle.retire_data_key("pii", 1)  # both columns are known from their jobs now

    assert sorted((str(c.column), c.by_version) for c in counts) == [
        ("people.email", {1: 0, 2: 5}),
        ("people.photo", {1: 0, 2: 5}),
    ]
    assert registry.key_store.get("pii", 1).state is kf.KeyState.RETIRED
    assert lifecycle.retire_data_key("pii", 1) == []  # again: nothing to do
    assert read(engine) == everyone()
    with engine.begin() as conn:  # a value from before, restored from an old backup
        conn.execute(sa.text("INSERT INTO people (id, email) VALUES (99, :e)"), {"e": kept})
    with raises_kf(kf.DecryptionError, match="'pii' version 1") as failed:
        with engine.connect() as conn:
            conn.execute(sa.select(PEOPLE.c.email).where(PEOPLE.c.id == 99)).all()
    assert failed.value is not None
    assert_clean(failed.value, deks)
    with pytest.raises(kf.KeyStateError):
        registry.data_key("pii", 1)


def test_destroy_needs_confirmation_and_a_retired_version(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill(engine)
    deks = [unwrapped_key(registry, "pii", v) for v in (1, 2)]
    with pytest.raises(kf.KeyStateError, match="only a retired") as raised:
        lifecycle.destroy_data_key("pii", 1, confirm=True)  # readable, rows still on it
    assert_clean(raised.value, deks)
    reencrypt_column(engine, "people", "email", key="pii")
    reencrypt_column(engine, "people", "photo", key="pii")
    lifecycle.retire_data_key("pii", 1)
    with pytest.raises(kf.KeyStateError, match="only a retired"):
        lifecycle.destroy_data_key("pii", 2, confirm=True)  # the active version
    with pytest.raises(kf.KeyStateError, match="confirm=True") as raised:
        lifecycle.destroy_data_key("pii", 1)
    assert_clean(raised.value, deks)
    with pytest.raises(kf.KeyStateError, match="grace period of 3 days") as raised:
        lifecycle.destroy_data_key("pii", 1, confirm=True)
    assert_clean(raised.value, deks)
    assert registry.key_store.get("pii", 1).wrapped_key != b""
    retired_days_ago(engine, "pii", 1, days=3)

    lifecycle.destroy_data_key("pii", 1, confirm=True)

    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT version, wrapped_key, state FROM kms_field_keys WHERE name = 'pii'")
        ).all()
    wrapped = {v: bytes(w) for v, w, _ in rows}
    assert wrapped[1] == b""  # crypto-shredded
    assert len(wrapped[2]) > 0
    assert {v: s for v, _, s in rows} == {1: "destroyed", 2: "active"}
    registry.forget()
    assert read(engine) == everyone()  # everything lives on v2
    with pytest.raises(kf.KeyStateError):
        registry.data_key("pii", 1)
    # Nothing to rewrap: v1 is destroyed and v2 is already under the master key.
    assert lifecycle.rewrap_data_keys(["pii"]) == []

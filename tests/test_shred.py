"""Crypto-shredding that holds against backups.

``destroy`` blanks one row of the live key store; a backup of that table still holds the wrapped
key, and the KMS key that unwraps it stays enabled. The review decrypted a backup value under a
destroyed version. ``shred_master_key`` rewraps every surviving version under a new KMS key,
verifies each, and only then schedules the old key for deletion: from then on the backup's
wrapped keys unwrap nowhere. moto allows calls with a key pending deletion; tests/kms_server.py
refuses them as real KMS does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope, lifecycle
from tests.helpers import configure_local, raw_values, reset_global_registry
from tests.kms_server import KmsServer

PEOPLE_EMAIL = envelope.encode_context("people", "email", "str")

CLI = [sys.executable, "-m", "sqlalchemy_kms_field.cli"]
BACKUP = "kms_field_keys_backup"


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_global_registry(monkeypatch)


def people_table() -> sa.Table:
    return sa.Table(
        "people",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )


def read_all(engine: sa.Engine) -> dict[int, str]:
    table = people_table()
    with engine.connect() as conn:
        return {r.id: r.email for r in conn.execute(sa.select(table.c.id, table.c.email))}


def back_up_key_store(engine: sa.Engine) -> kf.SqlKeyStore:
    """A copy of the key-store table, as a nightly backup (or a replica) holds it."""
    backup = kf.SqlKeyStore(engine, table_name=BACKUP)
    backup.create_table()
    live = kf.SqlKeyStore(engine).table
    with engine.begin() as conn:
        conn.execute(backup.table.insert().from_select(live.c.keys(), sa.select(live)))
    return backup


@pytest.fixture
def old_and_new(kms: KmsServer) -> tuple[str, str]:
    old_alias = f"alias/kf-old-{uuid.uuid4().hex[:8]}"
    kms.create_alias(old_alias, kms.create_key("old master"))
    return old_alias, kms.create_key("new master")


@pytest.fixture
def destroyed_v1(
    engine: sa.Engine, kms: KmsServer, old_and_new: tuple[str, str]
) -> Iterator[tuple[kf.SqlKeyStore, str]]:
    """pii v1 written, rotated away, every row moved to v2, v1 destroyed; a backup of the key
    store and a backup value under v1 taken before. Yields (backup store, backup value)."""
    old_alias, _ = old_and_new
    registry = configure_local(
        engine, master_key=kf.AwsKmsMasterKey(old_alias, client=kms.client())
    )
    table = people_table()
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "email": f"user{i}@example.com"} for i in (1, 2)])
    backup_value = raw_values(engine, "people", "email")[0]
    backup = back_up_key_store(engine)
    registry.rotate_data_key("pii")
    registry.forget()
    with engine.begin() as conn:  # every row to v2 (what a re-encryption does)
        for i in (1, 2):
            conn.execute(table.update().where(table.c.id == i).values(email=f"user{i}@example.com"))
    assert {v.split(":")[2] for v in raw_values(engine, "people", "email")} == {"2"}
    registry.key_store.set_state("pii", 1, kf.KeyState.RETIRED)
    registry.key_store.destroy("pii", 1)
    yield backup, backup_value


def backup_reader(backup: kf.SqlKeyStore, old_alias: str, kms: KmsServer) -> kf.KeyRegistry:
    """Whoever holds the backup and can still call KMS with the old key."""
    return kf.KeyRegistry(kf.AwsKmsMasterKey(old_alias, client=kms.client()), backup)


def test_destroy_alone_does_not_reach_a_backup_and_shred_does(
    engine: sa.Engine,
    kms: KmsServer,
    old_and_new: tuple[str, str],
    destroyed_v1: tuple[kf.SqlKeyStore, str],
) -> None:
    old_alias, new_key = old_and_new
    backup, backup_value = destroyed_v1
    # destroy blanked the live row, yet the backup decrypts the backup value.
    assert (
        backup_reader(backup, old_alias, kms)
        .data_key("pii", 1)
        .decrypt_text(backup_value, PEOPLE_EMAIL)
        == b"user1@example.com"
    )

    old = kf.AwsKmsMasterKey(old_alias, client=kms.client())
    registry = kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
        previous_master_keys=[old],
        active_ttl=0.1,
    )
    expected = {1: "user1@example.com", 2: "user2@example.com"}
    assert read_all(engine) == expected
    stop, errors, reads = threading.Event(), [], [0]

    def keep_reading() -> None:  # the application goes on during the shred
        while not stop.is_set():
            try:
                assert read_all(engine) == expected
                reads[0] += 1
            except Exception as exc:
                errors.append(exc)
            stop.wait(0.05)  # (SQLite: let the shred's writes find the file unlocked)

    reader = threading.Thread(target=keep_reading)
    reader.start()
    try:
        with pytest.raises(kf.KeyStateError, match="--yes-shred"):
            lifecycle.shred_master_key(old)
        done = lifecycle.shred_master_key(old, pending_window_days=7, confirm=True)
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[0]
    assert reads[0] > 0
    assert [(r.name, r.version) for r in done.rewrapped] == [("pii", 2)]
    assert done.old_master_key_id == "aws-kms:" + old.key_arn
    metadata = kms.client().describe_key(KeyId=old_alias)["KeyMetadata"]
    assert metadata["KeyState"] == "PendingDeletion"

    # Live data: the new key alone reads every row.
    kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
    )
    assert read_all(engine) == expected
    # The backup: its wrapped v1 unwraps nowhere any more.
    with pytest.raises(kf.MasterKeyError) as raised:
        backup_reader(backup, old_alias, kms).data_key("pii", 1)
    assert raised.value.code == "KMSInvalidStateException"
    new_only = kf.KeyRegistry(kf.AwsKmsMasterKey(new_key, client=kms.client()), backup)
    with pytest.raises(kf.MasterKeyError, match="version 1"):
        new_only.data_key("pii", 1)
    assert registry.key_store.get("pii", 1).state is kf.KeyState.DESTROYED


def test_shred_refuses_while_a_version_still_depends_on_the_old_key(
    engine: sa.Engine, kms: KmsServer, old_and_new: tuple[str, str]
) -> None:
    old_alias, new_key = old_and_new
    old = kf.AwsKmsMasterKey(old_alias, client=kms.client())
    store = configure_local(engine, master_key=old).key_store
    # A process still configured with the old key is creating a version right now.
    version = store.reserve_version("pii")
    store.store_wrapped("pii", version, b"wrapped", "aws-kms:" + old.key_arn)
    kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key, client=kms.client()),
        key_store=store,
        previous_master_keys=[old],
    )
    with pytest.raises(kf.KeyStateError, match=f"'pii' version {version} .pending. still depends"):
        lifecycle.shred_master_key(old, confirm=True)
    assert kms.client().describe_key(KeyId=old_alias)["KeyMetadata"]["KeyState"] == "Enabled"
    with pytest.raises(kf.ConfigurationError, match="is the configured master key"):
        lifecycle.shred_master_key(kf.AwsKmsMasterKey(new_key, client=kms.client()), confirm=True)
    with pytest.raises(kf.ConfigurationError, match="7 to 30"):
        lifecycle.shred_master_key(old, pending_window_days=3, confirm=True)


def test_keys_shred_on_the_command_line(
    db_url: str,
    engine: sa.Engine,
    kms: KmsServer,
    old_and_new: tuple[str, str],
    destroyed_v1: tuple[kf.SqlKeyStore, str],
    tmp_path: Path,
) -> None:
    old_alias, new_key = old_and_new
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KMS_FIELD_")},
        **kms.env(),
        "KMS_FIELD_DATABASE_URL": db_url,
        "KMS_FIELD_MASTER_KEY": f"aws-kms:{new_key}",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "keys", "shred", "--old-master-key", f"aws-kms:{old_alias}", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    refused = cli()
    assert refused.returncode == 1 and "--yes-shred" in refused.stderr
    assert kms.client().describe_key(KeyId=old_alias)["KeyMetadata"]["KeyState"] == "Enabled"
    done = cli("--pending-days", "7", "--yes-shred")
    assert done.returncode == 0, done.stderr
    assert "scheduled for deletion" in done.stdout
    assert kms.client().describe_key(KeyId=old_alias)["KeyMetadata"]["KeyState"] == (
        "PendingDeletion"
    )
    kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
    )
    assert read_all(engine) == {1: "user1@example.com", 2: "user2@example.com"}

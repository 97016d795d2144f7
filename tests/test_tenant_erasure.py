"""Erasing a tenant (issue 13, point 4): census first, grace period, every process, backups.

The census names every table and column holding the tenant's values before anything changes;
a confirmed erasure retires the tenant's keys (every process refuses them within active_ttl,
naming the erasure; restore undoes it), and after the grace period destroys them; no other
tenant is affected. End to end with moto: after the intermediate-key rotation and the master
key's shred, a backup taken before the erasure no longer yields the tenant's values.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import lifecycle, tenants
from sqlalchemy_kms_field.tenant_erasure import erase_tenant, restore_tenant
from tests.helpers import MASTER_KEY_B64, configure_local, reset_tenants
from tests.kms_server import KmsServer
from tests.test_cli import Cli, clean_environment

ROOT = Path(__file__).resolve().parent.parent

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("body", kf.EncryptedText(key="pii", tenant="tenant_id")),
)
# A table the application's models do not declare: the census finds it all the same.
archive = sa.Table(
    "notes_archive",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant_id", sa.Integer, nullable=False),
    sa.Column("old_body", kf.EncryptedText(key="pii", tenant="tenant_id")),
)


@pytest.fixture
def db(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    reset_tenants(monkeypatch)
    configure_local(engine, active_ttl=0.5)
    kf.create_tenant_table()
    metadata.create_all(engine)
    fill(engine)
    yield engine


def fill(engine: sa.Engine) -> None:
    for tenant in (42, 43):
        with engine.begin() as conn:
            rows = [{"id": tenant * 10 + i, "tenant_id": tenant, "body": f"{tenant}-{i}"}
                    for i in range(3)]  # fmt: skip
            conn.execute(notes.insert(), rows)
            conn.execute(archive.insert(), [{**r, "old_body": r["body"]} for r in rows[:2]])


def read(engine: sa.Engine, tenant: int) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(notes.c.body).where(notes.c.tenant_id == tenant).order_by(notes.c.id)
            ).scalars()
        )


def test_census_then_retire_restore_grace_destroy(db: sa.Engine) -> None:
    census = erase_tenant("pii", 42)  # no confirm: counts, changes nothing
    assert census.stage == "census"
    assert {(f.column.table, f.column.column): f.rows for f in census.found} == {
        ("notes", "body"): 3,
        ("notes_archive", "old_body"): 2,
    }
    assert read(db, 42) == ["42-0", "42-1", "42-2"]

    retired = erase_tenant("pii", 42, confirm=True)
    assert retired.stage == "retired" and retired.destroy_after is not None
    with pytest.raises(kf.DecryptionError, match="tenant '42' of data key 'pii' is being erased"):
        read(db, 42)
    with db.begin() as conn, pytest.raises(kf.KeyStateError, match="being erased"):
        conn.execute(notes.insert(), {"id": 999, "tenant_id": 42, "body": "new"})
    assert read(db, 43) == ["43-0", "43-1", "43-2"]

    restore_tenant("pii", 42)  # within the grace period: undone
    assert read(db, 42) == ["42-0", "42-1", "42-2"]

    erase_tenant("pii", 42, confirm=True)
    again = erase_tenant("pii", 42, confirm=True)  # within the grace period: still retired
    assert again.stage == "retired"
    assert [v.state for v in tenants.get_keyring().versions("pii", "42")] == ["retired"]
    done = erase_tenant("pii", 42, confirm=True, skip_grace_period=True)
    assert done.stage == "destroyed" and done.erased is not None
    [version] = tenants.get_keyring().versions("pii", "42")
    assert version.state == "destroyed" and version.wrapped_by is None
    with db.connect() as conn:
        wrapped = conn.execute(
            sa.text("SELECT wrapped_key FROM kms_field_tenant_keys WHERE key_name = 'pii.t.42'")
        ).scalar_one()
    assert wrapped == ""
    with pytest.raises(kf.DecryptionError, match="tenant '42' of data key 'pii' was erased"):
        read(db, 42)
    with pytest.raises(kf.KeyStateError, match="destroyed key cannot come back"):
        restore_tenant("pii", 42)
    assert read(db, 43) == ["43-0", "43-1", "43-2"]
    # The rows are still there: the census by SQL alone still counts them.
    assert erase_tenant("pii", 42).rows == 5


def test_erasure_reaches_a_second_process_within_active_ttl(
    db: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    stop = tmp_path / "stop"
    env = {"KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64, "PATH": "/usr/bin:/bin"}
    reader = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/scripts/tenant_reader.py"), db_url, str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True,
    )  # fmt: skip
    try:
        ready = stop.with_suffix(".ready")
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # it has read both tenants, and cached their keys
        erasing_at = time.time()
        erase_tenant("pii", 42, confirm=True, skip_grace_period=True)
        erased_at = time.time()  # (the census scan before the retirement takes a while)
        time.sleep(2.0)
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    passes = [json.loads(line) for line in out.splitlines()]
    before = [p for p in passes if p["t"] < erasing_at]
    late = [p for p in passes if p["start"] > erased_at + 0.5 + 0.1]  # after active_ttl
    assert before and late
    assert all(p["ok"] == {"42": 3, "43": 3} and not p["errors"] for p in before)
    for p in late:  # tenant 42 refused, naming the erasure; tenant 43 never affected
        assert p["ok"] == {"43": 3}
        assert "tenant '42' of data key 'pii' was erased" in p["errors"]["42"]
    assert all(p["ok"].get("43") == 3 for p in passes)


def test_the_command_shows_the_census_and_asks_first(
    db: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    cli = Cli(tmp_path, {**clean_environment(), "KMS_FIELD_DATABASE_URL": db_url})
    refused = cli("tenants", "erase", "pii", "42", code=1)
    assert "notes.body: 3 rows" in refused.stdout
    assert "notes_archive.old_body: 2 rows" in refused.stdout
    assert "5 rows in 2 columns will become unreadable" in refused.stdout
    assert "--yes-erase" in refused.stderr
    assert read(db, 42) == ["42-0", "42-1", "42-2"]
    retired = cli("tenants", "erase", "pii", "42", "--yes-erase").stdout
    assert "kms-field tenants restore pii 42" in retired
    cli("tenants", "restore", "pii", "42")
    assert read(db, 42) == ["42-0", "42-1", "42-2"]
    done = cli("tenants", "erase", "pii", "42", "--yes-erase", "--skip-grace-period").stdout
    assert "erased: the key versions of tenant '42' are destroyed" in done
    listed = cli("tenants", "list", "pii").stdout
    lines = [line.split() for line in listed.splitlines()]
    assert ["42", "pii.t.42", "v1", "destroyed", "wrapped", "by", "-"] in lines
    assert ["43", "pii.t.43", "v1", "active", "wrapped", "by", "pii", "v1"] in lines
    with pytest.raises(kf.DecryptionError, match="was erased"):
        read(db, 42)
    cli("tenants", "erase", "pii", "404", code=1)
    cli.assert_never_printed([], ["42-0", "43-0"])


@pytest.mark.databases("sqlite")
def test_backups_older_than_the_shred_no_longer_yield_the_tenant(
    engine: sa.Engine, db_url: str, kms: KmsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_tenants(monkeypatch)
    old_alias = f"alias/kf-old-{uuid.uuid4().hex[:8]}"
    kms.create_alias(old_alias, kms.create_key("old master"))
    new_key = kms.create_key("new master")
    old = kf.AwsKmsMasterKey(old_alias, client=kms.client())
    configure_local(engine, master_key=old, active_ttl=0)
    kf.create_tenant_table()
    metadata.create_all(engine)
    fill(engine)
    live_file = Path(db_url.removeprefix("sqlite:///"))
    backup_file = tmp_path / "backup.sqlite"
    shutil.copy(live_file, backup_file)  # last night's backup: both tenants, every key
    backup = sa.create_engine(f"sqlite:///{backup_file}")

    # 1. Erase the tenant. 2. Rotate the intermediate key and rewrap every other tenant's key,
    # then retire and destroy its old version. 3. Shred the old master key.
    erase_tenant("pii", 42, confirm=True, skip_grace_period=True)
    kf.rotate_data_key("pii")
    assert kf.rewrap_tenant_keys("pii") == 1  # tenant 43 only: 42's key is gone
    time.sleep(2.1)  # retire waits active_ttl (0 here) plus 2 s after the rotation
    lifecycle.retire_data_key("pii", 1)
    lifecycle.destroy_data_key("pii", 1, confirm=True, skip_grace_period=True)
    kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
        previous_master_keys=[old],
        active_ttl=0,
    )
    lifecycle.shred_master_key(old, pending_window_days=7, confirm=True)

    # Live: tenant 43 reads under the new master key alone; tenant 42 is erased.
    kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
    )
    assert read(engine, 43) == ["43-0", "43-1", "43-2"]
    with pytest.raises(kf.DecryptionError, match="was erased"):
        read(engine, 42)
    # The backup, read as it was (with the old master key): KMS refuses the key it needs.
    kf.configure(master_key=old, key_store=kf.SqlKeyStore(backup))
    with pytest.raises(kf.MasterKeyError) as raised:
        read(backup, 42)
    assert raised.value.code == "KMSInvalidStateException"
    # The backup's tenant table with the live key store and master key: tenant 42's key was
    # wrapped by intermediate version 1, which is destroyed, and wrapped by nothing else.
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ATTACH DATABASE '{backup_file}' AS old")
        conn.exec_driver_sql("DELETE FROM kms_field_tenant_keys")
        conn.exec_driver_sql(
            "INSERT INTO kms_field_tenant_keys SELECT * FROM old.kms_field_tenant_keys"
        )
        conn.exec_driver_sql("DELETE FROM notes")
        conn.exec_driver_sql("INSERT INTO notes SELECT * FROM old.notes")
    kf.configure(
        master_key=kf.AwsKmsMasterKey(new_key, client=kms.client()),
        key_store=kf.SqlKeyStore(engine),
    )
    with pytest.raises(kf.KmsFieldError, match="version 1"):
        read(engine, 42)
    backup.dispose()

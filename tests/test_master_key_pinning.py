"""Only the configured master keys unwrap (invariant 9), and only a master key that can read the
key store may write to it (invariant 3).

The review planted a key-store row wrapped by a KMS key of its own with nothing but SQL, and the
application encrypted new PII under a data key the planter knew; and a rotation run with the
wrong master key printed success and broke every insert. Both are reproduced here through real
SQL, moto's KMS over HTTP, the command line and Alembic as subprocesses.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import lifecycle
from sqlalchemy_kms_field.registry import key_context
from tests.helpers import (
    assert_no_secret,
    configure_local,
    error_texts,
    local_master_key,
    raises_kf,
    raw_values,
    reset_global_registry,
)
from tests.kms_server import KmsServer

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sqlalchemy_kms_field.cli"]
# What KMS answers a Decrypt whose KeyId did not make the blob (real KMS: IncorrectKeyException;
# moto: AccessDeniedException), or our own check of the KeyId that KMS says it used.
KEY_MISMATCH = {"IncorrectKeyException", "AccessDeniedException", "UnexpectedKeyId"}


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


def insert(engine: sa.Engine, row_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(people_table().insert().values(id=row_id, email=f"user{row_id}@example.com"))


def key_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """The key store exactly as the database holds it."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT name, version, wrapped_key, master_key_id, state, kind "
                "FROM kms_field_keys ORDER BY name, version"
            )
        ).all()
    return [(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]


def plant(engine: sa.Engine, version: int, wrapped: bytes, master_key_id: str) -> None:
    """What someone with write access to the database (and no key) can do: plain SQL."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE kms_field_keys SET state = 'readable' WHERE name = 'pii'"))
        conn.execute(
            sa.text(
                "INSERT INTO kms_field_keys (name, version, wrapped_key, master_key_id, state, "
                "created_at, kind) VALUES ('pii', :v, :w, :m, 'active', :t, 'data')"
            ),
            {"v": version, "w": wrapped, "m": master_key_id, "t": datetime.now(UTC)},
        )


# The planted-row attack (AWS KMS in moto) ----------------------------------------------------


@pytest.fixture
def keys(kms: KmsServer) -> tuple[str, str]:
    """The application's KMS key (by alias) and the attacker's own KMS key id."""
    alias = f"alias/kf-app-{uuid.uuid4().hex[:8]}"
    kms.create_alias(alias, kms.create_key("application"))
    return alias, kms.create_key("attacker")


@pytest.mark.parametrize("claimed", ["attacker", "application"])
def test_a_row_wrapped_by_another_kms_key_is_refused(
    engine: sa.Engine, kms: KmsServer, keys: tuple[str, str], claimed: str
) -> None:
    alias, attacker_key = keys
    client = kms.client()
    master = kf.AwsKmsMasterKey(alias, client=client)
    registry = configure_local(engine, master_key=master)
    people_table().create(engine)
    insert(engine, 1)

    # The attacker makes a data key under its own KMS key with the right context, so it knows
    # the plaintext, and plants it as the active version 2. It may claim either KMS key.
    made = client.generate_data_key(
        KeyId=attacker_key, KeySpec="AES_256", EncryptionContext=key_context("pii", 2)
    )
    claimed_id = made["KeyId"] if claimed == "attacker" else master.key_arn
    plant(engine, 2, made["CiphertextBlob"], "aws-kms:" + claimed_id)
    registry.forget()  # a process starting now

    with raises_kf(kf.MasterKeyError, "'pii' version 2") as raised:
        insert(engine, 2)
    assert isinstance(raised.value, kf.MasterKeyError)
    if claimed == "attacker":
        assert raised.value.code == "UnexpectedMasterKey"
        assert made["KeyId"] in str(raised.value)  # names the unexpected wrapper
    else:  # Decrypt names the configured KeyId, which did not make this blob: KMS refuses
        assert raised.value.code in KEY_MISMATCH
    for text in error_texts(raised.value):
        assert_no_secret(text, [made["Plaintext"]])
    assert [v.split(":")[2] for v in raw_values(engine, "people", "email")] == ["1"]
    with engine.connect() as conn:  # the genuine version still reads
        assert conn.execute(sa.select(people_table().c.email)).scalar_one() == "user1@example.com"
    with pytest.raises(kf.MasterKeyError):
        registry.data_key("pii", 2)


def test_decrypt_names_the_configured_key_and_checks_the_answer(
    engine: sa.Engine, kms: KmsServer, keys: tuple[str, str]
) -> None:
    alias, attacker_key = keys
    master = kf.AwsKmsMasterKey(alias, client=kms.client())
    wrapped_elsewhere = kms.client().encrypt(
        KeyId=attacker_key, Plaintext=os.urandom(32), EncryptionContext=key_context("pii", 1)
    )["CiphertextBlob"]
    assert not master.can_unwrap("aws-kms:" + attacker_key)
    assert not master.can_unwrap("aws-kms:" + alias)  # only the resolved ARN is recorded
    with pytest.raises(kf.MasterKeyError) as raised:
        master.unwrap(wrapped_elsewhere, key_context("pii", 1), "aws-kms:" + master.key_arn)
    assert raised.value.code in KEY_MISMATCH


# The application identifier in the encryption context -------------------------------------------


def test_a_wrapped_key_copied_from_another_application_does_not_unwrap(
    engine: sa.Engine, kms: KmsServer, keys: tuple[str, str]
) -> None:
    alias, _ = keys
    master = kf.AwsKmsMasterKey(alias, client=kms.client())
    billing = kf.KeyRegistry(master, kf.SqlKeyStore(engine), application="billing")
    billing.key_store.create_table()
    billing.create_data_key("pii")
    stolen = billing.key_store.get("pii", 1)

    other = kf.SqlKeyStore(engine, table_name="crm_keys")
    other.create_table()
    with engine.begin() as conn:
        conn.execute(
            other.table.insert().values(
                name="pii", version=1, wrapped_key=stolen.wrapped_key,
                master_key_id=stolen.master_key_id, state="active",
                created_at=datetime.now(UTC).replace(tzinfo=None), kind="data",
            )
        )  # fmt: skip
    crm = kf.KeyRegistry(master, other, application="crm")
    with pytest.raises(kf.MasterKeyError) as raised:
        crm.data_key("pii", 1)
    assert raised.value.code == "InvalidCiphertextException"
    assert billing.data_key("pii", 1).version == 1
    with pytest.raises(kf.ConfigurationError, match="application"):
        kf.KeyRegistry(master, other, application="no spaces allowed")


def test_keys_made_before_the_application_was_set_move_into_it_by_rewrap(
    engine: sa.Engine,
) -> None:
    old = configure_local(engine)  # no application
    people_table().create(engine)
    insert(engine, 1)
    dek = old.data_key("pii", 1)
    billing = kf.configure(
        master_key=local_master_key(), key_store=old.key_store, application="billing"
    )
    with engine.connect() as conn, raises_kf(kf.MasterKeyError, "version 1"):
        conn.execute(sa.select(people_table().c.email)).scalar_one()

    done = lifecycle.rewrap_data_keys(registry=billing, from_application=None)
    assert [(r.name, r.version) for r in done] == [("pii", 1)]
    billing.forget()
    with engine.connect() as conn:
        assert conn.execute(sa.select(people_table().c.email)).scalar_one() == "user1@example.com"
    ctx = b"any context"  # the same data key, rewrapped: what one seals the other opens
    assert billing.data_key("pii", 1).decrypt_text(dek.encrypt_text(b"same", ctx), ctx) == b"same"
    stored = billing.key_store.get("pii", 1)
    with pytest.raises(kf.MasterKeyError):  # no longer under the context without application
        local_master_key().unwrap(stored.wrapped_key, key_context("pii", 1), stored.master_key_id)


# A master key that cannot read the key store cannot write to it --------------------------------


@pytest.fixture
def wrong_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "other.key"
    kf.LocalMasterKey.generate_file(path)
    return path


def test_rotation_with_the_wrong_master_key_is_refused_in_python(
    engine: sa.Engine, wrong_key_file: Path
) -> None:
    registry = configure_local(engine)
    registry.create_index_key("email-index")
    before = key_rows(engine)
    kf.configure(
        master_key=kf.LocalMasterKey.from_file(wrong_key_file), key_store=registry.key_store
    )
    attempts = [
        lambda: kf.rotate_data_key("pii"),
        lambda: kf.create_data_key("other"),
        lambda: kf.rotate_index_key("email-index"),
        lambda: kf.create_index_key("other-index"),
    ]
    for attempt in attempts:
        with pytest.raises(kf.MasterKeyError, match="rewrap") as raised:
            attempt()
        assert raised.value.code == "WrongMasterKey"
        assert "rewrap_data_keys" in str(raised.value)
        assert key_rows(engine) == before  # nothing written, not even a pending row


def test_rotation_with_a_master_key_that_cannot_unwrap_is_refused(
    engine: sa.Engine, kms: KmsServer, keys: tuple[str, str]
) -> None:
    """Same key id, but KMS refuses it (disabled): proven by a real unwrap, not by a label."""
    alias, _ = keys
    registry = configure_local(engine, master_key=kf.AwsKmsMasterKey(alias, client=kms.client()))
    before = key_rows(engine)
    registry.forget()
    kms.reset_counts()
    kms.inject("Decrypt", "DisabledException")
    with pytest.raises(kf.MasterKeyError, match="cannot unwrap data key 'pii' version 1"):
        registry.rotate_data_key("pii")
    assert key_rows(engine) == before
    assert kms.counts["GenerateDataKey"] == 0


def test_rotation_with_the_wrong_master_key_is_refused_by_the_command_line(
    db_url: str, engine: sa.Engine, wrong_key_file: Path, tmp_path: Path
) -> None:
    configure_local(engine)
    before = key_rows(engine)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KMS_FIELD_")},
        "KMS_FIELD_DATABASE_URL": db_url,
        "KMS_FIELD_MASTER_KEY": f"local:{wrong_key_file}",
    }
    for command in (["keys", "rotate", "pii"], ["keys", "create", "other"]):
        proc = subprocess.run(
            [*CLI, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "now active" not in proc.stdout
        assert "kms-field keys rewrap" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert key_rows(engine) == before


KEYS_REVISION = '''"""The key store and data key "pii".

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_key_store()
    op.create_data_key("pii")
'''

ROTATE_REVISION = '''"""Rotate data key "pii".

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.rotate_data_key("pii")
'''


def test_rotation_with_the_wrong_master_key_is_refused_in_an_alembic_upgrade(
    db_url: str, engine: sa.Engine, wrong_key_file: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "alembic"
    (folder / "versions").mkdir(parents=True)
    for name in ("alembic.ini", "env.py"):
        (folder / name).write_text((ROOT / "migrations" / name).read_text())
    (folder / "versions" / "0001_keys.py").write_text(KEYS_REVISION)
    (folder / "versions" / "0002_rotate.py").write_text(ROTATE_REVISION)
    right_key = tmp_path / "right.key"
    right_key.write_text(base64.b64encode(os.urandom(32)).decode())

    def upgrade(revision: str, key: Path) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KMS_FIELD_DATABASE_URL": db_url,
            "KMS_FIELD_MASTER_KEY": f"local:{key}",
        }
        command = [sys.executable, "-m", "alembic", "-c", str(folder / "alembic.ini")]
        return subprocess.run(
            [*command, "upgrade", revision],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert upgrade("0001", right_key).returncode == 0
    before = key_rows(engine)
    failed = upgrade("head", wrong_key_file)
    assert failed.returncode != 0
    assert "WrongMasterKey" in failed.stderr or "rewrap" in failed.stderr
    assert key_rows(engine) == before
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    assert upgrade("head", right_key).returncode == 0  # the right key goes on
    assert [r[1] for r in key_rows(engine)] == [1, 2]


def test_the_command_line_moves_keys_into_an_application(
    db_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    key_file = tmp_path / "dev.key"
    kf.LocalMasterKey.generate_file(key_file)
    registry = configure_local(engine, master_key=kf.LocalMasterKey.from_file(key_file))
    people_table().create(engine)
    insert(engine, 1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KMS_FIELD_")},
        "KMS_FIELD_DATABASE_URL": db_url,
        "KMS_FIELD_MASTER_KEY": f"local:{key_file}",
        "KMS_FIELD_APPLICATION": "billing",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    refused = cli("keys", "rotate", "pii")  # the keys are not in application "billing" yet
    assert refused.returncode == 1 and "cannot unwrap data key 'pii' version 1" in refused.stderr
    moved = cli("keys", "rewrap", "--from-application", "")
    assert moved.returncode == 0, moved.stderr
    assert "1 data key version rewrapped" in moved.stdout
    assert cli("keys", "rotate", "pii").returncode == 0
    billing = kf.configure(
        master_key=kf.LocalMasterKey.from_file(key_file),
        key_store=registry.key_store,
        application="billing",
    )
    insert(engine, 2)
    with engine.connect() as conn:
        emails = conn.execute(sa.select(people_table().c.email).order_by(people_table().c.id))
        assert emails.scalars().all() == ["user1@example.com", "user2@example.com"]
    assert billing.active_key("pii").version == 2
    env["KMS_FIELD_APPLICATION"] = "not valid!"
    bad = cli("keys", "rotate", "pii")
    assert bad.returncode == 2 and "KMS_FIELD_APPLICATION" in bad.stderr

"""Encrypting an existing plaintext column under a key per tenant (issue 13, point 1: every
write path supplies the tenant, re-encryption and the CLI included, or fails loudly).

`encrypt-column` knows one data key per column: run on a column declared with tenant= it wrote
every value under the shared key, and the application then refused each of them ("values
cannot move between tenants"); the read error even advised that command. Now the CLI refuses
it when the models declare tenant=, the read error names `kms-field tenants encrypt`, and that
command (Python: `encrypt_tenants`) puts each value under its row's tenant key, resumably: a
SIGKILLed run loses nothing and a rerun finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.tenant_rotation import encrypt_tenants
from tests.helpers import MASTER_KEY_B64, configure_local, reset_tenants
from tests.test_cli import Cli, clean_environment

ROOT = Path(__file__).resolve().parent.parent
TENANTS = (42, 43, 44)
PER_TENANT = 20


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "plain_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[int]
    # accept_plaintext: the application reads the rows not encrypted yet during the migration
    body: Mapped[str | None] = mapped_column(
        kf.EncryptedText(key="pii", tenant="tenant_id", accept_plaintext=True)
    )


notes: sa.Table = Note.__table__  # type: ignore[assignment]
plain = sa.table("plain_notes", sa.column("id"), sa.column("tenant_id"), sa.column("body"))


@pytest.fixture
def db(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    reset_tenants(monkeypatch)
    configure_local(engine, active_ttl=0.5)
    kf.create_tenant_table()
    with engine.begin() as conn:  # the table as it was: a plaintext column
        conn.execute(
            sa.text(
                "CREATE TABLE plain_notes (id INTEGER PRIMARY KEY, tenant_id INTEGER NOT NULL, "
                "body VARCHAR(500))"
            )
        )
        rows = [{"id": t * 100 + i, "tenant_id": t, "body": f"note {i} of {t}"}
                for t in TENANTS for i in range(PER_TENANT)]  # fmt: skip
        rows.append({"id": 1, "tenant_id": 42, "body": None})
        conn.execute(plain.insert(), rows)
    yield engine
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE plain_notes"))


def expected() -> dict[int, str | None]:
    out: dict[int, str | None] = {
        t * 100 + i: f"note {i} of {t}" for t in TENANTS for i in range(PER_TENANT)
    }
    out[1] = None
    return out


def read(engine: sa.Engine) -> dict[int, str | None]:
    """What the application sees (plaintext rows too, as accept_plaintext reads them)."""
    with engine.connect() as conn:
        return {i: b for i, b in conn.execute(sa.select(notes.c.id, notes.c.body))}


def stored(engine: sa.Engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        return {i: b for i, b in conn.execute(sa.select(plain.c.id, plain.c.body))}


def encrypted(engine: sa.Engine) -> int:
    return sum(1 for v in stored(engine).values() if v and v.startswith("kf2:pii.t."))


def test_a_killed_run_loses_nothing_and_a_rerun_finishes(db: sa.Engine, db_url: str) -> None:
    env = {"KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64, "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = str(ROOT)
    script = str(ROOT / "tests/scripts/tenant_encrypt_job.py")
    first = subprocess.Popen(
        [sys.executable, script, db_url, "4", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while encrypted(db) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    done = encrypted(db)
    assert 12 <= done < len(TENANTS) * PER_TENANT  # killed half way
    assert read(db) == expected()  # every row readable, nothing lost

    jobs = encrypt_tenants(notes, "body")  # the rerun finishes what is left, once
    assert sum(job.rows for job in jobs) == len(TENANTS) * PER_TENANT - done
    assert read(db) == expected()
    for row_id, value in stored(db).items():
        if row_id == 1:
            assert value is None
        else:
            assert value is not None and value.startswith(f"kf2:pii.t.{row_id // 100}:1:")
    assert encrypt_tenants(notes, "body") == []  # nothing left to do
    # Each value is bound to its tenant: moved to another tenant's row, it does not decrypt.
    with db.begin() as conn:
        moved = stored(db)[4200]
        conn.execute(plain.update().where(plain.c.id == 4300).values(body=moved))
    with pytest.raises(kf.DecryptionError, match="cannot move between tenants"):
        read(db)


@pytest.mark.databases("sqlite")
def test_the_command_line_refuses_encrypt_column_and_encrypts_per_tenant(
    db: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    env = {**clean_environment(), "KMS_FIELD_DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    env["KMS_FIELD_MODELS"] = "tests.test_tenant_encrypt:Base"
    env["KMS_FIELD_MASTER_KEY"] = "local-env:TEST_MASTER_KEY"
    env["TEST_MASTER_KEY"] = MASTER_KEY_B64
    cli = Cli(tmp_path, env)
    refused = cli("encrypt-column", "plain_notes.body", "--key", "pii", code=1).stderr
    assert "with tenant='tenant_id'" in refused
    assert "run `kms-field tenants encrypt plain_notes.body`" in refused
    assert encrypted(db) == 0  # nothing written under the shared key

    strict = kf.EncryptedText(key="pii", tenant="tenant_id")  # no accept_plaintext
    sa.Table("plain_notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("tenant_id", sa.Integer), sa.Column("body", strict))  # fmt: skip
    with pytest.raises(kf.DecryptionError, match=r"`kms-field tenants encrypt plain_notes\.body`"):
        strict.process_result_value("note 0 of 42\x1f42", sa.create_engine("sqlite://").dialect)

    done = cli("tenants", "encrypt", "plain_notes.body").stdout
    assert "plain_notes.body: 60 rows encrypted under the keys of 3 tenants" in done
    assert read(db) == expected() and encrypted(db) == 60
    cli.assert_never_printed([], ["note 0 of 42"])


@pytest.mark.databases("sqlite")
def test_op_encrypt_column_refuses_a_column_the_models_declare_with_tenant(
    db: sa.Engine,
) -> None:
    """In a migration, op.encrypt_column on a tenant column would have written every value
    under the shared key; with env.py's target_metadata declaring tenant=, it refuses."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    import sqlalchemy_kms_field.alembic_ops  # noqa: F401 - registers op.encrypt_column

    before = stored(db)
    with db.connect() as conn:
        context = MigrationContext.configure(conn, opts={"target_metadata": Base.metadata})
        with pytest.raises(kf.ConfigurationError, match="kms-field tenants encrypt plain_notes"):
            Operations(context).encrypt_column("plain_notes", "body", key="pii")  # type: ignore[attr-defined]
    assert stored(db) == before  # nothing written

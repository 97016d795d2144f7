"""A data key per tenant (issue 13): chosen per row, created on first use, never movable.

Every write path supplies the row's tenant or fails loudly; a value moved to another tenant's
row (or its header edited to name another tenant) does not decrypt; the header keeps a census
per tenant possible by SQL alone; concurrent first writes of one new tenant from several
processes end with exactly one key.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import tenants
from tests.helpers import MASTER_KEY_B64, configure_local, reset_global_registry

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(sa.String(40))
    email: Mapped[str | None] = mapped_column(
        kf.EncryptedString(320, key="pii", tenant="tenant_id"), nullable=True
    )
    born: Mapped[object | None] = mapped_column(
        kf.Encrypted(sa.Date(), key="pii", tenant="tenant_id"), nullable=True
    )


accounts = Account.__table__


@pytest.fixture
def db(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    reset_global_registry(monkeypatch)
    monkeypatch.setattr(tenants, "_keyring", None)
    configure_local(engine)
    kf.create_tenant_table()
    Base.metadata.create_all(engine)
    yield engine


def stored(engine: sa.Engine, row_id: int, column: str = "email") -> str:
    with engine.connect() as conn:
        value: str = conn.execute(
            sa.text(f"SELECT {column} FROM accounts WHERE id = :i"), {"i": row_id}
        ).scalar_one()
    return value


def read_all(engine: sa.Engine) -> dict[int, str | None]:
    with Session(engine) as session:
        return {a.id: a.email for a in session.scalars(sa.select(Account).order_by(Account.id))}


def test_the_type_renders_its_tenant_and_sizes_for_tenant_key_names() -> None:
    typ = kf.EncryptedString(320, key="pii", tenant="tenant_id", bind_to=("id",))
    assert repr(typ) == "EncryptedString(320, key='pii', tenant='tenant_id', bind_to=('id',))"
    assert typ.bind_to == ("tenant_id", "id")
    assert typ.length == 320
    plain = kf.EncryptedString(320, key="pii")
    assert typ.impl.length > plain.impl.length  # a 63-character key name fits every header
    with pytest.raises(kf.ConfigurationError, match="at most 28 characters"):
        kf.EncryptedString(320, key="a" * 29, tenant="tenant_id")
    with pytest.raises(kf.ConfigurationError, match="tenant"):
        kf.EncryptedBytes(key="pii", tenant="tenant_id")


def test_tenant_key_names() -> None:
    assert tenants.tenant_key_name("pii", "42") == "pii.t.42"
    uuid = "0b8e4c4e-6a3f-4a55-9c2e-2f0c3b1d6e7a"
    assert tenants.tenant_key_name("pii", uuid) == f"pii.t.{uuid}"
    # Case, dots, spaces, or too long: a hash, so that names never collide or break the header.
    hashed = {tenants.tenant_key_name("pii", t) for t in ("Acme", "acme ", "a.b", "x" * 60)}
    assert len(hashed) == 4 and all(n.startswith("pii.h.") and len(n) == 38 for n in hashed)
    assert tenants.tenant_key_name("pii", "Acme") != tenants.tenant_key_name("pii", "acme")


def test_a_data_or_index_key_cannot_take_a_tenant_keys_name(db: sa.Engine) -> None:
    """A data key named 'pii.t.42' would write tenant 42's header: every census, status and
    retire scan would count its values as the tenant's (and erasing the tenant as its)."""
    for name in ("pii.t.42", "pii.h.0123", "a.t.b"):
        with pytest.raises(kf.ConfigurationError, match="tenant keys") as raised:
            kf.create_data_key(name)
        assert name in str(raised.value)
        with pytest.raises(kf.ConfigurationError, match="tenant keys"):
            kf.create_index_key(name)
    kf.create_data_key("pii.tax")  # '.t' not followed by '.': an ordinary name
    assert not kf.get_registry().key_store.versions("pii.t.42")


def test_every_write_path_encrypts_under_the_rows_tenant(db: sa.Engine) -> None:
    import datetime as dt

    with Session(db) as session:  # ORM unit of work: insert, then update
        session.add(Account(id=1, tenant_id="42", email="a@x.test", born=dt.date(1990, 1, 2)))
        session.commit()
        session.get(Account, 1).email = "a2@x.test"  # type: ignore[union-attr]
        session.commit()
        session.execute(  # ORM bulk insert and bulk update by primary key
            sa.insert(Account),
            [
                {"id": 2, "tenant_id": "43", "email": "b@x.test"},
                {"id": 3, "tenant_id": "42", "email": "c@x.test"},
            ],
        )
        session.execute(sa.update(Account), [{"id": 2, "tenant_id": "43", "email": "b2@x.test"}])
        session.commit()
    if db.dialect.name == "sqlite":  # a new tenant's key cannot be created while the
        kf.ensure_tenant_key("pii", 45)  # transaction below holds SQLite's write lock
    with db.begin() as conn:  # Core: one row, executemany, .values(), update by tenant
        conn.execute(accounts.insert(), {"id": 4, "tenant_id": "44", "email": "d@x.test"})
        conn.execute(
            accounts.insert(),
            [
                {"id": 5, "tenant_id": "44", "email": "e@x.test"},
                {"id": 6, "tenant_id": "45", "email": "f@x.test"},
            ],
        )
        conn.execute(accounts.insert().values(id=7, tenant_id="45", email="g@x.test"))
        conn.execute(
            accounts.update()
            .where(accounts.c.id == 7, accounts.c.tenant_id == "45")
            .values(email="g2@x.test")
        )
    assert read_all(db) == {
        1: "a2@x.test",
        2: "b2@x.test",
        3: "c@x.test",
        4: "d@x.test",
        5: "e@x.test",
        6: "f@x.test",
        7: "g2@x.test",
    }
    tenant_of = {1: "42", 2: "43", 3: "42", 4: "44", 5: "44", 6: "45", 7: "45"}
    for row_id, tenant in tenant_of.items():
        assert stored(db, row_id).startswith(f"kf2:pii.t.{tenant}:1:")
    assert stored(db, 1, "born").startswith("kf2:pii.t.42:1:")
    # The census per tenant, by SQL alone.
    with db.connect() as conn:
        per_tenant = dict(
            conn.execute(
                sa.text(
                    "SELECT substr(email, 1, 13), count(*) FROM accounts "
                    "GROUP BY substr(email, 1, 13)"
                )
            ).all()
        )
    assert per_tenant == {
        "kf2:pii.t.42:": 2,
        "kf2:pii.t.43:": 1,
        "kf2:pii.t.44:": 2,
        "kf2:pii.t.45:": 2,
    }
    # One key per tenant, each wrapped by the intermediate key pii v1 (a kf2 value under it).
    keys = tenants.get_keyring().versions("pii")
    assert [(k.key_name, k.version, k.wrapped_by) for k in keys] == [
        (f"pii.t.{t}", 1, 1) for t in ("42", "43", "44", "45")
    ]


def test_writes_that_cannot_name_the_tenant_fail_loudly(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(accounts.insert(), {"id": 1, "tenant_id": "42", "email": "a@x.test"})
    with db.begin() as conn, pytest.raises(kf.EncryptionError, match="tenant_id"):
        conn.execute(accounts.update().where(accounts.c.id == 1).values(email="new@x.test"))
    with db.begin() as conn, pytest.raises(kf.EncryptionError, match="tenant_id"):
        conn.execute(accounts.insert(), {"id": 2, "email": "a@x.test"})
    with db.begin() as conn, pytest.raises(kf.EncryptionError, match="multi-row"):
        conn.execute(
            accounts.insert().values(
                [
                    {"id": 3, "tenant_id": "42", "email": "x"},
                    {"id": 4, "tenant_id": "42", "email": "y"},
                ]
            )
        )
    # An upsert's SET cannot know the row's tenant: refused, never written unbound.
    dialect = db.dialect.name
    ins: object
    if dialect == "postgresql":
        ins = postgresql.insert(accounts).values(id=1, tenant_id="42", email="up@x.test")
        stmt = ins.on_conflict_do_update(index_elements=["id"], set_={"email": "up@x.test"})
    elif dialect == "sqlite":
        ins = sqlite.insert(accounts).values(id=1, tenant_id="42", email="up@x.test")
        stmt = ins.on_conflict_do_update(index_elements=["id"], set_={"email": "up@x.test"})
    else:
        ins = mysql.insert(accounts).values(id=1, tenant_id="42", email="up@x.test")
        stmt = ins.on_duplicate_key_update(email="up@x.test")
    with db.begin() as conn, pytest.raises(kf.EncryptionError):
        conn.execute(stmt)
    assert read_all(db) == {1: "a@x.test"}


@pytest.mark.databases("sqlite")
def test_sqlite_says_how_to_create_a_tenant_key_inside_a_transaction(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(accounts.insert(), {"id": 1, "tenant_id": "42", "email": "a@x.test"})
        with pytest.raises(kf.ConfigurationError, match="ensure_tenant_key"):
            conn.execute(accounts.insert(), {"id": 2, "tenant_id": "43", "email": "b@x.test"})


def test_a_value_moved_to_another_tenants_row_does_not_decrypt(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(
            accounts.insert(),
            [
                {"id": 1, "tenant_id": "42", "email": "victim@x.test"},
                {"id": 2, "tenant_id": "43", "email": "attacker@x.test"},
            ],
        )
    victim = stored(db, 1)
    with db.begin() as conn:  # copy tenant 42's value into tenant 43's row
        conn.execute(sa.text("UPDATE accounts SET email = :v WHERE id = 2"), {"v": victim})
    with Session(db) as session, pytest.raises(kf.DecryptionError, match="between tenants"):
        session.get(Account, 2)
    # Edit the header too, so that it names tenant 43's key: the AAD (header and the row's
    # tenant) no longer matches, and authentication fails.
    forged = victim.replace("kf2:pii.t.42:", "kf2:pii.t.43:", 1)
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE accounts SET email = :v WHERE id = 2"), {"v": forged})
    with Session(db) as session, pytest.raises(kf.DecryptionError, match="authentication") as e:
        session.get(Account, 2)
    assert "victim" not in str(e.value)
    # Or move the row to the other tenant (change its tenant_id): unreadable as well.
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE accounts SET tenant_id = '43' WHERE id = 1"))
    with Session(db) as session, pytest.raises(kf.DecryptionError):
        session.get(Account, 1)


def test_concurrent_first_writes_of_one_tenant_make_one_key(
    db: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    processes, rows = 4, 5
    start_at = time.time() + 3.0
    env = {"KMS_FIELD_LOCAL_MASTER_KEY": MASTER_KEY_B64, "PATH": "/usr/bin:/bin"}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests/scripts/tenant_writer.py"),
                db_url,
                str(i),
                str(rows),
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            text=True,
        )
        for i in range(processes)
    ]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        reports.append(json.loads(out))
    keys = tenants.get_keyring().versions("pii", "acme")
    assert [(k.key_name, k.version) for k in keys] == [("pii.t.acme", 1)]
    # Each process that lost the race used the winner's key: every row reads back.
    assert sum(r["created"] for r in reports) == 1
    values = read_all(db)
    assert len(values) == processes * rows
    expected = {i * 1000 + j: f"{i}-{j}@acme.test" for i in range(processes) for j in range(rows)}
    assert values == expected


def test_tenant_ids_that_differ_in_case_or_hold_any_text_get_keys_of_their_own(
    db: sa.Engine,
) -> None:
    names = ["Acme Corp", "acme corp", "ACME-corp", "été.ß/x"]
    for i, tenant in enumerate(names, 1):
        kf.ensure_tenant_key("pii", tenant)
        with db.begin() as conn:
            conn.execute(accounts.insert(), {"id": i, "tenant_id": tenant, "email": f"{i}@x.test"})
    assert read_all(db) == {i: f"{i}@x.test" for i in range(1, len(names) + 1)}
    headers = {stored(db, i).split(":")[1] for i in range(1, len(names) + 1)}
    assert len(headers) == len(names)  # four keys, none shared on a case-blind collation
    assert all(h.startswith("pii.h.") for h in headers)
    assert {v.tenant for v in tenants.get_keyring().versions("pii")} == set(names)


def test_no_tenant_key_or_plaintext_in_errors_reprs_or_logs(
    db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from tests.helpers import secret_spellings

    caplog.set_level(logging.DEBUG)
    secret = "victim-secret@x.test"
    kf.ensure_tenant_key("pii", 43)  # (SQLite: not inside the transaction below)
    with db.begin() as conn:
        conn.execute(accounts.insert(), {"id": 1, "tenant_id": "42", "email": secret})
        conn.execute(accounts.insert(), {"id": 2, "tenant_id": "43", "email": "other@x.test"})
    keyring = tenants.get_keyring()
    [row] = keyring._rows("pii.t.42")
    raw = keyring._unwrap("pii", "pii.t.42", 1, row.wrapped_key)
    texts = [repr(keyring), repr(keyring._cache), repr(keyring.versions("pii"))]
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE accounts SET email = :v WHERE id = 2"), {"v": stored(db, 1)})
    with Session(db) as session, pytest.raises(kf.DecryptionError) as moved:
        session.get(Account, 2)
    texts.append(str(moved.value))
    from sqlalchemy_kms_field.tenant_erasure import erase_tenant

    erase_tenant("pii", 42, confirm=True, skip_grace_period=True)
    with Session(db) as session, pytest.raises(kf.DecryptionError) as erased:
        session.get(Account, 1)
    texts += [str(erased.value), repr(erased.value.__cause__), caplog.text]
    text = "\n".join(texts)
    assert secret not in text
    for spelling in secret_spellings(raw):
        assert spelling not in text


@pytest.mark.parametrize("operation", ["reencrypt", "decrypt", "encrypt"])
def test_a_column_job_on_a_tenant_column_is_refused_naming_tenants_rotate(
    db: sa.Engine, operation: str
) -> None:
    """The column jobs know one data key per column; on a tenant column they must refuse up
    front, naming the tenant commands, and leave every value as it was."""
    with Session(db) as session:
        session.add_all(
            Account(id=i, tenant_id=str(40 + i % 3), email=f"u{i}@x.test") for i in range(1, 10)
        )
        session.commit()
    before = {i: stored(db, i) for i in range(1, 10)}
    job = {
        "reencrypt": kf.reencrypt_column,
        "decrypt": kf.decrypt_column,
        "encrypt": kf.encrypt_column,
    }[operation]
    with pytest.raises(kf.KmsFieldError, match="tenant") as raised:
        job(db, "accounts", "email", key="pii")  # type: ignore[operator]
    assert "kms-field tenants rotate pii --all" in str(raised.value)
    from sqlalchemy_kms_field.cli.wording import for_cli

    assert "Python" not in for_cli(str(raised.value))
    assert {i: stored(db, i) for i in range(1, 10)} == before
    assert read_all(db) == {i: f"u{i}@x.test" for i in range(1, 10)}

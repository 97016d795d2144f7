"""Erasing a tenant reaches its blind-index values (issue 13, points 4 and 5).

The index key is shared by every tenant, so an erased tenant's index values stayed a test of a
guess: whoever held the index key could still confirm that ann@example.com was a member of
tenant 42 after its keys were destroyed. Given the models, the erasure now counts those values
in its census and sets them to NULL just before the keys go; index values of other tenants,
and of columns not under the tenant's keys, stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import tenants
from sqlalchemy_kms_field.census import ColumnRef
from sqlalchemy_kms_field.tenant_erasure import IndexValues, erase_tenant
from tests.helpers import configure_local, reset_tenants
from tests.test_cli import Cli, clean_environment

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "erased_members"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[int]
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii", tenant="tenant_id"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key="email-index", normalizer="email", tenant="tenant_id")
    )
    # Under a key shared by every tenant: readable after the erasure, its index stays.
    phone: Mapped[str | None] = mapped_column(kf.EncryptedString(40, key="phones"))
    phone_index: Mapped[str | None] = mapped_column(kf.BlindIndex("phone", key="phone-index"))


members: sa.Table = Member.__table__  # type: ignore[assignment]


@pytest.fixture
def db(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    reset_tenants(monkeypatch)
    configure_local(engine, names=("pii", "phones"), active_ttl=0.5)
    kf.create_index_key("email-index")
    kf.create_index_key("phone-index")
    kf.create_tenant_table()
    Base.metadata.create_all(engine)
    for tenant in (42, 43):
        kf.ensure_tenant_key("pii", tenant)  # (SQLite: keys made outside the transactions)
    with engine.begin() as conn:
        conn.execute(
            members.insert(),
            [{"id": tenant * 10 + i, "tenant_id": tenant, "email": f"ann{i}@example.com",
              "phone": f"+4930{tenant}{i}"} for tenant in (42, 43) for i in range(2)],
        )  # fmt: skip
    yield engine


def find(engine: sa.Engine, email: str, tenant: int) -> list[int]:
    """What the holder of the index key can ask: which rows of ``tenant`` match a guess."""
    with Session(engine) as session:
        query = sa.select(Member.id).where(kf.tenant_match(Member.email, email, tenant=tenant))
        return sorted(session.scalars(query))


def raw(engine: sa.Engine, column: str) -> dict[int, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT id, {column} FROM erased_members ORDER BY id"))
        return {int(i): v for i, v in rows}


def test_the_erasure_sets_the_tenants_index_values_to_null(db: sa.Engine) -> None:
    census = erase_tenant("pii", 42, metadata=Base.metadata)  # counts, changes nothing
    assert census.indexes == [
        IndexValues(ColumnRef("erased_members", "email_index", "email-index"), "email", 2)
    ]
    assert find(db, "ann0@example.com", 42) == [420]

    # Retired: restorable, so the index values stay (restore needs nothing recomputed).
    erase_tenant("pii", 42, confirm=True, metadata=Base.metadata)
    assert find(db, "ann0@example.com", 42) == [420]

    phones_before = raw(db, "phone_index")
    done = erase_tenant("pii", 42, confirm=True, skip_grace_period=True, metadata=Base.metadata)
    assert done.stage == "destroyed" and done.indexes_cleared == 2
    index = raw(db, "email_index")
    assert index[420] is None and index[421] is None
    assert index[430] is not None and index[431] is not None
    assert find(db, "ann0@example.com", 42) == []  # the guess is no longer confirmed
    assert find(db, "ann0@example.com", 43) == [430]
    assert raw(db, "phone_index") == phones_before  # not under the tenant's keys
    with Session(db) as session:
        phone = session.scalar(sa.select(Member.phone).where(Member.id == 420))
    assert phone == "+4930420"


def test_a_tenant_erased_without_the_models_is_cleared_by_a_second_run(db: sa.Engine) -> None:
    erase_tenant("pii", 43, confirm=True, skip_grace_period=True)  # no metadata
    assert find(db, "ann1@example.com", 43) == [431]  # what was left behind
    again = erase_tenant("pii", 43, metadata=Base.metadata)  # the census says so
    assert again.stage == "destroyed" and [i.rows for i in again.indexes] == [2]
    assert raw(db, "email_index")[431] is not None  # (no confirm: nothing changed)
    cleared = erase_tenant("pii", 43, confirm=True, metadata=Base.metadata)
    assert cleared.indexes_cleared == 2
    assert find(db, "ann1@example.com", 43) == []
    assert find(db, "ann1@example.com", 42) == [421]


@pytest.mark.databases("postgresql", "mariadb")  # (SQLite cannot add NOT NULL to a column)
def test_an_index_that_cannot_be_null_stops_the_erasure_before_the_keys_go(
    db: sa.Engine,
) -> None:
    with db.begin() as conn:
        if db.dialect.name == "postgresql":
            conn.execute(
                sa.text("ALTER TABLE erased_members ALTER COLUMN email_index SET NOT NULL")
            )
        elif db.dialect.name == "mysql":
            conn.execute(
                sa.text("ALTER TABLE erased_members MODIFY email_index VARCHAR(255) NOT NULL")
            )
    with pytest.raises(kf.ConfigurationError, match=r"NOT NULL.*nothing was destroyed"):
        erase_tenant("pii", 42, confirm=True, skip_grace_period=True, metadata=Base.metadata)
    assert [v.state for v in tenants.get_keyring().versions("pii", "42")] == ["retired"]
    assert raw(db, "email_index")[420] is not None


def test_the_command_counts_and_clears_them_with_models(
    db: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    env = {**clean_environment(), "KMS_FIELD_DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    cli = Cli(tmp_path, env)
    without = cli("tenants", "erase", "pii", "42", code=1).stdout
    assert "are not looked for: set KMS_FIELD_MODELS" in without
    cli.env["KMS_FIELD_MODELS"] = "tests.test_tenant_erasure_indexes:Base"
    census = cli("tenants", "erase", "pii", "42", code=1).stdout
    assert (
        "erased_members.email_index: 2 blind-index values (from email) will be set to NULL"
        in census
    )
    done = cli("tenants", "erase", "pii", "42", "--yes-erase", "--skip-grace-period").stdout
    assert "2 blind-index values set to NULL" in done
    assert find(db, "ann0@example.com", 42) == []
    assert find(db, "ann0@example.com", 43) == [430]

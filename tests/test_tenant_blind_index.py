"""Blind indexes per tenant (issue 13, point 5): lookups scoped to a tenant, index values of one
email under two tenants differ, uniqueness per tenant with a composite constraint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field.reencrypt import reindex_column
from sqlalchemy_kms_field.tenant_erasure import erase_tenant
from tests.helpers import configure_local, reset_tenants


class Base(DeclarativeBase):
    pass


class Member(Base):
    __tablename__ = "members"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "email_index"),)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant_id: Mapped[int]
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii", tenant="tenant_id"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key="email-index", normalizer="email", tenant="tenant_id")
    )


members = Member.__table__


@pytest.fixture
def db(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    reset_tenants(monkeypatch)
    configure_local(engine)
    kf.create_index_key("email-index")
    kf.create_tenant_table()
    Base.metadata.create_all(engine)
    for tenant in (42, 43):
        kf.ensure_tenant_key("pii", tenant)  # (SQLite: keys made outside the transactions)
    yield engine


def index_of(engine: sa.Engine, row_id: int) -> str:
    with engine.connect() as conn:
        value: str = conn.execute(
            sa.text("SELECT email_index FROM members WHERE id = :i"), {"i": row_id}
        ).scalar_one()
    return value


def find(engine: sa.Engine, email: str, tenant: int) -> list[int]:
    with Session(engine) as session:
        query = sa.select(Member.id).where(kf.tenant_match(Member.email, email, tenant=tenant))
        return sorted(session.scalars(query))


def test_index_values_differ_per_tenant_and_lookups_stay_in_theirs(db: sa.Engine) -> None:
    with Session(db) as session:
        session.add_all([
            Member(id=1, tenant_id=42, email="ann@example.com"),
            Member(id=2, tenant_id=43, email="ann@example.com"),
        ])  # fmt: skip
        session.commit()
    assert index_of(db, 1) != index_of(db, 2)
    assert index_of(db, 1).startswith("kf2:email-index:1:")
    assert find(db, "Ann@Example.COM ", 42) == [1]
    assert find(db, "ann@example.com", 43) == [2]
    assert find(db, "ann@example.com", 44) == []
    with Session(db) as session, pytest.raises(kf.UnsupportedOperationError, match="tenant_match"):
        session.scalars(sa.select(Member).where(Member.email == "ann@example.com")).all()
    # An index value copied into another tenant's row matches nothing there.
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE members SET email_index = :v WHERE id = 2"), {"v": index_of(db, 1)}
        )
    assert find(db, "ann@example.com", 43) == []


def test_uniqueness_is_per_tenant(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(
            members.insert(),
            [{"id": 1, "tenant_id": 42, "email": "bob@example.com"},
             {"id": 2, "tenant_id": 43, "email": "BOB@example.com"}],
        )  # fmt: skip
    with db.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(members.insert(), {"id": 3, "tenant_id": 42, "email": "Bob@Example.com"})
    assert find(db, "bob@example.com", 42) == [1]


def test_every_write_keeps_the_index_with_the_tenant(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(members.insert().values(id=1, tenant_id=42, email="c@example.com"))
        conn.execute(members.insert(), {"id": 2, "tenant_id": 43, "email": "d@example.com"})
        conn.execute(
            members.update()
            .where(members.c.id == 2, members.c.tenant_id == 43)
            .values(email="e@example.com")
        )
    with Session(db) as session:  # the ORM's UPDATE carries the tenant for the index too
        member = session.get(Member, 1)
        assert member is not None
        member.email = "f@example.com"
        session.commit()
    assert find(db, "f@example.com", 42) == [1] and find(db, "c@example.com", 42) == []
    assert find(db, "e@example.com", 43) == [2] and find(db, "d@example.com", 43) == []
    with db.begin() as conn, pytest.raises(kf.EncryptionError, match="tenant_id"):
        conn.execute(members.update().where(members.c.id == 2).values(email="g@example.com"))
    assert find(db, "e@example.com", 43) == [2]
    with pytest.raises(kf.EncryptionError, match="tenant"):
        members.c.email_index.type.compute("x@example.com")  # type: ignore[attr-defined]


def test_a_tenant_scoped_index_is_reindexed_after_its_key_rotates(db: sa.Engine) -> None:
    """Reindex refused tenant-scoped indexes (and any index whose source is bound to its row),
    so their index key could be rotated but never left behind. It now reads each row's tenant:
    every value moves to the new version, still scoped to its tenant, and lookups find them."""
    with db.begin() as conn:
        conn.execute(
            members.insert(),
            [{"id": tenant * 10 + i, "tenant_id": tenant, "email": f"user{i}@example.com"}
             for tenant in (42, 43) for i in range(3)],
        )  # fmt: skip
    kf.rotate_index_key("email-index")
    before = {row_id: index_of(db, row_id) for row_id in (420, 430)}
    assert all(v.startswith("kf2:email-index:1:") for v in before.values())

    result = reindex_column(db, members.c.email_index, batch_size=2, wait_for_processes=False)
    assert result.finished and result.rows_written == 6 and not result.skipped
    with db.connect() as conn:
        values = conn.execute(sa.text("SELECT id, email_index FROM members")).all()
    assert len(values) == 6 and all(v.startswith("kf2:email-index:2:") for _, v in values)
    assert index_of(db, 420) != index_of(db, 430)  # same email, two tenants: still apart
    for tenant in (42, 43):
        for i in range(3):
            assert find(db, f"USER{i}@example.com", tenant) == [tenant * 10 + i]


def test_rows_of_an_erased_tenant_stop_a_reindex_unless_skipped(db: sa.Engine) -> None:
    with db.begin() as conn:
        conn.execute(
            members.insert(),
            [{"id": tenant * 10 + i, "tenant_id": tenant, "email": f"user{i}@example.com"}
             for tenant in (42, 43) for i in range(2)],
        )  # fmt: skip
    erase_tenant("pii", 43, confirm=True, skip_grace_period=True, metadata=Base.metadata)
    kf.rotate_index_key("email-index")
    with pytest.raises(kf.ReencryptionError, match="tenant '43' of data key 'pii' was erased"):
        reindex_column(db, members.c.email_index, wait_for_processes=False)
    result = reindex_column(
        db, members.c.email_index, wait_for_processes=False, skip_undecryptable=True
    )
    assert result.finished and sorted(result.skipped) == [430, 431]
    assert index_of(db, 420).startswith("kf2:email-index:2:")
    assert find(db, "user1@example.com", 42) == [421]

"""A value belongs to its place (issue 8): an attacker who can write the database but holds no key
cannot move a ciphertext to another table, column, type or (with bind_to) row; and no error,
chained exception or log line carries a plaintext."""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope
from tests.helpers import configure_local, error_texts, raw_values, reset_global_registry


class Status(enum.Enum):
    SINGLE = 1
    MARRIED = 2
    DIVORCED = 3


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    is_admin: Mapped[bool | None] = mapped_column(
        kf.Encrypted(sa.Boolean(), key="pii", bind_to=("id",))
    )
    logins: Mapped[int | None] = mapped_column(kf.Encrypted(sa.Integer(), key="pii"))
    display_name: Mapped[str | None] = mapped_column(kf.EncryptedString(200, key="pii"))
    ssn: Mapped[str | None] = mapped_column(kf.EncryptedString(20, key="pii"))
    status: Mapped[Status | None] = mapped_column(kf.Encrypted(sa.Enum(Status), key="pii"))


class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None] = mapped_column(kf.EncryptedString(200, key="pii"))


# The same stored column, declared again under another table name: an explicit context keeps a
# renamed table readable.
renamed = sa.Table(
    "accounts_renamed_view",
    sa.MetaData(),
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("display_name", kf.EncryptedString(200, key="pii", context="accounts.display_name")),
)

ALICE, BOB = uuid.UUID(int=1), uuid.UUID(int=2)


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[kf.KeyRegistry]:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(
            [
                Account(id=ALICE, is_admin=True, logins=7, display_name="Alice", ssn="078-05-1120"),
                Account(id=BOB, is_admin=False, logins=1, display_name="Bob", ssn="219-09-9999"),
                Contact(id=1, note="met at the fair"),
            ]
        )
        session.commit()
    yield registry


def _raw(engine: sa.Engine, table: str, column: str, where: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT {column} FROM {table} WHERE {where}")).scalar_one()


def _set_raw(engine: sa.Engine, table: str, column: str, where: str, value: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {table} SET {column} = :v WHERE {where}"), {"v": value})


def _account(engine: sa.Engine, account_id: uuid.UUID) -> Account:
    with Session(engine) as session:
        account = session.get(Account, account_id)
        assert account is not None
        session.expunge(account)
        return account


def _id(engine: sa.Engine, account_id: uuid.UUID) -> str:
    """A WHERE clause for the account, in the form each database stores a Uuid."""
    stored = sa.Uuid().bind_processor(engine.dialect)
    value = stored(account_id) if stored else account_id
    return f"id = '{value}'"


# Moving values ----------------------------------------------------------------------------------


def test_a_value_moved_to_another_column_of_the_row_does_not_decrypt(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """The review made Bob's display_name read his SSN: the attacker then views their profile."""
    bob = _id(engine, BOB)
    _set_raw(engine, "accounts", "display_name", bob, _raw(engine, "accounts", "ssn", bob))
    with pytest.raises(kf.DecryptionError, match=r"accounts\.display_name.*authentication failed"):
        _account(engine, BOB)


def test_a_value_moved_to_another_table_does_not_decrypt(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    name = _raw(engine, "accounts", "display_name", _id(engine, ALICE))
    _set_raw(engine, "contacts", "note", "id = 1", name)
    with Session(engine) as session, pytest.raises(kf.DecryptionError, match=r"contacts\.note"):
        session.get(Contact, 1)


def test_a_boolean_never_reads_as_an_integer(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    """Same key, same table: only the codec tells is_admin and logins apart."""
    alice = _id(engine, ALICE)
    _set_raw(engine, "accounts", "logins", alice, _raw(engine, "accounts", "is_admin", alice))
    with pytest.raises(kf.DecryptionError, match=r"accounts\.logins"):
        _account(engine, ALICE)


def test_a_row_bound_value_moved_to_another_row_does_not_decrypt(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """The review made Bob an admin by copying Alice's is_admin ciphertext into his row."""
    assert _account(engine, BOB).is_admin is False
    admin = _raw(engine, "accounts", "is_admin", _id(engine, ALICE))
    _set_raw(engine, "accounts", "is_admin", _id(engine, BOB), admin)
    with pytest.raises(kf.DecryptionError, match=r"accounts\.is_admin.*authentication failed"):
        _account(engine, BOB)
    assert _account(engine, ALICE).is_admin is True  # the original still reads


def test_changing_the_bound_column_makes_the_value_unreadable(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """Moving the row instead (rewriting its id) is the same attack from the other side."""
    with engine.begin() as conn:
        conn.execute(sa.update(Account.__table__).where(Account.id == BOB).values(id=uuid.uuid4()))
        conn.execute(sa.update(Account.__table__).where(Account.id == ALICE).values(id=BOB))
    with pytest.raises(kf.DecryptionError, match=r"accounts\.is_admin"):
        _account(engine, BOB)


def test_an_explicit_context_keeps_a_renamed_table_readable(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    renamed.create(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO accounts_renamed_view (id, display_name) "
                "SELECT id, display_name FROM accounts"
            )
        )
        names = conn.execute(sa.select(renamed.c.display_name)).scalars().all()
    assert sorted(names) == ["Alice", "Bob"]


# Every write path carries the row ----------------------------------------------------------------


def test_every_write_path_binds_the_row(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    t = Account.__table__
    ids = [uuid.uuid4() for _ in range(6)]
    with engine.begin() as conn:
        conn.execute(t.insert().values(id=ids[0], is_admin=True))  # Core .values()
        conn.execute(t.insert(), {"id": ids[1], "is_admin": True})  # Core single
        conn.execute(
            t.insert(), [{"id": ids[2], "is_admin": True}, {"id": ids[3], "is_admin": True}]
        )
        conn.execute(t.update().where(t.c.id == ids[3]).values(is_admin=False))  # Core UPDATE
    with Session(engine) as session:
        session.execute(sa.insert(Account), [{"id": ids[4], "is_admin": True}])  # ORM bulk
        session.add(Account(id=ids[5], is_admin=True))
        session.commit()
        session.bulk_update_mappings(Account, [{"id": ids[5], "is_admin": False}])  # type: ignore[arg-type]
        session.commit()
        fresh = Account(is_admin=True)  # the id comes from default=uuid.uuid4
        session.add(fresh)
        session.commit()
        fresh_id = fresh.id
        bob = session.get(Account, BOB)
        assert bob is not None
        bob.is_admin = True  # ORM UPDATE: only is_admin changes; the row is found by its id
        session.commit()
    expected = {ids[0]: True, ids[1]: True, ids[2]: True, ids[3]: False, ids[4]: True}
    expected |= {ids[5]: False, fresh_id: True, BOB: True, ALICE: True}
    with Session(engine) as session:
        got = {a.id: a.is_admin for a in session.scalars(sa.select(Account))}
    assert got == expected
    for value in raw_values(engine, "accounts", "is_admin"):
        assert value.startswith("kf2:pii:1:")


def test_a_write_that_cannot_supply_the_row_fails_loudly(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    t = Account.__table__
    before = raw_values(engine, "accounts", "is_admin")
    with engine.begin() as conn, pytest.raises(kf.EncryptionError, match=r"bound to accounts\.id"):
        conn.execute(t.update().where(t.c.id.in_([BOB])).values(is_admin=False))
    with engine.begin() as conn, pytest.raises(kf.EncryptionError, match="WHERE id = "):
        conn.execute(t.update().values(is_admin=False))
    assert raw_values(engine, "accounts", "is_admin") == before


@pytest.mark.databases("sqlite", "postgresql")
def test_an_upsert_of_a_row_bound_column_fails_loudly(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(Account.__table__).values(id=ALICE, is_admin=False)
    stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={"is_admin": True})
    with engine.begin() as conn, pytest.raises(kf.EncryptionError, match="row-binding hook"):
        conn.execute(stmt)
    assert _account(engine, ALICE).is_admin is True


@pytest.mark.databases("mariadb")
def test_an_upsert_of_a_row_bound_column_fails_loudly_on_mariadb(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    stmt = mysql_insert(Account.__table__).values(id=ALICE, is_admin=False)
    stmt = stmt.on_duplicate_key_update(is_admin=True)
    with engine.begin() as conn, pytest.raises(kf.EncryptionError, match="row-binding hook"):
        conn.execute(stmt)
    assert _account(engine, ALICE).is_admin is True


@pytest.mark.databases("sqlite")
def test_binding_to_an_autoincrement_key_is_refused(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    t = sa.Table(
        "numbered",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("secret", kf.EncryptedString(50, key="pii", bind_to=("id",))),
    )
    t.create(engine)
    with engine.begin() as conn, pytest.raises(kf.ConfigurationError, match="autoincrement"):
        conn.execute(t.insert(), {"id": 1, "secret": "x"})


@pytest.mark.databases("sqlite")
def test_a_type_that_cannot_know_its_column_refuses(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.connect() as conn, pytest.raises(kf.ConfigurationError, match="context="):
        conn.execute(sa.select(sa.literal("x", kf.EncryptedString(key="pii"))))
    shared = kf.EncryptedString(20, key="pii")
    sa.Table("one", sa.MetaData(), sa.Column("a", shared))
    with pytest.raises(kf.ConfigurationError, match="a type instance of its own"):
        sa.Table("two", sa.MetaData(), sa.Column("b", shared))


# No plaintext in any error ---------------------------------------------------------------------


SECRET = "victim-ssn-123-45-6789"


def _assert_absent(exc: BaseException, caplog: pytest.LogCaptureFixture, *plain: str) -> None:
    texts = [*error_texts(exc), *(r.getMessage() for r in caplog.records)]
    for text in texts:
        for p in plain:
            assert p not in text, text[:300]


@pytest.mark.parametrize(
    "values",
    [
        {"display_name": 12345, "ssn": SECRET},  # wrong type in another column
        {"display_name": "x" * 500, "ssn": SECRET},  # too long
        {"display_name": SECRET, "logins": "seven"},
    ],
    ids=["type", "length", "codec"],
)
def test_a_failed_bind_shows_no_parameter(
    engine: sa.Engine,
    registry: kf.KeyRegistry,
    caplog: pytest.LogCaptureFixture,
    values: dict[str, Any],
) -> None:
    """With SQLAlchemy's default hide_parameters=False and echo on, a StatementError would list
    every parameter in clear; the library's error reaches the caller unwrapped instead."""
    loud = sa.create_engine(engine.url, echo=True)
    caplog.set_level(logging.DEBUG)
    try:
        with loud.begin() as conn, pytest.raises(kf.EncryptionError) as info:
            conn.execute(Account.__table__.insert(), {"id": uuid.uuid4(), **values})
    finally:
        loud.dispose()
    _assert_absent(info.value, caplog, SECRET, "x" * 40)


def test_an_unconfigured_library_shows_no_parameter(
    engine: sa.Engine,
    registry: kf.KeyRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reset_global_registry(monkeypatch)
    caplog.set_level(logging.DEBUG)
    with engine.begin() as conn, pytest.raises(kf.ConfigurationError) as info:
        conn.execute(Contact.__table__.insert(), {"id": 9, "note": SECRET})
    _assert_absent(info.value, caplog, SECRET)


def _seal_raw(registry: kf.KeyRegistry, table: str, column: str, codec: str, data: bytes) -> str:
    """A value that authenticates for ``table.column`` but holds ``data`` (only a key holder
    can make one: this is the library misbehaving, or a bug, never an attacker)."""
    key = registry.data_key("pii", 1)
    return key.encrypt_text(data, envelope.encode_context(table, column, codec))


@pytest.mark.parametrize(
    ("column", "codec", "data"),
    [
        ("display_name", "str", b"\xff" + SECRET.encode()),  # not UTF-8
        ("logins", "int", SECRET.encode()),
        ("status", "enum", SECRET.encode()),
    ],
)
def test_a_value_that_authenticates_but_does_not_decode_shows_nothing(
    engine: sa.Engine,
    registry: kf.KeyRegistry,
    caplog: pytest.LogCaptureFixture,
    column: str,
    codec: str,
    data: bytes,
) -> None:
    caplog.set_level(logging.DEBUG)
    _set_raw(
        engine,
        "accounts",
        column,
        _id(engine, ALICE),
        _seal_raw(registry, "accounts", column, codec, data),
    )
    with pytest.raises(
        kf.DecryptionError, match=f"authenticated but is not a valid {codec}"
    ) as info:
        _account(engine, ALICE)
    assert info.value.__cause__ is None and info.value.__context__ is None
    _assert_absent(info.value, caplog, SECRET)


@pytest.mark.databases("sqlite")
def test_a_non_string_in_a_text_column_is_a_decryption_error(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.begin() as conn:  # SQLite keeps a BLOB as a BLOB, even in a TEXT column
        conn.execute(sa.text("UPDATE contacts SET note = X'6b66323a' WHERE id = 1"))
    with Session(engine) as session, pytest.raises(kf.DecryptionError, match="holds a bytes"):
        session.get(Contact, 1)


@pytest.mark.parametrize("damage", ["upper", "space", "digit"])
def test_accept_plaintext_refuses_a_damaged_header(
    engine: sa.Engine, registry: kf.KeyRegistry, damage: str
) -> None:
    t = sa.Table(
        "migrating_notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", kf.EncryptedString(200, key="pii", accept_plaintext=True)),
    )
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1, "note": "written encrypted"}])
        conn.execute(sa.text("INSERT INTO migrating_notes VALUES (2, 'still plaintext')"))
    stored = raw_values(engine, "migrating_notes", "note")[0]
    damaged = {"upper": "KF2" + stored[3:], "space": " " + stored, "digit": "kf3" + stored[3:]}
    _set_raw(engine, "migrating_notes", "note", "id = 1", damaged[damage])
    with engine.connect() as conn:
        assert conn.execute(sa.select(t.c.note).where(t.c.id == 2)).scalar_one() == (
            "still plaintext"
        )
        with pytest.raises(kf.DecryptionError, match="not returned as plaintext"):
            conn.execute(sa.select(t.c.note).where(t.c.id == 1)).scalar_one()


# Lengths -----------------------------------------------------------------------------------------


def test_enum_members_are_stored_at_one_length(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    """The review told single (56), married (57) and divorced (58) apart by length alone."""
    with Session(engine) as session:
        for status, account_id in zip(Status, (ALICE, BOB, uuid.uuid4()), strict=True):
            account = session.get(Account, account_id) or Account(id=account_id)
            account.status = status
            session.add(account)
        session.commit()
    lengths = {len(v) for v in raw_values(engine, "accounts", "status")}
    assert len(lengths) == 1, lengths
    with Session(engine) as session:
        assert {a.status for a in session.scalars(sa.select(Account))} == set(Status)

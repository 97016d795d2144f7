"""A read that fails in the application names the table and column, and what to do; never the
value. Through the ORM and Core, with the fast result path and the general one."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from tests.helpers import configure_local, reset_global_registry

PLAINTEXT = "zq7x.secret@example.com"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="pii"))


@pytest.fixture
def users(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> sa.Engine:
    reset_global_registry(monkeypatch)
    configure_local(engine, names=("pii", "other"))
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([User(id=1, email=PLAINTEXT), User(id=2, email="bob@example.com")])
        session.commit()
    return engine


def stored(engine: sa.Engine, row: int) -> str:
    with engine.connect() as conn:
        value: str = conn.execute(
            sa.text("SELECT email FROM users WHERE id = :id"), {"id": row}
        ).scalar_one()
    return value


def overwrite(engine: sa.Engine, row: int, value: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET email = :v WHERE id = :id"), {"v": value, "id": row})


def read_errors(engine: sa.Engine) -> list[str]:
    """The error of reading row 1 through the ORM and through Core, as text."""
    messages = []
    with Session(engine) as session:
        with pytest.raises(kf.DecryptionError) as raised:
            session.get(User, 1)
        messages.append(str(raised.value))
    with engine.connect() as conn:
        with pytest.raises(kf.DecryptionError) as raised:
            conn.execute(sa.select(User.__table__.c.email).where(User.__table__.c.id == 1)).all()
        messages.append(str(raised.value))
    for message in messages:
        assert PLAINTEXT not in message and "zq7x" not in message
    return messages


@pytest.mark.databases("sqlite", "postgresql")
def test_plaintext_left_by_a_type_change_names_the_column_and_the_fix(users: sa.Engine) -> None:
    overwrite(users, 1, PLAINTEXT)  # as a bare alter_column from String(320) leaves it
    for message in read_errors(users):
        assert message.startswith("users.email: "), message
        assert "op.encrypt_column('users', 'email', key='pii')" in message, message
        assert "kms-field encrypt-column users.email --key pii" in message, message
        assert "accept_plaintext=True" in message


@pytest.mark.databases("sqlite", "postgresql")
def test_a_tampered_value_names_the_column_and_the_key_version(users: sa.Engine) -> None:
    value = stored(users, 1)
    overwrite(users, 1, value[:-6] + ("AAAAAA" if not value.endswith("AAAAAA") else "BBBBBB"))
    for message in read_errors(users):
        assert message.startswith("users.email: "), message
        assert "'pii' version 1" in message, message


@pytest.mark.databases("sqlite", "postgresql")
def test_a_value_moved_in_from_another_key_names_the_column(users: sa.Engine) -> None:
    # Encrypted for this very place, under the other key: only the key name is wrong.
    place = kf.EncryptedString(320, key="other", context="users.email").context_bytes()
    planted = kf.get_registry().active_key("other").encrypt_text(b"someone else", place, 0)
    overwrite(users, 1, planted)
    for message in read_errors(users):
        assert message.startswith("users.email: "), message
        assert "'other'" in message and "'pii'" in message, message

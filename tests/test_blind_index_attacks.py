"""The security review's blind-index findings, each reproduced on every database by someone
who can write the database but holds no key, and now refused.

* Two columns under one index key held identical index values (users and contacts linked row
  by row); a truncated index was a prefix of the full one.
* An index value copied to another column or table matched there.
* Index values of older releases (``kf1``, context-free) keep being found until a reindex
  replaces them, and keep counting for uniqueness, so an upgrade loses no lookup.
* The derivation is pinned by a known-answer test computed here independently.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import lifecycle
from sqlalchemy_kms_field import registry as kf_registry
from sqlalchemy_kms_field.reencrypt import reindex_column
from tests.helpers import (
    assert_no_secret,
    configure_local,
    error_texts,
    reset_global_registry,
    unwrapped_key,
)

KEY = "people-index"
ADMIN = "admin@corp.example"


class Base(DeclarativeBase):
    pass


class Account(Base):
    """Two indexed emails in one table, under one index key and one normalizer."""

    __tablename__ = "atk_accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key=KEY, normalizer="email"), unique=True
    )
    recovery: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    recovery_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("recovery", key=KEY, normalizer="email")
    )


class Contact(Base):
    """Another table, the same index key and normalizer as Account.email."""

    __tablename__ = "atk_contacts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key=KEY, normalizer="email")
    )


class Digest(Base):
    """Account.email's context, truncated to 128 bits: only the bits differ."""

    __tablename__ = "atk_digests"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key=KEY, normalizer="email", bits=128, context="atk_accounts.email")
    )


EMAILS = {1: ADMIN, 2: "bob@corp.example", 3: "carol@corp.example"}


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> kf.KeyRegistry:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine, active_ttl=1)
    registry.create_index_key(KEY)
    Base.metadata.create_all(engine)
    return registry


def fill(engine: sa.Engine) -> None:
    with Session(engine) as session:
        for i, email in EMAILS.items():
            session.add(Account(id=i, email=email, recovery=email))
            session.add(Contact(id=i, email=email))
            session.add(Digest(id=i, email=email))
        session.commit()


def sql(engine: sa.Engine, text: str, **params: Any) -> list[Any]:
    with engine.begin() as conn:
        result = conn.execute(sa.text(text), params)
        return list(result) if result.returns_rows else []


def ids(engine: sa.Engine, criterion: Any, entity: Any = Account) -> set[int]:
    with Session(engine) as session:
        return set(session.scalars(sa.select(entity.id).where(criterion)))


def index_key_bytes(registry: kf.KeyRegistry, version: int = 1) -> bytes:
    stored = registry.key_store.get(KEY, version)
    context = kf_registry.key_context(KEY, version, "index")
    return registry.master_key.unwrap(stored.wrapped_key, context, stored.master_key_id)


def secrets(registry: kf.KeyRegistry) -> list[bytes]:
    return [index_key_bytes(registry), unwrapped_key(registry, "pii", 1)]


# Linking rows across columns ------------------------------------------------------------------


def test_two_columns_under_one_index_key_share_no_value(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """The attacker joins on index values: before, every account matched its contact (and its
    own recovery address); now no pair of columns has a value in common."""
    fill(engine)
    pairs = [
        ("atk_accounts a JOIN atk_contacts c", "a.email_index = c.email_index"),
        ("atk_accounts a JOIN atk_accounts c", "a.email_index = c.recovery_index"),
        ("atk_accounts a JOIN atk_digests c", "a.email_index = c.email_index"),
    ]
    for tables, on in pairs:
        assert sql(engine, f"SELECT a.id FROM {tables} ON {on}") == [], on
    # Nor is the 128-bit index a prefix of the 256-bit one of the same context.
    header = len(f"kf2:{KEY}:1:")
    prefixed = sql(
        engine,
        "SELECT a.id FROM atk_accounts a JOIN atk_digests d ON "
        "SUBSTR(a.email_index, 1, LENGTH(d.email_index)) = d.email_index",
    )
    assert prefixed == []
    shorts = {r[0]: r[1] for r in sql(engine, "SELECT id, email_index FROM atk_digests")}
    fulls = {r[0]: r[1] for r in sql(engine, "SELECT id, email_index FROM atk_accounts")}
    for i in EMAILS:
        assert not fulls[i][header:].startswith(shorts[i][header:][:-1])  # base64 tail bits
    # Each column still finds its own rows.
    for i, email in EMAILS.items():
        assert ids(engine, Account.email == email.upper()) == {i}
        assert ids(engine, Account.recovery == email) == {i}
        assert ids(engine, Contact.email == email, Contact) == {i}
        with Session(engine) as session:
            assert [d.id for d in kf.find(session, Digest.email, email)] == [i]


def test_an_index_value_copied_to_another_column_or_table_matches_nothing(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """The attacker copies the admin's index value (with the ciphertext, as they would) from
    one place to another and asks for a password reset of the admin there: nothing is found,
    where before the copy answered for the admin."""
    fill(engine)
    admin_index = sql(engine, "SELECT email_index FROM atk_accounts WHERE id = 1")[0][0]
    sql(engine, "UPDATE atk_contacts SET email_index = :v WHERE id = 2", v=admin_index)
    sql(engine, "UPDATE atk_accounts SET recovery_index = :v WHERE id = 2", v=admin_index)
    assert ids(engine, Contact.email == ADMIN, Contact) == {1}  # its own admin row only
    assert ids(engine, Account.recovery == ADMIN) == {1}
    assert ids(engine, Account.email == ADMIN) == {1}
    # And the other way: a contact's value planted in the accounts' unique column.
    contact_index = sql(engine, "SELECT email_index FROM atk_contacts WHERE id = 3")[0][0]
    sql(engine, "UPDATE atk_accounts SET email_index = :v WHERE id = 2", v=contact_index)
    assert ids(engine, Account.email == EMAILS[3]) == {3}


# The derivation ---------------------------------------------------------------------------------


def expected_value(key: bytes, version: int, fields: list[str], data: bytes, nbytes: int) -> str:
    """The kf2 index value as README documents it, computed without the library."""
    info = b"sqlalchemy-kms-field blind index" + b"".join(
        len(f.encode()).to_bytes(4, "big") + f.encode() for f in fields
    )
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)
    mac = hmac.new(derived, data, hashlib.sha256).digest()[:nbytes]
    return f"kf2:{KEY}:{version}:" + b64url(mac)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def test_index_values_are_derived_as_documented(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill(engine)
    key = index_key_bytes(registry)
    stored = {
        "accounts": sql(engine, "SELECT email_index FROM atk_accounts WHERE id = 1")[0][0],
        "recovery": sql(engine, "SELECT recovery_index FROM atk_accounts WHERE id = 1")[0][0],
        "digests": sql(engine, "SELECT email_index FROM atk_digests WHERE id = 1")[0][0],
    }
    data = ADMIN.encode()
    assert stored == {
        "accounts": expected_value(
            key, 1, ["atk_accounts", "email", "builtin:email", "256"], data, 32
        ),
        "recovery": expected_value(
            key, 1, ["atk_accounts", "recovery", "builtin:email", "256"], data, 32
        ),
        "digests": expected_value(
            key, 1, ["atk_accounts", "email", "builtin:email", "128"], data, 16
        ),
    }
    # Length prefixes: moving a character from one field to the next changes the key.
    index_key = registry.index_keys(KEY)[0]
    assert index_key.info(("ab", "c")) != index_key.info(("a", "bc"))
    assert index_key.compute(data, 32, ("ab", "c")) != index_key.compute(data, 32, ("a", "bc"))
    # The kf1 value of older releases: HMAC-SHA256 under the index key itself.
    legacy = hmac.new(key, data, hashlib.sha256).digest()
    assert index_key.compute_legacy(data, 32) == f"kf1:{KEY}:1:" + b64url(legacy)
    for text in (repr(index_key), repr(Account.__table__.c.email_index.type)):
        assert_no_secret(text, secrets(registry))


# Values of older releases ------------------------------------------------------------------------


def downgrade_to_kf1(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    """Rewrite atk_accounts.email_index as an older release stored it (kf1, no context)."""
    index_key = registry.index_keys(KEY)[0]
    for i, email in EMAILS.items():
        value = index_key.compute_legacy(email.encode(), 32)
        sql(engine, "UPDATE atk_accounts SET email_index = :v WHERE id = :i", v=value, i=i)


def count_format(engine: sa.Engine, fmt: str) -> int:
    rows = sql(engine, "SELECT email_index FROM atk_accounts")
    return sum(1 for (v,) in rows if v is not None and v.startswith(f"{fmt}:{KEY}:1:"))


def test_kf1_values_are_found_until_reindexed_and_count_for_uniqueness(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    fill(engine)
    downgrade_to_kf1(engine, registry)
    assert count_format(engine, "kf1") == 3
    # The upgraded application starts: a new engine, which has not looked at the column yet.
    upgraded = sa.create_engine(engine.url.render_as_string(hide_password=False))
    try:
        after_the_upgrade(upgraded, registry)
    finally:
        upgraded.dispose()


def after_the_upgrade(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    # An upgrade loses no lookup.
    for i, email in EMAILS.items():
        assert ids(engine, Account.email == f" {email.upper()}") == {i}
    assert ids(engine, Account.email.in_(list(EMAILS.values()))) == set(EMAILS)
    # The unique constraint compares stored values: the same email in kf2 would pass it.
    with pytest.raises(sa.exc.IntegrityError) as caught, Session(engine) as session:
        session.add(Account(id=9, email=ADMIN.upper()))
        session.commit()
    for text in error_texts(caught.value):
        assert ADMIN not in text.lower()
        assert_no_secret(text, secrets(registry))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(Account.__table__.insert().values(id=9, email=EMAILS[2]))
    # The row itself may be rewritten with its own email (an upsert of the same row).
    with Session(engine) as session:
        session.get_one(Account, 3).email = EMAILS[3].upper()
        session.commit()
    # A reindex (no rotation needed) moves the kf1 values: they are pending.
    result = reindex_column(engine, Account.__table__.c.email_index, batch_size=2)
    assert result.finished and result.rows_written == 2
    assert (count_format(engine, "kf1"), count_format(engine, "kf2")) == (0, 3)
    for i, email in EMAILS.items():
        assert ids(engine, Account.email == email) == {i}
    # Retiring index-key version 1 is refused while kf2 values use it (the census sees them).
    kf.rotate_index_key(KEY)
    with pytest.raises(kf.KeyStateError, match=r"atk_accounts\.email_index: 3 rows"):
        lifecycle.retire_data_key(KEY, 1, metadata=Base.metadata)


def test_a_blind_index_that_cannot_know_its_table_refuses(registry: kf.KeyRegistry) -> None:
    loose = kf.BlindIndex("email", key=KEY, normalizer="email")
    with pytest.raises(kf.ConfigurationError, match=r"context='table\.column'"):
        loose.compute(ADMIN)
    assert loose.compute(ADMIN, table="atk_accounts") == (
        Account.__table__.c.email_index.type.compute(ADMIN)  # type: ignore[attr-defined]
    )
    shared = kf.BlindIndex("email", key=KEY)
    metadata = sa.MetaData()
    for name in ("atk_one", "atk_two"):
        sa.Table(name, metadata, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("email", kf.EncryptedString(50, key="pii")),
                 sa.Column("email_index", shared))  # fmt: skip
    with pytest.raises(kf.ConfigurationError, match=r"\['atk_one', 'atk_two'\]"):
        shared.compute(ADMIN)
    assert shared.compute(ADMIN, table="atk_one") != shared.compute(ADMIN, table="atk_two")
    for bad in ("", "users", "a.b.c", ".email", ("users",), ("users", ""), 5):
        with pytest.raises(kf.ConfigurationError, match="context"):
            kf.BlindIndex("email", key=KEY, context=bad)  # type: ignore[arg-type]
    # A tuple for names with dots; the same place either way.
    dotted = kf.BlindIndex("email", key=KEY, context=("my.accounts", "email"))
    assert dotted.context_fields()[:2] == ("my.accounts", "email")
    plain = kf.BlindIndex("email", key=KEY, context="atk_accounts.email")
    assert plain.compute(ADMIN) == shared.compute(ADMIN, table="atk_accounts")


def test_an_explicit_context_keeps_lookups_working_across_a_rename(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """Renaming atk_contacts: the same rows under the new name are found once the model
    declares the old context, and not without it."""
    fill(engine)
    sql(engine, "CREATE TABLE atk_people AS SELECT * FROM atk_contacts")

    def people(context: str | None) -> sa.Table:
        return sa.Table(
            "atk_people",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("email", kf.EncryptedString(320, key="pii")),
            sa.Column(
                "email_index",
                kf.BlindIndex("email", key=KEY, normalizer="email", context=context),
            ),
        )

    def found(table: sa.Table, email: str) -> set[int]:
        with engine.connect() as conn:
            return set(conn.scalars(sa.select(table.c.id).where(table.c.email == email)))

    assert found(people(None), ADMIN) == set()  # bound to atk_contacts, not atk_people
    renamed = people("atk_contacts.email")
    assert found(renamed, ADMIN) == {1}
    with engine.begin() as conn:
        conn.execute(renamed.insert().values(id=7, email="dave@corp.example"))
    assert found(renamed, "DAVE@corp.example") == {7}

"""Blind indexes on every database: lookups through the ORM and Core, every way of writing that
must fill the index (and the ways that must refuse), uniqueness, the query plan, truncated
indexes with ``find()``, and index keys that never leak nor mix with data keys.

Rotation of data keys and index keys, reindexing (also killed and resumed) and retiring index
keys are in test_blind_index_rotation.py, which reuses the model and helpers of this module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

import sqlalchemy_kms_field as kf
import sqlalchemy_kms_field.alembic_ops  # registers op.encrypt_column & co
from sqlalchemy_kms_field import registry as kf_registry
from sqlalchemy_kms_field.blind_index import BlindIndex
from sqlalchemy_kms_field.reencrypt import encrypt_column
from tests.helpers import (
    MASTER_KEY_BYTES,
    assert_no_secret,
    configure_local,
    error_texts,
    raises_kf,
    reset_global_registry,
)
from tests.kms_server import KmsServer

INDEX_KEY = "email-index"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bidx_users"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(sa.String(50))
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key=INDEX_KEY, normalizer="email"), unique=True
    )
    note: Mapped[str | None] = mapped_column(kf.EncryptedString(100, key="pii"))  # no index


class Contact(Base):
    """A 16-bit index: about one value in 65,536 shares an index value with another."""

    __tablename__ = "bidx_contacts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key=INDEX_KEY, normalizer="email", bits=16)
    )


USERS = User.__table__
INDEX: BlindIndex = USERS.c.email_index.type  # type: ignore[assignment]

# Every pair normalizes to distinct values; 3 is full-width (NFKC), 4 has no email.
START: dict[int, str | None] = {
    1: "ann@example.com ",
    2: "Bob@Example.org",
    3: "\uff46\uff55\uff4c\uff4c@example.com",  # full-width "full"
    4: None,
    5: "émile@exämple.fr",
}
NEW: dict[int, str | None] = {1: "Ann.New@example.com", 2: "bob.new@example.org", 3: None}


def shout(email: str) -> str:
    """Another spelling of ``email`` that the "email" normalizer maps to the same value."""
    return f"  {email.upper()} "


# Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> kf.KeyRegistry:
    """Data key "pii" and index key "email-index" under a local master key; no tables yet."""
    reset_global_registry(monkeypatch)
    # A short active_ttl: a reindex waits that long after an index-key rotation.
    registry = configure_local(engine, active_ttl=1)
    registry.create_index_key(INDEX_KEY)
    return registry


@pytest.fixture
def tables(engine: sa.Engine, registry: kf.KeyRegistry) -> kf.KeyRegistry:
    Base.metadata.create_all(engine)
    return registry


# Helpers shared with test_blind_index_rotation.py -----------------------------------------------


def all_secrets(registry: kf.KeyRegistry) -> list[bytes]:
    """The master key and every data and index key the key store holds, unwrapped."""
    found = [MASTER_KEY_BYTES]
    for stored in registry.key_store.versions():
        if stored.wrapped_key:
            context = kf_registry.key_context(stored.name, stored.version, stored.kind)
            found.append(
                registry.master_key.unwrap(stored.wrapped_key, context, stored.master_key_id)
            )
    return found


def assert_clean(exc: BaseException, registry: kf.KeyRegistry) -> None:
    """No key (nor half of one) in the message, repr or cause chain of ``exc``."""
    secrets = all_secrets(registry)
    for text in error_texts(exc):
        assert_no_secret(text, secrets)


def insert_users(engine: sa.Engine, rows: dict[int, str | None]) -> None:
    with engine.begin() as conn:
        conn.execute(USERS.insert(), [{"id": i, "email": e} for i, e in rows.items()])


def raw_indexes(engine: sa.Engine, table: str = "bidx_users") -> dict[int, str | None]:
    """``id -> email_index`` exactly as stored (no type processing)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT id, email_index FROM {table}")).all()
    return {r[0]: r[1] for r in rows}


def count_prefix(engine: sa.Engine, prefix: str, table: str = "bidx_users") -> int:
    """Rows whose index value starts with ``prefix``, by SQL alone."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(f"SELECT COUNT(*) FROM {table} WHERE SUBSTR(email_index, 1, :n) = :prefix"),
                {"n": len(prefix), "prefix": prefix},
            ).scalar_one()
        )


def orm_ids(engine: sa.Engine, criterion: Any) -> set[int]:
    with Session(engine) as session:
        return set(session.scalars(sa.select(User.id).where(criterion)))


def core_ids(engine: sa.Engine, criterion: Any) -> set[int]:
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(USERS.c.id).where(criterion)))


def assert_every_row_found(engine: sa.Engine, expected: dict[int, str | None]) -> None:
    """Each row with an email is found by it (spelled differently), alone, via ORM and Core;
    one IN over every email finds them all at once."""
    emails = {i: e for i, e in expected.items() if e is not None}
    for i, email in emails.items():
        assert orm_ids(engine, User.email == shout(email)) == {i}, email
        assert core_ids(engine, USERS.c.email == email) == {i}, email
    assert orm_ids(engine, User.email.in_([shout(e) for e in emails.values()])) == set(emails)


def assert_indexed(engine: sa.Engine, expected: dict[int, str | None]) -> None:
    """The table holds exactly ``expected``, each index value is the index of its email under
    the active index key (NULL for no email), and every row is found by its email."""
    with Session(engine) as session:
        stored = {i: e for i, e in session.execute(sa.select(User.id, User.email))}
    assert stored == expected
    want = {i: INDEX.compute(e) for i, e in expected.items()}
    assert raw_indexes(engine) == want
    active = kf.get_registry().index_keys(INDEX_KEY)[0].header
    assert all(v is None or v.startswith(active) for v in want.values())
    assert_every_row_found(engine, expected)


# Lookups ----------------------------------------------------------------------------------------


def test_orm_lookups_find_rows_by_normalized_email(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    with Session(engine) as session:
        ann = session.scalars(sa.select(User).where(User.email == "Ann@Example.com")).one()
        assert (ann.id, ann.email) == (1, "ann@example.com ")
        assert session.scalars(sa.select(User).filter_by(email=" ANN@example.COM")).one() is ann
        assert session.query(User).filter(User.email == "ann@EXAMPLE.com").one() is ann
    assert orm_ids(engine, User.email == "full@example.com") == {3}  # NFKC of full-width
    assert orm_ids(engine, User.email == "ÉMILE@EXÄMPLE.FR") == {5}
    assert orm_ids(engine, User.email == "nobody@example.com") == set()
    assert orm_ids(engine, User.email.in_(["ANN@EXAMPLE.COM", "bob@example.org ", "x@y.z"])) == {
        1,
        2,
    }
    assert orm_ids(engine, User.email.in_(("full@example.com",))) == {3}
    assert orm_ids(engine, User.email.in_([])) == set()
    other = aliased(User)
    with Session(engine) as session:
        found = session.scalars(sa.select(other.id).where(other.email == "BOB@example.org"))
        assert set(found) == {2}
    assert_every_row_found(engine, START)


def test_core_lookups_find_rows_by_normalized_email(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    assert core_ids(engine, USERS.c.email == "Ann@Example.com") == {1}
    assert core_ids(engine, USERS.c.email.in_(["bob@example.org", "FULL@example.com"])) == {2, 3}
    users = USERS.alias("u")
    with engine.connect() as conn:
        found = conn.execute(sa.select(users.c.id).where(users.c.email == "émile@exämple.fr"))
        assert [r.id for r in found] == [5]
        row = conn.execute(sa.select(USERS).where(USERS.c.email == "Ann@Example.com")).one()
        assert row.email == "ann@example.com "


def test_not_equal_and_not_in_exclude_the_matching_rows(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    with_email = {i for i, e in START.items() if e is not None}
    assert orm_ids(engine, User.email != "ANN@example.com") == with_email - {1}
    assert orm_ids(engine, ~(User.email == "ann@example.com")) == with_email - {1}
    assert orm_ids(engine, User.email.not_in(["ann@example.com", "BOB@example.org"])) == {3, 5}
    assert core_ids(engine, USERS.c.email != "full@example.com") == with_email - {3}
    assert core_ids(engine, USERS.c.email.not_in(["émile@exämple.fr"])) == with_email - {5}
    # NULL checks stay what they are.
    assert orm_ids(engine, User.email.is_(None)) == {4}
    assert orm_ids(engine, User.email == None) == {4}  # noqa: E711
    assert orm_ids(engine, User.email != None) == with_email  # noqa: E711


REFUSED: dict[str, Callable[[], Any]] = {
    "like": lambda: User.email.like("ann%"),
    "ilike": lambda: User.email.ilike("ann%"),
    "startswith": lambda: User.email.startswith("ann"),
    "contains": lambda: User.email.contains("@"),
    "lt": lambda: User.email < "b",
    "gt": lambda: User.email > "b",
    "ge": lambda: User.email >= "b",
    "between": lambda: User.email.between("a", "b"),
    "core-like": lambda: USERS.c.email.like("ann%"),
    "core-lt": lambda: USERS.c.email < "b",
    "core-gt": lambda: USERS.c.email > "b",
    "eq-bindparam": lambda: User.email == sa.bindparam("e"),
    "in-subquery": lambda: User.email.in_(sa.select(User.name)),
    "eq-column": lambda: User.email == USERS.c.name,
    "eq-orm-attribute": lambda: User.email == User.name,
    "in-orm-attribute": lambda: User.email.in_([User.name]),
    "eq-aliased-attribute": lambda: User.email == aliased(User).email,
    "eq-without-index": lambda: User.note == "x",
}


def run_cases(
    cases: dict[str, Callable[[], None]], between: Callable[[], None] | None = None
) -> None:
    """Run every case, then fail once listing each case that failed (one bug hides no other)."""
    failed = []
    for name, case in cases.items():
        try:
            case()
        except Exception as exc:
            failed.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        if between is not None:
            between()
    assert not failed, f"{len(failed)} of {len(cases)} cases failed:\n" + "\n".join(failed)


def test_what_the_index_cannot_answer_is_refused(engine: sa.Engine, tables: kf.KeyRegistry) -> None:
    """LIKE, ordering, and comparisons with SQL expressions mean nothing on ciphertext, and a
    blind index only answers equality with Python values: all raise, none builds a query."""

    def refused(make: Callable[[], Any]) -> Callable[[], None]:
        def case() -> None:
            try:
                criterion = make()
            except kf.UnsupportedOperationError as exc:
                assert "email" in str(exc) or "note" in str(exc), str(exc)
                assert_clean(exc, tables)
                return
            raise AssertionError(f"built {criterion} instead of refusing")

        return case

    run_cases({name: refused(make) for name, make in REFUSED.items()})


# Writes fill the index --------------------------------------------------------------------------


def _orm_add(engine: sa.Engine) -> dict[int, str | None]:
    with Session(engine) as session:
        session.add_all([User(id=i, email=e) for i, e in START.items()])
        session.commit()
    return START


def _orm_attribute_update(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    with Session(engine) as session:
        for i, email in NEW.items():
            session.get_one(User, i).email = email
        session.commit()
    return {**START, **NEW}


def _orm_bulk_update(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    with Session(engine) as session:
        session.execute(sa.update(User), [{"id": i, "email": e} for i, e in NEW.items()])
        session.commit()
    return {**START, **NEW}


def _orm_bulk_insert(engine: sa.Engine) -> dict[int, str | None]:
    with Session(engine) as session:
        session.execute(sa.insert(User), [{"id": i, "email": e} for i, e in START.items()])
        session.commit()
    return START


def _orm_update_where_values(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    with Session(engine) as session:
        loaded = session.get_one(User, 1)  # synchronized by the default "auto" strategy
        session.execute(sa.update(User).where(User.id == 1).values(email=NEW[1]))
        assert loaded.email == NEW[1]
        session.commit()
    return {**START, 1: NEW[1]}


def _orm_update_where_values_unsynchronized(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    with Session(engine) as session:
        for i, email in NEW.items():
            stmt = sa.update(User).where(User.id == i).values(email=email)
            session.execute(stmt.execution_options(synchronize_session=False))
        session.commit()
    return {**START, **NEW}


def _core_insert_params(engine: sa.Engine) -> dict[int, str | None]:
    with engine.begin() as conn:
        for i, email in START.items():
            conn.execute(USERS.insert(), {"id": i, "email": email})
    return START


def _core_executemany(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    return START


def _core_insert_values(engine: sa.Engine) -> dict[int, str | None]:
    with engine.begin() as conn:
        for i, email in START.items():
            conn.execute(USERS.insert().values(id=i, email=email))
    return START


def _core_insert_bindparam(engine: sa.Engine) -> dict[int, str | None]:
    stmt = USERS.insert().values(id=sa.bindparam("n"), email=sa.bindparam("address"))
    with engine.begin() as conn:
        conn.execute(stmt, [{"n": i, "address": e} for i, e in START.items()])
    return START


def _core_update_params(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    with engine.begin() as conn:
        for i, email in NEW.items():
            conn.execute(USERS.update().where(USERS.c.id == i), {"email": email})
    return {**START, **NEW}


def _core_update_values(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    with engine.begin() as conn:
        for i, email in NEW.items():
            conn.execute(USERS.update().where(USERS.c.id == i).values(email=email))
    return {**START, **NEW}


def _core_update_bindparam(engine: sa.Engine) -> dict[int, str | None]:
    insert_users(engine, START)
    stmt = (
        USERS.update()
        .where(USERS.c.id == sa.bindparam("user_id"))
        .values(email=sa.bindparam("new_email"))
    )
    with engine.begin() as conn:
        conn.execute(stmt, [{"user_id": i, "new_email": e} for i, e in NEW.items()])
    return {**START, **NEW}


WRITES = {
    "orm-add": _orm_add,
    "orm-attribute-update": _orm_attribute_update,
    "orm-bulk-update": _orm_bulk_update,
    "orm-bulk-insert": _orm_bulk_insert,
    "orm-update-where-values": _orm_update_where_values,
    "orm-update-where-values-unsynchronized": _orm_update_where_values_unsynchronized,
    "core-insert-params": _core_insert_params,
    "core-executemany": _core_executemany,
    "core-insert-values": _core_insert_values,
    "core-insert-bindparam": _core_insert_bindparam,
    "core-update-params": _core_update_params,
    "core-update-values": _core_update_values,
    "core-update-bindparam": _core_update_bindparam,
}


def test_writes_fill_the_index(engine: sa.Engine, tables: Any) -> None:
    """Every way of writing (see WRITES), each from an empty table."""

    def check(write: Callable[[sa.Engine], dict[int, str | None]]) -> Callable[[], None]:
        return lambda: assert_indexed(engine, write(engine))

    def empty() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM bidx_users"))

    run_cases({name: check(write) for name, write in WRITES.items()}, between=empty)


def test_an_orm_entity_sees_the_index_value_the_database_holds(
    engine: sa.Engine, tables: Any
) -> None:
    """After a flush the identity map must not keep the index value of the old email: the
    application may read it, and ORM UPDATE ... WHERE email = ... may evaluate against it."""
    insert_users(engine, START)
    with Session(engine) as session:
        ann = session.get_one(User, 1)
        ann.email = NEW[1]
        session.flush()
        stored = raw_indexes_in(session)[1]
        assert stored == INDEX.compute(NEW[1])
        assert ann.email_index == stored, "the entity still holds the index of its old email"
        # The default synchronization evaluates email_index IN (...) on loaded objects.
        session.execute(sa.update(User).where(User.email == NEW[1]).values(name="renamed"))
        assert ann.name == "renamed"
        session.commit()


def raw_indexes_in(session: Session) -> dict[int, str | None]:
    rows = session.execute(sa.text("SELECT id, email_index FROM bidx_users")).all()
    return {r[0]: r[1] for r in rows}


def test_setting_the_email_to_null_clears_the_index(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    with engine.begin() as conn:
        conn.execute(USERS.update().where(USERS.c.id == 1).values(email=None))
        conn.execute(USERS.update().where(USERS.c.id == 2), {"email": None})
        conn.execute(USERS.insert().values(id=6, email=None))
    with Session(engine) as session:
        session.get_one(User, 3).email = None
        session.commit()
    assert_indexed(engine, {**START, 1: None, 2: None, 3: None, 6: None})


def test_writes_that_cannot_fill_the_index_raise(engine: sa.Engine, tables: Any) -> None:
    """A multi-row .values() and a SQL expression assigned to the email would leave a stale or
    missing index value: they raise EncryptionError, and nothing is written."""
    insert_users(engine, {1: "ann@example.com"})
    attempts: list[Any] = [
        USERS.insert().values([{"id": 7, "email": "a@x.org"}, {"id": 8, "email": "b@x.org"}]),
        USERS.update().where(USERS.c.id == 1).values(email=USERS.c.name),
        USERS.update().where(USERS.c.id == 1).values(email=sa.func.lower("X@Y.ORG")),
        USERS.update().values(email=sa.case((USERS.c.id == 1, "c@x.org"), else_="d@x.org")),
    ]
    for stmt in attempts:
        with raises_kf(kf.EncryptionError, match="email_index") as refused:
            with engine.begin() as conn:
                conn.execute(stmt)
        assert refused.value is not None
        assert_clean(refused.value, tables)
    with raises_kf(kf.EncryptionError, match="email_index") as refused, Session(engine) as session:
        session.execute(
            sa.update(User)
            .where(User.id == 1)
            .values(email=User.name)
            .execution_options(synchronize_session=False)
        )
    with raises_kf(kf.EncryptionError, match="email_index") as refused, Session(engine) as session:
        session.get_one(User, 1).email = sa.func.lower("X@Y.ORG")  # type: ignore[assignment]
        session.flush()
    assert_indexed(engine, {1: "ann@example.com"})


def test_insert_from_select_without_the_index_raises(
    engine: sa.Engine, tables: kf.KeyRegistry
) -> None:
    """INSERT ... SELECT assigns SQL to the email: the copies would have no index value, so
    nothing could find them and the unique constraint would not see them."""
    insert_users(engine, {1: "ann@example.com"})
    copy = USERS.insert().from_select(
        ["id", "email"], sa.select(USERS.c.id + 100, USERS.c.email).where(USERS.c.id == 1)
    )
    with raises_kf(kf.EncryptionError, match="email_index") as refused, engine.begin() as conn:
        conn.execute(copy)
    assert refused.value is not None
    assert_clean(refused.value, tables)
    assert_indexed(engine, {1: "ann@example.com"})


def test_a_unique_index_rejects_the_same_email_in_another_case(
    engine: sa.Engine, tables: kf.KeyRegistry
) -> None:
    with Session(engine) as session:
        session.add(User(id=1, email="ann@example.com"))
        session.commit()
        session.add(User(id=2, email=" ANN@Example.COM"))
        with pytest.raises(sa.exc.IntegrityError) as caught:
            session.commit()
        assert_clean(caught.value, tables)
        assert "ann@example.com" not in str(caught.value).lower()  # ciphertext, not the email
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(USERS.insert(), [{"id": 3, "email": "b@x.org"}, {"id": 4, "email": "B@X.ORG"}])
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(USERS.update().where(USERS.c.id == 1).values(email="ann@example.com"))
        conn.execute(USERS.insert().values(id=5, email="Ann@example.com"))
    insert_users(engine, {2: "ann2@example.com"})  # a different email is fine
    assert_indexed(engine, {1: "ann@example.com", 2: "ann2@example.com"})


def test_index_values_compare_byte_for_byte(engine: sa.Engine, tables: Any) -> None:
    """Index values are case-sensitive base64url: a lookup must not match a value that differs
    only in case (MySQL/MariaDB's default collations ignore case, as the encrypted columns'
    ascii_bin collation does not)."""
    insert_users(engine, {1: "ann@example.com"})
    stored = raw_indexes(engine)[1]
    assert stored is not None
    head, body = stored[: len("kf2:email-index:1:")], stored[len("kf2:email-index:1:") :]
    other = head + body.swapcase()
    assert other != stored
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT id FROM bidx_users WHERE email_index = :v"), {"v": other}
        ).all()
    assert found == [], f"{engine.dialect.name} matched an index value in another case"


# The query plan ---------------------------------------------------------------------------------


@pytest.mark.databases("postgresql")
def test_postgresql_looks_up_through_the_unique_index(engine: sa.Engine, tables: Any) -> None:
    rows = {i: f"user{i}@example.com" for i in range(1, 2001)}
    insert_users(engine, rows)
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE bidx_users"))
        for criterion in (
            User.email == "USER1234@example.com",
            User.email.in_(["user7@example.com", "user1999@example.com"]),
        ):
            stmt = sa.select(User.id).where(criterion)
            sql = stmt.compile(engine, compile_kwargs={"literal_binds": True})
            plan = "\n".join(conn.execute(sa.text(f"EXPLAIN {sql}")).scalars())
            assert "bidx_users_email_index_key" in plan, plan
            assert "Index Scan" in plan or "Bitmap Index Scan" in plan, plan
            assert "Seq Scan" not in plan, plan
    assert orm_ids(engine, User.email == "USER1234@example.com") == {1234}


@pytest.mark.databases("sqlite", "mariadb")
def test_sqlite_and_mariadb_look_up_through_the_index(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, {i: f"user{i}@example.com" for i in range(1, 201)})
    stmt = sa.select(User.id).where(User.email == "user42@example.com")
    sql = stmt.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = " ".join(r.detail for r in conn.execute(sa.text(f"EXPLAIN QUERY PLAN {sql}")))
            assert "USING" in plan and "INDEX" in plan, plan
        else:
            conn.execute(sa.text("ANALYZE TABLE bidx_users"))
            plan_rows = conn.execute(sa.text(f"EXPLAIN {sql}")).mappings().all()
            assert [r["key"] for r in plan_rows] == ["email_index"], plan_rows


# Truncated indexes and find() -------------------------------------------------------------------


def colliding_emails(index: BlindIndex) -> tuple[str, str]:
    """Two different emails with the same (truncated) index value under the active key."""
    seen: dict[str, str] = {}
    for n in itertools.count():
        email = f"user{n}@example.com"
        value = index.compute(email)
        assert value is not None
        if value in seen:
            return seen[value], email
        seen[value] = email
    raise AssertionError("unreachable")


def test_a_truncated_index_has_false_positives_that_find_drops(
    engine: sa.Engine, tables: Any
) -> None:
    """Through ``==`` or ``IN`` the database would see only 16 bits and return both colliding
    rows (``!=`` would drop both): they are refused, naming kf.find(), which is exact."""
    index: BlindIndex = Contact.__table__.c.email_index.type  # type: ignore[attr-defined]
    assert not index.exact and INDEX.exact
    first, second = colliding_emails(index)
    assert index.compute(first) == index.compute(second)
    with Session(engine) as session:
        session.add_all(
            [
                Contact(id=1, email=first),
                Contact(id=2, email=second),
                Contact(id=3, email="someone@example.com"),
            ]
        )
        session.commit()
        for make in (
            lambda: Contact.email == first,
            lambda: Contact.email.in_([first]),
            lambda: Contact.email != first,
            lambda: Contact.email.not_in([first]),
            lambda: Contact.__table__.c.email == first,  # type: ignore[attr-defined]
        ):
            with pytest.raises(kf.UnsupportedOperationError, match=r"kf\.find\(") as caught:
                session.scalars(sa.select(Contact).where(make())).all()
            assert "16 bits" in str(caught.value)
            assert first not in str(caught.value)
            assert_clean(caught.value, tables)
        # What == would have returned: both rows share the index value.
        raw = index.compute(first)
        both = session.scalars(sa.select(Contact.id).where(Contact.email_index == raw)).all()
        assert set(both) == {1, 2}
        assert [c.id for c in kf.find(session, Contact.email, f" {first.upper()}")] == [1]
        assert [c.id for c in kf.find(session, Contact.email, second)] == [2]
        assert kf.find(session, Contact.email, "nobody@example.com") == []
        assert kf.find(session, Contact.email, None) == []
    with Session(engine) as session:
        session.add(User(id=1, email="ann@example.com"))
        session.commit()
        assert [u.id for u in kf.find(session, User.email, "ANN@example.com")] == [1]
        other = aliased(User)
        assert [u.id for u in kf.find(session, other.email, "ANN@example.com")] == [1]
        with pytest.raises(kf.ConfigurationError, match="BlindIndex") as config_error:
            kf.find(session, User.note, "x")
        assert_clean(config_error.value, tables)


def test_blind_index_settings_are_checked() -> None:
    for bits in (0, 8, 12, 264):
        with pytest.raises(kf.ConfigurationError, match="bits"):
            kf.BlindIndex("email", key=INDEX_KEY, bits=bits)
    with pytest.raises(kf.ConfigurationError, match="unknown normalizer 'soundex'"):
        kf.BlindIndex("email", key=INDEX_KEY, normalizer="soundex")
    with pytest.raises(kf.ConfigurationError, match="invalid data key name"):
        kf.BlindIndex("email", key="no spaces")
    chained = kf.BlindIndex("email", key=INDEX_KEY, normalizer=["strip", "casefold"])
    assert chained.matches(" Straße ", "STRASSE") and not chained.matches("a", "b")
    assert kf.BlindIndex("email", key=INDEX_KEY, normalizer=str.upper).matches("a", "A")


def test_the_index_column_fits_every_index_value(engine: sa.Engine, tables: Any) -> None:
    """The column is sized for the longest header (9-digit version) plus the MAC."""
    for bits in (16, 128, 256):
        index = kf.BlindIndex("email", key=INDEX_KEY, bits=bits)
        value = index.compute("ann@example.com", table="bidx_users")
        assert value is not None and value.startswith("kf2:email-index:1:")
        longest = len("kf2:email-index:999999999:") + len(value) - len("kf2:email-index:1:")
        assert index.impl_instance.length == longest  # type: ignore[attr-defined]


# Index keys never leak ----------------------------------------------------------------------------


def test_reprs_show_names_and_versions_only(tables: kf.KeyRegistry) -> None:
    key = tables.index_keys(INDEX_KEY)[0]
    texts = {
        repr(key): "IndexKey(name='email-index', version=1)",
        repr(INDEX): "BlindIndex('email', key='email-index', normalizer='email')",
        repr(Contact.__table__.c.email_index.type): (  # type: ignore[attr-defined]
            "BlindIndex('email', key='email-index', normalizer='email', bits=16)"
        ),
    }
    for text, expected in texts.items():
        assert text == expected
    others = [
        repr(tables),
        repr(tables.key_store),
        repr(tables.key_store.versions(INDEX_KEY)),
        repr(USERS.c.email_index),
        repr(USERS),
        str(sa.schema.CreateTable(USERS)),
    ]
    for text in [*texts, *others]:
        assert_no_secret(text, all_secrets(tables))


def test_the_statement_cache_key_holds_index_values_not_keys(
    engine: sa.Engine, tables: kf.KeyRegistry
) -> None:
    insert_users(engine, START)
    first = sa.select(User).where(User.email == "ann@example.com")
    second = sa.select(User).where(User.email == "bob@example.org")
    first_key, second_key = first._generate_cache_key(), second._generate_cache_key()
    assert first_key is not None and second_key is not None
    assert first_key == second_key  # one compiled form serves every email
    text = f"{first_key!r} {first_key.key!r} {first_key.bindparams!r}"
    assert_no_secret(text, all_secrets(tables))
    assert "ann@example.com" not in text
    params = first.compile(engine).params
    values = [v for vs in params.values() for v in (vs if isinstance(vs, list) else [vs])]
    assert values == sorted(INDEX.candidates("ann@example.com"))  # kf2, and kf1 of old rows
    assert INDEX.compute("ann@example.com") in values
    assert_no_secret(repr(params), all_secrets(tables))
    # The statement really runs from that cached form with both values.
    with Session(engine) as session:
        assert session.scalars(first).one().id == 1
        assert session.scalars(second).one().id == 2


def test_autogenerate_renders_the_column_type_without_keys(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.connect() as conn:
        migrations = produce_migrations(MigrationContext.configure(conn), Base.metadata)
    code = render_python_code(migrations.upgrade_ops)  # type: ignore[arg-type]
    assert (
        "sqlalchemy_kms_field.BlindIndex('email', key='email-index', normalizer='email')" in code
    ), code
    assert (
        "sqlalchemy_kms_field.BlindIndex('email', key='email-index', normalizer='email', bits=16)"
        in code
    ), code
    assert "sqlalchemy_kms_field.EncryptedString(320, key='pii')" in code
    assert_no_secret(code, all_secrets(registry))
    compile(f"def upgrade():\n{code}", "<autogenerate>", "exec")


# Index keys and data keys do not mix ----------------------------------------------------------


def test_an_index_key_is_not_a_data_key_and_back(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    refusals: list[tuple[type[BaseException], str, Callable[[], Any]]] = [
        (kf.ConfigurationError, "'pii'.*data key", lambda: kf.create_index_key("pii")),
        (kf.ConfigurationError, "'pii'.*data key", lambda: kf.rotate_index_key("pii")),
        (kf.ConfigurationError, "'email-index'.*index key", lambda: kf.create_data_key(INDEX_KEY)),
        (kf.ConfigurationError, "'email-index'.*index key", lambda: kf.rotate_data_key(INDEX_KEY)),
        (kf.KeyStateError, "'email-index' is an index key", lambda: registry.active_key(INDEX_KEY)),
        (
            kf.KeyStateError,
            "'email-index' is an index key",
            lambda: registry.data_key(INDEX_KEY, 1),
        ),
        (kf.KeyStateError, "'pii' is a data key", lambda: registry.index_keys("pii")),
        (kf.KeyStateError, "'pii' is a data key", lambda: registry.index_key("pii", 1)),
    ]
    for expected, match, call in refusals:
        with pytest.raises(expected, match=match) as caught:
            call()
        assert_clean(caught.value, registry)
    assert [(k.name, k.version, k.state.value) for k in registry.key_store.versions()] == [
        (INDEX_KEY, 1, "active"),
        ("pii", 1, "active"),
    ]

    # Columns declared with the wrong kind of key refuse to write.
    metadata = sa.MetaData()
    confused = sa.Table(
        "bidx_confused",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("secret", kf.EncryptedString(100, key=INDEX_KEY)),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
        sa.Column("email_index", kf.BlindIndex("email", key="pii")),
    )
    metadata.create_all(engine)
    for row, match in (
        ({"id": 1, "secret": "s"}, "'email-index' is an index key"),
        ({"id": 2, "email": "ann@example.com"}, "'pii' is a data key"),
    ):
        with raises_kf(kf.KeyStateError, match=match) as refused, engine.begin() as conn:
            conn.execute(confused.insert(), row)
        assert refused.value is not None
        assert_clean(refused.value, registry)
        with pytest.raises(kf.KeyStateError, match=match):
            if "secret" in row:
                confused.c.secret.type.process_bind_param("s", engine.dialect)
            else:
                confused.c.email_index.type.compute("ann@example.com")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(confused)).scalar() == 0


def test_preload_unwraps_the_data_keys_beside_index_keys(registry: kf.KeyRegistry) -> None:
    """preload() at start-up must not trip over the index keys in the same key store."""
    loaded = kf.preload()
    assert [(k.name, k.version) for k in loaded] == [("pii", 1)]


# encrypt_column builds the index in the same pass ------------------------------------------------


def plaintext_users() -> sa.Table:
    """The same table as the application sees it before encryption: plain strings."""
    return sa.Table(
        "bidx_users",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", sa.String(2000)),
        sa.Column("email_index", sa.String(200)),
    )


@pytest.mark.parametrize("via", ["function", "alembic-op"])
def test_encrypt_column_fills_the_index_in_the_same_pass(
    engine: sa.Engine, tables: kf.KeyRegistry, via: str
) -> None:
    rows: dict[int, str | None] = {i: f"User{i}@Example.com" for i in range(1, 24)}
    rows[5] = None
    rows.update({k: v for k, v in START.items() if k != 5})
    with engine.begin() as conn:
        conn.execute(plaintext_users().insert(), [{"id": i, "email": e} for i, e in rows.items()])
    assert set(raw_indexes(engine).values()) == {None}
    if via == "function":
        result = encrypt_column(
            engine,
            "bidx_users",
            "email",
            key="pii",
            batch_size=4,
            index=INDEX,
            index_column="email_index",
        )
        assert result.finished and result.rows_written == sum(e is not None for e in rows.values())
    else:
        with engine.connect() as conn:
            Operations(MigrationContext.configure(conn)).encrypt_column(  # type: ignore[attr-defined]
                "bidx_users",
                "email",
                key="pii",
                batch_size=4,
                index=kf.BlindIndex("email", key=INDEX_KEY, normalizer="email"),
                index_column="email_index",
            )
    assert count_prefix(engine, "kf2:email-index:1:") == sum(e is not None for e in rows.values())
    assert_indexed(engine, rows)
    with engine.connect() as conn:  # one job did both columns
        jobs = conn.execute(sa.text("SELECT column_name, operation FROM kms_field_jobs")).all()
    assert [tuple(j) for j in jobs] == [("email", "encrypt")]


# Index keys under AWS KMS -------------------------------------------------------------------------


@pytest.mark.databases("sqlite")
def test_index_keys_wrapped_by_kms_unwrap_once_per_process(
    engine: sa.Engine, kms: KmsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_global_registry(monkeypatch)
    master = kf.AwsKmsMasterKey(kms.create_key("blind index test"), client=kms.client())
    registry = configure_local(engine, master_key=master)
    registry.create_index_key(INDEX_KEY)
    Base.metadata.create_all(engine)
    insert_users(engine, START)
    stored = registry.key_store.get(INDEX_KEY, 1)
    assert stored.kind == "index" and stored.master_key_id.startswith("aws-kms:")
    registry.forget()
    kms.reset_counts()
    for _ in range(5):
        assert_every_row_found(engine, START)
    assert kms.counts["Decrypt"] == 1  # the index key; no row was decrypted
    # The KMS encryption context binds the key to its purpose: as a data key it does not unwrap.
    with pytest.raises(kf.MasterKeyError) as caught:
        master.unwrap(
            stored.wrapped_key, kf_registry.data_key_context(INDEX_KEY, 1), stored.master_key_id
        )
    assert_clean(caught.value, registry)

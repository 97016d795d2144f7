"""Upserts keep the blind index in step, on every database: ``on_conflict_do_update`` on
PostgreSQL and SQLite, ``on_duplicate_key_update`` on MariaDB.

Before, the UPDATE half of an upsert that set the email left the old index value: the old
email still found the row, the new one did not, and the unique constraint guarded the wrong
value. Now the index column is set in the same UPDATE, or the upsert is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import Session

import sqlalchemy_kms_field as kf
from tests.helpers import raises_kf
from tests.test_blind_index import (
    INDEX,
    USERS,
    User,
    assert_clean,
    assert_indexed,
    insert_users,
    orm_ids,
    raw_indexes,
)
from tests.test_blind_index import registry as registry
from tests.test_blind_index import tables as _tables

tables = _tables  # the fixture, under the name the tests ask for

Sets = Callable[[Any], dict[str, Any]]  # the inserted row's columns -> what to set


def upsert(engine: sa.Engine, target: Any, values: Any, sets: Sets) -> Any:
    """INSERT ``values`` into ``target``; on a duplicate id, UPDATE what ``sets`` returns."""
    name = engine.dialect.name
    if name in ("mysql", "mariadb"):
        stmt: Any = mysql.insert(target).values(values)
        return stmt.on_duplicate_key_update(sets(stmt.inserted))
    dialect = postgresql if name == "postgresql" else sqlite
    stmt = dialect.insert(target).values(values)
    return stmt.on_conflict_do_update(index_elements=["id"], set_=sets(stmt.excluded))


def run(engine: sa.Engine, stmt: Any, params: Any = None) -> None:
    with engine.begin() as conn:
        conn.execute(stmt, params) if params is not None else conn.execute(stmt)


START = {1: "ann@example.com", 2: "bob@example.org"}


def test_an_upsert_that_sets_the_email_moves_its_index(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    stmt = upsert(
        engine,
        USERS,
        {"id": 1, "email": "Ann.New@example.com"},
        lambda row: {"email": row.email},
    )
    run(engine, stmt)
    assert orm_ids(engine, User.email == "ann@example.com") == set()  # before: {1}
    assert orm_ids(engine, User.email == "ANN.NEW@example.com") == {1}
    assert raw_indexes(engine)[1] == INDEX.compute("Ann.New@example.com")
    # The old email is free again, the new one is taken.
    insert_users(engine, {3: "ann@example.com"})
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(USERS.insert().values(id=4, email="ann.new@example.com"))
    assert_indexed(engine, {1: "Ann.New@example.com", 2: START[2], 3: "ann@example.com"})


def test_upsert_executemany_and_orm(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    rows = [
        {"id": 1, "email": "first@example.com"},
        {"id": 2, "email": None},
        {"id": 5, "email": "fifth@example.com"},
    ]
    name = engine.dialect.name
    if name in ("mysql", "mariadb"):
        base: Any = mysql.insert(USERS)
        stmt = base.on_duplicate_key_update(email=base.inserted.email)
    else:
        base = (postgresql if name == "postgresql" else sqlite).insert(USERS)
        stmt = base.on_conflict_do_update(index_elements=[USERS.c.id], set_=dict(base.excluded))
    run(engine, stmt, rows)
    expected = {1: "first@example.com", 2: None, 5: "fifth@example.com"}
    assert_indexed(engine, expected)
    # Through the ORM, with the entity's attribute as the key.
    orm = upsert(engine, User, {"id": 5, "email": "Orm@example.com"}, lambda r: {"email": r.email})
    with Session(engine) as session:
        session.execute(orm)
        session.commit()
    assert_indexed(engine, {**expected, 5: "Orm@example.com"})


def test_an_upsert_setting_a_python_value_or_null(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    # A Python value, and a wrong index value the application set by hand: ours wins.
    run(
        engine,
        upsert(
            engine,
            USERS,
            {"id": 1, "email": "ignored@example.com"},
            lambda row: {"email": "literal@example.com", "email_index": "kf2:forged"},
        ),
    )
    run(
        engine,
        upsert(engine, USERS, {"id": 2, "email": "x@example.com"}, lambda r: {"email": None}),
    )
    # An upsert that leaves the email alone leaves the index alone.
    run(engine, upsert(engine, USERS, {"id": 1, "name": "Ann"}, lambda r: {"name": r.name}))
    assert_indexed(engine, {1: "literal@example.com", 2: None})


def test_an_upsert_setting_a_sql_expression_is_refused(
    engine: sa.Engine, tables: kf.KeyRegistry
) -> None:
    insert_users(engine, START)
    attempts: list[Sets] = [
        lambda row: {"email": row.name},
        lambda row: {"email": sa.func.lower(row.email)},
        lambda row: {USERS.c.email: USERS.c.name},
    ]
    for sets in attempts:
        stmt = upsert(engine, USERS, {"id": 1, "email": "new@example.com"}, sets)
        with raises_kf(kf.EncryptionError, match="email_index") as refused:
            run(engine, stmt)
        assert refused.value is not None
        assert "excluded.email" in str(refused.value) or "inserted.email" in str(refused.value)
        assert "new@example.com" not in str(refused.value)
        assert_clean(refused.value, tables)
    assert_indexed(engine, START)


@pytest.mark.databases("postgresql")
def test_an_upsert_on_a_named_constraint(engine: sa.Engine, tables: Any) -> None:
    insert_users(engine, START)
    stmt = postgresql.insert(USERS).values(id=2, email="Bob.New@example.org")
    stmt = stmt.on_conflict_do_update(
        constraint="bidx_users_pkey",
        set_={"email": stmt.excluded.email},
        where=USERS.c.id == 2,
    )
    run(engine, stmt)
    assert_indexed(engine, {1: START[1], 2: "Bob.New@example.org"})

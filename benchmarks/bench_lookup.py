"""Lookups by an encrypted email through its blind index, against a plain indexed email column.

    python benchmarks/bench_lookup.py [--rows 1000000] [--lookups 5000] [--url URL]

On PostgreSQL (default URL from KMS_FIELD_BENCH_URL, else the local ``test`` database), in one
run: fills two tables of N users each (a plain ``VARCHAR(320)`` email with a unique index, and an
``EncryptedString(320)`` email with a unique ``BlindIndex``), then times the same random lookups
through the ORM on both (``select(User).where(User.email == value)``, one round trip each) and
prints the ratio (target: within 2x). Also the cost the index adds to inserts, measured on 20,000
ORM inserts with and without the index column, and the EXPLAIN plan of an encrypted lookup.
Creates and drops only its own tables (``bench_lookup_*``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf


class Base(DeclarativeBase):
    pass


class PlainUser(Base):
    __tablename__ = "bench_lookup_plain"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(320), unique=True)


class EncryptedUser(Base):
    __tablename__ = "bench_lookup_encrypted"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="bench-pii"))
    email_index: Mapped[str | None] = mapped_column(
        kf.BlindIndex("email", key="bench-email-index", normalizer="email"), unique=True
    )


class NoIndexUser(Base):  # for the insert cost of the index
    __tablename__ = "bench_lookup_noindex"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(kf.EncryptedString(320, key="bench-pii"))


def email(i: int) -> str:
    return f"user{i}@example{i % 97}.com"


Row = Callable[[int], tuple[object, ...]]


def copy_rows(engine: sa.Engine, table: str, columns: str, rows: Row, n: int) -> None:
    """Bulk load with PostgreSQL COPY (the values are computed by the library's own code)."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:  # type: ignore[attr-defined]
            for i in range(n):
                copy.write_row(rows(i))
        raw.commit()
    finally:
        raw.close()


def timed(fn: Callable[[], None], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "KMS_FIELD_BENCH_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    engine = sa.create_engine(args.url)
    if engine.dialect.name != "postgresql":
        raise SystemExit("bench_lookup runs on PostgreSQL (it loads rows with COPY)")
    store = kf.SqlKeyStore(engine, table_name="bench_lookup_keys")
    with engine.begin() as conn:
        for t in (*reversed(Base.metadata.sorted_tables), store.table):
            t.drop(conn, checkfirst=True)
    store.create_table()
    kf.configure(master_key=kf.LocalMasterKey(os.urandom(32)), key_store=store)
    data_key = kf.create_data_key("bench-pii")
    index_type = EncryptedUser.__table__.c.email_index.type
    assert isinstance(index_type, kf.BlindIndex)
    Base.metadata.create_all(engine)

    n = args.rows
    print(f"filling 2 x {n:,} rows ...", flush=True)
    start = time.perf_counter()
    copy_rows(engine, PlainUser.__tablename__, "id, email", lambda i: (i, email(i)), n)
    kf.create_index_key("bench-email-index")
    copy_rows(
        engine,
        EncryptedUser.__tablename__,
        "id, email, email_index",
        lambda i: (i, data_key.encrypt_text(email(i).encode()), index_type.compute(email(i))),
        n,
    )
    with engine.connect() as conn:
        conn.execute(sa.text(f"ANALYZE {PlainUser.__tablename__}"))
        conn.execute(sa.text(f"ANALYZE {EncryptedUser.__tablename__}"))
        conn.commit()
    print(f"  filled in {time.perf_counter() - start:.1f} s")

    rng = random.Random(7)
    wanted = [rng.randrange(n) for _ in range(args.lookups)]

    def lookups(model: type[PlainUser] | type[EncryptedUser]) -> None:
        with Session(engine) as session:
            for i in wanted:
                value = email(i).upper() if model is EncryptedUser else email(i)
                user = session.scalars(sa.select(model).where(model.email == value)).one()
                assert user.id == i
                session.expunge_all()

    plain = timed(lambda: lookups(PlainUser))
    encrypted = timed(lambda: lookups(EncryptedUser))
    per_plain, per_enc = plain / args.lookups * 1e6, encrypted / args.lookups * 1e6
    ratio = encrypted / plain

    with engine.connect() as conn:
        stmt = sa.select(EncryptedUser).where(EncryptedUser.email == email(42))
        sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
        plan = conn.execute(sa.text("EXPLAIN " + sql)).scalars().all()

    # Insert cost of the index: the same 20,000 ORM inserts with and without it.
    m = 20_000

    def inserts(model: type[EncryptedUser] | type[NoIndexUser], base: int) -> Callable[[], None]:
        def run() -> None:
            with Session(engine) as session:
                session.add_all(model(id=base + i, email=email(base + i)) for i in range(m))
                session.commit()
            with engine.begin() as conn:
                conn.execute(sa.delete(model.__table__).where(model.__table__.c.id >= base))

        return run

    with_index = statistics.median(timed(inserts(EncryptedUser, 10 * n), 1) for _ in range(3))
    without = statistics.median(timed(inserts(NoIndexUser, 10 * n), 1) for _ in range(3))

    print(f"\nlookups by email, {args.lookups:,} random rows of {n:,}, ORM, best of 3:")
    print(f"  plain VARCHAR with a unique index   {per_plain:8.1f} us/lookup")
    print(f"  EncryptedString + BlindIndex        {per_enc:8.1f} us/lookup   {ratio:.2f}x plain")
    print(f"  target: within 2x plain             {'PASS' if ratio <= 2 else 'FAIL'}")
    print(f"\ninsert cost of the index, {m:,} ORM inserts (median of 3):")
    print(f"  EncryptedString alone               {without / m * 1e6:8.1f} us/row")
    print(
        f"  EncryptedString + BlindIndex        {with_index / m * 1e6:8.1f} us/row   "
        f"+{(with_index - without) / m * 1e6:.1f} us/row"
    )
    print("\nEXPLAIN of an encrypted lookup:")
    for line in plan:
        print("  " + line)
    if not any("Index" in line for line in plan):
        raise SystemExit("the plan does not use the index")

    with engine.begin() as conn:
        for t in (*reversed(Base.metadata.sorted_tables), store.table):
            t.drop(conn, checkfirst=True)


if __name__ == "__main__":
    main()

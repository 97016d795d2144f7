"""The column types on every database: round trips (ORM and Core), the stored form, refusals."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope
from tests.helpers import (
    configure_local,
    error_texts,
    raises_kf,
    raw_values,
    reset_global_registry,
    unwrap_statement_error,
)


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


class Shape(enum.Enum):
    RED = "r"  # same name and value as Color.RED, another class


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Level(enum.IntEnum):
    ONE = 1


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "people"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    bio: Mapped[str | None] = mapped_column(kf.EncryptedText(key="pii"))
    photo: Mapped[bytes | None] = mapped_column(kf.EncryptedBytes(key="pii"))
    profile: Mapped[Any] = mapped_column(kf.EncryptedJSON(key="pii"), nullable=True)
    birthday: Mapped[dt.date | None] = mapped_column(kf.Encrypted(sa.Date(), key="pii"))
    seen_at: Mapped[dt.datetime | None] = mapped_column(
        kf.Encrypted(sa.DateTime(timezone=True), key="pii")
    )
    wakes_at: Mapped[dt.time | None] = mapped_column(kf.Encrypted(sa.Time(), key="pii"))
    logins: Mapped[int | None] = mapped_column(kf.Encrypted(sa.Integer(), key="pii"))
    balance: Mapped[decimal.Decimal | None] = mapped_column(
        kf.Encrypted(sa.Numeric(30, 10), key="pii")
    )
    verified: Mapped[bool | None] = mapped_column(kf.Encrypted(sa.Boolean(), key="pii"))
    color: Mapped[Color | None] = mapped_column(kf.Encrypted(sa.Enum(Color), key="pii"))
    priority: Mapped[Priority | None] = mapped_column(kf.Encrypted(sa.Enum(Priority), key="pii"))
    external_id: Mapped[uuid.UUID | None] = mapped_column(kf.Encrypted(sa.Uuid(), key="pii"))
    notice: Mapped[dt.timedelta | None] = mapped_column(kf.Encrypted(sa.Interval(), key="pii"))


TEXT_COLUMNS = [
    c.name for c in Person.__table__.columns if c.name not in ("id", "photo")
]  # everything but the key and the one binary column
PEOPLE: sa.Table = Person.__table__  # type: ignore[assignment]

FULL_ROW: dict[str, Any] = {
    "email": "alice@example.com",
    "bio": "Line one\nLine two\ttabbed",
    "photo": bytes(range(256)),
    "profile": {"a": [1, 2.5, None, True, {"b": "ü", "c": []}], "d": {"e": {"f": "👍"}}},
    "birthday": dt.date(1999, 12, 31),
    "seen_at": dt.datetime(
        2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))
    ),
    "wakes_at": dt.time(6, 30, 0, 1),
    "logins": 2**63 + 12345,  # larger than any SQL integer: it is text once encrypted
    "balance": decimal.Decimal("-12345678901234567890.0123456789"),
    "verified": True,
    "color": Color.GREEN,
    "priority": Priority.HIGH,
    "external_id": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    "notice": dt.timedelta(days=-3, seconds=7, microseconds=11),
}
OTHER_ROW: dict[str, Any] = {
    "email": "",
    "bio": "",
    "photo": b"",
    "profile": [],
    "birthday": dt.date(1, 1, 1),
    "seen_at": dt.datetime(2024, 3, 31, 2, 30, tzinfo=ZoneInfo("America/New_York")),
    "wakes_at": dt.time(23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
    "logins": -(2**63),
    "balance": decimal.Decimal("0.00"),
    "verified": False,
    "color": Color.RED,
    "priority": Priority.LOW,
    "external_id": uuid.uuid4(),
    "notice": dt.timedelta(0),
}

UNICODE = [
    "👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 👍🏽",  # ZWJ sequences, flags, skin tones
    "東京都渋谷区 北京市 서울특별시",  # CJK
    "مرحبا بالعالم שלום עולם",  # RTL
    "e\u0301 a\u0308 Z\u0324\u0354\u0367\u0351 \u200b\u200d\u2060",  # combining marks, zero width
    "NUL\x00inside\x00",  # NUL: allowed everywhere, since the database only sees ciphertext
    "\u202eRTL override\u202c \ufeffBOM \U0010ffff \x7f \x1b[31m",
    "'; DROP TABLE people; --",
]


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[kf.KeyRegistry]:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine)
    Base.metadata.create_all(engine)
    yield registry


def _read_person(engine: sa.Engine, person_id: int) -> Person:
    with Session(engine) as session:
        person = session.get(Person, person_id)
        assert person is not None
        session.expunge(person)
        return person


# Round trips ------------------------------------------------------------------------------------


def test_orm_round_trip_of_every_type(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with Session(engine) as session:
        session.add_all([Person(id=1, **FULL_ROW), Person(id=2, **OTHER_ROW), Person(id=3)])
        session.commit()

    for person_id, expected in ((1, FULL_ROW), (2, OTHER_ROW)):
        person = _read_person(engine, person_id)
        for name, value in expected.items():
            got = getattr(person, name)
            assert got == value, name
            assert type(got) is type(value), name
        assert person.seen_at is not None and expected["seen_at"] is not None
        assert person.seen_at.utcoffset() == expected["seen_at"].utcoffset()

    # None is SQL NULL, not the encryption of something.
    empty = _read_person(engine, 3)
    assert all(getattr(empty, name) is None for name in FULL_ROW)
    nulls = " AND ".join(f"{name} IS NULL" for name in FULL_ROW)
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT id FROM people WHERE {nulls}")).scalars().all() == [3]


def test_core_round_trip_and_the_stored_form(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert(), [{"id": 1, **FULL_ROW}, {"id": 2, **OTHER_ROW}])
        conn.execute(
            PEOPLE.insert(), [{"id": 3, **dict.fromkeys(FULL_ROW)}, {"id": 4, **OTHER_ROW}]
        )
        conn.execute(PEOPLE.update().where(PEOPLE.c.id == 4).values(email="bob@example.org"))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(PEOPLE).order_by(PEOPLE.c.id)).mappings().all()
    assert [dict(r) for r in rows] == [
        {"id": 1, **FULL_ROW},
        {"id": 2, **OTHER_ROW},
        {"id": 3, **dict.fromkeys(FULL_ROW)},
        {"id": 4, **OTHER_ROW, "email": "bob@example.org"},
    ]

    # What the database holds: our header, then ciphertext that does not contain the plaintext.
    for name in TEXT_COLUMNS:
        values = raw_values(engine, "people", name)
        assert values[2] is None
        for value, plain in ((values[0], FULL_ROW[name]), (values[1], OTHER_ROW[name])):
            assert isinstance(value, str), name
            assert value.startswith("kf2:pii:1:"), (name, value)
            assert envelope.is_ciphertext(value), name
            if isinstance(plain, str) and plain:
                assert plain not in value
    photos = raw_values(engine, "people", "photo")
    assert photos[2] is None
    assert bytes(photos[0]).startswith(b"kf2:pii:1:")
    assert bytes(range(256)) not in bytes(photos[0])


def test_unicode_round_trips(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with Session(engine) as session:
        for i, value in enumerate(UNICODE):
            session.add(Person(id=i, email=value, bio=value * 3, profile={value: [value]}))
        session.commit()
    for i, value in enumerate(UNICODE):
        person = _read_person(engine, i)
        assert person.email == value
        assert person.bio == value * 3
        assert person.profile == {value: [value]}

    value = "😀" * 319 + "\U0010ffff"  # 320 characters of 4 UTF-8 bytes each: the widest case
    with Session(engine) as session:
        session.add(Person(id=100, email=value))
        session.commit()
    assert _read_person(engine, 100).email == value
    stored = raw_values(engine, "people", "email")[-1]
    column = next(c for c in sa.inspect(engine).get_columns("people") if c["name"] == "email")
    assert len(stored) <= column["type"].length  # the column is sized for the widest value


def test_one_megabyte_text_and_all_byte_values(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    text = ("0123456789abcdé👍" * 70_000)[:1_048_576]
    blob = bytes(range(256)) * 4096  # 1 MiB
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert().values(id=1, bio=text, photo=blob))
    with engine.connect() as conn:
        row = conn.execute(sa.select(PEOPLE.c.bio, PEOPLE.c.photo)).one()
    assert row.bio == text
    assert row.photo == blob


JSON_DOCUMENTS: list[Any] = [
    {"deep": {"er": {"est": [[[{"x": [1, [2, [3, [4]]]]}]]]}}},
    ["a", 1, -2.5e-300, 1e308, True, False, None, {}, []],
    "a JSON string",
    "",
    0,
    False,
    12345678901234567890,
    {"ключ": "値", "emoji 👍": ["NUL\x00"]},
]


def test_json_documents_round_trip(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with engine.begin() as conn:
        conn.execute(
            PEOPLE.insert(), [{"id": i, "profile": d} for i, d in enumerate(JSON_DOCUMENTS)]
        )
    with engine.connect() as conn:
        got = conn.execute(sa.select(PEOPLE.c.profile).order_by(PEOPLE.c.id)).scalars().all()
    assert got == JSON_DOCUMENTS
    assert [type(g) for g in got] == [type(d) for d in JSON_DOCUMENTS]


def test_rows_before_and_after_rotation_both_read(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert().values(id=1, email="v1@example.com", photo=b"one"))
    assert kf.rotate_data_key("pii").version == 2
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert().values(id=2, email="v2@example.com", photo=b"two"))
    emails = raw_values(engine, "people", "email")
    photos = [bytes(p) for p in raw_values(engine, "people", "photo")]
    assert [e[:10] for e in emails] == ["kf2:pii:1:", "kf2:pii:2:"]
    assert [p[:10] for p in photos] == [b"kf2:pii:1:", b"kf2:pii:2:"]

    registry.forget()  # a fresh process: both versions are unwrapped again on demand
    with engine.connect() as conn:
        rows = conn.execute(sa.select(PEOPLE.c.email, PEOPLE.c.photo).order_by(PEOPLE.c.id))
        assert [tuple(r) for r in rows] == [("v1@example.com", b"one"), ("v2@example.com", b"two")]


# Refusals on write ------------------------------------------------------------------------------


def test_too_long_values_are_refused(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with Session(engine) as session:
        session.add(Person(id=1, email="é" * 321))
        with raises_kf(kf.EncryptionError, match="321 characters") as raised:
            session.commit()
    assert "é" * 20 not in str(raised.value)

    short = sa.Table(
        "short",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("code", kf.EncryptedBytes(16, key="pii")),
        sa.Column("tag", kf.EncryptedString(3, key="pii")),
    )
    short.create(engine)
    with engine.begin() as conn:
        conn.execute(short.insert().values(id=1, code=b"\xff" * 16, tag="😀😀😀"))
        with raises_kf(kf.EncryptionError, match="17 bytes"):
            conn.execute(short.insert().values(id=2, code=b"\xff" * 17))
        with raises_kf(kf.EncryptionError, match="4 characters"):
            conn.execute(short.insert().values(id=3, tag="abcd"))
    with engine.connect() as conn:
        assert conn.execute(sa.select(short.c.code, short.c.tag)).all() == [
            (b"\xff" * 16, "😀😀😀")
        ]


def test_a_long_non_ascii_enum_name_fits_or_is_refused(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """Encrypted() sizes its column for 255 bytes of serialized text: a value whose name is under
    255 characters but over 255 UTF-8 bytes must be refused, not overflow the column."""
    wide = enum.Enum("Wide", {"é" * 200: 1})  # type: ignore[misc]
    member = next(iter(wide))
    table = sa.Table(
        "wide",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("w", kf.Encrypted(sa.Enum(wide), key="pii")),
    )
    table.create(engine)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=1, w=member))
    except kf.EncryptionError:  # refused cleanly, not wrapped in a StatementError
        return
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.w)).scalar_one() is member


WRONG_TYPES: list[tuple[str, Any]] = [
    ("email", 5),
    ("email", b"bytes"),
    ("email", "lone surrogate \ud800"),  # a str that has no UTF-8 encoding
    ("bio", ["a"]),
    ("photo", "text"),
    ("photo", 7),
    ("profile", {"set": {1, 2}}),
    ("profile", object()),
    ("birthday", "2020-01-01"),
    ("seen_at", dt.date(2020, 1, 1)),
    ("wakes_at", "06:30"),
    ("logins", "12"),
    ("logins", True),
    ("logins", 1.5),
    ("balance", 1.5),  # a float would not round-trip exactly
    ("balance", "1.5"),
    ("verified", 1),
    ("verified", "true"),
    ("color", "GREEN"),
    ("color", "g"),
    ("color", Shape.RED),  # a member of another enum with the same name and value
    ("priority", 2),
    ("priority", Level.ONE),  # an IntEnum of another class with the same value
    ("external_id", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("notice", 60),
]


def test_wrong_python_type_is_refused(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    accepted = []
    for column, value in WRONG_TYPES:
        try:
            with engine.begin() as conn:
                conn.execute(PEOPLE.insert().values(id=1, **{column: value}))
        except Exception as exc:
            error = unwrap_statement_error(exc)
            if not isinstance(error, kf.EncryptionError):
                accepted.append(f"{column}={value!r}: {type(error).__name__}: {error}")
            continue
        with engine.begin() as conn:
            stored = conn.execute(sa.select(PEOPLE.c[column])).scalar_one()
            conn.execute(PEOPLE.delete())
        accepted.append(f"{column}={value!r}: accepted, reads back as {stored!r}")
    assert not accepted, "not refused with EncryptionError:\n" + "\n".join(accepted)


def test_ciphertext_is_never_encrypted_again(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert().values(id=1, email="a@example.com", photo=b"x", profile="p"))
    email = raw_values(engine, "people", "email")[0]
    photo = bytes(raw_values(engine, "people", "photo")[0])
    profile = raw_values(engine, "people", "profile")[0]
    for column, value in (("email", email), ("bio", email), ("photo", photo), ("profile", profile)):
        with engine.begin() as conn, raises_kf(kf.EncryptionError, match="already ciphertext"):
            conn.execute(PEOPLE.insert().values(id=2, **{column: value}))


def test_unknown_key_name_is_named(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    nope = sa.Table(
        "nope",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("s", kf.EncryptedString(50, key="nope")),
    )
    nope.create(engine)
    with engine.begin() as conn, raises_kf(kf.KeyNotFoundError, match="'nope'"):
        conn.execute(nope.insert().values(id=1, s="x"))

    # Reading a value written under a name the key store has never heard of.
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert().values(id=1, email="a@example.com"))
    forged = "kf2:nope:1:" + raw_values(engine, "people", "email")[0][len("kf2:pii:1:") :]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO nope (id, s) VALUES (2, :v)"), {"v": forged})
    with engine.connect() as conn, pytest.raises(kf.DecryptionError, match="'nope'") as raised:
        conn.execute(sa.select(nope.c.s)).all()
    assert isinstance(raised.value.__cause__, kf.KeyNotFoundError)
    assert "'nope'" in str(raised.value.__cause__)


# Refusals in SQL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda c: c == "alice@example.com",
        lambda c: c != "alice@example.com",
        lambda c: "alice@example.com" == c,
        lambda c: c.like("%@example.com"),
        lambda c: c.ilike("%@example.com"),
        lambda c: c.startswith("kf2:"),
        lambda c: c.contains("a"),
        lambda c: c.in_(["a", "b"]),
        lambda c: c.not_in(["a"]),
        lambda c: c < "m",
        lambda c: c >= "m",
        lambda c: c.between("a", "b"),
        lambda c: c.desc(),
        lambda c: c.asc(),
        lambda c: c + "suffix",
    ],
    ids=[
        "eq",
        "ne",
        "reflected-eq",
        "like",
        "ilike",
        "startswith",
        "contains",
        "in",
        "not-in",
        "lt",
        "ge",
        "between",
        "desc",
        "asc",
        "concat",
    ],
)
def test_meaningless_operators_are_refused(build: Any) -> None:
    for column in (Person.email, PEOPLE.c.email, PEOPLE.c.photo, PEOPLE.c.birthday):
        with pytest.raises(kf.UnsupportedOperationError) as raised:
            build(column)
        message = str(raised.value)
        assert "people." in message
        assert "alice" not in message


def test_order_by_an_encrypted_column_is_refused(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert(), [{"id": 1, "email": "b"}, {"id": 2, "email": "a"}])
    with Session(engine) as session:
        for statement in (
            lambda: sa.select(Person).order_by(Person.email),
            lambda: sa.select(PEOPLE).order_by(PEOPLE.c.email),
            lambda: sa.select(PEOPLE).order_by(PEOPLE.c.email.desc()),
        ):
            with raises_kf(kf.UnsupportedOperationError):
                session.execute(statement()).all()


def test_sql_functions_and_distinct_on_an_encrypted_column_are_refused(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    """max(), lower() and DISTINCT would run on ciphertext and return nonsense (issue 11)."""
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert(), [{"id": 1, "email": "b"}, {"id": 2, "email": "b"}])
    refused = [
        lambda: sa.select(sa.func.max(PEOPLE.c.email)),
        lambda: sa.select(sa.func.lower(PEOPLE.c.email).label("l")),
        lambda: sa.select(PEOPLE.c.email).distinct(),
        lambda: sa.select(sa.func.count(sa.distinct(PEOPLE.c.email))),
        lambda: sa.select(PEOPLE.c.id).where(sa.func.lower(PEOPLE.c.email) == "b"),
    ]
    with engine.connect() as conn:
        for statement in refused:
            with pytest.raises(kf.UnsupportedOperationError, match=r"people\.email"):
                conn.execute(statement())
        # Counting non-NULL values is meaningful: NULL is NULL in the clear.
        assert conn.execute(sa.select(sa.func.count(PEOPLE.c.email))).scalar_one() == 2


def test_null_checks_work(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with engine.begin() as conn:
        conn.execute(
            PEOPLE.insert(), [{"id": 1, "email": "a@example.com"}, {"id": 2, "email": None}]
        )
    with Session(engine) as session:
        for where, expected in (
            (Person.email.is_(None), [2]),
            (Person.email == None, [2]),  # noqa: E711 - the SQLAlchemy idiom under test
            (Person.email.is_not(None), [1]),
            (Person.email != None, [1]),  # noqa: E711
            (Person.photo.is_(None), [1, 2]),
        ):
            ids = session.scalars(sa.select(Person.id).where(where).order_by(Person.id)).all()
            assert ids == expected


def test_literal_rendering_is_refused_without_showing_the_value() -> None:
    for statement in (
        sa.insert(PEOPLE).values(id=1, email="alice@example.com"),
        sa.update(PEOPLE).values(bio="alice@example.com"),
        sa.select(PEOPLE.c.id)
        .where(PEOPLE.c.id == 1)
        .add_columns(sa.literal("alice@example.com", kf.EncryptedString(50, key="pii"))),
    ):
        with pytest.raises((kf.UnsupportedOperationError, sa.exc.CompileError)) as raised:
            statement.compile(compile_kwargs={"literal_binds": True})
        chain = error_texts(raised.value)
        assert any("SQL literal" in text for text in chain)
        for text in chain:
            assert "alice@example.com" not in text, text


# Refusals on read -------------------------------------------------------------------------------


def test_a_value_copied_to_a_column_under_another_key_does_not_decrypt(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    pair = sa.Table(
        "pair",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("a_text", kf.EncryptedString(100, key="a")),
        sa.Column("b_text", kf.EncryptedString(100, key="b")),
        sa.Column("a_bytes", kf.EncryptedBytes(key="a")),
        sa.Column("b_bytes", kf.EncryptedBytes(key="b")),
    )
    pair.create(engine)
    registry.create_data_key("a")
    registry.create_data_key("b")
    with engine.begin() as conn:
        conn.execute(
            pair.insert().values(id=1, a_text="secret-a", b_text="b", a_bytes=b"A", b_bytes=b"B")
        )
        assert conn.execute(sa.select(pair.c.b_text, pair.c.b_bytes)).one() == ("b", b"B")
        conn.execute(sa.text("UPDATE pair SET b_text = a_text, b_bytes = a_bytes"))
    for column in (pair.c.b_text, pair.c.b_bytes):
        with engine.connect() as conn:
            with pytest.raises(kf.DecryptionError) as raised:
                conn.execute(sa.select(column)).all()
        message = str(raised.value)
        assert "'a'" in message and "'b'" in message
        assert "secret-a" not in message


def test_tampered_values_fail_closed(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert().values(id=1, email="alice@example.com", photo=b"photo"))
    email = raw_values(engine, "people", "email")[0]
    photo = bytes(raw_values(engine, "people", "photo")[0])
    flipped = "B" if email[20] == "A" else "A"
    tampered_email = [
        email[:20] + flipped + email[21:],
        email.replace("kf2:pii:1:", "kf2:pii:2:"),
        email[:-4],
        "alice@example.com",  # a plaintext where ciphertext belongs
    ]
    kf.rotate_data_key("pii")  # so that version 2 exists and the moved value finds a key
    for value in tampered_email:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE people SET email = :v"), {"v": value})
        with engine.connect() as conn, pytest.raises(kf.DecryptionError) as raised:
            conn.execute(sa.select(PEOPLE.c.email)).all()
        assert "alice" not in str(raised.value)
    bad_photo = photo[:-1] + bytes([photo[-1] ^ 1])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE people SET email = NULL, photo = :v"), {"v": bad_photo})
    with engine.connect() as conn, pytest.raises(kf.DecryptionError, match="'pii' version 1"):
        conn.execute(sa.select(PEOPLE.c.photo)).all()


def test_reading_without_configure_says_what_to_do(
    engine: sa.Engine, registry: kf.KeyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with engine.begin() as conn:
        conn.execute(PEOPLE.insert().values(id=1, email="a@example.com", photo=b"x"))
    reset_global_registry(monkeypatch)
    for column in (PEOPLE.c.email, PEOPLE.c.photo):
        with engine.connect() as conn:
            with pytest.raises(kf.ConfigurationError, match=r"not configured.*configure\("):
                conn.execute(sa.select(column)).all()
    with Session(engine) as session, pytest.raises(kf.ConfigurationError, match="not configured"):
        session.get(Person, 1)
    with engine.begin() as conn, raises_kf(kf.ConfigurationError, match="not configured"):
        conn.execute(PEOPLE.insert().values(id=2, email="b@example.com"))


# Plaintext-migration mode -----------------------------------------------------------------------


def test_accept_plaintext_reads_header_less_values_only(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    migrating = sa.Table(
        "migrating",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii", accept_plaintext=True)),
        sa.Column("photo", kf.EncryptedBytes(key="pii", accept_plaintext=True)),
        sa.Column("doc", kf.EncryptedJSON(key="pii", accept_plaintext=True)),
        sa.Column("day", kf.Encrypted(sa.Date(), key="pii", accept_plaintext=True)),
    )
    strict = sa.Table(
        "migrating",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
    )
    migrating.create(engine)
    with engine.begin() as conn:  # rows from before the column was encrypted
        conn.execute(
            sa.text(
                "INSERT INTO migrating (id, email, photo, doc, day) VALUES (1, :e, :p, :d, :y)"
            ),
            {"e": "plain@example.com", "p": b"plain bytes", "d": '{"a": [1]}', "y": "2020-02-29"},
        )
        conn.execute(
            migrating.insert().values(
                id=2, email="new@example.com", photo=b"new", doc={"b": 2}, day=dt.date(2021, 1, 1)
            )
        )
    with engine.connect() as conn:
        rows = conn.execute(sa.select(migrating).order_by(migrating.c.id)).all()
    assert [tuple(r) for r in rows] == [
        (1, "plain@example.com", b"plain bytes", {"a": [1]}, dt.date(2020, 2, 29)),
        (2, "new@example.com", b"new", {"b": 2}, dt.date(2021, 1, 1)),
    ]
    assert raw_values(engine, "migrating", "email")[1].startswith("kf2:pii:1:")

    # Without the flag, a plaintext value is an error that says which flag exists.
    with engine.connect() as conn, pytest.raises(kf.DecryptionError, match="accept_plaintext"):
        conn.execute(sa.select(strict.c.email)).all()


def test_accept_plaintext_still_fails_a_tampered_value_with_a_header(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    migrating = sa.Table(
        "migrating",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii", accept_plaintext=True)),
        sa.Column("photo", kf.EncryptedBytes(key="pii", accept_plaintext=True)),
    )
    migrating.create(engine)
    with engine.begin() as conn:
        conn.execute(migrating.insert().values(id=1, email="alice@example.com", photo=b"alice"))
    email = raw_values(engine, "migrating", "email")[0]
    photo = bytes(raw_values(engine, "migrating", "photo")[0])
    body = email[len("kf2:pii:1:") :]
    flipped = "B" if body[5] == "A" else "A"
    tampered = {
        "body": "kf2:pii:1:" + body[:5] + flipped + body[6:],
        "version": "kf2:pii:2:" + body,
        # Headers that no longer parse still start with our format marker: ciphertext, not
        # plaintext, so they must not be handed back as if they were the user's data.
        "leading-zero": "kf2:pii:01:" + body,
        "version-letter": "kf2:pii:x:" + body,
        "name-char": "kf2:p!i:1:" + body,
        "separator": "kf2:pii;1:" + body,
        "no-version": "kf2:pii::" + body,
    }
    kf.rotate_data_key("pii")
    failures = []
    for label, value in tampered.items():
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE migrating SET email = :v"), {"v": value})
        with engine.connect() as conn:
            try:
                got = conn.execute(sa.select(migrating.c.email)).scalar_one()
            except kf.DecryptionError:
                continue
        failures.append(f"{label}: returned {got!r}")
    bad_photo = b"kf2:pii:01:" + photo[len(b"kf2:pii:1:") :]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE migrating SET email = NULL, photo = :v"), {"v": bad_photo})
    with engine.connect() as conn:
        try:
            got = conn.execute(sa.select(migrating.c.photo)).scalar_one()
            failures.append(f"photo leading-zero: returned {got!r}")
        except kf.DecryptionError:
            pass
    assert not failures, "tampered ciphertext read as plaintext:\n" + "\n".join(failures)

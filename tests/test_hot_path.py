"""The column types' fast paths (issue 8, performance) write and read exactly what the general
path does: the same bytes, the same refusals, legacy kf1 values included.

The bind and result processors keep, per column, an encrypter or decrypter built for the key
version they last saw (its associated data worked out once). These tests pin down that this
changes nothing anyone can observe through SQL: stored values are the documented format,
byte for byte; values altered, moved, relabelled or re-encoded in the database still fail; a
rotation still moves writes to the new version; and refusals still name no plaintext.
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import envelope
from sqlalchemy_kms_field.envelope import DataKey
from tests.helpers import (
    configure_local,
    error_texts,
    raises_kf,
    raw_values,
    reset_global_registry,
    unwrapped_key,
)

# Known answers, computed with the code before the fast paths existed (DataKey._seal with a
# fixed nonce): key bytes 00..1f, data key "pii" version 3, context users.email (codec str).
KEY = bytes(range(32))
CONTEXT = envelope.encode_context("users", "email", "str")
VECTORS = [
    (
        b"alice@example.com",
        0,
        "kf2:pii:3:AAAAAAAAAAAAAAAAiykXnzwmaum1gXUXr578zbWXAAeB1pc4oY7yo8GTMp5EGg",
        "6b66323a7069693a333a0000000000000000000000008b29179f3c266ae9b5817517af9efccdb597"
        "000781d69738a18ef2a3c193329e441a",
    ),
    (
        b"",
        0,
        "kf2:pii:3:AAECAwQFBgcICQoL9azUs9u0pfJy73paNna3-DM",
        "6b66323a7069693a333a000102030405060708090a0bf5acd4b3dbb4a5f272ef7a5a3676b7f833",
    ),
    (
        "z\u00fcrich \u2603".encode(),
        16,
        "kf2:pii:3:________________h08pwmAZvAdHwF-qETshRCL522wOEBvpP8xzN55mT-U",
        "6b66323a7069693a333affffffffffffffffffffffff874f29c26019bc0747c05faa113b214422f9"
        "db6c0e101be93fcc73379e664fe5",
    ),
    (
        b"x" * 47,
        48,
        "kf2:pii:3:DA0ODxAREhMUFRYXP7dWBT29dEp-cQwbcJyvOsZ94yz0zrzXgDHSaEEdF9DXuf0xiXXUauvm-YDTz"
        "tZpMnt0sfPLbICqFoG32UFhmw",
        "6b66323a7069693a333a0c0d0e0f10111213141516173fb756053dbd744a7e710c1b709caf3ac67de3"
        "2cf4cebcd78031d268411d17d0d7b9fd318975d46aebe6f980d3ced669327b74b1f3cb6c80aa1681b7"
        "d941619b",
    ),
]
LEGACY_VECTOR = (
    "kf1:pii:3:ZGVmZ2hpamtsbW5vCY0ORdYC8MMCeC5fvWWqRzhqIHwbctEImsKXKjvs8lkygA",
    b"legacy@example.com",
)


def reference_value(
    key: bytes, head: str, context: bytes, plaintext: bytes, pad: int, nonce: bytes
) -> str:
    """A kf2 text value as the README defines it, with ``cryptography`` and nothing of ours."""
    padded = plaintext + b"\x80"
    if pad > 1:
        padded += bytes(-len(padded) % pad)
    body = nonce + AESGCMSIV(key).encrypt(nonce, padded, head.encode("ascii") + context)
    return head + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")


def legacy_value(key: bytes, name: str, version: int, plaintext: bytes) -> str:
    """A kf1 text value (header-only associated data, no padding), as the old format wrote it."""
    head = f"kf1:{name}:{version}:"
    nonce = os.urandom(12)
    body = nonce + AESGCMSIV(key).encrypt(nonce, plaintext, head.encode("ascii"))
    return head + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")


def nonce_of(value: str) -> bytes:
    return envelope.b64decode(value.split(":", 3)[3])[:12]


# The envelope's per-column encrypters and decrypter ------------------------------------------


@pytest.mark.parametrize(("plaintext", "pad", "text", "binary"), VECTORS)
def test_the_decrypter_and_decrypt_text_read_the_known_answers(
    plaintext: bytes, pad: int, text: str, binary: str
) -> None:
    key = DataKey("pii", 3, KEY)
    assert key.text_decrypter(CONTEXT)(text) == plaintext
    assert key.decrypt_text(text, CONTEXT) == plaintext
    assert key.decrypt_binary(bytes.fromhex(binary), CONTEXT) == plaintext
    # The fast encrypters write the same bytes as the definition, for the nonce they drew.
    fresh = key.text_encrypter(CONTEXT, pad)(plaintext)
    assert fresh == reference_value(KEY, key.header, CONTEXT, plaintext, pad, nonce_of(fresh))
    blob = key.binary_encrypter(CONTEXT, pad)(plaintext)
    nonce = blob[len(key.header_bytes) : len(key.header_bytes) + 12]
    assert blob.decode("latin-1").startswith(key.header)
    assert key.header + envelope.b64encode(blob[len(key.header_bytes) :]) == reference_value(
        KEY, key.header, CONTEXT, plaintext, pad, nonce
    )


def test_the_decrypter_reads_legacy_values() -> None:
    value, plaintext = LEGACY_VECTOR
    key = DataKey("pii", 3, KEY)
    assert key.text_decrypter(CONTEXT)(value) == plaintext
    assert key.decrypt_text(value, CONTEXT) == plaintext


def _altered(value: str, version: int) -> list[str]:
    """What a writer without the key can make of a stored value under ``version``."""
    head, body = value[:10], value[10:]
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    flipped = body[:20] + ("B" if body[20] == "A" else "A") + body[21:]
    return [
        ("kf1" if head.startswith("kf2") else "kf2") + value[3:],  # relabelled format
        value.replace(f":{version}:", f":{version + 1}:", 1),  # another version
        head + flipped,
        head + body[:-1] + next(c for c in last if c != body[-1]),  # another last character
        head + body[:30],  # truncated
        head + body[:11],  # shorter than a nonce
        head + body + "=",
        head + body + "AA",
        head + " " + body,
        head + body.replace("-", "+").replace("_", "/"),
        head + body[:-1] + "\u00e9",
    ]


@pytest.mark.parametrize("value", [VECTORS[0][2], VECTORS[2][2], LEGACY_VECTOR[0]])
def test_the_decrypter_refuses_exactly_what_decrypt_text_refuses(value: str) -> None:
    key = DataKey("pii", 3, KEY)
    decrypt = key.text_decrypter(CONTEXT)
    for altered in _altered(value, 3):
        if altered == value:
            continue
        with pytest.raises(kf.DecryptionError) as general:
            key.decrypt_text(altered, CONTEXT)
        with pytest.raises(kf.DecryptionError) as fast:
            decrypt(altered)
        assert str(fast.value) == str(general.value)
        assert "'pii' version 3" in str(fast.value)
    # Another place: the same value under another column's context.
    other = envelope.encode_context("users", "phone", "str")
    if value.startswith("kf2"):
        with pytest.raises(kf.DecryptionError, match="authentication failed"):
            key.text_decrypter(other)(value)


def test_pad_and_unpad_agree_with_their_definition() -> None:
    def unpad_by_definition(data: bytes) -> bytes | None:
        stripped = data.rstrip(b"\x00")
        return stripped[:-1] if stripped.endswith(b"\x80") else None

    rng = random.Random(8)
    alphabet = [b"\x00", b"\x80", b"a", b"\xff"]
    for _ in range(3000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 9)))
        assert envelope.unpad(data) == unpad_by_definition(data), data
        for size in (0, 1, 2, 16, 48):
            padded = envelope.pad(data, size)
            assert envelope.unpad(padded) == data
            assert len(padded) == envelope.padded_size(len(data), size)
            assert size <= 1 or len(padded) % size == 0


@pytest.mark.parametrize(
    "body", ["AAAA=", "AA+A", "AA/A", "AA A", "AAA\n", "AAA=", "A", "AAAA\u00e9"]
)
def test_b64decode_refuses_what_is_not_base64url(body: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        envelope.b64decode(body)


# Through the column types, on every database -------------------------------------------------


class Base(DeclarativeBase):
    pass


class Person(Base):
    __tablename__ = "hot_people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="pii"))
    code: Mapped[str | None] = mapped_column(kf.EncryptedString(40, key="pii", pad=16))
    note: Mapped[str | None] = mapped_column(kf.EncryptedText(key="pii"))
    photo: Mapped[bytes | None] = mapped_column(kf.EncryptedBytes(key="pii", pad=16))
    alias: Mapped[str | None] = mapped_column(kf.EncryptedString(320, key="other"))


people = Person.__table__
assert isinstance(people, sa.Table)
TEXT_COLUMNS = ("email", "code", "note", "alias")


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[kf.KeyRegistry]:
    reset_global_registry(monkeypatch)
    registry = configure_local(engine, names=("pii", "other"), active_ttl=0.2)
    Base.metadata.create_all(engine)
    yield registry


def rows(n: int, start: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "email": f"user{i}@example.com",
            "code": f"c{i}",
            "note": "n\u00f6te " * i,
            "photo": bytes([i % 256]) * i,
            "alias": f"alias {i}",
        }
        for i in range(start, start + n)
    ]


def read_all(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(people).order_by(people.c.id))]


def set_raw(engine: sa.Engine, row_id: int, column: str, value: Any) -> None:
    raw = sa.table("hot_people", sa.column("id"), sa.column(column))
    with engine.begin() as conn:
        conn.execute(raw.update().where(raw.c.id == row_id).values({column: value}))


def read_one(engine: sa.Engine, row_id: int, column: str) -> Any:
    # The same statement every time, so the same compiled processors (and their kept key).
    with engine.connect() as conn:
        stmt = sa.select(people.c[column]).where(people.c.id == sa.bindparam("row_id"))
        return conn.execute(stmt, {"row_id": row_id}).scalar_one()


def test_stored_values_are_the_documented_format(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    written = rows(20)
    with engine.begin() as conn:
        conn.execute(people.insert(), written)  # executemany: the bind fast path
    dek = {name: unwrapped_key(registry, name, 1) for name in ("pii", "other")}
    for column in TEXT_COLUMNS:
        typ = people.c[column].type
        key = dek[typ.key]
        head = f"kf2:{typ.key}:1:"
        context = envelope.encode_context("hot_people", column, "str")
        for row, stored in zip(written, raw_values(engine, "hot_people", column), strict=True):
            assert stored.startswith(head)
            expected = row[column].encode("utf-8")
            assert stored == reference_value(
                key, head, context, expected, typ.pad, nonce_of(stored)
            )
    for row, stored in zip(written, raw_values(engine, "hot_people", "photo"), strict=True):
        blob = bytes(stored)
        head = b"kf2:pii:1:"
        assert blob.startswith(head)
        aad = head + envelope.encode_context("hot_people", "photo", "bytes")
        padded = AESGCMSIV(dek["pii"]).decrypt(blob[10:22], blob[22:], aad)
        assert len(padded) % 16 == 0 and envelope.unpad(padded) == row["photo"]
    assert read_all(engine) == written
    with Session(engine) as session:
        got = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [p.email for p in got] == [r["email"] for r in written]


def test_legacy_values_read_through_the_column_among_kf2_values(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    written = rows(12)
    with engine.begin() as conn:
        conn.execute(people.insert(), written)
    key = unwrapped_key(registry, "pii", 1)
    for row in written[::2]:  # every other row: kf1 again, as it was before format 2
        for column in ("email", "code", "note"):
            set_raw(engine, row["id"], column, legacy_value(key, "pii", 1, row[column].encode()))
    assert [v[:4] for v in raw_values(engine, "hot_people", "email")] == ["kf1:", "kf2:"] * 6
    assert read_all(engine) == written
    with Session(engine) as session:
        got = session.scalars(sa.select(Person).order_by(Person.id)).all()
        assert [(p.email, p.code, p.note) for p in got] == [
            (r["email"], r["code"], r["note"]) for r in written
        ]


def test_values_altered_in_the_database_fail_after_good_reads(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.begin() as conn:
        conn.execute(people.insert(), rows(3))
    key = unwrapped_key(registry, "pii", 1)
    set_raw(engine, 2, "email", legacy_value(key, "pii", 1, b"user2@example.com"))
    good = {
        1: raw_values(engine, "hot_people", "email")[0],
        2: raw_values(engine, "hot_people", "email")[1],
    }
    moved = raw_values(engine, "hot_people", "code")[0]  # same key, another column
    other_key = raw_values(engine, "hot_people", "alias")[0]  # another data key
    bad = [
        *_altered(good[1], 1),
        *_altered(good[2], 1),
        moved,
        other_key,
        "kf2:pii:1:",
        "plain@example.com",
        "KF2:pii:1:AAAA",
    ]
    for value in (b for b in bad if b not in good.values()):  # a body without '-' or '_'
        assert read_one(engine, 1, "email") == "user1@example.com"  # the key is kept warm
        assert read_one(engine, 2, "email") == "user2@example.com"
        set_raw(engine, 3, "email", value)
        with raises_kf(kf.DecryptionError, match="hot_people.email") as raised:
            got = read_one(engine, 3, "email")
            pytest.fail(f"{value!r} read as {got!r}")
        assert raised.value is not None
        for text in error_texts(raised.value):
            assert all(f"user{i}@example.com" not in text for i in (1, 2, 3))


def test_writes_move_to_the_new_version_after_a_rotation(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    insert = people.insert()  # one statement, compiled once: the same processors throughout
    with engine.begin() as conn:
        conn.execute(insert, rows(4))
    kf.rotate_data_key("pii")
    deadline = time.monotonic() + 10
    for row_id in itertools.count(100):  # active_ttl is short: soon a write is under v2
        with engine.begin() as conn:
            conn.execute(insert, rows(1, start=row_id))
        newest = raw_values(engine, "hot_people", "email")[-1]
        if newest.startswith("kf2:pii:2:") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert newest.startswith("kf2:pii:2:")
    with engine.begin() as conn:
        conn.execute(insert, rows(4, start=5))
    stored = raw_values(engine, "hot_people", "email")
    assert [v[:10] for v in stored[:8]] == ["kf2:pii:1:"] * 4 + ["kf2:pii:2:"] * 4
    assert all(v.startswith("kf2:other:1:") for v in raw_values(engine, "hot_people", "alias"))
    # Reading alternates between the versions: both decrypt.
    assert [r["email"] for r in read_all(engine)][:8] == [
        f"user{i}@example.com" for i in range(1, 9)
    ]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("x" * 321, kf.EncryptionError, "does not fit"),
        ("user\ud800@example.com", kf.EncryptionError, "not valid Unicode"),
        (b"user@example.com", kf.EncryptionError, "takes str values"),
        (VECTORS[0][2].replace(":3:", ":1:"), kf.EncryptionError, "already ciphertext"),
    ],
)
def test_refusals_on_the_bind_fast_path_name_no_plaintext(
    engine: sa.Engine, registry: kf.KeyRegistry, value: Any, error: type[Exception], match: str
) -> None:
    with engine.begin() as conn:
        conn.execute(people.insert(), rows(1))  # the processors are warm
    with raises_kf(error, match=match) as raised, engine.begin() as conn:
        conn.execute(people.insert(), [{"id": 2, "email": value}])
    assert raised.value is not None
    if isinstance(value, str) and "@" in value:
        assert all("example.com" not in t for t in error_texts(raised.value))
    assert len(raw_values(engine, "hot_people", "email")) == 1


def test_strings_that_only_start_like_a_header_round_trip(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    values = ["kf", "kf2", "kf2:", "kf2:pii:1:", "kf1:pii:1:AAAA", "kfz"]
    with engine.begin() as conn:
        conn.execute(people.insert(), [{"id": i, "email": v} for i, v in enumerate(values, 1)])
    assert [r["email"] for r in read_all(engine)] == values


def test_an_authenticated_value_that_is_not_utf8_fails_naming_no_plaintext(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.begin() as conn:
        conn.execute(people.insert(), rows(2))
    data_key = registry.data_key("pii", 1)
    context = people.c.email.type.context_bytes()
    set_raw(engine, 2, "email", data_key.encrypt_text(b"secret\xff", context))
    assert read_one(engine, 1, "email") == "user1@example.com"
    with raises_kf(kf.DecryptionError, match="not a valid str value") as raised:
        read_one(engine, 2, "email")
    assert raised.value is not None
    assert all("secret" not in t for t in error_texts(raised.value))


class LowerCaseEmail(kf.EncryptedString):
    """A subclass with its own codec: the inline str path must not go around it."""

    cache_ok = True

    def _serialize(self, value: Any) -> bytes:
        return super()._serialize(value.lower())

    def _deserialize(self, data: bytes) -> str:
        return "<" + super()._deserialize(data) + ">"


def test_a_subclass_codec_is_not_bypassed(engine: sa.Engine, registry: kf.KeyRegistry) -> None:
    table = sa.Table(
        "hot_lower",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", LowerCaseEmail(320, key="pii")),
    )
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "email": "Alice@Example.COM"}])
        assert conn.execute(sa.select(table.c.email)).scalar_one() == "<alice@example.com>"


def test_reads_follow_the_registry_after_it_forgets_its_keys(
    engine: sa.Engine, registry: kf.KeyRegistry
) -> None:
    with engine.begin() as conn:
        conn.execute(people.insert(), rows(3))
    assert read_one(engine, 1, "email") == "user1@example.com"
    before = registry.data_key("pii", 1)
    registry.forget()  # the processors' kept decrypter belongs to a key the registry dropped
    assert read_one(engine, 2, "email") == "user2@example.com"
    assert registry.data_key("pii", 1) is not before  # unwrapped again, and used
    with engine.begin() as conn:
        conn.execute(people.insert(), rows(1, start=4))
    assert [r["email"] for r in read_all(engine)] == [f"user{i}@example.com" for i in range(1, 5)]

"""The README's disaster-recovery recipe decrypts what the column types wrote, with only the DEK."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import sqlalchemy_kms_field as kf
from tests.helpers import configure_local, raw_values, reset_global_registry, unwrapped_key

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- decrypt-recipe -->"
UNWRAP_MARKER = "<!-- unwrap-recipe -->"

Decrypt = Callable[..., bytes]  # (stored, dek, table, column, codec, row=()) -> plaintext


def recipe_source(marker: str = MARKER) -> str:
    text = README.read_text(encoding="utf-8")
    assert marker in text, f"{README} lost its {marker} marker"
    after = text.split(marker, 1)[1]
    match = re.match(r"\s*```python\n(.*?)\n```", after, re.DOTALL)
    assert match, f"no ```python block right after {marker}"
    return match.group(1)


@pytest.fixture(scope="module")
def decrypt() -> Decrypt:
    source = recipe_source()
    assert "sqlalchemy_kms_field" not in source  # the point: no lock-in
    assert len(source.splitlines()) <= 25  # "in twenty lines" (plus imports and blank lines)
    namespace: dict[str, object] = {}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README
    function = namespace.get("decrypt")
    assert callable(function), "the recipe must define decrypt(stored, dek, table, column, codec)"
    return function


@pytest.fixture
def registry(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[kf.KeyRegistry]:
    reset_global_registry(monkeypatch)
    yield configure_local(engine)


def _table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "recipe",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("email", kf.EncryptedString(320, key="pii")),
        sa.Column("notes", kf.EncryptedText(key="pii")),
        sa.Column("blob", kf.EncryptedBytes(key="pii")),
        sa.Column("doc", kf.EncryptedJSON(key="pii")),
        sa.Column("age", kf.Encrypted(sa.Integer(), key="pii")),  # codec "int", padded to 16
        sa.Column("ssn", kf.EncryptedString(40, key="pii", bind_to=("id",))),  # bound to its row
        sa.Column("renamed", kf.EncryptedString(40, key="pii", context="people.nickname")),
    )


def test_recipe_decrypts_text_and_binary_columns_with_only_the_dek(
    engine: sa.Engine, registry: kf.KeyRegistry, decrypt: Decrypt
) -> None:
    table = _table(sa.MetaData())
    table.metadata.create_all(engine)
    rows = [
        {
            "id": 1,
            "email": "alice@example.com",
            "notes": "Zoë 👩‍💻 東京 مرحبا",
            "blob": bytes(range(256)),
            "doc": {"a": [1, "ü"]},
            "age": 42,
            "ssn": "123-45-6789",
            "renamed": "Al",
        },
        {
            "id": 2,
            "email": "",
            "notes": "x" * 5000,
            "blob": b"",
            "doc": [],
            "age": -7,
            "ssn": "",
            "renamed": "Bé",
        },
    ]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows[:1])
    registry.rotate_data_key("pii")
    with engine.begin() as conn:
        conn.execute(table.insert(), rows[1:])

    deks = {v: unwrapped_key(registry, "pii", v) for v in (1, 2)}
    assert deks[1] != deks[2]
    emails = raw_values(engine, "recipe", "email")
    notes = raw_values(engine, "recipe", "notes")
    blobs = [bytes(b) for b in raw_values(engine, "recipe", "blob")]
    docs = raw_values(engine, "recipe", "doc")
    ages = raw_values(engine, "recipe", "age")
    ssns = raw_values(engine, "recipe", "ssn")
    renamed = raw_values(engine, "recipe", "renamed")
    for i, version in enumerate((1, 2)):
        assert emails[i].startswith(f"kf2:pii:{version}:")
        assert blobs[i].startswith(f"kf2:pii:{version}:".encode())
        dek, row = deks[version], rows[i]
        assert decrypt(emails[i], dek, "recipe", "email", "str").decode() == row["email"]
        assert decrypt(notes[i], dek, "recipe", "notes", "str").decode() == row["notes"]
        assert decrypt(blobs[i], dek, "recipe", "blob", "bytes") == row["blob"]
        assert json.loads(decrypt(docs[i], dek, "recipe", "doc", "json")) == row["doc"]
        assert int(decrypt(ages[i], dek, "recipe", "age", "int")) == row["age"]
        bound = [("id", str(row["id"]))]
        assert decrypt(ssns[i], dek, "recipe", "ssn", "str", bound).decode() == row["ssn"]
        assert decrypt(renamed[i], dek, "people", "nickname", "str").decode() == row["renamed"]

    # The recipe authenticates too: the wrong DEK, a changed header, another place, codec or
    # row does not decrypt.
    email = emails[0]
    with pytest.raises(InvalidTag):
        decrypt(email, deks[2], "recipe", "email", "str")
    with pytest.raises(InvalidTag):
        decrypt(email.replace("kf2:pii:1:", "kf2:pii:2:", 1), deks[2], "recipe", "email", "str")
    with pytest.raises(InvalidTag):
        decrypt(email.replace("kf2:", "kf1:", 1), deks[1], "recipe", "email", "str")
    with pytest.raises(InvalidTag):
        decrypt(b"kf2:pii:2:" + blobs[0][len(b"kf2:pii:1:") :], deks[1], "recipe", "blob", "bytes")
    for where, column, codec in (("recipe", "notes", "str"), ("other", "email", "str")):
        with pytest.raises(InvalidTag):
            decrypt(email, deks[1], where, column, codec)
    with pytest.raises(InvalidTag):
        decrypt(email, deks[1], "recipe", "email", "json")
    with pytest.raises(InvalidTag):
        decrypt(ssns[0], deks[1], "recipe", "ssn", "str", [("id", "2")])
    with pytest.raises(InvalidTag):
        decrypt(renamed[0], deks[1], "recipe", "renamed", "str")


def test_recipe_agrees_with_the_known_answer_vectors(decrypt: Decrypt) -> None:
    vectors = json.loads((Path(__file__).parent / "vectors.json").read_text(encoding="utf-8"))
    for vector in vectors["kf2"]["vectors"]:
        dek = bytes.fromhex(vector["key_hex"])
        place = (vector["table"], vector["column"], vector["codec"], vector["row"])
        assert decrypt(vector["text"], dek, *place).hex() == vector["plaintext_hex"]
        binary = bytes.fromhex(vector["binary_hex"])
        assert decrypt(binary, dek, *place).hex() == vector["plaintext_hex"]
    for vector in vectors["kf1"]["vectors"]:  # the legacy format: no context to check
        dek = bytes.fromhex(vector["key_hex"])
        assert decrypt(vector["text"], dek, "any", "place", "str").hex() == vector["plaintext_hex"]
        binary = bytes.fromhex(vector["binary_hex"])
        assert decrypt(binary, dek, "any", "place", "str").hex() == vector["plaintext_hex"]


# The recipe that unwraps a data key with a local master key file -------------------------------

Unwrap = Callable[..., bytes]


@pytest.fixture(scope="module")
def unwrap_local() -> Unwrap:
    source = recipe_source(UNWRAP_MARKER)
    assert "sqlalchemy_kms_field" not in source
    namespace: dict[str, object] = {}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README
    function = namespace.get("unwrap_local")
    assert callable(function), "the unwrap recipe must define unwrap_local(...)"
    return function  # type: ignore[return-value]


@pytest.mark.parametrize("application", [None, "billing"])
def test_unwrap_recipe_recovers_the_data_and_index_keys_from_the_key_store(
    engine: sa.Engine,
    tmp_path: Path,
    unwrap_local: Unwrap,
    decrypt: Decrypt,
    application: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reset_global_registry(monkeypatch)
    key_file = tmp_path / "dev.key"
    kf.LocalMasterKey.generate_file(key_file)
    store = kf.SqlKeyStore(engine)
    store.create_table()
    registry = kf.configure(
        master_key=kf.LocalMasterKey.from_file(key_file),
        key_store=store,
        application=application,
    )
    registry.create_data_key("pii")
    registry.rotate_data_key("pii")
    registry.create_index_key("email-index")
    table = _table(sa.MetaData())
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "email": "alice@example.com"}])

    text = key_file.read_text(encoding="ascii")
    with engine.connect() as conn:  # the key store as SQL gives it, no library involved
        rows = conn.execute(
            sa.text("SELECT name, version, kind, wrapped_key FROM kms_field_keys")
        ).all()
    assert len(rows) == 3
    for name, version, kind, wrapped in rows:
        dek = unwrap_local(bytes(wrapped), text, name, version, kind, application)
        expected = registry.master_key.unwrap(
            bytes(wrapped), registry.context(name, version, kind), registry.master_key.key_id
        )
        assert dek == expected and len(dek) == 32
    wrapped_by = {(name, version): bytes(wrapped) for name, version, _, wrapped in rows}
    dek2 = unwrap_local(wrapped_by["pii", 2], text, "pii", 2, "data", application)
    (email,) = raw_values(engine, "recipe", "email")
    assert decrypt(email, dek2, "recipe", "email", "str") == b"alice@example.com"
    # What the README used to say: the context's JSON with sorted keys and the version as a
    # number. It authenticates nothing: the library's associated data is compact, version a string.
    context: dict[str, object] = {
        "purpose": "sqlalchemy-kms-field data key",
        "key_name": "pii",
        "key_version": 1,
    }
    if application is not None:
        context["application"] = application
    wrapped = wrapped_by["pii", 1]
    master = AESGCM(base64.b64decode(text))
    with pytest.raises(InvalidTag):
        master.decrypt(wrapped[5:17], wrapped[17:], json.dumps(context, sort_keys=True).encode())

"""The README's disaster-recovery recipe decrypts what the column types wrote, with only the DEK."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag

import sqlalchemy_kms_field as kf
from tests.helpers import configure_local, raw_values, reset_global_registry, unwrapped_key

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- decrypt-recipe -->"

Decrypt = Callable[[str | bytes, bytes], bytes]


def recipe_source() -> str:
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, f"{README} lost its {MARKER} marker"
    after = text.split(MARKER, 1)[1]
    match = re.match(r"\s*```python\n(.*?)\n```", after, re.DOTALL)
    assert match, f"no ```python block right after {MARKER}"
    return match.group(1)


@pytest.fixture(scope="module")
def decrypt() -> Decrypt:
    source = recipe_source()
    assert "sqlalchemy_kms_field" not in source  # the point: no lock-in
    assert len(source.splitlines()) <= 25  # "in twenty lines" (plus imports and blank lines)
    namespace: dict[str, object] = {}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README
    function = namespace.get("decrypt")
    assert callable(function), "the recipe must define decrypt(stored, dek)"
    return function  # type: ignore[return-value]


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
        },
        {"id": 2, "email": "", "notes": "x" * 5000, "blob": b"", "doc": []},
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
    for i, version in enumerate((1, 2)):
        assert emails[i].startswith(f"kf1:pii:{version}:")
        assert blobs[i].startswith(f"kf1:pii:{version}:".encode())
        dek = deks[version]
        assert decrypt(emails[i], dek).decode("utf-8") == rows[i]["email"]
        assert decrypt(notes[i], dek).decode("utf-8") == rows[i]["notes"]
        assert decrypt(blobs[i], dek) == rows[i]["blob"]
        assert json.loads(decrypt(docs[i], dek)) == rows[i]["doc"]

    # The recipe authenticates too: the wrong DEK or a changed header does not decrypt.
    with pytest.raises(InvalidTag):
        decrypt(emails[0], deks[2])
    with pytest.raises(InvalidTag):
        decrypt(emails[0].replace("kf1:pii:1:", "kf1:pii:2:", 1), deks[2])
    with pytest.raises(InvalidTag):
        decrypt(b"kf1:pii:2:" + blobs[0][len(b"kf1:pii:1:") :], deks[1])


def test_recipe_agrees_with_the_known_answer_vectors(decrypt: Decrypt) -> None:
    vectors = json.loads((Path(__file__).parent / "vectors.json").read_text(encoding="utf-8"))
    for vector in vectors["vectors"]:
        dek = bytes.fromhex(vector["key_hex"])
        assert decrypt(vector["text"], dek).hex() == vector["plaintext_hex"]
        assert decrypt(bytes.fromhex(vector["binary_hex"]), dek).hex() == vector["plaintext_hex"]

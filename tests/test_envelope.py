"""The stored-value formats: known-answer vectors (kf2 and the legacy kf1), the context a kf2
value is bound to, padding, header parsing, tampering, canonical base64."""

from __future__ import annotations

import base64
import binascii
import json
import random
import string
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from sqlalchemy_kms_field import envelope
from sqlalchemy_kms_field.envelope import DataKey
from sqlalchemy_kms_field.exc import ConfigurationError, DecryptionError, EncryptionError

_ALL_VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors.json").read_text(encoding="utf-8")
)
VECTORS: list[dict[str, Any]] = _ALL_VECTORS["kf2"]["vectors"]
KF1_VECTORS: list[dict[str, Any]] = _ALL_VECTORS["kf1"]["vectors"]
B64URL = string.ascii_letters + string.digits + "-_"

KEY = bytes(range(32))
CTX = envelope.encode_context("users", "email", "str")


def _vector_id(vector: dict[str, Any]) -> str:
    return str(vector["description"])


def _context(vector: dict[str, Any]) -> bytes:
    row = [(name, value) for name, value in vector["row"]]
    return envelope.encode_context(vector["table"], vector["column"], vector["codec"], row)


def _parts(vector: dict[str, Any]) -> tuple[DataKey, bytes, bytes, str, bytes]:
    key = DataKey(vector["key_name"], vector["version"], bytes.fromhex(vector["key_hex"]))
    return (
        key,
        bytes.fromhex(vector["nonce_hex"]),
        bytes.fromhex(vector["plaintext_hex"]),
        vector["text"],
        bytes.fromhex(vector["binary_hex"]),
    )


def _field(text: str) -> bytes:
    """The documented length prefix, written independently of envelope._field."""
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


# Known-answer vectors: kf2 -----------------------------------------------------------------------


def test_the_vectors_cover_the_edges() -> None:
    for vectors in (VECTORS, KF1_VECTORS):
        plaintexts = [bytes.fromhex(v["plaintext_hex"]) for v in vectors]
        assert b"" in plaintexts
        assert bytes(range(256)) in plaintexts
        assert max(v["version"] for v in vectors) == 999_999_999
        assert max(len(v["key_name"]) for v in vectors) == 63
    assert {v["pad"] for v in VECTORS} >= {0, 8, 16, 32}
    assert any(v["row"] for v in VECTORS)
    assert any(not v["table"].isascii() for v in VECTORS)
    assert {"str", "bytes", "json", "bool"} <= {v["codec"] for v in VECTORS}
    # A plaintext that itself ends like padding (0x80 then zeros) must come back whole.
    assert any(v["plaintext_hex"].endswith("800000") for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
def test_encrypting_with_the_vector_nonce_gives_the_stored_value(
    vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, nonce, plaintext, text, binary = _parts(vector)
    context, pad = _context(vector), vector["pad"]
    padded = envelope.pad(plaintext, pad)
    assert padded.hex() == vector["padded_hex"]
    assert (key.header_bytes + context).hex() == vector["aad_hex"]

    body = key._seal(padded, key.header_bytes + context, nonce)
    assert key.header + envelope.b64encode(body) == text
    assert key.header_bytes + body == binary

    # The public path draws its nonce from os.urandom: pin it and expect the same bytes.
    def fixed_nonce(n: int) -> bytes:
        assert n % envelope.NONCE_SIZE == 0
        return nonce * (n // envelope.NONCE_SIZE)

    monkeypatch.setattr("sqlalchemy_kms_field.envelope.os.urandom", fixed_nonce)
    assert key.encrypt_text(plaintext, context, pad) == text
    assert key.encrypt_binary(plaintext, context, pad) == binary
    assert key.encrypt_many([plaintext], context, pad_to=pad) == [text]
    assert key.encrypt_many([plaintext], [context], pad_to=pad, binary=True) == [binary]


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
def test_decrypting_the_stored_value_gives_the_plaintext(vector: dict[str, Any]) -> None:
    key, _, plaintext, text, binary = _parts(vector)
    context = _context(vector)

    expected = ("kf2", vector["key_name"], vector["version"])
    assert envelope.parse(text) == envelope.parse(binary) == expected
    assert envelope.parse_header(text) == (vector["key_name"], vector["version"])
    assert envelope.is_ciphertext(text)
    assert envelope.is_ciphertext(binary)
    assert key.decrypt_text(text, context) == plaintext
    assert key.decrypt_binary(binary, context) == plaintext


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
def test_the_vectors_follow_the_documented_layout(vector: dict[str, Any]) -> None:
    """Decrypt with `cryptography` alone, as the format description says, not with our code."""
    key_bytes = bytes.fromhex(vector["key_hex"])
    header = f"kf2:{vector['key_name']}:{vector['version']}:"
    text: str = vector["text"]
    binary = bytes.fromhex(vector["binary_hex"])

    assert text.startswith(header)
    body = text[len(header) :]
    assert "=" not in body
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert binary == header.encode("ascii") + raw
    assert raw[:12] == bytes.fromhex(vector["nonce_hex"])
    aad = header.encode("ascii") + b"".join(
        _field(s)
        for s in [vector["table"], vector["column"], vector["codec"]]
        + [part for pair in vector["row"] for part in pair]
    )
    assert aad.hex() == vector["aad_hex"]
    padded = AESGCMSIV(key_bytes).decrypt(raw[:12], raw[12:], aad)
    pad = vector["pad"]
    assert len(padded) % max(pad, 1) == 0
    assert len(raw) == 12 + len(padded) + 16
    unpadded = padded.rstrip(b"\x00")
    assert unpadded[-1] == 0x80
    assert unpadded[:-1].hex() == vector["plaintext_hex"]


def test_random_nonces_differ_and_both_decrypt() -> None:
    key = DataKey("pii", 1, KEY)
    values = {key.encrypt_text(b"same plaintext", CTX) for _ in range(50)}
    assert len(values) == 50
    assert {key.decrypt_text(v, CTX) for v in values} == {b"same plaintext"}


# Known-answer vectors: kf1 (legacy, read only) --------------------------------------------------


@pytest.mark.parametrize("vector", KF1_VECTORS, ids=_vector_id)
def test_kf1_values_still_decrypt_whatever_the_context(vector: dict[str, Any]) -> None:
    key, nonce, plaintext, text, binary = _parts(vector)

    assert envelope.parse(text) == ("kf1", vector["key_name"], vector["version"])
    assert envelope.parse(binary) == ("kf1", vector["key_name"], vector["version"])
    assert envelope.is_ciphertext(text) and envelope.is_ciphertext(binary)
    # kf1 bound only its header: any context reads it (the engine rewrites it as kf2).
    for context in (CTX, envelope.encode_context("other", "place", "int"), b""):
        assert key.decrypt_text(text, context) == plaintext
        assert key.decrypt_binary(binary, context) == plaintext
    # What wrote it: the header as the only associated data, no padding.
    legacy = key.legacy_header.encode("ascii")
    assert key.legacy_header + envelope.b64encode(key._seal(plaintext, legacy, nonce)) == text


@pytest.mark.parametrize("vector", KF1_VECTORS, ids=_vector_id)
def test_kf1_vectors_follow_the_documented_layout(vector: dict[str, Any]) -> None:
    key_bytes = bytes.fromhex(vector["key_hex"])
    header = f"kf1:{vector['key_name']}:{vector['version']}:"
    body = vector["text"][len(header) :]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert bytes.fromhex(vector["binary_hex"]) == header.encode("ascii") + raw
    plaintext = AESGCMSIV(key_bytes).decrypt(raw[:12], raw[12:], header.encode("ascii"))
    assert plaintext.hex() == vector["plaintext_hex"]


def test_new_values_are_kf2() -> None:
    key = DataKey("pii", 5, KEY)
    assert envelope.FORMAT == "kf2" and envelope.FORMATS == ("kf1", "kf2")
    assert key.encrypt_text(b"x", CTX).startswith("kf2:pii:5:")
    assert key.encrypt_binary(b"x", CTX).startswith(b"kf2:pii:5:")
    assert envelope.header("pii", 5) == "kf2:pii:5:"
    assert envelope.header("pii", 5, "kf1") == "kf1:pii:5:"
    with pytest.raises(ConfigurationError, match="unknown format"):
        envelope.header("pii", 5, "kf3")


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_a_format_swap_fails_both_ways(binary: bool) -> None:
    """Relabelling kf2 as kf1 would drop the context check (a downgrade): it must not decrypt,
    and neither must a kf1 value relabelled kf2."""
    key = DataKey("pii", 1, KEY)
    kf2: str | bytes = (
        key.encrypt_binary(b"alice", CTX) if binary else key.encrypt_text(b"alice", CTX)
    )
    legacy = key.legacy_header.encode("ascii")
    body = key._seal(b"alice", legacy, bytes(12))
    kf1: str | bytes = legacy + body if binary else key.legacy_header + envelope.b64encode(body)
    assert _open(key, kf1, CTX) == b"alice"
    for value in (kf2, kf1):
        swapped = (b"kf1" if binary else "kf1") if value[:3] in ("kf2", b"kf2") else None
        swapped = swapped or (b"kf2" if binary else "kf2")
        with pytest.raises(DecryptionError, match="'pii' version 1"):
            _open(key, swapped + value[3:], CTX)  # type: ignore[operator]


def _open(key: DataKey, value: str | bytes, context: bytes) -> bytes:
    if isinstance(value, str):
        return key.decrypt_text(value, context)
    return key.decrypt_binary(value, context)


# The context a kf2 value is bound to ------------------------------------------------------------

PLACE = ("users", "email", "str", (("tenant_id", "42"), ("region", "eu")))


def _variants() -> list[tuple[str, tuple[str, str, str, tuple[tuple[str, str], ...]]]]:
    table, column, codec, row = PLACE
    return [
        ("another table", ("customers", column, codec, row)),
        ("another column", (table, "phone", codec, row)),
        ("another codec", (table, column, "json", row)),
        ("a table name's case", ("Users", column, codec, row)),
        ("another row value", (table, column, codec, (("tenant_id", "43"), ("region", "eu")))),
        ("another row field", (table, column, codec, (("tenant", "42"), ("region", "eu")))),
        ("row fields swapped", (table, column, codec, (("region", "eu"), ("tenant_id", "42")))),
        ("a row field dropped", (table, column, codec, (("tenant_id", "42"),))),
        ("a row field added", (table, column, codec, (*row, ("x", "")))),
        ("no row fields", (table, column, codec, ())),
    ]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize(("what", "place"), _variants(), ids=[v[0] for v in _variants()])
def test_a_value_moved_to_another_context_fails(
    binary: bool, what: str, place: tuple[str, str, str, tuple[tuple[str, str], ...]]
) -> None:
    key = DataKey("pii", 3, KEY)
    table, column, codec, row = PLACE
    home = envelope.encode_context(table, column, codec, row)
    value = key.encrypt_binary(b"alice", home) if binary else key.encrypt_text(b"alice", home)
    assert _open(key, value, home) == b"alice"

    elsewhere = envelope.encode_context(place[0], place[1], place[2], place[3])
    assert elsewhere != home
    with pytest.raises(DecryptionError) as raised:
        _open(key, value, elsewhere)
    message = str(raised.value)
    assert "data key 'pii' version 3" in message and "moved" in message
    assert "alice" not in message and KEY.hex() not in message


def test_context_fields_are_length_prefixed() -> None:
    assert envelope.encode_context("ab", "c", "str") == (
        b"\x00\x00\x00\x02ab" + b"\x00\x00\x00\x01c" + b"\x00\x00\x00\x03str"
    )
    assert envelope.encode_context("é", "c", "str").startswith(b"\x00\x00\x00\x02\xc3\xa9")
    pairs = [
        (("ab", "c", "str", ()), ("a", "bc", "str", ())),
        (("a", "b", "strx", ()), ("a", "b", "str", (("x", ""),))),  # no field spills over
        (("t", "c", "str", (("ab", "c"),)), ("t", "c", "str", (("a", "bc"),))),
        (("t", "c", "str", (("a", ""), ("", "b"))), ("t", "c", "str", (("a", "b"),))),
    ]
    key = DataKey("pii", 1, KEY)
    for one, other in pairs:
        first = envelope.encode_context(one[0], one[1], one[2], one[3])
        second = envelope.encode_context(other[0], other[1], other[2], other[3])
        assert first != second, (one, other)
        # Naively joined, these would be the same associated data.
        assert b"".join(s.encode() for s in one[:3]) + b"".join(
            a.encode() + b.encode() for a, b in one[3]
        ) == b"".join(s.encode() for s in other[:3]) + b"".join(
            a.encode() + b.encode() for a, b in other[3]
        )
        with pytest.raises(DecryptionError):
            key.decrypt_text(key.encrypt_text(b"x", first), second)


@pytest.mark.parametrize(
    ("table", "column", "codec"), [("", "c", "str"), ("t", "", "str"), ("t", "c", "")]
)
def test_a_context_needs_every_name(table: str, column: str, codec: str) -> None:
    with pytest.raises(ConfigurationError, match="non-empty"):
        envelope.encode_context(table, column, codec)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("users.email", ("users", "email")),
        (("users", "email"), ("users", "email")),
        (("app.users", "email"), ("app.users", "email")),  # dots: the tuple form
    ],
)
def test_context_name(given: Any, expected: tuple[str, str]) -> None:
    assert envelope.context_name(given) == expected


@pytest.mark.parametrize(
    "given", ["users", "a.b.c", ".email", "users.", "", ("users",), ("", "x"), ("a", 1), None]
)
def test_context_name_refuses_what_is_not_table_dot_column(given: Any) -> None:
    with pytest.raises(ConfigurationError, match="context"):
        envelope.context_name(given)


# Padding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 15, 16, 32, 48])
def test_padding_round_trips_every_length(size: int) -> None:
    for n in range(70):
        data = bytes([0x80, 0, 1]) * (n // 3) + b"\x00\x80"[: n % 3]  # ends like padding too
        padded = envelope.pad(data, size)
        assert len(padded) == envelope.padded_size(n, size)
        assert len(padded) > n
        if size > 1:
            assert len(padded) % size == 0
            assert len(padded) - n <= size
        else:
            assert len(padded) == n + 1
        assert envelope.unpad(padded) == data


@pytest.mark.parametrize(
    ("padded", "expected"),
    [
        (b"\x80", b""),
        (b"a\x80\x00\x00", b"a"),
        (b"\x80\x80", b"\x80"),
        (b"\x80\x00\x80\x00", b"\x80\x00"),
        (b"", None),
        (b"\x00\x00\x00", None),
        (b"abc", None),
        (b"abc\x80\x01", None),
        (b"abc\x81\x00", None),
    ],
)
def test_unpad(padded: bytes, expected: bytes | None) -> None:
    assert envelope.unpad(padded) == expected


def test_padding_hides_the_length_within_a_block() -> None:
    key = DataKey("pii", 1, KEY)
    context = envelope.encode_context("accounts", "is_vip", "bool")
    values = [key.encrypt_text(p, context, 16) for p in (b"true", b"false", b"", b"x" * 15)]
    assert len({len(v) for v in values}) == 1
    assert len(key.encrypt_text(b"x" * 16, context, 16)) > len(values[0])
    assert [key.decrypt_text(v, context) for v in values] == [b"true", b"false", b"", b"x" * 15]
    # The reader needs no padding setting: a value padded to 48 reads like one padded to 0.
    assert key.decrypt_text(key.encrypt_text(b"abc", context, 48), context) == b"abc"


@pytest.mark.parametrize("padded", [b"no marker", b"", b"\x00" * 16, b"abc\x80\x7f"])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_an_authentic_value_with_malformed_padding_fails(padded: bytes, binary: bool) -> None:
    """Only a holder of the key can make one; still, it must not read as a shortened value."""
    key = DataKey("pii", 2, KEY)
    body = key._seal(padded, key.header_bytes + CTX, bytes(12))
    value: str | bytes = (
        key.header_bytes + body if binary else key.header + envelope.b64encode(body)
    )
    with pytest.raises(DecryptionError, match="'pii' version 2: authenticated, but its padding"):
        _open(key, value, CTX)


# Header -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("kf2:pii:1:", ("kf2", "pii", 1)),
        ("kf1:pii:1:AAAA", ("kf1", "pii", 1)),
        ("kf2:customer.email-v2:42:xyz", ("kf2", "customer.email-v2", 42)),
        ("kf2:9:999999999:", ("kf2", "9", 999_999_999)),
        ("kf2:" + "a" * 63 + ":1:", ("kf2", "a" * 63, 1)),
        (b"kf2:pii:12:\x00\xff", ("kf2", "pii", 12)),
        (b"kf1:pii:12:\x00\xff", ("kf1", "pii", 12)),
        ("kf2:pii:0:AAAA", None),  # versions start at 1
        ("kf2:pii:01:AAAA", None),  # no leading zeros: one spelling per version
        ("kf2:pii:1000000000:AAAA", None),  # ten digits
        ("kf2:pii:-1:AAAA", None),
        ("kf2:pii:1", None),  # no final colon
        ("kf2::1:AAAA", None),
        ("kf2:-pii:1:AAAA", None),
        ("kf2:.pii:1:AAAA", None),
        ("kf2:p_i:1:AAAA", None),
        ("kf2:p i:1:AAAA", None),
        ("kf2:" + "a" * 64 + ":1:", None),
        ("kf3:pii:1:AAAA", None),
        ("kf0:pii:1:AAAA", None),
        ("KF2:pii:1:AAAA", None),
        ("KF1:pii:1:AAAA", None),
        (" kf2:pii:1:AAAA", None),
        ("alice@example.com", None),
        ("", None),
        (b"", None),
        (b"KF1:pii:1:", None),
    ],
)
def test_parse(value: str | bytes, expected: tuple[str, str, int] | None) -> None:
    assert envelope.parse(value) == expected
    assert envelope.parse_header(value) == (None if expected is None else expected[1:])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("kf1:pii:1:AAAA", True),
        ("kf2:pii:1:AAAA", True),
        ("KF1:pii:1:AAAA", True),  # another case: an altered header
        ("Kf2:pii:1:", True),
        (" kf1:pii:1:AAAA", True),  # leading white space
        ("\t\nkf2:x", True),
        ("kf3:pii:1:AAAA", True),  # a format we do not know (yet)
        ("kf10:", True),
        (b"KF1:pii:1:", True),
        (b" kf2:", True),
        ("kf:pii:1:", False),
        ("kf1", False),
        ("kf1 :", False),
        ("xkf1:pii:1:", False),
        ("k f1:", False),
        ("alice@example.com", False),
        ("", False),
        (b"\x00kf1:pii:1:", False),
    ],
)
def test_looks_like_header(value: str | bytes, expected: bool) -> None:
    assert envelope.looks_like_header(value) is expected


def test_header_and_key_names_are_checked() -> None:
    assert envelope.header("pii", 3) == "kf2:pii:3:"
    for version in (0, -1, 10**9):
        with pytest.raises(ConfigurationError, match="version"):
            envelope.header("pii", version)
    for name in ("", "a:b", "a b", "-a", ".a", "é", "a" * 64, "pii\n"):
        with pytest.raises(ConfigurationError, match="invalid data key name"):
            envelope.check_key_name(name)
    with pytest.raises(ConfigurationError):
        DataKey("pii", 1, KEY[:16])


def test_repr_of_a_data_key_names_it_and_nothing_else() -> None:
    assert repr(DataKey("pii", 3, KEY)) == "DataKey(name='pii', version=3)"


# Tampering --------------------------------------------------------------------------------------


def _decrypt_like_the_registry(value: str | bytes, keys: dict[tuple[str, int], DataKey]) -> bytes:
    """What a reader does: parse the header, pick that key version, decrypt. Any failure raises
    DecryptionError, a parse failure raises LookupError."""
    found = envelope.parse_header(value)
    if found is None:
        raise LookupError("no header")
    key = keys.get(found)
    if key is None:
        raise LookupError(f"no key {found}")
    return _open(key, value, CTX)


@pytest.fixture
def keys() -> dict[tuple[str, int], DataKey]:
    # Neighbouring names and versions share the key bytes: only the header tells them apart, so
    # a tampered header that still parses must fail authentication, not find another key.
    return {
        (name, version): DataKey(name, version, KEY)
        for name in ("pii", "pij", "pi", "piii", "Pii", "0ii", "p.i", "p-i")
        for version in range(1, 20)
    }


def test_changing_any_single_character_of_a_text_value_fails(
    keys: dict[tuple[str, int], DataKey],
) -> None:
    plaintext = b"alice@example.com"
    value = keys["pii", 1].encrypt_text(plaintext, CTX)
    assert _decrypt_like_the_registry(value, keys) == plaintext
    alphabet = set(B64URL + ":.=+/ \x00é")
    tried = 0
    for i, original in enumerate(value):
        for replacement in sorted(alphabet - {original}):
            tampered = value[:i] + replacement + value[i + 1 :]
            try:
                result = _decrypt_like_the_registry(tampered, keys)
            except (DecryptionError, LookupError):
                tried += 1
                continue
            pytest.fail(f"position {i}: {original!r} -> {replacement!r} decrypted to {result!r}")
    assert tried == len(value) * (len(alphabet) - 1) - sum(c not in alphabet for c in value)


def test_changing_any_bit_of_a_binary_value_fails(keys: dict[tuple[str, int], DataKey]) -> None:
    plaintext = bytes(range(40))
    value = keys["pii", 1].encrypt_binary(plaintext, CTX)
    for i in range(len(value)):
        for bit in range(8):
            tampered = bytearray(value)
            tampered[i] ^= 1 << bit
            with pytest.raises((DecryptionError, LookupError)):
                _decrypt_like_the_registry(bytes(tampered), keys)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_truncated_or_extended_values_fail(
    binary: bool, keys: dict[tuple[str, int], DataKey]
) -> None:
    key = keys["pii", 1]
    value: str | bytes = (
        key.encrypt_binary(b"secret", CTX) if binary else key.encrypt_text(b"secret", CTX)
    )
    for end in range(len(value)):
        with pytest.raises((DecryptionError, LookupError)):
            _decrypt_like_the_registry(value[:end], keys)
    extra: list[str | bytes] = [b"\x00", b"A"] if binary else ["A", "AA", "AAAA", "=", "=="]
    for suffix in extra:
        with pytest.raises((DecryptionError, LookupError)):
            _decrypt_like_the_registry(value + suffix, keys)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("new_header", "new_name", "new_version"),
    [
        ("kf2:pii:2:", "pii", 2),
        ("kf2:pii:11:", "pii", 11),
        ("kf2:pij:1:", "pij", 1),
        ("kf2:Pii:1:", "Pii", 1),
        ("kf2:piii:1:", "piii", 1),
    ],
)
def test_a_value_moved_to_another_header_fails_even_under_the_same_key_bytes(
    new_header: str, new_name: str, new_version: int
) -> None:
    original = DataKey("pii", 1, KEY)
    other = DataKey(new_name, new_version, KEY)  # same key bytes: only the header differs
    text = original.encrypt_text(b"alice@example.com", CTX)
    binary = original.encrypt_binary(b"alice@example.com", CTX)

    moved_text = new_header + text[len(original.header) :]
    moved_binary = new_header.encode() + binary[len(original.header_bytes) :]
    with pytest.raises(DecryptionError) as raised:
        other.decrypt_text(moved_text, CTX)
    message = str(raised.value)
    assert f"{new_name!r} version {new_version}" in message
    assert "alice" not in message
    assert KEY.hex() not in message
    with pytest.raises(DecryptionError):
        other.decrypt_binary(moved_binary, CTX)


def test_a_value_under_another_key_fails_naming_the_key_version() -> None:
    value = DataKey("pii", 1, KEY).encrypt_text(b"x", CTX)
    with pytest.raises(DecryptionError, match=r"data key 'pii' version 1: authentication failed"):
        DataKey("pii", 1, bytes(32)).decrypt_text(value, CTX)


# Canonical base64 ------------------------------------------------------------------------------


def test_b64_round_trips_every_length() -> None:
    for n in range(70):
        raw = bytes(range(n))
        encoded = envelope.b64encode(raw)
        assert "=" not in encoded
        assert set(encoded) <= set(B64URL)
        assert envelope.b64decode(encoded) == raw


@pytest.mark.parametrize(
    "body",
    [
        "AAE=",  # padding
        "AA==",
        "AB",  # non-zero padding bits: decodes to b"\x00" leniently
        "AAF",  # the same for two bytes
        "+/+/",  # the standard alphabet
        "AA AA",
        "AAAA\n",
        "A",  # impossible length
        "AAAAA",
        "éAAA",
    ],
)
def test_b64decode_rejects_non_canonical_text(body: str) -> None:
    with pytest.raises(ValueError):
        envelope.b64decode(body)


def _canonical_reference(body: str) -> bytes | None:
    """What b64decode must do, by the definition: decode leniently, accept only if encoding
    the result gives back exactly ``body``."""
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, binascii.Error):
        return None
    return raw if base64.urlsafe_b64encode(raw).decode().rstrip("=") == body else None


def test_b64decode_agrees_with_the_definition_on_random_strings() -> None:
    rng = random.Random(8452)
    alphabet = B64URL + "+/= \n.é"
    accepted = 0
    for _ in range(30000):
        if rng.random() < 0.5:  # mostly-valid strings, one character perhaps changed
            body = envelope.b64encode(rng.randbytes(rng.randrange(0, 40)))
            if body and rng.random() < 0.7:
                i = rng.randrange(len(body))
                body = body[:i] + rng.choice(alphabet) + body[i + 1 :]
        else:
            body = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        expected = _canonical_reference(body)
        try:
            got: bytes | None = envelope.b64decode(body)
        except ValueError:
            got = None
        assert got == expected, body
        accepted += got is not None
    assert 5000 < accepted < 25000  # both outcomes well exercised


def test_encrypt_many_matches_one_at_a_time() -> None:
    key = DataKey("pii", 3, KEY)
    plaintexts = [b"", b"a", "é".encode(), b"x" * 1000] + [bytes([i]) * i for i in range(50)]
    texts = key.encrypt_many(plaintexts, CTX, pad_to=16)
    blobs = key.encrypt_many(plaintexts, CTX, binary=True)
    assert [key.decrypt_text(t, CTX) for t in texts] == plaintexts
    assert [key.decrypt_binary(b, CTX) for b in blobs] == plaintexts
    assert all(t.startswith("kf2:pii:3:") for t in texts)
    assert all(b.startswith(b"kf2:pii:3:") for b in blobs)
    assert all(len(envelope.b64decode(t[10:])) % 16 == (12 + 16) % 16 for t in texts)
    # One context per value (row-bound columns): each value is bound to its own.
    contexts = [envelope.encode_context("t", "c", "str", [("id", str(i))]) for i in range(54)]
    rows = key.encrypt_many(plaintexts, contexts)
    assert [key.decrypt_text(v, c) for v, c in zip(rows, contexts, strict=True)] == plaintexts
    with pytest.raises(DecryptionError):
        key.decrypt_text(rows[1], contexts[2])
    # Every value has its own nonce (the first 12 bytes of the body).
    nonces = {envelope.b64decode(t[len(key.header) :])[:12] for t in texts}
    nonces |= {b[len(key.header_bytes) : len(key.header_bytes) + 12] for b in blobs}
    assert len(nonces) == 2 * len(plaintexts)


def test_a_non_canonical_spelling_of_a_valid_body_does_not_decrypt() -> None:
    key = DataKey("pii", 1, KEY)
    plaintext = b"alice@example.co"  # 12 + 17 (with the marker) + 16 = 45 bytes: 0 spare bits
    rejected = 0
    for extra in range(4):  # body lengths with 0, 2 and 4 spare bits
        value = key.encrypt_text(plaintext + b"!" * extra, CTX)
        body = value[len(key.header) :]
        raw = envelope.b64decode(body)
        variants = {
            body[:-1] + c
            for c in B64URL
            if c != body[-1]
            and base64.urlsafe_b64decode(body[:-1] + c + "=" * (-len(body) % 4)) == raw
        }
        variants.add(body + "=" * (-len(body) % 4))
        variants.add(body.replace("-", "+").replace("_", "/"))  # the standard alphabet
        variants.discard(body)
        for variant in variants:
            with pytest.raises(DecryptionError, match="not valid base64url"):
                key.decrypt_text(key.header + variant, CTX)
            rejected += 1
        assert key.decrypt_text(value, CTX) == plaintext + b"!" * extra
    assert rejected >= 20  # 15 + 3 lenient spellings of the last character, padding, ...


# is_ciphertext and double encryption ------------------------------------------------------------


def test_is_ciphertext() -> None:
    key = DataKey("pii", 1, KEY)
    text = key.encrypt_text(b"", CTX)
    binary = key.encrypt_binary(b"", CTX)
    assert envelope.is_ciphertext(text)
    assert envelope.is_ciphertext(binary)
    assert envelope.is_ciphertext(key.encrypt_text(b"x" * 1000, CTX))
    assert envelope.is_ciphertext(KF1_VECTORS[0]["text"])

    not_ciphertext: list[str | bytes] = [
        "kf2:pii:1:",  # header only
        key.header + envelope.b64encode(bytes(27)),  # a body one byte short of nonce + tag
        key.header_bytes + bytes(27),
        text[:12] + "!" + text[13:],  # not base64url
        text + "=",
        "kf2:pii:0:" + text[10:],
        "kf3" + text[3:],
        "alice@example.com",
        "",
        b"",
        "KF2" + text[3:],
        b"kf2:pii:1:",
    ]
    for value in not_ciphertext:
        assert not envelope.is_ciphertext(value), value


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_refuses_to_encrypt_a_value_that_is_already_ciphertext(binary: bool) -> None:
    key = DataKey("pii", 4, KEY)
    value: str | bytes = (
        key.encrypt_binary(b"secret", CTX) if binary else key.encrypt_text(b"secret", CTX)
    )
    with pytest.raises(EncryptionError, match=r"already ciphertext \(data key 'pii' version 4\)"):
        envelope.refuse_ciphertext(value)
    # Something that merely starts like a header is not ciphertext and may be encrypted.
    envelope.refuse_ciphertext(value[:12])
    envelope.refuse_ciphertext("kf2:pii:1: hello")
    kf1 = KF1_VECTORS[1]
    with pytest.raises(EncryptionError, match=r"already ciphertext \(data key 'pii' version 1\)"):
        envelope.refuse_ciphertext(kf1["text"])
    with pytest.raises(EncryptionError):
        envelope.refuse_ciphertext(bytes.fromhex(kf1["binary_hex"]))

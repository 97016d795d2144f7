"""The stored-value format: known-answer vectors, header parsing, tampering, canonical base64."""

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

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "vectors.json").read_text(encoding="utf-8")
)["vectors"]
B64URL = string.ascii_letters + string.digits + "-_"

KEY = bytes(range(32))


def _vector_id(vector: dict[str, Any]) -> str:
    return str(vector["description"])


def _parts(vector: dict[str, Any]) -> tuple[DataKey, bytes, bytes, str, bytes]:
    key = DataKey(vector["key_name"], vector["version"], bytes.fromhex(vector["key_hex"]))
    return (
        key,
        bytes.fromhex(vector["nonce_hex"]),
        bytes.fromhex(vector["plaintext_hex"]),
        vector["text"],
        bytes.fromhex(vector["binary_hex"]),
    )


# Known-answer vectors -------------------------------------------------------------------------


def test_the_vectors_cover_the_edges() -> None:
    assert len(VECTORS) >= 5
    plaintexts = [bytes.fromhex(v["plaintext_hex"]) for v in VECTORS]
    assert b"" in plaintexts
    assert bytes(range(256)) in plaintexts
    assert max(v["version"] for v in VECTORS) == 999_999_999
    assert max(len(v["key_name"]) for v in VECTORS) == 63


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
def test_encrypting_with_the_vector_nonce_gives_the_stored_value(
    vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, nonce, plaintext, text, binary = _parts(vector)

    assert key.header + envelope.b64encode(key._seal(plaintext, nonce)) == text
    assert key.header_bytes + key._seal(plaintext, nonce) == binary

    # The public path draws its nonce from os.urandom: pin it and expect the same bytes.
    def fixed_nonce(n: int) -> bytes:
        assert n == envelope.NONCE_SIZE
        return nonce

    monkeypatch.setattr(envelope.os, "urandom", fixed_nonce)
    assert key.encrypt_text(plaintext) == text
    assert key.encrypt_binary(plaintext) == binary


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
def test_decrypting_the_stored_value_gives_the_plaintext(vector: dict[str, Any]) -> None:
    key, _, plaintext, text, binary = _parts(vector)

    assert envelope.parse_header(text) == (vector["key_name"], vector["version"])
    assert envelope.parse_header(binary) == (vector["key_name"], vector["version"])
    assert envelope.is_ciphertext(text)
    assert envelope.is_ciphertext(binary)
    assert key.decrypt_text(text) == plaintext
    assert key.decrypt_binary(binary) == plaintext


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_id)
def test_the_vectors_follow_the_documented_layout(vector: dict[str, Any]) -> None:
    """Decrypt with `cryptography` alone, as the format description says, not with our code."""
    key_bytes = bytes.fromhex(vector["key_hex"])
    header = f"kf1:{vector['key_name']}:{vector['version']}:"
    text: str = vector["text"]
    binary = bytes.fromhex(vector["binary_hex"])

    assert text.startswith(header)
    body = text[len(header) :]
    assert "=" not in body
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert binary == header.encode("ascii") + raw
    assert raw[:12] == bytes.fromhex(vector["nonce_hex"])
    assert len(raw) == 12 + len(bytes.fromhex(vector["plaintext_hex"])) + 16
    plaintext = AESGCMSIV(key_bytes).decrypt(raw[:12], raw[12:], header.encode("ascii"))
    assert plaintext.hex() == vector["plaintext_hex"]


def test_random_nonces_differ_and_both_decrypt() -> None:
    key = DataKey("pii", 1, KEY)
    values = {key.encrypt_text(b"same plaintext") for _ in range(50)}
    assert len(values) == 50
    assert {key.decrypt_text(v) for v in values} == {b"same plaintext"}


# Header ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("kf1:pii:1:", ("pii", 1)),
        ("kf1:pii:1:AAAA", ("pii", 1)),
        ("kf1:customer.email-v2:42:xyz", ("customer.email-v2", 42)),
        ("kf1:9:999999999:", ("9", 999_999_999)),
        ("kf1:" + "a" * 63 + ":1:", ("a" * 63, 1)),
        (b"kf1:pii:12:\x00\xff", ("pii", 12)),
        ("kf1:pii:0:AAAA", None),  # versions start at 1
        ("kf1:pii:01:AAAA", None),  # no leading zeros: one spelling per version
        ("kf1:pii:1000000000:AAAA", None),  # ten digits
        ("kf1:pii:-1:AAAA", None),
        ("kf1:pii:1", None),  # no final colon
        ("kf1::1:AAAA", None),
        ("kf1:-pii:1:AAAA", None),
        ("kf1:.pii:1:AAAA", None),
        ("kf1:p_i:1:AAAA", None),
        ("kf1:p i:1:AAAA", None),
        ("kf1:" + "a" * 64 + ":1:", None),
        ("kf2:pii:1:AAAA", None),
        ("KF1:pii:1:AAAA", None),
        (" kf1:pii:1:AAAA", None),
        ("alice@example.com", None),
        ("", None),
        (b"", None),
        (b"KF1:pii:1:", None),
    ],
)
def test_parse_header(value: str | bytes, expected: tuple[str, int] | None) -> None:
    assert envelope.parse_header(value) == expected


def test_header_and_key_names_are_checked() -> None:
    assert envelope.header("pii", 3) == "kf1:pii:3:"
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
    return key.decrypt_text(value) if isinstance(value, str) else key.decrypt_binary(value)


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
    value = keys["pii", 1].encrypt_text(plaintext)
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
    value = keys["pii", 1].encrypt_binary(plaintext)
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
    value: str | bytes = key.encrypt_binary(b"secret") if binary else key.encrypt_text(b"secret")
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
        ("kf1:pii:2:", "pii", 2),
        ("kf1:pii:11:", "pii", 11),
        ("kf1:pij:1:", "pij", 1),
        ("kf1:Pii:1:", "Pii", 1),
        ("kf1:piii:1:", "piii", 1),
    ],
)
def test_a_value_moved_to_another_header_fails_even_under_the_same_key_bytes(
    new_header: str, new_name: str, new_version: int
) -> None:
    original = DataKey("pii", 1, KEY)
    other = DataKey(new_name, new_version, KEY)  # same key bytes: only the header differs
    text = original.encrypt_text(b"alice@example.com")
    binary = original.encrypt_binary(b"alice@example.com")

    moved_text = new_header + text[len(original.header) :]
    moved_binary = new_header.encode() + binary[len(original.header_bytes) :]
    with pytest.raises(DecryptionError) as raised:
        other.decrypt_text(moved_text)
    message = str(raised.value)
    assert f"{new_name!r} version {new_version}" in message
    assert "alice" not in message
    assert KEY.hex() not in message
    with pytest.raises(DecryptionError):
        other.decrypt_binary(moved_binary)


def test_a_value_under_another_key_fails_naming_the_key_version() -> None:
    value = DataKey("pii", 1, KEY).encrypt_text(b"x")
    with pytest.raises(DecryptionError, match=r"data key 'pii' version 1: authentication failed"):
        DataKey("pii", 1, bytes(32)).decrypt_text(value)


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
    texts = key.encrypt_many(plaintexts)
    blobs = key.encrypt_many(plaintexts, binary=True)
    assert [key.decrypt_text(t) for t in texts] == plaintexts
    assert [key.decrypt_binary(b) for b in blobs] == plaintexts
    assert all(t.startswith("kf1:pii:3:") for t in texts)
    assert all(b.startswith(b"kf1:pii:3:") for b in blobs)
    # Every value has its own nonce (the first 12 bytes of the body).
    nonces = {envelope.b64decode(t[len(key.header) :])[:12] for t in texts}
    nonces |= {b[len(key.header_bytes) : len(key.header_bytes) + 12] for b in blobs}
    assert len(nonces) == 2 * len(plaintexts)


def test_a_non_canonical_spelling_of_a_valid_body_does_not_decrypt() -> None:
    key = DataKey("pii", 1, KEY)
    plaintext = b"alice@example.com"  # 12 + 17 + 16 = 45 bytes: 60 characters, 0 spare bits
    rejected = 0
    for extra in range(4):  # body lengths with 0, 2 and 4 spare bits
        value = key.encrypt_text(plaintext + b"!" * extra)
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
                key.decrypt_text(key.header + variant)
            rejected += 1
        assert key.decrypt_text(value) == plaintext + b"!" * extra
    assert rejected >= 20  # 15 + 3 lenient spellings of the last character, padding, ...


# is_ciphertext and double encryption ------------------------------------------------------------


def test_is_ciphertext() -> None:
    key = DataKey("pii", 1, KEY)
    text = key.encrypt_text(b"")
    binary = key.encrypt_binary(b"")
    assert envelope.is_ciphertext(text)
    assert envelope.is_ciphertext(binary)
    assert envelope.is_ciphertext(key.encrypt_text(b"x" * 1000))

    not_ciphertext: list[str | bytes] = [
        "kf1:pii:1:",  # header only
        text[:-1],  # body one character short of nonce + tag
        binary[:-1],
        text[:12] + "!" + text[13:],  # not base64url
        text + "=",
        "kf1:pii:0:" + text[10:],
        "alice@example.com",
        "",
        b"",
        "KF1" + text[3:],
        b"kf1:pii:1:",
    ]
    for value in not_ciphertext:
        assert not envelope.is_ciphertext(value), value


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_refuses_to_encrypt_a_value_that_is_already_ciphertext(binary: bool) -> None:
    key = DataKey("pii", 4, KEY)
    value: str | bytes = key.encrypt_binary(b"secret") if binary else key.encrypt_text(b"secret")
    with pytest.raises(EncryptionError, match=r"already ciphertext \(data key 'pii' version 4\)"):
        envelope.refuse_ciphertext(value)
    # Something that merely starts like a header is not ciphertext and may be encrypted.
    envelope.refuse_ciphertext(value[:12])
    envelope.refuse_ciphertext("kf1:pii:1: hello")

"""The stored-value format and the AEAD around it. No SQLAlchemy here.

A stored value is an ASCII header followed by the AEAD output::

    kf2:<key name>:<key version>:<body>

``kf2`` names format version 2. ``<body>`` is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``
of AES-256-GCM-SIV (RFC 8452). Text columns store the body as base64url without padding; binary
columns store the header bytes followed by the raw body.

What a kf2 value is bound to (its associated data, AAD) is the header followed by the value's
*context*: the logical table, the logical column, the codec (how the Python value became bytes,
so a Boolean never reads as an Integer) and, where a column asks for it, values of other columns
of the same row. Each field is length-prefixed (4 bytes, big endian, then UTF-8), so
``("ab", "c")`` and ``("a", "bc")`` never encode alike::

    aad = header || u32(len(table)) || table || u32(len(column)) || column
                 || u32(len(codec)) || codec [|| u32(len(name)) || name || u32(len(v)) || v ...]

Editing the key name or version, or moving a value to another table, column, type or row,
makes decryption fail. The plaintext inside a kf2 value is padded: ``data || 0x80 || 0x00*k``
(ISO/IEC 7816-4), with ``k`` chosen so the length is a multiple of the column's ``pad`` (0: no
zeros, just the marker), so that a reader never needs to know the padding setting.

Format 1 (``kf1:``) bound only the header (AAD = header, no padding). kf1 values stay readable;
re-encryption moves them to kf2. Because the header is plain ASCII, SQL alone can count the rows
on each key version (``WHERE col LIKE 'kf2:pii:2:%'``).

AES-GCM-SIV derives a fresh key per nonce, so random 96-bit nonces do not hit GCM's 2^32
messages-per-key limit, and a repeated nonce would only reveal that two plaintexts are equal.
"""

from __future__ import annotations

import binascii
import hmac
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from .constants import CODECS as CODECS
from .exc import ConfigurationError, DecryptionError, EncryptionError

FORMAT: Final = "kf2"
LEGACY_FORMAT: Final = "kf1"
FORMATS: Final = (LEGACY_FORMAT, FORMAT)
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
KEY_SIZE: Final = 32
MAX_VERSION_DIGITS: Final = 9
PAD_MARKER: Final = 0x80

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
_HEADER = re.compile(r"(kf[12]):([A-Za-z0-9][A-Za-z0-9.-]{0,62}):([1-9][0-9]{0,8}):")
_HEADER_BYTES = re.compile(rb"(kf[12]):([A-Za-z0-9][A-Za-z0-9.-]{0,62}):([1-9][0-9]{0,8}):")
# What a damaged header of ours may look like: any case, leading white space, another digit.
_HEADER_LIKE = re.compile(r"\s*kf\d+:", re.IGNORECASE)
_HEADER_LIKE_BYTES = re.compile(rb"\s*kf\d+:", re.IGNORECASE)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def check_key_name(name: str) -> str:
    """Return ``name`` if it can be a data key name, else raise ConfigurationError."""
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid data key name {name!r}: use 1 to 63 characters of letters, digits, "
            "'.' and '-', starting with a letter or digit"
        )
    return name


_TENANT_PART = re.compile(r"\.[th]\.")


def check_new_key_name(name: str) -> str:
    """``check_key_name``, and not a name of the form tenant keys take (``pii.t.42``,
    ``pii.h.<hash>``): such a key would share its header, and so every census, with a tenant's."""
    check_key_name(name)
    if _TENANT_PART.search(name):
        raise ConfigurationError(
            f"invalid key name {name!r}: names containing '.t.' or '.h.' are those of tenant "
            "keys (data key 'pii' with tenant= names tenant 42's key 'pii.t.42'); choose another"
        )
    return name


def header(name: str, version: int, fmt: str = FORMAT) -> str:
    """The header of values written under data key ``name`` version ``version``."""
    if not 1 <= version < 10**MAX_VERSION_DIGITS:
        raise ConfigurationError(f"data key version must be 1 to 999999999, got {version}")
    if fmt not in FORMATS:
        raise ConfigurationError(f"unknown format {fmt!r}; use one of {FORMATS}")
    return f"{fmt}:{check_key_name(name)}:{version}:"


def parse(value: str | bytes) -> tuple[str, str, int] | None:
    """Return ``(format, key name, version)`` if ``value`` starts with our header, else None."""
    if isinstance(value, str):
        m = _HEADER.match(value)
        return (m.group(1), m.group(2), int(m.group(3))) if m else None
    mb = _HEADER_BYTES.match(value)
    if mb is None:
        return None
    return mb.group(1).decode("ascii"), mb.group(2).decode("ascii"), int(mb.group(3))


def parse_header(value: str | bytes) -> tuple[str, int] | None:
    """Return ``(key name, version)`` if ``value`` starts with our header (any format)."""
    found = parse(value)
    return None if found is None else (found[1], found[2])


def looks_like_header(value: str | bytes) -> bool:
    """True if ``value`` starts like a header of ours, possibly damaged (case, spaces, digit).

    A plaintext-migration reader must refuse such a value rather than return it as plaintext:
    it is almost certainly a ciphertext that was altered.
    """
    if isinstance(value, str):
        return _HEADER_LIKE.match(value) is not None
    return _HEADER_LIKE_BYTES.match(value) is not None


def is_ciphertext(value: str | bytes) -> bool:
    """True if ``value`` is a complete value in our format (header and a body long enough)."""
    if isinstance(value, str):
        m = _HEADER.match(value)
        if not m:
            return False
        body = value[m.end() :]
        return bool(_BASE64URL.fullmatch(body)) and len(body) >= _encoded_len(NONCE_SIZE + TAG_SIZE)
    mb = _HEADER_BYTES.match(value)
    return mb is not None and len(value) - mb.end() >= NONCE_SIZE + TAG_SIZE


def padded_size(size: int, pad: int) -> int:
    """Bytes a plaintext of ``size`` bytes takes inside a kf2 value padded to ``pad``."""
    size += 1  # the marker
    return size if pad <= 1 else -(-size // pad) * pad


def text_length(plaintext_bytes: int, name: str, pad: int = 0) -> int:
    """Characters a text column needs for a plaintext of at most ``plaintext_bytes`` bytes."""
    head = len(FORMAT) + len(name) + MAX_VERSION_DIGITS + 3
    return head + _encoded_len(NONCE_SIZE + padded_size(plaintext_bytes, pad) + TAG_SIZE)


def binary_length(plaintext_bytes: int, name: str, pad: int = 0) -> int:
    """Bytes a binary column needs for a plaintext of at most ``plaintext_bytes`` bytes."""
    head = len(FORMAT) + len(name) + MAX_VERSION_DIGITS + 3
    return head + NONCE_SIZE + padded_size(plaintext_bytes, pad) + TAG_SIZE


def _encoded_len(n: int) -> int:
    return (4 * n + 2) // 3


# Context -----------------------------------------------------------------------------------


def _field(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def encode_context(
    table: str, column: str, codec: str, row: Iterable[tuple[str, str]] = ()
) -> bytes:
    """The context part of a kf2 value's associated data (see the module docstring).

    ``row``: (column name, value as text) of each other column of the row the value is bound to,
    in the order the column declares them.
    """
    for what, text in (("table", table), ("column", column), ("codec", codec)):
        if not isinstance(text, str) or not text:
            raise ConfigurationError(f"the context needs a non-empty {what} name")
    out = _field(table) + _field(column) + _field(codec)
    for name, value in row:
        out += _field(name) + _field(value)
    return out


# Codecs: how a Python value became bytes. Part of the context, so a value of one type never
# decodes as another. The pads are the defaults for types with few possible values, so that a
# value's length does not give it away (a string column pads only if asked).
# CODECS (constants.py, so that the CLI's --help needs no SQLAlchemy): str, bytes, json, ...
DEFAULT_PADS: Final = {
    "bool": 16, "int": 16, "float": 32, "decimal": 32, "date": 16, "datetime": 48, "time": 16,
    "interval": 32, "uuid": 0, "enum": 32,
}  # fmt: skip


def context_name(context: str | tuple[str, str]) -> tuple[str, str]:
    """``"users.email"`` or ``("users", "email")`` as ``(table, column)``, checked."""
    if isinstance(context, str):
        table, dot, column = context.partition(".")
        if not dot or "." in column:
            raise ConfigurationError(
                f"context={context!r}: write it as 'table.column' (one dot), or pass a "
                "(table, column) tuple for names that contain dots"
            )
    elif isinstance(context, tuple) and len(context) == 2:
        table, column = context
    else:
        raise ConfigurationError(
            f"context must be 'table.column' or (table, column), got {context!r}"
        )
    if not (isinstance(table, str) and isinstance(column, str) and table and column):
        raise ConfigurationError(f"context={context!r}: table and column must be non-empty")
    return table, column


# Padding -----------------------------------------------------------------------------------


def pad(data: bytes, size: int) -> bytes:
    """``data || 0x80 || 0x00*k``, a multiple of ``size`` bytes long (``size`` <= 1: no zeros)."""
    if size <= 1:
        return data + b"\x80"
    return data + b"\x80" + bytes(padded_size(len(data), size) - len(data) - 1)


def unpad(data: bytes) -> bytes | None:
    """The data before the padding, or None if the padding is malformed."""
    if data[-1:] == b"\x80":  # no zeros after the marker (pad=0, or a length that fit)
        return data[:-1]
    end = len(data.rstrip(b"\x00")) - 1
    if end < 0 or data[end] != PAD_MARKER:
        return None
    return data[:end]


# base64url ---------------------------------------------------------------------------------

# binascii directly: the base64 module's wrappers cost more than the conversion itself.
# To the standard alphabet for a strict a2b_base64; '+', '/' and '=' in the input become a
# character strict mode refuses, so that only the url-safe alphabet decodes.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_PADDING = (b"", None, b"==", b"=")  # by len % 4; a length of 4k+1 is never base64
# Canonical encodings leave the unused low bits of the last character zero: with 2 (3)
# characters in the last group, 4 (2) bits are unused, so it must be one of these.
_LAST_CHAR = (b"", b"", frozenset(b"AQgw"), frozenset(b"AEIMQUYcgkosw048"))


def _b64url(raw: bytes) -> bytes:
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


def b64encode(raw: bytes) -> str:
    return _b64url(raw).decode("ascii")


def b64decode(body: str) -> bytes:
    """Strict base64url without padding: any character or bit out of place is an error.

    Exactly the strings ``b64encode`` can produce decode: no padding, no whitespace, no
    characters of the standard alphabet, no non-zero unused bits in the last character.
    """
    try:
        data = body.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("not base64url") from None
    rest = len(data) % 4
    if rest == 1:
        raise ValueError("not base64url")
    if rest and data[-1] not in _LAST_CHAR[rest]:
        raise ValueError("not canonical base64url")
    try:  # strict mode refuses any character outside the alphabet (white space included)
        return binascii.a2b_base64(data.translate(_TO_STANDARD) + _PADDING[rest], strict_mode=True)  # type: ignore[operator]
    except binascii.Error:
        raise ValueError("not base64url") from None


class DataKey:
    """One version of a data key, unwrapped, ready to encrypt and decrypt.

    The key bytes live only inside the AEAD object; the repr shows the name and version.
    ``context`` arguments are the bytes of :func:`encode_context`; ``pad`` is the padding size.
    """

    __slots__ = ("_aead", "header", "header_bytes", "legacy_header", "name", "version")

    def __init__(self, name: str, version: int, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ConfigurationError(
                f"data key {name!r} version {version} is {len(key)} bytes, expected {KEY_SIZE}"
            )
        self.name = name
        self.version = version
        self.header = header(name, version)
        self.header_bytes = self.header.encode("ascii")
        self.legacy_header = header(name, version, LEGACY_FORMAT)
        self._aead = AESGCMSIV(key)

    def __repr__(self) -> str:
        return f"DataKey(name={self.name!r}, version={self.version})"

    # Encryption ---------------------------------------------------------------------------

    def seal(self, plaintext: bytes, context: bytes, pad_to: int = 0) -> bytes:
        """The kf2 body: ``nonce || AES-GCM-SIV(padded plaintext, aad = header || context)``."""
        return self._seal(
            pad(plaintext, pad_to), self.header_bytes + context, os.urandom(NONCE_SIZE)
        )

    def _seal(self, padded: bytes, aad: bytes, nonce: bytes) -> bytes:
        # Separate from seal() so that known-answer tests can fix the nonce.
        return nonce + self._aead.encrypt(nonce, padded, aad)

    def encrypt_text(self, plaintext: bytes, context: bytes, pad_to: int = 0) -> str:
        return self.header + _b64url(self.seal(plaintext, context, pad_to)).decode("ascii")

    def encrypt_binary(self, plaintext: bytes, context: bytes, pad_to: int = 0) -> bytes:
        return self.header_bytes + self.seal(plaintext, context, pad_to)

    def encrypt_many(
        self,
        plaintexts: Sequence[bytes],
        contexts: Sequence[bytes] | bytes,
        *,
        pad_to: int = 0,
        binary: bool = False,
    ) -> list[Any]:
        """``encrypt_text`` (or ``encrypt_binary``) of each plaintext, in one loop.

        ``contexts``: one context for all values, or one per value (row-bound columns). For
        batch jobs: the nonces come from one ``os.urandom`` call and the per-value method calls
        are gone, about a fifth of the cost.
        """
        nonces = os.urandom(NONCE_SIZE * len(plaintexts))
        seal, head, head_bytes = self._seal, self.header, self.header_bytes
        if isinstance(contexts, bytes):
            aads: Sequence[bytes] = [head_bytes + contexts] * len(plaintexts)
        else:
            aads = [head_bytes + c for c in contexts]
        out: list[Any] = []
        for i, plaintext in enumerate(plaintexts):
            aad = aads[i]
            body = seal(pad(plaintext, pad_to), aad, nonces[NONCE_SIZE * i : NONCE_SIZE * (i + 1)])
            out.append(head_bytes + body if binary else head + _b64url(body).decode("ascii"))
        return out

    def text_encrypter(self, context: bytes, pad_to: int = 0) -> Callable[[bytes], str]:
        """``encrypt_text`` with ``context`` and ``pad_to`` fixed, for a column's hot path.

        The associated data (header || context) and the padding are worked out once here,
        not once per value: a column keeps one encrypter per key version.
        """
        head, aad, encrypt, urandom = (
            self.header,
            self.header_bytes + context,
            self._aead.encrypt,
            os.urandom,
        )
        b2a, urlsafe = binascii.b2a_base64, _TO_URLSAFE
        if pad_to > 1:

            def encrypt_padded(plaintext: bytes) -> str:
                nonce = urandom(NONCE_SIZE)
                body = nonce + encrypt(nonce, pad(plaintext, pad_to), aad)
                return head + b2a(body, newline=False).translate(urlsafe).rstrip(b"=").decode(
                    "ascii"
                )

            return encrypt_padded

        def encrypt_text(plaintext: bytes) -> str:
            nonce = urandom(NONCE_SIZE)
            body = nonce + encrypt(nonce, plaintext + b"\x80", aad)  # pad 0: the marker alone
            return head + b2a(body, newline=False).translate(urlsafe).rstrip(b"=").decode("ascii")

        return encrypt_text

    def binary_encrypter(self, context: bytes, pad_to: int = 0) -> Callable[[bytes], bytes]:
        """``encrypt_binary`` with ``context`` and ``pad_to`` fixed (see ``text_encrypter``)."""
        head, aad, encrypt, urandom = (
            self.header_bytes,
            self.header_bytes + context,
            self._aead.encrypt,
            os.urandom,
        )

        def encrypt_binary(plaintext: bytes) -> bytes:
            nonce = urandom(NONCE_SIZE)
            return head + nonce + encrypt(nonce, pad(plaintext, pad_to), aad)

        return encrypt_binary

    # Decryption ---------------------------------------------------------------------------

    def text_decrypter(self, context: bytes) -> Callable[[str], bytes]:
        """``decrypt_text`` with ``context`` fixed, for a column's hot path (kf2 and kf1).

        Only success is inlined: any value it cannot open goes to ``decrypt_text``, which
        raises the error naming what is wrong, so both always agree.
        """
        head, legacy = self.header, self.legacy_header
        start = len(head)  # kf1 and kf2 headers are as long
        aad, legacy_aad = self.header_bytes + context, legacy.encode("ascii")
        decrypt, general = self._aead.decrypt, self.decrypt_text

        def decrypt_text(value: str) -> bytes:
            try:
                if value.startswith(head):
                    body = b64decode(value[start:])
                    padded = decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], aad)
                    if padded[-1:] == b"\x80":  # the marker alone (see unpad)
                        return padded[:-1]
                    data = unpad(padded)
                    if data is not None:
                        return data
                elif value.startswith(legacy):
                    body = b64decode(value[start:])
                    return decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], legacy_aad)
            except (ValueError, InvalidTag):  # a short nonce is a ValueError
                pass
            return general(value, context)

        return decrypt_text

    def open(self, body: bytes, context: bytes | None) -> bytes:
        """Decrypt a body; ``context`` None means a kf1 body (header-only AAD, no padding)."""
        if len(body) < NONCE_SIZE + TAG_SIZE:
            raise self._error("the value is truncated")
        aad = self.legacy_header.encode("ascii") if context is None else self.header_bytes + context
        try:
            padded = self._aead.decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], aad)
        except InvalidTag:
            raise self._error(
                "authentication failed (the stored value was altered, moved from another "
                "table, column, type or row, or was not written under this key version)"
            ) from None
        if context is None:
            return padded
        data = unpad(padded)
        if data is None:
            raise self._error("authenticated, but its padding is malformed")
        return data

    def decrypt_text(self, value: str, context: bytes) -> bytes:
        """Decrypt a text value under this key (kf2 with ``context``, or kf1)."""
        if value.startswith(self.header):
            start, ctx = len(self.header), context
        elif value.startswith(self.legacy_header):
            start, ctx = len(self.legacy_header), None
        else:
            raise self._error("the value's header is not this key version's")
        try:
            body = b64decode(value[start:])
        except ValueError:
            raise self._error("the body is not valid base64url") from None
        return self.open(body, ctx)

    def decrypt_binary(self, value: bytes, context: bytes) -> bytes:
        """Decrypt a binary value under this key (kf2 with ``context``, or kf1)."""
        if value.startswith(self.header_bytes):
            return self.open(value[len(self.header_bytes) :], context)
        legacy = self.legacy_header.encode("ascii")
        if value.startswith(legacy):
            return self.open(value[len(legacy) :], None)
        raise self._error("the value's header is not this key version's")

    def _error(self, reason: str) -> DecryptionError:
        return DecryptionError(
            f"cannot decrypt a value under data key {self.name!r} version {self.version}: {reason}"
        )


def refuse_ciphertext(value: str | bytes) -> None:
    """Invariant 2: a value that is already our ciphertext must not be encrypted again."""
    if is_ciphertext(value):
        found = parse_header(value)
        assert found is not None
        raise EncryptionError(
            f"refusing to encrypt a value that is already ciphertext (data key {found[0]!r} "
            f"version {found[1]}); copy the stored value as it is, or decrypt it first"
        )


class IndexKey:
    """One version of a blind-index key: HMAC-SHA256 over normalized plaintext.

    A blind index's values are bound to their place: each index computes its MAC under a key
    of its own, derived once from this key and the index's context (logical table and column,
    normalizer, bits) with HKDF-SHA256, every field length-prefixed so that ("ab", "c") and
    ("a", "bc") never derive alike. Two columns under one index key therefore never share a
    value, and a truncated index is not a prefix of a full one. Such values carry the header
    ``kf2:<index key name>:<version>:`` followed by base64url of the first ``nbytes`` of the
    MAC, so SQL can count them per index-key version exactly like ciphertexts.

    ``kf1:<name>:<version>:`` values came from an older release: the MAC under this key itself,
    the same for every column. Lookups still match them (``compute_legacy``) until a reindex
    replaces them.
    """

    __slots__ = ("_derived", "_key", "header", "legacy_header", "name", "version")

    FORMAT: Final = "kf2"
    LEGACY_FORMAT: Final = "kf1"
    PURPOSE: Final = b"sqlalchemy-kms-field blind index"

    def __init__(self, name: str, version: int, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ConfigurationError(
                f"index key {name!r} version {version} is {len(key)} bytes, expected {KEY_SIZE}"
            )
        if not 1 <= version < 10**MAX_VERSION_DIGITS:
            raise ConfigurationError(f"index key version must be 1 to 999999999, got {version}")
        check_key_name(name)
        self.name = name
        self.version = version
        self.header = self.header_for(name, version)
        self.legacy_header = f"{self.LEGACY_FORMAT}:{name}:{version}:"
        self._key = key
        # context fields -> derived MAC key: derived once per index, never per value.
        self._derived: dict[tuple[str, ...], bytes] = {}

    @classmethod
    def header_for(cls, name: str, version: int) -> str:
        """The header of the index values computed under index key ``name`` ``version``."""
        return f"{cls.FORMAT}:{name}:{version}:"

    def __repr__(self) -> str:
        return f"IndexKey(name={self.name!r}, version={self.version})"

    @classmethod
    def info(cls, context: tuple[str, ...]) -> bytes:
        """HKDF ``info`` for ``context``: the purpose, then each field behind its length."""
        parts = [cls.PURPOSE]
        for field in context:
            raw = field.encode("utf-8")
            parts.append(len(raw).to_bytes(4, "big") + raw)
        return b"".join(parts)

    def _derive(self, context: tuple[str, ...]) -> bytes:
        # Imported here: only IndexKey derives keys, once per index and version.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=self.info(context))
        key = self._derived[context] = hkdf.derive(self._key)
        return key

    def compute(self, data: bytes, nbytes: int, context: tuple[str, ...]) -> str:
        """The ``kf2`` index value of ``data`` (normalized plaintext) in ``context``."""
        key = self._derived.get(context) or self._derive(context)
        return self.header + b64encode(hmac.digest(key, data, "sha256")[:nbytes])

    def compute_legacy(self, data: bytes, nbytes: int) -> str:
        """The ``kf1`` index value an older release stored for ``data`` (lookups only)."""
        return self.legacy_header + b64encode(hmac.digest(self._key, data, "sha256")[:nbytes])

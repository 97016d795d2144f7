"""Values in the legacy format kf1, written as the library wrote them before kf2.

kf1 authenticated only its header (AAD = ``kf1:<key>:<version>:``) and did not pad. The library
no longer writes it; it still reads it, and re-encryption moves it to kf2. Tests that need kf1
rows write them with these.
"""

from __future__ import annotations

import os

from sqlalchemy_kms_field import envelope
from sqlalchemy_kms_field.envelope import DataKey


def kf1_body(key: DataKey, plaintext: bytes) -> bytes:
    legacy = key.legacy_header.encode("ascii")
    return key._seal(plaintext, legacy, os.urandom(envelope.NONCE_SIZE))


def kf1_text(key: DataKey, plaintext: bytes) -> str:
    """A text column's kf1 value: header + base64url(nonce || ciphertext || tag)."""
    return key.legacy_header + envelope.b64encode(kf1_body(key, plaintext))


def kf1_binary(key: DataKey, plaintext: bytes) -> bytes:
    """A binary column's kf1 value: header bytes + nonce || ciphertext || tag."""
    return key.legacy_header.encode("ascii") + kf1_body(key, plaintext)

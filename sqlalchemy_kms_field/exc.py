"""Errors raised by sqlalchemy-kms-field.

Every message names what an operator can act on (key name, key version,
table.column, the setting to change) and never a key or a plaintext.
"""

from __future__ import annotations

from sqlalchemy.exc import DontWrapMixin


class KmsFieldError(DontWrapMixin, Exception):
    """Base class of every error this library raises.

    Raised from a bind or result processor, it reaches the caller as it is: SQLAlchemy does not
    wrap it in a ``StatementError``, whose text would list every parameter of the statement,
    the plaintexts of encrypted columns included (whatever ``hide_parameters`` says).
    """


class ConfigurationError(KmsFieldError):
    """The library is not configured, or a setting is invalid."""


class KeyNotFoundError(KmsFieldError):
    """A data key name or version is not in the key store."""


class KeyStateError(KmsFieldError):
    """A data key version exists but may not be used this way (retired, destroyed)."""


class MasterKeyError(KmsFieldError):
    """The master key (AWS KMS or local) refused or failed to wrap or unwrap a data key.

    ``code`` carries the KMS error code (``AccessDeniedException``,
    ``DisabledException``, ``NotFoundException``, ``InvalidCiphertextException``, ...)
    or a short code of our own for local keys and connection failures.
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class EncryptionError(KmsFieldError):
    """A value cannot be encrypted (wrong type, already our ciphertext, too long)."""


class DecryptionError(KmsFieldError):
    """A stored value does not parse or does not authenticate: it is never returned as plaintext."""


class UnsupportedOperationError(KmsFieldError, TypeError):
    """An SQL operation that means nothing on randomly encrypted values (``==``, LIKE, ordering)."""


class ReencryptionError(KmsFieldError):
    """A batch of a re-encryption job failed; nothing of that batch was written.

    ``table``, ``column`` and ``primary_key`` name the row that failed (when one did).
    Every row stays readable and a rerun resumes from the last committed batch.
    """

    def __init__(
        self, message: str, *, table: str, column: str, primary_key: object = None
    ) -> None:
        super().__init__(message)
        self.table = table
        self.column = column
        self.primary_key = primary_key

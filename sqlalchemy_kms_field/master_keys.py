"""Master keys wrap and unwrap data keys: AWS KMS in production, a local key for development.

A master key never sees a data row. Each wrapped data key is bound to an encryption context
(purpose, key name, version), so a wrapped key copied to another name or version will not unwrap.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .exc import ConfigurationError, MasterKeyError

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

log = logging.getLogger(__name__)

Context = dict[str, str]


class MasterKey(Protocol):
    """What the registry needs from a master key. ``key_id`` is what the key store records."""

    @property
    def key_id(self) -> str: ...

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes, str]:
        """Return ``(plaintext key, wrapped key, master key id that wrapped it)``."""
        ...

    def wrap(self, plaintext: bytes, context: Context) -> tuple[bytes, str]:
        """Return ``(wrapped key, master key id that wrapped it)``."""
        ...

    def can_unwrap(self, master_key_id: str) -> bool: ...

    def unwrap(self, wrapped: bytes, context: Context, master_key_id: str) -> bytes: ...

    def rewrap(
        self, wrapped: bytes, context: Context, source_key_id: str
    ) -> tuple[bytes, str] | None:
        """Rewrap without the plaintext leaving the provider, or None if it cannot."""
        ...


def _canonical(context: Context) -> bytes:
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


class LocalMasterKey:
    """An AES-256 master key held in a file or an environment variable. NOT FOR PRODUCTION.

    Anyone who can read the key file can unwrap every data key; there is no audit trail, no
    access policy and no rotation service. Use it for development, tests and the quick start;
    use :class:`AwsKmsMasterKey` for real data. ``kms-field keys rewrap`` moves data keys from a
    local master key to AWS KMS without touching a row.
    """

    _MAGIC = b"kflw1"

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigurationError(
                f"a local master key must be 32 bytes (AES-256), got {len(key)} bytes"
            )
        self._aead = AESGCM(key)
        fingerprint = hashlib.sha256(b"sqlalchemy-kms-field local master key id\x00" + key)
        self._key_id = "local:" + fingerprint.hexdigest()[:16]

    @classmethod
    def from_bytes(cls, key: bytes) -> LocalMasterKey:
        return cls(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LocalMasterKey:
        """Read a key file written by :meth:`generate_file` (base64 of 32 bytes)."""
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise ConfigurationError(
                f"local master key file {os.fspath(path)!r} does not exist; create one with "
                "LocalMasterKey.generate_file(path) or `kms-field init-local PATH`"
            ) from None
        return cls(_decode_key(text, f"file {os.fspath(path)!r}"))

    @classmethod
    def from_env(cls, variable: str = "KMS_FIELD_LOCAL_MASTER_KEY") -> LocalMasterKey:
        """Read a base64 key from an environment variable."""
        text = os.environ.get(variable)
        if not text:
            raise ConfigurationError(f"environment variable {variable} is not set")
        return cls(_decode_key(text.strip(), f"environment variable {variable}"))

    @staticmethod
    def generate_file(path: str | os.PathLike[str]) -> LocalMasterKey:
        """Write a new random key to ``path`` (mode 0600, never overwriting) and return it."""
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"{os.fspath(path)!r} already exists; refusing to overwrite a master key"
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(base64.b64encode(key).decode("ascii") + "\n")
        return LocalMasterKey(key)

    @property
    def key_id(self) -> str:
        return self._key_id

    def __repr__(self) -> str:
        return f"LocalMasterKey(key_id={self._key_id!r}, not for production)"

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes, str]:
        plaintext = os.urandom(32)
        wrapped, key_id = self.wrap(plaintext, context)
        return plaintext, wrapped, key_id

    def wrap(self, plaintext: bytes, context: Context) -> tuple[bytes, str]:
        nonce = os.urandom(12)
        return self._MAGIC + nonce + self._aead.encrypt(nonce, plaintext, _canonical(context)), (
            self._key_id
        )

    def can_unwrap(self, master_key_id: str) -> bool:
        return master_key_id == self._key_id

    def unwrap(self, wrapped: bytes, context: Context, master_key_id: str) -> bytes:
        if master_key_id != self._key_id or not wrapped.startswith(self._MAGIC):
            raise MasterKeyError(
                f"data key was wrapped by {master_key_id}, not by this local master key "
                f"({self._key_id}); configure the master key that wrapped it",
                code="WrongMasterKey",
            )
        body = wrapped[len(self._MAGIC) :]
        try:
            return self._aead.decrypt(body[:12], body[12:], _canonical(context))
        except InvalidTag:
            raise MasterKeyError(
                f"local master key {self._key_id} cannot unwrap this data key: the wrapped key "
                "or its encryption context (key name, version) was altered",
                code="InvalidCiphertextException",
            ) from None

    def rewrap(
        self, wrapped: bytes, context: Context, source_key_id: str
    ) -> tuple[bytes, str] | None:
        return None


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise ConfigurationError(f"the local master key in {where} is not valid base64") from None
    if len(key) != 32:
        raise ConfigurationError(
            f"the local master key in {where} is {len(key)} bytes; it must be 32 (AES-256)"
        )
    return key


_AWS_PREFIX = "aws-kms:"

_HINTS = {
    "AccessDeniedException": "check that the IAM identity and the key policy allow this call",
    "DisabledException": "the KMS key is disabled: enable it, or rewrap the data keys under "
    "another master key",
    "KMSInvalidStateException": "the KMS key is pending deletion or not usable: cancel the "
    "deletion, or rewrap under another master key",
    "NotFoundException": "no such KMS key in this account and region: check the key id, "
    "alias and AWS_REGION",
    "InvalidCiphertextException": "the wrapped data key does not match its encryption context "
    "or was not made by this KMS key",
    "IncorrectKeyException": "the wrapped data key was made by another KMS key",
    "ThrottlingException": "KMS kept throttling after retries: raise the request quota or retry "
    "later",
    "ConnectionError": "KMS could not be reached after retries: check the network, the region "
    "and AWS_ENDPOINT_URL_KMS",
    "NoCredentials": "no AWS credentials were found: set a profile, environment credentials or "
    "a role",
    "NoRegion": "no AWS region is set: pass region_name, or set AWS_REGION or AWS_DEFAULT_REGION",
}


# botocore's DEBUG logging prints request and response bodies: the data key in base64 from
# GenerateDataKey and Decrypt, and in Encrypt requests. Every botocore logger gets a filter that
# blanks "Plaintext" values, whatever levels and handlers the application sets up.
_PLAINTEXT = re.compile(r"""(["']Plaintext["']\s*:\s*)(b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*")""")
_BOTOCORE_LOGGERS = (
    "botocore", "botocore.endpoint", "botocore.parsers", "botocore.hooks", "botocore.auth",
    "botocore.awsrequest", "botocore.httpsession", "botocore.retryhandler", "botocore.client",
    "botocore.utils", "botocore.retries.standard", "boto3", "urllib3.connectionpool",
)  # fmt: skip


class RedactPlaintext(logging.Filter):
    """Replaces every ``"Plaintext": "..."`` in a log record's message with ``<redacted>``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record: leave it to the handler's own error path
            return True
        if "Plaintext" in message:
            record.msg = _PLAINTEXT.sub(r"\1'<redacted>'", message)
            record.args = None
        return True


_REDACT = RedactPlaintext()


def _without_boto3() -> ConfigurationError:
    return ConfigurationError(
        "AWS KMS master keys need boto3, which is not installed: "
        "pip install 'sqlalchemy-kms-field[aws]'"
    )


def redact_botocore_logs() -> None:
    """Install the filter on every botocore logger there is (idempotent)."""
    names = set(_BOTOCORE_LOGGERS)
    names.update(
        name
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("botocore.", "boto3."))
    )
    for name in names:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


class AwsKmsMasterKey:
    """A symmetric AWS KMS key, named by key id, key ARN, alias name or alias ARN.

    The boto3 client is built the standard way (profiles, ``AWS_REGION``,
    ``AWS_ENDPOINT_URL_KMS`` all apply) with botocore's ``standard`` retry mode, which retries
    throttling and transient errors with exponential backoff; pass ``client`` to use your own.

    Pinned: the key is resolved to its ARN once (:attr:`key_arn`); only wrapped keys recorded
    under that ARN unwrap, ``Decrypt`` is called with that ARN as ``KeyId``, and the ``KeyId``
    KMS answers with must be it. Creating one also filters ``Plaintext`` out of botocore's logs.
    """

    def __init__(
        self,
        key_id: str,
        *,
        client: KMSClient | None = None,
        region_name: str | None = None,
        profile_name: str | None = None,
        max_attempts: int = 8,
    ) -> None:
        if not key_id:
            raise ConfigurationError("AwsKmsMasterKey needs a key id, key ARN or alias")
        self._key = key_id
        self._client = client
        self._region_name = region_name
        self._profile_name = profile_name
        self._max_attempts = max_attempts
        self._lock = threading.RLock()  # reentrant: resolving the ARN builds the client
        self._arn: str | None = None
        redact_botocore_logs()

    def __repr__(self) -> str:
        return f"AwsKmsMasterKey({self._key!r})"

    @property
    def key_id(self) -> str:
        return _AWS_PREFIX + self._key

    @property
    def client(self) -> KMSClient:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    def _build_client(self) -> KMSClient:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # the [aws] extra is not installed
            raise _without_boto3() from None
        config = Config(
            retries={"mode": "standard", "max_attempts": self._max_attempts},
            connect_timeout=5,
            read_timeout=30,
        )
        session = boto3.session.Session(
            profile_name=self._profile_name, region_name=self._region_name
        )
        client: KMSClient = self._call("CreateClient", lambda: session.client("kms", config=config))
        redact_botocore_logs()  # again: importing boto3 made more loggers
        return client

    def _call(self, operation: str, fn: Any) -> Any:
        try:
            from botocore import exceptions as bx
        except ImportError:  # the [aws] extra is not installed
            raise _without_boto3() from None

        transient = (
            bx.EndpointConnectionError,
            bx.ConnectionClosedError,
            bx.ReadTimeoutError,
            bx.ConnectTimeoutError,
        )
        try:
            return fn()
        except bx.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            raise self._error(operation, code) from exc
        except transient as exc:
            raise self._error(operation, "ConnectionError") from exc
        except bx.NoCredentialsError as exc:
            raise self._error(operation, "NoCredentials") from exc
        except bx.NoRegionError as exc:
            raise self._error(operation, "NoRegion") from exc

    def _error(self, operation: str, code: str) -> MasterKeyError:
        hint = _HINTS.get(code, "see the KMS documentation for this error code")
        return MasterKeyError(
            f"KMS {operation} with key {self._key!r} failed: {code}: {hint}", code=code
        )

    @property
    def key_arn(self) -> str:
        """The ARN of the configured key: the only key that may unwrap for this master key.

        A key ARN is taken as it is; a key id or alias is resolved once with DescribeKey.
        """
        if self._arn is None:
            with self._lock:
                if self._arn is None:
                    self._arn = self._resolve_arn()
        return self._arn

    def _resolve_arn(self) -> str:
        if self._key.startswith("arn:") and ":key/" in self._key:
            return self._key
        resp = self._call("DescribeKey", lambda: self.client.describe_key(KeyId=self._key))
        arn: str = resp["KeyMetadata"]["Arn"]
        return arn

    def _expect(self, operation: str, returned: str) -> str:
        """Our key id for the key KMS says it used, which must be the configured one."""
        if returned != self.key_arn:
            raise MasterKeyError(
                f"KMS {operation} with key {self._key!r} answered for another key ({returned}, "
                f"expected {self.key_arn}); nothing was used",
                code="UnexpectedKeyId",
            )
        return _AWS_PREFIX + returned

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes, str]:
        resp = self._call(
            "GenerateDataKey",
            lambda: self.client.generate_data_key(
                KeyId=self.key_arn, KeySpec="AES_256", EncryptionContext=context
            ),
        )
        return (
            resp["Plaintext"],
            resp["CiphertextBlob"],
            self._expect("GenerateDataKey", resp["KeyId"]),
        )

    def wrap(self, plaintext: bytes, context: Context) -> tuple[bytes, str]:
        resp = self._call(
            "Encrypt",
            lambda: self.client.encrypt(
                KeyId=self.key_arn, Plaintext=plaintext, EncryptionContext=context
            ),
        )
        return resp["CiphertextBlob"], self._expect("Encrypt", resp["KeyId"])

    def can_unwrap(self, master_key_id: str) -> bool:
        """True only for a wrapped key recorded as made by this very KMS key (its ARN)."""
        return master_key_id.startswith(_AWS_PREFIX) and master_key_id == _AWS_PREFIX + self.key_arn

    def unwrap(self, wrapped: bytes, context: Context, master_key_id: str) -> bytes:
        # The KeyId passed to Decrypt is the configured key, never one read from the database,
        # and KMS must say it used that key.
        if not self.can_unwrap(master_key_id):
            raise MasterKeyError(
                f"data key was wrapped by {master_key_id or 'nothing'}, not by this KMS key "
                f"({self.key_arn}); configure the master key that wrapped it",
                code="WrongMasterKey",
            )
        resp = self._call(
            "Decrypt",
            lambda: self.client.decrypt(
                CiphertextBlob=wrapped, EncryptionContext=context, KeyId=self.key_arn
            ),
        )
        self._expect("Decrypt", resp["KeyId"])
        plaintext: bytes = resp["Plaintext"]
        return plaintext

    def rewrap(
        self, wrapped: bytes, context: Context, source_key_id: str
    ) -> tuple[bytes, str] | None:
        """ReEncrypt from ``source_key_id`` (which the caller has checked is a configured
        master key) to this key, the plaintext never leaving KMS."""
        if not source_key_id.startswith(_AWS_PREFIX):
            return None
        resp = self._call(
            "ReEncrypt",
            lambda: self.client.re_encrypt(
                CiphertextBlob=wrapped,
                SourceEncryptionContext=context,
                SourceKeyId=source_key_id.removeprefix(_AWS_PREFIX),
                DestinationKeyId=self.key_arn,
                DestinationEncryptionContext=context,
            ),
        )
        return resp["CiphertextBlob"], self._expect("ReEncrypt", resp["KeyId"])

    def schedule_deletion(self, pending_window_days: int) -> datetime:
        """ScheduleKeyDeletion of this KMS key after ``pending_window_days`` (7 to 30); returns
        the deletion date. Until then ``CancelKeyDeletion`` undoes it."""
        if not 7 <= pending_window_days <= 30:
            raise ConfigurationError(
                f"pending_window_days must be 7 to 30 (KMS's waiting period), got "
                f"{pending_window_days}"
            )
        resp = self._call(
            "ScheduleKeyDeletion",
            # The key id, not the ARN: deletion works only in the key's own account anyway.
            lambda: self.client.schedule_key_deletion(
                KeyId=self.key_arn.rpartition("/")[2], PendingWindowInDays=pending_window_days
            ),
        )
        when: datetime = resp["DeletionDate"]
        return when

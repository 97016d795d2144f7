"""Field-level envelope encryption for SQLAlchemy, with data keys wrapped by AWS KMS."""

from importlib.metadata import PackageNotFoundError, version

from .blind_index import BlindIndex, find
from .envelope import DataKey, IndexKey
from .exc import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    KeyNotFoundError,
    KeyStateError,
    KmsFieldError,
    MasterKeyError,
    ReencryptionError,
    UnsupportedOperationError,
)
from .key_store import KeyState, SqlKeyStore, StoredKey
from .master_keys import AwsKmsMasterKey, LocalMasterKey, MasterKey
from .reencrypt import decrypt_column, encrypt_column, reencrypt_column, reindex_column
from .registry import (
    KeyRegistry,
    configure,
    create_data_key,
    create_index_key,
    get_registry,
    preload,
    rotate_data_key,
    rotate_index_key,
)
from .tenants import (
    configure_tenants,
    create_tenant_table,
    ensure_tenant_key,
    rewrap_tenant_keys,
    rotate_tenant_key,
    tenant_match,
)
from .types import Encrypted, EncryptedBytes, EncryptedJSON, EncryptedString, EncryptedText

try:
    __version__ = version("sqlalchemy-kms-field")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

# Alembic renders user types as "<module>.<repr>": make that the public, stable path.
for _cls in (BlindIndex, Encrypted, EncryptedBytes, EncryptedJSON, EncryptedString, EncryptedText):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "AwsKmsMasterKey",
    "BlindIndex",
    "ConfigurationError",
    "DataKey",
    "DecryptionError",
    "Encrypted",
    "EncryptedBytes",
    "EncryptedJSON",
    "EncryptedString",
    "EncryptedText",
    "EncryptionError",
    "IndexKey",
    "KeyNotFoundError",
    "KeyRegistry",
    "KeyState",
    "KeyStateError",
    "KmsFieldError",
    "LocalMasterKey",
    "MasterKey",
    "MasterKeyError",
    "ReencryptionError",
    "SqlKeyStore",
    "StoredKey",
    "UnsupportedOperationError",
    "__version__",
    "configure",
    "configure_tenants",
    "create_data_key",
    "create_index_key",
    "create_tenant_table",
    "decrypt_column",
    "encrypt_column",
    "ensure_tenant_key",
    "find",
    "get_registry",
    "preload",
    "reencrypt_column",
    "reindex_column",
    "rewrap_tenant_keys",
    "rotate_data_key",
    "rotate_index_key",
    "rotate_tenant_key",
    "tenant_match",
]

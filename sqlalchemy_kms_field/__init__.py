"""Field-level envelope encryption for SQLAlchemy, with data keys wrapped by AWS KMS.

The public names are imported on first use (PEP 562), so that ``import sqlalchemy_kms_field``
alone, and ``kms-field --help``, import neither SQLAlchemy nor the column types.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .audit import AuditEvent, set_audit_hook
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
    from .metrics import disable_metrics, enable_metrics
    from .reencrypt import (
        JobCancelled,
        JobConflictError,
        Pacing,
        decrypt_column,
        encrypt_column,
        reencrypt_column,
        reindex_column,
    )
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

    __version__: str

# Public name -> the module that defines it.
_WHERE = {
    **dict.fromkeys(("AuditEvent", "set_audit_hook"), ".audit"),
    **dict.fromkeys(("BlindIndex", "find"), ".blind_index"),
    **dict.fromkeys(("DataKey", "IndexKey"), ".envelope"),
    **dict.fromkeys(
        (
            "ConfigurationError",
            "DecryptionError",
            "EncryptionError",
            "KeyNotFoundError",
            "KeyStateError",
            "KmsFieldError",
            "MasterKeyError",
            "ReencryptionError",
            "UnsupportedOperationError",
        ),
        ".exc",
    ),
    **dict.fromkeys(("KeyState", "SqlKeyStore", "StoredKey"), ".key_store"),
    **dict.fromkeys(("AwsKmsMasterKey", "LocalMasterKey", "MasterKey"), ".master_keys"),
    **dict.fromkeys(("disable_metrics", "enable_metrics"), ".metrics"),
    **dict.fromkeys(
        (
            "JobCancelled",
            "JobConflictError",
            "Pacing",
            "decrypt_column",
            "encrypt_column",
            "reencrypt_column",
            "reindex_column",
        ),
        ".reencrypt",
    ),
    **dict.fromkeys(
        (
            "KeyRegistry",
            "configure",
            "create_data_key",
            "create_index_key",
            "get_registry",
            "preload",
            "rotate_data_key",
            "rotate_index_key",
        ),
        ".registry",
    ),
    **dict.fromkeys(
        (
            "configure_tenants",
            "create_tenant_table",
            "ensure_tenant_key",
            "rewrap_tenant_keys",
            "rotate_tenant_key",
            "tenant_match",
        ),
        ".tenants",
    ),
    **dict.fromkeys(
        ("Encrypted", "EncryptedBytes", "EncryptedJSON", "EncryptedString", "EncryptedText"),
        ".types",
    ),
}

_SUBMODULES = frozenset(
    {"alembic_ops", "alembic_env", "asyncio", "audit", "blind_index", "census", "envelope", "exc",
     "key_store", "lifecycle", "master_keys", "metrics", "reencrypt", "registry", "scan",
     "tenant_erasure", "tenant_rotation", "tenants", "types"}
)  # fmt: skip


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sqlalchemy-kms-field")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
    elif name in _SUBMODULES:  # sqlalchemy_kms_field.blind_index.NormalizerRef in a migration
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AuditEvent",
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
    "JobCancelled",
    "JobConflictError",
    "KeyNotFoundError",
    "KeyRegistry",
    "KeyState",
    "KeyStateError",
    "KmsFieldError",
    "LocalMasterKey",
    "MasterKey",
    "MasterKeyError",
    "Pacing",
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
    "disable_metrics",
    "enable_metrics",
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
    "set_audit_hook",
    "tenant_match",
]

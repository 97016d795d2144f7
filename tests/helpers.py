"""Helpers shared by the test modules (the fixtures themselves live in conftest.py).

Fixtures that need these are defined in each module from the functions here, so that a module
reads on its own and conftest.py stays the infrastructure's.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterable
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_kms_field as kf
from sqlalchemy_kms_field import registry as kf_registry
from sqlalchemy_kms_field.master_keys import MasterKey

# A fixed master key, so that a failing test can be replayed; the tests that check that keys never
# leak look for exactly these bytes (and every data key they unwrap).
MASTER_KEY_BYTES = bytes.fromhex("8f1c2d3e4f5a6b7c8d9eafb0c1d2e3f405162738495a6b7c8d9eafb0c1d2e3f4")
MASTER_KEY_B64 = base64.b64encode(MASTER_KEY_BYTES).decode("ascii")


def local_master_key() -> kf.LocalMasterKey:
    return kf.LocalMasterKey(MASTER_KEY_BYTES)


def reset_global_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a test unconfigured; monkeypatch restores the previous (unconfigured) state after."""
    monkeypatch.setattr(kf_registry, "_registry", None)


def reset_tenants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a test unconfigured and with no tenant keyring nor tenant settings."""
    from sqlalchemy_kms_field import tenants

    reset_global_registry(monkeypatch)
    monkeypatch.setattr(tenants, "_keyring", None)
    monkeypatch.setattr(tenants, "_settings", {})


def configure_local(
    engine: sa.Engine,
    *,
    names: Iterable[str] = ("pii",),
    master_key: MasterKey | None = None,
    active_ttl: float = 1.0,  # short: a re-encryption finishes no sooner than this after a rotation
) -> kf.KeyRegistry:
    """Configure the global registry with a local master key and a key store on ``engine``."""
    store = kf.SqlKeyStore(engine)
    store.create_table()
    registry = kf.configure(
        master_key=master_key or local_master_key(), key_store=store, active_ttl=active_ttl
    )
    for name in names:
        registry.create_data_key(name)
    return registry


def unwrapped_key(registry: kf.KeyRegistry, name: str, version: int) -> bytes:
    """The plaintext bytes of a data key version, unwrapped again from what the store holds."""
    stored = registry.key_store.get(name, version)
    context = kf_registry.data_key_context(name, version)
    return registry.master_key.unwrap(stored.wrapped_key, context, stored.master_key_id)


def secret_spellings(secret: bytes) -> list[str]:
    """Every way a key could show up in text: hex (both cases), base64 (both alphabets, with and
    without padding), the bytes repr, and the raw bytes read as latin-1."""
    b64 = base64.b64encode(secret).decode()
    b64url = base64.urlsafe_b64encode(secret).decode()
    spellings = {
        secret.hex(),
        secret.hex().upper(),
        b64,
        b64.rstrip("="),
        b64url,
        b64url.rstrip("="),
        repr(secret),
        repr(secret)[2:-1],  # without b'...'
        secret.decode("latin-1"),
    }
    return sorted(spellings)


def assert_no_secret(text: str, secrets: Iterable[bytes]) -> None:
    for secret in secrets:
        for spelling in secret_spellings(secret):
            assert spelling not in text, f"key material ({spelling[:8]}...) in: {text[:200]!r}"
            half = spelling[: len(spelling) // 2]
            # Half of a spelling is already a leak (e.g. a truncated hex dump).
            assert len(half) < 16 or half not in text, f"half a key in: {text[:200]!r}"


def error_texts(exc: BaseException) -> list[str]:
    """str() and repr() of an exception and of every exception it was chained from."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return texts


def unwrap_statement_error(exc: BaseException) -> BaseException:
    """SQLAlchemy wraps an error raised while binding parameters in a StatementError."""
    if isinstance(exc, sa.exc.StatementError) and exc.orig is not None:
        return exc.orig
    return exc


class raises_kf:
    """``pytest.raises`` for a library error that SQLAlchemy may have wrapped in StatementError."""

    def __init__(self, expected: type[BaseException], match: str | None = None) -> None:
        self.expected = expected
        self.match = match
        self.value: BaseException | None = None
        self._cm: Any = None

    def __enter__(self) -> raises_kf:
        self._cm = pytest.raises((self.expected, sa.exc.StatementError))
        self._info = self._cm.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        suppressed: bool = self._cm.__exit__(*exc_info)
        error = unwrap_statement_error(self._info.value)
        assert isinstance(error, self.expected), f"expected {self.expected.__name__}: {error!r}"
        if self.match is not None:
            assert re.search(self.match, str(error)), f"{self.match!r} not in {str(error)!r}"
        self.value = error
        return suppressed


def raw_values(engine: sa.Engine, table: str, column: str) -> list[Any]:
    """The values of ``table.column`` exactly as the database holds them (no type processing)."""
    quote = engine.dialect.identifier_preparer.quote
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT {quote(column)} FROM {quote(table)} ORDER BY id")
        ).all()
    return [r[0] for r in rows]


def wait_for_orphaned_statements(engine: sa.Engine, timeout: float = 30) -> None:
    """Wait until no other session of this database is running a statement.

    A SIGKILLed client's last statement still runs to completion on the server (on PostgreSQL
    a re-encryption batch is one autocommit statement, checkpoint included, so it commits): a
    test that reads the state right after the kill must wait for it, or it sees a moving state.
    """
    if engine.dialect.name == "postgresql":
        busy = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state <> 'idle'"
        )
    elif engine.dialect.name in ("mysql", "mariadb"):
        busy = sa.text(
            "SELECT count(*) FROM information_schema.processlist WHERE db = database() "
            "AND id <> connection_id() AND command <> 'Sleep'"
        )
    else:
        return  # SQLite: the killed process was the only one running its statements
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            if conn.execute(busy).scalar_one() == 0:
                return
        assert time.monotonic() < deadline, "the killed client's statement is still running"
        time.sleep(0.05)

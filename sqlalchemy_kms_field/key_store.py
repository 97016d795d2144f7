"""Wrapped data keys, stored in a table of the application's own database.

One row per (name, version). The primary key makes two concurrent rotations unable to produce
the same version: the loser's insert fails and it takes the next number.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .exc import ConfigurationError, KeyNotFoundError


class KeyState(enum.StrEnum):
    """Life cycle of a data key version."""

    PENDING = "pending"  # number reserved; not yet wrapped and verified, never used to write
    ACTIVE = "active"  # new values are written under the highest active version
    READABLE = "readable"  # an older version: still decrypts, no longer written
    RETIRED = "retired"  # no row uses it any more; no longer decrypts
    DESTROYED = "destroyed"  # wrapped key erased (crypto-shredded)


@dataclass(frozen=True)
class StoredKey:
    name: str
    version: int
    wrapped_key: bytes = field(repr=False)
    master_key_id: str
    state: KeyState
    created_at: datetime
    kind: str = "data"  # "data" (encrypts values) or "index" (HMAC key of blind indexes)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class SqlKeyStore:
    """Wrapped data keys in table ``kms_field_keys`` (name configurable) of ``engine``'s database.

    Create the table once with :meth:`create_table` or, in a migration, ``op.create_key_store()``.
    """

    def __init__(
        self, engine: Engine, *, table_name: str = "kms_field_keys", schema: str | None = None
    ) -> None:
        self.engine = engine
        self.metadata = sa.MetaData(schema=schema)
        self.table = key_table(self.metadata, table_name)

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"SqlKeyStore({url!r}, table={self.table.fullname!r})"

    def create_table(self) -> None:
        """Create the key table if it does not exist."""
        self.metadata.create_all(self.engine, checkfirst=True)

    # Reads -----------------------------------------------------------------------------------

    def get(self, name: str, version: int) -> StoredKey:
        t = self.table
        with self._connect() as conn:
            row = conn.execute(
                sa.select(t).where(t.c.name == name, t.c.version == version)
            ).one_or_none()
            if row is None:
                known = conn.execute(
                    sa.select(sa.func.count()).select_from(t).where(t.c.name == name)
                ).scalar_one()
        if row is None:
            if not known:
                raise KeyNotFoundError(
                    f"no key named {name!r} in the key store; create it with "
                    f"create_data_key({name!r}) (or create_index_key for a blind-index key)"
                )
            raise KeyNotFoundError(f"key {name!r} has no version {version} in the key store")
        return _stored(row)

    def versions(self, name: str | None = None) -> list[StoredKey]:
        t = self.table
        q = sa.select(t).order_by(t.c.name, t.c.version)
        if name is not None:
            q = q.where(t.c.name == name)
        with self._connect() as conn:
            return [_stored(r) for r in conn.execute(q)]

    def active_version(self, name: str) -> int | None:
        t = self.table
        with self._connect() as conn:
            version: int | None = conn.execute(
                sa.select(sa.func.max(t.c.version)).where(
                    t.c.name == name, t.c.state == KeyState.ACTIVE.value
                )
            ).scalar_one()
        return version

    # Writes ----------------------------------------------------------------------------------

    def reserve_version(self, name: str, *, only_first: bool = False, kind: str = "data") -> int:
        """Insert a PENDING row with the next version number and return that number.

        Concurrent callers each get a distinct number: the primary key rejects a duplicate
        insert, and the loser reads the maximum again.
        """
        t = self.table
        for _ in range(20):
            try:
                with self.engine.begin() as conn:
                    current, other_kind = conn.execute(
                        sa.select(sa.func.max(t.c.version), sa.func.max(t.c.kind)).where(
                            t.c.name == name
                        )
                    ).one()
                    if other_kind is not None and other_kind != kind:
                        raise ConfigurationError(
                            f"{name!r} is the name of an existing {other_kind} key, not of "
                            f"a {kind} key; choose another name"
                        )
                    if only_first and current is not None:
                        return 0
                    version = (current or 0) + 1
                    conn.execute(
                        t.insert().values(
                            name=name,
                            version=version,
                            wrapped_key=b"",
                            master_key_id="",
                            state=KeyState.PENDING.value,
                            created_at=_now(),
                            kind=kind,
                        )
                    )
                return int(version)
            except (sa.exc.IntegrityError, sa.exc.OperationalError) as exc:
                if not self._has_table():
                    raise self._missing() from exc
                continue  # another process took this number (or a deadlock was broken)
        raise ConfigurationError(
            f"could not reserve a new version of data key {name!r} after "
            "20 attempts: too many concurrent rotations"
        )

    def store_wrapped(self, name: str, version: int, wrapped: bytes, master_key_id: str) -> None:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(
                    t.c.name == name, t.c.version == version, t.c.state == KeyState.PENDING.value
                )
                .values(wrapped_key=wrapped, master_key_id=master_key_id)
            )

    def activate(self, name: str, version: int) -> None:
        """Make ``version`` the active one, unless a higher version is active already.

        Exactly one version stays ACTIVE whatever the interleaving of concurrent rotations:
        the first statement locks the name's rows (row locks on PostgreSQL and MySQL, the
        write lock on SQLite) until the transaction ends.
        """
        t = self.table
        mine = (t.c.name == name) & (t.c.version == version)
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.name == name).values(state=t.c.state))
            current = conn.execute(
                sa.select(sa.func.max(t.c.version)).where(
                    t.c.name == name, t.c.state == KeyState.ACTIVE.value
                )
            ).scalar_one()
            if current is not None and current > version:
                conn.execute(t.update().where(mine).values(state=KeyState.READABLE.value))
                return
            conn.execute(
                t.update()
                .where(t.c.name == name, t.c.state == KeyState.ACTIVE.value, t.c.version != version)
                .values(state=KeyState.READABLE.value)
            )
            conn.execute(t.update().where(mine).values(state=KeyState.ACTIVE.value))

    def set_state(self, name: str, version: int, state: KeyState) -> None:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.update().where(t.c.name == name, t.c.version == version).values(state=state.value)
            )

    def replace_wrapped(
        self, name: str, version: int, old: bytes, new: bytes, master_key_id: str
    ) -> bool:
        """Compare-and-swap the wrapped key (rewrap); False if it changed meanwhile."""
        t = self.table
        with self.engine.begin() as conn:
            result = conn.execute(
                t.update()
                .where(t.c.name == name, t.c.version == version, t.c.wrapped_key == old)
                .values(wrapped_key=new, master_key_id=master_key_id)
            )
        return result.rowcount == 1

    def discard_pending(self, name: str, version: int) -> None:
        """Delete a PENDING version (one that failed before it was verified and activated)."""
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.delete().where(
                    t.c.name == name, t.c.version == version, t.c.state == KeyState.PENDING.value
                )
            )

    def destroy(self, name: str, version: int) -> None:
        """Erase the wrapped key of a version: values under it can never be decrypted again."""
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.name == name, t.c.version == version)
                .values(wrapped_key=b"", state=KeyState.DESTROYED.value)
            )

    # Helpers ---------------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection for reads that turns a missing table into an error saying what to do."""
        with self.engine.connect() as conn:
            try:
                yield conn
            except (sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
                conn.rollback()
                # (SQLite reports a missing table as an OperationalError, like a locked
                # database: asking a locked database whether the table exists would wait again.)
                locked = "locked" in str(exc.orig)
                if not locked and not self._has_table():
                    raise self._missing() from exc
                raise

    def _has_table(self) -> bool:
        return sa.inspect(self.engine).has_table(self.table.name, schema=self.table.schema)

    def _missing(self) -> ConfigurationError:
        return ConfigurationError(
            f"the key store table {self.table.fullname!r} does not exist: create it with "
            "SqlKeyStore(engine).create_table() or op.create_key_store() in a migration"
        )


def key_table(metadata: sa.MetaData, table_name: str = "kms_field_keys") -> sa.Table:
    return sa.Table(
        table_name,
        metadata,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("wrapped_key", sa.LargeBinary(4096), nullable=False),
        sa.Column("master_key_id", sa.String(2048), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False, server_default="data"),
    )


def _stored(row: sa.Row[tuple[object, ...]]) -> StoredKey:
    m = row._mapping
    return StoredKey(
        name=str(m["name"]),
        version=int(m["version"]),
        wrapped_key=bytes(m["wrapped_key"]),
        master_key_id=str(m["master_key_id"]),
        state=KeyState(m["state"]),
        created_at=m["created_at"],
        kind=str(m["kind"]),
    )

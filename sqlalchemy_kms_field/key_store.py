"""Wrapped data keys, stored in a table of the application's own database.

One row per (name, version). The primary key makes two concurrent rotations unable to produce
the same version: the loser's insert fails and it takes the next number.

``activated_at`` and ``retired_at`` are written with the database's clock (:func:`utc_now`), so
that the grace periods of retire and destroy never compare the clocks of two hosts. Tables made
before these columns existed keep working; :meth:`SqlKeyStore.upgrade` adds them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from .erasure import Erased, vacuum_full
from .exc import ConfigurationError, KeyNotFoundError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine


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
    activated_at: datetime | None = None  # database clock, UTC; None: never active (or legacy)
    retired_at: datetime | None = None  # database clock, UTC


# Processes re-read the key states every active_ttl seconds; this much more covers the time a
# re-read itself takes. Retire and the re-encryption's final census both wait active_ttl + this.
ACTIVE_TTL_MARGIN = 2.0

LIFECYCLE_COLUMNS = ("activated_at", "retired_at")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class utc_now(sa.sql.functions.FunctionElement[datetime]):
    """The database's current time in UTC, without a time zone (as the key table stores it)."""

    type = sa.DateTime()
    inherit_cache = True


@compiles(utc_now)
def _utc_now_default(element: utc_now, compiler: SQLCompiler, **kw: object) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(utc_now, "postgresql")
def _utc_now_postgresql(element: utc_now, compiler: SQLCompiler, **kw: object) -> str:
    return "(CURRENT_TIMESTAMP AT TIME ZONE 'UTC')"


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _utc_now_mysql(element: utc_now, compiler: SQLCompiler, **kw: object) -> str:
    return "UTC_TIMESTAMP(6)"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: SQLCompiler, **kw: object) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"  # UTC, in SQLAlchemy's own format


class SqlKeyStore:
    """Wrapped data keys in table ``kms_field_keys`` (name configurable) of ``engine``'s database.

    Create the table once with :meth:`create_table` or, in a migration, ``op.create_key_store()``.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        *,
        table_name: str = "kms_field_keys",
        schema: str | None = None,
    ) -> None:
        # An async engine (asyncpg, aiosqlite, asyncmy): the store keeps its sync facade, whose
        # calls only work inside SQLAlchemy's greenlet bridge; sqlalchemy_kms_field.asyncio
        # makes every call there (see its module docstring).
        self.engine: Engine = cast(Engine, getattr(engine, "sync_engine", engine))
        self.is_async: bool = self.engine.dialect.is_async  # also for async_engine.sync_engine
        self.metadata = sa.MetaData(schema=schema)
        self.table = key_table(self.metadata, table_name)
        self._has_dates: bool | None = None  # activated_at/retired_at exist; None: not checked

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"SqlKeyStore({url!r}, table={self.table.fullname!r})"

    def create_table(self) -> None:
        """Create the key table if it does not exist, or :meth:`upgrade` the one there is."""
        self.metadata.create_all(self.engine, checkfirst=True)
        self.upgrade()

    def upgrade(self) -> list[str]:
        """Add the columns that tables made by older releases lack; return their names.

        ``activated_at`` and ``retired_at`` (database clock) measure the grace periods of
        retire and destroy. A version missing them (made before the upgrade, or activated by a
        process of an older release since) gets the database's current time: its grace
        periods start now, never earlier. Idempotent; needs ALTER TABLE rights.
        """
        t = self.table
        present = {c["name"] for c in sa.inspect(self.engine).get_columns(t.name, t.schema)}
        added = [name for name in LIFECYCLE_COLUMNS if name not in present]
        with self.engine.begin() as conn:
            for name in added:
                column = sa.schema.CreateColumn(t.c[name]).compile(dialect=conn.dialect)
                table = conn.dialect.identifier_preparer.format_table(t)
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column}")
            was_active = (KeyState.ACTIVE.value, KeyState.READABLE.value, KeyState.RETIRED.value)
            conn.execute(
                t.update()
                .where(t.c.activated_at.is_(None), t.c.state.in_(was_active))
                .values(activated_at=utc_now())
            )
            conn.execute(
                t.update()
                .where(t.c.retired_at.is_(None), t.c.state == KeyState.RETIRED.value)
                .values(retired_at=utc_now())
            )
        self._has_dates = True
        return added

    def clock(self) -> datetime:
        """The database's current time (UTC, no time zone): the clock of every grace period."""
        with self.engine.connect() as conn:
            now: datetime = conn.execute(sa.select(utc_now())).scalar_one()
        return now

    # Reads -----------------------------------------------------------------------------------

    def get(self, name: str, version: int) -> StoredKey:
        t = self.table
        with self._connect() as conn:
            row = conn.execute(
                sa.select(*self._columns()).where(t.c.name == name, t.c.version == version)
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
        q = sa.select(*self._columns()).order_by(t.c.name, t.c.version)
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
        write lock on SQLite) until the transaction ends. ``activated_at`` records the moment
        on the database's clock (where the table has the column).
        """
        dates = {"activated_at": utc_now()} if self._dates_present(recheck=True) else {}
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
            conn.execute(t.update().where(mine).values(state=KeyState.ACTIVE.value, **dates))

    def set_state(self, name: str, version: int, state: KeyState) -> None:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.update().where(t.c.name == name, t.c.version == version).values(state=state.value)
            )

    def retire(self, name: str, version: int) -> None:
        """Mark ``version`` RETIRED, noting when on the database's clock (needs :meth:`upgrade`)."""
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.name == name, t.c.version == version)
                .values(state=KeyState.RETIRED.value, retired_at=utc_now())
            )

    def superseded_at(self, name: str, version: int) -> datetime | None:
        """When a version higher than ``version`` first became active (database clock)."""
        t = self.table
        with self._connect() as conn:
            when: datetime | None = conn.execute(
                sa.select(sa.func.min(t.c.activated_at)).where(
                    t.c.name == name, t.c.version > version
                )
            ).scalar_one()
        return when

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

    def destroy(self, name: str, version: int) -> Erased:
        """Erase the wrapped key of a version: values under it can never be decrypted again.

        The row stays as a tombstone (state ``destroyed``, empty wrapped key) so that its
        version number is never reused. The wrapped key is first overwritten with zeros of the
        same length, which MySQL/MariaDB and SQLite (with ``secure_delete``, set here) write
        over the old bytes in place; PostgreSQL writes a new row version instead, so the table
        is rewritten without the old one by a VACUUM FULL after the commit. What this cannot
        reach (logs, backups, replicas) is listed by :func:`erasure.erasure_limits`.
        """
        t = self.table
        mine = (t.c.name == name) & (t.c.version == version)
        with self.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA secure_delete = ON")  # zero the freed space
            length = conn.execute(sa.select(sa.func.length(t.c.wrapped_key)).where(mine))
            zeros = bytes(int(length.scalar_one_or_none() or 0))
            conn.execute(t.update().where(mine).values(wrapped_key=zeros))
            conn.execute(
                t.update().where(mine).values(wrapped_key=b"", state=KeyState.DESTROYED.value)
            )
            if conn.dialect.name != "postgresql":
                return Erased(conn.dialect.name, vacuumed=None)
            # After the writes: a transaction begun later has a newer transaction id.
            after = sa.text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")
            destroyed_at = conn.execute(after).scalar_one()
        return vacuum_full(self.engine, self.table, destroyed_at)

    # Helpers ---------------------------------------------------------------------------------

    def _columns(self) -> list[sa.Column[Any]]:
        """The key table's columns, without the lifecycle dates if the table predates them."""
        if self._dates_present():
            return list(self.table.c)
        return [c for c in self.table.c if c.name not in LIFECYCLE_COLUMNS]

    def _dates_present(self, *, recheck: bool = False) -> bool:
        """Whether the table has ``activated_at`` and ``retired_at``; cached once True."""
        if self._has_dates is None or (recheck and not self._has_dates):
            t = self.table
            try:
                names = {c["name"] for c in sa.inspect(self.engine).get_columns(t.name, t.schema)}
            except sa.exc.NoSuchTableError:
                return True  # reads then fail with the "create the table" message
            self._has_dates = set(LIFECYCLE_COLUMNS) <= names
        return self._has_dates

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


# Microseconds on MySQL/MariaDB too (their DATETIME keeps whole seconds by default).
_TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


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
        sa.Column("activated_at", _TIMESTAMP, nullable=True),
        sa.Column("retired_at", _TIMESTAMP, nullable=True),
    )


def _stored(row: sa.Row[Any]) -> StoredKey:
    m = row._mapping
    return StoredKey(
        name=str(m["name"]),
        version=int(m["version"]),
        wrapped_key=bytes(m["wrapped_key"]),
        master_key_id=str(m["master_key_id"]),
        state=KeyState(m["state"]),
        created_at=m["created_at"],
        kind=str(m["kind"]),
        activated_at=m.get("activated_at"),
        retired_at=m.get("retired_at"),
    )

"""Alembic operations for data keys and column re-encryption.

Import this module in ``env.py`` (``import sqlalchemy_kms_field.alembic_ops``) and configure the
registry there (``sqlalchemy_kms_field.configure(...)``); then, in a migration::

    def upgrade():
        op.rotate_data_key("pii")
        op.reencrypt_column("users", "email", key="pii", batch_size=2000)

Alembic runs a migration inside a transaction, but a re-encryption must commit batch by batch
so that a killed job loses nothing and resumes. The operations therefore enter Alembic's
``autocommit_block()``: the migration's transaction so far is COMMITTED first, then each batch
commits on its own connection together with its checkpoint. Keep data-key operations in a
migration of their own, with no schema changes after them. If the job is killed, the revision
is not stamped; running ``alembic upgrade`` again resumes where it stopped. ``rotate_data_key``
does not rotate again on that rerun while a re-encryption to the active version is unfinished.

Offline ``--sql`` mode is refused: re-encryption needs Python, not SQL.

For autogenerate, pass the two hooks of this module to ``context.configure`` in ``env.py``:
``render_item=render_item`` (adds ``import sqlalchemy_kms_field`` to migrations that use our
column types) and ``include_object=include_object`` (keeps autogenerate from proposing to drop
the library's own tables, which hold the wrapped keys).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations

from . import census
from .blind_index import BlindIndex
from .exc import ConfigurationError
from .lifecycle import rewrap_data_keys
from .reencrypt import Operation, run_job, unfinished_jobs
from .registry import get_registry
from .tenants import tenant_table

log = logging.getLogger(__name__)


LIBRARY_TABLES = frozenset(
    {"kms_field_keys", "kms_field_jobs", "kms_field_columns", "kms_field_tenant_keys"}
)


def render_item(type_: str, obj: Any, autogen_context: Any) -> Literal[False]:
    """Alembic ``render_item`` hook: import this library in migrations that use its types."""
    from .blind_index import BlindIndex
    from .types import _EncryptedType

    if type_ == "type" and isinstance(obj, (_EncryptedType, BlindIndex)):
        autogen_context.imports.add("import sqlalchemy_kms_field")
    return False  # render as usual: sqlalchemy_kms_field.EncryptedString(320, key='pii')


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic ``include_object`` hook: never propose to drop the library's own tables."""
    return not (type_ == "table" and reflected and compare_to is None and name in LIBRARY_TABLES)


def _online(operations: Operations, what: str) -> None:
    if operations.get_context().as_sql:
        raise ConfigurationError(
            f"op.{what}() cannot run in offline --sql mode: it needs Python to encrypt and "
            "decrypt; run this migration online (without --sql)"
        )


@Operations.register_operation("create_key_store")
class CreateKeyStoreOp(MigrateOperation):
    """Create the tables the library uses: wrapped data keys, job checkpoints, known columns,
    tenant keys."""

    @classmethod
    def create_key_store(cls, operations: Operations) -> Any:
        return operations.invoke(cls())


@Operations.implementation_for(CreateKeyStoreOp)
def _create_key_store(operations: Operations, operation: CreateKeyStoreOp) -> None:
    _online(operations, "create_key_store")
    bind = operations.get_bind()
    registry = get_registry()
    registry.key_store.metadata.create_all(bind, checkfirst=True)
    census.create_tables(bind)
    tenant_table(sa.MetaData(schema=registry.key_store.table.schema)).create(bind, checkfirst=True)


class _KeyOp(MigrateOperation):
    """Create or rotate a data key or a blind-index key, in its own committed transaction."""

    kind: str  # "data" or "index"
    action: str  # "create" or "rotate"

    def __init__(self, name: str) -> None:
        self.name = name


def _run_key_op(operations: Operations, op: _KeyOp) -> None:
    _online(operations, f"{op.action}_{op.kind}_key")
    registry = get_registry()
    with operations.get_context().autocommit_block():
        if op.action == "create":
            create = registry.create_data_key if op.kind == "data" else registry.create_index_key
            create(op.name, exist_ok=True)
            return
        # A rerun of this migration after a kill resumes instead of rotating again: the
        # rotation is recorded with the revision the database was at when it happened.
        if _rotated_here(operations, op.name) or _resuming(
            operations, op.name, "reencrypt" if op.kind == "data" else "reindex"
        ):
            return
        rotate = registry.rotate_data_key if op.kind == "data" else registry.rotate_index_key
        _record_rotation(operations, op.name, rotate(op.name).version)


_ROTATIONS = "(alembic rotations)"  # table_name of rotation records in kms_field_jobs


def _rotation_record(name: str) -> list[Any]:
    j = census.jobs_table.c
    return [
        j.table_schema == "",
        j.table_name == _ROTATIONS,
        j.column_name == name,
        j.operation == "rotate",
    ]


def _heads(operations: Operations) -> str:
    return json.dumps(sorted(operations.get_context().get_current_heads()))


def _rotated_here(operations: Operations, name: str) -> bool:
    """True if this key was rotated while the database was at the current revision."""
    engine = operations.get_bind().engine
    census.create_tables(engine)
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(census.jobs_table).where(*_rotation_record(name))
        ).one_or_none()
    active = get_registry().key_store.active_version(name)
    return row is not None and row.last_key == _heads(operations) and row.target_version == active


def _record_rotation(operations: Operations, name: str, version: int) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    values = {
        "key_name": name,
        "target_version": version,
        "last_key": _heads(operations),
        "rows_done": 0,
        "rows_skipped": 0,
        "started_at": now,
        "updated_at": now,
        "finished_at": now,
    }
    with operations.get_bind().engine.begin() as conn:
        t = census.jobs_table
        if not conn.execute(sa.update(t).where(*_rotation_record(name)).values(values)).rowcount:
            conn.execute(
                sa.insert(t).values(
                    table_schema="",
                    table_name=_ROTATIONS,
                    column_name=name,
                    operation="rotate",
                    **values,
                )
            )


@Operations.register_operation("create_data_key")
class CreateDataKeyOp(_KeyOp):
    """Create version 1 of a data key (nothing happens if the key already exists)."""

    kind, action = "data", "create"

    @classmethod
    def create_data_key(cls, operations: Operations, name: str) -> Any:
        return operations.invoke(cls(name))


@Operations.register_operation("rotate_data_key")
class RotateDataKeyOp(_KeyOp):
    """Make a new data key version active, unless a re-encryption to the active one is unfinished.

    The exception makes a rerun after a killed ``reencrypt_column`` resume that job instead of
    rotating once more.
    """

    kind, action = "data", "rotate"

    @classmethod
    def rotate_data_key(cls, operations: Operations, name: str) -> Any:
        return operations.invoke(cls(name))


@Operations.register_operation("create_index_key")
class CreateIndexKeyOp(_KeyOp):
    """Create version 1 of a blind-index key (nothing happens if it already exists)."""

    kind, action = "index", "create"

    @classmethod
    def create_index_key(cls, operations: Operations, name: str) -> Any:
        return operations.invoke(cls(name))


@Operations.register_operation("rotate_index_key")
class RotateIndexKeyOp(_KeyOp):
    """A new index-key version, unless a reindex to the active one is unfinished."""

    kind, action = "index", "rotate"

    @classmethod
    def rotate_index_key(cls, operations: Operations, name: str) -> Any:
        return operations.invoke(cls(name))


for _key_op in (CreateDataKeyOp, RotateDataKeyOp, CreateIndexKeyOp, RotateIndexKeyOp):
    Operations.implementation_for(_key_op)(_run_key_op)


def _resuming(operations: Operations, name: str, job: str) -> bool:
    """True if a ``job`` to the active version of key ``name`` is unfinished (a rerun)."""
    active = get_registry().key_store.active_version(name)
    engine = operations.get_bind().engine
    for row in unfinished_jobs(engine, name):
        if row.operation == job and row.target_version == active:
            log.info(
                "key %r: %s to version %s unfinished; resuming it rather than rotating again",
                name,
                job,
                active,
            )
            return True
    return False


class _ColumnJobOp(MigrateOperation):
    """A column job. ``context=``, ``codec=``, ``pad=`` and ``bind_to=`` say where the values
    belong, as the column type declares it (see ``reencrypt.run_job``); without them the job
    binds values to ``table_name.column_name`` and learns the codec from the column's kf2
    values. A text column holding only kf1 values (written before format kf2) needs ``codec=``.
    """

    operation: Operation

    def __init__(self, table: str, column: str, key: str, kwargs: dict[str, Any]) -> None:
        self.table = table
        self.column = column
        self.key = key
        self.kwargs = kwargs


def _run_column_job(operations: Operations, op: _ColumnJobOp) -> None:
    _online(operations, f"{op.operation}_column")
    with operations.get_context().autocommit_block():
        engine = operations.get_bind().engine
        run_job(engine, op.table, op.column, key=op.key, operation=op.operation, **op.kwargs)


@Operations.register_operation("reencrypt_column")
class ReencryptColumnOp(_ColumnJobOp):
    """Re-encrypt every row of a column to the active version of its data key."""

    operation: Operation = "reencrypt"

    @classmethod
    def reencrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        key: str,
        schema: str | None = None,
        batch_size: int = 2000,
        context: str | tuple[str, str] | None = None,
        codec: str | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> Any:
        kwargs.update(schema=schema, batch_size=batch_size, context=context, codec=codec)
        kwargs.update(pad=pad, bind_to=bind_to)
        return operations.invoke(cls(table_name, column_name, key, kwargs))


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(_ColumnJobOp):
    """Encrypt an existing plaintext column in place (widen it first)."""

    operation: Operation = "encrypt"

    @classmethod
    def encrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        key: str,
        schema: str | None = None,
        batch_size: int = 2000,
        context: str | tuple[str, str] | None = None,
        codec: str | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> Any:
        kwargs.update(schema=schema, batch_size=batch_size, context=context, codec=codec)
        kwargs.update(pad=pad, bind_to=bind_to)
        return operations.invoke(cls(table_name, column_name, key, kwargs))

    def reverse(self) -> MigrateOperation:
        return DecryptColumnOp(self.table, self.column, self.key, self.kwargs)


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(_ColumnJobOp):
    """Decrypt an encrypted column back to plaintext in place."""

    operation: Operation = "decrypt"

    @classmethod
    def decrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        key: str,
        schema: str | None = None,
        batch_size: int = 2000,
        context: str | tuple[str, str] | None = None,
        codec: str | None = None,
        pad: int | None = None,
        bind_to: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> Any:
        kwargs.update(schema=schema, batch_size=batch_size, context=context, codec=codec)
        kwargs.update(pad=pad, bind_to=bind_to)
        return operations.invoke(cls(table_name, column_name, key, kwargs))

    def reverse(self) -> MigrateOperation:
        return EncryptColumnOp(self.table, self.column, self.key, self.kwargs)


for _op in (ReencryptColumnOp, EncryptColumnOp, DecryptColumnOp):
    Operations.implementation_for(_op)(_run_column_job)


@Operations.register_operation("reindex_column")
class ReindexColumnOp(_ColumnJobOp):
    """Recompute a blind-index column under the active version of its index key."""

    operation: Operation = "reindex"

    @classmethod
    def reindex_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        index: BlindIndex,
        schema: str | None = None,
        batch_size: int = 2000,
        **kwargs: Any,
    ) -> Any:
        kwargs.update(schema=schema, batch_size=batch_size, index=index)
        return operations.invoke(cls(table_name, column_name, index.key, kwargs))


Operations.implementation_for(ReindexColumnOp)(_run_column_job)


@Operations.register_operation("rewrap_data_keys")
class RewrapDataKeysOp(MigrateOperation):
    """Rewrap every data key under the configured master key; no data row changes."""

    @classmethod
    def rewrap_data_keys(cls, operations: Operations) -> Any:
        return operations.invoke(cls())


@Operations.implementation_for(RewrapDataKeysOp)
def _rewrap(operations: Operations, operation: RewrapDataKeysOp) -> None:
    _online(operations, "rewrap_data_keys")
    with operations.get_context().autocommit_block():
        rewrap_data_keys()

"""Alembic operations for data keys and column re-encryption.

``env.py`` sets them up with :func:`sqlalchemy_kms_field.alembic_env.run_migrations` (or imports
this module and calls ``sqlalchemy_kms_field.configure(...)`` itself); then, in a migration::

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

For autogenerate, pass the hooks of this module to ``context.configure`` in ``env.py``:
``render_item=render_item`` (adds ``import sqlalchemy_kms_field`` to migrations that use our
column types), ``include_object=include_object`` (keeps autogenerate from proposing to drop
the library's own tables, which hold the wrapped keys) and
``process_revision_directives=process_revision_directives`` (a plaintext column turned into an
encrypted one gets its ``op.encrypt_column`` step). :mod:`sqlalchemy_kms_field.alembic_env`
does all of this, and the configuration, in one call.

Progress (one line every few seconds) and waits are logged through Alembic's own logger
(``alembic.kms_field``), which Alembic's default ``alembic.ini`` shows at INFO.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations

from . import census
from .blind_index import BlindIndex
from .exc import ConfigurationError
from .key_store import LIFECYCLE_COLUMNS, SqlKeyStore
from .lifecycle import rewrap_data_keys
from .reencrypt import WAIT_LOG, Operation, run_job, unfinished_jobs
from .reencrypt import tables as job_tables
from .registry import KeyRegistry, get_registry
from .tenants import tenant_table

log = logging.getLogger(__name__)
# What a migration shows while it works: Alembic's default alembic.ini prints INFO of "alembic".
progress_log = logging.getLogger("alembic.kms_field")
PROGRESS_EVERY = 5.0  # seconds between two progress lines of a column job


# Never dropped by autogenerate: the wrapped keys, the job records and checkpoints (ranges,
# workers and control of a job under way), the census and the tenant keys.
LIBRARY_TABLES = frozenset(
    {"kms_field_keys", "kms_field_jobs", "kms_field_columns", "kms_field_tenant_keys"}
    | {table.name for table in job_tables.TABLES}
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


_why_not_configured: str | None = None


def not_configured_because(reason: str | None) -> None:
    """Remember why ``env.py`` left the library unconfigured, for the operations' error."""
    global _why_not_configured
    _why_not_configured = reason


def _registry(what: str) -> KeyRegistry:
    """The configured registry, or an error saying how ``env.py`` configures it."""
    try:
        return get_registry()
    except ConfigurationError:
        because = f" ({_why_not_configured})" if _why_not_configured else ""
        raise ConfigurationError(
            f"op.{what}() needs sqlalchemy_kms_field configured in env.py{because}: call "
            "sqlalchemy_kms_field.alembic_env.run_migrations(context, target_metadata=...) "
            "there (it configures from KMS_FIELD_DATABASE_URL and KMS_FIELD_MASTER_KEY, as "
            "kms-field does), or sqlalchemy_kms_field.configure(master_key=..., key_store=...) "
            "before context.run_migrations()"
        ) from None


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
    try:
        store = get_registry().key_store
    except ConfigurationError:  # creating tables needs no master key: the default table
        store = SqlKeyStore(bind.engine)
    store.metadata.create_all(bind, checkfirst=True)
    census.create_tables(bind)
    tenant_table(sa.MetaData(schema=store.table.schema)).create(bind, checkfirst=True)
    # A key table made by an earlier release lacks the lifecycle columns: add them, as
    # SqlKeyStore.create_table() does (on the store's own connection, hence committed first).
    t = store.table
    present = {c["name"] for c in sa.inspect(bind).get_columns(t.name, t.schema)}
    if not set(LIFECYCLE_COLUMNS) <= present:
        with operations.get_context().autocommit_block():
            store.upgrade()


class _KeyOp(MigrateOperation):
    """Create or rotate a data key or a blind-index key, in its own committed transaction."""

    kind: str  # "data" or "index"
    action: str  # "create" or "rotate"

    def __init__(self, name: str) -> None:
        self.name = name


def _run_key_op(operations: Operations, op: _KeyOp) -> None:
    _online(operations, f"{op.action}_{op.kind}_key")
    registry = _registry(f"{op.action}_{op.kind}_key")
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
    active = _registry("rotate_data_key").key_store.active_version(name)
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
    what = "rotate_data_key" if job == "reencrypt" else "rotate_index_key"
    active = _registry(what).key_store.active_version(name)
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
    what = f"{op.operation}_column"
    _online(operations, what)
    if op.operation == "encrypt":
        _refuse_tenant_column(operations, op)
    registry = _registry(what)
    options = {"progress": _Progress(f"{op.operation} {op.table}.{op.column}"), **op.kwargs}
    with operations.get_context().autocommit_block(), _waits_shown():
        engine = operations.get_bind().engine
        result = run_job(
            engine,
            op.table,
            op.column,
            key=op.key,
            operation=op.operation,
            registry=registry,
            **options,
        )
    progress_log.info(
        "%s %s.%s finished: %d rows written, %d conflicts, %d skipped",
        op.operation,
        op.table,
        op.column,
        result.rows_written,
        result.rows_conflicted,
        len(result.skipped),
    )


def _refuse_tenant_column(operations: Operations, op: _ColumnJobOp) -> None:
    """The models (env.py's target_metadata) declare the column with tenant=: encrypt_column
    would put every value under the shared key, which the application then refuses."""
    metadata = operations.get_context().opts.get("target_metadata")
    schema = op.kwargs.get("schema")
    metas = metadata if isinstance(metadata, (list, tuple)) else [metadata]
    for meta in (m for m in metas if m is not None):
        declared = census.declared_column(meta, op.table, op.column, schema)
        tenant = None if declared is None else getattr(declared.type, "tenant", None)
        if tenant is not None:
            raise ConfigurationError(
                f"op.encrypt_column({op.table!r}, {op.column!r}): the models declare it with "
                f"tenant={tenant!r}, so each value goes under its row's tenant key, and "
                "encrypt_column knows one data key per column; drop this step and run "
                f"`kms-field tenants encrypt {op.table}.{op.column}` after the migration"
            )


class _Progress:
    """A job's progress as log lines: the first batch, then one line every few seconds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown_at: float | None = None
        self.started = time.monotonic()

    def __call__(self, done: int, todo: int) -> None:
        now = time.monotonic()
        if self.shown_at is not None and now - self.shown_at < PROGRESS_EVERY and done < todo:
            return
        self.shown_at = now
        rate = done / max(now - self.started, 1e-9)
        share = f" ({100 * done / todo:.0f}%)" if todo else ""
        progress_log.info("%s: %d of %d rows%s, %.0f rows/s", self.label, done, todo, share, rate)


@contextmanager
def _waits_shown() -> Iterator[None]:
    """The job's waits (for other processes to see a rotation) on Alembic's logger, once."""
    if WAIT_LOG.isEnabledFor(logging.INFO):  # env.py's logging shows them already
        yield
        return
    forward = _Forward()
    level, propagate = WAIT_LOG.level, WAIT_LOG.propagate
    WAIT_LOG.setLevel(logging.INFO)
    WAIT_LOG.propagate = False
    WAIT_LOG.addHandler(forward)
    try:
        yield
    finally:
        WAIT_LOG.removeHandler(forward)
        WAIT_LOG.setLevel(level)
        WAIT_LOG.propagate = propagate


class _Forward(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        progress_log.log(record.levelno, "%s", record.getMessage())


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
    registry = _registry("rewrap_data_keys")
    with operations.get_context().autocommit_block():
        rewrap_data_keys(registry=registry)


# Autogenerate: a plaintext column that becomes encrypted -----------------------------------------
#
# Autogenerate sees only a type change (String(320) -> EncryptedString(320, key='pii')) and
# renders a bare alter_column: the column is widened, its rows stay plaintext, and every read
# of them then fails. The hook adds the data step that goes with it: op.encrypt_column after the
# ALTER in upgrade() (op.decrypt_column before it in downgrade()), and the reverse for an
# encrypted column made plaintext again.

_PLAINTEXT_WINDOW = (
    "# sqlalchemy_kms_field: {table}.{column} holds plaintext until the next line has run;\n"
    "# declare its type with accept_plaintext=True in the models until this migration has run\n"
    "# everywhere (then drop that flag). See README, 'Encrypting an existing plaintext column'."
)


def _encrypted(type_: Any) -> bool:
    from .types import _EncryptedType

    return isinstance(type_, _EncryptedType)


def process_revision_directives(context: Any, revision: Any, directives: list[Any]) -> None:
    """Alembic hook: add ``op.encrypt_column``/``op.decrypt_column`` to a type change that
    makes a column encrypted (or plaintext again), in upgrade() and downgrade()."""
    from alembic.operations import ops

    for script in directives:
        if not isinstance(script, ops.MigrationScript):
            continue
        for container in (*script.upgrade_ops_list, *script.downgrade_ops_list):
            container.ops[:] = _with_data_steps(container.ops)


def _with_data_steps(steps: list[Any]) -> list[Any]:
    from alembic.operations import ops

    out: list[Any] = []
    for step in steps:
        before: list[MigrateOperation] = []
        after: list[MigrateOperation] = []
        if isinstance(step, ops.ModifyTableOps):
            for alter in step.ops:
                if not isinstance(alter, ops.AlterColumnOp) or alter.modify_type is None:
                    continue
                new, old = alter.modify_type, alter.existing_type
                if _encrypted(new) and not _encrypted(old):
                    if new.tenant is not None:
                        after.append(TenantColumnNote(step, alter, "encrypt"))
                    else:
                        after.append(_column_step(EncryptColumnOp, step, alter, new))
                elif _encrypted(old) and not _encrypted(new):
                    if getattr(old, "tenant", None) is not None:
                        before.append(TenantColumnNote(step, alter, "decrypt"))
                    else:
                        before.append(_column_step(DecryptColumnOp, step, alter, old))
        out.extend([*before, step, *after])
    return out


def _column_step(cls: type[_ColumnJobOp], table: Any, alter: Any, type_: Any) -> _ColumnJobOp:
    kwargs: dict[str, Any] = {"schema": table.schema}
    if type_.context is not None:
        kwargs["context"] = ".".join(type_.context)
    if type_.codec != ("bytes" if type_._binary else "str"):
        kwargs["codec"] = type_.codec
    if type_.bind_to:
        kwargs["bind_to"] = type_.bind_to
    return cls(table.table_name, alter.column_name, type_.key, kwargs)


class TenantColumnNote(MigrateOperation):
    """What autogenerate writes, as comments, beside a type change of a column with ``tenant=``:
    its values go under one key per tenant, which ``op.encrypt_column`` cannot do (it would put
    them all under the shared key, and the application refuses those in a tenant column)."""

    def __init__(self, table: Any, alter: Any, operation: str) -> None:
        self.table, self.column = table.table_name, alter.column_name
        self.schema, self.operation = table.schema, operation

    def reverse(self) -> TenantColumnNote:  # (never asked: autogenerate builds both sides)
        return self


def _render_tenant_note(autogen_context: Any, op: TenantColumnNote) -> list[str]:
    where = f"{op.schema}.{op.table}.{op.column}" if op.schema else f"{op.table}.{op.column}"
    if op.operation == "encrypt":
        return [
            f"# sqlalchemy_kms_field: {where} is declared with tenant=: each value goes under its",
            "# row's tenant key, which op.encrypt_column cannot do. After this migration has run,",
            f"# run `kms-field tenants encrypt {where}` (resumable), and declare the type with",
            "# accept_plaintext=True in the models until that has run.",
        ]
    return [
        f"# sqlalchemy_kms_field: {where} holds values under tenant keys, which op.decrypt_column",
        "# cannot read: bring them back to plaintext through the application before this runs.",
    ]


def _render_column_step(autogen_context: Any, op: _ColumnJobOp) -> list[str]:
    args = [repr(op.table), repr(op.column), f"key={op.key!r}"]
    args += [f"{name}={value!r}" for name, value in op.kwargs.items() if value is not None]
    call = f"op.{op.operation}_column({', '.join(args)})"
    if op.operation == "encrypt":
        comment = _PLAINTEXT_WINDOW.format(table=op.table, column=op.column)
        return [*comment.splitlines(), call]
    return [call]


def _register_renderers() -> None:
    from alembic.autogenerate import renderers

    for cls in (EncryptColumnOp, DecryptColumnOp):
        renderers.dispatch_for(cls)(_render_column_step)
    renderers.dispatch_for(TenantColumnNote)(_render_tenant_note)


_register_renderers()

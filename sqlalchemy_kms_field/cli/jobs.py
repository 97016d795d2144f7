"""The column jobs: reencrypt, encrypt-column, decrypt-column and reindex.

Each runs :func:`sqlalchemy_kms_field.reencrypt.run_job` (batched, resumable, compare-and-swap)
and reports what it did. A blind index (for ``reindex``, and ``encrypt-column --index-column``)
is declared by the models or by flags; when both declare it they must agree.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import reencrypt
from ..blind_index import BlindIndex
from ..census import ColumnRef
from ..registry import KeyRegistry
from .app import App, key_kind
from .config import ENV, PROG
from .errors import Refused, UsageError
from .job_control import Joiners, worker_options
from .models import IndexFlags, choose_index, declared_index, indexes_of_source
from .output import JobProgress


def parse_column(text: str, schema: str | None) -> tuple[str | None, str, str]:
    parts = text.split(".")
    if len(parts) == 3 and all(parts) and schema is None:
        return parts[0], parts[1], parts[2]
    if len(parts) != 2 or not all(parts):
        raise UsageError(
            f"expected TABLE.COLUMN (and --schema S, or SCHEMA.TABLE.COLUMN), got {text!r}"
        )
    return schema, parts[0], parts[1]


def cmd_job(app: App, args: argparse.Namespace) -> int:
    """reencrypt, encrypt-column and decrypt-column (``args.operation``)."""
    operation: reencrypt.Operation = args.operation
    schema, table, column = parse_column(args.column, args.schema)
    index, index_column = _companion_index(app, args, schema, table, column)
    registry = app.registry(master=True)
    key = args.key or _default_key(app, registry, schema, table, column)
    ref = ColumnRef(table, column, key, schema)
    if key_kind(registry, key) == "index":
        raise UsageError(
            f"{key!r} is a blind-index key, not a data key: `{PROG} reindex {ref}` recomputes "
            "a blind-index column"
        )
    target = None if operation == "decrypt" else registry.active_key(key)
    version = f"data key {key!r} version {target.version}" if target else ""
    goal = {
        "reencrypt": f"re-encrypted to {version}",
        "encrypt": f"encrypted under {version}",
        "decrypt": f"decrypted to plaintext (data key {key!r})",
    }[operation]
    options: dict[str, Any] = {"key": key, "operation": operation}
    options.update(_format_options(app, args, schema, table, column))
    if index is not None:
        index_version = registry.index_keys(index.key)[0].version
        goal += (
            f", and blind index {index_column} computed under index key {index.key!r} "
            f"version {index_version}"
        )
        options.update(index=index, index_column=index_column)
    elif operation == "encrypt":
        _mention_declared_indexes(app, ref)
    return _run(app, args, registry, ref, goal, options)


def _format_options(
    app: App, args: argparse.Namespace, schema: str | None, table: str, column: str
) -> dict[str, Any]:
    """context, codec, pad and bind_to of the job: the flags, else what the models declare."""
    from ..types import _EncryptedType

    out: dict[str, Any] = {}
    metadata = app.metadata()
    declared = None
    if metadata is not None:
        for t in metadata.tables.values():
            if t.name == table and (t.schema or None) == schema and column in t.c:
                declared = t.c[column].type
    tenant = getattr(declared, "tenant", None)
    if tenant is not None and args.operation == "encrypt":
        # (reencrypt and decrypt-column refuse tenant values when the job starts, models or not)
        where = f"{schema}.{table}.{column}" if schema else f"{table}.{column}"
        raise Refused(
            f"the models declare {where} with tenant={tenant!r}: each value goes under its "
            f"row's tenant key, and `{PROG} encrypt-column` knows one data key per column; "
            f"run `{PROG} tenants encrypt {where}`"
        )
    if isinstance(declared, _EncryptedType):
        out = {"context": declared.place(), "codec": declared.codec, "pad": declared.pad}
        out["bind_to"] = declared.bind_to
    if args.context is not None:
        out["context"] = args.context
    if args.codec is not None:
        out["codec"] = args.codec
    if getattr(args, "pad", None) is not None:
        out["pad"] = args.pad
    if args.bind_to is not None:
        out["bind_to"] = tuple(name.strip() for name in args.bind_to.split(",") if name.strip())
    return out


def _companion_index(
    app: App, args: argparse.Namespace, schema: str | None, table: str, column: str
) -> tuple[BlindIndex | None, str | None]:
    """The blind index that encrypt-column fills in the same pass (--index-column), if any."""
    if getattr(args, "index_column", None) is None:
        if any(
            getattr(args, name, None) is not None for name in ("index_key", "normalizer", "bits")
        ):
            raise UsageError(
                "--index-key, --normalizer and --bits describe the blind index that --index-column "
                "names: pass --index-column COLUMN too"
            )
        return None, None
    flags = IndexFlags(
        column, args.index_key, args.normalizer, args.bits, source_flag=None, key_flag="--index-key"
    )
    where = str(ColumnRef(table, args.index_column, "", schema))
    index = choose_index(
        declared_index(app.metadata(), schema, table, args.index_column), flags, where
    )
    if index.source != column:
        raise UsageError(
            f"the models declare blind index {where} over column {index.source!r}, not over "
            f"{column!r}"
        )
    return index, args.index_column


def _mention_declared_indexes(app: App, ref: ColumnRef) -> None:
    for name in indexes_of_source(app.metadata(), ref.schema, ref.table, ref.column):
        index = str(ColumnRef(ref.table, name, "", ref.schema))
        app.say(
            f"note: the models declare blind index {index} over {ref}: pass --index-column "
            f"{name} to fill it in this pass, or run `{PROG} reindex {index}` afterwards"
        )


def cmd_reindex(app: App, args: argparse.Namespace) -> int:
    """Recompute a blind-index column under the active version of its index key."""
    schema, table, column = parse_column(args.column, args.schema)
    flags = IndexFlags(args.source, args.key, args.normalizer, args.bits)
    where = str(ColumnRef(table, column, "", schema))
    index = choose_index(declared_index(app.metadata(), schema, table, column), flags, where)
    registry = app.registry(master=True)
    target = registry.index_keys(index.key)[0]
    ref = ColumnRef(table, column, index.key, schema)
    goal = f"reindexed under index key {index.key!r} version {target.version}"
    options: dict[str, Any] = {"key": index.key, "operation": "reindex", "index": index}
    return _run(app, args, registry, ref, goal, options)


def _run(
    app: App,
    args: argparse.Namespace,
    registry: KeyRegistry,
    ref: ColumnRef,
    goal: str,
    options: dict[str, Any],
) -> int:
    operation = options["operation"]
    options.update(
        schema=ref.schema,
        batch_size=args.batch_size,
        rows_per_second=args.rate,
        skip_undecryptable=args.skip_undecryptable,
        registry=registry,
    )
    options.update(worker_options(args))
    engine = registry.key_store.engine
    if args.dry_run:
        result = reencrypt.run_job(engine, ref.table, ref.column, dry_run=True, **options)
        app.say(f"dry run: {result.remaining:,} rows of {ref} would be {goal}; nothing was written")
        return 0
    app.say(f"{operation} {ref}: rows will be {goal}")
    crew = Joiners(app, args)
    try:
        with JobProgress(app, f"{operation} {ref}") as progress:
            result = reencrypt.run_job(
                engine, ref.table, ref.column, progress=progress, on_start=crew.start, **options
            )
    except BaseException:
        crew.kill()
        raise
    crew.wait()
    state = "finished" if result.finished else "NOT finished: rerun to resume"
    app.say(f"{operation} {ref}: {state}")
    if result.context is not None and result.codec is not None:
        app.say(f"  bound to:     {'.'.join(result.context)}, codec {result.codec}")
    app.say(f"  rows written: {result.rows_written:,}")
    app.say(
        f"  conflicts:    {result.rows_conflicted:,} (rows the application changed meanwhile; "
        "left alone and swept again)"
    )
    app.say(f"  sweeps:       {result.sweeps}")
    if result.skipped:
        shown = ", ".join(repr(pk) for pk in result.skipped[:20])
        more = f" and {len(result.skipped) - 20} more" if len(result.skipped) > 20 else ""
        app.say(
            f"WARNING: {len(result.skipped):,} rows could not be decrypted and were skipped; "
            f"they are unchanged, and their key version cannot be retired while they remain. "
            f"Primary keys: {shown}{more}",
            style="bold red",
        )
    return 0


def _default_key(
    app: App, registry: KeyRegistry, schema: str | None, table: str, column: str
) -> str:
    keys = {
        ref.key
        for ref in app.known_columns(registry)
        if (ref.schema or None, ref.table, ref.column) == (schema, table, column)
    }
    if len(keys) == 1:
        return keys.pop()
    where = f"{schema}.{table}.{column}" if schema else f"{table}.{column}"
    if not keys:
        raise UsageError(
            f"no data key is known for {where}: pass --key NAME (or declare the column in the "
            f"models named by {ENV['models']})"
        )
    raise UsageError(
        f"{where} is known under several data keys ({', '.join(sorted(keys))}): pass --key NAME"
    )

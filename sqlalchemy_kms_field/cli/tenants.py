"""``kms-field tenants``: the keys of tenants (a data key per tenant): list, rewrap, rotate,
erase, restore. (The grammar is in ``tenants_grammar.py``; this module loads when one runs.)"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import sqlalchemy as sa

from .. import tenant_erasure
from ..tenants import TenantKeyring
from .app import App
from .errors import Refused, UsageError
from .output import ScanDisplay


def _keyring(app: App, *, master: bool) -> TenantKeyring:
    keyring = TenantKeyring(app.registry(master=master))
    if not sa.inspect(keyring.engine).has_table(keyring.table.name):
        raise Refused(f"there is no tenant key table {keyring.table.name!r}: run `kms-field setup`")
    return keyring


def cmd_tenants_list(app: App, args: argparse.Namespace) -> int:
    versions = _keyring(app, master=False).versions(args.key)
    for v in versions:
        wrapped = "-" if v.wrapped_by is None else f"{args.key} v{v.wrapped_by}"
        app.say(
            f"{v.tenant:<16} {v.key_name:<24} v{v.version:<3} {v.state:<9} wrapped by {wrapped}"
        )
    app.say(f"{len({v.key_name for v in versions})} tenants, {len(versions)} key versions")
    return 0


def cmd_tenants_rewrap(app: App, args: argparse.Namespace) -> int:
    keyring = _keyring(app, master=True)
    done = keyring.rewrap(args.key)
    active = keyring.registry.active_key(args.key).version
    app.say(f"{done} tenant key versions rewrapped under {args.key!r} version {active}")
    return 0


def cmd_tenants_rotate(app: App, args: argparse.Namespace) -> int:
    from ..tenant_rotation import reencrypt_tenant

    metadata = app.metadata()
    if metadata is None:
        raise UsageError(
            "`kms-field tenants rotate` re-encrypts the columns your models declare with "
            "tenant=: set KMS_FIELD_MODELS (or --models) to package.module:Base"
        )
    columns = [
        (table, column.name)
        for table in metadata.tables.values()
        for column in table.c
        if getattr(column.type, "tenant", None) is not None
        and getattr(column.type, "key", None) == args.key
    ]
    if not columns:
        raise Refused(f"the models declare no column with key={args.key!r} and tenant=")
    keyring = _keyring(app, master=True)
    if args.all == bool(args.tenants):
        raise UsageError("name the tenants to rotate, or pass --all (not both)")
    chosen = args.tenants or sorted(
        {v.tenant for v in keyring.versions(args.key) if v.state == "active"}
    )
    # Every key first: the wait for processes still writing under an old version then runs
    # once for all tenants, not once per tenant.
    versions = {tenant: keyring.rotate(args.key, tenant).version for tenant in chosen}
    for tenant in chosen:
        version = versions[tenant]
        rows = 0
        for table, column in columns:
            typ: Any = table.c[column].type
            value = _as_column_value(table.c[typ.tenant], tenant)
            job = reencrypt_tenant(
                table, column, value, batch_size=args.batch_size, keyring=keyring
            )
            rows += job.rows
        where = ", ".join(f"{t.name}.{c}" for t, c in columns)
        app.say(f"tenant {tenant!r}: key version {version}, {rows} rows re-encrypted ({where})")
    return 0


def cmd_tenants_encrypt(app: App, args: argparse.Namespace) -> int:
    from ..census import declared_column
    from ..tenant_rotation import encrypt_tenants
    from .jobs import parse_column

    schema, table_name, column = parse_column(args.column, args.schema)
    metadata = app.metadata()
    if metadata is None:
        raise UsageError(
            "`kms-field tenants encrypt` encrypts a column your models declare with tenant=: "
            "set KMS_FIELD_MODELS (or --models) to package.module:Base"
        )
    declared = declared_column(metadata, table_name, column, schema)
    if declared is None:
        raise Refused(f"the models declare no column {args.column}")
    table = declared.table
    if getattr(declared.type, "tenant", None) is None:
        raise Refused(
            f"the models declare {args.column} without tenant=: encrypt it with "
            f"`kms-field encrypt-column {args.column}`"
        )
    jobs = encrypt_tenants(
        table, column, batch_size=args.batch_size, keyring=_keyring(app, master=True)
    )
    rows = sum(job.rows for job in jobs)
    app.say(f"{args.column}: {rows} rows encrypted under the keys of {len(jobs)} tenants")
    return 0


def _as_column_value(column: sa.Column[Any], text: str) -> Any:
    """The tenant id typed on the command line, as the tenant column's Python type."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return text
    if python_type is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"tenant {text!r}: {column.name} holds integers") from None
    return text


def cmd_tenants_erase(app: App, args: argparse.Namespace) -> int:
    keyring = _keyring(app, master=False)
    label = f"census of tenant {args.tenant!r} of {args.key!r}"
    metadata = app.metadata()
    with ScanDisplay(app, label) as display:
        census = tenant_erasure.tenant_census(
            args.key,
            args.tenant,
            schemas=args.schema or (),
            progress=display,
            keyring=keyring,
            metadata=metadata,
        )
    states = ", ".join(f"v{v.version} {v.state}" for v in census.versions)
    app.say(f"tenant {census.tenant!r} of data key {args.key!r}: key {census.key_name} ({states})")
    for found in sorted(census.found, key=lambda f: f.column):
        app.say(f"  {found.column.table}.{found.column.column}: {found.rows} rows")
    app.say(f"  {census.rows} rows in {len(census.found)} columns will become unreadable")
    for index in census.indexes:
        app.say(
            f"  {index.column}: {index.rows} blind-index values (from {index.source}) will be "
            "set to NULL"
        )
    if metadata is None:
        app.say(
            "  blind-index values computed from these values are not looked for: set "
            "KMS_FIELD_MODELS (or --models) to have them set to NULL with the keys"
        )
    destroyed = all(v.state == "destroyed" for v in census.versions)
    if destroyed and not any(i.rows for i in census.indexes):
        app.say("already erased: its key versions are destroyed")
        return 0
    if not args.yes_erase and not _confirmed(app, census.tenant):
        raise Refused("not confirmed: nothing changed (pass --yes-erase to confirm)")
    if args.skip_grace_period:
        app.say("WARNING: --skip-grace-period: the keys are destroyed now, with no undo")
    done = tenant_erasure.erase_tenant(
        args.key,
        args.tenant,
        confirm=True,
        grace_period=args.grace_period,
        skip_grace_period=args.skip_grace_period,
        schemas=args.schema or (),
        keyring=keyring,
        metadata=metadata,
    )
    if done.indexes_cleared:
        app.say(f"{done.indexes_cleared} blind-index values set to NULL")
    if destroyed:
        return 0
    if done.stage == "retired":
        app.say(
            f"retired: every process refuses tenant {done.tenant!r} within active_ttl; "
            f"`kms-field tenants restore {args.key} {args.tenant}` undoes it until "
            f"{done.destroy_after:%Y-%m-%d %H:%M:%S} UTC (database clock); run this command "
            "again after that to destroy the keys for good"
        )
        return 0
    app.say(
        f"erased: the key versions of tenant {done.tenant!r} are destroyed; its values can "
        "never be decrypted again from this database. Copies of the tenant key table "
        f"(backups, replicas, logs) still hold them wrapped by {args.key!r}: rotate it, "
        f"`kms-field tenants rewrap {args.key}`, retire and destroy the old version, then "
        "`kms-field keys shred` the old master key to make those copies useless"
    )
    return 0


def cmd_tenants_restore(app: App, args: argparse.Namespace) -> int:
    tenant_erasure.restore_tenant(args.key, args.tenant, keyring=_keyring(app, master=False))
    app.say(f"tenant {args.tenant!r} of data key {args.key!r} restored: its keys are usable again")
    return 0


def _confirmed(app: App, tenant: str) -> bool:
    if not sys.stdin.isatty():
        return False
    app.say(f"Type the tenant id ({tenant}) to erase it: ")
    return sys.stdin.readline().strip() == tenant

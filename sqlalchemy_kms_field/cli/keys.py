"""``kms-field keys``: list, create, rotate, rewrap, retire and destroy data and index keys.

A name is either a data key (it encrypts values) or a blind-index key (the HMAC key of blind
indexes), as the key store records; each command finds out which and words itself, its guards
and its next steps (``reencrypt`` or ``reindex``) accordingly.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC

from .. import lifecycle, reencrypt
from ..envelope import DataKey, IndexKey
from ..erasure import Erased, erasure_limits
from ..key_store import KeyState
from ..master_keys import AwsKmsMasterKey
from ..registry import KeyRegistry
from .app import App, key_kind
from .config import ENV, FLAGS, PROG, master_key_from_spec
from .errors import Refused, UsageError
from .output import (
    ScanDisplay,
    add_row,
    census_table,
    job_column,
    key_json,
    keys_table,
    new_table,
    when,
)

# What moves a column's rows to the active version of a key of each kind.
JOB_COMMAND = {"data": "reencrypt", "index": "reindex"}


def article(kind: str) -> str:
    return "an" if kind == "index" else "a"


def cmd_keys_list(app: App, args: argparse.Namespace) -> int:
    stored = app.key_store().versions()
    if args.json:
        print(json.dumps([key_json(k) for k in stored], indent=2))
        return 0
    if not stored:
        app.say(f"no data keys yet; create one with `{PROG} keys create NAME`")
        return 0
    app.console.print(keys_table(None, stored))
    return 0


def cmd_keys_create(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=True)
    kind = "index" if args.index else "data"
    existing = key_kind(registry, args.name)
    if args.exist_ok and existing is not None:
        if existing != kind:
            raise Refused(
                f"{args.name!r} is the name of an existing {existing} key, not of "
                f"{article(kind)} {kind} key; choose another name"
            )
        app.say(f"{kind} key {args.name!r} already exists; nothing to do")
        return 0
    key: DataKey | IndexKey = (
        registry.create_index_key(args.name)
        if kind == "index"
        else registry.create_data_key(args.name)
    )
    stored = registry.key_store.get(key.name, key.version)
    app.say(
        f"created {kind} key {key.name!r} version {key.version}: wrapped by "
        f"{stored.master_key_id}, stored, verified and active"
    )
    return 0


def cmd_keys_rotate(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=True)
    name = args.name
    kind = key_kind(registry, name)
    if kind is None:
        raise Refused(
            f"no key named {name!r} in the key store; create it with `{PROG} keys create "
            f"{name}` (with --index for a blind-index key)"
        )
    job = JOB_COMMAND[kind]
    _refuse_while_moving(registry, name, kind, force=args.force)
    if kind == "index":
        version = registry.rotate_index_key(name).version
        still = "lookups match every live version until the reindex is done"
    else:
        version = registry.rotate_data_key(name).version
        still = "older versions stay readable"
    stored = registry.key_store.get(name, version)
    found = app.settings.get("active_ttl")
    ttl = f"{registry.active_ttl:g} s " + (f"from {found.source}" if found else "by default")
    app.say(
        f"{kind} key {name!r} version {version} is now active (wrapped by "
        f"{stored.master_key_id}); {still}. Applications switch to it within their "
        f"active_ttl ({ttl} here; give the application the same)."
    )
    columns = [ref for ref in app.known_columns(registry) if ref.key == name]
    for ref in columns:
        app.say(f"  next: {PROG} {job} {ref}")
    if not columns:
        app.say(f"  next: {PROG} {job} TABLE.COLUMN for every column under {name!r}")
    return 0


def _refuse_while_moving(registry: KeyRegistry, name: str, kind: str, *, force: bool) -> None:
    """Refuse a rotation while a job still moves rows to the active version (unless forced).

    Rotating then would leave that job's target behind: a rerun after a crash would have to
    start over toward the new version instead of resuming.
    """
    active = registry.key_store.active_version(name)
    blocking = [
        job
        for job in reencrypt.unfinished_jobs(registry.key_store.engine, key=name)
        if active is not None
        and job.target_version == active
        and (job.operation == "reindex") == (kind == "index")
    ]
    if not blocking or force:
        return
    detail = "; ".join(
        f"{job.operation} of {job_column(job)} ({job.rows_done:,} rows done, last progress "
        f"{when(job.updated_at)})"
        for job in blocking
    )
    raise Refused(
        f"refusing to rotate {name!r}: unfinished jobs move rows to its active version "
        f"{active}: {detail}. Finish them first (`{PROG} {JOB_COMMAND[kind]} TABLE.COLUMN`), "
        "or pass --force (they then start over toward the new version)"
    )


def cmd_keys_rewrap(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=True)
    names = args.names or None
    stored = registry.key_store.versions()
    for name in names or []:
        if not any(k.name == name for k in stored):
            raise Refused(f"no key named {name!r} in the key store")
    for k in stored:
        if names is not None and k.name not in names:
            continue
        if k.state not in (KeyState.ACTIVE, KeyState.READABLE, KeyState.RETIRED):
            continue
        masters = (registry.master_key, *registry.previous_master_keys)
        if not any(m.can_unwrap(k.master_key_id) for m in masters):
            raise UsageError(
                f"{k.kind} key {k.name!r} version {k.version} is wrapped by {k.master_key_id}, "
                f"which is not the master key: add the master key that wrapped it to "
                f"{ENV['previous_master_keys']} (or pass {FLAGS['previous_master_keys']})"
            )
    source = ... if args.from_application is None else (args.from_application or None)
    target = registry.application if source is ... else source
    kept = [
        k
        for k in stored
        if (names is None or k.name in names)
        and k.state in (KeyState.ACTIVE, KeyState.READABLE, KeyState.RETIRED)
        and lifecycle.already_rewrapped(registry, k, target)
    ]
    done = lifecycle.rewrap_data_keys(names, registry=registry, from_application=source)
    if kept:
        noun = "version is" if len(kept) == 1 else "versions are"
        app.say(f"{len(kept)} key {noun} already wrapped by the master key: left as they are")
    if not done:
        app.say("no key version to rewrap")
        return 0
    table = new_table(None, "name", "version", "from master key", "to master key")
    for r in done:
        add_row(table, r.name, r.version, r.old_master_key_id, r.new_master_key_id)
    app.console.print(table)
    kinds = {k.kind for k in stored if k.name in {r.name for r in done}}
    what = "data key" if kinds == {"data"} else "key"
    noun = "version" if len(done) == 1 else "versions"
    app.say(f"{len(done)} {what} {noun} rewrapped, each verified; no data row changed")
    return 0


def cmd_keys_retire(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=False)
    before = registry.key_store.get(args.name, args.version)
    if before.kind == "index" and before.state is not KeyState.RETIRED:
        _refuse_index_in_use(app, registry, args.name, args.version)
    label = f"census of {before.kind} key {args.name!r} v{args.version}"
    with ScanDisplay(app, label) as display:
        counts = lifecycle.retire_data_key(
            args.name,
            args.version,
            metadata=app.metadata(),
            columns=app.index_columns(),
            schemas=args.schema or (),
            progress=display,
            registry=registry,
        )
    if before.state is KeyState.RETIRED:
        app.say(f"{before.kind} key {args.name!r} version {args.version} was already retired")
        return 0
    if counts:
        app.console.print(census_table(args.name, registry.key_store.versions(args.name), counts))
    app.say(
        f"retired {before.kind} key {args.name!r} version {args.version}: no column of the "
        f"scanned schemas holds a row on it, and it no longer {_works(before.kind)}. After the "
        f"grace period, `{PROG} keys destroy {args.name} --version {args.version} "
        "--yes-destroy` erases it for good."
    )
    return 0


def _works(kind: str) -> str:
    return "matches in lookups" if kind == "index" else "decrypts"


def _refuse_index_in_use(app: App, registry: KeyRegistry, name: str, version: int) -> None:
    """The census rule of retire_data_key on the known columns, worded for an index key
    (reindex, not re-encrypt); retire_data_key then scans every other column."""
    if registry.key_store.active_version(name) == version:
        raise Refused(
            f"index key {name!r} version {version} is the active version; rotate it "
            f"(`{PROG} keys rotate {name}`) and reindex every column first"
        )
    refs = [ref for ref in app.known_columns(registry) if ref.key == name]
    counts = lifecycle.column_census(refs, registry=registry)
    still = [(c.column, c.by_version[version]) for c in counts if c.by_version.get(version)]
    if still:
        detail = ", ".join(f"{ref}: {n:,} rows" for ref, n in still)
        raise Refused(
            f"index key {name!r} version {version} is still used ({detail}); reindex these "
            f"columns before retiring it ({'; '.join(f'{PROG} reindex {r}' for r, _ in still)})"
        )


def cmd_keys_destroy(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=False)
    kind = registry.key_store.get(args.name, args.version).kind
    if args.skip_grace_period:
        app.say(
            f"WARNING: --skip-grace-period: {kind} key {args.name!r} version {args.version} "
            "may be destroyed before its grace period ends; there is no undo",
            style="bold red",
        )
    elif args.grace_period < lifecycle.DESTROY_GRACE_PERIOD:
        app.say(
            f"WARNING: --grace-period {args.grace_period:g} s is shorter than the default "
            f"({lifecycle.DESTROY_GRACE_PERIOD / 86400:g} days)",
            style="bold yellow",
        )
    with ScanDisplay(app, f"census of {kind} key {args.name!r} v{args.version}") as display:
        done = lifecycle.destroy_data_key(
            args.name,
            args.version,
            confirm=args.yes_destroy,
            grace_period=args.grace_period,
            skip_grace_period=args.skip_grace_period,
            metadata=app.metadata(),
            columns=app.index_columns(),
            schemas=args.schema or (),
            progress=display,
            registry=registry,
        )
    lost = (
        "no index value computed under it can ever be matched again"
        if kind == "index"
        else "any value ever written under it can never be decrypted again"
    )
    app.say(f"destroyed {kind} key {args.name!r} version {args.version}: {lost}")
    _say_what_was_erased(app, done.erased)
    return 0


def cmd_keys_shred(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=True)
    old = master_key_from_spec(args.old_master_key, "--old-master-key")
    if not isinstance(old, AwsKmsMasterKey):
        raise UsageError(
            "--old-master-key must be an aws-kms: key: only a KMS key can be scheduled for "
            "deletion (for a local key, destroy the key file and every copy of it yourself)"
        )
    done = lifecycle.shred_master_key(
        old, pending_window_days=args.pending_days, confirm=args.yes_shred, registry=registry
    )
    when = done.deletion_date.astimezone(UTC)
    app.say(
        f"{len(done.rewrapped)} key versions rewrapped under {registry.master_key.key_id} and "
        f"verified; {done.old_master_key_id} is scheduled for deletion on "
        f"{when:%Y-%m-%d %H:%M} UTC. KMS refuses it from now on; on that date every copy of a "
        "key it wrapped (backups, archives, replicas) becomes unreadable for good. Until then "
        "`aws kms cancel-key-deletion` undoes it."
    )
    return 0


def _say_what_was_erased(app: App, erased: Erased) -> None:
    reached, missed = erasure_limits(erased.dialect)
    if erased.vacuumed is False:
        reached = "the row is a tombstone, but the old row version is still in the table's pages"
        app.say(
            f"WARNING: VACUUM FULL did not run ({erased.problem}): run `VACUUM FULL` on the key "
            "table as its owner",
            style="bold yellow",
        )
    app.say(f"  reached: {reached}")
    if erased.older_transactions:
        app.say(
            f"WARNING: {erased.older_transactions} transaction(s) older than the destroy were "
            "open: VACUUM FULL keeps the old row version while one may still see it; run "
            "`VACUUM FULL` on the key table again once they end",
            style="bold yellow",
        )
    app.say(
        f"  not reached: {missed}; they are useless only once the master key that wrapped "
        "it is retired too"
    )

"""Getting started: a local master key (init-local), the settings in use (config), the tables
(setup)."""

from __future__ import annotations

import argparse
from pathlib import Path

import sqlalchemy as sa

from .. import census, reencrypt
from ..key_store import SqlKeyStore
from ..master_keys import LocalMasterKey
from ..tenants import tenant_table
from .app import App
from .config import ENV, PROG, shown_spec, shown_url
from .output import add_row, new_table


def cmd_init_local(app: App, args: argparse.Namespace) -> int:
    key = LocalMasterKey.generate_file(args.path)
    app.say(f"wrote a new local master key to {args.path} (key id {key.key_id}, mode 0600)")
    app.say(
        "NOT FOR PRODUCTION: anyone who can read this file can unwrap every data key it wraps, "
        "and there is no audit trail. Use an AWS KMS key for real data; "
        f"`{PROG} keys rewrap` moves data keys to it without touching a row.",
        style="bold yellow",
    )
    app.say(f"use it with: export {ENV['master_key']}=local:{Path(args.path).resolve()}")
    return 0


def cmd_config(app: App, args: argparse.Namespace) -> int:
    s = app.settings
    app.say(f"config file: {s.config_file or 'none'}")
    table = new_table(None, "setting", "value", "from")
    for name in ENV:
        found = s.get(name)
        if found is None:
            add_row(table, name, "-", f"not set ({ENV[name]})")
            continue
        values = [found.value] if isinstance(found.value, str) else found.value
        if name == "database_url":
            shown = [shown_url(v) for v in values]
        elif name in ("master_key", "previous_master_keys"):
            shown = [shown_spec(v) for v in values]
        else:
            shown = values
        add_row(table, name, ", ".join(shown), found.source)
    app.console.print(table)
    return 0


def cmd_setup(app: App, args: argparse.Namespace) -> int:
    engine = app.engine(create=True)
    store = SqlKeyStore(engine)
    from ..reencrypt import tables as job_tables

    tenant_keys = tenant_table(sa.MetaData())
    names = [store.table.name, census.columns_table.name, reencrypt.jobs_table.name]
    names += [t.name for t in job_tables.TABLES]  # where the workers of a job coordinate
    names.append(tenant_keys.name)
    before = {n: sa.inspect(engine).has_table(n) for n in names}
    store.create_table()
    tenant_keys.create(engine, checkfirst=True)
    census.create_tables(engine)  # the jobs table too: reencrypt registers it in that metadata
    job_tables.create_tables(engine)
    for n in names:
        app.say(f"{n}: {'already there' if before[n] else 'created'}")
    app.say(f"database {engine.url.render_as_string(hide_password=True)} is ready")
    return 0

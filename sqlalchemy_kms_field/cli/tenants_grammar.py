"""The grammar of ``kms-field tenants`` (light: the commands' module loads when one runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..constants import DESTROY_GRACE_PERIOD
from .handlers import _lazy

cmd_tenants_list = _lazy("tenants", "cmd_tenants_list")
cmd_tenants_rewrap = _lazy("tenants", "cmd_tenants_rewrap")
cmd_tenants_rotate = _lazy("tenants", "cmd_tenants_rotate")
cmd_tenants_erase = _lazy("tenants", "cmd_tenants_erase")
cmd_tenants_restore = _lazy("tenants", "cmd_tenants_restore")
cmd_tenants_encrypt = _lazy("tenants", "cmd_tenants_encrypt")


def add_tenants_commands(
    commands: Any,
    add: Callable[..., argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    duration: Callable[[str], float],
    scan_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """The ``tenants`` command group (called by the parser)."""
    group = commands.add_parser(
        "tenants",
        help="tenant keys: list, rewrap, rotate, encrypt, erase, restore",
        parents=[common],
    )
    sub = group.add_subparsers(dest="tenants_command", metavar="TENANTS_COMMAND", required=True)
    sub._kf_prefix = "tenants "  # the commands' labels in messages: `kms-field tenants erase`
    p = add(sub, "list", cmd_tenants_list, "every tenant key version under data key KEY")
    p.add_argument("key", metavar="KEY", help="the data key the tenant keys are wrapped by")
    p = add(
        sub,
        "rewrap",
        cmd_tenants_rewrap,
        "rewrap every tenant key under KEY's active version (after `keys rotate KEY`); no "
        "value row is touched",
    )
    p.add_argument("key", metavar="KEY")
    p = add(
        sub,
        "rotate",
        cmd_tenants_rotate,
        "a new key version for each TENANT (or --all), then re-encrypt that tenant's rows of "
        "every column of the models (KMS_FIELD_MODELS) declared with key=KEY and tenant=",
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("tenants", metavar="TENANT", nargs="*")
    p.add_argument("--all", action="store_true", help="every tenant with an active key")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N")
    p = add(
        sub,
        "encrypt",
        cmd_tenants_encrypt,
        "encrypt the plaintext values of TABLE.COLUMN, declared in the models with tenant=, "
        "each under its row's tenant key (created if needed); resumable",
    )
    p.add_argument("column", metavar="TABLE.COLUMN")
    p.add_argument("--schema", metavar="S", help="the table's schema")
    p.add_argument("--batch-size", type=int, default=1000, metavar="N")
    p = add(
        sub,
        "erase",
        cmd_tenants_erase,
        "erase one tenant: show the census of its rows, then retire its keys (unreadable in "
        "every process); run again after the grace period to destroy them for good (with "
        "--models, its blind-index values are set to NULL then too)",
    )
    p.add_argument("key", metavar="KEY", help="the data key named by the column's key=")
    p.add_argument("tenant", metavar="TENANT", help="the tenant id, as its column holds it")
    p.add_argument(
        "--yes-erase",
        action="store_true",
        help="confirm without being asked: the tenant's values become unreadable",
    )
    p.add_argument(
        "--grace-period",
        type=duration,
        default=DESTROY_GRACE_PERIOD,
        metavar="TIME",
        help="how long the keys stay retired (and restorable) before they can be destroyed, "
        "on the database's clock (default 3d)",
    )
    p.add_argument(
        "--skip-grace-period",
        action="store_true",
        help="DANGER: destroy the keys now, with no time to restore them",
    )
    scan_options(p)
    p = add(
        sub,
        "restore",
        cmd_tenants_restore,
        "undo an erasure whose keys are retired but not yet destroyed",
    )
    p.add_argument("key", metavar="KEY")
    p.add_argument("tenant", metavar="TENANT")

"""The command line's grammar: every command, its arguments and its help text."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..constants import ALL_SCHEMAS, CODECS, DESTROY_GRACE_PERIOD
from .config import CONFIG_FILE, ENV, MASTER_KEY_SYNTAX, PROG
from .handlers import (  # each imports its module when its command runs: --help stays fast
    cmd_config,
    cmd_init_local,
    cmd_job,
    cmd_keys_create,
    cmd_keys_destroy,
    cmd_keys_list,
    cmd_keys_retire,
    cmd_keys_rewrap,
    cmd_keys_rotate,
    cmd_keys_shred,
    cmd_reindex,
    cmd_setup,
    cmd_status,
)
from .job_control import add_commands as add_job_control_commands
from .job_control import add_worker_options
from .tenants_grammar import add_tenants_commands

if TYPE_CHECKING:
    from .app import App

Handler = Callable[["App", argparse.Namespace], int]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS defaults let these appear before or after the command without clobbering.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("configuration (see the end of --help)")
    s = argparse.SUPPRESS
    group.add_argument(
        "--config",
        metavar="PATH",
        default=s,
        help=f"config file (default ./{CONFIG_FILE}, else ./pyproject.toml)",
    )
    group.add_argument(
        "--database-url",
        metavar="URL",
        default=s,
        help=f"SQLAlchemy database URL (overrides {ENV['database_url']})",
    )
    group.add_argument(
        "--master-key",
        metavar="SPEC",
        default=s,
        help=f"master key: {MASTER_KEY_SYNTAX} (overrides {ENV['master_key']})",
    )
    group.add_argument(
        "--previous-master-key",
        metavar="SPEC",
        action="append",
        dest="previous_master_keys",
        default=s,
        help=f"a previous master key, repeatable (overrides {ENV['previous_master_keys']})",
    )
    group.add_argument(
        "--models",
        metavar="MODULE:ATTR",
        default=s,
        help=f"MetaData or declarative Base (overrides {ENV['models']})",
    )
    group.add_argument(
        "--active-ttl",
        metavar="SECONDS",
        default=s,
        help=f"how long processes keep the active key versions (overrides {ENV['active_ttl']})",
    )
    group.add_argument(
        "--application",
        metavar="NAME",
        default=s,
        help=f"application identifier in the encryption context (overrides {ENV['application']})",
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=s, help="log what the library does (INFO)"
    )
    return common


def build_parser(manual: str) -> argparse.ArgumentParser:
    """The parser; ``manual`` (the package docstring) gives --help its first line and epilog."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=manual.splitlines()[0],
        epilog=manual.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    keys_commands: Any = None

    def add(
        group: Any, name: str, handler: Handler, help: str, aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=help, description=help, parents=[common], aliases=list(aliases)
        )
        prefix = "keys " if group is keys_commands else getattr(group, "_kf_prefix", "")
        p.set_defaults(handler=handler, label=f"{PROG} {prefix}{name}")
        return p

    def init_local(group: Any) -> None:
        p = add(
            group,
            "init-local",
            cmd_init_local,
            "write a new local master key file (development only, NOT FOR PRODUCTION)",
        )
        p.add_argument("path", metavar="PATH", help="the key file to create (never overwritten)")

    init_local(commands)
    add(commands, "config", cmd_config, "show the settings in use and where each came from")
    add(
        commands,
        "setup",
        cmd_setup,
        "create the key store, known-columns and jobs tables",
        aliases=["create-tables"],
    )
    p = add(
        commands,
        "status",
        cmd_status,
        "rows per key version in each known encrypted or blind-index column, key states, "
        "unfinished jobs",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    keys = commands.add_parser(
        "keys",
        help="data and blind-index keys: list, create, rotate, rewrap, retire, destroy, shred",
        parents=[common],
    )
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    _add_keys_commands(add, keys_commands)
    init_local(keys_commands)  # also `keys init-local`, as the library's messages say
    add_tenants_commands(commands, add, common, _duration, _add_scan_options)

    jobs = [
        ("reencrypt", "reencrypt", "move every row of TABLE.COLUMN to the active key version"),
        ("encrypt-column", "encrypt", "encrypt a plaintext column in place"),
        ("decrypt-column", "decrypt", "decrypt an encrypted column back to plaintext in place"),
    ]
    for name, operation, help in jobs:
        p = add(commands, name, cmd_job, help)
        p.set_defaults(operation=operation)
        p.add_argument("column", metavar="TABLE.COLUMN")
        p.add_argument(
            "--key",
            metavar="NAME",
            required=operation != "reencrypt",
            help="data key name"
            + (" (default: the one known for the column)" if operation == "reencrypt" else ""),
        )
        _add_job_options(p)
        _add_format_options(p, operation)
        if operation == "encrypt":
            _add_companion_index_options(p)

    p = add(
        commands,
        "reindex",
        cmd_reindex,
        "recompute the blind-index column TABLE.COLUMN under the active index key version",
    )
    p.add_argument("column", metavar="TABLE.COLUMN")
    group = p.add_argument_group(
        "the blind index (default: as the models declare TABLE.COLUMN; given both, they must agree)"
    )
    group.add_argument("--source", metavar="COLUMN", help="the encrypted column it indexes")
    group.add_argument("--key", metavar="NAME", help="index key name")
    _add_index_options(group)
    _add_job_options(p)
    add_job_control_commands(add, commands, common)  # jobs status|pause|resume|cancel, forget
    return parser


def _add_keys_commands(add: Callable[..., argparse.ArgumentParser], keys_commands: Any) -> None:
    p = add(
        keys_commands,
        "list",
        cmd_keys_list,
        "every key version (data and index keys) and its state",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add(
        keys_commands,
        "create",
        cmd_keys_create,
        "create version 1 of a data key (or, with --index, of a blind-index key)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--exist-ok", action="store_true", help="do nothing if NAME already exists")
    p.add_argument(
        "--index",
        action="store_true",
        help="create a blind-index key (the HMAC key of BlindIndex columns), not a data key",
    )
    p = add(
        keys_commands,
        "rotate",
        cmd_keys_rotate,
        "add and activate a new version of a data or index key; older versions stay readable",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--force",
        action="store_true",
        help="rotate even while a job still moves rows to the active version",
    )
    p = add(
        keys_commands,
        "rewrap",
        cmd_keys_rewrap,
        "rewrap data keys under the master key (master key rotation; no row changes)",
    )
    p.add_argument("names", metavar="NAME", nargs="*", help="only these data keys (default: all)")
    p.add_argument(
        "--from-application",
        metavar="NAME",
        help="the keys are wrapped under this application identifier now ('' for keys made "
        "before one was configured); they move to --application / KMS_FIELD_APPLICATION",
    )
    p = add(
        keys_commands,
        "retire",
        cmd_keys_retire,
        "stop a version from decrypting (an index key: from matching), once a census of every "
        "column proves nothing uses it and every process has moved to a newer version",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=_positive_int, required=True, metavar="N")
    _add_scan_options(p)
    p = add(
        keys_commands,
        "destroy",
        cmd_keys_destroy,
        "erase a retired version's wrapped key for good (crypto-shredding), after its grace "
        "period and a new census of every column",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=_positive_int, required=True, metavar="N")
    p.add_argument(
        "--yes-destroy",
        action="store_true",
        help="confirm: values under this version become unreadable forever",
    )
    p.add_argument(
        "--grace-period",
        type=_duration,
        default=DESTROY_GRACE_PERIOD,
        metavar="TIME",
        help="how long the version must have been retired, on the database's clock: seconds, "
        "or a number with s, m, h or d (default 3d)",
    )
    p.add_argument(
        "--skip-grace-period",
        action="store_true",
        help="DANGER: destroy even if the grace period has not ended",
    )
    _add_scan_options(p)
    p = add(
        keys_commands,
        "shred",
        cmd_keys_shred,
        "rewrap every key version under the master key, verify, then schedule the old KMS key "
        "for deletion: backups of destroyed keys become unreadable too",
    )
    p.add_argument(
        "--old-master-key",
        metavar="aws-kms:ID",
        required=True,
        help="the KMS key to delete (it must not be the master key)",
    )
    p.add_argument(
        "--pending-days",
        type=int,
        choices=range(7, 31),
        default=30,
        metavar="DAYS",
        help="KMS's waiting period before the deletion, 7 to 30 (default 30)",
    )
    p.add_argument(
        "--yes-shred",
        action="store_true",
        help="confirm: everything the old key wrapped, in every backup, becomes unreadable",
    )


def _add_scan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--schema",
        metavar="S",
        action="append",
        help="also scan every table of schema S (repeatable); the default schema always is",
    )
    p.add_argument(
        "--all-schemas",
        dest="schema",
        action="append_const",
        const=ALL_SCHEMAS,
        help="scan every schema the database user can see (but the system ones)",
    )


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError("use seconds, or a number with s, m, h or d") from None
    if not seconds >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return seconds


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schema", metavar="S", help="schema of the table")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=2000,
        metavar="N",
        help="rows per transaction (default 2000)",
    )
    p.add_argument(
        "--rate",
        type=_positive_float,
        metavar="ROWS_PER_S",
        help="at most this many rows per second",
    )
    p.add_argument("--dry-run", action="store_true", help="only count the rows that would change")
    p.add_argument(
        "--skip-undecryptable",
        action="store_true",
        help="skip rows that fail to decrypt (listed at the end) instead of stopping",
    )
    add_worker_options(p)  # --workers, --join, --lease, --max-lag (job_control.py)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _add_format_options(p: argparse.ArgumentParser, operation: str) -> None:
    group = p.add_argument_group(
        "where the values belong (default: as the models declare TABLE.COLUMN, else learnt "
        "from the column's kf2 values)"
    )
    group.add_argument(
        "--context",
        metavar="TABLE.COLUMN",
        help="the table and column values are bound to, if the column type declares context=",
    )
    default = ", default str, or bytes for a binary column" if operation == "encrypt" else ""
    group.add_argument(
        "--codec",
        choices=CODECS,
        metavar="CODEC",
        help=f"the column type's codec: {', '.join(CODECS)}{default}",
    )
    group.add_argument(
        "--bind-to",
        metavar="COLUMN[,COLUMN]",
        help="other columns of the row the values are bound to (the type's bind_to)",
    )
    if operation != "decrypt":
        group.add_argument(
            "--pad",
            type=_non_negative_int,
            metavar="BYTES",
            help="pad plaintexts to a multiple of BYTES (default: the codec's, as the types do)",
        )


def _add_companion_index_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "a blind index filled in the same pass (declared by the models, or by these flags)"
    )
    group.add_argument(
        "--index-column",
        metavar="COLUMN",
        help="the blind-index column of TABLE over COLUMN, to compute with each encrypted value",
    )
    group.add_argument("--index-key", metavar="NAME", help="its index key name")
    _add_index_options(group)


def _add_index_options(group: Any) -> None:
    group.add_argument(
        "--normalizer",
        metavar="NAME",
        help="exact, strip, lower, casefold, nfkc or email; several: comma-separated, in order",
    )
    group.add_argument(
        "--bits",
        type=int,
        metavar="N",
        help="index size in bits: a multiple of 8 from 16 to 256 (default 256)",
    )

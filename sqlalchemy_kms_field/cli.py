"""The kms-field command line: data keys, census and re-encryption, configured without code.

Configuration (flags override environment variables, which override the config file):

  KMS_FIELD_DATABASE_URL          SQLAlchemy URL of the database that holds the key store and
                                  the encrypted tables                      (--database-url)
  KMS_FIELD_MASTER_KEY            the master key that wraps data keys          (--master-key)
                                    aws-kms:<key id | key ARN | alias/NAME | alias ARN>
                                    local:<path to a key file>  (see `kms-field init-local`)
                                    local-env:<VARNAME>         (base64 key in that variable)
                                  local master keys are NOT FOR PRODUCTION
  KMS_FIELD_PREVIOUS_MASTER_KEYS  comma-separated master keys, same syntax, that still unwrap
                                  older data keys; `keys rewrap` moves those data keys to the
                                  master key                         (--previous-master-key)
  KMS_FIELD_MODELS                optional package.module:attr naming a SQLAlchemy MetaData or
                                  declarative Base: its encrypted columns are known to status,
                                  reencrypt and keys retire                       (--models)

Config file: --config PATH, else ./kms-field.toml, else [tool.kms-field] in ./pyproject.toml,
with the keys database_url, master_key, previous_master_keys (a list) and models:

  # kms-field.toml
  database_url = "postgresql+psycopg://app@db.internal/app"
  master_key = "aws-kms:alias/app-pii"
  previous_master_keys = ["local:dev.key"]
  models = "myapp.models:Base"

A relative local: path in a config file is relative to the file's folder. AWS credentials,
region and endpoint come from the usual AWS settings (AWS_PROFILE, AWS_REGION,
AWS_ENDPOINT_URL_KMS, ...). No command prints a key; `kms-field config` shows the settings in
use and where each came from.

Exit status: 0 done; 1 the work failed or was refused (stderr says why in one line);
2 usage or configuration error; 130 interrupted (committed batches are kept: rerun to resume).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import census, lifecycle, reencrypt
from .census import Census, ColumnRef
from .exc import ConfigurationError, KmsFieldError
from .key_store import KeyState, SqlKeyStore, StoredKey
from .master_keys import AwsKmsMasterKey, Context, LocalMasterKey, MasterKey
from .registry import KeyRegistry

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table

PROG = "kms-field"
ENV = {
    "database_url": "KMS_FIELD_DATABASE_URL",
    "master_key": "KMS_FIELD_MASTER_KEY",
    "previous_master_keys": "KMS_FIELD_PREVIOUS_MASTER_KEYS",
    "models": "KMS_FIELD_MODELS",
}
FLAGS = {
    "database_url": "--database-url",
    "master_key": "--master-key",
    "previous_master_keys": "--previous-master-key",
    "models": "--models",
}
CONFIG_FILE = "kms-field.toml"
MASTER_KEY_SYNTAX = (
    "aws-kms:<key id, ARN or alias>, local:<path to key file> or local-env:<VARNAME>"
)


class UsageError(Exception):
    """A missing or invalid setting or argument: exit status 2."""


class Refused(Exception):
    """The command cannot do what was asked, and says why: exit status 1."""


# Configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    value: str | list[str]
    source: str  # "--database-url", "KMS_FIELD_DATABASE_URL" or "<file> (key)"


@dataclass
class Settings:
    values: dict[str, Setting]
    config_file: Path | None

    def get(self, name: str) -> Setting | None:
        return self.values.get(name)

    def need(self, name: str, why: str) -> Setting:
        return self.need_all([name], why)[0]

    def need_all(self, names: Sequence[str], why: str) -> list[Setting]:
        """The settings ``names``, or one error naming every missing one and how to set it."""
        missing = [n for n in names if not (n in self.values and self.values[n].value)]
        if missing:
            how = "; ".join(
                f"set {ENV[n]} or pass {FLAGS[n]}"
                + (f" ({MASTER_KEY_SYNTAX})" if n == "master_key" else "")
                for n in missing
            )
            raise UsageError(
                f"{why} needs the {' and '.join(missing)} setting{'s' if len(missing) > 1 else ''}"
                f": {how}; or put {' and '.join(missing)} in ./{CONFIG_FILE} or in "
                "[tool.kms-field] of ./pyproject.toml"
            )
        return [self.values[n] for n in names]


def resolve_settings(args: argparse.Namespace, environ: dict[str, str], cwd: Path) -> Settings:
    """Config file, then environment variables, then flags: the last one found wins."""
    values: dict[str, Setting] = {}
    path = _find_config_file(getattr(args, "config", None), cwd)
    if path is not None:
        values.update(_read_config_file(path))
    for name, variable in ENV.items():
        text = environ.get(variable, "").strip()
        if text:
            value: str | list[str] = text
            if name == "previous_master_keys":
                value = [part.strip() for part in text.split(",") if part.strip()]
            values[name] = Setting(value, variable)
    for name, flag in FLAGS.items():
        given = getattr(args, name, None)
        if given:
            values[name] = Setting(given, flag)
    return Settings(values, path)


def _find_config_file(given: str | None, cwd: Path) -> Path | None:
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UsageError(f"config file {given!r} (from --config) does not exist")
        return path.resolve()
    for candidate in (cwd / CONFIG_FILE, cwd / "pyproject.toml"):
        if candidate.is_file() and (
            candidate.name == CONFIG_FILE or _tool_table(_load_toml(candidate)) is not None
        ):
            return candidate.resolve()
    return None


def _load_toml(path: Path) -> dict[str, Any]:
    toml: Any
    try:
        toml = importlib.import_module("tomllib")
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            toml = importlib.import_module("tomli")
        except ModuleNotFoundError:
            raise UsageError(
                f"reading {path} on Python 3.10 needs tomli (pip install tomli); "
                "or configure with environment variables"
            ) from None
    try:
        with path.open("rb") as f:
            document: dict[str, Any] = toml.load(f)
    except (OSError, toml.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    return document


def _tool_table(document: dict[str, Any]) -> Any:
    tool = document.get("tool")
    return tool.get("kms-field") if isinstance(tool, dict) else None


def _read_config_file(path: Path) -> dict[str, Setting]:
    document = _load_toml(path)
    table: Any = document
    if path.name == "pyproject.toml":
        table = _tool_table(document)
        if table is None:
            raise UsageError(f"{path} has no [tool.kms-field] table")
    if not isinstance(table, dict):
        raise UsageError(f"[tool.kms-field] in {path} must be a table")
    out: dict[str, Setting] = {}
    for raw_name, value in table.items():
        name = raw_name.replace("-", "_")
        if name not in ENV:
            raise UsageError(
                f"unknown setting {raw_name!r} in {path}; the settings are {', '.join(ENV)}"
            )
        source = f"{path} ({raw_name})"
        if name == "previous_master_keys":
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{source} must be a list of master keys ({MASTER_KEY_SYNTAX})")
            out[name] = Setting([_relative_to(v, path) for v in value], source)
        elif isinstance(value, str):
            out[name] = Setting(
                _relative_to(value, path) if name == "master_key" else value, source
            )
        else:
            raise UsageError(f"{source} must be a string")
    return out


def _relative_to(spec: str, config_file: Path) -> str:
    """A relative local: path in a config file means relative to the file's folder."""
    kind, _, rest = spec.partition(":")
    if kind == "local" and rest and not Path(rest).expanduser().is_absolute():
        return f"local:{config_file.parent / rest}"
    return spec


def _looks_like_a_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text.strip(), validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def master_key_from_spec(spec: str, source: str) -> MasterKey:
    """``aws-kms:ID``, ``local:PATH`` or ``local-env:VAR``; errors never echo the spec."""
    kind, _, rest = spec.partition(":")
    rest = rest.strip()
    if kind == "aws-kms" and rest:
        return AwsKmsMasterKey(rest)
    if kind == "local" and rest:
        path = Path(rest).expanduser()
        if _looks_like_a_key(rest) and not path.exists():
            raise UsageError(
                f"the master key from {source} looks like a key itself, not a path: never put "
                "a key in configuration; write it to a file and use local:PATH, or use "
                "local-env:VARNAME"
            )
        try:
            return LocalMasterKey.from_file(path)
        except ConfigurationError as exc:
            raise UsageError(f"{exc} (master key from {source})") from None
    if kind == "local-env" and rest:
        try:
            return LocalMasterKey.from_env(rest)
        except ConfigurationError as exc:
            raise UsageError(f"{exc} (master key from {source})") from None
    raise UsageError(f"the master key from {source} must be {MASTER_KEY_SYNTAX}")


def _shown_spec(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind == "local" and _looks_like_a_key(rest):
        return "local:<hidden: this looks like a key, not a path>"
    return spec


def _shown_url(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<not a valid SQLAlchemy URL>"


class _NoMasterKey:
    """Stands in for the master key in commands that never wrap or unwrap a data key."""

    key_id = "none"

    def _refuse(self) -> NoReturn:
        raise ConfigurationError(f"this command needs a master key: set {ENV['master_key']}")

    def generate_data_key(self, context: Context) -> tuple[bytes, bytes, str]:
        self._refuse()

    def wrap(self, plaintext: bytes, context: Context) -> tuple[bytes, str]:
        self._refuse()

    def can_unwrap(self, master_key_id: str) -> bool:
        return False

    def unwrap(self, wrapped: bytes, context: Context, master_key_id: str) -> bytes:
        self._refuse()

    def rewrap(
        self, wrapped: bytes, context: Context, source_key_id: str
    ) -> tuple[bytes, str] | None:
        self._refuse()


class App:
    """Settings, and the engine, registry, models and console built from them on demand."""

    def __init__(self, args: argparse.Namespace, environ: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.cwd = cwd
        self.settings = resolve_settings(args, environ, cwd)
        self._engine: Engine | None = None
        self._console: Console | None = None
        self._metadata: tuple[sa.MetaData | None] | None = None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @property
    def console(self) -> Console:
        if self._console is None:
            self._console = make_console()
        return self._console

    def say(self, text: str = "", style: str | None = None) -> None:
        # soft_wrap: a long line stays one line in logs; a terminal wraps it on its own.
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def engine(self) -> Engine:
        if self._engine is None:
            setting = self.settings.need("database_url", f"`{self.args.label}`")
            assert isinstance(setting.value, str)
            try:
                self._engine = sa.create_engine(setting.value)
            except sa.exc.NoSuchModuleError:
                raise UsageError(
                    f"the database URL from {setting.source} names a database dialect or driver "
                    "that SQLAlchemy does not know"
                ) from None
            except sa.exc.ArgumentError:
                raise UsageError(
                    f"the database URL from {setting.source} is not a valid SQLAlchemy URL "
                    "(dialect+driver://user:password@host/database)"
                ) from None
            except ImportError as exc:
                raise UsageError(
                    f"the driver for the database URL from {setting.source} is not installed "
                    f"(no module {exc.name!r})"
                ) from None
        return self._engine

    def key_store(self) -> SqlKeyStore:
        store = SqlKeyStore(self.engine())
        if not sa.inspect(store.engine).has_table(store.table.name, schema=store.table.schema):
            url = store.engine.url.render_as_string(hide_password=True)
            raise Refused(
                f"the key store table {store.table.name!r} does not exist in {url}: "
                f"run `{PROG} setup` first"
            )
        return store

    def registry(self, *, master: bool) -> KeyRegistry:
        """A registry on the configured database; ``master``: this command unwraps keys."""
        if not master:
            return KeyRegistry(_NoMasterKey(), self.key_store())
        # Every setting is checked (status 2) before the database is touched.
        why = f"`{self.args.label}`"
        setting = self.settings.need_all(["database_url", "master_key"], why)[1]
        assert isinstance(setting.value, str)
        master_key = master_key_from_spec(setting.value, setting.source)
        previous = []
        found = self.settings.get("previous_master_keys")
        if found is not None:
            specs = [found.value] if isinstance(found.value, str) else found.value
            previous = [master_key_from_spec(spec, found.source) for spec in specs]
        return KeyRegistry(master_key, self.key_store(), previous_master_keys=previous)

    def metadata(self) -> sa.MetaData | None:
        """The MetaData named by the models setting, if there is one."""
        if self._metadata is None:
            found = self.settings.get("models")
            self._metadata = (None,) if found is None else (load_models(found, self.cwd),)
        return self._metadata[0]

    def known_columns(self, registry: KeyRegistry) -> list[ColumnRef]:
        return lifecycle.known_columns(self.metadata(), registry=registry)


def load_models(setting: Setting, cwd: Path) -> sa.MetaData:
    spec = setting.value
    module_name, _, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attribute:
        raise UsageError(
            f"the models setting from {setting.source} must be package.module:attribute, "
            "naming a SQLAlchemy MetaData or declarative Base"
        )
    if str(cwd) not in sys.path:
        sys.path.insert(0, str(cwd))  # as `python -m` would: the project's own modules
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import {module_name!r} (models from {setting.source}): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise UsageError(
                f"{module_name!r} has no attribute {attribute!r} (models from {setting.source})"
            )
        found = getattr(found, part)
    if isinstance(found, sa.MetaData):
        return found
    if isinstance(getattr(found, "metadata", None), sa.MetaData):
        return found.metadata  # type: ignore[no-any-return]
    raise UsageError(
        f"{module_name}:{attribute} (models from {setting.source}) is neither a SQLAlchemy "
        "MetaData nor a declarative Base"
    )


# Output -------------------------------------------------------------------------------------


def make_console() -> Console:
    try:
        from rich.console import Console
    except ImportError:
        raise UsageError(
            f"{PROG} needs rich for its output: pip install 'sqlalchemy-kms-field[cli]'"
        ) from None
    width = None
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        width = 1000  # logs and pipes: never fold key ids, paths and column names
    return Console(width=width, highlight=False)


def new_table(title: str | None, *headers: str) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(h, overflow="fold")
    return table


def add_row(table: Table, *cells: object) -> None:
    from rich.text import Text

    table.add_row(*(Text("" if c is None else str(c)) for c in cells))


def keys_table(title: str | None, stored: Sequence[StoredKey]) -> Table:
    kinds = [str(getattr(k, "kind", "data")) for k in stored]
    show_kind = any(kind != "data" for kind in kinds)  # blind-index keys live here too
    headers = ["name", "version", *(["kind"] if show_kind else []), "state", "master key id"]
    table = new_table(title, *headers, "created_at")
    for k, kind in zip(stored, kinds, strict=True):
        add_row(
            table,
            k.name,
            k.version,
            *([kind] if show_kind else []),
            k.state.value,
            k.master_key_id or "-",
            _when(k.created_at),
        )
    return table


def census_table(key: str, stored: Sequence[StoredKey], counts: Sequence[Census]) -> Table:
    versions = [k for k in stored if k.name == key and k.state is not KeyState.PENDING]
    headers = [f"v{k.version} ({k.state.value})" for k in versions]
    table = new_table(
        f"data key {key!r}: rows per version", "column", *headers, "NULL", "other", "total"
    )
    for c in counts:
        per_version = [c.by_version.get(k.version, 0) for k in versions]
        numbers = [f"{n:,}" for n in (*per_version, c.nulls, c.other, c.total)]
        add_row(table, c.column, *numbers)
    return table


def _when(value: object) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if hasattr(value, "isoformat") else "-"


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class JobProgress:
    """A rich progress bar on a terminal; elsewhere a plain line every N batches or S seconds."""

    def __init__(
        self, app: App, label: str, *, every_batches: int = 10, every_seconds: float = 5.0
    ) -> None:
        self.app = app
        self.label = label
        self.every_batches = every_batches
        self.every_seconds = every_seconds
        self.started = time.monotonic()
        self.batches = 0
        self._last_line = (0, self.started)  # batches, time of the last plain line
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        console = self.app.console
        if console.is_terminal and not console.is_dumb_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows"),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task(self.label, total=None, rate="")
            self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, done: int, todo: int) -> None:
        """The job's progress callback, called after each committed batch."""
        self.batches += 1
        now = time.monotonic()
        rate = done / max(now - self.started, 1e-6)
        total = max(todo, done)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, total=total, rate=f"{rate:,.0f} rows/s")
            return
        batches, when = self._last_line
        due = self.batches - batches >= self.every_batches or now - when >= self.every_seconds
        if not due and done < total:  # the line at 100% always shows
            return
        self._last_line = (self.batches, now)
        left = _duration((total - done) / rate) if rate > 0 else "?"
        percent = 100 * done / total if total else 100
        self.app.say(
            f"{self.label}: {done:,}/{total:,} rows ({percent:.0f}%), {rate:,.0f} rows/s, "
            f"about {left} left"
        )


# Commands -----------------------------------------------------------------------------------


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
            shown = [_shown_url(v) for v in values]
        elif name in ("master_key", "previous_master_keys"):
            shown = [_shown_spec(v) for v in values]
        else:
            shown = values
        add_row(table, name, ", ".join(shown), found.source)
    app.console.print(table)
    return 0


def cmd_setup(app: App, args: argparse.Namespace) -> int:
    engine = app.engine()
    store = SqlKeyStore(engine)
    names = [store.table.name, census.columns_table.name, reencrypt.jobs_table.name]
    before = {n: sa.inspect(engine).has_table(n) for n in names}
    store.create_table()
    census.create_tables(engine)  # the jobs table too: reencrypt registers it in that metadata
    for n in names:
        app.say(f"{n}: {'already there' if before[n] else 'created'}")
    app.say(f"database {engine.url.render_as_string(hide_password=True)} is ready")
    return 0


def cmd_keys_list(app: App, args: argparse.Namespace) -> int:
    stored = app.key_store().versions()
    if args.json:
        print(json.dumps([_key_json(k) for k in stored], indent=2))
        return 0
    if not stored:
        app.say(f"no data keys yet; create one with `{PROG} keys create NAME`")
        return 0
    app.console.print(keys_table(None, stored))
    return 0


def _key_json(k: StoredKey) -> dict[str, object]:
    return {
        "name": k.name,
        "version": k.version,
        "kind": str(getattr(k, "kind", "data")),
        "state": k.state.value,
        "master_key_id": k.master_key_id,
        "created_at": _when(k.created_at),
    }


def cmd_keys_create(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=True)
    if args.exist_ok and registry.key_store.versions(args.name):
        app.say(f"data key {args.name!r} already exists; nothing to do")
        return 0
    key = registry.create_data_key(args.name)
    stored = registry.key_store.get(key.name, key.version)
    app.say(
        f"created data key {key.name!r} version {key.version}: wrapped by "
        f"{stored.master_key_id}, stored, verified and active"
    )
    return 0


def cmd_keys_rotate(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=True)
    name = args.name
    active = registry.key_store.active_version(name)
    blocking = [
        job
        for job in reencrypt.unfinished_jobs(registry.key_store.engine, key=name)
        if active is not None and job.target_version == active
    ]
    if blocking and not args.force:
        detail = "; ".join(
            f"{job.operation} of {_job_column(job)} ({job.rows_done:,} rows done, last progress "
            f"{_when(job.updated_at)})"
            for job in blocking
        )
        raise Refused(
            f"refusing to rotate {name!r}: unfinished jobs move rows to its active version "
            f"{active}: {detail}. Finish them first (`{PROG} reencrypt TABLE.COLUMN`), or pass "
            "--force (they then start over toward the new version)"
        )
    key = registry.rotate_data_key(name)
    stored = registry.key_store.get(key.name, key.version)
    app.say(
        f"data key {name!r} version {key.version} is now active (wrapped by "
        f"{stored.master_key_id}); older versions stay readable. Applications switch to it "
        "within their active_ttl (60 s by default)."
    )
    columns = [ref for ref in app.known_columns(registry) if ref.key == name]
    for ref in columns:
        app.say(f"  next: {PROG} reencrypt {ref}")
    if not columns:
        app.say(f"  next: {PROG} reencrypt TABLE.COLUMN for every column under {name!r}")
    return 0


def cmd_keys_rewrap(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=True)
    names = args.names or None
    stored = registry.key_store.versions()
    for name in names or []:
        if not any(k.name == name for k in stored):
            raise Refused(f"no data key named {name!r} in the key store")
    for k in stored:
        if names is not None and k.name not in names:
            continue
        if k.state not in (KeyState.ACTIVE, KeyState.READABLE, KeyState.RETIRED):
            continue
        masters = (registry.master_key, *registry.previous_master_keys)
        if not any(m.can_unwrap(k.master_key_id) for m in masters):
            raise UsageError(
                f"data key {k.name!r} version {k.version} is wrapped by {k.master_key_id}, which "
                f"is not the master key: add the master key that wrapped it to "
                f"{ENV['previous_master_keys']} (or pass {FLAGS['previous_master_keys']})"
            )
    done = lifecycle.rewrap_data_keys(names, registry=registry)
    if not done:
        app.say("no data key to rewrap")
        return 0
    table = new_table(None, "name", "version", "from master key", "to master key")
    for r in done:
        add_row(table, r.name, r.version, r.old_master_key_id, r.new_master_key_id)
    app.console.print(table)
    noun = "version" if len(done) == 1 else "versions"
    app.say(f"{len(done)} data key {noun} rewrapped, each verified; no data row changed")
    return 0


def cmd_keys_retire(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=False)
    before = registry.key_store.get(args.name, args.version)
    counts = lifecycle.retire_data_key(
        args.name, args.version, metadata=app.metadata(), registry=registry
    )
    if before.state is KeyState.RETIRED:
        app.say(f"data key {args.name!r} version {args.version} was already retired")
        return 0
    app.console.print(census_table(args.name, registry.key_store.versions(args.name), counts))
    app.say(
        f"retired data key {args.name!r} version {args.version}: no known column holds a row on "
        f"it, and it no longer decrypts. `{PROG} keys destroy {args.name} --version "
        f"{args.version} --yes-destroy` erases it for good."
    )
    return 0


def cmd_keys_destroy(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=False)
    lifecycle.destroy_data_key(args.name, args.version, confirm=args.yes_destroy, registry=registry)
    app.say(
        f"destroyed data key {args.name!r} version {args.version}: its wrapped key is erased and "
        "any value ever written under it can never be decrypted again"
    )
    return 0


def _job_column(job: Any) -> str:
    return ".".join(p for p in (job.table_schema, job.table_name, job.column_name) if p)


def cmd_status(app: App, args: argparse.Namespace) -> int:
    registry = app.registry(master=False)
    stored = registry.key_store.versions()
    refs = app.known_columns(registry)
    counts: list[Census] = []
    problems: list[tuple[ColumnRef, str]] = []
    for ref in refs:
        try:
            counts += lifecycle.column_census([ref], registry=registry)
        except KmsFieldError as exc:  # a dropped table must not hide the other columns
            problems.append((ref, str(exc)))
    jobs = reencrypt.unfinished_jobs(registry.key_store.engine)
    if args.json:
        print(json.dumps(_status_json(stored, counts, problems, jobs), indent=2))
        return 0

    app.console.print(keys_table("data keys", stored) if stored else "no data keys yet")
    app.say()
    if not refs:
        app.say(
            "no encrypted column is known yet: set "
            f"{ENV['models']} to your models, or run a reencrypt/encrypt-column job"
        )
    for key in sorted({c.column.key for c in counts}):
        app.console.print(census_table(key, stored, [c for c in counts if c.column.key == key]))
        active = registry.key_store.active_version(key)
        for c in counts:
            behind = c.on_other_versions(active) - c.other if active else 0
            if c.column.key == key and behind:
                app.say(
                    f"  {c.column}: {behind:,} rows on older versions: {PROG} reencrypt {c.column}"
                )
        app.say()
    for ref, problem in problems:
        app.say(f"{ref}: cannot count: {problem}", style="yellow")
    if any(c.other for c in counts):
        app.say(
            "other: rows neither NULL nor on a version of the column's data key (plaintext, or "
            "values of another data key)"
        )
    if jobs:
        table = new_table(
            "unfinished jobs",
            "column",
            "operation",
            "key",
            "target version",
            "rows done",
            "rows skipped",
            "updated_at",
        )
        for job in jobs:
            add_row(
                table,
                _job_column(job),
                job.operation,
                job.key_name,
                job.target_version or "-",
                f"{job.rows_done:,}",
                f"{job.rows_skipped:,}",
                _when(job.updated_at),
            )
        app.console.print(table)
        app.say(f"rerun `{PROG} reencrypt` (or encrypt-/decrypt-column) on these to finish them")
    else:
        app.say("no unfinished jobs")
    return 0


def _status_json(
    stored: Sequence[StoredKey],
    counts: Sequence[Census],
    problems: Sequence[tuple[ColumnRef, str]],
    jobs: Sequence[Any],
) -> dict[str, object]:
    return {
        "keys": [_key_json(k) for k in stored],
        "columns": [
            {
                "column": str(c.column),
                "schema": c.column.schema,
                "table": c.column.table,
                "name": c.column.column,
                "key": c.column.key,
                "by_version": {str(v): n for v, n in sorted(c.by_version.items())},
                "nulls": c.nulls,
                "other": c.other,
                "total": c.total,
            }
            for c in counts
        ],
        "problems": [{"column": str(ref), "error": text} for ref, text in problems],
        "unfinished_jobs": [
            {
                "column": _job_column(job),
                "operation": job.operation,
                "key": job.key_name,
                "target_version": job.target_version,
                "rows_done": job.rows_done,
                "rows_skipped": job.rows_skipped,
                "updated_at": _when(job.updated_at),
            }
            for job in jobs
        ],
    }


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
    operation: reencrypt.Operation = args.operation
    schema, table, column = parse_column(args.column, args.schema)
    registry = app.registry(master=True)
    key = args.key or _default_key(app, registry, schema, table, column)
    ref = ColumnRef(table, column, key, schema)
    target = None if operation == "decrypt" else registry.active_key(key)
    version = f"data key {key!r} version {target.version}" if target else ""
    goal = {
        "reencrypt": f"re-encrypted to {version}",
        "encrypt": f"encrypted under {version}",
        "decrypt": f"decrypted to plaintext (data key {key!r})",
    }[operation]
    options: dict[str, Any] = {
        "key": key,
        "operation": operation,
        "schema": schema,
        "batch_size": args.batch_size,
        "rows_per_second": args.rate,
        "skip_undecryptable": args.skip_undecryptable,
        "registry": registry,
    }
    engine = registry.key_store.engine
    if args.dry_run:
        result = reencrypt.run_job(engine, table, column, dry_run=True, **options)
        app.say(f"dry run: {result.remaining:,} rows of {ref} would be {goal}; nothing was written")
        return 0
    app.say(f"{operation} {ref}: rows will be {goal}")
    with JobProgress(app, f"{operation} {ref}") as progress:
        result = reencrypt.run_job(engine, table, column, progress=progress, **options)
    state = "finished" if result.finished else "NOT finished: rerun to resume"
    app.say(f"{operation} {ref}: {state}")
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


# Parser -------------------------------------------------------------------------------------

Handler = Callable[[App, argparse.Namespace], int]


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
        "-v", "--verbose", action="store_true", default=s, help="log what the library does (INFO)"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=doc.splitlines()[0],
        epilog=doc.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    keys_commands: Any = None

    def add(
        group: Any, name: str, handler: Handler, help: str, aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=help, description=help, parents=[common], aliases=list(aliases)
        )
        prefix = "keys " if group is keys_commands else ""
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
        "rows per data key version in each known encrypted column, key states, unfinished jobs",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    keys = commands.add_parser(
        "keys", help="data keys: list, create, rotate, rewrap, retire, destroy", parents=[common]
    )
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    p = add(keys_commands, "list", cmd_keys_list, "every data key version and its state")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add(keys_commands, "create", cmd_keys_create, "create version 1 of a data key")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--exist-ok", action="store_true", help="do nothing if NAME already exists")
    p = add(
        keys_commands,
        "rotate",
        cmd_keys_rotate,
        "add and activate a new version of a data key; older versions stay readable",
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
    p = add(
        keys_commands,
        "retire",
        cmd_keys_retire,
        "stop a version from decrypting, once a census proves no known column uses it",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=_positive_int, required=True, metavar="N")
    p = add(
        keys_commands,
        "destroy",
        cmd_keys_destroy,
        "erase a retired version's wrapped key for good (crypto-shredding)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", type=_positive_int, required=True, metavar="N")
    p.add_argument(
        "--yes-destroy",
        action="store_true",
        help="confirm: values under this version become unreadable forever",
    )
    init_local(keys_commands)  # also `keys init-local`, as the library's messages say

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
        p.add_argument(
            "--dry-run", action="store_true", help="only count the rows that would change"
        )
        p.add_argument(
            "--skip-undecryptable",
            action="store_true",
            help="skip rows that fail to decrypt (listed at the end) instead of stopping",
        )
    return parser


# Entry point --------------------------------------------------------------------------------


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (a progress bar may have redirected it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - as logging.StreamHandler does
            self.handleError(record)


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``kms-field`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version (0), or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    library_log = logging.getLogger("sqlalchemy_kms_field")
    sink = _StderrHandler()
    sink.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    library_log.addHandler(sink)
    previous_level = library_log.level
    library_log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    app: App | None = None
    try:
        app = App(args, dict(os.environ), Path.cwd())
        status: int = args.handler(app, args)
        return status
    except UsageError as exc:
        _error(str(exc))
        return 2
    except (Refused, KmsFieldError) as exc:
        message = str(exc)
        if "previous_master_keys" in message:
            message += f" (set {ENV['previous_master_keys']})"
        _error(message)
        return 1
    except sa.exc.SQLAlchemyError as exc:
        # Only the driver's first line: the statement and its parameters may hold values.
        orig = getattr(exc, "orig", None) or exc
        where = ""
        if app is not None and app._engine is not None:
            where = f" ({app._engine.url.render_as_string(hide_password=True)})"
        detail = _first_line(orig)
        if isinstance(exc, sa.exc.IntegrityError):  # MySQL quotes the duplicate value itself
            detail = "a constraint refused the write (details withheld: they may quote a value)"
        _error(f"database error{where}: {type(orig).__name__}: {detail}")
        return 1
    except KeyboardInterrupt:
        _error("interrupted; every committed batch is kept: rerun to resume")
        return 130
    except BrokenPipeError:  # `kms-field keys list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if app is not None:
            app.close()
        library_log.removeHandler(sink)
        library_log.setLevel(previous_level)


if __name__ == "__main__":
    raise SystemExit(main())

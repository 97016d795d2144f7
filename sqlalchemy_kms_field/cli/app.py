"""One command's context: its settings, and what is built from them only when it is needed.

Nothing connects, unwraps or imports the models before a command asks, so that a command
needing fewer settings runs without the others, and every setting is checked (exit status 2)
before the database is touched.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import census, lifecycle
from ..census import ColumnRef
from ..exc import ConfigurationError
from ..key_store import SqlKeyStore
from ..master_keys import Context
from ..registry import KeyRegistry
from ..urls import url_hint
from .config import ENV, PROG, active_ttl, application, master_key_from_spec, resolve_settings
from .errors import Refused, UsageError
from .models import index_columns, load_models
from .output import make_console

if TYPE_CHECKING:
    from rich.console import Console


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

    def engine(self, *, create: bool = False) -> Engine:
        """The engine of the configured database; ``create``: a missing SQLite file may be made
        (``setup``); any other command refuses it rather than leave an empty file behind."""
        if self._engine is None:
            setting = self.settings.need("database_url", f"`{self.args.label}`")
            assert isinstance(setting.value, str)
            hint = url_hint(setting.value)
            if hint is not None:
                raise UsageError(f"the database URL from {setting.source}: {hint}")
            if not create:
                self._refuse_missing_sqlite_file(setting.value, setting.source)
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

    def _refuse_missing_sqlite_file(self, url: str, source: str) -> None:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            return  # create_engine says what is wrong with it
        database = parsed.database
        if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return
        if database.startswith("file:") or parsed.query.get("uri"):
            return  # a URI filename: SQLite's own options decide
        path = self.cwd / Path(database).expanduser()
        if not path.exists():
            raise UsageError(
                f"the SQLite database file {path} (from {source}) does not exist: check the "
                f"path, or run `{PROG} setup` to create a new database there"
            )

    def engine_url(self) -> str | None:
        """The URL of the engine, if one was made, for error messages (no password)."""
        if self._engine is None:
            return None
        return self._engine.url.render_as_string(hide_password=True)

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
            return KeyRegistry(
                _NoMasterKey(),
                self.key_store(),
                active_ttl=active_ttl(self.settings),
                application=application(self.settings),
            )
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
        return KeyRegistry(
            master_key,
            self.key_store(),
            previous_master_keys=previous,
            active_ttl=active_ttl(self.settings),
            application=application(self.settings),
        )

    def metadata(self) -> sa.MetaData | None:
        """The MetaData named by the models setting, if there is one."""
        if self._metadata is None:
            found = self.settings.get("models")
            self._metadata = (None,) if found is None else (load_models(found, self.cwd),)
        return self._metadata[0]

    def index_columns(self) -> list[ColumnRef]:
        """The blind-index columns that the models declare, under their index keys."""
        return index_columns(self.metadata())

    def known_columns(self, registry: KeyRegistry) -> list[ColumnRef]:
        """Encrypted and blind-index columns: recorded by jobs, or declared by the models."""
        declared = lifecycle.known_columns(self.metadata(), registry=registry)
        return census.merge(declared, self.index_columns())


def key_kind(registry: KeyRegistry, name: str) -> str | None:
    """``data`` or ``index``: the kind of key ``name`` in the key store; None if there is none."""
    stored = registry.key_store.versions(name)
    return stored[0].kind if stored else None

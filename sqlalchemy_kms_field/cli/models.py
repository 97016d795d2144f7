"""What the application's models declare: encrypted columns and their blind indexes.

``KMS_FIELD_MODELS`` names a MetaData or declarative Base. Its encrypted columns and blind-index
columns count as known to status and retire; a blind-index column's declaration (source column,
index key, normalizer, bits) is what ``reindex`` and ``encrypt-column --index-column`` compute,
unless flags give it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..blind_index import NORMALIZERS, BlindIndex
from ..census import ColumnRef
from ..exc import ConfigurationError
from .config import ENV, FLAGS, Setting
from .errors import UsageError


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


def _index_columns_of(metadata: sa.MetaData | None) -> list[tuple[sa.Table, sa.Column[Any]]]:
    if metadata is None:
        return []
    return [
        (table, col)
        for table in metadata.tables.values()
        for col in table.columns
        if isinstance(col.type, BlindIndex)
    ]


def index_columns(metadata: sa.MetaData | None) -> list[ColumnRef]:
    """Every blind-index column of ``metadata``, under its index key."""
    found = []
    for table, col in _index_columns_of(metadata):
        assert isinstance(col.type, BlindIndex)
        found.append(ColumnRef(table.name, col.name, col.type.key, table.schema))
    return sorted(found)


def declared_index(
    metadata: sa.MetaData | None, schema: str | None, table: str, column: str
) -> BlindIndex | None:
    """The BlindIndex that ``metadata`` declares as the type of ``schema.table.column``."""
    for t, col in _index_columns_of(metadata):
        if ((t.schema or None), t.name, col.name) == (schema, table, column):
            assert isinstance(col.type, BlindIndex)
            return col.type
    return None


def indexes_of_source(
    metadata: sa.MetaData | None, schema: str | None, table: str, source: str
) -> list[str]:
    """Names of the blind-index columns that ``metadata`` declares for column ``source``."""
    return [
        col.name
        for t, col in _index_columns_of(metadata)
        if ((t.schema or None), t.name) == (schema, table)
        and isinstance(col.type, BlindIndex)
        and col.type.source == source
    ]


@dataclass(frozen=True)
class IndexFlags:
    """A blind index declared with flags; a value of None means that flag was not given."""

    source: str | None
    key: str | None
    normalizer: str | None
    bits: int | None
    source_flag: str | None = "--source"  # None: the source is fixed by the command
    key_flag: str = "--key"

    @property
    def usage(self) -> str:
        source = f"{self.source_flag} COLUMN " if self.source_flag else ""
        return f"{source}{self.key_flag} NAME --normalizer NAME [--bits N]"

    def index(self) -> BlindIndex | None:
        """The BlindIndex these flags declare, or None if none of them was given."""
        optional = {"--bits": self.bits}
        required = {self.key_flag: self.key, "--normalizer": self.normalizer}
        if self.source_flag is not None:
            required = {self.source_flag: self.source, **required}
        if all(v is None for v in (*required.values(), *optional.values())):
            return None
        missing = [flag for flag, value in required.items() if value is None]
        if missing or self.source is None or self.key is None or self.normalizer is None:
            raise UsageError(
                f"a blind index given by flags needs {', '.join(required)} (and optionally "
                f"--bits); missing: {', '.join(missing)}. Or give none of them, and set "
                f"{ENV['models']} (or pass {FLAGS['models']}) to the models that declare it"
            )
        names = tuple(n.strip() for n in self.normalizer.split(",") if n.strip())
        unknown = [n for n in names if n not in NORMALIZERS]
        if unknown or not names:
            raise UsageError(
                f"unknown normalizer {', '.join(unknown) or repr(self.normalizer)} in "
                f"--normalizer; use one of {', '.join(sorted(NORMALIZERS))}, or several "
                "separated by commas (applied in order)"
            )
        try:
            return BlindIndex(
                self.source,
                self.key,
                normalizer=names[0] if len(names) == 1 else names,
                bits=256 if self.bits is None else self.bits,
            )
        except ConfigurationError as exc:
            raise UsageError(str(exc)) from None


def _normalizer_id(index: BlindIndex) -> tuple[str, ...] | Callable[[str], str]:
    n = index.normalizer
    return (n,) if isinstance(n, str) else n


def choose_index(declared: BlindIndex | None, flags: IndexFlags, where: str) -> BlindIndex:
    """The blind index of ``where``: from the flags or the models, which must then agree.

    An index computed differently from what the application computes (another normalizer,
    say) would make lookups miss rows silently: a disagreement is refused, not resolved.
    """
    given = flags.index()
    if given is not None and declared is not None:
        mine = (given.source, given.key, _normalizer_id(given), given.bits, given.context)
        theirs = (
            declared.source,
            declared.key,
            _normalizer_id(declared),
            declared.bits,
            declared.context,  # index values are bound to it: flags cannot declare another
        )
        if mine != theirs:
            raise UsageError(
                f"the flags declare {where} as {given!r} but the models declare it as "
                f"{declared!r}: lookups would miss rows; drop the flags, or fix the models"
            )
    found = given or declared
    if found is None:
        raise UsageError(
            f"no blind index is declared for {where}: set {ENV['models']} (or pass "
            f"{FLAGS['models']}) to the models that declare it, or pass {flags.usage}"
        )
    return found

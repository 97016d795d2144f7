"""Settings from flags, environment variables and a config file, and the master key they name.

Flags override environment variables, which override the config file; each setting remembers
where it came from, so that every error (and ``kms-field config``) can name the place to fix.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:  # imported where used: the parser (and --help) needs only the names here
    from ..master_keys import MasterKey

PROG = "kms-field"
ENV = {
    "database_url": "KMS_FIELD_DATABASE_URL",
    "master_key": "KMS_FIELD_MASTER_KEY",
    "previous_master_keys": "KMS_FIELD_PREVIOUS_MASTER_KEYS",
    "models": "KMS_FIELD_MODELS",
    "active_ttl": "KMS_FIELD_ACTIVE_TTL",
    "application": "KMS_FIELD_APPLICATION",
}
FLAGS = {
    "database_url": "--database-url",
    "master_key": "--master-key",
    "previous_master_keys": "--previous-master-key",
    "models": "--models",
    "active_ttl": "--active-ttl",
    "application": "--application",
}
CONFIG_FILE = "kms-field.toml"
MASTER_KEY_SYNTAX = (
    "aws-kms:<key id, ARN or alias>, local:<path to key file> or local-env:<VARNAME>"
)


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
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None


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
        elif name == "active_ttl" and isinstance(value, int | float):
            out[name] = Setting(str(value), source)
        elif isinstance(value, str):
            out[name] = Setting(
                _relative_to(value, path) if name == "master_key" else value, source
            )
        else:
            raise UsageError(f"{source} must be a string")
    return out


def active_ttl(settings: Settings) -> float:
    """Seconds processes keep the active key versions (60 unless configured)."""
    found = settings.get("active_ttl")
    if found is None:
        return 60.0
    try:
        seconds = float(str(found.value))
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise UsageError(f"{found.source} must be a number of seconds (0 or more)")
    return seconds


def application(settings: Settings) -> str | None:
    """The application identifier bound into encryption contexts (None unless configured)."""
    from ..exc import ConfigurationError
    from ..registry import check_application

    found = settings.get("application")
    if found is None:
        return None
    try:
        return check_application(str(found.value))
    except ConfigurationError as exc:
        raise UsageError(f"{exc} (from {found.source})") from None


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
    from ..exc import ConfigurationError
    from ..master_keys import AwsKmsMasterKey, LocalMasterKey

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


def shown_spec(spec: str) -> str:
    """A master key setting as it may be printed: a key pasted in place of a path is hidden."""
    kind, _, rest = spec.partition(":")
    if kind == "local" and _looks_like_a_key(rest):
        return "local:<hidden: this looks like a key, not a path>"
    return spec


def shown_url(url: str) -> str:
    """A database URL as it may be printed: without its password."""
    import sqlalchemy as sa

    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<not a valid SQLAlchemy URL>"

"""The kms-field command line: data and blind-index keys, census, re-encryption and reindexing.

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
                                  declarative Base: its encrypted and blind-index columns are
                                  known to status, reencrypt and keys retire, and reindex
                                  takes each BlindIndex declaration from it       (--models)
  KMS_FIELD_ACTIVE_TTL            seconds the application's processes keep the active key
                                  versions (default 60; keep it equal to the application's):
                                  a re-encryption finishes, and a reindex starts, only that
                                  long after the rotation                     (--active-ttl)
  KMS_FIELD_APPLICATION           the application identifier bound into every wrapped key's
                                  encryption context (the application's configure(...,
                                  application=...)); unset: none                (--application)

Config file: --config PATH, else ./kms-field.toml, else [tool.kms-field] in ./pyproject.toml,
with the keys database_url, master_key, previous_master_keys (a list), models, active_ttl
and application:

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

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ENV, PROG
from .errors import Refused, UsageError
from .parser import build_parser
from .wording import for_cli

if TYPE_CHECKING:
    from .app import App

__all__ = ["main"]

WAITS_LOGGER = "sqlalchemy_kms_field.waits"  # reencrypt.WAIT_LOG


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (a progress bar may have redirected it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(for_cli(self.format(record)) + "\n")
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
    parser = build_parser(__doc__ or "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version (0), or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    # Only now, with a command to run: --help and usage errors import none of this.
    import sqlalchemy as sa

    from ..exc import KmsFieldError
    from .app import App

    library_log = logging.getLogger("sqlalchemy_kms_field")
    sink = _StderrHandler()
    sink.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    library_log.addHandler(sink)
    previous_level = library_log.level
    library_log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    # Waits for the application's processes (active_ttl) are said without -v: a job that sits
    # at 100% for a minute says what it waits for.
    waits = logging.getLogger(WAITS_LOGGER)
    previous_waits_level = waits.level
    waits.setLevel(logging.INFO)
    app: App | None = None
    try:
        app = App(args, dict(os.environ), Path.cwd())
        status: int = args.handler(app, args)
        return status
    except UsageError as exc:
        _error(str(exc))
        return 2
    except (Refused, KmsFieldError) as exc:
        message = for_cli(str(exc))
        if "previous_master_keys" in message:
            message += f" (set {ENV['previous_master_keys']})"
        _error(message)
        return 1
    except sa.exc.SQLAlchemyError as exc:
        # Only the driver's first line: the statement and its parameters may hold values.
        orig = getattr(exc, "orig", None) or exc
        url = app.engine_url() if app is not None else None
        where = f" ({url})" if url else ""
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
        waits.setLevel(previous_waits_level)

"""The supported ``env.py`` for Alembic: configured from the same settings as ``kms-field``.

A whole ``env.py``::

    from alembic import context

    import sqlalchemy_kms_field.alembic_env as kf_env
    from myapp.models import Base

    kf_env.run_migrations(context, target_metadata=Base.metadata)

``run_migrations`` reads ``KMS_FIELD_DATABASE_URL`` (else ``sqlalchemy.url`` of alembic.ini),
``KMS_FIELD_MASTER_KEY``, ``KMS_FIELD_PREVIOUS_MASTER_KEYS``, ``KMS_FIELD_ACTIVE_TTL`` and
``KMS_FIELD_APPLICATION`` (or the same keys in ``./kms-field.toml`` or ``[tool.kms-field]`` of
``./pyproject.toml``), configures the library with them, and runs the migrations with what the
``op.*`` operations need: ``transaction_per_migration=True``, ``render_as_batch`` on SQLite,
and the autogenerate hooks of
:mod:`sqlalchemy_kms_field.alembic_ops`. Importing this module registers the operations.

An ``env.py`` of your own can use the pieces: :func:`configure_from_settings` and
:func:`context_options` (``context.configure(connection=..., **kf_env.context_options())``).
"""

from __future__ import annotations

import argparse
import os
from logging.config import fileConfig
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from . import alembic_ops
from .exc import ConfigurationError
from .registry import KeyRegistry, configure
from .urls import url_hint


def context_options() -> dict[str, Any]:
    """What ``context.configure`` needs for the library's operations and autogenerate."""
    return {
        # Each migration commits on its own: a re-encryption commits batch by batch, and a
        # rerun after a kill must find the earlier migrations stamped.
        "transaction_per_migration": True,
        "render_item": alembic_ops.render_item,
        "include_object": alembic_ops.include_object,
        "process_revision_directives": alembic_ops.process_revision_directives,
    }


def _settings() -> Any:
    from .cli.config import resolve_settings
    from .cli.errors import UsageError

    try:
        return resolve_settings(argparse.Namespace(), dict(os.environ), Path.cwd())
    except UsageError as exc:
        raise ConfigurationError(str(exc)) from None


def database_url(ini_url: str | None = None) -> str:
    """``KMS_FIELD_DATABASE_URL`` (or the config file's ``database_url``), else ``ini_url``."""
    found = _settings().get("database_url")
    url = str(found.value) if found is not None else ini_url
    if not url or url.startswith("driver://"):  # alembic init's placeholder
        raise ConfigurationError(
            "no database to migrate: set KMS_FIELD_DATABASE_URL (or sqlalchemy.url in "
            "alembic.ini, or database_url in ./kms-field.toml)"
        )
    hint = url_hint(url)
    if hint is not None:
        raise ConfigurationError(f"the database URL cannot be used as it is: {hint}")
    return url


def configure_from_settings(engine: sa.Engine) -> KeyRegistry | None:
    """Configure the library (key store on ``engine``) from the settings ``kms-field`` reads.

    Returns the registry; None, with nothing configured, when no master key is set (a migration
    that only changes the schema needs none; an ``op.*`` key operation then says what to set).
    """
    from .cli.config import active_ttl, application, master_key_from_spec
    from .cli.errors import UsageError
    from .key_store import SqlKeyStore

    settings = _settings()
    found = settings.get("master_key")
    if found is None or not found.value:
        alembic_ops.not_configured_because(
            "KMS_FIELD_MASTER_KEY is not set (aws-kms:KEY-ID, local:PATH or local-env:VARIABLE)"
        )
        return None
    try:
        master_key = master_key_from_spec(str(found.value), found.source)
        previous = []
        more = settings.get("previous_master_keys")
        if more is not None:
            specs = [more.value] if isinstance(more.value, str) else more.value
            previous = [master_key_from_spec(spec, more.source) for spec in specs]
        ttl, app = active_ttl(settings), application(settings)
    except UsageError as exc:
        raise ConfigurationError(str(exc)) from None
    alembic_ops.not_configured_because(None)
    return configure(
        master_key=master_key,
        key_store=SqlKeyStore(engine),
        previous_master_keys=previous,
        active_ttl=ttl,
        application=app,
    )


def run_migrations(
    context: Any, target_metadata: Any = None, *, logging_config: bool = True, **options: Any
) -> None:
    """The body of ``env.py``: configure from the settings, then run the migrations.

    ``context`` is ``alembic.context``; ``options`` go to ``context.configure`` after (and over)
    :func:`context_options`. ``logging_config``: set up logging from alembic.ini's sections, as
    the ``env.py`` of ``alembic init`` does. Offline ``--sql`` runs work for schema changes;
    the library's data operations refuse them (they need Python).
    """
    ini = context.config.config_file_name
    if logging_config and ini is not None and context.config.file_config.has_section("loggers"):
        fileConfig(ini, disable_existing_loggers=False)
    url = database_url(context.config.get_main_option("sqlalchemy.url"))
    sqlite = sa.make_url(url).get_backend_name() == "sqlite"
    settings = {
        **context_options(),
        "render_as_batch": sqlite,  # SQLite alters a column by copying its table
        "target_metadata": target_metadata,
        **options,
    }
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True, **settings)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        configure_from_settings(engine)
        with engine.connect() as connection:
            context.configure(connection=connection, **settings)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()

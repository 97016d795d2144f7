"""Alembic environment for the examples and tests.

The database URL comes from KMS_FIELD_DATABASE_URL, the master key from KMS_FIELD_MASTER_KEY
(``local:PATH`` or ``aws-kms:KEY-ID-OR-ALIAS``). Importing ``sqlalchemy_kms_field.alembic_ops``
registers the ``op.*`` operations of the library.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

import sqlalchemy_kms_field as kf
import sqlalchemy_kms_field.alembic_ops as kf_alembic  # registers op.reencrypt_column & co.

config = context.config
if config.config_file_name:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
url = os.environ.get("KMS_FIELD_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
if not url:
    raise SystemExit("set KMS_FIELD_DATABASE_URL to the database to migrate")


def master_key() -> kf.MasterKey:
    spec = os.environ.get("KMS_FIELD_MASTER_KEY", "")
    kind, _, value = spec.partition(":")
    if kind == "local":
        return kf.LocalMasterKey.from_file(value)
    if kind == "aws-kms":
        return kf.AwsKmsMasterKey(value)
    raise SystemExit("set KMS_FIELD_MASTER_KEY to local:PATH or aws-kms:KEY-ID")


def run_migrations_offline() -> None:
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = sa.create_engine(url, hide_parameters=True)
    # active_ttl: how long processes keep the active key versions before re-reading them; a
    # reindex waits that long after an index-key rotation. Keep it equal to the application's.
    active_ttl = float(os.environ.get("KMS_FIELD_ACTIVE_TTL", "60"))
    kf.configure(master_key=master_key(), key_store=kf.SqlKeyStore(engine), active_ttl=active_ttl)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            transaction_per_migration=True,
            render_item=kf_alembic.render_item,  # adds `import sqlalchemy_kms_field`
            include_object=kf_alembic.include_object,  # never drop the key store tables
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

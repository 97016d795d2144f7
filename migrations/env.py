"""Alembic environment for the examples and tests: the README's env.py, without models.

The database URL comes from KMS_FIELD_DATABASE_URL, the master key from KMS_FIELD_MASTER_KEY
(``local:PATH``, ``local-env:VARIABLE`` or ``aws-kms:KEY-ID-OR-ALIAS``), ``active_ttl`` from
KMS_FIELD_ACTIVE_TTL: the settings ``kms-field`` reads (README, "Alembic").
"""

from alembic import context

import sqlalchemy_kms_field.alembic_env as kf_env  # also registers op.create_key_store & co.

kf_env.run_migrations(context)

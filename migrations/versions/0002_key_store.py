"""The key store tables and data key "pii" (version 1).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_key_store()
    op.create_data_key("pii")


def downgrade() -> None:
    pass  # wrapped keys are never dropped by a downgrade: data may still need them
